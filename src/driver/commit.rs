//! Path A: commit every instance to the run.

use tracing::warn;

use super::{summarize, Driver, StepError, TraceEvent};
use crate::core::{self, Finding, WriteResult};
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
    /// emergency cleanup (isolation-checked) follows. So does it on a resume for an instance that
    /// already refused the run's one-transaction create (`refused_at_create`): this run never
    /// held it; and on a resume where some instance was committed only now: the commit had not
    /// landed before, so nothing was handed on since. (A run created on the staged path without that attempt has no such evidence: a
    /// spec naming another run's instance, with a crash between the record and the commit, would
    /// end `Done` without it, and that instance untouched. See ARCHITECTURE's known limitations.)
    pub(super) async fn commit(&self, spec: &Spec, record: &mut RunRecord, resumed: bool) -> Result<String, StepError> {
        let threshold = record.commit_threshold.expect("commit threshold is set on entering Committing");
        let results = self.run_transition_results(core::commit_transitions(spec, threshold)).await?;
        // An instance committed only now was still waiting for this run's commit: the commit had
        // not landed before the driver died, so nothing can have been handed on since either.
        let applied_now = results.iter().any(|(_, result)| *result == WriteResult::Applied);
        let findings: Vec<_> = results
            .into_iter()
            .map(|(transition, result)| {
                let finding = core::classify_transition(&transition, &result).expect("cancelled writes were re-sent");
                (transition, finding)
            })
            .collect();
        let mut committed = 0;
        let mut moved_on = Vec::new();
        let mut refused = Vec::new();
        for (transition, finding) in &findings {
            match finding {
                Finding::Done => committed += 1,
                Finding::OwnedByOther { .. }
                    if resumed && !applied_now && !record.refused_at_create.contains(&transition.instance_id) =>
                {
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
