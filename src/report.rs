//! What happened to each instance, and the GitHub Actions integration (step outputs, job summary,
//! annotations) built from it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use serde::Serialize;

use crate::driver::{OutcomeKind, RunOutcome, TraceEvent};
use crate::machine::State;
use crate::spec::Role;

/// One instance's fate in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceResult {
    /// The EC2 instance id.
    pub id: String,
    /// Selected or created.
    pub role: Role,
    /// The resource class.
    pub resource_class: String,
    /// What happened to it, in a few words.
    pub result: String,
}

/// What happened to each instance of a finished run, from its record and this driver's trace.
/// A run that finished in an earlier process has no trace here; the record-level facts are used.
pub fn instance_results(outcome: &RunOutcome) -> Vec<InstanceResult> {
    let mut terminated = BTreeSet::new();
    let mut found: BTreeMap<&str, &str> = BTreeMap::new();
    for event in &outcome.trace {
        match event {
            TraceEvent::Terminate { ids } => terminated.extend(ids.iter().map(String::as_str)),
            TraceEvent::Found { id, finding } => {
                found.insert(id, finding);
            }
            _ => {}
        }
    }
    // EC2 refused some terminations: those instances live on, their records kept (marked).
    for (id, finding) in &found {
        if finding.starts_with("termination refused") {
            terminated.remove(id);
        }
    }
    let sent: BTreeSet<&str> = outcome.record.messages_sent.iter().map(String::as_str).collect();
    let traced = !outcome.trace.is_empty();
    let idle_until = outcome.record.idle_threshold.map(|t| t.to_string()).unwrap_or_default();
    outcome
        .spec
        .instances()
        .map(|(role, instance)| {
            let id = instance.id.as_str();
            let finding = found.get(id).copied();
            let result = match outcome.kind {
                OutcomeKind::Committed => format!(
                    "committed: running until {}",
                    outcome.record.commit_threshold.map(|t| t.to_string()).unwrap_or_default()
                ),
                OutcomeKind::RolledBack if sent.contains(id) => {
                    format!("returned to pool {} (idle until {idle_until})", instance.resource_class)
                }
                OutcomeKind::CleanedUp if terminated.contains(id) => "terminated, record deleted".to_string(),
                OutcomeKind::RolledBack if terminated.contains(id) => {
                    format!("terminated, record removed ({})", finding.unwrap_or("not returnable"))
                }
                OutcomeKind::CleanedUp if sent.contains(id) => {
                    format!("left in pool {} (released before the error)", instance.resource_class)
                }
                _ if finding.is_some() => format!("left alone ({})", finding.unwrap_or_default()),
                OutcomeKind::RolledBack if !traced => "released by an earlier driver".to_string(),
                OutcomeKind::CleanedUp if !traced => "terminated unless another run owned it".to_string(),
                _ => "unchanged".to_string(),
            };
            InstanceResult { id: id.to_string(), role, resource_class: instance.resource_class.clone(), result }
        })
        .collect()
}

/// The instance ids committed to the run (empty unless it committed).
pub fn committed_ids(outcome: &RunOutcome) -> Vec<String> {
    if outcome.kind != OutcomeKind::Committed {
        return Vec::new();
    }
    outcome.spec.instances().map(|(_, instance)| instance.id.clone()).collect()
}

/// The path a run took as a Mermaid state diagram.
pub fn path_diagram(path: &[State]) -> String {
    let mut out = String::from("stateDiagram-v2\n");
    if let Some(first) = path.first() {
        out.push_str(&format!("    [*] --> {first}\n"));
    }
    for pair in path.windows(2) {
        out.push_str(&format!("    {} --> {}\n", pair[0], pair[1]));
    }
    if let Some(last) = path.last().filter(|s| s.is_terminal()) {
        out.push_str(&format!("    {last} --> [*]\n"));
    }
    out
}

/// Escapes the data of a workflow command (the part after `::`), by the toolkit's rules
/// (`@actions/core` `escapeData`): `%`, CR and LF are percent-encoded, so the message stays on
/// its own line and cannot start another command.
pub fn escape_annotation(message: &str) -> String {
    message.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
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

/// Text from the spec or from AWS made safe for a plain-text line on stdout or stderr, which the
/// Actions runner scans for workflow commands: control characters (CR and LF included) are
/// written as escapes, so the text adds no line of its own, and [`neutralize_commands`] applies.
pub fn plain(text: &str) -> String {
    neutralize_commands(&crate::spec::escape_control(text))
}

/// Makes sure no line of `text` is read as a workflow command: a line that starts with `::`
/// (after leading whitespace, which the runner skips) gets a backslash in front, and the
/// runner's older `##[command]` form, which it finds anywhere in a line, is broken up as `##\[`.
/// Line breaks are kept; use it on text this program composed, after [`plain`] on each value.
pub fn neutralize_commands(text: &str) -> String {
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

/// Text made safe for a Markdown table cell or heading of the job summary: `|`, `<`, `>`, `&`,
/// backticks, `*`, `_`, `[`, `]` and backslashes are escaped, and line breaks become spaces, so a
/// value can neither end its cell or row nor inject HTML, links or code.
pub fn markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' => out.push_str("&#96;"),
            '\\' | '*' | '_' | '[' | ']' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// A value as a Markdown code span when it is plainly safe there (ids: letters, digits, `.`,
/// `_`, `-`), otherwise as escaped text: backslash escapes do not work inside code spans.
pub fn markdown_code(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        format!("`{text}`")
    } else {
        markdown(text)
    }
}

/// The Markdown job summary of a finished run.
pub fn step_summary(outcome: &RunOutcome) -> String {
    let record = &outcome.record;
    let path: Vec<State> = record.history.iter().map(|h| h.state).collect();
    let headline = match outcome.kind {
        OutcomeKind::Committed => "committed",
        OutcomeKind::RolledBack => "rolled back (capacity shortfall)",
        OutcomeKind::CleanedUp => "cleaned up after an unexpected error",
    };
    let mut out = format!("## post-provision: run {} {} — {headline}\n\n", markdown_code(&record.run_id), record.state);
    out.push_str("```mermaid\n");
    out.push_str(&path_diagram(&path));
    out.push_str("```\n\n| Instance | Role | Class | Result |\n|---|---|---|---|\n");
    for line in instance_results(outcome) {
        let role = match line.role {
            Role::Selected => "selected",
            Role::Created => "created",
        };
        out.push_str(&format!(
            "| {} | {role} | {} | {} |\n",
            markdown_code(&line.id),
            markdown(&line.resource_class),
            markdown(&line.result)
        ));
    }
    if let Some(error) = &record.error {
        out.push_str(&format!("\n**Error ({}):** {}\n", markdown(error.kind.as_str()), markdown(&error.message)));
    }
    out
}

/// Writes step outputs, the job summary and annotations when running in GitHub Actions.
/// `annotations` receives the workflow commands (stdout normally).
pub fn write_github_outcome(outcome: &RunOutcome, annotations: &mut dyn Write) -> std::io::Result<()> {
    let committed = committed_ids(outcome);
    let outputs = [
        ("run-id", outcome.record.run_id.clone()),
        (
            "outcome",
            serde_json::to_value(outcome.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        ),
        ("state", outcome.record.state.to_string()),
        ("exit-code", outcome.kind.exit_code().to_string()),
        ("instance-ids", serde_json::to_string(&committed).unwrap_or_default()),
    ];
    append_outputs(&outputs)?;
    if let Ok(path) = std::env::var("GITHUB_STEP_SUMMARY") {
        append(&path, &step_summary(outcome))?;
    }
    for event in &outcome.trace {
        if let TraceEvent::Found { id, finding } = event {
            writeln!(
                annotations,
                "{}",
                workflow_command("warning", &[("title", "post-provision")], &format!("instance {id}: {finding}"))
            )?;
        }
    }
    if let Some(error) = &outcome.record.error {
        let reason = match outcome.kind {
            OutcomeKind::RolledBack => format!("run {} failed: {}", outcome.record.run_id, error.message),
            _ => format!("run {} failed and was cleaned up: {}", outcome.record.run_id, error.message),
        };
        writeln!(annotations, "{}", workflow_command("error", &[("title", "post-provision")], &reason))?;
    }
    Ok(())
}

/// Step outputs and an error annotation for a run that did not finish (or never started).
pub fn write_github_error(
    run_id: Option<&str>,
    exit_code: i32,
    message: &str,
    annotations: &mut dyn Write,
) -> std::io::Result<()> {
    let outputs = [
        ("run-id", run_id.unwrap_or_default().to_string()),
        ("outcome", if exit_code == 3 { "unfinished".to_string() } else { "error".to_string() }),
        ("state", String::new()),
        ("exit-code", exit_code.to_string()),
        ("instance-ids", "[]".to_string()),
    ];
    append_outputs(&outputs)?;
    writeln!(annotations, "{}", workflow_command("error", &[("title", "post-provision")], message))
}

fn append_outputs(outputs: &[(&str, String)]) -> std::io::Result<()> {
    if let Ok(path) = std::env::var("GITHUB_OUTPUT") {
        append(&path, &delimited(outputs, &random_delimiter())?)?;
    }
    Ok(())
}

/// A delimiter for the multi-line form of `$GITHUB_OUTPUT` and `$GITHUB_ENV`, as the toolkit
/// makes it: unguessable, so a value cannot end its own entry early.
fn random_delimiter() -> String {
    format!("ghadelimiter_{}", uuid::Uuid::new_v4())
}

/// Entries in the runner's multi-line form, `name<<DELIMITER`, the value, `DELIMITER`, which
/// takes any value, newlines included. The delimiter is checked not to occur in a name or value
/// (as the toolkit does), and a name must not contain a line break or `<<`.
pub fn delimited(entries: &[(&str, String)], delimiter: &str) -> std::io::Result<String> {
    let mut text = String::new();
    for (name, value) in entries {
        if name.is_empty() || name.contains(['\r', '\n']) || name.contains("<<") {
            return Err(std::io::Error::other(format!("unusable output name {name:?}")));
        }
        if name.contains(delimiter) || value.contains(delimiter) {
            return Err(std::io::Error::other(format!(
                "the value of {name} contains the delimiter {delimiter}; refusing to write it"
            )));
        }
        text.push_str(&format!("{name}<<{delimiter}\n{value}\n{delimiter}\n"));
    }
    Ok(text)
}

fn append(path: &str, text: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagrams_and_escapes() {
        let diagram = path_diagram(&[State::Reconciling, State::RollingBack, State::Failed]);
        assert_eq!(
            diagram,
            "stateDiagram-v2\n    [*] --> Reconciling\n    Reconciling --> RollingBack\n    RollingBack --> Failed\n    Failed --> [*]\n"
        );
        assert_eq!(escape_annotation("50% done\nnext"), "50%25 done%0Anext");
    }

    const HOSTILE: &str = "x\n::warning title=pwn::INJECTED\r\n::set-output name=a::b";

    #[test]
    fn workflow_commands_escape_data_and_properties_by_the_toolkits_rules() {
        assert_eq!(
            workflow_command("error", &[("title", "a:b,c%\n")], "50% of x\r\ny"),
            "::error title=a%3Ab%2Cc%25%0A::50%25 of x%0D%0Ay"
        );
        let line = workflow_command("warning", &[("title", "post-provision")], HOSTILE);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.starts_with("::warning title=post-provision::x%0A::warning"), "{line}");
        assert!(!workflow_command("error", &[], "a ##[warning]b").contains("##["));
    }

    #[test]
    fn plain_text_never_starts_a_line_with_a_command() {
        let text = plain(HOSTILE);
        assert_eq!(text.lines().count(), 1, "{text}");
        let composed = neutralize_commands(&format!("error: {}\n  ::warning::x\n##[error]y\n", plain(HOSTILE)));
        for line in composed.lines() {
            assert!(!line.trim_start().starts_with("::"), "{line}");
            assert!(!line.contains("##["), "{line}");
        }
        assert_eq!(plain("a\u{1b}[31mb"), "a\\u{1b}[31mb");
    }

    #[test]
    fn markdown_cells_cannot_break_out() {
        let cell = markdown("a|b<script>`c`\n| x | y |\n[l](http://e)");
        assert!(!cell.contains('\n') && !cell.contains('<') && !cell.contains('`'), "{cell}");
        assert!(!cell.replace("\\|", "").contains('|'), "{cell}");
        assert_eq!(markdown_code("9876543210"), "`9876543210`");
        assert_eq!(markdown_code("a`b"), "a&#96;b");
    }

    #[test]
    fn outputs_use_the_delimiter_form_and_refuse_a_value_holding_the_delimiter() {
        let text = delimited(&[("run-id", "x\nfoo=bar".to_string())], "ghadelimiter_D").unwrap();
        assert_eq!(text, "run-id<<ghadelimiter_D\nx\nfoo=bar\nghadelimiter_D\n");
        assert!(delimited(&[("run-id", "a\nghadelimiter_D\nfoo=bar".to_string())], "ghadelimiter_D").is_err());
        assert!(delimited(&[("a\nb", String::new())], "ghadelimiter_D").is_err());
        let (one, two) = (random_delimiter(), random_delimiter());
        assert!(one.starts_with("ghadelimiter_") && one != two);
    }
}
