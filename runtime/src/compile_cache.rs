//! On-disk cache of NVRTC results: one CUBIN and one JSON record per key.
//! The key hashes everything that changes the binary (source, arch, NVRTC
//! version, options), so a stale entry can never be returned. Writes go to a
//! temporary file first and are renamed into place, so concurrent processes
//! (parallel tests, several ranks) never see a half-written entry.

use crate::nvrtc::ResourceUsage;
use mixc_codegen::Arch;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A cached compile. The CUBIN lives next to the JSON (`<key>.cubin`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    #[serde(skip)]
    pub cubin: Vec<u8>,
    pub resources: Vec<ResourceUsage>,
    pub log: String,
    pub compile_ms: f64,
    pub arch: String,
    pub nvrtc_version: String,
}

#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CompileCache { dir: dir.into() }
    }

    /// `MIXC_CACHE_DIR`, else `$XDG_CACHE_HOME/mixc`, else `~/.cache/mixc`
    /// (each with `nvrtc/` appended); `None` when no home is known or
    /// `MIXC_CACHE_DIR` is set to the empty string (caching off).
    pub fn from_env() -> Option<Self> {
        let base = match std::env::var_os("MIXC_CACHE_DIR") {
            Some(d) if d.is_empty() => return None,
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
                Some(x) => PathBuf::from(x).join("mixc"),
                None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/mixc"),
            },
        };
        Some(CompileCache::new(base.join("nvrtc")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key(source: &str, arch: Arch, nvrtc_version: (i32, i32), options: &[String]) -> String {
        let mut h = Sha256::new();
        // Length-prefixed fields: no two different inputs hash the same bytes.
        for part in [
            source,
            arch.name(),
            &format!("{}.{}", nvrtc_version.0, nvrtc_version.1),
            &options.join("\u{1}"),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}.cubin")),
            self.dir.join(format!("{key}.json")),
        )
    }

    /// The entry for `key`, if both files are present and readable.
    pub fn get(&self, key: &str) -> Option<CacheEntry> {
        let (cubin_path, json_path) = self.paths(key);
        let json = std::fs::read_to_string(json_path).ok()?;
        let mut entry: CacheEntry = serde_json::from_str(&json).ok()?;
        entry.cubin = std::fs::read(cubin_path).ok()?;
        (!entry.cubin.is_empty()).then_some(entry)
    }

    /// Stores `entry` under `key` (CUBIN first: the JSON marks the entry complete).
    pub fn put(&self, key: &str, entry: &CacheEntry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (cubin_path, json_path) = self.paths(key);
        write_atomic(&self.dir, &cubin_path, &entry.cubin)?;
        let json = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
        write_atomic(&self.dir, &json_path, &json)
    }
}

fn write_atomic(dir: &Path, dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keys_separate_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(dir.path().join("nvrtc"));
        let opts = vec!["--std=c++17".to_string()];
        let k = CompileCache::key("src", Arch::Sm90, (13, 0), &opts);
        assert_ne!(k, CompileCache::key("src", Arch::Sm80, (13, 0), &opts));
        assert_ne!(k, CompileCache::key("src", Arch::Sm90, (12, 8), &opts));
        assert_ne!(k, CompileCache::key("src ", Arch::Sm90, (13, 0), &opts));
        assert_ne!(k, CompileCache::key("src", Arch::Sm90, (13, 0), &[]));
        assert!(cache.get(&k).is_none());
        let e = CacheEntry {
            cubin: vec![1, 2, 3],
            resources: vec![ResourceUsage {
                function: "f".into(),
                registers: 40,
                ..Default::default()
            }],
            log: "ok".into(),
            compile_ms: 12.5,
            arch: "sm_90".into(),
            nvrtc_version: "13.0".into(),
        };
        cache.put(&k, &e).unwrap();
        assert_eq!(cache.get(&k).unwrap(), e);
        // A missing CUBIN makes the entry absent, not corrupt.
        std::fs::remove_file(dir.path().join(format!("nvrtc/{k}.cubin"))).unwrap();
        assert!(cache.get(&k).is_none());
    }
}
