//! The library API: an [`Engine`] built once per process, driving runs without the CLI.

use std::sync::Arc;

use aws_config::SdkConfig;

use crate::aws::{self, AwsPorts, Connection, RequestCounter};
use crate::config::Limits;
use crate::driver::{Clock, DriveError, Driver, Hooks, RunOutcome, SystemClock};
use crate::ports::{RunStore, StoreError};
use crate::record::RunRecord;
use crate::spec::Spec;

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No table name was given.
    #[error("no table: pass --table or set POST_PROVISION_TABLE")]
    MissingTable,
    /// A limit is out of range.
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
}

/// Configures an [`Engine`].
#[derive(Default)]
pub struct EngineBuilder {
    table: Option<String>,
    connection: Connection,
    limits: Limits,
    sdk_config: Option<SdkConfig>,
    clients: Option<(aws_sdk_dynamodb::Client, aws_sdk_sqs::Client, aws_sdk_ec2::Client)>,
    clock: Option<Arc<dyn Clock>>,
    hooks: Hooks,
}

impl EngineBuilder {
    /// The pool's DynamoDB table (required).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// The AWS region (otherwise the standard chain decides).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.connection.region = Some(region.into());
        self
    }

    /// One endpoint for DynamoDB, SQS and EC2 (an emulator); `AWS_ENDPOINT_URL` works too.
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.connection.endpoint_url = Some(url.into());
        self
    }

    /// Use this SDK configuration instead of loading one (region and endpoint are then ignored;
    /// the limits' retries and timeouts override the configuration's own).
    pub fn sdk_config(mut self, config: SdkConfig) -> Self {
        self.sdk_config = Some(config);
        self
    }

    /// Use these clients (their credentials, endpoints and HTTP settings) instead of building
    /// them; the limits' retries and timeouts override theirs, and requests are counted.
    pub fn clients(
        mut self,
        dynamodb: aws_sdk_dynamodb::Client,
        sqs: aws_sdk_sqs::Client,
        ec2: aws_sdk_ec2::Client,
    ) -> Self {
        self.clients = Some((dynamodb, sqs, ec2));
        self
    }

    /// Retry, timeout, concurrency, lease and retention limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The clock drivers read (the system clock by default).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Test hooks applied to every driver of this engine.
    pub fn hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Builds the engine (loads the SDK configuration unless one was given).
    pub async fn build(self) -> Result<Engine, BuildError> {
        let table = self.table.filter(|t| !t.is_empty()).ok_or(BuildError::MissingTable)?;
        self.limits.validate().map_err(BuildError::InvalidLimits)?;
        let ports = match (self.clients, self.sdk_config) {
            (Some((dynamodb, sqs, ec2)), _) => {
                AwsPorts::from_clients(&dynamodb, &sqs, &ec2, table, self.limits.clone())
            }
            (None, Some(config)) => AwsPorts::new(&config, table, self.limits.clone()),
            (None, None) => {
                let config = aws::load_sdk_config(&self.connection, &self.limits).await;
                AwsPorts::new(&config, table, self.limits.clone())
            }
        };
        let ports = Arc::new(ports);
        Ok(Engine {
            ports,
            limits: self.limits,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            hooks: self.hooks,
        })
    }
}

/// Drives post-provision runs against one pool table.
pub struct Engine {
    ports: Arc<AwsPorts>,
    limits: Limits,
    clock: Arc<dyn Clock>,
    hooks: Hooks,
}

/// One run's result from [`Engine::resume_all`].
pub type ResumeResult = (String, Result<RunOutcome, DriveError>);

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// A new driver (each has its own lease owner id).
    pub fn driver(&self) -> Driver<AwsPorts> {
        Driver::new(self.ports.clone(), self.limits.clone(), self.clock.clone(), self.hooks.clone())
    }

    /// Starts a run (or continues/reports the run with the same id and spec).
    pub async fn start(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        self.driver().start(spec).await
    }

    /// Continues the latest attempt of an unfinished run; reports a finished one.
    pub async fn resume(&self, run_id: &str) -> Result<RunOutcome, DriveError> {
        self.driver().resume(run_id).await
    }

    /// Continues one attempt of a run (`None`: the latest); with `force`, as
    /// [`Engine::resume_forced`].
    pub async fn resume_attempt(
        &self,
        run_id: &str,
        attempt: Option<u32>,
        force: bool,
    ) -> Result<RunOutcome, DriveError> {
        self.driver().resume_attempt(run_id, attempt, force).await
    }

    /// Continues an unfinished run, taking its lease even though it has not ended: only for a
    /// run whose driver is known to be dead (see [`Driver::resume_with`]).
    pub async fn resume_forced(&self, run_id: &str) -> Result<RunOutcome, DriveError> {
        self.driver().resume_with(run_id, true).await
    }

    /// The record of the run's latest attempt, if it exists.
    pub async fn status(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        self.status_attempt(run_id, None).await
    }

    /// The record of one attempt of the run (`None`: the latest), if it exists.
    pub async fn status_attempt(&self, run_id: &str, attempt: Option<u32>) -> Result<Option<RunRecord>, StoreError> {
        self.driver().load_attempt(run_id, attempt).await
    }

    /// Run records, newest first; only unfinished ones with `unfinished_only`.
    pub async fn list(&self, unfinished_only: bool, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        self.ports.list_runs(unfinished_only, limit).await
    }

    /// Finishes every unfinished run whose lease has ended (its driver is gone), one at a time.
    pub async fn resume_all(&self, limit: usize) -> Result<Vec<ResumeResult>, StoreError> {
        let now = self.clock.now();
        let mut results = Vec::new();
        for record in self.list(true, limit).await? {
            if record.state.is_terminal() || record.lease_active(now) {
                continue;
            }
            let outcome = self.resume_attempt(&record.run_id, Some(record.run_attempt), false).await;
            results.push((record.display_name(), outcome));
        }
        Ok(results)
    }

    /// The AWS requests sent so far, by operation.
    pub fn requests(&self) -> &RequestCounter {
        self.ports.requests()
    }

    /// The ports (for `init` and tests).
    pub fn ports(&self) -> &AwsPorts {
        &self.ports
    }

    /// The clock drivers read.
    pub fn now(&self) -> crate::timestamp::Timestamp {
        self.clock.now()
    }
}
