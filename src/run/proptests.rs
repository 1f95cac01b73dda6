//! Property tests of the stages, with no tokio and no AWS: a model table answers each effect the
//! way DynamoDB, SQS and EC2 would (with arbitrary failures, memberships and terminations), for
//! arbitrary starting records. Whatever happens, a stage never writes a record without its
//! ownership condition, never terminates an instance it has not marked (or that has no record,
//! is in the creation list and carries this run's id in its pool tag) or that lacks the pool
//! tag, announces only what it released, and reaches a verdict.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::cleanup::Cleanup;
use super::commit::Commit;
use super::rollback::Rollback;
use super::{Effect, EffectResult, Failure, Outcome, Poll, Stage};
use crate::core::{InstanceState, ObservedRecord, ThresholdCondition, WriteResult};
use crate::ports::{AwsError, ErrorClass, PoolMembership, Termination};
use crate::spec::Spec;
use crate::timestamp::Timestamp;

const RUN: &str = "9876543210";

#[derive(Debug, Clone)]
struct Record {
    state: &'static str,
    run_id: String,
    threshold: Timestamp,
    /// `releasedBy`: written by this engine's releases only, and left by every other write.
    released_by: String,
}

/// One instance's arbitrary world: its record, and what EC2 says of it.
#[derive(Debug, Clone)]
struct Instance {
    record: Option<Record>,
    tagged: bool,
    /// The pool tag's value: the run that launched it.
    tag_value: String,
    known_to_ec2: bool,
    refuse_termination: bool,
}

fn start() -> Timestamp {
    Timestamp::parse("2026-11-30T12:00:00Z").unwrap()
}

fn instance() -> impl Strategy<Value = Instance> {
    let state = prop::sample::select(vec!["created", "running", "idle", "claimed", "terminated"]);
    let owner = prop::sample::select(vec![RUN.to_string(), "1111".to_string(), String::new()]);
    let threshold = prop::sample::select(vec![-100i64, 1_000, 300, 1_800]);
    // The pool's release can leave exactly this run's idle threshold: only `releasedBy` differs.
    let released_by = prop::sample::select(vec![RUN.to_string(), String::new()]);
    let record = prop::option::weighted(0.85, (state, owner, threshold, released_by)).prop_map(|r| {
        r.map(|(state, run_id, offset, released_by)| Record {
            state,
            run_id,
            threshold: start().plus_secs(offset),
            released_by,
        })
    });
    let tag_value = prop::sample::select(vec![RUN.to_string(), "1111".to_string(), String::new()]);
    (record, prop::bool::weighted(0.9), tag_value, prop::bool::weighted(0.9), prop::bool::weighted(0.1)).prop_map(
        |(record, tagged, tag_value, known_to_ec2, refuse_termination)| Instance {
            record,
            tagged,
            tag_value,
            known_to_ec2,
            refuse_termination,
        },
    )
}

/// A spec with `selected` claimed and `created` launched instances, ids `i-0…` in order.
fn spec(selected: usize, created: usize, success: bool) -> Spec {
    let instance = |n: usize| crate::spec::tests::instance_json(&format!("i-{n:017x}"), "large");
    let value = serde_json::json!({
        "runId": RUN, "maxRuntimeMin": 30, "idleTimeSec": 300,
        "selection": {"numInstancesSelected": selected, "numInstancesRequired": selected + created,
                      "instances": (0..selected).map(instance).collect::<Vec<_>>()},
        "creation": {"state": if success { "success" } else { "failed" }, "numInstancesCreated": created,
                     "instances": (selected..selected + created).map(instance).collect::<Vec<_>>()},
    });
    Spec::from_json(&value.to_string()).expect("a valid spec")
}

struct Model {
    instances: BTreeMap<String, Instance>,
    now: Timestamp,
    /// One entry per effect: fail it (and how), or not.
    faults: Vec<u8>,
    next_fault: usize,
    /// Members of the last pool check.
    members: Vec<String>,
    /// The spec's creation list.
    created: BTreeSet<String>,
    idle_threshold: Option<Timestamp>,
}

impl Model {
    fn fault(&mut self) -> Option<Failure> {
        let choice = self.faults.get(self.next_fault).copied().unwrap_or(0);
        self.next_fault += 1;
        let aws = |class| AwsError { service: "X", operation: "Y", code: None, message: "injected".into(), class };
        match choice {
            1 => Some(Failure::Unavailable(aws(ErrorClass::Transient))),
            2 => Some(Failure::Throttled(aws(ErrorClass::Throttling))),
            3 => Some(Failure::Unexpected("injected".into())),
            4 => Some(Failure::Gone("injected: the queue is gone".into())),
            _ => None,
        }
    }

    fn write(&mut self, id: &str, holds: bool, apply: impl FnOnce(&mut Option<Record>)) -> WriteResult {
        let instance = self.instances.get_mut(id).expect("the spec's instances are modelled");
        if holds {
            apply(&mut instance.record);
            return WriteResult::Applied;
        }
        WriteResult::Rejected(instance.record.as_ref().map(|r| ObservedRecord {
            state: r.state.to_string(),
            run_id: r.run_id.clone(),
            threshold: r.threshold.to_string(),
            released_by: r.released_by.clone(),
        }))
    }

    /// Applies each transition whose condition holds, checking first that it has its ownership condition.
    fn transitions(
        &mut self,
        transitions: Vec<crate::core::InstanceTransition>,
    ) -> Vec<(crate::core::InstanceTransition, WriteResult)> {
        transitions
            .into_iter()
            .map(|t| {
                for expected in &t.expected {
                    let owned = expected.run_id == RUN
                        || (expected.run_id.is_empty()
                            && expected.states == [InstanceState::Idle]
                            && matches!(expected.threshold, ThresholdCondition::Exactly(_)));
                    assert!(owned, "a write without its ownership condition: {t:?}");
                }
                let now = self.now;
                let record = self.instances[&t.instance_id].record.clone();
                let holds = record.as_ref().is_some_and(|r| {
                    t.expected.iter().any(|e| {
                        e.states.iter().any(|s| s.as_str() == r.state)
                            && e.run_id == r.run_id
                            && e.released_by.as_ref().map_or(true, |by| *by == r.released_by)
                            && match e.threshold {
                                ThresholdCondition::Unexpired => r.threshold > ThresholdCondition::unexpired_after(now),
                                ThresholdCondition::Exactly(at) => r.threshold == at,
                                ThresholdCondition::Any => true,
                            }
                    })
                });
                let (state, run_id, threshold) = (t.new_state.as_str(), t.new_run_id.clone(), t.new_threshold);
                let releaser = t.released_by.clone();
                let result = self.write(&t.instance_id, holds, |r| {
                    let released_by =
                        releaser.or_else(|| r.as_ref().map(|r| r.released_by.clone())).unwrap_or_default();
                    *r = Some(Record { state, run_id, threshold, released_by })
                });
                (t, result)
            })
            .collect()
    }

    /// EC2's answer to a termination, checking first that each one is allowed.
    fn terminate(&mut self, ids: Vec<String>) -> EffectResult {
        let mut termination = Termination::default();
        for id in ids {
            assert!(self.members.contains(&id), "terminated without the pool tag: {id}");
            let instance = &self.instances[&id];
            let marked = instance.record.as_ref().is_none_or(|r| r.state == "terminated" && r.run_id == RUN);
            assert!(marked, "terminated before its mark: {id} {:?}", instance.record);
            if instance.record.is_none() {
                assert!(self.created.contains(&id), "a selected instance without a record terminated: {id}");
                assert_eq!(instance.tag_value, RUN, "a record-less instance of another run terminated: {id}");
            }
            if instance.refuse_termination {
                let error = AwsError {
                    service: "EC2",
                    operation: "TerminateInstances",
                    code: Some("OperationNotPermitted".into()),
                    message: "refused".into(),
                    class: ErrorClass::Permission,
                };
                termination.refused.push((id, error));
            } else {
                termination.terminated.push(id);
            }
        }
        EffectResult::Terminated(termination)
    }

    fn answer(&mut self, effect: Effect) -> Outcome {
        if !matches!(effect, Effect::Checkpoint) {
            match (self.fault(), &effect) {
                // A pool queue that is gone refuses every message of the batch: none delivered.
                (Some(failure @ Failure::Gone(_)), Effect::Send(_)) => {
                    return Ok(EffectResult::Sent { delivered: Vec::new(), failure: Some(failure) })
                }
                (Some(failure), _) => return Err(failure),
                (None, _) => {}
            }
        }
        Ok(match effect {
            Effect::Transition(transitions) => EffectResult::Transitioned(self.transitions(transitions)),
            Effect::Delete(deletions) => EffectResult::Deleted(
                deletions
                    .into_iter()
                    .map(|d| {
                        assert_eq!(d.owner_run_id, RUN, "a deletion of another run's mark");
                        let record = self.instances[&d.instance_id].record.clone();
                        let holds = record.is_some_and(|r| r.state == "terminated" && r.run_id == RUN);
                        let result = self.write(&d.instance_id, holds, |r| *r = None);
                        (d, result)
                    })
                    .collect(),
            ),
            Effect::Send(announcements) => {
                for a in &announcements {
                    let record = self.instances[&a.instance.id].record.clone().expect("an announced record exists");
                    assert_eq!((record.state, record.run_id.as_str()), ("idle", ""), "announced but not released");
                    assert_eq!(record.released_by, RUN, "announced what the pool released");
                    assert_eq!(Some(record.threshold), self.idle_threshold, "announced at another threshold");
                    assert_eq!(a.threshold, record.threshold, "the message's threshold is the record's");
                }
                let delivered = announcements.iter().map(|a| a.instance.id.clone()).collect();
                EffectResult::Sent { delivered, failure: None }
            }
            Effect::CheckPool(ids) => {
                let mut membership = PoolMembership::default();
                for id in ids {
                    let instance = &self.instances[&id];
                    match (instance.known_to_ec2, instance.tagged) {
                        (false, _) => membership.unknown.push(id),
                        (true, true) => {
                            membership.members.insert(id, instance.tag_value.clone());
                        }
                        (true, false) => membership.foreign.push(id),
                    }
                }
                self.members = membership.members.keys().cloned().collect();
                EffectResult::Checked(membership)
            }
            Effect::Terminate(ids) => self.terminate(ids),
            Effect::Checkpoint => EffectResult::Checkpointed,
        })
    }
}

/// Runs a stage against the model; returns its verdict. A [`Poll::Last`] keeps its promise:
/// advancing the stage with the effect's result gives the verdict it announced (or the effect's
/// failure).
fn drive<S: Stage>(mut stage: S, model: &mut Model) -> Result<S::Verdict, Failure>
where
    S::Verdict: PartialEq + std::fmt::Debug,
{
    let mut results = Vec::new();
    for _ in 0..50 {
        let poll = stage.advance(model.now, std::mem::take(&mut results));
        stage.drain_found();
        match poll {
            Poll::Finished(verdict) => return verdict,
            Poll::Run(effects) => results = effects.into_iter().map(|e| model.answer(e)).collect(),
            Poll::Last(effect, promised) => {
                let outcome = model.answer(effect);
                let expected = outcome.clone().map(|_| promised);
                let Poll::Finished(verdict) = stage.advance(model.now, vec![outcome]) else {
                    panic!("a stage that announced its last effect asked for more")
                };
                stage.drain_found();
                assert_eq!(verdict, expected, "the verdict a last effect announced");
                return verdict;
            }
        }
    }
    panic!("the stage reached no verdict in 50 steps");
}

fn world(selected: usize, instances: Vec<Instance>, faults: Vec<u8>) -> (Spec, Model) {
    let spec = spec(selected, instances.len() - selected, true);
    let ids = spec.instances().map(|(_, i)| i.id.clone());
    let created = spec.creation.instances.iter().map(|i| i.id.clone()).collect();
    let model = Model {
        instances: ids.zip(instances).collect(),
        now: start(),
        faults,
        next_fault: 0,
        members: Vec::new(),
        created,
        idle_threshold: None,
    };
    (spec, model)
}

/// The evidence a resumed commit relies on: every transition the commit stage emits is one the
/// fenced transaction records in the run record's `committedIds` (`commit::committed_ids`), and
/// no other stage's transition is (issue 17's `commit-evidence-not-recorded` mutant).
#[test]
fn every_commit_transition_is_recorded_as_evidence_and_nothing_else_is() {
    let (spec, _) = world(2, vec![instance_with_record("claimed"), instance_with_record("created")], Vec::new());
    let mut commit = Commit::new(&spec, start().plus_secs(1_800), &[]);
    let Poll::Run(effects) = commit.advance(start(), Vec::new()) else { panic!("the commit transitions first") };
    let Some(Effect::Transition(transitions)) = effects.into_iter().next() else { panic!("transitions") };
    let ids: Vec<String> = spec.instances().map(|(_, i)| i.id.clone()).collect();
    assert_eq!(super::commit::committed_ids(&transitions, RUN), ids);
    let releases = super::rollback::transitions(&spec, start().plus_secs(300), &Default::default());
    assert!(super::commit::committed_ids(&releases, RUN).is_empty(), "a release is no commit");
}

fn instance_with_record(state: &'static str) -> Instance {
    let threshold = start().plus_secs(1_000);
    instance_with(Record { state, run_id: RUN.to_string(), threshold, released_by: String::new() })
}

/// An idle record in the pool at `threshold`, released by `by` (`""`: the pool's own release).
fn idle_released_by(threshold: Timestamp, by: &str) -> Instance {
    instance_with(Record { state: "idle", run_id: String::new(), threshold, released_by: by.to_string() })
}

/// A tagged instance EC2 knows, with `record`.
fn instance_with(record: Record) -> Instance {
    Instance {
        record: Some(record),
        tagged: true,
        tag_value: RUN.to_string(),
        known_to_ec2: true,
        refuse_termination: false,
    }
}

/// Cleanup's extra mark (issue 17's `mark-any-idle` mutant): an instance this run released and
/// could not announce again because its queue is gone is retired only if its record is still
/// exactly as released. Here the pool moved it meanwhile (claimed and released again, at another
/// idle threshold): the mark must be refused and the instance left in the pool, untouched.
#[test]
fn cleanup_retires_an_unannounced_release_only_while_it_is_exactly_as_released() {
    let idle = start().plus_secs(300);
    let (spec, mut model) = world(1, vec![idle_released_by(idle, RUN)], Vec::new());
    model.idle_threshold = Some(idle);
    let id = spec.instances().next().map(|(_, i)| i.id.clone()).expect("one instance");
    let mut stage = Cleanup::new(&spec, &[], Some(idle), start());
    let (mut results, mut sends) = (Vec::new(), 0);
    let verdict = loop {
        let poll = stage.advance(model.now, std::mem::take(&mut results));
        match poll {
            Poll::Finished(verdict) => break verdict,
            Poll::Last(effect, _) => results.push(model.answer(effect)),
            Poll::Run(effects) => {
                for effect in effects {
                    if let Effect::Send(_) = effect {
                        sends += 1;
                        // The queue is gone; meanwhile the pool re-released the instance later.
                        let record = model.instances.get_mut(&id).and_then(|i| i.record.as_mut()).expect("record");
                        record.threshold = idle.plus_secs(60);
                        let failure = Some(Failure::Gone("the queue is gone".into()));
                        results.push(Ok(EffectResult::Sent { delivered: Vec::new(), failure }));
                    } else {
                        results.push(model.answer(effect));
                    }
                }
            }
        }
    };
    assert_eq!(sends, 1, "the released instance was announced again once");
    assert!(verdict.is_ok(), "{verdict:?}");
    let record = model.instances[&id].record.clone().expect("the record stays");
    assert_eq!((record.state, record.run_id.as_str(), record.threshold), ("idle", "", idle.plus_secs(60)));
}

/// The pool's own release in the same second with the same idle time leaves the record exactly
/// as this run's rollback would have, but without this run's `releasedBy`: cleanup neither
/// announces it nor marks it (issue 19's "the pool's release must never look like one of ours").
#[test]
fn cleanup_leaves_alone_what_the_pool_released_at_its_own_idle_threshold() {
    let idle = start().plus_secs(300);
    let (spec, mut model) = world(1, vec![idle_released_by(idle, "")], Vec::new());
    model.idle_threshold = Some(idle);
    let id = spec.instances().next().map(|(_, i)| i.id.clone()).expect("one instance");
    let verdict = drive(Cleanup::new(&spec, &[], Some(idle), start()), &mut model);
    assert!(verdict.is_ok(), "{verdict:?}");
    let record = model.instances[&id].record.clone().expect("the record stays");
    assert_eq!((record.state, record.run_id.as_str(), record.threshold), ("idle", "", idle), "untouched");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn commit_writes_only_its_own_and_reports_only_what_it_found(
        instances in prop::collection::vec(instance(), 1..6),
        selected in 0usize..6,
        faults in prop::collection::vec(0u8..6, 0..4),
        earlier in prop::collection::vec(any::<bool>(), 6),
    ) {
        let selected = selected.min(instances.len());
        let (spec, mut model) = world(selected, instances, faults);
        let threshold = start().plus_secs(1_800);
        // Some instances' commits are known to have landed before (`committedIds`).
        let committed_earlier: Vec<String> =
            spec.instances().zip(&earlier).filter(|(_, e)| **e).map(|((_, i), _)| i.id.clone()).collect();
        if let Ok(_reason) = drive(Commit::new(&spec, threshold, &committed_earlier), &mut model) {
            for (_, instance) in spec.instances() {
                let record = model.instances[&instance.id].record.clone();
                let committed = record.as_ref().is_some_and(|r| r.state == "running" && r.run_id == RUN && r.threshold == threshold);
                // Only an instance whose commit landed earlier may count as handed on since.
                prop_assert!(committed || committed_earlier.contains(&instance.id), "Done without {} committed: {:?}", instance.id, record);
            }
        }
    }

    #[test]
    fn rollback_announces_only_what_it_released_and_terminates_only_what_it_marked(
        instances in prop::collection::vec(instance(), 1..6),
        selected in 0usize..6,
        faults in prop::collection::vec(0u8..6, 0..8),
    ) {
        let selected = selected.min(instances.len());
        let (spec, mut model) = world(selected, instances, faults);
        let idle = start().plus_secs(300);
        model.idle_threshold = Some(idle);
        let _ = drive(Rollback::new(&spec, idle, &[], false, start()), &mut model);
    }

    #[test]
    fn cleanup_terminates_only_what_it_marked_and_keeps_what_it_announced(
        instances in prop::collection::vec(instance(), 1..6),
        selected in 0usize..6,
        faults in prop::collection::vec(0u8..6, 0..8),
        rolled_back: bool,
    ) {
        let selected = selected.min(instances.len());
        let (spec, mut model) = world(selected, instances, faults);
        let idle = rolled_back.then(|| start().plus_secs(300));
        model.idle_threshold = idle;
        let sent = vec![spec.instances().next().map(|(_, i)| i.id.clone()).unwrap_or_default()];
        let before = model.instances[&sent[0]].record.clone();
        let _ = drive(Cleanup::new(&spec, &sent, idle, start()), &mut model);
        let after = model.instances[&sent[0]].record.clone();
        prop_assert_eq!(before.map(|r| (r.state, r.run_id)), after.map(|r| (r.state, r.run_id)), "an announced instance was touched");
    }
}
