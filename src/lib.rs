//! Post-provision for self-hosted GitHub Actions runner pools on EC2: commit, roll back or clean
//! up a run's instances, crash-safely.
//!
//! Selection claims idle instances from an SQS-backed pool, creation launches new ones; this
//! crate finishes the job. A run is a typed state machine (declared in `states/machine.rs`):
//!
//! ```text
//! Reconciling ─success──▶ Committing ──▶ Done
//!      │ └─shortfall──▶ RollingBack ──▶ Failed (capacity shortfall)
//!      └─error─▶ EmergencyCleanup ◀─error── (Committing, RollingBack) ──▶ Failed (original error)
//! ```
//!
//! # A run's lifecycle
//!
//! An orchestrator builds one [`Engine`] per process and hands it each run's [`Spec`]:
//!
//! ```no_run
//! use post_provision::{DriveError, Engine, OutcomeKind, Spec};
//!
//! # async fn orchestrate(spec_json: &str) -> Result<(), Box<dyn std::error::Error>> {
//! // 1. Validate the spec first: a bad one is refused before anything is written to AWS.
//! let spec = Spec::from_json(spec_json)?;
//! let run_id = spec.run_id.clone();
//!
//! // 2. One engine per process: the pool's table, and the standard AWS configuration chain.
//! let engine = Engine::builder().table("runner-pool").region("eu-west-1").build().await?;
//!
//! // 3. Start the run. It reconciles, persists its next state, then acts; every state is
//! //    written to DynamoDB before that state's side effects run, or, for a small run, in one
//! //    atomic transaction with its first effects.
//! match engine.start(spec).await {
//!     Ok(outcome) => match outcome.kind {
//!         OutcomeKind::Committed => println!("{run_id}: {} instances running", outcome.record.instance_count),
//!         OutcomeKind::RolledBack => println!("{run_id}: capacity shortfall, claims returned to the pool"),
//!         OutcomeKind::CleanedUp => println!("{run_id}: cleaned up after {:?}", outcome.record.error),
//!     },
//!     // 4. Not finished: another driver holds the run, or AWS failed after the state was
//!     //    persisted. Nothing is lost; resume later (or let `post-provision resume --all` do it).
//!     Err(DriveError::Busy { .. } | DriveError::Stalled { .. } | DriveError::LeaseLost { .. }) => {
//!         let outcome = engine.resume(&run_id).await?;
//!         println!("{run_id}: finished on resume as {:?}", outcome.kind);
//!     }
//!     Err(error) => return Err(error.into()),
//! }
//!
//! // 5. The record stays readable (until its TTL) for status and audits.
//! let record = engine.status(&run_id).await?.expect("the run was persisted");
//! println!("{run_id}: {} after {} transitions", record.state, record.history.len());
//! # Ok(())
//! # }
//! ```
//!
//! # Persist, then act
//!
//! The driver ([`driver`]) repeats one cycle: compute the next state in the pure core
//! ([`core`], [`machine`]), write it to the run record conditionally on the record's version (a
//! driver that lost its lease cannot write), run the state's side effects through the port
//! traits ([`ports`], implemented in [`aws`]), and feed their outcomes back. Every side effect is
//! a conditional write or an idempotent call: a resumed run recognises its own earlier effects
//! ("already done by this run" is success) and never overwrites another run's instance.
//! See `docs/ARCHITECTURE.md` for the code map and the crash windows.
#![deny(missing_docs)]
// The driver's futures nest the AWS SDK's deeply: proving them `Send` takes more than the default
// 128 levels once dev-dependencies' features are unified in (as `tests/it/main.rs` needs too).
#![recursion_limit = "256"]

pub mod audit;
#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "aws")]
pub mod cli;
pub mod config;
pub mod core;
pub mod driver;
#[cfg(feature = "aws")]
pub mod engine;
pub mod iam;
pub mod machine;
pub mod output;
pub mod ports;
pub mod record;
pub mod run;
pub mod spec;
pub mod timestamp;

pub use driver::{DriveError, OutcomeKind, RunOutcome};
#[cfg(feature = "aws")]
pub use engine::{Audit, AuditError, AuditOptions, Engine, EngineBuilder};
pub use spec::Spec;
