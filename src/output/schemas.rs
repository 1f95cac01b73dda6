//! The JSON Schemas in `docs/schemas/`, derived from the types with `schemars`: the spec's
//! ([`crate::spec::Spec`], its limits from `spec.rs`'s constants) and every printed result's
//! ([`super::results`], [`crate::audit::AuditReport`]). A unit test compares the files with what
//! the types derive; `POST_PROVISION_WRITE_SCHEMAS=1 cargo test --lib schemas` rewrites them.

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use super::results::{ErrorReport, InitResult, ListRow, ResumeAllEntry, RunReport, ValidateResult};
use crate::audit::AuditReport;
use crate::driver::OutcomeKind;
use crate::machine::ALL_STATES;
use crate::spec::{Spec, MAX_SPEC_FILE_BYTES};

/// Where the schemas say they live (`$id`).
const BASE_ID: &str = "https://post-provision.dev/schemas/";

/// The schema of a run state (for fields of [`crate::machine::State`], which has no schema of
/// its own): one of its names.
pub(crate) fn state(_: &mut SchemaGenerator) -> Schema {
    let names: Vec<&str> = ALL_STATES.iter().map(|state| state.name()).collect();
    json_schema!({ "enum": names })
}

/// The schema of a list of run states.
pub(crate) fn states(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "array", "items": state(generator) })
}

/// Every outcome, by a match that a new outcome does not compile without.
fn all_outcomes() -> [OutcomeKind; 3] {
    let all = [OutcomeKind::Committed, OutcomeKind::RolledBack, OutcomeKind::CleanedUp];
    for outcome in all {
        match outcome {
            OutcomeKind::Committed | OutcomeKind::RolledBack | OutcomeKind::CleanedUp => {}
        }
    }
    all
}

/// The schema of an outcome, or null while the run is unfinished.
pub(crate) fn outcome_or_null(_: &mut SchemaGenerator) -> Schema {
    let mut names: Vec<serde_json::Value> =
        all_outcomes().iter().map(|outcome| serde_json::to_value(outcome).expect("an outcome serializes")).collect();
    names.push(serde_json::Value::Null);
    json_schema!({ "description": "null while the run is unfinished", "enum": names })
}

/// The schema of a run error's kind (`crate::record::RunError::kind`, a string in the record).
pub(crate) fn run_error_kind(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "enum": ["shortfall", "unexpected"] })
}

/// One schema file: its name in `docs/schemas/`, and the schema.
pub struct SchemaFile {
    /// The file name.
    pub name: &'static str,
    /// The schema, with `$id`, title and description.
    pub schema: serde_json::Value,
}

fn file<T: JsonSchema + ?Sized>(name: &'static str, title: &str, description: &str) -> SchemaFile {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    let object = schema.as_object_mut().expect("a root schema is an object");
    object.insert("$id".into(), format!("{BASE_ID}{name}").into());
    object.insert("title".into(), title.into());
    object.insert("description".into(), description.into());
    SchemaFile { name, schema }
}

/// Every schema in `docs/schemas/`.
pub fn all() -> Vec<SchemaFile> {
    let spec_description = format!(
        "A run's input: what selection and creation hand over (`post-provision run --spec FILE`, `post-provision validate --spec FILE`). At most {} MiB ({MAX_SPEC_FILE_BYTES} bytes) as a file. Unknown fields are refused. The engine checks more than this schema can say: the counts equal the lengths of their lists, an instance id appears once, an instance's cpu and mmem equal its class's in resourceClassConfig, string lengths are bytes (the schema counts characters), the run record and the creating transaction fit DynamoDB's limits, loopback queue URLs only beside a loopback endpoint, in a GitHub Actions job runId and runAttempt are the job's, and, when the run returns instances to the pool, resourceClassConfig agrees with the table's TYPE#METADATA resource_class_config item.",
        MAX_SPEC_FILE_BYTES / (1024 * 1024)
    );
    vec![
        file::<Spec>("spec.schema.json", "post-provision spec", &spec_description),
        file::<RunReport>(
            "run-report.schema.json",
            "post-provision run report",
            "Printed by `run`, `resume RUN_ID` and `status RUN_ID` with `--output json`. Stable: fields are only ever added.",
        ),
        file::<ErrorReport>(
            "error.schema.json",
            "post-provision error",
            "Printed on stdout with `--output json` when a command fails before or instead of finishing a run (the message is also on stderr).",
        ),
        file::<Vec<ListRow>>(
            "list.schema.json",
            "post-provision run list",
            "Printed by `list [--unfinished]` with `--output json`, newest first.",
        ),
        file::<Vec<ResumeAllEntry>>(
            "resume-all.schema.json",
            "post-provision resume --all result",
            "Printed by `resume --all` with `--output json`: one entry per run it took over.",
        ),
        file::<InitResult>("init.schema.json", "post-provision init result", "Printed by `init` with `--output json`."),
        file::<ValidateResult>(
            "validate.schema.json",
            "post-provision validate result",
            "Printed by `validate --spec FILE` with `--output json` for a valid spec (an invalid one is an error, exit 65).",
        ),
        file::<AuditReport>(
            "audit.schema.json",
            "post-provision audit",
            "Printed by `audit [--fix]` with `--output json`: every finding (by kind), and the counts. Strings from records and EC2 are as read.",
        ),
    ]
}

/// A schema as its file holds it: pretty JSON and a final newline.
pub fn file_text(schema: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("a schema serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files in `docs/schemas/` are what the types derive. Set `POST_PROVISION_WRITE_SCHEMAS`
    /// to rewrite them after changing a type.
    #[test]
    fn docs_schemas_are_derived_from_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas");
        let write = std::env::var_os("POST_PROVISION_WRITE_SCHEMAS").is_some();
        let mut names: Vec<String> = Vec::new();
        for SchemaFile { name, schema } in all() {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, file_text(&schema)).expect("write the schema");
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let stored: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            assert_eq!(
                stored, schema,
                "docs/schemas/{name} is not what the types derive: run POST_PROVISION_WRITE_SCHEMAS=1 cargo test --lib schemas"
            );
            names.push(name.to_string());
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("docs/schemas")
            .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        names.sort();
        assert_eq!(on_disk, names, "every file in docs/schemas/ is derived");
    }

    /// The spec schema's limits are `spec.rs`'s constants.
    #[test]
    fn the_spec_schemas_limits_are_the_engines() {
        use crate::spec::*;
        let schema = all().remove(0).schema;
        assert_eq!(schema["properties"]["runId"]["maxLength"], MAX_RUN_ID_LEN);
        assert_eq!(schema["properties"]["maxRuntimeMin"]["maximum"], MAX_RUNTIME_MIN);
        assert_eq!(schema["properties"]["idleTimeSec"]["maximum"], MAX_IDLE_TIME_SEC);
        assert_eq!(schema["properties"]["resourceClassConfig"]["maxProperties"], MAX_RESOURCE_CLASSES);
    }
}
