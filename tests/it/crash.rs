//! Crash safety: stop a run after every AWS write in turn, resume it, and compare the world with
//! the same run done without a crash; and one driver per run under a lease.

use std::sync::Arc;

use post_provision::driver::{DriveError, Hooks};
use post_provision::machine::State;
use post_provision::OutcomeKind;

use crate::harness::{staged_limits, test_limits, Owner, Seed, TestClock, World};
use post_provision::config::Limits;

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    selected: &'static [Seed],
    created: &'static [Seed],
    creation_state: &'static str,
    required: usize,
    expected: OutcomeKind,
}

const EXPIRED_LARGE: Seed = Seed { class: "large", state: Some("claimed"), owner: Owner::Own, threshold_secs: -60 };
const CLAIMED_SMALL: Seed = Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 };
const CLAIMED_LARGE: Seed = Seed { class: "large", state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 };
const CREATED_RUNNING: Seed = Seed { class: "large", state: Some("running"), owner: Owner::Own, threshold_secs: 600 };
const CREATED_UNVALIDATED: Seed =
    Seed { class: "large", state: Some("created"), owner: Owner::Own, threshold_secs: 600 };

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "commit",
        selected: &[CLAIMED_SMALL, CLAIMED_LARGE],
        created: &[CREATED_RUNNING],
        creation_state: "success",
        required: 1,
        expected: OutcomeKind::Committed,
    },
    Scenario {
        name: "rollback",
        selected: &[CLAIMED_SMALL, CLAIMED_LARGE],
        created: &[CREATED_RUNNING, CREATED_UNVALIDATED],
        creation_state: "partial",
        required: 3,
        expected: OutcomeKind::RolledBack,
    },
    Scenario {
        name: "cleanup",
        selected: &[CLAIMED_SMALL, EXPIRED_LARGE],
        created: &[CREATED_RUNNING],
        creation_state: "success",
        required: 1,
        expected: OutcomeKind::CleanedUp,
    },
];

async fn world_for(scenario: &Scenario, case: &str) -> World {
    let mut world = World::new(&format!("crash-{}-{case}", scenario.name)).await;
    world.seed(scenario.selected, scenario.created).await;
    world
}

/// Runs the scenario without a crash: the world it leaves and how many writes it made.
async fn reference(scenario: &Scenario, limits: &Limits) -> (String, u64) {
    let world = world_for(scenario, "ref").await;
    let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits.clone(), None).await;
    let outcome = engine.start(world.spec(scenario.creation_state, scenario.required)).await.expect("reference run");
    assert_eq!(outcome.kind, scenario.expected, "{}", scenario.name);
    let picture = world.picture(world.run_start(&engine).await, true).await;
    (picture, outcome.writes)
}

/// Crashes the scenario after write `crash_after`, resumes it as an operator would (resume; for
/// a run whose record never got written, `run` again), and returns the world it leaves.
async fn crashed_and_resumed(scenario: &Scenario, crash_after: u64, limits: &Limits) -> String {
    let world = world_for(scenario, &format!("k{crash_after}")).await;
    let clock = TestClock::at(world.start);
    let spec = world.spec(scenario.creation_state, scenario.required);
    let hooks = Hooks { crash_after_writes: Some(crash_after), ..Hooks::default() };
    let crashing = world.engine_with(clock.clone(), hooks, limits.clone(), None).await;
    let crash = crashing.start(spec.clone()).await;
    assert!(
        matches!(crash, Err(DriveError::Crashed { writes }) if writes == crash_after),
        "{} k={crash_after}: expected a crash, got {crash:?}",
        scenario.name
    );
    // The dead driver's lease must run out before anyone else may drive the run.
    clock.advance(test_limits().lease_secs + 1);
    let resumer = world.engine_with(clock.clone(), Hooks::default(), limits.clone(), None).await;
    let outcome = match resumer.resume(&world.run_id).await {
        Err(DriveError::NoSuchRun { .. }) => resumer.start(spec).await,
        other => other,
    }
    .unwrap_or_else(|error| panic!("{} k={crash_after}: resume failed: {error}", scenario.name));
    assert_eq!(outcome.kind, scenario.expected, "{} k={crash_after}", scenario.name);
    world.picture(world.run_start(&resumer).await, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_any_write_resumes_to_the_same_world() {
    let mut report = Vec::new();
    // Both shapes of a small run: state and first effects in one transaction (the default), and
    // staged (state first, then effects), which larger runs take.
    for (shape, limits) in [("one transaction", test_limits()), ("staged", staged_limits())] {
        for scenario in SCENARIOS {
            let (expected, writes) = reference(&scenario, &limits).await;
            assert!(writes >= 1, "{}: only {writes} writes", scenario.name);
            // Every crash point of the path, each in its own world, a few at a time.
            let cases: Vec<u64> = (1..=writes).collect();
            for chunk in cases.chunks(4) {
                let pictures =
                    futures::future::join_all(chunk.iter().map(|k| crashed_and_resumed(&scenario, *k, &limits))).await;
                for (k, picture) in chunk.iter().zip(pictures) {
                    assert_eq!(picture, expected, "{} ({shape}) crashed after write {k}", scenario.name);
                }
            }
            report.push(format!(
                "{} ({shape}): {writes} crash points, all resumed to the reference world",
                scenario.name
            ));
        }
    }
    // The count of crash points per path is part of the evidence; print it for the test log.
    println!("{}", report.join("\n"));
}

#[tokio::test]
async fn a_second_driver_is_refused_while_the_first_holds_the_lease() {
    let mut world = World::new("lease-busy").await;
    world.seed(&[CLAIMED_SMALL, CLAIMED_LARGE], &[]).await;
    let clock = TestClock::at(world.start);
    let paused = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let hooks = Hooks { pause_after_writes: Some((2, paused.clone(), release.clone())), ..Hooks::default() };
    let first = world.engine_with(clock.clone(), hooks, staged_limits(), None).await;
    let spec = world.spec("success", 0);
    let first_run = tokio::spawn({
        let spec = spec.clone();
        async move { first.start(spec).await }
    });
    paused.notified().await; // The record exists and the first driver holds the lease.
    let second = world.engine(clock.clone(), Hooks::default()).await;
    match second.start(spec.clone()).await {
        Err(DriveError::Busy { owner, until, .. }) => {
            assert!(owner.starts_with("pid"), "{owner}");
            assert_eq!(until, world.start.plus_secs(test_limits().lease_secs));
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(matches!(second.resume(&world.run_id).await, Err(DriveError::Busy { .. })));
    release.notify_one();
    let outcome = first_run.await.expect("join").expect("first driver finishes");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    let picture = world.picture(world.start, true).await;
    assert_eq!(
        picture,
        "sel0: record running runId=\"RUN\" threshold=start+1800s; ec2 running\n\
         sel1: record running runId=\"RUN\" threshold=start+1800s; ec2 running\n\
         queue large: []\n\
         queue small: []"
    );
}

#[tokio::test]
async fn a_paused_driver_whose_lease_expired_is_fenced_off() {
    let mut world = World::new("lease-fence").await;
    world.seed(&[CLAIMED_SMALL, CLAIMED_LARGE], &[]).await;
    let clock = TestClock::at(world.start);
    let paused = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    // The old driver stops right after persisting RollingBack (write 2), before any side effect.
    let hooks = Hooks { pause_after_writes: Some((2, paused.clone(), release.clone())), ..Hooks::default() };
    let old = world.engine_with(clock.clone(), hooks, staged_limits(), None).await;
    let spec = world.spec("failed", 1);
    let old_run = tokio::spawn({
        let spec = spec.clone();
        async move { old.start(spec).await }
    });
    paused.notified().await;
    clock.advance(test_limits().lease_secs + 1);
    let new = world.engine(clock.clone(), Hooks::default()).await;
    let outcome = new.resume(&world.run_id).await.expect("the new driver takes over");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let final_version = outcome.record.version;
    // The old driver wakes up and acts on: its releases find the new driver's (same thresholds),
    // and its next record write is refused.
    release.notify_one();
    let late = old_run.await.expect("join");
    assert!(matches!(late, Err(DriveError::LeaseLost { .. })), "{late:?}");
    let record = new.status(&world.run_id).await.expect("status").expect("record");
    assert_eq!(record.version, final_version, "the old driver wrote nothing to the record");
    assert_eq!(record.state, State::Failed);
    let picture = world.picture(world.start, true).await;
    assert_eq!(
        picture,
        "sel0: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         sel1: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         queue large: [sel1@start+300s]\n\
         queue small: [sel0@start+300s]"
    );
}

#[tokio::test]
async fn resume_all_finishes_runs_whose_driver_is_gone() {
    let mut worlds = Vec::new();
    for name in ["all-a", "all-b"] {
        let mut world = World::new(name).await;
        world.seed(&[CLAIMED_SMALL], &[]).await;
        worlds.push(world);
    }
    // Both runs in one table: the second world's instances are re-seeded into the first's.
    let host = &worlds[0];
    let guest = &worlds[1];
    for seeded in &guest.selected {
        host.put_record(&seeded.id, &seeded.class, "claimed", &guest.run_id, seeded.threshold).await;
    }
    let clock = TestClock::at(host.start);
    let crash_hooks = || Hooks { crash_after_writes: Some(2), ..Hooks::default() };
    let crashing = host.engine_with(clock.clone(), crash_hooks(), staged_limits(), None).await;
    let crashing_again = host.engine_with(clock.clone(), crash_hooks(), staged_limits(), None).await;
    assert!(matches!(crashing.start(host.spec("success", 0)).await, Err(DriveError::Crashed { .. })));
    assert!(matches!(crashing_again.start(guest.spec("success", 0)).await, Err(DriveError::Crashed { .. })));
    let sweeper = host.engine(clock.clone(), Hooks::default()).await;
    // While the dead drivers' leases last, nothing is taken over.
    assert!(sweeper.resume_all(100).await.expect("resume all").results.is_empty());
    clock.advance(test_limits().lease_secs + 1);
    let results = sweeper.resume_all(100).await.expect("resume all").results;
    let mut finished: Vec<(String, OutcomeKind)> =
        results.into_iter().map(|(run_id, result)| (run_id, result.expect("finished").kind)).collect();
    finished.sort();
    let mut expected =
        vec![(host.run_id.clone(), OutcomeKind::Committed), (guest.run_id.clone(), OutcomeKind::Committed)];
    expected.sort();
    assert_eq!(finished, expected);
    assert!(sweeper.list(false, 100).await.expect("list").records.iter().all(|r| r.state.is_terminal()));
    assert!(sweeper.list(true, 100).await.expect("list").records.is_empty());
}

/// A stage longer than the lease (a slow TransactWriteItems) does not let the lease lapse: the
/// background renewer extends it, and a second driver is still refused.
#[tokio::test]
async fn the_lease_is_renewed_while_a_long_stage_runs() {
    let mut world = World::new("lease-renew").await;
    world.seed(&[CLAIMED_SMALL], &[]).await;
    // Every instance transaction takes 7 s; the lease lasts 5 s and is renewed every 1 s.
    let proxy = crate::faults::FaultProxy::start(&[
        "--rate",
        "1.0",
        "--faults",
        "slow",
        "--slow-ms",
        "7000",
        "--only",
        "DynamoDB.TransactWriteItems",
        "--budget",
        "2",
    ]);
    let limits = post_provision::config::Limits {
        lease_secs: 5,
        attempt_timeout: std::time::Duration::from_secs(20),
        operation_timeout: std::time::Duration::from_secs(40),
        ..staged_limits()
    };
    let clock = Arc::new(post_provision::driver::SystemClock);
    let engine = post_provision::Engine::builder()
        .table(&world.table)
        .region("us-east-1")
        .endpoint_url(proxy.url())
        .limits(limits.clone())
        .clock(clock.clone())
        .build()
        .await
        .expect("engine");
    let spec = world.spec("success", 0);
    let run = tokio::spawn(async move { engine.start(spec).await });
    let observer = post_provision::Engine::builder()
        .table(&world.table)
        .sdk_config(world.clients.sdk_config.clone())
        .limits(limits)
        .clock(clock)
        .build()
        .await
        .expect("observer");
    // Wait (bounded) until a renewal has moved the lease past its first expiry.
    let mut first_expiry = None;
    let mut renewed = false;
    for _ in 0..200 {
        if let Some(record) = observer.status(&world.run_id).await.expect("status") {
            let expiry = record.lease.expires_at;
            let first = *first_expiry.get_or_insert(expiry);
            if expiry > first {
                renewed = true;
                break;
            }
        }
        // A poll interval while waiting for the renewal (a condition), not a timed expectation.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(renewed, "the lease was never renewed while the stage ran");
    match observer.resume(&world.run_id).await {
        Err(DriveError::Busy { .. }) => {}
        other => panic!("expected Busy while the first driver works, got {other:?}"),
    }
    let outcome = run.await.expect("join").expect("the first driver finishes");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
}

/// The evidence of a landed commit survives a take-over: the driver taken over may still append
/// its committed ids (its fence holds until the take-over lands, and appending leaves the version
/// as it is), so a take-over that read the record before that append is refused rather than
/// erase them, and one on a fresh read keeps them.
#[tokio::test]
async fn a_take_over_never_erases_commit_evidence_appended_after_its_read() {
    use post_provision::ports::{Fence, InstanceStore, RunStore, StoreError};
    let mut world = World::new("evidence").await;
    world.seed(&[Seed::claimed("small")], &[Seed::created("running")]).await;
    let clock = TestClock::at(world.start);
    let spec = world.spec("success", 1);
    // The first driver creates its run (staged: no transition rides along) and dies.
    world.crash_after_create(clock.clone(), spec.clone()).await;
    let engine = world.engine(clock.clone(), Hooks::default()).await;
    let read = engine.status(&spec.run_id).await.expect("status").expect("record");
    assert!(read.committed_ids.is_empty());
    // The first driver's commit lands after the take-over read the record.
    let threshold = read.commit_threshold.expect("committing");
    let commits = post_provision::run::commit::transitions(&spec, threshold);
    let results = engine.ports().transition(&commits, world.start, &Fence::of(&read)).await.expect("commit");
    assert!(results.iter().all(|r| *r == post_provision::core::WriteResult::Applied), "{results:?}");
    let taken = |record: &post_provision::record::RunRecord| {
        let mut taken = record.clone();
        taken.version += 1;
        taken.fencing_epoch += 1;
        taken.lease.owner = "the-sweeper".into();
        taken
    };
    let stale = engine.ports().take_over_run(&taken(&read), read.version, 0).await;
    assert!(matches!(stale, Err(StoreError::VersionConflict { .. })), "{stale:?}");
    let fresh = engine.status(&spec.run_id).await.expect("status").expect("record");
    assert_eq!(fresh.committed_ids.len(), 2, "both commits recorded: {:?}", fresh.committed_ids);
    engine.ports().take_over_run(&taken(&fresh), fresh.version, 2).await.expect("a take-over on a fresh read");
    let after = engine.status(&spec.run_id).await.expect("status").expect("record");
    assert_eq!((after.lease.owner.as_str(), after.committed_ids.len()), ("the-sweeper", 2));
}

/// The terminal record riding with a cleanup's last deletions (issue 19): the same transaction
/// sent again after its first answer was lost finds its own record and counts as applied; one
/// from a driver that no longer holds the record is fenced, and nothing of it lands.
#[tokio::test]
async fn a_finishing_deletion_recognises_its_own_write_and_is_fenced_for_another_driver() {
    use post_provision::core::{InstanceDeletion, WriteResult};
    use post_provision::ports::{Fence, InstanceStore};
    let mut world = World::new("finishing").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[]).await;
    let clock = TestClock::at(world.start);
    let spec = world.spec("success", 0);
    // The first driver creates its run (staged) and dies; its records are then marked as a
    // retire marks them.
    world.crash_after_create(clock.clone(), spec.clone()).await;
    let engine = world.engine(clock.clone(), Hooks::default()).await;
    let read = engine.status(&spec.run_id).await.expect("status").expect("record");
    let instances: Vec<_> = spec.instances().collect();
    let marks = post_provision::run::retire::marks(&spec.run_id, &instances, None, world.start);
    let marked = engine.ports().transition(&marks, world.start, &Fence::of(&read)).await.expect("marks");
    assert!(marked.iter().all(|r| *r == WriteResult::Applied), "{marked:?}");
    let deletion = |index: usize| InstanceDeletion {
        instance_id: world.selected[index].id.clone(),
        owner_run_id: spec.run_id.clone(),
    };
    let mut finished = read.clone();
    finished.version += 1;
    finished.state = State::Failed;
    let landed = engine.ports().delete_finishing(&[deletion(0)], &finished, read.version, 2).await.expect("an answer");
    assert_eq!(landed, vec![WriteResult::Applied]);
    let again = engine.ports().delete_finishing(&[deletion(0)], &finished, read.version, 2).await.expect("an answer");
    assert_eq!(again, vec![WriteResult::Applied], "the re-sent transaction finds its own record");
    let mut other = finished.clone();
    other.lease.owner = "another-driver".into();
    let fenced = engine.ports().delete_finishing(&[deletion(1)], &other, read.version, 2).await.expect("an answer");
    assert_eq!(fenced, vec![WriteResult::Fenced]);
    let picture = world.picture(world.start, false).await;
    assert!(picture.starts_with("sel0: record no record"), "{picture}");
    assert!(picture.contains("sel1: record terminated"), "the fenced deletion did not land: {picture}");
    let stored = engine.status(&spec.run_id).await.expect("status").expect("record");
    assert_eq!((stored.state, stored.lease.owner), (State::Failed, read.lease.owner.clone()));
}
