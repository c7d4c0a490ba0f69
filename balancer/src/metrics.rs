//! Prometheus metrics of the balancer, served on `GET /metrics`.
//!
//! Counters and histograms are updated where things happen: a balance run and an instant
//! balance each carry a tally ([`RunTally`], [`InstantTally`]) that counts them as `failed` if
//! they end early with an error; every booked move is counted by [`Metrics::moved`]; every
//! database error through the hook the service gives the store
//! ([`crate::store::ErrorReporting`]). The books' gauges are read from the
//! store at scrape time, so they are never stale, cost nothing between scrapes, and every
//! balancer sharing the books reports the same figures.
//!
//! Labels stay bounded: product, server (operators cap their number, and the per-(server,
//! product) series stop at [`Metrics::set_max_cells`]), trigger, kind, status, outcome, state —
//! never a user, host or handle. Every label value known in advance is exported at zero from
//! the first scrape, so `rate()` and `increase()` see the first event.
//!
//! Each balancer has its own [`Metrics`] (made by the service, shared by the engine and the
//! API through their state), so tests read their own counters; nothing is process-wide.
//!
//! The full list, with each metric's meaning, is in `docs/OPERATIONS.md`.

use crate::store::{MoveRecord, Store};
use allot_core::ErrorCode;
use allot_core::domain::{MoveKind, RunTrigger, ServerState};
use chrono::Utc;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::DEFAULT_METRICS_MAX_CELLS as DEFAULT_MAX_CELLS;

/// The run statuses a run can end with (`ok`, `partial` from the engine; `failed` when it
/// returned an error before finishing).
const RUN_STATUSES: [&str; 3] = ["ok", "partial", "failed"];
/// The triggers that go through [`RunTally`] (instant balances have their own family).
const RUN_TRIGGERS: [RunTrigger; 2] = [RunTrigger::Scheduled, RunTrigger::Manual];
/// How an instant-balance request ended.
const INSTANT_OUTCOMES: [&str; 4] = ["granted", "short", "none", "failed"];
/// Why a request was refused for its credentials: the only values of `reason` on
/// `allot_requests_refused_total`.
pub const REFUSAL_REASONS: [ErrorCode; 2] = [ErrorCode::Unauthorized, ErrorCode::Forbidden];
/// On the first scrape, in-use figures are seeded from the usage samples of this long ago.
const USAGE_SEED: Duration = Duration::from_secs(24 * 3600);
/// Later scrapes reread samples from this long before the previous scrape, so a sample whose
/// transaction committed just after that scrape read is not missed.
const USAGE_OVERLAP_MS: i64 = 120_000;

/// Every metric of the balancer, registered once.
pub struct Metrics {
    registry: Registry,
    /// Balance runs by trigger and status (`ok`, `partial`, `failed`).
    pub runs: IntCounterVec,
    /// Duration of balance runs by trigger.
    pub run_seconds: HistogramVec,
    /// Moves booked, by kind.
    pub moves: IntCounterVec,
    /// Units moved, by kind.
    pub units_moved: IntCounterVec,
    /// Instant-balance requests by outcome (`granted`, `short`, `none`, `failed`).
    pub instant_requests: IntCounterVec,
    /// Units granted by instant balances: what requests alone cannot tell (a `short` grant).
    pub instant_granted_units: IntCounter,
    /// Time to answer an instant-balance request.
    pub instant_seconds: Histogram,
    /// Servers unreachable in the latest run.
    pub unreachable: IntGauge,
    /// Discrepancies found by reconciliation.
    pub discrepancies: IntCounter,
    /// Database errors met by the store: a failing database shows here before anywhere else.
    pub store_errors: IntCounter,
    /// Units waiting clients asked for that an instant balance could not serve, by product and
    /// kind: `true` when no unit was free anywhere the balancer could see (only buying helps),
    /// `false` when units sat free in the reserve or above another server's need (the
    /// balancer's fault: the denial the policy exists to prevent).
    pub unserved_units: IntCounterVec,
    /// Units granted to a server that had released units of the same product within the hour
    /// (ping-pong), by product.
    pub ping_pong_units: IntCounterVec,
    /// Checkouts the servers reported at balance runs, by product: the denominator of units
    /// moved per checkout.
    pub checkouts: IntCounterVec,
    /// Requests refused for their credentials, by reason (`unauthorized`, `forbidden`): a
    /// rising count is someone probing, or a server still presenting a rotated-out token.
    pub requests_refused: IntCounterVec,
    books: IntGaugeVec,
    expires_at: IntGaugeVec,
    expired_units: IntGaugeVec,
    in_use: IntGaugeVec,
    allocation: IntGaugeVec,
    server_in_use: IntGaugeVec,
    unreachable_runs: IntGaugeVec,
    cells_omitted: IntGauge,
    servers: IntGaugeVec,
    leader: IntGauge,
    shards_led: IntGauge,
    shards: IntGauge,
    state: Mutex<ScrapeState>,
}

/// What the metrics remember between runs and scrapes.
struct ScrapeState {
    /// The cap on per-(server, product) series.
    max_cells: usize,
    /// Consecutive runs each server has been unreachable (0 once it answers).
    unreachable_runs: BTreeMap<String, u64>,
    /// The newest usage sample per (server, product): (taken at, units in use).
    usage: BTreeMap<(String, String), (i64, u64)>,
    /// Samples up to this time (ms) have been read; `None` before the first scrape.
    usage_read_to: Option<i64>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
    )
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in a registry of its own: one per balancer (the service makes
    /// it and hands it to the engine and the API), so two balancers in one process, or two
    /// tests, never count into each other.
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            runs: counter(
                &r,
                "allot_balance_runs_total",
                "Balance runs by trigger and status (ok, partial, failed).",
                &["trigger", "status"],
            ),
            run_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "allot_balance_run_duration_seconds",
                        "Duration of balance runs.",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
                    &["trigger"],
                )
                .expect("valid histogram"),
            ),
            moves: counter(&r, "allot_moves_total", "Moves booked, by kind.", &["kind"]),
            unserved_units: counter(
                &r,
                "allot_unserved_units_total",
                "Units waiting clients asked for that an instant balance could not serve: \
             kind=true when no unit was free anywhere, kind=false when one was.",
                &["product", "kind"],
            ),
            ping_pong_units: counter(
                &r,
                "allot_ping_pong_units_total",
                "Units granted to a server that released units of the product within the hour.",
                &["product"],
            ),
            checkouts: counter(
                &r,
                "allot_checkouts_total",
                "Checkouts the metering servers reported at balance runs.",
                &["product"],
            ),
            units_moved: counter(
                &r,
                "allot_units_moved_total",
                "Units moved, by kind.",
                &["kind"],
            ),
            instant_requests: counter(
                &r,
                "allot_instant_balance_requests_total",
                "Instant-balance requests by outcome (granted, short, none, failed).",
                &["outcome"],
            ),
            instant_granted_units: register(
                &r,
                IntCounter::new(
                    "allot_instant_balance_granted_units_total",
                    "Units granted by instant balances.",
                )
                .expect("valid counter"),
            ),
            instant_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "allot_instant_balance_duration_seconds",
                        "Time to answer an instant-balance request.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                    ]),
                )
                .expect("valid histogram"),
            ),
            unreachable: register(
                &r,
                IntGauge::new(
                    "allot_unreachable_servers",
                    "Servers unreachable in the latest run.",
                )
                .expect("valid gauge"),
            ),
            discrepancies: register(
                &r,
                IntCounter::new(
                    "allot_reconciliation_discrepancies_total",
                    "Disagreements between the books and a server found by reconciliation.",
                )
                .expect("valid counter"),
            ),
            store_errors: register(
                &r,
                IntCounter::new(
                    "allot_store_errors_total",
                    "Database errors met by the store (constraint refusals are not errors).",
                )
                .expect("valid counter"),
            ),
            books: gauge(
                &r,
                "allot_units",
                "The books per product: purchased, reserve, in_transit, allocated.",
                &["product", "pool"],
            ),
            expires_at: gauge(
                &r,
                "allot_entitlement_expiry_timestamp_seconds",
                "When each entitlement with an expiry stops counting (Unix seconds); permanent \
                 entitlements have no series.",
                &["product", "entitlement"],
            ),
            expired_units: gauge(
                &r,
                "allot_entitlement_expired_units",
                "Units of expired entitlements still held by servers (in use), per product: \
                 they leave purchased as they are checked in.",
                &["product"],
            ),
            in_use: gauge(
                &r,
                "allot_in_use_units",
                "Units in use per product, from the newest usage sample of each server.",
                &["product"],
            ),
            allocation: gauge(
                &r,
                "allot_allocation_units",
                "Units allocated per server and product.",
                &["server", "product"],
            ),
            server_in_use: gauge(
                &r,
                "allot_server_in_use_units",
                "Units in use per server and product, from the newest usage sample.",
                &["server", "product"],
            ),
            unreachable_runs: gauge(
                &r,
                "allot_server_unreachable_runs",
                "Consecutive balance runs a server has not answered (0 once it answers).",
                &["server"],
            ),
            cells_omitted: register(
                &r,
                IntGauge::new(
                    "allot_metrics_cells_omitted",
                    "Per-(server, product) series left out by --metrics-max-cells.",
                )
                .expect("valid gauge"),
            ),
            servers: gauge(
                &r,
                "allot_servers",
                "Registered metering servers by state.",
                &["state"],
            ),
            leader: register(
                &r,
                IntGauge::new(
                    "allot_leader",
                    "1 while this balancer leads at least one shard (runs balances), 0 while it follows.",
                )
                .expect("valid gauge"),
            ),
            shards_led: register(
                &r,
                IntGauge::new(
                    "allot_shards_led",
                    "Shards whose products this balancer balances.",
                )
                .expect("valid gauge"),
            ),
            shards: register(
                &r,
                IntGauge::new(
                    "allot_shards",
                    "Shards the estate's products are hashed into (the books' count).",
                )
                .expect("valid gauge"),
            ),
            requests_refused: counter(
                &r,
                "allot_requests_refused_total",
                "Requests refused for their credentials, by reason (unauthorized, forbidden).",
                &["reason"],
            ),
            registry: r,
            state: Mutex::new(ScrapeState {
                max_cells: DEFAULT_MAX_CELLS,
                unreachable_runs: BTreeMap::new(),
                usage: BTreeMap::new(),
                usage_read_to: None,
            }),
        };
        for trigger in RUN_TRIGGERS {
            for status in RUN_STATUSES {
                m.runs.with_label_values(&[trigger.as_str(), status]);
            }
            m.run_seconds.with_label_values(&[trigger.as_str()]);
        }
        for kind in [MoveKind::Release, MoveKind::Grant, MoveKind::Retire] {
            m.moves.with_label_values(&[kind.as_str()]);
            m.units_moved.with_label_values(&[kind.as_str()]);
        }
        for outcome in INSTANT_OUTCOMES {
            m.instant_requests.with_label_values(&[outcome]);
        }
        for reason in REFUSAL_REASONS {
            m.requests_refused.with_label_values(&[reason.as_str()]);
        }
        m
    }

    /// Caps the per-(server, product) series (`--metrics-max-cells`): the cells after the first
    /// `max` in (server, product) order are left out and counted in
    /// `allot_metrics_cells_omitted`, so a large estate cannot overload Prometheus.
    pub fn set_max_cells(&self, max: usize) {
        self.state.lock().expect("metrics state").max_cells = max;
    }

    /// Counts a booked move and the units the server applied.
    pub fn moved(&self, mv: &MoveRecord) {
        let kind = [mv.kind.as_str()];
        self.moves.with_label_values(&kind).inc();
        self.units_moved
            .with_label_values(&kind)
            .inc_by(mv.applied_units.unwrap_or(0));
    }

    fn run_ended(&self, trigger: RunTrigger, status: &str, elapsed: Duration) {
        self.runs
            .with_label_values(&[trigger.as_str(), status])
            .inc();
        self.run_seconds
            .with_label_values(&[trigger.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    fn instant_ended(&self, outcome: &str, granted: u64, elapsed: Duration) {
        self.instant_requests.with_label_values(&[outcome]).inc();
        self.instant_granted_units.inc_by(granted);
        self.instant_seconds.observe(elapsed.as_secs_f64());
    }
}

/// Counts one scheduled or manual balance run. [`RunTally::finish`] records how it ended;
/// dropped unfinished (the run returned an error), it counts the run as `failed`, so a failing
/// store cannot hide failing runs.
pub struct RunTally {
    metrics: Arc<Metrics>,
    trigger: RunTrigger,
    started: Instant,
    finished: bool,
}

impl RunTally {
    /// Starts timing a run, counted in `metrics`.
    pub fn start(metrics: Arc<Metrics>, trigger: RunTrigger) -> Self {
        Self {
            metrics,
            trigger,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Records a finished run: its status, which servers answered and which did not.
    pub fn finish<'a>(
        mut self,
        status: &str,
        reached: impl IntoIterator<Item = &'a String>,
        unreachable: impl IntoIterator<Item = &'a String>,
    ) {
        self.finished = true;
        let m = &*self.metrics;
        m.run_ended(self.trigger, status, self.started.elapsed());
        let mut state = m.state.lock().expect("metrics state");
        for name in reached {
            state.unreachable_runs.insert(name.clone(), 0);
        }
        let mut count = 0;
        for name in unreachable {
            *state.unreachable_runs.entry(name.clone()).or_default() += 1;
            count += 1;
        }
        m.unreachable.set(count);
    }
}

impl Drop for RunTally {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .run_ended(self.trigger, "failed", self.started.elapsed());
        }
    }
}

/// Counts one instant-balance request like [`RunTally`] counts a run: dropped unfinished, it
/// counts the request as `failed`.
pub struct InstantTally {
    metrics: Arc<Metrics>,
    started: Instant,
    finished: bool,
}

impl InstantTally {
    /// Starts timing a request, counted in `metrics`.
    pub fn start(metrics: Arc<Metrics>) -> Self {
        Self::since(metrics, Instant::now())
    }

    /// Times a request that began at `started`.
    pub fn since(metrics: Arc<Metrics>, started: Instant) -> Self {
        Self {
            metrics,
            started,
            finished: false,
        }
    }

    /// Records an answered request: `wanted` units asked, `granted` given.
    pub fn finish(mut self, wanted: u64, granted: u64) {
        self.finished = true;
        let outcome = match granted {
            _ if granted == wanted => "granted",
            0 => "none",
            _ => "short",
        };
        self.metrics
            .instant_ended(outcome, granted, self.started.elapsed());
    }
}

impl Drop for InstantTally {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .instant_ended("failed", 0, self.started.elapsed());
        }
    }
}

/// Renders every metric of `metrics` in Prometheus's text
/// format, reading the books' gauges from `store`; `fence` says which shards this balancer
/// leads now.
pub async fn render(
    metrics: &Metrics,
    store: &dyn Store,
    fence: &crate::store::Fence,
) -> Result<String, crate::store::StoreError> {
    let m = metrics;
    let products = store.products().await?;
    let mut cells = store.cells().await?;
    let servers = store.server_records().await?;
    let entitlements = store.dated_entitlements().await?;
    let shard_count = store.shard_leaders().await?.len();
    let now = Utc::now().timestamp_millis();
    let read_from = {
        let state = m.state.lock().expect("metrics state");
        state.usage_read_to.map_or(
            now - i64::try_from(USAGE_SEED.as_millis()).unwrap_or(i64::MAX),
            |t| t - USAGE_OVERLAP_MS,
        )
    };
    let samples = store.samples_between(read_from, now + 1).await?;

    let mut state = m.state.lock().expect("metrics state");
    state.usage_read_to = Some(now);
    for (at, s) in samples {
        let newest = state.usage.entry((s.server, s.product)).or_insert((at, 0));
        if at >= newest.0 {
            *newest = (at, s.in_use);
        }
    }
    // Forget cells that no longer exist, so the maps never outgrow the books.
    let live: BTreeSet<(&str, &str)> = cells
        .iter()
        .map(|c| (c.server.as_str(), c.product.as_str()))
        .collect();
    state
        .usage
        .retain(|(s, p), _| live.contains(&(s.as_str(), p.as_str())));
    let names: BTreeSet<&str> = servers.iter().map(|s| s.name.as_str()).collect();
    state
        .unreachable_runs
        .retain(|name, _| names.contains(name.as_str()));

    m.books.reset();
    m.expires_at.reset();
    m.expired_units.reset();
    for p in &products {
        m.expired_units.with_label_values(&[p.name.as_str()]).set(0);
    }
    for e in &entitlements {
        let Some(at) = e.expires_at else { continue };
        m.expires_at
            .with_label_values(&[e.product.as_str(), e.id.to_string().as_str()])
            .set(at.timestamp());
        if at.timestamp_millis() <= now
            && let Ok(g) = m
                .expired_units
                .get_metric_with_label_values(&[e.product.as_str()])
        {
            g.add(gauge_value(e.units.saturating_sub(e.retired_units)));
        }
    }
    m.in_use.reset();
    for p in &products {
        for (pool, value) in [
            ("purchased", p.purchased),
            ("reserve", p.reserve),
            ("in_transit", p.in_transit),
            ("allocated", p.allocated),
        ] {
            m.books
                .with_label_values(&[p.name.as_str(), pool])
                .set(gauge_value(value));
        }
        m.in_use.with_label_values(&[p.name.as_str()]).set(0);
    }
    m.allocation.reset();
    m.server_in_use.reset();
    cells.sort_by(|a, b| (&a.server, &a.product).cmp(&(&b.server, &b.product)));
    for (index, c) in cells.iter().enumerate() {
        let in_use = state
            .usage
            .get(&(c.server.clone(), c.product.clone()))
            .map(|&(_, units)| units);
        if let Some(units) = in_use
            && let Ok(g) = m.in_use.get_metric_with_label_values(&[c.product.as_str()])
        {
            g.add(gauge_value(units));
        }
        if index >= state.max_cells {
            continue;
        }
        let labels = [c.server.as_str(), c.product.as_str()];
        m.allocation
            .with_label_values(&labels)
            .set(gauge_value(c.units));
        if let Some(units) = in_use {
            m.server_in_use
                .with_label_values(&labels)
                .set(gauge_value(units));
        }
    }
    m.cells_omitted.set(gauge_value(
        cells.len().saturating_sub(state.max_cells) as u64
    ));

    m.servers.reset();
    for s in [
        ServerState::Active,
        ServerState::Draining,
        ServerState::Lost,
    ] {
        m.servers.with_label_values(&[s.as_str()]);
    }
    m.unreachable_runs.reset();
    for (index, s) in servers.iter().enumerate() {
        m.servers.with_label_values(&[s.state.as_str()]).inc();
        if s.state != ServerState::Lost && index < state.max_cells {
            let runs = state.unreachable_runs.get(&s.name).copied().unwrap_or(0);
            m.unreachable_runs
                .with_label_values(&[s.name.as_str()])
                .set(gauge_value(runs));
        }
    }
    drop(state);
    m.leader.set(i64::from(fence.leads_any()));
    m.shards_led
        .set(i64::try_from(fence.epochs().len()).unwrap_or(i64::MAX));
    m.shards.set(i64::try_from(shard_count).unwrap_or(i64::MAX));
    let mut out = Vec::new();
    let mut families = m.registry.gather();
    families.sort_by(|a, b| a.name().cmp(b.name()));
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("text encoding never fails");
    Ok(String::from_utf8(out).unwrap_or_default())
}

fn gauge_value(units: u64) -> i64 {
    i64::try_from(units).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_core::domain::MoveState;

    fn applied_grant(units: u64) -> MoveRecord {
        MoveRecord {
            id: uuid::Uuid::nil(),
            run_id: None,
            product: "cad".into(),
            server: "paris".into(),
            kind: MoveKind::Grant,
            units,
            state: MoveState::Applied,
            applied_units: Some(units),
            epoch: 1,
        }
    }

    #[test]
    fn two_balancers_in_one_process_count_apart() {
        let (a, b) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
        a.moved(&applied_grant(3));
        RunTally::start(a.clone(), RunTrigger::Manual).finish("ok", [], []);
        drop(InstantTally::start(b.clone()));
        let grant = [MoveKind::Grant.as_str()];
        assert_eq!(a.units_moved.with_label_values(&grant).get(), 3);
        assert_eq!(b.units_moved.with_label_values(&grant).get(), 0);
        let manual_ok = [RunTrigger::Manual.as_str(), "ok"];
        assert_eq!(a.runs.with_label_values(&manual_ok).get(), 1);
        assert_eq!(b.runs.with_label_values(&manual_ok).get(), 0);
        assert_eq!(a.instant_requests.with_label_values(&["failed"]).get(), 0);
        assert_eq!(b.instant_requests.with_label_values(&["failed"]).get(), 1);
    }
}
