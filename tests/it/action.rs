//! `action.yml` run as the GitHub runner would run its composite steps, locally against moto:
//! each `shell: bash` step's script under `bash --noprofile --norc -eo pipefail`, its `env`
//! evaluated from the inputs and earlier steps' outputs, in a simulated GitHub environment
//! (`GITHUB_OUTPUT` per step, `GITHUB_STEP_SUMMARY`, `GITHUB_RUN_ID`, `GITHUB_RUN_ATTEMPT`,
//! `RUNNER_TEMP`). The `uses:` cache step is not run (it only caches the build). The binary is
//! the test build's, given through the `binary` input.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::{json, Value};

use crate::github::parse_github_file;
use crate::harness::{Seed, World};

/// action.yml as JSON (PyYAML from the test virtualenv reads it).
fn action() -> Value {
    let python = std::env::var("POST_PROVISION_PYTHON").expect("POST_PROVISION_PYTHON (set by scripts/test)");
    let output = Command::new(python)
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/action.yml"))
        .output()
        .expect("python");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("action.yml as JSON")
}

/// What one use of the action did.
struct ActionRun {
    /// The exit code of the step that failed, or 0.
    code: i32,
    outputs: BTreeMap<String, String>,
    log: String,
    summary: String,
}

/// Evaluates the only expressions the action's `env` and `outputs` may use.
fn evaluate(
    text: &str,
    inputs: &BTreeMap<String, String>,
    steps: &BTreeMap<String, BTreeMap<String, String>>,
) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("closed expression") + start;
        let expression = rest[start + 3..end].trim();
        let value = if let Some(name) = expression.strip_prefix("inputs.") {
            inputs.get(name).cloned().unwrap_or_else(|| panic!("unknown input {name}"))
        } else if expression == "github.action_path" {
            env!("CARGO_MANIFEST_DIR").to_string()
        } else if let Some(path) = expression.strip_prefix("steps.") {
            let (step, output) = path.split_once(".outputs.").expect("steps.ID.outputs.NAME");
            steps.get(step).and_then(|o| o.get(output)).cloned().unwrap_or_default()
        } else {
            panic!("action.yml uses an expression this test does not evaluate: {expression}")
        };
        out.push_str(&value);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

fn use_action(world: &World, given: &[(&str, String)]) -> ActionRun {
    let action = action();
    let mut inputs: BTreeMap<String, String> = action["inputs"]
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(name, input)| (name.clone(), input["default"].as_str().unwrap_or_default().to_string()))
        .collect();
    inputs.insert("binary".into(), crate::harness::cli_binary().display().to_string());
    for (name, value) in given {
        assert!(inputs.contains_key(*name), "no input {name}");
        inputs.insert(name.to_string(), value.clone());
    }
    let dir = tempfile::tempdir().expect("runner temp");
    let summary = dir.path().join("summary");
    let mut steps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut log = String::new();
    let mut code = 0;
    for (index, step) in action["runs"]["steps"].as_array().expect("steps").iter().enumerate() {
        if step.get("uses").is_some() {
            // Only the build cache, and only when no binary is given.
            assert_eq!(step["if"], "${{ inputs.binary == '' }}", "{step}");
            continue;
        }
        assert_eq!(step["shell"], "bash", "{step}");
        assert!(step.get("if").is_none(), "every script step runs: {step}");
        let output = dir.path().join(format!("output-{index}"));
        let script = dir.path().join(format!("step-{index}.sh"));
        let run = step["run"].as_str().expect("run");
        assert!(!run.contains("${{"), "inputs reach the script through env only: {run}");
        std::fs::write(&script, run).expect("script");
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&script)
            .env_remove("POST_PROVISION_TEST_HOOK")
            .env("RUST_LOG", "warn")
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env("GITHUB_RUN_ID", &world.run_id)
            .env("GITHUB_RUN_ATTEMPT", "1")
            .env("RUNNER_TEMP", dir.path());
        for (name, value) in step["env"].as_object().into_iter().flatten() {
            command.env(name, evaluate(value.as_str().expect("env string"), &inputs, &steps));
        }
        let result = command.output().expect("bash");
        log.push_str(&String::from_utf8_lossy(&result.stdout));
        log.push_str(&String::from_utf8_lossy(&result.stderr));
        let written = std::fs::read_to_string(&output).unwrap_or_default();
        if let Some(id) = step["id"].as_str() {
            steps.insert(id.to_string(), parse_github_file(&written));
        }
        code = result.status.code().expect("exited");
        if code != 0 {
            break;
        }
    }
    let outputs = action["outputs"]
        .as_object()
        .expect("outputs")
        .iter()
        .map(|(name, output)| (name.clone(), evaluate(output["value"].as_str().expect("value"), &inputs, &steps)))
        .collect();
    ActionRun { code, outputs, log, summary: std::fs::read_to_string(&summary).unwrap_or_default() }
}

#[tokio::test]
async fn the_action_commits_rolls_back_and_resumes_a_run() {
    let mut world = World::new("action").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    // A spec given as JSON text: the run commits.
    let run =
        use_action(&world, &[("table", world.table.clone()), ("spec", world.spec_json("success", 0).to_string())]);
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(run.outputs["outcome"], "committed", "{:?}", run.outputs);
    assert_eq!(run.outputs["exit-code"], "0");
    assert_eq!(run.outputs["run-id"], world.run_id);
    let ids: Vec<String> = serde_json::from_str(&run.outputs["instance-ids"]).expect("json");
    assert_eq!(ids, vec![world.selected[0].id.clone()]);
    assert!(run.summary.contains("committed"), "{}", run.summary);
    // resume with the default run id (GITHUB_RUN_ID) reports the finished run again.
    let resume = use_action(&world, &[("table", world.table.clone()), ("mode", "resume".into())]);
    assert_eq!((resume.code, resume.outputs["outcome"].as_str()), (0, "committed"), "{}", resume.log);

    // A spec file with a shortfall: the step fails with 1, and the outputs say why.
    let mut other = World::new("action-rollback").await;
    other.seed(&[Seed::claimed("small")], &[]).await;
    let file = tempfile::NamedTempFile::new().expect("spec file");
    std::fs::write(file.path(), other.spec_json("failed", 1).to_string()).expect("write");
    let rollback =
        use_action(&other, &[("table", other.table.clone()), ("spec-file", file.path().display().to_string())]);
    assert_eq!(rollback.code, 1, "{}", rollback.log);
    assert_eq!(rollback.outputs["outcome"], "rolled-back");
    assert!(rollback.log.lines().any(|l| l.starts_with("::error title=post-provision::run ")), "{}", rollback.log);
}

#[tokio::test]
async fn the_action_refuses_bad_input_without_running_it_as_shell() {
    let world = World::new("action-bad").await;
    // Shell and workflow-command text in the spec stays data: exit 65, no command of its own.
    let mut spec = json!({"runId": "$(touch /tmp/pwned)\n::warning title=pwn::INJECTED"});
    spec["x"] = json!("`id`");
    let run = use_action(&world, &[("table", world.table.clone()), ("spec", spec.to_string())]);
    assert_eq!(run.code, 65, "{}", run.log);
    assert_eq!(run.outputs["outcome"], "error");
    assert_eq!(run.outputs["exit-code"], "65");
    for line in run.log.lines() {
        let body = line.trim_start();
        assert!(!body.starts_with("::") || body.starts_with("::error title=post-provision::"), "{line}");
    }
    let neither = use_action(&world, &[("table", world.table.clone())]);
    assert_eq!(neither.code, 64, "{}", neither.log);
    let wrong = use_action(&world, &[("table", world.table.clone()), ("mode", "commit".into())]);
    assert_eq!(wrong.code, 64, "{}", wrong.log);
}
