//! The console's runs and audit pages.

use super::{number, params, reader};
use crate::api::console::{Console, ConsoleError, Visitor};
use crate::api::{ApiPath, ApiQuery, balancing, settings};
use axum::extract::{Path, State};
use axum::response::Response;

/// Balance runs, newest first.
pub(in crate::api::console) async fn runs(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let runs = balancing::runs(
        State(console.app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({"limit": 100}))?),
    )
    .await?
    .0;
    console.page(
        &visitor,
        "runs.html",
        "runs",
        "Runs",
        minijinja::context! { runs => runs.items },
    )
}

/// One run and its moves.
pub(in crate::api::console) async fn run(
    State(console): State<Console>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let id: i64 = number("id", &id)?;
    let run = balancing::run(State(console.app.clone()), reader(&visitor), ApiPath(id))
        .await?
        .0;
    console.page(
        &visitor,
        "run.html",
        "runs",
        &format!("Run {id}"),
        minijinja::context! { run => run },
    )
}

/// The audit log, newest first.
pub(in crate::api::console) async fn audit(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let entries = settings::audit(
        State(console.app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({"limit": 200}))?),
    )
    .await?
    .0;
    console.page(
        &visitor,
        "audit.html",
        "audit",
        "Audit log",
        minijinja::context! { entries => entries.items },
    )
}
