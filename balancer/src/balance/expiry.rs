//! Expiry enforced (issue 15): at `expires_at` an entitlement leaves `purchased`. The store
//! takes what the reserve holds at once; for the rest this shell reads the servers holding the
//! product, asks the core ([`allot_core::expiry::retirements`]) which retire how many (free
//! units first), logs `retire` moves under the product lock and sends them outside it, like a
//! run. A retire move that lands takes its units out of `purchased` in the same commit, so
//! the books balance at every step; units in use stay with their clients, and a server left
//! with fewer units than in use grants nothing new until enough are checked in.

use super::{BalanceError, Engine};
use crate::store::{NewMove, RunOutcome, ServerRecord};
use allot_core::domain::{MoveKind, RunTrigger, ServerState};
use allot_core::expiry::{Holding, retirements};
use chrono::Utc;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// How often the leader looks for expired entitlements: the most an entitlement outlives its
/// `expires_at` in `purchased` while the reserve holds its units.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

impl Engine {
    /// Takes expired entitlements out of `purchased`; returns the units retired from servers
    /// (recorded as a `reclaim` run of `retire` moves when there were any to retire).
    pub async fn expire_entitlements(&self) -> Result<u64, BalanceError> {
        let _one_run_at_a_time = self.run_lock.lock().await;
        self.expire_locked().await
    }

    /// [`Engine::expire_entitlements`] for a caller already holding the run lock.
    pub(super) async fn expire_locked(&self) -> Result<u64, BalanceError> {
        let fence = self.fence()?;
        let owed = self
            .store
            .expire_from_reserve(Utc::now().timestamp_millis(), &fence)
            .await?;
        if owed.is_empty() {
            return Ok(0);
        }
        let run_id = self.store.begin_run(RunTrigger::Reclaim, &fence).await?;
        // Only the servers holding an owed product are asked what they have in use.
        let holding: BTreeSet<String> = self
            .store
            .cells()
            .await?
            .into_iter()
            .filter(|c| c.units > 0 && owed.iter().any(|(p, _)| *p == c.product))
            .map(|c| c.server)
            .collect();
        let servers: Vec<ServerRecord> = self
            .store
            .server_records()
            .await?
            .into_iter()
            .filter(|s| s.state != ServerState::Lost && holding.contains(&s.name))
            .collect();
        let (statuses, unreachable) = self.statuses(&servers, true).await;
        let mut outcome = RunOutcome {
            servers_queried: statuses.len() as u64,
            servers_unreachable: unreachable.len() as u64,
            ..RunOutcome::default()
        };
        for (product, units) in owed {
            let lock = self.product_lock(&product);
            let logged = {
                let _serialised = lock.lock().await;
                let cells = self.store.product_cells(&product).await?;
                let holdings: Vec<Holding> = cells
                    .iter()
                    .map(|c| Holding {
                        allocation: c.units,
                        in_use: super::reported(&statuses, &c.server, &product)
                            .map_or(c.units, |p| u64::from(p.in_use)),
                    })
                    .collect();
                let mut logged = Vec::new();
                for (cell, take) in cells.iter().zip(retirements(&holdings, units)) {
                    if take == 0 {
                        continue;
                    }
                    match self
                        .store
                        .begin_move(&NewMove {
                            id: Uuid::now_v7(),
                            run_id: Some(run_id),
                            product: product.clone(),
                            server: cell.server.clone(),
                            kind: MoveKind::Retire,
                            units: take,
                            epoch: fence.epoch_for(&product).unwrap_or(-1),
                        })
                        .await
                    {
                        Ok(mv) => logged.push(mv),
                        Err(e) => outcome.errors.push(format!(
                            "retire {take} {product} from {}: not logged: {e}",
                            cell.server
                        )),
                    }
                }
                logged
            };
            for mv in logged {
                let Some(server) = servers.iter().find(|s| s.name == mv.server) else {
                    continue;
                };
                match self.execute(server, &mv).await {
                    Ok(done) => {
                        outcome.moves += 1;
                        outcome.units_moved += done.applied_units.unwrap_or(0);
                    }
                    Err(e) => outcome.errors.push(e.to_string()),
                }
            }
            tracing::info!(
                product,
                owed = units,
                run_id,
                "expired entitlement retired from servers"
            );
        }
        outcome.status = if outcome.errors.is_empty() {
            "ok"
        } else {
            "partial"
        }
        .into();
        self.store.finish_run(run_id, &outcome).await?;
        Ok(outcome.units_moved)
    }
}

/// Enforces expiry every [`EXPIRY_INTERVAL`] while this balancer leads, until `shutdown`.
pub async fn run(engine: Engine, mut shutdown: watch::Receiver<bool>) {
    loop {
        match engine.expire_entitlements().await {
            Ok(_) | Err(BalanceError::NotLeader) => {}
            Err(e) => tracing::error!(error = %e, "expiry enforcement failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(EXPIRY_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}
