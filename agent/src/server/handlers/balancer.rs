//! The calls the balancer makes with this server's token: the status it reads each run, the
//! moves it sends (release, grant; idempotent by move id) and the product definitions it
//! pushes.

use super::super::auth::BalancerAuth;
use super::super::pull::pull;
use super::super::writer::{WriterMsg, durable};
use super::super::{App, define, new_handle};
use crate::clock::now_ms;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::store::Mutation;
use allot_core::checkout::MoveRefusal;
use allot_core::domain::MoveKind;
use allot_core::error::ErrorBody;
use allot_core::validate;
use allot_core::wire::agent::{
    AgentProduct, AgentStatus, BatchOutcome, BatchResponse, MAX_BATCH_MOVES, MoveBatch,
    MoveRequest, MoveResponse, ProductDefinition,
};
use axum::Json;
use axum::extract::{RawQuery, State};
use tokio::sync::oneshot;

/// Reads `peek` from the status query: `true`/`1` reads without resetting the counters.
fn parse_peek(query: Option<&str>) -> Result<bool, ApiError> {
    let mut peek = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        peek = match pair {
            "peek" | "peek=true" | "peek=1" => true,
            "peek=false" | "peek=0" => false,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "query: expected peek=true or peek=false, got {:?}",
                    pair.chars().take(64).collect::<String>()
                )));
            }
        };
    }
    Ok(peek)
}

/// `GET /v1/status[?peek=true]`: a plain read resets the since-last counters (the balancer's
/// runs read them once per run); a peek (the doctor) leaves them for the next run.
#[utoipa::path(get, path = "/v1/status", tag = "balancer", security(("serverToken" = [])),
    params(("peek" = Option<bool>, Query, description = "`true`: read without resetting the `since_last` counters (the doctor)")),
    responses(
        (status = 200, description = "Per-product figures", body = AgentStatus),
        (status = 503, description = "`unavailable`: the store failed", body = ErrorBody)))]
pub(super) async fn status_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    RawQuery(query): RawQuery,
) -> Result<Json<AgentStatus>, ApiError> {
    let peek = parse_peek(query.as_deref())?;
    let products = app.lock().book.status(!peek);
    // Report nothing that is not yet durable.
    app.barrier().await?;
    Ok(Json(AgentStatus {
        server: app.name.clone(),
        products,
    }))
}

/// Applies one move under the lock: the book decides (idempotent by move id), a fresh
/// application is logged and may serve waiters; a repeat waits for the first to be durable.
/// Returns the answer, what to await before answering, and whether it was fresh.
fn apply_move(
    app: &App,
    inner: &mut super::super::Inner,
    req: &MoveRequest,
    kind: MoveKind,
    now: u64,
) -> Result<(MoveResponse, oneshot::Receiver<bool>, bool), ApiError> {
    let outcome = match kind {
        MoveKind::Release => inner.book.release(req.move_id, &req.product, req.units),
        MoveKind::Retire => inner.book.retire(req.move_id, &req.product, req.units),
        MoveKind::Grant => {
            inner
                .book
                .grant(req.move_id, &req.product, req.units, now, &mut new_handle)
        }
    };
    let outcome = outcome.map_err(|r| match r {
        MoveRefusal::UnknownProduct => ApiError::UnknownProduct(req.product.clone()),
        MoveRefusal::Conflict => ApiError::Conflict(format!(
            "move {} was already applied as another move",
            req.move_id
        )),
    })?;
    let fresh = outcome.applied.is_some();
    let ack = match outcome.applied {
        Some(applied) => {
            let ack = app.log(inner, Mutation::Move { applied, at: now });
            app.dispatch(inner, outcome.served, now);
            pull(app, inner, &req.product, now);
            tracing::info!(move_id = %req.move_id, product = %req.product, %kind,
                units = outcome.response.units, allocation = outcome.response.allocation,
                generation = outcome.response.generation, "move applied");
            ack
        }
        None => {
            // A repeat: answer only once the first application is durable.
            let (tx, rx) = oneshot::channel();
            let _ = app.writer.send(WriterMsg::Barrier(tx));
            rx
        }
    };
    Ok((outcome.response, ack, fresh))
}

pub(super) async fn move_handler(
    app: &App,
    req: MoveRequest,
    kind: MoveKind,
) -> Result<Json<MoveResponse>, ApiError> {
    validate::path_name("product", &req.product)?;
    validate::units("units", req.units)?;
    app.check_writable()?;
    let now = now_ms();
    let (response, ack, fresh) = {
        let mut inner = app.lock();
        apply_move(app, &mut inner, &req, kind, now)?
    };
    durable(ack).await?;
    if fresh && kind == MoveKind::Grant {
        allot_http::fault::point("agent_grant_applied");
    }
    Ok(Json(response))
}

/// Applies a run's moves for this server in one request, in order, under one lock; their log
/// entries go to the group-commit writer together, and the answer waits until all are durable.
/// Each move keeps its own idempotency by id and its own outcome: a move the book refuses
/// (`unknown_product`, `conflict`) is reported and the rest still apply. A bad batch (empty,
/// over [`MAX_BATCH_MOVES`], a bad name or unit count anywhere) is refused whole and changes
/// nothing.
#[utoipa::path(post, path = "/v1/allocations/batch", tag = "balancer", security(("serverToken" = [])),
    request_body = MoveBatch,
    responses(
        (status = 200, description = "One outcome per move, in order", body = BatchResponse),
        (status = 400, description = "`bad_request`: empty, too long, or a bad move", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn batch_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(batch): ApiJson<MoveBatch>,
) -> Result<Json<BatchResponse>, ApiError> {
    if batch.moves.is_empty() || batch.moves.len() > MAX_BATCH_MOVES {
        return Err(ApiError::BadRequest(format!(
            "moves: must hold 1 to {MAX_BATCH_MOVES} moves, got {}",
            batch.moves.len()
        )));
    }
    for m in &batch.moves {
        validate::path_name("product", &m.product)?;
        validate::units("units", m.units)?;
    }
    app.check_writable()?;
    let now = now_ms();
    let mut outcomes = Vec::with_capacity(batch.moves.len());
    let mut acks = Vec::with_capacity(batch.moves.len());
    let mut fresh_grant = false;
    {
        let mut inner = app.lock();
        for m in batch.moves {
            let req = MoveRequest {
                move_id: m.move_id,
                product: m.product,
                units: m.units,
            };
            match apply_move(&app, &mut inner, &req, m.kind, now) {
                Ok((response, ack, fresh)) => {
                    fresh_grant |= fresh && m.kind == MoveKind::Grant;
                    acks.push(ack);
                    outcomes.push(BatchOutcome {
                        move_id: m.move_id,
                        applied: Some(response),
                        refused: None,
                    });
                }
                Err(e) => outcomes.push(BatchOutcome {
                    move_id: m.move_id,
                    applied: None,
                    refused: Some(ErrorBody::new(e.code(), e.to_string()).error),
                }),
            }
        }
    }
    for ack in acks {
        durable(ack).await?;
    }
    if fresh_grant {
        allot_http::fault::point("agent_grant_applied");
    }
    Ok(Json(BatchResponse { outcomes }))
}

/// Releases free units to the reserve (never in-use units); idempotent by `move_id`.
#[utoipa::path(post, path = "/v1/allocations/release", tag = "balancer", security(("serverToken" = [])),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "What was released, and the allocation after", body = MoveResponse),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`conflict`: the move id was used for another move", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn release_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveResponse>, ApiError> {
    move_handler(&app, req, MoveKind::Release).await
}

/// Retires units of an expired entitlement: they leave the allocation, free units first and
/// then units in use (which stay with their clients; no new checkout is granted until the
/// server is back under its allocation); idempotent by `move_id`.
#[utoipa::path(post, path = "/v1/allocations/retire", tag = "balancer", security(("serverToken" = [])),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "What was retired, and the allocation after", body = MoveResponse),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`conflict`: the move id was used for another move", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn retire_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveResponse>, ApiError> {
    move_handler(&app, req, MoveKind::Retire).await
}

/// Adds units from the reserve; idempotent by `move_id`.
#[utoipa::path(post, path = "/v1/allocations/grant", tag = "balancer", security(("serverToken" = [])),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "What was granted, and the allocation after", body = MoveResponse),
        (status = 404, description = "`unknown_product`", body = ErrorBody),
        (status = 409, description = "`conflict`: the move id was used for another move", body = ErrorBody),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn grant_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<MoveResponse>, ApiError> {
    move_handler(&app, req, MoveKind::Grant).await
}

/// Defines a product or replaces its policy (the balancer pushes definitions here).
#[utoipa::path(put, path = "/v1/products/{product}", tag = "balancer", security(("serverToken" = [])),
    params(("product" = String, Path, description = "The product's name")),
    request_body = ProductDefinition,
    responses(
        (status = 200, description = "The product as this server now applies it", body = AgentProduct),
        (status = 503, description = "`unavailable`: the store failed, or the server is stopping", body = ErrorBody)))]
pub(super) async fn define_handler(
    State(app): State<App>,
    _auth: BalancerAuth,
    ApiPath(product): ApiPath<String>,
    ApiJson(def): ApiJson<ProductDefinition>,
) -> Result<Json<AgentProduct>, ApiError> {
    validate::path_name("product", &product)?;
    validate::policy(&def.clone().into())?;
    app.check_writable()?;
    let now = now_ms();
    let (ack, view) = {
        let mut inner = app.lock();
        let ack = define(&app, &mut inner, &product, def, now);
        let view = inner
            .book
            .products()
            .into_iter()
            .find(|p| p.product == product);
        (ack, view)
    };
    let view = view.ok_or_else(|| ApiError::Internal("defined product vanished".to_owned()))?;
    durable(ack).await?;
    tracing::info!(%product, "product defined");
    Ok(Json(view))
}
