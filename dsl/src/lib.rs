//! The mixc spec language.
//!
//! A `.mix` file (or the body of `mixer!{}`) is tokenized with proc-macro2,
//! split into items (`syntax`), and validated into the typed IR (`check`).
//! Errors come back as [`Diagnostics`]: every one has a span, most a hint,
//! and independent mistakes are reported together.
//!
//! ```
//! let spec = mixc_dsl::parse_str("mixer m { heads = 8; head_dim = 64; mask = causal; }").unwrap();
//! assert_eq!(spec.family, mixc_dsl::Family::Softmax);
//! assert_eq!(spec.kv_heads, 8);
//! ```
//!
//! A file with a `block NAME { ... }` item describes a pre-norm transformer
//! block around one of its mixers ([`BlockSpec`], checked by `check_block`):
//!
//! ```
//! let src = "mixer attn { heads = 8; head_dim = 64; mask = causal; }
//!            block b { width = 512; norm = rmsnorm; ffn = swiglu(1408); rope = 10000; }";
//! let block = mixc_dsl::parse_block_str(src).unwrap();
//! assert_eq!(block.mixer.name, "attn");
//! assert!(matches!(mixc_dsl::parse_any_str(src), Ok(mixc_dsl::SpecFile::Block(_))));
//! ```
pub mod block;
pub mod bounds;
pub mod grad;
pub mod ir;
pub use block::{BlockNorm, BlockSpec, Ffn, FfnKind, NormKind, Rope};
pub use grad::Leaf;
pub use ir::*;

mod check;
mod check_block;
mod diag;
mod syntax;

pub use check::{KEYS, MAX_EXTENT, MAX_HEADS, MAX_HEAD_DIM, MAX_IDENT_CHARS};
pub use check_block::{BLOCK_KEYS, DEFAULT_NORM_EPS, MAX_FFN_HIDDEN, MAX_WIDTH};
pub use diag::{Diagnostic, Diagnostics, Position, Severity, SpecError};
pub use syntax::{MAX_ITEM_TOKENS, MAX_NESTING};

use proc_macro2::{TokenStream, TokenTree};
use std::path::Path;
use std::str::FromStr;

/// What a spec file defines: a single mixer, or a transformer block (with
/// the mixer it wraps).
#[derive(Debug, Clone, PartialEq)]
pub enum SpecFile {
    Mixer(MixerSpec),
    Block(BlockSpec),
}

impl SpecFile {
    /// The mixer's or the block's name.
    pub fn name(&self) -> &str {
        match self {
            SpecFile::Mixer(m) => &m.name,
            SpecFile::Block(b) => &b.name,
        }
    }

    /// The mixer itself, or the one the block wraps.
    pub fn mixer(&self) -> &MixerSpec {
        match self {
            SpecFile::Mixer(m) => m,
            SpecFile::Block(b) => &b.mixer,
        }
    }
}

/// Parses and validates spec source text holding one `mixer` item.
///
/// A file with a `block` item is refused with one diagnostic at `block`
/// (read it with [`parse_block_str`] or [`parse_any_str`]).
pub fn parse_str(src: &str) -> Result<MixerSpec, Diagnostics> {
    parse_tokens(tokenize(src)?)
}

/// Parses and validates an already tokenized spec (the `mixer!{}` input).
pub fn parse_tokens(ts: TokenStream) -> Result<MixerSpec, Diagnostics> {
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let mut diags = Diagnostics::new();
    if let Some(kw) = syntax::find_block_keyword(&toks) {
        diags.push(check_block::not_a_mixer(kw));
        return Err(diags);
    }
    let spec = syntax::parse_spec(toks.into_iter().collect(), &mut diags)
        .and_then(|raw| check::check(raw, &mut diags));
    finish(spec, diags)
}

/// Parses and validates a block file: any number of `mixer` items and
/// exactly one `block NAME { ... }` item, in any order.
pub fn parse_block_str(src: &str) -> Result<BlockSpec, Diagnostics> {
    parse_block_tokens(tokenize(src)?)
}

/// [`parse_block_str`] on already tokenized source.
pub fn parse_block_tokens(ts: TokenStream) -> Result<BlockSpec, Diagnostics> {
    let mut diags = Diagnostics::new();
    let spec = check_block::parse_block(ts, &mut diags);
    finish(spec, diags)
}

/// Parses either kind of spec file: one with a top-level `block` item is a
/// block file ([`parse_block_str`]), any other a mixer file ([`parse_str`]).
pub fn parse_any_str(src: &str) -> Result<SpecFile, Diagnostics> {
    let ts = tokenize(src)?;
    let toks: Vec<TokenTree> = ts.clone().into_iter().collect();
    if syntax::find_block_keyword(&toks).is_some() {
        parse_block_tokens(ts).map(SpecFile::Block)
    } else {
        parse_tokens(ts).map(SpecFile::Mixer)
    }
}

/// The warnings of a valid mixer or block spec (likely mistakes that do not
/// make it invalid, e.g. a `batch` dim of a table indexed without `b`),
/// as a [`Diagnostics`] whose items are warnings; empty when there are none
/// or when the spec has errors (which [`parse_any_str`] reports).
pub fn warnings_str(src: &str) -> Diagnostics {
    let Ok(ts) = tokenize(src) else {
        return Diagnostics::new();
    };
    let toks: Vec<TokenTree> = ts.clone().into_iter().collect();
    let mut diags = Diagnostics::new();
    if syntax::find_block_keyword(&toks).is_some() {
        let _ = check_block::parse_block(ts, &mut diags);
    } else if let Some(raw) = syntax::parse_spec(ts, &mut diags) {
        let _ = check::check(raw, &mut diags);
    }
    let mut out = Diagnostics::new();
    if diags.is_empty() {
        out.items = diags.warnings;
        out.sort();
    }
    out
}

/// [`warnings_str`] of a file, rendered against its text under its path;
/// `None` when there are no warnings.
pub fn warnings_file(path: &Path) -> Result<Option<String>, SpecError> {
    let src = read_source(path)?;
    let w = warnings_str(&src);
    Ok((!w.is_empty()).then(|| w.render(&path.display().to_string(), &src)))
}

/// Tokenizes source text; a tokenizer failure becomes one diagnostic.
fn tokenize(src: &str) -> Result<TokenStream, Diagnostics> {
    TokenStream::from_str(src).map_err(|e| {
        let mut d = Diagnostics::new();
        d.push(lex_diagnostic(src, &e));
        d
    })
}

/// The result of a front end run: the value only when nothing was reported.
fn finish<T>(value: Option<T>, mut diags: Diagnostics) -> Result<T, Diagnostics> {
    match value {
        Some(v) if diags.is_empty() => Ok(v),
        _ => {
            if diags.is_empty() {
                // Unreachable by construction (validation fails only by
                // recording an error); still never return Err with nothing in it.
                diags.error(
                    proc_macro2::Span::call_site(),
                    "internal error: spec rejected without a diagnostic",
                );
            }
            diags.sort();
            Err(diags)
        }
    }
}

/// The largest spec file read (1 MiB): a spec is a few hundred bytes, and
/// a path such as `/dev/zero` must not be read until memory runs out.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Reads and parses a mixer `.mix` file (at most [`MAX_SPEC_BYTES`]); on
/// failure the diagnostics are rendered against the file's text under its
/// path.
pub fn parse_file(path: &Path) -> Result<MixerSpec, SpecError> {
    parse_path(path, parse_str)
}

/// Reads and parses a block file, as [`parse_file`] does a mixer file.
pub fn parse_block_file(path: &Path) -> Result<BlockSpec, SpecError> {
    parse_path(path, parse_block_str)
}

/// Reads and parses a mixer or block file (see [`parse_any_str`]), as
/// [`parse_file`] does a mixer file.
pub fn parse_any_file(path: &Path) -> Result<SpecFile, SpecError> {
    parse_path(path, parse_any_str)
}

/// Reads `path` (size limit, UTF-8) and runs `parse` on its text, rendering
/// diagnostics against that text under the path.
fn parse_path<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, Diagnostics>,
) -> Result<T, SpecError> {
    let src = read_source(path)?;
    parse(&src).map_err(|d| SpecError::Invalid {
        rendered: d.render(&path.display().to_string(), &src),
        count: d.len(),
    })
}

/// A spec file's text: at most [`MAX_SPEC_BYTES`], UTF-8.
fn read_source(path: &Path) -> Result<String, SpecError> {
    use std::io::Read;
    let io = |source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(io(std::io::Error::other(format!(
            "larger than the {} KiB a spec file may have",
            MAX_SPEC_BYTES >> 10
        ))));
    }
    String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({e})"),
        ))
    })
}

/// Turns a tokenizer failure into a diagnostic. proc-macro2 only says
/// "cannot parse"; the character at the error position tells which problem
/// it was.
fn lex_diagnostic(src: &str, e: &proc_macro2::LexError) -> Diagnostic {
    let span = e.span();
    let lc = span.start();
    let rest: String = src
        .split('\n')
        .nth(lc.line.saturating_sub(1))
        .map(|l| l.chars().skip(lc.column).collect())
        .unwrap_or_default();
    let d = |msg: String| Diagnostic::new(span, msg);
    match rest.chars().next() {
        Some(c @ ('(' | '[' | '{')) => {
            let close = match c {
                '(' => ')',
                '[' => ']',
                _ => '}',
            };
            d(format!("unclosed delimiter `{c}`")).with_hint(format!("add the matching `{close}`"))
        }
        Some(c @ (')' | ']' | '}')) => d(format!("unexpected closing delimiter `{c}`"))
            .with_hint("it does not match the innermost open delimiter"),
        Some('/') if rest.starts_with("/*") => {
            d("unterminated block comment".into()).with_hint("close it with `*/`")
        }
        Some('"') => d("unterminated string literal".into()),
        Some(c) if c.is_alphanumeric() || c == '_' || c == '\'' => {
            d("malformed literal or identifier".into())
                .with_hint("numbers are written like `8`, `0.125` or `1e-6`")
        }
        Some(c) => d(format!("invalid character {c:?}")).with_hint(
            "specs use identifiers, numbers, `=`, `;`, `:`, `,`, operators and brackets",
        ),
        None => d("unexpected end of input while tokenizing".into()),
    }
}
