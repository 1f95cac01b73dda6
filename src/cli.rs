//! The command-line interface: argument parsing, output, and exit codes.
//!
//! Exit codes: `0` Done; `1` Failed after graceful rollback; `2` Failed after emergency cleanup;
//! `3` not finished (state persisted, resumable; or another driver holds the run); `64` bad usage
//! (including an invalid run id argument); `65` invalid spec (nothing written); `66` no such run;
//! `69` AWS unavailable before anything was written; `70` internal error (corrupt record, invalid
//! transition); `77` permission denied or no usable credentials; `78` missing table or a failed
//! `init`.
//!
//! Everything printed that comes from the spec or from AWS goes through [`crate::report::plain`]
//! (stdout and stderr, log lines included) or the workflow-command and Markdown escapes, because
//! the GitHub Actions runner reads a job's output for `::` commands.

use std::io::Read;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::{Limits, QueueUrlRule};
use crate::driver::{DriveError, Hooks, OutcomeKind, RunOutcome};
use crate::engine::{BuildError, Engine};
use crate::machine::{self, State};
use crate::ports::{ErrorClass, StoreError};
use crate::record::RunRecord;
use crate::report::plain;
use crate::spec::{Spec, MAX_SPEC_FILE_BYTES};
use crate::timestamp::Timestamp;

/// Exit code: not finished, resumable.
pub const EXIT_RESUMABLE: i32 = 3;
/// Exit code: bad usage.
pub const EXIT_USAGE: i32 = 64;
/// Exit code: invalid spec.
pub const EXIT_INVALID_SPEC: i32 = 65;
/// Exit code: no such run.
pub const EXIT_NO_SUCH_RUN: i32 = 66;
/// Exit code: AWS unavailable before anything was written.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code: internal error.
pub const EXIT_INTERNAL: i32 = 70;
/// Exit code: permission denied (IAM) or no usable credentials.
pub const EXIT_PERMISSION: i32 = 77;
/// Exit code: configuration error (missing table).
pub const EXIT_CONFIG: i32 = 78;

/// The exit-code table, printed at the end of `--help`.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   Done: committed (and success of status, list, table, init, validate)
  1   Failed after graceful rollback (capacity shortfall)
  2   Failed after emergency cleanup; the original error is on stderr
  3   not finished: state persisted, run `post-provision resume RUN_ID`
  64  bad usage (flags, run id argument, unreadable spec file, out-of-range limits)
  65  invalid spec, or a different spec for an existing run id; nothing written
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

/// A run as reported by `run`, `resume` and `status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// The run id.
    pub run_id: String,
    /// The persisted state.
    pub state: State,
    /// `committed`, `rolled-back`, `cleaned-up`, or null while unfinished.
    pub outcome: Option<OutcomeKind>,
    /// The exit code `run`/`resume` give for this run.
    pub exit_code: i32,
    /// The states entered, in order.
    pub path: Vec<State>,
    /// Every state entered, with time and reason.
    pub transitions: Vec<crate::record::HistoryEntry>,
    /// Why the run failed.
    pub error: Option<crate::record::RunError>,
    /// Instance counts.
    pub instances: u32,
    /// Threshold set on committed instances.
    pub commit_threshold: Option<Timestamp>,
    /// Threshold set on instances returned to the pool.
    pub idle_threshold: Option<Timestamp>,
    /// Pool messages sent.
    pub messages_sent: usize,
    /// The lease holder and its end.
    pub lease: crate::record::Lease,
    /// The record's version.
    pub version: u64,
    /// When the run started.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// What happened to each instance (on `run` and `resume` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_results: Option<Vec<crate::report::InstanceResult>>,
}

impl RunReport {
    /// The report of a record.
    pub fn of(record: &RunRecord) -> RunReport {
        let outcome = OutcomeKind::of(record);
        RunReport {
            run_id: record.run_id.clone(),
            state: record.state,
            outcome,
            exit_code: outcome.map(OutcomeKind::exit_code).unwrap_or(EXIT_RESUMABLE),
            path: record.history.iter().map(|h| h.state).collect(),
            transitions: record.history.clone(),
            error: record.error.clone(),
            instances: record.instance_count,
            commit_threshold: record.commit_threshold,
            idle_threshold: record.idle_threshold,
            messages_sent: record.messages_sent.len(),
            lease: record.lease.clone(),
            version: record.version,
            created_at: record.created_at,
            updated_at: record.updated_at,
            instance_results: None,
        }
    }

    fn text(&self) -> String {
        let path: Vec<String> = self.path.iter().map(|s| s.to_string()).collect();
        let outcome = match self.outcome {
            Some(OutcomeKind::Committed) => "committed",
            Some(OutcomeKind::RolledBack) => "rolled back (capacity shortfall)",
            Some(OutcomeKind::CleanedUp) => "cleaned up after an unexpected error",
            None => "not finished (resumable)",
        };
        let mut out = format!("run {}: {} — {}\n", plain(&self.run_id), self.state, outcome);
        out.push_str(&format!("  path: {}\n", path.join(" -> ")));
        for entry in &self.transitions {
            out.push_str(&format!("  {}  {:<16} {}\n", entry.at, entry.state.to_string(), plain(&entry.reason)));
        }
        out.push_str(&format!("  instances: {}\n", self.instances));
        if let Some(threshold) = self.commit_threshold {
            out.push_str(&format!("  commit threshold: {threshold}\n"));
        }
        if let Some(threshold) = self.idle_threshold {
            out.push_str(&format!("  idle threshold: {threshold} ({} pool messages sent)\n", self.messages_sent));
        }
        for line in self.instance_results.iter().flatten() {
            out.push_str(&format!(
                "  {}  {:<8} {:<8} {}\n",
                plain(&line.id),
                format!("{:?}", line.role).to_lowercase(),
                plain(&line.resource_class),
                plain(&line.result)
            ));
        }
        if let Some(error) = &self.error {
            out.push_str(&format!("  error ({}): {}\n", plain(&error.kind), plain(&error.message)));
        }
        if self.outcome.is_none() {
            out.push_str(&format!("  lease: {} until {}\n", plain(&self.lease.owner), self.lease.expires_at));
        }
        out
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorReport {
    error: ErrorBody,
    exit_code: i32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    kind: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

/// The exit code and kind of a driver error.
pub fn classify_drive_error(error: &DriveError) -> (i32, &'static str) {
    match error {
        DriveError::InvalidSpec(_) => (EXIT_INVALID_SPEC, "invalid-spec"),
        DriveError::SpecMismatch { .. } => (EXIT_INVALID_SPEC, "spec-mismatch"),
        DriveError::NoSuchRun { .. } => (EXIT_NO_SUCH_RUN, "no-such-run"),
        DriveError::Busy { .. } => (EXIT_RESUMABLE, "busy"),
        DriveError::LeaseLost { .. } => (EXIT_RESUMABLE, "lease-lost"),
        DriveError::Stalled { .. } => (EXIT_RESUMABLE, "stalled"),
        DriveError::Crashed { .. } => (EXIT_RESUMABLE, "crashed"),
        DriveError::Uncertain { .. } => (EXIT_RESUMABLE, "uncertain"),
        DriveError::NotStarted(aws) | DriveError::Store(StoreError::Aws(aws)) => classify_aws_error(aws),
        DriveError::Store(_) | DriveError::Transition(_) => (EXIT_INTERNAL, "internal"),
    }
}

/// The exit code and kind of an AWS error that stopped a command before it wrote anything.
pub fn classify_aws_error(error: &crate::ports::AwsError) -> (i32, &'static str) {
    match error.class {
        ErrorClass::NotFound => (EXIT_CONFIG, "missing-table"),
        ErrorClass::Permission => (EXIT_PERMISSION, "permission"),
        _ => (EXIT_UNAVAILABLE, "unavailable"),
    }
}

/// The exit code and kind of an `init` failure. `ensure_table` and `ensure_ttl` report their
/// errors as text (`AwsError`'s display: "DynamoDB DescribeTable failed: CODE: message"), so the
/// text is read: a transport failure is 69 (repeat), a permission or credentials failure 77, and
/// anything else (wrong key schema, a table not ACTIVE in time) 78.
fn classify_init_error(message: &str) -> (i32, &'static str) {
    let after = message.split_once(" failed: ").map(|(_, rest)| rest).unwrap_or(message);
    let code = after.split_once(": ").map(|(code, _)| code).unwrap_or("");
    let transport = ["could not send the request", "timed out", "could not read the response"];
    if transport.iter().any(|prefix| after.starts_with(prefix)) {
        (EXIT_UNAVAILABLE, "unavailable")
    } else if after.starts_with("no usable AWS credentials")
        || crate::aws::classify_code(code, None) == ErrorClass::Permission
    {
        (EXIT_PERMISSION, "permission")
    } else if !code.is_empty() && crate::aws::classify_code(code, None).is_retryable() {
        (EXIT_UNAVAILABLE, "unavailable")
    } else {
        (EXIT_CONFIG, "table")
    }
}

struct Printer {
    format: OutputFormat,
    /// The pool's table, named in errors about it.
    table: Option<String>,
}

impl Printer {
    /// A result on stdout. JSON escapes control characters itself; text has its values passed
    /// through [`plain`] where it is composed, and is checked once more as a whole.
    fn value<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) {
        match self.format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value).expect("report serializes")),
            OutputFormat::Text => print!("{}", crate::report::neutralize_commands(&text())),
        }
    }

    fn error(&self, code: i32, kind: &'static str, message: String, field: Option<String>) -> i32 {
        let message = plain(&message);
        eprintln!("error: {message}");
        if self.format == OutputFormat::Json {
            let report = ErrorReport { error: ErrorBody { kind, message, field }, exit_code: code };
            println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
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

    fn drive_error_for(&self, run_id: Option<&str>, error: &DriveError) -> i32 {
        let code = self.drive_error(error);
        if self.github() {
            if let Err(io) =
                crate::report::write_github_error(run_id, code, &error.to_string(), &mut *self.annotations())
            {
                eprintln!("warning: could not write GitHub Actions outputs: {}", plain(&io.to_string()));
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
        if kind == "missing-table" {
            // DynamoDB's "Requested resource not found" names no resource: say which, and the fix.
            let table = self.table.as_deref().unwrap_or("(none given)");
            message.push_str(&format!(
                " — table {table} does not exist here; create it with `post-provision --table {table} init`"
            ));
        }
        if code == EXIT_RESUMABLE {
            message.push_str(" — the state is persisted; run `post-provision resume RUN_ID` to finish it");
        }
        self.error(code, kind, message, field)
    }

    fn outcome(&self, outcome: &RunOutcome) -> i32 {
        let mut report = RunReport::of(&outcome.record);
        report.instance_results = Some(crate::report::instance_results(outcome));
        self.value(&report, || report.text());
        if self.github() {
            if let Err(io) = crate::report::write_github_outcome(outcome, &mut *self.annotations()) {
                eprintln!("warning: could not write GitHub Actions outputs: {}", plain(&io.to_string()));
            }
        }
        // Both failure paths end the step with one clear line on stderr.
        if let Some(error) = outcome.record.error.as_ref().filter(|_| outcome.kind != OutcomeKind::Committed) {
            eprintln!("error: run {} failed: {}", plain(&outcome.record.run_id), plain(&error.message));
        }
        outcome.kind.exit_code()
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLinePerEvent(std::io::stderr()))
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The log writer: tracing's formatter writes each event with one `write_all` of its whole
/// line, and a field value (an AWS error message, a resource class) may hold line breaks. Each
/// event is written as exactly one line, its inner CR and LF escaped, and no line starts with
/// `::` (see [`crate::report::neutralize_commands`]), so a log line cannot issue a workflow
/// command.
struct OneLinePerEvent<W: std::io::Write>(W);

impl<W: std::io::Write> std::io::Write for OneLinePerEvent<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let line = body.replace('\r', "\\r").replace('\n', "\\n");
        let mut safe = crate::report::neutralize_commands(&line);
        safe.push('\n');
        self.0.write_all(safe.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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

/// Parses `args`, runs the command, and returns the process exit code.
pub async fn run(args: Vec<String>) -> i32 {
    let requested_format = output_format_in(&args);
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => {
            // clap's help and version "errors" exit 0; its usage errors exit 2, ours 64.
            let code = if error.exit_code() == 0 { 0 } else { EXIT_USAGE };
            // clap quotes the arguments it did not understand as they are: one of them may hold
            // a line break and a workflow command.
            let rendered = crate::report::neutralize_commands(&error.render().to_string());
            if code == 0 {
                print!("{rendered}");
                return 0;
            }
            eprint!("{rendered}");
            if requested_format == OutputFormat::Json {
                // The error's own lines, without clap's usage hint after the first blank line.
                let lines: Vec<&str> =
                    rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
                let message = lines.join(" ").trim_start_matches("error: ").to_string();
                let report = ErrorReport { error: ErrorBody { kind: "usage", message, field: None }, exit_code: code };
                println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
            }
            return code;
        }
    };
    init_logging(cli.log_format);
    let printer = Printer { format: cli.output, table: cli.table.clone() };
    if let Command::Table { format } = cli.command {
        let text = match format {
            TableFormat::Markdown => machine::render_markdown(),
            TableFormat::Mermaid => machine::render_mermaid(),
        };
        print!("{text}");
        return 0;
    }
    if let Command::IamPolicy { role } = cli.command {
        return match crate::iam::policy_text(role, &cli.pool_tag_key) {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(problem) => printer.error(EXIT_USAGE, "usage", format!("invalid --pool-tag-key: {problem}"), None),
        };
    }
    // A run id argument is checked before any AWS client exists, like a spec's.
    let run_id_argument = match &cli.command {
        Command::Resume { run_id: Some(run_id), .. } | Command::Status { run_id, .. } => Some(run_id),
        _ => None,
    };
    let instance_filter = match &cli.command {
        Command::Audit { instance_filter: Some(text), .. } => match crate::aws::InstanceFilter::parse(text) {
            Ok(filter) => Some(filter),
            Err(problem) => {
                return printer.error(EXIT_USAGE, "usage", format!("invalid --instance-filter: {problem}"), None)
            }
        },
        _ => None,
    };
    if let Some(run_id) = run_id_argument {
        if let Err(problem) = crate::spec::validate_run_id(run_id) {
            return printer.error(EXIT_USAGE, "usage", format!("invalid RUN_ID argument: {problem}"), None);
        }
    }
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
    if let Err(error) = limits.check() {
        let (flag, variable) = limit_flag(error.field);
        return printer.error(
            EXIT_USAGE,
            "usage",
            format!("invalid limits: {} (flag {flag}, environment variable {variable})", error.message),
            None,
        );
    }
    // The spec is read and validated before any AWS client exists: bad input writes nothing.
    let spec = match &cli.command {
        Command::Run { spec } | Command::Validate { spec } => match read_spec(spec) {
            Err(ReadSpecError::Unreadable(message)) => return printer.error(EXIT_USAGE, "usage", message, None),
            Err(ReadSpecError::TooLarge(message)) => {
                let error = crate::spec::SpecError { field: "$".into(), problem: message };
                return printer.drive_error_for(None, &DriveError::InvalidSpec(error));
            }
            Ok(text) => {
                let parsed = Spec::from_json(&text)
                    .and_then(|spec| spec.check_queue_urls(limits.queue_urls).map(|()| spec))
                    .and_then(with_github_run_attempt);
                match parsed {
                    Ok(spec) => Some(spec),
                    Err(error) => return printer.drive_error_for(None, &DriveError::InvalidSpec(error)),
                }
            }
        },
        _ => None,
    };
    if let Command::Validate { .. } = cli.command {
        let spec = spec.expect("parsed above");
        let result = serde_json::json!({
            "valid": true, "runId": spec.run_id, "instances": spec.instance_count(),
            "selected": spec.selection.instances.len(), "created": spec.creation.instances.len(),
        });
        printer.value(&result, || {
            format!(
                "spec for run {} is valid: {} instances ({} selected, {} created)\n",
                plain(&spec.run_id),
                spec.instance_count(),
                spec.selection.instances.len(),
                spec.creation.instances.len()
            )
        });
        return 0;
    }
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
    let engine = match builder.build().await {
        Ok(engine) => engine,
        Err(error @ BuildError::MissingTable) | Err(error @ BuildError::InvalidLimits(_)) => {
            return printer.error(EXIT_USAGE, "usage", error.to_string(), None)
        }
    };
    match cli.command {
        Command::Table { .. } | Command::Validate { .. } | Command::IamPolicy { .. } => {
            unreachable!("handled above")
        }
        Command::Run { .. } => {
            let spec = spec.expect("parsed above");
            let run_id = spec.run_id.clone();
            match engine.start(spec).await {
                Ok(outcome) => printer.outcome(&outcome),
                Err(error) => printer.drive_error_for(Some(&run_id), &error),
            }
        }
        Command::Resume { run_id: Some(run_id), force, attempt, .. } => {
            match engine.resume_attempt(&run_id, attempt, force).await {
                Ok(outcome) => printer.outcome(&outcome),
                Err(error) => printer.drive_error_for(Some(&run_id), &error),
            }
        }
        Command::Resume { run_id: None, .. } => match engine.resume_all(10_000).await {
            Err(error) => printer.drive_error(&DriveError::Store(error)),
            Ok(results) => {
                let mut worst = 0;
                let mut reports = Vec::new();
                for (run_id, result) in &results {
                    let (code, line) = match result {
                        Ok(outcome) => {
                            (outcome.kind.exit_code(), format!("{}: {}", plain(run_id), outcome.record.state))
                        }
                        Err(error) => (classify_drive_error(error).0, plain(&format!("{run_id}: {error}"))),
                    };
                    // A run left unfinished makes the whole call "resumable" (3), unless some run
                    // can never be resumed as it is (no such run, corrupt record, invalid spec):
                    // that needs a person (70). Finished runs' own failures are reported per
                    // run, not as the call's failure.
                    if code == EXIT_RESUMABLE || code == EXIT_UNAVAILABLE {
                        worst = worst.max(EXIT_RESUMABLE);
                    } else if code == EXIT_PERMISSION {
                        worst = worst.max(EXIT_PERMISSION);
                    } else if code > EXIT_RESUMABLE {
                        worst = worst.max(EXIT_INTERNAL);
                    }
                    reports.push(serde_json::json!({"runId": run_id, "exitCode": code, "summary": line}));
                }
                printer.value(&reports, || {
                    if reports.is_empty() {
                        "no unfinished runs without a driver\n".to_string()
                    } else {
                        reports.iter().map(|r| format!("{}\n", r["summary"].as_str().unwrap_or(""))).collect()
                    }
                });
                worst
            }
        },
        Command::Status { run_id, attempt } => match engine.status_attempt(&run_id, attempt).await {
            Ok(Some(record)) => {
                let report = RunReport::of(&record);
                printer.value(&report, || report.text());
                0
            }
            Ok(None) => printer.drive_error(&DriveError::NoSuchRun { run_id }),
            Err(error) => printer.drive_error(&DriveError::Store(error)),
        },
        Command::List { unfinished, limit } => match engine.list(unfinished, limit).await {
            Err(error) => printer.drive_error(&DriveError::Store(error)),
            Ok(records) => {
                let now = engine.now();
                let rows: Vec<serde_json::Value> = records
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "runId": r.run_id, "state": r.state, "outcome": OutcomeKind::of(r),
                            "createdAt": r.created_at, "updatedAt": r.updated_at,
                            "ageSecs": now.unix_secs() - r.created_at.unix_secs(),
                            "leaseOwner": r.lease.owner, "leaseActive": r.lease_active(now),
                            "instances": r.instance_count,
                        })
                    })
                    .collect();
                printer.value(&rows, || {
                    let mut out =
                        format!("{:<32} {:<17} {:>8} {:>9}  {}\n", "RUN", "STATE", "AGE", "INSTANCES", "DRIVER");
                    for row in &rows {
                        let driver = if row["leaseActive"].as_bool() == Some(true) {
                            plain(row["leaseOwner"].as_str().unwrap_or(""))
                        } else if row["outcome"].is_null() {
                            "none (resume it)".to_string()
                        } else {
                            "-".to_string()
                        };
                        out.push_str(&format!(
                            "{:<32} {:<17} {:>7}s {:>9}  {}\n",
                            plain(row["runId"].as_str().unwrap_or("")),
                            row["state"].as_str().unwrap_or(""),
                            row["ageSecs"].as_i64().unwrap_or(0),
                            row["instances"].as_u64().unwrap_or(0),
                            driver
                        ));
                    }
                    out
                });
                0
            }
        },
        Command::Audit { fix, grace_secs, .. } => {
            let options = crate::engine::AuditOptions { grace_secs, instance_filter };
            let mut audit = match engine.audit(&options).await {
                Ok(audit) => audit,
                Err(crate::engine::AuditError::Aws(aws)) => {
                    let (code, kind) = classify_aws_error(&aws);
                    return printer.error(code, kind, format!("could not read the pool: {aws}"), None);
                }
                Err(error @ crate::engine::AuditError::Store(_)) => {
                    return printer.error(EXIT_INTERNAL, "internal", error.to_string(), None)
                }
            };
            if fix {
                engine.audit_fix(&mut audit).await;
            }
            printer.value(&audit.report, || crate::audit::text_table(&audit.report));
            if printer.github() {
                if let Err(io) = write_github_audit(&audit.report, &mut *printer.annotations()) {
                    eprintln!("warning: could not write GitHub Actions outputs: {}", plain(&io.to_string()));
                }
            }
            audit.report.exit_code()
        }
        Command::Init => {
            let client = engine.ports().dynamodb();
            let table = engine.ports().table().to_string();
            let init_error = |message: String| {
                let (code, kind) = classify_init_error(&message);
                printer.error(code, kind, message, None)
            };
            let check = match crate::aws::ensure_table(client, &table).await {
                Ok(check) => check,
                Err(message) => return init_error(message),
            };
            let ttl = match crate::aws::ensure_ttl(client, &table).await {
                Ok(ttl) => ttl,
                Err(message) => return init_error(message),
            };
            let ttl_word = match &ttl {
                crate::aws::TtlCheck::Enabled => "enabled",
                crate::aws::TtlCheck::AlreadyEnabled => "already-enabled",
                crate::aws::TtlCheck::OtherAttribute(_) => "other-attribute",
            };
            let result = serde_json::json!({
                "table": table,
                "result": format!("{check:?}").to_lowercase(),
                "ttl": ttl_word,
            });
            printer.value(&result, || {
                let mut text = match check {
                    crate::aws::TableCheck::Created => format!("created table {table} (PK, SK strings; on-demand)\n"),
                    crate::aws::TableCheck::Ok => format!("table {table} exists with the expected key schema\n"),
                };
                text.push_str(&match &ttl {
                    crate::aws::TtlCheck::OtherAttribute(name) => format!(
                        "warning: TTL is enabled on attribute {name:?}, not \"ttl\": finished run records will not expire by themselves\n"
                    ),
                    _ => format!("TTL on attribute \"ttl\": {ttl_word}\n"),
                });
                text
            });
            0
        }
    }
}

/// The audit's job summary and one warning annotation per finding.
fn write_github_audit(report: &crate::audit::AuditReport, annotations: &mut dyn std::io::Write) -> std::io::Result<()> {
    if let Ok(path) = std::env::var("GITHUB_STEP_SUMMARY") {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        file.write_all(crate::audit::step_summary(report).as_bytes())?;
    }
    for line in crate::audit::annotations(report) {
        writeln!(annotations, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_field_cannot_start_a_line_with_a_workflow_command() {
        for json in [false, true] {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let builder =
                tracing_subscriber::fmt().with_ansi(false).with_writer(move || OneLinePerEvent(writer.clone()));
            let hostile = "x\n::warning title=pwn::INJECTED\r\n  ::error::y";
            let emit = || {
                tracing::warn!(error = hostile, class = %hostile, "AWS said {hostile}");
                tracing::info!("second event");
            };
            if json {
                tracing::subscriber::with_default(builder.json().finish(), emit);
            } else {
                tracing::subscriber::with_default(builder.finish(), emit);
            }
            let text = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("utf-8");
            assert_eq!(text.lines().count(), 2, "one line per event: {text}");
            for line in text.lines() {
                assert!(!line.trim_start().starts_with("::"), "{line}");
            }
            assert!(text.contains("INJECTED"), "the text is kept, escaped: {text}");
        }
    }

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
