//! The expression language beyond arithmetic: conditions, `if` / `select`,
//! `sin`, `cos`, `sigmoid`, `int`, `div`, the variables `b`, `seq`,
//! `kv_seq`, expression masks and constant expressions for mask sizes.
//! Semantics are checked by evaluation; every spec prints back as text that
//! parses to the same IR.

use mixc_dsl::ir::{EvalEnv, Mask};
use mixc_dsl::{parse_str, MixerSpec};
use proptest::prelude::*;

fn spec(items: &str) -> MixerSpec {
    let src = format!(
        "mixer m {{ heads = 4; head_dim = 8; input t: f32[batch, seq]; input u: f32[heads]; \
         bias = 0.0 * t[b][j] + 0.0 * u[h]; {items} }}"
    );
    parse_str(&src).unwrap_or_else(|e| panic!("{items}: {e}"))
}

/// The spec's mask and transform printed back (`spec` adds the bias).
fn reprint(s: &MixerSpec) -> String {
    let mut out = format!("mask = {};", s.mask);
    if let Some(t) = &s.transform {
        out += &format!(" transform = {t};");
    }
    out
}

fn env_at<'a>(
    lookup: &'a dyn Fn(&str, &[i64]) -> f64,
    (b, h, i, j): (i64, i64, i64, i64),
    s: f64,
) -> EvalEnv<'a> {
    let mut e = EvalEnv::for_head(h, 4, lookup);
    (e.b, e.i, e.j, e.s, e.seq, e.kv_seq) = (b, i, j, s, 50, 60);
    e
}

#[test]
fn new_functions_evaluate_as_documented() {
    let cases: &[(&str, f64)] = &[
        ("div(-7, 2)", -4.0),
        ("div(7, -2)", -4.0),
        ("div(7, 2)", 3.0),
        ("div(7, 0)", 0.0),
        ("int(-2.7)", -2.0),
        ("int(2.7)", 2.0),
        ("sigmoid(0.0)", 0.5),
        ("sin(0.0) + cos(0.0)", 1.0),
        ("select(2 > 1, 3, 4)", 3.0),
        ("if 2 < 1 { 3 } else if 1 == 1 { 5 } else { 6 }", 5.0),
        ("select(!(1 != 1) && (0 >= 0 || 1 < 0), 1.5, 0.0)", 1.5),
        ("seq + kv_seq + b + h", 50.0 + 60.0 + 1.0 + 2.0),
        ("(i - j) % 4", -3.0),
    ];
    let lookup = |_: &str, _: &[i64]| 0.0;
    for (src, want) in cases {
        let s = spec(&format!("transform = s + {src};"));
        let got = s
            .transform
            .as_ref()
            .unwrap()
            .eval_f64(&env_at(&lookup, (1, 2, 3, 6), 0.0));
        assert_eq!(got, *want, "{src}");
    }
}

#[test]
fn masks_without_builtins_are_expressions_and_mixed_ones_combine() {
    let m = spec("mask = i - j < 64 && i - j >= -3;").mask;
    assert!(matches!(m, Mask::Expr(_)), "{m:?}");
    // `j <= i` among the conjuncts becomes the built-in `causal`.
    let m = spec("mask = i - j < 64 && j <= i && j % 2 == 0;").mask;
    assert_eq!(
        m.to_string(),
        "causal && (((i - j) < 64) && ((j % 2) == 0))"
    );
    assert!(m.implies_causal());
    assert_eq!(spec("mask = i >= j;").mask, Mask::Causal);
    let m = spec("mask = causal && (i - j) % 4 == 0;").mask;
    assert!(matches!(&m, Mask::And(a, b) if **a == Mask::Causal && matches!(**b, Mask::Expr(_))));
    assert!(spec("mask = j < i;").mask.implies_causal());
    assert!(!spec("mask = j <= i || j < 4;").mask.implies_causal());
    assert_eq!(
        spec("mask = causal && window(4 * 1024);").mask.to_string(),
        "causal && window(4096)"
    );
    // A strictly causal mask is enough for decay.
    parse_str("mixer r { heads = 2; head_dim = 8; decay = 0.9; mask = j < i; norm = none; }")
        .unwrap();
}

#[test]
fn masks_read_batch_head_lengths_and_tables() {
    let m = spec("mask = j <= i && (t[b][j] > 0.5 || i - j < 2 * (h + 1)) && j < seq - 1;").mask;
    let lookup = |name: &str, idx: &[i64]| {
        assert_eq!(name, "t");
        if idx[0] == 1 && idx[1] == 0 {
            1.0
        } else {
            0.0
        }
    };
    let allows = |b, h, i, j| m.allows(&env_at(&lookup, (b, h, i, j), 0.0), &|_, _| 0);
    assert!(allows(0, 0, 10, 9) && !allows(0, 0, 10, 8));
    assert!(allows(0, 3, 10, 3) && !allows(0, 3, 10, 2));
    assert!(allows(1, 0, 10, 0) && !allows(0, 0, 10, 0));
    assert!(!allows(0, 0, 49, 49), "j < seq - 1");
}

const PIECES: &[&str] = &[
    "i - j",
    "div(i, 4)",
    "int(0.5 * j)",
    "select(i > j, 1, 2)",
    "h",
    "b",
    "seq - j",
    "abs(i - j) % 3",
];

fn arb_cond() -> impl Strategy<Value = String> {
    let leaf = (
        prop::sample::select(PIECES),
        prop::sample::select(&["<", "<=", ">", ">=", "==", "!="][..]),
        prop::sample::select(PIECES),
    )
        .prop_map(|(a, op, b)| format!("({a}) {op} ({b})"));
    leaf.prop_recursive(3, 8, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} && {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    })
}

/// A condition, or conditions combined with built-in masks.
fn arb_mask() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_cond(),
        (arb_cond(), arb_cond()).prop_map(|(a, b)| format!("causal && {a} || window(3) && {b}")),
        arb_cond().prop_map(|a| format!("(prefix_lm(4) || {a}) && dilated(2)")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random conditions as masks and inside `select`: the IR prints back
    /// as text that parses to the same IR.
    #[test]
    fn conditions_print_back_to_the_same_ir(c in arb_mask(), d in arb_cond()) {
        let s = spec(&format!("mask = {c}; transform = s * select({d}, sin(s), sigmoid(s));"));
        let again = spec(&reprint(&s));
        prop_assert_eq!(again, s);
    }
}
