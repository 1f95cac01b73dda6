//! The pool's other actors, each derived from the original pool manager's code
//! (fleet-actions/ec2-runner-pool-manager at 78af40a, `src/`; each step cites the file and lines
//! it follows; the code is read, never copied). Each is a seeded random process that may take one
//! step at every interleaving point (before and after each port call of a driver, and on a ticker
//! while the drivers sleep), and each reads its own machine's clock (`crate::clock`).
//!
//! Their writes are the original's single conditional `UpdateItem`s
//! (`services/dynamodb/operations/instance-operations.ts` 287-363: `#state = :expectedState AND
//! #threshold > :now` — or `< :now` for refresh — `AND #runId = :expectedRunID`, setting state,
//! threshold, runId and updatedAt), evaluated here with the actor's clock reading as `:now`.
//! Every write goes through [`World::write_instance`], so it lands in the write log.

use post_provision::timestamp::Timestamp;

use crate::clock::MachineClock;
use crate::dynamo::InstanceItem;
use crate::ec2::TerminateError;
use crate::world::{Who, World};

/// `claim-worker.ts` 131-133: a claim is valid for 5 minutes.
const CLAIM_SECS: i64 = 300;
/// `instance-operations.ts` 90-91: `expireInstance` sets the threshold 5 minutes in the past.
const EXPIRE_BACK_SECS: i64 = 300;
/// `background-scripts.ts` 62-70: the boot agent terminates its instance a minute after the
/// threshold it reads, by its own clock.
const BOOT_AGENT_GRACE_SECS: i64 = 60;
/// `fleet-creation.ts` 120-122: a created instance's record lives 10 minutes.
const CREATED_SECS: i64 = 600;
/// Other runs' committed instances run for this long.
const OTHER_RUN_SECS: i64 = 1_800;

/// Lets each actor act with its seed's probability.
pub fn step(world: &mut World) {
    let swarm = &world.swarm;
    let (p_selection, p_release, p_refresh, p_boot, p_creation) =
        (swarm.p_selection, swarm.p_release, swarm.p_refresh, swarm.p_boot_agent, swarm.p_creation);
    if world.rng.chance(p_selection) {
        selection(world);
    }
    if world.rng.chance(p_release) {
        release_another_run(world);
    }
    if world.rng.chance(p_refresh) {
        refresh(world);
    }
    if world.rng.chance(p_boot) {
        boot_agent(world);
    }
    if world.rng.chance(p_creation) {
        creation(world);
    }
}

/// Counts an interleaving of `kind` and logs it.
pub fn acted(world: &mut World, kind: &'static str, id: &str, what: String) {
    *world.stats.actor_steps.entry(kind).or_default() += 1;
    world.touch(id);
    world.fold(id);
    world.log(|| format!("{kind} {id}: {what}"));
}

/// The original's conditional transition (`instance-operations.ts` 318-336) with `now` the
/// actor's clock reading: `unexpired` selects `threshold > now`, otherwise `threshold < now`.
#[allow(clippy::too_many_arguments)]
fn transition(
    world: &mut World,
    who: Who,
    id: &str,
    expected: (&str, &str),
    unexpired: bool,
    new: (&str, &str, Timestamp),
    now: Timestamp,
) -> bool {
    let Some(item) = world.table.instances.get(id).cloned() else { return false };
    let now_text = now.to_string();
    let fresh = if unexpired { item.threshold > now_text } else { item.threshold < now_text };
    if item.state != expected.0 || item.run_id != expected.1 || !fresh {
        return false;
    }
    let after = InstanceItem {
        state: new.0.to_string(),
        run_id: new.1.to_string(),
        threshold: new.2.to_string(),
        updated_at: now_text,
        ..item
    };
    world.write_instance(who, id, Some(after));
    true
}

/// `expireInstance` (`instance-operations.ts` 81-112): same state and runId, threshold 5 minutes
/// back, on an unexpired record.
fn expire(world: &mut World, who: Who, id: &str, state: &str, run_id: &str, now: Timestamp) -> bool {
    transition(world, who, id, (state, run_id), true, (state, run_id, now.plus_secs(-EXPIRE_BACK_SECS)), now)
}

/// A `TerminateInstances` call of an actor: `Ok` when EC2 accepted it.
fn terminate(world: &mut World, who: Who, ids: &[String]) -> Result<(), TerminateError> {
    let now = world.now_unix();
    let result = world.ec2.terminate_call(ids, now, who);
    if let Err(TerminateError::Refused(..)) = &result {
        world.fault(match who {
            Who::Refresh => "ec2-refused-refresh",
            Who::BootAgent => "ec2-refused-boot-agent",
            _ => "ec2-refused-pool",
        });
    }
    result
}

/// A pool message body as the original's `InstanceMessage` (`resource-class-operations.ts`
/// 12-20).
pub fn message_body(world: &World, id: &str, class: &str, threshold: &str) -> String {
    let config = world.table.resource_class_config.as_ref().and_then(|c| c.get(class));
    let (cpu, mmem) = config.map_or((0, 0), |c| (c.cpu, c.mmem));
    let usage = if class == "small" { "spot" } else { "on-demand" };
    serde_json::json!({"id": id, "resourceClass": class, "instanceType": "t3.small", "cpu": cpu, "mmem": mmem,
        "usageClass": usage, "threshold": threshold})
    .to_string()
}

/// Selection for another run (`provision/selection/`): picks a message up, classifies it, claims
/// the instance, then checks its health and registration.
fn selection(world: &mut World) {
    let urls: Vec<String> = world.sqs.queues.keys().cloned().collect();
    if urls.is_empty() {
        return;
    }
    let url = world.rng.pick(&urls).clone();
    let now = world.read(world.clocks.selection);
    if world.sqs.refusal(&url, world.now_unix()).is_some() {
        // A queue that refuses for good: `receiveAndDeleteResourceFromPool` throws and the
        // selection job fails (`pool-pickup-manager.ts` 64-68).
        world.fault("sqs-refused-selection");
        return;
    }
    let Some(message) = world.sqs.receive(&url, world.now_unix()) else { return };
    let body: serde_json::Value = serde_json::from_str(&message.body).unwrap_or_default();
    let class = body.get("resourceClass").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let cpu = body.get("cpu").and_then(|v| v.as_u64()).unwrap_or(0);
    let mmem = body.get("mmem").and_then(|v| v.as_u64()).unwrap_or(0);
    let id = message.instance_id.clone();
    // `pool-pickup-manager.ts` 129-147: an unknown class, a cpu that differs or too little memory
    // is discarded for good; 149-156: so is an expired message (by selection's clock).
    let config = world.table.resource_class_config.as_ref().and_then(|c| c.get(&class)).cloned();
    let drifted = world.swarm.selection_config_drift.is_some_and(|i| ["small", "large"][i] == class);
    let matches = config.is_some_and(|c| !drifted && u64::from(c.cpu) == cpu && mmem >= c.mmem);
    if !matches || message.threshold < now.to_string() {
        acted(
            world,
            if matches { "selection-discard-expired" } else { "selection-discard-mismatch" },
            &id,
            "discarded".into(),
        );
        return;
    }
    // 158-181: an instance type or usage class the job does not want goes back to the pool.
    if world.rng.chance(world.swarm.p_requeue) {
        world.sqs.send(&url, &message.body, world.now_unix(), 0, false, Who::Selection);
        acted(world, "selection-requeue", &id, "re-queued".into());
        return;
    }
    // `claim-worker.ts` 125-151: idle, runId "", unexpired → claimed for the run, now + 5 min.
    let run = format!("other-{}", world.rng.below(4));
    let claimed = (now.plus_secs(CLAIM_SECS), run.clone());
    if !transition(world, Who::Selection, &id, ("idle", ""), true, ("claimed", &run, claimed.0), now) {
        return;
    }
    acted(world, "selection", &id, format!("claimed for {run}"));
    // 68-80: no healthy heartbeat → the claim is expired (`handleClaimedInstanceExpiry`).
    if world.rng.chance(world.swarm.p_unhealthy) {
        if expire(world, Who::Selection, &id, "claimed", &run, now) {
            acted(world, "selection-expire-unhealthy", &id, "unhealthy: claim expired".into());
        }
        return;
    }
    // 89-106: no registration signal in time → terminated and expired at once.
    if world.rng.chance(world.swarm.p_unregistered) {
        let _ = terminate(world, Who::Selection, std::slice::from_ref(&id));
        expire(world, Who::Selection, &id, "claimed", &run, now);
        acted(world, "selection-terminate-unregistered", &id, "unregistered: terminated and expired".into());
    }
}

/// Another run's release job (`release/`): one of its `running` records → `idle`.
fn release_another_run(world: &mut World) {
    let run_id = world.spec.run_id.clone();
    let candidates: Vec<(String, String)> = world
        .table
        .instances
        .iter()
        .filter(|(_, item)| item.state == "running" && !item.run_id.is_empty() && item.run_id != run_id)
        .map(|(id, item)| (id.clone(), item.run_id.clone()))
        .collect();
    if candidates.is_empty() {
        return;
    }
    let (id, run) = world.rng.pick(&candidates).clone();
    release_instance(world, Who::Release, &id, &run);
}

/// This run's release job, `if: always()` at the end of its workflow (`release-resources.ts`
/// 35-103): every `running` record of the run id, whoever's commit put it there, even one the
/// run's own post-provision has not finished with.
pub fn release_run(world: &mut World) {
    let run_id = world.spec.run_id.clone();
    // 41: `getInstancesByRunId`; 69-75: only the `running` ones are moved.
    let running: Vec<String> = world
        .table
        .instances
        .iter()
        .filter(|(_, item)| item.state == "running" && item.run_id == run_id)
        .map(|(id, _)| id.clone())
        .collect();
    world.event("release-if-always-runs");
    for id in running {
        release_instance(world, Who::RunRelease, &id, &run_id);
    }
}

/// `transition-to-idle.ts` 14-27, then the release worker (`release-workers.ts` 41-78): the
/// deregistration signal → a pool message carrying the threshold read *before* the transition
/// (61); no signal → the idle record is expired (72-77).
fn release_instance(world: &mut World, who: Who, id: &str, run_id: &str) {
    let clock = world.clocks.release;
    let now = world.read(clock);
    let Some(read) = world.table.instances.get(id).cloned() else { return };
    let idle_until = now.plus_secs(world.swarm.idle_time_sec);
    if !transition(world, who, id, ("running", run_id), true, ("idle", "", idle_until), now) {
        return;
    }
    let kind = who.kind();
    if world.rng.chance(world.swarm.p_no_signal) {
        if expire(world, who, id, "idle", "", now) {
            acted(world, kind, id, format!("released from {run_id}, no signal: expired"));
        }
        return;
    }
    let url = world.queue_urls.get(&read.resource_class).cloned().unwrap_or_default();
    let body = message_body(world, id, &read.resource_class, &read.threshold);
    let duplicate = world.rng.chance(world.swarm.p_duplicate);
    if !world.sqs.send(&url, &body, world.now_unix(), 0, duplicate, who) {
        world.fault("sqs-refused-release");
    }
    acted(world, kind, id, format!("released from {run_id} to the pool"));
}

/// Refresh (`refresh/manage-terminations.ts`), in its three steps, each at a later step of the
/// simulation so that other writes land between them.
fn refresh(world: &mut World) {
    if !world.ledger.refresh_terminate.is_empty() {
        return refresh_terminate(world);
    }
    if let Some(now) = world.ledger.refresh_now.take() {
        return refresh_mark(world, now);
    }
    // 31-36 and `instance-operations.ts` 115-148: idle, claimed and running records whose
    // threshold is before refresh's `:now`.
    let now = world.read(world.clocks.refresh);
    let now_text = now.to_string();
    let read: Vec<(String, InstanceItem)> = world
        .table
        .instances
        .iter()
        .filter(|(_, item)| {
            matches!(item.state.as_str(), "idle" | "claimed" | "running")
                && !item.threshold.is_empty()
                && item.threshold < now_text
        })
        .map(|(id, item)| (id.clone(), item.clone()))
        .collect();
    if !read.is_empty() {
        world.ledger.refresh_read = read;
        world.ledger.refresh_now = Some(now);
    }
}

/// `manage-terminations.ts` 66-99: each record read → `terminated`, runId `""`, threshold now
/// (`newThreshold: null` is now, `basic-operations.ts` 30-31), conditional on the state and
/// runId read and `threshold < :now` (the `:now` of this call).
fn refresh_mark(world: &mut World, _read_at: Timestamp) {
    let now = world.read(world.clocks.refresh);
    for (id, read) in std::mem::take(&mut world.ledger.refresh_read) {
        if transition(world, Who::Refresh, &id, (&read.state, &read.run_id), false, ("terminated", "", now), now) {
            acted(world, "refresh", &id, format!("expired {} of {:?}: marked terminated", read.state, read.run_id));
            world.ledger.refresh_terminate.push(id);
        }
    }
}

/// `manage-terminations.ts` 166-197: one call for every marked id; if it fails, one call per id
/// (an unknown or refused id keeps its instance alive). Then 148-158 deletes the heartbeat and
/// signal items, which the simulation does not model (post-provision never reads them).
fn refresh_terminate(world: &mut World) {
    let ids = std::mem::take(&mut world.ledger.refresh_terminate);
    if terminate(world, Who::Refresh, &ids).is_err() {
        for id in &ids {
            let _ = terminate(world, Who::Refresh, std::slice::from_ref(id));
        }
    }
    for id in &ids {
        acted(world, "refresh-terminate", id, "terminated".into());
    }
}

/// Boot agents (`refresh/manage-lt/userdata-v2/background-scripts.ts` 21-83): every 15 s an
/// instance reads its own record's threshold (a consistent read) and terminates itself once its
/// own clock is past the threshold plus a minute; a refused termination is retried later.
fn boot_agent(world: &mut World) {
    let candidates: Vec<(String, String)> = world
        .table
        .instances
        .iter()
        .filter(|(id, _)| world.ec2.alive(id))
        .map(|(id, item)| (id.clone(), item.threshold.clone()))
        .collect();
    if candidates.is_empty() {
        return;
    }
    let (id, threshold) = world.rng.pick(&candidates).clone();
    let clock: MachineClock = world.boot_agent_clock(&id);
    let now = world.read(clock).unix_secs();
    let due = Timestamp::parse(&threshold).is_ok_and(|t| t.unix_secs() + BOOT_AGENT_GRACE_SECS < now);
    if due && terminate(world, Who::BootAgent, std::slice::from_ref(&id)).is_ok() {
        acted(world, "boot-agent", &id, "terminated itself after its threshold".to_string());
    }
}

/// Creation for another run (`provision/creation/`): launches an instance and registers it
/// `created` (`fleet-creation.ts` 117-142, `instance-operations.ts` 177-211: a put only if no item
/// exists); at a later step its validation passes — the other run's post-provision registers it
/// `running` (`process-successful-provision.ts` 55, `instance-operations.ts` 215-240) — or fails,
/// and creation terminates it, leaving the `created` record (`creation/index.ts` 53-59).
fn creation(world: &mut World) {
    if let Some((id, passes)) = world.ledger.creation_pending.pop() {
        let now = world.read(world.clocks.creation);
        let run = world.table.instances.get(&id).map(|item| item.run_id.clone()).unwrap_or_default();
        if passes {
            let until = now.plus_secs(OTHER_RUN_SECS);
            if transition(world, Who::Creation, &id, ("created", &run), true, ("running", &run, until), now) {
                acted(world, "creation-validated", &id, format!("running for {run}"));
            }
        } else {
            let _ = terminate(world, Who::Creation, std::slice::from_ref(&id));
            acted(world, "creation-failed-validation", &id, "terminated, record left created".into());
        }
        return;
    }
    world.ledger.created_by_pool += 1;
    let id = format!("i-{:017x}", 0x0c00_0000_0000u64 + world.ledger.created_by_pool);
    let now = world.read(world.clocks.creation);
    let run = format!("other-{}", world.rng.below(4));
    let class = if world.rng.chance(0.5) { "small" } else { "large" };
    world.ec2.launch(&id, &run, world.now_unix());
    let item = InstanceItem {
        state: "created".into(),
        run_id: run.clone(),
        threshold: now.plus_secs(CREATED_SECS).to_string(),
        resource_class: class.into(),
        instance_type: None,
        updated_at: now.to_string(),
        released_by: String::new(),
    };
    world.write_instance(Who::Creation, &id, Some(item));
    let passes = world.rng.chance(0.8);
    world.ledger.creation_pending.push((id.clone(), passes));
    acted(world, "creation", &id, format!("created for {run}"));
}
