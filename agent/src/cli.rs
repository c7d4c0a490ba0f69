//! The client subcommands of the binary: `run` (check out around a command) and `status`.
//!
//! These are CLI glue: they print to stdout/stderr and return exit codes.

use crate::client::{Client, ClientError, LeaseEnd};
use allot_core::wire::agent::{AgentProducts, CheckoutRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use tokio::signal::unix::{SignalKind, signal};

/// `EX_TEMPFAIL` from sysexits.h: the license was denied; try again later.
pub const EXIT_DENIED: i32 = 75;
/// The command could not be started (as a shell says).
pub const EXIT_CANNOT_RUN: i32 = 127;
/// `EX_NOPERM` from sysexits.h: an administrator revoked the license while the command ran; the
/// command was sent SIGTERM (SIGKILL after [`REVOKE_GRACE`]). Whatever the command's own status.
pub const EXIT_REVOKED: i32 = 77;
/// How often `run` samples the command's CPU time to tell the server how idle it is (at
/// least once per heartbeat).
pub const IDLE_SAMPLE_SECONDS: u64 = 5;
/// How long a command may take to stop after SIGTERM on a revoke before it gets SIGKILL.
pub const REVOKE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The user name to check out as when none is given: `$USER`, else `$LOGNAME`, else `unknown`.
pub fn default_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The host name to check out from when none is given.
pub fn default_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Checks out, runs `command` while heartbeating, checks in when it exits, and returns the exit
/// code to leave with: the command's (128 + signal if a signal ended it), or
/// [`EXIT_DENIED`] when the checkout is refused, or [`EXIT_REVOKED`] when an administrator
/// revoked it while the command ran (the command is sent SIGTERM at once). SIGINT and SIGTERM
/// are forwarded to the command.
pub async fn run_command(client: &Client, req: CheckoutRequest, command: &[OsString]) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!("allot-agent run: no command given");
        return 64;
    };
    let lease = match client.lease(&req).await {
        Ok(l) => l,
        Err(e) => {
            match &e {
                ClientError::Api { body, .. } => eprintln!(
                    "allot-agent: license for {:?} denied: {} ({})",
                    req.product, body.error.message, body.error.code
                ),
                other => eprintln!("allot-agent: cannot check {:?} out: {other}", req.product),
            }
            return EXIT_DENIED;
        }
    };
    if lease.grant().overdraft {
        eprintln!(
            "allot-agent: warning: {:?} granted beyond the allocation (overdraft)",
            req.product
        );
    }
    let mut child = match tokio::process::Command::new(program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("allot-agent: cannot run {program:?}: {e}");
            let _ = lease.checkin().await;
            return EXIT_CANNOT_RUN;
        }
    };
    let (Ok(mut sigint), Ok(mut sigterm)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("allot-agent: cannot install signal handlers");
        let _ = child.start_kill();
        let _ = child.wait().await;
        let _ = lease.checkin().await;
        return 70;
    };
    // Idle reclaim: the command's process tree is idle while it uses no CPU.
    let mut idle = crate::idle::IdleClock::default();
    let sample_every = std::time::Duration::from_secs(
        IDLE_SAMPLE_SECONDS.min(u64::from(lease.grant().heartbeat_seconds.max(1))),
    );
    let mut sample = tokio::time::interval(sample_every);
    let forward = |child: &tokio::process::Child, sig: Signal| {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    };
    let mut ended = false;
    let mut revoked = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            _ = sample.tick() => {
                let ticks = child.id().and_then(crate::idle::tree_cpu_ticks);
                lease.report_idle(idle.observe(ticks, sample_every));
            }
            _ = sigint.recv() => forward(&child, Signal::SIGINT),
            _ = sigterm.recv() => forward(&child, Signal::SIGTERM),
            end = lease.wait_ended(), if !ended => {
                ended = true;
                if let LeaseEnd::Revoked(why) = end {
                    eprintln!(
                        "allot-agent: license for {:?} revoked: {why}; stopping the command \
                         (SIGTERM, SIGKILL after {} s)",
                        req.product,
                        REVOKE_GRACE.as_secs()
                    );
                    revoked = true;
                    forward(&child, Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + REVOKE_GRACE);
                }
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                forward(&child, Signal::SIGKILL);
            }
        }
    };
    if revoked {
        lease.forget();
        return EXIT_REVOKED;
    }
    if let Err(e) = lease.checkin().await {
        eprintln!("allot-agent: checkin failed (the checkout will stale out): {e}");
    }
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(e) => {
            eprintln!("allot-agent: waiting for the command failed: {e}");
            70
        }
    }
}

/// The products as a human table.
pub fn products_table(products: &AgentProducts) -> String {
    let mut rows = vec![[
        "PRODUCT".to_owned(),
        "ALLOCATED".to_owned(),
        "IN USE".to_owned(),
        "FREE".to_owned(),
        "WAITING".to_owned(),
        "ENFORCEMENT".to_owned(),
        "SEAT".to_owned(),
    ]];
    for p in &products.products {
        rows.push([
            p.product.clone(),
            p.allocated.to_string(),
            p.in_use.to_string(),
            p.free.to_string(),
            p.waiting.to_string(),
            p.policy.enforcement.to_string(),
            p.policy.seat.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
