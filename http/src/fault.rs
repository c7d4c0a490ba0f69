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
//! `ALLOT_FAULT_PAUSE_AT=<point>` with `ALLOT_FAULT_PAUSE_DIR=<dir>` makes the process stop at
//! that point instead, every time it reaches it: it creates `<dir>/<point>.reached`, then waits
//! (at most a minute) until `<dir>/<point>.go` exists. A test thereby acts in a window that is
//! otherwise too short to hit, knowing the process is in it. Points:
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

/// Stops here, as the module describes, if `ALLOT_FAULT_PAUSE_AT` names this point.
pub async fn pause(name: &str) {
    static PAUSE_AT: OnceLock<Option<(String, std::path::PathBuf)>> = OnceLock::new();
    let pause_at = PAUSE_AT.get_or_init(|| {
        let point = std::env::var("ALLOT_FAULT_PAUSE_AT").ok()?;
        let dir = std::env::var_os("ALLOT_FAULT_PAUSE_DIR")?;
        Some((point, dir.into()))
    });
    let Some((point, dir)) = pause_at else {
        return;
    };
    if point != name {
        return;
    }
    tracing::warn!(point = name, "fault injection: pausing");
    if let Err(e) = std::fs::write(dir.join(format!("{name}.reached")), b"") {
        tracing::error!(point = name, error = %e, "fault injection: cannot say the point was reached");
    }
    let go = dir.join(format!("{name}.go"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !go.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
