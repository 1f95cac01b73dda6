//! Path C: emergency cleanup.

use std::collections::HashSet;

use super::{entered_at, Driver, StepError};
use crate::core;
use crate::machine::State;
use crate::ports::Ports;
use crate::record::RunRecord;
use crate::spec::Spec;

impl<P: Ports> Driver<P> {
    /// Retires every instance of the run that it still holds, selected and created alike, and
    /// any it released without announcing it; instances it returned to the pool (message sent)
    /// stay there, and instances somebody else holds are left alone. Returns how many instances
    /// were terminated.
    pub(super) async fn clean_up(&self, spec: &Spec, record: &mut RunRecord) -> Result<usize, StepError> {
        let sent: HashSet<String> = record.messages_sent.iter().cloned().collect();
        let instances = core::cleanup_instances(spec, &sent);
        let marked_at = entered_at(record, State::EmergencyCleanup);
        let released_unsent = record.idle_threshold;
        let retired = self.retire(record, &instances, released_unsent, marked_at).await?;
        Ok(retired.terminated)
    }
}
