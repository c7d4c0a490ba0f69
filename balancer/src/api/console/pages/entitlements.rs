//! The console's entitlements page.

use super::{days_left, number};
use crate::api::console::{Console, ConsoleError, ConsoleForm, CsrfForm, Visitor};
use crate::api::{ApiJson, ApiPath, books};
use allot_core::wire::balancer::AddEntitlement;
use axum::extract::{Path, State};
use axum::response::Response;
use chrono::Utc;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct EntitlementRow {
    #[serde(flatten)]
    entitlement: allot_core::wire::balancer::Entitlement,
    days_left: Option<i64>,
}

/// Every product's purchases with the days left before each expires.
pub(in crate::api::console) async fn entitlements(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let app = &console.app;
    let now = Utc::now();
    let mut rows = Vec::new();
    let mut names = Vec::new();
    for p in app.store.products().await? {
        for e in app.store.entitlements(&p.name).await? {
            rows.push(EntitlementRow {
                days_left: e.expires_at.map(|at| days_left(at, now)),
                entitlement: e,
            });
        }
        names.push(p.name);
    }
    console.page(
        &visitor,
        "entitlements.html",
        "entitlements",
        "Entitlements",
        minijinja::context! { entitlements => rows, products => names },
    )
}

/// The add-a-purchase form.
#[derive(Deserialize)]
pub(in crate::api::console) struct EntitlementForm {
    #[serde(default)]
    csrf: String,
    product: String,
    units: String,
    #[serde(default)]
    expires: String,
    #[serde(default)]
    reference: String,
}

/// Records a purchase (the API's `POST /v1/products/{product}/entitlements`); `expires` is a
/// date, the purchase ending at the start of that day (UTC).
pub(in crate::api::console) async fn add_entitlement(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<EntitlementForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let expires_at = match form.expires.trim() {
        "" => None,
        text => Some(
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map_err(|_| {
                    ConsoleError::BadRequest(format!("expires: expected YYYY-MM-DD, got {text:?}"))
                })?
                .and_hms_opt(0, 0, 0)
                .expect("midnight exists")
                .and_utc(),
        ),
    };
    let reference = Some(form.reference.trim().to_owned()).filter(|r| !r.is_empty());
    let req = AddEntitlement {
        units: number("units", &form.units)?,
        expires_at,
        reference,
    };
    let added = books::add_entitlement(
        State(console.app.clone()),
        admin,
        ApiPath(form.product.clone()),
        ApiJson(req),
    )
    .await?
    .1
    .0;
    Ok(console.done(
        &visitor,
        "/entitlements",
        format!(
            "{} unit(s) of {} added (entitlement {})",
            added.units, added.product, added.id
        ),
    ))
}

/// Removes a purchase (the API's `DELETE /v1/products/{product}/entitlements/{id}`).
pub(in crate::api::console) async fn remove_entitlement(
    State(console): State<Console>,
    visitor: Visitor,
    Path((product, id)): Path<(String, String)>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let id: i64 = number("id", &id)?;
    let removed =
        books::remove_entitlement(State(console.app.clone()), admin, ApiPath((product, id)))
            .await?
            .0;
    Ok(console.done(
        &visitor,
        "/entitlements",
        format!("entitlement {} of {} removed", removed.id, removed.product),
    ))
}
