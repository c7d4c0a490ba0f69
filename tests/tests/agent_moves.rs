//! The balancer-facing API: status, release and grant, idempotent by move id, durable across
//! restarts; releases never take units in use.

use allot_tests::agent::{TOKEN, TestAgent, hard_stop};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_never_takes_in_use_units() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 5).await;
    for u in ["a", "b", "c"] {
        assert_eq!(a.checkout("cad", u, "h").await.0, 200);
    }
    let id = Uuid::new_v4();
    let (s, r) = a
        .post_auth(
            "/v1/allocations/release",
            &json!({"move_id": id, "product": "cad", "units": 5}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["units"], 2, "only the two free units");
    assert_eq!(r["allocation"], 3);
    assert_eq!(r["generation"], 2);
    let (s, r) = a
        .post_auth(
            "/v1/allocations/release",
            &json!({"move_id": Uuid::new_v4(), "product": "cad", "units": 1}),
        )
        .await;
    assert_eq!(
        (s, r["units"].as_u64(), r["allocation"].as_u64()),
        (200, Some(0), Some(3))
    );
    assert_eq!(a.view("cad").await["in_use"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_moves_return_the_first_answer_and_change_nothing() {
    let a = TestAgent::start().await;
    a.define("cad", hard_stop(60)).await;
    let grant = json!({"move_id": Uuid::new_v4(), "product": "cad", "units": 4});
    let first = a.post_auth("/v1/allocations/grant", &grant).await;
    let again = a.post_auth("/v1/allocations/grant", &grant).await;
    assert_eq!(first, again);
    assert_eq!(first.1["allocation"], 4);
    let release = json!({"move_id": Uuid::new_v4(), "product": "cad", "units": 3});
    let first = a.post_auth("/v1/allocations/release", &release).await;
    a.checkout("cad", "ann", "h").await;
    let again = a.post_auth("/v1/allocations/release", &release).await;
    assert_eq!(first, again);
    let v = a.view("cad").await;
    assert_eq!(
        (v["allocated"].as_u64(), v["in_use"].as_u64()),
        (Some(1), Some(1))
    );
    // The same id as another kind of move is a conflict.
    let (s, e) = a
        .post_auth(
            "/v1/allocations/grant",
            &json!({"move_id": release["move_id"], "product": "cad", "units": 3}),
        )
        .await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("conflict")));
    assert_eq!(a.view("cad").await["allocated"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_moves_and_live_checkouts_survive_a_restart() {
    let a = TestAgent::start().await;
    a.define("cad", hard_stop(60)).await;
    let grant = json!({"move_id": Uuid::new_v4(), "product": "cad", "units": 3});
    let first = a.post_auth("/v1/allocations/grant", &grant).await;
    let (_, c) = a.checkout("cad", "ann", "h").await;
    let handle = c["handle"].as_str().unwrap().to_owned();
    let dir = a.stop().await;

    let a = TestAgent::start_in(dir, |_| {}).await;
    assert_eq!(
        a.post_auth("/v1/allocations/grant", &grant).await,
        first,
        "still applied"
    );
    let v = a.view("cad").await;
    assert_eq!(
        (v["allocated"].as_u64(), v["in_use"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(
        a.heartbeat(&handle).await.0,
        200,
        "the checkout is live under its handle"
    );
    let status = a.get_auth("/v1/status").await.1;
    assert_eq!(status["products"][0]["generation"], 1);
    assert_eq!(status["products"][0]["totals"]["checkouts"], 1);
    assert_eq!(status["server"], "test-agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_resets_the_since_last_counters_but_not_the_totals() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 1).await;
    a.checkout("cad", "ann", "h").await;
    a.checkout("cad", "bob", "h").await;
    let s1 = a.get_auth("/v1/status").await.1;
    let p = &s1["products"][0];
    assert_eq!(
        (
            p["since_last"]["checkouts"].as_u64(),
            p["since_last"]["denials"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(p["in_use"], 1);
    let s2 = a.get_auth("/v1/status").await.1;
    let p = &s2["products"][0];
    assert_eq!(p["since_last"]["checkouts"], 0);
    assert_eq!(
        p["since_last"]["peak_in_use"], 1,
        "peak restarts at the current in-use"
    );
    assert_eq!(p["totals"]["checkouts"], 1);
    assert_eq!(p["totals"]["denials"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_checks_out_heartbeats_and_checks_in_on_drop() {
    use allot_agent::client::Client;
    use allot_core::wire::agent::CheckoutRequest;
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 1).await;
    let client = Client::new(&a.url).unwrap();
    let req = CheckoutRequest {
        product: "cad".into(),
        user: "ann".into(),
        host: "h".into(),
        groups: vec![],
        units: 1,
        wait_seconds: 0,
    };
    let lease = client.lease(&req).await.unwrap();
    assert_eq!(a.view("cad").await["in_use"], 1);
    let denied = client.lease(&req).await.unwrap_err();
    assert_eq!(
        denied.code(),
        Some(allot_core::ErrorCode::LicenseUnavailable)
    );
    drop(lease);
    let freed = allot_tests::agent::poll_until(std::time::Duration::from_secs(5), || async {
        a.view("cad").await["in_use"] == 0
    })
    .await;
    assert!(freed, "dropping the lease checks in");
    let lease = client.lease(&req).await.unwrap();
    lease.checkin().await.unwrap();
    assert_eq!(a.view("cad").await["in_use"], 0);
    let admin = Client::new(&a.url).unwrap().with_bearer(Some(TOKEN.into()));
    assert_eq!(admin.status().await.unwrap().products[0].allocation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applies_each_move_once_in_order_and_a_bad_batch_changes_nothing() {
    let a = TestAgent::start().await;
    a.define("cad", hard_stop(60)).await;
    a.define("cam", hard_stop(60)).await;
    let (g1, g2, r1) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let batch = json!({"moves": [
        {"kind": "grant", "move_id": g1, "product": "cad", "units": 4},
        {"kind": "grant", "move_id": g2, "product": "cam", "units": 2},
        {"kind": "release", "move_id": r1, "product": "cad", "units": 1},
        {"kind": "grant", "move_id": Uuid::new_v4(), "product": "nope", "units": 1},
    ]});
    let (s, first) = a.post_auth("/v1/allocations/batch", &batch).await;
    assert_eq!(s, 200, "{first}");
    let outcomes = first["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0]["applied"]["allocation"], 4);
    assert_eq!(outcomes[1]["applied"]["allocation"], 2);
    assert_eq!(
        outcomes[2]["applied"]["allocation"], 3,
        "applied after the grant"
    );
    assert_eq!(outcomes[3]["refused"]["code"], "unknown_product");
    assert!(outcomes[3]["applied"].is_null());

    // Resent (a lost answer): the same answers, nothing applied twice.
    let (s, again) = a.post_auth("/v1/allocations/batch", &batch).await;
    assert_eq!(s, 200);
    assert_eq!(again, first);
    assert_eq!(a.view("cad").await["allocated"], 3);
    assert_eq!(a.view("cam").await["allocated"], 2);
    // A single move with a batch's id is the same move, not a new one.
    let (s, single) = a
        .post_auth(
            "/v1/allocations/grant",
            &json!({"move_id": g1, "product": "cad", "units": 4}),
        )
        .await;
    assert_eq!((s, single["allocation"].as_u64()), (200, Some(4)));
    assert_eq!(a.view("cad").await["allocated"], 3);

    // Bad batches are refused whole and change nothing: empty, too long, a bad move anywhere.
    let fresh = |product: &str, units: i64| json!({"kind": "grant", "move_id": Uuid::new_v4(), "product": product, "units": units});
    let too_long: Vec<_> = (0..501).map(|_| fresh("cad", 1)).collect();
    for bad in [
        json!({"moves": []}),
        json!({"moves": too_long}),
        json!({"moves": [fresh("cad", 1), fresh("a/b", 1)]}),
        json!({"moves": [fresh("cad", 1), fresh("", 1)]}),
        json!({"moves": [fresh("cad", 1), fresh("cad", 2_000_000)]}),
        json!({"moves": [fresh("cad", 1), fresh("cad", 0)]}),
        json!({"moves": [fresh("cad", 1), fresh("cad", -1)]}),
        json!({"moves": [fresh("cad", 1), {"kind": "steal", "move_id": Uuid::new_v4(), "product": "cad", "units": 1}]}),
    ] {
        let (s, e) = a.post_auth("/v1/allocations/batch", &bad).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    assert_eq!(a.view("cad").await["allocated"], 3);
    assert_eq!(a.view("cam").await["allocated"], 2);

    // Durable: the batch's moves survive a restart and still answer as applied.
    let dir = a.stop().await;
    let a = TestAgent::start_in(dir, |_| {}).await;
    assert_eq!(
        a.post_auth("/v1/allocations/batch", &batch).await,
        (200, first)
    );
    assert_eq!(a.view("cad").await["allocated"], 3);
}
