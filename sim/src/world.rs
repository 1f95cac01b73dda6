//! The simulated world: the in-memory services, virtual time, the seed's random stream, the
//! swarm parameters, and what the invariants need to remember (who touched what, what the run
//! terminated, the violations found).

use std::collections::{BTreeMap, BTreeSet};

use post_provision::spec::Spec;
use post_provision::timestamp::Timestamp;

use crate::clock::MachineClock;
use crate::dynamo::{InstanceItem, Table};
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
    /// Refresh: expired records → `terminated` (runId `""`), then TerminateInstances.
    Refresh,
    /// Creation for another run: `created` records, then validation (→ `running`) or termination.
    Creation,
    /// The run's own release job (`if: always()` at the end of its workflow): every `running`
    /// record of the run id → `idle`, then a pool message or an expiry.
    RunRelease,
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
            Who::Creation => "creation",
            Who::RunRelease => "release-if-always",
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
    /// The call being applied now was sent before a pause of the process (SIGSTOP).
    pub paused_call: bool,
    /// This driver resumed with `--force`.
    pub forced: bool,
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

/// One write to an instance record, by anyone, as it landed: the simulation's own write log, which
/// the invariants read instead of the conditions the code builds.
#[derive(Debug, Clone)]
pub struct WriteEntry {
    /// True (virtual) milliseconds since the start when it landed.
    pub at_ms: i64,
    /// Who wrote it.
    pub who: Who,
    /// The instance.
    pub id: String,
    /// The record just before (`None`: there was none).
    pub before: Option<InstanceItem>,
    /// The record just after (`None`: deleted).
    pub after: Option<InstanceItem>,
}

/// What the invariants and the pool's multi-step actors remember between steps.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Every instance-record write, in the order they landed.
    pub writes: Vec<WriteEntry>,
    /// Per attempt: the driver whose store write landed last.
    pub last_writer: BTreeMap<u32, u32>,
    /// Per attempt: the drivers whose store writes landed, in the order of their first one.
    pub writers: BTreeMap<u32, Vec<u32>>,
    /// Drivers that have stopped (returned, or crashed): they act no more.
    pub stopped: BTreeSet<u32>,
    /// Refresh's query result (instance, record as read) and the clock reading it used, waiting
    /// for its conditional writes (`manage-terminations.ts` reads, then writes, then terminates).
    pub refresh_read: Vec<(String, InstanceItem)>,
    /// See `refresh_read`: refresh's `:now` for the writes.
    pub refresh_now: Option<Timestamp>,
    /// Instances refresh marked and has still to terminate.
    pub refresh_terminate: Vec<String>,
    /// Creation's launched instances waiting for their validation (true: it will pass).
    pub creation_pending: Vec<(String, bool)>,
    /// Instances created by the pool's creation actor so far (for fresh ids).
    pub created_by_pool: u64,
    /// Drivers' sends and terminations after another driver took their attempt over (they cannot
    /// be fenced by the store; the oracle checks each).
    pub stale_effects: u64,
    /// When the run record of attempt 1 first entered `EmergencyCleanup`, true milliseconds.
    pub cleanup_entered_ms: Option<i64>,
    /// A pool queue refused one of this run's drivers for good.
    pub queue_refused_driver: bool,
    /// The run's created instances whose `created` record creation never wrote (its
    /// registration failed, `fleet-creation.ts` 144-150): alive, in the spec, without a record.
    pub recordless: BTreeSet<String>,
    /// Instances whose termination EC2 refused to a driver of the run.
    pub refused_to_run: BTreeSet<String>,
    /// Instances a driver wrote in a way the oracle refused, with the tag of that violation: a
    /// later consequence (`i-live-behind`) carries the same tag.
    pub bad_writes: BTreeMap<String, Option<&'static str>>,
    /// Instances whose last driver write landed late only because its process was stopped during
    /// that call ([`crate::invariants::LATE_BY_STOPPED_PROCESS`]), with when it landed (ms).
    pub late_by_stop: BTreeMap<String, i64>,
}

/// Each machine's clock (issue 17, item 2). Drivers' clocks live in their `SimClock`s.
#[derive(Debug, Clone, Default)]
pub struct Clocks {
    /// The largest skew of this seed, milliseconds.
    pub max_skew_ms: i64,
    /// Selection's machine (another run's provision job).
    pub selection: MachineClock,
    /// Release's machine (other runs' release jobs, and this run's).
    pub release: MachineClock,
    /// Refresh's machine (the scheduled refresh workflow).
    pub refresh: MachineClock,
    /// Creation's machine.
    pub creation: MachineClock,
    /// Drivers' clocks by client, as drawn (for the summary).
    pub drivers: BTreeMap<u32, MachineClock>,
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
    /// The write log and the actors' pending steps.
    pub ledger: Ledger,
    /// The machines' clocks.
    pub clocks: Clocks,
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

    /// True (virtual) milliseconds since the start.
    pub fn elapsed_ms(&self) -> i64 {
        (tokio::time::Instant::now() - self.start).as_millis() as i64
    }

    /// What a machine with `clock` reads now.
    pub fn read(&self, clock: MachineClock) -> Timestamp {
        clock.read(self.base_unix, self.elapsed_ms())
    }

    /// The clock of instance `id`'s boot agent: drawn from the seed and the id alone, so that it
    /// does not shift any other draw.
    pub fn boot_agent_clock(&self, id: &str) -> MachineClock {
        let mut hash = self.seed ^ 0xB007;
        for byte in id.bytes() {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        MachineClock::draw(&mut Rng::new(hash), self.clocks.max_skew_ms)
    }

    /// Writes instance `id`'s record as `who` (`None` deletes it) and logs the write.
    pub fn write_instance(&mut self, who: Who, id: &str, after: Option<InstanceItem>) {
        let before = match &after {
            Some(item) => self.table.instances.insert(id.to_string(), item.clone()),
            None => self.table.instances.remove(id),
        };
        self.log_write(who, id, before, after);
    }

    /// Logs a write that already landed.
    pub fn log_write(&mut self, who: Who, id: &str, before: Option<InstanceItem>, after: Option<InstanceItem>) {
        let at_ms = self.elapsed_ms();
        self.ledger.writes.push(WriteEntry { at_ms, who, id: id.to_string(), before, after });
    }

    /// Virtual seconds since the start.
    pub fn elapsed_secs(&self) -> i64 {
        self.now_unix() - self.base_unix
    }

    /// Adds a line to the history (only when verbose: building lines costs time).
    pub fn log(&mut self, line: impl FnOnce() -> String) {
        let at = tokio::time::Instant::now() - self.start;
        if let Some(history) = &mut self.history {
            history.push(format!("[{:>9.3}s] {}", at.as_secs_f64(), line()));
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
