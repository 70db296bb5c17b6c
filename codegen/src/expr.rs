//! `ir::Expr` -> C expression. Float math is f32 (`expf`, `tanhf`, ...), integer
//! math is `int`, as the GPU computes them; the reference evaluates the same
//! tree in f64 / i64.
//!
//! Booleans (comparisons, `&&`, `||`, `!`, `select` of two conditions) are C
//! `bool` expressions; the IR holds them as the integers 0 and 1, which is
//! what C's `bool` converts to. Types follow [`Expr::scalar_type`] exactly.
//!
//! Subexpressions that read neither a position nor the score (e.g.
//! `alibi_slope(h)`, `rel[h][0]`, `log(1.0 * kv_seq)`) are hoisted:
//! [`lower_expr`] names them `hoistN` and returns their definitions, which a
//! template evaluates once per CTA instead of once per score. Every template
//! that prints hoisted values has the head, the batch index and the sequence
//! length in scope there, constant over the CTA (see [`LowerEnv`]).

use crate::CodegenError;
use mixc_dsl::ir::{BinOp, Dim, ElemType, Expr, Func, InputDecl, ScalarType, UnOp, Var};
use serde::Serialize;

/// C names of the variables an expression reads, and what the template has
/// in scope for the extra inputs.
///
/// `h`, `b`, `seq` and `kv_seq` must name values that are constant over a
/// CTA and defined where the template prints the hoisted definitions
/// (hoisting moves subexpressions of them there).
#[derive(Debug, Clone)]
pub struct LowerEnv<'a> {
    /// Query position (global), key position (global), query head, score.
    pub i: &'a str,
    pub j: &'a str,
    pub h: &'a str,
    pub s: &'a str,
    /// Batch index, query sequence length and key sequence length (the
    /// global lengths, across ranks).
    pub b: &'a str,
    pub seq: &'a str,
    pub kv_seq: &'a str,
    /// Number of query heads (for `alibi_slope`).
    pub heads: u32,
    pub kv_heads: u32,
    /// Declared extra inputs; a table `x` is read through the kernel pointer
    /// parameter named `x`.
    pub inputs: &'a [InputDecl],
    /// C expressions for symbolic dims of tables (`seq`, `batch`).
    pub seq_dim: &'a str,
    pub batch_dim: &'a str,
}

/// A lowered expression: C code and its scalar type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CExpr {
    pub code: String,
    pub ty: ScalarType,
}

/// A per-CTA constant pulled out of an expression: `const <c_type> <name> = <code>;`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hoisted {
    pub name: String,
    pub c_type: &'static str,
    pub code: String,
}

/// Lowers `e`; CTA-constant subexpressions with a call or a table read are
/// appended to `hoisted` (names continue from `hoisted.len()`).
pub fn lower_expr(
    e: &Expr,
    env: &LowerEnv<'_>,
    hoisted: &mut Vec<Hoisted>,
) -> Result<CExpr, CodegenError> {
    if is_hoistable(e) {
        let inner = lower_node(e, env, &mut None)?;
        let ty = inner.ty;
        let c_type = c_type(ty);
        // Reuse an identical hoisted value (e.g. the same slope in bias and transform).
        if let Some(h) = hoisted.iter().find(|h| h.code == inner.code) {
            return Ok(CExpr {
                code: h.name.clone(),
                ty,
            });
        }
        let name = format!("hoist{}", hoisted.len());
        hoisted.push(Hoisted {
            name: name.clone(),
            c_type,
            code: inner.code,
        });
        return Ok(CExpr { code: name, ty });
    }
    lower_node(e, env, &mut Some(hoisted))
}

/// Lowers without hoisting (for contexts evaluated once anyway).
pub fn lower_expr_flat(e: &Expr, env: &LowerEnv<'_>) -> Result<CExpr, CodegenError> {
    lower_node(e, env, &mut None)
}

/// The C type a value of `ty` is held in.
pub fn c_type(ty: ScalarType) -> &'static str {
    match ty {
        ScalarType::Int => "int",
        ScalarType::Float => "float",
        ScalarType::Bool => "bool",
    }
}

/// Constant over a CTA (reads only `h`, `b`, `seq`, `kv_seq` and tables at
/// such indices) and costs something worth hoisting.
fn is_hoistable(e: &Expr) -> bool {
    let cta_constant = !e.uses_var(Var::I) && !e.uses_var(Var::J) && !e.uses_var(Var::S);
    cta_constant && has_work(e)
}

fn has_work(e: &Expr) -> bool {
    match e {
        Expr::Call(..) | Expr::Index { .. } => true,
        Expr::Unary(_, a) => has_work(a),
        Expr::Binary(_, a, b) => has_work(a) || has_work(b),
        _ => false,
    }
}

fn err(e: &Expr, reason: impl Into<String>) -> CodegenError {
    CodegenError::Expr {
        expr: e.to_string(),
        reason: reason.into(),
    }
}

/// An f32 literal C accepts (`1.5f`, `1e-06f`), exact to f32 rounding.
pub fn float_literal(v: f64) -> String {
    let f = v as f32;
    if f.is_nan() {
        return "__int_as_float(0x7fffffff)".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "mixc::inf()".into()
        } else {
            "(-mixc::inf())".into()
        };
    }
    // Debug prints the shortest string that round-trips; add a point when it is integral.
    let mut s = format!("{f:?}");
    if !s.contains(['.', 'e', 'E']) {
        s.push_str(".0");
    }
    if s.starts_with('-') {
        format!("({s}f)")
    } else {
        format!("{s}f")
    }
}

fn as_float(c: &CExpr) -> String {
    match c.ty {
        ScalarType::Float => c.code.clone(),
        ScalarType::Int | ScalarType::Bool => format!("(float)({})", c.code),
    }
}

/// `c` as an `int`, the way the IR reads a value as an integer: floats
/// truncate toward zero and saturate (NaN is 0), booleans are 0 / 1.
fn as_int(c: &CExpr) -> String {
    match c.ty {
        ScalarType::Int => c.code.clone(),
        ScalarType::Bool => format!("(int)({})", c.code),
        ScalarType::Float => format!("mixc::f2i({})", c.code),
    }
}

/// `c` as a C condition (non-zero is true, as the IR's `!= 0`).
fn as_bool(c: &CExpr) -> String {
    match c.ty {
        ScalarType::Bool => c.code.clone(),
        _ => format!("({} != 0)", c.code),
    }
}

fn lower_node(
    e: &Expr,
    env: &LowerEnv<'_>,
    hoisted: &mut Option<&mut Vec<Hoisted>>,
) -> Result<CExpr, CodegenError> {
    use ScalarType::{Bool, Float, Int};
    let mut sub = |x: &Expr| -> Result<CExpr, CodegenError> {
        match hoisted {
            Some(h) => lower_expr(x, env, h),
            None => lower_node(x, env, &mut None),
        }
    };
    let out = match e {
        Expr::Int(v) => {
            let v32 = i32::try_from(*v)
                .map_err(|_| err(e, format!("integer {v} does not fit a 32-bit int")))?;
            CExpr {
                code: if v32 < 0 {
                    format!("({v32})")
                } else {
                    v32.to_string()
                },
                ty: Int,
            }
        }
        Expr::Float(v) => CExpr {
            code: float_literal(*v),
            ty: Float,
        },
        Expr::Var(v) => CExpr {
            code: match v {
                Var::I => env.i,
                Var::J => env.j,
                Var::H => env.h,
                Var::S => env.s,
                Var::B => env.b,
                Var::Seq => env.seq,
                Var::KvSeq => env.kv_seq,
            }
            .to_string(),
            ty: v.scalar_type(),
        },
        Expr::Unary(UnOp::Neg, a) => {
            let a = sub(a)?;
            if a.ty == Bool {
                return Err(err(
                    e,
                    "`-` of a condition (the checker only lets numbers through)",
                ));
            }
            CExpr {
                code: format!("(-{})", a.code),
                ty: a.ty,
            }
        }
        Expr::Unary(UnOp::Not, a) => {
            let a = sub(a)?;
            CExpr {
                code: format!("(!{})", a.code),
                ty: Bool,
            }
        }
        Expr::Binary(op @ (BinOp::And | BinOp::Or), a, b) => {
            let (a, b) = (sub(a)?, sub(b)?);
            CExpr {
                code: format!("({} {} {})", as_bool(&a), op.symbol(), as_bool(&b)),
                ty: Bool,
            }
        }
        Expr::Binary(op, a, b) if op.is_boolean() => {
            // A comparison of two numbers: exact in `int`, else in f32.
            let (a, b) = (sub(a)?, sub(b)?);
            let (x, y) = if a.ty == Int && b.ty == Int {
                (a.code, b.code)
            } else {
                (as_float(&a), as_float(&b))
            };
            CExpr {
                code: format!("({x} {} {y})", op.symbol()),
                ty: Bool,
            }
        }
        Expr::Binary(op, a, b) => {
            let (a, b) = (sub(a)?, sub(b)?);
            if a.ty == Bool || b.ty == Bool {
                return Err(err(
                    e,
                    format!(
                        "`{}` of a condition (the checker only lets numbers through)",
                        op.symbol()
                    ),
                ));
            }
            let both_int = a.ty == Int && b.ty == Int;
            match op {
                BinOp::Add | BinOp::Sub | BinOp::Mul => {
                    let sym = match op {
                        BinOp::Add => "+",
                        BinOp::Sub => "-",
                        _ => "*",
                    };
                    if both_int {
                        CExpr {
                            code: format!("({} {sym} {})", a.code, b.code),
                            ty: Int,
                        }
                    } else {
                        CExpr {
                            code: format!("({} {sym} {})", as_float(&a), as_float(&b)),
                            ty: Float,
                        }
                    }
                }
                BinOp::Div => CExpr {
                    code: format!("({} / {})", as_float(&a), as_float(&b)),
                    ty: Float,
                },
                BinOp::Rem if both_int => CExpr {
                    // The IR defines x % 0 as 0; C leaves it undefined.
                    code: format!("mixc::rem_or_zero({}, {})", a.code, b.code),
                    ty: Int,
                },
                BinOp::Rem => CExpr {
                    code: format!("fmodf({}, {})", as_float(&a), as_float(&b)),
                    ty: Float,
                },
                _ => unreachable!("boolean operators are lowered above"),
            }
        }
        Expr::Call(f, args) => {
            if args.len() != f.arity() {
                return Err(err(
                    e,
                    format!(
                        "{} takes {} arguments, got {}",
                        f.name(),
                        f.arity(),
                        args.len()
                    ),
                ));
            }
            let a: Vec<CExpr> = args.iter().map(&mut sub).collect::<Result<_, _>>()?;
            let all_int = a.iter().all(|x| x.ty == Int);
            // Only `select` takes conditions (its first argument, or both
            // branches); everything else reads numbers.
            let numeric = match f {
                Func::Select => &a[..0],
                _ => &a[..],
            };
            if numeric.iter().any(|x| x.ty == Bool) {
                return Err(err(
                    e,
                    format!(
                        "`{}` of a condition (the checker only lets numbers through)",
                        f.name()
                    ),
                ));
            }
            let f1 = |name: &str| CExpr {
                code: format!("{name}({})", as_float(&a[0])),
                ty: Float,
            };
            match f {
                Func::Exp => f1("expf"),
                Func::Log => f1("logf"),
                Func::Sqrt => f1("sqrtf"),
                Func::Tanh => f1("tanhf"),
                // `scalar.cuh`'s: no local-memory reduction path.
                Func::Sin => f1("mixc::sin_f"),
                Func::Cos => f1("mixc::cos_f"),
                Func::Sigmoid => CExpr {
                    code: format!("(1.0f / (1.0f + expf(-{})))", as_float(&a[0])),
                    ty: Float,
                },
                Func::Floor => f1("floorf"),
                Func::Abs if a[0].ty == Int => CExpr {
                    code: format!("abs({})", a[0].code),
                    ty: Int,
                },
                Func::Abs => f1("fabsf"),
                Func::Min | Func::Max if all_int => CExpr {
                    code: format!("{}({}, {})", f.name(), a[0].code, a[1].code),
                    ty: Int,
                },
                Func::Min | Func::Max => CExpr {
                    code: format!(
                        "{}({}, {})",
                        if *f == Func::Min { "fminf" } else { "fmaxf" },
                        as_float(&a[0]),
                        as_float(&a[1])
                    ),
                    ty: Float,
                },
                Func::Pow => CExpr {
                    code: format!("powf({}, {})", as_float(&a[0]), as_float(&a[1])),
                    ty: Float,
                },
                Func::Clamp if all_int => CExpr {
                    code: format!("min(max({}, {}), {})", a[0].code, a[1].code, a[2].code),
                    ty: Int,
                },
                Func::Clamp => CExpr {
                    code: format!(
                        "fminf(fmaxf({}, {}), {})",
                        as_float(&a[0]),
                        as_float(&a[1]),
                        as_float(&a[2])
                    ),
                    ty: Float,
                },
                Func::Select => {
                    let types: Vec<ScalarType> = a.iter().map(|x| x.ty).collect();
                    let ty = f.result_type(&types);
                    let branch = |x: &CExpr| match ty {
                        Float => as_float(x),
                        Int => as_int(x),
                        Bool => as_bool(x),
                    };
                    CExpr {
                        code: format!(
                            "({} ? {} : {})",
                            as_bool(&a[0]),
                            branch(&a[1]),
                            branch(&a[2])
                        ),
                        ty,
                    }
                }
                // Truncation toward zero (saturating, NaN -> 0); an integer
                // passes through.
                Func::Int => CExpr {
                    code: as_int(&a[0]),
                    ty: Int,
                },
                Func::Div => CExpr {
                    code: format!("mixc::floordiv({}, {})", as_int(&a[0]), as_int(&a[1])),
                    ty: Int,
                },
                Func::AlibiSlope => {
                    if a[0].ty != Int {
                        return Err(err(e, "alibi_slope takes an integer head index"));
                    }
                    CExpr {
                        code: format!("mixc::alibi_slope({}, {})", a[0].code, env.heads),
                        ty: Float,
                    }
                }
            }
        }
        Expr::Index { input, indices } => {
            let (decl, offset) = table_offset(e, input, indices, env, &mut sub)?;
            let ptr = crate::input_param(input);
            let read = match decl.elem {
                ElemType::F32 => format!("__ldg({ptr} + {offset})"),
                ElemType::I32 => format!("(float)__ldg({ptr} + {offset})"),
            };
            CExpr {
                code: read,
                ty: Float,
            }
        }
    };
    Ok(out)
}

/// The input a table read names and its row-major element offset, each
/// index clamped into its axis (the language's rule). `sub` lowers the index
/// expressions.
fn table_offset<'a>(
    e: &Expr,
    input: &str,
    indices: &[Expr],
    env: &LowerEnv<'a>,
    sub: &mut dyn FnMut(&Expr) -> Result<CExpr, CodegenError>,
) -> Result<(&'a InputDecl, String), CodegenError> {
    let decl = env
        .inputs
        .iter()
        .find(|d| d.name == input)
        .ok_or_else(|| err(e, format!("no input named `{input}`")))?;
    if decl.dims.len() != indices.len() {
        return Err(err(
            e,
            format!(
                "`{input}` has {} dims but is read with {} indices",
                decl.dims.len(),
                indices.len()
            ),
        ));
    }
    let mut offset = String::new();
    for (k, (idx, dim)) in indices.iter().zip(&decl.dims).enumerate() {
        let c = sub(idx)?;
        if c.ty != ScalarType::Int {
            return Err(err(e, format!("index {k} of `{input}` is not an integer")));
        }
        let n = dim_code(dim, env);
        let clamped = format!("mixc::clampi({}, {n})", c.code);
        offset = if k == 0 {
            clamped
        } else {
            format!("({offset}) * ({n}) + {clamped}")
        };
    }
    Ok((decl, offset))
}

/// One float table read of an expression, for the backward pass: the
/// element offset the read lands on, and the partial derivative of the whole
/// expression with respect to that read, both lowered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableGrad {
    pub input: String,
    /// The kernel parameter the gradient is added to.
    pub target: String,
    pub offset: String,
    pub partial: String,
}

/// The float table reads of `e` (an expression that does not read `s`, such
/// as a bias), each with its partial derivative: the read is replaced by `s`,
/// differentiated symbolically, and put back. `None` when a partial is a
/// branch choice the language cannot write (a read under `abs`, `min`, ...).
pub fn table_grads(
    e: &Expr,
    env: &LowerEnv<'_>,
    hoisted: &mut Vec<Hoisted>,
) -> Result<Option<Vec<TableGrad>>, CodegenError> {
    let mut reads = Vec::new();
    collect_float_reads(e, env, &mut reads);
    let mut out = Vec::new();
    for (n, (input, indices)) in reads.into_iter().enumerate() {
        let mut k = 0;
        let marked = replace_read(e, n, &mut k, env);
        let Some(d) = marked.derivative_s() else {
            return Ok(None);
        };
        if is_zero(&d) {
            // A read only under comparisons, `int`, `div` or a `select`
            // condition: piecewise constant, no gradient flows.
            continue;
        }
        let read = Expr::Index {
            input: input.clone(),
            indices: indices.clone(),
        };
        let partial = lower_expr(&d.substitute_s(&read), env, hoisted)?;
        let mut sub = |x: &Expr| lower_expr(x, env, hoisted);
        let (_, offset) = table_offset(e, &input, &indices, env, &mut sub)?;
        out.push(TableGrad {
            target: format!("grad_{}", crate::input_param(&input)),
            input,
            offset,
            partial: as_float(&partial),
        });
    }
    Ok(Some(out))
}

/// Is `e` identically zero by its form (a derivative of a piecewise
/// constant: `0.0`, `select(c, 0.0, 0.0)`, `0.0 * x`, ...)?
fn is_zero(e: &Expr) -> bool {
    match e {
        Expr::Int(0) => true,
        Expr::Float(x) => *x == 0.0,
        Expr::Unary(UnOp::Neg, a) => is_zero(a),
        Expr::Binary(BinOp::Add | BinOp::Sub, a, b) => is_zero(a) && is_zero(b),
        Expr::Binary(BinOp::Mul, a, b) => is_zero(a) || is_zero(b),
        Expr::Binary(BinOp::Div, a, _) => is_zero(a),
        Expr::Call(Func::Select, args) if args.len() == 3 => is_zero(&args[1]) && is_zero(&args[2]),
        _ => false,
    }
}

fn is_float_table(input: &str, env: &LowerEnv<'_>) -> bool {
    env.inputs
        .iter()
        .any(|d| d.name == input && d.elem == ElemType::F32)
}

fn collect_float_reads(e: &Expr, env: &LowerEnv<'_>, out: &mut Vec<(String, Vec<Expr>)>) {
    match e {
        Expr::Index { input, indices } if is_float_table(input, env) => {
            out.push((input.clone(), indices.clone()))
        }
        Expr::Unary(_, a) => collect_float_reads(a, env, out),
        Expr::Binary(_, a, b) => {
            collect_float_reads(a, env, out);
            collect_float_reads(b, env, out);
        }
        Expr::Call(_, args) => args.iter().for_each(|a| collect_float_reads(a, env, out)),
        _ => {}
    }
}

/// `e` with its `n`-th float table read (in [`collect_float_reads`] order) replaced by `s`.
fn replace_read(e: &Expr, n: usize, k: &mut usize, env: &LowerEnv<'_>) -> Expr {
    match e {
        Expr::Index { input, .. } if is_float_table(input, env) => {
            *k += 1;
            if *k - 1 == n {
                Expr::Var(Var::S)
            } else {
                e.clone()
            }
        }
        Expr::Unary(op, a) => Expr::Unary(*op, Box::new(replace_read(a, n, k, env))),
        Expr::Binary(op, a, b) => {
            let a = replace_read(a, n, k, env);
            Expr::Binary(*op, Box::new(a), Box::new(replace_read(b, n, k, env)))
        }
        Expr::Call(f, args) => Expr::Call(
            *f,
            args.iter().map(|a| replace_read(a, n, k, env)).collect(),
        ),
        _ => e.clone(),
    }
}

fn dim_code(d: &Dim, env: &LowerEnv<'_>) -> String {
    match d {
        Dim::Batch => env.batch_dim.to_string(),
        Dim::Seq => env.seq_dim.to_string(),
        Dim::Heads => env.heads.to_string(),
        Dim::KvHeads => env.kv_heads.to_string(),
        Dim::Fixed(n) => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixc_dsl::ir::InputRole;

    fn env(inputs: &[InputDecl]) -> LowerEnv<'_> {
        LowerEnv {
            i: "pos_i",
            j: "pos_j",
            h: "head",
            s: "s",
            b: "batch_idx",
            seq: "seq_len",
            kv_seq: "seq_len",
            heads: 16,
            kv_heads: 8,
            inputs,
            seq_dim: "seq_global",
            batch_dim: "batch",
        }
    }
    fn b(op: BinOp, a: Expr, c: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(c))
    }

    #[test]
    fn softcap_transform_lowers_to_f32_math() {
        // 50.0 * tanh(s / 50.0)
        let e = b(
            BinOp::Mul,
            Expr::Float(50.0),
            Expr::Call(
                Func::Tanh,
                vec![b(BinOp::Div, Expr::Var(Var::S), Expr::Float(50.0))],
            ),
        );
        let mut h = vec![];
        let c = lower_expr(&e, &env(&[]), &mut h).unwrap();
        assert_eq!(c.code, "(50.0f * tanhf((s / 50.0f)))");
        assert_eq!(c.ty, ScalarType::Float);
        assert!(h.is_empty());
    }

    #[test]
    fn alibi_slope_is_hoisted_and_positions_stay_int() {
        // -alibi_slope(h) * (i - j)
        let e = b(
            BinOp::Mul,
            Expr::Unary(
                UnOp::Neg,
                Box::new(Expr::Call(Func::AlibiSlope, vec![Expr::Var(Var::H)])),
            ),
            b(BinOp::Sub, Expr::Var(Var::I), Expr::Var(Var::J)),
        );
        let mut h = vec![];
        let c = lower_expr(&e, &env(&[]), &mut h).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].code, "(-mixc::alibi_slope(head, 16))");
        assert_eq!(c.code, "(hoist0 * (float)((pos_i - pos_j)))");
    }

    #[test]
    fn table_reads_clamp_every_index() {
        let decl = InputDecl {
            name: "rel".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Heads, Dim::Fixed(128)],
            role: InputRole::Table,
        };
        // rel[h][min(abs(i - j), 127)]
        let e = Expr::Index {
            input: "rel".into(),
            indices: vec![
                Expr::Var(Var::H),
                Expr::Call(
                    Func::Min,
                    vec![
                        Expr::Call(
                            Func::Abs,
                            vec![b(BinOp::Sub, Expr::Var(Var::I), Expr::Var(Var::J))],
                        ),
                        Expr::Int(127),
                    ],
                ),
            ],
        };
        let decls = [decl];
        let mut h = vec![];
        let c = lower_expr(&e, &env(&decls), &mut h).unwrap();
        assert_eq!(
            c.code,
            "__ldg(in_rel + (mixc::clampi(head, 16)) * (128) + mixc::clampi(min(abs((pos_i - pos_j)), 127), 128))"
        );
        assert!(h.is_empty(), "reads depending on i, j are not hoisted");
    }

    #[test]
    fn integer_division_is_float_and_rem_is_guarded() {
        let e = b(BinOp::Div, Expr::Var(Var::I), Expr::Int(2));
        assert_eq!(e.scalar_type(), ScalarType::Float);
        let c = lower_expr_flat(&e, &env(&[])).unwrap();
        assert_eq!(c.code, "((float)(pos_i) / (float)(2))");
        let r =
            lower_expr_flat(&b(BinOp::Rem, Expr::Var(Var::I), Expr::Int(3)), &env(&[])).unwrap();
        assert_eq!(
            (r.code.as_str(), r.ty),
            ("mixc::rem_or_zero(pos_i, 3)", ScalarType::Int)
        );
    }

    #[test]
    fn literals_are_valid_c() {
        assert_eq!(float_literal(1.0), "1.0f");
        assert_eq!(float_literal(1e-6), "1e-6f");
        assert_eq!(float_literal(-0.5), "(-0.5f)");
        assert_eq!(float_literal(f64::INFINITY), "mixc::inf()");
        let big = Expr::Int(1 << 40);
        let e = lower_expr_flat(&big, &env(&[])).unwrap_err().to_string();
        assert!(e.contains("does not fit a 32-bit int"), "{e}");
    }

    fn call(f: Func, args: Vec<Expr>) -> Expr {
        Expr::Call(f, args)
    }
    fn v(x: Var) -> Expr {
        Expr::Var(x)
    }

    #[test]
    fn conditions_lower_to_c_bool_expressions() {
        let d = b(BinOp::Sub, v(Var::I), v(Var::J));
        // j <= i && (i - j) % 4 == 0 || !(b >= seq)
        let e = b(
            BinOp::Or,
            b(
                BinOp::And,
                b(BinOp::Le, v(Var::J), v(Var::I)),
                b(
                    BinOp::Eq,
                    b(BinOp::Rem, d.clone(), Expr::Int(4)),
                    Expr::Int(0),
                ),
            ),
            Expr::Unary(UnOp::Not, Box::new(b(BinOp::Ge, v(Var::B), v(Var::Seq)))),
        );
        let c = lower_expr_flat(&e, &env(&[])).unwrap();
        assert_eq!(c.ty, ScalarType::Bool);
        assert_eq!(c.ty, e.scalar_type());
        assert_eq!(
            c.code,
            "(((pos_j <= pos_i) && (mixc::rem_or_zero((pos_i - pos_j), 4) == 0)) || \
             (!(batch_idx >= seq_len)))"
        );
        // A comparison with a float operand compares in f32.
        let f = b(BinOp::Lt, v(Var::KvSeq), Expr::Float(2.5));
        let c = lower_expr_flat(&f, &env(&[])).unwrap();
        assert_eq!(c.code, "((float)(seq_len) < 2.5f)");
        for (op, sym) in [
            (BinOp::Lt, "<"),
            (BinOp::Le, "<="),
            (BinOp::Gt, ">"),
            (BinOp::Ge, ">="),
            (BinOp::Eq, "=="),
            (BinOp::Ne, "!="),
        ] {
            let c = lower_expr_flat(&b(op, v(Var::I), v(Var::J)), &env(&[])).unwrap();
            assert_eq!(c.code, format!("(pos_i {sym} pos_j)"));
        }
    }

    #[test]
    fn select_int_div_and_trig_lower_with_the_ir_types() {
        let d = b(BinOp::Sub, v(Var::I), v(Var::J));
        let gt = b(BinOp::Gt, v(Var::I), v(Var::J));
        // Int branches stay int; a float branch makes both float.
        let si = call(Func::Select, vec![gt.clone(), v(Var::I), v(Var::J)]);
        let c = lower_expr_flat(&si, &env(&[])).unwrap();
        assert_eq!(
            (c.code.as_str(), c.ty),
            ("((pos_i > pos_j) ? pos_i : pos_j)", ScalarType::Int)
        );
        let sf = call(Func::Select, vec![gt.clone(), d.clone(), Expr::Float(0.0)]);
        let c = lower_expr_flat(&sf, &env(&[])).unwrap();
        assert_eq!(
            c.code,
            "((pos_i > pos_j) ? (float)((pos_i - pos_j)) : 0.0f)"
        );
        assert_eq!(c.ty, ScalarType::Float);
        // Two conditions: a condition.
        let sb = call(
            Func::Select,
            vec![
                gt.clone(),
                b(BinOp::Lt, v(Var::H), Expr::Int(2)),
                gt.clone(),
            ],
        );
        let c = lower_expr_flat(&sb, &env(&[])).unwrap();
        assert_eq!(c.ty, ScalarType::Bool);
        // div is the floor-division helper, int(x) the saturating truncation.
        let dv = call(Func::Div, vec![d.clone(), Expr::Int(4)]);
        let c = lower_expr_flat(&dv, &env(&[])).unwrap();
        assert_eq!(
            (c.code.as_str(), c.ty),
            ("mixc::floordiv((pos_i - pos_j), 4)", ScalarType::Int)
        );
        let it = call(Func::Int, vec![b(BinOp::Mul, v(Var::S), Expr::Float(4.0))]);
        let c = lower_expr_flat(&it, &env(&[])).unwrap();
        assert_eq!(
            (c.code.as_str(), c.ty),
            ("mixc::f2i((s * 4.0f))", ScalarType::Int)
        );
        let c = lower_expr_flat(&call(Func::Int, vec![v(Var::H)]), &env(&[])).unwrap();
        assert_eq!(c.code, "head", "int() of an integer passes through");
        let c = lower_expr_flat(&call(Func::Sin, vec![v(Var::S)]), &env(&[])).unwrap();
        assert_eq!(c.code, "mixc::sin_f(s)");
        let c = lower_expr_flat(&call(Func::Cos, vec![v(Var::I)]), &env(&[])).unwrap();
        assert_eq!(c.code, "mixc::cos_f((float)(pos_i))");
        let c = lower_expr_flat(&call(Func::Sigmoid, vec![v(Var::S)]), &env(&[])).unwrap();
        assert_eq!(c.code, "(1.0f / (1.0f + expf(-s)))");
    }

    #[test]
    fn batch_and_length_terms_are_hoisted_per_cta() {
        // -log(1.0 * kv_seq) + s: the log is a CTA constant.
        let e = b(
            BinOp::Add,
            Expr::Unary(
                UnOp::Neg,
                Box::new(call(
                    Func::Log,
                    vec![b(BinOp::Mul, Expr::Float(1.0), v(Var::KvSeq))],
                )),
            ),
            v(Var::S),
        );
        let mut h = vec![];
        let c = lower_expr(&e, &env(&[]), &mut h).unwrap();
        assert_eq!(c.code, "(hoist0 + s)");
        assert_eq!(h[0].code, "(-logf((1.0f * (float)(seq_len))))");
        // A hoisted condition is a `bool`.
        let decl = InputDecl {
            name: "pre".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Batch],
            role: InputRole::Table,
        };
        let decls = [decl];
        let read = Expr::Index {
            input: "pre".into(),
            indices: vec![v(Var::B)],
        };
        let cond = b(
            BinOp::And,
            b(BinOp::Gt, read, Expr::Float(0.5)),
            b(BinOp::Le, v(Var::J), v(Var::I)),
        );
        let mut h = vec![];
        let c = lower_expr(&cond, &env(&decls), &mut h).unwrap();
        assert_eq!(c.code, "(hoist0 && (pos_j <= pos_i))");
        assert_eq!(h[0].c_type, "bool");
        assert_eq!(
            h[0].code,
            "(__ldg(in_pre + mixc::clampi(batch_idx, batch)) > 0.5f)"
        );
    }

    #[test]
    fn table_gradients_skip_piecewise_constant_reads() {
        let decl = InputDecl {
            name: "rel".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Heads, Dim::Fixed(8)],
            role: InputRole::Table,
        };
        let decls = [decl];
        let rel = |k: i64| Expr::Index {
            input: "rel".into(),
            indices: vec![v(Var::H), Expr::Int(k)],
        };
        // select(rel[h][0] > 0.0, 2.0 * rel[h][1], -rel[h][2] + int(rel[h][3]))
        let e = call(
            Func::Select,
            vec![
                b(BinOp::Gt, rel(0), Expr::Float(0.0)),
                b(BinOp::Mul, Expr::Float(2.0), rel(1)),
                b(
                    BinOp::Add,
                    Expr::Unary(UnOp::Neg, Box::new(rel(2))),
                    call(Func::Int, vec![rel(3)]),
                ),
            ],
        );
        let mut h = vec![];
        let g = table_grads(&e, &env(&decls), &mut h).unwrap().unwrap();
        // rel[h][0] (condition) and rel[h][3] (under int) have no gradient.
        let offsets: Vec<&str> = g.iter().map(|g| g.offset.as_str()).collect();
        assert_eq!(
            offsets,
            [
                "(mixc::clampi(head, 16)) * (8) + mixc::clampi(1, 8)",
                "(mixc::clampi(head, 16)) * (8) + mixc::clampi(2, 8)"
            ]
        );
        // The partials are the branch choice (2 where the condition holds, -1
        // else), CTA constants here (they read the head and the table only).
        assert_eq!(
            (g[0].partial.as_str(), g[1].partial.as_str()),
            ("hoist0", "hoist1")
        );
        let cond = "(__ldg(in_rel + (mixc::clampi(head, 16)) * (8) + mixc::clampi(0, 8)) > 0.0f)";
        assert!(
            h[0].code.starts_with(&format!("({cond} ? "))
                && h[0].code.ends_with("(2.0f * 1.0f)) : 0.0f)"),
            "{}",
            h[0].code
        );
        assert_eq!(h[1].code, format!("({cond} ? 0.0f : ((-1.0f) + 0.0f))"));
    }

    #[test]
    fn unknown_table_is_an_error() {
        let e = Expr::Index {
            input: "nope".into(),
            indices: vec![Expr::Int(0)],
        };
        let msg = lower_expr_flat(&e, &env(&[])).unwrap_err().to_string();
        assert!(msg.contains("no input named `nope`"), "{msg}");
    }
}
