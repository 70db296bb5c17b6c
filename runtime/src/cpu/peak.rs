//! The machine's practical limit for the CPU path's arithmetic: the blocked
//! path's own tile products (the f32 microkernel, and the bf16 one where the
//! CPU has AVX-512 BF16) timed on in-cache tiles of the shape the forward
//! uses, on every worker at once. A benchmark's useful GFLOP/s divided by
//! these rates is the fraction of the limit it reaches (`mixc bench --peak`).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bf16::{self, Pairs};
use super::microkernel::{detected_isa, gemm_tn, Isa, Mat, MatMut};

/// Measured rates of the tile products, in GFLOP/s over all threads.
#[derive(Debug, Clone, Serialize)]
pub struct PeakRates {
    pub threads: usize,
    /// The f32 kernel's instruction set: `avx512`, `avx2` or `portable`.
    pub isa: &'static str,
    /// `Sᵀ = K Qᵀ` in f32 on a 64-key x 64-query tile, d = 128.
    pub f32_gflops: f64,
    /// The same product in bf16 pairs (`vdpbf16ps`), where the CPU has it.
    pub bf16_gflops: Option<f64>,
}

/// Tile shape: keys x queries x head dim, as the forward's default tiles.
const M: usize = 64;
const N: usize = 64;
const K: usize = 128;

/// Times both kernels for about `per_kernel` each on `threads` threads.
pub fn peak_rates(threads: usize, per_kernel: Duration) -> PeakRates {
    let threads = threads.max(1);
    let f32_gflops = rate(threads, per_kernel, |_| {
        let a: Vec<f32> = (0..K * M).map(|x| (x % 7) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..K * N).map(|x| (x % 5) as f32 * 0.01).collect();
        let mut c = vec![0.0f32; M * N];
        move || {
            gemm_tn(
                Mat::dense(&a, K, M),
                Mat::dense(&b, K, N),
                MatMut::dense(&mut c, M, N),
                false,
            );
            std::hint::black_box(&mut c);
        }
    });
    let bf16_gflops = bf16::enabled().then(|| {
        rate(threads, per_kernel, |_| {
            let a: Vec<u32> = (0..M * K / 2)
                .map(|x| bf16::pair(x as f32 * 1e-3, 0.5))
                .collect();
            let b: Vec<u32> = (0..K / 2 * N)
                .map(|x| bf16::pair(0.25, x as f32 * 1e-3))
                .collect();
            let mut c = vec![0.0f32; M * N];
            move || {
                bf16::gemm(
                    false,
                    Pairs::dense(&a, M, K / 2),
                    Pairs::dense(&b, K / 2, N),
                    &mut c,
                    N,
                    M,
                    1.0,
                    false,
                );
                std::hint::black_box(&mut c);
            }
        })
    });
    PeakRates {
        threads,
        isa: match detected_isa() {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        },
        f32_gflops,
        bf16_gflops,
    }
}

/// GFLOP/s of `threads` threads each calling its own kernel (built by
/// `make`, so every thread's tiles stay in its own cache) for about `span`:
/// all threads' calls over the slowest thread's time.
fn rate<F: FnMut() + Send>(
    threads: usize,
    span: Duration,
    make: impl Fn(usize) -> F + Sync,
) -> f64 {
    let start = Barrier::new(threads);
    let (calls, secs) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, make) = (&start, &make);
                s.spawn(move || {
                    let mut kernel = make(t);
                    kernel(); // warm the caches
                    start.wait();
                    let t0 = Instant::now();
                    let mut n = 0u64;
                    while t0.elapsed() < span {
                        for _ in 0..16 {
                            kernel();
                        }
                        n += 16;
                    }
                    (n, t0.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("peak worker"))
            .fold((0u64, 0.0f64), |(n, s), (m, t)| (n + m, s.max(t)))
    });
    calls as f64 * (2 * M * N * K) as f64 / secs / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rates_are_positive_and_bf16_only_where_enabled() {
        let p = peak_rates(1, Duration::from_millis(20));
        assert!(p.f32_gflops > 0.1, "{p:?}");
        assert_eq!(p.bf16_gflops.is_some(), bf16::enabled());
        if let Some(b) = p.bf16_gflops {
            assert!(b > 0.1, "{p:?}");
        }
    }
}
