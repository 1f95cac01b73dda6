//! The library API: an [`Engine`] built once per process, driving runs without the CLI.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aws_config::SdkConfig;

use crate::audit::{AuditFinding, AuditReport, Ec2Snapshot, InstanceRecordSnapshot, Repair, RepairOutcome, Snapshot};
use crate::aws::{self, AwsPorts, Connection, RequestCounter};
use crate::config::Limits;
use crate::core::PoolMessage;
use crate::driver::{Clock, DriveError, Driver, Hooked, Hooks, RunOutcome, SystemClock};
use crate::ports::{Compute, OutgoingMessage, PoolQueues, RunListing, RunStore, StoreError};
use crate::record::RunRecord;
use crate::spec::Spec;
use crate::timestamp::Timestamp;

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
            hooked: Arc::new(Hooked::new(ports.clone(), self.hooks)),
            ports,
            limits: self.limits,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
        })
    }
}

/// Drives post-provision runs against one pool table.
pub struct Engine {
    ports: Arc<AwsPorts>,
    /// The same ports with the engine's test hooks (none in production): what drivers use.
    hooked: Arc<Hooked<AwsPorts>>,
    limits: Limits,
    clock: Arc<dyn Clock>,
}

/// One run's result from [`Engine::resume_all`].
pub type ResumeResult = (String, Result<RunOutcome, DriveError>);

/// What one [`Engine::resume_all`] did.
#[derive(Debug)]
pub struct Sweep {
    /// Each run it tried to resume (unfinished, lease ended), newest first.
    pub results: Vec<ResumeResult>,
    /// How many unfinished runs it read (those still leased included).
    pub unfinished_read: usize,
    /// Whether unfinished runs may have been left unread: more than the bound exist, or (on a
    /// table without the run index) the read stopped at its bound. The CLI exits non-zero.
    pub cut: bool,
}

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// A new driver (each has its own lease owner id).
    pub fn driver(&self) -> Driver<Hooked<AwsPorts>> {
        Driver::new(self.hooked.clone(), self.limits.clone(), self.clock.clone())
    }

    /// Runs a driver's work, ended as [`DriveError::Crashed`] if a crash hook's point is reached
    /// (the driver is dropped wherever it waits, as a process that dies).
    async fn guarded(
        &self,
        work: impl std::future::Future<Output = Result<RunOutcome, DriveError>> + Send,
    ) -> Result<RunOutcome, DriveError> {
        // Erased here, where it is proven `Send` once: a caller's `tokio::spawn` then does not
        // have to walk the whole driver's future type again (it overflows the trait solver).
        let work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<RunOutcome, DriveError>> + Send + '_>> =
            Box::pin(work);
        tokio::select! {
            biased;
            writes = self.hooked.crashed() => Err(DriveError::Crashed { writes }),
            result = work => result,
        }
    }

    /// Starts a run (or continues/reports the run with the same id and spec).
    pub async fn start(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        self.guarded(self.driver().start(spec)).await
    }

    /// Continues the latest attempt of an unfinished run; reports a finished one.
    pub async fn resume(&self, run_id: &str) -> Result<RunOutcome, DriveError> {
        self.guarded(self.driver().resume(run_id)).await
    }

    /// Continues one attempt of a run (`None`: the latest); with `force`, as
    /// [`Engine::resume_forced`].
    pub async fn resume_attempt(
        &self,
        run_id: &str,
        attempt: Option<u32>,
        force: bool,
    ) -> Result<RunOutcome, DriveError> {
        self.guarded(self.driver().resume_attempt(run_id, attempt, force)).await
    }

    /// Continues an unfinished run, taking its lease even though it has not ended: only for a
    /// run whose driver is known to be dead (see [`Driver::resume_with`]).
    pub async fn resume_forced(&self, run_id: &str) -> Result<RunOutcome, DriveError> {
        self.guarded(self.driver().resume_with(run_id, true)).await
    }

    /// The record of the run's latest attempt, if it exists.
    pub async fn status(&self, run_id: &str) -> Result<Option<RunRecord>, StoreError> {
        self.status_attempt(run_id, None).await
    }

    /// The record of one attempt of the run (`None`: the latest), if it exists.
    pub async fn status_attempt(&self, run_id: &str, attempt: Option<u32>) -> Result<Option<RunRecord>, StoreError> {
        self.driver().load_attempt(run_id, attempt).await
    }

    /// Run records, newest first, at most `limit`; only unfinished ones with `unfinished_only`.
    /// The listing says whether it was cut ([`RunListing::is_cut`]).
    pub async fn list(&self, unfinished_only: bool, limit: usize) -> Result<RunListing, StoreError> {
        self.ports.list_runs(unfinished_only, limit).await
    }

    /// Finishes every unfinished run whose lease has ended (its driver is gone), one at a time,
    /// newest first. At most `bound` unfinished runs are read; a sweep that could not read them
    /// all says so ([`Sweep::cut`]).
    pub async fn resume_all(&self, bound: usize) -> Result<Sweep, StoreError> {
        let now = self.clock.now();
        let listing = self.list(true, bound).await?;
        let mut results = Vec::new();
        for record in &listing.records {
            // The index is eventually consistent: a run that has just finished may still be
            // listed, and resuming it would only report it.
            if record.state.is_terminal() || record.lease_active(now) {
                continue;
            }
            let outcome = self.resume_attempt(&record.run_id, Some(record.run_attempt), false).await;
            results.push((record.display_name(), outcome));
        }
        Ok(Sweep { results, unfinished_read: listing.records.len(), cut: listing.is_cut() })
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

/// How [`Engine::audit`] reads the pool.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Instances and records younger than this are left out of the findings that a phase still
    /// at work could explain (default 600).
    pub grace_secs: i64,
    /// Which EC2 instances are the pool's; `None`: those carrying `Limits::pool_tag_key`.
    pub instance_filter: Option<aws::InstanceFilter>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions { grace_secs: 600, instance_filter: None }
    }
}

/// An audit's findings, with what `--fix` needs to repair exactly what was read.
#[derive(Debug, Clone)]
pub struct Audit {
    /// The findings and their counts.
    pub report: AuditReport,
    /// The records the findings name, as read (the conditions of their repairs).
    records: HashMap<String, InstanceRecordSnapshot>,
    /// The instances the findings name, as EC2 described them.
    instances: HashMap<String, Ec2Snapshot>,
    /// The pool's configuration (pool queues, `cpu`/`mmem` of each class), if the table has one.
    config: Option<crate::spec::ResourceClassConfig>,
}

impl Audit {
    /// The record a finding names, as read (tests change it to make a record move).
    pub fn record(&self, instance_id: &str) -> Option<&InstanceRecordSnapshot> {
        self.records.get(instance_id)
    }
}

/// Why an audit could not read the pool.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// AWS failed after its retries (or refused: see the error's class).
    #[error(transparent)]
    Aws(#[from] crate::ports::AwsError),
    /// The pool's configuration item could not be read as one.
    #[error("{0}")]
    Store(StoreError),
}

impl Engine {
    /// Reads the whole pool (instance and run records, the pool's EC2 instances, the pool
    /// queues' counts) and classifies what no run will finish. Writes nothing.
    pub async fn audit(&self, options: &AuditOptions) -> Result<Audit, AuditError> {
        let now = self.clock.now();
        let config = match self.ports.load_resource_class_config().await {
            Ok(config) => config,
            Err(StoreError::Aws(aws)) => return Err(AuditError::Aws(aws)),
            Err(other) => return Err(AuditError::Store(other)),
        };
        let records = self.ports.audit_instance_records().await?;
        let runs = self.ports.audit_run_records().await?;
        let filter =
            options.instance_filter.clone().unwrap_or_else(|| aws::InstanceFilter::tag_key(&self.limits.pool_tag_key));
        let mut instances = self.ports.audit_pool_instances(&filter).await?;
        // Records whose instance the listing did not show: terminated long ago, not the pool's,
        // or outside the caller's filter. Looked up by id, so only they cost requests.
        let listed: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        let missing: Vec<String> =
            records.iter().filter(|r| !listed.contains(r.id.as_str())).map(|r| r.id.clone()).collect();
        instances.extend(self.ports.audit_instances_by_id(&missing).await?);
        let mut queued_messages = std::collections::BTreeMap::new();
        for (class, settings) in config.iter().flatten() {
            queued_messages.insert(class.clone(), self.ports.audit_queue_messages(&settings.queue_url).await?);
        }
        let snapshot = Snapshot { records, runs, instances, queued_messages };
        let findings = crate::audit::classify(&snapshot, now, options.grace_secs);
        let named: HashSet<&str> = findings.iter().filter_map(|f| f.instance_id.as_deref()).collect();
        let records = snapshot
            .records
            .iter()
            .filter(|r| named.contains(r.id.as_str()))
            .map(|r| (r.id.clone(), r.clone()))
            .collect();
        let instances = snapshot
            .instances
            .iter()
            .filter(|i| named.contains(i.id.as_str()))
            .map(|i| (i.id.clone(), i.clone()))
            .collect();
        let report = AuditReport::new(&snapshot, findings);
        Ok(Audit { report, records, instances, config })
    }

    /// Repairs each finding of `audit` (see [`Repair`]), one at a time, and records the outcome
    /// in its entry. A record is only ever written exactly as the audit read it; an instance is
    /// terminated only once its record's delete landed, or when it had no record, and only if
    /// it carries the pool tag.
    pub async fn audit_fix(&self, audit: &mut Audit) {
        for index in 0..audit.report.findings.len() {
            // An entry with an outcome already was decided by the caller (the CLI skips, in a
            // GitHub Actions job, the repairs that act for another run).
            if audit.report.findings[index].outcome.is_some() {
                continue;
            }
            let finding = audit.report.findings[index].finding.clone();
            let (outcome, reason) = self.repair(audit, &finding).await;
            let entry = &mut audit.report.findings[index];
            entry.outcome = Some(outcome);
            entry.reason = reason;
        }
        audit.report.summary.fixed = true;
        audit.report.recount();
    }

    async fn repair(&self, audit: &Audit, finding: &AuditFinding) -> (RepairOutcome, Option<String>) {
        let failed = |error: &dyn std::fmt::Display| (RepairOutcome::Failed, Some(error.to_string()));
        let instance_id = finding.instance_id.clone().unwrap_or_default();
        let record = audit.records.get(&instance_id);
        match finding.repair {
            Repair::None => (RepairOutcome::NotRepairable, None),
            Repair::Terminate => match self.ports.audit_record_exists(&instance_id).await {
                // A record written since the read (a late creation, another tool): no orphan.
                Ok(true) => {
                    (RepairOutcome::Skipped, Some("a record for the instance appeared since the audit read".into()))
                }
                Ok(false) => self.terminate_pool_instance(audit, &instance_id).await,
                Err(error) => failed(&error),
            },
            Repair::DeleteRecord | Repair::DeleteRecordThenTerminate => {
                let Some(record) = record else {
                    return (RepairOutcome::Failed, Some("the record was not kept with the audit".into()));
                };
                match self.ports.audit_delete_record(record).await {
                    Ok(true) if finding.repair == Repair::DeleteRecordThenTerminate => {
                        self.terminate_pool_instance(audit, &instance_id).await
                    }
                    Ok(true) => (RepairOutcome::Repaired, None),
                    Ok(false) => (RepairOutcome::Skipped, Some("the record changed since the audit read it".into())),
                    Err(error) => failed(&error),
                }
            }
            Repair::SendPoolMessage => {
                let Some(record) = record else {
                    return (RepairOutcome::Failed, Some("the record was not kept with the audit".into()));
                };
                self.announce_again(audit, finding, record).await
            }
            Repair::Resume => {
                let run_id = finding.run_id.clone().unwrap_or_default();
                match self.resume_attempt(&run_id, finding.run_attempt, false).await {
                    Ok(_) => (RepairOutcome::Repaired, None),
                    Err(DriveError::Busy { .. }) => {
                        (RepairOutcome::Skipped, Some("another driver took the run since the audit read it".into()))
                    }
                    Err(error) => failed(&error),
                }
            }
        }
    }

    /// Sends the pool message of an idle record a finished run released without announcing it,
    /// then records it in that run's `messagesSent`.
    async fn announce_again(
        &self,
        audit: &Audit,
        finding: &AuditFinding,
        record: &InstanceRecordSnapshot,
    ) -> (RepairOutcome, Option<String>) {
        let failed = |error: &dyn std::fmt::Display| (RepairOutcome::Failed, Some(error.to_string()));
        let class = audit.config.as_ref().and_then(|config| config.get(&record.resource_class));
        let (Some(class), Ok(threshold)) = (class, Timestamp::parse(&record.threshold)) else {
            return (
                RepairOutcome::Skipped,
                Some("the record's class has no pool queue, or its threshold is unreadable".into()),
            );
        };
        let message = PoolMessage {
            id: record.id.clone(),
            resource_class: record.resource_class.clone(),
            instance_type: record.instance_type.clone(),
            cpu: class.cpu,
            mmem: class.mmem,
            usage_class: if record.usage_class == "spot" { "spot" } else { "on-demand" },
            threshold,
        };
        let outgoing = OutgoingMessage { instance_id: record.id.clone(), body: message.body() };
        match self.ports.send(&class.queue_url, &[outgoing]).await {
            Ok(failures) if failures.is_empty() => {
                // Sent; now the run's record says so. If this write fails, the next audit sends
                // the message again, which the pool tolerates (a hint).
                let run_id = finding.run_id.as_deref().unwrap_or_default();
                match self.ports.audit_mark_announced(run_id, finding.run_attempt.unwrap_or(1), &record.id).await {
                    Ok(_) => (RepairOutcome::Repaired, None),
                    Err(error) => failed(&error),
                }
            }
            Ok(failures) => failed(&failures[0].1),
            Err(error) => failed(&error),
        }
    }

    /// Terminates one instance the audit saw, only if it carries the pool tag and is alive.
    async fn terminate_pool_instance(&self, audit: &Audit, instance_id: &str) -> (RepairOutcome, Option<String>) {
        let Some(instance) = audit.instances.get(instance_id).filter(|i| i.pool_tag.is_some()) else {
            return (RepairOutcome::Repaired, Some("record deleted; the instance has no pool tag or is gone".into()));
        };
        if matches!(instance.state.as_str(), "terminated" | "shutting-down") {
            return (RepairOutcome::Repaired, None);
        }
        match self.ports.terminate(&[instance_id.to_string()]).await {
            Ok(result) if result.refused.is_empty() => (RepairOutcome::Repaired, None),
            Ok(result) => (RepairOutcome::Failed, Some(result.refused[0].1.to_string())),
            Err(error) => (RepairOutcome::Failed, Some(error.to_string())),
        }
    }
}
