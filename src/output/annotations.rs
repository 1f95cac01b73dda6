//! The workflow commands (annotations) this program prints in a GitHub Actions job. Each is one
//! line built by [`workflow_command`], every part escaped by the toolkit's rules.

use super::escape::workflow_command;
use crate::audit::AuditReport;
use crate::driver::{OutcomeKind, RunOutcome, TraceEvent};

/// The title of a run's annotations.
const RUN_TITLE: &str = "post-provision";
/// The title of an audit's annotations.
const AUDIT_TITLE: &str = "post-provision audit";

/// A finished run's annotations: a warning per instance left alone, and an error when it failed.
pub fn run(outcome: &RunOutcome) -> Vec<String> {
    let mut lines = Vec::new();
    for event in &outcome.trace {
        if let TraceEvent::Found { id, finding } = event {
            lines.push(workflow_command("warning", &[("title", RUN_TITLE)], &format!("instance {id}: {finding}")));
        }
    }
    if let Some(error) = &outcome.record.error {
        let reason = match outcome.kind {
            OutcomeKind::RolledBack => format!("run {} failed: {}", outcome.record.run_id, error.message),
            _ => format!("run {} failed and was cleaned up: {}", outcome.record.run_id, error.message),
        };
        lines.push(workflow_command("error", &[("title", RUN_TITLE)], &reason));
    }
    lines
}

/// The error annotation of a command that did not finish a run.
pub fn error(message: &str) -> String {
    workflow_command("error", &[("title", RUN_TITLE)], message)
}

/// One warning per audit finding.
pub fn audit(report: &AuditReport) -> Vec<String> {
    report
        .findings
        .iter()
        .map(|entry| {
            let finding = &entry.finding;
            let name =
                finding.instance_id.as_deref().or(finding.run_id.as_deref()).or(finding.resource_class.as_deref());
            let message = format!(
                "{} {}: {} (repair: {})",
                finding.kind.as_str(),
                name.unwrap_or("-"),
                finding.detail,
                finding.repair.as_str()
            );
            workflow_command("warning", &[("title", AUDIT_TITLE)], &message)
        })
        .collect()
}
