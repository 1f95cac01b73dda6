//! The GitHub Actions integration: step outputs (`$GITHUB_OUTPUT`), the job summary
//! (`$GITHUB_STEP_SUMMARY`) and the annotations, written when running in a job.

use std::io::Write;

use super::escape::plain;
use super::results::committed_ids;
use super::{annotations, summary};
use crate::audit::AuditReport;
use crate::driver::RunOutcome;

/// Writes step outputs, the job summary and annotations of a finished run. `annotations`
/// receives the workflow commands (stdout normally).
pub fn write_outcome(outcome: &RunOutcome, annotations: &mut dyn Write) -> std::io::Result<()> {
    let outcome_name =
        serde_json::to_value(outcome.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let outputs = [
        ("run-id", outcome.record.run_id.clone()),
        ("outcome", outcome_name),
        ("state", outcome.record.state.to_string()),
        ("exit-code", outcome.kind.exit_code().to_string()),
        ("instance-ids", serde_json::to_string(&committed_ids(outcome)).unwrap_or_default()),
    ];
    append_outputs(&outputs)?;
    if let Ok(path) = std::env::var("GITHUB_STEP_SUMMARY") {
        append(&path, &summary::run(outcome))?;
    }
    for line in annotations::run(outcome) {
        writeln!(annotations, "{line}")?;
    }
    Ok(())
}

/// Step outputs and an error annotation for a run that did not finish (or never started).
pub fn write_error(
    run_id: Option<&str>,
    exit_code: i32,
    message: &str,
    annotations: &mut dyn Write,
) -> std::io::Result<()> {
    let outputs = [
        ("run-id", run_id.unwrap_or_default().to_string()),
        ("outcome", if exit_code == super::exit::RESUMABLE { "unfinished" } else { "error" }.to_string()),
        ("state", String::new()),
        ("exit-code", exit_code.to_string()),
        ("instance-ids", "[]".to_string()),
    ];
    append_outputs(&outputs)?;
    writeln!(annotations, "{}", annotations::error(message))
}

/// The audit's job summary and one warning annotation per finding.
pub fn write_audit(report: &AuditReport, annotations: &mut dyn Write) -> std::io::Result<()> {
    if let Ok(path) = std::env::var("GITHUB_STEP_SUMMARY") {
        append(&path, &summary::audit(report))?;
    }
    for line in annotations::audit(report) {
        writeln!(annotations, "{line}")?;
    }
    Ok(())
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

/// Entries in the runner's multi-line form, `name<<DELIMITER`, the value, `DELIMITER`. Each value
/// goes through [`plain`], so it is one line whatever it holds; the delimiter is checked not to
/// occur in a name or value (as the toolkit does), and a name must hold no line break or `<<`.
pub fn delimited(entries: &[(&str, String)], delimiter: &str) -> std::io::Result<String> {
    let mut text = String::new();
    for (name, value) in entries {
        if name.is_empty() || name.contains(super::escape::RUNNER_LINE_BREAKS) || name.contains("<<") {
            return Err(std::io::Error::other(format!("unusable output name {}", plain(&format!("{name:?}")))));
        }
        let value = plain(value);
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
    fn outputs_use_the_delimiter_form_and_refuse_a_value_holding_the_delimiter() {
        let text = delimited(&[("run-id", "x\nfoo=bar".to_string())], "ghadelimiter_D").unwrap();
        assert_eq!(text, "run-id<<ghadelimiter_D\nx\\nfoo=bar\nghadelimiter_D\n");
        assert!(delimited(&[("run-id", "a\nghadelimiter_D\nfoo=bar".to_string())], "ghadelimiter_D").is_err());
        assert!(delimited(&[("a\nb", String::new())], "ghadelimiter_D").is_err());
        assert!(delimited(&[("a\u{2028}b", String::new())], "ghadelimiter_D").is_err());
        let text = delimited(&[("run-id", "a\u{2028}b\rc\u{85}d".to_string())], "ghadelimiter_D").unwrap();
        assert_eq!(super::super::escape::runner_lines(&text).len(), 4, "{text:?}");
        let (one, two) = (random_delimiter(), random_delimiter());
        assert!(one.starts_with("ghadelimiter_") && one != two);
    }
}
