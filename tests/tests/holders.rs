//! Who holds what, and force release (issue 15), end to end: a real `allot-balancer` and real
//! `allot-agent` processes on loopback, on SQLite and on PostgreSQL, driven over HTTP.
//!
//! The balancer lists every live checkout and waiting client of the estate by a public id
//! that cannot heartbeat or check in; a server that does not answer is named as unreachable.
//! A revoke frees the unit at once for the first waiting client, is audited with its actor and
//! reason, and the holder's next heartbeat or checkin answers `410 license_revoked` — also
//! after the metering server restarts. `allot-agent run` stops its command on a revoke.

use allot_tests::balancer::{ADMIN_TOKEN, Api};
use allot_tests::fleet::Fleet;
use allot_tests::process::binary;
use allot_tests::{Backend, eventually, on_both_backends};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

on_both_backends!(
    holders_are_listed_across_servers_by_public_id_and_filtered,
    an_unreachable_server_is_named_not_silently_missing,
    a_revoke_frees_the_unit_for_the_waiting_client_and_the_holder_hears_410,
    a_revoke_survives_a_restart_of_the_metering_server,
    bad_revokes_and_listings_change_nothing,
    allot_agent_run_stops_its_command_and_exits_revoked,
    the_cli_lists_holders_as_a_table_and_revokes,
);

/// A fleet with `paris` and `tokyo`, and hard-stop products `cad` and `sim` (heartbeats every
/// second) with `units` purchased each; every server holds `per_server` units of each.
async fn estate(backend: Backend, units: u32, per_server: u32) -> Fleet {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    for product in ["cad", "sim"] {
        fleet
            .api()
            .post(
                "/v1/products",
                json!({"name": product, "enforcement": "hard_stop", "heartbeat_seconds": 1,
                    "staleout_seconds": 120}),
            )
            .await;
        fleet
            .api()
            .post(
                &format!("/v1/products/{product}/entitlements"),
                json!({"units": units}),
            )
            .await;
    }
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    for product in ["cad", "sim"] {
        fleet.wait_synced(product).await;
        for server in ["paris", "tokyo"] {
            fleet.limits(server, product, per_server, 0).await;
        }
    }
    fleet.balance().await;
    for product in ["cad", "sim"] {
        for server in ["paris", "tokyo"] {
            assert_eq!(
                fleet.allocation(server, product).await,
                u64::from(per_server)
            );
        }
    }
    fleet
}

/// A client of a metering server's client API.
fn client(fleet: &Fleet, meter: usize) -> Api {
    Api::new(&fleet.meters[meter].url(), None)
}

/// Checks `product` out on `meter` for `user`; returns the handle.
async fn take(fleet: &Fleet, meter: usize, product: &str, user: &str) -> String {
    let (status, body) = client(fleet, meter)
        .send(
            Method::POST,
            "/v1/checkout",
            Some(
                json!({"product": product, "user": user, "host": format!("{user}-ws"),
                "groups": ["eng"]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "checkout: {body}");
    body["handle"].as_str().expect("a handle").to_owned()
}

async fn heartbeat(fleet: &Fleet, meter: usize, handle: &str) -> (StatusCode, Value) {
    client(fleet, meter)
        .send(
            Method::POST,
            "/v1/heartbeat",
            Some(json!({"handle": handle})),
        )
        .await
}

async fn checkin(fleet: &Fleet, meter: usize, handle: &str) -> (StatusCode, Value) {
    client(fleet, meter)
        .send(Method::POST, "/v1/checkin", Some(json!({"handle": handle})))
        .await
}

/// `GET /v1/checkouts` with `query`.
async fn holders(fleet: &Fleet, query: &str) -> Value {
    fleet.api().get(&format!("/v1/checkouts{query}")).await
}

/// The holders of one page, as (server, product, user, state).
fn rows(page: &Value) -> Vec<(String, String, String, String)> {
    let mut rows: Vec<_> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|h| {
            (
                h["server"].as_str().unwrap().to_owned(),
                h["product"].as_str().unwrap().to_owned(),
                h["user"].as_str().unwrap().to_owned(),
                h["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn row(server: &str, product: &str, user: &str, state: &str) -> (String, String, String, String) {
    (server.into(), product.into(), user.into(), state.into())
}

/// The public id of `user`'s checkout in a listing.
fn id_of(page: &Value, user: &str) -> String {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["user"] == user && h["state"] == "held")
        .and_then(|h| h["id"].as_str())
        .unwrap_or_else(|| panic!("{user} holds nothing: {page:#}"))
        .to_owned()
}

async fn revoke(fleet: &Fleet, id: &str, body: Value) -> (StatusCode, Value) {
    fleet
        .api()
        .send(
            Method::POST,
            &format!("/v1/checkouts/{id}/revoke"),
            Some(body),
        )
        .await
}

/// The audit log's `checkout.revoke` entries.
async fn revoke_audits(fleet: &Fleet) -> Vec<Value> {
    let audit = fleet.api().get("/v1/audit?limit=1000").await;
    audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "checkout.revoke")
        .cloned()
        .collect()
}

async fn holders_are_listed_across_servers_by_public_id_and_filtered(backend: Backend) {
    let fleet = estate(backend, 4, 2).await;
    let handles = [
        take(&fleet, 0, "cad", "ann").await,
        take(&fleet, 1, "cad", "bob").await,
        take(&fleet, 1, "sim", "bob").await,
    ];

    let all = holders(&fleet, "").await;
    assert_eq!(
        rows(&all),
        vec![
            row("paris", "cad", "ann", "held"),
            row("tokyo", "cad", "bob", "held"),
            row("tokyo", "sim", "bob", "held"),
        ]
    );
    assert_eq!(all["unreachable"], json!([]));
    assert!(all.get("next_cursor").is_none(), "one page: {all:#}");
    let text = all.to_string();
    for handle in &handles {
        assert!(!text.contains(handle.as_str()), "a handle leaked: {all:#}");
    }
    for h in all["items"].as_array().unwrap() {
        let id = h["id"].as_str().unwrap();
        assert!(id.starts_with("co_") && id.len() == 35, "{id}");
        assert_eq!(h["groups"], json!(["eng"]));
        assert_eq!(h["units"], 1);
        assert!(h["granted_at"].is_string(), "{h}");
        assert_eq!(h["host"], format!("{}-ws", h["user"].as_str().unwrap()));
    }
    // An id is no handle: it cannot heartbeat.
    let ann = id_of(&all, "ann");
    let (status, body) = heartbeat(&fleet, 0, ann.trim_start_matches("co_")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Heartbeats show.
    assert_eq!(heartbeat(&fleet, 0, &handles[0]).await.0, StatusCode::OK);
    let after = holders(&fleet, "?user=ann").await;
    assert!(after["items"][0]["last_heartbeat"].is_string(), "{after:#}");

    assert_eq!(
        rows(&holders(&fleet, "?product=sim").await),
        vec![row("tokyo", "sim", "bob", "held")]
    );
    assert_eq!(
        rows(&holders(&fleet, "?user=ann").await),
        vec![row("paris", "cad", "ann", "held")]
    );
    assert_eq!(
        rows(&holders(&fleet, "?server=tokyo&product=cad").await),
        vec![row("tokyo", "cad", "bob", "held")]
    );
    assert_eq!(rows(&holders(&fleet, "?user=nobody").await), vec![]);

    // Pages of one follow each other through every server, each holder once.
    let mut seen = Vec::new();
    let mut query = "?limit=1".to_owned();
    for _ in 0..10 {
        let page = holders(&fleet, &query).await;
        assert!(page["items"].as_array().unwrap().len() <= 1);
        seen.extend(rows(&page));
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=1&cursor={c}"),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, rows(&all));
}

async fn an_unreachable_server_is_named_not_silently_missing(backend: Backend) {
    let mut fleet = estate(backend, 4, 2).await;
    take(&fleet, 0, "cad", "ann").await;
    take(&fleet, 1, "cad", "bob").await;
    fleet.meters[1].kill9();
    let page = holders(&fleet, "").await;
    assert_eq!(rows(&page), vec![row("paris", "cad", "ann", "held")]);
    assert_eq!(page["unreachable"], json!(["tokyo"]));
    // A revoke of a checkout the servers that answered do not hold cannot say "not found".
    let (status, body) = revoke(
        &fleet,
        "co_00000000000000000000000000000000",
        json!({"reason": "audit"}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(revoke_audits(&fleet).await.is_empty());
    // Back, its holders are listed again (restored from its store).
    fleet.meters[1].restart().await;
    let page = holders(&fleet, "").await;
    assert_eq!(page["unreachable"], json!([]));
    assert_eq!(rows(&page).len(), 2);
}

async fn a_revoke_frees_the_unit_for_the_waiting_client_and_the_holder_hears_410(backend: Backend) {
    // One unit of cad in the estate, on paris: nothing in the reserve for bob.
    let fleet = estate(backend, 1, 0).await;
    fleet.limits("paris", "cad", 1, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 1);
    let ann = take(&fleet, 0, "cad", "ann").await;
    let paris = fleet.meters[0].url();
    let bob = tokio::spawn(async move {
        Api::new(&paris, None)
            .send(
                Method::POST,
                "/v1/checkout",
                Some(
                    json!({"product": "cad", "user": "bob", "host": "bob-ws", "wait_seconds": 60}),
                ),
            )
            .await
    });
    eventually("bob waits", Duration::from_secs(10), || async {
        rows(&holders(&fleet, "?product=cad").await)
            .contains(&row("paris", "cad", "bob", "waiting"))
    })
    .await;
    let listing = holders(&fleet, "?product=cad").await;
    let waiting = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == "waiting")
        .unwrap();
    assert!(waiting["waiting_since"].is_string(), "{waiting}");
    assert!(waiting["id"].as_str().unwrap().starts_with("wt_"));
    let id = id_of(&listing, "ann");

    let (status, revoked) = revoke(&fleet, &id, json!({"reason": "ann left the project"})).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["checkout"]["id"], id.as_str());
    assert_eq!(revoked["checkout"]["user"], "ann");
    assert_eq!(revoked["checkout"]["server"], "paris");
    assert_eq!(revoked["reason"], "ann left the project");
    assert_eq!(revoked["served_waiters"], 1);

    // bob got the unit at once.
    let (status, granted) = tokio::time::timeout(Duration::from_secs(10), bob)
        .await
        .expect("bob is answered")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(
        rows(&holders(&fleet, "?product=cad").await),
        vec![row("paris", "cad", "bob", "held")]
    );
    let view = fleet.meters[0].product("cad").await;
    assert_eq!(
        (view["in_use"].as_u64(), view["waiting"].as_u64()),
        (Some(1), Some(0))
    );

    // ann hears it on her next heartbeat, and on a checkin.
    for (status, body) in [
        heartbeat(&fleet, 0, &ann).await,
        checkin(&fleet, 0, &ann).await,
    ] {
        assert_eq!(status, StatusCode::GONE, "{body}");
        assert_eq!(body["error"]["code"], "license_revoked");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("ann left the project")
        );
    }

    // Audited: who, what, why.
    let audits = revoke_audits(&fleet).await;
    assert_eq!(audits.len(), 1, "{audits:#?}");
    let entry = &audits[0];
    assert_eq!(entry["actor"], "admin");
    assert_eq!(entry["target"], id.as_str());
    assert_eq!(entry["after"]["reason"], "ann left the project");
    assert_eq!(entry["after"]["server"], "paris");
    assert_eq!(entry["after"]["user"], "ann");
    assert!(entry["at"].is_string());

    // A second revoke is refused and audits nothing.
    let (status, body) = revoke(&fleet, &id, json!({"reason": "again"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(revoke_audits(&fleet).await.len(), 1);
    fleet.assert_doctor_ok().await;
}

async fn a_revoke_survives_a_restart_of_the_metering_server(backend: Backend) {
    let mut fleet = estate(backend, 4, 2).await;
    let ann = take(&fleet, 0, "cad", "ann").await;
    let carl = take(&fleet, 0, "cad", "carl").await;
    let id = id_of(&holders(&fleet, "").await, "ann");
    let (status, body) = revoke(&fleet, &id, json!({"reason": "licence audit"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    fleet.meters[0].kill9();
    fleet.meters[0].restart().await;

    let (status, body) = heartbeat(&fleet, 0, &ann).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["error"]["code"], "license_revoked");
    assert_eq!(heartbeat(&fleet, 0, &carl).await.0, StatusCode::OK);
    assert_eq!(
        rows(&holders(&fleet, "").await),
        vec![row("paris", "cad", "carl", "held")]
    );
    assert_eq!(fleet.meters[0].product("cad").await["in_use"], 1);
    // The revoked unit is free for anyone after the restart too.
    take(&fleet, 0, "cad", "dora").await;
}

async fn bad_revokes_and_listings_change_nothing(backend: Backend) {
    let fleet = estate(backend, 4, 2).await;
    let ann = take(&fleet, 0, "cad", "ann").await;
    let before = holders(&fleet, "").await;
    let id = id_of(&before, "ann");
    let audit_before = fleet.api().get("/v1/audit?limit=1000").await;

    let unknown = "co_00000000000000000000000000000000";
    let cases: Vec<(String, Option<Value>, StatusCode)> = vec![
        (
            unknown.into(),
            Some(json!({"reason": "audit"})),
            StatusCode::NOT_FOUND,
        ),
        (id.clone(), Some(json!({})), StatusCode::BAD_REQUEST),
        (
            id.clone(),
            Some(json!({"reason": ""})),
            StatusCode::BAD_REQUEST,
        ),
        (
            id.clone(),
            Some(json!({"reason": "   "})),
            StatusCode::BAD_REQUEST,
        ),
        (
            id.clone(),
            Some(json!({"reason": "x".repeat(501)})),
            StatusCode::BAD_REQUEST,
        ),
        (
            id.clone(),
            Some(json!({"reason": "a\u{7}b"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            id.clone(),
            Some(json!({"reason": "ok", "force": true})),
            StatusCode::BAD_REQUEST,
        ),
        (id.clone(), None, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (
            ann.clone(),
            Some(json!({"reason": "a handle is no id"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "co_xyz".into(),
            Some(json!({"reason": "audit"})),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (target, body, expected) in cases {
        let (status, answer) = fleet
            .api()
            .send(
                Method::POST,
                &format!("/v1/checkouts/{target}/revoke"),
                body.clone(),
            )
            .await;
        assert_eq!(status, expected, "{target} {body:?}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    // The 500-character reason is the longest accepted (checked against a holder nobody has).
    let (status, _) = revoke(&fleet, unknown, json!({"reason": "x".repeat(500)})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for query in [
        "?limit=0",
        "?limit=1001",
        "?cursor=garbage",
        "?cursor=",
        "?product=",
        "?user=%07",
        "?unknown=1",
        "?limit=1&limit=2",
    ] {
        let (status, answer) = fleet
            .api()
            .send(Method::GET, &format!("/v1/checkouts{query}"), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
    }
    let (status, _) = fleet
        .api()
        .send(Method::GET, "/v1/checkouts?server=nowhere", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Without the admin token (a client, a viewer, a metering server's token): refused.
    let server_token = fleet.meters[0].token.clone();
    for token in [None, Some("wrong"), Some(server_token.as_str())] {
        let api = fleet.api().with_token(token);
        let (status, body) = api.send(Method::GET, "/v1/checkouts", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let (status, body) = api
            .send(
                Method::POST,
                &format!("/v1/checkouts/{id}/revoke"),
                Some(json!({"reason": "not mine"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    // The metering server's own endpoints refuse clients and the admin token.
    for token in [None, Some(ADMIN_TOKEN)] {
        let api = Api::new(&fleet.meters[0].url(), token);
        let (status, _) = api.send(Method::GET, "/v1/checkouts", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = api
            .send(
                Method::POST,
                &format!("/v1/checkouts/{id}/revoke"),
                Some(json!({"reason": "not mine"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    // Nothing changed: the holder, the listing, the audit log.
    assert_eq!(heartbeat(&fleet, 0, &ann).await.0, StatusCode::OK);
    assert_eq!(rows(&holders(&fleet, "").await), rows(&before));
    assert_eq!(fleet.api().get("/v1/audit?limit=1000").await, audit_before);
}

async fn allot_agent_run_stops_its_command_and_exits_revoked(backend: Backend) {
    let fleet = estate(backend, 4, 2).await;
    let mut run = tokio::process::Command::new(binary("allot-agent"))
        .args([
            "run",
            "--url",
            &fleet.meters[0].url(),
            "--product",
            "cad",
            "--user",
            "gina",
            "--host",
            "gina-ws",
            "--",
            "sh",
            "-c",
            // Exits 0 on SIGTERM, so the wrapper's own status is what the test sees.
            "trap 'exit 0' TERM; while true; do sleep 0.1; done",
        ])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("allot-agent run starts");
    eventually("gina holds cad", Duration::from_secs(10), || async {
        rows(&holders(&fleet, "?user=gina").await) == vec![row("paris", "cad", "gina", "held")]
    })
    .await;
    let id = id_of(&holders(&fleet, "?user=gina").await, "gina");
    let (status, body) = revoke(&fleet, &id, json!({"reason": "over the fair share"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Heartbeats come every second: the next one hears it, the command is stopped.
    let exit = tokio::time::timeout(Duration::from_secs(15), run.wait())
        .await
        .expect("allot-agent run exits after the revoke")
        .expect("an exit status");
    assert_eq!(
        exit.code(),
        Some(allot_agent::cli::EXIT_REVOKED),
        "{exit:?}"
    );
    assert_eq!(allot_agent::cli::EXIT_REVOKED, 77);
    assert_eq!(rows(&holders(&fleet, "?user=gina").await), vec![]);
}

/// Runs `allot-balancer ARGS` against the fleet's balancer; answers (exit code, stdout, stderr).
async fn cli(fleet: &Fleet, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(binary("allot-balancer"))
        .args(args)
        .args(["--url", fleet.balancer.url(), "--admin-token", ADMIN_TOKEN])
        .output()
        .await
        .expect("allot-balancer runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn the_cli_lists_holders_as_a_table_and_revokes(backend: Backend) {
    let mut fleet = estate(backend, 4, 2).await;
    let ann = take(&fleet, 0, "cad", "ann").await;
    take(&fleet, 1, "sim", "bob").await;

    let (code, table, err) = cli(&fleet, &["checkouts"]).await;
    assert_eq!(code, Some(0), "{err}");
    for word in [
        "server",
        "last heartbeat",
        "paris",
        "tokyo",
        "ann",
        "bob",
        "ann-ws",
        "held",
        "2 held, 0 waiting",
    ] {
        assert!(table.contains(word), "{word} missing:\n{table}");
    }
    assert!(!table.contains(&ann), "a handle leaked:\n{table}");
    let (code, table, _) = cli(&fleet, &["checkouts", "--product", "sim"]).await;
    assert_eq!(code, Some(0));
    assert!(table.contains("bob") && !table.contains("ann"), "{table}");

    let (code, json, err) = cli(&fleet, &["checkouts", "--user", "ann", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let listing: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(rows(&listing), vec![row("paris", "cad", "ann", "held")]);
    let id = id_of(&listing, "ann");

    let (code, out, err) = cli(&fleet, &["revoke", &id, "--reason", "cli test"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&id) && out.contains("ann"), "{out}");
    assert_eq!(heartbeat(&fleet, 0, &ann).await.0, StatusCode::GONE);
    let (code, _, err) = cli(&fleet, &["revoke", &id, "--reason", "again"]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("conflict"), "{err}");

    fleet.meters[1].kill9();
    let (code, table, _) = cli(&fleet, &["checkouts"]).await;
    assert_eq!(code, Some(0));
    assert!(
        table.contains("unreachable (their holders are not listed): tokyo"),
        "{table}"
    );
}
