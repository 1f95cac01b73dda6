//! Post-provision for self-hosted GitHub Actions runner pools on EC2: commit, roll back or clean
//! up a run's instances, crash-safely.
#![deny(missing_docs)]

pub mod aws;
pub mod cli;
pub mod config;
pub mod core;
pub mod driver;
pub mod engine;
pub mod machine;
pub mod ports;
pub mod record;
pub mod report;
pub mod spec;
pub mod timestamp;

pub use driver::{DriveError, OutcomeKind, RunOutcome};
pub use engine::{Engine, EngineBuilder};
pub use spec::Spec;
