//! `audit` against moto: one stray of each kind beside healthy instances is named by kind, and
//! nothing healthy; `--fix` repairs them and a second audit is clean; a record that moved
//! between the read and the fix is left alone.
//!
//! The EC2 instances of moto are shared by every test, so each world tags its own instances
//! with a value of its own and audits with `--instance-filter tag:InitialRunId=<that value>`.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

use aws_sdk_dynamodb::types::AttributeValue;
use post_provision::audit::{FindingKind, RepairOutcome};
use post_provision::aws::InstanceFilter;
use post_provision::driver::Hooks;
use post_provision::{AuditOptions, Engine};

use crate::harness::{Owner, Seed, TestClock, World};

/// The audit sees the world an hour after it was seeded: every instance is past the grace.
const LATER_SECS: i64 = 3_600;

fn options(world: &World) -> AuditOptions {
    AuditOptions {
        grace_secs: 600,
        instance_filter: Some(InstanceFilter { name: "tag:InitialRunId".into(), values: vec![world.table.clone()] }),
    }
}

async fn launch(world: &World, class: &str) -> String {
    world.launch_tagged(class, Some(("InitialRunId", &world.table))).await
}

async fn terminate(world: &World, id: &str) {
    world.clients.ec2.terminate_instances().instance_ids(id).send().await.expect("terminate");
}

/// A finished run record as a rollback leaves it, reduced to what the audit reads.
async fn put_finished_rollback(world: &World, run_id: &str, idle_threshold: &str, messages_sent: &[&str]) {
    let lease = AttributeValue::M(
        [
            ("owner".to_string(), AttributeValue::S(String::new())),
            ("expiresAt".to_string(), AttributeValue::S(world.start.to_string())),
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
        .item("state", AttributeValue::S("Failed".into()))
        .item("idleThreshold", AttributeValue::S(idle_threshold.into()))
        .item(
            "messagesSent",
            AttributeValue::L(messages_sent.iter().map(|id| AttributeValue::S(id.to_string())).collect()),
        )
        .item("lease", lease)
        .send()
        .await
        .expect("put run record");
}

/// The `releasedBy` a rollback writes with an instance it returns to the pool.
async fn mark_released_by(world: &World, id: &str, run_id: &str) {
    world
        .clients
        .dynamodb
        .update_item()
        .table_name(&world.table)
        .key("PK", AttributeValue::S("TYPE#INSTANCE".into()))
        .key("SK", AttributeValue::S(format!("ID#{id}")))
        .update_expression("SET releasedBy = :run")
        .expression_attribute_values(":run", AttributeValue::S(run_id.into()))
        .send()
        .await
        .expect("mark released");
}

async fn send_pool_message(world: &World, class: &str, id: &str) {
    let body = serde_json::json!({"id": id, "resourceClass": class}).to_string();
    world.clients.sqs.send_message().queue_url(&world.queues[class]).message_body(body).send().await.expect("send");
}

/// (kind, name) of each finding: the instance, else the run, else the class of a hint.
fn named(audit: &post_provision::Audit, world: &World, names: &BTreeMap<String, &str>) -> Vec<(FindingKind, String)> {
    let mut found: Vec<(FindingKind, String)> = audit
        .report
        .findings
        .iter()
        .map(|entry| {
            let finding = &entry.finding;
            let name = match (&finding.instance_id, &finding.run_id, &finding.resource_class) {
                (Some(id), _, _) => names.get(id).map(|n| n.to_string()).unwrap_or_else(|| id.clone()),
                (None, Some(run), _) if *run == world.run_id => "the crashed run".into(),
                (None, Some(run), _) => run.clone(),
                (None, None, Some(class)) => format!("class {class}"),
                _ => "?".into(),
            };
            (finding.kind, name)
        })
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn audit_names_each_stray_and_fix_repairs_them() {
    let mut world = World::new("audit").await;
    let later = world.start.plus_secs(LATER_SECS);
    let clock = TestClock::at(later);
    let mut names = BTreeMap::new();

    // Healthy: running and unexpired, owned by a run with no run record (an older engine's);
    // idle with its pool message in the queue.
    let running = launch(&world, "large").await;
    world.put_record(&running, "large", "running", "old-run", later.plus_secs(600)).await;
    names.insert(running.clone(), "healthy running");
    let idle = launch(&world, "large").await;
    // (Released at another moment than the rollback below, so its threshold differs.)
    world.put_record(&idle, "large", "idle", "", later.plus_secs(280)).await;
    send_pool_message(&world, "large", &idle).await;
    names.insert(idle.clone(), "healthy idle");

    // orphan-instance: the pool's tag, alive, no record.
    let orphan = launch(&world, "large").await;
    names.insert(orphan.clone(), "orphan");
    // ghost-record: an idle record whose instance is terminated.
    let ghost = launch(&world, "large").await;
    world.put_record(&ghost, "large", "idle", "", later.plus_secs(300)).await;
    terminate(&world, &ghost).await;
    names.insert(ghost.clone(), "ghost");
    // created-leak and stale-claim: past their thresholds, their runs have no record.
    let leak = launch(&world, "large").await;
    world.put_record(&leak, "large", "created", "gone-run-1", later.plus_secs(-60)).await;
    names.insert(leak.clone(), "leak");
    let stale = launch(&world, "large").await;
    world.put_record(&stale, "large", "claimed", "gone-run-2", later.plus_secs(-60)).await;
    names.insert(stale.clone(), "stale");
    // unannounced-idle: released by a finished rollback at its idle threshold, not in its
    // messagesSent (which names another instance).
    let quiet = launch(&world, "large").await;
    let idle_threshold = later.plus_secs(300);
    world.put_record(&quiet, "large", "idle", "", idle_threshold).await;
    mark_released_by(&world, &quiet, "rolled-back").await;
    put_finished_rollback(&world, "rolled-back", &idle_threshold.to_string(), &["i-0000000000000000a"]).await;
    names.insert(quiet.clone(), "quiet");
    // unfinished-run: a real run whose driver died right after persisting its state.
    world.seed(&[Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: 4_200 }], &[]).await;
    world.crash_after_create(clock.clone(), world.spec("success", 0)).await;
    names.insert(world.selected[0].id.clone(), "crashed run's claim");
    clock.advance(120); // past the dead driver's lease

    let engine = world.engine(clock.clone(), Hooks::default()).await;
    let audit = engine.audit(&options(&world)).await.expect("audit");
    let expected = vec![
        (FindingKind::OrphanInstance, "orphan".to_string()),
        (FindingKind::GhostRecord, "ghost".into()),
        (FindingKind::CreatedLeak, "leak".into()),
        (FindingKind::StaleClaim, "stale".into()),
        (FindingKind::UnannouncedIdle, "class large".into()),
        (FindingKind::UnannouncedIdle, "quiet".into()),
        (FindingKind::UnfinishedRun, "the crashed run".into()),
    ];
    assert_eq!(named(&audit, &world, &names), expected, "{:#?}", audit.report);
    assert_eq!(audit.report.exit_code(), 1);
    // Without --fix nothing was written.
    assert_eq!(world.ec2_state(&orphan).await, "running");
    assert!(world.record(&ghost).await.is_some());

    let mut audit = audit;
    engine.audit_fix(&mut audit).await;
    let outcomes: Vec<(FindingKind, Option<RepairOutcome>)> =
        audit.report.findings.iter().map(|e| (e.finding.kind, e.outcome)).collect();
    assert!(
        outcomes.iter().all(|(kind, outcome)| match outcome {
            Some(RepairOutcome::NotRepairable) => *kind == FindingKind::UnannouncedIdle,
            other => other == &Some(RepairOutcome::Repaired),
        }),
        "{:#?}",
        audit.report
    );
    assert_eq!(audit.report.exit_code(), 0);
    assert_eq!(world.ec2_state(&orphan).await, "terminated");
    assert!(world.record(&ghost).await.is_none());
    for id in [&leak, &stale] {
        assert!(world.record(id).await.is_none());
        assert_eq!(world.ec2_state(id).await, "terminated");
    }
    let queued = world.queue_contents().await;
    assert!(queued["large"].iter().any(|body| body.contains(&quiet)), "{queued:?}");
    assert_eq!(engine.status(&world.run_id).await.expect("status").expect("record").state.to_string(), "Done");
    // Healthy instances were left as they were.
    assert_eq!(world.ec2_state(&running).await, "running");
    assert_eq!(world.ec2_state(&idle).await, "running");
    assert!(world.record(&running).await.is_some() && world.record(&idle).await.is_some());

    let again = engine.audit(&options(&world)).await.expect("second audit");
    assert_eq!(named(&again, &world, &names), Vec::new(), "{:#?}", again.report);
    assert_eq!(again.report.exit_code(), 0);
}

#[tokio::test]
async fn a_record_that_moved_since_the_audit_is_skipped() {
    let world = World::new("audit-moved").await;
    let later = world.start.plus_secs(LATER_SECS);
    let clock = TestClock::at(later);
    let leak = launch(&world, "large").await;
    world.put_record(&leak, "large", "created", "gone-run", later.plus_secs(-60)).await;
    let engine: Engine = world.engine(clock, Hooks::default()).await;
    let mut audit = engine.audit(&options(&world)).await.expect("audit");
    assert_eq!(audit.report.findings.len(), 1);
    assert_eq!(audit.record(&leak).map(|r| r.state.as_str()), Some("created"));

    // Creation's boot agent (or a re-run) moves the record between the read and the fix.
    world.put_record(&leak, "large", "running", "gone-run", later.plus_secs(1_800)).await;
    engine.audit_fix(&mut audit).await;
    assert_eq!(audit.report.findings[0].outcome, Some(RepairOutcome::Skipped), "{:#?}", audit.report);
    assert_eq!(audit.report.summary.skipped, 1);
    assert_eq!(audit.report.exit_code(), 1);
    assert!(world.record(&leak).await.is_some(), "the moved record is kept");
    assert_eq!(world.ec2_state(&leak).await, "running", "its instance is not terminated");
}

#[tokio::test]
async fn an_orphan_whose_record_appeared_since_the_audit_is_not_terminated() {
    let world = World::new("audit-late-record").await;
    let later = world.start.plus_secs(LATER_SECS);
    let orphan = launch(&world, "large").await;
    let engine = world.engine(TestClock::at(later), Hooks::default()).await;
    let mut audit = engine.audit(&options(&world)).await.expect("audit");
    assert_eq!(audit.report.findings.len(), 1);
    assert_eq!(audit.report.findings[0].finding.kind, FindingKind::OrphanInstance);
    // Creation (late) writes the instance's record between the read and the fix.
    world.put_record(&orphan, "large", "created", "late-run", later.plus_secs(300)).await;
    engine.audit_fix(&mut audit).await;
    assert_eq!(audit.report.findings[0].outcome, Some(RepairOutcome::Skipped), "{:#?}", audit.report);
    assert_eq!(world.ec2_state(&orphan).await, "running");
}

#[tokio::test]
async fn the_cli_prints_json_that_matches_its_schema_and_exits_1_on_findings() {
    // Other worktrees build their own binary into the shared target directory: run a private copy.
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = dir.path().join("post-provision");
    std::fs::copy(env!("CARGO_BIN_EXE_post-provision"), &binary).expect("copy the binary");
    let world = World::new("audit-cli").await;
    let leak = launch(&world, "large").await;
    // The CLI reads the system clock: a threshold already past, and no grace.
    world.put_record(&leak, "large", "created", "gone-run", world.start.plus_secs(-3_600)).await;
    let filter = format!("tag:InitialRunId={}", world.table);
    let output = Command::new(&binary)
        .env_remove("GITHUB_ACTIONS")
        .env("RUST_LOG", "warn")
        .args(["--output", "json", "--table", &world.table, "--region", "us-east-1"])
        .args(["--endpoint-url", &crate::harness::endpoint()])
        .args(["audit", "--grace-secs", "0", "--instance-filter", &filter])
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    crate::github::validate("audit.schema.json", &output.stdout);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["findings"][0]["kind"], "created-leak");
    assert_eq!(json["findings"][0]["instanceId"], leak.as_str());
    assert_eq!(json["summary"]["findings"], 1);

    // In GitHub Actions: one warning annotation per finding, and a job-summary table.
    let summary = dir.path().join("summary.md");
    let output = Command::new(&binary)
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("RUST_LOG", "warn")
        .args(["--table", &world.table, "--region", "us-east-1", "--endpoint-url", &crate::harness::endpoint()])
        .args(["audit", "--grace-secs", "0", "--instance-filter", &filter])
        .output()
        .expect("CLI");
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let warnings: Vec<&str> = stdout.lines().filter(|line| line.starts_with("::")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(warnings[0].starts_with("::warning title=post-provision audit::created-leak"), "{stdout}");
    let summary = std::fs::read_to_string(&summary).expect("job summary");
    assert!(summary.contains("| created-leak |") && summary.contains(&leak), "{summary}");
}

/// Instance records and pool instances of the scale test: `POST_PROVISION_AUDIT_SCALE`, default
/// 1,000, so that the suite stays quick: seeding 10,000 instances into moto takes about 7 minutes
/// on this machine (see docs/benchmarks.md, *Audit*, for the figures at 10,000).
fn audit_scale() -> usize {
    std::env::var("POST_PROVISION_AUDIT_SCALE").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000)
}

/// The bound: a pool of 10,000 records and 10,000 instances audited in at most 150
/// requests (paged Queries, DescribeInstances pages of 1,000, one GetQueueAttributes per class).
const AUDIT_REQUEST_BOUND: u64 = 150;

#[tokio::test]
async fn a_large_pool_is_audited_in_pages_within_the_request_bound() {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    use futures::stream::{self, StreamExt};

    let count = audit_scale();
    let world = World::new("audit-scale").await;
    let later = world.start.plus_secs(LATER_SECS);
    // Seeding: RunInstances of up to 1,000, each instance tagged with this world's value.
    let ids = world.launch_many(count, &world.table).await;
    assert_eq!(ids.len(), count);
    // One healthy `running` record per instance, BatchWriteItem of 25, four calls at once.
    let threshold = later.plus_secs(1_800).to_string();
    let s = |v: &str| AttributeValue::S(v.to_string());
    let batches: Vec<Vec<WriteRequest>> = ids
        .chunks(25)
        .map(|chunk| {
            chunk
                .iter()
                .map(|id| {
                    let item = HashMap::from([
                        ("PK".to_string(), s("TYPE#INSTANCE")),
                        ("SK".to_string(), s(&format!("ID#{id}"))),
                        ("entityType".to_string(), s("INSTANCE")),
                        ("identifier".to_string(), s(id)),
                        ("state".to_string(), s("running")),
                        ("runId".to_string(), s("older-run")),
                        ("threshold".to_string(), s(&threshold)),
                        ("resourceClass".to_string(), s("large")),
                        ("instanceType".to_string(), s("c6i.large")),
                        ("usageClass".to_string(), s("on-demand")),
                        ("updatedAt".to_string(), s(&world.start.to_string())),
                    ]);
                    WriteRequest::builder()
                        .put_request(PutRequest::builder().set_item(Some(item)).build().expect("put"))
                        .build()
                })
                .collect()
        })
        .collect();
    stream::iter(batches)
        .map(|mut requests| {
            let world = &world;
            async move {
                for _ in 0..10 {
                    let output = world
                        .clients
                        .dynamodb
                        .batch_write_item()
                        .request_items(world.table.clone(), requests)
                        .send()
                        .await
                        .expect("batch write");
                    requests =
                        output.unprocessed_items().and_then(|u| u.get(&world.table)).cloned().unwrap_or_default();
                    if requests.is_empty() {
                        return;
                    }
                }
                panic!("BatchWriteItem left {} items unprocessed after 10 calls", requests.len());
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;

    let limits = post_provision::config::Limits {
        // moto filters and renders every instance it holds per page: slow, but not AWS's cost.
        attempt_timeout: std::time::Duration::from_secs(600),
        operation_timeout: std::time::Duration::from_secs(1_200),
        ..crate::harness::test_limits()
    };
    let engine = world.engine_with(TestClock::at(later), Hooks::default(), limits, None).await;
    let started = std::time::Instant::now();
    let audit = engine.audit(&options(&world)).await.expect("audit");
    let elapsed = started.elapsed();
    let requests = engine.requests().snapshot();
    let total = engine.requests().total();
    println!("audit of {count} records and {count} instances: {total} requests {requests:?} in {elapsed:?}");
    assert_eq!(audit.report.summary.records, count);
    assert_eq!(audit.report.summary.instances, count);
    assert!(audit.report.findings.is_empty(), "{:#?}", audit.report.summary);
    assert!(total <= AUDIT_REQUEST_BOUND, "{total} requests: {requests:?}");
    // Exactly the calls the design names: pages, not requests per item.
    // AWS pages by 1,000; moto answers a filtered DescribeInstances in one page whatever its size.
    let describe_pages = requests.get("EC2.DescribeInstances").copied().unwrap_or(0);
    assert!((1..=count.div_ceil(1_000).max(1) as u64).contains(&describe_pages), "{requests:?}");
    assert_eq!(requests.get("SQS.GetQueueAttributes").copied(), Some(2), "{requests:?}");
}

/// A busy, healthy pool: the pool's release returns an instance in the same second, with the
/// same idle time, as a rollback returns its own. The records are alike but for the rollback's
/// `releasedBy`: `audit` reports nothing, and `audit --fix` changes nothing.
#[tokio::test]
async fn a_release_and_a_rollback_in_the_same_second_audit_clean() {
    let mut world = World::new("audit-same-second").await;
    world.seed(&[Seed::claimed("small"), Seed::claimed("large")], &[]).await;
    let clock = TestClock::at(world.start);
    // The pool's release, at the start second: running for another run, then idle with the
    // idle time the spec carries (300 s), re-queued.
    let released = launch(&world, "large").await;
    world.put_record(&released, "large", "idle", "", world.start.plus_secs(300)).await;
    send_pool_message(&world, "large", &released).await;
    // The rollback, in the same second: its idle threshold is the same start + 300 s.
    let engine = world.engine(clock.clone(), Hooks::default()).await;
    let outcome = engine.start(world.spec("failed", 1)).await.expect("rollback");
    assert_eq!(outcome.kind, post_provision::OutcomeKind::RolledBack);
    assert_eq!(outcome.record.idle_threshold, Some(world.start.plus_secs(300)));
    let ours = world.record(&world.selected[0].id).await.expect("record");
    let theirs = world.record(&released).await.expect("record");
    for name in ["state", "runId", "threshold", "updatedAt"] {
        assert_eq!(ours.get(name), theirs.get(name), "{name}: the two releases look alike");
    }

    clock.advance(60);
    let ids = [world.selected[0].id.clone(), world.selected[1].id.clone(), released.clone()];
    let mut before = Vec::new();
    for id in &ids {
        before.push(world.record(id).await);
    }
    let run_before = engine.status(&world.run_id).await.expect("status").expect("record");
    let mut audit = engine.audit(&options(&world)).await.expect("audit");
    let findings: Vec<_> = audit.report.findings.iter().filter(|e| !e.finding.is_hint()).collect();
    assert!(findings.is_empty(), "{:#?}", audit.report);
    assert_eq!(audit.report.exit_code(), 0);
    engine.audit_fix(&mut audit).await;
    assert_eq!(audit.report.exit_code(), 0);
    let mut after = Vec::new();
    for id in &ids {
        after.push(world.record(id).await);
    }
    assert_eq!(after, before, "--fix changed no record");
    assert_eq!(engine.status(&world.run_id).await.expect("status").expect("record"), run_before);
    // No pool message was sent again: each instance has the one its releaser sent.
    let queued: Vec<String> = world.queue_contents().await.into_values().flatten().collect();
    assert_eq!(queued.len(), 3, "{queued:?}");
    for name in ["sel0|", "sel1|", &format!("{released}|")] {
        assert_eq!(queued.iter().filter(|entry| entry.starts_with(name)).count(), 1, "{name}: {queued:?}");
    }
}
