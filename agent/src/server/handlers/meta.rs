//! What any caller may read without a credential: liveness and the Prometheus metrics. (The
//! OpenAPI document is served by [`super::super::openapi`], which documents these handlers.)

use super::super::App;
use crate::clock::now_ms;
use allot_core::wire::Health;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The process serves requests", body = Health)))]
pub(super) async fn health_handler() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        leader: false,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        shards: Vec::new(),
    })
}

/// Prometheus metrics (text exposition).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "The metrics", body = String, content_type = "text/plain")))]
pub(super) async fn metrics_handler(State(app): State<App>) -> Response {
    let (products, live, lease) = {
        let inner = app.lock();
        (
            inner.book.products(),
            inner.book.live_checkouts(),
            inner.book.lease(),
        )
    };
    let left = lease.map(|until| until.saturating_sub(now_ms()) / 1000);
    let body = app.metrics.render(&products, live, left);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}
