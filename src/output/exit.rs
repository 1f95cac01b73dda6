//! The CLI's exit codes (the table in `post-provision --help`). They are part of its printed
//! output: the run report and the error report carry them as `exitCode`.

/// Done: committed (and success of status, list, table, init, validate, iam-policy).
pub const DONE: i32 = 0;
/// Failed after graceful rollback (capacity shortfall).
pub const ROLLED_BACK: i32 = 1;
/// Failed after emergency cleanup.
pub const CLEANED_UP: i32 = 2;
/// Not finished, resumable.
pub const RESUMABLE: i32 = 3;
/// A listing was cut (`list --unfinished`, `resume --all`): unfinished runs may not have been
/// shown or resumed.
pub const CUT: i32 = 4;
/// Bad usage.
pub const USAGE: i32 = 64;
/// Invalid spec, or a spec for another run than the job's.
pub const INVALID_SPEC: i32 = 65;
/// No such run.
pub const NO_SUCH_RUN: i32 = 66;
/// AWS unavailable before anything was written.
pub const UNAVAILABLE: i32 = 69;
/// Internal error.
pub const INTERNAL: i32 = 70;
/// Permission denied (IAM) or no usable credentials.
pub const PERMISSION: i32 = 77;
/// Configuration error (missing table).
pub const CONFIG: i32 = 78;
