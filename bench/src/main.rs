//! Benchmark of post-provision against the existing system's call pattern, on the moto emulator.
//!
//! `scripts/bench` drives it in three steps, each measurement in a process of its own so that
//! peak memory and CPU time belong to that measurement alone:
//! - `seed` builds a fresh world (table, pool queues, EC2 instances, instance records) for one
//!   path and fleet size and writes its description to a file; seeding is never measured;
//! - `measure` runs either this engine (`ours`) or the baseline on a seeded world and prints one
//!   JSON line of figures;
//! - `report` turns the JSON lines into `docs/benchmarks.md`.
//!
//! This crate and `src/aws/` are the only places that call the AWS SDK: the baseline issues the
//! existing system's calls itself, because what is measured is that system's pattern.

mod baseline;
mod history;
mod measure;
mod report;
mod world;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// The three paths of post-provision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Every instance becomes `running` for the run.
    Commit,
    /// Claimed instances go back to their pools.
    Rollback,
    /// The run's instances are terminated and their records deleted.
    Cleanup,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Commit => "commit",
            PathKind::Rollback => "rollback",
            PathKind::Cleanup => "cleanup",
        }
    }
}

/// What runs against the seeded world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// This engine, through its library API.
    Ours,
    /// The existing system's call pattern: one call per instance per step, all at once.
    Baseline,
}

#[derive(Parser)]
#[command(about = "Benchmark post-provision against the existing system's call pattern (see scripts/bench)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Seeds a fresh world for one path and fleet size (not measured).
    Seed {
        /// The path the world is set up for.
        #[arg(long, value_enum)]
        path: PathKind,
        /// Instances in the run.
        #[arg(long)]
        instances: usize,
        /// Where to write the world's description.
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs one system on a seeded world and prints one JSON line of figures.
    Measure {
        /// The world's description, from `seed`.
        #[arg(long)]
        world: PathBuf,
        /// Which system runs.
        #[arg(long, value_enum)]
        system: System,
        /// The endpoint the measured clients use (moto, or the fault proxy in front of it).
        #[arg(long)]
        endpoint: String,
        /// A name for the network conditions, such as `direct` or `latency 20 ms`.
        #[arg(long)]
        network: String,
        /// moto's process id, to read the emulator's CPU time.
        #[arg(long)]
        emulator_pid: Option<u32>,
    },
    /// Seeds a table with `retained` finished and `unfinished` unfinished runs, then measures
    /// `list --unfinished`, `resume --all` and `list --limit 100` on it (issue 19); prints one JSON
    /// line. Run by `scripts/bench-history`.
    History {
        /// Finished runs written directly.
        #[arg(long)]
        retained: usize,
        /// Unfinished runs (drivers that died), the last one the newest.
        #[arg(long)]
        unfinished: usize,
        /// The emulator's endpoint.
        #[arg(long)]
        endpoint: String,
    },
    /// Writes the Markdown report from the JSON lines of `measure`.
    Report {
        /// The JSON lines.
        #[arg(long)]
        results: PathBuf,
        /// The Markdown file to write.
        #[arg(long)]
        out: PathBuf,
        /// What the report records about the run of the benchmark.
        #[command(flatten)]
        context: report::Context,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed { path, instances, out } => {
            let world = world::seed(path, instances).await?;
            std::fs::write(&out, serde_json::to_string(&world)?)?;
        }
        Command::Measure { world, system, endpoint, network, emulator_pid } => {
            let world: world::World = serde_json::from_str(&std::fs::read_to_string(&world)?)?;
            let figures = measure::run(&world, system, &endpoint, &network, emulator_pid).await?;
            println!("{}", serde_json::to_string(&figures)?);
        }
        Command::History { retained, unfinished, endpoint } => {
            let figures = history::run(&endpoint, retained, unfinished).await?;
            println!("{}", serde_json::to_string(&figures)?);
        }
        Command::Report { results, out, context } => {
            let text = std::fs::read_to_string(&results)?;
            let figures: Vec<measure::Figures> =
                text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
            std::fs::write(&out, report::render(&figures, &context))?;
        }
    }
    Ok(())
}
