//! `mixc run BLOCK.mix`: one forward (and with --grad one training step)
//! of a transformer block, blockwise on the CPU backend, checked against
//! the f64 unfused block with --check. The behaviour is the library's
//! [`mixc::runtime::block::Block`]; this file parses flags and prints.

use anyhow::{bail, Context, Result};
use mixc::dsl::BlockSpec;
use mixc::runtime::block::{
    random_block_inputs, random_block_upstream, Block, BlockCheck, BlockWeights, DEFAULT_BLOCK_ROWS,
};
use mixc::runtime::{io, Tensor};
use mixc::{Device, Options};
use serde_json::json;
use std::process::ExitCode;

use super::run::{parse_sharding, resolve_backend, with_spinner, Args, Backend, Resolved};
use crate::report;

/// One line per compared tensor group: `out 1.2e-6`, or the worst gradients.
fn describe(c: &BlockCheck) -> String {
    let mut errors = c.errors.clone();
    errors.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shown: Vec<String> = errors
        .iter()
        .take(3)
        .map(|(n, e)| format!("{n} {e:.1e}"))
        .collect();
    let more = errors.len().saturating_sub(3);
    format!(
        "max relative error {:.3e} ({}{}) vs the f64 unfused block (tolerance {:.0e})",
        c.max_rel_error(),
        shown.join(", "),
        if more > 0 {
            format!(", {more} more below")
        } else {
            String::new()
        },
        c.tolerance
    )
}

pub fn main(args: &Args, spec: BlockSpec) -> Result<ExitCode> {
    let file = args.file.display();
    for (set, flag) in [
        (args.kv_seq.is_some(), "--kv-seq"),
        (args.q_offset.is_some(), "--q-offset"),
        (!args.set.is_empty(), "--set"),
        (args.dtype.is_some(), "--dtype"),
        (args.inputs.is_some(), "--inputs"),
    ] {
        if set {
            bail!(
                "{flag} does not apply to a block file ({file} defines block `{}`)",
                spec.name
            );
        }
    }
    if args.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    // Blocks run on the CPU (blockwise) and reference backends; `auto`
    // picks the CPU even where a GPU is usable.
    let backend = match args.backend {
        Backend::Auto => Resolved::Cpu,
        b => resolve_backend(b, args.json)?,
    };
    let device = match backend {
        Resolved::Reference => Device::Reference,
        Resolved::Cpu => Device::Cpu,
        Resolved::Cuda => Device::Cuda(0),
    };
    let options = Options {
        device,
        ranks: args.ranks,
        sharding: parse_sharding(args.sharding.as_deref()),
        ..Options::default()
    };
    let rows = args.block_rows.unwrap_or(DEFAULT_BLOCK_ROWS);
    if rows == 0 {
        bail!("--block-rows must be at least 1");
    }
    let block = Block::new(&spec, options)?.with_block_rows(rows);
    let seq = args.seq.context("--seq is required")?;
    if seq == 0 || args.batch == 0 {
        bail!("--seq and --batch must be at least 1");
    }
    if args.ranks > seq {
        bail!("--ranks {} must be between 1 and --seq {seq}", args.ranks);
    }
    let estimate = block.train_host_bytes(args.batch, seq)?;
    mixc::runtime::memory::admit_host(estimate)?;
    let weights = match &args.weights {
        Some(path) => BlockWeights::load(path, &spec, &args.weights_prefix)?,
        None => BlockWeights::random(&spec, args.seed),
    };
    let inputs = random_block_inputs(&spec, args.batch, seq, args.seed);
    let what = format!(
        "running block {} on {}: batch {} x seq {seq}",
        spec.name,
        backend.name(),
        args.batch
    );
    let (out, backward) = with_spinner(&what, args.json, || -> Result<_> {
        if args.grad {
            let d_out = random_block_upstream(&spec, args.batch, seq, args.seed);
            let (out, saved) = block.forward_train(&inputs, &weights)?;
            let back = block.backward(&inputs, &weights, &saved, &d_out)?;
            Ok((out, Some((d_out, back))))
        } else {
            Ok((block.forward(&inputs, &weights)?, None))
        }
    })?;
    let check = match args.check {
        Some(_) => Some(with_spinner("check: f64 unfused block", args.json, || {
            block.check(&inputs, &weights, &out.out)
        })?),
        None => None,
    };
    let grad_check = match (&backward, &args.check) {
        (Some((d_out, back)), Some(_)) => Some(with_spinner(
            "check: f64 unfused block gradients",
            args.json,
            || block.check_gradients(&inputs, &weights, d_out, &back.grads),
        )?),
        _ => None,
    };
    let failed = check.iter().chain(&grad_check).any(|c| !c.passed());
    let save_path = args.save.as_ref().map(|p| {
        if failed {
            super::run::failed_name(p)
        } else {
            p.clone()
        }
    });
    if let Some(path) = &save_path {
        // The weights under their own names, so the file feeds back in
        // with --weights.
        let mut named: Vec<(String, &Tensor<f32>)> =
            vec![("x".into(), &inputs.x), ("out".into(), &out.out)];
        named.extend(weights.tensors.iter().map(|(n, t)| (n.clone(), t)));
        if let Some((d_out, back)) = &backward {
            named.push(("dout".into(), d_out));
            named.extend(
                back.grads
                    .named()
                    .into_iter()
                    .map(|(n, t)| (format!("grad.{n}"), t)),
            );
        }
        io::save_named(path, named.iter().map(|(n, t)| (n.as_str(), *t)))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let tokens = (args.batch * seq) as f64;
    if args.json {
        let errors = |c: &BlockCheck| {
            c.errors
                .iter()
                .cloned()
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        println!(
            "{}",
            json!({
                "block": spec.name,
                "mixer": spec.mixer.name,
                "summary": spec.summary(),
                "backend": backend.name(),
                "batch": args.batch,
                "seq": seq,
                "width": spec.width,
                "hidden": spec.ffn.hidden,
                "parameters": spec.parameter_count(),
                "ranks": args.ranks,
                "block_rows": block.block_rows(),
                "seconds": out.seconds,
                "forward_seconds": out.seconds,
                "backward_seconds": backward.as_ref().map(|(_, b)| b.seconds),
                "tokens_per_s": tokens / out.seconds,
                "peak_rss_bytes": report::peak_rss_bytes(),
                "train_host_bytes_estimate": estimate,
                "max_rel_error": check.as_ref().map(|c| c.max_rel_error()),
                "tolerance": check.as_ref().map(|c| c.tolerance),
                "grad_errors": grad_check.as_ref().map(errors),
                "grad_tolerance": grad_check.as_ref().map(|c| c.tolerance),
                "saved": save_path.as_ref().map(|p| p.display().to_string()),
            })
        );
    } else {
        println!(
            "block {} ({}) on {}: batch {} x seq {seq} in {:.3} s ({:.0} tokens/s)",
            spec.name,
            spec.summary(),
            backend.name(),
            args.batch,
            out.seconds,
            tokens / out.seconds
        );
        if let Some((_, b)) = &backward {
            println!(
                "backward: x and {} weights in {:.3} s",
                b.grads.weights.len(),
                b.seconds
            );
        }
        if let Some(c) = &check {
            println!("check: {}", describe(c));
        }
        if let Some(c) = &grad_check {
            println!("check (gradients): {}", describe(c));
        }
        if let Some(p) = &save_path {
            println!("wrote {}", p.display());
        }
    }
    if let Some(c) = check.iter().chain(&grad_check).find(|c| !c.passed()) {
        if c.non_finite > 0 {
            eprintln!(
                "error: --check failed: {} NaN or infinite value(s)",
                c.non_finite
            );
        } else {
            eprintln!(
                "error: --check failed: relative error above {:.0e}",
                c.tolerance
            );
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
