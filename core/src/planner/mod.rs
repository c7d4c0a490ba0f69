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
//!    allocation, so a run never takes back what an instant balance has just brought — unless
//!    a real shortage (rule 3's in-use, mins or needs not covered) needs its units. Then the
//!    held cells give up just the shortfall from their units above their own needs, the
//!    largest such holding first, then by server id; if all of those cannot cover it, every
//!    hold is dropped.
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
//!    `max(floor, previous level + min(need, s))` (its floor: the allocation, less what a
//!    shortage took), so a hold keeps units but never earns a larger share (else a cell
//!    granted units would, held at its new allocation, be water-filled again on top of it at
//!    every run). The result is the cell's *fair share*; no fair share exceeds the want, or a
//!    held cell's floor if that is more.
//! 5. **Grant fast.** A cell below its fair share is granted the difference when it is urgent
//!    (the allocation does not cover its in-use, min or need, or the cell is starving) or when
//!    the difference exceeds the dead band (`margin`: [`PlannerConfig::margin`] of the
//!    allocation); a smaller difference stays in the reserve.
//! 6. **Take back slow.** A cell above its fair share keeps its excess, except: (a) as much as
//!    rule 5's *urgent* grants need beyond the reserve — first units above the donors' wants,
//!    then units between a donor's fair share and its want (largest first, then by server id);
//!    a grant ahead of demand that the reserve cannot fund is deferred (smallest first), since
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
//! again, and a release stops at the fair share or the window's want. A shortage that lowered
//! the holds is covered exactly, so nothing is left for wants: every grant is urgent, rule 6a
//! takes every unit above a fair share, and the next run finds each cell at its share with
//! nothing short.
//!
//! # Where each part lives
//!
//! [`types`] holds the snapshot the planner reads, its configuration and the plan it returns;
//! this file the per-product flow (levels, grants, take-back rules 5–7); `fairness` the
//! max-min water-fill of rules 3–4; [`apply`](fn@apply) checks a plan against a snapshot.

mod apply;
mod fairness;
pub mod types;

pub use apply::{apply, apply_product};
pub use types::*;

use fairness::fair_shares;

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
    /// The floor the fill started from: while held, the whole allocation less what a shortage
    /// took (rule 2).
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

    // Rules 2–4, recently granted cells held but for what a shortage of in-use, mins or needs
    // takes from them.
    let (scarcity, water_level) = fair_shares(product, config, pool, scratch)?;
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

/// Rule 6a's middle step: grants ahead of demand are cut back (smallest first, then by server
/// id) until the plan fits the pool or none is left; returns the units then planned. Smallest
/// first keeps the plan monotone: a cell that wants more is never granted less (largest first
/// cut a cell's grant back for having grown).
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
        grant(&work[a])
            .cmp(&grant(&work[b]))
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
