//! `docs/iam-policy.json` grants exactly the actions the code's AWS calls need: every SDK
//! operation the adapters call (found in the source of src/aws/) maps to IAM actions, and the
//! policy's actions are exactly the union. A new call without a policy change fails here.

use std::collections::BTreeSet;

/// IAM actions an SDK operation needs. TransactWriteItems is authorized per item: our
/// transactions carry Update, Delete and (creating a run with its spec chunks) Put actions.
fn iam_actions(service: &str, operation: &str) -> Option<Vec<&'static str>> {
    let actions: &[&str] = match (service, operation) {
        ("dynamodb", "get_item") => &["dynamodb:GetItem"],
        ("dynamodb", "put_item") => &["dynamodb:PutItem"],
        ("dynamodb", "query") => &["dynamodb:Query"],
        ("dynamodb", "update_item") => &["dynamodb:UpdateItem"],
        ("dynamodb", "transact_write_items") => &["dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:PutItem"],
        ("dynamodb", "describe_table") => &["dynamodb:DescribeTable"],
        ("dynamodb", "wait_until_table_exists") => &["dynamodb:DescribeTable"],
        ("dynamodb", "create_table") => &["dynamodb:CreateTable"],
        ("dynamodb", "describe_time_to_live") => &["dynamodb:DescribeTimeToLive"],
        ("dynamodb", "update_time_to_live") => &["dynamodb:UpdateTimeToLive"],
        ("sqs", "send_message_batch") => &["sqs:SendMessage"],
        ("ec2", "terminate_instances") => &["ec2:TerminateInstances"],
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
        for (prefix, service) in [("self.dynamodb.", "dynamodb"), ("self.sqs.", "sqs"), ("self.ec2.", "ec2"), ("client.", "dynamodb")] {
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

#[test]
fn the_iam_policy_grants_exactly_what_the_code_calls() {
    let operations = operations_in_source();
    assert!(operations.contains(&("ec2".to_string(), "terminate_instances".to_string())), "{operations:?}");
    let mut needed = BTreeSet::new();
    for (service, operation) in &operations {
        let actions = iam_actions(service, operation)
            .unwrap_or_else(|| panic!("{service}.{operation} is called but has no IAM mapping: add it here and to docs/iam-policy.json"));
        needed.extend(actions.into_iter().map(String::from));
    }
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/iam-policy.json")).expect("policy"),
    )
    .expect("policy is JSON");
    let granted: BTreeSet<String> = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .flat_map(|statement| statement["Action"].as_array().expect("actions").iter())
        .map(|action| action.as_str().expect("action string").to_string())
        .collect();
    assert_eq!(granted, needed, "docs/iam-policy.json must grant exactly the actions the code needs");
    assert!(granted.iter().all(|a| !a.contains('*')), "no wildcard actions");
}
