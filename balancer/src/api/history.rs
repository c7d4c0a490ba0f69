//! `GET /v1/history`: usage time series for people and tools tuning the schedule and buffers.

use super::error::ApiError;
use super::{Admin, ApiQuery, AppState};
use crate::history::{self, Filter};
use allot_core::validate;
use allot_core::wire::balancer::History;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::time::Duration;

/// The most buckets one answer may hold, to bound its size.
const MAX_BUCKETS: i64 = 10_000;

/// Query parameters of `GET /v1/history`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryParams {
    product: Option<String>,
    server: Option<String>,
    site: Option<String>,
    /// RFC 3339 start; default `to - since`.
    from: Option<DateTime<Utc>>,
    /// RFC 3339 end; default now.
    to: Option<DateTime<Utc>>,
    /// How far back from `to` when `from` is absent, e.g. `7d` (default `1d`).
    since: Option<String>,
    /// Bucket width, e.g. `15m`, `1h` (default `1h`).
    step: Option<String>,
}

fn duration(field: &str, value: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError::bad_request(format!("{field}: {text:?}: {e}"))),
    }
}

/// Usage time series, bucketed.
#[utoipa::path(get, path = "/v1/history", tag = "balancing", security(("adminToken" = [])), params(HistoryParams),
    responses((status = 200, description = "One series per (server, product)", body = History)))]
pub(super) async fn history(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<HistoryParams>,
) -> Result<Json<History>, ApiError> {
    for (field, value) in [
        ("product", &params.product),
        ("server", &params.server),
        ("site", &params.site),
    ] {
        if let Some(value) = value {
            validate::name(field, value)?;
        }
    }
    let now = Utc::now();
    let to = params.to.unwrap_or(now);
    let since = duration(
        "since",
        params.since.as_deref(),
        Duration::from_secs(86_400),
    )?;
    let from = match params.from {
        Some(from) => from,
        // Checked: `to` near the calendar's start minus a long `since` would overflow.
        None => chrono::Duration::from_std(since)
            .ok()
            .and_then(|since| to.checked_sub_signed(since))
            .ok_or_else(|| ApiError::bad_request("since: reaches before the calendar's start"))?,
    };
    let step = duration("step", params.step.as_deref(), Duration::from_secs(3600))?;
    if step < Duration::from_secs(60) {
        return Err(ApiError::bad_request("step: must be at least 1m"));
    }
    if from >= to {
        return Err(ApiError::bad_request("from: must be before to"));
    }
    let buckets =
        (to - from).num_milliseconds() / i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
    if buckets > MAX_BUCKETS {
        return Err(ApiError::bad_request(format!(
            "step: {buckets} buckets requested, at most {MAX_BUCKETS}; widen the step"
        )));
    }
    let filter = Filter {
        product: params.product,
        server: params.server,
        site: params.site,
    };
    Ok(Json(
        history::query(&*state.store, filter, from, to, step, now, &state.retention).await?,
    ))
}
