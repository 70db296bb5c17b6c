//! A paged KV cache (`Mixer::forward_paged`): page sizes 16 and 64, a
//! shuffled page table with unused pages, ragged lengths and decode-style
//! query counts (1, 4, 16), every example whose inputs have no `seq` axis,
//! each row against the f64 reference run on its contiguous cache.

mod cpu_support;

use cpu_support::{example_specs, rel_err, F32_TOL};
use mixc_dsl::ir::{DType, Dim, MixerSpec};
use mixc_runtime::inputs::random_inputs_kv;
use mixc_runtime::{
    reference, Device, ExtraTensor, Mixer, MixerInputs, Options, PagedKv, RuntimeError, Tensor,
};

/// A fixed shuffle of `0..n` (a multiplicative step coprime with n).
fn shuffled(n: usize) -> Vec<usize> {
    let step = (1..).map(|k| 7 + 2 * k).find(|s| gcd(*s, n) == 1).unwrap();
    (0..n).map(|i| (i * step + 3) % n).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

struct Paged {
    rows: Vec<MixerInputs>,
    q: Tensor<f32>,
    k: Tensor<f32>,
    v: Tensor<f32>,
    table: Tensor<i32>,
    lens: Vec<usize>,
    extra: std::collections::BTreeMap<String, ExtraTensor>,
}

fn build(spec: &MixerSpec, sq: usize, lens: &[usize], page: usize) -> Paged {
    let mut rows: Vec<MixerInputs> = lens
        .iter()
        .enumerate()
        .map(|(b, &l)| random_inputs_kv(spec, 1, sq, l, 11 + b as u64))
        .collect();
    // Shared tables come from row 0; per-row entries are stacked.
    let mut extra = std::collections::BTreeMap::new();
    for d in &spec.inputs {
        if d.dims.contains(&Dim::Batch) {
            let parts: Vec<f32> = rows
                .iter()
                .flat_map(|r| match &r.extra[&d.name] {
                    ExtraTensor::F32(t) => t.data.to_vec(),
                    ExtraTensor::I32(_) => unreachable!("no i32 per-row inputs here"),
                })
                .collect();
            let mut shape = rows[0].extra[&d.name].shape().to_vec();
            shape[0] = lens.len();
            extra.insert(d.name.clone(), ExtraTensor::F32(Tensor::new(shape, parts)));
        } else {
            let t = rows[0].extra[&d.name].clone();
            rows.iter_mut().for_each(|r| {
                r.extra.insert(d.name.clone(), t.clone());
            });
            extra.insert(d.name.clone(), t);
        }
    }
    let need: Vec<usize> = lens.iter().map(|l| l.div_ceil(page)).collect();
    let pages = need.iter().sum::<usize>() + 3; // three never used
    let max_pages = need.iter().copied().max().unwrap_or(0) + 1;
    let order = shuffled(pages);
    let (kvh, dk, dv) = (
        spec.kv_heads as usize,
        spec.head_dim as usize,
        spec.value_dim as usize,
    );
    let mut k = Tensor::<f32>::zeros(&[pages, page, kvh, dk]);
    let mut v = Tensor::<f32>::zeros(&[pages, page, kvh, dv]);
    let mut table = Tensor::new(
        vec![lens.len(), max_pages],
        vec![-1i32; lens.len() * max_pages],
    );
    let mut next = 0;
    for (b, r) in rows.iter().enumerate() {
        for c in 0..need[b] {
            table.data[b * max_pages + c] = order[next] as i32;
            next += 1;
        }
        for pos in 0..lens[b] {
            let p = table.data[b * max_pages + pos / page] as usize;
            let slot = pos % page;
            let (ko, vo) = ((p * page + slot) * kvh * dk, (p * page + slot) * kvh * dv);
            k.data[ko..ko + kvh * dk].copy_from_slice(&r.k.data[pos * kvh * dk..][..kvh * dk]);
            v.data[vo..vo + kvh * dv].copy_from_slice(&r.v.data[pos * kvh * dv..][..kvh * dv]);
        }
    }
    let q = Tensor::new(
        vec![lens.len(), sq, spec.heads as usize, dk],
        rows.iter().flat_map(|r| r.q.data.to_vec()).collect(),
    );
    Paged {
        rows,
        q,
        k,
        v,
        table,
        lens: lens.to_vec(),
        extra,
    }
}

fn paged_specs() -> Vec<MixerSpec> {
    example_specs()
        .into_iter()
        .filter(|s| s.inputs.iter().all(|d| !d.dims.contains(&Dim::Seq)))
        .collect()
}

#[test]
fn paged_caches_equal_contiguous_ones() {
    let specs = paged_specs();
    assert!(specs.len() >= 8, "{} specs", specs.len());
    for spec in &specs {
        let m = Mixer::new(spec, Options::on(Device::Cpu).with_dtype(DType::F32)).unwrap();
        for page in [16, 64] {
            for sq in [1, 4, 16] {
                let lens = [37, 16, 130, 200];
                let p = build(spec, sq, &lens, page);
                let cache = PagedKv {
                    k: &p.k,
                    v: &p.v,
                    block_table: &p.table,
                    seq_lens: &p.lens,
                };
                let out = m.forward_paged(&p.q, &cache, &p.extra).unwrap();
                let (h, dv) = (spec.heads as usize, spec.value_dim as usize);
                assert_eq!(out.o.shape, vec![lens.len(), sq, h, dv]);
                for (b, row) in p.rows.iter().enumerate() {
                    let want = reference::evaluate(spec, row).unwrap();
                    let got = Tensor::new(
                        vec![1, sq, h, dv],
                        out.o.data[b * sq * h * dv..(b + 1) * sq * h * dv]
                            .iter()
                            .map(|&x| x as f64)
                            .collect(),
                    );
                    let e = rel_err(&got, &want);
                    assert!(
                        e < F32_TOL,
                        "{} page {page} sq {sq} row {b}: error {e}",
                        spec.name
                    );
                }
            }
        }
    }
}

#[test]
fn bad_caches_name_the_tensor() {
    let spec = paged_specs()
        .into_iter()
        .find(|s| s.name.contains("llama3"))
        .unwrap();
    let m = Mixer::new(&spec, Options::on(Device::Cpu)).unwrap();
    let p = build(&spec, 2, &[20, 40], 16);
    let cache = |table: &'_ Tensor<i32>, lens: &'_ [usize]| -> Result<(), RuntimeError> {
        let c = PagedKv {
            k: &p.k,
            v: &p.v,
            block_table: table,
            seq_lens: lens,
        };
        m.forward_paged(&p.q, &c, &p.extra).map(drop)
    };
    // A page number outside the cache.
    let mut t = p.table.clone();
    t.data[1] = 999;
    let e = cache(&t, &p.lens).unwrap_err().to_string();
    assert!(e.contains("block_table") && e.contains("999"), "{e}");
    // More keys than the table has pages for.
    let e = cache(&p.table, &[20, 400]).unwrap_err().to_string();
    assert!(e.contains("400 keys"), "{e}");
    // A row count that q does not have.
    let e = cache(&p.table, &[20]).unwrap_err().to_string();
    assert!(e.contains("`q`") || e.contains("input `q`"), "{e}");
    // Inputs indexed by position cannot come with a paged cache.
    let doc = example_specs()
        .into_iter()
        .find(|s| s.name.contains("document"))
        .unwrap();
    let md = Mixer::new(&doc, Options::on(Device::Cpu)).unwrap();
    let c = PagedKv {
        k: &p.k,
        v: &p.v,
        block_table: &p.table,
        seq_lens: &p.lens,
    };
    let e = md.forward_paged(&p.q, &c, &p.extra).unwrap_err();
    assert!(e.to_string().contains("position"), "{e}");
}
