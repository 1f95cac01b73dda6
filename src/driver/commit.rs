//! Path A: commit every instance to the run.

use tracing::warn;

use super::{summarize, Driver, StepError, TraceEvent};
use crate::core::{self, Finding};
use crate::ports::Ports;
use crate::record::RunRecord;
use crate::spec::Spec;

impl<P: Ports> Driver<P> {
    /// Moves every instance to `running` for the run with the commit threshold. Returns the
    /// reason recorded with `Done`.
    ///
    /// On a resume (`resumed`), an instance that somebody else now holds (the pool, or another
    /// run) is one this run committed before its driver died: while an instance is claimed for
    /// this run or created by it, no other actor can take it (selection takes `idle`, refresh
    /// only marks it `terminated`), so only release after the committed job can have handed it
    /// on. It is left alone and the commit counts as done for it. On a first attempt the same
    /// finding means the spec named an instance this run never held: the commit is refused, and
    /// emergency cleanup (isolation-checked) follows.
    pub(super) async fn commit(&self, spec: &Spec, record: &mut RunRecord, resumed: bool) -> Result<String, StepError> {
        let threshold = record.commit_threshold.expect("commit threshold is set on entering Committing");
        let findings = self.run_transitions(core::commit_transitions(spec, threshold)).await?;
        let mut committed = 0;
        let mut moved_on = Vec::new();
        let mut refused = Vec::new();
        for (transition, finding) in &findings {
            match finding {
                Finding::Done => committed += 1,
                Finding::OwnedByOther { .. } if resumed => {
                    warn!(instance = %transition.instance_id, found = %finding, "committed earlier and handed on since: left alone");
                    self.record_event(TraceEvent::Found {
                        id: transition.instance_id.clone(),
                        finding: format!("{finding}: committed earlier, handed on since"),
                    });
                    moved_on.push(transition.instance_id.clone());
                }
                _ => {
                    warn!(instance = %transition.instance_id, found = %finding, "instance cannot be committed");
                    self.record_event(TraceEvent::Found {
                        id: transition.instance_id.clone(),
                        finding: finding.to_string(),
                    });
                    refused.push(format!("{}: {finding}", transition.instance_id));
                }
            }
        }
        if !refused.is_empty() {
            return Err(StepError::Unexpected(format!(
                "commit refused for {} instance(s): {}",
                refused.len(),
                summarize(&refused)
            )));
        }
        if moved_on.is_empty() {
            Ok(format!("{committed} instances committed"))
        } else {
            Ok(format!(
                "{committed} instances committed; {} committed earlier and since handed on by the pool: {}",
                moved_on.len(),
                summarize(&moved_on)
            ))
        }
    }
}
