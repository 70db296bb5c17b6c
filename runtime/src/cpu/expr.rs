//! Bias / transform expressions compiled for the inner loop. Per head, every
//! subtree that does not read `i`, `j` or `s` is folded to a constant (so
//! `alibi_slope(h)` or `rel[h]`'s row costs nothing per pair); the rest becomes
//! a flat postfix program over *lanes*: one call evaluates a whole row of a
//! score tile (`i = i0 + lane`, one `j`), each op a plain loop over slices that
//! the compiler vectorises, instead of one tree walk per pair.
//!
//! The operators' semantics are not restated here: every lane op calls the
//! spec IR's definitions (`UnOp`/`BinOp`/`Func::apply_int`/`apply_float`,
//! the same ones `Expr::eval` uses), with two documented exceptions for
//! speed: `tanh` and `exp` go through [`Real::tanh_expr`] /
//! [`Real::exp_expr`] (fast approximations in f32, exact in f64). Integers
//! stay exact (i64 lanes); float lanes are the run's precision, so the f64
//! path matches the reference to rounding.

use mixc_dsl::ir::{BinOp, EvalEnv, Expr, Func, ScalarType, UnOp, Value, Var};

use super::microkernel::{detected_isa, Isa};
use super::real::Real;
use crate::tensor::{ExtraTensor, InputsMeta};

/// A bias or transform specialised to one head.
#[derive(Debug, Clone)]
pub enum FastExpr<'a> {
    /// Reads none of `i`, `j`, `s`: one value for the whole head.
    Const(f64),
    Program(Program<'a>),
}

/// Registers are typed: `Int` lanes are i64, `Float` lanes the run's precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Int(u32),
    Float(u32),
}

/// Up to three argument registers (the largest arity, `clamp`).
type Args = ([u32; 3], u8);

#[derive(Debug, Clone)]
struct Axis {
    /// Integer register holding this axis' index per lane.
    reg: u32,
    len: usize,
    stride: usize,
}

/// One postfix op; `d` is the destination register, written once (SSA), so
/// every source register has a smaller index than the destination of its class.
#[derive(Debug, Clone)]
enum Op<'a> {
    ConstInt(u32, i64),
    ConstFloat(u32, f64),
    /// `d = i0 + lane`.
    I(u32),
    J(u32),
    S(u32),
    UnInt(UnOp, u32, u32),
    UnFloat(UnOp, u32, u32),
    BinInt(BinOp, u32, u32, u32),
    BinFloat(BinOp, u32, u32, u32),
    /// A function that keeps integers integer, on integer registers.
    CallInt(Func, u32, Args),
    CallFloat(Func, u32, Args),
    /// `alibi_slope` of an integer register (read exactly, as `Expr::eval` does).
    AlibiInt(u32, u32),
    IntToFloat(u32, u32),
    FloatToInt(u32, u32),
    /// `table[...]` with clamped indices: `base` holds the constant indices'
    /// part of the offset, `axes` the lane-varying ones.
    Index {
        d: u32,
        table: &'a ExtraTensor,
        base: usize,
        axes: Vec<Axis>,
    },
}

/// A compiled lane program; its result is a float register.
#[derive(Debug, Clone)]
pub struct Program<'a> {
    ops: Vec<Op<'a>>,
    ints: u32,
    floats: u32,
    out: u32,
    heads: u32,
}

/// Per-worker register storage of [`FastExpr`] evaluation, reused across calls.
#[derive(Debug)]
pub struct ExprScratch<T> {
    ints: Vec<i64>,
    floats: Vec<T>,
}

impl<T> Default for ExprScratch<T> {
    fn default() -> Self {
        ExprScratch {
            ints: Vec::new(),
            floats: Vec::new(),
        }
    }
}

fn reads_pair(e: &Expr) -> bool {
    e.uses_var(Var::I) || e.uses_var(Var::J) || e.uses_var(Var::S)
}

struct Compiler<'a, 'e> {
    prog: Program<'a>,
    inputs: InputsMeta<'a>,
    env: EvalEnv<'e>,
}

impl<'a> Compiler<'a, '_> {
    fn int(&mut self) -> u32 {
        self.prog.ints += 1;
        self.prog.ints - 1
    }
    fn float(&mut self) -> u32 {
        self.prog.floats += 1;
        self.prog.floats - 1
    }
    fn as_float(&mut self, r: Reg) -> u32 {
        match r {
            Reg::Float(x) => x,
            Reg::Int(x) => {
                let d = self.float();
                self.prog.ops.push(Op::IntToFloat(d, x));
                d
            }
        }
    }
    fn as_int(&mut self, r: Reg) -> u32 {
        match r {
            Reg::Int(x) => x,
            Reg::Float(x) => {
                let d = self.int();
                self.prog.ops.push(Op::FloatToInt(d, x));
                d
            }
        }
    }

    fn compile(&mut self, e: &Expr) -> Reg {
        if !reads_pair(e) {
            return match e.eval(&self.env) {
                Value::Int(v) => {
                    let d = self.int();
                    self.prog.ops.push(Op::ConstInt(d, v));
                    Reg::Int(d)
                }
                Value::Float(v) => {
                    let d = self.float();
                    self.prog.ops.push(Op::ConstFloat(d, v));
                    Reg::Float(d)
                }
            };
        }
        match e {
            // Constants, `h`, `b` and the lengths never read a pair variable: folded above.
            Expr::Int(_) | Expr::Float(_) | Expr::Var(Var::H | Var::B | Var::Seq | Var::KvSeq) => {
                unreachable!("folded")
            }
            Expr::Var(v) => {
                let float = *v == Var::S;
                let d = if float { self.float() } else { self.int() };
                self.prog.ops.push(match v {
                    Var::I => Op::I(d),
                    Var::J => Op::J(d),
                    _ => Op::S(d),
                });
                if float {
                    Reg::Float(d)
                } else {
                    Reg::Int(d)
                }
            }
            Expr::Unary(op, a) => match self.compile(a) {
                Reg::Int(a) => {
                    let d = self.int();
                    self.prog.ops.push(Op::UnInt(*op, d, a));
                    Reg::Int(d)
                }
                Reg::Float(a) => {
                    let d = self.float();
                    self.prog.ops.push(Op::UnFloat(*op, d, a));
                    Reg::Float(d)
                }
            },
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.compile(a), self.compile(b));
                // Comparisons of integers stay exact (booleans are integer lanes).
                let int_result = op.result_type(ty(a), ty(b)) != ScalarType::Float;
                match (int_result, a, b) {
                    (true, Reg::Int(a), Reg::Int(b)) => {
                        let d = self.int();
                        self.prog.ops.push(Op::BinInt(*op, d, a, b));
                        Reg::Int(d)
                    }
                    _ => {
                        let (a, b) = (self.as_float(a), self.as_float(b));
                        let d = self.float();
                        self.prog.ops.push(Op::BinFloat(*op, d, a, b));
                        Reg::Float(d)
                    }
                }
            }
            Expr::Call(f, args) => {
                let regs: Vec<Reg> = args.iter().take(3).map(|a| self.compile(a)).collect();
                let types: Vec<ScalarType> = regs.iter().map(|r| ty(*r)).collect();
                let mut packed: Args = ([0; 3], regs.len() as u8);
                if f.result_type(&types) == ScalarType::Int {
                    for (slot, r) in packed.0.iter_mut().zip(&regs) {
                        *slot = self.as_int(*r);
                    }
                    let d = self.int();
                    self.prog.ops.push(Op::CallInt(*f, d, packed));
                    return Reg::Int(d);
                }
                if let (Func::AlibiSlope, [Reg::Int(a)]) = (f, regs.as_slice()) {
                    let d = self.float();
                    self.prog.ops.push(Op::AlibiInt(d, *a));
                    return Reg::Float(d);
                }
                for (slot, r) in packed.0.iter_mut().zip(&regs) {
                    *slot = self.as_float(*r);
                }
                let d = self.float();
                self.prog.ops.push(Op::CallFloat(*f, d, packed));
                Reg::Float(d)
            }
            Expr::Index { input, indices } => {
                let table = &self.inputs.extra[input.as_str()];
                let shape = table.shape().to_vec();
                let mut strides = vec![1usize; shape.len()];
                for k in (0..shape.len().saturating_sub(1)).rev() {
                    strides[k] = strides[k + 1] * shape[k + 1];
                }
                let (mut base, mut axes) = (0usize, Vec::new());
                for ((x, &len), &stride) in indices.iter().zip(&shape).zip(&strides) {
                    if reads_pair(x) {
                        let r = self.compile(x);
                        let reg = self.as_int(r);
                        axes.push(Axis { reg, len, stride });
                    } else {
                        base += clamp_index(x.eval(&self.env).as_i64(), len) * stride;
                    }
                }
                let d = self.float();
                self.prog.ops.push(Op::Index {
                    d,
                    table,
                    base,
                    axes,
                });
                Reg::Float(d)
            }
        }
    }
}

fn ty(r: Reg) -> ScalarType {
    match r {
        Reg::Int(_) => ScalarType::Int,
        Reg::Float(_) => ScalarType::Float,
    }
}

/// The language's table-read rule (as `ExtraTensor::get_clamped`): each
/// index clamped into its axis.
#[inline(always)]
fn clamp_index(x: i64, len: usize) -> usize {
    x.clamp(0, (len as i64 - 1).max(0)) as usize
}

impl<'a> FastExpr<'a> {
    /// Specialises `e` to batch row `b` and head `h` (which, like the
    /// lengths, it folds). Every input it names must be present (inputs are
    /// validated before a run starts).
    pub fn new(e: &Expr, b: usize, h: usize, heads: u32, inputs: InputsMeta<'a>) -> FastExpr<'a> {
        let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
        let mut env = inputs.eval_env(heads, &lookup);
        (env.b, env.h) = (b as i64, h as i64);
        if !reads_pair(e) {
            return FastExpr::Const(e.eval_f64(&env));
        }
        let mut c = Compiler {
            prog: Program {
                ops: Vec::new(),
                ints: 0,
                floats: 0,
                out: 0,
                heads,
            },
            inputs,
            env,
        };
        let r = c.compile(e);
        let out = c.as_float(r);
        c.prog.out = out;
        FastExpr::Program(c.prog)
    }

    /// `row[l] += e(i0 + l, j)` (a bias; `s` reads as 0).
    pub fn add_to<T: Real>(&self, i0: i64, j: i64, row: &mut [T], sc: &mut ExprScratch<T>) {
        match self {
            FastExpr::Const(c) => {
                let c = T::from_f64(*c);
                row.iter_mut().for_each(|x| *x += c);
            }
            FastExpr::Program(p) => {
                let v = p.eval(
                    Row {
                        i0,
                        j,
                        s: None,
                        n: row.len(),
                    },
                    sc,
                );
                row.iter_mut().zip(v).for_each(|(x, v)| *x += *v);
            }
        }
    }

    /// `row[l] = e(i0 + l, j, s = row[l])` (a transform).
    pub fn apply_to<T: Real>(&self, i0: i64, j: i64, row: &mut [T], sc: &mut ExprScratch<T>) {
        match self {
            FastExpr::Const(c) => row.fill(T::from_f64(*c)),
            FastExpr::Program(p) => {
                let v = p.eval(
                    Row {
                        i0,
                        j,
                        s: Some(row),
                        n: row.len(),
                    },
                    sc,
                );
                row.copy_from_slice(v);
            }
        }
    }
}

#[inline(always)]
fn map1<A: Copy, B>(d: &mut [B], a: &[A], f: impl Fn(A) -> B) {
    for (d, &a) in d.iter_mut().zip(a) {
        *d = f(a);
    }
}

#[inline(always)]
fn map2<A: Copy, B>(d: &mut [B], a: &[A], b: &[A], f: impl Fn(A, A) -> B) {
    for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
        *d = f(a, b);
    }
}

#[inline(always)]
fn map3<A: Copy, B>(d: &mut [B], a: &[A], b: &[A], c: &[A], f: impl Fn(A, A, A) -> B) {
    for (((d, &a), &b), &c) in d.iter_mut().zip(a).zip(b).zip(c) {
        *d = f(a, b, c);
    }
}

/// Matches `$v` against the listed variants and runs `$body` with `$o` bound
/// to the matched constant, so each arm's loop is compiled for one operator
/// (the IR's `match` on it folds away) instead of branching per lane.
macro_rules! specialise {
    ($v:expr, [$($p:path),* $(,)?], |$o:ident| $body:expr $(, _ => $rest:expr)?) => {
        match $v {
            $($p => {
                let $o = $p;
                $body
            })*
            $(_ => $rest)?
        }
    };
}

/// [`specialise!`] over every binary operator.
macro_rules! specialise_binop {
    ($v:expr, |$o:ident| $body:expr) => {
        specialise!(
            $v,
            [
                BinOp::Add,
                BinOp::Sub,
                BinOp::Mul,
                BinOp::Div,
                BinOp::Rem,
                BinOp::Lt,
                BinOp::Le,
                BinOp::Gt,
                BinOp::Ge,
                BinOp::Eq,
                BinOp::Ne,
                BinOp::And,
                BinOp::Or
            ],
            |$o| $body
        )
    };
}

/// Splits `regs` (registers of `n` lanes) into the destination `d`, mutable,
/// and everything below it (its sources), shared.
#[inline(always)]
fn split<T>(regs: &mut [T], d: u32, n: usize) -> (&[T], &mut [T]) {
    let (lo, hi) = regs.split_at_mut(d as usize * n);
    (lo, &mut hi[..n])
}

#[inline(always)]
fn lanes<T>(regs: &[T], r: u32, n: usize) -> &[T] {
    &regs[r as usize * n..(r as usize + 1) * n]
}

/// The lanes one program call covers: `i = i0 + lane` for `n` lanes, one
/// key `j`, the score `s[lane]` (0 when `s` is `None`, as for a bias).
#[derive(Debug, Clone, Copy)]
struct Row<'r, T> {
    i0: i64,
    j: i64,
    s: Option<&'r [T]>,
    n: usize,
}

/// [`Program::eval_body`] compiled with extra target features.
macro_rules! isa_variant {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<'s, T: Real>(
            &self,
            row: Row<'_, T>,
            sc: &'s mut ExprScratch<T>,
        ) -> &'s [T] {
            self.eval_body(row, sc)
        }
    };
}

impl Program<'_> {
    /// Runs the program over a row's lanes and returns the result lanes.
    /// The lane loops are compiled once per vector ISA and the widest the
    /// CPU has is picked (the same detection as the GEMM microkernels).
    fn eval<'s, T: Real>(&self, row: Row<'_, T>, sc: &'s mut ExprScratch<T>) -> &'s [T] {
        self.eval_with(detected_isa(), row, sc)
    }

    /// [`Program::eval`] with the lane loops compiled for `isa`, which the
    /// CPU must support.
    fn eval_with<'s, T: Real>(
        &self,
        isa: Isa,
        row: Row<'_, T>,
        sc: &'s mut ExprScratch<T>,
    ) -> &'s [T] {
        match isa {
            // SAFETY: callers pass `detected_isa()` or one it implies.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.eval_avx512(row, sc) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.eval_avx2(row, sc) },
            _ => self.eval_body(row, sc),
        }
    }

    isa_variant!(eval_avx512, "avx512f,avx2,fma");
    isa_variant!(eval_avx2, "avx2,fma");

    #[inline(always)]
    fn eval_body<'s, T: Real>(&self, row: Row<'_, T>, sc: &'s mut ExprScratch<T>) -> &'s [T] {
        let Row { i0, j, s, n } = row;
        sc.ints.resize(self.ints as usize * n, 0);
        sc.floats.resize(self.floats as usize * n, T::ZERO);
        let (ints, floats) = (&mut sc.ints[..], &mut sc.floats[..]);
        let heads = self.heads;
        for op in &self.ops {
            match op {
                Op::ConstInt(d, v) => split(ints, *d, n).1.fill(*v),
                Op::ConstFloat(d, v) => split(floats, *d, n).1.fill(T::from_f64(*v)),
                Op::I(d) => {
                    for (l, x) in split(ints, *d, n).1.iter_mut().enumerate() {
                        *x = i0.wrapping_add(l as i64);
                    }
                }
                Op::J(d) => split(ints, *d, n).1.fill(j),
                Op::S(d) => {
                    let d = split(floats, *d, n).1;
                    match s {
                        Some(s) => d.copy_from_slice(&s[..n]),
                        None => d.fill(T::ZERO),
                    }
                }
                Op::UnInt(op, d, a) => {
                    let (src, d) = split(ints, *d, n);
                    specialise!(op, [UnOp::Neg, UnOp::Not], |o| map1(
                        d,
                        lanes(src, *a, n),
                        |x| o.apply_int(x)
                    ))
                }
                Op::UnFloat(op, d, a) => {
                    let (src, d) = split(floats, *d, n);
                    specialise!(op, [UnOp::Neg, UnOp::Not], |o| map1(
                        d,
                        lanes(src, *a, n),
                        |x| o.apply_float(x)
                    ))
                }
                Op::BinInt(op, d, a, b) => {
                    let (src, d) = split(ints, *d, n);
                    let (a, b) = (lanes(src, *a, n), lanes(src, *b, n));
                    specialise_binop!(op, |o| map2(d, a, b, |x, y| o.apply_int(x, y)))
                }
                Op::BinFloat(op, d, a, b) => {
                    let (src, d) = split(floats, *d, n);
                    let (a, b) = (lanes(src, *a, n), lanes(src, *b, n));
                    specialise_binop!(op, |o| map2(d, a, b, |x, y| o.apply_float(x, y)))
                }
                Op::CallInt(f, d, (args, _)) => {
                    let (src, d) = split(ints, *d, n);
                    let a = |k: usize| lanes(src, args[k], n);
                    // Only functions that keep integers reach here (`apply_int` is Some).
                    match f {
                        Func::Abs => map1(d, a(0), |x| Func::Abs.apply_int(&[x]).unwrap_or(0)),
                        Func::Min => map2(d, a(0), a(1), |x, y| {
                            Func::Min.apply_int(&[x, y]).unwrap_or(0)
                        }),
                        Func::Max => map2(d, a(0), a(1), |x, y| {
                            Func::Max.apply_int(&[x, y]).unwrap_or(0)
                        }),
                        Func::Int => map1(d, a(0), |x| x),
                        Func::Div => map2(d, a(0), a(1), mixc_dsl::ir::floor_div),
                        _ => map3(d, a(0), a(1), a(2), |x, y, z| {
                            f.apply_int(&[x, y, z]).unwrap_or(0)
                        }),
                    }
                }
                Op::CallFloat(f, d, (args, _)) => {
                    let (src, d) = split(floats, *d, n);
                    let a = |k: usize| lanes(src, args[k], n);
                    match f {
                        // The two deliberate departures from `apply_float`: fast in f32.
                        Func::Tanh => map1(d, a(0), T::tanh_expr),
                        Func::Exp => map1(d, a(0), T::exp_expr),
                        Func::Min => {
                            map2(d, a(0), a(1), |x, y| Func::Min.apply_float(&[x, y], heads))
                        }
                        Func::Max => {
                            map2(d, a(0), a(1), |x, y| Func::Max.apply_float(&[x, y], heads))
                        }
                        Func::Pow => {
                            map2(d, a(0), a(1), |x, y| Func::Pow.apply_float(&[x, y], heads))
                        }
                        Func::Clamp | Func::Select => specialise!(
                            f,
                            [Func::Clamp, Func::Select],
                            |o| map3(d, a(0), a(1), a(2), |x, y, z| o.apply_float(&[x, y, z], heads)),
                            _ => unreachable!("the enclosing arm lists these")
                        ),
                        // Integer-valued: the compiler puts them on integer lanes.
                        Func::Div => {
                            map2(d, a(0), a(1), |x, y| Func::Div.apply_float(&[x, y], heads))
                        }
                        Func::Log
                        | Func::Sqrt
                        | Func::Abs
                        | Func::Floor
                        | Func::AlibiSlope
                        | Func::Sin
                        | Func::Cos
                        | Func::Sigmoid
                        | Func::Int => {
                            specialise!(
                                f,
                                [
                                    Func::Log,
                                    Func::Sqrt,
                                    Func::Abs,
                                    Func::Floor,
                                    Func::AlibiSlope,
                                    Func::Sin,
                                    Func::Cos,
                                    Func::Sigmoid,
                                    Func::Int
                                ],
                                |o| map1(d, a(0), |x| o.apply_float(&[x], heads)),
                                _ => unreachable!("the enclosing arm lists these")
                            )
                        }
                    }
                }
                Op::AlibiInt(d, a) => {
                    let d = split(floats, *d, n).1;
                    map1(d, lanes(ints, *a, n), |x| {
                        T::from_f64(mixc_dsl::ir::alibi_slope(x, heads))
                    })
                }
                Op::IntToFloat(d, a) => {
                    map1(split(floats, *d, n).1, lanes(ints, *a, n), T::from_i64)
                }
                Op::FloatToInt(d, a) => map1(split(ints, *d, n).1, lanes(floats, *a, n), T::to_i64),
                Op::Index {
                    d,
                    table,
                    base,
                    axes,
                } => {
                    let d = split(floats, *d, n).1;
                    match table {
                        ExtraTensor::F32(t) => gather(d, &t.data, *base, axes, ints, n),
                        ExtraTensor::I32(t) => gather(d, &t.data, *base, axes, ints, n),
                    }
                }
            }
        }
        lanes(floats, self.out, n)
    }
}

/// `d[l] = data[base + sum_k clamp(idx_k[l]) * stride_k]`, one varying axis
/// (a per-head table row) handled without the inner loop.
#[inline(always)]
fn gather<T: Real, X: Copy + Into<f64>>(
    d: &mut [T],
    data: &[X],
    base: usize,
    axes: &[Axis],
    ints: &[i64],
    n: usize,
) {
    let read = |off: usize| T::from_f64(data.get(off).map_or(0.0, |&x| x.into()));
    if let [ax] = axes {
        let idx = lanes(ints, ax.reg, n);
        map1(d, idx, |x| read(base + clamp_index(x, ax.len) * ax.stride));
        return;
    }
    for (l, out) in d.iter_mut().enumerate() {
        let mut off = base;
        for ax in axes {
            off += clamp_index(ints[ax.reg as usize * n + l], ax.len) * ax.stride;
        }
        *out = read(off);
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
    fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }
    fn call(f: Func, args: Vec<Expr>) -> Expr {
        Expr::Call(f, args)
    }

    fn inputs() -> crate::tensor::MixerInputs {
        let rel = Tensor::new(
            vec![2, 4],
            vec![0.5f32, -1.0, 2.0, 0.25, 3.0, 1.5, -0.5, 7.0],
        );
        let ids = Tensor::new(vec![3, 2], vec![4i32, -2, 9, 1, 0, 5]);
        let mut extra = BTreeMap::new();
        extra.insert("rel".to_string(), ExtraTensor::F32(rel));
        extra.insert("ids".to_string(), ExtraTensor::I32(ids));
        let empty = || Tensor::new(vec![0], vec![]);
        crate::tensor::MixerInputs::self_attention(1, 4, empty(), empty(), empty(), extra)
    }

    /// The example biases / transforms plus every operator and function,
    /// int and float variants, table reads with clamped (negative, too
    /// large, float) indices.
    fn exprs() -> Vec<Expr> {
        let (i, j, s, h) = (
            Expr::Var(Var::I),
            Expr::Var(Var::J),
            Expr::Var(Var::S),
            Expr::Var(Var::H),
        );
        let i_minus_j = bin(BinOp::Sub, i.clone(), j.clone());
        let f = |x: f64| Expr::Float(x);
        let k = Expr::Int;
        vec![
            // -alibi_slope(h) * (i - j)
            Expr::Binary(
                BinOp::Mul,
                Box::new(Expr::Unary(
                    UnOp::Neg,
                    Box::new(call(Func::AlibiSlope, vec![h.clone()])),
                )),
                Box::new(i_minus_j.clone()),
            ),
            // rel[h][min(abs(i - j), 3)]
            Expr::Index {
                input: "rel".into(),
                indices: vec![
                    h.clone(),
                    call(
                        Func::Min,
                        vec![call(Func::Abs, vec![i_minus_j.clone()]), k(3)],
                    ),
                ],
            },
            // 50 * tanh(s / 50)
            bin(
                BinOp::Mul,
                f(50.0),
                call(Func::Tanh, vec![bin(BinOp::Div, s.clone(), f(50.0))]),
            ),
            bin(BinOp::Rem, i_minus_j.clone(), k(3)),
            bin(BinOp::Rem, i.clone(), bin(BinOp::Sub, j.clone(), j.clone())),
            bin(BinOp::Div, i.clone(), j.clone()),
            bin(BinOp::Rem, s.clone(), f(1.5)),
            Expr::Unary(UnOp::Neg, var(Var::S)),
            Expr::Unary(UnOp::Neg, Box::new(i_minus_j.clone())),
            bin(BinOp::Add, bin(BinOp::Mul, i.clone(), h.clone()), j.clone()),
            call(Func::Exp, vec![bin(BinOp::Mul, s.clone(), f(0.1))]),
            call(Func::Log, vec![bin(BinOp::Add, i.clone(), k(1))]),
            call(Func::Sqrt, vec![j.clone()]),
            call(Func::Floor, vec![bin(BinOp::Div, s.clone(), f(3.0))]),
            call(Func::Abs, vec![s.clone()]),
            call(Func::Max, vec![i.clone(), j.clone()]),
            call(Func::Max, vec![i.clone(), s.clone()]),
            call(Func::Min, vec![s.clone(), f(0.5)]),
            call(Func::Pow, vec![f(0.9), i_minus_j.clone()]),
            call(Func::Clamp, vec![i_minus_j.clone(), k(-1), k(2)]),
            call(Func::Clamp, vec![s.clone(), f(-1.0), j.clone()]),
            call(Func::AlibiSlope, vec![i.clone()]),
            call(Func::AlibiSlope, vec![bin(BinOp::Div, i.clone(), k(2))]),
            // Comparisons, logic and selection (booleans are integer lanes).
            call(
                Func::Select,
                vec![
                    bin(
                        BinOp::And,
                        bin(BinOp::Le, j.clone(), i.clone()),
                        Expr::Unary(UnOp::Not, Box::new(bin(BinOp::Eq, i_minus_j.clone(), k(2)))),
                    ),
                    s.clone(),
                    f(-3.0),
                ],
            ),
            call(
                Func::Select,
                vec![bin(BinOp::Gt, s.clone(), f(0.25)), i_minus_j.clone(), k(7)],
            ),
            bin(
                BinOp::Or,
                bin(BinOp::Ne, s.clone(), j.clone()),
                bin(BinOp::Ge, i.clone(), Expr::Var(Var::Seq)),
            ),
            call(Func::Sin, vec![bin(BinOp::Mul, s.clone(), i.clone())]),
            call(Func::Cos, vec![bin(BinOp::Add, s.clone(), j.clone())]),
            call(Func::Sigmoid, vec![s.clone()]),
            call(Func::Int, vec![bin(BinOp::Mul, s.clone(), f(2.5))]),
            call(Func::Div, vec![i_minus_j.clone(), k(-3)]),
            call(
                Func::Div,
                vec![
                    i_minus_j.clone(),
                    bin(BinOp::Sub, j.clone(), Expr::Var(Var::KvSeq)),
                ],
            ),
            bin(BinOp::Mul, i.clone(), Expr::Var(Var::B)),
            // Float and out-of-range indices, an i32 table, two varying axes.
            Expr::Index {
                input: "ids".into(),
                indices: vec![i_minus_j.clone(), bin(BinOp::Div, j.clone(), k(2))],
            },
            Expr::Index {
                input: "ids".into(),
                indices: vec![k(7), i.clone()],
            },
            // Constant for the whole head.
            bin(BinOp::Mul, call(Func::AlibiSlope, vec![h.clone()]), f(2.0)),
        ]
    }

    /// Every lane of the f64 program agrees with `Expr::eval` exactly, and
    /// the f32 program (fast tanh / exp) to f32 accuracy.
    #[test]
    fn lane_programs_agree_with_the_ir_evaluator() {
        let inputs = inputs();
        let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
        let n = 7;
        for e in &exprs() {
            for h in 0..2 {
                let fast = FastExpr::new(e, 0, h, 2, inputs.meta());
                let (mut sc64, mut sc32) = (ExprScratch::<f64>::default(), ExprScratch::default());
                for i0 in [-3i64, 0, 5] {
                    for j in -2..6i64 {
                        let s: Vec<f64> = (0..n)
                            .map(|l| (l as f64 * 7.0 - j as f64 * 3.0) * 0.37)
                            .collect();
                        let want: Vec<f64> = (0..n)
                            .map(|l| {
                                let mut env = inputs.eval_env(2, &lookup);
                                (env.i, env.j, env.h, env.s) = (i0 + l as i64, j, h as i64, s[l]);
                                e.eval_f64(&env)
                            })
                            .collect();
                        let mut got = s.clone();
                        fast.apply_to(i0, j, &mut got, &mut sc64);
                        for l in 0..n {
                            let same = got[l] == want[l] || (got[l].is_nan() && want[l].is_nan());
                            assert!(
                                same,
                                "{e:?} at i={} j={j} h={h}: {} vs {}",
                                i0 + l as i64,
                                got[l],
                                want[l]
                            );
                        }
                        let mut got32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
                        fast.apply_to(i0, j, &mut got32, &mut sc32);
                        for l in 0..n {
                            let (g, w) = (got32[l] as f64, want[l]);
                            let ok = (g - w).abs() <= 1e-5 * w.abs().max(1.0)
                                || (g.is_nan() && w.is_nan())
                                || g == w;
                            assert!(
                                ok,
                                "f32 {e:?} at i={} j={j} h={h}: {g} vs {w}",
                                i0 + l as i64
                            );
                        }
                        // As a bias: added to the row, with `s` reading 0.
                        if !e.uses_var(Var::S) {
                            let mut row = vec![1.0f64; n];
                            fast.add_to(i0, j, &mut row, &mut sc64);
                            for l in 0..n {
                                let w = 1.0 + want[l];
                                assert!(
                                    row[l] == w || (row[l].is_nan() && w.is_nan()),
                                    "bias {e:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every ISA variant of the lane loops computes the same bits (the wide
    /// ones must not, e.g., fuse multiply-adds the portable one rounds twice),
    /// over a lane count with a vector tail.
    #[test]
    fn every_isa_variant_agrees() {
        use super::super::microkernel::supported_isas;
        let inputs = inputs();
        let n = 37;
        fn row<T>(s: &[T]) -> Row<'_, T> {
            Row {
                i0: 3,
                j: 5,
                s: Some(s),
                n: s.len(),
            }
        }
        for e in &exprs() {
            let FastExpr::Program(p) = FastExpr::new(e, 0, 1, 2, inputs.meta()) else {
                continue;
            };
            let s32: Vec<f32> = (0..n).map(|l| (l as f32 - 11.0) * 0.73).collect();
            let s64: Vec<f64> = s32.iter().map(|&x| x as f64).collect();
            let mut sc32 = ExprScratch::default();
            let mut sc64 = ExprScratch::default();
            let want32 = p.eval_with(Isa::Portable, row(&s32), &mut sc32).to_vec();
            let want64 = p.eval_with(Isa::Portable, row(&s64), &mut sc64).to_vec();
            for isa in supported_isas() {
                let got32 = p.eval_with(isa, row(&s32), &mut sc32);
                let same = got32
                    .iter()
                    .zip(&want32)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} f32 {e:?}: {got32:?} vs {want32:?}");
                let got64 = p.eval_with(isa, row(&s64), &mut sc64);
                let same = got64
                    .iter()
                    .zip(&want64)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} f64 {e:?}");
            }
        }
    }

    /// Head-only subtrees fold to constants: ALiBi's slope is computed once
    /// per head, not per pair, and a head-only bias is no program at all.
    #[test]
    fn head_only_parts_are_folded() {
        let inputs = inputs();
        let all = exprs();
        let FastExpr::Program(p) = FastExpr::new(&all[0], 0, 1, 2, inputs.meta()) else {
            panic!("ALiBi reads i and j");
        };
        assert!(!p
            .ops
            .iter()
            .any(|o| matches!(o, Op::AlibiInt(..) | Op::CallFloat(..))));
        assert!(matches!(
            FastExpr::new(&all[all.len() - 1], 0, 1, 2, inputs.meta()),
            FastExpr::Const(_)
        ));
    }

    /// The f32 tanh: within 1e-6 relative of f64 tanh over a fine sweep,
    /// odd, saturating, and NaN-preserving.
    #[test]
    fn fast_tanh_is_accurate() {
        let mut worst = 0f64;
        for k in -200_000..=200_000 {
            let x = k as f32 * 1e-4;
            let (got, want) = (x.tanh_expr() as f64, (x as f64).tanh());
            if want != 0.0 {
                worst = worst.max((got - want).abs() / want.abs());
            }
            assert_eq!(x.tanh_expr(), -(-x).tanh_expr());
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(1e-30f32.tanh_expr(), 1e-30);
        assert_eq!(f32::INFINITY.tanh_expr(), 1.0);
        assert_eq!(f32::NEG_INFINITY.tanh_expr(), -1.0);
        assert!(f32::NAN.tanh_expr().is_nan());
        assert_eq!(100f32.exp_expr(), f32::INFINITY);
        assert_eq!(f32::NEG_INFINITY.exp_expr(), 0.0);
        assert!(((1.5f32.exp_expr() as f64) - 1.5f64.exp()).abs() < 1e-6 * 1.5f64.exp());
    }
}
