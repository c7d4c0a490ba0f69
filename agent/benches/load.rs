//! Load benchmark of the metering server over real HTTP on loopback (not a timed test).
//!
//! In one run it measures:
//! 1. the ceiling: requests/s of a bare axum handler that does nothing, with the same client,
//!    connections and bodies;
//! 2. the durable server (`allot_agent::run`, SQLite WAL + synchronous=FULL, group commit):
//!    checkout+checkin pairs/s and latency percentiles, closed loop;
//! 3. the durable server at 80% of its measured peak, open loop (latency from the scheduled
//!    send time, so queueing is not hidden);
//! 4. the RSS of the real `allot-agent` binary holding 100,000 live checkouts;
//! 5. with records flowing (`ALLOT_BENCH_ONLY=records` runs only this): the same open loop at
//!    `ALLOT_BENCH_RECORD_RATE` pairs/s (default 1,000, so 1,000 usage records/s) against a
//!    durable server synced with a real balancer (`allot_balancer::service::run` on SQLite, in
//!    process) that ships every checkin's record, and against the standalone durable server
//!    (which keeps none) in the same rounds: the checkout's cost of recording and shipping.
//!
//! 6. with policy options (`ALLOT_BENCH_ONLY=options` runs only this): checkout+checkin pairs
//!    against a product with a limit per client user, a host limit and ten group reservations,
//!    and against a plain product, in alternating rounds: what the options cost a checkout.
//!
//! 7. an honest ceiling with an external load generator (`ALLOT_BENCH_ONLY=oha` runs only
//!    this): `oha` against the real `allot-agent` binary and a bare handler that parses the same
//!    JSON, in the same rounds, 64 connections unless `ALLOT_BENCH_CONNECTIONS` says otherwise;
//!    see `load/oha.rs`. `ALLOT_BENCH_POOL` (default 200,000) live
//!    checkouts are kept for its checkin runs; `ALLOT_BENCH_PERF=<file>` profiles the agent.
//!
//! Run: `cargo bench -p allot-agent --bench load` (env `ALLOT_BENCH_SECONDS`, default 3;
//! `ALLOT_BENCH_CONNECTIONS`, default 128; `ALLOT_BENCH_ROUNDS`, default 3).

#[path = "load/oha.rs"]
mod oha;

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Result {
    ops: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// 6. The cost of the policy options (issue 16) on the checkout path: closed-loop
///    checkout+checkin pairs against a durable server whose product has a limit for every
///    client user, a host limit and ten group reservations (so every checkout counts its
///    holder against the limits and the others' reservations), and against a plain one, in
///    alternating rounds. `ALLOT_BENCH_ONLY=options` runs only this.
fn options_cost(
    server_rt: &Runtime,
    client_rt: &Runtime,
    dir: &std::path::Path,
    conns: usize,
    secs: u64,
    rounds: usize,
) {
    let limits: Vec<serde_json::Value> = (0..conns)
        .map(|w| json!({"scope": "user", "name": format!("u{w}"), "max": 1000}))
        .chain([json!({"scope": "host", "name": "bench", "max": 1_000_000})])
        .collect();
    let reservations: Vec<serde_json::Value> = (0..10)
        .map(|g| json!({"scope": "group", "name": format!("g{g}"), "units": 1}))
        .collect();
    let (plain_url, plain_stop) = start_durable(server_rt, &dir.join("plain"));
    let (ruled_url, ruled_stop) = start_durable_with(
        server_rt,
        &dir.join("options"),
        json!({"limits": limits, "reservations": reservations}),
    );
    std::thread::sleep(Duration::from_millis(300));
    closed_loop(client_rt, &plain_url, conns, 1, false);
    closed_loop(client_rt, &ruled_url, conns, 1, false);
    let (mut plain, mut ruled) = (vec![], vec![]);
    let (mut plain_p99, mut ruled_p99) = (vec![], vec![]);
    for round in 0..rounds {
        let p = closed_loop(client_rt, &plain_url, conns, secs, false);
        let r = closed_loop(client_rt, &ruled_url, conns, secs, false);
        eprintln!(
            "round {round}: plain {:.0} pairs/s (p99 {:.2} ms); with options {:.0} pairs/s (p99 {:.2} ms)",
            p.ops, p.p99_ms, r.ops, r.p99_ms
        );
        plain.push(p.ops);
        ruled.push(r.ops);
        plain_p99.push(p.p99_ms);
        ruled_p99.push(r.p99_ms);
    }
    let _ = plain_stop.send(());
    let _ = ruled_stop.send(());
    let (plain, ruled) = (median(plain), median(ruled));
    println!(
        "| measure (median of {rounds} rounds, {conns} connections, {secs} s) | plain product | with options | ratio |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| checkout+checkin pairs/s | {plain:.0} | {ruled:.0} | {:.2} |",
        ruled / plain
    );
    println!(
        "| p99 latency | {:.2} ms | {:.2} ms | |",
        median(plain_p99),
        median(ruled_p99)
    );
}

/// Starts a bare axum server (one handler that ignores its body) on the server runtime.
fn start_bare(rt: &Runtime) -> (String, oneshot::Sender<()>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let app = axum::Router::new().route("/v1/checkout", axum::routing::post(|| async { "" }));
    rt.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (url, tx)
}

fn start_durable(rt: &Runtime, dir: &std::path::Path) -> (String, oneshot::Sender<()>) {
    start_durable_with(rt, dir, json!({}))
}

/// A durable server whose product `cad` has the policy options `options`.
fn start_durable_with(
    rt: &Runtime,
    dir: &std::path::Path,
    options: serde_json::Value,
) -> (String, oneshot::Sender<()>) {
    use allot_agent::server::{LocalProduct, ServerConfig};
    let mut config = ServerConfig::new(dir);
    config.products = vec![LocalProduct {
        product: "cad".into(),
        allocation: Some(1_000_000),
        policy: serde_json::from_value(json!({"enforcement": "hard_stop",
            "heartbeat_seconds": 600, "staleout_seconds": 3600, "options": options}))
        .unwrap(),
    }];
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    rt.spawn(async move {
        allot_agent::run(listener, config, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (url, tx)
}

/// Builds one client per connection and opens its keep-alive connection before any clock
/// starts, so client set-up (TLS roots, TCP connect) is never counted as server latency.
fn warm_clients(rt: &Runtime, url: &str, conns: usize) -> Vec<reqwest::Client> {
    rt.block_on(async {
        let mut out = Vec::with_capacity(conns);
        for _ in 0..conns {
            let http = client();
            let r = http.get(format!("{url}/healthz")).send().await.unwrap();
            r.bytes().await.unwrap();
            out.push(http);
        }
        out
    })
}

/// One checkout+checkin pair; returns the two latencies in µs measured from `scheduled`.
async fn pair(http: &reqwest::Client, url: &str, user: &str, scheduled: Instant) -> [u64; 2] {
    let r = http
        .post(format!("{url}/v1/checkout"))
        .json(&json!({"product": "cad", "user": user, "host": "bench"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c: serde_json::Value = r.json().await.unwrap();
    let t1 = scheduled.elapsed().as_micros() as u64;
    let start = Instant::now();
    let r = http
        .post(format!("{url}/v1/checkin"))
        .json(&json!({"handle": c["handle"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    [t1, start.elapsed().as_micros() as u64]
}

/// Closed loop: `conns` workers, each on its own keep-alive connection, for `secs`.
/// `bare` sends one request per iteration; otherwise a checkout+checkin pair.
fn closed_loop(rt: &Runtime, url: &str, conns: usize, secs: u64, bare: bool) -> Result {
    let url = Arc::new(url.to_owned());
    let clients = warm_clients(rt, &url, conns);
    let (ops, mut lat) = rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for (w, http) in clients.into_iter().enumerate() {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let user = format!("u{w}");
                let body = json!({"product": "cad", "user": user, "host": "bench"});
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    let s = Instant::now();
                    if bare {
                        let r = http
                            .post(format!("{url}/v1/checkout"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        r.bytes().await.unwrap();
                        lat.push(s.elapsed().as_micros() as u64);
                    } else {
                        lat.extend(pair(&http, &url, &user, s).await);
                    }
                    n += 1;
                }
                (n, lat)
            }));
        }
        let mut ops = 0;
        let mut lat = Vec::new();
        for t in tasks {
            let (n, l) = t.await.unwrap();
            ops += n;
            lat.extend(l);
        }
        (ops, lat)
    });
    lat.sort_unstable();
    Result {
        ops: ops as f64 / secs as f64,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

/// Open loop at `rate` pairs/s spread over `conns` workers; latency from the scheduled time.
fn open_loop(rt: &Runtime, url: &str, conns: usize, secs: u64, rate: f64) -> Result {
    let url = Arc::new(url.to_owned());
    let per_worker = rate / conns as f64;
    let interval = Duration::from_secs_f64(1.0 / per_worker);
    let clients = warm_clients(rt, &url, conns);
    let (ops, mut lat) = rt.block_on(async {
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for (w, http) in clients.into_iter().enumerate() {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let user = format!("u{w}");
                let mut lat = Vec::new();
                // Stagger the workers over one interval.
                let mut next = start + interval.mul_f64(w as f64 / conns as f64);
                let mut n = 0u64;
                while next < end {
                    tokio::time::sleep_until(next.into()).await;
                    lat.extend(pair(&http, &url, &user, next).await);
                    n += 1;
                    next += interval;
                }
                (n, lat)
            }));
        }
        let mut ops = 0;
        let mut lat = Vec::new();
        for t in tasks {
            let (n, l) = t.await.unwrap();
            ops += n;
            lat.extend(l);
        }
        (ops, lat)
    });
    lat.sort_unstable();
    Result {
        ops: ops as f64 / secs as f64,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// RSS of the real binary with 100,000 live checkouts.
fn rss_with_live_checkouts(
    rt: &Runtime,
    dir: &std::path::Path,
    live: usize,
    conns: usize,
) -> (u64, u64) {
    let products = dir.join("products.json");
    std::fs::write(
        &products,
        json!({"products": [{"product": "bulk", "allocation": live,
            "policy": {"enforcement": "hard_stop", "heartbeat_seconds": 600, "staleout_seconds": 3600}}]})
        .to_string(),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_allot-agent"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("rss-data"))
        .arg("--products-file")
        .arg(&products)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let (before, after) = rt.block_on(async {
        let http = client();
        for _ in 0..1000 {
            if http.get(format!("{url}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = rss_kib(child.id());
        let per = live / conns;
        let mut tasks = Vec::new();
        for w in 0..conns {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let http = client();
                for i in 0..per {
                    let r = http
                        .post(format!("{url}/v1/checkout"))
                        .json(&json!({"product": "bulk", "user": format!("user-{w}-{i}"),
                            "host": format!("host-{}.example.com", i % 500)}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let products: serde_json::Value = http
            .get(format!("{url}/v1/products"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(products["products"][0]["in_use"], (per * conns) as u64);
        (before, rss_kib(child.id()))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    (before, after)
}

fn main() {
    // Run again by section 7 as its bare handler, in a process of its own.
    if let Ok(listen) = std::env::var("ALLOT_BENCH_BARE_LISTEN") {
        oha::serve_bare(&listen);
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: then do nothing, so
    // the test suite stays fast.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("load benchmark: run it with `cargo bench -p allot-agent --bench load`");
        return;
    }
    let secs = env_or("ALLOT_BENCH_SECONDS", 3);
    let conns = env_or("ALLOT_BENCH_CONNECTIONS", 128) as usize;
    let rounds = env_or("ALLOT_BENCH_ROUNDS", 3) as usize;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("allot-load-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    if std::env::var("ALLOT_BENCH_ONLY").is_ok_and(|o| o == "records") {
        records_flow(&server_rt, &client_rt, dir.path(), conns, secs, rounds);
        return;
    }
    if std::env::var("ALLOT_BENCH_ONLY").is_ok_and(|o| o == "oha") {
        let conns = env_or("ALLOT_BENCH_CONNECTIONS", 64) as usize;
        oha::honest_ceiling(dir.path(), conns, secs, rounds);
        return;
    }
    if std::env::var("ALLOT_BENCH_ONLY").is_ok_and(|o| o == "options") {
        options_cost(&server_rt, &client_rt, dir.path(), conns, secs, rounds);
        return;
    }
    let (bare_url, bare_stop) = start_bare(&server_rt);
    let (url, stop) = start_durable(&server_rt, &dir.path().join("durable"));
    std::thread::sleep(Duration::from_millis(300));
    // Warm up both.
    closed_loop(&client_rt, &bare_url, conns, 1, true);
    closed_loop(&client_rt, &url, conns, 1, false);

    let (mut bare, mut pairs, mut p50, mut p99) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let b = closed_loop(&client_rt, &bare_url, conns, secs, true);
        let d = closed_loop(&client_rt, &url, conns, secs, false);
        eprintln!(
            "round {round}: bare {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms); durable {:.0} pairs/s = {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms)",
            b.ops,
            b.p50_ms,
            b.p99_ms,
            d.ops,
            d.ops * 2.0,
            d.p50_ms,
            d.p99_ms
        );
        bare.push(b.ops);
        pairs.push(d.ops);
        p50.push(d.p50_ms);
        p99.push(d.p99_ms);
    }
    let (bare, pairs) = (median(bare), median(pairs));
    let target = pairs * 0.8;
    let (mut o50, mut o99, mut orate) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let o = open_loop(&client_rt, &url, conns, secs, target);
        eprintln!(
            "round {round}: open loop at {target:.0} pairs/s: achieved {:.0}, p50 {:.2} ms, p99 {:.2} ms",
            o.ops, o.p50_ms, o.p99_ms
        );
        orate.push(o.ops);
        o50.push(o.p50_ms);
        o99.push(o.p99_ms);
    }
    let _ = bare_stop.send(());
    let _ = stop.send(());
    std::thread::sleep(Duration::from_millis(300));

    let live = env_or("ALLOT_BENCH_LIVE", 100_000) as usize;
    let (rss_before, rss_after) = rss_with_live_checkouts(&client_rt, dir.path(), live, conns);

    println!("| measure | median of {rounds} rounds |");
    println!("| --- | --- |");
    println!("| bare axum handler (ceiling) | {bare:.0} req/s |");
    println!(
        "| durable checkout+checkin | {pairs:.0} pairs/s = {:.0} req/s |",
        pairs * 2.0
    );
    println!(
        "| durable vs ceiling | {:.0}% (requests/s), {:.0}% (pairs/s vs req/s) |",
        200.0 * pairs / bare,
        100.0 * pairs / bare
    );
    println!(
        "| closed-loop latency per request | p50 {:.2} ms, p99 {:.2} ms |",
        median(p50),
        median(p99)
    );
    println!(
        "| open loop at 80% of peak ({target:.0} pairs/s; achieved {:.0}) | p50 {:.2} ms, p99 {:.2} ms |",
        median(orate),
        median(o50),
        median(o99)
    );
    println!(
        "| RSS of allot-agent, idle → {live} live checkouts | {:.1} MiB → {:.1} MiB |",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
}

/// Section 5: open-loop checkout+checkin pairs against a server whose every checkin leaves a
/// usage record shipped to a real balancer, and against the standalone server, round by round.
fn records_flow(
    server_rt: &Runtime,
    client_rt: &Runtime,
    dir: &std::path::Path,
    conns: usize,
    secs: u64,
    rounds: usize,
) {
    use allot_agent::balancer::BalancerConfig;
    use allot_agent::server::ServerConfig;
    use clap::Parser;
    let rate = env_or("ALLOT_BENCH_RECORD_RATE", 1_000) as f64;
    let admin = "bench-admin-token-0123456789abcdef";
    // The real balancer service on SQLite, built from `serve` arguments.
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let balancer_url = format!("http://{}", listener.local_addr().unwrap());
    let argv = [
        "allot-balancer",
        "serve",
        "--data-dir",
        &dir.join("balancer").display().to_string(),
        "--admin-token",
        admin,
    ];
    let allot_balancer::cli::Cli {
        command: allot_balancer::cli::Command::Serve(args),
        ..
    } = allot_balancer::cli::Cli::try_parse_from(argv).unwrap()
    else {
        panic!("serve arguments");
    };
    let (stop_balancer, stopped) = oneshot::channel::<()>();
    server_rt.spawn(async move {
        allot_balancer::service::run(listener, args, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let agent_listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let agent_url = format!("http://{}", agent_listener.local_addr().unwrap());
    let http = client();
    let api = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        let request = http
            .request(method, format!("{balancer_url}{path}"))
            .bearer_auth(admin)
            .json(&body);
        let path = path.to_owned();
        async move {
            let r = request.send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let token = client_rt.block_on(async {
        for _ in 0..200 {
            if http
                .get(format!("{balancer_url}/healthz"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        api(
            reqwest::Method::POST,
            "/v1/products",
            json!({"name": "cad"}),
        )
        .await;
        api(
            reqwest::Method::POST,
            "/v1/products/cad/entitlements",
            json!({"units": 1_000_000}),
        )
        .await;
        api(
            reqwest::Method::PUT,
            "/v1/schedule",
            json!({"cron": "0 0 1 1 *", "timezone": "UTC"}),
        )
        .await;
        let registered = api(
            reqwest::Method::POST,
            "/v1/servers",
            json!({"name": "bench", "url": agent_url, "site": "bench"}),
        )
        .await;
        registered["token"].as_str().unwrap().to_owned()
    });
    let mut config = ServerConfig::new(dir.join("shipping"));
    config.name = "bench".into();
    config.token = Some(token);
    config.balancer = Some(BalancerConfig::new(vec![balancer_url.clone()]));
    let (stop_agent, agent_stopped) = oneshot::channel::<()>();
    server_rt.spawn(async move {
        allot_agent::run(agent_listener, config, async move {
            let _ = agent_stopped.await;
        })
        .await
        .unwrap();
    });
    // Every unit to the server, so no checkout waits for an instant balance.
    client_rt.block_on(async {
        for _ in 0..400 {
            let products: serde_json::Value = http
                .get(format!("{agent_url}/v1/products"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if products["products"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        api(
            reqwest::Method::PUT,
            "/v1/servers/bench/products/cad",
            json!({"min_units": 1_000_000, "buffer_units": 0}),
        )
        .await;
        api(reqwest::Method::POST, "/v1/balance", json!({})).await;
    });
    let (standalone, stop_standalone) = start_durable(server_rt, &dir.join("standalone"));
    std::thread::sleep(Duration::from_millis(300));
    open_loop(client_rt, &agent_url, conns, 1, rate);
    open_loop(client_rt, &standalone, conns, 1, rate);
    let (mut with, mut without) = (vec![], vec![]);
    for round in 0..rounds {
        let w = open_loop(client_rt, &agent_url, conns, secs, rate);
        let o = open_loop(client_rt, &standalone, conns, secs, rate);
        eprintln!(
            "round {round}: at {rate:.0} pairs/s, shipping records: achieved {:.0}, p50 {:.2} ms, \
             p99 {:.2} ms; standalone: achieved {:.0}, p50 {:.2} ms, p99 {:.2} ms",
            w.ops, w.p50_ms, w.p99_ms, o.ops, o.p50_ms, o.p99_ms
        );
        with.push(w);
        without.push(o);
    }
    // Let the shipper drain, then read what it shipped.
    std::thread::sleep(Duration::from_secs(6));
    let metrics = client_rt.block_on(async {
        http.get(format!("{agent_url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let read = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let med = |v: &[Result], f: fn(&Result) -> f64| median(v.iter().map(f).collect());
    println!(
        "| at {rate:.0} pairs/s, open loop, median of {rounds} rounds | shipping records | standalone (none) |"
    );
    println!("| --- | --- | --- |");
    println!(
        "| achieved pairs/s | {:.0} | {:.0} |",
        med(&with, |r| r.ops),
        med(&without, |r| r.ops)
    );
    println!(
        "| latency per request p50 / p99 | {:.2} / {:.2} ms | {:.2} / {:.2} ms |",
        med(&with, |r| r.p50_ms),
        med(&with, |r| r.p99_ms),
        med(&without, |r| r.p50_ms),
        med(&without, |r| r.p99_ms)
    );
    println!(
        "| records shipped / still waiting | {:.0} / {:.0} | – |",
        read("allot_agent_records_shipped_total"),
        read("allot_agent_records_waiting")
    );
    let _ = stop_agent.send(());
    let _ = stop_standalone.send(());
    std::thread::sleep(Duration::from_millis(300));
    let _ = stop_balancer.send(());
    std::thread::sleep(Duration::from_millis(300));
}
