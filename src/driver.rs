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

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use tracing::{info, info_span, warn, Instrument};

use crate::config::{Limits, OnRetriesExhausted};
use crate::core::{
    self, classify_transition, cleanup_terminates, rollback_disposition, Finding, InstanceDeletion, InstanceState,
    InstanceTransition, PoolMessage, RollbackDisposition, WriteResult,
};
use crate::machine::{self, Input, InvalidTransition, State};
use crate::ports::{AwsError, CreateOutcome, ErrorClass, OutgoingMessage, Ports, StoreError};
use crate::record::{self, HistoryEntry, Lease, RunError, RunRecord, RUN_RECORD_SCHEMA_VERSION};
use crate::spec::{PoolInstance, Role, Spec, SpecError};
use crate::timestamp::Timestamp;

/// Where the driver reads the time. Tests and simulations supply their own.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Timestamp;
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
    /// Another driver holds the run's lease.
    #[error("run {run_id} is being driven by {owner} (lease ends {until})")]
    Busy {
        /// The run id.
        run_id: String,
        /// The lease holder.
        owner: String,
        /// When its lease ends.
        until: Timestamp,
    },
    /// This driver's lease was taken over; it stopped at its next write.
    #[error("run {run_id}: this driver lost its lease and stopped (another driver took over)")]
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
    /// AWS still failed with a retryable error (throttling, 5xx, timeout, dropped connection)
    /// once the SDK's retries were spent. Nothing is wrong with the run, so it must not fall into
    /// emergency cleanup (which would terminate a healthy fleet): it stops where it is, resumable.
    Unavailable(AwsError),
    Stop(DriveError),
}

/// A side effect's AWS error, decided by its class: retryable ones stall the run, others are
/// unexpected.
fn aws_step_error(error: AwsError) -> StepError {
    if error.class.is_retryable() {
        StepError::Unavailable(error)
    } else {
        StepError::Unexpected(error.to_string())
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
    trace: Mutex<Vec<TraceEvent>>,
}

impl<P: Ports> Driver<P> {
    /// A driver with a fresh, unique lease owner id.
    pub fn new(ports: Arc<P>, limits: Limits, clock: Arc<dyn Clock>, hooks: Hooks) -> Driver<P> {
        let owner = format!("pid{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..12]);
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
            trace: Mutex::new(Vec::new()),
        }
    }

    /// This driver's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn record_event(&self, event: TraceEvent) {
        self.trace.lock().expect("trace lock").push(event);
    }

    /// Runs one AWS write, counting it for the test hooks.
    async fn write<T>(&self, call: impl std::future::Future<Output = T>) -> Result<T, DriveError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(DriveError::Crashed { writes: self.writes.load(Ordering::SeqCst) });
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

    /// Starts a run from its spec; for a run id that already has a record, continues that run
    /// (same spec) or refuses (different spec).
    pub async fn start(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        let span = info_span!("run", run_id = %spec.run_id);
        self.start_inner(spec).instrument(span).await
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
                    if let Some(existing) = self.ports.load_run(&spec.run_id).await.map_err(not_started)? {
                        return self.rejoin(existing, &spec_digest).await;
                    }
                    return Err(DriveError::InvalidSpec(error));
                }
                // Nothing is written yet: a missing table, or AWS unavailable for now, is reported
                // as such, and the same `run` can simply be repeated.
                Err(ResolveError::Aws(aws))
                    if aws.class == ErrorClass::NotFound
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
            error,
            lease: Lease { owner: self.owner.clone(), expires_at: now.plus_secs(self.limits.lease_secs) },
            ttl: Some(unfinished_ttl),
        };
        set_entry_thresholds(&mut record, &spec, now);
        let chunks = record::split_spec(&canonical);
        record.spec_chunks = chunks.len() as u32;
        // No read first: creating the record is conditional, and a run id that already has one
        // gets it back from the refused create (one round trip either way).
        match self.write(self.ports.create_run(&record, &chunks, unfinished_ttl)).await?.map_err(not_started)? {
            CreateOutcome::Created => {}
            CreateOutcome::Exists(existing) => return self.rejoin(*existing, &spec_digest).await,
        }
        self.record_event(TraceEvent::Persisted { state: record.state });
        info!(state = %record.state, "run persisted");
        self.drive(record, spec).await
    }

    /// A `run` for an existing run id: same spec continues or reports it; another spec is refused.
    async fn rejoin(&self, existing: RunRecord, spec_digest: &str) -> Result<RunOutcome, DriveError> {
        if existing.spec_digest != spec_digest {
            return Err(DriveError::SpecMismatch { run_id: existing.run_id });
        }
        self.resume_record(existing, false).await
    }

    /// Continues an unfinished run from its persisted state; a finished one reports its outcome.
    pub async fn resume(&self, run_id: &str) -> Result<RunOutcome, DriveError> {
        self.resume_with(run_id, false).await
    }

    /// Like [`Driver::resume`]; with `force`, takes the lease even though it has not ended. Only
    /// for a driver known to be dead (its process was killed): if it is alive after all, its
    /// next write is refused (the version fence), so it stops instead of acting on.
    pub async fn resume_with(&self, run_id: &str, force: bool) -> Result<RunOutcome, DriveError> {
        let span = info_span!("run", run_id = %run_id);
        async {
            let record = self.ports.load_run(run_id).await.map_err(DriveError::Store)?;
            let record = record.ok_or_else(|| DriveError::NoSuchRun { run_id: run_id.to_string() })?;
            self.resume_record(record, force).await
        }
        .instrument(span)
        .await
    }

    async fn resume_record(&self, mut record: RunRecord, force: bool) -> Result<RunOutcome, DriveError> {
        let spec_text = self
            .ports
            .load_spec(&record.run_id, &record.spec_digest, record.spec_chunks)
            .await
            .map_err(DriveError::Store)?;
        let spec =
            Spec::from_json(&spec_text).map_err(|error| DriveError::Store(StoreError::Corrupt(error.to_string())))?;
        if record.state.is_terminal() {
            return Ok(self.outcome(record, spec));
        }
        let now = self.clock.now();
        if record.lease_active(now) && record.lease.owner != self.owner && !force {
            return Err(DriveError::Busy {
                run_id: record.run_id.clone(),
                owner: record.lease.owner.clone(),
                until: record.lease.expires_at,
            });
        }
        // Take the lease over: conditional on the version read, so two resumers cannot both win.
        let mut taken = record.clone();
        taken.version += 1;
        taken.updated_at = now;
        taken.lease = Lease { owner: self.owner.clone(), expires_at: now.plus_secs(self.limits.lease_secs) };
        match self.write(self.ports.replace_run(&taken, record.version)).await? {
            Ok(()) => record = taken,
            Err(StoreError::VersionConflict { .. }) => {
                let current = self.ports.load_run(&record.run_id).await.map_err(DriveError::Store)?;
                let (owner, until) =
                    current.map(|r| (r.lease.owner, r.lease.expires_at)).unwrap_or_else(|| ("unknown".into(), now));
                return Err(DriveError::Busy { run_id: record.run_id.clone(), owner, until });
            }
            Err(error) => return Err(DriveError::Store(error)),
        }
        info!(state = %record.state, "resuming");
        self.drive(record, spec).await
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

    async fn drive(&self, record: RunRecord, spec: Spec) -> Result<RunOutcome, DriveError> {
        let run_id = record.run_id.clone();
        let driving = self.drive_states(record, spec);
        let renewing = self.renew_lease_periodically(&run_id);
        tokio::pin!(driving);
        // The renewer never finishes by itself; when driving ends, so does renewal.
        let result = tokio::select! {
            result = &mut driving => result,
            () = renewing => driving.await,
        };
        match result {
            Err(DriveError::LeaseLost { .. }) => Err(DriveError::LeaseLost { run_id }),
            other => other,
        }
    }

    /// Extends the lease every third of its length while the run is driven, so a long stage
    /// (large fleets, slow AWS) does not let it lapse. A renewal that finds another owner marks
    /// the lease lost; the driver stops at its next write.
    async fn renew_lease_periodically(&self, run_id: &str) {
        let period = std::time::Duration::from_secs((self.limits.lease_secs / 3).max(1) as u64);
        loop {
            tokio::time::sleep(period).await;
            if self.paused.load(Ordering::SeqCst) || self.crashed.load(Ordering::SeqCst) {
                continue;
            }
            let expires_at = self.clock.now().plus_secs(self.limits.lease_secs);
            match self.ports.renew_lease(run_id, &self.owner, expires_at).await {
                Ok(true) => info!(until = %expires_at, "lease renewed"),
                Ok(false) => {
                    warn!("lease taken over by another driver; stopping at the next write");
                    self.lease_lost.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                // A failed renewal is retried next period; the versioned writes still fence.
                Err(error) => warn!(error = %error, "lease renewal failed"),
            }
        }
    }

    async fn drive_states(&self, mut record: RunRecord, spec: Spec) -> Result<RunOutcome, DriveError> {
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
                        .commit(&spec, &mut record)
                        .await
                        .map(|n| (Input::ActionsCompleted, format!("{n} instances committed"))),
                    State::RollingBack => self
                        .roll_back(&spec, &mut record)
                        .await
                        .map(|()| (Input::ActionsCompleted, "claimed instances returned to the pool".to_string())),
                    State::EmergencyCleanup => self
                        .clean_up(&spec, &mut record)
                        .await
                        .map(|n| (Input::ActionsCompleted, format!("{n} instances terminated and purged"))),
                    State::Done | State::Failed => unreachable!("terminal states are not driven"),
                }
            }
            .instrument(span)
            .await;
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
                    return Err(DriveError::Stalled { run_id: record.run_id.clone(), state, error: message });
                }
                Err(StepError::Unexpected(message)) => {
                    warn!(error = %message, "unexpected error; entering emergency cleanup");
                    let error = RunError { kind: "unexpected".into(), message: message.clone() };
                    self.enter(&mut record, &spec, Input::UnexpectedError, message, Some(error)).await?;
                }
                Err(StepError::Unavailable(error))
                    if state == State::EmergencyCleanup
                        || self.limits.on_retries_exhausted == OnRetriesExhausted::Stall =>
                {
                    warn!(error = %error, "AWS is unavailable; the run stays resumable in its state");
                    return Err(DriveError::Stalled { run_id: record.run_id.clone(), state, error: error.to_string() });
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
                *record = next;
                Ok(())
            }
            Err(StoreError::VersionConflict { .. }) => Err(DriveError::LeaseLost { run_id: record.run_id.clone() }),
            Err(StoreError::Aws(error)) => Err(DriveError::Stalled {
                run_id: record.run_id.clone(),
                state: record.state,
                error: error.to_string(),
            }),
            Err(error) => Err(DriveError::Store(error)),
        }
    }

    /// Renews the lease when less than half of it is left; refused when another driver took over.
    async fn checkpoint(&self, record: &mut RunRecord) -> Result<(), StepError> {
        let now = self.clock.now();
        if record.lease.expires_at.unix_secs() - now.unix_secs() > self.limits.lease_secs / 2 {
            return Ok(());
        }
        let mut next = record.clone();
        next.version += 1;
        next.updated_at = now;
        next.lease.expires_at = now.plus_secs(self.limits.lease_secs);
        self.persist(record, next).await.map_err(StepError::Stop)
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

    /// Applies transitions in atomic batches, concurrently, re-sending cancelled items, and reads
    /// what each found.
    async fn run_transitions(
        &self,
        transitions: Vec<InstanceTransition>,
    ) -> Result<Vec<(InstanceTransition, Finding)>, StepError> {
        let now = self.clock.now();
        let results = self
            .run_batched(
                transitions,
                "transition",
                |t| &t.instance_id,
                |batch| TraceEvent::TransitionInstances {
                    to: batch[0].new_state,
                    ids: batch.iter().map(|t| t.instance_id.clone()).collect(),
                },
                move |batch| async move { self.write(self.ports.transition(&batch, now)).await },
            )
            .await?;
        Ok(results
            .into_iter()
            .map(|(transition, result)| {
                let finding = classify_transition(&transition, &result).expect("cancelled writes were re-sent");
                (transition, finding)
            })
            .collect())
    }

    /// Deletes instance records in atomic batches, concurrently, re-sending cancelled items.
    async fn run_deletions(
        &self,
        deletions: Vec<InstanceDeletion>,
    ) -> Result<Vec<(InstanceDeletion, WriteResult)>, StepError> {
        self.run_batched(
            deletions,
            "deletion",
            |d| &d.instance_id,
            |batch| TraceEvent::DeleteRecords { ids: batch.iter().map(|d| d.instance_id.clone()).collect() },
            move |batch| async move { self.write(self.ports.delete(&batch)).await },
        )
        .await
    }

    /// The batching both kinds of instance-record writes share: up to
    /// [`core::MAX_TRANSACTION_ITEMS`] items per atomic transaction, at most `concurrency`
    /// transactions at once, and the items a cancelled transaction did not write (conflicts, or
    /// an other item's failed condition) re-sent alone, with backoff, for at most `batch_rounds`.
    /// Returns every item with its result, never `Cancelled`.
    async fn run_batched<T, Call, Fut>(
        &self,
        items: Vec<T>,
        what: &'static str,
        id: fn(&T) -> &String,
        event: fn(&[T]) -> TraceEvent,
        call: Call,
    ) -> Result<Vec<(T, WriteResult)>, StepError>
    where
        T: Clone,
        Call: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Result<Vec<WriteResult>, AwsError>, DriveError>>,
    {
        let batches: Vec<Vec<T>> = items.chunks(core::MAX_TRANSACTION_ITEMS).map(<[_]>::to_vec).collect();
        let total = batches.len();
        let done = &AtomicU64::new(0);
        let call = &call;
        let results: Vec<Vec<(T, WriteResult)>> = stream::iter(batches)
            .map(|batch| async move {
                let mut pending = batch;
                let mut outcomes = Vec::with_capacity(pending.len());
                for round in 0..self.limits.batch_rounds {
                    if pending.is_empty() {
                        break;
                    }
                    if round > 0 {
                        tokio::time::sleep(backoff(&self.limits, round)).await;
                    }
                    self.record_event(event(&pending));
                    let results = call(pending.clone()).await?.map_err(aws_step_error)?;
                    info!(ids = ?pending.iter().map(id).collect::<Vec<_>>(), "{what} batch written");
                    let mut retry = Vec::new();
                    for (item, result) in pending.into_iter().zip(results) {
                        match result {
                            WriteResult::Cancelled => retry.push(item),
                            other => outcomes.push((item, other)),
                        }
                    }
                    pending = retry;
                }
                if !pending.is_empty() {
                    return Err(StepError::Unexpected(format!(
                        "{} instance {what}s still conflicting after {} rounds: {}",
                        pending.len(),
                        self.limits.batch_rounds,
                        pending.iter().map(|item| id(item).as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                info!(batches_done = finished, batches = total, "{what} batches progress");
                Ok(outcomes)
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect()
            .await?;
        Ok(results.into_iter().flatten().collect())
    }

    /// Path A. Returns how many instances were committed.
    async fn commit(&self, spec: &Spec, record: &mut RunRecord) -> Result<usize, StepError> {
        let threshold = record.commit_threshold.expect("commit threshold is set on entering Committing");
        let transitions = core::commit_transitions(spec, self.clock.now(), threshold);
        let findings = self.run_transitions(transitions).await?;
        let refused: Vec<String> = findings
            .iter()
            .filter(|(_, finding)| *finding != Finding::Done)
            .map(|(transition, finding)| {
                warn!(instance = %transition.instance_id, found = %finding, "instance cannot be committed");
                self.record_event(TraceEvent::Found {
                    id: transition.instance_id.clone(),
                    finding: finding.to_string(),
                });
                format!("{}: {finding}", transition.instance_id)
            })
            .collect();
        if !refused.is_empty() {
            return Err(StepError::Unexpected(format!(
                "commit refused for {} instance(s): {}",
                refused.len(),
                summarize(&refused)
            )));
        }
        Ok(findings.len())
    }

    /// Path B.
    async fn roll_back(&self, spec: &Spec, record: &mut RunRecord) -> Result<(), StepError> {
        let threshold = record.idle_threshold.expect("idle threshold is set on entering RollingBack");
        let transitions = core::release_transitions(spec, self.clock.now(), threshold);
        let findings = self.run_transitions(transitions).await?;
        let by_id: BTreeMap<&str, &PoolInstance> = spec.instances().map(|(_, i)| (i.id.as_str(), i)).collect();
        let already_sent: HashSet<&str> = record.messages_sent.iter().map(String::as_str).collect();
        let mut to_send: Vec<&PoolInstance> = Vec::new();
        let mut to_retire: Vec<String> = Vec::new();
        for (transition, finding) in &findings {
            let id = transition.instance_id.as_str();
            match rollback_disposition(finding) {
                RollbackDisposition::ReturnToPool => {
                    if !already_sent.contains(id) {
                        to_send.push(by_id[id]);
                    }
                }
                RollbackDisposition::Retire => {
                    warn!(instance = id, found = %finding, "not returnable: terminating it and removing its record");
                    self.record_event(TraceEvent::Found { id: id.to_string(), finding: finding.to_string() });
                    to_retire.push(id.to_string());
                }
                RollbackDisposition::LeaveAlone => {
                    warn!(instance = id, found = %finding, "left alone: no longer this run's");
                    self.record_event(TraceEvent::Found { id: id.to_string(), finding: finding.to_string() });
                }
            }
        }
        self.checkpoint(record).await?;
        let sent = Mutex::new(Vec::new());
        let (sending, terminating) =
            tokio::join!(self.send_messages(record, &to_send, threshold, &sent), self.terminate_all(&to_retire));
        record.messages_sent.extend(sent.into_inner().expect("sent lock"));
        sending?;
        terminating?;
        if !to_retire.is_empty() {
            self.checkpoint(record).await?;
            let deletions = to_retire
                .iter()
                .map(|id| InstanceDeletion {
                    instance_id: id.clone(),
                    role: spec.instances().find(|(_, i)| &i.id == id).map(|(r, _)| r).unwrap_or(Role::Created),
                    owner_run_id: Some(spec.run_id.clone()),
                    released_unsent_threshold: None,
                })
                .collect();
            for (deletion, result) in self.run_deletions(deletions).await? {
                if let WriteResult::Rejected(Some(found)) = result {
                    warn!(instance = %deletion.instance_id, state = %found.state, run_id = %found.run_id, "record not removed: no longer this run's");
                }
            }
        }
        Ok(())
    }

    async fn send_messages(
        &self,
        record: &RunRecord,
        instances: &[&PoolInstance],
        threshold: Timestamp,
        sent: &Mutex<Vec<String>>,
    ) -> Result<(), StepError> {
        let mut by_class: BTreeMap<&str, Vec<OutgoingMessage>> = BTreeMap::new();
        for instance in instances {
            by_class.entry(instance.resource_class.as_str()).or_default().push(OutgoingMessage {
                instance_id: instance.id.clone(),
                body: PoolMessage::returning(instance, threshold).body(),
            });
        }
        let mut batches = Vec::new();
        for (class, messages) in by_class {
            let queue_url = record
                .queue_urls
                .get(class)
                .ok_or_else(|| StepError::Unexpected(format!("no pool queue recorded for resource class {class:?}")))?;
            for chunk in messages.chunks(core::MAX_MESSAGE_BATCH) {
                batches.push((class.to_string(), queue_url.clone(), chunk.to_vec()));
            }
        }
        let total = batches.len();
        let done = &AtomicU64::new(0);
        stream::iter(batches)
            .map(|(class, queue_url, messages)| async move {
                let result = self.send_batch(&class, &queue_url, messages, sent).await;
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                info!(batches_done = finished, batches = total, "message batch finished");
                result
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn send_batch(
        &self,
        class: &str,
        queue_url: &str,
        messages: Vec<OutgoingMessage>,
        sent: &Mutex<Vec<String>>,
    ) -> Result<(), StepError> {
        let mut pending = messages;
        let mut last_failures = Vec::new();
        for round in 0..self.limits.batch_rounds {
            if pending.is_empty() {
                return Ok(());
            }
            if round > 0 {
                tokio::time::sleep(backoff(&self.limits, round)).await;
            }
            self.record_event(TraceEvent::SendMessages {
                resource_class: class.to_string(),
                ids: pending.iter().map(|m| m.instance_id.clone()).collect(),
            });
            let failed = self.write(self.ports.send(queue_url, &pending)).await?.map_err(aws_step_error)?;
            let failed_ids: HashSet<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
            let delivered: Vec<String> = pending
                .iter()
                .filter(|m| !failed_ids.contains(m.instance_id.as_str()))
                .map(|m| m.instance_id.clone())
                .collect();
            info!(resource_class = class, ids = ?delivered, "pool messages sent");
            sent.lock().expect("sent lock").extend(delivered);
            if let Some((id, error)) = failed.iter().find(|(_, error)| !error.class.is_retryable()) {
                return Err(StepError::Unexpected(format!("pool message for {id} refused: {error}")));
            }
            pending.retain(|m| failed_ids.contains(m.instance_id.as_str()));
            last_failures = failed;
        }
        if pending.is_empty() {
            return Ok(());
        }
        // Entries that failed with a final code returned above: these failed with retryable codes
        // in every round, so SQS is unavailable for them, not refusing them.
        let (id, last) = last_failures.into_iter().next().expect("the last round's failures are the pending entries");
        Err(StepError::Unavailable(AwsError {
            message: format!(
                "{} pool messages still failing after {} rounds (last, for {id}: {})",
                pending.len(),
                self.limits.batch_rounds,
                last.message
            ),
            ..last
        }))
    }

    async fn terminate_all(&self, ids: &[String]) -> Result<(), StepError> {
        let chunks: Vec<Vec<String>> = ids.chunks(core::MAX_TERMINATE_BATCH).map(<[_]>::to_vec).collect();
        stream::iter(chunks)
            .map(|chunk| async move {
                self.record_event(TraceEvent::Terminate { ids: chunk.clone() });
                let result = self.write(self.ports.terminate(&chunk)).await?.map_err(aws_step_error)?;
                info!(ids = ?result.terminated, "terminated instances");
                for id in &result.not_found {
                    warn!(instance = %id, "EC2 does not know this instance: treated as already gone");
                }
                Ok::<(), StepError>(())
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Path C. Returns how many instances were terminated.
    async fn clean_up(&self, spec: &Spec, record: &mut RunRecord) -> Result<usize, StepError> {
        let sent: HashSet<String> = record.messages_sent.iter().cloned().collect();
        let deletions = core::cleanup_deletions(spec, record.idle_threshold, &sent);
        let results = self.run_deletions(deletions).await?;
        let mut to_terminate = Vec::new();
        for (deletion, result) in &results {
            if cleanup_terminates(result) {
                if result == &WriteResult::Rejected(None) {
                    warn!(instance = %deletion.instance_id, "no instance record: terminating it so it cannot leak");
                }
                to_terminate.push(deletion.instance_id.clone());
            } else if let WriteResult::Rejected(Some(found)) = result {
                let finding = Finding::OwnedByOther { run_id: found.run_id.clone(), state: found.state.clone() };
                warn!(instance = %deletion.instance_id, found = %finding, "left alone by cleanup (isolation check)");
                self.record_event(TraceEvent::Found { id: deletion.instance_id.clone(), finding: finding.to_string() });
            }
        }
        self.checkpoint(record).await?;
        self.terminate_all(&to_terminate).await?;
        Ok(to_terminate.len())
    }
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

fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > SHOWN {
        text.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    text
}

/// Exponential backoff with full jitter for re-sent batch items, bounded by the limits.
fn backoff(limits: &Limits, round: u32) -> std::time::Duration {
    let ceiling = limits.initial_backoff.saturating_mul(1 << round.min(10)).min(limits.max_backoff);
    let millis = ceiling.as_millis().max(1) as u64;
    std::time::Duration::from_millis(rand::random_range(0..=millis))
}
