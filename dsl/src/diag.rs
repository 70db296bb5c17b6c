//! Diagnostics: spanned errors with hints, rendered rustc-style for files and
//! as `compile_error!` invocations for the `mixer!{}` macro.

use proc_macro2::{Span, TokenStream};
use std::fmt::Write as _;
use std::path::PathBuf;

/// A 1-based line and 1-based column (counted in chars).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// An error makes a spec invalid; a warning points at a likely mistake in
/// a valid one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One error (or warning) in a spec.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub span: Span,
    pub message: String,
    pub hint: Option<String>,
    pub severity: Severity,
    // Resolved when the diagnostic is made: proc-macro2's fallback source map
    // can be cleared (`invalidate_current_thread_spans`) before rendering.
    start: Position,
    end: Position,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>) -> Self {
        let (start, end) = resolve(span);
        Diagnostic {
            span,
            message: message.into(),
            hint: None,
            severity: Severity::Error,
            start,
            end,
        }
    }

    /// A warning: the spec stays valid.
    pub fn warning(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::new(span, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Where the offending tokens start (1-based line and column).
    pub fn start(&self) -> Position {
        self.start
    }

    /// Where the offending tokens end (exclusive column).
    pub fn end(&self) -> Position {
        self.end
    }
}

fn resolve(span: Span) -> (Position, Position) {
    let (s, e) = (span.start(), span.end());
    // proc-macro2 columns are 0-based; lines are already 1-based. Under
    // `cfg(fuzzing)` or without location info lines can be 0: clamp.
    let start = Position {
        line: s.line.max(1),
        column: s.column + 1,
    };
    let mut end = Position {
        line: e.line.max(1),
        column: e.column + 1,
    };
    if end < start {
        end = start;
    }
    (start, end)
}

/// All errors found in one spec, in source order, and apart from them the
/// warnings (which `len`, `is_empty`, `render` and iteration do not count).
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }

    /// Shorthand for an error without a hint.
    pub fn error(&mut self, span: Span, message: impl Into<String>) {
        self.push(Diagnostic::new(span, message));
    }

    /// Shorthand for an error with a hint.
    pub fn error_hint(&mut self, span: Span, message: impl Into<String>, hint: impl Into<String>) {
        self.push(Diagnostic::new(span, message).with_hint(hint));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.items.iter()
    }

    /// Stable order for output: by position, then by insertion.
    pub(crate) fn sort(&mut self) {
        self.items.sort_by_key(|d| d.start);
    }

    /// Renders every diagnostic rustc-style against `source` (the text that
    /// was parsed), e.g.
    ///
    /// ```text
    /// examples/bad.mix:4:12: error: unknown mask `causl`
    ///   |
    /// 4 |     mask = causl && window(4096);
    ///   |            ^^^^^
    ///   = hint: did you mean `causal`?
    /// ```
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let lines: Vec<&str> = source.split('\n').collect();
        let mut out = String::new();
        for (n, d) in self.items.iter().take(MAX_RENDERED).enumerate() {
            if n > 0 {
                out.push('\n');
            }
            render_one(&mut out, d, file_name, &lines);
        }
        if self.items.len() > MAX_RENDERED {
            out.push_str(&format!(
                "\n... and {} more diagnostics (the first {MAX_RENDERED} are shown)\n",
                self.items.len() - MAX_RENDERED
            ));
        }
        out
    }

    /// One `compile_error!` per diagnostic, each at its span, for the macro.
    pub fn to_compile_error(&self) -> TokenStream {
        let mut ts = TokenStream::new();
        for d in &self.items {
            let msg = match &d.hint {
                Some(h) => format!("{}\n  = hint: {}", d.message, h),
                None => d.message.clone(),
            };
            ts.extend(syn::Error::new(d.span, msg).to_compile_error());
        }
        ts
    }
}

impl std::fmt::Display for Diagnostics {
    /// Messages only, one per line (use `render` for source excerpts).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.items.len() > MAX_RENDERED {
            writeln!(
                f,
                "({} diagnostics; the first {MAX_RENDERED} follow)",
                self.items.len()
            )?;
        }
        for d in self.items.iter().take(MAX_RENDERED) {
            writeln!(
                f,
                "{}:{}: {}: {}",
                d.start.line,
                d.start.column,
                d.severity.name(),
                d.message
            )?;
            if let Some(h) = &d.hint {
                writeln!(f, "  = hint: {h}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// Diagnostics [`Diagnostics::render`] prints in full; the rest are
/// counted ("and N more"), so a file of a million bad lines prints a page,
/// not hundreds of megabytes.
pub const MAX_RENDERED: usize = 50;

/// Characters of a source line shown in an excerpt; longer lines are cut
/// to a window starting this many characters before the span.
const MAX_EXCERPT_CHARS: usize = 160;
const EXCERPT_CONTEXT_CHARS: usize = 40;

fn render_one(out: &mut String, d: &Diagnostic, file_name: &str, lines: &[&str]) {
    // Positions come from the tokenizer of this same source, but be defensive:
    // a span from elsewhere (e.g. call_site) must still render, never panic.
    let line_no = d.start.line.min(lines.len().max(1));
    let text = lines
        .get(line_no - 1)
        .copied()
        .unwrap_or("")
        .trim_end_matches('\r');
    let all: Vec<char> = text.chars().collect();
    let col0 = (d.start.column - 1).min(all.len());
    let end0 = if d.end.line == d.start.line {
        (d.end.column - 1).min(all.len())
    } else {
        all.len()
    };
    // A long line (a megabyte-long name) is shown as a window around the
    // span's start, marked with `...` where it is cut.
    let from = if all.len() > MAX_EXCERPT_CHARS {
        col0.saturating_sub(EXCERPT_CONTEXT_CHARS)
    } else {
        0
    };
    let to = all.len().min(from + MAX_EXCERPT_CHARS);
    let mut chars: Vec<char> = Vec::new();
    if from > 0 {
        chars.extend("...".chars());
    }
    let shift = chars.len();
    chars.extend(&all[from..to]);
    let text: String = if to < all.len() {
        chars
            .iter()
            .chain("...".chars().collect::<Vec<_>>().iter())
            .collect()
    } else {
        chars.iter().collect()
    };
    let (col0, end0) = (
        col0 - from + shift,
        end0.min(to).saturating_sub(from) + shift,
    );
    let width = end0.saturating_sub(col0).max(1);
    let gutter = line_no.to_string().len();
    let pad = " ".repeat(gutter);
    // Keep tabs so the carets line up with the excerpt.
    let lead: String = chars[..col0]
        .iter()
        .map(|&c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    let _ = writeln!(
        out,
        "{file_name}:{}:{}: {}: {}",
        d.start.line,
        d.start.column,
        d.severity.name(),
        d.message
    );
    let _ = writeln!(out, "{pad} |");
    let _ = writeln!(out, "{line_no} | {text}");
    let _ = writeln!(out, "{pad} | {lead}{}", "^".repeat(width));
    if let Some(h) = &d.hint {
        let _ = writeln!(out, "{pad} = hint: {h}");
    }
}

/// Why `parse_file` failed.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read spec `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{rendered}\nerror: spec is invalid ({count} error{})", if *count == 1 { "" } else { "s" })]
    Invalid { rendered: String, count: usize },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// Diagnostics for the tokens of `src` whose text is `word`.
    fn at(src: &str, word: &str) -> Diagnostics {
        let ts = TokenStream::from_str(src).unwrap();
        let tok = ts.into_iter().find(|t| t.to_string() == word).unwrap();
        let mut d = Diagnostics::new();
        d.error_hint(tok.span(), format!("bad `{word}`"), "fix it");
        d
    }

    #[test]
    fn carets_follow_tabs_and_width() {
        let src = "a\n\tbb ccc\n";
        let out = at(src, "ccc").render("t.mix", src);
        assert_eq!(
            out,
            "t.mix:2:5: error: bad `ccc`\n  |\n2 | \tbb ccc\n  | \t   ^^^\n  = hint: fix it\n"
        );
    }

    #[test]
    fn gutter_widens_with_line_numbers() {
        let src = format!("{}x", "\n".repeat(11));
        let out = at(&src, "x").render("t.mix", &src);
        assert!(
            out.starts_with("t.mix:12:1: error: bad `x`\n   |\n12 | x\n   | ^\n"),
            "{out}"
        );
    }

    #[test]
    fn rendering_survives_a_mismatched_source() {
        // Positions from one text rendered against another must not panic.
        let d = at("\n\n\n   zzzz", "zzzz");
        let out = d.render("t.mix", "");
        assert!(out.starts_with("t.mix:4:4: error"), "{out}");
        assert!(d.render("t.mix", "ab").contains("^"));
    }

    #[test]
    fn positions_outlive_the_source_map() {
        let d = at("mixer m {}", "m");
        proc_macro2::extra::invalidate_current_thread_spans();
        // Resolved eagerly, so nothing touches the cleared map.
        assert_eq!(
            d.iter().next().unwrap().start(),
            Position { line: 1, column: 7 }
        );
        assert!(d.render("t.mix", "mixer m {}").contains("1 | mixer m {}"));
    }

    #[test]
    fn several_diagnostics_are_separated_by_a_blank_line() {
        let src = "a b";
        let mut d = at(src, "a");
        d.items.extend(at(src, "b").items);
        let out = d.render("t.mix", src);
        assert_eq!(out.matches("error:").count(), 2);
        assert!(out.contains("\n\nt.mix:1:3: error: bad `b`"), "{out}");
        assert_eq!(d.to_string().lines().count(), 4);
    }
}
