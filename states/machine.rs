// The post-provision run's state machine, declared as data in one place.
//
// This file is `include!`d by `src/machine.rs`, which adds the lists of states and inputs, the typed
// `InvalidTransition` error for every (state, input) pair that is not declared here, and the
// renderers whose output is snapshot-tested under `snapshots/`.
//
// Reading the table: `State(Input) => Next [Output]`. The output names the work the driver plans
// and runs when it enters `Next`; the state is persisted before that work starts.

rust_fsm::state_machine! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    pub run_machine(Reconciling)

    Reconciling => {
        // Creation succeeded, something was acquired, and creation made exactly what was required.
        ReconciledSuccess => Committing [CommitInstances],
        // Anything else is a capacity shortfall: give back what was claimed.
        ReconciledShortfall => RollingBack [ReleaseInstances],
        UnexpectedError => EmergencyCleanup [CleanUpInstances],
    },
    Committing => {
        ActionsCompleted => Done [ReportCommitted],
        UnexpectedError => EmergencyCleanup [CleanUpInstances],
    },
    RollingBack => {
        ActionsCompleted => Failed [ReportShortfall],
        UnexpectedError => EmergencyCleanup [CleanUpInstances],
    },
    // Cleanup is the safety net: an error inside it is retried by a later resume, never escalated.
    EmergencyCleanup(ActionsCompleted) => Failed [ReportError],
}
