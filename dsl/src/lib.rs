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
pub mod grad;
pub mod ir;
pub use grad::Leaf;
pub use ir::*;

mod check;
mod diag;
mod syntax;

pub use check::{KEYS, MAX_EXTENT, MAX_HEADS, MAX_HEAD_DIM, MAX_IDENT_CHARS};
pub use diag::{Diagnostic, Diagnostics, Position, SpecError};
pub use syntax::{MAX_ITEM_TOKENS, MAX_NESTING};

use proc_macro2::TokenStream;
use std::path::Path;
use std::str::FromStr;

/// Parses and validates spec source text.
pub fn parse_str(src: &str) -> Result<MixerSpec, Diagnostics> {
    match TokenStream::from_str(src) {
        Ok(ts) => parse_tokens(ts),
        Err(e) => {
            let mut d = Diagnostics::new();
            d.push(lex_diagnostic(src, &e));
            Err(d)
        }
    }
}

/// Parses and validates an already tokenized spec (the `mixer!{}` input).
pub fn parse_tokens(ts: TokenStream) -> Result<MixerSpec, Diagnostics> {
    let mut diags = Diagnostics::new();
    let spec = syntax::parse_spec(ts, &mut diags).and_then(|raw| check::check(raw, &mut diags));
    match spec {
        Some(spec) if diags.is_empty() => Ok(spec),
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

/// Reads and parses a `.mix` file (at most [`MAX_SPEC_BYTES`]); on failure
/// the diagnostics are rendered against the file's text under its path.
pub fn parse_file(path: &Path) -> Result<MixerSpec, SpecError> {
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
    let src = String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({e})"),
        ))
    })?;
    parse_str(&src).map_err(|d| SpecError::Invalid {
        rendered: d.render(&path.display().to_string(), &src),
        count: d.len(),
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
