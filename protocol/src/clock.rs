//! Wall-clock time as the daemons use it: milliseconds since the Unix epoch (what the state
//! machines are given and what signed headers carry) and its UTC form for logs.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 on a clock set before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as RFC 3339 UTC to the second: `2026-12-06T03:51:18Z`.
pub fn utc(ms: u64) -> String {
    let secs = (ms / 1000).min(i64::MAX as u64) as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s after 1970-01-01T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_529_078_123), "2026-12-06T03:51:18Z");
        // Past year 9999 RFC 3339 has no form: the seconds are said instead.
        assert!(utc(u64::MAX).ends_with("after 1970-01-01T00:00:00Z"));
        assert!(now_ms() > 1_796_529_078_123);
    }
}
