//! The retire protocol, shared by rollback and emergency cleanup: mark and pool check →
//! terminate → delete.
//!
//! 1. **Mark.** Each record this run holds, in any state, becomes `terminated` (runId kept,
//!    threshold `marked_at`); refresh's own mark is accepted too. Once marked, no other actor
//!    moves the record (selection takes `idle`, release `running`, refresh
//!    `idle`/`claimed`/`running`), so terminating the instance next cannot hit one somebody else
//!    holds. With `released_unsent`, a record this run released at that threshold and never
//!    announced is marked as well: nothing would ever claim it.
//! 2. **Pool check,** beside the marks (one round trip for both): every instance to mark is
//!    looked up, and the answer is read only for those the marks leave to terminate (EC2's tags
//!    are set at launch: a look beside the mark sees what a look after it would). Only instances
//!    with the pool tag are terminated; one without it is reported and never terminated. An
//!    instance with no record is terminated only if [`unrecorded::may_terminate`] allows it:
//!    listed in the spec's creation list, and tagged with this run's id. Any other is left alone
//!    and reported.
//! 3. **Terminate.** A refused termination keeps the marked record (and is reported).
//! 4. **Delete** the marked records of the instances EC2 terminated, conditional on the mark. A
//!    record never disappears while its instance may live on. An instance EC2 does not know yet
//!    (marked, or without a record) makes the run wait ([`Failure::NotYet`]) while the mark is
//!    younger than [`UNKNOWN_INSTANCE_GRACE_SECS`]; after that, it is long gone, and a marked
//!    record goes too. The deletions are the protocol's last effect ([`Poll::Last`]): the
//!    caller may finish its run in the same write.
//!
//! Architecture invariant: a record is deleted only after its mark landed and EC2 terminated
//! the instance (or long forgot it); an instance is terminated only after its mark landed (or
//! it has no record, is in the creation list and its pool tag names this run) and only with the
//! pool tag.

use std::collections::HashSet;

use super::effect::{single, Effect, EffectResult, Failure, Found, Outcome, Poll};
use super::unrecorded::{self, Acting};
use super::Stage;
use crate::core::{
    classify_transition, Expectation, Finding, InstanceDeletion, InstanceState, InstanceTransition, ThresholdCondition,
    WriteResult,
};
use crate::ports::{PoolMembership, Termination};
use crate::spec::{PoolInstance, Role};
use crate::timestamp::Timestamp;

/// How long after a record was marked `terminated` an instance EC2 does not know is still taken
/// for a fresh one that eventual consistency hides (the run stalls, resumable, and tries again),
/// rather than for one long gone (its record is deleted). EC2 hides fresh ids for seconds, and
/// shows terminated instances for about an hour.
pub const UNKNOWN_INSTANCE_GRACE_SECS: i64 = 600;

/// What retiring a set of instances did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retired {
    /// Instances terminated.
    pub terminated: usize,
    /// Instances whose mark found them in the pool exactly as this run released them (idle,
    /// runId `""`, the run's idle threshold): announced or not, this run cannot tell.
    pub released: Vec<String>,
}

/// What retiring does with one instance after its mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Marked by this run (now or earlier): terminate the instance, then delete the record.
    TerminateThenDelete,
    /// No record: nothing can ever claim it again, so it is terminated if it is this run's own
    /// (see [`unrecorded::may_terminate`]), or it would leak; any other is left alone.
    TerminateOnly,
    /// Found exactly as this run's rollback released it: the caller decides (announce again).
    Released,
    /// Somebody else holds it, or it is in a state this run does not retire: leave it alone.
    LeaveAlone,
}

/// How this run's rollback released records, if it got that far: at its idle threshold, with
/// its attempt's record identifier in `releasedBy` (`rollback::transitions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The idle threshold the records were released at.
    pub threshold: Timestamp,
    /// The `releasedBy` the releases wrote.
    pub by: String,
}

/// The marks: see the module docs.
pub fn marks(
    run_id: &str,
    instances: &[(Role, &PoolInstance)],
    released_unsent: Option<&Released>,
    marked_at: Timestamp,
) -> Vec<InstanceTransition> {
    let held = Expectation {
        states: vec![InstanceState::Claimed, InstanceState::Running, InstanceState::Created, InstanceState::Terminated],
        run_id: run_id.to_string(),
        threshold: ThresholdCondition::Any,
        released_by: None,
    };
    // Exactly as this run released it: the pool's release may leave the same state, runId and
    // threshold, but never this run's `releasedBy`.
    let released = released_unsent.map(|released| Expectation {
        states: vec![InstanceState::Idle],
        run_id: String::new(),
        threshold: ThresholdCondition::Exactly(released.threshold),
        released_by: Some(released.by.clone()),
    });
    instances
        .iter()
        .map(|(role, instance)| InstanceTransition {
            instance_id: instance.id.clone(),
            role: *role,
            expected: std::iter::once(held.clone()).chain(released.clone()).collect(),
            new_state: InstanceState::Terminated,
            new_run_id: run_id.to_string(),
            new_threshold: marked_at,
            released_by: None,
        })
        .collect()
}

/// The rule for one mark's result. `released`: how this run released records, when a record
/// found exactly so (its threshold and its `releasedBy`) is the caller's to decide.
pub fn disposition(
    mark: &InstanceTransition,
    result: &WriteResult,
    released: Option<&Released>,
) -> (Disposition, Finding) {
    let finding = classify_transition(mark, result).expect("cancelled writes were re-sent");
    if let (Some(released), WriteResult::Rejected(Some(found))) = (released, result) {
        if found.state == InstanceState::Idle.as_str()
            && found.run_id.is_empty()
            && found.threshold == released.threshold.to_string()
            && found.released_by == released.by
        {
            return (Disposition::Released, finding);
        }
    }
    let disposition = match finding {
        Finding::Done => Disposition::TerminateThenDelete,
        Finding::Missing => Disposition::TerminateOnly,
        Finding::OwnedByOther { .. } | Finding::Expired { .. } | Finding::WrongState { .. } => Disposition::LeaveAlone,
    };
    (disposition, finding)
}

/// What the stage waits for: the result of the effect it returned last.
enum Phase {
    Start,
    MarksAndPool,
    Checkpoint,
    Termination,
    DeleteCheckpoint(Vec<InstanceDeletion>),
    Deletions,
    Over,
}

/// The retire stage for a set of instances.
pub struct Retire {
    run_id: String,
    marked_at: Timestamp,
    released: Option<Released>,
    marks: Vec<InstanceTransition>,
    phase: Phase,
    marked: Vec<String>,
    unrecorded: Vec<String>,
    released_ids: Vec<String>,
    terminated: Vec<String>,
    /// Instances EC2 does not know: while the mark is fresh, the run waits for them.
    unknown_fresh: Vec<String>,
    /// Instances DescribeInstances did not know, until termination adds its own.
    unknown_marked: Vec<String>,
    /// The pool check's answer, read once the marks' results are known.
    membership: PoolMembership,
    found: Vec<Found>,
}

impl Retire {
    /// Retires `instances` of run `run_id`; `released_unsent` and `released` as in [`marks`] and
    /// [`disposition`]; `marked_at` is when the run entered the retiring state (a stable
    /// threshold for the marks, the same on every resume).
    pub fn new(
        run_id: &str,
        instances: &[(Role, &PoolInstance)],
        released_unsent: Option<&Released>,
        released: Option<&Released>,
        marked_at: Timestamp,
    ) -> Retire {
        Retire {
            run_id: run_id.to_string(),
            marked_at,
            released: released.cloned(),
            marks: marks(run_id, instances, released_unsent, marked_at),
            phase: Phase::Start,
            marked: Vec::new(),
            unrecorded: Vec::new(),
            released_ids: Vec::new(),
            terminated: Vec::new(),
            unknown_fresh: Vec::new(),
            unknown_marked: Vec::new(),
            membership: PoolMembership::default(),
            found: Vec::new(),
        }
    }

    fn handle_marks(&mut self, results: Vec<(InstanceTransition, WriteResult)>) {
        for (mark, result) in &results {
            let id = mark.instance_id.clone();
            match disposition(mark, result, self.released.as_ref()) {
                (Disposition::TerminateThenDelete, _) => self.marked.push(id),
                (Disposition::TerminateOnly, _) if mark.role == Role::Created => self.unrecorded.push(id),
                // A selected instance without a record: launched by another run, whatever its
                // tag says, so the rule leaves it alone without asking EC2.
                (Disposition::TerminateOnly, _) => {
                    let acting = Acting::Run { run_id: &self.run_id, in_creation_list: false };
                    if let Err(left) = unrecorded::may_terminate(acting, "") {
                        self.found.push(Found::new(id, left));
                    }
                }
                (Disposition::Released, _) => self.released_ids.push(id),
                (Disposition::LeaveAlone, finding) => self.found.push(Found::new(id, finding.to_string())),
            }
        }
    }

    /// The results of the marks and the pool check, run side by side: the marks' findings are
    /// kept even when the pool check failed; the marks' failure comes first.
    fn handle_marks_and_pool(&mut self, results: Vec<Outcome>) -> Result<(), Failure> {
        let mut results = results.into_iter();
        let (marks, pool) =
            (results.next().expect("the marks' result"), results.next().expect("the pool check's result"));
        debug_assert!(results.next().is_none(), "two effects, two results");
        self.handle_marks(marks?.into_transitioned().expect("the result matches the effect"));
        self.membership = pool?.into_checked().expect("the result matches the effect");
        Ok(())
    }

    /// The instances to terminate: the marked ones with the pool tag, and those without a record
    /// that the rule for them allows (the tag's value decides). The pool check looked up every
    /// instance to mark; only the candidates' answers count (one somebody else holds is not
    /// this run's to report or to wait for).
    fn handle_pool(&mut self) -> Vec<String> {
        let membership = std::mem::take(&mut self.membership);
        let candidates: HashSet<&String> = self.marked.iter().chain(&self.unrecorded).collect();
        for id in membership.foreign.iter().filter(|id| candidates.contains(id)) {
            self.found.push(Found::new(id, "not a pool instance"));
        }
        self.unknown_marked = membership.unknown.into_iter().filter(|id| candidates.contains(id)).collect();
        let mut terminate = Vec::with_capacity(membership.members.len());
        // In the order of the marks, the marked ones first, as the pool check asked.
        for id in &self.marked {
            if membership.members.contains_key(id) {
                terminate.push(id.clone());
            }
        }
        for id in &self.unrecorded {
            let Some(tag_value) = membership.members.get(id) else { continue };
            let acting = Acting::Run { run_id: &self.run_id, in_creation_list: true };
            match unrecorded::may_terminate(acting, tag_value) {
                Ok(()) => terminate.push(id.clone()),
                Err(left) => self.found.push(Found::new(id, left)),
            }
        }
        terminate
    }

    /// After termination: the deletions due now. An instance EC2 does not know (yet), marked or
    /// without a record, makes the run wait while the mark is fresh: a fresh instance can be
    /// unknown for seconds, and one without a record would leak if it were dropped now. Once the
    /// mark is older than [`UNKNOWN_INSTANCE_GRACE_SECS`], it is long gone, and a marked record
    /// goes too. A foreign instance or a refused termination keeps its marked record for good.
    fn handle_termination(&mut self, now: Timestamp, termination: Termination) -> Vec<InstanceDeletion> {
        for (id, error) in &termination.refused {
            self.found.push(Found::new(id, format!("termination refused: {error}")));
        }
        let fresh = now.unix_secs() - self.marked_at.unix_secs() < UNKNOWN_INSTANCE_GRACE_SECS;
        let mut unknown: Vec<String> = termination.not_found;
        unknown.append(&mut self.unknown_marked);
        for id in &unknown {
            let finding = match (self.marked.contains(id), fresh) {
                (true, true) => "unknown to EC2 (yet): record kept, marked terminated",
                (true, false) => "unknown to EC2 long after its mark: gone",
                (false, true) => "no instance record and unknown to EC2 (yet): waiting to terminate it",
                (false, false) => "no instance record and unknown to EC2 long after: gone",
            };
            self.found.push(Found::new(id, finding));
        }
        let mut gone: HashSet<&String> = termination.terminated.iter().collect();
        if !fresh {
            gone.extend(unknown.iter());
        }
        let deletions = self
            .marked
            .iter()
            .filter(|id| gone.contains(id))
            .map(|id| InstanceDeletion { instance_id: id.clone(), owner_run_id: self.run_id.clone() })
            .collect();
        self.terminated = termination.terminated;
        if fresh {
            self.unknown_fresh = unknown;
        }
        deletions
    }

    fn verdict(&mut self) -> Poll<Retired> {
        self.phase = Phase::Over;
        if !self.unknown_fresh.is_empty() {
            return Poll::Finished(Err(Failure::NotYet(format!(
                "EC2 does not know {} instance(s) of this run yet (eventual consistency): {}; their records stay, marked terminated, and the run waits to terminate them; resume to finish",
                self.unknown_fresh.len(),
                self.unknown_fresh.join(", ")
            ))));
        }
        Poll::Finished(Ok(Retired {
            terminated: self.terminated.len(),
            released: std::mem::take(&mut self.released_ids),
        }))
    }
}

impl Stage for Retire {
    type Verdict = Retired;

    /// The protocol, top to bottom: each arm takes the result of the step before it.
    fn advance(&mut self, now: Timestamp, results: Vec<Outcome>) -> Poll<Retired> {
        let phase = std::mem::replace(&mut self.phase, Phase::Over);
        let next = match phase {
            Phase::Start if self.marks.is_empty() => return self.verdict(),
            Phase::Start => {
                let ids = self.marks.iter().map(|mark| mark.instance_id.clone()).collect();
                self.phase = Phase::MarksAndPool;
                return Poll::Run(vec![Effect::Transition(std::mem::take(&mut self.marks)), Effect::CheckPool(ids)]);
            }
            Phase::MarksAndPool => {
                self.handle_marks_and_pool(results).map(|()| (Phase::Checkpoint, Effect::Checkpoint))
            }
            Phase::Checkpoint => single(results, EffectResult::into_checkpointed)
                .map(|()| (Phase::Termination, Effect::Terminate(self.handle_pool()))),
            Phase::Termination => match single(results, EffectResult::into_terminated) {
                Ok(termination) => {
                    let deletions = self.handle_termination(now, termination);
                    if deletions.is_empty() {
                        return self.verdict();
                    }
                    Ok((Phase::DeleteCheckpoint(deletions), Effect::Checkpoint))
                }
                Err(failure) => Err(failure),
            },
            Phase::DeleteCheckpoint(deletions) => match single(results, EffectResult::into_checkpointed) {
                Ok(()) => {
                    self.phase = Phase::Deletions;
                    // The verdict is known before the deletions: what they find changes nothing.
                    if self.unknown_fresh.is_empty() {
                        let retired =
                            Retired { terminated: self.terminated.len(), released: self.released_ids.clone() };
                        return Poll::Last(Effect::Delete(deletions), retired);
                    }
                    return Poll::Run(vec![Effect::Delete(deletions)]);
                }
                Err(failure) => Err(failure),
            },
            // A deletion refused because the record is no longer this run's mark changes nothing:
            // the record stays for its new owner.
            Phase::Deletions => match single(results, EffectResult::into_deleted) {
                Ok(_) => return self.verdict(),
                Err(failure) => Err(failure),
            },
            Phase::Over => unreachable!("a finished stage is not advanced"),
        };
        match next {
            Ok((phase, effect)) => {
                self.phase = phase;
                Poll::Run(vec![effect])
            }
            Err(failure) => Poll::Finished(Err(failure)),
        }
    }

    fn drain_found(&mut self) -> Vec<Found> {
        std::mem::take(&mut self.found)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::spec::tests::{instance_json, spec_json};
    use crate::spec::Spec;

    fn start() -> Timestamp {
        Timestamp::parse("2026-11-30T12:00:00Z").unwrap()
    }

    /// Drives one marked instance that EC2 does not know through the protocol, `age` seconds
    /// after its mark: returns the deletions it asks for, or its verdict.
    fn unknown_after(age: i64) -> Result<Vec<InstanceDeletion>, Failure> {
        let value = crate::spec::tests::instance_json("i-00000000000000001", "large");
        let instance: PoolInstance = serde_json::from_value(value).expect("an instance");
        let mut retire = Retire::new("9876543210", &[(Role::Selected, &instance)], None, None, start());
        let now = start().plus_secs(age);
        let Poll::Run(effects) = retire.advance(now, Vec::new()) else { panic!("marks first") };
        let Some(Effect::Transition(marks)) = effects.into_iter().next() else { panic!("marks first") };
        let marked = marks.into_iter().map(|m| (m, WriteResult::Applied)).collect();
        let unknown = PoolMembership { unknown: vec![instance.id.clone()], ..PoolMembership::default() };
        let mut answers = vec![
            EffectResult::Checkpointed,
            EffectResult::Terminated(Termination::default()),
            EffectResult::Checkpointed,
        ]
        .into_iter();
        let mut results = vec![Ok(EffectResult::Transitioned(marked)), Ok(EffectResult::Checked(unknown))];
        loop {
            match retire.advance(now, std::mem::take(&mut results)) {
                Poll::Run(effects) => match effects.into_iter().next() {
                    Some(Effect::Delete(deletions)) => return Ok(deletions),
                    _ => results = vec![Ok(answers.next().expect("an answer for each step"))],
                },
                Poll::Last(Effect::Delete(deletions), _) => return Ok(deletions),
                Poll::Last(other, _) => panic!("only deletions come last, got {other:?}"),
                Poll::Finished(verdict) => return verdict.map(|_| Vec::new()),
            }
        }
    }

    #[test]
    fn an_unknown_instance_keeps_its_record_while_its_mark_is_fresh() {
        assert!(matches!(unknown_after(10), Err(Failure::NotYet(_))));
    }

    #[test]
    fn an_unknown_instance_long_after_its_mark_is_gone_and_its_record_deleted() {
        let deletions = unknown_after(UNKNOWN_INSTANCE_GRACE_SECS + 100).expect("no wait");
        assert_eq!(deletions.len(), 1, "the long-gone instance's record is deleted");
    }

    const SELECTED: &str = "i-0aaaaaaaaaaaaaaaa";
    const OWN: &str = "i-0bbbbbbbbbbbbbbbb";
    const OTHERS: &str = "i-0cccccccccccccccc";

    /// Run 9876543210: one selected and two created instances, none with a record.
    fn spec() -> Spec {
        let mut value = spec_json();
        value["creation"]["numInstancesCreated"] = 2.into();
        value["selection"]["numInstancesRequired"] = 3.into();
        value["creation"]["instances"] =
            serde_json::json!([instance_json(OWN, "large"), instance_json(OTHERS, "large")]);
        Spec::from_json(&value.to_string()).expect("a valid spec")
    }

    fn one(poll: Poll<Retired>) -> Effect {
        match poll {
            Poll::Run(mut effects) if effects.len() == 1 => effects.remove(0),
            other => panic!("expected one effect, got {other:?}"),
        }
    }

    /// The attack of issue 18: the spec lists, in its creation list, an instance another run
    /// launched (tagged with that run's id) and has not recorded yet. Only the instance tagged
    /// with this run's id is terminated; a selected instance without a record is left alone
    /// whatever its tag says (the pool check beside the marks looks it up with the rest). Both
    /// are reported.
    #[test]
    fn only_created_instances_tagged_with_this_run_are_terminated_without_a_record() {
        let spec = spec();
        let at = Timestamp::parse("2026-11-30T12:00:00Z").unwrap();
        let instances: Vec<(Role, &PoolInstance)> = spec.instances().collect();
        let mut retire = Retire::new(&spec.run_id, &instances, None, None, at);
        let Poll::Run(effects) = retire.advance(at, Vec::new()) else { panic!("marks first") };
        let [Effect::Transition(marks), Effect::CheckPool(looked_up)] = &effects[..] else {
            panic!("the marks and the pool check side by side, got {effects:?}")
        };
        assert_eq!(looked_up, &vec![SELECTED.to_string(), OWN.to_string(), OTHERS.to_string()]);
        let missing = marks.iter().map(|mark| (mark.clone(), WriteResult::Rejected(None))).collect();
        // Every instance carries the pool tag; the selected one names this run, as if it were ours.
        let members = BTreeMap::from([
            (SELECTED.to_string(), spec.run_id.clone()),
            (OWN.to_string(), spec.run_id.clone()),
            (OTHERS.to_string(), "1111".to_string()),
        ]);
        let membership = PoolMembership { members, ..PoolMembership::default() };
        let answers = vec![Ok(EffectResult::Transitioned(missing)), Ok(EffectResult::Checked(membership))];
        assert_eq!(one(retire.advance(at, answers)), Effect::Checkpoint);
        let terminate = one(retire.advance(at, vec![Ok(EffectResult::Checkpointed)]));
        assert_eq!(terminate, Effect::Terminate(vec![OWN.to_string()]));
        let done = Termination { terminated: vec![OWN.to_string()], ..Termination::default() };
        let verdict = retire.advance(at, vec![Ok(EffectResult::Terminated(done))]);
        assert_eq!(verdict, Poll::Finished(Ok(Retired { terminated: 1, released: Vec::new() })));
        let found: BTreeMap<String, String> = retire.drain_found().into_iter().map(|f| (f.id, f.finding)).collect();
        assert_eq!(
            found,
            BTreeMap::from([
                (SELECTED.to_string(), "no instance record, and not in this run's creation list".to_string()),
                (
                    OTHERS.to_string(),
                    "no instance record, and its pool tag names run \"1111\", not this run".to_string()
                ),
            ])
        );
    }

    /// The pool check runs beside the marks, so it looks up instances the marks then leave
    /// alone. Its answer counts only for those the marks leave to this run: an instance another
    /// run holds that EC2 does not know (yet), or that lacks the pool tag, neither makes the run
    /// wait nor is reported as anything but held by another.
    #[test]
    fn the_pool_check_counts_only_for_instances_the_marks_leave_to_this_run() {
        let spec = spec();
        let at = Timestamp::parse("2026-11-30T12:00:00Z").unwrap();
        let instances: Vec<(Role, &PoolInstance)> = spec.instances().collect();
        let mut retire = Retire::new(&spec.run_id, &instances, None, None, at);
        let Poll::Run(effects) = retire.advance(at, Vec::new()) else { panic!("marks first") };
        let [Effect::Transition(marks), Effect::CheckPool(_)] = &effects[..] else {
            panic!("the marks and the pool check side by side, got {effects:?}")
        };
        let held = crate::core::ObservedRecord {
            state: "claimed".into(),
            run_id: "1111".into(),
            threshold: "2026-11-30T13:00:00Z".into(),
            released_by: String::new(),
        };
        let refused = marks.iter().map(|mark| (mark.clone(), WriteResult::Rejected(Some(held.clone())))).collect();
        let membership = PoolMembership {
            unknown: vec![SELECTED.to_string(), OWN.to_string()],
            foreign: vec![OTHERS.to_string()],
            ..PoolMembership::default()
        };
        let answers = vec![Ok(EffectResult::Transitioned(refused)), Ok(EffectResult::Checked(membership))];
        assert_eq!(one(retire.advance(at, answers)), Effect::Checkpoint);
        assert_eq!(one(retire.advance(at, vec![Ok(EffectResult::Checkpointed)])), Effect::Terminate(Vec::new()));
        let verdict = retire.advance(at, vec![Ok(EffectResult::Terminated(Termination::default()))]);
        assert_eq!(verdict, Poll::Finished(Ok(Retired { terminated: 0, released: Vec::new() })));
        let found = retire.drain_found();
        assert_eq!(found.len(), 3, "one finding per instance: {found:?}");
        assert!(found.iter().all(|f| f.finding.contains("1111")), "held by another, nothing else: {found:?}");
    }
}
