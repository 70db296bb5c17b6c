//! Derivatives of scalar expressions, for the backward pass.
//!
//! [`Expr::backprop`] is reverse mode over the expression tree: given the
//! adjoint `g = dL/de` of an expression's value, it reports `dL/dx` for each
//! differentiable leaf `x` it reads, which are the score `s` (inside a
//! `transform`) and float table elements (`name[idx]...`, reported at the
//! indices the expression computed, unclamped: the caller's tensor clamps
//! them the way the read did). Positions, heads, literals and integer
//! subexpressions have no gradient; `floor` and `alibi_slope` are piecewise
//! constant (derivative 0); `abs`, `min`, `max` and `clamp` take the
//! one-sided derivative of the branch their value came from (ties go to the
//! first argument), like PyTorch's autograd.

use crate::ir::{BinOp, EvalEnv, Expr, Func, Indices, ScalarType, UnOp, Var};

/// A differentiable leaf an expression read.
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf<'e> {
    /// The score `s` (the variable of a `transform`).
    Score,
    /// `input[indices]`, indices as computed (before clamping).
    Table { input: &'e str, indices: Indices },
}

impl Expr {
    /// Adds `g * d(self)/d(leaf)` for every differentiable leaf, through
    /// `sink(leaf, contribution)`. Called once per evaluation point; the sum
    /// over all calls is the chain rule. Subexpression values are recomputed
    /// (expressions are a handful of nodes).
    pub fn backprop<'e>(&'e self, env: &EvalEnv<'_>, g: f64, sink: &mut dyn FnMut(Leaf<'e>, f64)) {
        if g == 0.0 || self.scalar_type() != ScalarType::Float {
            return;
        }
        match self {
            Expr::Var(Var::S) => sink(Leaf::Score, g),
            Expr::Int(_) | Expr::Float(_) | Expr::Var(_) => {}
            Expr::Unary(UnOp::Neg, a) => a.backprop(env, -g, sink),
            // Boolean-valued: returned above.
            Expr::Unary(UnOp::Not, _) => {}
            Expr::Binary(op, a, b) => {
                let (x, y) = (a.eval(env).as_f64(), b.eval(env).as_f64());
                let (da, db) = match op {
                    BinOp::Add => (1.0, 1.0),
                    BinOp::Sub => (1.0, -1.0),
                    BinOp::Mul => (y, x),
                    BinOp::Div => (1.0 / y, -x / (y * y)),
                    // x % y = x - trunc(x / y) * y, the quotient piecewise constant.
                    BinOp::Rem => (1.0, -(x / y).trunc()),
                    // Boolean-valued: returned above.
                    _ => (0.0, 0.0),
                };
                a.backprop(env, g * da, sink);
                b.backprop(env, g * db, sink);
            }
            Expr::Call(f, args) => {
                let mut v = [0.0f64; 3];
                for (x, a) in v.iter_mut().zip(args) {
                    *x = a.eval(env).as_f64();
                }
                let mut d = [0.0f64; 3];
                match f {
                    Func::Exp => d[0] = v[0].exp(),
                    Func::Log => d[0] = 1.0 / v[0],
                    Func::Sqrt => d[0] = 0.5 / v[0].sqrt(),
                    Func::Tanh => d[0] = 1.0 - v[0].tanh().powi(2),
                    Func::Abs => d[0] = if v[0] < 0.0 { -1.0 } else { 1.0 },
                    Func::Floor | Func::AlibiSlope | Func::Int | Func::Div => {}
                    Func::Sin => d[0] = v[0].cos(),
                    Func::Cos => d[0] = -v[0].sin(),
                    Func::Sigmoid => {
                        let y = 1.0 / (1.0 + (-v[0]).exp());
                        d[0] = y * (1.0 - y);
                    }
                    // The branch the value came from; the condition is piecewise constant.
                    Func::Select => d[if v[0] != 0.0 { 1 } else { 2 }] = 1.0,
                    Func::Min => d[usize::from(v[1] < v[0])] = 1.0,
                    Func::Max => d[usize::from(v[1] > v[0])] = 1.0,
                    Func::Pow => {
                        d[0] = v[1] * v[0].powf(v[1] - 1.0);
                        if v[0] > 0.0 {
                            d[1] = v[0].powf(v[1]) * v[0].ln();
                        }
                    }
                    // max(x, lo).min(hi): the argument the value came from.
                    Func::Clamp => {
                        let k = if v[0].max(v[1]) > v[2] {
                            2
                        } else if v[1] > v[0] {
                            1
                        } else {
                            0
                        };
                        d[k] = 1.0;
                    }
                }
                for (a, dk) in args.iter().zip(d) {
                    a.backprop(env, g * dk, sink);
                }
            }
            Expr::Index { input, indices } => {
                let indices = Indices::eval(indices, env);
                sink(
                    Leaf::Table {
                        input: input.as_str(),
                        indices,
                    },
                    g,
                );
            }
        }
    }

    /// `d(self)/ds` as an expression of its own (so a backend can compile
    /// it like the transform itself), or `None` where the derivative is a
    /// branch choice the language cannot write (`abs`, `min`, `max` or
    /// `clamp` of something that reads `s`). Table reads have no `s`
    /// dependence (their indices are integers).
    pub fn derivative_s(&self) -> Option<Expr> {
        use Expr as E;
        let zero = || E::Float(0.0);
        if !self.uses_var(Var::S) {
            return Some(zero());
        }
        let bin = |op, a: Expr, b: Expr| E::Binary(op, Box::new(a), Box::new(b));
        let call = |f, args: Vec<Expr>| E::Call(f, args);
        Some(match self {
            E::Var(Var::S) => E::Float(1.0),
            E::Int(_) | E::Float(_) | E::Var(_) | E::Index { .. } => zero(),
            E::Unary(UnOp::Neg, a) => E::Unary(UnOp::Neg, Box::new(a.derivative_s()?)),
            E::Unary(UnOp::Not, _) => zero(),
            E::Binary(op, a, b) => {
                let (da, db) = (a.derivative_s()?, b.derivative_s()?);
                let (a, b) = ((**a).clone(), (**b).clone());
                match op {
                    BinOp::Add => bin(BinOp::Add, da, db),
                    BinOp::Sub => bin(BinOp::Sub, da, db),
                    BinOp::Mul => bin(
                        BinOp::Add,
                        bin(BinOp::Mul, da, b.clone()),
                        bin(BinOp::Mul, a, db),
                    ),
                    BinOp::Div => bin(
                        BinOp::Div,
                        bin(
                            BinOp::Sub,
                            bin(BinOp::Mul, da, b.clone()),
                            bin(BinOp::Mul, a, db),
                        ),
                        bin(BinOp::Mul, b.clone(), b),
                    ),
                    // Integer remainder: no float operand reads `s`; booleans
                    // are piecewise constant.
                    _ => zero(),
                }
            }
            E::Call(Func::Select, args) if args.len() == 3 => call(
                Func::Select,
                vec![
                    args[0].clone(),
                    args[1].derivative_s()?,
                    args[2].derivative_s()?,
                ],
            ),
            E::Call(f, args) => {
                let a = args.first()?.clone();
                let da = a.derivative_s()?;
                match f {
                    Func::Sin => bin(BinOp::Mul, call(Func::Cos, vec![a]), da),
                    Func::Cos => E::Unary(
                        UnOp::Neg,
                        Box::new(bin(BinOp::Mul, call(Func::Sin, vec![a]), da)),
                    ),
                    Func::Sigmoid => {
                        let y = call(Func::Sigmoid, vec![a]);
                        bin(
                            BinOp::Mul,
                            bin(BinOp::Mul, y.clone(), bin(BinOp::Sub, E::Float(1.0), y)),
                            da,
                        )
                    }
                    Func::Int | Func::Div | Func::Select => zero(),
                    Func::Exp => bin(BinOp::Mul, call(Func::Exp, vec![a]), da),
                    Func::Log => bin(BinOp::Div, da, a),
                    Func::Sqrt => bin(
                        BinOp::Div,
                        da,
                        bin(BinOp::Mul, E::Float(2.0), call(Func::Sqrt, vec![a])),
                    ),
                    Func::Tanh => {
                        let t = call(Func::Tanh, vec![a]);
                        bin(
                            BinOp::Mul,
                            bin(BinOp::Sub, E::Float(1.0), bin(BinOp::Mul, t.clone(), t)),
                            da,
                        )
                    }
                    Func::Floor | Func::AlibiSlope => zero(),
                    Func::Pow => {
                        let b = args.get(1)?.clone();
                        let db = b.derivative_s()?;
                        // d a^b = b a^(b-1) da + a^b ln(a) db (the second only where b reads s).
                        let first = bin(
                            BinOp::Mul,
                            bin(
                                BinOp::Mul,
                                b.clone(),
                                call(
                                    Func::Pow,
                                    vec![a.clone(), bin(BinOp::Sub, b.clone(), E::Float(1.0))],
                                ),
                            ),
                            da,
                        );
                        if b.uses_var(Var::S) {
                            bin(
                                BinOp::Add,
                                first,
                                bin(
                                    BinOp::Mul,
                                    bin(
                                        BinOp::Mul,
                                        call(Func::Pow, vec![a.clone(), b]),
                                        call(Func::Log, vec![a]),
                                    ),
                                    db,
                                ),
                            )
                        } else {
                            first
                        }
                    }
                    Func::Abs | Func::Min | Func::Max | Func::Clamp => return None,
                }
            }
        })
    }

    /// `d(self)/ds` at `env` (0 when the expression does not read `s`).
    pub fn d_ds(&self, env: &EvalEnv<'_>) -> f64 {
        let mut d = 0.0;
        self.backprop(env, 1.0, &mut |leaf, c| {
            if leaf == Leaf::Score {
                d += c;
            }
        });
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `src` as the transform of a spec with a `t: f32[heads, 4]` table.
    fn parse_test_expr(src: &str) -> Expr {
        let spec = crate::parse_str(&format!(
            "mixer m {{ heads = 8; head_dim = 8; input t: f32[heads, 4]; \
             bias = t[h][0]; transform = {src}; mask = causal; norm = softmax; }}"
        ))
        .unwrap_or_else(|d| panic!("{src}: {d:?}"));
        spec.transform.expect("a transform")
    }

    /// Every function and operator's derivative agrees with a central finite
    /// difference in `s` and in a table element.
    #[test]
    fn derivatives_match_finite_differences() {
        let srcs = [
            "50.0 * tanh(s / 50.0)",
            "exp(s) - log(s + 3.0) + sqrt(s + 2.0)",
            "pow(s + 2.0, 1.5) + pow(2.0, s)",
            "abs(s - 0.3) + min(s, 0.2) + max(s, t[h][1]) + clamp(s, -0.5, t[h][0])",
            "s * t[h][i - j] / (1.0 + t[h][0] * t[h][0])",
            "-(s - floor(s)) + alibi_slope(h) * s + (i % 3) * s",
        ];
        let table = [0.7f64, -0.4, 0.25, 1.3];
        for src in srcs {
            let e = parse_test_expr(src);
            for &s0 in &[-1.1f64, 0.37, 0.9] {
                for tweak in 0..=table.len() {
                    let at = |ds: f64, dt: f64| {
                        let mut t = table;
                        if tweak < t.len() {
                            t[tweak] += dt;
                        }
                        let lookup = |_: &str, idx: &[i64]| t[(idx[1].clamp(0, 3)) as usize];
                        let env = EvalEnv {
                            i: 3,
                            j: 1,
                            h: 0,
                            s: s0 + ds,
                            b: 0,
                            seq: 0,
                            kv_seq: 0,
                            heads: 8,
                            lookup: &lookup,
                        };
                        e.eval(&env).as_f64()
                    };
                    let lookup = |_: &str, idx: &[i64]| table[(idx[1].clamp(0, 3)) as usize];
                    let env = EvalEnv {
                        i: 3,
                        j: 1,
                        h: 0,
                        s: s0,
                        b: 0,
                        seq: 0,
                        kv_seq: 0,
                        heads: 8,
                        lookup: &lookup,
                    };
                    let mut analytic = 0.0;
                    e.backprop(&env, 1.0, &mut |leaf, c| match leaf {
                        Leaf::Score if tweak == table.len() => analytic += c,
                        Leaf::Table { indices, .. }
                            if tweak < table.len() && indices[1].clamp(0, 3) as usize == tweak =>
                        {
                            analytic += c
                        }
                        _ => {}
                    });
                    let h = 1e-6;
                    let numeric = if tweak == table.len() {
                        (at(h, 0.0) - at(-h, 0.0)) / (2.0 * h)
                    } else {
                        (at(0.0, h) - at(0.0, -h)) / (2.0 * h)
                    };
                    assert!(
                        (analytic - numeric).abs() <= 1e-5 * (1.0 + numeric.abs()),
                        "{src} at s = {s0}, leaf {tweak}: analytic {analytic}, numeric {numeric}"
                    );
                }
            }
        }
    }

    /// The symbolic derivative evaluates to what reverse mode computes.
    #[test]
    fn symbolic_derivatives_agree_with_backprop() {
        let srcs = [
            "50.0 * tanh(s / 50.0)",
            "exp(s) - log(s + 3.0) + sqrt(s + 2.0)",
            "pow(s + 2.0, 1.5) + pow(2.0, s) + pow(s + 2.0, s / 4.0)",
            "s * t[h][i - j] / (1.0 + s * s)",
            "-(s - floor(s)) + alibi_slope(h) * s + (i % 3) * s",
        ];
        let table = [0.7f64, -0.4, 0.25, 1.3];
        let lookup = |_: &str, idx: &[i64]| table[(idx[1].clamp(0, 3)) as usize];
        for src in srcs {
            let e = parse_test_expr(src);
            let d = e
                .derivative_s()
                .unwrap_or_else(|| panic!("{src}: no derivative"));
            for &s0 in &[-1.1f64, 0.37, 0.9] {
                let env = EvalEnv {
                    i: 3,
                    j: 1,
                    h: 0,
                    s: s0,
                    b: 0,
                    seq: 0,
                    kv_seq: 0,
                    heads: 8,
                    lookup: &lookup,
                };
                let (sym, rev) = (d.eval(&env).as_f64(), e.d_ds(&env));
                assert!(
                    (sym - rev).abs() <= 1e-12 * (1.0 + rev.abs()),
                    "{src} at {s0}: {sym} vs {rev}"
                );
            }
        }
        assert!(parse_test_expr("abs(s) + 1.0").derivative_s().is_none());
        // A branch on positions only is fine: d(min(|i - j|, 3) + s)/ds = 1.
        let d = parse_test_expr("min(abs(i - j), 3) + s")
            .derivative_s()
            .expect("derivative");
        let env = EvalEnv::for_head(0, 8, &lookup);
        assert_eq!(d.eval(&env).as_f64(), 1.0);
    }

    #[test]
    fn integer_expressions_have_no_gradient() {
        let e = parse_test_expr("min(abs(i - j), 127) + 0 * s");
        let lookup = |_: &str, _: &[i64]| 0.0;
        let env = EvalEnv::for_head(0, 8, &lookup);
        let mut n = 0;
        e.backprop(&env, 1.0, &mut |_, c| {
            if c != 0.0 {
                n += 1
            }
        });
        assert_eq!(n, 0);
        assert_eq!(parse_test_expr("3.0 * s").d_ds(&env), 3.0, "d(3s)/ds");
    }
}
