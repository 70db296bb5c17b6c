//! Robustness: no input makes the parser panic, and every error it reports
//! renders with a line:column inside the source.

use mixc_dsl::{parse_str, Decay, MAX_ITEM_TOKENS, MAX_NESTING};
use proptest::prelude::*;
use std::path::Path;

/// Parses `src` and checks what must hold for any input.
fn check_any(src: &str) {
    match parse_str(src) {
        Ok(spec) => {
            assert!(spec.heads % spec.kv_heads == 0, "{src}");
            if spec.decay != Decay::None {
                assert!(spec.mask.implies_causal(), "{src}");
            }
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            let lines: Vec<&str> = src.split('\n').collect();
            for d in diags.iter() {
                let p = d.start();
                assert!(p.line >= 1 && p.line <= lines.len(), "{p:?} for {src:?}");
                let len = lines[p.line - 1].chars().count();
                assert!(p.column >= 1 && p.column <= len + 1, "{p:?} for {src:?}");
                assert!(!d.message.is_empty());
            }
            let rendered = diags.render("fuzz.mix", src);
            let first = diags.iter().next().unwrap().start();
            assert!(
                rendered.starts_with(&format!(
                    "fuzz.mix:{}:{}: error: ",
                    first.line, first.column
                )),
                "{rendered}"
            );
        }
    }
    // The fallback tokenizer keeps every parsed string in a per-thread source
    // map; positions were resolved already, so clear it between cases.
    proc_macro2::extra::invalidate_current_thread_spans();
}

const VOCAB: &[&str] = &[
    "mixer",
    "m",
    "input",
    "heads",
    "kv_heads",
    "head_dim",
    "value_dim",
    "dtype",
    "score",
    "scale",
    "bias",
    "transform",
    "mask",
    "decay",
    "norm",
    "f16",
    "bf16",
    "f32",
    "i32",
    "batch",
    "seq",
    "dot",
    "filter",
    "q",
    "k",
    "elu1",
    "relu",
    "causal",
    "all",
    "window",
    "prefix_lm",
    "segment",
    "block_sparse",
    "dilated",
    "block",
    "local",
    "global",
    "gate",
    "softmax",
    "sum",
    "none",
    "eps",
    "exp",
    "log",
    "sqrt",
    "tanh",
    "abs",
    "floor",
    "min",
    "max",
    "pow",
    "clamp",
    "alibi_slope",
    "sin",
    "cos",
    "sigmoid",
    "select",
    "int",
    "div",
    "if",
    "else",
    "b",
    "kv_seq",
    "flag",
    "<=",
    ">",
    ">=",
    "!=",
    "i",
    "j",
    "h",
    "s",
    "doc",
    "g",
    "f",
    "rel",
    "0",
    "1",
    "8",
    "64",
    "128",
    "0.125",
    "1e-6",
    "1.0",
    "-5.0",
    "99999999999999999999999",
    "9223372036854775807",
    "1e999",
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
    "&&",
    "||",
    "+",
    "-",
    "*",
    "/",
    "%",
    "!",
    "<",
    "==",
    "#",
    "@",
    "\"",
    "'",
    "/*",
    "*/",
    "//",
    "///",
    "\n",
    "`",
    "\\",
    "λ",
    "8u32",
];

fn soup() -> impl Strategy<Value = String> {
    let words = prop::collection::vec(prop::sample::select(VOCAB), 0..60);
    (words, any::<bool>()).prop_map(|(w, wrap)| {
        let body = w.join(" ");
        if wrap {
            format!("mixer m {{ heads = 8; head_dim = 64; {body} }}")
        } else {
            body
        }
    })
}

fn examples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mix"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    v.sort();
    v
}

#[derive(Debug, Clone)]
enum Edit {
    DeleteChars(usize, usize),
    DuplicateWord(usize),
    SwapWords(usize, usize),
    DeleteWord(usize),
    InsertWord(usize, &'static str),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..8usize).prop_map(|(a, n)| Edit::DeleteChars(a, n)),
        any::<usize>().prop_map(Edit::DuplicateWord),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapWords(a, b)),
        any::<usize>().prop_map(Edit::DeleteWord),
        (any::<usize>(), prop::sample::select(VOCAB)).prop_map(|(a, w)| Edit::InsertWord(a, w)),
    ]
}

/// Applies an edit; words are maximal runs of non-space characters, so
/// separators (including newlines) survive and line numbers stay meaningful.
fn apply(src: &str, e: &Edit) -> String {
    let chars: Vec<char> = src.chars().collect();
    if chars.is_empty() {
        return String::new();
    }
    let mut words: Vec<String> = Vec::new();
    let mut cur = String::new();
    for &c in &chars {
        let is_sep = c.is_whitespace();
        if !cur.is_empty() && cur.chars().last().unwrap().is_whitespace() != is_sep {
            words.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    words.push(cur);
    let n = words.len();
    match *e {
        Edit::DeleteChars(at, len) => {
            let at = at % chars.len();
            let end = (at + len).min(chars.len());
            chars[..at].iter().chain(&chars[end..]).collect()
        }
        Edit::DuplicateWord(a) => {
            let w = words[a % n].clone();
            words.insert(a % n, w);
            words.concat()
        }
        Edit::SwapWords(a, b) => {
            words.swap(a % n, b % n);
            words.concat()
        }
        Edit::DeleteWord(a) => {
            words.remove(a % n);
            words.concat()
        }
        Edit::InsertWord(a, w) => {
            words.insert(a % (n + 1), w.to_string());
            words.concat()
        }
    }
}

proptest! {
    // 400 cases per property by default (well under a second); set
    // PROPTEST_CASES for a longer soak.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
    ))]

    #[test]
    fn token_soup_never_panics(src in soup()) {
        check_any(&src);
    }

    #[test]
    fn mutated_examples_never_panic(idx in 0..14usize, edits in prop::collection::vec(edit(), 1..4)) {
        let ex = examples();
        let mut src = ex[idx % ex.len()].clone();
        for e in &edits {
            src = apply(&src, e);
        }
        check_any(&src);
    }

    #[test]
    fn arbitrary_text_never_panics(
        src in prop_oneof!["\\PC{0,80}", "(?s).{0,80}", "mixer m \\{ heads = 8;(?s).{0,60}\\}"]
    ) {
        check_any(&src);
    }
}

#[test]
fn unmutated_examples_pass_the_same_checks() {
    for src in examples() {
        assert!(parse_str(&src).is_ok());
        check_any(&src);
    }
}

/// Inputs shaped to exhaust the stack of a recursive parser are refused
/// with a diagnostic before any recursion.
#[test]
fn pathological_sizes_are_diagnosed() {
    let wrap = |body: String| format!("mixer m {{ heads = 8; head_dim = 64; {body} }}");
    let at_limit_unary = wrap(format!("bias = {}1.0;", "- ".repeat(MAX_ITEM_TOKENS - 4)));
    assert!(parse_str(&at_limit_unary).is_ok());
    let deep_ok = wrap(format!(
        "bias = {}i{};",
        "(".repeat(MAX_NESTING),
        ")".repeat(MAX_NESTING)
    ));
    assert!(parse_str(&deep_ok).is_ok());

    let cases = [
        wrap(format!(
            "bias = {}i{};",
            "(".repeat(100_000),
            ")".repeat(100_000)
        )),
        wrap(format!("bias = {}1.0;", "- ".repeat(100_000))),
        wrap(format!("bias = 1{};", " + 1".repeat(100_000))),
        wrap(format!("mask = causal{};", " && causal".repeat(100_000))),
        format!("{}mixer m {{}}{}", "[".repeat(50_000), "]".repeat(50_000)),
        "{".repeat(100_000),
    ];
    for src in &cases {
        let err = parse_str(src).unwrap_err();
        assert!(!err.is_empty());
        check_any(src);
    }
    let msg = parse_str(&cases[0])
        .unwrap_err()
        .iter()
        .next()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("nested too deeply"), "{msg}");
    let msg = parse_str(&cases[2])
        .unwrap_err()
        .iter()
        .next()
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("item too long"), "{msg}");
}
