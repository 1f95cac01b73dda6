//! Creating a run: reconcile, build its first record, and create it (with its first effects, on
//! the one-transaction path of a small run), or rejoin the run that already has that id.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};

use super::drive::Start;
use super::*;
use crate::config::OnRetriesExhausted;
use crate::core::{self, InstanceTransition, PoolGuard};
use crate::machine::{self, Input, State};
use crate::ports::{AwsError, CreateOutcome, ErrorClass, InstanceFacts, StoreError};
use crate::record::{self, HistoryEntry, Lease, RunError, RunErrorKind, RunRecord, RUN_RECORD_SCHEMA_VERSION};
use crate::run;
use crate::spec::{Spec, SpecError};
use crate::timestamp::Timestamp;

impl<P: Ports> Driver<P> {
    /// Starts a run from its spec; for a run id and attempt that already have a record, continues
    /// that run (same spec) or refuses (different spec).
    pub async fn start(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        let span = info_span!("run", run_id = %spec.run_id, attempt = spec.attempt());
        Box::pin(self.start_inner(spec).instrument(span)).await
    }

    async fn start_inner(&self, spec: Spec) -> Result<RunOutcome, DriveError> {
        let canonical = spec.to_canonical_json();
        let spec_digest = record::digest(&canonical);
        let chunks = record::split_spec(&canonical);
        // A small rollback whose spec carries the pool's configuration reads nothing first: its
        // create checks the pool (`PoolGuard`). Refused for any other reason than an existing
        // run, it reads the pool as below, and knows which instances refused.
        let mut refused_when_guarded = None;
        if let Some(guard) = self.pool_guard(&spec, chunks.len()) {
            match Box::pin(self.start_guarded(&spec, &spec_digest, &chunks, &guard)).await? {
                Guarded::Finished(outcome) => return *outcome,
                Guarded::ReadFirst(refused) => refused_when_guarded = refused,
            }
        }
        let first = match self.first_state(&spec, &spec_digest).await? {
            Ok(first) => first,
            Err(existing) => return existing,
        };
        // Read after the pool's configuration: that read may take long, and `now` fixes the
        // thresholds and the lease the first write carries.
        let now = self.clock.now();
        let mut record = self.first_record(&spec, spec_digest.clone(), first, now);
        record.spec_chunks = chunks.len() as u32;
        let unfinished_ttl = record.ttl.expect("an unfinished record expires");
        // No read first: creating the record is conditional, and a run id that already has one
        // gets it back from the refused create (one round trip either way).
        //
        // The fast path: when they fit in one transaction, the record is created together with
        // its state's transitions, so the state is persisted *with* its first effects, not
        // before them, and a crash leaves both or neither. A commit is then created already
        // `Done`: one request for the whole run. If an instance refuses, nothing was written,
        // and the staged path below finds and handles the refusal as it always did. A guarded
        // create whose pool check held has already said which instances refuse.
        if let Some(refused) = refused_when_guarded.filter(|_| record.state == State::RollingBack) {
            info!(refused = ?refused, "the guarded one-transaction path was refused; taking the staged path");
            record.refused_at_create = refused;
        } else if let Some((fast, transitions)) = self.fast_path(&record, &spec, chunks.len(), now) {
            match Box::pin(self.create(&fast, &chunks, unfinished_ttl, &transitions, None, now, &spec_digest)).await? {
                Created::Landed(landed) => return self.landed_with(landed, spec, &transitions).await,
                Created::Other(outcome) => return outcome,
                Created::Refused(refused) => {
                    info!(refused = ?refused, "the one-transaction path was refused; taking the staged path");
                    record.refused_at_create = refused;
                }
                Created::PoolRefused => unreachable!("no pool guard rode along"),
            }
        }
        match Box::pin(self.create(&record, &chunks, unfinished_ttl, &[], None, now, &spec_digest)).await? {
            Created::Landed(landed) => record = landed,
            Created::Other(outcome) => return outcome,
            Created::Refused(_) | Created::PoolRefused => unreachable!("no transition or pool guard rode along"),
        }
        self.hold_lease(&record);
        self.record_event(TraceEvent::Persisted { state: record.state });
        info!(state = %record.state, "run persisted");
        Box::pin(self.drive(record, spec, Start::Fresh, None)).await
    }

    /// The pool guard of a run whose first state is a rollback that fits one transaction with
    /// the guard's check (one more item), if its spec allows one ([`PoolGuard::for_rollback`]).
    fn pool_guard(&self, spec: &Spec, chunks: usize) -> Option<PoolGuard> {
        if core::reconcile(spec).input != Input::ReconciledShortfall || !self.fits_one_transaction(spec, chunks + 1) {
            return None;
        }
        PoolGuard::for_rollback(spec)
    }

    /// A small rollback created in `RollingBack` with its releases and its pool guard, no read
    /// first: the queue URLs are the spec's, which the guard's check proves are the pool's.
    /// `ReadFirst` when the create was refused (or failed for good) for another reason than an
    /// existing run, or its lost answer reads back as nothing written: nothing was written, and
    /// the run reads the pool first. It carries the refusing instances when the pool's check held.
    async fn start_guarded(
        &self,
        spec: &Spec,
        spec_digest: &str,
        chunks: &[String],
        guard: &PoolGuard,
    ) -> Result<Guarded, DriveError> {
        let reconciliation = core::reconcile(spec);
        info!(outcome = ?reconciliation.input, reason = %reconciliation.reason, "reconciled");
        let first = FirstState {
            input: reconciliation.input,
            reason: reconciliation.reason,
            queue_urls: guard.queue_urls(),
            error: None,
        };
        let now = self.clock.now();
        let mut record = self.first_record(spec, spec_digest.to_string(), first, now);
        record.spec_chunks = chunks.len() as u32;
        let unfinished_ttl = record.ttl.expect("an unfinished record expires");
        let (fast, transitions) =
            self.fast_path(&record, spec, chunks.len() + 1, now).expect("`pool_guard` checked that it fits");
        match Box::pin(self.create(&fast, chunks, unfinished_ttl, &transitions, Some(guard), now, spec_digest)).await? {
            Created::Landed(landed) => {
                Ok(Guarded::Finished(Box::new(Box::pin(self.landed_with(landed, spec.clone(), &transitions)).await)))
            }
            Created::Other(outcome) => Ok(Guarded::Finished(Box::new(outcome))),
            // Refused by no instance: a lost answer read back as nothing written, or a conflict.
            // The pool's check said nothing either: after the reads, the one-transaction path.
            Created::Refused(refused) if refused.is_empty() => {
                info!("the guarded one-transaction create wrote nothing; reading the pool first");
                Ok(Guarded::ReadFirst(None))
            }
            Created::Refused(refused) => {
                info!(refused = ?refused, "the guarded one-transaction create was refused; reading the pool first");
                Ok(Guarded::ReadFirst(Some(refused)))
            }
            Created::PoolRefused => {
                info!("the pool refused the guarded one-transaction create; reading the pool first");
                Ok(Guarded::ReadFirst(None))
            }
        }
    }

    /// A run created together with its first transitions: finished (a commit), or driven on
    /// without sending them again (a rollback).
    async fn landed_with(
        &self,
        landed: RunRecord,
        spec: Spec,
        transitions: &[InstanceTransition],
    ) -> Result<RunOutcome, DriveError> {
        self.hold_lease(&landed);
        self.record_event(TraceEvent::CreatedWith {
            state: landed.state,
            to: transitions[0].new_state,
            ids: transitions.iter().map(|t| t.instance_id.clone()).collect(),
        });
        info!(state = %landed.state, transitions = transitions.len(), "run persisted with its transitions");
        if landed.state.is_terminal() {
            info!(state = %landed.state, "run finished");
            return Ok(self.outcome(landed, spec));
        }
        Box::pin(self.drive(landed, spec, Start::Preapplied, None)).await
    }

    /// Reconciles, and for a rollback resolves the pool queues. `Err` holds the outcome of a
    /// run that already exists with this id (a repeated `run`).
    async fn first_state(
        &self,
        spec: &Spec,
        spec_digest: &str,
    ) -> Result<Result<FirstState, Result<RunOutcome, DriveError>>, DriveError> {
        let reconciliation = core::reconcile(spec);
        info!(outcome = ?reconciliation.input, reason = %reconciliation.reason, "reconciled");
        let mut first = FirstState {
            input: reconciliation.input,
            reason: reconciliation.reason,
            queue_urls: BTreeMap::new(),
            error: None,
        };
        if first.input != Input::ReconciledShortfall {
            return Ok(Ok(first));
        }
        match self.resolve_queues(spec).await {
            Ok(urls) => first.queue_urls = urls,
            Err(refused @ (ResolveError::Spec(_) | ResolveError::NotConfigured(_))) => {
                // A repeated `run` of an existing run reports that run, even if the pool's
                // configuration changed since.
                if let Some(existing) = self.ports.load_run(&spec.run_id, spec.attempt()).await.map_err(not_started)? {
                    return Ok(Err(Box::pin(self.rejoin(existing, spec_digest)).await));
                }
                return Err(match refused {
                    ResolveError::Spec(error) => DriveError::InvalidSpec(error),
                    ResolveError::NotConfigured(message) => DriveError::PoolNotConfigured(message),
                    ResolveError::Aws(_) => unreachable!("matched above"),
                });
            }
            // Nothing is written yet: a missing table, AWS under load, or AWS unavailable for
            // now under `Stall`, is reported as such, and the same `run` can be repeated.
            Err(ResolveError::Aws(aws))
                if aws.class == ErrorClass::NotFound
                    || aws.class == ErrorClass::Throttling
                    || aws.class == ErrorClass::Permission
                    || (aws.class.is_retryable() && self.limits.on_retries_exhausted == OnRetriesExhausted::Stall) =>
            {
                return Err(DriveError::NotStarted(aws));
            }
            Err(ResolveError::Aws(aws)) => {
                // The pool's configuration could not be read: an unexpected error in
                // Reconciling, which the design sends to emergency cleanup.
                first.input = Input::UnexpectedError;
                first.reason = format!("could not read the pool configuration: {aws}");
                first.error = Some(RunError { kind: RunErrorKind::Unexpected, message: first.reason.clone() });
            }
        }
        Ok(Ok(first))
    }

    /// The run's first record, in the state reconciliation chose, with that state's thresholds.
    fn first_record(&self, spec: &Spec, spec_digest: String, first: FirstState, now: Timestamp) -> RunRecord {
        let (state, _) = machine::next(State::Reconciling, first.input).expect("Reconciling declares every outcome");
        // An abandoned run's record and spec chunks expire together, long after any resume.
        let unfinished_ttl = now.plus_secs(2 * self.limits.retention_days * 86_400).unix_secs();
        let mut record = RunRecord {
            schema_version: RUN_RECORD_SCHEMA_VERSION,
            run_id: spec.run_id.clone(),
            run_attempt: spec.attempt(),
            version: 1,
            state,
            spec_digest,
            spec_chunks: 0,
            instance_count: spec.instance_count() as u32,
            created_at: now,
            updated_at: now,
            // Reconciling has no side effects: it completes in memory, and the first write
            // records it together with the state it chose.
            history: vec![
                HistoryEntry { state: State::Reconciling, at: now, reason: "run started".into() },
                HistoryEntry { state, at: now, reason: first.reason },
            ],
            commit_threshold: None,
            idle_threshold: None,
            queue_urls: first.queue_urls,
            messages_sent: Vec::new(),
            refused_at_create: Vec::new(),
            committed_ids: Vec::new(),
            error: first.error,
            lease: Lease { owner: self.owner.clone(), expires_at: now.plus_secs(self.limits.lease_secs) },
            fencing_epoch: 1,
            ttl: Some(unfinished_ttl),
        };
        set_entry_thresholds(&mut record, spec, now);
        record
    }

    /// Whether a first attempt's create fits one transaction with its record, its first
    /// transitions and `other_items` (spec chunks, a pool guard's check). A later attempt acts
    /// only after the earlier ones have finished (`attempts_in_order`), which it cannot know
    /// before it has read them: it takes the staged path.
    fn fits_one_transaction(&self, spec: &Spec, other_items: usize) -> bool {
        let count = spec.instance_count();
        spec.attempt() == 1
            && count > 0
            && count <= self.limits.one_transaction_max_instances
            && other_items + 1 + count <= core::MAX_TRANSACTION_ITEMS
    }

    /// The one-transaction form of a new run, when it fits: a commit created already `Done` with
    /// every commit transition, or a rollback created in `RollingBack` with every release.
    fn fast_path(
        &self,
        record: &RunRecord,
        spec: &Spec,
        other_items: usize,
        now: Timestamp,
    ) -> Option<(RunRecord, Vec<InstanceTransition>)> {
        let count = spec.instance_count();
        if !self.fits_one_transaction(spec, other_items) {
            return None;
        }
        match record.state {
            State::Committing => {
                let threshold = record.commit_threshold.expect("set at entry");
                let mut done = record.clone();
                done.state = State::Done;
                done.history.push(HistoryEntry {
                    state: State::Done,
                    at: now,
                    reason: format!("{count} instances committed"),
                });
                done.ttl = Some(now.plus_secs(self.limits.retention_days * 86_400).unix_secs());
                done.lease.expires_at = now;
                Some((done, run::commit::transitions(spec, threshold)))
            }
            State::RollingBack => {
                let threshold = record.idle_threshold.expect("set at entry");
                Some((record.clone(), run::rollback::transitions(spec, threshold, &HashSet::new())))
            }
            _ => None,
        }
    }

    /// Creates `record` (with `transitions` and a `guard` riding along), telling a landed create
    /// from an existing run, from a refused transition and from a refused guard. A create whose
    /// answer was lost is read back before the run reports that nothing was written.
    #[allow(clippy::too_many_arguments)]
    async fn create(
        &self,
        record: &RunRecord,
        chunks: &[String],
        ttl: i64,
        transitions: &[InstanceTransition],
        guard: Option<&PoolGuard>,
        now: Timestamp,
        spec_digest: &str,
    ) -> Result<Created, DriveError> {
        let mut sent = record.clone();
        let created = self.create_within_throttle_budget(&mut sent, chunks, ttl, transitions, guard, now).await?;
        let record = &sent;
        match created {
            Ok(CreateOutcome::Created) => Ok(Created::Landed(record.clone())),
            Ok(CreateOutcome::Exists(existing)) => {
                Ok(Created::Other(Box::pin(self.rejoin(*existing, spec_digest)).await))
            }
            Ok(CreateOutcome::EffectsRefused(results)) => Ok(Created::Refused(
                transitions
                    .iter()
                    .zip(results)
                    .filter(|(_, result)| matches!(result, crate::core::WriteResult::Rejected(_)))
                    .map(|(transition, _)| transition.instance_id.clone())
                    .collect(),
            )),
            Ok(CreateOutcome::PoolRefused) => Ok(Created::PoolRefused),
            // A guarded create failed for good (nothing was written; say an IAM policy from
            // before the guard, without `dynamodb:ConditionCheckItem`): the reads decide.
            Err(StoreError::Aws(aws)) if guard.is_some() && !aws.class.is_retryable() => {
                warn!(error = %aws, "the guarded one-transaction create failed; reading the pool first");
                Ok(Created::PoolRefused)
            }
            Err(StoreError::Aws(aws)) if aws.class.is_retryable() => {
                // The create may have landed with its answer lost: look before saying that
                // nothing was written.
                match self.ports.load_run(&record.run_id, record.run_attempt).await {
                    Ok(Some(existing)) if record.is_own_create(&existing) => {
                        info!("the create landed although its answer was lost");
                        Ok(Created::Landed(existing))
                    }
                    Ok(Some(existing)) => Ok(Created::Other(Box::pin(self.rejoin(existing, spec_digest)).await)),
                    // Throttling outlasted the budget: the run stops with nothing written, and
                    // does not try the staged path under the same load.
                    Ok(None) if aws.class == ErrorClass::Throttling => Err(DriveError::NotStarted(aws)),
                    Ok(None) if !transitions.is_empty() => Ok(Created::Refused(Vec::new())),
                    Ok(None) => Err(DriveError::NotStarted(aws)),
                    Err(check) => Err(DriveError::Uncertain { run_id: record.display_name(), error: aws, check }),
                }
            }
            Err(other) => Err(not_started(other)),
        }
    }

    /// Sends the creating transaction again, with backoff, while DynamoDB throttles it (the whole
    /// request, or only items of it), for as long as the throttle budget lasts: like every other
    /// write of a run. A throttled transaction writes nothing, so sending it again is safe. Past
    /// the budget the last throttle comes back as a retryable `Aws` error (made up for throttled
    /// items), which `create` reads back and reports as `NotStarted` (exit 3).
    ///
    /// Each round reads the clock again, as a re-sent batch does: the transitions' `:now` (their
    /// conditions on unexpired claims) and the record's lease are those of the round that lands,
    /// never of the first try. The thresholds stay as fixed at entry. `record` is left as sent.
    async fn create_within_throttle_budget(
        &self,
        record: &mut RunRecord,
        chunks: &[String],
        ttl: i64,
        transitions: &[InstanceTransition],
        guard: Option<&PoolGuard>,
        mut now: Timestamp,
    ) -> Result<Result<CreateOutcome, StoreError>, DriveError> {
        let mut rounds = super::batching::Rounds::default();
        loop {
            if rounds.round > 0 {
                now = self.clock.now();
                record.updated_at = now;
                record.lease.expires_at =
                    if record.state.is_terminal() { now } else { now.plus_secs(self.limits.lease_secs) };
            }
            let created = self.write(self.ports.create_run(record, chunks, ttl, transitions, guard, now)).await?;
            if !create_throttled(&created) {
                return Ok(created);
            }
            if rounds.throttled(self.limits.throttle_budget).is_err() {
                let message = format!(
                    "creating the run record was still throttled after {} s (the throttle budget)",
                    self.limits.throttle_budget.as_secs()
                );
                return Ok(Err(StoreError::Aws(super::batching::load_error("ThrottlingError", message))));
            }
            rounds.round += 1;
            warn!(
                round = rounds.round,
                "the creating transaction was throttled; sending it again within the throttle budget"
            );
            tokio::time::sleep(self.backoff(rounds.round)).await;
        }
    }

    /// A `run` for an existing run id and attempt: same spec continues or reports it; another
    /// spec is refused.
    async fn rejoin(&self, existing: RunRecord, spec_digest: &str) -> Result<RunOutcome, DriveError> {
        if existing.spec_digest != spec_digest {
            return Err(DriveError::SpecMismatch { run_id: existing.display_name() });
        }
        self.resume_record(existing, false).await
    }

    /// The pool queue of each resource class the run's instances belong to, from the pool's
    /// metadata item only (issue 18): the pool, not the spec, is the source of a pool message.
    /// Before anything is written, the spec's own `resourceClassConfig` must agree with that
    /// item, and each instance with its record (class, instance type) and its class's `cpu` and
    /// `mmem`; a table without the item cannot take instances back.
    /// The pool's configuration and the instances' records, read together (one round trip for
    /// a run of up to 100 instances); the configuration's errors come first, as if read first.
    async fn resolve_queues(&self, spec: &Spec) -> Result<BTreeMap<String, String>, ResolveError> {
        let (pool, records) = futures::join!(self.ports.load_resource_class_config(), self.instance_facts(spec));
        let pool = pool.map_err(|error| match error {
            StoreError::Aws(aws) => ResolveError::Aws(aws),
            other => ResolveError::Spec(SpecError {
                field: "resourceClassConfig".into(),
                problem: format!("the table's metadata item is unusable: {other}"),
            }),
        })?;
        let Some(pool) = pool else {
            return Err(ResolveError::NotConfigured(
                "the table has no pool configuration (TYPE#METADATA / ID#resource_class_config), so this run cannot return its instances to their pool queues; a spec's own resourceClassConfig is not used in its place".into(),
            ));
        };
        spec.check_config_against_pool(Some(&pool), self.limits.queue_urls).map_err(ResolveError::Spec)?;
        spec.check_against_pool_records(&pool, &records?).map_err(ResolveError::Spec)?;
        Ok(spec
            .instances()
            .map(|(_, instance)| (instance.resource_class.clone(), pool[&instance.resource_class].queue_url.clone()))
            .collect())
    }

    /// The spec's instances' records, 100 keys a read, `concurrency` reads at once.
    async fn instance_facts(&self, spec: &Spec) -> Result<Vec<InstanceFacts>, ResolveError> {
        let ids: Vec<String> = spec.instances().map(|(_, instance)| instance.id.clone()).collect();
        let chunks: Vec<Vec<String>> = ids.chunks(core::MAX_TRANSACTION_ITEMS).map(<[String]>::to_vec).collect();
        let chunks: Vec<Result<Vec<InstanceFacts>, StoreError>> = futures::stream::iter(chunks)
            .map(|chunk| async move { self.ports.load_instance_facts(&chunk).await })
            .buffered(self.limits.concurrency)
            .collect()
            .await;
        let mut records = Vec::with_capacity(ids.len());
        for chunk in chunks {
            records.extend(chunk.map_err(|error| match error {
                StoreError::Aws(aws) => ResolveError::Aws(aws),
                other => ResolveError::Spec(SpecError { field: "$".into(), problem: other.to_string() }),
            })?);
        }
        Ok(records)
    }
}

/// What reconciliation chose, before anything is written.
struct FirstState {
    input: Input,
    reason: String,
    queue_urls: BTreeMap<String, String>,
    error: Option<RunError>,
}

enum Created {
    /// The record (with any transitions that rode along) is in the table, as given.
    Landed(RunRecord),
    /// The run id and attempt already had a record: that run's outcome (continued or reported).
    Other(Result<RunOutcome, DriveError>),
    /// A transition that rode along was refused (or the transaction failed): nothing was
    /// written. The instances whose conditions failed.
    Refused(Vec<String>),
    /// The pool guard's check refused the create, or a guarded create failed for good: nothing
    /// was written.
    PoolRefused,
}

/// What a guarded create ([`Driver::start_guarded`]) came to.
enum Guarded {
    /// The run was created (and driven), or it existed already: its outcome.
    Finished(Box<Result<RunOutcome, DriveError>>),
    /// Nothing was written: read the pool first, as a run without a guard does. `Some`: the
    /// instances that refused, when the pool's check held (then the staged path); `None`: the
    /// pool's check refused, or nothing refused (a lost answer read back as nothing written),
    /// and the one-transaction path is tried again after the reads.
    ReadFirst(Option<Vec<String>>),
}

enum ResolveError {
    Spec(SpecError),
    /// The pool has no configuration item.
    NotConfigured(String),
    Aws(AwsError),
}

fn not_started(error: StoreError) -> DriveError {
    match error {
        StoreError::Aws(error) => DriveError::NotStarted(error),
        other => DriveError::Store(other),
    }
}

/// Thresholds are computed once, when their state is entered, and stored with it.
pub(super) fn set_entry_thresholds(record: &mut RunRecord, spec: &Spec, now: Timestamp) {
    match record.state {
        State::Committing if record.commit_threshold.is_none() => {
            record.commit_threshold = Some(now.plus_secs(spec.max_runtime_min * 60));
        }
        State::RollingBack if record.idle_threshold.is_none() => {
            record.idle_threshold = Some(now.plus_secs(spec.idle_time_sec));
        }
        _ => {}
    }
}

/// Whether a create was throttled as a whole, or only in items (none refused): the same
/// transaction may land later.
fn create_throttled(created: &Result<CreateOutcome, StoreError>) -> bool {
    match created {
        Err(StoreError::Aws(aws)) => aws.class == ErrorClass::Throttling,
        Ok(CreateOutcome::EffectsRefused(results)) => {
            results.contains(&core::WriteResult::Throttled)
                && results.iter().all(|r| matches!(r, core::WriteResult::Throttled | core::WriteResult::Cancelled))
        }
        _ => false,
    }
}
