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
    ];
    let env = LowerEnv {
        i: "pos_i",
        j: "pos_j",
        h: "head",
        s: "s",
        heads: HEADS,
        kv_heads: HEADS,
        inputs: &inputs,
        seq_dim: "seq_len",
        batch_dim: "1",
    };
    let exprs = expressions();
    let mut prog = String::from(
        "#include <cmath>\n#include <cstdio>\n#include <cstdlib>\n\
         static int min(int a, int b) { return a < b ? a : b; }\n\
         static int max(int a, int b) { return a > b ? a : b; }\n\
         template <class T> static T __ldg(const T* p) { return *p; }\n",
    );
    prog.push_str(include_str!("../../templates/scalar.cuh"));
    prog.push_str(&format!(
        "\nstatic float rel[{}];\nstatic int ids[{SEQ}];\nstatic const int seq_len = {SEQ};\n\
         // The kernel parameters the lowered reads name (`mixc_codegen::input_param`).\n\
         static const float* {} = rel;\nstatic const int* {} = ids;\n",
        HEADS as usize * REL_W,
        mixc_codegen::input_param("rel"),
        mixc_codegen::input_param("ids"),
    ));
    for (k, e) in exprs.iter().enumerate() {
        let mut hoisted = Vec::new();
        let c = lower_expr(e, &env, &mut hoisted).unwrap();
        prog.push_str(&format!(
            "static double f{k}(int pos_i, int pos_j, int head, float s) {{\n"
        ));
        for hv in &hoisted {
            prog.push_str(&format!(
                "  const {} {} = {};\n",
                hv.c_type, hv.name, hv.code
            ));
        }
        prog.push_str(&format!(
            "  (void)pos_i; (void)pos_j; (void)head; (void)s;\n  return (double)({});\n}}\n",
            c.code
        ));
    }
    prog.push_str(&format!(
        "int main() {{\n  for (int k = 0; k < {}; ++k) if (scanf(\"%f\", &rel[k]) != 1) return 1;\n  \
         for (int k = 0; k < {SEQ}; ++k) if (scanf(\"%d\", &ids[k]) != 1) return 1;\n  \
         int e, i, j, h; float s;\n  while (scanf(\"%d %d %d %d %f\", &e, &i, &j, &h, &s) == 5) {{\n    double r = 0;\n    switch (e) {{\n",
        HEADS as usize * REL_W
    ));
    for k in 0..exprs.len() {
        prog.push_str(&format!("      case {k}: r = f{k}(i, j, h, s); break;\n"));
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
            points.push((k, i, j, h, s));
            input.push_str(&format!("{k} {i} {j} {h} {s:e}\n"));
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
            _ => unreachable!(),
        }
    };
    for (&(k, i, j, h, s), &dev) in points.iter().zip(&got) {
        let env = EvalEnv {
            i,
            j,
            h,
            s: s as f64,
            heads: HEADS,
            lookup: &lookup,
        };
        let want = exprs[k].eval_f64(&env);
        let tol = 2e-5 * want.abs().max(1.0);
        assert!(
            (dev - want).abs() <= tol,
            "expression {k} ({:?}) at i={i} j={j} h={h} s={s}: C gives {dev}, IR gives {want}",
            exprs[k]
        );
    }
}
