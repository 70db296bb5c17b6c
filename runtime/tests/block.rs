//! Transformer blocks (issue 20): the f64 reference's gradients against
//! finite differences of its forward, and the blockwise CPU block (forward
//! and gradients of x, every weight and the mixer's extra inputs) against
//! the reference at ragged lengths, ragged row blocks and ring ranks.

use mixc_dsl::{BlockNorm, BlockSpec, Ffn, FfnKind, NormKind, Rope};
use mixc_runtime::block::{
    random_block_inputs, random_block_upstream, reference, Block, BlockInputs, BlockWeights,
};
use mixc_runtime::{Device, Options, Tensor};

fn block(
    mixer: &str,
    width: u32,
    norm: NormKind,
    ffn: FfnKind,
    hidden: u32,
    rope: bool,
) -> BlockSpec {
    BlockSpec {
        name: "b".into(),
        width,
        mixer: mixc_dsl::parse_str(mixer).unwrap(),
        norm: BlockNorm {
            kind: norm,
            eps: 1e-5,
        },
        ffn: Ffn { kind: ffn, hidden },
        rope: rope.then_some(Rope { base: 100.0 }),
    }
}

const GQA: &str = "mixer m { heads = 4; kv_heads = 2; head_dim = 8; mask = causal; }";
const MHA_FULL: &str = "mixer m { heads = 2; head_dim = 6; value_dim = 4; }";
const WINDOW: &str =
    "mixer m { heads = 2; kv_heads = 1; head_dim = 8; mask = causal && window(9); }";
const LINEAR: &str =
    "mixer m { heads = 2; head_dim = 8; score = dot(elu1(q), elu1(k)); mask = causal; norm = sum; }";
const ALIBI: &str = "mixer m { heads = 2; head_dim = 8; input slopes: f32[heads]; \
                     bias = -slopes[h] * (i - j); mask = causal; }";

/// The small blocks the tests run: each norm, each FFN, with and without
/// the rotary embedding, around mixers of several families.
fn cases() -> Vec<(&'static str, BlockSpec)> {
    use FfnKind::*;
    use NormKind::*;
    vec![
        ("llama-like", block(GQA, 12, RmsNorm, SwiGlu, 20, true)),
        ("gpt-like", block(MHA_FULL, 10, LayerNorm, Gelu, 24, false)),
        ("window", block(WINDOW, 8, RmsNorm, Gelu, 16, true)),
        ("linear", block(LINEAR, 8, LayerNorm, SwiGlu, 12, false)),
        ("alibi", block(ALIBI, 8, RmsNorm, SwiGlu, 12, false)),
    ]
}

fn loss(spec: &BlockSpec, x: &BlockInputs, w: &BlockWeights, g: &Tensor<f32>) -> f64 {
    let out = reference::forward(spec, x, w).unwrap();
    out.data
        .iter()
        .zip(&g.data)
        .map(|(o, g)| o * *g as f64)
        .sum()
}

/// `dL/dθ` by a Richardson-extrapolated central difference (error O(h^4)),
/// `perturb(t)` setting the element to its value plus `t`.
fn finite_difference(eval: &mut dyn FnMut(f32) -> f64, h: f32) -> f64 {
    let d1 = eval(h) - eval(-h);
    let d2 = eval(2.0 * h) - eval(-2.0 * h);
    (8.0 * d1 - d2) / (12.0 * h as f64)
}

/// Every element of dx and of each weight gradient (every 5th element of
/// the projections, all of the norms), and of the float extra inputs,
/// against finite differences of the reference forward.
#[test]
fn reference_gradients_match_finite_differences() {
    for (name, spec) in cases() {
        let (b, l) = (2, 5);
        let x = random_block_inputs(&spec, b, l, 3);
        let w = BlockWeights::random(&spec, 4);
        let g = random_block_upstream(&spec, b, l, 5);
        let grads = reference::gradients(&spec, &x, &w, &g).unwrap();
        // Small enough that elu's kink at 0 (the linear case's feature map)
        // rarely falls inside a stencil; large enough that the f32 rounding
        // of the perturbed inputs stays ~1e-5 of the step.
        let h = 1.0 / 128.0;
        let mut worst = 0.0f64;
        let mut check = |what: &str, e: usize, analytic: f64, fd: f64, scale: f64| {
            let err = (analytic - fd).abs() / scale.max(1.0);
            worst = worst.max(err);
            assert!(
                err < 5e-5,
                "{name}: d{what}[{e}]: analytic {analytic} vs finite difference {fd}"
            );
        };
        let scale_of = |t: &Tensor<f64>| t.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let sdx = scale_of(&grads.dx);
        for e in 0..x.x.numel() {
            let fd = finite_difference(
                &mut |t| {
                    let mut xp = x.clone();
                    xp.x.data[e] += t;
                    loss(&spec, &xp, &w, &g)
                },
                h,
            );
            check("x", e, grads.dx.data[e], fd, sdx);
        }
        for (wname, gt) in &grads.weights {
            let stride = if gt.shape.len() == 2 { 5 } else { 1 };
            let s = scale_of(gt);
            for e in (0..gt.numel()).step_by(stride) {
                let fd = finite_difference(
                    &mut |t| {
                        let mut wp = w.clone();
                        wp.tensors.get_mut(wname).unwrap().data[e] += t;
                        loss(&spec, &x, &wp, &g)
                    },
                    h,
                );
                check(wname, e, gt.data[e], fd, s);
            }
        }
        for (ename, gt) in &grads.extra {
            let s = scale_of(gt);
            for e in 0..gt.numel() {
                let fd = finite_difference(
                    &mut |t| {
                        let mut xp = x.clone();
                        match xp.extra.get_mut(ename).unwrap() {
                            mixc_runtime::ExtraTensor::F32(t32) => t32.data[e] += t,
                            mixc_runtime::ExtraTensor::I32(_) => unreachable!(),
                        }
                        loss(&spec, &xp, &w, &g)
                    },
                    h,
                );
                check(ename, e, gt.data[e], fd, s);
            }
        }
        assert_eq!(grads.weights.len(), spec.weight_shapes().len(), "{name}");
        eprintln!("{name}: worst relative gradient error {worst:.2e}");
    }
}

/// Largest |a - b| over the largest |b| (at least 0.01: a gradient that is
/// zero in exact arithmetic, as dk with a single key, is compared absolutely).
fn rel_err(a: &Tensor<f32>, b: &Tensor<f64>) -> f64 {
    assert_eq!(a.shape, b.shape);
    let scale = b.data.iter().fold(1e-2f64, |m, v| m.max(v.abs()));
    let err = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    err / scale
}

/// The blockwise CPU block equals the reference, forward and backward, at
/// ragged lengths with ragged row blocks (7 and 16 rows, and the default),
/// on rings of 1 and 3 ranks.
#[test]
fn cpu_block_matches_the_reference() {
    for (name, spec) in cases() {
        let w = BlockWeights::random(&spec, 11);
        for (b, l) in [(1, 1), (2, 37), (1, 130)] {
            let x = random_block_inputs(&spec, b, l, l as u64);
            let g = random_block_upstream(&spec, b, l, 7);
            let want = reference::forward(&spec, &x, &w).unwrap();
            let want_g = reference::gradients(&spec, &x, &w, &g).unwrap();
            for ranks in [1, 3] {
                if ranks > l {
                    continue;
                }
                for rows in [7, 16, mixc_runtime::block::DEFAULT_BLOCK_ROWS] {
                    let opts = Options::on(Device::Cpu).with_ranks(ranks);
                    let blk = Block::new(&spec, opts).unwrap().with_block_rows(rows);
                    let (out, res) = blk.forward_train(&x, &w).unwrap();
                    let at = format!("{name} b={b} L={l} R={ranks} rows={rows}");
                    let e = rel_err(&out.out, &want);
                    assert!(e < 1e-5, "{at}: forward error {e:.2e}");
                    let plain = blk.forward(&x, &w).unwrap();
                    assert_eq!(plain.out, out.out, "{at}: forward and forward_train differ");
                    let got = blk.backward(&x, &w, &res, &g).unwrap().grads;
                    for ((gn, gt), (wn, wt)) in got.named().into_iter().zip(want_g.named()) {
                        assert_eq!(gn, wn);
                        let e = rel_err(gt, wt);
                        assert!(e < 1e-4, "{at}: gradient of {gn}: error {e:.2e}");
                    }
                }
            }
        }
    }
}

/// The reference backend runs the unfused f64 block through the same
/// handle; the CUDA backend refuses blocks with a typed error.
#[test]
fn the_handle_runs_the_reference_and_refuses_what_it_cannot() {
    let (_, spec) = cases().remove(0);
    let w = BlockWeights::random(&spec, 1);
    let x = random_block_inputs(&spec, 1, 9, 2);
    let blk = Block::new(&spec, Options::on(Device::Reference)).unwrap();
    let (out, res) = blk.forward_train(&x, &w).unwrap();
    let want = reference::forward(&spec, &x, &w).unwrap();
    assert!(rel_err(&out.out, &want) < 1e-7);
    let g = random_block_upstream(&spec, 1, 9, 3);
    let got = blk.backward(&x, &w, &res, &g).unwrap().grads;
    let want_g = reference::gradients(&spec, &x, &w, &g).unwrap().to_f32();
    assert_eq!(got, want_g);
    if let Err(e) = Block::new(&spec, Options::on(Device::Cuda(0))) {
        assert!(
            matches!(
                e,
                mixc_runtime::RuntimeError::Unsupported { .. }
                    | mixc_runtime::RuntimeError::NoGpu { .. }
            ),
            "{e}"
        );
    }
}

/// Bad inputs are refused with errors naming the tensor, and nothing runs.
#[test]
fn bad_inputs_name_the_tensor() {
    let (_, spec) = cases().remove(0);
    let blk = Block::new(&spec, Options::on(Device::Cpu)).unwrap();
    let w = BlockWeights::random(&spec, 1);
    let x = random_block_inputs(&spec, 1, 9, 2);
    let err = |x: &BlockInputs, w: &BlockWeights| blk.forward(x, w).unwrap_err().to_string();

    let mut short = x.clone();
    short.x = Tensor::zeros(&[1, 9, 11]);
    assert!(err(&short, &w).contains("input `x`: expected [batch, seq, width] = [1, 9, 12]"));
    let mut nan = x.clone();
    nan.x.data[5] = f32::NAN;
    assert!(err(&nan, &w).contains("element 5 is NaN"));

    let mut missing = w.clone();
    missing.tensors.remove("mlp.up_proj.weight");
    assert!(err(&x, &missing).contains("`mlp.up_proj.weight`: missing"));
    let mut wrong = w.clone();
    wrong
        .tensors
        .insert("self_attn.q_proj.weight".into(), Tensor::zeros(&[12, 32]));
    assert!(err(&x, &wrong).contains("expected shape [32, 12], got [12, 32]"));
    let mut extra = w.clone();
    extra
        .tensors
        .insert("lm_head.weight".into(), Tensor::zeros(&[2]));
    let e = err(&x, &extra);
    assert!(
        e.contains("`lm_head.weight`: is not a weight of block"),
        "{e}"
    );

    let (_, res) = blk.forward_train(&x, &w).unwrap();
    let e = blk
        .backward(&x, &w, &res, &Tensor::zeros(&[1, 9, 3]))
        .unwrap_err();
    assert!(e.to_string().contains("upstream gradient"), "{e}");
    // Residuals of another block (other heads) are refused, not sliced.
    let (_, gpt) = cases().remove(1);
    let gpt_blk = Block::new(&gpt, Options::on(Device::Cpu)).unwrap();
    let gx = BlockInputs::new(Tensor::zeros(&[1, 9, 10]));
    let (_, gres) = gpt_blk
        .forward_train(&gx, &BlockWeights::random(&gpt, 1))
        .unwrap();
    let e = blk.backward(&x, &w, &gres, &random_block_upstream(&spec, 1, 9, 1));
    let e = e.unwrap_err().to_string();
    assert!(e.contains("not saved by a forward of block `b`"), "{e}");
    let other = random_block_inputs(&spec, 1, 10, 2);
    let e = blk.backward(&other, &w, &res, &random_block_upstream(&spec, 1, 10, 1));
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("saved by a forward of batch 1 x seq 9"));
}

/// Weights round-trip through safetensors, under a layer prefix too, and a
/// missing weight names the file and what the block reads.
#[test]
fn weights_round_trip_through_safetensors() {
    let (_, spec) = cases().remove(1);
    let w = BlockWeights::random(&spec, 9);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    w.save(&path).unwrap();
    assert_eq!(BlockWeights::load(&path, &spec, "").unwrap(), w);

    let prefixed: Vec<(String, &Tensor<f32>)> = w
        .tensors
        .iter()
        .map(|(n, t)| (format!("model.layers.3.{n}"), t))
        .collect();
    let p2 = dir.path().join("layer.safetensors");
    mixc_runtime::io::save_named(&p2, prefixed.iter().map(|(n, t)| (n.as_str(), *t))).unwrap();
    assert_eq!(
        BlockWeights::load(&p2, &spec, "model.layers.3.").unwrap(),
        w
    );
    let e = BlockWeights::load(&p2, &spec, "").unwrap_err().to_string();
    assert!(
        e.contains("missing from") && e.contains("input_layernorm.weight"),
        "{e}"
    );
}
