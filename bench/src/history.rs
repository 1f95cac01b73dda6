//! The run history at scale (issue 19): what `list --unfinished`, `resume --all` and `list` cost
//! in a table that retains many finished runs, through the engine's library API.
//!
//! One world per measurement: a fresh table (with the run index, as `init` leaves it), the
//! unfinished runs first (real runs whose driver died right after persisting their first state,
//! an hour ago, so their leases have ended), then the finished runs written directly with
//! `BatchWriteItem` (seeding is timed apart, never measured with the commands). The unfinished
//! runs are created first because moto copies the whole table for every transaction (see
//! `bench/emulator/sitecustomize.py`), which would make creating them in a large table the
//! slowest part. Finished runs are spread over the hour before and after the unfinished ones,
//! with run ids on both sides of theirs, so neither key order nor time order favours them. The
//! newest unfinished run is created last and must always be found.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
use futures::{stream, StreamExt, TryStreamExt};
use post_provision::driver::{Clock, Hooks};
use post_provision::machine::State;
use post_provision::record::{HistoryEntry, Lease, RunRecord, RUN_RECORD_SCHEMA_VERSION};
use post_provision::timestamp::Timestamp;
use post_provision::Engine;
use serde::Serialize;

/// Seeding requests in flight (moto handles one at a time; this hides the HTTP round trips).
const SEED_CONCURRENCY: usize = 8;

/// What one command cost.
#[derive(Debug, Serialize)]
pub struct CommandFigures {
    pub requests: u64,
    pub by_operation: BTreeMap<String, u64>,
    pub items_read: u64,
    pub wall_ms: f64,
    /// Unfinished runs the command found (listed, or resumed).
    pub found: usize,
    /// Whether the newest unfinished run was among them.
    pub newest_found: bool,
    pub cut: bool,
}

/// One line of the history benchmark.
#[derive(Debug, Serialize)]
pub struct HistoryFigures {
    pub retained: usize,
    pub unfinished: usize,
    pub seed_secs: f64,
    pub list_unfinished: CommandFigures,
    pub resume_all: CommandFigures,
    pub list_newest_100: CommandFigures,
}

struct FixedClock(Timestamp);

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        self.0
    }
}

async fn engine(endpoint: &str, table: &str, clock: Option<Arc<dyn Clock>>, hooks: Hooks) -> anyhow::Result<Engine> {
    // moto walks every item it holds for each Query: at 100,000 items one takes longer than the
    // default 10 s attempt timeout on a loaded machine. One attempt, so nothing is counted twice.
    let limits = post_provision::config::Limits {
        max_attempts: 1,
        attempt_timeout: std::time::Duration::from_secs(240),
        operation_timeout: std::time::Duration::from_secs(300),
        ..post_provision::config::Limits::default()
    };
    let mut builder =
        Engine::builder().table(table).region("us-east-1").endpoint_url(endpoint).hooks(hooks).limits(limits);
    if let Some(clock) = clock {
        builder = builder.clock(clock);
    }
    Ok(builder.build().await?)
}

/// A run with no instances whose creation failed: a rollback of nothing. Its resume writes only
/// its record, so `resume --all` measures the sweep, not instance work.
fn empty_spec(run_id: &str) -> anyhow::Result<post_provision::Spec> {
    let json = serde_json::json!({
        "runId": run_id, "maxRuntimeMin": 30, "idleTimeSec": 300,
        "selection": {"numInstancesSelected": 0, "numInstancesRequired": 1, "instances": []},
        "creation": {"state": "failed", "numInstancesCreated": 0, "instances": []},
    });
    Ok(post_provision::Spec::from_json(&json.to_string())?)
}

fn finished_record(run_id: &str, at: Timestamp) -> RunRecord {
    RunRecord {
        schema_version: RUN_RECORD_SCHEMA_VERSION,
        run_id: run_id.to_string(),
        run_attempt: 1,
        version: 2,
        state: State::Done,
        spec_digest: post_provision::record::digest("{}"),
        spec_chunks: 1,
        instance_count: 1,
        created_at: at,
        updated_at: at,
        history: vec![HistoryEntry { state: State::Done, at, reason: "1 instances committed".into() }],
        commit_threshold: Some(at.plus_secs(1_800)),
        idle_threshold: None,
        queue_urls: BTreeMap::new(),
        messages_sent: Vec::new(),
        refused_at_create: Vec::new(),
        error: None,
        lease: Lease { owner: String::new(), expires_at: at },
        fencing_epoch: 1,
        committed_ids: Vec::new(),
        ttl: Some(at.plus_secs(30 * 86_400).unix_secs()),
    }
}

async fn seed_finished(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    count: usize,
    around: Timestamp,
) -> anyhow::Result<()> {
    let spread = 3_600i64;
    let chunks: Vec<Vec<usize>> = (0..count).collect::<Vec<_>>().chunks(25).map(<[_]>::to_vec).collect();
    stream::iter(chunks)
        .map(|chunk| async move {
            let mut requests = Vec::with_capacity(chunk.len());
            for index in chunk {
                // Run ids on both sides of the unfinished runs' (`u-…`), times within an hour
                // either side of theirs.
                let run_id = if index % 2 == 0 { format!("a{index:07}") } else { format!("z{index:07}") };
                let at = around.plus_secs((index as i64 * 7_919) % (2 * spread) - spread);
                let item = post_provision::aws::run_record_item(&finished_record(&run_id, at))?;
                requests.push(
                    WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item)).build()?).build(),
                );
            }
            let mut pending = Some(HashMap::from([(table.to_string(), requests)]));
            while let Some(batch) = pending.take().filter(|b| b.values().any(|v| !v.is_empty())) {
                let output = client.batch_write_item().set_request_items(Some(batch)).send().await?;
                pending = output.unprocessed_items().cloned();
            }
            anyhow::Ok(())
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn figures(
    engine: &Engine,
    started: Instant,
    items_read: u64,
    found: &[String],
    newest: &str,
    cut: bool,
) -> CommandFigures {
    let by_operation = engine.requests().snapshot();
    CommandFigures {
        requests: by_operation.values().sum(),
        by_operation,
        items_read,
        wall_ms: started.elapsed().as_secs_f64() * 1_000.0,
        found: found.len(),
        newest_found: found.iter().any(|id| id == newest),
        cut,
    }
}

/// Seeds one world and measures the three commands on it.
pub async fn run(endpoint: &str, retained: usize, unfinished: usize) -> anyhow::Result<HistoryFigures> {
    let table = format!("bench-history-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&sdk_config);
    post_provision::aws::ensure_table(&client, &table).await.map_err(anyhow::Error::msg)?;
    let now = Timestamp::now_utc();
    post_provision::aws::ensure_run_index(&client, &table, now).await.map_err(anyhow::Error::msg)?;

    let seeding = Instant::now();
    // The unfinished runs: started an hour ago, one second apart; the last one is the newest.
    let base = now.plus_secs(-3_600);
    let mut newest = String::new();
    for index in 0..unfinished {
        let clock: Arc<dyn Clock> = Arc::new(FixedClock(base.plus_secs(index as i64)));
        let hooks = Hooks { crash_after_writes: Some(1), ..Hooks::default() };
        let crashing = engine(endpoint, &table, Some(clock), hooks).await?;
        newest = format!("u{index:05}");
        let crashed = crashing.start(empty_spec(&newest)?).await;
        anyhow::ensure!(crashed.is_err(), "run {newest} should have stopped at the crash hook");
    }
    seed_finished(&client, &table, retained, base).await?;
    let seed_secs = seeding.elapsed().as_secs_f64();

    let reader = engine(endpoint, &table, None, Hooks::default()).await?;
    let started = Instant::now();
    let listing = reader.list(true, 10_000).await?;
    let ids: Vec<String> = listing.records.iter().map(|r| r.run_id.clone()).collect();
    let list_unfinished = figures(&reader, started, listing.items_read, &ids, &newest, listing.is_cut());

    let sweeper = engine(endpoint, &table, None, Hooks::default()).await?;
    let started = Instant::now();
    let sweep = sweeper.resume_all(10_000).await?;
    let resumed: Vec<String> =
        sweep.results.iter().filter(|(_, result)| result.is_ok()).map(|(id, _)| id.clone()).collect();
    // The sweep's own listing is one Query; what it read is not exposed apart from the resumes.
    let resume_all = figures(&sweeper, started, sweep.unfinished_read as u64, &resumed, &newest, sweep.cut);

    let lister = engine(endpoint, &table, None, Hooks::default()).await?;
    let started = Instant::now();
    let newest_runs = lister.list(false, 100).await?;
    let list_newest_100 = figures(&lister, started, newest_runs.items_read, &[], &newest, newest_runs.bounded);
    Ok(HistoryFigures { retained, unfinished, seed_secs, list_unfinished, resume_all, list_newest_100 })
}
