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
