//! The CUDA backend's helper kernels (`templates/helpers.cu`): a snapshot of
//! the rendered source, and that it defines every kernel the runtime loads.

use mixc_codegen::{c_elem_type, helper_kernels, HelperKernels};
use mixc_dsl::ir::DType;

#[test]
fn snapshot_helper_kernels() {
    insta::assert_snapshot!("helper_kernels", helper_kernels().source);
}

#[test]
fn helper_source_defines_every_loaded_kernel() {
    let h = helper_kernels();
    assert!(
        !h.source.contains("{{") && !h.source.contains("{%") && !h.source.contains("{#"),
        "unrendered tera syntax:\n{}",
        h.source
    );
    // Every storage type has a merge kernel; the runtime loads these names.
    for d in [DType::F16, DType::Bf16, DType::F32] {
        assert!(HelperKernels::DTYPES.contains(&d), "{d}");
        let [merge, fill] = h.kernel_names(d);
        assert_eq!(merge, format!("mixc_merge_lse_{}", d.name()));
        let def = format!("MIXC_MERGE({merge}, {})\n", c_elem_type(d));
        assert_eq!(h.source.matches(&def).count(), 1, "{def}");
        let def = format!("extern \"C\" __global__ void {fill}(float* __restrict__ p, int n)");
        assert_eq!(h.source.matches(&def).count(), 1, "{def}");
    }
    // Rendered once: every call hands out the same string.
    assert!(std::ptr::eq(h.source, helper_kernels().source));
}
