//! 7. An honest ceiling (issue 18): an external HTTP load generator, `oha`, drives the real
//!    `allot-agent` binary and a bare axum handler in its own process (this bench binary run
//!    again with `ALLOT_BENCH_BARE_LISTEN`) that parses the same checkout and checkin JSON into
//!    the same wire types and answers JSON of the same shape, keeping no state.
//!
//! `oha` sends one method and one body (or a line of a file, picked at random) to one URL, so a
//! checkout+checkin pair cannot be chained in it. Checkouts and checkins are therefore measured
//! as separate closed-loop runs in the same round, alternating bare and agent:
//! - checkouts: one body, a product whose allocation (10,000,000) never runs out;
//! - checkins: `-Z`, a file with one `{"handle": …}` line per live checkout of the agent (read
//!   from its SQLite file just before the run). `oha` picks lines at random, so some handles are
//!   sent twice; the agent answers those `404 bad_handle` without a write. Only the agent's
//!   `200` answers are counted, which understates it (a quick 404 frees its connection early, so
//!   fewer checkins share each group commit), and the share of repeats is reported. The checkouts
//!   of the warm-up and of the checkout runs keep the pool large (`ALLOT_BENCH_POOL`).
//!
//! A pair costs the server one checkout and one checkin, so the pairs' requests/s is the harmonic
//! mean of the two rates, `2 / (1/checkouts + 1/checkins)`, for the agent and the bare handler
//! alike; the ratio of the two is the honest ceiling. The open loop then runs two `oha` at once
//! (`-q` at half of 50 %, then of 80 %, of the agent's pair rate each, `--latency-correction`, so
//! latency counts from the intended send time): checkouts and checkins of pool handles in a 1:1
//! mix, and each round drives the bare handler at the same rate (the floor HTTP and `oha` set
//! at that load). Every run also reports the cores the server and the whole machine used
//! meanwhile (from `/proc`), which says whether the cores or something serial in the server
//! bound it.
//!
//! `ALLOT_BENCH_AGENT_BIN=<path>` runs that `allot-agent` binary instead of this build's (for an
//! A/B against a baseline build, run alternately); `ALLOT_BENCH_OPEN_RATE=<requests/s>` runs the
//! open loop at that one rate, so that two builds compare at the same load.
//!
//! `ALLOT_BENCH_PERF=<file>` adds one mixed closed-loop run with `perf record` attached to the
//! agent process (`perf report -i <file> --no-children` reads it) and, when inferno's tools are
//! on PATH, draws its flame graph in `<file>.svg`.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The pinned `oha` release the bench installs (`cargo install --locked`) when none is on PATH.
const OHA_VERSION: &str = "1.16.0";

/// The open loop's arrival rates, as shares of the agent's closed-loop pair rate.
const OPEN_LOOP_LOADS: [f64; 2] = [0.5, 0.8];

/// The checkout body every checkout run sends, to the agent and the bare handler alike.
const CHECKOUT_BODY: &str = r#"{"product":"cad","user":"bench-user","host":"bench-host"}"#;

/// The bare handler: the same JSON in and out as the agent's checkout and checkin, no state.
/// Runs in its own process, on a runtime like the agent's (`#[tokio::main]`: one worker per core).
pub fn serve_bare(listen: &str) {
    use allot_core::wire::agent::{
        CheckoutRequest, CheckoutResponse, HandleRequest, HandleResponse,
    };
    use axum::Json;
    use axum::routing::{get, post};
    async fn checkout(Json(req): Json<CheckoutRequest>) -> Json<CheckoutResponse> {
        Json(CheckoutResponse {
            handle: format!("{:032x}", uuid::Uuid::new_v4().as_u128()),
            units: req.units,
            heartbeat_seconds: 600,
            overdraft: false,
        })
    }
    async fn checkin(Json(req): Json<HandleRequest>) -> Json<HandleResponse> {
        Json(HandleResponse {
            handle: req.handle,
            staleout_in_seconds: 0,
            notice: None,
            idle_revoke_in_seconds: None,
        })
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/checkout", post(checkout))
            .route("/v1/checkin", post(checkin));
        axum::serve(listener, app).await.unwrap();
    });
}

/// `oha` on PATH (or `ALLOT_BENCH_OHA`), else the pinned release installed with cargo.
fn oha() -> PathBuf {
    if let Ok(p) = std::env::var("ALLOT_BENCH_OHA") {
        return p.into();
    }
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(Path::new("oha")) {
        return "oha".into();
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let installed = home.join("bin").join("oha");
    if works(&installed) {
        return installed;
    }
    eprintln!("oha not found: cargo install oha --locked --version {OHA_VERSION}");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "oha", "--locked", "--version", OHA_VERSION])
        .status()
        .unwrap();
    assert!(status.success(), "cargo install oha failed");
    installed
}

/// Draws `<file>.svg` from a perf recording with inferno (`cargo install inferno --locked`),
/// when its tools are on PATH: the flame graph of where the agent's time went. Generic
/// parameters are shortened to `<…>` so the frames stay readable (and the file small).
fn flame_graph(file: &str) {
    let folded = Command::new("sh")
        .args([
            "-c",
            &format!("perf script -i '{file}' 2>/dev/null | inferno-collapse-perf"),
        ])
        .output();
    let folded = match folded {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => out.stdout,
        _ => {
            eprintln!("no flame graph: inferno not on PATH (cargo install inferno --locked)");
            return;
        }
    };
    let short: String = String::from_utf8_lossy(&folded)
        .lines()
        .map(|line| shorten_generics(line) + "\n")
        .collect();
    let svg = format!("{file}.svg");
    let mut draw = Command::new("inferno-flamegraph")
        .args(["--minwidth", "0.3", "--title"])
        .arg("allot-agent: checkouts and checkins, closed loop")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&svg).unwrap())
        .spawn()
        .unwrap();
    use std::io::Write;
    draw.stdin
        .take()
        .unwrap()
        .write_all(short.as_bytes())
        .unwrap();
    assert!(draw.wait().unwrap().success(), "inferno-flamegraph failed");
    eprintln!("flame graph in {svg}");
}

/// Keeps one level of generic parameters and drops the deeper ones
/// (`Dispatcher<D,Bs,I,T>` stays, `poll<axum::serve::X<Y<Z>>>` becomes
/// `poll<axum::serve::X<…>>`), so Rust's long monomorphised names fit in a frame.
fn shorten_generics(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut depth = 0usize;
    let mut previous = ' ';
    for c in line.chars() {
        match c {
            '<' => {
                depth += 1;
                match depth {
                    1 => out.push('<'),
                    2 => out.push_str("<…"),
                    _ => {}
                }
            }
            // `->` in a function type is not a closing bracket.
            '>' if depth > 0 && previous != '-' => {
                if depth <= 2 {
                    out.push('>');
                }
                depth -= 1;
            }
            // A frame boundary closes whatever a frame left open.
            ';' => {
                for _ in 0..depth.min(2) {
                    out.push('>');
                }
                depth = 0;
                out.push(';');
            }
            _ if depth <= 1 => out.push(c),
            _ => {}
        }
        previous = c;
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process (the agent or the bare handler), stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn wait_ready(self) -> Self {
        let addr = self.url.trim_start_matches("http://").to_owned();
        for _ in 0..500 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return self;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} did not start", self.url);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn start_agent(dir: &Path) -> Server {
    let products = dir.join("products.json");
    std::fs::write(
        &products,
        json!({"products": [{"product": "cad", "allocation": 10_000_000,
            "policy": {"enforcement": "hard_stop", "heartbeat_seconds": 600, "staleout_seconds": 3600}}]})
        .to_string(),
    )
    .unwrap();
    let port = free_port();
    // `ALLOT_BENCH_AGENT_BIN` runs another build of the agent (an A/B against a baseline).
    let agent = std::env::var_os("ALLOT_BENCH_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_allot-agent")),
        PathBuf::from,
    );
    let child = Command::new(agent)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("agent-data"))
        .arg("--products-file")
        .arg(&products)
        .args(["--max-checkouts", "5000000"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
    .wait_ready()
}

fn start_bare() -> Server {
    let port = free_port();
    let child = Command::new(std::env::current_exe().unwrap())
        .env("ALLOT_BENCH_BARE_LISTEN", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
    .wait_ready()
}

/// What one `oha` run reports, from its `--output-format json`.
#[derive(Clone, Copy, Default)]
struct Run {
    /// Answers `200` per second of the run.
    ok_per_s: f64,
    /// Requests answered (any status) per second.
    all_per_s: f64,
    /// Share of answers that were not `200`.
    not_ok: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

/// How one `oha` run sends: its body, and the open-loop rate if any.
enum Body<'a> {
    Fixed(&'a str),
    Lines(&'a Path),
}

fn oha_command(
    oha: &Path,
    url: &str,
    body: &Body,
    conns: usize,
    secs: f64,
    rate: Option<f64>,
) -> Command {
    let mut c = Command::new(oha);
    c.args([
        "--no-tui",
        "--output-format",
        "json",
        "--stats-success-breakdown",
    ])
    .args(["-m", "POST"])
    .args(["-T", "application/json"])
    .args(["-c", &conns.to_string()])
    .args(["-z", &format!("{}ms", (secs * 1000.0) as u64)]);
    match body {
        Body::Fixed(b) => c.args(["-d", b]),
        Body::Lines(p) => c.arg("-Z").arg(p),
    };
    if let Some(q) = rate {
        c.args(["-q", &format!("{q:.0}"), "--latency-correction"]);
    }
    c.arg(url).stdout(Stdio::piped()).stderr(Stdio::inherit());
    c
}

fn parse_run(out: std::process::Output) -> Run {
    assert!(out.status.success(), "oha failed: {}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total_s = v["summary"]["total"].as_f64().unwrap();
    let codes = v["statusCodeDistribution"].as_object().unwrap();
    let count = |c: &serde_json::Value| c.as_f64().unwrap_or(0.0);
    let all: f64 = codes.values().map(count).sum();
    let ok = codes.get("200").map_or(0.0, count);
    // Latency of the 2xx answers only (a repeated checkin's quick 404 is not a checkin).
    let ms = |k: &str| {
        v["latencyPercentilesSuccessful"][k]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    Run {
        ok_per_s: ok / total_s,
        all_per_s: all / total_s,
        not_ok: if all > 0.0 { 1.0 - ok / all } else { 0.0 },
        p50_ms: ms("p50"),
        p99_ms: ms("p99"),
        p999_ms: ms("p99.9"),
    }
}

fn run_oha(oha: &Path, url: &str, body: &Body, conns: usize, secs: f64) -> Run {
    parse_run(
        oha_command(oha, url, body, conns, secs, None)
            .output()
            .unwrap(),
    )
}

/// Writes one `{"handle": …}` line per live checkout of the agent, read from its SQLite file
/// (WAL: a reader does not disturb the writer). Returns the count.
fn write_pool(agent_dir: &Path, file: &Path) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let handles: Vec<String> = rt.block_on(async {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(agent_dir.join("agent-data").join("agent.db"))
            .read_only(true)
            .connect()
            .await
            .unwrap();
        sqlx::query_scalar("SELECT handle FROM checkouts WHERE row NOT IN (SELECT row FROM ended)")
            .fetch_all(&mut conn)
            .await
            .unwrap()
    });
    let mut text = String::with_capacity(handles.len() * 48);
    for h in &handles {
        text.push_str(&json!({ "handle": h }).to_string());
        text.push('\n');
    }
    std::fs::write(file, text).unwrap();
    handles.len()
}

/// The disk's floor under every durable answer: `n` appends of 8 KiB (a group commit's few WAL
/// pages) to a file beside `agent.db`, each followed by `fdatasync`, as SQLite's
/// `synchronous=FULL` commit does; returns the syncs' p50, p99 and max in ms. A request that
/// arrives while a group commit syncs waits for that sync and then its own, so an open-loop
/// p99 cannot go below about twice this p99.
fn fdatasync_floor(dir: &Path, n: usize) -> (f64, f64, f64) {
    use std::io::Write;
    let path = dir.join("fdatasync-floor");
    let mut file = std::fs::File::create(&path).unwrap();
    let page = vec![0x5au8; 8192];
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            file.write_all(&page).unwrap();
            let start = std::time::Instant::now();
            file.sync_data().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    drop(file);
    let _ = std::fs::remove_file(&path);
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), ms[ms.len() - 1])
}

/// CPU time over one run, in cores (1.0 = one core busy for the whole run), from `/proc`: the
/// server's own (its `utime + stime`) and the whole machine's (every tick not idle or iowait).
/// Says whether a run was bound by the cores or by something serial inside the server.
#[derive(Clone, Copy, Default)]
struct Cores {
    server: f64,
    machine: f64,
}

/// Ticks of `pid` (user + system) and of the machine (busy, all).
fn ticks(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let own: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let all = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = all
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (own, total - idle, total)
}

/// Runs `f` and measures the cores `pid` and the machine used meanwhile.
fn with_cores<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Cores) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let before = ticks(pid);
    let out = f();
    let after = ticks(pid);
    let total = (after.2 - before.2).max(1) as f64;
    let cores = Cores {
        server: (after.0 - before.0) as f64 / total * cpus,
        machine: (after.1 - before.1) as f64 / total * cpus,
    };
    (out, cores)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One open-loop arrival rate's rounds: the agent's runs and cores, and the bare handler's runs
/// at the same rate (the floor that HTTP and the load generator set on these cores).
struct OpenRow {
    /// The rate as a share of the agent's closed-loop pair rate.
    load: f64,
    agent: Vec<[Run; 2]>,
    cores: Vec<Cores>,
    bare: Vec<[Run; 2]>,
}

/// Requests/s of checkout+checkin pairs, from the two rates measured apart.
fn pair_rate(checkouts: f64, checkins: f64) -> f64 {
    2.0 / (1.0 / checkouts + 1.0 / checkins)
}

/// Section 7 (`ALLOT_BENCH_ONLY=oha`): see the module's doc.
pub fn honest_ceiling(dir: &Path, conns: usize, secs: u64, rounds: usize) {
    let oha = oha();
    let secs = secs as f64;
    let pool_target = super::env_or("ALLOT_BENCH_POOL", 200_000) as usize;
    let agent = start_agent(dir);
    let bare = start_bare();
    let pool = dir.join("pool.jsonl");
    let (co, ci) = (
        |s: &Server| format!("{}/v1/checkout", s.url),
        |s: &Server| format!("{}/v1/checkin", s.url),
    );
    // Warm both up; fill the agent's pool of live checkouts for the checkin runs.
    run_oha(&oha, &co(&bare), &Body::Fixed(CHECKOUT_BODY), conns, 1.0);
    let mut live = 0;
    while live < pool_target {
        let r = run_oha(&oha, &co(&agent), &Body::Fixed(CHECKOUT_BODY), conns, 2.0);
        assert!(r.ok_per_s > 0.0, "the agent granted no checkout");
        live = write_pool(dir, &pool);
    }
    run_oha(&oha, &ci(&bare), &Body::Lines(&pool), conns, 1.0);
    eprintln!(
        "oha {OHA_VERSION}-pinned: {conns} connections, {secs} s runs, pool of {live} live checkouts"
    );

    let floor = fdatasync_floor(dir, 2_000);
    eprintln!(
        "the disk's fdatasync of an 8 KiB append, idle: p50 {:.2} p99 {:.2} max {:.2} ms",
        floor.0, floor.1, floor.2
    );

    let (agent_pid, bare_pid) = (agent.child.id(), bare.child.id());
    let mut rows: Vec<[Run; 4]> = Vec::new();
    // The cores the agent, the bare handler and the machine used in each closed-loop run.
    let mut agent_cores: Vec<Cores> = Vec::new();
    let mut bare_cores: Vec<Cores> = Vec::new();
    for round in 0..rounds {
        let (bare_co, b1) = with_cores(bare_pid, || {
            run_oha(&oha, &co(&bare), &Body::Fixed(CHECKOUT_BODY), conns, secs)
        });
        let (agent_co, a1) = with_cores(agent_pid, || {
            run_oha(&oha, &co(&agent), &Body::Fixed(CHECKOUT_BODY), conns, secs)
        });
        let live = write_pool(dir, &pool);
        let (bare_ci, b2) = with_cores(bare_pid, || {
            run_oha(&oha, &ci(&bare), &Body::Lines(&pool), conns, secs)
        });
        let (agent_ci, a2) = with_cores(agent_pid, || {
            run_oha(&oha, &ci(&agent), &Body::Lines(&pool), conns, secs)
        });
        agent_cores.extend([a1, a2]);
        bare_cores.extend([b1, b2]);
        eprintln!(
            "round {round}: checkout bare {:.0} / agent {:.0} req/s (agent p50 {:.2} p99 {:.2} ms); \
             checkin bare {:.0} / agent {:.0} ok/s of {:.0} req/s, {:.1}% repeats of {live} (agent p50 {:.2} p99 {:.2} ms); \
             pairs bare {:.0} / agent {:.0} req/s = {:.0}%; cores (server/machine): bare {:.2}/{:.2} {:.2}/{:.2}, agent {:.2}/{:.2} {:.2}/{:.2}",
            bare_co.ok_per_s,
            agent_co.ok_per_s,
            agent_co.p50_ms,
            agent_co.p99_ms,
            bare_ci.ok_per_s,
            agent_ci.ok_per_s,
            agent_ci.all_per_s,
            agent_ci.not_ok * 100.0,
            agent_ci.p50_ms,
            agent_ci.p99_ms,
            pair_rate(bare_co.ok_per_s, bare_ci.ok_per_s),
            pair_rate(agent_co.ok_per_s, agent_ci.ok_per_s),
            100.0 * pair_rate(agent_co.ok_per_s, agent_ci.ok_per_s)
                / pair_rate(bare_co.ok_per_s, bare_ci.ok_per_s),
            b1.server,
            b1.machine,
            b2.server,
            b2.machine,
            a1.server,
            a1.machine,
            a2.server,
            a2.machine,
        );
        rows.push([bare_co, agent_co, bare_ci, agent_ci]);
    }
    let med = |i: usize, f: fn(&Run) -> f64| median(rows.iter().map(|r| f(&r[i])).collect());
    let cmed = |c: &[Cores], f: fn(&Cores) -> f64| median(c.iter().map(f).collect());
    let bare_pairs = median(
        rows.iter()
            .map(|r| pair_rate(r[0].ok_per_s, r[2].ok_per_s))
            .collect(),
    );
    let agent_pairs = median(
        rows.iter()
            .map(|r| pair_rate(r[1].ok_per_s, r[3].ok_per_s))
            .collect(),
    );
    let ratio = median(
        rows.iter()
            .map(|r| {
                pair_rate(r[1].ok_per_s, r[3].ok_per_s) / pair_rate(r[0].ok_per_s, r[2].ok_per_s)
            })
            .collect(),
    );

    // Open loop: checkouts and checkins at once, 1:1, at a share of the agent's pair rate:
    // 80 % (the issue's target) and 50 % (where the tail stands with room to spare).
    let mut open_rows: Vec<OpenRow> = Vec::new();
    // `ALLOT_BENCH_OPEN_RATE=<requests/s>` runs the open loop at that one rate instead, so two
    // builds of the agent (`ALLOT_BENCH_AGENT_BIN`) compare at the same load, not each at a
    // share of its own peak.
    let targets: Vec<f64> = match std::env::var("ALLOT_BENCH_OPEN_RATE") {
        Ok(rate) => vec![
            rate.parse()
                .expect("ALLOT_BENCH_OPEN_RATE: requests per second"),
        ],
        Err(_) => OPEN_LOOP_LOADS.iter().map(|l| agent_pairs * l).collect(),
    };
    for target in targets {
        let load = target / agent_pairs;
        let mut open: Vec<[Run; 2]> = Vec::new();
        let mut open_cores: Vec<Cores> = Vec::new();
        let mut bare_open: Vec<[Run; 2]> = Vec::new();
        // Checkouts and checkins at `target` pairs/s in all, half each, against one server.
        let mixed = |server: &Server, pool: &Path| {
            let half = (conns / 2).max(1);
            let checkouts = oha_command(
                &oha,
                &co(server),
                &Body::Fixed(CHECKOUT_BODY),
                half,
                secs,
                Some(target / 2.0),
            )
            .spawn()
            .unwrap();
            let checkins = oha_command(
                &oha,
                &ci(server),
                &Body::Lines(pool),
                half,
                secs,
                Some(target / 2.0),
            )
            .spawn()
            .unwrap();
            (
                parse_run(checkouts.wait_with_output().unwrap()),
                parse_run(checkins.wait_with_output().unwrap()),
            )
        };
        for round in 0..rounds {
            // The floor at this load: the bare handler at the same arrival rate, from the same
            // two `oha`, on the same cores (what HTTP and the load generator alone cost).
            let (b_co, b_ci) = mixed(&bare, &pool);
            bare_open.push([b_co, b_ci]);
            write_pool(dir, &pool);
            let ((o_co, o_ci), cores) = with_cores(agent_pid, || mixed(&agent, &pool));
            eprintln!(
                "open round {round} at {:.0}% ({target:.0} req/s): checkout {:.0}/s p50 {:.2} p99 {:.2} p99.9 {:.2} ms; \
                 checkin {:.0} ok/s ({:.1}% repeats) p50 {:.2} p99 {:.2} p99.9 {:.2} ms; cores agent {:.2} machine {:.2}",
                load * 100.0,
                o_co.ok_per_s,
                o_co.p50_ms,
                o_co.p99_ms,
                o_co.p999_ms,
                o_ci.ok_per_s,
                o_ci.not_ok * 100.0,
                o_ci.p50_ms,
                o_ci.p99_ms,
                o_ci.p999_ms,
                cores.server,
                cores.machine,
            );
            eprintln!(
                "open round {round} at {:.0}%, bare handler at the same rate: checkout p50 {:.2} p99 {:.2} ms; checkin p50 {:.2} p99 {:.2} ms",
                load * 100.0,
                b_co.p50_ms,
                b_co.p99_ms,
                b_ci.p50_ms,
                b_ci.p99_ms,
            );
            open.push([o_co, o_ci]);
            open_cores.push(cores);
        }
        open_rows.push(OpenRow {
            load,
            agent: open,
            cores: open_cores,
            bare: bare_open,
        });
    }

    if let Ok(file) = std::env::var("ALLOT_BENCH_PERF") {
        write_pool(dir, &pool);
        let pid = agent.child.id().to_string();
        let mut perf = Command::new("perf")
            .args([
                "record",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-o",
                &file,
            ])
            .args(["-p", &pid, "--", "sleep", &format!("{secs}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let half = (conns / 2).max(1);
        let a = oha_command(
            &oha,
            &co(&agent),
            &Body::Fixed(CHECKOUT_BODY),
            half,
            secs,
            None,
        )
        .spawn()
        .unwrap();
        let b = oha_command(&oha, &ci(&agent), &Body::Lines(&pool), half, secs, None)
            .spawn()
            .unwrap();
        let (a, b) = (
            parse_run(a.wait_with_output().unwrap()),
            parse_run(b.wait_with_output().unwrap()),
        );
        perf.wait().unwrap();
        eprintln!(
            "profiled run: {:.0} checkouts/s + {:.0} checkins/s; perf data in {file}",
            a.ok_per_s, b.ok_per_s
        );
        flame_graph(&file);
    }
    drop(agent);
    drop(bare);

    println!(
        "| measure (oha {OHA_VERSION}, {conns} connections, {secs} s runs, median of {rounds} rounds) | bare handler | agent | agent / bare |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| checkouts/s, closed loop | {:.0} | {:.0} | {:.0}% |",
        med(0, |r| r.ok_per_s),
        med(1, |r| r.ok_per_s),
        100.0 * med(1, |r| r.ok_per_s) / med(0, |r| r.ok_per_s)
    );
    println!(
        "| checkins/s (200s), closed loop | {:.0} | {:.0} ({:.1}% repeats answered 404 not counted) | {:.0}% |",
        med(2, |r| r.ok_per_s),
        med(3, |r| r.ok_per_s),
        med(3, |r| r.not_ok) * 100.0,
        100.0 * med(3, |r| r.ok_per_s) / med(2, |r| r.ok_per_s)
    );
    println!(
        "| **checkout+checkin requests/s** (2 / (1/co + 1/ci)) | {bare_pairs:.0} | {agent_pairs:.0} | **{:.0}%** |",
        ratio * 100.0
    );
    println!(
        "| closed-loop checkout p50 / p99 | {:.2} / {:.2} ms | {:.2} / {:.2} ms | |",
        med(0, |r| r.p50_ms),
        med(0, |r| r.p99_ms),
        med(1, |r| r.p50_ms),
        med(1, |r| r.p99_ms)
    );
    println!(
        "| closed-loop checkin p50 / p99 | {:.2} / {:.2} ms | {:.2} / {:.2} ms | |",
        med(2, |r| r.p50_ms),
        med(2, |r| r.p99_ms),
        med(3, |r| r.p50_ms),
        med(3, |r| r.p99_ms)
    );
    println!(
        "| cores used, closed loop (server / whole machine, of {}) | {:.2} / {:.2} | {:.2} / {:.2} | |",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        cmed(&bare_cores, |c| c.server),
        cmed(&bare_cores, |c| c.machine),
        cmed(&agent_cores, |c| c.server),
        cmed(&agent_cores, |c| c.machine)
    );
    for row in &open_rows {
        let (load, open, cores) = (row.load, &row.agent, &row.cores);
        let omed = |i: usize, f: fn(&Run) -> f64| median(open.iter().map(|r| f(&r[i])).collect());
        let bmed =
            |i: usize, f: fn(&Run) -> f64| median(row.bare.iter().map(|r| f(&r[i])).collect());
        let pct = load * 100.0;
        println!(
            "| open loop at {pct:.0}% ({:.0} req/s: {:.0} checkouts/s + {:.0} checkins/s achieved), checkout p50 / p99 / p99.9 | {:.2} / {:.2} / {:.2} ms | {:.2} / {:.2} / {:.2} ms | |",
            agent_pairs * load,
            omed(0, |r| r.ok_per_s),
            omed(1, |r| r.ok_per_s),
            bmed(0, |r| r.p50_ms),
            bmed(0, |r| r.p99_ms),
            bmed(0, |r| r.p999_ms),
            omed(0, |r| r.p50_ms),
            omed(0, |r| r.p99_ms),
            omed(0, |r| r.p999_ms)
        );
        println!(
            "| open loop at {pct:.0}%, checkin p50 / p99 / p99.9 ({:.1}% repeats) | {:.2} / {:.2} / {:.2} ms | {:.2} / {:.2} / {:.2} ms | |",
            omed(1, |r| r.not_ok) * 100.0,
            bmed(1, |r| r.p50_ms),
            bmed(1, |r| r.p99_ms),
            bmed(1, |r| r.p999_ms),
            omed(1, |r| r.p50_ms),
            omed(1, |r| r.p99_ms),
            omed(1, |r| r.p999_ms)
        );
        println!(
            "| open loop at {pct:.0}%, cores used (agent / whole machine) | | {:.2} / {:.2} | |",
            cmed(cores, |c| c.server),
            cmed(cores, |c| c.machine)
        );
    }
    println!(
        "| the disk's floor: `fdatasync` of an 8 KiB append, idle, p50 / p99 / max (2,000 syncs) | | {:.2} / {:.2} / {:.2} ms | |",
        floor.0, floor.1, floor.2
    );
}
