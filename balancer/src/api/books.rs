//! Products and their purchases.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiPath, AppState};
use allot_core::domain::Policy;
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::agent::ProductDefinition;
use allot_core::wire::balancer::{
    AddEntitlement, CreateProduct, Entitlement, List, Product, ProductDetail,
};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

fn validate_product(def: &CreateProduct) -> Result<(), validate::Invalid> {
    validate::path_name("name", &def.name)?;
    if let Some(publisher) = &def.publisher {
        validate::name("publisher", publisher)?;
    }
    if let Some(version) = &def.version {
        validate::name("version", version)?;
    }
    validate::policy(&def.policy())
}

/// Defines a product and its policy.
#[utoipa::path(post, path = "/v1/products", tag = "books", security(("adminToken" = [])),
    request_body = CreateProduct,
    responses(
        (status = 201, description = "The new product, with empty books", body = Product),
        (status = 409, description = "`conflict`: a product of that name exists", body = ErrorBody)))]
pub(super) async fn create_product(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(def): ApiJson<CreateProduct>,
) -> Result<(StatusCode, Json<Product>), ApiError> {
    validate_product(&def)?;
    let product = state.store.create_product(admin.actor(), &def).await?;
    tracing::info!(product = %product.name, "product created");
    Ok((StatusCode::CREATED, Json(product)))
}

/// Every product with its books.
#[utoipa::path(get, path = "/v1/products", tag = "books", security(("adminToken" = [])),
    responses((status = 200, description = "Every product", body = List<Product>)))]
pub(super) async fn list_products(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<List<Product>>, ApiError> {
    Ok(Json(List {
        items: state.store.products().await?,
    }))
}

/// One product and how it is split among the servers.
#[utoipa::path(get, path = "/v1/products/{product}", tag = "books", security(("adminToken" = [])), params(("product" = String, Path, description = "The product's name")),
    responses(
        (status = 200, description = "The product and its per-server split", body = ProductDetail),
        (status = 404, description = "`unknown_product`", body = ErrorBody)))]
pub(super) async fn show_product(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(product): ApiPath<String>,
) -> Result<Json<ProductDetail>, ApiError> {
    validate::path_name("product", &product)?;
    Ok(Json(state.store.product(&product).await?))
}

/// Replaces a product's policy — enforcement, seat, heartbeat, staleout, ACL and options —
/// whole; metering servers adopt it at their next sync.
#[utoipa::path(put, path = "/v1/products/{product}/policy", tag = "books", security(("adminToken" = [])), params(("product" = String, Path, description = "The product's name")),
    request_body = ProductDefinition,
    responses(
        (status = 200, description = "The product with its new policy", body = Product),
        (status = 400, description = "`bad_request`: a field out of range, an unknown scope, a duplicate rule", body = ErrorBody),
        (status = 404, description = "`unknown_product`", body = ErrorBody)))]
pub(super) async fn set_policy(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(product): ApiPath<String>,
    ApiJson(def): ApiJson<ProductDefinition>,
) -> Result<Json<Product>, ApiError> {
    validate::path_name("product", &product)?;
    let policy: Policy = def.into();
    validate::policy(&policy)?;
    let product = state
        .store
        .set_policy(admin.actor(), &product, &policy)
        .await?;
    tracing::info!(product = %product.name, "product policy replaced");
    Ok(Json(product))
}

/// Records a purchase: purchased and the reserve grow by its units.
#[utoipa::path(post, path = "/v1/products/{product}/entitlements", tag = "books", security(("adminToken" = [])), params(("product" = String, Path, description = "The product's name")),
    request_body = AddEntitlement,
    responses(
        (status = 201, description = "The entitlement", body = Entitlement),
        (status = 404, description = "`unknown_product`", body = ErrorBody)))]
pub(super) async fn add_entitlement(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath(product): ApiPath<String>,
    ApiJson(req): ApiJson<AddEntitlement>,
) -> Result<(StatusCode, Json<Entitlement>), ApiError> {
    validate::path_name("product", &product)?;
    validate::units("units", req.units)?;
    if let Some(reference) = &req.reference {
        validate::name("reference", reference)?;
    }
    if let Some(expires_at) = req.expires_at
        && expires_at <= chrono::Utc::now()
    {
        return Err(ApiError::bad_request("expires_at: must be in the future"));
    }
    let entitlement = state
        .store
        .add_entitlement(admin.actor(), &product, &req)
        .await?;
    state.engine.books_changed(&product, None);
    tracing::info!(%product, id = entitlement.id, units = entitlement.units, "entitlement added");
    Ok((StatusCode::CREATED, Json(entitlement)))
}

/// The product's live entitlements.
#[utoipa::path(get, path = "/v1/products/{product}/entitlements", tag = "books", security(("adminToken" = [])), params(("product" = String, Path, description = "The product's name")),
    responses(
        (status = 200, description = "The live entitlements", body = List<Entitlement>),
        (status = 404, description = "`unknown_product`", body = ErrorBody)))]
pub(super) async fn list_entitlements(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(product): ApiPath<String>,
) -> Result<Json<List<Entitlement>>, ApiError> {
    validate::path_name("product", &product)?;
    Ok(Json(List {
        items: state.store.entitlements(&product).await?,
    }))
}

/// Removes a purchase; refused unless its units are free in the reserve.
#[utoipa::path(delete, path = "/v1/products/{product}/entitlements/{id}", tag = "books", security(("adminToken" = [])),
    params(
        ("product" = String, Path, description = "The product's name"),
        ("id" = i64, Path, description = "The entitlement's id")),
    responses(
        (status = 200, description = "The removed entitlement", body = Entitlement),
        (status = 404, description = "`unknown_product`, or `not_found` (no such entitlement)", body = ErrorBody),
        (status = 409, description = "`conflict`: its units are not free in the reserve", body = ErrorBody)))]
pub(super) async fn remove_entitlement(
    State(state): State<AppState>,
    admin: Admin,
    ApiPath((product, id)): ApiPath<(String, i64)>,
) -> Result<Json<Entitlement>, ApiError> {
    validate::path_name("product", &product)?;
    let entitlement = state
        .store
        .remove_entitlement(admin.actor(), &product, id)
        .await?;
    state.engine.books_changed(&product, None);
    tracing::info!(%product, id, units = entitlement.units, "entitlement removed");
    Ok(Json(entitlement))
}
