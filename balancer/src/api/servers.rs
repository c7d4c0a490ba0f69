//! Metering servers and their per-product floors and buffers.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiPath, AppState};
use crate::auth;
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::balancer::{
    AllocationView, List, RegisterServer, RegisteredServer, Server, SetAllocation,
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
    _: Admin,
    ApiJson(req): ApiJson<RegisterServer>,
) -> Result<(StatusCode, Json<RegisteredServer>), ApiError> {
    validate::path_name("name", &req.name)?;
    validate::http_url("url", &req.url)?;
    validate::name("site", &req.site)?;
    let salt = auth::ServerTokens::new_salt();
    let token = state.tokens.token(&req.name, &salt);
    let server = state
        .store
        .register_server(Admin::ACTOR, &req, &salt, &auth::hash_token(&token))
        .await?;
    tracing::info!(server = %server.name, site = %server.site, "server registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisteredServer { server, token }),
    ))
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
    _: Admin,
    ApiPath(server): ApiPath<String>,
) -> Result<Json<Server>, ApiError> {
    validate::path_name("server", &server)?;
    let drained = state.store.drain_server(Admin::ACTOR, &server).await?;
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
    _: Admin,
    ApiPath(server): ApiPath<String>,
) -> Result<Json<Server>, ApiError> {
    validate::path_name("server", &server)?;
    let removed = state.store.remove_server(Admin::ACTOR, &server).await?;
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
    _: Admin,
    ApiPath((server, product)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<SetAllocation>,
) -> Result<Json<AllocationView>, ApiError> {
    validate::path_name("server", &server)?;
    validate::path_name("product", &product)?;
    validate::units_or_zero("min_units", req.min_units)?;
    validate::units_or_zero("buffer_units", req.buffer_units)?;
    let view = state
        .store
        .set_allocation_limits(Admin::ACTOR, &server, &product, &req)
        .await?;
    tracing::info!(%server, %product, min = req.min_units, buffer = req.buffer_units, "allocation limits set");
    Ok(Json(view))
}
