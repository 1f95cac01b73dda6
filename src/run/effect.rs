//! The vocabulary between the stages and the driver: the effects a stage asks for, their
//! results, and the failures a stage reasons about.

use crate::core::{InstanceDeletion, InstanceTransition, WriteResult};
use crate::ports::{AwsError, ErrorClass, PoolMembership, Termination};
use crate::spec::PoolInstance;
use crate::timestamp::Timestamp;

/// One side effect a stage asks the driver to run. The effects of one [`Poll::Run`] are
/// independent: the driver may run them concurrently, and returns one result per effect, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Conditional instance-record updates, in atomic batches fenced by the run record. The
    /// result has every item with its final result (never `Cancelled` or `Throttled`: the
    /// driver re-sends those within its budgets).
    Transition(Vec<InstanceTransition>),
    /// Conditional deletions of records this run marked `terminated`, fenced like transitions.
    Delete(Vec<InstanceDeletion>),
    /// Pool messages returning instances to their pools' queues (by resource class, through the
    /// queue URLs recorded in the run record).
    Send(Vec<Announcement>),
    /// Which of these instances carry the pool tag (DescribeInstances).
    CheckPool(Vec<String>),
    /// TerminateInstances.
    Terminate(Vec<String>),
    /// Renew the lease through a versioned record write when less than half of it is left.
    Checkpoint,
}

/// One pool message to send: the instance and its record's new threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The instance, as the spec describes it.
    pub instance: PoolInstance,
    /// The threshold its record carries in the pool.
    pub threshold: Timestamp,
}

/// The result of one [`Effect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EffectResult {
    /// Of [`Effect::Transition`].
    Transitioned(Vec<(InstanceTransition, WriteResult)>),
    /// Of [`Effect::Delete`].
    Deleted(Vec<(InstanceDeletion, WriteResult)>),
    /// Of [`Effect::Send`]: always delivered, even when a batch failed, so that nothing SQS
    /// accepted is forgotten. The driver has recorded `delivered` in the run's `messagesSent`.
    Sent {
        /// Ids SQS accepted.
        delivered: Vec<String>,
        /// The first batch failure, if any.
        failure: Option<Failure>,
    },
    /// Of [`Effect::CheckPool`].
    Checked(PoolMembership),
    /// Of [`Effect::Terminate`].
    Terminated(Termination),
    /// Of [`Effect::Checkpoint`].
    Checkpointed,
}

impl EffectResult {
    /// The items of [`EffectResult::Transitioned`].
    pub fn into_transitioned(self) -> Option<Vec<(InstanceTransition, WriteResult)>> {
        match self {
            EffectResult::Transitioned(results) => Some(results),
            _ => None,
        }
    }
    /// The items of [`EffectResult::Deleted`].
    pub fn into_deleted(self) -> Option<Vec<(InstanceDeletion, WriteResult)>> {
        match self {
            EffectResult::Deleted(results) => Some(results),
            _ => None,
        }
    }
    /// The delivery of [`EffectResult::Sent`].
    pub fn into_sent(self) -> Option<(Vec<String>, Option<Failure>)> {
        match self {
            EffectResult::Sent { delivered, failure } => Some((delivered, failure)),
            _ => None,
        }
    }
    /// The membership of [`EffectResult::Checked`].
    pub fn into_checked(self) -> Option<PoolMembership> {
        match self {
            EffectResult::Checked(membership) => Some(membership),
            _ => None,
        }
    }
    /// The termination of [`EffectResult::Terminated`].
    pub fn into_terminated(self) -> Option<Termination> {
        match self {
            EffectResult::Terminated(termination) => Some(termination),
            _ => None,
        }
    }
    /// [`EffectResult::Checkpointed`].
    pub fn into_checkpointed(self) -> Option<()> {
        matches!(self, EffectResult::Checkpointed).then_some(())
    }
}

/// An effect's result, or why it failed.
pub type Outcome = Result<EffectResult, Failure>;

/// Why an effect, or a stage, failed; the step router (`step.rs`) decides what the run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// An unexpected error: the machine's `UnexpectedError` input.
    Unexpected(String),
    /// What the call needs does not exist (a deleted pool queue, a missing table): unexpected
    /// too, and for a pool queue it also means no message of ours can still be in it.
    Gone(String),
    /// AWS still failed with a retryable error (5xx, timeout, dropped connection) once the
    /// retries were spent; `OnRetriesExhausted` decides.
    Unavailable(AwsError),
    /// Throttling (or transaction conflicts) outlasted the budget: load, never an unexpected
    /// error; the run stops where it is, resumable.
    Throttled(AwsError),
    /// Something the run waits for has not happened yet (EC2 does not know an instance of this
    /// run yet): the run stops where it is, resumable.
    NotYet(String),
}

impl Failure {
    /// An AWS error, by its class: throttling and other retryable errors stall the run (or, for
    /// the latter, follow `OnRetriesExhausted`); every other class is unexpected.
    pub fn from_aws(error: AwsError) -> Failure {
        match error.class {
            ErrorClass::Throttling => Failure::Throttled(error),
            class if class.is_retryable() => Failure::Unavailable(error),
            ErrorClass::NotFound => Failure::Gone(error.to_string()),
            _ => Failure::Unexpected(error.to_string()),
        }
    }

    /// How much this failure of one part of an effect holds the rest back, when parts failed
    /// differently (the send batches of several queues): a failure that may clear (SQS
    /// unavailable, throttled, not yet) keeps everything as it is and the run resumable; a
    /// refusal leaves its instances in the pool; only a queue that is gone lets cleanup retire
    /// what it could not announce. The most cautious one is the effect's failure, so that one
    /// queue that is gone never speaks for another that is merely unavailable.
    pub fn caution(&self) -> u8 {
        match self {
            Failure::Gone(_) => 0,
            Failure::Unexpected(_) => 1,
            Failure::Unavailable(_) | Failure::Throttled(_) | Failure::NotYet(_) => 2,
        }
    }
}

/// Something a stage found about one instance: reported in the trace and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The instance.
    pub id: String,
    /// What was found, in words.
    pub finding: String,
}

impl Found {
    pub(crate) fn new(id: impl Into<String>, finding: impl Into<String>) -> Found {
        Found { id: id.into(), finding: finding.into() }
    }
}

/// What a stage asks for next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll<V> {
    /// Run these effects and call `advance` with their results.
    Run(Vec<Effect>),
    /// Run this last effect. If it yields a result, whatever the result, the stage's verdict is
    /// the one given; if it fails, the verdict is that failure. The driver may then take the
    /// verdict without advancing the stage again (and persist the next state in the same write
    /// as the effect), or treat this as a [`Poll::Run`] of the one effect: advancing the stage
    /// with its result returns exactly that verdict.
    Last(Effect, V),
    /// The stage is over.
    Finished(Result<V, Failure>),
}

/// Takes the one result a single-effect step expects, of the kind `pick` extracts. A result of
/// another kind is a driver bug.
pub(crate) fn single<T>(results: Vec<Outcome>, pick: impl FnOnce(EffectResult) -> Option<T>) -> Result<T, Failure> {
    let mut results = results.into_iter();
    let outcome = results.next().expect("one effect, one result");
    debug_assert!(results.next().is_none(), "one effect, one result");
    Ok(pick(outcome?).expect("the result matches the effect"))
}
