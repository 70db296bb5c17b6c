//! Kernel arguments built from the generated signature
//! ([`mixc_codegen::KernelInfo::params`]), never from hard-coded positions:
//! when codegen adds, renames or reorders a parameter, the launcher either
//! binds it by name/role or fails with an error naming it, instead of passing
//! a wrong pointer. Host-only, so it is unit
//! tested without a GPU.

use std::collections::BTreeMap;

use mixc_codegen::{GridDim, KernelInfo, KernelParam, LaunchDims, ParamRole};
use mixc_dsl::ir::{Family, MixerSpec, Score};

use super::plan::PairLaunch;
use crate::error::{Result, RuntimeError};

/// One bound argument, in signature order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgValue {
    /// A device pointer (0 = null).
    Ptr(u64),
    /// An `int` scalar.
    Int(i32),
}

impl ArgValue {
    /// The argument's 8-byte parameter slot: a pointer, or an `int` in the
    /// low 4 bytes (what the driver and the simulator read).
    pub fn slot(self) -> u64 {
        match self {
            ArgValue::Ptr(p) => p,
            ArgValue::Int(v) => v as u32 as u64,
        }
    }
}

/// What a launch provides. Buffers by parameter name (`Some(0)` is not used:
/// `None` means "pass null", which the kernels accept for optional outputs
/// and zero initial states); extra inputs by the spec's input name (the role
/// carries it, so the `in_` prefix codegen adds does not matter); scalars by
/// parameter name.
#[derive(Debug, Clone, Default)]
pub struct Bindings {
    pub buffers: BTreeMap<String, Option<u64>>,
    pub inputs: BTreeMap<String, u64>,
    pub ints: BTreeMap<String, i64>,
}

impl Bindings {
    pub fn buffer(&mut self, name: &str, ptr: u64) -> &mut Self {
        self.buffers.insert(name.into(), Some(ptr));
        self
    }
    pub fn null(&mut self, name: &str) -> &mut Self {
        self.buffers.insert(name.into(), None);
        self
    }
    pub fn input(&mut self, name: &str, ptr: u64) -> &mut Self {
        self.inputs.insert(name.into(), ptr);
        self
    }
    pub fn int(&mut self, name: &str, v: i64) -> &mut Self {
        self.ints.insert(name.into(), v);
        self
    }
}

fn mismatch(kernel: &str, p: &KernelParam, what: String) -> RuntimeError {
    RuntimeError::Internal(format!(
        "CUDA launcher: kernel `{kernel}` parameter `{}` ({}): {what}; the generated \
         signature and the launcher disagree (a codegen change the launcher does not know)",
        p.name, p.c_type
    ))
}

/// What the softmax kernel gets for one launch (`pairs` of the ring): the
/// query buffer (`q_rows` rows), the held key/value shard (`kv_rows` rows),
/// the partial outputs, the extra inputs by name and the launch's ranges.
#[allow(clippy::too_many_arguments)]
pub fn softmax_bindings(
    inputs: &BTreeMap<String, u64>,
    (q, k, v, o, lse): (u64, u64, u64, u64, u64),
    l: &PairLaunch,
    q_rows: usize,
    kv_rows: usize,
    seq: usize,
) -> Bindings {
    let mut b = Bindings {
        inputs: inputs.clone(),
        ..Bindings::default()
    };
    b.buffer("q", q).buffer("k", k).buffer("v", v);
    b.buffer("o", o).buffer("lse", lse);
    range_ints(&mut b, l, q_rows, kv_rows, seq);
    b
}

/// A pairwise launch's ranges and positions, by the softmax kernels' names
/// (forward and backward).
pub fn range_ints(b: &mut Bindings, l: &PairLaunch, q_rows: usize, kv_rows: usize, seq: usize) {
    b.int("q_rows", q_rows as i64)
        .int("q_begin", l.q_begin as i64)
        .int("q_end", l.q_end as i64)
        .int("kv_rows", kv_rows as i64)
        .int("kv_begin", l.kv_begin as i64)
        .int("kv_end", l.kv_end as i64)
        .int("q_pos0", l.q_pos0)
        .int("k_pos0", l.k_pos0)
        .int("seq_len", seq as i64);
}

/// What the convolution kernel gets for one launch: the held value shard,
/// the f32 accumulator of the launch's query range (its row 0 is position
/// `l.q.start`), no storage-type output, and `accumulate = 1` (the
/// accumulator starts at zero, so every step adds).
pub fn conv_bindings(
    inputs: &BTreeMap<String, u64>,
    v: u64,
    o_acc: u64,
    l: &PairLaunch,
    kv_rows: usize,
    filter_len: usize,
) -> Bindings {
    let mut b = Bindings {
        inputs: inputs.clone(),
        ..Bindings::default()
    };
    b.buffer("v", v).null("o").buffer("o_acc", o_acc);
    b.int("q_rows", l.q.len() as i64)
        .int("kv_rows", kv_rows as i64)
        .int("kv_begin", l.kv_begin as i64)
        .int("kv_end", l.kv_end as i64)
        .int("q_pos0", l.q.start as i64)
        .int("k_pos0", l.k_pos0)
        .int("seq_len", filter_len as i64)
        .int("accumulate", 1);
    b
}

/// Buffers of one chunkwise launch (a range of `rows` positions).
#[derive(Debug, Clone, Default)]
pub struct ChunkBuffers {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    /// The gate input's name and buffer (gated decay only).
    pub gate: Option<(String, u64)>,
    /// State / normaliser before the range (`None`: zero, the first range).
    pub state_in: Option<u64>,
    pub z_in: Option<u64>,
    pub o: u64,
    pub state_out: u64,
    pub z_out: Option<u64>,
}

/// What the chunkwise kernel gets: normalised output written directly, no
/// separate numerator / denominator partials.
pub fn chunkwise_bindings(c: &ChunkBuffers, rows: usize) -> Bindings {
    let mut b = Bindings::default();
    b.buffer("q", c.q).buffer("k", c.k).buffer("v", c.v);
    b.buffer("o", c.o).null("o_num").null("o_den");
    b.buffer("state_out", c.state_out);
    for (name, p) in [
        ("state_in", c.state_in),
        ("z_in", c.z_in),
        ("z_out", c.z_out),
    ] {
        match p {
            Some(p) => b.buffer(name, p),
            None => b.null(name),
        };
    }
    if let Some((name, p)) = &c.gate {
        b.input(name, *p);
    }
    b.int("rows", rows as i64);
    b
}

/// Which loaded function a [`HostLaunch`] runs: the generated kernel, or one
/// of the backend's helpers (`mixc_merge_lse_<dtype>`, `mixc_fill_neg_inf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelId {
    Main,
    Merge,
    FillNegInf,
    /// Kernel `i` of the generated backward module
    /// ([`mixc_codegen::generate_backward`]: 0 gradients, 1 delta, 2 finish).
    Backward(usize),
}

/// Threads per block of the helper kernels (grid-stride loops).
pub const HELPER_THREADS: u32 = 256;

/// One launch, fully decided on the host: the GPU path hands it to the driver
/// and the host twin (tests) executes it on emulated memory, so both run the
/// same grid and the same argument values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLaunch {
    pub kernel: KernelId,
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub smem: u32,
    pub args: Vec<ArgValue>,
}

/// The generated kernel's grid for a launch computing `rows` query rows
/// (the launch's own rows, never the whole sequence). Errors beyond the
/// hardware's limits (x < 2^31, y and z <= 65535) instead of failing at launch.
pub fn grid(info: &KernelInfo, batch: usize, rows: usize, heads: usize) -> Result<(u32, u32, u32)> {
    grid_for(info, batch, (rows, 0), (heads, 0))
}

/// [`grid`] for kernels whose grid also reads the key rows or the kv heads
/// (`rows` and `heads` are (query, key) pairs).
pub fn grid_for(
    info: &KernelInfo,
    batch: usize,
    rows: (usize, usize),
    heads: (usize, usize),
) -> Result<(u32, u32, u32)> {
    let too_big = |what: &str, n: usize| {
        RuntimeError::DoesNotFit(format!(
            "CUDA launcher: {what} = {n} is beyond one launch of `{}`",
            info.name
        ))
    };
    let u = |what: &str, n: usize| u32::try_from(n).map_err(|_| too_big(what, n));
    let dims = LaunchDims {
        batch: u("batch", batch)?,
        q_rows: u("rows", rows.0)?,
        kv_rows: u("key rows", rows.1)?,
        heads: u("heads", heads.0)?,
        kv_heads: u("kv heads", heads.1)?,
    };
    let e = |d: &GridDim| d.eval(&dims);
    let g = (e(&info.grid[0]), e(&info.grid[1]), e(&info.grid[2]));
    if g.0 > i32::MAX as u32 || g.1 > 65_535 || g.2 > 65_535 {
        return Err(RuntimeError::DoesNotFit(format!(
            "CUDA launcher: grid {g:?} of `{}` exceeds the launch limits (x < 2^31, y and z at \
             most 65535); use a smaller batch",
            info.name
        )));
    }
    Ok(g)
}

/// Blocks of [`HELPER_THREADS`] threads for a grid-stride loop over `n` items.
pub fn helper_blocks(n: usize) -> u32 {
    n.div_ceil(HELPER_THREADS as usize).clamp(1, 1 << 16) as u32
}

fn int32(name: &str, v: usize) -> Result<ArgValue> {
    i32::try_from(v).map(ArgValue::Int).map_err(|_| {
        RuntimeError::DoesNotFit(format!(
            "CUDA launcher: helper argument `{name}` = {v} does not fit a 32-bit int"
        ))
    })
}

/// `mixc_fill_neg_inf(p, n)`: the log-sum-exp accumulator's reset.
pub fn fill_neg_inf_launch(p: u64, n: usize) -> Result<HostLaunch> {
    Ok(HostLaunch {
        kernel: KernelId::FillNegInf,
        grid: (helper_blocks(n), 1, 1),
        threads: HELPER_THREADS,
        smem: 0,
        args: vec![ArgValue::Ptr(p), int32("n", n)?],
    })
}

/// Device buffers of one softmax rank: its queries, the key/value shard it
/// holds, the partial one launch writes (storage-type `o`, f32 `lse`) and the
/// f32 accumulator the merge kernel folds partials into.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoftmaxBuffers {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub part_o: u64,
    pub part_lse: u64,
    pub acc_o: u64,
    pub acc_lse: u64,
}

/// Sizes of one pairwise launch: `q_rows` rows in the rank's query (or
/// accumulator) buffer, `kv_rows` rows in the held shard; `seq_len` is what
/// the kernel's `seq_len` gets (the global length for softmax, the filter
/// length for convolution).
#[derive(Debug, Clone, Copy)]
pub struct PairShape {
    pub batch: usize,
    pub heads: usize,
    pub value_dim: usize,
    pub q_rows: usize,
    pub kv_rows: usize,
    pub seq_len: usize,
}

/// The two launches of one softmax (query range, key range) pair: the kernel
/// writing the partial over the launch's rows, then the merge of exactly those
/// rows into the accumulator.
pub fn softmax_pair(
    info: &KernelInfo,
    inputs: &BTreeMap<String, u64>,
    bufs: &SoftmaxBuffers,
    l: &PairLaunch,
    s: &PairShape,
) -> Result<[HostLaunch; 2]> {
    let bind = softmax_bindings(
        inputs,
        (bufs.q, bufs.k, bufs.v, bufs.part_o, bufs.part_lse),
        l,
        s.q_rows,
        s.kv_rows,
        s.seq_len,
    );
    let rows = l.q_end - l.q_begin;
    let main = HostLaunch {
        kernel: KernelId::Main,
        grid: grid(info, s.batch, rows, s.heads)?,
        threads: info.threads_per_block,
        smem: info.dynamic_smem_bytes,
        args: build_args(&info.name, &info.params, &bind)?,
    };
    // Signature of `mixc_merge_lse_*` in exec.rs's helper source.
    let merge = HostLaunch {
        kernel: KernelId::Merge,
        grid: (helper_blocks(s.batch * s.heads * rows), 1, 1),
        threads: HELPER_THREADS,
        smem: 0,
        args: vec![
            ArgValue::Ptr(bufs.acc_o),
            ArgValue::Ptr(bufs.acc_lse),
            ArgValue::Ptr(bufs.part_o),
            ArgValue::Ptr(bufs.part_lse),
            int32("batch", s.batch)?,
            int32("rows", s.q_rows)?,
            int32("heads", s.heads)?,
            int32("dv", s.value_dim)?,
            int32("row_begin", l.q_begin)?,
            int32("row_end", l.q_end)?,
        ],
    };
    Ok([main, merge])
}

/// The convolution launch of one (query range, key range) pair, adding into
/// the query range's own f32 accumulator `o_acc` (`s.q_rows` = the range's length).
pub fn conv_pair(
    info: &KernelInfo,
    inputs: &BTreeMap<String, u64>,
    v: u64,
    o_acc: u64,
    l: &PairLaunch,
    s: &PairShape,
) -> Result<HostLaunch> {
    let bind = conv_bindings(inputs, v, o_acc, l, s.kv_rows, s.seq_len);
    Ok(HostLaunch {
        kernel: KernelId::Main,
        grid: grid(info, s.batch, l.q.len(), s.heads)?,
        threads: info.threads_per_block,
        smem: info.dynamic_smem_bytes,
        args: build_args(&info.name, &info.params, &bind)?,
    })
}

/// The chunkwise launch over one range of `rows` positions.
pub fn chunk_launch(
    info: &KernelInfo,
    c: &ChunkBuffers,
    rows: usize,
    batch: usize,
    heads: usize,
) -> Result<HostLaunch> {
    let bind = chunkwise_bindings(c, rows);
    Ok(HostLaunch {
        kernel: KernelId::Main,
        grid: grid(info, batch, rows, heads)?,
        threads: info.threads_per_block,
        smem: info.dynamic_smem_bytes,
        args: build_args(&info.name, &info.params, &bind)?,
    })
}

/// The argument list of `kernel` in signature order. Errors on a parameter
/// with no binding, a pointer parameter bound to a scalar or the reverse,
/// and an `int` that does not fit 32 bits.
pub fn build_args(kernel: &str, params: &[KernelParam], b: &Bindings) -> Result<Vec<ArgValue>> {
    params
        .iter()
        .map(|p| {
            let is_ptr = p.c_type.contains('*');
            match &p.role {
                ParamRole::Scalar => {
                    if is_ptr || p.c_type.trim() != "int" {
                        return Err(mismatch(
                            kernel,
                            p,
                            "a scalar the launcher only knows as `int`".into(),
                        ));
                    }
                    let v = *b
                        .ints
                        .get(&p.name)
                        .ok_or_else(|| mismatch(kernel, p, "no value for this scalar".into()))?;
                    let v = i32::try_from(v).map_err(|_| {
                        RuntimeError::DoesNotFit(format!(
                            "CUDA launcher: `{}` = {v} does not fit the kernel's 32-bit int \
                             (sequence too long for one launch)",
                            p.name
                        ))
                    })?;
                    Ok(ArgValue::Int(v))
                }
                ParamRole::Input(name) => {
                    if !is_ptr {
                        return Err(mismatch(kernel, p, "an input that is not a pointer".into()));
                    }
                    b.inputs
                        .get(name)
                        .map(|&ptr| ArgValue::Ptr(ptr))
                        .ok_or_else(|| mismatch(kernel, p, format!("input `{name}` not uploaded")))
                }
                _ => {
                    if !is_ptr {
                        return Err(mismatch(kernel, p, "a buffer role on a non-pointer".into()));
                    }
                    match b.buffers.get(&p.name) {
                        Some(ptr) => Ok(ArgValue::Ptr(ptr.unwrap_or(0))),
                        None => Err(mismatch(kernel, p, "no buffer bound to it".into())),
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixc_codegen::{generate_default, Arch, Target};
    use mixc_dsl::ir::{DType, Family};

    /// The bindings the launcher builds cover the generated signature of
    /// every example, on both archs and in every dtype: a codegen change to
    /// any family's parameters fails here, without a GPU.
    #[test]
    fn launcher_bindings_fit_every_example_kernel() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "mix") {
                continue;
            }
            let spec = mixc_dsl::parse_file(&p).unwrap();
            let inputs: BTreeMap<String, u64> = spec
                .inputs
                .iter()
                .map(|d| (d.name.clone(), 0x1000))
                .collect();
            let l = PairLaunch {
                q_index: 0,
                q: 64..128,
                k: 0..64,
                q_begin: 0,
                q_end: 64,
                kv_begin: 0,
                kv_end: 64,
                q_pos0: 64,
                k_pos0: 0,
            };
            for arch in Arch::ALL {
                for dtype in [DType::F16, DType::Bf16, DType::F32] {
                    let g = generate_default(&spec, &Target::new(arch, dtype))
                        .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
                    let k = &g.kernels[0];
                    let b = match spec.family {
                        Family::Softmax => {
                            softmax_bindings(&inputs, (1, 2, 3, 4, 5), &l, 64, 64, 128)
                        }
                        Family::Convolution => conv_bindings(&inputs, 3, 6, &l, 64, 128),
                        _ => {
                            let gate = spec.inputs.first().map(|d| (d.name.clone(), 7));
                            let c = ChunkBuffers {
                                q: 1,
                                k: 2,
                                v: 3,
                                gate,
                                o: 4,
                                state_out: 5,
                                ..Default::default()
                            };
                            chunkwise_bindings(&c, 64)
                        }
                    };
                    let args = build_args(&k.name, &k.params, &b)
                        .unwrap_or_else(|e| panic!("{} {arch} {dtype:?}: {e}", spec.name));
                    assert_eq!(args.len(), k.params.len());
                    n += 1;
                }
            }
        }
        assert!(n >= 14 * 6, "{n} kernels checked");
    }

    #[test]
    fn launch_shapes_and_limits() {
        assert_eq!(helper_blocks(0), 1);
        assert_eq!(helper_blocks(1), 1);
        assert_eq!(helper_blocks(257), 2);
        assert_eq!(helper_blocks(usize::MAX / 2), 1 << 16);
        let s = spec(
            "mixer t { heads = 4; head_dim = 64; dtype = bf16; score = dot(q, k); \
             mask = causal; norm = softmax; }",
        );
        let g = generate_default(&s, &Target::new(Arch::Sm90, DType::Bf16)).unwrap();
        let info = &g.kernels[0];
        let bm = g.config.block_m as usize;
        // The grid covers the launch's rows (not the sequence): x = ceil(rows / block_m).
        assert_eq!(grid(info, 2, 3 * bm + 1, 4).unwrap(), (4, 4, 2));
        assert_eq!(grid(info, 2, 0, 4).unwrap().0, 0);
        let e = grid(info, 70_000, bm, 4).unwrap_err().to_string();
        assert!(e.contains("65535"), "{e}");
        assert!(grid(info, 1, 1usize << 40, 4).is_err());
        assert!(fill_neg_inf_launch(8, 1usize << 33).is_err());
    }

    fn spec(src: &str) -> mixc_dsl::ir::MixerSpec {
        mixc_dsl::parse_str(src).expect("spec parses")
    }

    #[test]
    fn softmax_args_follow_the_signature() {
        let s = spec(
            "mixer t { heads = 4; kv_heads = 2; head_dim = 64; dtype = bf16; \
             input doc: i32[batch, seq]; score = dot(q, k); \
             mask = causal && segment(doc); norm = softmax; }",
        );
        let g = generate_default(&s, &Target::new(Arch::Sm90, DType::Bf16)).unwrap();
        let k = &g.kernels[0];
        let mut b = Bindings::default();
        b.buffer("q", 10)
            .buffer("k", 20)
            .buffer("v", 30)
            .buffer("o", 40);
        b.buffer("lse", 50).input("doc", 60);
        for (i, n) in [
            "q_rows", "q_begin", "q_end", "kv_rows", "kv_begin", "kv_end", "q_pos0", "k_pos0",
            "seq_len",
        ]
        .iter()
        .enumerate()
        {
            b.int(n, 100 + i as i64);
        }
        let args = build_args(&k.name, &k.params, &b).unwrap();
        assert_eq!(args.len(), k.params.len());
        assert_eq!(&args[..6], &[10, 20, 30, 40, 50, 60].map(ArgValue::Ptr));
        assert_eq!(args[6], ArgValue::Int(100));
        assert_eq!(*args.last().unwrap(), ArgValue::Int(108));

        // A missing scalar names the parameter.
        b.ints.remove("k_pos0");
        let e = build_args(&k.name, &k.params, &b).unwrap_err().to_string();
        assert!(e.contains("k_pos0") && e.contains("disagree"), "{e}");
    }

    #[test]
    fn nulls_unknown_params_and_overflow() {
        let s = spec(
            "mixer t { heads = 2; head_dim = 16; dtype = f32; score = dot(elu1(q), elu1(k)); \
             mask = causal; norm = sum(eps = 1e-6); }",
        );
        let g = generate_default(&s, &Target::new(Arch::Sm80, DType::F32)).unwrap();
        let k = &g.kernels[0];
        let mut b = Bindings::default();
        b.buffer("q", 1).buffer("k", 2).buffer("v", 3);
        b.null("state_in")
            .null("z_in")
            .buffer("o", 4)
            .null("o_num")
            .null("o_den");
        b.buffer("state_out", 5).buffer("z_out", 6).int("rows", 7);
        let args = build_args(&k.name, &k.params, &b).unwrap();
        let ptrs: Vec<u64> = args
            .iter()
            .filter_map(|a| match a {
                ArgValue::Ptr(p) => Some(*p),
                ArgValue::Int(_) => None,
            })
            .collect();
        assert_eq!(ptrs, vec![1, 2, 3, 0, 0, 4, 0, 0, 5, 6]);

        // A parameter the launcher does not know is an error, not a skipped slot.
        let mut params = k.params.clone();
        params.insert(
            3,
            KernelParam::new("mystery", "float*", ParamRole::PartialOutput, ""),
        );
        let e = build_args(&k.name, &params, &b).unwrap_err().to_string();
        assert!(e.contains("mystery"), "{e}");

        b.int("rows", 1 << 40);
        let e = build_args(&k.name, &k.params, &b).unwrap_err().to_string();
        assert!(e.contains("32-bit"), "{e}");
    }
}

/// Caller-owned device buffers of one direct call ([`super::CudaMixer::forward_device`]):
/// one rank, the whole sequence, everything in mixc's layout and the
/// mixer's storage dtype: `q [batch, seq, heads, head_dim]`, `k`/`v [batch,
/// seq, kv_heads, dim]`, `o [batch, seq, heads, value_dim]` (written), and
/// for softmax `lse [batch, heads, seq]` in f32 (written: the natural-log
/// log-sum-exp of each row, `-inf` for a row that sees no key). Extra inputs
/// by their spec names, as the generated parameters type them (`int32` for
/// segment ids and integer tables, `float32` otherwise), indexed by global
/// position like the host tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCall {
    pub batch: usize,
    pub seq: usize,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub extra: BTreeMap<String, u64>,
}

/// The launches of a direct call (one rank, the whole sequence): one launch
/// of the generated kernel writing `o` in the storage type straight into the
/// caller's buffer: softmax over every (query, key) pair, also writing the
/// row log-sum-exp (no partials, no merge kernel, no f32 accumulator);
/// convolution over every key with no accumulator; the chunkwise families
/// from a zero state, with no state or normaliser written out.
pub fn direct_launches(
    info: &KernelInfo,
    spec: &MixerSpec,
    call: &DeviceCall,
) -> Result<Vec<HostLaunch>> {
    let family = spec.family;
    let mut needed = vec![("o", call.o), ("v", call.v)];
    if family != Family::Convolution {
        needed.extend([("q", call.q), ("k", call.k)]);
    }
    for (name, p) in needed {
        if p == 0 {
            return Err(RuntimeError::BadInput {
                name: name.into(),
                problem: "null device pointer".into(),
            });
        }
    }
    if family == Family::Softmax && call.lse == 0 {
        return Err(RuntimeError::BadInput {
            name: "lse".into(),
            problem: "null device pointer (a softmax call writes the row log-sum-exp)".into(),
        });
    }
    for p in &info.params {
        if let ParamRole::Input(name) = &p.role {
            if call.extra.get(name).is_none_or(|&ptr| ptr == 0) {
                return Err(RuntimeError::BadInput {
                    name: name.clone(),
                    problem: "missing (the spec declares it; pass its device pointer)".into(),
                });
            }
        }
    }
    if call.seq == 0 || call.batch == 0 {
        return Ok(Vec::new());
    }
    super::plan::check_int_sizes(call.batch, call.seq)?;
    let (seq, heads) = (call.seq, spec.heads as usize);
    let l = PairLaunch {
        q_index: 0,
        q: 0..seq,
        k: 0..seq,
        q_begin: 0,
        q_end: seq,
        kv_begin: 0,
        kv_end: seq,
        q_pos0: 0,
        k_pos0: 0,
    };
    let bind = match family {
        Family::Softmax => softmax_bindings(
            &call.extra,
            (call.q, call.k, call.v, call.o, call.lse),
            &l,
            seq,
            seq,
            seq,
        ),
        Family::Convolution => {
            // The filter's length, from its declared shape.
            let filter_len = match &spec.score {
                Score::Filter { input } => spec
                    .tensor_shapes(call.batch, seq)
                    .get(input)
                    .and_then(|s| s.last().copied())
                    .unwrap_or(seq),
                Score::Dot { .. } => seq,
            };
            let mut b = conv_bindings(&call.extra, call.v, 0, &l, seq, filter_len);
            b.buffer("o", call.o).null("o_acc").int("accumulate", 0);
            b
        }
        Family::Linear | Family::Retention | Family::Gated => {
            let c = ChunkBuffers {
                q: call.q,
                k: call.k,
                v: call.v,
                o: call.o,
                ..ChunkBuffers::default()
            };
            let mut b = chunkwise_bindings(&c, seq);
            b.null("state_out").inputs = call.extra.clone();
            b
        }
    };
    Ok(vec![HostLaunch {
        kernel: KernelId::Main,
        grid: grid(info, call.batch, seq, heads)?,
        threads: info.threads_per_block,
        smem: info.dynamic_smem_bytes,
        args: build_args(&info.name, &info.params, &bind)?,
    }])
}
