//! The planner: the pure function that decides where every unit of a product should sit.
//!
//! A balance run gathers a [`Snapshot`] (per product: purchased, reserve, in transit; per
//! (server, product) cell: allocation, in use, min, buffer, draining, and the demand signals
//! since the last run), calls [`plan`], then executes the [`Move`]s it returns — releases first,
//! then grants. The planner does no I/O, reads no clock, draws no random number and never
//! iterates a hash map: the same snapshot always yields the same [`Plan`], bit for bit, whatever
//! the order of its products and cells. Servers and products are compact integer ids chosen by
//! the caller (the balancer maps names to ids), so a million cells plan in well under a second.
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
//!    DESIGN.md says, a live server is never reclaimed below its `min_units`.
//! 3. **Levels, filled in order.** Above the floor the pool fills three levels, each completely
//!    before the next starts: (a) *in-use cover* — `in_use` (a soft-stop overdraft gets units
//!    to cover it); (b) *mins* — `max(in_use, min_units)`; (c) *wants* — [`CellSnapshot::want`].
//!    A draining server's levels all equal its floor: it gets nothing and gives back every free
//!    unit, its mins ignored. So when `Σ max(in_use, min_units)` over live cells plus the floors of
//!    draining cells fits in the pool, every live cell gets at least its min and its in-use.
//! 4. **Fairness: max-min fair water-filling.** The first level that does not fit (the
//!    [`Scarcity`]) is shared by water-filling the increments each cell still needs above the
//!    previous level: every cell gets `min(need, s)` where the water level `s` is the largest
//!    that fits, and the `r < k` units left over go one each to the first `r` of the `k` cells
//!    still short, ordered starving cells first (denials or waiting clients), then by a fixed
//!    mix of (product, server) ids so the odd unit does not always land on the lowest server id.
//!    Hence no cell that is short of its need at that level gets an increment smaller than any
//!    other cell's increment minus one, and no cell gets more than it wants. Later levels get
//!    nothing.
//! 5. **Free units stay in the reserve.** No cell is planned above its want: units beyond every
//!    want stay in the reserve, so an instant request is served without a reclaim, and a cell
//!    holding more than its want gives the excess back (unless hysteresis holds it, below) even
//!    when nobody else needs it right now — the reserve is the shared buffer.
//! 6. **Hysteresis.** The result of rules 1–5 is the cell's *fair share*. A cell keeps its
//!    current allocation instead when `|fair share − allocation| ≤ margin`, with
//!    `margin = max(hysteresis_min_units, want × hysteresis_percent / 100)`, except that
//!    hysteresis never delays a grant that covers in-use or a min, nor a grant to a starving
//!    cell, nor any move of a draining server. A held release must also be affordable: if the
//!    units held back are needed by the grants, held releases are let go (largest first, then by
//!    server id) until the books balance, so hysteresis never starves anyone of a grant.
//!
//! Applying a plan and planning again with the same demand signals yields no moves
//! (idempotence). Fair shares depend on the allocations only through the floors and never on
//! them in the odd-unit order. Once a plan is applied, either every level it covered stays
//! covered, which gives the same fair shares, or the pool is used up at the floors. A difference
//! that hysteresis held is held again, and the held units are still affordable.

use crate::domain::MoveKind;
use serde::{Deserialize, Serialize};

/// A metering server, as a compact id chosen by the caller so cells sort and compare cheaply.
pub type ServerId = u32;

/// A product, as a compact id chosen by the caller.
pub type ProductId = u32;

/// What a cell asked for since the last run; all in units so the arithmetic is exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Demand {
    /// Highest units in use since the last run: the demand the allocation had to carry.
    pub peak_in_use: u64,
    /// Checkouts denied since the last run: demand the allocation failed to carry.
    pub denials: u64,
    /// Clients queued right now for a unit: demand waiting to be served.
    pub waiting: u64,
    /// Units asked for by instant-balance requests since the last run.
    pub instant_requests: u64,
    /// Smoothed historic demand (e.g. an EWMA of peaks, rounded up), so a want does not drop
    /// the moment a peak ends.
    pub smoothed: u64,
}

impl Demand {
    /// Whether clients are being turned away or kept waiting now: such a cell is never held back
    /// by hysteresis and gets the odd unit first under scarcity.
    pub fn starving(&self) -> bool {
        self.denials > 0 || self.waiting > 0
    }

    /// Units of demand: the highest of `in_use`, `peak_in_use` and `smoothed`, plus the unmet
    /// pressure — the highest of `waiting`, `denials` and `instant_requests` (the highest, not
    /// the sum, because one short client often shows up in all three).
    pub fn units(&self, in_use: u64) -> u64 {
        let carried = in_use.max(self.peak_in_use).max(self.smoothed);
        let pressure = self.waiting.max(self.denials).max(self.instant_requests);
        carried.saturating_add(pressure)
    }
}

/// One (server, product) cell as the balancer last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellSnapshot {
    /// The metering server holding the allocation.
    pub server: ServerId,
    /// Units the server holds now.
    pub allocation: u64,
    /// Units checked out now; may exceed the allocation under `soft_stop` (overdraft).
    pub in_use: u64,
    /// The floor the balancer never reclaims below while the server is alive.
    pub min_units: u64,
    /// Free units the server should hold above its demand, so spikes are served locally.
    pub buffer_units: u64,
    /// The server is being emptied: it keeps only its in-use units and its min is ignored.
    pub draining: bool,
    /// What the cell asked for since the last run.
    pub demand: Demand,
}

impl CellSnapshot {
    /// Units the cell should hold: `max(min_units, demand + buffer_units)` (see
    /// [`Demand::units`]); for a draining server, its floor.
    pub fn want(&self) -> u64 {
        if self.draining {
            self.floor()
        } else {
            self.min_units.max(
                self.demand
                    .units(self.in_use)
                    .saturating_add(self.buffer_units),
            )
        }
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
    /// A difference up to this share of the cell's want (in percent) causes no move.
    pub hysteresis_percent: u32,
    /// A difference up to this many units causes no move, however small the want.
    pub hysteresis_min_units: u64,
}

impl PlannerConfig {
    /// No hysteresis at all: every target is the exact fair share (tests, simulations).
    pub const EXACT: Self = Self {
        hysteresis_percent: 0,
        hysteresis_min_units: 0,
    };

    /// The largest difference between fair share and allocation that causes no move for a cell
    /// with this want.
    pub fn margin(&self, want: u64) -> u64 {
        let share = u128::from(want) * u128::from(self.hysteresis_percent) / 100;
        u64::try_from(share)
            .unwrap_or(u64::MAX)
            .max(self.hysteresis_min_units)
    }
}

impl Default for PlannerConfig {
    /// A one-unit wobble or a 10 % change of a want moves nothing.
    fn default() -> Self {
        Self {
            hysteresis_percent: 10,
            hysteresis_min_units: 1,
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
    /// Mins and in-use are covered; wants are shared by water-filling.
    Wants,
    /// In-use is covered; the missing min units are shared by water-filling.
    Mins,
    /// Not even the overdrafts can be covered; the units are shared by water-filling.
    InUse,
}

/// The planner's decision for one cell, with the numbers that explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellPlan {
    /// The metering server.
    pub server: ServerId,
    /// Units it held before the run.
    pub allocation: u64,
    /// Units the planner would not take back (see [`CellSnapshot::floor`]).
    pub floor: u64,
    /// Units it should hold (see [`CellSnapshot::want`]).
    pub want: u64,
    /// What max-min fairness gives it, before hysteresis.
    pub fair_share: u64,
    /// Units it should hold after the run: the fair share, or the allocation when hysteresis
    /// holds a small difference back.
    pub target: u64,
}

impl CellPlan {
    /// Whether hysteresis kept the allocation although the fair share differs.
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
/// Fairness rule: when the pool cannot cover a level (in-use, then mins, then wants) for every
/// cell, that level is shared by max-min fair water-filling of what each cell still needs above
/// the previous level — no short cell gets less than another cell's increment minus one unit,
/// and no cell gets more than it wants; the odd units go to starving cells first, then in a
/// fixed order of (product, server). Products and cells may come in any order; the result is
/// sorted by id and identical for identical input. Fails, planning nothing, if a product or a
/// cell is repeated or a product's books do not balance.
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
/// (an instant balance) or wants one bad product not to stop the others.
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
    /// Whether the cell is starving: first in line for the odd units, never held back.
    starving: bool,
    /// Units held so far by the fair-share computation; in the end, the fair share.
    level: u64,
    /// Units planned after hysteresis.
    target: u64,
    /// The three levels above the floor: in-use cover, mins, wants.
    levels: [u64; 3],
}

/// Buffers reused from one product to the next, so planning a million cells does not ask the
/// allocator for thousands of fresh vectors.
#[derive(Default)]
struct Scratch {
    /// One entry per cell, sorted by server id.
    work: Vec<Work>,
    /// The positive needs of a water-fill, sorted.
    needs: Vec<u64>,
    /// Positions (in `work`) of the cells a water-fill left short.
    short: Vec<usize>,
    /// Releases held back by hysteresis: (units, position in `work`).
    held: Vec<(u64, usize)>,
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

    let work = &mut scratch.work;
    work.clear();
    work.extend(cells.iter().enumerate().map(|(i, c)| {
        let floor = c.floor();
        let levels = if c.draining {
            [floor; 3]
        } else {
            let cover = floor.max(c.in_use);
            let mins = cover.max(c.min_units);
            [cover, mins, mins.max(c.want())]
        };
        Work {
            cell: i,
            server: c.server,
            starving: c.demand.starving(),
            level: floor,
            target: floor,
            levels,
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

    // Rules 3 and 4: fill the levels in order; share the first that does not fit.
    let mut remaining = pool - work.iter().map(|w| u128::from(w.level)).sum::<u128>();
    let mut scarcity = Scarcity::Ample;
    let mut water_level = None;
    for (tier, short) in [Scarcity::InUse, Scarcity::Mins, Scarcity::Wants]
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
                &mut scratch.needs,
                &mut scratch.short,
            );
            water_level = Some(water);
            scarcity = short;
            break;
        }
    }

    // Rule 6: hysteresis, then let held releases go if the grants need their units.
    let held = &mut scratch.held;
    held.clear();
    let mut planned: u128 = 0;
    let mut moves = 0usize;
    for (k, w) in work.iter_mut().enumerate() {
        let c = &cells[w.cell];
        let fair = w.level;
        w.target = fair;
        if !c.draining && fair != c.allocation {
            let margin = config.margin(c.want());
            if fair > c.allocation {
                let urgent = c.allocation < w.levels[1] || w.starving;
                if !urgent && fair - c.allocation <= margin {
                    w.target = c.allocation;
                }
            } else if c.allocation - fair <= margin {
                w.target = c.allocation;
                held.push((c.allocation - fair, k));
            }
        }
        planned += u128::from(w.target);
        moves += usize::from(w.target != c.allocation);
    }
    if planned > pool {
        held.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(units, k) in held.iter() {
            if planned <= pool {
                break;
            }
            work[k].target -= units;
            planned -= u128::from(units);
            moves += 1;
        }
    }

    let cell_plans = work
        .iter()
        .map(|w| {
            let c = &cells[w.cell];
            CellPlan {
                server: c.server,
                allocation: c.allocation,
                floor: c.floor(),
                want: c.want(),
                fair_share: w.level,
                target: w.target,
            }
        })
        .collect();
    let mut planned_moves = Vec::with_capacity(moves);
    planned_moves.extend(work.iter().filter_map(|w| {
        let allocation = cells[w.cell].allocation;
        (w.target < allocation).then(|| Move::Release {
            server: w.server,
            units: allocation - w.target,
        })
    }));
    planned_moves.extend(work.iter().filter_map(|w| {
        let allocation = cells[w.cell].allocation;
        (w.target > allocation).then(|| Move::Grant {
            server: w.server,
            units: w.target - allocation,
        })
    }));

    Ok(ProductPlan {
        product: product.product,
        reserve: u64::try_from(pool - planned).expect("the reserve is at most purchased"),
        scarcity,
        water_level,
        cells: cell_plans,
        moves: planned_moves,
    })
}

/// Raises every cell toward `levels[tier]` by max-min fair increments, spending exactly
/// `budget` units (less than the total need), and returns the water level reached.
fn water_fill(
    work: &mut [Work],
    tier: usize,
    budget: u128,
    product: ProductId,
    needs: &mut Vec<u64>,
    short: &mut Vec<usize>,
) -> u64 {
    needs.clear();
    needs.extend(
        work.iter()
            .map(|w| w.levels[tier].saturating_sub(w.level))
            .filter(|&n| n > 0),
    );
    needs.sort_unstable();

    // Find s, the largest water level with Σ min(need, s) ≤ budget.
    let mut left = budget;
    let mut base = 0u64;
    let mut water = 0u64;
    for (j, &need) in needs.iter().enumerate() {
        let cells_short = (needs.len() - j) as u128;
        let step = u128::from(need - base) * cells_short;
        if step <= left {
            left -= step;
            base = need;
        } else {
            // left / cells_short < need - base, so it fits in u64.
            water = base + u64::try_from(left / cells_short).expect("below a need");
            left %= cells_short;
            break;
        }
    }

    short.clear();
    for (k, w) in work.iter_mut().enumerate() {
        let need = w.levels[tier].saturating_sub(w.level);
        w.level += need.min(water);
        if need > water {
            short.push(k);
        }
    }
    // `left` < short.len(): the odd units go one each to the best-ranked short cells —
    // starving first, then by a fixed scramble of (product, server).
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
                levels: [cap; 3],
            })
            .collect()
    }

    fn fill(work: &mut [Work], budget: u128) -> u64 {
        water_fill(work, 2, budget, 0, &mut Vec::new(), &mut Vec::new())
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
    fn mix_separates_servers() {
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(mix(0, 0), mix(0, 1));
    }
}
