//! Path C: emergency cleanup.

use std::collections::HashSet;
use std::sync::Mutex;

use tracing::{info, warn};

use super::{entered_at, Driver, StepError};
use crate::core;
use crate::machine::State;
use crate::ports::Ports;
use crate::record::RunRecord;
use crate::spec::{PoolInstance, Role, Spec};

impl<P: Ports> Driver<P> {
    /// Retires every instance of the run that it still holds, selected and created alike;
    /// instances it returned to the pool (message sent) stay there, and instances somebody else
    /// holds are left alone. Returns how many instances were terminated.
    ///
    /// An instance found exactly as this run's rollback released it (idle, runId `""`, the idle
    /// threshold) but not listed as announced may have had its message sent all the same (the
    /// driver can stop between the send and the record write that lists it). It is announced
    /// again (a duplicate message is harmless: the pool's conditional claim decides) and stays in
    /// the pool; only if that send fails is it retired, since then no message can be on its way.
    pub(super) async fn clean_up(&self, spec: &Spec, record: &mut RunRecord) -> Result<usize, StepError> {
        let sent: HashSet<String> = record.messages_sent.iter().cloned().collect();
        let instances = core::cleanup_instances(spec, &sent);
        let marked_at = entered_at(record, State::EmergencyCleanup);
        let retired = self.retire(record, &instances, None, record.idle_threshold, marked_at).await?;
        let mut terminated = retired.terminated;
        if let (Some(threshold), false) = (record.idle_threshold, retired.released.is_empty()) {
            let released: HashSet<&str> = retired.released.iter().map(String::as_str).collect();
            let to_announce: Vec<&PoolInstance> =
                instances.iter().filter(|(_, i)| released.contains(i.id.as_str())).map(|(_, i)| *i).collect();
            let delivered = Mutex::new(Vec::new());
            let announced = self.send_messages(record, &to_announce, threshold, &delivered).await;
            let delivered = delivered.into_inner().expect("sent lock");
            record.messages_sent.extend(delivered.iter().cloned());
            match announced {
                Ok(()) => {}
                // Refused for good (the queue is gone): no message can be on its way.
                Err(StepError::Unexpected(message)) => {
                    warn!(error = %message, "announcing released instances was refused; the ones not announced are retired")
                }
                // SQS unavailable: a message from the rollback may still be in the queue, so
                // nothing is retired; the run stays resumable.
                Err(other) => return Err(other),
            }
            info!(ids = ?delivered, "released instances announced again: they stay in the pool");
            let unannounced: Vec<(Role, &PoolInstance)> = instances
                .iter()
                .filter(|(_, i)| released.contains(i.id.as_str()) && !delivered.contains(&i.id))
                .copied()
                .collect();
            terminated += self.retire(record, &unannounced, Some(threshold), None, marked_at).await?.terminated;
        }
        Ok(terminated)
    }
}
