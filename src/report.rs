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

/// Escapes a workflow-command message (`%`, CR and LF must be encoded).
pub fn escape_annotation(message: &str) -> String {
    message.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
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
    let mut out = format!("## post-provision: run `{}` {} — {headline}\n\n", record.run_id, record.state);
    out.push_str("```mermaid\n");
    out.push_str(&path_diagram(&path));
    out.push_str("```\n\n| Instance | Role | Class | Result |\n|---|---|---|---|\n");
    for line in instance_results(outcome) {
        let role = match line.role {
            Role::Selected => "selected",
            Role::Created => "created",
        };
        out.push_str(&format!("| `{}` | {role} | {} | {} |\n", line.id, line.resource_class, line.result));
    }
    if let Some(error) = &record.error {
        out.push_str(&format!("\n**Error ({}):** {}\n", error.kind, error.message));
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
                "::warning title=post-provision::{}",
                escape_annotation(&format!("instance {id}: {finding}"))
            )?;
        }
    }
    if let Some(error) = &outcome.record.error {
        let reason = match outcome.kind {
            OutcomeKind::RolledBack => format!("run {} failed: {}", outcome.record.run_id, error.message),
            _ => format!("run {} failed and was cleaned up: {}", outcome.record.run_id, error.message),
        };
        writeln!(annotations, "::error title=post-provision::{}", escape_annotation(&reason))?;
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
    writeln!(annotations, "::error title=post-provision::{}", escape_annotation(message))
}

fn append_outputs(outputs: &[(&str, String)]) -> std::io::Result<()> {
    if let Ok(path) = std::env::var("GITHUB_OUTPUT") {
        let text: String = outputs.iter().map(|(key, value)| format!("{key}={value}\n")).collect();
        append(&path, &text)?;
    }
    Ok(())
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
}
