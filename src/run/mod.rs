//! The paths, each a pure stage: commit, graceful rollback, emergency cleanup, and the retire
//! protocol they share. A stage is handed the results of its last effects and `now`, and hands
//! back its next effects or its verdict ([`Poll`]). It makes no async call, touches no port and
//! reads no clock, so every rule of a path sits in one file and is tested without tokio or AWS.
//! The driver (`crate::driver`) runs the effects through the ports and feeds the results back,
//! like raft-rs's `Ready` → persist → act → `advance`.
//!
//! Architecture invariant: nothing under `src/run/` imports tokio, the AWS SDKs or
//! `crate::driver`; a stage's only inputs are its constructor's arguments, `now` and results.

pub mod cleanup;
pub mod commit;
pub mod effect;
#[cfg(test)]
mod proptests;
pub mod retire;
pub mod rollback;
pub mod step;
pub mod unrecorded;

pub use effect::{Announcement, Effect, EffectResult, Failure, Found, Outcome, Poll};

/// A path as the driver runs it: `advance` until it returns [`Poll::Finished`].
pub trait Stage {
    /// What the stage ends with.
    type Verdict;
    /// Takes the results of the effects the last call returned (in their order; empty on the
    /// first call) and returns the next effects, or the verdict.
    fn advance(&mut self, now: crate::timestamp::Timestamp, results: Vec<Outcome>) -> Poll<Self::Verdict>;
    /// What the stage found since the last call, for the trace and the logs (quinn's
    /// `poll_events`): instances left alone, refused, not returnable.
    fn drain_found(&mut self) -> Vec<Found>;
}

/// "and N more" after the first ten items, for messages that name instances.
pub(crate) fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > SHOWN {
        text.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    text
}
