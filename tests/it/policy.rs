//! `docs/iam-policy.json` (runs) and `docs/iam-policy-init.json` (`init`) grant exactly the
//! actions the code's AWS calls need: every SDK
//! operation the adapters call (found in the source of src/aws/) maps to IAM actions, and the
//! policy's actions are exactly the union. A new call without a policy change fails here. The
//! conditions are checked too: DynamoDB writes only to the run, spec and instance partitions and
//! reads only the run, spec, pool-configuration and (for `audit`) instance partitions
//! (`dynamodb:LeadingKeys`), and
//! `ec2:TerminateInstances` only on instances that carry the pool tag `InitialRunId`.

use std::collections::BTreeSet;

/// IAM actions an SDK operation needs. TransactWriteItems is authorized per item: our
/// transactions carry Update, Delete and (creating a run with its spec chunks) Put actions.
fn iam_actions(service: &str, operation: &str) -> Option<Vec<&'static str>> {
    let actions: &[&str] = match (service, operation) {
        ("dynamodb", "get_item") => &["dynamodb:GetItem"],
        ("dynamodb", "batch_get_item") => &["dynamodb:BatchGetItem"],
        ("dynamodb", "put_item") => &["dynamodb:PutItem"],
        ("dynamodb", "delete_item") => &["dynamodb:DeleteItem"],
        ("dynamodb", "query") => &["dynamodb:Query"],
        ("dynamodb", "update_item") => &["dynamodb:UpdateItem"],
        // The fence: every instance transaction checks the run record (`ConditionCheck`).
        ("dynamodb", "transact_write_items") => {
            &["dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:PutItem", "dynamodb:ConditionCheckItem"]
        }
        ("dynamodb", "describe_table") => &["dynamodb:DescribeTable"],
        ("dynamodb", "wait_until_table_exists") => &["dynamodb:DescribeTable"],
        ("dynamodb", "create_table") => &["dynamodb:CreateTable"],
        ("dynamodb", "describe_time_to_live") => &["dynamodb:DescribeTimeToLive"],
        ("dynamodb", "update_time_to_live") => &["dynamodb:UpdateTimeToLive"],
        ("sqs", "send_message_batch") => &["sqs:SendMessage"],
        ("sqs", "get_queue_attributes") => &["sqs:GetQueueAttributes"],
        ("ec2", "terminate_instances") => &["ec2:TerminateInstances"],
        ("ec2", "describe_instances") => &["ec2:DescribeInstances"],
        _ => return None,
    };
    Some(actions.to_vec())
}

/// `(service, operation)` of every SDK call in the adapters: `self.<client>.<op>()` and, in
/// functions handed a bare DynamoDB client, `client.<op>()`.
fn operations_in_source() -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/aws");
    for entry in std::fs::read_dir(dir).expect("src/aws") {
        let path = entry.expect("entry").path();
        let source = std::fs::read_to_string(&path).expect("read source");
        let compact: String = source.chars().filter(|c| !c.is_whitespace()).collect();
        for (prefix, service) in
            [("self.dynamodb.", "dynamodb"), ("self.sqs.", "sqs"), ("self.ec2.", "ec2"), ("client.", "dynamodb")]
        {
            let mut rest = compact.as_str();
            while let Some(at) = rest.find(prefix) {
                rest = &rest[at + prefix.len()..];
                let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if rest[name.len()..].starts_with("()") && !name.is_empty() {
                    found.insert((service.to_string(), name));
                }
            }
        }
    }
    found
}

/// Operations only `post-provision init` calls: granted by docs/iam-policy-init.json, so the
/// role that drives runs never holds CreateTable or UpdateTimeToLive.
const INIT_ONLY: [&str; 5] =
    ["describe_table", "create_table", "describe_time_to_live", "update_time_to_live", "wait_until_table_exists"];

fn policy(policy_file: &str) -> serde_json::Value {
    let path = format!("{}/docs/{policy_file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("policy")).expect("policy is JSON")
}

fn granted(policy_file: &str) -> BTreeSet<String> {
    policy(policy_file)["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .flat_map(|statement| statement["Action"].as_array().expect("actions").iter())
        .map(|action| action.as_str().expect("action string").to_string())
        .collect()
}

#[test]
fn the_iam_policies_grant_exactly_what_the_code_calls() {
    let operations = operations_in_source();
    assert!(operations.contains(&("ec2".to_string(), "terminate_instances".to_string())), "{operations:?}");
    assert!(operations.contains(&("ec2".to_string(), "describe_instances".to_string())), "the pool-tag check");
    let (mut runtime, mut init) = (BTreeSet::new(), BTreeSet::new());
    for (service, operation) in &operations {
        let actions = iam_actions(service, operation).unwrap_or_else(|| {
            panic!("{service}.{operation} is called but has no IAM mapping: add it here and to docs/iam-policy*.json")
        });
        let target = if INIT_ONLY.contains(&operation.as_str()) { &mut init } else { &mut runtime };
        target.extend(actions.into_iter().map(String::from));
    }
    assert_eq!(granted("iam-policy.json"), runtime, "docs/iam-policy.json must grant exactly what driving runs needs");
    assert_eq!(granted("iam-policy-init.json"), init, "docs/iam-policy-init.json must grant exactly what init needs");
    assert!(
        granted("iam-policy.json").iter().chain(granted("iam-policy-init.json").iter()).all(|a| !a.contains('*')),
        "no wildcard actions"
    );
}

/// The statements of the run policy that grant `action`.
fn statements_granting(action: &str) -> Vec<serde_json::Value> {
    policy("iam-policy.json")["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|statement| statement["Action"].as_array().expect("actions").iter().any(|a| a == action))
        .cloned()
        .collect()
}

/// The partitions a statement's `dynamodb:LeadingKeys` condition allows; None without one.
fn leading_keys(statement: &serde_json::Value) -> Option<BTreeSet<String>> {
    let keys = statement["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"].as_array()?;
    Some(keys.iter().map(|key| key.as_str().expect("key").to_string()).collect())
}

#[test]
fn dynamodb_access_is_limited_to_the_partitions_runs_use() {
    let set = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();
    let writes = set(&["TYPE#RUN", "TYPE#RUNSPEC", "TYPE#INSTANCE"]);
    // `audit` reads the instance partition too (one paged Query of TYPE#INSTANCE), and a run
    // that returns instances reads their records first (BatchGetItem of TYPE#INSTANCE).
    let reads = set(&["TYPE#RUN", "TYPE#RUNSPEC", "TYPE#METADATA", "TYPE#INSTANCE"]);
    for (action, allowed) in [
        ("dynamodb:PutItem", &writes),
        ("dynamodb:ConditionCheckItem", &writes),
        ("dynamodb:UpdateItem", &writes),
        ("dynamodb:DeleteItem", &writes),
        ("dynamodb:GetItem", &reads),
        ("dynamodb:BatchGetItem", &reads),
        ("dynamodb:Query", &reads),
    ] {
        let statements = statements_granting(action);
        assert!(!statements.is_empty(), "{action} is granted");
        for statement in statements {
            let keys = leading_keys(&statement)
                .unwrap_or_else(|| panic!("{action} is granted without a dynamodb:LeadingKeys condition: {statement}"));
            assert_eq!(&keys, allowed, "{action}: {statement}");
        }
    }
    // The source names exactly these partitions (`key("RUN", …)`, `s("TYPE#RUN")`): a new one
    // needs a policy change.
    let source = ["/src/aws/dynamodb.rs", "/src/aws/audit.rs"]
        .iter()
        .map(|file| std::fs::read_to_string(format!("{}{file}", env!("CARGO_MANIFEST_DIR"))).expect("source"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = BTreeSet::new();
    for (prefix, stop) in [("key(\"", '"'), ("\"TYPE#", '"')] {
        let mut rest = source.as_str();
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let name: String = rest.chars().take_while(|c| *c != stop).collect();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase()) {
                used.insert(format!("TYPE#{name}"));
            }
        }
    }
    let union: BTreeSet<String> = writes.union(&reads).cloned().collect();
    assert!(!used.is_empty() && used.is_subset(&union), "partitions in the source {used:?}, in the policy {union:?}");
}

#[test]
fn instances_are_terminated_only_when_they_carry_the_pool_tag() {
    for statement in statements_granting("ec2:TerminateInstances") {
        let tag = &statement["Condition"]["Null"]["aws:ResourceTag/InitialRunId"];
        assert_eq!(tag, "false", "TerminateInstances without the InitialRunId tag condition: {statement}");
    }
    let describe = statements_granting("ec2:DescribeInstances");
    assert_eq!(describe.len(), 1);
    // DescribeInstances has no resource-level permissions: only "*" works.
    assert_eq!(describe[0]["Resource"], "*");
}
