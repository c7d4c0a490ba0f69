//! Fault injection: under a steady checkout load across three metering servers and two
//! balancers sharing one PostgreSQL, repeatedly kill -9 the leading balancer, kill -9 a metering
//! server, SIGSTOP a metering server, crash-restart PostgreSQL, and black-hole, delay or refuse
//! the network between the balancers and one server — and, once per round each, kill the leader
//! while that server is black-holed and while PostgreSQL is down. Throughout and after each
//! fault's recovery the invariants of DESIGN.md are checked: conservation of the books, no
//! over-grant at any sampled instant, no live checkout lost, and `allot-balancer doctor` exits 0
//! once the fleet settles.
//!
//! The default run is bounded for CI (one round of every fault). A soak runs more rounds:
//! `ALLOT_SOAK_ROUNDS=N` rounds, or as many as fit in `ALLOT_SOAK_SECONDS=S`. The run prints
//! its figures (faults by kind, operations served, checks passed, recovery times) at the end.
//!
//! PostgreSQL is restarted, so the test runs its own throwaway cluster (never the shared one):
//! see [`allot_tests::pg_cluster`].
//!
//! **The clients' ledger.** Sampling the servers can miss an over-grant between two samples,
//! so every simulated client also keeps a ledger of what it held, and after the run a sweep
//! over it ([`allot_tests::ledger::sweep`]) finds the most units of each product held at once
//! anywhere in the estate: it must never exceed what was purchased. Demand is drawn from a seed
//! so that it stands above what was purchased nearly all the time (the estate runs at
//! capacity), and clients keep each checkout only briefly, so units change hands all the time.
//! `clients_never_hold_more_than_purchased_{sqlite,postgres}` run the same check on one
//! balancer on SQLite and on PostgreSQL (the shared server) over several seeds, each with
//! kill -9 of the balancer and of a server and SIGSTOP of servers (shorter and longer than a
//! staleout, once with a kill -9 of the balancer meanwhile) in a seeded order. `ALLOT_FAULT_SEED`
//! (default 1) is the first seed and `ALLOT_FAULT_SEEDS` (default 3) how many the seeded tests
//! run; the soak draws its demand from the first. A failure names its seed.
//!
//! What a client counts as held — sound (a correct system never fails the check) and strong
//! (a unit granted twice is caught): an interval runs from the instant the grant's answer
//! *arrived* to the earliest of
//! - the instant the client *sent* its checkin (before sending it): the server frees the unit
//!   only on receiving it, later;
//! - the instant a heartbeat's refusal arrived, for a checkout its server no longer knows: the
//!   client believed it held the unit until then, so a server that dropped a live checkout and
//!   granted the unit again is caught (and the drop itself is reported as a lost checkout);
//! - the end of the run, for checkouts still held (the last checkpoint finds them live);
//! - its **lease**: the instant the client *sent* the last checkout or heartbeat that was
//!   answered with success, plus the product's staleout (less [`STALEOUT_MARGIN`] for clock
//!   granularity). The server processed that request after it was sent and stales the
//!   checkout out no earlier than staleout seconds after processing it, so it held the
//!   checkout at least until then; after it, a server is *allowed* to stale the checkout out
//!   and grant the unit again (a SIGSTOPped server does so on waking, a cut-off client cannot
//!   heartbeat), and a well-behaved client must stop using a licence it could not keep alive.
//!   A refusal after the lease is therefore a staleout, not a lost checkout.
//!
//! So every interval lies inside the time its server held the checkout; under hard stop the
//! servers' checkouts never exceed their applied allocations, which never sum above purchased,
//! so the clients' intervals cannot either unless a unit really was held twice. A checkout whose
//! answer never arrived is not counted (the server's orphan only makes the servers' side
//! larger); a checkin sent but unanswered ends the interval at its first sending.

use allot_tests::Backend;
use allot_tests::balancer::{ADMIN_TOKEN, Balancer};
use allot_tests::fleet::{Fleet, Meter};
use allot_tests::ledger::{Interval, Sweep, sweep};
use allot_tests::pg_cluster::PgCluster;
use allot_tests::process::{binary, free_port};
use allot_tests::proxy::{Link, Mode, Proxy};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A product under load.
#[derive(Debug, Clone, Copy)]
struct Product {
    name: &'static str,
    /// Units purchased.
    units: u64,
    /// How long a checkout outlives its last heartbeat.
    staleout_seconds: u64,
}

/// The soak's products: fewer units than the peak demand, so servers run dry, ask for instant
/// balances and get denials. Clients heartbeat several times a second; a checkout stales out
/// only when its client is gone for far longer than any fault lasts.
const SOAK_PRODUCTS: [Product; 2] = [
    Product {
        name: "cad",
        units: 12,
        staleout_seconds: 120,
    },
    Product {
        name: "sim",
        units: 6,
        staleout_seconds: 120,
    },
];
/// The seeded runs' products: few units, so the estate is at capacity nearly all the time; one
/// stales out within the longer SIGSTOPs, so units are freed by staleout and granted again.
const SEEDED_PRODUCTS: [Product; 2] = [
    Product {
        name: "cad",
        units: 5,
        staleout_seconds: 120,
    },
    Product {
        name: "eda",
        units: 3,
        staleout_seconds: 2,
    },
];
/// Metering servers; in the soak the last one sits behind the switchable link.
const METERS: [&str; 3] = ["paris", "tokyo", "austin"];
/// Client tasks per (server, product).
const CLIENTS: usize = 2;
/// The balancers' timeout on each call to a server: short, so partitions are noticed quickly.
const CALL_TIMEOUT_MS: u64 = 1000;
/// The shortest time a network fault or a soak's SIGSTOP lasts: long enough for instant
/// balances, syncs and runs to run into it.
const FAULT_HOLD: Duration = Duration::from_secs(3);
/// The longest a recovery may take before the test calls it a failure (a loaded 2-core CI box).
const SETTLE: Duration = Duration::from_secs(60);
/// What a client's lease is shortened by: the server's clock is the wall clock in whole
/// milliseconds, the client's a monotonic one.
const STALEOUT_MARGIN: Duration = Duration::from_millis(100);
/// At most how long a seeded run waits, before its first fault, for the load to fill the estate
/// (it goes on regardless: this is a start, not a check).
const WARM_UP: Duration = Duration::from_secs(10);

/// The checkpoint after the load has stopped: not a fault, no recovery time.
const END: &str = "end";

/// How many rounds of faults to run.
enum Length {
    Rounds(u64),
    Seconds(Duration),
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name}={v:?}")))
}

impl Length {
    fn from_env() -> Self {
        if let Some(seconds) = env_u64("ALLOT_SOAK_SECONDS") {
            Self::Seconds(Duration::from_secs(seconds))
        } else {
            Self::Rounds(env_u64("ALLOT_SOAK_ROUNDS").unwrap_or(1))
        }
    }

    fn another(&self, done: u64, started: Instant) -> bool {
        match self {
            Self::Rounds(n) => done < *n,
            Self::Seconds(limit) => done == 0 || started.elapsed() < *limit,
        }
    }
}

/// The first seed: `ALLOT_FAULT_SEED`, default 1.
fn first_seed() -> u64 {
    env_u64("ALLOT_FAULT_SEED").unwrap_or(1)
}

/// The seeds a seeded test runs: `ALLOT_FAULT_SEEDS` (default 3) of them from the first.
fn seeds() -> std::ops::Range<u64> {
    let first = first_seed();
    first..first + env_u64("ALLOT_FAULT_SEEDS").unwrap_or(3)
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `z`.
fn mix(z: u64) -> u64 {
    let z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic draw from the seed and some coordinates.
fn draw(seed: u64, at: &[u64]) -> u64 {
    at.iter().fold(mix(seed), |h, &x| mix(h ^ x))
}

/// A seeded stream of draws, for the fault plan.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = mix(self.0);
        self.0 % n.max(1)
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
    /// How long each network fault or SIGSTOP lasted (at least its hold, until a run met it).
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
    /// Checkouts refused by their server after their lease ran out: staled out, not lost.
    staleouts: AtomicU64,
    balance_runs: AtomicU64,
}

/// A checkout a client holds, as its ledger knows it.
struct Holding {
    meter: usize,
    /// Index into [`Shared::products`].
    product: usize,
    units: u64,
    /// When the grant's answer arrived.
    start: Instant,
    /// When the last checkout or heartbeat answered with success was sent: the server holds
    /// the checkout at least a staleout after it.
    lease: Instant,
}

/// What the whole test shares.
struct Shared {
    /// The seed the demand is drawn from.
    seed: u64,
    /// The products under load.
    products: Vec<Product>,
    /// Client ticks (about 200 ms each) between changes of a population's demand.
    phase_ticks: u64,
    /// The most ticks a client keeps a checkout (it keeps each from 1 to this many, drawn
    /// from the seed), so units change hands all the time, within servers and across them.
    keep_ticks: u64,
    /// Time zero of the ledger.
    epoch: Instant,
    tally: Mutex<Tally>,
    ops: Ops,
    /// Every checkout acknowledged and not yet being checked in: handle → holding. A handle
    /// leaves this map *before* its checkin is sent, so a handle in it must be live on its
    /// server until its lease runs out.
    live: Mutex<HashMap<String, Holding>>,
    /// Per product, the intervals clients held units over (see the module's comment).
    ledger: Mutex<Vec<Vec<Interval>>>,
    stop: AtomicBool,
    http: reqwest::Client,
    /// Each metering server's URL and token, fixed for the run (restarts reuse ports).
    meters: Vec<(String, String)>,
    /// Every balancer's URL.
    balancers: Vec<String>,
}

impl Shared {
    fn new(
        seed: u64,
        products: &[Product],
        (phase_ticks, keep_ticks): (u64, u64),
        meters: &[Meter],
        balancers: Vec<String>,
    ) -> Self {
        Self {
            seed,
            products: products.to_vec(),
            phase_ticks,
            keep_ticks,
            epoch: Instant::now(),
            tally: Mutex::default(),
            ops: Ops::default(),
            live: Mutex::default(),
            ledger: Mutex::new(vec![Vec::new(); products.len()]),
            stop: AtomicBool::new(false),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
            meters: meters.iter().map(|m| (m.url(), m.token.clone())).collect(),
            balancers,
        }
    }

    fn violated(&self, what: String) {
        self.tally.lock().expect("tally").violated(what);
    }

    fn passed(&self, check: &'static str) {
        self.tally.lock().expect("tally").passed(check);
    }

    fn is_live(&self, handle: &str) -> bool {
        self.live.lock().expect("live").contains_key(handle)
    }

    /// When a holding's lease runs out: from then on its server may stale it out.
    fn lease_expiry(&self, holding: &Holding) -> Instant {
        let staleout = Duration::from_secs(self.products[holding.product].staleout_seconds);
        holding.lease + staleout.saturating_sub(STALEOUT_MARGIN)
    }

    /// A live handle's lease expiry; `None` once the handle has ended.
    fn lease_of(&self, handle: &str) -> Option<Instant> {
        let live = self.live.lock().expect("live");
        live.get(handle).map(|h| self.lease_expiry(h))
    }

    /// Ends a holding: the client stops believing it holds `handle` at `at` (or at its lease's
    /// expiry, if earlier), and the interval goes into the ledger. Ending an ended handle does
    /// nothing.
    fn end_holding(&self, handle: &str, at: Instant, how: &str) {
        let Some(holding) = self.live.lock().expect("live").remove(handle) else {
            return;
        };
        let end = at.min(self.lease_expiry(&holding));
        let interval = Interval {
            holder: format!(
                "{handle} on {} (lease sent at {:?}; {how})",
                METERS[holding.meter],
                holding.lease.saturating_duration_since(self.epoch)
            ),
            units: holding.units,
            start: holding.start.saturating_duration_since(self.epoch),
            end: end.saturating_duration_since(self.epoch),
        };
        self.ledger.lock().expect("ledger")[holding.product].push(interval);
    }

    /// Units of `product` clients hold now.
    fn held_now(&self, product: usize) -> u64 {
        let live = self.live.lock().expect("live");
        live.values()
            .filter(|h| h.product == product)
            .map(|h| h.units)
            .sum()
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

    define_products(&fleet, &SOAK_PRODUCTS).await;
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
    spread_products(&fleet, &SOAK_PRODUCTS).await;

    let Fleet {
        balancer,
        mut meters,
        backend: _backend,
        ..
    } = fleet;
    let mut balancers = [balancer, standby];
    let seed = first_seed();
    eprintln!("soak: demand from seed {seed} (ALLOT_FAULT_SEED)");
    let urls = balancers.iter().map(|b| b.url().to_owned()).collect();
    // Demand shifts every 20 client ticks (~4 s); a checkout is kept 1 to 15 ticks.
    let shared = Arc::new(Shared::new(seed, &SOAK_PRODUCTS, (20, 15), &meters, urls));
    let mut load = start_load(&shared);
    let setup = started.elapsed();

    let mut rounds = 0;
    while length.another(rounds, started) {
        rounds += 1;
        kill_leader(&shared, &mut balancers).await;
        kill_meter(&shared, &mut meters[(rounds as usize - 1) % METERS.len()]).await;
        let paused = &meters[rounds as usize % METERS.len()];
        pause_meter(&shared, paused, FAULT_HOLD, "pause_meter").await;
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

    finish(&shared, &mut load).await;
    report(&shared, rounds, setup, started.elapsed());
    assert_clean(&shared, "the soak");
}

/// Kill -9 of the balancer on SQLite and on PostgreSQL, kill -9 and SIGSTOP of metering
/// servers, in a seeded order, under a load at capacity; the clients' ledger never holds more
/// than was purchased. Each seed is a fresh estate.
async fn seeded_runs(store: &str) {
    for seed in seeds() {
        let backend = if store == "postgres" {
            match Backend::postgres("faults_seeded").await {
                Some(backend) => backend,
                None => return,
            }
        } else {
            Backend::sqlite()
        };
        seeded_run(backend, store, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_never_hold_more_than_purchased_sqlite() {
    seeded_runs("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_never_hold_more_than_purchased_postgres() {
    seeded_runs("postgres").await;
}

/// The faults a seeded run injects, once each, in an order drawn from the seed.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillBalancer,
    KillMeter,
    PauseMeter,
    /// SIGSTOP of a server, and kill -9 of the balancer while it is stopped.
    PauseMeterKillBalancer,
}

async fn seeded_run(backend: Backend, store: &str, seed: u64) {
    let started = Instant::now();
    let timeout = CALL_TIMEOUT_MS.to_string();
    let flags = ["--call-timeout-ms", timeout.as_str()];
    let mut fleet = Fleet::start(backend, &flags, &[]).await;
    define_products(&fleet, &SEEDED_PRODUCTS).await;
    for name in METERS {
        fleet.add_meter(name).await;
    }
    spread_products(&fleet, &SEEDED_PRODUCTS).await;
    let Fleet {
        mut balancer,
        mut meters,
        backend: _backend,
        ..
    } = fleet;
    eprintln!("\n=== {store}, seed {seed} (ALLOT_FAULT_SEED={seed} ALLOT_FAULT_SEEDS=1) ===");
    let urls = vec![balancer.url().to_owned()];
    // Demand shifts every 10 client ticks (~2 s); a checkout is kept 1 to 8 ticks.
    let shared = Arc::new(Shared::new(seed, &SEEDED_PRODUCTS, (10, 8), &meters, urls));
    let mut load = start_load(&shared);
    let setup = started.elapsed();
    // Start the faults once the estate is full, so they strike at capacity.
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP
        && !(0..shared.products.len()).all(|p| shared.held_now(p) >= shared.products[p].units)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("estate full after {:?}", warm.elapsed());

    let mut rng = Rng(mix(seed ^ 0xfa17));
    let mut plan = vec![
        Fault::KillBalancer,
        Fault::KillMeter,
        Fault::PauseMeter,
        Fault::PauseMeterKillBalancer,
    ];
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for fault in plan {
        let meter = rng.below(METERS.len() as u64) as usize;
        // From well inside to well beyond the short staleout.
        let hold = Duration::from_millis(500 + rng.below(3500));
        match fault {
            Fault::KillBalancer => {
                balancer.kill9();
                balancer.restart().await;
                let recovered = Instant::now();
                count_fault(&shared, "kill_balancer");
                eprintln!("fault: kill -9 of the balancer");
                checkpoint(&shared, "kill_balancer", recovered).await;
            }
            Fault::KillMeter => kill_meter(&shared, &mut meters[meter]).await,
            Fault::PauseMeter => pause_meter(&shared, &meters[meter], hold, "pause_meter").await,
            Fault::PauseMeterKillBalancer => {
                const KIND: &str = "pause_meter+kill_balancer";
                meters[meter].pause();
                let paused = Instant::now();
                balancer.kill9();
                balancer.restart().await;
                hold_until_met(&shared, KIND, hold.saturating_sub(paused.elapsed())).await;
                meters[meter].resume();
                let recovered = Instant::now();
                count_fault(&shared, KIND);
                shared
                    .tally
                    .lock()
                    .expect("tally")
                    .cuts
                    .push(paused.elapsed());
                eprintln!(
                    "fault: SIGSTOP of {} for {:?}, kill -9 of the balancer meanwhile",
                    METERS[meter],
                    paused.elapsed()
                );
                checkpoint(&shared, KIND, recovered).await;
            }
        }
    }
    finish(&shared, &mut load).await;
    report(&shared, 1, setup, started.elapsed());
    assert_clean(&shared, &format!("{store}, seed {seed}"));
}

/// Defines the products with a one-second heartbeat and their staleouts, and buys their units.
async fn define_products(fleet: &Fleet, products: &[Product]) {
    for p in products {
        fleet
            .api()
            .post(
                "/v1/products",
                json!({"name": p.name, "heartbeat_seconds": 1,
                    "staleout_seconds": p.staleout_seconds}),
            )
            .await;
        fleet
            .api()
            .post(
                &format!("/v1/products/{}/entitlements", p.name),
                json!({"units": p.units}),
            )
            .await;
    }
}

/// Once every server knows the products: no min, a buffer of one, and a first balance.
async fn spread_products(fleet: &Fleet, products: &[Product]) {
    for p in products {
        fleet.wait_synced(p.name).await;
        for name in METERS {
            fleet.limits(name, p.name, 0, 1).await;
        }
    }
    fleet.balance().await;
}

/// The client populations, the balance runs and the sampler.
fn start_load(shared: &Arc<Shared>) -> tokio::task::JoinSet<()> {
    let mut load = tokio::task::JoinSet::new();
    for meter in 0..METERS.len() {
        for product in 0..shared.products.len() {
            for client in 0..CLIENTS {
                load.spawn(client_loop(shared.clone(), meter, product, client));
            }
        }
    }
    load.spawn(balance_loop(shared.clone()));
    load.spawn(sampler(shared.clone()));
    load
}

/// Stops the load, checks every checkout still held is live, closes the ledger and sweeps it.
async fn finish(shared: &Shared, load: &mut tokio::task::JoinSet<()>) {
    shared.stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    // The load has stopped with checkouts still held: the last check sees them all live.
    checkpoint(shared, END, Instant::now()).await;
    // The clients give up what they still hold now (each until its lease, at the latest).
    let now = Instant::now();
    let handles: Vec<String> = shared.live.lock().expect("live").keys().cloned().collect();
    for handle in handles {
        shared.end_holding(&handle, now, "held at the end");
    }
    sweep_ledger(shared);
}

/// The over-grant check on the clients' ledger: per product, the most units held at once
/// never exceeds what was purchased.
fn sweep_ledger(shared: &Shared) {
    let ledger = shared.ledger.lock().expect("ledger");
    for (p, intervals) in shared.products.iter().zip(ledger.iter()) {
        let found = sweep(intervals, p.units);
        if found.excesses.is_empty() {
            shared.passed("ledger_within_purchased");
        }
        for excess in &found.excesses {
            shared.violated(format!(
                "over-grant of {}: clients held {} > purchased {}; {excess}",
                p.name, excess.held, p.units
            ));
        }
        if found.peak < p.units {
            shared.violated(format!(
                "the load never drove {} to capacity (peak {} of {} held at once): the \
                 over-grant check proves little",
                p.name, found.peak, p.units
            ));
        }
        report_sweep(shared, p, intervals.len(), &found);
    }
}

fn report_sweep(shared: &Shared, p: &Product, holdings: usize, found: &Sweep) {
    eprintln!(
        "ledger {}: {holdings} holdings, peak {} of {} purchased at {:?}, at capacity {:?} of \
         {:?}",
        p.name,
        found.peak,
        p.units,
        found.peak_at,
        found.at_capacity,
        shared.epoch.elapsed()
    );
}

/// Fails the test with every violation recorded, naming the run.
fn assert_clean(shared: &Shared, run: &str) {
    let tally = shared.tally.lock().expect("tally");
    assert!(
        tally.violations.is_empty(),
        "{run}: {} invariant violations: {:#?}",
        tally.violations.len(),
        tally.violations
    );
    assert!(
        shared.ops.granted.load(Ordering::Relaxed) > 0,
        "{run}: the load was served nothing: the run proves nothing"
    );
}

/// SIGSTOP of a metering server for at least `hold` and until a balance run found it
/// unreachable, then SIGCONT. Its clients' requests hang meanwhile; checkouts whose lease ran
/// out stale out as it wakes.
async fn pause_meter(shared: &Shared, meter: &Meter, hold: Duration, kind: &'static str) {
    meter.pause();
    let paused = Instant::now();
    hold_until_met(shared, kind, hold).await;
    meter.resume();
    let recovered = Instant::now();
    count_fault(shared, kind);
    shared
        .tally
        .lock()
        .expect("tally")
        .cuts
        .push(paused.elapsed());
    eprintln!(
        "fault: SIGSTOP of {} for {:?}",
        meter.name,
        paused.elapsed()
    );
    checkpoint(shared, kind, recovered).await;
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
    hold_until_met(shared, KIND, FAULT_HOLD).await;
    let takeover = fail_over(shared, balancers).await;
    hold_until_met(shared, KIND, FAULT_HOLD).await;
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
    hold_until_met(shared, kind, FAULT_HOLD).await;
    link.set(Mode::Pass);
    let recovered = Instant::now();
    count_fault(shared, kind);
    shared.tally.lock().expect("tally").cuts.push(cut.elapsed());
    eprintln!("fault: link {mode:?} for {:?}", cut.elapsed());
    checkpoint(shared, kind, recovered).await;
}

/// Returns once the fault just set has lasted `hold` and a run begun after it was set has
/// found the server it cuts off unreachable, so every fault is felt by the books' side, not
/// merely switched on.
async fn hold_until_met(shared: &Shared, kind: &str, hold: Duration) {
    let cut = Instant::now();
    // Runs begun from here on talk to the server through the cut link (open connections too).
    let before = latest_run(shared).await.unwrap_or(0);
    let deadline = cut + SETTLE;
    while cut.elapsed() < hold || !met_unreachable_since(shared, before).await {
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
        .map(|(h, holding)| (h.clone(), holding.meter))
        .collect();
    for (handle, meter) in handles {
        heartbeat(shared, meter, &handle, true).await;
    }
    sample_books(shared).await;
    sample_servers(shared).await;
}

/// Heartbeats `handle`; a live handle its server no longer knows before its lease ran out is a
/// lost checkout, after it a staleout. `sure`: the server must answer (it is up); otherwise no
/// answer is merely skipped. A success renews the handle's lease from the instant it was sent.
async fn heartbeat(shared: &Shared, meter: usize, handle: &str, sure: bool) -> bool {
    let url = format!("{}/v1/heartbeat", shared.meters[meter].0);
    let sent = Instant::now();
    match shared.post(&url, &json!({"handle": handle})).await {
        Some((status, _)) if status.is_success() => {
            if let Some(holding) = shared.live.lock().expect("live").get_mut(handle) {
                holding.lease = holding.lease.max(sent);
            }
            shared.ops.heartbeats.fetch_add(1, Ordering::Relaxed);
            if sure {
                shared.passed("live_checkout_kept");
            }
            true
        }
        Some((status, body)) => {
            let arrived = Instant::now();
            match shared.lease_of(handle) {
                // Checked in meanwhile (it left the live map before its checkin went out).
                None => {}
                Some(expiry) if expiry <= arrived => {
                    shared.ops.staleouts.fetch_add(1, Ordering::Relaxed);
                    shared.end_holding(handle, arrived, "staled out");
                }
                Some(expiry) => {
                    shared.violated(format!(
                        "live checkout {handle} on {} lost {:?} before its lease ran out: \
                         heartbeat answered {status} {body}",
                        METERS[meter],
                        expiry - arrived
                    ));
                    shared.end_holding(handle, arrived, "lost");
                }
            }
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

/// How many units a population on (`meter`, `product`) wants during `phase`: drawn from the
/// seed between 0 and a maximum that puts the estate's mean demand at about twice what was
/// purchased, so it stands above capacity nearly all the time, while each server's own demand
/// swings from nothing to many times its share and units must move between servers.
fn wanted(shared: &Shared, meter: usize, product: usize, client: usize, phase: u64) -> u64 {
    let populations = (METERS.len() * CLIENTS) as u64;
    let most = (shared.products[product].units * 4).div_ceil(populations);
    let at = [meter as u64, product as u64, client as u64, phase];
    draw(shared.seed, &at) % (most + 1)
}

/// One simulated population on one server and product: its demand rises and falls, so units
/// must move between servers; it checks out (one or two units at a time), heartbeats
/// everything it holds, checks in, and keeps its ledger (see the module's comment).
async fn client_loop(shared: Arc<Shared>, meter: usize, product: usize, client: usize) {
    let base = shared.meters[meter].0.clone();
    let name = shared.products[product].name;
    // What this client holds: (handle, the tick it checks it in at, demand allowing).
    let mut held: Vec<(String, u64)> = Vec::new();
    // Checkins to send: (handle, whether an earlier attempt went unanswered, its lease's
    // expiry). A retry may find the handle gone (its first attempt was applied); a first
    // attempt must find it live unless its lease ran out.
    let mut checkins: Vec<(String, bool, Instant)> = Vec::new();
    for tick in 0u64.. {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        // Handles a checkpoint found lost or staled out are gone.
        held.retain(|(h, _)| shared.is_live(h));
        let holding: u64 = {
            let live = shared.live.lock().expect("live");
            held.iter()
                .map(|(h, _)| h)
                .filter_map(|h| live.get(h))
                .map(|h| h.units)
                .sum()
        };
        let phase = tick / shared.phase_ticks;
        let wanted = wanted(&shared, meter, product, client, phase);
        if holding < wanted {
            let dice = draw(
                shared.seed,
                &[meter as u64, product as u64, client as u64, tick],
            );
            let units = if wanted - holding >= 2 && dice.is_multiple_of(3) {
                2
            } else {
                1
            };
            let user = format!("{}-{name}-{client}-{tick}", METERS[meter]);
            let body = json!({"product": name, "user": user, "host": "h", "units": units});
            let sent = Instant::now();
            match shared.post(&format!("{base}/v1/checkout"), &body).await {
                Some((status, body)) if status.is_success() => {
                    let arrived = Instant::now();
                    let handle = body["handle"].as_str().expect("a handle").to_owned();
                    let granted = body["units"].as_u64().unwrap_or(units);
                    if granted != units {
                        shared.violated(format!(
                            "checkout of {units} unit(s) of {name} on {} granted {granted}",
                            METERS[meter]
                        ));
                    }
                    let holding = Holding {
                        meter,
                        product,
                        units: granted.max(units),
                        start: arrived,
                        lease: sent,
                    };
                    shared
                        .live
                        .lock()
                        .expect("live")
                        .insert(handle.clone(), holding);
                    shared.ops.granted.fetch_add(1, Ordering::Relaxed);
                    held.push((handle, tick + 1 + (dice >> 8) % shared.keep_ticks));
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
        }
        // Check in what was kept long enough, or the oldest when more is held than wanted.
        let due = held.iter().position(|&(_, at)| at <= tick);
        let due = due.or((holding > wanted && !held.is_empty()).then_some(0));
        if let Some(i) = due {
            let (handle, _) = held.remove(i);
            if let Some(expiry) = shared.lease_of(&handle) {
                // The client stops using the units before it sends the checkin.
                shared.end_holding(&handle, Instant::now(), "checked in");
                checkins.push((handle, false, expiry));
            }
        }
        let mut unanswered = Vec::new();
        for (handle, retry, expiry) in checkins.drain(..) {
            match shared
                .post(&format!("{base}/v1/checkin"), &json!({"handle": handle}))
                .await
            {
                Some((status, _)) if status.is_success() => {
                    shared.ops.checkins.fetch_add(1, Ordering::Relaxed);
                }
                Some((status, _)) if retry && status == StatusCode::NOT_FOUND => {}
                Some((status, _))
                    if status == StatusCode::NOT_FOUND && expiry <= Instant::now() =>
                {
                    shared.ops.staleouts.fetch_add(1, Ordering::Relaxed);
                }
                Some((status, body)) => shared.violated(format!(
                    "checkin of live checkout {handle} on {} answered {status} {body}",
                    METERS[meter]
                )),
                None => unanswered.push((handle, true, expiry)),
            }
        }
        checkins = unanswered;
        for (handle, _) in &held {
            heartbeat(&shared, meter, handle, false).await;
        }
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
    for &Product {
        name: product,
        units: purchased,
        ..
    } in &shared.products
    {
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
    for &Product {
        name: product,
        units: purchased,
        ..
    } in &shared.products
    {
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
         checkout attempts denied {}, in doubt {}; staleouts met by clients {}; manual \
         balance runs {}",
        n(&ops.granted),
        n(&ops.heartbeats),
        n(&ops.checkins),
        n(&ops.denied),
        n(&ops.in_doubt),
        n(&ops.staleouts),
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
    eprintln!("network fault or SIGSTOP length: {}", spread(&tally.cuts));
    eprintln!("violations: {}", tally.violations.len());
}

/// Mean and max of some durations, in milliseconds.
fn spread(times: &[Duration]) -> String {
    let max = times.iter().max().map_or(0, Duration::as_millis);
    let mean = times.iter().map(Duration::as_millis).sum::<u128>() / times.len().max(1) as u128;
    format!("mean {mean} ms, max {max} ms over {}", times.len())
}
