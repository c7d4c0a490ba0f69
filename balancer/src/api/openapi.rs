//! The balancer's OpenAPI document (`GET /v1/openapi.json`, `docs/openapi/balancer.json`),
//! generated from the code: the routes and their `#[utoipa::path]` operations are registered
//! together (see [`super::routes`]), and the schemas are derived from the wire types, so the
//! document cannot drift from what the balancer serves.

use allot_core::error::ErrorBody;
use utoipa::OpenApi;

/// The parts of the document no handler states: title, description, security schemes and the
/// error body. (The error responses implied by each operation's shape are added once the
/// routes are in, by [`super::document`].)
#[derive(OpenApi)]
#[openapi(
    info(
        title = "allot balancer (allot-balancer)",
        description = "The books (purchases, allocations, reserve, move log), balancing, history \
            and advice. Admin calls take `Authorization: Bearer <admin token>`, or an operator's \
            `Authorization: Basic` (a viewer may only read; audited under the operator's \
            name); metering servers \
            call `/v1/sync` and `/v1/instant-balance` with their own token.\n\n\
            Every error is `{\"error\": {\"code\", \"message\"}}` with a stable `code` (see \
            `ErrorCode`); a client branches on the code, never on the message. Bodies are at \
            most 64 KiB of `application/json`; unknown fields are refused. A path no route \
            serves answers `404 not_found`, a wrong method `405 bad_request`. Followers answer \
            changes with `421 not_leader`. Clients must ignore response fields they do not know: \
            fields are added within `/v1`, never renamed or removed.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "books", description = "Products and their purchases"),
        (name = "servers", description = "Metering servers and their per-product floors and buffers"),
        (name = "balancing", description = "Balance runs, their history and the doctor"),
        (name = "settings", description = "The schedule, autotune and the audit log"),
        (name = "records", description = "Usage and denial reports for chargeback and renewal"),
        (name = "licences", description = "Who holds what across the estate, and force release"),
        (name = "operators", description = "The people who administer the balancer under their own name"),
        (name = "metering", description = "Called by metering servers with their own token"),
        (name = "meta", description = "Health, metrics and this document")
    )
)]
pub(super) struct ApiDoc;

/// The two bearer tokens: the operator's admin token and each metering server's own.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        allot_core::openapi::add_bearer_schemes(
            openapi,
            &[
                (
                    "adminToken",
                    "The admin token the balancer was started with (`--admin-token`).",
                ),
                (
                    "serverToken",
                    "A metering server's own token, shown once when it was registered.",
                ),
            ],
        );
    }
}
