//! The metering server's OpenAPI document (`GET /v1/openapi.json`, `docs/openapi/agent.json`),
//! generated from the code: the handlers' `#[utoipa::path]` operations are registered together
//! with their routes (`handlers::table`), and the schemas are derived from the wire
//! types, so the document cannot drift from what the server serves.
//!
//! Layering: this module documents the handlers' table and adds the route that serves the
//! document; the server's router serves what `routes` returns. The handlers never
//! refer to it.

use super::App;
use super::handlers;
use allot_core::error::ErrorBody;
use allot_core::openapi::CommonErrors;
use axum::Json;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The parts of the document no handler states: title, description, security schemes and the
/// error body.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "allot metering server (allot-agent)",
        description = "Local, durable, policy-true license checkouts for clients, and the \
            balancer-facing calls (status, release, grant, product definitions).\n\n\
            Every error is `{\"error\": {\"code\", \"message\"}}` with a stable `code` (see \
            `ErrorCode`); a client branches on the code, never on the message. Bodies are at \
            most 64 KiB of `application/json`; unknown fields are refused. A path no route \
            serves answers `404 not_found`, a wrong method `405 bad_request`. Clients must \
            ignore response fields they do not know: fields are added within `/v1`, never \
            renamed or removed.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "clients", description = "Checkouts, heartbeats, checkins"),
        (name = "balancer", description = "Called by the balancer with this server's token"),
        (name = "meta", description = "Health, metrics and this document")
    )
)]
struct ApiDoc;

/// The client key (optional) and the server's own token.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        allot_core::openapi::add_bearer_schemes(
            openapi,
            &[
                (
                    "clientKey",
                    "Only when the server runs with `--client-key`; otherwise clients send none.",
                ),
                (
                    "serverToken",
                    "The server's own token (`--token`), presented by the balancer.",
                ),
            ],
        );
    }
}

/// Every route of the server with its operation, under the document's header: the handlers'
/// table and the route that serves this document.
pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(handlers::table())
        .routes(routes!(openapi_handler))
}

/// The metering server's OpenAPI document, as served at `/v1/openapi.json` and written to
/// `docs/openapi/agent.json` by `allot-agent openapi`.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = routes().into_openapi();
    CommonErrors::default().modify(&mut document);
    document
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi_handler() -> Json<&'static utoipa::openapi::OpenApi> {
    static DOCUMENT: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(document))
}
