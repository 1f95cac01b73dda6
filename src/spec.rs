//! A run's input, the *spec*: what selection and creation hand over, parsed and validated.
//!
//! Validation is pure and complete before anything is written to AWS: a spec that fails here
//! changes nothing. Every error names the field and what was expected.

use std::collections::{BTreeMap, HashSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::timestamp::Timestamp;

/// The most instances (selected plus created) one run may carry. The run record stays far below
/// DynamoDB's 400 KB item limit at this size (see `docs/schema.md`).
pub const MAX_INSTANCES_PER_RUN: usize = 5_000;
/// The longest `maxRuntimeMin` accepted: 30 days.
pub const MAX_RUNTIME_MIN: i64 = 43_200;
/// The longest `idleTimeSec` accepted: 7 days.
pub const MAX_IDLE_TIME_SEC: i64 = 604_800;
/// The longest run id accepted. GitHub's run ids are decimal numbers of about 10 digits; the
/// character set also takes the ids other orchestrators and the tests use.
pub const MAX_RUN_ID_LEN: usize = 128;
/// The characters a run id may hold, as said in error messages. `#` is left out because it
/// separates the parts of DynamoDB keys (`ID#<run>#<digest>#<chunk>`); whitespace and control
/// characters are left out because run ids are printed to logs, step outputs and annotations.
pub const RUN_ID_CHARACTERS: &str = "A-Z a-z 0-9 . _ -";
/// [`RUN_ID_CHARACTERS`] as a JSON Schema pattern (for `docs/schemas/`).
const RUN_ID_PATTERN: &str = "^[A-Za-z0-9._-]+$";
/// An EC2 instance id as a JSON Schema pattern: `i-` and 8 or 17 lowercase hex digits.
pub const INSTANCE_ID_PATTERN: &str = "^i-([0-9a-f]{8}|[0-9a-f]{17})$";
/// A resource class name as a JSON Schema pattern: no control characters.
const RESOURCE_CLASS_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$";
/// A queue URL's form as a JSON Schema pattern (see [`check_queue_url`]).
const QUEUE_URL_PATTERN: &str = "^(https://sqs\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?|https?://(127\\.0\\.0\\.1|localhost|\\[::1\\])(:[0-9]+)?)/[0-9]{12}/[A-Za-z0-9_.-]{1,80}$";
/// The largest spec file or standard input the CLI reads. It is read through a bounded reader,
/// so a larger input is refused after this many bytes, never read whole. A 5,000-instance spec
/// is about 1.2 MB as compact JSON.
pub const MAX_SPEC_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// The longest resource class name.
pub const MAX_RESOURCE_CLASS_LEN: usize = 64;
/// The longest EC2 instance type (the longest real ones, such as `u7in-32tb.224xlarge`, have 19).
pub const MAX_INSTANCE_TYPE_LEN: usize = 64;
/// The longest queue URL (SQS queue names have at most 80 characters).
pub const MAX_QUEUE_URL_LEN: usize = 1_024;
/// The most resource classes a spec's `resourceClassConfig` may hold.
pub const MAX_RESOURCE_CLASSES: usize = 256;
/// The highest `runAttempt` accepted (GitHub allows far fewer re-runs).
pub const MAX_RUN_ATTEMPT: u32 = 10_000;
/// DynamoDB's limit on the total size of one `TransactWriteItems` call. The run record and every
/// spec chunk are written in one transaction.
pub const MAX_TRANSACTION_BYTES: usize = 4_000_000;
/// DynamoDB's limit on the items of one transaction.
pub const MAX_TRANSACTION_ITEMS: usize = 100;
/// Room left in the run record for what is not counted item by item: its fixed attributes and its
/// history, whose reasons may quote AWS error messages.
const RECORD_ALLOWANCE_BYTES: usize = 64 * 1024;
/// Key and bookkeeping attributes of one spec chunk item, beside the chunk's text.
const CHUNK_ITEM_OVERHEAD_BYTES: usize = 512;

/// A run's input, exactly as the earlier phases hand it over (camelCase JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The workflow run that owns the instances (GITHUB_RUN_ID).
    #[schemars(length(min = 1, max = MAX_RUN_ID_LEN), pattern(RUN_ID_PATTERN))]
    pub run_id: String,
    /// Which attempt of the workflow run this is (GitHub's `GITHUB_RUN_ATTEMPT`; "Re-run jobs"
    /// keeps the run id and increments it), 1..=[`MAX_RUN_ATTEMPT`]; 1 when absent. Left out of
    /// the canonical form when absent, so that specs written before it keep their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_RUN_ATTEMPT))]
    pub run_attempt: Option<u32>,
    /// Lifetime of committed instances, in minutes.
    #[schemars(range(min = 1, max = MAX_RUNTIME_MIN))]
    pub max_runtime_min: i64,
    /// Lifetime of instances returned to the pool, in seconds.
    #[schemars(range(min = 1, max = MAX_IDLE_TIME_SEC))]
    pub idle_time_sec: i64,
    /// What selection claimed.
    pub selection: Selection,
    /// What creation launched.
    pub creation: Creation,
    /// Resource class to pool queue; read from the table's metadata item when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = MAX_RESOURCE_CLASSES, "propertyNames" = {
        "minLength": 1, "maxLength": MAX_RESOURCE_CLASS_LEN, "pattern": RESOURCE_CLASS_PATTERN
    }))]
    pub resource_class_config: Option<ResourceClassConfig>,
}

/// Selection's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selection {
    /// How many instances selection claimed.
    pub num_instances_selected: u32,
    /// How many instances creation still had to make.
    pub num_instances_required: u32,
    /// The pool messages of the claimed instances.
    #[schemars(length(max = MAX_INSTANCES_PER_RUN))]
    pub instances: Vec<PoolInstance>,
}

/// Creation's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CreationState {
    /// Every requested instance was created and validated.
    Success,
    /// Some were.
    Partial,
    /// None were.
    Failed,
}

/// Creation's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Creation {
    /// Creation's outcome.
    pub state: CreationState,
    /// How many instances creation made and validated.
    pub num_instances_created: u32,
    /// The created instances, in pool-message shape.
    #[schemars(length(max = MAX_INSTANCES_PER_RUN))]
    pub instances: Vec<PoolInstance>,
}

/// An instance as the pool describes it: the body of a pool message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolInstance {
    /// The EC2 instance id.
    #[schemars(pattern(INSTANCE_ID_PATTERN))]
    pub id: String,
    /// The pool (resource class) the instance belongs to: no control characters (the schema
    /// counts characters, the engine bytes).
    #[schemars(length(min = 1, max = MAX_RESOURCE_CLASS_LEN), pattern(RESOURCE_CLASS_PATTERN))]
    pub resource_class: String,
    /// The EC2 instance type: a-z 0-9 . -
    #[schemars(length(min = 1, max = MAX_INSTANCE_TYPE_LEN), pattern("^[a-z0-9.-]+$"))]
    pub instance_type: String,
    /// vCPUs of the class.
    pub cpu: u32,
    /// Memory of the class, MiB.
    pub mmem: u64,
    /// `spot` or `on-demand`.
    pub usage_class: UsageClass,
    /// The record's threshold when the phase handed it over.
    pub threshold: Timestamp,
}

/// How an instance is paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UsageClass {
    /// A spot instance.
    #[serde(rename = "spot")]
    Spot,
    /// An on-demand instance.
    #[serde(rename = "on-demand")]
    OnDemand,
}

impl UsageClass {
    /// The value as stored in records and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageClass::Spot => "spot",
            UsageClass::OnDemand => "on-demand",
        }
    }
}

/// One resource class's pool settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceClass {
    /// vCPUs.
    #[schemars(range(min = 1))]
    pub cpu: u32,
    /// Memory, MiB.
    #[schemars(range(min = 1))]
    pub mmem: u64,
    /// The pool queue of the class: an SQS queue URL; an emulator's loopback URL only when the
    /// engine's endpoint is loopback too.
    #[schemars(length(max = MAX_QUEUE_URL_LEN), pattern(QUEUE_URL_PATTERN))]
    pub queue_url: String,
}

/// Resource class name to its pool settings.
pub type ResourceClassConfig = BTreeMap<String, ResourceClass>;

/// Why a spec was rejected: the field (a JSON path such as `selection.instances[0].id`) and what
/// was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid spec: {field}: {problem}")]
pub struct SpecError {
    /// The JSON path of the offending field (`$` for the document itself).
    pub field: String,
    /// What is wrong and what was expected.
    pub problem: String,
}

impl SpecError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
        SpecError { field: field.into(), problem: problem.into() }
    }
}

/// Which list an instance came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Claimed from the pool by selection.
    Selected,
    /// Launched by creation.
    Created,
}

impl Spec {
    /// Parses and validates a spec from JSON text.
    pub fn from_json(text: &str) -> Result<Spec, SpecError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let spec: Spec = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let object = if path == "." || path.is_empty() { None } else { Some(path) };
            if let Some(unknown) = unknown_field(&inner) {
                return unknown.into_error(object);
            }
            // serde reports a missing field at the object that lacks it: name the field itself.
            let field = match (object, missing_field(&inner)) {
                (Some(object), Some(name)) => format!("{object}.{name}"),
                (None, Some(name)) => name,
                (Some(object), None) => object,
                (None, None) => "$".to_string(),
            };
            SpecError::new(field, describe_json_error(&inner))
        })?;
        deserializer
            .end()
            .map_err(|error| SpecError::new("$", format!("trailing content after the JSON document ({error})")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as canonical JSON: the form stored with the run and compared on a repeated `run`.
    pub fn to_canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a spec always serializes")
    }

    /// Every instance of the run with its role, selected first, in spec order.
    pub fn instances(&self) -> impl Iterator<Item = (Role, &PoolInstance)> {
        self.selection
            .instances
            .iter()
            .map(|instance| (Role::Selected, instance))
            .chain(self.creation.instances.iter().map(|instance| (Role::Created, instance)))
    }

    /// The attempt of the run: `runAttempt`, 1 when absent.
    pub fn attempt(&self) -> u32 {
        self.run_attempt.unwrap_or(1)
    }

    /// The number of instances the run acts on.
    pub fn instance_count(&self) -> usize {
        self.selection.instances.len() + self.creation.instances.len()
    }

    /// Checks everything that can be checked without AWS.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_numbers()?;
        if let Some(config) = &self.resource_class_config {
            validate_config(config)?;
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let lists = [("selection", &self.selection.instances), ("creation", &self.creation.instances)];
        for (list, instances) in lists {
            for (index, instance) in instances.iter().enumerate() {
                let at = |field: &str| format!("{list}.instances[{index}].{field}");
                validate_instance_id(&instance.id).map_err(|problem| SpecError::new(at("id"), problem))?;
                if !seen.insert(instance.id.as_str()) {
                    return Err(SpecError::new(
                        at("id"),
                        format!("instance {} appears more than once (each instance may be listed once, in selection or in creation)", instance.id),
                    ));
                }
                self.validate_instance(instance, at)?;
            }
        }
        self.validate_stored_size()
    }

    /// The run id, the attempt, the times and the counts.
    fn validate_numbers(&self) -> Result<(), SpecError> {
        validate_run_id(&self.run_id).map_err(|problem| SpecError::new("runId", problem))?;
        if let Some(attempt) = self.run_attempt {
            if !(1..=MAX_RUN_ATTEMPT).contains(&attempt) {
                return Err(SpecError::new(
                    "runAttempt",
                    format!("expected a run attempt from 1 to {MAX_RUN_ATTEMPT}, got {attempt}"),
                ));
            }
        }
        if !(1..=MAX_RUNTIME_MIN).contains(&self.max_runtime_min) {
            return Err(SpecError::new(
                "maxRuntimeMin",
                format!("expected whole minutes from 1 to {MAX_RUNTIME_MIN}, got {}", self.max_runtime_min),
            ));
        }
        if !(1..=MAX_IDLE_TIME_SEC).contains(&self.idle_time_sec) {
            return Err(SpecError::new(
                "idleTimeSec",
                format!("expected whole seconds from 1 to {MAX_IDLE_TIME_SEC}, got {}", self.idle_time_sec),
            ));
        }
        let counts = [
            (
                "selection",
                "numInstancesSelected",
                self.selection.num_instances_selected,
                self.selection.instances.len(),
            ),
            ("creation", "numInstancesCreated", self.creation.num_instances_created, self.creation.instances.len()),
        ];
        for (list, field, stated, listed) in counts {
            if stated as usize != listed {
                return Err(SpecError::new(
                    format!("{list}.{field}"),
                    format!("expected the number of entries in {list}.instances ({listed}), got {stated}"),
                ));
            }
        }
        if self.instance_count() > MAX_INSTANCES_PER_RUN {
            return Err(SpecError::new(
                "$",
                format!("a run may act on at most {MAX_INSTANCES_PER_RUN} instances, got {}", self.instance_count()),
            ));
        }
        Ok(())
    }

    /// One instance's class and type, and its `cpu`/`mmem` against its class.
    fn validate_instance(&self, instance: &PoolInstance, at: impl Fn(&str) -> String) -> Result<(), SpecError> {
        validate_resource_class(&instance.resource_class)
            .map_err(|problem| SpecError::new(at("resourceClass"), problem))?;
        validate_instance_type(&instance.instance_type)
            .map_err(|problem| SpecError::new(at("instanceType"), problem))?;
        let Some(class) = self.resource_class_config.as_ref().and_then(|c| c.get(&instance.resource_class)) else {
            return Ok(());
        };
        let name = &instance.resource_class;
        if instance.cpu != class.cpu {
            return Err(SpecError::new(
                at("cpu"),
                format!(
                    "resource class {name:?} has cpu {} in resourceClassConfig, but this instance of it has cpu {}",
                    class.cpu, instance.cpu
                ),
            ));
        }
        if instance.mmem != class.mmem {
            return Err(SpecError::new(
                at("mmem"),
                format!(
                    "resource class {name:?} has mmem {} in resourceClassConfig, but this instance of it has mmem {}",
                    class.mmem, instance.mmem
                ),
            ));
        }
        Ok(())
    }

    /// The run record and the creating transaction stay within DynamoDB's limits.
    fn validate_stored_size(&self) -> Result<(), SpecError> {
        let size = stored_size_bound(self);
        if size.record_bytes > crate::record::MAX_RECORD_BYTES {
            return Err(SpecError::new(
                "$",
                format!(
                    "the run record could grow to {} bytes, over the {}-byte bound below DynamoDB's 400 KB item limit (too many instances or resource classes for one run)",
                    size.record_bytes,
                    crate::record::MAX_RECORD_BYTES
                ),
            ));
        }
        if size.transaction_bytes > MAX_TRANSACTION_BYTES || size.transaction_items > MAX_TRANSACTION_ITEMS {
            return Err(SpecError::new(
                "$",
                format!(
                    "the transaction that creates the run would write {} bytes in {} items, over DynamoDB's limit of {MAX_TRANSACTION_BYTES} bytes and {MAX_TRANSACTION_ITEMS} items per transaction",
                    size.transaction_bytes, size.transaction_items
                ),
            ));
        }
        Ok(())
    }

    /// Checks the queue URLs of the spec's own `resourceClassConfig` against `rule` (see
    /// [`check_queue_url`]). [`Spec::validate`] checks their form only loosely, because what is
    /// allowed depends on where the engine sends its requests.
    pub fn check_queue_urls(&self, rule: QueueUrlRule) -> Result<(), SpecError> {
        for (name, class) in self.resource_class_config.iter().flatten() {
            check_queue_url(&class.queue_url, rule)
                .map_err(|problem| SpecError::new(format!("resourceClassConfig.{name}.queueUrl"), problem))?;
        }
        Ok(())
    }

    /// Checks the spec's own `resourceClassConfig` against the pool's (the table's
    /// `TYPE#METADATA` / `ID#resource_class_config` item, when there is one). The pool's item is
    /// the authority: every class the spec configures must be the pool's, with the same queue URL,
    /// `cpu` and `mmem`. Without a pool item, the spec's queue URLs must pass `rule`.
    pub fn check_config_against_pool(
        &self,
        pool: Option<&ResourceClassConfig>,
        rule: QueueUrlRule,
    ) -> Result<(), SpecError> {
        let Some(config) = &self.resource_class_config else {
            return Ok(());
        };
        let Some(pool) = pool else {
            return self.check_queue_urls(rule);
        };
        for (name, class) in config {
            let at = |field: &str| format!("resourceClassConfig.{name}.{field}");
            let Some(known) = pool.get(name) else {
                return Err(SpecError::new(
                    format!("resourceClassConfig.{name}"),
                    format!(
                        "resource class {name:?} is not in the pool's resource_class_config (the table's TYPE#METADATA item knows {})",
                        pool.keys().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            if class.queue_url != known.queue_url {
                return Err(SpecError::new(
                    at("queueUrl"),
                    format!(
                        "expected the pool's queue URL for class {name:?} ({:?}, from the table's resource_class_config), got {:?}",
                        known.queue_url, class.queue_url
                    ),
                ));
            }
            if (class.cpu, class.mmem) != (known.cpu, known.mmem) {
                return Err(SpecError::new(
                    at("cpu"),
                    format!(
                        "expected the pool's cpu {} and mmem {} for class {name:?}, got cpu {} and mmem {}",
                        known.cpu, known.mmem, class.cpu, class.mmem
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Spec {
    /// Checks each instance against the pool (issue 18), before a run that returns instances to
    /// the pool writes anything: its class must have a queue in the pool's `pool` config, with the
    /// instance's `cpu` and `mmem`, and where its record exists (`records`), the record's
    /// `resourceClass` and `instanceType` must be the spec's. A pool message then carries only
    /// what the pool says, whatever the spec claims.
    pub fn check_against_pool_records(
        &self,
        pool: &ResourceClassConfig,
        records: &[crate::ports::InstanceFacts],
    ) -> Result<(), SpecError> {
        let by_id: BTreeMap<&str, &crate::ports::InstanceFacts> = records.iter().map(|r| (r.id.as_str(), r)).collect();
        let lists = [("selection", &self.selection.instances), ("creation", &self.creation.instances)];
        for (list, instances) in lists {
            for (index, instance) in instances.iter().enumerate() {
                let at = |field: &str| format!("{list}.instances[{index}].{field}");
                let class = &instance.resource_class;
                let Some(known) = pool.get(class) else {
                    return Err(SpecError::new(
                        at("resourceClass"),
                        format!("resource class {class:?} has no pool queue in the pool's resource_class_config (the table's TYPE#METADATA item); returning the instance to its pool needs one"),
                    ));
                };
                if (instance.cpu, instance.mmem) != (known.cpu, known.mmem) {
                    return Err(SpecError::new(
                        at("cpu"),
                        format!(
                            "expected the pool's cpu {} and mmem {} for class {class:?}, got cpu {} and mmem {}",
                            known.cpu, known.mmem, instance.cpu, instance.mmem
                        ),
                    ));
                }
                let Some(record) = by_id.get(instance.id.as_str()) else { continue };
                if record.resource_class != *class {
                    return Err(SpecError::new(
                        at("resourceClass"),
                        format!(
                            "instance {} is of class {:?} by its record in the pool's table, not {class:?}",
                            instance.id, record.resource_class
                        ),
                    ));
                }
                if let Some(instance_type) = record.instance_type.as_ref().filter(|t| **t != instance.instance_type) {
                    return Err(SpecError::new(
                        at("instanceType"),
                        format!(
                            "instance {} is a {instance_type:?} by its record in the pool's table, not {:?}",
                            instance.id, instance.instance_type
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which queue URLs a spec's `resourceClassConfig` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueUrlRule {
    /// Only SQS queue URLs: `https://sqs.<region>.amazonaws.com/<12-digit account>/<queue>` (and
    /// the `amazonaws.com.cn` partition). The default.
    #[default]
    SqsOnly,
    /// SQS queue URLs, and also `http(s)://127.0.0.1|localhost|[::1][:port]/<12-digit
    /// account>/<queue>`: an emulator's queues. The CLI allows these only when its endpoint
    /// (`--endpoint-url` or `AWS_ENDPOINT_URL`) is itself such a loopback address.
    SqsOrLoopback,
}

impl QueueUrlRule {
    /// The rule for an engine whose endpoint override is `endpoint`: loopback queue URLs are
    /// allowed only when the engine itself talks to a loopback emulator.
    pub fn for_endpoint(endpoint: Option<&str>) -> QueueUrlRule {
        match endpoint.and_then(|endpoint| split_url(endpoint.trim_end_matches('/'))) {
            Some((_, host, _)) if is_loopback(host) => QueueUrlRule::SqsOrLoopback,
            _ => QueueUrlRule::SqsOnly,
        }
    }
}

/// `(scheme, host, path)` of an `http` or `https` URL without query, fragment or user info.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") || rest.contains(['?', '#', '@']) {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    let host = match authority.strip_prefix('[') {
        Some(v6) => &authority[..v6.find(']')? + 2],
        None => authority.split(':').next()?,
    };
    let port = &authority[host.len()..];
    if !(port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    {
        return None;
    }
    Some((scheme, host, path))
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// Checks one queue URL against `rule`; the problem, said for an operator, otherwise.
pub fn check_queue_url(url: &str, rule: QueueUrlRule) -> Result<(), String> {
    let expected = match rule {
        QueueUrlRule::SqsOnly => "an SQS queue URL https://sqs.<region>.amazonaws.com/<12-digit account>/<queue>",
        QueueUrlRule::SqsOrLoopback => {
            "an SQS queue URL https://sqs.<region>.amazonaws.com/<12-digit account>/<queue>, or (with a loopback endpoint) http://127.0.0.1:<port>/<12-digit account>/<queue>"
        }
    };
    let refuse = || Err(format!("expected {expected}, got {url:?}"));
    if url.len() > MAX_QUEUE_URL_LEN {
        return Err(format!("expected at most {MAX_QUEUE_URL_LEN} characters, got {}", url.len()));
    }
    let Some((scheme, host, path)) = split_url(url) else {
        return refuse();
    };
    let mut parts = path.strip_prefix('/').unwrap_or("").split('/');
    let (account, queue) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path_ok = parts.next().is_none()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (1..=80).contains(&queue.len())
        && queue.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    let region_ok = |region: &str| {
        !region.is_empty() && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let sqs_host = ["amazonaws.com", "amazonaws.com.cn"].iter().any(|domain| {
        host.strip_prefix("sqs.")
            .and_then(|rest| rest.strip_suffix(domain))
            .and_then(|r| r.strip_suffix('.'))
            .is_some_and(region_ok)
    });
    let allowed = (scheme == "https" && sqs_host) || (rule == QueueUrlRule::SqsOrLoopback && is_loopback(host));
    if allowed && path_ok {
        Ok(())
    } else {
        refuse()
    }
}

/// An upper bound on what creating a run writes to DynamoDB for a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSize {
    /// The run record at its largest: every instance's id in `messagesSent`, one queue URL per
    /// resource class of the run, and an allowance for the history.
    pub record_bytes: usize,
    /// The creating transaction: the record and the spec's chunk items.
    pub transaction_bytes: usize,
    /// The items of that transaction.
    pub transaction_items: usize,
}

/// What creating a run for `spec` writes at most (see `crate::record::split_spec` for the
/// chunks and `crate::record::check_size` for the record). Pure, so a spec too large to store is
/// refused before anything is written.
pub fn stored_size_bound(spec: &Spec) -> StoredSize {
    let classes: HashSet<&str> = spec.instances().map(|(_, instance)| instance.resource_class.as_str()).collect();
    let queue_urls: usize = classes
        .iter()
        .map(|class| {
            let url = spec.resource_class_config.as_ref().and_then(|c| c.get(*class)).map(|c| c.queue_url.len());
            // A class without a URL in the spec gets the pool's, which may be as long as allowed.
            class.len() + url.unwrap_or(MAX_QUEUE_URL_LEN) + 8
        })
        .sum();
    // `"i-0123456789abcdef0",` per instance in messagesSent.
    let record_bytes = RECORD_ALLOWANCE_BYTES + spec.instance_count() * 22 + queue_urls + spec.run_id.len() * 4;
    let spec_bytes = spec.to_canonical_json().len();
    let chunks = spec_bytes.div_ceil(crate::record::SPEC_CHUNK_BYTES).max(1);
    StoredSize {
        record_bytes,
        transaction_bytes: record_bytes + spec_bytes + chunks * CHUNK_ITEM_OVERHEAD_BYTES,
        transaction_items: 1 + chunks,
    }
}

fn validate_config(config: &ResourceClassConfig) -> Result<(), SpecError> {
    if config.len() > MAX_RESOURCE_CLASSES {
        return Err(SpecError::new(
            "resourceClassConfig",
            format!("expected at most {MAX_RESOURCE_CLASSES} resource classes, got {}", config.len()),
        ));
    }
    for (name, class) in config {
        let at = |field: &str| format!("resourceClassConfig.{name}{field}");
        validate_resource_class(name).map_err(|problem| SpecError::new(at(""), problem))?;
        if class.cpu == 0 {
            return Err(SpecError::new(at(".cpu"), "expected the class's vCPUs, a number above 0, got 0"));
        }
        if class.mmem == 0 {
            return Err(SpecError::new(at(".mmem"), "expected the class's memory in MiB, a number above 0, got 0"));
        }
        if class.queue_url.trim().is_empty() {
            return Err(SpecError::new(at(".queueUrl"), "expected the URL of the class's pool queue"));
        }
        // The form only: which hosts are allowed depends on the engine's endpoint (see
        // `Spec::check_queue_urls`).
        check_queue_url(&class.queue_url, QueueUrlRule::SqsOrLoopback)
            .map_err(|problem| SpecError::new(at(".queueUrl"), problem))?;
    }
    Ok(())
}

/// Checks a run id: 1 to [`MAX_RUN_ID_LEN`] characters of [`RUN_ID_CHARACTERS`]. Used for the
/// spec's `runId` and for every CLI argument that names a run.
pub fn validate_run_id(run_id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if run_id.is_empty() {
        return Err("expected a non-empty run id".to_string());
    }
    if run_id.len() > MAX_RUN_ID_LEN || !run_id.chars().all(ok_char) {
        return Err(format!(
            "expected 1 to {MAX_RUN_ID_LEN} characters of {RUN_ID_CHARACTERS} (a GitHub run id is a decimal number), got {}",
            quoted_prefix(run_id)
        ));
    }
    Ok(())
}

/// A resource class name: 1 to [`MAX_RESOURCE_CLASS_LEN`] bytes, no control characters.
fn validate_resource_class(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("expected a non-empty resource class name".to_string());
    }
    if name.len() > MAX_RESOURCE_CLASS_LEN {
        return Err(format!(
            "expected a resource class name of at most {MAX_RESOURCE_CLASS_LEN} bytes, got {} bytes",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("expected a resource class name without control characters, got {}", quoted_prefix(name)));
    }
    Ok(())
}

/// An EC2 instance type: 1 to [`MAX_INSTANCE_TYPE_LEN`] characters of a-z 0-9 . -.
fn validate_instance_type(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    if name.is_empty() {
        return Err("expected a non-empty EC2 instance type".to_string());
    }
    if name.len() > MAX_INSTANCE_TYPE_LEN || !name.chars().all(ok) {
        return Err(format!(
            "expected an EC2 instance type such as c6i.large (1 to {MAX_INSTANCE_TYPE_LEN} characters of a-z 0-9 . -), got {}",
            quoted_prefix(name)
        ));
    }
    Ok(())
}

/// A value quoted for an error message, control characters escaped, cut after 80 characters so
/// that a megabyte-long value does not become a megabyte-long message.
fn quoted_prefix(value: &str) -> String {
    let mut prefix: String = value.chars().take(80).collect();
    if prefix.len() < value.len() {
        prefix.push('…');
        return format!("{prefix:?} ({} bytes)", value.len());
    }
    format!("{prefix:?}")
}

/// EC2 instance ids are `i-` and 8 or 17 lowercase hex digits.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    let hex = id.strip_prefix("i-").unwrap_or("");
    let valid = (hex.len() == 8 || hex.len() == 17) && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    if valid {
        Ok(())
    } else {
        Err(format!("expected an EC2 instance id (i- and 8 or 17 lowercase hex digits), got {}", quoted_prefix(id)))
    }
}

/// The field serde's "missing field `name`" error is about. serde has no structured form of this
/// error, so its (stable) message is read.
fn missing_field(error: &serde_json::Error) -> Option<String> {
    let text = error.to_string();
    let rest = text.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// serde's "unknown field `name`, expected one of `a`, `b`" (from `deny_unknown_fields`), read
/// from its stable message as [`missing_field`] does.
struct UnknownField {
    name: String,
    known: Vec<String>,
}

fn unknown_field(error: &serde_json::Error) -> Option<UnknownField> {
    let text = error.to_string();
    let rest = text.strip_prefix("unknown field `")?;
    let end = rest.find("`, expected ")?;
    let name = rest[..end].to_string();
    let known = rest[end..].split('`').skip(2).step_by(2).map(str::to_string).collect();
    Some(UnknownField { name, known })
}

impl UnknownField {
    /// The error, at the unknown field's own path, with the nearest known name.
    fn into_error(self, path: Option<String>) -> SpecError {
        // serde_path_to_error's path already ends in the unknown key; older versions stop at
        // the object that holds it.
        let field = match path {
            Some(path) if path == self.name || path.ends_with(&format!(".{}", self.name)) => path,
            Some(path) => format!("{path}.{}", self.name),
            None => self.name.clone(),
        };
        let nearest = self
            .known
            .iter()
            .map(|known| (strsim::damerau_levenshtein(&self.name.to_lowercase(), &known.to_lowercase()), known))
            .min();
        let suggestion = match nearest {
            Some((distance, known)) if distance <= 3.max(self.name.len() / 3) => format!("; did you mean `{known}`?"),
            _ => String::new(),
        };
        let known = self.known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
        SpecError::new(
            field,
            format!("unknown field {}{suggestion} (known fields here: {known})", quoted_prefix(&self.name)),
        )
    }
}

fn describe_json_error(error: &serde_json::Error) -> String {
    // serde's own text already says what was expected ("invalid type: string, expected i64");
    // the position helps with malformed JSON, whose path is not meaningful. It quotes the
    // offending value as it is, so control characters in it are escaped here.
    let text = match error.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("malformed JSON: {error}")
        }
        _ => {
            let text = error.to_string();
            // Drop serde_json's " at line L column C" suffix: the field path says where.
            match text.rfind(" at line ") {
                Some(cut) => text[..cut].to_string(),
                None => text,
            }
        }
    };
    escape_control(&text)
}

/// `text` with control characters written as Rust escapes (`\n`, `\u{1b}`), on one line.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn instance_json(id: &str, class: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id, "resourceClass": class, "instanceType": "c6i.large", "cpu": 2, "mmem": 4096,
            "usageClass": "on-demand", "threshold": "2026-11-27T10:05:00Z"
        })
    }

    pub(crate) fn spec_json() -> serde_json::Value {
        serde_json::json!({
            "runId": "9876543210", "maxRuntimeMin": 30, "idleTimeSec": 300,
            "selection": {"numInstancesSelected": 1, "numInstancesRequired": 1,
                          "instances": [instance_json("i-0aaaaaaaaaaaaaaaa", "large")]},
            "creation": {"state": "success", "numInstancesCreated": 1,
                         "instances": [instance_json("i-0bbbbbbbbbbbbbbbb", "large")]},
            "resourceClassConfig": {"large": {"cpu": 2, "mmem": 4096, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-large"}}
        })
    }

    fn error_for(mutate: impl FnOnce(&mut serde_json::Value)) -> SpecError {
        let mut value = spec_json();
        mutate(&mut value);
        Spec::from_json(&value.to_string()).unwrap_err()
    }

    #[test]
    fn a_good_spec_parses_and_round_trips() {
        let spec = Spec::from_json(&spec_json().to_string()).unwrap();
        assert_eq!(spec.instance_count(), 2);
        let again = Spec::from_json(&spec.to_canonical_json()).unwrap();
        assert_eq!(spec, again);
    }

    #[test]
    fn errors_name_the_field() {
        // (how the spec is spoiled, the field named, a word of the problem)
        type Case = (Box<dyn FnOnce(&mut serde_json::Value)>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("runId");
                }),
                "runId",
                "missing field `runId`",
            ),
            (
                Box::new(|v| {
                    v["creation"]["instances"][0].as_object_mut().unwrap().remove("threshold");
                }),
                "creation.instances[0].threshold",
                "missing field `threshold`",
            ),
            (Box::new(|v| v["runId"] = "".into()), "runId", "non-empty"),
            (Box::new(|v| v["maxRuntimeMin"] = (-5).into()), "maxRuntimeMin", "from 1 to"),
            (Box::new(|v| v["idleTimeSec"] = "300".into()), "idleTimeSec", "invalid type"),
            (
                Box::new(|v| v["selection"]["numInstancesSelected"] = 2.into()),
                "selection.numInstancesSelected",
                "expected the number",
            ),
            (
                Box::new(|v| v["selection"]["instances"][0]["id"] = "i-XYZ".into()),
                "selection.instances[0].id",
                "EC2 instance id",
            ),
            (
                Box::new(|v| v["creation"]["instances"][0]["id"] = "i-0aaaaaaaaaaaaaaaa".into()),
                "creation.instances[0].id",
                "more than once",
            ),
            (
                Box::new(|v| v["creation"]["instances"][0]["threshold"] = "2026-11-27 10:05".into()),
                "creation.instances[0].threshold",
                "YYYY-MM-DDTHH:MM:SSZ",
            ),
            (Box::new(|v| v["creation"]["state"] = "maybe".into()), "creation.state", "unknown variant"),
            (
                Box::new(|v| v["selection"]["instances"][0]["usageClass"] = "reserved".into()),
                "selection.instances[0].usageClass",
                "unknown variant",
            ),
        ];
        for (mutate, field, needle) in cases {
            let error = error_for(mutate);
            assert_eq!(error.field, field, "{error}");
            assert!(error.problem.contains(needle), "{error}");
        }
    }

    #[test]
    fn unknown_fields_are_named_with_their_path_and_the_nearest_known_one() {
        let mut value = spec_json();
        let config = value.as_object_mut().unwrap().remove("resourceClassConfig").unwrap();
        value["resourceClassConfg"] = config;
        let error = Spec::from_json(&value.to_string()).unwrap_err();
        assert_eq!(error.field, "resourceClassConfg", "{error}");
        assert!(error.problem.contains("did you mean `resourceClassConfig`?"), "{error}");

        let error = error_for(|v| v["selection"]["instances"][0]["usgeClass"] = "spot".into());
        assert_eq!(error.field, "selection.instances[0].usgeClass", "{error}");
        assert!(error.problem.contains("did you mean `usageClass`?"), "{error}");

        let error = error_for(|v| v["resourceClassConfig"]["large"]["queue_url"] = "x".into());
        assert_eq!(error.field, "resourceClassConfig.large.queue_url", "{error}");
        assert!(error.problem.contains("did you mean `queueUrl`?"), "{error}");

        let error = error_for(|v| v["creation"]["zzzzzzzzzzzz"] = 1.into());
        assert_eq!(error.field, "creation.zzzzzzzzzzzz", "{error}");
        assert!(!error.problem.contains("did you mean"), "{error}");
        assert!(error.problem.contains("`numInstancesCreated`"), "{error}");
    }

    #[test]
    fn run_attempt_is_known_optional_and_bounded() {
        let spec = Spec::from_json(&spec_json().to_string()).unwrap();
        assert_eq!(spec.run_attempt, None);
        assert!(!spec.to_canonical_json().contains("runAttempt"), "absent stays absent: digests do not move");
        let mut value = spec_json();
        value["runAttempt"] = 2.into();
        assert_eq!(Spec::from_json(&value.to_string()).unwrap().run_attempt, Some(2));
        for bad in [0, MAX_RUN_ATTEMPT + 1] {
            let error = error_for(|v| v["runAttempt"] = bad.into());
            assert_eq!(error.field, "runAttempt", "{error}");
        }
    }

    #[test]
    fn run_ids_have_a_documented_character_set_and_length() {
        for good in ["9876543210", "run-0123abcd", "a.b_c-d", &"7".repeat(MAX_RUN_ID_LEN)] {
            assert!(validate_run_id(good).is_ok(), "{good}");
        }
        for bad in ["", "run#1", "run/1", "run 1", "run:1", "x\n::warning::y", "é", &"7".repeat(MAX_RUN_ID_LEN + 1)] {
            let problem = validate_run_id(bad).unwrap_err();
            assert!(!problem.contains('\n'), "{problem}");
        }
        let error = error_for(|v| v["runId"] = "x\n::warning title=pwn::INJECTED".into());
        assert_eq!(error.field, "runId");
        assert!(error.problem.contains("A-Z a-z 0-9 . _ -") && !error.problem.contains('\n'), "{error}");
    }

    #[test]
    fn string_fields_have_maximum_lengths_and_no_control_characters() {
        let long = "x".repeat(5_000_000);
        let error = error_for(|v| v["selection"]["instances"][0]["instanceType"] = long.clone().into());
        assert_eq!(error.field, "selection.instances[0].instanceType");
        assert!(error.problem.len() < 400, "the message quotes a prefix only: {}", error.problem.len());
        let error = error_for(|v| v["creation"]["instances"][0]["resourceClass"] = "l".repeat(65).into());
        assert_eq!(error.field, "creation.instances[0].resourceClass", "{error}");
        assert!(error.problem.contains("at most 64 bytes"), "{error}");
        let error = error_for(|v| v["creation"]["instances"][0]["resourceClass"] = "x\n::warning::y".into());
        assert!(error.problem.contains("control characters") && !error.problem.contains('\n'), "{error}");
        let error =
            error_for(|v| v["selection"]["instances"][0]["usageClass"] = "x\n::warning title=pwn::INJECTED".into());
        assert_eq!(error.field, "selection.instances[0].usageClass");
        assert!(!error.problem.contains('\n') && error.problem.contains("x\\n::warning"), "{error}");
        let error = error_for(|v| {
            v["resourceClassConfig"]["large"]["queueUrl"] =
                format!("https://sqs.eu-west-1.amazonaws.com/123456789012/{}", "q".repeat(2_000)).into()
        });
        assert!(error.problem.contains("at most 1024"), "{error}");
    }

    #[test]
    fn a_class_an_instance_contradicts_is_refused() {
        let error = error_for(|v| {
            v["resourceClassConfig"]["large"]["cpu"] = 0.into();
        });
        assert_eq!(error.field, "resourceClassConfig.large.cpu", "{error}");
        let error = error_for(|v| v["creation"]["instances"][0]["cpu"] = 4096.into());
        assert_eq!(error.field, "creation.instances[0].cpu", "{error}");
        assert!(error.problem.contains("has cpu 2 in resourceClassConfig"), "{error}");
        let error = error_for(|v| v["selection"]["instances"][0]["mmem"] = 1.into());
        assert_eq!(error.field, "selection.instances[0].mmem", "{error}");
    }

    #[test]
    fn queue_urls_must_be_sqs_urls_and_loopback_only_when_allowed() {
        use QueueUrlRule::*;
        let sqs = "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-large";
        assert!(check_queue_url(sqs, SqsOnly).is_ok());
        assert!(check_queue_url("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q.fifo", SqsOnly).is_ok());
        let moto = "http://127.0.0.1:5000/123456789012/pool-large";
        assert!(check_queue_url(moto, SqsOnly).is_err());
        assert!(check_queue_url(moto, SqsOrLoopback).is_ok());
        assert!(check_queue_url("http://localhost:4566/000000000000/q", SqsOrLoopback).is_ok());
        for bad in [
            "http://sqs.eu-west-1.amazonaws.com/123456789012/q",
            "https://sqs.eu-west-1.amazonaws.com.evil.example/123456789012/q",
            "https://evil.example/123456789012/q",
            "https://sqs.eu-west-1.amazonaws.com/12345/q",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/q/extra",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/",
            "https://user@sqs.eu-west-1.amazonaws.com/123456789012/q",
            "https://sqs.eu-west-1.amazonaws.com:99x/123456789012/q",
            "http://127.0.0.1.evil.example/123456789012/q",
            "file:///etc/passwd",
        ] {
            assert!(check_queue_url(bad, SqsOrLoopback).is_err(), "{bad}");
        }
        assert_eq!(QueueUrlRule::for_endpoint(None), SqsOnly);
        assert_eq!(QueueUrlRule::for_endpoint(Some("https://dynamodb.eu-west-1.amazonaws.com")), SqsOnly);
        assert_eq!(QueueUrlRule::for_endpoint(Some("http://127.0.0.1:5000")), SqsOrLoopback);
        assert_eq!(QueueUrlRule::for_endpoint(Some("http://localhost:5000/")), SqsOrLoopback);
        assert_eq!(QueueUrlRule::for_endpoint(Some("http://localhost.evil.example:5000")), SqsOnly);
        let error =
            error_for(|v| v["resourceClassConfig"]["large"]["queueUrl"] = "https://evil.example/123456789012/q".into());
        assert_eq!(error.field, "resourceClassConfig.large.queueUrl", "{error}");
        let mut value = spec_json();
        value["resourceClassConfig"]["large"]["queueUrl"] = moto.into();
        let spec = Spec::from_json(&value.to_string()).unwrap();
        assert_eq!(spec.check_queue_urls(SqsOnly).unwrap_err().field, "resourceClassConfig.large.queueUrl");
        assert!(spec.check_queue_urls(SqsOrLoopback).is_ok());
    }

    #[test]
    fn the_pool_records_decide_what_an_instance_is() {
        use crate::ports::InstanceFacts;
        let spec = Spec::from_json(&spec_json().to_string()).unwrap();
        let pool = spec.resource_class_config.clone().unwrap();
        let facts = |id: &str, class: &str, instance_type: Option<&str>| InstanceFacts {
            id: id.into(),
            resource_class: class.into(),
            instance_type: instance_type.map(str::to_string),
        };
        let agreeing =
            [facts("i-0aaaaaaaaaaaaaaaa", "large", Some("c6i.large")), facts("i-0bbbbbbbbbbbbbbbb", "large", None)];
        assert_eq!(spec.check_against_pool_records(&pool, &agreeing), Ok(()));
        // No record: nothing to contradict (such an instance is never announced).
        assert_eq!(spec.check_against_pool_records(&pool, &[]), Ok(()));
        // The attack of issue 18: the spec names the class `small` for a `large` record.
        let mut small = spec.clone();
        small.selection.instances[0].resource_class = "small".into();
        let mut with_small = pool.clone();
        with_small.insert("small".into(), ResourceClass { cpu: 2, mmem: 4096, ..pool["large"].clone() });
        let error = small.check_against_pool_records(&with_small, &agreeing).unwrap_err();
        assert_eq!(error.field, "selection.instances[0].resourceClass", "{error}");
        assert!(error.problem.contains("\"large\"") && error.problem.contains("\"small\""), "{error}");
        // Another instance type than the record's.
        let mut nano = spec.clone();
        nano.selection.instances[0].instance_type = "t3.nano".into();
        let error = nano.check_against_pool_records(&pool, &agreeing).unwrap_err();
        assert_eq!(error.field, "selection.instances[0].instanceType", "{error}");
        assert!(error.problem.contains("t3.nano") && error.problem.contains("c6i.large"), "{error}");
        // A class the pool does not know, and cpu/mmem that are not the pool's.
        let error = small.check_against_pool_records(&pool, &[]).unwrap_err();
        assert_eq!(error.field, "selection.instances[0].resourceClass", "{error}");
        assert!(error.problem.contains("no pool queue"), "{error}");
        let mut cpu = spec.clone();
        cpu.creation.instances[0].cpu = 64;
        assert_eq!(cpu.check_against_pool_records(&pool, &[]).unwrap_err().field, "creation.instances[0].cpu");
    }

    #[test]
    fn the_specs_config_must_agree_with_the_pools() {
        let spec = Spec::from_json(&spec_json().to_string()).unwrap();
        let pool = spec.resource_class_config.clone().unwrap();
        assert!(spec.check_config_against_pool(Some(&pool), QueueUrlRule::SqsOnly).is_ok());
        assert!(spec.check_config_against_pool(None, QueueUrlRule::SqsOnly).is_ok());
        let mut other = pool.clone();
        other.get_mut("large").unwrap().queue_url =
            "https://sqs.eu-west-1.amazonaws.com/999999999999/pool-large".into();
        let error = spec.check_config_against_pool(Some(&other), QueueUrlRule::SqsOnly).unwrap_err();
        assert_eq!(error.field, "resourceClassConfig.large.queueUrl", "{error}");
        assert!(error.problem.contains("999999999999"), "{error}");
        let mut other = pool.clone();
        other.get_mut("large").unwrap().cpu = 4;
        assert_eq!(
            spec.check_config_against_pool(Some(&other), QueueUrlRule::SqsOnly).unwrap_err().field,
            "resourceClassConfig.large.cpu"
        );
        let error = spec.check_config_against_pool(Some(&BTreeMap::new()), QueueUrlRule::SqsOnly).unwrap_err();
        assert_eq!(error.field, "resourceClassConfig.large", "{error}");
    }

    #[test]
    fn a_spec_too_large_to_store_is_refused_before_anything_is_written() {
        let spec = Spec::from_json(&spec_json().to_string()).unwrap();
        let size = stored_size_bound(&spec);
        assert!(size.record_bytes < crate::record::MAX_RECORD_BYTES && size.transaction_items == 2, "{size:?}");
        // 5,000 instances, each of its own class whose queue URL comes from the pool: the run
        // record's queueUrls alone could reach 5 MB.
        let mut value = spec_json();
        let instances: Vec<serde_json::Value> =
            (0..4_999).map(|i| instance_json(&format!("i-{i:017x}"), &format!("class-{i}"))).collect();
        value["selection"]["instances"] = instances.into();
        value["selection"]["numInstancesSelected"] = 4_999.into();
        value.as_object_mut().unwrap().remove("resourceClassConfig");
        let error = Spec::from_json(&value.to_string()).unwrap_err();
        assert_eq!(error.field, "$");
        assert!(error.problem.contains("400 KB item limit"), "{error}");
        // The same fleet in two classes fits.
        let instances: Vec<serde_json::Value> =
            (0..4_999).map(|i| instance_json(&format!("i-{i:017x}"), "large")).collect();
        value["selection"]["instances"] = instances.into();
        assert!(Spec::from_json(&value.to_string()).is_ok());
        // The per-field bounds keep the creating transaction under DynamoDB's 4 MB: the largest
        // spec they allow (every instance and string at its bound) is checked here.
        let class = "c".repeat(MAX_RESOURCE_CLASS_LEN);
        let mut instance = instance_json("i-00000000000000000", &class);
        instance["instanceType"] = "t".repeat(MAX_INSTANCE_TYPE_LEN).into();
        let instances: Vec<serde_json::Value> = (0..MAX_INSTANCES_PER_RUN)
            .map(|i| {
                let mut instance = instance.clone();
                instance["id"] = format!("i-{i:017x}").into();
                instance
            })
            .collect();
        value["selection"]["instances"] = instances.into();
        value["selection"]["numInstancesSelected"] = MAX_INSTANCES_PER_RUN.into();
        value["creation"]["instances"] = serde_json::json!([]);
        value["creation"]["numInstancesCreated"] = 0.into();
        let url = format!("https://sqs.ap-southeast-1.amazonaws.com/123456789012/{}", "q".repeat(80));
        let config: serde_json::Map<String, serde_json::Value> = (0..MAX_RESOURCE_CLASSES)
            .map(|i| (format!("{i:c>64}"), serde_json::json!({"cpu": 2, "mmem": 4096, "queueUrl": url})))
            .collect();
        value["resourceClassConfig"] = config.into();
        value["resourceClassConfig"][&class] = serde_json::json!({"cpu": 2, "mmem": 4096, "queueUrl": url});
        value["resourceClassConfig"].as_object_mut().unwrap().remove(&format!("{:c>64}", 0));
        let spec = Spec::from_json(&value.to_string()).expect("the largest spec the bounds allow is valid");
        let size = stored_size_bound(&spec);
        assert!(size.transaction_bytes < MAX_TRANSACTION_BYTES / 2, "{size:?}");
        assert!((value.to_string().len() as u64) < MAX_SPEC_FILE_BYTES, "it also fits the file limit");
    }

    #[test]
    fn malformed_json_is_reported_as_such() {
        let error = Spec::from_json("{\"runId\": ").unwrap_err();
        assert!(error.problem.starts_with("malformed JSON"), "{error}");
    }
}
