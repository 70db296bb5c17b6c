//! The f64 reference against independent formulations written here: dense
//! score matrices, recurrent state updates, direct convolution loops and a
//! brute-force mask matrix built from the definitions in `ir.rs`. Each family
//! is exercised on ragged lengths with batch 2.

use mixc_dsl::{
    BinOp, DType, Decay, Dim, ElemType, Expr, Family, FeatureMap, Func, InputDecl, InputRole, Mask,
    MixerSpec, Norm, Score, Var,
};
use mixc_runtime::inputs::{random_inputs, validate_inputs};
use mixc_runtime::reference::{evaluate, evaluate_rows, evaluate_with_lse};
use mixc_runtime::{ExtraTensor, MixerInputs, RuntimeError, Tensor};

const LENGTHS: [usize; 4] = [1, 7, 33, 100];
const BATCH: usize = 2;
const TOL: f64 = 1e-12;

// ---------------------------------------------------------------- helpers

fn base(name: &str, heads: u32, kv_heads: u32, dk: u32, dv: u32) -> MixerSpec {
    MixerSpec {
        name: name.into(),
        heads,
        kv_heads,
        head_dim: dk,
        value_dim: dv,
        dtype: DType::F32,
        inputs: vec![],
        score: Score::Dot {
            q_map: FeatureMap::Identity,
            k_map: FeatureMap::Identity,
            scale: 1.0 / (dk as f64).sqrt(),
        },
        bias: None,
        transform: None,
        mask: Mask::Causal,
        decay: Decay::None,
        norm: Norm::Softmax,
        family: Family::Softmax,
        default_scale: false,
    }
}

fn scale_of(spec: &MixerSpec) -> f64 {
    match spec.score {
        Score::Dot { scale, .. } => scale,
        Score::Filter { .. } => panic!("not a dot score"),
    }
}

fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}

/// Reads q/k/v as f64 at a full index.
fn at(t: &Tensor<f32>, idx: [usize; 4]) -> f64 {
    t.data[t.offset(&idx)] as f64
}

fn extra_f32<'a>(inputs: &'a MixerInputs, name: &str) -> &'a Tensor<f32> {
    match &inputs.extra[name] {
        ExtraTensor::F32(t) => t,
        ExtraTensor::I32(_) => panic!("{name} is not f32"),
    }
}

fn extra_i32<'a>(inputs: &'a MixerInputs, name: &str) -> &'a Tensor<i32> {
    match &inputs.extra[name] {
        ExtraTensor::I32(t) => t,
        ExtraTensor::F32(_) => panic!("{name} is not i32"),
    }
}

/// max |got - want| / max |want|: relative to the output's scale, so single
/// near-zero elements (cancellation) do not dominate.
fn assert_close(got: &Tensor<f64>, want: &[f64], what: &str) {
    assert_eq!(got.data.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    let err = got
        .data
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err / scale <= TOL,
        "{what}: relative error {:e} > {TOL:e} (max |ref| = {scale:e})",
        err / scale
    );
    assert!(
        got.data.iter().all(|x| x.is_finite()),
        "{what}: non-finite output"
    );
}

/// Dense softmax attention, the textbook way: materialise the full score
/// matrix for each (b, h), mask it, softmax each row, multiply by V.
/// Rows with no allowed key give 0. Output layout `[b, i, h, dv]`.
fn dense_softmax(
    spec: &MixerSpec,
    inp: &MixerInputs,
    score: &dyn Fn(usize, usize, usize, usize, f64) -> f64,
    allowed: &dyn Fn(usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let (l, h_n, dk, dv) = (
        inp.seq,
        spec.heads as usize,
        spec.head_dim as usize,
        spec.value_dim as usize,
    );
    let group = (spec.heads / spec.kv_heads) as usize;
    let scale = scale_of(spec);
    let mut out = vec![0.0; BATCH * l * h_n * dv];
    let mut lse = vec![f64::NEG_INFINITY; BATCH * l * h_n];
    for b in 0..inp.batch {
        for h in 0..h_n {
            let kvh = h / group;
            let mut s = vec![vec![f64::NEG_INFINITY; l]; l];
            for (i, row) in s.iter_mut().enumerate() {
                for (j, sij) in row.iter_mut().enumerate() {
                    if allowed(b, i, j) {
                        let dot: f64 = (0..dk)
                            .map(|d| at(&inp.q, [b, i, h, d]) * at(&inp.k, [b, j, kvh, d]))
                            .sum();
                        *sij = score(b, h, i, j, scale * dot);
                    }
                }
            }
            for (i, row) in s.iter().enumerate() {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let p: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = p.iter().sum();
                lse[(b * l + i) * h_n + h] = m + z.ln();
                for d in 0..dv {
                    let num: f64 = (0..l).map(|j| p[j] * at(&inp.v, [b, j, kvh, d])).sum();
                    out[((b * l + i) * h_n + h) * dv + d] = num / z;
                }
            }
        }
    }
    (out, lse)
}

fn seg_input(name: &str) -> InputDecl {
    InputDecl {
        name: name.into(),
        elem: ElemType::I32,
        dims: vec![Dim::Batch, Dim::Seq],
        role: InputRole::SegmentIds,
    }
}

// ---------------------------------------------------------------- softmax

#[test]
fn softmax_gqa_alibi_softcap_matches_dense_matrix() {
    let mut spec = base("alibi_softcap", 4, 2, 8, 6);
    // bias = -alibi_slope(h) * (i - j); transform = 20 * tanh(s / 20)
    spec.bias = Some(bin(
        BinOp::Mul,
        Expr::Unary(
            mixc_dsl::UnOp::Neg,
            Box::new(Expr::Call(Func::AlibiSlope, vec![Expr::Var(Var::H)])),
        ),
        bin(BinOp::Sub, Expr::Var(Var::I), Expr::Var(Var::J)),
    ));
    spec.transform = Some(bin(
        BinOp::Mul,
        Expr::Float(20.0),
        Expr::Call(
            Func::Tanh,
            vec![bin(BinOp::Div, Expr::Var(Var::S), Expr::Float(20.0))],
        ),
    ));
    for mask_causal in [true, false] {
        spec.mask = if mask_causal { Mask::Causal } else { Mask::All };
        for &l in &LENGTHS {
            let inp = random_inputs(&spec, BATCH, l, 11 + l as u64);
            // ALiBi slopes for 4 heads: 2^(-8 (h+1) / 4), written out here.
            let score = |_b, h: usize, i: usize, j: usize, s: f64| {
                let slope = 2f64.powf(-2.0 * (h as f64 + 1.0));
                let biased = s - slope * (i as f64 - j as f64);
                20.0 * (biased / 20.0).tanh()
            };
            let allowed = |_b, i: usize, j: usize| !mask_causal || j <= i;
            let (want, want_lse) = dense_softmax(&spec, &inp, &score, &allowed);
            let (got, lse) = evaluate_with_lse(&spec, &inp).unwrap();
            assert_eq!(got.shape, vec![BATCH, l, 4, 6]);
            assert_eq!(lse.shape, vec![BATCH, l, 4]);
            assert_close(&got, &want, &format!("softmax L={l} causal={mask_causal}"));
            assert_close(&lse, &want_lse, &format!("lse L={l}"));
            assert_eq!(evaluate(&spec, &inp).unwrap(), got);
        }
    }
}

#[test]
fn table_bias_reads_are_clamped() {
    // T5-style: bias = rel[h][min(abs(i - j), 5)] on a [heads, 4] table, so
    // index 4 and 5 clamp to the last entry 3.
    let mut spec = base("t5", 2, 2, 4, 4);
    spec.mask = Mask::All;
    spec.inputs = vec![InputDecl {
        name: "rel".into(),
        elem: ElemType::F32,
        dims: vec![Dim::Heads, Dim::Fixed(4)],
        role: InputRole::Table,
    }];
    spec.bias = Some(Expr::Index {
        input: "rel".into(),
        indices: vec![
            Expr::Var(Var::H),
            Expr::Call(
                Func::Min,
                vec![
                    Expr::Call(
                        Func::Abs,
                        vec![bin(BinOp::Sub, Expr::Var(Var::I), Expr::Var(Var::J))],
                    ),
                    Expr::Int(5),
                ],
            ),
        ],
    });
    for &l in &LENGTHS {
        let inp = random_inputs(&spec, BATCH, l, 5);
        let rel = extra_f32(&inp, "rel").clone();
        let score = |_b, h: usize, i: usize, j: usize, s: f64| {
            let lag = i.abs_diff(j).min(3);
            s + rel.data[h * 4 + lag] as f64
        };
        let (want, _) = dense_softmax(&spec, &inp, &score, &|_, _, _| true);
        assert_close(&evaluate(&spec, &inp).unwrap(), &want, &format!("t5 L={l}"));
    }
}

// ---------------------------------------------------------------- masks

/// The mask definitions of `ir.rs`, restated independently.
fn brute_mask(m: &Mask, i: usize, j: usize, seg: &dyn Fn(usize) -> i32) -> bool {
    match m {
        Mask::All => true,
        Mask::Causal => j <= i,
        Mask::Window { size } => i.abs_diff(j) < *size as usize,
        Mask::PrefixLm { prefix } => (j as u64) < *prefix || j <= i,
        Mask::Segment { .. } => seg(i) == seg(j),
        Mask::BlockSparse {
            block,
            local,
            global,
        } => {
            let (bi, bj) = (i as u64 / block, j as u64 / block);
            bi.abs_diff(bj) < *local || bj < *global || bi < *global
        }
        Mask::Dilated { rate } => (i.abs_diff(j) as u64).is_multiple_of(*rate),
        Mask::And(a, b) => brute_mask(a, i, j, seg) && brute_mask(b, i, j, seg),
        Mask::Or(a, b) => brute_mask(a, i, j, seg) || brute_mask(b, i, j, seg),
        Mask::Expr(_) => unreachable!("expression masks are tested in flex_parity.rs"),
    }
}

fn and(a: Mask, b: Mask) -> Mask {
    Mask::And(Box::new(a), Box::new(b))
}
fn or(a: Mask, b: Mask) -> Mask {
    Mask::Or(Box::new(a), Box::new(b))
}

fn all_masks() -> Vec<(&'static str, Mask)> {
    let doc = || Mask::Segment {
        input: "doc".into(),
    };
    vec![
        ("all", Mask::All),
        ("causal", Mask::Causal),
        ("window5", Mask::Window { size: 5 }),
        ("prefix6", Mask::PrefixLm { prefix: 6 }),
        ("segment", doc()),
        (
            "block_sparse",
            Mask::BlockSparse {
                block: 8,
                local: 2,
                global: 1,
            },
        ),
        ("dilated3", Mask::Dilated { rate: 3 }),
        (
            "causal&&window",
            and(Mask::Causal, Mask::Window { size: 4 }),
        ),
        ("causal&&segment", and(Mask::Causal, doc())),
        (
            "causal&&(window||dilated)",
            and(
                Mask::Causal,
                or(Mask::Window { size: 3 }, Mask::Dilated { rate: 5 }),
            ),
        ),
        ("segment||prefix", or(doc(), Mask::PrefixLm { prefix: 3 })),
        // Rows i >= 5 see no key at all: window needs |i - j| < 2, the block
        // layout needs j < 4.
        (
            "empty_rows",
            and(
                Mask::Window { size: 2 },
                Mask::BlockSparse {
                    block: 4,
                    local: 0,
                    global: 1,
                },
            ),
        ),
    ]
}

#[test]
fn every_mask_matches_brute_force_matrix() {
    for (what, mask) in all_masks() {
        let mut spec = base(what, 2, 1, 4, 3);
        spec.inputs = vec![seg_input("doc")];
        spec.mask = mask.clone();
        for &l in &LENGTHS {
            let mut inp = random_inputs(&spec, BATCH, l, 3);
            if what == "segment" && l > 1 {
                // Unsorted ids are still a valid segment mask.
                let ExtraTensor::I32(t) = inp.extra.get_mut("doc").unwrap() else {
                    unreachable!()
                };
                t.data
                    .iter_mut()
                    .enumerate()
                    .for_each(|(p, x)| *x = (p % 3) as i32);
            }
            let ids = extra_i32(&inp, "doc").clone();
            let allowed =
                |b: usize, i: usize, j: usize| brute_mask(&mask, i, j, &|p| ids.data[b * l + p]);
            let (want, _) = dense_softmax(&spec, &inp, &|_, _, _, _, s| s, &allowed);
            let got = evaluate(&spec, &inp).unwrap();
            assert_close(&got, &want, &format!("mask {what} L={l}"));
        }
    }
}

#[test]
fn rows_without_keys_output_exactly_zero_for_every_norm() {
    let mask = and(
        Mask::Window { size: 2 },
        Mask::BlockSparse {
            block: 4,
            local: 0,
            global: 1,
        },
    );
    for norm in [Norm::Softmax, Norm::Sum { eps: 1e-6 }, Norm::None] {
        let mut spec = base("empty", 2, 2, 4, 3);
        spec.mask = mask.clone();
        spec.norm = norm;
        let l = 33;
        let inp = random_inputs(&spec, BATCH, l, 9);
        let out = evaluate(&spec, &inp).unwrap();
        for b in 0..BATCH {
            for i in 0..l {
                let row = &out.data[out.offset(&[b, i, 0, 0])..][..2 * 3];
                if i >= 5 {
                    assert!(row.iter().all(|&x| x == 0.0), "{norm:?} row {i}: {row:?}");
                } else {
                    assert!(row.iter().any(|&x| x != 0.0), "{norm:?} row {i} has keys");
                }
            }
        }
        if norm == Norm::Softmax {
            let (_, lse) = evaluate_with_lse(&spec, &inp).unwrap();
            assert!(lse.data[lse.offset(&[1, 20, 1])] == f64::NEG_INFINITY);
            assert!(lse.data[lse.offset(&[1, 2, 1])].is_finite());
        }
    }
}

// ---------------------------------------------------------------- linear families

fn elu1(x: f64) -> f64 {
    if x > 0.0 {
        1.0 + x
    } else {
        x.exp()
    }
}

#[test]
fn causal_linear_attention_matches_recurrent_form() {
    let mut spec = base("linear", 4, 2, 5, 3);
    let scale = 0.3;
    spec.score = Score::Dot {
        q_map: FeatureMap::Elu1,
        k_map: FeatureMap::Elu1,
        scale,
    };
    let eps = 1e-6;
    spec.norm = Norm::Sum { eps };
    spec.family = Family::Linear;
    let (dk, dv) = (5, 3);
    for &l in &LENGTHS {
        let inp = random_inputs(&spec, BATCH, l, 21);
        let mut want = vec![0.0; BATCH * l * 4 * dv];
        for b in 0..BATCH {
            for h in 0..4 {
                let kvh = h / 2;
                // Running state S = sum psi(k) v^T and normaliser z = sum psi(k).
                let mut s = vec![0.0f64; dk * dv];
                let mut z = vec![0.0f64; dk];
                for i in 0..l {
                    for a in 0..dk {
                        let pk = elu1(at(&inp.k, [b, i, kvh, a]));
                        z[a] += pk;
                        for c in 0..dv {
                            s[a * dv + c] += pk * at(&inp.v, [b, i, kvh, c]);
                        }
                    }
                    let pq: Vec<f64> = (0..dk).map(|a| elu1(at(&inp.q, [b, i, h, a]))).collect();
                    let den: f64 = scale * (0..dk).map(|a| pq[a] * z[a]).sum::<f64>() + eps;
                    for c in 0..dv {
                        let num: f64 = scale * (0..dk).map(|a| pq[a] * s[a * dv + c]).sum::<f64>();
                        want[((b * l + i) * 4 + h) * dv + c] = num / den;
                    }
                }
            }
        }
        assert_close(
            &evaluate(&spec, &inp).unwrap(),
            &want,
            &format!("linear L={l}"),
        );
    }
}

/// o_i = scale * q_i^T S_i with S_i = gamma_i S_{i-1} + k_i v_i^T, the
/// recurrent form shared by retention (gamma fixed per head) and gated decay.
fn decayed_recurrence(
    inp: &MixerInputs,
    heads: usize,
    group: usize,
    dk: usize,
    dv: usize,
    scale: f64,
    gamma: &dyn Fn(usize, usize, usize) -> f64,
) -> Vec<f64> {
    let l = inp.seq;
    let mut want = vec![0.0; BATCH * l * heads * dv];
    for b in 0..BATCH {
        for h in 0..heads {
            let kvh = h / group;
            let mut s = vec![0.0f64; dk * dv];
            for i in 0..l {
                let g = gamma(b, i, h);
                for a in 0..dk {
                    let ka = at(&inp.k, [b, i, kvh, a]);
                    for c in 0..dv {
                        s[a * dv + c] = g * s[a * dv + c] + ka * at(&inp.v, [b, i, kvh, c]);
                    }
                }
                for c in 0..dv {
                    let o: f64 = (0..dk)
                        .map(|a| at(&inp.q, [b, i, h, a]) * s[a * dv + c])
                        .sum();
                    want[((b * l + i) * heads + h) * dv + c] = scale * o;
                }
            }
        }
    }
    want
}

#[test]
fn retention_parallel_form_matches_recurrent_form() {
    let mut spec = base("retnet", 4, 4, 4, 8);
    spec.score = Score::Dot {
        q_map: FeatureMap::Identity,
        k_map: FeatureMap::Identity,
        scale: 0.5,
    };
    // gamma_h = 1 - 2^(-5 - h), as RetNet.
    spec.decay = Decay::PerHead(bin(
        BinOp::Sub,
        Expr::Float(1.0),
        Expr::Call(
            Func::Pow,
            vec![
                Expr::Float(2.0),
                bin(BinOp::Sub, Expr::Float(-5.0), Expr::Var(Var::H)),
            ],
        ),
    ));
    spec.norm = Norm::None;
    spec.family = Family::Retention;
    for &l in &LENGTHS {
        let inp = random_inputs(&spec, BATCH, l, 31);
        let gamma = |_b, _i, h: usize| 1.0 - 2f64.powi(-5 - h as i32);
        let want = decayed_recurrence(&inp, 4, 1, 4, 8, 0.5, &gamma);
        assert_close(
            &evaluate(&spec, &inp).unwrap(),
            &want,
            &format!("retention L={l}"),
        );
    }
}

#[test]
fn gated_decay_matches_step_by_step_scan() {
    let mut spec = base("gated", 4, 2, 6, 5);
    spec.score = Score::Dot {
        q_map: FeatureMap::Identity,
        k_map: FeatureMap::Identity,
        scale: 1.0,
    };
    spec.inputs = vec![InputDecl {
        name: "g".into(),
        elem: ElemType::F32,
        dims: vec![Dim::Batch, Dim::Seq, Dim::Heads],
        role: InputRole::Gate,
    }];
    spec.decay = Decay::Gate { input: "g".into() };
    spec.norm = Norm::None;
    spec.family = Family::Gated;
    for &l in &LENGTHS {
        let mut inp = random_inputs(&spec, BATCH, l, 41);
        // Make some gates tiny so a wrong product range shows up clearly.
        if let ExtraTensor::F32(g) = inp.extra.get_mut("g").unwrap() {
            for x in g.data.iter_mut().step_by(7) {
                *x = 0.25;
            }
        }
        let g = extra_f32(&inp, "g").clone();
        let gamma = |b: usize, i: usize, h: usize| g.data[(b * l + i) * 4 + h] as f64;
        let want = decayed_recurrence(&inp, 4, 2, 6, 5, 1.0, &gamma);
        assert_close(
            &evaluate(&spec, &inp).unwrap(),
            &want,
            &format!("gated L={l}"),
        );
    }
}

#[test]
fn convolution_matches_direct_loop() {
    let mut spec = base("hyena", 4, 4, 2, 3);
    spec.inputs = vec![InputDecl {
        name: "f".into(),
        elem: ElemType::F32,
        dims: vec![Dim::Heads, Dim::Seq],
        role: InputRole::Filter,
    }];
    spec.score = Score::Filter { input: "f".into() };
    spec.norm = Norm::None;
    spec.family = Family::Convolution;
    for &l in &LENGTHS {
        let inp = random_inputs(&spec, BATCH, l, 51);
        assert!(inp.q.data.is_empty() && inp.k.data.is_empty());
        let f = extra_f32(&inp, "f");
        let mut want = vec![0.0; BATCH * l * 4 * 3];
        for b in 0..BATCH {
            for h in 0..4 {
                for i in 0..l {
                    for c in 0..3 {
                        // y_i = sum over lags t of f[h, t] v_{i - t}
                        want[((b * l + i) * 4 + h) * 3 + c] = (0..=i)
                            .map(|t| f.data[h * l + t] as f64 * at(&inp.v, [b, i - t, h, c]))
                            .sum();
                    }
                }
            }
        }
        assert_close(
            &evaluate(&spec, &inp).unwrap(),
            &want,
            &format!("conv L={l}"),
        );
    }
}

// ---------------------------------------------------------------- rows, errors

#[test]
fn evaluate_rows_equals_rows_of_evaluate() {
    let mut spec = base("rows", 4, 2, 4, 3);
    spec.inputs = vec![seg_input("doc")];
    spec.mask = and(
        Mask::Causal,
        Mask::Segment {
            input: "doc".into(),
        },
    );
    let l = 100;
    let inp = random_inputs(&spec, BATCH, l, 61);
    let full = evaluate(&spec, &inp).unwrap();
    let rows = [0, 5, 99, 32, 5];
    let part = evaluate_rows(&spec, &inp, &rows).unwrap();
    assert_eq!(part.shape, vec![BATCH, rows.len(), 4, 3]);
    for b in 0..BATCH {
        for (r, &i) in rows.iter().enumerate() {
            let a = &part.data[part.offset(&[b, r, 0, 0])..][..12];
            let e = &full.data[full.offset(&[b, i, 0, 0])..][..12];
            assert_eq!(a, e, "row {i}");
        }
    }
    let err = evaluate_rows(&spec, &inp, &[100]).unwrap_err();
    assert!(err.to_string().contains("row 100"), "{err}");
}

#[test]
fn lse_is_refused_for_non_softmax_norms() {
    let mut spec = base("lin", 2, 2, 4, 4);
    spec.norm = Norm::None;
    let inp = random_inputs(&spec, 1, 4, 0);
    assert!(matches!(
        evaluate_with_lse(&spec, &inp),
        Err(RuntimeError::Invalid(_))
    ));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let spec = base("bad", 4, 2, 4, 3);
    let good = random_inputs(&spec, 2, 7, 1);
    // k with the query-head count instead of kv heads.
    let mut inp = good.clone();
    inp.k = Tensor::zeros(&[2, 7, 4, 4]);
    let msg = evaluate(&spec, &inp).unwrap_err().to_string();
    assert!(msg.contains("`k`"), "{msg}");
    assert!(
        msg.contains("[batch=2, seq=7, kv_heads=2, head_dim=4]"),
        "{msg}"
    );
    // A spec that reads an input it never declared.
    let mut s2 = spec.clone();
    s2.mask = Mask::Segment {
        input: "nope".into(),
    };
    let msg = evaluate(&s2, &good).unwrap_err().to_string();
    assert!(msg.contains("nope"), "{msg}");
    // Decay without a causal mask is undefined.
    let mut s3 = spec.clone();
    s3.decay = Decay::PerHead(Expr::Float(0.9));
    s3.mask = Mask::All;
    assert!(matches!(
        evaluate(&s3, &good),
        Err(RuntimeError::SpecInvariant(
            mixc_dsl::InvariantError::NeedsCausal(_)
        ))
    ));
    // Non-finite values.
    let mut inp = good.clone();
    inp.v.data[3] = f32::NAN;
    let msg = evaluate(&spec, &inp).unwrap_err().to_string();
    assert!(msg.contains("`v`") && msg.contains("NaN"), "{msg}");
}

// ---------------------------------------------------------------- random inputs

fn full_spec() -> MixerSpec {
    let mut spec = base("everything", 4, 2, 8, 6);
    spec.inputs = vec![
        seg_input("doc"),
        InputDecl {
            name: "g".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Batch, Dim::Seq, Dim::Heads],
            role: InputRole::Gate,
        },
        InputDecl {
            name: "rel".into(),
            elem: ElemType::F32,
            dims: vec![Dim::Heads, Dim::Fixed(16)],
            role: InputRole::Table,
        },
    ];
    spec
}

#[test]
fn random_inputs_are_deterministic_and_well_formed() {
    let spec = full_spec();
    for &l in &LENGTHS {
        let a = random_inputs(&spec, BATCH, l, 7);
        let b = random_inputs(&spec, BATCH, l, 7);
        let c = random_inputs(&spec, BATCH, l, 8);
        assert_eq!(a, b, "same seed, same inputs");
        assert_ne!(a.q, c.q, "different seed, different q");
        assert_ne!(
            a.q.data,
            a.k.data[..a.q.data.len().min(a.k.data.len())].to_vec()
        );
        validate_inputs(&spec, &a).unwrap();
        let shapes = spec.tensor_shapes(BATCH, l);
        assert_eq!(a.q.shape, shapes["q"]);
        assert_eq!(a.k.shape, shapes["k"]);
        assert_eq!(a.v.shape, shapes["v"]);
        for (name, t) in &a.extra {
            assert_eq!(t.shape(), shapes[name].as_slice(), "{name}");
        }
        let g = extra_f32(&a, "g");
        assert!(g.data.iter().all(|&x| (0.9..1.0).contains(&x)));
        let doc = extra_i32(&a, "doc");
        for row in doc.data.chunks(l) {
            assert_eq!(row[0], 0);
            assert!(row.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
        }
    }
    // Some sequence of length 100 holds more than one document, of ragged lengths.
    let docs = extra_i32(&random_inputs(&spec, 8, 100, 7), "doc").clone();
    assert!(docs.data.iter().any(|&d| d > 0));
    // Adding an input does not change the others for a seed.
    let plain = base("everything", 4, 2, 8, 6);
    let x = random_inputs(&plain, 2, 33, 7);
    let y = random_inputs(&spec, 2, 33, 7);
    assert_eq!((x.q, x.k, x.v), (y.q, y.k, y.v));
    // q/k/v are roughly standard normal.
    let big = random_inputs(&plain, 4, 256, 3);
    let n = big.q.data.len() as f64;
    let mean: f64 = big.q.data.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var: f64 = big
        .q
        .data
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!(
        mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
        "mean {mean} var {var}"
    );
}

#[test]
fn validate_inputs_rejects_bad_gates_dtypes_and_extras() {
    let spec = full_spec();
    let good = random_inputs(&spec, 2, 7, 1);
    let mut inp = good.clone();
    if let ExtraTensor::F32(g) = inp.extra.get_mut("g").unwrap() {
        g.data[2] = 1.5;
    }
    let msg = validate_inputs(&spec, &inp).unwrap_err().to_string();
    assert!(msg.contains("`g`") && msg.contains("(0, 1]"), "{msg}");

    let mut inp = good.clone();
    inp.extra
        .insert("doc".into(), ExtraTensor::F32(Tensor::zeros(&[2, 7])));
    let msg = validate_inputs(&spec, &inp).unwrap_err().to_string();
    assert!(msg.contains("`doc`") && msg.contains("i32"), "{msg}");

    let mut inp = good.clone();
    inp.extra.remove("rel");
    let msg = validate_inputs(&spec, &inp).unwrap_err().to_string();
    assert!(
        msg.contains("`rel`") && msg.contains("[heads=4, 16]"),
        "{msg}"
    );

    let mut inp = good.clone();
    inp.extra
        .insert("extra".into(), ExtraTensor::I32(Tensor::zeros(&[1])));
    let msg = validate_inputs(&spec, &inp).unwrap_err().to_string();
    assert!(
        msg.contains("`extra`") && msg.contains("not declared"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- random mask trees

fn arb_mask() -> impl proptest::strategy::Strategy<Value = Mask> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Mask::All),
        Just(Mask::Causal),
        (0u64..12).prop_map(|size| Mask::Window { size }),
        (0u64..12).prop_map(|prefix| Mask::PrefixLm { prefix }),
        Just(Mask::Segment {
            input: "doc".into()
        }),
        (1u64..6, 0u64..3, 0u64..3).prop_map(|(block, local, global)| Mask::BlockSparse {
            block,
            local,
            global
        }),
        (1u64..5).prop_map(|rate| Mask::Dilated { rate }),
    ];
    leaf.prop_recursive(3, 8, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| and(a, b)),
            (inner.clone(), inner).prop_map(|(a, b)| or(a, b)),
        ]
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Arbitrary `&&` / `||` trees of every primitive, on ragged lengths.
    #[test]
    fn random_mask_trees_match_brute_force(mask in arb_mask(), l in 1usize..24, seed in 0u64..1000) {
        let mut spec = base("prop", 2, 1, 3, 2);
        spec.inputs = vec![seg_input("doc")];
        spec.mask = mask.clone();
        let inp = random_inputs(&spec, BATCH, l, seed);
        let ids = extra_i32(&inp, "doc").clone();
        let allowed = |b: usize, i: usize, j: usize| brute_mask(&mask, i, j, &|p| ids.data[b * l + p]);
        let (want, _) = dense_softmax(&spec, &inp, &|_, _, _, _, s| s, &allowed);
        assert_close(&evaluate(&spec, &inp).unwrap(), &want, &format!("{mask:?} L={l}"));
    }
}
