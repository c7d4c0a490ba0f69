//! Operators (`/v1/operators`): the people who log in to the console or call this API with HTTP
//! Basic under their own name. Listing needs any credential; adding and removing need the admin
//! token or an admin operator (see [`Admin`]). Passwords are hashed before the store sees them.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiPath, AppState};
use crate::operators::{self, AddOperator, Operator};
use allot_core::error::ErrorBody;
use allot_core::wire::balancer::List;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

/// Every operator (never their password hashes).
#[utoipa::path(get, path = "/v1/operators", tag = "operators", security(("adminToken" = [])),
    responses((status = 200, description = "Every operator, by name", body = List<Operator>)))]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<List<Operator>>, ApiError> {
    Ok(Json(List {
        items: state.store.operators().await?,
    }))
}

/// Adds an operator; the password is stored only as its argon2id hash.
#[utoipa::path(post, path = "/v1/operators", tag = "operators", security(("adminToken" = [])),
    request_body = AddOperator,
    responses(
        (status = 201, description = "The operator", body = Operator),
        (status = 400, description = "`bad_request`: a bad name, role or password", body = ErrorBody),
        (status = 403, description = "`forbidden`: a viewer cannot add operators", body = ErrorBody),
        (status = 409, description = "`conflict`: an operator of that name exists", body = ErrorBody)))]
pub(super) async fn add(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<AddOperator>,
) -> Result<(StatusCode, Json<Operator>), ApiError> {
    let operator = add_operator(&state, admin.actor(), &req).await?;
    tracing::info!(operator = %operator.name, role = operator.role.as_str(), "operator added");
    Ok((StatusCode::CREATED, Json(operator)))
}

/// Validates, hashes and stores a new operator as `actor`: the one way operators are added,
/// from the API and from the console alike.
pub(crate) async fn add_operator(
    state: &AppState,
    actor: &str,
    req: &AddOperator,
) -> Result<Operator, ApiError> {
    operators::validate_name(&req.name).map_err(|e| ApiError::bad_request(e.0))?;
    operators::validate_password(&req.password).map_err(|e| ApiError::bad_request(e.0))?;
    let password = req.password.clone();
    // argon2 is deliberately slow: off the async threads.
    let hash = tokio::task::spawn_blocking(move || operators::hash_password(&password))
        .await
        .map_err(|_| ApiError::bad_request("password: could not be hashed"))?;
    Ok(state
        .store
        .add_operator(actor, &req.name, req.role, &hash)
        .await?)
}

/// Removes an operator: their password stops working at once (console sessions included).
#[utoipa::path(delete, path = "/v1/operators/{name}", tag = "operators", security(("adminToken" = [])),
    params(("name" = String, Path, description = "The operator's name")),
    responses(
        (status = 200, description = "The removed operator", body = Operator),
        (status = 400, description = "`bad_request`: not an operator name", body = ErrorBody),
        (status = 403, description = "`forbidden`: a viewer cannot remove operators", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody)))]
pub(super) async fn remove(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Operator>, ApiError> {
    operators::validate_name(&name).map_err(|e| ApiError::bad_request(e.0))?;
    let removed = state.store.remove_operator(admin.actor(), &name).await?;
    tracing::info!(operator = %name, "operator removed");
    Ok(Json(removed))
}
