//! The typed mixer IR: the single source of truth for codegen, the reference
//! evaluator and the runtime. A `MixerSpec` is only ever built by validation
//! (`crate::parse_str` / `crate::parse_file` / the `mixer!{}` macro), so every
//! value here has already been checked: names resolve, types agree, families
//! are consistent. It carries no spans, so a spec from a file and the same spec
//! from the macro compare equal.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Div, Mul, Neg, Rem, Sub};

/// Storage type of q, k, v and the output. Accumulation is always f32 on the
/// GPU and f64 in the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F16,
    Bf16,
    F32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::Bf16),
            "f32" => Some(DType::F32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of an extra input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    F32,
    I32,
}

/// One axis of an extra input tensor. Symbolic axes are bound at run time
/// from the shape of q (batch, seq) and from the spec (heads, kv_heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    Batch,
    Seq,
    Heads,
    KvHeads,
    Fixed(u64),
}

/// What an extra input is for, inferred from where the spec uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputRole {
    /// Segment / document ids, `i32[batch, seq]`, used by `segment(x)`.
    SegmentIds,
    /// Per-token decay gates gamma in (0, 1], `f32[batch, seq, heads]`, used by `gate(x)`.
    Gate,
    /// Convolution filter, `f32[heads, seq]`, used by `filter(x)`.
    Filter,
    /// A table indexed inside `bias` / `transform` expressions.
    Table,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputDecl {
    pub name: String,
    pub elem: ElemType,
    pub dims: Vec<Dim>,
    pub role: InputRole,
}

/// Feature map applied to q (phi) or k (psi) before the dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMap {
    Identity,
    /// `elu(x) + 1`, positive, as in Katharopoulos et al. linear attention.
    Elu1,
    Relu,
}

impl FeatureMap {
    pub fn apply(self, x: f64) -> f64 {
        match self {
            FeatureMap::Identity => x,
            FeatureMap::Elu1 => {
                if x > 0.0 {
                    x + 1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => x.max(0.0),
        }
    }
    /// `d apply(x) / dx` (one-sided at the kinks, as autograd takes them:
    /// relu'(0) = 0).
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            FeatureMap::Identity => 1.0,
            FeatureMap::Elu1 => {
                if x > 0.0 {
                    1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => f64::from(u8::from(x > 0.0)),
        }
    }
}

/// How the raw pairwise weight is produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// `scale * <phi(q_i), psi(k_j)>`.
    Dot {
        q_map: FeatureMap,
        k_map: FeatureMap,
        scale: f64,
    },
    /// Convolution family: `a(i, j) = filter[h, i - j]` (causal, `j <= i`).
    Filter { input: String },
}

/// Scalar variables an expression may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Var {
    /// Query position (global, 0-based).
    I,
    /// Key position (global, 0-based).
    J,
    /// Query head index.
    H,
    /// The score (after scale and bias); only inside `transform`.
    S,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnOp {
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Integer remainder (both operands integer; result has the sign of the dividend, like C).
    Rem,
}

/// Built-in scalar functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    Exp,
    Log,
    Sqrt,
    Tanh,
    Abs,
    Floor,
    Min,
    Max,
    Pow,
    Clamp,
    /// ALiBi slope of head h: `2^(-8 (h + 1) / heads)` (heads a power of two;
    /// otherwise the interpolation of Press et al. is used, see docs/language.md).
    AlibiSlope,
}

impl Func {
    pub fn name(self) -> &'static str {
        match self {
            Func::Exp => "exp",
            Func::Log => "log",
            Func::Sqrt => "sqrt",
            Func::Tanh => "tanh",
            Func::Abs => "abs",
            Func::Floor => "floor",
            Func::Min => "min",
            Func::Max => "max",
            Func::Pow => "pow",
            Func::Clamp => "clamp",
            Func::AlibiSlope => "alibi_slope",
        }
    }
    pub fn arity(self) -> usize {
        match self {
            Func::Min | Func::Max | Func::Pow => 2,
            Func::Clamp => 3,
            _ => 1,
        }
    }
    pub fn from_name(s: &str) -> Option<Func> {
        Some(match s {
            "exp" => Func::Exp,
            "log" => Func::Log,
            "sqrt" => Func::Sqrt,
            "tanh" => Func::Tanh,
            "abs" => Func::Abs,
            "floor" => Func::Floor,
            "min" => Func::Min,
            "max" => Func::Max,
            "pow" => Func::Pow,
            "clamp" => Func::Clamp,
            "alibi_slope" => Func::AlibiSlope,
            _ => return None,
        })
    }
}

/// Scalar type of a checked expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalarType {
    Int,
    Float,
}

/// A type-checked scalar expression (bias, transform, per-head decay).
/// Integers are exact (i64); any float operand makes the operation float.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    Int(i64),
    Float(f64),
    Var(Var),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
    /// `name[idx0][idx1]...`: an extra input read at integer indices, which
    /// are clamped into range (so `table[h][i - j]` is always defined).
    Index {
        input: String,
        indices: Vec<Expr>,
    },
}

/// The indices of one table read, held inline up to 8 (tables of higher
/// rank spill to the heap), so evaluating a read allocates nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Indices {
    Inline { len: usize, buf: [i64; 8] },
    Heap(Vec<i64>),
}

impl Indices {
    /// The integer values of `exprs` at `env`.
    pub fn eval(exprs: &[Expr], env: &EvalEnv<'_>) -> Indices {
        if exprs.len() > 8 {
            return Indices::Heap(exprs.iter().map(|e| e.eval(env).as_i64()).collect());
        }
        let mut buf = [0i64; 8];
        for (d, e) in buf.iter_mut().zip(exprs) {
            *d = e.eval(env).as_i64();
        }
        Indices::Inline {
            len: exprs.len(),
            buf,
        }
    }
}

impl std::ops::Deref for Indices {
    type Target = [i64];
    fn deref(&self) -> &[i64] {
        match self {
            Indices::Inline { len, buf } => &buf[..*len],
            Indices::Heap(v) => v,
        }
    }
}

/// Everything an expression can read while it is evaluated.
pub struct EvalEnv<'a> {
    pub i: i64,
    pub j: i64,
    pub h: i64,
    pub s: f64,
    pub heads: u32,
    /// Looks up `input[indices]` (indices already clamped by the caller's
    /// tensor); returns the element as f64.
    pub lookup: &'a dyn Fn(&str, &[i64]) -> f64,
}

impl<'a> EvalEnv<'a> {
    /// The environment of a head-only evaluation (per-head decay, constant
    /// folding): `i = j = 0`, `s = 0`.
    pub fn for_head(h: i64, heads: u32, lookup: &'a dyn Fn(&str, &[i64]) -> f64) -> Self {
        EvalEnv {
            i: 0,
            j: 0,
            h,
            s: 0.0,
            heads,
            lookup,
        }
    }
}

/// A value during evaluation: keeps integers exact so `%` and indices work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }
    pub fn as_i64(self) -> i64 {
        match self {
            Value::Int(v) => v,
            Value::Float(v) => v as i64,
        }
    }
    pub fn scalar_type(self) -> ScalarType {
        match self {
            Value::Int(_) => ScalarType::Int,
            Value::Float(_) => ScalarType::Float,
        }
    }
}

/// ALiBi slope for head `h` of `heads` (Press et al., 2022), including the
/// interpolation for head counts that are not powers of two.
pub fn alibi_slope(h: i64, heads: u32) -> f64 {
    let n = heads.max(1) as i64;
    let closest = 1i64 << (63 - (n as u64).leading_zeros() as i64);
    let base = |k: i64| 2f64.powf(-8.0 / k as f64);
    if h < closest {
        base(closest).powi(h.saturating_add(1) as i32)
    } else {
        // Extra heads take every other slope of the next power of two.
        let extra = h - closest;
        // Saturating: `h` can be any integer expression of the user's.
        base(2 * closest).powi(extra.saturating_mul(2).saturating_add(1) as i32)
    }
}

/// Float arithmetic the expression semantics are written over: `f64` for
/// `Expr::eval` (the reference), `f32` or `f64` for the CPU backend's lane
/// programs. Every method is the plain std operation of the type.
pub trait ExprFloat:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Rem<Output = Self>
    + Neg<Output = Self>
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `x as Self` (nearest).
    fn from_i64(x: i64) -> Self;
    /// `self as i64` (truncating, saturating, NaN -> 0): how a float index reads.
    fn to_i64(self) -> i64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn abs(self) -> Self;
    fn floor(self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn powf(self, o: Self) -> Self;
}

macro_rules! impl_expr_float {
    ($t:ty) => {
        impl ExprFloat for $t {
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_i64(x: i64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self as i64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline(always)]
            fn powf(self, o: Self) -> Self {
                <$t>::powf(self, o)
            }
        }
    };
}
impl_expr_float!(f32);
impl_expr_float!(f64);

// The semantics of each operator, defined once: `Expr::eval` and the CPU
// backend's lane programs both call these. Integers are exact and wrap;
// any float operand makes the operation float.

impl UnOp {
    #[inline(always)]
    pub fn apply_int(self, a: i64) -> i64 {
        match self {
            // Wrapping like the other integer ops: never panic on i64::MIN.
            UnOp::Neg => a.wrapping_neg(),
        }
    }
    #[inline(always)]
    pub fn apply_float<F: ExprFloat>(self, a: F) -> F {
        match self {
            UnOp::Neg => -a,
        }
    }
}

impl BinOp {
    /// Type of `a op b`: integer when both are, except `/` (always float).
    pub fn result_type(self, a: ScalarType, b: ScalarType) -> ScalarType {
        match (self, a, b) {
            (BinOp::Div, _, _) => ScalarType::Float,
            (_, ScalarType::Int, ScalarType::Int) => ScalarType::Int,
            _ => ScalarType::Float,
        }
    }
    /// Integer semantics (wrapping; `x % 0 = 0`). Only called where
    /// [`BinOp::result_type`] is `Int`, so `/` never reaches it; it divides
    /// as floats and truncates, should a caller ask anyway.
    #[inline(always)]
    pub fn apply_int(self, x: i64, y: i64) -> i64 {
        match self {
            BinOp::Add => x.wrapping_add(y),
            BinOp::Sub => x.wrapping_sub(y),
            BinOp::Mul => x.wrapping_mul(y),
            BinOp::Rem => {
                if y == 0 {
                    0
                } else {
                    x.wrapping_rem(y)
                }
            }
            BinOp::Div => (x as f64 / y as f64) as i64,
        }
    }
    #[inline(always)]
    pub fn apply_float<F: ExprFloat>(self, x: F, y: F) -> F {
        match self {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Rem => x % y,
        }
    }
    /// `a op b` on dynamically typed values.
    pub fn apply(self, a: Value, b: Value) -> Value {
        match (self.result_type(a.scalar_type(), b.scalar_type()), a, b) {
            (ScalarType::Int, Value::Int(x), Value::Int(y)) => Value::Int(self.apply_int(x, y)),
            _ => Value::Float(self.apply_float(a.as_f64(), b.as_f64())),
        }
    }
}

impl Func {
    /// Does the function keep integer arguments integer? (`abs`, `min`,
    /// `max`, `clamp`; every other function returns a float.)
    pub fn keeps_int(self) -> bool {
        matches!(self, Func::Abs | Func::Min | Func::Max | Func::Clamp)
    }
    /// Result type for arguments of types `args`.
    pub fn result_type(self, args: &[ScalarType]) -> ScalarType {
        if self.keeps_int() && args.iter().all(|t| *t == ScalarType::Int) {
            ScalarType::Int
        } else {
            ScalarType::Float
        }
    }
    /// Integer semantics, for the functions that [`Func::keeps_int`];
    /// `None` for the others. `args` has [`Func::arity`] elements.
    #[inline(always)]
    pub fn apply_int(self, args: &[i64]) -> Option<i64> {
        Some(match self {
            Func::Abs => args[0].wrapping_abs(),
            Func::Min => args[0].min(args[1]),
            Func::Max => args[0].max(args[1]),
            Func::Clamp => args[0].max(args[1]).min(args[2]),
            _ => return None,
        })
    }
    /// Float semantics (`args` has [`Func::arity`] elements). `alibi_slope`
    /// reads its argument as an integer head index (see [`alibi_slope`]).
    #[inline(always)]
    pub fn apply_float<F: ExprFloat>(self, args: &[F], heads: u32) -> F {
        let x = |k: usize| args[k];
        match self {
            Func::Exp => x(0).exp(),
            Func::Log => x(0).ln(),
            Func::Sqrt => x(0).sqrt(),
            Func::Tanh => x(0).tanh(),
            Func::Abs => x(0).abs(),
            Func::Floor => x(0).floor(),
            Func::Min => x(0).min(x(1)),
            Func::Max => x(0).max(x(1)),
            Func::Pow => x(0).powf(x(1)),
            Func::Clamp => x(0).max(x(1)).min(x(2)),
            Func::AlibiSlope => F::from_f64(alibi_slope(x(0).to_i64(), heads)),
        }
    }
    /// `f(args)` on dynamically typed values.
    pub fn apply(self, args: &[Value], heads: u32) -> Value {
        const MAX_ARITY: usize = 3;
        // Validation fixes the arity; extra arguments are never read.
        let args = &args[..args.len().min(MAX_ARITY)];
        if args.iter().all(|a| matches!(a, Value::Int(_))) {
            let mut ints = [0i64; MAX_ARITY];
            for (d, a) in ints.iter_mut().zip(args) {
                *d = a.as_i64();
            }
            if let Some(r) = self.apply_int(&ints[..args.len()]) {
                return Value::Int(r);
            }
            if self == Func::AlibiSlope {
                // Read the index exactly (a float detour would round huge ones).
                return Value::Float(alibi_slope(ints[0], heads));
            }
        }
        let mut fs = [0f64; MAX_ARITY];
        for (d, a) in fs.iter_mut().zip(args) {
            *d = a.as_f64();
        }
        Value::Float(self.apply_float(&fs[..args.len()], heads))
    }
}

impl Expr {
    /// Evaluates in f64 (integers exact). Division of two integers is float
    /// division, as in the docs; `%` is integer remainder.
    pub fn eval(&self, env: &EvalEnv<'_>) -> Value {
        match self {
            Expr::Int(v) => Value::Int(*v),
            Expr::Float(v) => Value::Float(*v),
            Expr::Var(Var::I) => Value::Int(env.i),
            Expr::Var(Var::J) => Value::Int(env.j),
            Expr::Var(Var::H) => Value::Int(env.h),
            Expr::Var(Var::S) => Value::Float(env.s),
            Expr::Unary(op, a) => match a.eval(env) {
                Value::Int(v) => Value::Int(op.apply_int(v)),
                Value::Float(v) => Value::Float(op.apply_float(v)),
            },
            Expr::Binary(op, a, b) => op.apply(a.eval(env), b.eval(env)),
            Expr::Call(f, args) => {
                // Arity is at most 3 (validation); no allocation per call.
                let mut v = [Value::Int(0); 3];
                let n = args.len().min(3);
                for (d, a) in v.iter_mut().zip(args) {
                    *d = a.eval(env);
                }
                f.apply(&v[..n], env.heads)
            }
            Expr::Index { input, indices } => {
                let idx = Indices::eval(indices, env);
                Value::Float((env.lookup)(input, &idx))
            }
        }
    }

    /// The type of the value [`Expr::eval`] returns (table reads are float).
    pub fn scalar_type(&self) -> ScalarType {
        match self {
            Expr::Int(_) | Expr::Var(Var::I | Var::J | Var::H) => ScalarType::Int,
            Expr::Float(_) | Expr::Var(Var::S) | Expr::Index { .. } => ScalarType::Float,
            Expr::Unary(_, a) => a.scalar_type(),
            Expr::Binary(op, a, b) => op.result_type(a.scalar_type(), b.scalar_type()),
            Expr::Call(f, args) => {
                let ts: Vec<ScalarType> = args.iter().map(Expr::scalar_type).collect();
                f.result_type(&ts)
            }
        }
    }

    /// Evaluates as f64 (convenience for float-typed expressions).
    pub fn eval_f64(&self, env: &EvalEnv<'_>) -> f64 {
        self.eval(env).as_f64()
    }

    /// Does this expression read `var`?
    pub fn uses_var(&self, var: Var) -> bool {
        match self {
            Expr::Var(v) => *v == var,
            Expr::Int(_) | Expr::Float(_) => false,
            Expr::Unary(_, a) => a.uses_var(var),
            Expr::Binary(_, a, b) => a.uses_var(var) || b.uses_var(var),
            Expr::Call(_, args) => args.iter().any(|a| a.uses_var(var)),
            Expr::Index { indices, .. } => indices.iter().any(|a| a.uses_var(var)),
        }
    }

    /// This expression with every `s` replaced by `with`.
    pub fn substitute_s(&self, with: &Expr) -> Expr {
        let sub = |a: &Expr| Box::new(a.substitute_s(with));
        match self {
            Expr::Var(Var::S) => with.clone(),
            Expr::Int(_) | Expr::Float(_) | Expr::Var(_) => self.clone(),
            Expr::Unary(op, a) => Expr::Unary(*op, sub(a)),
            Expr::Binary(op, a, b) => Expr::Binary(*op, sub(a), sub(b)),
            Expr::Call(f, args) => {
                Expr::Call(*f, args.iter().map(|a| a.substitute_s(with)).collect())
            }
            Expr::Index { input, indices } => Expr::Index {
                input: input.clone(),
                indices: indices.iter().map(|a| a.substitute_s(with)).collect(),
            },
        }
    }

    /// Names of the extra inputs this expression reads.
    pub fn inputs_read(&self, out: &mut Vec<String>) {
        match self {
            Expr::Index { input, indices } => {
                if !out.contains(input) {
                    out.push(input.clone());
                }
                indices.iter().for_each(|e| e.inputs_read(out));
            }
            Expr::Unary(_, a) => a.inputs_read(out),
            Expr::Binary(_, a, b) => {
                a.inputs_read(out);
                b.inputs_read(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|e| e.inputs_read(out)),
            _ => {}
        }
    }
}

/// Which keys a query sees. Primitive predicates combine with `&&` / `||`;
/// each primitive has a closed form for whole-block classification, which is
/// what makes block skipping exact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// Every key (no mask).
    All,
    /// `j <= i`.
    Causal,
    /// `|i - j| < size` (combine with `causal` for Mistral-style windows).
    Window {
        size: u64,
    },
    /// `j < prefix || j <= i`: bidirectional prefix, causal after it.
    PrefixLm {
        prefix: u64,
    },
    /// `seg[b, i] == seg[b, j]` for an `i32[batch, seq]` input.
    Segment {
        input: String,
    },
    /// Block layout: with `bi = i / block`, `bj = j / block`:
    /// `|bi - bj| < local || bj < global || bi < global`.
    BlockSparse {
        block: u64,
        local: u64,
        global: u64,
    },
    /// `(i - j) % rate == 0` (LongNet-style dilation; `rate >= 1`).
    Dilated {
        rate: u64,
    },
    And(Box<Mask>, Box<Mask>),
    Or(Box<Mask>, Box<Mask>),
}

impl Mask {
    /// Does query `i` see key `j`? `seg` returns the segment id of a
    /// position for a named input (only called for `Segment`).
    pub fn allows(&self, i: i64, j: i64, seg: &dyn Fn(&str, i64) -> i64) -> bool {
        match self {
            Mask::All => true,
            Mask::Causal => j <= i,
            Mask::Window { size } => (i - j).unsigned_abs() < *size,
            Mask::PrefixLm { prefix } => j < *prefix as i64 || j <= i,
            Mask::Segment { input } => seg(input, i) == seg(input, j),
            Mask::BlockSparse {
                block,
                local,
                global,
            } => {
                let b = *block as i64;
                let (bi, bj) = (i / b, j / b);
                (bi - bj).unsigned_abs() < *local || bj < *global as i64 || bi < *global as i64
            }
            Mask::Dilated { rate } => (i - j).rem_euclid(*rate as i64) == 0,
            Mask::And(a, b) => a.allows(i, j, seg) && b.allows(i, j, seg),
            Mask::Or(a, b) => a.allows(i, j, seg) || b.allows(i, j, seg),
        }
    }

    /// True when every allowed pair has `j <= i` (needed by decay and the
    /// chunkwise state form).
    pub fn implies_causal(&self) -> bool {
        match self {
            Mask::Causal => true,
            Mask::And(a, b) => a.implies_causal() || b.implies_causal(),
            Mask::Or(a, b) => a.implies_causal() && b.implies_causal(),
            _ => false,
        }
    }

    /// Names of the segment-id inputs this mask reads.
    pub fn segment_inputs(&self, out: &mut Vec<String>) {
        match self {
            Mask::Segment { input } if !out.contains(input) => out.push(input.clone()),
            Mask::And(a, b) | Mask::Or(a, b) => {
                a.segment_inputs(out);
                b.segment_inputs(out);
            }
            _ => {}
        }
    }
}

/// Decay between key j and query i: `D(i, j) = prod_{l=j+1..i} gamma_l`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    None,
    /// Fixed gamma per head, an expression of `h` only (RetNet).
    PerHead(Expr),
    /// Per-token gate input `f32[batch, seq, heads]` holding gamma_l in (0, 1] (GLA, Mamba-2/SSD).
    Gate {
        input: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// `y_i = sum_j exp(a - m_i) v_j / sum_j exp(a - m_i)`.
    Softmax,
    /// `y_i = sum_j a v_j / (sum_j a + eps)`.
    Sum { eps: f64 },
    /// `y_i = sum_j a v_j`.
    None,
}

/// The family decides which kernel template and which CPU algorithm apply.
/// Derived by validation, never written by users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Softmax normalisation (FlashAttention-style online softmax).
    Softmax,
    /// Feature-map dot products, no decay, sum/none normalisation.
    Linear,
    /// Fixed per-head decay (RetNet).
    Retention,
    /// Per-token gated decay (GLA, Mamba-2/SSD).
    Gated,
    /// Long convolution with an input filter (Hyena, S4).
    Convolution,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Softmax => "softmax",
            Family::Linear => "linear",
            Family::Retention => "retention",
            Family::Gated => "gated",
            Family::Convolution => "convolution",
        }
    }
}

/// A validated token-mixer specification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerSpec {
    pub name: String,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads; divides `heads` (GQA/MQA). Query head h reads kv head
    /// `h / (heads / kv_heads)`.
    pub kv_heads: u32,
    /// d_k: width of q and k.
    pub head_dim: u32,
    /// d_v: width of v and of the output.
    pub value_dim: u32,
    pub dtype: DType,
    /// Extra inputs, in declaration order.
    pub inputs: Vec<InputDecl>,
    pub score: Score,
    /// Added to the score: `s = scale * <phi q, psi k> + bias`.
    pub bias: Option<Expr>,
    /// Applied to the biased score: `t = T(s)`.
    pub transform: Option<Expr>,
    pub mask: Mask,
    pub decay: Decay,
    pub norm: Norm,
    pub family: Family,
}

impl MixerSpec {
    /// Query heads per kv head.
    pub fn group_size(&self) -> u32 {
        self.heads / self.kv_heads
    }
    /// kv head read by query head `h`.
    pub fn kv_head_of(&self, h: u32) -> u32 {
        h / self.group_size()
    }
    pub fn input(&self, name: &str) -> Option<&InputDecl> {
        self.inputs.iter().find(|d| d.name == name)
    }
    /// Concrete shape of an extra input for a run of `batch` sequences of length `seq`.
    pub fn input_shape(&self, decl: &InputDecl, batch: usize, seq: usize) -> Vec<usize> {
        decl.dims
            .iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::Seq => seq,
                Dim::Heads => self.heads as usize,
                Dim::KvHeads => self.kv_heads as usize,
                Dim::Fixed(n) => *n as usize,
            })
            .collect()
    }
    /// Stable JSON of the spec (for hashing into cache keys).
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("MixerSpec serialises")
    }
    /// Named shapes of all tensors a run reads, `[batch, seq, heads, dim]` for
    /// q/k/v (the output `o` is `[batch, seq, heads, value_dim]`).
    pub fn tensor_shapes(&self, batch: usize, seq: usize) -> BTreeMap<String, Vec<usize>> {
        self.tensor_shapes_kv(batch, seq, seq)
    }
    /// [`MixerSpec::tensor_shapes`] when the keys have their own length
    /// `kv_seq`: q is `[batch, seq, heads, head_dim]`, k and v are
    /// `[batch, kv_seq, kv_heads, dim]`, and the `seq` axis of an extra input
    /// (gates, segment ids, filters, positional tables) spans the key
    /// positions, so it has `kv_seq` entries.
    pub fn tensor_shapes_kv(
        &self,
        batch: usize,
        seq: usize,
        kv_seq: usize,
    ) -> BTreeMap<String, Vec<usize>> {
        let mut m = BTreeMap::new();
        let (h, kvh) = (self.heads as usize, self.kv_heads as usize);
        let (dk, dv) = (self.head_dim as usize, self.value_dim as usize);
        // The convolution family reads only v (and its filter).
        if matches!(self.score, Score::Dot { .. }) {
            m.insert("q".into(), vec![batch, seq, h, dk]);
            m.insert("k".into(), vec![batch, kv_seq, kvh, dk]);
        }
        m.insert("v".into(), vec![batch, kv_seq, kvh, dv]);
        for d in &self.inputs {
            m.insert(d.name.clone(), self.input_shape(d, batch, kv_seq));
        }
        m
    }
    /// The first extra input indexed by position (a `seq` axis), if any:
    /// such inputs tie the queries to the key positions.
    pub fn positional_input(&self) -> Option<&InputDecl> {
        self.inputs.iter().find(|d| d.dims.contains(&Dim::Seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_eval(e: &Expr, i: i64, j: i64, s: f64) -> Value {
        let lookup = |_: &str, idx: &[i64]| idx.iter().sum::<i64>() as f64 * 0.5;
        e.eval(&EvalEnv {
            i,
            j,
            h: 3,
            s,
            heads: 8,
            lookup: &lookup,
        })
    }

    /// `scalar_type` predicts the variant `eval` returns, for every operator
    /// and function over int and float operands (the CPU backend compiles
    /// typed registers from it).
    #[test]
    fn scalar_type_matches_eval() {
        let leaves = [
            Expr::Int(-7),
            Expr::Float(2.5),
            Expr::Var(Var::I),
            Expr::Var(Var::S),
            Expr::Index {
                input: "t".into(),
                indices: vec![Expr::Var(Var::J)],
            },
        ];
        let mut exprs: Vec<Expr> = leaves.to_vec();
        for a in &leaves {
            exprs.push(Expr::Unary(UnOp::Neg, Box::new(a.clone())));
            for b in &leaves {
                for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Rem] {
                    exprs.push(Expr::Binary(op, Box::new(a.clone()), Box::new(b.clone())));
                }
                for f in [Func::Min, Func::Max, Func::Pow] {
                    exprs.push(Expr::Call(f, vec![a.clone(), b.clone()]));
                }
                exprs.push(Expr::Call(
                    Func::Clamp,
                    vec![a.clone(), b.clone(), a.clone()],
                ));
            }
            for f in [
                Func::Exp,
                Func::Log,
                Func::Sqrt,
                Func::Tanh,
                Func::Abs,
                Func::Floor,
                Func::AlibiSlope,
            ] {
                exprs.push(Expr::Call(f, vec![a.clone()]));
            }
        }
        for e in &exprs {
            let v = env_eval(e, 5, 2, 1.25);
            assert_eq!(v.scalar_type(), e.scalar_type(), "{e:?} -> {v:?}");
        }
    }

    /// The integer edge cases never panic and keep the documented results.
    #[test]
    fn integer_semantics_wrap_and_never_panic() {
        assert_eq!(UnOp::Neg.apply_int(i64::MIN), i64::MIN);
        assert_eq!(BinOp::Rem.apply_int(7, 0), 0);
        assert_eq!(BinOp::Rem.apply_int(-7, 3), -1);
        assert_eq!(BinOp::Rem.apply_int(i64::MIN, -1), 0);
        assert_eq!(BinOp::Add.apply_int(i64::MAX, 1), i64::MIN);
        assert_eq!(Func::Abs.apply_int(&[i64::MIN]), Some(i64::MIN));
        assert_eq!(Func::Clamp.apply_int(&[9, -1, 4]), Some(4));
        assert_eq!(Func::Exp.apply_int(&[1]), None);
        // Integer `/` is float division.
        assert_eq!(
            BinOp::Div.apply(Value::Int(7), Value::Int(2)),
            Value::Float(3.5)
        );
        // Float semantics are the same in f32 and f64.
        assert_eq!(Func::Clamp.apply_float(&[5.0f32, -1.0, 2.0], 8), 2.0);
        assert_eq!(Func::AlibiSlope.apply_float(&[0.0f64], 8), 0.5);
        assert_eq!(
            Func::AlibiSlope.apply(&[Value::Int(0)], 8),
            Value::Float(0.5)
        );
        // Extra arguments of a hand-built call are ignored, not a panic.
        let v = [Value::Int(1), Value::Int(2), Value::Int(3), Value::Int(4)];
        assert_eq!(Func::Min.apply(&v, 8), Value::Int(1));
    }
}

// Spec syntax: what a user wrote (up to parentheses and spacing), for
// messages that name a part of the spec.

impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mask::All => f.write_str("all"),
            Mask::Causal => f.write_str("causal"),
            Mask::Window { size } => write!(f, "window({size})"),
            Mask::PrefixLm { prefix } => write!(f, "prefix_lm({prefix})"),
            Mask::Segment { input } => write!(f, "segment({input})"),
            Mask::BlockSparse {
                block,
                local,
                global,
            } => write!(
                f,
                "block_sparse(block = {block}, local = {local}, global = {global})"
            ),
            Mask::Dilated { rate } => write!(f, "dilated({rate})"),
            // `&&` binds tighter than `||`: parenthesise an `||` under `&&`.
            Mask::And(a, b) => {
                let side = |m: &Mask| match m {
                    Mask::Or(..) => format!("({m})"),
                    m => m.to_string(),
                };
                write!(f, "{} && {}", side(a), side(b))
            }
            Mask::Or(a, b) => write!(f, "{a} || {b}"),
        }
    }
}

impl fmt::Display for Norm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Norm::Softmax => f.write_str("softmax"),
            Norm::Sum { eps } => write!(f, "sum(eps = {eps:e})"),
            Norm::None => f.write_str("none"),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Operands that are themselves operations get parentheses: exact,
        // if sometimes more than the user wrote.
        let operand = |e: &Expr| match e {
            Expr::Binary(..) | Expr::Unary(..) => format!("({e})"),
            Expr::Float(x) if *x < 0.0 => format!("({e})"),
            Expr::Int(x) if *x < 0 => format!("({e})"),
            e => e.to_string(),
        };
        match self {
            Expr::Int(v) => write!(f, "{v}"),
            Expr::Float(v) => {
                let s = format!("{v:?}");
                f.write_str(&s)
            }
            Expr::Var(v) => f.write_str(match v {
                Var::I => "i",
                Var::J => "j",
                Var::H => "h",
                Var::S => "s",
            }),
            Expr::Unary(UnOp::Neg, a) => write!(f, "-{}", operand(a)),
            Expr::Binary(op, a, b) => {
                let op = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                    BinOp::Rem => "%",
                };
                write!(f, "{} {op} {}", operand(a), operand(b))
            }
            Expr::Call(func, args) => {
                let args: Vec<String> = args.iter().map(Expr::to_string).collect();
                write!(f, "{}({})", func.name(), args.join(", "))
            }
            Expr::Index { input, indices } => {
                f.write_str(input)?;
                for i in indices {
                    write!(f, "[{i}]")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;

    /// Spec syntax round-trips through the parser.
    #[test]
    fn masks_and_expressions_print_as_spec_syntax() {
        let src = "mixer m { heads = 4; head_dim = 8; input rel: f32[heads, 128]; \
                   input doc: i32[batch, seq]; \
                   mask = (causal || prefix_lm(16)) && window(64) && segment(doc); \
                   bias = -alibi_slope(h) * (i - j) + rel[h][min(abs(i - j) % 300, 127)]; \
                   transform = 50.0 * tanh(s / 50.0); }";
        let spec = crate::parse_str(src).unwrap();
        let mask = spec.mask.to_string();
        assert_eq!(
            mask,
            "(causal || prefix_lm(16)) && window(64) && segment(doc)"
        );
        let bias = spec.bias.as_ref().unwrap().to_string();
        let again = crate::parse_str(&format!(
            "mixer m {{ heads = 4; head_dim = 8; input rel: f32[heads, 128]; \
             input doc: i32[batch, seq]; mask = {mask}; bias = {bias}; \
             transform = {}; }}",
            spec.transform.as_ref().unwrap()
        ))
        .unwrap();
        assert_eq!(again, spec);
        assert_eq!(Norm::Sum { eps: 1e-6 }.to_string(), "sum(eps = 1e-6)");
    }
}
