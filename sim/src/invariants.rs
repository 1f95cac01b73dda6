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
//! - `e-outcome`: the outcome is the one the fault-free run reaches, or the reason that allows
//!   another is named from the write log and the record (never "an actor touched the run");
//! - `f-write-allowed` (issue 17): each write a driver makes, judged against the record as it was
//!   and the *true* time when it landed — an oracle built from the data model, independent of the
//!   conditions the code sends ([`check_write`]);
//! - `g-outcome-honest`: the outcome a run reports agrees with the write log ([`check_outcome`]);
//! - `h-one-driver`: two drivers never act on one attempt at once ([`check_one_driver`]);
//! - `i-live-behind`: at the end, a live instance stands behind every `running` and `idle` record
//!   (or it died after its record expired), and no `created` record ever became `idle`.

use post_provision::driver::OutcomeKind;
use post_provision::machine::State;

use post_provision::timestamp::Timestamp;

use crate::dynamo::InstanceItem;
use crate::swarm::Path;
use crate::world::{Who, World};

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
    // A terminated record is checked too: refresh's mark (runId "") and another run's mark are
    // theirs to write. Terminating an instance that is marked already is the oracle's to judge
    // (`check_termination`): it changes nothing.
    if item.state == "terminated" && what == "terminated" {
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
    let announced = world.sqs.was_announced_anywhere(id, &item.threshold, world.now_unix());
    if item.run_id.is_empty() && item.state == "idle" && !announced {
        // Any attempt's release: each attempt purges its own unannounced releases.
        let attempts = world.table.attempts(&run_id).unwrap_or_default();
        if attempts.iter().filter_map(|r| r.idle_threshold).any(|t| t.to_string() == item.threshold) {
            return;
        }
    }
    let holder = if item.run_id.is_empty() { "the pool".to_string() } else { format!("run {}", item.run_id) };
    let known = (item.run_id.is_empty() && announced).then(|| announced_purge_tag(world));
    world.violate(
        "a-isolation",
        known,
        format!("driver {client} {what} {id}, whose record {holder} holds ({} until {})", item.state, item.threshold),
    );
}

/// Found by the simulation with queues that refuse for good (issue 17's "lost pool messages"): in a
/// rollback over two resource classes, one queue refusing for good makes `send_messages` drop the
/// other class's batch after SQS accepted it; emergency cleanup then marks and terminates those
/// announced instances.
pub const FOUND_LOST_POOL_MESSAGES: &str = "sim-lost-pool-messages";
/// Found by the simulation (issue 17's "stale time in the one-transaction rollback"): a write
/// carries a `:now` read before an *earlier* call (the one-transaction rollback reads it before
/// `resolve_queues`, which may take 30 s, or longer when the process is stopped there), so it
/// lands on a record that expired meanwhile. A pause inside the call itself is
/// `limitation-stopped-process` instead.
pub const FOUND_STALE_NOW: &str = "sim-stale-now";
/// Found by the simulation (issue 17's "a silently dropped instance"): a created instance without
/// a record that EC2 does not know yet (eventual consistency) is dropped without a word: neither
/// terminated nor waited for, so it lives on without a record.
pub const FOUND_DROPPED_RECORDLESS: &str = "sim-dropped-recordless";
/// Found by the simulation: `--force` while another driver of the attempt is alive (a later
/// attempt's driver finishing it): both write. A fencing epoch bumped at take-over refuses the
/// older driver's writes.
pub const FOUND_FORCED_TAKE_OVER: &str = "sim-forced-take-over";

/// Which known defect an announced idle record marked by the run is: with a queue that refused
/// this run's driver for good, the lost pool messages; otherwise the older form.
fn announced_purge_tag(world: &World) -> &'static str {
    if world.ledger.queue_refused_driver {
        FOUND_LOST_POOL_MESSAGES
    } else {
        FOUND_ANNOUNCED_PURGED
    }
}

/// How much older than the instant a write lands its `:now` may be, by the driver's own clock:
/// the adapter's retries of one call send the same `:now` for up to the operation timeout (30 s),
/// plus a margin.
const STALE_NOW_TOLERANCE_SECS: i64 = 35;

/// Found by the clocks per machine (issue 17, item 2): a driver judges a record's expiry with its
/// own clock, so one whose clock runs behind commits or releases a record that had expired by
/// the true time (a boot agent whose clock runs ahead may have terminated it already).
pub const FOUND_SKEWED_EXPIRY: &str = "sim-skewed-expiry";
/// Found by the clocks per machine: a resumer or sweeper whose clock runs ahead takes over a live
/// driver whose lease has not passed, and both write (issue 17: "the fence is each machine's
/// clock").
pub const FOUND_SKEWED_TAKE_OVER: &str = "sim-skewed-take-over";
/// The original pool's own clocks: release (or selection) whose clock runs behind moves a record
/// that expired by the true time, after the boot agent (clock ahead) terminated its instance. Not
/// post-provision's write; listed so the pool's limit is visible.
pub const POOL_SKEWED_EXPIRY: &str = "pool-skewed-expiry";

/// The one exact reason a driver's write may land on a record that expired by the true time:
/// the driver's process was stopped (SIGSTOP, a paused VM) *during that call*, and the record was
/// unexpired by the true time when the driver read the `:now` the call carries. Every instance
/// write is conditional on the state and runId read, so the late write cannot take a record
/// another actor moved (refresh's mark or selection's claim refuses it), and a take-over meanwhile
/// fences it (`h-one-driver`); what remains is a record moved past its threshold while its boot
/// agent may terminate the instance (`i-live-behind`). No store can refuse it: DynamoDB has no
/// server clock in a condition, and SigV4's 5-minute bound on `X-Amz-Date` counts from signing,
/// which the SDK redoes for every retry attempt, not from when `:now` was read (sim/FINDINGS.md).
pub const LATE_BY_STOPPED_PROCESS: &str = "allowed: a write delayed by its stopped process (no server clock)";

/// How far a driver's clock may drift during one stopped call (2,000 ppm over ten minutes).
const DRIFT_DURING_STOP_SECS: i64 = 2;

/// [`LATE_BY_STOPPED_PROCESS`]: whether driver `client`'s write with `:now` `now` on a record of
/// `threshold` is late only because the process was stopped during the call.
fn late_by_stop(world: &World, client: u32, now: Timestamp, threshold: &str) -> bool {
    if !world.clients.get(&client).is_some_and(|c| c.paused_call) {
        return false;
    }
    let clock = world.clocks.drivers.get(&client).copied().unwrap_or_default();
    let offset_secs = clock.offset_ms(world.elapsed_ms()).div_euclid(1000);
    // The true time at which the driver read `now`, less what its clock may have drifted since.
    let read_at = now.unix_secs() - offset_secs - DRIFT_DURING_STOP_SECS;
    Timestamp::parse(threshold).is_ok_and(|t| t.unix_secs() > read_at)
}

/// Why a driver's `:now` disagreed with the true time when its write landed.
fn stale_reason(world: &World, client: u32, now: Timestamp) -> (Option<&'static str>, String) {
    let client_state = world.clients.get(&client);
    if client_state.is_some_and(|c| c.paused_call) {
        return (Some(LIMITATION_STOPPED_PROCESS), "the process was stopped during the call".into());
    }
    let reading = world.read(world.clocks.drivers.get(&client).copied().unwrap_or_default());
    let age = reading.unix_secs() - now.unix_secs();
    if age > STALE_NOW_TOLERANCE_SECS {
        return (Some(FOUND_STALE_NOW), format!("its :now was read {age} s before the write, by its own clock"));
    }
    let offset = reading.unix_secs() - world.now_unix();
    (Some(FOUND_SKEWED_EXPIRY), format!("its clock reads {offset:+} s off the true time"))
}

/// `f-write-allowed`, at every instance write of driver `client` that landed: `before` is the
/// record as it was, `after` as written (`None`: deleted), `now` the `:now` the call carried.
/// The rules come from the data model (`pool-data-model.md`), not from the transitions' conditions.
pub fn check_write(
    world: &mut World,
    client: u32,
    id: &str,
    before: Option<&InstanceItem>,
    after: Option<&InstanceItem>,
    now: Option<Timestamp>,
) {
    let run_id = world.spec.run_id.clone();
    let true_now = world.now().to_string();
    let Some(before) = before else { return };
    let ours = before.run_id == run_id;
    let unexpired = before.threshold > true_now;
    let fault = match after.map(|a| (a.state.as_str(), a.run_id.as_str())) {
        None if before.state == "terminated" && ours => return,
        None => format!("deleted a record that is not this run's mark ({} of {:?})", before.state, before.run_id),
        Some(("running", new_run)) if new_run == run_id && ours => match before.state.as_str() {
            "claimed" | "created" | "running" if unexpired => return,
            "claimed" | "created" | "running" => format!("committed a record that had expired at {}", before.threshold),
            state => format!("committed a record in state {state}"),
        },
        Some(("idle", "")) if ours => match before.state.as_str() {
            "created" => "returned an unvalidated created instance to the pool".to_string(),
            "claimed" | "running" if unexpired => return,
            "claimed" | "running" => format!("released a record that had expired at {}", before.threshold),
            state => format!("released a record in state {state}"),
        },
        Some(("terminated", new_run)) if new_run == run_id => {
            if ours && before.state != "idle" {
                return;
            }
            let own_release = before.state == "idle" && before.run_id.is_empty() && {
                let attempt = world.clients.get(&client).map_or(1, |c| c.acting_attempt);
                let identifier = post_provision::record::record_identifier(&run_id, attempt);
                let released = world.table.run(&identifier).ok().flatten().and_then(|r| r.idle_threshold);
                released.is_some_and(|t| t.to_string() == before.threshold)
            };
            let announced = world.sqs.was_announced_anywhere(id, &before.threshold, world.now_unix());
            if own_release && !announced {
                return;
            }
            let holder = if before.run_id.is_empty() { "the pool" } else { before.run_id.as_str() };
            let fault = format!("marked a {} record that {holder} holds", before.state);
            if own_release {
                let text = format!("driver {client} {fault}: its own release, announced ({id}, landed at {true_now})");
                let known = announced_purge_tag(world);
                return world.violate("f-write-allowed", Some(known), text);
            }
            fault
        }
        Some((state, new_run)) => format!("wrote {state} for {new_run:?} over {} of {:?}", before.state, before.run_id),
    };
    if fault.contains("expired") && now.is_some_and(|now| late_by_stop(world, client, now, &before.threshold)) {
        world.ledger.late_by_stop.insert(id.to_string(), world.elapsed_ms());
        world.ledger.bad_writes.remove(id);
        world.event(LATE_BY_STOPPED_PROCESS);
        return;
    }
    let (known, why) = match now {
        Some(now) if fault.contains("expired") => stale_reason(world, client, now),
        _ => (None, String::new()),
    };
    world.ledger.bad_writes.insert(id.to_string(), known);
    world.violate(
        "f-write-allowed",
        known,
        format!("driver {client} {fault} ({id}, landed at {true_now}{}{why})", if why.is_empty() { "" } else { "; " }),
    );
}

/// `f-write-allowed` for a termination driver `client` sent, EC2 accepted, of a live instance: it
/// must follow this run's mark (or an instance without a record, which nobody holds).
pub fn check_termination(world: &mut World, client: u32, id: &str) {
    let run_id = world.spec.run_id.clone();
    match world.table.instances.get(id) {
        None => {}
        Some(item) if item.state == "terminated" && item.run_id == run_id => {}
        Some(item) => {
            let text = format!(
                "driver {client} terminated {id}, whose record is {} of {:?}: not this run's mark",
                item.state, item.run_id
            );
            world.violate("f-write-allowed", None, text);
        }
    }
}

/// `f-write-allowed` for a pool message of driver `client`: it announces only an instance this
/// run released, at the threshold it released it with.
pub fn check_send(world: &mut World, client: u32, id: &str, threshold: &str) {
    let released = world.ledger.writes.iter().any(|w| {
        matches!(w.who, Who::Driver(_))
            && w.id == id
            && w.after.as_ref().is_some_and(|a| a.state == "idle" && a.threshold == threshold)
    });
    if !released {
        let text = format!("driver {client} announced {id} at {threshold}, which no driver of the run released so");
        world.violate("f-write-allowed", None, text);
    }
}

/// `h-one-driver`, at every store write of driver `client` for `attempt` that landed: the drivers'
/// writes never interleave A, B, A while A has not stopped — a driver that was taken over writes
/// no more.
pub fn check_one_driver(world: &mut World, client: u32, attempt: u32) {
    let last = world.ledger.last_writer.insert(attempt, client);
    let writers = world.ledger.writers.entry(attempt).or_default();
    let wrote_before = writers.contains(&client);
    if !wrote_before {
        writers.push(client);
    }
    let Some(other) = last.filter(|other| *other != client) else { return };
    if !wrote_before || world.ledger.stopped.contains(&other) {
        return;
    }
    // Once two drivers interleave, each may be the one that writes next: the cause is whichever
    // of them was stopped, or took over with --force; only otherwise the clocks.
    let paused =
        [client, other].iter().any(|c| world.clients.get(c).is_some_and(|c| c.paused_call || c.paused_until > 0));
    let forced = [client, other].iter().any(|c| world.clients.get(c).is_some_and(|c| c.forced));
    let skew = |c: u32| world.clocks.drivers.get(&c).map_or(0, |clock| clock.offset_ms(world.elapsed_ms()) / 1000);
    let known = match (paused, forced) {
        (true, _) => LIMITATION_STOPPED_PROCESS,
        (false, true) => FOUND_FORCED_TAKE_OVER,
        (false, false) => FOUND_SKEWED_TAKE_OVER,
    };
    let text = format!(
        "driver {client} (clock {:+} s) wrote for attempt {attempt} after driver {other} (clock {:+} s) took it over{}",
        skew(client),
        skew(other),
        match (paused, forced) {
            (true, _) => ", having been stopped",
            (false, true) => " with --force while it was alive",
            (false, false) => " while it was alive",
        }
    );
    world.violate("h-one-driver", Some(known), text);
}

/// h-one-driver, at the store: an instance transaction that landed must have been sent by the
/// driver the run record names at that moment (its lease owner and fencing epoch), for a run
/// not finished. Read from the record itself, apart from the store's own `fence_holds`, so that a
/// store that fails to fence is caught too.
pub fn check_fenced_write(world: &mut World, fence: &post_provision::ports::Fence, what: &str) {
    let identifier = post_provision::record::record_identifier(&fence.run_id, fence.attempt);
    let Some(record) = world.table.runs.get(&identifier) else { return };
    let owner = record.pointer("/lease/owner").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let epoch = record.get("fencingEpoch").and_then(|v| v.as_u64()).unwrap_or(0);
    let state = record.get("state").and_then(|v| v.as_str()).unwrap_or("").to_string();
    if owner == fence.owner && epoch == fence.epoch && !matches!(state.as_str(), "Done" | "Failed") {
        return;
    }
    let text = format!(
        "a {what} of driver {} (epoch {}) landed while the run record names {owner} (epoch {epoch}, {state})",
        fence.owner, fence.epoch
    );
    world.violate("h-one-driver", None, text);
}

/// What the write log says happened to one instance of the run.
#[derive(Debug, Default)]
struct Fate {
    committed: bool,
    released: bool,
    announced: bool,
    marked: bool,
    /// The first write of another actor, as text.
    taken: Option<String>,
    /// Held by another run when the seed began.
    foreign_from_start: bool,
}

fn fate(world: &World, id: &str, record: &post_provision::record::RunRecord) -> Fate {
    let run_id = &world.spec.run_id;
    let commit = record.commit_threshold.map(|t| t.to_string());
    let idle = record.idle_threshold.map(|t| t.to_string());
    let mut fate = Fate::default();
    // Another actor's write counts only while the run was still deciding.
    let until_ms = world.terminal_at_secs.map_or(i64::MAX, |secs| secs * 1000 + 999);
    for write in world.ledger.writes.iter().filter(|w| w.id == id) {
        let Some(after) = &write.after else { continue };
        match write.who {
            Who::Driver(_) => {
                fate.committed |=
                    after.state == "running" && &after.run_id == run_id && Some(&after.threshold) == commit.as_ref();
                fate.released |= after.state == "idle" && Some(&after.threshold) == idle.as_ref();
                fate.marked |= after.state == "terminated" && &after.run_id == run_id;
            }
            who if fate.taken.is_none() && write.at_ms <= until_ms => {
                let before =
                    write.before.as_ref().map_or("none".to_string(), |b| format!("{} of {:?}", b.state, b.run_id));
                fate.taken =
                    Some(format!("{} moved it from {before} to {} at +{} ms", who.kind(), after.state, write.at_ms));
            }
            _ => {}
        }
    }
    // An instance without a record is retired by its termination alone.
    // An instance without a record is retired by its termination alone, or left alone when EC2
    // refuses it (there is no record to keep marked).
    fate.marked |= world.ledger.recordless.contains(id)
        && (world.terminated_by_run.contains(id) || world.ledger.refused_to_run.contains(id));
    if let (Some(idle), Some(class)) = (idle, world.run_instances.get(id)) {
        fate.announced = world.queue_urls.get(class).is_some_and(|url| world.sqs.was_announced(url, id, &idle));
    }
    fate.foreign_from_start =
        world.swarm.path == Path::Cleanup && world.spec.selection.instances.first().is_some_and(|i| i.id == id);
    fate
}

/// A released instance whose pool queue refuses this engine for good without being gone (access
/// denied): a message an earlier send delivered may be in it, and the driver cannot tell, so
/// emergency cleanup leaves it in the pool, where refresh retires it at its idle threshold
/// (`src/run/cleanup.rs`, step 3).
fn left_to_refusing_pool(world: &World, id: &str) -> bool {
    world
        .run_instances
        .get(id)
        .and_then(|class| world.queue_urls.get(class))
        .and_then(|url| world.sqs.refusing.get(url))
        .is_some_and(|(_, code)| *code == "AccessDenied")
}

/// `g-outcome-honest`, on every seed: what the run's final record reports, against the write log.
/// `Done`: every instance reached `running` for it with the commit threshold. `RolledBack`: each
/// was released and announced, or retired. `CleanedUp`: each was retired or announced. The only
/// other fates allowed are named: another actor took it first, or another run held it from the start.
pub fn check_outcome(world: &mut World) {
    let run_id = world.spec.run_id.clone();
    let Some(record) = world.table.run(&run_id).ok().flatten() else { return };
    let Some(kind) = OutcomeKind::of(&record) else { return };
    let resumed = world.clients.len() > 1;
    let ids: Vec<String> = world.run_instances.keys().cloned().collect();
    for id in ids {
        if world.holder_attempt.get(&id).is_some_and(|a| *a != 1) {
            continue;
        }
        let fate = fate(world, &id, &record);
        let (fine, want) = match kind {
            OutcomeKind::Committed => (fate.committed, "reached running for it with the commit threshold"),
            OutcomeKind::RolledBack => (
                (fate.released && fate.announced) || fate.marked || fate.taken.is_some(),
                "was released and announced, or retired",
            ),
            OutcomeKind::CleanedUp => (
                fate.marked
                    || (fate.released && (fate.announced || left_to_refusing_pool(world, &id)))
                    || fate.taken.is_some()
                    || fate.foreign_from_start,
                "was retired or announced",
            ),
        };
        if fine {
            continue;
        }
        let held = world
            .table
            .instances
            .get(&id)
            .map_or("no record".to_string(), |i| format!("{} of {:?}", i.state, i.run_id));
        let known = if kind == OutcomeKind::Committed && resumed && (fate.foreign_from_start || fate.taken.is_some()) {
            Some(FOUND_RESUMED_COMMIT_OF_FOREIGN)
        } else if world.ledger.recordless.contains(&id) && world.reported_not_found.contains(&id) {
            Some(FOUND_DROPPED_RECORDLESS)
        } else {
            None
        };
        world.violate(
            "g-outcome-honest",
            known,
            format!(
                "run {run_id} reports {kind:?}, yet instance {id} never {want} (record now {held}; {})",
                fate.taken.unwrap_or_else(|| "no other actor wrote it".into())
            ),
        );
    }
}

/// `i-live-behind`, at the end: a live instance stands behind every `running` and `idle` record,
/// unless it died once its record had expired; and no `created` record ever became `idle`.
pub fn check_live_behind(world: &mut World) {
    let mut found = Vec::new();
    let mut late = Vec::new();
    for (id, item) in &world.table.instances {
        if !matches!(item.state.as_str(), "running" | "idle") {
            continue;
        }
        let Some(instance) = world.ec2.instances.get(id) else { continue };
        let Some(died) = instance.terminated_at else { continue };
        let threshold = Timestamp::parse(&item.threshold).map_or(i64::MAX, |t| t.unix_secs());
        if died >= threshold {
            continue;
        }
        let last_write = world.ledger.writes.iter().rev().find(|w| &w.id == id);
        if last_write.is_some_and(|w| world.ledger.late_by_stop.get(id) == Some(&w.at_ms)) {
            // The consequence of a write allowed by `LATE_BY_STOPPED_PROCESS`, and only that.
            late.push(id.clone());
            continue;
        }
        let last = last_write.map(|w| w.who);
        // A driver's write the oracle refused already carries the reason; this is its consequence.
        let known = match last {
            Some(Who::Driver(_)) => world.ledger.bad_writes.get(id).copied().flatten(),
            None => None,
            Some(_) => Some(POOL_SKEWED_EXPIRY),
        };
        let killer = instance.terminated_by.map_or("?", Who::kind);
        let writer = last.map_or("setup", Who::kind);
        found.push((known, format!("{id}: {} record of {:?} until {} (last written by {writer}), but {killer} terminated the instance at {}", item.state, item.run_id, item.threshold, Timestamp::from_unix_secs(died))));
    }
    for write in &world.ledger.writes {
        let was_created = write.before.as_ref().is_some_and(|b| b.state == "created");
        if was_created && write.after.as_ref().is_some_and(|a| a.state == "idle") {
            found.push((None, format!("{}: {} moved a created record to idle", write.id, write.who.kind())));
        }
    }
    for (known, text) in found {
        world.violate("i-live-behind", known, text);
    }
    for _ in late {
        world.event("allowed: a dead instance behind a record a stopped process moved late");
    }
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
                    || last_writer(world, &id).is_some_and(|who| !matches!(who, Who::Driver(_)))
                    || (record.idle_threshold.map(|t| t.to_string()).as_deref() == Some(item.threshold.as_str())
                        && left_to_refusing_pool(world, &id))
            }
            // A foreign instance (no pool tag) is never terminated; its record stays marked. So
            // does one whose termination EC2 refuses. Refresh's mark (runId "") is refresh's to
            // finish: it terminates the instance at its next step (`manage-terminations.ts`
            // 44-47), or the boot agent does a minute after the mark.
            Some(item) if item.state == "terminated" => {
                !alive
                    || !world.ec2.pool_tagged(&id)
                    || world.ec2.instances.get(&id).is_some_and(|i| i.refuses.is_some())
                    || (item.run_id.is_empty() && last_writer(world, &id) == Some(Who::Refresh))
            }
            Some(item) if item.run_id != run_id && !item.run_id.is_empty() => true,
            Some(_) => false,
            None => !alive || (world.ledger.recordless.contains(&id) && world.ledger.refused_to_run.contains(&id)),
        };
        if !fine {
            let found = item.map_or("no record".to_string(), |i| {
                format!("record {} runId {:?} threshold {}", i.state, i.run_id, i.threshold)
            });
            let unknown = item.is_none() && alive && world.reported_not_found.contains(&id);
            let known = match (unknown, world.ledger.recordless.contains(&id)) {
                (true, true) => Some(FOUND_DROPPED_RECORDLESS),
                (true, false) => Some(FOUND_NOT_FOUND_LEAK),
                _ => None,
            };
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

/// Who wrote instance `id`'s record last (`None`: only the setup).
fn last_writer(world: &World, id: &str) -> Option<Who> {
    world.ledger.writes.iter().rev().find(|w| w.id == id).map(|w| w.who)
}

/// `c-no-leak`.
pub fn check_no_leak(world: &mut World) {
    // An instance that never had a record and whose termination EC2 refused is left alone: there
    // is no record to keep marked (an audit finds it by its pool tag).
    let leaked: Vec<String> = world
        .run_instances
        .keys()
        .chain(world.other_attempt_instances.keys())
        .filter(|id| world.ec2.alive(id) && !world.table.instances.contains_key(*id))
        .filter(|id| !(world.ledger.recordless.contains(*id) && world.ledger.refused_to_run.contains(*id)))
        .cloned()
        .collect();
    for id in leaked {
        let known = match (world.ledger.recordless.contains(&id), world.reported_not_found.contains(&id)) {
            (true, true) => Some(FOUND_DROPPED_RECORDLESS),
            (false, true) => Some(FOUND_NOT_FOUND_LEAK),
            _ => None,
        };
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
    check_live_behind(world);
    if !world.terminal_checked {
        world.violate("liveness", None, "the run did not finish, even after calm resumes".to_string());
        return;
    }
    check_no_leak(world);
    check_no_dangling_record(world);
    check_outcome(world);
    let Some(outcome) = outcome else { return };
    let expected = match world.swarm.path {
        Path::Commit => OutcomeKind::Committed,
        Path::Rollback => OutcomeKind::RolledBack,
        Path::Cleanup => OutcomeKind::CleanedUp,
    };
    if outcome == expected {
        return;
    }
    // The run record says why it went to emergency cleanup: that, not the faults seen, decides,
    // so that one defect cannot hide behind a fault that happened to be seen too.
    let record = world.table.run(&world.spec.run_id).ok().flatten();
    let error = record.as_ref().and_then(|r| r.error.clone()).map(|error| error.message).unwrap_or_default();
    if let Some(reason) = allowed_difference(world, outcome, &error) {
        world.event(reason);
        return;
    }
    let known = match outcome {
        OutcomeKind::CleanedUp if error.contains("still conflicting") => Some(FOUND_CONFLICTS_CLEAN_UP),
        OutcomeKind::CleanedUp if error.contains("hrottl") => Some(KNOWN_THROTTLING_CLEANS_UP),
        // The precise form of this defect is `g-outcome-honest`'s (an instance reported committed
        // that never ran for the run); here only its consequence on the outcome.
        OutcomeKind::Committed if world.violations.iter().any(|v| v.known == Some(FOUND_RESUMED_COMMIT_OF_FOREIGN)) => {
            Some(FOUND_RESUMED_COMMIT_OF_FOREIGN)
        }
        _ => None,
    };
    world.violate(
        "e-outcome",
        known,
        format!(
            "it ended {outcome:?} instead of {expected:?}, and no allowed reason explains it{}",
            if error.is_empty() { String::new() } else { format!("; its error: {error}") }
        ),
    );
}

/// The exact reason, if any, that allows `outcome` where the fault-free run reaches another; its
/// name is counted in the summary.
fn allowed_difference(world: &World, outcome: OutcomeKind, error: &str) -> Option<&'static str> {
    if outcome != OutcomeKind::CleanedUp {
        return None;
    }
    // By design (`--on-retries-exhausted clean-up`, the default), a 5xx, timeout or lost answer
    // that outlasts the retries sends commit and rollback to emergency cleanup; load never does.
    let load = error.contains("hrottl") || error.contains("still conflicting");
    if world.outcome_may_change && !world.swarm.stall_on_exhausted && !load {
        return Some("outcome-differs: AWS unavailable past the retries, clean-up policy");
    }
    let entered_ms = world.ledger.cleanup_entered_ms.unwrap_or(i64::MAX);
    if world.swarm.path == Path::Commit {
        let record = world.table.run(&world.spec.run_id).ok().flatten()?;
        for instance in world.spec.selection.instances.iter().chain(&world.spec.creation.instances) {
            let fate = fate(world, &instance.id, &record);
            // The workflow ended while the commit was unfinished: its release job moved what the
            // run had committed so far back to the pool, and the resumed commit finds it there.
            let released_early = world
                .ledger
                .writes
                .iter()
                .any(|w| w.id == instance.id && w.who == Who::RunRelease && w.at_ms <= entered_ms);
            if released_early {
                return Some("outcome-differs: release if: always() ran before the commit finished");
            }
            if fate.committed {
                continue;
            }
            // The claim expired (true time) before the run gave the commit up.
            let expires_ms = (instance.threshold.unix_secs() - world.base_unix) * 1000;
            if expires_ms <= entered_ms {
                return Some("outcome-differs: a claim expired before the commit");
            }
            // Liveness under skew: the driver takes a claim for expired once it is within the
            // clock-skew margin of its threshold by the driver's own clock (which may run ahead):
            // `threshold > now + CLOCK_SKEW_MARGIN_SECS` keeps a slow clock from acting on an
            // expired claim, at the price of claims that were about to lapse.
            let ahead_ms = world.clocks.drivers.values().map(|c| c.offset_ms(entered_ms)).max().unwrap_or(0);
            let margin_ms = post_provision::core::CLOCK_SKEW_MARGIN_SECS * 1000;
            if expires_ms <= entered_ms.saturating_add(ahead_ms).saturating_add(margin_ms) {
                return Some("outcome-differs: a claim within the clock-skew margin of its threshold");
            }
            let taken_before =
                world.ledger.writes.iter().any(|w| {
                    w.id == instance.id && !matches!(w.who, Who::Driver(_) | Who::Setup) && w.at_ms <= entered_ms
                });
            if taken_before {
                return Some("outcome-differs: another actor moved an instance before the commit");
            }
        }
    }
    if let Some((class, _, code)) = world.swarm.queue_refusal {
        let class = ["small", "large"][class];
        let uses = world.run_instances.values().any(|c| c == class);
        if uses && world.swarm.path == Path::Rollback && error.contains(code) {
            return Some("outcome-differs: a pool queue refused for good");
        }
    }
    None
}
