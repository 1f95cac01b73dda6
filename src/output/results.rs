//! The results the CLI prints, as typed structs: each is rendered as text ([`super::text`]) or
//! JSON ([`super::json`]), and its JSON Schema in `docs/schemas/` is derived from it
//! ([`super::schemas`]). Every field name here is part of the CLI's documented output.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::Serialize;

use super::exit;
use super::schemas::{outcome_or_null, run_error_kind, state, states};
use crate::driver::{OutcomeKind, RunOutcome, TraceEvent};
use crate::machine::State;
use crate::record::RunRecord;
use crate::spec::{Role, Spec};
use crate::timestamp::Timestamp;

/// A run as reported by `run`, `resume` and `status`.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct RunReport {
    /// The run id.
    #[schemars(length(min = 1))]
    pub run_id: String,
    /// The persisted state.
    #[schemars(schema_with = "state")]
    pub state: State,
    /// `committed`, `rolled-back`, `cleaned-up`, or null while unfinished.
    #[schemars(schema_with = "outcome_or_null")]
    pub outcome: Option<OutcomeKind>,
    /// The exit code `run`/`resume` give for this run: 0, 1, 2, or 3 while unfinished.
    #[schemars(extend("enum" = [exit::DONE, exit::ROLLED_BACK, exit::CLEANED_UP, exit::RESUMABLE]))]
    pub exit_code: i32,
    /// The states entered, in order.
    #[schemars(schema_with = "states", length(min = 1))]
    pub path: Vec<State>,
    /// Every state entered, with time and reason.
    pub transitions: Vec<Transition>,
    /// Why the run failed.
    pub error: Option<RunFailure>,
    /// Instance counts.
    pub instances: u32,
    /// Threshold set on committed instances.
    pub commit_threshold: Option<Timestamp>,
    /// Threshold set on instances returned to the pool.
    pub idle_threshold: Option<Timestamp>,
    /// Pool messages sent.
    pub messages_sent: usize,
    /// The lease holder and its end.
    pub lease: LeaseReport,
    /// The record's version.
    #[schemars(range(min = 1))]
    pub version: u64,
    /// When the run started.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// What happened to each instance (on `run` and `resume` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_results: Option<Vec<InstanceResult>>,
}

/// One state a run entered.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Transition {
    /// The state entered.
    #[schemars(schema_with = "state")]
    pub state: State,
    /// When.
    pub at: Timestamp,
    /// Why, in one line.
    pub reason: String,
}

/// Why a run failed.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RunFailure {
    /// `shortfall` (graceful rollback) or `unexpected` (emergency cleanup).
    #[schemars(schema_with = "run_error_kind")]
    pub kind: String,
    /// The message.
    pub message: String,
}

/// The driver that holds a run.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct LeaseReport {
    /// An id unique to one driver process and run.
    pub owner: String,
    /// The lease ends at this instant unless renewed.
    pub expires_at: Timestamp,
}

impl RunReport {
    /// The report of a record.
    pub fn of(record: &RunRecord) -> RunReport {
        let outcome = OutcomeKind::of(record);
        RunReport {
            run_id: record.run_id.clone(),
            state: record.state,
            outcome,
            exit_code: outcome.map(OutcomeKind::exit_code).unwrap_or(exit::RESUMABLE),
            path: record.history.iter().map(|h| h.state).collect(),
            transitions: record
                .history
                .iter()
                .map(|h| Transition { state: h.state, at: h.at, reason: h.reason.clone() })
                .collect(),
            error: record
                .error
                .as_ref()
                .map(|e| RunFailure { kind: e.kind.as_str().to_string(), message: e.message.clone() }),
            instances: record.instance_count,
            commit_threshold: record.commit_threshold,
            idle_threshold: record.idle_threshold,
            messages_sent: record.messages_sent.len(),
            lease: LeaseReport { owner: record.lease.owner.clone(), expires_at: record.lease.expires_at },
            version: record.version,
            created_at: record.created_at,
            updated_at: record.updated_at,
            instance_results: None,
        }
    }

    /// The report of a run this process finished, with what happened to each instance.
    pub fn of_outcome(outcome: &RunOutcome) -> RunReport {
        let mut report = RunReport::of(&outcome.record);
        report.instance_results = Some(instance_results(outcome));
        report
    }
}

/// One instance's fate in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct InstanceResult {
    /// The EC2 instance id.
    #[schemars(pattern(crate::spec::INSTANCE_ID_PATTERN))]
    pub id: String,
    /// Selected or created.
    pub role: Role,
    /// The resource class.
    pub resource_class: String,
    /// What happened to it, in a few words.
    pub result: String,
}

/// What happened to each instance of a finished run, from its record and this driver's trace.
/// A run that finished in an earlier process has no trace here; the record-level facts are used.
pub fn instance_results(outcome: &RunOutcome) -> Vec<InstanceResult> {
    let mut terminated = BTreeSet::new();
    let mut found: BTreeMap<&str, &str> = BTreeMap::new();
    for event in &outcome.trace {
        match event {
            TraceEvent::Terminate { ids } => terminated.extend(ids.iter().map(String::as_str)),
            TraceEvent::Found { id, finding } => {
                found.insert(id, finding);
            }
            _ => {}
        }
    }
    // EC2 refused some terminations: those instances live on, their records kept (marked).
    for (id, finding) in &found {
        if finding.starts_with("termination refused") {
            terminated.remove(id);
        }
    }
    let sent: BTreeSet<&str> = outcome.record.messages_sent.iter().map(String::as_str).collect();
    let traced = !outcome.trace.is_empty();
    let idle_until = outcome.record.idle_threshold.map(|t| t.to_string()).unwrap_or_default();
    outcome
        .spec
        .instances()
        .map(|(role, instance)| {
            let id = instance.id.as_str();
            let finding = found.get(id).copied();
            let result = match outcome.kind {
                OutcomeKind::Committed => format!(
                    "committed: running until {}",
                    outcome.record.commit_threshold.map(|t| t.to_string()).unwrap_or_default()
                ),
                OutcomeKind::RolledBack if sent.contains(id) => {
                    format!("returned to pool {} (idle until {idle_until})", instance.resource_class)
                }
                OutcomeKind::CleanedUp if terminated.contains(id) => "terminated, record deleted".to_string(),
                OutcomeKind::RolledBack if terminated.contains(id) => {
                    format!("terminated, record removed ({})", finding.unwrap_or("not returnable"))
                }
                OutcomeKind::CleanedUp if sent.contains(id) => {
                    format!("left in pool {} (released before the error)", instance.resource_class)
                }
                _ if finding.is_some() => format!("left alone ({})", finding.unwrap_or_default()),
                OutcomeKind::RolledBack if !traced => "released by an earlier driver".to_string(),
                OutcomeKind::CleanedUp if !traced => "terminated unless another run owned it".to_string(),
                _ => "unchanged".to_string(),
            };
            InstanceResult { id: id.to_string(), role, resource_class: instance.resource_class.clone(), result }
        })
        .collect()
}

/// The instance ids committed to the run (empty unless it committed).
pub fn committed_ids(outcome: &RunOutcome) -> Vec<String> {
    if outcome.kind != OutcomeKind::Committed {
        return Vec::new();
    }
    outcome.spec.instances().map(|(_, instance)| instance.id.clone()).collect()
}

/// What kind of error stopped a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Bad flags, run id argument, spec file or limits.
    Usage,
    /// The spec is invalid.
    InvalidSpec,
    /// In a GitHub Actions job, a spec or run id argument that is not the job's run.
    ForeignRun,
    /// A different spec for an existing run id.
    SpecMismatch,
    /// No such run.
    NoSuchRun,
    /// Another driver holds the run.
    Busy,
    /// The driver lost its lease.
    LeaseLost,
    /// AWS kept failing after the state was persisted.
    Stalled,
    /// The process stopped on purpose (a test hook).
    Crashed,
    /// An answer was lost: the run may have started.
    Uncertain,
    /// The run's first write was throttled past the throttle budget: nothing was written.
    Throttled,
    /// The table does not exist.
    MissingTable,
    /// AWS unavailable before anything was written.
    Unavailable,
    /// A corrupt record or an invalid transition.
    Internal,
    /// `init` failed on the table.
    Table,
    /// The table has no pool configuration (`TYPE#METADATA` / `ID#resource_class_config`) and
    /// the run would return instances to the pool.
    PoolConfig,
    /// Permission denied or no usable credentials.
    Permission,
}

impl ErrorKind {
    /// The kebab-case name used in every output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage",
            ErrorKind::InvalidSpec => "invalid-spec",
            ErrorKind::ForeignRun => "foreign-run",
            ErrorKind::SpecMismatch => "spec-mismatch",
            ErrorKind::NoSuchRun => "no-such-run",
            ErrorKind::Busy => "busy",
            ErrorKind::LeaseLost => "lease-lost",
            ErrorKind::Stalled => "stalled",
            ErrorKind::Crashed => "crashed",
            ErrorKind::Uncertain => "uncertain",
            ErrorKind::Throttled => "throttled",
            ErrorKind::MissingTable => "missing-table",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
            ErrorKind::Table => "table",
            ErrorKind::PoolConfig => "pool-config",
            ErrorKind::Permission => "permission",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Printed on stdout with `--output json` when a command fails before or instead of finishing a
/// run (the message is also on stderr).
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ErrorReport {
    /// What went wrong.
    pub error: ErrorBody,
    /// The exit code.
    #[schemars(extend("enum" = [exit::RESUMABLE, exit::USAGE, exit::INVALID_SPEC, exit::NO_SUCH_RUN, exit::UNAVAILABLE, exit::INTERNAL, exit::PERMISSION, exit::CONFIG]))]
    pub exit_code: i32,
}

/// The error of an [`ErrorReport`].
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ErrorBody {
    /// What kind of error.
    pub kind: ErrorKind,
    /// What went wrong, escaped.
    #[schemars(length(min = 1))]
    pub message: String,
    /// The JSON path of the offending spec field (invalid-spec and foreign-run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// One run of `list`.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ListRow {
    /// The run id.
    #[schemars(length(min = 1))]
    pub run_id: String,
    /// The persisted state.
    #[schemars(schema_with = "state")]
    pub state: State,
    /// `committed`, `rolled-back`, `cleaned-up`, or null while unfinished.
    #[schemars(schema_with = "outcome_or_null")]
    pub outcome: Option<OutcomeKind>,
    /// When the run started.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// Seconds since the run started.
    pub age_secs: i64,
    /// The lease holder.
    pub lease_owner: String,
    /// Whether the lease has not ended.
    pub lease_active: bool,
    /// Instance counts.
    pub instances: u32,
}

impl ListRow {
    /// The row of a record, its age and lease seen at `now`.
    pub fn of(record: &RunRecord, now: Timestamp) -> ListRow {
        ListRow {
            run_id: record.run_id.clone(),
            state: record.state,
            outcome: OutcomeKind::of(record),
            created_at: record.created_at,
            updated_at: record.updated_at,
            age_secs: now.unix_secs() - record.created_at.unix_secs(),
            lease_owner: record.lease.owner.clone(),
            lease_active: record.lease_active(now),
            instances: record.instance_count,
        }
    }
}

/// One run `resume --all` took over.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ResumeAllEntry {
    /// The run id.
    #[schemars(length(min = 1))]
    pub run_id: String,
    /// The exit code `resume RUN_ID` would have given.
    pub exit_code: i32,
    /// One line: the run id and its state, or its error.
    pub summary: String,
}

/// What `init` found or made.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct InitResult {
    /// The table.
    pub table: String,
    /// Created now, or already there with the expected key schema.
    pub result: TableResult,
    /// TTL on the `ttl` attribute: enabled now, already enabled, or enabled on another attribute
    /// (records then do not expire).
    pub ttl: TtlResult,
    /// The attribute TTL is enabled on, when it is not `ttl` (not printed in JSON).
    #[serde(skip)]
    pub other_ttl_attribute: Option<String>,
    /// The run index `post-provision-runs`: created now, or it existed (see docs/schema.md).
    pub run_index: RunIndexResult,
    /// Run records written before the run index that init gave their index attributes.
    pub run_index_backfilled: u64,
}

/// The run index `init` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunIndexResult {
    /// Created now.
    Created,
    /// There before.
    Exists,
}

/// The table `init` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TableResult {
    /// Created now.
    Created,
    /// There, with the expected key schema.
    Ok,
}

/// The TTL setting `init` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TtlResult {
    /// Enabled now.
    Enabled,
    /// Enabled before.
    AlreadyEnabled,
    /// Enabled on another attribute.
    OtherAttribute,
}

impl TtlResult {
    /// The kebab-case name used in every output.
    pub fn as_str(self) -> &'static str {
        match self {
            TtlResult::Enabled => "enabled",
            TtlResult::AlreadyEnabled => "already-enabled",
            TtlResult::OtherAttribute => "other-attribute",
        }
    }
}

/// What `validate` found in a valid spec.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct ValidateResult {
    /// Always true: an invalid spec is an error (exit 65).
    pub valid: bool,
    /// The spec's run id.
    pub run_id: String,
    /// Instances of the run.
    pub instances: usize,
    /// Selected instances.
    pub selected: usize,
    /// Created instances.
    pub created: usize,
}

impl ValidateResult {
    /// The result of a valid spec.
    pub fn of(spec: &Spec) -> ValidateResult {
        ValidateResult {
            valid: true,
            run_id: spec.run_id.clone(),
            instances: spec.instance_count(),
            selected: spec.selection.instances.len(),
            created: spec.creation.instances.len(),
        }
    }
}
