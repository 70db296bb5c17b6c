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
    /// Batch index (which sequence of the batch).
    B,
    /// Number of query positions of the call (the whole sequence, across ranks).
    Seq,
    /// Number of key positions (`seq` plus any cached prefix when decoding).
    KvSeq,
}

impl Var {
    /// The spelling in specs.
    pub fn name(self) -> &'static str {
        match self {
            Var::I => "i",
            Var::J => "j",
            Var::H => "h",
            Var::S => "s",
            Var::B => "b",
            Var::Seq => "seq",
            Var::KvSeq => "kv_seq",
        }
    }
    /// Every variable but `s` is an integer.
    pub fn scalar_type(self) -> ScalarType {
        if self == Var::S {
            ScalarType::Float
        } else {
            ScalarType::Int
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnOp {
    Neg,
    /// Logical not of a boolean.
    Not,
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
    /// Comparisons: numbers in, a boolean out.
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    /// Logical and / or of booleans.
    And,
    Or,
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
    Sin,
    Cos,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `select(c, a, b)`: `a` where the boolean `c` holds, else `b`.
    Select,
    /// `int(x)`: float to integer, truncating toward zero (as a C cast or
    /// `torch.Tensor.long()`); integers pass through.
    Int,
    /// `div(a, b)`: integer floor division (Python's `a // b`); `div(a, 0) = 0`.
    Div,
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
            Func::Sin => "sin",
            Func::Cos => "cos",
            Func::Sigmoid => "sigmoid",
            Func::Select => "select",
            Func::Int => "int",
            Func::Div => "div",
        }
    }
    pub fn arity(self) -> usize {
        match self {
            Func::Min | Func::Max | Func::Pow | Func::Div => 2,
            Func::Clamp | Func::Select => 3,
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
            "sin" => Func::Sin,
            "cos" => Func::Cos,
            "sigmoid" => Func::Sigmoid,
            "select" => Func::Select,
            "int" => Func::Int,
            "div" => Func::Div,
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
    /// Comparisons and `&&`, `||`, `!`: a mask, or the condition of `select`.
    /// Held as the integer 0 or 1 during evaluation.
    Bool,
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
    /// Batch index, query and key sequence lengths.
    pub b: i64,
    pub seq: i64,
    pub kv_seq: i64,
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
            b: 0,
            seq: 0,
            kv_seq: 0,
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

/// `a // b` rounding toward negative infinity, as Python's; `b = 0` gives 0
/// (like `%`), and the one overflowing case wraps.
#[inline(always)]
pub fn floor_div(a: i64, b: i64) -> i64 {
    if b == 0 {
        return 0;
    }
    let q = a.wrapping_div(b);
    if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
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
    fn sin(self) -> Self;
    fn cos(self) -> Self;
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
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline(always)]
            fn cos(self) -> Self {
                <$t>::cos(self)
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
            UnOp::Not => i64::from(a == 0),
        }
    }
    /// Float semantics (`!` of a float tests it against zero, as the
    /// integer form does; the checker only lets it see booleans).
    #[inline(always)]
    pub fn apply_float<F: ExprFloat>(self, a: F) -> F {
        match self {
            UnOp::Neg => -a,
            UnOp::Not => F::from_i64(i64::from(a == F::from_i64(0))),
        }
    }
    /// Type of `op a`.
    pub fn result_type(self, a: ScalarType) -> ScalarType {
        match self {
            UnOp::Neg => a,
            UnOp::Not => ScalarType::Bool,
        }
    }
}

impl BinOp {
    /// Comparisons and logic give a boolean.
    pub fn is_boolean(self) -> bool {
        matches!(
            self,
            BinOp::Lt
                | BinOp::Le
                | BinOp::Gt
                | BinOp::Ge
                | BinOp::Eq
                | BinOp::Ne
                | BinOp::And
                | BinOp::Or
        )
    }
    /// The spelling in specs.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
    /// Type of `a op b`: integer when both are, except `/` (always float);
    /// comparisons and logic are boolean.
    pub fn result_type(self, a: ScalarType, b: ScalarType) -> ScalarType {
        if self.is_boolean() {
            return ScalarType::Bool;
        }
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
            BinOp::Lt => i64::from(x < y),
            BinOp::Le => i64::from(x <= y),
            BinOp::Gt => i64::from(x > y),
            BinOp::Ge => i64::from(x >= y),
            BinOp::Eq => i64::from(x == y),
            BinOp::Ne => i64::from(x != y),
            BinOp::And => i64::from(x != 0 && y != 0),
            BinOp::Or => i64::from(x != 0 || y != 0),
        }
    }
    /// Float semantics; comparisons and logic give 0 or 1.
    #[inline(always)]
    pub fn apply_float<F: ExprFloat>(self, x: F, y: F) -> F {
        let b = |t: bool| F::from_i64(i64::from(t));
        let zero = F::from_i64(0);
        match self {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Rem => x % y,
            BinOp::Lt => b(x < y),
            BinOp::Le => b(x <= y),
            BinOp::Gt => b(x > y),
            BinOp::Ge => b(x >= y),
            BinOp::Eq => b(x == y),
            BinOp::Ne => b(x != y),
            BinOp::And => b(x != zero && y != zero),
            BinOp::Or => b(x != zero || y != zero),
        }
    }
    /// `a op b` on dynamically typed values (booleans are the integers 0 and 1).
    pub fn apply(self, a: Value, b: Value) -> Value {
        if self.is_boolean() {
            return Value::Int(match (a, b) {
                (Value::Int(x), Value::Int(y)) => self.apply_int(x, y),
                _ => i64::from(self.apply_float(a.as_f64(), b.as_f64()) != 0.0),
            });
        }
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
    /// Result type for arguments of types `args` (booleans count as integers).
    pub fn result_type(self, args: &[ScalarType]) -> ScalarType {
        let int = |t: &ScalarType| *t != ScalarType::Float;
        match self {
            Func::Int | Func::Div => return ScalarType::Int,
            Func::Select => {
                return if args.len() == 3 && args[1..].iter().all(|t| *t == ScalarType::Bool) {
                    ScalarType::Bool
                } else if args.len() == 3 && args[1..].iter().all(int) {
                    ScalarType::Int
                } else {
                    ScalarType::Float
                }
            }
            _ => {}
        }
        if self.keeps_int() && args.iter().all(int) {
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
            Func::Select => {
                if args[0] != 0 {
                    args[1]
                } else {
                    args[2]
                }
            }
            Func::Int => args[0],
            Func::Div => floor_div(args[0], args[1]),
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
            Func::Sin => x(0).sin(),
            Func::Cos => x(0).cos(),
            Func::Sigmoid => {
                let one = F::from_i64(1);
                one / (one + (-x(0)).exp())
            }
            Func::Select => {
                if x(0) != F::from_i64(0) {
                    x(1)
                } else {
                    x(2)
                }
            }
            // Integer-valued, held in a float lane.
            Func::Int => F::from_i64(x(0).to_i64()),
            Func::Div => F::from_i64(floor_div(x(0).to_i64(), x(1).to_i64())),
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
        match self {
            Func::Int => return Value::Int(args[0].as_i64()),
            Func::Div => return Value::Int(floor_div(args[0].as_i64(), args[1].as_i64())),
            Func::Select if args.len() == 3 => {
                return if args[0].as_f64() != 0.0 {
                    args[1]
                } else {
                    args[2]
                };
            }
            _ => {}
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
            Expr::Var(Var::B) => Value::Int(env.b),
            Expr::Var(Var::Seq) => Value::Int(env.seq),
            Expr::Var(Var::KvSeq) => Value::Int(env.kv_seq),
            Expr::Unary(UnOp::Not, a) => Value::Int(i64::from(a.eval(env).as_f64() == 0.0)),
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
            Expr::Int(_) => ScalarType::Int,
            Expr::Var(v) => v.scalar_type(),
            Expr::Float(_) | Expr::Index { .. } => ScalarType::Float,
            Expr::Unary(op, a) => op.result_type(a.scalar_type()),
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

    /// Reads no variable and no table: a constant.
    pub fn is_constant(&self) -> bool {
        match self {
            Expr::Int(_) | Expr::Float(_) => true,
            Expr::Var(_) | Expr::Index { .. } => false,
            Expr::Unary(_, a) => a.is_constant(),
            Expr::Binary(_, a, b) => a.is_constant() && b.is_constant(),
            Expr::Call(_, args) => args.iter().all(Expr::is_constant),
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
    /// A boolean expression of `b`, `h`, `i`, `j`, `seq`, `kv_seq` and
    /// tables (FlexAttention's `mask_mod`). Tiles are classified by bounding
    /// the expression over the tile ([`crate::bounds`]); where nothing can be
    /// proved the tile is computed and masked per element.
    Expr(Expr),
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
    /// Whether every pair this mask allows, `other` allows too, as far as
    /// the built-in masks' definitions prove it (`false` when unknown):
    /// anything is within `all`; `causal` within `prefix_lm(n)`; a window,
    /// prefix or dilation within a wider one; `a && b` within `a`; `a`
    /// within `a || b`; a mask within itself.
    pub fn within(&self, other: &Mask) -> bool {
        use Mask::*;
        if self == other {
            return true;
        }
        match (self, other) {
            (_, All) => true,
            (_, Dilated { rate: 1 }) => true,
            (Or(a, b), _) => a.within(other) && b.within(other),
            (And(a, b), _) if a.within(other) || b.within(other) => true,
            (_, And(a, b)) => self.within(a) && self.within(b),
            (_, Or(a, b)) => self.within(a) || self.within(b),
            (Causal, PrefixLm { .. }) => true,
            (Window { size }, Causal | PrefixLm { .. }) => *size <= 1,
            (Window { size: a }, Window { size: b }) => a <= b,
            (PrefixLm { prefix: a }, PrefixLm { prefix: b }) => a <= b,
            (Dilated { rate: a }, Dilated { rate: b }) => a % b == 0,
            _ => false,
        }
    }

    /// Does query `i` see key `j`? `seg` returns the segment id of a
    /// position for a named input (only called for `Segment`).
    /// `env` gives the pair and what an expression mask reads (`b`, `h`,
    /// the lengths, tables); the built-in masks read only `env.i`, `env.j`.
    pub fn allows(&self, env: &EvalEnv<'_>, seg: &dyn Fn(&str, i64) -> i64) -> bool {
        let (i, j) = (env.i, env.j);
        match self {
            Mask::All => true,
            Mask::Expr(e) => e.eval(env).as_f64() != 0.0,
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
            Mask::And(a, b) => a.allows(env, seg) && b.allows(env, seg),
            Mask::Or(a, b) => a.allows(env, seg) || b.allows(env, seg),
        }
    }

    /// `allows` for a mask known to read nothing but `i` and `j` (tests,
    /// built-in masks without segments).
    pub fn allows_at(&self, i: i64, j: i64) -> bool {
        let lookup = |_: &str, _: &[i64]| 0.0;
        let mut env = EvalEnv::for_head(0, 1, &lookup);
        env.i = i;
        env.j = j;
        self.allows(&env, &|_, _| 0)
    }

    /// The whole mask as one condition, for evaluating it over many pairs
    /// at once; `None` when it reads segment ids (data compared by name,
    /// not an expression). Equivalent to [`Mask::allows`] at every pair of
    /// non-negative positions.
    pub fn to_expr(&self) -> Option<Expr> {
        let (i, j) = (Expr::Var(Var::I), Expr::Var(Var::J));
        let bin = |op, a: Expr, b: Expr| Expr::Binary(op, Box::new(a), Box::new(b));
        let int = |v: u64| Expr::Int(v.min(i64::MAX as u64) as i64);
        let d = || bin(BinOp::Sub, i.clone(), j.clone());
        Some(match self {
            Mask::All => bin(BinOp::Eq, Expr::Int(0), Expr::Int(0)),
            Mask::Causal => bin(BinOp::Le, j.clone(), i.clone()),
            Mask::Expr(e) => e.clone(),
            Mask::Window { size } => bin(BinOp::Lt, Expr::Call(Func::Abs, vec![d()]), int(*size)),
            Mask::PrefixLm { prefix } => bin(
                BinOp::Or,
                bin(BinOp::Lt, j.clone(), int(*prefix)),
                bin(BinOp::Le, j.clone(), i.clone()),
            ),
            Mask::Segment { .. } => return None,
            Mask::BlockSparse {
                block,
                local,
                global,
            } => {
                let blk = |x: &Expr| Expr::Call(Func::Div, vec![x.clone(), int(*block)]);
                let (bi, bj) = (blk(&i), blk(&j));
                bin(
                    BinOp::Or,
                    bin(
                        BinOp::Or,
                        bin(
                            BinOp::Lt,
                            Expr::Call(Func::Abs, vec![bin(BinOp::Sub, bi.clone(), bj.clone())]),
                            int(*local),
                        ),
                        bin(BinOp::Lt, bj, int(*global)),
                    ),
                    bin(BinOp::Lt, bi, int(*global)),
                )
            }
            Mask::Dilated { rate } => {
                bin(BinOp::Eq, bin(BinOp::Rem, d(), int(*rate)), Expr::Int(0))
            }
            Mask::And(a, b) => bin(BinOp::And, a.to_expr()?, b.to_expr()?),
            Mask::Or(a, b) => bin(BinOp::Or, a.to_expr()?, b.to_expr()?),
        })
    }

    /// Is any part of the mask a condition (an expression)?
    pub fn has_expr(&self) -> bool {
        match self {
            Mask::Expr(_) => true,
            Mask::And(a, b) | Mask::Or(a, b) => a.has_expr() || b.has_expr(),
            _ => false,
        }
    }

    /// Does the mask read `var` (only expression masks read anything but `i`, `j`)?
    pub fn uses_var(&self, var: Var) -> bool {
        match self {
            Mask::Expr(e) => e.uses_var(var),
            Mask::And(a, b) | Mask::Or(a, b) => a.uses_var(var) || b.uses_var(var),
            _ => false,
        }
    }

    /// Names of the tables the mask's expressions read.
    pub fn inputs_read(&self, out: &mut Vec<String>) {
        match self {
            Mask::Expr(e) => e.inputs_read(out),
            Mask::And(a, b) | Mask::Or(a, b) => {
                a.inputs_read(out);
                b.inputs_read(out);
            }
            _ => {}
        }
    }

    /// True when every allowed pair has `j <= i` (needed by decay and the
    /// chunkwise state form).
    pub fn implies_causal(&self) -> bool {
        match self {
            Mask::Causal => true,
            Mask::Expr(e) => expr_implies_causal(e),
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

/// A conjunction with a conjunct `j <= i`, `j < i`, `i >= j` or `i > j`.
fn expr_implies_causal(e: &Expr) -> bool {
    e.conjuncts()
        .iter()
        .any(|c| c.causal_comparison().is_some())
}

impl Expr {
    /// The operands of a chain of `&&` (the expression itself when it is
    /// not one), left to right.
    pub fn conjuncts(&self) -> Vec<&Expr> {
        match self {
            Expr::Binary(BinOp::And, a, b) => {
                let mut v = a.conjuncts();
                v.extend(b.conjuncts());
                v
            }
            e => vec![e],
        }
    }

    /// `Some(strict)` when this is `j <= i` / `i >= j` (`false`) or
    /// `j < i` / `i > j` (`true`): a comparison that allows only keys at or
    /// before the query.
    pub fn causal_comparison(&self) -> Option<bool> {
        let (i, j) = (&Expr::Var(Var::I), &Expr::Var(Var::J));
        match self {
            Expr::Binary(op @ (BinOp::Le | BinOp::Lt), a, b) if **a == *j && **b == *i => {
                Some(*op == BinOp::Lt)
            }
            Expr::Binary(op @ (BinOp::Ge | BinOp::Gt), a, b) if **a == *i && **b == *j => {
                Some(*op == BinOp::Gt)
            }
            _ => None,
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
    /// The dot score's scale is the default (`1/sqrt(head_dim)` under
    /// softmax, else 1), not written in the spec: it follows `head_dim`
    /// when [`MixerSpec::with_shape`] changes it.
    #[serde(default)]
    pub default_scale: bool,
}

/// New head counts or widths for a spec ([`MixerSpec::with_shape`]); `None`
/// keeps the spec's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub heads: Option<u32>,
    pub kv_heads: Option<u32>,
    pub head_dim: Option<u32>,
    pub value_dim: Option<u32>,
}

impl Shape {
    /// The keys [`Shape::set`] takes.
    pub const KEYS: &'static [&'static str] = &["heads", "kv_heads", "head_dim", "value_dim"];

    /// Sets `key` (one of [`Shape::KEYS`]) to `value`, checked against the
    /// language's limits.
    pub fn set(&mut self, key: &str, value: u64) -> Result<(), ShapeError> {
        let (slot, max) = match key {
            "heads" => (&mut self.heads, crate::check::MAX_HEADS),
            "kv_heads" => (&mut self.kv_heads, crate::check::MAX_HEADS),
            "head_dim" => (&mut self.head_dim, crate::check::MAX_HEAD_DIM),
            "value_dim" => (&mut self.value_dim, crate::check::MAX_HEAD_DIM),
            _ => return Err(ShapeError::UnknownKey(key.to_string())),
        };
        if value == 0 || value > max {
            return Err(ShapeError::OutOfRange {
                key: key.to_string(),
                value,
                max,
            });
        }
        *slot = Some(value as u32);
        Ok(())
    }
}

/// Why [`MixerSpec::with_shape`] or [`Shape::set`] refused a shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    #[error("unknown key `{0}`; the keys are heads, kv_heads, head_dim, value_dim")]
    UnknownKey(String),
    #[error("{key} = {value} is out of range: it must be between 1 and {max}")]
    OutOfRange { key: String, value: u64, max: u64 },
    #[error("kv_heads = {kv_heads} must divide heads = {heads}")]
    KvHeads { heads: u32, kv_heads: u32 },
    #[error(
        "with {heads} heads the decay evaluates to {gamma} for head {head}; it must lie in (0, 1]"
    )]
    Decay { heads: u32, head: u32, gamma: f64 },
}

/// What a parsed spec always satisfies and a hand-built `MixerSpec` may
/// break ([`MixerSpec::check_invariants`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvariantError {
    #[error("mixer `{0}`: {1}")]
    Shape(String, ShapeError),
    #[error("mixer `{0}`: decay and filter scores need a mask that implies causal (j <= i)")]
    NeedsCausal(String),
    #[error("mixer `{0}`: reads input `{1}` that it does not declare")]
    Undeclared(String, String),
}

impl MixerSpec {
    /// The spec with other head counts or widths (`shape`), one spec file
    /// serving a small test and a model-sized run: the spec's arithmetic
    /// is the same, only tensor sizes change. Ties are kept: without its
    /// own value, `value_dim` follows `head_dim` where the spec had them
    /// equal, `kv_heads` follows `heads` likewise; a default scale follows
    /// `head_dim`. What depends on the head count is checked again
    /// (`kv_heads` divides `heads`; a per-head decay stays in (0, 1]).
    pub fn with_shape(&self, shape: Shape) -> Result<MixerSpec, ShapeError> {
        let mut s = self.clone();
        s.heads = shape.heads.unwrap_or(self.heads);
        s.head_dim = shape.head_dim.unwrap_or(self.head_dim);
        s.kv_heads = match shape.kv_heads {
            Some(k) => k,
            None if self.kv_heads == self.heads => s.heads,
            None => self.kv_heads,
        };
        s.value_dim = match shape.value_dim {
            Some(v) => v,
            None if self.value_dim == self.head_dim => s.head_dim,
            None => self.value_dim,
        };
        s.check_shape()?;
        if let Decay::PerHead(gamma) = &s.decay {
            let lookup = |_: &str, _: &[i64]| 0.0;
            for h in 0..s.heads {
                let g = gamma.eval_f64(&EvalEnv::for_head(h as i64, s.heads, &lookup));
                if !(g > 0.0 && g <= 1.0) {
                    return Err(ShapeError::Decay {
                        heads: s.heads,
                        head: h,
                        gamma: g,
                    });
                }
            }
        }
        if let (true, Score::Dot { scale, .. }) = (s.default_scale, &mut s.score) {
            *scale = if s.norm == Norm::Softmax {
                1.0 / f64::from(s.head_dim).sqrt()
            } else {
                1.0
            };
        }
        Ok(s)
    }

    /// Head counts and widths within the language's limits, `kv_heads`
    /// dividing `heads`.
    fn check_shape(&self) -> Result<(), ShapeError> {
        let (heads, dims) = (crate::check::MAX_HEADS, crate::check::MAX_HEAD_DIM);
        for (key, value, max) in [
            ("heads", self.heads, heads),
            ("kv_heads", self.kv_heads, heads),
            ("head_dim", self.head_dim, dims),
            ("value_dim", self.value_dim, dims),
        ] {
            if value == 0 || u64::from(value) > max {
                return Err(ShapeError::OutOfRange {
                    key: key.to_string(),
                    value: u64::from(value),
                    max,
                });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(ShapeError::KvHeads {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        Ok(())
    }

    /// What validation guarantees for parsed specs but a hand-built one may
    /// break, checked by every backend before it indexes anything: the
    /// shape ([`MixerSpec::with_shape`]'s limits), decay and filter scores
    /// under a mask that implies causal, every input read declared.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let name = || self.name.clone();
        self.check_shape()
            .map_err(|e| InvariantError::Shape(name(), e))?;
        let causal_only =
            !matches!(self.decay, Decay::None) || matches!(self.score, Score::Filter { .. });
        if causal_only && !self.mask.implies_causal() {
            return Err(InvariantError::NeedsCausal(name()));
        }
        let mut read = Vec::new();
        for e in [&self.bias, &self.transform].into_iter().flatten() {
            e.inputs_read(&mut read);
        }
        match &self.decay {
            Decay::PerHead(e) => e.inputs_read(&mut read),
            Decay::Gate { input } => read.push(input.clone()),
            Decay::None => {}
        }
        if let Score::Filter { input } = &self.score {
            read.push(input.clone());
        }
        self.mask.segment_inputs(&mut read);
        self.mask.inputs_read(&mut read);
        match read.into_iter().find(|n| self.input(n).is_none()) {
            Some(input) => Err(InvariantError::Undeclared(name(), input)),
            None => Ok(()),
        }
    }

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

    /// Every built-in mask as a condition allows exactly the pairs it does.
    #[test]
    fn builtin_masks_as_conditions_agree_with_allows() {
        let masks = [
            Mask::All,
            Mask::Causal,
            Mask::Window { size: 3 },
            Mask::PrefixLm { prefix: 5 },
            Mask::BlockSparse {
                block: 4,
                local: 2,
                global: 1,
            },
            Mask::BlockSparse {
                block: 3,
                local: 0,
                global: 2,
            },
            Mask::Dilated { rate: 3 },
            Mask::Or(
                Box::new(Mask::And(
                    Box::new(Mask::Causal),
                    Box::new(Mask::Window { size: 4 }),
                )),
                Box::new(Mask::Dilated { rate: 5 }),
            ),
        ];
        for m in masks {
            let e = m.to_expr().unwrap();
            for i in 0..30 {
                for j in 0..30 {
                    let lookup = |_: &str, _: &[i64]| 0.0;
                    let mut env = EvalEnv::for_head(0, 1, &lookup);
                    (env.i, env.j) = (i, j);
                    assert_eq!(
                        e.eval(&env).as_f64() != 0.0,
                        m.allows(&env, &|_, _| 0),
                        "{m} at ({i}, {j})"
                    );
                }
            }
        }
        assert!(Mask::Segment { input: "d".into() }.to_expr().is_none());
    }

    fn env_eval(e: &Expr, i: i64, j: i64, s: f64) -> Value {
        let lookup = |_: &str, idx: &[i64]| idx.iter().sum::<i64>() as f64 * 0.5;
        e.eval(&EvalEnv {
            i,
            j,
            h: 3,
            s,
            b: 0,
            seq: 0,
            kv_seq: 0,
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
            Mask::Expr(e @ Expr::Binary(BinOp::And | BinOp::Or, ..)) => write!(f, "({e})"),
            Mask::Expr(e) => write!(f, "{e}"),
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
            Expr::Var(v) => f.write_str(v.name()),
            Expr::Unary(UnOp::Neg, a) => write!(f, "-{}", operand(a)),
            Expr::Unary(UnOp::Not, a) => write!(f, "!{}", operand(a)),
            Expr::Binary(op, a, b) => write!(f, "{} {} {}", operand(a), op.symbol(), operand(b)),
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
