//! An orchestrator that drives one post-provision run through the library and handles every
//! outcome. Usage: `orchestrator SPEC_FILE` with `POST_PROVISION_TABLE` (and the usual `AWS_*`
//! variables) set. Exit status: 0 committed, 1 rolled back, 2 cleaned up, 3 retry later, 65 bad spec.

use anyhow::Context;
use post_provision::{DriveError, Engine, OutcomeKind, Spec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let spec_path = std::env::args().nth(1).context("usage: orchestrator SPEC_FILE")?;
    let table = std::env::var("POST_PROVISION_TABLE").context("POST_PROVISION_TABLE is not set")?;
    let text = std::fs::read_to_string(&spec_path).with_context(|| format!("reading {spec_path}"))?;
    let spec = match Spec::from_json(&text) {
        Ok(spec) => spec,
        Err(error) => {
            // Nothing was written: the earlier phases handed over something malformed.
            eprintln!("orchestrator: rejected spec: {error}");
            std::process::exit(65);
        }
    };
    let run_id = spec.run_id.clone();
    let engine = Engine::builder().table(table).build().await?;
    let code = match engine.start(spec).await {
        Ok(outcome) => match outcome.kind {
            OutcomeKind::Committed => {
                println!("orchestrator: run {run_id} committed {} instances", outcome.record.instance_count);
                0
            }
            OutcomeKind::RolledBack => {
                let reason = outcome.record.error.map(|e| e.message).unwrap_or_default();
                println!("orchestrator: run {run_id} rolled back: {reason}");
                1
            }
            OutcomeKind::CleanedUp => {
                let reason = outcome.record.error.map(|e| e.message).unwrap_or_default();
                println!("orchestrator: run {run_id} cleaned up after: {reason}");
                2
            }
        },
        // The run's state is persisted: another driver has it, or AWS is failing. Come back later
        // with `engine.resume(run_id)` (or let a scheduled `post-provision resume --all` do it).
        Err(error @ (DriveError::Busy { .. } | DriveError::Stalled { .. } | DriveError::LeaseLost { .. })) => {
            println!("orchestrator: run {run_id} not finished yet: {error}");
            3
        }
        Err(error @ (DriveError::InvalidSpec(_) | DriveError::SpecMismatch { .. })) => {
            eprintln!("orchestrator: refused: {error}");
            65
        }
        Err(error) => return Err(error).context("post-provision failed"),
    };
    std::process::exit(code);
}
