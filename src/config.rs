//! Every bound the engine works within, with its default. All of them are configurable through
//! the library builder and the CLI (see the README's configuration table).

use std::time::Duration;

pub use crate::spec::QueueUrlRule;

/// What a step does when AWS still fails with a retryable error (throttling, 5xx, timeouts,
/// dropped connections) after its retry budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRetriesExhausted {
    /// As the design says: the step's error is unexpected, and the run goes to emergency cleanup
    /// (terminating its instances). Cleanup itself never escalates: it stays resumable.
    #[default]
    CleanUp,
    /// Stop where the run is, state persisted, for a later `resume` (CLI exit 3): a healthy
    /// fleet is not terminated for an AWS outage, at the price of claims held until resumed.
    Stall,
}

/// The tag creation puts on every instance it launches (`InitialRunId = <run id>`).
pub const DEFAULT_POOL_TAG_KEY: &str = "InitialRunId";

/// Limits on retries, time, concurrency and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Attempts per AWS request, the first included (SDK standard retry: exponential backoff with
    /// full jitter, for throttling, 5xx, timeouts and dropped connections).
    pub max_attempts: u32,
    /// First retry backoff.
    pub initial_backoff: Duration,
    /// Largest retry backoff.
    pub max_backoff: Duration,
    /// Time one HTTP attempt may take.
    pub attempt_timeout: Duration,
    /// Time one operation may take, all its attempts included.
    pub operation_timeout: Duration,
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Independent batches of one stage run at most this many at once.
    pub concurrency: usize,
    /// Rounds of re-sending the items of a batch that were cancelled (transaction conflicts) or
    /// failed (SQS batch entries), before the step's error counts as unexpected.
    pub batch_rounds: u32,
    /// How long a driver's lease on a run lasts without renewal.
    pub lease_secs: i64,
    /// How long finished run records are kept before DynamoDB TTL may delete them.
    pub retention_days: i64,
    /// Extra attempts for instance ids EC2 reports unknown (it can be eventual consistency).
    pub not_found_retries: u32,
    /// Wait before such an extra attempt.
    pub not_found_delay: Duration,
    /// What a step does once its retries are spent (5xx, timeouts, lost connections; never
    /// throttling, which only ever stalls the run: see `throttle_budget`).
    pub on_retries_exhausted: OnRetriesExhausted,
    /// How long throttled writes (DynamoDB's per-item `ThrottlingError` and
    /// `ProvisionedThroughputExceeded`, or a request still throttled after the SDK's retries) are
    /// re-sent with backoff, in all, before the run stops resumable (exit 3). Load is not an
    /// unexpected error: throttling never starts emergency cleanup.
    pub throttle_budget: Duration,
    /// The EC2 tag that marks the pool's instances (creation tags every instance it launches
    /// with it). The engine terminates no instance without it.
    pub pool_tag_key: String,
    /// Runs of at most this many instances persist their first state together with its
    /// transitions in one atomic transaction (a small commit is then one request); larger runs,
    /// and every run when 0, take the staged path (the state first, then the effects). Whatever
    /// this says, the one transaction must also fit DynamoDB's 100 actions.
    pub one_transaction_max_instances: usize,
    /// Which queue URLs a spec's own `resourceClassConfig` may name (checked before any AWS
    /// client exists; the table's `resource_class_config` item must then agree): SQS URLs only
    /// by default. The CLI allows
    /// loopback URLs only when its endpoint is itself a loopback emulator
    /// ([`QueueUrlRule::for_endpoint`]).
    pub queue_urls: QueueUrlRule,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            concurrency: 8,
            batch_rounds: 5,
            lease_secs: 30,
            retention_days: 30,
            not_found_retries: 2,
            not_found_delay: Duration::from_millis(1_000),
            on_retries_exhausted: OnRetriesExhausted::CleanUp,
            throttle_budget: Duration::from_secs(20),
            pool_tag_key: DEFAULT_POOL_TAG_KEY.to_string(),
            one_transaction_max_instances: crate::core::MAX_TRANSACTION_ITEMS,
            queue_urls: QueueUrlRule::SqsOnly,
        }
    }
}

/// A limit out of its range: which one (the [`Limits`] field), and the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    /// The field of [`Limits`], such as `max_attempts`.
    pub field: &'static str,
    /// What is allowed.
    pub message: &'static str,
}

impl Limits {
    /// Checks the bounds make sense; a programmer or operator error otherwise.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|error| format!("{} ({})", error.message, error.field))
    }

    /// As [`Limits::validate`], naming the field, so the CLI can name its flag and variable.
    pub fn check(&self) -> Result<(), LimitError> {
        let checks = [
            (self.max_attempts >= 1 && self.max_attempts <= 20, "max_attempts", "max attempts must be 1..=20"),
            (self.concurrency >= 1 && self.concurrency <= 64, "concurrency", "concurrency must be 1..=64"),
            (self.batch_rounds >= 1 && self.batch_rounds <= 20, "batch_rounds", "batch rounds must be 1..=20"),
            (self.lease_secs >= 5 && self.lease_secs <= 3_600, "lease_secs", "lease must be 5..=3600 seconds"),
            (
                self.retention_days >= 1 && self.retention_days <= 3_650,
                "retention_days",
                "retention must be 1..=3650 days",
            ),
            (self.not_found_retries <= 10, "not_found_retries", "not-found retries must be at most 10"),
            (
                self.initial_backoff <= self.max_backoff,
                "initial_backoff",
                "initial backoff must not exceed max backoff",
            ),
            (
                self.throttle_budget <= Duration::from_secs(3_600),
                "throttle_budget",
                "throttle budget must be at most 3600 seconds",
            ),
            (
                self.one_transaction_max_instances <= crate::core::MAX_TRANSACTION_ITEMS,
                "one_transaction_max_instances",
                "one-transaction instances must be at most 100",
            ),
            (
                !self.pool_tag_key.is_empty()
                    && self.pool_tag_key.len() <= 128
                    && !self.pool_tag_key.chars().any(char::is_control),
                "pool_tag_key",
                "pool tag key must be 1..=128 characters with no control characters",
            ),
        ];
        match checks.iter().find(|(ok, _, _)| !ok) {
            Some((_, field, message)) => Err(LimitError { field, message }),
            None => Ok(()),
        }
    }
}
