//! Sharding: which products a balancer leads when several balancers share one estate.
//!
//! Products are hashed into a fixed number of shards; each shard has its own leader and its own
//! leader epoch. A write to a product's books is accepted only from the leader of that product's
//! shard, at that shard's current epoch. This module is the pure part: the hash, and the
//! [`Fence`] a balancer writes with — the shards it leads and the epoch of each.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The most shards an estate may have: a shard per balancer is the most useful, and a
/// leader polls each of its shards' locks.
pub const MAX_SHARDS: u32 = 64;

/// The shard of `product` in an estate of `count` shards (`count` ≥ 1).
///
/// A stable hash of the name (the first 8 bytes of its SHA-256), never Rust's `Hasher`, whose
/// output may change between releases: every balancer, of every version, must agree.
pub fn shard_of(product: &str, count: u32) -> u32 {
    let digest = Sha256::digest(product.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) % u64::from(count.max(1))) as u32
}

/// What a balancer writes with: the number of shards it knows of, and the epoch of each shard
/// it leads. The store compares a write's product against the shard's current epoch, so a
/// deposed leader — or one that still believes in an older shard count — changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fence {
    count: u32,
    epochs: BTreeMap<u32, i64>,
}

impl Fence {
    /// Leads nothing: every write with it is refused.
    pub fn none() -> Self {
        Self::default()
    }

    /// Leads `epochs` (shard → epoch) of an estate of `count` shards.
    pub fn new(count: u32, epochs: BTreeMap<u32, i64>) -> Self {
        Self { count, epochs }
    }

    /// The sole writer of an unsharded store that never saw a takeover (epoch 0): embedded
    /// uses, benchmarks and tests.
    pub fn alone() -> Self {
        Self::new(1, BTreeMap::from([(0, 0)]))
    }

    /// The number of shards this fence was taken under.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The shards led, with their epochs.
    pub fn epochs(&self) -> &BTreeMap<u32, i64> {
        &self.epochs
    }

    /// Whether any shard is led.
    pub fn leads_any(&self) -> bool {
        !self.epochs.is_empty()
    }

    /// Whether every shard is led (one balancer, or the only one left).
    pub fn leads_all(&self) -> bool {
        self.count > 0 && self.epochs.len() == self.count as usize
    }

    /// The shard `product` belongs to under this fence's count.
    pub fn shard_of(&self, product: &str) -> u32 {
        shard_of(product, self.count)
    }

    /// The epoch to write `product` with, when its shard is led.
    pub fn epoch_for(&self, product: &str) -> Option<i64> {
        if self.count == 0 {
            return None;
        }
        self.epochs.get(&self.shard_of(product)).copied()
    }

    /// Whether `product`'s shard is led.
    pub fn leads(&self, product: &str) -> bool {
        self.epoch_for(product).is_some()
    }

    /// The newest epoch held, recorded on runs (which may span several shards); `-1` when none.
    pub fn newest_epoch(&self) -> i64 {
        self.epochs.values().copied().max().unwrap_or(-1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_hash_is_pinned_so_every_version_agrees() {
        // Changing these values would move products between shards on upgrade. They are the
        // first 8 bytes of SHA-256, big-endian, modulo the count (checked with Python's hashlib).
        assert_eq!(shard_of("cad", 1), 0);
        assert_eq!(
            (0..8).map(|c| shard_of("cad", c + 1)).collect::<Vec<_>>(),
            [0, 0, 1, 0, 0, 4, 0, 4]
        );
        assert_eq!(shard_of("matlab", 16), 11);
    }

    #[test]
    fn a_fence_leads_only_its_shards() {
        let count = 4;
        let product = "eda-sim";
        let mine = shard_of(product, count);
        let fence = Fence::new(count, BTreeMap::from([(mine, 7)]));
        assert_eq!(fence.epoch_for(product), Some(7));
        let other = (0..100)
            .map(|i| format!("p{i}"))
            .find(|p| shard_of(p, count) != mine)
            .unwrap();
        assert_eq!(fence.epoch_for(&other), None);
        assert!(fence.leads_any() && !fence.leads_all());
        assert!(!Fence::none().leads(product));
        assert_eq!(Fence::none().newest_epoch(), -1);
        assert!(Fence::alone().leads_all());
    }

    proptest! {
        #[test]
        fn every_product_has_exactly_one_shard_in_range(name in "[a-z0-9_.-]{1,40}", count in 1u32..=MAX_SHARDS) {
            let shard = shard_of(&name, count);
            prop_assert!(shard < count);
            prop_assert_eq!(shard, shard_of(&name, count));
            // Exactly one of the fences that each lead one shard leads the product.
            let leaders = (0..count)
                .filter(|s| Fence::new(count, BTreeMap::from([(*s, 1)])).leads(&name))
                .count();
            prop_assert_eq!(leaders, 1);
        }

        #[test]
        fn shards_share_products_evenly(count in 2u32..=8) {
            let mut per = vec![0u32; count as usize];
            for i in 0..4_000 {
                per[shard_of(&format!("product-{i}"), count) as usize] += 1;
            }
            let fair = 4_000 / count;
            for n in per {
                prop_assert!(n > fair * 8 / 10 && n < fair * 12 / 10, "{n} against {fair}");
            }
        }
    }
}
