//! The scheduled balance: sleep until the next cron time, run, repeat.
//!
//! The schedule is read from the store before every wait, and a change (`PUT /v1/schedule`)
//! wakes the sleeper through a [`Notify`], so a new schedule takes effect without a restart.

use super::Engine;
use crate::schedule::Schedule;
use crate::store::Store;
use allot_core::domain::RunTrigger;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Runs scheduled balances until `shutdown` turns true; an in-flight run is finished first.
pub async fn run(
    engine: Engine,
    store: Arc<dyn Store>,
    schedule_changed: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let next = match store.schedule().await {
            Ok(setting) => match Schedule::parse(&setting.cron, Some(&setting.timezone)) {
                Ok(schedule) => schedule.next_runs(Utc::now(), 1).into_iter().next(),
                Err(e) => {
                    tracing::error!(error = %e, "stored schedule does not parse; waiting for a new one");
                    None
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot read the schedule; retrying in a minute");
                Some(Utc::now() + chrono::Duration::minutes(1))
            }
        };
        let wait = next.map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO));
        tracing::debug!(next = ?next, "next scheduled balance");
        let sleep = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                match engine.run(RunTrigger::Scheduled, None).await {
                    Ok(_) => {}
                    Err(super::BalanceError::NotLeader) => {
                        tracing::debug!("not the leader; the leader runs the schedule");
                    }
                    Err(e) => tracing::error!(error = %e, "scheduled balance failed"),
                }
            }
            () = schedule_changed.notified() => {
                tracing::info!("schedule changed; recomputing the next run");
            }
            _ = shutdown.changed() => return,
        }
    }
}
