//! Bias / transform expressions prepared for the inner loop: specialised to
//! one head (every subtree that does not read `i`, `j` or `s` is folded to a
//! constant, so `alibi_slope(h)` costs nothing per pair) and evaluated without
//! allocating (the IR's `Expr::eval` builds a Vec per call, fine for the
//! reference, too slow per score here). Semantics follow `ir::Expr::eval`.

use mixc_dsl::ir::{BinOp, EvalEnv, Expr, Func, UnOp, Value, Var};

use crate::tensor::{ExtraTensor, MixerInputs};

/// Most index/argument lists are short; longer ones fall back to a Vec.
const INLINE: usize = 8;

#[derive(Debug, Clone)]
pub enum FastExpr<'a> {
    Const(Value),
    I,
    J,
    S,
    Neg(Box<FastExpr<'a>>),
    Bin(BinOp, Box<FastExpr<'a>>, Box<FastExpr<'a>>),
    /// The function, its arguments, and the head count (for `alibi_slope`).
    Call(Func, Vec<FastExpr<'a>>, u32),
    Index(&'a ExtraTensor, Vec<FastExpr<'a>>),
}

impl<'a> FastExpr<'a> {
    /// Specialises `e` to head `h`. Every input it names must be present
    /// (inputs are validated before a run starts).
    pub fn new(e: &Expr, h: usize, heads: u32, inputs: &'a MixerInputs) -> FastExpr<'a> {
        let reads_pair = e.uses_var(Var::I) || e.uses_var(Var::J) || e.uses_var(Var::S);
        if !reads_pair {
            let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
            let env = EvalEnv {
                i: 0,
                j: 0,
                h: h as i64,
                s: 0.0,
                heads,
                lookup: &lookup,
            };
            return FastExpr::Const(e.eval(&env));
        }
        let sub = |x: &Expr| Box::new(FastExpr::new(x, h, heads, inputs));
        match e {
            Expr::Int(_) | Expr::Float(_) | Expr::Var(Var::H) => unreachable!("folded above"),
            Expr::Var(Var::I) => FastExpr::I,
            Expr::Var(Var::J) => FastExpr::J,
            Expr::Var(Var::S) => FastExpr::S,
            Expr::Unary(UnOp::Neg, a) => FastExpr::Neg(sub(a)),
            Expr::Binary(op, a, b) => FastExpr::Bin(*op, sub(a), sub(b)),
            Expr::Call(f, args) => FastExpr::Call(
                *f,
                args.iter()
                    .map(|a| FastExpr::new(a, h, heads, inputs))
                    .collect(),
                heads,
            ),
            Expr::Index { input, indices } => FastExpr::Index(
                &inputs.extra[input.as_str()],
                indices
                    .iter()
                    .map(|a| FastExpr::new(a, h, heads, inputs))
                    .collect(),
            ),
        }
    }

    #[inline]
    pub fn eval_f64(&self, i: i64, j: i64, s: f64) -> f64 {
        self.eval(i, j, s).as_f64()
    }

    pub fn eval(&self, i: i64, j: i64, s: f64) -> Value {
        match self {
            FastExpr::Const(v) => *v,
            FastExpr::I => Value::Int(i),
            FastExpr::J => Value::Int(j),
            FastExpr::S => Value::Float(s),
            FastExpr::Neg(a) => match a.eval(i, j, s) {
                Value::Int(v) => Value::Int(v.wrapping_neg()),
                Value::Float(v) => Value::Float(-v),
            },
            FastExpr::Bin(op, a, b) => binary(*op, a.eval(i, j, s), b.eval(i, j, s)),
            FastExpr::Call(f, args, heads) => {
                if args.len() > INLINE {
                    let v: Vec<Value> = args.iter().map(|a| a.eval(i, j, s)).collect();
                    return call(*f, &v, *heads);
                }
                let mut v = [Value::Int(0); INLINE];
                for (slot, a) in v.iter_mut().zip(args) {
                    *slot = a.eval(i, j, s);
                }
                call(*f, &v[..args.len()], *heads)
            }
            FastExpr::Index(t, idx) => {
                if idx.len() > INLINE {
                    let v: Vec<i64> = idx.iter().map(|a| a.eval(i, j, s).as_i64()).collect();
                    return Value::Float(t.get_clamped(&v));
                }
                let mut v = [0i64; INLINE];
                for (slot, a) in v.iter_mut().zip(idx) {
                    *slot = a.eval(i, j, s).as_i64();
                }
                Value::Float(t.get_clamped(&v[..idx.len()]))
            }
        }
    }
}

fn binary(op: BinOp, a: Value, b: Value) -> Value {
    match (op, a, b) {
        (BinOp::Add, Value::Int(x), Value::Int(y)) => Value::Int(x.wrapping_add(y)),
        (BinOp::Sub, Value::Int(x), Value::Int(y)) => Value::Int(x.wrapping_sub(y)),
        (BinOp::Mul, Value::Int(x), Value::Int(y)) => Value::Int(x.wrapping_mul(y)),
        (BinOp::Rem, Value::Int(x), Value::Int(y)) => {
            Value::Int(if y == 0 { 0 } else { x.wrapping_rem(y) })
        }
        (BinOp::Add, x, y) => Value::Float(x.as_f64() + y.as_f64()),
        (BinOp::Sub, x, y) => Value::Float(x.as_f64() - y.as_f64()),
        (BinOp::Mul, x, y) => Value::Float(x.as_f64() * y.as_f64()),
        (BinOp::Div, x, y) => Value::Float(x.as_f64() / y.as_f64()),
        (BinOp::Rem, x, y) => Value::Float(x.as_f64() % y.as_f64()),
    }
}

fn call(f: Func, v: &[Value], heads: u32) -> Value {
    let x = |k: usize| v[k].as_f64();
    let all_int = v.iter().all(|a| matches!(a, Value::Int(_)));
    match f {
        Func::Exp => Value::Float(x(0).exp()),
        Func::Log => Value::Float(x(0).ln()),
        Func::Sqrt => Value::Float(x(0).sqrt()),
        Func::Tanh => Value::Float(x(0).tanh()),
        Func::Abs => match v[0] {
            Value::Int(a) => Value::Int(a.wrapping_abs()),
            Value::Float(a) => Value::Float(a.abs()),
        },
        Func::Floor => Value::Float(x(0).floor()),
        Func::Min if all_int => Value::Int(v[0].as_i64().min(v[1].as_i64())),
        Func::Max if all_int => Value::Int(v[0].as_i64().max(v[1].as_i64())),
        Func::Min => Value::Float(x(0).min(x(1))),
        Func::Max => Value::Float(x(0).max(x(1))),
        Func::Pow => Value::Float(x(0).powf(x(1))),
        Func::Clamp if all_int => {
            let (a, lo, hi) = (v[0].as_i64(), v[1].as_i64(), v[2].as_i64());
            Value::Int(a.max(lo).min(hi))
        }
        Func::Clamp => Value::Float(x(0).max(x(1)).min(x(2))),
        Func::AlibiSlope => Value::Float(mixc_dsl::ir::alibi_slope(v[0].as_i64(), heads)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;
    use std::collections::BTreeMap;

    fn var(v: Var) -> Box<Expr> {
        Box::new(Expr::Var(v))
    }

    /// The fast evaluator agrees with `Expr::eval` on the example biases and
    /// transforms over a grid of (i, j, h, s).
    #[test]
    fn agrees_with_the_ir_evaluator() {
        let rel = Tensor::new(
            vec![2, 4],
            vec![0.5f32, -1.0, 2.0, 0.25, 3.0, 1.5, -0.5, 7.0],
        );
        let mut extra = BTreeMap::new();
        extra.insert("rel".to_string(), ExtraTensor::F32(rel));
        let inputs = MixerInputs {
            batch: 1,
            seq: 4,
            q: Tensor::new(vec![0], vec![]),
            k: Tensor::new(vec![0], vec![]),
            v: Tensor::new(vec![0], vec![]),
            extra,
        };
        let i_minus_j = Expr::Binary(BinOp::Sub, var(Var::I), var(Var::J));
        let exprs = vec![
            // -alibi_slope(h) * (i - j)
            Expr::Binary(
                BinOp::Mul,
                Box::new(Expr::Unary(
                    UnOp::Neg,
                    Box::new(Expr::Call(Func::AlibiSlope, vec![Expr::Var(Var::H)])),
                )),
                Box::new(i_minus_j.clone()),
            ),
            // rel[h][min(abs(i - j), 3)]
            Expr::Index {
                input: "rel".into(),
                indices: vec![
                    Expr::Var(Var::H),
                    Expr::Call(
                        Func::Min,
                        vec![Expr::Call(Func::Abs, vec![i_minus_j.clone()]), Expr::Int(3)],
                    ),
                ],
            },
            // 50 * tanh(s / 50)
            Expr::Binary(
                BinOp::Mul,
                Box::new(Expr::Float(50.0)),
                Box::new(Expr::Call(
                    Func::Tanh,
                    vec![Expr::Binary(
                        BinOp::Div,
                        var(Var::S),
                        Box::new(Expr::Float(50.0)),
                    )],
                )),
            ),
            Expr::Binary(BinOp::Rem, Box::new(i_minus_j), Box::new(Expr::Int(3))),
        ];
        let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
        for e in &exprs {
            for h in 0..2 {
                let fast = FastExpr::new(e, h, 2, &inputs);
                for i in 0..6i64 {
                    for j in 0..6i64 {
                        let s = (i * 7 - j * 3) as f64 * 0.37;
                        let env = EvalEnv {
                            i,
                            j,
                            h: h as i64,
                            s,
                            heads: 2,
                            lookup: &lookup,
                        };
                        assert_eq!(fast.eval(i, j, s), e.eval(&env), "{e:?} at ({i},{j},{h})");
                    }
                }
            }
        }
    }
}
