//! `mixc-ptxsim`: an interpreter for the PTX that NVRTC produces for mixc's
//! generated kernels. It executes them thread by thread on the CPU, so that
//! the tests can check the kernels' arithmetic (tiling, `mma.sync`
//! fragments, `ldmatrix`, `cp.async` pipelines, online softmax, masks and
//! block skipping) against the f64 reference on a machine with no GPU.
//!
//! This is test machinery, not product: nothing in mixc depends on it
//! except as a dev-dependency. Its user is the CUDA backend's host twin
//! (`runtime/tests/twin/`, compiled into `mixc-runtime`'s unit tests), whose
//! `sim_*` tests compile each generated kernel with NVRTC, parse the PTX
//! ([`Module::parse`]) and launch it ([`Module::launch`]) on the twin's
//! emulated device memory (a [`GlobalMemory`]).
//!
//! Model: every thread runs on its own until it reaches a warp collective
//! (`mma`, `ldmatrix`, `shfl`, `vote`) or a CTA barrier; a collective runs
//! once all live lanes of the warp wait at that same instruction, a barrier
//! once all live threads of the CTA do (anything else is reported as
//! divergence or deadlock). `cp.async` copies land at the issuing thread's
//! `cp.async.wait_group`, not before, so a kernel that reads a stage before
//! waiting reads stale data. Shared memory starts as NaN and every byte
//! records its last writer and reader per barrier interval: a read of
//! another thread's write, or a write over another thread's read or write,
//! with no barrier in between, is reported as a race (`bar.warp.sync`
//! orders only the accesses of its own warp); so is any access to bytes a
//! `cp.async` still has in flight. Threads waiting at different barrier ids
//! are a deadlock. Shared and global accesses are bounds-checked.
//!
//! What it does not model: timing, memory ordering beyond barriers, the
//! exact error of `.approx` instructions (computed exactly here).

mod exec;
mod parse;

pub use exec::{GlobalMemory, LaunchStats};

use std::fmt;

/// An error of parsing or executing PTX, with the PTX line it is about.
#[derive(Debug, Clone)]
pub struct SimError {
    pub(crate) line: u32,
    pub(crate) msg: String,
}

impl SimError {
    fn parse(line: u32, msg: impl Into<String>) -> Self {
        SimError {
            line,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PTX line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for SimError {}

/// A PTX scalar type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    Bf16,
    Bf16x2,
    F32,
    F64,
    Pred,
}

impl Ty {
    fn parse(w: &str) -> Option<Ty> {
        Some(match w.trim_start_matches('.') {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
    fn bytes(self) -> u32 {
        match self {
            Ty::B8 | Ty::U8 | Ty::S8 => 1,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 2,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 => 4,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 8,
            Ty::Pred => 0,
        }
    }
    fn bits(self) -> u32 {
        if self == Ty::Pred {
            1
        } else {
            self.bytes() * 8
        }
    }
    fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    fn float(self) -> bool {
        matches!(self, Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64)
    }
}

/// Special registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    Laneid,
    Warpid,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    Reg(u32),
    /// `!%p` as a source.
    NotPred(u32),
    Imm(u64),
    F32(f32),
    F64(f64),
    Special(Special),
    /// A module variable (its address in its state space).
    Sym(u32),
    /// A kernel parameter (in `ld.param`'s address).
    Param(u32),
    Label(usize),
    /// `[base + off]`; `base` is a register, a variable or a parameter.
    Addr {
        base: Option<Box<Operand>>,
        off: i64,
    },
    /// `{a, b, ...}`, and `d|p` destination pairs.
    Vec(Vec<Operand>),
    /// `_`.
    Sink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Const,
    Param,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Add,
    Sub,
    Mul,
    Mad,
    Fma,
    Div,
    Rem,
    Min,
    Max,
    Abs,
    Neg,
    Not,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    Bfi,
    Bfe,
    Popc,
    Clz,
    Setp(Cmp),
    Selp,
    Mov,
    Cvt,
    Cvta {
        to: bool,
    },
    Ld(Space),
    St(Space),
    CpAsync,
    CpAsyncCommit,
    CpAsyncWait,
    CpAsyncWaitAll,
    Ldmatrix,
    Mma,
    Shfl(ShflMode),
    Vote(VoteMode),
    Bar,
    BarRed(RedOp),
    BarWarp,
    Atom(Space, AtomOp),
    Red(Space, AtomOp),
    Ex2,
    Lg2,
    Rcp,
    Sqrt,
    Rsqrt,
    Tanh,
    Sin,
    Cos,
    Copysign,
    Bra,
    Ret,
    Exit,
    /// `membar` / `fence`: ordering only (the simulator is sequentially consistent).
    Fence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Ballot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedOp {
    And,
    Or,
    Popc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
}

/// Rounding of `cvt`, `fma`, `add`... (`None`: the instruction's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// Float results: nearest even, toward zero, down, up.
    Rn,
    Rz,
    Rm,
    Rp,
    /// Float → integral float/int rounding (`.rni` ...).
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

/// A decoded opcode: what, on which types, with which modifiers.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub(crate) kind: Kind,
    /// The destination / operation type (the last type word, or for `cvt` the first).
    pub(crate) ty: Ty,
    /// `cvt`'s source type; `mma`'s A/B type; `mul.wide`'s source type.
    pub(crate) ty2: Ty,
    pub(crate) round: Option<Round>,
    pub(crate) sat: bool,
    pub(crate) wide: bool,
    pub(crate) hi: bool,
    pub(crate) trans: bool,
    /// `.v2` / `.v4`; `ldmatrix`'s `.x1/.x2/.x4`.
    pub(crate) vec: u8,
    /// `mma` shape k (8 or 16).
    pub(crate) mma_k: u8,
    /// `cp.async.wait_group N` takes N as an operand; `cp.async` size too.
    pub text: String,
}

impl Op {
    fn parse(opcode: &str) -> Result<Op, String> {
        let mut parts = opcode.split('.');
        let base = parts.next().unwrap_or_default();
        let words: Vec<&str> = parts.collect();
        let has = |w: &str| words.contains(&w);
        let types: Vec<Ty> = words.iter().filter_map(|w| Ty::parse(w)).collect();
        let space = if has("global") {
            Space::Global
        } else if has("shared") {
            Space::Shared
        } else if has("const") {
            Space::Const
        } else if has("param") {
            Space::Param
        } else {
            Space::Generic
        };
        let cmp = || -> Option<Cmp> {
            Some(match *words.first()? {
                "eq" => Cmp::Eq,
                "ne" => Cmp::Ne,
                "lt" => Cmp::Lt,
                "le" => Cmp::Le,
                "gt" => Cmp::Gt,
                "ge" => Cmp::Ge,
                "lo" => Cmp::Lo,
                "ls" => Cmp::Ls,
                "hi" => Cmp::Hi,
                "hs" => Cmp::Hs,
                "equ" => Cmp::Equ,
                "neu" => Cmp::Neu,
                "ltu" => Cmp::Ltu,
                "leu" => Cmp::Leu,
                "gtu" => Cmp::Gtu,
                "geu" => Cmp::Geu,
                "num" => Cmp::Num,
                "nan" => Cmp::Nan,
                _ => return None,
            })
        };
        let atom_op = || -> Option<AtomOp> {
            Some(if has("add") {
                AtomOp::Add
            } else if has("min") {
                AtomOp::Min
            } else if has("max") {
                AtomOp::Max
            } else if has("exch") {
                AtomOp::Exch
            } else if has("cas") {
                AtomOp::Cas
            } else if has("and") {
                AtomOp::And
            } else if has("or") {
                AtomOp::Or
            } else if has("xor") {
                AtomOp::Xor
            } else {
                return None;
            })
        };
        let unsupported = || format!("`{opcode}` is not supported by the PTX simulator");
        let kind = match base {
            "add" => Kind::Add,
            "sub" => Kind::Sub,
            "mul" => Kind::Mul,
            "mad" => Kind::Mad,
            "fma" => Kind::Fma,
            "div" => Kind::Div,
            "rem" => Kind::Rem,
            "min" => Kind::Min,
            "max" => Kind::Max,
            "abs" => Kind::Abs,
            "neg" => Kind::Neg,
            "not" => Kind::Not,
            "and" => Kind::And,
            "or" => Kind::Or,
            "xor" => Kind::Xor,
            "shl" => Kind::Shl,
            "shr" => Kind::Shr,
            "bfi" => Kind::Bfi,
            "bfe" => Kind::Bfe,
            "popc" => Kind::Popc,
            "clz" => Kind::Clz,
            "setp" => Kind::Setp(cmp().ok_or_else(unsupported)?),
            "selp" => Kind::Selp,
            "mov" => Kind::Mov,
            "cvt" => Kind::Cvt,
            "cvta" => Kind::Cvta { to: has("to") },
            "ld" => Kind::Ld(space),
            "st" => Kind::St(space),
            "cp" if has("async") && has("commit_group") => Kind::CpAsyncCommit,
            "cp" if has("async") && has("wait_group") => Kind::CpAsyncWait,
            "cp" if has("async") && has("wait_all") => Kind::CpAsyncWaitAll,
            "cp" if has("async") && has("shared") && has("global") && !has("bulk") => Kind::CpAsync,
            "ldmatrix" if has("m8n8") && has("b16") => Kind::Ldmatrix,
            "mma"
                if has("sync")
                    && has("row")
                    && has("col")
                    && (has("m16n8k16") || has("m16n8k8")) =>
            {
                Kind::Mma
            }
            "shfl" => Kind::Shfl(if has("up") {
                ShflMode::Up
            } else if has("down") {
                ShflMode::Down
            } else if has("bfly") {
                ShflMode::Bfly
            } else if has("idx") {
                ShflMode::Idx
            } else {
                return Err(unsupported());
            }),
            "vote" => Kind::Vote(if has("all") {
                VoteMode::All
            } else if has("any") {
                VoteMode::Any
            } else if has("ballot") {
                VoteMode::Ballot
            } else {
                return Err(unsupported());
            }),
            "bar" | "barrier" if has("warp") => Kind::BarWarp,
            "bar" | "barrier" if has("red") => Kind::BarRed(if has("and") {
                RedOp::And
            } else if has("or") {
                RedOp::Or
            } else if has("popc") {
                RedOp::Popc
            } else {
                return Err(unsupported());
            }),
            "bar" | "barrier" if has("sync") || words.is_empty() => Kind::Bar,
            "atom" => Kind::Atom(space, atom_op().ok_or_else(unsupported)?),
            "red" => Kind::Red(space, atom_op().ok_or_else(unsupported)?),
            "ex2" => Kind::Ex2,
            "lg2" => Kind::Lg2,
            "rcp" => Kind::Rcp,
            "sqrt" => Kind::Sqrt,
            "rsqrt" => Kind::Rsqrt,
            "tanh" => Kind::Tanh,
            "sin" => Kind::Sin,
            "cos" => Kind::Cos,
            "copysign" => Kind::Copysign,
            "bra" => Kind::Bra,
            "ret" => Kind::Ret,
            "exit" => Kind::Exit,
            "membar" | "fence" => Kind::Fence,
            _ => return Err(unsupported()),
        };
        if matches!(space, Space::Generic) && matches!(kind, Kind::Ld(_) | Kind::St(_)) {
            return Err(format!(
                "`{opcode}`: generic-address loads/stores are not supported by the PTX simulator"
            ));
        }
        let round = words.iter().find_map(|w| {
            Some(match *w {
                "rn" => Round::Rn,
                "rz" => Round::Rz,
                "rm" => Round::Rm,
                "rp" => Round::Rp,
                "rni" => Round::Rni,
                "rzi" => Round::Rzi,
                "rmi" => Round::Rmi,
                "rpi" => Round::Rpi,
                _ => return None,
            })
        });
        let vec = words
            .iter()
            .find_map(|w| match *w {
                "v2" | "x2" => Some(2),
                "v4" | "x4" => Some(4),
                "x1" => Some(1),
                _ => None,
            })
            .unwrap_or(1);
        let (ty, ty2) = match kind {
            // cvt.dst.src; mma's D,A,B,C types: f32.bf16.bf16.f32.
            Kind::Cvt | Kind::Mma => (
                *types.first().ok_or_else(unsupported)?,
                *types.get(1).ok_or_else(unsupported)?,
            ),
            Kind::Bra
            | Kind::Ret
            | Kind::Exit
            | Kind::Bar
            | Kind::BarWarp
            | Kind::Fence
            | Kind::CpAsync
            | Kind::CpAsyncCommit
            | Kind::CpAsyncWait
            | Kind::CpAsyncWaitAll => (Ty::B32, Ty::B32),
            _ => {
                let t = *types.last().ok_or_else(unsupported)?;
                (t, t)
            }
        };
        Ok(Op {
            kind,
            ty,
            ty2,
            round,
            sat: has("sat"),
            wide: has("wide"),
            hi: has("hi"),
            trans: has("trans"),
            vec,
            mma_k: if has("m16n8k8") { 8 } else { 16 },
            text: opcode.to_string(),
        })
    }
}

impl Op {
    /// The fewest operands the simulator reads for this instruction (a
    /// malformed instruction is a parse error, not a panic at run time).
    fn min_operands(&self) -> usize {
        match self.kind {
            Kind::Ret
            | Kind::Exit
            | Kind::Fence
            | Kind::Bar
            | Kind::BarWarp
            | Kind::CpAsyncCommit
            | Kind::CpAsyncWaitAll => 0,
            Kind::Bra | Kind::CpAsyncWait => 1,
            Kind::Cvt if matches!(self.ty, Ty::Bf16x2 | Ty::F16x2) => 3,
            Kind::Abs
            | Kind::Neg
            | Kind::Not
            | Kind::Popc
            | Kind::Clz
            | Kind::Mov
            | Kind::Cvt
            | Kind::Cvta { .. }
            | Kind::Ld(_)
            | Kind::St(_)
            | Kind::Ex2
            | Kind::Lg2
            | Kind::Rcp
            | Kind::Sqrt
            | Kind::Rsqrt
            | Kind::Tanh
            | Kind::Sin
            | Kind::Cos
            | Kind::Ldmatrix
            | Kind::Vote(_)
            | Kind::Red(..) => 2,
            Kind::Add
            | Kind::Sub
            | Kind::Mul
            | Kind::Div
            | Kind::Rem
            | Kind::Min
            | Kind::Max
            | Kind::And
            | Kind::Or
            | Kind::Xor
            | Kind::Shl
            | Kind::Shr
            | Kind::Copysign
            | Kind::Setp(_)
            | Kind::CpAsync
            | Kind::BarRed(_) => 3,
            Kind::Atom(_, AtomOp::Cas) => 4,
            Kind::Atom(..) => 3,
            Kind::Mad | Kind::Fma | Kind::Selp | Kind::Bfe | Kind::Mma => 4,
            Kind::Bfi | Kind::Shfl(_) => 5,
        }
    }
}

/// One instruction of a kernel.
#[derive(Debug, Clone)]
pub struct Inst {
    /// `@%p` / `@!%p`.
    pub(crate) guard: Option<(u32, bool)>,
    pub op: Op,
    pub(crate) ops: Vec<Operand>,
    pub(crate) line: u32,
}

/// A parsed `.entry`: its parameters, registers and instructions.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub(crate) name: String,
    /// Name and size in bytes of each parameter, in order.
    pub(crate) params: Vec<(String, u32)>,
    pub(crate) nregs: usize,
    /// Declared type of each register (`cp.async`'s last operand is a
    /// predicate or a byte count depending on it).
    pub(crate) reg_types: Vec<Ty>,
    pub code: Vec<Inst>,
    /// Source line of each instruction (from `.loc`, NVRTC `-lineinfo`; 0 without).
    pub src_lines: Vec<u32>,
}

/// A module-level (or function-local `.shared`) variable.
#[derive(Debug, Clone)]
pub(crate) struct Var {
    pub(crate) name: String,
    pub(crate) space: String,
    pub(crate) align: u32,
    pub(crate) size: usize,
    /// `extern .shared x[]`: the dynamic shared memory.
    pub(crate) unsized_: bool,
    pub(crate) init: Vec<u8>,
}

/// A parsed PTX module.
#[derive(Debug, Clone)]
pub struct Module {
    pub(crate) vars: Vec<Var>,
    pub(crate) kernels: Vec<Kernel>,
}

impl Module {
    /// Parses PTX text (the subset NVRTC emits for mixc's kernels).
    pub fn parse(ptx: &str) -> Result<Module, SimError> {
        parse::parse(ptx)
    }
    /// The kernel (`.entry`) called `name`.
    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

#[cfg(test)]
mod tests;
