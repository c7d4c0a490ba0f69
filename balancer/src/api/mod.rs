//! The balancer's HTTP API (v1): thin handlers that validate at the edge, call the store and
//! answer JSON. Every route but `/healthz`, `/metrics` and `/v1/openapi.json` needs the admin
//! token.

mod advice;
mod balancing;
mod books;
pub mod console;
pub mod error;
mod history;
mod holders;
mod metering;
mod openapi;
pub(crate) mod operators;
mod records;
mod servers;
mod settings;

use crate::auth::{AdminToken, ServerTokens};
use crate::store::Store;
use allot_core::ErrorCode;
use allot_core::error::ErrorBody;
use allot_core::validate::{self, MAX_BODY_BYTES};
use allot_core::wire::Health;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::{Json, Router};
use error::ApiError;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    pub leadership: tokio::sync::watch::Receiver<allot_core::shard::Fence>,
    /// How long a rotated-out server token keeps working when the rotation names no grace.
    pub token_grace: Duration,
    /// This balancer's metrics, exported on `/metrics` (the engine counts into the same).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Checks operators' passwords (HTTP Basic here, logins in the console), throttled.
    pub operators: crate::operators::Authenticator,
}

/// A JSON body (the shared `allot_http::json` checks: content type, size, a JSON object, no
/// unknown field) whose rejections answer in the API's error shape.
#[derive(FromRequest)]
#[from_request(via(allot_http::json::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Path parameters whose rejections answer in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query parameters whose rejections answer in the API's error shape; a query that does not
/// percent-decode to UTF-8 is refused rather than read with replacement characters.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        validate::query_utf8(parts.uri.query().unwrap_or(""))?;
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// A paging cursor (`?before=<id>`): ids start at 1, so a smaller one is a mistake, not an
/// empty page.
fn cursor(before: Option<i64>) -> Result<Option<i64>, ApiError> {
    match before {
        Some(id) if id < 1 => Err(ApiError::bad_request(format!(
            "before: must be an id of at least 1, got {id}"
        ))),
        other => Ok(other),
    }
}

/// Proof that the caller may call the admin API: the admin token (the root credential,
/// audited as `admin`) or an operator's name and password (HTTP Basic, audited under their
/// name). A viewer may only read: any other method is `403 forbidden`.
pub struct Admin {
    actor: String,
}

impl Admin {
    /// The actor the audit log records for the admin token.
    pub const ROOT: &'static str = "admin";

    /// The admin token's actor under its name from before operators existed, so handlers
    /// written then still build. A handler using it audits `admin` whoever called: it should
    /// take `admin: Admin` and record [`Admin::actor`] instead.
    pub const ACTOR: &'static str = Self::ROOT;

    /// The operator acting (`admin` for the admin token), recorded in the audit log.
    pub fn actor(&self) -> &str {
        &self.actor
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let authorization = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(token) = authorization.and_then(|v| v.strip_prefix("Bearer "))
            && state.admin.verify(token)
        {
            return Ok(Admin {
                actor: Self::ROOT.to_owned(),
            });
        }
        let Some((name, password)) = authorization.and_then(basic_credentials) else {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "admin calls need `Authorization: Bearer <admin token>` or an operator's \
                 `Authorization: Basic`",
            ));
        };
        let addr = peer_ip(parts);
        let operator = state
            .operators
            .login(&name, &password, addr)
            .await
            .map_err(ApiError::from)?;
        let reads = matches!(
            parts.method,
            axum::http::Method::GET | axum::http::Method::HEAD
        );
        if operator.role == crate::operators::Role::Viewer && !reads {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "operator {} is a viewer: viewers change nothing",
                    operator.name
                ),
            ));
        }
        Ok(Admin {
            actor: operator.name,
        })
    }
}

/// The address a connection came from, handed to handlers as `ConnectInfo<Peer>` (plain TCP
/// and TLS listeners alike), so failed logins are throttled per address.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, allot_http::tls::TlsListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, allot_http::tls::TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The peer's IP address, when the server records it.
pub fn peer_ip(parts: &Parts) -> Option<std::net::IpAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|info| info.0.0.ip())
}

/// The name and password of an `Authorization: Basic …` header, if it is one.
fn basic_credentials(header: &str) -> Option<(String, String)> {
    use base64::Engine;
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

impl From<crate::operators::LoginError> for ApiError {
    fn from(e: crate::operators::LoginError) -> Self {
        use crate::operators::LoginError;
        match e {
            LoginError::Wrong => Self::new(ErrorCode::Unauthorized, e.to_string()),
            // Throttled: still `unauthorized` (the stable code), with the wait in the message.
            LoginError::Throttled(_) => Self::new(ErrorCode::Unauthorized, e.to_string()),
            LoginError::Store(e) => e.into(),
        }
    }
}

/// Every route with its OpenAPI operation. `routes!` registers a handler at the path and
/// methods its `#[utoipa::path]` names, so a route cannot be served undocumented.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(books::create_product, books::list_products))
        .routes(routes!(books::show_product))
        .routes(routes!(books::set_policy))
        .routes(routes!(books::add_entitlement, books::list_entitlements))
        .routes(routes!(books::remove_entitlement))
        .routes(routes!(servers::register, servers::list))
        .routes(routes!(servers::remove))
        .routes(routes!(servers::drain))
        .routes(routes!(servers::rotate_token))
        .routes(routes!(servers::set_allocation_limits))
        .routes(routes!(settings::schedule, settings::set_schedule))
        .routes(routes!(settings::audit))
        .routes(routes!(balancing::balance))
        .routes(routes!(balancing::runs))
        .routes(routes!(balancing::run))
        .routes(routes!(balancing::doctor))
        .routes(routes!(balancing::explain))
        .routes(routes!(history::history))
        .routes(routes!(advice::get_advice))
        .routes(routes!(advice::apply_advice))
        .routes(routes!(advice::get_autotune, advice::set_autotune))
        .routes(routes!(holders::holders))
        .routes(routes!(holders::revoke))
        .routes(routes!(metering::sync))
        .routes(routes!(metering::instant_balance))
        .routes({
            // A batch of records is larger than any other body: its own bound.
            let (schemas, paths, route) = routes!(records::store_records);
            (
                schemas,
                paths,
                route.layer(DefaultBodyLimit::max(records::MAX_BATCH_BYTES)),
            )
        })
        .routes(routes!(records::usage))
        .routes(routes!(records::renewal))
        .routes(routes!(operators::list, operators::add))
        .routes(routes!(operators::remove))
}

/// The balancer's OpenAPI document, as served at `/v1/openapi.json` and written to
/// `docs/openapi/balancer.json` by `allot-balancer openapi`.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = routes().into_openapi();
    allot_core::openapi::CommonErrors {
        writes_need_the_leader: true,
    }
    .modify(&mut document);
    document
}

/// [`document`], built once: it never changes while the process runs.
fn cached_document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(document)
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_leader,
        ))
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::map_response(timeout_in_the_error_shape))
        .layer(axum::middleware::from_fn_with_state(
            {
                let metrics = state.metrics.clone();
                allot_http::refusals::Refusals::new(move |reason| {
                    metrics
                        .requests_refused
                        .with_label_values(&[reason.as_str()])
                        .inc();
                })
            },
            allot_http::refusals::count_refused,
        ))
        .with_state(state)
}

/// How long any request may take before it is answered `503 unavailable`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The timeout layer answers with an empty body; every answer of the API, this one too, carries
/// the error shape with a stable code.
async fn timeout_in_the_error_shape(
    response: axum::response::Response,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let bare = !response
        .headers()
        .contains_key(axum::http::header::CONTENT_TYPE);
    if response.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE && bare {
        return ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "the request took longer than {} s; retry later",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response();
    }
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
    if reads || state.leadership.borrow().leads_any() {
        return next.run(request).await;
    }
    ApiError::new(
        ErrorCode::NotLeader,
        "this balancer follows; send changes to the leader",
    )
    .with_leader_url(leader_url(&state, None).await)
    .into_response()
}

/// Where the leader of `product`'s shard is reached — with no product, the leader of the first
/// shard that has one — when the books know it.
pub(crate) async fn leader_url(state: &AppState, product: Option<&str>) -> Option<String> {
    let shards = state.store.shard_leaders().await.ok()?;
    let count = u32::try_from(shards.len()).ok()?;
    let shard = match product {
        Some(product) => shards.get(allot_core::shard::shard_of(product, count) as usize),
        None => shards.iter().find(|l| !l.url.is_empty()),
    };
    shard.map(|l| l.url.clone()).filter(|u| !u.is_empty())
}

/// Liveness and leadership.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The process serves requests", body = Health)))]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    let fence = state.leadership.borrow().clone();
    Json(Health {
        status: "ok".into(),
        leader: fence.leads_any(),
        version: env!("CARGO_PKG_VERSION").into(),
        shards: fence.epochs().keys().copied().collect(),
    })
}

/// Prometheus metrics (text exposition).
#[utoipa::path(get, path = "/metrics", tag = "meta", responses(
    (status = 200, description = "The metrics", body = String, content_type = "text/plain"),
    (status = 503, description = "`unavailable`: the store failed", body = ErrorBody)))]
async fn metrics(State(state): State<AppState>) -> Result<String, ApiError> {
    let fence = state.leadership.borrow().clone();
    Ok(crate::metrics::render(&state.metrics, &*state.store, &fence).await?)
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(cached_document())
}

/// Serves the API on `listener` (over TLS when `tls` is given) until `shutdown` resolves,
/// then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    tls: Option<allot_http::tls::ServerTls>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The peer's address reaches the handlers, so failed logins are throttled per address.
    let router = router(state).into_make_service_with_connect_info::<Peer>();
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    #[tokio::test]
    async fn a_timed_out_request_is_answered_in_the_error_shape() {
        let timed_out = StatusCode::SERVICE_UNAVAILABLE.into_response();
        let answer = timeout_in_the_error_shape(timed_out).await;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(answer.into_body(), 4096)
            .await
            .unwrap();
        let body: allot_core::error::ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unavailable);
        // An error the API already shaped passes through untouched.
        let shaped = ApiError::new(ErrorCode::Unavailable, "store down").into_response();
        let answer = timeout_in_the_error_shape(shaped).await;
        let body = axum::body::to_bytes(answer.into_body(), 4096)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&body).contains("store down"));
    }
}
