//! The balancer's books: products, purchases, allocations, the reserve, the move log, runs,
//! usage samples, settings and the audit log.
//!
//! [`Store`] speaks in domain words; two implementations share one body of SQL
//! (`store/sql/`, one file per family of tables), compiled once per backend with that
//! backend's connection type:
//! [`sqlite`] (the embedded default) and [`postgres`] (production). The SQL is written in the
//! dialect both accept (`$n` parameters, `RETURNING`, `ON CONFLICT`); the backends differ only
//! in how a write transaction begins and in their migrations.
//!
//! **Conservation is enforced here**: every mutation of purchases, allocations, the reserve or
//! moves runs in one transaction that keeps `reserve + in_transit + Σ allocation = purchased`,
//! and a change that would drive the reserve negative is refused with [`StoreError::Conflict`]
//! (the schema's `CHECK (reserve >= 0)` backs the code up).
//!
//! The store counts nothing itself: a database error is returned as [`StoreError::Database`],
//! and the service wraps the store in [`ErrorReporting`] to count them in its metrics.

pub mod postgres;
mod reporting;
mod rows;
pub mod sqlite;

pub use reporting::{DatabaseErrorHook, ErrorReporting};

use allot_core::domain::{MoveKind, MoveState, RunTrigger, ServerState};
pub use allot_core::shard::Fence;
use allot_core::usage::Interval;
use allot_core::wire::balancer::{
    AddEntitlement, AllocationView, AuditEntry, CreateProduct, Entitlement, Product, ProductDetail,
    RegisterServer, RunDecision, RunDetail, RunSummary, Server, SetAllocation,
};
use allot_core::wire::records::{GroupBy, RecordAck, RecordBatch};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;

/// Why a store call failed; each variant maps to one stable API error code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named product does not exist.
    #[error("unknown product {0:?}")]
    UnknownProduct(String),
    /// Another addressed thing (server, entitlement, move) does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The change contradicts the books (units not free, duplicate name, stale move).
    #[error("{0}")]
    Conflict(String),
    /// The database failed; the text is logged, never shown to clients.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// A migration failed at start.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A write of a deposed leader: its epoch is older than the current one.
    #[error("fenced: epoch {epoch} is not the current leader epoch {current}")]
    Fenced {
        /// The writer's epoch.
        epoch: i64,
        /// The current epoch.
        current: i64,
    },
    /// The store could not be opened as configured.
    #[error("{0}")]
    Config(String),
    /// A stored value could not be read back (a bug or a hand-edited database).
    #[error("corrupt store value: {0}")]
    Corrupt(String),
}

/// Every database error passes here (`?` on a sqlx call). Counting them is the caller's
/// business: see [`ErrorReporting`].
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e)
    }
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// The schedule as stored: a cron expression and the time zone it is read in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduleSetting {
    /// Standard 5- or 6-field cron expression, validated by the API before it is stored.
    pub cron: String,
    /// IANA time zone name.
    pub timezone: String,
}

/// One product's cells at one site, summed: the console's estate page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstateTotal {
    /// The product.
    pub product: String,
    /// The site.
    pub site: String,
    /// Units its servers at the site hold.
    pub allocation: u64,
    /// Units in use there, by each cell's newest usage sample (0 for a cell never sampled).
    pub in_use: u64,
}

/// One shard's leadership as the books record it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLeader {
    /// The shard, `0..count`.
    pub shard: u32,
    /// Its current epoch: only writes carrying it touch the shard's products.
    pub epoch: i64,
    /// Where its leader is reached; empty when it has had none since the count was set.
    pub url: String,
    /// When its leader took it.
    pub taken_at: Option<DateTime<Utc>>,
}

/// A move its server confirmed: the units it applied and its allocation's generation after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandedMove {
    /// The move.
    pub id: Uuid,
    /// Units the server applied (a release may apply fewer than asked).
    pub applied_units: u64,
    /// The server's allocation generation after it.
    pub generation: u64,
}

/// A move about to be logged (and, for a grant, taken out of the reserve into transit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMove {
    /// Idempotency key, sent with the move to the metering server.
    pub id: Uuid,
    /// The balance run that planned it, if any.
    pub run_id: Option<i64>,
    /// The product's name.
    pub product: String,
    /// The server's name.
    pub server: String,
    /// Release or grant.
    pub kind: MoveKind,
    /// Units asked for.
    pub units: u64,
    /// The leader epoch that planned it, for fencing.
    pub epoch: i64,
}

/// A move as the move log holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoveRecord {
    /// The move's id.
    pub id: Uuid,
    /// The run that planned it.
    pub run_id: Option<i64>,
    /// The product's name.
    pub product: String,
    /// The server's name.
    pub server: String,
    /// Release or grant.
    pub kind: MoveKind,
    /// Units asked for.
    pub units: u64,
    /// Planned, applied or abandoned.
    pub state: MoveState,
    /// Units the server confirmed, once applied.
    pub applied_units: Option<u64>,
    /// The epoch that planned it.
    pub epoch: i64,
}

/// One product's books as stored, with the sums they must agree with; see [`BooksCheck::errors`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct BooksCheck {
    /// The product's name.
    pub product: String,
    /// The stored purchased total.
    pub purchased: i64,
    /// The stored reserve.
    pub reserve: i64,
    /// The stored in-transit count.
    pub in_transit: i64,
    /// Σ allocations of the product.
    pub allocated: i64,
    /// Σ live (not removed) entitlements.
    pub entitled: i64,
    /// Σ units of grants still planned (their units are in transit).
    pub planned_grants: i64,
}

impl BooksCheck {
    /// Every way these books disagree with themselves; empty when they balance.
    pub fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let sum = self.reserve + self.in_transit + self.allocated;
        if sum != self.purchased {
            errors.push(format!(
                "{}: reserve {} + in_transit {} + allocated {} = {} ≠ purchased {}",
                self.product, self.reserve, self.in_transit, self.allocated, sum, self.purchased
            ));
        }
        if self.entitled != self.purchased {
            errors.push(format!(
                "{}: live entitlements sum to {} ≠ purchased {}",
                self.product, self.entitled, self.purchased
            ));
        }
        if self.planned_grants != self.in_transit {
            errors.push(format!(
                "{}: planned grants hold {} ≠ in_transit {}",
                self.product, self.planned_grants, self.in_transit
            ));
        }
        if self.reserve < 0 || self.in_transit < 0 {
            errors.push(format!("{}: negative pool", self.product));
        }
        errors
    }
}

/// What an operator may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything and changes anything an admin token can.
    Admin,
    /// Reads everything and changes nothing.
    Viewer,
}

impl Role {
    /// The stored and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Viewer => "viewer",
        }
    }

    /// The role stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }
}

/// An operator as the API and the console show it (never with the hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operator {
    /// Unique login name, also the audit log's actor for their changes.
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// When they were added.
    pub created_at: DateTime<Utc>,
    /// Who added them.
    pub created_by: String,
}

/// A server as the balancing engine needs it: where to call it and how to derive its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRecord {
    /// Unique name.
    pub name: String,
    /// Its balancer-facing URL.
    pub url: String,
    /// Its site.
    pub site: String,
    /// Active, draining or lost.
    pub state: ServerState,
    /// The salt its token is derived from (the `auth` module derives the token itself).
    pub token_salt: String,
    /// The token it had before its latest rotation, while that one's grace period runs.
    pub previous_token: Option<PreviousToken>,
    /// When the balancer last heard from it (a sync or a status read).
    pub last_seen_at: Option<DateTime<Utc>>,
    /// When it was registered; a never-heard-of server's lease runs from here.
    pub created_at: DateTime<Utc>,
    /// Its units were reclaimed while it was lost, and it has not yet shown that it adopted
    /// the books' allocations: every sync says `reset`, and it gets no moves meanwhile.
    pub needs_reset: bool,
}

/// A rotated-out server token that still works for a while, so the metering server can be
/// restarted with its new token without a moment in which neither side accepts the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousToken {
    /// The salt the old token is derived from.
    pub salt: String,
    /// When it stops being accepted (unless the server presents its new token first).
    pub until: DateTime<Utc>,
}

impl ServerRecord {
    /// The salts of the tokens to present to this server at `now`, in the order to try them:
    /// during a rotation's grace the old one first (the server most likely still runs with it
    /// until its operator restarts it), then the new one.
    pub fn token_salts(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut salts = Vec::with_capacity(2);
        if let Some(previous) = &self.previous_token
            && now < previous.until
        {
            salts.push(previous.salt.as_str());
        }
        salts.push(self.token_salt.as_str());
        salts
    }
}

impl From<ServerRecord> for Server {
    fn from(r: ServerRecord) -> Self {
        Server {
            name: r.name,
            url: r.url,
            site: r.site,
            state: r.state,
            created_at: r.created_at,
            last_seen_at: r.last_seen_at,
            previous_token_until: r.previous_token.map(|p| p.until),
        }
    }
}

/// One (server, product) cell of the books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellRecord {
    /// The server.
    pub server: String,
    /// The product.
    pub product: String,
    /// Units held.
    pub units: u64,
    /// Floor.
    pub min_units: u64,
    /// Buffer.
    pub buffer_units: u64,
    /// Last booked generation.
    pub generation: u64,
}

/// A usage sample of one (server, product) at one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageSample {
    /// The server.
    pub server: String,
    /// The product.
    pub product: String,
    /// Its allocation as the server reported it.
    pub allocation: u64,
    /// Units in use.
    pub in_use: u64,
    /// Peak in use since the previous read.
    pub peak_in_use: u64,
    /// Checkouts since the previous read.
    pub checkouts: u64,
    /// Denials since the previous read.
    pub denials: u64,
    /// Overdrafts since the previous read.
    pub overdrafts: u64,
    /// Staleouts since the previous read.
    pub staleouts: u64,
    /// Clients waiting now.
    pub waiting: u64,
    /// Instant balances asked since the previous read.
    pub instant_requests: u64,
    /// What the balancer did to and for the cell since the previous sample.
    pub accounting: CellAccounting,
}

/// The balancer's own accounting of one (server, product) between two samples: the cost of
/// balancing it (units moved, ping-pong) and what balancing failed to serve (true and false
/// shortfalls), so history can say where moves and false denials happen, not only how many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CellAccounting {
    /// Units granted to the cell and applied by its server.
    pub units_granted: u64,
    /// Units released from the cell and applied by its server.
    pub units_released: u64,
    /// Units of those grants that came back within the hour of a release from the cell.
    pub ping_pong_units: u64,
    /// Units its waiting clients asked for that an instant balance could not serve while
    /// nothing was free anywhere (true shortfalls).
    pub unserved_true: u64,
    /// Units its waiting clients asked for that an instant balance left unserved while units
    /// were free elsewhere (false shortfalls: the policy's failures).
    pub unserved_false: u64,
}

impl CellAccounting {
    /// Adds another tally to this one.
    pub fn add(&mut self, other: &Self) {
        self.units_granted += other.units_granted;
        self.units_released += other.units_released;
        self.ping_pong_units += other.ping_pong_units;
        self.unserved_true += other.unserved_true;
        self.unserved_false += other.unserved_false;
    }
}

/// What a usage report reads: a window, an optional product, a grouping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordsQuery {
    /// Window start (Unix ms).
    pub since_ms: i64,
    /// Window end (Unix ms), exclusive.
    pub until_ms: i64,
    /// Only this product.
    pub product: Option<String>,
    /// What rows are keyed by.
    pub group_by: GroupBy,
}

/// One group's totals over a window, as the store sums them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// The user, group, host, server, site or product.
    pub key: String,
    /// Checkouts overlapping the window.
    pub checkouts: u64,
    /// Units × milliseconds held inside the window.
    pub unit_ms: u64,
    /// The most units held at once.
    pub peak: u64,
    /// Denials with nothing free anywhere.
    pub denials_true: u64,
    /// Denials with units free elsewhere.
    pub denials_false: u64,
    /// Denials by policy or without a balancer's answer.
    pub denials_other: u64,
}

/// How a balance run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutcome {
    /// `ok`, `partial` or `failed`.
    pub status: String,
    /// Servers whose status was read.
    pub servers_queried: u64,
    /// Servers skipped as unreachable.
    pub servers_unreachable: u64,
    /// Moves applied.
    pub moves: u64,
    /// Units they carried.
    pub units_moved: u64,
    /// Units waiting clients asked for that could not be served while nothing was free.
    pub unserved_true: u64,
    /// Units waiting clients asked for that could not be served while units were free.
    pub unserved_false: u64,
    /// Units granted back to a server that released units of the product within the hour.
    pub ping_pong_units: u64,
    /// One line per problem.
    pub errors: Vec<String>,
}

/// A recorded instant-balance request, so a repeat grants nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstantRecord {
    /// The asking server.
    pub server: String,
    /// The product.
    pub product: String,
    /// Units asked.
    pub units: u64,
    /// Units granted.
    pub granted: u64,
}

/// What an instant balance learns by its first read ([`Store::instant_start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstantStart {
    /// The request's outcome, if an earlier attempt answered it.
    pub answered: Option<InstantRecord>,
    /// The product's reserve.
    pub reserve: u64,
}

/// How an instant balance's log of its grant from the reserve ended
/// ([`Store::log_instant_grant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstantLog {
    /// The run opened and the grant logged: the run's id and the grant's record.
    Logged(i64, MoveRecord),
    /// Nothing logged: the product's reserve was no longer the one the plan was made from, or
    /// the request had been answered meanwhile. How the books stand now, as
    /// [`Store::instant_start`] would have read them.
    Moved(InstantStart),
}

/// Which usage history to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only this product.
    pub product: Option<String>,
    /// Only this server.
    pub server: Option<String>,
    /// Only servers of this site.
    pub site: Option<String>,
    /// Start of the window (Unix ms, inclusive).
    pub from_ms: i64,
    /// End of the window (Unix ms, exclusive).
    pub to_ms: i64,
    /// Bucket width in ms.
    pub step_ms: i64,
    /// Raw samples are read at and after this instant, hourly roll-ups before it, so no sample
    /// is counted twice.
    pub raw_from_ms: i64,
}

/// One bucket of one (server, product), as sums, maxima and a count.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct HistoryBucket {
    /// The server.
    pub server: String,
    /// Its site.
    pub site: String,
    /// The product.
    pub product: String,
    /// Bucket start (Unix ms).
    pub bucket: i64,
    /// Samples summarised.
    pub samples: i64,
    /// Σ allocation.
    pub allocation_sum: i64,
    /// Max allocation.
    pub allocation_max: i64,
    /// Σ in use.
    pub in_use_sum: i64,
    /// Max in use.
    pub in_use_max: i64,
    /// Max peak in use.
    pub peak_in_use: i64,
    /// Σ checkouts.
    pub checkouts: i64,
    /// Σ denials.
    pub denials: i64,
    /// Σ overdrafts.
    pub overdrafts: i64,
    /// Σ staleouts.
    pub staleouts: i64,
    /// Σ waiting.
    pub waiting_sum: i64,
    /// Max waiting.
    pub waiting_max: i64,
    /// Σ instant requests.
    pub instant_requests: i64,
    /// Σ units granted.
    pub units_granted: i64,
    /// Σ units released.
    pub units_released: i64,
    /// Σ ping-pong units.
    pub ping_pong_units: i64,
    /// Σ units unserved with nothing free anywhere.
    pub unserved_true: i64,
    /// Σ units unserved while units were free elsewhere.
    pub unserved_false: i64,
}

/// Which runs to list, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunsQuery {
    /// At most this many.
    pub limit: u32,
    /// Only runs with an id below this (the previous page's last id).
    pub before_id: Option<i64>,
    /// Only runs of this trigger.
    pub trigger: Option<RunTrigger>,
    /// Only runs started at or after this instant (Unix ms).
    pub since_ms: Option<i64>,
}

/// Which page of the audit log to read, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditQuery {
    /// At most this many entries.
    pub limit: u32,
    /// Only entries with an id below this (the previous page's last id).
    pub before_id: Option<i64>,
}

/// What the balancer needs from its database, in domain words. Every mutation is one
/// transaction, audited in that same transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for the start-up summary and `/healthz`.
    fn backend(&self) -> &'static str;
    /// Waits for in-flight statements and closes the connections (graceful shutdown).
    async fn close(&self);

    /// Defines a product with an empty pool. A taken name is a conflict.
    async fn create_product(&self, actor: &str, def: &CreateProduct) -> StoreResult<Product>;
    /// Every product with its books, by name.
    async fn products(&self) -> StoreResult<Vec<Product>>;
    /// One product with its per-server split.
    async fn product(&self, name: &str) -> StoreResult<ProductDetail>;
    /// One product's books without its per-server split: what runs and instant balances
    /// reread under the product's lock (a large estate's split is thousands of rows).
    async fn product_books(&self, name: &str) -> StoreResult<Product>;
    /// A product's reserve alone, by one statement: what an instant balance reads on every
    /// request (the books' other figures sum every server's cell, a thousand rows in a
    /// large estate).
    async fn reserve(&self, product: &str) -> StoreResult<u64>;
    /// Replaces a product's policy (audited with the policy before and after); metering
    /// servers adopt it at their next sync.
    async fn set_policy(
        &self,
        actor: &str,
        name: &str,
        policy: &allot_core::domain::Policy,
    ) -> StoreResult<Product>;

    /// Records a purchase: purchased and reserve both grow by its units.
    async fn add_entitlement(
        &self,
        actor: &str,
        product: &str,
        req: &AddEntitlement,
    ) -> StoreResult<Entitlement>;
    /// The product's live entitlements.
    async fn entitlements(&self, product: &str) -> StoreResult<Vec<Entitlement>>;
    /// Every live entitlement with an expiry, of every product, soonest first (expired ones
    /// still owed units included): what the expiry metrics and alerts watch.
    async fn dated_entitlements(&self) -> StoreResult<Vec<Entitlement>>;
    /// Removes a purchase; refused with a conflict unless its units are free in the reserve.
    async fn remove_entitlement(
        &self,
        actor: &str,
        product: &str,
        id: i64,
    ) -> StoreResult<Entitlement>;

    /// Registers a metering server with the salt and the hash of its token. A taken name is a
    /// conflict.
    async fn register_server(
        &self,
        actor: &str,
        req: &RegisterServer,
        token_salt: &str,
        token_hash: &str,
    ) -> StoreResult<Server>;
    /// Every registered (not removed) server, by name, as the admin API shows it.
    async fn servers(&self) -> StoreResult<Vec<Server>> {
        Ok(self
            .server_records()
            .await?
            .into_iter()
            .map(Server::from)
            .collect())
    }
    /// The server whose current token, or previous token during a rotation's grace (expired or
    /// not: the caller checks), hashes to `token_hash`, for authenticating metering servers.
    async fn server_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<ServerRecord>>;
    /// Gives a server a new token (its salt and digest); the current one becomes its previous
    /// token, accepted until `previous_until`, or refused at once when that is `None`. A second
    /// rotation within the grace drops the oldest token. Audited.
    async fn rotate_server_token(
        &self,
        actor: &str,
        name: &str,
        token_salt: &str,
        token_hash: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> StoreResult<ServerRecord>;
    /// Ends the grace of a server's previous token because the server presented its new one
    /// (the token derived from `current_salt`); returns whether there was one to end (audited
    /// only then). Nothing happens if a rotation since made `current_salt` the previous one:
    /// that server still runs on it and keeps its grace.
    async fn retire_previous_token(&self, name: &str, current_salt: &str) -> StoreResult<bool>;
    /// Marks a server draining: balancing empties it down to its in-use units.
    async fn drain_server(&self, actor: &str, name: &str) -> StoreResult<Server>;
    /// Removes a server; refused with a conflict while it holds units or has moves in flight.
    async fn remove_server(&self, actor: &str, name: &str) -> StoreResult<Server>;

    /// Sets a cell's floor and buffer, creating the cell (with no units) when absent.
    async fn set_allocation_limits(
        &self,
        actor: &str,
        server: &str,
        product: &str,
        req: &SetAllocation,
    ) -> StoreResult<AllocationView>;

    /// The stored schedule.
    async fn schedule(&self) -> StoreResult<ScheduleSetting>;
    /// Replaces the schedule (validated by the caller).
    async fn set_schedule(&self, actor: &str, setting: &ScheduleSetting) -> StoreResult<()>;

    /// A page of the audit log, newest first.
    async fn audit(&self, query: AuditQuery) -> StoreResult<Vec<AuditEntry>>;
    /// Records an act done outside the books (a checkout revoked on a metering server) in the
    /// audit log: who, what, to what, and its details as the entry's `after`.
    async fn record_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()>;

    /// Adds an operator (see the `operators` module) with their password's argon2 hash, audited.
    /// A taken name is a conflict.
    async fn add_operator(
        &self,
        actor: &str,
        name: &str,
        role: Role,
        password_hash: &str,
    ) -> StoreResult<Operator>;
    /// Every product's allocation and newest in-use summed per site (by product, then site),
    /// in one statement: what the console's estate page reads every few seconds.
    async fn estate_totals(&self) -> StoreResult<Vec<EstateTotal>>;
    /// Every operator, by name (without their hashes).
    async fn operators(&self) -> StoreResult<Vec<Operator>>;
    /// An operator and their password hash, for checking a login.
    async fn operator_credentials(&self, name: &str) -> StoreResult<Option<(Operator, String)>>;
    /// Removes an operator, audited; not found when there is none of that name.
    async fn remove_operator(&self, actor: &str, name: &str) -> StoreResult<Operator>;

    /// Logs a move as planned before it is sent (refused when `mv.epoch` is not the current
    /// leader epoch: a deposed leader cannot touch the books). A grant's units leave the reserve into
    /// transit in the same transaction (refused with a conflict if the reserve is short).
    async fn begin_move(&self, mv: &NewMove) -> StoreResult<MoveRecord> {
        let mut logged = self.begin_moves(std::slice::from_ref(mv)).await?;
        logged
            .pop()
            .ok_or_else(|| StoreError::Corrupt("a logged move vanished".into()))
    }
    /// Logs several moves as [`Store::begin_move`] does, in one transaction (their products
    /// locked in id order first): all are logged or, on any refusal, none. A run logs each
    /// product's releases, then its grants, this way.
    async fn begin_moves(&self, moves: &[NewMove]) -> StoreResult<Vec<MoveRecord>>;
    /// Books a move the server confirmed: a release's `applied_units` (≤ asked, only free
    /// units) go to the reserve; a grant's units leave transit into the allocation. Repeating
    /// it for an applied move changes nothing and returns the record.
    async fn complete_move(
        &self,
        id: Uuid,
        applied_units: u64,
        generation: u64,
        fence: &Fence,
    ) -> StoreResult<MoveRecord> {
        let landed = LandedMove {
            id,
            applied_units,
            generation,
        };
        let mut booked = self.complete_moves(&[landed], fence).await?;
        booked
            .pop()
            .ok_or_else(|| StoreError::Corrupt("a booked move vanished".into()))
    }
    /// Books several confirmed moves as [`Store::complete_move`] does, in one transaction: all
    /// or, on any refusal, none (the caller may then book them one by one). A run books each
    /// server's batch answer this way. Every write of a move's end is fenced: refused unless
    /// `fence` leads the move's product's shard at its current epoch.
    async fn complete_moves(
        &self,
        landed: &[LandedMove],
        fence: &Fence,
    ) -> StoreResult<Vec<MoveRecord>>;
    /// Gives a planned move up: a grant's in-transit units return to the reserve. Only call it
    /// when the server is known not to have applied the move.
    async fn abandon_move(&self, id: Uuid, reason: &str, fence: &Fence) -> StoreResult<MoveRecord>;
    /// Moves logged but neither applied nor abandoned, oldest first, to resume.
    async fn unfinished_moves(&self) -> StoreResult<Vec<MoveRecord>>;

    /// Each product's books with the sums they must equal, for tests and `doctor`.
    async fn books(&self) -> StoreResult<Vec<BooksCheck>>;

    /// The secret server tokens are derived from, created with the store and shared by every
    /// balancer on it.
    async fn token_key(&self) -> StoreResult<String>;
    /// Every registered server with what the engine needs to call it.
    async fn server_records(&self) -> StoreResult<Vec<ServerRecord>>;
    /// Notes that the server was heard from now (its lease restarts).
    async fn touch_server(&self, name: &str) -> StoreResult<()>;
    /// Declares a silent server lost: in one transaction its allocations of the products whose
    /// shards `fence` leads return to the reserve, its planned moves of those products are
    /// abandoned, and its state becomes `lost` (other shards' leaders reclaim theirs). Returns
    /// (product, units) reclaimed.
    async fn reclaim_lost_server(
        &self,
        name: &str,
        fence: &Fence,
    ) -> StoreResult<Vec<(String, u64)>>;
    /// Makes the caller the leader of `shard`: bumps the shard's epoch to a new one (fencing
    /// every older writer of its products) and records where the new leader is reached.
    /// Returns the new epoch; not found when the estate has no such shard.
    async fn take_shard(&self, shard: u32, url: &str) -> StoreResult<i64>;
    /// Every shard with its current epoch and leader, by shard; their number is the estate's
    /// shard count.
    async fn shard_leaders(&self) -> StoreResult<Vec<ShardLeader>>;
    /// Sets the number of shards, audited: every shard gets a new epoch and no leader, so every
    /// balancer's fence is stale and each takes its shards anew under the new count.
    async fn set_shard_count(&self, actor: &str, count: u32) -> StoreResult<()>;
    /// Makes a lost server active again; returns whether it had been lost.
    async fn revive_server(&self, name: &str) -> StoreResult<bool>;
    /// Notes that a server showed it adopted the books' allocations after a reset.
    async fn clear_reset(&self, name: &str) -> StoreResult<()>;
    /// Every cell of every registered server.
    async fn cells(&self) -> StoreResult<Vec<CellRecord>>;
    /// Every product and every cell, read in one snapshot, so each product's books add up
    /// with its cells (what a run plans from first).
    async fn products_and_cells(&self) -> StoreResult<(Vec<Product>, Vec<CellRecord>)>;
    /// The cells of one product, read afresh (an instant balance's donors; a run's product it
    /// could not plan from its own read).
    async fn product_cells(&self, product: &str) -> StoreResult<Vec<CellRecord>>;
    /// The cells of one product held by `servers` (a run rereads only the cells that changed
    /// since it read them all), by server name.
    async fn product_cells_of(
        &self,
        product: &str,
        servers: &[String],
    ) -> StoreResult<Vec<CellRecord>>;
    /// One cell, if the server holds the product in the books: what an instant balance
    /// answers the asker holds, without reading the product's thousand other cells.
    async fn cell(&self, server: &str, product: &str) -> StoreResult<Option<CellRecord>>;
    /// Per server, the peak in use of the newest usage sample of `product`: what an instant
    /// balance assumes in use at a donor no run of this balancer has seen yet (after a
    /// restart), so a donor is never judged idle without evidence. Kept out of the cell reads,
    /// which runs make for every cell and which would pay an index probe per cell for it.
    async fn last_peaks(&self, product: &str) -> StoreResult<HashMap<String, u64>>;
    /// Notes that these servers were heard from now, in one transaction.
    async fn touch_servers(&self, names: &[String]) -> StoreResult<()>;

    /// Opens a run record, with the newest epoch of the `fence` it runs under.
    async fn begin_run(&self, trigger: RunTrigger, fence: &Fence) -> StoreResult<i64>;
    /// Closes a run record.
    async fn finish_run(&self, run_id: i64, outcome: &RunOutcome) -> StoreResult<()>;
    /// Opens a run record and logs its first moves as [`Store::begin_moves`] does, in one
    /// transaction; each move's `run_id` becomes the new run's. An instant balance's grant
    /// from the reserve takes one commit this way, not two, before it is sent.
    async fn begin_run_with_moves(
        &self,
        trigger: RunTrigger,
        fence: &Fence,
        moves: &[NewMove],
    ) -> StoreResult<(i64, Vec<MoveRecord>)>;
    /// Opens an instant balance's run and logs its one grant from the reserve, as
    /// [`Store::begin_run_with_moves`] does, only while the books are as its plan read them:
    /// the product's reserve still `reserve_as_read` and no record of `request_id`. Otherwise
    /// it logs nothing and says how they stand ([`InstantLog::Moved`]), so the caller plans
    /// again from that without another read. An instant balance plans from the reserve its
    /// balancer last saw and lets this call check it: a read and a log become one round trip.
    async fn log_instant_grant(
        &self,
        fence: &Fence,
        grant: &NewMove,
        request_id: Uuid,
        reserve_as_read: u64,
    ) -> StoreResult<InstantLog>;
    /// Closes an instant balance's run record and, when `answered` (its outcome is settled),
    /// records the request as answered, in one transaction: a retry of the request then
    /// finds it, and the run is never left open behind an answered request.
    async fn finish_instant_run(
        &self,
        run_id: i64,
        outcome: &RunOutcome,
        answered: Option<(Uuid, &InstantRecord)>,
    ) -> StoreResult<()>;
    /// Books an instant balance's grant from the reserve as [`Store::complete_move`] does,
    /// closes its run with `outcome` and records the request as answered, in one transaction;
    /// returns the booked move. An instant balance the reserve covers thus commits twice (its
    /// grant logged, then booked with the rest), not three times; the second comes after its
    /// answer (the server holds the units once it has applied them). Any refusal writes none
    /// of it.
    async fn complete_instant_grant(
        &self,
        landed: LandedMove,
        fence: &Fence,
        run_id: i64,
        outcome: &RunOutcome,
        answered: (Uuid, &InstantRecord),
    ) -> StoreResult<MoveRecord>;
    /// Records the usage samples of a run, taken at `at_ms`.
    async fn record_samples(
        &self,
        run_id: i64,
        at_ms: i64,
        samples: &[UsageSample],
    ) -> StoreResult<()>;
    /// Records why a run did what it did to one product: the decisions of the servers the
    /// planner did not leave steady, taken at `at_ms` (pruned with the raw samples).
    async fn record_decisions(
        &self,
        run_id: i64,
        at_ms: i64,
        decisions: &[RunDecision],
    ) -> StoreResult<()>;
    /// Takes expired entitlements out of `purchased` as far as the reserve allows (see
    /// `balance::expiry`); returns, per product, the units still to retire from servers, net
    /// of retire moves already under way. Only the products whose shards `fence` leads.
    async fn expire_from_reserve(
        &self,
        now_ms: i64,
        fence: &Fence,
    ) -> StoreResult<Vec<(String, u64)>>;
    /// Stores a metering server's batch of usage and denial records, once per record id;
    /// returns the acknowledgement and the records dropped for naming an unknown product.
    async fn store_records(
        &self,
        server: &str,
        batch: &RecordBatch,
    ) -> StoreResult<(RecordAck, u64)>;
    /// Per group of a usage report: checkouts, unit-time, peak and denials.
    async fn usage_totals(&self, query: &RecordsQuery) -> StoreResult<Vec<UsageTotals>>;
    /// One product's checkouts overlapping `[since_ms, until_ms)`.
    async fn usage_intervals(
        &self,
        product: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<Interval>>;
    /// Deletes records older than `before_ms`; returns how many.
    async fn prune_records(&self, before_ms: i64) -> StoreResult<u64>;
    /// Runs, newest first.
    async fn runs(&self, query: &RunsQuery) -> StoreResult<Vec<RunSummary>>;
    /// One run with its moves.
    async fn run(&self, run_id: i64) -> StoreResult<RunDetail>;

    /// Usage buckets for a history query (raw samples and hourly roll-ups, never both for one
    /// instant), unordered.
    async fn history(&self, query: &HistoryQuery) -> StoreResult<Vec<HistoryBucket>>;
    /// Rolls complete hours of raw samples before `until_ms` into hourly roll-ups (from where
    /// the previous roll-up stopped); returns the roll-up rows written.
    async fn roll_up(&self, until_ms: i64) -> StoreResult<u64>;
    /// Deletes raw samples before `raw_before_ms` (already rolled up) and roll-ups before
    /// `hourly_before_ms`; returns both counts.
    async fn prune_history(
        &self,
        raw_before_ms: i64,
        hourly_before_ms: i64,
    ) -> StoreResult<(u64, u64)>;

    /// Raw usage samples taken in `[from_ms, to_ms)`, with their times, oldest first.
    async fn samples_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, UsageSample)>>;
    /// The usage samples the demand signals of `allot_core::demand` weigh, as (server,
    /// product, time, peak): every sample with a positive peak taken in any of the inclusive
    /// ranges `[from_ms, to_ms]`, and, for each cell in the books, its oldest sample in the
    /// first (the recent past, which dates how far back its history reaches), read per cell so
    /// that its cost does not grow with the history the range holds. A sample of peak 0 moves no
    /// signal, and a run every minute over 100,000 cells writes 100,000 of them: reading them
    /// all grew each run by every run before it.
    async fn peak_samples(
        &self,
        ranges: &[(i64, i64)],
    ) -> StoreResult<Vec<(String, String, i64, u64)>>;
    /// Grants applied by instant balances in `[from_ms, to_ms)`: (time, server, product, units).
    async fn instant_grants_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, String, String, u64)>>;
    /// A named setting, if set.
    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    /// Sets a named setting, audited.
    async fn set_setting(&self, actor: &str, key: &str, value: &str) -> StoreResult<()>;

    /// What an instant balance reads first under its product's lock, by one statement: the
    /// request's outcome if it was already answered, and the product's reserve (refused as
    /// [`StoreError::UnknownProduct`] for a product that does not exist).
    async fn instant_start(&self, request_id: Uuid, product: &str) -> StoreResult<InstantStart>;
}

/// Opens the store named by `database_url` (`postgres://…`), or the SQLite file
/// `allot.db` under `data_dir` when no URL is given, and applies pending migrations.
pub async fn open(database_url: Option<&str>, data_dir: &Path) -> StoreResult<Arc<dyn Store>> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(postgres::SqlStore::connect(url).await?))
        }
        Some(url) if url.starts_with("sqlite:") => {
            Ok(Arc::new(sqlite::SqlStore::connect(url).await?))
        }
        Some(url) => Err(StoreError::Config(format!(
            "unsupported database URL {url:?}: use postgres://… or sqlite:…"
        ))),
        None => {
            let path = data_dir.join("allot.db");
            let url = format!("sqlite://{}?mode=rwc", path.display());
            Ok(Arc::new(sqlite::SqlStore::connect(&url).await?))
        }
    }
}
