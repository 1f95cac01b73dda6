//! Everything this program prints, in one place: the results as typed structs ([`results`]),
//! rendered as text ([`text`]) or JSON ([`json`]), the GitHub Actions job summary ([`summary`]),
//! annotations ([`annotations`]) and step outputs ([`github`]), the log writer ([`log`]), the
//! escapes they all use ([`escape`]), the exit codes ([`exit`]), and the JSON Schemas derived from
//! the types ([`schemas`]).
//!
//! Architecture invariant: every printed path goes through [`escape`]. Text from the spec, AWS or
//! a record cannot add a line that the Actions runner would take for a workflow command (it
//! splits at CR, LF, CRLF, U+0085, U+2028 and U+2029), cannot inject `##[`, and cannot become a
//! link, HTML or reordered text in the job summary.
//!
//! Nothing here reads AWS or drives a run: the audit classifier (`crate::audit`) and the driver
//! stay below it in the import graph, and the CLI (`crate::cli`) only chooses what to print.

pub mod annotations;
pub mod escape;
pub mod exit;
pub mod github;
pub mod json;
pub mod log;
pub mod results;
pub mod schemas;
pub mod summary;
pub mod text;

#[cfg(test)]
mod properties;
