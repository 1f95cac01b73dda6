//! The audit's reads (compact snapshots, never an item's full JSON) and its record repair.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_ec2::types::Filter;
use aws_sdk_sqs::types::QueueAttributeName;

use super::errors::from_sdk;
use super::AwsPorts;
use crate::audit::{Ec2Snapshot, InstanceRecordSnapshot, RunSnapshot};
use crate::ports::{AwsError, ErrorClass};
use crate::timestamp::Timestamp;

/// The most instance records, run records or EC2 instances one audit reads. Far above any
/// pool's size; it keeps memory bounded (about 200 bytes a record) when a table is not.
pub const MAX_AUDITED_ITEMS: usize = 200_000;

/// Instance ids per `instance-id` filter of a by-id lookup: EC2 takes at most 200 values in a
/// filter, and a filter (unlike `InstanceIds`) does not fail the call for an unknown id.
const IDS_PER_FILTER: usize = 200;

/// Which EC2 instances are the pool's: one `DescribeInstances` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceFilter {
    /// The filter's name, such as `tag-key` or `tag:InitialRunId`.
    pub name: String,
    /// Its values.
    pub values: Vec<String>,
}

impl InstanceFilter {
    /// Every instance that carries the tag `key` (the pool tag by default).
    pub fn tag_key(key: &str) -> InstanceFilter {
        InstanceFilter { name: "tag-key".into(), values: vec![key.into()] }
    }

    /// Parses `NAME=VALUE[,VALUE…]`, such as `tag:InitialRunId=9876543210`.
    pub fn parse(text: &str) -> Result<InstanceFilter, String> {
        let (name, values) =
            text.split_once('=').ok_or_else(|| format!("expected NAME=VALUE[,VALUE...], got {text:?}"))?;
        let values: Vec<String> = values.split(',').filter(|v| !v.is_empty()).map(str::to_string).collect();
        if name.is_empty() || values.is_empty() || values.len() > IDS_PER_FILTER {
            return Err(format!("expected a filter name and 1 to {IDS_PER_FILTER} values, got {text:?}"));
        }
        Ok(InstanceFilter { name: name.to_string(), values })
    }
}

const SERVICE: &str = "DynamoDB";

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> String {
    item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default()
}

/// The key of an item: `PK` = the partition, `SK` = `ID#<identifier>`.
fn item_key(partition: &str, identifier: String) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("PK".to_string(), AttributeValue::S(partition.to_string())),
        ("SK".to_string(), AttributeValue::S(format!("ID#{identifier}"))),
    ])
}

fn too_many(operation: &'static str, what: &str) -> AwsError {
    AwsError {
        service: SERVICE,
        operation,
        code: None,
        message: format!("more than {MAX_AUDITED_ITEMS} {what}: the audit reads at most that many"),
        class: ErrorClass::Invalid,
    }
}

impl AwsPorts {
    /// Every `TYPE#INSTANCE` record, only the attributes the audit classifies by (paged Query).
    pub async fn audit_instance_records(&self) -> Result<Vec<InstanceRecordSnapshot>, AwsError> {
        let mut pages = self
            .dynamodb
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", AttributeValue::S("TYPE#INSTANCE".into()))
            .projection_expression(
                "SK, #state, #runId, #threshold, resourceClass, instanceType, usageClass, updatedAt, releasedBy",
            )
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#runId", "runId")
            .expression_attribute_names("#threshold", "threshold")
            .into_paginator()
            .send();
        let mut records = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| from_sdk(SERVICE, "Query", error))?;
            for item in page.items() {
                let key = text(item, "SK");
                records.push(InstanceRecordSnapshot {
                    id: key.strip_prefix("ID#").unwrap_or(&key).to_string(),
                    state: text(item, "state"),
                    run_id: text(item, "runId"),
                    threshold: text(item, "threshold"),
                    resource_class: text(item, "resourceClass"),
                    instance_type: text(item, "instanceType"),
                    usage_class: text(item, "usageClass"),
                    updated_at: text(item, "updatedAt"),
                    released_by: text(item, "releasedBy"),
                });
            }
            if records.len() > MAX_AUDITED_ITEMS {
                return Err(too_many("Query", "instance records"));
            }
        }
        Ok(records)
    }

    /// Every run record (all attempts), only what the audit needs (paged Query).
    pub async fn audit_run_records(&self) -> Result<Vec<RunSnapshot>, AwsError> {
        let mut pages = self
            .dynamodb
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", AttributeValue::S("TYPE#RUN".into()))
            .projection_expression("runId, runAttempt, #state, #lease.#expiresAt, idleThreshold, messagesSent")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#lease", "lease")
            .expression_attribute_names("#expiresAt", "expiresAt")
            .into_paginator()
            .send();
        let mut runs = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| from_sdk(SERVICE, "Query", error))?;
            for item in page.items() {
                let idle_threshold = item.get("idleThreshold").and_then(|v| v.as_s().ok()).cloned();
                // Only a run that released instances can have left one unannounced: the others'
                // lists are not kept, so memory follows the rollbacks, not the runs.
                let messages_sent = match (&idle_threshold, item.get("messagesSent").and_then(|v| v.as_l().ok())) {
                    (Some(_), Some(list)) => list.iter().filter_map(|v| v.as_s().ok()).cloned().collect(),
                    _ => Vec::new(),
                };
                let lease_expires_at = item
                    .get("lease")
                    .and_then(|v| v.as_m().ok())
                    .map(|lease| text(lease, "expiresAt"))
                    .unwrap_or_default();
                runs.push(RunSnapshot {
                    run_id: text(item, "runId"),
                    attempt: item
                        .get("runAttempt")
                        .and_then(|v| v.as_n().ok())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1),
                    state: text(item, "state"),
                    lease_expires_at,
                    idle_threshold,
                    messages_sent,
                });
            }
            if runs.len() > MAX_AUDITED_ITEMS {
                return Err(too_many("Query", "run records"));
            }
        }
        Ok(runs)
    }

    /// EC2 instances matching `filter`, in pages of up to 1,000.
    pub async fn audit_pool_instances(&self, filter: &InstanceFilter) -> Result<Vec<Ec2Snapshot>, AwsError> {
        let filter = Filter::builder().name(&filter.name).set_values(Some(filter.values.clone())).build();
        self.describe_matching(filter).await
    }

    /// The instances with these ids, whatever their tags; ids EC2 does not know are left out.
    pub async fn audit_instances_by_id(&self, ids: &[String]) -> Result<Vec<Ec2Snapshot>, AwsError> {
        let mut found = Vec::new();
        for chunk in ids.chunks(IDS_PER_FILTER) {
            let filter = Filter::builder().name("instance-id").set_values(Some(chunk.to_vec())).build();
            found.extend(self.describe_matching(filter).await?);
        }
        Ok(found)
    }

    async fn describe_matching(&self, filter: Filter) -> Result<Vec<Ec2Snapshot>, AwsError> {
        let mut pages = self.ec2.describe_instances().filters(filter).max_results(1_000).into_paginator().send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| from_sdk("EC2", "DescribeInstances", error))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else { continue };
                instances.push(Ec2Snapshot {
                    id: id.to_string(),
                    state: instance
                        .state()
                        .and_then(|s| s.name())
                        .map(|name| name.as_str().to_string())
                        .unwrap_or_else(|| "unknown".into()),
                    launched_at: instance.launch_time().map(|t| Timestamp::from_unix_secs(t.secs())),
                    pool_tag: instance
                        .tags()
                        .iter()
                        .find(|tag| tag.key() == Some(self.limits.pool_tag_key.as_str()))
                        .map(|tag| tag.value().unwrap_or_default().to_string()),
                });
            }
            if instances.len() > MAX_AUDITED_ITEMS {
                return Err(AwsError {
                    service: "EC2",
                    operation: "DescribeInstances",
                    code: None,
                    message: format!("more than {MAX_AUDITED_ITEMS} instances match the filter"),
                    class: ErrorClass::Invalid,
                });
            }
        }
        Ok(instances)
    }

    /// A pool queue's approximate visible, delayed and in-flight messages (one request).
    pub async fn audit_queue_messages(&self, queue_url: &str) -> Result<u64, AwsError> {
        let output = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|error| from_sdk("SQS", "GetQueueAttributes", error))?;
        Ok(output
            .attributes()
            .map_or(0, |attributes| attributes.values().filter_map(|value| value.parse::<u64>().ok()).sum()))
    }

    /// Whether an instance record exists now (a consistent read): the last check before an
    /// orphan is terminated, since the audit's listing was read a while before.
    pub async fn audit_record_exists(&self, instance_id: &str) -> Result<bool, AwsError> {
        let output = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .set_key(Some(item_key("TYPE#INSTANCE", instance_id.to_string())))
            .projection_expression("SK")
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| from_sdk(SERVICE, "GetItem", error))?;
        Ok(output.item().is_some_and(|item| !item.is_empty()))
    }

    /// Adds `instance_id` to a finished run's `messagesSent` after the audit sent its pool
    /// message, so the next audit does not send it again. Finished runs are never written by a
    /// driver again, so the version stays. `Ok(false)`: the run is not finished (or is gone).
    pub async fn audit_mark_announced(&self, run_id: &str, attempt: u32, instance_id: &str) -> Result<bool, AwsError> {
        let result = self
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .set_key(Some(item_key("TYPE#RUN", crate::record::record_identifier(run_id, attempt))))
            .update_expression("SET #sent = list_append(#sent, :ids)")
            .condition_expression("#state IN (:done, :failed)")
            .expression_attribute_names("#sent", "messagesSent")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":ids", AttributeValue::L(vec![AttributeValue::S(instance_id.into())]))
            .expression_attribute_values(":done", AttributeValue::S("Done".into()))
            .expression_attribute_values(":failed", AttributeValue::S("Failed".into()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) => {
                let error = from_sdk(SERVICE, "UpdateItem", error);
                if error.class == ErrorClass::ConditionFailed {
                    Ok(false)
                } else {
                    Err(error)
                }
            }
        }
    }

    /// Deletes an instance record only if it is exactly as the audit read it (state, runId,
    /// threshold). `Ok(false)`: it moved since, and nothing was deleted.
    pub async fn audit_delete_record(&self, record: &InstanceRecordSnapshot) -> Result<bool, AwsError> {
        let result = self
            .dynamodb
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(item_key("TYPE#INSTANCE", record.id.clone())))
            .condition_expression("#state = :state AND #runId = :runId AND #threshold = :threshold")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#runId", "runId")
            .expression_attribute_names("#threshold", "threshold")
            .expression_attribute_values(":state", AttributeValue::S(record.state.clone()))
            .expression_attribute_values(":runId", AttributeValue::S(record.run_id.clone()))
            .expression_attribute_values(":threshold", AttributeValue::S(record.threshold.clone()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) => {
                let error = from_sdk(SERVICE, "DeleteItem", error);
                if error.class == ErrorClass::ConditionFailed {
                    Ok(false)
                } else {
                    Err(error)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_filters_parse() {
        assert_eq!(
            InstanceFilter::parse("tag:InitialRunId=1,2").unwrap(),
            InstanceFilter { name: "tag:InitialRunId".into(), values: vec!["1".into(), "2".into()] }
        );
        assert!(InstanceFilter::parse("tag-key").is_err());
        assert!(InstanceFilter::parse("=x").is_err());
        assert!(InstanceFilter::parse("name=").is_err());
    }
}
