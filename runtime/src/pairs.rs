//! Exact counts of the (query, key) pairs a mask lets through: what a
//! throughput figure counts as useful work (so masked variants and partly
//! masked tiles are not flattered). Used by `mixc bench` and the library's
//! reports.

use mixc_codegen::plan::{At, BlockClass, BlockPlan, SegmentSummaries, SegmentSummary, Tiling};
use mixc_dsl::ir::{EvalEnv, MixerSpec, Var};

use crate::tensor::{HostElem, MixerInputs};

/// Unmasked (query, key) pairs of one head over the batch, counted exactly:
/// the block plan classifies 64 x 64 tiles, `Full` tiles count whole and only
/// `Partial` ones test the mask per pair, so a causal count costs O(L * 64)
/// mask tests, not O(L^2). Query blocks are split over threads for masks
/// (like `dilated`) whose tiles are mostly `Partial`.
pub fn useful_pairs_per_head<E: HostElem>(spec: &MixerSpec, inputs: &MixerInputs<E>) -> u64 {
    let (seq, kv_seq, q0) = (inputs.seq, inputs.kv_seq, inputs.q_offset);
    let mut seg_names = Vec::new();
    spec.mask.segment_inputs(&mut seg_names);
    let tiling = Tiling {
        block_m: 64,
        block_n: 64,
    };
    let plan = BlockPlan::new(&spec.mask, tiling, q0..q0 + seq, 0..kv_seq);
    // Without segment ids (or `b` in the mask) every batch row has the same
    // pairs: count one. A mask reading `h` is counted per head and averaged.
    let per_row = !seg_names.is_empty() || spec.mask.uses_var(Var::B);
    let rows = if per_row { inputs.batch } else { 1 };
    let heads = if spec.mask.uses_var(Var::H) {
        spec.heads as usize
    } else {
        1
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut total = 0u64;
    let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
    for (b, h) in (0..rows).flat_map(|b| (0..heads).map(move |h| (b, h))) {
        let ids: Vec<(String, Vec<i64>)> = seg_names
            .iter()
            .filter_map(|name| {
                let t = inputs.extra.get(name.as_str())?;
                // Segment ids cover the key positions (queries lie among them).
                let ids = (0..kv_seq)
                    .map(|p| t.get_clamped(&[b as i64, p as i64]) as i64)
                    .collect();
                Some((name.clone(), ids))
            })
            .collect();
        let summaries = SegmentSummaries {
            entries: ids
                .iter()
                .map(|(n, v)| (n.clone(), SegmentSummary::new(v.iter().copied(), 64)))
                .collect(),
        };
        let seg = |name: &str, p: i64| -> i64 {
            ids.iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| v[p as usize])
        };
        let count_blocks = |qbs: std::ops::Range<usize>| -> u64 {
            let mut base = inputs.eval_env(spec.heads, &lookup);
            (base.b, base.h) = (b as i64, h as i64);
            let at = At {
                segs: &summaries,
                tables: Some(inputs),
                known: inputs.known(spec.heads, b, Some(h)),
            };
            let mut n = 0u64;
            for qb in qbs {
                let row = plan.row(qb, &at);
                for (keys, class) in row.tiles(&plan) {
                    n += match class {
                        BlockClass::Full => (row.q.len() * keys.len()) as u64,
                        BlockClass::Partial => row
                            .q
                            .clone()
                            .map(|i| {
                                keys.clone()
                                    .filter(|&j| {
                                        let env = EvalEnv {
                                            i: i as i64,
                                            j: j as i64,
                                            ..base
                                        };
                                        spec.mask.allows(&env, &seg)
                                    })
                                    .count() as u64
                            })
                            .sum(),
                        BlockClass::Skip => 0,
                    };
                }
            }
            n
        };
        let nqb = plan.num_query_blocks();
        total += if threads <= 1 || nqb < 64 {
            count_blocks(0..nqb)
        } else {
            // Interleaved chunks so causal rows (cheap first, dear last) balance.
            let chunks: Vec<Vec<usize>> = (0..threads)
                .map(|t| (t..nqb).step_by(threads).collect())
                .collect();
            std::thread::scope(|s| {
                let handles: Vec<_> = chunks
                    .iter()
                    .map(|c| {
                        let count_blocks = &count_blocks;
                        s.spawn(move || c.iter().map(|&qb| count_blocks(qb..qb + 1)).sum::<u64>())
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("pair-counting thread panicked"))
                    .sum()
            })
        };
    }
    let total = if per_row {
        total
    } else {
        total * inputs.batch as u64
    };
    total / heads as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs;

    fn spec(src: &str) -> MixerSpec {
        mixc_dsl::parse_str(src).expect("valid spec")
    }

    /// Brute-force count over all pairs, the definition the fast count must match.
    fn brute(spec: &MixerSpec, inputs: &MixerInputs) -> u64 {
        let mut names = Vec::new();
        spec.mask.segment_inputs(&mut names);
        let mut n = 0u64;
        let lookup = |name: &str, idx: &[i64]| inputs.extra[name].get_clamped(idx);
        for b in 0..inputs.batch {
            let seg = |name: &str, p: i64| inputs.extra[name].get_clamped(&[b as i64, p]) as i64;
            let q0 = inputs.q_offset as i64;
            for h in 0..spec.heads as i64 {
                for i in q0..q0 + inputs.seq as i64 {
                    for j in 0..inputs.kv_seq as i64 {
                        let mut env = inputs.eval_env(spec.heads, &lookup);
                        (env.b, env.h, env.i, env.j) = (b as i64, h, i, j);
                        n += u64::from(spec.mask.allows(&env, &seg));
                    }
                }
            }
        }
        n / spec.heads as u64
    }

    #[test]
    fn useful_pairs_match_brute_force_for_every_mask_kind() {
        let masks = [
            "all",
            "causal",
            "causal && window(37)",
            "prefix_lm(50)",
            "block_sparse(block = 16, local = 2, global = 1)",
            "causal && (window(20) || dilated(3))",
        ];
        for m in masks {
            let s = spec(&format!(
                "mixer m {{ heads = 2; head_dim = 8; score = dot(q, k); mask = {m}; norm = softmax; }}"
            ));
            // 203: not a multiple of the 64-wide tiles, so ragged tiles are covered.
            let inputs = inputs::random_inputs(&s, 2, 203, 1);
            assert_eq!(
                useful_pairs_per_head(&s, &inputs),
                brute(&s, &inputs),
                "mask {m}"
            );
            // Decode and prefill-chunk shapes: queries at the end, and inside.
            for (seq, kv_seq, offset) in [(1, 203, 202), (37, 300, 263), (70, 300, 100)] {
                let x = inputs::random_inputs_kv(&s, 1, seq, kv_seq, 1).with_q_offset(offset);
                assert_eq!(
                    useful_pairs_per_head(&s, &x),
                    brute(&s, &x),
                    "mask {m} {seq}x{kv_seq}"
                );
            }
        }
        // Causal has a closed form too.
        let s = spec("mixer c { heads = 1; head_dim = 8; score = dot(q, k); mask = causal; norm = softmax; }");
        let inputs = inputs::random_inputs(&s, 1, 4096, 0);
        assert_eq!(useful_pairs_per_head(&s, &inputs), 4096 * 4097 / 2);
    }

    #[test]
    fn useful_pairs_use_each_batch_rows_segments() {
        let s = spec(
            "mixer d { heads = 1; head_dim = 8; input doc: i32[batch, seq]; score = dot(q, k); \
             mask = causal && segment(doc); norm = softmax; }",
        );
        let inputs = inputs::random_inputs(&s, 3, 300, 7);
        let fast = useful_pairs_per_head(&s, &inputs);
        assert_eq!(fast, brute(&s, &inputs));
        // Documents cut the causal triangle, so fewer pairs than plain causal.
        assert!(fast < 3 * 300 * 301 / 2, "{fast}");
    }
}
