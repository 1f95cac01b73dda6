//! The log writer on stderr.
//!
//! tracing's formatter writes each event with one `write_all` of its whole line, and a field
//! value (an AWS error message, a resource class, a record's value) may hold line breaks,
//! control characters or a forged workflow command. Each event is written as exactly one line:
//! in the text format every control character is escaped ([`escape::log_line`]), in the JSON
//! format what serde_json leaves as it is ([`escape::json`]); no line starts with `::` and `##[`
//! is broken up, so a log line can issue no workflow command.

use super::escape;

/// How the events reaching a [`OneLinePerEvent`] are formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLines {
    /// tracing's text format; `ansi` when it writes colour codes (a terminal).
    Text {
        /// The formatter writes SGR colour sequences, which are kept.
        ansi: bool,
    },
    /// tracing's JSON format: one JSON object per event.
    Json,
}

/// A writer that writes each event it receives as one safe line (see the module's docs).
pub struct OneLinePerEvent<W: std::io::Write> {
    inner: W,
    lines: LogLines,
}

impl<W: std::io::Write> OneLinePerEvent<W> {
    /// Wraps `inner`, for events in the `lines` format.
    pub fn new(inner: W, lines: LogLines) -> OneLinePerEvent<W> {
        OneLinePerEvent { inner, lines }
    }
}

impl<W: std::io::Write> std::io::Write for OneLinePerEvent<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let mut safe = match self.lines {
            LogLines::Text { ansi } => escape::log_line(body, ansi),
            // serde_json has escaped CR, LF and the other C0 controls; the rest is escaped here,
            // and the line is still one JSON document.
            LogLines::Json => escape::neutralize_commands(&escape::json(body)),
        };
        safe.push('\n');
        self.inner.write_all(safe.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every field of an event, in both formats, with every line break the runner knows.
    #[test]
    fn a_log_field_cannot_start_a_line_with_a_workflow_command() {
        for json in [false, true] {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let lines = if json { LogLines::Json } else { LogLines::Text { ansi: false } };
            let builder = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || OneLinePerEvent::new(writer.clone(), lines));
            let hostile = "x\n::warning title=pwn::INJECTED\r\n  ::error::y\r::error::cr\u{85}::error::nel\u{2028}::error::ls\u{2029}::error::ps ##[error]z \u{1b}]0;title\u{7} \u{9b}";
            let emit = || {
                tracing::warn!(error = hostile, class = %hostile, debug = ?hostile, "AWS said {hostile}");
                tracing::info!("second event");
            };
            if json {
                tracing::subscriber::with_default(builder.json().finish(), emit);
            } else {
                tracing::subscriber::with_default(builder.finish(), emit);
            }
            let text = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("utf-8");
            let lines = escape::runner_lines(text.trim_end_matches('\n'));
            assert_eq!(lines.len(), 2, "one line per event: {text:?}");
            for line in lines {
                assert!(!escape::is_workflow_command(line), "{line:?}");
                assert!(!line.contains(['\u{1b}', '\u{7}', '\u{9b}']), "{line:?}");
                if json {
                    serde_json::from_str::<serde_json::Value>(line).expect("each JSON line is one document");
                }
            }
            assert!(text.contains("INJECTED"), "the text is kept, escaped: {text}");
        }
    }
}
