//! Every `examples/*.mix` spec, parsed by the real front end, evaluated by
//! the reference and compared with a dense formulation written here: the
//! whole weight matrix of a (b, h) pair is built first (decay as an explicit
//! product over l = j+1..i, not the reference's running product), then
//! normalised. Short sequences are compared in full; specs whose masks have
//! long-range constants (windows of 4096, prefixes of 512, ...) are also run
//! past those constants and compared on sampled rows.

use std::path::{Path, PathBuf};

use mixc_dsl::{Decay, EvalEnv, Expr, Mask, MixerSpec, Norm, Score};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::reference::{evaluate, evaluate_rows};
use mixc_runtime::{MixerInputs, Tensor};

const TOL: f64 = 1e-12;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mix"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "examples not found in {}", dir.display());
    files
}

fn parse(path: &Path) -> MixerSpec {
    mixc_dsl::parse_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn eval(
    spec: &MixerSpec,
    inp: &MixerInputs,
    e: &Expr,
    i: usize,
    j: usize,
    h: usize,
    s: f64,
) -> f64 {
    let lookup = |name: &str, idx: &[i64]| inp.extra[name].get_clamped(idx);
    e.eval_f64(&EvalEnv {
        i: i as i64,
        j: j as i64,
        h: h as i64,
        s,
        ..inp.eval_env(spec.heads, &lookup)
    })
}

/// Dense oracle for the listed rows: `[batch, rows, heads, value_dim]` flattened.
fn dense(spec: &MixerSpec, inp: &MixerInputs, rows: &[usize]) -> Vec<f64> {
    let (l, heads, dk, dv) = (
        inp.seq,
        spec.heads as usize,
        spec.head_dim as usize,
        spec.value_dim as usize,
    );
    let f = |t: &Tensor<f32>, idx: [usize; 4]| t.data[t.offset(&idx)] as f64;
    let mut out = vec![0.0; inp.batch * rows.len() * heads * dv];
    for b in 0..inp.batch {
        let seg = |name: &str, p: i64| inp.extra[name].get_clamped(&[b as i64, p]) as i64;
        for h in 0..heads {
            let kvh = h / (spec.heads / spec.kv_heads) as usize;
            // The weight matrix restricted to the requested rows.
            let a: Vec<Vec<Option<f64>>> = rows
                .iter()
                .map(|&i| {
                    (0..l)
                        .map(|j| {
                            let lookup = |name: &str, idx: &[i64]| inp.extra[name].get_clamped(idx);
                            let at = EvalEnv {
                                i: i as i64,
                                j: j as i64,
                                h: h as i64,
                                b: b as i64,
                                ..inp.eval_env(spec.heads, &lookup)
                            };
                            if !spec.mask.allows(&at, &seg) {
                                return None;
                            }
                            Some(match &spec.score {
                                Score::Filter { input } => {
                                    inp.extra[input].get_clamped(&[h as i64, (i - j) as i64])
                                }
                                Score::Dot {
                                    q_map,
                                    k_map,
                                    scale,
                                } => {
                                    let mut s = scale
                                        * (0..dk)
                                            .map(|d| {
                                                q_map.apply(f(&inp.q, [b, i, h, d]))
                                                    * k_map.apply(f(&inp.k, [b, j, kvh, d]))
                                            })
                                            .sum::<f64>();
                                    if let Some(bias) = &spec.bias {
                                        s += eval(spec, inp, bias, i, j, h, 0.0);
                                    }
                                    let t = spec
                                        .transform
                                        .as_ref()
                                        .map_or(s, |tr| eval(spec, inp, tr, i, j, h, s));
                                    let decay = match &spec.decay {
                                        Decay::None => 1.0,
                                        Decay::PerHead(g) => {
                                            eval(spec, inp, g, 0, 0, h, 0.0).powi((i - j) as i32)
                                        }
                                        Decay::Gate { input } => (j + 1..=i)
                                            .map(|p| {
                                                inp.extra[input]
                                                    .get_clamped(&[b as i64, p as i64, h as i64])
                                            })
                                            .product(),
                                    };
                                    t * decay
                                }
                            })
                        })
                        .collect()
                })
                .collect();
            for (r, row) in a.iter().enumerate() {
                let keys: Vec<(usize, f64)> = row
                    .iter()
                    .enumerate()
                    .filter_map(|(j, w)| w.map(|w| (j, w)))
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                let (weights, den): (Vec<f64>, f64) = match spec.norm {
                    Norm::Softmax => {
                        let m = keys.iter().map(|k| k.1).fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = keys.iter().map(|k| (k.1 - m).exp()).collect();
                        let z = w.iter().sum();
                        (w, z)
                    }
                    Norm::Sum { eps } => {
                        let w: Vec<f64> = keys.iter().map(|k| k.1).collect();
                        let z = w.iter().sum::<f64>() + eps;
                        (w, z)
                    }
                    Norm::None => (keys.iter().map(|k| k.1).collect(), 1.0),
                };
                for d in 0..dv {
                    let num: f64 = keys
                        .iter()
                        .zip(&weights)
                        .map(|(&(j, _), w)| w * f(&inp.v, [b, j, kvh, d]))
                        .sum();
                    out[((b * rows.len() + r) * heads + h) * dv + d] = num / den;
                }
            }
        }
    }
    out
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// The largest position constant in a mask (how long a sequence must be to
/// see the mask's whole structure).
fn mask_extent(m: &Mask) -> u64 {
    match m {
        Mask::Window { size } => *size,
        Mask::PrefixLm { prefix } => *prefix,
        Mask::BlockSparse {
            block,
            local,
            global,
        } => block * (local + global + 1),
        Mask::Dilated { rate } => *rate,
        Mask::And(a, b) | Mask::Or(a, b) => mask_extent(a).max(mask_extent(b)),
        _ => 0,
    }
}

#[test]
fn every_example_matches_dense_oracle_on_short_sequences() {
    for path in examples() {
        let spec = parse(&path);
        for l in [1, 7, 33] {
            let inp = random_inputs(&spec, 2, l, 1234);
            let got = evaluate(&spec, &inp).unwrap();
            assert_eq!(
                got.shape,
                vec![2, l, spec.heads as usize, spec.value_dim as usize]
            );
            let rows: Vec<usize> = (0..l).collect();
            let err = rel_err(&got.data, &dense(&spec, &inp, &rows));
            assert!(err <= TOL, "{}: L={l} relative error {err:e}", spec.name);
            assert!(
                got.data.iter().any(|&x| x != 0.0),
                "{}: all-zero output",
                spec.name
            );
        }
    }
}

#[test]
fn examples_with_long_range_masks_match_on_sampled_rows() {
    for path in examples() {
        let spec = parse(&path);
        let extent = mask_extent(&spec.mask) as usize;
        if extent < 33 {
            continue;
        }
        let l = extent + 37;
        let inp = random_inputs(&spec, 1, l, 99);
        // Rows on both sides of the mask's constant, and the ends.
        let rows = [0, extent / 2, extent - 1, extent, extent + 1, l - 1];
        let got = evaluate_rows(&spec, &inp, &rows).unwrap();
        let err = rel_err(&got.data, &dense(&spec, &inp, &rows));
        assert!(err <= TOL, "{}: L={l} relative error {err:e}", spec.name);
    }
}
