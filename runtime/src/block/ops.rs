//! The block's row operations and their gradients, written once over the
//! scalar type: the f64 reference and the f32 blockwise CPU path call the
//! same formulas (norms, rotary embedding, activations), so the two differ
//! only where they should: blocking, GEMMs and the mixer. The gradients are
//! checked against finite differences of the forward (tests/block.rs).

use mixc_dsl::{BlockNorm, FfnKind, NormKind};

use crate::cpu::real::Real;

/// A norm's parameters for one call.
pub(crate) struct NormParams<'a, T> {
    pub kind: NormKind,
    pub eps: T,
    pub gain: &'a [T],
    /// Layernorm only.
    pub bias: Option<&'a [T]>,
}

impl<'a, T: Real> NormParams<'a, T> {
    pub fn new(norm: &BlockNorm, gain: &'a [T], bias: Option<&'a [T]>) -> Self {
        NormParams {
            kind: norm.kind,
            eps: T::from_f64(norm.eps),
            gain,
            bias,
        }
    }

    /// `(mean, 1/sqrt(var + eps))` of a row (mean 0 for rmsnorm, whose
    /// "variance" is the mean square).
    fn stats(&self, x: &[T]) -> (T, T) {
        let n = T::from_f64(x.len() as f64);
        let mean = match self.kind {
            NormKind::RmsNorm => T::ZERO,
            NormKind::LayerNorm => x.iter().copied().sum::<T>() / n,
        };
        let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
        (mean, T::ONE / (var + self.eps).sqrt())
    }

    /// `out = norm(x)`.
    pub fn forward(&self, x: &[T], out: &mut [T]) {
        let (mean, r) = self.stats(x);
        for (e, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            *o = (v - mean) * r * self.gain[e];
            if let Some(b) = self.bias {
                *o += b[e];
            }
        }
    }

    /// `dx += dnorm/dx^T dout`, `dgain += dout * xhat`, `dbias += dout`.
    pub fn backward(
        &self,
        x: &[T],
        dout: &[T],
        dx: &mut [T],
        dgain: &mut [T],
        dbias: Option<&mut [T]>,
    ) {
        let (mean, r) = self.stats(x);
        let n = T::from_f64(x.len() as f64);
        let (mut sum_g, mut sum_gx) = (T::ZERO, T::ZERO);
        for e in 0..x.len() {
            let xhat = (x[e] - mean) * r;
            let g = dout[e] * self.gain[e];
            dgain[e] += dout[e] * xhat;
            sum_g += g;
            sum_gx += g * xhat;
        }
        if let Some(db) = dbias {
            for (d, &g) in db.iter_mut().zip(dout) {
                *d += g;
            }
        }
        let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
        for e in 0..x.len() {
            let xhat = (x[e] - mean) * r;
            let g = dout[e] * self.gain[e];
            let centred = match self.kind {
                NormKind::RmsNorm => g - xhat * mean_gx,
                NormKind::LayerNorm => g - mean_g - xhat * mean_gx,
            };
            dx[e] += r * centred;
        }
    }
}

/// The rotary embedding's angles for one position: `cos` and `sin` of
/// `pos * base^(-2i/head_dim)` for `i < head_dim / 2` (computed in f64).
pub(crate) fn rope_angles<T: Real>(base: f64, head_dim: usize, pos: usize, cs: &mut Vec<(T, T)>) {
    let half = head_dim / 2;
    cs.clear();
    cs.extend((0..half).map(|i| {
        let theta = base.powf(-2.0 * i as f64 / head_dim as f64);
        let a = pos as f64 * theta;
        (T::from_f64(a.cos()), T::from_f64(a.sin()))
    }));
}

/// Rotates every head of a row (`heads * head_dim` values) in place by the
/// angles of [`rope_angles`]: forward, or with `inverse` by the opposite
/// angles (the transpose, which is the gradient's map).
pub(crate) fn rope_row<T: Real>(row: &mut [T], head_dim: usize, cs: &[(T, T)], inverse: bool) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs) {
            let s = if inverse { T::ZERO - s } else { s };
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x2 * c + x1 * s;
        }
    }
}

/// `sqrt(2 / pi)` and the cubic coefficient of gelu's tanh form.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044_715;

fn sigmoid<T: Real>(u: T) -> T {
    T::ONE / (T::ONE + (T::ZERO - u).exp_expr())
}

/// The FFN's activation on its pre-activations: swiglu `a = silu(u) * w`
/// (`w` the up projection), gelu `a = gelu(u)` (`w` unused, may be empty).
pub(crate) fn activate<T: Real>(kind: FfnKind, u: &[T], w: &[T], a: &mut [T]) {
    match kind {
        FfnKind::SwiGlu => {
            for ((a, &u), &w) in a.iter_mut().zip(u).zip(w) {
                *a = u * sigmoid(u) * w;
            }
        }
        FfnKind::Gelu => {
            let (c, k) = (T::from_f64(GELU_C), T::from_f64(GELU_A));
            let half = T::from_f64(0.5);
            for (a, &u) in a.iter_mut().zip(u) {
                let t = (c * (u + k * u * u * u)).tanh_expr();
                *a = half * u * (T::ONE + t);
            }
        }
    }
}

/// The activation's gradient: from `da` to `du` (and `dw` for swiglu),
/// overwriting them.
pub(crate) fn activate_backward<T: Real>(
    kind: FfnKind,
    u: &[T],
    w: &[T],
    da: &[T],
    du: &mut [T],
    dw: &mut [T],
) {
    match kind {
        FfnKind::SwiGlu => {
            for e in 0..u.len() {
                let s = sigmoid(u[e]);
                let silu = u[e] * s;
                dw[e] = da[e] * silu;
                du[e] = da[e] * w[e] * s * (T::ONE + u[e] * (T::ONE - s));
            }
        }
        FfnKind::Gelu => {
            let (c, k) = (T::from_f64(GELU_C), T::from_f64(GELU_A));
            let (half, three) = (T::from_f64(0.5), T::from_f64(3.0));
            for e in 0..u.len() {
                let x = u[e];
                let t = (c * (x + k * x * x * x)).tanh_expr();
                let dt = (T::ONE - t * t) * c * (T::ONE + three * k * x * x);
                du[e] = da[e] * (half * (T::ONE + t) + half * x * dt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward formulas on numbers worked by hand.
    #[test]
    fn forwards_match_closed_forms() {
        let x = [1.0f64, -2.0, 3.0, 0.0];
        let g = [1.0f64, 2.0, 0.5, 1.0];
        let mut out = [0.0; 4];
        let rms = BlockNorm {
            kind: NormKind::RmsNorm,
            eps: 0.0,
        };
        NormParams::new(&rms, &g, None).forward(&x, &mut out);
        let r = (14.0f64 / 4.0).sqrt();
        for e in 0..4 {
            assert!((out[e] - x[e] / r * g[e]).abs() < 1e-12);
        }
        let ln = BlockNorm {
            kind: NormKind::LayerNorm,
            eps: 0.0,
        };
        let b = [0.5f64; 4];
        NormParams::new(&ln, &g, Some(&b)).forward(&x, &mut out);
        // mean 0.5, variance (0.25 + 6.25 + 6.25 + 0.25) / 4 = 3.25
        for e in 0..4 {
            let want = (x[e] - 0.5) / 3.25f64.sqrt() * g[e] + 0.5;
            assert!((out[e] - want).abs() < 1e-12);
        }
        // rope at position 1, head_dim 4, base 100: angles 1 and 1/10.
        let mut cs = Vec::new();
        rope_angles::<f64>(100.0, 4, 1, &mut cs);
        let mut row = [1.0f64, 0.0, 0.0, 1.0];
        rope_row(&mut row, 4, &cs, false);
        let want = [1f64.cos(), -(0.1f64.sin()), 1f64.sin(), 0.1f64.cos()];
        for e in 0..4 {
            assert!((row[e] - want[e]).abs() < 1e-12, "{row:?} vs {want:?}");
        }
        rope_row(&mut row, 4, &cs, true);
        assert!((row[0] - 1.0).abs() < 1e-12 && (row[3] - 1.0).abs() < 1e-12);
        // gelu(1) in its tanh form, silu(2) * 3.
        let mut a = [0.0f64];
        activate(FfnKind::Gelu, &[1.0], &[], &mut a);
        let want = 0.5 * (1.0 + (GELU_C * (1.0 + GELU_A)).tanh());
        assert!((a[0] - want).abs() < 1e-12);
        activate(FfnKind::SwiGlu, &[2.0], &[3.0], &mut a);
        assert!((a[0] - 2.0 / (1.0 + (-2.0f64).exp()) * 3.0).abs() < 1e-12);
    }
}
