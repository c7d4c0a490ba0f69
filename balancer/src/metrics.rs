//! Prometheus metrics of the balancer, served on `GET /metrics`.
//!
//! Counters and histograms are updated where things happen (runs, moves, instant balances);
//! the books' gauges are read from the store at scrape time, so they are never stale and cost
//! nothing between scrapes. Labels stay bounded: product, server (operators cap their number),
//! trigger, kind, outcome — never a user, host or handle.

use crate::store::Store;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

/// Every metric of the balancer, registered once.
pub struct Metrics {
    registry: Registry,
    /// Balance runs by trigger and status.
    pub runs: IntCounterVec,
    /// Duration of balance runs by trigger.
    pub run_seconds: HistogramVec,
    /// Moves applied by kind.
    pub moves: IntCounterVec,
    /// Units moved by kind.
    pub units_moved: IntCounterVec,
    /// Instant-balance requests by outcome (`granted`, `short`, `none`, `failed`).
    pub instant_requests: IntCounterVec,
    /// Time to answer an instant-balance request.
    pub instant_seconds: Histogram,
    /// Servers unreachable in the latest run.
    pub unreachable: IntGauge,
    /// Discrepancies found by reconciliation.
    pub discrepancies: IntCounter,
    books: IntGaugeVec,
    allocation: IntGaugeVec,
    servers: IntGaugeVec,
    leader: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("unique counter");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("unique gauge");
    g
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("unique histogram");
    h
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        runs: counter(
            &r,
            "allot_balance_runs_total",
            "Balance runs by trigger and status.",
            &["trigger", "status"],
        ),
        run_seconds: histogram(
            &r,
            "allot_balance_run_duration_seconds",
            "Duration of balance runs.",
            &["trigger"],
            vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
        ),
        moves: counter(
            &r,
            "allot_moves_total",
            "Moves applied, by kind.",
            &["kind"],
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
            "Instant-balance requests by outcome.",
            &["outcome"],
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
        books: gauge(
            &r,
            "allot_units",
            "The books per product: purchased, reserve, in_transit, allocated.",
            &["product", "pool"],
        ),
        allocation: gauge(
            &r,
            "allot_allocation_units",
            "Units allocated per server and product.",
            &["server", "product"],
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
                "1 while this balancer leads (runs balances).",
            )
            .expect("valid gauge"),
        ),
        registry: r,
    }
});

/// Renders every metric in Prometheus's text format, reading the books' gauges from `store`.
pub async fn render(store: &dyn Store) -> Result<String, crate::store::StoreError> {
    let m = &*METRICS;
    m.books.reset();
    for p in store.products().await? {
        for (pool, value) in [
            ("purchased", p.purchased),
            ("reserve", p.reserve),
            ("in_transit", p.in_transit),
            ("allocated", p.allocated),
        ] {
            m.books
                .with_label_values(&[p.name.as_str(), pool])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
    m.allocation.reset();
    for c in store.cells().await? {
        m.allocation
            .with_label_values(&[c.server.as_str(), c.product.as_str()])
            .set(i64::try_from(c.units).unwrap_or(i64::MAX));
    }
    m.servers.reset();
    for s in store.server_records().await? {
        m.servers.with_label_values(&[s.state.as_str()]).inc();
    }
    m.leader.set(1);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&m.registry.gather(), &mut out)
        .expect("text encoding never fails");
    Ok(String::from_utf8(out).unwrap_or_default())
}
