//! Shared by the cpu_* tests: every example spec, reduced so the full test
//! matrix stays fast, and the error measure against the f64 reference.
#![allow(dead_code)]

use mixc_dsl::ir::*;
use mixc_runtime::Tensor;

/// Allowed f32 error: max |cpu - ref| <= F32_TOL * max |ref|. Observed f32
/// rounding at these sizes is 1e-7..2e-6 of max |ref|, so 2e-4 leaves ~100x
/// headroom while any wrong or missing term (errors ~1e-1) still fails.
pub const F32_TOL: f64 = 2e-4;
/// Allowed f64 error, relative to max |ref|: pure rounding, different order.
pub const F64_TOL: f64 = 1e-10;

fn b(m: Mask) -> Box<Mask> {
    Box::new(m)
}
fn and(x: Mask, y: Mask) -> Mask {
    Mask::And(b(x), b(y))
}
fn or(x: Mask, y: Mask) -> Mask {
    Mask::Or(b(x), b(y))
}
/// Scales a mask's lengths down, so windows, prefixes and blocks matter at
/// test lengths (37..130) as they do at real ones.
pub fn shrink_mask(m: &Mask) -> Mask {
    match m {
        Mask::Window { size } => Mask::Window {
            size: (size / 256).max(3),
        },
        Mask::PrefixLm { prefix } => Mask::PrefixLm {
            prefix: (prefix / 16).max(1),
        },
        Mask::BlockSparse {
            block,
            local,
            global,
        } => Mask::BlockSparse {
            block: (block / 8).max(1),
            local: *local,
            global: *global,
        },
        Mask::And(x, y) => and(shrink_mask(x), shrink_mask(y)),
        Mask::Or(x, y) => or(shrink_mask(x), shrink_mask(y)),
        other => other.clone(),
    }
}

/// A spec reduced for tests: at most 4 query heads (keeping GQA), widths 16
/// (value width 32 where it differs from the key width), shrunk mask.
pub fn shrink(spec: &MixerSpec) -> MixerSpec {
    let mut s = spec.clone();
    let group = spec.group_size().min(2);
    s.heads = spec.heads.min(4);
    s.kv_heads = (s.heads / group).max(1);
    let wide = spec.value_dim != spec.head_dim;
    s.head_dim = 16;
    s.value_dim = if wide { 32 } else { 16 };
    s.mask = shrink_mask(&spec.mask);
    // A softcap of 50 barely bends scores of scale 1/sqrt(d); make it bite.
    if let (Some(_), Score::Dot { scale, .. }) = (&s.transform, &mut s.score) {
        *scale = 20.0;
    }
    s
}

/// Every examples/*.mix, parsed, then reduced by [`shrink`].
pub fn example_specs() -> Vec<MixerSpec> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "mix"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
        .iter()
        .map(|p| {
            let spec = mixc_dsl::parse_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            shrink(&spec)
        })
        .collect()
}

/// Alias kept for readability at call sites.
pub fn examples() -> Vec<MixerSpec> {
    example_specs()
}

/// Linear-family variants whose mask is not plain `causal`, so they take the
/// blocked path (with decay on the blocked path too).
pub fn blocked_linear_variants() -> Vec<MixerSpec> {
    example_specs()
        .into_iter()
        .filter(|s| matches!(s.family, Family::Linear | Family::Retention | Family::Gated))
        .map(|mut s| {
            s.name = format!("{}_windowed", s.name);
            s.mask = and(Mask::Causal, Mask::Window { size: 40 });
            s
        })
        .collect()
}

/// max |a - b| / max |b| (0 when both are 0).
pub fn rel_err(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    assert_eq!(a.shape, b.shape);
    let scale = b.data.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

/// A CPU configuration of `ranks` zigzag ranks, square `block` tiles,
/// chunk 16, 2 threads, in `precision`.
#[allow(dead_code)]
pub fn square_cfg(
    ranks: usize,
    block: usize,
    precision: mixc_runtime::cpu::Precision,
) -> mixc_runtime::cpu::CpuConfig {
    mixc_runtime::cpu::CpuConfig {
        ranks,
        sharding: mixc_runtime::cpu::Sharding::Zigzag,
        block_m: block,
        block_n: block,
        chunk: 16,
        threads: 2,
        precision,
    }
}
