//! A tuning session through the library (`tune::tune`), as `mixc tune` runs
//! it: time and store, then a cache hit, then a forced retune; a `Mixer`
//! with tuned-or-default tiles then runs the stored choice.

use std::time::Duration;

use mixc_runtime::tune::{self, TuneEvent, TuneRequest, TuneResult};
use mixc_runtime::{BackendKind, ConfigSource, Device, Mixer, Options};

#[test]
fn tune_store_hit_and_use() {
    // The only test in this binary, so the process-wide cache folder is ours.
    let dir = std::env::temp_dir().join(format!("mixc-tune-session-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::env::set_var("MIXC_CACHE_DIR", &dir);
    let spec = mixc_dsl::parse_str(
        "mixer tuned_once { heads = 2; head_dim = 16; dtype = f32; mask = causal; }",
    )
    .unwrap();
    let mut req = TuneRequest {
        backend: BackendKind::Cpu,
        batch: 1,
        seq: 96,
        dtype: spec.dtype,
        reps: 1,
        seed: 0,
        budget: Duration::from_secs(2),
        force: false,
        top: 3,
        pass: tune::Pass::Fwd,
    };
    let mut started = 0;
    let mut events = |e: TuneEvent| {
        if let TuneEvent::Started { key, .. } = e {
            assert_eq!(key.seq_bucket, 128);
            started += 1;
        }
    };
    let s = tune::tune(&spec, &req, &mut events, &mut |_| {}).unwrap();
    let path = match s.result {
        TuneResult::Tuned {
            written: Some(p),
            report,
            ..
        } => {
            assert!(report.timed >= 1);
            p
        }
        other => panic!("{other:?} {:?}", s.warnings),
    };
    assert!(path.starts_with(&dir), "{}", path.display());
    // Same bucket: a hit, nothing timed.
    req.seq = 120;
    let s = tune::tune(&spec, &req, &mut |_| {}, &mut |_| {}).unwrap();
    assert!(
        matches!(s.result, TuneResult::CacheHit { .. }),
        "{:?}",
        s.result
    );
    req.force = true;
    let s = tune::tune(&spec, &req, &mut |_| {}, &mut |_| {}).unwrap();
    assert!(matches!(s.result, TuneResult::Tuned { .. }));
    assert_eq!(started, 1);

    // A mixer with `Tiles::Auto` picks the entry for that bucket.
    let m = Mixer::new(&spec, Options::on(Device::Cpu)).unwrap();
    let x = mixc_runtime::inputs::random_inputs(&spec, 1, 100, 3);
    let out = m.forward(&x).unwrap();
    assert!(
        matches!(&out.config_source, ConfigSource::Tuned { path } if path.starts_with(dir.to_str().unwrap())),
        "{:?}",
        out.config_source
    );
    // Before a backward entry exists, the backward runs the default tiles.
    let d_o = mixc_runtime::inputs::random_upstream(&spec, 1, 100, 4);
    let (out, saved) = m.forward_train(&x).unwrap();
    let back = m.backward(&x, &out.o, &saved, &d_o).unwrap();
    assert!(
        matches!(back.config_source, ConfigSource::Default { .. }),
        "{:?}",
        back.config_source
    );
    // The backward pass is tuned under its own key (another file), checked
    // against the reference gradients, and a new mixer's backward uses it
    // while its forward keeps the forward's entry.
    req.seq = 96;
    req.force = false;
    req.pass = tune::Pass::Bwd;
    let s = tune::tune(&spec, &req, &mut |_| {}, &mut |_| {}).unwrap();
    let bwd_path = match s.result {
        TuneResult::Tuned {
            written: Some(p),
            report,
            ..
        } => {
            assert!(report.timed >= 1);
            p
        }
        other => panic!("{other:?} {:?}", s.warnings),
    };
    assert_ne!(bwd_path, path);
    assert_eq!(s.key.pass, tune::Pass::Bwd);
    let m = Mixer::new(&spec, Options::on(Device::Cpu)).unwrap();
    let (out, saved) = m.forward_train(&x).unwrap();
    let back = m.backward(&x, &out.o, &saved, &d_o).unwrap();
    assert!(
        matches!(&back.config_source, ConfigSource::Tuned { path } if *path == bwd_path.display().to_string()),
        "{:?}",
        back.config_source
    );
    assert!(
        matches!(&out.config_source, ConfigSource::Tuned { path: p } if *p == path.display().to_string()),
        "{:?}",
        out.config_source
    );
    req.pass = tune::Pass::Fwd;
    // Reference and zero sizes are refused in the library's terms.
    req.backend = BackendKind::Reference;
    assert!(tune::tune(&spec, &req, &mut |_| {}, &mut |_| {}).is_err());
    req.backend = BackendKind::Cpu;
    req.seq = 0;
    let e = tune::tune(&spec, &req, &mut |_| {}, &mut |_| {}).unwrap_err();
    assert!(!e.to_string().contains("--"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
