//! Crash points for the fault-injection tests, in both servers.
//!
//! `ALLOT_FAULT_CRASH_AT=<point>` makes the process abort — no cleanup, no flush, exactly like
//! `kill -9` — the first time it reaches that point, so tests can kill it at an instant no
//! signal could hit reliably. Unset, a point costs one comparison with a cached `None`. Points:
//!
//! - `between_release_and_grant` (balancer): a run sent its releases, none of its grants yet.
//! - `after_move_sent` (balancer): a server answered a move; the balancer has not booked it.
//! - `after_retire_sent` (balancer): the same, for a `retire` move (an expired entitlement's).
//! - `instant_answered` (balancer): an instant balance's grant from the reserve is applied and
//!   its answer on its way; the balancer has not booked the grant.
//! - `agent_grant_applied` (metering server): a grant move is durably applied; its answer is
//!   not sent yet.
//!
//! `ALLOT_FAULT_PAUSE_AT=<point>` makes the process wait `ALLOT_FAULT_PAUSE_MS` (default 2000)
//! every time it reaches that point instead, so a test can act in a window that is otherwise
//! too short to hit. Points:
//!
//! - `run_planned_unlocked` (balancer): a run has read the books and planned every product
//!   from that read; it has not yet taken any product's lock to log its moves.

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

/// Waits `ALLOT_FAULT_PAUSE_MS` (default 2000) if `ALLOT_FAULT_PAUSE_AT` names this point.
pub async fn pause(name: &str) {
    static PAUSE_AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let pause_at = PAUSE_AT.get_or_init(|| {
        let point = std::env::var("ALLOT_FAULT_PAUSE_AT").ok()?;
        let ms = std::env::var("ALLOT_FAULT_PAUSE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(2000);
        Some((point, ms))
    });
    if let Some((point, ms)) = pause_at
        && point == name
    {
        tracing::warn!(point = name, ms, "fault injection: pausing");
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}
