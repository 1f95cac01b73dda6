//! The text renderings of the results, for a person at a terminal or reading a job's log.
//!
//! Every value that comes from the spec, AWS or a record goes through [`plain`] where the text
//! is composed; the CLI passes the whole text through [`super::escape::neutralize_commands`]
//! once more as it prints it.

use super::escape::plain;
use super::results::{
    InitResult, ListRow, ResumeAllEntry, RunIndexResult, RunReport, TableResult, TtlResult, ValidateResult,
};
use crate::audit::{AuditEntry, AuditReport, RepairOutcome};
use crate::driver::OutcomeKind;

/// A run report: state, path, transitions, instances, error and lease.
pub fn run_report(report: &RunReport) -> String {
    let path: Vec<String> = report.path.iter().map(|s| s.to_string()).collect();
    let outcome = match report.outcome {
        Some(OutcomeKind::Committed) => "committed",
        Some(OutcomeKind::RolledBack) => "rolled back (capacity shortfall)",
        Some(OutcomeKind::CleanedUp) => "cleaned up after an unexpected error",
        None => "not finished (resumable)",
    };
    let mut out = format!("run {}: {} — {}\n", plain(&report.run_id), report.state, outcome);
    out.push_str(&format!("  path: {}\n", path.join(" -> ")));
    for entry in &report.transitions {
        out.push_str(&format!("  {}  {:<16} {}\n", entry.at, entry.state.to_string(), plain(&entry.reason)));
    }
    out.push_str(&format!("  instances: {}\n", report.instances));
    if let Some(threshold) = report.commit_threshold {
        out.push_str(&format!("  commit threshold: {threshold}\n"));
    }
    if let Some(threshold) = report.idle_threshold {
        out.push_str(&format!("  idle threshold: {threshold} ({} pool messages sent)\n", report.messages_sent));
    }
    for line in report.instance_results.iter().flatten() {
        out.push_str(&format!(
            "  {}  {:<8} {:<8} {}\n",
            plain(&line.id),
            format!("{:?}", line.role).to_lowercase(),
            plain(&line.resource_class),
            plain(&line.result)
        ));
    }
    if let Some(error) = &report.error {
        out.push_str(&format!("  error ({}): {}\n", plain(error.kind.as_str()), plain(&error.message)));
    }
    if report.outcome.is_none() {
        out.push_str(&format!("  lease: {} until {}\n", plain(&report.lease.owner), report.lease.expires_at));
    }
    out
}

/// `list`: one row per run, with who drives it.
pub fn list(rows: &[ListRow]) -> String {
    let mut out = format!("{:<32} {:<17} {:>8} {:>9}  {}\n", "RUN", "STATE", "AGE", "INSTANCES", "DRIVER");
    for row in rows {
        let driver = if row.lease_active {
            plain(&row.lease_owner)
        } else if row.outcome.is_none() {
            "none (resume it)".to_string()
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "{:<32} {:<17} {:>7}s {:>9}  {}\n",
            plain(&row.run_id),
            row.state.to_string(),
            row.age_secs,
            row.instances,
            driver
        ));
    }
    out
}

/// `resume --all`: one line per run.
pub fn resume_all(entries: &[ResumeAllEntry]) -> String {
    if entries.is_empty() {
        return "no unfinished runs without a driver\n".to_string();
    }
    entries.iter().map(|entry| format!("{}\n", entry.summary)).collect()
}

/// `init`: the table and its TTL.
pub fn init(result: &InitResult) -> String {
    let table = plain(&result.table);
    let mut text = match result.result {
        TableResult::Created => format!("created table {table} (PK, SK strings; on-demand)\n"),
        TableResult::Ok => format!("table {table} exists with the expected key schema\n"),
    };
    text.push_str(&match (result.ttl, &result.other_ttl_attribute) {
        (TtlResult::OtherAttribute, Some(name)) => format!(
            "warning: TTL is enabled on attribute {}, not \"ttl\": finished run records will not expire by themselves\n",
            plain(&format!("{name:?}"))
        ),
        (ttl, _) => format!("TTL on attribute \"ttl\": {}\n", ttl.as_str()),
    });
    text.push_str(&format!(
        "run index post-provision-runs: {}; {} earlier run records indexed\n",
        if result.run_index == RunIndexResult::Created { "created" } else { "exists" },
        result.run_index_backfilled
    ));
    text
}

/// `validate`: the spec's run and counts.
pub fn validate(result: &ValidateResult) -> String {
    format!(
        "spec for run {} is valid: {} instances ({} selected, {} created)\n",
        plain(&result.run_id),
        result.instances,
        result.selected,
        result.created
    )
}

/// The columns of the audit table.
const AUDIT_HEADER: [&str; 9] = ["KIND", "INSTANCE", "RUN", "RECORD", "THRESHOLD", "EC2", "AGE", "REPAIR", "RESULT"];

/// The audit as a table a person can act on, one detail line per finding, and the counts.
pub fn audit(report: &AuditReport) -> String {
    let mut out = String::new();
    if report.findings.is_empty() {
        out.push_str("no findings: the pool is clean\n");
    } else {
        out.push_str(&audit_table(report));
        out.push('\n');
        for entry in &report.findings {
            out.push_str(&audit_detail(entry));
        }
    }
    let summary = &report.summary;
    out.push_str(&format!(
        "{} findings, {} hints ({} instance records, {} run records, {} EC2 instances read)",
        summary.findings, summary.hints, summary.records, summary.runs, summary.instances
    ));
    if summary.fixed {
        out.push_str(&format!(
            "; repaired {}, skipped {}, failed {}",
            summary.repaired, summary.skipped, summary.failed
        ));
    } else if summary.findings > 0 {
        out.push_str("; `audit --fix` repairs them");
    }
    out.push('\n');
    out
}

/// The table's rows, header first, in columns as wide as their widest cell.
fn audit_table(report: &AuditReport) -> String {
    let mut rows = vec![AUDIT_HEADER.map(String::from)];
    rows.extend(report.findings.iter().map(audit_row));
    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One finding's cells, every value from AWS or a record through [`plain`].
fn audit_row(entry: &AuditEntry) -> [String; 9] {
    let cell = |value: Option<&str>| plain(value.unwrap_or("-"));
    let finding = &entry.finding;
    let run = match (&finding.run_id, finding.run_attempt) {
        (Some(run), Some(attempt)) if attempt > 1 => Some(format!("{run}#{attempt}")),
        (run, _) => run.clone(),
    };
    [
        finding.kind.as_str().to_string(),
        cell(finding.instance_id.as_deref().or(finding.resource_class.as_deref().map(|_| "(class)"))),
        cell(run.as_deref()),
        cell(finding.record_state.as_deref()),
        cell(finding.record_threshold.as_deref()),
        cell(finding.ec2_state.as_deref()),
        finding.age_secs.map_or("-".into(), |age| format!("{age}s")),
        finding.repair.as_str().to_string(),
        entry.outcome.map_or("-", RepairOutcome::as_str).to_string(),
    ]
}

/// One finding's line: what it names, its detail, and why a repair was skipped or failed.
fn audit_detail(entry: &AuditEntry) -> String {
    let finding = &entry.finding;
    let name = finding.instance_id.as_deref().or(finding.run_id.as_deref()).or(finding.resource_class.as_deref());
    let mut line = format!("{} {}: {}", finding.kind.as_str(), plain(name.unwrap_or("-")), plain(&finding.detail));
    if let Some(reason) = &entry.reason {
        line.push_str(&format!(" ({})", plain(reason)));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditFinding, FindingKind, Repair, Snapshot};

    fn finding(instance_id: &str, detail: &str) -> AuditFinding {
        AuditFinding {
            kind: FindingKind::OrphanInstance,
            instance_id: Some(instance_id.into()),
            run_id: None,
            run_attempt: None,
            resource_class: None,
            record_state: None,
            record_threshold: None,
            ec2_state: Some("running".into()),
            age_secs: Some(3_600),
            repair: Repair::Terminate,
            detail: detail.into(),
        }
    }

    #[test]
    fn the_audit_table_has_a_row_per_finding_and_the_counts() {
        let report =
            AuditReport::new(&Snapshot::default(), vec![finding("i-orphan", "pool-tagged instance with no record")]);
        let table = audit(&report);
        assert!(table.contains("orphan-instance  i-orphan"), "{table}");
        assert!(table.ends_with("1 findings, 0 hints (0 instance records, 0 run records, 0 EC2 instances read); `audit --fix` repairs them\n"), "{table}");
        assert!(audit(&AuditReport::new(&Snapshot::default(), Vec::new())).contains("the pool is clean"));
    }

    /// Text from AWS or a record can never start a workflow command.
    #[test]
    fn the_audit_table_escapes_what_records_hold() {
        let hostile = "x\n::error::owned\r::error::cr";
        let report = AuditReport::new(&Snapshot::default(), vec![finding(hostile, hostile)]);
        for line in crate::output::escape::runner_lines(&audit(&report)) {
            assert!(!crate::output::escape::is_workflow_command(line), "{line}");
        }
    }
}
