//! `mixc run --grad`: every example's gradients pass `--check` on the CPU
//! backend at ragged lengths, batch 2, over rings of 1, 3 and 4 ranks and
//! both shardings (full-size examples; the runtime's cpu_backward test runs
//! the whole ranks x sharding x precision matrix on reduced ones); `--save`
//! writes `do` and every gradient in its input's layout, and a saved `do`
//! is read back by `--inputs`; a bad `do` is refused naming it.

mod common;

use common::{examples, mixc, scratch, text};
use std::path::Path;

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = mixc(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn every_example_passes_the_gradient_check_on_the_cpu_backend() {
    let rings = [
        ("1", "contiguous"),
        ("3", "zigzag"),
        ("4", "contiguous"),
        ("3", "contiguous"),
        ("4", "zigzag"),
    ];
    let mut k = 0;
    for ex in examples() {
        for seq in ["1", "37", "130", "300"] {
            let (ranks, sharding) = rings[k % rings.len()];
            k += 1;
            let ranks = if seq == "1" { "1" } else { ranks };
            let v = run_json(&[
                "run",
                ex.to_str().unwrap(),
                "--backend",
                "cpu",
                "--seq",
                seq,
                "--batch",
                "2",
                "--ranks",
                ranks,
                "--sharding",
                sharding,
                "--grad",
                "--check",
                "--json",
            ]);
            let errors = v["grad_errors"].as_object().expect("gradient errors");
            assert!(errors.contains_key("dv"), "{ex:?}: {v}");
            let tol = v["grad_tolerance"].as_f64().unwrap();
            for (name, e) in errors {
                let e = e.as_f64().unwrap();
                assert!(e <= tol, "{ex:?} seq {seq} R={ranks}: {name} {e}");
            }
        }
    }
}

/// The header and data of one F32 tensor of a safetensors file.
fn read_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "F32", "{name}: {t}");
    let shape = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let off = t["data_offsets"].as_array().unwrap();
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    let data = bytes[8 + n + a..8 + n + b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

#[test]
fn saved_gradients_have_their_inputs_layouts_and_a_saved_do_is_read_back() {
    let first = scratch("cli_grad", "t5.safetensors");
    let out = mixc(&[
        "run",
        "examples/relative_bias_t5.mix",
        "--backend",
        "cpu",
        "--seq",
        "33",
        "--batch",
        "2",
        "--seed",
        "5",
        "--grad",
        "--save",
        first.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("backward: dq, dk, dv, drel"),
        "{}",
        text(&out)
    );
    for (grad, input) in [("dq", "q"), ("dk", "k"), ("dv", "v"), ("drel", "rel")] {
        assert_eq!(
            read_tensor(&first, grad).0,
            read_tensor(&first, input).0,
            "{grad}"
        );
    }
    assert_eq!(read_tensor(&first, "do").0, read_tensor(&first, "o").0);

    // Fed back, the file's `do` is used (no --seed: a random `do` would differ).
    let second = scratch("cli_grad", "t5-again.safetensors");
    let out = mixc(&[
        "run",
        "examples/relative_bias_t5.mix",
        "--backend",
        "cpu",
        "--inputs",
        first.to_str().unwrap(),
        "--grad",
        "--check",
        "--save",
        second.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for name in ["do", "dq", "drel"] {
        let (a, b) = (read_tensor(&first, name).1, read_tensor(&second, name).1);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5, "{name} changed by {diff}");
    }
}

/// Writes F32 tensors as a safetensors file.
fn write_tensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_bad_do_is_refused_naming_it() {
    let spec = "examples/linear_elu.mix";
    let (b, s, h, d) = (1usize, 9usize, 8usize, 64usize);
    let normal = |n: usize| {
        (0..n)
            .map(|x| ((x * 37 % 101) as f32 - 50.0) / 50.0)
            .collect::<Vec<_>>()
    };
    let qkv = |name| (name, vec![b, s, h, d], normal(b * s * h * d));
    for (bad, expect) in [
        (
            (vec![b, s, h, d + 1], normal(b * s * h * (d + 1))),
            "[batch, seq, heads, value_dim]",
        ),
        ((vec![b, s, h, d], vec![f32::NAN; b * s * h * d]), "finite"),
    ] {
        let file = scratch("cli_grad", "bad-do.safetensors");
        write_tensors(&file, &[qkv("q"), qkv("k"), qkv("v"), ("do", bad.0, bad.1)]);
        let out = mixc(&[
            "run",
            spec,
            "--backend",
            "cpu",
            "--inputs",
            file.to_str().unwrap(),
            "--grad",
        ]);
        assert!(!out.status.success(), "{}", text(&out));
        let t = text(&out);
        assert!(t.contains("`do`") || t.contains("do:"), "{t}");
        assert!(t.contains(expect), "{t}");
    }
}
