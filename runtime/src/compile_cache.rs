//! On-disk cache of NVRTC results: one CUBIN and one JSON record per key.
//! The key hashes everything that changes the binary (source, arch, NVRTC
//! version, options), so a stale entry can never be returned. Writes go to a
//! temporary file first and are renamed into place, so concurrent processes
//! (parallel tests, several ranks) never see a half-written entry. The JSON
//! records the CUBIN's length and SHA-256, checked on every read: a
//! truncated or overwritten CUBIN is reported as corrupt (and rebuilt by the
//! compiler), never returned as a hit.

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
    /// Length and SHA-256 (hex) of the CUBIN, set by [`CompileCache::put`];
    /// an entry without them (an older mixc's) is treated as corrupt.
    #[serde(default)]
    pub cubin_len: u64,
    #[serde(default)]
    pub cubin_sha256: String,
}

/// What [`CompileCache::lookup`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Hit(Box<CacheEntry>),
    Miss,
    /// The entry exists but cannot be trusted; why.
    Corrupt(String),
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

    /// The entry for `key`, if both files are present and the CUBIN is the
    /// one recorded (see [`CompileCache::lookup`] for why not).
    pub fn get(&self, key: &str) -> Option<CacheEntry> {
        match self.lookup(key) {
            Lookup::Hit(e) => Some(*e),
            Lookup::Miss | Lookup::Corrupt(_) => None,
        }
    }

    /// The entry for `key`: a hit only when the JSON parses and the CUBIN has
    /// the recorded length and hash; no JSON or no CUBIN is a miss.
    pub fn lookup(&self, key: &str) -> Lookup {
        let (cubin_path, json_path) = self.paths(key);
        let Ok(json) = std::fs::read_to_string(&json_path) else {
            return Lookup::Miss;
        };
        let Ok(cubin) = std::fs::read(&cubin_path) else {
            return Lookup::Miss;
        };
        let shown = cubin_path.display();
        let mut entry: CacheEntry = match serde_json::from_str(&json) {
            Ok(e) => e,
            Err(e) => return Lookup::Corrupt(format!("{}: {e}", json_path.display())),
        };
        if cubin.len() as u64 != entry.cubin_len || entry.cubin_len == 0 {
            return Lookup::Corrupt(format!(
                "{shown} holds {} bytes, {} recorded",
                cubin.len(),
                entry.cubin_len
            ));
        }
        if sha256_hex(&cubin) != entry.cubin_sha256 {
            return Lookup::Corrupt(format!("{shown} does not match its recorded SHA-256"));
        }
        entry.cubin = cubin;
        Lookup::Hit(Box::new(entry))
    }

    /// Stores `entry` under `key` (CUBIN first: the JSON marks the entry complete).
    pub fn put(&self, key: &str, entry: &CacheEntry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let (cubin_path, json_path) = self.paths(key);
        write_atomic(&self.dir, &cubin_path, &entry.cubin)?;
        let mut record = entry.clone();
        record.cubin_len = entry.cubin.len() as u64;
        record.cubin_sha256 = sha256_hex(&entry.cubin);
        let json = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
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
            cubin_len: 0,
            cubin_sha256: String::new(),
        };
        cache.put(&k, &e).unwrap();
        let got = cache.get(&k).unwrap();
        assert_eq!(
            (&got.cubin, &got.resources, &got.log),
            (&e.cubin, &e.resources, &e.log)
        );
        assert_eq!(got.cubin_len, 3);
        // Overwritten or truncated CUBINs are corrupt, never a hit.
        let cubin = dir.path().join(format!("nvrtc/{k}.cubin"));
        std::fs::write(&cubin, [9, 9, 9]).unwrap();
        assert!(matches!(cache.lookup(&k), Lookup::Corrupt(m) if m.contains("SHA-256")));
        std::fs::write(&cubin, [1, 2]).unwrap();
        assert!(
            matches!(cache.lookup(&k), Lookup::Corrupt(m) if m.contains("2 bytes, 3 recorded"))
        );
        assert!(cache.get(&k).is_none());
        cache.put(&k, &e).unwrap();
        assert!(matches!(cache.lookup(&k), Lookup::Hit(_)));
        // A missing CUBIN makes the entry absent, not corrupt.
        std::fs::remove_file(dir.path().join(format!("nvrtc/{k}.cubin"))).unwrap();
        assert!(cache.get(&k).is_none());
    }
}
