//! `docs/benchmarks.md`: the figures of one run of `scripts/bench`, the machine they were taken
//! on, the targets, and how the stages of each path are made up.

use std::fmt::Write as _;

use crate::measure::{Figures, Span};
use crate::{PathKind, System};

/// What the report records about the run of the benchmark (passed by `scripts/bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct Context {
    /// When the benchmark ran (UTC).
    #[arg(long)]
    pub date: String,
    /// The commit measured (with `+dirty` when the tree had changes).
    #[arg(long)]
    pub commit: String,
    /// The command that reproduces the report.
    #[arg(long)]
    pub command: String,
    /// The cargo profile the benchmark was built with.
    #[arg(long)]
    pub profile: String,
    /// The emulator and how it was run.
    #[arg(long)]
    pub emulator: String,
    /// /proc/loadavg when the benchmark started.
    #[arg(long)]
    pub load_before: String,
    /// /proc/loadavg when it ended.
    #[arg(long)]
    pub load_after: String,
    /// How long the benchmark took, seconds.
    #[arg(long)]
    pub duration_secs: u64,
}

/// Targets at 1,000 instances: most requests per path, most stages, and the largest share of the
/// baseline's wall time with latency.
const TARGET_INSTANCES: usize = 1_000;
const TARGET_STAGES: usize = 4;
const TARGET_WALL_SHARE: f64 = 0.2;

fn target_requests(path: PathKind) -> u64 {
    match path {
        PathKind::Commit => 15,
        PathKind::Rollback => 120,
        PathKind::Cleanup => 20,
    }
}

/// One target of the small-run path (issue 11): a path, a size, a bound, and why it may be missed.
struct SmallRunTarget {
    path: PathKind,
    n: usize,
    max_requests: Option<u64>,
    max_stages: Option<usize>,
    /// Wall time at most this share of the baseline's, with added latency only.
    max_wall_share: Option<f64>,
    note: &'static str,
}

const SMALL_RUN_TARGETS: [SmallRunTarget; 8] = [
    SmallRunTarget {
        path: PathKind::Commit,
        n: 1,
        max_requests: Some(1),
        max_stages: Some(1),
        max_wall_share: Some(1.1),
        note: "one request each; the difference is the engine's own CPU (in a debug build) and moto's work on a transaction of three items (spec chunk, record, instance) against one UpdateItem",
    },
    SmallRunTarget { path: PathKind::Commit, n: 10, max_requests: Some(1), max_stages: Some(1), max_wall_share: Some(1.1), note: "" },
    SmallRunTarget { path: PathKind::Commit, n: 1000, max_requests: Some(12), max_stages: Some(3), max_wall_share: None, note: "" },
    SmallRunTarget {
        path: PathKind::Rollback,
        n: 1,
        max_requests: Some(3),
        max_stages: Some(3),
        max_wall_share: Some(1.1),
        note: "three round trips against the baseline's two: the create carrying the release and the pool check (issue 19), the message, and the final `Failed` write that persists the run",
    },
    SmallRunTarget {
        path: PathKind::Rollback,
        n: 10,
        max_requests: None,
        max_stages: Some(3),
        max_wall_share: Some(1.1),
        note: "three round trips against the baseline's two: the create carrying the releases and the pool check (issue 19), the messages, and the final `Failed` write that persists the run",
    },
    SmallRunTarget {
        path: PathKind::Rollback,
        n: 1000,
        max_requests: Some(112),
        max_stages: Some(4),
        max_wall_share: None,
        note: "the goal assumed no read; since the trust boundary (issues 13, 18) a run too large for one transaction reads the pool's configuration and its instances' records before its first write (only the one-transaction path checks them inside its create): one more stage, ten more requests",
    },
    SmallRunTarget {
        path: PathKind::Cleanup,
        n: 1,
        max_requests: None,
        max_stages: Some(4),
        max_wall_share: None,
        note: "cleanup phase (issue 19): the write entering it, the mark beside the pool check, the termination, the deletion carrying `Failed`",
    },
    SmallRunTarget { path: PathKind::Cleanup, n: 1000, max_requests: Some(14), max_stages: Some(4), max_wall_share: None, note: "cleanup phase, \"no worse\" than before; retiring now marks records before terminating (a record never disappears while its instance lives) and checks the pool tag (issue 13): two more stages" },
];

/// The targets of issue 11 (small runs as fast as the per-item pattern), met or missed.
fn render_small_run_targets(out: &mut String, figures: &[Figures], networks: &[String]) {
    let find = |path: PathKind, n: usize, system: System, network: &str| {
        figures.iter().find(|f| f.path == path && f.instances == n && f.system == system && f.network == network)
    };
    let _ = writeln!(out, "\n## Targets of the one-transaction path for small runs\n");
    let _ = writeln!(out, "| Path | N | Network | Target | Reached | Met | Note |");
    let _ = writeln!(out, "|---|---:|---|---|---|---|---|");
    for network in networks {
        for target in SMALL_RUN_TARGETS.iter() {
            let Some(ours) = find(target.path, target.n, System::Ours, network) else { continue };
            let compared = compared_span(ours);
            let name = row_name(target.path);
            if let Some(limit) = target.max_requests {
                let met = compared.total_requests <= limit && ours.ok;
                let _ = writeln!(
                    out,
                    "| {name} | {} | {network} | ≤ {limit} requests | {} | {} | {} |",
                    target.n,
                    compared.total_requests,
                    yes_no(met),
                    if met { "" } else { target.note }
                );
            }
            if let Some(limit) = target.max_stages {
                let met = compared.stages <= limit && ours.ok;
                let _ = writeln!(
                    out,
                    "| {name} | {} | {network} | ≤ {limit} stages | {} | {} | {} |",
                    target.n,
                    compared.stages,
                    yes_no(met),
                    if met { "" } else { target.note }
                );
            }
            if let (Some(share), true) = (target.max_wall_share, network != "direct") {
                if let Some(base) = find(target.path, target.n, System::Baseline, network) {
                    let met = compared.wall_ms <= share * base.run.wall_ms && ours.ok;
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {network} | wall ≤ {share}× the baseline's | {} of {} ({}) | {} | {} |",
                        target.n,
                        millis(compared.wall_ms),
                        millis(base.run.wall_ms),
                        ratio(compared.wall_ms, base.run.wall_ms),
                        yes_no(met),
                        if met { "" } else { target.note }
                    );
                }
            }
        }
    }
}

/// Renders the report.
pub fn render(figures: &[Figures], context: &Context) -> String {
    let mut out = String::new();
    let networks: Vec<String> = figures.iter().fold(Vec::new(), |mut names, f| {
        if !names.contains(&f.network) {
            names.push(f.network.clone());
        }
        names
    });
    let find = |path: PathKind, instances: usize, system: System, network: &str| {
        figures
            .iter()
            .find(|f| f.path == path && f.instances == instances && f.system == system && f.network == network)
    };
    let mut sizes: Vec<usize> = figures.iter().map(|f| f.instances).collect();
    sizes.sort();
    sizes.dedup();

    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `scripts/bench`; do not edit by hand. Each figure comes from one run in a process of its \
         own, against the moto emulator on this machine: read the ratios, not the absolute times.\n"
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| Date | {} |", context.date);
    let _ = writeln!(out, "| Commit | `{}` |", context.commit);
    let _ = writeln!(out, "| Reproduce | `{}` |", context.command);
    let _ = writeln!(out, "| Build | {} |", context.profile);
    let _ = writeln!(out, "| Machine | {} |", machine());
    let _ =
        writeln!(out, "| Load average (1, 5, 15 min) | {} before, {} after |", context.load_before, context.load_after);
    let _ = writeln!(out, "| Emulator | {} |", context.emulator);
    let _ = writeln!(out, "| Benchmark duration | {} s |\n", context.duration_secs);

    let _ = writeln!(out, "## What is measured\n");
    let _ = writeln!(
        out,
        "- **ours**: `Engine::start` on a spec of N instances (half selected and `claimed`, half created and \
         `running`, two resource classes), with the default limits except the attempt and operation timeouts \
         (120 s and 300 s, so that requests queued in the single-threaded emulator are not re-sent).\n\
         - **baseline**: the existing system's call pattern, issued by `bench/src/baseline.rs` with the SDK's \
         defaults: per instance one conditional UpdateItem (rollback: then one SendMessage; cleanup: one \
         conditional DeleteItem, then one TerminateInstances of that instance), every instance at once, nothing \
         persisted.\n\
         - **commit**: creation succeeded; every instance becomes `running`. **rollback**: creation was one \
         short; every instance goes back to the pool, one pool message each. **cleanup**: one claim has expired, \
         so commit is refused and the run is cleaned up; from 4 instances up one claimed instance belongs to \
         another run and must be left alone (its transaction is cancelled once and re-sent without it). The \
         baseline's cleanup is only the cleanup (it has no commit before it), so ours is compared on its \
         cleanup phase: from the write that enters `EmergencyCleanup` to the end. The whole run is shown too.\n\
         - **requests**: every HTTP attempt, by operation, counted by the engine's `RequestCounter` interceptor \
         (the baseline's clients carry the same interceptor). **stages**: request waves on the critical path \
         (sorted by start, a new wave begins when a request starts after every earlier one has ended). The \
         engine's lease renewals (UpdateItem, in the background) are counted as requests but not as stages.\n\
         - **wall**: the run, seeding excluded. **CPU**: user + system time of the measuring process over the \
         run (getrusage). **peak RSS**: VmHWM of that process, for the whole process (SDK clients included). \
         **emulator CPU**: CPU time of the moto process over the run (/proc/PID/stat); moto works on one \
         request at a time, so this is a floor under the wall time that AWS would not impose. For the cleanup \
         phase, wall time starts with the write that enters it, CPU times at the moment it was entered.\n\
         - The baseline keeps at most 100 requests on the wire at once (see `bench/src/baseline.rs`): with \
         1,000 connections opened at once the listen backlogs of moto and of the proxy overflow, and the \
         comparison would measure the test rig.\n"
    );

    for network in &networks {
        let _ = writeln!(out, "## Network: {network}\n");
        let _ = writeln!(out, "### Requests and stages\n");
        let _ = writeln!(
            out,
            "| Path | N | Ours: requests | Ours: stages | Baseline: requests | Baseline: stages | Requests ours/baseline |"
        );
        let _ = writeln!(out, "|---|---:|---|---:|---|---:|---:|");
        for path in [PathKind::Commit, PathKind::Rollback, PathKind::Cleanup] {
            for &n in &sizes {
                let (Some(ours), Some(base)) =
                    (find(path, n, System::Ours, network), find(path, n, System::Baseline, network))
                else {
                    continue;
                };
                let compared = compared_span(ours);
                let _ = writeln!(
                    out,
                    "| {} | {n} | {}{} | {} | {}{} | {} | {} |",
                    row_name(path),
                    requests_cell(compared),
                    failure_mark(ours),
                    compared.stages,
                    requests_cell(&base.run),
                    failure_mark(base),
                    base.run.stages,
                    ratio(compared.total_requests as f64, base.run.total_requests as f64),
                );
                if path == PathKind::Cleanup {
                    let _ = writeln!(
                        out,
                        "| cleanup, whole run | {n} | {} | {} | | | |",
                        requests_cell(&ours.run),
                        ours.run.stages
                    );
                }
            }
        }
        let _ = writeln!(out, "\n### Time and memory\n");
        let _ = writeln!(
            out,
            "| Path | N | Wall ours | Wall baseline | Wall ours/baseline | CPU ours | CPU baseline | Peak RSS ours | \
             Peak RSS baseline | Emulator CPU ours | Emulator CPU baseline |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for path in [PathKind::Commit, PathKind::Rollback, PathKind::Cleanup] {
            for &n in &sizes {
                let (Some(ours), Some(base)) =
                    (find(path, n, System::Ours, network), find(path, n, System::Baseline, network))
                else {
                    continue;
                };
                let compared = compared_span(ours);
                let (cpu, emulator_cpu) = match (ours.cleanup_phase_cpu_ms, ours.cleanup_phase_emulator_cpu_ms) {
                    (Some(cpu), emulator) => (cpu, emulator),
                    (None, _) => (ours.cpu_ms, ours.emulator_cpu_ms),
                };
                let _ = writeln!(
                    out,
                    "| {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    row_name(path),
                    millis(compared.wall_ms),
                    millis(base.run.wall_ms),
                    ratio(compared.wall_ms, base.run.wall_ms),
                    millis(cpu),
                    millis(base.cpu_ms),
                    mebibytes(ours.peak_rss_kib),
                    mebibytes(base.peak_rss_kib),
                    emulator_cpu.map(millis).unwrap_or_default(),
                    base.emulator_cpu_ms.map(millis).unwrap_or_default(),
                );
                if path == PathKind::Cleanup {
                    let _ = writeln!(
                        out,
                        "| cleanup, whole run | {n} | {} | | | {} | | {} | | {} | |",
                        millis(ours.run.wall_ms),
                        millis(ours.cpu_ms),
                        mebibytes(ours.peak_rss_kib),
                        ours.emulator_cpu_ms.map(millis).unwrap_or_default(),
                    );
                }
            }
        }
        let _ = writeln!(out);
    }

    let _ = writeln!(out, "## Targets at N = {TARGET_INSTANCES}\n");
    let _ = writeln!(out, "| Target | Network | Reached | Met |");
    let _ = writeln!(out, "|---|---|---|---|");
    for network in &networks {
        for path in [PathKind::Commit, PathKind::Rollback, PathKind::Cleanup] {
            let Some(ours) = find(path, TARGET_INSTANCES, System::Ours, network) else {
                continue;
            };
            let compared = compared_span(ours);
            let limit = target_requests(path);
            let _ = writeln!(
                out,
                "| {}: ≤ {limit} requests | {network} | {} | {} |",
                row_name(path),
                compared.total_requests,
                yes_no(compared.total_requests <= limit && ours.ok)
            );
            let _ = writeln!(
                out,
                "| {}: ≤ {TARGET_STAGES} stages | {network} | {} | {} |",
                row_name(path),
                compared.stages,
                yes_no(compared.stages <= TARGET_STAGES && ours.ok)
            );
            if network != "direct" {
                if let Some(base) = find(path, TARGET_INSTANCES, System::Baseline, network) {
                    let share = compared.wall_ms / base.run.wall_ms;
                    let _ = writeln!(
                        out,
                        "| {}: wall ≤ 1/5 of the baseline's | {network} | {} of {} ({}) | {} |",
                        row_name(path),
                        millis(compared.wall_ms),
                        millis(base.run.wall_ms),
                        ratio(compared.wall_ms, base.run.wall_ms),
                        yes_no(share <= TARGET_WALL_SHARE && ours.ok)
                    );
                }
            }
        }
    }

    render_small_run_targets(&mut out, figures, &networks);

    let _ = writeln!(out, "\n## How the stages are made up (ours)\n");
    let _ = writeln!(out, "Each wave's operations, in order; `×n` is the number of requests in the wave.\n");
    for network in &networks {
        for path in [PathKind::Commit, PathKind::Rollback, PathKind::Cleanup] {
            for &n in &sizes {
                let Some(ours) = find(path, n, System::Ours, network) else {
                    continue;
                };
                let _ = writeln!(out, "- {} N={n} ({network}): {}", path.name(), waves_text(&ours.run));
            }
        }
    }

    let failed: Vec<&Figures> = figures.iter().filter(|f| !f.ok).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\n## Runs that did not end as they should (marked ⚠ above)\n");
        for f in failed {
            let _ = writeln!(
                out,
                "- {} {:?} N={} ({}): {}; failed calls: {:?}",
                f.path.name(),
                f.system,
                f.instances,
                f.network,
                f.outcome,
                f.failures
            );
        }
    }
    out.push_str(NOTES);
    out
}

fn compared_span(ours: &Figures) -> &Span {
    ours.cleanup_phase.as_ref().unwrap_or(&ours.run)
}

fn row_name(path: PathKind) -> &'static str {
    match path {
        PathKind::Commit => "commit",
        PathKind::Rollback => "rollback",
        PathKind::Cleanup => "cleanup (cleanup phase)",
    }
}

fn short(operation: &str) -> &str {
    operation.split_once('.').map(|(_, name)| name).unwrap_or(operation)
}

fn requests_cell(span: &Span) -> String {
    let parts: Vec<String> =
        span.requests.iter().map(|(operation, count)| format!("{} {count}", short(operation))).collect();
    format!("**{}** ({})", span.total_requests, parts.join(", "))
}

fn waves_text(span: &Span) -> String {
    let waves: Vec<String> = span
        .waves
        .iter()
        .map(|wave| {
            let parts: Vec<String> =
                wave.iter()
                    .map(|(operation, count)| {
                        if *count == 1 {
                            short(operation).to_string()
                        } else {
                            format!("{}×{count}", short(operation))
                        }
                    })
                    .collect();
            parts.join(" + ")
        })
        .collect();
    format!("{} stages: {}", span.stages, waves.join(" → "))
}

fn failure_mark(figures: &Figures) -> &'static str {
    if figures.ok {
        ""
    } else {
        " ⚠"
    }
}

fn ratio(ours: f64, baseline: f64) -> String {
    if baseline <= 0.0 {
        return "–".to_string();
    }
    format!("{:.2}", ours / baseline)
}

fn millis(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else {
        format!("{ms:.0} ms")
    }
}

fn mebibytes(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

fn yes_no(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "**no**"
    }
}

/// nproc, memory and CPU model of this machine.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| text.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_string))
        .and_then(|line| line.split_whitespace().nth(1).and_then(|kib| kib.parse::<f64>().ok()))
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown memory".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs (nproc), {memory}, {model}")
}

/// The parts of the report that do not change from run to run.
const NOTES: &str = include_str!("notes.md");
