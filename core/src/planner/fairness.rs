//! Rules 2–4 of the planner: every cell's floor and levels, and the max-min fair water-fill of
//! the first level that does not fit.

use super::*;

/// Rules 2–4: fills `scratch.work` with every cell's floor, levels and fair share (`level`).
///
/// A recently granted live cell is held: its floor is its whole allocation. When the held
/// floors leave in-use, mins or needs uncovered, the held cells give up the shortfall — no more
/// — from their units above their own needs (rule 2); if all they could give is less than the
/// shortfall, every hold is dropped. Taking only the shortfall keeps the plan a fixed point: had
/// the holds been dropped whole, the other cells' wants would be water-filled from held units
/// that no rule then releases, and the next run, its holds standing again, would share the
/// wants differently and move units between idle cells.
pub(super) fn fair_shares(
    product: &ProductSnapshot,
    config: &PlannerConfig,
    pool: u128,
    scratch: &mut Scratch,
) -> Result<(Scarcity, Option<u64>), PlanError> {
    let work = &mut scratch.work;
    work.clear();
    work.extend(product.cells.iter().enumerate().map(|(i, c)| {
        let plain_floor = c.floor();
        let floor = if c.recently_granted && !c.draining {
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
    release_holds_for_shortage(work, pool, &mut scratch.short);
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

/// Rule 2's exception: lowers the held floors just enough to cover in-use, mins and needs, or
/// drops every hold when even that is not enough. Held cells give their units above their own
/// needs level, the cell with the most such units first, then by server id (`givers` is
/// scratch space for their positions).
fn release_holds_for_shortage(work: &mut [Work], pool: u128, givers: &mut Vec<usize>) {
    let floors: u128 = work.iter().map(|w| u128::from(w.floor)).sum();
    let uncovered: u128 = work
        .iter()
        .map(|w| u128::from(w.levels[2].saturating_sub(w.floor)))
        .sum();
    // Floors never exceed allocations, so they fit the pool.
    let Some(mut shortfall) = uncovered.checked_sub(pool - floors).filter(|&s| s > 0) else {
        return;
    };
    // A live cell's needs level is at least its plain floor.
    let givable = |w: &Work| w.floor.saturating_sub(w.levels[2]);
    givers.clear();
    givers.extend((0..work.len()).filter(|&k| givable(&work[k]) > 0));
    let can_give: u128 = givers.iter().map(|&k| u128::from(givable(&work[k]))).sum();
    if can_give < shortfall {
        for w in work.iter_mut() {
            w.floor = w.plain_floor;
        }
    } else {
        // Stable: `work` is in server order.
        givers.sort_by_key(|&k| std::cmp::Reverse(givable(&work[k])));
        for &k in givers.iter() {
            if shortfall == 0 {
                break;
            }
            let give = u64::try_from(u128::from(givable(&work[k])).min(shortfall))
                .expect("at most a floor");
            work[k].floor -= give;
            shortfall -= u128::from(give);
        }
    }
    for w in work.iter_mut() {
        w.level = w.floor;
        w.target = w.floor;
    }
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
