//! Text from peers made safe to show a person. A hostname, a process name or an error an agent sent
//! may hold control characters: printed raw, an ESC sequence clears or rewrites the screen, and a
//! newline starts a forged table row or log line. Where text is printed for humans (tapgraphctl's
//! tables, the text log, error messages), every such character is shown as an escape. The data
//! itself stays verbatim: JSON, the API and the store keep what the peer sent.

use std::borrow::Cow;
use std::fmt::{self, Write};

/// True for a character a terminal acts on or that changes how the text around it reads: C0
/// controls (newline, ESC, NUL…), DEL, C1 controls, the line and paragraph separators, and the
/// bidirectional marks, embeddings, overrides and isolates (which can make text read backwards).
pub fn is_unsafe(c: char) -> bool {
    matches!(
        c,
        '\0'..='\x1f'
            | '\x7f'..='\u{9f}'
            | '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// Writes `c` as an escape: `\n`, `\r`, `\t`, `\0`, `\x1b` below U+0080, `\u{85}` above.
fn write_escape(out: &mut impl Write, c: char) -> fmt::Result {
    match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        '\0' => out.write_str("\\0"),
        c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    }
}

/// Writes `s` to `out` with every [unsafe](is_unsafe) character escaped. A backslash is left as
/// it is, so text that was already quoted (a `Debug` string) is not escaped twice.
fn write_escaped(out: &mut impl Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(at) = rest.find(is_unsafe) {
        out.write_str(&rest[..at])?;
        // `find` returned the index of a char, so one follows.
        let Some(c) = rest[at..].chars().next() else {
            break;
        };
        write_escape(out, c)?;
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// `s` with every [unsafe](is_unsafe) character escaped; borrowed when there is none.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    // Writing to a String cannot fail.
    let _ = write_escaped(&mut out, s);
    Cow::Owned(out)
}

/// Displays a string [escaped](escape), without allocating: `println!("{}", Escaped(&name))`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.width().is_some() || f.precision().is_some() {
            // `{:<15}` and the like pad the escaped text.
            return f.pad(&escape(self.0));
        }
        write_escaped(f, self.0)
    }
}

/// A [`fmt::Write`] that escapes everything written through it: wraps a formatter's output, so
/// whatever `Display` or `Debug` produces reaches the terminal or log escaped.
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(&mut self.0, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_as_escapes() {
        assert_eq!(escape("web\x1b[2J\n\0-1"), "web\\x1b[2J\\n\\0-1");
        assert_eq!(escape("a\tb\rc\x07d\x7fe"), "a\\tb\\rc\\x07d\\x7fe");
        assert_eq!(escape("c1\u{9b}31m"), "c1\\u{9b}31m");
        assert_eq!(
            escape("evil\u{202e}txt.exe\u{2066}\u{2028}"),
            "evil\\u{202e}txt.exe\\u{2066}\\u{2028}"
        );
    }

    #[test]
    fn ordinary_text_is_kept_and_borrowed() {
        for s in [
            "web-1",
            "db.example.com",
            "",
            "Zürich ☃ 東京",
            "C:\\path \"q\"",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(_)), "{s}");
            assert_eq!(escape(s), s);
        }
    }

    #[test]
    fn nothing_unsafe_survives_escaping() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let escaped = escape(&all);
        assert!(!escaped.contains(is_unsafe));
        assert!(escaped.contains("\\x1b") && escaped.contains("\\u{85}"));
    }

    #[test]
    fn the_display_and_writer_forms_agree_with_escape() {
        let s = "a\nb\x1b[0m\u{202e}c";
        assert_eq!(Escaped(s).to_string(), escape(s));
        assert_eq!(format!("[{:<6}]", Escaped("a\n")), "[a\\n   ]");
        let mut out = String::new();
        let mut w = EscapingWriter(&mut out);
        let tail = "x\0";
        write!(w, "{s}|{tail}").unwrap();
        assert_eq!(out, format!("{}|x\\0", escape(s)));
    }
}
