//! Crash points for the fault-injection tests.
//!
//! `ALLOT_FAULT_CRASH_AT=<point>` makes the process abort — no cleanup, no flush, exactly like
//! `kill -9` — the first time it reaches that point, so tests can kill it at an instant no
//! signal could hit reliably (between a release and its grant, between a server's answer and
//! its booking). Unset, a point costs one comparison with a cached `None`.

use std::sync::OnceLock;

/// Aborts the process if `ALLOT_FAULT_CRASH_AT` names this point.
pub fn point(name: &str) {
    static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();
    let crash_at = CRASH_AT.get_or_init(|| std::env::var("ALLOT_FAULT_CRASH_AT").ok());
    if crash_at.as_deref() == Some(name) {
        tracing::error!(point = name, "fault injection: aborting the process");
        std::process::abort();
    }
}
