//! Faithfulness of the simulation's in-memory AWS (`sim/`, issue 10): the same seeded sequences
//! of operations go through the real adapter (`AwsPorts`, against moto) and through the
//! simulation's ports (`post_provision_sim::memory`), and every answer is compared, then every
//! instance record. The sequences cover conditional transitions (one or two expected shapes, each
//! threshold condition), transactions with failing items, conditional deletes, sends (to a queue
//! and to one that does not exist), terminations (with unknown ids), the pool-tag check, and the
//! run-record writes (create, versioned replace, lease renewal, reads), and a create's pool guard
//! (the metadata item's `ConditionCheck`, present, absent or disagreeing, and the class and
//! instance type each guarded release needs).
//!
//! Where moto is known to differ from AWS (`../shared/reference/aws-facts.md`), the simulation
//! follows AWS, and nothing here depends on the difference:
//! - moto ignores `ClientRequestToken`: no call here is a retry of an earlier one;
//! - moto never throttles and injects no fault: the simulation's faults are off here (they are
//!   the adapter's error contract, covered by `tests/it/faults.rs` against the fault proxy);
//! - moto accepts BatchWriteItem beyond 25 items: neither side uses BatchWriteItem;
//! - moto does not isolate concurrent transactions: the operations here run one at a time.

use std::collections::BTreeMap;

use post_provision::aws::AwsPorts;
use post_provision::core::{
    Expectation, InstanceDeletion, InstanceKind, InstanceState, InstanceTransition, PoolGuard, ThresholdCondition,
    WriteResult,
};
use post_provision::machine::State;
use post_provision::ports::{
    AwsError, Compute, CreateOutcome, Fence, InstanceStore, OutgoingMessage, PoolMembership, PoolQueues, RunStore,
    StoreError, Termination,
};
use post_provision::record::{HistoryEntry, Lease, RunRecord, RUN_RECORD_SCHEMA_VERSION};
use post_provision::spec::{ResourceClass, ResourceClassConfig, Role};
use post_provision::timestamp::Timestamp;
use post_provision_sim::memory::memory_ports;
use post_provision_sim::ports::SimPorts;
use post_provision_sim::rng::Rng;

use crate::harness::{test_limits, World, CLASSES};

const STATES: [InstanceState; 5] = [
    InstanceState::Created,
    InstanceState::Running,
    InstanceState::Idle,
    InstanceState::Claimed,
    InstanceState::Terminated,
];
const RUNS: [&str; 3] = ["run-a", "run-b", ""];
/// Operations per sequence, and sequences (seeds): about 5 s against moto.
const STEPS: usize = 60;
const SEEDS: u64 = 6;

/// What both sides answered, in a form that compares: errors by class and code (the messages are
/// the service's own words and differ).
fn error_key(error: &AwsError) -> String {
    format!("{:?} {}", error.class, error.code.as_deref().unwrap_or("-"))
}

fn writes_key(result: Result<Vec<WriteResult>, AwsError>) -> String {
    match result {
        Ok(results) => format!("{results:?}"),
        Err(error) => format!("error {}", error_key(&error)),
    }
}

fn termination_key(result: Result<Termination, AwsError>) -> String {
    match result {
        Ok(mut termination) => {
            termination.terminated.sort();
            termination.not_found.sort();
            let refused: Vec<(String, String)> =
                termination.refused.iter().map(|(id, error)| (id.clone(), error_key(error))).collect();
            format!("terminated {:?} not found {:?} refused {refused:?}", termination.terminated, termination.not_found)
        }
        Err(error) => format!("error {}", error_key(&error)),
    }
}

fn membership_key(result: Result<PoolMembership, AwsError>) -> String {
    match result {
        Ok(mut membership) => {
            membership.foreign.sort();
            membership.unknown.sort();
            format!("{membership:?}")
        }
        Err(error) => format!("error {}", error_key(&error)),
    }
}

fn store_key<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(StoreError::Aws(error)) => format!("error {}", error_key(&error)),
        Err(StoreError::VersionConflict { found_version, .. }) => format!("version conflict, found {found_version:?}"),
        Err(other) => format!("error {other}"),
    }
}

fn threshold(start: Timestamp, rng: &mut Rng) -> Timestamp {
    // Around the sequence's `now`, the boundary itself included: `threshold > :now` is strict.
    start.plus_secs(*rng.pick(&[-600, -1, 0, 1, 600]))
}

/// An expected record shape: mostly the record's own shape (so that conditions hold, and the
/// threshold boundary is reached), sometimes any.
fn expectation(start: Timestamp, current: Option<&(String, String, String)>, rng: &mut Rng) -> Expectation {
    let mut states: Vec<InstanceState> = STATES.iter().copied().filter(|_| rng.chance(0.3)).collect();
    let mut run_id = rng.pick(&RUNS).to_string();
    let mut exactly = threshold(start, rng);
    if let Some((state, run, at)) = current.filter(|_| rng.chance(0.7)) {
        states.extend(STATES.iter().copied().filter(|s| s.as_str() == state));
        run_id = run.clone();
        if let Ok(at) = Timestamp::parse(at) {
            exactly = at;
        }
    }
    if states.is_empty() {
        states.push(*rng.pick(&STATES));
    }
    // Sometimes the record must name the run that released it, as a cleanup's mark of its own
    // release does (the adapter's `releasedBy`; the releases above write it on both sides).
    let released_by = if rng.chance(0.25) { Some(rng.pick(&["run-a", "run-b", "run-b#2"]).to_string()) } else { None };
    Expectation {
        states,
        run_id,
        threshold: match rng.below(3) {
            0 => ThresholdCondition::Unexpired,
            1 => ThresholdCondition::Exactly(exactly),
            _ => ThresholdCondition::Any,
        },
        released_by,
    }
}

/// Up to `most` distinct ids of `ids`.
fn subset(ids: &[String], most: usize, rng: &mut Rng) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::new();
    for _ in 0..rng.range(1, most as u64) {
        let id = rng.pick(ids).clone();
        if !chosen.contains(&id) {
            chosen.push(id);
        }
    }
    chosen
}

/// A fence on one of the two runs the test writes: mostly one that holds, sometimes another
/// owner, epoch or run (or a record not written yet), so both sides refuse alike. Its unknown
/// attempt is the next or the one after: `run-b`'s attempt 2 has a record from the start.
fn fence(rng: &mut Rng) -> Fence {
    Fence {
        run_id: rng.pick(&["run-a", "run-b"]).to_string(),
        attempt: 1,
        owner: rng.pick(&["owner-1", "owner-2"]).to_string(),
        epoch: *rng.pick(&[1, 1, 1, 2]),
        unknown_attempt: *rng.pick(&[2, 3]),
    }
}

fn run_record(run_id: &str, version: u64, owner: &str, state: State, at: Timestamp) -> RunRecord {
    RunRecord {
        schema_version: RUN_RECORD_SCHEMA_VERSION,
        run_id: run_id.to_string(),
        run_attempt: 1,
        version,
        state,
        spec_digest: post_provision::record::digest("{}"),
        spec_chunks: 1,
        instance_count: 0,
        created_at: at,
        updated_at: at,
        history: vec![HistoryEntry { state, at, reason: "differential".into() }],
        commit_threshold: None,
        idle_threshold: None,
        queue_urls: BTreeMap::new(),
        messages_sent: Vec::new(),
        refused_at_create: Vec::new(),
        committed_ids: Vec::new(),
        error: None,
        lease: Lease { owner: owner.to_string(), expires_at: at.plus_secs(30) },
        fencing_epoch: 1,
        ttl: None,
    }
}

/// The pool's configuration as the harness writes it to moto's metadata item.
fn pool_config(world: &World) -> ResourceClassConfig {
    CLASSES
        .iter()
        .map(|(class, _, cpu, mmem)| {
            (class.to_string(), ResourceClass { cpu: *cpu, mmem: *mmem, queue_url: world.queues[*class].clone() })
        })
        .collect()
}

/// A pool guard for `transitions`: mostly the pool's own configuration (all of it or
/// one class) and each record's own class and type, sometimes a class, queue, cpu, type or
/// class name that is not the pool's or not the record's.
fn guard(world: &World, transitions: &[InstanceTransition], rng: &mut Rng) -> PoolGuard {
    let pool = pool_config(world);
    let mut classes = pool.clone();
    if rng.chance(0.2) {
        classes.remove(*rng.pick(&["small", "large"]));
    }
    let mut class = |name: &str| classes.entry(name.to_string()).or_insert_with(|| pool["large"].clone()).clone();
    let spoiled = match rng.below(12) {
        0 => Some(("large", ResourceClass { cpu: class("large").cpu + 1, ..class("large") })),
        1 => Some(("large", ResourceClass { mmem: class("large").mmem + 1, ..class("large") })),
        2 => Some(("small", ResourceClass { queue_url: format!("{}x", class("small").queue_url), ..class("small") })),
        3 => Some(("x.y #z", class("x.y #z"))),
        _ => None,
    };
    if let Some((name, spoiled)) = spoiled {
        classes.insert(name.to_string(), spoiled);
    }
    let instances = transitions
        .iter()
        .map(|transition| {
            let (resource_class, instance_type) = match rng.below(10) {
                0 => ("small", "t3.small"),
                1 => ("small", "c6i.large"),
                2 => ("large", "t3.nano"),
                _ => ("large", "c6i.large"),
            };
            let kind = InstanceKind { resource_class: resource_class.into(), instance_type: instance_type.into() };
            (transition.instance_id.clone(), kind)
        })
        .collect();
    PoolGuard { classes, instances }
}

/// One seeded sequence; returns how many answers were compared.
async fn run_sequence(seed: u64) -> usize {
    let world = World::new(&format!("diff{seed}")).await;
    let limits = test_limits();
    let real = AwsPorts::new(&world.clients.sdk_config, &world.table, limits.clone());
    let memory: SimPorts = memory_ports(&limits);
    let mut rng = Rng::new(seed);
    let start = world.start;
    // The pool's metadata item, on both sides; one sequence in three has none.
    memory.put_resource_class_config(Some(pool_config(&world)));
    if seed % 3 == 0 {
        world
            .clients
            .dynamodb
            .delete_item()
            .table_name(&world.table)
            .key("PK", aws_sdk_dynamodb::types::AttributeValue::S("TYPE#METADATA".into()))
            .key("SK", aws_sdk_dynamodb::types::AttributeValue::S("ID#resource_class_config".into()))
            .send()
            .await
            .expect("delete the pool configuration");
        memory.put_resource_class_config(None);
    }

    // EC2: pool-tagged instances, one foreign one, and an id neither side knows.
    let mut ids = Vec::new();
    for _ in 0..6 {
        // The memory's EC2 tags its instances `InitialRunId = differential`: so does moto's here.
        let id = world.launch_tagged("large", Some(("InitialRunId", "differential"))).await;
        memory.launch_instance(&id, true);
        ids.push(id);
    }
    let foreign = world.launch_tagged("large", None).await;
    memory.launch_instance(&foreign, false);
    let unknown = "i-0fffffffffffffff0".to_string();
    let mut all_ids = ids.clone();
    all_ids.push(foreign.clone());
    all_ids.push(unknown.clone());

    // DynamoDB: instance records of every shape, some instances without one.
    for id in &all_ids {
        if rng.chance(0.8) {
            let state = rng.pick(&STATES).as_str();
            let run = *rng.pick(&RUNS);
            let at = threshold(start, &mut rng);
            world.put_record(id, "large", state, run, at).await;
            // The harness's records carry their class's instance type; some records have none.
            let mut instance_type = Some("c6i.large");
            if rng.chance(0.3) {
                instance_type = None;
                world
                    .clients
                    .dynamodb
                    .update_item()
                    .table_name(&world.table)
                    .key("PK", aws_sdk_dynamodb::types::AttributeValue::S("TYPE#INSTANCE".into()))
                    .key("SK", aws_sdk_dynamodb::types::AttributeValue::S(format!("ID#{id}")))
                    .update_expression("REMOVE instanceType")
                    .send()
                    .await
                    .expect("remove the instance type");
            }
            memory.put_instance_record(id, state, run, &at.to_string(), ("large", instance_type));
        }
    }
    let queue = world.queues["large"].clone();
    memory.create_queue(&queue);
    let missing_queue = format!("{queue}-missing");

    // A later attempt of `run-b` exists: fences that do not know of it are refused.
    let mut later = run_record("run-b", 1, "owner-1", State::Committing, start);
    later.run_attempt = 2;
    let chunks = vec!["{}".to_string()];
    assert!(matches!(real.create_run(&later, &chunks, 0, &[], None, start).await, Ok(CreateOutcome::Created)));
    assert!(matches!(memory.create_run(&later, &chunks, 0, &[], None, start).await, Ok(CreateOutcome::Created)));
    let mut compared = 0;
    let mut versions: BTreeMap<&str, u64> = BTreeMap::new();
    for step in 0..STEPS {
        let operation = rng.below(8);
        let (what, real_answer, memory_answer) = match operation {
            0 => {
                let batch: Vec<InstanceTransition> = subset(&all_ids, 4, &mut rng)
                    .into_iter()
                    .map(|id| {
                        let current = memory.instance_record(&id);
                        let mut expected = vec![expectation(start, current.as_ref(), &mut rng)];
                        if rng.chance(0.3) {
                            expected.push(expectation(start, current.as_ref(), &mut rng));
                        }
                        // Sometimes a release's `releasedBy` (an attempt's record identifier).
                        let released_by = if rng.chance(0.4) {
                            Some(rng.pick(&["run-a", "run-b", "run-b#2"]).to_string())
                        } else {
                            None
                        };
                        InstanceTransition {
                            instance_id: id,
                            role: Role::Selected,
                            expected,
                            new_state: *rng.pick(&STATES),
                            new_run_id: rng.pick(&RUNS).to_string(),
                            new_threshold: threshold(start, &mut rng),
                            released_by,
                        }
                    })
                    .collect();
                let fence = fence(&mut rng);
                let what = format!("transition {batch:?} fenced by {fence:?}");
                (
                    what,
                    writes_key(real.transition(&batch, start, &fence).await),
                    writes_key(memory.transition(&batch, start, &fence).await),
                )
            }
            1 => {
                let batch: Vec<InstanceDeletion> = subset(&all_ids, 4, &mut rng)
                    .into_iter()
                    .map(|id| {
                        // Mostly the record's own runId, so that marked records are deleted.
                        let owner = match memory.instance_record(&id) {
                            Some((_, run, _)) if rng.chance(0.6) => run,
                            _ => rng.pick(&RUNS).to_string(),
                        };
                        InstanceDeletion { instance_id: id, owner_run_id: owner }
                    })
                    .collect();
                let fence = fence(&mut rng);
                let run: &'static str = if fence.run_id == "run-a" { "run-a" } else { "run-b" };
                match versions.get(run).copied() {
                    // A cleanup's last deletions with its terminal record, whose version is the fence.
                    Some(version) if rng.chance(0.4) => {
                        let expected = if rng.chance(0.75) { version } else { version + 5 };
                        let record = run_record(run, version + 1, &fence.owner, State::Failed, start);
                        let unknown = fence.unknown_attempt;
                        let real_answer = real.delete_finishing(&batch, &record, expected, unknown).await;
                        let memory_answer = memory.delete_finishing(&batch, &record, expected, unknown).await;
                        let landed =
                            matches!(&real_answer, Ok(results) if results.iter().all(|r| *r == WriteResult::Applied));
                        if landed && expected == version {
                            versions.insert(run, version + 1);
                        }
                        let what = format!("delete {batch:?} finishing {run} v{version} expecting v{expected}, attempt {unknown} unknown");
                        (what, writes_key(real_answer), writes_key(memory_answer))
                    }
                    _ => {
                        let what = format!("delete {batch:?} fenced by {fence:?}");
                        (
                            what,
                            writes_key(real.delete(&batch, &fence).await),
                            writes_key(memory.delete(&batch, &fence).await),
                        )
                    }
                }
            }
            2 => {
                let url = if rng.chance(0.2) { missing_queue.clone() } else { queue.clone() };
                let messages: Vec<OutgoingMessage> = subset(&ids, 3, &mut rng)
                    .into_iter()
                    .map(|id| OutgoingMessage {
                        body: serde_json::json!({"id": id, "resourceClass": "large", "threshold": start.to_string()})
                            .to_string(),
                        instance_id: id,
                    })
                    .collect();
                let key = |result: Result<Vec<(String, AwsError)>, AwsError>| match result {
                    Ok(failed) => {
                        format!("failed {:?}", failed.iter().map(|(id, e)| (id, error_key(e))).collect::<Vec<_>>())
                    }
                    Err(error) => format!("error {:?}", error.class),
                };
                let what = format!("send {} to {url}", messages.len());
                (what, key(real.send(&url, &messages).await), key(memory.send(&url, &messages).await))
            }
            3 => {
                let batch = subset(&all_ids, 4, &mut rng);
                let what = format!("terminate {batch:?}");
                (what, termination_key(real.terminate(&batch).await), termination_key(memory.terminate(&batch).await))
            }
            4 => {
                let batch = subset(&all_ids, 5, &mut rng);
                let what = format!("pool membership {batch:?}");
                (
                    what,
                    membership_key(real.pool_membership(&batch).await),
                    membership_key(memory.pool_membership(&batch).await),
                )
            }
            5 => {
                // Run records: create, or replace with the right or a wrong version.
                let run = *rng.pick(&["run-a", "run-b"]);
                let owner = *rng.pick(&["owner-1", "owner-2"]);
                let state = *rng.pick(&[State::Committing, State::RollingBack, State::Done]);
                match versions.get(run).copied() {
                    None => {
                        let record = run_record(run, 1, owner, state, start);
                        let chunks = vec!["{}".to_string()];
                        // Sometimes the state's first transitions ride along (a small run).
                        let transitions: Vec<InstanceTransition> = if rng.chance(0.5) {
                            subset(&all_ids, 3, &mut rng)
                                .into_iter()
                                .map(|id| {
                                    let current = memory.instance_record(&id);
                                    InstanceTransition {
                                        expected: vec![expectation(start, current.as_ref(), &mut rng)],
                                        instance_id: id,
                                        role: Role::Created,
                                        new_state: *rng.pick(&STATES),
                                        new_run_id: run.to_string(),
                                        new_threshold: threshold(start, &mut rng),
                                        released_by: None,
                                    }
                                })
                                .collect()
                        } else {
                            Vec::new()
                        };
                        let guard = rng.chance(0.6).then(|| guard(&world, &transitions, &mut rng));
                        let real_answer =
                            real.create_run(&record, &chunks, 0, &transitions, guard.as_ref(), start).await;
                        let memory_answer =
                            memory.create_run(&record, &chunks, 0, &transitions, guard.as_ref(), start).await;
                        if matches!(real_answer, Ok(CreateOutcome::Created)) {
                            versions.insert(run, 1);
                        }
                        let key = |result: Result<CreateOutcome, StoreError>| {
                            store_key(result.map(|outcome| match outcome {
                                CreateOutcome::Created => "created".to_string(),
                                CreateOutcome::Exists(existing) => format!("exists v{}", existing.version),
                                CreateOutcome::EffectsRefused(results) => format!("effects refused {results:?}"),
                                CreateOutcome::PoolRefused => "pool refused".to_string(),
                            }))
                        };
                        let what = format!("create {run} with {transitions:?} guarded by {guard:?}");
                        (what, key(real_answer), key(memory_answer))
                    }
                    Some(version) => {
                        let expected = if rng.chance(0.75) { version } else { version + 5 };
                        let record = run_record(run, version + 1, owner, state, start);
                        let real_answer = store_key(real.replace_run(&record, expected).await);
                        let memory_answer = store_key(memory.replace_run(&record, expected).await);
                        if real_answer == "()" {
                            versions.insert(run, version + 1);
                        }
                        (format!("replace {run} v{version} expecting v{expected}"), real_answer, memory_answer)
                    }
                }
            }
            6 => {
                // A rollback's guarded create of a run of its own: its releases expect mostly
                // the records' own shapes, so that some land and some are refused by the guard.
                let run = format!("run-g{step}");
                let record = run_record(&run, 1, "owner-1", State::RollingBack, start);
                let transitions: Vec<InstanceTransition> = subset(&all_ids, 2, &mut rng)
                    .into_iter()
                    .map(|id| {
                        let current = memory.instance_record(&id);
                        // Mostly the record's exact shape, so that the guard's conditions decide.
                        let exact = current.as_ref().filter(|_| rng.chance(0.8)).and_then(|(state, run, at)| {
                            Some(Expectation {
                                states: STATES.iter().copied().filter(|s| s.as_str() == state).collect(),
                                run_id: run.clone(),
                                threshold: ThresholdCondition::Exactly(Timestamp::parse(at).ok()?),
                                released_by: None,
                            })
                        });
                        let expected = exact.unwrap_or_else(|| expectation(start, current.as_ref(), &mut rng));
                        InstanceTransition {
                            expected: vec![expected],
                            instance_id: id,
                            role: Role::Selected,
                            new_state: InstanceState::Idle,
                            new_run_id: String::new(),
                            new_threshold: threshold(start, &mut rng),
                            released_by: Some(run.clone()),
                        }
                    })
                    .collect();
                let guard = guard(&world, &transitions, &mut rng);
                let chunks = vec!["{}".to_string()];
                let key = |result: Result<CreateOutcome, StoreError>| store_key(result.map(|o| format!("{o:?}")));
                (
                    format!("guarded create {run} with {transitions:?} guarded by {guard:?}"),
                    key(real.create_run(&record, &chunks, 0, &transitions, Some(&guard), start).await),
                    key(memory.create_run(&record, &chunks, 0, &transitions, Some(&guard), start).await),
                )
            }
            _ => {
                let run = *rng.pick(&["run-a", "run-b", "run-none"]);
                let owner = *rng.pick(&["owner-1", "owner-2"]);
                match rng.below(4) {
                    0 => {
                        let until = start.plus_secs(45);
                        (
                            format!("renew {run} as {owner}"),
                            store_key(real.renew_lease(run, 1, owner, until).await),
                            store_key(memory.renew_lease(run, 1, owner, until).await),
                        )
                    }
                    1 => (
                        format!("load {run}"),
                        store_key(real.load_run(run, 1).await),
                        store_key(memory.load_run(run, 1).await),
                    ),
                    2 => (
                        format!("load attempts of {run}"),
                        store_key(real.load_attempts(run).await),
                        store_key(memory.load_attempts(run).await),
                    ),
                    _ => {
                        let digest = post_provision::record::digest("{}");
                        (
                            format!("load spec of {run}"),
                            store_key(real.load_spec(run, &digest, 1).await),
                            store_key(memory.load_spec(run, &digest, 1).await),
                        )
                    }
                }
            }
        };
        assert_eq!(
            memory_answer, real_answer,
            "seed {seed} step {step}: {what}: the simulation (left) answered otherwise than the adapter against moto (right)"
        );
        compared += 1;
    }
    // Every instance record ends the same on both sides.
    for id in &all_ids {
        let real_record = world.record(id).await.map(|item| {
            let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            (text("state"), text("runId"), text("threshold"))
        });
        assert_eq!(memory.instance_record(id), real_record, "seed {seed}: record of {id} differs at the end");
        compared += 1;
    }
    compared
}

#[tokio::test(flavor = "multi_thread")]
async fn in_memory_aws_answers_every_operation_as_the_adapter_against_moto() {
    let mut compared = 0;
    for seed in 1..=SEEDS {
        compared += run_sequence(seed).await;
    }
    assert!(compared >= SEEDS as usize * STEPS, "every step compared an answer");
}

/// The transaction cancellation codes the simulation injects read as the adapter reads them.
#[test]
fn injected_cancellation_reasons_classify_as_in_the_adapter() {
    for code in ["TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"] {
        let simulated = post_provision_sim::ports::reason_result(code);
        let adapter = match code {
            // `src/aws/dynamodb.rs` `cancellation_results`: load first, then by class.
            "ThrottlingError" | "ProvisionedThroughputExceeded" => Ok(WriteResult::Throttled),
            other if post_provision::aws::classify_code(other, None).is_retryable() => Ok(WriteResult::Cancelled),
            other => Err(post_provision::aws::classify_code(other, None)),
        };
        assert_eq!(simulated.map_err(|error| error.class), adapter, "{code}");
    }
}
