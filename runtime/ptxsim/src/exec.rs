//! Executes a parsed kernel over a grid: the CTA scheduler (threads run to
//! the next collective or barrier), the instructions, shared memory with race
//! tracking, and `cp.async` groups that land at their wait.

use half::{bf16, f16};

use super::{
    AtomOp, Cmp, Inst, Kernel, Kind, Module, Operand, RedOp, Round, ShflMode, SimError, Space,
    Special, Ty, VoteMode,
};

/// Device global memory as the simulator sees it (the host twin's buffers).
pub trait GlobalMemory {
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), String>;
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String>;
    /// A new buffer holding `data` (module `.global` / `.const` variables).
    fn alloc(&mut self, data: Vec<u8>) -> u64;
}

/// What a launch executed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchStats {
    pub ctas: u64,
    pub instructions: u64,
    pub mma: u64,
    pub barriers: u64,
    /// Largest shared-memory extent any CTA touched, in bytes.
    pub smem_bytes: usize,
}

/// Per-thread instruction budget: a kernel that loops forever fails instead
/// of hanging the test.
const MAX_STEPS_PER_THREAD: u64 = 200_000_000;
const NONE: u32 = u32::MAX;
const MANY: u32 = u32::MAX - 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Run,
    /// Waiting at `pc` for its warp (collective) or its CTA (barrier).
    Wait,
    Done,
}

/// One `cp.async`: bytes read from global at issue, written to shared at wait.
struct Copy {
    dst: usize,
    data: Vec<u8>,
}

struct Thread {
    pc: usize,
    regs: Vec<u64>,
    state: State,
    tid: [u32; 3],
    steps: u64,
    /// Committed `cp.async` groups, oldest first, and the open one.
    groups: Vec<Vec<Copy>>,
    open: Vec<Copy>,
}

/// Last writer/reader of a shared byte within barrier interval `*_epoch`,
/// and the thread whose `cp.async` is still bringing it in. `w_wsync` /
/// `r_wsync` are the `bar.warp.sync` counts of the writer's / readers' warp
/// at the access, so a warp barrier orders accesses within its warp;
/// `r_warp` is the warp of all readers (`NONE`: readers in several warps).
#[derive(Clone, Copy)]
struct Meta {
    w_epoch: u32,
    writer: u32,
    w_wsync: u32,
    r_epoch: u32,
    reader: u32,
    r_warp: u32,
    r_wsync: u32,
    inflight: u32,
    /// Atomics in this barrier interval (`a_epoch`) by `atomic` (`MANY` for
    /// several threads): they may meet each other, not plain accesses.
    a_epoch: u32,
    atomic: u32,
}

const FRESH: Meta = Meta {
    w_epoch: 0,
    writer: NONE,
    w_wsync: 0,
    r_epoch: 0,
    reader: NONE,
    r_warp: NONE,
    r_wsync: 0,
    inflight: NONE,
    a_epoch: 0,
    atomic: NONE,
};

struct Cta<'a> {
    kernel: &'a Kernel,
    params: &'a [u64],
    var_addr: &'a [u64],
    mem: &'a mut dyn GlobalMemory,
    ctaid: [u32; 3],
    nctaid: [u32; 3],
    ntid: [u32; 3],
    smem: Vec<u8>,
    meta: Vec<Meta>,
    epoch: u32,
    /// `bar.warp.sync`s completed by each warp.
    wsync: Vec<u32>,
    stats: LaunchStats,
    smem_hi: usize,
    /// Executions per instruction when profiling (empty otherwise).
    counts: Vec<u64>,
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        !0
    } else {
        (1u64 << bits) - 1
    }
}

fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

/// Rounds an f64 to f32 in the given direction.
fn to_f32(x: f64, r: Option<Round>) -> f32 {
    let n = x as f32;
    if n.is_nan() || n.is_infinite() || n as f64 == x {
        return n;
    }
    match r {
        Some(Round::Rz) => {
            if (n as f64).abs() > x.abs() {
                n.next_toward_zero()
            } else {
                n
            }
        }
        Some(Round::Rm) => {
            if n as f64 > x {
                n.next_down()
            } else {
                n
            }
        }
        Some(Round::Rp) => {
            if (n as f64) < x {
                n.next_up()
            } else {
                n
            }
        }
        _ => n,
    }
}

trait TowardZero {
    fn next_toward_zero(self) -> Self;
}
impl TowardZero for f32 {
    fn next_toward_zero(self) -> f32 {
        if self > 0.0 {
            self.next_down()
        } else {
            self.next_up()
        }
    }
}

/// An integer to f32, rounded once in the given direction (nearest even by default).
fn int_to_f32(x: i128, r: Option<Round>) -> f32 {
    let n = x as f32;
    let back = n as i128; // exact: |x| < 2^64
    match r {
        Some(Round::Rz) if back.abs() > x.abs() => n.next_toward_zero(),
        Some(Round::Rm) if back > x => n.next_down(),
        Some(Round::Rp) if back < x => n.next_up(),
        _ => n,
    }
}

fn round_integral(x: f64, r: Option<Round>) -> f64 {
    match r {
        Some(Round::Rzi) => x.trunc(),
        Some(Round::Rmi) => x.floor(),
        Some(Round::Rpi) => x.ceil(),
        _ => x.round_ties_even(),
    }
}

/// Reads a float of type `ty` from register bits.
fn fget(ty: Ty, v: u64) -> f64 {
    match ty {
        Ty::F32 => f32::from_bits(v as u32) as f64,
        Ty::F64 => f64::from_bits(v),
        Ty::F16 => f16::from_bits(v as u16).to_f64(),
        Ty::Bf16 => bf16::from_bits(v as u16).to_f64(),
        _ => f64::NAN,
    }
}

/// Encodes a float as `ty` register bits (nearest, unless `r` says otherwise).
fn fset(ty: Ty, x: f64, r: Option<Round>) -> u64 {
    match ty {
        Ty::F32 => to_f32(x, r).to_bits() as u64,
        Ty::F64 => x.to_bits(),
        Ty::F16 => f16::from_f64(x).to_bits() as u64,
        Ty::Bf16 => match r {
            Some(Round::Rz) if x.is_finite() => ((x as f32).to_bits() >> 16) as u64,
            _ => bf16::from_f64(x).to_bits() as u64,
        },
        _ => 0,
    }
}

fn is_collective(k: Kind) -> bool {
    matches!(
        k,
        Kind::Ldmatrix | Kind::Mma | Kind::Shfl(_) | Kind::Vote(_) | Kind::BarWarp
    )
}

fn is_barrier(k: Kind) -> bool {
    matches!(k, Kind::Bar | Kind::BarRed(_))
}

impl Module {
    /// Runs `kernel` over `grid` CTAs of `block` threads with `dynamic_smem`
    /// bytes of dynamic shared memory; `params` holds each parameter's value
    /// (pointers as addresses in `mem`), in declaration order.
    pub fn launch(
        &self,
        mem: &mut dyn GlobalMemory,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dynamic_smem: u32,
        params: &[u64],
    ) -> Result<LaunchStats, SimError> {
        self.launch_profiled(mem, kernel, grid, block, dynamic_smem, params, None)
    }

    /// [`Module::launch`], adding to `profile[i]` the number of times (per
    /// thread) instruction `i` of the kernel was executed.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_profiled(
        &self,
        mem: &mut dyn GlobalMemory,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dynamic_smem: u32,
        params: &[u64],
        mut profile: Option<&mut Vec<u64>>,
    ) -> Result<LaunchStats, SimError> {
        let k = self.kernel(kernel).ok_or_else(|| SimError {
            line: 0,
            msg: format!("no kernel `{kernel}` in the module"),
        })?;
        if params.len() != k.params.len() {
            return Err(SimError {
                line: 0,
                msg: format!(
                    "`{kernel}` takes {} parameters, launched with {}",
                    k.params.len(),
                    params.len()
                ),
            });
        }
        // Shared variables: statics first, then the dynamic array.
        let mut var_addr = vec![0u64; self.vars.len()];
        let mut off = 0usize;
        for (i, v) in self.vars.iter().enumerate() {
            if v.space == ".shared" && !v.unsized_ {
                off = off.next_multiple_of(v.align.max(1) as usize);
                var_addr[i] = off as u64;
                off += v.size;
            }
        }
        let dyn_at = off.next_multiple_of(16);
        for (i, v) in self.vars.iter().enumerate() {
            match v.space.as_str() {
                ".shared" if v.unsized_ => var_addr[i] = dyn_at as u64,
                ".global" | ".const" => var_addr[i] = mem.alloc(v.init.clone()),
                _ => {}
            }
        }
        let smem_size = dyn_at + dynamic_smem as usize;
        let mut total = LaunchStats::default();
        for z in 0..grid.2 {
            for y in 0..grid.1 {
                for x in 0..grid.0 {
                    let mut cta = Cta {
                        kernel: k,
                        params,
                        var_addr: &var_addr,
                        mem: &mut *mem,
                        ctaid: [x, y, z],
                        nctaid: [grid.0, grid.1, grid.2],
                        ntid: [block.0, block.1, block.2],
                        // NaN in every float width: reads of never-written
                        // shared memory poison the result.
                        smem: vec![0xff; smem_size],
                        meta: vec![FRESH; smem_size],
                        epoch: 1,
                        wsync: vec![0; (block.0 * block.1 * block.2).div_ceil(32) as usize],
                        stats: LaunchStats::default(),
                        smem_hi: 0,
                        counts: if profile.is_some() {
                            vec![0; k.code.len()]
                        } else {
                            Vec::new()
                        },
                    };
                    cta.run()?;
                    if let Some(p) = profile.as_deref_mut() {
                        p.resize(k.code.len(), 0);
                        for (a, b) in p.iter_mut().zip(&cta.counts) {
                            *a += b;
                        }
                    }
                    total.ctas += 1;
                    total.instructions += cta.stats.instructions;
                    total.mma += cta.stats.mma;
                    total.barriers += cta.stats.barriers;
                    total.smem_bytes = total.smem_bytes.max(cta.smem_hi);
                }
            }
        }
        Ok(total)
    }
}

impl Cta<'_> {
    fn err(&self, t: Option<&Thread>, inst: &Inst, msg: impl Into<String>) -> SimError {
        let who = match t {
            Some(t) => format!(
                "CTA ({},{},{}) thread ({},{},{})",
                self.ctaid[0], self.ctaid[1], self.ctaid[2], t.tid[0], t.tid[1], t.tid[2]
            ),
            None => format!(
                "CTA ({},{},{})",
                self.ctaid[0], self.ctaid[1], self.ctaid[2]
            ),
        };
        SimError {
            line: inst.line,
            msg: format!("{who}, `{}`: {}", inst.op.text, msg.into()),
        }
    }

    fn terr(&self, t: &Thread, inst: &Inst, msg: impl Into<String>) -> SimError {
        self.err(Some(t), inst, msg)
    }

    fn run(&mut self) -> Result<(), SimError> {
        let n = (self.ntid[0] * self.ntid[1] * self.ntid[2]) as usize;
        let mut threads: Vec<Thread> = (0..n as u32)
            .map(|i| Thread {
                pc: 0,
                regs: vec![0; self.kernel.nregs],
                state: State::Run,
                tid: [
                    i % self.ntid[0],
                    (i / self.ntid[0]) % self.ntid[1],
                    i / (self.ntid[0] * self.ntid[1]),
                ],
                steps: 0,
                groups: Vec::new(),
                open: Vec::new(),
            })
            .collect();
        let kernel = self.kernel;
        let code = &kernel.code;
        loop {
            for (i, t) in threads.iter_mut().enumerate() {
                if t.state == State::Run {
                    self.run_thread(i as u32, t)?;
                }
            }
            // Warp collectives whose live lanes all wait at one instruction.
            let mut progressed = false;
            for w in 0..n.div_ceil(32) {
                let lanes: Vec<usize> = (w * 32..((w + 1) * 32).min(n))
                    .filter(|&i| threads[i].state != State::Done)
                    .collect();
                let Some(&first) = lanes.first() else {
                    continue;
                };
                let pc = threads[first].pc;
                let all_here = lanes
                    .iter()
                    .all(|&i| threads[i].state == State::Wait && threads[i].pc == pc);
                if all_here && is_collective(code[pc].op.kind) {
                    self.collective(&mut threads, &lanes, &code[pc])?;
                    for &i in &lanes {
                        threads[i].pc += 1;
                        threads[i].state = State::Run;
                    }
                    progressed = true;
                }
            }
            if progressed {
                continue;
            }
            let live: Vec<usize> = (0..n)
                .filter(|&i| threads[i].state != State::Done)
                .collect();
            let Some(&first) = live.first() else {
                break;
            };
            let all_at_barrier = live.iter().all(|&i| {
                threads[i].state == State::Wait && is_barrier(code[threads[i].pc].op.kind)
            });
            if !all_at_barrier {
                let inst = &code[threads[first].pc];
                let mut at: Vec<String> = live
                    .iter()
                    .filter(|&&i| threads[i].state == State::Wait)
                    .map(|&i| format!("thread {i} at line {}", code[threads[i].pc].line))
                    .collect();
                at.truncate(6);
                return Err(self.err(
                    None,
                    inst,
                    format!(
                        "deadlock or divergent collective: {} live threads do not meet ({} ...)",
                        live.len(),
                        at.join(", ")
                    ),
                ));
            }
            self.barrier(&mut threads, &live)?;
        }
        Ok(())
    }

    fn barrier(&mut self, threads: &mut [Thread], live: &[usize]) -> Result<(), SimError> {
        let kernel = self.kernel;
        let code = &kernel.code;
        let inst = &code[threads[live[0]].pc];
        // `bar.sync a{, b}` / `bar.red.op d, a, ...`: threads at different
        // barrier ids, or at a barrier and a reduction, never meet.
        let id_of = |cta: &Self, t: &Thread, ii: &Inst| {
            let k = if matches!(ii.op.kind, Kind::BarRed(_)) {
                1
            } else {
                0
            };
            ii.ops.get(k).map_or(0, |o| cta.src(t, o, Ty::U32))
        };
        let id0 = id_of(self, &threads[live[0]], inst);
        for &i in live {
            let ii = &code[threads[i].pc];
            if ii.op.kind != inst.op.kind || id_of(self, &threads[i], ii) != id0 {
                let at = |j: usize| {
                    format!(
                        "`{}` at line {}",
                        code[threads[j].pc].op.text, code[threads[j].pc].line
                    )
                };
                return Err(self.err(
                    Some(&threads[i]),
                    ii,
                    format!(
                        "deadlock: threads wait at different barriers ({} and {})",
                        at(live[0]),
                        at(i)
                    ),
                ));
            }
        }
        if let Kind::BarRed(op) = inst.op.kind {
            // `bar.red.op d, barrier, {count,} p`: every thread gets the reduction.
            let mut acc: u64 = match op {
                RedOp::And => 1,
                _ => 0,
            };
            for &i in live {
                let ii = &code[threads[i].pc];
                let p = self.src(&threads[i], ii.ops.last().unwrap(), Ty::Pred) & 1;
                acc = match op {
                    RedOp::And => acc & p,
                    RedOp::Or => acc | p,
                    RedOp::Popc => acc + p,
                };
            }
            for &i in live {
                let ii = &code[threads[i].pc];
                let ty = if op == RedOp::Popc { Ty::U32 } else { Ty::Pred };
                self.set(&mut threads[i], &ii.ops[0], ty, acc);
            }
        }
        self.epoch += 1;
        self.stats.barriers += 1;
        for &i in live {
            threads[i].pc += 1;
            threads[i].state = State::Run;
        }
        Ok(())
    }

    /// Runs one thread until it waits or exits.
    fn run_thread(&mut self, id: u32, t: &mut Thread) -> Result<(), SimError> {
        let kernel = self.kernel;
        let code = &kernel.code;
        loop {
            let Some(inst) = code.get(t.pc) else {
                let last = code.last().expect("a kernel with no instructions");
                return self.finish(t, last);
            };
            t.steps += 1;
            self.stats.instructions += 1;
            if let Some(c) = self.counts.get_mut(t.pc) {
                *c += 1;
            }
            if t.steps > MAX_STEPS_PER_THREAD {
                return Err(self.terr(t, inst, "instruction budget exhausted (endless loop?)"));
            }
            if let Some((p, neg)) = inst.guard {
                if (t.regs[p as usize] != 0) == neg {
                    t.pc += 1;
                    continue;
                }
            }
            let k = inst.op.kind;
            if is_collective(k) || is_barrier(k) {
                t.state = State::Wait;
                return Ok(());
            }
            match k {
                Kind::Bra => {
                    let Operand::Label(target) = inst.ops[0] else {
                        return Err(self.terr(t, inst, "branch without a label"));
                    };
                    t.pc = target;
                    continue;
                }
                Kind::Ret | Kind::Exit => return self.finish(t, inst),
                _ => self.exec(id, t, inst)?,
            }
            t.pc += 1;
        }
    }

    /// A thread ends: its outstanding copies still land.
    /// A thread ends. Exiting with copies still in flight is an error: the
    /// kernel forgot a `cp.async.wait_group` (empty groups do not count).
    fn finish(&mut self, t: &mut Thread, inst: &Inst) -> Result<(), SimError> {
        let pending = t.groups.iter().map(Vec::len).sum::<usize>() + t.open.len();
        if pending > 0 {
            return Err(self.terr(
                t,
                inst,
                format!(
                    "exits with {pending} cp.async copies in flight (missing cp.async.wait_group)"
                ),
            ));
        }
        t.state = State::Done;
        Ok(())
    }

    fn land(&mut self, id: u32, c: Copy) {
        let ws = self.wsync[(id / 32) as usize];
        for (k, &b) in c.data.iter().enumerate() {
            let a = c.dst + k;
            self.smem[a] = b;
            let m = &mut self.meta[a];
            m.inflight = NONE;
            m.w_epoch = self.epoch;
            m.writer = id;
            m.w_wsync = ws;
        }
    }

    /// Whether an access by thread `id` is ordered after one by a thread of
    /// `warp` made when that warp had passed `count` warp barriers.
    fn warp_ordered(&self, id: u32, warp: u32, count: u32) -> bool {
        warp == id / 32 && self.wsync[warp as usize] > count
    }

    // ---- operands -------------------------------------------------------

    fn special(&self, t: &Thread, s: Special) -> u64 {
        let lin = t.tid[0] + self.ntid[0] * (t.tid[1] + self.ntid[1] * t.tid[2]);
        (match s {
            Special::Tid(d) => t.tid[d as usize],
            Special::Ntid(d) => self.ntid[d as usize],
            Special::Ctaid(d) => self.ctaid[d as usize],
            Special::Nctaid(d) => self.nctaid[d as usize],
            Special::Laneid => lin % 32,
            Special::Warpid => lin / 32,
        }) as u64
    }

    /// A source operand's bits as type `ty` (immediates converted to it).
    fn src(&self, t: &Thread, o: &Operand, ty: Ty) -> u64 {
        match *o {
            Operand::Reg(r) => t.regs[r as usize],
            Operand::NotPred(r) => (t.regs[r as usize] == 0) as u64,
            Operand::Imm(v) => {
                if ty.float() {
                    // An integer literal in a float context is its value.
                    fset(ty, sext(v, 64) as f64, None)
                } else {
                    v & mask(ty.bits())
                }
            }
            Operand::F32(f) => {
                if ty.float() {
                    fset(ty, f as f64, None)
                } else {
                    f.to_bits() as u64
                }
            }
            Operand::F64(f) => {
                if ty.float() {
                    fset(ty, f, None)
                } else {
                    f.to_bits()
                }
            }
            Operand::Special(s) => self.special(t, s),
            Operand::Sym(v) => self.var_addr[v as usize],
            Operand::Param(p) => self.params[p as usize],
            _ => 0,
        }
    }

    fn set(&self, t: &mut Thread, o: &Operand, ty: Ty, bits: u64) {
        match *o {
            Operand::Reg(r) => {
                t.regs[r as usize] = if ty == Ty::Pred {
                    bits & 1
                } else {
                    bits & mask(ty.bits())
                }
            }
            Operand::Sink => {}
            // `d|p` pairs are handled by their instructions.
            _ => {}
        }
    }

    /// Address of a memory operand.
    fn addr(&self, t: &Thread, o: &Operand, inst: &Inst) -> Result<u64, SimError> {
        match o {
            Operand::Addr { base, off } => {
                let b = match base.as_deref() {
                    None => 0,
                    Some(b) => self.src(t, b, Ty::U64),
                };
                Ok(b.wrapping_add(*off as u64))
            }
            _ => Err(self.terr(t, inst, "expected an address operand")),
        }
    }

    // ---- shared memory ----------------------------------------------------

    fn smem_range(
        &self,
        t: Option<&Thread>,
        inst: &Inst,
        a: u64,
        len: usize,
    ) -> Result<usize, SimError> {
        let a32 = a as usize;
        if a >= u32::MAX as u64 || a32 + len > self.smem.len() {
            return Err(self.err(
                t,
                inst,
                format!(
                    "shared access at byte {a:#x}..{:#x} outside the {} bytes of shared memory",
                    a.wrapping_add(len as u64),
                    self.smem.len()
                ),
            ));
        }
        Ok(a32)
    }

    fn smem_read(
        &mut self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        a: u64,
        len: usize,
    ) -> Result<u64, SimError> {
        let at = self.smem_range(Some(t), inst, a, len)?;
        for k in at..at + len {
            self.check_prior_write(id, t, inst, k, "reads")?;
            self.check_prior_atomic(id, t, inst, k, "reads")?;
            let (warp, ws) = (id / 32, self.wsync[(id / 32) as usize]);
            let m = &mut self.meta[k];
            if m.r_epoch == self.epoch && m.reader != id {
                m.reader = MANY;
                if m.r_warp != warp {
                    m.r_warp = NONE;
                }
            } else {
                m.r_epoch = self.epoch;
                m.reader = id;
                m.r_warp = warp;
            }
            m.r_wsync = ws;
        }
        self.smem_hi = self.smem_hi.max(at + len);
        let mut b = [0u8; 8];
        b[..len.min(8)].copy_from_slice(&self.smem[at..at + len.min(8)]);
        Ok(u64::from_le_bytes(b))
    }

    /// What any access of shared byte `k` by thread `id` checks: no copy in
    /// flight to it, no other thread's write since the last barrier (or,
    /// within a warp, the last warp barrier). `verb`: "reads" / "writes".
    fn check_prior_write(
        &self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        k: usize,
        verb: &str,
    ) -> Result<(), SimError> {
        let m = self.meta[k];
        if m.inflight != NONE {
            return Err(self.err(
                Some(t),
                inst,
                format!(
                    "{verb} shared byte {k:#x} while thread {}'s cp.async to it is still in flight (missing cp.async.wait_group?)",
                    m.inflight
                ),
            ));
        }
        if m.w_epoch == self.epoch
            && m.writer != id
            && !self.warp_ordered(id, m.writer / 32, m.w_wsync)
        {
            return Err(self.err(
                Some(t),
                inst,
                format!("race: {verb} shared byte {k:#x} written by thread {} with no barrier in between", m.writer),
            ));
        }
        Ok(())
    }

    /// What a plain access of shared byte `k` checks besides
    /// [`Self::check_prior_write`]: no other thread's atomic update since
    /// the last barrier.
    fn check_prior_atomic(
        &self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        k: usize,
        verb: &str,
    ) -> Result<(), SimError> {
        let m = self.meta[k];
        if m.a_epoch == self.epoch && m.atomic != id {
            return Err(self.err(
                Some(t),
                inst,
                format!(
                    "race: {verb} shared byte {k:#x} updated atomically by {} with no barrier in between",
                    who(m.atomic)
                ),
            ));
        }
        Ok(())
    }

    /// What a write (plain, `cp.async` or atomic) of shared byte `k`
    /// checks: no other thread's read since the last barrier.
    fn check_prior_read(
        &self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        k: usize,
        verb: &str,
    ) -> Result<(), SimError> {
        let m = self.meta[k];
        if m.r_epoch == self.epoch && m.reader != id && !self.warp_ordered(id, m.r_warp, m.r_wsync)
        {
            return Err(self.err(
                Some(t),
                inst,
                format!(
                    "race: {verb} shared byte {k:#x} read by {} with no barrier in between",
                    who(m.reader)
                ),
            ));
        }
        Ok(())
    }

    /// Checks and records an atomic update of `len` shared bytes at `a`:
    /// atomics of different threads may meet, but not another thread's plain
    /// read or write in the same barrier interval.
    fn smem_atomic(
        &mut self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        a: u64,
        len: usize,
    ) -> Result<usize, SimError> {
        let at = self.smem_range(Some(t), inst, a, len)?;
        for k in at..at + len {
            self.check_prior_write(id, t, inst, k, "updates atomically")?;
            self.check_prior_read(id, t, inst, k, "updates atomically")?;
        }
        let epoch = self.epoch;
        for m in &mut self.meta[at..at + len] {
            m.atomic = if m.a_epoch == epoch && m.atomic != id {
                MANY
            } else {
                id
            };
            m.a_epoch = epoch;
        }
        self.smem_hi = self.smem_hi.max(at + len);
        Ok(at)
    }

    /// Checks a write of `len` bytes at `a` by thread `id` (plain or cp.async issue).
    fn smem_check_write(
        &self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        a: u64,
        len: usize,
    ) -> Result<usize, SimError> {
        let at = self.smem_range(Some(t), inst, a, len)?;
        for k in at..at + len {
            self.check_prior_write(id, t, inst, k, "writes")?;
            self.check_prior_atomic(id, t, inst, k, "writes")?;
            self.check_prior_read(id, t, inst, k, "writes")?;
        }
        Ok(at)
    }

    fn smem_write(
        &mut self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        a: u64,
        bytes: &[u8],
    ) -> Result<(), SimError> {
        let at = self.smem_check_write(id, t, inst, a, bytes.len())?;
        self.smem[at..at + bytes.len()].copy_from_slice(bytes);
        let ws = self.wsync[(id / 32) as usize];
        for m in &mut self.meta[at..at + bytes.len()] {
            m.w_epoch = self.epoch;
            m.writer = id;
            m.w_wsync = ws;
        }
        self.smem_hi = self.smem_hi.max(at + bytes.len());
        Ok(())
    }

    // ---- memory instructions ----------------------------------------------

    fn load(
        &mut self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        space: Space,
        a: u64,
        len: usize,
    ) -> Result<u64, SimError> {
        match space {
            Space::Shared => self.smem_read(id, t, inst, a, len),
            Space::Global | Space::Const => {
                let mut b = [0u8; 8];
                self.mem
                    .read(a, &mut b[..len])
                    .map_err(|e| self.terr(t, inst, e))?;
                Ok(u64::from_le_bytes(b))
            }
            Space::Param | Space::Generic => Err(self.terr(t, inst, "unsupported state space")),
        }
    }

    fn store(
        &mut self,
        id: u32,
        t: &Thread,
        inst: &Inst,
        space: Space,
        a: u64,
        bytes: &[u8],
    ) -> Result<(), SimError> {
        match space {
            Space::Shared => self.smem_write(id, t, inst, a, bytes),
            Space::Global => self.mem.write(a, bytes).map_err(|e| self.terr(t, inst, e)),
            _ => Err(self.terr(t, inst, "store to an unsupported state space")),
        }
    }

    // ---- one instruction ------------------------------------------------------

    fn exec(&mut self, id: u32, t: &mut Thread, inst: &Inst) -> Result<(), SimError> {
        let op = &inst.op;
        let ty = op.ty;
        let ops = &inst.ops;
        let bits = ty.bits();
        let s = |cta: &Self, k: usize, ty: Ty| cta.src(t, &ops[k], ty);
        match op.kind {
            Kind::Add
            | Kind::Sub
            | Kind::Mul
            | Kind::Div
            | Kind::Rem
            | Kind::Min
            | Kind::Max
            | Kind::Copysign
                if ty.float() =>
            {
                let (a, b) = (fget(ty, s(self, 1, ty)), fget(ty, s(self, 2, ty)));
                let r = match op.kind {
                    Kind::Add => a + b,
                    Kind::Sub => a - b,
                    Kind::Mul => a * b,
                    Kind::Div => {
                        if ty == Ty::F32 {
                            (a as f32 / b as f32) as f64
                        } else {
                            a / b
                        }
                    }
                    Kind::Min => {
                        if a.is_nan() {
                            b
                        } else if b.is_nan() {
                            a
                        } else {
                            a.min(b)
                        }
                    }
                    Kind::Max => {
                        if a.is_nan() {
                            b
                        } else if b.is_nan() {
                            a
                        } else {
                            a.max(b)
                        }
                    }
                    // copysign d, a, b: b with the sign of a.
                    Kind::Copysign => b.abs().copysign(a),
                    _ => return Err(self.terr(t, inst, "unsupported float operation")),
                };
                let r = if op.sat { sat01(r) } else { r };
                // f32 add/sub/mul of f32 values are exact in f64 only up to one
                // rounding: round once to f32 here (nearest unless directed).
                let v = fset(ty, r, op.round);
                self.set(t, &ops[0], ty, v);
            }
            Kind::Fma | Kind::Mad if ty.float() => {
                let (a, b, c) = (s(self, 1, ty), s(self, 2, ty), s(self, 3, ty));
                let v = if ty == Ty::F32 && matches!(op.round, None | Some(Round::Rn)) {
                    let r = f32::from_bits(a as u32)
                        .mul_add(f32::from_bits(b as u32), f32::from_bits(c as u32));
                    let r = if op.sat { sat01(r as f64) as f32 } else { r };
                    r.to_bits() as u64
                } else {
                    let r = fget(ty, a).mul_add(fget(ty, b), fget(ty, c));
                    fset(ty, if op.sat { sat01(r) } else { r }, op.round)
                };
                self.set(t, &ops[0], ty, v);
            }
            Kind::Abs
            | Kind::Neg
            | Kind::Ex2
            | Kind::Lg2
            | Kind::Rcp
            | Kind::Sqrt
            | Kind::Rsqrt
            | Kind::Tanh
            | Kind::Sin
            | Kind::Cos
                if ty.float() =>
            {
                let a = fget(ty, s(self, 1, ty));
                let a = if ty == Ty::F32 { a as f32 as f64 } else { a };
                let r = match op.kind {
                    Kind::Abs => a.abs(),
                    Kind::Neg => -a,
                    Kind::Ex2 => a.exp2(),
                    Kind::Lg2 => a.log2(),
                    Kind::Rcp => 1.0 / a,
                    Kind::Sqrt => a.sqrt(),
                    Kind::Rsqrt => 1.0 / a.sqrt(),
                    Kind::Tanh => a.tanh(),
                    Kind::Sin => a.sin(),
                    _ => a.cos(),
                };
                let v = fset(ty, r, op.round);
                self.set(t, &ops[0], ty, v);
            }
            Kind::Add
            | Kind::Sub
            | Kind::Mul
            | Kind::Mad
            | Kind::Div
            | Kind::Rem
            | Kind::Min
            | Kind::Max => {
                // Integer: operands of the source type (mul.wide: half the destination).
                let sty = ty;
                let sb = sty.bits();
                let (a, b) = (s(self, 1, sty), s(self, 2, sty));
                let (sa, sbv) = (sext(a, sb), sext(b, sb));
                let signed = sty.signed();
                let out_bits = if op.wide { sb * 2 } else { sb };
                let r: u64 = match op.kind {
                    Kind::Add => a.wrapping_add(b),
                    Kind::Sub => a.wrapping_sub(b),
                    Kind::Mul | Kind::Mad => {
                        let p: u128 = if signed {
                            (sa as i128 * sbv as i128) as u128
                        } else {
                            a as u128 * b as u128
                        };
                        let p = if op.hi { (p >> sb) as u64 } else { p as u64 };
                        if op.kind == Kind::Mad {
                            let c = s(self, 3, if op.wide { wide_of(sty) } else { sty });
                            p.wrapping_add(c)
                        } else {
                            p
                        }
                    }
                    Kind::Div | Kind::Rem => {
                        if b & mask(sb) == 0 {
                            return Err(self.terr(t, inst, "integer division by zero"));
                        }
                        match (op.kind, signed) {
                            (Kind::Div, true) => sa.wrapping_div(sbv) as u64,
                            (Kind::Rem, true) => sa.wrapping_rem(sbv) as u64,
                            (Kind::Div, false) => (a & mask(sb)) / (b & mask(sb)),
                            _ => (a & mask(sb)) % (b & mask(sb)),
                        }
                    }
                    Kind::Min if signed => sa.min(sbv) as u64,
                    Kind::Max if signed => sa.max(sbv) as u64,
                    Kind::Min => (a & mask(sb)).min(b & mask(sb)),
                    _ => (a & mask(sb)).max(b & mask(sb)),
                };
                self.set(t, &ops[0], Ty::B64, r & mask(out_bits));
            }
            Kind::Abs | Kind::Neg | Kind::Not | Kind::Popc | Kind::Clz => {
                let a = s(self, 1, ty);
                let r = match op.kind {
                    Kind::Abs => sext(a, bits).unsigned_abs(),
                    Kind::Neg => (sext(a, bits).wrapping_neg()) as u64,
                    Kind::Not if ty == Ty::Pred => (a & 1) ^ 1,
                    Kind::Not => !a,
                    Kind::Popc => (a & mask(bits)).count_ones() as u64,
                    _ => ((a & mask(bits)).leading_zeros() - (64 - bits)) as u64,
                };
                let oty = if matches!(op.kind, Kind::Popc | Kind::Clz) {
                    Ty::U32
                } else {
                    ty
                };
                self.set(t, &ops[0], oty, r);
            }
            Kind::And | Kind::Or | Kind::Xor => {
                let (a, b) = (s(self, 1, ty), s(self, 2, ty));
                let r = match op.kind {
                    Kind::And => a & b,
                    Kind::Or => a | b,
                    _ => a ^ b,
                };
                self.set(t, &ops[0], ty, r);
            }
            Kind::Shl | Kind::Shr => {
                let a = s(self, 1, ty);
                let n = s(self, 2, Ty::U32) as u32;
                let r = if op.kind == Kind::Shl {
                    if n >= bits {
                        0
                    } else {
                        a << n
                    }
                } else if ty.signed() {
                    (sext(a, bits) >> n.min(bits - 1)) as u64
                } else if n >= bits {
                    0
                } else {
                    (a & mask(bits)) >> n
                };
                self.set(t, &ops[0], ty, r);
            }
            Kind::Bfi => {
                // bfi d, a, b, pos, len: b with bits [pos, pos+len) taken from a.
                let (a, b) = (s(self, 1, ty), s(self, 2, ty));
                let pos = (s(self, 3, Ty::U32) & 0xff) as u32;
                let len = (s(self, 4, Ty::U32) & 0xff) as u32;
                let r = if len == 0 || pos >= bits {
                    b
                } else {
                    let len = len.min(bits - pos);
                    let m = mask(len) << pos;
                    (b & !m) | ((a << pos) & m)
                };
                self.set(t, &ops[0], ty, r);
            }
            Kind::Bfe => {
                let a = s(self, 1, ty);
                let pos = (s(self, 2, Ty::U32) & 0xff) as u32;
                let len = (s(self, 3, Ty::U32) & 0xff) as u32;
                let r = if len == 0 {
                    0
                } else {
                    let field = if pos >= bits {
                        0
                    } else {
                        (a & mask(bits)) >> pos
                    };
                    let len = len.min(bits);
                    let f = field & mask(len);
                    if ty.signed() {
                        sext(f, len) as u64
                    } else {
                        f
                    }
                };
                self.set(t, &ops[0], ty, r);
            }
            Kind::Setp(cmp) => {
                let (a, b) = (s(self, 1, ty), s(self, 2, ty));
                let r = compare(cmp, ty, a, b);
                // `setp.cmp.bop p|q, a, b, c`: p = r bop c, q = !r bop c.
                let combine = |x: bool| -> bool {
                    if ops.len() != 4 {
                        return x;
                    }
                    let c = s(self, 3, Ty::Pred) & 1 == 1;
                    if op.text.contains(".and") {
                        x && c
                    } else if op.text.contains(".or") {
                        x || c
                    } else {
                        x ^ c
                    }
                };
                let (p, q) = (combine(r), combine(!r));
                match &ops[0] {
                    Operand::Vec(v) => {
                        self.set(t, &v[0], Ty::Pred, p as u64);
                        self.set(t, &v[1], Ty::Pred, q as u64);
                    }
                    d => self.set(t, d, Ty::Pred, p as u64),
                }
            }
            Kind::Selp => {
                let p = s(self, 3, Ty::Pred) & 1 == 1;
                let v = if p { s(self, 1, ty) } else { s(self, 2, ty) };
                self.set(t, &ops[0], ty, v);
            }
            Kind::Mov => self.mov(t, inst)?,
            Kind::Cvt => self.cvt(t, inst)?,
            Kind::Cvta { .. } => {
                let a = s(self, 1, Ty::U64);
                self.set(t, &ops[0], ty, a);
            }
            Kind::Ld(space) => {
                let n = op.vec as usize;
                let eb = ty.bytes() as usize;
                let dsts: Vec<&Operand> = match &ops[0] {
                    Operand::Vec(v) => v.iter().collect(),
                    d => vec![d],
                };
                if dsts.len() != n {
                    return Err(self.terr(t, inst, "vector width and operand count differ"));
                }
                if space == Space::Param {
                    let Operand::Addr { base: Some(b), off } = &ops[1] else {
                        return Err(self.terr(t, inst, "ld.param needs [param]"));
                    };
                    let Operand::Param(p) = **b else {
                        return Err(self.terr(t, inst, "ld.param of a non-parameter"));
                    };
                    let size = match self.kernel.params[p as usize].1 {
                        0 => 8,
                        n => n.min(8) as i64,
                    };
                    if *off < 0 || *off + eb as i64 > size {
                        return Err(self.terr(
                            t,
                            inst,
                            format!(
                                "ld.param of bytes {off}..{} of a {size}-byte parameter",
                                *off + eb as i64
                            ),
                        ));
                    }
                    let v = self.params[p as usize] >> (8 * *off as u32);
                    self.set(t, dsts[0], ty, v);
                    return Ok(());
                }
                let a = self.addr(t, &ops[1], inst)?;
                if a % (eb * n) as u64 != 0 {
                    return Err(self.terr(
                        t,
                        inst,
                        format!("misaligned {}-byte access at {a:#x}", eb * n),
                    ));
                }
                for (k, d) in dsts.into_iter().enumerate() {
                    let v = self.load(id, t, inst, space, a + (k * eb) as u64, eb)?;
                    self.set(t, d, ty, v);
                }
            }
            Kind::St(space) => {
                let n = op.vec as usize;
                let eb = ty.bytes() as usize;
                let a = self.addr(t, &ops[0], inst)?;
                if a % (eb * n) as u64 != 0 {
                    return Err(self.terr(
                        t,
                        inst,
                        format!("misaligned {}-byte access at {a:#x}", eb * n),
                    ));
                }
                let vals: Vec<u64> = match &ops[1] {
                    Operand::Vec(v) => v.iter().map(|o| self.src(t, o, ty)).collect(),
                    o => vec![self.src(t, o, ty)],
                };
                for (k, v) in vals.into_iter().enumerate() {
                    let at = a + (k * eb) as u64;
                    self.store(id, t, inst, space, at, &v.to_le_bytes()[..eb])?;
                }
            }
            Kind::CpAsync => {
                let dst = self.addr(t, &ops[0], inst)?;
                let src = self.addr(t, &ops[1], inst)?;
                let size = s(self, 2, Ty::U32) as usize;
                let src_size = match ops.get(3) {
                    Some(o @ Operand::Reg(r)) if self.kernel_reg_is_pred(*r) => {
                        if self.src(t, o, Ty::Pred) & 1 == 1 {
                            0
                        } else {
                            size
                        }
                    }
                    Some(o) => self.src(t, o, Ty::U32) as usize,
                    None => size,
                };
                if ![4, 8, 16].contains(&size) || src_size > size {
                    return Err(self.terr(
                        t,
                        inst,
                        format!("cp.async of {size} bytes with src-size {src_size}"),
                    ));
                }
                if dst % size as u64 != 0 || (src_size > 0 && src % size as u64 != 0) {
                    return Err(self.terr(
                        t,
                        inst,
                        format!("misaligned cp.async ({dst:#x} <- {src:#x})"),
                    ));
                }
                let mut data = vec![0u8; size];
                if src_size > 0 {
                    self.mem
                        .read(src, &mut data[..src_size])
                        .map_err(|e| self.terr(t, inst, e))?;
                }
                let at = self.smem_check_write(id, t, inst, dst, size)?;
                for m in &mut self.meta[at..at + size] {
                    m.inflight = id;
                }
                self.smem_hi = self.smem_hi.max(at + size);
                t.open.push(Copy { dst: at, data });
            }
            Kind::CpAsyncCommit => {
                let g = std::mem::take(&mut t.open);
                t.groups.push(g);
            }
            Kind::CpAsyncWait | Kind::CpAsyncWaitAll => {
                let keep = if op.kind == Kind::CpAsyncWait {
                    s(self, 0, Ty::U32) as usize
                } else {
                    let g = std::mem::take(&mut t.open);
                    t.groups.push(g);
                    0
                };
                while t.groups.len() > keep {
                    for c in t.groups.remove(0) {
                        self.land(id, c);
                    }
                }
            }
            Kind::Atom(space, aop) | Kind::Red(space, aop) => {
                let is_red = matches!(op.kind, Kind::Red(..));
                let (ai, vi) = if is_red { (0, 1) } else { (1, 2) };
                let a = self.addr(t, &ops[ai], inst)?;
                let eb = ty.bytes() as usize;
                let old = match space {
                    Space::Shared => {
                        let at = self.smem_atomic(id, t, inst, a, eb)?;
                        let mut b = [0u8; 8];
                        b[..eb].copy_from_slice(&self.smem[at..at + eb]);
                        u64::from_le_bytes(b)
                    }
                    _ => {
                        let mut b = [0u8; 8];
                        self.mem
                            .read(a, &mut b[..eb])
                            .map_err(|e| self.terr(t, inst, e))?;
                        u64::from_le_bytes(b)
                    }
                };
                let v = s(self, vi, ty);
                let new = match aop {
                    AtomOp::Add if ty.float() => fset(ty, fget(ty, old) + fget(ty, v), None),
                    AtomOp::Add => old.wrapping_add(v),
                    AtomOp::Min if ty.float() => fset(ty, fget(ty, old).min(fget(ty, v)), None),
                    AtomOp::Max if ty.float() => fset(ty, fget(ty, old).max(fget(ty, v)), None),
                    AtomOp::Min if ty.signed() => sext(old, bits).min(sext(v, bits)) as u64,
                    AtomOp::Max if ty.signed() => sext(old, bits).max(sext(v, bits)) as u64,
                    AtomOp::Min => (old & mask(bits)).min(v & mask(bits)),
                    AtomOp::Max => (old & mask(bits)).max(v & mask(bits)),
                    AtomOp::Exch => v,
                    AtomOp::Cas => {
                        if old & mask(bits) == v & mask(bits) {
                            s(self, 3, ty)
                        } else {
                            old
                        }
                    }
                    AtomOp::And => old & v,
                    AtomOp::Or => old | v,
                    AtomOp::Xor => old ^ v,
                };
                let nb = new.to_le_bytes();
                match space {
                    Space::Shared => {
                        // Checked (and recorded) by `smem_atomic` above.
                        let at = a as usize;
                        self.smem[at..at + eb].copy_from_slice(&nb[..eb]);
                        self.smem_hi = self.smem_hi.max(at + eb);
                    }
                    _ => self
                        .mem
                        .write(a, &nb[..eb])
                        .map_err(|e| self.terr(t, inst, e))?,
                }
                if !is_red {
                    self.set(t, &ops[0], ty, old);
                }
            }
            Kind::Fence => {}
            _ => return Err(self.terr(t, inst, "not supported by the PTX simulator")),
        }
        Ok(())
    }

    fn kernel_reg_is_pred(&self, r: u32) -> bool {
        self.kernel.reg_types.get(r as usize) == Some(&Ty::Pred)
    }

    fn mov(&mut self, t: &mut Thread, inst: &Inst) -> Result<(), SimError> {
        let ty = inst.op.ty;
        let bits = ty.bits();
        match (&inst.ops[0], &inst.ops[1]) {
            (d, Operand::Vec(parts)) => {
                // Pack: the first element is the least significant.
                let w = bits / parts.len() as u32;
                let mut v = 0u64;
                for (k, p) in parts.iter().enumerate() {
                    v |= (self.src(t, p, width_ty(w)) & mask(w)) << (w * k as u32);
                }
                self.set(t, d, ty, v);
            }
            (Operand::Vec(parts), s) => {
                let v = self.src(t, s, ty);
                let w = bits / parts.len() as u32;
                for (k, p) in parts.iter().enumerate() {
                    self.set(t, p, width_ty(w), (v >> (w * k as u32)) & mask(w));
                }
            }
            (d, s) => {
                let v = self.src(t, s, ty);
                self.set(t, d, ty, v);
            }
        }
        Ok(())
    }

    fn cvt(&mut self, t: &mut Thread, inst: &Inst) -> Result<(), SimError> {
        let op = &inst.op;
        let (dt, st) = (op.ty, op.ty2);
        let ops = &inst.ops;
        if matches!(dt, Ty::Bf16x2 | Ty::F16x2) {
            // cvt.rn.bf16x2.f32 d, a, b: a to the upper half, b to the lower.
            let one = if dt == Ty::Bf16x2 { Ty::Bf16 } else { Ty::F16 };
            let a = fget(st, self.src(t, &ops[1], st));
            let b = fget(st, self.src(t, &ops[2], st));
            let v = (fset(one, a, op.round) << 16) | fset(one, b, op.round);
            self.set(t, &ops[0], Ty::B32, v);
            return Ok(());
        }
        let raw = self.src(t, &ops[1], st);
        let v = match (dt.float(), st.float()) {
            (true, true) => {
                let x = fget(st, raw);
                let x = match op.round {
                    Some(Round::Rni | Round::Rzi | Round::Rmi | Round::Rpi) => {
                        round_integral(x, op.round)
                    }
                    _ => x,
                };
                let x = if op.sat { sat01(x) } else { x };
                fset(dt, x, op.round)
            }
            (true, false) => {
                let x = if st.signed() {
                    sext(raw, st.bits()) as i128
                } else {
                    (raw & mask(st.bits())) as i128
                };
                if dt == Ty::F32 {
                    // Directly: via f64, 64-bit integers would round twice.
                    int_to_f32(x, op.round).to_bits() as u64
                } else {
                    fset(dt, x as f64, op.round)
                }
            }
            (false, true) => {
                let x = round_integral(fget(st, raw), op.round.or(Some(Round::Rzi)));
                let (lo, hi) = int_range(dt);
                if x.is_nan() {
                    0
                } else {
                    (x.clamp(lo, hi) as i128) as u64
                }
            }
            (false, false) => {
                let x = if st.signed() {
                    sext(raw, st.bits()) as i128
                } else {
                    (raw & mask(st.bits())) as i128
                };
                let x = if op.sat {
                    let (lo, hi) = int_range(dt);
                    x.clamp(lo as i128, hi as i128)
                } else {
                    x
                };
                x as u64
            }
        };
        self.set(t, &ops[0], dt, v);
        Ok(())
    }

    // ---- warp collectives ------------------------------------------------------

    fn collective(
        &mut self,
        threads: &mut [Thread],
        lanes: &[usize],
        inst: &Inst,
    ) -> Result<(), SimError> {
        let lane_of = |i: usize| i % 32;
        let op = &inst.op;
        match op.kind {
            // Orders the warp's shared-memory accesses before it with those after.
            Kind::BarWarp => self.wsync[lanes[0] / 32] += 1,
            Kind::Shfl(mode) => {
                // shfl.sync.mode.b32 d[|p], a, b, c, membermask
                let mut vals = [None; 32];
                for &i in lanes {
                    vals[lane_of(i)] = Some(self.src(&threads[i], &inst.ops[1], Ty::B32));
                }
                for &i in lanes {
                    let t = &threads[i];
                    let lane = lane_of(i) as i64;
                    let b = (self.src(t, &inst.ops[2], Ty::U32) & 0x1f) as i64;
                    let c = self.src(t, &inst.ops[3], Ty::U32) as i64;
                    let member = self.src(t, &inst.ops[4], Ty::U32) as u32;
                    let seg = (c >> 8) & 0x1f;
                    let cval = c & 0x1f;
                    let max_lane = (lane & seg) | (cval & !seg);
                    let min_lane = lane & seg;
                    let (j, ok) = match mode {
                        ShflMode::Up => (lane - b, lane - b >= max_lane),
                        ShflMode::Down => (lane + b, lane + b <= max_lane),
                        ShflMode::Bfly => (lane ^ b, (lane ^ b) <= max_lane),
                        ShflMode::Idx => {
                            let j = min_lane | (b & 0x1f & !seg);
                            (j, j <= max_lane)
                        }
                    };
                    let j = if ok { j } else { lane } as usize;
                    if member & (1 << lane) == 0 || member & (1 << j) == 0 {
                        return Err(self.terr(t, inst, format!("lane {lane} or its source {j} is outside the member mask {member:#x}")));
                    }
                    let v = vals[j]
                        .ok_or_else(|| self.terr(t, inst, format!("reads exited lane {j}")))?;
                    let t = &mut threads[i];
                    match &inst.ops[0] {
                        Operand::Vec(dp) => {
                            self.set(t, &dp[0], Ty::B32, v);
                            self.set(t, &dp[1], Ty::Pred, ok as u64);
                        }
                        d => self.set(t, d, Ty::B32, v),
                    }
                }
            }
            Kind::Vote(mode) => {
                let mut ballot = 0u32;
                for &i in lanes {
                    if self.src(&threads[i], &inst.ops[1], Ty::Pred) & 1 == 1 {
                        ballot |= 1 << lane_of(i);
                    }
                }
                let active: u32 = lanes.iter().map(|&i| 1u32 << lane_of(i)).sum();
                for &i in lanes {
                    let (ty, v) = match mode {
                        VoteMode::Ballot => (Ty::B32, ballot as u64),
                        VoteMode::Any => (Ty::Pred, (ballot != 0) as u64),
                        VoteMode::All => (Ty::Pred, (ballot == active) as u64),
                    };
                    self.set(&mut threads[i], &inst.ops[0], ty, v);
                }
            }
            Kind::Ldmatrix => self.ldmatrix(threads, lanes, inst)?,
            Kind::Mma => self.mma(threads, lanes, inst)?,
            _ => unreachable!(),
        }
        Ok(())
    }

    fn ldmatrix(
        &mut self,
        threads: &mut [Thread],
        lanes: &[usize],
        inst: &Inst,
    ) -> Result<(), SimError> {
        if lanes.len() != 32 {
            return Err(self.err(None, inst, "ldmatrix with inactive lanes"));
        }
        let nm = inst.op.vec as usize;
        let w0 = lanes[0];
        // rows[m][r]: the 8 b16 values of row r of matrix m, from lane 8m + r's address.
        let mut rows = [[[0u16; 8]; 8]; 4];
        for (m, mat) in rows.iter_mut().enumerate().take(nm) {
            for (r, row) in mat.iter_mut().enumerate() {
                let i = w0 + 8 * m + r;
                let a = self.addr(&threads[i], &inst.ops[1], inst)?;
                if a % 16 != 0 {
                    return Err(self.err(
                        Some(&threads[i]),
                        inst,
                        format!("ldmatrix row address {a:#x} is not 16-byte aligned"),
                    ));
                }
                for (c, v) in row.iter_mut().enumerate() {
                    *v = self.smem_read(i as u32, &threads[i], inst, a + 2 * c as u64, 2)? as u16;
                }
            }
        }
        let Operand::Vec(dst) = &inst.ops[0] else {
            return Err(self.err(None, inst, "ldmatrix destination is not a vector"));
        };
        for &i in lanes {
            let l = i % 32;
            for (m, d) in dst.iter().enumerate().take(nm) {
                let (lo, hi) = if inst.op.trans {
                    (rows[m][2 * (l % 4)][l / 4], rows[m][2 * (l % 4) + 1][l / 4])
                } else {
                    (rows[m][l / 4][2 * (l % 4)], rows[m][l / 4][2 * (l % 4) + 1])
                };
                self.set(&mut threads[i], d, Ty::B32, lo as u64 | (hi as u64) << 16);
            }
        }
        Ok(())
    }

    fn mma(
        &mut self,
        threads: &mut [Thread],
        lanes: &[usize],
        inst: &Inst,
    ) -> Result<(), SimError> {
        if lanes.len() != 32 {
            return Err(self.err(None, inst, "mma with inactive lanes"));
        }
        let op = &inst.op;
        if op.ty != Ty::F32 || !matches!(op.ty2, Ty::Bf16 | Ty::F16) {
            return Err(self.err(None, inst, "only f32 += bf16/f16 mma is simulated"));
        }
        let k = op.mma_k as usize;
        let half = |v: u16| -> f32 {
            if op.ty2 == Ty::Bf16 {
                bf16::from_bits(v).to_f32()
            } else {
                f16::from_bits(v).to_f32()
            }
        };
        let regs = |o: &Operand| -> Vec<Operand> {
            match o {
                Operand::Vec(v) => v.clone(),
                o => vec![o.clone()],
            }
        };
        let (d, a, b, c) = (
            regs(&inst.ops[0]),
            regs(&inst.ops[1]),
            regs(&inst.ops[2]),
            regs(&inst.ops[3]),
        );
        if a.len() != k / 4 || b.len() != k / 8 || c.len() != 4 || d.len() != 4 {
            return Err(self.err(None, inst, "mma operand counts do not match its shape"));
        }
        let mut am = [[0f32; 16]; 16];
        let mut bm = [[0f32; 8]; 16];
        let mut cm = [[0f32; 8]; 16];
        for &i in lanes {
            let t = &threads[i];
            let l = i % 32;
            let (g, q) = (l / 4, l % 4);
            for (r, o) in a.iter().enumerate() {
                let v = self.src(t, o, Ty::B32);
                // A: reg r holds rows g (r even) / g+8 (r odd), cols 2q.. (+8 for r >= 2).
                let row = g + 8 * (r % 2);
                let col = 2 * q + 8 * (r / 2);
                am[row][col] = half(v as u16);
                am[row][col + 1] = half((v >> 16) as u16);
            }
            for (r, o) in b.iter().enumerate() {
                let v = self.src(t, o, Ty::B32);
                let row = 2 * q + 8 * r;
                bm[row][g] = half(v as u16);
                bm[row + 1][g] = half((v >> 16) as u16);
            }
            for (r, o) in c.iter().enumerate() {
                let v = f32::from_bits(self.src(t, o, Ty::F32) as u32);
                cm[g + 8 * (r / 2)][2 * q + (r % 2)] = v;
            }
        }
        let mut dm = [[0f32; 8]; 16];
        for (row, drow) in dm.iter_mut().enumerate() {
            for (col, dv) in drow.iter_mut().enumerate() {
                let mut acc = cm[row][col] as f64;
                for kk in 0..k {
                    acc += am[row][kk] as f64 * bm[kk][col] as f64;
                }
                *dv = acc as f32;
            }
        }
        for &i in lanes {
            let l = i % 32;
            let (g, q) = (l / 4, l % 4);
            for (r, o) in d.iter().enumerate() {
                let v = dm[g + 8 * (r / 2)][2 * q + (r % 2)];
                self.set(&mut threads[i], o, Ty::F32, v.to_bits() as u64);
            }
        }
        self.stats.mma += 1;
        Ok(())
    }
}

fn sat01(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

fn wide_of(t: Ty) -> Ty {
    match t {
        Ty::S16 => Ty::S32,
        Ty::U16 => Ty::U32,
        Ty::S32 => Ty::S64,
        _ => Ty::U64,
    }
}

fn width_ty(bits: u32) -> Ty {
    match bits {
        8 => Ty::B8,
        16 => Ty::B16,
        32 => Ty::B32,
        _ => Ty::B64,
    }
}

fn int_range(t: Ty) -> (f64, f64) {
    let b = t.bits();
    if t.signed() {
        (-(2f64.powi(b as i32 - 1)), 2f64.powi(b as i32 - 1) - 1.0)
    } else {
        (0.0, 2f64.powi(b as i32) - 1.0)
    }
}

fn compare(cmp: Cmp, ty: Ty, a: u64, b: u64) -> bool {
    if ty.float() {
        let (x, y) = (fget(ty, a), fget(ty, b));
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !nan && x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt => !nan && x < y,
            Cmp::Le => !nan && x <= y,
            Cmp::Gt => !nan && x > y,
            Cmp::Ge => !nan && x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
            _ => false,
        };
    }
    let bits = ty.bits();
    let (ua, ub) = (a & mask(bits), b & mask(bits));
    let (sa, sb) = (sext(a, bits), sext(b, bits));
    let signed = ty.signed();
    match cmp {
        Cmp::Eq => ua == ub,
        Cmp::Ne => ua != ub,
        Cmp::Lt if signed => sa < sb,
        Cmp::Le if signed => sa <= sb,
        Cmp::Gt if signed => sa > sb,
        Cmp::Ge if signed => sa >= sb,
        Cmp::Lt | Cmp::Lo => ua < ub,
        Cmp::Le | Cmp::Ls => ua <= ub,
        Cmp::Gt | Cmp::Hi => ua > ub,
        Cmp::Ge | Cmp::Hs => ua >= ub,
        _ => false,
    }
}

/// A thread named in a race report (`MANY`: several).
fn who(id: u32) -> String {
    if id == MANY {
        "other threads".to_string()
    } else {
        format!("thread {id}")
    }
}
