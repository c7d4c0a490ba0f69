//! The periodic sync with the balancer: learn the products, renew the lease, adopt the books
//! after a reset. The HTTP call is [`crate::balancer`]'s; this module applies its answer to the
//! book and the log.

use super::pull::pull;
use super::writer::durable;
use super::{App, FAILURE_LOG_EVERY, Throttle, define, new_handle};
use crate::clock::{now_ms, rfc3339};
use crate::store::{LeaseRecord, Mutation};
use allot_core::checkout::Millis;
use allot_core::validate;
use allot_core::wire::balancer::SyncResponse;
use std::collections::HashMap;

/// Applies a sync answer: defines or updates every product's policy, adopts the books'
/// allocations after a reset, renews the lease (`sent + lease_seconds`) and waits until all of
/// it is durable.
async fn apply_sync(app: &App, resp: SyncResponse, sent: Millis) -> Result<(), String> {
    let until = sent.saturating_add(u64::from(resp.lease_seconds).saturating_mul(1000));
    let acks = {
        let mut inner = app.lock();
        let now = now_ms();
        let mut acks = Vec::new();
        for p in resp.products {
            if let Err(e) =
                validate::path_name("product", &p.name).and_then(|()| validate::policy(&p.policy))
            {
                tracing::warn!(product = %p.name, error = %e, "sync: product skipped");
                continue;
            }
            if inner.book.policy(&p.name) != Some(&p.policy) {
                tracing::info!(product = %p.name, "sync: product defined or its policy updated");
                acks.push(define(app, &mut inner, &p.name, p.policy.into(), now));
            }
        }
        if resp.reset {
            let books: HashMap<&str, (u32, u64)> = resp
                .allocations
                .iter()
                .map(|a| {
                    let units = u32::try_from(a.units).unwrap_or(u32::MAX);
                    (a.product.as_str(), (units, a.generation))
                })
                .collect();
            for view in inner.book.products() {
                let (units, generation) = books
                    .get(view.product.as_str())
                    .copied()
                    .unwrap_or_default();
                let Some((allocation, generation, served)) = inner.book.adopt_allocation(
                    &view.product,
                    units,
                    generation,
                    now,
                    &mut new_handle,
                ) else {
                    continue;
                };
                acks.push(app.log(
                    &mut inner,
                    Mutation::Product {
                        name: view.product.clone(),
                        policy: view.policy,
                        allocation,
                        generation,
                    },
                ));
                app.dispatch(&mut inner, served, now);
                tracing::warn!(product = %view.product, before = view.allocated, allocation,
                    generation, in_use = view.in_use,
                    "this server had been declared lost: adopted the balancer's allocation");
            }
        }
        let served = inner.book.set_lease(Some(until), now, &mut new_handle);
        acks.push(app.log(
            &mut inner,
            Mutation::Lease(LeaseRecord {
                until,
                synced_at: sent,
            }),
        ));
        app.dispatch(&mut inner, served, now);
        inner.synced_at = Some(sent);
        for view in inner.book.products() {
            pull(app, &mut inner, &view.product, now);
        }
        acks
    };
    for ack in acks {
        durable(ack)
            .await
            .map_err(|e| format!("cannot store the sync: {e}"))?;
    }
    Ok(())
}

/// Syncs with the balancer at start and every sync interval: learns the products, renews the
/// lease, adopts the books after a reset. A failure never stops the server; it is logged with
/// its reason (at most once a minute) and retried at the next interval.
pub(super) async fn sync_task(app: App) {
    let Some(balancing) = &app.balancer else {
        return;
    };
    let mut stopping = app.stopping.subscribe();
    let mut throttle = Throttle::default();
    let mut failing = false;
    let mut named = false;
    loop {
        let attempt = tokio::select! {
            r = balancing.link.sync(now_ms) => Some(r),
            _ = stopping.wait_for(|s| *s) => None,
        };
        let Some(attempt) = attempt else { return };
        let result = match attempt {
            Ok((sent, resp)) => {
                if !named && resp.server != app.name {
                    tracing::warn!(balancer_name = %resp.server, name = %app.name,
                        "the balancer knows this server under another name than --name");
                }
                named = true;
                let reset = resp.reset;
                apply_sync(&app, resp, sent).await.map(|()| reset)
            }
            Err(e) => Err(e),
        };
        app.metrics.balancer_up(result.is_ok());
        match result {
            Ok(reset) => {
                if failing || reset {
                    tracing::info!(reset, "sync with the balancer succeeded; lease renewed");
                }
                failing = false;
                throttle = Throttle::default();
            }
            Err(e) => {
                failing = true;
                if let Some(held_back) = throttle.ready(FAILURE_LOG_EVERY) {
                    let (lease, synced_at) = {
                        let inner = app.lock();
                        (inner.book.lease().unwrap_or(0), inner.synced_at)
                    };
                    let lease = if lease == 0 {
                        "none".to_owned()
                    } else {
                        rfc3339(lease)
                    };
                    tracing::warn!(error = %e, held_back, lease_until = %lease,
                        last_sync = %synced_at.map_or_else(|| "never".to_owned(), rfc3339),
                        "sync with the balancer failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(balancing.config.sync_interval) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}
