//! An orchestrator that drives one post-provision run through the library and handles every
//! outcome. Usage: `orchestrator SPEC_FILE` with `POST_PROVISION_TABLE` (and the usual `AWS_*`
//! variables) set. Its exit status is the CLI's (`post-provision --help` lists them): 0
//! committed, 1 rolled back, 2 cleaned up, 3 not finished (resume later), 64 bad usage, 65 bad
//! spec, 69 AWS unavailable before anything was written, 70 internal error, 77 permission
//! denied or no credentials, 78 missing table. Errors are mapped with the CLI's own
//! `classify_drive_error`, so the two cannot drift apart.

use std::io::Read;

use post_provision::cli::{classify_drive_error, EXIT_INVALID_SPEC, EXIT_USAGE};
use post_provision::spec::MAX_SPEC_FILE_BYTES;
use post_provision::{Engine, OutcomeKind, Spec};

fn fail(code: i32, message: impl std::fmt::Display) -> ! {
    // The message may quote the spec or AWS: written on one line, it cannot start a workflow
    // command in a GitHub Actions log.
    eprintln!("orchestrator: {}", post_provision::output::escape::plain(&message.to_string()));
    std::process::exit(code)
}

#[tokio::main]
async fn main() {
    let Some(spec_path) = std::env::args().nth(1) else { fail(EXIT_USAGE, "usage: orchestrator SPEC_FILE") };
    let Ok(table) = std::env::var("POST_PROVISION_TABLE") else { fail(EXIT_USAGE, "POST_PROVISION_TABLE is not set") };
    // A bounded read: a spec is never larger than this, and a larger file is not read whole.
    let mut text = String::new();
    let read =
        std::fs::File::open(&spec_path).and_then(|file| file.take(MAX_SPEC_FILE_BYTES + 1).read_to_string(&mut text));
    if let Err(error) = read {
        fail(EXIT_USAGE, format!("reading {spec_path}: {error}"));
    }
    if text.len() as u64 > MAX_SPEC_FILE_BYTES {
        fail(EXIT_INVALID_SPEC, format!("{spec_path} is larger than {MAX_SPEC_FILE_BYTES} bytes"));
    }
    let spec = match Spec::from_json(&text) {
        Ok(spec) => spec,
        // Nothing was written: the earlier phases handed over something malformed.
        Err(error) => fail(EXIT_INVALID_SPEC, format!("rejected spec: {error}")),
    };
    let run_id = spec.run_id.clone();
    let engine = match Engine::builder().table(table).build().await {
        Ok(engine) => engine,
        Err(error) => fail(EXIT_USAGE, error),
    };
    let code = match engine.start(spec).await {
        Ok(outcome) => {
            let reason = outcome.record.error.as_ref().map(|e| post_provision::output::escape::plain(&e.message));
            match outcome.kind {
                OutcomeKind::Committed => {
                    println!("orchestrator: run {run_id} committed {} instances", outcome.record.instance_count)
                }
                OutcomeKind::RolledBack => {
                    println!("orchestrator: run {run_id} rolled back: {}", reason.unwrap_or_default())
                }
                OutcomeKind::CleanedUp => {
                    println!("orchestrator: run {run_id} cleaned up after: {}", reason.unwrap_or_default())
                }
            }
            outcome.kind.exit_code()
        }
        // 3: the run's state is persisted (another driver has it, or AWS is failing); come back
        // later with `engine.resume(run_id)` or let a scheduled `post-provision resume --all` do
        // it. 65, 69, 77, 78: nothing was written. 70: a bug or a corrupt record.
        Err(error) => {
            let (code, kind) = classify_drive_error(&error);
            fail(code, format!("run {run_id}: {kind}: {error}"))
        }
    };
    std::process::exit(code);
}
