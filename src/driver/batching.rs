//! Batching shared by every path: atomic instance-record batches with re-sends, pool messages,
//! and retiring instances (mark, check the pool tag, terminate, delete).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{info, warn};

use super::{aws_step_error, DriveError, Driver, StepError, TraceEvent};
use crate::core::{
    self, classify_transition, retire_disposition, Finding, InstanceDeletion, InstanceTransition, PoolMessage,
    RetireDisposition, WriteResult,
};
use crate::ports::{AwsError, ErrorClass, OutgoingMessage, Ports, Termination};
use crate::record::RunRecord;
use crate::spec::{PoolInstance, Role};
use crate::timestamp::Timestamp;

/// What retiring a set of instances did.
#[derive(Debug, Default)]
pub(super) struct Retired {
    /// Instances terminated.
    pub terminated: usize,
    /// Instances whose mark found them in the pool exactly as this run released them (idle,
    /// runId `""`, the run's idle threshold): announced or not, this run cannot tell.
    pub released: Vec<String>,
}

impl<P: Ports> Driver<P> {
    /// Applies transitions in atomic batches, concurrently, re-sending cancelled and throttled
    /// items, and reads what each found. Each call's `:now` is read when it is made.
    pub(super) async fn run_transitions(
        &self,
        transitions: Vec<InstanceTransition>,
    ) -> Result<Vec<(InstanceTransition, Finding)>, StepError> {
        let results = self.run_transition_results(transitions).await?;
        Ok(results
            .into_iter()
            .map(|(transition, result)| {
                let finding = classify_transition(&transition, &result).expect("cancelled writes were re-sent");
                (transition, finding)
            })
            .collect())
    }

    /// As [`Driver::run_transitions`], with each raw result (the record found, on a refusal).
    pub(super) async fn run_transition_results(
        &self,
        transitions: Vec<InstanceTransition>,
    ) -> Result<Vec<(InstanceTransition, WriteResult)>, StepError> {
        self.run_batched(
            transitions,
            "transition",
            |t| &t.instance_id,
            |batch| TraceEvent::TransitionInstances {
                to: batch[0].new_state,
                ids: batch.iter().map(|t| t.instance_id.clone()).collect(),
            },
            move |batch| async move { self.write(self.ports.transition(&batch, self.clock.now())).await },
        )
        .await
    }

    /// Deletes marked instance records in atomic batches, concurrently, re-sending cancelled items.
    pub(super) async fn run_deletions(
        &self,
        deletions: Vec<InstanceDeletion>,
    ) -> Result<Vec<(InstanceDeletion, WriteResult)>, StepError> {
        self.run_batched(
            deletions,
            "deletion",
            |d| &d.instance_id,
            |batch| TraceEvent::DeleteRecords { ids: batch.iter().map(|d| d.instance_id.clone()).collect() },
            move |batch| async move { self.write(self.ports.delete(&batch)).await },
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
        let batches: Vec<Vec<T>> = items.chunks(core::MAX_TRANSACTION_ITEMS).map(<[_]>::to_vec).collect();
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
                                return Err(StepError::Throttled(error));
                            }
                            warn!(error = %error, "{what} batch throttled; re-sending within the throttle budget");
                            contended = true;
                            continue;
                        }
                        Err(error) => return Err(aws_step_error(error)),
                    };
                    info!(ids = ?pending.iter().map(id).collect::<Vec<_>>(), "{what} batch written");
                    let (mut conflicted, mut throttled, mut rejected) = (false, false, false);
                    let mut retry = Vec::new();
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
                            return Err(StepError::Throttled(AwsError {
                                service: "DynamoDB",
                                operation: "TransactWriteItems",
                                code: Some("ThrottlingError".into()),
                                message: format!(
                                    "{} instance {what}s still throttled after {} s",
                                    pending.len(),
                                    self.limits.throttle_budget.as_secs()
                                ),
                                class: ErrorClass::Throttling,
                            }));
                        }
                    } else if contended {
                        // Transaction conflicts are contention with other writers of the same
                        // records: load, like throttling, never a reason for emergency cleanup.
                        conflict_rounds += 1;
                        if conflict_rounds >= self.limits.batch_rounds {
                            return Err(StepError::Throttled(AwsError {
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
                            }));
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

    /// Sends the pool messages of `instances`, by resource class, recording each delivered id
    /// in `sent` as soon as SQS accepted it.
    pub(super) async fn send_messages(
        &self,
        record: &RunRecord,
        instances: &[&PoolInstance],
        threshold: Timestamp,
        sent: &Mutex<Vec<String>>,
    ) -> Result<(), StepError> {
        let mut by_class: BTreeMap<&str, Vec<OutgoingMessage>> = BTreeMap::new();
        for instance in instances {
            by_class.entry(instance.resource_class.as_str()).or_default().push(OutgoingMessage {
                instance_id: instance.id.clone(),
                body: PoolMessage::returning(instance, threshold).body(),
            });
        }
        let mut batches = Vec::new();
        for (class, messages) in by_class {
            let queue_url = record
                .queue_urls
                .get(class)
                .ok_or_else(|| StepError::Unexpected(format!("no pool queue recorded for resource class {class:?}")))?;
            for chunk in messages.chunks(core::MAX_MESSAGE_BATCH) {
                batches.push((class.to_string(), queue_url.clone(), chunk.to_vec()));
            }
        }
        let total = batches.len();
        let done = &AtomicU64::new(0);
        stream::iter(batches)
            .map(|(class, queue_url, messages)| async move {
                let result = self.send_batch(&class, &queue_url, messages, sent).await;
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                info!(batches_done = finished, batches = total, "message batch finished");
                result
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn send_batch(
        &self,
        class: &str,
        queue_url: &str,
        messages: Vec<OutgoingMessage>,
        sent: &Mutex<Vec<String>>,
    ) -> Result<(), StepError> {
        let mut pending = messages;
        let mut last_failures = Vec::new();
        for round in 0..self.limits.batch_rounds {
            if pending.is_empty() {
                return Ok(());
            }
            if round > 0 {
                tokio::time::sleep(self.backoff(round)).await;
            }
            self.record_event(TraceEvent::SendMessages {
                resource_class: class.to_string(),
                ids: pending.iter().map(|m| m.instance_id.clone()).collect(),
            });
            let failed = self.write(self.ports.send(queue_url, &pending)).await?.map_err(aws_step_error)?;
            let failed_ids: HashSet<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
            let delivered: Vec<String> = pending
                .iter()
                .filter(|m| !failed_ids.contains(m.instance_id.as_str()))
                .map(|m| m.instance_id.clone())
                .collect();
            info!(resource_class = class, ids = ?delivered, "pool messages sent");
            sent.lock().expect("sent lock").extend(delivered);
            if let Some((id, error)) = failed.iter().find(|(_, error)| !error.class.is_retryable()) {
                return Err(StepError::Unexpected(format!("pool message for {id} refused: {error}")));
            }
            pending.retain(|m| failed_ids.contains(m.instance_id.as_str()));
            last_failures = failed;
        }
        if pending.is_empty() {
            return Ok(());
        }
        // Entries that failed with a final code returned above: these failed with retryable codes
        // in every round, so SQS is unavailable for them, not refusing them.
        let (id, last) = last_failures.into_iter().next().expect("the last round's failures are the pending entries");
        Err(aws_step_error(AwsError {
            message: format!(
                "{} pool messages still failing after {} rounds (last, for {id}: {})",
                pending.len(),
                self.limits.batch_rounds,
                last.message
            ),
            ..last
        }))
    }

    /// Retires instances of this run: marks each record this run holds `terminated` (a
    /// conditional write no other actor's write can pass; with `released_unsent`, also a record
    /// this run released at that threshold, as in [`core::retire_marks`]), checks which instances
    /// carry the pool tag, terminates those, and only then deletes the marked records of the
    /// instances EC2 terminated. A record therefore never disappears while its instance may live
    /// on: if EC2 refuses, fails, or does not know the instance yet (a fresh one can be unknown
    /// for seconds), the record stays, marked `terminated` with a past threshold (so the boot
    /// agent of an instance that does exist terminates itself), for a resume or `audit` to find.
    /// Instances that somebody else holds are left alone; an instance without the pool tag is
    /// never terminated. A record found exactly as this run released it at `released` is
    /// reported in [`Retired::released`], not marked (unless `released_unsent` says to).
    pub(super) async fn retire(
        &self,
        record: &mut RunRecord,
        instances: &[(Role, &PoolInstance)],
        released_unsent: Option<Timestamp>,
        released: Option<Timestamp>,
        marked_at: Timestamp,
    ) -> Result<Retired, StepError> {
        if instances.is_empty() {
            return Ok(Retired::default());
        }
        let marks = core::retire_marks(&record.run_id, instances, released_unsent, marked_at);
        let results = self.run_transition_results(marks).await?;
        let mut marked = Vec::new();
        let mut unrecorded = Vec::new();
        let mut released_ids = Vec::new();
        for (mark, result) in &results {
            let id = mark.instance_id.clone();
            if let (Some(threshold), WriteResult::Rejected(Some(found))) = (released, result) {
                if found.state == core::InstanceState::Idle.as_str()
                    && found.run_id.is_empty()
                    && found.threshold == threshold.to_string()
                {
                    released_ids.push(id);
                    continue;
                }
            }
            let finding = classify_transition(mark, result).expect("cancelled writes were re-sent");
            let finding = &finding;
            match retire_disposition(finding) {
                RetireDisposition::TerminateThenDelete => marked.push(id),
                RetireDisposition::TerminateOnly => {
                    warn!(instance = %id, "no instance record: terminating it (if it is a pool instance) so it cannot leak");
                    unrecorded.push(id);
                }
                RetireDisposition::LeaveAlone => {
                    warn!(instance = %id, found = %finding, "left alone: not this run's to retire (isolation check)");
                    self.record_event(TraceEvent::Found { id, finding: finding.to_string() });
                }
            }
        }
        self.checkpoint(record).await?;
        let candidates: Vec<String> = marked.iter().chain(&unrecorded).cloned().collect();
        let membership = self.pool_members(&candidates).await?;
        for id in &membership.foreign {
            warn!(instance = %id, "not a pool instance (no pool tag): never terminated by this engine");
            self.record_event(TraceEvent::Found { id: id.clone(), finding: "not a pool instance".into() });
        }
        let termination = self.terminate_all(&membership.members).await?;
        for (id, error) in &termination.refused {
            warn!(instance = %id, error = %error, "termination refused: the record stays, marked terminated");
            self.record_event(TraceEvent::Found { id: id.clone(), finding: format!("termination refused: {error}") });
        }
        // An instance EC2 terminated loses its record. One EC2 does not know keeps it while it may
        // be a fresh one that eventual consistency hides (the run then stalls and tries again); once
        // the mark is older than that, the instance is long gone and the record goes too. A
        // foreign instance or a refused termination keeps its marked record.
        let fresh = self.clock.now().unix_secs() - marked_at.unix_secs() < core::UNKNOWN_INSTANCE_GRACE_SECS;
        let unknown: Vec<&String> =
            termination.not_found.iter().chain(&membership.unknown).filter(|id| marked.contains(id)).collect();
        for id in &unknown {
            let finding = if fresh {
                "unknown to EC2 (yet): record kept, marked terminated"
            } else {
                "unknown to EC2 long after its mark: gone"
            };
            warn!(instance = %id, "{finding}");
            self.record_event(TraceEvent::Found { id: (*id).clone(), finding: finding.into() });
        }
        let mut gone: HashSet<&String> = termination.terminated.iter().collect();
        if !fresh {
            gone.extend(unknown.iter().copied());
        }
        let deletions: Vec<InstanceDeletion> = marked
            .iter()
            .filter(|id| gone.contains(id))
            .map(|id| InstanceDeletion { instance_id: id.clone(), owner_run_id: record.run_id.clone() })
            .collect();
        if !deletions.is_empty() {
            self.checkpoint(record).await?;
            for (deletion, result) in self.run_deletions(deletions).await? {
                if let WriteResult::Rejected(Some(found)) = result {
                    warn!(instance = %deletion.instance_id, state = %found.state, run_id = %found.run_id, "record not removed: no longer this run's mark");
                }
            }
        }
        if fresh && !unknown.is_empty() {
            return Err(StepError::NotYet(format!(
                "EC2 does not know {} instance(s) of this run yet (eventual consistency): {}; their records stay, marked terminated; resume to finish",
                unknown.len(),
                unknown.iter().map(|id| id.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(Retired { terminated: termination.terminated.len(), released: released_ids })
    }

    /// Which of `ids` carry the pool tag, one DescribeInstances per
    /// [`core::MAX_TERMINATE_BATCH`] ids, concurrently.
    async fn pool_members(&self, ids: &[String]) -> Result<crate::ports::PoolMembership, StepError> {
        let chunks: Vec<Vec<String>> = ids.chunks(core::MAX_TERMINATE_BATCH).map(<[_]>::to_vec).collect();
        let parts: Vec<crate::ports::PoolMembership> = stream::iter(chunks)
            .map(|chunk| async move {
                self.record_event(TraceEvent::CheckPool { ids: chunk.clone() });
                self.ports.pool_membership(&chunk).await.map_err(aws_step_error)
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect()
            .await?;
        let mut membership = crate::ports::PoolMembership::default();
        for part in parts {
            membership.members.extend(part.members);
            membership.foreign.extend(part.foreign);
            membership.unknown.extend(part.unknown);
        }
        Ok(membership)
    }

    async fn terminate_all(&self, ids: &[String]) -> Result<Termination, StepError> {
        let chunks: Vec<Vec<String>> = ids.chunks(core::MAX_TERMINATE_BATCH).map(<[_]>::to_vec).collect();
        let parts: Vec<Termination> = stream::iter(chunks)
            .map(|chunk| async move {
                self.record_event(TraceEvent::Terminate { ids: chunk.clone() });
                let result = self.write(self.ports.terminate(&chunk)).await?.map_err(aws_step_error)?;
                info!(ids = ?result.terminated, "terminated instances");
                for id in &result.not_found {
                    warn!(instance = %id, "EC2 does not know this instance: treated as already gone");
                }
                Ok::<Termination, StepError>(result)
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect()
            .await?;
        let mut termination = Termination::default();
        for part in parts {
            termination.terminated.extend(part.terminated);
            termination.not_found.extend(part.not_found);
            termination.refused.extend(part.refused);
        }
        Ok(termination)
    }

    /// Exponential backoff with full jitter for re-sent batch items, bounded by the limits. The
    /// jitter comes from the clock, so a simulation replays it.
    pub(super) fn backoff(&self, round: u32) -> std::time::Duration {
        let ceiling = self.limits.initial_backoff.saturating_mul(1 << round.min(10)).min(self.limits.max_backoff);
        let millis = ceiling.as_millis().max(1) as u64;
        std::time::Duration::from_millis(self.clock.random_u64() % (millis + 1))
    }
}
