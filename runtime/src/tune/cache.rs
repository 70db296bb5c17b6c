//! The tuning cache: one JSON file per key in `<cache dir>/tune/`, where the
//! cache dir is the one the NVRTC cache uses (`MIXC_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/mixc`, else `~/.cache/mixc`; `MIXC_CACHE_DIR=""` turns
//! caching off).
//!
//! The key is (spec hash, shape bucket, dtype, device). The file name hashes
//! the key; the entry repeats the key and records the mixc version and file
//! format, so an entry from another mixc version (or a file that does not
//! match its name) is reported as stale and replaced, never used. A file
//! that does not parse is reported as corrupt and replaced. Writes go to a
//! temporary file in the same folder and are renamed over the entry, so
//! concurrent tuners leave one complete entry, never a mix of two.

use super::{CandidateResult, Outcome, TuneReport, TunedConfig};
use crate::compile_cache::CompileCache;
use mixc_dsl::ir::{DType, MixerSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Layout version of the JSON entries.
pub const FORMAT: u32 = 2;
/// The mixc version (every crate of the workspace shares it).
pub const MIXC_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the timings were measured on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub backend: String,
    /// CPU model name, or GPU name.
    pub name: String,
    /// Logical cores (CPU).
    pub cores: Option<usize>,
    /// e.g. 90 for sm_90 (CUDA).
    pub compute_capability: Option<u32>,
    /// CUDA driver version, e.g. `13.0` (CUDA).
    pub driver: Option<String>,
    /// NVRTC version, e.g. `13.0` (CUDA).
    pub nvrtc: Option<String>,
}

impl DeviceInfo {
    /// This machine's CPU: the `model name` of `/proc/cpuinfo` (the target
    /// architecture where there is none) and the cores this process may use.
    pub fn cpu() -> DeviceInfo {
        let name = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{} cpu", std::env::consts::ARCH));
        DeviceInfo {
            backend: "cpu".into(),
            name,
            cores: Some(std::thread::available_parallelism().map_or(1, |n| n.get())),
            compute_capability: None,
            driver: None,
            nvrtc: None,
        }
    }

    /// GPU `ordinal` through the CUDA driver: name, compute capability,
    /// driver and NVRTC versions. An error (no driver library, no device)
    /// says what is missing.
    pub fn cuda(ordinal: usize) -> Result<DeviceInfo, String> {
        // SAFETY: only probes whether the driver library can be opened;
        // cudarc panics on first use when it cannot.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no GPU: the CUDA driver library (libcuda.so) is not installed".into());
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| format!("no usable GPU (device {ordinal}): {e}"))?;
        let name = ctx.name().map_err(|e| format!("GPU {ordinal}: {e}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("GPU {ordinal}: {e}"))?;
        let mut v = 0;
        // SAFETY: one valid out-pointer; the driver is initialised by the context above.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion: {e}"))?;
        Ok(DeviceInfo {
            backend: "cuda".into(),
            name,
            cores: None,
            compute_capability: Some((major * 10 + minor) as u32),
            driver: Some(format!("{}.{}", v / 1000, (v % 1000) / 10)),
            nvrtc: crate::nvrtc::version_string().ok(),
        })
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        let mut s = self.name.clone();
        if let Some(c) = self.cores {
            s.push_str(&format!(", {c} cores"));
        }
        if let Some(cc) = self.compute_capability {
            s.push_str(&format!(", sm_{cc}"));
        }
        if let Some(d) = &self.driver {
            s.push_str(&format!(", driver {d}"));
        }
        if let Some(n) = &self.nvrtc {
            s.push_str(&format!(", NVRTC {n}"));
        }
        s
    }
}

/// Sequence lengths share an entry per power of two (2049..=4096 -> 4096).
pub fn seq_bucket(seq: usize) -> usize {
    seq.max(1).next_power_of_two()
}

/// Batch sizes share an entry per power of two.
pub fn batch_bucket(batch: usize) -> usize {
    batch.max(1).next_power_of_two()
}

/// SHA-256 of the spec's canonical JSON, 32 hex digits.
pub fn spec_hash(spec: &MixerSpec) -> String {
    hex(&Sha256::digest(spec.canonical_json().as_bytes())[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a tuned choice is valid for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TuneKey {
    /// For people reading the folder; the hash is what identifies the spec.
    pub spec_name: String,
    pub spec_hash: String,
    pub seq_bucket: usize,
    pub batch_bucket: usize,
    pub dtype: DType,
    pub device: DeviceInfo,
    /// Which pass the tiles were tuned for. Forward keys serialise without
    /// it, so entries written before backward tuning existed keep their
    /// names and stay valid.
    #[serde(default, skip_serializing_if = "Pass::is_fwd")]
    pub pass: Pass,
}

/// The pass a configuration is tuned for: the forward, or the backward
/// (`Mixer::backward`), whose tiles are tuned and cached separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    #[default]
    Fwd,
    Bwd,
}

impl Pass {
    pub fn is_fwd(&self) -> bool {
        *self == Pass::Fwd
    }
    pub fn name(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::Bwd => "bwd",
        }
    }
}

impl TuneKey {
    pub fn new(
        spec: &MixerSpec,
        batch: usize,
        seq: usize,
        dtype: DType,
        device: DeviceInfo,
    ) -> Self {
        TuneKey {
            spec_name: spec.name.clone(),
            spec_hash: spec_hash(spec),
            seq_bucket: seq_bucket(seq),
            batch_bucket: batch_bucket(batch),
            dtype,
            device,
            pass: Pass::Fwd,
        }
    }

    /// The same key for tiles tuned for `pass`.
    pub fn for_pass(mut self, pass: Pass) -> Self {
        self.pass = pass;
        self
    }

    /// `<spec>-<backend>-<hash of the key>.json`.
    pub fn file_name(&self) -> String {
        let json = serde_json::to_string(self).expect("TuneKey serialises");
        let name: String = self
            .spec_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(48)
            .collect();
        format!(
            "{name}-{}-{}.json",
            self.device.backend,
            hex(&Sha256::digest(json.as_bytes())[..12])
        )
    }
}

/// One row of the stored table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    /// Place among the timed candidates, 1 = chosen (the default's row may
    /// follow the top rows with its own, lower rank).
    pub rank: usize,
    pub label: String,
    pub config: TunedConfig,
    pub is_default: bool,
    pub median_s: f64,
    pub min_s: f64,
    pub reps: u32,
    pub check_error: f64,
}

impl TopRow {
    fn of(rank: usize, r: &CandidateResult) -> Option<TopRow> {
        let Outcome::Timed {
            sample,
            check_error,
        } = &r.outcome
        else {
            return None;
        };
        Some(TopRow {
            rank,
            label: r.candidate.label.clone(),
            config: r.candidate.config,
            is_default: r.candidate.is_default,
            median_s: sample.median_s(),
            min_s: sample.min_ns as f64 * 1e-9,
            reps: sample.reps,
            check_error: *check_error,
        })
    }
}

/// A stored tuning result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneEntry {
    pub format: u32,
    pub mixc_version: String,
    pub key: TuneKey,
    pub choice: TunedConfig,
    pub chosen_label: String,
    pub chosen_median_s: f64,
    /// The default's median (it is always timed).
    pub default_median_s: Option<f64>,
    /// The shape the timings were taken at (inside the key's bucket).
    pub tuned_batch: usize,
    pub tuned_seq: usize,
    pub tuned_at_unix: u64,
    pub candidates: usize,
    pub timed: usize,
    pub pruned: usize,
    /// The best timed candidates, best first.
    pub top: Vec<TopRow>,
}

impl TuneEntry {
    /// The entry of a finished run (`None` when no candidate could win).
    pub fn from_report(
        key: TuneKey,
        batch: usize,
        seq: usize,
        report: &TuneReport,
        top_n: usize,
    ) -> Option<TuneEntry> {
        let chosen = report.chosen_result()?;
        let ranked = report.ranked();
        Some(TuneEntry {
            format: FORMAT,
            mixc_version: MIXC_VERSION.into(),
            key,
            choice: chosen.candidate.config,
            chosen_label: chosen.candidate.label.clone(),
            chosen_median_s: chosen.sample()?.median_s(),
            default_median_s: report
                .default_result()
                .and_then(|d| d.sample())
                .map(|s| s.median_s()),
            tuned_batch: batch,
            tuned_seq: seq,
            tuned_at_unix: super::unix_now(),
            candidates: report.results.len(),
            timed: report.timed,
            pruned: report.count(|o| matches!(o, Outcome::Pruned { .. })),
            // The top rows, plus the default's row wherever it ranked: the
            // table is read as "how much better than the default".
            top: ranked
                .iter()
                .enumerate()
                .filter(|(i, r)| *i < top_n.max(1) || r.candidate.is_default)
                .filter_map(|(i, r)| TopRow::of(i + 1, r))
                .collect(),
        })
    }

    /// Default median over chosen median.
    pub fn speedup(&self) -> Option<f64> {
        Some(self.default_median_s? / self.chosen_median_s.max(1e-12))
    }
}

/// What [`TuneCache::load`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    Hit(Box<TuneEntry>),
    /// No entry for this key.
    Miss,
    /// A file is there but must not be used; the message says why.
    Invalid(String),
}

/// The tune folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TuneCache {
    dir: PathBuf,
}

impl TuneCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TuneCache { dir: dir.into() }
    }

    /// `<cache dir>/tune`, the cache dir resolved as for NVRTC (see
    /// [`CompileCache::from_env`]); `None` when caching is off.
    pub fn from_env() -> Option<Self> {
        let nvrtc = CompileCache::from_env()?;
        // CompileCache::from_env gives `<base>/nvrtc`; tune entries live beside it.
        let base = nvrtc.dir().parent().unwrap_or(nvrtc.dir());
        Some(TuneCache::new(base.join("tune")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, key: &TuneKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The entry for `key` if there is a valid one for this mixc version.
    pub fn load(&self, key: &TuneKey) -> Loaded {
        let path = self.path(key);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // No file, or no folder (a path component is a file): nothing cached.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Loaded::Miss
            }
            Err(e) => {
                return Loaded::Invalid(format!(
                    "cannot read tune cache entry {}: {e}",
                    path.display()
                ))
            }
        };
        // Check the version before the full layout: an older mixc may have
        // written fields this one does not know.
        let header: serde_json::Result<Header> = serde_json::from_str(&text);
        let p = path.display();
        match header {
            Err(e) => {
                return Loaded::Invalid(format!("tune cache entry {p} is corrupt ({e})"))
            }
            Ok(h) if h.mixc_version != MIXC_VERSION || h.format != FORMAT => {
                return Loaded::Invalid(format!(
                    "tune cache entry {p} is stale: written by mixc {} (format {}), this is mixc {MIXC_VERSION} (format {FORMAT})",
                    h.mixc_version, h.format
                ))
            }
            Ok(_) => {}
        }
        let entry: TuneEntry = match serde_json::from_str(&text) {
            Ok(e) => e,
            Err(e) => return Loaded::Invalid(format!("tune cache entry {p} is corrupt ({e})")),
        };
        if entry.key != *key {
            return Loaded::Invalid(format!(
                "tune cache entry {p} belongs to another spec, shape or device (`{}` on {})",
                entry.key.spec_name,
                entry.key.device.describe()
            ));
        }
        if let Err(why) = check_choice(&entry) {
            return Loaded::Invalid(format!(
                "tune cache entry {p} holds an invalid configuration: {why}"
            ));
        }
        Loaded::Hit(Box::new(entry))
    }

    /// Writes `entry` atomically (temporary file in the same folder, then
    /// rename), creating the folder. Returns the entry's path.
    pub fn store(&self, entry: &TuneEntry) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(&entry.key);
        let json = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tune-")
            .suffix(".tmp")
            .tempfile_in(&self.dir)?;
        tmp.write_all(&json)?;
        tmp.write_all(b"\n")?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(path)
    }
}

#[derive(Deserialize)]
struct Header {
    format: u32,
    mixc_version: String,
}

/// Spec-independent sanity of a stored choice (hand edits, bit rot).
fn check_choice(e: &TuneEntry) -> Result<(), String> {
    match (&e.choice, e.key.device.backend.as_str()) {
        (TunedConfig::Cpu(t), "cpu") => {
            for (name, v) in [
                ("block_m", t.block_m),
                ("block_n", t.block_n),
                ("chunk", t.chunk),
                ("threads", t.threads),
            ] {
                if v == 0 || v > 1 << 16 {
                    return Err(format!("{name} = {v}"));
                }
            }
            Ok(())
        }
        (TunedConfig::Cuda(c), "cuda") => c.validate_common().map_err(|e| e.to_string()),
        (_, backend) => Err(format!(
            "a configuration of another backend than `{backend}`"
        )),
    }
}
