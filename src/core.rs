//! The pure vocabulary every path shares: reconciliation, the instance states, conditional writes
//! as data (`Expectation`, `ThresholdCondition`, `InstanceTransition`), their results and how a
//! refusal is read (`classify_transition` → `Finding`), the pool message body, and the batch
//! limits. The paths' own rules are in `crate::run`. Nothing here does I/O or reads a clock.

use serde::{Deserialize, Serialize};

use crate::machine::Input;
use crate::spec::{CreationState, PoolInstance, Role, Spec};
use crate::timestamp::Timestamp;

pub use crate::spec::MAX_TRANSACTION_ITEMS;
/// Most instance items in one fenced transaction: the rest of [`MAX_TRANSACTION_ITEMS`] after the
/// fence's two `ConditionCheck`s (the run record; no record for the attempt the driver does not
/// know of: `ports::Fence`).
pub const MAX_FENCED_BATCH: usize = MAX_TRANSACTION_ITEMS - 2;
/// Most entries in one SQS `SendMessageBatch` call.
pub const MAX_MESSAGE_BATCH: usize = 10;
/// Most ids in one EC2 `TerminateInstances` call.
pub const MAX_TERMINATE_BATCH: usize = 1_000;
/// `DelaySeconds` of every pool message, as the pool's other writers use.
pub const POOL_MESSAGE_DELAY_SECS: i32 = 3;

/// The outcome of reconciling selection and creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    /// `ReconciledSuccess` or `ReconciledShortfall`.
    pub input: Input,
    /// Why, in one sentence.
    pub reason: String,
}

/// Decides between commit and rollback exactly as the existing system does: success when creation
/// succeeded, at least one instance was acquired, and creation made exactly what was required.
pub fn reconcile(spec: &Spec) -> Reconciliation {
    let selected = spec.selection.instances.len();
    let created = spec.creation.num_instances_created;
    let required = spec.selection.num_instances_required;
    let shortfall = |reason: String| Reconciliation { input: Input::ReconciledShortfall, reason };
    if spec.creation.state != CreationState::Success {
        return shortfall(format!(
            "creation ended {:?}, not success ({created} of {required} required instances created)",
            spec.creation.state
        ));
    }
    if selected == 0 && created == 0 {
        return shortfall("no instance was selected or created".to_string());
    }
    if created != required {
        return shortfall(format!("creation made {created} instances but {required} were required"));
    }
    Reconciliation {
        input: Input::ReconciledSuccess,
        reason: format!("{selected} selected and {created} created instances meet the demand"),
    }
}

/// The states an instance record can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Registered by creation, not yet validated.
    Created,
    /// Working for a run.
    Running,
    /// In the pool, owned by no run.
    Idle,
    /// Claimed from the pool by a run.
    Claimed,
    /// Terminated or about to be.
    Terminated,
}

impl InstanceState {
    /// The value of the record's `state` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Created => "created",
            InstanceState::Running => "running",
            InstanceState::Idle => "idle",
            InstanceState::Claimed => "claimed",
            InstanceState::Terminated => "terminated",
        }
    }
}

/// How far a driver's clock may run behind true time without letting it act on an expired claim:
/// [`ThresholdCondition::Unexpired`] asks for `threshold > now + this`. Clocks of the pool's
/// machines need not agree (the simulation skews them by up to ±60 s); a claim within this margin
/// of its expiry is treated as expired, which costs a run only when its claims were about to
/// lapse anyway (selection claims for minutes).
pub const CLOCK_SKEW_MARGIN_SECS: i64 = 60;

/// How a conditional instance write constrains the record's `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdCondition {
    /// `threshold > :now`, where `:now` is the clock read when the call is made (never a value
    /// planned earlier: a stage can outlast its first batch by minutes when AWS is slow), plus
    /// [`CLOCK_SKEW_MARGIN_SECS`] ([`ThresholdCondition::unexpired_after`]).
    Unexpired,
    /// `threshold = value`: the record carries exactly what this run wrote.
    Exactly(Timestamp),
    /// No condition on the threshold.
    Any,
}

impl ThresholdCondition {
    /// The instant an [`ThresholdCondition::Unexpired`] threshold must lie after, for a call made
    /// at `now` by the caller's clock.
    pub fn unexpired_after(now: Timestamp) -> Timestamp {
        now.plus_secs(CLOCK_SKEW_MARGIN_SECS)
    }
}

/// One acceptable current shape of an instance record: `state IN states AND runId = run_id AND`
/// the threshold condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// Accepted current states.
    pub states: Vec<InstanceState>,
    /// The runId the record must carry (`""` for the pool).
    pub run_id: String,
    /// The condition on the threshold.
    pub threshold: ThresholdCondition,
    /// The `releasedBy` the record must carry, if any: the attribute this engine's releases
    /// write (and the pool's writers never do), naming the run that released the record.
    pub released_by: Option<String>,
}

/// One conditional instance-record update: applied when the record matches any of `expected`,
/// setting state, runId, threshold and updatedAt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTransition {
    /// The EC2 instance id.
    pub instance_id: String,
    /// Which list of the spec the instance came from.
    pub role: Role,
    /// The record shapes the write accepts (OR-ed). The first is this run's own hold on the
    /// record and decides how a refusal is read ([`classify_transition`]).
    pub expected: Vec<Expectation>,
    /// The state to set.
    pub new_state: InstanceState,
    /// The runId to set (`""` releases the instance).
    pub new_run_id: String,
    /// The threshold to set, computed once at state entry.
    pub new_threshold: Timestamp,
    /// For a release to the pool: the `releasedBy` it also sets, the releasing attempt's record
    /// identifier ([`crate::record::record_identifier`]). The evidence that this attempt, not the
    /// pool (nor another attempt of the run), released the record: the pool's release in the
    /// same second with the same idle time writes the same `state`, `runId` and `threshold`.
    pub released_by: Option<String>,
}

/// One conditional instance-record deletion: only a record this run marked `terminated`
/// (`state = terminated AND runId = owner`). A record is always marked, then its instance
/// terminated, then the record deleted, so a record never disappears before its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDeletion {
    /// The EC2 instance id.
    pub instance_id: String,
    /// The run that marked the record.
    pub owner_run_id: String,
}

/// Most resource classes a [`PoolGuard`] checks: its `ConditionCheck` names three attributes per
/// class, and DynamoDB bounds an expression at 4 KB. A spec configuring more classes takes the
/// reads first, as before.
pub const MAX_GUARDED_CLASSES: usize = 40;

/// What the pool must say for a small rollback to create its record together with its releases
/// without reading the pool first (issue 19): the checks of the reads (`Spec::check_config_against_pool`
/// and `Spec::check_against_pool_records`), carried as conditions of the creating transaction.
/// A `ConditionCheck` on the pool's metadata item (`TYPE#METADATA` / `ID#resource_class_config`)
/// holds each class of `classes` with exactly its queue URL, `cpu` and `mmem`, and each release of
/// an instance in `instances` also needs the record's `resourceClass` to be the kind's, and its
/// `instanceType`, if it has one, too. A condition that fails costs the run the reads it skipped;
/// it never passes where those reads would refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGuard {
    /// The spec's whole `resourceClassConfig`: every class the pool's item must hold so.
    pub classes: crate::spec::ResourceClassConfig,
    /// What each instance's record must say it is, by instance id.
    pub instances: std::collections::BTreeMap<String, InstanceKind>,
}

/// What an instance record must say an instance is: its class, and its type if it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceKind {
    /// The record's `resourceClass` must be this.
    pub resource_class: String,
    /// The record's `instanceType` must be this, or absent.
    pub instance_type: String,
}

impl PoolGuard {
    /// The guard of a rollback of `spec`, when its checks can all ride in the create: the spec
    /// carries `resourceClassConfig` (at most [`MAX_GUARDED_CLASSES`] classes), and it names
    /// each instance's class with the instance's `cpu` and `mmem` (`Spec::validate` checks these
    /// only for a class it names). `None` otherwise: the run reads the pool first.
    pub fn for_rollback(spec: &Spec) -> Option<PoolGuard> {
        let classes = spec.resource_class_config.as_ref()?;
        if classes.is_empty() || classes.len() > MAX_GUARDED_CLASSES {
            return None;
        }
        let mut instances = std::collections::BTreeMap::new();
        for (_, instance) in spec.instances() {
            let class = classes.get(&instance.resource_class)?;
            if (class.cpu, class.mmem) != (instance.cpu, instance.mmem) {
                return None;
            }
            let kind = InstanceKind {
                resource_class: instance.resource_class.clone(),
                instance_type: instance.instance_type.clone(),
            };
            instances.insert(instance.id.clone(), kind);
        }
        Some(PoolGuard { classes: classes.clone(), instances })
    }

    /// The pool queue of each class the spec's instances belong to, from the spec's config: the
    /// guard's `ConditionCheck` proves these are the pool's before anything is written.
    pub fn queue_urls(&self) -> std::collections::BTreeMap<String, String> {
        self.instances
            .values()
            .map(|kind| (kind.resource_class.clone(), self.classes[&kind.resource_class].queue_url.clone()))
            .collect()
    }
}

/// What a rejected conditional write found in the record (`ALL_OLD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRecord {
    /// The `state` attribute (as found; may be a value this crate does not know).
    pub state: String,
    /// The `runId` attribute.
    pub run_id: String,
    /// The `threshold` attribute, as found.
    pub threshold: String,
    /// The `releasedBy` attribute (`""` when absent): the run whose release wrote the record.
    pub released_by: String,
}

/// What a conditional write did to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    /// The condition held and the write happened.
    Applied,
    /// The condition failed; the record as found, if there was one.
    Rejected(Option<ObservedRecord>),
    /// Not written because the atomic batch was cancelled for another item, or for a transient
    /// conflict: try again.
    Cancelled,
    /// Not written because DynamoDB throttled the item (`ThrottlingError`,
    /// `ProvisionedThroughputExceeded`): load, not an error. Re-sent with backoff within the
    /// throttle budget, and never a reason for emergency cleanup.
    Throttled,
    /// Not written because the run record's fence refused the whole transaction: another driver
    /// took the run over, or it finished. The driver stops.
    Fenced,
}

/// The meaning of a conditional write's result, relative to what this run wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The record is as this run wants it: written now, or by an earlier attempt of this run.
    Done,
    /// There is no record.
    Missing,
    /// Another run owns the record (or it is in the pool, runId `""`).
    OwnedByOther {
        /// The owner found (`""` for the pool).
        run_id: String,
        /// The state found.
        state: String,
    },
    /// Owned by this run and in an expected state, but its threshold has passed.
    Expired {
        /// The state found.
        state: String,
        /// The threshold found.
        threshold: String,
    },
    /// Owned by this run but in a state the transition does not start from.
    WrongState {
        /// The state found.
        state: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Done => write!(formatter, "already as wanted"),
            Finding::Missing => write!(formatter, "no instance record"),
            Finding::OwnedByOther { run_id, state } if run_id.is_empty() => {
                write!(formatter, "in the pool (state {state}, no run)")
            }
            Finding::OwnedByOther { run_id, state } => {
                write!(formatter, "owned by run {run_id} (state {state})")
            }
            Finding::Expired { state, threshold } => {
                write!(formatter, "{state} but expired (threshold {threshold})")
            }
            Finding::WrongState { state } => write!(formatter, "in state {state}"),
        }
    }
}

/// Reads a transition's result: "already done by us" is success, anything else says what was found.
/// `None` for a cancelled write, which says nothing about the record.
pub fn classify_transition(transition: &InstanceTransition, result: &WriteResult) -> Option<Finding> {
    let observed = match result {
        WriteResult::Applied => return Some(Finding::Done),
        WriteResult::Rejected(None) => return Some(Finding::Missing),
        WriteResult::Rejected(Some(observed)) => observed,
        WriteResult::Cancelled | WriteResult::Throttled | WriteResult::Fenced => return None,
    };
    // Thresholds are computed once at state entry and reused on resume, so an earlier attempt of
    // this very transition left exactly these three values behind.
    // A release is this run's only with its `releasedBy`: the pool's own release can leave the
    // same three values.
    if observed.state == transition.new_state.as_str()
        && observed.run_id == transition.new_run_id
        && observed.threshold == transition.new_threshold.to_string()
        && transition.released_by.as_deref().map_or(true, |by| observed.released_by == by)
    {
        return Some(Finding::Done);
    }
    let own = transition.expected.first().expect("a transition expects at least one record shape");
    if observed.run_id != own.run_id {
        return Some(Finding::OwnedByOther { run_id: observed.run_id.clone(), state: observed.state.clone() });
    }
    if !own.states.iter().any(|state| state.as_str() == observed.state) {
        return Some(Finding::WrongState { state: observed.state.clone() });
    }
    Some(Finding::Expired { state: observed.state.clone(), threshold: observed.threshold.clone() })
}

/// A pool message: its body exactly as the pool's consumers read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolMessage {
    /// The EC2 instance id.
    pub id: String,
    /// The resource class.
    pub resource_class: String,
    /// The EC2 instance type.
    pub instance_type: String,
    /// vCPUs.
    pub cpu: u32,
    /// Memory, MiB.
    pub mmem: u64,
    /// `spot` or `on-demand`.
    pub usage_class: &'static str,
    /// The record's new threshold.
    pub threshold: Timestamp,
}

impl PoolMessage {
    /// The message returning `instance` to its pool with the record's new `threshold`.
    pub fn returning(instance: &PoolInstance, threshold: Timestamp) -> PoolMessage {
        PoolMessage {
            id: instance.id.clone(),
            resource_class: instance.resource_class.clone(),
            instance_type: instance.instance_type.clone(),
            cpu: instance.cpu,
            mmem: instance.mmem,
            usage_class: instance.usage_class.as_str(),
            threshold,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::to_string(self).expect("a pool message always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec_json;

    fn spec_with(mutate: impl FnOnce(&mut serde_json::Value)) -> Spec {
        let mut value = spec_json();
        mutate(&mut value);
        Spec::from_json(&value.to_string()).unwrap()
    }

    #[test]
    fn reconcile_cases() {
        let success = spec_with(|_| {});
        assert_eq!(reconcile(&success).input, Input::ReconciledSuccess);

        let partial = spec_with(|v| v["creation"]["state"] = "partial".into());
        assert_eq!(reconcile(&partial).input, Input::ReconciledShortfall);
        assert!(reconcile(&partial).reason.contains("Partial"));

        let failed = spec_with(|v| v["creation"]["state"] = "failed".into());
        assert_eq!(reconcile(&failed).input, Input::ReconciledShortfall);

        let nothing = spec_with(|v| {
            v["selection"] = serde_json::json!({"numInstancesSelected": 0, "numInstancesRequired": 0, "instances": []});
            v["creation"] = serde_json::json!({"state": "success", "numInstancesCreated": 0, "instances": []});
        });
        let outcome = reconcile(&nothing);
        assert_eq!(outcome.input, Input::ReconciledShortfall);
        assert!(outcome.reason.contains("no instance"));

        let too_few = spec_with(|v| v["selection"]["numInstancesRequired"] = 2.into());
        assert_eq!(reconcile(&too_few).input, Input::ReconciledShortfall);
        assert!(reconcile(&too_few).reason.contains("made 1 instances but 2"));

        let too_many = spec_with(|v| v["selection"]["numInstancesRequired"] = 0.into());
        assert_eq!(reconcile(&too_many).input, Input::ReconciledShortfall);

        let only_selected = spec_with(|v| {
            v["selection"]["numInstancesRequired"] = 0.into();
            v["creation"] = serde_json::json!({"state": "success", "numInstancesCreated": 0, "instances": []});
        });
        assert_eq!(reconcile(&only_selected).input, Input::ReconciledSuccess);
    }

    fn observed(state: &str, run_id: &str, threshold: &str) -> WriteResult {
        WriteResult::Rejected(Some(ObservedRecord {
            state: state.into(),
            run_id: run_id.into(),
            threshold: threshold.into(),
            released_by: String::new(),
        }))
    }

    /// The pool's release in the same second with the same idle time leaves the record exactly
    /// as this run's release would: only `releasedBy` tells them apart.
    #[test]
    fn a_release_is_this_runs_only_with_its_released_by() {
        let spec = spec_with(|_| {});
        let idle = Timestamp::parse("2026-11-27T10:10:00Z").unwrap();
        let releases = crate::run::rollback::transitions(&spec, idle, &std::collections::HashSet::new());
        let release = &releases[0];
        assert_eq!(release.released_by.as_deref(), Some(spec.run_id.as_str()), "attempt 1: the run id");
        let found = |by: &str| {
            WriteResult::Rejected(Some(ObservedRecord {
                state: "idle".into(),
                run_id: String::new(),
                threshold: idle.to_string(),
                released_by: by.into(),
            }))
        };
        assert_eq!(classify_transition(release, &found(&spec.run_id)), Some(Finding::Done));
        let pools = Some(Finding::OwnedByOther { run_id: String::new(), state: "idle".into() });
        assert_eq!(classify_transition(release, &found("")), pools);
        assert_eq!(classify_transition(release, &found("another-run")), pools);
        // Attempt 2 of the same run released nothing of attempt 1's: its own identifier.
        let again = spec_with(|v| v["runAttempt"] = 2.into());
        let later = &crate::run::rollback::transitions(&again, idle, &std::collections::HashSet::new())[0];
        assert_eq!(later.released_by, Some(format!("{}#2", spec.run_id)));
        assert_eq!(classify_transition(later, &found(&spec.run_id)), pools);
        // A commit or a mark is not a release: no `releasedBy` to compare.
        let commit = &crate::run::commit::transitions(&spec, idle)[0];
        assert_eq!(commit.released_by, None);
    }

    #[test]
    fn classification_tells_our_own_effects_from_others() {
        let spec = spec_with(|_| {});
        let now = Timestamp::parse("2026-11-27T10:00:00Z").unwrap();
        let threshold = now.plus_secs(1800);
        let transitions = crate::run::commit::transitions(&spec, threshold);
        let selected = &transitions[0];
        assert_eq!(classify_transition(selected, &WriteResult::Applied), Some(Finding::Done));
        assert_eq!(classify_transition(selected, &WriteResult::Cancelled), None);
        assert_eq!(classify_transition(selected, &WriteResult::Throttled), None);
        assert_eq!(
            classify_transition(selected, &observed("running", "9876543210", "2026-11-27T10:30:00Z")),
            Some(Finding::Done)
        );
        assert_eq!(classify_transition(selected, &WriteResult::Rejected(None)), Some(Finding::Missing));
        assert_eq!(
            classify_transition(selected, &observed("claimed", "other", "2026-11-27T10:04:00Z")),
            Some(Finding::OwnedByOther { run_id: "other".into(), state: "claimed".into() })
        );
        assert_eq!(
            classify_transition(selected, &observed("claimed", "9876543210", "2026-11-27T09:59:00Z")),
            Some(Finding::Expired { state: "claimed".into(), threshold: "2026-11-27T09:59:00Z".into() })
        );
        assert_eq!(
            classify_transition(selected, &observed("terminated", "9876543210", "2026-11-27T09:59:00Z")),
            Some(Finding::WrongState { state: "terminated".into() })
        );
        // Running for this run but with another threshold is not our commit: a different attempt
        // with a different threshold would be a bug, so it is not taken as done.
        assert_eq!(
            classify_transition(selected, &observed("running", "9876543210", "2026-11-27T11:00:00Z")),
            Some(Finding::WrongState { state: "running".into() })
        );
    }

    #[test]
    fn pool_message_body_matches_the_data_model() {
        let spec = spec_with(|_| {});
        let threshold = Timestamp::parse("2025-06-01T10:05:00Z").unwrap();
        let body = PoolMessage::returning(&spec.selection.instances[0], threshold).body();
        assert_eq!(
            body,
            r#"{"id":"i-0aaaaaaaaaaaaaaaa","resourceClass":"large","instanceType":"c6i.large","cpu":2,"mmem":4096,"usageClass":"on-demand","threshold":"2025-06-01T10:05:00Z"}"#
        );
    }

    /// A rollback rides its pool checks in the create only when the spec names every
    /// instance's class in its own config (the queue URLs then come from it).
    #[test]
    fn a_pool_guard_needs_every_instances_class_in_the_specs_config() {
        let guard = PoolGuard::for_rollback(&spec_with(|_| {})).expect("a guard");
        assert_eq!(guard.classes.keys().collect::<Vec<_>>(), ["large"]);
        assert_eq!(guard.instances.len(), 2);
        assert_eq!(
            guard.instances["i-0aaaaaaaaaaaaaaaa"],
            InstanceKind { resource_class: "large".into(), instance_type: "c6i.large".into() }
        );
        assert_eq!(
            guard.queue_urls(),
            [("large".to_string(), "https://sqs.eu-west-1.amazonaws.com/123456789012/pool-large".to_string())].into()
        );
        let without = spec_with(|v| {
            v.as_object_mut().unwrap().remove("resourceClassConfig");
        });
        assert_eq!(PoolGuard::for_rollback(&without), None);
        let other_class = spec_with(|v| v["creation"]["instances"][0]["resourceClass"] = "small".into());
        assert_eq!(PoolGuard::for_rollback(&other_class), None);
    }
}
