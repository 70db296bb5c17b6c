//! Random masks (primitives combined with && / ||) on the softmax and sum
//! paths: the blocked CPU backend, whatever tiles it skips or marks full,
//! equals the reference for random ring sizes and tilings.

mod cpu_support;

use cpu_support::*;
use mixc_dsl::ir::*;
use mixc_runtime::cpu::{self, CpuConfig, Precision, Sharding};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::reference;
use proptest::prelude::*;

fn arb_mask() -> impl Strategy<Value = Mask> {
    let leaf = prop_oneof![
        Just(Mask::All),
        Just(Mask::Causal),
        (0u64..30).prop_map(|size| Mask::Window { size }),
        (0u64..40).prop_map(|prefix| Mask::PrefixLm { prefix }),
        (1u64..12, 0u64..3, 0u64..2).prop_map(|(block, local, global)| Mask::BlockSparse {
            block,
            local,
            global
        }),
        (1u64..6).prop_map(|rate| Mask::Dilated { rate }),
        Just(Mask::Segment {
            input: "doc".into()
        }),
    ];
    leaf.prop_recursive(3, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Mask::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| Mask::Or(Box::new(a), Box::new(b))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_masks_match_the_reference(
        mask in arb_mask(),
        seq in 1usize..70,
        ranks in 1usize..5,
        zigzag in any::<bool>(),
        bm in 1usize..20,
        bn in 1usize..20,
        softmax in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let mut spec = example_specs().into_iter().find(|s| s.name == "document_mask").unwrap();
        spec.mask = mask;
        if !softmax {
            spec.norm = Norm::Sum { eps: 1e-3 };
            spec.score = Score::Dot { q_map: FeatureMap::Elu1, k_map: FeatureMap::Elu1, scale: 0.25 };
            spec.family = Family::Linear;
        }
        let inputs = random_inputs(&spec, 2, seq, seed);
        let want = reference::evaluate(&spec, &inputs).unwrap();
        let cfg = CpuConfig {
            ranks: ranks.min(seq),
            sharding: if zigzag { Sharding::Zigzag } else { Sharding::Contiguous },
            block_m: bm,
            block_n: bn,
            chunk: 8,
            threads: 2,
            precision: Precision::F64,
        };
        let got = cpu::run(&spec, &inputs, &cfg).unwrap().output.to_f64();
        let err = rel_err(&got, &want);
        prop_assert!(err <= F64_TOL, "{:?}: rel err {err:e}", spec.mask);
    }
}

/// Mask extents far beyond the sequence (`window(2^63 - 1)` once made the
/// CPU backend output zeros from overflow in its block-range arithmetic)
/// act as the whole sequence: the output equals the reference's, over rings
/// and both block shapes.
#[test]
fn huge_mask_extents_match_the_reference() {
    for mask in [
        "causal && window(9223372036854775807)",
        "window(18446744073709551615)",
        "prefix_lm(9223372036854775807)",
        "causal && (window(64) || dilated(18446744073709551615))",
        "block_sparse(block = 9223372036854775807, local = 1, global = 1)",
    ] {
        let spec = mixc_dsl::parse_str(&format!(
            "mixer m {{ heads = 2; head_dim = 16; dtype = f32; score = dot(q, k); mask = {mask}; norm = softmax; }}"
        ))
        .unwrap();
        let inputs = random_inputs(&spec, 1, 150, 3);
        let want = reference::evaluate(&spec, &inputs).unwrap();
        for ranks in [1, 3] {
            let cfg = CpuConfig {
                ranks,
                sharding: Sharding::Zigzag,
                block_m: 32,
                block_n: 16,
                chunk: 8,
                threads: 2,
                precision: Precision::F64,
            };
            let got = cpu::run(&spec, &inputs, &cfg).unwrap().output.to_f64();
            let err = rel_err(&got, &want);
            assert!(err <= F64_TOL, "{mask} R={ranks}: rel err {err:e}");
            assert!(
                want.data.iter().any(|x| *x != 0.0),
                "{mask}: an all-zero reference"
            );
        }
    }
}
