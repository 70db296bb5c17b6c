//! Run metrics shared by `run`, `tune` and `bench`: useful work counts only
//! unmasked pairs, so masked variants are not flattered.

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Floating-point operations per unmasked (query, key) pair and head: the
/// score dot product (2 d_k) and the weighted value sum (2 d_v); the
/// convolution family has no dot product.
pub fn flops_per_pair(spec: &mixc::dsl::MixerSpec) -> f64 {
    let dv = spec.value_dim as f64;
    match spec.score {
        mixc::dsl::Score::Dot { .. } => 2.0 * spec.head_dim as f64 + 2.0 * dv,
        mixc::dsl::Score::Filter { .. } => 2.0 * dv,
    }
}
