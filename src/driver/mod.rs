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
mod create;
mod drive;
mod exec;
mod hooks;
mod lease;
mod take_over;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::{info_span, Instrument};

use crate::config::Limits;
use crate::core::InstanceState;
use crate::machine::{InvalidTransition, State};
use crate::ports::{AwsError, Ports, StoreError};
use crate::record::RunRecord;
use crate::spec::{Spec, SpecError};
use crate::timestamp::Timestamp;

pub use crate::run::step::OutcomeKind;
pub use hooks::{Hooked, Hooks};

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
    #[error("run {run_id}: this driver lost its lease and stopped (its lease ran out, another driver took over, or a later attempt of the run started)")]
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
    /// The pool is not configured for what the run must do (a run that returns instances needs
    /// the table's `TYPE#METADATA` / `ID#resource_class_config` item); nothing was written.
    #[error("nothing was written: {0}")]
    PoolNotConfigured(String),
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

/// How a stage ended.
enum StageEnd<V> {
    /// With its verdict (or failure), for `step::route`.
    Verdict(Result<V, crate::run::Failure>),
    /// Its verdict was written with its last effect: the run record is terminal.
    Finished,
}

impl<V> StageEnd<V> {
    fn map<W>(self, f: impl FnOnce(V) -> W) -> StageEnd<W> {
        match self {
            StageEnd::Verdict(verdict) => StageEnd::Verdict(verdict.map(f)),
            StageEnd::Finished => StageEnd::Finished,
        }
    }
}

/// An effect's failure inside the driver: one the stage reasons about, or a reason to stop now.
enum StepError {
    Failed(crate::run::Failure),
    Stop(DriveError),
}

impl From<crate::run::Failure> for StepError {
    fn from(failure: crate::run::Failure) -> StepError {
        StepError::Failed(failure)
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
    writes: AtomicU64,
    /// Set when the lease renewer found another driver holding the run.
    lease_lost: AtomicBool,
    /// Until when (epoch seconds) this driver knows its lease holds: the expiry of its last
    /// successful record write or renewal. Past it, the driver fences itself: another driver may
    /// already have taken the run over, whether or not a renewal said so.
    lease_valid_until: AtomicI64,
    /// How many pool messages the last record this driver wrote lists as sent.
    persisted_messages: AtomicUsize,
    /// The run whose lease this driver holds, once it holds one, as its fence.
    leased_run: Mutex<Option<crate::ports::Fence>>,
    /// The latest attempt of the run this driver read the record of (0: it read none). Every
    /// instance write it makes is fenced on the next attempt having no record ([`Driver::fence`]).
    latest_attempt: AtomicU32,
    trace: Mutex<Vec<TraceEvent>>,
}

impl<P: Ports> Driver<P> {
    /// A driver with a fresh, unique lease owner id.
    pub fn new(ports: Arc<P>, limits: Limits, clock: Arc<dyn Clock>) -> Driver<P> {
        let owner = format!("pid{}-{:012x}", std::process::id(), clock.random_u64() & 0xffff_ffff_ffff);
        Driver {
            ports,
            limits,
            clock,
            owner,
            writes: AtomicU64::new(0),
            lease_lost: AtomicBool::new(false),
            lease_valid_until: AtomicI64::new(i64::MAX),
            persisted_messages: AtomicUsize::new(0),
            leased_run: Mutex::new(None),
            latest_attempt: AtomicU32::new(0),
            trace: Mutex::new(Vec::new()),
        }
    }

    /// This driver's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// From now on this driver holds `record`'s lease, until the expiry written in it.
    fn hold_lease(&self, record: &RunRecord) {
        *self.leased_run.lock().expect("lease lock") = Some(crate::ports::Fence::of(record));
        self.persisted_messages.store(record.messages_sent.len(), Ordering::SeqCst);
        self.lease_valid_until.store(record.lease.expires_at.unix_secs(), Ordering::SeqCst);
    }

    /// The fence of this driver's instance writes for `record`: its lease, and no record for an
    /// attempt of the run after every one it has read.
    fn fence(&self, record: &RunRecord) -> crate::ports::Fence {
        crate::ports::Fence::of(record).knowing(self.latest_attempt.load(Ordering::SeqCst))
    }

    /// This driver has read the records of the run's attempts up to `latest`.
    fn know_attempts(&self, latest: u32) {
        self.latest_attempt.fetch_max(latest, Ordering::SeqCst);
    }

    fn record_event(&self, event: TraceEvent) {
        self.trace.lock().expect("trace lock").push(event);
    }

    /// Runs one AWS write, counting it. Refuses to start it once this driver knows, or can no
    /// longer confirm, that its lease passed to another driver. (The store fences the instance
    /// writes whatever this says; this saves the calls the store cannot fence, the pool messages
    /// and terminations, from a driver that knows it is stale.)
    async fn write<T>(&self, call: impl std::future::Future<Output = T>) -> Result<T, DriveError> {
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
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(value)
    }
}
