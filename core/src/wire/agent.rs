//! The metering server's API: the client side (checkout, heartbeat, checkin, products) and the
//! balancer side (status, release, grant).

use crate::domain::Policy;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

fn one() -> u32 {
    1
}

/// `POST /v1/checkout`: ask for units of a product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The product's name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: String,
    /// Who runs the program (ACL and seat rules use it).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub user: String,
    /// Where the program runs (ACL and seat rules use it).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub host: String,
    /// Groups the user belongs to, for group ACLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub groups: Vec<String>,
    /// Units wanted; 1 unless the product counts cores or tokens.
    #[serde(default = "one")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
    /// How long the client will wait in the queue when nothing is free (0 = answer at once).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 3600))]
    pub wait_seconds: u32,
}

/// The answer to a granted checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckoutResponse {
    /// Names the checkout in heartbeats and the checkin.
    pub handle: String,
    /// Units held by this checkout's seat.
    pub units: u32,
    /// How often to heartbeat.
    pub heartbeat_seconds: u32,
    /// True when a soft-stop product granted beyond the allocation.
    pub overdraft: bool,
}

/// `POST /v1/heartbeat` and `POST /v1/checkin`: name a checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HandleRequest {
    /// The handle returned by the checkout.
    pub handle: String,
}

/// `POST /v1/heartbeat`: keep a checkout alive, saying how long its program has been idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The handle returned by the checkout.
    pub handle: String,
    /// Seconds the program has been idle (no input, no CPU), for the product's idle rules;
    /// absent when the client does not measure it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 31_536_000))]
    pub idle_seconds: Option<u32>,
}

/// The answer to a heartbeat or a checkin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HandleResponse {
    /// The handle acted on.
    pub handle: String,
    /// Seconds until the checkout would stale out without another heartbeat (0 after checkin).
    pub staleout_in_seconds: u32,
    /// A warning to show the user: idle past the product's `idle_notify_seconds`, the
    /// checkout is taken back after `idle_revoke_in_seconds` more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Seconds of further idleness before the checkout is revoked (with a notice only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_revoke_in_seconds: Option<u32>,
}

/// `POST /v1/borrow`: take one unit away for offline use (FlexNet borrowing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BorrowRequest {
    /// The product's name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: String,
    /// Who borrows.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub user: String,
    /// The machine the unit goes away on.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub host: String,
    /// Groups the user belongs to, for group ACLs, limits and reservations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub groups: Vec<String>,
    /// How long, at most the product's `max_borrow_hours`.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 8784))]
    pub hours: u32,
}

fn default_hold() -> u32 {
    60
}

fn default_callback_wait() -> u32 {
    3600
}

/// `POST /v1/callbacks`: instead of waiting on an open request, be called back when a unit is
/// kept for you (SMS 2.0's user callbacks). The callback takes its place in the product's
/// queue (group priority first, then first come first served).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CallbackRequest {
    /// The product's name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: String,
    /// Who will run the program.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub user: String,
    /// Where it will run.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub host: String,
    /// Groups the user belongs to (ACLs, limits, reservations, priorities).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub groups: Vec<String>,
    /// Units wanted.
    #[serde(default = "one")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
    /// Called (`POST`, JSON [`CallbackStatus`]) the moment the unit is kept: an `http(s)` URL
    /// whose host is on the metering server's `--callback-hosts` allow-list. Without it the
    /// client long-polls `GET /v1/callbacks/{id}`, at least once a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// How long the kept unit waits for its claim, 1–600 seconds.
    #[serde(default = "default_hold")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 600))]
    pub hold_seconds: u32,
    /// How long to stay in the queue, 1–86,400 seconds.
    #[serde(default = "default_callback_wait")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86_400))]
    pub wait_seconds: u32,
}

/// Where a callback stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CallbackState {
    /// In the queue.
    Waiting,
    /// A unit is kept for it until `claim_by`: claim it with `POST /v1/callbacks/{id}/claim`.
    Ready,
    /// Claimed: it is a checkout now.
    Claimed,
    /// Left the queue or its hold without a checkout: its wait ran out, it was not renewed,
    /// it was not claimed in time, or it was cancelled.
    Ended,
}

/// A callback as its client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallbackStatus {
    /// Names the callback; the client's secret (whoever knows it may claim the unit).
    pub id: String,
    /// The product.
    pub product: String,
    /// Where it stands.
    pub state: CallbackState,
    /// Its place in the queue, 0 being next (waiting only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// Until when the kept unit waits for the claim (ready only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_by: Option<DateTime<Utc>>,
    /// When a long-polled callback is dropped unless polled again (no webhook, waiting only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_by: Option<DateTime<Utc>>,
    /// When it leaves the queue if no unit came.
    pub expires_at: DateTime<Utc>,
}

/// A borrow granted: keep the handle to return it early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BorrowResponse {
    /// Names the borrow in `POST /v1/borrow/{handle}/return`; the borrower's secret.
    pub handle: String,
    /// Its public id, as operators see it in the holders' listing.
    pub id: String,
    /// The product.
    pub product: String,
    /// Units borrowed (one).
    pub units: u32,
    /// When it returns by itself.
    pub until: DateTime<Utc>,
}

/// One product as a metering server's clients see it (`GET /v1/products`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentProduct {
    /// The product's name.
    pub product: String,
    /// Units this server holds.
    pub allocated: u32,
    /// Units checked out now.
    pub in_use: u32,
    /// Units free to check out now (never negative, even in overdraft).
    pub free: u32,
    /// Clients waiting in the queue.
    pub waiting: u32,
    /// The policy the server applies.
    pub policy: Policy,
}

/// `GET /v1/products` on a metering server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentProducts {
    /// One entry per product the server knows.
    pub products: Vec<AgentProduct>,
}

/// Counters of one product on one metering server, over some window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageCounters {
    /// The highest in-use count seen.
    pub peak_in_use: u32,
    /// Checkouts granted.
    pub checkouts: u64,
    /// Checkouts refused for lack of units.
    pub denials: u64,
    /// Checkouts granted beyond the allocation (soft stop).
    pub overdrafts: u64,
    /// Checkouts released by staleout.
    pub staleouts: u64,
    /// Instant balances asked of the balancer.
    pub instant_requests: u64,
}

/// One product in a metering server's status report to the balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProductStatus {
    /// The product's name.
    pub product: String,
    /// Units the server holds, as it has applied them.
    pub allocation: u32,
    /// Bumped by every applied release or grant, so the balancer can tell what the server saw.
    pub generation: u64,
    /// Units checked out now (lingering and borrowed units included).
    pub in_use: u32,
    /// Units kept free for their reservations (FlexNet RESERVE): needed, not free, so the
    /// balancer never takes them back and never counts them as free elsewhere.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reserved: u32,
    /// Clients waiting in the queue now.
    pub waiting: u32,
    /// Counters since the previous status read (the read resets them).
    pub since_last: UsageCounters,
    /// Counters since the server's store was created.
    pub totals: UsageCounters,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl ProductStatus {
    /// Units the balancer must treat as needed here: in use plus the reserved ones still free.
    pub fn needed(&self) -> u32 {
        self.in_use.saturating_add(self.reserved)
    }
}

/// `GET /v1/status`: what the balancer needs to plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentStatus {
    /// The server's own name.
    pub server: String,
    /// Per product figures.
    pub products: Vec<ProductStatus>,
}

/// `POST /v1/allocations/release` and `POST /v1/allocations/grant`: one move, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The move's id in the balancer's move log; a repeat is answered from the first outcome.
    pub move_id: Uuid,
    /// The product's name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: String,
    /// Units to release or grant.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
}

/// The outcome of a release or a grant on a metering server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveResponse {
    /// The move acted on.
    pub move_id: Uuid,
    /// Units actually moved: a release takes only free units, so it may move fewer than asked.
    pub units: u32,
    /// The server's allocation after the move.
    pub allocation: u32,
    /// The allocation's generation after the move.
    pub generation: u64,
}

/// The most moves one batch may carry, so a full batch (about 110 bytes a move) stays inside
/// the 64 KiB body bound; the balancer splits a longer phase into several batches. One
/// server's share of a first distribution is one move per product.
pub const MAX_BATCH_MOVES: usize = 500;

/// One move of a batch: a release, a grant or a retirement, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchMove {
    /// What the move does.
    pub kind: crate::domain::MoveKind,
    /// The move's id in the balancer's move log; a repeat is answered from the first outcome.
    pub move_id: Uuid,
    /// The product's name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub product: String,
    /// Units to move.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
}

/// `POST /v1/allocations/batch`: every move of one run's phase for one server in one request,
/// applied in order under one lock and made durable together; each stays idempotent by its id,
/// so a batch resent after a lost answer applies nothing twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveBatch {
    /// The moves, applied in this order (1 to 500).
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 500))]
    pub moves: Vec<BatchMove>,
}

/// The outcome of one move of a batch: what it moved, or why the server refused it after
/// consulting its move log (so it was not applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchOutcome {
    /// The move.
    pub move_id: Uuid,
    /// What it moved, when applied (now or before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<MoveResponse>,
    /// Why it was refused (`unknown_product`, `conflict`), when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<crate::error::ErrorDetail>,
}

/// The answer to a [`MoveBatch`]: one outcome per move, in the batch's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchResponse {
    /// One per move, in order.
    pub outcomes: Vec<BatchOutcome>,
}

/// `PUT /v1/products/{product}` on a metering server: define a product or replace its policy.
///
/// The same fields as [`Policy`], but strict: an unknown field is an error, not a silently
/// ignored setting (the balancer pushes definitions here; `--products-file` uses it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProductDefinition {
    /// What happens when no unit is free.
    #[serde(default)]
    pub enforcement: crate::domain::Enforcement,
    /// How checkouts share units.
    #[serde(default)]
    pub seat: crate::domain::Seat,
    /// How often a client should heartbeat.
    #[serde(default = "default_heartbeat")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604_800))]
    pub heartbeat_seconds: u32,
    /// How long without a heartbeat before a checkout is released.
    #[serde(default = "default_staleout")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 604_800))]
    pub staleout_seconds: u32,
    /// Who may check the product out.
    #[serde(default, deserialize_with = "super::object_only")]
    pub acl: crate::domain::Acl,
    /// The options-file rules (limits, reservations, linger, borrowing, idle, priorities).
    #[serde(default, deserialize_with = "super::object_only")]
    pub options: crate::domain::Options,
}

fn default_heartbeat() -> u32 {
    crate::domain::DEFAULT_HEARTBEAT_SECONDS
}

fn default_staleout() -> u32 {
    crate::domain::DEFAULT_STALEOUT_SECONDS
}

impl From<ProductDefinition> for Policy {
    fn from(d: ProductDefinition) -> Self {
        Policy {
            enforcement: d.enforcement,
            seat: d.seat,
            heartbeat_seconds: d.heartbeat_seconds,
            staleout_seconds: d.staleout_seconds,
            acl: d.acl,
            options: d.options,
        }
    }
}

impl From<Policy> for ProductDefinition {
    fn from(p: Policy) -> Self {
        ProductDefinition {
            enforcement: p.enforcement,
            seat: p.seat,
            heartbeat_seconds: p.heartbeat_seconds,
            staleout_seconds: p.staleout_seconds,
            acl: p.acl,
            options: p.options,
        }
    }
}

/// Whether a holder entry is a granted checkout or a client waiting in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HolderState {
    /// Granted: holds units now.
    Held,
    /// Queued: waits for a unit to free (first come, first served).
    Waiting,
    /// Borrowed for offline use: held without heartbeats until returned or `until`.
    Borrowed,
    /// Checked in, its seat held on for its user and host until `until` (FlexNet LINGER).
    Lingering,
}

/// One live checkout or waiting client, as an operator sees it (`GET /v1/checkouts`). Names the
/// checkout by a public id that cannot heartbeat or check in: the handle stays the client's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Holder {
    /// Public id: `co_` and 32 hex digits (a one-way hash of the handle) for a checkout, which
    /// `POST /v1/checkouts/{id}/revoke` takes; `wt_` and a number for a waiting client; `lg_`
    /// and a number for a lingering seat.
    pub id: String,
    /// The metering server it is held on (the balancer's name for it).
    pub server: String,
    /// The product.
    pub product: String,
    /// Who holds it.
    pub user: String,
    /// Where it is held.
    pub host: String,
    /// The groups the client stated at checkout.
    pub groups: Vec<String>,
    /// Units held (or asked for, when waiting).
    pub units: u32,
    /// Held or waiting.
    pub state: HolderState,
    /// Granted beyond the allocation (soft stop).
    pub overdraft: bool,
    /// When it was granted (held only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<DateTime<Utc>>,
    /// Its last heartbeat since the grant or the server's last start (held only; absent when
    /// none came yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// When it joined the queue (waiting only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<DateTime<Utc>>,
    /// When a borrow must be returned, or a linger ends (borrowed and lingering only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// `GET /v1/checkouts` on a metering server: one page of its holders, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HolderPage {
    /// The server's own name.
    pub server: String,
    /// Holders whose id sorts after the request's `after`, at most `limit` of them.
    pub items: Vec<Holder>,
    /// More holders follow the last one: ask again with `after` = its id.
    pub more: bool,
}

/// `POST /v1/checkouts/{id}/revoke`: force-release a checkout, saying why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Why, for the audit log and the holder's error message: 1–500 characters.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 500))]
    pub reason: String,
}

/// The answer to a revoke: the checkout as it was, and what its freed units did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Revoked {
    /// The checkout that was revoked.
    pub checkout: Holder,
    /// When it was revoked.
    pub revoked_at: DateTime<Utc>,
    /// The reason given.
    pub reason: String,
    /// Waiting clients its units were handed to at once.
    pub served_waiters: u32,
}
