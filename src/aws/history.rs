//! The run history's index (issue 19): sweeps read only what is unfinished, and `list` reads
//! only the newest records it shows.
//!
//! Every run record carries two attributes of this engine's own, written with the record by
//! every create and replace (`record_item` in `dynamodb.rs`):
//! - `runIndexPK`: `RUN#UNFINISHED` while the run is not `Done`/`Failed`, `RUN#FINISHED` after;
//! - `runIndexSK`: `<createdAt>#<record identifier>`, which sorts by creation time.
//!
//! The table's global secondary index [`RUN_INDEX_NAME`] is keyed on them. A sweep queries the
//! `RUN#UNFINISHED` partition (its cost follows the unfinished runs, not the retained ones), and
//! `list` queries both partitions newest first with a `Limit` (its cost follows the limit). The
//! terminal write is a whole-item replace, so it moves the record from one partition to the
//! other in the same write that finishes the run: no second item, no second write.
//!
//! Records written before this change have neither attribute. `init` creates the index, gives
//! them their attributes (a one-time backfill), and only then writes the readiness item
//! (`TYPE#RUNINDEX`, `ID#post-provision-runs`). Until it exists, listings fall back to reading
//! the whole `TYPE#RUN` partition, bounded by [`crate::record::MAX_LISTED_RUNS`], and a listing
//! that bound stops says so ([`RunListing::bounded`]). Items of the pool (instance records,
//! metadata, heartbeats) never carry these attributes, so the index holds run records only.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement, KeyType, Projection, ProjectionType,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;

use super::errors::from_sdk;
use super::AwsPorts;
use crate::ports::{RunListing, StoreError};
use crate::record::RunRecord;
use crate::timestamp::Timestamp;

const SERVICE: &str = "DynamoDB";

/// The global secondary index of run records by finished-ness and creation time.
pub const RUN_INDEX_NAME: &str = "post-provision-runs";
/// The index's partition key attribute.
pub const RUN_INDEX_PK: &str = "runIndexPK";
/// The index's sort key attribute.
pub const RUN_INDEX_SK: &str = "runIndexSK";
/// The index partition of runs not `Done`/`Failed`.
pub const UNFINISHED_PARTITION: &str = "RUN#UNFINISHED";
/// The index partition of finished runs.
pub const FINISHED_PARTITION: &str = "RUN#FINISHED";
/// The identifier of the readiness item (`TYPE#RUNINDEX`).
const READY_IDENTIFIER: &str = "post-provision-runs";
/// The index layout this build reads; the readiness item carries the layout `init` built.
pub const RUN_INDEX_VERSION: u64 = 1;
/// Items per index Query page. A page is also capped by DynamoDB at 1 MB.
const INDEX_PAGE_ITEMS: i32 = 500;
/// How long `init` waits for a new index to become `ACTIVE`, and how often it looks.
const INDEX_WAIT_SECS: u64 = 300;
const INDEX_POLL_SECS: u64 = 2;

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn ready_key() -> HashMap<String, AttributeValue> {
    HashMap::from([("PK".to_string(), s("TYPE#RUNINDEX")), ("SK".to_string(), s(format!("ID#{READY_IDENTIFIER}")))])
}

/// The index sort key of a record: creation time first, so newest first is descending order.
fn index_sort_key(created_at: &str, identifier: &str) -> String {
    format!("{created_at}#{identifier}")
}

/// The index partition of a record in `state`.
fn index_partition(finished: bool) -> &'static str {
    if finished {
        FINISHED_PARTITION
    } else {
        UNFINISHED_PARTITION
    }
}

/// The index attributes every run-record write carries.
pub(super) fn index_attributes(record: &RunRecord) -> [(String, AttributeValue); 2] {
    [
        (RUN_INDEX_PK.to_string(), s(index_partition(record.state.is_terminal()))),
        (RUN_INDEX_SK.to_string(), s(index_sort_key(&record.created_at.to_string(), &record.identifier()))),
    ]
}

/// Whether an item attribute belongs to the index rather than to the record's format.
pub(super) fn is_index_attribute(name: &str) -> bool {
    name == RUN_INDEX_PK || name == RUN_INDEX_SK
}

fn key_attribute(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("attribute definition")
}

fn key_element(name: &str, key_type: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder().attribute_name(name).key_type(key_type).build().expect("key schema")
}

fn projection() -> Projection {
    // The whole record: `list` shows it and `resume --all` needs its state and lease, without
    // a second read per record.
    Projection::builder().projection_type(ProjectionType::All).build()
}

/// The index, for a `CreateTable` of a new pool table.
pub(super) fn index_for_new_table() -> (GlobalSecondaryIndex, [AttributeDefinition; 2]) {
    let index = GlobalSecondaryIndex::builder()
        .index_name(RUN_INDEX_NAME)
        .key_schema(key_element(RUN_INDEX_PK, KeyType::Hash))
        .key_schema(key_element(RUN_INDEX_SK, KeyType::Range))
        .projection(projection())
        .build()
        .expect("index definition");
    (index, [key_attribute(RUN_INDEX_PK), key_attribute(RUN_INDEX_SK)])
}

impl AwsPorts {
    /// Whether `init` has built the index and backfilled the records written before it.
    async fn run_index_ready(&self) -> Result<bool, StoreError> {
        let output = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .set_key(Some(ready_key()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| from_sdk(SERVICE, "GetItem", error))?;
        let version = output
            .item()
            .and_then(|item| item.get("indexVersion"))
            .and_then(|value| value.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok());
        Ok(version.is_some_and(|version| version >= RUN_INDEX_VERSION))
    }

    /// `RunStore::list_runs`: through the index once `init` has built it, else the full read.
    pub(super) async fn list_run_history(&self, unfinished_only: bool, limit: usize) -> Result<RunListing, StoreError> {
        if !self.run_index_ready().await? {
            tracing::warn!("the run index is not ready (run `post-provision init`): reading every run record");
            return self.list_runs_unindexed(unfinished_only, limit).await;
        }
        let mut listing = self.query_index_partition(UNFINISHED_PARTITION, limit).await?;
        if !unfinished_only {
            let finished = self.query_index_partition(FINISHED_PARTITION, limit).await?;
            listing.items_read += finished.items_read;
            listing.more |= finished.more;
            listing.records.extend(finished.records);
            // Both partitions are sorted by creation time: the newest `limit` of the two.
            listing.records.sort_by_key(|record| std::cmp::Reverse(newest_first_key(record)));
            if listing.records.len() > limit {
                listing.records.truncate(limit);
                listing.more = true;
            }
        }
        Ok(listing)
    }

    /// The newest `limit` records of one index partition, and whether it holds more.
    async fn query_index_partition(&self, partition: &str, limit: usize) -> Result<RunListing, StoreError> {
        let page_items = INDEX_PAGE_ITEMS.min(i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX));
        let mut pages = self
            .dynamodb
            .query()
            .table_name(&self.table)
            .index_name(RUN_INDEX_NAME)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", RUN_INDEX_PK)
            .expression_attribute_values(":pk", s(partition))
            .scan_index_forward(false)
            .limit(page_items)
            .into_paginator()
            .send();
        let mut listing = RunListing { indexed: true, ..RunListing::default() };
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| from_sdk(SERVICE, "Query", error))?;
            listing.items_read += page.scanned_count().max(0) as u64;
            for item in page.items() {
                if listing.records.len() == limit {
                    listing.more = true;
                    return Ok(listing);
                }
                listing.records.push(super::dynamodb::record_from_item(item)?);
            }
            // One item past the limit tells "more" from "exactly the limit" without reading on.
            if listing.records.len() == limit && page.last_evaluated_key().is_some() {
                listing.more = true;
                return Ok(listing);
            }
        }
        Ok(listing)
    }

    /// The fallback for a table `init` has not indexed yet: every run record of the partition,
    /// up to [`crate::record::MAX_LISTED_RUNS`] read, newest first after sorting.
    async fn list_runs_unindexed(&self, unfinished_only: bool, limit: usize) -> Result<RunListing, StoreError> {
        let mut query = self
            .dynamodb
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", s("TYPE#RUN"));
        if unfinished_only {
            // Filtered by DynamoDB: finished records are read but not sent back.
            query = query
                .filter_expression("NOT (#state IN (:done, :failed))")
                .expression_attribute_names("#state", "state")
                .expression_attribute_values(":done", s("Done"))
                .expression_attribute_values(":failed", s("Failed"));
        }
        let mut pages = query.into_paginator().send();
        let mut listing = RunListing::default();
        let mut matched = 0usize;
        let newest_first = |a: &RunRecord, b: &RunRecord| newest_first_key(b).cmp(&newest_first_key(a));
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| from_sdk(SERVICE, "Query", error))?;
            listing.items_read += page.scanned_count().max(0) as u64;
            for item in page.items() {
                matched += 1;
                listing.records.push(super::dynamodb::record_from_item(item)?);
            }
            // Keep memory bounded by the limit, not by the table: only the newest can be shown.
            if listing.records.len() > limit.saturating_mul(2).max(1_000) {
                listing.records.sort_by(newest_first);
                listing.records.truncate(limit);
            }
            if listing.items_read as usize >= crate::record::MAX_LISTED_RUNS && page.last_evaluated_key().is_some() {
                // The partition is read in run-id order, not time order: what is left unread
                // may hold the newest runs. The caller must say so and exit non-zero.
                tracing::warn!(read = listing.items_read, "stopped reading run records at the bound");
                listing.bounded = true;
                break;
            }
        }
        listing.records.sort_by(newest_first);
        listing.more = matched > limit;
        listing.records.truncate(limit);
        Ok(listing)
    }
}

/// The order of the index (creation time, then the record's identifier), for merging.
fn newest_first_key(record: &RunRecord) -> (Timestamp, String) {
    (record.created_at, record.identifier())
}

/// What [`ensure_run_index`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIndexCheck {
    /// The index was missing and `init` created it.
    pub created: bool,
    /// Records written before the index that `init` gave their index attributes.
    pub backfilled: u64,
}

/// Creates the run index when the table lacks it, waits until it is `ACTIVE`, gives every run
/// record written before it its index attributes, and then writes the readiness item: from
/// then on listings use the index. Safe to repeat.
pub async fn ensure_run_index(client: &Client, table: &str, now: Timestamp) -> Result<RunIndexCheck, String> {
    let created = create_index_if_missing(client, table).await?;
    wait_for_index(client, table).await?;
    let (backfilled, moved) = backfill(client, table).await?;
    if moved > 0 {
        return Err(format!(
            "{moved} run records changed while init gave them their index attributes (a driver of an older \
             version is still running?): repeat init"
        ));
    }
    client
        .put_item()
        .table_name(table)
        .set_item(Some(
            ready_key()
                .into_iter()
                .chain([
                    ("entityType".to_string(), s("RUNINDEX")),
                    ("identifier".to_string(), s(READY_IDENTIFIER)),
                    ("updatedAt".to_string(), s(now.to_string())),
                    ("indexVersion".to_string(), AttributeValue::N(RUN_INDEX_VERSION.to_string())),
                ])
                .collect(),
        ))
        .send()
        .await
        .map_err(|error| from_sdk(SERVICE, "PutItem", error).to_string())?;
    Ok(RunIndexCheck { created, backfilled })
}

async fn index_status(client: &Client, table: &str) -> Result<Option<IndexStatus>, String> {
    let output = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|error| from_sdk(SERVICE, "DescribeTable", error).to_string())?;
    let indexes = output.table().map(|t| t.global_secondary_indexes()).unwrap_or_default();
    Ok(indexes
        .iter()
        .find(|index| index.index_name() == Some(RUN_INDEX_NAME))
        .map(|index| index.index_status().cloned().unwrap_or(IndexStatus::Active)))
}

async fn create_index_if_missing(client: &Client, table: &str) -> Result<bool, String> {
    if index_status(client, table).await?.is_some() {
        return Ok(false);
    }
    let create = CreateGlobalSecondaryIndexAction::builder()
        .index_name(RUN_INDEX_NAME)
        .key_schema(key_element(RUN_INDEX_PK, KeyType::Hash))
        .key_schema(key_element(RUN_INDEX_SK, KeyType::Range))
        .projection(projection())
        .build()
        .map_err(|error| error.to_string())?;
    client
        .update_table()
        .table_name(table)
        .attribute_definitions(key_attribute(RUN_INDEX_PK))
        .attribute_definitions(key_attribute(RUN_INDEX_SK))
        .global_secondary_index_updates(GlobalSecondaryIndexUpdate::builder().create(create).build())
        .send()
        .await
        .map_err(|error| from_sdk(SERVICE, "UpdateTable", error).to_string())?;
    Ok(true)
}

/// DynamoDB builds a new index in the background (it reads the whole table once).
async fn wait_for_index(client: &Client, table: &str) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(INDEX_WAIT_SECS);
    loop {
        match index_status(client, table).await? {
            Some(IndexStatus::Active) => return Ok(()),
            status if std::time::Instant::now() >= deadline => {
                return Err(format!(
                    "index {RUN_INDEX_NAME} of table {table} is not ACTIVE after {INDEX_WAIT_SECS} s \
                     ({status:?}): repeat init later"
                ))
            }
            _ => tokio::time::sleep(std::time::Duration::from_secs(INDEX_POLL_SECS)).await,
        }
    }
}

/// Gives every run record without index attributes its attributes, conditional on the state
/// read (so the partition matches the state). Returns how many were written, and how many
/// changed under the backfill (left for the next `init`).
async fn backfill(client: &Client, table: &str) -> Result<(u64, u64), String> {
    let mut pages = client
        .query()
        .table_name(table)
        .key_condition_expression("PK = :pk")
        .filter_expression("attribute_not_exists(#indexPk)")
        .projection_expression("SK, #state, createdAt")
        .expression_attribute_names("#indexPk", RUN_INDEX_PK)
        .expression_attribute_names("#state", "state")
        .expression_attribute_values(":pk", s("TYPE#RUN"))
        .into_paginator()
        .send();
    let (mut written, mut moved) = (0, 0);
    while let Some(page) = pages.next().await {
        let page = page.map_err(|error| from_sdk(SERVICE, "Query", error).to_string())?;
        for item in page.items() {
            let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            let (sort_key, state) = (text("SK"), text("state"));
            let identifier = sort_key.strip_prefix("ID#").unwrap_or(&sort_key);
            let finished = matches!(state.as_str(), "Done" | "Failed");
            let result = client
                .update_item()
                .table_name(table)
                .set_key(Some(HashMap::from([
                    ("PK".to_string(), s("TYPE#RUN")),
                    ("SK".to_string(), s(sort_key.clone())),
                ])))
                .update_expression("SET #indexPk = :indexPk, #indexSk = :indexSk")
                .condition_expression("attribute_not_exists(#indexPk) AND #state = :state")
                .expression_attribute_names("#indexPk", RUN_INDEX_PK)
                .expression_attribute_names("#indexSk", RUN_INDEX_SK)
                .expression_attribute_names("#state", "state")
                .expression_attribute_values(":indexPk", s(index_partition(finished)))
                .expression_attribute_values(":indexSk", s(index_sort_key(&text("createdAt"), identifier)))
                .expression_attribute_values(":state", s(state.clone()))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            match result {
                Ok(_) => written += 1,
                Err(error) => {
                    if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) = error.as_service_error() {
                        // A driver of this version rewrote the record meanwhile, with its
                        // attributes: nothing to do. Anything else moved under the backfill.
                        let indexed = failed.item().is_some_and(|item| item.contains_key(RUN_INDEX_PK));
                        moved += u64::from(!indexed);
                        continue;
                    }
                    return Err(from_sdk(SERVICE, "UpdateItem", error).to_string());
                }
            }
        }
    }
    Ok((written, moved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_sort_keys_order_by_creation_time() {
        let older = index_sort_key("2026-11-27T10:00:00Z", "zzz");
        let newer = index_sort_key("2026-11-27T10:00:01Z", "aaa");
        assert!(older < newer);
        assert!(is_index_attribute(RUN_INDEX_PK) && is_index_attribute(RUN_INDEX_SK) && !is_index_attribute("state"));
    }
}
