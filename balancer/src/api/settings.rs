//! The schedule and the audit log.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiQuery, AppState};
use crate::schedule::Schedule as ParsedSchedule;
use crate::store::{AuditQuery, ScheduleSetting};
use allot_core::wire::balancer::{AuditEntry, List, Schedule, SetSchedule};
use axum::Json;
use axum::extract::State;
use serde::Deserialize;

/// How many upcoming runs `GET /v1/schedule` shows.
const NEXT_RUNS: usize = 5;

fn view(setting: ScheduleSetting) -> Result<Schedule, ApiError> {
    let parsed = ParsedSchedule::parse(&setting.cron, Some(&setting.timezone))?;
    Ok(Schedule {
        next_runs: parsed.next_runs(chrono::Utc::now(), NEXT_RUNS),
        cron: setting.cron,
        timezone: setting.timezone,
    })
}

/// The schedule and its next five runs.
#[utoipa::path(get, path = "/v1/schedule", tag = "settings", security(("adminToken" = [])),
    responses((status = 200, description = "The schedule", body = Schedule)))]
pub(super) async fn schedule(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Schedule>, ApiError> {
    Ok(Json(view(state.store.schedule().await?)?))
}

/// Replaces the schedule (a cron expression read in an IANA time zone).
#[utoipa::path(put, path = "/v1/schedule", tag = "settings", security(("adminToken" = [])),
    request_body = SetSchedule,
    responses((status = 200, description = "The new schedule", body = Schedule)))]
pub(super) async fn set_schedule(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<SetSchedule>,
) -> Result<Json<Schedule>, ApiError> {
    let parsed = ParsedSchedule::parse(&req.cron, req.timezone.as_deref())?;
    let setting = ScheduleSetting {
        cron: req.cron,
        timezone: parsed.timezone_name().to_owned(),
    };
    state.store.set_schedule(admin.actor(), &setting).await?;
    state.schedule_changed.notify_one();
    tracing::info!(cron = %setting.cron, timezone = %setting.timezone, "schedule set");
    Ok(Json(view(setting)?))
}

/// Paging of `GET /v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
    /// Page size, 1–1000 (default 100).
    limit: Option<u32>,
    /// Entries older than this id (the last id of the previous page).
    #[param(minimum = 1)]
    before: Option<i64>,
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "settings", security(("adminToken" = [])), params(AuditParams),
    responses((status = 200, description = "One page of entries", body = List<AuditEntry>)))]
pub(super) async fn audit(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<List<AuditEntry>>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit: must be between 1 and 1000, got {limit}"
        )));
    }
    let items = state
        .store
        .audit(AuditQuery {
            limit,
            before_id: super::cursor(params.before)?,
        })
        .await?;
    Ok(Json(List { items }))
}
