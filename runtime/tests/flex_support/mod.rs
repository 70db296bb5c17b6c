//! PyTorch's FlexAttention test mods (and the patterns the language adds)
//! written as mixc spec items: shared by the CPU parity test
//! (`flex_parity.rs`, against an f64 FlexAttention-style oracle) and the
//! PTX-simulator test (`twin/flex.rs`, the generated CUDA kernels against
//! the reference), so both walk the same list. Plain `mixc_dsl` only: the
//! simulator test is compiled inside the runtime crate.
#![allow(dead_code)]

/// Query heads and head width of every case.
pub const HEADS: usize = 4;
pub const DIM: usize = 16;

/// (name, spec items after `heads`, `head_dim`, `dtype`).
pub const SPECS: &[(&str, &str)] = &[
    ("identity", ""),
    ("times_two", "transform = s * 2.0;"),
    ("squared", "transform = s * s;"),
    ("causal", "mask = j <= i;"),
    ("inverse_causal", "mask = i <= j;"),
    ("strictly_past", "mask = j < i;"),
    ("rel_bias", "bias = i - j;"),
    ("rel_causal", "bias = i - j; mask = causal;"),
    ("alibi", "bias = (j - i) * pow(2.0, -(h + 1) * 8.0 / 4.0);"),
    ("alibi_slope", "bias = alibi_slope(h) * (j - i);"),
    (
        "head_offset",
        "input off: f32[heads]; transform = s * off[h];",
    ),
    (
        "trig",
        "transform = sin(cos(s)) + sin(1.0 * b) / cos(1.0 * b);",
    ),
    (
        "trig2",
        "transform = cos(s) * sin(s) + sin(1.0 * b) / cos(1.0 * b);",
    ),
    ("windowed", "mask = i + 3 >= j;"),
    (
        "prefix_lm_per_example",
        "input prefix: f32[batch]; mask = j <= int(prefix[b]) || j <= i;",
    ),
    (
        "document",
        "input doc: i32[batch, seq]; mask = segment(doc);",
    ),
    // i32 tables read in expressions (lengths and ids as PyTorch holds them).
    (
        "prefix_lm_i32_lengths",
        "input plen: i32[batch]; mask = j < plen[b] || j <= i;",
    ),
    (
        "document_i32_expression",
        "input ids: i32[batch, seq]; mask = j <= i && ids[b][i] == ids[b][j]; \
         bias = 0.25 * ids[b][j];",
    ),
    (
        "causal_document_expression",
        "input doc: f32[batch, seq]; mask = j <= i && doc[b][i] == doc[b][j];",
    ),
    ("sliding_window", "mask = j <= i && i - j <= 8;"),
    ("softcap", "transform = 0.5 * tanh(s / 0.5);"),
    ("batch_bias", "input bb: f32[batch]; bias = bb[b];"),
    (
        "batch_head_bias",
        "input bh: f32[batch, heads]; bias = bh[b][h]; mask = causal;",
    ),
    ("per_head_window", "mask = j <= i && i - j < 8 * (h + 1);"),
    ("expression_dilation", "mask = (i - j) % 4 == 0;"),
    (
        "t5_log_buckets",
        "input rel: f32[heads, 16]; bias = rel[h][select(abs(i - j) < 8, abs(i - j), \
                    min(8 + int(log(abs(i - j) / 8.0) / log(16.0) * 8.0), 15))];",
    ),
    (
        "sigmoid_length_bias",
        "bias = -log(1.0 * kv_seq); mask = j <= i || j >= seq - 4;",
    ),
    (
        "global_tokens_flag",
        "input flag: f32[batch, seq]; mask = j <= i && (flag[b][j] > 0.5 || i - j < 4);",
    ),
    (
        "additive_neg_inf",
        "input am: f32[batch, seq]; bias = am[b][j];",
    ),
    (
        "select_bias",
        "bias = select(i > j, -0.5 * (i - j), 0.0); mask = !(j > i + 2);",
    ),
    ("chunked", "mask = j <= i && div(i, 16) == div(j, 16);"),
];

/// The spec of case `name` in `dtype`.
pub fn spec(name: &str, dtype: &str) -> mixc_dsl::ir::MixerSpec {
    let (_, items) = SPECS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let src =
        format!("mixer {name} {{ heads = {HEADS}; head_dim = {DIM}; dtype = {dtype}; {items} }}");
    mixc_dsl::parse_str(&src).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Overwrites the elements of table `name` (row-major `shape`) that
/// [`table_value`] sets.
/// [`fill_table`] for an i32 table (the same integral values).
pub fn fill_table_i32(name: &str, shape: &[usize], data: &mut [i32]) {
    let mut f: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    fill_table(name, shape, &mut f);
    data.iter_mut().zip(f).for_each(|(x, y)| *x = y as i32);
}

pub fn fill_table(name: &str, shape: &[usize], data: &mut [f32]) {
    for (e, v) in data.iter_mut().enumerate() {
        let (mut idx, mut r) = (vec![0; shape.len()], e);
        for d in (0..shape.len()).rev() {
            idx[d] = r % shape[d];
            r /= shape[d];
        }
        if let Some(y) = table_value(name, &idx) {
            *v = y;
        }
    }
}

/// The value a case's table holds at `idx` (`None`: keep the random one),
/// chosen so each case bites: per-example prefixes 5 and 23, documents of
/// 11 positions, a flag on every tenth key, and an additive mask hiding all
/// keys but multiples of 3 in batch row 1.
pub fn table_value(name: &str, idx: &[usize]) -> Option<f32> {
    Some(match name {
        "prefix" | "plen" => [5.0, 23.0][idx[0] % 2],
        "doc" | "ids" => (idx[1] / 11) as f32,
        "flag" => f32::from(idx[1] % 10 == 3),
        "am" if idx[0] == 1 && !idx[1].is_multiple_of(3) => f32::NEG_INFINITY,
        "am" => 0.0,
        _ => return None,
    })
}
