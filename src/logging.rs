//! Structured logs through `tracing`: human text by default, one JSON object per line with `json`.
//! The text format escapes control characters in every field (see [`crate::text`]), so a hostname
//! an agent sent cannot forge a log line; JSON escapes them by itself.

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

use crate::text::EscapingWriter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("`{other}` is not a log format: use text or json")),
        }
    }
}

/// Checks a filter such as `info` or `info,tapgraph_agent=debug`.
pub fn parse_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}` is not a log filter: {e}"))
}

/// Installs the global subscriber, writing to stderr. Call once, after configuration is valid.
pub fn init(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // try_init: a second call (tests) keeps the first subscriber instead of panicking.
    let _ = match format {
        LogFormat::Text => builder.fmt_fields(EscapedFields).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// tracing-subscriber's default field format (`message key=value …`), with every control
/// character escaped. The default escapes ESC in the message only: a newline, or any control
/// character in a `%field`, reached the log raw.
struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut escaping = EscapingWriter(writer);
        // The inner writer has no ANSI styling, whose ESC bytes would be escaped too.
        DefaultFields::new().format_fields(Writer::new(&mut escaping), fields)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_logs_escape_control_characters_in_every_field() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .finish();
        let raw = "web\x1b[2J\nFAKE 2026 INFO forged\0";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", peer = %raw);
            let _entered = span.enter();
            tracing::info!(hostname = %raw, debug = ?raw, plain = raw, "hello from {raw}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            !text.trim_end().contains(crate::text::is_unsafe),
            "{text:?}"
        );
        assert!(text.contains("hostname=web\\x1b[2J\\nFAKE"), "{text}");
        assert!(text.contains("hello from web\\x1b[2J"), "{text}");
        assert!(text.contains("peer=web\\x1b"), "{text}");
    }
}
