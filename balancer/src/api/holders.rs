//! Licence administration: who holds what across the estate (`GET /v1/checkouts`) and force
//! release (`POST /v1/checkouts/{id}/revoke`, audited). Validation here; the fan-out to the
//! metering servers is the engine's (`balance::holders`).

use super::error::ApiError;
use super::{Admin, ApiJson, ApiPath, ApiQuery, AppState};
use crate::balance::{HoldersError, HoldersQuery};
use allot_core::ErrorCode;
use allot_core::checkout::holders::validate_reason;
use allot_core::checkout::{CheckoutId, Cursor, MAX_HOLDERS_PAGE};
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::agent::{RevokeRequest, Revoked};
use allot_core::wire::balancer::Holders;
use axum::Json;
use axum::extract::State;
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
    /// Only this metering server.
    server: Option<String>,
    /// Page size, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Where the page starts: the `next_cursor` of the previous page, as given.
    cursor: Option<String>,
}

impl From<HoldersError> for ApiError {
    fn from(e: HoldersError) -> Self {
        match e {
            HoldersError::Store(e) => e.into(),
            HoldersError::UnknownServer(_) => Self::new(ErrorCode::NotFound, e.to_string()),
            HoldersError::NotFound {
                ref unreachable, ..
            } if unreachable.is_empty() => Self::new(ErrorCode::NotFound, e.to_string()),
            // Some server did not answer: it may hold the checkout, so "not found" would be a
            // guess.
            HoldersError::NotFound { .. } => Self::new(ErrorCode::Unavailable, e.to_string()),
            HoldersError::Refused { status, .. } => {
                let code = match status {
                    409 => ErrorCode::Conflict,
                    400 => ErrorCode::BadRequest,
                    _ => ErrorCode::Unavailable,
                };
                Self::new(code, e.to_string())
            }
        }
    }
}

/// Every live checkout and waiting client of the estate (one page, by server then id). A
/// server that does not answer is named in `unreachable`, never silently left out.
#[utoipa::path(get, path = "/v1/checkouts", tag = "licences", security(("adminToken" = [])),
    params(HoldersParams),
    responses(
        (status = 200, description = "One page of holders", body = Holders),
        (status = 400, description = "`bad_request`: a filter, `limit` or `cursor` is invalid", body = ErrorBody),
        (status = 404, description = "`not_found`: `server` names no registered server", body = ErrorBody)))]
pub(super) async fn holders(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<HoldersParams>,
) -> Result<Json<Holders>, ApiError> {
    if let Some(p) = &params.product {
        validate::path_name("product", p)?;
    }
    if let Some(u) = &params.user {
        validate::name("user", u)?;
    }
    if let Some(s) = &params.server {
        validate::path_name("server", s)?;
    }
    let limit = params.limit.unwrap_or(100);
    if !(1..=MAX_HOLDERS_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit: must be between 1 and {MAX_HOLDERS_PAGE}, got {limit}"
        )));
    }
    let cursor = params
        .cursor
        .as_deref()
        .map(Cursor::decode)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let query = HoldersQuery {
        product: params.product,
        user: params.user,
        server: params.server,
        limit,
        cursor,
    };
    Ok(Json(state.engine.holders(&query).await?))
}

/// Force-releases a checkout: the server holding it frees its units at once (the first
/// waiting client gets them) and answers the holder's next heartbeat or checkin
/// `410 license_revoked`. Audited as `checkout.revoke` with the reason.
#[utoipa::path(post, path = "/v1/checkouts/{id}/revoke", tag = "licences", security(("adminToken" = [])),
    params(("id" = String, Path, description = "The checkout's public id (`co_…`), as `GET /v1/checkouts` lists it")),
    request_body = RevokeRequest,
    responses(
        (status = 200, description = "Revoked: the checkout as it was", body = Revoked),
        (status = 400, description = "`bad_request`: not a checkout id, or no reason (1–500 characters)", body = ErrorBody),
        (status = 404, description = "`not_found`: no server holds a live checkout with this id", body = ErrorBody),
        (status = 409, description = "`conflict`: it was already revoked", body = ErrorBody),
        (status = 503, description = "`unavailable`: not found on the servers that answered, and some did not", body = ErrorBody)))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<Revoked>, ApiError> {
    let id: CheckoutId = id.parse().map_err(|_| {
        ApiError::bad_request("id: expected a checkout id, `co_` and 32 hex digits")
    })?;
    validate_reason(&req.reason).map_err(ApiError::bad_request)?;
    Ok(Json(
        state.engine.revoke(admin.actor(), id, &req.reason).await?,
    ))
}
