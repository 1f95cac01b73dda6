//! Path B: graceful rollback.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use tracing::warn;

use super::{entered_at, Driver, StepError, TraceEvent};
use crate::core::{self, rollback_disposition, RollbackDisposition};
use crate::machine::State;
use crate::ports::Ports;
use crate::record::RunRecord;
use crate::spec::{PoolInstance, Role, Spec};

impl<P: Ports> Driver<P> {
    /// Releases the run's instances to the pool (`idle`, runId `""`, the idle threshold) and
    /// sends their pool messages; retires the ones that cannot be returned (expired, still
    /// `created`, or without a record). Instances already announced are not touched again.
    ///
    /// With `preapplied`, the releases landed with the record's creation (one atomic
    /// transaction): they are all done, and not sent again.
    pub(super) async fn roll_back(
        &self,
        spec: &Spec,
        record: &mut RunRecord,
        preapplied: bool,
    ) -> Result<(), StepError> {
        let threshold = record.idle_threshold.expect("idle threshold is set on entering RollingBack");
        let already_sent: HashSet<String> = record.messages_sent.iter().cloned().collect();
        let transitions = core::release_transitions(spec, threshold, &already_sent);
        let findings = if preapplied {
            transitions.into_iter().map(|transition| (transition, core::Finding::Done)).collect()
        } else {
            self.run_transitions(transitions).await?
        };
        let by_id: BTreeMap<&str, (Role, &PoolInstance)> =
            spec.instances().map(|(r, i)| (i.id.as_str(), (r, i))).collect();
        let mut to_send: Vec<&PoolInstance> = Vec::new();
        let mut to_retire: Vec<(Role, &PoolInstance)> = Vec::new();
        for (transition, finding) in &findings {
            let id = transition.instance_id.as_str();
            match rollback_disposition(finding) {
                RollbackDisposition::ReturnToPool => to_send.push(by_id[id].1),
                RollbackDisposition::Retire => {
                    warn!(instance = id, found = %finding, "not returnable: terminating it and removing its record");
                    self.record_event(TraceEvent::Found { id: id.to_string(), finding: finding.to_string() });
                    to_retire.push(by_id[id]);
                }
                RollbackDisposition::LeaveAlone => {
                    warn!(instance = id, found = %finding, "left alone: no longer this run's");
                    self.record_event(TraceEvent::Found { id: id.to_string(), finding: finding.to_string() });
                }
            }
        }
        self.checkpoint(record).await?;
        let sent = Mutex::new(Vec::new());
        let marked_at = entered_at(record, State::RollingBack);
        let mut retiring = record.clone();
        let sending = Box::pin(self.send_messages(record, &to_send, threshold, &sent));
        let retiring_future = Box::pin(self.retire(&mut retiring, &to_retire, None, marked_at));
        // The two are independent and go out together; with a concurrency of 1, one after the
        // other, so that the order of writes is deterministic (as every batch's is then).
        let (sending, retired) = if self.limits.concurrency > 1 {
            tokio::join!(sending, retiring_future)
        } else {
            let sending = sending.await;
            (sending, retiring_future.await)
        };
        // The retire's checkpoints may have written the record: keep the newer copy, with every
        // message known sent.
        if retiring.version > record.version {
            *record = retiring;
        }
        record.messages_sent.extend(sent.into_inner().expect("sent lock"));
        sending?;
        retired?;
        Ok(())
    }
}
