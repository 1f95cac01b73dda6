//! Property tests over every printed field: whatever text the spec, AWS or a record holds, the
//! runner's own line splitting ([`runner_lines`]: CR, LF, CRLF, U+0085, U+2028, U+2029) of any
//! output never yields a line that starts with `::` (after leading whitespace) or contains
//! `##[`, except the annotations this program writes, each exactly one line of its own; JSON
//! parses back to the same value; and the job summary holds no link, bidi or zero-width
//! character from the input.

use proptest::prelude::*;

use super::escape::{self, is_workflow_command, runner_lines};
use super::results::{ErrorBody, ErrorKind, ErrorReport, InitResult, ListRow, ResumeAllEntry, RunReport};
use super::results::{RunIndexResult, TableResult, TtlResult, ValidateResult};
use super::{annotations, github, json, summary, text};
use crate::audit::{AuditEntry, AuditFinding, AuditReport, FindingKind, Repair, RepairOutcome, Snapshot};
use crate::driver::{OutcomeKind, RunOutcome, TraceEvent};
use crate::record::RunRecord;
use crate::spec::Spec;
use crate::timestamp::Timestamp;

/// Pieces an attacker would put together: every line break the runner knows, command
/// prefixes, controls, bidi and zero-width characters, link starts and Markdown.
const PIECES: &[&str] = &[
    "\n",
    "\r",
    "\r\n",
    "\u{85}",
    "\u{2028}",
    "\u{2029}",
    "::",
    "::error title=FORGED::x",
    "##[",
    "##[error]",
    "#",
    "[",
    ":",
    " ",
    "\t",
    "\u{1b}[2J",
    "\u{7}",
    "\u{9b}",
    "\u{7f}",
    "\u{202e}",
    "\u{200b}",
    "\u{feff}",
    "%0A",
    "%",
    ",",
    "|",
    "<b>",
    "`",
    "https://evil.example",
    "WWW.evil.example",
    "a@evil.example",
    "\\",
    "\"",
    "x",
    "\u{a0}",
    "\u{3000}",
];

/// Hostile text: pieces glued together, or any string at all.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(proptest::sample::select(PIECES), 0..10).prop_map(|pieces| pieces.concat()),
        any::<String>(),
    ]
}

/// `output` has no line the runner would take for a workflow command.
fn assert_no_command(what: &str, output: &str) {
    for line in runner_lines(output) {
        assert!(!is_workflow_command(line), "{what}: {line:?} in {output:?}");
    }
}

/// Each of `lines` is one annotation of ours: one runner line, `##[` broken up.
fn assert_annotations(lines: &[String]) {
    for line in lines {
        assert_eq!(runner_lines(line).len(), 1, "{line:?}");
        assert!(line.starts_with("::warning title=post-provision") || line.starts_with("::error title=post-provision"));
        assert!(!line.contains("##["), "{line:?}");
    }
}

/// The JSON printed for `value`: safe, and the same value when parsed.
fn assert_json<T: serde::Serialize>(value: &T) {
    let printed = json::to_string(value);
    assert_no_command("json", &printed);
    let parsed: serde_json::Value = serde_json::from_str(&printed).expect("printed JSON parses");
    assert_eq!(parsed, serde_json::to_value(value).expect("serializes"));
}

/// A job summary: safe lines, and nothing from the input that links or hides. Code spans (ids
/// of letters, digits, `.`, `_`, `-`) are never links; the text outside them holds no `://`, no
/// `www.` and no `@` after a character of an e-mail address.
fn assert_summary(markdown: &str) {
    assert_no_command("summary", markdown);
    assert!(!markdown.contains(['\u{202e}', '\u{200b}', '\u{feff}', '\u{2028}', '\u{85}', '\r']), "{markdown:?}");
    let outside_code: String = markdown.split('`').step_by(2).collect();
    assert!(!outside_code.contains("://") && !outside_code.to_lowercase().contains("www."), "{markdown:?}");
    let mut previous = ' ';
    for c in outside_code.chars() {
        let email = previous.is_ascii_alphanumeric() || matches!(previous, '.' | '+' | '-' | '_');
        assert!(!(c == '@' && email), "{markdown:?}");
        previous = c;
    }
}

fn record(text: &str) -> RunRecord {
    let mut record: RunRecord =
        serde_json::from_str(include_str!("../../tests/fixtures/run-record-v1.json")).expect("fixture");
    record.run_id = text.to_string();
    record.lease.owner = text.to_string();
    for entry in &mut record.history {
        entry.reason = text.to_string();
    }
    if let Some(error) = record.error.as_mut() {
        error.message = text.to_string();
    }
    record
}

fn outcome(text: &str) -> RunOutcome {
    let mut spec: Spec = serde_json::from_value(crate::spec::tests::spec_json()).expect("spec");
    spec.run_id = text.to_string();
    for instance in spec.selection.instances.iter_mut().chain(spec.creation.instances.iter_mut()) {
        instance.resource_class = text.to_string();
    }
    spec.creation.instances[0].id = text.to_string();
    let found = TraceEvent::Found { id: text.to_string(), finding: text.to_string() };
    RunOutcome { kind: OutcomeKind::RolledBack, record: record(text), spec, trace: vec![found], writes: 0 }
}

fn audit_report(text: &str) -> AuditReport {
    let hostile = Some(text.to_string());
    let finding = AuditFinding {
        kind: FindingKind::GhostRecord,
        instance_id: hostile.clone(),
        run_id: hostile.clone(),
        run_attempt: Some(2),
        resource_class: hostile.clone(),
        record_state: hostile.clone(),
        record_threshold: hostile.clone(),
        ec2_state: hostile.clone(),
        age_secs: Some(1),
        repair: Repair::DeleteRecord,
        detail: text.to_string(),
    };
    let mut report = AuditReport::new(&Snapshot::default(), vec![finding]);
    let entry: &mut AuditEntry = &mut report.findings[0];
    entry.outcome = Some(RepairOutcome::Failed);
    entry.reason = hostile;
    report.recount();
    report
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_run_prints_no_command_in_any_format(text in hostile()) {
        let outcome = outcome(&text);
        let report = RunReport::of_outcome(&outcome);
        assert_no_command("text", &text::run_report(&report));
        assert_json(&report);
        assert_summary(&summary::run(&outcome));
        assert_annotations(&annotations::run(&outcome));
        assert_annotations(&[annotations::error(&text)]);
        let outputs = [("run-id", text.clone()), ("instance-ids", text.clone())];
        let file = github::delimited(&outputs, "ghadelimiter_D").expect("no delimiter in the value");
        assert_eq!(runner_lines(&file).len(), 7, "{file:?}");
    }

    #[test]
    fn an_audit_prints_no_command_in_any_format(text in hostile()) {
        let report = audit_report(&text);
        assert_no_command("text", &text::audit(&report));
        assert_json(&report);
        assert_summary(&summary::audit(&report));
        assert_annotations(&annotations::audit(&report));
    }

    #[test]
    fn the_other_results_print_no_command(text in hostile()) {
        let now = Timestamp::parse("2026-11-27T12:00:00Z").expect("timestamp");
        let rows = vec![ListRow::of(&record(&text), now)];
        assert_no_command("list", &text::list(&rows));
        assert_json(&rows);
        let entries = vec![ResumeAllEntry { run_id: text.clone(), exit_code: 3, summary: escape::plain(&text) }];
        assert_no_command("resume --all", &text::resume_all(&entries));
        assert_json(&entries);
        let init = InitResult {
            table: text.clone(), result: TableResult::Ok, ttl: TtlResult::OtherAttribute,
            other_ttl_attribute: Some(text.clone()), run_index: RunIndexResult::Created, run_index_backfilled: 3,
        };
        assert_no_command("init", &text::init(&init));
        assert_json(&init);
        let validate = ValidateResult { valid: true, run_id: text.clone(), instances: 1, selected: 1, created: 0 };
        assert_no_command("validate", &text::validate(&validate));
        assert_json(&validate);
        let error = ErrorReport {
            error: ErrorBody { kind: ErrorKind::InvalidSpec, message: escape::plain(&text), field: Some(text.clone()) },
            exit_code: 65,
        };
        assert_json(&error);
    }

    #[test]
    fn stderr_lines_clap_errors_and_logs_print_no_command(text in hostile(), ansi in any::<bool>()) {
        let error_line = format!("error: {}\n", escape::plain(&text));
        assert_no_command("error", &error_line);
        assert_eq!(runner_lines(&error_line).len(), 2, "{error_line:?}");
        let clap = format!("error: invalid value '{text}' for '--output <OUTPUT>'\n\nFor more information, try '--help'.\n");
        assert_no_command("clap", &escape::neutralize_commands(&clap));
        let log = escape::log_line(&format!("WARN post_provision: AWS said {text} error={text:?}"), ansi);
        assert_no_command("log", &log);
        assert_eq!(runner_lines(&log).len(), 1, "{log:?}");
        let json_log = serde_json::json!({"level": "WARN", "fields": {"message": text}}).to_string();
        let json_log = escape::neutralize_commands(&escape::json(&json_log));
        assert_no_command("json log", &json_log);
        assert_eq!(runner_lines(&json_log).len(), 1, "{json_log:?}");
    }
}
