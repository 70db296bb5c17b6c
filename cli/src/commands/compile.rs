use anyhow::Result;
use mixc::runtime::nvrtc;
use serde_json::json;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: super::gen::TargetArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<ExitCode> {
    let (spec, g) = args.target.generate()?;
    let compiled = nvrtc::compile_generated(&g)?;
    let kernels: Vec<_> = g
        .kernels
        .iter()
        .map(|k| {
            let r = compiled.resources_of(&k.name);
            json!({
                "name": k.name,
                "threads_per_block": k.threads_per_block,
                "dynamic_smem_bytes": k.dynamic_smem_bytes,
                "needs_smem_opt_in": k.needs_smem_opt_in,
                "registers": r.map(|r| r.registers),
                "static_smem_bytes": r.map(|r| r.smem_bytes),
                "stack_frame_bytes": r.map(|r| r.stack_frame),
                "spill_stores_bytes": r.map(|r| r.spill_stores),
                "spill_loads_bytes": r.map(|r| r.spill_loads),
            })
        })
        .collect();
    // A corrupt entry rebuilt, or a cache that could not be written.
    if let Some(note) = &compiled.cache_note {
        eprintln!("warning: {note}");
    }
    if args.json {
        println!(
            "{}",
            json!({
                "spec": spec.name, "family": spec.family.name(), "arch": args.target.arch,
                "dtype": g.target.dtype.name(), "config": g.config.describe(),
                "cubin_bytes": compiled.cubin.len(), "compile_ms": compiled.compile_ms,
                "cache_hit": compiled.cache_hit, "cache_note": compiled.cache_note,
                "kernels": kernels,
            })
        );
    } else {
        println!(
            "{} ({}) for {} {}: {} byte cubin, {} {:.1} ms{} [{}]",
            spec.name,
            spec.family.name(),
            args.target.arch,
            g.target.dtype,
            compiled.cubin.len(),
            if compiled.cache_hit {
                "cache hit (its cold compile took"
            } else {
                "compiled in"
            },
            compiled.compile_ms,
            if compiled.cache_hit { ")" } else { "" },
            g.config.describe()
        );
        for k in &kernels {
            println!(
                "  {}: {} regs, {} B dynamic smem{}, {} B static smem, {} B stack, {} B spill stores",
                k["name"].as_str().unwrap_or("?"),
                k["registers"],
                k["dynamic_smem_bytes"],
                if k["needs_smem_opt_in"] == true { " (opt-in)" } else { "" },
                k["static_smem_bytes"],
                k["stack_frame_bytes"],
                k["spill_stores_bytes"],
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
