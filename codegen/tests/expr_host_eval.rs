//! Lowered expressions mean what the IR means: each expression is lowered to
//! C with `expr::lower_expr`, compiled on the host together with
//! `templates/scalar.cuh`, evaluated at many points and compared with
//! `ir::Expr::eval` (f64). The GPU computes the same C in f32.

use mixc_codegen::expr::{lower_expr, LowerEnv};
use mixc_dsl::ir::*;
use std::io::Write;
use std::process::{Command, Stdio};

const HEADS: u32 = 12; // not a power of two: ALiBi interpolation
const SEQ: usize = 64;
const REL_W: usize = 32;
const BATCH: usize = 3;

fn b(op: BinOp, x: Expr, y: Expr) -> Expr {
    Expr::Binary(op, Box::new(x), Box::new(y))
}
fn call(f: Func, args: Vec<Expr>) -> Expr {
    Expr::Call(f, args)
}
fn neg(x: Expr) -> Expr {
    Expr::Unary(UnOp::Neg, Box::new(x))
}
fn v(x: Var) -> Expr {
    Expr::Var(x)
}
fn fl(x: f64) -> Expr {
    Expr::Float(x)
}
fn int(x: i64) -> Expr {
    Expr::Int(x)
}

fn expressions() -> Vec<Expr> {
    let (i, j, h, s) = (v(Var::I), v(Var::J), v(Var::H), v(Var::S));
    let d = || b(BinOp::Sub, v(Var::I), v(Var::J));
    let rel = |idx: Expr| Expr::Index {
        input: "rel".into(),
        indices: vec![v(Var::H), idx],
    };
    let ids = |idx: Expr| Expr::Index {
        input: "ids".into(),
        indices: vec![idx],
    };
    vec![
        // ALiBi
        b(
            BinOp::Mul,
            neg(call(Func::AlibiSlope, vec![h.clone()])),
            d(),
        ),
        // T5 relative bias
        rel(call(Func::Min, vec![call(Func::Abs, vec![d()]), int(31)])),
        // softcap
        b(
            BinOp::Mul,
            fl(50.0),
            call(Func::Tanh, vec![b(BinOp::Div, s.clone(), fl(50.0))]),
        ),
        // integer division is float division; % keeps the dividend's sign
        b(
            BinOp::Add,
            b(BinOp::Div, d(), int(7)),
            b(BinOp::Rem, d(), int(7)),
        ),
        b(
            BinOp::Add,
            b(
                BinOp::Mul,
                call(Func::Clamp, vec![d(), int(-5), int(5)]),
                fl(0.5),
            ),
            call(
                Func::Floor,
                vec![b(BinOp::Div, b(BinOp::Add, i.clone(), j.clone()), int(3))],
            ),
        ),
        b(
            BinOp::Add,
            b(
                BinOp::Mul,
                call(
                    Func::Exp,
                    vec![b(BinOp::Div, neg(call(Func::Abs, vec![d()])), fl(16.0))],
                ),
                call(Func::Pow, vec![fl(2.0), neg(h.clone())]),
            ),
            b(
                BinOp::Add,
                call(Func::Sqrt, vec![call(Func::Abs, vec![s.clone()])]),
                call(
                    Func::Log,
                    vec![b(BinOp::Add, fl(1.0), call(Func::Abs, vec![s.clone()]))],
                ),
            ),
        ),
        b(
            BinOp::Add,
            b(
                BinOp::Sub,
                call(Func::Max, vec![i.clone(), j.clone()]),
                call(Func::Min, vec![i.clone(), j.clone()]),
            ),
            b(
                BinOp::Sub,
                call(Func::Max, vec![s.clone(), fl(0.5)]),
                call(Func::Min, vec![s.clone(), fl(-0.5)]),
            ),
        ),
        // table reads clamp out-of-range indices (negative i - j, ids past the end)
        b(
            BinOp::Add,
            b(
                BinOp::Sub,
                ids(b(BinOp::Add, j.clone(), int(40))),
                ids(neg(i.clone())),
            ),
            rel(d()),
        ),
        // x % 0 is 0; float %; integer negation
        b(
            BinOp::Add,
            b(
                BinOp::Add,
                neg(b(BinOp::Rem, h.clone(), int(3))),
                b(BinOp::Rem, fl(7.5), fl(2.0)),
            ),
            b(BinOp::Rem, i.clone(), int(0)),
        ),
        // RetNet decay
        b(
            BinOp::Sub,
            fl(1.0),
            call(Func::Pow, vec![fl(2.0), b(BinOp::Sub, fl(-5.0), h.clone())]),
        ),
        // clamp of floats, abs of a float
        call(
            Func::Clamp,
            vec![
                b(BinOp::Mul, s.clone(), fl(0.1)),
                fl(-1.0),
                call(Func::Abs, vec![fl(-2.5)]),
            ],
        ),
    ]
}

/// The FlexAttention-style constructs: conditions (printed as 0 / 1),
/// `select`, `sin` / `cos` / `sigmoid`, `int`, `div`, and the variables `b`,
/// `seq`, `kv_seq`. Parsed from spec syntax, so the tree is the checker's.
fn flex_expressions() -> Vec<Expr> {
    // Declares the tables a text reads (an unused input is an error).
    let decls = |x: &str| {
        let mut d = String::new();
        if x.contains("rel[") {
            d.push_str(&format!("input rel: f32[heads, {REL_W}]; "));
        }
        if x.contains("pre[") {
            d.push_str("input pre: f32[batch]; ");
        }
        d
    };
    let mask = |m: &str| -> Expr {
        let src = format!(
            "mixer t {{ heads = {HEADS}; head_dim = 8; {} score = dot(q, k); mask = {m}; \
             norm = softmax; }}",
            decls(m)
        );
        let spec = mixc_dsl::parse_str(&src).unwrap_or_else(|e| panic!("{m}: {e}"));
        // The whole mask as one condition (a `j <= i` conjunct is lifted
        // to the built-in `causal`, which `to_expr` writes back).
        assert!(spec.mask.has_expr(), "{m}: not an expression mask");
        spec.mask.to_expr().unwrap()
    };
    let transform = |t: &str| -> Expr {
        let src = format!(
            "mixer t {{ heads = {HEADS}; head_dim = 8; {} score = dot(q, k); transform = {t}; \
             mask = causal; norm = softmax; }}",
            decls(t)
        );
        mixc_dsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .transform
            .unwrap()
    };
    let mut v: Vec<Expr> = [
        "j < i",
        "j <= i && i - j < 8 * (h + 1)",
        "(i - j) % 4 == 0",
        "j <= i || j < int(pre[b])",
        "!(i > j) || (h != 2 && pre[b] >= 0.5)",
        "i - j >= 3 * b - seq + kv_seq",
        "select(h > 5, i < j, i >= j) && !(j == 3)",
        "div(i - j, 4) == -div(j - i, 4) && i != j",
    ]
    .iter()
    .map(|m| mask(m))
    .collect();
    v.extend(
        [
            "s + select(i > j, -0.5 * (i - j), 0.0)",
            "s + sin(i * 1.0) * cos(j * 1.0) + sigmoid(s)",
            "s * 2.0 + select(s > 0.0, 1, 2) + select(i < j, i, j)",
            "s + int(s * 4.0) + int(-s * 0.5) + int(pre[b] * 10.0)",
            "s + div(i - j, 4) + div(i, j - 32) + div(i - j, -3) + div(-7, 2)",
            "s + rel[h][div(i - j, 4) + 16]",
            "s - log(1.0 * kv_seq) + (b * 100 + seq - kv_seq)",
            "select(s > 1.0 || s < -1.0, s * s, 1.0 / (1.0 + s * s))",
        ]
        .iter()
        .map(|t| transform(t)),
    );
    v
}

#[test]
fn lowered_expressions_match_the_ir() {
    let inputs = vec![
        InputDecl {
            name: "rel".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Heads, Dim::Fixed(REL_W as u64)],
            role: InputRole::Table,
        },
        InputDecl {
            name: "ids".into(),
            elem: ElemType::I32,
            dims: vec![Dim::Seq],
            role: InputRole::Table,
        },
        InputDecl {
            name: "pre".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Batch],
            role: InputRole::Table,
        },
    ];
    let env = LowerEnv {
        i: "pos_i",
        j: "pos_j",
        h: "head",
        s: "s",
        b: "batch_idx",
        seq: "q_len",
        kv_seq: "k_len",
        heads: HEADS,
        kv_heads: HEADS,
        inputs: &inputs,
        seq_dim: "seq_len",
        batch_dim: "BATCH",
    };
    let mut exprs = expressions();
    let plain = exprs.len();
    exprs.extend(flex_expressions());
    let mut lowered_codes = Vec::new();
    let mut prog = String::from(
        "#include <cmath>\n#include <cstdio>\n#include <cstdlib>\n\
         static int min(int a, int b) { return a < b ? a : b; }\n\
         static int max(int a, int b) { return a > b ? a : b; }\n\
         template <class T> static T __ldg(const T* p) { return *p; }\n",
    );
    prog.push_str(include_str!("../../templates/scalar.cuh"));
    prog.push_str(&format!(
        "\nstatic float rel[{}];\nstatic int ids[{SEQ}];\nstatic float pre[{BATCH}];\n\
         static const int seq_len = {SEQ};\nstatic const int BATCH = {BATCH};\n\
         // The kernel parameters the lowered reads name (`mixc_codegen::input_param`).\n\
         static const float* {} = rel;\nstatic const int* {} = ids;\nstatic const float* {} = pre;\n",
        HEADS as usize * REL_W,
        mixc_codegen::input_param("rel"),
        mixc_codegen::input_param("ids"),
        mixc_codegen::input_param("pre"),
    ));
    for (k, e) in exprs.iter().enumerate() {
        let mut hoisted = Vec::new();
        let c = lower_expr(e, &env, &mut hoisted).unwrap();
        assert_eq!(c.ty, e.scalar_type(), "{e}: lowered type");
        lowered_codes.push(c.code.clone());
        prog.push_str(&format!(
            "static double f{k}(int pos_i, int pos_j, int head, float s, int batch_idx, \
             int q_len, int k_len) {{\n"
        ));
        for hv in &hoisted {
            prog.push_str(&format!(
                "  const {} {} = {};\n",
                hv.c_type, hv.name, hv.code
            ));
        }
        prog.push_str(&format!(
            "  (void)pos_i; (void)pos_j; (void)head; (void)s; (void)batch_idx; (void)q_len; \
             (void)k_len;\n  return (double)({});\n}}\n",
            c.code
        ));
    }
    prog.push_str(&format!(
        "int main() {{\n  for (int k = 0; k < {}; ++k) if (scanf(\"%f\", &rel[k]) != 1) return 1;\n  \
         for (int k = 0; k < {SEQ}; ++k) if (scanf(\"%d\", &ids[k]) != 1) return 1;\n  \
         for (int k = 0; k < {BATCH}; ++k) if (scanf(\"%f\", &pre[k]) != 1) return 1;\n  \
         int e, i, j, h, bi, sq, kv; float s;\n  \
         while (scanf(\"%d %d %d %d %f %d %d %d\", &e, &i, &j, &h, &s, &bi, &sq, &kv) == 8) {{\n    \
         double r = 0;\n    switch (e) {{\n",
        HEADS as usize * REL_W
    ));
    for k in 0..exprs.len() {
        prog.push_str(&format!(
            "      case {k}: r = f{k}(i, j, h, s, bi, sq, kv); break;\n"
        ));
    }
    prog.push_str("    }\n    printf(\"%.9g\\n\", r);\n  }\n}\n");

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("expr_host_eval");
    std::fs::create_dir_all(&dir).unwrap();
    let (src, exe) = (dir.join("eval.cpp"), dir.join("eval"));
    std::fs::write(&src, &prog).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = match Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "SKIPPED: no host C++ compiler `{cxx}` ({e}); set CXX to check expression lowering"
            );
            return;
        }
    };
    assert!(
        status.success(),
        "lowered expressions did not compile as host C++ ({})",
        src.display()
    );

    // Inputs: a table and sorted ids, printed exactly as f32 / i32.
    let rel: Vec<f32> = (0..HEADS as usize * REL_W)
        .map(|k| ((k as f32) * 0.37).sin())
        .collect();
    let ids: Vec<i32> = (0..SEQ as i32).map(|k| k / 5).collect();
    let mut input = String::new();
    for x in &rel {
        input.push_str(&format!("{x:e} "));
    }
    for x in &ids {
        input.push_str(&format!("{x} "));
    }
    // Per-sequence prefixes (f32, some fractional, one negative).
    let pre: Vec<f32> = vec![17.0, 40.5, -3.25];
    for x in &pre {
        input.push_str(&format!("{x:e} "));
    }
    input.push('\n');
    // Points: positions on both sides of the diagonal, every head, scores of both signs.
    let mut points = Vec::new();
    let mut seed = 12345u64;
    let mut next = |m: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % m
    };
    for k in 0..exprs.len() {
        for _ in 0..200 {
            let (i, j, h) = (
                next(SEQ as u64) as i64,
                next(SEQ as u64) as i64,
                next(HEADS as u64) as i64,
            );
            let s = (next(16001) as f32 - 8000.0) / 100.0;
            let bi = next(BATCH as u64) as i64;
            let sq = 1 + next(100) as i64;
            let kv = sq + next(3) as i64 * next(50) as i64;
            points.push((k, i, j, h, s, bi, sq, kv));
            input.push_str(&format!("{k} {i} {j} {h} {s:e} {bi} {sq} {kv}\n"));
        }
    }
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let got: Vec<f64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(got.len(), points.len());

    let lookup = |name: &str, idx: &[i64]| -> f64 {
        let clamp = |x: i64, n: usize| x.clamp(0, n as i64 - 1) as usize;
        match name {
            "rel" => rel[clamp(idx[0], HEADS as usize) * REL_W + clamp(idx[1], REL_W)] as f64,
            "ids" => ids[clamp(idx[0], SEQ)] as f64,
            "pre" => pre[clamp(idx[0], BATCH)] as f64,
            _ => unreachable!(),
        }
    };
    let mut flex_true = vec![0usize; exprs.len()];
    for (&(k, i, j, h, s, bi, sq, kv), &dev) in points.iter().zip(&got) {
        let env = EvalEnv {
            i,
            j,
            h,
            s: s as f64,
            b: bi,
            seq: sq,
            kv_seq: kv,
            heads: HEADS,
            lookup: &lookup,
        };
        let want = exprs[k].eval_f64(&env);
        let tol = 2e-5 * want.abs().max(1.0);
        assert!(
            (dev - want).abs() <= tol,
            "expression {k} ({}, C `{}`) at i={i} j={j} h={h} s={s} b={bi} seq={sq} \
             kv_seq={kv}: C gives {dev}, IR gives {want}",
            exprs[k],
            lowered_codes[k]
        );
        flex_true[k] += usize::from(want != 0.0);
    }
    // Every condition is true at some points and false at others.
    for k in plain..exprs.len() {
        if exprs[k].scalar_type() == ScalarType::Bool {
            assert!(
                flex_true[k] > 0 && flex_true[k] < 200,
                "condition {} is {} of 200 times true: a weak test",
                exprs[k],
                flex_true[k]
            );
        }
    }
}

/// The lowering spells each new construct with the intended C: floor
/// division and float-to-int through the helpers of `scalar.cuh`, `sinf`,
/// `cosf`, conditions as `bool`.
#[test]
fn flex_constructs_lower_to_the_intended_c() {
    let inputs = [InputDecl {
        name: "pre".into(),
        elem: ElemType::F32,
        dims: vec![Dim::Batch],
        role: InputRole::Table,
    }];
    let env = LowerEnv {
        i: "pos_i",
        j: "pos_j",
        h: "head",
        s: "s",
        b: "batch_idx",
        seq: "seq_len",
        kv_seq: "seq_len",
        heads: HEADS,
        kv_heads: HEADS,
        inputs: &inputs,
        seq_dim: "seq_len",
        batch_dim: "gridDim.z",
    };
    let e = flex_expressions();
    let low = |k: usize| {
        let mut h = Vec::new();
        let c = lower_expr(&e[k], &env, &mut h).unwrap();
        (c, h)
    };
    let (c, h) = low(3);
    assert_eq!(c.ty, ScalarType::Bool);
    assert_eq!(c.code, "((pos_j <= pos_i) || (pos_j < hoist0))");
    assert_eq!(h.len(), 1);
    assert_eq!(
        (h[0].c_type, h[0].code.as_str()),
        (
            "int",
            "mixc::f2i(__ldg(in_pre + mixc::clampi(batch_idx, gridDim.z)))"
        )
    );
    let (c, _) = low(7);
    assert!(
        c.code.contains("mixc::floordiv((pos_i - pos_j), 4)"),
        "{}",
        c.code
    );
    let (c, _) = low(9);
    assert!(
        c.code.contains("mixc::sin_f(((float)(pos_i) * 1.0f))"),
        "{}",
        c.code
    );
    assert!(
        c.code.contains("mixc::cos_f(") && c.code.contains("(1.0f / (1.0f + expf(-s)))"),
        "{}",
        c.code
    );
    let (c, h) = low(14);
    assert!(
        h.iter()
            .any(|h| h.code == "logf((1.0f * (float)(seq_len)))"),
        "{h:?}"
    );
    assert!(c.code.contains("(batch_idx * 100)"), "{}", c.code);
    let (c, _) = low(8);
    assert_eq!(
        c.code,
        "(s + ((pos_i > pos_j) ? ((-0.5f) * (float)((pos_i - pos_j))) : 0.0f))"
    );
}
