//! The transformer block around a mixer (the Blockwise Parallel
//! Transformer's unit of work): the typed IR a `block NAME { ... }` item
//! checks into, and the names and layouts of its weights.
//!
//! A block is pre-norm, with two residuals:
//!
//! ```text
//! h   = norm1(x)                                  x: [batch, seq, width]
//! q   = rope(h Wqᵀ),  k = rope(h Wkᵀ),  v = h Wvᵀ  (heads of the mixer)
//! y   = x + mixer(q, k, v) Woᵀ
//! out = y + ffn(norm2(y))
//! ffn(z) = (silu(z Wgᵀ) * (z Wuᵀ)) Wdᵀ           swiglu(hidden)
//! ffn(z) = gelu(z Wuᵀ) Wdᵀ                        gelu(hidden), tanh form
//! ```
//!
//! Projections have no bias. Weights use the layouts of Hugging Face
//! Llama checkpoints (`[out_features, in_features]`, row-major) and the
//! names of one decoder layer without its `model.layers.N.` prefix
//! ([`BlockSpec::weight_shapes`]). With `H` = heads, `KV` = kv_heads,
//! `Dk` = head_dim, `Dv` = value_dim (of the mixer), `W` = width and
//! `F` = the FFN hidden width:
//!
//! ```text
//! input_layernorm.weight            [W]
//! input_layernorm.bias              [W]        layernorm only
//! self_attn.q_proj.weight           [H * Dk, W]
//! self_attn.k_proj.weight           [KV * Dk, W]
//! self_attn.v_proj.weight           [KV * Dv, W]
//! self_attn.o_proj.weight           [W, H * Dv]
//! post_attention_layernorm.weight   [W]
//! post_attention_layernorm.bias     [W]        layernorm only
//! mlp.gate_proj.weight              [F, W]     swiglu only
//! mlp.up_proj.weight                [F, W]
//! mlp.down_proj.weight              [W, F]
//! ```
//!
//! The `block NAME { ... }` item that produces a [`BlockSpec`] is
//! documented in `docs/language.md` ("Transformer blocks").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ir::MixerSpec;

/// A validated `block` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockSpec {
    pub name: String,
    /// The model width `d_model`: x and the output are `[batch, seq, width]`.
    pub width: u32,
    /// The mixer the block wraps (its heads, head dims, mask, family).
    pub mixer: MixerSpec,
    /// Both norms (before the mixer and before the FFN) are of this kind.
    pub norm: BlockNorm,
    pub ffn: Ffn,
    /// Rotary position embedding on q and k (`None`: no position embedding
    /// besides what the mixer's own mask and bias say).
    pub rope: Option<Rope>,
}

/// The normalisation before the mixer and before the FFN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlockNorm {
    pub kind: NormKind,
    /// Added to the variance (or mean square) before the square root.
    pub eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) * g`.
    RmsNorm,
    /// `(x - mean) / sqrt(var + eps) * g + b`.
    LayerNorm,
}

/// The feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ffn {
    pub kind: FfnKind,
    /// Its hidden width `d_ff`.
    pub hidden: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnKind {
    /// `down(silu(gate(z)) * up(z))` (Llama).
    SwiGlu,
    /// `down(gelu(up(z)))`, gelu in its tanh form (GPT-2).
    Gelu,
}

/// Rotary position embedding, "rotate half" convention (Hugging Face
/// Llama): dims `i` and `i + head_dim/2` of each head rotate together by
/// `pos * base^(-2i/head_dim)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub base: f64,
}

impl NormKind {
    pub fn name(self) -> &'static str {
        match self {
            NormKind::RmsNorm => "rmsnorm",
            NormKind::LayerNorm => "layernorm",
        }
    }
}

impl FfnKind {
    pub fn name(self) -> &'static str {
        match self {
            FfnKind::SwiGlu => "swiglu",
            FfnKind::Gelu => "gelu",
        }
    }
}

/// Weight names of a block (one Llama decoder layer's, without the layer
/// prefix).
pub mod weight {
    pub const NORM1: &str = "input_layernorm.weight";
    pub const NORM1_BIAS: &str = "input_layernorm.bias";
    pub const WQ: &str = "self_attn.q_proj.weight";
    pub const WK: &str = "self_attn.k_proj.weight";
    pub const WV: &str = "self_attn.v_proj.weight";
    pub const WO: &str = "self_attn.o_proj.weight";
    pub const NORM2: &str = "post_attention_layernorm.weight";
    pub const NORM2_BIAS: &str = "post_attention_layernorm.bias";
    pub const GATE: &str = "mlp.gate_proj.weight";
    pub const UP: &str = "mlp.up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";
}

impl BlockSpec {
    /// Every weight the block reads, by name, with its shape: norm gains
    /// (and biases for layernorm) `[width]`, projections `[out, in]`:
    /// q `[heads * head_dim, width]`, k `[kv_heads * head_dim, width]`,
    /// v `[kv_heads * value_dim, width]`, o `[width, heads * value_dim]`,
    /// gate and up `[hidden, width]`, down `[width, hidden]`.
    pub fn weight_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let m = &self.mixer;
        let w = self.width as usize;
        let f = self.ffn.hidden as usize;
        let (h, kvh) = (m.heads as usize, m.kv_heads as usize);
        let (dk, dv) = (m.head_dim as usize, m.value_dim as usize);
        let mut s = BTreeMap::new();
        let mut put = |name: &str, shape: Vec<usize>| {
            s.insert(name.to_string(), shape);
        };
        put(weight::NORM1, vec![w]);
        put(weight::NORM2, vec![w]);
        if self.norm.kind == NormKind::LayerNorm {
            put(weight::NORM1_BIAS, vec![w]);
            put(weight::NORM2_BIAS, vec![w]);
        }
        put(weight::WQ, vec![h * dk, w]);
        put(weight::WK, vec![kvh * dk, w]);
        put(weight::WV, vec![kvh * dv, w]);
        put(weight::WO, vec![w, h * dv]);
        if self.ffn.kind == FfnKind::SwiGlu {
            put(weight::GATE, vec![f, w]);
        }
        put(weight::UP, vec![f, w]);
        put(weight::DOWN, vec![w, f]);
        s
    }

    /// Parameters (weight elements) of the block.
    pub fn parameter_count(&self) -> usize {
        self.weight_shapes()
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Stable JSON of the spec (for cache keys).
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("BlockSpec serialises")
    }

    /// One line describing the block (`width 512, rmsnorm, swiglu(1408),
    /// rope 10000, mixer attn`).
    pub fn summary(&self) -> String {
        let rope = match self.rope {
            Some(r) => format!(", rope {}", r.base),
            None => String::new(),
        };
        format!(
            "width {}, {}, {}({}){rope}, mixer `{}` ({} heads, {} kv heads, head_dim {})",
            self.width,
            self.norm.kind.name(),
            self.ffn.kind.name(),
            self.ffn.hidden,
            self.mixer.name,
            self.mixer.heads,
            self.mixer.kv_heads,
            self.mixer.head_dim
        )
    }
}
