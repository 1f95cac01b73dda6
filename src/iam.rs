//! The least-privilege IAM policies, generated from one table of what the code calls
//! (`post-provision iam-policy --role R --pool-tag-key K`).
//!
//! [`ACCESSES`] lists every function of `src/aws/` that calls AWS, the IAM actions its calls
//! need, the DynamoDB partitions (`PK`) it names, and which roles run it. A policy is that table
//! filtered by role: each DynamoDB action is allowed only on the partitions some function of
//! that role touches with it (a `dynamodb:LeadingKeys` condition), and `ec2:TerminateInstances`
//! only on instances that carry the pool tag in use. `tests/it/policy.rs` checks the table
//! against the source and `docs/iam-policy-*.json` and `docs/operations.md` against this module.
//!
//! Pure: no AWS, no I/O.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Whose policy: each command that touches AWS runs under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// A workflow's job: `run`, `resume RUN_ID`, `status`, `list`.
    Run,
    /// The scheduled sweeper: `resume --all` (and `list`, `status`).
    Sweeper,
    /// `audit` and `audit --fix` (a repair may resume a run, so it holds the sweeper's grants).
    Audit,
    /// `init`, once, by whoever sets the table up.
    Init,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 4] = [Role::Run, Role::Sweeper, Role::Audit, Role::Init];

    /// The name on the command line and in the policy file's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Run => "run",
            Role::Sweeper => "sweeper",
            Role::Audit => "audit",
            Role::Init => "init",
        }
    }

    /// The file under `docs/` that holds this role's policy (with the default pool tag).
    pub fn policy_file(self) -> String {
        format!("iam-policy-{}.json", self.as_str())
    }
}

/// What one function of `src/aws/` asks of IAM.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// The function in `src/aws/` (its name, unique there).
    pub function: &'static str,
    /// The IAM actions its calls need. `TransactWriteItems` is authorised item by item, so a
    /// function that builds transaction items names the item's action (`Put`, `Update`, `Delete`).
    pub actions: &'static [&'static str],
    /// The partitions (`TYPE#…`) it reads or writes, for DynamoDB item actions; empty otherwise.
    /// A partition of the run index (`RUN#…`, see [`RUN_INDEX`]) is a key of that index, which
    /// IAM names as a resource of its own.
    pub partitions: &'static [&'static str],
    /// The roles whose commands run it.
    pub roles: &'static [Role],
}

const DRIVING: &[Role] = &[Role::Run, Role::Sweeper, Role::Audit];
const RUN_ONLY: &[Role] = &[Role::Run];
const AUDIT_ONLY: &[Role] = &[Role::Audit];
const INIT_ONLY: &[Role] = &[Role::Init];
const RUN: &[&str] = &["TYPE#RUN"];
const RUNSPEC: &[&str] = &["TYPE#RUNSPEC"];
const INSTANCE: &[&str] = &["TYPE#INSTANCE"];
const METADATA: &[&str] = &["TYPE#METADATA"];
const RUNINDEX: &[&str] = &["TYPE#RUNINDEX"];
/// The run index's partitions, queried on the index itself (`list`, `resume --all`).
const INDEX_PARTITIONS: &[&str] = &["RUN#FINISHED", "RUN#UNFINISHED"];

/// The run index (a global secondary index of the table): its partitions are `RUN#…`.
pub const RUN_INDEX: &str = "post-provision-runs";

/// Every AWS call site, read from `src/aws/*.rs`. Driving a run (`run`, a resume by the sweeper,
/// or an audit repair that resumes one) reads its record, spec and the pool configuration,
/// replaces and renews its record, transitions and deletes instance records, sends pool messages
/// and terminates pool instances. Only creating a run puts spec chunks; only the audit reads
/// instance records and queue counts.
pub const ACCESSES: &[Access] = &[
    Access { function: "load_run", actions: &["dynamodb:GetItem"], partitions: RUN, roles: DRIVING },
    Access { function: "load_attempts", actions: &["dynamodb:Query"], partitions: RUN, roles: DRIVING },
    Access { function: "run_index_ready", actions: &["dynamodb:GetItem"], partitions: RUNINDEX, roles: DRIVING },
    Access {
        function: "query_index_partition",
        actions: &["dynamodb:Query"],
        partitions: INDEX_PARTITIONS,
        roles: DRIVING,
    },
    Access { function: "list_runs_unindexed", actions: &["dynamodb:Query"], partitions: RUN, roles: DRIVING },
    Access { function: "load_spec", actions: &["dynamodb:GetItem"], partitions: RUNSPEC, roles: DRIVING },
    Access {
        function: "load_resource_class_config",
        actions: &["dynamodb:GetItem"],
        partitions: METADATA,
        roles: DRIVING,
    },
    Access {
        function: "create_run",
        actions: &["dynamodb:PutItem"],
        partitions: &["TYPE#RUN", "TYPE#RUNSPEC"],
        roles: RUN_ONLY,
    },
    // A small rollback whose spec carries the pool's configuration checks it in its create.
    Access {
        function: "pool_guard_check",
        actions: &["dynamodb:ConditionCheckItem"],
        partitions: METADATA,
        roles: RUN_ONLY,
    },
    // A run that returns instances reads their records first: the pool says what each one is.
    Access {
        function: "load_instance_facts",
        actions: &["dynamodb:BatchGetItem"],
        partitions: INSTANCE,
        roles: RUN_ONLY,
    },
    Access { function: "put_run", actions: &["dynamodb:PutItem"], partitions: RUN, roles: DRIVING },
    Access { function: "renew_lease", actions: &["dynamodb:UpdateItem"], partitions: RUN, roles: DRIVING },
    // The fence: every instance transaction checks the run record.
    Access { function: "fence_check", actions: &["dynamodb:ConditionCheckItem"], partitions: RUN, roles: DRIVING },
    // The fence's second check: the attempt of the run the driver does not know of has no record.
    Access {
        function: "unknown_attempt_check",
        actions: &["dynamodb:ConditionCheckItem"],
        partitions: RUN,
        roles: DRIVING,
    },
    // A commit transaction's fence: the same condition on an `Update` recording the committed ids.
    Access { function: "fence_update", actions: &["dynamodb:UpdateItem"], partitions: RUN, roles: DRIVING },
    Access { function: "transition_item", actions: &["dynamodb:UpdateItem"], partitions: INSTANCE, roles: DRIVING },
    Access { function: "deletion_items", actions: &["dynamodb:DeleteItem"], partitions: INSTANCE, roles: DRIVING },
    // A cleanup's last deletions carry the run's terminal record, a versioned `Put`.
    Access { function: "delete_finishing", actions: &["dynamodb:PutItem"], partitions: RUN, roles: DRIVING },
    Access { function: "send", actions: &["sqs:SendMessage"], partitions: &[], roles: DRIVING },
    Access { function: "describe_tags", actions: &["ec2:DescribeInstances"], partitions: &[], roles: DRIVING },
    Access { function: "terminate_once", actions: &["ec2:TerminateInstances"], partitions: &[], roles: DRIVING },
    Access {
        function: "audit_instance_records",
        actions: &["dynamodb:Query"],
        partitions: INSTANCE,
        roles: AUDIT_ONLY,
    },
    Access { function: "audit_run_records", actions: &["dynamodb:Query"], partitions: RUN, roles: AUDIT_ONLY },
    Access { function: "audit_record_exists", actions: &["dynamodb:GetItem"], partitions: INSTANCE, roles: AUDIT_ONLY },
    Access { function: "audit_mark_announced", actions: &["dynamodb:UpdateItem"], partitions: RUN, roles: AUDIT_ONLY },
    Access {
        function: "audit_delete_record",
        actions: &["dynamodb:DeleteItem"],
        partitions: INSTANCE,
        roles: AUDIT_ONLY,
    },
    Access { function: "describe_matching", actions: &["ec2:DescribeInstances"], partitions: &[], roles: AUDIT_ONLY },
    Access {
        function: "audit_queue_messages",
        actions: &["sqs:GetQueueAttributes"],
        partitions: &[],
        roles: AUDIT_ONLY,
    },
    Access {
        function: "ensure_table",
        actions: &["dynamodb:DescribeTable", "dynamodb:CreateTable"],
        partitions: &[],
        roles: INIT_ONLY,
    },
    Access {
        function: "ensure_ttl",
        actions: &["dynamodb:DescribeTimeToLive", "dynamodb:UpdateTimeToLive"],
        partitions: &[],
        roles: INIT_ONLY,
    },
    Access { function: "index_status", actions: &["dynamodb:DescribeTable"], partitions: &[], roles: INIT_ONLY },
    Access {
        function: "create_index_if_missing",
        actions: &["dynamodb:UpdateTable"],
        partitions: &[],
        roles: INIT_ONLY,
    },
    // init gives records written before the run index their index keys, then marks it ready.
    Access {
        function: "backfill",
        actions: &["dynamodb:Query", "dynamodb:UpdateItem"],
        partitions: RUN,
        roles: INIT_ONLY,
    },
    Access { function: "ensure_run_index", actions: &["dynamodb:PutItem"], partitions: RUNINDEX, roles: INIT_ONLY },
];

/// The pool tag key as IAM may name it in `aws:ResourceTag/<key>`: EC2's tag-key characters
/// (letters, digits, spaces and `_ . : / = + - @`), 1 to 128 of them, and not the reserved
/// `aws:` prefix. Anything else would break the condition or widen it.
pub fn check_tag_key(key: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_alphanumeric() || " _.:/=+-@".contains(c);
    if key.is_empty() || key.chars().count() > 128 {
        return Err(format!("the pool tag key must be 1 to 128 characters, got {}", key.chars().count()));
    }
    if let Some(bad) = key.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "the pool tag key may hold only letters, digits, spaces and _ . : / = + - @, not {:?}",
            bad.escape_default().to_string()
        ));
    }
    if key.to_ascii_lowercase().starts_with("aws:") {
        return Err("the pool tag key cannot start with the reserved prefix aws:".into());
    }
    Ok(())
}

/// The actions `role` needs, each with the partitions it may touch (empty: not a DynamoDB
/// item action), in a stable order.
pub fn grants(role: Role) -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut grants: BTreeMap<&'static str, Vec<&'static str>> = BTreeMap::new();
    for access in ACCESSES.iter().filter(|access| access.roles.contains(&role)) {
        for action in access.actions {
            let partitions = grants.entry(action).or_default();
            partitions.extend(access.partitions);
            partitions.sort_unstable();
            partitions.dedup();
        }
    }
    grants
}

/// The statements that grant one action: on the table's partitions, and on the run index's
/// partitions (a resource of its own).
fn statements(action: &str, partitions: &[&str], pool_tag_key: &str) -> Vec<Value> {
    let (index, table): (Vec<&str>, Vec<&str>) = partitions.iter().partition(|p| !p.starts_with("TYPE#"));
    let mut statements = Vec::new();
    if !table.is_empty() || index.is_empty() {
        statements.push(statement(action, &table, pool_tag_key));
    }
    if !index.is_empty() {
        let name = action.split_once(':').expect("actions are service:Name").1;
        statements.push(json!({
            "Sid": format!("{name}TheRunIndex"),
            "Effect": "Allow",
            "Action": [action],
            "Resource": format!("arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/index/{RUN_INDEX}"),
            "Condition": {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": index}},
        }));
    }
    statements
}

/// The statement that grants one action, with the resource and condition that narrow it.
fn statement(action: &str, partitions: &[&str], pool_tag_key: &str) -> Value {
    let (service, name) = action.split_once(':').expect("actions are service:Name");
    match service {
        "dynamodb" if partitions.is_empty() => json!({
            "Sid": format!("{name}OnTheTable"),
            "Effect": "Allow",
            "Action": [action],
            "Resource": "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE",
        }),
        "dynamodb" => {
            let named: Vec<String> =
                partitions.iter().map(|p| p.trim_start_matches("TYPE#").to_ascii_lowercase()).collect();
            json!({
                "Sid": format!("{name}Only{}", named.iter().map(|n| capitalised(n)).collect::<String>()),
                "Effect": "Allow",
                "Action": [action],
                "Resource": "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE",
                "Condition": {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": partitions}},
            })
        }
        "sqs" => json!({
            "Sid": format!("{name}OnPoolQueues"),
            "Effect": "Allow",
            "Action": [action],
            "Resource": "arn:aws:sqs:REGION:ACCOUNT:POOL_QUEUE_PREFIX*",
        }),
        "ec2" if name == "TerminateInstances" => json!({
            "Sid": "TerminateInstancesWithThePoolTagOnly",
            "Effect": "Allow",
            "Action": [action],
            "Resource": "arn:aws:ec2:REGION:ACCOUNT:instance/*",
            "Condition": {"Null": {format!("aws:ResourceTag/{pool_tag_key}"): "false"}},
        }),
        // Describe actions have no resource-level permissions: only "*" works.
        "ec2" => json!({"Sid": name, "Effect": "Allow", "Action": [action], "Resource": "*"}),
        other => unreachable!("no statement shape for service {other}"),
    }
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|first| first.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
}

/// The policy document of `role`, with placeholders `REGION`, `ACCOUNT`, `TABLE` and
/// `POOL_QUEUE_PREFIX`, and the pool tag `pool_tag_key` in the terminate condition.
pub fn policy(role: Role, pool_tag_key: &str) -> Result<Value, String> {
    check_tag_key(pool_tag_key)?;
    let statements: Vec<Value> =
        grants(role).iter().flat_map(|(action, partitions)| statements(action, partitions, pool_tag_key)).collect();
    Ok(json!({"Version": "2012-10-17", "Statement": statements}))
}

/// [`policy`] as the pretty JSON text the docs hold, with a final newline.
pub fn policy_text(role: Role, pool_tag_key: &str) -> Result<String, String> {
    let value = policy(role, pool_tag_key)?;
    Ok(serde_json::to_string_pretty(&value).expect("a policy serializes") + "\n")
}

/// The Markdown table `docs/operations.md` shows: one row per action, one column per role,
/// each cell the partitions (or `yes`) that role is granted.
pub fn markdown_table() -> String {
    let roles = [Role::Run, Role::Sweeper, Role::Audit, Role::Init];
    let per_role: Vec<BTreeMap<&str, Vec<&str>>> = roles.iter().map(|role| grants(*role)).collect();
    let mut actions: Vec<&str> = per_role.iter().flat_map(|grants| grants.keys().copied()).collect();
    actions.sort_unstable();
    actions.dedup();
    let mut text = String::from("| action | run | sweeper | audit | init |\n|---|---|---|---|---|\n");
    for action in actions {
        let cells: Vec<String> = per_role
            .iter()
            .map(|grants| match grants.get(action) {
                None => "".to_string(),
                Some(partitions) if partitions.is_empty() => "yes".to_string(),
                Some(partitions) => partitions.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", "),
            })
            .collect();
        text.push_str(&format!("| `{action}` | {} |\n", cells.join(" | ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_terminate_condition_names_the_pool_tag_in_use() {
        let policy = policy(Role::Run, "pool-member").unwrap();
        let terminate = policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Action"][0] == "ec2:TerminateInstances")
            .cloned()
            .unwrap();
        assert_eq!(terminate["Condition"]["Null"]["aws:ResourceTag/pool-member"], "false");
        assert!(!policy.to_string().contains("InitialRunId"));
    }

    #[test]
    fn a_tag_key_that_would_break_or_widen_the_condition_is_refused() {
        for bad in ["", "a\"b", "a*", "Initial?", "aws:cloudformation:stack-name", "x\ny", &"k".repeat(129)] {
            assert!(policy(Role::Run, bad).is_err(), "{bad:?}");
        }
        for good in ["InitialRunId", "pool/member", "team:pool=1", "a b"] {
            assert!(policy(Role::Run, good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn only_creating_a_run_puts_spec_chunks_and_only_the_audit_reads_instance_records() {
        let run = grants(Role::Run);
        let sweeper = grants(Role::Sweeper);
        let audit = grants(Role::Audit);
        assert_eq!(run["dynamodb:PutItem"], vec!["TYPE#RUN", "TYPE#RUNSPEC"]);
        assert_eq!(sweeper["dynamodb:PutItem"], vec!["TYPE#RUN"]);
        assert_eq!(run["dynamodb:DeleteItem"], vec!["TYPE#INSTANCE"]);
        assert_eq!(run["dynamodb:Query"], vec!["RUN#FINISHED", "RUN#UNFINISHED", "TYPE#RUN"]);
        assert_eq!(audit["dynamodb:Query"], vec!["RUN#FINISHED", "RUN#UNFINISHED", "TYPE#INSTANCE", "TYPE#RUN"]);
        // The fence, and a small rollback's check of the pool's configuration in its create.
        assert_eq!(run["dynamodb:ConditionCheckItem"], vec!["TYPE#METADATA", "TYPE#RUN"]);
        assert_eq!(sweeper["dynamodb:ConditionCheckItem"], vec!["TYPE#RUN"]);
        assert!(!run.contains_key("sqs:GetQueueAttributes") && audit.contains_key("sqs:GetQueueAttributes"));
        let init = grants(Role::Init);
        assert!(init.keys().all(|action| action.starts_with("dynamodb:")));
        // init writes only run records' index keys and the readiness item.
        assert_eq!(init["dynamodb:UpdateItem"], vec!["TYPE#RUN"]);
        assert_eq!(init["dynamodb:PutItem"], vec!["TYPE#RUNINDEX"]);
    }

    #[test]
    fn the_run_index_is_queried_on_its_own_resource_by_its_own_partitions() {
        let policy = policy(Role::Sweeper, "InitialRunId").unwrap();
        let queries: Vec<&Value> =
            policy["Statement"].as_array().unwrap().iter().filter(|s| s["Action"][0] == "dynamodb:Query").collect();
        assert_eq!(queries.len(), 2, "{queries:?}");
        let index = queries.iter().find(|s| s["Resource"].as_str().unwrap().ends_with("/index/post-provision-runs"));
        let keys =
            &index.expect("a statement on the index")["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"];
        assert_eq!(keys, &json!(["RUN#FINISHED", "RUN#UNFINISHED"]));
    }
}
