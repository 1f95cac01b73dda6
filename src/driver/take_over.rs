//! Resuming and taking over a run, and putting a run in order with the other attempts of its
//! run id.

use std::collections::HashSet;

use tracing::{info, warn};

use super::drive::Start;
use super::*;
use crate::ports::StoreError;
use crate::record::{self, Lease, RunRecord};
use crate::spec::Spec;

impl<P: Ports> Driver<P> {
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

    pub(super) async fn resume_record(&self, record: RunRecord, force: bool) -> Result<RunOutcome, DriveError> {
        match self.take_over(record, force).await? {
            TakeOver::Finished(outcome) => Ok(*outcome),
            TakeOver::Taken(record, spec) => {
                info!(state = %record.state, "resuming");
                Box::pin(self.drive(record, spec, Start::Resumed, None)).await
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
        // A take-over bumps the fencing epoch: every instance write of the driver it replaces
        // is refused by the store from now on.
        taken.fencing_epoch += 1;
        taken.lease = Lease { owner: self.owner.clone(), expires_at: now.plus_secs(self.limits.lease_secs) };
        self.hold_lease(&taken);
        let committed_as_read = record.committed_ids.len();
        match self.write(self.ports.take_over_run(&taken, record.version, committed_as_read)).await? {
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

    /// Re-runs share the run id in every instance record, so two attempts' writes cannot be told
    /// apart by their conditions. Attempts therefore act one after the other: before a later
    /// attempt acts, every earlier unfinished one is driven to its end (or, when its driver
    /// still holds it, this one stops, `Busy`, naming it). And an earlier attempt resumed after a
    /// later one exists leaves the later one's instances alone. Returns the spec whose instances
    /// this run may act on.
    pub(super) async fn attempts_in_order(
        &self,
        record: &RunRecord,
        spec: &Spec,
        resumed: bool,
    ) -> Result<Spec, DriveError> {
        // A first attempt started now has no earlier attempt, and a later one would only start
        // after it: only resumes and re-runs need to look.
        if record.run_attempt <= 1 && !resumed {
            return Ok(spec.clone());
        }
        let attempts =
            self.ports.load_attempts(&record.run_id).await.map_err(|error| self.store_stall(record, error))?;
        // Every attempt read: from now on a later one's record refuses this driver's writes, and
        // the earlier attempts' (driven below by drivers of their own, knowing the same).
        let latest = attempts.iter().map(|other| other.run_attempt).fold(record.run_attempt, u32::max);
        self.know_attempts(latest);
        for earlier in attempts.iter().filter(|other| other.run_attempt < record.run_attempt) {
            if earlier.state.is_terminal() {
                continue;
            }
            info!(attempt = earlier.run_attempt, "finishing an earlier attempt of this run first");
            let driver = Driver::new(self.ports.clone(), self.limits.clone(), self.clock.clone());
            driver.know_attempts(latest);
            let finishing = async {
                match driver.take_over(earlier.clone(), false).await? {
                    TakeOver::Finished(outcome) => Ok(*outcome),
                    TakeOver::Taken(earlier_record, earlier_spec) => {
                        // This attempt's instances, and any later one's, are not the earlier's.
                        let later: HashSet<String> = self
                            .later_instances(&attempts, earlier_record.run_attempt, spec, record.run_attempt)
                            .await?;
                        let effects = without_instances(&driver, &earlier_spec, &later);
                        Box::pin(driver.drive(earlier_record, earlier_spec, Start::Resumed, Some(effects))).await
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
}

// One value per take-over, moved at once into the drive: boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
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
