//! Path B, graceful rollback: the run's instances go back to the pool, and the run fails clearly.
//!
//! 1. **Release.** One conditional transition per instance not yet announced: selected
//!    `claimed → idle`, created `running → idle`, runId `""`, `threshold > now`, the idle
//!    threshold fixed when the run entered `RollingBack`. (A small run's releases ride with its
//!    record's creation: `preapplied`, all done.) Instances whose pool message this run already
//!    sent are left out: the pool may have handed them on since, possibly to a later attempt of
//!    the same run id, whose claim carries the same runId.
//! 2. **Dispose** of each result: released (now or earlier) → announce; owned by this run but not
//!    returnable (expired, still `created`, already `terminated`) or without a record → retire,
//!    so nothing is left stranded; somebody else's → leave alone.
//! 3. **Announce and retire,** independently and together: the pool messages (whose delivered
//!    ids the driver records in `messagesSent`), and the retire protocol (`retire.rs`).
//!
//! Architecture invariant: an instance is announced only after its record is `idle` in the pool
//! at this run's threshold, and never announced twice by one run.

use std::collections::{BTreeMap, HashSet};

use super::effect::{single, Announcement, Effect, EffectResult, Failure, Found, Outcome, Poll};
use super::retire::{Retire, Retired};
use super::Stage;
use crate::core::{
    classify_transition, Expectation, Finding, InstanceState, InstanceTransition, ThresholdCondition, WriteResult,
};
use crate::spec::{PoolInstance, Role, Spec};
use crate::timestamp::Timestamp;

/// The release transitions of the instances not in `already_sent`: see the module docs.
/// Created instances still in `created` are not returnable: their transition is refused as
/// `WrongState`, and [`disposition`] retires them.
pub fn transitions(spec: &Spec, idle_threshold: Timestamp, already_sent: &HashSet<String>) -> Vec<InstanceTransition> {
    let releaser = releaser(spec);
    spec.instances()
        .filter(|(_, instance)| !already_sent.contains(&instance.id))
        .map(|(role, instance)| InstanceTransition {
            instance_id: instance.id.clone(),
            role,
            expected: vec![Expectation {
                states: match role {
                    Role::Selected => vec![InstanceState::Claimed],
                    Role::Created => vec![InstanceState::Running],
                },
                run_id: spec.run_id.clone(),
                threshold: ThresholdCondition::Unexpired,
                released_by: None,
            }],
            new_state: InstanceState::Idle,
            new_run_id: String::new(),
            new_threshold: idle_threshold,
            released_by: Some(releaser.clone()),
        })
        .collect()
}

/// The `releasedBy` this attempt's releases write: its record identifier (the run id for
/// attempt 1, `<runId>#<attempt>` after), so that neither the pool's release nor another
/// attempt's is ever read as this one's.
pub fn releaser(spec: &Spec) -> String {
    crate::record::record_identifier(&spec.run_id, spec.attempt())
}

/// What rollback does with one instance after its release transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Released (now or earlier): its pool message must be sent unless it is known sent.
    ReturnToPool,
    /// Owned by this run but not returnable, or without a record: retire it.
    Retire,
    /// Somebody else has it (another run, or the pool after a later release): leave it alone.
    LeaveAlone,
}

/// Rollback's rule for each finding.
pub fn disposition(finding: &Finding) -> Disposition {
    match finding {
        Finding::Done => Disposition::ReturnToPool,
        Finding::Missing | Finding::Expired { .. } | Finding::WrongState { .. } => Disposition::Retire,
        Finding::OwnedByOther { .. } => Disposition::LeaveAlone,
    }
}

enum Phase {
    Start,
    Releases,
    Checkpoint,
    Together,
    Retiring,
    Over,
}

/// The rollback stage.
pub struct Rollback {
    run_id: String,
    threshold: Timestamp,
    marked_at: Timestamp,
    instances: BTreeMap<String, (Role, PoolInstance)>,
    transitions: Vec<InstanceTransition>,
    preapplied: bool,
    phase: Phase,
    to_send: Vec<Announcement>,
    retire: Option<Retire>,
    send_failure: Option<Failure>,
    retired: Option<Result<Retired, Failure>>,
    found: Vec<Found>,
}

impl Rollback {
    /// Rolls back `spec`'s instances at `idle_threshold`, except those in `messages_sent`.
    /// `preapplied`: the releases landed with the record's creation. `marked_at`: when the run
    /// entered `RollingBack`, the stable threshold of the retire marks.
    pub fn new(
        spec: &Spec,
        idle_threshold: Timestamp,
        messages_sent: &[String],
        preapplied: bool,
        marked_at: Timestamp,
    ) -> Rollback {
        let already_sent: HashSet<String> = messages_sent.iter().cloned().collect();
        Rollback {
            run_id: spec.run_id.clone(),
            threshold: idle_threshold,
            marked_at,
            instances: spec.instances().map(|(role, i)| (i.id.clone(), (role, i.clone()))).collect(),
            transitions: transitions(spec, idle_threshold, &already_sent),
            preapplied,
            phase: Phase::Start,
            to_send: Vec::new(),
            retire: None,
            send_failure: None,
            retired: None,
            found: Vec::new(),
        }
    }

    /// Step 2: sorts the results into messages to send and instances to retire.
    fn dispose(&mut self, results: Vec<(InstanceTransition, WriteResult)>) {
        let mut to_retire: Vec<(Role, &PoolInstance)> = Vec::new();
        for (transition, result) in &results {
            let finding = classify_transition(transition, result).expect("cancelled writes were re-sent");
            let (role, instance) = &self.instances[&transition.instance_id];
            match disposition(&finding) {
                Disposition::ReturnToPool => {
                    self.to_send.push(Announcement { instance: instance.clone(), threshold: self.threshold })
                }
                Disposition::Retire => {
                    self.found.push(Found::new(&instance.id, finding.to_string()));
                    to_retire.push((*role, instance));
                }
                Disposition::LeaveAlone => self.found.push(Found::new(&instance.id, finding.to_string())),
            }
        }
        self.retire = Some(Retire::new(&self.run_id, &to_retire, None, None, self.marked_at));
    }

    /// Advances the retire protocol; once it is over, so is the rollback.
    fn advance_retire(&mut self, now: Timestamp, results: Vec<Outcome>) -> Option<Vec<Effect>> {
        let retire = self.retire.as_mut().expect("disposed");
        match retire.advance(now, results) {
            Poll::Run(effects) => Some(effects),
            // The rollback may still have a send to judge: its last effect is an ordinary one.
            Poll::Last(effect, _) => Some(vec![effect]),
            Poll::Finished(retired) => {
                self.retired = Some(retired);
                None
            }
        }
    }

    /// The send's failure first, then the retire's.
    fn verdict(&mut self) -> Poll<()> {
        self.phase = Phase::Over;
        let retired = self.retired.take().expect("retire finished");
        Poll::Finished(match self.send_failure.take() {
            Some(failure) => Err(failure),
            None => retired.map(|_| ()),
        })
    }
}

impl Stage for Rollback {
    type Verdict = ();

    fn advance(&mut self, now: Timestamp, mut results: Vec<Outcome>) -> Poll<()> {
        match std::mem::replace(&mut self.phase, Phase::Over) {
            Phase::Start if self.preapplied => {
                let done = self.transitions.drain(..).map(|t| (t, WriteResult::Applied)).collect();
                self.dispose(done);
                self.phase = Phase::Checkpoint;
                Poll::Run(vec![Effect::Checkpoint])
            }
            Phase::Start => {
                self.phase = Phase::Releases;
                Poll::Run(vec![Effect::Transition(std::mem::take(&mut self.transitions))])
            }
            Phase::Releases => match single(results, EffectResult::into_transitioned) {
                Ok(released) => {
                    self.dispose(released);
                    self.phase = Phase::Checkpoint;
                    Poll::Run(vec![Effect::Checkpoint])
                }
                Err(failure) => Poll::Finished(Err(failure)),
            },
            Phase::Checkpoint => {
                if let Err(failure) = single(results, EffectResult::into_checkpointed) {
                    return Poll::Finished(Err(failure));
                }
                let mut effects = vec![Effect::Send(std::mem::take(&mut self.to_send))];
                effects.extend(self.advance_retire(now, Vec::new()).unwrap_or_default());
                self.phase = Phase::Together;
                Poll::Run(effects)
            }
            Phase::Together => {
                let rest = results.split_off(1);
                match single(results, EffectResult::into_sent) {
                    Ok((_, failure)) => self.send_failure = failure,
                    Err(failure) => self.send_failure = Some(failure),
                }
                if self.retired.is_some() {
                    return self.verdict();
                }
                self.phase = Phase::Retiring;
                self.advance(now, rest)
            }
            Phase::Retiring => match self.advance_retire(now, results) {
                Some(effects) => {
                    self.phase = Phase::Retiring;
                    Poll::Run(effects)
                }
                None => self.verdict(),
            },
            Phase::Over => unreachable!("a finished stage is not advanced"),
        }
    }

    fn drain_found(&mut self) -> Vec<Found> {
        let mut found = std::mem::take(&mut self.found);
        if let Some(retire) = &mut self.retire {
            found.extend(retire.drain_found());
        }
        found
    }
}
