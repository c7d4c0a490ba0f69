//! The wall clock, read in one place: the pure book takes `now` as an argument, and every shell
//! (handlers, tasks, the balancer link) reads it here, so no module needs another for the time.

use allot_core::checkout::Millis;
use std::time::{SystemTime, UNIX_EPOCH};

/// Now as Unix milliseconds: the only clock the shell reads for the book.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A Unix-ms instant as RFC 3339, for messages and logs (operators read dates, not counts).
pub fn rfc3339(ms: Millis) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("{ms} ms"),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}
