//! Escapes for every place this program prints to: plain text on stdout and stderr, JSON,
//! log lines, workflow commands and the job summary's Markdown.
//!
//! The GitHub Actions runner reads a job's stdout and stderr line by line and takes a line that
//! starts with `::` (after leading whitespace) as a workflow command, and `##[` anywhere in a
//! line as its older command form. It ends a line at CR, LF, CRLF, NEL (U+0085), LINE SEPARATOR
//! (U+2028) and PARAGRAPH SEPARATOR (U+2029) ([`RUNNER_LINE_BREAKS`]). Text from the spec, from
//! AWS or from a record is untrusted: no escape here lets it add a line of its own, start a
//! command, or (in the job summary) become a link, HTML, or text that reads differently from
//! what it holds.

/// The characters at which the Actions runner ends a line (CRLF is CR then LF).
pub const RUNNER_LINE_BREAKS: [char; 5] = ['\r', '\n', '\u{85}', '\u{2028}', '\u{2029}'];

/// `text` split into lines as the Actions runner splits a job's output: at CR, LF, CRLF, U+0085,
/// U+2028 and U+2029. Used by the tests to check that no line could be read as a command.
pub fn runner_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if RUNNER_LINE_BREAKS.contains(&c) {
            lines.push(&text[start..at]);
            let mut end = at + c.len_utf8();
            if c == '\r' && chars.peek().map(|&(_, next)| next) == Some('\n') {
                chars.next();
                end += 1;
            }
            start = end;
        }
    }
    lines.push(&text[start..]);
    lines
}

/// Whether the runner would take `line` (one of [`runner_lines`]) for a workflow command.
pub fn is_workflow_command(line: &str) -> bool {
    line.trim_start().starts_with("::") || line.contains("##[")
}

/// Characters that are not controls but that make a text read differently from what it holds:
/// the bidirectional overrides, embeddings and isolates (which reorder what follows them), and
/// the zero-width characters (which hide a difference between two equal-looking values).
fn is_deceptive(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
    )
}

/// `c` is a control character (C0, DEL, C1) or a line or paragraph separator.
fn is_control_or_break(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Text from the spec or from AWS made safe for a plain-text line on stdout or stderr: every
/// control character (the line breaks the runner knows among them) and every bidirectional or
/// zero-width character is written as a Rust escape (`\n`, `\u{1b}`, `\u{202e}`), so the text
/// adds no line of its own, and [`neutralize_commands`] applies.
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_control_or_break(c) || is_deceptive(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    neutralize_commands(&out)
}

/// Makes sure no line of `text` is read as a workflow command. `text` is composed by this
/// program (or by clap), its values already through [`plain`]: its own line breaks are LF. Any
/// other line break the runner knows (CR, U+0085, U+2028, U+2029) and any other control
/// character but tab is written as an escape; a line that starts with `::` (after leading
/// whitespace, which the runner skips) gets a backslash in front; and the runner's older
/// `##[command]` form, which it finds anywhere in a line, is broken up as `##\[`.
pub fn neutralize_commands(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && c != '\t' && is_control_or_break(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    command_lines_broken(&escaped)
}

/// `text` (whose only line breaks are LF) with a backslash before each line that starts with
/// `::` after leading whitespace, and `##[` broken up as `##\[`.
fn command_lines_broken(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let body = line.trim_start();
        if body.starts_with("::") {
            out.push_str(&line[..line.len() - body.len()]);
            out.push('\\');
            out.push_str(body);
        } else {
            out.push_str(line);
        }
    }
    out.replace("##[", "##\\[")
}

/// Serialized JSON made safe to print: serde_json escapes C0 controls but writes DEL, the C1
/// controls (NEL, U+0085, among them), U+2028 and U+2029 as they are, and the runner ends a line
/// at three of them. Each is written as a `\uXXXX` escape, and `##[` as `##\u005b`. These
/// characters can only occur inside JSON strings, so the document keeps its exact value.
pub fn json(serialized: &str) -> String {
    let mut out = String::with_capacity(serialized.len());
    for c in serialized.chars() {
        if matches!(c, '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}') || is_deceptive(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.replace("##[", "##\\u005b")
}

/// One log event (a whole line from tracing's formatter, which may quote AWS error text or
/// record values as they are) made safe: every control character and line break is escaped, so
/// the event is exactly one line, and [`neutralize_commands`] applies. With `ansi`, the
/// formatter's own colour codes (SGR sequences `ESC [ digits ; m`) are kept; every other escape
/// sequence (cursor moves, titles, hyperlinks) is written out as text.
pub fn log_line(event: &str, ansi: bool) -> String {
    let mut out = String::with_capacity(event.len());
    let mut rest = event;
    while let Some(c) = rest.chars().next() {
        if ansi && c == '\u{1b}' {
            if let Some(length) = sgr_length(rest) {
                out.push_str(&rest[..length]);
                rest = &rest[length..];
                continue;
            }
        }
        if is_control_or_break(c) || is_deceptive(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    command_lines_broken(&out)
}

/// The length of the SGR sequence (`ESC [` digits and `;` then `m`) that `text` starts with.
fn sgr_length(text: &str) -> Option<usize> {
    let body = text.strip_prefix("\u{1b}[")?;
    let digits = body.bytes().take_while(|b| b.is_ascii_digit() || *b == b';').count();
    (body.as_bytes().get(digits) == Some(&b'm')).then_some(2 + digits + 1)
}

/// Escapes the data of a workflow command (the part after `::`), by the toolkit's rules
/// (`@actions/core` `escapeData`): `%`, CR and LF are percent-encoded, so the message stays on
/// its own line and cannot start another command. The other line breaks the runner knows
/// (U+0085, U+2028, U+2029), the other control characters and the bidirectional and
/// zero-width characters are written as Rust escapes (`\u{2028}`): the runner would not decode
/// a percent-encoding of them.
pub fn escape_annotation(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '%' => out.push_str("%25"),
            '\r' => out.push_str("%0D"),
            '\n' => out.push_str("%0A"),
            c if is_control_or_break(c) || is_deceptive(c) => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a workflow-command property value (`title=…`), by the toolkit's rules
/// (`escapeProperty`): as [`escape_annotation`], and also `:` and `,`, which end a property.
pub fn escape_property(value: &str) -> String {
    escape_annotation(value).replace(':', "%3A").replace(',', "%2C")
}

/// One workflow command line: `::name key=value,…::data`, every part escaped.
pub fn workflow_command(name: &str, properties: &[(&str, &str)], data: &str) -> String {
    let properties: Vec<String> =
        properties.iter().map(|(key, value)| format!("{key}={}", escape_property(value))).collect();
    let separator = if properties.is_empty() { "" } else { " " };
    // The runner's older `##[command]` form is found anywhere in a line: break it up too.
    let data = escape_annotation(data).replace("##[", "##\\[");
    format!("::{name}{separator}{}::{data}", properties.join(","))
}

/// Text made safe for a Markdown table cell or heading of the job summary. `|`, `<`, `>`, `&`,
/// backticks, `*`, `_`, `~`, `$`, `[`, `]` and backslashes are escaped and line breaks become
/// spaces, so a value can neither end its cell or row nor inject HTML, code, emphasis or math.
/// Other control characters and the bidirectional and zero-width characters are written as Rust
/// escapes (`\u{202e}`, shown as such). What GitHub would turn into a link by itself (`://`,
/// `www.`, `@`) is defanged (`[:]//`, `www[.]`, `[@]`): untrusted text never becomes a link.
pub fn markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("://") {
            out.push_str("\\[:\\]//");
            rest = &rest[3..];
            continue;
        }
        if rest.get(..4).is_some_and(|head| head.eq_ignore_ascii_case("www.")) {
            out.push_str(&rest[..3]);
            out.push_str("\\[.\\]");
            rest = &rest[4..];
            continue;
        }
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' => out.push_str("&#96;"),
            '@' => out.push_str("\\[@\\]"),
            '\\' | '*' | '_' | '[' | ']' | '~' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => out.push(' '),
            c if c.is_control() || is_deceptive(c) => out.extend(c.escape_default()),
            c => out.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A value as a Markdown code span when it is plainly safe there (ids: letters, digits, `.`,
/// `_`, `-`; nothing in a code span becomes a link), otherwise as [`markdown`] text: backslash
/// escapes do not work inside code spans.
pub fn markdown_code(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        format!("`{text}`")
    } else {
        markdown(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "x\n::warning title=pwn::INJECTED\r\n::set-output name=a::b";

    /// Every line break the runner knows, each followed by a forged command.
    const BREAKS: [&str; 6] = ["\n", "\r", "\r\n", "\u{85}", "\u{2028}", "\u{2029}"];

    fn forged(text: &str) -> Vec<&str> {
        runner_lines(text).into_iter().filter(|line| is_workflow_command(line)).collect()
    }

    #[test]
    fn the_runner_splits_at_every_line_break() {
        assert_eq!(runner_lines("a\r\nb\rc\nd\u{85}e\u{2028}f\u{2029}g"), ["a", "b", "c", "d", "e", "f", "g"]);
        assert_eq!(runner_lines("a\n\nb"), ["a", "", "b"]);
    }

    #[test]
    fn workflow_commands_escape_data_and_properties_by_the_toolkits_rules() {
        assert_eq!(
            workflow_command("error", &[("title", "a:b,c%\n")], "50% of x\r\ny"),
            "::error title=a%3Ab%2Cc%25%0A::50%25 of x%0D%0Ay"
        );
        assert_eq!(escape_annotation("50% done\nnext"), "50%25 done%0Anext");
        let line = workflow_command("warning", &[("title", "post-provision")], HOSTILE);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.starts_with("::warning title=post-provision::x%0A::warning"), "{line}");
        assert!(!workflow_command("error", &[], "a ##[warning]b").contains("##["));
        for brk in BREAKS {
            let line =
                workflow_command("error", &[("title", &format!("t{brk}::error::p"))], &format!("d{brk}::error::x"));
            assert_eq!(runner_lines(&line).len(), 1, "{line:?}");
        }
    }

    #[test]
    fn plain_text_never_starts_a_line_with_a_command() {
        for brk in BREAKS {
            let text = plain(&format!("x{brk}::error title=FORGED::y{brk}  ##[error]z"));
            assert_eq!(runner_lines(&text).len(), 1, "{text:?}");
            assert!(forged(&text).is_empty(), "{text:?}");
        }
        assert_eq!(plain("a\u{1b}[31mb\u{7}"), "a\\u{1b}[31mb\\u{7}");
        assert_eq!(plain("a\u{202e}b"), "a\\u{202e}b");
    }

    #[test]
    fn composed_text_keeps_its_own_lines_and_breaks_every_other() {
        for brk in BREAKS {
            let clap =
                format!("error: invalid value 'x{brk}::error title=FORGED::y' for '--max-attempts'\n\n  ::tip\n");
            let text = neutralize_commands(&clap);
            assert!(forged(&text).is_empty(), "{text:?}");
            let own_lines = if brk.contains('\n') { 4 } else { 3 };
            assert_eq!(text.lines().count(), own_lines, "{text:?}");
        }
        assert_eq!(neutralize_commands("a\n\t::b\n"), "a\n\t\\::b\n");
    }

    #[test]
    fn json_escapes_what_serde_json_leaves_and_keeps_the_value() {
        let value = serde_json::json!({"m": "a\u{85}::error::b\u{2028}c\u{2029}##[warning]d\u{7f}\u{9b}e\u{202e}"});
        let text = json(&serde_json::to_string_pretty(&value).unwrap());
        assert!(forged(&text).is_empty(), "{text}");
        assert!(!text.contains(['\u{85}', '\u{2028}', '\u{2029}', '\u{7f}', '\u{9b}', '\u{202e}']), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), value);
    }

    #[test]
    fn log_lines_are_one_line_and_escape_controls_but_keep_colours() {
        let event = "\u{1b}[33mWARN\u{1b}[0m AWS said x\r::error::y\u{7}\u{1b}]8;;http://e\u{7}\u{85}z";
        let colour = log_line(event, true);
        assert!(colour.starts_with("\u{1b}[33mWARN\u{1b}[0m"), "{colour:?}");
        assert!(colour.contains("\\u{1b}]8;;http://e\\u{7}"), "{colour:?}");
        let plain_log = log_line(event, false);
        assert!(!plain_log.contains('\u{1b}') && !plain_log.contains('\u{7}'), "{plain_log:?}");
        for line in [colour, plain_log] {
            assert_eq!(runner_lines(&line).len(), 1, "{line:?}");
        }
    }

    #[test]
    fn markdown_cells_cannot_break_out_or_link() {
        let cell = markdown("a|b<script>`c`\n| x | y |\n[l](http://e)\u{2028}d");
        assert!(!cell.contains('\n') && !cell.contains('<') && !cell.contains('`'), "{cell}");
        assert!(!cell.contains('\u{2028}'), "{cell}");
        assert!(!cell.replace("\\|", "").contains('|'), "{cell}");
        assert_eq!(markdown_code("9876543210"), "`9876543210`");
        assert_eq!(markdown_code("a`b"), "a&#96;b");
        let links = markdown("see https://evil.example/x or WWW.evil.example or a@b.example");
        assert!(!links.contains("://") && !links.to_lowercase().contains("www."), "{links}");
        assert!(links.contains("a\\[@\\]b"), "{links}");
        assert_eq!(markdown("a\u{202e}b\u{200b}c"), "a\\u{202e}b\\u{200b}c");
    }
}
