//! The balancer's admin API.

use crate::domain::{Acl, Enforcement, Options, Policy, Seat, ServerState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

fn default_heartbeat() -> u32 {
    crate::domain::DEFAULT_HEARTBEAT_SECONDS
}
fn default_staleout() -> u32 {
    crate::domain::DEFAULT_STALEOUT_SECONDS
}

/// `POST /v1/products`: define a product and its policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// Unique name; used in URLs.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: String,
    /// Who sells it, for people reading reports.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub publisher: Option<String>,
    /// Which release, for people reading reports.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub version: Option<String>,
    /// What happens when a server has no free unit.
    #[serde(default)]
    pub enforcement: Enforcement,
    /// How checkouts share units.
    #[serde(default)]
    pub seat: Seat,
    /// Heartbeat interval for clients.
    #[serde(default = "default_heartbeat")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604_800))]
    pub heartbeat_seconds: u32,
    /// Release a checkout after this long without a heartbeat.
    #[serde(default = "default_staleout")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604_800))]
    pub staleout_seconds: u32,
    /// Who may check it out.
    #[serde(default, deserialize_with = "super::object_only")]
    pub acl: Acl,
    /// The options-file rules: limits, reservations, linger, borrowing, idle reclaim and
    /// queue priorities.
    #[serde(default, deserialize_with = "super::object_only")]
    pub options: Options,
}

impl CreateProduct {
    /// The policy part of the definition.
    pub fn policy(&self) -> Policy {
        Policy {
            enforcement: self.enforcement,
            seat: self.seat,
            heartbeat_seconds: self.heartbeat_seconds,
            staleout_seconds: self.staleout_seconds,
            acl: self.acl.clone(),
            options: self.options.clone(),
        }
    }
}

/// A product with its books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Product {
    /// Unique name.
    pub name: String,
    /// Who sells it.
    pub publisher: Option<String>,
    /// Which release.
    pub version: Option<String>,
    /// The checkout rules.
    pub policy: Policy,
    /// Σ live entitlements.
    pub purchased: u64,
    /// Units held by nobody: purchased − allocated − in transit.
    pub reserve: u64,
    /// Units granted but not yet confirmed by their server.
    pub in_transit: u64,
    /// Σ allocations over servers.
    pub allocated: u64,
    /// When it was defined.
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/products/{product}`: the product and how it is split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProductDetail {
    /// The product and its books.
    #[serde(flatten)]
    pub product: Product,
    /// One entry per server holding or configured for the product.
    pub servers: Vec<AllocationView>,
}

/// One (server, product) cell of the books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AllocationView {
    /// The server's name.
    pub server: String,
    /// The server's site.
    pub site: String,
    /// The server's state.
    pub state: ServerState,
    /// Units the server holds.
    pub allocation: u64,
    /// Units in use at the last status read, when one has been made.
    pub in_use: Option<u64>,
    /// Floor the balancer never reclaims below while the server is alive.
    pub min_units: u64,
    /// Free units the server should hold above its demand.
    pub buffer_units: u64,
    /// The last generation the server confirmed.
    pub generation: u64,
}

/// `POST /v1/products/{product}/entitlements`: record a purchase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddEntitlement {
    /// Units purchased.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
    /// When the purchase stops counting, if ever.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The order number, contract or note that justifies it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub reference: Option<String>,
}

/// A purchase record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Entitlement {
    /// Store id, used to remove it.
    pub id: i64,
    /// The product's name.
    pub product: String,
    /// Units purchased.
    pub units: u64,
    /// Units of it already out of `purchased` since it expired; the rest are still held by
    /// servers (in use) and leave as they are checked in. 0 until it expires.
    #[serde(default)]
    pub retired_units: u64,
    /// When it stops counting (absent: permanent).
    pub expires_at: Option<DateTime<Utc>>,
    /// Order number or note.
    pub reference: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// Who recorded it.
    pub created_by: String,
}

/// `POST /v1/servers`: register a metering server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterServer {
    /// Unique name; used in URLs.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: String,
    /// Where the balancer reaches its balancer-facing API.
    #[cfg_attr(feature = "openapi", schema(min_length = 8, max_length = 2048))]
    pub url: String,
    /// The site or region it serves, for reports and dashboards.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub site: String,
}

/// A metering server as the balancer knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Server {
    /// Unique name.
    pub name: String,
    /// Its balancer-facing URL.
    pub url: String,
    /// Its site.
    pub site: String,
    /// Active, draining or lost.
    pub state: ServerState,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When the balancer last heard from it.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// While a token rotation's grace runs: until when its previous token is still accepted.
    /// Absent once the server presented its new token, so operators can see a rotation through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_until: Option<DateTime<Utc>>,
}

/// The answer to a registration: the only time the server's token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisteredServer {
    /// The new server.
    #[serde(flatten)]
    pub server: Server,
    /// The server's secret; stored hashed, so it cannot be shown again.
    pub token: String,
}

/// `POST /v1/servers/{server}/rotate-token`: issue a new token for a server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RotateToken {
    /// How long the old token keeps working, so the server can be restarted with the new one
    /// without downtime; absent → the balancer's `--token-grace-seconds`; 0 → refused at once
    /// (a leaked token).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 2_592_000))]
    pub grace_seconds: Option<u32>,
}

/// The answer to a rotation: the only time the new token is shown. The server's
/// `previous_token_until` says until when the old token is still accepted (and presented to
/// the server), unless the server presents the new one first; it is absent when the old token
/// was refused at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotatedToken {
    /// The server.
    #[serde(flatten)]
    pub server: Server,
    /// The server's new secret; stored hashed, so it cannot be shown again.
    pub token: String,
}

/// `PUT /v1/servers/{server}/products/{product}`: the floor and the buffer of one cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetAllocation {
    /// Floor the balancer never reclaims below while the server is alive.
    #[cfg_attr(feature = "openapi", schema(maximum = 1_000_000))]
    pub min_units: u32,
    /// Free units the server should hold above its demand.
    #[cfg_attr(feature = "openapi", schema(maximum = 1_000_000))]
    pub buffer_units: u32,
}

/// `PUT /v1/schedule`: when scheduled balance runs happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetSchedule {
    /// A standard 5- or 6-field cron expression.
    pub cron: String,
    /// IANA time zone the expression is read in; UTC when absent.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// `GET /v1/schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Schedule {
    /// The cron expression.
    pub cron: String,
    /// The IANA time zone it is read in.
    pub timezone: String,
    /// The next five run times, so an operator can check the expression means what they think.
    pub next_runs: Vec<DateTime<Utc>>,
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who (`admin`, a server's name, `balancer`).
    pub actor: String,
    /// What was done, e.g. `entitlement.add`.
    pub action: String,
    /// What it was done to, e.g. a product's name.
    pub target: String,
    /// The state before, when there was one.
    pub before: Option<serde_json::Value>,
    /// The state after, when there is one.
    pub after: Option<serde_json::Value>,
}

/// A list answer: `{"items": [...]}` so lists can grow paging fields later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct List<T> {
    /// The entries.
    pub items: Vec<T>,
}

// ---------------------------------------------------------------------------------------------
// Balancing: runs, moves, the doctor.

/// `POST /v1/balance`: run a manual balance now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BalanceRequest {
    /// Only this product; all products when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: Option<String>,
}

/// One move as the move log holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveView {
    /// The move's id, sent to the metering server as the idempotency key.
    pub id: uuid::Uuid,
    /// The product.
    pub product: String,
    /// The server.
    pub server: String,
    /// Release or grant.
    pub kind: crate::domain::MoveKind,
    /// Units asked for.
    pub units: u64,
    /// Planned, applied or abandoned.
    pub state: crate::domain::MoveState,
    /// Units the server confirmed.
    pub applied_units: Option<u64>,
}

/// A balance run's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunSummary {
    /// Increasing id.
    pub id: i64,
    /// What started it.
    pub trigger: crate::domain::RunTrigger,
    /// `running`, `ok`, `partial` (some servers unreachable or moves unfinished) or `failed`
    /// (also a run its leader never finished: closed by the next leader, its error
    /// `interrupted: …`).
    pub status: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Servers whose status was read.
    pub servers_queried: u64,
    /// Servers that could not be reached (skipped, their units left in place).
    pub servers_unreachable: u64,
    /// Moves applied.
    pub moves: u64,
    /// Units those moves carried.
    pub units_moved: u64,
    /// Units waiting clients asked for that this (instant) run could not serve while nothing
    /// was free anywhere: only buying more helps.
    #[serde(default)]
    pub unserved_true: u64,
    /// Units waiting clients asked for that this run could not serve although units were
    /// free elsewhere: false denials, what the balancing policy minimises.
    #[serde(default)]
    pub unserved_false: u64,
    /// Units this run granted to a server that had released units of the same product within
    /// the hour (ping-pong).
    #[serde(default)]
    pub ping_pong_units: u64,
    /// What went wrong, one line each.
    pub errors: Vec<String>,
}

/// `GET /v1/runs/{id}` and the answer of `POST /v1/balance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunDetail {
    /// The run's record.
    #[serde(flatten)]
    pub run: RunSummary,
    /// The moves the run logged.
    pub move_log: Vec<MoveView>,
    /// Why: per product, every server whose decision (rule, target or allocation) changed
    /// since the balancer last recorded one for it, other than a first `steady`, with the
    /// signals it read and the rule that decided the move or the non-move (scheduled and
    /// manual runs; kept as long as the raw usage samples).
    #[serde(default)]
    pub decisions: Vec<RunDecision>,
}

/// One server's decision in one product of a run: what `explain` would have shown then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunDecision {
    /// The product.
    pub product: String,
    /// The server's signals, want, target and decision.
    #[serde(flatten)]
    pub cell: ExplainedCell,
}

/// One (server, product) cell as the store and the server each see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctorCell {
    /// The server.
    pub server: String,
    /// The allocation in the balancer's books.
    pub store_allocation: u64,
    /// The last generation the balancer booked.
    pub store_generation: u64,
    /// The allocation the server reports applied (absent when unreachable).
    pub server_allocation: Option<u64>,
    /// The generation the server reports.
    pub server_generation: Option<u64>,
    /// Units the server reports in use.
    pub in_use: Option<u64>,
}

/// One product's books and the servers' views of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctorProduct {
    /// The product.
    pub product: String,
    /// Σ live entitlements.
    pub purchased: u64,
    /// Free units.
    pub reserve: u64,
    /// Units granted but unconfirmed.
    pub in_transit: u64,
    /// Σ allocations in the books.
    pub allocated: u64,
    /// Per server.
    pub servers: Vec<DoctorCell>,
}

/// `GET /v1/products/{product}/explain`: what a balance run would decide for one product now,
/// and which rule decided each server's target — the operator's answer to "why did (or didn't)
/// this server get units?" without reading logs. Nothing is moved to produce it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Explanation {
    /// The product.
    pub product: String,
    /// Units purchased.
    pub purchased: u64,
    /// Units in the reserve now.
    pub reserve: u64,
    /// Units of grants sent and not yet confirmed.
    pub in_transit: u64,
    /// Which level of the pool runs out (`ample`, `wants`, `needs`, `mins`, `in_use`).
    pub scarcity: String,
    /// The reserve the plan would leave.
    pub reserve_after: u64,
    /// One entry per server that answered (or the one asked for).
    pub servers: Vec<ExplainedCell>,
    /// Servers that did not answer: their units are left where they are.
    pub unreachable: Vec<String>,
    /// Why nothing could be planned, when nothing could.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One server's part of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExplainedCell {
    /// The server.
    pub server: String,
    /// Units it holds.
    pub allocation: u64,
    /// Units in use now.
    pub in_use: u64,
    /// Units clients wait for now.
    pub waiting: u64,
    /// Its configured floor.
    pub min_units: u64,
    /// Its configured buffer.
    pub buffer_units: u64,
    /// Highest in use since the last run.
    pub peak_in_use: u64,
    /// Checkouts denied since the last run.
    pub denials: u64,
    /// The decaying demand level from the history.
    pub level: u64,
    /// The forecast: the same hour yesterday and last week, looking ahead.
    pub forecast: u64,
    /// The highest peak of the idle-release window; absent while the history is shorter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_peak: Option<u64>,
    /// Units were granted to it recently, so they are held.
    pub held: bool,
    /// Units it needs now (in use + waiting).
    pub need: u64,
    /// Units it should hold (demand plus buffer, at least its min).
    pub want: u64,
    /// What max-min fairness gives it.
    pub fair_share: u64,
    /// What the next run would leave it.
    pub target: u64,
    /// The rule that decided the target (see the operator guide).
    pub decision: String,
}

/// `GET /v1/doctor`: do the books and every reachable server agree?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctorReport {
    /// True when nothing below is wrong.
    pub ok: bool,
    /// Per product.
    pub products: Vec<DoctorProduct>,
    /// Every disagreement found, one line each.
    pub discrepancies: Vec<String>,
    /// Servers that could not be asked.
    pub unreachable: Vec<String>,
    /// Moves logged but not yet applied or abandoned.
    pub unfinished_moves: Vec<MoveView>,
}

// ---------------------------------------------------------------------------------------------
// The metering servers' side of the balancer (authenticated by the server's own token).

/// `POST /v1/sync`: a metering server announces itself and learns its products and allocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The metering server's version, for the balancer's log.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub version: String,
}

/// A product definition as a metering server needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncProduct {
    /// The product's name.
    pub name: String,
    /// Its checkout rules.
    pub policy: Policy,
}

/// The allocation the balancer's books give a server for one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncAllocation {
    /// The product's name.
    pub product: String,
    /// Units in the books.
    pub units: u64,
    /// The last generation the balancer booked.
    pub generation: u64,
}

/// The answer to a sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncResponse {
    /// The server's registered name.
    pub server: String,
    /// How long the server may keep granting without another successful sync. The balancer
    /// reclaims a silent server's units only after its own, longer lease (plus a clock-skew
    /// margin), so the two never overlap.
    pub lease_seconds: u32,
    /// Every product, with its policy.
    pub products: Vec<SyncProduct>,
    /// The server's allocations in the books.
    pub allocations: Vec<SyncAllocation>,
    /// True when the server had been declared lost and its units reclaimed: it must adopt
    /// `allocations` as its new allocations (moves it applied while lost are void).
    pub reset: bool,
}

/// `POST /v1/instant-balance`: a server ran dry and asks for units now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstantBalanceRequest {
    /// Idempotency key: the same id twice grants once.
    pub request_id: uuid::Uuid,
    /// The product.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: String,
    /// Units wanted: the urgent units plus a proactive top-up.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
    /// Of `units`, those clients are waiting for right now: the balancer serves them from the
    /// reserve and, if it must, by reclaiming free units elsewhere; the rest is a top-up served
    /// from the reserve only. Absent (a metering server older than this field): all urgent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1_000_000))]
    pub urgent_units: Option<u32>,
}

impl InstantBalanceRequest {
    /// The units clients wait for now (never more than `units`).
    pub fn urgent(&self) -> u32 {
        self.urgent_units.unwrap_or(self.units).min(self.units)
    }
}

/// The answer to an instant balance. The units themselves arrive as a grant move on the
/// server's balancer-facing API before this answer is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstantBalanceResponse {
    /// The request answered.
    pub request_id: uuid::Uuid,
    /// The product.
    pub product: String,
    /// Units granted (0 when none could be found).
    pub granted: u64,
    /// The server's allocation after the grant: as the server applied it when the reserve
    /// covered the request (the books follow just after the answer), else as booked.
    pub allocation: u64,
    /// When urgent units (clients waiting) went unserved: whether units were free elsewhere —
    /// in the reserve or above another server's need — when the balancer answered (a false
    /// shortfall) or none were (a true one). The server records its denials with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_elsewhere: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// History.

/// One bucket of a usage time series. Means come with the sums and counts they are made of,
/// so a reader can combine buckets without losing anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryPoint {
    /// Start of the bucket.
    pub at: DateTime<Utc>,
    /// Usage samples (one per balance run) the bucket summarises.
    pub samples: u64,
    /// Mean allocation over the samples.
    pub allocation_mean: f64,
    /// Highest allocation.
    pub allocation_max: u64,
    /// Mean units in use at the samples.
    pub in_use_mean: f64,
    /// Highest units in use at a sample.
    pub in_use_max: u64,
    /// Highest units in use between samples, as the servers saw it.
    pub peak_in_use: u64,
    /// Checkouts granted.
    pub checkouts: u64,
    /// Checkouts denied.
    pub denials: u64,
    /// Checkouts granted beyond the allocation (soft stop).
    pub overdrafts: u64,
    /// Checkouts released by staleout.
    pub staleouts: u64,
    /// Most clients waiting at a sample.
    pub waiting_max: u64,
    /// Instant balances asked.
    pub instant_requests: u64,
    /// Units the balancer granted to the cell (scheduled runs and instant balances).
    #[serde(default)]
    pub units_granted: u64,
    /// Units the balancer released from the cell.
    #[serde(default)]
    pub units_released: u64,
    /// Units granted back to the cell within the hour of a release from it (ping-pong).
    #[serde(default)]
    pub ping_pong_units: u64,
    /// Units its waiting clients asked for that no instant balance could serve while nothing
    /// was free anywhere in the estate (true shortfalls).
    #[serde(default)]
    pub unserved_true: u64,
    /// Units its waiting clients asked for that were left unserved while units were free in the
    /// reserve or above another server's need (false shortfalls: the balancer's failures).
    #[serde(default)]
    pub unserved_false: u64,
}

/// The time series of one (server, product).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistorySeries {
    /// The server.
    pub server: String,
    /// Its site.
    pub site: String,
    /// The product.
    pub product: String,
    /// Buckets in time order; buckets without samples are absent.
    pub points: Vec<HistoryPoint>,
}

/// `GET /v1/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct History {
    /// Start of the window.
    pub from: DateTime<Utc>,
    /// End of the window.
    pub to: DateTime<Utc>,
    /// Bucket width.
    pub step_seconds: u64,
    /// One series per (server, product) with samples in the window.
    pub series: Vec<HistorySeries>,
}

// ---------------------------------------------------------------------------------------------
// Licence administration: who holds what, force release.

/// `GET /v1/checkouts`: one page of the live holders of the whole estate, ordered by server
/// then id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Holders {
    /// Live checkouts and waiting clients.
    pub items: Vec<crate::wire::agent::Holder>,
    /// Where the next page starts (`?cursor=`); absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Servers asked that did not answer: their holders are missing from this page, never
    /// silently.
    pub unreachable: Vec<String>,
}
