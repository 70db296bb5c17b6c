//! Ring scheduling: how a sequence is sharded over `R` ranks, which key/value
//! shard each rank holds at each step, and the mailboxes that carry shards
//! (or chunkwise states) between rank threads.
//!
//! At step `s` rank `r` holds the shard first owned by rank `(r - s) mod R`:
//! it computes against it, passes it to `r + 1` and receives the next one from
//! `r - 1`. After `R` steps every query shard has met every key shard.

use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::tensor::Tensor;

/// How positions are dealt to ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Rank `r` owns the `r`-th of `R` near-equal contiguous pieces.
    Contiguous,
    /// The sequence is cut into `2R` near-equal chunks; rank `r` owns chunks
    /// `r` and `2R - 1 - r`, so under a causal mask every rank gets one cheap
    /// (early) and one expensive (late) chunk: balanced work.
    Zigzag,
}

impl Sharding {
    pub fn parse(s: &str) -> Option<Sharding> {
        match s {
            "contiguous" => Some(Sharding::Contiguous),
            "zigzag" => Some(Sharding::Zigzag),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Sharding::Contiguous => "contiguous",
            Sharding::Zigzag => "zigzag",
        }
    }
}

/// `n` near-equal pieces of `0..len`; the first `len % n` get one more.
fn split(len: usize, n: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / n, len % n);
    let mut start = 0;
    (0..n)
        .map(|p| {
            let size = base + usize::from(p < extra);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

/// The shards of a ring run and the order in which they travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSchedule {
    /// Queries (output rows) per batch row.
    pub seq: usize,
    pub ranks: usize,
    pub sharding: Sharding,
    /// Query positions owned by each rank, in increasing order, none empty
    /// (a rank may own no query when there are fewer queries than ranks).
    /// Positions are key positions: query `i` is at `i + q_offset`.
    pub shards: Vec<Vec<Range<usize>>>,
    /// Key positions owned by each rank, none empty: the shards that travel.
    /// The same as `shards` when queries and keys are one sequence.
    pub kv_shards: Vec<Vec<Range<usize>>>,
    /// Position of query 0.
    pub q_offset: usize,
}

/// `len` positions dealt to `ranks` ranks; empty ranges dropped.
fn deal(len: usize, ranks: usize, sharding: Sharding) -> Vec<Vec<Range<usize>>> {
    let shards: Vec<Vec<Range<usize>>> = match sharding {
        Sharding::Contiguous => split(len, ranks).into_iter().map(|r| vec![r]).collect(),
        Sharding::Zigzag => {
            let chunks = split(len, 2 * ranks);
            (0..ranks)
                .map(|r| {
                    let (early, late) = (chunks[r].clone(), chunks[2 * ranks - 1 - r].clone());
                    // The last rank's two chunks touch: one range, one tiling.
                    if early.end == late.start {
                        std::iter::once(early.start..late.end).collect()
                    } else {
                        vec![early, late]
                    }
                })
                .collect()
        }
    };
    shards
        .into_iter()
        .map(|rs| rs.into_iter().filter(|r| !r.is_empty()).collect())
        .collect()
}

impl RingSchedule {
    /// Errors when `ranks` is 0 or exceeds `seq` (a rank would own nothing).
    pub fn new(seq: usize, ranks: usize, sharding: Sharding) -> Result<Self> {
        Self::two_lengths(seq, seq, 0, ranks, sharding)
    }

    /// `seq` queries at positions `q_offset..q_offset + seq` against
    /// `kv_seq` keys at `0..kv_seq`: keys and queries are each dealt over
    /// the ranks by `sharding`; the key shards travel. Errors when `ranks`
    /// is 0 or exceeds `kv_seq` (a rank would hold no key).
    pub fn two_lengths(
        seq: usize,
        kv_seq: usize,
        q_offset: usize,
        ranks: usize,
        sharding: Sharding,
    ) -> Result<Self> {
        if ranks == 0 {
            return Err(RuntimeError::Invalid(
                "ranks must be at least 1 (got 0)".into(),
            ));
        }
        if ranks > kv_seq {
            let what = if kv_seq == seq { "a sequence" } else { "keys" };
            return Err(RuntimeError::Invalid(format!(
                "{ranks} ranks cannot share {what} of {kv_seq} positions: \
                 every rank needs at least one (use at most {kv_seq} ranks)"
            )));
        }
        let kv_shards = deal(kv_seq, ranks, sharding);
        let shards = if kv_seq == seq && q_offset == 0 {
            kv_shards.clone()
        } else {
            deal(seq, ranks, sharding)
                .into_iter()
                .map(|rs| {
                    rs.into_iter()
                        .map(|r| r.start + q_offset..r.end + q_offset)
                        .collect()
                })
                .collect()
        };
        Ok(RingSchedule {
            seq,
            ranks,
            sharding,
            shards,
            kv_shards,
            q_offset,
        })
    }

    /// [`RingSchedule::two_lengths`] with the lengths and offset of `x`.
    pub fn for_inputs<E: crate::tensor::HostElem>(
        x: &crate::tensor::MixerInputs<E>,
        ranks: usize,
        sharding: Sharding,
    ) -> Result<Self> {
        Self::two_lengths(x.seq, x.kv_seq, x.q_offset, ranks, sharding)
    }

    /// The key ranges `rank` owns (and sends around the ring).
    pub fn kv_shard(&self, rank: usize) -> &[Range<usize>] {
        &self.kv_shards[rank]
    }

    /// The query ranges owned by `rank` (positions).
    pub fn shard(&self, rank: usize) -> &[Range<usize>] {
        &self.shards[rank]
    }

    /// Positions owned by `rank`.
    pub fn shard_len(&self, rank: usize) -> usize {
        self.shards[rank].iter().map(|r| r.len()).sum()
    }

    /// Whose shard `rank` holds at `step`.
    pub fn held_at(&self, rank: usize, step: usize) -> usize {
        (rank + self.ranks - step % self.ranks) % self.ranks
    }

    /// Every owned range with its owner, in sequence order: the path a
    /// causal chunkwise state takes (rank to rank, possibly back again under
    /// zigzag sharding).
    pub fn ranges_in_order(&self) -> Vec<(Range<usize>, usize)> {
        let mut all: Vec<(Range<usize>, usize)> = self
            .shards
            .iter()
            .enumerate()
            .flat_map(|(r, rs)| rs.iter().map(move |x| (x.clone(), r)))
            .collect();
        all.sort_by_key(|(x, _)| x.start);
        all
    }
}

/// Carries a ring's messages between processes: the link a caller gives
/// when each process runs one rank of the ring (the Python package's
/// `torch.distributed` groups; any other message layer a library user
/// has). Ranks are the ring's, `0..ranks()`.
pub trait Transport: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// How many ranks the ring has.
    fn ranks(&self) -> usize;
    /// Sends `msg` to rank `to` (never this rank). Must not wait for the
    /// receiver to take it: every rank sends before it receives.
    fn send(&self, to: usize, msg: Vec<u8>) -> Result<()>;
    /// The next message sent to this rank, from any rank; messages from one
    /// sender arrive in the order it sent them.
    fn recv(&self) -> Result<Vec<u8>>;
}

/// A message as bytes, for rings whose ranks are in other processes
/// ([`Transport`]). Within one process messages are moved, never encoded.
pub trait Wire: Sized {
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(bytes: &mut &[u8]) -> Result<Self>;
}

/// Little-endian pieces of a [`Wire`] encoding.
pub mod wire {
    use super::{Result, RuntimeError};
    use std::ops::Range;

    fn short() -> RuntimeError {
        RuntimeError::Invalid("a ring message ended early (the ranks run different mixers?)".into())
    }

    pub fn put_usize(out: &mut Vec<u8>, x: usize) {
        out.extend_from_slice(&(x as u64).to_le_bytes());
    }
    pub fn get_usize(b: &mut &[u8]) -> Result<usize> {
        let (head, rest) = b.split_first_chunk::<8>().ok_or_else(short)?;
        *b = rest;
        usize::try_from(u64::from_le_bytes(*head)).map_err(|_| short())
    }
    /// A length-prefixed slice of plain numbers.
    pub fn put_slice<T: bytemuck::Pod>(out: &mut Vec<u8>, xs: &[T]) {
        put_usize(out, xs.len());
        out.extend_from_slice(bytemuck::cast_slice(xs));
    }
    pub fn get_vec<T: bytemuck::Pod>(b: &mut &[u8]) -> Result<Vec<T>> {
        let n = get_usize(b)?;
        let bytes = n.checked_mul(std::mem::size_of::<T>()).ok_or_else(short)?;
        if b.len() < bytes {
            return Err(short());
        }
        let (head, rest) = b.split_at(bytes);
        *b = rest;
        Ok(bytemuck::pod_collect_to_vec(head))
    }
    pub fn put_ranges(out: &mut Vec<u8>, rs: &[Range<usize>]) {
        let flat: Vec<u64> = rs
            .iter()
            .flat_map(|r| [r.start as u64, r.end as u64])
            .collect();
        put_slice(out, &flat);
    }
    pub fn get_ranges(b: &mut &[u8]) -> Result<Vec<Range<usize>>> {
        let flat: Vec<u64> = get_vec(b)?;
        Ok(flat
            .chunks_exact(2)
            .map(|p| p[0] as usize..p[1] as usize)
            .collect())
    }
}

impl Wire for usize {
    fn encode(&self, out: &mut Vec<u8>) {
        wire::put_usize(out, *self);
    }
    fn decode(bytes: &mut &[u8]) -> Result<Self> {
        wire::get_usize(bytes)
    }
}

impl<M: Wire> Wire for std::sync::Arc<M> {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
    fn decode(bytes: &mut &[u8]) -> Result<Self> {
        M::decode(bytes).map(std::sync::Arc::new)
    }
}

/// How messages reach the other ranks.
enum Link<M> {
    /// Rank threads of one process: senders to every other rank, and this
    /// rank's inbox.
    Local {
        senders: Vec<Option<Sender<M>>>,
        inbox: Receiver<M>,
    },
    /// One rank per process, through the caller's transport.
    Remote(Arc<dyn Transport>),
}

/// One rank's end of the ring.
pub struct Endpoint<M> {
    pub rank: usize,
    ranks: usize,
    link: Link<M>,
}

/// Creates the endpoints of `ranks` ranks (index = rank). Endpoints hold no
/// sender to themselves, so a rank whose peers have all finished sees a
/// closed inbox instead of waiting forever.
pub fn endpoints<M>(ranks: usize) -> Vec<Endpoint<M>> {
    let (txs, rxs): (Vec<Sender<M>>, Vec<Receiver<M>>) = (0..ranks).map(|_| channel()).unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(rank, inbox)| Endpoint {
            rank,
            ranks,
            link: Link::Local {
                senders: txs
                    .iter()
                    .enumerate()
                    .map(|(r, t)| (r != rank).then(|| t.clone()))
                    .collect(),
                inbox,
            },
        })
        .collect()
}

impl<M> Endpoint<M> {
    /// The endpoint of this process's rank in a ring over processes.
    pub fn remote(transport: Arc<dyn Transport>) -> Endpoint<M> {
        Endpoint {
            rank: transport.rank(),
            ranks: transport.ranks(),
            link: Link::Remote(transport),
        }
    }
}

impl<M: Wire> Endpoint<M> {
    /// Sends to rank `to` (not to oneself).
    pub fn send_to(&self, to: usize, msg: M) -> Result<()> {
        if to == self.rank || to >= self.ranks {
            return Err(RuntimeError::Invalid(format!(
                "rank {} tried to send to rank {to} of {}",
                self.rank, self.ranks
            )));
        }
        match &self.link {
            Link::Local { senders, .. } => senders[to]
                .as_ref()
                .expect("a sender to every other rank")
                .send(msg)
                .map_err(|_| RuntimeError::Invalid(format!("rank {to} left the ring early"))),
            Link::Remote(t) => {
                let mut bytes = Vec::new();
                msg.encode(&mut bytes);
                t.send(to, bytes)
            }
        }
    }
    /// Sends to the next rank in ring order.
    pub fn send_next(&self, msg: M) -> Result<()> {
        self.send_to((self.rank + 1) % self.ranks, msg)
    }
    /// The sum over all ranks of `mine`, on every rank: each rank's part
    /// goes once around the ring (`R - 1` hops) and every rank adds what
    /// passes through (`add(total, part)`).
    pub fn all_reduce(&self, mine: M, add: impl Fn(&mut M, &M)) -> Result<M>
    where
        M: Clone,
    {
        let mut total = mine.clone();
        let mut held = mine;
        for _ in 1..self.ranks {
            self.send_next(held)?;
            held = self.recv()?;
            add(&mut total, &held);
        }
        Ok(total)
    }
    /// Waits for the next message.
    pub fn recv(&self) -> Result<M> {
        match &self.link {
            Link::Local { inbox, .. } => inbox.recv().map_err(|_| {
                RuntimeError::Invalid(format!(
                    "rank {}: its peers left the ring before sending",
                    self.rank
                ))
            }),
            Link::Remote(t) => {
                let bytes = t.recv()?;
                let mut rest = &bytes[..];
                let msg = M::decode(&mut rest)?;
                if !rest.is_empty() {
                    return Err(RuntimeError::Invalid(format!(
                        "rank {}: a ring message had {} bytes too many (the ranks run \
                         different mixers?)",
                        self.rank,
                        rest.len()
                    )));
                }
                Ok(msg)
            }
        }
    }
}

/// One rank's rows of a ring over processes ([`Transport`]): the positions
/// it owns, in order, and the whole sequence's length; it moves the rank's
/// rows (`[batch, n, ...]`) into and out of the whole-sequence tensors
/// that `Mixer::forward_rank` and `backward_rank` take.
pub struct RankRows {
    pub seq: usize,
    /// The rank's positions, in order.
    pub positions: Vec<usize>,
}

impl RankRows {
    pub fn new(seq: usize, ranks: usize, rank: usize, sharding: Sharding) -> Result<Self> {
        let sched = RingSchedule::new(seq, ranks, sharding)?;
        let positions = sched.shard(rank).iter().flat_map(|r| r.clone()).collect();
        Ok(RankRows { seq, positions })
    }

    /// A `[batch, seq, rest...]` tensor of the whole sequence, zero except
    /// this rank's rows, which come from `local` (`[batch, n, rest...]`).
    /// The zeros are a zeroed allocation: pages never written cost nothing.
    pub fn scatter<T: Copy + Default>(&self, local: &[T], shape: &[usize]) -> Tensor<T> {
        let mut full = Tensor::<T>::zeros(shape);
        let (batch, n) = (shape[0], self.positions.len());
        let row: usize = shape[2..].iter().product();
        for b in 0..batch {
            for (t, &p) in self.positions.iter().enumerate() {
                let dst = (b * self.seq + p) * row;
                full.data[dst..dst + row].copy_from_slice(&local[(b * n + t) * row..][..row]);
            }
        }
        full
    }

    /// This rank's rows of a `[batch, seq, rest...]` tensor.
    pub fn gather<T: Copy>(&self, full: &Tensor<T>) -> Vec<T> {
        let (batch, n) = (full.shape[0], self.positions.len());
        let row: usize = full.shape[2..].iter().product();
        let mut out = Vec::with_capacity(batch * n * row);
        for b in 0..batch {
            for &p in &self.positions {
                let src = (b * self.seq + p) * row;
                out.extend_from_slice(&full.data[src..src + row]);
            }
        }
        out
    }

    /// A `[batch, heads, seq]` statistic, zero except this rank's
    /// positions, from `local` (`[batch, heads, n]`).
    pub fn scatter_stat(&self, local: &[f64], batch: usize, heads: usize) -> Tensor<f64> {
        let n = self.positions.len();
        let mut full = vec![0.0; batch * heads * self.seq];
        for x in 0..batch * heads {
            for (t, &p) in self.positions.iter().enumerate() {
                full[x * self.seq + p] = local[x * n + t];
            }
        }
        Tensor::new(vec![batch, heads, self.seq], full)
    }

    /// This rank's positions of a `[batch, heads, seq]` statistic.
    pub fn gather_stat(&self, full: &[f64]) -> Vec<f64> {
        full.chunks_exact(self.seq)
            .flat_map(|row| self.positions.iter().map(move |&p| row[p]))
            .collect()
    }
}

/// Merges two normalised softmax partials of the same query rows, in the
/// form kernels emit them: per row the output `o` over a key subset (already
/// divided by its own sum) and `lse = m + ln l`. Rows are `o.len() / lse.len()`
/// wide. The result is what one pass over both key subsets would give; a row
/// that saw no key has `lse = -inf` and contributes nothing.
pub fn merge_softmax_lse(o: &mut [f32], lse: &mut [f32], o2: &[f32], lse2: &[f32]) {
    assert_eq!(o.len(), o2.len(), "partials of different shapes");
    assert_eq!(lse.len(), lse2.len(), "partials of different shapes");
    let width = o.len().checked_div(lse.len()).unwrap_or(0);
    for r in 0..lse.len() {
        let (a, b) = (lse[r], lse2[r]);
        if b == f32::NEG_INFINITY {
            continue;
        }
        let m = a.max(b);
        let (wa, wb) = ((a - m).exp(), (b - m).exp());
        let total = wa + wb;
        let row = &mut o[r * width..(r + 1) * width];
        for (x, y) in row.iter_mut().zip(&o2[r * width..(r + 1) * width]) {
            *x = (*x * wa + *y * wb) / total;
        }
        lse[r] = m + total.ln();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_sequence() {
        for seq in [1usize, 5, 7, 37, 100, 130] {
            for ranks in 1..=8usize.min(seq) {
                for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
                    let s = RingSchedule::new(seq, ranks, sharding).unwrap();
                    let mut seen = vec![0u8; seq];
                    for r in 0..ranks {
                        assert!(s.shard_len(r) > 0, "rank {r} of {ranks} owns nothing");
                        for x in s.shard(r) {
                            x.clone().for_each(|p| seen[p] += 1);
                        }
                    }
                    assert!(seen.iter().all(|&c| c == 1), "{seq} {ranks} {sharding:?}");
                    let lens: Vec<usize> = (0..ranks).map(|r| s.shard_len(r)).collect();
                    let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                    assert!(hi - lo <= 2, "uneven shards {lens:?}");
                    // Each rank holds every shard exactly once over R steps.
                    for r in 0..ranks {
                        let mut held: Vec<usize> = (0..ranks).map(|st| s.held_at(r, st)).collect();
                        assert_eq!(held[0], r);
                        held.sort();
                        assert_eq!(held, (0..ranks).collect::<Vec<_>>());
                    }
                }
            }
        }
        let z = RingSchedule::new(16, 4, Sharding::Zigzag).unwrap();
        assert_eq!(z.shard(0), &[0..2, 14..16]);
        assert_eq!(z.shard(3).to_vec(), vec![(6..10)]);
        let one = RingSchedule::new(9, 1, Sharding::Zigzag).unwrap();
        assert_eq!(one.shard(0).to_vec(), vec![(0..9)]);
    }

    #[test]
    fn bad_rank_counts_are_errors() {
        let e = RingSchedule::new(10, 0, Sharding::Zigzag).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        let e = RingSchedule::new(3, 4, Sharding::Contiguous).unwrap_err();
        assert!(e.to_string().contains("4 ranks"), "{e}");
    }

    /// Softmax over keys 0..n split in two subsets, merged, equals the whole.
    #[test]
    fn lse_merge_equals_one_pass() {
        let scores = [0.3f32, -1.2, 2.5, 0.0, 1.1, -0.4];
        let values = [1.0f32, -2.0, 0.5, 3.0, -1.0, 2.0];
        let partial = |keys: &[usize]| -> (f32, f32) {
            if keys.is_empty() {
                return (0.0, f32::NEG_INFINITY);
            }
            let m = keys
                .iter()
                .map(|&j| scores[j])
                .fold(f32::NEG_INFINITY, f32::max);
            let l: f32 = keys.iter().map(|&j| (scores[j] - m).exp()).sum();
            let o: f32 = keys
                .iter()
                .map(|&j| (scores[j] - m).exp() * values[j])
                .sum();
            (o / l, m + l.ln())
        };
        let (want_o, want_lse) = partial(&[0, 1, 2, 3, 4, 5]);
        for split in [vec![], vec![2], vec![0, 5], vec![1, 3, 4]] {
            let rest: Vec<usize> = (0..6).filter(|j| !split.contains(j)).collect();
            let (o1, l1) = partial(&split);
            let (o2, l2) = partial(&rest);
            let (mut o, mut lse) = ([o1], [l1]);
            merge_softmax_lse(&mut o, &mut lse, &[o2], &[l2]);
            assert!(
                (o[0] - want_o).abs() < 1e-6,
                "{split:?}: {} vs {want_o}",
                o[0]
            );
            assert!((lse[0] - want_lse).abs() < 1e-6);
        }
    }

    #[test]
    fn endpoints_pass_messages_around_the_ring() {
        let eps = endpoints::<usize>(3);
        std::thread::scope(|s| {
            for ep in eps {
                s.spawn(move || {
                    ep.send_next(ep.rank).unwrap();
                    assert_eq!(ep.recv().unwrap(), (ep.rank + 2) % 3);
                    assert!(ep.send_to(ep.rank, 0).is_err());
                });
            }
        });
    }
}
