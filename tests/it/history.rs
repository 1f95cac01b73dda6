//! The run history at scale (issue 19): a sweep finds an unfinished run among more finished
//! records than any bound, reading only the unfinished; `list` reads only what it shows; a
//! listing that cannot show every unfinished run exits non-zero; a table from before the run
//! index still finds its runs, and `init` indexes them.

use std::collections::{BTreeMap, HashMap};
use std::process::Output;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use post_provision::driver::Hooks;
use post_provision::machine::State;
use post_provision::record::{HistoryEntry, Lease, RunRecord, RUN_RECORD_SCHEMA_VERSION};
use post_provision::timestamp::Timestamp;
use post_provision::OutcomeKind;

use crate::harness::{test_limits, Owner, Seed, TestClock, World};

/// A finished (committed) run record, as a retained run leaves it.
fn finished_record(run_id: &str, at: Timestamp) -> RunRecord {
    RunRecord {
        schema_version: RUN_RECORD_SCHEMA_VERSION,
        run_id: run_id.to_string(),
        run_attempt: 1,
        version: 2,
        state: State::Done,
        spec_digest: post_provision::record::digest("{}"),
        spec_chunks: 1,
        instance_count: 1,
        created_at: at,
        updated_at: at,
        history: vec![HistoryEntry { state: State::Done, at, reason: "1 instances committed".into() }],
        commit_threshold: Some(at.plus_secs(1_800)),
        idle_threshold: None,
        queue_urls: BTreeMap::new(),
        messages_sent: Vec::new(),
        refused_at_create: Vec::new(),
        error: None,
        lease: Lease { owner: String::new(), expires_at: at },
        fencing_epoch: 1,
        committed_ids: Vec::new(),
        ttl: Some(at.plus_secs(30 * 86_400).unix_secs()),
    }
}

/// Writes run records directly, 25 to a `BatchWriteItem`.
async fn put_items(world: &World, items: Vec<HashMap<String, AttributeValue>>) {
    for chunk in items.chunks(25) {
        let requests: Vec<WriteRequest> = chunk
            .iter()
            .map(|item| {
                let put = PutRequest::builder().set_item(Some(item.clone())).build().expect("put request");
                WriteRequest::builder().put_request(put).build()
            })
            .collect();
        let mut pending = Some(HashMap::from([(world.table.clone(), requests)]));
        while let Some(batch) = pending.take().filter(|b| !b.is_empty()) {
            let output =
                world.clients.dynamodb.batch_write_item().set_request_items(Some(batch)).send().await.expect("seed");
            pending = output.unprocessed_items().cloned().filter(|left| left.values().any(|v| !v.is_empty()));
        }
    }
}

/// `count` finished runs, created one second apart from `first` on, with run ids that sort
/// both before and after the world's own (`run-…`): key order is not time order.
async fn seed_finished(world: &World, count: usize, first: Timestamp) {
    let items = (0..count)
        .map(|index| {
            let run_id =
                if index % 2 == 0 { format!("a-finished-{index:05}") } else { format!("z-finished-{index:05}") };
            post_provision::aws::run_record_item(&finished_record(&run_id, first.plus_secs(index as i64)))
                .expect("record item")
        })
        .collect();
    put_items(world, items).await;
}

fn cli(world: &World, args: &[&str]) -> Output {
    std::process::Command::new(crate::harness::cli_binary())
        .env("RUST_LOG", "warn")
        .env_remove("POST_PROVISION_TEST_HOOK")
        .env_remove("GITHUB_ACTIONS")
        .arg("--table")
        .arg(&world.table)
        .args(args)
        .output()
        .expect("run the CLI")
}

fn queries(engine: &post_provision::Engine) -> u64 {
    engine.requests().snapshot().get("DynamoDB.Query").copied().unwrap_or(0)
}

#[tokio::test]
async fn an_unfinished_run_is_found_among_more_finished_runs_than_any_bound() {
    let mut world = World::new("history").await;
    world.seed(&[Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: 4_000 }], &[]).await;
    let clock = TestClock::at(world.start);
    world.crash_after_create(clock.clone(), world.spec("success", 0)).await;
    // Finished runs older and newer than the crashed one, more than the sweep's bound and the
    // listing's limit, with run ids on both sides of its own.
    seed_finished(&world, 60, world.start.plus_secs(-120)).await;
    seed_finished(&world, 240, world.start.plus_secs(1)).await;
    clock.advance(test_limits().lease_secs + 1);

    let sweeper = world.engine(clock.clone(), Hooks::default()).await;
    let unfinished = sweeper.list(true, 10).await.expect("list");
    assert!(unfinished.indexed && !unfinished.is_cut(), "{unfinished:?}");
    assert_eq!(unfinished.records.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec![world.run_id.as_str()]);
    assert_eq!(unfinished.items_read, 1, "only the unfinished run is read");
    // `list` reads what it shows (newest first): at most limit + 1 items of each partition.
    let newest = sweeper.list(false, 5).await.expect("list");
    assert_eq!(newest.records.len(), 5);
    assert!(newest.more && !newest.bounded);
    assert!(newest.items_read <= 12, "{} items read", newest.items_read);
    assert!(newest.records.windows(2).all(|pair| pair[0].created_at >= pair[1].created_at));
    assert_eq!(newest.records[0].run_id, "z-finished-00239");

    sweeper.requests().reset();
    let sweep = sweeper.resume_all(5).await.expect("resume all");
    assert!(!sweep.cut);
    let finished: Vec<(String, OutcomeKind)> =
        sweep.results.into_iter().map(|(run, result)| (run, result.expect("finished").kind)).collect();
    assert_eq!(finished, vec![(world.run_id.clone(), OutcomeKind::Committed)]);
    // One Query found it; resuming a run reads its attempts with one more.
    assert!(queries(&sweeper) <= 2, "{:?}", sweeper.requests().snapshot());
    assert!(sweeper.list(true, 10).await.expect("list").records.is_empty());
}

#[tokio::test]
async fn a_listing_that_cannot_show_every_unfinished_run_exits_non_zero() {
    let mut world = World::new("history-cut").await;
    world.seed(&[Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: 4_000 }], &[]).await;
    let clock = TestClock::at(world.start);
    // Two unfinished runs (a second attempt's record is a run record of its own).
    world.crash_after_create(clock.clone(), world.spec("success", 0)).await;
    let mut second = world.spec("success", 0);
    second.run_id = format!("{}-b", world.run_id);
    world.crash_after_create(clock.clone(), second).await;
    seed_finished(&world, 30, world.start.plus_secs(-60)).await;

    let all = cli(&world, &["list", "--unfinished", "--limit", "2"]);
    assert_eq!(all.status.code(), Some(0), "{}", String::from_utf8_lossy(&all.stderr));
    let cut = cli(&world, &["list", "--unfinished", "--limit", "1"]);
    assert_eq!(cut.status.code(), Some(post_provision::cli::EXIT_CUT), "{}", String::from_utf8_lossy(&cut.stderr));
    assert!(String::from_utf8_lossy(&cut.stderr).contains("cut"), "{}", String::from_utf8_lossy(&cut.stderr));
    // A plain `list` shows the newest runs; its limit hides no unfinished run by design.
    let history = cli(&world, &["list", "--limit", "3"]);
    assert_eq!(history.status.code(), Some(0), "{}", String::from_utf8_lossy(&history.stderr));
    // A sweep with a bound below the unfinished runs says it was cut.
    let sweep = world.engine(clock, Hooks::default()).await.resume_all(1).await.expect("resume all");
    assert!(sweep.cut && sweep.unfinished_read == 1, "{sweep:?}");
}

/// A table from before the run index: records without its attributes, no readiness item.
/// Listings still find an unfinished run (reading every run record), and `init` indexes the
/// old records, after which the index finds it.
#[tokio::test]
async fn records_from_before_the_index_are_found_and_init_indexes_them() {
    let world = World::new("history-old").await;
    let dynamodb = &world.clients.dynamodb;
    let ready_key = |item: aws_sdk_dynamodb::operation::delete_item::builders::DeleteItemFluentBuilder| {
        item.key("PK", AttributeValue::S("TYPE#RUNINDEX".into()))
            .key("SK", AttributeValue::S("ID#post-provision-runs".into()))
    };
    ready_key(dynamodb.delete_item().table_name(&world.table)).send().await.expect("forget the index");
    let old = |record: &RunRecord| {
        let mut item = post_provision::aws::run_record_item(record).expect("item");
        item.retain(|name, _| !name.starts_with("runIndex"));
        item.insert("schemaVersion".into(), AttributeValue::N("2".into()));
        item
    };
    let mut crashed = finished_record("old-unfinished", world.start.plus_secs(-600));
    crashed.state = State::Committing;
    crashed.history = vec![HistoryEntry { state: State::Committing, at: crashed.created_at, reason: "old".into() }];
    let mut items = vec![old(&crashed)];
    items.extend((0..3).map(|i| old(&finished_record(&format!("old-{i}"), world.start.plus_secs(-900 + i)))));
    put_items(&world, items).await;

    let engine = world.engine(TestClock::at(world.start), Hooks::default()).await;
    let fallback = engine.list(true, 10).await.expect("list");
    assert!(!fallback.indexed && !fallback.is_cut());
    assert_eq!(fallback.records.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["old-unfinished"]);

    let check = post_provision::aws::ensure_run_index(dynamodb, &world.table, world.start).await.expect("init");
    assert_eq!((check.created, check.backfilled), (false, 4));
    let indexed = engine.list(true, 10).await.expect("list");
    assert!(indexed.indexed && !indexed.is_cut());
    assert_eq!(indexed.records.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["old-unfinished"]);
    assert_eq!(indexed.records[0].schema_version, 2, "an old record keeps its version until a driver writes it");
    assert_eq!(engine.list(false, 10).await.expect("list").records.len(), 4);
    // Repeating init finds nothing left to index.
    let again = post_provision::aws::ensure_run_index(dynamodb, &world.table, world.start).await.expect("init");
    assert_eq!(again.backfilled, 0);
}
