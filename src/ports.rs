//! The small traits behind which storage and side effects live, and their error contract.
//!
//! The driver only speaks to these. `src/aws/` implements them with the real SDK clients; nothing
//! else in the crate imports `aws_sdk_*`.
//!
//! Error contract, shared by every method: the implementation has already retried transient
//! failures (throttling, 5xx, timeouts, dropped connections) within its retry budget, so an
//! [`AwsError`] that comes back is final for this call. Its [`ErrorClass`] says what it was, so
//! the caller can tell "AWS is unreachable, try again later" from "this can never work".

use std::collections::BTreeMap;
use std::future::Future;

use crate::core::{InstanceDeletion, InstanceTransition, PoolGuard, WriteResult};
use crate::record::RunRecord;
use crate::spec::ResourceClassConfig;
use crate::timestamp::Timestamp;

/// What kind of failure an AWS error is, decided from its error code, never its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Throttling (`ThrottlingException`, `RequestLimitExceeded`, `RequestThrottled`,
    /// `ProvisionedThroughputExceededException`, transaction conflicts): retryable later.
    Throttling,
    /// 5xx, timeouts, dropped connections: retryable later.
    Transient,
    /// A conditional check failed.
    ConditionFailed,
    /// The table, queue or instance does not exist.
    NotFound,
    /// The request is invalid: retrying cannot help.
    Invalid,
    /// Not allowed: a missing IAM permission (`AccessDenied`, `UnauthorizedOperation`, …), or
    /// no usable credentials (the SDK's credential chain found none, or they are invalid or
    /// expired). Retrying cannot help; the CLI exits 77.
    Permission,
    /// Anything else.
    Other,
}

impl ErrorClass {
    /// Whether a later attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Throttling | ErrorClass::Transient)
    }
}

/// An AWS call that failed after its retries, with the service's own error code kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service} {operation} failed: {}{message}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct AwsError {
    /// `DynamoDB`, `SQS` or `EC2`.
    pub service: &'static str,
    /// The operation, such as `TransactWriteItems`.
    pub operation: &'static str,
    /// The service's error code, when it sent one.
    pub code: Option<String>,
    /// The service's message, or the transport failure.
    pub message: String,
    /// What kind of failure this is.
    pub class: ErrorClass,
}

/// A failed write of the run record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The record changed since it was read: another driver holds the run (fencing).
    #[error("the run record changed under this driver (found version {found_version:?}, lease owner {found_owner:?})")]
    VersionConflict {
        /// The version found, if the record exists.
        found_version: Option<u64>,
        /// The lease owner found.
        found_owner: Option<String>,
    },
    /// The record would not fit in one DynamoDB item.
    #[error("{0}")]
    TooLarge(String),
    /// The stored record could not be read as a run record.
    #[error("corrupt run record: {0}")]
    Corrupt(String),
    /// AWS failed.
    #[error(transparent)]
    Aws(#[from] AwsError),
}

/// Result of creating a run record.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// The record did not exist and now does, with every transition that rode along applied.
    Created,
    /// A record with this run id and attempt exists already; nothing was written.
    Exists(Box<RunRecord>),
    /// A transition that rode along was refused, throttled or conflicted; nothing was written.
    /// One result per transition, in order.
    EffectsRefused(Vec<WriteResult>),
    /// The [`PoolGuard`]'s `ConditionCheck` on the pool's metadata item failed (whatever the
    /// transitions' results); nothing was written.
    PoolRefused,
}

/// What [`RunStore::list_runs`] read.
#[derive(Debug, Clone, Default)]
pub struct RunListing {
    /// Newest first, at most the limit asked for.
    pub records: Vec<RunRecord>,
    /// More records match than `records` holds: the limit cut the listing.
    pub more: bool,
    /// A read bound stopped the read before every record was seen, so records that match,
    /// the newest among them, may be missing. Only the fallback for a table whose run index
    /// `init` has not built reads with such a bound ([`crate::record::MAX_LISTED_RUNS`]).
    pub bounded: bool,
    /// Items DynamoDB read to answer (filtered ones included): what the listing cost.
    pub items_read: u64,
    /// Whether the run index answered (rather than a read of every run record).
    pub indexed: bool,
}

impl RunListing {
    /// Whether records that match may be missing from `records`.
    pub fn is_cut(&self) -> bool {
        self.more || self.bounded
    }
}

/// Result of one `TerminateInstances` request set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Termination {
    /// Ids AWS accepted (terminating, or already terminated).
    pub terminated: Vec<String>,
    /// Ids AWS does not know, even after the retries of [`crate::config::Limits`].
    pub not_found: Vec<String>,
    /// Ids AWS refused with a final error of their own (for example `UnauthorizedOperation` under
    /// a tag condition, or `OperationNotPermitted` for termination protection). EC2 authorizes a
    /// batch all or nothing, so a refused batch is split until the refusal names single ids.
    pub refused: Vec<(String, AwsError)>,
}

/// Which of a set of instance ids are the pool's: EC2 instances carrying the pool tag
/// (`InitialRunId`, which creation puts on every instance it launches, with the id of the run
/// that launched it as its value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolMembership {
    /// Instances that carry the pool tag (in any state, terminated included), each with the
    /// tag's value: the run that launched it.
    pub members: BTreeMap<String, String>,
    /// Instances EC2 knows that do not carry the pool tag: never terminated by this engine.
    pub foreign: Vec<String>,
    /// Ids EC2 does not know (gone long ago, or too new for eventual consistency).
    pub unknown: Vec<String>,
}

/// What an instance's record says the instance is: the pool's word on the class and instance
/// type of a pool message (issue 18), read before a run that returns instances writes anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceFacts {
    /// The EC2 instance id.
    pub id: String,
    /// The record's `resourceClass`.
    pub resource_class: String,
    /// The record's `instanceType`, when it has one.
    pub instance_type: Option<String>,
}

/// The run records and the pool's configuration, in the pool's table.
pub trait RunStore: Send + Sync {
    /// Reads the run record of one attempt of a run.
    fn load_run(
        &self,
        run_id: &str,
        attempt: u32,
    ) -> impl Future<Output = Result<Option<RunRecord>, StoreError>> + Send;
    /// Every attempt's run record of a run id, by attempt ascending (at most
    /// [`crate::record::MAX_ATTEMPTS_READ`]).
    fn load_attempts(&self, run_id: &str) -> impl Future<Output = Result<Vec<RunRecord>, StoreError>> + Send;
    /// Creates a run record together with its spec chunk items and the instance `transitions`
    /// of its state, all in one atomic transaction, only if no record exists; otherwise returns
    /// the existing record and writes nothing. The caller keeps chunks + 1 + transitions within
    /// [`crate::core::MAX_TRANSACTION_ITEMS`], counting one more for a `guard`. `now` is as for
    /// [`InstanceStore::transition`]. With a `guard`, the transaction also checks the pool's
    /// metadata item, and each transition of an instance the guard names its record's class and
    /// type ([`PoolGuard`]).
    fn create_run(
        &self,
        record: &RunRecord,
        spec_chunks: &[String],
        chunk_ttl: i64,
        transitions: &[InstanceTransition],
        guard: Option<&PoolGuard>,
        now: Timestamp,
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;
    /// Replaces the record, only if its stored version is `expected_version`. A write that
    /// reached the table but whose answer was lost is recognised and returns `Ok`.
    fn replace_run(
        &self,
        record: &RunRecord,
        expected_version: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A take-over's [`RunStore::replace_run`]: also only if the stored `committedIds` still
    /// holds `committed_as_read` ids. The driver taken over may still append to it (a commit
    /// transaction's fence holds until this write lands, and appending leaves the version as it
    /// is): a replace of the list as read would erase that evidence, so the take-over is refused
    /// instead (a `VersionConflict`), and tried again later on a fresh read.
    fn take_over_run(
        &self,
        record: &RunRecord,
        expected_version: u64,
        committed_as_read: usize,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = committed_as_read;
        self.replace_run(record, expected_version)
    }
    /// Extends the lease to `expires_at` if `owner` still holds it, without touching the
    /// version: the driver's own versioned writes stay valid. `Ok(false)` when another driver
    /// has taken the run over.
    fn renew_lease(
        &self,
        run_id: &str,
        attempt: u32,
        owner: &str,
        expires_at: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Reads and joins the spec's chunk items.
    fn load_spec(
        &self,
        run_id: &str,
        digest: &str,
        chunks: u32,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Run records, newest first (by creation time), at most `limit`; only those not in `Done`
    /// or `Failed` when `unfinished_only`. The listing says whether more records match
    /// ([`RunListing::more`]) and whether a read bound may have hidden some
    /// ([`RunListing::bounded`]): a caller never drops either silently.
    fn list_runs(
        &self,
        unfinished_only: bool,
        limit: usize,
    ) -> impl Future<Output = Result<RunListing, StoreError>> + Send;
    /// The pool's `resource_class_config` metadata item, if it exists.
    fn load_resource_class_config(
        &self,
    ) -> impl Future<Output = Result<Option<ResourceClassConfig>, StoreError>> + Send;
    /// What the instance records of up to [`crate::core::MAX_TRANSACTION_ITEMS`] ids say (class
    /// and instance type; consistent reads). Ids without a record are left out.
    fn load_instance_facts(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<InstanceFacts>, StoreError>> + Send;
}

/// The fencing token a driver's instance writes carry: the run record they are checked against
/// (`ConditionCheck` in the same transaction) and what it must hold. A driver that was taken over
/// (another owner, a bumped epoch) or whose run finished has every such write refused by the
/// store ([`WriteResult::Fenced`]), whatever the clocks say. So is one that drives an attempt
/// while a later attempt of the run it does not know of has its record: re-runs share the run id
/// in every instance record, and only the attempts' records tell their instances apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The run id.
    pub run_id: String,
    /// The attempt.
    pub attempt: u32,
    /// The lease owner the record must name.
    pub owner: String,
    /// The fencing epoch the record must carry.
    pub epoch: u64,
    /// The first attempt of the run the driver does not know of: its run record must not exist
    /// (a second `ConditionCheck`, `attribute_not_exists`). The attempt after `attempt`, or after
    /// the latest the driver read (`Driver::attempts_in_order`); always after `attempt` (one
    /// transaction cannot check one item twice).
    pub unknown_attempt: u32,
}

impl Fence {
    /// The fence of `record` as this driver holds it, knowing of no later attempt.
    pub fn of(record: &RunRecord) -> Fence {
        Fence {
            run_id: record.run_id.clone(),
            attempt: record.run_attempt,
            owner: record.lease.owner.clone(),
            epoch: record.fencing_epoch,
            unknown_attempt: record.run_attempt.saturating_add(1),
        }
    }

    /// The same fence, knowing of every attempt up to `latest`.
    pub fn knowing(mut self, latest: u32) -> Fence {
        self.unknown_attempt = self.unknown_attempt.max(latest.saturating_add(1));
        self
    }
}

/// The instance records, changed in atomic batches.
pub trait InstanceStore: Send + Sync {
    /// Applies up to [`crate::core::MAX_FENCED_BATCH`] transitions atomically, with `fence`'s
    /// `ConditionCheck`s on the run record (and on the record of the attempt it does not know
    /// of) in the same transaction, one result per transition in order. When the fence fails,
    /// every result is `Fenced`. When any condition fails nothing
    /// is written: the rejected ones come back as `Rejected` with the record found, throttled
    /// ones as `Throttled`, the others as `Cancelled`. `now` is both the `updatedAt` written and the `:now` of
    /// [`crate::core::ThresholdCondition::Unexpired`].
    fn transition(
        &self,
        batch: &[InstanceTransition],
        now: Timestamp,
        fence: &Fence,
    ) -> impl Future<Output = Result<Vec<WriteResult>, AwsError>> + Send;
    /// Deletes up to [`crate::core::MAX_FENCED_BATCH`] records atomically, fenced, same results.
    fn delete(
        &self,
        batch: &[InstanceDeletion],
        fence: &Fence,
    ) -> impl Future<Output = Result<Vec<WriteResult>, AwsError>> + Send;
    /// Deletes up to [`crate::core::MAX_FENCED_BATCH`] records atomically together with the run
    /// record's versioned write of `record` (its terminal state), which is the transaction's
    /// fence: only if the stored version is `expected_version`, and only while attempt
    /// `unknown_attempt` of the run has no record (as [`Fence::unknown_attempt`]). Same results
    /// as [`InstanceStore::delete`]; `Fenced` when either fails, unless the record found is
    /// `record` itself (a re-sent transaction whose first answer was lost), which is `Applied`.
    fn delete_finishing(
        &self,
        batch: &[InstanceDeletion],
        record: &RunRecord,
        expected_version: u64,
        unknown_attempt: u32,
    ) -> impl Future<Output = Result<Vec<WriteResult>, AwsError>> + Send;
}

/// One pool message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The instance id (also the batch entry id).
    pub instance_id: String,
    /// The JSON body.
    pub body: String,
}

/// The SQS pool queues.
pub trait PoolQueues: Send + Sync {
    /// Sends up to [`crate::core::MAX_MESSAGE_BATCH`] messages with the pool's delay. Returns the
    /// ids whose entries failed (empty when all were sent); entries are never dropped silently.
    fn send(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> impl Future<Output = Result<Vec<(String, AwsError)>, AwsError>> + Send;
}

/// EC2.
pub trait Compute: Send + Sync {
    /// Tells the pool's instances from the rest of the account, for up to
    /// [`crate::core::MAX_TERMINATE_BATCH`] ids (one `DescribeInstances`).
    fn pool_membership(&self, instance_ids: &[String])
        -> impl Future<Output = Result<PoolMembership, AwsError>> + Send;
    /// Terminates up to [`crate::core::MAX_TERMINATE_BATCH`] instances. Unknown ids do not stop
    /// the others from being terminated; they come back in `not_found`, and ids refused on
    /// their own come back in `refused`.
    fn terminate(&self, instance_ids: &[String]) -> impl Future<Output = Result<Termination, AwsError>> + Send;
}

/// Everything the driver needs.
pub trait Ports: RunStore + InstanceStore + PoolQueues + Compute + 'static {}

impl<T: RunStore + InstanceStore + PoolQueues + Compute + 'static> Ports for T {}
