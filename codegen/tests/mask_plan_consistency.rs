//! The kernels classify tiles with the C++ primitives of `templates/mask.cuh`,
//! composed by `mask::lower_mask`; the CPU backend uses `plan::classify` and
//! `plan::key_hull`. This test compiles the lowered expressions with the host
//! C++ compiler and checks both sides agree on every tile of many shapes.

mod support;

use mixc_codegen::expr::LowerEnv;
use mixc_codegen::mask::{lower_mask, lower_mask_with, MaskExprs, MaskNames};
use mixc_codegen::plan::{classify, key_hull, BlockClass, NoSegments};
use mixc_dsl::ir::Mask;
use std::io::Write;
use std::process::{Command, Stdio};

fn and(a: Mask, b: Mask) -> Mask {
    Mask::And(Box::new(a), Box::new(b))
}
fn or(a: Mask, b: Mask) -> Mask {
    Mask::Or(Box::new(a), Box::new(b))
}

/// Closed-form masks (no segment ids): the examples' plus combinations.
fn masks() -> Vec<Mask> {
    let mut v: Vec<Mask> = support::example_specs()
        .into_iter()
        .map(|s| s.mask)
        .filter(|m| {
            let mut segs = vec![];
            m.segment_inputs(&mut segs);
            segs.is_empty()
        })
        .collect();
    v.extend([
        Mask::Window { size: 7 },
        Mask::Window { size: 0 },
        Mask::Dilated { rate: 3 },
        Mask::Dilated { rate: 1 },
        Mask::PrefixLm { prefix: 21 },
        Mask::BlockSparse {
            block: 8,
            local: 1,
            global: 0,
        },
        Mask::BlockSparse {
            block: 5,
            local: 0,
            global: 2,
        },
        Mask::BlockSparse {
            block: 16,
            local: 3,
            global: 1,
        },
        and(Mask::Causal, Mask::Window { size: 13 }),
        or(Mask::PrefixLm { prefix: 9 }, Mask::Window { size: 4 }),
        and(
            Mask::Causal,
            or(Mask::Window { size: 10 }, Mask::Dilated { rate: 4 }),
        ),
        or(
            Mask::Causal,
            Mask::BlockSparse {
                block: 8,
                local: 1,
                global: 1,
            },
        ),
    ]);
    v.extend(expression_masks());
    v
}

/// Expression masks (FlexAttention's `mask_mod`) over `i` and `j`, alone
/// and combined with built-in masks.
fn expression_masks() -> Vec<Mask> {
    [
        "j < i",
        "(i - j) % 4 == 0",
        "j <= i && i - j < 8",
        "causal && (i - j) % 4 == 0",
        "window(5) || j < 3",
        "causal && (window(9) || div(j, 8) == div(i, 8))",
    ]
    .iter()
    .map(|m| {
        mixc_dsl::parse_str(&format!(
            "mixer t {{ heads = 2; head_dim = 8; score = dot(q, k); mask = {m}; norm = softmax; }}"
        ))
        .unwrap_or_else(|e| panic!("{m}: {e}"))
        .mask
    })
    .collect()
}

fn has_expr(m: &Mask) -> bool {
    match m {
        Mask::Expr(_) => true,
        Mask::And(a, b) | Mask::Or(a, b) => has_expr(a) || has_expr(b),
        _ => false,
    }
}

#[test]
fn device_classification_matches_the_plan() {
    let masks = masks();
    // One C++ function pair per mask, from the same lowering the templates use.
    let mut prog = String::from("#include <cstdio>\n");
    prog.push_str(include_str!("../../templates/mask.cuh"));
    prog.push_str("\nusing namespace mixc;\n");
    for (k, m) in masks.iter().enumerate() {
        let l = if has_expr(m) {
            // Expression predicates are not compiled here (only classes and
            // ranges); any names do.
            let env = LowerEnv {
                i: "pos_i",
                j: "pos_j",
                h: "head",
                s: "s",
                b: "batch_idx",
                seq: "seq_len",
                kv_seq: "seq_len",
                heads: 2,
                kv_heads: 2,
                inputs: &[],
                seq_dim: "seq_len",
                batch_dim: "1",
            };
            let mut hoisted = Vec::new();
            let exprs = MaskExprs {
                env: &env,
                hoisted: &mut hoisted,
            };
            lower_mask_with(m, &MaskNames::default(), Some(exprs), "test").unwrap()
        } else {
            lower_mask(m, &MaskNames::default(), "test").unwrap()
        };
        prog.push_str(&format!(
            "static int cls{k}(int i0, int i1, int j0, int j1) {{ return {}; }}\n\
             static KeyRange rng{k}(int i0, int i1) {{ return {}; }}\n",
            l.class, l.key_range
        ));
    }
    prog.push_str("int main() {\n  int m, i0, i1, j0, j1;\n  while (scanf(\"%d %d %d %d %d\", &m, &i0, &i1, &j0, &j1) == 5) {\n    int c = 0; KeyRange r{0, 0};\n    switch (m) {\n");
    for k in 0..masks.len() {
        prog.push_str(&format!(
            "      case {k}: c = cls{k}(i0, i1, j0, j1); r = rng{k}(i0, i1); break;\n"
        ));
    }
    prog.push_str("    }\n    printf(\"%d %lld %lld\\n\", c, r.lo, r.hi);\n  }\n}\n");

    let dir = tempfile_dir();
    let src = dir.join("mask_check.cpp");
    let exe = dir.join("mask_check");
    std::fs::write(&src, &prog).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = match Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED: no host C++ compiler `{cxx}` ({e}); set CXX to check mask.cuh against plan.rs");
            return;
        }
    };
    assert!(
        status.success(),
        "mask.cuh did not compile as host C++ ({})",
        src.display()
    );

    // Tiles: several sequence lengths and tilings, ragged edges included.
    let mut queries = String::new();
    let mut expected = Vec::new();
    for (k, m) in masks.iter().enumerate() {
        for &(len, bm, bn) in &[
            (37usize, 8usize, 8usize),
            (100, 16, 32),
            (130, 32, 16),
            (70, 7, 5),
        ] {
            for q0 in (0..len).step_by(bm) {
                let q = q0..(q0 + bm).min(len);
                for k0 in (0..len).step_by(bn) {
                    let kr = k0..(k0 + bn).min(len);
                    queries.push_str(&format!(
                        "{k} {} {} {} {}\n",
                        q.start,
                        q.end - 1,
                        kr.start,
                        kr.end - 1
                    ));
                    expected.push((
                        k,
                        q.clone(),
                        kr.clone(),
                        classify(m, q.clone(), kr, &NoSegments),
                        len,
                    ));
                }
            }
        }
    }
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from a thread: the answers fill the output pipe while the
    // queries are still going in.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(queries.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), expected.len());
    let code = |c: BlockClass| match c {
        BlockClass::Skip => 0,
        BlockClass::Partial => 1,
        BlockClass::Full => 2,
    };
    let mut skips = 0;
    let mut expr_skips = 0;
    for (line, (k, q, kr, class, len)) in lines.iter().zip(&expected) {
        let f: Vec<i64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let m = &masks[*k];
        if has_expr(m) {
            // The device proves nothing about an expression (Partial), so it
            // may be less precise than the plan, never different otherwise,
            // and never unsound.
            assert!(
                f[0] == code(*class) || f[0] == 1,
                "mask {m} tile q {q:?} k {kr:?}: device class {} vs plan {class:?}",
                f[0]
            );
            let pairs = q
                .clone()
                .flat_map(|i| kr.clone().map(move |j| m.allows_at(i as i64, j as i64)));
            let (any, all) = pairs.fold((false, true), |(a, b), ok| (a || ok, b && ok));
            assert!(
                (f[0] != 0 || !any) && (f[0] != 2 || all),
                "mask {m} tile q {q:?} k {kr:?}: device class {} is unsound",
                f[0]
            );
            expr_skips += (f[0] == 0) as usize;
        } else {
            assert_eq!(
                f[0],
                code(*class),
                "mask {m:?} tile q {q:?} k {kr:?}: device class {} vs plan {class:?}",
                f[0]
            );
        }
        skips += (*class == BlockClass::Skip) as usize;
        // Key range: same keys once both are clipped to the sequence.
        let plan = key_hull(&masks[*k], q.clone(), 0..*len);
        let (lo, hi) = (f[1].max(0), f[2].min(*len as i64));
        let device = if lo >= hi {
            0..0
        } else {
            lo as usize..hi as usize
        };
        let plan = if plan.is_empty() { 0..0 } else { plan };
        assert_eq!(
            device, plan,
            "mask {:?} queries {q:?}: key range",
            masks[*k]
        );
    }
    assert!(skips > 0, "the shapes must exercise skipped tiles");
    assert!(
        expr_skips > 0,
        "built-in masks combined with expressions must still skip tiles on the device"
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mask_plan_consistency");
    std::fs::create_dir_all(&d).unwrap();
    d
}
