//! What the planner reads and returns: the snapshot of one run, the planner's knobs, the moves,
//! the per-cell decisions that explain them, and the errors that refuse a snapshot.

use crate::demand::Signals;
use crate::domain::MoveKind;
use crate::trigger::TriggerConfig;
use serde::{Deserialize, Serialize};

/// How long units granted to a cell are held by default (rule 2): an hour, the span within
/// which a unit released and granted back counts as ping-pong.
pub const DEFAULT_HOLD_MS: u64 = 3_600_000;

/// A metering server, as a compact id chosen by the caller so cells sort and compare cheaply.
pub type ServerId = u32;

/// A product, as a compact id chosen by the caller.
pub type ProductId = u32;

/// What a cell asked for since the last run and what its history says it will need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Demand {
    /// Highest units in use since the last run: the demand the allocation had to carry.
    pub peak_in_use: u64,
    /// Checkouts denied since the last run: pressure (a count of events, not units).
    pub denials: u64,
    /// Units clients are queued for right now: demand waiting to be served.
    pub waiting: u64,
    /// Instant-balance requests since the last run: pressure (a count, not units).
    pub instant_requests: u64,
    /// The signals read from the history (see [`crate::demand`]).
    pub signals: Signals,
}

impl Demand {
    /// Units of demand: the highest of the need (`in_use + waiting`), the peak since the last
    /// run (one more when it denied), the decaying level and the forecast.
    pub fn units(&self, in_use: u64) -> u64 {
        let peak = self.peak_in_use.saturating_add(u64::from(self.denials > 0));
        in_use
            .saturating_add(self.waiting)
            .max(peak)
            .max(self.signals.level)
            .max(self.signals.forecast)
    }

    /// Units the cell needed at some point over the whole window: the excess above what this
    /// implies has lasted the window (rule 6b).
    pub fn window_units(&self, in_use: u64) -> u64 {
        let peak = self.peak_in_use.saturating_add(u64::from(self.denials > 0));
        in_use
            .saturating_add(self.waiting)
            .max(peak)
            .max(self.signals.window_peak)
            .max(self.signals.forecast)
    }
}

/// One (server, product) cell as the balancer last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellSnapshot {
    /// The metering server holding the allocation.
    pub server: ServerId,
    /// Units the server holds now.
    pub allocation: u64,
    /// Units checked out now; may exceed the allocation under `soft_stop`.
    pub in_use: u64,
    /// The floor the balancer never reclaims below while the server is alive.
    pub min_units: u64,
    /// Free units the server should hold above its demand, so spikes are served locally.
    pub buffer_units: u64,
    /// The server is being emptied: it keeps only its in-use units and its min is ignored.
    pub draining: bool,
    /// The cell was granted units recently (an instant balance): its units are held (rule 2).
    pub recently_granted: bool,
    /// What the cell asked for and is expected to need.
    pub demand: Demand,
}

impl CellSnapshot {
    /// Units the cell needs now: in use plus what queued clients wait for.
    pub fn need(&self) -> u64 {
        self.in_use.saturating_add(self.demand.waiting)
    }

    /// Whether clients are kept waiting now, or were denied while nothing was free: such a
    /// cell's grants are never held back by the dead band. (The odd units of a water-fill go
    /// first to cells with clients waiting or denied, whatever the allocation: rule 4.)
    pub fn starving(&self) -> bool {
        self.demand.waiting > 0 || (self.demand.denials > 0 && self.allocation <= self.in_use)
    }

    /// Units the cell should hold: `max(min_units, demand + buffer)`, the buffer never below
    /// the trigger's headroom for that demand (so a run never trims a cell to where its trigger
    /// would pull straight back); for a draining server, its floor.
    pub fn want(&self, config: &PlannerConfig) -> u64 {
        if self.draining {
            return self.floor();
        }
        self.keep_for(self.demand.units(self.in_use), config)
    }

    /// The want for the largest demand of the whole window (rule 6b).
    pub fn window_want(&self, config: &PlannerConfig) -> u64 {
        if self.draining {
            return self.floor();
        }
        self.keep_for(self.demand.window_units(self.in_use), config)
    }

    fn keep_for(&self, demand: u64, config: &PlannerConfig) -> u64 {
        let headroom = if demand == 0 {
            0
        } else {
            config.trigger.headroom(demand)
        };
        self.min_units
            .max(demand.saturating_add(self.buffer_units.max(headroom)))
    }

    /// Units the planner never takes back this run: those in use, and on a live server the free
    /// units up to its min — never more than it holds.
    pub fn floor(&self) -> u64 {
        if self.draining {
            self.allocation.min(self.in_use)
        } else {
            self.allocation.min(self.in_use.max(self.min_units))
        }
    }
}

/// One product's books and cells at the start of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductSnapshot {
    /// The product these books belong to.
    pub product: ProductId,
    /// Sum of live entitlements; only used to check the books balance.
    pub purchased: u64,
    /// Units held by nobody: the source of every grant and the sink of every release.
    pub reserve: u64,
    /// Units of grants sent but not yet confirmed; left alone by the planner.
    pub in_transit: u64,
    /// Every server's cell for this product, in any order (server ids must be unique).
    pub cells: Vec<CellSnapshot>,
}

/// Everything a balance run plans over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The products to plan, in any order (product ids must be unique).
    pub products: Vec<ProductSnapshot>,
}

/// Knobs of the planner; the defaults suit most estates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// The dead band: a difference up to this share of the cell's allocation (in percent)
    /// causes no move.
    pub hysteresis_percent: u32,
    /// The dead band's least width, in units, however small the allocation.
    pub hysteresis_min_units: u64,
    /// The metering servers' trigger: buffers are never below its headroom.
    pub trigger: TriggerConfig,
    /// Whether metering servers pull instant balances. Off, the reserve is handed out
    /// (rule 7) and idle excess is never released to it.
    pub instant_balancing: bool,
}

impl PlannerConfig {
    /// No dead band, instant balancing on, the default trigger (tests, simulations).
    pub fn exact() -> Self {
        Self {
            hysteresis_percent: 0,
            hysteresis_min_units: 0,
            ..Self::default()
        }
    }

    /// The largest difference from its allocation that moves nothing for a cell holding
    /// `allocation` units.
    pub fn margin(&self, allocation: u64) -> u64 {
        let share = u128::from(allocation) * u128::from(self.hysteresis_percent) / 100;
        u64::try_from(share)
            .unwrap_or(u64::MAX)
            .max(self.hysteresis_min_units)
    }
}

impl Default for PlannerConfig {
    /// A one-unit wobble or a 10 % change moves nothing; instant balancing on.
    fn default() -> Self {
        Self {
            hysteresis_percent: 10,
            hysteresis_min_units: 1,
            trigger: TriggerConfig::default(),
            instant_balancing: true,
        }
    }
}

/// A transfer between a server and the reserve, as the planner asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Move {
    /// Server → reserve; only free units.
    Release {
        /// The server giving units back.
        server: ServerId,
        /// How many units.
        units: u64,
    },
    /// Reserve → server.
    Grant {
        /// The server receiving units.
        server: ServerId,
        /// How many units.
        units: u64,
    },
}

impl Move {
    /// The direction, in the move log's vocabulary.
    pub fn kind(&self) -> MoveKind {
        match self {
            Move::Release { .. } => MoveKind::Release,
            Move::Grant { .. } => MoveKind::Grant,
        }
    }

    /// The server at the other end of the move.
    pub fn server(&self) -> ServerId {
        match *self {
            Move::Release { server, .. } | Move::Grant { server, .. } => server,
        }
    }

    /// The units moved.
    pub fn units(&self) -> u64 {
        match *self {
            Move::Release { units, .. } | Move::Grant { units, .. } => units,
        }
    }
}

/// Which level of the pool ran out, so logs and the advisor can say why a want was not met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scarcity {
    /// Every want is met; what is left stays in the reserve.
    #[default]
    Ample,
    /// Needs are covered; wants are shared by water-filling.
    Wants,
    /// Mins and in-use are covered; what waiting clients need is shared by water-filling.
    Needs,
    /// In-use is covered; the missing min units are shared by water-filling.
    Mins,
    /// Not even the overdrafts can be covered; the units are shared by water-filling.
    InUse,
}

/// The rule that decided a cell's target: the planner's answer to "why did (or didn't) this
/// move?", shown by `allot-balancer explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Allocation, fair share and target agree: nothing to do.
    Steady,
    /// Granted up to the fair share because in-use, min or need was not covered or clients
    /// are starving (rule 5).
    GrantNeeded,
    /// Granted up to the fair share ahead of demand: level, forecast or buffer (rule 5).
    GrantAhead,
    /// A difference within the dead band: nothing moved (rules 5 and 6).
    DeadBand,
    /// A grant ahead of demand deferred: its units would come from cells that want them (6a).
    Deferred,
    /// Units granted recently are held (rule 2).
    Hold,
    /// Above its fair share, but nobody needs the excess and it has not lasted the window.
    KeptExcess,
    /// Excess that lasted the whole window went back to the reserve (rule 6b).
    ReleaseIdle,
    /// Excess released because another cell's want was unmet (rule 6a).
    ReleaseForShortage,
    /// A draining server gave back its free units (rule 6c).
    Drain,
    /// Given part of the reserve with instant balancing off (rule 7).
    Surplus,
}

impl Decision {
    /// The decision's name, as shown to operators.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Steady => "steady",
            Decision::GrantNeeded => "grant_needed",
            Decision::GrantAhead => "grant_ahead",
            Decision::DeadBand => "dead_band",
            Decision::Deferred => "deferred",
            Decision::Hold => "hold",
            Decision::KeptExcess => "kept_excess",
            Decision::ReleaseIdle => "release_idle",
            Decision::ReleaseForShortage => "release_for_shortage",
            Decision::Drain => "drain",
            Decision::Surplus => "surplus",
        }
    }
}

/// The planner's decision for one cell, with the numbers that explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellPlan {
    /// The metering server.
    pub server: ServerId,
    /// Units it held before the run.
    pub allocation: u64,
    /// Units the planner would not take back (see [`CellSnapshot::floor`]; while held, the
    /// whole allocation less what a shortage took, rule 2).
    pub floor: u64,
    /// Units it needs now (see [`CellSnapshot::need`]).
    pub need: u64,
    /// Units it should hold (see [`CellSnapshot::want`]).
    pub want: u64,
    /// What max-min fairness gives it.
    pub fair_share: u64,
    /// Units it should hold after the run.
    pub target: u64,
    /// The rule that decided the target.
    pub decision: Decision,
}

impl CellPlan {
    /// Whether the dead band, a hold or kept excess left the allocation off its fair share.
    pub fn held(&self) -> bool {
        self.target != self.fair_share
    }
}

/// The planner's decision for one product.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductPlan {
    /// The product planned.
    pub product: ProductId,
    /// The reserve once every move is done.
    pub reserve: u64,
    /// Which level ran out, if any.
    pub scarcity: Scarcity,
    /// Under scarcity, the increment every short cell got at that level (one more for the
    /// first few); `None` when every want is met.
    pub water_level: Option<u64>,
    /// One entry per cell, sorted by server id.
    pub cells: Vec<CellPlan>,
    /// The moves that reach the targets: every release (by server id), then every grant.
    pub moves: Vec<Move>,
}

/// The planner's decision for a whole snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// One entry per product, sorted by product id.
    pub products: Vec<ProductPlan>,
}

/// Why a snapshot could not be planned, or a plan not applied; nothing is planned or applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The same product appears twice in one snapshot.
    #[error("product {product} appears twice in the snapshot")]
    DuplicateProduct {
        /// The repeated product.
        product: ProductId,
    },
    /// The same server appears twice among one product's cells.
    #[error("server {server} appears twice among the cells of product {product}")]
    DuplicateCell {
        /// The product.
        product: ProductId,
        /// The repeated server.
        server: ServerId,
    },
    /// reserve + in_transit + Σ allocation ≠ purchased: planning on such books could over-grant.
    #[error(
        "books of product {product} do not balance: reserve {reserve} + in transit {in_transit} + allocated {allocated} != purchased {purchased}"
    )]
    BooksDoNotBalance {
        /// The product.
        product: ProductId,
        /// Its purchased units.
        purchased: u64,
        /// Its reserve.
        reserve: u64,
        /// Its units in transit.
        in_transit: u64,
        /// The sum of its allocations.
        allocated: u128,
    },
    /// A plan names a product the snapshot does not have.
    #[error("the plan names product {product}, which the snapshot lacks")]
    UnknownProduct {
        /// The product.
        product: ProductId,
    },
    /// A plan names a cell the snapshot does not have.
    #[error("the plan names server {server} for product {product}, which the snapshot lacks")]
    UnknownCell {
        /// The product.
        product: ProductId,
        /// The server.
        server: ServerId,
    },
    /// A release would take units that are in use or not there.
    #[error(
        "release of {units} units from server {server} of product {product} exceeds its {free} free units"
    )]
    ReleaseExceedsFree {
        /// The product.
        product: ProductId,
        /// The server.
        server: ServerId,
        /// Units the move releases.
        units: u64,
        /// Units free on the server.
        free: u64,
    },
    /// A grant would take more units than the reserve holds at that point.
    #[error(
        "grant of {units} units to server {server} of product {product} exceeds the reserve of {reserve}"
    )]
    GrantExceedsReserve {
        /// The product.
        product: ProductId,
        /// The server.
        server: ServerId,
        /// Units the move grants.
        units: u64,
        /// Units in the reserve at that point.
        reserve: u64,
    },
}
