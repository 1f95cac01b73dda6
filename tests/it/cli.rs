//! The CLI as a subprocess: exit codes, resume after a crash, two drivers at once, and a bounded
//! SIGKILL soak.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use rand::{Rng, SeedableRng};

use crate::harness::{Owner, Seed, World};

const CLAIMED_SMALL: Seed = Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 };
const CLAIMED_LARGE: Seed = Seed { class: "large", state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 };
const EXPIRED_LARGE: Seed = Seed { class: "large", state: Some("claimed"), owner: Owner::Own, threshold_secs: -60 };
const CREATED_RUNNING: Seed = Seed { class: "large", state: Some("running"), owner: Owner::Own, threshold_secs: 600 };

fn binary() -> Command {
    let mut command = Command::new(crate::harness::cli_binary());
    command.env("RUST_LOG", "info").env_remove("POST_PROVISION_TEST_HOOK").env_remove("GITHUB_ACTIONS");
    command
}

struct Cli<'a> {
    world: &'a World,
    spec_file: tempfile::NamedTempFile,
}

impl<'a> Cli<'a> {
    fn new(world: &'a World, spec: &serde_json::Value) -> Cli<'a> {
        let spec_file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(spec_file.path(), spec.to_string()).expect("write spec");
        Cli { world, spec_file }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = binary();
        command.arg("--table").arg(&self.world.table).args(args);
        command
    }

    fn run_args(&self) -> Vec<String> {
        vec!["run".into(), "--spec".into(), self.spec_file.path().display().to_string()]
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run the CLI")
    }

    fn run(&self, extra_env: &[(&str, &str)]) -> Output {
        let args = self.run_args();
        let mut command = self.command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command.output().expect("run the CLI")
    }

    fn spawn_run(&self, extra_env: &[(&str, &str)]) -> Child {
        let args = self.run_args();
        let mut command = self.command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn the CLI")
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited normally")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[tokio::test]
async fn exit_codes_status_and_repeated_runs() {
    let mut world = World::new("cli-codes").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    let cli = Cli::new(&world, &world.spec_json("success", 0));

    let missing = cli.output(&["resume", "no-such-run"]);
    assert_eq!(code(&missing), 66, "{}", stderr(&missing));
    assert!(stderr(&missing).contains("no such run: no-such-run"));
    assert_eq!(code(&cli.output(&["status", "no-such-run"])), 66);

    let first = cli.run(&[]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let again = cli.run(&[]);
    assert_eq!(code(&again), 0, "a finished run reports its outcome again");
    assert_eq!(code(&cli.output(&["resume", &world.run_id])), 0);

    let status = cli.output(&["--output", "json", "status", &world.run_id]);
    assert_eq!(code(&status), 0);
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json status");
    assert_eq!(report["state"], "Done");
    assert_eq!(report["outcome"], "committed");
    assert_eq!(report["path"], serde_json::json!(["Reconciling", "Committing", "Done"]));

    let text = String::from_utf8_lossy(&cli.output(&["status", &world.run_id]).stdout).to_string();
    assert!(text.contains("path: Reconciling -> Committing -> Done"), "{text}");

    let other = Cli::new(&world, &world.spec_json("failed", 0));
    let mismatch = other.run(&[]);
    assert_eq!(code(&mismatch), 65);
    assert!(stderr(&mismatch).contains("already exists with a different spec"));

    let usage = cli.output(&["frobnicate"]);
    assert_eq!(code(&usage), 64);
    let table = binary().args(["table", "--format", "mermaid"]).output().expect("table");
    assert_eq!(code(&table), 0);
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("stateDiagram-v2"));
}

#[tokio::test]
async fn a_crashed_run_is_listed_refused_while_leased_and_finished_by_resume() {
    let mut world = World::new("cli-crash").await;
    world.seed(&[CLAIMED_SMALL, CLAIMED_LARGE], &[]).await;
    let cli = Cli::new(&world, &world.spec_json("failed", 2));
    // Dies right after writing RollingBack: the lease (30 s) is still held by the dead driver.
    let crashed = cli.run(&[("POST_PROVISION_TEST_HOOK", "crash-after=2")]);
    assert_eq!(code(&crashed), 3, "{}", stderr(&crashed));
    assert!(stderr(&crashed).contains("post-provision resume"), "{}", stderr(&crashed));

    let listed = cli.output(&["list", "--unfinished"]);
    let listing = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listing.contains(&world.run_id) && listing.contains("RollingBack"), "{listing}");

    let busy = cli.output(&["resume", &world.run_id]);
    assert_eq!(code(&busy), 3);
    assert!(
        stderr(&busy).contains("is being driven by pid") && stderr(&busy).contains("lease ends"),
        "{}",
        stderr(&busy)
    );

    // The operator knows the driver is dead (its pod is gone) and forces the take-over.
    let resumed = cli.output(&["resume", "--force", &world.run_id]);
    assert_eq!(code(&resumed), 1, "{}", stderr(&resumed));
    let listed = cli.output(&["--output", "json", "list", "--unfinished"]);
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json list");
    assert_eq!(rows, serde_json::json!([]));
    let picture = world
        .picture(
            world.run_start(&world.engine(crate::harness::TestClock::at(world.start), Default::default()).await).await,
            true,
        )
        .await;
    assert_eq!(
        picture,
        "sel0: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         sel1: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         queue large: [sel1@start+300s]\n\
         queue small: [sel0@start+300s]"
    );
}

#[tokio::test]
async fn two_drivers_started_at_once_one_drives_the_other_exits_3() {
    let mut world = World::new("cli-two").await;
    world.seed(&[CLAIMED_SMALL, CLAIMED_LARGE], &[CREATED_RUNNING]).await;
    let cli = Cli::new(&world, &world.spec_json("success", 1));
    // The first driver holds the run after creating its record until it gets SIGUSR1.
    // Staged, so the first driver is between its state and its effects when it pauses.
    let mut first = cli.spawn_run(&[
        ("POST_PROVISION_TEST_HOOK", "pause-after=2"),
        ("POST_PROVISION_ONE_TRANSACTION_MAX_INSTANCES", "0"),
    ]);
    let mut lines = BufReader::new(first.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("read stderr");
        let paused = line.contains("test hook: paused");
        seen.push(line);
        if paused {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("test hook: paused")), "{seen:?}");
    let second = cli.run(&[]);
    assert_eq!(code(&second), 3, "{}", stderr(&second));
    assert!(stderr(&second).contains("is being driven by pid"), "{}", stderr(&second));
    let pid = first.id().to_string();
    assert!(Command::new("kill").args(["-USR1", &pid]).status().expect("kill").success());
    let status = first.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let picture = world.picture(world.start, true).await;
    assert!(picture.lines().take(3).all(|l| l.contains("record running runId=\"RUN\"")), "{picture}");
}

/// Kills `run` with SIGKILL after a random number of its log lines (a seeded RNG: reproducible),
/// resumes with `resume --force` (or `run` again when no record was written), and compares the
/// world with an uninterrupted run of the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run() {
    const ITERATIONS: usize = 9;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261127);
    // (path, selected, created, creation status, required instances, exit code)
    type Path<'a> = (&'a str, &'a [Seed], &'a [Seed], &'a str, usize, i32);
    let paths: [Path; 3] = [
        ("commit", &[CLAIMED_SMALL, CLAIMED_LARGE], &[CREATED_RUNNING], "success", 1, 0),
        ("rollback", &[CLAIMED_SMALL, CLAIMED_LARGE], &[CREATED_RUNNING], "partial", 2, 1),
        ("cleanup", &[CLAIMED_SMALL, EXPIRED_LARGE], &[CREATED_RUNNING], "success", 1, 2),
    ];
    let mut references = Vec::new();
    for (name, selected, created, state, required, exit) in paths {
        let mut world = World::new(&format!("kill-ref-{name}")).await;
        world.seed(selected, created).await;
        let cli = Cli::new(&world, &world.spec_json(state, required));
        let output = cli.run(&[]);
        assert_eq!(code(&output), exit, "{name}: {}", stderr(&output));
        let engine = world.engine(crate::harness::TestClock::at(world.start), Default::default()).await;
        references.push(world.picture(world.run_start(&engine).await, true).await);
    }
    let mut killed = 0;
    for iteration in 0..ITERATIONS {
        let path = iteration % paths.len();
        let (name, selected, created, state, required, exit) = paths[path];
        let kill_after_lines: usize = rng.random_range(0..10);
        let mut world = World::new(&format!("kill-{name}-{iteration}")).await;
        world.seed(selected, created).await;
        let cli = Cli::new(&world, &world.spec_json(state, required));
        let mut child = cli.spawn_run(&[]);
        let stderr_pipe = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr_pipe).lines();
        let mut count = 0;
        let mut was_killed = false;
        if kill_after_lines == 0 {
            child.kill().expect("kill");
            was_killed = true;
        } else {
            while let Some(Ok(_)) = lines.next() {
                count += 1;
                if count == kill_after_lines {
                    was_killed = child.kill().is_ok();
                    break;
                }
            }
        }
        let status = child.wait().expect("wait");
        if was_killed && status.code().is_none() {
            killed += 1;
        }
        let resumed = cli.output(&["resume", "--force", &world.run_id]);
        let final_code = match code(&resumed) {
            66 => code(&cli.run(&[])),
            other => other,
        };
        assert_eq!(final_code, exit, "{name} killed after {kill_after_lines} lines: {}", stderr(&resumed));
        let engine = world.engine(crate::harness::TestClock::at(world.start), Default::default()).await;
        let picture = world.picture(world.run_start(&engine).await, true).await;
        assert_eq!(picture, references[path], "{name} killed after {kill_after_lines} log lines");
    }
    println!("sigkill soak: {ITERATIONS} runs, {killed} killed mid-run, all resumed to the reference world");
    assert!(killed >= ITERATIONS / 3, "too few runs were actually killed mid-run ({killed})");
}

/// `resume --all` exits 3 only when every run it left unfinished can be resumed later; a run that
/// can never be resumed as it is (here its stored spec is gone) needs a person: 70.
#[tokio::test]
async fn resume_all_tells_runs_that_can_never_be_resumed_from_resumable_ones() {
    let mut world = World::new("cli-resume-all").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    // A rollback that dies after its first write (the record with its releases) is unfinished.
    let cli = Cli::new(&world, &world.spec_json("failed", 1));
    let crashed = cli.run(&[("POST_PROVISION_TEST_HOOK", "crash-after=1")]);
    assert_eq!(crashed.status.code(), Some(3), "{}", String::from_utf8_lossy(&crashed.stderr));
    let dynamodb = &world.clients.dynamodb;
    // The crashed driver's lease ends.
    dynamodb
        .update_item()
        .table_name(&world.table)
        .key("PK", aws_sdk_dynamodb::types::AttributeValue::S("TYPE#RUN".into()))
        .key("SK", aws_sdk_dynamodb::types::AttributeValue::S(format!("ID#{}", world.run_id)))
        .update_expression("SET #lease.#expiresAt = :past")
        .expression_attribute_names("#lease", "lease")
        .expression_attribute_names("#expiresAt", "expiresAt")
        .expression_attribute_values(":past", aws_sdk_dynamodb::types::AttributeValue::S("2000-01-01T00:00:00Z".into()))
        .send()
        .await
        .expect("expire the lease");
    // Its stored spec is lost.
    let chunks = dynamodb
        .query()
        .table_name(&world.table)
        .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
        .expression_attribute_values(":pk", aws_sdk_dynamodb::types::AttributeValue::S("TYPE#RUNSPEC".into()))
        .expression_attribute_values(
            ":prefix",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("ID#{}#", world.run_id)),
        )
        .send()
        .await
        .expect("query spec chunks");
    assert!(!chunks.items().is_empty(), "the run stored its spec");
    for item in chunks.items() {
        dynamodb
            .delete_item()
            .table_name(&world.table)
            .key("PK", item["PK"].clone())
            .key("SK", item["SK"].clone())
            .send()
            .await
            .expect("delete a spec chunk");
    }
    let output = cli.output(&["resume", "--all"]);
    assert_eq!(
        output.status.code(),
        Some(70),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
