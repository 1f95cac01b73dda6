//! The pool audit: the pure classification of what no run will finish (issue 12).
//!
//! The adapters in `src/aws/audit.rs` read compact snapshots (only the attributes named here,
//! never an item's full JSON) of the instance records, the run records, the pool's EC2 instances
//! and the pool queues' approximate counts. [`classify`] turns them into [`AuditFinding`]s with no I/O,
//! and `Engine::audit_fix` carries out each finding's [`Repair`]. Time comes in as `now`. Its
//! text, JSON, job summary and annotations are rendered in `crate::output`.
//!
//! Healthy instances are never reported: a `running` record with an unexpired threshold
//! (whether or not this engine committed it; older runs have no run record) and an `idle`
//! record with its pool message are the pool working as designed.

use std::collections::{BTreeMap, HashMap, HashSet};

use schemars::JsonSchema;
use serde::Serialize;

use crate::timestamp::Timestamp;

/// The attributes of one `TYPE#INSTANCE` record the audit reads (a Query projection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecordSnapshot {
    /// The EC2 instance id (`identifier`).
    pub id: String,
    /// `created`, `claimed`, `running`, `idle` or `terminated`.
    pub state: String,
    /// The owning run, `""` for none.
    pub run_id: String,
    /// The record's lifetime, as stored (timestamps compare as strings).
    pub threshold: String,
    /// The resource class.
    pub resource_class: String,
    /// The EC2 instance type (for a pool message).
    pub instance_type: String,
    /// `spot` or `on-demand` (for a pool message).
    pub usage_class: String,
    /// When the record was last written, as stored.
    pub updated_at: String,
    /// `releasedBy`: the run id that last returned the instance to the pool through this
    /// engine's rollback, `""` when none did. The pool's own writes never set or clear it, so it
    /// counts as evidence only together with that run's `idleThreshold` (see [`classify`]).
    pub released_by: String,
}

/// The attributes of one run record the audit reads (a Query projection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSnapshot {
    /// The run id.
    pub run_id: String,
    /// The attempt (1 when absent).
    pub attempt: u32,
    /// The persisted state name.
    pub state: String,
    /// Until when the lease is held, as stored.
    pub lease_expires_at: String,
    /// `idleThreshold`, when the run rolled back.
    pub idle_threshold: Option<String>,
    /// `messagesSent` (kept only for runs with an idle threshold: the others never send).
    pub messages_sent: Vec<String>,
}

impl RunSnapshot {
    /// `Done` or `Failed`.
    pub fn is_finished(&self) -> bool {
        matches!(self.state.as_str(), "Done" | "Failed")
    }
}

/// One EC2 instance, as the audit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Snapshot {
    /// The instance id.
    pub id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping`, `stopped`.
    pub state: String,
    /// Launch time, when EC2 gave one.
    pub launched_at: Option<Timestamp>,
    /// The pool tag's value (`Limits::pool_tag_key`; the run that launched it), `None` without
    /// the tag: only tagged instances are ever terminated, and one without a record only as
    /// [`crate::run::unrecorded::may_terminate`] allows.
    pub pool_tag: Option<String>,
}

/// Everything one audit reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every instance record.
    pub records: Vec<InstanceRecordSnapshot>,
    /// Every run record (all attempts).
    pub runs: Vec<RunSnapshot>,
    /// The pool's EC2 instances (listed by the pool tag or the caller's filter), plus the
    /// instances of records that listing did not show, looked up by id. An id in neither is one
    /// EC2 does not know.
    pub instances: Vec<Ec2Snapshot>,
    /// Per resource class: the queue's approximate visible + delayed + in-flight messages.
    pub queued_messages: BTreeMap<String, u64>,
}

/// What kind of stray a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// An EC2 instance with the pool tag, alive, without a record, older than the grace period.
    OrphanInstance,
    /// A live record whose instance EC2 says is terminated or does not know.
    GhostRecord,
    /// `created` past its threshold while its run is finished or has no record.
    CreatedLeak,
    /// `claimed` past its threshold by a run that is finished or has no record.
    StaleClaim,
    /// An idle record a finished run released without a sent pool message; or, with no
    /// instance, a class with more unexpired idle records than queued messages (a hint).
    UnannouncedIdle,
    /// A run not `Done`/`Failed` whose lease has ended.
    UnfinishedRun,
}

impl FindingKind {
    /// The kebab-case name used in every output.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::OrphanInstance => "orphan-instance",
            FindingKind::GhostRecord => "ghost-record",
            FindingKind::CreatedLeak => "created-leak",
            FindingKind::StaleClaim => "stale-claim",
            FindingKind::UnannouncedIdle => "unannounced-idle",
            FindingKind::UnfinishedRun => "unfinished-run",
        }
    }
}

/// The repair `--fix` makes for a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Repair {
    /// Terminate the instance (it has no record).
    Terminate,
    /// Delete the record, conditional on it being exactly as read.
    DeleteRecord,
    /// Delete the record as read; once that landed, terminate the instance if it carries the
    /// pool tag and is alive.
    DeleteRecordThenTerminate,
    /// Send the instance's pool message, then add the id to the releasing run's `messagesSent`
    /// (so the next audit knows it was sent).
    SendPoolMessage,
    /// Resume the run.
    Resume,
    /// Nothing: a hint for a person.
    None,
}

impl Repair {
    /// The kebab-case name used in every output.
    pub fn as_str(self) -> &'static str {
        match self {
            Repair::Terminate => "terminate",
            Repair::DeleteRecord => "delete-record",
            Repair::DeleteRecordThenTerminate => "delete-record-then-terminate",
            Repair::SendPoolMessage => "send-pool-message",
            Repair::Resume => "resume",
            Repair::None => "none",
        }
    }
}

/// One stray.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditFinding {
    /// What it is.
    pub kind: FindingKind,
    /// The instance, where the finding names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The run, where one applies (the record's owner, or the unfinished run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The run's attempt (unfinished runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_attempt: Option<u32>,
    /// The resource class (of the record, or of a hint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_class: Option<String>,
    /// The record's state as read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_state: Option<String>,
    /// The record's threshold as read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_threshold: Option<String>,
    /// EC2's state, `unknown` when EC2 does not know the id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ec2_state: Option<String>,
    /// Seconds since launch (orphans), since the record's last write, or since the lease ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_secs: Option<i64>,
    /// What `--fix` does.
    pub repair: Repair,
    /// One sentence for a person.
    pub detail: String,
}

impl AuditFinding {
    fn new(kind: FindingKind, repair: Repair, detail: String) -> AuditFinding {
        AuditFinding {
            kind,
            instance_id: None,
            run_id: None,
            run_attempt: None,
            resource_class: None,
            record_state: None,
            record_threshold: None,
            ec2_state: None,
            age_secs: None,
            repair,
            detail,
        }
    }

    fn of_record(kind: FindingKind, repair: Repair, record: &InstanceRecordSnapshot, now: Timestamp) -> AuditFinding {
        let mut finding = AuditFinding::new(kind, repair, String::new());
        finding.instance_id = Some(record.id.clone());
        finding.run_id = Some(record.run_id.clone()).filter(|run| !run.is_empty());
        finding.resource_class = Some(record.resource_class.clone());
        finding.record_state = Some(record.state.clone());
        finding.record_threshold = Some(record.threshold.clone());
        finding.age_secs = age_secs(&record.updated_at, now);
        finding
    }

    /// A hint has no instance and no repair; it does not count toward the exit code.
    pub fn is_hint(&self) -> bool {
        self.repair == Repair::None
    }
}

/// EC2 states in which an instance is gone or going.
fn is_dead(ec2_state: &str) -> bool {
    matches!(ec2_state, "terminated" | "shutting-down" | "unknown")
}

fn age_secs(stamp: &str, now: Timestamp) -> Option<i64> {
    Timestamp::parse(stamp).ok().map(|at| now.unix_secs() - at.unix_secs())
}

/// Record states a selection, a run or the pool's boot agent still acts on.
const LIVE_RECORD_STATES: [&str; 4] = ["idle", "claimed", "running", "created"];

/// Classifies one snapshot. `grace_secs` keeps young instances and records out of the findings
/// that eventual consistency or a phase still at work could explain: an instance launched by
/// creation whose record is not written yet, a record whose instance EC2 does not list yet.
pub fn classify(snapshot: &Snapshot, now: Timestamp, grace_secs: i64) -> Vec<AuditFinding> {
    let context = Context::of(snapshot, now, grace_secs);
    let mut findings = Vec::new();
    let mut unexpired_idle: BTreeMap<&str, u64> = BTreeMap::new();
    for record in &snapshot.records {
        if let Some(finding) = context.record_finding(record, &mut unexpired_idle) {
            findings.push(finding);
        }
    }
    findings.extend(context.orphans());
    findings.extend(queue_hints(&unexpired_idle, &snapshot.queued_messages));
    findings.extend(context.unfinished_runs());
    findings.sort_by(|a, b| (a.kind, &a.instance_id, &a.run_id).cmp(&(b.kind, &b.instance_id, &b.run_id)));
    findings
}

/// What the classification of one record needs to know of the rest of the snapshot.
struct Context<'a> {
    snapshot: &'a Snapshot,
    now: Timestamp,
    now_text: String,
    grace_secs: i64,
    ec2: HashMap<&'a str, &'a Ec2Snapshot>,
    /// A run id is unfinished while any of its attempts is: attempts share the run id in records.
    run_unfinished: HashMap<&'a str, bool>,
    /// The (`releasedBy`, idle threshold) of each finished run that released instances: its
    /// attempt's record identifier, and its run id too (what releases wrote before the
    /// identifier; the first attempt found names the finding).
    released_by: HashMap<(String, &'a str), &'a RunSnapshot>,
    /// Every (`releasedBy`, idle threshold, instance id) those runs know they announced:
    /// attempts share the run id, so one attempt's messages never speak for another's release.
    announced: HashSet<(String, &'a str, &'a str)>,
    recorded: HashSet<&'a str>,
}

impl<'a> Context<'a> {
    fn of(snapshot: &'a Snapshot, now: Timestamp, grace_secs: i64) -> Context<'a> {
        let mut run_unfinished: HashMap<&str, bool> = HashMap::new();
        for run in &snapshot.runs {
            *run_unfinished.entry(run.run_id.as_str()).or_default() |= !run.is_finished();
        }
        // An idle record is tied to a run only by both: the `releasedBy` that run's rollback
        // wrote, and that run's threshold. The pool's own release writes the same state, runId
        // and (in the same second, with the same idle time) threshold, but never `releasedBy`:
        // a threshold alone would mistake it for ours.
        let mut released_by = HashMap::new();
        let mut announced = HashSet::new();
        for run in snapshot.runs.iter().filter(|run| run.is_finished()) {
            if let Some(threshold) = run.idle_threshold.as_deref() {
                let identifier = crate::record::record_identifier(&run.run_id, run.attempt);
                for by in [identifier, run.run_id.clone()] {
                    announced.extend(run.messages_sent.iter().map(|id| (by.clone(), threshold, id.as_str())));
                    released_by.entry((by, threshold)).or_insert(run);
                }
            }
        }
        Context {
            snapshot,
            now,
            now_text: now.to_string(),
            grace_secs,
            ec2: snapshot.instances.iter().map(|i| (i.id.as_str(), i)).collect(),
            run_unfinished,
            released_by,
            announced,
            recorded: snapshot.records.iter().map(|record| record.id.as_str()).collect(),
        }
    }

    fn finished_or_absent(&self, run_id: &str) -> bool {
        !self.run_unfinished.get(run_id).copied().unwrap_or(false)
    }

    fn young(&self, stamp: &str) -> bool {
        age_secs(stamp, self.now).is_some_and(|age| age < self.grace_secs)
    }

    /// The finding of one live record, if it has one: a ghost (its instance is gone), a leak
    /// (`created` or `claimed` past its threshold, its run finished or absent), or an idle record
    /// a finished run released without announcing it. Counts unexpired pool idles by class.
    fn record_finding(
        &self,
        record: &'a InstanceRecordSnapshot,
        unexpired_idle: &mut BTreeMap<&'a str, u64>,
    ) -> Option<AuditFinding> {
        if !LIVE_RECORD_STATES.contains(&record.state.as_str()) {
            return None;
        }
        let ec2_state = self.ec2.get(record.id.as_str()).map_or("unknown", |i| i.state.as_str());
        let expired = record.threshold < self.now_text;
        if is_dead(ec2_state) {
            // An unknown id may be a launch EC2 does not list yet: only old records count.
            if ec2_state == "unknown" && self.young(&record.updated_at) {
                return None;
            }
            let mut finding = AuditFinding::of_record(FindingKind::GhostRecord, Repair::DeleteRecord, record, self.now);
            finding.ec2_state = Some(ec2_state.to_string());
            finding.detail = format!("{} record of an instance EC2 reports {ec2_state}", record.state);
            return Some(finding);
        }
        let leaked = match record.state.as_str() {
            "created" => Some(FindingKind::CreatedLeak),
            "claimed" => Some(FindingKind::StaleClaim),
            _ => None,
        };
        if let Some(kind) = leaked.filter(|_| expired && self.finished_or_absent(&record.run_id)) {
            let mut finding = AuditFinding::of_record(kind, Repair::DeleteRecordThenTerminate, record, self.now);
            finding.ec2_state = Some(ec2_state.to_string());
            finding.detail = format!("{} past its threshold; its run is finished or has no record", record.state);
            return Some(finding);
        }
        if record.state == "idle" && record.run_id.is_empty() && !expired {
            *unexpired_idle.entry(record.resource_class.as_str()).or_default() += 1;
            return self.unannounced_idle(record, ec2_state);
        }
        None
    }

    /// An unexpired pool idle that a finished run released (its `releasedBy` and that run's
    /// threshold) and never recorded announcing.
    fn unannounced_idle(&self, record: &InstanceRecordSnapshot, ec2_state: &str) -> Option<AuditFinding> {
        let run = self.released_by.get(&(record.released_by.clone(), record.threshold.as_str()))?;
        if self.announced.contains(&(record.released_by.clone(), record.threshold.as_str(), record.id.as_str())) {
            return None;
        }
        let mut finding =
            AuditFinding::of_record(FindingKind::UnannouncedIdle, Repair::SendPoolMessage, record, self.now);
        finding.ec2_state = Some(ec2_state.to_string());
        // The run that released it: `--fix` adds the id to its `messagesSent`.
        finding.run_id = Some(run.run_id.clone());
        finding.run_attempt = Some(run.attempt);
        finding.detail = "released by a finished run that did not record its pool message".into();
        Some(finding)
    }

    /// Pool-tagged, live instances with no record, older than the grace period (see [`orphan`]).
    fn orphans(&self) -> impl Iterator<Item = AuditFinding> + '_ {
        self.snapshot.instances.iter().filter_map(|instance| {
            let tag_value = instance.pool_tag.as_deref()?;
            if is_dead(&instance.state) || self.recorded.contains(instance.id.as_str()) {
                return None;
            }
            let age = instance.launched_at.map(|at| self.now.unix_secs() - at.unix_secs());
            // Without a launch time the age is unknown: treat it as young rather than terminate.
            if !matches!(age, Some(age) if age >= self.grace_secs) {
                return None;
            }
            let named_run_unfinished = self.run_unfinished.get(tag_value).copied().unwrap_or(false);
            Some(orphan(instance, tag_value, age, named_run_unfinished))
        })
    }

    /// Runs not finished whose lease has ended.
    fn unfinished_runs(&self) -> impl Iterator<Item = AuditFinding> + '_ {
        self.snapshot.runs.iter().filter(|run| !run.is_finished()).filter_map(|run| {
            if run.lease_expires_at.as_str() >= self.now_text.as_str() {
                return None;
            }
            let mut finding = AuditFinding::new(
                FindingKind::UnfinishedRun,
                Repair::Resume,
                format!("run left in {} and its lease has ended", run.state),
            );
            finding.run_id = Some(run.run_id.clone());
            finding.run_attempt = Some(run.attempt);
            finding.age_secs = age_secs(&run.lease_expires_at, self.now);
            Some(finding)
        })
    }
}

/// A hint per class with more unexpired idle records than queued messages (counts are
/// approximate): no instance, no repair.
fn queue_hints(unexpired_idle: &BTreeMap<&str, u64>, queued_messages: &BTreeMap<String, u64>) -> Vec<AuditFinding> {
    let mut hints = Vec::new();
    for (class, idle) in unexpired_idle {
        let Some(&queued) = queued_messages.get(*class) else { continue };
        if *idle > queued {
            let mut finding = AuditFinding::new(
                FindingKind::UnannouncedIdle,
                Repair::None,
                format!(
                    "{idle} unexpired idle records but about {queued} queued messages (a hint: counts are approximate)"
                ),
            );
            finding.resource_class = Some(class.to_string());
            hints.push(finding);
        }
    }
    hints
}

/// An orphan past its grace period: terminated by `--fix` only as the rule for instances
/// without a record allows (the run its tag names is finished or has no run record); otherwise
/// reported with no repair, and why.
fn orphan(instance: &Ec2Snapshot, tag_value: &str, age: Option<i64>, named_run_unfinished: bool) -> AuditFinding {
    let acting = crate::run::unrecorded::Acting::Audit { named_run_unfinished };
    let (repair, detail) = match crate::run::unrecorded::may_terminate(acting, tag_value) {
        Ok(()) => (Repair::Terminate, "pool-tagged instance with no record".to_string()),
        Err(left) => (Repair::None, left),
    };
    let mut finding = AuditFinding::new(FindingKind::OrphanInstance, repair, detail);
    finding.instance_id = Some(instance.id.clone());
    // The run that launched it: in a GitHub Actions job, `--fix` terminates only the job's own.
    finding.run_id = Some(tag_value.to_string()).filter(|run| !run.is_empty());
    finding.ec2_state = Some(instance.state.clone());
    finding.age_secs = age;
    finding
}

/// What became of one finding under `--fix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RepairOutcome {
    /// The repair landed.
    Repaired,
    /// The record moved since it was read (or the run is driven again): left alone.
    Skipped,
    /// AWS failed, or the run is busy: try again later (exit 3).
    Failed,
    /// Nothing to do (a hint).
    NotRepairable,
}

impl RepairOutcome {
    /// The kebab-case name used in every output.
    pub fn as_str(self) -> &'static str {
        match self {
            RepairOutcome::Repaired => "repaired",
            RepairOutcome::Skipped => "skipped",
            RepairOutcome::Failed => "failed",
            RepairOutcome::NotRepairable => "not-repairable",
        }
    }
}

/// A finding and, with `--fix`, what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct AuditEntry {
    /// The finding.
    #[serde(flatten)]
    pub finding: AuditFinding,
    /// With `--fix`: the repair's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<RepairOutcome>,
    /// With `--fix`: why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The counts of one audit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(deny_unknown_fields)]
pub struct AuditSummary {
    /// Instance records read.
    pub records: usize,
    /// Run records read.
    pub runs: usize,
    /// EC2 instances seen.
    pub instances: usize,
    /// Findings per kind (hints included).
    pub by_kind: BTreeMap<String, usize>,
    /// Findings that are not hints.
    pub findings: usize,
    /// Hints.
    pub hints: usize,
    /// With `--fix`: repaired, skipped, failed.
    pub repaired: usize,
    /// With `--fix`: left alone because the record moved.
    pub skipped: usize,
    /// With `--fix`: could not be repaired now.
    pub failed: usize,
    /// Whether `--fix` ran.
    pub fixed: bool,
}

/// The result of `audit` (and of `audit --fix`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct AuditReport {
    /// Every finding, by kind.
    pub findings: Vec<AuditEntry>,
    /// The counts.
    pub summary: AuditSummary,
}

impl AuditReport {
    /// The report of a classification, before any repair.
    pub fn new(snapshot: &Snapshot, findings: Vec<AuditFinding>) -> AuditReport {
        let mut report = AuditReport {
            findings: findings.into_iter().map(|finding| AuditEntry { finding, outcome: None, reason: None }).collect(),
            summary: AuditSummary {
                records: snapshot.records.len(),
                runs: snapshot.runs.len(),
                instances: snapshot.instances.len(),
                ..AuditSummary::default()
            },
        };
        report.recount();
        report
    }

    /// Recomputes the summary's finding counts from the entries.
    pub fn recount(&mut self) {
        let summary = &mut self.summary;
        summary.by_kind.clear();
        (summary.findings, summary.hints, summary.repaired, summary.skipped, summary.failed) = (0, 0, 0, 0, 0);
        for entry in &self.findings {
            *summary.by_kind.entry(entry.finding.kind.as_str().to_string()).or_default() += 1;
            if entry.finding.is_hint() {
                summary.hints += 1;
            } else {
                summary.findings += 1;
            }
            match entry.outcome {
                Some(RepairOutcome::Repaired) => summary.repaired += 1,
                Some(RepairOutcome::Skipped) => summary.skipped += 1,
                Some(RepairOutcome::Failed) => summary.failed += 1,
                _ => {}
            }
        }
    }

    /// The CLI's exit code: 0 clean (or every finding repaired), 3 when a repair could not be
    /// done now, 1 when findings remain. Hints never count: their counts are approximate.
    pub fn exit_code(&self) -> i32 {
        let remaining = self
            .findings
            .iter()
            .filter(|entry| !entry.finding.is_hint() && entry.outcome != Some(RepairOutcome::Repaired))
            .count();
        if self.summary.failed > 0 {
            3
        } else if remaining > 0 {
            1
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-27T12:00:00Z";

    fn now() -> Timestamp {
        Timestamp::parse(NOW).unwrap()
    }

    fn at(offset_secs: i64) -> String {
        now().plus_secs(offset_secs).to_string()
    }

    fn record(id: &str, state: &str, run_id: &str, threshold_secs: i64) -> InstanceRecordSnapshot {
        InstanceRecordSnapshot {
            id: id.into(),
            state: state.into(),
            run_id: run_id.into(),
            threshold: at(threshold_secs),
            resource_class: "large".into(),
            instance_type: "c6i.large".into(),
            usage_class: "on-demand".into(),
            updated_at: at(-3_600),
            released_by: String::new(),
        }
    }

    fn alive(id: &str) -> Ec2Snapshot {
        Ec2Snapshot {
            id: id.into(),
            state: "running".into(),
            launched_at: Some(now().plus_secs(-3_600)),
            pool_tag: Some("an-old-run".into()),
        }
    }

    fn run(run_id: &str, state: &str, lease_secs: i64) -> RunSnapshot {
        RunSnapshot {
            run_id: run_id.into(),
            attempt: 1,
            state: state.into(),
            lease_expires_at: at(lease_secs),
            idle_threshold: None,
            messages_sent: Vec::new(),
        }
    }

    fn kinds(snapshot: &Snapshot) -> Vec<(FindingKind, Option<String>)> {
        classify(snapshot, now(), 600).into_iter().map(|f| (f.kind, f.instance_id.or(f.run_id))).collect()
    }

    /// A pool of healthy instances: running unexpired (with and without a run record), idle
    /// with its message, and a young instance whose record creation has not written yet.
    fn healthy() -> Snapshot {
        let mut young = alive("i-young");
        young.launched_at = Some(now().plus_secs(-60));
        Snapshot {
            records: vec![
                record("i-run", "running", "r1", 600),
                record("i-old-run", "running", "no-run-record", 600),
                record("i-idle", "idle", "", 300),
                record("i-claimed", "claimed", "r2", 300),
                record("i-live-claim", "claimed", "r2", -10),
            ],
            runs: vec![run("r1", "Done", -100), run("r2", "Committing", 20)],
            instances: vec![
                alive("i-run"),
                alive("i-old-run"),
                alive("i-idle"),
                alive("i-claimed"),
                alive("i-live-claim"),
                young,
            ],
            queued_messages: BTreeMap::from([("large".to_string(), 1)]),
        }
    }

    #[test]
    fn a_healthy_pool_has_no_findings() {
        assert_eq!(classify(&healthy(), now(), 600), Vec::new());
    }

    #[test]
    fn each_kind_is_found_and_nothing_healthy() {
        let mut snapshot = healthy();
        // orphan-instance: tagged, alive, no record, old. An untagged one is never reported.
        snapshot.instances.push(alive("i-orphan"));
        snapshot.instances.push(Ec2Snapshot { pool_tag: None, ..alive("i-foreign") });
        // ghost-record: EC2 says terminated, and one EC2 does not know (old record).
        snapshot.records.push(record("i-ghost", "idle", "", 300));
        snapshot.instances.push(Ec2Snapshot { state: "terminated".into(), ..alive("i-ghost") });
        snapshot.records.push(record("i-unknown", "running", "r1", 300));
        // created-leak: expired, run finished. stale-claim: expired, run without a record.
        snapshot.records.push(record("i-created", "created", "r1", -5));
        snapshot.instances.push(alive("i-created"));
        snapshot.records.push(record("i-stale", "claimed", "gone", -5));
        snapshot.instances.push(alive("i-stale"));
        // unannounced-idle: released by a finished run at its idle threshold, not in messagesSent.
        let mut rolled_back = run("r3", "Failed", -100);
        rolled_back.idle_threshold = Some(at(300));
        rolled_back.messages_sent = vec!["i-idle".into()];
        snapshot.runs.push(rolled_back);
        snapshot
            .records
            .push(InstanceRecordSnapshot { released_by: "r3".into(), ..record("i-quiet", "idle", "", 300) });
        snapshot.instances.push(alive("i-quiet"));
        // unfinished-run: lease ended.
        snapshot.runs.push(run("r4", "RollingBack", -30));

        let found = kinds(&snapshot);
        assert_eq!(
            found,
            vec![
                (FindingKind::OrphanInstance, Some("i-orphan".into())),
                (FindingKind::GhostRecord, Some("i-ghost".into())),
                (FindingKind::GhostRecord, Some("i-unknown".into())),
                (FindingKind::CreatedLeak, Some("i-created".into())),
                (FindingKind::StaleClaim, Some("i-stale".into())),
                // Two unexpired idle records of live instances (i-idle, i-quiet; i-ghost's is
                // not counted) against one queued message: the hint, with no instance.
                (FindingKind::UnannouncedIdle, None),
                (FindingKind::UnannouncedIdle, Some("i-quiet".into())),
                (FindingKind::UnfinishedRun, Some("r4".into())),
            ]
        );
        let all = classify(&snapshot, now(), 600);
        let repairs: Vec<Repair> = all.iter().map(|f| f.repair).collect();
        assert_eq!(
            repairs,
            vec![
                Repair::Terminate,
                Repair::DeleteRecord,
                Repair::DeleteRecord,
                Repair::DeleteRecordThenTerminate,
                Repair::DeleteRecordThenTerminate,
                Repair::None,
                Repair::SendPoolMessage,
                Repair::Resume,
            ]
        );
        assert_eq!(all[2].ec2_state.as_deref(), Some("unknown"));
        assert_eq!((all[6].run_id.as_deref(), all[6].run_attempt), (Some("r3"), Some(1)), "the releasing run");
        assert_eq!(all[3].record_state.as_deref(), Some("created"));
        assert_eq!(all[0].age_secs, Some(3_600));
    }

    #[test]
    fn young_strays_wait_for_the_grace_period() {
        let mut snapshot = healthy();
        let mut fresh = record("i-fresh", "created", "r2", 300);
        fresh.updated_at = at(-30);
        snapshot.records.push(fresh);
        assert_eq!(kinds(&snapshot), Vec::new(), "a record whose instance EC2 does not list yet");
        let without_grace: Vec<_> =
            classify(&snapshot, now(), 0).into_iter().map(|f| (f.kind, f.instance_id.unwrap_or_default())).collect();
        // With no grace the record is a ghost, and the young instance without a record an orphan.
        assert_eq!(
            without_grace,
            vec![(FindingKind::OrphanInstance, "i-young".into()), (FindingKind::GhostRecord, "i-fresh".into())]
        );
    }

    #[test]
    fn an_orphan_is_terminated_only_for_a_run_its_tag_names_that_is_over() {
        let mut snapshot = healthy();
        let tagged = |id: &str, value: &str| Ec2Snapshot { pool_tag: Some(value.into()), ..alive(id) };
        // r1 is Done, "gone" has no run record: their orphans are terminated.
        snapshot.instances.push(tagged("i-of-done", "r1"));
        snapshot.instances.push(tagged("i-of-gone", "gone"));
        // r2 is still committing: its orphan is left to it (its resume retires what it created).
        snapshot.instances.push(tagged("i-of-live", "r2"));
        // An empty tag names no run at all.
        snapshot.instances.push(tagged("i-of-none", ""));
        let orphans: Vec<(String, Repair, Option<String>)> = classify(&snapshot, now(), 600)
            .into_iter()
            .filter(|f| f.kind == FindingKind::OrphanInstance)
            .map(|f| (f.instance_id.unwrap_or_default(), f.repair, f.run_id))
            .collect();
        assert_eq!(
            orphans,
            vec![
                ("i-of-done".into(), Repair::Terminate, Some("r1".into())),
                ("i-of-gone".into(), Repair::Terminate, Some("gone".into())),
                ("i-of-live".into(), Repair::None, Some("r2".into())),
                ("i-of-none".into(), Repair::None, None),
            ]
        );
        // The same orphans, young: none is reported, let alone terminated.
        let young: Vec<_> =
            classify(&snapshot, now(), 7_200).into_iter().filter(|f| f.kind == FindingKind::OrphanInstance).collect();
        assert_eq!(young, Vec::new());
    }

    #[test]
    fn a_claim_or_creation_of_an_unfinished_run_is_not_stale() {
        let mut snapshot = healthy();
        snapshot.records.push(record("i-created", "created", "r2", -5));
        snapshot.instances.push(alive("i-created"));
        // A later attempt of the finished run r1 is still driving.
        snapshot.runs.push(RunSnapshot { attempt: 2, ..run("r1", "Committing", 20) });
        snapshot.records.push(record("i-claim", "claimed", "r1", -5));
        snapshot.instances.push(alive("i-claim"));
        assert_eq!(kinds(&snapshot), Vec::new());
    }

    #[test]
    fn an_announced_or_expired_idle_record_is_not_unannounced() {
        let mut snapshot = healthy();
        let mut rolled_back = run("r3", "Failed", -100);
        rolled_back.idle_threshold = Some(at(300));
        rolled_back.messages_sent = vec!["i-idle".into()];
        snapshot.runs.push(rolled_back);
        // i-idle (in healthy()) has the run's threshold and is in messagesSent; an expired idle
        // record with no message is refresh's to terminate.
        snapshot.records.push(record("i-expired", "idle", "", -1));
        snapshot.instances.push(alive("i-expired"));
        assert_eq!(kinds(&snapshot), Vec::new());
    }

    #[test]
    fn the_pools_own_release_at_a_rollbacks_threshold_is_not_unannounced() {
        let mut snapshot = healthy();
        let mut rolled_back = run("r3", "Failed", -100);
        rolled_back.idle_threshold = Some(at(300));
        snapshot.runs.push(rolled_back);
        // Released by the pool in the same second with the same idle time: no `releasedBy`, or
        // the `releasedBy` of an earlier rollback by another run. Neither is this run's.
        snapshot.records.push(record("i-pool", "idle", "", 300));
        snapshot.instances.push(alive("i-pool"));
        snapshot
            .records
            .push(InstanceRecordSnapshot { released_by: "r9".into(), ..record("i-earlier", "idle", "", 300) });
        snapshot.instances.push(alive("i-earlier"));
        // Released by this run long ago, then by the pool at another threshold.
        snapshot
            .records
            .push(InstanceRecordSnapshot { released_by: "r3".into(), ..record("i-again", "idle", "", 200) });
        snapshot.instances.push(alive("i-again"));
        snapshot.queued_messages.insert("large".into(), 4);
        assert_eq!(kinds(&snapshot), Vec::new());
    }

    #[test]
    fn one_attempts_message_never_speaks_for_anothers_release() {
        let mut snapshot = healthy();
        // Attempt 1 released and announced i-x at one threshold; attempt 2 claimed it again,
        // released it at another and finished without recording its message.
        let mut first = run("r4", "Failed", -200);
        first.idle_threshold = Some(at(100));
        first.messages_sent = vec!["i-x".into()];
        let mut second = RunSnapshot { attempt: 2, ..run("r4", "Failed", -100) };
        second.idle_threshold = Some(at(300));
        snapshot.runs.extend([first, second]);
        snapshot.instances.push(alive("i-x"));
        // Attempt 2's releases name its record identifier; releases written before the
        // identifier named the run id alone: both are tied to it by its threshold.
        for by in ["r4#2", "r4"] {
            let mut snapshot = snapshot.clone();
            snapshot.records.push(InstanceRecordSnapshot { released_by: by.into(), ..record("i-x", "idle", "", 300) });
            let found: Vec<(FindingKind, Option<String>, Option<u32>)> = classify(&snapshot, now(), 600)
                .into_iter()
                .filter(|f| !f.is_hint())
                .map(|f| (f.kind, f.instance_id, f.run_attempt))
                .collect();
            assert_eq!(found, vec![(FindingKind::UnannouncedIdle, Some("i-x".to_string()), Some(2))], "{by}");
        }
    }

    #[test]
    fn exit_codes_follow_the_outcomes() {
        let mut snapshot = healthy();
        snapshot.instances.push(alive("i-orphan"));
        let mut report = AuditReport::new(&snapshot, classify(&snapshot, now(), 600));
        assert_eq!((report.summary.findings, report.exit_code()), (1, 1));
        report.findings[0].outcome = Some(RepairOutcome::Repaired);
        report.recount();
        assert_eq!(report.exit_code(), 0);
        report.findings[0].outcome = Some(RepairOutcome::Skipped);
        report.recount();
        assert_eq!(report.exit_code(), 1);
        report.findings[0].outcome = Some(RepairOutcome::Failed);
        report.recount();
        assert_eq!(report.exit_code(), 3);
        let clean = AuditReport::new(&healthy(), Vec::new());
        assert_eq!(clean.exit_code(), 0);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["findings"][0]["kind"], "orphan-instance");
        assert_eq!(json["findings"][0]["repair"], "terminate");
        assert_eq!(json["summary"]["byKind"]["orphan-instance"], 1);
    }
}
