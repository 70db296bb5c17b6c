//! What `check` says runs on CUDA does: every example plus the language's
//! newer constructs (conditions, `select`, `sin`/`cos`/`sigmoid`, `int`,
//! `div`, `b`, `seq`, `kv_seq`, expression masks, tables in masks), and
//! linear-family specs the CUDA generator refuses. For each one and each of
//! sm_80 / sm_90, `capabilities::matrix` either names a reason, or the
//! default-config kernels (forward, and the softmax backward where the
//! matrix says it runs there) generate and compile with NVRTC with no spill
//! and no stack frame.

use mixc_codegen::{Arch, KernelConfig, Target};
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::mixer::capabilities;
use mixc_runtime::nvrtc;
use rayon::prelude::*;

/// Each construct of the language in a spec of its own (softmax and the
/// other families), as a user would write them.
const SPECS: &[&str] = &[
    "transform = s * 2.0;",
    "transform = s * s;",
    "mask = j < i;",
    "mask = i <= j;",
    "bias = i - j; mask = causal;",
    "bias = (j - i) * pow(2.0, -(h + 1) * 8.0 / 4.0);",
    "input off: f32[heads]; transform = s * off[h];",
    "transform = sin(cos(s)) + sin(1.0 * b) / cos(1.0 * b);",
    "mask = i + 3 >= j;",
    "input prefix: f32[batch]; mask = j <= int(prefix[b]) || j <= i;",
    "input doc: f32[batch, seq]; mask = j <= i && doc[b][i] == doc[b][j];",
    "transform = 0.5 * tanh(s / 0.5);",
    "input bh: f32[batch, heads]; bias = bh[b][h]; mask = causal;",
    "mask = j <= i && i - j < 8 * (h + 1);",
    "mask = (i - j) % 4 == 0;",
    "input rel: f32[heads, 16]; bias = rel[h][if abs(i - j) < 8 { abs(i - j) } \
     else { min(8 + int(log(abs(i - j) / 8.0) / log(16.0) * 8.0), 15) }];",
    "bias = -log(1.0 * kv_seq); mask = j <= i || j >= seq - 4;",
    "input flag: f32[batch, seq]; mask = j <= i && (flag[b][j] > 0.5 || i - j < 4);",
    "input am: f32[batch, seq]; bias = am[b][j];",
    "mask = j <= i && div(i, 16) == div(j, 16);",
    "input bm: f32[batch, heads, 64, 64]; mask = bm[b][h][div(i, 64)][div(j, 64)] > 0.5;",
    // Other families: a condition mask or a bias is refused on CUDA (with a
    // reason), plain causal runs.
    "score = dot(elu1(q), elu1(k)); mask = j <= i && i - j < 64; norm = sum;",
    "score = dot(elu1(q), elu1(k)); mask = causal; bias = 0.1 * (i - j); norm = sum;",
    "score = dot(q, k); decay = 0.9; mask = j < i; norm = none;",
    "score = dot(q, k); decay = 0.9; mask = causal; norm = none;",
];

fn specs() -> Vec<MixerSpec> {
    let mut v: Vec<MixerSpec> = SPECS
        .iter()
        .enumerate()
        .map(|(n, items)| {
            let src = format!("mixer s{n} {{ heads = 8; kv_heads = 4; head_dim = 64; {items} }}");
            mixc_dsl::parse_str(&src).unwrap_or_else(|e| panic!("{src}: {e}"))
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "mix") {
            v.push(mixc_dsl::parse_file(&p).unwrap());
        }
    }
    v
}

#[test]
fn what_check_says_runs_on_cuda_compiles_without_spills() {
    if let Err(e) = nvrtc::nvrtc_info() {
        panic!("this test compiles kernels with NVRTC, which is not available: {e}");
    }
    let specs = specs();
    let mut jobs = Vec::new();
    let mut refused = 0;
    for spec in &specs {
        for s in capabilities::matrix(spec) {
            let arch = match s.target.as_str() {
                "cuda sm_80" => Arch::Sm80,
                "cuda sm_90" => Arch::Sm90,
                _ => continue,
            };
            match &s.unsupported {
                Some(why) => {
                    // A reason in the spec's terms, naming what is not lowered.
                    assert!(why.len() > 20, "{}: {why}", spec.name);
                    refused += 1;
                }
                None => {
                    jobs.push((spec, arch, false));
                    if s.backward_unsupported.is_none() && spec.family == mixc_dsl::Family::Softmax
                    {
                        jobs.push((spec, arch, true));
                    }
                }
            }
        }
    }
    // The linear-family specs with conditions or a bias are refused.
    assert!(refused >= 4, "{refused}");
    let results: Vec<(String, Option<(u32, u32)>)> = jobs
        .par_iter()
        .map(|&(spec, arch, backward)| {
            let target = Target::new(arch, spec.dtype);
            let what = format!(
                "{} {arch}{}",
                spec.name,
                if backward { " backward" } else { "" }
            );
            let g = if backward {
                let cfg = KernelConfig::backward_default_for(spec, &target);
                mixc_codegen::generate_backward(spec, &target, &cfg)
            } else {
                mixc_codegen::generate_default(spec, &target)
            }
            .unwrap_or_else(|e| panic!("{what}: supported, yet: {e}"));
            let m = nvrtc::compile_with_cache(&g.kernels[0].name, &g.source, arch, None)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let worst = g
                .kernels
                .iter()
                .map(|k| {
                    let r = m
                        .resources_of(&k.name)
                        .unwrap_or_else(|| panic!("{what}: no report for {}", k.name));
                    (r.spill_stores, r.stack_frame)
                })
                .max()
                .unwrap();
            (what, (worst != (0, 0)).then_some(worst))
        })
        .collect();
    let spilled: Vec<String> = results
        .iter()
        .filter_map(|(w, s)| s.map(|(st, fr)| format!("{w}: {st} spill stores, {fr} B stack")))
        .collect();
    eprintln!(
        "{} kernels compiled, {} refused with a reason; spills: {spilled:#?}",
        results.len(),
        refused
    );
    assert!(spilled.is_empty(), "kernels spill: {spilled:#?}");
}
