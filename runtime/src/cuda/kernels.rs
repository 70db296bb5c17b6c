//! The compiled kernels of one (spec, arch, dtype, tile configuration), kept
//! in-process: the generated source and its NVRTC cubin (through the disk
//! cache), plus the helper kernels a softmax ring merges with. Host-only (no
//! GPU needed), so a `Mixer` and the host twin build them the same way.
//!
//! Every `CudaMixer` of the same key shares one [`CudaKernels`], the way
//! Triton keeps one compiled kernel per specialisation: the second handle
//! neither generates, hashes, reads the disk cache nor compiles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use mixc_codegen::{generate, generate_backward, GeneratedKernel, KernelConfig, Target};
use mixc_dsl::ir::{Family, MixerSpec};

use crate::error::{Result, RuntimeError};
use crate::nvrtc::CompiledModule;

/// Generated and compiled kernels of one specialisation.
#[derive(Debug)]
pub struct CudaKernels {
    /// Identifies the specialisation (spec, arch, dtype, configuration);
    /// loaded modules are shared per (GPU, key).
    pub key: String,
    pub generated: GeneratedKernel,
    /// The generated kernel's cubin.
    pub module: CompiledModule,
    /// The helper kernels (log-sum-exp merge, accumulator reset): softmax only.
    pub helpers: Option<CompiledModule>,
}

/// The reason codegen refuses a spec, in spec terms.
pub(crate) fn codegen_error(e: mixc_codegen::CodegenError) -> RuntimeError {
    RuntimeError::Unsupported {
        backend: "cuda",
        what: e.to_string(),
    }
}

impl CudaKernels {
    /// The kernels of `spec` for `target` with `config` (`None`: the
    /// heuristic default), from the in-process cache or generated and
    /// compiled (through the disk cache) once.
    pub fn get(
        spec: &MixerSpec,
        target: &Target,
        config: Option<KernelConfig>,
    ) -> Result<Arc<CudaKernels>> {
        let config = config.unwrap_or_else(|| KernelConfig::default_for(spec, target));
        cached(spec, target, &format!("{config:?}"), || {
            let generated = generate(spec, target, &config).map_err(codegen_error)?;
            if generated.kernels.len() != 1 {
                return Err(RuntimeError::Internal(format!(
                    "CUDA launcher: `{}` generated {} kernels; the launcher runs one per family",
                    spec.name,
                    generated.kernels.len()
                )));
            }
            let helpers = if spec.family == Family::Softmax {
                Some(crate::nvrtc::compile(
                    "mixc_merge_lse",
                    super::helper_kernels_source(),
                    target.arch,
                )?)
            } else {
                None
            };
            Ok((generated, helpers))
        })
    }

    /// The backward kernels of `spec` ([`mixc_codegen::generate_backward`])
    /// for `target` with `config` (`None`: the backward default), cached as
    /// [`CudaKernels::get`] caches the forward's.
    pub fn backward(
        spec: &MixerSpec,
        target: &Target,
        config: Option<KernelConfig>,
    ) -> Result<Arc<CudaKernels>> {
        let config = config.unwrap_or_else(|| KernelConfig::backward_default_for(spec, target));
        cached(spec, target, &format!("bwd|{config:?}"), || {
            let generated = generate_backward(spec, target, &config).map_err(codegen_error)?;
            Ok((generated, None))
        })
    }
}

/// The in-process cache behind [`CudaKernels::get`] and
/// [`CudaKernels::backward`]: `build` generates (and compiles any helpers)
/// once per key; the generated source is compiled here.
fn cached(
    spec: &MixerSpec,
    target: &Target,
    what: &str,
    build: impl FnOnce() -> Result<(GeneratedKernel, Option<CompiledModule>)>,
) -> Result<Arc<CudaKernels>> {
    let key = format!(
        "{}|{}|{}|{what}",
        spec.canonical_json(),
        target.arch,
        target.dtype.name()
    );
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<CudaKernels>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(k) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(k.clone());
    }
    // Built outside the lock: a compile takes seconds, and two threads
    // racing on one key both produce the same cubin.
    let (generated, helpers) = build()?;
    let module = crate::nvrtc::compile_generated(&generated)?;
    let k = Arc::new(CudaKernels {
        key: key.clone(),
        generated,
        module,
        helpers,
    });
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    Ok(map.entry(key).or_insert(k).clone())
}
