//! The console's checkouts page.

use crate::api::console::{Console, ConsoleError, ConsoleForm, Visitor};
use crate::api::{ApiJson, ApiPath, holders};
use crate::balance::HoldersQuery;
use allot_core::checkout::MAX_HOLDERS_PAGE;
use allot_core::wire::agent::RevokeRequest;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;

/// `?q=`: a search over product, server, user and host.
#[derive(Deserialize)]
pub(in crate::api::console) struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// Live holders across the estate, searchable; admins can force-release each.
pub(in crate::api::console) async fn checkouts(
    State(console): State<Console>,
    visitor: Visitor,
    Query(search): Query<SearchQuery>,
) -> Result<Response, ConsoleError> {
    let found = console
        .app
        .engine
        .holders(&HoldersQuery {
            product: None,
            user: None,
            server: None,
            limit: MAX_HOLDERS_PAGE,
            cursor: None,
        })
        .await
        .map_err(crate::api::ApiError::from)?;
    let q = search.q.trim().to_lowercase();
    let holders: Vec<_> = found
        .items
        .into_iter()
        .filter(|h| {
            q.is_empty()
                || [&h.product, &h.server, &h.user, &h.host]
                    .iter()
                    .any(|f| f.to_lowercase().contains(&q))
        })
        .collect();
    console.page(
        &visitor,
        "checkouts.html",
        "checkouts",
        "Checkouts",
        minijinja::context! {
            q => search.q, holders => holders, unreachable => found.unreachable,
        },
    )
}

/// The force-release form: a reason and an explicit confirmation.
#[derive(Deserialize)]
pub(in crate::api::console) struct RevokeForm {
    #[serde(default)]
    csrf: String,
    reason: String,
    #[serde(default)]
    confirm: String,
}

/// Force-releases a checkout through the API's revoke (audited under the operator's name).
pub(in crate::api::console) async fn revoke(
    State(console): State<Console>,
    visitor: Visitor,
    Path(id): Path<String>,
    ConsoleForm(form): ConsoleForm<RevokeForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    if form.confirm != "yes" {
        return Err(ConsoleError::BadRequest(
            "confirm: tick the box to confirm the release".into(),
        ));
    }
    let revoked = holders::revoke(
        State(console.app.clone()),
        admin,
        ApiPath(id),
        ApiJson(RevokeRequest {
            reason: form.reason,
        }),
    )
    .await?
    .0;
    let c = &revoked.checkout;
    Ok(console.done(
        &visitor,
        "/checkouts",
        format!(
            "released {} unit(s) of {} held by {}@{} on {}",
            c.units, c.product, c.user, c.host, c.server
        ),
    ))
}
