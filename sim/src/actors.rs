//! The pool's other actors, each a seeded random process that may take one step at every
//! interleaving point (before and after each port call of a driver, and on a ticker while the
//! drivers sleep). Their writes are the data model's single conditional `UpdateItem`s on the same
//! table (see `../shared/reference/pool-data-model.md`); they never fail.

use post_provision::timestamp::Timestamp;

use crate::world::{Who, World};

/// Selection claims for another run for this long.
const CLAIM_SECS: i64 = 300;
/// A boot agent terminates its instance this long after the record's threshold passed.
const BOOT_AGENT_GRACE_SECS: i64 = 60;

/// Lets each actor act with its seed's probability.
pub fn step(world: &mut World) {
    let swarm = &world.swarm;
    let (p_selection, p_release, p_refresh, p_boot) =
        (swarm.p_selection, swarm.p_release, swarm.p_refresh, swarm.p_boot_agent);
    if world.rng.chance(p_selection) {
        selection(world);
    }
    if world.rng.chance(p_release) {
        release(world);
    }
    if world.rng.chance(p_refresh) {
        refresh(world);
    }
    if world.rng.chance(p_boot) {
        boot_agent(world);
    }
}

fn acted(world: &mut World, who: Who, id: &str, what: String) {
    *world.stats.actor_steps.entry(who.kind()).or_default() += 1;
    world.touch(id);
    world.fold(id);
    world.log(|| format!("{} {id}: {what}", who.kind()));
}

/// Selection for another run: receives a pool message (a hint), drops it if its threshold has
/// passed, and claims the instance `idle` (runId "", unexpired) → `claimed` for its run.
fn selection(world: &mut World) {
    let urls: Vec<String> = world.sqs.queues.keys().cloned().collect();
    if urls.is_empty() {
        return;
    }
    let url = world.rng.pick(&urls).clone();
    let now = world.now();
    let Some(message) = world.sqs.receive(&url, now.unix_secs()) else { return };
    if message.threshold.as_str() <= now.to_string().as_str() {
        return;
    }
    let Some(item) = world.table.instances.get(&message.instance_id).cloned() else { return };
    if item.state != "idle" || !item.run_id.is_empty() || item.threshold.as_str() <= now.to_string().as_str() {
        return;
    }
    let run = format!("other-{}", world.rng.below(4));
    let threshold = now.plus_secs(CLAIM_SECS).to_string();
    if world.table.update_if(&message.instance_id, &item, "claimed", &run, &threshold, now) {
        acted(world, Who::Selection, &message.instance_id, format!("claimed for {run}"));
    }
}

/// Release of a finished job: `running` → `idle` (runId "", now + idleTimeSec), then a pool
/// message. Only instances whose job ran: other runs' running instances, and this run's once its
/// commit landed (running at the run's commit threshold).
fn release(world: &mut World) {
    let run_id = world.spec.run_id.clone();
    let commit_threshold =
        world.table.run(&run_id).ok().flatten().and_then(|r| r.commit_threshold).map(|t| t.to_string());
    let candidates: Vec<String> = world
        .table
        .instances
        .iter()
        .filter(|(_, item)| {
            item.state == "running"
                && !item.run_id.is_empty()
                && (item.run_id != run_id || commit_threshold.as_deref() == Some(item.threshold.as_str()))
        })
        .map(|(id, _)| id.clone())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let id = world.rng.pick(&candidates).clone();
    let item = world.table.instances[&id].clone();
    let now = world.now();
    let threshold = now.plus_secs(world.swarm.idle_time_sec);
    if !world.table.update_if(&id, &item, "idle", "", &threshold.to_string(), now) {
        return;
    }
    let Some(url) = world.queue_urls.get(&item.resource_class).cloned() else { return };
    let body = serde_json::json!({"id": id, "resourceClass": item.resource_class, "threshold": threshold.to_string()})
        .to_string();
    let duplicate = world.rng.chance(world.swarm.p_duplicate);
    world.sqs.send(&url, &body, now.unix_secs(), 3, duplicate, Who::Release);
    acted(world, Who::Release, &id, format!("released from {} to the pool", item.run_id));
}

/// Refresh: an `idle`, `claimed` or `running` record whose threshold has passed → `terminated`,
/// then TerminateInstances. It never sweeps `created` records.
fn refresh(world: &mut World) {
    let now = world.now();
    let now_text = now.to_string();
    let candidates: Vec<String> = world
        .table
        .instances
        .iter()
        .filter(|(_, item)| matches!(item.state.as_str(), "idle" | "claimed" | "running") && item.threshold < now_text)
        .map(|(id, _)| id.clone())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let id = world.rng.pick(&candidates).clone();
    let item = world.table.instances[&id].clone();
    if world.table.update_if(&id, &item, "terminated", &item.run_id, &item.threshold, now) {
        let known = world.ec2.known(&id, now.unix_secs());
        if known {
            let _ = world.ec2.terminate_call(std::slice::from_ref(&id), now.unix_secs(), Who::Refresh);
        }
        acted(world, Who::Refresh, &id, format!("expired {} of {:?}: terminated", item.state, item.run_id));
    }
}

/// Boot agents: an instance terminates itself about a minute after its record's threshold.
fn boot_agent(world: &mut World) {
    let now = world.now().unix_secs();
    let candidates: Vec<String> = world
        .table
        .instances
        .iter()
        .filter(|(id, item)| {
            world.ec2.alive(id)
                && Timestamp::parse(&item.threshold).is_ok_and(|t| t.unix_secs() + BOOT_AGENT_GRACE_SECS < now)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let id = world.rng.pick(&candidates).clone();
    let instance = world.ec2.instances.get_mut(&id).expect("alive");
    instance.alive = false;
    instance.terminated_by = Some(Who::BootAgent);
    acted(world, Who::BootAgent, &id, "terminated itself after its threshold".to_string());
}
