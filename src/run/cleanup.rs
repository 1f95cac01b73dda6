//! Path C, emergency cleanup: every instance the run still holds is retired, and the original
//! error is surfaced.
//!
//! 1. **Retire** every instance of the spec except those this run announced (`messagesSent`),
//!    which stay in the pool; selected and created alike. The marks' conditions decide whether
//!    each is really this run's: an instance somebody else holds is left alone.
//! 2. An instance found exactly as this run's rollback released it (idle, runId `""`, the idle
//!    threshold) but not listed as announced may have had its message sent all the same (the
//!    driver can stop between the send and the record write that lists it). It is **announced
//!    again** (a duplicate message is harmless: the pool's conditional claim decides) and stays in
//!    the pool.
//! 3. Only the ones that announcement could not reach because their queue is gone (and with it
//!    any message of ours) are **retired** too, marked only if still exactly as released. A queue
//!    that refuses otherwise (access denied) may still hold a message an earlier send delivered:
//!    those stay in the pool, where refresh retires them at their idle threshold. If SQS is
//!    merely unavailable, nothing is retired and the run stays resumable.
//!
//! Architecture invariant: cleanup never terminates an instance whose pool message this run
//! sent, nor one it cannot prove it still holds or left unannounced.

use std::collections::HashSet;

use super::effect::{single, Announcement, Effect, EffectResult, Failure, Found, Outcome, Poll};
use super::retire::{Released, Retire, Retired};
use super::Stage;
use crate::spec::{PoolInstance, Role, Spec};
use crate::timestamp::Timestamp;

enum Phase {
    Retiring,
    Announcing,
    RetiringUnannounced,
    Over,
}

/// The emergency cleanup stage. Its verdict is how many instances it terminated.
pub struct Cleanup {
    run_id: String,
    instances: Vec<(Role, PoolInstance)>,
    /// The rollback's releases, if it got that far: its idle threshold and `releasedBy`.
    release: Option<Released>,
    marked_at: Timestamp,
    retire: Retire,
    terminated: usize,
    released: Vec<String>,
    phase: Phase,
    found: Vec<Found>,
}

impl Cleanup {
    /// Cleans up `spec`'s instances except those in `messages_sent`. `idle_threshold`: the
    /// threshold a rollback of this run released records at, if it got that far; `marked_at`:
    /// when the run entered `EmergencyCleanup`.
    pub fn new(
        spec: &Spec,
        messages_sent: &[String],
        idle_threshold: Option<Timestamp>,
        marked_at: Timestamp,
    ) -> Cleanup {
        let sent: HashSet<&String> = messages_sent.iter().collect();
        let instances: Vec<(Role, PoolInstance)> =
            spec.instances().filter(|(_, i)| !sent.contains(&i.id)).map(|(r, i)| (r, i.clone())).collect();
        let borrowed: Vec<(Role, &PoolInstance)> = instances.iter().map(|(r, i)| (*r, i)).collect();
        let release = idle_threshold.map(|threshold| Released { threshold, by: super::rollback::releaser(spec) });
        Cleanup {
            run_id: spec.run_id.clone(),
            retire: Retire::new(&spec.run_id, &borrowed, None, release.as_ref(), marked_at),
            instances,
            release,
            marked_at,
            terminated: 0,
            released: Vec::new(),
            phase: Phase::Retiring,
            found: Vec::new(),
        }
    }

    /// Step 1 is over: announce the released instances again, or finish.
    fn after_retire(&mut self, retired: Retired) -> Poll<usize> {
        self.terminated += retired.terminated;
        let Some(threshold) = self.release.as_ref().map(|r| r.threshold).filter(|_| !retired.released.is_empty())
        else {
            return self.finish(Ok(()));
        };
        self.released = retired.released;
        let announcements = self
            .instances
            .iter()
            .filter(|(_, i)| self.released.contains(&i.id))
            .map(|(_, i)| Announcement { instance: i.clone(), threshold })
            .collect();
        self.phase = Phase::Announcing;
        Poll::Run(vec![Effect::Send(announcements)])
    }

    /// Step 3: what the announcement could not reach, when its queue is gone (and with it any
    /// message of ours). A queue that refuses otherwise (access denied) may still hold one an
    /// earlier send delivered: those instances stay in the pool, where refresh retires them at
    /// their idle threshold if nobody claims them.
    fn after_announce(&mut self, now: Timestamp, delivered: Vec<String>, failure: Option<Failure>) -> Poll<usize> {
        let unannounced = self.released.iter().filter(|id| !delivered.contains(id));
        match failure {
            None | Some(Failure::Gone(_)) => {}
            Some(Failure::Unexpected(_)) => {
                let left = "released; announcing it again was refused: left in the pool, where refresh retires it at its idle threshold";
                self.found.extend(unannounced.map(|id| Found::new(id, left)));
                return self.finish(Ok(()));
            }
            Some(other) => return self.finish(Err(other)),
        }
        let unannounced: Vec<(Role, &PoolInstance)> = self
            .instances
            .iter()
            .filter(|(_, i)| self.released.contains(&i.id) && !delivered.contains(&i.id))
            .map(|(r, i)| (*r, i))
            .collect();
        self.retire = Retire::new(&self.run_id, &unannounced, self.release.as_ref(), None, self.marked_at);
        self.phase = Phase::RetiringUnannounced;
        self.advance(now, Vec::new())
    }

    fn finish(&mut self, result: Result<(), Failure>) -> Poll<usize> {
        self.phase = Phase::Over;
        Poll::Finished(result.map(|()| self.terminated))
    }
}

impl Stage for Cleanup {
    type Verdict = usize;

    fn advance(&mut self, now: Timestamp, results: Vec<Outcome>) -> Poll<usize> {
        match std::mem::replace(&mut self.phase, Phase::Over) {
            Phase::Retiring => match self.retire.advance(now, results) {
                Poll::Run(effects) => {
                    self.phase = Phase::Retiring;
                    Poll::Run(effects)
                }
                // The retire's deletions end the cleanup too when nothing is left to announce:
                // the verdict rides with them (advancing instead gives the same one).
                Poll::Last(effect, retired) => {
                    self.phase = Phase::Retiring;
                    if self.release.is_some() && !retired.released.is_empty() {
                        return Poll::Run(vec![effect]);
                    }
                    Poll::Last(effect, self.terminated + retired.terminated)
                }
                Poll::Finished(Ok(retired)) => self.after_retire(retired),
                Poll::Finished(Err(failure)) => self.finish(Err(failure)),
            },
            Phase::Announcing => match single(results, EffectResult::into_sent) {
                Ok((delivered, failure)) => self.after_announce(now, delivered, failure),
                Err(failure) => self.finish(Err(failure)),
            },
            Phase::RetiringUnannounced => match self.retire.advance(now, results) {
                Poll::Run(effects) => {
                    self.phase = Phase::RetiringUnannounced;
                    Poll::Run(effects)
                }
                Poll::Last(effect, retired) => {
                    self.phase = Phase::RetiringUnannounced;
                    Poll::Last(effect, self.terminated + retired.terminated)
                }
                Poll::Finished(Ok(retired)) => {
                    self.terminated += retired.terminated;
                    self.finish(Ok(()))
                }
                Poll::Finished(Err(failure)) => self.finish(Err(failure)),
            },
            Phase::Over => unreachable!("a finished stage is not advanced"),
        }
    }

    fn drain_found(&mut self) -> Vec<Found> {
        let mut found = std::mem::take(&mut self.found);
        found.extend(self.retire.drain_found());
        found
    }
}
