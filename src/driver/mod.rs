//! The driver: persists each state, then executes that state's planned side effects through the
//! [`crate::ports`] traits, and feeds their outcomes back to the pure core.
//!
//! Order of every step, which is what makes a crash at any point recoverable:
//! 1. compute the next state (pure) and write it to the run record, conditional on the record's
//!    version (a driver that lost its lease cannot write: fencing);
//! 2. run that state's side effects, each idempotent: a conditional write that finds the result
//!    of an earlier attempt of this run counts as done, one that finds another owner is an error;
//! 3. feed the outcomes to the machine and go to 1.
//!
//! A run whose process dies is resumed from the persisted state; thresholds fixed at state entry
//! are reused, so a repeated step writes exactly what the first attempt wrote.
//!
//! A small run goes further: its record is created together with its first state's instance
//! transitions, in one atomic transaction (`Driver::fast_path`), so its state is persisted with
//! its effects rather than before them.

mod batching;
mod cleanup;
mod commit;
mod lease;
mod rollback;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::{info, info_span, warn, Instrument};

use crate::config::{Limits, OnRetriesExhausted};
use crate::core::{self, InstanceState, InstanceTransition};
use crate::machine::{self, Input, InvalidTransition, State};
use crate::ports::{AwsError, CreateOutcome, ErrorClass, Ports, StoreError};
use crate::record::{self, HistoryEntry, Lease, RunError, RunRecord, RUN_RECORD_SCHEMA_VERSION};
use crate::spec::{Spec, SpecError};
use crate::timestamp::Timestamp;

/// Where the driver reads the time. Tests and simulations supply their own.
/// It is also where the driver draws its randomness (backoff jitter, lease owner ids), so a
/// simulation that owns the clock replays one exact history from one seed.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Timestamp;
    /// A random number, uniformly distributed.
    fn random_u64(&self) -> u64 {
        rand::random()
    }
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now_utc()
    }
}

/// Test hooks: stop (as if the process died) or pause after the n-th AWS write of this driver.
/// Counting covers every write: run-record writes, spec chunks and every side-effecting call.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Return [`DriveError::Crashed`] right after the n-th write (1-based), doing nothing more.
    pub crash_after_writes: Option<u64>,
    /// After the n-th write, signal `paused` and wait for `resume`, like a process stopped by
    /// SIGSTOP: nothing is renewed meanwhile.
    pub pause_after_writes: Option<(u64, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>,
}

/// One thing the driver did, for traces, logs and reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum TraceEvent {
    /// The run record was written in this state.
    Persisted {
        /// The state written.
        state: State,
    },
    /// The run record was created in this state in one transaction with these instance
    /// transitions (the one-transaction path of a small run).
    CreatedWith {
        /// The state written.
        state: State,
        /// The instances' target state.
        to: InstanceState,
        /// The instances.
        ids: Vec<String>,
    },
    /// A batch of conditional instance-record updates.
    TransitionInstances {
        /// The target state.
        to: InstanceState,
        /// The instances.
        ids: Vec<String>,
    },
    /// A batch of conditional instance-record deletions.
    DeleteRecords {
        /// The instances.
        ids: Vec<String>,
    },
    /// A batch of pool messages.
    SendMessages {
        /// The resource class whose queue received them.
        resource_class: String,
        /// The instances.
        ids: Vec<String>,
    },
    /// A DescribeInstances call that tells the pool's instances from the rest of the account.
    CheckPool {
        /// The instances.
        ids: Vec<String>,
    },
    /// A TerminateInstances call.
    Terminate {
        /// The instances.
        ids: Vec<String>,
    },
    /// An instance record found in an unexpected state.
    Found {
        /// The instance.
        id: String,
        /// What was found.
        finding: String,
    },
}

/// Why a run could not be driven to a terminal state now.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The spec is invalid; nothing was written.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// A run with this id exists with a different spec; nothing was written.
    #[error("run {run_id} already exists with a different spec")]
    SpecMismatch {
        /// The run id.
        run_id: String,
    },
    /// No run record has this id.
    #[error("no such run: {run_id}")]
    NoSuchRun {
        /// The run id.
        run_id: String,
    },
    /// Another driver holds the run's lease (for a re-run, possibly an earlier attempt's).
    #[error("run {run_id} is being driven by {owner} (lease ends {until})")]
    Busy {
        /// The run id.
        run_id: String,
        /// The lease holder.
        owner: String,
        /// When its lease ends.
        until: Timestamp,
    },
    /// This driver's lease was taken over, or ran out before it could renew it; it stopped
    /// before its next write.
    #[error("run {run_id}: this driver lost its lease and stopped (its lease ran out or another driver took over)")]
    LeaseLost {
        /// The run id.
        run_id: String,
    },
    /// AWS failed in a way that stops progress now; the state is persisted and a resume continues.
    #[error("run {run_id} stalled in {state}: {error}")]
    Stalled {
        /// The run id.
        run_id: String,
        /// The persisted state.
        state: State,
        /// What failed.
        error: String,
    },
    /// AWS failed before anything was written.
    #[error("nothing was written: {0}")]
    NotStarted(AwsError),
    /// Creating the run record failed in a way that may have written it (the answer was lost),
    /// and reading it back failed too: the run may have started.
    #[error("run {run_id} may have started (creating its record failed: {error}; reading it back failed: {check}); repeating the same `run` is safe")]
    Uncertain {
        /// The run id.
        run_id: String,
        /// The create's error.
        error: AwsError,
        /// The read-back's error.
        check: StoreError,
    },
    /// The stored run could not be read.
    #[error(transparent)]
    Store(StoreError),
    /// A transition the machine does not declare (a bug).
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// Stopped by a test hook, as if the process had died.
    #[error("stopped by a test hook after {writes} writes")]
    Crashed {
        /// Writes done before stopping.
        writes: u64,
    },
}

/// How a finished run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// Path A: every instance is `running` for the run.
    Committed,
    /// Path B: claimed instances went back to the pool; the run failed for lack of capacity.
    RolledBack,
    /// Path C: an unexpected error; the run's instances were terminated and purged.
    CleanedUp,
}

impl OutcomeKind {
    /// Of a terminal record.
    pub fn of(record: &RunRecord) -> Option<OutcomeKind> {
        match (record.state, record.error.as_ref().map(|e| e.kind.as_str())) {
            (State::Done, _) => Some(OutcomeKind::Committed),
            (State::Failed, Some("shortfall")) => Some(OutcomeKind::RolledBack),
            (State::Failed, _) => Some(OutcomeKind::CleanedUp),
            _ => None,
        }
    }

    /// The CLI's exit code for this outcome.
    pub fn exit_code(self) -> i32 {
        match self {
            OutcomeKind::Committed => 0,
            OutcomeKind::RolledBack => 1,
            OutcomeKind::CleanedUp => 2,
        }
    }
}

/// A finished run, as this driver saw it.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How it ended.
    pub kind: OutcomeKind,
    /// The final run record.
    pub record: RunRecord,
    /// The spec the run acted on.
    pub spec: Spec,
    /// What this driver did (empty when the run had finished before).
    pub trace: Vec<TraceEvent>,
    /// AWS writes this driver made (run record, spec chunks and side effects).
    pub writes: u64,
}

/// A step's failure: either unexpected (the machine's `UnexpectedError` input) or a reason to stop
/// driving now.
enum StepError {
    Unexpected(String),
    /// AWS still failed with a retryable error (5xx, timeout, dropped connection) once the SDK's
    /// retries were spent. `OnRetriesExhausted` decides what the run does.
    Unavailable(AwsError),
    /// Throttling outlasted the throttle budget. Load is not an unexpected error: the run always
    /// stops where it is, resumable, whatever `OnRetriesExhausted` says.
    Throttled(AwsError),
    /// Something the run waits for has not happened yet (EC2 does not know an instance of this
    /// run yet): the run stops where it is, resumable, whatever `OnRetriesExhausted` says.
    NotYet(String),
    Stop(DriveError),
}

/// A side effect's AWS error, decided by its class: throttling and other retryable errors stall
/// the run (or, for the latter, follow `OnRetriesExhausted`), others are unexpected.
fn aws_step_error(error: AwsError) -> StepError {
    match error.class {
        ErrorClass::Throttling => StepError::Throttled(error),
        class if class.is_retryable() => StepError::Unavailable(error),
        _ => StepError::Unexpected(error.to_string()),
    }
}

impl From<DriveError> for StepError {
    fn from(error: DriveError) -> StepError {
        StepError::Stop(error)
    }
}

/// Drives runs through the ports `P`.
pub struct Driver<P: Ports> {
    ports: Arc<P>,
    limits: Limits,
    clock: Arc<dyn Clock>,
    owner: String,
    hooks: Hooks,
    writes: AtomicU64,
    crashed: AtomicBool,
    /// Set while a pause hook holds the driver: a stopped process renews nothing.
    paused: AtomicBool,
    /// Set when the lease renewer found another driver holding the run.
    lease_lost: AtomicBool,
    /// Until when (epoch seconds) this driver knows its lease holds: the expiry of its last
    /// successful record write or renewal. Past it, the driver fences itself: another driver may
    /// already have taken the run over, whether or not a renewal said so.
    lease_valid_until: AtomicI64,
    /// The run (id, attempt) whose lease this driver holds, once it holds one.
    leased_run: Mutex<Option<(String, u32)>>,
    trace: Mutex<Vec<TraceEvent>>,
}

impl<P: Ports> Driver<P> {
    /// A driver with a fresh, unique lease owner id.
    pub fn new(ports: Arc<P>, limits: Limits, clock: Arc<dyn Clock>, hooks: Hooks) -> Driver<P> {
        let owner = format!("pid{}-{:012x}", std::process::id(), clock.random_u64() & 0xffff_ffff_ffff);
        Driver {
            ports,
            limits,
            clock,
            owner,
            hooks,
            writes: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            lease_lost: AtomicBool::new(false),
            lease_valid_until: AtomicI64::new(i64::MAX),
            leased_run: Mutex::new(None),
            trace: Mutex::new(Vec::new()),
        }
    }

    /// This driver's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// From now on this driver holds `record`'s lease, until the expiry written in it.
    fn hold_lease(&self, record: &RunRecord) {
        *self.leased_run.lock().expect("lease lock") = Some((record.run_id.clone(), record.run_attempt));
        self.lease_valid_until.store(record.lease.expires_at.unix_secs(), Ordering::SeqCst);
    }

    fn record_event(&self, event: TraceEvent) {
        self.trace.lock().expect("trace lock").push(event);
    }

    /// Runs one AWS write, counting it for the test hooks. Refuses to start it once this
    /// driver's lease may have passed to another driver.
    async fn write<T>(&self, call: impl std::future::Future<Output = T>) -> Result<T, DriveError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(DriveError::Crashed { writes: self.writes.load(Ordering::SeqCst) });
        }
        if self.lease_lost.load(Ordering::SeqCst) {
            return Err(DriveError::LeaseLost { run_id: String::new() });
        }
        if self.clock.now().unix_secs() >= self.lease_valid_until.load(Ordering::SeqCst) {
            self.revalidate_lease().await?;
        }
        let value = call.await;
        if self.lease_lost.load(Ordering::SeqCst) {
            // The renewer saw another driver take over: stop instead of acting on. The write
            // that just ran was idempotent and the same the new driver makes.
            return Err(DriveError::LeaseLost { run_id: String::new() });
        }
        let count = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hooks.crash_after_writes == Some(count) {
            self.crashed.store(true, Ordering::SeqCst);
        }
        if self.crashed.load(Ordering::SeqCst) {
            // A call that was in flight when another one hit the crash point also stops; the
            // error names the crash point, not the order in which the calls came back.
            return Err(DriveError::Crashed { writes: self.hooks.crash_after_writes.unwrap_or(count) });
        }
        if let Some((at, paused, resume)) = &self.hooks.pause_after_writes {
            if *at == count {
                self.paused.store(true, Ordering::SeqCst);
                paused.notify_one();
                resume.notified().await;
                self.paused.store(false, Ordering::SeqCst);
            }
        }
        Ok(value)
    }

    /// Starts a run from its spec; for a run id and attempt that already have a record, continues
    /// that run (same spec) or refuses (different spec).
    pub async fn start(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        let span = info_span!("run", run_id = %spec.run_id, attempt = spec.attempt());
        Box::pin(self.start_inner(spec).instrument(span)).await
    }

    async fn start_inner(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        let canonical = spec.to_canonical_json();
        let spec_digest = record::digest(&canonical);
        let now = self.clock.now();
        let reconciliation = core::reconcile(&spec);
        info!(outcome = ?reconciliation.input, reason = %reconciliation.reason, "reconciled");
        let (mut input, mut reason) = (reconciliation.input, reconciliation.reason.clone());
        let mut queue_urls = BTreeMap::new();
        let mut error = None;
        if input == Input::ReconciledShortfall {
            match self.resolve_queues(&spec).await {
                Ok(urls) => queue_urls = urls,
                Err(ResolveError::Spec(error)) => {
                    // A repeated `run` of an existing run reports that run, even if the pool's
                    // configuration changed since.
                    if let Some(existing) =
                        self.ports.load_run(&spec.run_id, spec.attempt()).await.map_err(not_started)?
                    {
                        return Box::pin(self.rejoin(existing, &spec_digest)).await;
                    }
                    return Err(DriveError::InvalidSpec(error));
                }
                // Nothing is written yet: a missing table, AWS under load, or AWS unavailable for
                // now under `Stall`, is reported as such, and the same `run` can be repeated.
                Err(ResolveError::Aws(aws))
                    if aws.class == ErrorClass::NotFound
                        || aws.class == ErrorClass::Throttling
                        || aws.class == ErrorClass::Permission
                        || (aws.class.is_retryable()
                            && self.limits.on_retries_exhausted == OnRetriesExhausted::Stall) =>
                {
                    return Err(DriveError::NotStarted(aws));
                }
                Err(ResolveError::Aws(aws)) => {
                    // The pool's configuration could not be read: an unexpected error in
                    // Reconciling, which the design sends to emergency cleanup.
                    input = Input::UnexpectedError;
                    reason = format!("could not read the pool configuration: {aws}");
                    error = Some(RunError { kind: "unexpected".into(), message: reason.clone() });
                }
            }
        }
        let (state, _) = machine::next(State::Reconciling, input)?;
        // An abandoned run's record and spec chunks expire together, long after any resume.
        let unfinished_ttl = now.plus_secs(2 * self.limits.retention_days * 86_400).unix_secs();
        let mut record = RunRecord {
            schema_version: RUN_RECORD_SCHEMA_VERSION,
            run_id: spec.run_id.clone(),
            run_attempt: spec.attempt(),
            version: 1,
            state,
            spec_digest: spec_digest.clone(),
            spec_chunks: 0,
            instance_count: spec.instance_count() as u32,
            created_at: now,
            updated_at: now,
            // Reconciling has no side effects: it completes in memory, and the first write
            // records it together with the state it chose.
            history: vec![
                HistoryEntry { state: State::Reconciling, at: now, reason: "run started".into() },
                HistoryEntry { state, at: now, reason },
            ],
            commit_threshold: None,
            idle_threshold: None,
            queue_urls,
            messages_sent: Vec::new(),
            refused_at_create: Vec::new(),
            error,
            lease: Lease { owner: self.owner.clone(), expires_at: now.plus_secs(self.limits.lease_secs) },
            ttl: Some(unfinished_ttl),
        };
        set_entry_thresholds(&mut record, &spec, now);
        let chunks = record::split_spec(&canonical);
        record.spec_chunks = chunks.len() as u32;
        // No read first: creating the record is conditional, and a run id that already has one
        // gets it back from the refused create (one round trip either way).
        //
        // The fast path: when they fit in one transaction, the record is created together with
        // its state's transitions, so the state is persisted *with* its first effects, not
        // before them, and a crash leaves both or neither. A commit is then created already
        // `Done`: one request for the whole run. If an instance refuses, nothing was written,
        // and the staged path below finds and handles the refusal as it always did.
        if let Some((fast, transitions)) = self.fast_path(&record, &spec, chunks.len(), now) {
            match Box::pin(self.create(&fast, &chunks, unfinished_ttl, &transitions, now, &spec_digest)).await? {
                Created::Landed(landed) => {
                    self.hold_lease(&landed);
                    self.record_event(TraceEvent::CreatedWith {
                        state: landed.state,
                        to: transitions[0].new_state,
                        ids: transitions.iter().map(|t| t.instance_id.clone()).collect(),
                    });
                    info!(state = %landed.state, transitions = transitions.len(), "run persisted with its transitions");
                    if landed.state.is_terminal() {
                        info!(state = %landed.state, "run finished");
                        return Ok(self.outcome(landed, spec));
                    }
                    return self.drive_preapplied(landed, spec).await;
                }
                Created::Other(outcome) => return outcome,
                Created::Refused(refused) => {
                    info!(refused = ?refused, "the one-transaction path was refused; taking the staged path");
                    record.refused_at_create = refused;
                }
            }
        }
        match Box::pin(self.create(&record, &chunks, unfinished_ttl, &[], now, &spec_digest)).await? {
            Created::Landed(landed) => record = landed,
            Created::Other(outcome) => return outcome,
            Created::Refused(_) => unreachable!("no transition rode along"),
        }
        self.hold_lease(&record);
        self.record_event(TraceEvent::Persisted { state: record.state });
        info!(state = %record.state, "run persisted");
        Box::pin(self.drive(record, spec, false)).await
    }

    /// The one-transaction form of a new run, when it fits: a commit created already `Done` with
    /// every commit transition, or a rollback created in `RollingBack` with every release.
    fn fast_path(
        &self,
        record: &RunRecord,
        spec: &Spec,
        chunks: usize,
        now: Timestamp,
    ) -> Option<(RunRecord, Vec<InstanceTransition>)> {
        let count = spec.instance_count();
        // A later attempt acts only after the earlier ones have finished (`attempts_in_order`),
        // which it cannot know before it has read them: it takes the staged path.
        if record.run_attempt > 1
            || count == 0
            || count > self.limits.one_transaction_max_instances
            || chunks + 1 + count > core::MAX_TRANSACTION_ITEMS
        {
            return None;
        }
        match record.state {
            State::Committing => {
                let threshold = record.commit_threshold.expect("set at entry");
                let mut done = record.clone();
                done.state = State::Done;
                done.history.push(HistoryEntry {
                    state: State::Done,
                    at: now,
                    reason: format!("{count} instances committed"),
                });
                done.ttl = Some(now.plus_secs(self.limits.retention_days * 86_400).unix_secs());
                done.lease.expires_at = now;
                Some((done, core::commit_transitions(spec, threshold)))
            }
            State::RollingBack => {
                let threshold = record.idle_threshold.expect("set at entry");
                Some((record.clone(), core::release_transitions(spec, threshold, &HashSet::new())))
            }
            _ => None,
        }
    }

    /// Creates `record` (with `transitions` riding along), telling a landed create from an
    /// existing run and from a refused transition. A create whose answer was lost is read back
    /// before the run reports that nothing was written.
    async fn create(
        &self,
        record: &RunRecord,
        chunks: &[String],
        ttl: i64,
        transitions: &[InstanceTransition],
        now: Timestamp,
        spec_digest: &str,
    ) -> Result<Created, DriveError> {
        let created = self.create_within_throttle_budget(record, chunks, ttl, transitions, now).await?;
        match created {
            Ok(CreateOutcome::Created) => Ok(Created::Landed(record.clone())),
            Ok(CreateOutcome::Exists(existing)) => {
                Ok(Created::Other(Box::pin(self.rejoin(*existing, spec_digest)).await))
            }
            Ok(CreateOutcome::EffectsRefused(results)) => Ok(Created::Refused(
                transitions
                    .iter()
                    .zip(results)
                    .filter(|(_, result)| matches!(result, crate::core::WriteResult::Rejected(_)))
                    .map(|(transition, _)| transition.instance_id.clone())
                    .collect(),
            )),
            Err(StoreError::Aws(aws)) if aws.class.is_retryable() => {
                // The create may have landed with its answer lost: look before saying that
                // nothing was written.
                match self.ports.load_run(&record.run_id, record.run_attempt).await {
                    Ok(Some(existing)) if existing.lease.owner == self.owner && existing.version == 1 => {
                        info!("the create landed although its answer was lost");
                        Ok(Created::Landed(existing))
                    }
                    Ok(Some(existing)) => Ok(Created::Other(Box::pin(self.rejoin(existing, spec_digest)).await)),
                    // Throttling outlasted the budget: the run stops with nothing written, and
                    // does not try the staged path under the same load.
                    Ok(None) if aws.class == ErrorClass::Throttling => Err(DriveError::NotStarted(aws)),
                    Ok(None) if !transitions.is_empty() => Ok(Created::Refused(Vec::new())),
                    Ok(None) => Err(DriveError::NotStarted(aws)),
                    Err(check) => Err(DriveError::Uncertain { run_id: record.display_name(), error: aws, check }),
                }
            }
            Err(other) => Err(not_started(other)),
        }
    }

    /// Sends the creating transaction again, with backoff, while DynamoDB throttles it (the whole
    /// request, or any of its items), for as long as the throttle budget lasts: like every other
    /// write of a run. A throttled transaction writes nothing, so sending it again is safe; a
    /// create that landed with its answer lost is recognised by `create_run` as this driver's.
    /// Past the budget, the last throttle comes back as a retryable `Aws` error (for
    /// `EffectsRefused`, one is made up), which `create` reads back and reports as
    /// `NotStarted` with class `Throttling` (exit 3).
    async fn create_within_throttle_budget(
        &self,
        record: &RunRecord,
        chunks: &[String],
        ttl: i64,
        transitions: &[InstanceTransition],
        now: Timestamp,
    ) -> Result<Result<CreateOutcome, StoreError>, DriveError> {
        let mut throttled_since: Option<tokio::time::Instant> = None;
        let mut round = 0;
        loop {
            let created = self.write(self.ports.create_run(record, chunks, ttl, transitions, now)).await?;
            let throttled = match &created {
                Err(StoreError::Aws(aws)) => aws.class == ErrorClass::Throttling,
                // Only throttled items (no refusal): the same transaction may land later.
                Ok(CreateOutcome::EffectsRefused(results)) => {
                    results.contains(&core::WriteResult::Throttled)
                        && results
                            .iter()
                            .all(|r| matches!(r, core::WriteResult::Throttled | core::WriteResult::Cancelled))
                }
                _ => false,
            };
            if !throttled {
                return Ok(created);
            }
            let since = *throttled_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= self.limits.throttle_budget {
                return Ok(Err(StoreError::Aws(AwsError {
                    service: "DynamoDB",
                    operation: "TransactWriteItems",
                    code: Some("ThrottlingError".into()),
                    message: format!(
                        "creating the run record was still throttled after {} s (the throttle budget)",
                        self.limits.throttle_budget.as_secs()
                    ),
                    class: ErrorClass::Throttling,
                })));
            }
            round += 1;
            warn!(round, "the creating transaction was throttled; sending it again within the throttle budget");
            tokio::time::sleep(self.backoff(round)).await;
        }
    }

    /// A `run` for an existing run id and attempt: same spec continues or reports it; another
    /// spec is refused.
    async fn rejoin(&self, existing: RunRecord, spec_digest: &str) -> Result<RunOutcome, DriveError> {
        if existing.spec_digest != spec_digest {
            return Err(DriveError::SpecMismatch { run_id: existing.display_name() });
        }
        self.resume_record(existing, false).await
    }

    /// Continues the latest attempt of an unfinished run from its persisted state; a finished
    /// one reports its outcome.
    pub async fn resume(&self, run_id: &str) -> Result<RunOutcome, DriveError> {
        self.resume_attempt(run_id, None, false).await
    }

    /// Like [`Driver::resume`]; with `force`, takes the lease even though it has not ended. Only
    /// for a driver known to be dead (its process was killed): if it is alive after all, its
    /// next write is refused (the version fence), so it stops instead of acting on.
    pub async fn resume_with(&self, run_id: &str, force: bool) -> Result<RunOutcome, DriveError> {
        self.resume_attempt(run_id, None, force).await
    }

    /// Like [`Driver::resume_with`], for one attempt of the run (`None`: the latest).
    pub async fn resume_attempt(
        &self,
        run_id: &str,
        attempt: Option<u32>,
        force: bool,
    ) -> Result<RunOutcome, DriveError> {
        let span = info_span!("run", run_id = %run_id, attempt = attempt.unwrap_or(0));
        async {
            let record = self.load_attempt(run_id, attempt).await.map_err(DriveError::Store)?;
            let record = record.ok_or_else(|| DriveError::NoSuchRun {
                run_id: attempt.map_or(run_id.to_string(), |a| record::record_identifier(run_id, a)),
            })?;
            Box::pin(self.resume_record(record, force)).await
        }
        .instrument(span)
        .await
    }

    /// One attempt's record, or the latest attempt's.
    pub async fn load_attempt(&self, run_id: &str, attempt: Option<u32>) -> Result<Option<RunRecord>, StoreError> {
        match attempt {
            Some(attempt) => self.ports.load_run(run_id, attempt).await,
            None => Ok(self.ports.load_attempts(run_id).await?.pop()),
        }
    }

    async fn resume_record(&self, record: RunRecord, force: bool) -> Result<RunOutcome, DriveError> {
        match self.take_over(record, force).await? {
            TakeOver::Finished(outcome) => Ok(*outcome),
            TakeOver::Taken(record, spec) => {
                info!(state = %record.state, "resuming");
                Box::pin(self.drive(record, spec, true)).await
            }
        }
    }

    /// Takes the lease of an unfinished run (conditional on the version read, so two resumers
    /// cannot both win); reports a finished one.
    async fn take_over(&self, mut record: RunRecord, force: bool) -> Result<TakeOver, DriveError> {
        let spec_text = self
            .ports
            .load_spec(&record.run_id, &record.spec_digest, record.spec_chunks)
            .await
            .map_err(DriveError::Store)?;
        let spec =
            Spec::from_json(&spec_text).map_err(|error| DriveError::Store(StoreError::Corrupt(error.to_string())))?;
        if record.state.is_terminal() {
            return Ok(TakeOver::Finished(Box::new(self.outcome(record, spec))));
        }
        let now = self.clock.now();
        if record.lease_active(now) && record.lease.owner != self.owner && !force {
            return Err(DriveError::Busy {
                run_id: record.display_name(),
                owner: record.lease.owner.clone(),
                until: record.lease.expires_at,
            });
        }
        let mut taken = record.clone();
        taken.version += 1;
        taken.updated_at = now;
        taken.lease = Lease { owner: self.owner.clone(), expires_at: now.plus_secs(self.limits.lease_secs) };
        self.hold_lease(&taken);
        match self.write(self.ports.replace_run(&taken, record.version)).await? {
            Ok(()) => record = taken,
            Err(StoreError::VersionConflict { .. }) => {
                let current =
                    self.ports.load_run(&record.run_id, record.run_attempt).await.map_err(DriveError::Store)?;
                let (owner, until) =
                    current.map(|r| (r.lease.owner, r.lease.expires_at)).unwrap_or_else(|| ("unknown".into(), now));
                return Err(DriveError::Busy { run_id: record.display_name(), owner, until });
            }
            Err(error) => return Err(DriveError::Store(error)),
        }
        Ok(TakeOver::Taken(record, spec))
    }

    fn outcome(&self, record: RunRecord, spec: Spec) -> RunOutcome {
        let kind = OutcomeKind::of(&record).expect("outcome of a terminal record");
        RunOutcome {
            kind,
            record,
            spec,
            trace: self.trace.lock().expect("trace lock").clone(),
            writes: self.writes.load(Ordering::SeqCst),
        }
    }

    /// Drives a run this driver holds to a terminal state, renewing its lease meanwhile, after
    /// putting it in order with the other attempts of its run ([`Driver::attempts_in_order`]).
    async fn drive(&self, record: RunRecord, spec: Spec, resumed: bool) -> Result<RunOutcome, DriveError> {
        // Boxed: the futures of a run's whole life are large, and a test thread's stack is not.
        let effects = match Box::pin(self.attempts_in_order(&record, &spec, resumed)).await {
            Ok(effects) => effects,
            Err(error) => {
                if matches!(error, DriveError::Stalled { .. } | DriveError::Busy { .. }) {
                    self.release_lease(&record.run_id, record.run_attempt).await;
                }
                return Err(error);
            }
        };
        Box::pin(self.drive_with(record, spec, effects, resumed)).await
    }

    /// Drives a rollback whose release transitions landed with the record's creation: the first
    /// stage does not send them again.
    async fn drive_preapplied(&self, record: RunRecord, spec: Spec) -> Result<RunOutcome, DriveError> {
        let effects = spec.clone();
        Box::pin(self.drive_inner(record, spec, effects, false, true)).await
    }

    /// The state loop with the lease renewed beside it. A run that stops on its own (stalled)
    /// gives its lease back, so the `resume` its exit code asks for is not refused.
    async fn drive_with(
        &self,
        record: RunRecord,
        spec: Spec,
        effects: Spec,
        resumed: bool,
    ) -> Result<RunOutcome, DriveError> {
        self.drive_inner(record, spec, effects, resumed, false).await
    }

    async fn drive_inner(
        &self,
        record: RunRecord,
        spec: Spec,
        effects: Spec,
        resumed: bool,
        preapplied: bool,
    ) -> Result<RunOutcome, DriveError> {
        let (run_id, attempt, name) = (record.run_id.clone(), record.run_attempt, record.display_name());
        let driving = Box::pin(self.drive_states(record, spec, effects, resumed, preapplied));
        let renewing = self.renew_lease_periodically(&run_id, attempt);
        tokio::pin!(driving);
        // The renewer never finishes by itself; when driving ends, so does renewal.
        let result = tokio::select! {
            result = &mut driving => result,
            () = renewing => driving.await,
        };
        match result {
            Err(DriveError::LeaseLost { .. }) => Err(DriveError::LeaseLost { run_id: name }),
            Err(error @ DriveError::Stalled { .. }) => {
                self.release_lease(&run_id, attempt).await;
                Err(error)
            }
            other => other,
        }
    }

    /// Re-runs share the run id in every instance record, so two attempts' writes cannot be told
    /// apart by their conditions. Attempts therefore act one after the other: before a later
    /// attempt acts, every earlier unfinished one is driven to its end (or, when its driver
    /// still holds it, this one stops, `Busy`, naming it). And an earlier attempt resumed after a
    /// later one exists leaves the later one's instances alone. Returns the spec whose instances
    /// this run may act on.
    async fn attempts_in_order(&self, record: &RunRecord, spec: &Spec, resumed: bool) -> Result<Spec, DriveError> {
        // A first attempt started now has no earlier attempt, and a later one would only start
        // after it: only resumes and re-runs need to look.
        if record.run_attempt <= 1 && !resumed {
            return Ok(spec.clone());
        }
        let attempts =
            self.ports.load_attempts(&record.run_id).await.map_err(|error| self.store_stall(record, error))?;
        for earlier in attempts.iter().filter(|other| other.run_attempt < record.run_attempt) {
            if earlier.state.is_terminal() {
                continue;
            }
            info!(attempt = earlier.run_attempt, "finishing an earlier attempt of this run first");
            let driver = Driver::new(self.ports.clone(), self.limits.clone(), self.clock.clone(), Hooks::default());
            let finishing = async {
                match driver.take_over(earlier.clone(), false).await? {
                    TakeOver::Finished(outcome) => Ok(*outcome),
                    TakeOver::Taken(earlier_record, earlier_spec) => {
                        // This attempt's instances, and any later one's, are not the earlier's.
                        let later: HashSet<String> = self
                            .later_instances(&attempts, earlier_record.run_attempt, spec, record.run_attempt)
                            .await?;
                        let effects = without_instances(&driver, &earlier_spec, &later);
                        driver.drive_with(earlier_record, earlier_spec, effects, true).await
                    }
                }
            };
            match Box::pin(finishing).await {
                Ok(outcome) => {
                    info!(attempt = earlier.run_attempt, outcome = ?outcome.kind, "earlier attempt finished")
                }
                Err(error @ DriveError::Busy { .. }) => return Err(error),
                Err(error) => {
                    return Err(DriveError::Stalled {
                        run_id: record.display_name(),
                        state: record.state,
                        error: format!(
                            "attempt {} of this run could not be finished first: {error}",
                            earlier.run_attempt
                        ),
                    })
                }
            }
        }
        let protected = self.later_instances(&attempts, record.run_attempt, spec, record.run_attempt).await?;
        Ok(without_instances(self, spec, &protected))
    }

    /// The instances of every attempt after `attempt` (`current`'s spec is at hand).
    async fn later_instances(
        &self,
        attempts: &[RunRecord],
        attempt: u32,
        current: &Spec,
        current_attempt: u32,
    ) -> Result<HashSet<String>, DriveError> {
        let mut later = HashSet::new();
        for other in attempts.iter().filter(|other| other.run_attempt > attempt) {
            if other.run_attempt == current_attempt {
                later.extend(current.instances().map(|(_, instance)| instance.id.clone()));
                continue;
            }
            let text = self
                .ports
                .load_spec(&other.run_id, &other.spec_digest, other.spec_chunks)
                .await
                .map_err(|error| self.store_stall(other, error))?;
            if let Ok(other_spec) = Spec::from_json(&text) {
                later.extend(other_spec.instances().map(|(_, instance)| instance.id.clone()));
            }
        }
        Ok(later)
    }

    fn store_stall(&self, record: &RunRecord, error: StoreError) -> DriveError {
        match error {
            StoreError::Aws(error) => {
                DriveError::Stalled { run_id: record.display_name(), state: record.state, error: error.to_string() }
            }
            other => DriveError::Store(other),
        }
    }

    /// `spec` is the run's spec as stored; `effects` the same without instances a later attempt
    /// of the run holds (see [`Driver::attempts_in_order`]), which is what the side effects use.
    /// `preapplied`: the first state's transitions landed with the record's creation.
    async fn drive_states(
        &self,
        mut record: RunRecord,
        spec: Spec,
        effects: Spec,
        resumed: bool,
        mut preapplied: bool,
    ) -> Result<RunOutcome, DriveError> {
        loop {
            let state = record.state;
            let span = info_span!("state", state = %state);
            let step = async {
                match state {
                    State::Reconciling => {
                        // Not persisted as a current state by this build; handled for records
                        // written by other tools or later formats.
                        let reconciliation = core::reconcile(&spec);
                        Ok((reconciliation.input, reconciliation.reason))
                    }
                    State::Committing => self
                        .commit(&effects, &mut record, resumed)
                        .await
                        .map(|reason| (Input::ActionsCompleted, reason)),
                    State::RollingBack => self
                        .roll_back(&effects, &mut record, std::mem::take(&mut preapplied))
                        .await
                        .map(|()| (Input::ActionsCompleted, "claimed instances returned to the pool".to_string())),
                    State::EmergencyCleanup => Box::pin(self.clean_up(&effects, &mut record))
                        .await
                        .map(|n| (Input::ActionsCompleted, format!("{n} instances terminated and purged"))),
                    State::Done | State::Failed => unreachable!("terminal states are not driven"),
                }
            }
            .instrument(span)
            .await;
            let stalled = |error: String| DriveError::Stalled { run_id: record.display_name(), state, error };
            match step {
                Ok((input, reason)) => {
                    let error = match (state, input) {
                        (State::RollingBack, Input::ActionsCompleted) => Some(RunError {
                            kind: "shortfall".into(),
                            message: format!("capacity shortfall: {}", entry_reason(&record, State::RollingBack)),
                        }),
                        _ => None,
                    };
                    self.enter(&mut record, &spec, input, reason, error).await?;
                }
                Err(StepError::Unexpected(message)) if state == State::EmergencyCleanup => {
                    warn!(error = %message, "emergency cleanup could not finish; the run stays resumable");
                    return Err(stalled(message));
                }
                Err(StepError::Unexpected(message)) => {
                    warn!(error = %message, "unexpected error; entering emergency cleanup");
                    let error = RunError { kind: "unexpected".into(), message: message.clone() };
                    self.enter(&mut record, &spec, Input::UnexpectedError, message, Some(error)).await?;
                }
                Err(StepError::NotYet(message)) => {
                    warn!(error = %message, "waiting for AWS to catch up; the run stays resumable in its state");
                    return Err(stalled(message));
                }
                Err(StepError::Throttled(error)) => {
                    warn!(error = %error, "AWS is throttling past the throttle budget; the run stays resumable in its state");
                    return Err(stalled(format!("{error} (throttled past the throttle budget)")));
                }
                Err(StepError::Unavailable(error))
                    if state == State::EmergencyCleanup
                        || self.limits.on_retries_exhausted == OnRetriesExhausted::Stall =>
                {
                    warn!(error = %error, "AWS is unavailable; the run stays resumable in its state");
                    return Err(stalled(error.to_string()));
                }
                Err(StepError::Unavailable(error)) => {
                    // The step's retry budget is spent: as the design says, its error is
                    // unexpected. If AWS is down altogether, this write fails too and the run
                    // stays resumable in its current state.
                    let message = format!("{error} (retries exhausted)");
                    warn!(error = %message, "AWS still failing after retries; entering emergency cleanup");
                    let error = RunError { kind: "unexpected".into(), message: message.clone() };
                    self.enter(&mut record, &spec, Input::UnexpectedError, message, Some(error)).await?;
                }
                Err(StepError::Stop(error)) => return Err(error),
            }
            if record.state.is_terminal() {
                info!(state = %record.state, "run finished");
                return Ok(self.outcome(record, spec));
            }
        }
    }

    /// Writes the next state before its side effects run.
    async fn enter(
        &self,
        record: &mut RunRecord,
        spec: &Spec,
        input: Input,
        reason: String,
        error: Option<RunError>,
    ) -> Result<(), DriveError> {
        let (to, _) = machine::next(record.state, input)?;
        let now = self.clock.now();
        let mut next = record.clone();
        next.state = to;
        next.version += 1;
        next.updated_at = now;
        next.history.push(HistoryEntry { state: to, at: now, reason });
        if error.is_some() {
            next.error = error;
        }
        set_entry_thresholds(&mut next, spec, now);
        if to.is_terminal() {
            next.ttl = Some(now.plus_secs(self.limits.retention_days * 86_400).unix_secs());
            // Release the lease so a status or resume need not wait for it.
            next.lease.expires_at = now;
        } else {
            next.lease.expires_at = now.plus_secs(self.limits.lease_secs);
        }
        self.persist(record, next).await?;
        info!(state = %to, "entered");
        Ok(())
    }

    async fn persist(&self, record: &mut RunRecord, next: RunRecord) -> Result<(), DriveError> {
        match self.write(self.ports.replace_run(&next, record.version)).await? {
            Ok(()) => {
                self.record_event(TraceEvent::Persisted { state: next.state });
                if !next.state.is_terminal() {
                    self.lease_valid_until.store(next.lease.expires_at.unix_secs(), Ordering::SeqCst);
                }
                *record = next;
                Ok(())
            }
            Err(StoreError::VersionConflict { .. }) => Err(DriveError::LeaseLost { run_id: record.display_name() }),
            Err(StoreError::Aws(error)) => Err(DriveError::Stalled {
                run_id: record.display_name(),
                state: record.state,
                error: error.to_string(),
            }),
            Err(error) => Err(DriveError::Store(error)),
        }
    }

    async fn resolve_queues(&self, spec: &Spec) -> Result<BTreeMap<String, String>, ResolveError> {
        // The table's configuration is read even when the spec carries its own: the pool's item
        // is the authority, and a spec's config that disagrees with it is refused (issue 13).
        let pool = self.ports.load_resource_class_config().await.map_err(|error| match error {
            StoreError::Aws(aws) => ResolveError::Aws(aws),
            other => ResolveError::Spec(SpecError {
                field: "resourceClassConfig".into(),
                problem: format!("the table's metadata item is unusable: {other}"),
            }),
        })?;
        spec.check_config_against_pool(pool.as_ref(), self.limits.queue_urls).map_err(ResolveError::Spec)?;
        let config = spec.resource_class_config.clone().or(pool);
        let mut urls = BTreeMap::new();
        let lists = [("selection", &spec.selection.instances), ("creation", &spec.creation.instances)];
        for (list, instances) in lists {
            for (index, instance) in instances.iter().enumerate() {
                match config.as_ref().and_then(|config| config.get(&instance.resource_class)) {
                    Some(class) => {
                        urls.insert(instance.resource_class.clone(), class.queue_url.clone());
                    }
                    None => {
                        return Err(ResolveError::Spec(SpecError {
                            field: format!("{list}.instances[{index}].resourceClass"),
                            problem: format!(
                                "resource class {:?} has no pool queue in resourceClassConfig{}; returning the instance to its pool needs one",
                                instance.resource_class,
                                if spec.resource_class_config.is_none() { " (read from the table's TYPE#METADATA resource_class_config item)" } else { "" }
                            ),
                        }))
                    }
                }
            }
        }
        Ok(urls)
    }
}

enum Created {
    /// The record (with any transitions that rode along) is in the table, as given.
    Landed(RunRecord),
    /// The run id and attempt already had a record: that run's outcome (continued or reported).
    Other(Result<RunOutcome, DriveError>),
    /// A transition that rode along was refused (or the transaction failed): nothing was
    /// written. The instances whose conditions failed.
    Refused(Vec<String>),
}

enum TakeOver {
    Finished(Box<RunOutcome>),
    Taken(RunRecord, Spec),
}

/// `spec` without the instances in `protected`, each reported as left alone.
fn without_instances<P: Ports>(driver: &Driver<P>, spec: &Spec, protected: &HashSet<String>) -> Spec {
    let mut effects = spec.clone();
    if protected.is_empty() {
        return effects;
    }
    for (_, instance) in spec.instances().filter(|(_, instance)| protected.contains(&instance.id)) {
        warn!(instance = %instance.id, "left alone: a later attempt of this run holds it");
        driver.record_event(TraceEvent::Found {
            id: instance.id.clone(),
            finding: "held by a later attempt of this run".into(),
        });
    }
    effects.selection.instances.retain(|instance| !protected.contains(&instance.id));
    effects.creation.instances.retain(|instance| !protected.contains(&instance.id));
    effects
}

enum ResolveError {
    Spec(SpecError),
    Aws(AwsError),
}

fn not_started(error: StoreError) -> DriveError {
    match error {
        StoreError::Aws(error) => DriveError::NotStarted(error),
        other => DriveError::Store(other),
    }
}

/// Thresholds are computed once, when their state is entered, and stored with it.
fn set_entry_thresholds(record: &mut RunRecord, spec: &Spec, now: Timestamp) {
    match record.state {
        State::Committing if record.commit_threshold.is_none() => {
            record.commit_threshold = Some(now.plus_secs(spec.max_runtime_min * 60));
        }
        State::RollingBack if record.idle_threshold.is_none() => {
            record.idle_threshold = Some(now.plus_secs(spec.idle_time_sec));
        }
        _ => {}
    }
}

fn entry_reason(record: &RunRecord, state: State) -> String {
    record.history.iter().rev().find(|entry| entry.state == state).map(|entry| entry.reason.clone()).unwrap_or_default()
}

/// When the run last entered `state`: the stable threshold of the marks that state writes.
fn entered_at(record: &RunRecord, state: State) -> Timestamp {
    record.history.iter().rev().find(|entry| entry.state == state).map(|entry| entry.at).unwrap_or(record.created_at)
}

fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > SHOWN {
        text.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    text
}
