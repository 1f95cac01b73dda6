//! A run's input, the *spec*: what selection and creation hand over, parsed and validated.
//!
//! Validation is pure and complete before anything is written to AWS: a spec that fails here
//! changes nothing. Every error names the field and what was expected.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::timestamp::Timestamp;

/// The most instances (selected plus created) one run may carry. The run record stays far below
/// DynamoDB's 400 KB item limit at this size (see `docs/schema.md`).
pub const MAX_INSTANCES_PER_RUN: usize = 5_000;
/// The longest `maxRuntimeMin` accepted: 30 days.
pub const MAX_RUNTIME_MIN: i64 = 43_200;
/// The longest `idleTimeSec` accepted: 7 days.
pub const MAX_IDLE_TIME_SEC: i64 = 604_800;
/// The longest run id accepted.
pub const MAX_RUN_ID_LEN: usize = 128;
/// The highest run attempt accepted.
pub const MAX_RUN_ATTEMPT: u32 = 10_000;

/// A run's input, exactly as the earlier phases hand it over (camelCase JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The workflow run that owns the instances.
    pub run_id: String,
    /// Which attempt of the workflow run this is (GitHub's `GITHUB_RUN_ATTEMPT`; "Re-run jobs"
    /// keeps the run id and increments it). 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_attempt: Option<u32>,
    /// Lifetime of committed instances, in minutes.
    pub max_runtime_min: i64,
    /// Lifetime of instances returned to the pool, in seconds.
    pub idle_time_sec: i64,
    /// What selection claimed.
    pub selection: Selection,
    /// What creation launched.
    pub creation: Creation,
    /// Resource class to pool queue; read from the table's metadata item when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_class_config: Option<ResourceClassConfig>,
}

/// Selection's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selection {
    /// How many instances selection claimed.
    pub num_instances_selected: u32,
    /// How many instances creation still had to make.
    pub num_instances_required: u32,
    /// The pool messages of the claimed instances.
    pub instances: Vec<PoolInstance>,
}

/// Creation's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Creation {
    /// Creation's outcome.
    pub state: CreationState,
    /// How many instances creation made and validated.
    pub num_instances_created: u32,
    /// The created instances, in pool-message shape.
    pub instances: Vec<PoolInstance>,
}

/// An instance as the pool describes it: the body of a pool message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolInstance {
    /// The EC2 instance id.
    pub id: String,
    /// The pool (resource class) the instance belongs to.
    pub resource_class: String,
    /// The EC2 instance type.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceClass {
    /// vCPUs.
    pub cpu: u32,
    /// Memory, MiB.
    pub mmem: u64,
    /// The pool queue of the class.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
        validate_run_id(&self.run_id)?;
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
        if self.selection.num_instances_selected as usize != self.selection.instances.len() {
            return Err(SpecError::new(
                "selection.numInstancesSelected",
                format!(
                    "expected the number of entries in selection.instances ({}), got {}",
                    self.selection.instances.len(),
                    self.selection.num_instances_selected
                ),
            ));
        }
        if self.creation.num_instances_created as usize != self.creation.instances.len() {
            return Err(SpecError::new(
                "creation.numInstancesCreated",
                format!(
                    "expected the number of entries in creation.instances ({}), got {}",
                    self.creation.instances.len(),
                    self.creation.num_instances_created
                ),
            ));
        }
        if self.instance_count() > MAX_INSTANCES_PER_RUN {
            return Err(SpecError::new(
                "$",
                format!("a run may act on at most {MAX_INSTANCES_PER_RUN} instances, got {}", self.instance_count()),
            ));
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
                if instance.resource_class.is_empty() {
                    return Err(SpecError::new(at("resourceClass"), "expected a non-empty resource class name"));
                }
                if instance.instance_type.is_empty() {
                    return Err(SpecError::new(at("instanceType"), "expected a non-empty EC2 instance type"));
                }
            }
        }
        if let Some(config) = &self.resource_class_config {
            for (name, class) in config {
                if class.queue_url.trim().is_empty() {
                    return Err(SpecError::new(
                        format!("resourceClassConfig.{name}.queueUrl"),
                        "expected the URL of the class's pool queue",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn validate_run_id(run_id: &str) -> Result<(), SpecError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if run_id.is_empty() {
        return Err(SpecError::new("runId", "expected a non-empty run id"));
    }
    if run_id.len() > MAX_RUN_ID_LEN || !run_id.chars().all(ok_char) {
        return Err(SpecError::new(
            "runId",
            format!("expected at most {MAX_RUN_ID_LEN} characters of A-Z a-z 0-9 - _ . :, got {run_id:?}"),
        ));
    }
    Ok(())
}

/// EC2 instance ids are `i-` and 8 or 17 lowercase hex digits.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    let hex = id.strip_prefix("i-").unwrap_or("");
    let valid = (hex.len() == 8 || hex.len() == 17) && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    if valid {
        Ok(())
    } else {
        Err(format!("expected an EC2 instance id (i- and 8 or 17 lowercase hex digits), got {id:?}"))
    }
}

/// The field serde's "missing field `name`" error is about. serde has no structured form of this
/// error, so its (stable) message is read.
fn missing_field(error: &serde_json::Error) -> Option<String> {
    let text = error.to_string();
    let rest = text.strip_prefix("missing field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn describe_json_error(error: &serde_json::Error) -> String {
    // serde's own text already says what was expected ("invalid type: string, expected i64");
    // the position helps with malformed JSON, whose path is not meaningful.
    match error.classify() {
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
    }
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
            "resourceClassConfig": {"large": {"cpu": 2, "mmem": 4096, "queueUrl": "http://q/pool-large"}}
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
        let cases: Vec<(Box<dyn FnOnce(&mut serde_json::Value)>, &str, &str)> = vec![
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
    fn malformed_json_is_reported_as_such() {
        let error = Spec::from_json("{\"runId\": ").unwrap_err();
        assert!(error.problem.starts_with("malformed JSON"), "{error}");
    }
}
