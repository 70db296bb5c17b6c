//! A paged KV cache (vLLM, FlashInfer, FlexDecoding): keys and values in
//! fixed-size pages `[num_pages, page_size, kv_heads, dim]`, each sequence's
//! pages listed in a block table `[batch, max_pages]` and its length in
//! `seq_lens`. Row `b`'s key `t` is slot `t % page_size` of page
//! `block_table[b][t / page_size]`; its queries (`q [batch, seq, heads,
//! head_dim]`) are its last `seq` positions, as with any KV cache.
//!
//! The CPU and reference backends gather each sequence's pages into one
//! packed key/value buffer (one pass over the keys) and run the packed
//! batch ([`crate::varlen`]), so every mask, bias and family behaves as
//! with a contiguous cache.

use std::collections::BTreeMap;

use mixc_dsl::ir::{Dim, MixerSpec};

use crate::error::{Result, RuntimeError};
use crate::tensor::{ExtraTensor, MixerInputs, Tensor};
use crate::varlen::Varlen;

/// A paged KV cache, borrowed for one call.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// `[num_pages, page_size, kv_heads, head_dim]`.
    pub k: &'a Tensor<f32>,
    /// `[num_pages, page_size, kv_heads, value_dim]`.
    pub v: &'a Tensor<f32>,
    /// `[batch, max_pages]`: row `b`'s pages in order (entries past its
    /// length are not read).
    pub block_table: &'a Tensor<i32>,
    /// Keys of each row, `batch` entries.
    pub seq_lens: &'a [usize],
}

fn bad(name: &str, problem: String) -> RuntimeError {
    RuntimeError::BadInput {
        name: name.into(),
        problem,
    }
}

impl PagedKv<'_> {
    pub fn page_size(&self) -> usize {
        self.k.shape.get(1).copied().unwrap_or(0)
    }

    /// Errors naming the tensor unless the cache and `q` fit `spec`.
    fn check(&self, spec: &MixerSpec, q: &Tensor<f32>) -> Result<()> {
        for d in &spec.inputs {
            if d.dims.contains(&Dim::Seq) {
                return Err(bad(
                    &d.name,
                    "is indexed by position; with a paged cache give inputs without a \
                     `seq` axis (tables, one entry per row)"
                        .into(),
                ));
            }
        }
        let (kvh, dk, dv) = (
            spec.kv_heads as usize,
            spec.head_dim as usize,
            spec.value_dim as usize,
        );
        let (pages, size) = (self.k.shape.first().copied().unwrap_or(0), self.page_size());
        for (name, t, d) in [("k", self.k, dk), ("v", self.v, dv)] {
            if t.shape.len() != 4
                || t.shape[0] != pages
                || t.shape[1] != size
                || t.shape[2] != kvh
                || t.shape[3] != d
                || size == 0
            {
                return Err(bad(
                    name,
                    format!(
                        "a paged cache is [num_pages, page_size >= 1, kv_heads={kvh}, dim={d}] \
                         (k and v alike), got {:?}",
                        t.shape
                    ),
                ));
            }
        }
        let batch = self.seq_lens.len();
        if q.shape.len() != 4 || q.shape[0] != batch {
            return Err(bad(
                "q",
                format!(
                    "must be [batch={batch}, seq, heads, head_dim] (one row per entry of \
                     seq_lens), got {:?}",
                    q.shape
                ),
            ));
        }
        let bt = self.block_table;
        if bt.shape.len() != 2 || bt.shape[0] != batch {
            return Err(bad(
                "block_table",
                format!("must be [batch={batch}, max_pages], got {:?}", bt.shape),
            ));
        }
        let max_pages = bt.shape[1];
        for (b, &len) in self.seq_lens.iter().enumerate() {
            let need = len.div_ceil(size);
            if need > max_pages {
                return Err(bad(
                    "block_table",
                    format!(
                        "row {b} holds {len} keys, {need} pages of {size}, but the table has \
                         {max_pages} columns"
                    ),
                ));
            }
            for c in 0..need {
                let p = bt.data[b * max_pages + c];
                if p < 0 || p as usize >= pages {
                    return Err(bad(
                        "block_table",
                        format!("row {b} column {c} names page {p}, outside 0..{pages}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The packed batch these rows make: q's rows read in place, the pages
    /// gathered into packed keys and values; and its boundaries.
    pub(crate) fn packed(
        &self,
        spec: &MixerSpec,
        q: &Tensor<f32>,
        extra: &BTreeMap<String, ExtraTensor>,
    ) -> Result<(MixerInputs, Varlen)> {
        self.check(spec, q)?;
        let (batch, sq) = (q.shape[0], q.shape[1]);
        let cu_q: Vec<usize> = (0..=batch).map(|b| b * sq).collect();
        let mut cu_kv = vec![0];
        for &l in self.seq_lens {
            cu_kv.push(cu_kv.last().copied().unwrap_or(0) + l);
        }
        let varlen = Varlen::new(cu_q, cu_kv)?;
        let total = varlen.total_kv();
        let size = self.page_size();
        let max_pages = self.block_table.shape[1];
        let gather = |t: &Tensor<f32>| -> Tensor<f32> {
            let row: usize = t.shape[2..].iter().product();
            let mut out = Vec::with_capacity(total * row);
            for (b, &len) in self.seq_lens.iter().enumerate() {
                for pos in 0..len {
                    let page = self.block_table.data[b * max_pages + pos / size] as usize;
                    let src = (page * size + pos % size) * row;
                    out.extend_from_slice(&t.data[src..src + row]);
                }
            }
            let mut shape = t.shape.clone();
            shape[0] = 1;
            shape[1] = total;
            Tensor::new(shape, out)
        };
        let mut qs = q.shape.clone();
        qs[0] = 1;
        qs[1] = batch * sq;
        // SAFETY: q's memory, one call long, viewed as its rows packed
        // ([batch, sq, ...] is [1, batch * sq, ...] in memory).
        let q_packed = unsafe { Tensor::borrowed(qs, q.data.as_ptr()) };
        let mut x = MixerInputs::new(q_packed, gather(self.k), gather(self.v));
        x.extra = extra.clone();
        Ok((x, varlen))
    }
}

/// An owned paged cache made from contiguous keys and values (for tests,
/// benchmarks and `mixc run --paged`): each row's positions cut into pages
/// of `page_size`, the pages placed in a shuffled order (from `seed`) with
/// two unused pages among them.
#[derive(Debug, Clone)]
pub struct Pages {
    pub k: Tensor<f32>,
    pub v: Tensor<f32>,
    pub block_table: Tensor<i32>,
    pub seq_lens: Vec<usize>,
}

impl Pages {
    /// Pages holding `k` and `v` (`[batch, kv_seq, kv_heads, dim]`).
    pub fn from_contiguous(
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        page_size: usize,
        seed: u64,
    ) -> Result<Pages> {
        if page_size == 0 {
            return Err(bad("page_size", "must be at least 1".into()));
        }
        let (batch, len) = (v.shape[0], v.shape[1]);
        let per_row = len.div_ceil(page_size);
        let pages = batch * per_row + 2;
        // A fixed shuffle: a step coprime with the page count.
        let step = (1..)
            .map(|s| 2 * s + 1 + (seed as usize % 7) * 2)
            .find(|s| gcd(*s, pages) == 1)
            .unwrap_or(1);
        let order: Vec<usize> = (0..pages).map(|i| (i * step + 1) % pages).collect();
        let mut table = vec![-1i32; batch * per_row.max(1)];
        let place = |t: &Tensor<f32>| -> Tensor<f32> {
            let row: usize = t.shape[2..].iter().product();
            let mut out = Tensor::zeros(&[pages, page_size, t.shape[2], t.shape[3]]);
            for b in 0..batch {
                for pos in 0..len {
                    let page = order[b * per_row + pos / page_size];
                    let dst = (page * page_size + pos % page_size) * row;
                    let src = (b * len + pos) * row;
                    out.data[dst..dst + row].copy_from_slice(&t.data[src..src + row]);
                }
            }
            out
        };
        for b in 0..batch {
            for c in 0..per_row {
                table[b * per_row.max(1) + c] = order[b * per_row + c] as i32;
            }
        }
        Ok(Pages {
            k: if k.data.is_empty() {
                k.clone()
            } else {
                place(k)
            },
            v: place(v),
            block_table: Tensor::new(vec![batch, per_row.max(1)], table),
            seq_lens: vec![len; batch],
        })
    }

    /// The borrowed cache a call takes.
    pub fn as_paged(&self) -> PagedKv<'_> {
        PagedKv {
            k: &self.k,
            v: &self.v,
            block_table: &self.block_table,
            seq_lens: &self.seq_lens,
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_hold_every_position_once_through_the_table() {
        let (batch, len, kvh, d) = (3, 37, 2, 4);
        let k = Tensor::new(
            vec![batch, len, kvh, d],
            (0..batch * len * kvh * d).map(|x| x as f32).collect(),
        );
        for page in [1, 16, 64] {
            let p = Pages::from_contiguous(&k, &k, page, 5).unwrap();
            let per_row = len.div_ceil(page);
            let mut used: Vec<i32> = p.block_table.data.to_vec();
            used.sort();
            used.dedup();
            assert_eq!(used.len(), batch * per_row, "pages are not shared");
            assert!(p.k.shape[0] >= batch * per_row + 2, "unused pages exist");
            for b in 0..batch {
                for pos in 0..len {
                    let page_no = p.block_table.data[b * per_row + pos / page] as usize;
                    let at = (page_no * page + pos % page) * kvh * d;
                    let want = (b * len + pos) * kvh * d;
                    assert_eq!(p.k.data[at], want as f32, "page {page} row {b} pos {pos}");
                }
            }
        }
        assert!(Pages::from_contiguous(&k, &k, 0, 1).is_err());
    }
}
