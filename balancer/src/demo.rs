//! `allot-balancer demo`: a whole allot on one laptop, in one command.
//!
//! Starts, on the embedded default (SQLite in a temporary directory, no other service), a
//! balancer and three metering servers (`allot-agent` processes) on loopback, defines two
//! products, and runs simulated clients whose demand follows the office hours of Paris, New York
//! and Tokyo over a compressed day (one hour every five seconds). The terminal shows, refreshed
//! every second, per product and site: allocation, in use, denials and instant balances, the
//! reserve, and the moves of the latest runs. Ctrl-C stops everything cleanly.

use crate::cli::{AdminClient, ClientArgs, DemoArgs};
use crate::config::{ServeArgs, StoreArgs};
use crate::metrics::Metrics;
use allot_core::wire::agent::AgentStatus;
use allot_core::wire::balancer::{List, ProductDetail, RegisteredServer, RunDetail, RunSummary};
use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seconds of real time per simulated hour.
const SECONDS_PER_HOUR: f64 = 5.0;

/// A simulated site: a metering server and the office hours of its users.
struct Site {
    name: &'static str,
    utc_offset_hours: f64,
    url: String,
    token: String,
    child: Option<tokio::process::Child>,
    /// Live checkouts per product.
    held: BTreeMap<&'static str, Vec<String>>,
    denials: BTreeMap<&'static str, u64>,
}

/// A simulated product: its purchase and the peak demand of one site.
struct DemoProduct {
    name: &'static str,
    purchased: u32,
    peak_per_site: f64,
}

const PRODUCTS: [DemoProduct; 2] = [
    DemoProduct {
        name: "CAD Suite",
        purchased: 24,
        peak_per_site: 12.0,
    },
    DemoProduct {
        name: "Simulator",
        purchased: 8,
        peak_per_site: 4.0,
    },
];

fn free_addr(preferred: u16) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))
        .context("find a free loopback port")?;
    Ok(listener.local_addr()?)
}

/// Share of a site's peak demand at a local hour: nights quiet, office hours busy.
fn office_load(local_hour: f64) -> f64 {
    let h = local_hour.rem_euclid(24.0);
    let ramp = |x: f64| x.clamp(0.0, 1.0);
    let day = ramp(h - 7.5) * ramp(18.5 - h);
    0.08 + 0.92 * day
}

fn agent_binary(args: &DemoArgs) -> anyhow::Result<PathBuf> {
    let path = match &args.agent_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("allot-agent"))
            .context("locate allot-agent next to allot-balancer")?,
    };
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p allot-agent` or pass \
             --agent-binary",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the demo until Ctrl-C or `--duration-seconds`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let agent = agent_binary(&args)?;
    let dir = tempfile::Builder::new().prefix("allot-demo-").tempdir()?;
    let balancer_addr = free_addr(7400)?;
    let balancer_url = format!("http://{balancer_addr}");
    let admin_token = args
        .admin_token
        .clone()
        .unwrap_or_else(crate::auth::generate_token);
    let serve_args = ServeArgs {
        listen: balancer_addr,
        // The demo's API port is the only one it takes; run `serve` for the console.
        console_listen: crate::config::ConsoleListen(None),
        store: StoreArgs {
            data_dir: dir.path().join("balancer"),
            database_url: None,
        },
        admin_token: Some(admin_token.clone()),
        advertise_url: None,
        lead_shards: Vec::new(),
        shard_grace_seconds: 30,
        lease_seconds: 24 * 3600,
        lease_margin_seconds: 300,
        call_timeout_ms: 2000,
        concurrency: 32,
        history_raw_days: 30,
        history_hourly_days: 400,
        records_days: 400,
        // A simulated hour lasts five seconds: hold freshly granted units about that long.
        hold_seconds: 5,
        metrics_max_cells: crate::config::DEFAULT_METRICS_MAX_CELLS,
        token_grace_seconds: 24 * 3600,
        tls: Default::default(),
        ca: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(balancer_addr)
        .await
        .with_context(|| format!("listen on {balancer_addr}"))?;
    let metrics = Arc::new(Metrics::new());
    let (stop_balancer, stopped) = tokio::sync::oneshot::channel::<()>();
    let balancer = tokio::spawn(crate::service::run_with_metrics(
        listener,
        serve_args,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    wait_healthy(&http, &balancer_url).await?;
    let admin = AdminClient::new(&ClientArgs {
        url: balancer_url.clone(),
        admin_token: Some(admin_token.clone()),
        operator: None,
        data_dir: dir.path().to_path_buf(),
        json: false,
        ca: Default::default(),
    })?;

    let demo_balancer = DemoBalancer {
        url: balancer_url,
        admin,
        admin_token,
        metrics,
    };
    let outcome = drive(&args, &agent, dir.path(), &demo_balancer, &http).await;
    let _ = stop_balancer.send(());
    let _ = balancer.await;
    outcome
}

async fn wait_healthy(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not become healthy");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The in-process balancer the demo drives, and how to reach it.
struct DemoBalancer {
    /// Its base URL.
    url: String,
    /// An admin client of its API.
    admin: AdminClient,
    /// Its admin token, for the agents' registration.
    admin_token: String,
    /// Its own metrics: the demo shows its accounting as `/metrics` exports it.
    metrics: Arc<Metrics>,
}

async fn drive(
    args: &DemoArgs,
    agent: &Path,
    dir: &Path,
    balancer: &DemoBalancer,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let (balancer_url, admin, admin_token) = (
        balancer.url.as_str(),
        &balancer.admin,
        balancer.admin_token.as_str(),
    );
    let _: serde_json::Value = admin
        .call(
            Method::PUT,
            "/v1/schedule",
            Some(&json!({"cron": "*/10 * * * * *"})),
        )
        .await?;
    for p in &PRODUCTS {
        let _: serde_json::Value = admin
            .call(
                Method::POST,
                "/v1/products",
                Some(&json!({"name": p.name, "heartbeat_seconds": 5, "staleout_seconds": 30})),
            )
            .await?;
        let _: serde_json::Value = admin
            .call(
                Method::POST,
                &format!("/v1/products/{}/entitlements", p.name.replace(' ', "%20")),
                Some(&json!({"units": p.purchased, "reference": "demo"})),
            )
            .await?;
    }
    let mut sites = Vec::new();
    for (name, offset, port) in [
        ("paris", 1.0, 7401),
        ("new-york", -5.0, 7402),
        ("tokyo", 9.0, 7403),
    ] {
        let addr = free_addr(port)?;
        let url = format!("http://{addr}");
        let registered: RegisteredServer = admin
            .call(
                Method::POST,
                "/v1/servers",
                Some(&json!({"name": name, "url": url, "site": name})),
            )
            .await?;
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = tokio::process::Command::new(agent)
            .args(["serve", "--listen", &addr.to_string(), "--name", name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--balancer", balancer_url, "--sync-seconds", "2"])
            .env("ALLOT_TOKEN", &registered.token)
            .env("ALLOT_LOG_FORMAT", "json")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", agent.display()))?;
        wait_healthy(http, &url).await?;
        for p in &PRODUCTS {
            let _: serde_json::Value = admin
                .call(
                    Method::PUT,
                    &format!("/v1/servers/{name}/products/{}", p.name.replace(' ', "%20")),
                    Some(&json!({"min_units": 0, "buffer_units": 1})),
                )
                .await?;
        }
        sites.push(Site {
            name,
            utc_offset_hours: offset,
            url,
            token: registered.token,
            child: Some(child),
            held: BTreeMap::new(),
            denials: BTreeMap::new(),
        });
    }

    let started = Instant::now();
    let limit = args.duration_seconds.map(Duration::from_secs);
    let mut last_frame = Instant::now() - Duration::from_secs(1);
    let mut last_heartbeat = Instant::now();
    let ctrl_c = crate::service::shutdown_signal();
    tokio::pin!(ctrl_c);
    loop {
        let hour = (started.elapsed().as_secs_f64() / SECONDS_PER_HOUR + 6.0) % 24.0;
        for site in &mut sites {
            step_clients(site, hour, http).await;
        }
        if last_heartbeat.elapsed() > Duration::from_secs(4) {
            for site in &sites {
                heartbeat_all(site, http).await;
            }
            last_heartbeat = Instant::now();
        }
        if last_frame.elapsed() >= Duration::from_secs(1) {
            let frame = render(
                &sites,
                hour,
                balancer_url,
                admin,
                admin_token,
                &balancer.metrics,
                http,
            )
            .await;
            if !args.no_clear {
                print!("\x1b[2J\x1b[H");
            }
            println!("{frame}");
            last_frame = Instant::now();
        }
        if limit.is_some_and(|l| started.elapsed() >= l) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = &mut ctrl_c => break,
        }
    }
    println!("stopping: checking in, stopping the metering servers and the balancer…");
    for site in &mut sites {
        for handles in site.held.values() {
            for h in handles {
                let _ = http
                    .post(format!("{}/v1/checkin", site.url))
                    .json(&json!({"handle": h}))
                    .send()
                    .await;
            }
        }
        if let Some(mut child) = site.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
    Ok(())
}

/// Moves a site's live checkouts one step toward its demand at this simulated hour.
async fn step_clients(site: &mut Site, utc_hour: f64, http: &reqwest::Client) {
    let local = utc_hour + site.utc_offset_hours;
    for p in &PRODUCTS {
        let target = (p.peak_per_site * office_load(local)).round() as usize;
        let held = site.held.entry(p.name).or_default();
        if held.len() < target {
            let user = format!("{}-user{}", site.name, held.len());
            let answer = http
                .post(format!("{}/v1/checkout", site.url))
                .json(&json!({"product": p.name, "user": user, "host": format!("{}-pc", user)}))
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    if let Ok(body) = r.json::<serde_json::Value>().await
                        && let Some(handle) = body["handle"].as_str()
                    {
                        held.push(handle.to_owned());
                    }
                }
                Ok(r) if r.status().as_u16() == 409 => {
                    *site.denials.entry(p.name).or_default() += 1;
                }
                _ => {}
            }
        } else if held.len() > target
            && let Some(handle) = held.pop()
        {
            let _ = http
                .post(format!("{}/v1/checkin", site.url))
                .json(&json!({"handle": handle}))
                .send()
                .await;
        }
    }
}

async fn heartbeat_all(site: &Site, http: &reqwest::Client) {
    for handles in site.held.values() {
        for h in handles {
            let _ = http
                .post(format!("{}/v1/heartbeat", site.url))
                .json(&json!({"handle": h}))
                .send()
                .await;
        }
    }
}

async fn render(
    sites: &[Site],
    utc_hour: f64,
    balancer_url: &str,
    admin: &AdminClient,
    admin_token: &str,
    metrics: &Metrics,
    http: &reqwest::Client,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let clock = |h: f64| {
        format!(
            "{:02}:{:02}",
            h.rem_euclid(24.0) as u32,
            ((h.rem_euclid(1.0)) * 60.0) as u32
        )
    };
    let _ = writeln!(
        out,
        "allot demo — simulated {} UTC (one hour every {SECONDS_PER_HOUR} s; Ctrl-C stops)",
        clock(utc_hour)
    );
    let _ = writeln!(
        out,
        "balancer  {balancer_url}  (API /v1/…, {balancer_url}/metrics, {balancer_url}/healthz)"
    );
    for site in sites {
        let _ = writeln!(
            out,
            "server    {:<9} {}  ({}/metrics)",
            site.name, site.url, site.url
        );
    }
    let _ = writeln!(
        out,
        "admin CLI from another terminal: ALLOT_URL={balancer_url} ALLOT_ADMIN_TOKEN={admin_token} \
         allot-balancer history --since 1h --step 1m   (or runs list, advise, doctor)"
    );
    let mut statuses = BTreeMap::new();
    for site in sites {
        if let Ok(r) = http
            .get(format!("{}/v1/status?peek=true", site.url))
            .bearer_auth(&site.token)
            .send()
            .await
            && let Ok(status) = r.json::<AgentStatus>().await
        {
            statuses.insert(site.name, status);
        }
    }
    for p in &PRODUCTS {
        let path = format!("/v1/products/{}", p.name.replace(' ', "%20"));
        let Ok(detail) = admin
            .call::<(), ProductDetail>(Method::GET, &path, None)
            .await
        else {
            continue;
        };
        let b = &detail.product;
        // The balancer runs in this process: its own accounting, as /metrics exports it.
        let m = metrics;
        let unserved = |kind: &str| m.unserved_units.with_label_values(&[p.name, kind]).get();
        let _ = writeln!(
            out,
            "\n{}: purchased {}  reserve {}  in transit {}  allocated {}  |  unserved waiting: \
             false {} true {}  ping-pong units {}",
            p.name,
            b.purchased,
            b.reserve,
            b.in_transit,
            b.allocated,
            unserved("false"),
            unserved("true"),
            m.ping_pong_units.with_label_values(&[p.name]).get(),
        );
        let _ = writeln!(
            out,
            "  {:<9} {:>6} {:>11} {:>7} {:>8} {:>8}  demand",
            "site", "local", "allocation", "in use", "denials", "instant"
        );
        for site in sites {
            let seen = statuses
                .get(site.name)
                .and_then(|s| s.products.iter().find(|x| x.product == p.name));
            let load = office_load(utc_hour + site.utc_offset_hours);
            let bar = "█".repeat((load * 10.0).round() as usize);
            let _ = writeln!(
                out,
                "  {:<9} {:>6} {:>11} {:>7} {:>8} {:>8}  {bar}",
                site.name,
                clock(utc_hour + site.utc_offset_hours),
                seen.map_or("-".into(), |s| s.allocation.to_string()),
                seen.map_or("-".into(), |s| s.in_use.to_string()),
                site.denials.get(p.name).copied().unwrap_or(0),
                seen.map_or("-".into(), |s| s.totals.instant_requests.to_string()),
            );
        }
    }
    let _ = writeln!(out, "\nlatest scheduled and manual runs:");
    if let Ok(runs) = admin
        .call::<(), List<RunSummary>>(Method::GET, "/v1/runs?limit=30", None)
        .await
    {
        let recent: Vec<_> = runs
            .items
            .iter()
            .filter(|r| r.trigger != allot_core::domain::RunTrigger::Instant)
            .take(3)
            .collect();
        for run in recent {
            let mut line = format!(
                "  run {:>4} {:<9} {} servers {} moves {} units {}",
                run.id,
                run.trigger.to_string(),
                run.started_at.format("%H:%M:%S"),
                run.servers_queried,
                run.moves,
                run.units_moved
            );
            if let Ok(detail) = admin
                .call::<(), RunDetail>(Method::GET, &format!("/v1/runs/{}", run.id), None)
                .await
            {
                for m in detail.move_log.iter().take(6) {
                    let _ = write!(
                        line,
                        " | {} {} {} {}",
                        m.kind,
                        m.applied_units.unwrap_or(0),
                        m.product,
                        m.server
                    );
                }
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}
