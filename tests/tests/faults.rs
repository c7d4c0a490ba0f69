//! Fault injection: under a steady checkout load across three metering servers and two
//! balancers sharing one PostgreSQL, repeatedly kill -9 the leading balancer, kill -9 a metering
//! server, crash-restart PostgreSQL, and black-hole, delay or refuse the network between the
//! balancers and one server — and, once per round each, kill the leader while that server is
//! black-holed and while PostgreSQL is down. Throughout and after each fault's recovery the invariants of
//! DESIGN.md are checked: conservation of the books, no over-grant at any sampled instant, no
//! live checkout lost, and `allot-balancer doctor` exits 0 once the fleet settles.
//!
//! The default run is bounded for CI (one round of every fault). A soak runs more rounds:
//! `ALLOT_SOAK_ROUNDS=N` rounds, or as many as fit in `ALLOT_SOAK_SECONDS=S`. The run prints
//! its figures (faults by kind, operations served, checks passed, recovery times) at the end.
//!
//! PostgreSQL is restarted, so the test runs its own throwaway cluster (never the shared one):
//! see [`allot_tests::pg_cluster`].

use allot_tests::Backend;
use allot_tests::balancer::{ADMIN_TOKEN, Balancer};
use allot_tests::fleet::{Fleet, Meter};
use allot_tests::pg_cluster::PgCluster;
use allot_tests::process::{binary, free_port};
use allot_tests::proxy::{Link, Mode, Proxy};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The products under load and their purchased units: fewer than the peak demand, so servers
/// run dry, ask for instant balances and get denials.
const PRODUCTS: [(&str, u64); 2] = [("cad", 12), ("sim", 6)];
/// Metering servers; the last one sits behind the switchable link.
const METERS: [&str; 3] = ["paris", "tokyo", "austin"];
/// Client tasks per (server, product).
const CLIENTS: usize = 2;
/// The balancers' timeout on each call to a server: short, so partitions are noticed quickly.
const CALL_TIMEOUT_MS: u64 = 1000;
/// The shortest time a network fault lasts: long enough for instant balances, syncs and runs
/// to run into it.
const FAULT_HOLD: Duration = Duration::from_secs(3);
/// The longest a recovery may take before the test calls it a failure (a loaded 2-core CI box).
const SETTLE: Duration = Duration::from_secs(60);

/// The checkpoint after the load has stopped: not a fault, no recovery time.
const END: &str = "end";

/// How many rounds of faults to run.
enum Length {
    Rounds(u64),
    Seconds(Duration),
}

impl Length {
    fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name}={v:?}")))
        };
        if let Some(seconds) = var("ALLOT_SOAK_SECONDS") {
            Self::Seconds(Duration::from_secs(seconds))
        } else {
            Self::Rounds(var("ALLOT_SOAK_ROUNDS").unwrap_or(1))
        }
    }

    fn another(&self, done: u64, started: Instant) -> bool {
        match self {
            Self::Rounds(n) => done < *n,
            Self::Seconds(limit) => done == 0 || started.elapsed() < *limit,
        }
    }
}

/// What the run counted. Shared by the load, the sampler and the fault loop.
#[derive(Default)]
struct Tally {
    /// Faults injected, by kind.
    faults: BTreeMap<&'static str, u64>,
    /// Time from each fault's end (process back, link healed) to the doctor's first OK.
    recoveries: BTreeMap<&'static str, Vec<Duration>>,
    /// Time from a leader's kill -9 to a follower leading.
    takeovers: Vec<Duration>,
    /// Time from PostgreSQL's restart to a balancer leading again on it.
    releads: Vec<Duration>,
    /// How long each network fault lasted (at least [`FAULT_HOLD`], until a run met it).
    cuts: Vec<Duration>,
    /// Invariant checks passed, by kind.
    checks: BTreeMap<&'static str, u64>,
    /// Everything that broke an invariant, in words.
    violations: Vec<String>,
}

impl Tally {
    fn passed(&mut self, check: &'static str) {
        *self.checks.entry(check).or_default() += 1;
    }

    fn violated(&mut self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.push(what);
    }
}

/// Client operations, counted without a lock on the hot path.
#[derive(Default)]
struct Ops {
    granted: AtomicU64,
    denied: AtomicU64,
    /// Checkouts whose answer never came (the server died mid-request): in doubt, not counted
    /// as live; an orphan, if granted, stales out.
    in_doubt: AtomicU64,
    heartbeats: AtomicU64,
    checkins: AtomicU64,
    balance_runs: AtomicU64,
}

/// What the whole test shares.
struct Shared {
    tally: Mutex<Tally>,
    ops: Ops,
    /// Every checkout acknowledged and not yet being checked in: handle → server index. A
    /// handle leaves this map *before* its checkin is sent, so a handle in it must be live.
    live: Mutex<HashMap<String, usize>>,
    stop: AtomicBool,
    http: reqwest::Client,
    /// Each metering server's URL and token, fixed for the run (restarts reuse ports).
    meters: Vec<(String, String)>,
    /// Every balancer's URL.
    balancers: Vec<String>,
}

impl Shared {
    fn violated(&self, what: String) {
        self.tally.lock().expect("tally").violated(what);
    }

    fn passed(&self, check: &'static str) {
        self.tally.lock().expect("tally").passed(check);
    }

    fn is_live(&self, handle: &str) -> bool {
        self.live.lock().expect("live").contains_key(handle)
    }

    /// POSTs a JSON body; `None` when no answer came (the server is down or cut off).
    async fn post(&self, url: &str, body: &Value) -> Option<(StatusCode, Value)> {
        let response = self.http.post(url).json(body).send().await.ok()?;
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        Some((status, body))
    }

    /// GETs with an optional token; `None` when no successful answer came.
    async fn get(&self, url: &str, token: Option<&str>) -> Option<Value> {
        let mut request = self.http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invariants_hold_under_repeated_faults() {
    let Some(cluster) = PgCluster::start("faults") else {
        return;
    };
    let length = Length::from_env();
    let started = Instant::now();
    let backend = Backend::on_cluster(&cluster);
    let timeout = CALL_TIMEOUT_MS.to_string();
    let flags = ["--call-timeout-ms", timeout.as_str()];
    let mut fleet = Fleet::start(backend, &flags, &[]).await;
    let standby = Balancer::start_with(&fleet.backend, &flags, &[]).await;
    fleet.balancer_urls = vec![fleet.balancer.url().to_owned(), standby.url().to_owned()];

    for (product, units) in PRODUCTS {
        fleet
            .api()
            .post(
                "/v1/products",
                // Clients heartbeat several times a second; a checkout stales out only when
                // its client is gone for far longer than any fault lasts.
                json!({"name": product, "heartbeat_seconds": 1, "staleout_seconds": 120}),
            )
            .await;
        fleet
            .api()
            .post(
                &format!("/v1/products/{product}/entitlements"),
                json!({"units": units}),
            )
            .await;
    }
    for name in &METERS[..METERS.len() - 1] {
        fleet.add_meter(name).await;
    }
    // The last server reaches, and is reached by, the balancers only through one link.
    let link = Link::new();
    let port = free_port();
    let to_meter = link.proxy(port).await;
    let mut to_balancers: Vec<Proxy> = Vec::new();
    for url in fleet.balancer_urls.clone() {
        let upstream = url.rsplit(':').next().and_then(|p| p.parse().ok());
        to_balancers.push(link.proxy(upstream.expect("a balancer port")).await);
    }
    let via: Vec<String> = to_balancers.iter().map(Proxy::url).collect();
    fleet
        .add_meter_at(METERS[2], port, &to_meter.url(), &via.join(","))
        .await;
    for (product, _) in PRODUCTS {
        fleet.wait_synced(product).await;
        for name in METERS {
            fleet.limits(name, product, 0, 1).await;
        }
    }
    fleet.balance().await;

    let Fleet {
        balancer,
        mut meters,
        backend: _backend,
        ..
    } = fleet;
    let mut balancers = [balancer, standby];
    let shared = Arc::new(Shared {
        tally: Mutex::default(),
        ops: Ops::default(),
        live: Mutex::default(),
        stop: AtomicBool::new(false),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client"),
        meters: meters.iter().map(|m| (m.url(), m.token.clone())).collect(),
        balancers: balancers.iter().map(|b| b.url().to_owned()).collect(),
    });

    let mut load = tokio::task::JoinSet::new();
    for meter in 0..METERS.len() {
        for (product, _) in PRODUCTS {
            for client in 0..CLIENTS {
                load.spawn(client_loop(shared.clone(), meter, product, client));
            }
        }
    }
    load.spawn(balance_loop(shared.clone()));
    load.spawn(sampler(shared.clone()));
    let setup = started.elapsed();

    let mut rounds = 0;
    while length.another(rounds, started) {
        rounds += 1;
        kill_leader(&shared, &mut balancers).await;
        kill_meter(&shared, &mut meters[(rounds as usize - 1) % METERS.len()]).await;
        restart_postgres(&shared, &cluster).await;
        for (kind, mode) in [
            ("black_hole", Mode::BlackHole),
            (
                "delay",
                Mode::Delay(Duration::from_millis(CALL_TIMEOUT_MS * 3 / 2)),
            ),
            ("refuse", Mode::Refuse),
        ] {
            cut_link(&shared, &link, kind, mode).await;
        }
        partition_then_kill_leader(&shared, &link, &mut balancers).await;
        postgres_down_then_kill_leader(&shared, &cluster, &mut balancers).await;
    }

    shared.stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    // The load has stopped with checkouts still held: the last check sees them all live.
    checkpoint(&shared, END, Instant::now()).await;
    report(&shared, rounds, setup, started.elapsed());
    let tally = shared.tally.lock().expect("tally");
    assert!(
        tally.violations.is_empty(),
        "{} invariant violations: {:#?}",
        tally.violations.len(),
        tally.violations
    );
    assert!(
        shared.ops.granted.load(Ordering::Relaxed) > 0,
        "the load was served nothing: the run proves nothing"
    );
}

/// kill -9 of the leading balancer; the follower must take over; the dead one comes back as a
/// follower.
async fn kill_leader(shared: &Shared, balancers: &mut [Balancer; 2]) {
    let takeover = fail_over(shared, balancers).await;
    let recovered = Instant::now();
    count_fault(shared, "kill_leader");
    eprintln!("fault: kill -9 of the leader; takeover after {takeover:?}");
    checkpoint(shared, "kill_leader", recovered).await;
}

/// Kills the leader, waits for the follower to take over, starts the dead one again (it
/// follows); returns the time to the takeover.
async fn fail_over(shared: &Shared, balancers: &mut [Balancer; 2]) -> Duration {
    let leader = wait_for_leader(shared).await;
    balancers[leader].kill9();
    let killed = Instant::now();
    let next = wait_for_leader(shared).await;
    let takeover = killed.elapsed();
    assert_ne!(next, leader, "a dead balancer cannot lead");
    balancers[leader].restart().await;
    shared.tally.lock().expect("tally").takeovers.push(takeover);
    takeover
}

/// The worst of two faults at once: the link to the last server is black-holed, the leader
/// runs into it (moves to that server may be left unconfirmed), then dies; the new leader must
/// meet the partition too, and after the link heals it must finish what the old one left.
async fn partition_then_kill_leader(shared: &Shared, link: &Link, balancers: &mut [Balancer; 2]) {
    const KIND: &str = "black_hole+kill_leader";
    link.set(Mode::BlackHole);
    hold_until_met(shared, KIND).await;
    let takeover = fail_over(shared, balancers).await;
    hold_until_met(shared, KIND).await;
    link.set(Mode::Pass);
    let recovered = Instant::now();
    count_fault(shared, KIND);
    eprintln!("fault: black hole, then kill -9 of the leader; takeover after {takeover:?}");
    checkpoint(shared, KIND, recovered).await;
}

fn count_fault(shared: &Shared, kind: &'static str) {
    *shared
        .tally
        .lock()
        .expect("tally")
        .faults
        .entry(kind)
        .or_default() += 1;
}

/// kill -9 of a metering server, restarted at once on its data directory.
async fn kill_meter(shared: &Shared, meter: &mut Meter) {
    meter.kill9();
    meter.restart().await;
    let recovered = Instant::now();
    count_fault(shared, "kill_meter");
    eprintln!("fault: kill -9 of metering server {}", meter.name);
    checkpoint(shared, "kill_meter", recovered).await;
}

/// PostgreSQL crashes (immediate stop: every session cut, no checkpoint) and starts again. The
/// leader's lock session dies with it, so recovery is a new leadership taken on the restarted
/// database.
async fn restart_postgres(shared: &Shared, cluster: &PgCluster) {
    let before = newest_leadership(shared).await;
    cluster.restart_immediate();
    let restarted = Instant::now();
    let deadline = restarted + SETTLE;
    while newest_leadership(shared).await <= before {
        assert!(
            Instant::now() < deadline,
            "no leadership taken within {SETTLE:?} of PostgreSQL's restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = Instant::now();
    let relead = restarted.elapsed();
    count_fault(shared, "restart_postgres");
    shared.tally.lock().expect("tally").releads.push(relead);
    eprintln!("fault: PostgreSQL crash-restarted; leadership taken again after {relead:?}");
    checkpoint(shared, "restart_postgres", recovered).await;
}

/// Two faults at once: PostgreSQL goes down, the leader dies while it is down, PostgreSQL
/// comes back. The follower must win the lock on the restarted database (the dead leader's
/// session died with the old one) and finish whatever the dead leader left unconfirmed.
async fn postgres_down_then_kill_leader(
    shared: &Shared,
    cluster: &PgCluster,
    balancers: &mut [Balancer; 2],
) {
    const KIND: &str = "postgres_down+kill_leader";
    let leader = wait_for_leader(shared).await;
    let before = newest_leadership(shared).await;
    cluster.stop_immediate();
    balancers[leader].kill9();
    cluster.start_server();
    let restarted = Instant::now();
    let deadline = restarted + SETTLE;
    while newest_leadership(shared).await <= before {
        assert!(
            Instant::now() < deadline,
            "{KIND}: no leadership taken within {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relead = restarted.elapsed();
    assert_ne!(
        wait_for_leader(shared).await,
        leader,
        "a dead balancer cannot lead"
    );
    balancers[leader].restart().await;
    let recovered = Instant::now();
    count_fault(shared, KIND);
    shared.tally.lock().expect("tally").releads.push(relead);
    eprintln!("fault: PostgreSQL down, leader killed meanwhile; a leader again after {relead:?}");
    checkpoint(shared, KIND, recovered).await;
}

/// The id of the newest `leader.take` audit entry any balancer reports (0 when none answers).
async fn newest_leadership(shared: &Shared) -> i64 {
    for url in &shared.balancers {
        let Some(audit) = shared
            .get(&format!("{url}/v1/audit?limit=1000"), Some(ADMIN_TOKEN))
            .await
        else {
            continue;
        };
        return audit["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["action"] == "leader.take")
            .filter_map(|e| e["id"].as_i64())
            .max()
            .unwrap_or(0);
    }
    0
}

/// The link to the last server misbehaves for at least [`FAULT_HOLD`] and until a balance run
/// begun after the cut has found that server unreachable, then heals.
async fn cut_link(shared: &Shared, link: &Link, kind: &'static str, mode: Mode) {
    link.set(mode);
    let cut = Instant::now();
    hold_until_met(shared, kind).await;
    link.set(Mode::Pass);
    let recovered = Instant::now();
    count_fault(shared, kind);
    shared.tally.lock().expect("tally").cuts.push(cut.elapsed());
    eprintln!("fault: link {mode:?} for {:?}", cut.elapsed());
    checkpoint(shared, kind, recovered).await;
}

/// Returns once the fault just set has lasted [`FAULT_HOLD`] and a run begun after it was set
/// has found the server behind the link unreachable, so every fault is felt by the books'
/// side, not merely switched on.
async fn hold_until_met(shared: &Shared, kind: &str) {
    let cut = Instant::now();
    // Runs begun from here on talk to the server through the cut link (open connections too).
    let before = latest_run(shared).await.unwrap_or(0);
    let deadline = cut + SETTLE;
    while cut.elapsed() < FAULT_HOLD || !met_unreachable_since(shared, before).await {
        assert!(
            Instant::now() < deadline,
            "{kind}: no run ever met the fault"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The id of the newest run of any kind, from any balancer that answers.
async fn latest_run(shared: &Shared) -> Option<i64> {
    for url in &shared.balancers {
        let runs = shared
            .get(&format!("{url}/v1/runs?limit=1"), Some(ADMIN_TOKEN))
            .await;
        if let Some(id) = runs.as_ref().and_then(|r| r["items"][0]["id"].as_i64()) {
            return Some(id);
        }
    }
    None
}

/// Whether a manual run (the only kind that reads every server's status) newer than `after`
/// found a server unreachable. Instant runs are many and read no status: they are filtered
/// out, or they would push the manual runs off the page.
async fn met_unreachable_since(shared: &Shared, after: i64) -> bool {
    for url in &shared.balancers {
        let Some(runs) = shared
            .get(
                &format!("{url}/v1/runs?limit=20&trigger=manual"),
                Some(ADMIN_TOKEN),
            )
            .await
        else {
            continue;
        };
        return runs["items"].as_array().is_some_and(|items| {
            items.iter().any(|r| {
                r["id"].as_i64().is_some_and(|id| id > after)
                    && r["servers_unreachable"].as_u64().unwrap_or(0) > 0
            })
        });
    }
    false
}

/// The index of the balancer that leads, once exactly one does (at most [`SETTLE`]).
async fn wait_for_leader(shared: &Shared) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut leaders = Vec::new();
        for (i, url) in shared.balancers.iter().enumerate() {
            if let Some(health) = shared.get(&format!("{url}/healthz"), None).await
                && health["leader"] == true
            {
                leaders.push(i);
            }
        }
        if let [one] = leaders[..] {
            return one;
        }
        assert!(
            Instant::now() < deadline,
            "no single leader within {SETTLE:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a fault's recovery: the doctor agrees (polled until the fleet settles), every live
/// checkout is still known to its server, and the books and servers pass a sample.
async fn checkpoint(shared: &Shared, fault: &'static str, recovered: Instant) {
    let leader = wait_for_leader(shared).await;
    let url = &shared.balancers[leader];
    let deadline = Instant::now() + SETTLE;
    loop {
        let doctor = tokio::process::Command::new(binary("allot-balancer"))
            .args([
                "doctor",
                "--json",
                "--url",
                url,
                "--admin-token",
                ADMIN_TOKEN,
            ])
            .env_remove("ALLOT_URL")
            .output()
            .await
            .expect("run allot-balancer doctor");
        if doctor.status.success() {
            break;
        }
        let last = format!(
            "{}{}",
            String::from_utf8_lossy(&doctor.stdout),
            String::from_utf8_lossy(&doctor.stderr)
        );
        if Instant::now() >= deadline {
            shared.violated(format!(
                "after {fault}: the doctor never agreed within {SETTLE:?}: {last}"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled = recovered.elapsed();
    {
        let mut tally = shared.tally.lock().expect("tally");
        tally.passed("doctor");
        if fault != END {
            tally.recoveries.entry(fault).or_default().push(settled);
        }
    }
    eprintln!("  {fault}: doctor OK {settled:?} after recovery");

    let handles: Vec<(String, usize)> = shared
        .live
        .lock()
        .expect("live")
        .iter()
        .map(|(h, m)| (h.clone(), *m))
        .collect();
    for (handle, meter) in handles {
        heartbeat(shared, meter, &handle, true).await;
    }
    sample_books(shared).await;
    sample_servers(shared).await;
}

/// Heartbeats `handle`; a live handle its server no longer knows is a lost checkout. `sure`:
/// the server must answer (it is up); otherwise no answer is merely skipped.
async fn heartbeat(shared: &Shared, meter: usize, handle: &str, sure: bool) -> bool {
    let url = format!("{}/v1/heartbeat", shared.meters[meter].0);
    match shared.post(&url, &json!({"handle": handle})).await {
        Some((status, _)) if status.is_success() => {
            shared.ops.heartbeats.fetch_add(1, Ordering::Relaxed);
            if sure {
                shared.passed("live_checkout_kept");
            }
            true
        }
        // Checked in meanwhile (it left the live map before its checkin went out): fine.
        Some(_) if !shared.is_live(handle) => false,
        Some((status, body)) => {
            shared.violated(format!(
                "live checkout {handle} on {} lost: heartbeat answered {status} {body}",
                METERS[meter]
            ));
            shared.live.lock().expect("live").remove(handle);
            false
        }
        None if sure => {
            shared.violated(format!(
                "{} did not answer a heartbeat after recovery",
                METERS[meter]
            ));
            false
        }
        None => false,
    }
}

/// One simulated population on one server and product: its demand rises and falls, so units
/// must move between servers; it checks out, heartbeats everything it holds, and checks in.
async fn client_loop(shared: Arc<Shared>, meter: usize, product: &'static str, client: usize) {
    let base = shared.meters[meter].0.clone();
    let mut held: Vec<String> = Vec::new();
    // Checkins to send: (handle, whether an earlier attempt went unanswered). A retry may find
    // the handle gone (its first attempt was applied); a first attempt must find it live.
    let mut checkins: Vec<(String, bool)> = Vec::new();
    for tick in 0u64.. {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        // Each population peaks at a different time: 0 to 3 seats, changing every ~4 s.
        let wanted = ((tick / 20) as usize + meter + client) % 4;
        if held.len() < wanted {
            let user = format!("{}-{product}-{client}-{tick}", METERS[meter]);
            let body = json!({"product": product, "user": user, "host": "h"});
            match shared.post(&format!("{base}/v1/checkout"), &body).await {
                Some((status, body)) if status.is_success() => {
                    let handle = body["handle"].as_str().expect("a handle").to_owned();
                    shared
                        .live
                        .lock()
                        .expect("live")
                        .insert(handle.clone(), meter);
                    shared.ops.granted.fetch_add(1, Ordering::Relaxed);
                    held.push(handle);
                }
                Some((_, body)) if body["error"]["code"] == "license_unavailable" => {
                    shared.ops.denied.fetch_add(1, Ordering::Relaxed);
                }
                Some((status, body)) => shared.violated(format!(
                    "checkout on {} answered {status} {body}",
                    METERS[meter]
                )),
                None => {
                    shared.ops.in_doubt.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else if held.len() > wanted {
            let handle = held.remove(0);
            shared.live.lock().expect("live").remove(&handle);
            checkins.push((handle, false));
        }
        let mut unanswered = Vec::new();
        for (handle, retry) in checkins.drain(..) {
            match shared
                .post(&format!("{base}/v1/checkin"), &json!({"handle": handle}))
                .await
            {
                Some((status, _)) if status.is_success() => {
                    shared.ops.checkins.fetch_add(1, Ordering::Relaxed);
                }
                Some((status, _)) if retry && status == StatusCode::NOT_FOUND => {}
                Some((status, body)) => shared.violated(format!(
                    "checkin of live checkout {handle} on {} answered {status} {body}",
                    METERS[meter]
                )),
                None => unanswered.push((handle, true)),
            }
        }
        checkins = unanswered;
        let mut kept = Vec::new();
        for handle in held.drain(..) {
            heartbeat(&shared, meter, &handle, false).await;
            if shared.is_live(&handle) {
                kept.push(handle);
            }
        }
        held = kept;
        // Pacing, not waiting for a condition: a client population acts a few times a second.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The scheduler's part: a manual balance run on whichever balancer leads, twice a second.
async fn balance_loop(shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        for url in &shared.balancers {
            let answer = shared
                .http
                .post(format!("{url}/v1/balance"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({}))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                shared.ops.balance_runs.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Samples the books and the servers continuously, faults or not.
async fn sampler(shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        sample_books(&shared).await;
        sample_servers(&shared).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Invariant 1 as any balancer that answers reports it: reserve + in transit + Σ allocation =
/// purchased, for every product.
async fn sample_books(shared: &Shared) {
    for (product, purchased) in PRODUCTS {
        for url in &shared.balancers {
            let Some(detail) = shared
                .get(&format!("{url}/v1/products/{product}"), Some(ADMIN_TOKEN))
                .await
            else {
                continue;
            };
            let field = |k: &str| detail[k].as_u64().unwrap_or(u64::MAX / 4);
            let (reserve, in_transit, allocated) =
                (field("reserve"), field("in_transit"), field("allocated"));
            let cells: u64 = detail["servers"]
                .as_array()
                .map(|cells| cells.iter().filter_map(|c| c["allocation"].as_u64()).sum())
                .unwrap_or(0);
            if field("purchased") == purchased && reserve + in_transit + allocated == purchased {
                shared.passed("conservation");
            } else {
                shared.violated(format!(
                    "{product}: reserve {reserve} + in transit {in_transit} + allocated \
                     {allocated} != purchased {purchased}: {detail}"
                ));
            }
            if cells == allocated {
                shared.passed("allocated_matches_cells");
            } else {
                shared.violated(format!(
                    "{product}: Σ cell allocations {cells} != allocated {allocated}: {detail}"
                ));
            }
            break;
        }
    }
}

/// One server's status per product: (allocation, generation, in use).
type Seen = BTreeMap<String, (u64, u64, u64)>;

async fn status_of(shared: &Shared, meter: usize) -> Option<Seen> {
    let (url, token) = &shared.meters[meter];
    let status = shared
        .get(&format!("{url}/v1/status?peek=true"), Some(token))
        .await?;
    let figures = status["products"]
        .as_array()?
        .iter()
        .map(|p| {
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            let name = p["product"].as_str().unwrap_or_default().to_owned();
            (name, (n("allocation"), n("generation"), n("in_use")))
        })
        .collect();
    Some(figures)
}

/// Invariant 2 as the servers apply it: under hard stop each server's in use ≤ its allocation,
/// and the allocations applied sum to at most purchased. The sum is read as a double collect:
/// every server twice with no generation changed in between, so all the reads hold at one
/// instant (between the passes) and a move between two servers' reads cannot fake an excess.
async fn sample_servers(shared: &Shared) {
    let mut first = Vec::new();
    for meter in 0..shared.meters.len() {
        first.push(status_of(shared, meter).await);
    }
    for (meter, seen) in first.iter().enumerate() {
        for (product, (allocation, _, in_use)) in seen.iter().flatten() {
            if in_use <= allocation {
                shared.passed("in_use_within_allocation");
            } else {
                shared.violated(format!(
                    "{}/{product}: {in_use} in use > allocation {allocation} under hard stop",
                    METERS[meter]
                ));
            }
        }
    }
    if first.iter().any(Option::is_none) {
        return;
    }
    for (meter, seen) in first.iter().enumerate() {
        let again = status_of(shared, meter).await;
        let same_generations = again.as_ref().is_some_and(|again| {
            seen.iter()
                .flatten()
                .all(|(p, (_, g, _))| again.get(p).is_some_and(|(_, g2, _)| g2 == g))
        });
        if !same_generations {
            return;
        }
    }
    for (product, purchased) in PRODUCTS {
        let applied: u64 = first
            .iter()
            .flatten()
            .filter_map(|seen| seen.get(product))
            .map(|(allocation, _, _)| allocation)
            .sum();
        if applied <= purchased {
            shared.passed("applied_within_purchased");
        } else {
            shared.violated(format!(
                "{product}: servers applied {applied} > purchased {purchased}: {first:?}"
            ));
        }
    }
}

fn report(shared: &Shared, rounds: u64, setup: Duration, wall: Duration) {
    let tally = shared.tally.lock().expect("tally");
    let ops = &shared.ops;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let faults: u64 = tally.faults.values().sum();
    let checks: u64 = tally.checks.values().sum();
    let served = n(&ops.granted) + n(&ops.heartbeats) + n(&ops.checkins);
    eprintln!("\n=== fault injection: {rounds} round(s), {wall:?} wall ({setup:?} setup) ===");
    eprintln!("faults injected: {faults} {:?}", tally.faults);
    eprintln!(
        "operations served: {served} (checkouts granted {}, heartbeats {}, checkins {}); \
         checkout attempts denied {}, in doubt {}; manual balance runs {}",
        n(&ops.granted),
        n(&ops.heartbeats),
        n(&ops.checkins),
        n(&ops.denied),
        n(&ops.in_doubt),
        n(&ops.balance_runs),
    );
    eprintln!("invariant checks passed: {checks} {:?}", tally.checks);
    for (kind, times) in &tally.recoveries {
        eprintln!("recovery to doctor OK after {kind}: {}", spread(times));
    }
    eprintln!(
        "leader takeover after kill -9: {}",
        spread(&tally.takeovers)
    );
    eprintln!(
        "leadership again after PostgreSQL's restart: {}",
        spread(&tally.releads)
    );
    eprintln!("network fault length: {}", spread(&tally.cuts));
    eprintln!("violations: {}", tally.violations.len());
}

/// Mean and max of some durations, in milliseconds.
fn spread(times: &[Duration]) -> String {
    let max = times.iter().max().map_or(0, Duration::as_millis);
    let mean = times.iter().map(Duration::as_millis).sum::<u128>() / times.len().max(1) as u128;
    format!("mean {mean} ms, max {max} ms over {}", times.len())
}
