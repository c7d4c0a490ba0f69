//! Prometheus metrics of the metering server (`GET /metrics`).
//!
//! Names follow DESIGN.md: prefix `allot_agent_`, base units, `_total` for counters. Labels are
//! bounded: `product` only for products the operator defined (never a name a client sent that
//! matched nothing), `reason` from a fixed set; never a user, host or handle.

use allot_core::ErrorCode;
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
    /// A limit of the product's options (FlexNet MAX) capped the user, group or host.
    PolicyLimit,
}

impl DenialReason {
    const ALL: [DenialReason; 5] = [
        DenialReason::Unavailable,
        DenialReason::Timeout,
        DenialReason::Forbidden,
        DenialReason::Limit,
        DenialReason::PolicyLimit,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DenialReason::Unavailable => "unavailable",
            DenialReason::Timeout => "timeout",
            DenialReason::Forbidden => "forbidden",
            DenialReason::Limit => "limit",
            DenialReason::PolicyLimit => "policy_limit",
        }
    }
}

/// How an instant-balance request ended, as a metric label.
#[derive(Debug, Clone, Copy)]
pub enum InstantOutcome {
    /// The balancer granted every unit asked.
    Granted,
    /// It granted fewer (possibly none): the pool is scarce.
    Short,
    /// No balancer answered.
    Failed,
}

impl InstantOutcome {
    const ALL: [InstantOutcome; 3] = [
        InstantOutcome::Granted,
        InstantOutcome::Short,
        InstantOutcome::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            InstantOutcome::Granted => "granted",
            InstantOutcome::Short => "short",
            InstantOutcome::Failed => "failed",
        }
    }
}

/// The gauges of a server that works with a balancer (absent when standalone, so a standalone
/// server never looks like one that lost its balancer).
#[derive(Debug, Clone)]
struct BalancerGauges {
    up: IntGauge,
    lease_seconds_left: IntGauge,
    /// Usage and denial records in the outbox, not yet stored by the balancer.
    records_waiting: IntGauge,
    /// Records the balancer has stored.
    records_shipped: IntCounter,
}

/// The server's metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    checkouts: IntCounterVec,
    denials: IntCounterVec,
    lease_refusals: IntCounterVec,
    overdrafts: IntCounterVec,
    staleouts: IntCounterVec,
    checkins: IntCounterVec,
    /// Checkouts force-released by an operator (never labelled by user, host or handle).
    revocations: IntCounterVec,
    callbacks_ready: IntCounterVec,
    heartbeats: IntCounter,
    waiting: IntGaugeVec,
    allocation: IntGaugeVec,
    in_use: IntGaugeVec,
    live: IntGauge,
    checkout_seconds: Histogram,
    instant_requests: IntCounterVec,
    requests_refused: IntCounterVec,
    balancer: Option<BalancerGauges>,
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
        Self::with_balancer(false)
    }

    /// Like [`Metrics::new`], plus `allot_agent_balancer_up` and
    /// `allot_agent_lease_seconds_left` when the server works with a balancer.
    pub fn with_balancer(balanced: bool) -> Self {
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
        let balancer = balanced.then(|| {
            let up = IntGauge::new(
                "allot_agent_balancer_up",
                "1 when the last sync with the balancer succeeded, else 0.",
            )
            .expect("valid metric");
            r.register(Box::new(up.clone())).expect("unique metric");
            let lease_seconds_left = IntGauge::new(
                "allot_agent_lease_seconds_left",
                "Seconds until the balancer lease runs out (0: new checkouts are refused).",
            )
            .expect("valid metric");
            r.register(Box::new(lease_seconds_left.clone()))
                .expect("unique metric");
            let records_waiting = IntGauge::new(
                "allot_agent_records_waiting",
                "Usage and denial records kept until the balancer stores them.",
            )
            .expect("valid metric");
            r.register(Box::new(records_waiting.clone()))
                .expect("unique metric");
            let records_shipped = IntCounter::new(
                "allot_agent_records_shipped_total",
                "Usage and denial records the balancer has stored.",
            )
            .expect("valid metric");
            r.register(Box::new(records_shipped.clone()))
                .expect("unique metric");
            BalancerGauges {
                up,
                lease_seconds_left,
                records_waiting,
                records_shipped,
            }
        });
        let requests_refused = counter(
            &r,
            "allot_agent_requests_refused_total",
            "Requests refused for their credentials, by reason (unauthorized, forbidden).",
            &["reason"],
        );
        for reason in [ErrorCode::Unauthorized, ErrorCode::Forbidden] {
            requests_refused.with_label_values(&[reason.as_str()]);
        }
        Metrics {
            requests_refused,
            instant_requests: counter(
                &r,
                "allot_agent_instant_requests_total",
                "Instant balances asked of the balancer, by outcome (granted, short, failed).",
                &["product", "outcome"],
            ),
            balancer,
            checkouts: counter(
                &r,
                "allot_agent_checkouts_total",
                "Checkouts granted.",
                &["product"],
            ),
            denials: counter(
                &r,
                "allot_agent_denials_total",
                "Checkouts refused, by reason (unavailable, timeout, forbidden, limit).",
                &["product", "reason"],
            ),
            lease_refusals: counter(
                &r,
                "allot_agent_lease_refusals_total",
                "Checkouts refused because this server's balancer lease had run out (not \
                 denials: no move of units could have prevented them).",
                &["product"],
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
            revocations: counter(
                &r,
                "allot_agent_revocations_total",
                "Checkouts force-released by an operator (POST /v1/checkouts/{id}/revoke).",
                &["product"],
            ),
            callbacks_ready: counter(
                &r,
                "allot_agent_callbacks_ready_total",
                "Units kept for a client's callback (POST /v1/callbacks) for it to claim.",
                &["product"],
            ),
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

    /// Exports `allot_agent_info{server, version}` = 1: the name the balancer knows this server
    /// by, so dashboards can join the server's own series to the balancer's per-server ones.
    pub fn named(self, server: &str) -> Self {
        let info = IntGaugeVec::new(
            Opts::new(
                "allot_agent_info",
                "Always 1; labels name this server and its version.",
            ),
            &["server", "version"],
        )
        .expect("valid metric");
        self.registry
            .register(Box::new(info.clone()))
            .expect("unique metric");
        info.with_label_values(&[server, env!("CARGO_PKG_VERSION")])
            .set(1);
        self
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

    /// Counts a checkout refused because the lease had run out (at the request, or while it
    /// waited in the queue).
    pub fn lease_refusal(&self, product: &str) {
        self.lease_refusals.with_label_values(&[product]).inc();
    }

    /// Sets the records waiting in the outbox.
    pub fn records_waiting(&self, n: u64) {
        if let Some(b) = &self.balancer {
            b.records_waiting.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts records the balancer has stored.
    pub fn records_shipped(&self, n: u64) {
        if let Some(b) = &self.balancer {
            b.records_shipped.inc_by(n);
        }
    }

    /// Counts a staleout.
    pub fn staleout(&self, product: &str) {
        self.staleouts.with_label_values(&[product]).inc();
    }

    /// Counts a revocation (a force release by an operator).
    pub fn revocation(&self, product: &str) {
        self.revocations.with_label_values(&[product]).inc();
    }

    /// Counts a unit kept for a callback.
    pub fn callback_ready(&self, product: &str) {
        self.callbacks_ready.with_label_values(&[product]).inc();
    }

    /// Counts a checkin.
    pub fn checkin(&self, product: &str) {
        self.checkins.with_label_values(&[product]).inc();
    }

    /// Counts a heartbeat.
    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Counts an answered (or failed) instant-balance request.
    pub fn instant_request(&self, product: &str, outcome: InstantOutcome) {
        self.instant_requests
            .with_label_values(&[product, outcome.as_str()])
            .inc();
    }

    /// Counts a request refused for its credentials: `unauthorized` (no or a wrong token or
    /// client key) or `forbidden` (refused by an ACL).
    pub fn refused(&self, reason: ErrorCode) {
        self.requests_refused
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Records the outcome of the last sync.
    pub fn balancer_up(&self, up: bool) {
        if let Some(b) = &self.balancer {
            b.up.set(i64::from(up));
        }
    }

    /// Renders the text exposition, with the gauges set from the current figures
    /// (`lease_seconds_left`: `None` when standalone).
    pub fn render(
        &self,
        products: &[AgentProduct],
        live: usize,
        lease_seconds_left: Option<u64>,
    ) -> String {
        if let (Some(b), Some(left)) = (&self.balancer, lease_seconds_left) {
            b.lease_seconds_left
                .set(i64::try_from(left).unwrap_or(i64::MAX));
        }
        for p in products {
            let l = [p.product.as_str()];
            // Every series of a defined product exists from the first scrape, at zero, so
            // `increase()` sees its first event.
            for family in [
                &self.checkouts,
                &self.overdrafts,
                &self.staleouts,
                &self.checkins,
                &self.revocations,
                &self.callbacks_ready,
            ] {
                family.with_label_values(&l);
            }
            if self.balancer.is_some() {
                self.lease_refusals.with_label_values(&l);
            }
            for reason in DenialReason::ALL {
                self.denials.with_label_values(&[l[0], reason.as_str()]);
            }
            if self.balancer.is_some() {
                for outcome in InstantOutcome::ALL {
                    self.instant_requests
                        .with_label_values(&[l[0], outcome.as_str()]);
                }
            }
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
