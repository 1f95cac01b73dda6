//! Seeding a world for one measurement: a fresh table with the pool's configuration item, one
//! pool queue per resource class, EC2 instances and their records, and the run's spec. Nothing
//! here is measured; it is done in a process of its own, in bulk (RunInstances of up to 1,000,
//! BatchWriteItem of 25), so that the emulator spends as little time on it as it can.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{bail, Context as _};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use futures::stream::{self, StreamExt, TryStreamExt};
use post_provision::timestamp::Timestamp;
use serde::{Deserialize, Serialize};

use crate::PathKind;

/// Resource classes of the pool: name, instance type, vCPUs, memory (MiB).
pub const CLASSES: [(&str, &str, u32, u64); 2] = [("small", "t3.small", 1, 2048), ("large", "c6i.large", 2, 4096)];
/// Lifetime of committed instances (the spec's `maxRuntimeMin`).
pub const MAX_RUNTIME_MIN: i64 = 30;
/// Lifetime of instances returned to the pool (the spec's `idleTimeSec`).
pub const IDLE_TIME_SEC: i64 = 300;
/// The run that holds one instance in the cleanup scenario.
pub const OTHER_RUN: &str = "someone-else";
const RUN_INSTANCES_MAX: usize = 1_000;
const BATCH_WRITE_ITEMS: usize = 25;

/// One seeded instance and its record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// EC2 instance id.
    pub id: String,
    /// Resource class.
    pub class: String,
    /// `selected` (record `claimed`) or `created` (record `running`).
    pub role: String,
    /// The record's `state`.
    pub state: String,
    /// The record's `runId`.
    pub owner: String,
    /// The record's `threshold`.
    pub threshold: String,
}

/// A seeded world, as `measure` reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct World {
    /// The path this world is set up for.
    pub path: PathKind,
    /// The pool's table.
    pub table: String,
    /// The run.
    pub run_id: String,
    /// Pool queue URL by resource class.
    pub queues: BTreeMap<String, String>,
    /// The instances, selected first.
    pub instances: Vec<Instance>,
    /// The run's spec, as the earlier phases hand it over.
    pub spec: serde_json::Value,
}

/// Builds the world for `path` with `count` instances: the first half selected (`claimed`), the
/// rest created (`running`), classes alternating. For cleanup, the first claim has expired (so
/// commit is refused and the run goes to emergency cleanup) and, from four instances up, one
/// claimed instance a quarter of the way in belongs to another run (cleanup must leave it alone;
/// its transaction is cancelled once and re-sent without it).
pub async fn seed(path: PathKind, count: usize) -> anyhow::Result<World> {
    if count == 0 || count > 5_000 {
        bail!("instances must be 1..=5000, got {count}");
    }
    let endpoint = std::env::var("AWS_ENDPOINT_URL").context("AWS_ENDPOINT_URL (the emulator) is not set")?;
    // Generous timeouts: a RunInstances of 1,000 takes seconds in the emulator. No retries: a
    // re-sent RunInstances would launch another batch.
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region("us-east-1")
        .endpoint_url(&endpoint)
        .retry_config(RetryConfig::disabled())
        .timeout_config(TimeoutConfig::builder().operation_timeout(Duration::from_secs(600)).build())
        .load()
        .await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);

    let unique = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let table = format!("bench-{}-{count}-{unique}", path.name());
    let run_id = format!("run-{unique}");
    post_provision::aws::ensure_table(&dynamodb, &table).await.map_err(anyhow::Error::msg)?;
    let mut queues = BTreeMap::new();
    for (class, _, _, _) in CLASSES {
        let output = sqs.create_queue().queue_name(format!("{table}-{class}")).send().await?;
        queues.insert(class.to_string(), output.queue_url().context("queue url")?.to_string());
    }
    let start = Timestamp::now_utc();
    put_config(&dynamodb, &table, &queues, start).await?;

    let mut ids = Vec::with_capacity(count);
    while ids.len() < count {
        let batch = (count - ids.len()).min(RUN_INSTANCES_MAX) as i32;
        let output = ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::from("c6i.large"))
            .min_count(batch)
            .max_count(batch)
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                    .tags(aws_sdk_ec2::types::Tag::builder().key("InitialRunId").value("100000000").build())
                    .build(),
            )
            .send()
            .await?;
        ids.extend(output.instances().iter().filter_map(|i| i.instance_id()).map(str::to_string));
    }
    if ids.len() != count {
        bail!("RunInstances launched {} instances, not {count}", ids.len());
    }

    let selected_count = count.div_ceil(2);
    let foreign = (path == PathKind::Cleanup && count >= 4).then_some(count / 4);
    let instances: Vec<Instance> = ids
        .into_iter()
        .enumerate()
        .map(|(index, id)| {
            let selected = index < selected_count;
            let mut threshold = start.plus_secs(if selected { 240 } else { 600 });
            if path == PathKind::Cleanup && index == 0 {
                threshold = start.plus_secs(-60);
            }
            Instance {
                id,
                class: CLASSES[index % CLASSES.len()].0.to_string(),
                role: if selected { "selected" } else { "created" }.to_string(),
                state: if selected { "claimed" } else { "running" }.to_string(),
                owner: if foreign == Some(index) { OTHER_RUN.to_string() } else { run_id.clone() },
                threshold: threshold.to_string(),
            }
        })
        .collect();
    put_records(&dynamodb, &table, &instances, start).await?;

    let spec = spec_json(path, &run_id, &instances, &queues);
    post_provision::Spec::from_json(&spec.to_string()).map_err(|error| anyhow::anyhow!("seeded spec: {error}"))?;
    Ok(World { path, table, run_id, queues, instances, spec })
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn class_info(class: &str) -> (&'static str, &'static str, u32, u64) {
    *CLASSES.iter().find(|c| c.0 == class).expect("a known resource class")
}

async fn put_config(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
    queues: &BTreeMap<String, String>,
    start: Timestamp,
) -> anyhow::Result<()> {
    let mut config = HashMap::new();
    for (class, _, cpu, mmem) in CLASSES {
        config.insert(
            class.to_string(),
            AttributeValue::M(HashMap::from([
                ("cpu".to_string(), AttributeValue::N(cpu.to_string())),
                ("mmem".to_string(), AttributeValue::N(mmem.to_string())),
                ("queueUrl".to_string(), s(queues[class].clone())),
            ])),
        );
    }
    dynamodb
        .put_item()
        .table_name(table)
        .item("PK", s("TYPE#METADATA"))
        .item("SK", s("ID#resource_class_config"))
        .item("entityType", s("METADATA"))
        .item("identifier", s("resource_class_config"))
        .item("updatedAt", s(start.to_string()))
        .item("value", AttributeValue::M(config))
        .send()
        .await?;
    Ok(())
}

async fn put_records(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
    instances: &[Instance],
    start: Timestamp,
) -> anyhow::Result<()> {
    let batches: Vec<Vec<WriteRequest>> = instances
        .chunks(BATCH_WRITE_ITEMS)
        .map(|chunk| {
            chunk
                .iter()
                .map(|instance| {
                    let item = HashMap::from([
                        ("PK".to_string(), s("TYPE#INSTANCE")),
                        ("SK".to_string(), s(format!("ID#{}", instance.id))),
                        ("entityType".to_string(), s("INSTANCE")),
                        ("identifier".to_string(), s(instance.id.clone())),
                        ("state".to_string(), s(instance.state.clone())),
                        ("runId".to_string(), s(instance.owner.clone())),
                        ("threshold".to_string(), s(instance.threshold.clone())),
                        ("resourceClass".to_string(), s(instance.class.clone())),
                        ("instanceType".to_string(), s(class_info(&instance.class).1)),
                        ("usageClass".to_string(), s("on-demand")),
                        ("updatedAt".to_string(), s(start.to_string())),
                    ]);
                    let put = PutRequest::builder().set_item(Some(item)).build().expect("an item is set");
                    WriteRequest::builder().put_request(put).build()
                })
                .collect()
        })
        .collect();
    stream::iter(batches)
        .map(|mut requests| async move {
            for _ in 0..10 {
                let output = dynamodb.batch_write_item().request_items(table, requests).send().await?;
                requests = output.unprocessed_items().and_then(|u| u.get(table)).cloned().unwrap_or_default();
                if requests.is_empty() {
                    return Ok(());
                }
            }
            bail!("BatchWriteItem left {} items unprocessed after 10 calls", requests.len())
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Commit and cleanup: creation succeeded with exactly what was required (cleanup is then caused
/// by the expired claim). Rollback: creation was partial, one instance short. Every spec carries
/// the pool's `resourceClassConfig`, as an orchestrator that has it passes it on (a small
/// rollback then checks it inside its create instead of reading the pool first).
fn spec_json(
    path: PathKind,
    run_id: &str,
    instances: &[Instance],
    queues: &BTreeMap<String, String>,
) -> serde_json::Value {
    let entry = |instance: &Instance| {
        let (_, instance_type, cpu, mmem) = class_info(&instance.class);
        serde_json::json!({
            "id": instance.id, "resourceClass": instance.class, "instanceType": instance_type, "cpu": cpu,
            "mmem": mmem, "usageClass": "on-demand", "threshold": instance.threshold
        })
    };
    let selected: Vec<_> = instances.iter().filter(|i| i.role == "selected").map(entry).collect();
    let created: Vec<_> = instances.iter().filter(|i| i.role == "created").map(entry).collect();
    let (state, required) = match path {
        PathKind::Commit | PathKind::Cleanup => ("success", created.len()),
        PathKind::Rollback => ("partial", created.len() + 1),
    };
    serde_json::json!({
        "runId": run_id, "maxRuntimeMin": MAX_RUNTIME_MIN, "idleTimeSec": IDLE_TIME_SEC,
        "selection": {"numInstancesSelected": selected.len(), "numInstancesRequired": required, "instances": selected},
        "creation": {"state": state, "numInstancesCreated": created.len(), "instances": created},
        "resourceClassConfig": CLASSES
            .iter()
            .map(|(class, _, cpu, mmem)| {
                (class.to_string(), serde_json::json!({"cpu": cpu, "mmem": mmem, "queueUrl": queues[*class]}))
            })
            .collect::<serde_json::Map<_, _>>(),
    })
}
