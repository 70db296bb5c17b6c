//! A ring over processes (`CpuMixer::run_rank` / `backward_rank` through a
//! caller's `Transport`, its messages encoded as bytes) computes what the
//! same ring computes as threads of one process, bit for bit: every
//! example, forward and backward, R in {2, 3, 4}, both shardings. Each
//! "process" here is a thread holding only its own positions of q, k, v
//! (the rest zeros) and talking to the others through byte channels only.

mod cpu_support;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use cpu_support::example_specs;
use mixc_dsl::ir::MixerSpec;
use mixc_runtime::cpu::{CpuConfig, CpuMixer, Precision, Sharding};
use mixc_runtime::inputs::random_inputs;
use mixc_runtime::ring::{RingSchedule, Transport};
use mixc_runtime::{MixerInputs, RuntimeError, Tensor};

/// Byte channels between rank threads: what a process-level message layer
/// (gloo, MPI, sockets) gives.
struct Bytes {
    rank: usize,
    ranks: usize,
    to: Vec<Sender<Vec<u8>>>,
    inbox: Mutex<Receiver<Vec<u8>>>,
    sent: Mutex<usize>,
}

impl Transport for Bytes {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.ranks
    }
    fn send(&self, to: usize, msg: Vec<u8>) -> mixc_runtime::Result<()> {
        assert_ne!(to, self.rank);
        *self.sent.lock().unwrap() += msg.len();
        self.to[to]
            .send(msg)
            .map_err(|_| RuntimeError::Invalid("peer gone".into()))
    }
    fn recv(&self) -> mixc_runtime::Result<Vec<u8>> {
        self.inbox
            .lock()
            .unwrap()
            .recv()
            .map_err(|_| RuntimeError::Invalid("peers gone".into()))
    }
}

fn transports(ranks: usize) -> Vec<Arc<Bytes>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel()).unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(rank, rx)| {
            Arc::new(Bytes {
                rank,
                ranks,
                to: txs.clone(),
                inbox: Mutex::new(rx),
                sent: Mutex::new(0),
            })
        })
        .collect()
}

/// `t` (`[batch, seq, ...]`) with every position outside `keep` zeroed.
fn only<T: Copy + Default>(t: &Tensor<T>, keep: &[bool]) -> Tensor<T> {
    if t.shape.len() < 2 || t.data.is_empty() {
        return t.clone();
    }
    let (batch, seq) = (t.shape[0], t.shape[1]);
    let row: usize = t.shape[2..].iter().product();
    let mut out = Tensor::zeros(&t.shape);
    for b in 0..batch {
        for (p, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            let o = (b * seq + p) * row;
            out.data[o..o + row].copy_from_slice(&t.data[o..o + row]);
        }
    }
    out
}

/// `[batch, heads, seq]` statistic with positions outside `keep` zeroed.
fn only_stat(t: &Tensor<f64>, keep: &[bool]) -> Tensor<f64> {
    let mut out = t.clone();
    let seq = keep.len();
    for (i, x) in out.data.iter_mut().enumerate() {
        if !keep[i % seq] {
            *x = 0.0;
        }
    }
    out
}

fn rows_equal(a: &Tensor<f32>, b: &Tensor<f32>, keep: &[bool], what: &str) {
    assert_eq!(a.shape, b.shape, "{what}");
    if a.data.is_empty() {
        return;
    }
    let (batch, seq) = (a.shape[0], a.shape[1]);
    let row: usize = a.shape[2..].iter().product();
    for b_ in 0..batch {
        for (p, &k) in keep.iter().enumerate() {
            let o = (b_ * seq + p) * row;
            let (x, y) = (&a.data[o..o + row], &b.data[o..o + row]);
            if k {
                assert_eq!(x, y, "{what}: position {p} differs");
            } else {
                assert!(x.iter().all(|&v| v == 0.0), "{what}: position {p} written");
            }
        }
    }
}

fn check(spec: &MixerSpec, seq: usize, ranks: usize, sharding: Sharding, precision: Precision) {
    let what = format!("{} L={seq} R={ranks} {sharding:?} {precision:?}", spec.name);
    let full = random_inputs(spec, 2, seq, 7);
    let cfg = CpuConfig {
        ranks,
        sharding,
        threads: 2,
        precision,
        ..CpuConfig::default_for(spec, seq)
    };
    let m = CpuMixer::new(spec, &cfg).unwrap();
    // The same ring as threads of one process.
    let run = m.run_train(&full).unwrap();
    let o = run.output.clone().into_f32();
    let d_o = Tensor::new(
        o.shape.clone(),
        (0..o.numel())
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect(),
    );
    let grads = m.backward(&full, &o, &run.stat, &d_o).unwrap().into_f32();

    let sched = RingSchedule::new(seq, ranks, sharding).unwrap();
    let parts: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = transports(ranks)
            .into_iter()
            .map(|t| {
                let (m, full, d_o, sched) = (&m, &full, &d_o, &sched);
                s.spawn(move || {
                    let mut keep = vec![false; seq];
                    for r in sched.shard(t.rank) {
                        r.clone().for_each(|p| keep[p] = true);
                    }
                    let mine = MixerInputs {
                        q: only(&full.q, &keep),
                        k: only(&full.k, &keep),
                        v: only(&full.v, &keep),
                        ..full.clone()
                    };
                    let dynt: Arc<dyn Transport> = t.clone();
                    let run = m.run_rank(&mine, true, &dynt).unwrap();
                    let o = run.output.into_f32();
                    let stat = only_stat(&run.stat, &keep);
                    let g = m
                        .backward_rank(&mine, &o, &stat, &only(d_o, &keep), &dynt)
                        .unwrap()
                        .into_f32();
                    let sent = *t.sent.lock().unwrap();
                    (keep, o, run.stat, g, sent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut extra_sum: Vec<(String, Vec<f64>)> = grads
        .extra
        .keys()
        .map(|n| (n.clone(), vec![0.0; grads.extra[n].numel()]))
        .collect();
    for (keep, o_r, stat_r, g, sent) in &parts {
        if ranks > 1 {
            assert!(*sent > 0, "{what}: a rank sent nothing");
        }
        rows_equal(o_r, &o, keep, &format!("{what} o"));
        if !run.stat.data.is_empty() {
            assert_eq!(stat_r.data.len(), run.stat.data.len(), "{what} stat");
            for (i, (x, y)) in stat_r.data.iter().zip(&run.stat.data).enumerate() {
                if keep[i % seq] {
                    assert_eq!(x.to_bits(), y.to_bits(), "{what} stat {i}");
                }
            }
        }
        rows_equal(&g.dq, &grads.dq, keep, &format!("{what} dq"));
        rows_equal(&g.dk, &grads.dk, keep, &format!("{what} dk"));
        rows_equal(&g.dv, &grads.dv, keep, &format!("{what} dv"));
        for (name, sum) in &mut extra_sum {
            for (a, &b) in sum.iter_mut().zip(&g.extra[name.as_str()].data) {
                *a += b as f64;
            }
        }
    }
    // Extra inputs' gradients: each rank's part; their sum is the gradient.
    for (name, sum) in &extra_sum {
        let want = &grads.extra[name.as_str()].data;
        let scale = want.iter().fold(1e-6f64, |m, &x| m.max(x.abs() as f64));
        for (i, (a, &b)) in sum.iter().zip(want).enumerate() {
            assert!(
                (a - b as f64).abs() <= 1e-4 * scale,
                "{what} d{name}[{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn a_ring_over_a_byte_transport_equals_the_ring_in_threads() {
    for spec in example_specs() {
        for (seq, ranks, sharding) in [
            (53, 2, Sharding::Zigzag),
            (70, 3, Sharding::Contiguous),
            (61, 4, Sharding::Zigzag),
        ] {
            check(&spec, seq, ranks, sharding, Precision::F32);
        }
    }
}

#[test]
fn bf16_products_travel_as_pairs() {
    // On CPUs without AVX-512 BF16 this is the f32 path again (still a check).
    let spec = example_specs()
        .into_iter()
        .find(|s| s.name.contains("llama3"))
        .unwrap();
    check(&spec, 90, 3, Sharding::Zigzag, Precision::Bf16);
}

#[test]
fn a_remote_ring_refuses_two_lengths() {
    let spec = example_specs()
        .into_iter()
        .find(|s| s.name.contains("llama3"))
        .unwrap();
    let m = CpuMixer::new(&spec, &CpuConfig::default_for(&spec, 10)).unwrap();
    let x = mixc_runtime::inputs::random_inputs_kv(&spec, 1, 4, 10, 1);
    let t: Arc<dyn Transport> = transports(2).remove(0);
    let e = m.run_rank(&x, false, &t).unwrap_err();
    assert!(e.to_string().contains("one sequence"), "{e}");
}

/// A block ring over processes (`Block::forward_rank` / `backward_rank`,
/// Ring Attention around the blockwise block): each "process" holds only
/// its rows of x, and its rows of the output and dx, and its parts of the
/// weight and extra-input gradients summed over the ranks, equal the
/// single-process block's. Llama-style (GQA, rope at the rows' positions)
/// with packed documents and a learned slope table; R in {2, 3}, both
/// shardings, ragged lengths.
#[test]
fn a_block_ring_over_a_byte_transport_equals_the_whole_block() {
    use mixc_runtime::block::{
        random_block_inputs, random_block_upstream, Block, BlockInputs, BlockWeights,
    };
    use mixc_runtime::ring::RankRows;
    use mixc_runtime::{Device, Options};
    let spec = mixc_dsl::parse_block_str(
        "mixer attn { heads = 4; kv_heads = 2; head_dim = 8; input doc: i32[batch, seq]; \
         input slopes: f32[heads]; bias = -slopes[h] * (i - j); mask = causal && segment(doc); }\n\
         block b { width = 24; norm = rmsnorm(1e-6); ffn = swiglu(40); rope = 10000; }",
    )
    .unwrap();
    let weights = BlockWeights::random(&spec, 3);
    for (seq, ranks, sharding) in [
        (29, 2, Sharding::Zigzag),
        (31, 3, Sharding::Contiguous),
        (26, 3, Sharding::Zigzag),
    ] {
        let whole = Block::new(&spec, Options::on(Device::Cpu).with_sharding(sharding))
            .unwrap()
            .with_block_rows(8);
        let inputs = random_block_inputs(&spec, 2, seq, 5);
        let g = random_block_upstream(&spec, 2, seq, 6);
        let (want, res) = whole.forward_train(&inputs, &weights).unwrap();
        let want_back = whole.backward(&inputs, &weights, &res, &g).unwrap().grads;

        let ts = transports(ranks);
        let parts: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ts
                .iter()
                .enumerate()
                .map(|(rank, t)| {
                    let (spec, weights, inputs, g) = (&spec, &weights, &inputs, &g);
                    s.spawn(move || {
                        let block =
                            Block::new(spec, Options::on(Device::Cpu).with_sharding(sharding))
                                .unwrap()
                                .with_block_rows(8);
                        let rows = RankRows::new(seq, ranks, rank, sharding).unwrap();
                        let shape = |t: &Tensor<f32>| {
                            let mut sh = t.shape.clone();
                            sh[1] = rows.positions.len();
                            Tensor::new(sh, rows.gather(t))
                        };
                        let mine = BlockInputs {
                            extra: inputs.extra.clone(),
                            ..BlockInputs::new(shape(&inputs.x))
                        };
                        let t: Arc<dyn Transport> = t.clone();
                        let (out, res) =
                            block.forward_rank(&mine, weights, &rows, true, &t).unwrap();
                        let back = block
                            .backward_rank(&mine, weights, &res.unwrap(), &shape(g), &rows, &t)
                            .unwrap();
                        (rows, out.out, back.grads)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 1e-4 * scale,
                "{what}: {err} of {scale} (L={seq}, R={ranks}, {sharding:?})"
            );
        };
        let mut summed = std::collections::BTreeMap::<String, Vec<f32>>::new();
        for (rows, out, grads) in &parts {
            close(&out.data, &rows.gather(&want.out), "out rows");
            close(&grads.dx.data, &rows.gather(&want_back.dx), "dx rows");
            for (name, t) in grads.weights.iter().chain(&grads.extra) {
                let acc = summed
                    .entry(name.clone())
                    .or_insert_with(|| vec![0.0; t.data.len()]);
                acc.iter_mut().zip(&t.data).for_each(|(a, x)| *a += x);
            }
        }
        assert_eq!(
            summed.len(),
            want_back.weights.len() + 1,
            "{:?}",
            summed.keys()
        );
        for (name, want_t) in want_back.weights.iter().chain(&want_back.extra) {
            close(
                &summed[name],
                &want_t.data,
                &format!("d{name} summed over ranks"),
            );
        }
    }
}
