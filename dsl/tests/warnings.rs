//! Warnings: valid specs whose table reads likely do not read what was
//! meant. Each is snapshotted; the examples have none; a spec with errors
//! reports errors, not warnings.

use mixc_dsl::{parse_str, warnings_str, Severity};

fn warned(src: &str) -> String {
    parse_str(src).unwrap_or_else(|e| panic!("warnings are for valid specs: {e}"));
    let w = warnings_str(src);
    assert!(!w.is_empty(), "no warning for\n{src}");
    assert!(w.iter().all(|d| d.severity == Severity::Warning));
    w.render("warn.mix", src)
}

#[test]
fn a_batch_dim_read_without_b() {
    insta::assert_snapshot!(warned(
        "mixer w {\n    heads = 4;\n    head_dim = 8;\n    input bias_b: f32[batch, heads];\n    bias = bias_b[0][h];\n}\n"
    ));
}

#[test]
fn a_batch_dim_read_without_b_in_a_mask() {
    insta::assert_snapshot!(warned(
        "mixer w {\n    heads = 4;\n    head_dim = 8;\n    input prefix: f32[batch];\n    mask = j <= i || j < int(prefix[h]);\n}\n"
    ));
}

#[test]
fn a_kv_heads_dim_read_by_the_query_head() {
    insta::assert_snapshot!(warned(
        "mixer w {\n    heads = 8;\n    kv_heads = 2;\n    head_dim = 8;\n    input slope: f32[kv_heads];\n    bias = -slope[h] * (i - j);\n}\n"
    ));
}

#[test]
fn reads_that_mean_what_they_say_warn_nothing() {
    for src in [
        "mixer ok { heads = 4; head_dim = 8; input t: f32[batch, heads]; bias = t[b][h]; }",
        "mixer ok { heads = 8; kv_heads = 2; head_dim = 8; input sl: f32[kv_heads]; bias = sl[div(h, 4)]; }",
        "mixer ok { heads = 4; head_dim = 8; input sl: f32[kv_heads]; bias = sl[h]; }",
    ] {
        parse_str(src).unwrap();
        assert!(warnings_str(src).is_empty(), "{src}");
    }
    // Errors are reported by the parser, not as warnings.
    assert!(warnings_str("mixer bad { heads = 4; input t: f32[batch]; bias = t[0]; }").is_empty());
}

#[test]
fn the_examples_have_no_warnings() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "mix") {
            let w = mixc_dsl::warnings_file(&p).unwrap();
            assert!(w.is_none(), "{}: {}", p.display(), w.unwrap());
            n += 1;
        }
    }
    assert!(n >= 10);
}

/// A combination of built-in masks that is just one of its sides
/// (issue 18): the side within the other is named, for `&&` and `||`.
#[test]
fn a_mask_combination_that_is_just_one_side() {
    insta::assert_snapshot!(warned(
        "mixer w {\n    heads = 4;\n    head_dim = 8;\n    mask = causal && prefix_lm(64);\n}\n"
    ));
    insta::assert_snapshot!(warned(
        "mixer w {\n    heads = 4;\n    head_dim = 8;\n    mask = causal && (window(64) || window(256));\n}\n"
    ));
    insta::assert_snapshot!(warned(
        "mixer w {\n    heads = 4;\n    head_dim = 8;\n    mask = causal && window(512) && j <= i;\n}\n"
    ));
}

#[test]
fn masks_that_combine_two_real_constraints_warn_nothing() {
    for mask in [
        "causal && window(4096)",
        "causal && dilated(4)",
        "prefix_lm(64) || window(8)",
        "causal && segment(doc)",
        "window(64) && dilated(2)",
        "causal && block_sparse(block = 64, local = 1, global = 1)",
    ] {
        let doc = if mask.contains("doc") {
            "input doc: i32[batch, seq];"
        } else {
            ""
        };
        let src = format!("mixer ok {{ heads = 4; head_dim = 8; {doc} mask = {mask}; }}");
        parse_str(&src).unwrap();
        assert!(
            warnings_str(&src).is_empty(),
            "{src}: {}",
            warnings_str(&src)
        );
    }
}

/// `Mask::within` agrees with evaluating both masks on every pair of a
/// small grid, wherever it claims containment.
#[test]
fn within_is_sound_on_a_grid() {
    use mixc_dsl::ir::Mask;
    let masks = [
        Mask::All,
        Mask::Causal,
        Mask::Window { size: 1 },
        Mask::Window { size: 3 },
        Mask::Window { size: 5 },
        Mask::PrefixLm { prefix: 2 },
        Mask::PrefixLm { prefix: 4 },
        Mask::Dilated { rate: 1 },
        Mask::Dilated { rate: 2 },
        Mask::Dilated { rate: 4 },
        Mask::And(Box::new(Mask::Causal), Box::new(Mask::Window { size: 3 })),
        Mask::Or(Box::new(Mask::Causal), Box::new(Mask::Window { size: 3 })),
    ];
    let lookup = |_: &str, _: &[i64]| 0.0;
    let allowed = |m: &Mask, i: i64, j: i64| {
        let env = mixc_dsl::ir::EvalEnv {
            i,
            j,
            h: 0,
            s: 0.0,
            b: 0,
            seq: 12,
            kv_seq: 12,
            heads: 1,
            lookup: &lookup,
        };
        m.allows(&env, &|_, _| 0)
    };
    let mut claims = 0;
    for a in &masks {
        for b in &masks {
            if a.within(b) {
                claims += 1;
                for i in 0..12 {
                    for j in 0..12 {
                        assert!(
                            !allowed(a, i, j) || allowed(b, i, j),
                            "{a} within {b} fails at ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
    assert!(claims > masks.len(), "only the trivial claims: {claims}");
}
