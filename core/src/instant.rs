//! The instant plan: what the balancer does when a metering server asks for units now
//! (DESIGN.md flow 3).
//!
//! A request carries *urgent* units (clients are waiting for them) and a *top-up* (the
//! trigger's proactive refill). The rules, in order:
//!
//! 1. **The reserve first, at once.** The reserve serves the urgent units, then the top-up:
//!    one grant, no other server involved, so a waiting client is served in one round trip.
//! 2. **Reclaim only the urgent shortfall.** Only the urgent units the reserve cannot cover are
//!    reclaimed; a top-up never takes units from another server.
//! 3. **Only what donors do not need.** A donor gives first what it holds above its own want
//!    (`max(min, demand + buffer)`, the buffer at least the trigger's headroom — the same
//!    [`CellSnapshot::want`] the planner uses) — largest such spare first, but not a donor
//!    granted units recently (it pulled them because it needed them). Never a unit in use,
//!    never from a server with clients waiting, never the asker.
//! 4. **Then, for waiting clients only, free units above the donor's need.** If the urgent
//!    shortfall is still not covered, donors with no clients waiting give free units down to
//!    `max(min, in use + 1)` — each keeps one spare unit while others have spares — largest
//!    first, and then, if still short, their last free units. A unit sitting free at one site
//!    while a client at another is refused is exactly the false denial allot exists to
//!    prevent; the donor's own trigger pulls it back if it needs it. A donor's in-use is the
//!    last run's; its release handler takes free units only (invariant 4), so a stale in-use
//!    costs a smaller release, never a unit in use.
//!
//! The function is pure and total: the balancer's shell books the grant from the reserve and
//! the releases under the product's lock, sends them outside it, and grants the reclaimed
//! units once their releases are confirmed.

use crate::planner::{CellSnapshot, PlannerConfig, ServerId};
use serde::{Deserialize, Serialize};

/// One instant-balance request, as the planner sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstantAsk {
    /// The server asking.
    pub asker: ServerId,
    /// Units clients wait for now.
    pub urgent: u64,
    /// Units the trigger would like on top, from the reserve only.
    pub topup: u64,
}

impl InstantAsk {
    /// Whether the plan depends on the other servers' cells: only when `reserve` cannot cover
    /// the urgent units (rule 2). Otherwise the reserve serves the request alone, whatever the
    /// cells, so a shell need not read them: under a large estate's run, a request the reserve
    /// covers is answered without reading the product's thousand cells.
    pub fn needs_donors(&self, reserve: u64) -> bool {
        self.urgent > reserve
    }
}

/// What to do for one instant-balance request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantPlan {
    /// Units granted to the asker from the reserve now (rule 1).
    pub from_reserve: u64,
    /// Releases to ask of donors, by server id; once confirmed, their units go to the asker.
    pub releases: Vec<(ServerId, u64)>,
}

impl InstantPlan {
    /// Units reclaimed from donors.
    pub fn reclaimed(&self) -> u64 {
        self.releases.iter().map(|r| r.1).sum()
    }
}

/// Plans an instant balance over one product's `reserve` and `cells` (the asker's cell among
/// them or not); see the [module documentation](self).
pub fn plan_instant(
    reserve: u64,
    cells: &[CellSnapshot],
    ask: &InstantAsk,
    config: &PlannerConfig,
) -> InstantPlan {
    let wanted = ask.urgent.saturating_add(ask.topup);
    let from_reserve = wanted.min(reserve);
    let mut short = ask.urgent.saturating_sub(reserve);
    let mut releases: Vec<(ServerId, u64)> = Vec::new();
    if short == 0 {
        return InstantPlan {
            from_reserve,
            releases,
        };
    }
    let donors: Vec<&CellSnapshot> = cells
        .iter()
        .filter(|c| c.server != ask.asker && c.demand.waiting == 0)
        .collect();
    // Rule 3, then rule 4: each pass takes from the largest spare first (ties by server id).
    let spare_kept = |c: &CellSnapshot| {
        if c.draining {
            c.in_use
        } else {
            c.min_units.max(c.in_use.saturating_add(1))
        }
    };
    let in_use_kept = |c: &CellSnapshot| {
        if c.draining {
            c.in_use
        } else {
            c.min_units.max(c.in_use)
        }
    };
    let keeps: [&dyn Fn(&CellSnapshot) -> u64; 3] = [
        &|c| c.want(config).max(spare_kept(c)),
        &spare_kept,
        &in_use_kept,
    ];
    for (pass, keep) in keeps.into_iter().enumerate() {
        if short == 0 {
            break;
        }
        let mut spares: Vec<(u64, ServerId)> = donors
            .iter()
            // A donor granted units recently gives nothing above its want (it pulled them
            // because it needed them), only free units for clients waiting elsewhere.
            .filter(|c| pass > 0 || !c.recently_granted)
            .map(|c| {
                let taken = releases.iter().find(|r| r.0 == c.server).map_or(0, |r| r.1);
                let spare = c
                    .allocation
                    .saturating_sub(keep(c).max(c.in_use))
                    .saturating_sub(taken);
                (spare, c.server)
            })
            .filter(|s| s.0 > 0)
            .collect();
        spares.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (spare, server) in spares {
            if short == 0 {
                break;
            }
            let take = spare.min(short);
            short -= take;
            match releases.iter_mut().find(|r| r.0 == server) {
                Some(r) => r.1 += take,
                None => releases.push((server, take)),
            }
        }
    }
    releases.sort_unstable();
    InstantPlan {
        from_reserve,
        releases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Demand;

    fn cell(server: ServerId, allocation: u64, in_use: u64) -> CellSnapshot {
        CellSnapshot {
            server,
            allocation,
            in_use,
            ..CellSnapshot::default()
        }
    }

    fn ask(urgent: u64, topup: u64) -> InstantAsk {
        InstantAsk {
            asker: 0,
            urgent,
            topup,
        }
    }

    #[test]
    fn the_reserve_serves_first_and_nothing_is_reclaimed_when_it_suffices() {
        let c = PlannerConfig::default();
        let cells = [cell(0, 5, 5), cell(1, 30, 0)];
        let p = plan_instant(10, &cells, &ask(3, 4), &c);
        assert_eq!(p.from_reserve, 7);
        assert!(p.releases.is_empty());
    }

    #[test]
    fn a_top_up_never_reclaims() {
        let c = PlannerConfig::default();
        let cells = [cell(0, 5, 5), cell(1, 30, 0)];
        let p = plan_instant(0, &cells, &ask(0, 4), &c);
        assert_eq!(p, InstantPlan::default());
    }

    #[test]
    fn the_shortfall_comes_from_the_largest_spare_above_want() {
        let c = PlannerConfig::default();
        // Server 1: 20 held, 10 in use → want 10 + headroom 2 = 12, spare 8.
        // Server 2: 30 held, idle → want 0, spare 30.
        let cells = [cell(0, 5, 5), cell(1, 20, 10), cell(2, 30, 0)];
        let p = plan_instant(1, &cells, &ask(6, 2), &c);
        assert_eq!(p.from_reserve, 1);
        assert_eq!(p.releases, vec![(2, 5)]);
    }

    #[test]
    fn a_donor_with_waiting_clients_is_never_asked_and_a_fresh_one_keeps_its_want() {
        let c = PlannerConfig::default();
        let mut waiting = cell(1, 20, 0);
        waiting.demand = Demand {
            waiting: 1,
            ..Demand::default()
        };
        let p = plan_instant(0, &[cell(0, 1, 1), waiting], &ask(3, 0), &c);
        assert!(p.releases.is_empty());
        // 10 held, 5 in use: want 5 + 2 headroom = 7, so 3 spare above want, 4 above in use + 1.
        let mut fresh = cell(2, 10, 5);
        fresh.recently_granted = true;
        let mut idle = cell(3, 10, 5);
        idle.buffer_units = 0;
        let p = plan_instant(0, &[cell(0, 1, 1), fresh, idle], &ask(3, 0), &c);
        assert_eq!(p.releases, vec![(3, 3)]);
    }

    #[test]
    fn waiting_clients_may_take_a_donor_buffer_but_it_keeps_one_spare() {
        let c = PlannerConfig::default();
        // Server 1: 14 held, 10 in use: want 12, spare above want 2; above need + 1: 3.
        // Server 2: 1 held, idle: its last unit goes only once server 1 has no spare left.
        let cells = [cell(0, 1, 1), cell(1, 14, 10), cell(2, 1, 0)];
        let p = plan_instant(0, &cells, &ask(5, 0), &c);
        assert_eq!(p.releases, vec![(1, 4), (2, 1)]);
        let p = plan_instant(0, &cells, &ask(3, 0), &c);
        assert_eq!(p.releases, vec![(1, 3)]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn cells() -> impl Strategy<Value = Vec<CellSnapshot>> {
            proptest::collection::vec(
                (
                    0u64..20,
                    0u64..20,
                    0u64..4,
                    0u64..3,
                    any::<bool>(),
                    0u64..20,
                ),
                1..8,
            )
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(
                        |(i, (allocation, used, min_units, waiting, fresh, level))| CellSnapshot {
                            server: i as ServerId,
                            allocation,
                            in_use: used.min(allocation),
                            min_units,
                            recently_granted: fresh,
                            demand: Demand {
                                waiting,
                                signals: crate::demand::Signals {
                                    level,
                                    ..Default::default()
                                },
                                ..Demand::default()
                            },
                            ..CellSnapshot::default()
                        },
                    )
                    .collect()
            })
        }

        proptest! {
            #[test]
            fn never_takes_what_a_donor_needs(
                cells in cells(), reserve in 0u64..10, urgent in 0u64..30, topup in 0u64..10,
            ) {
                let c = PlannerConfig::default();
                let ask = InstantAsk { asker: 0, urgent, topup };
                let p = plan_instant(reserve, &cells, &ask, &c);
                prop_assert!(p.from_reserve <= reserve);
                prop_assert!(p.from_reserve <= urgent + topup);
                // Only the urgent shortfall is reclaimed.
                prop_assert!(p.reclaimed() <= urgent.saturating_sub(reserve));
                for &(server, units) in &p.releases {
                    let d = cells.iter().find(|c| c.server == server).unwrap();
                    prop_assert!(server != ask.asker);
                    prop_assert!(units > 0);
                    prop_assert!(d.demand.waiting == 0);
                    // Never a unit in use (as last seen) or below min.
                    let keep = d.min_units.max(d.in_use);
                    prop_assert!(d.allocation >= keep + units, "{d:?} gives {units}");
                }
            }

            #[test]
            fn the_cells_matter_only_when_donors_are_needed(
                cells in cells(), reserve in 0u64..10, urgent in 0u64..30, topup in 0u64..10,
            ) {
                let c = PlannerConfig::default();
                let ask = InstantAsk { asker: 0, urgent, topup };
                let p = plan_instant(reserve, &cells, &ask, &c);
                if ask.needs_donors(reserve) {
                    // The reserve is spent whole before any donor is asked.
                    prop_assert_eq!(p.from_reserve, reserve);
                } else {
                    prop_assert_eq!(&p, &plan_instant(reserve, &[], &ask, &c));
                    prop_assert!(p.releases.is_empty());
                }
            }

            #[test]
            fn the_reclaim_covers_the_shortfall_when_donors_can(
                cells in cells(), urgent in 0u64..30,
            ) {
                let c = PlannerConfig::default();
                let ask = InstantAsk { asker: 0, urgent, topup: 0 };
                let p = plan_instant(0, &cells, &ask, &c);
                let available: u64 = cells
                    .iter()
                    .filter(|d| d.server != 0 && d.demand.waiting == 0)
                    .map(|d| d.allocation.saturating_sub(d.min_units.max(d.in_use)))
                    .sum();
                prop_assert_eq!(p.reclaimed(), urgent.min(available));
            }
        }
    }
}
