//! Where an expired entitlement's units come from once the reserve is empty: which servers
//! retire how many. Free units go first, so no client loses a licence it holds; units in use
//! are retired only when nothing free is left, and then stay with their clients while the
//! server grants nothing new until it is back under its allocation.

/// One server's holding of the product, as its last status showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Holding {
    /// Units the books allocate to it.
    pub allocation: u64,
    /// Units in use at its last status (the whole allocation when it could not be read: a
    /// server that did not answer is never assumed to have free units).
    pub in_use: u64,
}

impl Holding {
    fn free(&self) -> u64 {
        self.allocation.saturating_sub(self.in_use)
    }
}

/// Units to retire from each holding (same order) to take `owed` units out of the estate:
/// free units first, from the servers with the most free units; then units in use, from the
/// largest remaining allocations. Never more than a server holds; in all
/// `min(owed, Σ allocation)`.
pub fn retirements(holdings: &[Holding], owed: u64) -> Vec<u64> {
    let mut take = vec![0u64; holdings.len()];
    let mut left = owed;
    let mut by_free: Vec<usize> = (0..holdings.len()).collect();
    by_free.sort_by_key(|&i| (std::cmp::Reverse(holdings[i].free()), i));
    for &i in &by_free {
        let units = holdings[i].free().min(left);
        take[i] += units;
        left -= units;
    }
    let mut by_rest: Vec<usize> = (0..holdings.len()).collect();
    by_rest.sort_by_key(|&i| (std::cmp::Reverse(holdings[i].allocation - take[i]), i));
    for &i in &by_rest {
        let units = (holdings[i].allocation - take[i]).min(left);
        take[i] += units;
        left -= units;
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn holdings() -> impl Strategy<Value = Vec<Holding>> {
        prop::collection::vec(
            (0u64..50, 0u64..60).prop_map(|(allocation, in_use)| Holding { allocation, in_use }),
            0..8,
        )
    }

    #[test]
    fn free_units_go_before_units_in_use() {
        let h = [
            Holding {
                allocation: 5,
                in_use: 5,
            },
            Holding {
                allocation: 4,
                in_use: 1,
            },
            Holding {
                allocation: 2,
                in_use: 0,
            },
        ];
        assert_eq!(retirements(&h, 4), vec![0, 3, 1]);
        assert_eq!(retirements(&h, 5), vec![0, 3, 2]);
        // Then units in use, from the largest allocation left.
        assert_eq!(retirements(&h, 8), vec![3, 3, 2]);
        assert_eq!(retirements(&h, 100), vec![5, 4, 2]);
    }

    proptest! {
        #[test]
        fn retires_what_is_owed_never_more_than_held(h in holdings(), owed in 0u64..400) {
            let take = retirements(&h, owed);
            let held: u64 = h.iter().map(|x| x.allocation).sum();
            prop_assert_eq!(take.iter().sum::<u64>(), owed.min(held));
            for (t, x) in take.iter().zip(&h) {
                prop_assert!(*t <= x.allocation);
            }
        }

        #[test]
        fn no_unit_in_use_is_retired_while_a_free_one_stays(h in holdings(), owed in 0u64..400) {
            let take = retirements(&h, owed);
            let into_use = take.iter().zip(&h).any(|(t, x)| *t > x.free());
            let free_left = take.iter().zip(&h).any(|(t, x)| *t < x.free());
            prop_assert!(!(into_use && free_left));
        }
    }
}
