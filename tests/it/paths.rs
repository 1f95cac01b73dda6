//! Each path end to end against moto: instance records, queue contents and EC2 states afterwards,
//! plus a snapshot of the trace (states entered, commands issued) per scenario.

use post_provision::driver::{DriveError, Hooks};
use post_provision::machine::State;
use post_provision::OutcomeKind;

use crate::harness::{trace_text, Owner, Seed, TestClock, World};

fn snapshot(name: &str, value: String) {
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!(name, value);
    });
}

#[tokio::test]
async fn commit_moves_everything_to_running_with_the_new_lifetime() {
    let mut world = World::new("commit").await;
    world
        .seed(&[Seed::claimed("small"), Seed::claimed("large")], &[Seed::created("running"), Seed::created("created")])
        .await;
    let clock = TestClock::at(world.start);
    let engine = world.engine(clock, Hooks::default()).await;
    let outcome = engine.start(world.spec("success", 2)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    assert_eq!(outcome.record.state, State::Done);
    assert_eq!(outcome.record.commit_threshold, Some(world.start.plus_secs(1800)));
    let picture = world.picture(world.start, false).await;
    assert_eq!(
        picture,
        "sel0: record running runId=\"RUN\" threshold=start+1800s; ec2 running\n\
         sel1: record running runId=\"RUN\" threshold=start+1800s; ec2 running\n\
         cre0: record running runId=\"RUN\" threshold=start+1800s; ec2 running\n\
         cre1: record running runId=\"RUN\" threshold=start+1800s; ec2 running\n\
         queue large: []\n\
         queue small: []"
    );
    snapshot("trace_commit", trace_text(&world, &outcome.trace));
    // The finished run carries a TTL and has released its lease.
    assert!(outcome.record.ttl.is_some());
    assert_eq!(outcome.record.lease.expires_at, world.start);
}

#[tokio::test]
async fn rollback_returns_claimed_instances_to_their_pools_and_retires_unvalidated_ones() {
    let mut world = World::new("rollback").await;
    world
        .seed(&[Seed::claimed("small"), Seed::claimed("large")], &[Seed::created("running"), Seed::created("created")])
        .await;
    let clock = TestClock::at(world.start);
    let engine = world.engine(clock, Hooks::default()).await;
    let outcome = engine.start(world.spec("partial", 3)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let error = outcome.record.error.clone().expect("error");
    assert_eq!(error.kind, post_provision::record::RunErrorKind::Shortfall);
    assert!(error.message.contains("creation ended Partial"), "{}", error.message);
    let picture = world.picture(world.start, false).await;
    assert_eq!(
        picture,
        "sel0: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         sel1: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         cre0: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         cre1: record no record; ec2 terminated\n\
         queue large: [cre0@start+300s, sel1@start+300s]\n\
         queue small: [sel0@start+300s]"
    );
    let mut sent = outcome.record.messages_sent.clone();
    sent.sort();
    assert_eq!(sent.len(), 3);
    snapshot("trace_rollback", trace_text(&world, &outcome.trace));
}

#[tokio::test]
async fn an_expired_claim_during_commit_leads_to_emergency_cleanup() {
    let mut world = World::new("expired").await;
    let expired = Seed { threshold_secs: -60, ..Seed::claimed("large") };
    world.seed(&[Seed::claimed("small"), expired], &[Seed::created("running")]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec("success", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let error = outcome.record.error.clone().expect("error");
    assert_eq!(error.kind, post_provision::record::RunErrorKind::Unexpected);
    assert!(world.redact(&error.message).contains("sel1: claimed but expired"), "{}", error.message);
    let picture = world.picture(world.start, false).await;
    assert_eq!(
        picture,
        "sel0: record no record; ec2 terminated\n\
         sel1: record no record; ec2 terminated\n\
         cre0: record no record; ec2 terminated\n\
         queue large: []\n\
         queue small: []"
    );
    snapshot("trace_cleanup_expired_claim", trace_text(&world, &outcome.trace));
}

#[tokio::test]
async fn cleanup_never_touches_an_instance_another_run_owns() {
    let mut world = World::new("isolation").await;
    let stolen = Seed { owner: Owner::Other("someone-else"), ..Seed::claimed("large") };
    world.seed(&[Seed::claimed("small"), stolen], &[]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec("success", 0)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let picture = world.picture(world.start, false).await;
    assert_eq!(
        picture,
        "sel0: record no record; ec2 terminated\n\
         sel1: record claimed runId=\"someone-else\" threshold=seeded; ec2 running\n\
         queue large: []\n\
         queue small: []"
    );
    snapshot("trace_cleanup_isolation", trace_text(&world, &outcome.trace));
}

#[tokio::test]
async fn a_missing_pool_queue_during_rollback_leads_to_cleanup_that_keeps_what_was_released() {
    let mut world = World::new("noqueue").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[]).await;
    world.delete_queue("small").await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec("failed", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let error = outcome.record.error.clone().expect("error");
    assert!(error.message.contains("SQS SendMessageBatch"), "{}", error.message);
    // The large instance's message went out before the small queue failed: it stays in the pool.
    // The small one was released but never announced: cleanup takes it back and terminates it.
    let mut world_without_small = world;
    world_without_small.queues.remove("small");
    let picture = world_without_small.picture(world_without_small.start, false).await;
    assert_eq!(
        picture,
        "sel0: record no record; ec2 terminated\n\
         sel1: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         queue large: [sel1@start+300s]"
    );
    snapshot("trace_cleanup_missing_queue", trace_text(&world_without_small, &outcome.trace));
}

#[tokio::test]
async fn a_repeated_run_reports_the_finished_outcome_and_a_different_spec_is_refused() {
    let mut world = World::new("repeat").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let first = engine.start(world.spec("success", 0)).await.expect("run");
    assert_eq!(first.kind, OutcomeKind::Committed);
    let requests_before = engine.requests().total();
    let again = engine.start(world.spec("success", 0)).await.expect("repeat");
    assert_eq!(again.kind, OutcomeKind::Committed);
    assert_eq!(again.record.version, first.record.version, "a repeat writes nothing");
    assert!(again.trace.is_empty());
    assert!(engine.requests().total() - requests_before <= 2, "one record read and one spec read");
    let different = engine.start(world.spec("failed", 0)).await;
    assert!(matches!(different, Err(DriveError::SpecMismatch { .. })), "{different:?}");
}

#[tokio::test]
async fn a_shortfall_with_a_class_that_has_no_queue_is_refused_before_any_write() {
    let mut world = World::new("noclass").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let mut spec = world.spec_json("failed", 1);
    spec["selection"]["instances"][0]["resourceClass"] = "xlarge".into();
    let spec = post_provision::Spec::from_json(&spec.to_string()).expect("valid json");
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let error = engine.start(spec).await.expect_err("refused");
    match error {
        DriveError::InvalidSpec(error) => {
            assert_eq!(error.field, "selection.instances[0].resourceClass");
            assert!(error.problem.contains("\"xlarge\" has no pool queue"), "{}", error.problem);
        }
        other => panic!("expected an invalid spec, got {other:?}"),
    }
    assert!(engine.status(&world.run_id).await.expect("status").is_none(), "no run record written");
    let picture = world.picture(world.start, false).await;
    assert!(picture.starts_with("sel0: record claimed runId=\"RUN\" threshold=seeded; ec2 running"), "{picture}");
}

#[tokio::test]
async fn an_engine_built_from_the_callers_own_clients_drives_a_run() {
    let mut world = World::new("clients").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    let engine = post_provision::Engine::builder()
        .table(&world.table)
        .clients(world.clients.dynamodb.clone(), world.clients.sqs.clone(), world.clients.ec2.clone())
        .clock(TestClock::at(world.start))
        .build()
        .await
        .expect("engine");
    let outcome = engine.start(world.spec("success", 0)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    // Requests through the caller's clients are counted too: the one transaction of a small commit.
    assert_eq!(engine.requests().total(), 1, "{:?}", engine.requests().snapshot());
}

/// A small run's state is persisted with its effects, in one atomic transaction: a commit is one
/// request, created already `Done` with the whole path in its history; a rollback's record rides
/// with its releases, then come the messages, then `Failed`.
#[tokio::test]
async fn a_small_run_persists_its_state_with_its_effects_in_one_transaction() {
    let mut world = World::new("fastpath").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[Seed::created("running")]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec("success", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    assert_eq!(outcome.writes, 1);
    let requests = engine.requests().snapshot();
    assert_eq!(requests, [("DynamoDB.TransactWriteItems".to_string(), 1)].into(), "{requests:?}");
    let path: Vec<State> = outcome.record.history.iter().map(|entry| entry.state).collect();
    assert_eq!(path, vec![State::Reconciling, State::Committing, State::Done]);
    assert_eq!(outcome.record.lease.expires_at, world.start, "the lease is released");
    assert!(
        world.picture(world.start, false).await.matches("running runId=\"RUN\" threshold=start+1800s").count() == 3
    );

    let mut world = World::new("fastrollback").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec("failed", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let requests = engine.requests().snapshot();
    assert_eq!(requests.get("DynamoDB.TransactWriteItems"), Some(&1), "{requests:?}");
    assert_eq!(requests.get("SQS.SendMessageBatch"), Some(&2), "one per class: {requests:?}");
    assert_eq!(requests.get("DynamoDB.PutItem"), Some(&1), "Failed: {requests:?}");
    assert_eq!(requests.get("DynamoDB.BatchGetItem"), Some(&1), "the instance records read first: {requests:?}");
    assert_eq!(
        engine.requests().total(),
        6,
        "the pool configuration and the instance records read, then three stages: {requests:?}"
    );
}

/// Issue 19: an emergency cleanup phase of one instance takes at most four round trips: the
/// write entering it, the mark beside the pool check, the termination, and the deletion that
/// carries the run's terminal record (no write of its own after it).
#[tokio::test]
async fn a_small_cleanup_phase_takes_four_round_trips() {
    let mut world = World::new("cleanup4").await;
    world.seed(&[Seed { threshold_secs: -60, ..Seed::claimed("large") }], &[]).await;
    // Effects of one step run together only with a concurrency above one.
    let limits = post_provision::config::Limits { concurrency: 8, ..crate::harness::test_limits() };
    let engine = world.engine_with(TestClock::at(world.start), Hooks::default(), limits, None).await;
    let outcome = engine.start(world.spec("success", 0)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    assert_eq!(
        world.picture(world.start, false).await,
        "sel0: record no record; ec2 terminated\nqueue large: []\nqueue small: []"
    );
    // The renewals run in the background, off the critical path.
    let spans: Vec<_> =
        engine.requests().timeline().into_iter().filter(|span| span.operation != "DynamoDB.UpdateItem").collect();
    let operations: Vec<&str> = spans.iter().map(|span| span.operation.as_str()).collect();
    let check = operations.iter().position(|op| *op == "EC2.DescribeInstances").expect("a pool check");
    let entered = operations[..check].iter().rposition(|op| *op == "DynamoDB.PutItem").expect("EmergencyCleanup");
    let phase: Vec<_> = spans[entered..].iter().map(|span| (span.start, span.end.expect("ended"))).collect();
    assert_eq!(
        operations[entered..],
        [
            "DynamoDB.PutItem",
            "DynamoDB.TransactWriteItems",
            "EC2.DescribeInstances",
            "EC2.TerminateInstances",
            "DynamoDB.TransactWriteItems"
        ],
        "{operations:?}"
    );
    let at = spans[entered].start;
    let shown: Vec<String> = spans[entered..]
        .iter()
        .map(|span| format!("{} {:?}..{:?}", span.operation, span.start - at, span.end.expect("ended") - at))
        .collect();
    assert_eq!(post_provision::aws::RequestCounter::sequential_stages(&phase), 4, "{shown:#?}");
    let path: Vec<State> = outcome.record.history.iter().map(|entry| entry.state).collect();
    assert_eq!(path.last(), Some(&State::Failed));
    let stored = engine.status(&world.run_id).await.expect("status").expect("a record");
    assert_eq!(stored.state, State::Failed, "the terminal record rode with the deletion");
}

/// Issue 19: a small rollback whose spec carries the pool's `resourceClassConfig` reads nothing
/// first. Its create checks the pool's metadata item and each record's class and instance type
/// in the same transaction: the create with the release, the message, `Failed`, three stages.
#[tokio::test]
async fn a_small_rollback_with_the_pools_config_in_its_spec_reads_nothing_first() {
    let mut world = World::new("guarded").await;
    world.seed(&[Seed::claimed("large")], &[]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec_with_config("failed", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    assert!(outcome.record.refused_at_create.is_empty());
    let requests = engine.requests().snapshot();
    assert_eq!(
        requests,
        [
            ("DynamoDB.TransactWriteItems".to_string(), 1),
            ("SQS.SendMessageBatch".to_string(), 1),
            ("DynamoDB.PutItem".to_string(), 1),
        ]
        .into(),
        "no GetItem or BatchGetItem first: {requests:?}"
    );
    assert!(engine.requests().stages() <= 3, "stages: {}", engine.requests().stages());
    assert_eq!(
        world.picture(world.start, false).await,
        "sel0: record idle runId=\"\" threshold=start+300s; ec2 running\n\
         queue large: [sel0@start+300s]\n\
         queue small: []"
    );
    snapshot("trace_rollback_guarded", trace_text(&world, &outcome.trace));
}

/// A guarded create that an instance refuses (its claim expired) writes nothing; the run then
/// reads the pool as before and takes the staged path, with the refusing instance in
/// `refusedAtCreate`.
#[tokio::test]
async fn a_guarded_rollback_with_a_refusing_instance_reads_the_pool_and_takes_the_staged_path() {
    let mut world = World::new("guardrefused").await;
    let expired = Seed { threshold_secs: -60, ..Seed::claimed("large") };
    world.seed(&[Seed::claimed("small"), expired], &[]).await;
    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let outcome = engine.start(world.spec_with_config("failed", 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    assert_eq!(outcome.record.refused_at_create, vec![world.selected[1].id.clone()]);
    let requests = engine.requests().snapshot();
    assert_eq!(requests.get("DynamoDB.BatchGetItem"), Some(&1), "read after the refusal: {requests:?}");
    assert_eq!(requests.get("DynamoDB.GetItem"), Some(&1), "the pool's item, after the refusal: {requests:?}");
    let picture = world.picture(world.start, false).await;
    assert!(picture.starts_with("sel0: record idle runId=\"\" threshold=start+300s; ec2 running\n"), "{picture}");
    assert!(picture.contains("sel1: record no record; ec2 terminated\n"), "the expired claim is retired: {picture}");
    assert!(picture.contains("queue small: [sel0@start+300s]"), "{picture}");
}
