//! Syntax: token trees to a spanned, unchecked item list.
//!
//! The body of `mixer NAME { ... }` (and of `block NAME { ... }`, see
//! `check_block`) is split at top-level `;` first ([`parse_body`]), so a
//! syntax error in one item does not hide errors in the others. Right-hand
//! sides are parsed as `syn::Expr` and interpreted by `check`.

use crate::diag::Diagnostics;
use proc_macro2::{Delimiter, Ident, Literal, Span, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};

/// `mixer NAME { items }` before validation.
pub(crate) struct RawSpec {
    pub name: Ident,
    pub items: Vec<Item>,
    /// Keys and input names whose item failed to parse: validation must not
    /// report them again as missing or undeclared.
    pub broken: Vec<String>,
}

pub(crate) enum Item {
    Input(InputItem),
    Key(KeyItem),
}

/// `input NAME: ELEM[dims];`
pub(crate) struct InputItem {
    pub name: Ident,
    pub elem: Ident,
    pub dims: Vec<RawDim>,
}

pub(crate) enum RawDim {
    Named(Ident),
    Fixed(Literal),
}

/// `KEY = EXPR;`
pub(crate) struct KeyItem {
    pub key: Ident,
    pub value: syn::Expr,
}

pub(crate) fn is_punct(tt: &TokenTree, ch: char) -> bool {
    matches!(tt, TokenTree::Punct(p) if p.as_char() == ch)
}

pub(crate) fn is_ident(tt: &TokenTree, name: &str) -> bool {
    matches!(tt, TokenTree::Ident(i) if i == name)
}

/// Short rendering of a token for "found `...`" messages.
pub(crate) fn describe(tt: &TokenTree) -> String {
    match tt {
        TokenTree::Group(g) => match g.delimiter() {
            Delimiter::Brace => "`{`".into(),
            Delimiter::Bracket => "`[`".into(),
            Delimiter::Parenthesis => "`(`".into(),
            Delimiter::None => "a group".into(),
        },
        other => {
            let s = other.to_string();
            if s.chars().count() > 24 {
                format!("`{}...`", s.chars().take(24).collect::<String>())
            } else {
                format!("`{s}`")
            }
        }
    }
}

/// Span of a token; for groups only the opening delimiter, so carets stay short.
pub(crate) fn head_span(tt: &TokenTree) -> Span {
    match tt {
        TokenTree::Group(g) => g.span_open(),
        other => other.span(),
    }
}

/// Skips the outer attributes starting at `toks[i]` (`#[...]`, and `///`
/// doc comments, which the tokenizer turns into `#[doc = "..."]`): they are
/// accepted and ignored. Returns the index after them, or `None` after
/// reporting a malformed or inner attribute.
pub(crate) fn skip_attrs(
    toks: &[TokenTree],
    mut i: usize,
    diags: &mut Diagnostics,
) -> Option<usize> {
    while i < toks.len() && is_punct(&toks[i], '#') {
        match toks.get(i + 1) {
            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Bracket => i += 2,
            Some(TokenTree::Punct(p)) if p.as_char() == '!' => {
                diags.error_hint(
                    toks[i].span(),
                    "inner attributes (`#![...]`) are not allowed in a spec",
                    "use `//` comments, or `///` doc comments before `mixer`",
                );
                return None;
            }
            _ => {
                diags.error(toks[i].span(), "expected `[` after `#` (an attribute)");
                return None;
            }
        }
    }
    Some(i)
}

/// Where the file-level keyword `block` starts an item (first token after
/// the attributes, or right after a previous item's `{ ... }` or an
/// attribute), if anywhere: such a file defines a transformer block. A
/// mixer *named* `block` (`mixer block { ... }`) does not count.
pub(crate) fn find_block_keyword(toks: &[TokenTree]) -> Option<Span> {
    let mut at_item_start = true;
    let mut i = 0;
    while i < toks.len() {
        let tt = &toks[i];
        if at_item_start && is_ident(tt, "block") {
            return Some(tt.span());
        }
        if is_punct(tt, '#') {
            if let Some(TokenTree::Group(g)) = toks.get(i + 1) {
                if g.delimiter() == Delimiter::Bracket {
                    i += 2;
                    continue;
                }
            }
        }
        at_item_start = matches!(tt, TokenTree::Group(g) if g.delimiter() == Delimiter::Brace);
        i += 1;
    }
    None
}

/// Parses the file structure. Returns `None` when the structure itself is
/// broken (no `mixer NAME { }`); item-level errors are recorded in `diags`
/// and the items that did parse are still returned.
pub(crate) fn parse_spec(ts: TokenStream, diags: &mut Diagnostics) -> Option<RawSpec> {
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let mut i = skip_attrs(&toks, 0, diags)?;

    let Some(first) = toks.get(i) else {
        diags.error_hint(
            toks.last()
                .map(|t| t.span())
                .unwrap_or_else(Span::call_site),
            "empty spec: expected `mixer NAME { ... }`",
            "a spec is one `mixer NAME { heads = ...; head_dim = ...; }` block",
        );
        return None;
    };
    if !is_ident(first, "mixer") {
        let mut d = crate::diag::Diagnostic::new(
            head_span(first),
            format!("expected `mixer`, found {}", describe(first)),
        );
        d = d.with_hint(match first {
            TokenTree::Ident(id) if strsim::jaro_winkler(&id.to_string(), "mixer") > 0.8 => {
                "did you mean `mixer`?".to_string()
            }
            _ => "a spec is one `mixer NAME { ... }` block".to_string(),
        });
        diags.push(d);
        return None;
    }
    let mixer_span = first.span();
    i += 1;

    let name = match toks.get(i) {
        Some(TokenTree::Ident(id)) => id.unraw(),
        Some(other) => {
            diags.error(
                head_span(other),
                format!(
                    "expected the mixer's name after `mixer`, found {}",
                    describe(other)
                ),
            );
            return None;
        }
        None => {
            diags.error_hint(
                mixer_span,
                "expected the mixer's name after `mixer`",
                "write `mixer NAME { ... }`",
            );
            return None;
        }
    };
    i += 1;

    let body = match toks.get(i) {
        Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => g.stream(),
        Some(other) => {
            diags.error(
                head_span(other),
                format!(
                    "expected `{{` after the mixer name, found {}",
                    describe(other)
                ),
            );
            return None;
        }
        None => {
            diags.error_hint(
                name.span(),
                "expected `{` after the mixer name",
                format!("write `mixer {name} {{ ... }}`"),
            );
            return None;
        }
    };
    i += 1;

    if let Some(extra) = toks.get(i) {
        if is_ident(extra, "mixer") {
            diags.error_hint(
                extra.span(),
                "only one `mixer` is allowed per spec",
                "put each mixer in its own file",
            );
        } else {
            diags.error(
                head_span(extra),
                format!(
                    "unexpected {} after the mixer's closing `}}`",
                    describe(extra)
                ),
            );
        }
    }

    let (items, broken) = parse_body(body, BodyKind::Mixer, diags);
    Some(RawSpec {
        name,
        items,
        broken,
    })
}

/// Whose `{ ... }` body is being split: a mixer's holds `KEY = EXPR;` and
/// `input` items, a block's only `KEY = EXPR;` items.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Mixer,
    Block,
}

impl BodyKind {
    fn items_hint(self) -> &'static str {
        match self {
            BodyKind::Mixer => "items are `KEY = VALUE;` or `input NAME: f32[dims];`",
            BodyKind::Block => "items are `KEY = VALUE;`",
        }
    }
}

/// Splits an item body at top-level `;` and parses each piece, so a syntax
/// error in one item does not hide errors in the others. Returns the items
/// that parsed and the keys (and input names) of those that did not.
pub(crate) fn parse_body(
    body: TokenStream,
    kind: BodyKind,
    diags: &mut Diagnostics,
) -> (Vec<Item>, Vec<String>) {
    let mut items = Vec::new();
    let mut broken = Vec::new();
    let mut chunk: Vec<TokenTree> = Vec::new();
    for tt in body {
        if is_punct(&tt, ';') {
            let semi = tt.span();
            parse_items(
                std::mem::take(&mut chunk),
                Some(semi),
                kind,
                diags,
                &mut items,
                &mut broken,
            );
        } else {
            chunk.push(tt);
        }
    }
    if !chunk.is_empty() {
        parse_items(chunk, None, kind, diags, &mut items, &mut broken);
    }
    (items, broken)
}

/// Most tokens one item may have. Parsing and checking recurse on the
/// expression tree, so size is bounded before any recursion starts: no input
/// can overflow the stack. Real items are a few dozen tokens.
pub const MAX_ITEM_TOKENS: usize = 256;

/// Deepest bracket nesting inside one item.
pub const MAX_NESTING: usize = 32;

/// Counts tokens and nesting without recursing; reports an item over the limits.
fn within_limits(toks: &[TokenTree], diags: &mut Diagnostics) -> bool {
    let mut count = 0usize;
    let mut deepest: Option<Span> = None;
    let mut stack: Vec<(TokenStream, usize)> = Vec::new();
    let mut visit = |tt: &TokenTree, depth: usize, stack: &mut Vec<(TokenStream, usize)>| {
        count += 1;
        if let TokenTree::Group(g) = tt {
            if depth + 1 > MAX_NESTING {
                deepest.get_or_insert(g.span_open());
            } else {
                stack.push((g.stream(), depth + 1));
            }
        }
    };
    for tt in toks {
        visit(tt, 0, &mut stack);
    }
    while let Some((ts, depth)) = stack.pop() {
        for tt in ts {
            visit(&tt, depth, &mut stack);
        }
    }
    if let Some(span) = deepest {
        diags.error(
            span,
            format!("brackets nested too deeply (the limit is {MAX_NESTING} levels in one item)"),
        );
        return false;
    }
    if count > MAX_ITEM_TOKENS {
        diags.error_hint(
            head_span(&toks[0]),
            format!("item too long: {count} tokens (the limit is {MAX_ITEM_TOKENS})"),
            "split the expression, or simplify it",
        );
        return false;
    }
    true
}

/// Can `toks` start an item? Used to recover from a missing `;`.
fn starts_item(toks: &[TokenTree]) -> bool {
    match toks {
        [TokenTree::Ident(i), TokenTree::Ident(_), ..] => i == "input",
        [TokenTree::Ident(_), TokenTree::Punct(p), ..] => p.as_char() == '=',
        _ => false,
    }
}

/// Parses one `;`-terminated chunk, which may hold several items when a `;`
/// is missing (reported, then parsing resumes at the next item).
fn parse_items(
    toks: Vec<TokenTree>,
    semi: Option<Span>,
    kind: BodyKind,
    diags: &mut Diagnostics,
    items: &mut Vec<Item>,
    broken: &mut Vec<String>,
) {
    if toks.is_empty() {
        // A stray `;` is harmless.
        return;
    }
    if !within_limits(&toks, diags) {
        return;
    }
    let end_span =
        semi.unwrap_or_else(|| toks.last().map(head_span).unwrap_or_else(Span::call_site));
    let (item, rest) = parse_one(&toks, end_span, kind, diags);
    match item {
        Some(item) => items.push(item),
        None => match toks.as_slice() {
            [TokenTree::Ident(kw), TokenTree::Ident(name), ..] if kw == "input" => {
                broken.push(name.unraw().to_string())
            }
            [TokenTree::Ident(key), ..] => broken.push(key.unraw().to_string()),
            _ => {}
        },
    }
    if rest.is_empty() {
        if semi.is_none() {
            let last = toks
                .last()
                .map(|t| t.span())
                .unwrap_or_else(Span::call_site);
            diags.error_hint(
                last,
                "expected `;` after the last item",
                "every item ends with `;`",
            );
        }
        return;
    }
    let found = &rest[0];
    diags.error_hint(
        head_span(found),
        format!("expected `;`, found {}", describe(found)),
        "every item ends with `;`",
    );
    if starts_item(&rest) {
        parse_items(rest, semi, kind, diags, items, broken);
    }
}

/// Parses one item from the front of `toks`; returns it (or `None` after
/// reporting) and the tokens left over.
fn parse_one(
    toks: &[TokenTree],
    end_span: Span,
    kind: BodyKind,
    diags: &mut Diagnostics,
) -> (Option<Item>, Vec<TokenTree>) {
    let first = &toks[0];
    let TokenTree::Ident(head) = first else {
        diags.error_hint(
            head_span(first),
            format!("expected an item, found {}", describe(first)),
            kind.items_hint(),
        );
        return (None, Vec::new());
    };

    if head == "input" && matches!(toks.get(1), Some(TokenTree::Ident(_))) {
        if kind == BodyKind::Block {
            // The whole item up to its `;` is dropped: one error, whatever
            // the declaration looks like.
            diags.error_hint(
                head.span(),
                "a block declares no inputs",
                "its weights (norm gains, q/k/v/o projections, FFN) are named by the block itself; declare a mixer's extra inputs inside its `mixer` item",
            );
            return (None, Vec::new());
        }
        return parse_input(toks, end_span, diags);
    }

    match toks.get(1) {
        Some(TokenTree::Punct(p)) if p.as_char() == '=' => {
            // `==` arrives as a joint `=` followed by `=`.
            if p.spacing() == proc_macro2::Spacing::Joint
                && toks.get(2).is_some_and(|t| is_punct(t, '='))
            {
                diags.error(p.span(), format!("expected `=` after `{head}`, found `==`"));
                return (None, Vec::new());
            }
        }
        Some(other) => {
            diags.error_hint(
                head_span(other),
                format!("expected `=` after `{head}`, found {}", describe(other)),
                kind.items_hint(),
            );
            return (None, Vec::new());
        }
        None => {
            diags.error_hint(
                head.span(),
                format!("expected `=` after `{head}`"),
                kind.items_hint(),
            );
            return (None, Vec::new());
        }
    }
    let eq_span = toks[1].span();
    let value_toks: TokenStream = toks[2..].iter().cloned().collect();
    if value_toks.is_empty() {
        diags.error(eq_span, format!("expected a value after `{head} =`"));
        return (None, Vec::new());
    }
    let parser = |input: ParseStream| -> syn::Result<(syn::Expr, TokenStream)> {
        let e: syn::Expr = input.parse()?;
        let rest: TokenStream = input.parse()?;
        Ok((e, rest))
    };
    match parser.parse2(value_toks) {
        Ok((value, rest)) => (
            Some(Item::Key(KeyItem {
                key: head.unraw(),
                value,
            })),
            rest.into_iter().collect(),
        ),
        Err(e) => {
            push_syn_error(diags, e, end_span);
            (None, Vec::new())
        }
    }
}

/// Records a syn error. Errors at the end of the parsed tokens carry the
/// parser's call-site span; point them at the item's end instead.
pub(crate) fn push_syn_error(diags: &mut Diagnostics, err: syn::Error, end_span: Span) {
    for e in err {
        let msg = e.to_string();
        if msg.starts_with("unexpected end of input") {
            diags.error(end_span, msg);
        } else {
            diags.error(e.span(), msg);
        }
    }
}

fn parse_input(
    toks: &[TokenTree],
    end_span: Span,
    diags: &mut Diagnostics,
) -> (Option<Item>, Vec<TokenTree>) {
    const SHAPE: &str = "inputs are declared as `input NAME: f32[dim, ...];` with dims `batch`, `seq`, `heads`, `kv_heads` or an integer";
    let TokenTree::Ident(name) = &toks[1] else {
        unreachable!("parse_one checked toks[1] is an ident")
    };
    match toks.get(2) {
        Some(t) if is_punct(t, ':') => {}
        Some(other) => {
            diags.error_hint(
                head_span(other),
                format!(
                    "expected `:` after input name `{name}`, found {}",
                    describe(other)
                ),
                SHAPE,
            );
            return (None, Vec::new());
        }
        None => {
            diags.error_hint(
                name.span(),
                format!("expected `:` and a type after input `{name}`"),
                SHAPE,
            );
            return (None, Vec::new());
        }
    }
    let elem = match toks.get(3) {
        Some(TokenTree::Ident(e)) => e.clone(),
        Some(other) => {
            diags.error_hint(
                head_span(other),
                format!(
                    "expected an element type (`f32` or `i32`), found {}",
                    describe(other)
                ),
                SHAPE,
            );
            return (None, Vec::new());
        }
        None => {
            diags.error_hint(
                end_span,
                format!("expected an element type (`f32` or `i32`) for input `{name}`"),
                SHAPE,
            );
            return (None, Vec::new());
        }
    };
    let group = match toks.get(4) {
        Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Bracket => g.clone(),
        Some(other) => {
            diags.error_hint(
                head_span(other),
                format!(
                    "expected `[dims]` after `{elem}`, found {}",
                    describe(other)
                ),
                SHAPE,
            );
            return (None, Vec::new());
        }
        None => {
            diags.error_hint(end_span, format!("expected `[dims]` after `{elem}`"), SHAPE);
            return (None, Vec::new());
        }
    };

    let mut dims = Vec::new();
    let mut ok = true;
    let mut piece: Vec<TokenTree> = Vec::new();
    let mut pieces = Vec::new();
    for tt in group.stream() {
        if is_punct(&tt, ',') {
            pieces.push((std::mem::take(&mut piece), tt.span()));
        } else {
            piece.push(tt);
        }
    }
    let trailing_comma = piece.is_empty() && !pieces.is_empty();
    if !trailing_comma {
        pieces.push((piece, group.span_close()));
    }
    for (p, sep) in pieces {
        match p.as_slice() {
            [TokenTree::Ident(id)] => dims.push(RawDim::Named(id.clone())),
            [TokenTree::Literal(l)] => dims.push(RawDim::Fixed(l.clone())),
            [] => {
                ok = false;
                let msg = if group.stream().is_empty() {
                    format!("input `{name}` needs at least one dim")
                } else {
                    "expected a dim before `,`".to_string()
                };
                diags.error_hint(
                    if group.stream().is_empty() {
                        group.span()
                    } else {
                        sep
                    },
                    msg,
                    SHAPE,
                );
            }
            [first, ..] => {
                ok = false;
                diags.error_hint(
                    head_span(first),
                    format!("expected a dim, found {}", describe(first)),
                    SHAPE,
                );
            }
        }
    }
    let rest = toks[5..].to_vec();
    let item = ok.then(|| {
        Item::Input(InputItem {
            name: name.unraw(),
            elem,
            dims,
        })
    });
    (item, rest)
}
