//! The blockwise CPU block (f32): see the schedule in the module docs of
//! [`super`]. Projections and the FFN are GEMMs of the `gemm` crate on the
//! current rayon pool; the row operations run in parallel over a block's
//! rows; the mixer is the blocked CPU mixer of [`Block`]'s [`Mixer`].

use gemm::Parallelism;
use mixc_dsl::block::weight;
use mixc_dsl::{BlockSpec, FfnKind, NormKind};
use rayon::prelude::*;

use super::ops::{activate, activate_backward, rope_angles, rope_row, NormParams};
use super::{Block, BlockGradients, BlockInputs, BlockResiduals, BlockWeights};
use crate::error::Result;
use crate::ring::{RankRows, Transport};
use crate::tensor::{MixerInputs, Tensor};

/// Where a call's rows sit in the sequence: all of it, or this process's
/// rank of a ring over processes (its positions, and the transport that
/// carries the mixer's ring messages to the other ranks).
#[derive(Clone, Copy)]
pub(crate) enum Place<'a> {
    Whole,
    Rank {
        rows: &'a RankRows,
        transport: &'a std::sync::Arc<dyn Transport>,
    },
}

impl Place<'_> {
    /// The whole sequence's length, for a call on `n` positions.
    pub(crate) fn seq(&self, n: usize) -> usize {
        match self {
            Place::Whole => n,
            Place::Rank { rows, .. } => rows.seq,
        }
    }

    /// The sequence position of flattened row `r` of `[batch, n, ...]`
    /// rows (`n` rows per batch row).
    fn position(&self, r: usize, n: usize) -> usize {
        match self {
            Place::Whole => r % n,
            Place::Rank { rows, .. } => rows.positions[r % n],
        }
    }
}

/// A strided matrix view (`rs`, `cs`: element strides of rows and columns).
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> View<'a> {
    /// A dense row-major `rows x cols` matrix.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose (no copy).
    fn t(self) -> View<'a> {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    /// Whether every element lies inside `data` (strides are positive).
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || ((self.rows - 1) as isize * self.rs + (self.cols - 1) as isize * self.cs)
                < self.data.len() as isize
    }
}

/// `c = a · b` (or `c += a · b`), `c` dense row-major `a.rows x b.cols`.
fn matmul(c: &mut [f32], a: View<'_>, b: View<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.len() == m * n && a.fits() && b.fits(),
        "matmul shapes: a {m}x{k}, b {}x{n}, c {}",
        b.rows,
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the views were checked to lie inside their slices, `c` has
    // exactly m x n elements and is not aliased by `a` or `b` (it is a
    // unique borrow); gemm reads `c` only with `read_dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The block's dimensions and weights as slices.
struct Dims<'a> {
    spec: &'a BlockSpec,
    width: usize,
    hidden: usize,
    /// Row widths of q, k, v and o.
    qd: usize,
    kd: usize,
    vd: usize,
    od: usize,
    n1: NormParams<'a, f32>,
    n2: NormParams<'a, f32>,
    w: &'a BlockWeights,
}

impl<'a> Dims<'a> {
    fn new(spec: &'a BlockSpec, w: &'a BlockWeights) -> Dims<'a> {
        let m = &spec.mixer;
        let (h, kvh) = (m.heads as usize, m.kv_heads as usize);
        let (dk, dv) = (m.head_dim as usize, m.value_dim as usize);
        Dims {
            spec,
            width: spec.width as usize,
            hidden: spec.ffn.hidden as usize,
            qd: h * dk,
            kd: kvh * dk,
            vd: kvh * dv,
            od: h * dv,
            n1: NormParams::new(
                &spec.norm,
                w.get(weight::NORM1),
                w.get_opt(weight::NORM1_BIAS),
            ),
            n2: NormParams::new(
                &spec.norm,
                w.get(weight::NORM2),
                w.get_opt(weight::NORM2_BIAS),
            ),
            w,
        }
    }

    /// A weight `[out, in]` as the right operand of `x · Wᵀ`.
    fn wt(&self, name: &str) -> View<'a> {
        self.wn(name).t()
    }

    /// A weight `[out, in]` as the right operand of `g · W` (its shape is
    /// the spec's: validation checked it).
    fn wn(&self, name: &str) -> View<'a> {
        let t = &self.w.tensors[name];
        View::new(&t.data, t.shape[0], t.shape[1])
    }
}

/// `out[r] = norm(x[r])` for the rows of a block, in parallel.
fn norm_rows(p: &NormParams<'_, f32>, x: &[f32], out: &mut [f32], width: usize) {
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .for_each(|(o, r)| p.forward(r, o));
}

/// Back through a norm for a block's rows: `dx += ...`, and the gain (and
/// bias) gradients summed into `dg` (`db`).
fn norm_rows_backward(
    p: &NormParams<'_, f32>,
    x: &[f32],
    dout: &[f32],
    dx: &mut [f32],
    width: usize,
    dg: &mut [f32],
    db: Option<&mut [f32]>,
) {
    let layer = p.kind == NormKind::LayerNorm;
    let zeros = || {
        (
            vec![0.0f32; width],
            vec![0.0f32; if layer { width } else { 0 }],
        )
    };
    let (g, b) = dx
        .par_chunks_mut(width)
        .zip(x.par_chunks(width).zip(dout.par_chunks(width)))
        .fold(zeros, |(mut g, mut b), (dxr, (xr, dr))| {
            p.backward(xr, dr, dxr, &mut g, layer.then_some(b.as_mut_slice()));
            (g, b)
        })
        .reduce(zeros, |(mut g1, mut b1), (g2, b2)| {
            g1.iter_mut().zip(&g2).for_each(|(a, b)| *a += b);
            b1.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
            (g1, b1)
        });
    dg.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
    if let Some(db) = db {
        db.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
    }
}

/// The rotary embedding (or its inverse) on a block's `[rows, heads * d]`
/// rows, the block's first row at flattened row `r0` of rows `n` per batch
/// row, placed by `place`.
fn rope_block(
    spec: &BlockSpec,
    t: &mut [f32],
    row_len: usize,
    (r0, n): (usize, usize),
    place: Place<'_>,
    inv: bool,
) {
    let Some(rope) = spec.rope else { return };
    let d = spec.mixer.head_dim as usize;
    t.par_chunks_mut(row_len).enumerate().for_each_init(
        Vec::new,
        |cs: &mut Vec<(f32, f32)>, (i, row)| {
            rope_angles(rope.base, d, place.position(r0 + i, n), cs);
            rope_row(row, d, cs, inv);
        },
    );
}

/// The FFN's activation over a block, in parallel (`up` empty for gelu).
fn activate_block(kind: FfnKind, u: &[f32], up: &[f32], a: &mut [f32], hidden: usize) {
    a.par_chunks_mut(hidden).enumerate().for_each(|(r, ar)| {
        let s = r * hidden..(r + 1) * hidden;
        let upr = if up.is_empty() {
            &[][..]
        } else {
            &up[s.clone()]
        };
        activate(kind, &u[s], upr, ar);
    });
}

/// Row ranges of the blockwise schedule.
fn row_blocks(rows: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(block.max(1))
        .map(move |r0| (r0, (r0 + block).min(rows)))
}

/// One row block's tail recomputed or computed: `y`, `z = norm2(y)`, the
/// FFN pre-activations `u` (and `up` for swiglu) and activation `a`.
struct Tail {
    y: Vec<f32>,
    z: Vec<f32>,
    u: Vec<f32>,
    up: Vec<f32>,
    a: Vec<f32>,
}

impl Tail {
    fn new(d: &Dims<'_>, rows: usize) -> Tail {
        let swiglu = d.spec.ffn.kind == FfnKind::SwiGlu;
        Tail {
            y: vec![0.0; rows * d.width],
            z: vec![0.0; rows * d.width],
            u: vec![0.0; rows * d.hidden],
            up: vec![0.0; if swiglu { rows * d.hidden } else { 0 }],
            a: vec![0.0; rows * d.hidden],
        }
    }

    /// Fills the tail of rows `r0..r1` from x and the mixer output o.
    fn compute(&mut self, d: &Dims<'_>, x: &[f32], o: &[f32], (r0, r1): (usize, usize)) {
        let n = r1 - r0;
        let (w, f) = (d.width, d.hidden);
        let y = &mut self.y[..n * w];
        y.copy_from_slice(&x[r0 * w..r1 * w]);
        let ob = View::new(&o[r0 * d.od..r1 * d.od], n, d.od);
        matmul(y, ob, d.wt(weight::WO), true);
        let z = &mut self.z[..n * w];
        norm_rows(&d.n2, y, z, w);
        let zv = View::new(z, n, w);
        let u = &mut self.u[..n * f];
        match d.spec.ffn.kind {
            FfnKind::SwiGlu => {
                matmul(u, zv, d.wt(weight::GATE), false);
                matmul(&mut self.up[..n * f], zv, d.wt(weight::UP), false);
            }
            FfnKind::Gelu => matmul(u, zv, d.wt(weight::UP), false),
        }
        let up = if self.up.is_empty() {
            &[][..]
        } else {
            &self.up[..n * f]
        };
        activate_block(d.spec.ffn.kind, u, up, &mut self.a[..n * f], f);
    }
}

/// The blockwise forward: the output `[batch, seq, width]` and, with
/// `train`, the residuals.
pub(crate) fn forward(
    block: &Block,
    inputs: &BlockInputs,
    weights: &BlockWeights,
    train: bool,
    place: Place<'_>,
) -> Result<(Tensor<f32>, Option<BlockResiduals>)> {
    let spec = block.spec();
    let d = Dims::new(spec, weights);
    let m = &spec.mixer;
    let (b, l, w) = (inputs.batch, inputs.seq, d.width);
    let rows = b * l;
    let br = block.block_rows().min(rows);
    let x = &inputs.x.data;

    // 1. q, k, v for the whole sequence, block by block.
    let mut q = vec![0.0f32; rows * d.qd];
    let mut k = vec![0.0f32; rows * d.kd];
    let mut v = vec![0.0f32; rows * d.vd];
    let mut h = vec![0.0f32; br * w];
    for (r0, r1) in row_blocks(rows, br) {
        let n = r1 - r0;
        let hb = &mut h[..n * w];
        norm_rows(&d.n1, &x[r0 * w..r1 * w], hb, w);
        let hv = View::new(hb, n, w);
        let qb = &mut q[r0 * d.qd..r1 * d.qd];
        matmul(qb, hv, d.wt(weight::WQ), false);
        rope_block(spec, qb, d.qd, (r0, l), place, false);
        let kb = &mut k[r0 * d.kd..r1 * d.kd];
        matmul(kb, hv, d.wt(weight::WK), false);
        rope_block(spec, kb, d.kd, (r0, l), place, false);
        matmul(&mut v[r0 * d.vd..r1 * d.vd], hv, d.wt(weight::WV), false);
    }
    drop(h);
    let (hq, kvh) = (m.heads as usize, m.kv_heads as usize);
    let (dk, dv) = (m.head_dim as usize, m.value_dim as usize);
    let mixer_inputs = MixerInputs::self_attention(
        b,
        l,
        Tensor::new(vec![b, l, hq, dk], q),
        Tensor::new(vec![b, l, kvh, dk], k),
        Tensor::new(vec![b, l, kvh, dv], v),
        inputs.extra.clone(),
    );

    // 2. The mixer over the whole sequence (its own blocks and ring), or
    //    this rank's part of a ring over processes: its rows placed in
    //    whole-sequence tensors (pages of the others never touched), and
    //    its rows of `o` taken back.
    let (o, mixer_res) = match place {
        Place::Whole if train => {
            let (out, res) = block.mixer().forward_train(&mixer_inputs)?;
            (out.o, Some(res))
        }
        Place::Whole => (block.mixer().forward(&mixer_inputs)?.o, None),
        Place::Rank { rows, transport } => {
            let whole = whole_inputs(rows, &mixer_inputs);
            let (out, res) = block.mixer().forward_rank(&whole, train, transport)?;
            let o = Tensor::new(vec![b, l, hq, dv], rows.gather(&out.o));
            (o, train.then_some(res))
        }
    };

    // 3. Per row block: the output projection, norm, FFN and residuals.
    let mut out = vec![0.0f32; rows * w];
    let mut tail = Tail::new(&d, br);
    for (r0, r1) in row_blocks(rows, br) {
        let n = r1 - r0;
        tail.compute(&d, x, &o.data, (r0, r1));
        let ob = &mut out[r0 * w..r1 * w];
        ob.copy_from_slice(&tail.y[..n * w]);
        let av = View::new(&tail.a[..n * d.hidden], n, d.hidden);
        matmul(ob, av, d.wt(weight::DOWN), true);
    }
    let out = Tensor::new(inputs.x.shape.clone(), out);
    let res = mixer_res.map(|mixer| BlockResiduals {
        mixer_inputs,
        o,
        mixer,
    });
    Ok((out, res))
}

/// Gradient accumulators by weight name.
struct WeightGrads(std::collections::BTreeMap<String, Vec<f32>>);

impl WeightGrads {
    fn new(spec: &BlockSpec) -> WeightGrads {
        WeightGrads(
            spec.weight_shapes()
                .into_iter()
                .map(|(n, s)| (n, vec![0.0; s.iter().product()]))
                .collect(),
        )
    }
    fn get(&mut self, name: &str) -> &mut [f32] {
        self.0
            .get_mut(name)
            .map(|v| v.as_mut_slice())
            .expect("a weight of the spec")
    }
    /// `dW += gᵀ · x` for a projection `[out, in]` (g: rows x out, x: rows x in).
    fn add_outer(&mut self, name: &str, g: View<'_>, x: View<'_>) {
        matmul(self.get(name), g.t(), x, true);
    }
    /// Two gradients at once (the norm's gain and bias).
    fn pair(&mut self, a: &str, b: &str) -> (&mut [f32], Option<&mut [f32]>) {
        let mut it = self.0.iter_mut().filter(|(n, _)| *n == a || *n == b);
        let (mut ga, mut gb) = (None, None);
        for (n, v) in it.by_ref() {
            if n == a {
                ga = Some(v.as_mut_slice());
            } else {
                gb = Some(v.as_mut_slice());
            }
        }
        (ga.expect("a norm gain"), gb)
    }
}

/// The blockwise backward.
pub(crate) fn backward(
    block: &Block,
    inputs: &BlockInputs,
    weights: &BlockWeights,
    res: &BlockResiduals,
    d_out: &Tensor<f32>,
    place: Place<'_>,
) -> Result<BlockGradients<f32>> {
    let spec = block.spec();
    let d = Dims::new(spec, weights);
    let (b, l, w, f) = (inputs.batch, inputs.seq, d.width, d.hidden);
    let rows = b * l;
    let br = block.block_rows().min(rows);
    let x = &inputs.x.data;
    let o = &res.o.data;
    let mut gw = WeightGrads::new(spec);

    // 1. Per row block, back through the FFN, norm2 and the output
    //    projection, recomputing the block's tail.
    let mut dx = d_out.data.to_vec();
    let mut d_o = vec![0.0f32; rows * d.od];
    let mut tail = Tail::new(&d, br);
    let mut da = vec![0.0f32; br * f];
    let mut du = vec![0.0f32; br * f];
    let mut dup = vec![0.0f32; br * f];
    let mut dz = vec![0.0f32; br * w];
    for (r0, r1) in row_blocks(rows, br) {
        let n = r1 - r0;
        tail.compute(&d, x, o, (r0, r1));
        let g = View::new(&d_out.data[r0 * w..r1 * w], n, w);
        let av = View::new(&tail.a[..n * f], n, f);
        gw.add_outer(weight::DOWN, g, av);
        let dab = &mut da[..n * f];
        matmul(dab, g, d.wn(weight::DOWN), false);
        let (dub, dupb) = (&mut du[..n * f], &mut dup[..n * f]);
        let up = if tail.up.is_empty() {
            &[][..]
        } else {
            &tail.up[..n * f]
        };
        let u = &tail.u[..n * f];
        dub.par_chunks_mut(f)
            .zip(dupb.par_chunks_mut(f))
            .enumerate()
            .for_each(|(r, (dur, dupr))| {
                let s = r * f..(r + 1) * f;
                let upr = if up.is_empty() {
                    &[][..]
                } else {
                    &up[s.clone()]
                };
                activate_backward(spec.ffn.kind, &u[s.clone()], upr, &dab[s], dur, dupr);
            });
        let zv = View::new(&tail.z[..n * w], n, w);
        let dzb = &mut dz[..n * w];
        let (duv, dupv) = (View::new(dub, n, f), View::new(dupb, n, f));
        match spec.ffn.kind {
            FfnKind::SwiGlu => {
                gw.add_outer(weight::GATE, duv, zv);
                gw.add_outer(weight::UP, dupv, zv);
                matmul(dzb, duv, d.wn(weight::GATE), false);
                matmul(dzb, dupv, d.wn(weight::UP), true);
            }
            FfnKind::Gelu => {
                gw.add_outer(weight::UP, duv, zv);
                matmul(dzb, duv, d.wn(weight::UP), false);
            }
        }
        // dy = d_out + norm2ᵀ dz, kept in dx (the residual's gradient).
        let dyb = &mut dx[r0 * w..r1 * w];
        let (dg, db) = gw.pair(weight::NORM2, weight::NORM2_BIAS);
        norm_rows_backward(&d.n2, &tail.y[..n * w], dzb, dyb, w, dg, db);
        let dyv = View::new(dyb, n, w);
        let ov = View::new(&o[r0 * d.od..r1 * d.od], n, d.od);
        gw.add_outer(weight::WO, dyv, ov);
        matmul(&mut d_o[r0 * d.od..r1 * d.od], dyv, d.wn(weight::WO), false);
    }
    drop((tail, da, du, dup, dz));

    // 2. The mixer's backward, one group of heads at a time where heads are
    //    independent (else all at once), each group's dq, dk, dv taken
    //    straight back through the rotary embedding and its rows of the
    //    q/k/v projections into dh (so no whole-sequence dq, dk, dv).
    let m = &spec.mixer;
    let d_o = Tensor::new(vec![b, l, m.heads as usize, m.value_dim as usize], d_o);
    let mut dh = vec![0.0f32; rows * w];
    let extra = match (place, block.head_groups()) {
        (Place::Rank { rows, transport }, _) => {
            // This rank's part of the ring's backward on whole-sequence
            // tensors; dk and dv come home from the other ranks.
            let whole = whole_inputs(rows, &res.mixer_inputs);
            let o_whole = scatter(rows, &res.o);
            let d_o_whole = scatter(rows, &d_o);
            let stat = crate::mixer::Residuals::from_stat(res.mixer.stat.clone(), b, rows.seq);
            let mut grads = block
                .mixer()
                .backward_rank(&whole, &o_whole, &stat, &d_o_whole, transport)?
                .grads;
            for t in [&mut grads.dq, &mut grads.dk, &mut grads.dv] {
                let mut shape = t.shape.clone();
                shape[1] = l;
                *t = Tensor::new(shape, rows.gather(t));
            }
            let extra = std::mem::take(&mut grads.extra);
            project_back(&d, x, grads, (0, 1), &mut dh, &mut gw, (l, br), place);
            extra
        }
        (Place::Whole, Some((part, groups))) => {
            for g in 0..groups {
                let grads = group_backward(part, g, groups, res, &d_o)?;
                project_back(&d, x, grads, (g, groups), &mut dh, &mut gw, (l, br), place);
            }
            Default::default()
        }
        (Place::Whole, None) => {
            let mut grads = block
                .mixer()
                .backward(&res.mixer_inputs, &res.o, &res.mixer, &d_o)?
                .grads;
            let extra = std::mem::take(&mut grads.extra);
            project_back(&d, x, grads, (0, 1), &mut dh, &mut gw, (l, br), place);
            extra
        }
    };
    drop(d_o);

    // 3. Per row block, back through norm1.
    for (r0, r1) in row_blocks(rows, br) {
        let (dg, db) = gw.pair(weight::NORM1, weight::NORM1_BIAS);
        norm_rows_backward(
            &d.n1,
            &x[r0 * w..r1 * w],
            &dh[r0 * w..r1 * w],
            &mut dx[r0 * w..r1 * w],
            w,
            dg,
            db,
        );
    }
    let shapes = spec.weight_shapes();
    Ok(BlockGradients {
        dx: Tensor::new(inputs.x.shape.clone(), dx),
        weights: gw
            .0
            .into_iter()
            .map(|(n, g)| (n.clone(), Tensor::new(shapes[&n].clone(), g)))
            .collect(),
        extra,
    })
}

/// Heads `g * n .. (g + 1) * n` of `[batch, seq, heads, d]` rows, `n` the
/// group's heads.
fn heads_of(t: &Tensor<f32>, g: usize, groups: usize) -> Tensor<f32> {
    let (b, l, h, d) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
    let n = h / groups;
    let mut data = Vec::with_capacity(b * l * n * d);
    for row in t.data.chunks_exact(h * d) {
        data.extend_from_slice(&row[g * n * d..(g + 1) * n * d]);
    }
    Tensor::new(vec![b, l, n, d], data)
}

/// The mixer's backward for group `g` of `groups` groups of heads (heads
/// independent, see `head_groups`): the group's q, k, v, o, upstream
/// gradient and row statistic are sliced out and the group's mixer runs on
/// them, so the mixer's own scratch is that of one group. The gradients
/// are the group's, `[batch, seq, heads / groups, dim]`.
fn group_backward(
    part: &crate::mixer::Mixer,
    g: usize,
    groups: usize,
    res: &BlockResiduals,
    d_o: &Tensor<f32>,
) -> Result<crate::grad::Gradients<f32>> {
    let x = &res.mixer_inputs;
    let (b, l) = (x.batch, x.seq);
    let inputs = MixerInputs::self_attention(
        b,
        l,
        heads_of(&x.q, g, groups),
        heads_of(&x.k, g, groups),
        heads_of(&x.v, g, groups),
        Default::default(),
    );
    // The statistic is `[batch, heads, seq]`: the group's heads are one run
    // of each batch row.
    let stat = &res.mixer.stat;
    let heads = x.q.shape[2];
    let n = heads / groups;
    let stat_g = if stat.data.is_empty() {
        stat.clone()
    } else {
        let data = stat
            .data
            .chunks_exact(heads * l)
            .flat_map(|bh| bh[g * n * l..(g + 1) * n * l].iter().copied())
            .collect();
        Tensor::new(vec![b, n, l], data)
    };
    let residuals = crate::mixer::Residuals::from_stat(stat_g, b, l);
    Ok(part
        .backward(
            &inputs,
            &heads_of(&res.o, g, groups),
            &residuals,
            &heads_of(d_o, g, groups),
        )?
        .grads)
}

/// Takes group `g`'s (of `groups`) mixer gradients back through the
/// rotary embedding and the group's rows of the q, k, v projections, row
/// block by row block (`(seq, block_rows)`): the projections' weight
/// gradients for those rows, and `dh += dq Wq + dk Wk + dv Wv` restricted
/// to them. `groups = 1`: every head.
#[allow(clippy::too_many_arguments)]
fn project_back(
    d: &Dims<'_>,
    x: &[f32],
    grads: crate::grad::Gradients<f32>,
    (g, groups): (usize, usize),
    dh: &mut [f32],
    gw: &mut WeightGrads,
    (seq, br): (usize, usize),
    place: Place<'_>,
) {
    let w = d.width;
    let (mut dq, mut dk, dv) = (grads.dq.data, grads.dk.data, grads.dv.data);
    let (qd, kd, vd) = (d.qd / groups, d.kd / groups, d.vd / groups);
    let rows = dh.len() / w;
    let mut h = vec![0.0f32; br.min(rows) * w];
    for (r0, r1) in row_blocks(rows, br) {
        let n = r1 - r0;
        let hb = &mut h[..n * w];
        norm_rows(&d.n1, &x[r0 * w..r1 * w], hb, w);
        let hv = View::new(hb, n, w);
        let dqb = &mut dq[r0 * qd..r1 * qd];
        rope_block(d.spec, dqb, qd, (r0, seq), place, true);
        let dkb = &mut dk[r0 * kd..r1 * kd];
        rope_block(d.spec, dkb, kd, (r0, seq), place, true);
        let dhb = &mut dh[r0 * w..r1 * w];
        let parts = [
            (weight::WQ, View::new(dqb, n, qd)),
            (weight::WK, View::new(dkb, n, kd)),
            (weight::WV, View::new(&dv[r0 * vd..r1 * vd], n, vd)),
        ];
        for (name, gv) in parts {
            // The group's rows of the weight `[out, in]`.
            let out = gv.cols;
            let (a, z) = (g * out * w, (g + 1) * out * w);
            matmul(&mut gw.get(name)[a..z], gv.t(), hv, true);
            matmul(dhb, gv, View::new(&d.w.get(name)[a..z], out, w), true);
        }
    }
}

/// A rank's `[batch, n, ...]` rows placed in a whole-sequence tensor.
fn scatter(rows: &RankRows, local: &Tensor<f32>) -> Tensor<f32> {
    let mut shape = local.shape.clone();
    shape[1] = rows.seq;
    rows.scatter(&local.data, &shape)
}

/// A rank's mixer inputs (q, k, v of its rows; extra inputs whole) as the
/// whole-sequence inputs `Mixer::forward_rank` and `backward_rank` read.
fn whole_inputs(rows: &RankRows, local: &MixerInputs) -> MixerInputs {
    MixerInputs::self_attention(
        local.batch,
        rows.seq,
        scatter(rows, &local.q),
        scatter(rows, &local.k),
        scatter(rows, &local.v),
        local.extra.clone(),
    )
}
