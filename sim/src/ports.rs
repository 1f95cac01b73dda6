//! The `Ports` of the simulation: a thin layer over the in-memory services that returns exactly
//! what `post_provision::aws::AwsPorts` returns (its port contract), and the place where the
//! simulation interleaves: before and after every call the pool's other actors may step, faults
//! are injected, virtual time passes, and a driver may crash or be paused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use post_provision::core::{InstanceDeletion, InstanceTransition, ObservedRecord, WriteResult};
use post_provision::ports::{
    AwsError, Compute, CreateOutcome, ErrorClass, Fence, InstanceFacts, InstanceStore, OutgoingMessage, PoolMembership,
    PoolQueues, RunStore, StoreError, Termination,
};
use post_provision::record::{self, RunRecord};
use post_provision::spec::ResourceClassConfig;
use post_provision::timestamp::Timestamp;
use tokio::sync::Notify;

use crate::dynamo::{Action, Create, InstanceItem, Reason};
use crate::ec2::TerminateError;
use crate::world::{Who, World};
use crate::{actors, invariants};

/// What `AwsPorts` makes of a transaction cancellation reason code the simulation injects: load
/// (`ThrottlingError`, `ProvisionedThroughputExceeded`) is `Throttled`; a code that
/// `post_provision::aws::classify_code` calls retryable (`TransactionConflict`) is `Cancelled`;
/// anything else fails the whole call with its class. The differential test
/// (`tests/it/differential.rs`) checks this table against the adapter's own classification.
pub fn reason_result(code: &'static str) -> Result<WriteResult, AwsError> {
    match code {
        "ThrottlingError" | "ProvisionedThroughputExceeded" => Ok(WriteResult::Throttled),
        "TransactionConflict" => Ok(WriteResult::Cancelled),
        _ => Err(error("DynamoDB", "TransactWriteItems", Some(code), "transaction item rejected", ErrorClass::Other)),
    }
}

/// What happens to one port call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Throttled after the adapter's retries: nothing written.
    Throttle,
    /// A 5xx after the adapter's retries: nothing written.
    ServerError,
    /// The operation timed out; whether the write landed is the coin's.
    Timeout {
        applied: bool,
    },
    /// The write landed, the answer was lost.
    LostAnswer,
}

/// One driver's handle on the world.
pub struct SimPorts {
    /// The world.
    pub world: Arc<Mutex<World>>,
    /// Which driver this is.
    pub client: u32,
    /// Notified when this driver reaches its crash point: the simulation drops its future.
    pub crashed: Arc<Notify>,
    /// Notified when this driver is paused: a sweeper may take its run over.
    pub paused: Arc<Notify>,
    /// `Limits::operation_timeout`, `not_found_retries`, `not_found_delay` of the driver: the
    /// adapter applies them inside its calls.
    pub operation_timeout: Duration,
    /// See `operation_timeout`.
    pub not_found_retries: u32,
    /// See `operation_timeout`.
    pub not_found_delay: Duration,
}

fn error(
    service: &'static str,
    operation: &'static str,
    code: Option<&str>,
    message: &str,
    class: ErrorClass,
) -> AwsError {
    AwsError { service, operation, code: code.map(str::to_string), message: message.to_string(), class }
}

impl SimPorts {
    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }

    /// One AWS request of this driver: waits out a pause, lets actors step, injects a fault or
    /// applies `apply` to the world, checks the invariants, and crashes where the seed says.
    async fn call<T>(
        &self,
        service: &'static str,
        operation: &'static str,
        write: bool,
        apply: impl FnOnce(&mut World) -> T,
    ) -> Result<T, AwsError> {
        // A stopped process makes no calls: wait out a pause (its lease may lapse meanwhile).
        loop {
            let wait = {
                let world = self.lock();
                world.clients[&self.client].paused_until - world.now_unix()
            };
            if wait <= 0 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        }
        let decided = {
            let mut world = self.lock();
            let world = &mut *world;
            // A crashed driver makes no more calls: its future is about to be dropped.
            if world.clients[&self.client].crashed {
                None
            } else {
                world.stats.steps += 1;
                actors::step(world);
                let now = world.now_unix();
                let client = world.clients.get_mut(&self.client).expect("client");
                client.calls += 1;
                let calls = client.calls;
                let calm = client.calm;
                let crash = client.crash_at.filter(|(at, _)| *at == calls).map(|(_, lands)| lands);
                let pause_secs = client.pause_at.filter(|(at, _)| *at == calls).map(|(_, secs)| secs);
                if let Some(secs) = pause_secs {
                    client.paused_until = now + secs;
                }
                let swarm = &world.swarm;
                let (p_throttle, p_5xx, p_timeout, p_lost) =
                    (swarm.p_throttle, swarm.p_5xx, swarm.p_timeout, if write { swarm.p_lost_answer } else { 0.0 });
                let rng = &mut world.rng;
                let fault = if calm {
                    Fault::None
                } else if rng.chance(p_throttle) {
                    Fault::Throttle
                } else if rng.chance(p_5xx) {
                    Fault::ServerError
                } else if rng.chance(p_timeout) {
                    Fault::Timeout { applied: write && rng.chance(0.5) }
                } else if rng.chance(p_lost) {
                    Fault::LostAnswer
                } else {
                    Fault::None
                };
                let max_latency = world.swarm.max_latency_ms;
                let before = world.rng.range(0, max_latency);
                let after = world.rng.range(0, max_latency);
                world.fold(&format!("{} {operation} {calls} {fault:?}", self.client));
                world.log(|| {
                    format!("driver {} calls {service} {operation} (call {calls}) fault {fault:?}", self.client)
                });
                Some((fault, crash, pause_secs, before, after, calls))
            }
        };
        let Some((fault, crash, pause_secs, before, after, calls)) = decided else {
            return std::future::pending().await;
        };
        if let Some(secs) = pause_secs {
            {
                let mut world = self.lock();
                world.event("pauses");
                let client = self.client;
                world.log(|| format!("driver {client} paused for {secs} s (SIGSTOP)"));
            }
            self.paused.notify_one();
            tokio::time::sleep(Duration::from_secs(secs as u64)).await;
        }
        tokio::time::sleep(Duration::from_millis(before)).await;
        if let Fault::Timeout { .. } = fault {
            tokio::time::sleep(self.operation_timeout).await;
        }
        let value = {
            let mut world = self.lock();
            let world = &mut *world;
            if world.clients[&self.client].crashed {
                None
            } else {
                actors::step(world);
                let lands = match (fault, crash) {
                    (_, Some(lands)) => lands && !matches!(fault, Fault::Throttle | Fault::ServerError),
                    (Fault::None | Fault::LostAnswer | Fault::Timeout { applied: true }, None) => true,
                    _ => false,
                };
                if lands && matches!(fault, Fault::Timeout { .. }) {
                    let client = self.client;
                    world.log(|| format!("  driver {client}'s timed-out call {calls} lands now"));
                }
                world.clients.get_mut(&self.client).expect("client").paused_call = pause_secs.is_some();
                let value = lands.then(|| apply(world));
                world.clients.get_mut(&self.client).expect("client").paused_call = false;
                invariants::after_step(world);
                if crash.is_some() {
                    world.clients.get_mut(&self.client).expect("client").crashed = true;
                    world.event("crashes");
                    let client = self.client;
                    world.log(|| format!("driver {client} CRASHES (the call's write landed: {lands})"));
                }
                match fault {
                    Fault::None => {}
                    Fault::Throttle => {
                        world.fault("request-throttle");
                        world.throttled = true;
                    }
                    Fault::ServerError => {
                        world.fault("request-5xx");
                        world.outcome_may_change = true;
                    }
                    Fault::Timeout { .. } => {
                        world.fault("timeout");
                        world.outcome_may_change = true;
                    }
                    Fault::LostAnswer => {
                        world.fault("lost-answer");
                        world.outcome_may_change = true;
                    }
                }
                Some(value)
            }
        };
        let Some(value) = value else {
            return std::future::pending().await;
        };
        if crash.is_some() {
            self.crashed.notify_one();
            return std::future::pending().await;
        }
        tokio::time::sleep(Duration::from_millis(after)).await;
        {
            let mut world = self.lock();
            actors::step(&mut world);
        }
        match (fault, value) {
            (Fault::None, Some(value)) => Ok(value),
            (Fault::Throttle, _) => Err(error(
                service,
                operation,
                Some("ThrottlingException"),
                "Rate of requests exceeds the allowed throughput",
                ErrorClass::Throttling,
            )),
            (Fault::ServerError, _) => Err(error(
                service,
                operation,
                Some("InternalServerError"),
                "Internal server error",
                ErrorClass::Transient,
            )),
            (Fault::Timeout { .. }, _) => Err(error(
                service,
                operation,
                None,
                "operation timeout (all attempts included) occurred",
                ErrorClass::Transient,
            )),
            (Fault::LostAnswer, _) => Err(error(
                service,
                operation,
                None,
                "connection closed before the response was read",
                ErrorClass::Transient,
            )),
            (Fault::None, None) => unreachable!("a call without a fault is applied"),
        }
    }

    /// Item-level cancellation reasons for a transaction of `count` items.
    fn injected_reasons(world: &mut World, count: usize) -> BTreeMap<usize, &'static str> {
        let swarm = world.swarm.clone();
        let mut injected = BTreeMap::new();
        for index in 0..count {
            let code = if world.rng.chance(swarm.p_item_conflict) {
                "TransactionConflict"
            } else if world.rng.chance(swarm.p_item_throttle) {
                "ThrottlingError"
            } else if world.rng.chance(swarm.p_item_capacity) {
                "ProvisionedThroughputExceeded"
            } else {
                continue;
            };
            injected.insert(index, code);
        }
        for code in injected.values() {
            match *code {
                "TransactionConflict" => {
                    world.fault("item-conflict");
                    world.conflicted = true;
                }
                "ThrottlingError" => {
                    world.fault("item-throttling");
                    world.throttled = true;
                }
                _ => {
                    world.fault("item-capacity");
                    world.throttled = true;
                }
            }
        }
        injected
    }

    /// What `AwsPorts::transact` returns for a transaction's outcome.
    fn transaction_results(outcome: Result<(), Vec<Reason>>, count: usize) -> Result<Vec<WriteResult>, AwsError> {
        let reasons = match outcome {
            Ok(()) => return Ok(vec![WriteResult::Applied; count]),
            Err(reasons) => reasons,
        };
        reasons.into_iter().map(Self::reason_to_result).collect()
    }

    /// What `AwsPorts` makes of one item's cancellation reason.
    fn reason_to_result(reason: Reason) -> Result<WriteResult, AwsError> {
        match reason {
            Reason::None => Ok(WriteResult::Cancelled),
            Reason::ConditionalCheckFailed(item) => Ok(WriteResult::Rejected(item.map(|item| ObservedRecord {
                state: item.state,
                run_id: item.run_id,
                threshold: item.threshold,
                released_by: item.released_by,
            }))),
            Reason::Code(code) => reason_result(code),
        }
    }

    /// Which attempt's plan a batch of instance writes belongs to, when one of its instances is
    /// in only one attempt's spec (every batch comes from one spec); the driver's acting attempt
    /// is updated with it, so that a write to an instance both specs name is attributed right.
    fn note_acting_attempt<'a>(&self, world: &mut World, ids: impl Iterator<Item = &'a String>) {
        for id in ids {
            let first = world.run_instances.contains_key(id);
            let second = world.other_attempt_instances.contains_key(id);
            let attempt = match (first, second) {
                (true, false) => world.spec.attempt(),
                (false, true) => 2,
                _ => continue,
            };
            world.clients.get_mut(&self.client).expect("client").acting_attempt = attempt;
            return;
        }
    }

    /// A transition of this driver landed on `id`, whose record was `item` just before: the
    /// write log, isolation and the oracle.
    fn landed(&self, world: &mut World, id: &str, item: Option<InstanceItem>, now: Timestamp) {
        let item = item.expect("an applied transition found its item");
        let after = world.table.instances.get(id).cloned();
        let what = format!("moved to {}", after.as_ref().map_or("?", |a| a.state.as_str()));
        invariants::check_isolation(world, self.client, id, &item, &what);
        invariants::check_write(world, self.client, id, Some(&item), after.as_ref(), Some(now));
        world.log_write(Who::Driver(self.client), id, Some(item), after);
    }

    /// Counts a send or termination of a driver that another driver has taken over since: the
    /// store cannot fence these, so the oracle judges each.
    fn note_stale_effect(&self, world: &mut World) {
        let attempt = world.clients[&self.client].acting_attempt;
        if world.ledger.last_writer.get(&attempt).is_some_and(|last| *last != self.client) {
            world.ledger.stale_effects += 1;
            world.event("stale-driver-effects");
        }
    }

    fn is_calm(&self, world: &World) -> bool {
        world.clients[&self.client].calm
    }
}

impl RunStore for SimPorts {
    async fn load_run(&self, run_id: &str, attempt: u32) -> Result<Option<RunRecord>, StoreError> {
        let identifier = record::record_identifier(run_id, attempt);
        self.call("DynamoDB", "GetItem", false, |world| world.table.run(&identifier))
            .await?
            .map_err(StoreError::Corrupt)
    }

    async fn load_attempts(&self, run_id: &str) -> Result<Vec<RunRecord>, StoreError> {
        self.call("DynamoDB", "Query", false, |world| world.table.attempts(run_id)).await?.map_err(StoreError::Corrupt)
    }

    async fn create_run(
        &self,
        record: &RunRecord,
        spec_chunks: &[String],
        _chunk_ttl: i64,
        transitions: &[InstanceTransition],
        guard: Option<&post_provision::core::PoolGuard>,
        now: Timestamp,
    ) -> Result<CreateOutcome, StoreError> {
        record::check_size(record).map_err(StoreError::TooLarge)?;
        let created = self
            .call("DynamoDB", "TransactWriteItems", true, |world| {
                world.clients.get_mut(&self.client).expect("client").acting_attempt = record.run_attempt;
                let injected = if self.is_calm(world) || transitions.is_empty() {
                    BTreeMap::new()
                } else {
                    Self::injected_reasons(world, transitions.len())
                };
                let actions: Vec<Action<'_>> = transitions.iter().map(|t| Action::Transition(t, now)).collect();
                let before: Vec<Option<InstanceItem>> =
                    transitions.iter().map(|t| world.table.instances.get(&t.instance_id).cloned()).collect();
                let outcome = world.table.create_run(record, spec_chunks, &actions, &injected, guard);
                if guard.is_some() {
                    world.event(match outcome {
                        Ok(Create::Created) => "guarded-create-landed",
                        Ok(Create::Cancelled { pool_refused: true, .. }) => "guarded-create-pool-refused",
                        _ => "guarded-create-refused",
                    });
                }
                world.log(|| {
                    format!(
                        "  create run record v{} in {} with {} transitions: {}",
                        record.version,
                        record.state,
                        transitions.len(),
                        matches!(outcome, Ok(Create::Created))
                    )
                });
                if matches!(outcome, Ok(Create::Created)) {
                    invariants::check_one_driver(world, self.client, record.run_attempt);
                    for (transition, item) in transitions.iter().zip(before) {
                        self.landed(world, &transition.instance_id, item, now);
                    }
                    if record.state.is_terminal() && record.run_attempt == world.spec.attempt() {
                        invariants::on_terminal(world);
                    }
                }
                outcome
            })
            .await?
            .map_err(StoreError::Corrupt)?;
        let (existing, effects, pool_refused) = match created {
            Create::Created => return Ok(CreateOutcome::Created),
            Create::Cancelled { existing, effects, pool_refused } => (existing, effects, pool_refused),
        };
        match existing {
            // As the adapter: a retried create whose first attempt landed finds itself (and the
            // transaction was atomic, so its transitions landed with it).
            Some(existing) if record.is_own_create(&existing) => return Ok(CreateOutcome::Created),
            Some(existing) => return Ok(CreateOutcome::Exists(existing)),
            None => {}
        }
        // As the adapter: the pool guard's check refused is not an instance's refusal.
        if pool_refused {
            return Ok(CreateOutcome::PoolRefused);
        }
        // As the adapter: a riding transition refused, throttled (or conflicted along with one
        // of those) is reported item by item; otherwise the first code names the error.
        if !transitions.is_empty() {
            let results: Result<Vec<WriteResult>, AwsError> =
                effects.iter().cloned().map(Self::reason_to_result).collect();
            if let Ok(results) = results {
                if results.iter().any(|result| *result != WriteResult::Cancelled) {
                    return Ok(CreateOutcome::EffectsRefused(results));
                }
            }
        }
        let code = effects.iter().find_map(|reason| match reason {
            Reason::None => None,
            Reason::ConditionalCheckFailed(_) => Some("ConditionalCheckFailed"),
            Reason::Code(code) => Some(*code),
        });
        let class = match code {
            Some("TransactionConflict" | "ThrottlingError") => ErrorClass::Throttling,
            Some("ConditionalCheckFailed") => ErrorClass::ConditionFailed,
            _ => ErrorClass::Other,
        };
        Err(StoreError::Aws(error(
            "DynamoDB",
            "TransactWriteItems",
            code,
            "creating the run record was cancelled",
            class,
        )))
    }

    async fn replace_run(&self, record: &RunRecord, expected_version: u64) -> Result<(), StoreError> {
        record::check_size(record).map_err(StoreError::TooLarge)?;
        let result = self
            .call("DynamoDB", "PutItem", true, |world| {
                world.clients.get_mut(&self.client).expect("client").acting_attempt = record.run_attempt;
                let result = world.table.replace_run(record, expected_version);
                world.log(|| {
                    format!(
                        "  put run record v{} in {} (expected v{expected_version}): {}",
                        record.version,
                        record.state,
                        result.is_ok()
                    )
                });
                if result.is_ok() {
                    self.put_landed(world, record);
                }
                result
            })
            .await?;
        match result {
            Ok(()) => Ok(()),
            // As the adapter: a write whose answer was lost and that finds itself succeeded.
            Err(Some(existing)) if existing.version == record.version && existing.lease.owner == record.lease.owner => {
                Ok(())
            }
            Err(existing) => Err(StoreError::VersionConflict {
                found_version: existing.as_ref().map(|r| r.version),
                found_owner: existing.map(|r| r.lease.owner),
            }),
        }
    }

    async fn renew_lease(
        &self,
        run_id: &str,
        attempt: u32,
        owner: &str,
        expires_at: Timestamp,
    ) -> Result<bool, StoreError> {
        Ok(self
            .call("DynamoDB", "UpdateItem", true, |world| {
                let renewed = world.table.renew_lease(run_id, attempt, owner, expires_at);
                world.log(|| format!("  renew lease of {owner} to {expires_at}: {renewed}"));
                renewed
            })
            .await?)
    }

    async fn load_spec(&self, run_id: &str, digest: &str, chunks: u32) -> Result<String, StoreError> {
        self.call("DynamoDB", "GetItem", false, |world| world.table.load_spec(run_id, digest, chunks))
            .await?
            .map_err(StoreError::Corrupt)
    }

    async fn list_runs(
        &self,
        unfinished_only: bool,
        limit: usize,
    ) -> Result<post_provision::ports::RunListing, StoreError> {
        // The simulated table lists exactly (no index, no read bound): `more` is all it can say.
        let records = self
            .call("DynamoDB", "Query", false, |world| world.table.list_runs(unfinished_only, limit.saturating_add(1)))
            .await?
            .map_err(StoreError::Corrupt)?;
        let more = records.len() > limit;
        let records: Vec<RunRecord> = records.into_iter().take(limit).collect();
        Ok(post_provision::ports::RunListing { items_read: records.len() as u64, records, more, ..Default::default() })
    }

    async fn load_resource_class_config(&self) -> Result<Option<ResourceClassConfig>, StoreError> {
        Ok(self.call("DynamoDB", "GetItem", false, |world| world.table.resource_class_config.clone()).await?)
    }

    /// The simulation's own records keep no instance type: then only the class is compared.
    async fn load_instance_facts(&self, ids: &[String]) -> Result<Vec<InstanceFacts>, StoreError> {
        let ids = ids.to_vec();
        Ok(self
            .call("DynamoDB", "BatchGetItem", false, move |world| {
                ids.iter()
                    .filter_map(|id| {
                        world.table.instances.get(id).map(|item| InstanceFacts {
                            id: id.clone(),
                            resource_class: item.resource_class.clone(),
                            instance_type: item.instance_type.clone(),
                        })
                    })
                    .collect()
            })
            .await?)
    }
}

impl InstanceStore for SimPorts {
    async fn transition(
        &self,
        batch: &[InstanceTransition],
        now: Timestamp,
        fence: &Fence,
    ) -> Result<Vec<WriteResult>, AwsError> {
        assert!(batch.len() <= post_provision::core::MAX_FENCED_BATCH, "transaction batch too large");
        self.call("DynamoDB", "TransactWriteItems", true, |world| {
            if !world.table.fence_holds(fence) {
                world.log(|| format!("  transition {}: refused by the run record's fence", batch.len()));
                return Ok(vec![WriteResult::Fenced; batch.len()]);
            }
            let injected =
                if self.is_calm(world) { BTreeMap::new() } else { Self::injected_reasons(world, batch.len()) };
            self.note_acting_attempt(world, batch.iter().map(|t| &t.instance_id));
            // A commit or release carries its attempt's own threshold: that names the attempt
            // even when every instance of the batch is in both attempts' specs (when only one
            // attempt has that threshold: two can enter a state in the same second).
            let target = batch[0].new_threshold;
            let planned: Vec<u32> = world
                .table
                .attempts(&world.spec.run_id)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.commit_threshold == Some(target) || r.idle_threshold == Some(target))
                .map(|r| r.run_attempt)
                .collect();
            if let [attempt] = planned[..] {
                world.clients.get_mut(&self.client).expect("client").acting_attempt = attempt;
            }
            let actions: Vec<Action<'_>> = batch.iter().map(|t| Action::Transition(t, now)).collect();
            let before: Vec<Option<InstanceItem>> =
                batch.iter().map(|t| world.table.instances.get(&t.instance_id).cloned()).collect();
            let outcome = world.table.transact(&actions, &injected);
            if outcome.is_ok() {
                invariants::check_fenced_write(world, fence, "transition");
                world.table.append_committed(fence, post_provision::run::commit::committed_ids(batch, &fence.run_id));
                let attempt = world.clients[&self.client].acting_attempt;
                invariants::check_one_driver(world, self.client, attempt);
                for (transition, item) in batch.iter().zip(before) {
                    self.landed(world, &transition.instance_id, item, now);
                }
            }
            world.log(|| {
                format!(
                    "  transition {} to {}: {:?}",
                    batch.len(),
                    batch[0].new_state.as_str(),
                    outcome.as_ref().map_err(|r| r.iter().filter(|r| **r != Reason::None).count())
                )
            });
            Self::transaction_results(outcome, batch.len())
        })
        .await?
    }

    async fn delete(&self, batch: &[InstanceDeletion], fence: &Fence) -> Result<Vec<WriteResult>, AwsError> {
        assert!(batch.len() <= post_provision::core::MAX_FENCED_BATCH, "transaction batch too large");
        self.call("DynamoDB", "TransactWriteItems", true, |world| {
            if !world.table.fence_holds(fence) {
                world.log(|| format!("  delete {}: refused by the run record's fence", batch.len()));
                return Ok(vec![WriteResult::Fenced; batch.len()]);
            }
            let injected =
                if self.is_calm(world) { BTreeMap::new() } else { Self::injected_reasons(world, batch.len()) };
            self.note_acting_attempt(world, batch.iter().map(|d| &d.instance_id));
            let actions: Vec<Action<'_>> = batch.iter().map(Action::Delete).collect();
            let before: Vec<Option<InstanceItem>> =
                batch.iter().map(|d| world.table.instances.get(&d.instance_id).cloned()).collect();
            let outcome = world.table.transact(&actions, &injected);
            if outcome.is_ok() {
                invariants::check_fenced_write(world, fence, "deletion");
            }
            world.log(|| {
                format!(
                    "  delete {}: {:?}",
                    batch.len(),
                    outcome.as_ref().map_err(|r| r.iter().filter(|r| **r != Reason::None).count())
                )
            });
            if outcome.is_ok() {
                self.deleted(world, batch, before);
            }
            Self::transaction_results(outcome, batch.len())
        })
        .await?
    }

    async fn delete_finishing(
        &self,
        batch: &[InstanceDeletion],
        record: &RunRecord,
        expected_version: u64,
        unknown_attempt: u32,
    ) -> Result<Vec<WriteResult>, AwsError> {
        assert!(batch.len() <= post_provision::core::MAX_FENCED_BATCH, "transaction batch too large");
        self.call("DynamoDB", "TransactWriteItems", true, |world| {
            // The record's versioned `Put` is the fence, as in `AwsPorts::delete_finishing`.
            let identifier = record.identifier();
            let stored = world.table.runs.get(&identifier).and_then(|value| value.get("version")?.as_u64());
            if stored != Some(expected_version) {
                let found = world.table.run(&identifier).ok().flatten();
                let itself = found.is_some_and(|f| f.version == record.version && f.lease.owner == record.lease.owner);
                world.log(|| format!("  delete {} finishing the run: record version differs ({itself})", batch.len()));
                return Ok(vec![if itself { WriteResult::Applied } else { WriteResult::Fenced }; batch.len()]);
            }
            if !world.table.unknown_attempt_absent(&record.run_id, unknown_attempt) {
                world.log(|| format!("  delete {} finishing the run: attempt {unknown_attempt} exists", batch.len()));
                return Ok(vec![WriteResult::Fenced; batch.len()]);
            }
            // The record's `Put` (after the deletions and the unknown attempt's check) may
            // conflict or be throttled too: that cancels the transaction, and the adapter reads
            // each deletion by its own reason (`Cancelled` where its condition held).
            let mut injected =
                if self.is_calm(world) { BTreeMap::new() } else { Self::injected_reasons(world, batch.len() + 1) };
            self.note_acting_attempt(world, batch.iter().map(|d| &d.instance_id));
            let actions: Vec<Action<'_>> = batch.iter().map(Action::Delete).collect();
            if let Some(code) = injected.remove(&batch.len()) {
                let reasons = world.table.cancelled(&actions, &injected, 2);
                world.log(|| format!("  delete {} finishing the run: the record's Put got {code}", batch.len()));
                return Self::transaction_results(Err(reasons), batch.len());
            }
            let before: Vec<Option<InstanceItem>> =
                batch.iter().map(|d| world.table.instances.get(&d.instance_id).cloned()).collect();
            let outcome = world.table.transact(&actions, &injected);
            world.log(|| {
                format!(
                    "  delete {} finishing the run in {}: {:?}",
                    batch.len(),
                    record.state,
                    outcome.as_ref().map_err(|r| r.iter().filter(|r| **r != Reason::None).count())
                )
            });
            if outcome.is_ok() {
                let fence = Fence { unknown_attempt, ..Fence::of(record) };
                invariants::check_fenced_write(world, &fence, "deletion");
                self.deleted(world, batch, before);
                world.table.replace_run(record, expected_version).expect("the version was checked");
                self.put_landed(world, record);
            }
            Self::transaction_results(outcome, batch.len())
        })
        .await?
    }
}

impl SimPorts {
    /// What every landed deletion of the driver is checked against, and logged as.
    fn deleted(&self, world: &mut World, batch: &[InstanceDeletion], before: Vec<Option<InstanceItem>>) {
        let attempt = world.clients[&self.client].acting_attempt;
        invariants::check_one_driver(world, self.client, attempt);
        for (deletion, item) in batch.iter().zip(before) {
            let Some(item) = item else { continue };
            let id = &deletion.instance_id;
            invariants::check_isolation(world, self.client, id, &item, "deleted the record of");
            invariants::check_write(world, self.client, id, Some(&item), None, None);
            world.log_write(Who::Driver(self.client), id, Some(item), None);
        }
    }

    /// What every landed write of a run record is checked against.
    fn put_landed(&self, world: &mut World, record: &RunRecord) {
        invariants::check_one_driver(world, self.client, record.run_attempt);
        let first = record.run_attempt == world.spec.attempt();
        if first && record.state == post_provision::machine::State::EmergencyCleanup {
            let at = world.elapsed_ms();
            world.ledger.cleanup_entered_ms.get_or_insert(at);
        }
        if record.state.is_terminal() && first {
            invariants::on_terminal(world);
        }
    }
}

impl PoolQueues for SimPorts {
    async fn send(&self, queue_url: &str, messages: &[OutgoingMessage]) -> Result<Vec<(String, AwsError)>, AwsError> {
        assert!(messages.len() <= post_provision::core::MAX_MESSAGE_BATCH, "message batch too large");
        self.call("SQS", "SendMessageBatch", true, |world| {
            if let Some(code) = world.sqs.refusal(queue_url, world.now_unix()) {
                world.fault(if code == "AccessDenied" { "sqs-access-denied" } else { "sqs-queue-deleted" });
                world.ledger.queue_refused_driver = true;
                let class = if code == "AccessDenied" { ErrorClass::Permission } else { ErrorClass::NotFound };
                return Err(error("SQS", "SendMessageBatch", Some(code), "the queue refuses for good", class));
            }
            self.note_stale_effect(world);
            if !world.sqs.queues.contains_key(queue_url) {
                return Err(error(
                    "SQS",
                    "SendMessageBatch",
                    Some("AWS.SimpleQueueService.NonExistentQueue"),
                    "The specified queue does not exist",
                    ErrorClass::NotFound,
                ));
            }
            let calm = self.is_calm(world);
            let mut failed = Vec::new();
            for message in messages {
                if !calm && world.rng.chance(world.swarm.p_entry_failure) {
                    world.fault("sqs-entry-failed");
                    world.outcome_may_change = true;
                    failed.push((
                        message.instance_id.clone(),
                        error("SQS", "SendMessageBatch", Some("InternalError"), "entry failed", ErrorClass::Transient),
                    ));
                    continue;
                }
                let duplicate = world.rng.chance(world.swarm.p_duplicate);
                if duplicate {
                    world.fault("sqs-duplicate");
                }
                let now = world.now_unix();
                let client = self.client;
                if let Some((id, threshold)) = crate::sqs::parse_body(&message.body) {
                    invariants::check_send(world, client, &id, &threshold);
                }
                world.sqs.send(
                    queue_url,
                    &message.body,
                    now,
                    post_provision::core::POOL_MESSAGE_DELAY_SECS as i64,
                    duplicate,
                    Who::Driver(client),
                );
            }
            world.log(|| format!("  send {} to {queue_url}: {} failed", messages.len(), failed.len()));
            Ok(failed)
        })
        .await?
    }
}

impl SimPorts {
    /// One `terminate_once` of the adapter: a TerminateInstances call, and on unknown ids the
    /// same call without them, so unknown ids do not stop the others.
    async fn terminate_once(&self, ids: &[String]) -> Result<Termination, AwsError> {
        self.call("EC2", "TerminateInstances", true, |world| {
            self.note_acting_attempt(world, ids.iter());
            self.note_stale_effect(world);
            let mut result = Termination::default();
            let now = world.now_unix();
            let who = Who::Driver(self.client);
            // As the adapter: a refused batch is split in halves until the refusal names single ids.
            let mut batches: Vec<Vec<String>> = vec![ids.to_vec()];
            while let Some(mut pending) = batches.pop() {
                while !pending.is_empty() {
                    for id in &pending {
                        if let Some(item) = world.table.instances.get(id).cloned() {
                            if world.ec2.known(id, now) {
                                invariants::check_isolation(world, self.client, id, &item, "terminated");
                            }
                        }
                    }
                    for id in &pending {
                        if world.ec2.known(id, now) && !world.ec2.pool_tagged(id) && world.ec2.alive(id) {
                            let client = self.client;
                            world.violate(
                                "a-isolation",
                                None,
                                format!("driver {client} terminated {id}, which is not a pool instance (no pool tag)"),
                            );
                        }
                    }
                    let alive: Vec<String> = pending.iter().filter(|id| world.ec2.alive(id)).cloned().collect();
                    match world.ec2.terminate_call(&pending, now, who) {
                        Ok(()) => {
                            for id in &alive {
                                invariants::check_termination(world, self.client, id);
                            }
                            world.terminated_by_run.extend(pending.iter().cloned());
                            result.terminated.append(&mut pending);
                        }
                        Err(TerminateError::Refused(code, _)) => {
                            world.fault("ec2-termination-refused");
                            if pending.len() == 1 {
                                world.ledger.refused_to_run.insert(pending[0].clone());
                                let class = if code == "UnauthorizedOperation" {
                                    ErrorClass::Permission
                                } else {
                                    ErrorClass::Other
                                };
                                let refusal =
                                    error("EC2", "TerminateInstances", Some(code), "termination refused", class);
                                result.refused.push((pending.remove(0), refusal));
                            } else {
                                let second = pending.split_off(pending.len() / 2);
                                batches.push(second);
                                batches.push(std::mem::take(&mut pending));
                            }
                        }
                        Err(TerminateError::Unknown(unknown)) => {
                            world.fault("ec2-not-found");
                            world.reported_not_found.extend(unknown.iter().cloned());
                            pending.retain(|id| !unknown.contains(id));
                            result.not_found.extend(unknown);
                        }
                    }
                }
            }
            world.log(|| format!("  terminate {}: {} not found", ids.len(), result.not_found.len()));
            result
        })
        .await
    }
}

impl Compute for SimPorts {
    async fn pool_membership(&self, instance_ids: &[String]) -> Result<PoolMembership, AwsError> {
        assert!(instance_ids.len() <= post_provision::core::MAX_TERMINATE_BATCH, "membership batch too large");
        let describe = |ids: Vec<String>| {
            self.call("EC2", "DescribeInstances", false, move |world| {
                let now = world.now_unix();
                let mut membership = PoolMembership::default();
                for id in ids {
                    match world.ec2.instances.get(&id) {
                        Some(instance) if instance.visible_from <= now => {
                            match instance.tags.get(post_provision::config::DEFAULT_POOL_TAG_KEY) {
                                Some(value) => {
                                    membership.members.insert(id, value.clone());
                                }
                                None => membership.foreign.push(id),
                            }
                        }
                        _ => {
                            world.fault("ec2-not-found");
                            world.reported_not_found.insert(id.clone());
                            membership.unknown.push(id);
                        }
                    }
                }
                membership
            })
        };
        let mut membership = describe(instance_ids.to_vec()).await?;
        // As the adapter: an unknown id can be eventual consistency; ask again a bounded number of times.
        for _ in 0..self.not_found_retries {
            if membership.unknown.is_empty() {
                break;
            }
            tokio::time::sleep(self.not_found_delay).await;
            let again = describe(std::mem::take(&mut membership.unknown)).await?;
            membership.members.extend(again.members);
            membership.foreign.extend(again.foreign);
            membership.unknown = again.unknown;
        }
        Ok(membership)
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<Termination, AwsError> {
        assert!(instance_ids.len() <= post_provision::core::MAX_TERMINATE_BATCH, "termination batch too large");
        let mut result = self.terminate_once(instance_ids).await?;
        // As the adapter: NotFound can be eventual consistency, so ask again a bounded number of times.
        for _ in 0..self.not_found_retries {
            if result.not_found.is_empty() {
                break;
            }
            tokio::time::sleep(self.not_found_delay).await;
            let again = self.terminate_once(&std::mem::take(&mut result.not_found)).await?;
            result.terminated.extend(again.terminated);
            result.refused.extend(again.refused);
            result.not_found = again.not_found;
        }
        Ok(result)
    }
}
