//! The run record: the persisted form of a run, a versioned format (see `docs/schema.md`).
//!
//! The record lives at `PK = "TYPE#RUN"`, `SK = "ID#<runId>"` for a run's first attempt and
//! `SK = "ID#<runId>#<attempt>"` for a re-run's later attempts ([`record_identifier`]). Its spec is
//! stored beside it in chunk items (`PK = "TYPE#RUNSPEC"`), so the record itself stays small
//! whatever the fleet size. Every write of the record is conditional on `version`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::machine::State;
use crate::timestamp::Timestamp;

/// The schema version this build writes. Older versions it can still read are listed in
/// `docs/schema.md`; a newer one is refused rather than misread.
pub const RUN_RECORD_SCHEMA_VERSION: u32 = 4;

/// The most attempts of one run id read by [`crate::ports::RunStore::load_attempts`].
pub const MAX_ATTEMPTS_READ: usize = 1_000;

/// The identifier of one attempt's run record: the run id alone for the first attempt (as
/// version 1 wrote every record, so those still resolve), `<runId>#<attempt>` for later ones.
/// Run ids cannot contain `#` ([`crate::spec`]), so the two forms never collide.
pub fn record_identifier(run_id: &str, attempt: u32) -> String {
    if attempt <= 1 {
        run_id.to_string()
    } else {
        format!("{run_id}#{attempt}")
    }
}

/// Largest spec chunk, in bytes. Four chunks hold the largest spec a run may carry
/// ([`crate::spec::MAX_INSTANCES_PER_RUN`] instances at ~200 bytes each) with room to spare,
/// each far below DynamoDB's 400 KB item limit.
pub const SPEC_CHUNK_BYTES: usize = 300_000;

/// The most run records `list` and `resume --all` read in one call on a table whose run index
/// `init` has not built yet (they read every run record then). A listing this bound stops is
/// reported as cut (`RunListing::bounded`), never silently short. With the index, they read
/// only the records they return.
pub const MAX_LISTED_RUNS: usize = 100_000;

/// The persisted run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// Format version of this record.
    pub schema_version: u32,
    /// The run id (with the attempt, the record's key).
    pub run_id: String,
    /// Which attempt of the run (GitHub's `GITHUB_RUN_ATTEMPT`): 1 for the first. Version 1
    /// records have no attempt and read as 1.
    #[serde(default = "first_attempt")]
    pub run_attempt: u32,
    /// Incremented by every write; every write is conditional on the previous value.
    pub version: u64,
    /// The state the run is in. Written before that state's side effects run.
    pub state: State,
    /// SHA-256 of the canonical spec JSON, hex.
    pub spec_digest: String,
    /// How many spec chunk items hold the spec.
    pub spec_chunks: u32,
    /// Selected plus created instances.
    pub instance_count: u32,
    /// When the run was first persisted.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// Every state entered, with when and why.
    pub history: Vec<HistoryEntry>,
    /// Threshold of committed instances, fixed when `Committing` was entered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_threshold: Option<Timestamp>,
    /// Threshold of instances returned to the pool, fixed when `RollingBack` was entered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_threshold: Option<Timestamp>,
    /// Resource class to pool queue URL, resolved before a rollback starts (from the spec or the
    /// table's metadata), so a resume returns instances to the same queues.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub queue_urls: std::collections::BTreeMap<String, String>,
    /// Instance ids whose pool message this run knows it sent.
    #[serde(default)]
    pub messages_sent: Vec<String>,
    /// Instances that refused the one-transaction create of this run (at most
    /// [`crate::core::MAX_TRANSACTION_ITEMS`]), before this record was written: this run never
    /// held them after that. Kept for the audit; the commit rule reads [`RunRecord::committed_ids`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_at_create: Vec<String>,
    /// The instances whose commit landed: every fenced commit transaction appends its ids here
    /// in the same transaction (the fence's `Update` of this record), so a resume has positive
    /// evidence that an instance reached `running` for the run before somebody took it on.
    /// Written only by those transactions. A versioned write carries what its driver read: the
    /// only one after a commit transaction, in `Committing`, is the write that leaves that state,
    /// after which no rule reads this list. A take-over writes only while the list is as it read
    /// it ([`crate::ports::RunStore::take_over_run`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub committed_ids: Vec<String>,
    /// Why the run failed: the shortfall, or the original unexpected error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    /// The driver allowed to write this record, and until when.
    pub lease: Lease,
    /// The fencing token (schema version 3): bumped by every take-over, and checked by DynamoDB
    /// in every transaction that changes this run's instance records, together with the lease
    /// owner and an unfinished state. A driver that was taken over is refused by the store
    /// itself, whatever its clock says. A version 2 record reads as epoch 0.
    #[serde(default)]
    pub fencing_epoch: u64,
    /// Epoch seconds after which DynamoDB TTL may delete the record: the retention after the run
    /// finished, or, while unfinished, twice the retention after it started (the same as its
    /// spec chunks, so an abandoned run's record and spec go together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
}

fn first_attempt() -> u32 {
    1
}

/// One state entered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The state entered.
    pub state: State,
    /// When.
    pub at: Timestamp,
    /// Why, in one line.
    #[serde(default)]
    pub reason: String,
}

/// The kind of a run's error, persisted as `shortfall` or `unexpected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunErrorKind {
    /// A capacity shortfall: graceful rollback.
    Shortfall,
    /// The error that sent the run to emergency cleanup.
    Unexpected,
}

impl RunErrorKind {
    /// The persisted name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunErrorKind::Shortfall => "shortfall",
            RunErrorKind::Unexpected => "unexpected",
        }
    }
}

impl std::fmt::Display for RunErrorKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunError {
    /// Which kind of failure.
    pub kind: RunErrorKind,
    /// The message, as the CLI prints it.
    pub message: String,
}

/// The driver that holds the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// An id unique to one driver process and run.
    pub owner: String,
    /// The lease ends at this instant unless renewed.
    pub expires_at: Timestamp,
}

impl RunRecord {
    /// Whether `found`, read where this record's create was sent, is that very create: same owner,
    /// version, creation time, state and thresholds. One driver may send two different creates
    /// for a run (the one-transaction form, then after a refusal or a lost answer the staged
    /// form, with a later `now`); a late-landing first one must not pass for the second, whose
    /// thresholds the driver would then hold while the records carry the first's.
    pub fn is_own_create(&self, found: &RunRecord) -> bool {
        found.lease.owner == self.lease.owner
            && found.version == self.version
            && found.created_at == self.created_at
            && found.state == self.state
            && found.idle_threshold == self.idle_threshold
            && found.commit_threshold == self.commit_threshold
    }

    /// When the current state was entered.
    pub fn state_entered_at(&self) -> Timestamp {
        self.history.last().map(|entry| entry.at).unwrap_or(self.created_at)
    }

    /// The identifier of this record in the table.
    pub fn identifier(&self) -> String {
        record_identifier(&self.run_id, self.run_attempt)
    }

    /// The run id and attempt as people read them: `123` or `123 (attempt 2)`.
    pub fn display_name(&self) -> String {
        if self.run_attempt <= 1 {
            self.run_id.clone()
        } else {
            format!("{} (attempt {})", self.run_id, self.run_attempt)
        }
    }

    /// Whether the lease is held by someone at `now`.
    pub fn lease_active(&self, now: Timestamp) -> bool {
        self.lease.expires_at > now
    }
}

/// SHA-256 of `text`, hex.
pub fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Splits the spec into chunks of at most [`SPEC_CHUNK_BYTES`], on character boundaries.
pub fn split_spec(text: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(SPEC_CHUNK_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        chunks.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    if chunks.is_empty() {
        chunks.push(String::new());
    }
    chunks
}

/// The largest run record this crate writes, in bytes of its JSON form: a margin below
/// DynamoDB's 400 KB item limit for the attribute names and key attributes.
pub const MAX_RECORD_BYTES: usize = 350_000;

/// Checks the record fits in one DynamoDB item. The spec lives in chunk items, so what grows is
/// `messagesSent` (at most [`crate::spec::MAX_INSTANCES_PER_RUN`] ids of 19 characters, about
/// 110 KB) and `queueUrls` (one per resource class of the run).
pub fn check_size(record: &RunRecord) -> Result<(), String> {
    let size = serde_json::to_string(record).map(|text| text.len()).unwrap_or(usize::MAX);
    if size > MAX_RECORD_BYTES {
        return Err(format!(
            "run record of {} would be {size} bytes, over the {MAX_RECORD_BYTES}-byte bound below DynamoDB's 400 KB item limit",
            record.run_id
        ));
    }
    Ok(())
}

/// Reads a record from its JSON form, refusing schema versions this build does not know.
pub fn from_json_value(value: serde_json::Value) -> Result<RunRecord, String> {
    let schema_version = value.get("schemaVersion").and_then(|v| v.as_u64()).unwrap_or(0);
    if schema_version == 0 || schema_version > RUN_RECORD_SCHEMA_VERSION as u64 {
        return Err(format!(
            "run record schema version {schema_version} is not one this build reads (1..={RUN_RECORD_SCHEMA_VERSION})"
        ));
    }
    serde_json::from_value(value).map_err(|error| format!("run record does not match its schema: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_join_back() {
        let text = "é".repeat(SPEC_CHUNK_BYTES); // two bytes each: forces a boundary search
        let chunks = split_spec(&text);
        assert!(chunks.iter().all(|c| c.len() <= SPEC_CHUNK_BYTES));
        assert_eq!(chunks.concat(), text);
        assert_eq!(split_spec("{}"), vec!["{}".to_string()]);
    }

    #[test]
    fn a_version_1_record_still_loads() {
        // Frozen copy of what version 1 writes; a later format must keep reading it.
        let text = include_str!("../tests/fixtures/run-record-v1.json");
        let record = from_json_value(serde_json::from_str(text).unwrap()).unwrap();
        assert_eq!(record.state, State::Failed);
        assert_eq!(record.messages_sent, vec!["i-0aaaaaaaaaaaaaaaa".to_string()]);
        assert_eq!(record.history.len(), 3);
        assert_eq!(record.run_attempt, 1, "a version 1 record is its run's first attempt");
        assert_eq!(record.identifier(), record.run_id);
    }

    #[test]
    fn attempts_have_their_own_identifiers() {
        assert_eq!(record_identifier("123", 1), "123");
        assert_eq!(record_identifier("123", 2), "123#2");
        assert_ne!(record_identifier("12", 31), record_identifier("123", 1));
    }

    #[test]
    fn the_largest_run_record_fits_in_one_item() {
        let text = include_str!("../tests/fixtures/run-record-v1.json");
        let mut record = from_json_value(serde_json::from_str(text).unwrap()).unwrap();
        record.messages_sent = (0..crate::spec::MAX_INSTANCES_PER_RUN).map(|i| format!("i-{i:017x}")).collect();
        assert!(check_size(&record).is_ok());
        record.queue_urls =
            (0..5_000).map(|i| (format!("class-{i}"), format!("https://sqs.example/123456789012/pool-{i}"))).collect();
        assert!(check_size(&record).unwrap_err().contains("over the 350000-byte bound"));
    }

    /// A late-landing first create (the one-transaction form, its answer lost) must not pass
    /// for the staged create the same driver sent after it with a later `now`.
    #[test]
    fn a_create_recognises_only_itself() {
        let text = include_str!("../tests/fixtures/run-record-v1.json");
        let sent = from_json_value(serde_json::from_str(text).unwrap()).unwrap();
        assert!(sent.is_own_create(&sent.clone()));
        let mut earlier = sent.clone();
        earlier.idle_threshold = Some(Timestamp::parse("2026-01-01T00:00:00Z").unwrap());
        assert!(!sent.is_own_create(&earlier), "another threshold: another create");
        let mut earlier = sent.clone();
        earlier.created_at = Timestamp::parse("2026-01-01T00:00:00Z").unwrap();
        assert!(!sent.is_own_create(&earlier), "another creation time: another create");
        let mut other = sent.clone();
        other.lease.owner = "pid1-000000000000".into();
        assert!(!sent.is_own_create(&other), "another driver's");
    }

    #[test]
    fn unknown_schema_versions_are_refused() {
        let value = serde_json::json!({"schemaVersion": 99});
        assert!(from_json_value(value).unwrap_err().contains("schema version 99"));
    }
}
