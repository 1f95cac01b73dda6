//! Issue 18, items 1 and 4, tried through the CLI against moto as an attacker would.
//!
//! The job's identity binds the spec: in a GitHub Actions job, a spec, `RUN_ID` or `--attempt`
//! naming another run is refused with 65, naming both values, and nothing is written;
//! `--allow-foreign-run` (or `POST_PROVISION_ALLOW_FOREIGN_RUN`) opts out; `audit --fix` skips
//! the repairs that would act for another run.
//!
//! Every line break, everywhere: clap's own errors, JSON output, the job summary and the logs
//! never let a line start a workflow command, whatever the line break (CR, LF, CRLF, U+0085,
//! U+2028, U+2029), and the job summary holds no link, bidi or zero-width character from AWS.

use std::process::{Command, Output};

use aws_sdk_dynamodb::types::AttributeValue;
use post_provision::cli::EXIT_INVALID_SPEC;
use post_provision::output::escape::{is_workflow_command, runner_lines};
use serde_json::Value;

use crate::bad_input::world_state;
use crate::harness::{Owner, Seed, World};

/// The CLI in a simulated GitHub Actions job of run `job_run_id`, attempt 1.
fn job(job_run_id: &str, dir: &tempfile::TempDir) -> Command {
    let mut command = Command::new(crate::harness::cli_binary());
    command
        .env_remove("POST_PROVISION_TEST_HOOK")
        .env_remove("POST_PROVISION_ALLOW_FOREIGN_RUN")
        .env("RUST_LOG", "warn")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_RUN_ID", job_run_id)
        .env("GITHUB_RUN_ATTEMPT", "1")
        .env("GITHUB_OUTPUT", dir.path().join("output"))
        .env("GITHUB_STEP_SUMMARY", dir.path().join("summary"));
    command
}

fn context(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Lines of `text` the runner would take for a workflow command and that are not ours.
fn forged(text: &str) -> Vec<String> {
    let ours = ["::error title=post-provision::", "::warning title=post-provision"];
    runner_lines(text)
        .into_iter()
        .filter(|line| is_workflow_command(line) && !ours.iter().any(|own| line.starts_with(own)))
        .map(str::to_string)
        .collect()
}

fn write_spec(dir: &tempfile::TempDir, spec: &Value) -> std::path::PathBuf {
    let path = dir.path().join("spec.json");
    std::fs::write(&path, spec.to_string()).expect("write spec");
    path
}

#[tokio::test]
async fn a_spec_for_another_run_is_refused_in_a_job_and_nothing_is_written() {
    let mut world = World::new("foreign-spec").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
    let before = world_state(&world).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut with_attempt = world.spec_json("success", 1);
    with_attempt["runAttempt"] = serde_json::json!(2);
    // (the job's run id, the spec, the field named, the values the message must name)
    let cases = [
        ("4242", world.spec_json("success", 1), "runId", vec!["\"4242\"".to_string(), format!("{:?}", world.run_id)]),
        (world.run_id.as_str(), with_attempt, "runAttempt", vec!["attempt 2".to_string(), "\"1\"".to_string()]),
    ];
    for (job_run_id, spec, field, values) in cases {
        for format in ["text", "json"] {
            let file = write_spec(&dir, &spec);
            let output = job(job_run_id, &dir)
                .args(["--output", format, "--table", &world.table, "run", "--spec"])
                .arg(&file)
                .output()
                .expect("CLI");
            let context = format!("{field} ({format}): {}", context(&output));
            assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{context}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            for value in &values {
                assert!(stderr.contains(value.as_str()), "names {value}: {context}");
            }
            assert!(stderr.contains("--allow-foreign-run"), "{context}");
            if format == "json" {
                let json: Value = serde_json::from_slice(&output.stdout).expect("JSON error");
                assert_eq!(
                    (json["error"]["kind"].as_str(), json["error"]["field"].as_str()),
                    (Some("foreign-run"), Some(field))
                );
                crate::github::validate("error.schema.json", &output.stdout);
            }
        }
    }
    assert_eq!(world_state(&world).await, before, "nothing written");

    // The opt-out, by flag and by environment variable: the run is this spec's to drive.
    let file = write_spec(&dir, &world.spec_json("success", 1));
    let output = job("4242", &dir)
        .env("POST_PROVISION_ALLOW_FOREIGN_RUN", "true")
        .args(["--table", &world.table, "validate", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(0), "{}", context(&output));
    let output = job("4242", &dir)
        .args(["--allow-foreign-run", "--table", &world.table, "run", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(0), "{}", context(&output));
}

#[tokio::test]
async fn resume_and_status_of_another_run_are_refused_in_a_job() {
    let mut world = World::new("foreign-resume").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_spec(&dir, &world.spec_json("success", 0));
    let output =
        job(&world.run_id, &dir).args(["--table", &world.table, "run", "--spec"]).arg(&file).output().expect("CLI");
    assert_eq!(output.status.code(), Some(0), "{}", context(&output));
    let before = world_state(&world).await;
    let run_id = world.run_id.as_str();
    let refused: [(&str, Vec<&str>); 4] = [
        ("4242", vec!["resume", run_id]),
        ("4242", vec!["status", run_id]),
        (run_id, vec!["resume", "--attempt", "2", run_id]),
        (run_id, vec!["status", "--attempt", "2", run_id]),
    ];
    for (job_run_id, args) in refused {
        let output = job(job_run_id, &dir).args(["--table", &world.table]).args(&args).output().expect("CLI");
        let context = format!("{args:?} in job {job_run_id}: {}", context(&output));
        assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{context}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("{run_id:?}")) && stderr.contains("GITHUB_RUN"), "{context}");
    }
    assert_eq!(world_state(&world).await, before, "nothing written");
    for args in [vec!["status", run_id], vec!["--allow-foreign-run", "resume", run_id]] {
        let job_run_id = if args[0] == "status" { run_id } else { "4242" };
        let output = job(job_run_id, &dir).args(["--table", &world.table]).args(&args).output().expect("CLI");
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", context(&output));
    }
}

/// A run record left unfinished by a driver whose lease ended an hour ago.
async fn put_abandoned_run(world: &World, run_id: &str) {
    let lease = AttributeValue::M(
        [
            ("owner".to_string(), AttributeValue::S("dead-driver".into())),
            ("expiresAt".to_string(), AttributeValue::S(world.start.plus_secs(-3_600).to_string())),
        ]
        .into(),
    );
    world
        .clients
        .dynamodb
        .put_item()
        .table_name(&world.table)
        .item("PK", AttributeValue::S("TYPE#RUN".into()))
        .item("SK", AttributeValue::S(format!("ID#{run_id}")))
        .item("runId", AttributeValue::S(run_id.into()))
        .item("runAttempt", AttributeValue::N("1".into()))
        .item("state", AttributeValue::S("RollingBack".into()))
        .item("lease", lease)
        .send()
        .await
        .expect("put run record");
}

#[tokio::test]
async fn audit_fix_in_a_job_does_not_resume_another_run() {
    let world = World::new("foreign-audit").await;
    let other = format!("{}-other", world.run_id);
    put_abandoned_run(&world, &other).await;
    let before = world_state(&world).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let filter = format!("tag:InitialRunId={}", world.table);
    let output = job(&world.run_id, &dir)
        .args(["--output", "json", "--table", &world.table, "audit", "--fix", "--grace-secs", "0"])
        .args(["--instance-filter", &filter])
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(1), "the finding remains: {}", context(&output));
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let entry = &json["findings"][0];
    assert_eq!(
        (entry["kind"].as_str(), entry["outcome"].as_str()),
        (Some("unfinished-run"), Some("skipped")),
        "{json}"
    );
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("{other:?}")) && reason.contains(&format!("{:?}", world.run_id)), "{reason}");
    assert_eq!(world_state(&world).await, before, "nothing written");
}

#[tokio::test]
async fn clap_errors_cannot_forge_a_command_with_any_line_break() {
    let dir = tempfile::tempdir().expect("temp dir");
    for brk in ["\r", "\n", "\r\n", "\u{85}", "\u{2028}", "\u{2029}"] {
        let forged_value = format!("x{brk}::error title=FORGED::owned{brk}##[error]old");
        let by_env = job("1", &dir)
            .env("POST_PROVISION_MAX_ATTEMPTS", &forged_value)
            .args(["--table", "t", "status", "1"])
            .output()
            .expect("CLI");
        let by_flag =
            job("1", &dir).args(["--output", &forged_value, "--table", "t", "status", "1"]).output().expect("CLI");
        for output in [by_env, by_flag] {
            assert_eq!(output.status.code(), Some(64), "{}", context(&output));
            for text in [&output.stdout, &output.stderr] {
                let text = String::from_utf8_lossy(text);
                assert_eq!(forged(&text), Vec::<String>::new(), "{brk:?}: {}", context(&output));
            }
            assert!(String::from_utf8_lossy(&output.stderr).contains("FORGED"), "the value is named, escaped");
        }
    }
}

#[tokio::test]
async fn json_output_breaks_up_old_style_commands_and_every_line_break() {
    let world = World::new("json-breaks").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = world.spec_json("success", 0);
    spec["##[error]x\u{2028}::error::y\u{85}::error::z"] = serde_json::json!(1);
    let file = write_spec(&dir, &spec);
    let output = job(&world.run_id, &dir)
        .args(["--output", "json", "--table", &world.table, "validate", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{}", context(&output));
    for text in [&output.stdout, &output.stderr] {
        assert_eq!(forged(&String::from_utf8_lossy(text)), Vec::<String>::new(), "{}", context(&output));
    }
    let json: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert!(json["error"]["field"].as_str().unwrap_or_default().starts_with("##[error]x"), "the value is kept: {json}");
}

#[tokio::test]
async fn the_job_summary_shows_no_link_bidi_or_zero_width_text_from_aws() {
    // Another run's id on an instance record comes from the table: the summary quotes it.
    let mut world = World::new("summary-links").await;
    let intruder = "see https://evil.example or www.evil.example \u{202e}txt.exe\u{200b} \u{1b}]0;title\u{7}\u{1b}[2J";
    let other = Seed { class: "large", state: Some("claimed"), owner: Owner::Other(intruder), threshold_secs: 240 };
    world.seed(&[Seed::claimed("small"), other], &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_spec(&dir, &world.spec_json("success", 0));
    let output = job(&world.run_id, &dir)
        .env("RUST_LOG", "debug")
        .args(["--table", &world.table, "run", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(2), "cleanup: another run owns an instance: {}", context(&output));
    let summary = std::fs::read_to_string(dir.path().join("summary")).expect("job summary");
    assert!(summary.contains("owned by run see https\\[:\\]//evil.example or www\\[.\\]evil.example"), "{summary}");
    assert!(!summary.contains("://") && !summary.contains("www.evil"), "{summary}");
    assert!(
        !summary.contains(['\u{202e}', '\u{200b}', '\u{1b}', '\u{7}']) && summary.contains("\\u{202e}"),
        "{summary}"
    );
    for text in [&output.stdout, &output.stderr] {
        let text = String::from_utf8_lossy(text);
        assert!(!text.contains(['\u{202e}', '\u{200b}', '\u{1b}', '\u{7}']), "{text:?}");
        assert_eq!(forged(&text), Vec::<String>::new(), "{}", context(&output));
    }
}
