//! The JSON rendering of the results (`--output json`).

use serde::Serialize;

use super::escape;

/// `value` as pretty JSON, safe to print (see [`escape::json`]): no line of it can be read as a
/// workflow command, and it parses to the same value.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    escape::json(&serde_json::to_string_pretty(value).expect("results serialize"))
}
