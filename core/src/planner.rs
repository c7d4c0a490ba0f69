//! The planner: the pure function that decides where every unit of a product should sit.
//!
//! A balance run gathers a [`Snapshot`] (per product: purchased, reserve, in transit; per
//! (server, product) cell: allocation, in use, waiting, min, buffer, draining, the demand
//! signals of [`crate::demand`] and whether the cell was granted units recently), calls
//! [`plan`], then executes the [`Move`]s it returns — releases first, then grants. The planner
//! does no I/O, reads no clock, draws no random number and never iterates a hash map: the same
//! snapshot always yields the same [`Plan`], bit for bit, whatever the order of its products and
//! cells. Servers and products are compact integer ids chosen by the caller (the balancer maps
//! names to ids), so a million cells plan in well under a second.
//!
//! The policy is **grant fast, take back slow**: a unit moves to a cell as soon as the cell's
//! want is above its allocation by more than a dead band, but a unit leaves a cell only when
//! another cell needs it now, or when the cell's excess has lasted a whole window. Moving a unit
//! costs two messages and, when it comes back, a wait; a unit left where it sits costs nothing
//! until someone else needs it, and then the instant balance finds it.
//!
//! # Rules
//!
//! For each product, `pool = reserve + Σ allocation` units are shared between the cells and the
//! reserve. `in_transit` is not touched: the caller resumes in-flight moves before planning and
//! the planner works with the reserve as given.
//!
//! 1. **Conservation.** `reserve' + Σ target = reserve + Σ allocation`. The snapshot's books must
//!    balance (`reserve + in_transit + Σ allocation = purchased`), otherwise [`plan`] refuses it
//!    with [`PlanError::BooksDoNotBalance`] and plans nothing.
//! 2. **Held units.** Each cell has a *floor* the planner never takes back:
//!    `min(allocation, in_use)` on a draining server, `min(allocation, max(in_use, min_units))`
//!    otherwise — in-use units are never released (a release takes only free units) and, as
//!    DESIGN.md says, a live server is never reclaimed below its `min_units`. A cell granted
//!    units recently ([`CellSnapshot::recently_granted`]) is *held*: its floor is its whole
//!    allocation, unless a real shortage (rule 3's in-use, mins or needs not covered) needs its
//!    units, so a run never takes back what an instant balance has just brought.
//! 3. **Levels, filled in order.** Above the floor the pool fills four levels, each completely
//!    before the next starts: (a) *in-use cover* — `in_use` (a soft-stop overdraft gets units
//!    to cover it); (b) *mins* — `max(in_use, min_units)`; (c) *needs* — in use plus the units
//!    clients wait for now ([`CellSnapshot::need`]); (d) *wants* — [`CellSnapshot::want`]: the
//!    demand (need, peak since the last run, decaying level, forecast) plus a buffer of at least
//!    the trigger's headroom. A draining server's levels all equal its floor. Event counts
//!    (denials, instant requests) are pressure, not units: a cell that denied since the last run
//!    wants one unit above its peak.
//! 4. **Fairness: max-min fair water-filling.** The first level that does not fit (the
//!    [`Scarcity`]) is shared by water-filling the increments each cell still needs above the
//!    previous level: every cell gets `min(need, s)` where the water level `s` is the largest
//!    that fits, and the `r < k` units left over go one each to the first `r` of the `k` cells
//!    still short, ordered cells with clients waiting or denied since the last run first, then
//!    by a fixed mix of (product, server) ids — an order that never reads the allocation. A
//!    held cell's increment counts from where it would stand without its hold: it gets
//!    `max(allocation, previous level + min(need, s))`, so a hold keeps units but never earns
//!    a larger share (else a cell granted units would, held at its new allocation, be
//!    water-filled again on top of it at every run). The result is the cell's *fair share*; no
//!    fair share exceeds the want, or a held cell's allocation if that is more.
//! 5. **Grant fast.** A cell below its fair share is granted the difference when it is urgent
//!    (the allocation does not cover its in-use, min or need, or the cell is starving) or when
//!    the difference exceeds the dead band (`margin`: [`PlannerConfig::margin`] of the
//!    allocation); a smaller difference stays in the reserve.
//! 6. **Take back slow.** A cell above its fair share keeps its excess, except: (a) as much as
//!    rule 5's *urgent* grants need beyond the reserve — first units above the donors' wants,
//!    then units between a donor's fair share and its want (largest first, then by server id);
//!    a grant ahead of demand that the reserve cannot fund is deferred (largest first), since
//!    pre-positioning is worth a move from the reserve but not two moves and a donor's wait —
//!    with instant balancing off, when the runs are the only way units move, every grant is
//!    funded this way; (b) with instant balancing on, the excess above what the cell
//!    needed over the whole window ([`CellSnapshot::window_want`]) when it is beyond the dead
//!    band and the cell is not held — it goes to the reserve, the shared buffer every site can
//!    draw from in one move; (c) a draining server gives back every free unit.
//! 7. **Surplus.** With instant balancing off ([`PlannerConfig::instant_balancing`]) nobody can
//!    draw from the reserve between runs, so what is left in it after rules 5–6 is granted to
//!    the live cells in proportion to their wants, and rule 6(b) does not apply.
//!
//! Applying a plan and planning again with the same demand, the cells just granted held as the
//! balancer holds them, yields no moves
//! (idempotence), also when the cells it granted are held at the next run: the fair shares
//! depend on the allocations only through the floors, and a hold a grant raised sits where the
//! water-fill brings the cell anyway; a grant reaches the fair share, a held difference is held
//! again, and a release stops at the fair share or the window's want.

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
    /// Units the planner would not take back (see [`CellSnapshot::floor`]; the whole
    /// allocation while held).
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

/// Plans every product of the snapshot; see the [module documentation](self) for the rules.
///
/// Products and cells may come in any order; the result is sorted by id and identical for
/// identical input. Fails, planning nothing, if a product or a cell is repeated or a product's
/// books do not balance.
pub fn plan(snapshot: &Snapshot, config: &PlannerConfig) -> Result<Plan, PlanError> {
    let mut order: Vec<usize> = (0..snapshot.products.len()).collect();
    order.sort_unstable_by_key(|&i| snapshot.products[i].product);
    if let Some(pair) = order
        .windows(2)
        .find(|pair| snapshot.products[pair[0]].product == snapshot.products[pair[1]].product)
    {
        return Err(PlanError::DuplicateProduct {
            product: snapshot.products[pair[0]].product,
        });
    }
    let mut scratch = Scratch::default();
    let products = order
        .into_iter()
        .map(|i| plan_product_with(&snapshot.products[i], config, &mut scratch))
        .collect::<Result<_, _>>()?;
    Ok(Plan { products })
}

/// Plans one product; the same rules as [`plan`], for a caller that balances a single product
/// or wants one bad product not to stop the others.
pub fn plan_product(
    product: &ProductSnapshot,
    config: &PlannerConfig,
) -> Result<ProductPlan, PlanError> {
    plan_product_with(product, config, &mut Scratch::default())
}

/// Per-cell working state of one product's planning.
struct Work {
    /// Index into the snapshot's cells.
    cell: usize,
    /// The cell's server, the sort key.
    server: ServerId,
    /// Whether clients waited or were denied since the last run: first in line for the odd
    /// units. Unlike [`CellSnapshot::starving`] this does not read the allocation, so applying
    /// a plan never moves an odd unit to another cell at the next run.
    starving: bool,
    /// Units held so far by the fair-share computation; in the end, the fair share.
    level: u64,
    /// Units planned.
    target: u64,
    /// The floor the fill started from (the whole allocation while held).
    floor: u64,
    /// The floor without a hold ([`CellSnapshot::floor`]).
    plain_floor: u64,
    /// The four levels as they would be without a hold: in-use cover, mins, needs, wants. The
    /// fill never goes below `floor`.
    levels: [u64; 4],
    /// Units above the fair share that rule 6a may still release.
    releasable: u64,
    /// The cell's want.
    want: u64,
    /// The cell's allocation before the run.
    allocation: u64,
    /// Why the target is what it is.
    decision: Decision,
}

/// Buffers reused from one product to the next, so planning a million cells does not ask the
/// allocator for thousands of fresh vectors.
#[derive(Default)]
struct Scratch {
    /// One entry per cell, sorted by server id.
    work: Vec<Work>,
    /// Where the cells of a water-fill start and stop absorbing water, each sorted.
    starts: Vec<u64>,
    /// See `starts`.
    ends: Vec<u64>,
    /// Positions (in `work`) of the cells a water-fill left short.
    short: Vec<usize>,
    /// Positions (in `work`) of cells whose excess rule 6a may release.
    donors: Vec<usize>,
}

fn plan_product_with(
    product: &ProductSnapshot,
    config: &PlannerConfig,
    scratch: &mut Scratch,
) -> Result<ProductPlan, PlanError> {
    let cells = &product.cells;
    let allocated: u128 = cells.iter().map(|c| u128::from(c.allocation)).sum();
    let books = u128::from(product.reserve) + u128::from(product.in_transit) + allocated;
    if books != u128::from(product.purchased) {
        return Err(PlanError::BooksDoNotBalance {
            product: product.product,
            purchased: product.purchased,
            reserve: product.reserve,
            in_transit: product.in_transit,
            allocated,
        });
    }
    // At most `purchased`, so every per-product sum below fits in u64 once the floors are in.
    let pool = u128::from(product.reserve) + allocated;

    // Rules 2–4 with recently granted cells held; if that leaves in-use, a min or a need
    // uncovered while a held cell has units above its own floor, plan again without holds.
    let (mut scarcity, mut water_level) = fair_shares(product, config, pool, true, scratch)?;
    let held_units = scratch.work.iter().any(|w| w.floor > cells[w.cell].floor());
    if held_units && !matches!(scarcity, Scarcity::Ample | Scarcity::Wants) {
        (scarcity, water_level) = fair_shares(product, config, pool, false, scratch)?;
    }
    let work = &mut scratch.work;

    // Rules 5 and 6: grant fast, take back slow.
    let mut planned: u128 = 0;
    for w in work.iter_mut() {
        let c = &cells[w.cell];
        let fair = w.level;
        let margin = config.margin(c.allocation);
        (w.target, w.decision) = if c.draining {
            (
                fair,
                if fair < c.allocation {
                    Decision::Drain
                } else {
                    Decision::Steady
                },
            )
        } else if fair > c.allocation {
            let urgent = c.allocation < w.levels[2] || c.starving();
            if urgent {
                (fair, Decision::GrantNeeded)
            } else if fair - c.allocation > margin {
                (fair, Decision::GrantAhead)
            } else {
                (c.allocation, Decision::DeadBand)
            }
        } else if fair < c.allocation {
            let idle_to = fair.max(c.window_want(config));
            if config.instant_balancing
                && !c.recently_granted
                && c.allocation > idle_to
                && c.allocation - idle_to > margin
            {
                (idle_to, Decision::ReleaseIdle)
            } else if c.allocation - fair <= margin {
                (c.allocation, Decision::DeadBand)
            } else {
                (c.allocation, Decision::KeptExcess)
            }
        } else if w.floor > c.floor() {
            (fair, Decision::Hold)
        } else {
            (fair, Decision::Steady)
        };
        w.releasable = w.target.saturating_sub(fair);
        planned += u128::from(w.target);
    }
    // Rule 6a: the grants need more than the reserve holds. Grants ahead of demand are deferred
    // (the reserve alone funds them); the urgent ones take excess above the donors' wants, then
    // units between the donors' fair shares and wants.
    // With instant balancing off, nobody can pull between runs: every grant is funded.
    if planned > pool && config.instant_balancing {
        planned = defer_grants_ahead(work, planned, pool, config);
    }
    if planned > pool {
        let mut donors = std::mem::take(&mut scratch.donors);
        for above_want in [true, false] {
            if planned <= pool {
                break;
            }
            let spare = |w: &Work| {
                if above_want {
                    w.releasable.min(w.target.saturating_sub(w.want))
                } else {
                    w.releasable
                }
            };
            donors.clear();
            donors.extend((0..work.len()).filter(|&k| spare(&work[k]) > 0));
            donors.sort_unstable_by(|&a, &b| {
                spare(&work[b])
                    .cmp(&spare(&work[a]))
                    .then(work[a].server.cmp(&work[b].server))
            });
            for &k in donors.iter() {
                if planned <= pool {
                    break;
                }
                let over = u64::try_from(planned - pool).unwrap_or(u64::MAX);
                let take = spare(&work[k]).min(over);
                work[k].target -= take;
                work[k].releasable -= take;
                work[k].decision = Decision::ReleaseForShortage;
                planned -= u128::from(take);
            }
        }
        scratch.donors = donors;
    }
    debug_assert!(planned <= pool, "fair shares fit the pool");
    // Rule 7: with no instant balancing, the reserve is handed out in proportion to wants.
    if !config.instant_balancing && planned < pool {
        let left = u64::try_from(pool - planned).expect("at most purchased");
        let weights: Vec<u128> = work
            .iter()
            .map(|w| {
                let c = &cells[w.cell];
                if c.draining {
                    0
                } else {
                    u128::from(c.want(config)).saturating_add(1)
                }
            })
            .collect();
        let total: u128 = weights.iter().sum();
        if total > 0 {
            let mut given = 0u64;
            let mut shares: Vec<(u128, usize)> = Vec::with_capacity(work.len());
            for (k, &weight) in weights.iter().enumerate() {
                let exact = u128::from(left) * weight;
                let share =
                    u64::try_from(exact.checked_div(total).unwrap_or(0)).expect("below left");
                given += share;
                work[k].target += share;
                shares.push((exact.checked_rem(total).unwrap_or(0), k));
                if share > 0 {
                    work[k].decision = Decision::Surplus;
                }
            }
            // Largest remainders take the odd units, ties by server id.
            shares.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(_, k) in shares
                .iter()
                .filter(|s| weights[s.1] > 0)
                .take((left - given) as usize)
            {
                work[k].target += 1;
                work[k].decision = Decision::Surplus;
            }
            planned = pool;
        }
    }

    let mut moves = Vec::with_capacity(work.len());
    moves.extend(work.iter().filter_map(|w| {
        let allocation = cells[w.cell].allocation;
        (w.target < allocation).then(|| Move::Release {
            server: w.server,
            units: allocation - w.target,
        })
    }));
    moves.extend(work.iter().filter_map(|w| {
        let allocation = cells[w.cell].allocation;
        (w.target > allocation).then(|| Move::Grant {
            server: w.server,
            units: w.target - allocation,
        })
    }));
    let cell_plans = work
        .iter()
        .map(|w| {
            let c = &cells[w.cell];
            CellPlan {
                server: c.server,
                allocation: c.allocation,
                floor: w.floor,
                need: c.need(),
                want: c.want(config),
                fair_share: w.level,
                target: w.target,
                decision: w.decision,
            }
        })
        .collect();
    Ok(ProductPlan {
        product: product.product,
        reserve: u64::try_from(pool - planned).expect("the reserve is at most purchased"),
        scarcity,
        water_level,
        cells: cell_plans,
        moves,
    })
}

/// Rule 6a's middle step: grants ahead of demand are cut back (largest first, then by server
/// id) until the plan fits the pool or none is left; returns the units then planned.
fn defer_grants_ahead(
    work: &mut [Work],
    mut planned: u128,
    pool: u128,
    config: &PlannerConfig,
) -> u128 {
    let mut ahead: Vec<usize> = (0..work.len())
        .filter(|&k| work[k].decision == Decision::GrantAhead)
        .collect();
    let grant = |w: &Work| w.target - w.allocation;
    ahead.sort_unstable_by(|&a, &b| {
        grant(&work[b])
            .cmp(&grant(&work[a]))
            .then(work[a].server.cmp(&work[b].server))
    });
    for k in ahead {
        if planned <= pool {
            break;
        }
        let w = &mut work[k];
        let granted = w.target - w.allocation;
        let over = u64::try_from(planned - pool).unwrap_or(u64::MAX);
        let mut cut = granted.min(over);
        // What is left of a grant must still be worth a move (rule 5's dead band).
        if granted - cut <= config.margin(w.allocation) {
            cut = granted;
        }
        w.target -= cut;
        planned -= u128::from(cut);
        w.decision = if cut == granted {
            Decision::Deferred
        } else {
            Decision::GrantAhead
        };
    }
    planned
}

/// Rules 2–4: fills `scratch.work` with every cell's floor, levels and fair share (`level`).
/// With `hold`, a recently granted live cell's floor is its whole allocation.
fn fair_shares(
    product: &ProductSnapshot,
    config: &PlannerConfig,
    pool: u128,
    hold: bool,
    scratch: &mut Scratch,
) -> Result<(Scarcity, Option<u64>), PlanError> {
    let work = &mut scratch.work;
    work.clear();
    work.extend(product.cells.iter().enumerate().map(|(i, c)| {
        let plain_floor = c.floor();
        let floor = if hold && c.recently_granted && !c.draining {
            c.allocation
        } else {
            plain_floor
        };
        let levels = if c.draining {
            [floor; 4]
        } else {
            // From the plain floor: a hold raises where the fill starts (`level`), not the
            // increments a water-fill measures (see `water_fill`).
            let cover = plain_floor.max(c.in_use);
            let mins = cover.max(c.min_units);
            let needs = mins.max(c.need());
            [cover, mins, needs, needs.max(c.want(config))]
        };
        Work {
            cell: i,
            server: c.server,
            starving: c.demand.waiting > 0 || c.demand.denials > 0,
            level: floor,
            target: floor,
            floor,
            plain_floor,
            levels,
            releasable: 0,
            want: c.want(config),
            allocation: c.allocation,
            decision: Decision::Steady,
        }
    }));
    // Cells usually arrive sorted, which this sort detects in one pass.
    work.sort_unstable_by_key(|w| w.server);
    if let Some(pair) = work
        .windows(2)
        .find(|pair| pair[0].server == pair[1].server)
    {
        return Err(PlanError::DuplicateCell {
            product: product.product,
            server: pair[0].server,
        });
    }
    let floors: u128 = work.iter().map(|w| u128::from(w.level)).sum();
    // Floors never exceed allocations, so they fit the pool.
    let mut remaining = pool - floors;
    for (tier, short) in [
        Scarcity::InUse,
        Scarcity::Mins,
        Scarcity::Needs,
        Scarcity::Wants,
    ]
    .into_iter()
    .enumerate()
    {
        let need: u128 = work
            .iter()
            .map(|w| u128::from(w.levels[tier].saturating_sub(w.level)))
            .sum();
        if need <= remaining {
            for w in work.iter_mut() {
                w.level = w.level.max(w.levels[tier]);
            }
            remaining -= need;
        } else {
            let water = water_fill(
                work,
                tier,
                remaining,
                product.product,
                &mut scratch.starts,
                &mut scratch.ends,
                &mut scratch.short,
            );
            return Ok((short, Some(water)));
        }
    }
    Ok((Scarcity::Ample, None))
}

/// Raises every cell toward `levels[tier]` by max-min fair increments, spending exactly
/// `budget` units (less than the total need), and returns the water level reached.
///
/// Increments are measured from the cell's level without a hold (its *base*: the previous
/// level, or the plain floor): with water level `s`, a cell ends at `max(floor, base +
/// min(need, s))`, the first few short cells one unit more. A held cell therefore absorbs water
/// only once the level passes the units it already holds: a hold keeps units, it never earns a
/// larger increment than an unheld cell — otherwise a cell granted units would, held at its new
/// allocation, be water-filled again on top of it at the next run, and again at the one after.
fn water_fill(
    work: &mut [Work],
    tier: usize,
    budget: u128,
    product: ProductId,
    starts: &mut Vec<u64>,
    ends: &mut Vec<u64>,
    short: &mut Vec<usize>,
) -> u64 {
    // The water levels between which a cell absorbs water: from what it holds above its base
    // to its need.
    let span = |w: &Work| {
        let base = if tier == 0 {
            w.plain_floor
        } else {
            w.levels[tier - 1]
        };
        (w.level - base, w.levels[tier].saturating_sub(base))
    };
    starts.clear();
    ends.clear();
    for w in work.iter() {
        let (start, end) = span(w);
        if end > start {
            starts.push(start);
            ends.push(end);
        }
    }
    starts.sort_unstable();
    ends.sort_unstable();

    // Find s, the largest water level with Σ clamp(s, start, end) - start ≤ budget, sweeping s
    // upwards: between two events, each cell with start ≤ s < end absorbs one unit per step.
    let mut left = budget;
    let (mut level, mut absorbing) = (0u64, 0u128);
    let (mut i, mut j) = (0, 0);
    let water = loop {
        let next = starts
            .get(i)
            .into_iter()
            .chain(ends.get(j))
            .copied()
            .min()
            .expect("the budget is less than the total need");
        let step = absorbing * u128::from(next - level);
        if step > left {
            // left / absorbing < next - level, so it fits in u64.
            let rise = u64::try_from(left / absorbing).expect("below the next event");
            left %= absorbing;
            break level + rise;
        }
        left -= step;
        level = next;
        while starts.get(i) == Some(&level) {
            absorbing += 1;
            i += 1;
        }
        while ends.get(j) == Some(&level) {
            absorbing -= 1;
            j += 1;
        }
    };

    short.clear();
    for (k, w) in work.iter_mut().enumerate() {
        let (start, end) = span(w);
        if end > start {
            w.level += water.clamp(start, end) - start;
            if start <= water && water < end {
                short.push(k);
            }
        }
    }
    // `left` < short.len() (the cells absorbing at the water level): the odd units go one each
    // to the best-ranked short cells — starving first, then by a fixed scramble of (product,
    // server).
    let odd = usize::try_from(left).expect("fewer than the cells");
    if odd > 0 {
        let rank = |k: &usize| (!work[*k].starving, mix(product, work[*k].server));
        short.select_nth_unstable_by_key(odd - 1, rank);
        for &k in &short[..odd] {
            work[k].level += 1;
        }
    }
    water
}

/// A fixed bijective scramble of (product, server), so the odd units of a water-fill fall on
/// different servers for different products.
fn mix(product: ProductId, server: ServerId) -> u64 {
    // splitmix64's finaliser: a bijection, so ranks never tie between servers.
    let mut z = (u64::from(product) << 32 | u64::from(server)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The snapshot after every move of `plan` is done: allocations at their targets, reserves
/// updated, everything else (in use, demand, in transit) unchanged. Used by tests and by the
/// workload simulator; fails if a move does not fit the snapshot (a release of units that are
/// not free, a grant the reserve cannot cover at that point, an unknown product or server).
pub fn apply(snapshot: &Snapshot, plan: &Plan) -> Result<Snapshot, PlanError> {
    let mut after = snapshot.clone();
    let mut order: Vec<usize> = (0..after.products.len()).collect();
    order.sort_unstable_by_key(|&i| after.products[i].product);
    for product_plan in &plan.products {
        let at = order
            .binary_search_by_key(&product_plan.product, |&i| after.products[i].product)
            .map_err(|_| PlanError::UnknownProduct {
                product: product_plan.product,
            })?;
        let i = order[at];
        after.products[i] = apply_product(&after.products[i], product_plan)?;
    }
    Ok(after)
}

/// [`apply`] for one product.
pub fn apply_product(
    snapshot: &ProductSnapshot,
    plan: &ProductPlan,
) -> Result<ProductSnapshot, PlanError> {
    let mut after = snapshot.clone();
    let product = after.product;
    let mut order: Vec<usize> = (0..after.cells.len()).collect();
    order.sort_unstable_by_key(|&i| after.cells[i].server);
    for m in &plan.moves {
        let server = m.server();
        let at = order
            .binary_search_by_key(&server, |&i| after.cells[i].server)
            .map_err(|_| PlanError::UnknownCell { product, server })?;
        let cell = &mut after.cells[order[at]];
        match *m {
            Move::Release { units, .. } => {
                let free = cell.allocation.saturating_sub(cell.in_use);
                if units > free {
                    return Err(PlanError::ReleaseExceedsFree {
                        product,
                        server,
                        units,
                        free,
                    });
                }
                cell.allocation -= units;
                after.reserve += units;
            }
            Move::Grant { units, .. } => {
                if units > after.reserve {
                    return Err(PlanError::GrantExceedsReserve {
                        product,
                        server,
                        units,
                        reserve: after.reserve,
                    });
                }
                after.reserve -= units;
                cell.allocation += units;
            }
        }
    }
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cells filling their wants: (previous level, want), no holds.
    fn work(levels: &[(u64, u64)]) -> Vec<Work> {
        levels
            .iter()
            .enumerate()
            .map(|(k, &(level, cap))| Work {
                cell: k,
                server: k as ServerId,
                starving: false,
                level,
                target: level,
                levels: [level, level, level, cap],
                floor: level,
                plain_floor: level,
                releasable: 0,
                want: cap,
                allocation: level,
                decision: Decision::Steady,
            })
            .collect()
    }

    fn fill(work: &mut [Work], budget: u128) -> u64 {
        water_fill(
            work,
            3,
            budget,
            0,
            &mut Vec::new(),
            &mut Vec::new(),
            &mut Vec::new(),
        )
    }

    #[test]
    fn water_fill_gives_equal_increments_capped_by_need() {
        // Needs 1, 5, 10; 9 units: 1 to the first, 4 each to the others.
        let mut w = work(&[(0, 1), (3, 8), (0, 10)]);
        let water = fill(&mut w, 9);
        assert_eq!(water, 4);
        let levels: Vec<u64> = w.iter().map(|w| w.level).collect();
        assert_eq!(levels, [1, 7, 4]);
    }

    #[test]
    fn water_fill_gives_odd_units_by_rank() {
        let mut w = work(&[(0, 10), (0, 10), (0, 10)]);
        w[2].starving = true; // first in line for the odd unit
        let water = fill(&mut w, 7);
        assert_eq!(water, 2);
        let levels: Vec<u64> = w.iter().map(|w| w.level).collect();
        assert_eq!(levels, [2, 2, 3]);
    }

    #[test]
    fn water_fill_counts_a_held_cell_from_its_base() {
        // Both want 10 from nothing; the first holds 5 already. 5 units bring the other level
        // with it; 2 more go one each.
        let mut w = work(&[(0, 10), (0, 10)]);
        w[0].floor = 5;
        w[0].level = 5;
        assert_eq!(fill(&mut w, 5), 5);
        assert_eq!([w[0].level, w[1].level], [5, 5]);
        let mut w = work(&[(0, 10), (0, 10)]);
        w[0].floor = 5;
        w[0].level = 5;
        assert_eq!(fill(&mut w, 7), 6);
        assert_eq!([w[0].level, w[1].level], [6, 6]);
        // Held above the water: it keeps its units and absorbs nothing.
        let mut w = work(&[(0, 10), (0, 10), (0, 10)]);
        w[0].floor = 8;
        w[0].level = 8;
        assert_eq!(fill(&mut w, 9), 4);
        let levels: Vec<u64> = w.iter().map(|w| w.level).collect();
        assert_eq!(levels[0], 8);
        assert_eq!(levels[1] + levels[2], 9);
    }

    #[test]
    fn mix_separates_servers() {
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(mix(0, 0), mix(0, 1));
    }
}
