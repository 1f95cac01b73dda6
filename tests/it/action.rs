//! `action.yml` run as the GitHub runner would run its composite steps, locally against moto:
//! each `shell: bash` step's script under `bash --noprofile --norc -eo pipefail`, its `env`
//! evaluated from the inputs and earlier steps' outputs, its `if` from their outcomes, in a
//! simulated GitHub environment (`GITHUB_OUTPUT` per step, `GITHUB_STEP_SUMMARY`,
//! `GITHUB_RUN_ID`, `GITHUB_RUN_ATTEMPT`, `RUNNER_TEMP`, `RUNNER_OS`, `RUNNER_ARCH`,
//! `GITHUB_SERVER_URL`). A step whose environment the kernel refuses (over 128 KiB in one
//! variable) fails without starting, as on a runner. The `uses:` cache step only runs when
//! building from source, which no test here does. The binary is the test build's: given through
//! the `binary` input, or served as a release asset by [`ReleaseServer`] on loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::github::parse_github_file;
use crate::harness::{Seed, World};

/// The repository and ref the action is used at in these tests (`github.action_repository`,
/// `github.action_ref`).
const ACTION_REPOSITORY: &str = "pool-owner/post-provision";
const ACTION_REF: &str = "v9.9.9";

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

/// A loopback HTTP server that serves a GitHub release's assets at
/// `/<repository>/releases/download/<tag>/<file>`, as `GITHUB_SERVER_URL` would, and records
/// the paths asked for.
struct ReleaseServer {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ReleaseServer {
    /// Serves `files` (name → bytes) as the assets of release [`ACTION_REF`]. The thread ends
    /// with the test process.
    fn start(files: BTreeMap<String, Vec<u8>>) -> ReleaseServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let prefix = format!("/{ACTION_REPOSITORY}/releases/download/{ACTION_REF}/");
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = String::new();
                let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
                // The request line, then headers up to the blank line (bounded: 100 lines).
                for _ in 0..100 {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock().expect("lock").push(path.clone());
                let body = path.strip_prefix(&prefix).and_then(|name| files.get(name));
                let (status, body) = match body {
                    Some(body) => ("200 OK", body.as_slice()),
                    None => ("404 Not Found", b"not found".as_slice()),
                };
                let header =
                    format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(header.as_bytes()).and_then(|()| stream.write_all(body));
            }
        });
        ReleaseServer { url, requests }
    }

    fn requested(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

/// This machine's release asset name, as `scripts/release` names it.
fn asset_name() -> String {
    format!("post-provision-{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A release of the test build: the asset and a SHA256SUMS line for `checksum_of`'s bytes.
fn release_files(asset: Vec<u8>, checksum_of: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let sums = format!("{}  {}\n", sha256_hex(checksum_of), asset_name());
    BTreeMap::from([(asset_name(), asset), ("SHA256SUMS".to_string(), sums.into_bytes())])
}

/// What one use of the action did.
struct ActionRun {
    /// The exit code of the first step that failed, or 0.
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
        } else if expression == "github.action_ref" {
            ACTION_REF.to_string()
        } else if expression == "github.action_repository" {
            ACTION_REPOSITORY.to_string()
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

/// Evaluates a step's `if`: terms joined by `&&`, each `failure()` or `NAME == 'v'` /
/// `NAME != 'v'` with NAME an input, a step's output or a step's `outcome`. Without an `if`, a
/// step runs only while no earlier step failed (the runner's `success()`).
fn should_run(
    condition: Option<&str>,
    failed: bool,
    inputs: &BTreeMap<String, String>,
    steps: &BTreeMap<String, BTreeMap<String, String>>,
) -> bool {
    let Some(condition) = condition else { return !failed };
    let body = condition.trim().strip_prefix("${{").and_then(|c| c.strip_suffix("}}")).unwrap_or(condition);
    let mut checks_status = false;
    let mut result = true;
    for term in body.split("&&").map(str::trim) {
        if term == "failure()" {
            checks_status = true;
            result &= failed;
            continue;
        }
        let (name, expected, equal) = if let Some((name, value)) = term.split_once("==") {
            (name.trim(), value.trim(), true)
        } else if let Some((name, value)) = term.split_once("!=") {
            (name.trim(), value.trim(), false)
        } else {
            panic!("action.yml uses a condition this test does not evaluate: {term}")
        };
        let expected = expected.trim_matches('\'');
        let actual = match name.strip_suffix(".outcome").and_then(|n| n.strip_prefix("steps.")) {
            Some(step) => steps.get(step).and_then(|o| o.get("\0outcome")).cloned().unwrap_or_default(),
            None => evaluate(&format!("${{{{ {name} }}}}"), inputs, steps),
        };
        result &= (actual == expected) == equal;
    }
    // Like the runner: a condition without a status function means `success() && …`.
    result && (checks_status || !failed)
}

fn use_action(world: &World, given: &[(&str, String)]) -> ActionRun {
    let binary = crate::harness::cli_binary().display().to_string();
    use_action_from(world, &[&[("binary", binary)], given].concat(), None)
}

/// Uses the action with `given` inputs; with `release`, `GITHUB_SERVER_URL` is that server.
fn use_action_from(world: &World, given: &[(&str, String)], release: Option<&ReleaseServer>) -> ActionRun {
    let action = action();
    let mut inputs: BTreeMap<String, String> = action["inputs"]
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(name, input)| (name.clone(), input["default"].as_str().unwrap_or_default().to_string()))
        .collect();
    for (name, value) in given {
        assert!(inputs.contains_key(*name), "no input {name}");
        inputs.insert(name.to_string(), value.clone());
    }
    let dir = tempfile::tempdir().expect("runner temp");
    let summary = dir.path().join("summary");
    let mut steps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let (mut log, mut code) = (String::new(), 0);
    for (index, step) in action["runs"]["steps"].as_array().expect("steps").iter().enumerate() {
        if !should_run(step["if"].as_str(), code != 0, &inputs, &steps) {
            continue;
        }
        assert!(step.get("uses").is_none(), "only the build-from-source cache step uses an action: {step}");
        assert_eq!(step["shell"], "bash", "{step}");
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
            .env("GITHUB_SERVER_URL", release.map_or("https://github.invalid", |r| r.url.as_str()))
            .env("RUNNER_OS", "Linux")
            .env("RUNNER_ARCH", if std::env::consts::ARCH == "aarch64" { "ARM64" } else { "X64" })
            .env("RUNNER_TEMP", dir.path());
        for (name, value) in step["env"].as_object().into_iter().flatten() {
            command.env(name, evaluate(value.as_str().expect("env string"), &inputs, &steps));
        }
        let step_code = match command.output() {
            Ok(result) => {
                log.push_str(&String::from_utf8_lossy(&result.stdout));
                log.push_str(&String::from_utf8_lossy(&result.stderr));
                result.status.code().expect("exited")
            }
            // The kernel refused the environment (E2BIG): the step never started.
            Err(error) => {
                log.push_str(&format!("step {index} could not start: {error}\n"));
                1
            }
        };
        let written = std::fs::read_to_string(&output).unwrap_or_default();
        if let Some(id) = step["id"].as_str() {
            let mut outputs = parse_github_file(&written);
            let outcome = if step_code == 0 { "success" } else { "failure" };
            outputs.insert("\0outcome".into(), outcome.into());
            steps.insert(id.to_string(), outputs);
        }
        if code == 0 {
            code = step_code;
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

#[tokio::test]
async fn the_action_installs_the_release_binary_it_verified() {
    let mut world = World::new("action-release").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let binary = std::fs::read(crate::harness::cli_binary()).expect("the test build");
    let server = ReleaseServer::start(release_files(binary.clone(), &binary));
    let spec = world.spec_json("success", 0).to_string();
    let run = use_action_from(&world, &[("table", world.table.clone()), ("spec", spec)], Some(&server));
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(run.outputs["outcome"], "committed", "{:?}", run.outputs);
    let release = format!("/{ACTION_REPOSITORY}/releases/download/{ACTION_REF}");
    assert_eq!(server.requested(), vec![format!("{release}/SHA256SUMS"), format!("{release}/{}", asset_name())]);
}

#[tokio::test]
async fn the_action_refuses_a_release_asset_that_does_not_match_its_checksum() {
    let mut world = World::new("action-tampered").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let binary = std::fs::read(crate::harness::cli_binary()).expect("the test build");
    let mut tampered = binary.clone();
    tampered.extend_from_slice(b"\n# appended");
    let no_entry = BTreeMap::from([
        (asset_name(), binary.clone()),
        ("SHA256SUMS".to_string(), format!("{}  post-provision-other-target\n", sha256_hex(&binary)).into_bytes()),
    ]);
    let cases = [
        (release_files(tampered, &binary), "does not match its SHA-256"),
        (no_entry, "has no single SHA-256"),
        (BTreeMap::from([(asset_name(), binary.clone())]), "could not download SHA256SUMS"),
    ];
    for (files, problem) in cases {
        let server = ReleaseServer::start(files);
        let spec = world.spec_json("success", 0).to_string();
        let run = use_action_from(&world, &[("table", world.table.clone()), ("spec", spec)], Some(&server));
        assert_eq!(run.code, 1, "{}", run.log);
        assert!(
            run.log.lines().any(|l| l.starts_with("::error title=post-provision::") && l.contains(problem)),
            "{}",
            run.log
        );
        // Nothing ran: no outputs, and the claimed instance is as it was.
        assert_eq!(run.outputs["exit-code"], "", "{}", run.log);
        let record = world.record(&world.selected[0].id).await.expect("record");
        assert_eq!(record["state"].as_s().expect("state"), "claimed");
    }
}

#[tokio::test]
async fn a_run_id_input_never_becomes_a_flag() {
    let world = World::new("action-run-id").await;
    // `resume --all` would succeed with nothing to do; `resume -- --all` asks for a run of that id.
    let run =
        use_action(&world, &[("table", world.table.clone()), ("mode", "resume".into()), ("run-id", "--all".into())]);
    assert_ne!(run.code, 0, "{}", run.log);
    assert!(run.log.contains("--all"), "{}", run.log);
    assert!(!run.log.to_lowercase().contains("unfinished run"), "{}", run.log);
}

#[tokio::test]
async fn a_spec_input_over_the_environment_limit_says_to_use_spec_file() {
    let world = World::new("action-big-spec").await;
    // 140 KiB: over Linux's 128 KiB for one environment variable.
    let spec = json!({"runId": world.run_id, "padding": "x".repeat(140 * 1024)}).to_string();
    let run = use_action(&world, &[("table", world.table.clone()), ("spec", spec)]);
    assert_ne!(run.code, 0, "{}", run.log);
    assert!(
        run.log.lines().any(|l| l.starts_with("::error title=post-provision::") && l.contains("spec-file")),
        "{}",
        run.log
    );
    // A spec that fits is not explained away: its own error (65) is reported.
    let small = use_action(&world, &[("table", world.table.clone()), ("spec", json!({"runId": "x"}).to_string())]);
    assert_eq!(small.code, 65, "{}", small.log);
    assert!(!small.log.contains("did not start"), "{}", small.log);
}
