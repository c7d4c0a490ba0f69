//! The planner's inputs, read from the books, the servers' statuses and the history: the one
//! place the balancer turns what it knows into `allot_core` snapshots. Nothing here decides a
//! move; the core's planner and instant plan do.

use super::StatusMap;
use crate::store::{CellAccounting, CellRecord, ServerRecord, Store, StoreError};
use allot_core::demand::{PeakSample, SignalConfig, Signals, signals};
use allot_core::domain::ServerState;
use allot_core::planner::{CellPlan, CellSnapshot, Decision, Demand, ProductSnapshot};
use allot_core::wire::balancer::Product;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Something per cell, keyed product → server so that a lookup borrows the names: a run
/// looks up every one of its cells (100,000 on a 1,000 × 100 estate) in several of these, and
/// a key of two owned strings would allocate both for every lookup.
#[derive(Debug)]
pub(super) struct CellMap<V> {
    by_product: HashMap<String, HashMap<String, V>>,
}

impl<V> Default for CellMap<V> {
    fn default() -> Self {
        Self {
            by_product: HashMap::new(),
        }
    }
}

impl<V> CellMap<V> {
    /// The cell's value.
    pub(super) fn get(&self, server: &str, product: &str) -> Option<&V> {
        self.by_product.get(product)?.get(server)
    }

    /// The cell's value, to change.
    pub(super) fn get_mut(&mut self, server: &str, product: &str) -> Option<&mut V> {
        self.by_product.get_mut(product)?.get_mut(server)
    }

    /// The cell's value, a default one put in first when it has none (the names are copied
    /// only then).
    pub(super) fn entry(&mut self, server: &str, product: &str) -> &mut V
    where
        V: Default,
    {
        let servers = self.servers_of(product);
        if !servers.contains_key(server) {
            servers.insert(server.to_owned(), V::default());
        }
        servers.get_mut(server).expect("just put in")
    }

    /// Sets the cell's value (the names are copied only for a new cell).
    pub(super) fn insert(&mut self, server: &str, product: &str, value: V) {
        let servers = self.servers_of(product);
        match servers.get_mut(server) {
            Some(slot) => *slot = value,
            None => {
                servers.insert(server.to_owned(), value);
            }
        }
    }

    /// The product's cells, an empty map put in first when it has none.
    fn servers_of(&mut self, product: &str) -> &mut HashMap<String, V> {
        if !self.by_product.contains_key(product) {
            self.by_product.insert(product.to_owned(), HashMap::new());
        }
        self.by_product.get_mut(product).expect("just put in")
    }

    /// Takes the cell's value out.
    pub(super) fn remove(&mut self, server: &str, product: &str) -> Option<V> {
        let servers = self.by_product.get_mut(product)?;
        let value = servers.remove(server);
        if servers.is_empty() {
            self.by_product.remove(product);
        }
        value
    }

    /// Keeps only the cells whose value `keep` accepts (it may change them).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) {
        self.by_product.retain(|_, servers| {
            servers.retain(|_, value| keep(value));
            !servers.is_empty()
        });
    }

    /// Moves every cell of `other` into this map, `merge` combining a value with the one
    /// already there.
    pub(super) fn absorb(&mut self, other: CellMap<V>, mut merge: impl FnMut(&mut V, V))
    where
        V: Default,
    {
        for (product, servers) in other.by_product {
            for (server, value) in servers {
                merge(self.entry(&server, &product), value);
            }
        }
    }

    /// Every cell's value turned into another.
    pub(super) fn map<W>(self, mut f: impl FnMut(V) -> W) -> CellMap<W> {
        CellMap {
            by_product: self
                .by_product
                .into_iter()
                .map(|(product, servers)| {
                    let servers = servers.into_iter().map(|(s, v)| (s, f(v))).collect();
                    (product, servers)
                })
                .collect(),
        }
    }
}

/// What the engine remembers between runs, so an instant balance — which reads no statuses —
/// judges donors by what the last run saw, and so a run holds units an instant balance has
/// just granted. Lost on a restart: the first run after it refills the demand, and holds are
/// only an optimisation (they never decide safety).
#[derive(Debug, Default)]
pub(super) struct Memory {
    /// Per cell, the demand and in-use the last run planned with.
    seen: CellMap<(Demand, u64)>,
    /// Per cell, when units were last granted to it.
    granted_at: CellMap<Instant>,
    /// Per cell, the units it released within the ping-pong window, and when.
    released: CellMap<Vec<(Instant, u64)>>,
    /// Ping-pong units per run still running, for its record.
    ping_pong_by_run: HashMap<i64, u64>,
    /// Per cell, what balancing did to and for it since its last usage sample.
    accounting: CellMap<CellAccounting>,
    /// Per product, units being released for an instant balance's waiting clients: they reach
    /// the reserve before the grant that carries them on, and no other request may take them.
    earmarked: HashMap<String, u64>,
    /// Per cell, the rule, target and allocation of its last decision, so a run records only
    /// the decisions that changed.
    decided: CellMap<(Decision, u64, u64)>,
    /// Per product, the changes to its books committed outside a run's planning (an instant
    /// balance's logged moves, every booking, every abandon), counted once each is committed,
    /// and the count at each cell's last change: a run that read the books before the count
    /// moved reads the product's pool and the cells changed since again, under the product's
    /// lock; one that finds it where it was plans from its own read.
    changes: HashMap<String, ProductChanges>,
    /// Per product, its reserve as an instant balance last read or left it: what the next
    /// one plans from, checked by the store as it logs (it logs nothing if the reserve moved,
    /// and says what it is now), so a stale value costs a round trip, never a wrong grant.
    reserves: HashMap<String, u64>,
}

/// One product's changes (see [`Memory::changed`]).
#[derive(Debug, Default)]
struct ProductChanges {
    /// Changes counted so far.
    count: u64,
    /// Per server, the count at its cell's last change.
    cells: HashMap<String, u64>,
    /// Changes under way outside the product's lock (a booking, an abandon: its commit may
    /// land before it is counted), by the server whose cell it changes, if any.
    pending: HashMap<Option<String>, u32>,
}

/// Each product's count of changes (see [`Memory::changed`]) when a run took it.
pub(super) type ChangesSeen = HashMap<String, u64>;

/// A unit released and granted back to the same server within this long is ping-pong.
pub(super) const PING_PONG_WINDOW: Duration = Duration::from_secs(3600);

impl Memory {
    /// The units of a grant of `units` to a cell that come back within the ping-pong window of
    /// a release from it: what [`Memory::granted`] will count, known before the grant is booked
    /// (an instant balance writes it into its run's record in the booking's own commit).
    pub(super) fn returning(&self, server: &str, product: &str, units: u64) -> u64 {
        self.released.get(server, product).map_or(0, |released| {
            released
                .iter()
                .filter(|(at, _)| at.elapsed() < PING_PONG_WINDOW)
                .map(|(_, r)| *r)
                .sum::<u64>()
                .min(units)
        })
    }

    /// Notes a grant applied to a cell; returns the units of it that come back within the
    /// ping-pong window of a release from the same cell.
    pub(super) fn granted(&mut self, server: &str, product: &str, units: u64) -> u64 {
        self.granted_at.insert(server, product, Instant::now());
        let back = match self.released.get_mut(server, product) {
            None => 0,
            Some(released) => {
                released.retain(|(at, _)| at.elapsed() < PING_PONG_WINDOW);
                let mut left = units;
                for (_, r) in released.iter_mut() {
                    let matched = (*r).min(left);
                    *r -= matched;
                    left -= matched;
                }
                released.retain(|(_, r)| *r > 0);
                units - left
            }
        };
        let tally = self.accounting.entry(server, product);
        tally.units_granted += units;
        tally.ping_pong_units += back;
        back
    }

    /// Notes units a cell's waiting clients asked for that an instant balance left unserved.
    pub(super) fn unserved(&mut self, server: &str, product: &str, truly: u64, falsely: u64) {
        if truly + falsely == 0 {
            return;
        }
        let tally = self.accounting.entry(server, product);
        tally.unserved_true += truly;
        tally.unserved_false += falsely;
    }

    /// Takes every cell's accounting since its last sample out at once (a run's samples are made from it without
    /// holding the memory, which every instant balance also takes).
    pub(super) fn take_accountings(&mut self) -> CellMap<CellAccounting> {
        std::mem::take(&mut self.accounting)
    }

    /// Puts back accountings no sample took, beside what was counted meanwhile.
    pub(super) fn restore_accountings(&mut self, unsampled: CellMap<CellAccounting>) {
        self.accounting
            .absorb(unsampled, |counted, earlier| counted.add(&earlier));
    }

    /// The product's units earmarked for instant balances under way.
    pub(super) fn earmarked(&self, product: &str) -> u64 {
        self.earmarked.get(product).copied().unwrap_or(0)
    }

    /// The product's reserve as an instant balance last read or left it, if one did.
    pub(super) fn reserve_seen(&self, product: &str) -> Option<u64> {
        self.reserves.get(product).copied()
    }

    /// Notes the product's reserve as an instant balance just read or left it.
    pub(super) fn saw_reserve(&mut self, product: &str, reserve: u64) {
        match self.reserves.get_mut(product) {
            Some(seen) => *seen = reserve,
            None => {
                self.reserves.insert(product.to_owned(), reserve);
            }
        }
    }

    /// Earmarks (or, negative, frees) reclaimed units of a product.
    pub(super) fn earmark(&mut self, product: &str, units: i128) {
        let entry = self.earmarked.entry(product.to_owned()).or_default();
        *entry = u64::try_from((i128::from(*entry) + units).max(0)).unwrap_or(u64::MAX);
        if *entry == 0 {
            self.earmarked.remove(product);
        }
    }

    /// Adds ping-pong units to a run's tally.
    pub(super) fn ping_pong_in_run(&mut self, run_id: i64, units: u64) {
        if units > 0 {
            *self.ping_pong_by_run.entry(run_id).or_default() += units;
        }
    }

    /// Takes a finished run's ping-pong tally.
    pub(super) fn take_ping_pong(&mut self, run_id: i64) -> u64 {
        self.ping_pong_by_run.remove(&run_id).unwrap_or(0)
    }

    /// Notes a release applied by a cell.
    pub(super) fn released(&mut self, server: &str, product: &str, units: u64) {
        self.accounting.entry(server, product).units_released += units;
        let entry = self.released.entry(server, product);
        entry.retain(|(at, _)| at.elapsed() < PING_PONG_WINDOW);
        entry.push((Instant::now(), units));
    }

    /// Whether the cell was granted units within `hold`.
    pub(super) fn recently_granted(&self, server: &str, product: &str, hold: Duration) -> bool {
        self.granted_at
            .get(server, product)
            .is_some_and(|at| at.elapsed() < hold)
    }

    /// Whether some cell of `product` in `cells` was never seen by a run of this balancer
    /// (after a restart): an instant balance then reads the newest samples' peaks for them.
    pub(super) fn unseen_any(&self, product: &str, cells: &[CellRecord]) -> bool {
        cells
            .iter()
            .any(|c| c.product == product && self.seen.get(&c.server, &c.product).is_none())
    }

    /// Notes a cell's decision in a run and says whether the run records it: when the cell's
    /// rule, target or allocation changed since the decision this balancer last noted for it
    /// (a first decision counts when it is not `steady`). A cell kept in excess for a day is
    /// recorded when it got there and when it left, not once a run: on a 100,000-cell estate
    /// a run would otherwise write 100,000 rows of unchanged reasons.
    pub(super) fn decided(&mut self, server: &str, product: &str, cell: &CellPlan) -> bool {
        let now = (cell.decision, cell.target, cell.allocation);
        match self.decided.get_mut(server, product) {
            Some(before) => std::mem::replace(before, now) != now,
            None => {
                self.decided.insert(server, product, now);
                cell.decision != Decision::Steady
            }
        }
    }

    /// Notes what a run planned one cell with.
    pub(super) fn saw(&mut self, server: &str, product: &str, demand: Demand, in_use: u64) {
        self.seen.insert(server, product, (demand, in_use));
    }

    /// Counts a change to `product`'s books, once it is committed: to its pool only, or to
    /// `server`'s cell too (see the field's doc).
    pub(super) fn changed(&mut self, product: &str, server: Option<&str>) {
        let changes = self.changes_of(product);
        changes.count += 1;
        if let Some(server) = server {
            match changes.cells.get_mut(server) {
                Some(at) => *at = changes.count,
                None => {
                    changes.cells.insert(server.to_owned(), changes.count);
                }
            }
        }
    }

    /// Notes a change to `product`'s books about to be made outside its lock (a booking, an
    /// abandon): until [`Memory::change_done`], a run treats the product as changed, with
    /// `server`'s cell among those to read again.
    pub(super) fn changing(&mut self, product: &str, server: Option<&str>) {
        *self
            .changes_of(product)
            .pending
            .entry(server.map(str::to_owned))
            .or_default() += 1;
    }

    /// Ends a change noted by [`Memory::changing`], committed or not, and counts it.
    pub(super) fn change_done(&mut self, product: &str, server: Option<&str>) {
        if let Some(changes) = self.changes.get_mut(product) {
            let key = server.map(str::to_owned);
            if let Some(n) = changes.pending.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    changes.pending.remove(&key);
                }
            }
        }
        self.changed(product, server);
    }

    /// `product`'s changes, made empty on its first (the name copied only then).
    fn changes_of(&mut self, product: &str) -> &mut ProductChanges {
        if !self.changes.contains_key(product) {
            self.changes
                .insert(product.to_owned(), ProductChanges::default());
        }
        self.changes.get_mut(product).expect("just inserted")
    }

    /// Every product's count of changes, taken by a run before it reads the books.
    pub(super) fn changes(&self) -> ChangesSeen {
        self.changes
            .iter()
            .map(|(product, changes)| (product.clone(), changes.count))
            .collect()
    }

    /// What changed of `product`'s books since `seen` was taken: `None` when nothing did;
    /// else the servers whose cells changed (none when only its pool did).
    /// A change under way counts as a change, its cell among those to read again.
    pub(super) fn changed_since(&self, product: &str, seen: &ChangesSeen) -> Option<Vec<String>> {
        let changes = self.changes.get(product)?;
        let then = seen.get(product).copied().unwrap_or(0);
        if changes.count == then && changes.pending.is_empty() {
            return None;
        }
        let mut servers: Vec<String> = changes
            .cells
            .iter()
            .filter(|(_, at)| **at > then)
            .map(|(server, _)| server.clone())
            .chain(changes.pending.keys().flatten().cloned())
            .collect();
        servers.sort_unstable();
        servers.dedup();
        Some(servers)
    }

    /// Forgets holds older than `hold`, so the map does not grow with the estate's history.
    pub(super) fn forget_older_than(&mut self, hold: Duration) {
        self.granted_at.retain(|at| at.elapsed() < hold);
        self.released.retain(|r| {
            r.retain(|(at, _)| at.elapsed() < PING_PONG_WINDOW);
            !r.is_empty()
        });
    }
}

/// Reads every cell's demand signals at `now_ms` from the history.
pub(super) async fn read_signals(
    store: &dyn Store,
    now_ms: i64,
    config: &SignalConfig,
) -> Result<CellMap<Signals>, StoreError> {
    let now = u64::try_from(now_ms).unwrap_or(0);
    let ranges: Vec<(i64, i64)> = config
        .ranges(now)
        .into_iter()
        .filter(|(from, to)| from < to)
        .map(|(from, to)| {
            (
                i64::try_from(from).unwrap_or(i64::MAX),
                i64::try_from(to).unwrap_or(i64::MAX),
            )
        })
        .collect();
    let rows = store.peak_samples(&ranges).await?;
    // A sample per cell per run in the window: a large estate's are millions of rows.
    Ok(super::cpu_bound(|| {
        let mut samples: CellMap<Vec<PeakSample>> = CellMap::default();
        for (server, product, at, peak) in rows {
            samples.entry(&server, &product).push(PeakSample {
                at: u64::try_from(at).unwrap_or(0),
                peak,
            });
        }
        samples.map(|s| signals(&s, now, config))
    }))
}

/// A planner snapshot of one product and the names behind its compact server ids.
pub(super) struct BuiltSnapshot {
    pub snapshot: ProductSnapshot,
    pub server_names: Vec<String>,
}

/// Inputs of [`build_snapshot`] that are the same for every product of a run.
pub(super) struct RunView<'a> {
    pub statuses: &'a StatusMap,
    pub servers: &'a [ServerRecord],
    pub signals: &'a CellMap<Signals>,
    pub memory: &'a Mutex<Memory>,
    pub hold: Duration,
}

/// The planner's view of one product: cells of servers that answered and know the product.
/// Units held by servers that did not answer are set aside (left where they are), so the
/// planner's books balance over what it may move. `None` when the product has moves in flight.
pub(super) fn build_snapshot(
    product: &Product,
    cells: &[CellRecord],
    view: &RunView<'_>,
) -> Option<BuiltSnapshot> {
    if product.in_transit > 0 {
        return None;
    }
    let by_server: HashMap<&str, &CellRecord> = cells
        .iter()
        .filter(|c| c.product == product.name)
        .map(|c| (c.server.as_str(), c))
        .collect();
    let mut memory = view.memory.lock().expect("engine memory");
    let mut set_aside = 0u64;
    let mut snapshot_cells = Vec::new();
    let mut server_names = Vec::new();
    for server in view.servers {
        let cell = by_server.get(server.name.as_str()).copied();
        let held = cell.map_or(0, |c| c.units);
        let Some(seen) = super::reported(view.statuses, &server.name, &product.name) else {
            set_aside += held;
            continue;
        };
        let id = u32::try_from(server_names.len()).expect("fewer than 2^32 servers");
        server_names.push(server.name.clone());
        let demand = Demand {
            peak_in_use: u64::from(seen.since_last.peak_in_use),
            denials: seen.since_last.denials,
            waiting: u64::from(seen.waiting),
            instant_requests: seen.since_last.instant_requests,
            signals: view
                .signals
                .get(&server.name, &product.name)
                .copied()
                .unwrap_or_default(),
        };
        // Reserved units still free are needed here, never free to take (FlexNet RESERVE).
        let in_use = u64::from(seen.needed());
        memory.saw(&server.name, &product.name, demand, in_use);
        snapshot_cells.push(CellSnapshot {
            server: id,
            allocation: held,
            in_use,
            min_units: cell.map_or(0, |c| c.min_units),
            buffer_units: cell.map_or(0, |c| c.buffer_units),
            draining: server.state == ServerState::Draining,
            recently_granted: memory.recently_granted(&server.name, &product.name, view.hold),
            demand,
        });
    }
    Some(BuiltSnapshot {
        snapshot: ProductSnapshot {
            product: 0,
            purchased: product.purchased - set_aside,
            reserve: product.reserve,
            in_transit: 0,
            cells: snapshot_cells,
        },
        server_names,
    })
}

/// The cells an instant balance may take from, as the instant plan sees them: every cell of
/// the product on a server in `servers` (the caller leaves out the lost, the reset and those
/// with unconfirmed moves), with the demand the last run saw — its in-use and waiting replaced
/// by `fresh` statuses where the caller read them — and the allocation the books hold now.
/// A cell no run of this balancer has seen stands in its newest sample's peak from
/// `last_peaks` (read only when [`Memory::unseen_any`] says one is needed). Returns the cells
/// and the names behind their ids.
pub(super) fn instant_cells(
    product: &str,
    cells: &[CellRecord],
    servers: &BTreeMap<String, ServerRecord>,
    memory: &Memory,
    last_peaks: &HashMap<String, u64>,
    hold: Duration,
    fresh: &StatusMap,
) -> (Vec<CellSnapshot>, Vec<String>) {
    let mut out = Vec::new();
    let mut names = Vec::new();
    for c in cells.iter().filter(|c| c.product == product) {
        let Some(server) = servers.get(&c.server) else {
            continue;
        };
        let (mut demand, mut in_use) = memory
            .seen
            .get(&c.server, &c.product)
            .copied()
            // Never seen since this balancer started: the newest sample's peak stands in
            // for what is in use, so a donor is never assumed idle without evidence.
            .unwrap_or_else(|| {
                let peak = last_peaks.get(&c.server).copied();
                (Demand::default(), peak.unwrap_or(c.units))
            });
        if let Some(now) = super::reported(fresh, &c.server, product) {
            in_use = u64::from(now.needed());
            demand.waiting = u64::from(now.waiting);
        }
        let id = u32::try_from(names.len()).expect("fewer than 2^32 servers");
        names.push(c.server.clone());
        out.push(CellSnapshot {
            server: id,
            allocation: c.units,
            in_use: in_use.min(c.units),
            min_units: c.min_units,
            buffer_units: c.buffer_units,
            draining: server.state == ServerState::Draining,
            recently_granted: memory.recently_granted(&c.server, product, hold),
            demand,
        });
    }
    (out, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(decision: Decision, target: u64, allocation: u64) -> CellPlan {
        CellPlan {
            server: 0,
            allocation,
            floor: 0,
            need: 0,
            want: 0,
            fair_share: 0,
            target,
            decision,
        }
    }

    #[test]
    fn a_cell_map_keeps_each_cell_apart_and_forgets_empty_products() {
        let mut map: CellMap<u64> = CellMap::default();
        map.insert("paris", "cad", 1);
        map.insert("tokyo", "cad", 2);
        map.insert("paris", "cae", 3);
        *map.entry("paris", "cad") += 10;
        *map.entry("lima", "cad") += 5;
        assert_eq!(map.get("paris", "cad"), Some(&11));
        assert_eq!(map.get("paris", "cae"), Some(&3));
        assert_eq!(map.get("lima", "cad"), Some(&5));
        assert_eq!(map.get("cad", "paris"), None);
        assert_eq!(map.remove("paris", "cae"), Some(3));
        assert!(!map.by_product.contains_key("cae"));
        map.retain(|v| *v > 4);
        assert_eq!(map.get("tokyo", "cad"), None);
        let doubled = map.map(|v| v * 2);
        assert_eq!(doubled.get("paris", "cad"), Some(&22));
        assert_eq!(doubled.get("lima", "cad"), Some(&10));
    }

    #[test]
    fn a_decision_is_recorded_when_it_changes_not_every_run() {
        let mut memory = Memory::default();
        // First sight: a non-steady decision is recorded, a steady one is not.
        assert!(memory.decided("paris", "cad", &cell(Decision::KeptExcess, 2, 5)));
        assert!(!memory.decided("tokyo", "cad", &cell(Decision::Steady, 3, 3)));
        // The same decision run after run: recorded once.
        assert!(!memory.decided("paris", "cad", &cell(Decision::KeptExcess, 2, 5)));
        // Another product's cell of the same server is its own.
        assert!(memory.decided("paris", "cae", &cell(Decision::KeptExcess, 2, 5)));
        // The rule, the target or the allocation changing is recorded, and so is the return
        // to steady that ends an episode.
        assert!(memory.decided("paris", "cad", &cell(Decision::KeptExcess, 3, 5)));
        assert!(memory.decided("paris", "cad", &cell(Decision::KeptExcess, 3, 4)));
        assert!(memory.decided("paris", "cad", &cell(Decision::ReleaseIdle, 3, 4)));
        assert!(memory.decided("paris", "cad", &cell(Decision::Steady, 3, 3)));
        assert!(!memory.decided("paris", "cad", &cell(Decision::Steady, 3, 3)));
        assert!(memory.decided("tokyo", "cad", &cell(Decision::GrantNeeded, 5, 3)));
    }

    #[test]
    fn accountings_taken_for_samples_lose_nothing_counted_meanwhile() {
        let mut memory = Memory::default();
        memory.granted("paris", "cad", 3);
        memory.unserved("tokyo", "cad", 1, 2);
        let mut taken = memory.take_accountings();
        // A run samples Paris; Tokyo did not answer. Meanwhile an instant balance grants
        // Paris 2 and Tokyo 4.
        let sampled = taken.remove("paris", "cad").unwrap_or_default();
        assert_eq!(sampled.units_granted, 3);
        memory.granted("paris", "cad", 2);
        memory.granted("tokyo", "cad", 4);
        memory.restore_accountings(taken);
        let mut next = memory.take_accountings();
        let paris = next.remove("paris", "cad").unwrap_or_default();
        let tokyo = next.remove("tokyo", "cad").unwrap_or_default();
        assert_eq!(
            paris.units_granted, 2,
            "the sampled 3 are not counted twice"
        );
        assert_eq!(
            (
                tokyo.units_granted,
                tokyo.unserved_true,
                tokyo.unserved_false
            ),
            (4, 1, 2),
            "the unsampled tally kept, beside what was counted meanwhile"
        );
        assert!(memory.take_accountings().by_product.is_empty());
    }

    #[test]
    fn a_product_changed_after_the_runs_count_names_the_cells_to_read_again() {
        let mut memory = Memory::default();
        memory.changed("cad", Some("paris"));
        let seen = memory.changes();
        assert_eq!(
            memory.changed_since("cad", &seen),
            None,
            "as the run read it"
        );
        assert_eq!(memory.changed_since("cam", &seen), None, "never changed");
        // An instant balance logs a grant of cad (its pool), then its booking lands (Tokyo's
        // cell), and a booking of cam lands (Oslo's cell).
        memory.changed("cad", None);
        assert_eq!(memory.changed_since("cad", &seen), Some(vec![]));
        memory.changed("cad", Some("tokyo"));
        memory.changed("cam", Some("oslo"));
        assert_eq!(
            memory.changed_since("cad", &seen),
            Some(vec!["tokyo".to_owned()]),
            "Paris changed before the count"
        );
        assert_eq!(
            memory.changed_since("cam", &seen),
            Some(vec!["oslo".to_owned()]),
            "the first change after the count"
        );
        assert_eq!(memory.changed_since("sim", &seen), None);
        // A booking of Lyon's cell under way (begun before the count, say): changed, with its
        // cell, until it is done; then counted as any change.
        let seen = memory.changes();
        memory.changing("cad", Some("lyon"));
        assert_eq!(
            memory.changed_since("cad", &seen),
            Some(vec!["lyon".to_owned()])
        );
        memory.change_done("cad", Some("lyon"));
        assert_eq!(
            memory.changed_since("cad", &seen),
            Some(vec!["lyon".to_owned()])
        );
        assert_eq!(memory.changed_since("cad", &memory.changes()), None);
    }
}
