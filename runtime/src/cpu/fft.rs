//! Long causal convolutions by FFT: the convolution family (`score =
//! filter(f)`, `mask = causal`, `norm = none`) computes
//! `o_i = sum_{j <= i} f[h][i - j] v_j`, which the blocked path runs as a
//! Toeplitz product in O(L²·d_v) per head. With the sequence and the filter
//! zero-padded to `n >= 2L`, the circular convolution of length `n` equals
//! the causal one on the first `L` outputs, and costs two real FFTs per
//! value column and one per filter: O(L log L·d_v) (Hyena's and
//! `torch.fft`'s formulation).
//!
//! It runs on one rank (a ring of simulated devices keeps the blocked path,
//! whose shards travel), for sequences of at least [`MIN_SEQ`] positions,
//! where it is faster.

use mixc_dsl::ir::{Decay, Mask, Norm, Score};
use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::RealFftPlanner;

use super::real::Real;
use super::{Ctx, RankOutput, RankStats};
use crate::ring::RingSchedule;

/// Shortest sequence the FFT form takes: below it the blocked path's
/// Toeplitz tiles are as fast.
pub(super) const MIN_SEQ: usize = 256;

/// Whether a run takes the FFT form: a plain causal filter score, no bias,
/// transform or decay, no normalisation, one rank, queries aligned with keys.
pub(super) fn applies<T>(ctx: &Ctx<'_, T>, sched: &RingSchedule) -> bool {
    matches!(ctx.spec.score, Score::Filter { .. })
        && matches!(ctx.spec.mask, Mask::Causal)
        && matches!(ctx.spec.norm, Norm::None)
        && matches!(ctx.spec.decay, Decay::None)
        && ctx.spec.bias.is_none()
        && ctx.spec.transform.is_none()
        && ctx.filter.is_some()
        && sched.ranks == 1
        && ctx.q_offset == 0
        && ctx.seq == ctx.positions
        && ctx.seq >= MIN_SEQ
}

/// The FFT's arithmetic: the run's own precision (f32 or f64).
trait FftReal: realfft::FftNum {
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}
impl FftReal for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}
impl FftReal for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

/// The whole output on the one rank: `[batch * heads][seq][dv]`, one task
/// per (batch row, head).
pub(super) fn rank_main<T: Real>(ctx: &Ctx<'_, T>) -> RankOutput<T> {
    let (l, dv, heads) = (ctx.seq, ctx.dv, ctx.heads);
    let mut y = super::blocked::written(ctx.batch * heads * l * dv, T::ZERO);
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        convolve::<T, f32>(ctx, &mut y);
    } else {
        convolve::<T, f64>(ctx, &mut y);
    }
    let pairs = (ctx.batch * heads) as u64 * (l as u64 * (l as u64 + 1) / 2);
    RankOutput {
        ranges: std::iter::once(0..l).collect(),
        y,
        stat: if ctx.keep_stat {
            vec![0.0; ctx.batch * heads * l]
        } else {
            Vec::new()
        },
        stats: RankStats {
            pairs,
            steps_computed: 1,
            fft: true,
            ..RankStats::default()
        },
    }
}

/// Fills `y` (`[batch * heads][seq][dv]`) with the causal convolution,
/// computing in `F`.
fn convolve<T: Real, F: FftReal>(ctx: &Ctx<'_, T>, y: &mut [T]) {
    let (l, dv, heads) = (ctx.seq, ctx.dv, ctx.heads);
    let n = (2 * l).next_power_of_two();
    let mut planner = RealFftPlanner::<F>::new();
    let (fwd, inv) = (planner.plan_fft_forward(n), planner.plan_fft_inverse(n));
    let filter = ctx.filter.as_ref().expect("applies() checked the filter");
    // Each head's filter spectrum, scaled by 1/n (the inverse is unnormalised).
    let norm = 1.0 / n as f64;
    let spectra: Vec<Vec<Complex<F>>> = (0..heads)
        .map(|h| {
            let mut x = fwd.make_input_vec();
            for (d, f) in x.iter_mut().zip(&filter[h * ctx.filter_len..][..l]) {
                *d = F::of(f.to_f64() * norm);
            }
            let mut y = fwd.make_output_vec();
            fwd.process(&mut x, &mut y).expect("sizes from the plan");
            y
        })
        .collect();
    let task = |(x, out): (usize, &mut [T])| {
        let (b, h) = (x / heads, x % heads);
        let kvh = ctx.spec.kv_head_of(h as u32) as usize;
        let (mut time, mut freq) = (fwd.make_input_vec(), fwd.make_output_vec());
        let mut scratch = fwd.make_scratch_vec();
        let mut iscratch = inv.make_scratch_vec();
        // This head's values, rows in position order (one sequential read).
        let mut vals = vec![F::zero(); l * dv];
        for (i, row) in vals.chunks_exact_mut(dv).enumerate() {
            ctx.v
                .map_into(ctx.v_at(b, i, kvh), row, |s| F::of(s as f64));
        }
        for c in 0..dv {
            for (i, t) in time.iter_mut().enumerate() {
                *t = if i < l { vals[i * dv + c] } else { F::zero() };
            }
            fwd.process_with_scratch(&mut time, &mut freq, &mut scratch)
                .expect("sizes from the plan");
            for (z, f) in freq.iter_mut().zip(&spectra[h]) {
                *z = *z * *f;
            }
            // A real signal's spectrum has real DC and Nyquist terms; keep
            // them exactly real for the inverse.
            freq[0].im = F::zero();
            if let Some(last) = freq.last_mut() {
                last.im = F::zero();
            }
            inv.process_with_scratch(&mut freq, &mut time, &mut iscratch)
                .expect("sizes from the plan");
            for (i, row) in out.chunks_exact_mut(dv).enumerate() {
                row[c] = T::from_f64(time[i].f64());
            }
        }
    };
    if ctx.pool.current_num_threads() <= 1 {
        y.chunks_mut(l * dv).enumerate().for_each(task);
    } else {
        ctx.pool
            .install(|| y.par_chunks_mut(l * dv).enumerate().for_each(task));
    }
}
