//! The in-memory AWS alone, without actors, faults or latency: what the differential test
//! (`tests/it/differential.rs`) runs the same operations against as against moto.

use std::sync::{Arc, Mutex};

use post_provision::config::Limits;
use post_provision::spec::{Creation, CreationState, Selection, Spec};
use tokio::sync::Notify;

use crate::dynamo::{InstanceItem, Table};
use crate::ec2::Ec2;
use crate::ports::SimPorts;
use crate::rng::Rng;
use crate::sqs::Queues;
use crate::swarm::Swarm;
use crate::world::{Client, Stats, World};

/// A calm world (no actor acts, no fault fires) behind one client's ports.
pub fn memory_ports(limits: &Limits) -> SimPorts {
    let spec = Spec {
        run_id: "differential".into(),
        run_attempt: None,
        max_runtime_min: 1,
        idle_time_sec: 1,
        selection: Selection { num_instances_selected: 0, num_instances_required: 0, instances: Vec::new() },
        creation: Creation { state: CreationState::Failed, num_instances_created: 0, instances: Vec::new() },
        resource_class_config: None,
    };
    let mut world = World {
        seed: 0,
        rng: Rng::new(0),
        swarm: Swarm::quiet(),
        table: Table::default(),
        sqs: Queues::default(),
        ec2: Ec2::default(),
        base_unix: 0,
        start: tokio::time::Instant::now(),
        spec,
        run_instances: Default::default(),
        queue_urls: Default::default(),
        clients: Default::default(),
        stats: Stats::default(),
        digest: 0,
        crash_after_ms: None,
        history: None,
        violations: Vec::new(),
        touched: Default::default(),
        terminated_by_run: Default::default(),
        reported_not_found: Default::default(),
        holder_attempt: Default::default(),
        other_attempt_instances: Default::default(),
        terminal_checked: false,
        outcome_may_change: false,
        conflicted: false,
        throttled: false,
        terminal_at_secs: None,
        earliest_threshold_secs: i64::MAX,
        ledger: Default::default(),
        clocks: Default::default(),
    };
    world.clients.insert(0, Client { calm: true, acting_attempt: 1, ..Client::default() });
    SimPorts {
        world: Arc::new(Mutex::new(world)),
        client: 0,
        crashed: Arc::new(Notify::new()),
        paused: Arc::new(Notify::new()),
        operation_timeout: limits.operation_timeout,
        not_found_retries: limits.not_found_retries,
        not_found_delay: limits.not_found_delay,
    }
}

impl SimPorts {
    /// Puts an instance record, as a test seeds one: `kind` is its `resourceClass` and its
    /// `instanceType`, if it has one.
    pub fn put_instance_record(
        &self,
        id: &str,
        state: &str,
        run_id: &str,
        threshold: &str,
        kind: (&str, Option<&str>),
    ) {
        let item = InstanceItem {
            state: state.into(),
            run_id: run_id.into(),
            threshold: threshold.into(),
            resource_class: kind.0.into(),
            instance_type: kind.1.map(str::to_string),
            updated_at: String::new(),
            released_by: String::new(),
        };
        self.world.lock().expect("world").table.instances.insert(id.to_string(), item);
    }

    /// An instance record's `state`, `runId` and `threshold`, if it exists.
    pub fn instance_record(&self, id: &str) -> Option<(String, String, String)> {
        let world = self.world.lock().expect("world");
        world.table.instances.get(id).map(|item| (item.state.clone(), item.run_id.clone(), item.threshold.clone()))
    }

    /// Puts the pool's `resource_class_config` metadata item, or removes it.
    pub fn put_resource_class_config(&self, config: Option<post_provision::spec::ResourceClassConfig>) {
        self.world.lock().expect("world").table.resource_class_config = config;
    }

    /// Launches an EC2 instance, known at once, with the pool tag or without any tag.
    pub fn launch_instance(&self, id: &str, pool_tag: bool) {
        let mut world = self.world.lock().expect("world");
        world.ec2.launch(id, "differential", 0);
        if !pool_tag {
            world.ec2.instances.get_mut(id).expect("launched").tags.clear();
        }
    }

    /// Whether an EC2 instance is alive.
    pub fn instance_alive(&self, id: &str) -> bool {
        self.world.lock().expect("world").ec2.alive(id)
    }

    /// Creates a queue.
    pub fn create_queue(&self, url: &str) {
        self.world.lock().expect("world").sqs.create(url);
    }

    /// The instance ids of the messages in a queue, oldest first.
    pub fn queued(&self, url: &str) -> Vec<String> {
        let world = self.world.lock().expect("world");
        world.sqs.queues.get(url).map(|q| q.iter().map(|m| m.instance_id.clone()).collect()).unwrap_or_default()
    }
}
