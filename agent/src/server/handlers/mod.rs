//! The metering server's HTTP handlers, by caller: [`clients`] (checkout, heartbeat, checkin,
//! products), [`balancer`] (status, moves, product definitions; the server's token),
//! [`holders`] (who holds what, force release; the server's token) and
//! [`meta`] (liveness, metrics). Each is a thin shell around the book in [`super::Shared`].
//!
//! [`table`] registers every handler with its OpenAPI operation; [`super::openapi`] documents
//! that table and the router serves it.

mod balancer;
mod callbacks;
mod clients;
mod holders;
mod meta;

pub use clients::MAX_WAIT_SECONDS;

use super::App;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Every handler with its OpenAPI operation. `routes!` registers a handler at the path and
/// methods its `#[utoipa::path]` names, so a route cannot be served undocumented.
pub(super) fn table() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(meta::health_handler))
        .routes(routes!(meta::metrics_handler))
        .routes(routes!(clients::checkout_handler))
        .routes(routes!(clients::heartbeat_handler))
        .routes(routes!(clients::checkin_handler))
        .routes(routes!(clients::products_handler))
        .routes(routes!(clients::borrow_handler))
        .routes(routes!(clients::return_handler))
        .routes(routes!(callbacks::register_handler))
        .routes(routes!(callbacks::poll_handler, callbacks::cancel_handler))
        .routes(routes!(callbacks::claim_handler))
        .routes(routes!(balancer::define_handler))
        .routes(routes!(balancer::status_handler))
        .routes(routes!(balancer::release_handler))
        .routes(routes!(balancer::grant_handler))
        .routes(routes!(balancer::batch_handler))
        .routes(routes!(balancer::retire_handler))
        .routes(routes!(holders::holders_handler))
        .routes(routes!(holders::revoke_handler))
}
