//! For operators: GitHub Actions outputs, summary and annotations; JSON outputs validated against
//! the schemas in docs/schemas; `init`; and the library example run against moto.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::harness::{Owner, Seed, World};

const CLAIMED_SMALL: Seed = Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 };
const CLAIMED_LARGE: Seed = Seed { class: "large", state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 };
const OTHERS: Seed =
    Seed { class: "large", state: Some("claimed"), owner: Owner::Other("someone-else"), threshold_secs: 240 };

fn binary() -> Command {
    let mut command = Command::new(crate::harness::cli_binary());
    command.env_remove("POST_PROVISION_TEST_HOOK").env_remove("GITHUB_ACTIONS").env("RUST_LOG", "warn");
    command
}

fn spec_file(spec: &serde_json::Value) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), spec.to_string()).expect("write spec");
    file
}

struct Github {
    _dir: tempfile::TempDir,
    output: PathBuf,
    summary: PathBuf,
}

impl Github {
    fn new() -> Github {
        let dir = tempfile::tempdir().expect("temp dir");
        Github { output: dir.path().join("output"), summary: dir.path().join("summary"), _dir: dir }
    }

    fn run(&self, world: &World, spec: &serde_json::Value) -> Output {
        let file = spec_file(spec);
        binary()
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_OUTPUT", &self.output)
            .env("GITHUB_STEP_SUMMARY", &self.summary)
            .args(["--table", &world.table, "run", "--spec"])
            .arg(file.path())
            .output()
            .expect("run CLI")
    }

    fn outputs(&self) -> std::collections::BTreeMap<String, String> {
        let text = std::fs::read_to_string(&self.output).expect("GITHUB_OUTPUT written");
        let outputs = parse_github_file(&text);
        assert!(outputs.contains_key("outcome"), "no outcome in GITHUB_OUTPUT: {text:?}");
        outputs
    }

    fn summary(&self) -> String {
        std::fs::read_to_string(&self.summary).expect("GITHUB_STEP_SUMMARY written")
    }
}

/// `$GITHUB_OUTPUT` (or `$GITHUB_ENV`) read as the Actions runner reads it: `name=value` lines,
/// and `name<<DELIMITER` followed by the value's lines up to a line that is exactly `DELIMITER`.
/// Panics on what the runner refuses (an unterminated entry).
pub(crate) fn parse_github_file(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut entries = std::collections::BTreeMap::new();
    let mut lines = text.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line));
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let heredoc = line.find("<<");
        let equals = line.find('=');
        match (heredoc, equals) {
            (Some(at), equals) if equals.map_or(true, |e| at < e) => {
                let (name, delimiter) = (&line[..at], &line[at + 2..]);
                let mut value = Vec::new();
                loop {
                    let next = lines.next().unwrap_or_else(|| panic!("entry {name} has no end delimiter: {text}"));
                    if next == delimiter {
                        break;
                    }
                    value.push(next);
                }
                entries.insert(name.to_string(), value.join("\n"));
            }
            (_, Some(at)) => {
                entries.insert(line[..at].to_string(), line[at + 1..].to_string());
            }
            _ => panic!("a line the runner refuses: {line:?}"),
        }
    }
    entries
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The Mermaid block of a summary.
fn mermaid_block(summary: &str) -> String {
    let start = summary.find("```mermaid\n").expect("a mermaid block") + "```mermaid\n".len();
    let end = summary[start..].find("```").expect("block end") + start;
    summary[start..end].to_string()
}

#[tokio::test]
async fn github_actions_commit_writes_outputs_and_a_summary() {
    let mut world = World::new("gha-commit").await;
    world.seed(&[CLAIMED_SMALL, CLAIMED_LARGE], &[]).await;
    let github = Github::new();
    let output = github.run(&world, &world.spec_json("success", 0));
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let outputs = github.outputs();
    assert_eq!(outputs["outcome"], "committed");
    assert_eq!(outputs["state"], "Done");
    assert_eq!(outputs["exit-code"], "0");
    let ids: Vec<String> = serde_json::from_str(&outputs["instance-ids"]).expect("json ids");
    assert_eq!(ids, world.selected.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
    let summary = github.summary();
    let diagram = mermaid_block(&summary);
    for state in ["Reconciling", "Committing", "Done"] {
        assert!(diagram.contains(state), "{diagram}");
    }
    assert!(!diagram.contains("RollingBack"));
    assert!(
        summary.contains(&format!("| `{}` | selected | small | committed: running until", world.selected[0].id)),
        "{summary}"
    );
    assert!(!stdout(&output).contains("::error"));
}

#[tokio::test]
async fn github_actions_rollback_fails_the_step_with_one_clear_line() {
    let mut world = World::new("gha-rollback").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    let github = Github::new();
    let output = github.run(&world, &world.spec_json("failed", 1));
    assert_eq!(output.status.code(), Some(1));
    let errors: Vec<String> = stdout(&output).lines().filter(|l| l.starts_with("::error")).map(String::from).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("::error title=post-provision::run "), "{}", errors[0]);
    assert!(errors[0].contains("capacity shortfall: creation ended Failed"), "{}", errors[0]);
    assert_eq!(github.outputs()["outcome"], "rolled-back");
    assert_eq!(github.outputs()["instance-ids"], "[]");
    let summary = github.summary();
    let diagram = mermaid_block(&summary);
    assert!(diagram.contains("Reconciling --> RollingBack") && diagram.contains("RollingBack --> Failed"), "{diagram}");
    assert!(summary.contains("returned to pool small"), "{summary}");
    assert!(summary.contains("**Error (shortfall):**"), "{summary}");
}

#[tokio::test]
async fn github_actions_cleanup_warns_about_what_it_left_alone() {
    let mut world = World::new("gha-cleanup").await;
    world.seed(&[CLAIMED_SMALL, OTHERS], &[]).await;
    let github = Github::new();
    let output = github.run(&world, &world.spec_json("success", 0));
    assert_eq!(output.status.code(), Some(2));
    let text = stdout(&output);
    assert!(
        text.lines()
            .any(|l| l.starts_with("::warning title=post-provision::instance ")
                && l.contains("owned by run someone-else")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("::error title=post-provision::") && l.contains("cleaned up")),
        "{text}"
    );
    let summary = github.summary();
    assert!(mermaid_block(&summary).contains("Committing --> EmergencyCleanup"));
    assert!(
        summary.contains("terminated, record deleted") && summary.contains("left alone (owned by run someone-else"),
        "{summary}"
    );
}

pub(crate) fn validate(schema: &str, json: &[u8]) {
    let python = std::env::var("POST_PROVISION_PYTHON").expect("POST_PROVISION_PYTHON (set by scripts/test)");
    let schema_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas").join(schema);
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, jsonschema; jsonschema.Draft202012Validator(json.load(open(sys.argv[1]))).validate(json.load(sys.stdin))",
        ])
        .arg(&schema_path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child.stdin.take().expect("stdin").write_all(json).expect("write json");
    let result = child.wait_with_output().expect("validator");
    assert!(
        result.status.success(),
        "output does not match {schema}:\n{}\n{}",
        String::from_utf8_lossy(json),
        String::from_utf8_lossy(&result.stderr)
    );
}

#[tokio::test]
async fn json_outputs_match_their_schemas() {
    let mut world = World::new("json").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    let file = spec_file(&world.spec_json("failed", 1));
    let json = |args: &[&str]| -> Output {
        binary().args(["--output", "json", "--table", &world.table]).args(args).output().expect("CLI")
    };
    let run = json(&["run", "--spec", &file.path().display().to_string()]);
    assert_eq!(run.status.code(), Some(1));
    validate("run-report.schema.json", &run.stdout);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(
        report["instanceResults"][0]["result"].as_str().map(|r| r.starts_with("returned to pool small")),
        Some(true)
    );
    validate("run-report.schema.json", &json(&["status", &world.run_id]).stdout);
    validate("run-report.schema.json", &json(&["resume", &world.run_id]).stdout);
    validate("list.schema.json", &json(&["list"]).stdout);
    validate("resume-all.schema.json", &json(&["resume", "--all"]).stdout);
    let missing = json(&["status", "nope"]);
    assert_eq!(missing.status.code(), Some(66));
    validate("error.schema.json", &missing.stdout);
    let bad = spec_file(&serde_json::json!({"runId": ""}));
    let invalid = json(&["run", "--spec", &bad.path().display().to_string()]);
    assert_eq!(invalid.status.code(), Some(65));
    validate("error.schema.json", &invalid.stdout);
    let fresh_table = format!("{}-init", world.table);
    let init = binary().args(["--output", "json", "--table", &fresh_table, "init"]).output().expect("init");
    assert_eq!(init.status.code(), Some(0), "{}", String::from_utf8_lossy(&init.stderr));
    validate("init.schema.json", &init.stdout);
    let created: serde_json::Value = serde_json::from_slice(&init.stdout).expect("json");
    assert_eq!(created["result"], "created");
    assert_eq!(created["ttl"], "enabled");
    let again = binary().args(["--output", "json", "--table", &fresh_table, "init"]).output().expect("init");
    let checked: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!((checked["result"].as_str(), checked["ttl"].as_str()), (Some("ok"), Some("already-enabled")));
}

#[tokio::test]
async fn init_refuses_a_table_with_another_key_schema() {
    let world = World::new("init-bad").await;
    let table = format!("{}-wrong", world.table);
    world
        .clients
        .dynamodb
        .create_table()
        .table_name(&table)
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .expect("attribute"),
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .expect("key"),
        )
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await
        .expect("create table");
    let output = binary().args(["--table", &table, "init"]).output().expect("init");
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected PK (HASH) and SK (RANGE)"));
}

#[tokio::test]
async fn the_orchestrator_example_drives_a_run() {
    let mut world = World::new("example").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    // cargo test builds examples next to the test binaries' deps directory.
    // `scripts/test` copies it beside the CLI binary (see `harness::cli_binary`).
    let example = match std::env::var_os("POST_PROVISION_EXAMPLE") {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()
            .expect("test binary path")
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("examples/orchestrator"),
    };
    assert!(example.exists(), "{} is missing: run the full `scripts/test` (it builds the examples)", example.display());
    let file = spec_file(&world.spec_json("success", 0));
    let output = Command::new(&example)
        .arg(file.path())
        .env("POST_PROVISION_TABLE", &world.table)
        .env("RUST_LOG", "warn")
        .output()
        .expect("example");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout(&output).contains(&format!("run {} committed 1 instances", world.run_id)));
    let bad = spec_file(&serde_json::json!({"runId": "x"}));
    let refused =
        Command::new(&example).arg(bad.path()).env("POST_PROVISION_TABLE", &world.table).output().expect("example");
    assert_eq!(refused.status.code(), Some(65));
    // Its exit codes are the CLI's: a missing table is 78, not a generic failure.
    let missing = Command::new(&example)
        .arg(file.path())
        .env("POST_PROVISION_TABLE", format!("{}-missing", world.table))
        .env("RUST_LOG", "warn")
        .output()
        .expect("example");
    assert_eq!(
        missing.status.code(),
        Some(post_provision::cli::EXIT_CONFIG),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    let usage = Command::new(&example).env("POST_PROVISION_TABLE", &world.table).output().expect("example");
    assert_eq!(usage.status.code(), Some(post_provision::cli::EXIT_USAGE));
}

#[tokio::test]
async fn json_logs_carry_the_run_and_state_spans_and_name_the_instances_touched() {
    let mut world = World::new("logs").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    let file = spec_file(&world.spec_json("failed", 1));
    let output = binary()
        .env("RUST_LOG", "info")
        .args(["--log-format", "json", "--table", &world.table, "run", "--spec"])
        .arg(file.path())
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("a JSON log line"))
        .collect();
    assert!(!events.is_empty(), "{stderr}");
    let id = &world.selected[0].id;
    let sent = events
        .iter()
        .find(|e| e["fields"]["message"] == "pool messages sent")
        .unwrap_or_else(|| panic!("no 'pool messages sent' event: {stderr}"));
    assert_eq!(sent["span"]["state"], "RollingBack");
    assert_eq!(sent["spans"][0]["run_id"], world.run_id.as_str());
    assert!(sent["fields"]["ids"].as_str().unwrap_or_default().contains(id.as_str()), "{sent}");
}
