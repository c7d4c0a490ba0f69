//! The balancer's OpenAPI 3 document (`GET /v1/openapi.json`), written by hand so it stays
//! small and readable; an end-to-end test checks that every route the router serves is listed.

use serde_json::{Value, json};

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn ok(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"type": "object"}}}})
}

fn body(description: &str) -> Value {
    json!({
        "required": true,
        "description": description,
        "content": {"application/json": {"schema": {"type": "object"}}}
    })
}

/// One admin operation: summary, optional body, success description and the error codes it
/// may answer (besides 401 `unauthorized`, which every admin call may).
fn admin(summary: &str, request: Option<&str>, success: &str, errors: &[(&str, &str)]) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert("200".into(), ok(success));
    responses.insert("401".into(), error("unauthorized"));
    responses.insert(
        "421".into(),
        error("not_leader (a follower; error.leader_url names the leader)"),
    );
    for (status, code) in errors {
        responses.insert((*status).into(), error(code));
    }
    let mut op =
        json!({"summary": summary, "security": [{"adminToken": []}], "responses": responses});
    if let Some(request) = request {
        op["requestBody"] = body(request);
    }
    op
}

/// The document.
pub fn document() -> Value {
    let bad = ("400", "bad_request");
    let product = ("404", "unknown_product");
    let missing = ("404", "not_found");
    let conflict = ("409", "conflict");
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "allot balancer (allot-balancer)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The books (purchases, allocations, reserve, move log), balancing, \
                history and advice. Admin calls take `Authorization: Bearer <admin token>`; \
                metering servers call /v1/sync and /v1/instant-balance with their own token. \
                Errors are {\"error\": {\"code\", \"message\"}} with a stable code; bodies are \
                at most 64 KiB and unknown fields are refused. Followers answer changes with \
                421 not_leader."
        },
        "paths": {
            "/healthz": {"get": {"summary": "Liveness and leadership", "responses": {"200": ok("{status, leader, version}")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text exposition)", "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok("OpenAPI 3 document")}}},
            "/v1/products": {
                "post": admin("Define a product and its policy", Some("CreateProduct: name, publisher?, version?, enforcement, seat, heartbeat_seconds, staleout_seconds, acl"), "Product", &[bad, conflict]),
                "get": admin("Every product with its books", None, "{items: [Product]}", &[])
            },
            "/v1/products/{product}": {"get": admin("One product and its per-server split", None, "ProductDetail", &[bad, product])},
            "/v1/products/{product}/entitlements": {
                "post": admin("Record a purchase (purchased and reserve grow)", Some("AddEntitlement: units 1–1,000,000, expires_at?, reference?"), "Entitlement", &[bad, product]),
                "get": admin("The product's live entitlements", None, "{items: [Entitlement]}", &[bad, product])
            },
            "/v1/products/{product}/entitlements/{id}": {"delete": admin("Remove a purchase; refused unless its units are free in the reserve", None, "Entitlement", &[bad, product, missing, conflict])},
            "/v1/servers": {
                "post": admin("Register a metering server; its token is shown once", Some("RegisterServer: name, url, site"), "RegisteredServer", &[bad, conflict]),
                "get": admin("Registered servers", None, "{items: [Server]}", &[])
            },
            "/v1/servers/{server}": {"delete": admin("Remove an empty server", None, "Server", &[bad, missing, conflict])},
            "/v1/servers/{server}/drain": {"post": admin("Empty a server down to its in-use units", None, "Server", &[bad, missing])},
            "/v1/servers/{server}/rotate-token": {"post": admin("Issue a new token for a server; the old one works for the grace period or until the server presents the new one", Some("RotateToken: grace_seconds (optional, 0–2,592,000; 0 refuses the old token at once)"), "RotatedToken: Server fields (previous_token_until while the old token works), token (shown once)", &[bad, missing])},
            "/v1/servers/{server}/products/{product}": {"put": admin("Set a cell's floor and buffer", Some("SetAllocation: min_units, buffer_units (0–1,000,000)"), "AllocationView", &[bad, missing, product])},
            "/v1/schedule": {
                "get": admin("The schedule and its next five runs", None, "Schedule", &[]),
                "put": admin("Replace the schedule (cron, IANA time zone)", Some("SetSchedule: cron, timezone?"), "Schedule", &[bad])
            },
            "/v1/audit": {"get": admin("The audit log, newest first (?limit, ?before)", None, "{items: [AuditEntry]}", &[bad])},
            "/v1/balance": {"post": admin("Run a balance now", Some("BalanceRequest: product?"), "RunDetail", &[bad, product])},
            "/v1/runs": {"get": admin("Balance runs, newest first (?limit, ?before, ?trigger, ?since)", None, "{items: [RunSummary]}", &[bad])},
            "/v1/runs/{id}": {"get": admin("One run with its moves", None, "RunDetail", &[bad, missing])},
            "/v1/doctor": {"get": admin("The books against every reachable server", None, "DoctorReport", &[])},
            "/v1/history": {"get": admin("Usage time series (?product, ?server, ?site, ?from, ?to, ?since, ?step)", None, "History", &[bad])},
            "/v1/advice": {"get": admin("Schedule and buffer recommendations with evidence (?since)", None, "Advice", &[bad])},
            "/v1/advice/apply": {"post": admin("Apply the recommendations (audited)", Some("{since?}"), "{advice, applied}", &[bad])},
            "/v1/autotune": {
                "get": admin("The autotune setting", None, "Autotune", &[]),
                "put": admin("Turn autotune on or off within bounds", Some("Autotune: enabled, bounds, window_days"), "Autotune", &[bad])
            },
            "/v1/sync": {"post": {
                "summary": "A metering server announces itself, learns its products and allocations, renews its lease",
                "security": [{"serverToken": []}], "requestBody": body("SyncRequest: version"),
                "responses": {"200": ok("SyncResponse"), "400": error("bad_request"), "401": error("unauthorized"), "421": error("not_leader")}
            }},
            "/v1/instant-balance": {"post": {
                "summary": "A metering server ran dry: grant from the reserve, else reclaim from idle servers",
                "security": [{"serverToken": []}], "requestBody": body("InstantBalanceRequest: request_id, product, units"),
                "responses": {"200": ok("InstantBalanceResponse"), "400": error("bad_request"), "401": error("unauthorized"), "404": error("unknown_product"), "421": error("not_leader")}
            }}
        },
        "components": {
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer"},
                "serverToken": {"type": "http", "scheme": "bearer"}
            },
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "enum": ["bad_request", "unauthorized", "forbidden", "not_found", "unknown_product", "license_unavailable", "bad_handle", "license_expired", "conflict", "not_leader", "unavailable", "internal"]},
                        "message": {"type": "string"},
                        "leader_url": {"type": "string"}
                    }}}
                }
            }
        }
    })
}
