//! Validation: the unchecked item list to a `MixerSpec`, or diagnostics.
//!
//! Every key is checked on its own first (so independent mistakes are all
//! reported), then the cross-key rules run on whatever survived.

use crate::diag::{Diagnostic, Diagnostics};
use crate::ir::*;
use crate::syntax::{InputItem, Item, KeyItem, RawDim, RawSpec};
use proc_macro2::{Ident, Span};
use syn::spanned::Spanned;

/// Every key the language knows, in documentation order.
pub const KEYS: &[&str] = &[
    "heads",
    "kv_heads",
    "head_dim",
    "value_dim",
    "dtype",
    "score",
    "scale",
    "bias",
    "transform",
    "mask",
    "decay",
    "norm",
];

const MASKS: &[&str] = &[
    "all",
    "causal",
    "window",
    "prefix_lm",
    "segment",
    "block_sparse",
    "dilated",
];

const FUNCS: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "tanh",
    "abs",
    "floor",
    "min",
    "max",
    "pow",
    "clamp",
    "alibi_slope",
    "sin",
    "cos",
    "sigmoid",
    "select",
    "int",
    "div",
];

/// Largest accepted `heads` / `kv_heads` (far above any real model; keeps
/// per-head checks and launch grids bounded).
pub const MAX_HEADS: u64 = 65536;

/// Largest accepted `head_dim` / `value_dim`: what one tile row can hold.
pub const MAX_HEAD_DIM: u64 = 512;

/// Longest accepted mixer or input name, in characters: names become
/// kernel symbols and file names.
pub const MAX_IDENT_CHARS: usize = 128;

/// Largest mask extent that means something (window sizes, prefix lengths,
/// dilation rates, block sizes): 2^40 positions, far beyond any sequence a
/// machine holds. Larger values act as this one, so the block arithmetic
/// (which adds extents to positions) cannot overflow.
pub const MAX_EXTENT: u64 = 1 << 40;

/// The closest candidate to `name`, if it is close enough to be a typo.
pub(crate) fn suggest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, c)| *score >= 0.8 || (name.len() > 2 && strsim::levenshtein(name, c) <= 1))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    suggest(name, candidates).map(|c| format!("did you mean `{c}`?"))
}

pub(crate) fn line_of(span: Span) -> usize {
    span.start().line
}

/// Where an expression may appear; decides which variables and inputs it can read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Bias,
    Transform,
    Decay,
    Scale,
    /// A boolean mask expression (`mask = j <= i && ...`).
    Mask,
}

impl Ctx {
    fn key(self) -> &'static str {
        match self {
            Ctx::Bias => "bias",
            Ctx::Transform => "transform",
            Ctx::Decay => "decay",
            Ctx::Scale => "scale",
            Ctx::Mask => "mask",
        }
    }
    fn vars(self) -> &'static [&'static str] {
        match self {
            Ctx::Bias | Ctx::Mask => &["i", "j", "h", "b", "seq", "kv_seq"],
            Ctx::Transform => &["i", "j", "h", "b", "seq", "kv_seq", "s"],
            Ctx::Decay => &["h"],
            Ctx::Scale => &[],
        }
    }
}

const DECAY_HINT: &str = "a per-head decay is a constant expression of `h`; for a per-token decay declare `input g: f32[batch, seq, heads];` and write `decay = gate(g);`";

/// A declared input while roles are being inferred.
struct Decl {
    name: String,
    span: Span,
    elem: ElemType,
    dims: Vec<Dim>,
    role: Option<(InputRole, Span)>,
}

/// One place an input is read, with the role that place implies.
struct Use {
    name: String,
    span: Span,
    role: InputRole,
}

fn role_name(r: InputRole) -> &'static str {
    match r {
        InputRole::SegmentIds => "segment ids (`segment(..)`)",
        InputRole::Gate => "a decay gate (`gate(..)`)",
        InputRole::Filter => "a convolution filter (`filter(..)`)",
        InputRole::Table => "a table (indexed in `bias` / `transform`)",
    }
}

fn role_shape(r: InputRole) -> &'static str {
    match r {
        InputRole::SegmentIds => "i32[batch, seq]",
        InputRole::Gate => "f32[batch, seq, heads]",
        InputRole::Filter => "f32[heads, seq]",
        InputRole::Table => "f32[...]",
    }
}

fn fmt_decl(elem: ElemType, dims: &[Dim]) -> String {
    let e = match elem {
        ElemType::F32 => "f32",
        ElemType::I32 => "i32",
    };
    let d: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Batch => "batch".into(),
            Dim::Seq => "seq".into(),
            Dim::Heads => "heads".into(),
            Dim::KvHeads => "kv_heads".into(),
            Dim::Fixed(n) => n.to_string(),
        })
        .collect();
    format!("{e}[{}]", d.join(", "))
}

/// Strips parentheses and invisible groups.
pub(crate) fn peel(e: &syn::Expr) -> &syn::Expr {
    match e {
        syn::Expr::Paren(p) => peel(&p.expr),
        syn::Expr::Group(g) => peel(&g.expr),
        other => other,
    }
}

/// The identifier an expression consists of, if it is a bare name.
pub(crate) fn bare_ident(e: &syn::Expr) -> Option<&Ident> {
    match peel(e) {
        syn::Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => p.path.get_ident(),
        _ => None,
    }
}

/// A call `name(args)` with a bare-name callee.
pub(crate) fn as_call(e: &syn::Expr) -> Option<(&Ident, Vec<&syn::Expr>, Span)> {
    match peel(e) {
        syn::Expr::Call(c) => {
            let f = bare_ident(&c.func)?;
            Some((f, c.args.iter().collect(), c.span()))
        }
        _ => None,
    }
}

/// Short source-like text of an expression for messages.
pub(crate) fn show(e: &syn::Expr) -> String {
    // The user's own spelling when the span knows it, else re-printed tokens.
    // Inside a proc macro a joined span may cover only the first token, so
    // the source text is trusted only when it spells the same tokens.
    let printed = quote_expr(e);
    let squash = |t: &str| t.split_whitespace().collect::<String>();
    let s = match e.span().source_text() {
        Some(t) if squash(&t) == squash(&printed) => {
            t.split_whitespace().collect::<Vec<_>>().join(" ")
        }
        _ => printed,
    };
    if s.chars().count() > 32 {
        format!("{}...", s.chars().take(32).collect::<String>())
    } else {
        s
    }
}

fn quote_expr(e: &syn::Expr) -> String {
    use quote::ToTokens;
    e.to_token_stream()
        .to_string()
        .replace(" (", "(")
        .replace("( ", "(")
        .replace(" )", ")")
        .replace(" ,", ",")
        .replace(" [", "[")
}

pub(crate) struct Checker<'a> {
    diags: &'a mut Diagnostics,
    decls: Vec<Decl>,
    uses: Vec<Use>,
    /// Known once `heads` checked; used to evaluate per-head decay.
    heads: Option<u32>,
    /// Known once `kv_heads` checked (warnings about `kv_heads` dims).
    kv_heads: Option<u32>,
    /// Names whose item had a syntax error (already reported).
    broken: Vec<String>,
}

impl<'a> Checker<'a> {
    /// A checker for values outside a mixer (the keys of a `block` item),
    /// reusing the number and name rules.
    pub(crate) fn new(diags: &'a mut Diagnostics) -> Self {
        Checker {
            diags,
            decls: Vec::new(),
            uses: Vec::new(),
            heads: None,
            kv_heads: None,
            broken: Vec::new(),
        }
    }

    pub(crate) fn err(&mut self, span: Span, msg: impl Into<String>) {
        self.diags.error(span, msg);
    }
    pub(crate) fn err_hint(&mut self, span: Span, msg: impl Into<String>, hint: impl Into<String>) {
        self.diags.error_hint(span, msg, hint);
    }
    fn err_opt(&mut self, span: Span, msg: impl Into<String>, hint: Option<String>) {
        let mut d = Diagnostic::new(span, msg);
        d.hint = hint;
        self.diags.push(d);
    }

    // ---------- literals ----------

    /// Numbers take no Rust-style type suffix; `1e` lexes as `1` with suffix `e`.
    fn bad_suffix(&mut self, span: Span, suffix: &str, digits: &str) {
        if suffix.starts_with(['e', 'E']) {
            self.err_hint(
                span,
                format!("malformed number `{digits}{suffix}`: the exponent has no digits"),
                "write e.g. `1e-6` or `2.5e3`",
            );
        } else {
            self.err_hint(
                span,
                format!("number suffix `{suffix}` is not allowed"),
                format!("write `{digits}`"),
            );
        }
    }

    /// A non-negative integer literal (no suffix) for `what`.
    /// Reports a name longer than [`MAX_IDENT_CHARS`].
    pub(crate) fn ident_fits(&mut self, name: &str, span: Span, what: &str) -> bool {
        let n = name.chars().count();
        if n <= MAX_IDENT_CHARS {
            return true;
        }
        self.err_hint(
            span,
            format!("{what} is {n} characters long, more than the {MAX_IDENT_CHARS} allowed"),
            "names become kernel symbols; pick a shorter one",
        );
        false
    }

    /// A constant subexpression (no variable, no table read) must be a
    /// number f32 can hold: the kernels compute in f32, where `1e300` is
    /// infinite and `0.0 / 0.0` is NaN (which would mask everything).
    fn finite_constant(&mut self, x: (Expr, ScalarType), span: Span) -> Option<(Expr, ScalarType)> {
        let (e, ty) = &x;
        if !e.is_constant() || *ty != ScalarType::Float {
            return Some(x);
        }
        let lookup = |_: &str, _: &[i64]| 0.0;
        let v = e.eval_f64(&EvalEnv::for_head(0, self.heads.unwrap_or(1), &lookup));
        if v.is_finite() && v.abs() <= f32::MAX as f64 {
            return Some(x);
        }
        self.err_hint(
            span,
            format!("this constant evaluates to {v:e}, which f32 cannot hold"),
            "the kernels compute in f32 (finite, at most 3.4e38 in magnitude)",
        );
        None
    }

    fn uint(&mut self, e: &syn::Expr, what: &str) -> Option<u64> {
        let ex = peel(e);
        match ex {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(l),
                ..
            }) => {
                if !l.suffix().is_empty() {
                    self.bad_suffix(l.span(), l.suffix(), l.base10_digits());
                    return None;
                }
                match l.base10_parse::<u64>() {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.err(
                            l.span(),
                            format!("integer `{}` is out of range for {what}", l),
                        );
                        None
                    }
                }
            }
            syn::Expr::Unary(syn::ExprUnary {
                op: syn::UnOp::Neg(_),
                ..
            }) => {
                self.err(
                    ex.span(),
                    format!("{what} must not be negative, found `{}`", show(ex)),
                );
                None
            }
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Float(_),
                ..
            }) => {
                self.err(
                    ex.span(),
                    format!("{what} must be an integer, found `{}`", show(ex)),
                );
                None
            }
            other if is_constant_syntax(other) => {
                // A constant expression: `4 * 1024`, `pow(2, 12)` is a float.
                let (x, t) = self.expr(other, Ctx::Scale)?;
                let lookup = |_: &str, _: &[i64]| 0.0;
                let v = x.eval(&EvalEnv::for_head(0, 1, &lookup));
                match (t, v) {
                    (ScalarType::Int, Value::Int(v)) if v >= 0 => Some(v as u64),
                    (ScalarType::Int, Value::Int(v)) => {
                        self.err(
                            other.span(),
                            format!("{what} must not be negative, found `{}` = {v}", show(other)),
                        );
                        None
                    }
                    _ => {
                        self.err_hint(
                            other.span(),
                            format!("{what} must be an integer, found `{}`", show(other)),
                            "integer arithmetic stays integer; `/` is float division, `div(a, b)` integer division",
                        );
                        None
                    }
                }
            }
            other => {
                self.err_hint(
                    other.span(),
                    format!("expected an integer for {what}, found `{}`", show(other)),
                    "write a number or a constant expression such as `4 * 1024`",
                );
                None
            }
        }
    }

    /// An integer literal in `lo..=hi`.
    pub(crate) fn uint_in(&mut self, e: &syn::Expr, what: &str, lo: u64, hi: u64) -> Option<u64> {
        let v = self.uint(e, what)?;
        if v < lo || v > hi {
            // Say the bound that was crossed (a huge value is not "below 1").
            let range = if v < lo && hi >= u32::MAX as u64 {
                format!("at least {lo}")
            } else if v > hi && hi >= u32::MAX as u64 {
                format!("at most {hi}")
            } else {
                format!("between {lo} and {hi}")
            };
            self.err(peel(e).span(), format!("{what} must be {range}, found {v}"));
            return None;
        }
        Some(v)
    }

    /// A positive finite number literal (int or float) for `what`.
    pub(crate) fn positive_number(&mut self, e: &syn::Expr, what: &str) -> Option<f64> {
        let ex = peel(e);
        let v = match ex {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Float(l),
                ..
            }) if l.suffix().is_empty() => l.base10_parse::<f64>().ok(),
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(l),
                ..
            }) if l.suffix().is_empty() => l.base10_parse::<u64>().ok().map(|v| v as f64),
            _ => {
                self.err(
                    ex.span(),
                    format!("expected a number for {what}, found `{}`", show(ex)),
                );
                return None;
            }
        };
        match v {
            Some(v) if v.is_finite() && v > 0.0 => Some(v),
            _ => {
                self.err(
                    ex.span(),
                    format!(
                        "{what} must be a positive finite number, found `{}`",
                        show(ex)
                    ),
                );
                None
            }
        }
    }

    // ---------- inputs ----------

    fn declare(&mut self, it: &InputItem) {
        let name = it.name.to_string();
        if !self.ident_fits(&name, it.name.span(), "input name") {
            self.broken.push(name);
            return;
        }
        if ["i", "j", "h", "s", "b", "seq", "kv_seq", "q", "k", "v", "o"].contains(&name.as_str()) {
            self.err_hint(
                it.name.span(),
                format!("input name `{name}` is reserved"),
                "`i`, `j`, `h`, `s`, `b`, `seq`, `kv_seq` are expression variables and `q`, `k`, `v`, `o` the main tensors; pick another name",
            );
            self.broken.push(name);
            return;
        }
        if let Some(first) = self.decls.iter().find(|d| d.name == name) {
            let line = line_of(first.span);
            self.err_hint(
                it.name.span(),
                format!("input `{name}` is declared twice"),
                format!("first declared on line {line}"),
            );
            return;
        }
        let elem = match it.elem.to_string().as_str() {
            "f32" => Some(ElemType::F32),
            "i32" => Some(ElemType::I32),
            other => {
                let hint = if matches!(other, "f16" | "bf16" | "f64") {
                    "extra inputs are `f32` (gates, filters, tables) or `i32` (segment ids)"
                        .to_string()
                } else {
                    did_you_mean(other, ["f32", "i32"])
                        .unwrap_or_else(|| "extra inputs are `f32` or `i32`".into())
                };
                self.err_hint(
                    it.elem.span(),
                    format!("unknown input element type `{other}`"),
                    hint,
                );
                None
            }
        };
        let mut dims = Vec::new();
        let mut ok = true;
        for d in &it.dims {
            match d {
                RawDim::Named(id) => match id.to_string().as_str() {
                    "batch" => dims.push(Dim::Batch),
                    "seq" => dims.push(Dim::Seq),
                    "heads" => dims.push(Dim::Heads),
                    "kv_heads" => dims.push(Dim::KvHeads),
                    other => {
                        ok = false;
                        let hint = did_you_mean(other, ["batch", "seq", "heads", "kv_heads"])
                            .unwrap_or_else(|| {
                                "dims are `batch`, `seq`, `heads`, `kv_heads` or an integer".into()
                            });
                        self.err_hint(id.span(), format!("unknown dim `{other}`"), hint);
                    }
                },
                RawDim::Fixed(lit) => {
                    let e: syn::Expr = syn::Expr::Lit(syn::ExprLit {
                        attrs: Vec::new(),
                        lit: syn::Lit::new(lit.clone()),
                    });
                    match self.uint_in(&e, "a fixed dim", 1, u32::MAX as u64) {
                        Some(n) => dims.push(Dim::Fixed(n)),
                        None => ok = false,
                    }
                }
            }
        }
        if let (Some(elem), true) = (elem, ok) {
            self.decls.push(Decl {
                name,
                span: it.name.span(),
                elem,
                dims,
                role: None,
            });
        } else {
            // Already reported; its uses must not read as undeclared.
            self.broken.push(name);
        }
    }

    fn use_input(&mut self, name: &Ident, role: InputRole) {
        self.uses.push(Use {
            name: name.to_string(),
            span: name.span(),
            role,
        });
    }

    /// Resolves every use against the declarations: existence, one role per
    /// input, the shape each role needs, and unused declarations.
    fn resolve_inputs(&mut self) -> Vec<InputDecl> {
        let mut uses = std::mem::take(&mut self.uses);
        // Roles are assigned in source order, so "used as X here but as Y
        // on line N" always blames the later use.
        uses.sort_by_key(|u| {
            let p = u.span.start();
            (p.line, p.column)
        });
        let mut suggested: Vec<String> = Vec::new();
        for u in &uses {
            if self.broken.contains(&u.name) {
                continue;
            }
            let Some(idx) = self.decls.iter().position(|d| d.name == u.name) else {
                let names: Vec<String> = self.decls.iter().map(|d| d.name.clone()).collect();
                let close = suggest(&u.name, names.iter().map(String::as_str));
                // A typo of a declared input: do not also call that one unused.
                suggested.extend(close.map(str::to_string));
                let hint = close
                    .map(|c| format!("did you mean `{c}`?"))
                    .unwrap_or_else(|| {
                        format!("declare it: `input {}: {};`", u.name, role_shape(u.role))
                    });
                self.err_hint(u.span, format!("unknown input `{}`", u.name), hint);
                continue;
            };
            let decl = &self.decls[idx];
            if let Some((role, span)) = decl.role {
                if role != u.role {
                    let line = line_of(span);
                    self.err_hint(
                        u.span,
                        format!(
                            "input `{}` is used as {} here but as {} on line {line}",
                            u.name,
                            role_name(u.role),
                            role_name(role)
                        ),
                        "an input has exactly one role; declare a separate input",
                    );
                }
                continue;
            }
            let (elem, dims) = (decl.elem, decl.dims.clone());
            let decl_span = decl.span;
            let fits = match u.role {
                InputRole::SegmentIds => elem == ElemType::I32 && dims == [Dim::Batch, Dim::Seq],
                InputRole::Gate => {
                    elem == ElemType::F32 && dims == [Dim::Batch, Dim::Seq, Dim::Heads]
                }
                InputRole::Filter => elem == ElemType::F32 && dims == [Dim::Heads, Dim::Seq],
                // i32 tables (lengths, flags, ids) are read as numbers too.
                InputRole::Table => true,
            };
            if !fits {
                self.err_hint(
                    decl_span,
                    format!(
                        "input `{}` is used as {} (line {}) and must be `{}`, but is declared `{}`",
                        u.name,
                        role_name(u.role),
                        line_of(u.span),
                        role_shape(u.role),
                        fmt_decl(elem, &dims)
                    ),
                    format!("declare it as `input {}: {};`", u.name, role_shape(u.role)),
                );
            }
            self.decls[idx].role = Some((u.role, u.span));
        }
        let mut out = Vec::new();
        let decls = std::mem::take(&mut self.decls);
        for d in decls {
            match d.role {
                Some((role, _)) => out.push(InputDecl {
                    name: d.name,
                    elem: d.elem,
                    dims: d.dims,
                    role,
                }),
                None if suggested.contains(&d.name) => {}
                None => self.err_hint(
                    d.span,
                    format!("input `{}` is declared but never used", d.name),
                    "remove it, or read it in `bias`/`transform`, `mask = segment(..)`, `decay = gate(..)` or `score = filter(..)`",
                ),
            }
        }
        out
    }

    // ---------- scalar expressions ----------

    /// Lowers and type-checks a scalar expression. Keeps going after an error
    /// in one operand so sibling mistakes are reported too.
    fn expr(&mut self, e: &syn::Expr, cx: Ctx) -> Option<(Expr, ScalarType)> {
        use syn::Expr as E;
        let key = cx.key();
        match e {
            E::Paren(p) => self.expr(&p.expr, cx),
            E::Group(g) => self.expr(&g.expr, cx),
            E::Lit(l) => self.literal(&l.lit),
            E::Path(_) => {
                let Some(id) = bare_ident(e) else {
                    self.err(
                        e.span(),
                        format!("expected a variable, found path `{}`", show(e)),
                    );
                    return None;
                };
                self.var(id, cx)
            }
            E::Unary(u) => match u.op {
                syn::UnOp::Neg(_) => {
                    let (a, t) = self.expr(&u.expr, cx)?;
                    if t == ScalarType::Bool {
                        self.not_a_number(u.expr.span(), "`-`");
                        return None;
                    }
                    self.finite_constant((Expr::Unary(UnOp::Neg, Box::new(a)), t), u.span())
                }
                syn::UnOp::Not(_) => {
                    let (a, t) = self.expr(&u.expr, cx)?;
                    if t != ScalarType::Bool {
                        self.err_hint(
                            u.expr.span(),
                            "`!` negates a condition, but this is a number",
                            "compare it first, e.g. `!(x > 0.0)` or `x <= 0.0`",
                        );
                        return None;
                    }
                    Some((Expr::Unary(UnOp::Not, Box::new(a)), ScalarType::Bool))
                }
                _ => {
                    self.err_hint(
                        u.span(),
                        format!("unsupported operator in `{key}`"),
                        "the unary operators are `-` and `!`",
                    );
                    None
                }
            },
            E::Binary(b) => {
                use syn::BinOp as B;
                let op = match b.op {
                    B::Add(_) => Some(BinOp::Add),
                    B::Sub(_) => Some(BinOp::Sub),
                    B::Mul(_) => Some(BinOp::Mul),
                    B::Div(_) => Some(BinOp::Div),
                    B::Rem(_) => Some(BinOp::Rem),
                    B::Lt(_) => Some(BinOp::Lt),
                    B::Le(_) => Some(BinOp::Le),
                    B::Gt(_) => Some(BinOp::Gt),
                    B::Ge(_) => Some(BinOp::Ge),
                    B::Eq(_) => Some(BinOp::Eq),
                    B::Ne(_) => Some(BinOp::Ne),
                    B::And(_) => Some(BinOp::And),
                    B::Or(_) => Some(BinOp::Or),
                    _ => None,
                };
                let Some(op) = op else {
                    use quote::ToTokens;
                    let sym = b.op.to_token_stream().to_string();
                    self.err_hint(
                        b.op.span(),
                        format!("operator `{sym}` is not supported in `{key}`"),
                        "operators are `+ - * / %`, comparisons `< <= > >= == !=` and `&& || !`",
                    );
                    return None;
                };
                let l = self.expr(&b.left, cx);
                let r = self.expr(&b.right, cx);
                let ((l, lt), (r, rt)) = (l?, r?);
                let logic = matches!(op, BinOp::And | BinOp::Or);
                for (t, side) in [(lt, &b.left), (rt, &b.right)] {
                    if logic && t != ScalarType::Bool {
                        self.err_hint(
                            side.span(),
                            format!(
                                "`{}` combines conditions, but this is a number",
                                op.symbol()
                            ),
                            "compare it first, e.g. `x > 0.0`",
                        );
                        return None;
                    }
                    if !logic && t == ScalarType::Bool {
                        self.not_a_number(side.span(), &format!("`{}`", op.symbol()));
                        return None;
                    }
                }
                let ty = match op {
                    BinOp::Rem => {
                        if lt != ScalarType::Int || rt != ScalarType::Int {
                            self.err_hint(
                                b.op.span(),
                                "`%` needs integer operands",
                                "`%` is integer remainder; both sides must be integer expressions",
                            );
                            return None;
                        }
                        ScalarType::Int
                    }
                    op => op.result_type(lt, rt),
                };
                self.finite_constant((Expr::Binary(op, Box::new(l), Box::new(r)), ty), b.span())
            }
            E::Call(c) => {
                let Some(fid) = bare_ident(&c.func) else {
                    self.err(
                        c.func.span(),
                        format!("expected a function name, found `{}`", show(&c.func)),
                    );
                    return None;
                };
                let fname = fid.to_string();
                let args: Vec<Option<(Expr, ScalarType)>> =
                    c.args.iter().map(|a| self.expr(a, cx)).collect();
                let Some(f) = Func::from_name(&fname) else {
                    let hint = did_you_mean(&fname, FUNCS.iter().copied())
                        .unwrap_or_else(|| format!("functions are {}", list(FUNCS)));
                    self.err_hint(fid.span(), format!("unknown function `{fname}`"), hint);
                    return None;
                };
                if args.len() != f.arity() {
                    let plural = if f.arity() == 1 { "" } else { "s" };
                    self.err(
                        c.span(),
                        format!(
                            "`{fname}` takes {} argument{plural}, found {}",
                            f.arity(),
                            args.len()
                        ),
                    );
                    return None;
                }
                let args: Vec<(Expr, ScalarType)> = args.into_iter().collect::<Option<_>>()?;
                // `select` of two conditions is a condition.
                let bool_branches = f == Func::Select
                    && args.len() == 3
                    && args[1..].iter().all(|(_, t)| *t == ScalarType::Bool);
                for (k, ((_, t), a)) in args.iter().zip(&c.args).enumerate() {
                    let want_bool = f == Func::Select && (k == 0 || bool_branches);
                    if want_bool && *t != ScalarType::Bool {
                        self.err_hint(
                            a.span(),
                            "the first argument of `select` must be a condition, but this is a number",
                            "write `select(x > 0.0, a, b)`",
                        );
                        return None;
                    }
                    if !want_bool && *t == ScalarType::Bool {
                        self.not_a_number(a.span(), &format!("`{fname}`"));
                        return None;
                    }
                }
                let all_int = args.iter().all(|(_, t)| *t == ScalarType::Int);
                if f == Func::AlibiSlope && !all_int {
                    self.err_hint(
                        c.args[0].span(),
                        "`alibi_slope` takes a head index (an integer expression)",
                        "write `alibi_slope(h)`",
                    );
                    return None;
                }
                if f == Func::Div && !all_int {
                    self.err_hint(
                        c.span(),
                        "`div` is integer floor division and needs integer operands",
                        "for floats write `floor(x / y)`; `int(x)` turns a float into an integer",
                    );
                    return None;
                }
                let types: Vec<ScalarType> = args.iter().map(|(_, t)| *t).collect();
                let ty = f.result_type(&types);
                self.finite_constant(
                    (
                        Expr::Call(f, args.into_iter().map(|(e, _)| e).collect()),
                        ty,
                    ),
                    c.span(),
                )
            }
            E::Index(_) => self.table_read(e, cx),
            E::If(x) => self.if_expr(x, cx),
            E::Cast(c) => {
                self.err_hint(
                    c.span(),
                    format!("casts are not supported in `{key}`"),
                    "integers convert to floats automatically when mixed with a float; `int(x)` truncates a float to an integer",
                );
                None
            }
            other => {
                self.err_hint(
                    other.span(),
                    format!("unsupported expression in `{key}`: `{}`", show(other)),
                    "expressions use numbers, variables, `+ - * / %`, comparisons, `&& || !`, parentheses, function calls and `table[index]` reads",
                );
                None
            }
        }
    }

    /// `if c { a } else { b }` (with `else if` chains): `select(c, a, b)`.
    fn if_expr(&mut self, x: &syn::ExprIf, cx: Ctx) -> Option<(Expr, ScalarType)> {
        let single = |b: &syn::Block| -> Option<syn::Expr> {
            match b.stmts.as_slice() {
                [syn::Stmt::Expr(e, None)] => Some(e.clone()),
                _ => None,
            }
        };
        let Some((_, els)) = &x.else_branch else {
            self.err_hint(
                x.span(),
                "`if` needs an `else` branch",
                "write `if c { a } else { b }` (or `select(c, a, b)`)",
            );
            return None;
        };
        let then = single(&x.then_branch);
        let other = match &**els {
            syn::Expr::Block(b) => single(&b.block),
            e @ syn::Expr::If(_) => Some(e.clone()),
            _ => None,
        };
        let (Some(then), Some(other)) = (then, other) else {
            self.err_hint(
                x.span(),
                "each branch of `if` must be a single expression",
                "write `if c { a } else { b }` without `;` or `let`",
            );
            return None;
        };
        let c = self.expr(&x.cond, cx);
        let a = self.expr(&then, cx);
        let b = self.expr(&other, cx);
        let ((c, ct), (a, at), (b, bt)) = (c?, a?, b?);
        if ct != ScalarType::Bool {
            self.err_hint(
                x.cond.span(),
                "the condition of `if` is a number",
                "compare it, e.g. `if x > 0.0 { .. } else { .. }`",
            );
            return None;
        }
        if (at == ScalarType::Bool) != (bt == ScalarType::Bool) {
            self.err_hint(
                other.span(),
                "the branches of `if` must both be numbers or both be conditions",
                "`select(cond, a, b)` and `if` choose between two values of one kind",
            );
            return None;
        }
        let ty = Func::Select.result_type(&[ct, at, bt]);
        Some((Expr::Call(Func::Select, vec![c, a, b]), ty))
    }

    /// Table reads that run but likely do not read what was meant: a
    /// `batch` dim indexed without `b` (every sequence reads one row), a
    /// `kv_heads` dim indexed by `h` itself (query heads past the last kv
    /// head read the last row).
    fn warn_table_indices(&mut self, name: &str, spans: &[&syn::Expr], indices: &[Expr]) {
        let Some(d) = self.decls.iter().find(|d| d.name == name) else {
            return;
        };
        if d.dims.len() != indices.len() {
            return;
        }
        let grouped = matches!((self.heads, self.kv_heads), (Some(h), Some(k)) if k < h);
        let mut found = Vec::new();
        for (k, ((dim, e), at)) in d.dims.iter().zip(indices).zip(spans).enumerate() {
            if *dim == Dim::Batch && !e.uses_var(Var::B) {
                found.push(
                    Diagnostic::warning(
                        at.span(),
                        format!("dim {k} of `{name}` is `batch`, but this index does not read `b`: every sequence reads the same row"),
                    )
                    .with_hint("index it with `b`, the batch index"),
                );
            }
            if *dim == Dim::KvHeads && grouped && *e == Expr::Var(Var::H) {
                found.push(
                    Diagnostic::warning(
                        at.span(),
                        format!("dim {k} of `{name}` is `kv_heads`, but this index reads the query head `h`: heads past the last kv head read the last row"),
                    )
                    .with_hint("the kv head of query head `h` is `div(h, heads / kv_heads)`; or declare the dim `heads`"),
                );
            }
        }
        self.diags.warnings.extend(found);
    }

    /// `l && r` (`and`) or `l || r` where one side is within the other
    /// ([`Mask::within`]): the combination is just one side, which a reader
    /// (or the writer) likely did not mean; a warning says which.
    fn warn_redundant_mask(&mut self, e: &syn::Expr, l: &Mask, r: &Mask, and: bool) {
        let (op, kept) = match (and, l.within(r), r.within(l)) {
            (true, true, _) => ("&&", l),
            (true, false, true) => ("&&", r),
            (false, true, _) => ("||", r),
            (false, false, true) => ("||", l),
            _ => return,
        };
        let other = if std::ptr::eq(kept, l) { r } else { l };
        let why = if and {
            format!("every pair `{kept}` allows, `{other}` allows too")
        } else {
            format!("every pair `{other}` allows, `{kept}` allows too")
        };
        self.diags.warnings.push(
            Diagnostic::warning(e.span(), format!("`{l} {op} {r}` is just `{kept}`: {why}"))
                .with_hint(format!("write `{kept}`, or the mask you meant")),
        );
    }

    /// A boolean where a number is needed.
    fn not_a_number(&mut self, span: Span, what: &str) {
        self.err_hint(
            span,
            format!("{what} needs a number, but this is a condition"),
            "`select(cond, a, b)` turns a condition into a number",
        );
    }

    /// An expression whose value must be a number (bias, transform, decay, scale).
    fn numeric(&mut self, e: &syn::Expr, cx: Ctx) -> Option<(Expr, ScalarType)> {
        let x = self.expr(e, cx)?;
        if x.1 == ScalarType::Bool {
            self.err_hint(
                e.span(),
                format!("`{}` must be a number, but this is a condition", cx.key()),
                "`select(cond, a, b)` turns a condition into a number; conditions alone belong in `mask`",
            );
            return None;
        }
        Some(x)
    }

    fn literal(&mut self, lit: &syn::Lit) -> Option<(Expr, ScalarType)> {
        match lit {
            syn::Lit::Int(l) => {
                if !l.suffix().is_empty() {
                    self.bad_suffix(l.span(), l.suffix(), l.base10_digits());
                    return None;
                }
                match l.base10_parse::<i64>() {
                    Ok(v) => Some((Expr::Int(v), ScalarType::Int)),
                    Err(_) => {
                        self.err(l.span(), format!("integer `{l}` does not fit in 64 bits"));
                        None
                    }
                }
            }
            syn::Lit::Float(l) => {
                if !l.suffix().is_empty() {
                    self.bad_suffix(l.span(), l.suffix(), l.base10_digits());
                    return None;
                }
                match l.base10_parse::<f64>() {
                    Ok(v) if v.is_finite() && v.abs() <= f32::MAX as f64 => {
                        Some((Expr::Float(v), ScalarType::Float))
                    }
                    _ => {
                        self.err_hint(
                            l.span(),
                            format!("float `{l}` is out of range"),
                            "the kernels compute in f32: at most 3.4e38 in magnitude",
                        );
                        None
                    }
                }
            }
            other => {
                self.err(
                    other.span(),
                    "expected a number here, found a non-numeric literal",
                );
                None
            }
        }
    }

    fn var(&mut self, id: &Ident, cx: Ctx) -> Option<(Expr, ScalarType)> {
        let name = id.to_string();
        let key = cx.key();
        let var = match name.as_str() {
            "i" => Some((Var::I, ScalarType::Int)),
            "j" => Some((Var::J, ScalarType::Int)),
            "h" => Some((Var::H, ScalarType::Int)),
            "s" => Some((Var::S, ScalarType::Float)),
            "b" => Some((Var::B, ScalarType::Int)),
            "seq" => Some((Var::Seq, ScalarType::Int)),
            "kv_seq" => Some((Var::KvSeq, ScalarType::Int)),
            _ => None,
        };
        if let Some((v, t)) = var {
            if cx.vars().contains(&name.as_str()) {
                return Some((Expr::Var(v), t));
            }
            match cx {
                Ctx::Decay => self.err_hint(
                    id.span(),
                    format!("`decay` may not read `{name}`"),
                    DECAY_HINT,
                ),
                Ctx::Scale => self.err_hint(
                    id.span(),
                    format!("`scale` must be a constant, but reads `{name}`"),
                    "position- or head-dependent terms belong in `bias` or `transform`",
                ),
                Ctx::Mask => self.err_hint(
                    id.span(),
                    "`s` (the score) is not available in `mask`",
                    "a mask decides from positions, heads and tables; to act on the score use `transform`",
                ),
                _ => self.err_hint(
                    id.span(),
                    format!("`s` (the score) is only available in `transform`, not in `{key}`"),
                    "`bias` is added to the score; use `transform = ...` to reshape it",
                ),
            }
            return None;
        }
        if self.decls.iter().any(|d| d.name == name) {
            // Counts as a (wrong) table read, so the input is not also "unused".
            self.use_input(id, InputRole::Table);
            self.err_hint(
                id.span(),
                format!("input `{name}` must be indexed to be read"),
                format!("write `{name}[...]` with one index per dim"),
            );
            return None;
        }
        let mut cands: Vec<&str> = cx.vars().to_vec();
        let names: Vec<String> = self.decls.iter().map(|d| d.name.clone()).collect();
        cands.extend(names.iter().map(String::as_str));
        let hint = suggest(&name, cands.iter().copied())
            .map(|c| format!("did you mean `{c}`?"))
            .or_else(|| match cx {
                Ctx::Scale => Some("`scale` is a constant expression".to_string()),
                _ => Some(format!("`{key}` can read {}", list(cx.vars()))),
            });
        self.err_opt(
            id.span(),
            format!("unknown variable `{name}` in `{key}`"),
            hint,
        );
        None
    }

    fn table_read(&mut self, e: &syn::Expr, cx: Ctx) -> Option<(Expr, ScalarType)> {
        // `t[a][b]` nests as Index(Index(t, a), b): unwind to the base name.
        let mut idx_exprs = Vec::new();
        let mut cur = e;
        while let syn::Expr::Index(ix) = cur {
            idx_exprs.push(&*ix.index);
            cur = &ix.expr;
        }
        idx_exprs.reverse();
        let Some(base) = bare_ident(cur) else {
            self.err(
                cur.span(),
                format!("only inputs can be indexed, found `{}`", show(cur)),
            );
            return None;
        };
        let name = base.to_string();
        if matches!(cx, Ctx::Decay | Ctx::Scale) {
            self.use_input(base, InputRole::Table);
            let hint = if cx == Ctx::Decay {
                DECAY_HINT
            } else {
                "`scale` is a constant expression"
            };
            self.err_hint(
                e.span(),
                format!("`{}` may not read input tables", cx.key()),
                hint,
            );
            return None;
        }
        let mut indices = Vec::new();
        let mut ok = true;
        for ie in &idx_exprs {
            match self.expr(ie, cx) {
                Some((x, ScalarType::Int)) => indices.push(x),
                Some((_, ScalarType::Float | ScalarType::Bool)) => {
                    ok = false;
                    self.err_hint(
                        ie.span(),
                        format!("index of `{name}` must be an integer, found a float expression"),
                        "indices are integer expressions of `i`, `j`, `h`, `b` and integer literals; `int(x)` truncates a float",
                    );
                }
                None => ok = false,
            }
        }
        self.use_input(base, InputRole::Table);
        if ok {
            self.warn_table_indices(&name, &idx_exprs, &indices);
        }
        if let Some(d) = self.decls.iter().find(|d| d.name == name) {
            if d.dims.len() != idx_exprs.len() {
                let (want, got) = (d.dims.len(), idx_exprs.len());
                let decl = fmt_decl(d.elem, &d.dims);
                self.err_hint(
                    e.span(),
                    format!(
                        "input `{name}` has {want} dim{} but is read with {got} ind{}",
                        if want == 1 { "" } else { "s" },
                        if got == 1 { "ex" } else { "ices" }
                    ),
                    format!("`{name}` is declared `{decl}`; write one `[index]` per dim"),
                );
                ok = false;
            }
        }
        ok.then_some((
            Expr::Index {
                input: name,
                indices,
            },
            ScalarType::Float,
        ))
    }

    // ---------- keys ----------

    fn dtype(&mut self, e: &syn::Expr) -> Option<DType> {
        let names = ["f16", "bf16", "f32"];
        match bare_ident(e) {
            Some(id) => {
                let s = id.to_string();
                DType::parse(&s).or_else(|| {
                    let hint = did_you_mean(&s, names)
                        .unwrap_or_else(|| format!("dtypes are {}", list(&names)));
                    self.err_hint(id.span(), format!("unknown dtype `{s}`"), hint);
                    None
                })
            }
            None => {
                self.err_hint(
                    e.span(),
                    format!("expected a dtype, found `{}`", show(e)),
                    format!("dtypes are {}", list(&names)),
                );
                None
            }
        }
    }

    fn feature_map(&mut self, e: &syn::Expr, want: &str) -> Option<FeatureMap> {
        let bad = |me: &mut Self| {
            me.err_hint(
                e.span(),
                format!("expected `{want}`, `elu1({want})` or `relu({want})`, found `{}`", show(e)),
                "the score is `dot(Q, K)` with Q one of `q`, `elu1(q)`, `relu(q)` and K likewise with `k`",
            );
            None
        };
        if let Some(id) = bare_ident(e) {
            return if id == want {
                Some(FeatureMap::Identity)
            } else {
                bad(self)
            };
        }
        let Some((f, args, _)) = as_call(e) else {
            return bad(self);
        };
        let map = match f.to_string().as_str() {
            "elu1" => FeatureMap::Elu1,
            "relu" => FeatureMap::Relu,
            other => {
                let hint = did_you_mean(other, ["elu1", "relu"])
                    .unwrap_or_else(|| "feature maps are `elu1` and `relu`".into());
                self.err_hint(f.span(), format!("unknown feature map `{other}`"), hint);
                return None;
            }
        };
        match args.as_slice() {
            [a] if bare_ident(a).is_some_and(|i| i == want) => Some(map),
            _ => bad(self),
        }
    }

    fn score(&mut self, e: &syn::Expr) -> Option<RawScore> {
        let hint = "the score is `dot(q, k)` (optionally `elu1(..)`/`relu(..)` on each side) or `filter(NAME)`";
        if let Some(id) = bare_ident(e) {
            let s = id.to_string();
            if s == "dot" || s == "filter" {
                self.err_hint(id.span(), format!("`{s}` needs arguments"), hint);
            } else {
                let h = did_you_mean(&s, ["dot", "filter"]).unwrap_or_else(|| hint.into());
                self.err_hint(id.span(), format!("unknown score `{s}`"), h);
            }
            return None;
        }
        let Some((f, args, span)) = as_call(e) else {
            self.err_hint(
                e.span(),
                format!("expected a score, found `{}`", show(e)),
                hint,
            );
            return None;
        };
        match f.to_string().as_str() {
            "dot" => {
                if args.len() != 2 {
                    self.err_hint(
                        span,
                        format!("`dot` takes 2 arguments, found {}", args.len()),
                        hint,
                    );
                    return None;
                }
                let q = self.feature_map(args[0], "q");
                let k = self.feature_map(args[1], "k");
                Some(RawScore::Dot(q?, k?))
            }
            "filter" => match args.as_slice() {
                [a] => match bare_ident(a) {
                    Some(id) => {
                        self.use_input(id, InputRole::Filter);
                        Some(RawScore::Filter(id.to_string(), span))
                    }
                    None => {
                        self.err_hint(
                            a.span(),
                            "`filter` takes the name of an input",
                            "write `filter(f)` with `input f: f32[heads, seq];`",
                        );
                        None
                    }
                },
                _ => {
                    self.err_hint(
                        span,
                        format!("`filter` takes 1 argument, found {}", args.len()),
                        hint,
                    );
                    None
                }
            },
            other => {
                let h = did_you_mean(other, ["dot", "filter"]).unwrap_or_else(|| hint.into());
                self.err_hint(f.span(), format!("unknown score `{other}`"), h);
                None
            }
        }
    }

    /// A mask: the built-in masks combined with `&&` / `||`, where any
    /// operand without a built-in mask in it is a boolean expression.
    fn mask(&mut self, e: &syn::Expr) -> Option<Mask> {
        use syn::Expr as E;
        let hint = || {
            format!(
                "masks are {}, or conditions such as `j <= i && i - j < 64`, combined with `&&`, `||` and parentheses",
                list(MASKS)
            )
        };
        if !has_builtin_mask(e) {
            return self.mask_expr(e, &hint);
        }
        match e {
            E::Paren(p) => self.mask(&p.expr),
            E::Group(g) => self.mask(&g.expr),
            E::Binary(b) => {
                let l = self.mask(&b.left);
                let r = self.mask(&b.right);
                match b.op {
                    syn::BinOp::And(_) => {
                        let (l, r) = (l?, r?);
                        self.warn_redundant_mask(e, &l, &r, true);
                        Some(Mask::And(Box::new(l), Box::new(r)))
                    }
                    syn::BinOp::Or(_) => {
                        let (l, r) = (l?, r?);
                        self.warn_redundant_mask(e, &l, &r, false);
                        Some(Mask::Or(Box::new(l), Box::new(r)))
                    }
                    _ => {
                        use quote::ToTokens;
                        self.err_hint(
                            b.op.span(),
                            format!(
                                "masks combine with `&&` and `||`, found `{}`",
                                b.op.to_token_stream()
                            ),
                            hint(),
                        );
                        None
                    }
                }
            }
            E::Unary(u) => {
                self.err_hint(
                    u.span(),
                    "built-in masks cannot be negated",
                    "write the condition itself, e.g. `j > i` for the keys `causal` excludes",
                );
                None
            }
            E::Path(_) => {
                let Some(id) = bare_ident(e) else {
                    self.err_hint(
                        e.span(),
                        format!("expected a mask, found `{}`", show(e)),
                        hint(),
                    );
                    return None;
                };
                match id.to_string().as_str() {
                    "all" => Some(Mask::All),
                    "causal" => Some(Mask::Causal),
                    m @ ("window" | "prefix_lm" | "segment" | "dilated" | "block_sparse") => {
                        let usage = mask_usage(m);
                        self.err_hint(
                            id.span(),
                            format!("mask `{m}` needs arguments"),
                            format!("write `{usage}`"),
                        );
                        None
                    }
                    other => {
                        let h = did_you_mean(other, MASKS.iter().copied()).unwrap_or_else(hint);
                        self.err_hint(id.span(), format!("unknown mask `{other}`"), h);
                        None
                    }
                }
            }
            E::Call(_) => {
                let Some((f, args, span)) = as_call(e) else {
                    self.err_hint(
                        e.span(),
                        format!("expected a mask, found `{}`", show(e)),
                        hint(),
                    );
                    return None;
                };
                let m = f.to_string();
                let want_args = match m.as_str() {
                    "all" | "causal" => 0,
                    "block_sparse" => 3,
                    "window" | "prefix_lm" | "segment" | "dilated" => 1,
                    other => {
                        let h = did_you_mean(other, MASKS.iter().copied()).unwrap_or_else(hint);
                        self.err_hint(f.span(), format!("unknown mask `{other}`"), h);
                        return None;
                    }
                };
                if args.len() != want_args {
                    let msg = if want_args == 0 {
                        format!("mask `{m}` takes no arguments")
                    } else {
                        format!(
                            "mask `{m}` takes {want_args} argument{}, found {}",
                            if want_args == 1 { "" } else { "s" },
                            args.len()
                        )
                    };
                    let usage = mask_usage(&m);
                    self.err_hint(span, msg, format!("write `{usage}`"));
                    return None;
                }
                match m.as_str() {
                    "window" => {
                        let size = self.uint(args[0], "the window size")?.min(MAX_EXTENT);
                        if size == 0 {
                            self.err_hint(
                                args[0].span(),
                                "`window(0)` allows no key at all",
                                "the window is `|i - j| < size`; use a size of at least 1",
                            );
                            return None;
                        }
                        Some(Mask::Window { size })
                    }
                    "prefix_lm" => Some(Mask::PrefixLm {
                        prefix: self.uint(args[0], "the prefix length")?.min(MAX_EXTENT),
                    }),
                    "dilated" => {
                        let rate = self.uint(args[0], "the dilation rate")?.min(MAX_EXTENT);
                        if rate == 0 {
                            self.err_hint(
                                args[0].span(),
                                "`dilated(0)` is undefined: the rate must be at least 1",
                                "`dilated(r)` keeps keys with `(i - j) % r == 0`",
                            );
                            return None;
                        }
                        Some(Mask::Dilated { rate })
                    }
                    "segment" => match bare_ident(args[0]) {
                        Some(id) => {
                            self.use_input(id, InputRole::SegmentIds);
                            Some(Mask::Segment {
                                input: id.to_string(),
                            })
                        }
                        None => {
                            self.err_hint(
                                args[0].span(),
                                "`segment` takes the name of an input",
                                "write `segment(doc)` with `input doc: i32[batch, seq];`",
                            );
                            None
                        }
                    },
                    "block_sparse" => self.block_sparse(&args, span),
                    _ => Some(if m == "all" { Mask::All } else { Mask::Causal }),
                }
            }
            other => {
                self.err_hint(
                    other.span(),
                    format!("expected a mask, found `{}`", show(other)),
                    hint(),
                );
                None
            }
        }
    }

    /// A mask operand without built-in masks: a boolean expression, unless
    /// it is a bare name or call that is neither a variable nor a function
    /// (then it is reported as an unknown mask, with a suggestion).
    fn mask_expr(&mut self, e: &syn::Expr, hint: &dyn Fn() -> String) -> Option<Mask> {
        let unknown = match (bare_ident(e), as_call(e)) {
            (Some(id), _) if !Ctx::Mask.vars().contains(&id.to_string().as_str()) => Some(id),
            (_, Some((f, _, _))) if Func::from_name(&f.to_string()).is_none() => Some(f),
            _ => None,
        };
        if let Some(id) = unknown {
            let name = id.to_string();
            if self.decls.iter().any(|d| d.name == name) && as_call(e).is_none() {
                self.use_input(id, InputRole::Table);
                self.err_hint(
                    id.span(),
                    format!("input `{name}` is not a mask"),
                    format!("compare a read of it, e.g. `{name}[b][j] > 0.0`, or use `segment({name})` for document ids"),
                );
                return None;
            }
            let h = did_you_mean(&name, MASKS.iter().copied()).unwrap_or_else(hint);
            self.err_hint(id.span(), format!("unknown mask `{name}`"), h);
            return None;
        }
        let (x, t) = self.expr(e, Ctx::Mask)?;
        if t != ScalarType::Bool {
            self.err_hint(
                e.span(),
                "a mask must be a condition, but this is a number",
                "compare it, e.g. `i - j < 64` or `flag[b][j] > 0.0`",
            );
            return None;
        }
        Some(causal_lifted(x))
    }

    fn block_sparse(&mut self, args: &[&syn::Expr], span: Span) -> Option<Mask> {
        const NAMES: [&str; 3] = ["block", "local", "global"];
        let usage = mask_usage("block_sparse");
        let mut vals: [Option<u64>; 3] = [None; 3];
        let mut ok = true;
        for a in args {
            let syn::Expr::Assign(asg) = peel(a) else {
                self.err_hint(
                    a.span(),
                    "`block_sparse` takes named arguments",
                    format!("write `{usage}`"),
                );
                ok = false;
                continue;
            };
            let Some(id) = bare_ident(&asg.left) else {
                self.err_hint(
                    asg.left.span(),
                    "expected an argument name",
                    format!("write `{usage}`"),
                );
                ok = false;
                continue;
            };
            let n = id.to_string();
            let Some(slot) = NAMES.iter().position(|x| *x == n) else {
                let h = did_you_mean(&n, NAMES).unwrap_or_else(|| format!("write `{usage}`"));
                self.err_hint(
                    id.span(),
                    format!("unknown `block_sparse` argument `{n}`"),
                    h,
                );
                ok = false;
                continue;
            };
            if vals[slot].is_some() {
                self.err(id.span(), format!("`{n}` is given twice"));
                ok = false;
                continue;
            }
            match self.uint(&asg.right, &format!("`{n}`")) {
                Some(v) => vals[slot] = Some(v.min(MAX_EXTENT)),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        let missing: Vec<&str> = NAMES
            .iter()
            .zip(vals.iter())
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            self.err_hint(
                span,
                format!("`block_sparse` is missing {}", list(&missing)),
                format!("write `{usage}`"),
            );
            return None;
        }
        let (block, local, global) = (vals[0]?, vals[1]?, vals[2]?);
        if block == 0 {
            self.err(
                args[0].span(),
                "`block_sparse` block size must be at least 1, found 0",
            );
            return None;
        }
        if local == 0 && global == 0 {
            self.err_hint(
                span,
                "`block_sparse` with `local = 0` and `global = 0` allows no key",
                "`local = 1` keeps each query's own block",
            );
            return None;
        }
        Some(Mask::BlockSparse {
            block,
            local,
            global,
        })
    }

    fn norm(&mut self, e: &syn::Expr) -> Option<Norm> {
        let names = ["softmax", "sum", "none"];
        let hint = "norms are `softmax`, `sum`, `sum(eps = 1e-6)` and `none`";
        if let Some(id) = bare_ident(e) {
            return match id.to_string().as_str() {
                "softmax" => Some(Norm::Softmax),
                "sum" => Some(Norm::Sum { eps: 1e-6 }),
                "none" => Some(Norm::None),
                other => {
                    let h = did_you_mean(other, names).unwrap_or_else(|| hint.into());
                    self.err_hint(id.span(), format!("unknown norm `{other}`"), h);
                    None
                }
            };
        }
        let Some((f, args, span)) = as_call(e) else {
            self.err_hint(
                e.span(),
                format!("expected a norm, found `{}`", show(e)),
                hint,
            );
            return None;
        };
        if f != "sum" {
            let s = f.to_string();
            if names.contains(&s.as_str()) {
                self.err_hint(span, format!("norm `{s}` takes no arguments"), hint);
            } else {
                let h = did_you_mean(&s, names).unwrap_or_else(|| hint.into());
                self.err_hint(f.span(), format!("unknown norm `{s}`"), h);
            }
            return None;
        }
        let [arg] = args.as_slice() else {
            self.err_hint(span, "`sum` takes one argument, `eps = NUMBER`", hint);
            return None;
        };
        match peel(arg) {
            syn::Expr::Assign(a) if bare_ident(&a.left).is_some_and(|i| i == "eps") => {
                let eps = self.positive_number(&a.right, "`eps`")?;
                Some(Norm::Sum { eps })
            }
            other => {
                self.err_hint(
                    other.span(),
                    "`sum` takes one argument, `eps = NUMBER`",
                    "write `sum(eps = 1e-6)`",
                );
                None
            }
        }
    }

    fn decay(&mut self, e: &syn::Expr) -> Option<Decay> {
        if let Some((f, args, span)) = as_call(e) {
            if f == "gate" {
                return match args.as_slice() {
                    [a] => match bare_ident(a) {
                        Some(id) => {
                            self.use_input(id, InputRole::Gate);
                            Some(Decay::Gate {
                                input: id.to_string(),
                            })
                        }
                        None => {
                            self.err_hint(
                                a.span(),
                                "`gate` takes the name of an input",
                                "write `gate(g)` with `input g: f32[batch, seq, heads];`",
                            );
                            None
                        }
                    },
                    _ => {
                        self.err_hint(
                            span,
                            format!("`gate` takes 1 argument, found {}", args.len()),
                            "write `gate(g)` with `input g: f32[batch, seq, heads];`",
                        );
                        None
                    }
                };
            }
        }
        let (x, _) = self.numeric(e, Ctx::Decay)?;
        // gamma must lie in (0, 1] for every head, or the recurrence blows up.
        if let Some(heads) = self.heads {
            let lookup = |_: &str, _: &[i64]| 0.0;
            for h in 0..heads {
                let g = x.eval_f64(&EvalEnv::for_head(h as i64, heads, &lookup));
                if !(g > 0.0 && g <= 1.0) {
                    self.err_hint(
                        e.span(),
                        format!("decay evaluates to {g} for head {h}; it must lie in (0, 1]"),
                        "gamma_h is the factor applied per step: e.g. `1.0 - pow(2.0, -5.0 - h)`",
                    );
                    return None;
                }
            }
        }
        Some(Decay::PerHead(x))
    }

    fn scale(&mut self, e: &syn::Expr) -> Option<f64> {
        let (x, _) = self.numeric(e, Ctx::Scale)?;
        let lookup = |_: &str, _: &[i64]| 0.0;
        let v = x.eval_f64(&EvalEnv::for_head(0, self.heads.unwrap_or(1), &lookup));
        if !(v.is_finite() && v > 0.0) {
            self.err(
                e.span(),
                format!("`scale` must be a positive finite number, but evaluates to {v}"),
            );
            return None;
        }
        if v > f32::MAX as f64 || (v as f32) == 0.0 {
            self.err_hint(
                e.span(),
                format!("`scale` evaluates to {v:e}, which f32 cannot hold"),
                "the kernels scale scores in f32: between about 1.4e-45 and 3.4e38",
            );
            return None;
        }
        Some(v)
    }
}

enum RawScore {
    Dot(FeatureMap, FeatureMap),
    Filter(String, Span),
}

/// A condition with the conjunct `j <= i` (or `i >= j`) becomes the
/// built-in `causal` beside the rest, so every backend keeps causal's exact
/// closed form (tile skipping, loop bounds): `j <= i && i - j < 64` is
/// `causal && i - j < 64`. The pairs allowed are the same.
fn causal_lifted(e: Expr) -> Mask {
    let is_causal = |c: &Expr| c.causal_comparison() == Some(false);
    let parts = e.conjuncts();
    if !parts.iter().any(|c| is_causal(c)) {
        return Mask::Expr(e);
    }
    let rest = parts
        .into_iter()
        .filter(|c| !is_causal(c))
        .cloned()
        .reduce(|a, b| Expr::Binary(BinOp::And, Box::new(a), Box::new(b)));
    match rest {
        None => Mask::Causal,
        Some(r) => Mask::And(Box::new(Mask::Causal), Box::new(Mask::Expr(r))),
    }
}

/// An expression of literals, operators and function calls only (no
/// variable, no table): a candidate constant.
fn is_constant_syntax(e: &syn::Expr) -> bool {
    use syn::Expr as E;
    match e {
        E::Lit(_) => true,
        E::Paren(p) => is_constant_syntax(&p.expr),
        E::Group(g) => is_constant_syntax(&g.expr),
        E::Binary(b) => is_constant_syntax(&b.left) && is_constant_syntax(&b.right),
        E::Unary(u) => is_constant_syntax(&u.expr),
        E::Call(c) => bare_ident(&c.func).is_some() && c.args.iter().all(is_constant_syntax),
        _ => false,
    }
}

/// Does `e` mention a built-in mask (`causal`, `window(..)`, ...)?
fn has_builtin_mask(e: &syn::Expr) -> bool {
    use syn::Expr as E;
    match e {
        E::Paren(p) => has_builtin_mask(&p.expr),
        E::Group(g) => has_builtin_mask(&g.expr),
        E::Binary(b) => has_builtin_mask(&b.left) || has_builtin_mask(&b.right),
        E::Unary(u) => has_builtin_mask(&u.expr),
        E::Path(_) => bare_ident(e).is_some_and(|id| MASKS.contains(&id.to_string().as_str())),
        E::Call(c) => {
            bare_ident(&c.func).is_some_and(|id| MASKS.contains(&id.to_string().as_str()))
        }
        _ => false,
    }
}

fn mask_usage(m: &str) -> &'static str {
    match m {
        "window" => "window(SIZE)",
        "prefix_lm" => "prefix_lm(LEN)",
        "segment" => "segment(NAME)",
        "dilated" => "dilated(RATE)",
        "block_sparse" => "block_sparse(block = B, local = L, global = G)",
        "all" => "all",
        _ => "causal",
    }
}

pub(crate) fn list(items: &[&str]) -> String {
    let q: Vec<String> = items.iter().map(|s| format!("`{s}`")).collect();
    match q.len() {
        0 => "nothing".into(),
        1 => q[0].clone(),
        n => format!("{} and {}", q[..n - 1].join(", "), q[n - 1]),
    }
}

/// Validates a parsed spec. Returns `None` iff at least one error was recorded.
pub(crate) fn check(raw: RawSpec, diags: &mut Diagnostics) -> Option<MixerSpec> {
    let errors_before = diags.len();
    let mut ck = Checker {
        diags,
        decls: Vec::new(),
        uses: Vec::new(),
        heads: None,
        kv_heads: None,
        broken: raw.broken.clone(),
    };

    // Inputs first: expressions need their dims wherever they are declared.
    let mut keys: Vec<(&'static str, &KeyItem)> = Vec::new();
    for item in &raw.items {
        match item {
            Item::Input(it) => ck.declare(it),
            Item::Key(k) => {
                let name = k.key.to_string();
                let Some(known) = KEYS.iter().find(|x| **x == name) else {
                    let hint = did_you_mean(&name, KEYS.iter().copied())
                        .unwrap_or_else(|| format!("keys are {}", list(KEYS)));
                    ck.err_hint(k.key.span(), format!("unknown key `{name}`"), hint);
                    continue;
                };
                if let Some((_, first)) = keys.iter().find(|(n, _)| *n == *known) {
                    let line = line_of(first.key.span());
                    ck.err_hint(
                        k.key.span(),
                        format!("duplicate key `{name}`"),
                        format!("`{name}` is already set on line {line}; remove one"),
                    );
                    continue;
                }
                keys.push((known, k));
            }
        }
    }
    let get = |n: &str| keys.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);

    let heads = get("heads").and_then(|k| ck.uint_in(&k.value, "`heads`", 1, MAX_HEADS));
    ck.heads = heads.map(|h| h as u32);
    let kv_heads = get("kv_heads").and_then(|k| ck.uint_in(&k.value, "`kv_heads`", 1, MAX_HEADS));
    ck.kv_heads = kv_heads.map(|v| v as u32);
    let head_dim =
        get("head_dim").and_then(|k| ck.uint_in(&k.value, "`head_dim`", 1, MAX_HEAD_DIM));
    let value_dim =
        get("value_dim").and_then(|k| ck.uint_in(&k.value, "`value_dim`", 1, MAX_HEAD_DIM));
    let dtype = get("dtype").map(|k| ck.dtype(&k.value));
    let score = get("score").map(|k| ck.score(&k.value));
    let scale = get("scale").map(|k| ck.scale(&k.value));
    let bias = get("bias").map(|k| ck.numeric(&k.value, Ctx::Bias));
    let transform = get("transform").map(|k| ck.numeric(&k.value, Ctx::Transform));
    let mask = get("mask").map(|k| ck.mask(&k.value));
    let decay = get("decay").map(|k| ck.decay(&k.value));
    let norm = get("norm").map(|k| ck.norm(&k.value));
    let inputs = ck.resolve_inputs();
    ck.ident_fits(&raw.name.to_string(), raw.name.span(), "the mixer name");

    for key in ["heads", "head_dim"] {
        if get(key).is_none() && !raw.broken.iter().any(|b| b == key) {
            let what = if key == "heads" {
                "`heads = N;` (the number of query heads)"
            } else {
                "`head_dim = D;` (the width of q and k)"
            };
            ck.err_hint(
                raw.name.span(),
                format!("missing required key `{key}`"),
                format!("add {what}"),
            );
        }
    }

    // Cross-key rules, on the values that checked out individually.
    let span_of = |n: &str| get(n).map(|k| k.value.span());
    if let (Some(h), Some(kv)) = (heads, kv_heads) {
        if h % kv != 0 {
            ck.err_hint(
                span_of("kv_heads").unwrap_or_else(Span::call_site),
                format!("`kv_heads` = {kv} does not divide `heads` = {h}"),
                "each kv head serves `heads / kv_heads` query heads; pick a divisor of `heads`",
            );
        }
    }
    let mask_v = mask.clone().flatten().unwrap_or(Mask::All);
    let norm_v = norm.flatten().unwrap_or(Norm::Softmax);
    // A key that failed its own check is not blamed again by cross-key rules.
    let is_broken = |k: &str| raw.broken.iter().any(|b| b == k);
    let mask_ok = mask.as_ref().map_or(!is_broken("mask"), |m| m.is_some());
    let norm_ok = norm.map_or(!is_broken("norm"), |n| n.is_some());
    let causal_hint = |m: Option<&KeyItem>| match m {
        Some(k) => format!("write `mask = causal && {};`", show(&k.value)),
        None => "add `mask = causal;`".to_string(),
    };
    if let Some(Some(RawScore::Filter(_, fspan))) = &score {
        let fspan = *fspan;
        if mask_ok && !mask_v.implies_causal() {
            ck.err_hint(
                fspan,
                "`filter` (a causal convolution) needs a causal mask",
                causal_hint(get("mask")),
            );
        }
        if norm_ok && norm_v == Norm::Softmax {
            let at = span_of("norm").unwrap_or(fspan);
            ck.err_hint(
                at,
                "`filter` cannot be combined with softmax normalisation",
                "the convolution family sums `f[h, i - j] v_j` directly: use `norm = none;` (or `sum`)",
            );
        }
        for key in ["bias", "transform", "decay", "scale"] {
            if let Some(k) = get(key) {
                ck.err_hint(
                    k.key.span(),
                    format!("`{key}` cannot be combined with `score = filter(..)`"),
                    "the convolution weight is the filter tap itself; remove this key",
                );
            }
        }
    }
    if let Some(Some(_)) = &decay {
        let dspan = span_of("decay").unwrap_or_else(Span::call_site);
        if mask_ok && !mask_v.implies_causal() {
            ck.err_hint(
                dspan,
                "`decay` needs a causal mask (the decay product runs from key j to query i)",
                causal_hint(get("mask")),
            );
        }
        if norm_ok && norm_v == Norm::Softmax {
            ck.err_hint(
                dspan,
                "`decay` with softmax normalisation is not supported",
                "decayed families (retention, gated) use `norm = none;` or `norm = sum;`",
            );
        }
    }

    if ck.diags.len() > errors_before {
        return None;
    }

    // Everything checked out: assemble, applying defaults.
    let heads = heads? as u32;
    let head_dim = head_dim? as u32;
    let score = match score.flatten() {
        Some(RawScore::Filter(input, _)) => Score::Filter { input },
        Some(RawScore::Dot(q_map, k_map)) => Score::Dot {
            q_map,
            k_map,
            scale: 0.0,
        },
        None => Score::Dot {
            q_map: FeatureMap::Identity,
            k_map: FeatureMap::Identity,
            scale: 0.0,
        },
    };
    let default_scale = matches!(score, Score::Dot { .. }) && scale.flatten().is_none();
    let score = match score {
        Score::Dot { q_map, k_map, .. } => Score::Dot {
            q_map,
            k_map,
            scale: scale.flatten().unwrap_or(if norm_v == Norm::Softmax {
                1.0 / (head_dim as f64).sqrt()
            } else {
                1.0
            }),
        },
        f => f,
    };
    let decay = decay.flatten().unwrap_or(Decay::None);
    let family = match (&score, norm_v, &decay) {
        (Score::Filter { .. }, _, _) => Family::Convolution,
        (_, Norm::Softmax, _) => Family::Softmax,
        (_, _, Decay::PerHead(_)) => Family::Retention,
        (_, _, Decay::Gate { .. }) => Family::Gated,
        (_, _, Decay::None) => Family::Linear,
    };
    Some(MixerSpec {
        name: raw.name.to_string(),
        heads,
        kv_heads: kv_heads.map(|v| v as u32).unwrap_or(heads),
        head_dim,
        value_dim: value_dim.map(|v| v as u32).unwrap_or(head_dim),
        dtype: dtype.flatten().unwrap_or(DType::Bf16),
        inputs,
        score,
        bias: bias.flatten().map(|(e, _)| e),
        transform: transform.flatten().map(|(e, _)| e),
        mask: mask_v,
        decay,
        norm: norm_v,
        family,
        default_scale,
    })
}
