//! Policies, seat rules and ACLs of the metering server, through real HTTP.

use allot_tests::agent::{TestAgent, hard_stop};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_stop_denies_beyond_the_allocation_and_frees_on_checkin() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 2).await;
    let (s1, c1) = a.checkout("cad", "ann", "ws1").await;
    let (s2, _) = a.checkout("cad", "bob", "ws2").await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(c1["overdraft"], false);
    assert_eq!(c1["units"], 1);
    let (s3, e) = a.checkout("cad", "cy", "ws3").await;
    assert_eq!(s3, 409);
    assert_eq!(e["error"]["code"], "license_unavailable");
    assert_eq!(a.view("cad").await["in_use"], 2);
    let (s, _) = a.checkin(c1["handle"].as_str().unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(a.checkout("cad", "cy", "ws3").await.0, 200);
    assert!(
        a.metrics()
            .await
            .contains("allot_agent_denials_total{product=\"cad\",reason=\"unavailable\"} 1")
    );
    let status = a.get_auth("/v1/status").await.1;
    assert_eq!(status["products"][0]["since_last"]["denials"], 1);
    assert_eq!(status["products"][0]["since_last"]["checkouts"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_stop_grants_beyond_the_allocation_as_overdraft() {
    let a = TestAgent::start().await;
    a.product(
        "cad",
        json!({"enforcement": "soft_stop", "seat": "concurrent", "heartbeat_seconds": 1, "staleout_seconds": 60}),
        1,
    )
    .await;
    let (_, first) = a.checkout("cad", "ann", "ws1").await;
    let (s, second) = a.checkout("cad", "bob", "ws1").await;
    assert_eq!(s, 200);
    assert_eq!(first["overdraft"], false);
    assert_eq!(second["overdraft"], true);
    let v = a.view("cad").await;
    assert_eq!(
        (v["in_use"].as_u64(), v["free"].as_u64()),
        (Some(2), Some(0))
    );
    let status = a.get_auth("/v1/status").await.1;
    assert_eq!(status["products"][0]["since_last"]["overdrafts"], 1);
    assert!(
        a.metrics()
            .await
            .contains("allot_agent_overdrafts_total{product=\"cad\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stop_grants_and_only_counts() {
    let a = TestAgent::start().await;
    a.product(
        "viewer",
        json!({"enforcement": "no_stop", "seat": "concurrent", "heartbeat_seconds": 1, "staleout_seconds": 60}),
        0,
    )
    .await;
    for u in ["a", "b", "c"] {
        let (s, c) = a.checkout("viewer", u, "h").await;
        assert_eq!(s, 200);
        assert_eq!(c["overdraft"], false);
    }
    assert_eq!(a.view("viewer").await["in_use"], 3);
    let status = a.get_auth("/v1/status").await.1;
    assert_eq!(status["products"][0]["since_last"]["checkouts"], 3);
    assert_eq!(status["products"][0]["since_last"]["peak_in_use"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_host_launches_share_one_seat_until_the_last_checkin() {
    let a = TestAgent::start().await;
    a.product(
        "cad",
        json!({"enforcement": "hard_stop", "seat": "per_user_host", "heartbeat_seconds": 1, "staleout_seconds": 60}),
        1,
    )
    .await;
    let (_, c1) = a.checkout("cad", "ann", "ws1").await;
    let (s, c2) = a.checkout("cad", "ann", "ws1").await;
    assert_eq!(s, 200, "second launch shares the seat");
    assert_ne!(c1["handle"], c2["handle"]);
    assert_eq!(a.view("cad").await["in_use"], 1);
    assert_eq!(
        a.checkout("cad", "ann", "ws2").await.0,
        409,
        "another host needs a seat"
    );
    assert_eq!(
        a.checkout("cad", "bob", "ws1").await.0,
        409,
        "another user needs a seat"
    );
    a.checkin(c1["handle"].as_str().unwrap()).await;
    assert_eq!(
        a.view("cad").await["in_use"],
        1,
        "seat held by the remaining handle"
    );
    a.checkin(c2["handle"].as_str().unwrap()).await;
    assert_eq!(a.view("cad").await["in_use"], 0);
    assert_eq!(a.checkout("cad", "bob", "ws1").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_shares_one_seat_across_hosts() {
    let a = TestAgent::start().await;
    a.product(
        "cad",
        json!({"enforcement": "hard_stop", "seat": "per_user", "heartbeat_seconds": 1, "staleout_seconds": 60}),
        1,
    )
    .await;
    assert_eq!(a.checkout("cad", "ann", "ws1").await.0, 200);
    assert_eq!(a.checkout("cad", "ann", "ws2").await.0, 200);
    assert_eq!(a.view("cad").await["in_use"], 1);
    assert_eq!(a.checkout("cad", "bob", "ws1").await.0, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_seats_take_units_per_checkout() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 3).await;
    let (s, c) = a
        .post(
            "/v1/checkout",
            &json!({"product": "cad", "user": "ann", "host": "h", "units": 2}),
        )
        .await;
    assert_eq!((s, c["units"].as_u64()), (200, Some(2)));
    assert_eq!(
        a.checkout("cad", "ann", "h").await.0,
        200,
        "same user, own units"
    );
    assert_eq!(a.view("cad").await["in_use"], 3);
    assert_eq!(a.checkout("cad", "ann", "h").await.0, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_denies_users_hosts_and_groups_and_deny_wins() {
    let a = TestAgent::start().await;
    a.product(
        "cad",
        json!({"enforcement": "hard_stop", "seat": "concurrent", "heartbeat_seconds": 1, "staleout_seconds": 60,
            "acl": {"allow_users": ["ann", "bob"], "deny_users": ["bob"], "deny_hosts": ["kiosk"],
                    "deny_groups": ["contractors"]}}),
        5,
    )
    .await;
    let before = a.snapshot().await;
    for (user, host, groups) in [
        ("bob", "ws1", json!([])),
        ("cy", "ws1", json!([])),
        ("ann", "kiosk", json!([])),
        ("ann", "ws1", json!(["eng", "contractors"])),
    ] {
        let (s, e) = a
            .post(
                "/v1/checkout",
                &json!({"product": "cad", "user": user, "host": host, "groups": groups}),
            )
            .await;
        assert_eq!(s, 403, "{user}@{host}");
        assert_eq!(e["error"]["code"], "forbidden");
    }
    assert_eq!(a.snapshot().await, before, "denials change nothing");
    assert_eq!(a.checkout("cad", "ann", "ws1").await.0, 200);
    assert!(
        a.metrics()
            .await
            .contains("allot_agent_denials_total{product=\"cad\",reason=\"forbidden\"} 4")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_groups_admits_only_members() {
    let a = TestAgent::start().await;
    a.product(
        "cad",
        json!({"enforcement": "hard_stop", "seat": "concurrent", "heartbeat_seconds": 1, "staleout_seconds": 60,
            "acl": {"allow_groups": ["eng"], "allow_hosts": ["ws1"]}}),
        5,
    )
    .await;
    let ok = json!({"product": "cad", "user": "ann", "host": "ws1", "groups": ["eng"]});
    assert_eq!(a.post("/v1/checkout", &ok).await.0, 200);
    let no_group = json!({"product": "cad", "user": "ann", "host": "ws1"});
    assert_eq!(a.post("/v1/checkout", &no_group).await.0, 403);
    let other_host = json!({"product": "cad", "user": "ann", "host": "ws2", "groups": ["eng"]});
    assert_eq!(a.post("/v1/checkout", &other_host).await.0, 403);
}
