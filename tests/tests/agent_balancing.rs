//! The metering server's side of balancing, against the REAL balancer (the `allot-balancer`
//! binary on a loopback port, its books on SQLite in a temporary directory): sync defines
//! products and renews the lease, an expired lease refuses new checkouts, a reset adopts the
//! books, instant balance turns a would-be denial into a grant within the hold bound, and at
//! most one instant request per product is in flight under a burst.

use allot_agent::balancer::BalancerConfig;
use allot_tests::Backend;
use allot_tests::agent::{TestAgent, bind, hard_stop, poll_until};
use allot_tests::balancer::{ADMIN_TOKEN, Api, Balancer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A real balancer process. Its cron schedule is moved to once a year so no scheduled run
/// moves units behind a test's back; tests balance explicitly.
struct Central {
    url: String,
    _process: Balancer,
    _backend: Backend,
}

impl Central {
    /// A balancer whose lease is `lease` seconds with a `margin` (servers keep the difference).
    async fn start(lease: u64, margin: u64) -> Central {
        let backend = Backend::sqlite();
        let (lease, margin) = (lease.to_string(), margin.to_string());
        let process = Balancer::start_with(
            &backend,
            &[
                "--lease-seconds",
                &lease,
                "--lease-margin-seconds",
                &margin,
                "--call-timeout-ms",
                "2000",
            ],
            &[],
        )
        .await;
        let central = Central {
            url: process.url().to_owned(),
            _process: process,
            _backend: backend,
        };
        central
            .api()
            .put("/v1/schedule", json!({"cron": "0 3 1 1 *"}))
            .await;
        central
    }

    /// The default lease: a day, with a five-minute margin.
    async fn standard() -> Central {
        Self::start(24 * 3600, 300).await
    }

    fn api(&self) -> Api {
        Api::new(&self.url, Some(ADMIN_TOKEN))
    }

    /// A hard-stop product with `units` purchased (none: no entitlement at all).
    async fn product(&self, name: &str, units: u32) {
        self.api()
            .post(
                "/v1/products",
                json!({"name": name, "enforcement": "hard_stop", "heartbeat_seconds": 1,
                    "staleout_seconds": 60}),
            )
            .await;
        if units > 0 {
            self.api()
                .post(
                    &format!("/v1/products/{name}/entitlements"),
                    json!({"units": units}),
                )
                .await;
        }
    }

    /// Registers a server at `url`; returns its token.
    async fn register(&self, name: &str, url: &str) -> String {
        let r = self
            .api()
            .post(
                "/v1/servers",
                json!({"name": name, "url": url, "site": name}),
            )
            .await;
        r["token"].as_str().expect("a token").to_owned()
    }

    /// The books' figures of one product: (reserve, this server's allocation).
    async fn books(&self, product: &str, server: &str) -> (u64, u64) {
        let p = self.api().get(&format!("/v1/products/{product}")).await;
        let allocation = p["servers"]
            .as_array()
            .and_then(|cells| cells.iter().find(|c| c["server"] == server))
            .and_then(|c| c["allocation"].as_u64())
            .unwrap_or(0);
        (p["reserve"].as_u64().expect("reserve"), allocation)
    }
}

/// Starts a metering server registered with `central` as `name`, syncing with `balancer_url`.
async fn agent(
    central: &Central,
    name: &str,
    balancer_url: &str,
    dir: TempDir,
    adjust: impl FnOnce(&mut BalancerConfig),
) -> TestAgent {
    let listener = bind().await;
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let token = central.register(name, &url).await;
    start_agent(listener, name, &token, balancer_url, dir, adjust).await
}

async fn start_agent(
    listener: TcpListener,
    name: &str,
    token: &str,
    balancer_url: &str,
    dir: TempDir,
    adjust: impl FnOnce(&mut BalancerConfig),
) -> TestAgent {
    let mut b = BalancerConfig::new(vec![balancer_url.to_owned()]);
    b.sync_interval = Duration::from_secs(3600);
    adjust(&mut b);
    TestAgent::start_on(listener, dir, |c| {
        c.name = name.to_owned();
        c.token = Some(token.to_owned());
        c.balancer = Some(b);
    })
    .await
}

/// Waits until the agent learned `product` from a sync.
async fn synced(a: &TestAgent, product: &str) {
    assert!(
        poll_until(Duration::from_secs(10), || async {
            !a.view(product).await.is_null()
        })
        .await,
        "the agent never learned {product} from the balancer"
    );
}

/// The value of a metric line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn status(a: &TestAgent, path: &str, product: &str) -> Value {
    let (s, body) = a.get_auth(path).await;
    assert_eq!(s, 200, "{path}: {body}");
    body["products"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["product"] == product))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_defines_products_renews_the_lease_and_a_restart_within_it_keeps_granting() {
    let central = Central::standard().await;
    central.product("cad", 4).await;
    let a = agent(
        &central,
        "paris",
        &central.url,
        TempDir::new().unwrap(),
        |b| b.sync_interval = Duration::from_secs(1),
    )
    .await;
    synced(&a, "cad").await;
    let v = a.view("cad").await;
    assert_eq!(v["policy"]["enforcement"], "hard_stop");
    assert_eq!(v["allocated"], 0, "a sync gives no units by itself");
    // The product is defined in memory a moment before the sync's outcome is recorded.
    assert!(
        poll_until(Duration::from_secs(5), || async {
            metric(&a.metrics().await, "allot_agent_balancer_up ") == Some(1.0)
        })
        .await,
        "{}",
        a.metrics().await
    );
    let m = a.metrics().await;
    // The server keeps the balancer's lease minus the margin: 24 h - 5 min.
    let left = metric(&m, "allot_agent_lease_seconds_left ").expect("lease gauge");
    assert!((86_000.0..=86_100.0).contains(&left), "lease left {left}");

    // A policy changed at the balancer reaches the server at the next sync.
    central
        .api()
        .post(
            "/v1/products",
            json!({"name": "sim", "enforcement": "soft_stop"}),
        )
        .await;
    synced(&a, "sim").await;
    assert_eq!(a.view("sim").await["policy"]["enforcement"], "soft_stop");

    // Units come from the balancer; then the server restarts with the balancer unreachable:
    // the durable lease keeps it granting.
    let (_, body) = a.checkout("cad", "ann", "h").await.clone();
    assert!(body["handle"].is_string(), "instant balance: {body}");
    let dir = a.stop().await;
    let dead = format!("http://{}", bind().await.local_addr().unwrap());
    let a = TestAgent::start_in(dir, |c| {
        c.balancer = Some(BalancerConfig::new(vec![dead]));
    })
    .await;
    let (s, body) = a.checkout("cad", "bob", "h").await;
    assert_eq!(s, 200, "granting within the persisted lease: {body}");
    let m = a.metrics().await;
    assert!(
        poll_until(Duration::from_secs(5), || async {
            metric(&a.metrics().await, "allot_agent_balancer_up ") == Some(0.0)
        })
        .await,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_that_never_synced_refuses_new_checkouts_with_license_expired() {
    let dead = format!("http://{}", bind().await.local_addr().unwrap());
    let a = TestAgent::start_in(TempDir::new().unwrap(), |c| {
        c.balancer = Some(BalancerConfig::new(vec![dead]));
    })
    .await;
    a.product("cad", hard_stop(60), 2).await;
    let (s, e) = a.checkout("cad", "ann", "h").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (410, Some("license_expired"))
    );
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("never synced"), "{msg}");
    // Refused for the lease, not for lack of units: counted apart, never as a denial (the
    // balancer could not have prevented it by moving units).
    let m = a.metrics().await;
    assert!(
        m.contains(r#"allot_agent_lease_refusals_total{product="cad"} 1"#),
        "{m}"
    );
    assert!(!m.contains(r#"reason="lease_expired""#), "{m}");
    let st = status(&a, "/v1/status?peek=true", "cad").await;
    assert_eq!(st["since_last"]["denials"], 0, "{st}");
    assert_eq!(st["totals"]["denials"], 0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lease_refuses_new_checkouts_but_heartbeats_and_checkins_keep_working() {
    // Balancer lease 4 s, margin 2 s: the server may grant for 2 s after a sync.
    let central = Central::start(4, 2).await;
    central.product("cad", 4).await;
    let started = Instant::now();
    let a = agent(
        &central,
        "paris",
        &central.url,
        TempDir::new().unwrap(),
        |_| {},
    )
    .await;
    synced(&a, "cad").await;
    let (s, c) = a.checkout("cad", "ann", "h").await;
    assert_eq!(s, 200, "{c}");
    let handle = c["handle"].as_str().unwrap().to_owned();
    // No further sync (the interval is an hour): the lease runs out.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        let (s, body) = a.checkout("cad", "bob", "h").await;
        if s == 410 {
            break body;
        }
        assert_eq!(s, 200, "{body}");
        a.checkin(body["handle"].as_str().unwrap()).await;
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(started.elapsed() >= Duration::from_secs(2), "expired early");
    assert_eq!(refusal["error"]["code"], "license_expired");
    let msg = refusal["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("expired at") && msg.contains("unreachable since"),
        "{msg}"
    );
    assert_eq!(a.heartbeat(&handle).await.0, 200);
    assert_eq!(a.checkin(&handle).await.0, 200);
    assert_eq!(a.view("cad").await["in_use"], 0);
    let m = a.metrics().await;
    assert!(
        metric(&m, r#"allot_agent_lease_refusals_total{product="cad"}"#).is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"allot_agent_denials_total{product="cad",reason="unavailable"}"#
        ),
        Some(0.0),
        "{m}"
    );
    let st = status(&a, "/v1/status?peek=true", "cad").await;
    assert_eq!(st["totals"]["denials"], 0, "{st}");
    assert_eq!(metric(&m, "allot_agent_lease_seconds_left "), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_adopts_the_books_allocations_and_live_checkouts_continue() {
    let central = Central::start(3, 2).await;
    central.product("cad", 5).await;
    let listener = bind().await;
    let addr = listener.local_addr().unwrap();
    let token = central.register("paris", &format!("http://{addr}")).await;
    let a = start_agent(
        listener,
        "paris",
        &token,
        &central.url,
        TempDir::new().unwrap(),
        |_| {},
    )
    .await;
    synced(&a, "cad").await;
    let mut handles = Vec::new();
    for u in ["ann", "bob"] {
        let (s, c) = a.checkout("cad", u, "h").await;
        assert_eq!(s, 200, "{c}");
        handles.push(c["handle"].as_str().unwrap().to_owned());
    }
    let held = a.view("cad").await["allocated"].as_u64().unwrap();
    assert!(held >= 2);
    assert_eq!(central.books("cad", "paris").await.1, held);
    let before = status(&a, "/v1/status?peek=true", "cad").await["generation"]
        .as_u64()
        .unwrap();
    let dir = a.stop().await;

    // Silent past the balancer's lease: declared lost, its units back in the reserve.
    let deadline = Instant::now() + Duration::from_secs(15);
    while central.books("cad", "paris").await != (5, 0) {
        assert!(
            Instant::now() < deadline,
            "the server was never declared lost"
        );
        // A manual run first declares lost the servers silent past the lease.
        central.api().post("/v1/balance", json!({})).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // It comes back: the first sync says reset, and it adopts the books' allocation (0).
    // (Proactive pulls are switched off so nothing refills it behind the test's back.)
    let listener = TcpListener::bind(addr).await.expect("the same port again");
    let a = start_agent(listener, "paris", &token, &central.url, dir, |b| {
        b.trigger.low_watermark_percent = 0;
        b.trigger.low_watermark_min_units = 0;
    })
    .await;
    assert!(
        poll_until(Duration::from_secs(10), || async {
            a.view("cad").await["allocated"] == 0
        })
        .await,
        "the reset was not adopted: {}",
        a.view("cad").await
    );
    let v = a.view("cad").await;
    assert_eq!(
        (v["in_use"].as_u64(), v["free"].as_u64()),
        (Some(2), Some(0))
    );
    let after = status(&a, "/v1/status?peek=true", "cad").await["generation"]
        .as_u64()
        .unwrap();
    assert!(after > before, "generation {before} → {after}");
    // The live checkouts continue and end normally.
    for h in &handles {
        assert_eq!(a.heartbeat(h).await.0, 200);
        assert_eq!(a.checkin(h).await.0, 200);
    }
    // The adoption is durable.
    let dir = a.stop().await;
    let a = TestAgent::start_in(dir, |_| {}).await;
    assert_eq!(a.view("cad").await["allocated"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instant_balance_turns_a_would_be_denial_into_a_grant_within_the_hold_bound() {
    let central = Central::standard().await;
    central.product("cad", 10).await;
    // A generous bound: two cores run every test at once here, and a loaded machine must not
    // turn a slow grant into a false failure. A grant after the bound would be a 409.
    let a = agent(
        &central,
        "paris",
        &central.url,
        TempDir::new().unwrap(),
        |b| {
            b.instant_wait = Duration::from_secs(2);
        },
    )
    .await;
    synced(&a, "cad").await;
    assert_eq!(a.view("cad").await["allocated"], 0);
    let t = Instant::now();
    let (s, c) = a.checkout("cad", "ann", "h").await;
    let took = t.elapsed();
    assert_eq!(s, 200, "{c}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let v = a.view("cad").await;
    assert!(v["allocated"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["in_use"], 1);
    // The books agree with the server, and the request is counted on both sides.
    assert_eq!(
        central.books("cad", "paris").await.1,
        v["allocated"].as_u64().unwrap()
    );
    let st = status(&a, "/v1/status?peek=true", "cad").await;
    assert_eq!(st["since_last"]["instant_requests"], 1, "{st}");
    assert_eq!(st["totals"]["instant_requests"], 1, "{st}");
    assert!(
        poll_until(Duration::from_secs(5), || async {
            a.metrics().await.contains(
                r#"allot_agent_instant_requests_total{outcome="granted",product="cad"} 1"#,
            )
        })
        .await,
        "{}",
        a.metrics().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_empty_reserve_and_no_donors_the_checkout_is_denied_after_the_hold_bound() {
    let central = Central::standard().await;
    central.product("cad", 0).await;
    let a = agent(
        &central,
        "paris",
        &central.url,
        TempDir::new().unwrap(),
        |b| {
            b.instant_wait = Duration::from_millis(400);
        },
    )
    .await;
    synced(&a, "cad").await;
    let t = Instant::now();
    let (s, e) = a.checkout("cad", "ann", "h").await;
    let took = t.elapsed();
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("license_unavailable"))
    );
    assert!(
        took >= Duration::from_millis(380) && took < Duration::from_secs(3),
        "denied after {took:?}, the hold bound is 400 ms"
    );
    let st = status(&a, "/v1/status", "cad").await;
    assert_eq!(st["since_last"]["denials"], 1, "{st}");
    assert_eq!(st["waiting"], 0, "{st}");
    let m = a.metrics().await;
    // Asked again while the client waited, at most every hold bound (the retry after the
    // answer of none and the client's hold end may race).
    assert!(
        metric(
            &m,
            r#"allot_agent_instant_requests_total{outcome="short",product="cad"}"#
        )
        .is_some_and(|n| (1.0..=2.0).contains(&n)),
        "{m}"
    );
    assert!(
        m.contains(r#"allot_agent_denials_total{product="cad",reason="unavailable"} 1"#),
        "{m}"
    );
}

/// A TCP relay in front of the balancer that delays every request by `delay` and records the
/// most connections that had a request outstanding at once (the agent's HTTP client uses one
/// connection per concurrent request), how many instant-balance requests passed and every
/// byte the agent sent. With `lose_first_instant`, the first instant-balance request is lost:
/// never forwarded, never answered.
struct Relay {
    url: String,
    busy_max: Arc<AtomicUsize>,
    instant: Arc<AtomicUsize>,
    sent: Arc<std::sync::Mutex<Vec<u8>>>,
}

/// What every relayed connection shares.
#[derive(Clone)]
struct Tap {
    delay: Duration,
    busy: Arc<AtomicUsize>,
    busy_max: Arc<AtomicUsize>,
    instant: Arc<AtomicUsize>,
    sent: Arc<std::sync::Mutex<Vec<u8>>>,
    lose_first_instant: bool,
}

impl Relay {
    async fn start(upstream: &str, delay: Duration) -> Relay {
        Self::start_with(upstream, delay, false).await
    }

    async fn start_with(upstream: &str, delay: Duration, lose_first_instant: bool) -> Relay {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = bind().await;
        let url = format!("http://{}", listener.local_addr().unwrap());
        let tap = Tap {
            delay,
            busy: Arc::new(AtomicUsize::new(0)),
            busy_max: Arc::new(AtomicUsize::new(0)),
            instant: Arc::new(AtomicUsize::new(0)),
            sent: Arc::default(),
            lose_first_instant,
        };
        let relay_tap = tap.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let tap = relay_tap.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    relay(client, server, tap).await;
                });
            }
        });
        Relay {
            url,
            busy_max: tap.busy_max,
            instant: tap.instant,
            sent: tap.sent,
        }
    }

    /// The bodies of the instant-balance requests relayed (or lost) so far, in order.
    fn instant_requests(&self) -> Vec<Value> {
        let sent = self.sent.lock().unwrap().clone();
        let mut out = Vec::new();
        let key = br#"{"request_id""#;
        let mut i = 0;
        while let Some(at) = sent[i..].windows(key.len()).position(|w| w == key) {
            let start = i + at;
            let mut values = serde_json::Deserializer::from_slice(&sent[start..]).into_iter();
            if let Some(Ok(v)) = values.next() {
                out.push(v);
            }
            i = start + key.len();
        }
        out
    }
}

async fn relay(client: TcpStream, server: TcpStream, tap: Tap) {
    let Tap {
        delay,
        busy,
        busy_max,
        instant,
        sent,
        lose_first_instant,
    } = tap;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let outstanding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let o = outstanding.clone();
    let b = busy.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(n) = cr.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            sent.lock().unwrap().extend_from_slice(&buf[..n]);
            if buf[..n].starts_with(b"POST /v1/instant-balance") {
                let before = instant.fetch_add(1, Ordering::SeqCst);
                if lose_first_instant && before == 0 {
                    // Lost: keep the connection open and silent; the body is still logged.
                    loop {
                        let Ok(n) = cr.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        sent.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
            }
            if !o.swap(true, Ordering::SeqCst) {
                let now = b.fetch_add(1, Ordering::SeqCst) + 1;
                busy_max.fetch_max(now, Ordering::SeqCst);
            }
            tokio::time::sleep(delay).await;
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(n) = sr.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            if outstanding.swap(false, Ordering::SeqCst) {
                busy.fetch_sub(1, Ordering::SeqCst);
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_is_served_by_a_few_batched_instant_requests() {
    let central = Central::standard().await;
    central.product("cad", 40).await;
    let relay = Relay::start(&central.url, Duration::from_millis(150)).await;
    let a = agent(
        &central,
        "paris",
        &relay.url,
        TempDir::new().unwrap(),
        |b| {
            b.instant_wait = Duration::from_secs(4);
        },
    )
    .await;
    synced(&a, "cad").await;
    assert_eq!(relay.instant.load(Ordering::SeqCst), 0);
    let burst = 20;
    let mut tasks = Vec::new();
    for i in 0..burst {
        let url = a.url.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/checkout"))
                .json(&json!({"product": "cad", "user": format!("u{i}"), "host": "h"}))
                .send()
                .await
                .expect("checkout");
            r.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "every held checkout is granted");
    }
    let v = a.view("cad").await;
    assert_eq!(v["in_use"], burst);
    // One request, then one more for the clients queued after it (batched), at a time.
    let busy = relay.busy_max.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&busy),
        "{busy} requests to the balancer in flight at once"
    );
    // The burst is served by a short chain of requests, not one per checkout.
    let sent = relay.instant.load(Ordering::SeqCst);
    assert!((1..=4).contains(&sent), "{sent} instant requests");
    let st = status(&a, "/v1/status?peek=true", "cad").await;
    assert_eq!(st["totals"]["instant_requests"].as_u64(), Some(sent as u64));
    assert_eq!(
        central.books("cad", "paris").await.1,
        v["allocated"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_peek_does_not_reset_the_counters() {
    let a = TestAgent::start().await;
    a.product("cad", hard_stop(60), 1).await;
    assert_eq!(a.checkout("cad", "ann", "h").await.0, 200);
    assert_eq!(a.checkout("cad", "bob", "h").await.0, 409);
    for _ in 0..2 {
        let st = status(&a, "/v1/status?peek=true", "cad").await;
        assert_eq!(
            (
                st["since_last"]["checkouts"].as_u64(),
                st["since_last"]["denials"].as_u64()
            ),
            (Some(1), Some(1))
        );
    }
    let st = status(&a, "/v1/status", "cad").await;
    assert_eq!(st["since_last"]["checkouts"], 1);
    let st = status(&a, "/v1/status", "cad").await;
    assert_eq!(
        (
            st["since_last"]["checkouts"].as_u64(),
            st["totals"]["checkouts"].as_u64()
        ),
        (Some(0), Some(1))
    );
    let (s, e) = a.get_auth("/v1/status?peek=maybe").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_say_which_units_clients_wait_for_and_which_are_a_top_up() {
    let central = Central::standard().await;
    central.product("cad", 40).await;
    let relay = Relay::start(&central.url, Duration::ZERO).await;
    let a = agent(
        &central,
        "paris",
        &relay.url,
        TempDir::new().unwrap(),
        |b| {
            b.instant_wait = Duration::from_secs(2);
            // A watermark of 3 units: the first pull asks for 1 + 6, and the fifth checkout
            // leaves 2 spare, which a proactive top-up refills.
            b.trigger.low_watermark_min_units = 3;
        },
    )
    .await;
    synced(&a, "cad").await;
    for i in 0..5 {
        let (s, c) = a.checkout("cad", &format!("u{i}"), "h").await;
        assert_eq!(s, 200, "{c}");
    }
    assert!(
        poll_until(Duration::from_secs(5), || async {
            relay.instant_requests().len() >= 2
        })
        .await,
        "{:?}",
        relay.instant_requests()
    );
    let asked = relay.instant_requests();
    let first = &asked[0];
    assert_eq!(
        (first["units"].as_u64(), first["urgent_units"].as_u64()),
        (Some(7), Some(1)),
        "the held checkout's unit is urgent, the headroom a top-up: {first}"
    );
    let second = &asked[1];
    assert_eq!(
        (second["units"].as_u64(), second["urgent_units"].as_u64()),
        (Some(4), Some(0)),
        "a proactive top-up has no urgent units: {second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_instant_request_does_not_block_the_next_held_checkout_past_the_hold_bound() {
    let central = Central::standard().await;
    central.product("cad", 10).await;
    // The first instant request is lost: the agent's call hangs until its 5 s timeout.
    let relay = Relay::start_with(&central.url, Duration::ZERO, true).await;
    let hold = Duration::from_secs(1);
    let a = agent(
        &central,
        "paris",
        &relay.url,
        TempDir::new().unwrap(),
        |b| b.instant_wait = hold,
    )
    .await;
    synced(&a, "cad").await;
    // Held for the bound, then denied (or, at the very end of its hold, served by the retry
    // that the lost request's end allows: the two race).
    let (s, e) = a.checkout("cad", "ann", "h").await;
    assert!(s == 409 || s == 200, "{s}: {e}");
    // Past the hold bound, the lost request no longer blocks an urgent pull (before, it did
    // for the 5 s in-flight timeout, and this checkout was denied too).
    let t = Instant::now();
    let (s, c) = a.checkout("cad", "bob", "h").await;
    assert_eq!(s, 200, "{c}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(relay.instant.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_answer_of_none_the_waiting_clients_are_asked_for_again() {
    let central = Central::standard().await;
    central.product("cad", 0).await;
    let a = agent(
        &central,
        "paris",
        &central.url,
        TempDir::new().unwrap(),
        |_| {},
    )
    .await;
    synced(&a, "cad").await;
    let a = Arc::new(a);
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move {
            a.post(
                "/v1/checkout",
                &json!({"product": "cad", "user": "ann", "host": "h", "wait_seconds": 30}),
            )
            .await
        })
    };
    // The balancer has nothing: it answers 0 units.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            metric(
                &a.metrics().await,
                r#"allot_agent_instant_requests_total{outcome="short",product="cad"}"#,
            )
            .is_some_and(|n| n >= 1.0)
        })
        .await,
        "{}",
        a.metrics().await
    );
    assert_eq!(a.view("cad").await["waiting"], 1);
    // Units reach the reserve; nothing changes on the server, yet the waiting client gets one.
    central
        .api()
        .post("/v1/products/cad/entitlements", json!({"units": 2}))
        .await;
    let (s, c) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiting client was never asked for again")
        .unwrap();
    assert_eq!(s, 200, "{c}");
    // The client is served once the server applied the grant; the balancer books it just after.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            central.books("cad", "paris").await.1
                == a.view("cad").await["allocated"].as_u64().unwrap()
        })
        .await,
        "the books never agreed with the server"
    );
}
