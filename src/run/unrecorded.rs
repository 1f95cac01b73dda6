//! The one rule for an EC2 instance that has no instance record (issue 18): who may terminate it.
//!
//! Creation launches every pool instance tagged `InitialRunId = <the run that launched it>`
//! (`--pool-tag-key`), then writes its record. Between the two, and for good when the
//! registration failed, the instance has no record, and nothing in the table says whose it is:
//! only the tag's *value* does. So an instance without a record is terminated only on behalf of
//! the run its tag names:
//!
//! - **by a run** (rollback and emergency cleanup), only if its spec's creation list names the
//!   instance and the tag's value is this run's id. A selected instance was launched by another
//!   run, and a spec may list anything: any other record-less instance is left alone, and
//!   reported;
//! - **by the audit** (`--fix`), only once the run its tag names can no longer record or retire
//!   it: that run has no unfinished run record (its own resume decides otherwise), and the value
//!   names a run at all. The audit reports an orphan only past its grace period, and in a GitHub
//!   Actions job the CLI skips the repair unless the tag names the job's own run.
//!
//! Architecture invariant: no code path terminates an instance that has no record except
//! through [`may_terminate`].

/// Who would terminate a record-less instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acting<'a> {
    /// A run (`run_id`), for an instance its spec lists; `in_creation_list`: in the spec's
    /// creation list (not its selection list).
    Run {
        /// The run's id (every attempt shares it, as the tag does).
        run_id: &'a str,
        /// Whether the spec's creation list names the instance.
        in_creation_list: bool,
    },
    /// The audit, for an orphan past its grace period; `named_run_unfinished`: whether the run
    /// the tag names has a run record that is not `Done` or `Failed`.
    Audit {
        /// Whether the named run is still unfinished.
        named_run_unfinished: bool,
    },
}

/// Whether an instance with no record, whose pool tag has the value `pool_tag_value`, may be
/// terminated by `acting`. `Err` says, for the report, why it is left alone.
pub fn may_terminate(acting: Acting<'_>, pool_tag_value: &str) -> Result<(), String> {
    match acting {
        Acting::Run { in_creation_list: false, .. } => {
            Err("no instance record, and not in this run's creation list".into())
        }
        _ if pool_tag_value.is_empty() => Err("no instance record, and its pool tag names no run".into()),
        Acting::Run { run_id, .. } if pool_tag_value != run_id => {
            Err(format!("no instance record, and its pool tag names run {pool_tag_value:?}, not this run"))
        }
        Acting::Run { .. } => Ok(()),
        Acting::Audit { named_run_unfinished: true } => Err(format!(
            "no instance record; its pool tag names run {pool_tag_value:?}, which is unfinished: left to that run"
        )),
        Acting::Audit { named_run_unfinished: false } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(in_creation_list: bool) -> Acting<'static> {
        Acting::Run { run_id: "100", in_creation_list }
    }

    #[test]
    fn a_run_terminates_only_its_own_created_instances() {
        assert_eq!(may_terminate(run(true), "100"), Ok(()));
        // Launched by another run (the attack of issue 18: a spec of run A lists run B's instance).
        let other = may_terminate(run(true), "200").unwrap_err();
        assert!(other.contains("\"200\"") && other.contains("not this run"), "{other}");
        // Selected instances were launched by some earlier run, whatever the tag says.
        assert!(may_terminate(run(false), "100").unwrap_err().contains("creation list"));
        assert!(may_terminate(run(false), "200").is_err());
        // An empty value names nobody; a prefix or a padded value is another run.
        assert!(may_terminate(run(true), "").unwrap_err().contains("names no run"));
        assert!(may_terminate(run(true), "10").is_err());
        assert!(may_terminate(run(true), "100 ").is_err());
        assert!(may_terminate(Acting::Run { run_id: "", in_creation_list: true }, "").is_err());
    }

    #[test]
    fn the_audit_leaves_an_unfinished_runs_orphans_to_that_run() {
        assert_eq!(may_terminate(Acting::Audit { named_run_unfinished: false }, "100"), Ok(()));
        let unfinished = may_terminate(Acting::Audit { named_run_unfinished: true }, "100").unwrap_err();
        assert!(unfinished.contains("unfinished"), "{unfinished}");
        assert!(may_terminate(Acting::Audit { named_run_unfinished: false }, "").is_err());
    }
}
