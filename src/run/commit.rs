//! Path A, commit: every instance becomes `running` for the run, with the commit threshold.
//!
//! 1. One conditional transition per instance: selected `claimed → running`, created
//!    `running|created → running`, runId kept, `threshold > now` (the claim has not expired), the
//!    commit threshold fixed when the run entered `Committing` (so a resume writes exactly what
//!    the first attempt wrote, and "found already so" is success).
//! 2. Any refusal refuses the commit (the run goes to emergency cleanup, which is
//!    isolation-checked), with one exception: an instance somebody else holds now (the pool, or
//!    another run) whose commit is known to have landed (the run record's `committedIds`, which
//!    every fenced commit transaction appends its ids to in the same transaction) was handed on
//!    by release since. It is left alone and counts as committed. Without that positive
//!    evidence, nothing about the record tells a handed-on instance from one this run never held
//!    (another run's from the start) or lost before its commit (refresh marks an expired claim
//!    `terminated` with runId `""`, as it marks an expired committed one).
//!
//! Architecture invariant: a commit writes only records this run holds, unexpired, and never
//! reports an instance committed that it did not find `running` for it with its threshold,
//! except one whose commit landed earlier (in `committedIds`) and that was handed on since.

use std::collections::HashSet;

use super::effect::{single, Effect, EffectResult, Failure, Found, Outcome, Poll};
use super::{summarize, Stage};
use crate::core::{
    classify_transition, Expectation, Finding, InstanceState, InstanceTransition, ThresholdCondition, WriteResult,
};
use crate::spec::{Role, Spec};
use crate::timestamp::Timestamp;

/// The commit's evidence: the ids a fenced transaction of `batch` for run `run_id` records on the
/// run record (`committedIds`, appended by the fence's `Update` in the same transaction), those of
/// commit transitions (→ `running`, the run's own runId). Empty for every other batch, whose
/// fence is a `ConditionCheck`. The resume rule below reads what this wrote.
pub fn committed_ids(batch: &[InstanceTransition], run_id: &str) -> Vec<String> {
    batch
        .iter()
        .filter(|t| t.new_state == InstanceState::Running && t.new_run_id == run_id)
        .map(|t| t.instance_id.clone())
        .collect()
}

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
                released_by: None,
            }],
            new_state: InstanceState::Running,
            new_run_id: spec.run_id.clone(),
            new_threshold: commit_threshold,
            released_by: None,
        })
        .collect()
}

/// The commit stage. Its verdict is the reason recorded with `Done`.
pub struct Commit {
    transitions: Vec<InstanceTransition>,
    committed_earlier: HashSet<String>,
    found: Vec<Found>,
}

impl Commit {
    /// Commits `spec`'s instances at `commit_threshold`. `committed_earlier`: the instances
    /// whose commit is known to have landed before (the run record's `committedIds`).
    pub fn new(spec: &Spec, commit_threshold: Timestamp, committed_earlier: &[String]) -> Commit {
        Commit {
            transitions: transitions(spec, commit_threshold),
            committed_earlier: committed_earlier.iter().cloned().collect(),
            found: Vec::new(),
        }
    }

    /// Reads every instance's result: the reason for `Done`, or the refusal.
    fn judge(&mut self, results: Vec<(InstanceTransition, WriteResult)>) -> Result<String, Failure> {
        let (mut committed, mut moved_on, mut refused) = (0, Vec::new(), Vec::new());
        for (transition, result) in &results {
            let id = &transition.instance_id;
            let finding = classify_transition(transition, result).expect("cancelled writes were re-sent");
            match finding {
                Finding::Done => committed += 1,
                Finding::OwnedByOther { .. } if self.committed_earlier.contains(id) => {
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
