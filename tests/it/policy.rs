//! The IAM policies are as narrow as the code. `src/iam.rs` holds one table of every function in
//! `src/aws/` that calls AWS, the IAM actions and DynamoDB partitions it needs, and the roles
//! that run it; the policies are generated from it (`post-provision iam-policy`). Here:
//! - the table equals the source: each function's SDK calls (and the transaction items it
//!   builds) map to exactly its actions, and the partitions it names (`key("RUN", …)`,
//!   `"TYPE#RUN"`, a run record built by `record_item`) to exactly its partitions; a new call, a
//!   new partition or a stale row fails here;
//! - `docs/iam-policy-<role>.json` are exactly what the CLI prints for each role, and the
//!   terminate condition names the `--pool-tag-key` given;
//! - `docs/operations.md` shows exactly the generated table of grants.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use post_provision::iam::{self, Role};

/// IAM actions an SDK call needs. `TransactWriteItems` needs none of its own: it is authorised
/// per item, by the `Put`/`Update`/`Delete` builders below.
fn iam_actions(call: &str) -> Option<&'static [&'static str]> {
    let actions: &[&str] = match call {
        "get_item" => &["dynamodb:GetItem"],
        "batch_get_item" => &["dynamodb:BatchGetItem"],
        "put_item" | "Put::builder" => &["dynamodb:PutItem"],
        "update_item" | "Update::builder" => &["dynamodb:UpdateItem"],
        "delete_item" | "Delete::builder" => &["dynamodb:DeleteItem"],
        "ConditionCheck::builder" => &["dynamodb:ConditionCheckItem"],
        "query" => &["dynamodb:Query"],
        "transact_write_items" => &[],
        "describe_table" | "wait_until_table_exists" => &["dynamodb:DescribeTable"],
        "create_table" => &["dynamodb:CreateTable"],
        "describe_time_to_live" => &["dynamodb:DescribeTimeToLive"],
        "update_time_to_live" => &["dynamodb:UpdateTimeToLive"],
        "update_table" => &["dynamodb:UpdateTable"],
        "send_message_batch" | "send_message" => &["sqs:SendMessage"],
        "get_queue_attributes" => &["sqs:GetQueueAttributes"],
        "terminate_instances" => &["ec2:TerminateInstances"],
        "describe_instances" => &["ec2:DescribeInstances"],
        _ => return None,
    };
    Some(actions)
}

/// What one function of `src/aws/` does, read from its text.
#[derive(Debug, Default, PartialEq, Eq)]
struct Calls {
    actions: BTreeSet<String>,
    partitions: BTreeSet<String>,
}

/// The functions of `source`, each with the text up to the next one (nested closures are not
/// functions, so a body stays whole).
fn functions(source: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    for line in source.lines() {
        let trimmed = line.trim_start();
        let rest = ["pub(crate) async fn ", "pub async fn ", "async fn ", "pub(crate) fn ", "pub fn ", "fn "]
            .iter()
            .find_map(|prefix| trimmed.strip_prefix(prefix));
        if let Some(rest) = rest {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.push((name, String::new()));
        }
        if let Some((_, body)) = found.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    found
}

/// The SDK calls and partitions one function's text names.
fn calls_in(body: &str) -> Calls {
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let mut calls = Calls::default();
    let mut add = |call: &str| {
        let actions = iam_actions(call).unwrap_or_else(|| panic!("{call} is called but has no IAM mapping here"));
        calls.actions.extend(actions.iter().map(|a| a.to_string()));
    };
    for prefix in ["self.dynamodb.", "self.sqs.", "self.ec2.", "client."] {
        let mut rest = compact.as_str();
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !name.is_empty() && rest[name.len()..].starts_with("()") {
                add(&name);
            }
        }
    }
    for builder in ["Put::builder", "Update::builder", "Delete::builder", "ConditionCheck::builder"] {
        // The transaction item's own builder, not one whose name ends the same
        // (`GlobalSecondaryIndexUpdate::builder` builds no item).
        let call = format!("{builder}()");
        let mut found = compact.match_indices(&call).map(|(at, _)| compact[..at].chars().next_back());
        if found.any(|before| !before.is_some_and(|c| c.is_alphanumeric() || c == '_')) {
            add(builder);
        }
    }
    for (prefix, stop) in [("key(\"", '"'), ("\"TYPE#", '"')] {
        let mut rest = compact.as_str();
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let name: String = rest.chars().take_while(|c| *c != stop).collect();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase()) {
                calls.partitions.insert(format!("TYPE#{name}"));
            }
        }
    }
    // The run index's readiness item, and the index's own partitions.
    if compact.contains("ready_key()") && !compact.contains("fnready_key()") {
        calls.partitions.insert("TYPE#RUNINDEX".into());
    }
    if compact.contains(".index_name(RUN_INDEX_NAME)") && calls.actions.contains("dynamodb:Query") {
        calls.partitions.extend(["RUN#FINISHED".to_string(), "RUN#UNFINISHED".to_string()]);
    }
    // A run record's item carries its key from `record_item`.
    if compact.contains("record_item(") && !compact.contains("fnrecord_item(") {
        calls.partitions.insert("TYPE#RUN".into());
    }
    calls
}

/// Every function of `src/aws/` that calls AWS, by name.
fn calls_in_source() -> BTreeMap<String, Calls> {
    let mut found = BTreeMap::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/aws");
    for entry in std::fs::read_dir(dir).expect("src/aws") {
        let source = std::fs::read_to_string(entry.expect("entry").path()).expect("read source");
        let source = source.split("#[cfg(test)]").next().expect("text");
        for (name, body) in functions(source) {
            let calls = calls_in(&body);
            if !calls.actions.is_empty() {
                assert!(found.insert(name.clone(), calls).is_none(), "two functions named {name} in src/aws");
            }
        }
    }
    found
}

#[test]
fn the_iam_table_lists_exactly_the_calls_in_the_source() {
    let source = calls_in_source();
    assert!(source.contains_key("terminate_once") && source.contains_key("create_run"), "{source:?}");
    let table: BTreeMap<String, Calls> = iam::ACCESSES
        .iter()
        .map(|access| {
            let calls = Calls {
                actions: access.actions.iter().map(|a| a.to_string()).collect(),
                partitions: access.partitions.iter().map(|p| p.to_string()).collect(),
            };
            (access.function.to_string(), calls)
        })
        .collect();
    assert_eq!(table.len(), iam::ACCESSES.len(), "one row per function");
    for (function, calls) in &source {
        assert_eq!(
            table.get(function),
            Some(calls),
            "src/aws {function} calls AWS as shown; src/iam.rs ACCESSES must say the same (and give its roles)"
        );
    }
    let stale: Vec<&String> = table.keys().filter(|f| !source.contains_key(*f)).collect();
    assert!(stale.is_empty(), "src/iam.rs lists functions that call no AWS (any more): {stale:?}");
    // A DynamoDB item action is always narrowed by partition; nothing else is.
    for access in iam::ACCESSES {
        let item_action =
            access.actions.iter().any(|a| a.starts_with("dynamodb:") && (a.ends_with("Item") || a.ends_with(":Query")));
        assert_eq!(item_action, !access.partitions.is_empty(), "{access:?}");
        assert!(!access.roles.is_empty(), "{access:?}");
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(crate::harness::cli_binary())
        .args(args)
        .env_remove("POST_PROVISION_POOL_TAG_KEY")
        .output()
        .expect("the CLI runs")
}

fn doc(file: &str) -> String {
    std::fs::read_to_string(format!("{}/docs/{file}", env!("CARGO_MANIFEST_DIR"))).expect("doc file")
}

#[test]
fn the_policy_files_are_what_the_cli_generates() {
    for role in Role::ALL {
        let output = cli(&["iam-policy", "--role", role.as_str()]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let printed = String::from_utf8(output.stdout).expect("utf-8");
        assert_eq!(
            doc(&role.policy_file()),
            printed,
            "docs/{} is stale: regenerate it with `post-provision iam-policy --role {}`",
            role.policy_file(),
            role.as_str()
        );
    }
    // The terminate condition names the pool tag in use.
    let output = cli(&["iam-policy", "--pool-tag-key", "team/pool-member"]);
    let policy: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let text = policy.to_string();
    assert!(text.contains(r#""Null":{"aws:ResourceTag/team/pool-member":"false"}"#), "{text}");
    assert!(!text.contains("InitialRunId"), "{text}");
    // A key that would break or widen the condition is a usage error; nothing is printed on stdout.
    for bad in ["Initial*", "a\"}", "aws:x", ""] {
        let output = cli(&["iam-policy", "--pool-tag-key", bad]);
        assert_eq!(output.status.code(), Some(64), "{bad:?}");
        assert!(output.stdout.is_empty(), "{bad:?}");
    }
}

/// The partitions one action is allowed on in a policy file; None when it is not granted.
fn leading_keys(file: &str, action: &str) -> Option<BTreeSet<String>> {
    let policy: serde_json::Value = serde_json::from_str(&doc(file)).expect("JSON");
    let statements: Vec<serde_json::Value> = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Action"].as_array().expect("actions").iter().any(|a| a == action))
        // The run index is a resource of its own, with its own partitions (`src/iam.rs` tests it).
        .filter(|s| !s["Resource"].as_str().is_some_and(|r| r.contains("/index/")))
        .cloned()
        .collect();
    if statements.is_empty() {
        return None;
    }
    assert_eq!(statements.len(), 1, "{action} in one statement");
    let keys = statements[0]["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"]
        .as_array()
        .unwrap_or_else(|| panic!("{action} without a dynamodb:LeadingKeys condition in {file}"));
    Some(keys.iter().map(|k| k.as_str().expect("key").to_string()).collect())
}

#[test]
fn each_role_writes_only_the_partitions_its_commands_write() {
    let set = |keys: &[&str]| Some(keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>());
    let run = "iam-policy-run.json";
    let sweeper = "iam-policy-sweeper.json";
    let audit = "iam-policy-audit.json";
    // The engine never puts an instance record, and only creating a run puts spec chunks.
    assert_eq!(leading_keys(run, "dynamodb:PutItem"), set(&["TYPE#RUN", "TYPE#RUNSPEC"]));
    assert_eq!(leading_keys(sweeper, "dynamodb:PutItem"), set(&["TYPE#RUN"]));
    // Spec chunks are never updated or deleted (they expire by TTL).
    for file in [run, sweeper, audit] {
        assert_eq!(leading_keys(file, "dynamodb:UpdateItem"), set(&["TYPE#INSTANCE", "TYPE#RUN"]), "{file}");
        assert_eq!(leading_keys(file, "dynamodb:DeleteItem"), set(&["TYPE#INSTANCE"]), "{file}");
        assert_eq!(
            leading_keys(file, "dynamodb:GetItem").map(|keys| keys.is_superset(&set(&["TYPE#RUN"]).unwrap())),
            Some(true)
        );
    }
    // The audit's reads of every instance record are the audit's only.
    assert_eq!(leading_keys(run, "dynamodb:Query"), set(&["TYPE#RUN"]));
    assert_eq!(leading_keys(sweeper, "dynamodb:Query"), set(&["TYPE#RUN"]));
    assert_eq!(leading_keys(audit, "dynamodb:Query"), set(&["TYPE#INSTANCE", "TYPE#RUN"]));
    // Listings read the run index's readiness item.
    assert_eq!(
        leading_keys(run, "dynamodb:GetItem"),
        set(&["TYPE#METADATA", "TYPE#RUN", "TYPE#RUNINDEX", "TYPE#RUNSPEC"])
    );
    assert!(!doc(run).contains("GetQueueAttributes") && doc(audit).contains("GetQueueAttributes"));
    // init's table actions are nobody else's.
    for file in [run, sweeper, audit] {
        assert!(!doc(file).contains("CreateTable") && !doc(file).contains("TimeToLive"), "{file}");
    }
    assert!(doc("iam-policy-init.json").contains("CreateTable"));
}

#[test]
fn operations_md_shows_the_generated_grants() {
    // The table sits in a list item: compared without its indentation.
    let operations: String = doc("operations.md").lines().map(|line| line.trim_start().to_string() + "\n").collect();
    let table = iam::markdown_table();
    assert!(
        operations.contains(&table),
        "docs/operations.md must hold the table of grants exactly as `iam::markdown_table()` renders it:\n{table}"
    );
    for role in Role::ALL {
        let file = role.policy_file();
        assert!(operations.contains(&format!("[`{file}`]({file})")), "operations.md links {file}");
    }
}
