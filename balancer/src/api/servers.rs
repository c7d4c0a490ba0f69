//! Metering servers and their per-product floors and buffers.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiPath, AppState};
use crate::auth::{self, MAX_TOKEN_GRACE_SECONDS};
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::balancer::{
    AllocationView, List, RegisterServer, RegisteredServer, RotateToken, RotatedToken, Server,
    SetAllocation,
};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

/// Registers a metering server; its token is shown this once.
#[utoipa::path(post, path = "/v1/servers", tag = "servers", security(("adminToken" = [])),
    request_body = RegisterServer,
    responses(
        (status = 201, description = "The server and its token", body = RegisteredServer),
        (status = 409, description = "`conflict`: a server of that name exists", body = ErrorBody)))]
pub(super) async fn register(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<RegisterServer>,
) -> Result<(StatusCode, Json<RegisteredServer>), ApiError> {
    validate::path_name("name", &req.name)?;
    validate::http_url("url", &req.url)?;
    validate::name("site", &req.site)?;
    let salt = auth::ServerTokens::new_salt();
    let token = state.tokens.token(&req.name, &salt);
    let server = state
        .store
        .register_server(admin.actor(), &req, &salt, &auth::hash_token(&token))
        .await?;
    tracing::info!(server = %server.name, site = %server.site, "server registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisteredServer { server, token }),
    ))
}

/// Issues a new token; the old one keeps working for the grace period so the metering server
/// can be restarted with the new one without downtime (see `docs/operator-guide.md`).
#[utoipa::path(post, path = "/v1/servers/{server}/rotate-token", tag = "servers", security(("adminToken" = [])), params(("server" = String, Path, description = "The metering server's name")),
    request_body = RotateToken,
    responses(
        (status = 200, description = "The server and its new token, shown this once; the old token works until `previous_token_until`", body = RotatedToken),
        (status = 400, description = "`bad_request`: grace_seconds out of range", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody)))]
pub(super) async fn rotate_token(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(server): ApiPath<String>,
    ApiJson(req): ApiJson<RotateToken>,
) -> Result<Json<RotatedToken>, ApiError> {
    validate::path_name("server", &server)?;
    let grace = match req.grace_seconds {
        Some(seconds) if seconds > MAX_TOKEN_GRACE_SECONDS => {
            return Err(ApiError::bad_request(format!(
                "grace_seconds: must be at most {MAX_TOKEN_GRACE_SECONDS} (30 days)"
            )));
        }
        Some(seconds) => std::time::Duration::from_secs(u64::from(seconds)),
        None => state.token_grace,
    };
    let previous_until = (!grace.is_zero())
        .then(|| chrono::Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default());
    let salt = auth::ServerTokens::new_salt();
    let token = state.tokens.token(&server, &salt);
    let record = state
        .store
        .rotate_server_token(
            admin.actor(),
            &server,
            &salt,
            &auth::hash_token(&token),
            previous_until,
        )
        .await?;
    let server = Server::from(record);
    tracing::info!(%server.name, previous_token_until = ?server.previous_token_until, "server token rotated");
    Ok(Json(RotatedToken { server, token }))
}

/// Registered metering servers.
#[utoipa::path(get, path = "/v1/servers", tag = "servers", security(("adminToken" = [])),
    responses((status = 200, description = "Every server", body = List<Server>)))]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<List<Server>>, ApiError> {
    Ok(Json(List {
        items: state.store.servers().await?,
    }))
}

/// Empties a server down to its in-use units, ignoring its floors.
#[utoipa::path(post, path = "/v1/servers/{server}/drain", tag = "servers", security(("adminToken" = [])), params(("server" = String, Path, description = "The metering server's name")),
    responses(
        (status = 200, description = "The server, now draining", body = Server),
        (status = 404, description = "`not_found`", body = ErrorBody)))]
pub(super) async fn drain(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(server): ApiPath<String>,
) -> Result<Json<Server>, ApiError> {
    validate::path_name("server", &server)?;
    let drained = state.store.drain_server(admin.actor(), &server).await?;
    tracing::info!(%server, "server draining");
    Ok(Json(drained))
}

/// Removes an empty server.
#[utoipa::path(delete, path = "/v1/servers/{server}", tag = "servers", security(("adminToken" = [])), params(("server" = String, Path, description = "The metering server's name")),
    responses(
        (status = 200, description = "The removed server", body = Server),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`: the server still holds units", body = ErrorBody)))]
pub(super) async fn remove(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(server): ApiPath<String>,
) -> Result<Json<Server>, ApiError> {
    validate::path_name("server", &server)?;
    let removed = state.store.remove_server(admin.actor(), &server).await?;
    tracing::info!(%server, "server removed");
    Ok(Json(removed))
}

/// Sets one cell's floor and buffer.
#[utoipa::path(put, path = "/v1/servers/{server}/products/{product}", tag = "servers", security(("adminToken" = [])),
    params(
        ("server" = String, Path, description = "The metering server's name"),
        ("product" = String, Path, description = "The product's name")),
    request_body = SetAllocation,
    responses(
        (status = 200, description = "The cell", body = AllocationView),
        (status = 404, description = "`not_found` (server) or `unknown_product`", body = ErrorBody)))]
pub(super) async fn set_allocation_limits(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((server, product)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<SetAllocation>,
) -> Result<Json<AllocationView>, ApiError> {
    validate::path_name("server", &server)?;
    validate::path_name("product", &product)?;
    validate::units_or_zero("min_units", req.min_units)?;
    validate::units_or_zero("buffer_units", req.buffer_units)?;
    let view = state
        .store
        .set_allocation_limits(admin.actor(), &server, &product, &req)
        .await?;
    state.engine.books_changed(&product, Some(&server));
    tracing::info!(%server, %product, min = req.min_units, buffer = req.buffer_units, "allocation limits set");
    Ok(Json(view))
}
