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
