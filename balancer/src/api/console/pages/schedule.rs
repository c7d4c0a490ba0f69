//! The console's schedule and advice pages.

use super::{params, reader};
use crate::api::console::{Console, ConsoleError, ConsoleForm, CsrfForm, Visitor};
use crate::api::{ApiJson, ApiQuery, advice, settings};
use allot_core::wire::balancer::SetSchedule;
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;

/// The schedule, the advisor's recommendation and the button that applies it.
pub(in crate::api::console) async fn schedule(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let app = &console.app;
    let schedule = settings::schedule(State(app.clone()), reader(&visitor))
        .await?
        .0;
    let advice = advice::get_advice(
        State(app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({}))?),
    )
    .await;
    let (advice, advice_error, has_changes) = match advice {
        Ok(a) => {
            let changes = a.0.has_changes();
            (Some(a.0), None, changes)
        }
        Err(e) => (None, Some(e.message().to_owned()), false),
    };
    console.page(
        &visitor,
        "schedule.html",
        "schedule",
        "Schedule",
        minijinja::context! {
            schedule => schedule, advice => advice, advice_error => advice_error,
            has_changes => has_changes,
        },
    )
}

/// The schedule form.
#[derive(Deserialize)]
pub(in crate::api::console) struct ScheduleForm {
    #[serde(default)]
    csrf: String,
    cron: String,
    #[serde(default)]
    timezone: String,
}

/// Sets the schedule (the API's `PUT /v1/schedule`).
pub(in crate::api::console) async fn set_schedule(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<ScheduleForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let timezone = Some(form.timezone.trim().to_owned()).filter(|t| !t.is_empty());
    let set = settings::set_schedule(
        State(console.app.clone()),
        admin,
        ApiJson(SetSchedule {
            cron: form.cron,
            timezone,
        }),
    )
    .await?
    .0;
    Ok(console.done(
        &visitor,
        "/schedule",
        format!("schedule set to {} ({})", set.cron, set.timezone),
    ))
}

/// Applies the advisor's recommendation (the API's `POST /v1/advice/apply`).
pub(in crate::api::console) async fn apply_advice(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let applied = advice::apply_advice(
        State(console.app.clone()),
        admin,
        ApiJson(params(serde_json::json!({"since": "7d"}))?),
    )
    .await?
    .0;
    let applied = serde_json::to_value(&applied).unwrap_or_default();
    Ok(console.done(
        &visitor,
        "/schedule",
        format!("recommendation applied: {}", applied["applied"]),
    ))
}
