//! A fuzz target over the CLI's flags and input files: random command
//! lines of `mixc run`, `check`, `gen` and `compile` built from every flag
//! with values that are valid, malformed, out of range or at the integer
//! limits, over example specs, block files and broken files (random bytes,
//! truncated safetensors, empty, missing, a directory), the inputs files
//! made by a real run and then damaged.
//!
//! Every invocation must end by itself (60 s) with exit code 0, 1 (an
//! error, said in words) or 2 (a usage error), never a panic, a signal or
//! a backtrace, and must leave the scratch folder's guard file alone.
//!
//! The suite runs it for `MIXC_CLI_FUZZ_SECS` seconds (default 15) from a
//! seed that changes every run (`MIXC_CLI_FUZZ_SEED` repeats one); a
//! failure prints the seed and the command line. Longer runs:
//! `MIXC_CLI_FUZZ_SECS=600 cargo test -p mixc-cli --test cli_fuzz`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;

fn pick<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.gen_range(0..xs.len())]
}

/// Values an integer flag gets: small valid ones, zero, negatives, junk,
/// and the limits.
const INTS: &[&str] = &[
    "1",
    "2",
    "3",
    "7",
    "17",
    "64",
    "0",
    "-1",
    "abc",
    "",
    "1e3",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
];

struct Files {
    dir: PathBuf,
    guard: PathBuf,
    specs: Vec<String>,
    inputs: Vec<String>,
}

fn files() -> Files {
    let dir = common::scratch("cli_fuzz", "x")
        .parent()
        .unwrap()
        .to_path_buf();
    let p = |n: &str| dir.join(n).display().to_string();
    std::fs::write(dir.join("garbage.mix"), b"\x00\xff mixer { heads = ; }}}").unwrap();
    std::fs::write(dir.join("empty.mix"), b"").unwrap();
    std::fs::write(
        dir.join("random.bin"),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
    std::fs::create_dir_all(dir.join("a_dir")).unwrap();
    let guard = dir.join("guard.txt");
    std::fs::write(&guard, b"keep me").unwrap();
    // A real inputs file, then damaged copies of it.
    let good = dir.join("good.safetensors");
    let out = common::mixc(&[
        "run",
        "examples/document_mask.mix",
        "--backend",
        "cpu",
        "--seq",
        "9",
        "--set",
        "heads=4",
        "--set",
        "kv_heads=2",
        "--save",
        good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::text(&out));
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(dir.join("truncated.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let mut flipped = bytes.clone();
    for i in (8..flipped.len()).step_by(97) {
        flipped[i] ^= 0x5a;
    }
    std::fs::write(dir.join("flipped.safetensors"), flipped).unwrap();
    let mut specs: Vec<String> = common::examples()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    specs.push("examples/blocks/llama_block.mix".into());
    for n in [
        "garbage.mix",
        "empty.mix",
        "random.bin",
        "missing.mix",
        "a_dir",
    ] {
        specs.push(p(n));
    }
    specs.push("/dev/null".into());
    let inputs = [
        "good.safetensors",
        "truncated.safetensors",
        "flipped.safetensors",
        "empty.safetensors",
        "random.bin",
        "missing.safetensors",
        "a_dir",
    ]
    .iter()
    .map(|n| p(n))
    .chain(["/dev/null".to_string()])
    .collect();
    Files {
        dir,
        guard,
        specs,
        inputs,
    }
}

fn command_line(rng: &mut ChaCha8Rng, f: &Files) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let cmd = pick(
        rng,
        &["run", "run", "run", "run", "check", "gen", "compile"],
    );
    a.push(cmd.into());
    a.push(f.specs[rng.gen_range(0..f.specs.len())].clone());
    let flag = |a: &mut Vec<String>, name: &str, value: Option<String>| {
        a.push(name.into());
        if let Some(v) = value {
            a.push(v);
        }
    };
    match cmd {
        "run" => {
            // Keep actual work small: --seq from the pool, or --varlen, or --inputs.
            match rng.gen_range(0..4) {
                0 | 1 => flag(&mut a, "--seq", Some(pick(rng, INTS).into())),
                2 => {
                    let n = rng.gen_range(1..5);
                    let lens: Vec<&str> = (0..n)
                        .map(|_| pick(rng, &["0", "1", "5", "33", "x", "-2"]))
                        .collect();
                    flag(&mut a, "--varlen", Some(lens.join(",")));
                }
                _ => flag(
                    &mut a,
                    "--inputs",
                    Some(f.inputs[rng.gen_range(0..f.inputs.len())].clone()),
                ),
            }
            if rng.gen_bool(0.6) {
                flag(
                    &mut a,
                    "--backend",
                    Some(pick(rng, &["cpu", "cpu", "reference", "auto", "cuda", "tpu"]).into()),
                );
            } else {
                flag(&mut a, "--backend", Some("cpu".into()));
            }
            let extras: [(&str, &[&str]); 9] = [
                ("--kv-seq", INTS),
                ("--q-offset", INTS),
                ("--batch", INTS),
                ("--ranks", INTS),
                ("--seed", INTS),
                ("--sharding", &["zigzag", "contiguous", "diagonal"]),
                ("--dtype", &["f16", "bf16", "f32", "f64"]),
                (
                    "--set",
                    &[
                        "heads=2",
                        "kv_heads=1",
                        "head_dim=8",
                        "value_dim=4",
                        "heads=0",
                        "heads=99999999999",
                        "kv_heads=3",
                        "nonsense",
                        "heads=",
                        "=2",
                    ],
                ),
                ("--block-rows", INTS),
            ];
            for (name, values) in extras {
                if rng.gen_bool(0.3) {
                    flag(&mut a, name, Some(pick(rng, values).into()));
                }
            }
            // Small heads keep the reference quick.
            if rng.gen_bool(0.7) {
                flag(&mut a, "--set", Some("heads=2".into()));
                flag(&mut a, "--set", Some("kv_heads=1".into()));
            }
            if rng.gen_bool(0.3) {
                a.push("--check".into());
                if rng.gen_bool(0.3) {
                    a.push(pick(rng, &["full", "sample", "bogus"]).into());
                }
            }
            for b in ["--grad", "--json"] {
                if rng.gen_bool(0.3) {
                    a.push(b.into());
                }
            }
            if rng.gen_bool(0.2) {
                let target = pick(
                    rng,
                    &["out.safetensors", "a_dir", "sub/none/out.safetensors"],
                );
                flag(
                    &mut a,
                    "--save",
                    Some(f.dir.join(target).display().to_string()),
                );
            }
        }
        "gen" | "compile" => {
            for (name, values) in [
                ("--arch", &["sm_80", "sm_90", "sm_75", ""][..]),
                ("--dtype", &["f16", "bf16", "f32", "int8"][..]),
                (
                    "--config",
                    &[
                        "block_m=64",
                        "block_n=32",
                        "block_m=99999999999",
                        "block_m=-1",
                        "x",
                        "block_m=3",
                    ][..],
                ),
            ] {
                if rng.gen_bool(0.4) {
                    flag(&mut a, name, Some(pick(rng, values).into()));
                }
            }
        }
        _ => {
            if rng.gen_bool(0.5) {
                a.push("--json".into());
            }
        }
    }
    if rng.gen_bool(0.05) {
        a.push(pick(rng, &["--no-such-flag", "--seq", "extra-positional"]).into());
    }
    a
}

/// Runs `args` with a deadline; the exit code, or why there is none.
fn run(args: &[String]) -> Result<(i32, String), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixc"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("MIXC_CACHE_DIR", common::scratch("cli_fuzz", "cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return match status.code() {
                Some(c) => Ok((c, text)),
                None => Err(format!("killed by a signal ({status}): {text}")),
            };
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return Err("still running after 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_command_lines_never_crash() {
    let f = files();
    let secs = env_u64("MIXC_CLI_FUZZ_SECS").unwrap_or(15);
    let seed = env_u64("MIXC_CLI_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0usize;
    let mut codes = [0usize; 3];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|w| {
                let f = &f;
                s.spawn(move || {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(w));
                    let mut seen = Vec::new();
                    while Instant::now() < deadline {
                        let args = command_line(&mut rng, f);
                        let shown = format!("mixc {}", args.join(" "));
                        match run(&args) {
                            Ok((code, text)) => {
                                assert!(
                                    (0..=2).contains(&code),
                                    "seed {seed}: `{shown}` exited {code}:\n{text}"
                                );
                                assert!(
                                    !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
                                    "seed {seed}: `{shown}` panicked:\n{text}"
                                );
                                if code != 0 {
                                    assert!(
                                        !text.trim().is_empty(),
                                        "seed {seed}: `{shown}` failed without saying why:\n{text}"
                                    );
                                }
                                seen.push(code as usize);
                            }
                            Err(why) => panic!("seed {seed}: `{shown}`: {why}"),
                        }
                        assert_eq!(
                            std::fs::read(&f.guard).unwrap(),
                            b"keep me",
                            "seed {seed}: `{shown}` touched the guard file"
                        );
                    }
                    seen
                })
            })
            .collect();
        for w in workers {
            for c in w.join().expect("a fuzz worker failed") {
                cases += 1;
                codes[c] += 1;
            }
        }
    });
    eprintln!(
        "cli fuzz: {cases} command lines in {secs} s from seed {seed} (exit 0: {}, 1: {}, 2: {})",
        codes[0], codes[1], codes[2]
    );
    assert!(cases >= 20, "only {cases} command lines ran");
    assert!(
        codes[0] > 0 && codes[1] > 0,
        "the mix of outcomes is too narrow: {codes:?}"
    );
}
