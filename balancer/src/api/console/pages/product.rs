//! The console's product page.

use super::{number, reader};
use crate::api::console::{Console, ConsoleError, ConsoleForm, Visitor, svg};
use crate::api::{ApiJson, ApiPath, books, servers};
use crate::store::RunsQuery;
use allot_core::wire::balancer::SetAllocation;
use axum::extract::{Path, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct MoveRow {
    run: i64,
    trigger: String,
    at: DateTime<Utc>,
    server: String,
    kind: String,
    units: u64,
    state: String,
}

/// Runs read for the moves that touched a product, and runs opened among them.
const RECENT_RUNS: u32 = 50;
const RUNS_OPENED: usize = 15;

/// One product: its cells (min and buffer editable), its history, the moves that touched it.
pub(in crate::api::console) async fn product(
    State(console): State<Console>,
    visitor: Visitor,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let app = &console.app;
    let detail = books::show_product(State(app.clone()), reader(&visitor), ApiPath(name.clone()))
        .await?
        .0;
    let now = Utc::now();
    let mut charts = Vec::new();
    for (label, span_h, step_h) in [
        ("Last 24 hours", 24, 1),
        ("Last 7 days", 168, 6),
        ("Last 30 days", 720, 24),
    ] {
        let history = crate::history::query(
            &*app.store,
            crate::history::Filter {
                product: Some(name.clone()),
                ..Default::default()
            },
            now - chrono::Duration::hours(span_h),
            now,
            std::time::Duration::from_secs(step_h as u64 * 3600),
            now,
            &app.retention,
        )
        .await?;
        charts.push(minijinja::context! {
            label => label,
            svg => svg::chart(&history, detail.product.purchased, span_h as u64 / step_h as u64),
        });
    }
    let mut moves = Vec::new();
    let runs = app
        .store
        .runs(&RunsQuery {
            limit: RECENT_RUNS,
            before_id: None,
            trigger: None,
            since_ms: None,
        })
        .await?;
    for run in runs.iter().filter(|r| r.moves > 0).take(RUNS_OPENED) {
        let detail = app.store.run(run.id).await?;
        for m in detail.move_log.into_iter().filter(|m| m.product == name) {
            moves.push(MoveRow {
                run: run.id,
                trigger: run.trigger.to_string(),
                at: run.started_at,
                server: m.server,
                kind: m.kind.to_string(),
                units: m.units,
                state: m.state.to_string(),
            });
        }
    }
    let title = detail.product.name.clone();
    console.page(
        &visitor,
        "product.html",
        "estate",
        &title,
        minijinja::context! {
            product => detail.product,
            cells => detail.servers,
            charts => charts,
            moves => moves,
        },
    )
}

/// The min and buffer form of one cell.
#[derive(Deserialize)]
pub(in crate::api::console) struct LimitsForm {
    #[serde(default)]
    csrf: String,
    server: String,
    min_units: String,
    buffer_units: String,
}

/// Sets a cell's min and buffer (the API's `PUT /v1/servers/{server}/products/{product}`).
pub(in crate::api::console) async fn set_limits(
    State(console): State<Console>,
    visitor: Visitor,
    Path(product): Path<String>,
    ConsoleForm(form): ConsoleForm<LimitsForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let req = SetAllocation {
        min_units: number("min_units", &form.min_units)?,
        buffer_units: number("buffer_units", &form.buffer_units)?,
    };
    let set = servers::set_allocation_limits(
        State(console.app.clone()),
        admin,
        ApiPath((form.server.clone(), product.clone())),
        ApiJson(req),
    )
    .await?
    .0;
    Ok(console.done(
        &visitor,
        &format!("/products/{}", crate::cli::segment(&product)),
        format!(
            "{} on {}: min {} and buffer {} set",
            product, set.server, set.min_units, set.buffer_units
        ),
    ))
}
