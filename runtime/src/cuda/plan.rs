//! Host-side planning of a CUDA ring run: where a shard's ranges sit in the
//! buffer that concatenates them, which (query range, key range) launches a
//! ring step needs (skipping those whose tiles are all masked, with the same
//! [`BlockPlan`] the CPU backend and the kernels use), which device a rank
//! runs on, and the row gathering that builds shard buffers. No GPU needed,
//! so all of it is unit tested here.

use std::ops::Range;

use mixc_codegen::plan::{BlockPlan, SegmentSummaries, SegmentSummary, Tiling};
use mixc_dsl::ir::{Mask, MixerSpec};

use crate::error::{Result, RuntimeError};
use crate::tensor::MixerInputs;

/// A range of positions and the buffer row its first position is stored at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub range: Range<usize>,
    pub offset: usize,
}

/// Lays `ranges` end to end in one buffer; returns the placements and the
/// buffer's row count.
pub fn place(ranges: &[Range<usize>]) -> (Vec<Placed>, usize) {
    let mut rows = 0;
    let placed = ranges
        .iter()
        .map(|r| {
            let p = Placed {
                range: r.clone(),
                offset: rows,
            };
            rows += r.len();
            p
        })
        .collect();
    (placed, rows)
}

/// One launch of a pairwise kernel (softmax or convolution): query rows
/// `[q_begin, q_end)` of the rank's query buffer against key rows
/// `[kv_begin, kv_end)` of the key/value shard it holds. Row `x` of the query
/// buffer is global position `q_pos0 + x` (likewise keys), which is exactly
/// the kernels' contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairLaunch {
    /// Index of the query range among the rank's ranges.
    pub q_index: usize,
    /// Global positions.
    pub q: Range<usize>,
    pub k: Range<usize>,
    pub q_begin: usize,
    pub q_end: usize,
    pub kv_begin: usize,
    pub kv_end: usize,
    pub q_pos0: i64,
    pub k_pos0: i64,
}

/// Above this many tiles a launch's exact pair count is not computed (the
/// classification would cost more than the kernel); `pairs` is then `None`.
const MAX_COUNTED_TILES: usize = 1 << 22;

/// The launches of one ring step of one rank and the (query, key) pairs they
/// compute over all batch rows (`None` when too costly to count). Launches
/// whose plan is empty for every batch row are left out: that is the block
/// skipping of whole ring steps.
pub fn pair_launches(
    mask: &Mask,
    tiling: Tiling,
    segs: &[SegmentSummaries],
    q_ranges: &[Range<usize>],
    kv_ranges: &[Range<usize>],
) -> (Vec<PairLaunch>, Option<u64>) {
    let (qp, _) = place(q_ranges);
    let (kp, _) = place(kv_ranges);
    let mut out = Vec::new();
    let mut pairs = Some(0u64);
    for (q_index, q) in qp.iter().enumerate() {
        for k in &kp {
            let plan = BlockPlan::new(mask, tiling, q.range.clone(), k.range.clone());
            let empty = segs.iter().all(|s| plan.is_empty(s));
            if empty {
                continue;
            }
            let tiles = plan.num_query_blocks() * plan.num_key_blocks();
            pairs = match pairs {
                Some(p) if tiles <= MAX_COUNTED_TILES => {
                    Some(p + segs.iter().map(|s| plan.pairs_computed(s)).sum::<u64>())
                }
                _ => None,
            };
            out.push(PairLaunch {
                q_index,
                q: q.range.clone(),
                k: k.range.clone(),
                q_begin: q.offset,
                q_end: q.offset + q.range.len(),
                kv_begin: k.offset,
                kv_end: k.offset + k.range.len(),
                q_pos0: q.range.start as i64 - q.offset as i64,
                k_pos0: k.range.start as i64 - k.offset as i64,
            });
        }
    }
    (out, pairs)
}

/// Segment-id summaries per batch row for the plan's `segment` tests (one
/// empty summary when the mask reads no segment ids, so the plan is computed
/// once rather than per batch row).
pub fn segment_summaries(
    spec: &MixerSpec,
    inputs: &MixerInputs,
    tiling: Tiling,
) -> Vec<SegmentSummaries> {
    let mut names = Vec::new();
    spec.mask.segment_inputs(&mut names);
    if names.is_empty() {
        return vec![SegmentSummaries::default()];
    }
    let block = tiling.block_m.min(tiling.block_n).max(1);
    (0..inputs.batch)
        .map(|b| SegmentSummaries {
            entries: names
                .iter()
                .filter_map(|name| {
                    let t = inputs.extra.get(name.as_str())?;
                    let ids = (0..inputs.seq).map(|p| t.get_clamped(&[b as i64, p as i64]) as i64);
                    Some((name.clone(), SegmentSummary::new(ids, block)))
                })
                .collect(),
        })
        .collect()
}

/// The device a rank runs on: ranks are dealt round-robin, so `R` virtual
/// ranks on one GPU and one rank per GPU are the same code path.
pub fn device_of(rank: usize, devices: usize) -> usize {
    rank % devices.max(1)
}

/// Rows of a `[batch, seq, width]` row-major tensor (width = product of the
/// trailing axes) gathered for `ranges`, as `[batch, sum(len), width]`.
pub fn gather_rows(
    data: &[f32],
    batch: usize,
    seq: usize,
    width: usize,
    ranges: &[Range<usize>],
) -> Vec<f32> {
    debug_assert_eq!(data.len(), batch * seq * width);
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(batch * n * width);
    for b in 0..batch {
        for r in ranges {
            out.extend_from_slice(&data[(b * seq + r.start) * width..(b * seq + r.end) * width]);
        }
    }
    out
}

/// The inverse of [`gather_rows`]: writes a `[batch, rows, width]` buffer
/// holding `ranges` end to end into `out` (`[batch, seq, width]`).
pub fn scatter_rows(
    out: &mut [f32],
    data: &[f32],
    batch: usize,
    seq: usize,
    width: usize,
    rows: usize,
    ranges: &[Range<usize>],
) {
    let (placed, _) = place(ranges);
    for b in 0..batch {
        for p in &placed {
            let src = (b * rows + p.offset) * width;
            let dst = (b * seq + p.range.start) * width;
            let n = p.range.len() * width;
            out[dst..dst + n].copy_from_slice(&data[src..src + n]);
        }
    }
}

/// Checks that every number a kernel receives as `int` fits 32 bits.
pub fn check_int_sizes(batch: usize, seq: usize) -> Result<()> {
    if seq > i32::MAX as usize || batch > 65_535 {
        return Err(RuntimeError::Invalid(format!(
            "CUDA backend: batch {batch} x seq {seq} is beyond one launch (kernels take 32-bit \
             positions and at most 65535 sequences per grid); split the run or use --backend cpu"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{RingSchedule, Sharding};
    use mixc_dsl::ir::MixerSpec;

    #[test]
    fn placement_and_gather() {
        let (p, n) = place(&[2..5, 10..12]);
        assert_eq!(n, 5);
        assert_eq!(
            p[1],
            Placed {
                range: 10..12,
                offset: 3
            }
        );
        // [batch 2, seq 12, width 2]: value = 100 b + 10 pos + col.
        let data: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..12).flat_map(move |s| (0..2).map(move |c| (100 * b + 10 * s + c) as f32))
            })
            .collect();
        let g = gather_rows(&data, 2, 12, 2, &[2..5, 10..12]);
        assert_eq!(g.len(), 2 * 5 * 2);
        assert_eq!(&g[..4], &[20.0, 21.0, 30.0, 31.0]);
        assert_eq!(&g[6..8], &[100.0, 101.0]);
        assert_eq!(&g[10..12], &[120.0, 121.0]);
        assert_eq!(&g[18..20], &[210.0, 211.0]);
    }

    /// Over the R steps of a ring, every rank's launches cover exactly the
    /// (query, key) pairs the mask allows, each once, and the buffer rows map
    /// to the right global positions. Checked pair by pair on small sizes.
    #[test]
    fn ring_launches_cover_every_visible_pair_once() {
        let tiling = Tiling {
            block_m: 4,
            block_n: 3,
        };
        let masks = [
            Mask::Causal,
            Mask::All,
            Mask::And(Box::new(Mask::Causal), Box::new(Mask::Window { size: 5 })),
            Mask::PrefixLm { prefix: 4 },
            Mask::Dilated { rate: 3 },
        ];
        for mask in &masks {
            for seq in [1usize, 7, 33] {
                for ranks in [1usize, 2, 3, 4] {
                    if ranks > seq {
                        continue;
                    }
                    for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                        let s = RingSchedule::new(seq, ranks, sharding).unwrap();
                        let mut seen = vec![0u8; seq * seq];
                        let mut skipped = 0;
                        for r in 0..ranks {
                            let (qp, _) = place(s.shard(r));
                            for step in 0..ranks {
                                let kv = s.shard(s.held_at(r, step));
                                let (kp, _) = place(kv);
                                let segs = [SegmentSummaries::default()];
                                let (ls, pairs) =
                                    pair_launches(mask, tiling, &segs, s.shard(r), kv);
                                skipped += qp.len() * kp.len() - ls.len();
                                let mut counted = 0u64;
                                for l in &ls {
                                    assert_eq!(l.q_pos0 + l.q_begin as i64, l.q.start as i64);
                                    assert_eq!(l.k_pos0 + l.kv_begin as i64, l.k.start as i64);
                                    assert_eq!(l.q_end - l.q_begin, l.q.len());
                                    assert_eq!(l.kv_end - l.kv_begin, l.k.len());
                                    for i in l.q.clone() {
                                        for j in l.k.clone() {
                                            seen[i * seq + j] += 1;
                                            counted += u64::from(mask_allows(mask, i, j));
                                        }
                                    }
                                }
                                // Reported pairs include masked ones inside computed tiles.
                                assert!(pairs.unwrap() >= counted);
                            }
                        }
                        for i in 0..seq {
                            for j in 0..seq {
                                let c = seen[i * seq + j];
                                assert!(c <= 1, "pair ({i},{j}) launched {c} times");
                                if mask_allows(mask, i, j) {
                                    let at = format!("{mask:?} seq {seq} R {ranks} {sharding:?}");
                                    assert_eq!(c, 1, "{at}: ({i},{j}) missed");
                                }
                            }
                        }
                        if *mask == Mask::Causal && ranks > 1 && sharding == Sharding::Contiguous {
                            assert!(skipped > 0, "causal contiguous rings skip future shards");
                        }
                    }
                }
            }
        }
    }

    fn mask_allows(mask: &Mask, i: usize, j: usize) -> bool {
        mask.allows(i as i64, j as i64, &|_, _| 0)
    }

    #[test]
    fn ranks_deal_round_robin() {
        assert_eq!(
            (0..5).map(|r| device_of(r, 2)).collect::<Vec<_>>(),
            [0, 1, 0, 1, 0]
        );
        assert_eq!(device_of(3, 1), 0);
        assert!(check_int_sizes(2, 1 << 20).is_ok());
        assert!(check_int_sizes(1, 1 << 31)
            .unwrap_err()
            .to_string()
            .contains("32-bit"));
    }

    /// Host twin of `mixc_merge_lse_*` (same index formulas as the CUDA source
    /// in exec.rs): acc `[batch, rows, heads, dv]` / lse `[batch, heads, rows]`
    /// absorbs a partial over rows `[row_begin, row_end)`.
    #[allow(clippy::too_many_arguments)]
    fn merge_rows(
        acc_o: &mut [f32],
        acc_lse: &mut [f32],
        part_o: &[f32],
        part_lse: &[f32],
        (batch, rows, heads, dv): (usize, usize, usize, usize),
        row_begin: usize,
        row_end: usize,
    ) {
        let span = row_end - row_begin;
        for idx in 0..batch * heads * span {
            let r = row_begin + idx % span;
            let bh = idx / span;
            let (h, b) = (bh % heads, bh / heads);
            let li = (b * heads + h) * rows + r;
            let lb = part_lse[li];
            if lb == f32::NEG_INFINITY {
                continue;
            }
            let la = acc_lse[li];
            let m = la.max(lb);
            let (wa, wb) = ((la - m).exp(), (lb - m).exp());
            let oi = ((b * rows + r) * heads + h) * dv;
            for c in 0..dv {
                acc_o[oi + c] = (acc_o[oi + c] * wa + part_o[oi + c] * wb) / (wa + wb);
            }
            acc_lse[li] = m + (wa + wb).ln();
        }
    }

    /// The softmax kernel's contract on the host (dot score, mask, no bias):
    /// rows `[q_begin, q_end)` of `q` (`[batch, nq, heads, d]`) against keys
    /// `[kv_begin, kv_end)` of `k` / `v` (`[batch, nk, kv_heads, d]`); writes
    /// normalised `o` and natural-log `lse` for those rows only.
    #[allow(clippy::too_many_arguments)]
    fn softmax_launch(
        spec: &MixerSpec,
        l: &PairLaunch,
        (batch, nq, nk): (usize, usize, usize),
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &mut [f32],
        lse: &mut [f32],
    ) {
        let (h_, kvh, d) = (
            spec.heads as usize,
            spec.kv_heads as usize,
            spec.head_dim as usize,
        );
        let scale = match &spec.score {
            mixc_dsl::ir::Score::Dot { scale, .. } => *scale as f32,
            _ => unreachable!(),
        };
        for b in 0..batch {
            for h in 0..h_ {
                let g = h / (h_ / kvh);
                for r in l.q_begin..l.q_end {
                    let i = l.q_pos0 + r as i64;
                    let qr = &q[((b * nq + r) * h_ + h) * d..][..d];
                    let mut scores = Vec::new();
                    for c in l.kv_begin..l.kv_end {
                        let j = l.k_pos0 + c as i64;
                        if spec.mask.allows(i, j, &|_, _| 0) {
                            let kr = &k[((b * nk + c) * kvh + g) * d..][..d];
                            let s: f32 = qr.iter().zip(kr).map(|(a, b)| a * b).sum();
                            scores.push((c, s * scale));
                        }
                    }
                    let oi = ((b * nq + r) * h_ + h) * d;
                    let li = (b * h_ + h) * nq + r;
                    if scores.is_empty() {
                        o[oi..oi + d].iter_mut().for_each(|x| *x = 0.0);
                        lse[li] = f32::NEG_INFINITY;
                        continue;
                    }
                    let m = scores.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    let mut acc = vec![0.0f32; d];
                    for &(c, s) in &scores {
                        let w = (s - m).exp();
                        sum += w;
                        let vr = &v[((b * nk + c) * kvh + g) * d..][..d];
                        acc.iter_mut().zip(vr).for_each(|(a, x)| *a += w * x);
                    }
                    for (x, a) in o[oi..oi + d].iter_mut().zip(&acc) {
                        *x = a / sum;
                    }
                    lse[li] = m + sum.ln();
                }
            }
        }
    }

    /// The whole softmax ring exactly as the CUDA backend lays it out (shard
    /// buffers from `gather_rows`, launches from `pair_launches`, the merge
    /// kernel's indexing, `scatter_rows`), with the kernel replaced by its
    /// host contract, equals the f64 reference: the host pieces of the
    /// backend are right whatever the GPU does.
    #[test]
    fn host_twin_of_the_softmax_ring_matches_the_reference() {
        for mask in [
            "causal",
            "all",
            "causal && window(5)",
            "prefix_lm(3)",
            "dilated(2)",
        ] {
            let spec = mixc_dsl::parse_str(&format!(
                "mixer t {{ heads = 4; kv_heads = 2; head_dim = 8; dtype = f32; \
                 score = dot(q, k); mask = {mask}; norm = softmax; }}"
            ))
            .unwrap();
            let d = 8;
            for seq in [1usize, 7, 19] {
                let x = crate::inputs::random_inputs(&spec, 2, seq, 3);
                let want = crate::reference::evaluate(&spec, &x).unwrap();
                for ranks in [1usize, 2, 3, 4] {
                    if ranks > seq {
                        continue;
                    }
                    for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                        let s = RingSchedule::new(seq, ranks, sharding).unwrap();
                        let tiling = Tiling {
                            block_m: 4,
                            block_n: 4,
                        };
                        let segs = [SegmentSummaries::default()];
                        let mut out = vec![0.0f32; 2 * seq * 4 * d];
                        for r in 0..ranks {
                            let qr = s.shard(r);
                            let nq = s.shard_len(r);
                            let q = gather_rows(&x.q.data, 2, seq, 4 * d, qr);
                            let mut acc_o = vec![0.0f32; 2 * nq * 4 * d];
                            let mut acc_lse = vec![f32::NEG_INFINITY; 2 * 4 * nq];
                            let mut part_o = vec![f32::NAN; acc_o.len()];
                            let mut part_lse = vec![f32::NAN; acc_lse.len()];
                            for step in 0..ranks {
                                let kv = s.shard(s.held_at(r, step));
                                let nk = s.shard_len(s.held_at(r, step));
                                let k = gather_rows(&x.k.data, 2, seq, 2 * d, kv);
                                let v = gather_rows(&x.v.data, 2, seq, 2 * d, kv);
                                let (ls, _) = pair_launches(&spec.mask, tiling, &segs, qr, kv);
                                for l in &ls {
                                    softmax_launch(
                                        &spec,
                                        l,
                                        (2, nq, nk),
                                        &q,
                                        &k,
                                        &v,
                                        &mut part_o,
                                        &mut part_lse,
                                    );
                                    merge_rows(
                                        &mut acc_o,
                                        &mut acc_lse,
                                        &part_o,
                                        &part_lse,
                                        (2, nq, 4, d),
                                        l.q_begin,
                                        l.q_end,
                                    );
                                }
                            }
                            scatter_rows(&mut out, &acc_o, 2, seq, 4 * d, nq, qr);
                        }
                        let err = out
                            .iter()
                            .zip(&want.data)
                            .map(|(a, b)| (*a as f64 - b).abs())
                            .fold(0.0, f64::max);
                        assert!(err < 1e-5, "{mask} seq {seq} R {ranks} {sharding:?}: {err}");
                    }
                }
            }
        }
    }

    /// The convolution ring's bookkeeping (per-query-range f32 accumulators,
    /// `q_pos0` = range start, `k_pos0` from the shard placement) with the
    /// kernel's contract on the host equals the reference.
    #[test]
    fn host_twin_of_the_conv_ring_matches_the_reference() {
        let spec = mixc_dsl::parse_str(
            "mixer c { heads = 2; head_dim = 4; dtype = f32; input f: f32[heads, seq]; \
             score = filter(f); mask = causal; norm = none; }",
        )
        .unwrap();
        let (h_, dv) = (2usize, 4usize);
        for seq in [1usize, 6, 23] {
            let x = crate::inputs::random_inputs(&spec, 2, seq, 5);
            let want = crate::reference::evaluate(&spec, &x).unwrap();
            let f = match &x.extra["f"] {
                crate::tensor::ExtraTensor::F32(t) => t.data.clone(),
                _ => unreachable!(),
            };
            for ranks in [1usize, 2, 4] {
                if ranks > seq {
                    continue;
                }
                for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                    let s = RingSchedule::new(seq, ranks, sharding).unwrap();
                    let tiling = Tiling {
                        block_m: 4,
                        block_n: 4,
                    };
                    let segs = [SegmentSummaries::default()];
                    let mut out = vec![0.0f32; 2 * seq * h_ * dv];
                    for r in 0..ranks {
                        let qr = s.shard(r);
                        let mut accs: Vec<Vec<f32>> = qr
                            .iter()
                            .map(|q| vec![0.0; 2 * q.len() * h_ * dv])
                            .collect();
                        for step in 0..ranks {
                            let kv = s.shard(s.held_at(r, step));
                            let nk = s.shard_len(s.held_at(r, step));
                            let v = gather_rows(&x.v.data, 2, seq, h_ * dv, kv);
                            let (ls, _) = pair_launches(&spec.mask, tiling, &segs, qr, kv);
                            for l in &ls {
                                let acc = &mut accs[l.q_index];
                                let (q_rows, q_pos0) = (l.q.len(), l.q.start as i64);
                                for b in 0..2 {
                                    for i in 0..q_rows {
                                        for h in 0..h_ {
                                            for c in l.kv_begin..l.kv_end {
                                                let lag = q_pos0 + i as i64 - (l.k_pos0 + c as i64);
                                                if !(0..seq as i64).contains(&lag) {
                                                    continue;
                                                }
                                                let w = f[h * seq + lag as usize];
                                                for col in 0..dv {
                                                    acc[((b * q_rows + i) * h_ + h) * dv + col] +=
                                                        w * v[((b * nk + c) * h_ + h) * dv + col];
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        for (a, q) in accs.iter().zip(qr) {
                            scatter_rows(
                                &mut out,
                                a,
                                2,
                                seq,
                                h_ * dv,
                                q.len(),
                                std::slice::from_ref(q),
                            );
                        }
                    }
                    let err = out
                        .iter()
                        .zip(&want.data)
                        .map(|(a, b)| (*a as f64 - b).abs())
                        .fold(0.0, f64::max);
                    assert!(err < 1e-4, "seq {seq} R {ranks} {sharding:?}: {err}");
                }
            }
        }
    }
}
