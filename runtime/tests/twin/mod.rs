//! Host twin of the CUDA backend (tests only): the backend's own host code
//! (shard placement, launch planning, [`HostLaunch`]es with their grids and
//! argument lists built from the generated signatures, input encoding,
//! extra-input slicing, state chaining, download scatter) runs against
//! emulated device memory, and each kernel is replaced by a host emulation of
//! its documented contract that reads its arguments *by the generated
//! parameter names* and walks the launch's grid the way the CUDA source does.
//! The result must equal the f64 reference. A wrong binding, offset, stride,
//! grid or merge range changes the result or reads outside a buffer (which
//! panics here, where a GPU would read garbage); `wrong_launches_are_caught`
//! checks that such mutations are in fact detected.
//!
//! The `sim_*` tests replace the emulations by the kernels themselves:
//! NVRTC's PTX of the generated source executed by [`mixc_ptxsim`]
//! (tiling, mma fragments, `cp.async` pipelines, races). What neither
//! checks: the driver calls, stream/event ordering and peer copies; those
//! need a GPU (`tests/cuda_backend.rs`).

use std::collections::BTreeMap;
use std::ops::Range;

use mixc_codegen::{generate, Arch, GeneratedKernel, GridDim, KernelConfig, ParamRole, Target};
use mixc_dsl::ir::{DType, Decay, Dim, ElemType, EvalEnv, Family, MixerSpec, Norm, Score};
use mixc_ptxsim::{GlobalMemory, LaunchStats, Module};

use super::args::{
    chunk_launch, conv_pair, fill_neg_inf_launch, softmax_pair, ArgValue, ChunkBuffers, HostLaunch,
    KernelId, PairShape, SoftmaxBuffers, HELPER_THREADS,
};
use super::device::{decode, elem_bytes, encode};
use super::exec::{extra_bytes, input_is_int};
use super::plan::{
    device_of, gather_rows, held_slot, pair_launches, ring_fill_slot, scatter_rows,
    segment_summaries, tiling_of,
};
use super::rank::{assemble, run_rank, RankIo, RankJob, Transfer};
use crate::ring::{RingSchedule, Sharding};
use crate::tensor::{MixerInputs, Tensor};

mod backward;
mod flex;

/// Emulated device memory. Buffer `i` starts at address `(i + 1) << 32`, so
/// every pointer names its buffer and an offset; an access outside the
/// buffer (or through null) panics.
#[derive(Default)]
struct Mem {
    bufs: Vec<Vec<u8>>,
}

const POISON: u8 = 0xff; // NaN in f32, f16 and bf16 alike

impl Mem {
    fn alloc(&mut self, bytes: Vec<u8>) -> u64 {
        self.bufs.push(bytes);
        (self.bufs.len() as u64) << 32
    }
    /// A buffer of `n` bytes holding NaNs: whatever a kernel should have
    /// written and did not shows up in the result.
    fn poisoned(&mut self, n: usize) -> u64 {
        self.alloc(vec![POISON; n])
    }
    fn at(&self, addr: u64, byte: usize, len: usize) -> (usize, usize) {
        self.checked(addr + byte as u64, len)
            .unwrap_or_else(|e| panic!("{e}"))
    }
    /// Buffer index and offset of `len` bytes at `addr`, or why not.
    fn checked(&self, addr: u64, len: usize) -> Result<(usize, usize), String> {
        let id = (addr >> 32) as usize;
        if id == 0 {
            return Err(format!(
                "access through a null or unmapped pointer {addr:#x}"
            ));
        }
        let Some(buf) = self.bufs.get(id - 1) else {
            return Err(format!("access through unmapped pointer {addr:#x}"));
        };
        let off = (addr & 0xffff_ffff) as usize;
        if off + len > buf.len() {
            return Err(format!(
                "access at byte {off}..{} of a {}-byte buffer",
                off + len,
                buf.len()
            ));
        }
        Ok((id - 1, off))
    }
    fn rd(&self, dt: DType, addr: u64, idx: usize) -> f32 {
        let eb = elem_bytes(dt);
        let (id, off) = self.at(addr, idx * eb, eb);
        decode(dt, &self.bufs[id][off..off + eb])[0]
    }
    fn rd_i32(&self, addr: u64, idx: usize) -> i32 {
        let (id, off) = self.at(addr, idx * 4, 4);
        i32::from_le_bytes(self.bufs[id][off..off + 4].try_into().unwrap())
    }
    fn wr(&mut self, dt: DType, addr: u64, idx: usize, x: f32) {
        let eb = elem_bytes(dt);
        let (id, off) = self.at(addr, idx * eb, eb);
        self.bufs[id][off..off + eb].copy_from_slice(&encode(dt, &[x]));
    }
    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let (id, off) = self.at(addr, 0, len);
        self.bufs[id][off..off + len].to_vec()
    }
    fn copy(&mut self, src: u64, dst: u64, len: usize) {
        let b = self.bytes(src, len);
        let (id, off) = self.at(dst, 0, len);
        self.bufs[id][off..off + len].copy_from_slice(&b);
    }
}

/// A launch's arguments looked up by the generated parameter names.
struct Args<'a> {
    g: &'a GeneratedKernel,
    vals: &'a [ArgValue],
}

impl Args<'_> {
    fn find(&self, pred: impl Fn(&mixc_codegen::KernelParam) -> bool, what: &str) -> ArgValue {
        let params = &self.g.kernels[0].params;
        assert_eq!(params.len(), self.vals.len(), "argument count");
        let i = params
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("no parameter {what}"));
        self.vals[i]
    }
    fn int(&self, name: &str) -> i64 {
        match self.find(|p| p.name == name, name) {
            ArgValue::Int(v) => v as i64,
            ArgValue::Ptr(_) => panic!("`{name}` is a pointer"),
        }
    }
    fn ptr(&self, name: &str) -> u64 {
        match self.find(|p| p.name == name, name) {
            ArgValue::Ptr(v) => v,
            ArgValue::Int(_) => panic!("`{name}` is an int"),
        }
    }
    fn has(&self, name: &str) -> bool {
        self.g.kernels[0].params.iter().any(|p| p.name == name)
    }
    fn opt(&self, name: &str) -> u64 {
        if self.has(name) {
            self.ptr(name)
        } else {
            0
        }
    }
    fn input(&self, name: &str) -> u64 {
        match self.find(|p| p.role == ParamRole::Input(name.into()), name) {
            ArgValue::Ptr(v) => v,
            ArgValue::Int(_) => panic!("input `{name}` is an int"),
        }
    }
}

fn usize_of(v: i64, what: &str) -> usize {
    usize::try_from(v).unwrap_or_else(|_| panic!("`{what}` = {v} is negative"))
}

/// Query rows per CTA, read from the kernel's own grid description.
fn block_m(g: &GeneratedKernel) -> usize {
    match g.kernels[0].grid[0] {
        GridDim::QueryBlocks { block } => block as usize,
        ref d => panic!("grid x is {d:?}, not query blocks"),
    }
}

fn score_maps(spec: &MixerSpec) -> (mixc_dsl::ir::FeatureMap, mixc_dsl::ir::FeatureMap, f64) {
    match &spec.score {
        Score::Dot {
            q_map,
            k_map,
            scale,
        } => (*q_map, *k_map, *scale),
        Score::Filter { .. } => panic!("not a dot score"),
    }
}

/// The softmax kernels' contract (softmax.cu / softmax_simt.cu): CTA
/// (x, head, batch) computes buffer rows `q_begin + x * BLOCK_M ..` (clipped
/// to `q_end`) against keys `[kv_begin, kv_end)`; writes `o` (storage type)
/// normalised over the visible keys and the natural-log `lse`.
fn softmax_kernel(mem: &mut Mem, spec: &MixerSpec, g: &GeneratedKernel, dt: DType, x: &HostLaunch) {
    let a = Args { g, vals: &x.args };
    let (h_, kvh, d, dv) = (
        spec.heads as usize,
        spec.kv_heads as usize,
        spec.head_dim as usize,
        spec.value_dim as usize,
    );
    let (q, k, v, o, lse) = (a.ptr("q"), a.ptr("k"), a.ptr("v"), a.ptr("o"), a.ptr("lse"));
    let q_rows = usize_of(a.int("q_rows"), "q_rows");
    let kv_rows = usize_of(a.int("kv_rows"), "kv_rows");
    let (q_begin, q_end) = (a.int("q_begin"), a.int("q_end"));
    let (kv_begin, kv_end) = (a.int("kv_begin"), a.int("kv_end"));
    let (q_pos0, k_pos0, seq_len) = (a.int("q_pos0"), a.int("k_pos0"), a.int("seq_len"));
    assert!(
        0 <= q_begin && q_end as usize <= q_rows,
        "query rows outside the buffer"
    );
    assert!(
        0 <= kv_begin && kv_end as usize <= kv_rows,
        "key rows outside the buffer"
    );
    let (q_map, k_map, scale) = score_maps(spec);
    let bm = block_m(g);
    let mut segs = Vec::new();
    spec.mask.segment_inputs(&mut segs);
    let (gx, gy, gz) = x.grid;
    for b in 0..gz as usize {
        // Segment ids and tables are read where the kernel reads them: full
        // tensors indexed by global position, `seq_len` per sequence.
        let seg = |name: &str, pos: i64| -> i64 {
            assert!(
                (0..seq_len).contains(&pos),
                "segment id read at position {pos}"
            );
            mem.rd_i32(a.input(name), b * seq_len as usize + pos as usize) as i64
        };
        let lookup = |name: &str, idx: &[i64]| -> f64 {
            let decl = spec.input(name).expect("declared input");
            let mut off = 0usize;
            for (ix, dim) in idx.iter().zip(&decl.dims) {
                let n = match dim {
                    Dim::Batch => gz as usize,
                    Dim::Seq => seq_len as usize,
                    Dim::Heads => h_,
                    Dim::KvHeads => kvh,
                    Dim::Fixed(n) => *n as usize,
                };
                off = off * n + (*ix).clamp(0, n as i64 - 1) as usize;
            }
            match decl.elem {
                ElemType::F32 => mem.rd(DType::F32, a.input(name), off) as f64,
                ElemType::I32 => mem.rd_i32(a.input(name), off) as f64,
            }
        };
        let mut writes = Vec::new();
        for head in 0..gy as usize {
            let kv_head = head / (h_ / kvh);
            for bx in 0..gx as usize {
                let m0 = q_begin as usize + bx * bm;
                for r in m0..(m0 + bm).min(q_end as usize) {
                    let i = q_pos0 + r as i64;
                    let qr: Vec<f64> = (0..d)
                        .map(|c| {
                            q_map
                                .apply(mem.rd(dt, q, ((b * q_rows + r) * h_ + head) * d + c) as f64)
                        })
                        .collect();
                    let mut scores = Vec::new();
                    for c in kv_begin as usize..kv_end as usize {
                        let j = k_pos0 + c as i64;
                        // The kernels' `b`, `seq` and `kv_seq`: the batch
                        // index and the global length (queries and keys of
                        // one sequence).
                        let env = |s: f64| EvalEnv {
                            i,
                            j,
                            h: head as i64,
                            s,
                            b: b as i64,
                            seq: seq_len,
                            kv_seq: seq_len,
                            heads: spec.heads,
                            lookup: &lookup,
                        };
                        if !spec.mask.allows(&env(0.0), &seg) {
                            continue;
                        }
                        let dot: f64 = (0..d)
                            .map(|e| {
                                qr[e]
                                    * k_map.apply(mem.rd(
                                        dt,
                                        k,
                                        ((b * kv_rows + c) * kvh + kv_head) * d + e,
                                    ) as f64)
                            })
                            .sum();
                        let mut s = dot * scale;
                        if let Some(bias) = &spec.bias {
                            s += bias.eval_f64(&env(s));
                        }
                        if let Some(t) = &spec.transform {
                            s = t.eval_f64(&env(s));
                        }
                        scores.push((c, s));
                    }
                    let oi = ((b * q_rows + r) * h_ + head) * dv;
                    let li = (b * h_ + head) * q_rows + r;
                    if scores.is_empty() {
                        writes.push((oi, vec![0.0; dv], li, f32::NEG_INFINITY));
                        continue;
                    }
                    let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = 0.0;
                    let mut acc = vec![0.0f64; dv];
                    for &(c, s) in &scores {
                        let w = (s - m).exp();
                        sum += w;
                        for (col, ac) in acc.iter_mut().enumerate() {
                            *ac += w
                                * mem.rd(dt, v, ((b * kv_rows + c) * kvh + kv_head) * dv + col)
                                    as f64;
                        }
                    }
                    let out = acc.iter().map(|x| (x / sum) as f32).collect();
                    writes.push((oi, out, li, (m + sum.ln()) as f32));
                }
            }
        }
        for (oi, out, li, l) in writes {
            for (c, x) in out.into_iter().enumerate() {
                mem.wr(dt, o, oi + c, x);
            }
            mem.wr(DType::F32, lse, li, l);
        }
    }
}

/// `mixc_merge_lse_<dtype>` (exec.rs's helper source), argument by argument.
fn merge_kernel(mem: &mut Mem, dt: DType, x: &HostLaunch) {
    let p = |i: usize| match x.args[i] {
        ArgValue::Ptr(p) => p,
        ArgValue::Int(_) => panic!("merge argument {i} is not a pointer"),
    };
    let n = |i: usize| match x.args[i] {
        ArgValue::Int(v) => v as usize,
        ArgValue::Ptr(_) => panic!("merge argument {i} is not an int"),
    };
    assert_eq!(x.args.len(), 10);
    assert!(x.grid.0 >= 1 && x.threads == HELPER_THREADS);
    let (acc_o, acc_lse, part_o, part_lse) = (p(0), p(1), p(2), p(3));
    let (batch, rows, heads, dv, rb, re) = (n(4), n(5), n(6), n(7), n(8), n(9));
    for b in 0..batch {
        for h in 0..heads {
            for r in rb..re {
                let li = (b * heads + h) * rows + r;
                let lb = mem.rd(DType::F32, part_lse, li);
                if lb == f32::NEG_INFINITY {
                    continue;
                }
                let la = mem.rd(DType::F32, acc_lse, li);
                let m = la.max(lb);
                let (wa, wb) = ((la - m).exp(), (lb - m).exp());
                let oi = ((b * rows + r) * heads + h) * dv;
                for c in 0..dv {
                    let y = (mem.rd(DType::F32, acc_o, oi + c) * wa
                        + mem.rd(dt, part_o, oi + c) * wb)
                        / (wa + wb);
                    mem.wr(DType::F32, acc_o, oi + c, y);
                }
                mem.wr(DType::F32, acc_lse, li, m + (wa + wb).ln());
            }
        }
    }
}

/// conv_simt.cu / conv_mma.cu: CTA (x, head * dv_blocks + n, batch) computes
/// accumulator rows `x * BLOCK_M ..` (clipped to `q_rows`), row `i` being
/// position `q_pos0 + i`, from keys `[kv_begin, kv_end)` at `k_pos0 + j`.
fn conv_kernel(mem: &mut Mem, spec: &MixerSpec, g: &GeneratedKernel, dt: DType, x: &HostLaunch) {
    let a = Args { g, vals: &x.args };
    let Score::Filter { input } = &spec.score else {
        panic!("not a convolution")
    };
    let (h_, kvh, dv) = (
        spec.heads as usize,
        spec.kv_heads as usize,
        spec.value_dim as usize,
    );
    let (v, filt, o, o_acc) = (a.ptr("v"), a.input(input), a.ptr("o"), a.ptr("o_acc"));
    let q_rows = usize_of(a.int("q_rows"), "q_rows");
    let kv_rows = usize_of(a.int("kv_rows"), "kv_rows");
    let (kv_begin, kv_end) = (a.int("kv_begin"), a.int("kv_end"));
    assert!(
        0 <= kv_begin && kv_end as usize <= kv_rows,
        "key rows outside the buffer"
    );
    let (q_pos0, k_pos0) = (a.int("q_pos0"), a.int("k_pos0"));
    let flen = a.int("seq_len");
    let accumulate = a.int("accumulate") != 0;
    let bm = block_m(g);
    let (gx, gy, gz) = x.grid;
    assert_eq!(gy as usize % h_, 0, "grid y is heads x value-dim blocks");
    let dvb = gy as usize / h_;
    for b in 0..gz as usize {
        for by in (0..gy as usize).step_by(dvb) {
            let h = by / dvb;
            for bx in 0..gx as usize {
                for i in bx * bm..((bx + 1) * bm).min(q_rows) {
                    for col in 0..dv {
                        let mut y = 0f64;
                        for j in kv_begin..kv_end {
                            let lag = q_pos0 + i as i64 - (k_pos0 + j);
                            if !(0..flen).contains(&lag) {
                                continue;
                            }
                            let f =
                                mem.rd(DType::F32, filt, h * flen as usize + lag as usize) as f64;
                            let vj = mem.rd(
                                dt,
                                v,
                                ((b * kv_rows + j as usize) * kvh + h / (h_ / kvh)) * dv + col,
                            );
                            y += f * vj as f64;
                        }
                        let off = ((b * q_rows + i) * h_ + h) * dv + col;
                        let mut y = y as f32;
                        if o_acc != 0 {
                            if accumulate {
                                y += mem.rd(DType::F32, o_acc, off);
                            }
                            mem.wr(DType::F32, o_acc, off, y);
                        }
                        if o != 0 {
                            mem.wr(dt, o, off, y);
                        }
                    }
                }
            }
        }
    }
}

/// chunkwise_*.cu: CTA (n, head, batch) runs the recurrence over the launch's
/// `rows` tokens from `state_in` (null: zero), writing `o` and `state_out`.
/// S_t = gamma_t S_{t-1} + psi(k_t) v_t^T, o_t = scale phi(q_t) S_t
/// (divided by scale phi(q_t) z_t + eps for sum normalisation).
fn chunk_kernel(mem: &mut Mem, spec: &MixerSpec, g: &GeneratedKernel, dt: DType, x: &HostLaunch) {
    let a = Args { g, vals: &x.args };
    let (h_, kvh, dk, dv) = (
        spec.heads as usize,
        spec.kv_heads as usize,
        spec.head_dim as usize,
        spec.value_dim as usize,
    );
    let (q_map, k_map, scale) = score_maps(spec);
    let (q, k, v, o) = (a.ptr("q"), a.ptr("k"), a.ptr("v"), a.ptr("o"));
    let (s_in, s_out) = (a.ptr("state_in"), a.ptr("state_out"));
    let (z_in, z_out) = (a.opt("z_in"), a.opt("z_out"));
    assert_eq!(a.opt("o_num"), 0);
    assert_eq!(a.opt("o_den"), 0);
    let rows = usize_of(a.int("rows"), "rows");
    let (gx, gy, gz) = x.grid;
    assert!(gx >= 1, "no value-dim block launched");
    for b in 0..gz as usize {
        for h in 0..gy as usize {
            let bh = b * h_ + h;
            let kh = h / (h_ / kvh);
            let mut st: Vec<f64> = (0..dk * dv)
                .map(|i| {
                    if s_in != 0 {
                        mem.rd(DType::F32, s_in, bh * dk * dv + i) as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut z: Vec<f64> = (0..dk)
                .map(|i| {
                    if z_in != 0 {
                        mem.rd(DType::F32, z_in, bh * dk + i) as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            for t in 0..rows {
                let gamma = match &spec.decay {
                    Decay::None => 1.0,
                    Decay::PerHead(e) => e.eval_f64(&EvalEnv {
                        i: 0,
                        j: 0,
                        h: h as i64,
                        s: 0.0,
                        b: 0,
                        seq: 0,
                        kv_seq: 0,
                        heads: spec.heads,
                        lookup: &|_, _| panic!("a per-head decay reads no input"),
                    }),
                    Decay::Gate { input } => {
                        mem.rd(DType::F32, a.input(input), (b * rows + t) * h_ + h) as f64
                    }
                };
                let kt: Vec<f64> = (0..dk)
                    .map(|d| {
                        k_map.apply(mem.rd(dt, k, ((b * rows + t) * kvh + kh) * dk + d) as f64)
                    })
                    .collect();
                let qt: Vec<f64> = (0..dk)
                    .map(|d| q_map.apply(mem.rd(dt, q, ((b * rows + t) * h_ + h) * dk + d) as f64))
                    .collect();
                let vt: Vec<f64> = (0..dv)
                    .map(|c| mem.rd(dt, v, ((b * rows + t) * kvh + kh) * dv + c) as f64)
                    .collect();
                for d in 0..dk {
                    z[d] = gamma * z[d] + kt[d];
                    for c in 0..dv {
                        st[d * dv + c] = gamma * st[d * dv + c] + kt[d] * vt[c];
                    }
                }
                let den: f64 = scale * (0..dk).map(|d| qt[d] * z[d]).sum::<f64>();
                for c in 0..dv {
                    let num = scale * (0..dk).map(|d| qt[d] * st[d * dv + c]).sum::<f64>();
                    let y = match spec.norm {
                        Norm::Sum { eps } => num / (den + eps),
                        _ => num,
                    };
                    mem.wr(dt, o, ((b * rows + t) * h_ + h) * dv + c, y as f32);
                }
            }
            if s_out != 0 {
                for (i, s) in st.iter().enumerate() {
                    mem.wr(DType::F32, s_out, bh * dk * dv + i, *s as f32);
                }
            }
            if z_out != 0 {
                for (i, s) in z.iter().enumerate() {
                    mem.wr(DType::F32, z_out, bh * dk + i, *s as f32);
                }
            }
        }
    }
}

/// Changes a launch before it runs (the mutation tests); identity otherwise.
type Mutate<'a> = &'a dyn Fn(&mut HostLaunch, &GeneratedKernel);
type Mutation = Box<dyn Fn(&mut HostLaunch, &GeneratedKernel)>;

struct Twin<'a> {
    spec: &'a MixerSpec,
    g: GeneratedKernel,
    dt: DType,
    mem: Mem,
    mutate: Mutate<'a>,
    /// When set, kernels run as NVRTC's PTX in the simulator instead of
    /// their host emulations.
    sim: Option<Sim>,
}

/// The PTX of the generated kernel and of the backend's helpers.
struct Sim {
    main: Module,
    helpers: Module,
    helper_names: [String; 2],
    /// The generated backward module and its kernel names, when loaded.
    backward: Option<(Module, Vec<String>)>,
    stats: LaunchStats,
    /// Executions per instruction of the main kernel, when profiling.
    profile: Option<Vec<u64>>,
}

impl Sim {
    fn new(g: &GeneratedKernel, dt: DType) -> Sim {
        Sim::with_profile(g, dt, false)
    }

    fn with_profile(g: &GeneratedKernel, dt: DType, profile: bool) -> Sim {
        let ptx = |name: &str, src: &str| {
            let text = crate::nvrtc::compile_ptx(name, src, g.target.arch, profile)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            Module::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        Sim {
            main: ptx(&g.kernels[0].name, &g.source),
            helpers: ptx("mixc_helpers", super::helper_kernels_source()),
            helper_names: super::helper_kernel_names(dt),
            backward: None,
            stats: LaunchStats::default(),
            profile: profile.then(Vec::new),
        }
    }

    fn launch(&mut self, mem: &mut Mem, g: &GeneratedKernel, x: &HostLaunch) {
        let (module, name) = match x.kernel {
            KernelId::Main => (&self.main, g.kernels[0].name.as_str()),
            KernelId::Merge => (&self.helpers, self.helper_names[0].as_str()),
            KernelId::FillNegInf => (&self.helpers, self.helper_names[1].as_str()),
            KernelId::Backward(i) => {
                let (m, names) = self.backward.as_ref().expect("backward module not loaded");
                (m, names[i].as_str())
            }
        };
        let params: Vec<u64> = x.args.iter().map(|a| a.slot()).collect();
        let profile = match x.kernel {
            KernelId::Main => self.profile.as_mut(),
            _ => None,
        };
        let st = module
            .launch_profiled(
                mem,
                name,
                x.grid,
                (x.threads, 1, 1),
                x.smem,
                &params,
                profile,
            )
            .unwrap_or_else(|e| panic!("{name} grid {:?}: {e}", x.grid));
        self.stats.ctas += st.ctas;
        self.stats.instructions += st.instructions;
        self.stats.mma += st.mma;
        self.stats.barriers += st.barriers;
        self.stats.smem_bytes = self.stats.smem_bytes.max(st.smem_bytes);
    }
}

impl GlobalMemory for Mem {
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), String> {
        let (id, off) = self.checked(addr, out.len())?;
        out.copy_from_slice(&self.bufs[id][off..off + out.len()]);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String> {
        let (id, off) = self.checked(addr, data.len())?;
        self.bufs[id][off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn alloc(&mut self, data: Vec<u8>) -> u64 {
        Mem::alloc(self, data)
    }
}

impl Twin<'_> {
    fn exec(&mut self, mut x: HostLaunch) {
        (self.mutate)(&mut x, &self.g);
        if x.grid.0 == 0 || x.grid.1 == 0 || x.grid.2 == 0 {
            return; // Gpu::launch skips empty grids too
        }
        if let Some(sim) = &mut self.sim {
            sim.launch(&mut self.mem, &self.g, &x);
            return;
        }
        match (x.kernel, self.spec.family) {
            (KernelId::FillNegInf, _) => {
                let (ArgValue::Ptr(p), ArgValue::Int(n)) = (x.args[0], x.args[1]) else {
                    panic!("fill arguments")
                };
                for i in 0..n as usize {
                    self.mem.wr(DType::F32, p, i, f32::NEG_INFINITY);
                }
            }
            (KernelId::Merge, _) => merge_kernel(&mut self.mem, self.dt, &x),
            (KernelId::Main, Family::Softmax) => {
                softmax_kernel(&mut self.mem, self.spec, &self.g, self.dt, &x)
            }
            (KernelId::Main, Family::Convolution) => {
                conv_kernel(&mut self.mem, self.spec, &self.g, self.dt, &x)
            }
            (KernelId::Main, _) => chunk_kernel(&mut self.mem, self.spec, &self.g, self.dt, &x),
            (KernelId::Backward(_), _) => {
                panic!("the backward kernels have no host emulation: run them in the simulator")
            }
        }
    }

    /// Full extra inputs by name, as `Backend::upload_full_inputs` uploads them.
    fn full_inputs(&mut self, x: &MixerInputs) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for p in self.g.kernels[0].params.clone() {
            if let ParamRole::Input(name) = &p.role {
                let as_int = input_is_int(&p.name, &p.c_type).unwrap();
                let bytes = extra_bytes(&x.extra[name], as_int, None);
                out.insert(name.clone(), self.mem.alloc(bytes));
            }
        }
        out
    }

    /// The pairwise ring exactly as `Backend::prepare_pairwise` lays it out
    /// and `enqueue_pairwise` steps it (shards passed to rank + 1 into the
    /// double buffer, prefix copies of `batch * rows` rows).
    fn pairwise(&mut self, x: &MixerInputs, sched: &RingSchedule) -> Tensor<f32> {
        let spec = self.spec;
        let (b, seq) = (x.batch, x.seq);
        let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
        let e = elem_bytes(self.dt);
        let info = self.g.kernels[0].clone();
        let softmax = spec.family == Family::Softmax;
        let with_k = info.params.iter().any(|p| p.role == ParamRole::K);
        let tiling = tiling_of(&self.g.config);
        let segs = segment_summaries(spec, x, tiling);
        let inputs = self.full_inputs(x);
        let ranks = sched.ranks;
        let max_rows = (0..ranks).map(|r| sched.shard_len(r)).max().unwrap();
        let enc = |t: &Tensor<f32>, w: usize, rs: &[Range<usize>]| {
            encode(self.dt, &gather_rows(&t.data, b, seq, w, rs))
        };
        // Per rank: home (k, v), two poisoned ring buffers, queries, accumulators.
        struct Rank {
            home: (u64, u64),
            ring: [(u64, u64); 2],
            q: u64,
            acc_o: u64,
            acc_lse: u64,
            part_o: u64,
            part_lse: u64,
            conv: Vec<u64>,
        }
        let mut rk = Vec::new();
        for r in 0..ranks {
            let qr = sched.shard(r);
            let nq = sched.shard_len(r);
            let home_k = if with_k {
                self.mem.alloc(enc(&x.k, kvh * dk, qr))
            } else {
                0
            };
            let home_v = self.mem.alloc(enc(&x.v, kvh * dv, qr));
            let mut ring = [(0, 0); 2];
            for slot in &mut ring {
                let k = if with_k {
                    self.mem.poisoned(b * max_rows * kvh * dk * e)
                } else {
                    0
                };
                *slot = (k, self.mem.poisoned(b * max_rows * kvh * dv * e));
            }
            // The convolution family reads no queries (and has none).
            let q = if softmax {
                self.mem.alloc(enc(&x.q, h * dk, qr))
            } else {
                0
            };
            rk.push(Rank {
                home: (home_k, home_v),
                ring,
                q,
                acc_o: self.mem.alloc(vec![0; b * nq * h * dv * 4]),
                acc_lse: self.mem.poisoned(b * h * nq * 4),
                part_o: self.mem.poisoned(b * nq * h * dv * e),
                part_lse: self.mem.poisoned(b * h * nq * 4),
                conv: qr
                    .iter()
                    .map(|q| self.mem.alloc(vec![0; b * q.len() * h * dv * 4]))
                    .collect(),
            });
        }
        if softmax {
            for (r, x) in rk.iter().enumerate() {
                let l = fill_neg_inf_launch(x.acc_lse, b * h * sched.shard_len(r)).unwrap();
                self.exec(l);
            }
        }
        let held = |rk: &[Rank], r: usize, step: usize| match held_slot(step) {
            None => rk[r].home,
            Some(s) => rk[r].ring[s],
        };
        for step in 0..ranks {
            if step + 1 < ranks {
                for r in 0..ranks {
                    let dst = (r + 1) % ranks;
                    let rows = sched.shard_len(sched.held_at(r, step));
                    let (src, to) = (held(&rk, r, step), rk[dst].ring[ring_fill_slot(step)]);
                    if with_k {
                        self.mem.copy(src.0, to.0, b * rows * kvh * dk * e);
                    }
                    self.mem.copy(src.1, to.1, b * rows * kvh * dv * e);
                }
            }
            for r in 0..ranks {
                let kv = sched.shard(sched.held_at(r, step));
                let kv_rows = sched.shard_len(sched.held_at(r, step));
                let (hk, hv) = held(&rk, r, step);
                let (ls, _) = pair_launches(&spec.mask, tiling, &segs, sched.shard(r), kv);
                let shape = PairShape {
                    batch: b,
                    heads: h,
                    value_dim: dv,
                    q_rows: sched.shard_len(r),
                    kv_rows,
                    seq_len: seq,
                };
                for l in &ls {
                    let rr = &rk[r];
                    if softmax {
                        let bufs = SoftmaxBuffers {
                            q: rr.q,
                            k: hk,
                            v: hv,
                            part_o: rr.part_o,
                            part_lse: rr.part_lse,
                            acc_o: rr.acc_o,
                            acc_lse: rr.acc_lse,
                        };
                        for x in softmax_pair(&info, &inputs, &bufs, l, &shape).unwrap() {
                            self.exec(x);
                        }
                    } else {
                        let flen = x
                            .extra
                            .values()
                            .next()
                            .unwrap()
                            .shape()
                            .last()
                            .copied()
                            .unwrap();
                        let shape = PairShape {
                            q_rows: l.q.len(),
                            seq_len: flen,
                            ..shape
                        };
                        let launch =
                            conv_pair(&info, &inputs, hv, rr.conv[l.q_index], l, &shape).unwrap();
                        self.exec(launch);
                    }
                }
            }
        }
        let w = h * dv;
        let mut out = Tensor::<f32>::zeros(&[b, seq, h, dv]);
        for (r, x) in rk.iter().enumerate() {
            let qr = sched.shard(r);
            if softmax {
                let nq = sched.shard_len(r);
                let d = decode(DType::F32, &self.mem.bytes(x.acc_o, b * nq * w * 4));
                scatter_rows(&mut out.data, &d, b, seq, w, nq, qr);
            } else {
                for (buf, q) in x.conv.iter().zip(qr) {
                    let d = decode(DType::F32, &self.mem.bytes(*buf, b * q.len() * w * 4));
                    scatter_rows(
                        &mut out.data,
                        &d,
                        b,
                        seq,
                        w,
                        q.len(),
                        std::slice::from_ref(q),
                    );
                }
            }
        }
        out
    }

    /// The chunkwise chain as `prepare_chunkwise` / `enqueue_chunkwise` run
    /// it over `devices` GPUs: ranges in sequence order, the state read in
    /// place on the same GPU or copied into the range's own `state_in`.
    fn chunkwise(&mut self, x: &MixerInputs, sched: &RingSchedule, devices: usize) -> Tensor<f32> {
        let spec = self.spec;
        let (b, seq) = (x.batch, x.seq);
        let (h, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (dk, dv) = (spec.head_dim as usize, spec.value_dim as usize);
        let e = elem_bytes(self.dt);
        let info = self.g.kernels[0].clone();
        let norm_sum = matches!(spec.norm, Norm::Sum { .. });
        let gate = match &spec.decay {
            Decay::Gate { input } => Some(input.clone()),
            _ => None,
        };
        let (sb, zb) = (b * h * dk * dv * 4, b * h * dk * 4);
        let mut out = Tensor::<f32>::zeros(&[b, seq, h, dv]);
        // (device, state, z) of the previous range.
        let mut prev: Option<(usize, u64, u64)> = None;
        for (range, owner) in sched.ranges_in_order() {
            let dev = device_of(owner, devices);
            let rs = std::slice::from_ref(&range);
            let n = range.len();
            let up =
                |t: &Tensor<f32>, w: usize| encode(self.dt, &gather_rows(&t.data, b, seq, w, rs));
            let (q, k, v) = (up(&x.q, h * dk), up(&x.k, kvh * dk), up(&x.v, kvh * dv));
            let (q, k, v) = (self.mem.alloc(q), self.mem.alloc(k), self.mem.alloc(v));
            let gate_buf = gate.as_ref().map(|name| {
                let bytes = extra_bytes(&x.extra[name], false, Some((b, seq, range.clone())));
                (name.clone(), self.mem.alloc(bytes))
            });
            let o = self.mem.poisoned(b * n * h * dv * e);
            let state = self.mem.poisoned(sb);
            let z = norm_sum.then(|| self.mem.poisoned(zb));
            let (state_in, z_in) = match prev {
                None => (None, None),
                Some((pd, ps, pz)) if pd == dev => (Some(ps), z.map(|_| pz)),
                Some((_, ps, pz)) => {
                    let s = self.mem.poisoned(sb);
                    self.mem.copy(ps, s, sb);
                    let zi = z.map(|_| {
                        let zi = self.mem.poisoned(zb);
                        self.mem.copy(pz, zi, zb);
                        zi
                    });
                    (Some(s), zi)
                }
            };
            let bufs = ChunkBuffers {
                q,
                k,
                v,
                gate: gate_buf,
                state_in,
                z_in,
                o,
                state_out: state,
                z_out: z,
            };
            self.exec(chunk_launch(&info, &bufs, n, b, h).unwrap());
            let d = decode(self.dt, &self.mem.bytes(o, b * n * h * dv * e));
            scatter_rows(&mut out.data, &d, b, seq, h * dv, n, rs);
            prev = Some((dev, state, z.unwrap_or(0)));
        }
        out
    }
}

/// The generated kernel the twin emulates, with small query blocks (the
/// emulation reads them from the grid) so short sequences still spread over
/// several CTAs; the planning tiles follow.
fn twin_kernel(spec: &MixerSpec, dt: DType) -> GeneratedKernel {
    let target = Target::new(Arch::Sm90, dt);
    let cfg = KernelConfig::default_for(spec, &target);
    let g = generate(spec, &target, &cfg).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
    twin_tiles(g)
}

/// Small query blocks for the emulation (see [`twin_kernel`]).
fn twin_tiles(mut g: GeneratedKernel) -> GeneratedKernel {
    if let GridDim::QueryBlocks { block } = &mut g.kernels[0].grid[0] {
        *block = 4;
        g.config.block_m = 4;
        g.config.block_n = 4;
    }
    g
}

/// Runs `spec` through the twin on `devices` emulated GPUs (which only the
/// chunkwise chain's state copies depend on), with `mutate` applied to every
/// launch.
fn run_twin(
    spec: &MixerSpec,
    x: &MixerInputs,
    dt: DType,
    ranks: usize,
    sharding: Sharding,
    devices: usize,
    mutate: Mutate<'_>,
) -> Tensor<f32> {
    let g = twin_kernel(spec, dt);
    run_twin_kernel(spec, g, x, dt, (ranks, sharding, devices), mutate)
}

/// [`run_twin`] with a given generated kernel.
fn run_twin_kernel(
    spec: &MixerSpec,
    g: GeneratedKernel,
    x: &MixerInputs,
    dt: DType,
    (ranks, sharding, devices): (usize, Sharding, usize),
    mutate: Mutate<'_>,
) -> Tensor<f32> {
    let sched = RingSchedule::new(x.seq, ranks, sharding).unwrap();
    let mut t = Twin {
        spec,
        g,
        dt,
        mem: Mem::default(),
        mutate,
        sim: None,
    };
    match spec.family {
        Family::Softmax | Family::Convolution => t.pairwise(x, &sched),
        _ => t.chunkwise(x, &sched, devices),
    }
}

fn max_rel_err(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
    let scale = want
        .data
        .iter()
        .fold(0f64, |m, w| m.max(w.abs()))
        .max(1e-12);
    got.data
        .iter()
        .zip(&want.data)
        .map(|(g, w)| {
            let e = (*g as f64 - w).abs();
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
        / scale
}

fn parse(src: &str) -> MixerSpec {
    mixc_dsl::parse_str(src).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn no_mutation(_: &mut HostLaunch, _: &GeneratedKernel) {}

/// Checks every (seq, ranks, sharding) of `spec` in `dt` against the reference.
fn check_spec(spec: &MixerSpec, dt: DType, seqs: &[usize], tol: f64) -> usize {
    let mut n = 0;
    for &seq in seqs {
        let mut x = crate::inputs::random_inputs(spec, 2, seq, 7 + seq as u64);
        crate::inputs::round_to_dtype(&mut x, dt).unwrap();
        let want = crate::reference::evaluate(spec, &x).unwrap();
        for ranks in 1..=4usize.min(seq) {
            for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                for devices in [1, 2] {
                    let chunk = !matches!(spec.family, Family::Softmax | Family::Convolution);
                    if devices == 2 && !chunk {
                        continue; // pairwise layout does not depend on the device count
                    }
                    let got = run_twin(spec, &x, dt, ranks, sharding, devices, &no_mutation);
                    let err = max_rel_err(&got, &want);
                    assert!(
                        err <= tol,
                        "{} {dt:?} seq {seq} R {ranks} {sharding:?} {devices} dev: error {err:.2e}",
                        spec.name
                    );
                    n += 1;
                }
            }
        }
    }
    n
}

const SOFTMAX_SPECS: [&str; 9] = [
    "mixer gqa { heads = 4; kv_heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); mask = causal; norm = softmax; }",
    "mixer full { heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); mask = all; norm = softmax; }",
    "mixer doc { heads = 2; head_dim = 16; dtype = f32; input doc: i32[batch, seq]; score = dot(q, k); mask = causal && segment(doc); norm = softmax; }",
    "mixer alibi { heads = 4; head_dim = 16; dtype = f32; score = dot(q, k); bias = -alibi_slope(h) * (i - j); mask = causal; norm = softmax; }",
    "mixer rel { heads = 2; head_dim = 16; dtype = f32; input rel: f32[heads, 8]; score = dot(q, k); bias = rel[h][min(abs(i - j), 7)]; mask = all; norm = softmax; }",
    "mixer cap { heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); transform = 5.0 * tanh(s / 5.0); mask = causal && window(5); norm = softmax; }",
    "mixer plm { heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); mask = prefix_lm(6); norm = softmax; }",
    "mixer dil { heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); mask = causal && (window(4) || dilated(3)); norm = softmax; }",
    "mixer bs { heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); mask = block_sparse(block = 4, local = 1, global = 1); norm = softmax; }",
];

/// Every softmax feature the launcher passes positions for (causal, GQA,
/// segment ids, position biases, a seq-indexed table, windows, prefix,
/// dilation, block sparsity) over 1..4 ranks, both shardings, ragged
/// lengths (7, 19 and 30 split unevenly into 2R zigzag chunks).
#[test]
fn softmax_rings_match_the_reference() {
    let mut n = 0;
    for src in SOFTMAX_SPECS {
        n += check_spec(&parse(src), DType::F32, &[1, 7, 19, 30], 1e-5);
    }
    assert!(n > 200, "{n} runs");
}

/// Storage-type encoding on the way in and the storage-type partial `o` the
/// merge reads: bf16 and f16 runs within their rounding.
#[test]
fn softmax_rings_in_half_precision() {
    let s = parse(SOFTMAX_SPECS[2]);
    check_spec(&s, DType::Bf16, &[19], 2e-2);
    check_spec(&s, DType::F16, &[19], 4e-3);
}

#[test]
fn conv_rings_match_the_reference() {
    let s = parse(
        "mixer hy { heads = 2; head_dim = 8; dtype = f32; input f: f32[heads, seq]; \
         score = filter(f); mask = causal; norm = none; }",
    );
    check_spec(&s, DType::F32, &[1, 7, 19, 30], 1e-5);
    check_spec(&s, DType::Bf16, &[19], 2e-2);
}

/// The three chunkwise kinds (sum-normalised feature maps, per-head decay
/// with value_dim != head_dim, per-token gate sliced per range), with the
/// state chained in sequence order on one GPU and copied across two.
#[test]
fn chunkwise_chains_match_the_reference() {
    for src in [
        "mixer lin { heads = 2; head_dim = 16; dtype = f32; score = dot(elu1(q), elu1(k)); mask = causal; norm = sum(eps = 1e-6); }",
        "mixer ret { heads = 2; head_dim = 16; value_dim = 32; dtype = f32; score = dot(q, k); scale = 0.25; decay = 1.0 - pow(2.0, -2.0 - h); mask = causal; norm = none; }",
        "mixer gat { heads = 2; head_dim = 16; dtype = f32; input g: f32[batch, seq, heads]; score = dot(q, k); scale = 1.0; decay = gate(g); mask = causal; norm = none; }",
    ] {
        check_spec(&parse(src), DType::F32, &[1, 7, 19, 30], 1e-4);
    }
}

/// The twin is only worth something if it notices a wrong launch: every
/// mutation below (an off-by-one position, offset, range end or row count,
/// a pointer one element off, a grid one block short, a merge range cut
/// short) must change the result or read out of bounds.
#[test]
fn wrong_launches_are_caught() {
    fn bump(name: &'static str, by: i32) -> Mutation {
        Box::new(move |x, g| {
            if x.kernel != KernelId::Main {
                return;
            }
            let i = g.kernels[0]
                .params
                .iter()
                .position(|p| p.name == name)
                .unwrap();
            match &mut x.args[i] {
                ArgValue::Int(v) => *v += by,
                ArgValue::Ptr(p) => *p += by as u64,
            }
        })
    }
    let grid_short: Mutation = Box::new(|x, _| {
        if x.kernel == KernelId::Main && x.grid.0 > 1 {
            x.grid.0 -= 1;
        }
    });
    let merge_short: Mutation = Box::new(|x, _| {
        if x.kernel == KernelId::Merge {
            if let ArgValue::Int(v) = &mut x.args[9] {
                *v -= 1;
            }
        }
    });
    let softmax = parse(SOFTMAX_SPECS[2]);
    let conv = parse(
        "mixer hy { heads = 2; head_dim = 8; dtype = f32; input f: f32[heads, seq]; \
         score = filter(f); mask = causal; norm = none; }",
    );
    let chunk = parse(
        "mixer gat { heads = 2; head_dim = 16; dtype = f32; input g: f32[batch, seq, heads]; \
         score = dot(q, k); scale = 1.0; decay = gate(g); mask = causal; norm = none; }",
    );
    let mut cases: Vec<(&MixerSpec, String, Mutation)> = Vec::new();
    for (n, by) in [
        ("q_pos0", 1),
        ("k_pos0", -1),
        ("q_begin", 1),
        ("q_end", -1),
        ("kv_begin", 1),
        ("kv_end", -1),
        ("q_rows", 1),
        ("kv_rows", -1),
        ("seq_len", 1),
        ("k", 4),
    ] {
        cases.push((&softmax, format!("softmax {n} {by:+}"), bump(n, by)));
    }
    cases.push((&softmax, "softmax grid x - 1".into(), grid_short));
    cases.push((&softmax, "merge row_end - 1".into(), merge_short));
    for (n, by) in [
        ("q_pos0", 1),
        ("k_pos0", 1),
        ("kv_end", -1),
        ("q_rows", -1),
        ("kv_rows", 1),
        ("seq_len", -1),
    ] {
        cases.push((&conv, format!("conv {n} {by:+}"), bump(n, by)));
    }
    for (n, by) in [("rows", -1), ("state_in", 4), ("in_g", 4)] {
        cases.push((&chunk, format!("chunkwise {n} {by:+}"), bump(n, by)));
    }
    // Quiet the expected out-of-bounds panics of the emulation.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut missed = Vec::new();
    for (spec, what, m) in &cases {
        let seq = 19;
        let x = crate::inputs::random_inputs(spec, 2, seq, 3);
        let want = crate::reference::evaluate(spec, &x).unwrap();
        // Caught when either ring notices (a mutation may not apply to both:
        // the grid one is only possible where a launch has several blocks).
        let caught = [(3, Sharding::Zigzag), (2, Sharding::Contiguous)]
            .iter()
            .any(|&(r, sh)| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    max_rel_err(&run_twin(spec, &x, DType::F32, r, sh, 2, m.as_ref()), &want)
                }))
                .map_or(true, |err| err > 1e-3)
            });
        if !caught {
            missed.push(what.clone());
        }
    }
    std::panic::set_hook(hook);
    assert!(
        missed.is_empty(),
        "mutations the twin did not notice: {missed:?}"
    );
}

// ---------------------------------------------------------------------------
// The multi-process ring (`rank.rs`) on the twin: each rank is a thread with
// its own emulated memory (its process's GPU), and channels stand for NCCL.
// The schedule code is the one the GPU runs; only `RankIo` differs.

/// How a twin transport misbehaves (to show the tests notice).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// `await_transfers` does nothing: launches read a buffer before it arrived.
    NoAwait,
    /// Every transfer carries its first half only.
    HalfSends,
    /// Receives land at once, as early as a GPU could write them: correct
    /// only while the buffer being filled is never one a launch still reads.
    EarlyLanding,
}

struct TwinRank<'a> {
    twin: Twin<'a>,
    /// `tx[to]` / `rx[from]`: one channel per ordered pair of ranks, so
    /// messages from different ranks cannot be confused.
    tx: Vec<std::sync::mpsc::Sender<Vec<u8>>>,
    rx: Vec<Option<std::sync::mpsc::Receiver<Vec<u8>>>>,
    /// Receives started but not visible to launches yet: (from, address, bytes).
    pending: Vec<(usize, u64, usize)>,
    fault: Fault,
}

impl TwinRank<'_> {
    fn land(&mut self) -> crate::error::Result<()> {
        for (from, addr, n) in std::mem::take(&mut self.pending) {
            let rx = self.rx[from].as_ref().expect("no channel from self");
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("a rank waited 30 s for a transfer (deadlock?)");
            assert!(got.len() <= n, "received {} bytes into {n}", got.len());
            let (id, off) = self.twin.mem.at(addr, 0, got.len());
            self.twin.mem.bufs[id][off..off + got.len()].copy_from_slice(&got);
        }
        Ok(())
    }
}

impl RankIo for TwinRank<'_> {
    type Buf = u64;
    fn upload(&mut self, bytes: &[u8]) -> crate::error::Result<u64> {
        Ok(self.twin.mem.alloc(bytes.to_vec()))
    }
    fn zeros(&mut self, bytes: usize) -> crate::error::Result<u64> {
        Ok(self.twin.mem.alloc(vec![0; bytes.max(1)]))
    }
    fn addr(&self, b: u64) -> u64 {
        b
    }
    fn launch(&mut self, x: &HostLaunch) -> crate::error::Result<()> {
        self.twin.exec(x.clone());
        Ok(())
    }
    fn download(&mut self, b: u64, bytes: usize) -> crate::error::Result<Vec<u8>> {
        self.land()?;
        Ok(self.twin.mem.bytes(b, bytes))
    }
    fn check_fits(&self, _bytes: usize) -> crate::error::Result<()> {
        Ok(())
    }
    fn sendrecv(
        &mut self,
        send: Transfer<'_, u64>,
        recv: Transfer<'_, u64>,
    ) -> crate::error::Result<()> {
        // Sends read their sources now (after the launches so far); the
        // receives land at the next await.
        if let Some((to, list)) = send {
            for &(b, n) in list {
                let n = if self.fault == Fault::HalfSends {
                    n / 2
                } else {
                    n
                };
                self.tx[to].send(self.twin.mem.bytes(b, n)).unwrap();
            }
        }
        if let Some((from, list)) = recv {
            for &(b, n) in list {
                self.pending.push((from, b, n));
            }
        }
        if self.fault == Fault::EarlyLanding {
            self.land()?;
        }
        Ok(())
    }
    fn await_transfers(&mut self) -> crate::error::Result<()> {
        if self.fault == Fault::NoAwait {
            return Ok(());
        }
        self.land()
    }
}

type Senders = Vec<std::sync::mpsc::Sender<Vec<u8>>>;
type Receivers = Vec<Option<std::sync::mpsc::Receiver<Vec<u8>>>>;

/// One channel per ordered pair of `world` ranks: rank `r` gets `txs[r][to]`
/// and `rxs[r][from]`.
fn channels(world: usize) -> (Vec<Senders>, Vec<Receivers>) {
    let mut txs: Vec<Senders> = (0..world).map(|_| Vec::new()).collect();
    let mut rxs: Vec<Receivers> = (0..world)
        .map(|_| (0..world).map(|_| None).collect())
        .collect();
    for (from, tx) in txs.iter_mut().enumerate() {
        for (to, rx_to) in rxs.iter_mut().enumerate() {
            let (t, r) = std::sync::mpsc::channel();
            tx.push(t);
            if from != to {
                rx_to[from] = Some(r);
            }
        }
    }
    (txs, rxs)
}

/// `world` ranks as threads, each running `rank::run_rank` on its own
/// twin, the rows assembled as rank 0 does.
fn run_multi_process(
    spec: &MixerSpec,
    x: &MixerInputs,
    dt: DType,
    world: usize,
    sharding: Sharding,
    fault: Fault,
) -> Tensor<f32> {
    let g = twin_kernel(spec, dt);
    let sched = RingSchedule::new(x.seq, world, sharding).unwrap();
    let (txs, rxs) = channels(world);
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = txs
            .into_iter()
            .zip(rxs)
            .enumerate()
            .map(|(rank, (tx, rx))| {
                let (g, sched) = (&g, &sched);
                s.spawn(move || {
                    let mut io = TwinRank {
                        twin: Twin {
                            spec,
                            g: g.clone(),
                            dt,
                            mem: Mem::default(),
                            mutate: &no_mutation,
                            sim: None,
                        },
                        tx,
                        rx,
                        pending: Vec::new(),
                        fault,
                    };
                    let job = RankJob {
                        spec,
                        info: &g.kernels[0],
                        config: g.config,
                        dtype: dt,
                        inputs: x,
                        sched,
                        rank,
                    };
                    run_rank(&mut io, &job).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assemble(spec, &sched, x.batch, &parts).unwrap()
}

/// The cross-process ring (every family, 2..4 processes, both shardings,
/// ragged lengths) equals the f64 reference.
#[test]
fn multi_process_rings_match_the_reference() {
    let conv = "mixer hy { heads = 2; head_dim = 8; dtype = f32; input f: f32[heads, seq]; \
                score = filter(f); mask = causal; norm = none; }";
    let chunk = [
        "mixer lin { heads = 2; head_dim = 16; dtype = f32; score = dot(elu1(q), elu1(k)); mask = causal; norm = sum(eps = 1e-6); }",
        "mixer ret { heads = 2; head_dim = 16; value_dim = 32; dtype = f32; score = dot(q, k); scale = 0.25; decay = 1.0 - pow(2.0, -2.0 - h); mask = causal; norm = none; }",
        "mixer gat { heads = 2; head_dim = 16; dtype = f32; input g: f32[batch, seq, heads]; score = dot(q, k); scale = 1.0; decay = gate(g); mask = causal; norm = none; }",
    ];
    let mut cases: Vec<(&str, f64)> = SOFTMAX_SPECS.iter().map(|s| (*s, 1e-5)).collect();
    cases.push((conv, 1e-5));
    cases.extend(chunk.iter().map(|s| (*s, 1e-4)));
    let mut n = 0;
    for (src, tol) in cases {
        let spec = parse(src);
        for seq in [7, 19, 30] {
            let x = crate::inputs::random_inputs(&spec, 2, seq, 11 + seq as u64);
            let want = crate::reference::evaluate(&spec, &x).unwrap();
            for world in 2..=4 {
                for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                    // Receives landing at the await or at once (a GPU may
                    // complete them anywhere in between) give one result.
                    for fault in [Fault::None, Fault::EarlyLanding] {
                        let got = run_multi_process(&spec, &x, DType::F32, world, sharding, fault);
                        let err = max_rel_err(&got, &want);
                        assert!(
                            err <= tol,
                            "{} seq {seq} world {world} {sharding:?} {fault:?}: error {err:.2e}",
                            spec.name
                        );
                        n += 1;
                    }
                }
            }
        }
    }
    assert!(n >= 13 * 3 * 3 * 2 * 2, "{n} runs");
    // Half precision: storage-type shards travel and the partials merge.
    let s = parse(SOFTMAX_SPECS[2]);
    let mut x = crate::inputs::random_inputs(&s, 2, 19, 5);
    crate::inputs::round_to_dtype(&mut x, DType::Bf16).unwrap();
    let want = crate::reference::evaluate(&s, &x).unwrap();
    let got = run_multi_process(&s, &x, DType::Bf16, 3, Sharding::Zigzag, Fault::None);
    assert!(max_rel_err(&got, &want) <= 2e-2);
}

/// A transport that lets launches run before their shard arrived, or cuts
/// transfers short, gives a wrong result: the test above can fail.
#[test]
fn multi_process_twin_notices_transport_faults() {
    let softmax = parse(SOFTMAX_SPECS[0]);
    let chunk = parse(
        "mixer ret { heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); scale = 0.25; \
         decay = 1.0 - pow(2.0, -2.0 - h); mask = causal; norm = none; }",
    );
    for spec in [&softmax, &chunk] {
        let x = crate::inputs::random_inputs(spec, 2, 30, 9);
        let want = crate::reference::evaluate(spec, &x).unwrap();
        for fault in [Fault::NoAwait, Fault::HalfSends] {
            let got = run_multi_process(spec, &x, DType::F32, 3, Sharding::Zigzag, fault);
            let err = max_rel_err(&got, &want);
            assert!(
                err > 1e-3,
                "{} {fault:?} went unnoticed ({err:.2e})",
                spec.name
            );
        }
    }
}

// ---- the generated kernels themselves, as PTX in the simulator ----------------

/// An example spec with its head counts cut to `heads` (keeping the GQA
/// ratio's shape: `kv_heads` 1 when the example groups heads), so a
/// simulated run stays small.
fn example(name: &str, heads: u32) -> MixerSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.mix"));
    let mut s = mixc_dsl::parse_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let grouped = s.kv_heads < s.heads;
    s.heads = heads;
    s.kv_heads = if grouped { heads / 2 } else { heads };
    s
}

/// Runs `spec` with the real generated kernel (config `cfg`, default when
/// `None`; sm_90 target, whose source equals sm_80's) through the twin's
/// launcher code, the kernels executing as PTX.
fn run_sim(
    spec: &MixerSpec,
    x: &MixerInputs,
    dt: DType,
    cfg: Option<KernelConfig>,
    ranks: usize,
    sharding: Sharding,
) -> (Tensor<f32>, LaunchStats) {
    let target = Target::new(Arch::Sm90, dt);
    let cfg = cfg.unwrap_or_else(|| KernelConfig::default_for(spec, &target));
    let g = generate(spec, &target, &cfg).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
    run_sim_kernel(spec, g, x, dt, ranks, sharding)
}

/// [`run_sim`] with the generated kernel given (possibly edited).
fn run_sim_kernel(
    spec: &MixerSpec,
    g: GeneratedKernel,
    x: &MixerInputs,
    dt: DType,
    ranks: usize,
    sharding: Sharding,
) -> (Tensor<f32>, LaunchStats) {
    let sim = Sim::new(&g, dt);
    let sched = RingSchedule::new(x.seq, ranks, sharding).unwrap();
    let mut t = Twin {
        spec,
        g,
        dt,
        mem: Mem::default(),
        mutate: &no_mutation,
        sim: Some(sim),
    };
    let out = match spec.family {
        Family::Softmax | Family::Convolution => t.pairwise(x, &sched),
        _ => t.chunkwise(x, &sched, 1),
    };
    (out, t.sim.unwrap().stats)
}

/// Every spec under `examples/`, by file stem.
fn example_names() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "mix").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    names
}

/// Runs `spec` in the simulator for each (seq, ranks, sharding) and checks
/// the result against the f64 reference within `tol`.
fn check_sim(
    spec: &MixerSpec,
    dt: DType,
    cfg: Option<KernelConfig>,
    runs: &[(usize, usize, Sharding)],
    tol: f64,
) {
    for &(seq, ranks, sharding) in runs {
        let mut x = crate::inputs::random_inputs(spec, 1, seq, 11 + seq as u64);
        crate::inputs::round_to_dtype(&mut x, dt).unwrap();
        let want = crate::reference::evaluate(spec, &x).unwrap();
        let t0 = std::time::Instant::now();
        let (got, st) = run_sim(spec, &x, dt, cfg, ranks, sharding);
        let err = max_rel_err(&got, &want);
        eprintln!(
            "{} {dt:?} seq {seq} R {ranks} {sharding:?}: {} CTAs, {} instructions, {} mma, err {err:.2e} ({:.1?})",
            spec.name, st.ctas, st.instructions, st.mma, t0.elapsed()
        );
        assert!(st.ctas > 0, "nothing ran");
        assert!(
            err <= tol,
            "{} {dt:?} seq {seq} R {ranks} {sharding:?}: error {err:.2e} > {tol:.0e}",
            spec.name
        );
    }
}

#[test]
fn sim_examples_match_the_reference() {
    let names = example_names();
    assert!(names.len() >= 14, "{names:?}");
    for name in &names {
        let spec = example(name, 2);
        check_sim(
            &spec,
            DType::Bf16,
            None,
            &[(200, 1, Sharding::Contiguous), (133, 2, Sharding::Zigzag)],
            1e-2,
        );
    }
}

/// Masks at lengths where their tiles classify as skipped, partial and full
/// (windows, dilation, block sparsity, prefix, segments) and every bias /
/// transform kind, over 1 and 3 ranks.
#[test]
fn sim_masks_skip_and_match_the_reference() {
    for src in [
        "mixer win { heads = 2; head_dim = 64; score = dot(q, k); mask = causal && window(70); norm = softmax; }",
        "mixer dil { heads = 2; head_dim = 64; score = dot(q, k); mask = causal && (window(40) || dilated(3)); norm = softmax; }",
        "mixer bs { heads = 2; head_dim = 64; score = dot(q, k); mask = block_sparse(block = 64, local = 1, global = 1); norm = softmax; }",
        "mixer plm { heads = 2; head_dim = 64; score = dot(q, k); mask = prefix_lm(90); norm = softmax; }",
        "mixer doc { heads = 2; head_dim = 64; input doc: i32[batch, seq]; score = dot(q, k); mask = causal && segment(doc); norm = softmax; }",
        "mixer cap { heads = 2; head_dim = 64; score = dot(q, k); transform = 5.0 * tanh(s / 5.0); mask = causal && window(100); norm = softmax; }",
        "mixer rel { heads = 2; head_dim = 64; input rel: f32[heads, 8]; score = dot(q, k); bias = rel[h][min(abs(i - j), 7)]; mask = all; norm = softmax; }",
        "mixer gqa { heads = 4; kv_heads = 1; head_dim = 128; score = dot(q, k); bias = -alibi_slope(h) * (i - j); mask = causal; norm = softmax; }",
    ] {
        let spec = parse(src);
        check_sim(
            &spec,
            DType::Bf16,
            None,
            &[(300, 1, Sharding::Contiguous), (257, 3, Sharding::Zigzag)],
            1e-2,
        );
    }
}

/// The f16 tensor-core kernels and the f32 (SIMT) kernels of every family.
#[test]
fn sim_other_dtypes_match_the_reference() {
    for name in [
        "causal_gqa_llama3",
        "document_mask",
        "retention_retnet",
        "linear_elu",
        "long_conv_hyena",
    ] {
        let spec = example(name, 2);
        check_sim(&spec, DType::F16, None, &[(150, 2, Sharding::Zigzag)], 2e-3);
    }
    for name in [
        "causal_gqa_llama3",
        "softcap_window_gemma2",
        "gated_mamba2",
        "linear_elu",
        "long_conv_hyena",
    ] {
        let spec = example(name, 2);
        check_sim(&spec, DType::F32, None, &[(150, 2, Sharding::Zigzag)], 2e-4);
    }
}

/// Every tile configuration the CUDA tuner may pick, for one spec of each
/// kernel template: a config that generates must also compute correctly.
#[test]
fn sim_every_tuning_candidate_matches_the_reference() {
    for name in ["causal_gqa_llama3", "retention_retnet", "long_conv_hyena"] {
        let spec = example(name, 2);
        let target = Target::new(Arch::Sm80, DType::Bf16);
        let space = crate::tune::space::cuda_candidates(&spec, &target);
        assert!(space.candidates.len() > 1, "{name}: one candidate");
        for c in &space.candidates {
            let crate::tune::TunedConfig::Cuda(cfg) = c.config else {
                panic!("not a CUDA config")
            };
            eprintln!("{name}: {}", c.label);
            check_sim(
                &spec,
                DType::Bf16,
                Some(cfg),
                &[(150, 1, Sharding::Contiguous)],
                1e-2,
            );
        }
    }
}

/// The simulator is only worth something if it notices missing
/// synchronisation: deleting any one `__syncthreads()` or `cp.async` wait
/// from a generated kernel must be reported (a race, a read of an
/// in-flight copy) or change the result. The only statements allowed to
/// go unnoticed are the final drains, listed with why.
#[test]
fn sim_notices_every_missing_barrier_and_wait() {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut report = Vec::new();
    for name in [
        "causal_gqa_llama3",
        "retention_retnet",
        "linear_elu",
        "long_conv_hyena",
    ] {
        let spec = example(name, 2);
        let dt = DType::Bf16;
        let target = Target::new(Arch::Sm80, dt);
        let g = generate(&spec, &target, &KernelConfig::default_for(&spec, &target)).unwrap();
        let mut x = crate::inputs::random_inputs(&spec, 1, 150, 21);
        crate::inputs::round_to_dtype(&mut x, dt).unwrap();
        let want = crate::reference::evaluate(&spec, &x).unwrap();
        let ptx = |src: &str| crate::nvrtc::compile_ptx(name, src, Arch::Sm80, false).unwrap();
        let original = ptx(&g.source);
        let sites = sync_sites(&g.source);
        assert!(sites.len() >= 3, "{name}: {} sync sites", sites.len());
        let last_drain = sites
            .iter()
            .rposition(|&(a, e)| g.source[a..e].ends_with("cp_async_wait<0>();"));
        for (k, &(at, end)) in sites.iter().enumerate() {
            let line = g.source[..at].lines().count();
            let stmt = g.source[at..end].to_string();
            let mut m = g.clone();
            m.source.replace_range(at..end, "{}");
            if ptx(&m.source) == original {
                report.push(format!(
                    "{name} line {line} `{stmt}`: dead code here (same PTX)"
                ));
                continue;
            }
            let final_drain = Some(k) == last_drain;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_sim_kernel(&spec, m, &x, dt, 1, Sharding::Contiguous).0
            }));
            let verdict = match run {
                Err(e) => caught(e),
                Ok(out) => {
                    let err = max_rel_err(&out, &want);
                    if err > 1e-2 {
                        format!("caught: error {err:.2e}")
                    } else if final_drain {
                        // After the loop only empty groups are outstanding (the
                        // simulator fails a thread that exits with copies in
                        // flight), so this drain is insurance, not a need.
                        format!("final drain of empty groups (error {err:.2e})")
                    } else {
                        format!("SURVIVED (error {err:.2e})")
                    }
                }
            };
            report.push(format!("{name} line {line} `{stmt}`: {verdict}"));
        }
    }
    std::panic::set_hook(quiet);
    eprintln!("{}", report.join("\n"));
    let survived: Vec<&String> = report.iter().filter(|r| r.contains("SURVIVED")).collect();
    assert!(survived.is_empty(), "not noticed:\n{survived:#?}");
}

/// The byte ranges of every `__syncthreads();` and `cp.async` wait
/// statement of a generated source, in order (what the barrier mutation
/// tests delete one at a time).
fn sync_sites(source: &str) -> Vec<(usize, usize)> {
    let mut sites: Vec<(usize, usize)> = ["__syncthreads();", "cp_async_wait<"]
        .iter()
        .flat_map(|pat| {
            source.match_indices(pat).map(|(at, _)| {
                let at = if source[..at].ends_with("mixc::") {
                    at - 6
                } else {
                    at
                };
                (at, at + source[at..].find(';').unwrap() + 1)
            })
        })
        .collect();
    sites.sort();
    sites
}

/// A mutation run's panic, as one report line.
fn caught(e: Box<dyn std::any::Any + Send>) -> String {
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| "panic".into());
    format!("caught: {}", msg.lines().next().unwrap_or(""))
}

/// Where a kernel's instructions go: the simulator's per-instruction
/// counts folded onto generated-source lines (NVRTC `-lineinfo`), the
/// hottest lines first, in warp-instructions.
/// Returns the report, non-`mma` warp-instructions per `mma`, and the share
/// of executed instructions attributed to a source line.
fn sim_profile(spec: &MixerSpec, seq: usize, dt: DType) -> (String, f64, f64) {
    let target = Target::new(Arch::Sm90, dt);
    let g = generate(spec, &target, &KernelConfig::default_for(spec, &target)).unwrap();
    let mut x = crate::inputs::random_inputs(spec, 1, seq, 5);
    crate::inputs::round_to_dtype(&mut x, dt).unwrap();
    let sched = RingSchedule::new(seq, 1, Sharding::Contiguous).unwrap();
    let sim = Sim::with_profile(&g, dt, true);
    let mut t = Twin {
        spec,
        g: g.clone(),
        dt,
        mem: Mem::default(),
        mutate: &no_mutation,
        sim: Some(sim),
    };
    match spec.family {
        Family::Softmax | Family::Convolution => t.pairwise(&x, &sched),
        _ => t.chunkwise(&x, &sched, 1),
    };
    let sim = t.sim.unwrap();
    let counts = sim.profile.unwrap();
    let kernel = sim.main.kernel(&g.kernels[0].name).unwrap();
    let mut by_line: BTreeMap<u32, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for (i, inst) in kernel.code.iter().enumerate() {
        let e = by_line.entry(kernel.src_lines[i]).or_default();
        e.0 += counts[i];
        let op = inst.op.text.split('.').next().unwrap_or("").to_string();
        *e.1.entry(op).or_default() += counts[i];
    }
    let total: u64 = counts.iter().sum();
    let attributed: u64 = counts
        .iter()
        .zip(&kernel.src_lines)
        .filter(|(_, &l)| l > 0)
        .map(|(c, _)| c)
        .sum();
    let st = sim.stats;
    let mut rows: Vec<_> = by_line.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    let src: Vec<&str> = g.source.lines().collect();
    let per_mma = (total as f64 / 32.0 - st.mma as f64) / st.mma as f64;
    let mut out = format!(
        "{} {dt:?} L={seq}: {:.0} warp-instructions, {} mma ({per_mma:.2} per mma)\n",
        spec.name,
        total as f64 / 32.0,
        st.mma,
    );
    for (line, (n, ops)) in rows.iter().take(30) {
        let mut ops: Vec<_> = ops.iter().filter(|(_, &c)| c > 0).collect();
        ops.sort_by(|a, b| b.1.cmp(a.1));
        let ops: Vec<String> = ops
            .iter()
            .take(4)
            .map(|(o, c)| format!("{o} {:.0}%", 100.0 * **c as f64 / *n as f64))
            .collect();
        let text = src
            .get((*line as usize).wrapping_sub(1))
            .map_or("", |l| l.trim());
        out += &format!(
            "{:5.1}% line {line:4} [{}] {}\n",
            100.0 * *n as f64 / total as f64,
            ops.join(", "),
            &text[..text.len().min(90)]
        );
    }
    (out, per_mma, attributed as f64 / total as f64)
}

/// Where the kernels' instructions go, and a guard on it: the softmax
/// kernel's non-`mma` instructions per `mma` stay below what they were before
/// the hoisted loaders (9.55 at L = 1024; BENCHMARKS.md), and the profile
/// attributes nearly every instruction to a source line. For a profile to
/// read: `MIXC_PROFILE_SPECS=a,b MIXC_PROFILE_SEQ=1024 cargo test --release
/// -p mixc-runtime --lib sim_profile_guards -- --nocapture`.
#[test]
fn sim_profile_guards_kernel_overhead() {
    let names = std::env::var("MIXC_PROFILE_SPECS").unwrap_or_else(|_| "causal_gqa_llama3".into());
    let seq = std::env::var("MIXC_PROFILE_SEQ").map_or(512, |s| s.parse().unwrap());
    for name in names.split(',') {
        let (report, per_mma, attributed) = sim_profile(&example(name, 2), seq, DType::Bf16);
        eprintln!("{report}");
        assert!(
            attributed > 0.95,
            "{name}: only {attributed:.2} of instructions have a source line"
        );
        if name == "causal_gqa_llama3" && seq == 512 {
            assert!(
                per_mma < 7.0,
                "{name}: {per_mma:.2} non-mma instructions per mma"
            );
        }
    }
}

/// Compile once, call many, through the twin: the kernels come from the
/// in-process cache `CudaMixer` builds them with ([`super::kernels::CudaKernels`]),
/// generated and compiled once; a second handle of the same specialisation
/// shares them; 100 ring runs on the loaded kernels generate, compile, read
/// and load nothing, and match the reference.
#[test]
fn a_hundred_twin_runs_compile_once() {
    use super::kernels::CudaKernels;
    use crate::counters;
    // A name no other test uses, so the process-wide cache starts empty for it.
    let spec = parse(
        "mixer twin_counted { heads = 4; kv_heads = 2; head_dim = 16; dtype = f32; \
         score = dot(q, k); mask = causal && window(9); norm = softmax; }",
    );
    let target = Target::new(Arch::Sm90, DType::F32);
    let before = counters::snapshot();
    let kernels = CudaKernels::get(&spec, &target, None).unwrap();
    // The twin's "load": once, as `Gpu::load_shared` does per GPU.
    counters::bump(counters::Work::ModuleLoad);
    let built = counters::snapshot() - before;
    assert_eq!(built.generations, 1, "{built:?}");
    // The kernel and the merge helpers: compiled, or read from the disk cache.
    assert_eq!(built.compilations + built.disk_cache_reads, 2, "{built:?}");
    assert!(kernels.helpers.is_some());

    let start = counters::snapshot();
    let again = CudaKernels::get(&spec, &target, None).unwrap();
    assert!(std::sync::Arc::ptr_eq(&kernels, &again));
    let xs: Vec<MixerInputs> = (0..4)
        .map(|i| crate::inputs::random_inputs(&spec, 1 + i % 2, 9 + 7 * i, i as u64))
        .collect();
    let wants: Vec<_> = xs
        .iter()
        .map(|x| crate::reference::evaluate(&spec, x).unwrap())
        .collect();
    for call in 0..100 {
        let i = call % xs.len();
        let g = twin_tiles(kernels.generated.clone());
        let ranks = 1 + call % 3;
        let got = run_twin_kernel(
            &spec,
            g,
            &xs[i],
            DType::F32,
            (ranks, Sharding::Zigzag, 1),
            &no_mutation,
        );
        let err = max_rel_err(&got, &wants[i]);
        assert!(err <= 2e-5, "call {call}: error {err:.2e}");
    }
    let calls = counters::snapshot() - start;
    assert_eq!(calls, counters::Counters::default(), "{calls:?}");
}

/// The direct call (`CudaMixer::forward_device`): caller-owned buffers in
/// the user's layout, one launch of the generated kernel writing `o` and
/// `lse` in place (no merge kernel, no accumulator). Run through the host
/// emulation and through the PTX simulator; `o` and `lse` match the
/// reference, every element written (the buffers start poisoned).
fn direct_call(spec: &MixerSpec, x: &MixerInputs, dt: DType, sim: bool) -> (Vec<f32>, Vec<f32>) {
    use super::args::{direct_launches, DeviceCall};
    let g = if sim {
        let target = Target::new(Arch::Sm90, dt);
        generate(spec, &target, &KernelConfig::default_for(spec, &target)).unwrap()
    } else {
        twin_kernel(spec, dt)
    };
    let (b, seq) = (x.batch, x.seq);
    let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
    let mut t = Twin {
        spec,
        sim: sim.then(|| Sim::new(&g, dt)),
        g,
        dt,
        mem: Mem::default(),
        mutate: &no_mutation,
    };
    let extra = t.full_inputs(x);
    let call = DeviceCall {
        batch: b,
        seq,
        q: t.mem.alloc(encode(dt, &x.q.data)),
        k: t.mem.alloc(encode(dt, &x.k.data)),
        v: t.mem.alloc(encode(dt, &x.v.data)),
        o: t.mem.poisoned(b * seq * h * dv * elem_bytes(dt)),
        lse: t.mem.poisoned(b * h * seq * 4),
        extra,
    };
    let launches = direct_launches(&t.g.kernels[0], spec, &call).unwrap();
    assert_eq!(launches.len(), 1, "one launch");
    assert!(
        launches.iter().all(|l| l.kernel == KernelId::Main),
        "no merge"
    );
    for l in launches {
        t.exec(l);
    }
    let o = decode(dt, &t.mem.bytes(call.o, b * seq * h * dv * elem_bytes(dt)));
    let lse = decode(DType::F32, &t.mem.bytes(call.lse, b * h * seq * 4));
    (o, lse)
}

#[test]
fn direct_calls_write_o_and_lse_in_place() {
    let mut specs: Vec<MixerSpec> = SOFTMAX_SPECS.iter().map(|s| parse(s)).collect();
    specs.push(example("causal_gqa_llama3", 4));
    for (n, spec) in specs.iter().enumerate() {
        let dt = if n % 3 == 2 { DType::Bf16 } else { DType::F32 };
        for (seq, sim) in [(23, false), (40, false), (37, n < 3)] {
            let mut x = crate::inputs::random_inputs(spec, 2, seq, seq as u64);
            crate::inputs::round_to_dtype(&mut x, dt).unwrap();
            let (want_o, want_lse) = crate::reference::evaluate_with_lse(spec, &x).unwrap();
            let (o, lse) = direct_call(spec, &x, dt, sim);
            let o = Tensor::new(want_o.shape.clone(), o);
            let err = max_rel_err(&o, &want_o);
            let tol = if dt == DType::F32 { 2e-5 } else { 1e-2 };
            assert!(
                err <= tol,
                "{} seq {seq} sim {sim}: o error {err:.2e}",
                spec.name
            );
            // lse: ours is [batch, heads, seq], the reference's [batch, seq, heads].
            let h = spec.heads as usize;
            for bi in 0..x.batch {
                for hi in 0..h {
                    for i in 0..seq {
                        let got = lse[(bi * h + hi) * seq + i] as f64;
                        let want = want_lse.data[(bi * seq + i) * h + hi];
                        let ok = if want == f64::NEG_INFINITY {
                            got == f64::NEG_INFINITY
                        } else {
                            (got - want).abs() <= 1e-3 * want.abs().max(1.0)
                        };
                        assert!(
                            ok,
                            "{} b {bi} h {hi} row {i}: lse {got} vs {want}",
                            spec.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn direct_calls_refuse_missing_buffers() {
    use super::args::{direct_launches, DeviceCall};
    let spec = parse(SOFTMAX_SPECS[2]); // reads the `doc` segment ids
    let g = twin_kernel(&spec, DType::F32);
    let call = DeviceCall {
        batch: 1,
        seq: 8,
        q: 1 << 32,
        k: 2 << 32,
        v: 3 << 32,
        o: 4 << 32,
        lse: 5 << 32,
        extra: BTreeMap::new(),
    };
    let e = direct_launches(&g.kernels[0], &spec, &call).unwrap_err();
    assert!(
        matches!(&e, crate::RuntimeError::BadInput { name, .. } if name == "doc"),
        "{e}"
    );
    let e = direct_launches(
        &g.kernels[0],
        &spec,
        &DeviceCall {
            lse: 0,
            ..call.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("lse"), "{e}");
}

/// The direct call for the other families: convolution over every key with
/// no accumulator, the chunkwise families from a zero state with nothing
/// written out but `o` (emulated, and for three specs as PTX).
#[test]
fn direct_calls_of_every_family() {
    let mut specs: Vec<MixerSpec> = CHUNK_SPECS_FOR_DIRECT.iter().map(|s| parse(s)).collect();
    specs.push(example("long_conv_hyena", 2));
    specs.push(example("gated_mamba2", 2));
    specs.push(example("retention_retnet", 2));
    for (n, spec) in specs.iter().enumerate() {
        for (seq, sim) in [(29, false), (70, n % 2 == 0)] {
            let dt = DType::F32;
            let x = crate::inputs::random_inputs(spec, 2, seq, seq as u64);
            let want = crate::reference::evaluate(spec, &x).unwrap();
            let (o, _) = direct_call(spec, &x, dt, sim);
            let err = max_rel_err(&Tensor::new(want.shape.clone(), o), &want);
            assert!(
                err <= 2e-4,
                "{} seq {seq} sim {sim}: error {err:.2e}",
                spec.name
            );
        }
    }
}

const CHUNK_SPECS_FOR_DIRECT: [&str; 3] = [
    "mixer lin { heads = 2; head_dim = 16; dtype = f32; score = dot(elu1(q), elu1(k)); mask = causal; norm = sum(eps = 1e-6); }",
    "mixer ret { heads = 2; head_dim = 16; value_dim = 32; dtype = f32; decay = 1.0 - pow(2.0, -3.0 - h); mask = causal; norm = none; }",
    "mixer conv { heads = 2; head_dim = 16; dtype = f32; input f: f32[heads, seq]; score = filter(f); mask = causal; norm = none; }",
];
