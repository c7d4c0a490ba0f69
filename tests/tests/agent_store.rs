//! The metering server's store under kill -9 while checkins are being swept (migration 0008:
//! a checkin marks its row ended and later group commits delete marked rows in row order).
//! What was acknowledged must survive the kill exactly: an acknowledged checkin stays ended,
//! an acknowledged checkout whose checkin was never sent stays live.

use allot_tests::process::{Running, binary, free_port};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Starts the `allot-agent` binary on `data`, with `cad` allocated far beyond the test's use.
async fn start(data: &Path) -> Running {
    let products = data.with_extension("products.json");
    std::fs::write(
        &products,
        json!({"products": [{"product": "cad", "allocation": 100_000,
            "policy": {"enforcement": "hard_stop", "heartbeat_seconds": 600,
                       "staleout_seconds": 3600}}]})
        .to_string(),
    )
    .unwrap();
    let port = free_port();
    let (data, products) = (data.display().to_string(), products.display().to_string());
    Running::start(
        &binary("allot-agent"),
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &data,
            "--products-file",
            &products,
        ],
        &[("RUST_LOG", "warn")],
        port,
    )
    .await
}

async fn post(http: &reqwest::Client, url: &str, path: &str, body: Value) -> Option<Value> {
    let r = http
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Checks out `n` units, 32 at a time; the handles acknowledged.
async fn checkouts(http: &reqwest::Client, url: &str, n: usize) -> Vec<String> {
    futures_util::stream::iter(0..n)
        .map(|i| async move {
            let body = json!({"product": "cad", "user": format!("u{i}"), "host": "h"});
            post(http, url, "/v1/checkout", body)
                .await
                .and_then(|v| v["handle"].as_str().map(str::to_owned))
        })
        .buffer_unordered(32)
        .filter_map(|h| async { h })
        .collect()
        .await
}

/// Checks `handles` in, 32 at a time, counting the acknowledged in `done`; the handles whose
/// checkin was acknowledged.
async fn checkins(
    http: &reqwest::Client,
    url: &str,
    handles: &[String],
    done: &AtomicUsize,
) -> Vec<String> {
    futures_util::stream::iter(handles.iter().cloned())
        .map(|h| async move {
            let ok = post(http, url, "/v1/checkin", json!({"handle": h})).await;
            ok.map(|_| {
                done.fetch_add(1, Ordering::SeqCst);
                h
            })
        })
        .buffer_unordered(32)
        .filter_map(|h| async { h })
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_sweep_keeps_every_acknowledged_checkin_and_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent-data");
    let http = reqwest::Client::new();
    let mut agent = start(&data).await;
    let url = agent.url.clone();

    // 4,000 checkouts, then 2,000 checkins: past the 1,024 marks that start a sweep.
    let live = checkouts(&http, &url, 4_000).await;
    assert_eq!(live.len(), 4_000);
    let (first, rest) = live.split_at(2_000);
    let ended_before = checkins(&http, &url, first, &AtomicUsize::new(0)).await;
    assert_eq!(ended_before.len(), 2_000);

    // Checkins of the rest (marks and sweeps in every commit), then more checkouts; killed
    // once 300 of those checkins are acknowledged. Each side records what was acknowledged.
    let (to_end, untouched) = rest.split_at(1_500);
    let done = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (http, url, to_end, done) = (http.clone(), url.clone(), to_end.to_vec(), done.clone());
        tokio::spawn(async move {
            let ended = checkins(&http, &url, &to_end, &done).await;
            let new = checkouts(&http, &url, 1_500).await;
            (ended, new)
        })
    };
    while done.load(Ordering::SeqCst) < 300 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    agent.kill9();
    let (ended_during, new_live) = traffic.await.unwrap();
    assert!(
        ended_during.len() < to_end.len() || new_live.len() < 1_500,
        "the kill came mid-traffic: {} of {} checkins, {} of 1,500 checkouts acknowledged",
        ended_during.len(),
        to_end.len(),
        new_live.len()
    );

    let agent = start(&data).await;
    let url = agent.url.clone();
    let heartbeat = |h: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/heartbeat"))
                .json(&json!({"handle": h}))
                .send()
                .await
                .unwrap();
            (h, r.status().as_u16())
        }
    };
    let statuses: Vec<(String, u16)> = futures_util::stream::iter(live.iter().cloned())
        .map(heartbeat)
        .buffer_unordered(32)
        .collect()
        .await;
    let ended: HashSet<&String> = ended_before.iter().chain(&ended_during).collect();
    let untouched: HashSet<&String> = untouched.iter().collect();
    for (h, status) in &statuses {
        if ended.contains(h) {
            assert_eq!(
                *status, 404,
                "an acknowledged checkin came back to life: {h}"
            );
        } else if untouched.contains(h) {
            assert_eq!(*status, 200, "an acknowledged checkout was lost: {h}");
        }
    }
    // The products view counts exactly the live ones: the checkouts never checked in, those
    // whose checkin was unanswered (either outcome) and the new ones acknowledged (at least).
    let view: Value = http
        .get(format!("{url}/v1/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let in_use = view["products"][0]["in_use"].as_u64().unwrap() as usize;
    let alive_before = statuses.iter().filter(|(_, s)| *s == 200).count();
    assert!(
        (alive_before + new_live.len()..=alive_before + 1_500).contains(&in_use),
        "in use {in_use}: {alive_before} earlier checkouts live and {} new ones acknowledged",
        new_live.len()
    );
}
