//! Swarm testing: each seed picks its own fault probabilities, actor mix, fleet, path and crash
//! points, so some seeds are calm and some are storms. A fixed mix finds less (Groce et al.,
//! "Swarm Testing", ISSTA 2012; FoundationDB and TigerBeetle do the same).

use crate::rng::Rng;

/// The path the spec is built for, in a world where nothing else moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// Creation succeeded: commit (path A).
    Commit,
    /// A shortfall: rollback (path B).
    Rollback,
    /// A commit that must fail (one selected instance is another run's): emergency cleanup (C).
    Cleanup,
}

impl Path {
    /// The name in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Path::Commit => "commit",
            Path::Rollback => "rollback",
            Path::Cleanup => "cleanup",
        }
    }
}

/// What one seed exercises.
#[derive(Debug, Clone)]
pub struct Swarm {
    /// The spec's path.
    pub path: Path,
    /// Selected instances of the run.
    pub selected: usize,
    /// Created instances of the run.
    pub created: usize,
    /// Idle instances in the pool besides the run's.
    pub pool_idle: usize,
    /// Instances running for other runs (the release actor returns them).
    pub others_running: usize,
    /// Of the created instances, the share still in state `created` (the rest are `running`).
    pub created_still_created: f64,
    /// Request-level faults, per port call: throttling, 5xx, timeouts, answers lost after the
    /// write landed.
    pub p_throttle: f64,
    /// See `p_throttle`.
    pub p_5xx: f64,
    /// See `p_throttle`.
    pub p_timeout: f64,
    /// See `p_throttle`.
    pub p_lost_answer: f64,
    /// Item-level cancellation reasons, per transaction item.
    pub p_item_conflict: f64,
    /// See `p_item_conflict`: `ThrottlingError`.
    pub p_item_throttle: f64,
    /// See `p_item_conflict`: `ProvisionedThroughputExceeded`.
    pub p_item_capacity: f64,
    /// Per SQS batch entry: reported `Failed` (retryable `InternalError`).
    pub p_entry_failure: f64,
    /// Per message: stored twice (at-least-once delivery).
    pub p_duplicate: f64,
    /// Seconds a fresh created instance is unknown to the EC2 API (eventual consistency).
    pub ec2_unknown_secs: i64,
    /// Per actor step: the chance each actor acts.
    pub p_selection: f64,
    /// See `p_selection`.
    pub p_release: f64,
    /// See `p_selection`.
    pub p_refresh: f64,
    /// See `p_selection`.
    pub p_boot_agent: f64,
    /// Crash the first driver at this port call (and whether that call's write lands first).
    pub crash_at: Option<(u64, bool)>,
    /// More crashes for later drivers: the chance each resumed driver crashes too.
    pub p_crash_again: f64,
    /// Pause the first driver at this port call for this long (seconds), letting the lease lapse
    /// so that a sweeper takes the run over.
    pub pause_at: Option<(u64, i64)>,
    /// Resume after a crash with `--force` instead of waiting for the lease to end.
    pub force_resume: bool,
    /// Latency of each port call, up to this many milliseconds.
    pub max_latency_ms: u64,
    /// `Limits::concurrency`.
    pub concurrency: usize,
    /// `Limits::on_retries_exhausted` is `Stall` (else `CleanUp`).
    pub stall_on_exhausted: bool,
    /// The spec's `resourceClassConfig` is given (else read from the table).
    pub config_in_spec: bool,
    /// `maxRuntimeMin`.
    pub max_runtime_min: i64,
    /// `idleTimeSec`.
    pub idle_time_sec: i64,
    /// GitHub re-runs the workflow (attempt 2, same run id) once the first driver is gone.
    pub rerun: bool,
    /// Selected instances' claim thresholds are this many seconds ahead at the start.
    pub claim_secs: i64,
    /// Machines' clocks are off the true time by up to this much (issue 17, item 2).
    pub max_skew_ms: i64,
    /// `Limits::one_transaction_max_instances` (0: the staged path always).
    pub one_transaction_max_instances: usize,
    /// The share of the run's instances without the pool tag (not the pool's: never terminated).
    pub untagged_share: f64,
    /// The share of the run's instances whose termination EC2 refuses, and with which code.
    pub refused_share: f64,
    /// See `refused_share`.
    pub refused_code: &'static str,
    /// One pool queue refuses for good from this many seconds on: (class index, seconds, code).
    pub queue_refusal: Option<(usize, i64, &'static str)>,
    /// Rollback: the share of created instances whose validation failed, so that creation
    /// terminated them and left their `created` records (`creation/index.ts` 53-59).
    pub creation_failed_share: f64,
    /// Rollback: the share of created instances without a record (creation's registration
    /// failed).
    pub recordless_share: f64,
    /// Selection's view of the pool config disagrees with the messages' cpu of this class, so it
    /// discards them (`pool-pickup-manager.ts` 139-147).
    pub selection_config_drift: Option<usize>,
    /// Selection re-queues a message (instance type or usage class filter).
    pub p_requeue: f64,
    /// A claimed instance is found unhealthy (no heartbeat): its claim is expired.
    pub p_unhealthy: f64,
    /// A claimed instance never signals its registration: terminated and expired.
    pub p_unregistered: f64,
    /// Release finds no deregistration signal: the instance is expired instead of announced.
    pub p_no_signal: f64,
    /// Per step: creation for another run launches an instance.
    pub p_creation: f64,
    /// This run's release job (`if: always()`) runs this many seconds after the first driver
    /// ended (the workflow's jobs ran meanwhile).
    pub run_release_after_secs: Option<i64>,
    /// A sweeper (`resume --all` on a schedule) runs this many milliseconds after the start,
    /// while the first driver may still be alive.
    pub sweeper_after_ms: Option<u64>,
}

impl Swarm {
    /// The parameters of seed `rng`.
    pub fn pick(rng: &mut Rng) -> Swarm {
        let path = *rng.pick(&[Path::Commit, Path::Commit, Path::Rollback, Path::Rollback, Path::Cleanup]);
        // Mostly small fleets; sometimes more than one transaction of 100 items.
        let fleet = if rng.chance(0.04) { rng.range(101, 250) } else { rng.range(1, 30) } as usize;
        let selected = rng.range(0, fleet as u64) as usize;
        let mut created = fleet - selected;
        let mut selected = selected;
        if path == Path::Cleanup && selected == 0 {
            // The cleanup path needs a selected instance that another run holds.
            selected = 1;
            created = created.saturating_sub(1);
        }
        // Calm, light, or a storm: the weather of this seed.
        let weather = rng.below(4);
        let scale = match weather {
            0 => 0.0,
            1 => 0.02,
            2 => 0.08,
            _ => 0.25,
        };
        let p = |rng: &mut Rng| if rng.chance(0.6) { rng.unit() * scale } else { 0.0 };
        let p_throttle = p(rng);
        let p_5xx = p(rng);
        let p_timeout = p(rng) / 4.0;
        let p_lost_answer = p(rng);
        let p_item_conflict = p(rng) / 2.0;
        let p_item_throttle = p(rng) / 2.0;
        let p_item_capacity = p(rng) / 4.0;
        let p_entry_failure = p(rng);
        let p_duplicate = p(rng);
        let actors = rng.below(3); // none, some, busy
        let a = |rng: &mut Rng| match actors {
            0 => 0.0,
            1 => {
                if rng.chance(0.5) {
                    rng.unit() * 0.1
                } else {
                    0.0
                }
            }
            _ => rng.unit() * 0.5,
        };
        let p_selection = a(rng);
        let p_release = a(rng);
        let p_refresh = a(rng);
        let p_boot_agent = a(rng);
        let p_creation = a(rng);
        let crash_at = rng.chance(0.35).then(|| (rng.range(1, 14), rng.chance(0.5)));
        let pause_at = rng.chance(0.15).then(|| (rng.range(1, 12), rng.range(31, 400) as i64));
        Swarm {
            path,
            selected,
            created,
            pool_idle: rng.range(0, 20) as usize,
            others_running: rng.range(0, 10) as usize,
            created_still_created: if rng.chance(0.5) { 0.0 } else { rng.unit() },
            p_throttle,
            p_5xx,
            p_timeout,
            p_lost_answer,
            p_item_conflict,
            p_item_throttle,
            p_item_capacity,
            p_entry_failure,
            p_duplicate,
            // Mostly within the adapter's NotFound retries (2 × 1 s); rarely longer.
            ec2_unknown_secs: match rng.below(20) {
                0 => rng.range(3, 8) as i64,
                1..=5 => rng.range(1, 2) as i64,
                _ => 0,
            },
            p_selection,
            p_release,
            p_refresh,
            p_boot_agent,
            crash_at,
            p_crash_again: if rng.chance(0.3) { rng.unit() * 0.5 } else { 0.0 },
            pause_at,
            force_resume: rng.chance(0.3),
            max_latency_ms: *rng.pick(&[0, 5, 50, 300]),
            concurrency: *rng.pick(&[1, 2, 8]),
            stall_on_exhausted: rng.chance(0.3),
            config_in_spec: rng.chance(0.5),
            max_runtime_min: rng.range(1, 120) as i64,
            idle_time_sec: rng.range(30, 3600) as i64,
            // Mostly comfortable; sometimes the claims run out during the run.
            claim_secs: if rng.chance(0.15) { rng.range(1, 40) as i64 } else { 300 },
            rerun: rng.chance(0.2),
            max_skew_ms: match rng.below(5) {
                0 | 1 => 0,
                2 => rng.range(0, 5_000) as i64,
                _ => rng.range(0, crate::clock::MAX_OFFSET_MS as u64) as i64,
            },
            one_transaction_max_instances: *rng.pick(&[0, 0, 1, 3, 10, 100, 100, 100]),
            untagged_share: if rng.chance(0.25) { rng.unit() * 0.5 } else { 0.0 },
            refused_share: if rng.chance(0.2) { rng.unit() * 0.5 } else { 0.0 },
            refused_code: ["OperationNotPermitted", "UnauthorizedOperation"][rng.below(2) as usize],
            queue_refusal: rng.chance(0.15).then(|| {
                let code = *rng.pick(&["AWS.SimpleQueueService.NonExistentQueue", "AccessDenied"]);
                (rng.below(2) as usize, rng.range(0, 60) as i64, code)
            }),
            creation_failed_share: if rng.chance(0.3) { rng.unit() } else { 0.0 },
            recordless_share: if rng.chance(0.1) { rng.unit() * 0.3 } else { 0.0 },
            selection_config_drift: rng.chance(0.1).then(|| rng.below(2) as usize),
            p_requeue: if rng.chance(0.3) { rng.unit() * 0.5 } else { 0.0 },
            p_unhealthy: if rng.chance(0.3) { rng.unit() * 0.3 } else { 0.0 },
            p_unregistered: if rng.chance(0.3) { rng.unit() * 0.3 } else { 0.0 },
            p_no_signal: if rng.chance(0.3) { rng.unit() * 0.5 } else { 0.0 },
            p_creation,
            run_release_after_secs: rng.chance(0.5).then(|| rng.range(0, 900) as i64),
            sweeper_after_ms: rng.chance(0.3).then(|| rng.range(0, 60_000)),
        }
    }

    /// No actor, no fault, no latency, no crash: the in-memory AWS alone ([`crate::memory`]).
    pub fn quiet() -> Swarm {
        Swarm {
            path: Path::Commit,
            selected: 0,
            created: 0,
            pool_idle: 0,
            others_running: 0,
            created_still_created: 0.0,
            p_throttle: 0.0,
            p_5xx: 0.0,
            p_timeout: 0.0,
            p_lost_answer: 0.0,
            p_item_conflict: 0.0,
            p_item_throttle: 0.0,
            p_item_capacity: 0.0,
            p_entry_failure: 0.0,
            p_duplicate: 0.0,
            ec2_unknown_secs: 0,
            p_selection: 0.0,
            p_release: 0.0,
            p_refresh: 0.0,
            p_boot_agent: 0.0,
            crash_at: None,
            p_crash_again: 0.0,
            pause_at: None,
            force_resume: false,
            max_latency_ms: 0,
            concurrency: 1,
            stall_on_exhausted: false,
            config_in_spec: true,
            max_runtime_min: 1,
            idle_time_sec: 1,
            claim_secs: 300,
            rerun: false,
            max_skew_ms: 0,
            one_transaction_max_instances: 100,
            untagged_share: 0.0,
            refused_share: 0.0,
            refused_code: "OperationNotPermitted",
            queue_refusal: None,
            creation_failed_share: 0.0,
            recordless_share: 0.0,
            selection_config_drift: None,
            p_requeue: 0.0,
            p_unhealthy: 0.0,
            p_unregistered: 0.0,
            p_no_signal: 0.0,
            p_creation: 0.0,
            run_release_after_secs: None,
            sweeper_after_ms: None,
        }
    }

    /// A seed with no faults at all (request, item, SQS) for the final resumes.
    pub fn calm(&self) -> bool {
        [
            self.p_throttle,
            self.p_5xx,
            self.p_timeout,
            self.p_lost_answer,
            self.p_item_conflict,
            self.p_item_throttle,
            self.p_item_capacity,
            self.p_entry_failure,
        ]
        .iter()
        .all(|p| *p == 0.0)
    }
}
