//! Faults: the real SDK clients talk to moto through `scripts/fault_proxy.py`, which throttles,
//! fails, delays and drops requests (and withholds SQS batch entries). A run under faults must end
//! as the same run ends without them: same terminal state, same world. A run the faults stop is
//! left resumable, and resuming it finishes it. Every case has a fixed seed so a failure
//! reproduces.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use post_provision::cli::{classify_drive_error, EXIT_RESUMABLE};
use post_provision::config::{Limits, OnRetriesExhausted};
use post_provision::driver::{DriveError, Hooks, TraceEvent};
use post_provision::machine::State;
use post_provision::ports::{AwsError, Compute, ErrorClass, OutgoingMessage, PoolQueues, RunStore, StoreError};
use post_provision::{Engine, OutcomeKind, RunOutcome, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{endpoint, staged_limits, test_limits, Seed, TestClock, World};

/// `scripts/fault_proxy.py` in front of moto, as a child process that is killed when dropped.
pub struct FaultProxy {
    child: Child,
    port: u16,
}

impl FaultProxy {
    /// Starts the proxy with `args` (`--rate`, `--faults`, `--seed`, ...) and waits for its
    /// `LISTENING <port>` line.
    pub fn start(args: &[&str]) -> FaultProxy {
        let python = std::env::var("POST_PROVISION_PYTHON")
            .expect("POST_PROVISION_PYTHON is not set: run the tests with scripts/test");
        let script = std::env::var("POST_PROVISION_FAULT_PROXY")
            .expect("POST_PROVISION_FAULT_PROXY is not set: run the tests with scripts/test");
        // The proxy logs every injected fault on stderr; FAULT_PROXY_VERBOSE=1 shows it.
        let stderr = if std::env::var_os("FAULT_PROXY_VERBOSE").is_some() { Stdio::inherit() } else { Stdio::null() };
        let mut child = Command::new(python)
            .arg(script)
            .args(["--upstream", &endpoint(), "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the fault proxy");
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line);
        let port = line.strip_prefix("LISTENING ").and_then(|port| port.trim().parse().ok());
        match (read, port) {
            (Ok(_), Some(port)) => FaultProxy { child, port },
            (read, _) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the fault proxy did not start (first line {line:?}, {read:?})");
            }
        }
    }

    /// The endpoint to give the engine.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn control(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect to the proxy");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send to the proxy");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read the proxy's answer");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {response}");
        serde_json::from_str(body).expect("a JSON answer")
    }

    /// Changes settings at runtime (`rate`, `faults`, `only`, `budget`, `skip`, ...).
    pub async fn configure(&self, config: serde_json::Value) {
        self.control("POST", "/__proxy/config", &config.to_string()).await;
    }

    /// Requests and faults so far.
    pub async fn stats(&self) -> serde_json::Value {
        self.control("GET", "/__proxy/stats", "").await
    }

    /// Zeroes the counters.
    pub async fn reset(&self) {
        self.control("POST", "/__proxy/reset", "").await;
    }

    /// Waits until no request is in flight: a `slow` request whose client gave up is still
    /// forwarded later, and a test must not look at the world before it landed.
    pub async fn wait_idle(&self) {
        let answer = self.control("GET", "/__proxy/wait_idle?timeout_ms=10000", "").await;
        assert_eq!(answer["idle"], true, "requests still in flight after 10 s: {answer}");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(stats: &serde_json::Value, group: &str, key: &str) -> u64 {
    stats[group][key].as_u64().unwrap_or(0)
}

fn total(stats: &serde_json::Value, group: &str) -> u64 {
    stats[group].as_object().map(|map| map.values().filter_map(|v| v.as_u64()).sum()).unwrap_or(0)
}

/// Retries enough that a run converges at 30 % faults.
/// The staged path (state, then effects) even for these small runs: the tests below aim faults
/// at its calls by their order. `fast_path_converges_*` covers the one-transaction path.
fn fault_limits() -> Limits {
    Limits { max_attempts: 8, ..staged_limits() }
}

/// The three paths, seeded exactly as in `paths.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Commit,
    Rollback,
    CleanupExpiredClaim,
}

impl Scenario {
    async fn world(self, name: &str) -> (World, Spec) {
        let mut world = World::new(name).await;
        let spec = match self {
            Scenario::Commit => {
                world
                    .seed(
                        &[Seed::claimed("small"), Seed::claimed("large")],
                        &[Seed::created("running"), Seed::created("created")],
                    )
                    .await;
                world.spec("success", 2)
            }
            Scenario::Rollback => {
                world
                    .seed(
                        &[Seed::claimed("small"), Seed::claimed("large")],
                        &[Seed::created("running"), Seed::created("created")],
                    )
                    .await;
                world.spec("partial", 3)
            }
            Scenario::CleanupExpiredClaim => {
                let expired = Seed { threshold_secs: -60, ..Seed::claimed("large") };
                world.seed(&[Seed::claimed("small"), expired], &[Seed::created("running")]).await;
                world.spec("success", 1)
            }
        };
        (world, spec)
    }

    fn outcome(self) -> OutcomeKind {
        match self {
            Scenario::Commit => OutcomeKind::Committed,
            Scenario::Rollback => OutcomeKind::RolledBack,
            Scenario::CleanupExpiredClaim => OutcomeKind::CleanedUp,
        }
    }

    /// The state a run of this scenario is in once its record is written.
    fn first_state(self) -> State {
        match self {
            Scenario::Commit | Scenario::CleanupExpiredClaim => State::Committing,
            Scenario::Rollback => State::RollingBack,
        }
    }
}

/// The same scenario without faults, in its own world: its outcome and picture.
async fn clean_run(scenario: Scenario) -> (OutcomeKind, String) {
    let (world, spec) = scenario.world("clean").await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(spec).await.expect("a run without faults finishes");
    assert_eq!(outcome.kind, scenario.outcome());
    (outcome.kind, world.picture(world.start, true).await)
}

/// Drives a run until it finishes, as an operator would: a run left resumable (exit 3) is resumed
/// once its driver's lease has lapsed; a start that wrote nothing because AWS was unavailable is
/// started again. Returns the outcome and every error met on the way.
async fn drive_to_the_end(
    engine: &Engine,
    clock: &TestClock,
    proxy: &FaultProxy,
    spec: &Spec,
    first: Result<RunOutcome, DriveError>,
) -> (RunOutcome, Vec<String>) {
    const MAX_RESUMES: usize = 6;
    let lease_secs = engine_lease_secs();
    let mut interruptions = Vec::new();
    let mut result = first;
    loop {
        let error = match result {
            Ok(outcome) => return (outcome, interruptions),
            Err(error) => error,
        };
        interruptions.push(error.to_string());
        assert!(
            interruptions.len() <= MAX_RESUMES,
            "not finished after {MAX_RESUMES} resumes; stats {}; errors: {interruptions:#?}",
            proxy.stats().await
        );
        proxy.wait_idle().await;
        result = match &error {
            DriveError::NotStarted(aws) if aws.class.is_retryable() => engine.start(spec.clone()).await,
            DriveError::Store(StoreError::Aws(aws)) if aws.class.is_retryable() => engine.resume(&spec.run_id).await,
            other if classify_drive_error(other).0 == EXIT_RESUMABLE => {
                // The stopped driver's lease must lapse before another driver may take the run.
                clock.advance(lease_secs + 1);
                engine.resume(&spec.run_id).await
            }
            other => {
                panic!("a run under transient faults must finish or stay resumable, not {other:?}")
            }
        };
    }
}

fn engine_lease_secs() -> i64 {
    fault_limits().lease_secs
}

/// One fault case: the scenario through the proxy, compared with the same scenario without it.
async fn assert_converges(scenario: Scenario, rate: &str, seed: u64, attempt_timeout: Option<Duration>) {
    assert_converges_with(scenario, rate, seed, attempt_timeout, fault_limits()).await;
}

async fn assert_converges_with(
    scenario: Scenario,
    rate: &str,
    seed: u64,
    attempt_timeout: Option<Duration>,
    base_limits: Limits,
) {
    let seed_text = seed.to_string();
    // Serialized forwarding: a timed-out attempt that lands late must not overlap its retry
    // inside moto, whose transactions are not isolated (AWS's are).
    let proxy = FaultProxy::start(&["--rate", rate, "--seed", &seed_text, "--slow-ms", "1500", "--serialize-upstream"]);
    let limits = Limits { attempt_timeout: attempt_timeout.unwrap_or(base_limits.attempt_timeout), ..base_limits };
    let faulted = async {
        let (world, spec) = scenario.world("faults").await;
        let clock = TestClock::at(world.start);
        let engine = world.engine_with(clock.clone(), Hooks::default(), limits, Some(proxy.url())).await;
        let first = engine.start(spec.clone()).await;
        let (outcome, interruptions) = drive_to_the_end(&engine, &clock, &proxy, &spec, first).await;
        proxy.wait_idle().await;
        (outcome, interruptions, world.picture(world.start, true).await)
    };
    let ((outcome, interruptions, picture), (clean_kind, clean_picture)) = tokio::join!(faulted, clean_run(scenario));
    let stats = proxy.stats().await;
    let context = format!(
        "{scenario:?} at rate {rate}, seed {seed}; interruptions {interruptions:#?}; error {:?}; proxy {stats}",
        outcome.record.error
    );
    assert_eq!(outcome.kind, clean_kind, "{context}");
    assert_eq!(picture, clean_picture, "{context}");
    assert!(total(&stats, "faults") > 0, "no fault was injected: {context}");
    if attempt_timeout.is_some() {
        assert!(count(&stats, "faults", "slow") > 0, "no slow request, so no timeout: {context}");
    }
}

// Far below the slow fault, far above what moto takes under the load of the whole suite, so
// only injected slowness times out.
const TIMEOUT_BELOW_SLOW: Option<Duration> = Some(Duration::from_millis(1_000));

#[tokio::test]
async fn commit_converges_at_10_percent_faults() {
    assert_converges(Scenario::Commit, "0.1", 114, None).await;
}

/// Small runs take the one-transaction path by default: it converges under faults too.
#[tokio::test]
async fn the_one_transaction_path_converges_at_50_percent_faults() {
    let limits = Limits { max_attempts: 8, ..test_limits() };
    assert_converges_with(Scenario::Commit, "0.5", 11, None, limits.clone()).await;
    assert_converges_with(Scenario::Rollback, "0.5", 12, None, limits).await;
}

#[tokio::test]
async fn commit_converges_at_30_percent_faults_with_attempt_timeouts() {
    assert_converges(Scenario::Commit, "0.3", 206, TIMEOUT_BELOW_SLOW).await;
}

#[tokio::test]
async fn rollback_converges_at_10_percent_faults_with_attempt_timeouts() {
    assert_converges(Scenario::Rollback, "0.1", 300, TIMEOUT_BELOW_SLOW).await;
}

#[tokio::test]
async fn rollback_converges_at_30_percent_faults() {
    assert_converges(Scenario::Rollback, "0.3", 402, None).await;
}

#[tokio::test]
async fn cleanup_of_an_expired_claim_converges_at_10_percent_faults() {
    assert_converges(Scenario::CleanupExpiredClaim, "0.1", 106, None).await;
}

#[tokio::test]
async fn cleanup_of_an_expired_claim_converges_at_30_percent_faults_with_attempt_timeouts() {
    assert_converges(Scenario::CleanupExpiredClaim, "0.3", 215, TIMEOUT_BELOW_SLOW).await;
}

/// Every request fails from the driver's write number `outage_after_writes` on: the run stops
/// resumable in `stalled_in`, and a resume without faults finishes it exactly as a clean run ends.
async fn assert_full_outage_leaves_the_run_resumable(scenario: Scenario, outage_after_writes: u64, stalled_in: State) {
    // AWS unreachable: every request fails without reaching it (no `drop_after`, whose request
    // lands). With the default policy the step's error then sends the run towards emergency
    // cleanup, and that write fails too: the run stays where it was.
    let proxy = FaultProxy::start(&["--rate", "0", "--seed", "7", "--faults", "throttle,error500,drop_before"]);
    let (world, spec) = scenario.world("outage").await;
    let clock = TestClock::at(world.start);
    let paused = Arc::new(tokio::sync::Notify::new());
    let resume = Arc::new(tokio::sync::Notify::new());
    let hooks =
        Hooks { pause_after_writes: Some((outage_after_writes, paused.clone(), resume.clone())), ..Hooks::default() };
    let limits = fault_limits();
    let engine = world.engine_with(clock.clone(), hooks, limits.clone(), Some(proxy.url())).await;
    let outage = async {
        paused.notified().await;
        proxy.reset().await;
        proxy.configure(serde_json::json!({"rate": 1.0})).await;
        resume.notify_one();
    };
    let (result, ()) = tokio::join!(engine.start(spec.clone()), outage);
    match &result {
        Err(DriveError::Stalled { state, .. }) => assert_eq!(*state, stalled_in),
        other => panic!("expected the run to stall in {stalled_in}, got {other:?}"),
    }
    assert_eq!(classify_drive_error(result.as_ref().unwrap_err()).0, EXIT_RESUMABLE);
    // The SDK retried the failing call up to its attempt limit, no further.
    let stats = proxy.stats().await;
    let attempts: Vec<u64> =
        stats["requests"].as_object().expect("requests").values().filter_map(|v| v.as_u64()).collect();
    assert!(
        attempts.iter().all(|&n| n == u64::from(limits.max_attempts)),
        "every call tried {} times: {stats}",
        limits.max_attempts
    );
    assert!(!attempts.is_empty(), "{stats}");

    let direct = world.engine(clock.clone(), Hooks::default()).await;
    let record = direct.status(&spec.run_id).await.expect("status").expect("the record exists");
    assert_eq!(record.state, stalled_in, "the record stays where it was");
    assert!(!record.state.is_terminal());

    proxy.configure(serde_json::json!({"rate": 0.0})).await;
    proxy.wait_idle().await;
    clock.advance(limits.lease_secs + 1);
    let resumer = world.engine_with(clock.clone(), Hooks::default(), limits, Some(proxy.url())).await;
    let outcome = resumer.resume(&spec.run_id).await.expect("a resume without faults finishes");
    assert_eq!(outcome.kind, scenario.outcome());
    let picture = world.picture(world.start, true).await;
    let (_, clean_picture) = clean_run(scenario).await;
    assert_eq!(picture, clean_picture);
}

#[tokio::test]
async fn a_full_outage_during_commit_leaves_the_run_resumable() {
    // Write 1 creates the run record (with its spec).
    assert_full_outage_leaves_the_run_resumable(Scenario::Commit, 1, State::Committing).await;
}

#[tokio::test]
async fn a_full_outage_during_rollback_leaves_the_run_resumable() {
    assert_full_outage_leaves_the_run_resumable(Scenario::Rollback, 1, State::RollingBack).await;
}

#[tokio::test]
async fn a_full_outage_during_emergency_cleanup_leaves_the_run_resumable() {
    // Write 1 creates the record, writes 2 and 3 are the commit's two transaction rounds, write
    // 4 enters EmergencyCleanup.
    assert_full_outage_leaves_the_run_resumable(Scenario::CleanupExpiredClaim, 4, State::EmergencyCleanup).await;
}

/// With `--on-retries-exhausted stall`: one operation fails on every attempt of one call, then
/// AWS recovers. The retry budget is spent, but the operator chose not to terminate a healthy
/// fleet for an outage: the run stops resumable, and a resume finishes it as a clean run ends.
async fn assert_outage_of_one_call_stalls(scenario: Scenario, operation: &str, skip: u32, faults: &str) {
    // No throttle budget beyond the SDK's own retries: one call throttled past them stalls.
    let limits = Limits {
        on_retries_exhausted: OnRetriesExhausted::Stall,
        throttle_budget: std::time::Duration::ZERO,
        ..fault_limits()
    };
    let budget = limits.max_attempts.to_string();
    let skip = skip.to_string();
    let proxy = FaultProxy::start(&[
        "--rate", "1", "--only", operation, "--faults", faults, "--budget", &budget, "--skip", &skip,
    ]);
    let (world, spec) = scenario.world("onecall").await;
    let clock = TestClock::at(world.start);
    let engine = world.engine_with(clock.clone(), Hooks::default(), limits.clone(), Some(proxy.url())).await;
    let first = engine.start(spec.clone()).await;
    match &first {
        Err(DriveError::Stalled { state, error, .. }) => {
            assert_eq!(*state, scenario.first_state());
            assert!(error.contains(operation.split('.').nth(1).expect("Service.Operation")), "{error}");
        }
        other => panic!(
            "expected a stall in {} after {operation} failed {budget} times, got {other:?}",
            scenario.first_state()
        ),
    }
    assert_eq!(
        count(&proxy.stats().await, "faults_by_op", &format!("{operation}:{faults}")),
        u64::from(limits.max_attempts)
    );
    let (outcome, _) = drive_to_the_end(&engine, &clock, &proxy, &spec, first).await;
    assert_eq!(outcome.kind, scenario.outcome());
    proxy.wait_idle().await;
    let picture = world.picture(world.start, true).await;
    let (_, clean_picture) = clean_run(scenario).await;
    assert_eq!(picture, clean_picture);
}

#[tokio::test]
async fn a_commit_transaction_throttled_beyond_its_retries_stalls_instead_of_cleaning_up() {
    // The first transaction creates the run record; the second is the commit.
    assert_outage_of_one_call_stalls(Scenario::Commit, "DynamoDB.TransactWriteItems", 1, "throttle").await;
}

#[tokio::test]
async fn a_release_transaction_failing_beyond_its_retries_stalls_instead_of_cleaning_up() {
    // The first transaction creates the run record; the second releases the instances.
    assert_outage_of_one_call_stalls(Scenario::Rollback, "DynamoDB.TransactWriteItems", 1, "error500").await;
}

#[tokio::test]
async fn pool_messages_throttled_beyond_their_retries_stall_the_rollback() {
    assert_outage_of_one_call_stalls(Scenario::Rollback, "SQS.SendMessageBatch", 0, "throttle").await;
}

#[tokio::test]
async fn an_unreadable_pool_configuration_writes_nothing_when_told_to_stall() {
    let limits = Limits { on_retries_exhausted: OnRetriesExhausted::Stall, ..fault_limits() };
    let budget = limits.max_attempts.to_string();
    // The only GetItem of a new run reads the pool's configuration, which a shortfall needs: it
    // fails on every attempt.
    let proxy =
        FaultProxy::start(&["--rate", "1", "--only", "DynamoDB.GetItem", "--faults", "throttle", "--budget", &budget]);
    let (world, spec) = Scenario::Rollback.world("noconfig").await;
    let clock = TestClock::at(world.start);
    let engine = world.engine_with(clock.clone(), Hooks::default(), limits.clone(), Some(proxy.url())).await;
    let before = world.picture(world.start, false).await;
    let first = engine.start(spec.clone()).await;
    match &first {
        Err(error @ DriveError::NotStarted(aws)) => {
            assert_eq!(aws.class, ErrorClass::Throttling, "{error}");
            assert_eq!(classify_drive_error(error).0, post_provision::cli::EXIT_UNAVAILABLE);
        }
        other => panic!("expected nothing to be written, got {other:?}"),
    }
    assert!(engine.status(&spec.run_id).await.expect("status").is_none(), "no run record");
    assert_eq!(world.picture(world.start, false).await, before, "nothing changed");
    let (outcome, _) = drive_to_the_end(&engine, &clock, &proxy, &spec, first).await;
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let (_, clean_picture) = clean_run(Scenario::Rollback).await;
    assert_eq!(world.picture(world.start, true).await, clean_picture);
}

/// SQS reports some entries of a batch as `Failed` on an HTTP 200: they are sent again, never
/// dropped, and each instance ends with exactly one message in its queue.
#[tokio::test]
async fn failed_batch_entries_are_retried_never_dropped() {
    // Three batches in a row lose one entry each (the proxy really withholds it from moto).
    let proxy = FaultProxy::start(&["--rate", "1", "--faults", "sqs_partial", "--budget", "3", "--seed", "5"]);
    let (world, spec) = Scenario::Rollback.world("partial").await;
    let clock = TestClock::at(world.start);
    let engine = world.engine_with(clock, Hooks::default(), fault_limits(), Some(proxy.url())).await;
    let outcome = engine.start(spec).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let stats = proxy.stats().await;
    assert_eq!(count(&stats, "faults", "sqs_partial"), 3, "{stats}");
    let sends = outcome.trace.iter().filter(|event| matches!(event, TraceEvent::SendMessages { .. })).count();
    assert!(sends >= 4, "the withheld entries were sent again: {sends} batches sent; {stats}");
    let mut sent = outcome.record.messages_sent.clone();
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), 3, "{sent:?}");
    // No duplicates here: a withheld entry never reached the queue, so exactly one copy each.
    let picture = world.picture(world.start, false).await;
    let (_, clean_picture) = clean_run(Scenario::Rollback).await;
    assert_eq!(picture, clean_picture);
}

/// Entries that keep failing past the batch rounds stop the run resumable; a resume sends them.
#[tokio::test]
async fn batch_entries_failing_every_round_stall_the_rollback_and_a_resume_sends_them() {
    let proxy = FaultProxy::start(&["--rate", "1", "--faults", "sqs_partial", "--seed", "6"]);
    let (world, spec) = Scenario::Rollback.world("partial").await;
    let clock = TestClock::at(world.start);
    let limits = Limits { on_retries_exhausted: OnRetriesExhausted::Stall, ..fault_limits() };
    let engine = world.engine_with(clock.clone(), Hooks::default(), limits.clone(), Some(proxy.url())).await;
    let first = engine.start(spec.clone()).await;
    match &first {
        Err(DriveError::Stalled { state, error, .. }) => {
            assert_eq!(*state, State::RollingBack);
            assert!(error.contains("InternalError"), "{error}");
        }
        other => panic!("expected a stall in RollingBack, got {other:?}"),
    }
    proxy.configure(serde_json::json!({"rate": 0.0})).await;
    let (outcome, _) = drive_to_the_end(&engine, &clock, &proxy, &spec, first).await;
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let picture = world.picture(world.start, true).await;
    let (_, clean_picture) = clean_run(Scenario::Rollback).await;
    assert_eq!(picture, clean_picture);
}

/// TerminateInstances fails as a whole for one unknown id: cleanup still terminates the others
/// (the pool-tag check tells the unknown id apart first, so it is not even sent).
#[tokio::test]
async fn cleanup_terminates_every_known_instance_when_one_id_is_unknown_to_ec2() {
    let (world, spec) = Scenario::CleanupExpiredClaim.world("unknown").await;
    let unknown = "i-0123456789abcdef0";
    world.put_record(unknown, "large", "claimed", &world.run_id, world.start.plus_secs(240)).await;
    let mut spec_json = serde_json::to_value(&spec).expect("spec json");
    let mut entry = spec_json["selection"]["instances"][0].clone();
    entry["id"] = unknown.into();
    spec_json["selection"]["instances"].as_array_mut().expect("instances").push(entry);
    spec_json["selection"]["numInstancesSelected"] = 3.into();
    let spec = Spec::from_json(&spec_json.to_string()).expect("valid spec");
    let clock = TestClock::at(world.start);
    let engine = world.engine(clock.clone(), Hooks::default()).await;
    // EC2 does not know it: it may be a fresh instance that eventual consistency hides, so the
    // run keeps its record (marked terminated) and stalls, resumable, after terminating the rest.
    match engine.start(spec.clone()).await {
        Err(DriveError::Stalled { state: State::EmergencyCleanup, error, .. }) => {
            assert!(error.contains("does not know 1 instance"), "{error}")
        }
        other => panic!("expected the cleanup to wait for EC2, got {other:?}"),
    }
    let record = world.record(unknown).await.expect("its record is kept meanwhile");
    assert_eq!(record["state"].as_s().unwrap(), "terminated");
    let mid_picture = world.picture(world.start, false).await;
    assert_eq!(mid_picture.matches("no record; ec2 terminated").count(), 3, "the rest went: {mid_picture}");
    // Long after its mark, an instance EC2 still does not know is gone: the resume finishes.
    clock.advance(post_provision::run::retire::UNKNOWN_INSTANCE_GRACE_SECS + 1);
    let outcome = engine.resume(&spec.run_id).await.expect("resume");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    assert!(world.record(unknown).await.is_none(), "its record was deleted once it was surely gone");
    let terminated: Vec<String> = outcome
        .trace
        .iter()
        .filter_map(|event| match event {
            TraceEvent::Terminate { ids } => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let checked: Vec<String> = outcome
        .trace
        .iter()
        .filter_map(|event| match event {
            TraceEvent::CheckPool { ids } => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    // EC2 does not know it: the pool check finds that, and nothing is asked to terminate it.
    assert!(checked.iter().any(|id| id == unknown), "the unknown id was checked: {checked:?}");
    assert!(!terminated.iter().any(|id| id == unknown), "and not sent to TerminateInstances: {terminated:?}");
    // Their records are gone now: only the created one, tagged with this run's id, is terminated
    // again (a no-op); the selected ones were launched by another run, so without a record they
    // are left alone (issue 18), terminated already by the first driver.
    assert_eq!(terminated, vec![world.created[0].id.clone()], "{terminated:?}");
    assert_eq!(
        world.picture(world.start, false).await,
        "sel0: record no record; ec2 terminated\n\
         sel1: record no record; ec2 terminated\n\
         cre0: record no record; ec2 terminated\n\
         queue large: []\n\
         queue small: []"
    );
}

/// What the proxy injects is classified by its code, and the SDK really retries it: the proxy
/// sees every attempt.
#[tokio::test]
async fn injected_faults_are_classified_by_code_and_retried_by_the_sdk() {
    let mut world = World::new("classify").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let instance = world.selected[0].id.clone();
    let queue_url = world.queues["small"].clone();
    let proxy = FaultProxy::start(&["--rate", "1", "--seed", "9", "--slow-ms", "400"]);
    let limits = Limits { max_attempts: 3, attempt_timeout: Duration::from_millis(150), ..test_limits() };
    let engine =
        world.engine_with(TestClock::at(world.start), Hooks::default(), limits.clone(), Some(proxy.url())).await;
    let ports = engine.ports();
    let message = OutgoingMessage { instance_id: instance.clone(), body: "{}".into() };

    // (fault, per service: (operation, the error code it answers, the class it must get))
    type Answer<'a> = (&'a str, Option<&'a str>, ErrorClass);
    let cases: [(&str, [Answer; 3]); 4] = [
        (
            "throttle",
            [
                ("DynamoDB.GetItem", Some("ThrottlingException"), ErrorClass::Throttling),
                ("SQS.SendMessageBatch", Some("RequestThrottled"), ErrorClass::Throttling),
                ("EC2.TerminateInstances", Some("RequestLimitExceeded"), ErrorClass::Throttling),
            ],
        ),
        (
            "error500",
            [
                ("DynamoDB.GetItem", Some("InternalServerError"), ErrorClass::Transient),
                ("SQS.SendMessageBatch", Some("InternalError"), ErrorClass::Transient),
                ("EC2.TerminateInstances", Some("InternalError"), ErrorClass::Transient),
            ],
        ),
        (
            "drop_before",
            [
                ("DynamoDB.GetItem", None, ErrorClass::Transient),
                ("SQS.SendMessageBatch", None, ErrorClass::Transient),
                ("EC2.TerminateInstances", None, ErrorClass::Transient),
            ],
        ),
        (
            "slow",
            [
                ("DynamoDB.GetItem", None, ErrorClass::Transient),
                ("SQS.SendMessageBatch", None, ErrorClass::Transient),
                ("EC2.TerminateInstances", None, ErrorClass::Transient),
            ],
        ),
    ];
    for (fault, expectations) in cases {
        proxy.wait_idle().await;
        proxy.configure(serde_json::json!({"faults": fault})).await;
        proxy.reset().await;
        let errors: [AwsError; 3] = [
            match ports.load_run("no-such-run", 1).await {
                Err(StoreError::Aws(error)) => error,
                other => panic!("{fault}: expected an AWS error from GetItem, got {other:?}"),
            },
            ports.send(&queue_url, std::slice::from_ref(&message)).await.expect_err("SendMessageBatch fails"),
            ports.terminate(std::slice::from_ref(&instance)).await.expect_err("TerminateInstances fails"),
        ];
        let stats = proxy.stats().await;
        for ((operation, code, class), error) in expectations.iter().zip(&errors) {
            assert_eq!(error.code.as_deref(), *code, "{fault} on {operation}: {error}");
            assert_eq!(error.class, *class, "{fault} on {operation}: {error}");
            assert!(error.class.is_retryable());
            assert_eq!(
                count(&stats, "requests", operation),
                u64::from(limits.max_attempts),
                "{fault} on {operation}: the SDK retried up to its limit; {stats}"
            );
        }
        // A slow request is forwarded after its client gave up, as AWS may still act on a request
        // that timed out; the other kinds never reach moto.
        if fault != "slow" {
            proxy.wait_idle().await;
            assert_eq!(world.ec2_state(&instance).await, "running", "{fault}: no attempt got through");
        }
    }
}

/// The SDK's retry quota (a token bucket) is process-wide per service and region by default. An
/// engine whose calls keep failing must not use up the retries of another engine in the process.
#[tokio::test]
async fn one_engines_spent_retry_quota_leaves_another_engines_retries_alone() {
    let world = World::new("quota").await;
    let clock = TestClock::at(world.start);
    let storm = FaultProxy::start(&["--rate", "1", "--faults", "throttle"]);
    let stormy = world.engine_with(clock.clone(), Hooks::default(), fault_limits(), Some(storm.url())).await;
    for _ in 0..40 {
        assert!(stormy.ports().load_run("no-such-run", 1).await.is_err());
    }
    let stats = storm.stats().await;
    assert!(
        count(&stats, "requests", "DynamoDB.GetItem") < 40 * u64::from(fault_limits().max_attempts),
        "the stormy engine ran out of retry quota: {stats}"
    );
    let blip = FaultProxy::start(&["--rate", "1", "--faults", "throttle", "--budget", "1"]);
    let calm = world.engine_with(clock, Hooks::default(), fault_limits(), Some(blip.url())).await;
    let loaded = calm.ports().load_run("no-such-run", 1).await;
    assert!(matches!(loaded, Ok(None)), "one throttle is retried: {loaded:?}; {}", blip.stats().await);
    assert_eq!(count(&blip.stats().await, "requests", "DynamoDB.GetItem"), 2);
}

/// The default, as the design says: a step whose retries are spent on 5xx has an unexpected
/// error, and the run goes to emergency cleanup (the original error is kept and reported).
/// Throttling never does: see `interplay::throttling_*`.
#[tokio::test]
async fn by_default_a_commit_failing_beyond_its_retries_goes_to_emergency_cleanup() {
    let limits = fault_limits();
    let budget = limits.max_attempts.to_string();
    // The first transaction creates the run record; the second, the commit, fails every attempt.
    let proxy = FaultProxy::start(&[
        "--rate",
        "1",
        "--only",
        "DynamoDB.TransactWriteItems",
        "--faults",
        "error500",
        "--budget",
        &budget,
        "--skip",
        "1",
    ]);
    let (world, spec) = Scenario::Commit.world("exhausted").await;
    let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits, Some(proxy.url())).await;
    let outcome = engine.start(spec).await.expect("the run finishes");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let error = outcome.record.error.expect("error");
    assert!(
        error.message.contains("InternalServerError") && error.message.contains("retries exhausted"),
        "{}",
        error.message
    );
    let picture = world.picture(world.start, true).await;
    assert!(
        picture
            .lines()
            .filter(|l| l.starts_with("sel") || l.starts_with("cre"))
            .all(|l| l.contains("no record; ec2 terminated")),
        "{picture}"
    );
}

#[tokio::test]
async fn by_default_an_unreadable_pool_configuration_is_an_unexpected_error_in_reconciling() {
    let limits = fault_limits();
    let budget = limits.max_attempts.to_string();
    let proxy =
        FaultProxy::start(&["--rate", "1", "--only", "DynamoDB.GetItem", "--faults", "error500", "--budget", &budget]);
    let (world, spec) = Scenario::Rollback.world("noconfig-default").await;
    let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits, Some(proxy.url())).await;
    let outcome = engine.start(spec).await.expect("the run finishes");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let path: Vec<State> = outcome.record.history.iter().map(|h| h.state).collect();
    assert_eq!(path, vec![State::Reconciling, State::EmergencyCleanup, State::Failed]);
    assert!(outcome.record.error.expect("error").message.contains("could not read the pool configuration"));
}
