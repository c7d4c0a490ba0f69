//! The published OpenAPI documents (`docs/openapi/*.json`) are the ones the code generates: a
//! change to a route, a handler's `#[utoipa::path]` or a wire type that is not regenerated fails
//! here, saying how to regenerate.

use std::path::PathBuf;

/// Set to `1` to (re)write the committed documents instead of comparing them.
const BLESS: &str = "ALLOT_BLESS_OPENAPI";

fn committed(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/openapi")
        .join(format!("{name}.json"))
}

fn check(name: &str, document: utoipa::openapi::OpenApi) {
    // The subcommands print the same text plus a newline.
    let generated = document.to_pretty_json().expect("serialise the document") + "\n";
    let path = committed(name);
    if std::env::var(BLESS).is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write the document");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is stale: it differs from what the code generates.\n\
         Regenerate it with `cargo run -q -p allot-{} -- openapi > docs/openapi/{name}.json`, \
         or all of them with `{BLESS}=1 cargo test -p allot-tests --test openapi`, and commit it.",
        path.display(),
        if name == "agent" { "agent" } else { "balancer" },
    );
}

#[test]
fn committed_balancer_document_matches_the_code() {
    check("balancer", allot_balancer::api::document());
}

#[test]
fn committed_agent_document_matches_the_code() {
    check("agent", allot_agent::openapi::document());
}

#[test]
fn every_error_response_has_the_error_shape() {
    for document in [
        allot_balancer::api::document(),
        allot_agent::openapi::document(),
    ] {
        let json = serde_json::to_value(&document).unwrap();
        for (path, item) in json["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path}: no summary (the handler's doc comment)"
                );
                assert!(
                    op["responses"]
                        .as_object()
                        .unwrap()
                        .keys()
                        .any(|s| s.starts_with('2')),
                    "{method} {path}: no success response"
                );
                if op["security"].is_array() {
                    assert!(
                        op["responses"].get("401").is_some(),
                        "{method} {path}: a call that takes a token may answer 401"
                    );
                }
                for (status, response) in op["responses"].as_object().unwrap() {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{method} {path} {status}"
                        );
                        let description = response["description"].as_str().unwrap();
                        assert!(
                            description.starts_with('`'),
                            "{method} {path} {status}: the description names the stable code first"
                        );
                    }
                }
            }
        }
    }
}

/// The bounds the documents state are the ones the servers enforce (`allot_core::validate`):
/// utoipa takes only literals, so this keeps the two from drifting apart.
#[test]
fn documented_bounds_match_the_validation_rules() {
    use allot_core::validate::{MAX_ACL_ENTRIES, MAX_NAME_CHARS, MAX_POLICY_SECONDS, MAX_UNITS};
    let balancer = serde_json::to_value(allot_balancer::api::document()).unwrap();
    let agent = serde_json::to_value(allot_agent::openapi::document()).unwrap();
    let field = |doc: &serde_json::Value, schema: &str, field: &str, key: &str| {
        doc["components"]["schemas"][schema]["properties"][field][key]
            .as_u64()
            .unwrap_or_else(|| panic!("{schema}.{field} states no {key}"))
    };
    let units = u64::from(MAX_UNITS);
    let names = MAX_NAME_CHARS as u64;
    let seconds = u64::from(MAX_POLICY_SECONDS);
    assert_eq!(
        field(&balancer, "CreateProduct", "name", "maxLength"),
        names
    );
    assert_eq!(
        field(&balancer, "CreateProduct", "staleout_seconds", "maximum"),
        seconds
    );
    assert_eq!(
        field(&balancer, "AddEntitlement", "units", "maximum"),
        units
    );
    assert_eq!(
        field(&balancer, "SetAllocation", "min_units", "maximum"),
        units
    );
    assert_eq!(
        field(&balancer, "InstantBalanceRequest", "units", "maximum"),
        units
    );
    assert_eq!(field(&agent, "CheckoutRequest", "user", "maxLength"), names);
    assert_eq!(field(&agent, "CheckoutRequest", "units", "maximum"), units);
    assert_eq!(
        field(&agent, "CheckoutRequest", "groups", "maxItems"),
        MAX_ACL_ENTRIES as u64
    );
    assert_eq!(
        field(&agent, "CheckoutRequest", "wait_seconds", "maximum"),
        u64::from(allot_agent::server::MAX_WAIT_SECONDS)
    );
    assert_eq!(field(&agent, "MoveRequest", "units", "maximum"), units);
    assert_eq!(
        field(&balancer, "RotateToken", "grace_seconds", "maximum"),
        u64::from(allot_core::validate::MAX_TOKEN_GRACE_SECONDS)
    );
    assert_eq!(
        field(&agent, "ProductDefinition", "heartbeat_seconds", "maximum"),
        seconds
    );
}
