//! safetensors input/output: round trips, storage types other than f32, and
//! the errors a user sees for a wrong file.

use std::borrow::Cow;
use std::path::Path;

use mixc_dsl::{
    DType, Decay, Dim, ElemType, Family, FeatureMap, InputDecl, InputRole, Mask, MixerSpec, Norm,
    Score,
};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::io::{load_inputs, save_tensors};
use mixc_runtime::{ExtraTensor, RuntimeError, Tensor};
use safetensors::{Dtype, SafeTensors};

fn spec_with_extras() -> MixerSpec {
    MixerSpec {
        name: "io".into(),
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        value_dim: 6,
        dtype: DType::F32,
        inputs: vec![
            InputDecl {
                name: "doc".into(),
                elem: ElemType::I32,
                dims: vec![Dim::Batch, Dim::Seq],
                role: InputRole::SegmentIds,
            },
            InputDecl {
                name: "g".into(),
                elem: ElemType::F32,
                dims: vec![Dim::Batch, Dim::Seq, Dim::Heads],
                role: InputRole::Gate,
            },
        ],
        score: Score::Dot {
            q_map: FeatureMap::Identity,
            k_map: FeatureMap::Identity,
            scale: 1.0,
        },
        bias: None,
        transform: None,
        mask: Mask::And(
            Box::new(Mask::Causal),
            Box::new(Mask::Segment {
                input: "doc".into(),
            }),
        ),
        decay: Decay::Gate { input: "g".into() },
        norm: Norm::None,
        family: Family::Gated,
        default_scale: false,
    }
}

fn conv_spec() -> MixerSpec {
    let mut s = spec_with_extras();
    s.inputs = vec![InputDecl {
        name: "f".into(),
        elem: ElemType::F32,
        dims: vec![Dim::Heads, Dim::Seq],
        role: InputRole::Filter,
    }];
    s.score = Score::Filter { input: "f".into() };
    s.mask = Mask::Causal;
    s.decay = Decay::None;
    s.family = Family::Convolution;
    s
}

/// A tensor to write by hand, in any dtype.
struct Raw(Dtype, Vec<usize>, Vec<u8>);

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

fn write_raw(path: &Path, tensors: &[(&str, Raw)]) {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), &None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn dummy_output(batch: usize, seq: usize, spec: &MixerSpec) -> Tensor<f32> {
    let shape = [batch, seq, spec.heads as usize, spec.value_dim as usize];
    let n = shape.iter().product();
    Tensor::new(shape.to_vec(), (0..n).map(|x| x as f32 * 0.25).collect())
}

#[test]
fn save_then_load_gives_equal_tensors() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, seqs) in [(spec_with_extras(), [1, 7, 33]), (conv_spec(), [1, 7, 100])] {
        for l in seqs {
            let inp = random_inputs(&spec, 2, l, 77);
            let out = dummy_output(2, l, &spec);
            let path = dir.path().join(format!("{}_{l}.safetensors", spec.name));
            save_tensors(&path, Some(&inp), &out).unwrap();
            let back = load_inputs(&path, &spec).unwrap();
            assert_eq!(back, inp, "{} L={l}", spec.name);
            // The output is there, as F32 under `o`.
            let bytes = std::fs::read(&path).unwrap();
            let file = SafeTensors::deserialize(&bytes).unwrap();
            let o = file.tensor("o").unwrap();
            assert_eq!(o.dtype(), Dtype::F32);
            assert_eq!(o.shape(), out.shape.as_slice());
            let vals: Vec<f32> = o
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(vals, out.data);
        }
    }
}

#[test]
fn output_only_files_and_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras();
    let path = dir.path().join("o.safetensors");
    save_tensors(&path, None, &dummy_output(1, 3, &spec)).unwrap();
    // An output-only file is not an input file: the error names `q`.
    let msg = load_inputs(&path, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("`q`") && msg.contains("missing") && msg.contains("holds: o)"),
        "{msg}"
    );
    // Overwriting replaces the file and leaves no temporary behind.
    let inp = random_inputs(&spec, 1, 3, 1);
    save_tensors(&path, Some(&inp), &dummy_output(1, 3, &spec)).unwrap();
    assert_eq!(load_inputs(&path, &spec).unwrap(), inp);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn failed_save_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras();
    // The target is an existing directory: the rename fails.
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let err = save_tensors(&target, None, &dummy_output(1, 2, &spec)).unwrap_err();
    assert!(matches!(err, RuntimeError::Io { .. }), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "temporary file left behind");
    // A missing parent directory is an Io error naming the path.
    let missing = dir.path().join("no/such/dir/out.safetensors");
    let err = save_tensors(&missing, None, &dummy_output(1, 2, &spec)).unwrap_err();
    assert!(err.to_string().contains("out.safetensors"), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras();
    let mut inp = random_inputs(&spec, 2, 7, 5);
    // k saved with the query-head count instead of kv_heads.
    inp.k = Tensor::zeros(&[2, 7, 4, 8]);
    let path = dir.path().join("bad.safetensors");
    save_tensors(&path, Some(&inp), &dummy_output(2, 7, &spec)).unwrap();
    let err = load_inputs(&path, &spec).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RuntimeError::BadInput { ref name, .. } if name == "k"),
        "{msg}"
    );
    assert!(
        msg.contains("[batch=2, seq=7, kv_heads=2, head_dim=8]"),
        "{msg}"
    );
    assert!(
        msg.contains("[2, 7, 4, 8]") && msg.contains("bad.safetensors"),
        "{msg}"
    );

    // A gate table of the wrong length names the gate and its symbolic shape.
    let mut inp = random_inputs(&spec, 2, 7, 5);
    inp.extra
        .insert("g".into(), ExtraTensor::F32(Tensor::zeros(&[2, 6, 4])));
    save_tensors(&path, Some(&inp), &dummy_output(2, 7, &spec)).unwrap();
    let msg = load_inputs(&path, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("`g`") && msg.contains("[batch=2, seq=7, heads=4]"),
        "{msg}"
    );

    // q of the wrong rank: batch and seq cannot be read, the shape is symbolic.
    let q = Raw(Dtype::F32, vec![7, 4, 8], vec![0; 7 * 4 * 8 * 4]);
    write_raw(&path, &[("q", q)]);
    let msg = load_inputs(&path, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("`q`") && msg.contains("[batch, seq, heads=4, head_dim=8]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras();
    let mut inp = random_inputs(&spec, 1, 5, 5);
    inp.extra.remove("doc");
    let path = dir.path().join("m.safetensors");
    save_tensors(&path, Some(&inp), &dummy_output(1, 5, &spec)).unwrap();
    let msg = load_inputs(&path, &spec).unwrap_err().to_string();
    assert!(msg.contains("`doc`") && msg.contains("missing"), "{msg}");
}

#[test]
fn f16_bf16_f64_and_i64_files_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras();
    let (b, l) = (2, 7);
    let reference = random_inputs(&spec, b, l, 9);
    let f16 = |t: &Tensor<f32>| {
        let bytes = t
            .data
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        Raw(Dtype::F16, t.shape.clone(), bytes)
    };
    let bf16 = |t: &Tensor<f32>| {
        let bytes = t
            .data
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        Raw(Dtype::BF16, t.shape.clone(), bytes)
    };
    let f64_ = |t: &Tensor<f32>| {
        let bytes = t
            .data
            .iter()
            .flat_map(|&x| (x as f64).to_le_bytes())
            .collect();
        Raw(Dtype::F64, t.shape.clone(), bytes)
    };
    let (ExtraTensor::I32(doc), ExtraTensor::F32(g)) =
        (&reference.extra["doc"], &reference.extra["g"])
    else {
        unreachable!()
    };
    let doc64 = Raw(
        Dtype::I64,
        doc.shape.clone(),
        doc.data
            .iter()
            .flat_map(|&x| (x as i64).to_le_bytes())
            .collect(),
    );
    let path = dir.path().join("mixed.safetensors");
    write_raw(
        &path,
        &[
            ("q", f16(&reference.q)),
            ("k", bf16(&reference.k)),
            ("v", f64_(&reference.v)),
            ("doc", doc64),
            ("g", f64_(g)),
        ],
    );
    let got = load_inputs(&path, &spec).unwrap();
    let round =
        |t: &Tensor<f32>, f: fn(f32) -> f32| t.data.iter().map(|&x| f(x)).collect::<Vec<_>>();
    assert_eq!(
        got.q.data,
        round(&reference.q, |x| half::f16::from_f32(x).to_f32())
    );
    assert_eq!(
        got.k.data,
        round(&reference.k, |x| half::bf16::from_f32(x).to_f32())
    );
    // f32 -> f64 -> f32 is exact.
    assert_eq!(got.v, reference.v);
    assert_eq!(got.extra, reference.extra);
    // The 16-bit files really were rounded (the test would be vacuous otherwise).
    assert_ne!(got.q, reference.q);
}

#[test]
fn wrong_dtypes_and_non_safetensors_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_with_extras();
    let inp = random_inputs(&spec, 1, 3, 2);
    let path = dir.path().join("t.safetensors");

    // Segment ids stored as floats.
    let f32_raw = |t: &Tensor<f32>| {
        Raw(
            Dtype::F32,
            t.shape.clone(),
            t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    };
    let ExtraTensor::F32(g) = &inp.extra["g"] else {
        unreachable!()
    };
    write_raw(
        &path,
        &[
            ("q", f32_raw(&inp.q)),
            ("k", f32_raw(&inp.k)),
            ("v", f32_raw(&inp.v)),
            ("g", f32_raw(g)),
            ("doc", Raw(Dtype::F32, vec![1, 3], vec![0; 12])),
        ],
    );
    let msg = load_inputs(&path, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("`doc`") && msg.contains("F32") && msg.contains("integer"),
        "{msg}"
    );

    // i64 ids that do not fit i32.
    let mut big = vec![0u8; 24];
    big[..8].copy_from_slice(&(1i64 << 40).to_le_bytes());
    write_raw(
        &path,
        &[
            ("q", f32_raw(&inp.q)),
            ("k", f32_raw(&inp.k)),
            ("v", f32_raw(&inp.v)),
            ("g", f32_raw(g)),
            ("doc", Raw(Dtype::I64, vec![1, 3], big)),
        ],
    );
    let msg = load_inputs(&path, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("`doc`") && msg.contains("does not fit"),
        "{msg}"
    );

    // Not a safetensors file at all.
    std::fs::write(&path, b"definitely not safetensors").unwrap();
    let err = load_inputs(&path, &spec).unwrap_err();
    assert!(matches!(err, RuntimeError::BadFile { .. }), "{err}");
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );

    // Missing file.
    let err = load_inputs(&dir.path().join("absent.safetensors"), &spec).unwrap_err();
    assert!(matches!(err, RuntimeError::Io { .. }), "{err}");
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}
