//! One measurement: a system runs one path on a seeded world; its requests (by operation, with
//! start and end), wall time, CPU time and peak memory are recorded, and the emulator's CPU time
//! over the same span.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use post_provision::aws::RequestCounter;
use post_provision::config::Limits;
use post_provision::{Engine, OutcomeKind, Spec};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;

use crate::baseline::Baseline;
use crate::world::World;
use crate::{PathKind, System};

/// The engine uses UpdateItem only to renew its lease, in the background beside the stage being
/// worked on (`renew_lease` in src/aws/dynamodb.rs): those requests are counted but are not on
/// the critical path, so they are left out of the stages.
const BACKGROUND_OPERATION: &str = "DynamoDB.UpdateItem";

/// Requests, stages and time of a span of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Span {
    /// Requests by `Service.Operation`, every attempt counted.
    pub requests: BTreeMap<String, u64>,
    /// All requests.
    pub total_requests: u64,
    /// Request waves on the critical path.
    pub stages: usize,
    /// The operations of each wave, in order.
    pub waves: Vec<BTreeMap<String, u64>>,
    /// Wall time, milliseconds.
    pub wall_ms: f64,
}

/// Everything one measurement records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    /// The path.
    pub path: PathKind,
    /// Instances in the run.
    pub instances: usize,
    /// Which system ran.
    pub system: System,
    /// The network conditions' name.
    pub network: String,
    /// Whether the run ended as its path should (ours: the expected outcome; baseline: no call
    /// failed other than the ones the scenario makes fail).
    pub ok: bool,
    /// How it ended, in a few words.
    pub outcome: String,
    /// The whole run.
    pub run: Span,
    /// Ours, cleanup path only: from the write that enters emergency cleanup to the end, the part
    /// that the baseline's cleanup corresponds to.
    pub cleanup_phase: Option<Span>,
    /// CPU time of this process over the run (user + system), milliseconds.
    pub cpu_ms: f64,
    /// Ours, cleanup path only: CPU time of this process from the moment the driver entered
    /// emergency cleanup to the end, milliseconds.
    pub cleanup_phase_cpu_ms: Option<f64>,
    /// Likewise for the emulator.
    pub cleanup_phase_emulator_cpu_ms: Option<f64>,
    /// Peak resident memory of this process (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// CPU time of the emulator process over the run, milliseconds.
    pub emulator_cpu_ms: Option<f64>,
    /// Calls that failed after the SDK's retries, by `Service.Operation: code`.
    pub failures: BTreeMap<String, u64>,
}

/// Runs `system` on `world` and measures it.
pub async fn run(
    world: &World,
    system: System,
    endpoint: &str,
    network: &str,
    emulator_pid: Option<u32>,
) -> anyhow::Result<Figures> {
    let entered = StateEntries::install(emulator_pid);
    let counter;
    let engine;
    let baseline;
    match system {
        System::Ours => {
            // Every limit at its default but the time one request may take: the emulator serves
            // one request at a time, so a request queued behind others must not be re-sent.
            let limits = Limits {
                attempt_timeout: Duration::from_secs(120),
                operation_timeout: Duration::from_secs(300),
                ..Limits::default()
            };
            let built = Engine::builder()
                .table(&world.table)
                .region("us-east-1")
                .endpoint_url(endpoint)
                .limits(limits)
                .build()
                .await?;
            counter = built.requests().clone();
            engine = Some(built);
            baseline = None;
        }
        System::Baseline => {
            counter = RequestCounter::default();
            baseline = Some(Baseline::new(endpoint, &counter).await);
            engine = None;
        }
    }
    let spec = Spec::from_json(&world.spec.to_string()).map_err(|error| anyhow::anyhow!("{error}"))?;

    let emulator_before = emulator_pid.map(process_cpu_ms).transpose()?;
    let cpu_before = own_cpu_ms();
    let started = Instant::now();
    let (ok, outcome, failures) = match (&engine, &baseline) {
        (Some(engine), _) => {
            let expected = match world.path {
                PathKind::Commit => OutcomeKind::Committed,
                PathKind::Rollback => OutcomeKind::RolledBack,
                PathKind::Cleanup => OutcomeKind::CleanedUp,
            };
            match engine.start(spec).await {
                Ok(outcome) => (outcome.kind == expected, format!("{:?}", outcome.kind), BTreeMap::new()),
                Err(error) => (false, format!("error: {error}"), BTreeMap::new()),
            }
        }
        (_, Some(baseline)) => {
            let failures = baseline.run(world).await?;
            // The cleanup scenario's instance of another run refuses its deletion, as it should.
            let expected_failures: u64 = match world.path {
                PathKind::Cleanup => world.instances.iter().filter(|i| i.owner != world.run_id).count() as u64,
                _ => 0,
            };
            let failed: u64 = failures.values().sum();
            let ok = failed == expected_failures
                && failures.keys().all(|key| key == "DynamoDB.DeleteItem: ConditionalCheckFailedException");
            (ok, format!("{failed} calls failed"), failures)
        }
        _ => unreachable!("one system runs"),
    };
    let finished = Instant::now();
    let cpu_ms = own_cpu_ms() - cpu_before;
    let emulator_cpu_ms = match (emulator_pid, emulator_before) {
        (Some(pid), Some(before)) => Some(process_cpu_ms(pid)? - before),
        _ => None,
    };

    let spans: Vec<(Instant, Instant, String)> = counter
        .timeline()
        .into_iter()
        .map(|span| (span.start, span.end.unwrap_or(finished).max(span.start), span.operation))
        .collect();
    let on_critical_path = |operation: &str| system == System::Baseline || operation != BACKGROUND_OPERATION;
    let run = span_figures(&spans, started, finished, &on_critical_path);
    assert_eq!(run.total_requests, counter.total(), "the timeline holds every request");
    let entered_cleanup = match (system, world.path) {
        (System::Ours, PathKind::Cleanup) => entered.first("EmergencyCleanup"),
        _ => None,
    };
    let cleanup_phase = match &entered_cleanup {
        Some(entry) => {
            let at = entry.at;
            Some({
                // The phase begins with the write that entered it: the last request that ended
                // before the driver logged the new state.
                let phase_start = spans
                    .iter()
                    .filter(|(_, end, operation)| *end <= at && on_critical_path(operation))
                    .max_by_key(|(_, end, _)| *end)
                    .map(|(start, _, _)| *start)
                    .unwrap_or(at);
                let phase: Vec<_> = spans.iter().filter(|(start, _, _)| *start >= phase_start).cloned().collect();
                span_figures(&phase, phase_start, finished, &on_critical_path)
            })
        }
        None => None,
    };
    let cleanup_phase_cpu_ms = entered_cleanup.as_ref().map(|entry| cpu_ms + cpu_before - entry.own_cpu_ms);
    let cleanup_phase_emulator_cpu_ms = match (&entered_cleanup, emulator_cpu_ms, emulator_before) {
        (Some(Entry { emulator_cpu_ms: Some(at_entry), .. }), Some(total), Some(before)) => {
            Some(total + before - at_entry)
        }
        _ => None,
    };

    Ok(Figures {
        path: world.path,
        instances: world.instances.len(),
        system,
        network: network.to_string(),
        ok,
        outcome,
        run,
        cleanup_phase,
        cpu_ms,
        cleanup_phase_cpu_ms,
        cleanup_phase_emulator_cpu_ms,
        peak_rss_kib: peak_rss_kib()?,
        emulator_cpu_ms,
        failures,
    })
}

/// Requests by operation, and the waves of the critical-path requests: sorted by start, a new
/// wave begins when a request starts after every earlier one has ended.
fn span_figures(
    spans: &[(Instant, Instant, String)],
    from: Instant,
    to: Instant,
    on_critical_path: &dyn Fn(&str) -> bool,
) -> Span {
    let mut requests = BTreeMap::new();
    for (_, _, operation) in spans {
        *requests.entry(operation.clone()).or_insert(0) += 1;
    }
    let mut critical: Vec<&(Instant, Instant, String)> =
        spans.iter().filter(|(_, _, op)| on_critical_path(op)).collect();
    critical.sort_by_key(|(start, end, _)| (*start, *end));
    let mut waves: Vec<BTreeMap<String, u64>> = Vec::new();
    let mut latest_end: Option<Instant> = None;
    for (start, end, operation) in &critical {
        match latest_end {
            Some(latest) if *start < latest => latest_end = Some(latest.max(*end)),
            _ => {
                waves.push(BTreeMap::new());
                latest_end = Some(*end);
            }
        }
        *waves.last_mut().expect("a wave").entry(operation.clone()).or_insert(0) += 1;
    }
    let intervals: Vec<(Instant, Instant)> = critical.iter().map(|(start, end, _)| (*start, *end)).collect();
    let stages = RequestCounter::sequential_stages(&intervals);
    assert_eq!(stages, waves.len(), "the waves are the counter's stages");
    Span {
        total_requests: requests.values().sum(),
        requests,
        stages,
        waves,
        wall_ms: to.duration_since(from).as_secs_f64() * 1e3,
    }
}

/// When the driver entered a state, and the CPU times at that moment.
#[derive(Debug, Clone)]
struct Entry {
    state: String,
    at: Instant,
    own_cpu_ms: f64,
    emulator_cpu_ms: Option<f64>,
}

/// The states the driver entered, from its `entered` log events.
#[derive(Clone, Default)]
struct StateEntries {
    entries: Arc<Mutex<Vec<Entry>>>,
    emulator_pid: Option<u32>,
}

impl StateEntries {
    fn install(emulator_pid: Option<u32>) -> StateEntries {
        let entries = StateEntries { entries: Arc::default(), emulator_pid };
        let subscriber = tracing_subscriber::registry().with(entries.clone());
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber is installed");
        entries
    }

    fn first(&self, state: &str) -> Option<Entry> {
        self.entries.lock().expect("entries lock").iter().find(|entry| entry.state == state).cloned()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StateEntries {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        metadata.is_event() && metadata.target().starts_with("post_provision::driver")
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let at = Instant::now();
        #[derive(Default)]
        struct Fields {
            message: Option<String>,
            state: Option<String>,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = Some(format!("{value:?}")),
                    "state" => self.state = Some(format!("{value:?}")),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let (Some("entered"), Some(state)) = (fields.message.as_deref(), fields.state) {
            let entry = Entry {
                state,
                at,
                own_cpu_ms: own_cpu_ms(),
                emulator_cpu_ms: self.emulator_pid.and_then(|pid| process_cpu_ms(pid).ok()),
            };
            self.entries.lock().expect("entries lock").push(entry);
        }
    }
}

/// User plus system CPU time of this process, milliseconds.
fn own_cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let rc = libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) cannot fail");
        usage
    };
    let millis = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    millis(usage.ru_utime) + millis(usage.ru_stime)
}

/// User plus system CPU time of another process, from /proc/PID/stat, milliseconds.
fn process_cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| anyhow::anyhow!("unreadable stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), so 11 and 12 after the state field (3).
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1e3 / per_second)
}

/// Peak resident memory of this process, KiB.
fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).ok_or_else(|| anyhow::anyhow!("no VmHWM"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("no VmHWM value"))?.parse()?)
}
