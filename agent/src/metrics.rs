//! Prometheus metrics of the metering server (`GET /metrics`).
//!
//! Names follow DESIGN.md: prefix `allot_agent_`, base units, `_total` for counters. Labels are
//! bounded: `product` only for products the operator defined (never a name a client sent that
//! matched nothing), `reason` from a fixed set; never a user, host or handle.

use allot_core::wire::agent::AgentProduct;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Why a checkout was refused, as a metric label.
#[derive(Debug, Clone, Copy)]
pub enum DenialReason {
    /// Hard stop, nothing free.
    Unavailable,
    /// Waited and timed out.
    Timeout,
    /// Refused by the ACL.
    Forbidden,
    /// A server cap (live checkouts, waiting clients) was reached.
    Limit,
}

impl DenialReason {
    fn as_str(self) -> &'static str {
        match self {
            DenialReason::Unavailable => "unavailable",
            DenialReason::Timeout => "timeout",
            DenialReason::Forbidden => "forbidden",
            DenialReason::Limit => "limit",
        }
    }
}

/// The server's metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    checkouts: IntCounterVec,
    denials: IntCounterVec,
    overdrafts: IntCounterVec,
    staleouts: IntCounterVec,
    checkins: IntCounterVec,
    heartbeats: IntCounter,
    waiting: IntGaugeVec,
    allocation: IntGaugeVec,
    in_use: IntGaugeVec,
    live: IntGauge,
    checkout_seconds: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &["product"]).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family in a fresh registry (one per server, so tests do not share).
    pub fn new() -> Self {
        let r = Registry::new();
        let heartbeats = IntCounter::new("allot_agent_heartbeats_total", "Heartbeats accepted.")
            .expect("valid metric");
        r.register(Box::new(heartbeats.clone()))
            .expect("unique metric");
        let live = IntGauge::new("allot_agent_live_checkouts", "Live checkouts (handles).")
            .expect("valid metric");
        r.register(Box::new(live.clone())).expect("unique metric");
        let checkout_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "allot_agent_checkout_duration_seconds",
                "Server time of granted checkouts, durable write included.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(checkout_seconds.clone()))
            .expect("unique metric");
        Metrics {
            checkouts: counter(
                &r,
                "allot_agent_checkouts_total",
                "Checkouts granted.",
                &["product"],
            ),
            denials: counter(
                &r,
                "allot_agent_denials_total",
                "Checkouts refused, by reason.",
                &["product", "reason"],
            ),
            overdrafts: counter(
                &r,
                "allot_agent_overdrafts_total",
                "Checkouts granted beyond the allocation (soft stop).",
                &["product"],
            ),
            staleouts: counter(
                &r,
                "allot_agent_staleouts_total",
                "Checkouts released for lack of heartbeats.",
                &["product"],
            ),
            checkins: counter(&r, "allot_agent_checkins_total", "Checkins.", &["product"]),
            waiting: gauge(
                &r,
                "allot_agent_waiting_clients",
                "Clients waiting in the queue.",
            ),
            allocation: gauge(
                &r,
                "allot_agent_allocation_units",
                "Units held by this server.",
            ),
            in_use: gauge(&r, "allot_agent_in_use_units", "Units checked out now."),
            heartbeats,
            live,
            checkout_seconds,
            registry: r,
        }
    }

    /// Counts a granted checkout and its server time.
    pub fn checkout(&self, product: &str, overdraft: bool, seconds: f64) {
        self.checkouts.with_label_values(&[product]).inc();
        if overdraft {
            self.overdrafts.with_label_values(&[product]).inc();
        }
        self.checkout_seconds.observe(seconds);
    }

    /// Counts a refused checkout of a defined product.
    pub fn denial(&self, product: &str, reason: DenialReason) {
        self.denials
            .with_label_values(&[product, reason.as_str()])
            .inc();
    }

    /// Counts a staleout.
    pub fn staleout(&self, product: &str) {
        self.staleouts.with_label_values(&[product]).inc();
    }

    /// Counts a checkin.
    pub fn checkin(&self, product: &str) {
        self.checkins.with_label_values(&[product]).inc();
    }

    /// Counts a heartbeat.
    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Renders the text exposition, with the gauges set from the current figures.
    pub fn render(&self, products: &[AgentProduct], live: usize) -> String {
        for p in products {
            let l = [p.product.as_str()];
            self.waiting.with_label_values(&l).set(i64::from(p.waiting));
            self.allocation
                .with_label_values(&l)
                .set(i64::from(p.allocated));
            self.in_use.with_label_values(&l).set(i64::from(p.in_use));
        }
        self.live.set(i64::try_from(live).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
