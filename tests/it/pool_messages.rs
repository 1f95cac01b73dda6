//! Issue 18, item 3, tried through the CLI against moto as an attacker would: the pool, not the
//! spec, is the source of pool messages. A spec that names the class `small` (or another instance
//! type) for a `large` record is refused with 65 before anything is written; the queue comes from
//! the table's `TYPE#METADATA` item only, and without that item a run that would return
//! instances stops with a configuration error (78) before anything is written, whatever queue
//! URL the spec carries.
//!
//! A small rollback whose spec carries `resourceClassConfig` reads nothing first (issue 19): its
//! creating transaction checks the same, and any refusal sends it to the reads. Each attack here
//! runs both ways, and ends alike: the same exit code and error, nothing written.

use std::process::{Command, Output};

use aws_sdk_dynamodb::types::AttributeValue;
use post_provision::cli::{EXIT_CONFIG, EXIT_INVALID_SPEC};
use serde_json::Value;

use crate::bad_input::world_state;
use crate::harness::{Seed, World};

fn run(world: &World, spec: &Value) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("spec.json");
    std::fs::write(&file, spec.to_string()).expect("write spec");
    Command::new(crate::harness::cli_binary())
        .env_remove("POST_PROVISION_TEST_HOOK")
        .env_remove("GITHUB_ACTIONS")
        .env("RUST_LOG", "warn")
        .args(["--output", "json", "--table", &world.table, "run", "--spec"])
        .arg(&file)
        .output()
        .expect("CLI")
}

fn context(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn error_of(output: &Output) -> (String, String) {
    let json: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}", context(output)));
    crate::github::validate("error.schema.json", &output.stdout);
    (
        json["error"]["kind"].as_str().unwrap_or("").to_string(),
        json["error"]["field"].as_str().unwrap_or("").to_string(),
    )
}

/// A capacity shortfall for one `large` instance claimed from the pool: the run would return it.
async fn shortfall_world(name: &str) -> World {
    let mut world = World::new(name).await;
    world.seed(&[Seed::claimed("large")], &[]).await;
    world
}

#[tokio::test]
async fn a_spec_that_contradicts_the_record_is_refused_and_nothing_is_written() {
    let world = shortfall_world("msg-record").await;
    let before = world_state(&world).await;
    // The attack: `small` (with small's own cpu and mmem and type) for a `large` record.
    let mut small = world.spec_json("partial", 2);
    let instance = &mut small["selection"]["instances"][0];
    (instance["resourceClass"], instance["instanceType"], instance["cpu"], instance["mmem"]) =
        ("small".into(), "t3.nano".into(), 1.into(), 2048.into());
    // The class only: `small` with the record's own instance type.
    let mut class_only = small.clone();
    class_only["selection"]["instances"][0]["instanceType"] = "c6i.large".into();
    // The class right, the instance type not the record's.
    let mut nano = world.spec_json("partial", 2);
    nano["selection"]["instances"][0]["instanceType"] = "t3.nano".into();
    let attacks = [
        (small, "selection.instances[0].resourceClass", "\"large\""),
        (class_only, "selection.instances[0].resourceClass", "\"large\""),
        (nano, "selection.instances[0].instanceType", "\"c6i.large\""),
    ];
    for (spec, field, named) in attacks.into_iter().flat_map(|attack| with_and_without_config(&world, attack)) {
        let output = run(&world, &spec);
        assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{}", context(&output));
        assert_eq!(error_of(&output), ("invalid-spec".to_string(), field.to_string()), "{}", context(&output));
        assert!(String::from_utf8_lossy(&output.stderr).contains(named), "{}", context(&output));
        assert_eq!(world_state(&world).await, before, "nothing written: {}", context(&output));
    }
    // The honest spec returns the instance to the `large` queue, as its record says.
    let mut honest = world.spec_json("partial", 2);
    honest["resourceClassConfig"] = world.pool_config_json();
    let output = run(&world, &honest);
    assert_eq!(output.status.code(), Some(1), "{}", context(&output));
    let queues = world.queue_contents().await;
    assert_eq!((queues["large"].len(), queues["small"].len()), (1, 0), "{queues:?}");
}

/// An attack as given, and with the pool's own `resourceClassConfig` in its spec (the guarded
/// create, whose refusal leads to the same reads).
fn with_and_without_config<'a>(
    world: &World,
    (spec, field, named): (Value, &'a str, &'a str),
) -> [(Value, &'a str, &'a str); 2] {
    let mut configured = spec.clone();
    configured["resourceClassConfig"] = world.pool_config_json();
    [(spec, field, named), (configured, field, named)]
}

/// The spec's `resourceClassConfig` must be the pool's in every class it names, even one no
/// instance of the run is of: a `cpu` or `mmem` that is not the pool's is refused with 65 and
/// nothing is written, by the guarded create's check (which then reads the pool) as by the reads.
#[tokio::test]
async fn a_spec_config_whose_cpu_or_mmem_is_not_the_pools_is_refused_and_nothing_is_written() {
    let world = shortfall_world("msg-config-cpu").await;
    let before = world_state(&world).await;
    for field in ["cpu", "mmem"] {
        let mut spec = world.spec_json("partial", 2);
        spec["resourceClassConfig"] = world.pool_config_json();
        let value = spec["resourceClassConfig"]["small"][field].as_u64().expect("a number");
        spec["resourceClassConfig"]["small"][field] = (value * 2).into();
        let output = run(&world, &spec);
        assert_eq!(output.status.code(), Some(EXIT_INVALID_SPEC), "{field}: {}", context(&output));
        assert_eq!(
            error_of(&output),
            ("invalid-spec".to_string(), "resourceClassConfig.small.cpu".to_string()),
            "{field}: {}",
            context(&output)
        );
        assert_eq!(world_state(&world).await, before, "nothing written: {field}: {}", context(&output));
    }
}

#[tokio::test]
async fn without_the_pools_metadata_item_a_run_that_returns_instances_stops_before_any_write() {
    let world = shortfall_world("msg-no-config").await;
    world
        .clients
        .dynamodb
        .delete_item()
        .table_name(&world.table)
        .key("PK", AttributeValue::S("TYPE#METADATA".into()))
        .key("SK", AttributeValue::S("ID#resource_class_config".into()))
        .send()
        .await
        .expect("delete the pool configuration");
    let before = world_state(&world).await;
    // The attack: the spec brings its own queue (a real queue of this account, here the small
    // one for a large instance), which the engine used when the table had no item.
    let mut spec = world.spec_json("partial", 2);
    spec["resourceClassConfig"] =
        serde_json::json!({"large": {"cpu": 2, "mmem": 4096, "queueUrl": world.queues["small"]}});
    let output = run(&world, &spec);
    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{}", context(&output));
    assert_eq!(error_of(&output).0, "pool-config", "{}", context(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("resource_class_config"), "{}", context(&output));
    assert_eq!(world_state(&world).await, before, "nothing written: {}", context(&output));

    // A commit sends no message: it needs no pool configuration.
    let mut world = World::new("msg-no-config-commit").await;
    world.seed(&[Seed::claimed("large")], &[Seed::created("running")]).await;
    world
        .clients
        .dynamodb
        .delete_item()
        .table_name(&world.table)
        .key("PK", AttributeValue::S("TYPE#METADATA".into()))
        .key("SK", AttributeValue::S("ID#resource_class_config".into()))
        .send()
        .await
        .expect("delete the pool configuration");
    let output = run(&world, &world.spec_json("success", 1));
    assert_eq!(output.status.code(), Some(0), "{}", context(&output));
}
