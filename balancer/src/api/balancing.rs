//! Balance runs on demand, their history, the doctor, and the explanation of a plan.

use super::error::ApiError;
use super::{Admin, ApiJson, ApiPath, ApiQuery, AppState};
use crate::balance::BalanceError;
use crate::store::RunsQuery;
use allot_core::ErrorCode;
use allot_core::domain::RunTrigger;
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::balancer::{
    BalanceRequest, DoctorReport, Explanation, List, RunDetail, RunSummary,
};
use axum::Json;
use axum::extract::State;
use serde::Deserialize;

impl From<BalanceError> for ApiError {
    fn from(e: BalanceError) -> Self {
        match e {
            BalanceError::Store(e) => e.into(),
            BalanceError::NotLeader => ApiError::new(
                ErrorCode::NotLeader,
                "this balancer is not the leader; send the request to the leader",
            ),
            BalanceError::Plan(why) => {
                tracing::error!(%why, "the planner refused the books");
                ApiError::new(
                    ErrorCode::Internal,
                    "the planner refused the books; see the log",
                )
            }
        }
    }
}

/// Runs a manual balance now and answers with it once it ends. A run longer than the request
/// timeout (30 s: a large estate's first distribution) is answered `503` and goes on to its end.
#[utoipa::path(post, path = "/v1/balance", tag = "balancing", security(("adminToken" = [])),
    request_body = BalanceRequest,
    responses(
        (status = 200, description = "The run and its moves", body = RunDetail),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 421, description = "`not_leader`: another balancer leads the product's shard; `error.leader_url` names it", body = ErrorBody),
        (status = 503, description = "`unavailable`: the run outlasted the request timeout; it goes on to its end (see `GET /v1/runs`)", body = ErrorBody)))]
pub(super) async fn balance(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(req): ApiJson<BalanceRequest>,
) -> Result<Json<RunDetail>, ApiError> {
    if let Some(product) = &req.product {
        validate::path_name("product", product)?;
    }
    // The run is its own task: a run longer than the request timeout, or whose caller goes
    // away, still runs to its end (it is then in `GET /v1/runs`), never cut between phases.
    let engine = state.engine.clone();
    let product = req.product.clone();
    let run = tokio::spawn(async move { engine.run(RunTrigger::Manual, product.as_deref()).await });
    match run.await {
        Ok(Ok(detail)) => Ok(Json(detail)),
        // A product of a shard led elsewhere: the caller is sent to that shard's leader.
        Ok(Err(BalanceError::NotLeader)) => Err(ApiError::from(BalanceError::NotLeader)
            .with_leader_url(super::leader_url(&state, req.product.as_deref()).await)),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => {
            tracing::error!(error = %e, "the manual run's task failed");
            Err(ApiError::new(
                ErrorCode::Internal,
                "the run failed; see the log",
            ))
        }
    }
}

/// Filters and paging of `GET /v1/runs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct RunsParams {
    /// Page size, 1–1000 (default 50).
    limit: Option<u32>,
    /// Runs older than this id.
    #[param(minimum = 1)]
    before: Option<i64>,
    /// Only this trigger: scheduled, instant, manual or reclaim.
    trigger: Option<RunTrigger>,
    /// Only runs started within this long before now, e.g. `1d`.
    since: Option<String>,
}

/// Balance runs, newest first.
#[utoipa::path(get, path = "/v1/runs", tag = "balancing", security(("adminToken" = [])), params(RunsParams),
    responses((status = 200, description = "One page of runs", body = List<RunSummary>)))]
pub(super) async fn runs(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(params): ApiQuery<RunsParams>,
) -> Result<Json<List<RunSummary>>, ApiError> {
    let limit = params.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit: must be between 1 and 1000, got {limit}"
        )));
    }
    let since_ms = match params.since.as_deref() {
        None => None,
        Some(text) => {
            let back = humantime::parse_duration(text)
                .map_err(|e| ApiError::bad_request(format!("since: {text:?}: {e}")))?;
            let back = i64::try_from(back.as_millis()).unwrap_or(i64::MAX);
            Some(chrono::Utc::now().timestamp_millis().saturating_sub(back))
        }
    };
    let query = RunsQuery {
        limit,
        before_id: super::cursor(params.before)?,
        trigger: params.trigger,
        since_ms,
    };
    Ok(Json(List {
        items: state.store.runs(&query).await?,
    }))
}

/// One run with its moves.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "balancing", security(("adminToken" = [])),
    params(("id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = RunDetail),
        (status = 404, description = "`not_found`", body = ErrorBody)))]
pub(super) async fn run(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<RunDetail>, ApiError> {
    Ok(Json(state.store.run(id).await?))
}

/// The books against every reachable server.
#[utoipa::path(get, path = "/v1/doctor", tag = "balancing", security(("adminToken" = [])),
    responses((status = 200, description = "The report; `ok` is false on any disagreement", body = DoctorReport)))]
pub(super) async fn doctor(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<DoctorReport>, ApiError> {
    Ok(Json(state.engine.doctor().await?))
}

/// The filter of `GET /v1/products/{product}/explain`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ExplainParams {
    /// Only this server's line.
    server: Option<String>,
}

/// What a run would decide for the product now, and the rule behind each server's target.
#[utoipa::path(get, path = "/v1/products/{product}/explain", tag = "balancing", security(("adminToken" = [])),
    params(("product" = String, Path, description = "The product's name"), ExplainParams),
    responses(
        (status = 200, description = "The plan a run would make, explained", body = Explanation),
        (status = 404, description = "`unknown_product`", body = ErrorBody)))]
pub(super) async fn explain(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(product): ApiPath<String>,
    ApiQuery(params): ApiQuery<ExplainParams>,
) -> Result<Json<Explanation>, ApiError> {
    validate::path_name("product", &product)?;
    if let Some(server) = &params.server {
        validate::path_name("server", server)?;
    }
    Ok(Json(
        state
            .engine
            .explain(&product, params.server.as_deref())
            .await?,
    ))
}
