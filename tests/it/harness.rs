//! The test world: a fresh table, pool queues and EC2 instances in moto per test, a fixed clock,
//! and a normalized picture of the world to compare runs with.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::QueueAttributeName;
use post_provision::aws::{ensure_table, load_sdk_config, Connection};
use post_provision::config::Limits;
use post_provision::driver::{Clock, Hooks};
use post_provision::timestamp::Timestamp;
use post_provision::Engine;

/// The emulator's endpoint; the tests refuse to run against anything else.
pub fn endpoint() -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .expect("AWS_ENDPOINT_URL is not set: run the tests with scripts/test, which starts moto");
    assert!(
        endpoint.starts_with("http://127.0.0.1:") || endpoint.starts_with("http://localhost:"),
        "integration tests only run against a local emulator, not {endpoint}"
    );
    endpoint
}

/// The CLI binary under test. `scripts/test` copies it to a private path right after building
/// and names it in `POST_PROVISION_BIN`: the target directory's `debug/post-provision` is shared
/// by every worktree that uses the same `CARGO_TARGET_DIR`, and another worktree's build would
/// replace it while these tests run.
pub fn cli_binary() -> std::path::PathBuf {
    std::env::var_os("POST_PROVISION_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_post-provision").into())
}

/// The tag specification of a launched instance: one tag.
pub fn instance_tag(key: &str, value: &str) -> aws_sdk_ec2::types::TagSpecification {
    aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
        .tags(aws_sdk_ec2::types::Tag::builder().key(key).value(value).build())
        .build()
}

/// A clock the test moves by hand.
#[derive(Debug)]
pub struct TestClock(AtomicI64);

impl TestClock {
    pub fn at(stamp: Timestamp) -> Arc<TestClock> {
        Arc::new(TestClock(AtomicI64::new(stamp.unix_secs())))
    }
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_secs(self.0.load(Ordering::SeqCst))
    }
}

/// Limits for tests that exercise the staged path (state first, then effects) of a small run:
/// its crash windows, and the calls the fault tests aim at.
pub fn staged_limits() -> Limits {
    Limits { one_transaction_max_instances: 0, ..test_limits() }
}

/// Limits for tests: quick retries, one batch at a time (deterministic write order).
pub fn test_limits() -> Limits {
    Limits {
        max_attempts: 3,
        initial_backoff: std::time::Duration::from_millis(5),
        max_backoff: std::time::Duration::from_millis(50),
        concurrency: 1,
        not_found_retries: 0,
        ..Limits::default()
    }
}

pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub sdk_config: aws_config::SdkConfig,
}

pub async fn clients() -> Clients {
    let connection = Connection { region: Some("us-east-1".into()), endpoint_url: Some(endpoint()) };
    let sdk_config = load_sdk_config(&connection, &test_limits()).await;
    Clients {
        dynamodb: aws_sdk_dynamodb::Client::new(&sdk_config),
        sqs: aws_sdk_sqs::Client::new(&sdk_config),
        ec2: aws_sdk_ec2::Client::new(&sdk_config),
        sdk_config,
    }
}

/// An instance the test seeded, with the role it plays in the spec.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub id: String,
    pub class: String,
    pub threshold: Timestamp,
}

/// How to seed one instance.
#[derive(Debug, Clone, Copy)]
pub struct Seed {
    pub class: &'static str,
    /// Record state, or None for no record at all.
    pub state: Option<&'static str>,
    /// Owner: `Own` = the test's run, `Other(x)`, or `Pool` ("").
    pub owner: Owner,
    /// Threshold relative to the clock's start, seconds.
    pub threshold_secs: i64,
}

#[derive(Debug, Clone, Copy)]
pub enum Owner {
    Own,
    Other(&'static str),
    Pool,
}

impl Seed {
    pub fn claimed(class: &'static str) -> Seed {
        Seed { class, state: Some("claimed"), owner: Owner::Own, threshold_secs: 240 }
    }
    pub fn created(state: &'static str) -> Seed {
        Seed { class: "large", state: Some(state), owner: Owner::Own, threshold_secs: 600 }
    }
}

pub struct World {
    pub name: String,
    pub table: String,
    pub clients: Clients,
    pub queues: BTreeMap<String, String>,
    pub start: Timestamp,
    pub run_id: String,
    pub selected: Vec<Seeded>,
    pub created: Vec<Seeded>,
}

pub const CLASSES: [(&str, &str, u32, u64); 2] = [("small", "t3.small", 1, 2048), ("large", "c6i.large", 2, 4096)];

impl World {
    /// A fresh table with the pool config item, and one queue per class.
    pub async fn new(name: &str) -> World {
        let clients = clients().await;
        let unique = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let table = format!("pp-{name}-{unique}");
        ensure_table(&clients.dynamodb, &table).await.expect("create table");
        // As `init` leaves a table: the run index built and marked ready.
        post_provision::aws::ensure_run_index(&clients.dynamodb, &table, Timestamp::now_utc())
            .await
            .expect("run index");
        let mut queues = BTreeMap::new();
        for (class, _, _, _) in CLASSES {
            let url = clients
                .sqs
                .create_queue()
                .queue_name(format!("{table}-{class}"))
                .send()
                .await
                .expect("create queue")
                .queue_url()
                .expect("queue url")
                .to_string();
            queues.insert(class.to_string(), url);
        }
        let world = World {
            name: name.to_string(),
            table,
            clients,
            queues,
            start: Timestamp::now_utc(),
            run_id: format!("run-{unique}"),
            selected: Vec::new(),
            created: Vec::new(),
        };
        world.put_config().await;
        world
    }

    pub async fn put_config(&self) {
        let mut config = HashMap::new();
        for (class, _, cpu, mmem) in CLASSES {
            config.insert(
                class.to_string(),
                AttributeValue::M(HashMap::from([
                    ("cpu".to_string(), AttributeValue::N(cpu.to_string())),
                    ("mmem".to_string(), AttributeValue::N(mmem.to_string())),
                    ("queueUrl".to_string(), AttributeValue::S(self.queues[class].clone())),
                ])),
            );
        }
        self.clients
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .item("PK", AttributeValue::S("TYPE#METADATA".into()))
            .item("SK", AttributeValue::S("ID#resource_class_config".into()))
            .item("entityType", AttributeValue::S("METADATA".into()))
            .item("identifier", AttributeValue::S("resource_class_config".into()))
            .item("updatedAt", AttributeValue::S(self.start.to_string()))
            .item("value", AttributeValue::M(config))
            .send()
            .await
            .expect("put config");
    }

    /// Launches a pool instance as this world's run's creation would: tagged `InitialRunId =
    /// <the run id>`.
    pub async fn launch(&self, class: &str) -> String {
        self.launch_tagged(class, Some(("InitialRunId", &self.run_id))).await
    }

    /// Launches an instance with the given tag, or none (an instance that is not the pool's).
    pub async fn launch_tagged(&self, class: &str, tag: Option<(&str, &str)>) -> String {
        let instance_type = CLASSES.iter().find(|c| c.0 == class).map(|c| c.1).unwrap_or("c6i.large");
        let mut request = self
            .clients
            .ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1);
        if let Some((key, value)) = tag {
            request = request.tag_specifications(instance_tag(key, value));
        }
        let output = request.send().await.expect("run instances");
        output.instances()[0].instance_id().expect("instance id").to_string()
    }

    /// Launches `count` pool instances (tag `InitialRunId = tag_value`) in as few RunInstances
    /// calls as allowed, without retries: a retried launch would launch another batch.
    pub async fn launch_many(&self, count: usize, tag_value: &str) -> Vec<String> {
        const RUN_INSTANCES_MAX: usize = 1_000;
        let mut ids = Vec::with_capacity(count);
        while ids.len() < count {
            let batch = (count - ids.len()).min(RUN_INSTANCES_MAX) as i32;
            let output = self
                .clients
                .ec2
                .run_instances()
                .image_id("ami-12c6146b")
                .instance_type(aws_sdk_ec2::types::InstanceType::from("c6i.large"))
                .min_count(batch)
                .max_count(batch)
                .tag_specifications(instance_tag("InitialRunId", tag_value))
                // moto takes tens of seconds for a large launch on a busy machine.
                .customize()
                .config_override(
                    aws_sdk_ec2::config::Builder::default()
                        .retry_config(aws_config::retry::RetryConfig::disabled())
                        .timeout_config(
                            aws_config::timeout::TimeoutConfig::builder()
                                .operation_timeout(std::time::Duration::from_secs(600))
                                .operation_attempt_timeout(std::time::Duration::from_secs(600))
                                .build(),
                        ),
                )
                .send()
                .await
                .expect("run instances");
            ids.extend(output.instances().iter().map(|i| i.instance_id().expect("instance id").to_string()));
        }
        assert_eq!(ids.len(), count, "RunInstances launched a different number of instances");
        ids
    }

    pub async fn put_record(&self, id: &str, class: &str, state: &str, run_id: &str, threshold: Timestamp) {
        let instance_type = CLASSES.iter().find(|c| c.0 == class).map(|c| c.1).unwrap_or("c6i.large");
        self.clients
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .item("PK", AttributeValue::S("TYPE#INSTANCE".into()))
            .item("SK", AttributeValue::S(format!("ID#{id}")))
            .item("entityType", AttributeValue::S("INSTANCE".into()))
            .item("identifier", AttributeValue::S(id.into()))
            .item("state", AttributeValue::S(state.into()))
            .item("runId", AttributeValue::S(run_id.into()))
            .item("threshold", AttributeValue::S(threshold.to_string()))
            .item("resourceClass", AttributeValue::S(class.into()))
            .item("instanceType", AttributeValue::S(instance_type.into()))
            .item("usageClass", AttributeValue::S("on-demand".into()))
            .item("updatedAt", AttributeValue::S(self.start.to_string()))
            .send()
            .await
            .expect("put record");
    }

    async fn seed_one(&self, seed: Seed) -> Seeded {
        let id = self.launch(seed.class).await;
        let threshold = self.start.plus_secs(seed.threshold_secs);
        if let Some(state) = seed.state {
            let owner = match seed.owner {
                Owner::Own => self.run_id.clone(),
                Owner::Other(other) => other.to_string(),
                Owner::Pool => String::new(),
            };
            self.put_record(&id, seed.class, state, &owner, threshold).await;
        }
        Seeded { id, class: seed.class.to_string(), threshold }
    }

    pub async fn seed(&mut self, selected: &[Seed], created: &[Seed]) {
        for seed in selected {
            let seeded = self.seed_one(*seed).await;
            self.selected.push(seeded);
        }
        for seed in created {
            let seeded = self.seed_one(*seed).await;
            self.created.push(seeded);
        }
    }

    /// The spec JSON for the seeded instances.
    pub fn spec_json(&self, creation_state: &str, required: usize) -> serde_json::Value {
        let entry = |s: &Seeded| {
            let (_, instance_type, cpu, mmem) = *CLASSES.iter().find(|c| c.0 == s.class).expect("known class");
            serde_json::json!({
                "id": s.id, "resourceClass": s.class, "instanceType": instance_type, "cpu": cpu, "mmem": mmem,
                "usageClass": "on-demand", "threshold": s.threshold.to_string()
            })
        };
        serde_json::json!({
            "runId": self.run_id, "maxRuntimeMin": 30, "idleTimeSec": 300,
            "selection": {"numInstancesSelected": self.selected.len(), "numInstancesRequired": required,
                          "instances": self.selected.iter().map(entry).collect::<Vec<_>>()},
            "creation": {"state": creation_state, "numInstancesCreated": self.created.len(),
                         "instances": self.created.iter().map(entry).collect::<Vec<_>>()},
        })
    }

    /// The pool's `resourceClassConfig` as this world's metadata item holds it, for a spec.
    pub fn pool_config_json(&self) -> serde_json::Value {
        CLASSES
            .iter()
            .map(|(class, _, cpu, mmem)| {
                (class.to_string(), serde_json::json!({"cpu": cpu, "mmem": mmem, "queueUrl": self.queues[*class]}))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// [`World::spec`] carrying the pool's own `resourceClassConfig`.
    pub fn spec_with_config(&self, creation_state: &str, required: usize) -> post_provision::Spec {
        let mut spec = self.spec_json(creation_state, required);
        spec["resourceClassConfig"] = self.pool_config_json();
        post_provision::Spec::from_json(&spec.to_string()).expect("valid spec")
    }

    pub fn spec(&self, creation_state: &str, required: usize) -> post_provision::Spec {
        post_provision::Spec::from_json(&self.spec_json(creation_state, required).to_string()).expect("valid spec")
    }

    pub async fn engine(&self, clock: Arc<TestClock>, hooks: Hooks) -> Engine {
        self.engine_with(clock, hooks, test_limits(), None).await
    }

    pub async fn engine_with(
        &self,
        clock: Arc<TestClock>,
        hooks: Hooks,
        limits: Limits,
        endpoint: Option<String>,
    ) -> Engine {
        let mut builder = Engine::builder().table(&self.table).limits(limits).clock(clock).hooks(hooks);
        match endpoint {
            Some(endpoint) => builder = builder.region("us-east-1").endpoint_url(endpoint),
            None => builder = builder.sdk_config(self.clients.sdk_config.clone()),
        }
        builder.build().await.expect("engine")
    }

    /// Starts `spec` staged with a driver that dies right after its first write: the run is
    /// created, unfinished, with its lease running.
    pub async fn crash_after_create(&self, clock: Arc<TestClock>, spec: post_provision::Spec) {
        let hooks = Hooks { crash_after_writes: Some(1), ..Hooks::default() };
        let crashing = self.engine_with(clock, hooks, staged_limits(), None).await;
        let crashed = crashing.start(spec).await;
        assert!(matches!(crashed, Err(post_provision::driver::DriveError::Crashed { .. })), "{crashed:?}");
    }

    /// Every seeded instance, selected first, with a stable name (`sel0`, `cre1`).
    pub fn named(&self) -> Vec<(String, &Seeded)> {
        let mut out: Vec<(String, &Seeded)> =
            self.selected.iter().enumerate().map(|(i, s)| (format!("sel{i}"), s)).collect();
        out.extend(self.created.iter().enumerate().map(|(i, s)| (format!("cre{i}"), s)));
        out
    }

    /// Replaces instance ids by their stable names.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (name, seeded) in self.named() {
            text = text.replace(&seeded.id, &name);
        }
        text.replace(&self.run_id, "RUN")
    }

    pub async fn record(&self, id: &str) -> Option<HashMap<String, AttributeValue>> {
        self.clients
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .key("PK", AttributeValue::S("TYPE#INSTANCE".into()))
            .key("SK", AttributeValue::S(format!("ID#{id}")))
            .consistent_read(true)
            .send()
            .await
            .expect("get record")
            .item()
            .cloned()
    }

    pub async fn ec2_state(&self, id: &str) -> String {
        let output = self.clients.ec2.describe_instances().instance_ids(id).send().await.expect("describe");
        output.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default()
    }

    /// The instance id and threshold (`id|threshold`) of every message in each pool queue.
    pub async fn queue_contents(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (class, url) in &self.queues {
            let mut ids: Vec<String> = drain_queue(&self.clients.sqs, url)
                .await
                .iter()
                .map(|body| {
                    let body: serde_json::Value = serde_json::from_str(body).expect("json body");
                    self.redact(&format!(
                        "{}|{}",
                        body["id"].as_str().unwrap_or(""),
                        body["threshold"].as_str().unwrap_or("")
                    ))
                })
                .collect();
            ids.sort();
            out.insert(class.clone(), ids);
        }
        out
    }

    /// The world as a comparable text: each instance's record and EC2 state, the queues, and
    /// thresholds relative to `base` (the run's start), so runs started at other times compare.
    pub async fn picture(&self, base: Timestamp, dedupe_messages: bool) -> String {
        let mut lines = Vec::new();
        for (name, seeded) in self.named() {
            let record = match self.record(&seeded.id).await {
                None => "no record".to_string(),
                Some(item) => {
                    let text = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
                    let threshold = Timestamp::parse(&text("threshold")).expect("threshold format");
                    let relative = if threshold == seeded.threshold {
                        "seeded".to_string()
                    } else {
                        format!("start{:+}s", threshold.unix_secs() - base.unix_secs())
                    };
                    let owner = self.redact(&text("runId"));
                    format!("{} runId={:?} threshold={relative}", text("state"), owner)
                }
            };
            lines.push(format!("{name}: record {record}; ec2 {}", self.ec2_state(&seeded.id).await));
        }
        for (class, ids) in self.queue_contents().await {
            let mut ids: Vec<String> = ids
                .into_iter()
                .map(|entry| {
                    let (id, threshold) = entry.split_once('|').unwrap_or((&entry, ""));
                    let relative = Timestamp::parse(threshold)
                        .map(|t| format!("start{:+}s", t.unix_secs() - base.unix_secs()))
                        .unwrap_or_else(|_| threshold.to_string());
                    format!("{id}@{relative}")
                })
                .collect();
            if dedupe_messages {
                ids = ids.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
            }
            lines.push(format!("queue {class}: [{}]", ids.join(", ")));
        }
        lines.join("\n")
    }

    /// The run record's start (`createdAt`), the base for relative thresholds.
    pub async fn run_start(&self, engine: &Engine) -> Timestamp {
        engine.status(&self.run_id).await.expect("status").expect("run record").created_at
    }

    /// Deletes the pool queue of a class (to make a rollback fail).
    pub async fn delete_queue(&self, class: &str) {
        self.clients.sqs.delete_queue().queue_url(&self.queues[class]).send().await.expect("delete queue");
    }
}

/// The trace of a run with ids replaced by stable names and timestamps made relative to the
/// world's start, one event per line.
pub fn trace_text(world: &World, trace: &[post_provision::driver::TraceEvent]) -> String {
    trace
        .iter()
        .map(|event| {
            relative_times(world.start, &world.redact(&serde_json::to_string(event).expect("trace serializes")))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replaces every data-model timestamp in `text` by its offset from `base`.
pub fn relative_times(base: Timestamp, text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let candidate = rest.get(..20).and_then(|s| Timestamp::parse(s).ok());
        match candidate {
            Some(stamp) => {
                out.push_str(&format!("start{:+}s", stamp.unix_secs() - base.unix_secs()));
                rest = &rest[20..];
            }
            None => {
                let next = rest.chars().next().expect("non-empty");
                out.push(next);
                rest = &rest[next.len_utf8()..];
            }
        }
    }
    out
}

/// Every message body in a queue, duplicates kept. Pool messages are sent with a 3 s delay, and
/// a queue's counts can miss a message at the moment it leaves the delay (each count is taken on
/// its own). So while any message is delayed, SQS's own long poll waits for it (it returns as
/// soon as a message becomes visible); once none is delayed the counts are stable, and the rest
/// is received up to that count. Bounded in rounds.
pub async fn drain_queue(sqs: &aws_sdk_sqs::Client, url: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut expected = None;
    for _ in 0..1_000 {
        if expected.is_none() {
            let attributes = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .expect("queue attributes");
            let depth = |name: QueueAttributeName| -> usize {
                attributes.attributes().and_then(|a| a.get(&name)).and_then(|v| v.parse().ok()).unwrap_or(0)
            };
            if depth(QueueAttributeName::ApproximateNumberOfMessagesDelayed) == 0 {
                // Messages received here are in flight (NotVisible) and counted.
                expected = Some(
                    depth(QueueAttributeName::ApproximateNumberOfMessages)
                        + depth(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
                );
            }
        }
        if expected.is_some_and(|expected| bodies.len() >= expected) {
            break;
        }
        let received = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(5)
            .visibility_timeout(600)
            .send()
            .await
            .expect("receive");
        bodies.extend(received.messages().iter().map(|m| m.body().unwrap_or("{}").to_string()));
    }
    assert_eq!(Some(bodies.len()), expected, "could not receive every message of {url}");
    bodies
}

/// How many messages a queue holds (every one received and counted; they stay in flight).
pub async fn settled_queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> usize {
    drain_queue(sqs, url).await.len()
}
