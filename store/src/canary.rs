//! Timestamps in the store: the `cilium/synced/...` canaries and `cilium/.heartbeat` hold an RFC 3339 time.
//!
//! Writers use Go's `time.RFC3339` layout in UTC (`2024-05-01T12:00:00Z`, whole seconds). Readers accept any RFC
//! 3339 time, with fractional seconds or a numeric offset, because other writers may produce them.

use chrono::{DateTime, SecondsFormat, Utc};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CanaryError {
    #[error("timestamp value is not UTF-8")]
    NotUtf8,
    #[error("timestamp {value:?} is not an RFC 3339 time (expected e.g. 2024-05-01T12:00:00Z): {why}")]
    Format { value: String, why: String },
}

/// The value a writer stores: UTC, whole seconds, `Z` suffix.
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Parses a canary or heartbeat value as read from the store. Surrounding whitespace (a trailing newline from
/// `etcdctl put`) is ignored.
pub fn parse_timestamp(value: &[u8]) -> Result<DateTime<Utc>, CanaryError> {
    let s = std::str::from_utf8(value).map_err(|_| CanaryError::NotUtf8)?.trim();
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| CanaryError::Format { value: s.chars().take(64).collect(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn format_is_go_rfc3339_utc() {
        let t = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 7).single().expect("valid");
        let t = t + chrono::Duration::milliseconds(250);
        assert_eq!(format_timestamp(t), "2024-05-01T12:00:07Z");
    }

    #[test]
    fn parse_accepts_offsets_and_fractions() {
        let want = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 7).single().expect("valid");
        assert_eq!(parse_timestamp(b"2024-05-01T12:00:07Z").unwrap(), want);
        assert_eq!(parse_timestamp(b"2024-05-01T14:00:07+02:00").unwrap(), want);
        assert_eq!(parse_timestamp(b"2024-05-01T12:00:07Z\n").unwrap(), want);
        let frac = parse_timestamp(b"2024-05-01T12:00:07.123456789Z").unwrap();
        assert_eq!(frac.timestamp(), want.timestamp());
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [&b""[..], b"yesterday", b"2024-05-01 12:00:07", b"2024-05-01T12:00:07", b"1714564807"] {
            assert!(matches!(parse_timestamp(bad), Err(CanaryError::Format { .. })), "{bad:?}");
        }
        assert_eq!(parse_timestamp(b"\xff\xfe"), Err(CanaryError::NotUtf8));
    }
}
