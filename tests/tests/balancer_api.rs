//! End-to-end tests of the balancer's admin API: the real `allot-balancer` binary on a loopback
//! port, over HTTP, against SQLite and against PostgreSQL.

use allot_tests::balancer::{Api, Balancer};
use allot_tests::{Backend, on_both_backends};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

on_both_backends!(
    an_admin_sets_up_the_books,
    bad_input_gets_a_coded_error_and_changes_nothing,
    acknowledged_changes_survive_kill_9,
    sigterm_shuts_down_cleanly,
    advice_reads_the_history_and_is_applied,
);

async fn an_admin_sets_up_the_books(backend: Backend) {
    let balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    // Every route the router serves is described in the OpenAPI document.
    let openapi = api.get("/v1/openapi.json").await;
    for path in [
        "/healthz",
        "/metrics",
        "/v1/openapi.json",
        "/v1/products",
        "/v1/products/{product}",
        "/v1/products/{product}/entitlements",
        "/v1/products/{product}/entitlements/{id}",
        "/v1/servers",
        "/v1/servers/{server}",
        "/v1/servers/{server}/drain",
        "/v1/servers/{server}/rotate-token",
        "/v1/servers/{server}/products/{product}",
        "/v1/schedule",
        "/v1/audit",
        "/v1/balance",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/doctor",
        "/v1/history",
        "/v1/advice",
        "/v1/advice/apply",
        "/v1/autotune",
        "/v1/sync",
        "/v1/instant-balance",
    ] {
        assert!(
            openapi["paths"].get(path).is_some(),
            "{path} is not documented"
        );
    }
    let health = api.get("/healthz").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["leader"], true);

    let product = api
        .post(
            "/v1/products",
            json!({"name": "CAD Suite", "publisher": "Acme", "seat": "per_user_host"}),
        )
        .await;
    assert_eq!(product["policy"]["seat"], "per_user_host");
    assert_eq!(product["policy"]["enforcement"], "hard_stop");
    let e = api
        .post(
            "/v1/products/CAD%20Suite/entitlements",
            json!({"units": 40, "reference": "PO-7"}),
        )
        .await;
    assert_eq!(e["units"], 40);
    let server = api
        .post(
            "/v1/servers",
            json!({"name": "paris", "url": "http://127.0.0.1:1", "site": "eu"}),
        )
        .await;
    let token = server["token"].as_str().unwrap();
    assert!(token.starts_with("allot_"));
    let cell = api
        .put(
            "/v1/servers/paris/products/CAD%20Suite",
            json!({"min_units": 2, "buffer_units": 5}),
        )
        .await;
    assert_eq!(cell["min_units"], 2);

    let metrics = reqwest::get(format!("{}/metrics", balancer.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"allot_units{pool="purchased",product="CAD Suite"} 40"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"allot_servers{state="active"} 1"#),
        "{metrics}"
    );
    let detail = api.get("/v1/products/CAD%20Suite").await;
    assert_eq!(detail["purchased"], 40);
    assert_eq!(detail["reserve"], 40);
    assert_eq!(detail["servers"][0]["server"], "paris");
    assert_eq!(detail["servers"][0]["buffer_units"], 5);
    // The token is never shown again.
    let servers = api.get("/v1/servers").await;
    assert!(servers["items"][0].get("token").is_none());
    assert!(!servers.to_string().contains(token));

    let schedule = api.get("/v1/schedule").await;
    assert_eq!(schedule["cron"], "*/15 * * * *");
    assert_eq!(schedule["next_runs"].as_array().unwrap().len(), 5);
    let schedule = api
        .put(
            "/v1/schedule",
            json!({"cron": "0 7 * * 1-5", "timezone": "America/New_York"}),
        )
        .await;
    assert_eq!(schedule["timezone"], "America/New_York");

    let second = api
        .post(
            "/v1/products/CAD%20Suite/entitlements",
            json!({"units": 10}),
        )
        .await;
    let id = second["id"].as_i64().unwrap();
    let (status, removed) = api
        .send(
            Method::DELETE,
            &format!("/v1/products/CAD%20Suite/entitlements/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    let (status, _) = api
        .send(Method::POST, "/v1/servers/paris/drain", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.send(Method::DELETE, "/v1/servers/paris", None).await;
    assert_eq!(status, StatusCode::OK);

    let audit = api.get("/v1/audit?limit=100").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    let history = api.get("/v1/history?since=2h&step=15m").await;
    assert_eq!(history["step_seconds"], 900);
    assert!(
        history["series"].as_array().unwrap().is_empty(),
        "no run, no samples"
    );
    assert_eq!(
        actions,
        [
            "server.remove",
            "server.drain",
            "entitlement.remove",
            "entitlement.add",
            "schedule.set",
            "allocation.set",
            "server.register",
            "entitlement.add",
            "product.create",
            "leader.take",
        ]
    );
}

/// Everything an admin can read, to prove a refused request changed nothing.
async fn snapshot(api: &Api) -> Value {
    let mut products = api.get("/v1/products").await;
    let mut details = Vec::new();
    for p in products["items"].as_array_mut().unwrap() {
        let name = p["name"].as_str().unwrap().to_owned();
        details.push(api.get(&format!("/v1/products/{name}")).await);
        details.push(api.get(&format!("/v1/products/{name}/entitlements")).await);
    }
    let mut schedule = api.get("/v1/schedule").await;
    schedule.as_object_mut().unwrap().remove("next_runs");
    json!({
        "products": products,
        "details": details,
        "servers": api.get("/v1/servers").await,
        "schedule": schedule,
        "audit": api.get("/v1/audit?limit=1000").await,
    })
}

/// A refused request: method, path, body, expected status and error code.
type BadCase = (Method, String, Option<Vec<u8>>, u16, &'static str);

async fn bad_input_gets_a_coded_error_and_changes_nothing(backend: Backend) {
    let balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    api.post("/v1/products", json!({"name": "cad"})).await;
    let e = api
        .post("/v1/products/cad/entitlements", json!({"units": 5}))
        .await;
    api.post(
        "/v1/servers",
        json!({"name": "s1", "url": "http://127.0.0.1:1", "site": "hq"}),
    )
    .await;
    let long = "x".repeat(129);
    let huge = format!("{{\"name\": \"{}\"}}", "y".repeat(70 * 1024));
    let cases: Vec<BadCase> = vec![
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": "a", "colour": 1}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": ""}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(format!(r#"{{"name": "{long}"}}"#).into_bytes()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(b"{\"name\": \"a\\u0007b\"}".to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": "a/b"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": "a", "enforcement": "maybe"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": "a", "heartbeat_seconds": 60, "staleout_seconds": 10}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": "a""#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(huge.into_bytes()),
            413,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products".into(),
            Some(br#"{"name": "cad"}"#.to_vec()),
            409,
            "conflict",
        ),
        (
            Method::POST,
            "/v1/products/cad/entitlements".into(),
            Some(br#"{"units": 0}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products/cad/entitlements".into(),
            Some(br#"{"units": 1000001}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products/cad/entitlements".into(),
            Some(br#"{"units": -3}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products/cad/entitlements".into(),
            Some(br#"{"units": "5"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products/cad/entitlements".into(),
            Some(br#"{"units": 5, "expires_at": "2001-01-01T00:00:00Z"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/products/nope/entitlements".into(),
            Some(br#"{"units": 5}"#.to_vec()),
            404,
            "unknown_product",
        ),
        (
            Method::GET,
            "/v1/products/nope".into(),
            None,
            404,
            "unknown_product",
        ),
        (
            Method::DELETE,
            "/v1/products/cad/entitlements/9999".into(),
            None,
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/products/cad/entitlements/abc".into(),
            None,
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/servers".into(),
            Some(br#"{"name": "s2", "url": "ftp://x", "site": "hq"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/servers".into(),
            Some(br#"{"name": "s1", "url": "http://h:1", "site": "hq"}"#.to_vec()),
            409,
            "conflict",
        ),
        (
            Method::POST,
            "/v1/servers".into(),
            Some(br#"{"name": "s2", "url": "http://h:1"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/v1/servers/s1/products/cad".into(),
            Some(br#"{"min_units": 1000001, "buffer_units": 0}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/v1/servers/ghost/products/cad".into(),
            Some(br#"{"min_units": 1, "buffer_units": 0}"#.to_vec()),
            404,
            "not_found",
        ),
        (
            Method::PUT,
            "/v1/servers/s1/products/nope".into(),
            Some(br#"{"min_units": 1, "buffer_units": 0}"#.to_vec()),
            404,
            "unknown_product",
        ),
        (
            Method::PUT,
            "/v1/schedule".into(),
            Some(br#"{"cron": "61 * * * *"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::PUT,
            "/v1/schedule".into(),
            Some(br#"{"cron": "* * * * *", "timezone": "Mars/Base"}"#.to_vec()),
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/audit?limit=0".into(),
            None,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/audit?limit=ten".into(),
            None,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/nothing-here".into(),
            None,
            404,
            "not_found",
        ),
        (
            Method::PATCH,
            "/v1/products".into(),
            None,
            405,
            "bad_request",
        ),
        (Method::GET, "/v1/history?step=10s".into(), None, 400, "bad_request"),
        (Method::GET, "/v1/history?step=1m&since=400d".into(), None, 400, "bad_request"),
        (Method::GET, "/v1/history?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z".into(), None, 400, "bad_request"),
        (Method::GET, "/v1/history?colour=1".into(), None, 400, "bad_request"),
        (Method::GET, "/v1/runs?trigger=bogus".into(), None, 400, "bad_request"),
        (Method::GET, "/v1/runs/999".into(), None, 404, "not_found"),
        (Method::POST, "/v1/balance".into(), Some(br#"{"product": "nope"}"#.to_vec()), 404, "unknown_product"),
        (Method::POST, "/v1/instant-balance".into(), Some(br#"{"request_id": "00000000-0000-0000-0000-000000000000", "product": "cad", "units": 1}"#.to_vec()), 401, "unauthorized"),
        (Method::POST, "/v1/sync".into(), Some(br#"{"version": "1"}"#.to_vec()), 401, "unauthorized"),
    ];
    let before = snapshot(&api).await;
    for (method, path, body, status, code) in cases {
        let (got, answer) = api.raw(method.clone(), &path, body).await;
        assert_eq!(got.as_u16(), status, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {path}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(
            snapshot(&api).await,
            before,
            "{method} {path} changed the books"
        );
    }
    // Without the admin token nothing is read or written.
    let unauthorised = [None, Some("wrong-token"), Some("")];
    for token in unauthorised {
        let api = api.with_token(token);
        for (method, path) in [
            (Method::GET, "/v1/products"),
            (Method::POST, "/v1/products"),
            (Method::PUT, "/v1/schedule"),
            (Method::GET, "/v1/audit"),
        ] {
            let body = Some(json!({"name": "sneaky", "cron": "* * * * *"}));
            let (status, answer) = api.send(method.clone(), path, body).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            assert_eq!(answer["error"]["code"], "unauthorized");
        }
    }
    assert_eq!(snapshot(&api).await, before);
    assert_eq!(e["units"], 5);
}

async fn acknowledged_changes_survive_kill_9(backend: Backend) {
    let mut balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    api.post("/v1/products", json!({"name": "cad"})).await;
    // A storm of purchases; the balancer is killed while they are in flight.
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut acknowledged = 0u64;
                for _ in 0..200 {
                    let request = api.try_raw(
                        Method::POST,
                        "/v1/products/cad/entitlements",
                        Some(br#"{"units": 1}"#.to_vec()),
                    );
                    match tokio::time::timeout(std::time::Duration::from_secs(5), request).await {
                        Ok(Ok((status, _))) if status == StatusCode::CREATED => acknowledged += 1,
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    balancer.kill9_and_restart().await;
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap_or(0);
    }
    let api = balancer.api();
    let detail = api.get("/v1/products/cad").await;
    let purchased = detail["purchased"].as_u64().unwrap();
    let entitlements = api.get("/v1/products/cad/entitlements").await;
    let listed = entitlements["items"].as_array().unwrap().len() as u64;
    assert!(acknowledged > 0, "the storm never got going");
    assert!(
        purchased >= acknowledged,
        "acknowledged {acknowledged}, kept {purchased}"
    );
    assert_eq!(
        purchased, listed,
        "purchased must equal the live entitlements"
    );
    assert_eq!(
        detail["reserve"], purchased,
        "reserve + allocated + in transit = purchased"
    );
}

async fn sigterm_shuts_down_cleanly(backend: Backend) {
    let mut balancer = Balancer::start(&backend).await;
    balancer
        .api()
        .post("/v1/products", json!({"name": "cad"}))
        .await;
    assert!(
        balancer.terminate(),
        "SIGTERM must end the balancer with status 0"
    );
}

/// Five days of hourly samples: Paris idles at one unit and is short every morning at 09:00 UTC.
async fn seed_morning_peaks(backend: &Backend) {
    use allot_balancer::store::{self, UsageSample};
    use allot_core::domain::RunTrigger;
    let store = store::open(backend.database_url.as_deref(), backend.data_dir.path())
        .await
        .unwrap();
    let hour = 3_600_000i64;
    let now = chrono::Utc::now().timestamp_millis();
    let start = now - now.rem_euclid(24 * hour) - 5 * 24 * hour;
    let mut at = start;
    while at < now {
        let h = (at / hour).rem_euclid(24);
        let (in_use, peak, denials) = match h {
            10 => (10, 10, 4),
            11..=17 => (10, 10, 0),
            _ => (1, 1, 0),
        };
        let run = store
            .begin_run(RunTrigger::Scheduled, &allot_core::shard::Fence::alone())
            .await
            .unwrap();
        let sample = UsageSample {
            server: "paris".into(),
            product: "cad".into(),
            allocation: in_use,
            in_use,
            peak_in_use: peak,
            denials,
            ..UsageSample::default()
        };
        store.record_samples(run, at, &[sample]).await.unwrap();
        at += hour;
    }
    store.close().await;
}

async fn advice_reads_the_history_and_is_applied(backend: Backend) {
    let balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    api.post("/v1/products", json!({"name": "cad"})).await;
    api.post("/v1/products/cad/entitlements", json!({"units": 30}))
        .await;
    api.post(
        "/v1/servers",
        json!({"name": "paris", "url": "http://127.0.0.1:1", "site": "eu"}),
    )
    .await;
    api.put(
        "/v1/servers/paris/products/cad",
        json!({"min_units": 0, "buffer_units": 1}),
    )
    .await;
    api.put("/v1/schedule", json!({"cron": "0 * * * *"})).await;
    seed_morning_peaks(&backend).await;

    let advice = api.get("/v1/advice?since=6d").await;
    assert_eq!(advice["schedule"]["action"], "change", "{advice:#}");
    let recommended = advice["schedule"]["recommended"]["cron"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(recommended, "0 * * * *");
    let evidence = advice["schedule"]["evidence"].to_string();
    assert!(
        evidence.contains("window"),
        "evidence names its window: {evidence}"
    );
    let paris = advice["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["server"] == "paris")
        .unwrap();
    assert_eq!(paris["action"], "change", "{paris:#}");
    let buffer = paris["recommended"]["buffer_units"].as_u64().unwrap();
    assert!(
        buffer > 1,
        "a bigger buffer where the mornings run short: {paris:#}"
    );

    let applied = api.post("/v1/advice/apply", json!({"since": "6d"})).await;
    assert_eq!(applied["applied"]["schedule"], recommended);
    assert_eq!(api.get("/v1/schedule").await["cron"], recommended);
    let detail = api.get("/v1/products/cad").await;
    assert_eq!(detail["servers"][0]["buffer_units"], buffer);
    let audit = api.get("/v1/audit?limit=5").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "admin (advice)"),
        "{audit:#}"
    );

    // Autotune is off until an operator turns it on, within sane bounds.
    assert_eq!(api.get("/v1/autotune").await["enabled"], false);
    let (status, body) = api
        .send(
            Method::PUT,
            "/v1/autotune",
            Some(
                json!({"enabled": true, "bounds": {"max_buffer_units": 5, "max_min_units": 2,
                "min_interval_minutes": 60, "max_interval_minutes": 30}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(api.get("/v1/autotune").await["enabled"], false);
    let on = api
        .put(
            "/v1/autotune",
            json!({"enabled": true, "bounds": {"max_buffer_units": 5, "max_min_units": 2,
                "min_interval_minutes": 15, "max_interval_minutes": 120}}),
        )
        .await;
    assert_eq!(on["enabled"], true);
    assert_eq!(api.get("/v1/autotune").await["window_days"], 7);
}
