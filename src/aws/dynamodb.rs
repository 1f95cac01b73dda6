//! DynamoDB: run records, spec chunks, the pool's metadata, and instance-record transitions.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, Delete, KeySchemaElement, KeyType,
    KeysAndAttributes, Put, ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TransactWriteItem, Update,
};
use aws_sdk_dynamodb::Client;

use super::errors::from_sdk;
use super::AwsPorts;
use crate::core::{
    InstanceDeletion, InstanceKind, InstanceState, InstanceTransition, ObservedRecord, PoolGuard, ThresholdCondition,
    WriteResult,
};
use crate::ports::{
    AwsError, CreateOutcome, ErrorClass, Fence, InstanceFacts, InstanceStore, RunListing, RunStore, StoreError,
};
use crate::record::{self, RunRecord};
use crate::spec::ResourceClassConfig;
use crate::timestamp::Timestamp;

const SERVICE: &str = "DynamoDB";
type Item = HashMap<String, AttributeValue>;

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn key(entity: &str, identifier: &str) -> Item {
    HashMap::from([("PK".to_string(), s(format!("TYPE#{entity}"))), ("SK".to_string(), s(format!("ID#{identifier}")))])
}

/// A DynamoDB attribute as JSON (`serde_dynamo`: numbers stay numbers, maps stay maps), for the
/// pool's metadata items, which other phases write.
fn json_from_attribute(value: &AttributeValue) -> Result<serde_json::Value, serde_dynamo::Error> {
    serde_dynamo::aws_sdk_dynamodb_1::from_attribute_value(value.clone())
}

/// The identifier of a spec chunk item: the run, the spec's digest (so two different specs
/// racing for one run id never mix their chunks), and the chunk's index.
fn spec_chunk_identifier(run_id: &str, digest: &str, index: usize) -> String {
    format!("{run_id}#{}#{index}", &digest[..16])
}

/// A run record as its item: the record's fields as native attributes (`serde_dynamo`: maps
/// stay maps, numbers `N`, `None` fields left out as the record's serde attributes say), so
/// records read well in the console, plus the data model's key and common attributes.
fn record_item(record: &RunRecord) -> Result<Item, StoreError> {
    record::check_size(record).map_err(StoreError::TooLarge)?;
    let mut item: Item =
        serde_dynamo::aws_sdk_dynamodb_1::to_item(record).expect("a run record always converts to an item");
    let identifier = record.identifier();
    item.extend(key("RUN", &identifier));
    item.insert("entityType".into(), s("RUN"));
    item.insert("identifier".into(), s(identifier));
    // Every write carries the run index's keys, so the write that finishes a run also moves it
    // out of the index's unfinished partition (see `history.rs`).
    item.extend(super::history::index_attributes(record));
    Ok(item)
}

/// The item a run record is stored as, with its key and run-index attributes: for tests and
/// the benchmark, which seed run records directly.
pub fn run_record_item(record: &RunRecord) -> Result<Item, StoreError> {
    record_item(record)
}

/// Reads a run record from its item through its JSON form, which `record::from_json_value`
/// checks for the schema version first.
pub(super) fn record_from_item(item: &Item) -> Result<RunRecord, StoreError> {
    let fields: Item = item
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "PK" | "SK" | "entityType" | "identifier"))
        .filter(|(name, _)| !super::history::is_index_attribute(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let value: serde_json::Value = serde_dynamo::aws_sdk_dynamodb_1::from_item(fields)
        .map_err(|error| StoreError::Corrupt(format!("run record is not readable: {error}")))?;
    record::from_json_value(value).map_err(StoreError::Corrupt)
}

fn observed(item: Option<&Item>) -> Option<ObservedRecord> {
    let item = item.filter(|item| !item.is_empty())?;
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
    Some(ObservedRecord {
        state: text("state"),
        run_id: text("runId"),
        threshold: text("threshold"),
        released_by: text(RELEASED_BY),
    })
}

/// What the cancellation reasons of a transaction say about each item, in request order.
fn cancellation_results(
    reasons: &[aws_sdk_dynamodb::types::CancellationReason],
    count: usize,
) -> Result<Vec<WriteResult>, AwsError> {
    if reasons.len() != count {
        return Err(AwsError {
            service: SERVICE,
            operation: "TransactWriteItems",
            code: Some("TransactionCanceledException".into()),
            message: format!("{} cancellation reasons for {count} items", reasons.len()),
            class: ErrorClass::Other,
        });
    }
    reasons
        .iter()
        .map(|reason| match reason.code() {
            None | Some("None") => Ok(WriteResult::Cancelled),
            Some("ConditionalCheckFailed") => Ok(WriteResult::Rejected(observed(reason.item()))),
            // Load on the item's partition: every instance record shares one partition key.
            Some("ThrottlingError" | "ProvisionedThroughputExceeded") => Ok(WriteResult::Throttled),
            Some(code) => match super::classify_code(code, None) {
                class if class.is_retryable() => Ok(WriteResult::Cancelled),
                class => Err(AwsError {
                    service: SERVICE,
                    operation: "TransactWriteItems",
                    code: Some(code.to_string()),
                    message: reason.message().unwrap_or("transaction item rejected").to_string(),
                    class,
                }),
            },
        })
        .collect()
}

/// What a cancelled create says: the run existed already (or it is our own create, retried after
/// its answer was lost), the pool guard's check (the last item, when `guarded`) failed, a riding
/// transition was refused, or the create failed.
fn read_create_cancellation(
    reasons: &[aws_sdk_dynamodb::types::CancellationReason],
    record: &RunRecord,
    spec_chunks: &[String],
    transitions: &[InstanceTransition],
    guarded: bool,
) -> Result<CreateOutcome, StoreError> {
    let record_index = spec_chunks.len();
    let reason = reasons.get(record_index);
    if let Some(item) = reason.filter(|r| r.code() == Some("ConditionalCheckFailed")).and_then(|r| r.item()) {
        let existing = record_from_item(item)?;
        // A retried create whose first attempt landed finds itself: that is ours, and the
        // transaction was atomic, so its transitions landed with it.
        if record.is_own_create(&existing) {
            return Ok(CreateOutcome::Created);
        }
        return Ok(CreateOutcome::Exists(Box::new(existing)));
    }
    let complete = reasons.len() == spec_chunks.len() + 1 + transitions.len() + usize::from(guarded);
    // The pool's check is not an instance's: a refused one says nothing about the instances.
    if guarded && complete && reasons.last().and_then(|r| r.code()) == Some("ConditionalCheckFailed") {
        return Ok(CreateOutcome::PoolRefused);
    }
    if !transitions.is_empty() && complete {
        let effects =
            cancellation_results(&reasons[record_index + 1..record_index + 1 + transitions.len()], transitions.len());
        if let Ok(effects) = effects {
            if effects.iter().any(|result| *result != WriteResult::Cancelled) {
                return Ok(CreateOutcome::EffectsRefused(effects));
            }
        }
    }
    let code = reasons.iter().filter_map(|r| r.code()).find(|c| *c != "None");
    Err(StoreError::Aws(AwsError {
        service: SERVICE,
        operation: "TransactWriteItems",
        code: code.map(str::to_string),
        message: "creating the run record was cancelled".to_string(),
        class: super::classify_code(code.unwrap_or(""), None),
    }))
}

/// A fresh idempotency token for one transaction call. The SDK sends the same token with each
/// of its retries of that call, so a retry whose first attempt landed is applied once (within
/// DynamoDB's 10-minute window); a later call of ours gets a new token, because its parameters
/// (the `:now` of its condition) may differ, and reusing a token with other parameters is refused
/// with `IdempotentParameterMismatch`.
fn fresh_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl AwsPorts {
    /// The versioned `PutItem` of a run record; for a take-over, also only while `committedIds`
    /// holds `committed_as_read` ids (see [`RunStore::take_over_run`]).
    async fn put_run(
        &self,
        record: &RunRecord,
        expected_version: u64,
        committed_as_read: Option<usize>,
    ) -> Result<(), StoreError> {
        let mut put = self
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .set_item(Some(record_item(record)?))
            .condition_expression("#version = :expected")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":expected", AttributeValue::N(expected_version.to_string()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        match committed_as_read {
            None => {}
            Some(0) => {
                put = put
                    .condition_expression("#version = :expected AND attribute_not_exists(#committed)")
                    .expression_attribute_names("#committed", "committedIds");
            }
            Some(count) => {
                put = put
                    .condition_expression("#version = :expected AND size(#committed) = :committedCount")
                    .expression_attribute_names("#committed", "committedIds")
                    .expression_attribute_values(":committedCount", AttributeValue::N(count.to_string()));
            }
        }
        match put.send().await {
            Ok(_) => Ok(()),
            Err(error) => {
                if let Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(
                    failed,
                )) = error.as_service_error()
                {
                    let existing = failed.item().map(record_from_item).transpose()?;
                    // A retried write whose first attempt landed (the answer was lost) finds itself.
                    if let Some(existing) = &existing {
                        if existing.version == record.version && existing.lease.owner == record.lease.owner {
                            return Ok(());
                        }
                    }
                    return Err(StoreError::VersionConflict {
                        found_version: existing.as_ref().map(|r| r.version),
                        found_owner: existing.map(|r| r.lease.owner),
                    });
                }
                Err(from_sdk(SERVICE, "PutItem", error).into())
            }
        }
    }

    /// One fenced transaction: `items`, then the [`Fence`] on the run record: a `ConditionCheck`,
    /// or, when `committed` names commit transitions, an `Update` with the same condition that
    /// appends them to `committedIds` (`crate::run::commit::committed_ids`). Refused by the fence,
    /// every item comes back [`WriteResult::Fenced`].
    async fn transact(
        &self,
        mut items: Vec<TransactWriteItem>,
        fence: &Fence,
        committed: Vec<String>,
    ) -> Result<Vec<WriteResult>, AwsError> {
        let count = items.len();
        assert!(fence.unknown_attempt > fence.attempt, "a fence's unknown attempt comes after its own");
        items.push(self.unknown_attempt_check(&fence.run_id, fence.unknown_attempt)?);
        items.push(self.fence_check(fence, committed)?);
        let result = self
            .dynamodb
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(fresh_token())
            .send()
            .await;
        match result {
            Ok(_) => Ok(vec![WriteResult::Applied; count]),
            Err(error) => {
                if let Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(cancelled)) =
                    error.as_service_error()
                {
                    let reasons = cancelled.cancellation_reasons();
                    let fenced = |index: usize| reasons.get(index).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
                    if fenced(count) || fenced(count + 1) {
                        return Ok(vec![WriteResult::Fenced; count]);
                    }
                    let mut results = cancellation_results(reasons, count + 2)?;
                    results.truncate(count);
                    return Ok(results);
                }
                Err(from_sdk(SERVICE, "TransactWriteItems", error))
            }
        }
    }

    /// The fence's second half: the attempt of the run the driver does not know of has no
    /// record. Re-runs share the run id in every instance record, so a driver of an earlier
    /// attempt that read the attempts before a later one's record landed must not write on.
    fn unknown_attempt_check(&self, run_id: &str, unknown_attempt: u32) -> Result<TransactWriteItem, AwsError> {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key("RUN", &crate::record::record_identifier(run_id, unknown_attempt))))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    /// The fence: this driver holds the lease, its epoch is unchanged, and the run is not
    /// finished. No clock is involved: the lease's expiry is not part of it. With `committed`,
    /// the same condition guards an `Update` appending those ids to `committedIds`.
    fn fence_check(&self, fence: &Fence, committed: Vec<String>) -> Result<TransactWriteItem, AwsError> {
        if !committed.is_empty() {
            return self.fence_update(fence, committed);
        }
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key("RUN", &crate::record::record_identifier(&fence.run_id, fence.attempt))))
            .condition_expression(
                "#lease.#owner = :fenceOwner AND #epoch = :fenceEpoch AND NOT (#state IN (:done, :failed))",
            )
            .expression_attribute_names("#lease", "lease")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#epoch", "fencingEpoch")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":fenceOwner", s(fence.owner.clone()))
            .expression_attribute_values(":fenceEpoch", AttributeValue::N(fence.epoch.to_string()))
            .expression_attribute_values(":done", s("Done"))
            .expression_attribute_values(":failed", s("Failed"))
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    /// The fence of a commit transaction: the `ConditionCheck`'s condition on an `Update` that
    /// appends the committed ids to the run record's `committedIds` (a list; the version is not
    /// touched, so the driver's versioned writes are unaffected).
    fn fence_update(&self, fence: &Fence, committed: Vec<String>) -> Result<TransactWriteItem, AwsError> {
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key("RUN", &crate::record::record_identifier(&fence.run_id, fence.attempt))))
            .update_expression("SET #committed = list_append(if_not_exists(#committed, :none), :committed)")
            .condition_expression(
                "#lease.#owner = :fenceOwner AND #epoch = :fenceEpoch AND NOT (#state IN (:done, :failed))",
            )
            .expression_attribute_names("#lease", "lease")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#epoch", "fencingEpoch")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#committed", "committedIds")
            .expression_attribute_values(":fenceOwner", s(fence.owner.clone()))
            .expression_attribute_values(":fenceEpoch", AttributeValue::N(fence.epoch.to_string()))
            .expression_attribute_values(":done", s("Done"))
            .expression_attribute_values(":failed", s("Failed"))
            .expression_attribute_values(":none", AttributeValue::L(Vec::new()))
            .expression_attribute_values(":committed", AttributeValue::L(committed.into_iter().map(s).collect()))
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

impl AwsPorts {
    /// The [`PoolGuard`]'s `ConditionCheck` on the pool's metadata item: each of its classes with
    /// exactly its queue URL, `cpu` and `mmem` (what `Spec::check_config_against_pool` compares).
    /// Class names are the spec's, untrusted: they travel as expression attribute names only.
    fn pool_guard_check(&self, guard: &PoolGuard) -> Result<TransactWriteItem, AwsError> {
        let (condition, names, values) = pool_guard_condition(guard);
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key("METADATA", "resource_class_config")))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }
}

/// The condition of [`AwsPorts::pool_guard_check`], with its names and values.
fn pool_guard_condition(guard: &PoolGuard) -> (String, HashMap<String, String>, Item) {
    let mut names = HashMap::from([
        ("#v".to_string(), "value".to_string()),
        ("#q".to_string(), "queueUrl".to_string()),
        ("#p".to_string(), "cpu".to_string()),
        ("#m".to_string(), "mmem".to_string()),
    ]);
    let mut values = Item::new();
    let mut terms = Vec::with_capacity(guard.classes.len());
    for (index, (name, class)) in guard.classes.iter().enumerate() {
        names.insert(format!("#c{index}"), name.clone());
        values.insert(format!(":q{index}"), s(class.queue_url.clone()));
        values.insert(format!(":p{index}"), AttributeValue::N(class.cpu.to_string()));
        values.insert(format!(":m{index}"), AttributeValue::N(class.mmem.to_string()));
        terms.push(format!(
            "#v.#c{index}.#q = :q{index} AND #v.#c{index}.#p = :p{index} AND #v.#c{index}.#m = :m{index}"
        ));
    }
    (terms.join(" AND "), names, values)
}

fn build_error(operation: &'static str, error: impl std::fmt::Display) -> AwsError {
    AwsError { service: SERVICE, operation, code: None, message: error.to_string(), class: ErrorClass::Invalid }
}

impl InstanceStore for AwsPorts {
    async fn transition(
        &self,
        batch: &[InstanceTransition],
        now: Timestamp,
        fence: &Fence,
    ) -> Result<Vec<WriteResult>, AwsError> {
        assert!(batch.len() <= crate::core::MAX_FENCED_BATCH, "transaction batch too large");
        let items = batch.iter().map(|t| self.transition_item(t, now, None)).collect::<Result<Vec<_>, _>>()?;
        self.transact(items, fence, crate::run::commit::committed_ids(batch, &fence.run_id)).await
    }

    async fn delete(&self, batch: &[InstanceDeletion], fence: &Fence) -> Result<Vec<WriteResult>, AwsError> {
        assert!(batch.len() <= crate::core::MAX_FENCED_BATCH, "transaction batch too large");
        self.transact(self.deletion_items(batch)?, fence, Vec::new()).await
    }

    async fn delete_finishing(
        &self,
        batch: &[InstanceDeletion],
        record: &RunRecord,
        expected_version: u64,
        unknown_attempt: u32,
    ) -> Result<Vec<WriteResult>, AwsError> {
        assert!(batch.len() <= crate::core::MAX_FENCED_BATCH, "transaction batch too large");
        let count = batch.len();
        let mut items = self.deletion_items(batch)?;
        assert!(unknown_attempt > record.run_attempt, "a fence's unknown attempt comes after its own");
        items.push(self.unknown_attempt_check(&record.run_id, unknown_attempt)?);
        // The run's terminal write is the fence: the versioned `PutItem` every later record write
        // is, in the same transaction as the deletions.
        let item = record_item(record).map_err(|error| build_error("TransactWriteItems", error))?;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("#version = :expected")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":expected", AttributeValue::N(expected_version.to_string()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        items.push(TransactWriteItem::builder().put(put).build());
        let result = self
            .dynamodb
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(fresh_token())
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(vec![WriteResult::Applied; count]),
            Err(error) => error,
        };
        let Some(
            aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(
                cancelled,
            ),
        ) = error.as_service_error()
        else {
            return Err(from_sdk(SERVICE, "TransactWriteItems", error));
        };
        let reasons = cancelled.cancellation_reasons();
        let failed = |index: usize| reasons.get(index).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
        let fence = reasons.get(count + 1);
        if failed(count + 1) {
            // A re-sent transaction whose first answer was lost finds its own record.
            let found = fence.and_then(|r| r.item()).map(record_from_item).transpose().ok().flatten();
            let itself = found.is_some_and(|f| f.version == record.version && f.lease.owner == record.lease.owner);
            return Ok(vec![if itself { WriteResult::Applied } else { WriteResult::Fenced }; count]);
        }
        if failed(count) {
            return Ok(vec![WriteResult::Fenced; count]);
        }
        let mut results = cancellation_results(reasons, count + 2)?;
        results.truncate(count);
        Ok(results)
    }
}

impl AwsPorts {
    /// The deletions as transaction items: only a record this run marked.
    fn deletion_items(&self, batch: &[InstanceDeletion]) -> Result<Vec<TransactWriteItem>, AwsError> {
        let mut items = Vec::with_capacity(batch.len() + 1);
        for deletion in batch {
            // Only a record this run marked: see `core::InstanceDeletion`.
            let values = HashMap::from([
                (":owner".to_string(), s(deletion.owner_run_id.clone())),
                (":terminated".to_string(), s(InstanceState::Terminated.as_str())),
            ]);
            let delete = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key("INSTANCE", &deletion.instance_id)))
                .condition_expression("#state = :terminated AND #runId = :owner")
                .expression_attribute_names("#state", "state")
                .expression_attribute_names("#runId", "runId")
                .set_expression_attribute_values(Some(values))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .build()
                .map_err(|error| build_error("TransactWriteItems", error))?;
            items.push(TransactWriteItem::builder().delete(delete).build());
        }
        Ok(items)
    }

    /// One transition as a transaction item: the data model's conditional update; with a `kind`
    /// (a [`PoolGuard`]'s), only on a record of that class and, if it names one, that type.
    fn transition_item(
        &self,
        transition: &InstanceTransition,
        now: Timestamp,
        kind: Option<&InstanceKind>,
    ) -> Result<TransactWriteItem, AwsError> {
        let (mut condition, mut values) = transition_condition(transition, now);
        values.insert(":newState".to_string(), s(transition.new_state.as_str()));
        values.insert(":newRunId".to_string(), s(transition.new_run_id.clone()));
        values.insert(":newThreshold".to_string(), s(transition.new_threshold.to_string()));
        values.insert(":now".to_string(), s(now.to_string()));
        let mut names = instance_attribute_names();
        if transition.expected.iter().any(|expectation| expectation.released_by.is_some()) {
            names.insert("#releasedBy".to_string(), RELEASED_BY.to_string());
        }
        if let Some(kind) = kind {
            // Each alternative is parenthesised already; DynamoDB refuses redundant parentheses.
            if transition.expected.len() > 1 {
                condition = format!("({condition})");
            }
            condition.push_str(
                " AND #resourceClass = :kindClass AND (attribute_not_exists(#instanceType) OR #instanceType = :kindType)",
            );
            names.insert("#resourceClass".to_string(), "resourceClass".to_string());
            names.insert("#instanceType".to_string(), "instanceType".to_string());
            values.insert(":kindClass".to_string(), s(kind.resource_class.clone()));
            values.insert(":kindType".to_string(), s(kind.instance_type.clone()));
        }
        let mut update_expression =
            "SET #state = :newState, #runId = :newRunId, #threshold = :newThreshold, #updatedAt = :now".to_string();
        if let Some(releaser) = transition.released_by.clone() {
            // The audit's evidence that this run, not the pool, released the instance: an
            // attribute of this engine's own, which the pool's writers leave alone.
            names.insert("#releasedBy".to_string(), RELEASED_BY.to_string());
            values.insert(":releasedBy".to_string(), s(releaser));
            update_expression.push_str(", #releasedBy = :releasedBy");
        }
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key("INSTANCE", &transition.instance_id)))
            .update_expression(update_expression)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

/// The instance-record attribute naming the run whose rollback returned the instance to the pool.
const RELEASED_BY: &str = "releasedBy";

fn instance_attribute_names() -> HashMap<String, String> {
    HashMap::from([
        ("#state".to_string(), "state".to_string()),
        ("#runId".to_string(), "runId".to_string()),
        ("#threshold".to_string(), "threshold".to_string()),
        ("#updatedAt".to_string(), "updatedAt".to_string()),
    ])
}

/// The condition of one transition, exactly as the pool's writers phrase theirs (`state = … AND
/// runId = … AND threshold > :now`), one parenthesised alternative per expected record shape.
fn transition_condition(transition: &InstanceTransition, now: Timestamp) -> (String, HashMap<String, AttributeValue>) {
    let mut values = HashMap::new();
    let mut alternatives = Vec::with_capacity(transition.expected.len());
    for (index, expectation) in transition.expected.iter().enumerate() {
        let mut state_names = Vec::with_capacity(expectation.states.len());
        for (state_index, state) in expectation.states.iter().enumerate() {
            let name = format!(":e{index}s{state_index}");
            values.insert(name.clone(), s(state.as_str()));
            state_names.push(name);
        }
        values.insert(format!(":e{index}runId"), s(expectation.run_id.clone()));
        let mut condition = format!("#state IN ({}) AND #runId = :e{index}runId", state_names.join(", "));
        if let Some(released_by) = &expectation.released_by {
            values.insert(format!(":e{index}releasedBy"), s(released_by.clone()));
            condition.push_str(&format!(" AND #releasedBy = :e{index}releasedBy"));
        }
        match expectation.threshold {
            ThresholdCondition::Unexpired => {
                values.insert(format!(":e{index}now"), s(ThresholdCondition::unexpired_after(now).to_string()));
                condition.push_str(&format!(" AND #threshold > :e{index}now"));
            }
            ThresholdCondition::Exactly(threshold) => {
                values.insert(format!(":e{index}threshold"), s(threshold.to_string()));
                condition.push_str(&format!(" AND #threshold = :e{index}threshold"));
            }
            ThresholdCondition::Any => {}
        }
        alternatives.push(format!("({condition})"));
    }
    (alternatives.join(" OR "), values)
}

impl RunStore for AwsPorts {
    async fn load_run(&self, run_id: &str, attempt: u32) -> Result<Option<RunRecord>, StoreError> {
        let output = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key("RUN", &crate::record::record_identifier(run_id, attempt))))
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| from_sdk(SERVICE, "GetItem", error))?;
        output.item().map(record_from_item).transpose()
    }

    async fn load_attempts(&self, run_id: &str) -> Result<Vec<RunRecord>, StoreError> {
        // `ID#<runId>` and `ID#<runId>#<attempt>` share the prefix `ID#<runId>`; so does another
        // run id that merely starts with this one, which the filter below drops.
        let mut pages = self
            .dynamodb
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
            .expression_attribute_values(":pk", s("TYPE#RUN"))
            .expression_attribute_values(":prefix", s(format!("ID#{run_id}")))
            .consistent_read(true)
            .into_paginator()
            .send();
        let mut records = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| from_sdk(SERVICE, "Query", error))?;
            for item in page.items() {
                let sk = item.get("SK").and_then(|v| v.as_s().ok()).map(String::as_str).unwrap_or("");
                let rest = &sk[sk.len().min(3 + run_id.len())..];
                if rest.is_empty() || rest.starts_with('#') {
                    records.push(record_from_item(item)?);
                }
            }
            if records.len() >= crate::record::MAX_ATTEMPTS_READ {
                break;
            }
        }
        records.sort_by_key(|record: &RunRecord| record.run_attempt);
        records.truncate(crate::record::MAX_ATTEMPTS_READ);
        Ok(records)
    }

    async fn create_run(
        &self,
        record: &RunRecord,
        spec_chunks: &[String],
        chunk_ttl: i64,
        transitions: &[InstanceTransition],
        guard: Option<&PoolGuard>,
        now: Timestamp,
    ) -> Result<CreateOutcome, StoreError> {
        let count = spec_chunks.len() + 1 + transitions.len() + usize::from(guard.is_some());
        assert!(count <= crate::core::MAX_TRANSACTION_ITEMS, "create transaction too large");
        // One transaction: the spec chunks, the record and the state's first effects appear
        // together or not at all, so a crash can never leave a record whose spec is missing, nor
        // effects without their state, and it costs one round trip.
        let mut items = Vec::with_capacity(count);
        for (index, chunk) in spec_chunks.iter().enumerate() {
            let identifier = spec_chunk_identifier(&record.run_id, &record.spec_digest, index);
            let mut item = key("RUNSPEC", &identifier);
            item.insert("entityType".into(), s("RUNSPEC"));
            item.insert("identifier".into(), s(identifier.clone()));
            item.insert("updatedAt".into(), s(record.created_at.to_string()));
            item.insert("value".into(), s(chunk.clone()));
            item.insert(TTL_ATTRIBUTE.into(), AttributeValue::N(chunk_ttl.to_string()));
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .build()
                .map_err(|error| build_error("TransactWriteItems", error))?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(record_item(record)?))
            .condition_expression("attribute_not_exists(PK)")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|error| build_error("TransactWriteItems", error))?;
        items.push(TransactWriteItem::builder().put(put).build());
        for transition in transitions {
            let kind = guard.and_then(|guard| guard.instances.get(&transition.instance_id));
            items.push(self.transition_item(transition, now, kind)?);
        }
        // Last, so that the transitions' cancellation reasons keep their places.
        if let Some(guard) = guard {
            items.push(self.pool_guard_check(guard)?);
        }
        let result = self
            .dynamodb
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(fresh_token())
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(CreateOutcome::Created),
            Err(error) => error,
        };
        if let Some(
            aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(
                cancelled,
            ),
        ) = error.as_service_error()
        {
            let reasons = cancelled.cancellation_reasons();
            return read_create_cancellation(reasons, record, spec_chunks, transitions, guard.is_some());
        }
        Err(from_sdk(SERVICE, "TransactWriteItems", error).into())
    }

    async fn replace_run(&self, record: &RunRecord, expected_version: u64) -> Result<(), StoreError> {
        self.put_run(record, expected_version, None).await
    }

    async fn take_over_run(
        &self,
        record: &RunRecord,
        expected_version: u64,
        committed_as_read: usize,
    ) -> Result<(), StoreError> {
        self.put_run(record, expected_version, Some(committed_as_read)).await
    }

    async fn renew_lease(
        &self,
        run_id: &str,
        attempt: u32,
        owner: &str,
        expires_at: Timestamp,
    ) -> Result<bool, StoreError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key("RUN", &crate::record::record_identifier(run_id, attempt))))
            .update_expression("SET #lease.#expiresAt = :expiresAt")
            // A finished run's lease stays released, even when a renewal races the last write.
            .condition_expression("#lease.#owner = :owner AND NOT (#state IN (:done, :failed))")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":done", s("Done"))
            .expression_attribute_values(":failed", s("Failed"))
            .expression_attribute_names("#lease", "lease")
            .expression_attribute_names("#expiresAt", "expiresAt")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":expiresAt", s(expires_at.to_string()))
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) => {
                if let Some(
                    aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(_),
                ) = error.as_service_error()
                {
                    return Ok(false);
                }
                Err(from_sdk(SERVICE, "UpdateItem", error).into())
            }
        }
    }

    async fn load_spec(&self, run_id: &str, digest: &str, chunks: u32) -> Result<String, StoreError> {
        let mut text = String::new();
        for index in 0..chunks {
            let identifier = spec_chunk_identifier(run_id, digest, index as usize);
            let output = self
                .dynamodb
                .get_item()
                .table_name(&self.table)
                .set_key(Some(key("RUNSPEC", &identifier)))
                .consistent_read(true)
                .send()
                .await
                .map_err(|error| from_sdk(SERVICE, "GetItem", error))?;
            let chunk = output
                .item()
                .and_then(|item| item.get("value"))
                .and_then(|value| value.as_s().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("spec chunk {identifier} is missing")))?;
            text.push_str(chunk);
        }
        if record::digest(&text) != digest {
            return Err(StoreError::Corrupt(format!("the stored spec of run {run_id} does not match its digest")));
        }
        Ok(text)
    }

    async fn list_runs(&self, unfinished_only: bool, limit: usize) -> Result<RunListing, StoreError> {
        self.list_run_history(unfinished_only, limit).await
    }

    async fn load_resource_class_config(&self) -> Result<Option<ResourceClassConfig>, StoreError> {
        let output = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key("METADATA", "resource_class_config")))
            .send()
            .await
            .map_err(|error| from_sdk(SERVICE, "GetItem", error))?;
        let Some(value) = output.item().and_then(|item| item.get("value")) else {
            return Ok(None);
        };
        let corrupt = |error: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("TYPE#METADATA ID#resource_class_config: {error}"))
        };
        let value = json_from_attribute(value).map_err(|error| corrupt(&error))?;
        serde_json::from_value(value).map(Some).map_err(|error| corrupt(&error))
    }

    async fn load_instance_facts(&self, ids: &[String]) -> Result<Vec<InstanceFacts>, StoreError> {
        assert!(ids.len() <= crate::core::MAX_TRANSACTION_ITEMS, "BatchGetItem takes at most 100 keys");
        let mut pending: Vec<Item> = ids.iter().map(|id| key("INSTANCE", id)).collect();
        let mut facts = Vec::with_capacity(ids.len());
        // DynamoDB may leave keys unprocessed under load: ask again for those, a bounded number
        // of times (the SDK's own retries come first), then report the load as throttling.
        for _ in 0..UNPROCESSED_ROUNDS {
            if pending.is_empty() {
                return Ok(facts);
            }
            let keys = KeysAndAttributes::builder()
                .set_keys(Some(std::mem::take(&mut pending)))
                .projection_expression("SK, resourceClass, instanceType")
                .consistent_read(true)
                .build()
                .map_err(|error| StoreError::Corrupt(format!("BatchGetItem request: {error}")))?;
            let output = self
                .dynamodb
                .batch_get_item()
                .request_items(&self.table, keys)
                .send()
                .await
                .map_err(|error| from_sdk(SERVICE, "BatchGetItem", error))?;
            for item in output.responses().and_then(|r| r.get(&self.table)).into_iter().flatten() {
                let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
                let sort_key = text("SK").unwrap_or_default();
                facts.push(InstanceFacts {
                    id: sort_key.strip_prefix("ID#").unwrap_or(&sort_key).to_string(),
                    resource_class: text("resourceClass").unwrap_or_default(),
                    instance_type: text("instanceType"),
                });
            }
            pending = output
                .unprocessed_keys()
                .and_then(|u| u.get(&self.table))
                .map(|k| k.keys().to_vec())
                .unwrap_or_default();
        }
        if pending.is_empty() {
            return Ok(facts);
        }
        Err(StoreError::Aws(AwsError {
            service: SERVICE,
            operation: "BatchGetItem",
            code: Some("ProvisionedThroughputExceededException".into()),
            message: format!("{} instance records still unprocessed after {UNPROCESSED_ROUNDS} rounds", pending.len()),
            class: ErrorClass::Throttling,
        }))
    }
}

/// Rounds of asking again for the keys a `BatchGetItem` left unprocessed.
const UNPROCESSED_ROUNDS: usize = 5;

/// What [`ensure_table`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableCheck {
    /// The table was missing and has been created.
    Created,
    /// The table exists with the right key schema.
    Ok,
}

/// Creates the pool table (`PK`/`SK` strings, on-demand) if missing, or checks an existing one.
pub async fn ensure_table(client: &Client, table: &str) -> Result<TableCheck, String> {
    match client.describe_table().table_name(table).send().await {
        Ok(output) => {
            let description = output.table().ok_or("DescribeTable returned no table")?;
            let schema: Vec<(String, String)> = description
                .key_schema()
                .iter()
                .map(|element| (element.attribute_name().to_string(), element.key_type().as_str().to_string()))
                .collect();
            let expected = vec![("PK".to_string(), "HASH".to_string()), ("SK".to_string(), "RANGE".to_string())];
            if schema != expected {
                return Err(format!("table {table} has key schema {schema:?}, expected PK (HASH) and SK (RANGE)"));
            }
            Ok(TableCheck::Ok)
        }
        Err(error) => {
            let error = from_sdk(SERVICE, "DescribeTable", error);
            if error.class != ErrorClass::NotFound {
                return Err(error.to_string());
            }
            let attribute = |name: &str| {
                AttributeDefinition::builder()
                    .attribute_name(name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attribute definition")
            };
            let key_element = |name: &str, key_type| {
                KeySchemaElement::builder().attribute_name(name).key_type(key_type).build().expect("key schema")
            };
            // A new table gets the run index at once (`history.rs`); an existing one gets it
            // from `ensure_run_index`.
            let (index, [index_pk, index_sk]) = super::history::index_for_new_table();
            client
                .create_table()
                .table_name(table)
                .attribute_definitions(attribute("PK"))
                .attribute_definitions(attribute("SK"))
                .attribute_definitions(index_pk)
                .attribute_definitions(index_sk)
                .key_schema(key_element("PK", KeyType::Hash))
                .key_schema(key_element("SK", KeyType::Range))
                .global_secondary_indexes(index)
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await
                .map_err(|error| from_sdk(SERVICE, "CreateTable", error).to_string())?;
            // A new table is CREATING for a while on AWS; TTL and writes need it ACTIVE.
            use aws_sdk_dynamodb::client::Waiters;
            client
                .wait_until_table_exists()
                .table_name(table)
                .wait(std::time::Duration::from_secs(300))
                .await
                .map_err(|error| format!("table {table} did not become ACTIVE: {error}"))?;
            Ok(TableCheck::Created)
        }
    }
}

/// What [`ensure_ttl`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlCheck {
    /// TTL was off and is now enabled on `ttl`.
    Enabled,
    /// TTL was already enabled on `ttl`.
    AlreadyEnabled,
    /// TTL is enabled on another attribute; finished run records will not expire by themselves.
    OtherAttribute(String),
}

/// The TTL attribute of finished run records and spec chunks.
pub const TTL_ATTRIBUTE: &str = "ttl";

/// Enables DynamoDB TTL on [`TTL_ATTRIBUTE`] unless TTL is already on (on any attribute).
pub async fn ensure_ttl(client: &Client, table: &str) -> Result<TtlCheck, String> {
    let description = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|error| from_sdk(SERVICE, "DescribeTimeToLive", error).to_string())?;
    let current = description.time_to_live_description();
    let status = current.and_then(|d| d.time_to_live_status()).map(|s| s.as_str().to_string()).unwrap_or_default();
    let attribute = current.and_then(|d| d.attribute_name()).unwrap_or_default().to_string();
    if status == "ENABLED" || status == "ENABLING" {
        return Ok(if attribute == TTL_ATTRIBUTE {
            TtlCheck::AlreadyEnabled
        } else {
            TtlCheck::OtherAttribute(attribute)
        });
    }
    let specification = aws_sdk_dynamodb::types::TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(TTL_ATTRIBUTE)
        .build()
        .map_err(|error| error.to_string())?;
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(specification)
        .send()
        .await
        .map_err(|error| from_sdk(SERVICE, "UpdateTimeToLive", error).to_string())?;
    Ok(TtlCheck::Enabled)
}

impl AwsPorts {
    /// The DynamoDB client (for `init` and tests).
    pub fn dynamodb(&self) -> &Client {
        &self.dynamodb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RunRecord {
        let text = r#"{"schemaVersion": 2, "runId": "r1", "runAttempt": 2, "version": 3, "state": "RollingBack",
            "specDigest": "ab", "specChunks": 1, "instanceCount": 2, "createdAt": "2025-06-01T10:00:00Z",
            "updatedAt": "2025-06-01T10:00:01Z",
            "history": [{"state": "Reconciling", "at": "2025-06-01T10:00:00Z", "reason": "start"}],
            "idleThreshold": "2025-06-01T11:00:00Z", "queueUrls": {"small": "https://q/small"},
            "messagesSent": [], "lease": {"owner": "o", "expiresAt": "2025-06-01T10:01:00Z"}, "ttl": 1750000000}"#;
        record::from_json_value(serde_json::from_str(text).unwrap()).unwrap()
    }

    /// The item layout of docs/schema.md, attribute by attribute and type by type: what the
    /// hand-written conversion wrote before `serde_dynamo`, and what stored records hold.
    #[test]
    fn a_run_record_item_keeps_its_layout() {
        let item = record_item(&record()).unwrap();
        let n = |text: &str| AttributeValue::N(text.into());
        assert_eq!(item["PK"], s("TYPE#RUN"));
        assert_eq!(item["SK"], s("ID#r1#2"));
        assert_eq!(item["entityType"], s("RUN"));
        assert_eq!(item["identifier"], s("r1#2"));
        assert_eq!(item["schemaVersion"], n("2"));
        assert_eq!(item["runAttempt"], n("2"));
        assert_eq!(item["version"], n("3"));
        assert_eq!(item["ttl"], n("1750000000"));
        assert_eq!(item["state"], s("RollingBack"));
        assert_eq!(item["createdAt"], s("2025-06-01T10:00:00Z"));
        assert_eq!(item["messagesSent"], AttributeValue::L(vec![]));
        assert_eq!(
            item["history"],
            AttributeValue::L(vec![AttributeValue::M(HashMap::from([
                ("state".to_string(), s("Reconciling")),
                ("at".to_string(), s("2025-06-01T10:00:00Z")),
                ("reason".to_string(), s("start")),
            ]))])
        );
        assert_eq!(item["queueUrls"], AttributeValue::M(HashMap::from([("small".to_string(), s("https://q/small"))])));
        assert_eq!(
            item["lease"],
            AttributeValue::M(HashMap::from([
                ("owner".to_string(), s("o")),
                ("expiresAt".to_string(), s("2025-06-01T10:01:00Z")),
            ]))
        );
        // Fields the record leaves out when empty stay out of the item.
        for absent in ["commitThreshold", "error", "refusedAtCreate"] {
            assert!(!item.contains_key(absent), "{absent}");
        }
        // The fence's epoch (version 2 reads as 0), and the run index's keys.
        assert_eq!(item["fencingEpoch"], n("0"));
        assert_eq!(item["runIndexPK"], s("RUN#UNFINISHED"));
        assert_eq!(item["runIndexSK"], s("2025-06-01T10:00:00Z#r1#2"));
        assert_eq!(item.len(), 23, "{:?}", item.keys().collect::<Vec<_>>());
        assert_eq!(record_from_item(&item).unwrap(), record());
    }

    /// The pool guard's check is the create's last item: its refusal is the pool's, never an
    /// instance's, and an instance's refusal keeps its place.
    #[test]
    fn a_refused_pool_guard_is_not_an_instance_refusal() {
        use aws_sdk_dynamodb::types::CancellationReason;
        let reason = |code: &str| CancellationReason::builder().code(code).build();
        let transition = InstanceTransition {
            instance_id: "i-1".into(),
            role: crate::spec::Role::Selected,
            expected: Vec::new(),
            new_state: InstanceState::Idle,
            new_run_id: String::new(),
            new_threshold: Timestamp::parse("2025-06-01T11:00:00Z").unwrap(),
            released_by: None,
        };
        let chunks = ["{}".to_string()];
        let read = |codes: &[&str], guarded| {
            let reasons: Vec<CancellationReason> = codes.iter().map(|code| reason(code)).collect();
            read_create_cancellation(&reasons, &record(), &chunks, std::slice::from_ref(&transition), guarded)
        };
        let pool_refused = read(&["None", "None", "None", "ConditionalCheckFailed"], true).unwrap();
        assert!(matches!(pool_refused, CreateOutcome::PoolRefused), "{pool_refused:?}");
        let both = read(&["None", "None", "ConditionalCheckFailed", "ConditionalCheckFailed"], true).unwrap();
        assert!(matches!(both, CreateOutcome::PoolRefused), "{both:?}");
        let instance = read(&["None", "None", "ConditionalCheckFailed", "None"], true).unwrap();
        assert!(
            matches!(&instance, CreateOutcome::EffectsRefused(results) if *results == [WriteResult::Rejected(None)]),
            "{instance:?}"
        );
        let unguarded = read(&["None", "None", "ConditionalCheckFailed"], false).unwrap();
        assert!(matches!(unguarded, CreateOutcome::EffectsRefused(_)), "{unguarded:?}");
    }

    /// Class names are the spec's (untrusted): they travel as expression attribute names only,
    /// and the check of [`crate::core::MAX_GUARDED_CLASSES`] classes stays within DynamoDB's
    /// 4 KB expression bound.
    #[test]
    fn the_pool_guard_condition_names_classes_by_placeholder_and_fits_an_expression() {
        let class = crate::spec::ResourceClass { cpu: 2, mmem: 4096, queue_url: "https://q".into() };
        let classes: crate::spec::ResourceClassConfig = (0..crate::core::MAX_GUARDED_CLASSES)
            .map(|index| (format!("{index:x>64}) OR #x = :y"), class.clone()))
            .collect();
        let guard = PoolGuard { classes, instances: Default::default() };
        let (condition, names, values) = pool_guard_condition(&guard);
        assert!(condition.len() <= 4096, "{} bytes", condition.len());
        assert!(!condition.contains("OR"), "{condition}");
        assert_eq!(names.len(), 4 + crate::core::MAX_GUARDED_CLASSES);
        assert_eq!(values.len(), 3 * crate::core::MAX_GUARDED_CLASSES);
        let first = guard.classes.keys().next().expect("a class");
        assert_eq!(&names["#c0"], first);
    }

    #[test]
    fn metadata_attributes_read_as_json() {
        let value = AttributeValue::M(HashMap::from([(
            "small".to_string(),
            AttributeValue::M(HashMap::from([
                ("cpu".to_string(), AttributeValue::N("2".into())),
                ("mmem".to_string(), AttributeValue::N("4096".into())),
                ("queueUrl".to_string(), s("https://q")),
                ("flags".to_string(), AttributeValue::L(vec![AttributeValue::Bool(true), AttributeValue::Null(true)])),
            ])),
        )]));
        assert_eq!(
            json_from_attribute(&value).unwrap(),
            serde_json::json!({"small": {"cpu": 2, "mmem": 4096, "queueUrl": "https://q", "flags": [true, null]}})
        );
    }
}
