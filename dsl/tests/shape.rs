//! `MixerSpec::with_shape`: one spec file at other head counts and widths
//! (the CLI's `--set`), with the spec's ties kept and what depends on the
//! shape checked again.

use mixc_dsl::{parse_str, Score, Shape, ShapeError};

fn scale(spec: &mixc_dsl::MixerSpec) -> f64 {
    match spec.score {
        Score::Dot { scale, .. } => scale,
        _ => panic!("a dot score"),
    }
}

fn shape(items: &[(&str, u64)]) -> Shape {
    let mut s = Shape::default();
    for (k, v) in items {
        s.set(k, *v).unwrap();
    }
    s
}

#[test]
fn ties_are_kept_unless_both_sides_are_set() {
    let spec = parse_str("mixer m { heads = 4; head_dim = 16; mask = causal; }").unwrap();
    let s = spec
        .with_shape(shape(&[("heads", 8), ("head_dim", 64)]))
        .unwrap();
    assert_eq!(
        (s.heads, s.kv_heads, s.head_dim, s.value_dim),
        (8, 8, 64, 64)
    );
    let s = spec
        .with_shape(shape(&[("heads", 8), ("kv_heads", 2), ("value_dim", 32)]))
        .unwrap();
    assert_eq!(
        (s.heads, s.kv_heads, s.head_dim, s.value_dim),
        (8, 2, 16, 32)
    );
    // A GQA spec keeps its kv heads when only the query heads change.
    let gqa = parse_str("mixer g { heads = 8; kv_heads = 2; head_dim = 16; }").unwrap();
    assert_eq!(gqa.with_shape(shape(&[("heads", 16)])).unwrap().kv_heads, 2);
}

#[test]
fn a_default_scale_follows_head_dim_and_an_explicit_one_stays() {
    let spec = parse_str("mixer m { heads = 4; head_dim = 16; }").unwrap();
    assert!(spec.default_scale);
    assert_eq!(scale(&spec), 0.25);
    let s = spec.with_shape(shape(&[("head_dim", 64)])).unwrap();
    assert_eq!(scale(&s), 0.125);
    let given = parse_str("mixer m { heads = 4; head_dim = 16; scale = 0.25; }").unwrap();
    assert!(!given.default_scale);
    assert_eq!(
        scale(&given.with_shape(shape(&[("head_dim", 64)])).unwrap()),
        0.25
    );
    // Without softmax the default scale is 1 at every width.
    let lin = parse_str("mixer l { heads = 4; head_dim = 16; score = dot(elu1(q), elu1(k)); mask = causal; norm = sum; }").unwrap();
    assert_eq!(
        scale(&lin.with_shape(shape(&[("head_dim", 64)])).unwrap()),
        1.0
    );
    // (`mixer!{}` specs carry the same flag: dsl/macro/tests/same_as_file.rs
    // compares them with the files' whole.)
}

#[test]
fn what_depends_on_the_shape_is_checked_again() {
    let spec = parse_str("mixer m { heads = 4; kv_heads = 2; head_dim = 16; }").unwrap();
    assert_eq!(
        spec.with_shape(shape(&[("heads", 6), ("kv_heads", 4)])),
        Err(ShapeError::KvHeads {
            heads: 6,
            kv_heads: 4
        })
    );
    // A per-head decay valid for 4 heads leaves (0, 1] at head 9.
    let ret = parse_str(
        "mixer r { heads = 4; head_dim = 16; decay = 0.95 - 0.1 * h; mask = causal; norm = none; }",
    )
    .unwrap();
    ret.with_shape(shape(&[("heads", 8)])).unwrap();
    let e = ret.with_shape(shape(&[("heads", 16)])).unwrap_err();
    assert!(
        matches!(
            e,
            ShapeError::Decay {
                heads: 16,
                head: 10,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("must lie in (0, 1]"), "{e}");
}

#[test]
fn keys_and_values_are_checked_when_set() {
    let mut s = Shape::default();
    assert!(matches!(s.set("depth", 3), Err(ShapeError::UnknownKey(k)) if k == "depth"));
    let e = s.set("heads", 0).unwrap_err().to_string();
    assert!(e.contains("between 1 and 65536"), "{e}");
    let e = s.set("head_dim", 4096).unwrap_err().to_string();
    assert!(e.contains("between 1 and 512"), "{e}");
    for key in Shape::KEYS {
        s.set(key, 8).unwrap();
    }
    assert_eq!(s.heads, Some(8));
}
