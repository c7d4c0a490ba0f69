//! Licence administration across the estate: who holds what (every server's holders, paged)
//! and force release (a revoke sent to the server holding the checkout, audited).
//!
//! The balancer keeps no copy of the checkouts: it asks the servers, concurrently and with the
//! engine's call timeout, and names every server that did not answer, so a listing is never
//! silently short. A checkout's public id does not say where it is held; a revoke is offered to
//! every server and exactly one can hold it (ids are 128-bit hashes of random handles).

use super::{CallError, Engine};
use crate::store::{ServerRecord, StoreError};
use allot_core::checkout::{CheckoutId, Cursor};
use allot_core::wire::agent::{HolderPage, RevokeRequest, Revoked};
use allot_core::wire::balancer::Holders;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// What `GET /v1/checkouts` asks for, validated by the API.
#[derive(Debug, Clone, Default)]
pub struct HoldersQuery {
    /// Only this product.
    pub product: Option<String>,
    /// Only this user.
    pub user: Option<String>,
    /// Only this server.
    pub server: Option<String>,
    /// Page size, 1–1000.
    pub limit: u32,
    /// Where the page starts.
    pub cursor: Option<Cursor>,
}

/// Why a listing or a revoke failed.
#[derive(Debug, thiserror::Error)]
pub enum HoldersError {
    /// The books failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `server=` names no registered server.
    #[error("unknown server {0:?}")]
    UnknownServer(String),
    /// No server that answered holds the checkout; `unreachable` lists those that did not
    /// answer (empty when every server answered).
    #[error("no live checkout {id} on any server{}", unreachable_note(.unreachable))]
    NotFound {
        /// The id asked for.
        id: CheckoutId,
        /// Servers that did not answer, one of which may hold it.
        unreachable: Vec<String>,
    },
    /// The server holding the checkout refused the revoke (already revoked, store failed).
    #[error("{server} refused: {code}: {message}")]
    Refused {
        /// The server.
        server: String,
        /// Its HTTP status.
        status: u16,
        /// Its error code.
        code: String,
        /// Its message.
        message: String,
    },
}

fn unreachable_note(unreachable: &[String]) -> String {
    if unreachable.is_empty() {
        String::new()
    } else {
        format!(
            " that answered; unreachable (it may be on one of them): {}",
            unreachable.join(", ")
        )
    }
}

impl Engine {
    /// One page of the estate's holders, ordered by server name then id.
    pub async fn holders(&self, query: &HoldersQuery) -> Result<Holders, HoldersError> {
        let mut servers = self.store.server_records().await?;
        servers.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(only) = &query.server {
            servers.retain(|s| &s.name == only);
            if servers.is_empty() {
                return Err(HoldersError::UnknownServer(only.clone()));
            }
        }
        if let Some(c) = &query.cursor {
            servers.retain(|s| s.name >= c.server);
        }
        let mut pages = self
            .fan_out(&servers, |agents, server| {
                let mut params = Vec::new();
                if let Some(p) = &query.product {
                    params.push(("product", p.clone()));
                }
                if let Some(u) = &query.user {
                    params.push(("user", u.clone()));
                }
                if let Some(c) = query.cursor.as_ref().filter(|c| c.server == server.name) {
                    params.push(("after", c.after.clone()));
                }
                params.push(("limit", query.limit.to_string()));
                async move { agents.holders(&server, &params).await }
            })
            .await;
        let limit = query.limit as usize;
        let mut items = Vec::new();
        let mut unreachable = Vec::new();
        for server in &servers {
            match pages.remove(&server.name) {
                Some(Ok(HolderPage { items: page, .. })) => {
                    let room = limit.saturating_sub(items.len());
                    items.extend(page.into_iter().take(room).map(|mut h| {
                        // The books' name for the server, whatever it calls itself.
                        h.server.clone_from(&server.name);
                        h
                    }));
                }
                Some(Err(e)) => {
                    tracing::warn!(server = %server.name, error = %e, "holders: server did not answer");
                    unreachable.push(server.name.clone());
                }
                None => unreachable.push(server.name.clone()),
            }
        }
        // A full page may have more behind it: on this server or on the next ones.
        let next_cursor = (items.len() == limit)
            .then(|| items.last())
            .flatten()
            .map(|last| {
                Cursor {
                    server: last.server.clone(),
                    after: last.id.clone(),
                }
                .encode()
            });
        Ok(Holders {
            items,
            next_cursor,
            unreachable,
        })
    }

    /// Force-releases checkout `id` wherever it is held and records it in the audit log
    /// (`checkout.revoke`, by `actor`, with the reason and the holder).
    pub async fn revoke(
        &self,
        actor: &str,
        id: CheckoutId,
        reason: &str,
    ) -> Result<Revoked, HoldersError> {
        let servers = self.store.server_records().await?;
        let request = RevokeRequest {
            reason: reason.to_owned(),
        };
        let path_id = id.to_string();
        let answers = self
            .fan_out(&servers, |agents, server| {
                let (request, path_id) = (request.clone(), path_id.clone());
                async move { agents.revoke(&server, &path_id, &request).await }
            })
            .await;
        let mut unreachable = Vec::new();
        let mut refused = None;
        for (server, answer) in answers {
            match answer {
                Ok(mut revoked) => {
                    revoked.checkout.server.clone_from(&server);
                    let detail = serde_json::json!({
                        "server": server,
                        "product": revoked.checkout.product,
                        "user": revoked.checkout.user,
                        "host": revoked.checkout.host,
                        "units": revoked.checkout.units,
                        "reason": revoked.reason,
                        "revoked_at": revoked.revoked_at,
                        "served_waiters": revoked.served_waiters,
                    });
                    tracing::warn!(checkout = %id, %server, product = %revoked.checkout.product,
                        %actor, reason, "checkout revoked");
                    if let Err(e) = self
                        .store
                        .record_audit(actor, "checkout.revoke", &path_id, &detail)
                        .await
                    {
                        tracing::error!(checkout = %id, %server, error = %e, detail = %detail,
                            "the revoke is done but its audit entry could not be written");
                        return Err(e.into());
                    }
                    return Ok(revoked);
                }
                Err(CallError::Refused { status: 404, .. }) => {}
                Err(CallError::Refused {
                    status,
                    code,
                    message,
                }) => {
                    refused = Some(HoldersError::Refused {
                        server,
                        status,
                        code,
                        message,
                    });
                }
                Err(CallError::Unreachable(e)) => {
                    tracing::warn!(%server, error = %e, "revoke: server did not answer");
                    unreachable.push(server);
                }
            }
        }
        Err(refused.unwrap_or(HoldersError::NotFound { id, unreachable }))
    }

    /// Calls every server concurrently (bounded by the engine's concurrency); answers by name.
    async fn fan_out<T, F, Fut>(
        &self,
        servers: &[ServerRecord],
        call: F,
    ) -> BTreeMap<String, Result<T, CallError>>
    where
        T: Send + 'static,
        F: Fn(super::AgentClient, ServerRecord) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>> + Send + 'static,
    {
        let semaphore = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for server in servers.iter().cloned() {
            let name = server.name.clone();
            let future = call(self.agents.clone(), server);
            let semaphore = semaphore.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                (name, future.await)
            });
        }
        let mut out = BTreeMap::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((name, answer)) => {
                    out.insert(name, answer);
                }
                Err(e) => tracing::error!(error = %e, "server call task failed"),
            }
        }
        out
    }
}
