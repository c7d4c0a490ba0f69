//! The wait queue: first come first served, answered the moment a unit frees, timeouts, and
//! clients that disconnect while waiting.

use allot_tests::agent::{TestAgent, hard_stop, poll_until};
use serde_json::json;
use sqlx::Connection;
use std::sync::Arc;
use std::time::Duration;

fn waiting(user: &str, secs: u32) -> serde_json::Value {
    json!({"product": "cad", "user": user, "host": "h", "wait_seconds": secs})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_first_come_first_served() {
    let a = Arc::new(TestAgent::start().await);
    a.product("cad", hard_stop(60), 1).await;
    let (_, held) = a.checkout("cad", "holder", "h").await;
    let mut tasks = Vec::new();
    for (i, user) in ["w1", "w2", "w3"].into_iter().enumerate() {
        let a2 = a.clone();
        tasks.push(tokio::spawn(async move {
            a2.post("/v1/checkout", &waiting(user, 20)).await
        }));
        // Enqueue in a known order.
        let queued = poll_until(Duration::from_secs(5), || async {
            a.view("cad").await["waiting"] == i + 1
        })
        .await;
        assert!(queued);
    }
    let mut handle = held["handle"].as_str().unwrap().to_owned();
    for (i, task) in tasks.into_iter().enumerate() {
        a.checkin(&handle).await;
        let (s, c) = task.await.unwrap();
        assert_eq!(s, 200, "waiter {i}: {c}");
        handle = c["handle"].as_str().unwrap().to_owned();
        let v = a.view("cad").await;
        assert_eq!(v["in_use"], 1);
        assert_eq!(v["waiting"], 2 - i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_request_does_not_jump_the_queue() {
    let a = Arc::new(TestAgent::start().await);
    a.product("cad", hard_stop(60), 1).await;
    let (_, held) = a.checkout("cad", "holder", "h").await;
    let a2 = a.clone();
    let w = tokio::spawn(async move { a2.post("/v1/checkout", &waiting("w1", 20)).await });
    assert!(
        poll_until(Duration::from_secs(5), || async {
            a.view("cad").await["waiting"] == 1
        })
        .await
    );
    a.checkin(held["handle"].as_str().unwrap()).await;
    assert_eq!(w.await.unwrap().0, 200);
    assert_eq!(a.checkout("cad", "late", "h").await.0, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_times_out_is_denied_and_leaves_the_queue() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 1).await;
    a.checkout("cad", "holder", "h").await;
    let started = std::time::Instant::now();
    let (s, e) = a.post("/v1/checkout", &waiting("w1", 1)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("license_unavailable"))
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    let v = a.view("cad").await;
    assert_eq!(
        (v["waiting"].as_u64(), v["in_use"].as_u64()),
        (Some(0), Some(1))
    );
    assert!(
        a.metrics()
            .await
            .contains("allot_agent_denials_total{product=\"cad\",reason=\"timeout\"} 1")
    );
    // A standalone server has no balancer to ship records to: it keeps none.
    let db = format!("sqlite://{}", a.dir.path().join("agent.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_waiting_leaves_without_a_unit() {
    let a = Arc::new(TestAgent::start().await);
    a.product("cad", hard_stop(60), 1).await;
    let (_, held) = a.checkout("cad", "holder", "h").await;
    // A client with its own connection that gives up after 300 ms (drops the connection).
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/v1/checkout", a.url))
        .json(&waiting("gone", 30))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    drop(impatient);
    let left = poll_until(Duration::from_secs(5), || async {
        a.view("cad").await["waiting"] == 0
    })
    .await;
    assert!(left, "the disconnected waiter left the queue");
    a.checkin(held["handle"].as_str().unwrap()).await;
    let v = a.view("cad").await;
    assert_eq!(
        (v["in_use"].as_u64(), v["free"].as_u64()),
        (Some(0), Some(1)),
        "no unit went to the gone client"
    );
    assert_eq!(a.checkout("cad", "next", "h").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_from_the_balancer_wakes_a_waiter() {
    let a = Arc::new(TestAgent::start().await);
    a.define("cad", hard_stop(60)).await;
    let a2 = a.clone();
    let w = tokio::spawn(async move { a2.post("/v1/checkout", &waiting("w1", 20)).await });
    assert!(
        poll_until(Duration::from_secs(5), || async {
            a.view("cad").await["waiting"] == 1
        })
        .await
    );
    a.grant("cad", 1).await;
    let (s, c) = w.await.unwrap();
    assert_eq!(s, 200, "{c}");
    assert_eq!(a.view("cad").await["in_use"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_wait_ends_serves_the_smaller_request_behind_it() {
    let a = Arc::new(TestAgent::start().await);
    a.product("cad", hard_stop(60), 2).await;
    // One of two units in use: a head asking for both blocks a one-unit request behind it.
    let (s, _) = a.checkout("cad", "holder", "h").await;
    assert_eq!(s, 200);
    let a2 = a.clone();
    let head = tokio::spawn(async move {
        a2.post(
            "/v1/checkout",
            &json!({"product": "cad", "user": "big", "host": "h", "units": 2, "wait_seconds": 1}),
        )
        .await
    });
    assert!(
        poll_until(Duration::from_secs(5), || async {
            a.view("cad").await["waiting"] == 1
        })
        .await
    );
    let a3 = a.clone();
    let behind = tokio::spawn(async move { a3.post("/v1/checkout", &waiting("small", 20)).await });
    assert!(
        poll_until(Duration::from_secs(5), || async {
            a.view("cad").await["waiting"] == 2
        })
        .await
    );
    let started = std::time::Instant::now();
    let (s, _) = head.await.unwrap();
    assert_eq!(s, 409, "the head's wait ends");
    // The unit that was free all along goes to the request behind at once, not when some
    // other change happens (here none would before its 20 s wait ends).
    let (s, c) = tokio::time::timeout(Duration::from_secs(5), behind)
        .await
        .expect("the waiter behind was not served when the head left")
        .unwrap();
    assert_eq!(s, 200, "{c}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let v = a.view("cad").await;
    assert_eq!(
        (v["waiting"].as_u64(), v["in_use"].as_u64()),
        (Some(0), Some(2))
    );
}
