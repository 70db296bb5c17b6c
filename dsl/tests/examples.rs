//! Every example spec parses and validates, and the IR says what the file says.

use mixc_dsl::*;
use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn example(name: &str) -> MixerSpec {
    let path = examples_dir().join(format!("{name}.mix"));
    parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_example_parses() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "mix") {
            let spec = parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // The mixer is named after its file.
            assert_eq!(spec.name, path.file_stem().unwrap().to_str().unwrap());
            // Validation invariants every consumer relies on.
            assert!(spec.heads >= 1 && spec.heads.is_multiple_of(spec.kv_heads));
            assert!((1..=MAX_HEAD_DIM as u32).contains(&spec.head_dim));
            if spec.decay != Decay::None {
                assert!(spec.mask.implies_causal(), "{}", spec.name);
            }
            names.push(spec.name);
        }
    }
    assert_eq!(names.len(), 15, "{names:?}");
}

#[test]
fn llama4_chunked_is_causal_and_a_condition() {
    let s = example("chunked_llama4");
    // `j <= i` is lifted to the built-in `causal`, the rest stays a condition.
    assert!(
        matches!(&s.mask, Mask::And(a, b) if **a == Mask::Causal && matches!(**b, Mask::Expr(_)))
    );
    assert_eq!(s.mask.to_string(), "causal && div(i, 8192) == div(j, 8192)");
    assert!(s.mask.implies_causal());
    assert_eq!((s.heads, s.kv_heads, s.head_dim), (40, 8, 128));
}

#[test]
fn llama3_gqa() {
    let s = example("causal_gqa_llama3");
    assert_eq!(
        (s.heads, s.kv_heads, s.head_dim, s.value_dim),
        (32, 8, 128, 128)
    );
    assert_eq!(s.group_size(), 4);
    assert_eq!(s.dtype, DType::Bf16);
    assert_eq!(s.mask, Mask::Causal);
    assert_eq!(s.family, Family::Softmax);
    // Default scale under softmax is 1/sqrt(head_dim).
    match s.score {
        Score::Dot {
            q_map,
            k_map,
            scale,
        } => {
            assert_eq!((q_map, k_map), (FeatureMap::Identity, FeatureMap::Identity));
            assert_eq!(scale, 1.0 / 128f64.sqrt());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn mistral_window_mask() {
    let s = example("sliding_window_mistral");
    assert_eq!(
        s.mask,
        Mask::And(
            Box::new(Mask::Causal),
            Box::new(Mask::Window { size: 4096 })
        )
    );
    assert!(s.mask.implies_causal());
}

#[test]
fn gemma2_softcap_transform() {
    let s = example("softcap_window_gemma2");
    let t = s.transform.as_ref().expect("transform");
    assert!(t.uses_var(Var::S));
    let lookup = |_: &str, _: &[i64]| 0.0;
    let at = |score: f64| {
        t.eval_f64(&EvalEnv {
            i: 0,
            j: 0,
            h: 0,
            s: score,
            b: 0,
            seq: 0,
            kv_seq: 0,
            heads: s.heads,
            lookup: &lookup,
        })
    };
    // 50 * tanh(s / 50): odd, near identity at 0, saturates at +-50.
    assert!((at(1.0) - 50.0 * (1.0f64 / 50.0).tanh()).abs() < 1e-12);
    assert!((at(1e6) - 50.0).abs() < 1e-9);
    assert_eq!(at(-3.0), -at(3.0));
    assert_eq!(s.head_dim, 256);
}

#[test]
fn mamba2_gate_decay() {
    let s = example("gated_mamba2");
    assert_eq!(s.decay, Decay::Gate { input: "g".into() });
    assert_eq!(s.family, Family::Gated);
    assert_eq!(s.norm, Norm::None);
    assert_eq!(
        s.inputs,
        vec![InputDecl {
            name: "g".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Batch, Dim::Seq, Dim::Heads],
            role: InputRole::Gate,
        }]
    );
    assert!(matches!(s.score, Score::Dot { scale, .. } if scale == 1.0));
}

#[test]
fn retnet_per_head_decay() {
    let s = example("retention_retnet");
    assert_eq!(s.family, Family::Retention);
    assert_eq!((s.head_dim, s.value_dim), (64, 128));
    let Decay::PerHead(g) = &s.decay else {
        panic!("{:?}", s.decay)
    };
    let lookup = |_: &str, _: &[i64]| 0.0;
    for h in 0..8 {
        let env = EvalEnv {
            i: 0,
            j: 0,
            h,
            s: 0.0,
            b: 0,
            seq: 0,
            kv_seq: 0,
            heads: 8,
            lookup: &lookup,
        };
        assert_eq!(g.eval_f64(&env), 1.0 - 2f64.powf(-5.0 - h as f64));
    }
    assert!(matches!(s.score, Score::Dot { scale, .. } if scale == 0.125));
}

#[test]
fn linear_elu_feature_maps() {
    let s = example("linear_elu");
    assert_eq!(s.family, Family::Linear);
    assert_eq!(s.norm, Norm::Sum { eps: 1e-6 });
    // Not softmax, so the default scale is 1.
    assert_eq!(
        s.score,
        Score::Dot {
            q_map: FeatureMap::Elu1,
            k_map: FeatureMap::Elu1,
            scale: 1.0
        }
    );
}

#[test]
fn hyena_convolution() {
    let s = example("long_conv_hyena");
    assert_eq!(s.family, Family::Convolution);
    assert_eq!(s.score, Score::Filter { input: "f".into() });
    assert_eq!(s.inputs[0].role, InputRole::Filter);
    assert_eq!(s.inputs[0].dims, vec![Dim::Heads, Dim::Seq]);
    // The convolution family reads no q or k.
    assert!(!s.tensor_shapes(2, 16).contains_key("q"));
}

#[test]
fn t5_relative_bias_table() {
    let s = example("relative_bias_t5");
    assert_eq!(s.inputs[0].role, InputRole::Table);
    assert_eq!(s.inputs[0].dims, vec![Dim::Heads, Dim::Fixed(128)]);
    let bias = s.bias.as_ref().unwrap();
    // rel[h][min(abs(i - j), 127)]: the lookup sees the clamped distance.
    let seen = std::cell::RefCell::new(Vec::new());
    let lookup = |name: &str, idx: &[i64]| {
        seen.borrow_mut().push((name.to_string(), idx.to_vec()));
        7.5
    };
    let env = EvalEnv {
        i: 3,
        j: 500,
        h: 2,
        s: 0.0,
        b: 0,
        seq: 0,
        kv_seq: 0,
        heads: 8,
        lookup: &lookup,
    };
    assert_eq!(bias.eval_f64(&env), 7.5);
    assert_eq!(seen.into_inner(), vec![("rel".to_string(), vec![2, 127])]);
}

#[test]
fn alibi_bias() {
    let s = example("alibi_bloom");
    let bias = s.bias.as_ref().unwrap();
    let lookup = |_: &str, _: &[i64]| 0.0;
    let env = EvalEnv {
        i: 10,
        j: 4,
        h: 0,
        s: 0.0,
        b: 0,
        seq: 0,
        kv_seq: 0,
        heads: 16,
        lookup: &lookup,
    };
    // -slope(0) * 6 with slope(0) = 2^(-8/16).
    assert!((bias.eval_f64(&env) + 2f64.powf(-0.5) * 6.0).abs() < 1e-12);
}

#[test]
fn masks_of_other_examples() {
    assert_eq!(example("full_attention").mask, Mask::All);
    assert_eq!(example("prefix_lm").mask, Mask::PrefixLm { prefix: 512 });
    assert_eq!(
        example("block_sparse_bigbird").mask,
        Mask::BlockSparse {
            block: 64,
            local: 2,
            global: 1
        }
    );
    assert_eq!(
        example("dilated_longnet").mask,
        Mask::And(
            Box::new(Mask::Causal),
            Box::new(Mask::Or(
                Box::new(Mask::Window { size: 512 }),
                Box::new(Mask::Dilated { rate: 8 })
            ))
        )
    );
    let doc = example("document_mask");
    assert_eq!(
        doc.mask,
        Mask::And(
            Box::new(Mask::Causal),
            Box::new(Mask::Segment {
                input: "doc".into()
            })
        )
    );
    assert_eq!(doc.inputs[0].role, InputRole::SegmentIds);
    assert_eq!(doc.inputs[0].elem, ElemType::I32);
}

#[test]
fn families_of_all_examples() {
    let fam = |n: &str| example(n).family;
    assert_eq!(fam("full_attention"), Family::Softmax);
    assert_eq!(fam("alibi_bloom"), Family::Softmax);
    assert_eq!(fam("linear_elu"), Family::Linear);
    assert_eq!(fam("retention_retnet"), Family::Retention);
    assert_eq!(fam("gated_mamba2"), Family::Gated);
    assert_eq!(fam("long_conv_hyena"), Family::Convolution);
}

#[test]
fn defaults_apply() {
    let s = parse_str("mixer d { heads = 4; head_dim = 32; }").unwrap();
    assert_eq!((s.kv_heads, s.value_dim, s.dtype), (4, 32, DType::Bf16));
    assert_eq!(
        (s.mask.clone(), s.norm, s.decay.clone()),
        (Mask::All, Norm::Softmax, Decay::None)
    );
    assert_eq!(
        s.score,
        Score::Dot {
            q_map: FeatureMap::Identity,
            k_map: FeatureMap::Identity,
            scale: 1.0 / 32f64.sqrt()
        }
    );
    assert_eq!(
        parse_str("mixer d { heads = 4; head_dim = 32; norm = sum; }")
            .unwrap()
            .norm,
        Norm::Sum { eps: 1e-6 }
    );
}

#[test]
fn doc_comments_and_constant_scale() {
    let s = parse_str(
        "/// A documented mixer.\n#[allow(anything)]\nmixer m { heads = 2; head_dim = 128; scale = 1.0 / sqrt(128.0); /* c */ }",
    )
    .unwrap();
    assert!(matches!(s.score, Score::Dot { scale, .. } if scale == 1.0 / 128f64.sqrt()));
}
