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

/// The block sizes the launch planning uses for a kernel configuration (the
/// same tiles the kernels skip by, so a skipped launch is one the kernel
/// would have found empty).
pub fn tiling_of(cfg: &mixc_codegen::KernelConfig) -> Tiling {
    Tiling {
        block_m: cfg.block_m.max(1) as usize,
        block_n: cfg.block_n.max(1) as usize,
    }
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

/// Which of a rank's key/value buffers holds the shard it computes with at
/// ring `step`: its own shard (`None`) at step 0, else ring buffer
/// `Some(step % 2)`, filled during step `step - 1` (see [`ring_fill_slot`]).
pub fn held_slot(step: usize) -> Option<usize> {
    (step > 0).then_some(step % 2)
}

/// The ring buffer of rank `r + 1` that rank `r`'s held shard is copied into
/// during `step`: the one `r + 1` reads at `step + 1`, never the one it reads
/// at `step`.
pub fn ring_fill_slot(step: usize) -> usize {
    (step + 1) % 2
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
        return Err(RuntimeError::DoesNotFit(format!(
            "CUDA backend: batch {batch} x seq {seq} is beyond one launch (kernels take 32-bit \
             positions and at most 65535 sequences per grid); split the run"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{RingSchedule, Sharding};

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
        mask.allows_at(i as i64, j as i64)
    }

    #[test]
    fn double_buffer_slots_alternate() {
        for step in 0..6 {
            // What is filled during `step` is what is held at `step + 1`...
            assert_eq!(held_slot(step + 1), Some(ring_fill_slot(step)));
            // ...and never the buffer read during `step`.
            assert_ne!(held_slot(step), Some(ring_fill_slot(step)));
        }
        assert_eq!(held_slot(0), None);
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

    // The host twins of whole rings (softmax, convolution, chunkwise) are in
    // `runtime/tests/twin/mod.rs`: they drive the launch functions of
    // `args.rs`, not copies.
}
