//! A spec written in `mixer!{}` equals the same spec read from its file:
//! one grammar, one validator, no spans in the IR.

use mixc_dsl::{parse_file, MixerSpec};
use mixc_macro::mixer;
use std::path::Path;

fn from_file(name: &str) -> MixerSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../examples/{name}.mix"));
    parse_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn llama3() {
    let spec = mixer! {
        // Llama-3: causal grouped-query attention, 32 query heads share 8 kv heads, d = 128.
        mixer causal_gqa_llama3 {
            heads = 32;
            kv_heads = 8;
            head_dim = 128;
            dtype = bf16;
            score = dot(q, k);
            mask = causal;
            norm = softmax;
        }
    };
    assert_eq!(spec, from_file("causal_gqa_llama3"));
}

#[test]
fn gemma2_softcap() {
    let spec = mixer! {
        mixer softcap_window_gemma2 {
            heads = 16;
            kv_heads = 8;
            head_dim = 256;
            dtype = bf16;
            score = dot(q, k);
            transform = 50.0 * tanh(s / 50.0);
            mask = causal && window(4096);
            norm = softmax;
        }
    };
    assert_eq!(spec, from_file("softcap_window_gemma2"));
}

#[test]
fn t5_relative_bias() {
    let spec = mixer! {
        /// T5-style encoder (doc comments are accepted and ignored).
        mixer relative_bias_t5 {
            heads = 8;
            head_dim = 64;
            dtype = bf16;
            input rel: f32[heads, 128];
            score = dot(q, k);
            bias = rel[h][min(abs(i - j), 127)];
            mask = all;
            norm = softmax;
        }
    };
    assert_eq!(spec, from_file("relative_bias_t5"));
}

#[test]
fn retnet_and_mamba2() {
    let retnet = mixer! {
        mixer retention_retnet {
            heads = 8;
            head_dim = 64;
            value_dim = 128;
            dtype = bf16;
            score = dot(q, k);
            scale = 0.125;
            decay = 1.0 - pow(2.0, -5.0 - h);
            mask = causal;
            norm = none;
        }
    };
    assert_eq!(retnet, from_file("retention_retnet"));
    let mamba = mixer! {
        mixer gated_mamba2 {
            heads = 8;
            head_dim = 64;
            value_dim = 64;
            dtype = bf16;
            input g: f32[batch, seq, heads];
            score = dot(q, k);
            scale = 1.0;
            decay = gate(g);
            mask = causal;
            norm = none;
        }
    };
    assert_eq!(mamba, from_file("gated_mamba2"));
}

#[test]
fn linear_and_alibi() {
    let linear = mixer! {
        mixer linear_elu {
            heads = 8;
            head_dim = 64;
            dtype = bf16;
            score = dot(elu1(q), elu1(k));
            mask = causal;
            norm = sum(eps = 1e-6);
        }
    };
    assert_eq!(linear, from_file("linear_elu"));
    let alibi = mixer! {
        mixer alibi_bloom {
            heads = 16;
            head_dim = 64;
            dtype = bf16;
            score = dot(q, k);
            bias = -alibi_slope(h) * (i - j);
            mask = causal;
            norm = softmax;
        }
    };
    assert_eq!(alibi, from_file("alibi_bloom"));
}

#[test]
fn macro_differs_when_the_spec_differs() {
    // Guards against an expansion that ignores its input.
    let a = mixer! { mixer m { heads = 4; head_dim = 32; mask = causal; } };
    let b = mixer! { mixer m { heads = 4; head_dim = 32; mask = causal && window(8); } };
    assert_ne!(a, b);
    assert_eq!(a.mask, mixc_dsl::Mask::Causal);
}

#[test]
fn compile_fail_cases() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/pass/*.rs");
}

/// Conditions, `if`, `select`, the new functions and variables, and
/// expression masks reach the macro's IR exactly as the text parser's.
#[test]
fn expression_masks_and_new_functions() {
    let spec = mixer! {
        mixer flex_like {
            heads = 4;
            head_dim = 16;
            input prefix: f32[batch];
            input rel: f32[heads, 16];
            bias = rel[h][min(div(abs(i - j), 4), 15)] - log(1.0 * kv_seq);
            transform = if s > 0.0 { sin(s) * cos(s) } else { sigmoid(s) + int(s * 2.0) };
            mask = (j <= i && i - j < 8 * (h + 1)) || j < int(prefix[b]) || !(j < seq - 2);
        }
    };
    let text = mixc_dsl::parse_str(
        "mixer flex_like { heads = 4; head_dim = 16; input prefix: f32[batch]; \
         input rel: f32[heads, 16]; \
         bias = rel[h][min(div(abs(i - j), 4), 15)] - log(1.0 * kv_seq); \
         transform = select(s > 0.0, sin(s) * cos(s), sigmoid(s) + int(s * 2.0)); \
         mask = (j <= i && i - j < 8 * (h + 1)) || j < int(prefix[b]) || !(j < seq - 2); }",
    )
    .unwrap();
    assert_eq!(spec, text);
}
