use anyhow::{Context, Result};
use mixc::codegen::{generate, Arch, KernelConfig, Target};
use mixc::dsl::{DType, MixerSpec};
use std::path::PathBuf;
use std::process::ExitCode;

/// Target selection shared by `gen` and `compile`.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// Spec file (`.mix`).
    pub file: PathBuf,
    /// GPU architecture: sm_80 (Ampere) or sm_90 (Hopper).
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
    /// Storage dtype of q/k/v/o (default: the spec's).
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    pub dtype: Option<String>,
    /// Tile configuration overrides, e.g. `--config block_m=64 --config block_n=32`.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
}

impl TargetArgs {
    /// Loads the spec and lowers it to CUDA source.
    pub fn generate(&self) -> Result<(MixerSpec, mixc::codegen::GeneratedKernel)> {
        let spec = super::load_spec(&self.file)?;
        let arch = Arch::parse(&self.arch)?;
        let dtype = match &self.dtype {
            Some(d) => DType::parse(d).context("unknown dtype")?,
            None => spec.dtype,
        };
        let target = Target::new(arch, dtype);
        let cfg = KernelConfig::default_for(&spec, &target).with_overrides(&self.config)?;
        let g = generate(&spec, &target, &cfg)?;
        Ok((spec, g))
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: TargetArgs,
    /// Write the source here instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn main(args: Args) -> Result<ExitCode> {
    let (_, g) = args.target.generate()?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, &g.source)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} ({} bytes, template {})",
                path.display(),
                g.source.len(),
                g.template
            );
        }
        None => print!("{}", g.source),
    }
    Ok(ExitCode::SUCCESS)
}
