//! The executor: runs a stage's effects through the ports, feeds the results back, and records
//! what the stage found. It holds no rule of any path: what to do next is the stage's.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{info, warn};

use super::{DriveError, Driver, StageEnd, StepError, TraceEvent};
use crate::core::{self, PoolMessage};
use crate::ports::{AwsError, Fence, OutgoingMessage, PoolMembership, Ports, Termination};
use crate::record::RunRecord;
use crate::run::{Announcement, Effect, EffectResult, Failure, Outcome, Poll, Stage};

impl<P: Ports> Driver<P> {
    /// Runs `stage` to its verdict: advance it with `now` and the last results, record what it
    /// found, run the effects it asks for. A reason to stop (a crash hook, a lost lease, a record
    /// write that failed) ends the stage at once.
    ///
    /// `finishing` gives, for a verdict a stage announces with its last effect ([`Poll::Last`]),
    /// the terminal record the run would then be written as (`None`: the verdict does not finish
    /// the run). When that effect is deletions that fit one transaction, the record rides with
    /// them, and the stage ends [`StageEnd::Finished`].
    pub(super) async fn run_stage<S: Stage>(
        &self,
        record: &mut RunRecord,
        mut stage: S,
        finishing: &(dyn Fn(&RunRecord, &S::Verdict) -> Option<RunRecord> + Sync),
    ) -> Result<StageEnd<S::Verdict>, DriveError> {
        let mut results = Vec::new();
        loop {
            let poll = stage.advance(self.clock.now(), std::mem::take(&mut results));
            for found in stage.drain_found() {
                warn!(instance = %found.id, found = %found.finding, "instance found");
                self.record_event(TraceEvent::Found { id: found.id, finding: found.finding });
            }
            match poll {
                Poll::Finished(verdict) => return Ok(StageEnd::Verdict(verdict)),
                Poll::Run(effects) => results = Box::pin(self.execute(record, effects)).await?,
                Poll::Last(Effect::Delete(deletions), verdict) if deletions.len() <= core::MAX_FENCED_BATCH => {
                    let Some(next) = finishing(record, &verdict) else {
                        results = Box::pin(self.execute(record, vec![Effect::Delete(deletions)])).await?;
                        continue;
                    };
                    return match Box::pin(self.run_deletions_finishing(deletions, record, next)).await {
                        Ok(()) => Ok(StageEnd::Finished),
                        Err(StepError::Failed(failure)) => Ok(StageEnd::Verdict(Err(failure))),
                        Err(StepError::Stop(error)) => Err(error),
                    };
                }
                Poll::Last(effect, _) => results = Box::pin(self.execute(record, vec![effect])).await?,
            }
        }
    }

    /// Runs one step's effects: together when they are independent of the record and
    /// `concurrency` allows, else one after the other, in order. Delivered pool messages are
    /// added to the record's `messagesSent` as soon as they are known.
    async fn execute(&self, record: &mut RunRecord, effects: Vec<Effect>) -> Result<Vec<Outcome>, DriveError> {
        let fence = self.fence(record);
        let together = effects.len() > 1
            && self.limits.concurrency > 1
            && !effects.iter().any(|effect| matches!(effect, Effect::Checkpoint));
        let mut outcomes = Vec::with_capacity(effects.len());
        if together {
            let shared: &RunRecord = record;
            let running = effects.into_iter().map(|effect| Box::pin(self.execute_one(shared, &fence, effect)));
            for outcome in futures::future::join_all(running).await {
                outcomes.push(outcome?);
            }
        } else {
            for effect in effects {
                let outcome = match effect {
                    Effect::Checkpoint => self.checkpoint(record).await.map(|()| Ok(EffectResult::Checkpointed))?,
                    effect => Box::pin(self.execute_one(record, &fence, effect)).await?,
                };
                outcomes.push(outcome);
            }
        }
        for outcome in &outcomes {
            if let Ok(EffectResult::Sent { delivered, .. }) = outcome {
                record.messages_sent.extend(delivered.iter().cloned());
            }
        }
        Ok(outcomes)
    }

    async fn execute_one(&self, record: &RunRecord, fence: &Fence, effect: Effect) -> Result<Outcome, DriveError> {
        let outcome = match effect {
            Effect::Transition(transitions) => {
                self.run_transitions(transitions, fence).await.map(EffectResult::Transitioned)
            }
            Effect::Delete(deletions) => self.run_deletions(deletions, fence).await.map(EffectResult::Deleted),
            Effect::Send(announcements) => return self.send_messages(record, &announcements).await.map(Ok),
            Effect::CheckPool(ids) => self.pool_members(&ids).await.map(EffectResult::Checked),
            Effect::Terminate(ids) => self.terminate_all(&ids).await.map(EffectResult::Terminated),
            Effect::Checkpoint => unreachable!("a checkpoint runs alone, with the record"),
        };
        match outcome {
            Ok(result) => Ok(Ok(result)),
            Err(StepError::Failed(failure)) => Ok(Err(failure)),
            Err(StepError::Stop(error)) => Err(error),
        }
    }

    /// Sends the pool messages, by resource class, to the queues recorded in the run record.
    /// Every batch runs to its end, even when another fails, so that no message SQS accepted is
    /// left out of the delivered ids; the most cautious failure is reported beside them.
    async fn send_messages(
        &self,
        record: &RunRecord,
        announcements: &[Announcement],
    ) -> Result<EffectResult, DriveError> {
        let mut by_class: BTreeMap<&str, Vec<OutgoingMessage>> = BTreeMap::new();
        for announcement in announcements {
            let instance = &announcement.instance;
            by_class.entry(instance.resource_class.as_str()).or_default().push(OutgoingMessage {
                instance_id: instance.id.clone(),
                body: PoolMessage::returning(instance, announcement.threshold).body(),
            });
        }
        let mut batches = Vec::new();
        for (class, messages) in by_class {
            let Some(queue_url) = record.queue_urls.get(class) else {
                let failure = Failure::Gone(format!("no pool queue recorded for resource class {class:?}"));
                return Ok(EffectResult::Sent { delivered: Vec::new(), failure: Some(failure) });
            };
            for chunk in messages.chunks(core::MAX_MESSAGE_BATCH) {
                batches.push((class.to_string(), queue_url.clone(), chunk.to_vec()));
            }
        }
        let total = batches.len();
        let done = &AtomicU64::new(0);
        let sent = &Mutex::new(Vec::new());
        let results: Vec<Result<(), StepError>> = stream::iter(batches)
            .map(|(class, queue_url, messages)| async move {
                let result = self.send_batch(&class, &queue_url, messages, sent).await;
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                info!(batches_done = finished, batches = total, "message batch finished");
                result
            })
            .buffer_unordered(self.limits.concurrency)
            .collect()
            .await;
        let mut failure = None;
        for result in results {
            match result {
                Ok(()) => {}
                Err(StepError::Stop(error)) => return Err(error),
                // The most cautious failure of all the batches (`Failure::caution`), whatever
                // order they finished in.
                Err(StepError::Failed(failed)) => {
                    if failure.as_ref().map_or(true, |f: &Failure| failed.caution() > f.caution()) {
                        failure = Some(failed);
                    }
                }
            }
        }
        let delivered = std::mem::take(&mut *sent.lock().expect("sent lock"));
        Ok(EffectResult::Sent { delivered, failure })
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
            let failed = self
                .write(self.ports.send(queue_url, &pending))
                .await?
                .map_err(|e| StepError::Failed(Failure::from_aws(e)))?;
            let failed_ids: HashSet<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
            let delivered: Vec<String> = pending
                .iter()
                .filter(|m| !failed_ids.contains(m.instance_id.as_str()))
                .map(|m| m.instance_id.clone())
                .collect();
            info!(resource_class = class, ids = ?delivered, "pool messages sent");
            sent.lock().expect("sent lock").extend(delivered);
            if let Some((id, error)) = failed.iter().find(|(_, error)| !error.class.is_retryable()) {
                let message = format!("pool message for {id} refused: {error}");
                return Err(StepError::Failed(match error.class {
                    crate::ports::ErrorClass::NotFound => Failure::Gone(message),
                    _ => Failure::Unexpected(message),
                }));
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
        Err(StepError::Failed(Failure::from_aws(AwsError {
            message: format!(
                "{} pool messages still failing after {} rounds (last, for {id}: {})",
                pending.len(),
                self.limits.batch_rounds,
                last.message
            ),
            ..last
        })))
    }

    /// Which of `ids` carry the pool tag, one DescribeInstances per
    /// [`core::MAX_TERMINATE_BATCH`] ids, concurrently.
    async fn pool_members(&self, ids: &[String]) -> Result<PoolMembership, StepError> {
        let chunks: Vec<Vec<String>> = ids.chunks(core::MAX_TERMINATE_BATCH).map(<[_]>::to_vec).collect();
        let parts: Vec<PoolMembership> = stream::iter(chunks)
            .map(|chunk| async move {
                self.record_event(TraceEvent::CheckPool { ids: chunk.clone() });
                self.ports.pool_membership(&chunk).await.map_err(|e| StepError::Failed(Failure::from_aws(e)))
            })
            .buffer_unordered(self.limits.concurrency)
            .try_collect()
            .await?;
        let mut membership = PoolMembership::default();
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
                let result = self
                    .write(self.ports.terminate(&chunk))
                    .await?
                    .map_err(|e| StepError::Failed(Failure::from_aws(e)))?;
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
}
