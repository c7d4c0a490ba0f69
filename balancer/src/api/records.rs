//! Usage and denial records (issue 15): metering servers ship them (`POST /v1/records`, with
//! the server's token); administrators read them as reports (`GET /v1/usage`,
//! `GET /v1/usage/renewal`).

use super::error::ApiError;
use super::metering::MeteringServer;
use super::{Admin, ApiJson, ApiQuery, AppState};
use crate::store::RecordsQuery;
use allot_core::error::ErrorBody;
use allot_core::usage::{profile, renewal_suggestion};
use allot_core::validate;
use allot_core::wire::records::{
    GroupBy, RecordAck, RecordBatch, RenewalReport, RenewalRow, UsageReport, UsageRow,
};
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::time::Duration;

/// The largest batch body a metering server may send (1,000 typical records fit in a third).
pub(super) const MAX_BATCH_BYTES: usize = 1 << 20;
/// The widest window a report may read: a year and a renewal's margin.
const MAX_SPAN: Duration = Duration::from_secs(400 * 86_400);
/// The most rows a usage report returns (the groups with the most hours).
const MAX_ROWS: usize = 10_000;

/// Stores a batch of the server's records; a record already stored is acknowledged again and
/// stored once.
#[utoipa::path(post, path = "/v1/records", tag = "metering", security(("serverToken" = [])),
    request_body = RecordBatch,
    responses(
        (status = 200, description = "Every record of the batch is stored; the server may forget them", body = RecordAck),
        (status = 400, description = "`bad_request`: a record is malformed or the batch holds over 1,000 records", body = ErrorBody),
        (status = 413, description = "`bad_request`: the body is over 1 MiB", body = ErrorBody)))]
pub(super) async fn store_records(
    State(state): State<AppState>,
    MeteringServer(server, _): MeteringServer,
    ApiJson(batch): ApiJson<RecordBatch>,
) -> Result<Json<RecordAck>, ApiError> {
    batch.validate()?;
    let (ack, dropped) = state.store.store_records(&server.name, &batch).await?;
    if dropped > 0 {
        tracing::warn!(server = %server.name, dropped, "records naming unknown products dropped");
    }
    tracing::debug!(server = %server.name, stored = ack.stored, duplicates = ack.duplicates, "records stored");
    Ok(Json(RecordAck {
        stored: ack.stored,
        duplicates: ack.duplicates + dropped,
    }))
}

/// Query parameters of the reports.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageParams {
    /// Window start: RFC 3339, or how far back from `until` (`30d`, `12h`). Default 30 days
    /// (a year for the renewal report).
    since: Option<String>,
    /// Window end, RFC 3339; default now.
    until: Option<DateTime<Utc>>,
    /// Only this product.
    product: Option<String>,
    /// `user` (default), `group`, `host`, `server`, `site` or `product`.
    group_by: Option<String>,
}

/// The window a report reads, checked: ordered, not wider than [`MAX_SPAN`].
fn window(
    params: &UsageParams,
    default_since: Duration,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let until = params.until.unwrap_or_else(Utc::now);
    let since = match params.since.as_deref() {
        None => until - chrono::Duration::from_std(default_since).unwrap_or_default(),
        Some(text) => match DateTime::parse_from_rfc3339(text) {
            Ok(at) => at.with_timezone(&Utc),
            Err(_) => {
                let back = humantime::parse_duration(text).map_err(|e| {
                    ApiError::bad_request(format!(
                        "since: {text:?} is neither RFC 3339 nor a duration: {e}"
                    ))
                })?;
                chrono::Duration::from_std(back.min(MAX_SPAN))
                    .ok()
                    .and_then(|back| until.checked_sub_signed(back))
                    .ok_or_else(|| ApiError::bad_request("since: reaches before the calendar"))?
            }
        },
    };
    if since >= until {
        return Err(ApiError::bad_request("since: must be before until"));
    }
    if (until - since).to_std().unwrap_or(Duration::MAX) > MAX_SPAN {
        return Err(ApiError::bad_request(format!(
            "since: a report spans at most {} days",
            MAX_SPAN.as_secs() / 86_400
        )));
    }
    if let Some(product) = &params.product {
        validate::path_name("product", product)?;
    }
    Ok((since, until))
}

/// Checkouts, unit-hours, peak concurrent and denials per user, group, host, server, site or
/// product over a window.
#[utoipa::path(get, path = "/v1/usage", tag = "records", security(("adminToken" = [])), params(UsageParams),
    responses(
        (status = 200, description = "One row per group, most hours first", body = UsageReport),
        (status = 400, description = "`bad_request`: a bad window, product or grouping", body = ErrorBody)))]
pub(super) async fn usage(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> Result<Json<UsageReport>, ApiError> {
    let (since, until) = window(&params, Duration::from_secs(30 * 86_400))?;
    let group_by: GroupBy = params
        .group_by
        .as_deref()
        .unwrap_or("user")
        .parse()
        .map_err(ApiError::bad_request)?;
    let totals = state
        .store
        .usage_totals(&RecordsQuery {
            since_ms: since.timestamp_millis(),
            until_ms: until.timestamp_millis(),
            product: params.product.clone(),
            group_by,
        })
        .await?;
    let mut rows: Vec<UsageRow> = totals
        .into_iter()
        .map(|t| UsageRow {
            key: t.key,
            checkouts: t.checkouts,
            hours: t.unit_ms as f64 / 3_600_000.0,
            peak_concurrent: t.peak,
            denials_true: t.denials_true,
            denials_false: t.denials_false,
            denials_other: t.denials_other,
        })
        .collect();
    rows.sort_by(|a, b| b.hours.total_cmp(&a.hours).then_with(|| a.key.cmp(&b.key)));
    rows.truncate(MAX_ROWS);
    Ok(Json(UsageReport {
        since,
        until,
        group_by,
        rows,
    }))
}

/// Per product: purchased against peak, 95th percentile and mean concurrent use, hours at the
/// cap, denials and units never used — and what that suggests at renewal.
#[utoipa::path(get, path = "/v1/usage/renewal", tag = "records", security(("adminToken" = [])), params(UsageParams),
    responses(
        (status = 200, description = "One row per product", body = RenewalReport),
        (status = 400, description = "`bad_request`: a bad window or product", body = ErrorBody)))]
pub(super) async fn renewal(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> Result<Json<RenewalReport>, ApiError> {
    if params.group_by.is_some() {
        return Err(ApiError::bad_request(
            "group_by: the renewal report is per product",
        ));
    }
    let (since, until) = window(&params, Duration::from_secs(365 * 86_400))?;
    let (from, to) = (since.timestamp_millis(), until.timestamp_millis());
    let denials = state
        .store
        .usage_totals(&RecordsQuery {
            since_ms: from,
            until_ms: to,
            product: params.product.clone(),
            group_by: GroupBy::Product,
        })
        .await?;
    let mut products = Vec::new();
    for p in state.store.products().await? {
        if params.product.as_ref().is_some_and(|only| *only != p.name) {
            continue;
        }
        let intervals = state.store.usage_intervals(&p.name, from, to).await?;
        let used = profile(&intervals, from, to, p.purchased);
        let (denials_true, denials_false) = denials
            .iter()
            .find(|t| t.key == p.name)
            .map_or((0, 0), |t| (t.denials_true, t.denials_false));
        products.push(RenewalRow {
            suggestion: renewal_suggestion(p.purchased, &used, denials_true),
            product: p.name,
            purchased: p.purchased,
            peak: used.peak,
            p95: used.p95,
            average: used.average,
            hours_at_cap: used.at_cap_ms as f64 / 3_600_000.0,
            denials_true,
            denials_false,
            never_used: p.purchased.saturating_sub(used.peak),
        });
    }
    Ok(Json(RenewalReport {
        since,
        until,
        products,
    }))
}
