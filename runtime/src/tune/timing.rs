//! Timing candidates: the [`Timer`] trait every backend implements, and the
//! CPU backend's wall-clock timer.

use super::{Candidate, Sample, TunedConfig};
use crate::cpu::{self, CpuConfig};
use crate::error::{Result, RuntimeError};
use crate::inputs::random_inputs;
use crate::reference;
use crate::tensor::{MixerInputs, Tensor};
use mixc_dsl::ir::MixerSpec;
use std::time::{Duration, Instant};

/// Measures candidates of one backend on one shape.
///
/// [`super::run_tuning`] calls `check` first and `time` only when the check
/// passed, so a wrong kernel is never timed and can never win.
pub trait Timer {
    /// Runs `cand` once and compares its output with the f64 reference on a
    /// sample of rows: `max |out - ref| / max |ref|`.
    fn check(&mut self, cand: &Candidate) -> Result<f64>;
    /// Warm-up runs, then timed repetitions on rotating inputs.
    fn time(&mut self, cand: &Candidate) -> Result<Sample>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimerOptions {
    /// Timed repetitions per candidate (the median is reported).
    pub reps: usize,
    /// Untimed runs before them (thread pool, page faults, caches).
    pub warmup: usize,
    /// Distinct random input sets the repetitions cycle through, so no run
    /// finds the previous run's inputs in cache (fewer when memory is short).
    pub rotations: usize,
    /// Query rows compared with the reference.
    pub check_rows: usize,
    pub seed: u64,
}

impl Default for CpuTimerOptions {
    fn default() -> Self {
        CpuTimerOptions {
            reps: 5,
            warmup: 1,
            rotations: 3,
            check_rows: 8,
            seed: 0,
        }
    }
}

/// Memory the rotated input sets may take together.
const ROTATION_BYTES: usize = 512 << 20;

/// Wall clock around [`cpu::run`], median of `reps`.
pub struct CpuTimer {
    spec: MixerSpec,
    base: CpuConfig,
    inputs: Vec<MixerInputs>,
    rows: Vec<usize>,
    reference: Tensor<f64>,
    opts: CpuTimerOptions,
    next: usize,
    /// Set: the backward pass is timed and checked instead of the forward.
    backward: Option<BackwardCheck>,
}

/// What timing the backward needs: an upstream gradient and the reference
/// gradients of the first input set on one kv head (every query head of
/// its group, all positions).
struct BackwardCheck {
    d_o: Tensor<f32>,
    plan: crate::check::GradCheckPlan,
    want: crate::grad::Gradients<f64>,
}

/// `n` rows spread evenly over `0..seq`, both ends included (masks change
/// shape there).
pub fn sample_rows(seq: usize, n: usize) -> Vec<usize> {
    let n = n.clamp(1, seq.max(1));
    if n == 1 {
        return vec![seq.saturating_sub(1)];
    }
    let mut r: Vec<usize> = (0..n).map(|k| k * (seq - 1) / (n - 1)).collect();
    r.dedup();
    r
}

fn input_bytes(i: &MixerInputs) -> usize {
    let extra: usize = i
        .extra
        .values()
        .map(|t| t.shape().iter().product::<usize>() * 4)
        .sum();
    (i.q.numel() + i.k.numel() + i.v.numel()) * 4 + extra
}

impl CpuTimer {
    /// Random inputs for `batch x seq` and the reference on the check rows.
    /// `base` supplies what is not tuned (ranks, sharding, precision).
    pub fn new(
        spec: &MixerSpec,
        base: CpuConfig,
        batch: usize,
        seq: usize,
        opts: CpuTimerOptions,
    ) -> Result<Self> {
        if batch == 0 || seq == 0 {
            return Err(RuntimeError::Invalid(
                "tuning needs batch and seq of at least 1".into(),
            ));
        }
        if opts.reps == 0 {
            return Err(RuntimeError::Invalid(
                "tuning needs at least one timed repetition".into(),
            ));
        }
        let first = random_inputs(spec, batch, seq, opts.seed);
        let sets = (ROTATION_BYTES / input_bytes(&first).max(1)).clamp(1, opts.rotations.max(1));
        let mut inputs = vec![first];
        for r in 1..sets {
            inputs.push(random_inputs(
                spec,
                batch,
                seq,
                opts.seed.wrapping_add(r as u64),
            ));
        }
        let rows = sample_rows(seq, opts.check_rows);
        let reference = reference::evaluate_rows(spec, &inputs[0], &rows)?;
        Ok(CpuTimer {
            spec: spec.clone(),
            base,
            inputs,
            rows,
            reference,
            opts,
            next: 0,
            backward: None,
        })
    }

    /// Times and checks the backward pass (`Mixer::backward`'s CPU path)
    /// instead of the forward: each repetition runs an untimed forward,
    /// then the timed backward; the check compares the gradients of kv
    /// head 0 with the f64 reference.
    pub fn for_backward(mut self) -> Result<Self> {
        let first = &self.inputs[0];
        let d_o =
            crate::inputs::random_upstream(&self.spec, first.batch, first.seq, self.opts.seed);
        let plan = crate::check::GradCheckPlan {
            kv_heads: vec![0],
            ..crate::check::GradCheckPlan::full(&self.spec)
        };
        let want = reference::gradients_for(&self.spec, first, &d_o, &plan.kv_heads, &|_| {})?;
        self.backward = Some(BackwardCheck { d_o, plan, want });
        Ok(self)
    }

    /// One backward of `inputs` with `cfg`: the forward untimed, the
    /// backward's time and gradients returned.
    fn backward_once(
        &self,
        cfg: &CpuConfig,
        inputs: &MixerInputs,
        d_o: &Tensor<f32>,
    ) -> Result<(Duration, crate::grad::Gradients<f32>)> {
        let m = cpu::CpuMixer::new(&self.spec, cfg)?;
        let fwd = m.run_train(inputs)?;
        let o = fwd.output.into_f32();
        let t0 = Instant::now();
        let g = m.backward(inputs, &o, &fwd.stat, d_o)?.into_f32();
        Ok((t0.elapsed(), g))
    }

    fn config(&self, cand: &Candidate) -> Result<CpuConfig> {
        match &cand.config {
            TunedConfig::Cpu(t) => Ok(t.apply(&self.base)),
            TunedConfig::Cuda(_) => Err(RuntimeError::Invalid(format!(
                "candidate `{}` is a CUDA configuration; the CPU timer runs CPU ones",
                cand.label
            ))),
        }
    }

    fn run_once(&mut self, cfg: &CpuConfig) -> Result<Duration> {
        let inputs = &self.inputs[self.next % self.inputs.len()];
        self.next += 1;
        if let Some(b) = &self.backward {
            return Ok(self.backward_once(cfg, inputs, &b.d_o)?.0);
        }
        let t0 = Instant::now();
        cpu::run(&self.spec, inputs, cfg)?;
        Ok(t0.elapsed())
    }
}

impl Timer for CpuTimer {
    fn check(&mut self, cand: &Candidate) -> Result<f64> {
        let cfg = self.config(cand)?;
        if let Some(b) = &self.backward {
            let (_, got) = self.backward_once(&cfg, &self.inputs[0], &b.d_o)?;
            let report = crate::check::compare_gradients_with(
                &self.spec,
                &b.want,
                &got,
                &b.plan,
                mixc_dsl::DType::F32,
            )?;
            return Ok(report.max_rel_error());
        }
        let out = cpu::run(&self.spec, &self.inputs[0], &cfg)?.output.to_f64();
        Ok(rows_error(&out, &self.reference, &self.rows))
    }

    fn time(&mut self, cand: &Candidate) -> Result<Sample> {
        let cfg = self.config(cand)?;
        for _ in 0..self.opts.warmup {
            self.run_once(&cfg)?;
        }
        let mut times = Vec::with_capacity(self.opts.reps);
        for _ in 0..self.opts.reps {
            times.push(self.run_once(&cfg)?);
        }
        Sample::from_times(&times)
            .ok_or_else(|| RuntimeError::Invalid("no timed repetitions".into()))
    }
}

/// Max |out - ref| / max |ref| over the sampled `rows` (the reference holds
/// only those rows); NaN anywhere gives NaN, so a broken kernel never wins.
fn rows_error(out: &Tensor<f64>, reference: &Tensor<f64>, rows: &[usize]) -> f64 {
    let [batch, seq, heads, dv] = out.shape[..] else {
        return f64::NAN;
    };
    let width = heads * dv;
    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for b in 0..batch {
        for (ri, &row) in rows.iter().enumerate() {
            let got = &out.data[(b * seq + row) * width..][..width];
            let want = &reference.data[(b * rows.len() + ri) * width..][..width];
            for (g, w) in got.iter().zip(want) {
                // NaN propagates through max(), so compare explicitly.
                let e = (g - w).abs();
                if e.is_nan() {
                    return f64::NAN;
                }
                max_err = max_err.max(e);
                max_ref = max_ref.max(w.abs());
            }
        }
    }
    if max_ref > 0.0 {
        max_err / max_ref
    } else {
        max_err
    }
}

/// Times kernel configurations on GPU 0 with CUDA events
/// ([`crate::cuda::time_config`]): warm-up, then `reps` launches cycling
/// through several input sets uploaded once, so no repetition finds the
/// previous one's data in L2. Each candidate first runs once through the
/// full launcher ([`crate::cuda::run`]) and is compared with the
/// f64 reference on sampled rows.
pub struct CudaTimer {
    spec: MixerSpec,
    dtype: mixc_dsl::ir::DType,
    inputs: Vec<MixerInputs>,
    rows: Vec<usize>,
    reference: Tensor<f64>,
    opts: CpuTimerOptions,
}

impl CudaTimer {
    pub fn new(
        spec: &MixerSpec,
        dtype: mixc_dsl::ir::DType,
        batch: usize,
        seq: usize,
        opts: CpuTimerOptions,
    ) -> Result<Self> {
        if batch == 0 || seq == 0 || opts.reps == 0 {
            return Err(RuntimeError::Invalid(
                "tuning needs batch, seq and reps of at least 1".into(),
            ));
        }
        // GPU memory is larger than L2 by far: a few sets suffice to defeat it.
        let sets = opts.rotations.max(2);
        let mut inputs = Vec::with_capacity(sets);
        for r in 0..sets {
            let mut i = random_inputs(spec, batch, seq, opts.seed.wrapping_add(r as u64));
            crate::inputs::round_to_dtype(&mut i, dtype)?;
            inputs.push(i);
        }
        let rows = sample_rows(seq, opts.check_rows);
        let reference = reference::evaluate_rows(spec, &inputs[0], &rows)?;
        Ok(CudaTimer {
            spec: spec.clone(),
            dtype,
            inputs,
            rows,
            reference,
            opts,
        })
    }

    fn config<'a>(&self, cand: &'a Candidate) -> Result<&'a mixc_codegen::KernelConfig> {
        match &cand.config {
            TunedConfig::Cuda(c) => Ok(c),
            TunedConfig::Cpu(_) => Err(RuntimeError::Invalid(format!(
                "candidate `{}` is a CPU configuration; the CUDA timer runs kernel ones",
                cand.label
            ))),
        }
    }
}

impl Timer for CudaTimer {
    fn check(&mut self, cand: &Candidate) -> Result<f64> {
        let mut opts = crate::cuda::CudaOptions::default_for(&self.spec);
        opts.dtype = self.dtype;
        opts.config = Some(*self.config(cand)?);
        let out = crate::cuda::run(&self.spec, &self.inputs[0], &opts)?.output;
        let out = Tensor::new(out.shape, out.data.iter().map(|&x| x as f64).collect());
        Ok(rows_error(&out, &self.reference, &self.rows))
    }

    fn time(&mut self, cand: &Candidate) -> Result<Sample> {
        let cfg = *self.config(cand)?;
        let secs = crate::cuda::time_config(
            &self.spec,
            &self.inputs,
            self.dtype,
            &cfg,
            self.opts.warmup.max(1),
            self.opts.reps,
        )?;
        let times: Vec<Duration> = secs.iter().map(|&s| Duration::from_secs_f64(s)).collect();
        Sample::from_times(&times)
            .ok_or_else(|| RuntimeError::Invalid("no timed repetitions".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_both_ends() {
        assert_eq!(sample_rows(100, 5), vec![0, 24, 49, 74, 99]);
        assert_eq!(sample_rows(3, 8), vec![0, 1, 2]);
        assert_eq!(sample_rows(1, 8), vec![0]);
    }

    #[test]
    fn median_is_a_measured_value() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&x| Duration::from_millis(x))
                .collect::<Vec<_>>()
        };
        let s = Sample::from_times(&ms(&[5, 1, 3, 9])).unwrap();
        assert_eq!(
            (s.median_ns, s.min_ns, s.max_ns, s.reps),
            (3_000_000, 1_000_000, 9_000_000, 4)
        );
        assert_eq!(Sample::from_times(&ms(&[7])).unwrap().median_ns, 7_000_000);
        assert!(Sample::from_times(&[]).is_none());
    }
}
