//! Batching of instance-record writes: fenced atomic transactions of up to
//! [`core::MAX_FENCED_BATCH`] items, at most `concurrency` at once, with re-sends of cancelled
//! and throttled items within their budgets, and the backoff between them.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{info, warn};

use super::{DriveError, Driver, StepError, TraceEvent};
use crate::core::{self, InstanceDeletion, InstanceTransition, WriteResult};
use crate::ports::{AwsError, ErrorClass, Fence, Ports};
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
        self.run_batched(
            transitions,
            "transition",
            |t| &t.instance_id,
            |batch| TraceEvent::TransitionInstances {
                to: batch[0].new_state,
                ids: batch.iter().map(|t| t.instance_id.clone()).collect(),
            },
            move |batch| async move { self.write(self.ports.transition(&batch, self.clock.now(), fence)).await },
        )
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
            "deletion",
            |d| &d.instance_id,
            |batch| TraceEvent::DeleteRecords { ids: batch.iter().map(|d| d.instance_id.clone()).collect() },
            move |batch| async move { self.write(self.ports.delete(&batch, fence)).await },
        )
        .await
    }

    /// The batching both kinds of instance-record writes share: up to
    /// [`core::MAX_TRANSACTION_ITEMS`] items per atomic transaction, at most `concurrency`
    /// transactions at once. Items a cancelled transaction did not write are re-sent alone, with
    /// backoff: after a conflict (or another item's failed condition) for at most `batch_rounds`
    /// rounds, after throttling (per item, or of the whole request) for as long as the throttle
    /// budget lasts. Returns every item with its result, never `Cancelled` or `Throttled`.
    async fn run_batched<T, Call, Fut>(
        &self,
        items: Vec<T>,
        what: &'static str,
        id: fn(&T) -> &String,
        event: fn(&[T]) -> TraceEvent,
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
        let call = &call;
        let results: Vec<Vec<(T, WriteResult)>> = stream::iter(batches)
            .map(|batch| async move {
                let mut pending = batch;
                let mut outcomes = Vec::with_capacity(pending.len());
                let mut conflict_rounds = 0;
                let mut throttled_since: Option<tokio::time::Instant> = None;
                let mut round = 0;
                // A batch cancelled only because some of its items failed their conditions is
                // not contended: the rest go again at once, without backoff.
                let mut contended = false;
                while !pending.is_empty() {
                    if round > 0 && contended {
                        tokio::time::sleep(self.backoff(round)).await;
                    }
                    round += 1;
                    self.record_event(event(&pending));
                    let results = match call(pending.clone()).await? {
                        Ok(results) => results,
                        Err(error) if error.class == ErrorClass::Throttling => {
                            let since = *throttled_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= self.limits.throttle_budget {
                                return Err(StepError::Failed(Failure::Throttled(error)));
                            }
                            warn!(error = %error, "{what} batch throttled; re-sending within the throttle budget");
                            contended = true;
                            continue;
                        }
                        Err(error) => return Err(StepError::Failed(Failure::from_aws(error))),
                    };
                    info!(ids = ?pending.iter().map(id).collect::<Vec<_>>(), "{what} batch written");
                    let (mut conflicted, mut throttled, mut rejected) = (false, false, false);
                    let mut retry = Vec::new();
                    if results.iter().any(|result| *result == WriteResult::Fenced) {
                        // The store refused this driver: another one took the run over.
                        return Err(StepError::Stop(DriveError::LeaseLost { run_id: String::new() }));
                    }
                    for (item, result) in pending.into_iter().zip(results) {
                        match result {
                            WriteResult::Cancelled => {
                                conflicted = true;
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
                    pending = retry;
                    contended = throttled || (conflicted && !rejected);
                    if throttled {
                        let since = *throttled_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= self.limits.throttle_budget {
                            return Err(StepError::Failed(Failure::Throttled(AwsError {
                                service: "DynamoDB",
                                operation: "TransactWriteItems",
                                code: Some("ThrottlingError".into()),
                                message: format!(
                                    "{} instance {what}s still throttled after {} s",
                                    pending.len(),
                                    self.limits.throttle_budget.as_secs()
                                ),
                                class: ErrorClass::Throttling,
                            })));
                        }
                    } else if contended {
                        // Transaction conflicts are contention with other writers of the same
                        // records: load, like throttling, never a reason for emergency cleanup.
                        conflict_rounds += 1;
                        if conflict_rounds >= self.limits.batch_rounds {
                            return Err(StepError::Failed(Failure::Throttled(AwsError {
                                service: "DynamoDB",
                                operation: "TransactWriteItems",
                                code: Some("TransactionConflict".into()),
                                message: format!(
                                    "{} instance {what}s still conflicting after {} rounds: {}",
                                    pending.len(),
                                    self.limits.batch_rounds,
                                    pending.iter().map(|item| id(item).as_str()).collect::<Vec<_>>().join(", ")
                                ),
                                class: ErrorClass::Throttling,
                            })));
                        }
                    }
                }
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                info!(batches_done = finished, batches = total, "{what} batches progress");
                Ok(outcomes)
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect()
            .await?;
        Ok(results.into_iter().flatten().collect())
    }

    /// Exponential backoff with full jitter for re-sent batch items, bounded by the limits. The
    /// jitter comes from the clock, so a simulation replays it.
    pub(super) fn backoff(&self, round: u32) -> std::time::Duration {
        let ceiling = self.limits.initial_backoff.saturating_mul(1 << round.min(10)).min(self.limits.max_backoff);
        let millis = ceiling.as_millis().max(1) as u64;
        std::time::Duration::from_millis(self.clock.random_u64() % (millis + 1))
    }
}
