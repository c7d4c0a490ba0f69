//! Balancing benchmarks over real HTTP on loopback, with real stores (not a timed test).
//!
//! 1. **Instant balance, reserve path.** One metering server (an in-process `allot_agent`) and
//!    one balancer (the real `service::run`, built from `serve` command-line arguments). A client acting as the server sends
//!    `POST /v1/instant-balance` (its own Bearer token, `units: 1`, a fresh request id)
//!    sequentially; the balancer answers only after the grant was logged, applied (and fsynced)
//!    by the server and booked, so the round trip is the end-to-end latency of a would-be
//!    denial turned into a grant. Interleaved `GET /healthz` round trips on the same balancer
//!    are the baseline: the ratio separates the balancing work from HTTP and scheduling noise.
//! 2. **Scheduled run, 200 servers × 50 products.** 200 in-process metering servers on their
//!    own ports, 50 products with entitlements and a buffer on every cell. The first run
//!    distributes the reserve (one grant per cell), later runs are steady state: a quiet run
//!    (nothing changed) and runs after some cells saw a checkout and a denial (the planner
//!    grants them more). Each is timed as a whole `Engine::run`.
//!
//! 3. **Usage report, a year of records.** `ALLOT_BENCH_RECORDS` usage records (default
//!    1,000,000: 10,000 users in 100 groups over 365 days, stored through the store's own
//!    `store_records` in batches of 1,000, as metering servers ship them), then the 30-day
//!    per-user report (`Store::usage_totals`, what `GET /v1/usage` runs) and, as the same run's
//!    baseline, reading the window's intervals (`Store::usage_intervals`). Medians of 5 rounds.
//!
//! 4. **The console's estate page, 200 servers × 50 products.** Every cell with a floor, a
//!    buffer and a usage sample, an expiring purchase per product; the real service with its
//!    console, logged in as `admin`; `GET /` timed (median and p99 of `ALLOT_BENCH_CONSOLE`,
//!    default 50) and weighed with its stylesheet and script; then loaded
//!    `ALLOT_BENCH_PAINTS` times (default 20) in a real headless Chromium, where the browser's
//!    own timing gives the first contentful paint and the load event's end.
//!
//! 5. **First distribution, 200 servers × 50 products (9,000 grants).** A fresh estate as in
//!    2, its first `Engine::run` timed whole, with each server's moves batched (one request
//!    per phase) and, as the same run's baseline, one request per move; a fresh estate for
//!    each, `ALLOT_BENCH_DISTRIBUTION_ROUNDS` (default 3) rounds, medians and the ratio.
//!
//! 6. **A large estate** (`ALLOT_BENCH_ONLY=estate`, never by default): 1,000 servers × 100
//!    products (`ALLOT_BENCH_SERVERS`, `ALLOT_BENCH_PRODUCTS`), the servers in-process, the
//!    balancer the real `allot-balancer` binary in its own process. Runs asked over HTTP and
//!    timed whole (the first distribution, quiet and steady runs), instant balances sent back
//!    to back during each run (their p50/p99), and the balancer's resident memory, now and peak.
//!
//! All run on SQLite (a temporary directory) and on PostgreSQL (a fresh database created at
//! `ALLOT_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`, dropped at the
//! end; skipped with a message when unreachable).
//!
//! Run: `cargo bench -p allot-balancer --bench balancing`. Env: `ALLOT_BENCH_ONLY` (`instant`,
//! `run`, `distribution`, `reports` or `console`; default all five), `ALLOT_BENCH_INSTANT` (requests
//! per backend, default 2000), `ALLOT_BENCH_SERVERS` (200), `ALLOT_BENCH_PRODUCTS` (50),
//! `ALLOT_BENCH_HOT_CELLS` (starving cells per steady run, default 100),
//! `ALLOT_BENCH_BACKENDS` (`sqlite,postgres`), `ALLOT_BENCH_BALANCER_BIN` (the estate's balancer
//! binary, for an A/B of two builds in one session), `ALLOT_BENCH_PG_ASYNC_COMMIT=1` (diagnostic
//! only: `synchronous_commit = off` on the bench database, to show what commit fsyncs cost;
//! not durable, never a reported target figure), `ALLOT_BENCH_KEEP_LOG=<file>` (the estate
//! balancer's log copied there before its directory goes).

use allot_balancer::auth::{self, ServerTokens};
use allot_balancer::balance::{Engine, EngineConfig};
use allot_balancer::cli::{Cli, Command};
use allot_balancer::service;
use allot_balancer::store::{self, ScheduleSetting, Store};
use allot_core::domain::RunTrigger;
use allot_core::wire::balancer::{
    AddEntitlement, CreateProduct, InstantBalanceResponse, RegisterServer, SetAllocation,
};
use clap::Parser;
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The 1-minute load average, printed with every figure: the machine is shared.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU seconds this process has used (user and system, from `/proc/self/stat`, in the kernel's
/// clock ticks of 1/100 s).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Past the command name in parentheses, `utime` and `stime` are the 12th and 13th fields.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// `p` in 0..=1 of sorted µs, in ms.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// A fresh PostgreSQL database, dropped by [`PgDatabase::drop_now`].
struct PgDatabase {
    admin: String,
    name: String,
    url: String,
}

impl PgDatabase {
    async fn create() -> Option<Self> {
        let admin = std::env::var("ALLOT_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = match PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("*** PostgreSQL half skipped: {admin} unreachable ({e})");
                return None;
            }
        };
        let name = format!("allot_bench_{}", uuid::Uuid::new_v4().simple());
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create the bench database");
        if std::env::var("ALLOT_BENCH_PG_ASYNC_COMMIT").is_ok_and(|v| v == "1") {
            eprintln!("*** diagnostic: synchronous_commit = off on {name} (not durable)");
            conn.execute(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {name} SET synchronous_commit = off"
            )))
            .await
            .expect("alter the bench database");
        }
        let (base, _) = admin.rsplit_once('/').expect("a database path in the URL");
        let url = format!("{base}/{name}");
        Some(Self { admin, name, url })
    }

    async fn drop_now(self) {
        let mut conn = PgConnection::connect(&self.admin).await.expect("connect");
        conn.execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .await
        .expect("drop the bench database");
    }
}

/// A store of one backend and what keeps it alive.
struct Books {
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
    pg: Option<PgDatabase>,
}

impl Books {
    async fn open(backend: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg = match backend {
            "postgres" => Some(PgDatabase::create().await?),
            _ => None,
        };
        let url = pg.as_ref().map(|p| p.url.clone());
        let store = store::open(url.as_deref(), dir.path())
            .await
            .expect("open the store");
        Some(Self { store, dir, pg })
    }

    async fn close(self) {
        self.store.close().await;
        if let Some(pg) = self.pg {
            pg.drop_now().await;
        }
    }
}

/// Registers `name` at `url` and returns its token, as `POST /v1/servers` does.
async fn register(store: &dyn Store, tokens: &ServerTokens, name: &str, url: &str) -> String {
    let salt = ServerTokens::new_salt();
    let token = tokens.token(name, &salt);
    let req = RegisterServer {
        name: name.into(),
        url: url.into(),
        site: "bench".into(),
    };
    store
        .register_server("bench", &req, &salt, &auth::hash_token(&token))
        .await
        .expect("register");
    token
}

fn product_def(name: &str) -> CreateProduct {
    serde_json::from_value(json!({"name": name, "enforcement": "hard_stop",
        "heartbeat_seconds": 600, "staleout_seconds": 3600}))
    .expect("a product definition")
}

/// Starts an in-process metering server on `listener` with the balancer's token for it and the
/// given products defined (no allocation: units arrive as the balancer's grants).
fn start_agent(
    rt: &Runtime,
    listener: TcpListener,
    dir: &std::path::Path,
    name: &str,
    token: String,
    products: &[String],
) -> oneshot::Sender<()> {
    use allot_agent::server::{LocalProduct, ServerConfig};
    let mut config = ServerConfig::new(dir);
    config.name = name.into();
    config.token = Some(token);
    config.products = products
        .iter()
        .map(|p| LocalProduct {
            product: p.clone(),
            allocation: None,
            policy: serde_json::from_value(json!({"enforcement": "hard_stop",
                "heartbeat_seconds": 600, "staleout_seconds": 3600}))
            .expect("a policy"),
        })
        .collect();
    let (tx, rx) = oneshot::channel::<()>();
    rt.spawn(async move {
        allot_agent::run(listener, config, async move {
            let _ = rx.await;
        })
        .await
        .expect("agent");
    });
    tx
}

/// Starts the real balancer service (`service::run`: store, engine, scheduler, API) on a
/// fresh loopback port over the books at `data_dir` / `database_url`; returns its URL and a
/// stop switch. Built from the command line so the bench follows the service's own wiring.
fn start_balancer(
    rt: &Runtime,
    data_dir: &std::path::Path,
    database_url: Option<&str>,
    admin_token: &str,
    console: Option<std::net::SocketAddr>,
) -> (String, oneshot::Sender<()>) {
    // A free port, bound here and handed to the service: no window for another process.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a free port");
    let addr = listener.local_addr().expect("the bound address");
    let mut argv = vec![
        "allot-balancer".to_string(),
        "serve".into(),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--admin-token".into(),
        admin_token.to_owned(),
        "--console-listen".into(),
        console.map_or("off".to_owned(), |a| a.to_string()),
    ];
    if let Some(url) = database_url {
        argv.extend(["--database-url".to_string(), url.to_string()]);
    }
    let Ok(Cli {
        command: Command::Serve(args),
        ..
    }) = Cli::try_parse_from(argv)
    else {
        panic!("serve arguments");
    };
    let (tx, rx) = oneshot::channel::<()>();
    rt.spawn(async move {
        service::run(listener, args, async move {
            let _ = rx.await;
        })
        .await
        .expect("balancer service");
    });
    let url = format!("http://{addr}");
    // Ready once /healthz answers.
    rt.block_on(async {
        for _ in 0..200 {
            if reqwest::get(format!("{url}/healthz")).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the balancer did not start");
    });
    (url, tx)
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()
        .expect("client")
}

/// Figures of one latency series, in ms.
struct Series {
    p50: f64,
    p99: f64,
    max: f64,
}

fn series(mut us: Vec<u64>) -> Series {
    us.sort_unstable();
    Series {
        p50: percentile(&us, 0.5),
        p99: percentile(&us, 0.99),
        max: percentile(&us, 1.0),
    }
}

/// One `GET /healthz` of the balancer at `url`, answered whole: its latency in µs (the
/// baseline beside instant balances: HTTP and the balancer's threads, no store).
async fn healthz_micros(http: &reqwest::Client, url: &str) -> u64 {
    let started = Instant::now();
    http.get(format!("{url}/healthz"))
        .send()
        .await
        .expect("healthz")
        .bytes()
        .await
        .expect("healthz body");
    started.elapsed().as_micros() as u64
}

/// The instant-balance bench on one backend.
fn instant_bench(server_rt: &Runtime, client_rt: &Runtime, backend: &str) {
    let requests = env_or("ALLOT_BENCH_INSTANT", 2000);
    let Some(books) = server_rt.block_on(Books::open(backend)) else {
        return;
    };
    let store = books.store.clone();
    let tokens = server_rt
        .block_on(store.token_key())
        .map(|k| ServerTokens::new(&k))
        .expect("token key");
    let agent_dir = tempfile::tempdir().expect("temp dir");
    let listener = server_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let agent_url = format!("http://{}", listener.local_addr().expect("addr"));
    let token = server_rt.block_on(async {
        store
            .create_product("bench", &product_def("cad"))
            .await
            .expect("product");
        store
            .add_entitlement(
                "bench",
                "cad",
                &AddEntitlement {
                    units: 1_000_000,
                    expires_at: None,
                    reference: None,
                },
            )
            .await
            .expect("entitlement");
        // No scheduled run may interleave with the measured requests.
        no_scheduled_runs(&*store).await;
        register(&*store, &tokens, "site-a", &agent_url).await
    });
    let stop_agent = start_agent(
        server_rt,
        listener,
        agent_dir.path(),
        "site-a",
        token.clone(),
        &["cad".to_string()],
    );
    let (url, stop_balancer) = start_balancer(
        server_rt,
        books.dir.path(),
        books.pg.as_ref().map(|p| p.url.as_str()),
        &auth::generate_token(),
        None,
    );

    let load_before = load_average();
    let (instant, health) = client_rt.block_on(async {
        let http = http_client();
        let one_instant = |http: reqwest::Client| {
            let url = url.clone();
            let token = token.clone();
            async move {
                let started = Instant::now();
                let answer: InstantBalanceResponse = http
                    .post(format!("{url}/v1/instant-balance"))
                    .bearer_auth(&token)
                    .json(
                        &json!({"request_id": uuid::Uuid::new_v4(), "product": "cad",
                        "units": 1}),
                    )
                    .send()
                    .await
                    .expect("instant balance")
                    .error_for_status()
                    .expect("instant balance status")
                    .json()
                    .await
                    .expect("instant balance answer");
                assert_eq!(answer.granted, 1, "the reserve path grants");
                started.elapsed().as_micros() as u64
            }
        };
        let one_health = |http: reqwest::Client| {
            let url = url.clone();
            async move { healthz_micros(&http, &url).await }
        };
        // Warm-up: connections, caches, the store's statement caches.
        for _ in 0..50 {
            one_instant(http.clone()).await;
            one_health(http.clone()).await;
        }
        let (mut instant, mut health) = (Vec::new(), Vec::new());
        for _ in 0..requests {
            instant.push(one_instant(http.clone()).await);
            health.push(one_health(http.clone()).await);
        }
        (series(instant), series(health))
    });
    let load_after = load_average();
    let allocation = server_rt
        .block_on(store.product("cad"))
        .expect("product")
        .servers
        .first()
        .map_or(0, |c| c.allocation);
    println!(
        "instant/{backend}: {requests} sequential requests (after 50 warm-up), load {load_before} -> {load_after}"
    );
    println!(
        "  instant-balance  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        instant.p50, instant.p99, instant.max
    );
    println!(
        "  healthz baseline p50 {:.3} ms  p99 {:.3} ms  max {:.2} ms",
        health.p50, health.p99, health.max
    );
    println!(
        "  ratio instant/healthz: p50 {:.1}x  p99 {:.1}x; server allocation now {allocation}",
        instant.p50 / health.p50,
        instant.p99 / health.p99
    );
    let _ = stop_balancer.send(());
    let _ = stop_agent.send(());
    std::thread::sleep(Duration::from_millis(200));
    server_rt.block_on(books.close());
}

/// One agent of the fleet.
struct FleetAgent {
    name: String,
    url: String,
    /// Its token, to act as it towards the balancer (instant balances).
    token: String,
    stop: oneshot::Sender<()>,
}

/// Sends `tries` checkouts of `product` to each `(agent url, product)` cell, concurrently over
/// cells; those beyond the allocation are denied (hard stop), which the next status reports.
async fn checkouts(http: &reqwest::Client, cells: Vec<(String, String)>, tries: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for (url, product) in cells {
        let http = http.clone();
        tasks.spawn(async move {
            for i in 0..tries {
                let r = http
                    .post(format!("{url}/v1/checkout"))
                    .json(&json!({"product": product, "user": format!("u{i}"), "host": "h"}))
                    .send()
                    .await
                    .expect("checkout");
                let _ = r.bytes().await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// The scheduled-run bench on one backend.
/// The 200 × 50 estate of sections 2 and 5: books with every product (45 of 50 ample, 3 units
/// per server; the rest scarce, 1 per server, so the planner also water-fills), in-process
/// metering servers with every product defined and no allocation, a buffer on every cell.
struct Estate {
    books: Books,
    tokens: ServerTokens,
    products: Vec<String>,
    fleet: Vec<FleetAgent>,
    _agents_dir: tempfile::TempDir,
}

impl Estate {
    fn build(
        server_rt: &Runtime,
        backend: &str,
        n_servers: usize,
        n_products: usize,
    ) -> Option<Self> {
        let books = server_rt.block_on(Books::open(backend))?;
        let store = books.store.clone();
        let tokens = server_rt
            .block_on(store.token_key())
            .map(|k| ServerTokens::new(&k))
            .expect("token key");
        let products: Vec<String> = (0..n_products).map(|p| format!("p{p:03}")).collect();
        let setup = Instant::now();
        server_rt.block_on(async {
            for (i, p) in products.iter().enumerate() {
                store
                    .create_product("bench", &product_def(p))
                    .await
                    .expect("product");
                let per_server = if i % 10 == 9 { 1 } else { 3 };
                store
                    .add_entitlement(
                        "bench",
                        p,
                        &AddEntitlement {
                            units: (n_servers * per_server) as u32,
                            expires_at: None,
                            reference: None,
                        },
                    )
                    .await
                    .expect("entitlement");
            }
        });
        let agents_dir = tempfile::tempdir().expect("temp dir");
        let mut fleet = Vec::new();
        for s in 0..n_servers {
            let name = format!("s{s:03}");
            let listener = server_rt
                .block_on(TcpListener::bind("127.0.0.1:0"))
                .expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let token = server_rt.block_on(register(&*store, &tokens, &name, &url));
            let dir = agents_dir.path().join(&name);
            std::fs::create_dir_all(&dir).expect("agent dir");
            let stop = start_agent(server_rt, listener, &dir, &name, token.clone(), &products);
            fleet.push(FleetAgent {
                name,
                url,
                token,
                stop,
            });
        }
        // A buffer of 2 on every cell (4 on every tenth server), set through the store as
        // `PUT /v1/servers/{s}/products/{p}` does, a few at a time.
        server_rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (s, agent) in fleet.iter().enumerate() {
                for p in &products {
                    let (store, server, product) = (store.clone(), agent.name.clone(), p.clone());
                    let buffer_units = if s % 10 == 0 { 4 } else { 2 };
                    tasks.spawn(async move {
                        store
                            .set_allocation_limits(
                                "bench",
                                &server,
                                &product,
                                &SetAllocation {
                                    min_units: 0,
                                    buffer_units,
                                },
                            )
                            .await
                            .expect("limits")
                    });
                    while tasks.len() >= 16 {
                        tasks.join_next().await;
                    }
                }
            }
            while tasks.join_next().await.is_some() {}
        });
        println!(
            "  estate/{backend}: {n_servers} servers x {n_products} products = {} cells; set-up {:.1} s",
            n_servers * n_products,
            setup.elapsed().as_secs_f64()
        );
        Some(Self {
            books,
            tokens,
            products,
            fleet,
            _agents_dir: agents_dir,
        })
    }

    /// Whether the books balance, or what is wrong with them.
    fn books_balance(&self, server_rt: &Runtime) -> String {
        let books = server_rt.block_on(self.books.store.books()).expect("books");
        let broken: Vec<String> = books.iter().flat_map(|b| b.errors()).collect();
        if broken.is_empty() {
            "yes".to_string()
        } else {
            broken.join("; ")
        }
    }

    fn stop(self, server_rt: &Runtime) {
        for agent in self.fleet {
            let _ = agent.stop.send(());
        }
        std::thread::sleep(Duration::from_millis(500));
        server_rt.block_on(self.books.close());
    }
}

/// One scheduled `Engine::run`, timed whole: seconds, the run, the load average before it.
fn scheduled_run(
    server_rt: &Runtime,
    engine: &Engine,
) -> (f64, allot_core::wire::balancer::RunDetail, String) {
    let load = load_average();
    let started = Instant::now();
    let run = server_rt
        .block_on(engine.run(RunTrigger::Scheduled, None))
        .expect("run");
    (started.elapsed().as_secs_f64(), run, load)
}

fn run_bench(server_rt: &Runtime, client_rt: &Runtime, backend: &str) {
    let n_servers = env_or("ALLOT_BENCH_SERVERS", 200);
    let n_products = env_or("ALLOT_BENCH_PRODUCTS", 50);
    let hot = env_or("ALLOT_BENCH_HOT_CELLS", 100);
    println!("run/{backend}:");
    let Some(estate) = Estate::build(server_rt, backend, n_servers, n_products) else {
        return;
    };
    let store = estate.books.store.clone();
    let (tokens, products, fleet) = (estate.tokens.clone(), &estate.products, &estate.fleet);
    let engine = Engine::new(store.clone(), tokens, EngineConfig::default());
    let timed_run = |label: &str| {
        let (elapsed, run, load) = scheduled_run(server_rt, &engine);
        println!(
            "  {label:<26} {elapsed:>7.3} s  moves {:>5}  units {:>6}  queried {}  unreachable {}  errors {}  load {load}",
            run.run.moves,
            run.run.units_moved,
            run.run.servers_queried,
            run.run.servers_unreachable,
            run.run.errors.len()
        );
        // The books read every run makes (each cell with its newest usage sample), timed
        // alone: it reads more history as runs accumulate samples.
        let started = Instant::now();
        let cells = server_rt.block_on(store.cells()).expect("cells").len();
        println!(
            "    store.cells() alone: {:.3} s ({cells} cells)",
            started.elapsed().as_secs_f64()
        );
        if let Some(e) = run.run.errors.first() {
            println!("    first error: {e}");
        }
        elapsed
    };
    timed_run("first run (distribution)");
    let mut quiet = Vec::new();
    for _ in 0..3 {
        quiet.push(timed_run("quiet run (no change)"));
    }
    let http = http_client();
    let mut steady = Vec::new();
    for round in 0..3 {
        // `hot` cells, different each round, spread over servers and products: one checkout
        // granted per unit held plus one denied, so each is starving and the planner grants.
        let cells: Vec<(String, String)> = (0..hot)
            .map(|i| {
                let k = round * hot + i;
                let agent = &fleet[(k * 7) % n_servers];
                (agent.url.clone(), products[(k * 13) % n_products].clone())
            })
            .collect();
        client_rt.block_on(checkouts(&http, cells, 4));
        steady.push(timed_run(&format!("steady run ({hot} hot cells)")));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "  median quiet {:.3} s, median steady {:.3} s",
        median(quiet),
        median(steady)
    );
    // Part of a run's fixed cost, timed alone: the per-server and per-product store calls a
    // run makes one after another (a `touch_server` per answering server, a `product` reread
    // per product).
    let (touch, reread) = server_rt.block_on(async {
        let started = Instant::now();
        for agent in fleet {
            store.touch_server(&agent.name).await.expect("touch");
        }
        let touch = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for p in products {
            store.product(p).await.expect("product");
        }
        (touch, started.elapsed().as_secs_f64())
    });
    println!(
        "  alone: {n_servers} x touch_server {touch:.3} s; {n_products} x product() {reread:.3} s"
    );
    println!("  books balance: {}", estate.books_balance(server_rt));
    estate.stop(server_rt);
}

/// Section 5: the first distribution of a new estate (every cell's grant), timed as a whole
/// `Engine::run`, with each server's moves in one request per phase (batched, the default)
/// and, as the same run's baseline, one request per move (`batch_moves: false`, the path a
/// server older than batches gets). Each round builds a fresh estate for each mode, so both
/// distribute the same 9,000 grants from the same books.
fn distribution_bench(server_rt: &Runtime, backend: &str) {
    let n_servers = env_or("ALLOT_BENCH_SERVERS", 200);
    let n_products = env_or("ALLOT_BENCH_PRODUCTS", 50);
    let rounds = env_or("ALLOT_BENCH_DISTRIBUTION_ROUNDS", 3);
    println!("distribution/{backend}: {rounds} rounds");
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (mode, batch_moves) in [(0, false), (1, true)] {
            let Some(estate) = Estate::build(server_rt, backend, n_servers, n_products) else {
                return;
            };
            let config = EngineConfig {
                batch_moves,
                ..EngineConfig::default()
            };
            let engine = Engine::new(estate.books.store.clone(), estate.tokens.clone(), config);
            let (elapsed, run, load) = scheduled_run(server_rt, &engine);
            println!(
                "  round {round} {:<9} {elapsed:>7.3} s  moves {:>5}  units {:>6}  errors {}  books balance: {}  load {load}",
                if batch_moves { "batched" } else { "per move" },
                run.run.moves,
                run.run.units_moved,
                run.run.errors.len(),
                estate.books_balance(server_rt),
            );
            times[mode].push(elapsed);
            estate.stop(server_rt);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (per_move, batched) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "  median per move {per_move:.3} s, median batched {batched:.3} s, ratio {:.1}x",
        per_move / batched
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass other flags. Only run
    // under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("balancing bench: run it with `cargo bench -p allot-balancer --bench balancing`");
        return;
    }
    // `RUST_LOG=allot_balancer=info` shows each run's closing line with its phases' times.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let backends =
        std::env::var("ALLOT_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    println!(
        "balancing bench; {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    let only = std::env::var("ALLOT_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if wanted("instant") {
        for backend in backends.split(',') {
            instant_bench(&server_rt, &client_rt, backend);
        }
    }
    if wanted("run") {
        for backend in backends.split(',') {
            run_bench(&server_rt, &client_rt, backend);
        }
    }
    if wanted("distribution") {
        for backend in backends.split(',') {
            distribution_bench(&server_rt, backend);
        }
    }
    if wanted("reports") {
        for backend in backends.split(',') {
            server_rt.block_on(reports_bench(backend));
        }
    }
    if wanted("console") {
        for backend in backends.split(',') {
            console_bench(&server_rt, &client_rt, backend);
        }
    }
    // Only when asked: 1,000 servers take minutes to set up.
    if only.split(',').any(|o| o == "estate") {
        for backend in backends.split(',') {
            estate_bench(&server_rt, &client_rt, backend);
        }
    }
}

/// The real `allot-balancer` binary, serving `books` on a free loopback port with its own
/// process (so its memory is its own): its URL and the child.
fn spawn_balancer_process(
    books: &Books,
    admin_token: &str,
    log: &std::path::Path,
) -> (String, std::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // Another build of the balancer, for an A/B in one session; by default this tree's.
    let binary = std::env::var("ALLOT_BENCH_BALANCER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_allot-balancer").to_owned());
    let mut command = std::process::Command::new(binary);
    command
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(books.dir.path())
        .args(["--admin-token", admin_token, "--console-listen", "off"])
        .env("RUST_LOG", "allot_balancer=info,warn")
        .stdout(std::fs::File::create(log).expect("balancer log"))
        .stderr(std::process::Stdio::null());
    if let Some(pg) = &books.pg {
        command.args(["--database-url", &pg.url]);
    }
    let child = command.spawn().expect("start allot-balancer");
    (format!("http://127.0.0.1:{port}"), child)
}

/// Sets a schedule that never fires during a bench (once a year), so only the bench's own
/// runs and requests touch the books.
async fn no_scheduled_runs(store: &dyn Store) {
    store
        .set_schedule(
            "bench",
            &ScheduleSetting {
                cron: "0 0 1 1 *".into(),
                timezone: "UTC".into(),
            },
        )
        .await
        .expect("schedule");
}

/// The newest manual run once it has ended (polled every 100 ms), as `{"run": summary}`.
async fn wait_for_manual_run(http: &reqwest::Client, url: &str, admin: &str) -> serde_json::Value {
    loop {
        let runs: serde_json::Value = http
            .get(format!("{url}/v1/runs?trigger=manual&limit=1"))
            .bearer_auth(admin)
            .send()
            .await
            .expect("runs")
            .error_for_status()
            .expect("runs status")
            .json()
            .await
            .expect("runs body");
        let newest = runs["items"].get(0).cloned().unwrap_or_default();
        if newest["status"].as_str().is_some_and(|s| s != "running") {
            return json!({ "run": newest });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What the estate bench's client measures beside each instant balance, at the same moments:
/// the floors under it.
#[derive(Default)]
struct Floors {
    /// `GET /healthz` on the same balancer (HTTP and its threads, no store, no server).
    healthz: Vec<u64>,
    /// One row inserted and committed on PostgreSQL (the store's round trip and WAL flush).
    commit: Vec<u64>,
    /// An 8 KiB append to a file in the estate's temporary directory and its `fdatasync`: a
    /// proxy, from above (the file grows, so each sync also commits its size), for what a
    /// durable commit (a metering server's SQLite, PostgreSQL's WAL when it is on the same
    /// disk, as on the test machine) waits for at that moment.
    disk: Vec<u64>,
}

/// One 8 KiB append to `file` and its `fdatasync`, in microseconds; the file starts again
/// every 1,000 appends so that it stays small.
fn disk_sync_micros(file: &mut std::fs::File, appended: usize) -> u64 {
    use std::io::{Seek, Write};
    if appended.is_multiple_of(1_000) {
        file.set_len(0).expect("the disk floor's file");
        file.rewind().expect("the disk floor's file");
    }
    let started = Instant::now();
    file.write_all(&[0x5a; 8192])
        .expect("the disk floor's append");
    file.sync_data().expect("the disk floor's fdatasync");
    started.elapsed().as_micros() as u64
}

/// Section 6 (`ALLOT_BENCH_ONLY=estate`): a large estate — `ALLOT_BENCH_SERVERS` metering
/// servers (here 1,000) × `ALLOT_BENCH_PRODUCTS` products (100), the servers in this process,
/// the balancer the real binary in its own process. Runs are asked of it over HTTP
/// (`POST /v1/balance`, as the scheduler's runs but timed by the caller) while one client,
/// acting as the metering servers in turn, sends instant balances back to back: their
/// latency during runs is what a server that ran dry waits while a large run is under way.
/// Each is followed by the floors under it, at the same moments ([`Floors`]).
/// The balancer's resident memory (now and peak) is read from `/proc`.
fn estate_bench(server_rt: &Runtime, client_rt: &Runtime, backend: &str) {
    let n_servers = env_or("ALLOT_BENCH_SERVERS", 1000);
    let n_products = env_or("ALLOT_BENCH_PRODUCTS", 100);
    let hot = env_or("ALLOT_BENCH_HOT_CELLS", 100);
    println!("estate/{backend}:");
    let Some(estate) = Estate::build(server_rt, backend, n_servers, n_products) else {
        return;
    };
    let store = estate.books.store.clone();
    server_rt.block_on(async {
        // Runs only when asked, so each is timed whole.
        no_scheduled_runs(&*store).await;
    });
    let admin = auth::generate_token();
    let log = estate.books.dir.path().join("balancer.log");
    let (url, mut child) = spawn_balancer_process(&estate.books, &admin, &log);
    let pid = child.id();
    let http = http_client();
    client_rt.block_on(async {
        for _ in 0..600 {
            let health: Option<serde_json::Value> =
                match http.get(format!("{url}/healthz")).send().await {
                    Ok(answer) => answer.json().await.ok(),
                    Err(_) => None,
                };
            let leads = health.is_some_and(|h| h["leader"] == json!(true));
            if leads {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("allot-balancer did not start; see {}", log.display());
    });
    // What the fleet costs doing nothing: this process hosts only the servers (no run, no
    // request), so the CPU it uses over these seconds is theirs, taken from what the balancer,
    // PostgreSQL and a run would otherwise have.
    let (cpu_before, wall) = (own_cpu_seconds(), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    println!(
        "  the idle fleet used {:.1}% of a core over {:.0} s",
        100.0 * (own_cpu_seconds() - cpu_before) / wall.elapsed().as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    let idle = rss_mib(pid);
    println!(
        "  balancer pid {pid} up; RSS idle {:.1} MiB; its log {}",
        idle.0,
        log.display()
    );
    // The store's floor (PostgreSQL only): one row inserted and committed on a connection of
    // the bench's own, what each of an instant balance's two commits costs at that moment.
    let commit_probe: Option<sqlx::PgPool> = estate.books.pg.as_ref().map(|pg| {
        client_rt.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&pg.url)
                .await
                .expect("the floor's connection");
            sqlx::query("CREATE TABLE bench_floor (at BIGINT NOT NULL)")
                .execute(&pool)
                .await
                .expect("the floor's table");
            pool
        })
    });
    // One timed run over HTTP with instant balances sent back to back while it lasts.
    let timed_run = |label: &str, instants: &mut Vec<u64>, floors: &mut Floors| {
        let load = load_average();
        let (elapsed, moves, sent, this_run, this_floor) = client_rt.block_on(async {
            let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let requester = {
                let (http, url, running) = (http.clone(), url.clone(), running.clone());
                let agents: Vec<(String, String)> = estate
                    .fleet
                    .iter()
                    .map(|a| (a.name.clone(), a.token.clone()))
                    .collect();
                let products = estate.products.clone();
                let commit_probe = commit_probe.clone();
                let disk_floor = estate.books.dir.path().join("disk-floor");
                tokio::spawn(async move {
                    let mut disk_file = std::fs::File::create(&disk_floor).expect("the disk floor");
                    let (mut latencies, mut refused, mut floor) =
                        (Vec::new(), Vec::new(), Floors::default());
                    let mut k = 0usize;
                    while running.load(std::sync::atomic::Ordering::Relaxed) {
                        // The floor: the same client's `GET /healthz` to the same balancer at
                        // the same moments (no store, no metering server), so the machine's
                        // own share of an instant balance's latency is measured beside it.
                        floor.healthz.push(healthz_micros(&http, &url).await);
                        if let Some(pool) = &commit_probe {
                            let started = Instant::now();
                            sqlx::query("INSERT INTO bench_floor (at) VALUES ($1)")
                                .bind(k as i64)
                                .execute(pool)
                                .await
                                .expect("the floor's commit");
                            floor.commit.push(started.elapsed().as_micros() as u64);
                        }
                        // The disk's floor: every durable commit of the instant balance (its
                        // run's on PostgreSQL, the grant's on the metering server) waits for
                        // a sync of the disk. Blocking: this current-thread client (and the
                        // run's request it drives) waits for the sync, at most a few ms.
                        floor
                            .disk
                            .push(disk_sync_micros(&mut disk_file, floor.disk.len()));
                        // An ample product (every tenth is scarce), a server in turn.
                        let index = k % products.len();
                        let product = &products[if index % 10 == 9 { index - 1 } else { index }];
                        let (_, token) = &agents[(k * 7) % agents.len()];
                        k += 1;
                        let started = Instant::now();
                        let answer = http
                            .post(format!("{url}/v1/instant-balance"))
                            .bearer_auth(token)
                            .json(&json!({"request_id": uuid::Uuid::new_v4(),
                                "product": product, "units": 1}))
                            .send()
                            .await
                            .expect("instant balance");
                        let status = answer.status();
                        let body = answer.text().await.unwrap_or_default();
                        let took = started.elapsed().as_micros() as u64;
                        if status.is_success() {
                            latencies.push(took);
                        } else {
                            // Timed all the same (a refusal is an answer), and shown once.
                            if refused.is_empty() {
                                eprintln!("    an instant balance answered {status}: {body}");
                            }
                            refused.push(took);
                        }
                    }
                    (latencies, refused, floor)
                })
            };
            let started = Instant::now();
            let answer = http
                .post(format!("{url}/v1/balance"))
                .bearer_auth(&admin)
                .json(&json!({}))
                .send()
                .await
                .expect("balance");
            let run: serde_json::Value = if answer.status().as_u16() == 503 {
                // Longer than the request timeout: the run goes on; wait for its end.
                wait_for_manual_run(&http, &url, &admin).await
            } else {
                answer
                    .error_for_status()
                    .expect("balance status")
                    .json()
                    .await
                    .expect("run")
            };
            let elapsed = started.elapsed().as_secs_f64();
            running.store(false, std::sync::atomic::Ordering::Relaxed);
            let (latencies, refused, floor) = requester.await.expect("instant requester");
            let sent = latencies.len() + refused.len();
            if !refused.is_empty() {
                println!("    {} of {sent} instant balances refused", refused.len());
            }
            let this_run = series(latencies.iter().chain(&refused).copied().collect());
            let this_floor = (
                series(floor.healthz.clone()),
                series(floor.commit.clone()),
                series(floor.disk.clone()),
            );
            instants.extend(latencies);
            instants.extend(refused);
            floors.healthz.extend(floor.healthz);
            floors.commit.extend(floor.commit);
            floors.disk.extend(floor.disk);
            (
                elapsed,
                // `POST /v1/balance` answers the run's detail (its record flattened);
                // `wait_for_manual_run` the record under `run`.
                run["moves"]
                    .as_u64()
                    .or(run["run"]["moves"].as_u64())
                    .unwrap_or(0),
                sent,
                this_run,
                this_floor,
            )
        });
        println!(
            "  {label:<26} {elapsed:>8.3} s  moves {moves:>6}  instant balances during it {sent:>5} \
             (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; healthz p99 {:.1} ms; a commit p50 {:.1} ms, \
             p99 {:.1} ms; a disk sync p50 {:.1} ms, p99 {:.1} ms)  load {load}",
            this_run.p50,
            this_run.p99,
            this_run.max,
            this_floor.0.p99,
            this_floor.1.p50,
            this_floor.1.p99,
            this_floor.2.p50,
            this_floor.2.p99
        );
        elapsed
    };
    let (mut instants, mut floors) = (Vec::new(), Floors::default());
    let first = timed_run("first run (distribution)", &mut instants, &mut floors);
    let mut quiet = Vec::new();
    // The first distribution and the run after it (which records a decision for every cell
    // the distribution changed) are one-offs; the runs after them are what a schedule runs.
    let (mut scheduled_from, mut floor_from) = (0, 0);
    for i in 0..3 {
        quiet.push(timed_run(
            "quiet run (no change)",
            &mut instants,
            &mut floors,
        ));
        if i == 0 {
            (scheduled_from, floor_from) = (instants.len(), floors.healthz.len());
        }
    }
    let mut steady = Vec::new();
    for round in 0..3 {
        let cells: Vec<(String, String)> = (0..hot)
            .map(|i| {
                let k = round * hot + i;
                let agent = &estate.fleet[(k * 7) % n_servers];
                (
                    agent.url.clone(),
                    estate.products[(k * 13) % n_products].clone(),
                )
            })
            .collect();
        client_rt.block_on(checkouts(&http, cells, 4));
        steady.push(timed_run(
            &format!("steady run ({hot} hot cells)"),
            &mut instants,
            &mut floors,
        ));
    }
    let (rss, peak) = rss_mib(pid);
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let instants_after_first_two = instants.len() - scheduled_from;
    let scheduled = series(instants[scheduled_from..].to_vec());
    let scheduled_floor = series(floors.healthz[floor_from..].to_vec());
    // The commits' vector is empty on SQLite (no probe), else as long as the healthz one.
    let scheduled_commit = series(floors.commit.get(floor_from..).unwrap_or(&[]).to_vec());
    let scheduled_disk = series(floors.disk[floor_from..].to_vec());
    let instant = series(instants);
    println!(
        "  first {first:.2} s; median quiet {:.2} s, median steady {:.2} s",
        median(quiet),
        median(steady)
    );
    println!(
        "  instant balance during runs: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        instant.p50, instant.p99, instant.max
    );
    println!(
        "  instant balance during the later runs (2 quiet, 3 steady): p50 {:.2} ms  p99 {:.2} ms  \
         max {:.2} ms ({} requests)",
        scheduled.p50, scheduled.p99, scheduled.max, instants_after_first_two
    );
    println!(
        "  healthz from the same client in those runs (the floor): p50 {:.2} ms  p99 {:.2} ms  \
         max {:.2} ms; ratio instant/healthz p50 {:.1}x, p99 {:.1}x",
        scheduled_floor.p50,
        scheduled_floor.p99,
        scheduled_floor.max,
        scheduled.p50 / scheduled_floor.p50,
        scheduled.p99 / scheduled_floor.p99
    );
    if !floors.commit.is_empty() {
        println!(
            "  one row committed by the same client in those runs (the store's floor; an instant \
             balance commits twice): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            scheduled_commit.p50, scheduled_commit.p99, scheduled_commit.max
        );
    }
    println!(
        "  an 8 KiB append and its fdatasync in the estate's directory by the same client in those \
         runs (a durable commit's floor; an instant balance waits for two): p50 {:.2} ms  p99 {:.2} ms  \
         max {:.2} ms",
        scheduled_disk.p50, scheduled_disk.p99, scheduled_disk.max
    );
    println!("  {}", instant_phases(&log));
    for phases in run_phases(&log) {
        println!("  run phases: {phases}");
    }
    println!("  balancer RSS now {rss:.1} MiB, peak {peak:.1} MiB");
    // The balancer's log leaves with the estate's directory unless it is asked to be kept.
    if let Ok(keep) = std::env::var("ALLOT_BENCH_KEEP_LOG") {
        match std::fs::copy(&log, &keep) {
            Ok(_) => println!("  the balancer's log kept in {keep}"),
            Err(e) => println!("  the balancer's log not kept in {keep}: {e}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(pool) = commit_probe {
        client_rt.block_on(pool.close());
    }
    println!("  books balance: {}", estate.books_balance(server_rt));
    estate.stop(server_rt);
}

/// Where the instant balances' time went, from the balancer's own closing line of each
/// (`instant balance answered … phases=lock=…ms plan_and_log=…ms …`): each phase's p50 and p99.
fn instant_phases(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut phases: Vec<(String, Vec<u64>)> = Vec::new();
    let mut answers = 0;
    for line in text
        .lines()
        .filter(|l| l.contains("instant balance answered"))
    {
        answers += 1;
        let line = without_colours(line);
        // Past the `phases=` field, each word is `name=<ms>ms`.
        let Some((_, laps)) = line.split_once("phases=") else {
            continue;
        };
        for lap in laps.split_whitespace() {
            let Some((name, ms)) = lap.split_once('=') else {
                break;
            };
            let Some(Ok(ms)) = ms.strip_suffix("ms").map(str::parse::<f64>) else {
                break;
            };
            let us = (ms * 1000.0) as u64;
            match phases.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(us),
                None => phases.push((name.to_owned(), vec![us])),
            }
        }
    }
    let shown: Vec<String> = phases
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_unstable();
            format!(
                "{name} {:.1} / {:.1}",
                percentile(&v, 0.5),
                percentile(&v, 0.99)
            )
        })
        .collect();
    format!(
        "instant balance phases, p50 / p99 ms ({answers} answers in the balancer's log): {}",
        shown.join(", ")
    )
}

/// Each run's phases, in order, from the balancer's closing line of it (`balance run finished
/// … phases=resume=…ms observe=…ms …`), so a slow run shows where its time went.
fn run_phases(log: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("balance run finished"))
        .filter_map(|l| {
            let line = without_colours(l);
            let (_, laps) = line.split_once("phases=")?;
            Some(
                laps.split(" balance run finished")
                    .next()?
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

/// `line` without its ANSI colour sequences (`ESC [ … m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Section 4: the operator console's estate page over 200 servers × 50 products (every cell
/// with a floor, a buffer and a usage sample), fetched as a logged-in browser would: the
/// page's HTML time and its weight with the stylesheet and the script.
fn console_bench(server_rt: &Runtime, client_rt: &Runtime, backend: &str) {
    use allot_balancer::store::{RunOutcome, UsageSample};
    let servers = env_or("ALLOT_BENCH_SERVERS", 200);
    let products = env_or("ALLOT_BENCH_PRODUCTS", 50);
    let Some(books) = server_rt.block_on(Books::open(backend)) else {
        return;
    };
    let loaded = Instant::now();
    server_rt.block_on(async {
        let store = &*books.store;
        let tokens = ServerTokens::new("bench-key");
        for s in 0..servers {
            register(store, &tokens, &format!("s{s:03}"), "http://127.0.0.1:1").await;
        }
        let limits = SetAllocation {
            min_units: 1,
            buffer_units: 1,
        };
        let mut samples = Vec::new();
        for p in 0..products {
            let product = format!("p{p:02}");
            store
                .create_product("bench", &product_def(&product))
                .await
                .expect("product");
            let units = u32::try_from(servers * 3).expect("units");
            store
                .add_entitlement(
                    "bench",
                    &product,
                    &AddEntitlement {
                        units,
                        expires_at: Some(chrono::Utc::now() + chrono::Duration::days(30)),
                        reference: None,
                    },
                )
                .await
                .expect("entitlement");
            for s in 0..servers {
                let server = format!("s{s:03}");
                store
                    .set_allocation_limits("bench", &server, &product, &limits)
                    .await
                    .expect("limits");
                samples.push(UsageSample {
                    server,
                    product: product.clone(),
                    in_use: u64::try_from((s + p) % 3).unwrap_or(0),
                    peak_in_use: 2,
                    ..UsageSample::default()
                });
            }
        }
        let epoch = store.take_shard(0, "http://bench").await.expect("lead");
        let run = store
            .begin_run(
                RunTrigger::Manual,
                &allot_core::shard::Fence::new(1, [(0, epoch)].into()),
            )
            .await
            .expect("run");
        store
            .record_samples(run, chrono::Utc::now().timestamp_millis(), &samples)
            .await
            .expect("samples");
        let outcome = RunOutcome {
            status: "ok".into(),
            ..RunOutcome::default()
        };
        store.finish_run(run, &outcome).await.expect("finish");
    });
    println!(
        "console ({backend}): {servers} servers × {products} products loaded in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );
    let console_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let token = auth::generate_token();
    let (_, stop_balancer) = start_balancer(
        server_rt,
        books.dir.path(),
        books.pg.as_ref().map(|p| p.url.as_str()),
        &token,
        Some(console_addr),
    );
    let console = format!("http://{console_addr}");
    let rounds = env_or("ALLOT_BENCH_CONSOLE", 50);
    let (times, html, css, js) = client_rt.block_on(async {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        for _ in 0..200 {
            if http.get(format!("{console}/login")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let login = http
            .post(format!("{console}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("name=admin&password={token}"))
            .send()
            .await
            .expect("login");
        let cookie = login.headers()["set-cookie"]
            .to_str()
            .expect("a cookie")
            .split(';')
            .next()
            .expect("name=value")
            .to_owned();
        let page = |path: &'static str| {
            let http = http.clone();
            let cookie = cookie.clone();
            let console = console.clone();
            async move {
                let r = http
                    .get(format!("{console}{path}"))
                    .header("cookie", cookie)
                    .send()
                    .await
                    .expect("page");
                assert!(r.status().is_success(), "{path}: {}", r.status());
                r.bytes().await.expect("body").len()
            }
        };
        let mut times = Vec::with_capacity(rounds);
        let mut html = 0;
        for round in 0..rounds + 3 {
            let started = Instant::now();
            html = page("/").await;
            if round >= 3 {
                times.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
        }
        let css = page("/static/console.css").await;
        let js = page("/static/console.js").await;
        (times, html, css, js)
    });
    let s = series(times);
    println!(
        "console ({backend}): estate page HTML p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {rounds} \
         requests; weight {:.1} KB (HTML {:.1} KB + CSS {:.1} KB + JS {:.1} KB); load {}",
        s.p50,
        s.p99,
        s.max,
        (html + css + js) as f64 / 1024.0,
        html as f64 / 1024.0,
        css as f64 / 1024.0,
        js as f64 / 1024.0,
        load_average()
    );
    let paints = env_or("ALLOT_BENCH_PAINTS", 20);
    match client_rt.block_on(paint_times(&console, &token, paints)) {
        Ok((timings, painted_by)) => {
            let column = |i: usize| series(timings.iter().map(|t| t[i]).collect());
            let (response, fcp, load) = (column(0), column(1), column(2));
            println!(
                "console ({backend}): estate page in headless Chromium over {paints} loads: \
                 response end p50 {:.1} ms; painted ({painted_by}) p50 {:.1} ms, p99 {:.1} ms; \
                 load event end p50 {:.1} ms, p99 {:.1} ms",
                response.p50, fcp.p50, fcp.p99, load.p50, load.p99,
            );
        }
        Err(why) => println!("console ({backend}): paint not measured: {why}"),
    }
    let _ = stop_balancer.send(());
    server_rt.block_on(books.close());
}

/// The estate page loaded `loads` times in a real headless Chromium (Debian's `chromium` and
/// `chromium-driver`, over WebDriver), logged in as `admin`: per load, from the navigation's
/// start, the response's end, the first contentful paint and the load event's end, in µs
/// (the browser's own Navigation and Paint Timing).
async fn paint_times(
    console: &str,
    token: &str,
    loads: usize,
) -> Result<(Vec<[u64; 3]>, String), String> {
    let exists = |p: &&&str| std::path::Path::new(p).exists();
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .find(exists)
        .ok_or("no chromedriver (apt-get install chromium chromium-driver)")?;
    let chromium = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
        .iter()
        .find(exists)
        .ok_or("no chromium")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut child = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("start chromedriver: {e}"))?;
    let result = async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": ["--headless=new", "--no-sandbox",
                "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]}),
        );
        let mut client = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let client = client.ok_or("no WebDriver session")?;
        let fail = |e: fantoccini::error::CmdError| e.to_string();
        client
            .goto(&format!("{console}/login"))
            .await
            .map_err(fail)?;
        let form = client
            .form(fantoccini::Locator::Css("form"))
            .await
            .map_err(fail)?;
        form.set_by_name("name", "admin").await.map_err(fail)?;
        form.set_by_name("password", token).await.map_err(fail)?;
        form.submit().await.map_err(fail)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut timings = Vec::with_capacity(loads);
        let mut painted_by = String::new();
        for round in 0..loads + 2 {
            client.goto(&format!("{console}/")).await.map_err(fail)?;
            // Two animation frames after the load: the page has been painted by then. The
            // browser's first contentful paint is taken when it reports one (headless Chromium
            // may not); otherwise that painted frame's time stands for it.
            let measured = client
                .execute_async(
                    "const done = arguments[arguments.length - 1];\n\
                     const nav = performance.getEntriesByType('navigation')[0];\n\
                     requestAnimationFrame(() => requestAnimationFrame(() => {\n\
                       const fcp = performance.getEntriesByName('first-contentful-paint')[0];\n\
                       done([nav.responseEnd, fcp ? fcp.startTime : performance.now(), \
                             nav.loadEventEnd, location.pathname, fcp ? 'fcp' : 'frame']);\n\
                     }));",
                    vec![],
                )
                .await
                .map_err(fail)?;
            painted_by = measured[4].as_str().unwrap_or("?").to_owned();
            if measured[3] != "/" {
                return Err(format!("landed on {} instead of the estate", measured[3]));
            }
            let us = |i: usize| (measured[i].as_f64().unwrap_or(-1.0) * 1000.0).max(0.0) as u64;
            if round >= 2 {
                timings.push([us(0), us(1), us(2)]);
            }
        }
        let _ = client.close().await;
        Ok((timings, painted_by))
    }
    .await;
    // The whole process group: Chromium's processes go with chromedriver.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Section 3: the 30-day per-user usage report over a year of records.
async fn reports_bench(backend: &str) {
    use allot_balancer::store::RecordsQuery;
    use allot_core::wire::records::{EndedBy, GroupBy, RecordBatch, UsageRecord};
    let Some(books) = Books::open(backend).await else {
        return;
    };
    let store = &books.store;
    let records = env_or("ALLOT_BENCH_RECORDS", 1_000_000);
    store
        .create_product("bench", &product_def("cad"))
        .await
        .expect("product");
    register(
        &**store,
        &ServerTokens::new("bench-key"),
        "paris",
        "http://127.0.0.1:1",
    )
    .await;
    let day: i64 = 86_400_000;
    let end = chrono::Utc::now().timestamp_millis();
    let start = end - 365 * day;
    let span = u64::try_from(end - start).unwrap();
    let loaded = Instant::now();
    let mut next = 0u64;
    while (next as usize) < records {
        let n = (records - next as usize).min(1_000) as u64;
        let usage = (next..next + n)
            .map(|i| {
                // Spread evenly over the year, a few hours each, deterministic.
                let offset = u128::from(i) * u128::from(span) / records as u128;
                let at = start + i64::try_from(offset).unwrap();
                let user = i * 31 % 10_000;
                UsageRecord {
                    id: uuid::Uuid::from_u128(u128::from(i) + 1),
                    product: "cad".into(),
                    user: format!("user{user}"),
                    host: format!("host{}", user % 2_000),
                    groups: vec![format!("group{}", user % 100)],
                    units: 1,
                    started_at: chrono::DateTime::from_timestamp_millis(at).unwrap(),
                    ended_at: chrono::DateTime::from_timestamp_millis(
                        at + i64::try_from(i % 8 + 1).unwrap() * 3_600_000,
                    )
                    .unwrap(),
                    ended_by: EndedBy::Checkin,
                }
            })
            .collect();
        let batch = RecordBatch {
            usage,
            denials: Vec::new(),
        };
        store.store_records("paris", &batch).await.expect("store");
        next += n;
    }
    let load_s = loaded.elapsed().as_secs_f64();
    let query = RecordsQuery {
        since_ms: end - 30 * day,
        until_ms: end,
        product: None,
        group_by: GroupBy::User,
    };
    let mut report_ms = Vec::new();
    let mut baseline_ms = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let t = Instant::now();
        rows = store.usage_totals(&query).await.expect("report").len();
        report_ms.push(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        store
            .usage_intervals("cad", query.since_ms, query.until_ms)
            .await
            .expect("baseline");
        baseline_ms.push(t.elapsed().as_micros() as u64);
    }
    report_ms.sort_unstable();
    baseline_ms.sort_unstable();
    let (report, baseline) = (report_ms[2] as f64 / 1000.0, baseline_ms[2] as f64 / 1000.0);
    println!(
        "reports [{backend}] {records} records loaded in {load_s:.1} s; 30-day per-user report: \
         median {report:.1} ms ({rows} users); baseline (read the window's intervals): median \
         {baseline:.1} ms; ratio {:.2}",
        report / baseline.max(0.001)
    );
    books.close().await;
}
