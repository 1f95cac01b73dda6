//! Bad input through the real CLI binary: every invalid spec exits 65, names the offending field
//! (its JSON path) and what was expected, and changes nothing in the table, the queues or EC2. A
//! missing table gets one clear line and its own exit code.

use std::collections::BTreeMap;
use std::path::Path;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::QueueAttributeName;
use post_provision::cli::{EXIT_CONFIG, EXIT_INVALID_SPEC};
use serde_json::{json, Value};

use crate::harness::{Seed, World};

/// What one CLI run printed.
struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn run_cli(table: &str, spec_file: &Path, extra: &[&str]) -> CliRun {
    let output = tokio::process::Command::new(crate::harness::cli_binary())
        .args(["--table", table])
        .args(extra)
        .args(["run", "--spec"])
        .arg(spec_file)
        .env_remove("POST_PROVISION_TEST_HOOK")
        .env_remove("GITHUB_ACTIONS")
        .output()
        .await
        .expect("run the CLI");
    CliRun {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// An attribute value with maps in key order, so two reads of the same item render the same.
fn render(value: &AttributeValue) -> String {
    match value {
        AttributeValue::M(map) => {
            let sorted: BTreeMap<&String, String> = map.iter().map(|(k, v)| (k, render(v))).collect();
            format!("{sorted:?}")
        }
        AttributeValue::L(items) => format!("{:?}", items.iter().map(render).collect::<Vec<_>>()),
        other => format!("{other:?}"),
    }
}

/// Everything a run could change: every item of the table, each queue's message counts, and each
/// seeded instance's EC2 state. Read without changing anything (no receives).
pub(crate) async fn world_state(world: &World) -> String {
    let mut lines = Vec::new();
    let mut pages =
        world.clients.dynamodb.scan().table_name(&world.table).consistent_read(true).into_paginator().send();
    while let Some(page) = pages.next().await {
        for item in page.expect("scan").items() {
            let sorted: BTreeMap<&String, String> = item.iter().map(|(k, v)| (k, render(v))).collect();
            lines.push(format!("item {sorted:?}"));
        }
    }
    lines.sort();
    for (class, url) in &world.queues {
        let attributes = world
            .clients
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .expect("queue attributes");
        let counts: Vec<String> = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .map(|name| attributes.attributes().and_then(|a| a.get(name)).cloned().unwrap_or_default())
        .collect();
        lines.push(format!("queue {class}: {}", counts.join("/")));
    }
    for (name, seeded) in world.named() {
        lines.push(format!("ec2 {name}: {}", world.ec2_state(&seeded.id).await));
    }
    lines.join("\n")
}

/// One bad input: how to spoil a valid spec, the field the error must name, and a piece of what
/// it must say was expected.
struct Case {
    name: &'static str,
    spoil: fn(&mut Value) -> Option<String>,
    field: &'static str,
    expected: &'static str,
}

/// A case that edits the valid spec in place (a case whose `spoil` returns text replaces it).
macro_rules! case {
    ($name:expr, |$v:ident| $body:expr, $field:expr, $expected:expr) => {
        Case {
            name: $name,
            spoil: |$v: &mut Value| {
                $body;
                None
            },
            field: $field,
            expected: $expected,
        }
    };
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            // A syntax error is reported where parsing stopped, with its line and column.
            name: "malformed JSON",
            spoil: |_| Some(r#"{"runId": "r1", "maxRuntimeMin": "#.to_string()),
            field: "maxRuntimeMin",
            expected: "malformed JSON: EOF while parsing a value at line 1 column",
        },
        Case {
            name: "not JSON at all",
            spoil: |_| Some("runId=r1".to_string()),
            field: "$",
            expected: "malformed JSON",
        },
        Case { name: "empty file", spoil: |_| Some(String::new()), field: "$", expected: "malformed JSON" },
        Case {
            name: "trailing content",
            spoil: |v| Some(format!("{v} {{}}")),
            field: "$",
            expected: "trailing content",
        },
        Case {
            name: "not an object",
            spoil: |_| Some(r#""a spec""#.to_string()),
            field: "$",
            expected: "expected struct Spec",
        },
        case!(
            "missing top-level field",
            |v| {
                v.as_object_mut().unwrap().remove("maxRuntimeMin");
            },
            "maxRuntimeMin",
            "missing field `maxRuntimeMin`"
        ),
        case!(
            "missing nested field",
            |v| {
                v["selection"]["instances"][0].as_object_mut().unwrap().remove("threshold");
            },
            "selection.instances[0].threshold",
            "missing field `threshold`"
        ),
        case!(
            "missing creation",
            |v| {
                v.as_object_mut().unwrap().remove("creation");
            },
            "creation",
            "missing field `creation`"
        ),
        case!(
            "mistyped duration",
            |v| v["idleTimeSec"] = json!("300"),
            "idleTimeSec",
            "invalid type: string \"300\", expected i64"
        ),
        case!(
            "mistyped cpu",
            |v| v["selection"]["instances"][0]["cpu"] = json!("two"),
            "selection.instances[0].cpu",
            "expected u32"
        ),
        case!(
            "mistyped instances",
            |v| v["creation"]["instances"] = json!({}),
            "creation.instances",
            "expected a sequence"
        ),
        case!(
            "negative count",
            |v| v["selection"]["numInstancesRequired"] = json!(-1),
            "selection.numInstancesRequired",
            "expected u32"
        ),
        case!(
            "unknown creation state",
            |v| v["creation"]["state"] = json!("maybe"),
            "creation.state",
            "expected one of `success`, `partial`, `failed`"
        ),
        case!(
            "unknown usage class",
            |v| v["selection"]["instances"][0]["usageClass"] = json!("reserved"),
            "selection.instances[0].usageClass",
            "expected `spot` or `on-demand`"
        ),
        case!("empty runId", |v| v["runId"] = json!(""), "runId", "expected a non-empty run id"),
        case!("runId with a slash", |v| v["runId"] = json!("run/1"), "runId", "A-Z a-z 0-9 . _ -"),
        case!(
            "negative maxRuntimeMin",
            |v| v["maxRuntimeMin"] = json!(-5),
            "maxRuntimeMin",
            "expected whole minutes from 1 to 43200, got -5"
        ),
        case!("zero maxRuntimeMin", |v| v["maxRuntimeMin"] = json!(0), "maxRuntimeMin", "from 1 to 43200, got 0"),
        case!(
            "absurd maxRuntimeMin",
            |v| v["maxRuntimeMin"] = json!(100_000_000),
            "maxRuntimeMin",
            "from 1 to 43200, got 100000000"
        ),
        case!("fractional maxRuntimeMin", |v| v["maxRuntimeMin"] = json!(1.5), "maxRuntimeMin", "expected i64"),
        case!(
            "negative idleTimeSec",
            |v| v["idleTimeSec"] = json!(-1),
            "idleTimeSec",
            "expected whole seconds from 1 to 604800, got -1"
        ),
        case!(
            "absurd idleTimeSec",
            |v| v["idleTimeSec"] = json!(1_000_000_000_000_i64),
            "idleTimeSec",
            "from 1 to 604800, got 1000000000000"
        ),
        case!("idleTimeSec beyond 64 bits", |v| v["idleTimeSec"] = json!(1e20), "idleTimeSec", "expected i64"),
        case!(
            "too many selected",
            |v| v["selection"]["numInstancesSelected"] = json!(5),
            "selection.numInstancesSelected",
            "expected the number of entries in selection.instances (2), got 5"
        ),
        case!(
            "too few created",
            |v| v["creation"]["numInstancesCreated"] = json!(0),
            "creation.numInstancesCreated",
            "expected the number of entries in creation.instances (1), got 0"
        ),
        case!(
            "duplicate selected id",
            |v| v["selection"]["instances"][1]["id"] = v["selection"]["instances"][0]["id"].clone(),
            "selection.instances[1].id",
            "appears more than once"
        ),
        case!(
            "one id both selected and created",
            |v| v["creation"]["instances"][0]["id"] = v["selection"]["instances"][0]["id"].clone(),
            "creation.instances[0].id",
            "appears more than once"
        ),
        case!(
            "malformed instance id",
            |v| v["selection"]["instances"][0]["id"] = json!("i-XYZ"),
            "selection.instances[0].id",
            "expected an EC2 instance id"
        ),
        case!(
            "upper-case instance id",
            |v| v["creation"]["instances"][0]["id"] = json!("i-0ABCDEF0123456789"),
            "creation.instances[0].id",
            "lowercase hex"
        ),
        case!(
            "instance id without prefix",
            |v| v["selection"]["instances"][1]["id"] = json!("0123456789abcdef0"),
            "selection.instances[1].id",
            "expected an EC2 instance id"
        ),
        case!(
            "empty resource class",
            |v| v["selection"]["instances"][0]["resourceClass"] = json!(""),
            "selection.instances[0].resourceClass",
            "non-empty resource class"
        ),
        case!(
            "shortfall with a class that has no queue",
            |v| {
                v["creation"]["state"] = json!("failed");
                v["selection"]["instances"][1]["resourceClass"] = json!("xlarge");
            },
            "selection.instances[1].resourceClass",
            "resource class \"xlarge\" has no pool queue"
        ),
        case!(
            "threshold with fractional seconds",
            |v| v["selection"]["instances"][0]["threshold"] = json!("2026-11-27T10:05:00.123Z"),
            "selection.instances[0].threshold",
            "YYYY-MM-DDTHH:MM:SSZ"
        ),
        case!(
            "threshold with an offset",
            |v| v["creation"]["instances"][0]["threshold"] = json!("2026-11-27T10:05:00+00:00"),
            "creation.instances[0].threshold",
            "YYYY-MM-DDTHH:MM:SSZ"
        ),
        case!(
            "threshold with a space",
            |v| v["selection"]["instances"][1]["threshold"] = json!("2026-11-27 10:05:00"),
            "selection.instances[1].threshold",
            "YYYY-MM-DDTHH:MM:SSZ"
        ),
        case!(
            "unknown top-level field (a typo)",
            |v| v["resourceClassConfg"] = json!({}),
            "resourceClassConfg",
            "did you mean `resourceClassConfig`?"
        ),
        case!(
            "unknown instance field",
            |v| v["creation"]["instances"][0]["usage_class"] = json!("spot"),
            "creation.instances[0].usage_class",
            "did you mean `usageClass`?"
        ),
        case!("runId with a key separator", |v| v["runId"] = json!("run#1"), "runId", "A-Z a-z 0-9 . _ -"),
        case!(
            "runAttempt out of range",
            |v| v["runAttempt"] = json!(0),
            "runAttempt",
            "expected a run attempt from 1 to 10000, got 0"
        ),
        case!(
            "1 MB instanceType",
            |v| v["selection"]["instances"][0]["instanceType"] = json!("c".repeat(1_000_000)),
            "selection.instances[0].instanceType",
            "(1000000 bytes)"
        ),
        case!(
            "5 MB instanceType (over the file limit)",
            |v| v["selection"]["instances"][0]["instanceType"] = json!("c".repeat(5_000_000)),
            "$",
            "larger than the spec size limit of 2097152 bytes"
        ),
        case!(
            "resource class over 64 bytes",
            |v| v["selection"]["instances"][1]["resourceClass"] = json!("l".repeat(65)),
            "selection.instances[1].resourceClass",
            "at most 64 bytes"
        ),
        case!(
            "class with cpu 0",
            |v| v["resourceClassConfig"] = json!({"large": {"cpu": 0, "mmem": 4096, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-large"}}),
            "resourceClassConfig.large.cpu",
            "above 0"
        ),
        case!(
            "instance contradicting its class",
            |v| {
                v["resourceClassConfig"] = json!({"large": {"cpu": 2, "mmem": 4096, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-large"}});
                v["creation"]["instances"][0]["cpu"] = json!(4096);
            },
            "creation.instances[0].cpu",
            "has cpu 2 in resourceClassConfig, but this instance of it has cpu 4096"
        ),
        case!(
            "queue URL that is not SQS",
            |v| v["resourceClassConfig"] =
                json!({"large": {"cpu": 2, "mmem": 4096, "queueUrl": "https://evil.example/123456789012/pool-large"}}),
            "resourceClassConfig.large.queueUrl",
            "expected an SQS queue URL"
        ),
        case!(
            "threshold as epoch seconds",
            |v| v["selection"]["instances"][0]["threshold"] = json!(1795757867),
            "selection.instances[0].threshold",
            "expected a timestamp string of the form YYYY-MM-DDTHH:MM:SSZ"
        ),
    ]
}

#[tokio::test]
async fn every_bad_input_exits_65_names_the_field_and_changes_nothing() {
    let mut world = World::new("badinput").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[Seed::created("running")]).await;
    let valid = world.spec_json("success", 1);
    let directory = tempfile::tempdir().expect("temp dir");
    let before = world_state(&world).await;
    assert!(before.contains("claimed"), "the world has something to lose: {before}");

    for (index, case) in cases().into_iter().enumerate() {
        let mut spec = valid.clone();
        let text = (case.spoil)(&mut spec).unwrap_or_else(|| spec.to_string());
        let file = directory.path().join(format!("spec-{index}.json"));
        std::fs::write(&file, &text).expect("write spec");
        let run = run_cli(&world.table, &file, &["--output", "json"]).await;
        let context = format!("{}: spec {text}\nstdout: {}\nstderr: {}", case.name, run.stdout, run.stderr);
        assert_eq!(run.code, EXIT_INVALID_SPEC, "{context}");
        let error_line = run
            .stderr
            .lines()
            .find(|line| line.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {context}"));
        assert!(
            error_line.starts_with(&format!("error: invalid spec: {}: ", case.field)),
            "stderr names the field: {context}"
        );
        assert!(error_line.contains(case.expected), "stderr says what was expected ({:?}): {context}", case.expected);
        let report: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("stdout is one JSON error object ({e}): {context}"));
        assert_eq!(report["exitCode"], EXIT_INVALID_SPEC, "{context}");
        assert_eq!(report["error"]["kind"], "invalid-spec", "{context}");
        assert_eq!(report["error"]["field"], case.field, "{context}");
        assert!(report["error"]["message"].as_str().unwrap_or("").contains(case.expected), "{context}");
        assert_eq!(world_state(&world).await, before, "nothing changed: {context}");
    }
}

#[tokio::test]
async fn a_missing_table_is_one_clear_line_with_its_own_exit_code() {
    let mut world = World::new("notable").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let directory = tempfile::tempdir().expect("temp dir");
    let before = world_state(&world).await;
    let missing = format!("{}-missing", world.table);
    // A commit writes first; a shortfall reads the pool's configuration first: both find no table.
    for (name, spec) in [("commit", world.spec_json("success", 0)), ("shortfall", world.spec_json("failed", 1))] {
        let file = directory.path().join(format!("{name}.json"));
        std::fs::write(&file, spec.to_string()).expect("write spec");

        let run = run_cli(&missing, &file, &[]).await;
        let context = format!("{name}: stdout: {}\nstderr: {}", run.stdout, run.stderr);
        assert_eq!(run.code, EXIT_CONFIG, "{context}");
        let errors: Vec<&str> = run.stderr.lines().filter(|line| line.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "one error line: {context}");
        let error = errors[0];
        assert!(error.contains(&format!("table {missing} does not exist")), "names the table: {context}");
        assert!(error.contains("init"), "says how to create it: {context}");
        assert!(error.contains("ResourceNotFoundException"), "keeps the service's code: {context}");
        for dump in ["SdkError", "ServiceError", "DispatchFailure", "ConnectorError", "ErrorMetadata", "{"] {
            assert!(!error.contains(dump), "no SDK dump ({dump}): {context}");
        }

        let run = run_cli(&missing, &file, &["--output", "json"]).await;
        let report: Value = serde_json::from_str(&run.stdout).expect("stdout is one JSON error object");
        assert_eq!(report["exitCode"], EXIT_CONFIG);
        assert_eq!(report["error"]["kind"], "missing-table");
        assert!(report["error"]["message"].as_str().expect("message").contains(&missing), "{report}");
        assert!(report["error"].get("field").is_none(), "{report}");
    }
    assert_eq!(world_state(&world).await, before, "nothing changed in the real table");
}
