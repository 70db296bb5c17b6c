//! `ir::Expr` -> C expression. Float math is f32 (`expf`, `tanhf`, ...), integer
//! math is `int`, as the GPU computes them; the reference evaluates the same
//! tree in f64 / i64.
//!
//! Subexpressions that depend on the head only (e.g. `alibi_slope(h)`) are
//! hoisted: [`lower_expr`] names them `hoistN` and returns their definitions,
//! which a template evaluates once per CTA instead of once per score.

use crate::CodegenError;
use mixc_dsl::ir::{BinOp, Dim, ElemType, Expr, Func, InputDecl, ScalarType, UnOp, Var};
use serde::Serialize;

/// C names of the variables an expression reads, and what the template has
/// in scope for the extra inputs.
#[derive(Debug, Clone)]
pub struct LowerEnv<'a> {
    /// Query position (global), key position (global), query head, score.
    pub i: &'a str,
    pub j: &'a str,
    pub h: &'a str,
    pub s: &'a str,
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

/// Static type of an expression, with the IR's rules: `/` is float division,
/// any float operand makes the operation float.
pub fn type_of(e: &Expr) -> ScalarType {
    use ScalarType::{Float, Int};
    match e {
        Expr::Int(_) => Int,
        Expr::Float(_) => Float,
        Expr::Var(Var::S) => Float,
        Expr::Var(_) => Int,
        Expr::Unary(UnOp::Neg, a) => type_of(a),
        Expr::Binary(BinOp::Div, _, _) => Float,
        Expr::Binary(_, a, b) => {
            if type_of(a) == Int && type_of(b) == Int {
                Int
            } else {
                Float
            }
        }
        Expr::Call(f, args) => match f {
            Func::Abs => type_of(&args[0]),
            Func::Min | Func::Max | Func::Clamp => {
                if args.iter().all(|a| type_of(a) == Int) {
                    Int
                } else {
                    Float
                }
            }
            _ => Float,
        },
        Expr::Index { .. } => Float,
    }
}

/// Lowers `e`; head-only subexpressions with a call or a table read are
/// appended to `hoisted` (names continue from `hoisted.len()`).
pub fn lower_expr(
    e: &Expr,
    env: &LowerEnv<'_>,
    hoisted: &mut Vec<Hoisted>,
) -> Result<CExpr, CodegenError> {
    let ty = type_of(e);
    if is_hoistable(e) {
        let inner = lower_node(e, env, &mut None)?;
        let c_type = if ty == ScalarType::Int {
            "int"
        } else {
            "float"
        };
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

/// Depends on the head only and costs something worth hoisting.
fn is_hoistable(e: &Expr) -> bool {
    let head_only = !e.uses_var(Var::I) && !e.uses_var(Var::J) && !e.uses_var(Var::S);
    head_only && has_work(e)
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
        ScalarType::Int => format!("(float)({})", c.code),
    }
}

fn lower_node(
    e: &Expr,
    env: &LowerEnv<'_>,
    hoisted: &mut Option<&mut Vec<Hoisted>>,
) -> Result<CExpr, CodegenError> {
    use ScalarType::{Float, Int};
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
            }
            .to_string(),
            ty: if *v == Var::S { Float } else { Int },
        },
        Expr::Unary(UnOp::Neg, a) => {
            let a = sub(a)?;
            CExpr {
                code: format!("(-{})", a.code),
                ty: a.ty,
            }
        }
        Expr::Binary(op, a, b) => {
            let (a, b) = (sub(a)?, sub(b)?);
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
            let f1 = |name: &str| CExpr {
                code: format!("{name}({})", as_float(&a[0])),
                ty: Float,
            };
            match f {
                Func::Exp => f1("expf"),
                Func::Log => f1("logf"),
                Func::Sqrt => f1("sqrtf"),
                Func::Tanh => f1("tanhf"),
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
        assert_eq!(type_of(&e), ScalarType::Float);
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
