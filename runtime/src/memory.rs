//! Sizes and host-memory admission.
//!
//! Every product of shape dimensions goes through [`checked_elems`], so an
//! overflow is an error naming the dimensions, never a wrapped size or a
//! "capacity overflow" panic. A run's host bytes are estimated from the
//! shapes ([`run_host_bytes`]) and compared with the memory this process
//! can still use ([`available_host_bytes`]: `MemAvailable`, and the cgroup
//! limit when one is set) before anything is allocated.

use mixc_dsl::ir::MixerSpec;

use crate::error::{Result, RuntimeError};

/// `prod(dims)` elements, or an error naming the dims when it overflows.
pub fn checked_elems(what: &str, dims: &[(&str, usize)]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &(_, d)| acc.checked_mul(d))
        .ok_or_else(|| {
            let shown: Vec<String> = dims.iter().map(|(n, d)| format!("{n} {d}")).collect();
            RuntimeError::SizeOverflow {
                what: what.to_string(),
                dims: shown.join(" x "),
            }
        })
}

/// `elems * bytes_per_elem`, checked.
pub(crate) fn checked_bytes(
    what: &str,
    dims: &[(&str, usize)],
    bytes_per_elem: usize,
) -> Result<u64> {
    let mut with_bytes = dims.to_vec();
    with_bytes.push(("bytes", bytes_per_elem));
    Ok(checked_elems(what, &with_bytes)? as u64)
}

/// How a run keeps its tensors on the host, for [`run_host_bytes_kv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLayout {
    /// Bytes of an element of q, k and v (4 for f32, 2 for bf16 or f16).
    pub elem_bytes: usize,
    /// Bytes per output element at the peak: the output in its type, plus
    /// 4 where each rank first keeps its rows in f32 (a ring).
    pub out_bytes: usize,
    /// The reference's f64 output besides.
    pub f64_out: bool,
    /// Copies of k and v (at `elem_bytes`) the backend makes: the CPU
    /// ring's shards, CUDA's encoded copies on their way up.
    pub kv_copies: u64,
}

impl HostLayout {
    /// Everything f32.
    pub fn f32(f64_out: bool, kv_copies: u64) -> HostLayout {
        HostLayout {
            elem_bytes: 4,
            out_bytes: 4,
            f64_out,
            kv_copies,
        }
    }
}

/// Host bytes of a run of `spec` at `batch x seq`: `(inputs, the rest)`.
/// Inputs are every tensor the spec reads, stored as f32 (or i32); the rest
/// is the output `o` (f32) plus, for `f64_out`, the reference's f64 output,
/// and `scratch_copies` copies of k and v (the CPU ring's key/value shards).
pub fn run_host_bytes(
    spec: &MixerSpec,
    batch: usize,
    seq: usize,
    f64_out: bool,
    scratch_copies: u64,
) -> Result<(u64, u64)> {
    run_host_bytes_kv(
        spec,
        batch,
        seq,
        seq,
        HostLayout::f32(f64_out, scratch_copies),
    )
}

/// [`run_host_bytes`] for `seq` queries against `kv_seq` keys, with the
/// tensors kept as `layout` says.
pub fn run_host_bytes_kv(
    spec: &MixerSpec,
    batch: usize,
    seq: usize,
    kv_seq: usize,
    layout: HostLayout,
) -> Result<(u64, u64)> {
    let mut inputs = 0u64;
    let mut kv = 0u64;
    for (name, shape) in spec.tensor_shapes_kv(batch, seq, kv_seq) {
        let dims: Vec<(&str, usize)> = shape
            .iter()
            .zip(axis_names(&name, shape.len()))
            .map(|(&d, n)| (n, d))
            .collect();
        let size = if matches!(name.as_str(), "q" | "k" | "v") {
            layout.elem_bytes
        } else {
            4
        };
        let b = checked_bytes(&format!("input `{name}`"), &dims, size)?;
        if name == "k" || name == "v" {
            kv = kv.saturating_add(b);
        }
        inputs = inputs.saturating_add(b);
    }
    let out_dims = [
        ("batch", batch),
        ("seq", seq),
        ("heads", spec.heads as usize),
        ("value_dim", spec.value_dim as usize),
    ];
    let mut rest = checked_bytes("the output `o`", &out_dims, layout.out_bytes)?;
    if layout.f64_out {
        rest = rest.saturating_add(checked_bytes("the reference output", &out_dims, 8)?);
    }
    rest = rest.saturating_add(kv.saturating_mul(layout.kv_copies));
    Ok((inputs, rest))
}

fn axis_names(name: &str, rank: usize) -> Vec<&'static str> {
    match (name, rank) {
        ("q", 4) | ("k", 4) | ("v", 4) => vec!["batch", "seq", "heads", "dim"],
        _ => vec!["dim"; rank],
    }
}

/// Bytes this process can still allocate: `MemAvailable` from
/// `/proc/meminfo`, lowered to the cgroup's remaining limit where one is
/// set (cgroup v2 `memory.max - memory.current`, or v1's
/// `limit_in_bytes - usage_in_bytes`). `None` where neither can be read.
pub fn available_host_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let field = |key: &str| -> Option<u64> {
        meminfo.as_deref()?.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
    };
    let read_u64 =
        |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = match (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => match (
            read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ) {
            // v1 reports "no limit" as a huge number.
            (Some(max), Some(cur)) if max < (1 << 60) => Some(max.saturating_sub(cur)),
            _ => None,
        },
    };
    match (field("MemAvailable"), cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// Total host memory (`MemTotal`), for messages.
fn total_host_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let rest = l.strip_prefix("MemTotal:")?;
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// `Ok` when `needed` more bytes fit in the host memory still available,
/// else [`RuntimeError::OutOfMemory`] with both figures. Where the
/// available memory cannot be read, everything is admitted.
pub fn admit_host(needed: u64) -> Result<()> {
    match available_host_bytes() {
        Some(available) if needed > available => Err(RuntimeError::OutOfMemory {
            device: "host".into(),
            needed: usize::try_from(needed).unwrap_or(usize::MAX),
            available: usize::try_from(available).unwrap_or(usize::MAX),
            total: usize::try_from(total_host_bytes()).unwrap_or(usize::MAX),
        }),
        _ => Ok(()),
    }
}

/// Hands the whole pages inside `buf` back to the operating system now
/// (Linux: `madvise(MADV_DONTNEED)`), for a large buffer whose contents
/// are spent but which is dropped later: copying a rank's result into the
/// output slab by slab, the process then holds one slab of both, not two
/// whole copies. Afterwards the released elements read as zero (hence
/// `&mut`: the caller gives up their values). Elsewhere a no-op.
pub(crate) fn release_pages<T: bytemuck::Pod>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = bytemuck::cast_slice_mut::<T, u8>(buf);
        let start = bytes.as_mut_ptr() as usize;
        let first = start.next_multiple_of(PAGE);
        let end = (start + bytes.len()) / PAGE * PAGE;
        if end > first {
            // SAFETY: [first, end) lies inside `buf`, which this call
            // borrows mutably, and is page aligned. MADV_DONTNEED on private
            // anonymous memory (what the allocator hands out) only replaces
            // those pages by zero-filled ones on their next touch: no other
            // memory is affected, and the values it drops are `buf`'s, which
            // the caller gave up.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Released elements read as zero; those outside the whole pages keep
    /// their values; the buffer stays usable.
    #[test]
    fn released_pages_read_as_zero() {
        let mut v = vec![1.5f32; 10_000];
        release_pages(&mut v[100..9000]);
        assert!(v[..100].iter().all(|&x| x == 1.5));
        assert!(v[9000..].iter().all(|&x| x == 1.5));
        #[cfg(target_os = "linux")]
        assert!(v[2048..8000].contains(&0.0));
        v[5000] = 2.0;
        assert_eq!(v[5000], 2.0);
    }

    fn spec() -> MixerSpec {
        mixc_dsl::parse_str("mixer m { heads = 32; kv_heads = 8; head_dim = 128; mask = causal; }")
            .unwrap()
    }

    #[test]
    fn overflowing_shapes_are_errors_naming_the_dims() {
        let e = run_host_bytes(&spec(), 1, usize::MAX, false, 0).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, RuntimeError::SizeOverflow { .. }), "{e:?}");
        assert!(
            m.contains(&format!("seq {}", usize::MAX)) && m.contains("heads 8"),
            "{m}"
        );
        // 2^62 x 4 wraps to 0 in unchecked arithmetic.
        assert!(run_host_bytes(&spec(), 4, 1 << 62, false, 0).is_err());
        assert!(checked_elems("x", &[("a", 1 << 40), ("b", 1 << 30)]).is_err());
        assert_eq!(checked_elems("x", &[("a", 3), ("b", 5)]).unwrap(), 15);
    }

    #[test]
    fn run_bytes_add_up() {
        // q 32 heads, k and v 8 heads, d 128, f32: (32 + 8 + 8) * 128 * 4 bytes per position.
        let (inputs, rest) = run_host_bytes(&spec(), 2, 100, false, 2).unwrap();
        assert_eq!(inputs, 2 * 100 * 48 * 128 * 4);
        assert_eq!(rest, 2 * 100 * 32 * 128 * 4 + 2 * (2 * 100 * 16 * 128 * 4));
    }

    #[test]
    fn admission_refuses_what_cannot_fit() {
        if let Some(avail) = available_host_bytes() {
            assert!(avail > 0);
            let e = admit_host(avail.saturating_mul(2).max(1 << 50)).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains("out of host memory") && m.contains("free"),
                "{m}"
            );
            assert!(admit_host(1 << 20).is_ok());
        }
    }
}
