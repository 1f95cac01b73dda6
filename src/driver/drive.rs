//! The state loop: run the stage the table names for the state, route its result, persist the
//! next state before its work runs.

use tracing::{info, info_span, warn, Instrument};

use super::create::set_entry_thresholds;
use super::*;
use crate::core;
use crate::machine::{self, Input, Output};
use crate::record::{HistoryEntry, RunError, RunRecord};
use crate::run;
use crate::run::step::{self, Route, Verdict};
use crate::spec::Spec;

/// How this driver came to the first state it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// It created the run (staged path).
    Fresh,
    /// It created the run together with its first state's transitions (a small rollback).
    Preapplied,
    /// It took over a persisted run.
    Resumed,
}

impl<P: Ports> Driver<P> {
    pub(super) fn outcome(&self, record: RunRecord, spec: Spec) -> RunOutcome {
        let kind = OutcomeKind::of(&record).expect("outcome of a terminal record");
        RunOutcome {
            kind,
            record,
            spec,
            trace: self.trace.lock().expect("trace lock").clone(),
            writes: self.writes.load(Ordering::SeqCst),
        }
    }

    /// Drives a run this driver holds to a terminal state, renewing its lease from the start:
    /// while it puts the run in order with the other attempts of its run id
    /// ([`Driver::attempts_in_order`], which may drive an earlier attempt for long), and while it
    /// drives. A run that stops on its own (stalled, or waiting for an earlier attempt's driver)
    /// gives its lease back, so the `resume` its exit code asks for is not refused; so does one
    /// the store refused while it still holds the lease (a later attempt's record appeared).
    /// `given`: the instances to act on are already known (an earlier attempt driven by a later
    /// one, without those the later holds).
    pub(super) async fn drive(
        &self,
        record: RunRecord,
        spec: Spec,
        start: Start,
        given: Option<Spec>,
    ) -> Result<RunOutcome, DriveError> {
        let (run_id, attempt, name) = (record.run_id.clone(), record.run_attempt, record.display_name());
        // Boxed: the futures of a run's whole life are large, and a test thread's stack is not.
        let driving = Box::pin(async {
            let effects = match (given, start) {
                (Some(effects), _) => effects,
                (None, Start::Preapplied) => spec.clone(),
                (None, _) => Box::pin(self.attempts_in_order(&record, &spec, start == Start::Resumed)).await?,
            };
            Box::pin(self.drive_states(record, spec, effects, start)).await
        });
        let renewing = self.renew_lease_periodically(&run_id, attempt);
        tokio::pin!(driving);
        // The renewer never finishes by itself; when driving ends, so does renewal.
        let result = tokio::select! {
            result = &mut driving => result,
            () = renewing => driving.await,
        };
        match result {
            Err(DriveError::LeaseLost { .. }) => {
                // The store refused this driver. Taken over: giving back is refused on the owner.
                // Refused because a later attempt's record appeared (the fence's second check): it
                // still holds the lease, and gives it back so that the re-run need not wait it out.
                self.release_lease(&run_id, attempt).await;
                Err(DriveError::LeaseLost { run_id: name })
            }
            Err(error @ (DriveError::Stalled { .. } | DriveError::Busy { .. })) => {
                self.release_lease(&run_id, attempt).await;
                Err(error)
            }
            other => other,
        }
    }

    /// The state loop. `spec` is the run's spec as stored; `effects` the same without instances
    /// a later attempt of the run holds (see [`Driver::attempts_in_order`]), which is what the
    /// stages act on.
    async fn drive_states(
        &self,
        mut record: RunRecord,
        spec: Spec,
        effects: Spec,
        start: Start,
    ) -> Result<RunOutcome, DriveError> {
        let mut start = Some(start);
        loop {
            let state = record.state;
            // Boxed, as every stage below: a run's futures are large, and a worker thread's stack is not.
            let ended = Box::pin(
                self.run_state(&mut record, &spec, &effects, start.take())
                    .instrument(info_span!("state", state = %state)),
            )
            .await?;
            let result = match ended {
                StageEnd::Verdict(result) => result,
                StageEnd::Finished => {
                    info!(state = %record.state, "run finished with its last effect");
                    return Ok(self.outcome(record, spec));
                }
            };
            match step::route(&record, result, self.limits.on_retries_exhausted) {
                Route::Enter { input, reason, error } => {
                    if input != machine::Input::ActionsCompleted {
                        warn!(error = %reason, "entering emergency cleanup");
                    }
                    self.enter(&mut record, &spec, input, reason, error).await?;
                }
                Route::Stall(error) => {
                    warn!(%error, "the run stays resumable in its state");
                    self.save_delivered(&mut record).await;
                    return Err(DriveError::Stalled { run_id: record.display_name(), state, error });
                }
            }
            if record.state.is_terminal() {
                info!(state = %record.state, "run finished");
                return Ok(self.outcome(record, spec));
            }
        }
    }

    /// Runs the stage the table names as `record.state`'s entry work. `start` is set on the
    /// first state this driver runs: a resume reads refusals differently, and a rollback created
    /// with its releases does not send them again.
    async fn run_state(
        &self,
        record: &mut RunRecord,
        spec: &Spec,
        effects: &Spec,
        start: Option<Start>,
    ) -> Result<StageEnd<Verdict>, DriveError> {
        let state = record.state;
        let Some(work) = step::entry_work(state) else {
            // Reconciling is not persisted as a current state by this build; handled for records
            // written by other tools or later formats.
            let reconciliation = core::reconcile(spec);
            return Ok(StageEnd::Verdict(Ok(Verdict::Reconciled(reconciliation.input, reconciliation.reason))));
        };
        let marked_at = step::entered_at(record, state);
        match work {
            Output::CommitInstances => {
                let threshold = record.commit_threshold.expect("commit threshold is set on entering Committing");
                let stage = run::commit::Commit::new(effects, threshold, &record.committed_ids);
                let finishing = |record: &RunRecord, reason: &String| {
                    self.finishing_record(record, spec, Verdict::Committed(reason.clone()))
                };
                Ok(Box::pin(self.run_stage(record, stage, &finishing)).await?.map(Verdict::Committed))
            }
            Output::ReleaseInstances => {
                let threshold = record.idle_threshold.expect("idle threshold is set on entering RollingBack");
                let preapplied = start == Some(Start::Preapplied);
                let stage =
                    run::rollback::Rollback::new(effects, threshold, &record.messages_sent, preapplied, marked_at);
                let finishing = |record: &RunRecord, (): &()| self.finishing_record(record, spec, Verdict::RolledBack);
                Ok(Box::pin(self.run_stage(record, stage, &finishing)).await?.map(|()| Verdict::RolledBack))
            }
            Output::CleanUpInstances => {
                let stage =
                    run::cleanup::Cleanup::new(effects, &record.messages_sent, record.idle_threshold, marked_at);
                let finishing = |record: &RunRecord, terminated: &usize| {
                    self.finishing_record(record, spec, Verdict::CleanedUp(*terminated))
                };
                Ok(Box::pin(self.run_stage(record, stage, &finishing)).await?.map(Verdict::CleanedUp))
            }
            Output::ReportCommitted | Output::ReportShortfall | Output::ReportError => {
                unreachable!("terminal states are not driven")
            }
        }
    }

    /// A stalled run keeps what its last stage delivered: the pool messages SQS accepted are
    /// written to `messagesSent` before the driver stops, so no resume announces or retires them
    /// again. Best effort: if the write fails, a resume's rules still hold (cleanup announces a
    /// released instance again rather than retiring it).
    async fn save_delivered(&self, record: &mut RunRecord) {
        if record.messages_sent.len() == self.persisted_messages.load(Ordering::SeqCst) {
            return;
        }
        let mut next = record.clone();
        next.version += 1;
        next.updated_at = self.clock.now();
        if let Err(error) = self.persist(record, next).await {
            warn!(%error, "could not record the pool messages sent before stopping");
        }
    }

    /// The terminal record `verdict` routes the run to, if it finishes the run: what the stage's
    /// last effect may carry with it.
    fn finishing_record(&self, record: &RunRecord, spec: &Spec, verdict: Verdict) -> Option<RunRecord> {
        let Route::Enter { input, reason, error } = step::route(record, Ok(verdict), self.limits.on_retries_exhausted)
        else {
            return None;
        };
        let next = self.next_record(record, spec, input, reason, error).ok()?;
        // A record too large for its write goes alone, where `persist` reports it (exit 70).
        (next.state.is_terminal() && crate::record::check_size(&next).is_ok()).then_some(next)
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
        let next = self.next_record(record, spec, input, reason, error)?;
        let to = next.state;
        self.persist(record, next).await?;
        info!(state = %to, "entered");
        Ok(())
    }

    /// The record of the state `input` leads to, with its entry thresholds, lease and `ttl`.
    fn next_record(
        &self,
        record: &RunRecord,
        spec: &Spec,
        input: Input,
        reason: String,
        error: Option<RunError>,
    ) -> Result<RunRecord, machine::InvalidTransition> {
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
        Ok(next)
    }

    pub(super) async fn persist(&self, record: &mut RunRecord, next: RunRecord) -> Result<(), DriveError> {
        match self.write(self.ports.replace_run(&next, record.version)).await? {
            Ok(()) => {
                self.persisted(record, next);
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

    /// `next` is in the table: it is the record this driver holds now.
    pub(super) fn persisted(&self, record: &mut RunRecord, next: RunRecord) {
        self.record_event(TraceEvent::Persisted { state: next.state });
        if !next.state.is_terminal() {
            self.lease_valid_until.store(next.lease.expires_at.unix_secs(), Ordering::SeqCst);
        }
        self.persisted_messages.store(next.messages_sent.len(), Ordering::SeqCst);
        *record = next;
    }
}
