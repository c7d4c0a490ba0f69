//! The metering server's OpenAPI 3 document (`GET /v1/openapi.json`), written by hand.
//!
//! Hand-written so it stays small and readable; the end-to-end tests check that every route
//! the router serves is listed here.

use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn ok(schema: &str) -> Value {
    json!({
        "description": "OK",
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

/// The document.
pub fn document() -> Value {
    let client = json!([{"clientKey": []}, {}]);
    let balancer = json!([{"serverToken": []}]);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "allot metering server (allot-agent)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Local, durable, policy-true license checkouts. Errors are \
                {\"error\": {\"code\", \"message\"}} with a stable code. Bodies are at most \
                64 KiB; unknown fields are refused."
        },
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": ok("Health")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text exposition)",
                "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}},
            "/v1/checkout": {"post": {
                "summary": "Check units of a product out; optionally wait in the FIFO queue",
                "security": client, "requestBody": body("CheckoutRequest"),
                "responses": {
                    "200": ok("CheckoutResponse"),
                    "400": error_response("bad_request"),
                    "401": error_response("unauthorized"),
                    "403": error_response("forbidden (ACL)"),
                    "404": error_response("unknown_product"),
                    "409": error_response("license_unavailable (hard stop, or the wait timed out)"),
                    "410": error_response("license_expired (the balancer lease ran out)"),
                    "413": error_response("bad_request (body over 64 KiB)"),
                    "503": error_response("unavailable (server limit reached or stopping)")
                }}},
            "/v1/heartbeat": {"post": {
                "summary": "Keep a checkout alive", "security": client,
                "requestBody": body("HandleRequest"),
                "responses": {"200": ok("HandleResponse"), "400": error_response("bad_request"),
                    "401": error_response("unauthorized"), "404": error_response("bad_handle")}}},
            "/v1/checkin": {"post": {
                "summary": "End a checkout", "security": client,
                "requestBody": body("HandleRequest"),
                "responses": {"200": ok("HandleResponse"), "400": error_response("bad_request"),
                    "401": error_response("unauthorized"), "404": error_response("bad_handle")}}},
            "/v1/products": {"get": {
                "summary": "Products with allocation, in use, free and waiting", "security": client,
                "responses": {"200": ok("AgentProducts"), "401": error_response("unauthorized")}}},
            "/v1/products/{product}": {"put": {
                "summary": "Define a product or replace its policy (balancer)",
                "security": balancer,
                "parameters": [{"name": "product", "in": "path", "required": true, "schema": {"type": "string"}}],
                "requestBody": body("ProductDefinition"),
                "responses": {"200": ok("AgentProduct"), "400": error_response("bad_request"),
                    "401": error_response("unauthorized")}}},
            "/v1/status": {"get": {
                "summary": "Per-product figures for the balancer; resets the since_last counters unless peek=true",
                "security": balancer,
                "parameters": [{"name": "peek", "in": "query", "required": false,
                    "schema": {"type": "boolean", "default": false},
                    "description": "true: read without resetting the since_last counters (doctor)"}],
                "responses": {"200": ok("AgentStatus"), "400": error_response("bad_request"),
                    "401": error_response("unauthorized")}}},
            "/v1/allocations/release": {"post": {
                "summary": "Release free units to the reserve (never in-use units); idempotent by move_id",
                "security": balancer, "requestBody": body("MoveRequest"),
                "responses": {"200": ok("MoveResponse"), "400": error_response("bad_request"),
                    "401": error_response("unauthorized"), "404": error_response("unknown_product"),
                    "409": error_response("conflict (move id used for another move)")}}},
            "/v1/allocations/grant": {"post": {
                "summary": "Add units from the reserve; idempotent by move_id",
                "security": balancer, "requestBody": body("MoveRequest"),
                "responses": {"200": ok("MoveResponse"), "400": error_response("bad_request"),
                    "401": error_response("unauthorized"), "404": error_response("unknown_product"),
                    "409": error_response("conflict (move id used for another move)")}}}
        },
        "components": {
            "securitySchemes": {
                "clientKey": {"type": "http", "scheme": "bearer",
                    "description": "Only when the server is configured with --client-key"},
                "serverToken": {"type": "http", "scheme": "bearer",
                    "description": "The server's own token (--token), presented by the balancer"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "enum": ["bad_request", "unauthorized", "forbidden",
                            "not_found", "unknown_product", "license_unavailable", "bad_handle",
                            "license_expired", "conflict", "not_leader", "unavailable", "internal"]},
                        "message": {"type": "string"}}}}},
                "Health": {"type": "object", "properties": {"status": {"type": "string"},
                    "leader": {"type": "boolean"}, "version": {"type": "string"}}},
                "CheckoutRequest": {"type": "object", "additionalProperties": false,
                    "required": ["product", "user", "host"], "properties": {
                        "product": {"type": "string", "maxLength": 128},
                        "user": {"type": "string", "maxLength": 128},
                        "host": {"type": "string", "maxLength": 128},
                        "groups": {"type": "array", "items": {"type": "string"}},
                        "units": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 1},
                        "wait_seconds": {"type": "integer", "minimum": 0, "maximum": 3600, "default": 0}}},
                "CheckoutResponse": {"type": "object", "properties": {
                    "handle": {"type": "string"}, "units": {"type": "integer"},
                    "heartbeat_seconds": {"type": "integer"}, "overdraft": {"type": "boolean"}}},
                "HandleRequest": {"type": "object", "additionalProperties": false,
                    "required": ["handle"], "properties": {"handle": {"type": "string"}}},
                "HandleResponse": {"type": "object", "properties": {
                    "handle": {"type": "string"}, "staleout_in_seconds": {"type": "integer"}}},
                "Policy": {"type": "object", "additionalProperties": false, "properties": {
                    "enforcement": {"type": "string", "enum": ["hard_stop", "soft_stop", "no_stop"]},
                    "seat": {"type": "string", "enum": ["concurrent", "per_user_host", "per_user"]},
                    "heartbeat_seconds": {"type": "integer", "minimum": 1},
                    "staleout_seconds": {"type": "integer", "minimum": 1},
                    "acl": {"type": "object", "additionalProperties": false, "properties": {
                        "allow_users": {"type": "array", "items": {"type": "string"}},
                        "deny_users": {"type": "array", "items": {"type": "string"}},
                        "allow_hosts": {"type": "array", "items": {"type": "string"}},
                        "deny_hosts": {"type": "array", "items": {"type": "string"}},
                        "allow_groups": {"type": "array", "items": {"type": "string"}},
                        "deny_groups": {"type": "array", "items": {"type": "string"}}}}}},
                "ProductDefinition": {"$ref": "#/components/schemas/Policy"},
                "AgentProduct": {"type": "object", "properties": {
                    "product": {"type": "string"}, "allocated": {"type": "integer"},
                    "in_use": {"type": "integer"}, "free": {"type": "integer"},
                    "waiting": {"type": "integer"}, "policy": {"$ref": "#/components/schemas/Policy"}}},
                "AgentProducts": {"type": "object", "properties": {"products": {"type": "array",
                    "items": {"$ref": "#/components/schemas/AgentProduct"}}}},
                "UsageCounters": {"type": "object", "properties": {
                    "peak_in_use": {"type": "integer"}, "checkouts": {"type": "integer"},
                    "denials": {"type": "integer"}, "overdrafts": {"type": "integer"},
                    "staleouts": {"type": "integer"}, "instant_requests": {"type": "integer"}}},
                "ProductStatus": {"type": "object", "properties": {
                    "product": {"type": "string"}, "allocation": {"type": "integer"},
                    "generation": {"type": "integer"}, "in_use": {"type": "integer"},
                    "waiting": {"type": "integer"},
                    "since_last": {"$ref": "#/components/schemas/UsageCounters"},
                    "totals": {"$ref": "#/components/schemas/UsageCounters"}}},
                "AgentStatus": {"type": "object", "properties": {"server": {"type": "string"},
                    "products": {"type": "array", "items": {"$ref": "#/components/schemas/ProductStatus"}}}},
                "MoveRequest": {"type": "object", "additionalProperties": false,
                    "required": ["move_id", "product", "units"], "properties": {
                        "move_id": {"type": "string", "format": "uuid"},
                        "product": {"type": "string"},
                        "units": {"type": "integer", "minimum": 1, "maximum": 1000000}}},
                "MoveResponse": {"type": "object", "properties": {
                    "move_id": {"type": "string", "format": "uuid"}, "units": {"type": "integer"},
                    "allocation": {"type": "integer"}, "generation": {"type": "integer"}}}
            }
        }
    })
}
