//! The simulated world: the in-memory services, virtual time, the seed's random stream, the
//! swarm parameters, and what the invariants need to remember (who touched what, what the run
//! terminated, the violations found).

use std::collections::{BTreeMap, BTreeSet};

use post_provision::spec::Spec;
use post_provision::timestamp::Timestamp;

use crate::dynamo::Table;
use crate::ec2::Ec2;
use crate::rng::Rng;
use crate::sqs::Queues;
use crate::swarm::Swarm;

/// Who wrote something: the run's drivers (by client number) or one of the pool's other actors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Who {
    /// A driver of this run: 0 is the first, later ones resume it (after a crash, or as a sweeper).
    Driver(u32),
    /// Selection for another run: claims idle instances from pool messages.
    Selection,
    /// Release of a finished job: `running` → `idle`, then a pool message.
    Release,
    /// Refresh: expired records → `terminated`, then TerminateInstances.
    Refresh,
    /// An instance's boot agent, terminating its own instance after its threshold.
    BootAgent,
    /// The world as the seed set it up.
    Setup,
}

impl Who {
    /// The actor kind's name in summaries.
    pub fn kind(self) -> &'static str {
        match self {
            Who::Driver(_) => "driver",
            Who::Selection => "selection",
            Who::Release => "release",
            Who::Refresh => "refresh",
            Who::BootAgent => "boot-agent",
            Who::Setup => "setup",
        }
    }
}

/// One invariant violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant's name, `a-isolation` … `e-outcome`, or `liveness`.
    pub invariant: &'static str,
    /// Why it was violated, with the ids involved.
    pub message: String,
    /// A known defect this is an instance of (`issue9-1` …), when it matches one.
    pub known: Option<&'static str>,
    /// Virtual seconds since the start.
    pub at_secs: i64,
}

/// State kept per driver (client) of the ports.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// Port calls this client made.
    pub calls: u64,
    /// Crash at this call: (call number, whether the call's write lands before the crash).
    pub crash_at: Option<(u64, bool)>,
    /// Pause the process at this call for this many seconds (a SIGSTOP, a frozen VM).
    pub pause_at: Option<(u64, i64)>,
    /// While paused: every call of this client waits until this virtual unix time.
    pub paused_until: i64,
    /// Set once the crash point was reached: the driver is gone.
    pub crashed: bool,
    /// No faults for this client (the final, calm resumes that check liveness).
    pub calm: bool,
    /// The attempt of the run this driver acts for now: the attempt of the last run record it
    /// wrote (a later attempt first drives an unfinished earlier one to its end).
    pub acting_attempt: u32,
}

/// Counters for the summary.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Port calls (each one an interleaving point).
    pub steps: u64,
    /// Actor steps that changed something, by actor kind.
    pub actor_steps: BTreeMap<&'static str, u64>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Other counters (crashes, resumes, take-overs, ...).
    pub events: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Adds `other` into this.
    pub fn merge(&mut self, other: &Stats) {
        self.steps += other.steps;
        for (map, from) in [
            (&mut self.actor_steps, &other.actor_steps),
            (&mut self.faults, &other.faults),
            (&mut self.events, &other.events),
        ] {
            for (key, count) in from {
                *map.entry(key).or_default() += count;
            }
        }
    }
}

/// The whole simulated world of one seed.
pub struct World {
    /// The seed.
    pub seed: u64,
    /// The seed's random stream for the world (faults, actors).
    pub rng: Rng,
    /// What this seed exercises.
    pub swarm: Swarm,
    /// DynamoDB.
    pub table: Table,
    /// SQS.
    pub sqs: Queues,
    /// EC2.
    pub ec2: Ec2,
    /// The virtual clock's start: unix seconds at `start`.
    pub base_unix: i64,
    /// The tokio instant of the start (time is paused: this is virtual).
    pub start: tokio::time::Instant,
    /// The run under test.
    pub spec: Spec,
    /// The run's instances and their resource class.
    pub run_instances: BTreeMap<String, String>,
    /// Resource class → queue URL.
    pub queue_urls: BTreeMap<String, String>,
    /// Drivers' port state.
    pub clients: BTreeMap<u32, Client>,
    /// Counters.
    pub stats: Stats,
    /// A digest of the history (every port call with its fault and instant, every actor step),
    /// kept even when the history is not: two runs of one seed must end with the same digest.
    pub digest: u64,
    /// Crash the first driver after this much virtual time, wherever it awaits.
    pub crash_after_ms: Option<u64>,
    /// The history, when verbose.
    pub history: Option<Vec<String>>,
    /// Violations found.
    pub violations: Vec<Violation>,
    /// Instances of the run that another actor wrote (record or EC2).
    pub touched: BTreeSet<String>,
    /// Instances the run's drivers terminated (EC2 accepted the id).
    pub terminated_by_run: BTreeSet<String>,
    /// Instances EC2 reported unknown to a driver (`InvalidInstanceID.NotFound`).
    pub reported_not_found: BTreeSet<String>,
    /// Which attempt of the run holds an instance, where it is not the first (a re-run's
    /// selection and creation put the same runId on their records).
    pub holder_attempt: BTreeMap<String, u32>,
    /// The second attempt's instances and their resource class.
    pub other_attempt_instances: BTreeMap<String, String>,
    /// Whether the terminal-state invariants were checked (once, when the run finished).
    pub terminal_checked: bool,
    /// Faults that the design lets change the outcome (5xx, timeouts, lost answers, conflicts)
    /// reached a driver.
    pub outcome_may_change: bool,
    /// Transaction conflicts reached a driver.
    pub conflicted: bool,
    /// Throttling (request or item level) reached a driver.
    pub throttled: bool,
    /// When the run first finished, virtual seconds since the start.
    pub terminal_at_secs: Option<i64>,
    /// The earliest threshold among the run's instance records at the start, in virtual seconds
    /// since the start: a commit after it may fail by design.
    pub earliest_threshold_secs: i64,
}

impl World {
    /// Virtual unix seconds now.
    pub fn now_unix(&self) -> i64 {
        self.base_unix + (tokio::time::Instant::now() - self.start).as_secs() as i64
    }

    /// Virtual time now.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_unix_secs(self.now_unix())
    }

    /// Virtual seconds since the start.
    pub fn elapsed_secs(&self) -> i64 {
        self.now_unix() - self.base_unix
    }

    /// Adds a line to the history (only when verbose: building lines costs time).
    pub fn log(&mut self, line: impl FnOnce() -> String) {
        if self.history.is_some() {
            let at = tokio::time::Instant::now() - self.start;
            let text = format!("[{:>9.3}s] {}", at.as_secs_f64(), line());
            self.history.as_mut().expect("verbose").push(text);
        }
    }

    /// Folds `value` and the current instant into the history's digest (FNV-1a).
    pub fn fold(&mut self, value: &str) {
        let nanos = (tokio::time::Instant::now() - self.start).as_nanos() as u64;
        for byte in value.bytes().chain(nanos.to_le_bytes()) {
            self.digest = (self.digest ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Counts a fault of `kind`.
    pub fn fault(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_default() += 1;
    }

    /// Counts an event of `kind`.
    pub fn event(&mut self, kind: &'static str) {
        *self.stats.events.entry(kind).or_default() += 1;
    }

    /// Records a violation (once per invariant and message).
    pub fn violate(&mut self, invariant: &'static str, known: Option<&'static str>, message: String) {
        let at_secs = self.elapsed_secs();
        self.log(|| format!("VIOLATION {invariant}: {message}"));
        if !self.violations.iter().any(|v| v.invariant == invariant && v.message == message) {
            self.violations.push(Violation { invariant, message, known, at_secs });
        }
    }

    /// Whether `id` is one of the run's instances.
    pub fn is_runs(&self, id: &str) -> bool {
        self.run_instances.contains_key(id)
    }

    /// Marks an instance as written by another actor, if it is one of the run's.
    pub fn touch(&mut self, id: &str) {
        if self.is_runs(id) {
            self.touched.insert(id.to_string());
        }
    }
}
