//! Path A, commit: every instance becomes `running` for the run, with the commit threshold.
//!
//! 1. One conditional transition per instance: selected `claimed → running`, created
//!    `running|created → running`, runId kept, `threshold > now` (the claim has not expired), the
//!    commit threshold fixed when the run entered `Committing` (so a resume writes exactly what
//!    the first attempt wrote, and "found already so" is success).
//! 2. Any refusal refuses the commit (the run goes to emergency cleanup, which is
//!    isolation-checked), with one exception on a resume: an instance somebody else holds now (the
//!    pool, or another run) was committed before the driver died and handed on by release since:
//!    while an instance is claimed for this run or created by it, no other actor can take it
//!    (selection takes `idle`, refresh only marks it `terminated`). It is left alone and counts as
//!    committed. The exception does not apply when this resume committed some instance only now
//!    (the commit had not landed before, so nothing can have been handed on since), nor to an
//!    instance that already refused the run's one-transaction create (this run never held it).
//!
//! Architecture invariant: a commit writes only records this run holds, unexpired, and never
//! reports an instance committed that it did not find `running` for it with its threshold,
//! except one handed on after an earlier, landed commit.

use std::collections::HashSet;

use super::effect::{single, Effect, EffectResult, Failure, Found, Outcome, Poll};
use super::{summarize, Stage};
use crate::core::{
    classify_transition, Expectation, Finding, InstanceState, InstanceTransition, ThresholdCondition, WriteResult,
};
use crate::spec::{Role, Spec};
use crate::timestamp::Timestamp;

/// The commit transitions: selected `claimed → running`, created `running|created → running`,
/// all keeping the runId and taking the commit threshold.
pub fn transitions(spec: &Spec, commit_threshold: Timestamp) -> Vec<InstanceTransition> {
    spec.instances()
        .map(|(role, instance)| InstanceTransition {
            instance_id: instance.id.clone(),
            role,
            expected: vec![Expectation {
                states: match role {
                    Role::Selected => vec![InstanceState::Claimed],
                    Role::Created => vec![InstanceState::Running, InstanceState::Created],
                },
                run_id: spec.run_id.clone(),
                threshold: ThresholdCondition::Unexpired,
            }],
            new_state: InstanceState::Running,
            new_run_id: spec.run_id.clone(),
            new_threshold: commit_threshold,
        })
        .collect()
}

/// The commit stage. Its verdict is the reason recorded with `Done`.
pub struct Commit {
    transitions: Vec<InstanceTransition>,
    resumed: bool,
    refused_at_create: HashSet<String>,
    found: Vec<Found>,
}

impl Commit {
    /// Commits `spec`'s instances at `commit_threshold`. `resumed`: a resume of a run that was
    /// already `Committing`; `refused_at_create`: the instances that refused its one-transaction
    /// create.
    pub fn new(spec: &Spec, commit_threshold: Timestamp, resumed: bool, refused_at_create: &[String]) -> Commit {
        Commit {
            transitions: transitions(spec, commit_threshold),
            resumed,
            refused_at_create: refused_at_create.iter().cloned().collect(),
            found: Vec::new(),
        }
    }

    /// Reads every instance's result: the reason for `Done`, or the refusal.
    fn judge(&mut self, results: Vec<(InstanceTransition, WriteResult)>) -> Result<String, Failure> {
        let applied_now = results.iter().any(|(_, result)| *result == WriteResult::Applied);
        let (mut committed, mut moved_on, mut refused) = (0, Vec::new(), Vec::new());
        for (transition, result) in &results {
            let id = &transition.instance_id;
            let finding = classify_transition(transition, result).expect("cancelled writes were re-sent");
            match finding {
                Finding::Done => committed += 1,
                Finding::OwnedByOther { .. }
                    if self.resumed && !applied_now && !self.refused_at_create.contains(id) =>
                {
                    self.found.push(Found::new(id, format!("{finding}: committed earlier, handed on since")));
                    moved_on.push(id.clone());
                }
                _ => {
                    self.found.push(Found::new(id, finding.to_string()));
                    refused.push(format!("{id}: {finding}"));
                }
            }
        }
        if !refused.is_empty() {
            return Err(Failure::Unexpected(format!(
                "commit refused for {} instance(s): {}",
                refused.len(),
                summarize(&refused)
            )));
        }
        if moved_on.is_empty() {
            return Ok(format!("{committed} instances committed"));
        }
        Ok(format!(
            "{committed} instances committed; {} committed earlier and since handed on by the pool: {}",
            moved_on.len(),
            summarize(&moved_on)
        ))
    }
}

impl Stage for Commit {
    type Verdict = String;

    fn advance(&mut self, _now: Timestamp, results: Vec<Outcome>) -> Poll<String> {
        if !self.transitions.is_empty() {
            return Poll::Run(vec![Effect::Transition(std::mem::take(&mut self.transitions))]);
        }
        if results.is_empty() {
            // A spec with no instance commits nothing (reconciliation never sends one here).
            return Poll::Finished(Ok("0 instances committed".to_string()));
        }
        Poll::Finished(single(results, EffectResult::into_transitioned).and_then(|results| self.judge(results)))
    }

    fn drain_found(&mut self) -> Vec<Found> {
        std::mem::take(&mut self.found)
    }
}
