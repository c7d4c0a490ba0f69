//! What the OpenAPI documents of both processes share (feature `openapi`): the error answer
//! and the error responses every operation of a kind may give.
//!
//! The handlers' `#[utoipa::path]` attributes list only the errors particular to them
//! (`unknown_product`, `conflict`, …); [`CommonErrors`] adds the ones that follow from an
//! operation's shape — a body can be malformed or too large, a token can be wrong — so they are
//! documented on every operation they apply to and written in one place.

use crate::ErrorCode;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};

/// Declares bearer-token security schemes (`name`, description), as both servers' documents do
/// for their tokens.
pub fn add_bearer_schemes(openapi: &mut OpenApi, schemes: &[(&str, &str)]) {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    let components = openapi.components.get_or_insert_with(Default::default);
    for (name, description) in schemes {
        components.add_security_scheme(
            *name,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(*description))
                    .build(),
            ),
        );
    }
}

/// An error response: the `{"error": {"code", "message"}}` body, described by its codes.
pub fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// Adds the error responses implied by an operation's shape, keeping any the handler states.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommonErrors {
    /// The balancer answers every change made on a follower with `421 not_leader`.
    pub writes_need_the_leader: bool,
}

impl CommonErrors {
    fn operation(self, method: &str, op: &mut Operation) {
        let mut add = |status: &str, code: ErrorCode, why: &str| {
            op.responses
                .responses
                .entry(status.to_owned())
                .or_insert_with(|| RefOr::T(error_response(&format!("`{code}`: {why}"))));
        };
        if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
            add(
                "401",
                ErrorCode::Unauthorized,
                "no bearer token, or one that matches nobody",
            );
            // Every call that takes a token reads the store.
            add(
                "503",
                ErrorCode::Unavailable,
                "the store failed, the request timed out, or the server is stopping; retry later",
            );
        }
        let has_body = op.request_body.is_some();
        let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
        if has_body || has_params {
            add(
                "400",
                ErrorCode::BadRequest,
                "malformed JSON, an unknown field, or a value out of range",
            );
        }
        if has_body {
            add(
                "413",
                ErrorCode::BadRequest,
                "the body is larger than 64 KiB",
            );
            add(
                "415",
                ErrorCode::BadRequest,
                "the body is not `application/json`",
            );
        }
        if self.writes_need_the_leader && method != "get" {
            add(
                "421",
                ErrorCode::NotLeader,
                "this balancer follows; `error.leader_url` names the leader when known",
            );
        }
    }
}

/// Every operation of a path item with its lower-case method name.
fn operations(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("get", item.get.as_mut()),
        ("put", item.put.as_mut()),
        ("post", item.post.as_mut()),
        ("delete", item.delete.as_mut()),
        ("patch", item.patch.as_mut()),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.map(|op| (method, op)))
}

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for (method, op) in operations(item) {
                self.operation(method, op);
            }
        }
    }
}
