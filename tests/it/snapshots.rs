//! The transition table and diagram, rendered from `states/machine.rs`, as snapshots.

use post_provision::machine::{render_markdown, render_mermaid};

#[test]
fn transition_table_markdown() {
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!("transition_table_markdown", render_markdown());
    });
}

#[test]
fn transition_diagram_mermaid() {
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!("transition_diagram_mermaid", render_mermaid());
    });
}
