//! The pool's other actors, crashes and load, interleaved with a run: each test here reproduces
//! one interplay that broke the "nothing stranded, leaked or taken" promise (issue 9), against
//! moto, with faults injected by `scripts/fault_proxy.py`.

use std::sync::Arc;
use std::time::Duration;

use post_provision::cli::{classify_drive_error, EXIT_RESUMABLE};
use post_provision::config::{Limits, OnRetriesExhausted};
use post_provision::driver::{DriveError, Hooks};
use post_provision::machine::State;
use post_provision::OutcomeKind;

use crate::faults::FaultProxy;
use crate::harness::{staged_limits, test_limits, Owner, Seed, TestClock, World};

fn faults(stats: &serde_json::Value, key: &str) -> u64 {
    stats["faults_by_op"][key].as_u64().unwrap_or(0)
}

/// The commit landed, the driver died before `Done`, the job ran, release returned every
/// instance to the pool and another run claimed one of them. A sweeper's late resume must see
/// that the pool has moved on: it finishes the run as committed and touches nothing.
#[tokio::test]
async fn a_late_resume_after_release_leaves_the_pool_and_other_runs_alone() {
    let mut world = World::new("lateresume").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running"), Seed::created("running")]).await;
    let clock = TestClock::at(world.start);
    let spec = world.spec("success", 2);
    // Staged (as runs too large for one transaction are): write 1 creates the run record, write 2
    // is the commit transaction.
    let hooks = Hooks { crash_after_writes: Some(2), ..Hooks::default() };
    let crashing = world.engine_with(clock.clone(), hooks, staged_limits(), None).await;
    assert!(matches!(crashing.start(spec.clone()).await, Err(DriveError::Crashed { .. })));
    assert!(world.picture(world.start, false).await.contains("running runId=\"RUN\""), "the commit landed");
    // The job ran; release put everything back in the pool, and selection claimed one for another run.
    clock.advance(600);
    let idle = world.start.plus_secs(900);
    for seeded in world.selected.iter().chain(&world.created) {
        world.put_record(&seeded.id, &seeded.class, "idle", "", idle).await;
    }
    let taken = &world.created[0];
    world.put_record(&taken.id, &taken.class, "claimed", "other-run", world.start.plus_secs(900)).await;
    let before = world.picture(world.start, false).await;

    let outcome = world.engine(clock, Hooks::default()).await.resume(&spec.run_id).await.expect("resume");
    assert_eq!(outcome.kind, OutcomeKind::Committed, "{:?}", outcome.record.history);
    assert_eq!(world.picture(world.start, false).await, before, "the late resume changed nothing");
    assert!(outcome.record.history.last().expect("history").reason.contains("handed on"));
}

/// The spec names an instance that this run never held (another run's): emergency cleanup
/// follows, and it terminates only what this run holds, created instances included.
#[tokio::test]
async fn cleanup_never_touches_a_created_instance_that_another_run_holds() {
    let mut world = World::new("createdother").await;
    world
        .seed(
            &[Seed::claimed("small")],
            &[Seed::created("running"), Seed { owner: Owner::Other("other-run"), ..Seed::created("running") }],
        )
        .await;
    let clock = TestClock::at(world.start);
    let outcome =
        world.engine(clock, Hooks::default()).await.start(world.spec("success", 2)).await.expect("the run finishes");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let picture = world.picture(world.start, false).await;
    assert!(picture.contains("cre1: record running runId=\"other-run\" threshold=seeded; ec2 running"), "{picture}");
    assert!(picture.contains("cre0: record no record; ec2 terminated"), "{picture}");
}

/// Staged, so that the faults aimed past the first transaction hit the commit's own.
fn throttle_limits(budget: Duration) -> Limits {
    Limits { throttle_budget: budget, ..staged_limits() }
}

/// DynamoDB cancels the commit's transaction for load (`ProvisionedThroughputExceeded`,
/// `ThrottlingError` per item) three times: the items are re-sent and the run commits.
#[tokio::test]
async fn throttled_transaction_items_are_resent_and_the_run_commits() {
    let proxy = FaultProxy::start(&[
        "--rate",
        "1",
        "--only",
        "DynamoDB.TransactWriteItems",
        "--faults",
        "txn_throttle",
        "--skip",
        "1",
        "--budget",
        "3",
    ]);
    let mut world = World::new("txnthrottle").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[Seed::created("running")]).await;
    let engine = world
        .engine_with(
            TestClock::at(world.start),
            Hooks::default(),
            throttle_limits(Duration::from_secs(20)),
            Some(proxy.url()),
        )
        .await;
    let outcome = engine.start(world.spec("success", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::Committed, "{:?}", outcome.record.error);
    assert_eq!(faults(&proxy.stats().await, "DynamoDB.TransactWriteItems:txn_throttle"), 3);
    let picture = world.picture(world.start, false).await;
    assert_eq!(picture.matches("record running runId=\"RUN\" threshold=start+1800s; ec2 running").count(), 3);
}

/// DynamoDB throttles the items of the run's first transaction, the one that creates its
/// record, for 4 s (well within the 20 s throttle budget). The create is sent again like every
/// other write, and the run commits, on the one-transaction path and on the staged path.
#[tokio::test]
async fn a_create_throttled_for_four_seconds_is_resent_and_the_run_commits() {
    let one_transaction = Limits { throttle_budget: Duration::from_secs(20), ..test_limits() };
    for (path, limits) in [("one-transaction", one_transaction), ("staged", throttle_limits(Duration::from_secs(20)))] {
        let proxy = FaultProxy::start(&[
            "--rate",
            "1",
            "--only",
            "DynamoDB.TransactWriteItems",
            "--faults",
            "txn_throttle",
            "--window-ms",
            "4000",
        ]);
        let mut world = World::new("createthrottle").await;
        world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
        let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits, Some(proxy.url())).await;
        let outcome = engine.start(world.spec("success", 1)).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(outcome.kind, OutcomeKind::Committed, "{path}: {:?}", outcome.record.error);
        let throttled = faults(&proxy.stats().await, "DynamoDB.TransactWriteItems:txn_throttle");
        assert!(throttled >= 2, "{path}: the create was throttled {throttled} times");
        let picture = world.picture(world.start, false).await;
        assert_eq!(picture.matches("record running runId=\"RUN\"").count(), 2, "{path}: {picture}");
    }
}

/// Throttling of the creating transaction that outlasts the budget stops the run with exit 3
/// and nothing written; the same `run` later commits.
#[tokio::test]
async fn a_create_throttled_past_the_budget_writes_nothing_and_exits_3() {
    for (path, limits) in [
        ("one-transaction", Limits { throttle_budget: Duration::from_millis(300), ..test_limits() }),
        ("staged", throttle_limits(Duration::from_millis(300))),
    ] {
        let proxy =
            FaultProxy::start(&["--rate", "1", "--only", "DynamoDB.TransactWriteItems", "--faults", "txn_throttle"]);
        let mut world = World::new("createstall").await;
        world.seed(&[Seed::claimed("small")], &[]).await;
        let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits, Some(proxy.url())).await;
        let before = world.picture(world.start, false).await;
        let spec = world.spec("success", 0);
        match engine.start(spec.clone()).await {
            Err(error @ DriveError::NotStarted(_)) => {
                assert_eq!(classify_drive_error(&error).0, EXIT_RESUMABLE, "{path}: {error}");
            }
            other => panic!("{path}: expected nothing written, got {other:?}"),
        }
        assert!(engine.status(&spec.run_id).await.expect("status").is_none(), "{path}: no run record");
        assert_eq!(world.picture(world.start, false).await, before, "{path}: nothing changed");
        proxy.configure(serde_json::json!({"rate": 0})).await;
        proxy.wait_idle().await;
        assert_eq!(engine.start(spec).await.expect("run again").kind, OutcomeKind::Committed, "{path}");
    }
}

/// Throttling that outlasts the throttle budget, per item or per request, stops the run
/// resumable (exit 3) with its fleet intact, even under the default `--on-retries-exhausted
/// clean-up`; a resume once the load is gone commits.
#[tokio::test]
async fn throttling_past_the_budget_stalls_and_never_cleans_up() {
    for kind in ["txn_throttle", "throttle"] {
        let proxy = FaultProxy::start(&[
            "--rate",
            "1",
            "--only",
            "DynamoDB.TransactWriteItems",
            "--faults",
            kind,
            "--skip",
            "1",
        ]);
        let mut world = World::new("throttlestall").await;
        world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
        let clock = TestClock::at(world.start);
        let limits = Limits { max_attempts: 2, ..throttle_limits(Duration::from_millis(300)) };
        assert_eq!(limits.on_retries_exhausted, OnRetriesExhausted::CleanUp);
        let engine = world.engine_with(clock.clone(), Hooks::default(), limits, Some(proxy.url())).await;
        let before = world.picture(world.start, false).await;
        let spec = world.spec("success", 1);
        match engine.start(spec.clone()).await {
            Err(error @ DriveError::Stalled { state: State::Committing, .. }) => {
                assert_eq!(classify_drive_error(&error).0, EXIT_RESUMABLE);
                assert!(error.to_string().contains("throttle"), "{error}");
            }
            other => panic!("{kind}: expected a stall in Committing, got {other:?}"),
        }
        assert_eq!(world.picture(world.start, false).await, before, "{kind}: nothing terminated or moved");
        proxy.configure(serde_json::json!({"rate": 0})).await;
        proxy.wait_idle().await;
        // The stopped driver gave its lease back: the resume is not refused.
        let outcome = engine.resume(&spec.run_id).await.expect("resume");
        assert_eq!(outcome.kind, OutcomeKind::Committed);
    }
}

/// The re-run's selection claims another instance, under the same run id, and hands over a spec
/// of attempt 2 naming it alone: the instance, the spec as JSON, the spec.
async fn second_attempt(world: &mut World) -> (String, serde_json::Value, post_provision::Spec) {
    let second_claim = world.launch("large").await;
    world.put_record(&second_claim, "large", "claimed", &world.run_id.clone(), world.start.plus_secs(240)).await;
    let mut second_json = world.spec_json("success", 0);
    second_json["runAttempt"] = 2.into();
    second_json["selection"]["instances"][0]["id"] = second_claim.clone().into();
    second_json["selection"]["instances"][0]["resourceClass"] = "large".into();
    second_json["selection"]["instances"][0]["instanceType"] = "c6i.large".into();
    second_json["selection"]["instances"][0]["cpu"] = 2.into();
    second_json["selection"]["instances"][0]["mmem"] = 4096.into();
    second_json["creation"] = serde_json::json!({"state": "success", "numInstancesCreated": 0, "instances": []});
    let second = post_provision::Spec::from_json(&second_json.to_string()).expect("valid");
    (second_claim, second_json, second)
}

/// A driver of attempt 1 that read the attempts before attempt 2's record landed (the re-run race
/// the simulation found at seed 16543) is refused by the store from then on: its fence names
/// attempt 2, whose record must not exist. One that knows of attempt 2 writes on (and leaves
/// attempt 2's instances alone: `Driver::attempts_in_order`).
#[tokio::test]
async fn a_later_attempts_record_fences_a_driver_of_an_earlier_attempt_that_never_read_it() {
    use post_provision::core::WriteResult;
    use post_provision::ports::{Fence, InstanceStore};
    let mut world = World::new("unknownattempt").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
    let clock = TestClock::at(world.start);
    let first = world.spec("success", 1);
    world.crash_after_create(clock.clone(), first.clone()).await;
    let engine = world.engine(clock.clone(), Hooks::default()).await;
    let read = engine.status_attempt(&world.run_id, Some(1)).await.expect("status").expect("record");
    let commits = post_provision::run::commit::transitions(&first, read.commit_threshold.expect("committing"));
    // Attempt 2's record lands; its driver waits for attempt 1's lease.
    let (second_claim, _, second) = second_attempt(&mut world).await;
    assert!(matches!(engine.start(second.clone()).await, Err(DriveError::Busy { .. })));
    // The stale driver of attempt 1 marks what it takes for its own (seed 16543): attempt 2's
    // claim carries the same run id, so only the fence can refuse it.
    let theirs: Vec<_> = second.instances().collect();
    let marks = post_provision::run::retire::marks(&world.run_id, &theirs, None, world.start);
    let stale = engine.ports().transition(&marks, world.start, &Fence::of(&read)).await.expect("an answer");
    assert!(stale.iter().all(|r| *r == WriteResult::Fenced), "{stale:?}");
    let claim = world.record(&second_claim).await.expect("record");
    assert_eq!(claim["state"].as_s().unwrap(), "claimed", "attempt 2's claim is untouched");
    let stale = engine.ports().transition(&commits, world.start, &Fence::of(&read)).await.expect("an answer");
    assert!(stale.iter().all(|r| *r == WriteResult::Fenced), "{stale:?}");
    let picture = world.picture(world.start, false).await;
    assert!(!picture.contains("record running runId=\"RUN\" threshold=start+"), "nothing committed: {picture}");
    // A driver that read attempt 2 writes on (leaving attempt 2's instances out of its effects).
    let knowing = Fence::of(&read).knowing(2);
    assert_eq!(knowing.unknown_attempt, 3);
    let applied = engine.ports().transition(&commits, world.start, &knowing).await.expect("an answer");
    assert!(applied.iter().all(|r| *r == WriteResult::Applied), "{applied:?}");
}

/// A re-run keeps the run id and increments the attempt. The second attempt's spec starts a run
/// of its own; while the first attempt's driver holds its lease, the second stops (exit 3)
/// naming it; once that lease ends, the second attempt finishes the first, then itself.
#[tokio::test]
async fn a_second_attempt_finishes_the_first_before_acting() {
    let mut world = World::new("attempts").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
    let clock = TestClock::at(world.start);
    let first = world.spec("success", 1);
    // Staged: the first attempt dies right after persisting `Committing`, before acting.
    world.crash_after_create(clock.clone(), first.clone()).await;
    let (second_claim, mut second_json, second) = second_attempt(&mut world).await;
    let engine = world.engine(clock.clone(), Hooks::default()).await;

    match engine.start(second.clone()).await {
        Err(error @ DriveError::Busy { .. }) => {
            assert_eq!(classify_drive_error(&error).0, EXIT_RESUMABLE);
            assert!(error.to_string().contains(&world.run_id), "{error}");
        }
        other => panic!("expected the second attempt to wait for the first, got {other:?}"),
    }
    let record = world.record(&second_claim).await.expect("record");
    assert_eq!(record["state"].as_s().unwrap(), "claimed", "the second attempt did not act yet");

    clock.advance(60);
    let outcome = engine.start(second.clone()).await.expect("the second attempt");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    assert_eq!(outcome.record.run_attempt, 2);
    let latest = engine.status(&world.run_id).await.expect("status").expect("record");
    assert_eq!((latest.run_attempt, latest.state), (2, State::Done));
    let earlier = engine.status_attempt(&world.run_id, Some(1)).await.expect("status").expect("record");
    assert_eq!((earlier.run_attempt, earlier.state), (1, State::Done));
    let picture = world.picture(world.start, false).await;
    assert_eq!(picture.matches("record running runId=\"RUN\" threshold=start+").count(), 2, "{picture}");
    let second_record = world.record(&second_claim).await.expect("record");
    assert_eq!(second_record["state"].as_s().unwrap(), "running");
    // The same spec again is idempotent; a different one for the same attempt is refused.
    assert_eq!(engine.start(second.clone()).await.expect("again").kind, OutcomeKind::Committed);
    second_json["maxRuntimeMin"] = 31.into();
    let changed = post_provision::Spec::from_json(&second_json.to_string()).expect("valid");
    assert!(matches!(engine.start(changed).await, Err(DriveError::SpecMismatch { .. })));
}

/// A driver that stops on its own (here: SQS failing past its retries, under `stall`) gives its
/// lease back, so the `resume` its exit code asks for is not refused.
#[tokio::test]
async fn a_run_that_stalls_gives_its_lease_back() {
    let proxy = FaultProxy::start(&["--rate", "1", "--only", "SQS.SendMessageBatch", "--faults", "error500"]);
    let mut world = World::new("giveback").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let clock = TestClock::at(world.start);
    let limits = Limits { on_retries_exhausted: OnRetriesExhausted::Stall, max_attempts: 2, ..test_limits() };
    let engine = world.engine_with(clock, Hooks::default(), limits, Some(proxy.url())).await;
    let spec = world.spec("failed", 1);
    assert!(matches!(engine.start(spec.clone()).await, Err(DriveError::Stalled { state: State::RollingBack, .. })));
    let record = engine.status(&spec.run_id).await.expect("status").expect("record");
    assert!(!record.lease_active(world.start), "the lease was given back: {:?}", record.lease);
    proxy.configure(serde_json::json!({"rate": 0})).await;
    let outcome = engine.resume(&spec.run_id).await.expect("resumed at once, without waiting for the lease");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
}

/// A commit driver paused right after creating its run (its first write), whose writes go
/// through a proxy that counts them: the stale driver of the two fencing tests below.
struct PausedDriver {
    world: World,
    proxy: FaultProxy,
    spec: post_provision::Spec,
    /// The stale driver's clock.
    clock: Arc<TestClock>,
    resume: Arc<tokio::sync::Notify>,
    running: tokio::task::JoinHandle<Result<post_provision::RunOutcome, DriveError>>,
}

impl PausedDriver {
    async fn start(name: &str) -> PausedDriver {
        let proxy = FaultProxy::start(&["--rate", "0"]);
        let mut world = World::new(name).await;
        world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
        let clock = TestClock::at(world.start);
        let paused = Arc::new(tokio::sync::Notify::new());
        let resume = Arc::new(tokio::sync::Notify::new());
        let hooks = Hooks { pause_after_writes: Some((1, paused.clone(), resume.clone())), ..Hooks::default() };
        let stale = world.engine_with(clock.clone(), hooks, staged_limits(), Some(proxy.url())).await;
        let spec = world.spec("success", 1);
        let running = tokio::spawn({
            let spec = spec.clone();
            async move { stale.start(spec).await }
        });
        paused.notified().await;
        PausedDriver { world, proxy, spec, clock, resume, running }
    }

    /// Lets the stale driver go on; it must stop with `LeaseLost` having changed nothing.
    /// Returns the transactions the proxy saw.
    async fn continue_and_expect_nothing_changed(self, why: &str) -> serde_json::Value {
        let finished = self.world.picture(self.world.start, false).await;
        self.resume.notify_one();
        match self.running.await.expect("task") {
            Err(DriveError::LeaseLost { .. }) => {}
            other => panic!("expected {why}, got {other:?}"),
        }
        self.proxy.wait_idle().await;
        assert_eq!(self.world.picture(self.world.start, false).await, finished, "the stale driver changed nothing");
        self.proxy.stats().await["requests"]["DynamoDB.TransactWriteItems"].clone()
    }
}

/// A driver stopped past its lease (a frozen process, or renewals that took too long) while a
/// sweeper took the run over and finished it: when it continues, it confirms its lease before its
/// next write, finds it gone, and stops without acting. Its instance writes go through a proxy
/// that counts them: only the create.
#[tokio::test]
async fn a_driver_whose_lease_ran_out_fences_itself_before_acting() {
    let stale = PausedDriver::start("selffence").await;
    // One clock for both: the stale driver's own says its lease has passed.
    stale.clock.advance(test_limits().lease_secs + 5);
    let sweeper = stale.world.engine(stale.clock.clone(), Hooks::default()).await;
    let outcome = sweeper.resume(&stale.spec.run_id).await.expect("sweeper");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    let transactions = stale.continue_and_expect_nothing_changed("the stale driver to fence itself").await;
    assert_eq!(transactions, 1, "only the create");
}

/// The fence is the store's, not the clock's: a driver paused after creating its run, whose own
/// clock says its lease still holds (it never moves), is taken over by a sweeper whose clock runs
/// past that lease. When the stale driver continues, nothing on its side stops it: it sends its
/// commit transaction, and DynamoDB refuses it on the run record's `ConditionCheck` (another lease
/// owner, a bumped fencing epoch, a finished run). The proxy counts that refused transaction.
#[tokio::test]
async fn a_stale_driver_s_transaction_is_refused_by_the_store_whatever_its_clock_says() {
    // The stale driver's clock never moves: only the sweeper's passes the lease.
    let stale = PausedDriver::start("storefence").await;
    let sweeper_clock = TestClock::at(stale.world.start);
    sweeper_clock.advance(test_limits().lease_secs + 5);
    let sweeper = stale.world.engine(sweeper_clock, Hooks::default()).await;
    let outcome = sweeper.resume(&stale.spec.run_id).await.expect("sweeper");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    let record = sweeper.status(&stale.spec.run_id).await.expect("status").expect("record");
    assert_eq!(record.fencing_epoch, 2, "the take-over bumped the fencing epoch");
    let transactions = stale.continue_and_expect_nothing_changed("the store to refuse the stale driver").await;
    assert_eq!(transactions, 2, "the create, then the stale commit the store refused");
}

/// The create transaction landed but its answer was lost, with no retry left: the run is found
/// and driven, not reported as "nothing was written" (69).
#[tokio::test]
async fn a_create_whose_answer_was_lost_is_found_and_driven() {
    let proxy = FaultProxy::start(&[
        "--rate",
        "1",
        "--only",
        "DynamoDB.TransactWriteItems",
        "--faults",
        "drop_after",
        "--budget",
        "1",
    ]);
    let mut world = World::new("lostcreate").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let limits = Limits { max_attempts: 1, ..test_limits() };
    let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits, Some(proxy.url())).await;
    let outcome = engine.start(world.spec("success", 0)).await.expect("the run is driven");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    assert_eq!(faults(&proxy.stats().await, "DynamoDB.TransactWriteItems:drop_after"), 1);
}

/// EC2 refuses to terminate (an IAM condition, termination protection): emergency cleanup keeps
/// those instances' records, marked `terminated`, instead of deleting them first and leaving
/// live instances with no record; a refused batch is split so the others still go.
#[tokio::test]
async fn cleanup_keeps_the_records_of_instances_ec2_refuses_to_terminate() {
    for (budget, all_refused) in [("-1", true), ("1", false)] {
        let proxy = FaultProxy::start(&[
            "--rate",
            "1",
            "--only",
            "EC2.TerminateInstances",
            "--faults",
            "ec2_unauthorized",
            "--budget",
            budget,
        ]);
        let mut world = World::new("refused").await;
        // An expired claim makes the commit fail: emergency cleanup of all three.
        world
            .seed(
                &[Seed::claimed("small"), Seed { threshold_secs: -60, ..Seed::claimed("large") }],
                &[Seed::created("running")],
            )
            .await;
        let engine =
            world.engine_with(TestClock::at(world.start), Hooks::default(), test_limits(), Some(proxy.url())).await;
        let outcome = engine.start(world.spec("success", 1)).await.expect("the run finishes");
        assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
        let picture = world.picture(world.start, false).await;
        if all_refused {
            assert_eq!(picture.matches("record terminated runId=\"RUN\"").count(), 3, "{picture}");
            assert_eq!(picture.matches("ec2 running").count(), 3, "{picture}");
            // The report says so, instance by instance, rather than "terminated".
            for result in post_provision::output::results::instance_results(&outcome) {
                assert!(result.result.contains("termination refused"), "{result:?}");
            }
        } else {
            assert_eq!(picture.matches("no record; ec2 terminated").count(), 3, "{picture}");
        }
    }
}

/// The spec is untrusted: an instance id that is not the pool's (no `InitialRunId` tag) named in
/// it survives every path, with or without a record.
#[tokio::test]
async fn an_instance_without_the_pool_tag_survives_every_path() {
    for (path, creation, required) in [("rollback", "failed", 1), ("cleanup", "success", 1)] {
        let mut world = World::new("foreign").await;
        world.seed(&[Seed { threshold_secs: -60, ..Seed::claimed("small") }], &[]).await;
        let victim = world.launch_tagged("small", None).await;
        let recorded_victim = world.launch_tagged("small", Some(("team", "web"))).await;
        world.put_record(&recorded_victim, "small", "claimed", &world.run_id.clone(), world.start.plus_secs(240)).await;
        let mut json = world.spec_json(creation, required);
        let template = json["selection"]["instances"][0].clone();
        let mut entry = template.clone();
        entry["id"] = recorded_victim.clone().into();
        json["selection"]["instances"].as_array_mut().expect("list").push(entry);
        json["selection"]["numInstancesSelected"] = 2.into();
        // Without a record, only an instance in the creation list is even looked up (issue 18):
        // the untagged victim is one creation reported without registering it.
        let mut entry = template.clone();
        entry["id"] = victim.clone().into();
        json["creation"]["instances"] = serde_json::json!([entry]);
        json["creation"]["numInstancesCreated"] = 1.into();
        let spec = post_provision::Spec::from_json(&json.to_string()).expect("valid");
        let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
        let outcome = engine.start(spec).await.expect("the run finishes");
        assert_ne!(outcome.kind, OutcomeKind::Committed, "{path}");
        assert_eq!(world.ec2_state(&victim).await, "running", "{path}: the untagged victim survives");
        assert_eq!(world.ec2_state(&recorded_victim).await, "running", "{path}: so does one with a record");
        assert_eq!(world.ec2_state(&world.selected[0].id).await, "terminated", "{path}: the expired claim goes");
        let found: Vec<String> = outcome
            .trace
            .iter()
            .filter_map(|event| match event {
                post_provision::driver::TraceEvent::Found { id, finding } if id == &victim => Some(finding.clone()),
                _ => None,
            })
            .collect();
        assert!(found.iter().any(|f| f == "not a pool instance"), "{path}: {found:?}");
    }
}
