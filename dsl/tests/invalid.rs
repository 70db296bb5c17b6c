//! Invalid specs: every validation rule and the common syntax errors, each
//! with its rendered diagnostics snapshotted (line, column, caret, hint).

use mixc_dsl::{parse_str, Diagnostics};

/// A valid prelude plus `body`, so each case shows one mistake.
fn with(body: &str) -> String {
    let mut s = String::from("mixer bad {\n    heads = 8;\n    head_dim = 64;\n");
    for line in body.lines() {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str("}\n");
    s
}

fn diagnose(src: &str) -> Diagnostics {
    let diags = match parse_str(src) {
        Ok(spec) => panic!("expected an error, got {spec:#?}\nfor:\n{src}"),
        Err(d) => d,
    };
    assert!(!diags.is_empty());
    // Every position must lie inside the source (columns may point one past
    // the end of a line, e.g. at end of input).
    let lines: Vec<&str> = src.split('\n').collect();
    for d in diags.iter() {
        let p = d.start();
        assert!(p.line >= 1 && p.line <= lines.len(), "{p:?} in\n{src}");
        assert!(
            p.column >= 1 && p.column <= lines[p.line - 1].chars().count() + 1,
            "{p:?} in\n{src}"
        );
    }
    diags
}

macro_rules! invalid {
    ($($name:ident: $src:expr;)*) => {$(
        #[test]
        fn $name() {
            let src: String = $src.into();
            let diags = diagnose(&src);
            insta::assert_snapshot!(stringify!($name), diags.render("bad.mix", &src));
        }
    )*};
}

invalid! {
    // ---- syntax ----
    empty_file: "";
    only_a_comment: "// nothing but a comment\n";
    missing_semicolon: "mixer bad {\n    heads = 8\n    head_dim = 64;\n}\n";
    missing_last_semicolon: "mixer bad {\n    heads = 8;\n    head_dim = 64\n}\n";
    unclosed_brace: "mixer bad {\n    heads = 8;\n    head_dim = 64;\n";
    extra_closing_brace: "mixer bad {\n    heads = 8;\n    head_dim = 64;\n}\n}\n";
    mismatched_delimiters: with("mask = window(4096];");
    garbage_tokens: with("@@ $$;");
    invalid_character: with("bias = i ` j;");
    unterminated_block_comment: "mixer bad {\n    heads = 8; /* unfinished\n    head_dim = 64;\n}\n";
    two_mixers: "mixer a {\n    heads = 8;\n    head_dim = 64;\n}\nmixer b {\n    heads = 8;\n    head_dim = 64;\n}\n";
    misspelled_mixer: "mixr bad {\n    heads = 8;\n}\n";
    missing_mixer_name: "mixer {\n    heads = 8;\n}\n";
    missing_body: "mixer bad\n";
    missing_value: with("mask = ;");
    double_equals: with("norm == softmax;");
    key_without_equals: with("mask causal;");
    incomplete_expression: with("bias = i - ;");
    inner_attribute: "#![allow(x)]\nmixer bad {\n    heads = 8;\n    head_dim = 64;\n}\n";
    input_missing_colon: with("input doc i32[batch, seq];\nmask = segment(doc);");
    input_empty_dims: with("input rel: f32[];\nbias = rel[h];");
    malformed_number: with("scale = 1e;");
    unterminated_string: with("dtype = \"bf16;");
    trailing_tokens_after_mixer: "mixer bad {\n    heads = 8;\n    head_dim = 64;\n}\nheads = 8;\n";
    keyword_as_key: with("type = 3;");
    item_starts_with_literal: with("42 = heads;");

    // ---- keys and numbers ----
    unknown_key_typo: with("haeds = 8;");
    unknown_key_no_suggestion: with("colour = 3;");
    duplicate_key: with("mask = causal;\nnorm = softmax;\nmask = all;");
    missing_heads: "mixer bad {\n    head_dim = 64;\n}\n";
    missing_heads_and_head_dim: "mixer bad {\n    mask = causal;\n}\n";
    heads_zero: "mixer bad {\n    heads = 0;\n    head_dim = 64;\n}\n";
    head_dim_too_large: "mixer bad {\n    heads = 8;\n    head_dim = 1024;\n}\n";
    heads_float: "mixer bad {\n    heads = 8.0;\n    head_dim = 64;\n}\n";
    heads_negative: "mixer bad {\n    heads = -8;\n    head_dim = 64;\n}\n";
    heads_suffix: "mixer bad {\n    heads = 8u32;\n    head_dim = 64;\n}\n";
    heads_overflow: "mixer bad {\n    heads = 99999999999999999999999;\n    head_dim = 64;\n}\n";
    kv_heads_not_dividing: with("kv_heads = 3;");
    unknown_dtype: with("dtype = fp16;");

    // ---- score ----
    unknown_score: with("score = dott(q, k);");
    score_swapped_arguments: with("score = dot(k, q);");
    unknown_feature_map: with("score = dot(softplus(q), k);");
    dot_wrong_arity: with("score = dot(q);");

    // ---- expressions ----
    unknown_variable: with("bias = x * 2.0;");
    unknown_function: with("transform = 30.0 * tahn(s / 30.0);");
    wrong_arity: with("bias = min(i - j);");
    remainder_of_float: with("bias = (i - j) % 2.5;");
    comparison_in_bias: with("bias = i < j;");
    score_outside_transform: with("bias = s * 2.0;");
    unsupported_expression: with("bias = [i, j];");
    cast_expression: with("bias = i as f32;");
    float_literal_overflow: with("bias = 1e999 * i;");
    scale_not_constant: with("scale = h * 0.1;");
    scale_not_positive: with("scale = 0.5 - 0.5;");

    // ---- inputs ----
    table_index_count: with("input rel: f32[heads, 128];\nbias = rel[h];");
    table_float_index: with("input rel: f32[heads, 128];\nbias = rel[h][i / 2];");
    table_unindexed: with("input rel: f32[heads, 128];\nbias = rel * 2.0;");
    undeclared_table: with("input rel: f32[heads, 128];\nbias = rell[h][i - j];");
    undeclared_segment_input: with("mask = causal && segment(doc);");
    unused_input: with("input doc: i32[batch, seq];\nmask = causal;");
    segment_input_wrong_type: with("input doc: f32[batch, seq];\nmask = causal && segment(doc);");
    gate_input_wrong_shape: with("input g: f32[batch, seq];\ndecay = gate(g);\nmask = causal;\nnorm = none;");
    filter_input_wrong_shape: with("input f: f32[seq, heads];\nscore = filter(f);\nmask = causal;\nnorm = none;");
    input_in_two_roles: with("input t: i32[batch, seq];\nmask = causal && segment(t);\nbias = t[0][i];");
    input_unknown_element_type: with("input g: f16[batch, seq, heads];\ndecay = gate(g);\nmask = causal;\nnorm = none;");
    input_unknown_dim: with("input doc: i32[batch, sequence];\nmask = segment(doc);");
    input_reserved_name: with("input h: f32[heads];\nbias = h[h];");
    input_declared_twice: with("input doc: i32[batch, seq];\ninput doc: i32[batch, seq];\nmask = segment(doc);");
    input_fixed_dim_zero: with("input rel: f32[heads, 0];\nbias = rel[h][0];");

    // ---- masks ----
    unknown_mask: with("mask = causl && window(4096);");
    window_zero: with("mask = causal && window(0);");
    dilated_zero: with("mask = causal && dilated(0);");
    window_without_size: with("mask = window;");
    block_sparse_zero_block: with("mask = block_sparse(block = 0, local = 2, global = 1);");
    block_sparse_unknown_argument: with("mask = block_sparse(block = 64, local = 2, globl = 1);");
    block_sparse_missing_argument: with("mask = block_sparse(block = 64, local = 2);");
    block_sparse_empty: with("mask = block_sparse(block = 64, local = 0, global = 0);");
    mask_arithmetic: with("mask = causal + window(8);");
    mask_negated: with("mask = !causal;");

    // ---- decay, norm, filter ----
    decay_without_causal_mask: with("decay = 0.9;\nmask = window(128);\nnorm = none;");
    decay_with_softmax: with("decay = 0.9;\nmask = causal;");
    decay_reads_position: with("decay = 0.9 - i * 0.01;\nmask = causal;\nnorm = none;");
    decay_reads_table: with("input t: f32[heads];\ndecay = t[h];\nmask = causal;\nnorm = none;");
    decay_out_of_range: with("decay = 0.5 + 0.25 * h;\nmask = causal;\nnorm = none;");
    filter_without_causal_mask: with("input f: f32[heads, seq];\nscore = filter(f);\nnorm = none;");
    filter_with_softmax: with("input f: f32[heads, seq];\nscore = filter(f);\nmask = causal;");
    filter_with_bias_and_decay: with("input f: f32[heads, seq];\nscore = filter(f);\nmask = causal;\nnorm = none;\nbias = -1.0 * (i - j);\ndecay = 0.9;");
    scale_with_filter: with("input f: f32[heads, seq];\nscore = filter(f);\nscale = 0.5;\nmask = causal;\nnorm = none;");
    unknown_norm: with("norm = softmx;");
    sum_eps_not_positive: with("norm = sum(eps = 0.0);");
    sum_wrong_argument: with("norm = sum(epsilon = 1e-6);");

    // ---- constants the kernels' f32 cannot hold (issue 19, defects 6 and 7) ----
    scale_beyond_f32: with("scale = 1e300;");
    scale_product_beyond_f32: with("scale = 1e20 * 1e20;");
    bias_nan_constant: with("bias = 0.0 / 0.0;");
    transform_infinite_constant: with("transform = s + exp(1000.0);");
    // ---- names (defect 8) ----
    input_fixed_dim_too_large: with("input t: f32[heads, 99999999999];\nbias = t[h][0];\nmask = causal;");
    input_name_too_long: with(&format!("input {}: f32[heads];\nbias = 0.0;", "t".repeat(129)));

    // ---- conditions, expression masks, new functions (issue 18) ----
    mask_expr_is_a_number: with("mask = i - j;");
    mask_expr_reads_score: with("mask = s > 0.0;");
    mask_expr_and_of_number: with("mask = i - j && j < 3;");
    mask_expr_not_of_number: with("mask = !(i - j);");
    mask_expr_unknown_variable: with("mask = j <= i && q > 0;");
    mask_expr_unknown_function: with("mask = foo(i) > 0;");
    mask_expr_unknown_mask_call: with("mask = causal && foo(i);");
    mask_input_used_bare: with("input flag: f32[batch, seq];\nmask = flag;");
    mask_table_read_is_a_number: with("input flag: f32[batch, seq];\nmask = causal && flag[b][j];");
    mask_expr_float_remainder: with("mask = (i - j) % 2.0 == 0;");
    mask_expr_score_with_builtin: with("mask = causal || s < 1.0;");
    neg_of_condition: with("bias = -(i > j);");
    sum_of_condition: with("bias = (i > j) + 1.0;");
    function_of_condition: with("bias = exp(i > j);");
    select_condition_is_a_number: with("bias = select(i - j, 1.0, 0.0);");
    select_mixed_branches: with("bias = select(i > j, 1.0, j < i);");
    select_wrong_arity: with("bias = select(i > j, 1.0);");
    div_of_floats: with("bias = div(i, 2.0);");
    div_wrong_arity: with("bias = div(i);");
    int_wrong_arity: with("bias = int(1.5, 2);");
    sin_wrong_arity: with("bias = sin(i, j);");
    int_of_condition: with("input rel: f32[heads, 8];\nbias = rel[h][int(i > j)];");
    if_without_else: with("transform = if s > 0.0 { s };");
    if_mixed_branches: with("transform = if s > 0.0 { s } else { s > 1.0 };");
    if_condition_is_a_number: with("bias = if i { 1.0 } else { 0.0 };");
    if_branch_with_statements: with("bias = if i > j { let x = 1.0; x } else { 0.0 };");
    chained_comparison: with("mask = j < i < 3;");
    window_float_expression: with("mask = causal && window(4 * 1024.0);");
    window_negative_expression: with("mask = causal && window(2 - 8);");
    window_zero_expression: with("mask = causal && window(4 * 0);");
    window_of_variable: with("mask = causal && window(seq);");
    heads_float_expression: with("value_dim = 2 * 4.5;");
    heads_pow_is_float: with("value_dim = pow(2, 3);");
    scale_underflows_f32: with("scale = 1e-46;");
    input_reserved_b: with("input b: f32[batch];\nbias = b[0];");
    input_reserved_seq: with("input seq: f32[heads];\nbias = seq[h];");
    decay_reads_batch: with("decay = 0.9 + 0.0 * b;\nmask = causal;\nnorm = none;");
    scale_reads_seq: with("scale = 1.0 / seq;");
    bias_is_condition_of_tables: with("input t: f32[heads];\nbias = t[h] > 0.0;");
}

/// A mixer name of more than `MAX_IDENT_CHARS` characters is refused (a
/// multi-megabyte name once took minutes to compile), and quickly.
#[test]
fn a_long_mixer_name_is_refused() {
    let src = format!(
        "mixer {} {{ heads = 2; head_dim = 8; }}",
        "m".repeat(500_000)
    );
    let t0 = std::time::Instant::now();
    let d = parse_str(&src).unwrap_err();
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
    let msg = d.render("long.mix", &src);
    assert!(
        msg.contains("500000 characters long, more than the 128 allowed"),
        "{}",
        &msg[..msg.len().min(400)]
    );
    // The excerpt shows a window of the line, not half a megabyte of it.
    assert!(msg.len() < 1000, "{}", &msg[..msg.len().min(400)]);
    assert!(
        msg.contains("| mixer mmmm") && msg.contains("m..."),
        "{msg}"
    );
    // At the limit it is fine.
    parse_str(&format!(
        "mixer {} {{ heads = 2; head_dim = 8; }}",
        "m".repeat(128)
    ))
    .unwrap();
}

/// Extents beyond any sequence (`window(2^63 - 1)`, even `u64::MAX`) are
/// accepted and act as `MAX_EXTENT`, so the block arithmetic that adds them
/// to positions cannot overflow.
#[test]
fn huge_mask_extents_saturate() {
    for w in ["9223372036854775807", "18446744073709551615"] {
        let spec = parse_str(&format!(
            "mixer w {{ heads = 2; head_dim = 8; mask = causal && window({w}) && prefix_lm({w}); }}"
        ))
        .unwrap();
        let text = format!("{:?}", spec.mask);
        assert!(text.contains(&mixc_dsl::MAX_EXTENT.to_string()), "{text}");
    }
}

#[test]
fn three_independent_mistakes_give_three_diagnostics() {
    let src = with("dtype = fp16;\nmask = causal && window(0);\nbias = tahn(i);");
    let d = diagnose(&src);
    let msgs: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 3, "{msgs:#?}");
    // In source order, one per line.
    let lines: Vec<usize> = d.iter().map(|d| d.start().line).collect();
    assert_eq!(lines, vec![4, 5, 6]);
    assert!(msgs[0].contains("fp16") && msgs[1].contains("window(0)") && msgs[2].contains("tahn"));
}

#[test]
fn diagnostics_point_at_the_offending_tokens() {
    let src = with("mask = causl && window(4096);");
    let d = diagnose(&src);
    let first = d.iter().next().unwrap();
    assert_eq!((first.start().line, first.start().column), (4, 12));
    assert_eq!(first.end().column - first.start().column, "causl".len());
    assert_eq!(first.hint.as_deref(), Some("did you mean `causal`?"));
}

#[test]
fn compile_errors_carry_message_and_hint() {
    let d = diagnose(&with("haeds = 8;"));
    let ts = d.to_compile_error().to_string();
    assert!(ts.contains("compile_error"), "{ts}");
    assert!(
        ts.contains("unknown key `haeds`") && ts.contains("did you mean `heads`?"),
        "{ts}"
    );
}

#[test]
fn parse_file_reports_io_and_invalid() {
    let missing = std::path::Path::new("/nonexistent/dir/x.mix");
    let e = mixc_dsl::parse_file(missing).unwrap_err();
    assert!(matches!(e, mixc_dsl::SpecError::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/dir/x.mix"));

    let dir = std::env::temp_dir().join(format!("mixc-dsl-invalid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.mix");
    std::fs::write(&path, with("mask = causl;\nnorm = nope;")).unwrap();
    let e = mixc_dsl::parse_file(&path).unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    match &e {
        mixc_dsl::SpecError::Invalid { rendered, count } => {
            assert_eq!(*count, 2);
            assert!(
                rendered.contains("bad.mix:4:12: error: unknown mask `causl`"),
                "{rendered}"
            );
            assert!(
                rendered.contains("bad.mix:5:12: error: unknown norm `nope`"),
                "{rendered}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("2 errors"));
}
