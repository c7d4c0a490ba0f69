//! The operator's calls, made by the balancer with this server's token: who holds what here
//! (`GET /v1/checkouts`) and force release (`POST /v1/checkouts/{id}/revoke`). The book lists
//! and revokes; these handlers validate, log the revocation to the writer and answer once it
//! is durable. A checkout is named by its public id, never by its handle.

use super::super::auth::BalancerAuth;
use super::super::pull::pull;
use super::super::writer::durable;
use super::super::{App, new_handle};
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::store::Mutation;
use allot_core::checkout::holders::{is_holder_id, validate_reason};
use allot_core::checkout::{CheckoutId, Ended, HolderFilter, MAX_HOLDERS_PAGE, RevokeRefusal};
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::agent::{HolderPage, RevokeRequest, Revoked};
use allot_core::wire::records::EndedBy;
use axum::Json;
use axum::extract::State;
use axum::http::Uri;
use serde::Deserialize;

/// The query of `GET /v1/checkouts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct HoldersParams {
    /// Only this product.
    product: Option<String>,
    /// Only this user.
    user: Option<String>,
    /// Holders whose id sorts after this one (the last id of the previous page).
    after: Option<String>,
    /// Page size, 1–1000 (default 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Reads the query strictly: UTF-8, known fields only, in this API's error shape.
pub(super) fn query<T: serde::de::DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    validate::query_utf8(uri.query().unwrap_or(""))?;
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))
}

/// Every live checkout and waiting client here, by public id (one page).
#[utoipa::path(get, path = "/v1/checkouts", tag = "balancer", security(("serverToken" = [])),
    params(HoldersParams),
    responses(
        (status = 200, description = "One page of holders, ordered by id", body = HolderPage),
        (status = 400, description = "`bad_request`: a filter, `after` or `limit` is invalid", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed", body = ErrorBody)))]
pub(super) async fn holders_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    uri: Uri,
) -> Result<Json<HolderPage>, ApiError> {
    let params: HoldersParams = query(&uri)?;
    if let Some(p) = &params.product {
        validate::path_name("product", p)?;
    }
    if let Some(u) = &params.user {
        validate::name("user", u)?;
    }
    if let Some(a) = &params.after
        && !is_holder_id(a)
    {
        return Err(ApiError::BadRequest(
            "after: expected a holder id as this API lists them".to_owned(),
        ));
    }
    let limit = params.limit.unwrap_or(MAX_HOLDERS_PAGE);
    if !(1..=MAX_HOLDERS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: must be between 1 and {MAX_HOLDERS_PAGE}, got {limit}"
        )));
    }
    let filter = HolderFilter {
        product: params.product,
        user: params.user,
    };
    let (items, more) =
        app.lock()
            .book
            .holders(&app.name, &filter, params.after.as_deref(), limit as usize);
    // Report nothing that is not yet durable.
    app.barrier().await?;
    Ok(Json(HolderPage {
        server: app.name.clone(),
        items,
        more,
    }))
}

/// Force-releases a checkout: its units free at once (the first waiting client gets them) and
/// the holder's next heartbeat or checkin answers `410 license_revoked`, across restarts.
#[utoipa::path(post, path = "/v1/checkouts/{id}/revoke", tag = "balancer", security(("serverToken" = [])),
    params(("id" = String, Path, description = "The checkout's public id (`co_…`), as `GET /v1/checkouts` lists it")),
    request_body = RevokeRequest,
    responses(
        (status = 200, description = "Revoked: the checkout as it was", body = Revoked),
        (status = 400, description = "`bad_request`: not a checkout id, or no reason (1–500 characters)", body = ErrorBody),
        (status = 404, description = "`not_found`: no live checkout has this id here", body = ErrorBody),
        (status = 409, description = "`conflict`: it was already revoked, or it is borrowed", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn revoke_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<Revoked>, ApiError> {
    let id: CheckoutId = id.parse().map_err(|_| {
        ApiError::BadRequest("id: expected a checkout id, `co_` and 32 hex digits".to_owned())
    })?;
    validate_reason(&req.reason).map_err(ApiError::BadRequest)?;
    app.check_writable()?;
    let now = now_ms();
    let (outcome, served_waiters, ack) = {
        let mut inner = app.lock();
        revoke_locked(&app, &mut inner, id, &req.reason, EndedBy::Revoke, now)?
    };
    durable(ack).await?;
    app.metrics.revocation(&outcome.holder.product);
    tracing::warn!(checkout = %id, product = %outcome.holder.product, reason = %req.reason,
        served_waiters, "checkout revoked by an administrator");
    Ok(Json(Revoked {
        checkout: outcome.holder,
        revoked_at: utc(now),
        reason: outcome.revocation.reason,
        served_waiters,
    }))
}

/// Revokes checkout `id` under the lock: the book frees it, the revocation and its usage
/// record (ended by `ended_by`) go to the writer, its units go to the waiters. Shared by an
/// operator's revoke and the idle rule. Returns the outcome, the waiters served and the ack
/// to await before answering.
pub(super) fn revoke_locked(
    app: &App,
    inner: &mut super::super::Inner,
    id: CheckoutId,
    reason: &str,
    ended_by: EndedBy,
    now: allot_core::checkout::Millis,
) -> Result<
    (
        allot_core::checkout::RevokeOutcome,
        u32,
        tokio::sync::oneshot::Receiver<bool>,
    ),
    ApiError,
> {
    let mut outcome = inner
        .book
        .revoke(&app.name, id, reason, now, &mut new_handle)
        .map_err(|r| match r {
            RevokeRefusal::Unknown => {
                ApiError::UnknownCheckout(format!("no live checkout {id} on this server"))
            }
            RevokeRefusal::AlreadyRevoked(r) => ApiError::Conflict(format!(
                "checkout {id} was already revoked at {}: {}",
                rfc3339(r.at),
                r.reason
            )),
            RevokeRefusal::Borrowed => ApiError::Conflict(format!(
                "checkout {id} is borrowed for offline use: it cannot be taken back before it \
                 is returned or its borrow ends"
            )),
        })?;
    let h = &outcome.holder;
    let ended = Ended {
        handle: outcome.revocation.handle,
        product: h.product.as_str().into(),
        user: h.user.clone(),
        host: h.host.clone(),
        groups: h.groups.clone(),
        units: h.units,
        started_at: h
            .granted_at
            .map_or(now, |t| u64::try_from(t.timestamp_millis()).unwrap_or(now)),
    };
    let usage = super::super::records::usage(app, &ended, ended_by, now);
    let ack = app.log(inner, Mutation::Revoke(outcome.revocation.clone(), usage));
    let served = std::mem::take(&mut outcome.served);
    let served_waiters = u32::try_from(served.len()).unwrap_or(u32::MAX);
    app.dispatch(inner, served, now);
    pull(app, inner, &outcome.holder.product, now);
    Ok((outcome, served_waiters, ack))
}

/// Unix milliseconds as a UTC time, for the answer.
fn utc(ms: allot_core::checkout::Millis) -> chrono::DateTime<chrono::Utc> {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_default()
}
