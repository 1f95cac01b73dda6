//! Scale: each path with 1,000 instances (the run record stays far below DynamoDB's 400 KB item
//! limit), and 50 runs of 20 instances driven at once against one table and one set of pool
//! queues. Seeding is bulk (one RunInstances of up to 1,000, BatchWriteItem of 25), because moto
//! is slow per request. Timings belong to the benchmark (`scripts/bench`), not here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use futures::stream::{self, StreamExt};
use post_provision::aws::{load_sdk_config, Connection};
use post_provision::driver::{Hooks, TraceEvent};
use post_provision::timestamp::Timestamp;
use post_provision::{Engine, OutcomeKind, RunOutcome};

use crate::harness::{endpoint, test_limits, Clients, Seeded, TestClock, World, CLASSES};

/// DynamoDB's item size limit.
const ITEM_LIMIT_BYTES: usize = 400 * 1024;
/// Most items in one BatchWriteItem call (moto accepts more; AWS does not).
const BATCH_WRITE_ITEMS: usize = 25;

/// Clients for moto at this scale. Two things differ from AWS and are compensated here:
/// - Cost: moto's TransactWriteItems deep-copies the whole table once per action (about 4 s for
///   100 actions on a 1,000-item table, against tens of milliseconds on AWS), and RunInstances of
///   1,000 takes about 8 s, so the default 10 s attempt timeout would re-send requests that are
///   merely queued in the emulator.
/// - Isolation: moto serves requests on threads without isolating a transaction from writes to
///   the same table by other threads. A cancelled transaction puts back its snapshot of the
///   table, undoing their writes, and a deletion during the snapshot fails the request (HTTP 500).
///   DynamoDB transactions are serializable, so this world's requests reach moto one at a time
///   through [`one_request_at_a_time`]; the drivers still run concurrently, many requests are in
///   flight at once, and they interleave freely.
async fn slow_emulator_clients() -> Clients {
    let limits = scale_limits();
    let proxy = one_request_at_a_time(&endpoint()).await;
    let connection = Connection { region: Some("us-east-1".into()), endpoint_url: Some(proxy) };
    let sdk_config = load_sdk_config(&connection, &limits).await;
    Clients {
        dynamodb: aws_sdk_dynamodb::Client::new(&sdk_config),
        sqs: aws_sdk_sqs::Client::new(&sdk_config),
        ec2: aws_sdk_ec2::Client::new(&sdk_config),
        sdk_config,
    }
}

/// The test limits, with time for requests that wait their turn in the emulator (see
/// [`slow_emulator_clients`]); the engine applies them to its clients.
fn scale_limits() -> post_provision::config::Limits {
    post_provision::config::Limits {
        attempt_timeout: std::time::Duration::from_secs(240),
        operation_timeout: std::time::Duration::from_secs(600),
        ..test_limits()
    }
}

/// Starts a loopback HTTP/1.1 proxy to `upstream` that forwards one request at a time (each on
/// its own upstream connection, closed after the response) and returns its endpoint. It serves
/// the SDK's requests only: a head, then a body of `Content-Length` bytes.
async fn one_request_at_a_time(upstream: &str) -> String {
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let address = listener.local_addr().expect("proxy address");
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, turn) = (upstream.clone(), turn.clone());
            tokio::spawn(async move {
                // A broken connection ends only this exchange; the SDK reports and retries it.
                let _ = relay_one(client, &upstream, &turn).await;
            });
        }
    });
    format!("http://{address}")
}

async fn relay_one(
    mut client: tokio::net::TcpStream,
    upstream: &str,
    turn: &tokio::sync::Mutex<()>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
    let mut request = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let read = client.read(&mut buffer).await?;
        if read == 0 || request.len() > MAX_REQUEST_BYTES {
            return Ok(());
        }
        request.extend_from_slice(&buffer[..read]);
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let content_length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < head_end + 4 + content_length {
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let mut forwarded: Vec<u8> = head
        .lines()
        .filter(|line| !line.to_ascii_lowercase().starts_with("connection:"))
        .flat_map(|line| [line.as_bytes(), b"\r\n"].concat())
        .collect();
    forwarded.extend_from_slice(b"Connection: close\r\n\r\n");
    forwarded.extend_from_slice(&request[head_end + 4..head_end + 4 + content_length]);
    let response = {
        let _turn = turn.lock().await;
        let mut server = tokio::net::TcpStream::connect(upstream).await?;
        server.write_all(&forwarded).await?;
        let mut response = Vec::new();
        server.read_to_end(&mut response).await?;
        response
    };
    client.write_all(&response).await?;
    client.shutdown().await
}

/// A fresh table and pool queues, reached through [`slow_emulator_clients`] (the engine too).
async fn scale_world(name: &str) -> World {
    let mut world = World::new(name).await;
    world.clients = slow_emulator_clients().await;
    world
}

/// One instance record to seed.
struct RecordSeed {
    id: String,
    class: &'static str,
    state: &'static str,
    run_id: String,
    threshold: Timestamp,
}

fn instance_item(world: &World, seed: &RecordSeed) -> HashMap<String, AttributeValue> {
    let instance_type = CLASSES.iter().find(|c| c.0 == seed.class).map(|c| c.1).expect("known class");
    let s = |v: &str| AttributeValue::S(v.to_string());
    HashMap::from([
        ("PK".to_string(), s("TYPE#INSTANCE")),
        ("SK".to_string(), s(&format!("ID#{}", seed.id))),
        ("entityType".to_string(), s("INSTANCE")),
        ("identifier".to_string(), s(&seed.id)),
        ("state".to_string(), s(seed.state)),
        ("runId".to_string(), s(&seed.run_id)),
        ("threshold".to_string(), s(&seed.threshold.to_string())),
        ("resourceClass".to_string(), s(seed.class)),
        ("instanceType".to_string(), s(instance_type)),
        ("usageClass".to_string(), s("on-demand")),
        ("updatedAt".to_string(), s(&world.start.to_string())),
    ])
}

/// Writes instance records 25 to a call, a few calls at once, re-sending unprocessed items.
async fn put_records(world: &World, seeds: &[RecordSeed]) {
    let batches: Vec<Vec<WriteRequest>> = seeds
        .chunks(BATCH_WRITE_ITEMS)
        .map(|chunk| {
            chunk
                .iter()
                .map(|seed| {
                    let put = PutRequest::builder().set_item(Some(instance_item(world, seed))).build().expect("put");
                    WriteRequest::builder().put_request(put).build()
                })
                .collect()
        })
        .collect();
    stream::iter(batches)
        .map(|mut requests| async move {
            for _ in 0..10 {
                let output = world
                    .clients
                    .dynamodb
                    .batch_write_item()
                    .request_items(world.table.clone(), requests)
                    .send()
                    .await
                    .expect("batch write");
                requests = output.unprocessed_items().and_then(|u| u.get(&world.table)).cloned().unwrap_or_default();
                if requests.is_empty() {
                    return;
                }
            }
            panic!("BatchWriteItem left {} items unprocessed after 10 calls", requests.len());
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
}

/// The spec of one run, in the pool-message shape the earlier phases hand over.
fn spec_for(
    run_id: &str,
    selected: &[Seeded],
    created: &[Seeded],
    creation_state: &str,
    required: usize,
) -> post_provision::Spec {
    let entry = |s: &Seeded| {
        let (_, instance_type, cpu, mmem) = *CLASSES.iter().find(|c| c.0 == s.class).expect("known class");
        serde_json::json!({
            "id": s.id, "resourceClass": s.class, "instanceType": instance_type, "cpu": cpu, "mmem": mmem,
            "usageClass": "on-demand", "threshold": s.threshold.to_string()
        })
    };
    let json = serde_json::json!({
        "runId": run_id, "maxRuntimeMin": 30, "idleTimeSec": 300,
        "selection": {"numInstancesSelected": selected.len(), "numInstancesRequired": required,
                      "instances": selected.iter().map(entry).collect::<Vec<_>>()},
        "creation": {"state": creation_state, "numInstancesCreated": created.len(),
                     "instances": created.iter().map(entry).collect::<Vec<_>>()},
    });
    post_provision::Spec::from_json(&json.to_string()).expect("valid spec")
}

fn class_of(index: usize) -> &'static str {
    CLASSES[index % CLASSES.len()].0
}

/// Seeds `count` instances for the world's run: the first half selected (`claimed`), the rest
/// created (`running`), classes alternating, claims unexpired.
async fn seed_own_run(world: &mut World, count: usize) {
    let ids = world.launch_many(count, "100000000").await;
    let selected_count = count.div_ceil(2);
    let mut seeds = Vec::with_capacity(count);
    for (index, id) in ids.into_iter().enumerate() {
        let selected = index < selected_count;
        let seeded = Seeded {
            id: id.clone(),
            class: class_of(index).to_string(),
            threshold: world.start.plus_secs(if selected { 240 } else { 600 }),
        };
        seeds.push(RecordSeed {
            id,
            class: class_of(index),
            state: if selected { "claimed" } else { "running" },
            run_id: world.run_id.clone(),
            threshold: seeded.threshold,
        });
        if selected {
            world.selected.push(seeded);
        } else {
            world.created.push(seeded);
        }
    }
    put_records(world, &seeds).await;
}

fn to_json(value: &AttributeValue) -> serde_json::Value {
    match value {
        AttributeValue::S(text) | AttributeValue::N(text) => serde_json::Value::String(text.clone()),
        AttributeValue::Bool(flag) => serde_json::Value::Bool(*flag),
        AttributeValue::Null(_) => serde_json::Value::Null,
        AttributeValue::L(items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        AttributeValue::M(map) => serde_json::Value::Object(map.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        other => serde_json::Value::String(format!("{other:?}")),
    }
}

/// The stored size of an item, as the length of its JSON: an upper bound of DynamoDB's own
/// accounting for these items (names and strings count the same, JSON adds quotes and commas).
async fn item_json_bytes(world: &World, pk: &str, sk: &str) -> usize {
    let item = world
        .clients
        .dynamodb
        .get_item()
        .table_name(&world.table)
        .key("PK", AttributeValue::S(pk.into()))
        .key("SK", AttributeValue::S(sk.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item()
        .cloned()
        .unwrap_or_else(|| panic!("item {pk} {sk} is missing"));
    let object: serde_json::Map<String, serde_json::Value> =
        item.iter().map(|(k, v)| (k.clone(), to_json(v))).collect();
    serde_json::to_string(&object).expect("json").len()
}

/// The run record and every spec chunk item stay within DynamoDB's item limit.
async fn assert_items_within_limit(world: &World, outcome: &RunOutcome) {
    let record_bytes = item_json_bytes(world, "TYPE#RUN", &format!("ID#{}", world.run_id)).await;
    assert!(record_bytes < ITEM_LIMIT_BYTES / 4, "the run record takes {record_bytes} bytes of JSON");
    assert!(outcome.record.spec_chunks >= 1);
    for index in 0..outcome.record.spec_chunks {
        let sk = format!("ID#{}#{}#{index}", world.run_id, &outcome.record.spec_digest[..16]);
        let chunk_bytes = item_json_bytes(world, "TYPE#RUNSPEC", &sk).await;
        assert!(chunk_bytes < ITEM_LIMIT_BYTES, "spec chunk {index} takes {chunk_bytes} bytes of JSON");
    }
}

/// Every instance record in the table, by instance id (one paginated Query).
async fn instance_records(world: &World) -> BTreeMap<String, HashMap<String, AttributeValue>> {
    let mut records = BTreeMap::new();
    let mut pages = world
        .clients
        .dynamodb
        .query()
        .table_name(&world.table)
        .key_condition_expression("PK = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("TYPE#INSTANCE".into()))
        .consistent_read(true)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for item in page.expect("query").items() {
            let id = item["identifier"].as_s().expect("identifier").clone();
            records.insert(id, item.clone());
        }
    }
    records
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> String {
    item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default()
}

/// EC2 state name of each instance (DescribeInstances by id, 1,000 ids a call).
async fn ec2_states(world: &World, ids: &[String]) -> BTreeMap<String, String> {
    let mut states = BTreeMap::new();
    for chunk in ids.chunks(1_000) {
        let output = world
            .clients
            .ec2
            .describe_instances()
            .set_instance_ids(Some(chunk.to_vec()))
            .send()
            .await
            .expect("describe");
        for reservation in output.reservations() {
            for instance in reservation.instances() {
                let state = instance.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
                states.insert(instance.instance_id().expect("id").to_string(), state);
            }
        }
    }
    states
}

/// The instance id of every message in the queue, duplicates kept.
async fn drain_queue(world: &World, url: &str) -> Vec<String> {
    crate::harness::drain_queue(&world.clients.sqs, url)
        .await
        .iter()
        .map(|body| {
            let body: serde_json::Value = serde_json::from_str(body).expect("json body");
            body["id"].as_str().expect("message id").to_string()
        })
        .collect()
}

async fn engine_for(world: &World, clock: Arc<TestClock>) -> Engine {
    // Batches at the engine's default concurrency, the way it runs in production; the SDK
    // configuration (timeouts) is the world's.
    let limits = post_provision::config::Limits { concurrency: 8, ..scale_limits() };
    world.engine_with(clock, Hooks::default(), limits, None).await
}

const FLEET: usize = 1_000;

/// The sizes of the batches of one kind the driver sent, in order.
fn batch_sizes(outcome: &RunOutcome, size: impl Fn(&TraceEvent) -> Option<usize>) -> Vec<usize> {
    outcome.trace.iter().filter_map(size).collect()
}

#[tokio::test]
async fn a_thousand_instance_commit() {
    let mut world = scale_world("scale-commit").await;
    seed_own_run(&mut world, FLEET).await;
    let engine = engine_for(&world, TestClock::at(world.start)).await;
    let outcome = engine.start(world.spec("success", world.created.len())).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::Committed);
    assert_eq!(outcome.record.instance_count as usize, FLEET);
    let records = instance_records(&world).await;
    assert_eq!(records.len(), FLEET);
    let commit_threshold = world.start.plus_secs(30 * 60).to_string();
    for (id, item) in &records {
        assert_eq!(
            (text(item, "state"), text(item, "runId"), text(item, "threshold")),
            ("running".to_string(), world.run_id.clone(), commit_threshold.clone()),
            "{id}"
        );
    }
    for url in world.queues.values() {
        assert_eq!(
            crate::harness::settled_queue_depth(&world.clients.sqs, url).await,
            0,
            "a commit sends no pool message"
        );
    }
    // Batched: transactions of 98 (plus the fence's two checks: the run record, and no record of
    // a later attempt) rather than one write per instance.
    let mut sizes = batch_sizes(&outcome, |event| match event {
        TraceEvent::TransitionInstances { ids, .. } => Some(ids.len()),
        _ => None,
    });
    sizes.sort_unstable();
    let full = post_provision::core::MAX_FENCED_BATCH;
    assert_eq!(full, 98);
    let mut expected = vec![full; FLEET / full];
    expected.insert(0, FLEET % full);
    assert_eq!(sizes, expected);
    assert_items_within_limit(&world, &outcome).await;
}

#[tokio::test]
async fn a_thousand_instance_rollback() {
    let mut world = scale_world("scale-rollback").await;
    seed_own_run(&mut world, FLEET).await;
    let engine = engine_for(&world, TestClock::at(world.start)).await;
    let outcome = engine.start(world.spec("partial", world.created.len() + 1)).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::RolledBack);
    let records = instance_records(&world).await;
    assert_eq!(records.len(), FLEET);
    let idle_threshold = world.start.plus_secs(300).to_string();
    for (id, item) in &records {
        assert_eq!(
            (text(item, "state"), text(item, "runId"), text(item, "threshold")),
            ("idle".to_string(), String::new(), idle_threshold.clone()),
            "{id}"
        );
    }
    let sent: BTreeSet<&String> = outcome.record.messages_sent.iter().collect();
    assert_eq!(sent.len(), FLEET, "every instance's message is recorded once");
    assert_eq!(outcome.record.messages_sent.len(), FLEET);
    let mut depth = 0;
    for (class, url) in &world.queues {
        let class_depth = crate::harness::settled_queue_depth(&world.clients.sqs, url).await;
        assert_eq!(class_depth, FLEET / CLASSES.len(), "queue {class}");
        depth += class_depth;
    }
    assert_eq!(depth, FLEET);
    assert_eq!(
        batch_sizes(&outcome, |event| match event {
            TraceEvent::SendMessages { ids, .. } => Some(ids.len()),
            _ => None,
        }),
        vec![10; 100]
    );
    // The largest record of the three paths: it lists every message sent.
    assert_items_within_limit(&world, &outcome).await;
}

#[tokio::test]
async fn a_thousand_instance_cleanup_leaves_another_runs_instance_alone() {
    let mut world = scale_world("scale-cleanup").await;
    seed_own_run(&mut world, FLEET).await;
    // One claim has expired (commit is refused: emergency cleanup), and one instance in the
    // middle of a transaction batch belongs to another run (cleanup must leave it alone).
    let expired = world.selected[0].clone();
    let foreign = world.selected[150].clone();
    let past = world.start.plus_secs(-60);
    put_records(
        &world,
        &[
            RecordSeed {
                id: expired.id.clone(),
                class: class_of(0),
                state: "claimed",
                run_id: world.run_id.clone(),
                threshold: past,
            },
            RecordSeed {
                id: foreign.id.clone(),
                class: class_of(150),
                state: "claimed",
                run_id: "someone-else".into(),
                threshold: foreign.threshold,
            },
        ],
    )
    .await;
    world.selected[0].threshold = past;
    let engine = engine_for(&world, TestClock::at(world.start)).await;
    let outcome = engine.start(world.spec("success", world.created.len())).await.expect("run");
    assert_eq!(outcome.kind, OutcomeKind::CleanedUp);
    let records = instance_records(&world).await;
    assert_eq!(records.keys().collect::<Vec<_>>(), vec![&foreign.id], "only the other run's record is left");
    assert_eq!(text(&records[&foreign.id], "runId"), "someone-else");
    let ids: Vec<String> = world.named().into_iter().map(|(_, s)| s.id.clone()).collect();
    let states = ec2_states(&world, &ids).await;
    assert_eq!(states.len(), FLEET);
    for (id, state) in &states {
        let expected = if *id == foreign.id { "running" } else { "terminated" };
        assert_eq!(state, expected, "{id}");
    }
    // One call for the 999 instances it deleted.
    assert_eq!(
        batch_sizes(&outcome, |event| match event {
            TraceEvent::Terminate { ids } => Some(ids.len()),
            _ => None,
        }),
        vec![FLEET - 1]
    );
    assert_items_within_limit(&world, &outcome).await;
}

/// Runs driven at once in the shared-table test, and instances each run owns.
const RUNS: usize = 50;
const PER_RUN: usize = 20;

/// Runs `0..RUNS/2` commit, the rest roll back.
fn committing(run: usize) -> bool {
    run < RUNS / 2
}

/// Two committing and two rolling-back runs share nothing: their own table, queues and engine.
fn shares_nothing(run: usize) -> bool {
    run % (RUNS / 2) < 2
}

/// Rolling-back runs on the shared table that also list one instance a committing run owns
/// (as if selection had handed it to both): the isolation check must keep them off it.
fn contended_victim(run: usize) -> Option<usize> {
    let victim = run.checked_sub(RUNS / 2)?;
    (!committing(run) && !shares_nothing(run) && !shares_nothing(victim) && victim % 3 == 0).then_some(victim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_runs_at_once_on_one_table_each_instance_ends_in_exactly_one_runs_state() {
    let shared = Arc::new(scale_world("scale-many").await);
    let mut worlds: Vec<Arc<World>> = Vec::with_capacity(RUNS);
    for run in 0..RUNS {
        worlds.push(if shares_nothing(run) { Arc::new(scale_world("scale-alone").await) } else { shared.clone() });
    }
    let ids = shared.launch_many(RUNS * PER_RUN, "100000000").await;
    let run_ids: Vec<String> = (0..RUNS).map(|run| format!("{}-{run:02}", shared.run_id)).collect();
    let mut owned: Vec<(Vec<Seeded>, Vec<Seeded>)> = Vec::new();
    let mut owner_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut seeds_by_table: BTreeMap<String, Vec<RecordSeed>> = BTreeMap::new();
    for run in 0..RUNS {
        let (mut selected, mut created) = (Vec::new(), Vec::new());
        for slot in 0..PER_RUN {
            let id = ids[run * PER_RUN + slot].clone();
            let is_selected = slot < PER_RUN / 2;
            let threshold = shared.start.plus_secs(if is_selected { 240 } else { 600 });
            let class = class_of(run + slot);
            seeds_by_table.entry(worlds[run].table.clone()).or_default().push(RecordSeed {
                id: id.clone(),
                class,
                state: if is_selected { "claimed" } else { "running" },
                run_id: run_ids[run].clone(),
                threshold,
            });
            owner_of.insert(id.clone(), run);
            let seeded = Seeded { id, class: class.to_string(), threshold };
            if is_selected {
                selected.push(seeded);
            } else {
                created.push(seeded);
            }
        }
        owned.push((selected, created));
    }
    for world in &worlds {
        if let Some(seeds) = seeds_by_table.remove(&world.table) {
            put_records(world, &seeds).await;
        }
    }

    let mut specs = Vec::new();
    for run in 0..RUNS {
        let (selected, created) = &owned[run];
        if committing(run) {
            specs.push(spec_for(&run_ids[run], selected, created, "success", created.len()));
            continue;
        }
        let mut selected = selected.clone();
        if let Some(victim) = contended_victim(run) {
            selected.push(owned[victim].0[0].clone());
        }
        specs.push(spec_for(&run_ids[run], &selected, created, "partial", created.len() + 1));
    }
    let contended: Vec<usize> = (0..RUNS).filter(|run| contended_victim(*run).is_some()).collect();
    assert!(contended.len() >= 5, "the test contends for a few instances: {contended:?}");

    // One engine per table, one driver per run: the way a server process drives many runs.
    let mut engines: BTreeMap<String, Arc<Engine>> = BTreeMap::new();
    for world in &worlds {
        if !engines.contains_key(&world.table) {
            let engine = world.engine_with(TestClock::at(shared.start), Hooks::default(), scale_limits(), None).await;
            engines.insert(world.table.clone(), Arc::new(engine));
        }
    }
    let tasks: Vec<_> = specs
        .into_iter()
        .enumerate()
        .map(|(run, spec)| {
            let engine = engines[&worlds[run].table].clone();
            tokio::spawn(async move { engine.start(spec).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for (run, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.expect("task").unwrap_or_else(|error| panic!("run {run}: {error}"));
        let expected = if committing(run) { OutcomeKind::Committed } else { OutcomeKind::RolledBack };
        assert_eq!(outcome.kind, expected, "run {run}: {:?}", outcome.record.error);
        outcomes.push(outcome);
    }

    // Which runs' final state holds each instance: a committed run holds its instances as
    // `running` records with its runId and lifetime; a rolled-back run holds the instances it
    // released and announced.
    let mut records: BTreeMap<String, HashMap<String, AttributeValue>> = BTreeMap::new();
    let mut tables = BTreeSet::new();
    for world in &worlds {
        if tables.insert(world.table.clone()) {
            let table_records = instance_records(world).await;
            for id in table_records.keys() {
                assert_eq!(worlds[owner_of[id]].table, world.table, "{id} has a record in a table not its run's");
            }
            records.extend(table_records);
        }
    }
    assert_eq!(records.len(), RUNS * PER_RUN, "no record lost or added");
    let mut holders: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (id, item) in &records {
        if let Some(run) = run_ids.iter().position(|run_id| *run_id == text(item, "runId")) {
            if committing(run) && text(item, "state") == "running" {
                holders.entry(id.as_str()).or_default().push(run);
            }
        }
    }
    for (run, outcome) in outcomes.iter().enumerate() {
        if !committing(run) {
            for id in &outcome.record.messages_sent {
                holders.entry(id.as_str()).or_default().push(run);
            }
        }
    }
    for (id, owner) in &owner_of {
        let item = &records[id];
        assert_eq!(
            holders.get(id.as_str()),
            Some(&vec![*owner]),
            "instance {id} (owned by run {owner}) has record {} runId={:?}",
            text(item, "state"),
            text(item, "runId")
        );
        if committing(*owner) {
            assert_eq!(text(item, "threshold"), shared.start.plus_secs(1800).to_string(), "{id}");
        } else {
            assert_eq!((text(item, "state"), text(item, "runId")), ("idle".to_string(), String::new()), "{id}");
        }
    }
    assert_eq!(holders.len(), owner_of.len());

    // A contending run reported the instance it could not have, and left it alone.
    for run in contended {
        let victim = &owned[contended_victim(run).expect("contended")].0[0].id;
        let found =
            outcomes[run].trace.iter().any(|event| matches!(event, TraceEvent::Found { id, .. } if id == victim));
        assert!(found, "run {run} did not report {victim} as another run's");
    }

    // Each table's pool queues hold one message per instance rolled back there, none for a
    // committed one.
    let mut tables = BTreeSet::new();
    for world in &worlds {
        if !tables.insert(world.table.clone()) {
            continue;
        }
        let mut messages: Vec<String> = Vec::new();
        for url in world.queues.values() {
            messages.extend(drain_queue(world, url).await);
        }
        let mut expected: Vec<String> = owner_of
            .iter()
            .filter(|(_, owner)| !committing(**owner) && worlds[**owner].table == world.table)
            .map(|(id, _)| id.clone())
            .collect();
        messages.sort();
        expected.sort();
        assert_eq!(
            messages, expected,
            "queues of {}: one message per rolled-back instance, none for a committed one",
            world.table
        );
    }

    // Nothing was terminated.
    let states = ec2_states(&shared, &ids).await;
    assert_eq!(states.len(), RUNS * PER_RUN);
    assert!(states.values().all(|state| state == "running"), "{:?}", states.values().collect::<BTreeSet<_>>());
}
