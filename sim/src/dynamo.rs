//! In-memory DynamoDB: the pool's one table, with exactly the conditions `src/aws/dynamodb.rs`
//! sends, and DynamoDB's transaction semantics (all or nothing, one cancellation reason per item
//! in request order, the old item with `ConditionalCheckFailed` because the adapter asks for
//! `ALL_OLD`, at most 100 actions, no two actions on one item).
//!
//! Timestamps are compared as strings, as DynamoDB compares them.

use std::collections::BTreeMap;

use post_provision::core::{
    Expectation, InstanceDeletion, InstanceKind, InstanceState, InstanceTransition, PoolGuard, ThresholdCondition,
    MAX_TRANSACTION_ITEMS,
};
use post_provision::record::{self, RunRecord};
use post_provision::spec::ResourceClassConfig;
use post_provision::timestamp::Timestamp;

/// An instance record (`PK = TYPE#INSTANCE`), the attributes conditions read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceItem {
    /// `state`.
    pub state: String,
    /// `runId` (`""` for the pool).
    pub run_id: String,
    /// `threshold`, as stored.
    pub threshold: String,
    /// `resourceClass`.
    pub resource_class: String,
    /// `instanceType`, if the record has one (the simulation's own records have none).
    pub instance_type: Option<String>,
    /// `updatedAt`.
    pub updated_at: String,
    /// `releasedBy` (`""` when absent): written by the engine's releases only; the pool's writers
    /// leave it as it is.
    pub released_by: String,
}

/// One action of an instance-record transaction.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// The adapter's conditional `Update` (`transition`), with its `:now`.
    Transition(&'a InstanceTransition, Timestamp),
    /// The adapter's `Delete` (`delete`): conditional on the owner, or unconditional.
    Delete(&'a InstanceDeletion),
}

impl Action<'_> {
    /// The instance the action writes.
    pub fn instance_id(&self) -> &str {
        match self {
            Action::Transition(transition, _) => &transition.instance_id,
            Action::Delete(deletion) => &deletion.instance_id,
        }
    }
}

/// A cancellation reason of one transaction item, as DynamoDB reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `None`: this item was fine, the transaction was cancelled for another.
    None,
    /// `ConditionalCheckFailed`, with the old item (ALL_OLD) if there was one.
    ConditionalCheckFailed(Option<InstanceItem>),
    /// Any other code: `TransactionConflict`, `ThrottlingError`, `ProvisionedThroughputExceeded`.
    Code(&'static str),
}

/// One expected record shape: `#state IN (...) AND #runId = :runId` and the threshold condition
/// (`#threshold > :now`, `#threshold = :threshold`, or none).
fn matches(item: &InstanceItem, expectation: &Expectation, now: Timestamp) -> bool {
    expectation.states.iter().any(|state| state.as_str() == item.state)
        && item.run_id == expectation.run_id
        && expectation.released_by.as_ref().map_or(true, |by| *by == item.released_by)
        && match expectation.threshold {
            ThresholdCondition::Unexpired => {
                item.threshold.as_str() > ThresholdCondition::unexpired_after(now).to_string().as_str()
            }
            ThresholdCondition::Exactly(threshold) => item.threshold == threshold.to_string(),
            ThresholdCondition::Any => true,
        }
}

/// A transition's condition: its expected shapes OR-ed, as the adapter phrases it. A missing
/// item fails it (its attributes do not exist).
pub fn transition_condition(item: Option<&InstanceItem>, transition: &InstanceTransition, now: Timestamp) -> bool {
    let Some(item) = item else { return false };
    transition.expected.iter().any(|expectation| matches(item, expectation, now))
}

/// What a [`PoolGuard`] adds to a release in the create: `#resourceClass = :kindClass AND
/// (attribute_not_exists(#instanceType) OR #instanceType = :kindType)`.
pub fn kind_condition(item: Option<&InstanceItem>, kind: &InstanceKind) -> bool {
    item.is_some_and(|item| {
        item.resource_class == kind.resource_class
            && item.instance_type.as_ref().map_or(true, |instance_type| *instance_type == kind.instance_type)
    })
}

/// A deletion's condition: `#state = :terminated AND #runId = :owner`.
pub fn delete_condition(item: Option<&InstanceItem>, deletion: &InstanceDeletion) -> bool {
    item.is_some_and(|item| item.state == InstanceState::Terminated.as_str() && item.run_id == deletion.owner_run_id)
}

/// What a run-record create did.
#[derive(Debug, Clone)]
pub enum Create {
    /// Written, with every action that rode along.
    Created,
    /// Cancelled, nothing written: the record found under the key, if any, and each riding
    /// action's reason.
    Cancelled {
        /// The existing record (the `Put`'s `ConditionalCheckFailed` with ALL_OLD).
        existing: Option<Box<RunRecord>>,
        /// One reason per action, in order.
        effects: Vec<Reason>,
        /// The pool guard's `ConditionCheck` failed.
        pool_refused: bool,
    },
}

/// The table.
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// Instance records by instance id.
    pub instances: BTreeMap<String, InstanceItem>,
    /// Run records by identifier (`record::record_identifier`: the run id, and `#<attempt>` for
    /// later attempts), as stored: the JSON the adapter writes as attributes.
    pub runs: BTreeMap<String, serde_json::Value>,
    /// Spec chunk items by identifier.
    pub spec_chunks: BTreeMap<String, String>,
    /// The `TYPE#METADATA` / `ID#resource_class_config` item's value.
    pub resource_class_config: Option<ResourceClassConfig>,
}

impl Table {
    /// The `ConditionCheck` every fenced transaction carries on the run record: the lease owner
    /// and fencing epoch are the fence's, and the run is not finished (as
    /// `src/aws/dynamodb.rs`'s `fence_check` phrases it; the differential test keeps them equal).
    /// With it, the second: the attempt the driver does not know of has no record
    /// (`unknown_attempt_check`).
    pub fn fence_holds(&self, fence: &post_provision::ports::Fence) -> bool {
        if !self.unknown_attempt_absent(&fence.run_id, fence.unknown_attempt) {
            return false;
        }
        let identifier = post_provision::record::record_identifier(&fence.run_id, fence.attempt);
        let Some(record) = self.runs.get(&identifier) else { return false };
        let owner = record.pointer("/lease/owner").and_then(|v| v.as_str());
        let epoch = record.get("fencingEpoch").and_then(|v| v.as_u64());
        let state = record.get("state").and_then(|v| v.as_str()).unwrap_or("");
        owner == Some(fence.owner.as_str()) && epoch == Some(fence.epoch) && !matches!(state, "Done" | "Failed")
    }

    /// The fence's `ConditionCheck` on the record of the attempt the driver does not know of:
    /// `attribute_not_exists(PK)`.
    pub fn unknown_attempt_absent(&self, run_id: &str, unknown_attempt: u32) -> bool {
        !self.runs.contains_key(&post_provision::record::record_identifier(run_id, unknown_attempt))
    }

    /// A [`PoolGuard`]'s `ConditionCheck` on the metadata item (`src/aws/dynamodb.rs`'s
    /// `pool_guard_check`): each class with exactly its queue URL, `cpu` and `mmem`.
    pub fn pool_guard_holds(&self, guard: &PoolGuard) -> bool {
        let Some(pool) = &self.resource_class_config else { return false };
        guard.classes.iter().all(|(name, class)| {
            pool.get(name).is_some_and(|known| {
                (&known.queue_url, known.cpu, known.mmem) == (&class.queue_url, class.cpu, class.mmem)
            })
        })
    }

    /// The fence of a commit transaction that landed: its `Update` appends the committed ids to
    /// the run record's `committedIds` (`src/aws/dynamodb.rs`'s `fence_update`; the version is
    /// not touched).
    pub fn append_committed(&mut self, fence: &post_provision::ports::Fence, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let identifier = post_provision::record::record_identifier(&fence.run_id, fence.attempt);
        let Some(serde_json::Value::Object(record)) = self.runs.get_mut(&identifier) else { return };
        let list = record.entry("committedIds").or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(list) = list {
            list.extend(ids.into_iter().map(serde_json::Value::String));
        }
    }

    /// `TransactWriteItems` of instance actions, with `injected` cancellation codes the simulation
    /// adds for some items (load or conflicts, by item index). All or nothing.
    pub fn transact(
        &mut self,
        actions: &[Action<'_>],
        injected: &BTreeMap<usize, &'static str>,
    ) -> Result<(), Vec<Reason>> {
        assert!(!actions.is_empty(), "an empty transaction is a ValidationException");
        let reasons = self.evaluate(actions, injected, 0);
        if reasons.iter().any(|reason| *reason != Reason::None) {
            return Err(reasons);
        }
        self.apply(actions);
        Ok(())
    }

    /// Each action's cancellation reason were the transaction cancelled (`None` where its
    /// condition holds); `others` counts the transaction's other items (spec chunks, the record).
    fn evaluate(&self, actions: &[Action<'_>], injected: &BTreeMap<usize, &'static str>, others: usize) -> Vec<Reason> {
        assert!(actions.len() + others <= MAX_TRANSACTION_ITEMS, "a transaction carries at most 100 actions");
        let mut ids: Vec<&str> = actions.iter().map(Action::instance_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), actions.len(), "two actions of one transaction on the same item");
        actions
            .iter()
            .enumerate()
            .map(|(index, action)| {
                if let Some(code) = injected.get(&index) {
                    return Reason::Code(code);
                }
                let item = self.instances.get(action.instance_id());
                let holds = match action {
                    Action::Transition(transition, now) => transition_condition(item, transition, *now),
                    Action::Delete(deletion) => delete_condition(item, deletion),
                };
                if holds {
                    Reason::None
                } else {
                    Reason::ConditionalCheckFailed(item.cloned())
                }
            })
            .collect()
    }

    /// The reasons of a transaction cancelled by one of its `others` items (a run record's
    /// `Put` that conflicted or was throttled): each action's own reason, `None` where its
    /// condition holds. Nothing is written.
    pub fn cancelled(
        &self,
        actions: &[Action<'_>],
        injected: &BTreeMap<usize, &'static str>,
        others: usize,
    ) -> Vec<Reason> {
        self.evaluate(actions, injected, others)
    }

    fn apply(&mut self, actions: &[Action<'_>]) {
        for action in actions {
            match action {
                Action::Transition(transition, now) => {
                    let item = self.instances.get_mut(&transition.instance_id).expect("the condition needs the item");
                    item.state = transition.new_state.as_str().to_string();
                    item.run_id = transition.new_run_id.clone();
                    item.threshold = transition.new_threshold.to_string();
                    item.updated_at = now.to_string();
                    if let Some(by) = &transition.released_by {
                        item.released_by = by.clone();
                    }
                }
                Action::Delete(deletion) => {
                    self.instances.remove(&deletion.instance_id);
                }
            }
        }
    }

    /// A single conditional `UpdateItem` of the pool's other actors: `state = :expected AND runId =
    /// :expectedRunId AND threshold = :expectedThreshold` (what they read), setting the rest.
    pub fn update_if(
        &mut self,
        instance_id: &str,
        expected: &InstanceItem,
        state: &str,
        run_id: &str,
        threshold: &str,
        now: Timestamp,
    ) -> bool {
        match self.instances.get_mut(instance_id) {
            Some(item)
                if item.state == expected.state
                    && item.run_id == expected.run_id
                    && item.threshold == expected.threshold =>
            {
                item.state = state.to_string();
                item.run_id = run_id.to_string();
                item.threshold = threshold.to_string();
                item.updated_at = now.to_string();
                true
            }
            _ => false,
        }
    }

    /// Reads a run record by identifier as the adapter does (the schema version is checked).
    pub fn run(&self, identifier: &str) -> Result<Option<RunRecord>, String> {
        self.runs.get(identifier).map(|value| record::from_json_value(value.clone())).transpose()
    }

    /// Every attempt's record of `run_id`, by attempt, as `load_attempts` returns them.
    pub fn attempts(&self, run_id: &str) -> Result<Vec<RunRecord>, String> {
        let prefix = format!("{run_id}#");
        let mut records = Vec::new();
        for identifier in self.runs.keys().filter(|k| *k == run_id || k.starts_with(&prefix)) {
            records.push(self.run(identifier)?.expect("present"));
        }
        records.sort_by_key(|record| record.run_attempt);
        Ok(records)
    }

    /// The create transaction: the spec chunks, the record only if no record has its key, and
    /// the instance actions that ride along (with `injected` reasons, by action index), all or
    /// nothing. A cancelled create reports the existing record (ALL_OLD of the record's `Put`)
    /// and each action's reason. A `guard` adds its `ConditionCheck` and its kinds' conditions.
    pub fn create_run(
        &mut self,
        record: &RunRecord,
        chunks: &[String],
        actions: &[Action<'_>],
        injected: &BTreeMap<usize, &'static str>,
        guard: Option<&PoolGuard>,
    ) -> Result<Create, String> {
        let identifier = record.identifier();
        let mut reasons = self.evaluate(actions, injected, chunks.len() + 1 + usize::from(guard.is_some()));
        for (reason, action) in reasons.iter_mut().zip(actions) {
            let kind = guard.and_then(|guard| guard.instances.get(action.instance_id()));
            let item = self.instances.get(action.instance_id());
            if *reason == Reason::None && kind.is_some_and(|kind| !kind_condition(item, kind)) {
                *reason = Reason::ConditionalCheckFailed(item.cloned());
            }
        }
        let pool_refused = guard.is_some_and(|guard| !self.pool_guard_holds(guard));
        let existing = match self.runs.contains_key(&identifier) {
            true => Some(Box::new(self.run(&identifier)?.expect("present"))),
            false => None,
        };
        if existing.is_some() || pool_refused || reasons.iter().any(|reason| *reason != Reason::None) {
            return Ok(Create::Cancelled { existing, effects: reasons, pool_refused });
        }
        for (index, chunk) in chunks.iter().enumerate() {
            self.spec_chunks.insert(chunk_identifier(&record.run_id, &record.spec_digest, index), chunk.clone());
        }
        self.runs.insert(identifier, serde_json::to_value(record).expect("a record serializes"));
        self.apply(actions);
        Ok(Create::Created)
    }

    /// The versioned `PutItem`: `Err` carries the record found (ALL_OLD) when the version differs.
    pub fn replace_run(&mut self, record: &RunRecord, expected_version: u64) -> Result<(), Option<Box<RunRecord>>> {
        let identifier = record.identifier();
        let stored_version = self.runs.get(&identifier).and_then(|value| value.get("version")?.as_u64());
        if stored_version != Some(expected_version) {
            return Err(self.run(&identifier).ok().flatten().map(Box::new));
        }
        self.runs.insert(identifier, serde_json::to_value(record).expect("a record serializes"));
        Ok(())
    }

    /// The lease renewal `UpdateItem`: `#lease.#owner = :owner AND NOT (#state IN (:done,
    /// :failed))`; the version is left alone.
    pub fn renew_lease(&mut self, run_id: &str, attempt: u32, owner: &str, expires_at: Timestamp) -> bool {
        let Some(value) = self.runs.get_mut(&record::record_identifier(run_id, attempt)) else { return false };
        let holds = value.pointer("/lease/owner").and_then(|v| v.as_str()) == Some(owner)
            && !matches!(value.get("state").and_then(|v| v.as_str()), Some("Done" | "Failed"));
        if holds {
            value["lease"]["expiresAt"] = serde_json::Value::String(expires_at.to_string());
        }
        holds
    }

    /// The spec chunks joined, checked against the digest as the adapter does.
    pub fn load_spec(&self, run_id: &str, digest: &str, chunks: u32) -> Result<String, String> {
        let mut text = String::new();
        for index in 0..chunks as usize {
            let identifier = chunk_identifier(run_id, digest, index);
            let chunk = self.spec_chunks.get(&identifier).ok_or(format!("spec chunk {identifier} is missing"))?;
            text.push_str(chunk);
        }
        if record::digest(&text) != digest {
            return Err(format!("the stored spec of run {run_id} does not match its digest"));
        }
        Ok(text)
    }

    /// Run records newest first, as `list_runs` returns them.
    pub fn list_runs(&self, unfinished_only: bool, limit: usize) -> Result<Vec<RunRecord>, String> {
        let mut records = Vec::new();
        for identifier in self.runs.keys() {
            let record = self.run(identifier)?.expect("present");
            if unfinished_only && record.state.is_terminal() {
                continue;
            }
            records.push(record);
        }
        records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.run_id.cmp(&b.run_id)));
        records.truncate(limit);
        Ok(records)
    }
}

/// The spec chunk identifier the adapter uses.
fn chunk_identifier(run_id: &str, digest: &str, index: usize) -> String {
    format!("{run_id}#{}#{index}", &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use post_provision::spec::Role;

    fn item(state: &str, run_id: &str, threshold: &str) -> InstanceItem {
        InstanceItem {
            state: state.into(),
            run_id: run_id.into(),
            threshold: threshold.into(),
            resource_class: "large".into(),
            instance_type: None,
            updated_at: String::new(),
            released_by: String::new(),
        }
    }

    fn transition(id: &str) -> InstanceTransition {
        InstanceTransition {
            instance_id: id.into(),
            role: Role::Selected,
            expected: vec![Expectation {
                states: vec![InstanceState::Claimed],
                run_id: "r".into(),
                threshold: ThresholdCondition::Unexpired,
                released_by: None,
            }],
            new_state: InstanceState::Running,
            new_run_id: "r".into(),
            new_threshold: Timestamp::parse("2026-01-01T01:00:00Z").unwrap(),
            released_by: None,
        }
    }

    #[test]
    fn a_failed_condition_cancels_everything_and_reports_each_item() {
        let mut table = Table::default();
        table.instances.insert("a".into(), item("claimed", "r", "2026-01-01T00:05:00Z"));
        table.instances.insert("b".into(), item("claimed", "other", "2026-01-01T00:05:00Z"));
        let (ta, tb, tc) = (transition("a"), transition("b"), transition("c"));
        let now = Timestamp::parse("2026-01-01T00:00:00Z").unwrap();
        let actions = [Action::Transition(&ta, now), Action::Transition(&tb, now), Action::Transition(&tc, now)];
        let reasons = table.transact(&actions, &BTreeMap::new()).unwrap_err();
        assert_eq!(reasons[0], Reason::None);
        assert_eq!(reasons[1], Reason::ConditionalCheckFailed(Some(item("claimed", "other", "2026-01-01T00:05:00Z"))));
        assert_eq!(reasons[2], Reason::ConditionalCheckFailed(None));
        assert_eq!(table.instances["a"].state, "claimed", "nothing written");
        let reasons = table.transact(&actions[..1], &BTreeMap::from([(0, "ThrottlingError")])).unwrap_err();
        assert_eq!(reasons, vec![Reason::Code("ThrottlingError")]);
        table.transact(&actions[..1], &BTreeMap::new()).unwrap();
        assert_eq!(
            table.instances["a"],
            InstanceItem { updated_at: now.to_string(), ..item("running", "r", "2026-01-01T01:00:00Z") }
        );
    }

    #[test]
    fn thresholds_compare_as_strings_and_the_boundary_is_strict() {
        // `threshold > now + CLOCK_SKEW_MARGIN_SECS` (60 s), strictly.
        let t = transition("a");
        let now = Timestamp::parse("2026-01-01T00:05:00Z").unwrap();
        assert!(!transition_condition(Some(&item("claimed", "r", "2026-01-01T00:05:30Z")), &t, now));
        assert!(!transition_condition(Some(&item("claimed", "r", "2026-01-01T00:06:00Z")), &t, now));
        assert!(transition_condition(Some(&item("claimed", "r", "2026-01-01T00:06:01Z")), &t, now));
    }

    #[test]
    fn shapes_are_or_ed_and_deletions_need_this_runs_mark() {
        let released = Timestamp::parse("2026-01-01T00:10:00Z").unwrap();
        let now = Timestamp::parse("2026-01-01T00:00:00Z").unwrap();
        let mut mark = transition("a");
        mark.expected[0].threshold = ThresholdCondition::Any;
        mark.expected.push(Expectation {
            states: vec![InstanceState::Idle],
            run_id: String::new(),
            threshold: ThresholdCondition::Exactly(released),
            released_by: Some("r".into()),
        });
        let released_by =
            |by: &str| InstanceItem { released_by: by.into(), ..item("idle", "", "2026-01-01T00:10:00Z") };
        assert!(transition_condition(Some(&item("claimed", "r", "2000-01-01T00:00:00Z")), &mark, now));
        assert!(transition_condition(Some(&released_by("r")), &mark, now));
        // The pool's release at the same threshold is not this run's.
        assert!(!transition_condition(Some(&released_by("")), &mark, now));
        assert!(!transition_condition(Some(&released_by("other")), &mark, now));
        assert!(!transition_condition(Some(&item("idle", "", "2026-01-01T00:10:01Z")), &mark, now));
        assert!(!transition_condition(Some(&item("claimed", "other", "2026-01-01T00:10:00Z")), &mark, now));
        assert!(!transition_condition(None, &mark, now));
        let deletion = InstanceDeletion { instance_id: "a".into(), owner_run_id: "r".into() };
        assert!(delete_condition(Some(&item("terminated", "r", "x")), &deletion));
        assert!(!delete_condition(Some(&item("claimed", "r", "x")), &deletion));
        assert!(!delete_condition(Some(&item("terminated", "other", "x")), &deletion));
        assert!(!delete_condition(None, &deletion));
    }
}
