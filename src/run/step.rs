//! Between stages: which stage a state runs (read off the table), how a stage's verdict or
//! failure routes the run, and how a finished run ended.
//!
//! Architecture invariant: the routing of failures is decided here and only here; the driver
//! writes what [`route`] returns.

use serde::Serialize;

use super::effect::Failure;
use crate::config::OnRetriesExhausted;
use crate::machine::{self, Input, Output, State};
use crate::record::{RunError, RunErrorKind, RunRecord};

/// The stage a state's entry work names in `states/machine.rs` (`None`: no stage runs in it).
pub fn entry_work(state: State) -> Option<Output> {
    machine::transitions().into_iter().find(|(_, _, to, _)| *to == state).and_then(|(_, _, _, output)| output)
}

/// What a stage ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Reconciliation chose the path (a record left in `Reconciling` by another writer).
    Reconciled(Input, String),
    /// Commit's reason for `Done`.
    Committed(String),
    /// Rollback finished.
    RolledBack,
    /// Cleanup terminated this many instances.
    CleanedUp(usize),
}

impl Verdict {
    /// The reason recorded with the next state.
    pub fn reason(&self) -> String {
        match self {
            Verdict::Reconciled(_, reason) | Verdict::Committed(reason) => reason.clone(),
            Verdict::RolledBack => "claimed instances returned to the pool".to_string(),
            Verdict::CleanedUp(count) => format!("{count} instances terminated and purged"),
        }
    }
}

/// What the driver does after a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Enter the next state (persisted before its work runs).
    Enter {
        /// The machine's input.
        input: Input,
        /// Why, for the history.
        reason: String,
        /// The run's error to record, if this input sets one.
        error: Option<RunError>,
    },
    /// Stop where the run is, resumable: AWS is throttling, unavailable (under `Stall`, or in
    /// cleanup), or not caught up yet, or cleanup itself failed.
    Stall(String),
}

/// Routes a stage's result in `state`. Load (throttling) and waiting are never unexpected;
/// cleanup never escalates; a retryable AWS error follows `policy`.
pub fn route(record: &RunRecord, result: Result<Verdict, Failure>, policy: OnRetriesExhausted) -> Route {
    let state = record.state;
    let unexpected = |message: String| Route::Enter {
        input: Input::UnexpectedError,
        reason: message.clone(),
        error: Some(RunError { kind: RunErrorKind::Unexpected, message }),
    };
    match result {
        Ok(Verdict::Reconciled(input, reason)) => Route::Enter { input, reason, error: None },
        Ok(verdict) => Route::Enter {
            input: Input::ActionsCompleted,
            reason: verdict.reason(),
            error: (state == State::RollingBack).then(|| RunError {
                kind: RunErrorKind::Shortfall,
                message: format!("capacity shortfall: {}", entry_reason(record, State::RollingBack)),
            }),
        },
        Err(Failure::Unexpected(message) | Failure::Gone(message)) if state == State::EmergencyCleanup => {
            Route::Stall(message)
        }
        Err(Failure::Unexpected(message) | Failure::Gone(message)) => unexpected(message),
        Err(Failure::NotYet(message)) => Route::Stall(message),
        Err(Failure::Throttled(error)) => Route::Stall(format!("{error} (throttled past the throttle budget)")),
        Err(Failure::Unavailable(error)) if state == State::EmergencyCleanup || policy == OnRetriesExhausted::Stall => {
            Route::Stall(error.to_string())
        }
        // The step's retry budget is spent: as the design says, its error is unexpected. If AWS
        // is down altogether, the write of the next state fails too and the run stays resumable.
        Err(Failure::Unavailable(error)) => unexpected(format!("{error} (retries exhausted)")),
    }
}

/// The reason recorded when the run last entered `state`.
pub fn entry_reason(record: &RunRecord, state: State) -> String {
    record.history.iter().rev().find(|entry| entry.state == state).map(|entry| entry.reason.clone()).unwrap_or_default()
}

/// When the run last entered `state`: the stable threshold of the marks that state writes.
pub fn entered_at(record: &RunRecord, state: State) -> crate::timestamp::Timestamp {
    record.history.iter().rev().find(|entry| entry.state == state).map(|entry| entry.at).unwrap_or(record.created_at)
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
        match (record.state, record.error.as_ref().map(|e| e.kind)) {
            (State::Done, _) => Some(OutcomeKind::Committed),
            (State::Failed, Some(RunErrorKind::Shortfall)) => Some(OutcomeKind::RolledBack),
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
