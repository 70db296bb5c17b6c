//! The backward pass's vocabulary, shared by every backend: what a backward
//! call returns ([`Gradients`]), which inputs have a gradient
//! ([`differentiable_inputs`]), the checks on an upstream gradient `do`
//! ([`validate_upstream`]). The comparison with the reference is
//! [`crate::check::compare_gradients`].
//!
//! Gradients of `L = sum(o * do)` are returned in the layouts of their
//! inputs: `dq [batch, seq, heads, head_dim]`, `dk [batch, seq, kv_heads,
//! head_dim]` (summed over the query heads of each kv group), `dv [batch,
//! seq, kv_heads, value_dim]`, and `d<name>` in the shape of each float extra
//! input (a table's gradient is the scatter-add of the pairs that read each
//! element, clamped indices included).

use std::collections::BTreeMap;

use mixc_dsl::{ElemType, MixerSpec, Score};

use crate::error::{Result, RuntimeError};
use crate::tensor::{MixerInputs, Tensor};

/// Gradients of `sum(o * do)` with respect to every differentiable input.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    /// Empty (`[0]`) for the convolution family, which reads no q.
    pub dq: Tensor<T>,
    /// Empty (`[0]`) for the convolution family, which reads no k.
    pub dk: Tensor<T>,
    pub dv: Tensor<T>,
    /// By input name (without the `d`), for each float extra input.
    pub extra: BTreeMap<String, Tensor<T>>,
}

impl<T> Gradients<T> {
    /// Every gradient under its file name: `dq`, `dk`, `dv`, `d<input>`
    /// (q and k omitted where the family reads none).
    pub fn named(&self) -> Vec<(String, &Tensor<T>)> {
        let mut out = Vec::new();
        for (name, t) in [("dq", &self.dq), ("dk", &self.dk), ("dv", &self.dv)] {
            if !t.data.is_empty() || t.shape.len() > 1 {
                out.push((name.to_string(), t));
            }
        }
        out.extend(self.extra.iter().map(|(n, t)| (format!("d{n}"), t)));
        out
    }
}

impl Gradients<f64> {
    /// Rounded to f32 (what the host API returns).
    pub fn to_f32(&self) -> Gradients<f32> {
        let conv = |t: &Tensor<f64>| {
            Tensor::new(t.shape.clone(), t.data.iter().map(|&x| x as f32).collect())
        };
        Gradients {
            dq: conv(&self.dq),
            dk: conv(&self.dk),
            dv: conv(&self.dv),
            extra: self
                .extra
                .iter()
                .map(|(n, t)| (n.clone(), conv(t)))
                .collect(),
        }
    }
}

/// The extra inputs that get a gradient: every float input (gates, filters,
/// tables read by `bias`, `transform` or a per-head decay). Integer inputs
/// (segment ids, integer tables) never do.
pub fn differentiable_inputs(spec: &MixerSpec) -> Vec<String> {
    spec.inputs
        .iter()
        .filter(|d| d.elem == ElemType::F32)
        .map(|d| d.name.clone())
        .collect()
}

/// Does the family read q and k (everything but convolution)?
pub(crate) fn reads_qk(spec: &MixerSpec) -> bool {
    matches!(spec.score, Score::Dot { .. })
}

/// Checks that `d_o` has the shape of the output, `[batch, seq, heads,
/// value_dim]`, and holds no NaN or infinity.
pub fn validate_upstream(spec: &MixerSpec, inputs: &MixerInputs, d_o: &Tensor<f32>) -> Result<()> {
    let want = [
        inputs.batch,
        inputs.seq,
        spec.heads as usize,
        spec.value_dim as usize,
    ];
    let bad = |problem: String| {
        Err(RuntimeError::BadInput {
            name: "do".into(),
            problem,
        })
    };
    if d_o.shape != want {
        return bad(format!(
            "the upstream gradient must have the output's shape [batch, seq, heads, value_dim] = {want:?}, got {:?}",
            d_o.shape
        ));
    }
    if let Some(p) = d_o.data.iter().position(|x| !x.is_finite()) {
        return bad(format!("element {p} is {} (must be finite)", d_o.data[p]));
    }
    Ok(())
}
