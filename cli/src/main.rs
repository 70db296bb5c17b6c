//! The `mixc` command line: check, gen, compile, run, tune, bench.
//! Every command exits non-zero with a clear message on bad input.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod commands;
mod report;

#[derive(Parser)]
#[command(
    name = "mixc",
    version,
    about = "Token-mixer specs compiled to tiled GPU kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate spec files; print diagnostics for the invalid ones.
    Check(commands::check::Args),
    /// Print or write the CUDA source generated for a spec.
    Gen(commands::gen::Args),
    /// Compile a spec's kernels with NVRTC (cached) and report resource use.
    Compile(commands::compile::Args),
    /// Run a mixer on random or given inputs and report time and throughput.
    Run(commands::run::Args),
    /// Time a spec's tile configurations, print the best and cache the winner.
    Tune(commands::tune::Args),
    /// Time specs over a grid of sequence lengths and dtypes (median of reps).
    Bench(commands::bench::Args),
}

fn main() -> ExitCode {
    // `mixc ... | head` closes stdout early; die quietly like other Unix tools
    // instead of panicking in `println!` (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any
    // thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A CPU run allocates its shards and accumulators afresh per call
    // (megabytes each); glibc would map them with mmap and unmap them on
    // free, so every call of `bench` (or a `tune` candidate) paid a page
    // fault per 4 KiB again: up to a third of a 1k-token forward. Keep freed
    // memory in the heap for the next call instead (peak memory unchanged).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: tuning the allocator before any allocation-heavy work or thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    // SIGINT / SIGTERM (and SIGHUP) in the middle of a `--save` would leave
    // the save's temporary file (often hundreds of megabytes) beside its
    // target: remove it, then exit as an interrupted program does.
    if let Err(e) = ctrlc::set_handler(|| {
        mixc::runtime::io::remove_unfinished_saves();
        std::process::exit(130);
    }) {
        eprintln!("warning: cannot install the interrupt handler ({e}); an interrupted --save may leave a temporary file");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(a) => commands::check::main(a),
        Command::Run(a) => commands::run::main(a),
        Command::Tune(a) => commands::tune::main(a),
        Command::Bench(a) => commands::bench::main(a),
        Command::Gen(a) => commands::gen::main(a),
        Command::Compile(a) => commands::compile::main(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}{}", render(&e), advice(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text
/// the message already ends with (a library error that prints its own
/// source, e.g. an I/O error, would otherwise say it twice).
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// What to do instead, in CLI terms, for library errors that have a way
/// around on another backend (the library itself names no flags).
fn advice(e: &anyhow::Error) -> &'static str {
    match e.downcast_ref::<mixc::Error>() {
        Some(mixc::Error::NoGpu { .. }) => {
            "; use --backend cpu (or --backend auto, which falls back to the CPU backend)"
        }
        Some(mixc::Error::OutOfMemory { device, .. }) if device == "host" => {
            "; lower --seq or --batch, or --set fewer heads"
        }
        Some(mixc::Error::OutOfMemory { .. }) => {
            "; lower --seq or --batch, spread the ring over more GPUs, or use --backend cpu"
        }
        Some(e) if e.is_gpu_specific() => "; use --backend cpu",
        _ => "",
    }
}
