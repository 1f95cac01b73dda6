//! Issue 18, item 2, tried through the CLI against moto as an attacker would: the creation tag's
//! *value* decides. An instance with no record is terminated only if the spec's creation list
//! names it and its pool tag (`InitialRunId`, or `--pool-tag-key`) carries this run's id. Run B's
//! instance, launched and not yet recorded, listed by a spec of run A, is left alone and
//! reported; so is a selected instance without a record. The audit's orphan repair follows the
//! same rule.

use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{Owner, Seed, Seeded, World};

fn binary() -> Command {
    let mut command = Command::new(crate::harness::cli_binary());
    command
        .env_remove("POST_PROVISION_TEST_HOOK")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("POST_PROVISION_POOL_TAG_KEY")
        .env("RUST_LOG", "warn");
    command
}

fn context(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Adds to the world's creation list an instance with no record, launched with the tag `tag`.
async fn recordless_created(world: &mut World, tag: (&str, &str)) -> String {
    let id = world.launch_tagged("large", Some(tag)).await;
    world.created.push(Seeded { id: id.clone(), class: "large".into(), threshold: world.start.plus_secs(600) });
    id
}

/// Runs `spec` through the CLI (JSON output) and returns the exit code and each instance's
/// reported result.
fn run(world: &World, spec: &Value, extra: &[&str]) -> (Option<i32>, Vec<(String, String)>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("spec.json");
    std::fs::write(&file, spec.to_string()).expect("write spec");
    let output = binary()
        .args(["--output", "json", "--table", &world.table])
        .args(extra)
        .args(["run", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}", context(&output)));
    let results = report["instanceResults"]
        .as_array()
        .unwrap_or_else(|| panic!("instance results: {}", context(&output)))
        .iter()
        .map(|r| (r["id"].as_str().unwrap_or("").to_string(), r["result"].as_str().unwrap_or("").to_string()))
        .collect();
    (output.status.code(), results, context(&output))
}

fn result_of<'a>(results: &'a [(String, String)], id: &str) -> &'a str {
    results.iter().find(|(i, _)| i == id).map(|(_, r)| r.as_str()).unwrap_or("")
}

/// The attack, on both paths that retire instances: a rollback (a capacity shortfall) and an
/// emergency cleanup (a claim expired, so the commit is refused).
#[tokio::test]
async fn another_runs_unrecorded_instance_in_the_creation_list_is_left_alone_and_reported() {
    for (name, selected_threshold, creation_state, exit) in
        [("tag-rollback", 240, "partial", 1), ("tag-cleanup", -60, "success", 2)]
    {
        let mut world = World::new(name).await;
        let claimed =
            Seed { class: "small", state: Some("claimed"), owner: Owner::Own, threshold_secs: selected_threshold };
        // A selected instance without a record (tagged with this run's id all the same).
        let unrecorded_selected = Seed { class: "small", state: None, owner: Owner::Own, threshold_secs: 240 };
        world.seed(&[claimed, unrecorded_selected], &[Seed::created("running")]).await;
        let run_b = format!("{}-b", world.run_id);
        let foreign = recordless_created(&mut world, ("InitialRunId", &run_b)).await;
        let run_a = world.run_id.clone();
        let own = recordless_created(&mut world, ("InitialRunId", &run_a)).await;
        // A shortfall needs one more than creation made; a commit exactly what it made.
        let required = world.created.len() + usize::from(creation_state == "partial");
        let spec = world.spec_json(creation_state, required);

        let (code, results, context) = run(&world, &spec, &[]);
        assert_eq!(code, Some(exit), "{name}: {context}");
        assert_eq!(world.ec2_state(&foreign).await, "running", "{name}: run B's instance terminated: {context}");
        let reported = result_of(&results, &foreign);
        assert!(
            reported.starts_with("left alone") && reported.contains(&format!("{run_b:?}")),
            "{name}: reported as {reported:?}: {context}"
        );
        let selected = &world.selected[1].id;
        assert_eq!(world.ec2_state(selected).await, "running", "{name}: {context}");
        assert!(result_of(&results, selected).contains("creation list"), "{name}: {context}");
        // This run's own record-less instance is still retired: nothing else would.
        assert_eq!(world.ec2_state(&own).await, "terminated", "{name}: {context}");
    }
}

/// The rule follows `--pool-tag-key`: the value of *that* tag decides, not `InitialRunId`'s.
#[tokio::test]
async fn the_pool_tag_key_in_use_carries_the_run_id() {
    let mut world = World::new("tag-key").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    // `InitialRunId` names this run, but the pool's tag (`Pool`) names run B: left alone.
    let run_b = format!("{}-b", world.run_id);
    let id = world.launch_tagged("large", Some(("Pool", &run_b))).await;
    world
        .clients
        .ec2
        .create_tags()
        .resources(&id)
        .tags(aws_sdk_ec2::types::Tag::builder().key("InitialRunId").value(&world.run_id).build())
        .send()
        .await
        .expect("tag");
    world.created.push(Seeded { id: id.clone(), class: "large".into(), threshold: world.start.plus_secs(600) });
    let spec = world.spec_json("partial", 3);
    let (code, results, context) = run(&world, &spec, &["--pool-tag-key", "Pool"]);
    assert_eq!(code, Some(1), "{context}");
    assert_eq!(world.ec2_state(&id).await, "running", "{context}");
    assert!(result_of(&results, &id).contains(&format!("{run_b:?}")), "{context}");
}

/// `audit --fix` terminates an orphan only past its grace period, and only for a run that is
/// over: an orphan of an unfinished run is left to that run.
#[tokio::test]
async fn the_audits_orphan_repair_follows_the_same_rule() {
    let mut world = World::new("tag-audit").await;
    world.seed(&[Seed::claimed("small")], &[]).await;
    // An unfinished run B: its driver died in Committing, its lease is long over.
    let run_b = format!("{}-b", world.run_id);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec_b = world.spec_json("success", 1);
    spec_b["runId"] = run_b.clone().into();
    let file = dir.path().join("spec-b.json");
    std::fs::write(&file, spec_b.to_string()).expect("write spec");
    let crashed = binary()
        .env("POST_PROVISION_TEST_HOOK", "crash-after=1")
        .args([
            "--one-transaction-max-instances",
            "0",
            "--lease-secs",
            "3600",
            "--table",
            &world.table,
            "run",
            "--spec",
        ])
        .arg(&file)
        .output()
        .expect("CLI");
    assert_eq!(crashed.status.code(), Some(3), "{}", context(&crashed));
    let of_unfinished = world.launch_tagged("large", Some(("InitialRunId", &run_b))).await;
    let of_nobody = world.launch_tagged("large", Some(("InitialRunId", ""))).await;
    let of_finished = world.launch_tagged("large", Some(("InitialRunId", "a-finished-run"))).await;
    let filter = format!("instance-id={of_unfinished},{of_nobody},{of_finished}");

    // Young: not even reported, with the default grace period.
    let audit = |grace: &str| {
        binary()
            .args(["--output", "json", "--table", &world.table, "audit", "--fix", "--grace-secs", grace])
            .args(["--instance-filter", &filter])
            .output()
            .expect("CLI")
    };
    let young = audit("600");
    let report: Value = serde_json::from_slice(&young.stdout).expect("JSON");
    let orphans = report["findings"].as_array().expect("findings").iter().filter(|f| f["kind"] == "orphan-instance");
    assert_eq!(orphans.count(), 0, "{}", context(&young));
    for id in [&of_unfinished, &of_nobody, &of_finished] {
        assert_eq!(world.ec2_state(id).await, "running", "{}", context(&young));
    }

    // Past the grace period (none): only the finished run's orphan is terminated.
    let old = audit("0");
    let report: Value = serde_json::from_slice(&old.stdout).expect("JSON");
    let repair_of = |id: &str| {
        report["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .find(|f| f["instanceId"] == id)
            .map(|f| (f["repair"].as_str().unwrap_or("").to_string(), f["detail"].as_str().unwrap_or("").to_string()))
            .unwrap_or_default()
    };
    assert_eq!(repair_of(&of_finished).0, "terminate", "{}", context(&old));
    let (repair, detail) = repair_of(&of_unfinished);
    assert_eq!(repair, "none", "{}", context(&old));
    assert!(detail.contains("unfinished"), "{detail}");
    assert_eq!(repair_of(&of_nobody).0, "none", "{}", context(&old));
    assert_eq!(world.ec2_state(&of_finished).await, "terminated", "{}", context(&old));
    assert_eq!(world.ec2_state(&of_unfinished).await, "running", "{}", context(&old));
    assert_eq!(world.ec2_state(&of_nobody).await, "running", "{}", context(&old));
}
