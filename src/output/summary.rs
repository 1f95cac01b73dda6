//! The Markdown job summaries (`$GITHUB_STEP_SUMMARY`) of a run and of an audit. Every value
//! from the spec, AWS or a record goes through [`markdown`] or [`markdown_code`]: it can end no
//! cell or row, inject no HTML, and become no link.

use super::escape::{markdown, markdown_code};
use super::results::instance_results;
use crate::audit::{AuditReport, RepairOutcome};
use crate::driver::{OutcomeKind, RunOutcome};
use crate::machine::State;
use crate::spec::Role;

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

/// The Markdown job summary of a finished run.
pub fn run(outcome: &RunOutcome) -> String {
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

/// The audit as a Markdown job summary: one escaped table row per finding.
pub fn audit(report: &AuditReport) -> String {
    let cell = |value: Option<&str>| value.map_or("-".to_string(), markdown_code);
    let mut out =
        format!("## post-provision audit\n\n{} findings, {} hints\n\n", report.summary.findings, report.summary.hints);
    if report.findings.is_empty() {
        out.push_str("The pool is clean.\n");
        return out;
    }
    out.push_str("| kind | instance | run | record | threshold | EC2 | repair | result | detail |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for entry in &report.findings {
        let finding = &entry.finding;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            finding.kind.as_str(),
            cell(finding.instance_id.as_deref().or(finding.resource_class.as_deref())),
            cell(finding.run_id.as_deref()),
            cell(finding.record_state.as_deref()),
            cell(finding.record_threshold.as_deref()),
            cell(finding.ec2_state.as_deref()),
            finding.repair.as_str(),
            cell(entry.outcome.map(RepairOutcome::as_str)),
            markdown(&finding.detail),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditFinding, FindingKind, Repair, Snapshot};

    #[test]
    fn the_path_is_a_mermaid_diagram() {
        let diagram = path_diagram(&[State::Reconciling, State::RollingBack, State::Failed]);
        assert_eq!(
            diagram,
            "stateDiagram-v2\n    [*] --> Reconciling\n    Reconciling --> RollingBack\n    RollingBack --> Failed\n    Failed --> [*]\n"
        );
    }

    /// Text from AWS or a record can never break a table row, inject HTML or link.
    #[test]
    fn the_audit_summary_escapes_what_records_hold() {
        let hostile = "x\n::error::owned|<b> https://evil.example";
        let finding = AuditFinding {
            kind: FindingKind::GhostRecord,
            instance_id: Some(hostile.into()),
            run_id: Some(hostile.into()),
            run_attempt: None,
            resource_class: None,
            record_state: None,
            record_threshold: None,
            ec2_state: None,
            age_secs: None,
            repair: Repair::DeleteRecord,
            detail: hostile.into(),
        };
        let summary = audit(&AuditReport::new(&Snapshot::default(), vec![finding]));
        assert!(summary.contains("\\|") && !summary.contains("<b>") && !summary.contains("://"), "{summary}");
        assert!(summary.lines().all(|line| !line.starts_with("::")), "{summary}");
    }
}
