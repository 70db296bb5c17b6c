//! NVRTC: compiles generated CUDA source to a CUBIN for a real architecture,
//! with the ptxas resource report (registers, shared memory, stack, spills).
//! No GPU is needed. Results are cached on disk (see [`crate::compile_cache`]).
//!
//! Finding NVRTC: `MIXC_CUDA_DIR` when set (and only there), else `<repo>/.cuda` (what
//! `scripts/install-cuda.sh` fills), then `./.cuda`, `CUDA_HOME`, `CUDA_PATH`,
//! `/usr/local/cuda`. Each may be a toolkit root (`lib64/` or `lib/` plus
//! `include/`) or a pip `--target` folder (`nvidia/cu13/{lib,include}`).
//! The libraries are preloaded by absolute path and kept loaded, so the
//! process needs no `LD_LIBRARY_PATH` (cudarc and NVRTC itself `dlopen` bare
//! names, which then resolve to the already-loaded copies).

use crate::compile_cache::{CacheEntry, CompileCache, Lookup};
use cudarc::nvrtc::{result, sys};
use mixc_codegen::Arch;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;
use thiserror::Error;

/// What to do when NVRTC is missing, said once for every error that needs it.
pub const INSTALL_HINT: &str =
    "run `scripts/install-cuda.sh` (installs NVRTC and the CUDA headers \
from PyPI into .cuda/, no GPU needed) or set MIXC_CUDA_DIR to a folder holding \
lib/libnvrtc.so.* and include/cuda_fp16.h";

#[derive(Debug, Error)]
pub enum NvrtcError {
    #[error("NVRTC not found (looked in: {searched}); {hint}", hint = INSTALL_HINT)]
    NotFound { searched: String },
    #[error("cannot load {path}: {reason}; {hint}", hint = INSTALL_HINT)]
    Load { path: String, reason: String },
    #[error("NVRTC call {call} failed: {reason}")]
    Api { call: &'static str, reason: String },
    /// The source did not compile. `excerpt` shows the source lines the log points at.
    #[error("NVRTC failed to compile `{name}` for {arch}:\n{log}\n{excerpt}")]
    Compile {
        name: String,
        arch: String,
        log: String,
        excerpt: String,
    },
}

/// A located CUDA installation (NVRTC library + headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaToolkit {
    /// Folder holding `libnvrtc.so.*` (and `libnvrtc-builtins.so.*`).
    pub lib_dir: PathBuf,
    /// Folder holding `cuda_fp16.h` / `cuda_bf16.h`.
    pub include_dir: PathBuf,
}

/// Per-kernel resources from the ptxas report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub function: String,
    pub registers: u32,
    /// Static shared memory (dynamic shared memory is set at launch).
    pub smem_bytes: u32,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub barriers: u32,
}

/// A compiled CUBIN and what it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompiledModule {
    pub arch: Arch,
    pub cubin: Vec<u8>,
    /// One entry per `__global__` function.
    pub resources: Vec<ResourceUsage>,
    /// The NVRTC program log (warnings and the ptxas report).
    pub log: String,
    /// Wall time of the NVRTC call that produced this CUBIN (on a cache hit:
    /// as recorded when it was compiled).
    pub compile_ms: f64,
    /// True when the CUBIN came from the disk cache.
    pub cache_hit: bool,
    /// Set when the cache could not be written (the compile still succeeded).
    pub cache_note: Option<String>,
}

impl CompiledModule {
    pub fn resources_of(&self, function: &str) -> Option<&ResourceUsage> {
        self.resources.iter().find(|r| r.function == function)
    }
}

fn lib_candidates(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc.so"))
        })
        .collect();
    // Prefer the versioned soname (`libnvrtc.so.13`) over the dev symlink.
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

fn toolkit_at(root: &Path) -> Option<CudaToolkit> {
    let roots = [
        root.to_path_buf(),
        root.join("nvidia/cu13"),
        root.join("nvidia/cu12"),
    ];
    for r in roots {
        let include = r.join("include");
        if !include.join("cuda_fp16.h").is_file() {
            continue;
        }
        for lib in ["lib", "lib64", "targets/x86_64-linux/lib"] {
            let lib_dir = r.join(lib);
            if lib_candidates(&lib_dir).is_some() {
                return Some(CudaToolkit {
                    lib_dir,
                    include_dir: include,
                });
            }
        }
    }
    None
}

/// Folders searched for NVRTC, in order: only `MIXC_CUDA_DIR` when it is set
/// (a wrong explicit setting is reported, not silently bypassed).
pub fn search_paths() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("MIXC_CUDA_DIR") {
        return vec![PathBuf::from(d)];
    }
    // The workspace root of this build: where `scripts/install-cuda.sh` installs by default.
    let mut v = vec![
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cuda"),
        PathBuf::from(".cuda"),
    ];
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            v.push(PathBuf::from(d));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda"));
    v
}

/// Finds NVRTC and the CUDA headers (without loading them).
pub fn locate() -> Result<CudaToolkit, NvrtcError> {
    let paths = search_paths();
    paths
        .iter()
        .find_map(|p| toolkit_at(p))
        .ok_or_else(|| NvrtcError::NotFound {
            searched: joined(&paths),
        })
}

fn joined(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

struct Loaded {
    toolkit: CudaToolkit,
    version: (i32, i32),
    // Kept alive for the whole process: unloading would invalidate cudarc's symbols.
    _libs: Vec<libloading::Library>,
}

/// Why loading failed, kept so every later call reports the same error.
enum LoadFailure {
    NotFound(String),
    Load(String, String),
    Api(&'static str, String),
}

fn load() -> Result<&'static Loaded, NvrtcError> {
    static LOADED: OnceLock<Result<Loaded, LoadFailure>> = OnceLock::new();
    let r = LOADED.get_or_init(|| {
        let paths = search_paths();
        let Some(toolkit) = paths.iter().find_map(|p| toolkit_at(p)) else {
            return Err(LoadFailure::NotFound(joined(&paths)));
        };
        // Builtins first: libnvrtc dlopens it by soname during compilation.
        let mut files: Vec<PathBuf> = std::fs::read_dir(&toolkit.lib_dir)
            .map_err(|e| LoadFailure::Load(toolkit.lib_dir.display().to_string(), e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
            })
            .collect();
        files.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        files.truncate(1);
        files.extend(lib_candidates(&toolkit.lib_dir));
        let mut libs = Vec::new();
        for f in files {
            // SAFETY: loading NVRTC runs its initialisers only, which have no preconditions.
            let lib = unsafe { libloading::Library::new(&f) }
                .map_err(|e| LoadFailure::Load(f.display().to_string(), e.to_string()))?;
            libs.push(lib);
        }
        // SAFETY: only probes whether cudarc can dlopen the library (now resolvable by soname).
        if !unsafe { sys::is_culib_present() } {
            return Err(LoadFailure::Load(
                toolkit.lib_dir.display().to_string(),
                "loaded by path, but cudarc still cannot open libnvrtc by name".into(),
            ));
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| LoadFailure::Api("nvrtcVersion", e.to_string()))?;
        Ok(Loaded {
            toolkit,
            version: (major, minor),
            _libs: libs,
        })
    });
    r.as_ref().map_err(|f| match f {
        LoadFailure::NotFound(searched) => NvrtcError::NotFound {
            searched: searched.clone(),
        },
        LoadFailure::Load(path, reason) => NvrtcError::Load {
            path: path.clone(),
            reason: reason.clone(),
        },
        LoadFailure::Api(call, reason) => NvrtcError::Api {
            call,
            reason: reason.clone(),
        },
    })
}

/// Loads NVRTC (once) and returns where it came from and its version.
pub fn nvrtc_info() -> Result<(CudaToolkit, (i32, i32)), NvrtcError> {
    let l = load()?;
    Ok((l.toolkit.clone(), l.version))
}

/// Options every compile uses (besides the include path, which is machine-specific
/// and so kept out of cache keys).
pub fn compile_options(arch: Arch) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", arch.name()),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
        // The generated kernels carry no host code; quieter logs.
        "--device-as-default-execution-space".into(),
    ]
}

/// Compiles `source` (named `name` in diagnostics) to a CUBIN for `arch`,
/// through the disk cache.
pub fn compile(name: &str, source: &str, arch: Arch) -> Result<CompiledModule, NvrtcError> {
    compile_with_cache(name, source, arch, CompileCache::from_env().as_ref())
}

/// Compiles a generated kernel for its own target arch, through the disk cache.
pub fn compile_generated(g: &mixc_codegen::GeneratedKernel) -> Result<CompiledModule, NvrtcError> {
    let name = g
        .kernels
        .first()
        .map_or(g.spec_name.as_str(), |k| k.name.as_str());
    compile(name, &g.source, g.target.arch)
}

/// Like [`compile`], with an explicit cache (`None`: always compile).
pub fn compile_with_cache(
    name: &str,
    source: &str,
    arch: Arch,
    cache: Option<&CompileCache>,
) -> Result<CompiledModule, NvrtcError> {
    let loaded = load()?;
    let options = compile_options(arch);
    let key = CompileCache::key(source, arch, loaded.version, &options);
    let mut corrupt = None;
    match cache.map(|c| c.lookup(&key)) {
        Some(Lookup::Hit(hit)) => {
            crate::counters::bump(crate::counters::Work::DiskCacheRead);
            return Ok(CompiledModule {
                arch,
                cubin: hit.cubin,
                resources: hit.resources,
                log: hit.log,
                compile_ms: hit.compile_ms,
                cache_hit: true,
                cache_note: None,
            });
        }
        Some(Lookup::Corrupt(why)) => corrupt = Some(why),
        Some(Lookup::Miss) | None => {}
    }
    let mut all_options = options;
    all_options.push(format!(
        "--include-path={}",
        loaded.toolkit.include_dir.display()
    ));
    let t0 = Instant::now();
    crate::counters::bump(crate::counters::Work::Compilation);
    let (cubin, log) = compile_raw(name, source, &all_options, Output::Cubin)
        .map_err(|e| e.into_error(name, source, arch))?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let resources = parse_resource_report(&log);
    let cache_note = cache.and_then(|c| {
        c.put(
            &key,
            &CacheEntry {
                cubin: cubin.clone(),
                resources: resources.clone(),
                log: log.clone(),
                compile_ms,
                arch: arch.name().into(),
                nvrtc_version: format!("{}.{}", loaded.version.0, loaded.version.1),
                cubin_len: 0,
                cubin_sha256: String::new(),
            },
        )
        .err()
        .map(|e| format!("compile cache not written: {e}"))
    });
    let cache_note = match (corrupt, cache_note) {
        (Some(why), Some(w)) => Some(format!("corrupt compile cache entry ({why}); {w}")),
        (Some(why), None) => Some(format!("corrupt compile cache entry ({why}); rebuilt")),
        (None, w) => w,
    };
    Ok(CompiledModule {
        arch,
        cubin,
        resources,
        log,
        compile_ms,
        cache_hit: false,
        cache_note,
    })
}

enum RawError {
    Compile(String),
    Api(&'static str, String),
}

impl RawError {
    fn into_error(self, name: &str, source: &str, arch: Arch) -> NvrtcError {
        match self {
            RawError::Compile(log) => NvrtcError::Compile {
                name: name.into(),
                arch: arch.name().into(),
                excerpt: source_excerpt(&log, source, name),
                log,
            },
            RawError::Api(call, reason) => NvrtcError::Api { call, reason },
        }
    }
}

/// What [`compile_raw`] returns: a CUBIN (real arch) or PTX text (virtual arch).
#[derive(Clone, Copy)]
enum Output {
    Cubin,
    Ptx,
}

/// Compiles `source` to PTX for the virtual architecture of `arch`
/// (`compute_80` / `compute_90`), uncached: the PTX simulator's input
/// (the `mixc-ptxsim` crate, `runtime/ptxsim/`), which executes exactly what
/// NVRTC lowered the kernel to.
/// `line_info` adds `.loc` source lines (`-lineinfo`) for profiles.
pub fn compile_ptx(
    name: &str,
    source: &str,
    arch: Arch,
    line_info: bool,
) -> Result<String, NvrtcError> {
    let loaded = load()?;
    let mut options = vec![
        format!(
            "--gpu-architecture={}",
            arch.name().replace("sm_", "compute_")
        ),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        format!("--include-path={}", loaded.toolkit.include_dir.display()),
    ];
    if line_info {
        options.push("--generate-line-info".into());
    }
    let (ptx, _log) = compile_raw(name, source, &options, Output::Ptx)
        .map_err(|e| e.into_error(name, source, arch))?;
    Ok(String::from_utf8_lossy(&ptx)
        .trim_end_matches('\0')
        .to_string())
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn compile_raw(
    name: &str,
    source: &str,
    options: &[String],
    output: Output,
) -> Result<(Vec<u8>, String), RawError> {
    let src = CString::new(source)
        .map_err(|_| RawError::Api("create", "source contains a NUL byte".into()))?;
    let cname = CString::new(format!("{name}.cu"))
        .map_err(|_| RawError::Api("create", "name contains a NUL byte".into()))?;
    let prog = result::create_program(src.as_c_str(), Some(cname.as_c_str()))
        .map_err(|e| RawError::Api("nvrtcCreateProgram", e.to_string()))?;
    // SAFETY: `prog` is a live program until destroy_program below; src/cname outlive it.
    unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let r = match compiled {
            Err(_) => Err(RawError::Compile(log)),
            Ok(()) => {
                let mut size = 0usize;
                let sized = match output {
                    Output::Cubin => sys::nvrtcGetCUBINSize(prog, &mut size),
                    Output::Ptx => sys::nvrtcGetPTXSize(prog, &mut size),
                };
                match sized.result() {
                    Err(e) => Err(RawError::Api("nvrtcGet*Size", e.to_string())),
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        let got = match output {
                            Output::Cubin => sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()),
                            Output::Ptx => sys::nvrtcGetPTX(prog, buf.as_mut_ptr().cast()),
                        };
                        got.result()
                            .map(|()| (buf, log))
                            .map_err(|e| RawError::Api("nvrtcGetCUBIN/PTX", e.to_string()))
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        r
    }
}

/// The source lines an NVRTC log points at (`name.cu(123): error: ...`),
/// with one line of context each side; at most five locations.
pub fn source_excerpt(log: &str, source: &str, name: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let prefix = format!("{name}.cu(");
    let mut out = String::new();
    let mut seen = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.strip_prefix(&prefix) else {
            continue;
        };
        let Some((num, _)) = rest.split_once(')') else {
            continue;
        };
        let Ok(n) = num.parse::<usize>() else {
            continue;
        };
        if seen.contains(&n) || seen.len() >= 5 || n == 0 {
            continue;
        }
        seen.push(n);
        out.push_str(&format!("--> {name}.cu line {n}:\n"));
        for k in n.saturating_sub(1).max(1)..=(n + 1).min(lines.len()) {
            let mark = if k == n { ">" } else { " " };
            out.push_str(&format!("{mark}{k:5} | {}\n", lines[k - 1]));
        }
    }
    out
}

fn number_before(s: &str, suffix: &str) -> Option<u32> {
    let idx = s.find(suffix)?;
    s[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses ptxas `-v` output into one [`ResourceUsage`] per entry function.
pub fn parse_resource_report(log: &str) -> Vec<ResourceUsage> {
    let mut out: Vec<ResourceUsage> = Vec::new();
    let mut current: Option<usize> = None;
    let quoted = |l: &str| l.split('\'').nth(1).map(str::to_string);
    for line in log.lines() {
        let l = line.trim();
        if l.contains("Compiling entry function") {
            if let Some(f) = quoted(l) {
                out.push(ResourceUsage {
                    function: f,
                    ..Default::default()
                });
                current = Some(out.len() - 1);
            }
        } else if let Some(rest) = l.split("Function properties for ").nth(1) {
            // Properties of non-entry functions (not inlined) are not reported per kernel.
            current = out.iter().position(|r| r.function == rest.trim());
        } else if let Some(i) = current {
            let r = &mut out[i];
            if l.contains("bytes stack frame") {
                r.stack_frame = number_before(l, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(l, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(l, "bytes spill loads").unwrap_or(0);
            } else if l.contains("Used ") && l.contains("registers") {
                r.registers = number_before(l, "registers").unwrap_or(0);
                r.barriers = number_before(l, "barriers").unwrap_or(0);
                r.smem_bytes = number_before(l, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// NVRTC's version as `major.minor` (loads NVRTC).
pub fn version_string() -> Result<String, NvrtcError> {
    let l = load()?;
    Ok(format!("{}.{}", l.version.0, l.version.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ptxas_report() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mixc_a_softmax_bf16' for 'sm_90'
ptxas info    : Function properties for mixc_a_softmax_bf16
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'other' for 'sm_90'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 400 bytes cmem[0]
";
        let r = parse_resource_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            ResourceUsage {
                function: "mixc_a_softmax_bf16".into(),
                registers: 168,
                smem_bytes: 16,
                stack_frame: 8,
                spill_stores: 4,
                spill_loads: 12,
                barriers: 1,
            }
        );
        assert_eq!((r[1].registers, r[1].barriers, r[1].smem_bytes), (32, 0, 0));
    }

    #[test]
    fn finds_toolkit_and_pip_layouts() {
        let dir = tempfile::tempdir().unwrap();
        assert!(toolkit_at(dir.path()).is_none());
        // pip --target layout: <dir>/nvidia/cu13/{lib,include}
        let cu13 = dir.path().join("nvidia/cu13");
        std::fs::create_dir_all(cu13.join("lib")).unwrap();
        std::fs::create_dir_all(cu13.join("include")).unwrap();
        std::fs::write(cu13.join("lib/libnvrtc.so.13"), b"").unwrap();
        assert!(toolkit_at(dir.path()).is_none(), "headers are required too");
        std::fs::write(cu13.join("include/cuda_fp16.h"), b"").unwrap();
        let tk = toolkit_at(dir.path()).unwrap();
        assert_eq!(tk.lib_dir, cu13.join("lib"));
        assert_eq!(tk.include_dir, cu13.join("include"));
        // A toolkit root given directly (what test.sh passes as MIXC_CUDA_DIR).
        assert_eq!(toolkit_at(&cu13).unwrap(), tk);
        let msg = NvrtcError::NotFound {
            searched: "x".into(),
        }
        .to_string();
        assert!(
            msg.contains("scripts/install-cuda.sh") && msg.contains("MIXC_CUDA_DIR"),
            "{msg}"
        );
    }

    #[test]
    fn excerpt_points_at_the_failing_line() {
        let src = "a\nb\nint x = ;\nd\n";
        let log = "k.cu(3): error: expected an expression\n1 error detected";
        let e = source_excerpt(log, src, "k");
        assert!(e.contains(">    3 | int x = ;"), "{e}");
        assert!(e.contains("     2 | b") && e.contains("     4 | d"), "{e}");
    }
}
