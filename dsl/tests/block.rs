//! Block files (`block NAME { ... }` around a mixer): the examples, the
//! file-level rules, every block diagnostic snapshotted (line, column,
//! caret, hint), and a no-panic property over random input.

use mixc_dsl::{
    parse_any_file, parse_any_str, parse_block_file, parse_block_str, parse_str, BlockSpec,
    Diagnostics, FfnKind, NormKind, Score, SpecError, SpecFile, DEFAULT_NORM_EPS,
};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn block_example(name: &str) -> BlockSpec {
    let path = examples_dir().join("blocks").join(format!("{name}.mix"));
    parse_block_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const ATTN: &str =
    "mixer attn {\n    heads = 8;\n    kv_heads = 2;\n    head_dim = 64;\n    mask = causal;\n}\n";

/// The `attn` mixer, then `block b { body }` (body lines indented).
fn block(body: &str) -> String {
    format!("{ATTN}\n{}", block_only(body))
}

/// `block b { body }` alone.
fn block_only(body: &str) -> String {
    let mut s = String::from("block b {\n");
    for line in body.lines() {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str("}\n");
    s
}

const KEYS_OK: &str = "width = 512;\nnorm = rmsnorm;\nffn = swiglu(1792);";

// ---------------------------------------------------------------- valid

#[test]
fn llama_block_example() {
    let b = block_example("llama_block");
    assert_eq!(b.name, "llama_block");
    assert_eq!(b.width, 512);
    assert_eq!(b.norm.kind, NormKind::RmsNorm);
    assert_eq!(b.norm.eps, 1e-5);
    assert_eq!(b.ffn.kind, FfnKind::SwiGlu);
    assert_eq!(b.ffn.hidden, 1792);
    assert_eq!(b.rope.map(|r| r.base), Some(500000.0));
    assert_eq!(b.mixer.name, "attn");
    assert_eq!(
        (b.mixer.heads, b.mixer.kv_heads, b.mixer.head_dim),
        (8, 2, 64)
    );
    let w = b.weight_shapes();
    assert_eq!(w["self_attn.q_proj.weight"], vec![512, 512]);
    assert_eq!(w["self_attn.k_proj.weight"], vec![128, 512]);
    assert_eq!(w["self_attn.o_proj.weight"], vec![512, 512]);
    assert_eq!(w["mlp.gate_proj.weight"], vec![1792, 512]);
    assert_eq!(w["mlp.down_proj.weight"], vec![512, 1792]);
    assert!(!w.contains_key("input_layernorm.bias"));
    assert_eq!(w.len(), 9);
}

#[test]
fn gpt_bpt_example() {
    let b = block_example("gpt_bpt");
    assert_eq!(b.name, "gpt_bpt");
    assert_eq!(b.width, 1024);
    assert_eq!(b.norm.kind, NormKind::LayerNorm);
    assert_eq!(b.norm.eps, 1e-5);
    assert_eq!(b.ffn.kind, FfnKind::Gelu);
    assert_eq!(b.ffn.hidden, 4096);
    assert_eq!(b.rope, None);
    assert_eq!(b.mixer.name, "attn");
    assert_eq!(
        (b.mixer.heads, b.mixer.kv_heads, b.mixer.head_dim),
        (16, 16, 64)
    );
    let w = b.weight_shapes();
    assert_eq!(w["input_layernorm.bias"], vec![1024]);
    assert_eq!(w["post_attention_layernorm.bias"], vec![1024]);
    assert!(!w.contains_key("mlp.gate_proj.weight"));
    assert_eq!(w["mlp.up_proj.weight"], vec![4096, 1024]);
}

#[test]
fn the_only_mixer_needs_no_mixer_key() {
    let b = parse_block_str(&block(KEYS_OK)).unwrap();
    assert_eq!(b.mixer.name, "attn");
    assert_eq!(b.norm.eps, DEFAULT_NORM_EPS);
    assert_eq!(b.rope, None);
}

#[test]
fn block_may_come_before_its_mixers() {
    let src = format!(
        "/// A block first.\n#[doc = \"x\"]\n{}\nmixer other {{ heads = 4; head_dim = 32; }}\n{ATTN}",
        block_only(&format!("mixer = attn;\n{KEYS_OK}"))
    );
    let b = parse_block_str(&src).unwrap();
    assert_eq!(b.mixer.name, "attn");
    assert_eq!(b.mixer.kv_heads, 2);
}

/// `ATTN` written inside a block body (indented by `block_only`).
const ATTN_INLINE: &str =
    "mixer attn {\n    heads = 8;\n    kv_heads = 2;\n    head_dim = 64;\n    mask = causal;\n}";

#[test]
fn inline_mixer_is_the_same_block_as_by_name() {
    let keys = format!("{KEYS_OK}\nrope = 10000;");
    let by_name = parse_block_str(&block(&format!("mixer = attn;\n{keys}"))).unwrap();
    let omitted = parse_block_str(&block(&keys)).unwrap();
    // Inline, first or between keys, with no top-level mixer.
    let first = parse_block_str(&block_only(&format!("{ATTN_INLINE}\n{keys}"))).unwrap();
    let between = parse_block_str(&block_only(&format!(
        "width = 512;\n{ATTN_INLINE}\nnorm = rmsnorm;\nffn = swiglu(1792);\nrope = 10000;"
    )))
    .unwrap();
    assert_eq!(first, by_name);
    assert_eq!(between, by_name);
    assert_eq!(omitted, by_name);
    // A top-level mixer beside it is unused, as today.
    let beside = format!(
        "mixer other {{ heads = 4; head_dim = 32; }}\n{}",
        block_only(&format!("{keys}\n{ATTN_INLINE}"))
    );
    assert_eq!(parse_block_str(&beside).unwrap(), by_name);
    // Even one of the same name.
    let same_name = block(&format!(
        "{keys}\n{}",
        ATTN_INLINE.replace("heads = 8", "heads = 16")
    ));
    assert_eq!(parse_block_str(&same_name).unwrap().mixer.heads, 16);
    assert!(matches!(parse_any_str(&beside), Ok(SpecFile::Block(b)) if b == by_name));
}

#[test]
fn inline_mixer_with_a_stray_semicolon() {
    let by_name = parse_block_str(&block(&format!("mixer = attn;\n{KEYS_OK}"))).unwrap();
    let src = block_only(&format!("{ATTN_INLINE};\n{KEYS_OK}"));
    assert_eq!(parse_block_str(&src).unwrap(), by_name);
    let src = block_only(&format!("{KEYS_OK}\n{ATTN_INLINE};"));
    assert_eq!(parse_block_str(&src).unwrap(), by_name);
    // Doc comments before it are accepted, as before a top-level mixer.
    let src = block_only(&format!("{KEYS_OK}\n/// The mixer.\n{ATTN_INLINE}"));
    assert_eq!(parse_block_str(&src).unwrap(), by_name);
}

#[test]
fn inline_mixer_example() {
    let b = block_example("inline_mixer");
    assert_eq!(b.name, "inline_mixer");
    assert_eq!(b.mixer.name, "attn");
    assert_eq!(
        (b.mixer.heads, b.mixer.kv_heads, b.mixer.head_dim),
        (8, 2, 64)
    );
    assert_eq!(b.rope.map(|r| r.base), Some(10000.0));
    let src = std::fs::read_to_string(examples_dir().join("blocks/inline_mixer.mix")).unwrap();
    assert!(matches!(parse_any_str(&src), Ok(SpecFile::Block(ref a)) if *a == b));
    // Read as a mixer file, it is refused at `block`.
    assert!(parse_str(&src).is_err());
}

#[test]
fn eps_forms_and_rope_literals() {
    let b = parse_block_str(&block(
        "width = 64;\nnorm = layernorm(eps = 1e-6);\nffn = gelu(256);\nrope = 10000.5;",
    ))
    .unwrap();
    assert_eq!(b.norm.eps, 1e-6);
    assert_eq!(b.norm.kind, NormKind::LayerNorm);
    assert_eq!(b.rope.unwrap().base, 10000.5);
    let b = parse_block_str(&block(
        "width = 64;\nnorm = rmsnorm((1e-6));\nffn = swiglu(1);\nrope = 10000;",
    ))
    .unwrap();
    assert_eq!(b.norm.eps, 1e-6);
    assert_eq!(b.ffn.hidden, 1);
    assert_eq!(b.rope.unwrap().base, 10000.0);
    let b = parse_block_str(&block(&format!("{KEYS_OK}\nrope = 5e5;"))).unwrap();
    assert_eq!(b.rope.unwrap().base, 500000.0);
}

#[test]
fn parse_any_picks_the_kind() {
    let path = examples_dir().join("blocks/llama_block.mix");
    match parse_any_file(&path).unwrap() {
        SpecFile::Block(b) => assert_eq!(b, block_example("llama_block")),
        other => panic!("{other:?}"),
    }
    let path = examples_dir().join("causal_gqa_llama3.mix");
    match parse_any_file(&path).unwrap() {
        SpecFile::Mixer(m) => {
            assert_eq!(m, mixc_dsl::parse_file(&path).unwrap());
            assert_eq!(m.name, "causal_gqa_llama3");
        }
        other => panic!("{other:?}"),
    }
    let src = std::fs::read_to_string(examples_dir().join("blocks/gpt_bpt.mix")).unwrap();
    let any = parse_any_str(&src).unwrap();
    assert_eq!(any.name(), "gpt_bpt");
    assert_eq!(any.mixer().heads, 16);
    // A mixer that happens to be named `block` is still a mixer file.
    let src = "mixer block { heads = 8; head_dim = 64; }";
    assert!(parse_str(src).is_ok());
    assert!(matches!(parse_any_str(src), Ok(SpecFile::Mixer(_))));
    // Errors come from the parser of the kind the file is.
    let d = parse_any_str(&block("width = 0;\nnorm = rmsnorm;\nffn = gelu(4);")).unwrap_err();
    assert!(d.to_string().contains("`width` must be"), "{d}");
    let d = parse_any_str("mixer m { heads = 0; head_dim = 64; }").unwrap_err();
    assert!(d.to_string().contains("`heads` must be"), "{d}");
}

#[test]
fn convolution_mixers_may_exist_when_not_wrapped() {
    let src = format!(
        "{}\nmixer conv {{ heads = 8; head_dim = 64; input f: f32[heads, seq]; score = filter(f); mask = causal; norm = none; }}\n",
        block(&format!("mixer = attn;\n{KEYS_OK}"))
    );
    assert_eq!(parse_block_str(&src).unwrap().mixer.name, "attn");
}

#[test]
fn block_file_errors_render_under_the_path() {
    let dir = std::env::temp_dir().join(format!("mixc-dsl-block-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.mix");
    std::fs::write(&path, block("width = 0;\nnorm = rmsnorm;\nffn = relu(4);")).unwrap();
    let e = parse_block_file(&path).unwrap_err();
    let any = parse_any_file(&path).unwrap_err();
    let as_mixer = mixc_dsl::parse_file(&path).unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    match &e {
        SpecError::Invalid { rendered, count } => {
            assert_eq!(*count, 2, "{rendered}");
            assert!(
                rendered.contains("bad.mix:9:13: error: `width` must be"),
                "{rendered}"
            );
            assert!(
                rendered.contains("bad.mix:11:11: error: unknown ffn `relu`"),
                "{rendered}"
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(e.to_string(), any.to_string());
    match &as_mixer {
        SpecError::Invalid { rendered, count } => {
            assert_eq!(*count, 1);
            assert!(
                rendered.contains("bad.mix:8:1: error: this file defines a transformer block"),
                "{rendered}"
            );
        }
        other => panic!("{other}"),
    }
    let missing = Path::new("/nonexistent/dir/b.mix");
    assert!(matches!(
        parse_block_file(missing),
        Err(SpecError::Io { .. })
    ));
    assert!(matches!(parse_any_file(missing), Err(SpecError::Io { .. })));
}

#[test]
fn independent_block_errors_are_reported_together() {
    let src = block("width = 1.5;\nnorm = batchnorm;\nffn = relu(4);\nrope = -1;\nmixer = atn;");
    let d = diagnose_block(&src);
    let lines: Vec<usize> = d.iter().map(|d| d.start().line).collect();
    assert_eq!(lines, vec![9, 10, 11, 12, 13], "{d}");
}

// ---------------------------------------------------------------- invalid

/// Checks what every failure must satisfy: at least one diagnostic, each
/// positioned inside the source.
fn check_positions(diags: &Diagnostics, src: &str) {
    assert!(!diags.is_empty());
    let lines: Vec<&str> = src.split('\n').collect();
    for d in diags.iter() {
        let p = d.start();
        assert!(p.line >= 1 && p.line <= lines.len(), "{p:?} in\n{src}");
        assert!(
            p.column >= 1 && p.column <= lines[p.line - 1].chars().count() + 1,
            "{p:?} in\n{src}"
        );
        assert!(!d.message.is_empty());
    }
}

fn diagnose_block(src: &str) -> Diagnostics {
    let diags = match parse_block_str(src) {
        Ok(spec) => panic!("expected an error, got {spec:#?}\nfor:\n{src}"),
        Err(d) => d,
    };
    check_positions(&diags, src);
    // parse_any refuses it too, unless it is a (valid) mixer file.
    if let Ok(f) = parse_any_str(src) {
        assert!(matches!(f, SpecFile::Mixer(_)), "{src}");
    }
    diags
}

fn diagnose_mixer(src: &str) -> Diagnostics {
    let diags = match parse_str(src) {
        Ok(spec) => panic!("expected an error, got {spec:#?}\nfor:\n{src}"),
        Err(d) => d,
    };
    check_positions(&diags, src);
    diags
}

macro_rules! invalid {
    ($($name:ident: $parse:ident($src:expr);)*) => {$(
        #[test]
        fn $name() {
            let src: String = $src.into();
            let diags = $parse(&src);
            insta::assert_snapshot!(stringify!($name), diags.render("bad.mix", &src));
        }
    )*};
}

const CONV: &str = "mixer conv {\n    heads = 8;\n    head_dim = 64;\n    input f: f32[heads, seq];\n    score = filter(f);\n    mask = causal;\n    norm = none;\n}\n";

invalid! {
    // ---- file structure ----
    block_file_read_as_mixer: diagnose_mixer(block(KEYS_OK));
    block_first_read_as_mixer: diagnose_mixer(format!("{}{ATTN}", block_only(KEYS_OK)));
    no_block_item: diagnose_block(ATTN);
    empty_block_file: diagnose_block("// nothing here\n");
    second_block: diagnose_block(format!("{}\nblock c {{\n    width = 64;\n}}\n", block(KEYS_OK)));
    duplicate_mixer_names: diagnose_block(format!("{ATTN}{ATTN}\n{}", block_only(&format!("mixer = attn;\n{KEYS_OK}"))));
    misspelled_block_keyword: diagnose_block(format!("{ATTN}\nblok b {{\n    width = 512;\n}}\n"));
    block_missing_name: diagnose_block(format!("{ATTN}\nblock {{\n    width = 512;\n}}\n"));
    block_missing_body: diagnose_block(format!("{ATTN}\nblock b\n"));
    semicolon_after_block: diagnose_block(format!("{};\n", block(KEYS_OK)).replace("}\n;", "};"));
    mixer_error_inside_block_file: diagnose_block(format!("mixer attn {{\n    heads = 8;\n    head_dim = 64;\n    mask = causl;\n}}\n\n{}", block_only(&format!("{KEYS_OK}\nrope = 10000;"))));

    // ---- keys ----
    unknown_block_key_typo: diagnose_block(block(&format!("{KEYS_OK}\nrpoe = 10000;")));
    unknown_block_key_no_suggestion: diagnose_block(block(&format!("{KEYS_OK}\ncolour = 3;")));
    mixer_key_in_block: diagnose_block(block(&format!("{KEYS_OK}\nheads = 8;")));
    duplicate_block_key: diagnose_block(block(&format!("{KEYS_OK}\nwidth = 1024;")));
    missing_required_keys: diagnose_block(block("rope = 10000;"));
    input_in_block: diagnose_block(block(&format!("{KEYS_OK}\ninput g: f32[batch, seq, heads];")));
    missing_semicolon_in_block: diagnose_block(block("width = 512\nnorm = rmsnorm;\nffn = swiglu(1792);"));

    // ---- mixer reference ----
    mixer_not_found_typo: diagnose_block(block(&format!("mixer = atn;\n{KEYS_OK}")));
    mixer_not_found: diagnose_block(block(&format!("mixer = ffn_layer;\n{KEYS_OK}")));
    mixer_not_a_name: diagnose_block(block(&format!("mixer = attn(1);\n{KEYS_OK}")));
    mixer_omitted_among_several: diagnose_block(format!("{ATTN}mixer other {{\n    heads = 4;\n    head_dim = 32;\n}}\n\n{}", block_only(KEYS_OK)));
    mixer_omitted_and_none_defined: diagnose_block(block_only(KEYS_OK));
    convolution_mixer: diagnose_block(format!("{CONV}\n{}", block_only(&format!("mixer = conv;\n{KEYS_OK}"))));
    rope_with_odd_head_dim: diagnose_block(format!("mixer attn {{\n    heads = 8;\n    head_dim = 63;\n}}\n\n{}", block_only(&format!("{KEYS_OK}\nrope = 10000;"))));

    // ---- inline mixer ----
    inline_mixer_and_mixer_key: diagnose_block(block_only(&format!("{ATTN_INLINE}\nmixer = attn;\n{KEYS_OK}")));
    two_inline_mixers: diagnose_block(block_only(&format!("{ATTN_INLINE}\n{}\n{KEYS_OK}", ATTN_INLINE.replace("attn", "other"))));
    inline_mixer_error_of_its_own: diagnose_block(block_only(&format!("{}\n{KEYS_OK}\nrope = 10000;", ATTN_INLINE.replace("causal", "causl"))));
    inline_mixer_missing_name: diagnose_block(block_only(&format!("{}\n{KEYS_OK}", ATTN_INLINE.replace("mixer attn", "mixer"))));
    inline_mixer_after_missing_semicolon: diagnose_block(block_only(&format!("width = 512\n{ATTN_INLINE}\nnorm = rmsnorm;\nffn = swiglu(1792);")));

    // ---- values ----
    width_zero: diagnose_block(block("width = 0;\nnorm = rmsnorm;\nffn = swiglu(1792);"));
    width_float: diagnose_block(block("width = 1.5;\nnorm = rmsnorm;\nffn = swiglu(1792);"));
    width_too_large: diagnose_block(block("width = 100000;\nnorm = rmsnorm;\nffn = swiglu(1792);"));
    norm_unknown: diagnose_block(block("width = 512;\nnorm = batchnorm;\nffn = swiglu(1792);"));
    norm_mixer_norm: diagnose_block(block("width = 512;\nnorm = softmax;\nffn = swiglu(1792);"));
    norm_eps_zero: diagnose_block(block("width = 512;\nnorm = rmsnorm(0);\nffn = swiglu(1792);"));
    norm_eps_too_large: diagnose_block(block("width = 512;\nnorm = layernorm(2);\nffn = swiglu(1792);"));
    norm_two_arguments: diagnose_block(block("width = 512;\nnorm = rmsnorm(1e-5, 1e-6);\nffn = swiglu(1792);"));
    ffn_missing_hidden: diagnose_block(block("width = 512;\nnorm = rmsnorm;\nffn = swiglu;"));
    ffn_unknown: diagnose_block(block("width = 512;\nnorm = rmsnorm;\nffn = relu(4);"));
    ffn_hidden_zero: diagnose_block(block("width = 512;\nnorm = rmsnorm;\nffn = gelu(0);"));
    ffn_hidden_too_large: diagnose_block(block("width = 512;\nnorm = rmsnorm;\nffn = gelu(2000000);"));
    rope_negative: diagnose_block(block(&format!("{KEYS_OK}\nrope = -1;")));
    rope_zero: diagnose_block(block(&format!("{KEYS_OK}\nrope = 0;")));
    rope_not_a_number: diagnose_block(block(&format!("{KEYS_OK}\nrope = yes;")));
}

// ---------------------------------------------------------------- fuzz

/// What must hold for any input, through every entry point.
fn check_any(src: &str) {
    match parse_any_str(src) {
        Ok(SpecFile::Block(b)) => {
            assert!(b.width >= 1 && b.ffn.hidden >= 1, "{src}");
            assert!(b.norm.eps > 0.0 && b.norm.eps < 1.0, "{src}");
            assert!(matches!(b.mixer.score, Score::Dot { .. }), "{src}");
            if b.rope.is_some() {
                assert!(b.mixer.head_dim % 2 == 0, "{src}");
            }
            assert!(b.parameter_count() > 0);
        }
        Ok(SpecFile::Mixer(m)) => assert!(m.heads % m.kv_heads == 0, "{src}"),
        Err(d) => {
            check_positions(&d, src);
            let first = d.iter().next().unwrap().start();
            assert!(d.render("fuzz.mix", src).starts_with(&format!(
                "fuzz.mix:{}:{}: error: ",
                first.line, first.column
            )));
        }
    }
    if let Err(d) = parse_block_str(src) {
        check_positions(&d, src);
    }
    if let Err(d) = parse_str(src) {
        check_positions(&d, src);
    }
    proc_macro2::extra::invalidate_current_thread_spans();
}

const VOCAB: &[&str] = &[
    "mixer",
    "block",
    "attn",
    "b",
    "input",
    "heads",
    "kv_heads",
    "head_dim",
    "mask",
    "causal",
    "norm",
    "softmax",
    "score",
    "filter",
    "f",
    "width",
    "ffn",
    "rope",
    "rmsnorm",
    "layernorm",
    "swiglu",
    "gelu",
    "eps",
    "0",
    "1",
    "2",
    "63",
    "64",
    "512",
    "1e-5",
    "1.5",
    "-1",
    "1e999",
    "99999999999999999999999",
    "=",
    ";",
    ":",
    ",",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "#",
    "!",
    "-",
    "///",
    "\n",
    "`",
    "λ",
    "8u32",
];

fn soup() -> impl Strategy<Value = String> {
    let words = prop::collection::vec(prop::sample::select(VOCAB), 0..50);
    (words, 0..3u8).prop_map(|(w, wrap)| {
        let body = w.join(" ");
        match wrap {
            0 => body,
            1 => format!("{ATTN} block b {{ {body} }}"),
            _ => format!("mixer attn {{ heads = 8; head_dim = 64; {body} }} block b {{ width = 64; norm = rmsnorm; ffn = gelu(8); }}"),
        }
    })
}

fn block_examples() -> Vec<String> {
    let mut v: Vec<String> = ["llama_block", "gpt_bpt", "inline_mixer"]
        .iter()
        .map(|n| std::fs::read_to_string(examples_dir().join(format!("blocks/{n}.mix"))).unwrap())
        .collect();
    v.push(block(&format!("rope = 10000;\n{KEYS_OK}")));
    v
}

/// Mutates `src`: `words` are maximal runs of non-space characters, so
/// separators (and line numbers) survive.
fn mutate(src: &str, edits: &[(u8, usize, usize)]) -> String {
    let mut s = src.to_string();
    for &(op, a, b) in edits {
        let mut words: Vec<String> = Vec::new();
        for c in s.chars() {
            match words.last_mut() {
                Some(w) if w.ends_with(char::is_whitespace) == c.is_whitespace() => w.push(c),
                _ => words.push(c.to_string()),
            }
        }
        if words.is_empty() {
            return s;
        }
        let n = words.len();
        match op % 5 {
            0 => {
                words.remove(a % n);
            }
            1 => {
                let w = words[a % n].clone();
                words.insert(b % n, w);
            }
            2 => words.swap(a % n, b % n),
            3 => words.insert(a % (n + 1), VOCAB[b % VOCAB.len()].to_string()),
            _ => {
                let chars: Vec<char> = s.chars().collect();
                let at = a % chars.len();
                let end = (at + 1 + b % 6).min(chars.len());
                s = chars[..at].iter().chain(&chars[end..]).collect();
                continue;
            }
        }
        s = words.concat();
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
    ))]

    #[test]
    fn block_token_soup_never_panics(src in soup()) {
        check_any(&src);
    }

    #[test]
    fn mutated_block_examples_never_panic(
        idx in 0..4usize,
        edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..4),
    ) {
        let src = mutate(&block_examples()[idx], &edits);
        check_any(&src);
    }
}

#[test]
fn unmutated_block_examples_pass_the_same_checks() {
    for src in block_examples() {
        assert!(matches!(parse_any_str(&src), Ok(SpecFile::Block(_))));
        check_any(&src);
    }
}
