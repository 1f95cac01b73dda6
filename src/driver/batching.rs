//! Batching of instance-record writes: fenced atomic transactions of up to
//! [`core::MAX_FENCED_BATCH`] items, at most `concurrency` at once, with re-sends of cancelled
//! and throttled items within their budgets, and the backoff between them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{info, warn};

use super::{DriveError, Driver, StepError, TraceEvent};
use crate::core::{self, InstanceDeletion, InstanceTransition, WriteResult};
use crate::ports::{AwsError, ErrorClass, Fence, Ports};
use crate::record::RunRecord;
use crate::run::Failure;

impl<P: Ports> Driver<P> {
    /// Applies transitions in fenced atomic batches, concurrently, re-sending cancelled and
    /// throttled items; each call's `:now` is read when it is made. Returns each item's result
    /// (the record found, on a refusal).
    pub(super) async fn run_transitions(
        &self,
        transitions: Vec<InstanceTransition>,
        fence: &Fence,
    ) -> Result<Vec<(InstanceTransition, WriteResult)>, StepError> {
        let kind = Kind {
            what: "transition",
            id: |t: &InstanceTransition| &t.instance_id,
            event: |batch: &[InstanceTransition]| TraceEvent::TransitionInstances {
                to: batch[0].new_state,
                ids: batch.iter().map(|t| t.instance_id.clone()).collect(),
            },
        };
        self.run_batched(transitions, kind, move |batch| async move {
            self.write(self.ports.transition(&batch, self.clock.now(), fence)).await
        })
        .await
    }

    /// Deletes marked instance records in atomic batches, concurrently, re-sending cancelled items.
    pub(super) async fn run_deletions(
        &self,
        deletions: Vec<InstanceDeletion>,
        fence: &Fence,
    ) -> Result<Vec<(InstanceDeletion, WriteResult)>, StepError> {
        self.run_batched(
            deletions,
            DELETION,
            move |batch| async move { self.write(self.ports.delete(&batch, fence)).await },
        )
        .await
    }

    /// A stage's last deletions (at most one batch) and the run's terminal record `next` in the
    /// same transaction, whose versioned write of `next` is the fence. Cancelled items are re-sent
    /// with `next` as usual; if every deletion was refused before a transaction landed, `next` is
    /// written alone. Either way the run is finished when this returns `Ok`.
    pub(super) async fn run_deletions_finishing(
        &self,
        deletions: Vec<InstanceDeletion>,
        record: &mut RunRecord,
        next: RunRecord,
    ) -> Result<(), StepError> {
        debug_assert!(deletions.len() <= core::MAX_FENCED_BATCH, "one transaction");
        let landed = &AtomicBool::new(false);
        let (expected, finished, unknown) = (record.version, &next, self.fence(record).unknown_attempt);
        self.run_batched(deletions, DELETION, move |batch| async move {
            let written = self.write(self.ports.delete_finishing(&batch, finished, expected, unknown)).await;
            if let Ok(Ok(results)) = &written {
                if results.iter().all(|result| *result == WriteResult::Applied) {
                    landed.store(true, Ordering::SeqCst);
                }
            }
            written
        })
        .await?;
        if landed.load(Ordering::SeqCst) {
            self.persisted(record, next);
            return Ok(());
        }
        self.persist(record, next).await.map_err(StepError::Stop)
    }

    /// The batching both kinds of instance-record writes share: up to
    /// [`core::MAX_FENCED_BATCH`] items per fenced atomic transaction, at most `concurrency`
    /// transactions at once. Returns every item with its result, never `Cancelled` or `Throttled`.
    async fn run_batched<T, Call, Fut>(
        &self,
        items: Vec<T>,
        kind: Kind<T>,
        call: Call,
    ) -> Result<Vec<(T, WriteResult)>, StepError>
    where
        T: Clone,
        Call: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Result<Vec<WriteResult>, AwsError>, DriveError>>,
    {
        let batches: Vec<Vec<T>> = items.chunks(core::MAX_FENCED_BATCH).map(<[_]>::to_vec).collect();
        let total = batches.len();
        let done = &AtomicU64::new(0);
        let (call, kind) = (&call, &kind);
        let results: Vec<Vec<(T, WriteResult)>> = stream::iter(batches)
            .map(|batch| async move {
                let outcomes = self.run_batch(batch, kind, call).await?;
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                info!(batches_done = finished, batches = total, "{} batches progress", kind.what);
                Ok::<_, StepError>(outcomes)
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect()
            .await?;
        Ok(results.into_iter().flatten().collect())
    }

    /// One batch to its end. Items a cancelled transaction did not write are re-sent alone, with
    /// backoff: after a conflict (or another item's failed condition) for at most `batch_rounds`
    /// rounds, after throttling (per item, or of the whole request) for as long as the throttle
    /// budget lasts. A transaction the run record's fence refused stops the driver.
    async fn run_batch<T, Call, Fut>(
        &self,
        batch: Vec<T>,
        kind: &Kind<T>,
        call: &Call,
    ) -> Result<Vec<(T, WriteResult)>, StepError>
    where
        T: Clone,
        Call: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Result<Vec<WriteResult>, AwsError>, DriveError>>,
    {
        let mut pending = batch;
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut rounds = Rounds::default();
        while !pending.is_empty() {
            if rounds.round > 0 && rounds.contended {
                tokio::time::sleep(self.backoff(rounds.round)).await;
            }
            rounds.round += 1;
            self.record_event((kind.event)(&pending));
            let results = match call(pending.clone()).await? {
                Ok(results) => results,
                Err(error) if error.class == ErrorClass::Throttling => {
                    rounds.throttled(self.limits.throttle_budget).map_err(|()| Failure::Throttled(error.clone()))?;
                    warn!(error = %error, "{} batch throttled; re-sending within the throttle budget", kind.what);
                    continue;
                }
                Err(error) => return Err(StepError::Failed(Failure::from_aws(error))),
            };
            if results.contains(&WriteResult::Fenced) {
                // The store refused this driver: another one took the run over, or it finished.
                return Err(StepError::Stop(DriveError::LeaseLost { run_id: String::new() }));
            }
            info!(ids = ?pending.iter().map(kind.id).collect::<Vec<_>>(), "{} batch written", kind.what);
            let (retry, throttled, conflicted) = sort_results(pending, results, &mut outcomes);
            pending = retry;
            if throttled {
                rounds.throttled(self.limits.throttle_budget).map_err(|()| {
                    let message = format!(
                        "{} instance {}s still throttled after {} s",
                        pending.len(),
                        kind.what,
                        self.limits.throttle_budget.as_secs()
                    );
                    Failure::Throttled(load_error("ThrottlingError", message))
                })?;
            } else if conflicted {
                // Transaction conflicts are contention with other writers of the same records:
                // load, like throttling, never a reason for emergency cleanup.
                rounds.conflicted(self.limits.batch_rounds).map_err(|()| {
                    let ids = pending.iter().map(|item| (kind.id)(item).as_str()).collect::<Vec<_>>().join(", ");
                    let message = format!(
                        "{} instance {}s still conflicting after {} rounds: {ids}",
                        pending.len(),
                        kind.what,
                        self.limits.batch_rounds
                    );
                    Failure::Throttled(load_error("TransactionConflict", message))
                })?;
            } else {
                rounds.contended = false;
            }
        }
        Ok(outcomes)
    }

    /// Exponential backoff with full jitter for re-sent batch items, bounded by the limits. The
    /// jitter comes from the clock, so a simulation replays it.
    pub(super) fn backoff(&self, round: u32) -> std::time::Duration {
        let ceiling = self.limits.initial_backoff.saturating_mul(1 << round.min(10)).min(self.limits.max_backoff);
        let millis = ceiling.as_millis().max(1) as u64;
        std::time::Duration::from_millis(self.clock.random_u64() % (millis + 1))
    }
}

/// Deletions, as batches log and trace them.
const DELETION: Kind<InstanceDeletion> = Kind {
    what: "deletion",
    id: |d: &InstanceDeletion| &d.instance_id,
    event: |batch: &[InstanceDeletion]| TraceEvent::DeleteRecords {
        ids: batch.iter().map(|d| d.instance_id.clone()).collect(),
    },
};

/// What a batch writes, for its logs and trace events.
struct Kind<T> {
    what: &'static str,
    id: fn(&T) -> &String,
    event: fn(&[T]) -> TraceEvent,
}

/// A batch's re-send rounds and their budgets.
#[derive(Default)]
pub(super) struct Rounds {
    pub(super) round: u32,
    conflict_rounds: u32,
    throttled_since: Option<tokio::time::Instant>,
    /// The last round was cancelled for load or conflicts (not merely because some items failed
    /// their conditions, when the rest go again at once): the next one waits first.
    contended: bool,
}

impl Rounds {
    /// Throttled again: `Err` once the throttle budget, counted from the first throttling, is spent.
    pub(super) fn throttled(&mut self, budget: std::time::Duration) -> Result<(), ()> {
        self.contended = true;
        let since = *self.throttled_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= budget {
            return Err(());
        }
        Ok(())
    }

    /// Conflicted again: `Err` after `limit` conflicted rounds.
    fn conflicted(&mut self, limit: u32) -> Result<(), ()> {
        self.contended = true;
        self.conflict_rounds += 1;
        if self.conflict_rounds >= limit {
            return Err(());
        }
        Ok(())
    }
}

/// Keeps the final results in `outcomes`; returns the items to re-send, whether some were
/// throttled, and whether the batch was cancelled by a conflict rather than by some items'
/// failed conditions.
fn sort_results<T>(
    pending: Vec<T>,
    results: Vec<WriteResult>,
    outcomes: &mut Vec<(T, WriteResult)>,
) -> (Vec<T>, bool, bool) {
    let (mut cancelled, mut throttled, mut rejected) = (false, false, false);
    let mut retry = Vec::new();
    for (item, result) in pending.into_iter().zip(results) {
        match result {
            WriteResult::Cancelled => {
                cancelled = true;
                retry.push(item);
            }
            WriteResult::Throttled => {
                throttled = true;
                retry.push(item);
            }
            other => {
                rejected |= matches!(other, WriteResult::Rejected(_));
                outcomes.push((item, other));
            }
        }
    }
    (retry, throttled, cancelled && !rejected)
}

pub(super) fn load_error(code: &str, message: String) -> AwsError {
    AwsError {
        service: "DynamoDB",
        operation: "TransactWriteItems",
        code: Some(code.into()),
        message,
        class: ErrorClass::Throttling,
    }
}
