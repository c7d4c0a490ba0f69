//! Staleout: checkouts not heartbeated within `staleout_seconds` are released by the server.

use allot_tests::agent::{TestAgent, hard_stop, poll_until};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_without_heartbeats_stales_out_and_its_handle_goes_bad() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(1), 1).await;
    let (_, c) = a.checkout("cad", "ann", "ws1").await;
    let handle = c["handle"].as_str().unwrap().to_owned();
    assert_eq!(a.view("cad").await["in_use"], 1);
    let freed = poll_until(Duration::from_secs(5), || async {
        a.view("cad").await["in_use"] == 0
    })
    .await;
    assert!(freed, "the checkout should stale out after ~1 s");
    let (s, e) = a.heartbeat(&handle).await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("bad_handle")));
    let (s, e) = a.checkin(&handle).await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("bad_handle")));
    let status = a.get_auth("/v1/status").await.1;
    assert_eq!(status["products"][0]["since_last"]["staleouts"], 1);
    assert!(
        a.metrics()
            .await
            .contains("allot_agent_staleouts_total{product=\"cad\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_checkout_alive_past_its_staleout() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(1), 1).await;
    let (_, c) = a.checkout("cad", "ann", "ws1").await;
    let handle = c["handle"].as_str().unwrap().to_owned();
    let start = std::time::Instant::now();
    // Heartbeat every 300 ms for 2.5 s: well past the 1 s staleout.
    while start.elapsed() < Duration::from_millis(2500) {
        let (s, r) = a.heartbeat(&handle).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["staleout_in_seconds"], 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(a.view("cad").await["in_use"], 1);
    assert_eq!(a.checkin(&handle).await.0, 200);
    assert_eq!(a.view("cad").await["in_use"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staleout_wakes_a_waiting_client() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(1), 1).await;
    assert_eq!(a.checkout("cad", "ann", "ws1").await.0, 200);
    let (s, c) = a
        .post(
            "/v1/checkout",
            &json!({"product": "cad", "user": "bob", "host": "ws2", "wait_seconds": 10}),
        )
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(a.view("cad").await["in_use"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_handles_are_bad_handles() {
    let a = TestAgent::start().await;
    for h in ["nope", "0123456789abcdef0123456789abcdef"] {
        let (s, e) = a.heartbeat(h).await;
        assert_eq!((s, e["error"]["code"].as_str()), (404, Some("bad_handle")));
    }
}
