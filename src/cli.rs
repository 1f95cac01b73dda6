//! The command-line interface: argument parsing, output, and exit codes.
//!
//! Exit codes: `0` Done; `1` Failed after graceful rollback; `2` Failed after emergency cleanup;
//! `3` not finished (state persisted, resumable; or another driver holds the run); `64` bad usage
//! (including an invalid run id argument); `65` invalid spec (nothing written); `66` no such run;
//! `69` AWS unavailable before anything was written; `70` internal error (corrupt record, invalid
//! transition); `77` permission denied or no usable credentials; `78` missing table or a failed
//! `init`.
//!
//! This module parses arguments, runs one command per function, and chooses what to print;
//! every rendering and escape lives in [`crate::output`], because the GitHub Actions runner
//! reads a job's output for `::` commands.
//!
//! In a GitHub Actions job (`GITHUB_ACTIONS=true`) the job's identity binds what a command may act
//! for: a spec, a `resume`/`status` run id or `--attempt`, and the runs `audit --fix` would resume
//! or announce for, must be the job's own run (`GITHUB_RUN_ID`, `GITHUB_RUN_ATTEMPT`), unless
//! `--allow-foreign-run` says otherwise (see [`JobIdentity`]).

use std::io::Read;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::audit::{AuditReport, Repair, RepairOutcome};
use crate::config::{Limits, QueueUrlRule};
use crate::driver::{DriveError, Hooks, OutcomeKind, RunOutcome};
use crate::engine::{BuildError, Engine};
use crate::machine;
use crate::output::escape::{neutralize_commands, plain};
use crate::output::results::{
    ErrorBody, ErrorKind, ErrorReport, InitResult, ListRow, ResumeAllEntry, RunIndexResult, RunReport, TableResult,
    TtlResult, ValidateResult,
};
use crate::output::{exit, github, json, text};
use crate::ports::{ErrorClass, StoreError};
use crate::spec::{Spec, SpecError, MAX_SPEC_FILE_BYTES};

/// Exit code: not finished, resumable.
pub const EXIT_RESUMABLE: i32 = exit::RESUMABLE;
/// Exit code: a listing was cut (`list --unfinished`, `resume --all`): unfinished runs may not
/// have been shown or resumed.
pub const EXIT_CUT: i32 = exit::CUT;
/// Exit code: bad usage.
pub const EXIT_USAGE: i32 = exit::USAGE;
/// Exit code: invalid spec, or a spec or run id that is not the job's run.
pub const EXIT_INVALID_SPEC: i32 = exit::INVALID_SPEC;
/// Exit code: no such run.
pub const EXIT_NO_SUCH_RUN: i32 = exit::NO_SUCH_RUN;
/// Exit code: AWS unavailable before anything was written.
pub const EXIT_UNAVAILABLE: i32 = exit::UNAVAILABLE;
/// Exit code: internal error.
pub const EXIT_INTERNAL: i32 = exit::INTERNAL;
/// Exit code: permission denied (IAM) or no usable credentials.
pub const EXIT_PERMISSION: i32 = exit::PERMISSION;
/// Exit code: configuration error (missing table).
pub const EXIT_CONFIG: i32 = exit::CONFIG;

/// The exit-code table, printed at the end of `--help`.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   Done: committed (and success of status, list, table, init, validate, iam-policy)
  1   Failed after graceful rollback (capacity shortfall)
  2   Failed after emergency cleanup; the original error is on stderr
  3   not finished: state persisted, run `post-provision resume RUN_ID`; or a run whose first
      write DynamoDB throttled past the throttle budget (nothing written; repeat it later)
  4   list --unfinished / resume --all: cut, some unfinished runs were not read
  64  bad usage (flags, run id argument, unreadable spec file, out-of-range limits)
  65  invalid spec, a different spec for an existing run id, or (in a GitHub Actions job) a
      spec or run id that is not the job's run; nothing written
  66  no such run
  69  AWS unavailable before anything was written; repeat the command
  70  internal error (corrupt run record, invalid transition)
  77  permission denied (IAM) or no usable AWS credentials
  78  configuration: the table does not exist, or init failed
  audit: 0 clean (or all repaired), 1 findings remain, 3 a repair could not be done now

The spec's format: docs/schemas/spec.schema.json (JSON Schema); check a spec offline with
`post-provision validate --spec FILE`. Runbook: docs/operations.md.";

/// The version `--version` shows: `scripts/release` sets `POST_PROVISION_VERSION` to the crate
/// version and the commit; other builds show the crate version.
const VERSION: &str = match option_env!("POST_PROVISION_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// The heading of the flags every subcommand takes, listed after a subcommand's own.
const GLOBAL: &str = "Global options";

/// Finishes provisioning of self-hosted runner pools: commit, roll back or clean up a run.
#[derive(Debug, Parser)]
#[command(name = "post-provision", version = VERSION, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// The pool's DynamoDB table.
    #[arg(long, env = "POST_PROVISION_TABLE", global = true, help_heading = GLOBAL)]
    table: Option<String>,
    /// AWS region (default: the standard AWS chain, e.g. AWS_REGION).
    #[arg(long, global = true, help_heading = GLOBAL)]
    region: Option<String>,
    /// One endpoint for DynamoDB, SQS and EC2 (default: AWS_ENDPOINT_URL or AWS itself).
    #[arg(long, global = true, help_heading = GLOBAL)]
    endpoint_url: Option<String>,
    /// Output format of results.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text, global = true, help_heading = GLOBAL)]
    output: OutputFormat,
    /// Log format on stderr (RUST_LOG sets the level; default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, help_heading = GLOBAL)]
    log_format: LogFormat,
    /// Attempts per AWS request, retries included.
    #[arg(long, env = "POST_PROVISION_MAX_ATTEMPTS", default_value_t = Limits::default().max_attempts, global = true, help_heading = GLOBAL)]
    max_attempts: u32,
    /// Time one AWS operation may take, all attempts included, in milliseconds.
    #[arg(long, env = "POST_PROVISION_OPERATION_TIMEOUT_MS", default_value_t = Limits::default().operation_timeout.as_millis() as u64, global = true, help_heading = GLOBAL)]
    operation_timeout_ms: u64,
    /// Time one AWS attempt may take, in milliseconds.
    #[arg(long, env = "POST_PROVISION_ATTEMPT_TIMEOUT_MS", default_value_t = Limits::default().attempt_timeout.as_millis() as u64, global = true, help_heading = GLOBAL)]
    attempt_timeout_ms: u64,
    /// First retry backoff, in milliseconds (exponential with full jitter up to the max).
    #[arg(long, env = "POST_PROVISION_INITIAL_BACKOFF_MS", default_value_t = Limits::default().initial_backoff.as_millis() as u64, global = true, help_heading = GLOBAL)]
    initial_backoff_ms: u64,
    /// Largest retry backoff, in milliseconds.
    #[arg(long, env = "POST_PROVISION_MAX_BACKOFF_MS", default_value_t = Limits::default().max_backoff.as_millis() as u64, global = true, help_heading = GLOBAL)]
    max_backoff_ms: u64,
    /// Time to open a connection, in milliseconds.
    #[arg(long, env = "POST_PROVISION_CONNECT_TIMEOUT_MS", default_value_t = Limits::default().connect_timeout.as_millis() as u64, global = true, help_heading = GLOBAL)]
    connect_timeout_ms: u64,
    /// Rounds of re-sending batch items that were cancelled (transaction conflicts) or failed
    /// (SQS batch entries) before the step's error counts.
    #[arg(long, env = "POST_PROVISION_BATCH_ROUNDS", default_value_t = Limits::default().batch_rounds, global = true, help_heading = GLOBAL)]
    batch_rounds: u32,
    /// Extra TerminateInstances attempts for ids EC2 reports unknown (eventual consistency).
    #[arg(long, env = "POST_PROVISION_NOT_FOUND_RETRIES", default_value_t = Limits::default().not_found_retries, global = true, help_heading = GLOBAL)]
    not_found_retries: u32,
    /// Wait before such an attempt, in milliseconds.
    #[arg(long, env = "POST_PROVISION_NOT_FOUND_DELAY_MS", default_value_t = Limits::default().not_found_delay.as_millis() as u64, global = true, help_heading = GLOBAL)]
    not_found_delay_ms: u64,
    /// When AWS still fails after a step's retries: `clean-up` (the design: emergency cleanup)
    /// or `stall` (stop resumable, exit 3, and keep the fleet).
    #[arg(long, env = "POST_PROVISION_ON_RETRIES_EXHAUSTED", value_enum, default_value_t = RetriesExhausted::CleanUp, global = true, help_heading = GLOBAL)]
    on_retries_exhausted: RetriesExhausted,
    /// Batches of one stage in flight at once.
    #[arg(long, env = "POST_PROVISION_CONCURRENCY", default_value_t = Limits::default().concurrency, global = true, help_heading = GLOBAL)]
    concurrency: usize,
    /// Seconds a driver's lease on a run lasts without renewal.
    #[arg(long, env = "POST_PROVISION_LEASE_SECS", default_value_t = Limits::default().lease_secs, global = true, help_heading = GLOBAL)]
    lease_secs: i64,
    /// Seconds throttled writes are re-sent with backoff, in all, before the run stops resumable
    /// (exit 3). Throttling never starts emergency cleanup.
    #[arg(long, env = "POST_PROVISION_THROTTLE_BUDGET_SECS", default_value_t = Limits::default().throttle_budget.as_secs(), global = true)]
    throttle_budget_secs: u64,
    /// The EC2 tag that marks the pool's instances; no instance without it is ever terminated.
    #[arg(long, env = "POST_PROVISION_POOL_TAG_KEY", default_value_t = Limits::default().pool_tag_key, global = true)]
    pool_tag_key: String,
    /// Runs of at most this many instances persist their first state with its transitions in
    /// one transaction (a small commit is one request); 0 turns it off.
    #[arg(long, env = "POST_PROVISION_ONE_TRANSACTION_MAX_INSTANCES", default_value_t = Limits::default().one_transaction_max_instances, global = true)]
    one_transaction_max_instances: usize,
    /// In a GitHub Actions job, act for a run other than the job's own (`GITHUB_RUN_ID`,
    /// `GITHUB_RUN_ATTEMPT`): only for an orchestrator that drives other runs on purpose.
    #[arg(long, env = "POST_PROVISION_ALLOW_FOREIGN_RUN", global = true, help_heading = GLOBAL)]
    allow_foreign_run: bool,
    /// Days a finished run record is kept (DynamoDB TTL attribute `ttl`).
    #[arg(long, env = "POST_PROVISION_RETENTION_DAYS", default_value_t = Limits::default().retention_days, global = true, help_heading = GLOBAL)]
    retention_days: i64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RetriesExhausted {
    CleanUp,
    Stall,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TableFormat {
    Markdown,
    Mermaid,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a run from its spec (or report/continue the run with the same id and spec).
    #[command(after_help = EXIT_CODES_HELP)]
    Run {
        /// The spec file, or - for standard input (at most 2 MiB; format:
        /// docs/schemas/spec.schema.json).
        #[arg(long)]
        spec: String,
    },
    /// Check a spec without AWS: exit 0 when it is valid, 65 (naming the field) when not.
    #[command(after_help = EXIT_CODES_HELP)]
    Validate {
        /// The spec file, or - for standard input (at most 2 MiB).
        #[arg(long)]
        spec: String,
    },
    /// Continue an unfinished run after a crash; report a finished one.
    Resume {
        /// The run id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        run_id: Option<String>,
        /// Every unfinished run whose driver is gone (lease ended).
        #[arg(long)]
        all: bool,
        /// Take the run over even though its lease has not ended. Only when its driver is known
        /// to be dead (killed); a live one is fenced off at its next write.
        #[arg(long, conflicts_with = "all")]
        force: bool,
        /// Which attempt of the run (GITHUB_RUN_ATTEMPT); default: its latest.
        #[arg(long, conflicts_with = "all", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        attempt: Option<u32>,
    },
    /// A run's state, path, transitions with times, and error.
    Status {
        /// The run id.
        run_id: String,
        /// Which attempt of the run (GITHUB_RUN_ATTEMPT); default: its latest.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        attempt: Option<u32>,
    },
    /// Runs, newest first, with state and age.
    List {
        /// Only runs not in Done or Failed.
        #[arg(long)]
        unfinished: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The transition table.
    Table {
        /// Markdown table or Mermaid diagram.
        #[arg(long, value_enum, default_value_t = TableFormat::Markdown)]
        format: TableFormat,
    },
    /// Create the pool table if it is missing; check an existing one's key schema.
    Init,
    /// Print the least-privilege IAM policy of a role, for the pool tag in --pool-tag-key.
    IamPolicy {
        /// Whose policy: a workflow's `run`, the `sweeper` (resume --all), `audit`, or `init`.
        #[arg(long, value_enum, default_value_t = crate::iam::Role::Run)]
        role: crate::iam::Role,
    },
    /// Find what no run will finish (orphan instances, ghost records, leaked creations, stale
    /// claims, unannounced idle instances, unfinished runs); repair them with --fix.
    #[command(after_help = AUDIT_EXIT_CODES_HELP)]
    Audit {
        /// Repair each finding: every record write is conditional on the record as read.
        #[arg(long)]
        fix: bool,
        /// Instances and records younger than this are not reported as orphans or ghosts.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(i64).range(0..=604_800))]
        grace_secs: i64,
        /// Which EC2 instances are the pool's, as one DescribeInstances filter NAME=VALUE[,VALUE...]
        /// (default: tag-key=<the pool tag key>), e.g. tag:InitialRunId=9876543210.
        #[arg(long)]
        instance_filter: Option<String>,
    },
}

/// The exit codes of `audit`, printed at the end of its `--help`.
const AUDIT_EXIT_CODES_HELP: &str = "\
Exit codes of audit:
  0   the pool is clean, or --fix repaired every finding (hints never count)
  1   findings remain (without --fix, or a record moved since it was read: audit again)
  3   a repair could not be done now (AWS failed, a run is busy); repeat audit --fix
  64  bad usage
  69  AWS could not be read; nothing was written
  77  permission denied (IAM) or no usable AWS credentials
  78  the table does not exist";

/// The exit code and kind of a driver error.
pub fn classify_drive_error(error: &DriveError) -> (i32, ErrorKind) {
    match error {
        DriveError::InvalidSpec(_) => (EXIT_INVALID_SPEC, ErrorKind::InvalidSpec),
        DriveError::SpecMismatch { .. } => (EXIT_INVALID_SPEC, ErrorKind::SpecMismatch),
        DriveError::NoSuchRun { .. } => (EXIT_NO_SUCH_RUN, ErrorKind::NoSuchRun),
        DriveError::Busy { .. } => (EXIT_RESUMABLE, ErrorKind::Busy),
        DriveError::LeaseLost { .. } => (EXIT_RESUMABLE, ErrorKind::LeaseLost),
        DriveError::Stalled { .. } => (EXIT_RESUMABLE, ErrorKind::Stalled),
        DriveError::Crashed { .. } => (EXIT_RESUMABLE, ErrorKind::Crashed),
        DriveError::Uncertain { .. } => (EXIT_RESUMABLE, ErrorKind::Uncertain),
        // The run's creating transaction throttled past the throttle budget: nothing was
        // written, and like any run stopped by load it is repeated later (3), not "unavailable".
        DriveError::NotStarted(aws) if aws.class == ErrorClass::Throttling && aws.operation == "TransactWriteItems" => {
            (EXIT_RESUMABLE, ErrorKind::Throttled)
        }
        DriveError::PoolNotConfigured(_) => (EXIT_CONFIG, ErrorKind::PoolConfig),
        DriveError::NotStarted(aws) | DriveError::Store(StoreError::Aws(aws)) => classify_aws_error(aws),
        DriveError::Store(_) | DriveError::Transition(_) => (EXIT_INTERNAL, ErrorKind::Internal),
    }
}

/// The exit code and kind of an AWS error that stopped a command before it wrote anything.
pub fn classify_aws_error(error: &crate::ports::AwsError) -> (i32, ErrorKind) {
    match error.class {
        ErrorClass::NotFound => (EXIT_CONFIG, ErrorKind::MissingTable),
        ErrorClass::Permission => (EXIT_PERMISSION, ErrorKind::Permission),
        _ => (EXIT_UNAVAILABLE, ErrorKind::Unavailable),
    }
}

/// The exit code and kind of an `init` failure. `ensure_table` and `ensure_ttl` report their
/// errors as text (`AwsError`'s display: "DynamoDB DescribeTable failed: CODE: message"), so the
/// text is read: a transport failure is 69 (repeat), a permission or credentials failure 77, and
/// anything else (wrong key schema, a table not ACTIVE in time) 78.
fn classify_init_error(message: &str) -> (i32, ErrorKind) {
    let after = message.split_once(" failed: ").map(|(_, rest)| rest).unwrap_or(message);
    let code = after.split_once(": ").map(|(code, _)| code).unwrap_or("");
    let transport = ["could not send the request", "timed out", "could not read the response"];
    if transport.iter().any(|prefix| after.starts_with(prefix)) {
        (EXIT_UNAVAILABLE, ErrorKind::Unavailable)
    } else if after.starts_with("no usable AWS credentials")
        || crate::aws::classify_code(code, None) == ErrorClass::Permission
    {
        (EXIT_PERMISSION, ErrorKind::Permission)
    } else if !code.is_empty() && crate::aws::classify_code(code, None).is_retryable() {
        (EXIT_UNAVAILABLE, ErrorKind::Unavailable)
    } else {
        (EXIT_CONFIG, ErrorKind::Table)
    }
}

/// Prints results and errors in the format asked for; the renderings are [`crate::output`]'s.
struct Printer {
    format: OutputFormat,
    /// The pool's table, named in errors about it.
    table: Option<String>,
}

impl Printer {
    /// A result on stdout: its JSON, or its text checked once more as a whole.
    fn value<T: Serialize + ?Sized>(&self, value: &T, text: impl FnOnce() -> String) {
        match self.format {
            OutputFormat::Json => println!("{}", json::to_string(value)),
            OutputFormat::Text => print!("{}", neutralize_commands(&text())),
        }
    }

    fn error(&self, code: i32, kind: ErrorKind, message: String, field: Option<String>) -> i32 {
        let message = plain(&message);
        eprintln!("error: {message}");
        if self.format == OutputFormat::Json {
            let report = ErrorReport { error: ErrorBody { kind, message, field }, exit_code: code };
            println!("{}", json::to_string(&report));
        }
        code
    }

    fn github(&self) -> bool {
        std::env::var("GITHUB_ACTIONS").map(|v| v == "true").unwrap_or(false)
    }

    /// Workflow commands go to stdout, except when stdout carries JSON.
    fn annotations(&self) -> Box<dyn std::io::Write> {
        match self.format {
            OutputFormat::Json => Box::new(std::io::stderr()),
            OutputFormat::Text => Box::new(std::io::stdout()),
        }
    }

    fn github_failed(&self, io: std::io::Error) {
        eprintln!("warning: could not write GitHub Actions outputs: {}", plain(&io.to_string()));
    }

    /// An error that ends a command acting for a run: printed, and in a job its step outputs
    /// and error annotation.
    fn error_for_run(
        &self,
        run_id: Option<&str>,
        code: i32,
        kind: ErrorKind,
        message: String,
        field: Option<String>,
    ) -> i32 {
        let code = self.error(code, kind, message.clone(), field);
        if self.github() {
            if let Err(io) = github::write_error(run_id, code, &message, &mut *self.annotations()) {
                self.github_failed(io);
            }
        }
        code
    }

    fn drive_error_for(&self, run_id: Option<&str>, error: &DriveError) -> i32 {
        let code = self.drive_error(error);
        if self.github() {
            if let Err(io) = github::write_error(run_id, code, &error.to_string(), &mut *self.annotations()) {
                self.github_failed(io);
            }
        }
        code
    }

    fn drive_error(&self, error: &DriveError) -> i32 {
        let (code, kind) = classify_drive_error(error);
        let field = match error {
            DriveError::InvalidSpec(spec_error) => Some(spec_error.field.clone()),
            _ => None,
        };
        let mut message = error.to_string();
        if kind == ErrorKind::MissingTable {
            // DynamoDB's "Requested resource not found" names no resource: say which, and the fix.
            let table = self.table.as_deref().unwrap_or("(none given)");
            message.push_str(&format!(
                " — table {table} does not exist here; create it with `post-provision --table {table} init`"
            ));
        }
        if kind == ErrorKind::Throttled {
            message.push_str(" — repeat the same `run` later");
        } else if code == EXIT_RESUMABLE {
            message.push_str(" — the state is persisted; run `post-provision resume RUN_ID` to finish it");
        }
        self.error(code, kind, message, field)
    }

    fn outcome(&self, outcome: &RunOutcome) -> i32 {
        let report = RunReport::of_outcome(outcome);
        self.value(&report, || text::run_report(&report));
        if self.github() {
            if let Err(io) = github::write_outcome(outcome, &mut *self.annotations()) {
                self.github_failed(io);
            }
        }
        // Both failure paths end the step with one clear line on stderr.
        if let Some(error) = outcome.record.error.as_ref().filter(|_| outcome.kind != OutcomeKind::Committed) {
            eprintln!("error: run {} failed: {}", plain(&outcome.record.run_id), plain(&error.message));
        }
        outcome.kind.exit_code()
    }
}

/// The run a GitHub Actions job acts for (`GITHUB_RUN_ID`, `GITHUB_RUN_ATTEMPT`), which binds the
/// spec and every run id argument: a spec written for another run could otherwise make this job
/// terminate or release that run's instances. Outside a job (`GITHUB_ACTIONS` not `true`), with
/// `--allow-foreign-run`, or when the runner did not set `GITHUB_RUN_ID`, nothing is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobIdentity {
    run_id: String,
    /// `GITHUB_RUN_ATTEMPT` as set (compared as a number).
    run_attempt: Option<String>,
}

/// A run id or attempt that is not the job's: the field, and a message naming both values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForeignRun {
    field: &'static str,
    message: String,
}

impl JobIdentity {
    fn from_env(allow_foreign_run: bool) -> Option<JobIdentity> {
        let in_job = std::env::var("GITHUB_ACTIONS").map(|v| v == "true").unwrap_or(false);
        if !in_job || allow_foreign_run {
            return None;
        }
        let run_id = std::env::var("GITHUB_RUN_ID").ok().filter(|id| !id.is_empty())?;
        Some(JobIdentity { run_id, run_attempt: std::env::var("GITHUB_RUN_ATTEMPT").ok() })
    }

    /// Checks that `run_id` (and `attempt`, when given) are the job's.
    fn check(&self, what: &str, run_id: &str, attempt: Option<u32>) -> Result<(), ForeignRun> {
        const OPT_OUT: &str =
            "pass --allow-foreign-run (POST_PROVISION_ALLOW_FOREIGN_RUN=true) only to act for another run on purpose";
        if run_id != self.run_id {
            return Err(ForeignRun {
                field: "runId",
                message: format!(
                    "{what} names run {run_id:?}, but this GitHub Actions job is run {:?} (GITHUB_RUN_ID); {OPT_OUT}",
                    self.run_id
                ),
            });
        }
        let job_attempt = self.run_attempt.as_deref().map(|a| (a, a.trim().parse::<u32>().ok()));
        match (attempt, job_attempt) {
            (Some(attempt), Some((text, parsed))) if parsed != Some(attempt) => Err(ForeignRun {
                field: "runAttempt",
                message: format!(
                    "{what} names attempt {attempt} of run {run_id:?}, but this GitHub Actions job is attempt {text:?} (GITHUB_RUN_ATTEMPT); {OPT_OUT}"
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Builds the limits from the flags; an out-of-range one is a usage error naming its flag.
fn limits_of(cli: &Cli, printer: &Printer) -> Result<Limits, i32> {
    let limits = Limits {
        max_attempts: cli.max_attempts,
        initial_backoff: Duration::from_millis(cli.initial_backoff_ms),
        max_backoff: Duration::from_millis(cli.max_backoff_ms),
        attempt_timeout: Duration::from_millis(cli.attempt_timeout_ms),
        operation_timeout: Duration::from_millis(cli.operation_timeout_ms),
        connect_timeout: Duration::from_millis(cli.connect_timeout_ms),
        concurrency: cli.concurrency,
        batch_rounds: cli.batch_rounds,
        lease_secs: cli.lease_secs,
        retention_days: cli.retention_days,
        not_found_retries: cli.not_found_retries,
        not_found_delay: Duration::from_millis(cli.not_found_delay_ms),
        on_retries_exhausted: match cli.on_retries_exhausted {
            RetriesExhausted::CleanUp => crate::config::OnRetriesExhausted::CleanUp,
            RetriesExhausted::Stall => crate::config::OnRetriesExhausted::Stall,
        },
        throttle_budget: Duration::from_secs(cli.throttle_budget_secs),
        pool_tag_key: cli.pool_tag_key.clone(),
        one_transaction_max_instances: cli.one_transaction_max_instances,
        queue_urls: queue_url_rule(cli.endpoint_url.as_deref()),
    };
    match limits.check() {
        Ok(()) => Ok(limits),
        Err(error) => {
            let (flag, variable) = limit_flag(error.field);
            let message = format!("invalid limits: {} (flag {flag}, environment variable {variable})", error.message);
            Err(printer.error(EXIT_USAGE, ErrorKind::Usage, message, None))
        }
    }
}

/// Reads, parses and validates the spec, before any AWS client exists: bad input writes nothing.
/// In a GitHub Actions job it must be the job's run, and a missing `runAttempt` is the job's.
fn load_spec(printer: &Printer, path: &str, rule: QueueUrlRule, job: Option<&JobIdentity>) -> Result<Spec, i32> {
    let invalid = |error: SpecError| printer.drive_error_for(None, &DriveError::InvalidSpec(error));
    let text = match read_spec(path) {
        Ok(text) => text,
        Err(ReadSpecError::Unreadable(message)) => {
            return Err(printer.error(EXIT_USAGE, ErrorKind::Usage, message, None))
        }
        Err(ReadSpecError::TooLarge(problem)) => return Err(invalid(SpecError { field: "$".into(), problem })),
    };
    let spec = Spec::from_json(&text).and_then(|spec| spec.check_queue_urls(rule).map(|()| spec)).map_err(invalid)?;
    if let Some(job) = job {
        if let Err(foreign) = job.check("the spec", &spec.run_id, spec.run_attempt) {
            let code = EXIT_INVALID_SPEC;
            return Err(printer.error_for_run(
                None,
                code,
                ErrorKind::ForeignRun,
                foreign.message,
                Some(foreign.field.into()),
            ));
        }
    }
    with_github_run_attempt(spec).map_err(invalid)
}

/// Checks a `resume`/`status` run id argument (and `--attempt`) before any AWS client exists.
fn check_run_argument(
    printer: &Printer,
    run_id: &str,
    attempt: Option<u32>,
    job: Option<&JobIdentity>,
) -> Result<(), i32> {
    if let Err(problem) = crate::spec::validate_run_id(run_id) {
        return Err(printer.error(EXIT_USAGE, ErrorKind::Usage, format!("invalid RUN_ID argument: {problem}"), None));
    }
    match job.map(|job| job.check("the RUN_ID argument", run_id, attempt)) {
        Some(Err(foreign)) => {
            Err(printer.error_for_run(Some(run_id), EXIT_INVALID_SPEC, ErrorKind::ForeignRun, foreign.message, None))
        }
        _ => Ok(()),
    }
}

/// The engine for the flags, or a usage error.
async fn build_engine(cli: &Cli, limits: Limits, printer: &Printer) -> Result<Engine, i32> {
    let mut builder = Engine::builder().limits(limits).hooks(hooks_from_env());
    if let Some(table) = &cli.table {
        builder = builder.table(table.clone());
    }
    if let Some(region) = &cli.region {
        builder = builder.region(region.clone());
    }
    if let Some(endpoint) = &cli.endpoint_url {
        builder = builder.endpoint_url(endpoint.clone());
    }
    match builder.build().await {
        Ok(engine) => Ok(engine),
        Err(error @ BuildError::MissingTable) | Err(error @ BuildError::InvalidLimits(_)) => {
            Err(printer.error(EXIT_USAGE, ErrorKind::Usage, error.to_string(), None))
        }
    }
}

/// Parses `args`, runs the command, and returns the process exit code.
pub async fn run(args: Vec<String>) -> i32 {
    let requested_format = output_format_in(&args);
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error, requested_format),
    };
    init_logging(cli.log_format);
    let printer = Printer { format: cli.output, table: cli.table.clone() };
    if let Command::Table { format } = cli.command {
        return table(format);
    }
    if let Command::IamPolicy { role } = cli.command {
        return iam_policy(&printer, role, &cli.pool_tag_key);
    }
    let limits = match limits_of(&cli, &printer) {
        Ok(limits) => limits,
        Err(code) => return code,
    };
    let job = JobIdentity::from_env(cli.allow_foreign_run);
    let job = job.as_ref();
    let (rule, command) = (limits.queue_urls, &cli.command);
    let result = match command {
        Command::Table { .. } | Command::IamPolicy { .. } => unreachable!("handled above"),
        Command::Validate { spec } => load_spec(&printer, spec, rule, job).map(|spec| validate(&printer, &spec)),
        Command::Run { spec } => match load_spec(&printer, spec, rule, job) {
            Ok(spec) => run_spec(&cli, limits, &printer, spec).await,
            Err(code) => Err(code),
        },
        Command::Resume { run_id: Some(run_id), force, attempt, .. } => {
            match check_run_argument(&printer, run_id, *attempt, job) {
                Ok(()) => resume(&cli, limits, &printer, run_id, *attempt, *force).await,
                Err(code) => Err(code),
            }
        }
        Command::Resume { run_id: None, .. } => resume_all(&cli, limits, &printer).await,
        Command::Status { run_id, attempt } => match check_run_argument(&printer, run_id, *attempt, job) {
            Ok(()) => status(&cli, limits, &printer, run_id, *attempt).await,
            Err(code) => Err(code),
        },
        Command::List { unfinished, limit } => list(&cli, limits, &printer, *unfinished, *limit).await,
        Command::Audit { fix, grace_secs, instance_filter } => {
            let options =
                AuditCommand { fix: *fix, grace_secs: *grace_secs, instance_filter: instance_filter.as_deref() };
            audit(&cli, limits, &printer, options, job).await
        }
        Command::Init => init(&cli, limits, &printer).await,
    };
    result.unwrap_or_else(|code| code)
}

/// `iam-policy`: the role's policy, for the pool tag key given. Needs no AWS.
fn iam_policy(printer: &Printer, role: crate::iam::Role, pool_tag_key: &str) -> i32 {
    match crate::iam::policy_text(role, pool_tag_key) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(problem) => printer.error(EXIT_USAGE, ErrorKind::Usage, format!("invalid --pool-tag-key: {problem}"), None),
    }
}

/// clap's own errors (usage) and its help and version, which it renders itself. It quotes the
/// arguments (and environment values) it did not understand as they are: one of them may hold
/// a line break and a workflow command, so its text is neutralized like ours.
fn usage_error(error: &clap::Error, format: OutputFormat) -> i32 {
    // clap's help and version "errors" exit 0; its usage errors exit 2, ours 64.
    let code = if error.exit_code() == 0 { 0 } else { EXIT_USAGE };
    let rendered = neutralize_commands(&error.render().to_string());
    if code == 0 {
        print!("{rendered}");
        return 0;
    }
    eprint!("{rendered}");
    if format == OutputFormat::Json {
        // The error's own lines, without clap's usage hint after the first blank line.
        let lines: Vec<&str> = rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
        let message = lines.join(" ").trim_start_matches("error: ").to_string();
        let report = ErrorReport { error: ErrorBody { kind: ErrorKind::Usage, message, field: None }, exit_code: code };
        println!("{}", json::to_string(&report));
    }
    code
}

/// `table`: the transition table, with no AWS.
fn table(format: TableFormat) -> i32 {
    let text = match format {
        TableFormat::Markdown => machine::render_markdown(),
        TableFormat::Mermaid => machine::render_mermaid(),
    };
    print!("{text}");
    0
}

/// `validate`: the spec is valid (it was checked by [`load_spec`]).
fn validate(printer: &Printer, spec: &Spec) -> i32 {
    let result = ValidateResult::of(spec);
    printer.value(&result, || text::validate(&result));
    0
}

/// `run`: starts (or reports, or continues) the spec's run.
async fn run_spec(cli: &Cli, limits: Limits, printer: &Printer, spec: Spec) -> Result<i32, i32> {
    let engine = build_engine(cli, limits, printer).await?;
    let run_id = spec.run_id.clone();
    Ok(match engine.start(spec).await {
        Ok(outcome) => printer.outcome(&outcome),
        Err(error) => printer.drive_error_for(Some(&run_id), &error),
    })
}

/// `resume RUN_ID`.
async fn resume(
    cli: &Cli,
    limits: Limits,
    printer: &Printer,
    run_id: &str,
    attempt: Option<u32>,
    force: bool,
) -> Result<i32, i32> {
    let engine = build_engine(cli, limits, printer).await?;
    Ok(match engine.resume_attempt(run_id, attempt, force).await {
        Ok(outcome) => printer.outcome(&outcome),
        Err(error) => printer.drive_error_for(Some(run_id), &error),
    })
}

/// `resume --all`: every unfinished run whose driver is gone.
async fn resume_all(cli: &Cli, limits: Limits, printer: &Printer) -> Result<i32, i32> {
    let engine = build_engine(cli, limits, printer).await?;
    let sweep = match engine.resume_all(RESUME_ALL_BOUND).await {
        Ok(sweep) => sweep,
        Err(error) => return Ok(printer.drive_error(&DriveError::Store(error))),
    };
    let mut worst = 0;
    let mut entries = Vec::new();
    for (run_id, result) in &sweep.results {
        let (code, summary) = match result {
            Ok(outcome) => (outcome.kind.exit_code(), format!("{}: {}", plain(run_id), outcome.record.state)),
            Err(error) => (classify_drive_error(error).0, plain(&format!("{run_id}: {error}"))),
        };
        worst = worst.max(resume_all_code(code));
        entries.push(ResumeAllEntry { run_id: run_id.clone(), exit_code: code, summary });
    }
    printer.value(&entries, || text::resume_all(&entries));
    if sweep.cut {
        // Never silent: runs beyond the bound are still unfinished and unread.
        eprintln!(
            "error: the sweep was cut: it read {} unfinished runs and more may exist; repeat `resume --all`",
            sweep.unfinished_read
        );
        worst = worst.max(EXIT_CUT);
    }
    Ok(worst)
}

/// How many unfinished runs `resume --all` reads at most; more make it exit [`EXIT_CUT`].
const RESUME_ALL_BOUND: usize = 10_000;

/// What one run's exit code makes of `resume --all`'s. A run left unfinished makes the whole
/// call "resumable" (3), unless some run can never be resumed as it is (no such run, corrupt
/// record, invalid spec): that needs a person (70). Finished runs' own failures are reported per
/// run, not as the call's failure.
fn resume_all_code(code: i32) -> i32 {
    match code {
        EXIT_RESUMABLE | EXIT_UNAVAILABLE => EXIT_RESUMABLE,
        EXIT_PERMISSION => EXIT_PERMISSION,
        code if code > EXIT_RESUMABLE => EXIT_INTERNAL,
        _ => 0,
    }
}

/// `status RUN_ID`.
async fn status(cli: &Cli, limits: Limits, printer: &Printer, run_id: &str, attempt: Option<u32>) -> Result<i32, i32> {
    let engine = build_engine(cli, limits, printer).await?;
    Ok(match engine.status_attempt(run_id, attempt).await {
        Ok(Some(record)) => {
            let report = RunReport::of(&record);
            printer.value(&report, || text::run_report(&report));
            0
        }
        Ok(None) => printer.drive_error(&DriveError::NoSuchRun { run_id: run_id.to_string() }),
        Err(error) => printer.drive_error(&DriveError::Store(error)),
    })
}

/// `list`: runs, newest first.
async fn list(cli: &Cli, limits: Limits, printer: &Printer, unfinished: bool, limit: usize) -> Result<i32, i32> {
    let engine = build_engine(cli, limits, printer).await?;
    Ok(match engine.list(unfinished, limit).await {
        Err(error) => printer.drive_error(&DriveError::Store(error)),
        Ok(listing) => {
            let now = engine.now();
            let rows: Vec<ListRow> = listing.records.iter().map(|record| ListRow::of(record, now)).collect();
            printer.value(&rows, || text::list(&rows));
            list_exit_code(&listing, unfinished)
        }
    })
}

/// `list`'s exit code: [`EXIT_CUT`] (with a line on stderr) when the listing may hide an
/// unfinished run: `--unfinished` with more runs than shown, or a read bound that stopped a
/// table without the run index. A plain `list` showing the newest `--limit` runs is not cut.
fn list_exit_code(listing: &crate::ports::RunListing, unfinished: bool) -> i32 {
    if listing.bounded {
        eprintln!(
            "error: the listing was cut: it stopped at {} run records, so newer runs may be missing; run `post-provision init` to build the run index",
            crate::record::MAX_LISTED_RUNS
        );
        return EXIT_CUT;
    }
    if unfinished && listing.more {
        eprintln!(
            "error: the listing was cut: more than {} unfinished runs; raise --limit to see them all",
            listing.records.len()
        );
        return EXIT_CUT;
    }
    0
}

/// The flags of `audit`.
struct AuditCommand<'a> {
    fix: bool,
    grace_secs: i64,
    instance_filter: Option<&'a str>,
}

/// `audit [--fix]`.
async fn audit(
    cli: &Cli,
    limits: Limits,
    printer: &Printer,
    command: AuditCommand<'_>,
    job: Option<&JobIdentity>,
) -> Result<i32, i32> {
    let instance_filter = match command.instance_filter.map(crate::aws::InstanceFilter::parse) {
        None => None,
        Some(Ok(filter)) => Some(filter),
        Some(Err(problem)) => {
            let message = format!("invalid --instance-filter: {problem}");
            return Err(printer.error(EXIT_USAGE, ErrorKind::Usage, message, None));
        }
    };
    let engine = build_engine(cli, limits, printer).await?;
    let options = crate::engine::AuditOptions { grace_secs: command.grace_secs, instance_filter };
    let mut audit = match engine.audit(&options).await {
        Ok(audit) => audit,
        Err(crate::engine::AuditError::Aws(aws)) => {
            let (code, kind) = classify_aws_error(&aws);
            return Err(printer.error(code, kind, format!("could not read the pool: {aws}"), None));
        }
        Err(error @ crate::engine::AuditError::Store(_)) => {
            return Err(printer.error(EXIT_INTERNAL, ErrorKind::Internal, error.to_string(), None))
        }
    };
    if command.fix {
        if let Some(job) = job {
            skip_foreign_repairs(&mut audit.report, job);
        }
        engine.audit_fix(&mut audit).await;
    }
    printer.value(&audit.report, || text::audit(&audit.report));
    if printer.github() {
        if let Err(io) = github::write_audit(&audit.report, &mut *printer.annotations()) {
            printer.github_failed(io);
        }
    }
    Ok(audit.report.exit_code())
}

/// In a GitHub Actions job, `audit --fix` acts for the job's own run only: a repair that drives
/// another run (resume), writes its record (the pool message a finished run did not record) or
/// terminates an orphan another run launched (its pool tag names that run) is skipped, with the
/// reason, before any repair runs.
fn skip_foreign_repairs(report: &mut AuditReport, job: &JobIdentity) {
    for entry in &mut report.findings {
        let acts_for_run = matches!(entry.finding.repair, Repair::Resume | Repair::SendPoolMessage | Repair::Terminate);
        let Some(run_id) = entry.finding.run_id.as_deref().filter(|_| acts_for_run) else { continue };
        // Only the run id binds here: a job may finish its run's earlier attempts (as `run` does).
        if let Err(foreign) = job.check("the repair", run_id, None) {
            entry.outcome = Some(RepairOutcome::Skipped);
            entry.reason = Some(foreign.message);
        }
    }
}

/// `init`: creates the table if it is missing, checks its key schema, enables TTL, and builds the
/// run index.
async fn init(cli: &Cli, limits: Limits, printer: &Printer) -> Result<i32, i32> {
    let engine = build_engine(cli, limits, printer).await?;
    let client = engine.ports().dynamodb();
    let table = engine.ports().table().to_string();
    let init_error = |message: String| {
        let (code, kind) = classify_init_error(&message);
        printer.error(code, kind, message, None)
    };
    let result = match crate::aws::ensure_table(client, &table).await {
        Ok(crate::aws::TableCheck::Created) => TableResult::Created,
        Ok(crate::aws::TableCheck::Ok) => TableResult::Ok,
        Err(message) => return Err(init_error(message)),
    };
    let (ttl, other_ttl_attribute) = match crate::aws::ensure_ttl(client, &table).await {
        Ok(crate::aws::TtlCheck::Enabled) => (TtlResult::Enabled, None),
        Ok(crate::aws::TtlCheck::AlreadyEnabled) => (TtlResult::AlreadyEnabled, None),
        Ok(crate::aws::TtlCheck::OtherAttribute(name)) => (TtlResult::OtherAttribute, Some(name)),
        Err(message) => return Err(init_error(message)),
    };
    // After the table and its TTL: the run index, and the records written before it.
    let index = match crate::aws::ensure_run_index(client, &table, engine.now()).await {
        Ok(index) => index,
        Err(message) => return Err(init_error(message)),
    };
    let run_index = if index.created { RunIndexResult::Created } else { RunIndexResult::Exists };
    let result =
        InitResult { table, result, ttl, other_ttl_attribute, run_index, run_index_backfilled: index.backfilled };
    printer.value(&result, || text::init(&result));
    Ok(0)
}

fn init_logging(format: LogFormat) {
    use crate::output::log::{LogLines, OneLinePerEvent};
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let ansi = std::io::stderr().is_terminal();
    let lines = match format {
        LogFormat::Json => LogLines::Json,
        LogFormat::Text => LogLines::Text { ansi },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || OneLinePerEvent::new(std::io::stderr(), lines))
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Loopback queue URLs in a spec are allowed only when the engine's SQS endpoint (the flag, else
/// `AWS_ENDPOINT_URL_SQS`, else `AWS_ENDPOINT_URL`) is itself a loopback emulator.
fn queue_url_rule(endpoint_flag: Option<&str>) -> QueueUrlRule {
    let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let endpoint = endpoint_flag
        .map(str::to_string)
        .or_else(|| from_env("AWS_ENDPOINT_URL_SQS"))
        .or_else(|| from_env("AWS_ENDPOINT_URL"));
    QueueUrlRule::for_endpoint(endpoint.as_deref())
}

/// Why a spec could not be read: unreadable (usage, 64) or too large (invalid spec, 65).
enum ReadSpecError {
    Unreadable(String),
    TooLarge(String),
}

/// Reads a spec through a bounded reader: at most [`MAX_SPEC_FILE_BYTES`] and one byte more to
/// tell that the input is larger, never the whole of a larger input.
fn read_spec(path: &str) -> Result<String, ReadSpecError> {
    let (source, reader): (String, Box<dyn Read>) = if path == "-" {
        ("standard input".to_string(), Box::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| ReadSpecError::Unreadable(format!("cannot read the spec file {path}: {e}")))?;
        (format!("the spec file {path}"), Box::new(file))
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_SPEC_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadSpecError::Unreadable(format!("cannot read {source}: {e}")))?;
    if bytes.len() as u64 > MAX_SPEC_FILE_BYTES {
        return Err(ReadSpecError::TooLarge(format!(
            "{source} is larger than the spec size limit of {MAX_SPEC_FILE_BYTES} bytes (2 MiB); a 5,000-instance spec is about 1.2 MB"
        )));
    }
    String::from_utf8(bytes).map_err(|e| ReadSpecError::TooLarge(format!("{source} is not UTF-8 text: {e}")))
}

/// The flag and environment variable of a [`Limits`] field, for error messages.
fn limit_flag(field: &str) -> (&'static str, &'static str) {
    match field {
        "max_attempts" => ("--max-attempts", "POST_PROVISION_MAX_ATTEMPTS"),
        "concurrency" => ("--concurrency", "POST_PROVISION_CONCURRENCY"),
        "batch_rounds" => ("--batch-rounds", "POST_PROVISION_BATCH_ROUNDS"),
        "lease_secs" => ("--lease-secs", "POST_PROVISION_LEASE_SECS"),
        "retention_days" => ("--retention-days", "POST_PROVISION_RETENTION_DAYS"),
        "not_found_retries" => ("--not-found-retries", "POST_PROVISION_NOT_FOUND_RETRIES"),
        "initial_backoff" => ("--initial-backoff-ms", "POST_PROVISION_INITIAL_BACKOFF_MS"),
        "throttle_budget" => ("--throttle-budget-secs", "POST_PROVISION_THROTTLE_BUDGET_SECS"),
        "one_transaction_max_instances" => {
            ("--one-transaction-max-instances", "POST_PROVISION_ONE_TRANSACTION_MAX_INSTANCES")
        }
        "pool_tag_key" => ("--pool-tag-key", "POST_PROVISION_POOL_TAG_KEY"),
        _ => ("(unknown flag)", "(unknown variable)"),
    }
}

/// The output format asked for on the command line, read before clap parses it, so that a usage
/// error can be reported in it too.
fn output_format_in(args: &[String]) -> OutputFormat {
    let mut format = OutputFormat::Text;
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let value = match arg.strip_prefix("--output=") {
            Some(value) => Some(value.to_string()),
            None if arg == "--output" => iter.next().cloned(),
            None => None,
        };
        match value.as_deref() {
            Some("json") => format = OutputFormat::Json,
            Some("text") => format = OutputFormat::Text,
            _ => {}
        }
    }
    format
}

/// In a GitHub Actions job, a spec without `runAttempt` is the attempt `GITHUB_RUN_ATTEMPT` names:
/// a re-run keeps the run id and increments it.
fn with_github_run_attempt(mut spec: Spec) -> Result<Spec, crate::spec::SpecError> {
    if spec.run_attempt.is_some() || std::env::var("GITHUB_ACTIONS").map(|v| v != "true").unwrap_or(true) {
        return Ok(spec);
    }
    let Ok(value) = std::env::var("GITHUB_RUN_ATTEMPT") else { return Ok(spec) };
    let attempt = value.trim().parse::<u32>().ok().filter(|a| (1..=crate::spec::MAX_RUN_ATTEMPT).contains(a));
    let Some(attempt) = attempt else {
        return Err(crate::spec::SpecError {
            field: "runAttempt".into(),
            problem: format!(
                "absent, and GITHUB_RUN_ATTEMPT is not a run attempt from 1 to {}: {value:?}",
                crate::spec::MAX_RUN_ATTEMPT
            ),
        });
    };
    // The first attempt keeps the form every earlier version wrote, so a repeated `run` of a
    // run started before attempts existed still finds its own record.
    if attempt > 1 {
        spec.run_attempt = Some(attempt);
    }
    Ok(spec)
}

/// Test hooks for subprocess tests, from `POST_PROVISION_TEST_HOOK`: `crash-after=N` stops after
/// the N-th AWS write as if the process died; `pause-after=N` stops after the N-th write until the
/// process receives SIGUSR1 (a slow or stopped driver).
/// Only debug builds (the ones tests run) read it: a release binary ignores the variable.
fn hooks_from_env() -> Hooks {
    let mut hooks = Hooks::default();
    if !cfg!(debug_assertions) {
        return hooks;
    }
    if let Ok(value) = std::env::var("POST_PROVISION_TEST_HOOK") {
        if let Some(count) = value.strip_prefix("crash-after=").and_then(|n| n.parse().ok()) {
            hooks.crash_after_writes = Some(count);
        }
        if let Some(count) = value.strip_prefix("pause-after=").and_then(|n| n.parse().ok()) {
            let paused = std::sync::Arc::new(tokio::sync::Notify::new());
            let resume = std::sync::Arc::new(tokio::sync::Notify::new());
            let waker = resume.clone();
            tokio::spawn(async move {
                if let Ok(mut signal) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
                    signal.recv().await;
                    waker.notify_one();
                }
            });
            let announce = paused.clone();
            tokio::spawn(async move {
                announce.notified().await;
                eprintln!("test hook: paused");
            });
            hooks.pause_after_writes = Some((count, paused, resume));
        }
    }
    hooks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_errors_are_classified_by_what_failed() {
        let cases = [
            (
                "DynamoDB DescribeTable failed: could not send the request: io error: connection refused",
                EXIT_UNAVAILABLE,
            ),
            ("DynamoDB DescribeTable failed: timed out", EXIT_UNAVAILABLE),
            ("DynamoDB CreateTable failed: AccessDeniedException: User: x is not authorized", EXIT_PERMISSION),
            (
                "DynamoDB DescribeTable failed: no usable AWS credentials: no credentials found in chain",
                EXIT_PERMISSION,
            ),
            ("DynamoDB DescribeTable failed: ThrottlingException: slow down", EXIT_UNAVAILABLE),
            ("table t has key schema [..], expected PK (HASH) and SK (RANGE)", EXIT_CONFIG),
            ("table t did not become ACTIVE in time", EXIT_CONFIG),
        ];
        for (message, code) in cases {
            assert_eq!(classify_init_error(message).0, code, "{message}");
        }
    }

    #[test]
    fn the_output_format_is_found_before_clap_parses() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(output_format_in(&args(&["pp", "--output", "json", "status"])), OutputFormat::Json);
        assert_eq!(output_format_in(&args(&["pp", "status", "--output=json"])), OutputFormat::Json);
        assert_eq!(output_format_in(&args(&["pp", "status"])), OutputFormat::Text);
    }
}
