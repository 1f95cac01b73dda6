//! A deterministic simulation of the runner pool around post-provision (issue 10), in the style of
//! FoundationDB's simulator and TigerBeetle's VOPR: the real [`post_provision::driver::Driver`]
//! runs through the [`post_provision::ports`] traits against an in-memory AWS, among the pool's
//! other actors, under faults, crashes and pauses, in virtual time. One seed is one history.
//!
//! - [`dynamo`], [`sqs`], [`ec2`]: the services, one module each, with AWS's semantics;
//! - [`ports`]: the thin `Ports` layer, where the simulation interleaves and injects faults;
//! - [`actors`]: selection, release (another run's, and this run's `if: always()`), refresh,
//!   creation and boot agents, each derived from the original pool manager's code;
//! - [`clock`]: each machine's clock, skewed and drifting;
//! - [`invariants`]: what must hold, by name;
//! - [`swarm`]: what each seed exercises; [`scenario`]: one seed from setup to verdict.
//!
//! `docs/ARCHITECTURE.md` (*Simulation*) describes it for users; `scripts/sim` runs it.

pub mod actors;
pub mod clock;
pub mod dynamo;
pub mod ec2;
pub mod invariants;
pub mod memory;
pub mod ports;
pub mod rng;
pub mod scenario;
pub mod sqs;
pub mod swarm;
pub mod world;

pub use scenario::{run_seed, SeedReport};
