//! The run's state machine: the declaration in `states/machine.rs`, plus the typed error for
//! undeclared transitions and the renderers of the table and diagram.

use rust_fsm::StateMachineImpl;

/// The declaration, as written in `states/machine.rs`. The macro generates the `State`, `Input`
/// and `Output` enums and the transition and output functions; their names are the docs.
#[allow(missing_docs)]
mod declaration {
    include!("../states/machine.rs");
}

pub use declaration::run_machine;

pub use run_machine::{Input, Output, State};

/// Every state, in the order the table and diagram list them.
pub const ALL_STATES: [State; 6] =
    [State::Reconciling, State::Committing, State::RollingBack, State::EmergencyCleanup, State::Done, State::Failed];

/// Every input, in the order the table lists them.
pub const ALL_INPUTS: [Input; 4] =
    [Input::ReconciledSuccess, Input::ReconciledShortfall, Input::UnexpectedError, Input::ActionsCompleted];

/// A (state, input) pair that `states/machine.rs` does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid transition: no transition from {from:?} on {input:?}")]
pub struct InvalidTransition {
    /// The state the run was in.
    pub from: State,
    /// The input that has no transition from that state.
    pub input: Input,
}

/// Applies `input` to `from`: the next state and the work its entry asks for.
pub fn next(from: State, input: Input) -> Result<(State, Option<Output>), InvalidTransition> {
    let to = run_machine::Impl::transition(&from, &input).ok_or(InvalidTransition { from, input })?;
    Ok((to, run_machine::Impl::output(&from, &input)))
}

impl State {
    /// The state's name as persisted in the run record's `state` attribute.
    pub fn name(self) -> &'static str {
        match self {
            State::Reconciling => "Reconciling",
            State::Committing => "Committing",
            State::RollingBack => "RollingBack",
            State::EmergencyCleanup => "EmergencyCleanup",
            State::Done => "Done",
            State::Failed => "Failed",
        }
    }

    /// Parses a persisted state name.
    pub fn from_name(name: &str) -> Option<State> {
        ALL_STATES.into_iter().find(|state| state.name() == name)
    }

    /// `Done` and `Failed` end a run; nothing is left to drive.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Done | State::Failed)
    }

    /// The initial state of every run.
    pub fn initial() -> State {
        run_machine::Impl::INITIAL_STATE
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Every declared transition, in table order: (from, input, to, output).
pub fn transitions() -> Vec<(State, Input, State, Option<Output>)> {
    let mut rows = Vec::new();
    for from in ALL_STATES {
        for input in ALL_INPUTS {
            if let Ok((to, output)) = next(from, input) {
                rows.push((from, input, to, output));
            }
        }
    }
    rows
}

/// The transition table as Markdown, including which pairs are rejected.
pub fn render_markdown() -> String {
    let mut out = String::from("| From | Input | To | Entry work |\n|---|---|---|---|\n");
    for (from, input, to, output) in transitions() {
        let work = output.map(|o| format!("{o:?}")).unwrap_or_else(|| "-".to_string());
        out.push_str(&format!("| {from} | {input:?} | {to} | {work} |\n"));
    }
    out.push_str("\nEvery other (state, input) pair is rejected with `InvalidTransition`.\n");
    out.push_str("Terminal states: ");
    let terminal: Vec<String> = ALL_STATES.iter().filter(|s| s.is_terminal()).map(|s| s.to_string()).collect();
    out.push_str(&terminal.join(", "));
    out.push('\n');
    out
}

/// The machine as a Mermaid state diagram.
pub fn render_mermaid() -> String {
    let mut out = String::from("stateDiagram-v2\n");
    out.push_str(&format!("    [*] --> {}\n", State::initial()));
    for (from, input, to, _) in transitions() {
        out.push_str(&format!("    {from} --> {to}: {input:?}\n"));
    }
    for state in ALL_STATES.iter().filter(|s| s.is_terminal()) {
        out.push_str(&format!("    {state} --> [*]\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_undeclared_pair_is_a_typed_error() {
        let declared = transitions();
        for from in ALL_STATES {
            for input in ALL_INPUTS {
                let is_declared = declared.iter().any(|(f, i, _, _)| *f == from && *i == input);
                assert_eq!(next(from, input).is_ok(), is_declared, "{from:?} {input:?}");
            }
        }
        assert_eq!(
            next(State::Done, Input::UnexpectedError),
            Err(InvalidTransition { from: State::Done, input: Input::UnexpectedError })
        );
        assert!(next(State::EmergencyCleanup, Input::UnexpectedError).is_err());
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for input in ALL_INPUTS {
            assert!(next(State::Done, input).is_err());
            assert!(next(State::Failed, input).is_err());
        }
    }

    #[test]
    fn names_round_trip() {
        for state in ALL_STATES {
            assert_eq!(State::from_name(state.name()), Some(state));
        }
        assert_eq!(State::from_name("Bogus"), None);
    }
}
