//! The invariants of issue 10, each with a name, checked as the run goes (isolation at every
//! write, the terminal picture at the write that finishes the run) and at the end.
//!
//! - `a-isolation`: the run never deletes, overwrites or terminates an instance whose record
//!   another run or the pool holds;
//! - `b-terminal-picture`: once the run is `Done` or `Failed`, each of its instances is exactly one
//!   of: running for it with the commit threshold; idle with runId "" and announced in its pool
//!   queue; terminated with no live record; held by another actor;
//! - `c-no-leak`: no EC2 instance of the run is alive without a record;
//! - `d-no-dangling-record`: no live record points to an instance the run terminated;
//! - `e-outcome`: where no other actor touched the run's instances, the outcome is the one the
//!   fault-free run reaches;
//! - `f-fresh-now`: a transition conditional on `threshold > :now` never lands on a record that
//!   had expired, because of a `:now` read long before the write.

use post_provision::driver::OutcomeKind;
use post_provision::machine::State;

use post_provision::core::InstanceTransition;
use post_provision::timestamp::Timestamp;

use crate::dynamo::{self, InstanceItem};
use crate::swarm::Path;
use crate::world::World;

/// Known defects the allowlist may name (issue 9, until main fixes them).
/// Throttling that sends a healthy run to emergency cleanup.
pub const KNOWN_THROTTLING_CLEANS_UP: &str = "issue9-2";
/// Found by the simulation: emergency cleanup purges instances whose pool message was delivered
/// but not recorded in `messagesSent` (a sibling batch dropped when another failed, or a lost
/// answer), so an instance announced to the pool is terminated.
pub const FOUND_ANNOUNCED_PURGED: &str = "sim-announced-purged";
/// Found by the simulation: transaction conflicts that outlast `batch_rounds` (about 1.5 s of
/// re-sending) are an unexpected error, so contention sends a healthy run to emergency cleanup,
/// whatever `--on-retries-exhausted` says.
pub const FOUND_CONFLICTS_CLEAN_UP: &str = "sim-conflicts-clean-up";
/// Found by the simulation in main's issue-9 work: a resumed commit takes an instance that
/// another run holds for one "committed earlier and handed on since", although the first driver
/// died before its commit landed; the run ends `Done` with an instance it never held.
pub const FOUND_RESUMED_COMMIT_OF_FOREIGN: &str = "sim-resumed-commit-foreign";
/// The documented limitation (ARCHITECTURE, *The lease*): a process stopped in the middle of a
/// call sends it when it continues, minutes later, with the `:now` it had; the call lands on a
/// record that expired meanwhile (a claim released to the pool after its instance's boot agent may
/// already have terminated it).
pub const LIMITATION_STOPPED_PROCESS: &str = "limitation-stopped-process";
/// Found by the simulation: an id EC2 does not know yet (eventual consistency) is treated as
/// gone after the adapter's few retries; its record is deleted and the instance lives on.
pub const FOUND_NOT_FOUND_LEAK: &str = "sim-notfound-leak";

/// Checks a write of driver `client` that changed, deleted or terminated `id`, whose record was
/// `item` just before: it must not be another run's, or the pool's (an idle record announced in a
/// pool queue). A record the run released without announcing it is still the run's.
pub fn check_isolation(world: &mut World, client: u32, id: &str, item: &InstanceItem, what: &str) {
    let run_id = world.spec.run_id.clone();
    if item.state == "terminated" {
        return;
    }
    if item.run_id == run_id {
        // Attempts of one run share the runId: which attempt holds the instance says who may
        // write it.
        let holder = world.holder_attempt.get(id).copied().unwrap_or(1);
        let acting = world.clients.get(&client).map_or(1, |c| c.acting_attempt);
        if holder != acting {
            world.violate(
                "a-isolation",
                None,
                format!("driver {client}, acting for attempt {acting}, {what} {id}, which attempt {holder} holds ({} until {})", item.state, item.threshold),
            );
        }
        return;
    }
    let announced = world.sqs.was_announced_anywhere(id, &item.threshold);
    if item.run_id.is_empty() && item.state == "idle" && !announced {
        // Any attempt's release: each attempt purges its own unannounced releases.
        let attempts = world.table.attempts(&run_id).unwrap_or_default();
        if attempts.iter().filter_map(|r| r.idle_threshold).any(|t| t.to_string() == item.threshold) {
            return;
        }
    }
    let holder = if item.run_id.is_empty() { "the pool".to_string() } else { format!("run {}", item.run_id) };
    let known = (item.run_id.is_empty() && announced).then_some(FOUND_ANNOUNCED_PURGED);
    world.violate(
        "a-isolation",
        known,
        format!("driver {client} {what} {id}, whose record {holder} holds ({} until {})", item.state, item.threshold),
    );
}

/// How much older than the instant a write lands its `:now` may be: the adapter's retries of one
/// call send the same `:now` for up to the operation timeout (30 s), plus a margin.
const STALE_NOW_TOLERANCE_SECS: i64 = 35;

/// `f-fresh-now`, at every transition that lands: one that holds only because its
/// `threshold > :now` used a `:now` older than the call's own retries explain wrote a record that
/// had expired meanwhile (issue 9: "the clock is read once per stage").
pub fn check_fresh_now(
    world: &mut World,
    client: u32,
    transition: &InstanceTransition,
    item: &InstanceItem,
    now: Timestamp,
) {
    let actual = world.now();
    if now.unix_secs() + STALE_NOW_TOLERANCE_SECS >= actual.unix_secs() {
        return;
    }
    if dynamo::transition_condition(Some(item), transition, actual) {
        return;
    }
    // A process stopped (SIGSTOP) while its call was on the way sends that call late, with the
    // `:now` it had: the documented limitation of a stopped process, not a stale clock reading.
    let stopped = world.clients.get(&client).is_some_and(|c| c.paused_until > now.unix_secs());
    world.violate(
        "f-fresh-now",
        stopped.then_some(LIMITATION_STOPPED_PROCESS),
        format!(
            "driver {client} moved {} to {} with :now {now}, {} s old: the record had expired at {}",
            transition.instance_id,
            transition.new_state.as_str(),
            actual.unix_secs() - now.unix_secs(),
            item.threshold
        ),
    );
}

/// After every port call: the invariants that hold at every instant. Isolation is checked at the
/// writes themselves; here, the run record must never go back from a finished state.
pub fn after_step(world: &mut World) {
    if world.terminal_checked {
        let state = world
            .table
            .runs
            .get(&world.spec.run_id)
            .and_then(|v| v.get("state"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        if !matches!(state.as_deref(), Some("Done" | "Failed")) {
            world.violate("b-terminal-picture", None, format!("the finished run's record is now in state {state:?}"));
        }
    }
}

/// When the run's record is first written in `Done` or `Failed`.
pub fn on_terminal(world: &mut World) {
    if world.terminal_checked {
        return;
    }
    world.terminal_checked = true;
    world.terminal_at_secs = Some(world.elapsed_secs());
    check_terminal_picture(world);
    check_no_leak(world);
    check_no_dangling_record(world);
}

fn check_terminal_picture(world: &mut World) {
    let run_id = world.spec.run_id.clone();
    let Some(record) = world.table.run(&run_id).ok().flatten() else { return };
    let commit_threshold = record.commit_threshold.map(|t| t.to_string());
    let instances: Vec<(String, String)> =
        world.run_instances.iter().map(|(id, class)| (id.clone(), class.clone())).collect();
    for (id, class) in instances {
        let item = world.table.instances.get(&id);
        let alive = world.ec2.alive(&id);
        let fine = match item {
            Some(item) if item.run_id == run_id && world.holder_attempt.get(&id).is_some_and(|a| *a != 1) => true,
            Some(item) if item.state == "running" && item.run_id == run_id => {
                record.state == State::Done && commit_threshold.as_deref() == Some(item.threshold.as_str())
            }
            Some(item) if item.state == "idle" && item.run_id.is_empty() => {
                world.queue_urls.get(&class).is_some_and(|url| world.sqs.was_announced(url, &id, &item.threshold))
            }
            // A foreign instance (no pool tag) is never terminated; its record stays marked.
            Some(item) if item.state == "terminated" => !alive || !world.ec2.pool_tagged(&id),
            Some(item) if item.run_id != run_id && !item.run_id.is_empty() => true,
            Some(_) => false,
            None => !alive,
        };
        if !fine {
            let found = item.map_or("no record".to_string(), |i| {
                format!("record {} runId {:?} threshold {}", i.state, i.run_id, i.threshold)
            });
            let known =
                (item.is_none() && alive && world.reported_not_found.contains(&id)).then_some(FOUND_NOT_FOUND_LEAK);
            world.violate(
                "b-terminal-picture",
                known,
                format!(
                    "run {} {}: instance {id} is left with {found}, EC2 {}",
                    run_id,
                    record.state,
                    if alive { "alive" } else { "terminated" }
                ),
            );
        }
    }
}

/// `c-no-leak`.
pub fn check_no_leak(world: &mut World) {
    let leaked: Vec<String> = world
        .run_instances
        .keys()
        .chain(world.other_attempt_instances.keys())
        .filter(|id| world.ec2.alive(id) && !world.table.instances.contains_key(*id))
        .cloned()
        .collect();
    for id in leaked {
        let known = world.reported_not_found.contains(&id).then_some(FOUND_NOT_FOUND_LEAK);
        world.violate("c-no-leak", known, format!("instance {id} of the run is alive without a record"));
    }
}

/// `d-no-dangling-record`.
pub fn check_no_dangling_record(world: &mut World) {
    let dangling: Vec<String> = world
        .terminated_by_run
        .iter()
        .filter(|id| world.table.instances.get(*id).is_some_and(|item| item.state != "terminated"))
        .cloned()
        .collect();
    for id in dangling {
        let item = &world.table.instances[&id];
        let text = format!("the run terminated {id}, but its record is {} runId {:?}", item.state, item.run_id);
        world.violate("d-no-dangling-record", None, text);
    }
}

/// At the end of the seed, with the run's final outcome (`None`: never finished).
pub fn at_end(world: &mut World, outcome: Option<OutcomeKind>) {
    if !world.terminal_checked {
        world.violate("liveness", None, "the run did not finish, even after calm resumes".to_string());
        return;
    }
    check_no_leak(world);
    check_no_dangling_record(world);
    let Some(outcome) = outcome else { return };
    if !world.touched.is_empty() {
        return;
    }
    let expected = match world.swarm.path {
        Path::Commit => OutcomeKind::Committed,
        Path::Rollback => OutcomeKind::RolledBack,
        Path::Cleanup => OutcomeKind::CleanedUp,
    };
    // A commit is only the fault-free outcome while every instance was still unexpired: a run
    // slowed past its claims' thresholds (pauses, long faults) fails its commit by design.
    if world.swarm.path == Path::Commit && world.terminal_at_secs.unwrap_or(i64::MAX) >= world.earliest_threshold_secs {
        return;
    }
    if outcome == expected {
        return;
    }
    // The run record says why it went to emergency cleanup: that, not the faults seen, decides,
    // so that one defect cannot hide behind a fault that happened to be seen too.
    let error = world
        .table
        .run(&world.spec.run_id)
        .ok()
        .flatten()
        .and_then(|record| record.error)
        .map(|error| error.message)
        .unwrap_or_default();
    let load = error.contains("hrottl") || error.contains("still conflicting");
    // By design (`--on-retries-exhausted clean-up`, the default), a 5xx, timeout or lost answer
    // that outlasts the retries sends commit and rollback to emergency cleanup; load never does.
    if outcome == OutcomeKind::CleanedUp && world.outcome_may_change && !world.swarm.stall_on_exhausted && !load {
        return;
    }
    let resumed = world.clients.len() > 1;
    let known = match (outcome, expected) {
        (OutcomeKind::CleanedUp, _) if error.contains("still conflicting") => Some(FOUND_CONFLICTS_CLEAN_UP),
        (OutcomeKind::CleanedUp, _) if error.contains("hrottl") => Some(KNOWN_THROTTLING_CLEANS_UP),
        (OutcomeKind::Committed, OutcomeKind::CleanedUp) if resumed => Some(FOUND_RESUMED_COMMIT_OF_FOREIGN),
        _ => None,
    };
    let causes: Vec<&str> = [
        (world.throttled, "throttling"),
        (world.conflicted, "transaction conflicts"),
        (world.outcome_may_change, "5xx/timeouts/lost answers"),
        (resumed, "a resume"),
    ]
    .iter()
    .filter(|(seen, _)| *seen)
    .map(|(_, name)| *name)
    .collect();
    world.violate(
        "e-outcome",
        known,
        format!(
            "no other actor touched the run, yet it ended {outcome:?} instead of {expected:?} (seen: {}){}",
            if causes.is_empty() { "nothing".to_string() } else { causes.join(", ") },
            if error.is_empty() { String::new() } else { format!("; its error: {error}") }
        ),
    );
}
