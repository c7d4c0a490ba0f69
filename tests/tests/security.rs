//! Credentials end to end: refused calls are counted on both processes, and a metering
//! server's token is rotated while the server runs, without a moment in which the balancer and
//! the server refuse each other.

use allot_tests::agent::{self, TestAgent};
use allot_tests::balancer::{ADMIN_TOKEN, Api, Balancer};
use allot_tests::fleet::Fleet;
use allot_tests::process::binary;
use allot_tests::{Backend, on_both_backends};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

on_both_backends!(a_token_rotates_without_downtime);

/// The value of the sample `series` (name and labels exactly as exported) in `metrics`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// `POST /v1/sync` as a metering server presenting `token`; answers the status.
async fn sync_with(balancer: &str, token: &str) -> StatusCode {
    Api::new(balancer, Some(token))
        .send(Method::POST, "/v1/sync", Some(json!({"version": "test"})))
        .await
        .0
}

/// `previous_token_until` of `server` in `GET /v1/servers`: set while a rotation's grace runs.
async fn grace_of(api: &Api, server: &str) -> Value {
    let servers = api.get("/v1/servers").await;
    servers["items"]
        .as_array()
        .and_then(|items| items.iter().find(|s| s["name"] == server))
        .map(|s| s["previous_token_until"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_on_both_processes() {
    let backend = Backend::sqlite();
    let balancer = Balancer::start(&backend).await;
    let counter = r#"allot_requests_refused_total{reason="unauthorized"}"#;
    let metrics = |url: String| async move {
        reqwest::get(format!("{url}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    };
    let before = metrics(balancer.url().to_owned()).await;
    assert_eq!(sample(&before, counter), Some(0.0), "{before}");
    assert_eq!(
        sample(
            &before,
            r#"allot_requests_refused_total{reason="forbidden"}"#
        ),
        Some(0.0)
    );
    let wrong = balancer.api().with_token(Some("allot_wrong"));
    assert_eq!(
        wrong.send(Method::GET, "/v1/products", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        sync_with(balancer.url(), "allot_wrong").await,
        StatusCode::UNAUTHORIZED
    );
    let after = metrics(balancer.url().to_owned()).await;
    assert_eq!(sample(&after, counter), Some(2.0), "{after}");
    assert!(
        !after.contains("allot_wrong"),
        "a token never reaches the metrics"
    );

    let agent = TestAgent::start().await;
    let counter = r#"allot_agent_requests_refused_total{reason="unauthorized"}"#;
    assert_eq!(sample(&agent.metrics().await, counter), Some(0.0));
    assert_eq!(agent.get("/v1/status").await.0, 401);
    assert_eq!(sample(&agent.metrics().await, counter), Some(1.0));
}

async fn a_token_rotates_without_downtime(backend: Backend) {
    let mut fleet = Fleet::start(backend, &[], &[]).await;
    fleet.product("cad", 10).await;
    fleet.add_meter("paris").await;
    fleet.add_meter("tokyo").await;
    fleet.wait_synced("cad").await;
    let balancer = fleet.balancer.url().to_owned();
    let api = fleet.api();
    let old = fleet.meters[0].token.clone();

    // Bad rotations change nothing.
    for (path, body, status) in [
        ("/v1/servers/nobody/rotate-token", json!({}), 404),
        (
            "/v1/servers/paris/rotate-token",
            json!({"grace_seconds": 2_592_001}),
            400,
        ),
        ("/v1/servers/paris/rotate-token", json!({"grace": 1}), 400),
    ] {
        let (got, answer) = api.send(Method::POST, path, Some(body)).await;
        assert_eq!(got.as_u16(), status, "{path}: {answer}");
    }
    let (got, _) = api
        .with_token(Some(&old))
        .send(
            Method::POST,
            "/v1/servers/paris/rotate-token",
            Some(json!({})),
        )
        .await;
    assert_eq!(
        got,
        StatusCode::UNAUTHORIZED,
        "a server cannot rotate tokens"
    );
    assert_eq!(sync_with(&balancer, &old).await, StatusCode::OK);

    // Rotate while paris runs with its old token: both directions keep working.
    let rotated: Value = api
        .post(
            "/v1/servers/paris/rotate-token",
            json!({"grace_seconds": 3600}),
        )
        .await;
    let new = rotated["token"].as_str().expect("a new token").to_owned();
    assert_ne!(new, old);
    assert_eq!(rotated["name"], "paris");
    assert!(rotated["previous_token_until"].is_string(), "{rotated}");
    assert_eq!(
        grace_of(&api, "paris").await,
        rotated["previous_token_until"]
    );
    let audit = api.get("/v1/audit?limit=1").await;
    assert_eq!(
        audit["items"][0]["action"], "server.rotate_token",
        "{audit}"
    );
    assert!(
        !audit.to_string().contains(&new),
        "the audit never holds a token"
    );
    fleet.limits("paris", "cad", 2, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 2);
    fleet.assert_doctor_ok().await;
    assert_eq!(sync_with(&balancer, &old).await, StatusCode::OK);
    // A malformed sync with the new token is refused and retires nothing (bad input changes
    // nothing, even when its credentials are good).
    let (got, _) = Api::new(&balancer, Some(&new))
        .send(Method::POST, "/v1/sync", Some(json!({"version": ""})))
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    assert_eq!(
        grace_of(&api, "paris").await,
        rotated["previous_token_until"],
        "the grace still runs"
    );

    // The operator restarts paris with the new token; its first sync retires the old one.
    let paris = &mut fleet.meters[0];
    paris.kill9();
    paris.token = new.clone();
    paris.start(&[]).await;
    allot_tests::eventually(
        "the old token is refused once paris presents the new one",
        Duration::from_secs(20),
        || {
            let (balancer, old) = (balancer.clone(), old.clone());
            async move { sync_with(&balancer, &old).await == StatusCode::UNAUTHORIZED }
        },
    )
    .await;
    assert_eq!(sync_with(&balancer, &new).await, StatusCode::OK);
    assert_eq!(
        grace_of(&api, "paris").await,
        Value::Null,
        "the grace is over"
    );
    // The balancer now presents the new token, which the restarted server accepts.
    fleet.limits("paris", "cad", 3, 0).await;
    fleet.balance().await;
    assert_eq!(fleet.allocation("paris", "cad").await, 3);
    fleet.assert_doctor_ok().await;
    assert_eq!(fleet.meters[0].product("cad").await["allocated"], 3);

    // Without a restart the old token still dies when its grace ends (rotated with the CLI).
    let tokyo_old = fleet.meters[1].token.clone();
    let out = std::process::Command::new(binary("allot-balancer"))
        .args([
            "server",
            "rotate-token",
            "tokyo",
            "--grace-seconds",
            "1",
            "--json",
        ])
        .args(["--url", &balancer, "--admin-token", ADMIN_TOKEN])
        .output()
        .expect("run the admin CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert!(printed["token"].as_str().is_some_and(|t| t != tokyo_old));
    assert_eq!(sync_with(&balancer, &tokyo_old).await, StatusCode::OK);
    allot_tests::eventually(
        "tokyo's old token is refused when the grace ends",
        Duration::from_secs(20),
        || {
            let (balancer, old) = (balancer.clone(), tokyo_old.clone());
            async move { sync_with(&balancer, &old).await == StatusCode::UNAUTHORIZED }
        },
    )
    .await;
    // A leaked token is refused at once.
    let leaked = api
        .post(
            "/v1/servers/tokyo/rotate-token",
            json!({"grace_seconds": 0}),
        )
        .await;
    assert!(leaked["previous_token_until"].is_null(), "{leaked}");
    let leaked_token = leaked["token"].as_str().unwrap().to_owned();
    api.post(
        "/v1/servers/tokyo/rotate-token",
        json!({"grace_seconds": 0}),
    )
    .await;
    assert_eq!(
        sync_with(&balancer, &leaked_token).await,
        StatusCode::UNAUTHORIZED
    );
    let metrics = reqwest::get(format!("{balancer}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        sample(
            &metrics,
            r#"allot_requests_refused_total{reason="unauthorized"}"#
        )
        .is_some_and(|n| n >= 3.0),
        "{metrics}"
    );
}

/// The moment between a server's restart with its new token and its first sync: the balancer
/// still presents the old token first, is refused, and at once resends with the new one. A
/// server that never syncs (standalone here) makes that moment last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_falls_back_to_the_new_token_before_the_server_syncs() {
    let backend = Backend::sqlite();
    let balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    let listener = agent::bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    api.post(
        "/v1/servers",
        json!({"name": "solo", "url": url, "site": "eu"}),
    )
    .await;
    let rotated = api
        .post(
            "/v1/servers/solo/rotate-token",
            json!({"grace_seconds": 3600}),
        )
        .await;
    let new = rotated["token"].as_str().unwrap().to_owned();
    let server = TestAgent::start_on(listener, tempfile::tempdir().unwrap(), |config| {
        config.token = Some(new.clone());
    })
    .await;
    let refused = r#"allot_agent_requests_refused_total{reason="unauthorized"}"#;
    assert_eq!(sample(&server.metrics().await, refused), Some(0.0));

    let report = api.get("/v1/doctor").await;
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["unreachable"], json!([]), "{report:#}");
    // The old token was tried first and refused, then the new one was accepted.
    assert_eq!(sample(&server.metrics().await, refused), Some(1.0));
    // Only the server's own call with the new token ends the grace.
    assert!(grace_of(&api, "solo").await.is_string());
    assert_eq!(sync_with(balancer.url(), &new).await, StatusCode::OK);
    assert_eq!(grace_of(&api, "solo").await, Value::Null);
    // From now on only the new token is presented: nothing more is refused.
    let report = api.get("/v1/doctor").await;
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(sample(&server.metrics().await, refused), Some(1.0));
}
