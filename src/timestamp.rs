//! The data model's one timestamp format: ISO-8601 UTC, whole seconds, a `Z` (`2025-04-24T18:31:04Z`).
//!
//! Conditions in the pool compare these as plain strings (`threshold > :now`), so every value this
//! crate writes goes through [`Timestamp`], and every value it reads is parsed strictly.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

const FORMAT: &[FormatItem<'static>] = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

/// A UTC instant with whole-second precision, written as `YYYY-MM-DDTHH:MM:SSZ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_secs: i64,
}

/// The JSON Schema of a timestamp, for the schemas in `docs/schemas/`.
impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "ISO-8601 UTC, whole seconds, Z",
            "type": "string",
            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
        })
    }
}

/// A string that is not in the data model's timestamp format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a timestamp of the form YYYY-MM-DDTHH:MM:SSZ (UTC, whole seconds)")]
pub struct TimestampFormatError {
    /// The rejected text.
    pub value: String,
}

impl Timestamp {
    /// The instant `unix_secs` seconds after the Unix epoch.
    pub fn from_unix_secs(unix_secs: i64) -> Timestamp {
        Timestamp { unix_secs }
    }

    /// The current time of the system clock, truncated to whole seconds.
    pub fn now_utc() -> Timestamp {
        Timestamp::from_unix_secs(OffsetDateTime::now_utc().unix_timestamp())
    }

    /// Seconds since the Unix epoch.
    pub fn unix_secs(self) -> i64 {
        self.unix_secs
    }

    /// This instant plus `secs` seconds (negative moves back).
    pub fn plus_secs(self, secs: i64) -> Timestamp {
        Timestamp::from_unix_secs(self.unix_secs.saturating_add(secs))
    }

    /// Parses the exact data-model format, and nothing else (no fractions, no offsets).
    pub fn parse(text: &str) -> Result<Timestamp, TimestampFormatError> {
        let error = || TimestampFormatError { value: text.to_string() };
        // The length check rejects fractions and offsets that a lenient parser might accept.
        if text.len() != 20 {
            return Err(error());
        }
        let parsed = PrimitiveDateTime::parse(text, FORMAT).map_err(|_| error())?;
        Ok(Timestamp::from_unix_secs(parsed.assume_utc().unix_timestamp()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Years outside 0..=9999 cannot occur for clock-derived values; they would also break the
        // fixed-width string comparison, so this is a programmer error, not an operating one.
        let instant =
            OffsetDateTime::from_unix_timestamp(self.unix_secs).expect("timestamp within the representable range");
        let text = instant.format(FORMAT).expect("formatting a valid instant");
        formatter.write_str(&text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        // A visitor rather than `String::deserialize`, so a number or anything else is refused
        // with what a timestamp looks like, not merely "expected a string".
        struct TimestampVisitor;
        impl serde::de::Visitor<'_> for TimestampVisitor {
            type Value = Timestamp;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a timestamp string of the form YYYY-MM-DDTHH:MM:SSZ")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Timestamp, E> {
                Timestamp::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(TimestampVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_the_data_model_form() {
        let stamp = Timestamp::parse("2025-04-24T18:31:04Z").unwrap();
        assert_eq!(stamp.to_string(), "2025-04-24T18:31:04Z");
        assert_eq!(stamp.plus_secs(300).to_string(), "2025-04-24T18:36:04Z");
        assert_eq!(Timestamp::from_unix_secs(0).to_string(), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn rejects_every_other_form() {
        for bad in [
            "2025-04-24T18:31:04.123Z",
            "2025-04-24T18:31:04+00:00",
            "2025-04-24 18:31:04Z",
            "2025-04-24T18:31:04",
            "2025-13-24T18:31:04Z",
            "",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn string_order_matches_time_order() {
        let early = Timestamp::parse("2025-04-24T09:59:59Z").unwrap();
        let late = early.plus_secs(1);
        assert!(early.to_string() < late.to_string());
        assert!(early < late);
    }
}
