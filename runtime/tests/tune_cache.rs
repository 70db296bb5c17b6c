//! The tuning cache: round trip, keys, and every way an entry can be
//! unusable (corrupt, other mixc version, another key, invalid values,
//! read-only folder) gives a clear message and the default, never a panic
//! or a wrong configuration. Concurrent writers leave one whole entry.

use mixc_dsl::ir::{DType, MixerSpec};
use mixc_runtime::cpu::CpuConfig;
use mixc_runtime::tune::cache::{self, Loaded, TopRow, FORMAT, MIXC_VERSION};
use mixc_runtime::tune::{
    cpu_config_in, CpuTiles, DeviceInfo, Source, TuneCache, TuneEntry, TuneKey, TunedConfig,
};
use std::path::Path;

fn spec() -> MixerSpec {
    mixc_dsl::parse_str(
        "mixer c { heads = 2; head_dim = 16; score = dot(q, k); mask = causal; norm = softmax; }",
    )
    .unwrap()
}

fn key(spec: &MixerSpec, seq: usize) -> TuneKey {
    TuneKey::new(spec, 1, seq, spec.dtype, DeviceInfo::cpu())
}

fn entry(key: TuneKey, block_m: usize) -> TuneEntry {
    let tiles = CpuTiles {
        block_m,
        block_n: 32,
        chunk: 64,
        threads: 1,
    };
    TuneEntry {
        format: cache::FORMAT,
        mixc_version: MIXC_VERSION.into(),
        key,
        choice: TunedConfig::Cpu(tiles),
        chosen_label: format!("block {block_m}x32"),
        chosen_median_s: 0.001,
        default_median_s: Some(0.002),
        tuned_batch: 1,
        tuned_seq: 100,
        tuned_at_unix: 0,
        candidates: 2,
        timed: 2,
        pruned: 0,
        top: vec![TopRow {
            rank: 1,
            label: format!("block {block_m}x32"),
            config: TunedConfig::Cpu(tiles),
            is_default: false,
            median_s: 0.001,
            min_s: 0.0009,
            reps: 3,
            check_error: 1e-7,
        }],
    }
}

fn expect_default_with_note(choice: &mixc_runtime::tune::CpuChoice, words: &[&str]) -> String {
    let Source::Default { note: Some(note) } = &choice.source else {
        panic!("expected the default with a note, got {:?}", choice.source)
    };
    for w in words {
        assert!(note.contains(w), "note `{note}` lacks `{w}`");
    }
    assert_eq!(choice.config, CpuConfig::default_for(&spec(), 100));
    note.clone()
}

#[test]
fn round_trip_and_lookup_of_a_stored_choice() {
    let dir = tempfile::tempdir().unwrap();
    let c = TuneCache::new(dir.path().join("tune"));
    let s = spec();
    // Nothing stored: the default, silently.
    let got = cpu_config_in(Some(&c), &s, 1, 100, s.dtype);
    assert_eq!(got.source, Source::Default { note: None });
    assert_eq!(got.config, CpuConfig::default_for(&s, 100));

    let path = c.store(&entry(key(&s, 100), 128)).unwrap();
    assert!(path.starts_with(c.dir()) && path.extension().unwrap() == "json");
    let Loaded::Hit(e) = c.load(&key(&s, 100)) else {
        panic!()
    };
    assert_eq!(*e, entry(key(&s, 100), 128));
    // Any seq in the same power-of-two bucket finds it; the tiles apply on
    // top of the default (ranks, sharding, precision untouched).
    let got = cpu_config_in(Some(&c), &s, 1, 128, s.dtype);
    assert_eq!(got.source, Source::Cached { path: path.clone() });
    assert_eq!(
        (got.config.block_m, got.config.block_n, got.config.threads),
        (128, 32, 1)
    );
    assert_eq!(
        got.config.sharding,
        CpuConfig::default_for(&s, 128).sharding
    );
    // Another bucket, batch bucket, dtype or spec misses.
    for (b, q, d) in [(1, 129, s.dtype), (2, 100, s.dtype), (1, 100, DType::F16)] {
        assert_eq!(
            cpu_config_in(Some(&c), &s, b, q, d).source,
            Source::Default { note: None }
        );
    }
    let mut other = s.clone();
    other.heads = 4;
    assert_eq!(
        cpu_config_in(Some(&c), &other, 1, 100, s.dtype).source,
        Source::Default { note: None }
    );
    // Caching off: the default.
    assert_eq!(
        cpu_config_in(None, &s, 1, 100, s.dtype).source,
        Source::Default { note: None }
    );
}

#[test]
fn keys_separate_what_changes_the_choice() {
    let s = spec();
    let k = key(&s, 1000);
    assert_eq!(k.seq_bucket, 1024);
    assert_eq!(k.file_name(), key(&s, 600).file_name());
    assert_ne!(k.file_name(), key(&s, 1025).file_name());
    let mut dev = DeviceInfo::cpu();
    dev.cores = Some(dev.cores.unwrap() + 1);
    assert_ne!(
        k.file_name(),
        TuneKey::new(&s, 1, 1000, s.dtype, dev).file_name()
    );
    let mut gpu = DeviceInfo::cpu();
    gpu.backend = "cuda".into();
    gpu.nvrtc = Some("13.0".into());
    let a = TuneKey::new(&s, 1, 1000, s.dtype, gpu.clone());
    gpu.nvrtc = Some("12.8".into());
    assert_ne!(
        a.file_name(),
        TuneKey::new(&s, 1, 1000, s.dtype, gpu).file_name()
    );
    assert!(k.file_name().starts_with("c-cpu-"), "{}", k.file_name());
}

#[test]
fn a_corrupt_entry_is_reported_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let c = TuneCache::new(dir.path());
    let s = spec();
    let k = key(&s, 100);
    for junk in [
        "",
        "{not json",
        "{\"format\": 1, \"mixc_version\": \"",
        "\u{0}\u{1}binary",
    ] {
        std::fs::write(c.path(&k), junk).unwrap();
        let Loaded::Invalid(msg) = c.load(&k) else {
            panic!("`{junk}` accepted")
        };
        assert!(
            msg.contains("corrupt") && msg.contains(&c.path(&k).display().to_string()),
            "{msg}"
        );
        expect_default_with_note(
            &cpu_config_in(Some(&c), &s, 1, 100, s.dtype),
            &["corrupt", "default"],
        );
    }
    // Valid JSON with the right version but missing fields is corrupt too.
    std::fs::write(
        c.path(&k),
        format!("{{\"format\": {FORMAT}, \"mixc_version\": \"{MIXC_VERSION}\"}}"),
    )
    .unwrap();
    assert!(matches!(c.load(&k), Loaded::Invalid(m) if m.contains("corrupt")));
    // Rebuilding overwrites it.
    c.store(&entry(k.clone(), 64)).unwrap();
    assert!(matches!(c.load(&k), Loaded::Hit(_)));
}

#[test]
fn an_entry_from_another_mixc_version_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let c = TuneCache::new(dir.path());
    let s = spec();
    let k = key(&s, 100);
    let mut e = entry(k.clone(), 128);
    e.mixc_version = "0.0.1".into();
    c.store(&e).unwrap();
    let Loaded::Invalid(msg) = c.load(&k) else {
        panic!()
    };
    assert!(
        msg.contains("stale") && msg.contains("mixc 0.0.1") && msg.contains(MIXC_VERSION),
        "{msg}"
    );
    expect_default_with_note(
        &cpu_config_in(Some(&c), &s, 1, 100, s.dtype),
        &["stale", "mixc tune"],
    );
    // A future layout of an older/newer mixc with unknown fields: stale, not corrupt.
    std::fs::write(
        c.path(&k),
        r#"{"format": 7, "mixc_version": "9.9.9", "something_new": [1, 2]}"#,
    )
    .unwrap();
    assert!(matches!(c.load(&k), Loaded::Invalid(m) if m.contains("stale") && m.contains("9.9.9")));
}

#[test]
fn entries_that_do_not_match_their_key_or_hold_bad_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = TuneCache::new(dir.path());
    let s = spec();
    let k = key(&s, 100);
    // A file copied under another key's name.
    let other = entry(key(&s, 4096), 128);
    std::fs::write(c.path(&k), serde_json::to_string(&other).unwrap()).unwrap();
    assert!(
        matches!(c.load(&k), Loaded::Invalid(m) if m.contains("another spec, shape or device"))
    );
    // A zero tile would make every run fail: refused, the default is used.
    c.store(&entry(k.clone(), 0)).unwrap();
    assert!(matches!(c.load(&k), Loaded::Invalid(ref m) if m.contains("block_m = 0")));
    expect_default_with_note(
        &cpu_config_in(Some(&c), &s, 1, 100, s.dtype),
        &["invalid configuration"],
    );
}

/// A folder this process cannot write. Under root, permission bits do not
/// stop writes, so the folder's parent is made a regular file instead.
fn unwritable_dir(root: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let ro = root.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        return ro;
    }
    let file = root.join("file");
    std::fs::write(&file, b"not a folder").unwrap();
    file.join("tune")
}

#[test]
fn a_read_only_cache_folder_fails_to_store_but_lookups_work() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec();
    let k = key(&s, 100);
    let ro = unwritable_dir(dir.path());
    let c = TuneCache::new(&ro);
    let err = c.store(&entry(k.clone(), 128)).unwrap_err();
    assert!(!err.to_string().is_empty());
    assert_eq!(c.load(&k), Loaded::Miss);
    assert_eq!(
        cpu_config_in(Some(&c), &s, 1, 100, s.dtype).source,
        Source::Default { note: None }
    );
    // A valid entry in a folder made read-only after writing is still read.
    let rw = dir.path().join("rw");
    let c2 = TuneCache::new(&rw);
    c2.store(&entry(k.clone(), 32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o555)).unwrap();
    assert!(matches!(c2.load(&k), Loaded::Hit(_)));
    std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn concurrent_writers_leave_one_complete_entry() {
    let dir = tempfile::tempdir().unwrap();
    let c = TuneCache::new(dir.path().join("tune"));
    let s = spec();
    let k = key(&s, 100);
    let blocks = [16, 32, 64, 128, 256, 512, 1024, 2048];
    std::thread::scope(|scope| {
        for &b in &blocks {
            let (c, k) = (&c, &k);
            scope.spawn(move || {
                for _ in 0..25 {
                    c.store(&entry(k.clone(), b)).unwrap();
                    // Readers never see a partial file.
                    match c.load(k) {
                        Loaded::Hit(e) => assert!(blocks.contains(&e.top[0].config_block_m())),
                        other => panic!("reader saw {other:?}"),
                    }
                }
            });
        }
    });
    let Loaded::Hit(e) = c.load(&k) else { panic!() };
    assert!(blocks.contains(&e.top[0].config_block_m()));
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(c.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![k.file_name()]);
}

trait BlockM {
    fn config_block_m(&self) -> usize;
}
impl BlockM for TopRow {
    fn config_block_m(&self) -> usize {
        match self.config {
            TunedConfig::Cpu(t) => t.block_m,
            TunedConfig::Cuda(c) => c.block_m as usize,
        }
    }
}

#[test]
fn cuda_lookups_use_a_cached_config_only_if_it_still_generates() {
    use mixc_codegen::{Arch, KernelConfig, Target};
    use mixc_runtime::tune::cuda_config_in;
    let dir = tempfile::tempdir().unwrap();
    let c = TuneCache::new(dir.path());
    let s = spec();
    let target = Target::new(Arch::Sm90, DType::Bf16);
    let gpu = DeviceInfo {
        backend: "cuda".into(),
        name: "Test GPU".into(),
        cores: None,
        compute_capability: Some(90),
        driver: Some("13.0".into()),
        nvrtc: Some("13.0".into()),
    };
    let default = KernelConfig::default_for(&s, &target);
    let (cfg, src) = cuda_config_in(Some(&c), &s, &target, 1, 100, gpu.clone());
    assert_eq!((cfg, src), (default, Source::Default { note: None }));

    let k = TuneKey::new(&s, 1, 100, DType::Bf16, gpu.clone());
    let good = default.with_overrides(&["stages=1"]).unwrap();
    let mut e = entry(k.clone(), 64);
    e.choice = TunedConfig::Cuda(good);
    let path = c.store(&e).unwrap();
    let (cfg, src) = cuda_config_in(Some(&c), &s, &target, 1, 100, gpu.clone());
    assert_eq!((cfg, src), (good, Source::Cached { path }));
    // The same entry on another GPU or driver is not used.
    let mut other = gpu.clone();
    other.driver = Some("12.8".into());
    assert_eq!(
        cuda_config_in(Some(&c), &s, &target, 1, 100, other).1,
        Source::Default { note: None }
    );
    // Well-formed but not a shape the kernel supports (say, a template
    // changed since tuning): refused at lookup.
    let unfit = KernelConfig {
        block_m: 32,
        warps: 16,
        ..default
    };
    assert!(unfit.validate_common().is_ok());
    e.choice = TunedConfig::Cuda(unfit);
    c.store(&e).unwrap();
    let (cfg, src) = cuda_config_in(Some(&c), &s, &target, 1, 100, gpu);
    assert_eq!(cfg, default);
    assert!(
        matches!(&src, Source::Default { note: Some(n) } if n.contains("no longer generates")),
        "{src:?}"
    );
}
