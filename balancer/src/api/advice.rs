//! `GET /v1/advice`, `POST /v1/advice/apply` and the autotune setting.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiQuery, AppState};
use crate::advice::{self, Applied, Autotune};
use allot_core::advisor::Advice;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The window of `GET /v1/advice` and `POST /v1/advice/apply`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams, utoipa::ToSchema)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AdviceParams {
    /// How far back to read, e.g. `7d` (default 7 days, at most 30).
    since: Option<String>,
}

fn window(params: &AdviceParams) -> Result<Duration, ApiError> {
    let since = match params.since.as_deref() {
        None => Duration::from_secs(7 * 86_400),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError::bad_request(format!("since: {text:?}: {e}")))?,
    };
    if since < Duration::from_secs(3600) || since > advice::MAX_WINDOW {
        return Err(ApiError::bad_request("since: must be between 1h and 30d"));
    }
    Ok(since)
}

/// Schedule and buffer recommendations, with their evidence.
#[utoipa::path(get, path = "/v1/advice", tag = "settings", security(("adminToken" = [])), params(AdviceParams),
    responses((status = 200, description = "The advice", body = Advice)))]
pub(super) async fn get_advice(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<AdviceParams>,
) -> Result<Json<Advice>, ApiError> {
    let since = window(&params)?;
    Ok(Json(
        advice::advise(&*state.store, since, chrono::Utc::now()).await?,
    ))
}

/// The answer of `POST /v1/advice/apply`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AppliedAdvice {
    advice: Advice,
    applied: Applied,
}

/// Applies the recommendations (audited).
#[utoipa::path(post, path = "/v1/advice/apply", tag = "settings", security(("adminToken" = [])),
    request_body = AdviceParams,
    responses((status = 200, description = "The advice and what it changed", body = AppliedAdvice)))]
pub(super) async fn apply_advice(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(params): ApiJson<AdviceParams>,
) -> Result<Json<AppliedAdvice>, ApiError> {
    let since = window(&params)?;
    let advice = advice::advise(&*state.store, since, chrono::Utc::now()).await?;
    let applied = advice::apply(
        &*state.store,
        &state.engine,
        &advice,
        &format!("{} (advice)", admin.actor()),
        &state.schedule_changed,
    )
    .await?;
    tracing::info!(?applied, "advice applied");
    Ok(Json(AppliedAdvice { advice, applied }))
}

/// The autotune setting.
#[utoipa::path(get, path = "/v1/autotune", tag = "settings", security(("adminToken" = [])),
    responses((status = 200, description = "The setting", body = Autotune)))]
pub(super) async fn get_autotune(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Autotune>, ApiError> {
    Ok(Json(advice::autotune(&*state.store).await?))
}

/// Turns autotune on or off, within bounds.
#[utoipa::path(put, path = "/v1/autotune", tag = "settings", security(("adminToken" = [])),
    request_body = Autotune,
    responses((status = 200, description = "The new setting", body = Autotune)))]
pub(super) async fn set_autotune(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(setting): ApiJson<Autotune>,
) -> Result<Json<Autotune>, ApiError> {
    let b = &setting.bounds;
    allot_core::validate::units_or_zero("bounds.max_buffer_units", b.max_buffer_units)?;
    allot_core::validate::units_or_zero("bounds.max_min_units", b.max_min_units)?;
    if b.min_interval_minutes == 0
        || b.min_interval_minutes > b.max_interval_minutes
        || b.max_interval_minutes > 24 * 60
    {
        return Err(ApiError::bad_request(
            "bounds: need 1 <= min_interval_minutes <= max_interval_minutes <= 1440",
        ));
    }
    if !(1..=30).contains(&setting.window_days) {
        return Err(ApiError::bad_request(
            "window_days: must be between 1 and 30",
        ));
    }
    advice::set_autotune(&*state.store, admin.actor(), &setting).await?;
    Ok(Json(setting))
}
