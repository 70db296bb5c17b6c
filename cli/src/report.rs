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

/// Floating-point operations per position of a transformer block besides
/// its mixer: the q, k, v and output projections and the FFN's two or
/// three matrices (2 per multiply-add).
pub fn block_flops_per_token(spec: &mixc::dsl::BlockSpec) -> f64 {
    let m = &spec.mixer;
    let w = spec.width as f64;
    let (h, kvh) = (m.heads as f64, m.kv_heads as f64);
    let (dk, dv) = (m.head_dim as f64, m.value_dim as f64);
    let ffn_mats = match spec.ffn.kind {
        mixc::dsl::FfnKind::SwiGlu => 3.0,
        mixc::dsl::FfnKind::Gelu => 2.0,
    };
    2.0 * (w * (h * dk + kvh * (dk + dv) + h * dv) + ffn_mats * w * spec.ffn.hidden as f64)
}
