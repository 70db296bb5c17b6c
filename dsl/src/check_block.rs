//! Block files: any number of `mixer NAME { ... }` items and exactly one
//! `block NAME { ... }` item, in any order, checked into a [`BlockSpec`].
//!
//! The file is first cut into top-level items. Each mixer item goes through
//! the ordinary mixer front end (`syntax::parse_spec` and `check::check`) on
//! its own tokens, so its diagnostics are exactly those of a mixer file and
//! its spans those of this file. A `mixer NAME { ... }` written inside the
//! block body (an inline mixer) is taken out first and goes through the same
//! front end. The rest of the block body is split by the same
//! `syntax::parse_body` as a mixer body; its keys are checked one by one,
//! then against the mixer they name. A rule that depends on something that
//! already failed (a mixer with errors, a key that did not parse, an item
//! the file structure could not make sense of) stays silent: every error is
//! reported once, at its cause.

use crate::block::{BlockNorm, BlockSpec, Ffn, FfnKind, NormKind, Rope};
use crate::check::{self, as_call, bare_ident, did_you_mean, line_of, list, peel, show, Checker};
use crate::diag::{Diagnostic, Diagnostics};
use crate::ir::{MixerSpec, Score};
use crate::syntax::{
    describe, head_span, is_ident, is_punct, parse_body, parse_spec, skip_attrs, BodyKind, Item,
    KeyItem,
};
use proc_macro2::{Delimiter, Group, Ident, Span, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::spanned::Spanned;

/// Every key of a `block` item, in documentation order.
pub const BLOCK_KEYS: &[&str] = &["width", "mixer", "norm", "ffn", "rope"];

/// Largest accepted block `width` (d_model).
pub const MAX_WIDTH: u64 = 65536;

/// Largest accepted FFN hidden width (d_ff).
pub const MAX_FFN_HIDDEN: u64 = 1 << 20;

/// The norm eps when `norm = rmsnorm;` / `layernorm;` gives none.
pub const DEFAULT_NORM_EPS: f64 = 1e-5;

const FILE_HINT: &str =
    "a block file holds `mixer NAME { ... }` items and one `block NAME { ... }` item";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mixer,
    Block,
}

/// One top-level item: its attributes, keyword, and everything up to and
/// including its `{ ... }` body (or up to where the next item starts).
struct TopItem {
    kind: Kind,
    keyword: Span,
    tokens: Vec<TokenTree>,
    /// Index of the keyword in `tokens` (after the attributes).
    kw_at: usize,
}

impl TopItem {
    /// The item's name, when the token after the keyword is an identifier.
    fn name(&self) -> Option<Ident> {
        match self.tokens.get(self.kw_at + 1) {
            Some(TokenTree::Ident(id)) => Some(id.unraw()),
            _ => None,
        }
    }
}

fn is_item_keyword(tt: &TokenTree) -> bool {
    is_ident(tt, "mixer") || is_ident(tt, "block")
}

/// Index of the next token that can start an item (a keyword or an
/// attribute), from `i` on.
fn next_item(toks: &[TokenTree], mut i: usize) -> usize {
    while i < toks.len() && !is_item_keyword(&toks[i]) && !is_punct(&toks[i], '#') {
        i += 1;
    }
    i
}

/// Cuts the file into items. The second value is true when some tokens
/// could not be read as an item (already reported): what they meant is
/// unknown, so rules about what the file lacks must stay silent.
fn split_items(toks: &[TokenTree], diags: &mut Diagnostics) -> (Vec<TopItem>, bool) {
    let mut items = Vec::new();
    let mut unreadable = false;
    let mut i = 0;
    while i < toks.len() {
        let start = i;
        let Some(at) = skip_attrs(toks, i, diags) else {
            unreadable = true;
            // Resume after the bad `#` (a keyword, or the next attribute).
            i = next_item(toks, i + 1);
            while i < toks.len() && is_punct(&toks[i], '#') {
                i = next_item(toks, i + 1);
            }
            continue;
        };
        let Some(kw) = toks.get(at) else {
            diags.error_hint(
                toks[at - 1].span(),
                "expected an item after the attributes",
                FILE_HINT,
            );
            unreadable = true;
            break;
        };
        let kind = if is_ident(kw, "mixer") {
            Kind::Mixer
        } else if is_ident(kw, "block") {
            Kind::Block
        } else {
            let hint = match kw {
                TokenTree::Ident(id) => did_you_mean(&id.to_string(), ["mixer", "block"]),
                TokenTree::Punct(p) if p.as_char() == ';' && start > 0 => {
                    Some("an item ends at its closing `}`: remove this `;`".to_string())
                }
                _ => None,
            }
            .unwrap_or_else(|| FILE_HINT.to_string());
            diags.error_hint(
                head_span(kw),
                format!("expected `mixer` or `block`, found {}", describe(kw)),
                hint,
            );
            unreadable = true;
            i = next_item(toks, at + 1);
            continue;
        };
        // The item runs through its first `{ ... }`, but stops before a
        // keyword or attribute past the name: with its body missing, the
        // next item must not be swallowed.
        let mut end = at + 1;
        while end < toks.len() {
            let t = &toks[end];
            if end >= at + 2 && (is_item_keyword(t) || is_punct(t, '#')) {
                break;
            }
            end += 1;
            if matches!(t, TokenTree::Group(g) if g.delimiter() == Delimiter::Brace) {
                break;
            }
        }
        items.push(TopItem {
            kind,
            keyword: kw.span(),
            tokens: toks[start..end].to_vec(),
            kw_at: at - start,
        });
        i = end;
    }
    (items, unreadable)
}

/// A mixer item after the mixer front end ran on it.
struct MixerEntry {
    name: Option<Ident>,
    /// `None`: it has errors (already reported), or its name is taken twice.
    spec: Option<MixerSpec>,
}

/// `block NAME { body }`, structurally sound.
struct BlockItem {
    name: Ident,
    body: Group,
}

/// Reads `block NAME { ... }`; reports and returns `None` when the shape is wrong.
fn block_structure(item: &TopItem, diags: &mut Diagnostics) -> Option<BlockItem> {
    let toks = &item.tokens[item.kw_at..];
    let name = match toks.get(1) {
        Some(TokenTree::Ident(id)) => id.unraw(),
        Some(other) => {
            diags.error_hint(
                head_span(other),
                format!(
                    "expected the block's name after `block`, found {}",
                    describe(other)
                ),
                "write `block NAME { ... }`",
            );
            return None;
        }
        None => {
            diags.error_hint(
                item.keyword,
                "expected the block's name after `block`",
                "write `block NAME { ... }`",
            );
            return None;
        }
    };
    match toks.get(2) {
        Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => Some(BlockItem {
            name,
            body: g.clone(),
        }),
        Some(other) => {
            diags.error(
                head_span(other),
                format!(
                    "expected `{{` after the block name, found {}",
                    describe(other)
                ),
            );
            None
        }
        None => {
            diags.error_hint(
                name.span(),
                "expected `{` after the block name",
                format!("write `block {name} {{ width = ...; norm = ...; ffn = ...; }}`"),
            );
            None
        }
    }
}

/// Parses and checks a block file. Returns `None` iff an error was recorded.
pub(crate) fn parse_block(ts: TokenStream, diags: &mut Diagnostics) -> Option<BlockSpec> {
    let errors_before = diags.len();
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let (items, mut unreadable) = split_items(&toks, diags);

    // Every mixer, referenced or not, is checked as in a mixer file.
    let mut mixers: Vec<MixerEntry> = Vec::new();
    for item in items.iter().filter(|it| it.kind == Kind::Mixer) {
        let name = item.name();
        // An unnamed mixer (reported by `parse_spec`) may be the one the
        // block names.
        unreadable |= name.is_none();
        let ts: TokenStream = item.tokens.iter().cloned().collect();
        let spec = parse_spec(ts, diags).and_then(|raw| check::check(raw, diags));
        if let Some(name) = &name {
            let taken = mixers
                .iter_mut()
                .find(|m| m.name.as_ref().is_some_and(|n| n == name));
            if let Some(first) = taken {
                let line = first.name.as_ref().map_or(0, |n| line_of(n.span()));
                diags.error_hint(
                    name.span(),
                    format!("mixer `{name}` is defined twice"),
                    format!("the first is on line {line}; give each mixer its own name"),
                );
                // Which one `mixer = NAME` means is unknown: neither resolves.
                first.spec = None;
                continue;
            }
        }
        mixers.push(MixerEntry { name, spec });
    }

    let mut blocks = items.iter().filter(|it| it.kind == Kind::Block);
    let first = blocks.next();
    for extra in blocks {
        let first_line = first.map_or(0, |b| line_of(b.keyword));
        diags.error_hint(
            extra.keyword,
            "only one `block` is allowed per file",
            format!("the first is on line {first_line}; put each block in its own file"),
        );
    }
    let Some(first) = first else {
        if !unreadable {
            let (span, msg) = match items.first() {
                Some(it) => (it.keyword, "no `block` item in this file"),
                None => (
                    toks.last().map_or_else(Span::call_site, |t| t.span()),
                    "empty file: expected a `block NAME { ... }` item",
                ),
            };
            diags.error_hint(
                span,
                msg,
                "a block file holds its mixers and one `block NAME { width = ...; norm = ...; ffn = ...; }`",
            );
        }
        return None;
    };
    let block = block_structure(first, diags)?;
    let spec = check_block(&block, &mixers, unreadable, diags);
    if diags.len() > errors_before {
        return None;
    }
    spec
}

/// Where the block's mixer comes from.
enum MixerRef<'a> {
    /// Resolved; the span to blame for mixer-dependent errors.
    Found(&'a MixerSpec, Span),
    /// Not usable, already reported (here or at its cause).
    Failed,
}

/// A `mixer NAME { ... }` item written inside a block body.
struct InlineMixer {
    keyword: Span,
    name: Option<Ident>,
    /// `None`: it has errors (already reported).
    spec: Option<MixerSpec>,
}

/// Does an inline mixer start at `toks[i]`? `at_start`: `toks[i]` begins
/// an item. Returns the index after its attributes and `{ ... }` body.
fn inline_mixer_end(toks: &[TokenTree], i: usize, at_start: bool) -> Option<usize> {
    let mut at = i;
    if at_start {
        while at + 1 < toks.len()
            && is_punct(&toks[at], '#')
            && matches!(&toks[at + 1], TokenTree::Group(g) if g.delimiter() == Delimiter::Bracket)
        {
            at += 2;
        }
    }
    let is_brace = |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace);
    if !toks.get(at).is_some_and(|t| is_ident(t, "mixer")) {
        return None;
    }
    match toks.get(at + 1) {
        // `mixer NAME { ... }`, wherever it stands.
        Some(TokenTree::Ident(_)) if is_brace(toks.get(at + 2)) => Some(at + 3),
        // `mixer { ... }` (its missing name is reported by `parse_spec`).
        t if at_start && is_brace(t) => Some(at + 2),
        _ => None,
    }
}

/// Takes the inline `mixer` items out of a block body: each runs through
/// the mixer front end on its own tokens, exactly as a top-level one. The
/// rest of the body (keys) is returned for `parse_body`. An inline mixer
/// ends at its `}`; a `;` after it is an empty item, which is harmless.
fn take_inline_mixers(
    body: TokenStream,
    diags: &mut Diagnostics,
) -> (TokenStream, Vec<InlineMixer>) {
    let toks: Vec<TokenTree> = body.into_iter().collect();
    let mut rest: Vec<TokenTree> = Vec::new();
    let mut inline = Vec::new();
    let mut at_start = true;
    let mut i = 0;
    while i < toks.len() {
        let Some(end) = inline_mixer_end(&toks, i, at_start) else {
            at_start = is_punct(&toks[i], ';');
            rest.push(toks[i].clone());
            i += 1;
            continue;
        };
        let item = &toks[i..end];
        let kw = item
            .iter()
            .find(|t| is_ident(t, "mixer"))
            .map_or_else(|| toks[i].span(), |t| t.span());
        if !at_start {
            // The key before it lacks its `;`: end that key here.
            diags.error_hint(
                kw,
                "expected `;`, found `mixer`",
                "every key ends with `;`; an inline mixer ends at its `}`",
            );
            let mut semi = proc_macro2::Punct::new(';', proc_macro2::Spacing::Alone);
            semi.set_span(kw);
            rest.push(TokenTree::Punct(semi));
        }
        let name = match item.iter().skip_while(|t| !is_ident(t, "mixer")).nth(1) {
            Some(TokenTree::Ident(id)) => Some(id.unraw()),
            _ => None,
        };
        let ts: TokenStream = item.iter().cloned().collect();
        let spec = parse_spec(ts, diags).and_then(|raw| check::check(raw, diags));
        inline.push(InlineMixer {
            keyword: kw,
            name,
            spec,
        });
        at_start = true;
        i = end;
    }
    (rest.into_iter().collect(), inline)
}

fn check_block(
    block: &BlockItem,
    mixers: &[MixerEntry],
    unreadable: bool,
    diags: &mut Diagnostics,
) -> Option<BlockSpec> {
    let (body, inline) = take_inline_mixers(block.body.stream(), diags);
    let (items, broken) = parse_body(body, BodyKind::Block, diags);
    let mut ck = Checker::new(diags);
    let name = &block.name;

    let mut keys: Vec<(&'static str, &KeyItem)> = Vec::new();
    for item in &items {
        let k = match item {
            Item::Key(k) => k,
            // The block body parser drops (and reports) `input` items.
            Item::Input(it) => {
                ck.err(it.name.span(), "a block declares no inputs");
                continue;
            }
        };
        let key = k.key.to_string();
        let Some(known) = BLOCK_KEYS.iter().find(|x| **x == key) else {
            let hint = if check::KEYS.contains(&key.as_str()) {
                format!("`{key}` is a mixer key: set it in the `mixer` item the block wraps")
            } else {
                did_you_mean(&key, BLOCK_KEYS.iter().copied())
                    .unwrap_or_else(|| format!("block keys are {}", list(BLOCK_KEYS)))
            };
            ck.err_hint(k.key.span(), format!("unknown block key `{key}`"), hint);
            continue;
        };
        if let Some((_, first)) = keys.iter().find(|(n, _)| *n == *known) {
            let line = line_of(first.key.span());
            ck.err_hint(
                k.key.span(),
                format!("duplicate key `{key}`"),
                format!("`{key}` is already set on line {line}; remove one"),
            );
            continue;
        }
        keys.push((known, k));
    }
    let get = |n: &str| keys.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
    let is_broken = |n: &str| broken.iter().any(|b| b == n);

    ck.ident_fits(&name.to_string(), name.span(), "the block name");
    let width = get("width").and_then(|k| ck.uint_in(&k.value, "`width`", 1, MAX_WIDTH));
    let norm = get("norm").and_then(|k| block_norm(&mut ck, &k.value));
    let ffn = get("ffn").and_then(|k| ffn(&mut ck, &k.value));
    let rope = get("rope").and_then(|k| {
        positive(
            &mut ck,
            &k.value,
            "`rope`",
            "write the rotary base, e.g. `rope = 10000;`",
        )
    });

    for (key, what) in [
        ("width", "`width = N;` (the model width d_model)"),
        ("norm", "`norm = rmsnorm;` or `norm = layernorm;`"),
        ("ffn", "`ffn = swiglu(HIDDEN);` or `ffn = gelu(HIDDEN);`"),
    ] {
        if get(key).is_none() && !is_broken(key) {
            ck.err_hint(
                name.span(),
                format!("block `{name}` is missing required key `{key}`"),
                format!("add {what}"),
            );
        }
    }

    let mixer = match inline.as_slice() {
        [] => resolve_mixer(
            &mut ck,
            block,
            get("mixer"),
            is_broken("mixer"),
            mixers,
            unreadable,
        ),
        [first, more @ ..] => inline_mixer(&mut ck, block, first, more, get("mixer")),
    };
    if let MixerRef::Found(m, at) = mixer {
        if let Score::Filter { .. } = m.score {
            ck.err_hint(
                at,
                format!(
                    "mixer `{}` is a convolution (`score = filter(..)`): it reads only v, so it cannot sit in a block",
                    m.name
                ),
                "a block projects x to q, k and v; wrap a mixer whose score is a dot product (`score = dot(q, k)`, the default)",
            );
        } else if let (Some(_), Some(k)) = (rope, get("rope")) {
            if m.head_dim % 2 != 0 {
                ck.err_hint(
                    peel(&k.value).span(),
                    format!(
                        "`rope` needs an even head_dim, but mixer `{}` has head_dim {}",
                        m.name, m.head_dim
                    ),
                    "rotary embedding turns dims i and i + head_dim/2 of each head together; use an even `head_dim` or remove `rope`",
                );
            }
        }
    }

    let MixerRef::Found(mixer, _) = mixer else {
        return None;
    };
    Some(BlockSpec {
        name: name.to_string(),
        width: width? as u32,
        mixer: mixer.clone(),
        norm: norm?,
        ffn: ffn?,
        rope: rope.map(|base| Rope { base }),
    })
}

/// The block's inline mixer, unless there are several or `mixer = NAME;`
/// names one as well (each reported; its own errors were reported already).
fn inline_mixer<'m>(
    ck: &mut Checker<'_>,
    block: &BlockItem,
    first: &'m InlineMixer,
    more: &[InlineMixer],
    key: Option<&KeyItem>,
) -> MixerRef<'m> {
    let bname = &block.name;
    let line = line_of(first.keyword);
    let what = match &first.name {
        Some(n) => format!("inline mixer `{n}`"),
        None => "inline mixer".to_string(),
    };
    let mut ok = true;
    for extra in more {
        ok = false;
        ck.err_hint(
            extra.keyword,
            format!("block `{bname}` has a second inline mixer"),
            format!(
                "a block wraps one mixer and the {what} on line {line} is the first: remove one, or move it out of the block"
            ),
        );
    }
    if let Some(k) = key {
        ok = false;
        ck.err_hint(
            k.key.span(),
            format!(
                "block `{bname}` has both an inline mixer and `mixer = {};`",
                show(&k.value)
            ),
            format!(
                "the {what} on line {line} is the block's mixer: remove `mixer = {};`",
                show(&k.value)
            ),
        );
    }
    match &first.spec {
        Some(spec) if ok => {
            MixerRef::Found(spec, first.name.as_ref().map_or(first.keyword, Ident::span))
        }
        _ => MixerRef::Failed,
    }
}

/// The mixer the block wraps: the one `mixer = NAME` names, or the file's
/// only mixer.
fn resolve_mixer<'m>(
    ck: &mut Checker<'_>,
    block: &BlockItem,
    key: Option<&KeyItem>,
    key_broken: bool,
    mixers: &'m [MixerEntry],
    unreadable: bool,
) -> MixerRef<'m> {
    let names: Vec<String> = mixers
        .iter()
        .filter_map(|m| m.name.as_ref().map(|n| n.to_string()))
        .collect();
    let found = |m: &'m MixerEntry, at: Span| match &m.spec {
        Some(spec) => MixerRef::Found(spec, at),
        None => MixerRef::Failed,
    };
    let Some(k) = key else {
        if key_broken {
            return MixerRef::Failed;
        }
        let bname = &block.name;
        return match mixers {
            [only] => found(only, bname.span()),
            [] => {
                if !unreadable {
                    ck.err_hint(
                        bname.span(),
                        format!("block `{bname}` has no mixer to wrap: this file defines none"),
                        "add a `mixer NAME { ... }` item to this file",
                    );
                }
                MixerRef::Failed
            }
            several => {
                let hint = match names.first() {
                    Some(n) => format!("add `mixer = {n};` (or another of them) to the block"),
                    None => "add `mixer = NAME;` to the block".to_string(),
                };
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                ck.err_hint(
                    bname.span(),
                    format!(
                        "block `{bname}` must say which mixer it wraps: this file defines {} ({})",
                        several.len(),
                        list(&refs)
                    ),
                    hint,
                );
                MixerRef::Failed
            }
        };
    };
    let Some(id) = bare_ident(&k.value) else {
        ck.err_hint(
            k.value.span(),
            format!(
                "expected a mixer name for `mixer`, found `{}`",
                show(&k.value)
            ),
            "write `mixer = NAME;` naming a `mixer` item of this file",
        );
        return MixerRef::Failed;
    };
    let want = id.unraw().to_string();
    if let Some(m) = mixers
        .iter()
        .find(|m| m.name.as_ref().is_some_and(|n| *n == want))
    {
        return found(m, id.span());
    }
    if unreadable {
        // It may be the item the file structure could not read.
        return MixerRef::Failed;
    }
    let hint = did_you_mean(&want, names.iter().map(String::as_str)).unwrap_or_else(|| {
        if names.is_empty() {
            format!("this file defines no mixer; add `mixer {want} {{ ... }}`")
        } else {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            format!("the mixers in this file are {}", list(&refs))
        }
    });
    ck.err_hint(
        id.span(),
        format!("no mixer named `{want}` in this file"),
        hint,
    );
    MixerRef::Failed
}

/// A positive finite number literal, with a hint for other forms.
fn positive(ck: &mut Checker<'_>, e: &syn::Expr, what: &str, hint: &str) -> Option<f64> {
    match peel(e) {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(_) | syn::Lit::Float(_),
            ..
        }) => ck.positive_number(e, what),
        ex @ syn::Expr::Unary(syn::ExprUnary {
            op: syn::UnOp::Neg(_),
            ..
        }) => {
            ck.err(
                ex.span(),
                format!(
                    "{what} must be a positive finite number, found `{}`",
                    show(ex)
                ),
            );
            None
        }
        ex => {
            ck.err_hint(
                ex.span(),
                format!("expected a number for {what}, found `{}`", show(ex)),
                hint,
            );
            None
        }
    }
}

/// `rmsnorm` | `layernorm`, optionally `(EPS)` or `(eps = EPS)`.
fn block_norm(ck: &mut Checker<'_>, e: &syn::Expr) -> Option<BlockNorm> {
    const NAMES: [&str; 2] = ["rmsnorm", "layernorm"];
    const HINT: &str =
        "block norms are `rmsnorm` and `layernorm`, optionally with an eps: `rmsnorm(1e-5)`";
    let kind_of = |s: &str| match s {
        "rmsnorm" => Some(NormKind::RmsNorm),
        "layernorm" => Some(NormKind::LayerNorm),
        _ => None,
    };
    let unknown = |ck: &mut Checker<'_>, id: &Ident| {
        let s = id.to_string();
        let hint = if matches!(s.as_str(), "softmax" | "sum" | "none") {
            format!("`{s}` normalises a mixer's weights (set it in the `mixer` item); {HINT}")
        } else {
            did_you_mean(&s, NAMES).unwrap_or_else(|| HINT.to_string())
        };
        ck.err_hint(id.span(), format!("unknown block norm `{s}`"), hint);
    };
    if let Some(id) = bare_ident(e) {
        return match kind_of(&id.to_string()) {
            Some(kind) => Some(BlockNorm {
                kind,
                eps: DEFAULT_NORM_EPS,
            }),
            None => {
                unknown(ck, id);
                None
            }
        };
    }
    let Some((f, args, span)) = as_call(e) else {
        ck.err_hint(
            e.span(),
            format!("expected a block norm, found `{}`", show(e)),
            HINT,
        );
        return None;
    };
    let Some(kind) = kind_of(&f.to_string()) else {
        unknown(ck, f);
        return None;
    };
    let [arg] = args.as_slice() else {
        ck.err_hint(
            span,
            format!("`{f}` takes one argument, its eps"),
            format!("write `{f}` (eps {DEFAULT_NORM_EPS:e}) or e.g. `{f}(1e-6)`"),
        );
        return None;
    };
    let value = match peel(arg) {
        syn::Expr::Assign(a) if bare_ident(&a.left).is_some_and(|i| i == "eps") => &*a.right,
        other => other,
    };
    let eps = positive(ck, value, "`eps`", "write e.g. `rmsnorm(1e-5)`")?;
    if eps >= 1.0 {
        ck.err_hint(
            peel(value).span(),
            format!("`eps` must be less than 1, found `{}`", show(value)),
            "eps only keeps the square root away from zero; typical values are 1e-5 and 1e-6",
        );
        return None;
    }
    Some(BlockNorm { kind, eps })
}

/// `swiglu(HIDDEN)` | `gelu(HIDDEN)`.
fn ffn(ck: &mut Checker<'_>, e: &syn::Expr) -> Option<Ffn> {
    const NAMES: [&str; 2] = ["swiglu", "gelu"];
    const HINT: &str = "feed-forward networks are `swiglu(HIDDEN)` and `gelu(HIDDEN)`, with HIDDEN the hidden width d_ff";
    let kind_of = |s: &str| match s {
        "swiglu" => Some(FfnKind::SwiGlu),
        "gelu" => Some(FfnKind::Gelu),
        _ => None,
    };
    let unknown = |ck: &mut Checker<'_>, id: &Ident| {
        let s = id.to_string();
        let hint = did_you_mean(&s, NAMES).unwrap_or_else(|| HINT.to_string());
        ck.err_hint(id.span(), format!("unknown ffn `{s}`"), hint);
    };
    if let Some(id) = bare_ident(e) {
        let s = id.to_string();
        if kind_of(&s).is_some() {
            ck.err_hint(
                id.span(),
                format!("`{s}` needs its hidden width"),
                format!("write `ffn = {s}(HIDDEN);` with HIDDEN the hidden width d_ff"),
            );
        } else {
            unknown(ck, id);
        }
        return None;
    }
    let Some((f, args, span)) = as_call(e) else {
        ck.err_hint(
            e.span(),
            format!("expected an ffn, found `{}`", show(e)),
            HINT,
        );
        return None;
    };
    let Some(kind) = kind_of(&f.to_string()) else {
        unknown(ck, f);
        return None;
    };
    let [arg] = args.as_slice() else {
        ck.err_hint(
            span,
            format!("`{f}` takes one argument, its hidden width"),
            format!("write e.g. `{f}(2048)`"),
        );
        return None;
    };
    let hidden = ck.uint_in(arg, "the ffn hidden width", 1, MAX_FFN_HIDDEN)?;
    Some(Ffn {
        kind,
        hidden: hidden as u32,
    })
}

/// The diagnostic for a block file read as a mixer spec.
pub(crate) fn not_a_mixer(block_keyword: Span) -> Diagnostic {
    Diagnostic::new(
        block_keyword,
        "this file defines a transformer block, not a single mixer",
    )
    .with_hint("load it as a block; a mixer spec is one `mixer NAME { ... }` item")
}
