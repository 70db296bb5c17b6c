//! The recurrent state of the chunkwise forms (`Mixer::forward_state`): a
//! prefill and then decode steps (one token at a time, then a chunk), each
//! continuing the previous call's state, equal one long forward pass and
//! the f64 reference, for the linear, retention and gated examples.

mod cpu_support;

use cpu_support::{example_specs, rel_err, F32_TOL};
use mixc_dsl::ir::{DType, Dim, Family, Mask};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::{
    reference, Device, ExtraTensor, Mixer, MixerInputs, Options, RuntimeError, Tensor,
};

/// Positions `r` of every `[batch, seq, ...]` tensor of `x` (seq-indexed
/// extra inputs too).
fn positions(
    x: &MixerInputs,
    spec: &mixc_dsl::ir::MixerSpec,
    r: std::ops::Range<usize>,
) -> MixerInputs {
    fn cut<T: Copy>(t: &Tensor<T>, r: &std::ops::Range<usize>) -> Tensor<T> {
        let (b, l) = (t.shape[0], t.shape[1]);
        let w: usize = t.shape[2..].iter().product();
        let data = (0..b)
            .flat_map(|bi| t.data[(bi * l + r.start) * w..(bi * l + r.end) * w].to_vec())
            .collect();
        let mut shape = t.shape.clone();
        shape[1] = r.len();
        Tensor::new(shape, data)
    }
    let mut y = MixerInputs::new(cut(&x.q, &r), cut(&x.k, &r), cut(&x.v, &r));
    for d in &spec.inputs {
        let t = &x.extra[&d.name];
        let part = if d.dims.get(1) == Some(&Dim::Seq) {
            match t {
                ExtraTensor::F32(t) => ExtraTensor::F32(cut(t, &r)),
                ExtraTensor::I32(t) => ExtraTensor::I32(cut(t, &r)),
            }
        } else {
            t.clone()
        };
        y.extra.insert(d.name.clone(), part);
    }
    y
}

#[test]
fn prefill_then_decode_steps_equal_one_long_forward() {
    let specs: Vec<_> = example_specs()
        .into_iter()
        .filter(|s| matches!(s.family, Family::Linear | Family::Retention | Family::Gated))
        .collect();
    assert_eq!(specs.len(), 3);
    for spec in &specs {
        let m = Mixer::new(spec, Options::on(Device::Cpu).with_dtype(DType::F32)).unwrap();
        let full = random_inputs(spec, 2, 112, 21);
        let want = reference::evaluate(spec, &full).unwrap();
        let long = m.forward(&full).unwrap().o;
        let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
        let mut state = None;
        let mut got = vec![0.0f32; long.numel()];
        let mut at = 0;
        for len in [100, 1, 1, 1, 1, 1, 7] {
            let part = positions(&full, spec, at..at + len);
            let (out, next) = m.forward_state(&part, state.as_ref()).unwrap();
            assert_eq!(next.s.shape, vec![2, h, spec.head_dim as usize, dv]);
            for b in 0..2 {
                for t in 0..len {
                    let dst = ((b * 112) + at + t) * h * dv;
                    let src = ((b * len) + t) * h * dv;
                    got[dst..dst + h * dv].copy_from_slice(&out.o.data[src..src + h * dv]);
                }
            }
            state = Some(next);
            at += len;
        }
        let got64 = Tensor::new(long.shape.clone(), got.iter().map(|&x| x as f64).collect());
        let e = rel_err(&got64, &want);
        assert!(e < F32_TOL, "{}: steps vs reference {e}", spec.name);
        let long64 = Tensor::new(
            long.shape.clone(),
            long.data.iter().map(|&x| x as f64).collect(),
        );
        let e = rel_err(&got64, &long64);
        assert!(e < 1e-5, "{}: steps vs one forward {e}", spec.name);
    }
}

#[test]
fn only_chunkwise_mixers_carry_a_state() {
    let llama = example_specs()
        .into_iter()
        .find(|s| s.name.contains("llama3"))
        .unwrap();
    let m = Mixer::new(&llama, Options::on(Device::Cpu)).unwrap();
    let x = random_inputs(&llama, 1, 8, 1);
    let e = m.forward_state(&x, None).unwrap_err();
    assert!(matches!(e, RuntimeError::Unsupported { .. }), "{e}");
    // A windowed linear mixer runs blocked: no state either.
    let mut lin = example_specs()
        .into_iter()
        .find(|s| s.family == Family::Linear)
        .unwrap();
    lin.mask = Mask::Window { size: 4 };
    let m = Mixer::new(&lin, Options::on(Device::Cpu)).unwrap();
    let x = random_inputs(&lin, 1, 8, 1);
    assert!(m.forward_state(&x, None).is_err());
    // A state of the wrong shape is named.
    let lin = example_specs()
        .into_iter()
        .find(|s| s.family == Family::Linear)
        .unwrap();
    let m = Mixer::new(&lin, Options::on(Device::Cpu)).unwrap();
    let x = random_inputs(&lin, 2, 8, 1);
    let (_, st) = m
        .forward_state(&random_inputs(&lin, 1, 8, 1), None)
        .unwrap();
    let e = m.forward_state(&x, Some(&st)).unwrap_err();
    assert!(e.to_string().contains("state"), "{e}");
}
