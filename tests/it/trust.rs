//! The spec and AWS are untrusted input (issue 13): text from either can never issue a workflow
//! command (no line of stdout, stderr, logs or the job summary starts with `::` unless it is one
//! of ours, its data escaped), never adds a step output, and a spec whose queue URLs disagree
//! with the pool's, or that is too large, is refused with 65 and nothing written. Permission and
//! credential failures exit 77 on one line; an unreachable endpoint during `init` is 69.

use std::path::Path;
use std::process::{Command, Output};

use post_provision::cli::{EXIT_INVALID_SPEC, EXIT_PERMISSION, EXIT_UNAVAILABLE, EXIT_USAGE};
use serde_json::{json, Value};

use crate::bad_input::world_state;
use crate::github::{parse_github_file, validate};
use crate::harness::{Owner, Seed, World};

/// A change that spoils a valid spec.
type Spoil = Box<dyn Fn(&mut Value)>;

/// What an attacker puts into a text field.
const INJECTION: &str = "x\n::warning title=pwn::INJECTED";

fn binary() -> Command {
    let mut command = Command::new(crate::harness::cli_binary());
    command.env_remove("POST_PROVISION_TEST_HOOK").env_remove("GITHUB_ACTIONS").env("RUST_LOG", "warn");
    command
}

/// A simulated GitHub Actions step: outputs and summary files, `GITHUB_ACTIONS=true`.
struct Step {
    dir: tempfile::TempDir,
}

impl Step {
    fn new() -> Step {
        Step { dir: tempfile::tempdir().expect("temp dir") }
    }

    fn command(&self) -> Command {
        let mut command = binary();
        command
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_OUTPUT", self.dir.path().join("output"))
            .env("GITHUB_STEP_SUMMARY", self.dir.path().join("summary"));
        command
    }

    fn spec_file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write spec");
        path
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

/// Every line of stdout, stderr and the job summary that the runner would take for a workflow
/// command and that is not one of ours (`::error title=post-provision::` or
/// `::warning title=post-provision::`, whose data is escaped). The runner skips leading
/// whitespace before `::`.
fn foreign_commands(output: &Output, summary: &str) -> Vec<String> {
    let texts =
        [String::from_utf8_lossy(&output.stdout).to_string(), String::from_utf8_lossy(&output.stderr).to_string()];
    let ours = ["::error title=post-provision::", "::warning title=post-provision::"];
    texts
        .iter()
        .chain(std::iter::once(&summary.to_string()))
        .flat_map(|text| text.split(['\n', '\r']).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let body = line.trim_start();
            (body.starts_with("::") && !ours.iter().any(|own| body.starts_with(own))) || body.contains("##[")
        })
        .collect()
}

fn context(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn spec_text_cannot_inject_workflow_commands() {
    let mut world = World::new("inject-spec").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
    let before = world_state(&world).await;
    let valid = world.spec_json("success", 1);
    let spoilers: Vec<(&str, Spoil)> = vec![
        ("usageClass", Box::new(|v| v["selection"]["instances"][0]["usageClass"] = json!(INJECTION))),
        ("resourceClass", Box::new(|v| v["creation"]["instances"][0]["resourceClass"] = json!(INJECTION))),
        ("instanceType", Box::new(|v| v["creation"]["instances"][0]["instanceType"] = json!(INJECTION))),
        ("runId", Box::new(|v| v["runId"] = json!(INJECTION))),
        ("id", Box::new(|v| v["selection"]["instances"][0]["id"] = json!(INJECTION))),
        ("unknown field name", Box::new(|v| v[INJECTION] = json!(1))),
        ("creation.state", Box::new(|v| v["creation"]["state"] = json!(INJECTION))),
        ("threshold", Box::new(|v| v["creation"]["instances"][0]["threshold"] = json!(INJECTION))),
        ("old-style command", Box::new(|v| v["creation"]["state"] = json!("##[warning]INJECTED"))),
    ];
    for (name, spoil) in spoilers {
        for format in ["text", "json"] {
            let step = Step::new();
            let mut spec = valid.clone();
            spoil(&mut spec);
            let file = step.spec_file("spec.json", &spec.to_string());
            let output = step
                .command()
                .env("RUST_LOG", "debug")
                .args(["--output", format, "--table", &world.table, "run", "--spec"])
                .arg(&file)
                .output()
                .expect("CLI");
            let context = format!("{name} ({format}): {}", context(&output));
            assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{context}");
            assert_eq!(foreign_commands(&output, &step.read("summary")), Vec::<String>::new(), "{context}");
            let outputs = parse_github_file(&step.read("output"));
            assert_eq!(
                outputs.keys().map(String::as_str).collect::<Vec<_>>(),
                ["exit-code", "instance-ids", "outcome", "run-id", "state"],
                "{context}"
            );
            assert_eq!(outputs["exit-code"], "65", "{context}");
        }
    }
    assert_eq!(world_state(&world).await, before, "nothing changed");
}

#[tokio::test]
async fn aws_data_cannot_inject_workflow_commands() {
    // Another run's id on an instance record comes from the table: the finding that names it
    // reaches the annotations, the job summary, the text report and the logs.
    let mut world = World::new("inject-aws").await;
    let intruder = Seed { class: "large", state: Some("claimed"), owner: Owner::Other(INJECTION), threshold_secs: 240 };
    world.seed(&[Seed::claimed("small"), intruder], &[]).await;
    let step = Step::new();
    let file = step.spec_file("spec.json", &world.spec_json("success", 0).to_string());
    let output = step
        .command()
        .env("RUST_LOG", "debug")
        .args(["--table", &world.table, "run", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI");
    let context = context(&output);
    assert_eq!(output.status.code(), Some(2), "cleanup, because another run owns an instance: {context}");
    let summary = step.read("summary");
    assert_eq!(foreign_commands(&output, &summary), Vec::<String>::new(), "{context}\nsummary: {summary}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.lines().any(|line| line.starts_with("::warning title=post-provision::instance ")
            && line.contains("x%0A::warning title=pwn::INJECTED")),
        "the finding is reported, escaped: {context}"
    );
    assert!(summary.contains("left alone (owned by run x ::warning title=pwn::INJECTED"), "{summary}");
    assert_eq!(parse_github_file(&step.read("output"))["outcome"], "cleaned-up");
}

#[tokio::test]
async fn a_run_id_argument_with_a_newline_injects_no_output() {
    let world = World::new("inject-resume").await;
    for args in [vec!["resume", "123\nfoo=bar"], vec!["status", "123\nfoo=bar"], vec!["resume", "123\n::warning::x"]] {
        let step = Step::new();
        let output = step.command().args(["--table", &world.table]).args(&args).output().expect("CLI");
        let context = format!("{args:?}: {}", context(&output));
        assert_eq!(output.status.code(), Some(EXIT_USAGE), "{context}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("invalid RUN_ID argument") && stderr.contains("A-Z a-z 0-9 . _ -"), "{context}");
        let raw = step.read("output");
        assert!(!parse_github_file(&raw).contains_key("foo"), "{context}\n{raw}");
        assert!(!raw.lines().any(|line| line.starts_with("foo")), "{context}\n{raw}");
        assert_eq!(foreign_commands(&output, ""), Vec::<String>::new(), "{context}");
    }
}

#[tokio::test]
async fn step_outputs_are_written_in_the_delimiter_form() {
    let mut world = World::new("outputs").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let step = Step::new();
    let file = step.spec_file("spec.json", &world.spec_json("success", 0).to_string());
    let output = step.command().args(["--table", &world.table, "run", "--spec"]).arg(&file).output().expect("CLI");
    assert_eq!(output.status.code(), Some(0), "{}", context(&output));
    let raw = step.read("output");
    let first = raw.lines().next().unwrap_or_default();
    assert!(first.starts_with("run-id<<ghadelimiter_"), "{raw}");
    let delimiters: std::collections::BTreeSet<&str> =
        raw.lines().filter_map(|line| line.split_once("<<").map(|(_, d)| d)).collect();
    assert_eq!(delimiters.len(), 1, "one random delimiter per write: {raw}");
    assert_eq!(parse_github_file(&raw)["run-id"], world.run_id);
}

/// A loopback "AWS" that answers every request with HTTP 400 and `code`, in the JSON protocol
/// DynamoDB speaks, with `message` (which may hold line breaks, as an attacker's would).
async fn refusing_endpoint(code: &'static str, message: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                // Read the head, then the body by its Content-Length, then answer and close.
                loop {
                    let Ok(read) = socket.read(&mut buffer).await else { return };
                    if read == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..read]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                            })
                            .unwrap_or(0usize);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let body = json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{code}"), "message": message})
                    .to_string();
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-RequestId: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{address}")
}

const DENIED: &str = "User: arn:aws:sts::123456789012:assumed-role/ci/runner is not authorized to perform: dynamodb:GetItem on resource: table/pool\n::warning title=pwn::INJECTED";

// Multi-threaded: the refusing endpoint serves on this runtime while the CLI runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_exits_77_with_one_line_naming_the_permission() {
    let world = World::new("denied").await;
    let endpoint = refusing_endpoint("AccessDeniedException", DENIED).await;
    let step = Step::new();
    let file = step.spec_file("spec.json", &world.spec_json("success", 0).to_string());
    for (args, format) in [
        (vec!["status".to_string(), "123".to_string()], "text"),
        (vec!["run".to_string(), "--spec".to_string(), file.display().to_string()], "text"),
        (vec!["list".to_string()], "json"),
        (vec!["resume".to_string(), "--all".to_string()], "text"),
    ] {
        let output = step
            .command()
            .env("RUST_LOG", "debug")
            .args(["--output", format, "--endpoint-url", &endpoint, "--region", "us-east-1", "--table", "pool"])
            .args(&args)
            .output()
            .expect("CLI");
        let context = format!("{args:?}: {}", context(&output));
        assert_eq!(output.status.code(), Some(EXIT_PERMISSION), "{context}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|line| line.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{context}");
        assert!(errors[0].contains("AccessDeniedException") && errors[0].contains("dynamodb:GetItem"), "{context}");
        assert_eq!(foreign_commands(&output, &step.read("summary")), Vec::<String>::new(), "{context}");
        if format == "json" {
            let report: Value = serde_json::from_slice(&output.stdout).expect("JSON error");
            assert_eq!(report["error"]["kind"], "permission", "{context}");
            validate("error.schema.json", &output.stdout);
        }
    }
}

/// The environment of a machine with no AWS credentials anywhere, talking to moto.
fn without_credentials(command: &mut Command, home: &Path) {
    // Empty files: the SDK warns about configured files that do not exist.
    for file in ["config", "credentials"] {
        std::fs::write(home.join(file), "").expect("empty AWS file");
    }
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        command.env_remove(name);
    }
    command
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-east-1");
}

#[tokio::test]
async fn missing_credentials_exit_77_on_one_line() {
    let world = World::new("nocreds").await;
    let home = tempfile::tempdir().expect("home");
    let step = Step::new();
    let file = step.spec_file("spec.json", &world.spec_json("success", 0).to_string());
    for args in
        [vec!["status".to_string(), "123".to_string()], vec!["run".into(), "--spec".into(), file.display().to_string()]]
    {
        let mut command = binary();
        without_credentials(&mut command, home.path());
        let output = command.args(["--table", &world.table]).args(&args).output().expect("CLI");
        let context = format!("{args:?}: {}", context(&output));
        assert_eq!(output.status.code(), Some(EXIT_PERMISSION), "{context}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {context}");
        assert!(
            lines[0].contains("no usable AWS credentials") && lines[0].contains("no credentials found"),
            "{context}"
        );
    }
}

#[tokio::test]
async fn init_against_an_unreachable_endpoint_is_69() {
    let output = binary()
        .args(["--endpoint-url", "http://127.0.0.1:9", "--region", "us-east-1", "--max-attempts", "1"])
        .args(["--connect-timeout-ms", "500", "--table", "pool", "init"])
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(EXIT_UNAVAILABLE), "{}", context(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("could not send the request"), "{}", context(&output));
}

#[tokio::test]
async fn a_specs_queue_url_that_disagrees_with_the_pool_is_refused_and_nothing_is_written() {
    let mut world = World::new("foreign-queue").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[]).await;
    let before = world_state(&world).await;
    let endpoint = crate::harness::endpoint();
    let own = |class: &str| world.queues[class].clone();
    let foreign = [
        // Another account's queue, and another queue of the same account, at the emulator.
        format!("{endpoint}/999999999999/{}-small", world.table),
        format!("{endpoint}/123456789012/elsewhere"),
    ];
    for url in &foreign {
        // A shortfall returns the instances to the queues the configuration names.
        let mut spec = world.spec_json("failed", 1);
        spec["resourceClassConfig"] = json!({
            "small": {"cpu": 1, "mmem": 2048, "queueUrl": url},
            "large": {"cpu": 2, "mmem": 4096, "queueUrl": own("large")},
        });
        let step = Step::new();
        let file = step.spec_file("spec.json", &spec.to_string());
        let output = binary()
            .args(["--output", "json", "--table", &world.table, "run", "--spec"])
            .arg(&file)
            .output()
            .expect("CLI");
        let context = format!("{url}: {}", context(&output));
        assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{context}");
        let report: Value = serde_json::from_slice(&output.stdout).expect("JSON error");
        assert_eq!(report["error"]["field"], "resourceClassConfig.small.queueUrl", "{context}");
        assert!(report["error"]["message"].as_str().unwrap_or("").contains(&own("small")), "{context}");
        assert_eq!(world_state(&world).await, before, "nothing written: {context}");
    }
    // The pool's own configuration, repeated in the spec, is accepted.
    let mut spec = world.spec_json("failed", 1);
    spec["resourceClassConfig"] = json!({
        "small": {"cpu": 1, "mmem": 2048, "queueUrl": own("small")},
        "large": {"cpu": 2, "mmem": 4096, "queueUrl": own("large")},
    });
    let step = Step::new();
    let file = step.spec_file("spec.json", &spec.to_string());
    let output = binary().args(["--table", &world.table, "run", "--spec"]).arg(&file).output().expect("CLI");
    assert_eq!(output.status.code(), Some(1), "rolled back to the pool's queues: {}", context(&output));
}

#[tokio::test]
async fn a_spec_over_the_size_limit_is_refused_unread_with_65() {
    let mut world = World::new("oversized").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let before = world_state(&world).await;
    let step = Step::new();
    // A valid spec padded with whitespace to one byte over the limit.
    let mut text = world.spec_json("success", 0).to_string();
    let limit = post_provision::spec::MAX_SPEC_FILE_BYTES as usize;
    text.push_str(&" ".repeat(limit + 1 - text.len()));
    let file = step.spec_file("spec.json", &text);
    let output = binary().args(["--table", &world.table, "run", "--spec"]).arg(&file).output().expect("CLI");
    let context = context(&output);
    assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{context}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("spec size limit of {limit} bytes")),
        "{context}"
    );
    // At the limit exactly, it is read.
    let file = step.spec_file("spec.json", &text[..limit]);
    let output = binary().args(["--table", &world.table, "validate", "--spec"]).arg(&file).output().expect("CLI");
    assert_eq!(output.status.code(), Some(0), "{}", self::context(&output));
    assert_eq!(world_state(&world).await, before, "nothing written");
}

#[test]
fn validate_checks_a_spec_without_aws() {
    let step = Step::new();
    let world_like = json!({
        "runId": "9876543210", "maxRuntimeMin": 30, "idleTimeSec": 300,
        "selection": {"numInstancesSelected": 1, "numInstancesRequired": 0,
                      "instances": [{"id": "i-0aaaaaaaaaaaaaaaa", "resourceClass": "large", "instanceType": "c6i.large",
                                     "cpu": 2, "mmem": 4096, "usageClass": "on-demand", "threshold": "2026-11-27T10:05:00Z"}]},
        "creation": {"state": "success", "numInstancesCreated": 0, "instances": []},
        "resourceClassConfig": {"large": {"cpu": 2, "mmem": 4096, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-large"}}
    });
    let good = step.spec_file("good.json", &world_like.to_string());
    let mut typo = world_like.clone();
    let config = typo.as_object_mut().unwrap().remove("resourceClassConfig").unwrap();
    typo["resourceClassConfg"] = config;
    let typo = step.spec_file("typo.json", &typo.to_string());
    let mut moto_url = world_like.clone();
    moto_url["resourceClassConfig"]["large"]["queueUrl"] = json!("http://127.0.0.1:5000/123456789012/pool-large");
    let moto_url = step.spec_file("moto.json", &moto_url.to_string());
    // No table, no credentials, an endpoint nobody answers: validate never needs them.
    let home = tempfile::tempdir().expect("home");
    let run = |format: &str, file: &Path, endpoint: Option<&str>| {
        let mut command = binary();
        without_credentials(&mut command, home.path());
        command.env_remove("POST_PROVISION_TABLE").env_remove("AWS_ENDPOINT_URL").env_remove("AWS_ENDPOINT_URL_SQS");
        if let Some(endpoint) = endpoint {
            command.args(["--endpoint-url", endpoint]);
        }
        command.args(["--output", format, "validate", "--spec"]).arg(file).output().expect("CLI")
    };
    let output = run("text", &good, Some("http://127.0.0.1:9"));
    assert_eq!(output.status.code(), Some(0), "{}", context(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("spec for run 9876543210 is valid: 1 instances"));
    let output = run("json", &good, None);
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!((report["valid"].as_bool(), report["instances"].as_u64()), (Some(true), Some(1)));
    let output = run("json", &typo, None);
    assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{}", context(&output));
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["error"]["field"], "resourceClassConfg");
    assert!(report["error"]["message"].as_str().unwrap_or("").contains("did you mean `resourceClassConfig`?"));
    // An emulator's queue URL is accepted only beside an emulator endpoint.
    let output = run("json", &moto_url, None);
    assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{}", context(&output));
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["error"]["field"], "resourceClassConfig.large.queueUrl");
    assert_eq!(run("json", &moto_url, Some("http://127.0.0.1:5000")).status.code(), Some(0));
}

#[test]
fn usage_errors_are_json_with_output_json() {
    for args in [
        vec!["--output", "json", "status"],
        vec!["--output=json", "frobnicate"],
        vec!["status", "--output", "json", "--nope"],
    ] {
        let output = binary().args(&args).output().expect("CLI");
        assert_eq!(output.status.code(), Some(EXIT_USAGE), "{args:?}: {}", context(&output));
        validate("error.schema.json", &output.stdout);
        let report: Value = serde_json::from_slice(&output.stdout).expect("json");
        assert_eq!(report["error"]["kind"], "usage");
        assert!(!report["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let output =
        binary().args(["--output", "json", "--lease-secs", "1", "--table", "t", "status", "1"]).output().expect("CLI");
    assert_eq!(output.status.code(), Some(EXIT_USAGE));
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    let message = report["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("--lease-secs") && message.contains("POST_PROVISION_LEASE_SECS"), "{message}");
}

#[test]
fn help_lists_a_subcommands_own_flags_first_and_ends_with_the_exit_codes() {
    let help = binary().arg("--help").output().expect("CLI");
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    let codes = text.find("Exit codes:").expect("exit codes in --help");
    for code in ["  0 ", "  3 ", "  64 ", "  65 ", "  69 ", "  77 ", "  78 "] {
        assert!(text[codes..].contains(code), "{code}: {text}");
    }
    assert!(text[codes..].contains("docs/schemas/spec.schema.json"), "{text}");
    let run = binary().args(["run", "--help"]).output().expect("CLI");
    let text = String::from_utf8_lossy(&run.stdout);
    let own = text.find("--spec <SPEC>").expect("--spec");
    let global = text.find("Global options:").expect("global heading");
    assert!(own < global && global < text.find("--max-attempts").expect("a global flag"), "{text}");
}

/// `docs/schemas/spec.schema.json` accepts every valid spec the tests use, and refuses what the
/// engine refuses for its shape.
#[tokio::test]
async fn the_spec_schema_matches_the_specs() {
    let mut world = World::new("schema").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
    let mut with_config = world.spec_json("failed", 1);
    with_config["resourceClassConfig"] = json!({"small": {"cpu": 1, "mmem": 2048, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-small"}});
    with_config["runAttempt"] = json!(2);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme.find("```json\n{\n  \"runId\"").expect("the README's spec") + "```json\n".len();
    let readme_spec: Value =
        serde_json::from_str(&readme[start..start + readme[start..].find("```").unwrap()]).expect("json");
    for spec in [world.spec_json("success", 1), world.spec_json("partial", 3), with_config, readme_spec] {
        post_provision::Spec::from_json(&spec.to_string()).expect("valid for the engine");
        validate("spec.schema.json", spec.to_string().as_bytes());
    }
    let refuse = |spec: &Value| {
        let python = std::env::var("POST_PROVISION_PYTHON").expect("POST_PROVISION_PYTHON");
        let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schemas/spec.schema.json");
        let status = Command::new(python)
            .args(["-c", "import json, sys, jsonschema; jsonschema.Draft202012Validator(json.load(open(sys.argv[1]))).validate(json.loads(sys.argv[2]))"])
            .arg(schema)
            .arg(spec.to_string())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("python");
        assert!(!status.success(), "the schema accepts {spec}");
        assert!(post_provision::Spec::from_json(&spec.to_string()).is_err(), "the engine accepts {spec}");
    };
    let valid = world.spec_json("success", 1);
    let spoilers: Vec<Spoil> = vec![
        Box::new(|v| v["resourceClassConfg"] = json!({})),
        Box::new(|v| v["selection"]["instances"][0]["extra"] = json!(1)),
        Box::new(|v| v["runId"] = json!("run#1")),
        Box::new(|v| v["creation"]["state"] = json!("maybe")),
        Box::new(|v| v["selection"]["instances"][0]["usageClass"] = json!("reserved")),
        Box::new(|v| v["selection"]["instances"][0]["id"] = json!("i-XYZ")),
        Box::new(|v| v["selection"]["instances"][0]["threshold"] = json!("2026-11-27 10:05:00")),
        Box::new(|v| v["maxRuntimeMin"] = json!(0)),
        Box::new(|v| v["runAttempt"] = json!(0)),
        Box::new(|v| v["creation"]["instances"][0]["instanceType"] = json!("x".repeat(65))),
        Box::new(
            |v| v["resourceClassConfig"] = json!({"small": {"cpu": 0, "mmem": 2048, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/q"}}),
        ),
        Box::new(|v| {
            v["resourceClassConfig"] =
                json!({"small": {"cpu": 1, "mmem": 2048, "queueUrl": "https://evil.example/123456789012/q"}})
        }),
    ];
    for spoil in spoilers {
        let mut spec = valid.clone();
        spoil(&mut spec);
        refuse(&spec);
    }
}
