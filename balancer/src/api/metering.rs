//! The metering servers' side of the balancer, authenticated by each server's own token:
//! `POST /v1/sync` (announce, learn products and allocations, renew the lease) and
//! `POST /v1/instant-balance`.

use super::error::ApiError;
use super::{ApiJson, AppState};
use crate::auth;
use crate::balance::BalanceError;
use crate::store::ServerRecord;
use allot_core::ErrorCode;
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::balancer::{
    InstantBalanceRequest, InstantBalanceResponse, SyncAllocation, SyncProduct, SyncRequest,
    SyncResponse,
};
use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;

/// A metering server that presented its own token (which of its tokens, during a rotation's
/// grace); it may act only on its own allocations.
pub struct MeteringServer(pub ServerRecord, pub auth::TokenMatch);

impl FromRequestParts<AppState> for MeteringServer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let refused = || {
            ApiError::new(
                ErrorCode::Unauthorized,
                "metering-server calls need `Authorization: Bearer <the server's token>`",
            )
        };
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(refused)?;
        let record = state
            .store
            .server_by_token_hash(&auth::hash_token(token))
            .await?
            .ok_or_else(refused)?;
        // The digest matched; check the derived token too (and the previous token's grace).
        match state.tokens.check(&record, token, chrono::Utc::now()) {
            None => Err(refused()),
            Some(matched) => Ok(Self(record, matched)),
        }
    }
}

/// A metering server announces itself, learns its products and allocations, renews its lease.
#[utoipa::path(post, path = "/v1/sync", tag = "metering", security(("serverToken" = [])),
    request_body = SyncRequest,
    responses((status = 200, description = "Its products and allocations", body = SyncResponse)))]
pub(super) async fn sync(
    State(state): State<AppState>,
    MeteringServer(server, token): MeteringServer,
    ApiJson(req): ApiJson<SyncRequest>,
) -> Result<Json<SyncResponse>, ApiError> {
    validate::name("version", &req.version)?;
    // The server runs with its new token (a valid sync, so not a probe): the old one has done
    // its job. Conditional on the salt that matched, so a rotation that raced this call keeps
    // its grace.
    if token == auth::TokenMatch::Current
        && server.previous_token.is_some()
        && state
            .store
            .retire_previous_token(&server.name, &server.token_salt)
            .await?
    {
        tracing::info!(server = %server.name, "server presented its new token; the previous one is now refused");
    }
    if state.store.revive_server(&server.name).await? {
        tracing::warn!(server = %server.name, "a lost server is back; it adopts the books' allocations");
    }
    state.store.touch_server(&server.name).await?;
    // Said on every sync until a status read shows the adoption: an answer lost on the way
    // must not leave the server holding units the books reclaimed.
    let reset = server.needs_reset;
    let products = state
        .store
        .products()
        .await?
        .into_iter()
        .map(|p| SyncProduct {
            name: p.name,
            policy: p.policy,
        })
        .collect();
    let allocations = state
        .store
        .cells()
        .await?
        .into_iter()
        .filter(|c| c.server == server.name)
        .map(|c| SyncAllocation {
            product: c.product,
            units: c.units,
            generation: c.generation,
        })
        .collect();
    let lease_seconds =
        u32::try_from(state.engine.config().server_lease().as_secs()).unwrap_or(u32::MAX);
    tracing::debug!(server = %server.name, version = %req.version, "server synced");
    Ok(Json(SyncResponse {
        server: server.name,
        lease_seconds,
        products,
        allocations,
        reset,
    }))
}

/// A metering server ran dry: grant from the reserve, else reclaim from idle servers.
#[utoipa::path(post, path = "/v1/instant-balance", tag = "metering", security(("serverToken" = [])),
    request_body = InstantBalanceRequest,
    responses(
        (status = 200, description = "What was granted (0 when nothing could be found)", body = InstantBalanceResponse),
        (status = 404, description = "`unknown_product`", body = ErrorBody)))]
pub(super) async fn instant_balance(
    State(state): State<AppState>,
    MeteringServer(server, _): MeteringServer,
    ApiJson(req): ApiJson<InstantBalanceRequest>,
) -> Result<Json<InstantBalanceResponse>, ApiError> {
    validate::path_name("product", &req.product)?;
    validate::units("units", req.units)?;
    if let Some(urgent) = req.urgent_units
        && urgent > req.units
    {
        return Err(ApiError::bad_request(format!(
            "urgent_units ({urgent}) must not exceed units ({})",
            req.units
        )));
    }
    // An unknown product is refused before the engine makes it a lock, by one row's read
    // (the product's whole books, a thousand cells on a large estate, were read here once),
    // unless the engine already holds a lock for it (a product it has balanced exists).
    if !state.engine.knows_product(&req.product) {
        state.store.reserve(&req.product).await?;
    }
    match state.engine.instant(&server, &req).await {
        Ok(answer) => Ok(Json(answer)),
        // Another balancer leads the product's shard: the server is sent there.
        Err(BalanceError::NotLeader) => Err(ApiError::from(BalanceError::NotLeader)
            .with_leader_url(super::leader_url(&state, Some(&req.product)).await)),
        Err(e) => Err(e.into()),
    }
}
