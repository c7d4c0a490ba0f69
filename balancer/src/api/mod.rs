//! The balancer's HTTP API (v1): thin handlers that validate at the edge, call the store and
//! answer JSON. Every route but `/healthz`, `/metrics` and `/v1/openapi.json` needs the admin
//! token.

mod advice;
mod balancing;
mod books;
pub mod error;
mod history;
mod metering;
mod openapi;
mod servers;
mod settings;

use crate::auth::{AdminToken, ServerTokens};
use crate::store::Store;
use allot_core::ErrorCode;
use allot_core::validate::MAX_BODY_BYTES;
use allot_core::wire::Health;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use error::ApiError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The books.
    pub store: Arc<dyn Store>,
    /// The admin token's digest.
    pub admin: AdminToken,
    /// Derives metering servers' tokens.
    pub tokens: ServerTokens,
    /// Runs balances.
    pub engine: crate::balance::Engine,
    /// Wakes the scheduler when the schedule changes.
    pub schedule_changed: Arc<tokio::sync::Notify>,
    /// How long history is kept (decides where history queries read).
    pub retention: crate::history::Retention,
    /// The leader epoch while this balancer leads; `None` while it follows.
    pub leadership: tokio::sync::watch::Receiver<Option<i64>>,
    /// How long a rotated-out server token keeps working when the rotation names no grace.
    pub token_grace: Duration,
}

/// A JSON body whose rejections (syntax, unknown fields, size) answer in the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Path parameters whose rejections answer in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query parameters whose rejections answer in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Proof that the caller presented the admin token; the audit log names it `admin`.
pub struct Admin;

impl Admin {
    /// The actor recorded in the audit log.
    pub const ACTOR: &'static str = "admin";
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if state.admin.verify(token) => Ok(Admin),
            _ => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "admin calls need `Authorization: Bearer <admin token>`",
            )),
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/products",
            post(books::create_product).get(books::list_products),
        )
        .route("/products/{product}", get(books::show_product))
        .route(
            "/products/{product}/entitlements",
            post(books::add_entitlement).get(books::list_entitlements),
        )
        .route(
            "/products/{product}/entitlements/{id}",
            axum::routing::delete(books::remove_entitlement),
        )
        .route("/servers", post(servers::register).get(servers::list))
        .route("/servers/{server}", axum::routing::delete(servers::remove))
        .route("/servers/{server}/drain", post(servers::drain))
        .route(
            "/servers/{server}/rotate-token",
            post(servers::rotate_token),
        )
        .route(
            "/servers/{server}/products/{product}",
            put(servers::set_allocation_limits),
        )
        .route(
            "/schedule",
            get(settings::schedule).put(settings::set_schedule),
        )
        .route("/audit", get(settings::audit))
        .route("/balance", post(balancing::balance))
        .route("/runs", get(balancing::runs))
        .route("/runs/{id}", get(balancing::run))
        .route("/doctor", get(balancing::doctor))
        .route("/history", get(history::history))
        .route("/advice", get(advice::get_advice))
        .route("/advice/apply", post(advice::apply_advice))
        .route(
            "/autotune",
            get(advice::get_autotune).put(advice::set_autotune),
        )
        .route("/sync", post(metering::sync))
        .route("/instant-balance", post(metering::instant_balance));
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/v1/openapi.json",
            get(|| async { Json(openapi::document()) }),
        )
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_leader,
        ))
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(30),
        ))
        .layer(axum::middleware::from_fn(count_refused))
        .with_state(state)
}

/// Logs and counts every request refused for its credentials, in one place whichever
/// extractor refused it (admin or metering-server token). The log names the method and path,
/// never the presented token.
async fn count_refused(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let reason = match response.status() {
        axum::http::StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        axum::http::StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        _ => return response,
    };
    crate::metrics::METRICS
        .requests_refused
        .with_label_values(&[reason.as_str()])
        .inc();
    tracing::warn!(%method, %path, reason = reason.as_str(), "request refused for its credentials");
    response
}

/// Followers serve reads; every other call goes to the leader: `421 not_leader` with its URL.
async fn require_leader(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let reads = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if reads || state.leadership.borrow().is_some() {
        return next.run(request).await;
    }
    let leader_url = state.store.leader().await.map(|(_, url)| url).ok();
    let mut body = allot_core::error::ErrorBody::new(
        ErrorCode::NotLeader,
        "this balancer follows; send changes to the leader",
    );
    body.error.leader_url = leader_url.filter(|u| !u.is_empty());
    (axum::http::StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response()
}

async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        leader: state.leadership.borrow().is_some(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

async fn metrics(State(state): State<AppState>) -> Result<String, ApiError> {
    let leading = state.leadership.borrow().is_some();
    Ok(crate::metrics::render(&*state.store, leading).await?)
}

/// Serves the API on `listener` (over TLS when `tls` is given) until `shutdown` resolves,
/// then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    tls: Option<allot_tls::ServerTls>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state);
    match tls {
        Some(tls) => {
            axum::serve(tls.listener(listener)?, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
