//! kill -9 of the real `allot-agent` binary during a checkout storm, then a restart on the same
//! data directory: every acknowledged checkout is still live under its handle, acknowledged
//! checkins stay checked in, hard stop is not over-granted, applied moves stay applied. And the
//! same while checkins are marked and swept (migration 0008).

use serde_json::{Value, json};
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "crash-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(dir: &std::path::Path, port: u16, products: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_allot-agent"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(dir)
        .arg("--products-file")
        .arg(products)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn allot-agent")
}

async fn wait_healthy(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("allot-agent did not become healthy");
}

/// One agent's data directory, port and products file, for starting the real binary on them
/// again and again (each start waits until it answers `/healthz`).
struct Agent {
    data: std::path::PathBuf,
    port: u16,
    products: std::path::PathBuf,
    http: reqwest::Client,
    url: String,
}

impl Agent {
    /// An agent in `dir` defining `products` (a products file's JSON).
    fn new(dir: &std::path::Path, products: Value) -> Self {
        let file = dir.join("products.json");
        std::fs::write(&file, products.to_string()).unwrap();
        let port = free_port();
        Self {
            data: dir.join("data"),
            port,
            products: file,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Starts the binary and waits until it is healthy.
    async fn start(&self) -> Child {
        let child = spawn(&self.data, self.port, &self.products);
        wait_healthy(&self.http, &self.url).await;
        child
    }
}

/// A handle's heartbeat status: 200 live, 404 ended.
async fn heartbeat(http: &reqwest::Client, url: &str, handle: &str) -> u16 {
    http.post(format!("{url}/v1/heartbeat"))
        .json(&json!({"handle": handle}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[derive(Default)]
struct Acked {
    live: Vec<String>,
    checked_in: Vec<String>,
    moves: Vec<(Value, Value)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_checkout_storm_loses_no_acknowledged_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(
        dir.path(),
        json!({"products": [{"product": "cad", "allocation": 40,
                "policy": {"enforcement": "hard_stop", "seat": "concurrent",
                           "heartbeat_seconds": 60, "staleout_seconds": 600}}]}),
    );
    let (http, url) = (agent.http.clone(), agent.url.clone());
    let mut child = agent.start().await;

    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (http, url, acked) = (http.clone(), url.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let body = json!({"product": "cad", "user": format!("u{w}-{i}"), "host": "h"});
                let Ok(r) = http
                    .post(format!("{url}/v1/checkout"))
                    .json(&body)
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 200 {
                    if r.status() == 409 {
                        continue;
                    }
                    return;
                }
                let Ok(c) = r.json::<Value>().await else {
                    return;
                };
                let handle = c["handle"].as_str().unwrap().to_owned();
                acked.lock().unwrap().live.push(handle.clone());
                if i % 2 == 0 {
                    // From here the checkin's outcome is in doubt until it is answered (the
                    // kill may land after its commit and before its answer): assert neither.
                    acked.lock().unwrap().live.retain(|h| *h != handle);
                    let Ok(r) = http
                        .post(format!("{url}/v1/checkin"))
                        .json(&json!({"handle": handle}))
                        .send()
                        .await
                    else {
                        return;
                    };
                    if r.status() == 200 {
                        acked.lock().unwrap().checked_in.push(handle);
                    }
                }
            }
        }));
    }
    {
        let (http, url, acked) = (http.clone(), url.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            for i in 0u32.. {
                let path = if i % 3 == 2 { "release" } else { "grant" };
                let body = json!({"move_id": uuid::Uuid::new_v4(), "product": "cad", "units": 1});
                let Ok(r) = http
                    .post(format!("{url}/v1/allocations/{path}"))
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 200 {
                    return;
                }
                let Ok(answer) = r.json::<Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .moves
                    .push((json!({"path": path, "body": body}), answer));
            }
        }));
    }
    // Let the storm run, then kill -9 in the middle of it.
    let storm = Instant::now();
    while storm.elapsed() < Duration::from_millis(1500) {
        let enough = {
            let a = acked.lock().unwrap();
            a.live.len() + a.checked_in.len() > 300 && a.moves.len() > 10
        };
        if enough {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().expect("kill -9");
    child.wait().unwrap();
    for w in workers {
        let _ = w.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.live.len() + acked.checked_in.len() > 20,
        "the storm acknowledged too little to prove anything"
    );

    let mut child = agent.start().await;
    for handle in &acked.live {
        let status = heartbeat(&http, &url, handle).await;
        assert_eq!(status, 200, "acknowledged checkout {handle} was lost");
    }
    for handle in &acked.checked_in {
        let status = heartbeat(&http, &url, handle).await;
        assert_eq!(status, 404, "acknowledged checkin {handle} came back");
    }
    for (req, answer) in &acked.moves {
        let r = http
            .post(format!(
                "{url}/v1/allocations/{}",
                req["path"].as_str().unwrap()
            ))
            .bearer_auth(TOKEN)
            .json(&req["body"])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            &r.json::<Value>().await.unwrap(),
            answer,
            "move not kept as applied"
        );
    }
    let status: Value = http
        .get(format!("{url}/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = &status["products"][0];
    let (allocation, in_use) = (
        p["allocation"].as_u64().unwrap(),
        p["in_use"].as_u64().unwrap(),
    );
    assert!(
        in_use <= allocation,
        "hard stop over-granted: {in_use} > {allocation}"
    );
    assert!(in_use >= acked.live.len() as u64);
    let last_generation = acked
        .moves
        .iter()
        .map(|(_, a)| a["generation"].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    assert!(p["generation"].as_u64().unwrap() >= last_generation);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Posts every body to `path` from 32 concurrent clients (each body once), counting the
/// acknowledged in `done`; the acknowledged bodies with their answers.
async fn post_all(
    http: &reqwest::Client,
    url: &str,
    path: &'static str,
    bodies: Vec<Value>,
    done: &Arc<AtomicUsize>,
) -> Vec<(Value, Value)> {
    let per = bodies.len().div_ceil(32).max(1);
    let mut clients = Vec::new();
    for chunk in bodies.chunks(per) {
        let (http, url, chunk, done) = (http.clone(), url.to_owned(), chunk.to_vec(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for body in chunk {
                let Ok(r) = http.post(format!("{url}{path}")).json(&body).send().await else {
                    break;
                };
                if r.status() == 200
                    && let Ok(answer) = r.json::<Value>().await
                {
                    done.fetch_add(1, Ordering::SeqCst);
                    acked.push((body, answer));
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    acked
}

/// Checks out `n` units named from `first`; the acknowledged handles.
async fn checkouts(http: &reqwest::Client, url: &str, first: usize, n: usize) -> Vec<String> {
    let bodies = (first..first + n)
        .map(|i| json!({"product": "cad", "user": format!("u{i}"), "host": "h"}))
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    post_all(http, url, "/v1/checkout", bodies, &done)
        .await
        .into_iter()
        .map(|(_, answer)| answer["handle"].as_str().unwrap().to_owned())
        .collect()
}

/// Checks `handles` in, counting the acknowledged in `done`; the acknowledged handles.
async fn checkins(
    http: &reqwest::Client,
    url: &str,
    handles: &[String],
    done: &Arc<AtomicUsize>,
) -> Vec<String> {
    let bodies = handles.iter().map(|h| json!({"handle": h})).collect();
    post_all(http, url, "/v1/checkin", bodies, done)
        .await
        .into_iter()
        .map(|(body, _)| body["handle"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_checkins_are_swept_keeps_every_acknowledged_checkin_and_checkout() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::new(
        dir.path(),
        json!({"products": [{"product": "cad", "allocation": 100_000,
                "policy": {"enforcement": "hard_stop", "heartbeat_seconds": 600,
                           "staleout_seconds": 3600}}]}),
    );
    let (http, url) = (agent.http.clone(), agent.url.clone());
    let mut child = agent.start().await;

    // 4,000 checkouts, then 2,000 checkins: past the 1,024 marks that start a sweep.
    let live = checkouts(&http, &url, 0, 4_000).await;
    assert_eq!(live.len(), 4_000);
    let (first, rest) = live.split_at(2_000);
    let ended_before = checkins(&http, &url, first, &Arc::new(AtomicUsize::new(0))).await;
    assert_eq!(ended_before.len(), 2_000);

    // Checkins of the rest (marks and sweeps in every commit), then more checkouts; killed
    // once 300 of those checkins are acknowledged. Each side records what was acknowledged.
    let (to_end, untouched) = rest.split_at(1_500);
    let done = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (http, url, to_end, done) = (http.clone(), url.clone(), to_end.to_vec(), done.clone());
        tokio::spawn(async move {
            let ended = checkins(&http, &url, &to_end, &done).await;
            let new = checkouts(&http, &url, 4_000, 1_500).await;
            (ended, new)
        })
    };
    while done.load(Ordering::SeqCst) < 300 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().expect("kill -9");
    child.wait().unwrap();
    let (ended_during, new_live) = traffic.await.unwrap();
    assert!(
        ended_during.len() < to_end.len() || new_live.len() < 1_500,
        "the kill came mid-traffic: {} of {} checkins, {} of 1,500 checkouts acknowledged",
        ended_during.len(),
        to_end.len(),
        new_live.len()
    );

    let mut child = agent.start().await;
    let ended: HashSet<&String> = ended_before.iter().chain(&ended_during).collect();
    let untouched: HashSet<&String> = untouched.iter().collect();
    let mut alive_before = 0;
    for handle in &live {
        let status = heartbeat(&http, &url, handle).await;
        alive_before += usize::from(status == 200);
        if ended.contains(handle) {
            assert_eq!(status, 404, "acknowledged checkin {handle} came back");
        } else if untouched.contains(handle) {
            assert_eq!(status, 200, "acknowledged checkout {handle} was lost");
        }
    }
    // In use: the earlier checkouts still live, the new ones acknowledged, and at most the
    // new ones sent but unanswered.
    let view: Value = http
        .get(format!("{url}/v1/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let in_use = view["products"][0]["in_use"].as_u64().unwrap() as usize;
    assert!(
        (alive_before + new_live.len()..=alive_before + 1_500).contains(&in_use),
        "in use {in_use}: {alive_before} earlier checkouts live and {} new ones acknowledged",
        new_live.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
