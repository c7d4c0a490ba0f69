//! The metering server's checkout book: every decision about who gets a unit, as pure code.
//!
//! A metering server keeps its live state — products with their policy and allocation, the
//! checkouts held under their handles, the wait queues, the applied moves — in a [`Book`]. The
//! server's HTTP handlers, its store and its staleout task are shells around it: they call the
//! book with the request, `now` (Unix milliseconds) and fresh handles, persist what it returns and
//! answer. Nothing here reads a clock, draws a random number or does I/O, so every rule (policy,
//! seat, ACL, staleout arithmetic, FIFO wait queue, release of free units only, idempotent moves)
//! is tested directly, including by property tests over random operation sequences.
//!
//! The module is laid out by concern: [`rules`] holds the stateless rules (ACL, seat, policy
//! decision, staleout arithmetic), [`types`] the records and answers the book exchanges with its
//! shells, `moves` the balancer's grants and releases as the book applies them, [`holders`]
//! the operator's view (public checkout ids, the listing, revoke), `options` the policy
//! options' arithmetic (limits, reservations, lingering seats, idleness), `request` the
//! request path (checkout and borrow decided, units taken, the wait queue served and left),
//! and this file the [`Book`] itself: its state, heartbeats, checkins and staleouts.

pub mod holders;
mod moves;
mod options;
mod request;
pub mod rules;
pub mod types;

pub use holders::{
    CheckoutId, Cursor, HolderFilter, MAX_HOLDERS_PAGE, MAX_REASON_CHARS, REVOCATION_KEPT_MS,
    Revocation, RevokeOutcome, RevokeRefusal,
};
pub use options::{IdleVerdict, idle_verdict};
pub use rules::*;
pub use types::*;

use options::{Lingering, Owner, Tally};

use crate::domain::{MoveKind, Policy};
use crate::wire::agent::{AgentProduct, MoveResponse, ProductStatus, UsageCounters};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use uuid::Uuid;

/// A seat shared by several handles (`per_user_host`, `per_user`).
#[derive(Debug, Clone)]
struct SharedSeat {
    units: u32,
    handles: u32,
    /// Whose units they are, for the tally (a `per_user` seat spans hosts).
    owner: Owner,
}

#[derive(Debug, Clone)]
struct Waiter {
    id: u64,
    user: String,
    host: String,
    groups: Box<[String]>,
    units: u32,
    /// When it joined the queue, for the holders' listing.
    since: Millis,
    /// Its place in the queue: higher first, then first come first served.
    priority: u32,
}

/// One live checkout in memory: what decisions and staleout need, and what the holders'
/// listing shows.
#[derive(Debug, Clone)]
struct Live {
    product: Arc<str>,
    seat: Option<Box<str>>,
    units: u32,
    deadline: Millis,
    /// Its public name (a hash of the handle), indexed in `Book::ids`.
    id: CheckoutId,
    user: Box<str>,
    host: Box<str>,
    groups: Box<[String]>,
    overdraft: bool,
    created_at: Millis,
    /// The last heartbeat since the grant or the restart; `None` before the first.
    heartbeat_at: Option<Millis>,
    /// Borrowed for offline use until then: no heartbeats needed, never revoked or reclaimed.
    borrowed_until: Option<Millis>,
}

/// One product's live figures.
#[derive(Debug, Clone)]
struct ProductBook {
    name: Arc<str>,
    policy: Policy,
    allocation: u32,
    generation: u64,
    in_use: u32,
    seats: HashMap<Box<str>, SharedSeat>,
    queue: VecDeque<Waiter>,
    /// Σ units of `queue`, kept as it changes so the trigger's input costs nothing to read.
    queued_units: u64,
    since_last: UsageCounters,
    totals: UsageCounters,
    /// Units held per user, group and host that a limit or reservation names.
    tally: Tally,
    /// Seats lingering after their checkin, by [`options::linger_key`].
    lingering: HashMap<Box<str>, Vec<Lingering>>,
}

impl ProductBook {
    /// Units of the allocation a holder other than the reservations' own may not take: in use
    /// (lingering included) plus the reservations not yet taken up.
    fn committed(&self, holder: Option<(&str, &str, &[String])>) -> (u32, u32) {
        let (own, others) = options::unfilled(&self.policy.options, &self.tally, holder);
        (self.in_use.saturating_add(others), own)
    }

    /// Reserved units nobody holds yet: needed, not free, for the balancer and for releases.
    fn reserved_idle(&self) -> u32 {
        options::unfilled(&self.policy.options, &self.tally, None).1
    }

    /// Recounts the tally from the live checkouts, seats and lingering seats (after the rules
    /// changed).
    fn retally<'a>(&mut self, live: impl Iterator<Item = &'a Live>) {
        let mut tally = options::tally_for(&self.policy.options);
        if !tally.is_empty() {
            for l in live.filter(|l| l.product == self.name && l.seat.is_none()) {
                options::count(&mut tally, &l.user, &l.host, &l.groups, i64::from(l.units));
            }
            for s in self.seats.values() {
                let o = &s.owner;
                options::count(&mut tally, &o.user, &o.host, &o.groups, i64::from(s.units));
            }
            for l in self.lingering.values().flatten() {
                let o = &l.owner;
                options::count(&mut tally, &o.user, &o.host, &o.groups, i64::from(l.units));
            }
        }
        self.tally = tally;
    }

    fn count_owner(&mut self, owner: &Owner, units: u32, sign: i64) {
        options::count(
            &mut self.tally,
            &owner.user,
            &owner.host,
            &owner.groups,
            sign * i64::from(units),
        );
    }

    fn note_in_use(&mut self) {
        self.since_last.peak_in_use = self.since_last.peak_in_use.max(self.in_use);
        self.totals.peak_in_use = self.totals.peak_in_use.max(self.in_use);
    }

    fn count(&mut self, f: impl Fn(&mut UsageCounters)) {
        f(&mut self.since_last);
        f(&mut self.totals);
    }
}

/// Everything a metering server knows, and every rule it applies to it.
#[derive(Debug, Default)]
pub struct Book {
    products: HashMap<Arc<str>, ProductBook>,
    checkouts: HashMap<Handle, Live>,
    /// Live checkouts by public id, so a revoke finds its handle.
    ids: HashMap<CheckoutId, Handle>,
    /// Revoked handles, so the holder's next heartbeat or checkin hears `license_revoked`.
    revoked: HashMap<Handle, Revocation>,
    /// `revoked` in the order made, so old revocations are forgotten cheaply.
    revoked_order: VecDeque<(Millis, Handle)>,
    deadlines: BTreeSet<(Millis, Handle)>,
    moves: HashMap<Uuid, AppliedMove>,
    waiting: usize,
    next_waiter: u64,
    limits: Limits,
    /// `None`: standalone, no lease needed. `Some(t)`: new grants only while `now < t`, so a
    /// server the balancer may have declared lost never grants units it no longer owns.
    lease: Option<Millis>,
    /// When each lingering seat ends, by its number.
    linger_deadlines: BTreeSet<(Millis, u64)>,
    /// Where each lingering seat is: its product and key.
    lingers: HashMap<u64, (Arc<str>, Box<str>)>,
    next_linger: u64,
}

impl Book {
    /// An empty book with the given caps.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Defines a product or replaces its policy. Returns whether the product is new and the
    /// waiters a looser policy now serves.
    pub fn define(
        &mut self,
        product: &str,
        policy: Policy,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> (bool, Vec<Served>) {
        let is_new = match self.products.get_mut(product) {
            Some(p) => {
                let rules_changed = p.policy.options.limits != policy.options.limits
                    || p.policy.options.reservations != policy.options.reservations;
                p.policy = policy;
                if rules_changed {
                    p.retally(self.checkouts.values());
                }
                false
            }
            None => {
                let name: Arc<str> = Arc::from(product);
                let tally = options::tally_for(&policy.options);
                self.products.insert(
                    name.clone(),
                    ProductBook {
                        name,
                        policy,
                        allocation: 0,
                        generation: 0,
                        in_use: 0,
                        seats: HashMap::new(),
                        queue: VecDeque::new(),
                        queued_units: 0,
                        since_last: UsageCounters::default(),
                        totals: UsageCounters::default(),
                        tally,
                        lingering: HashMap::new(),
                    },
                );
                true
            }
        };
        let served = self.serve(product, now, handles);
        (is_new, served)
    }

    /// Restores a product from the store (at start), with its allocation, generation and totals.
    pub fn restore_product(
        &mut self,
        product: &str,
        policy: Policy,
        allocation: u32,
        generation: u64,
        totals: UsageCounters,
    ) {
        self.define(product, policy, 0, &mut || Handle(0));
        if let Some(p) = self.products.get_mut(product) {
            p.allocation = allocation;
            p.generation = generation;
            p.totals = totals;
        }
    }

    /// Restores a persisted checkout (at start). Its staleout clock restarts at `now`: clients
    /// could not heartbeat while the server was down.
    pub fn restore_checkout(&mut self, record: &CheckoutRecord, now: Millis) {
        let Some(p) = self.products.get_mut(record.product.as_str()) else {
            return;
        };
        let deadline = record
            .borrowed_until
            .unwrap_or_else(|| staleout_deadline(now, p.policy.staleout_seconds));
        let seat: Option<Box<str>> = record.seat.as_deref().map(Box::from);
        let owner = Owner {
            user: record.user.as_str().into(),
            host: record.host.as_str().into(),
            groups: record.groups.clone().into_boxed_slice(),
        };
        let takes = match &seat {
            Some(key) => match p.seats.get_mut(key) {
                Some(s) => {
                    s.handles += 1;
                    false
                }
                None => {
                    p.seats.insert(
                        key.clone(),
                        SharedSeat {
                            units: record.units,
                            handles: 1,
                            owner: owner.clone(),
                        },
                    );
                    true
                }
            },
            None => true,
        };
        if takes {
            p.in_use = p.in_use.saturating_add(record.units);
            p.count_owner(&owner, record.units, 1);
        }
        p.note_in_use();
        let id = CheckoutId::of(record.handle);
        self.checkouts.insert(
            record.handle,
            Live {
                product: p.name.clone(),
                seat,
                units: record.units,
                deadline,
                id,
                user: record.user.as_str().into(),
                host: record.host.as_str().into(),
                groups: record.groups.clone().into_boxed_slice(),
                overdraft: record.overdraft,
                created_at: record.created_at,
                heartbeat_at: None,
                borrowed_until: record.borrowed_until,
            },
        );
        self.ids.insert(id, record.handle);
        self.deadlines.insert((deadline, record.handle));
    }

    /// Restores an applied move (at start) so its repeat is still answered from it.
    pub fn restore_move(&mut self, applied: AppliedMove) {
        self.moves.insert(applied.response.move_id, applied);
    }

    /// Sets a product's allocation from local configuration (standalone use): a decrease takes
    /// only free units, like a release. Returns the new allocation, generation and the waiters
    /// served, if it changed.
    pub fn set_allocation(
        &mut self,
        product: &str,
        target: u32,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Option<(u32, u64, Vec<Served>)> {
        let p = self.products.get_mut(product)?;
        let new = if target < p.allocation {
            p.allocation - releasable(p.allocation, p.in_use, p.allocation - target)
        } else {
            target
        };
        if new == p.allocation {
            return None;
        }
        p.allocation = new;
        p.generation += 1;
        let (allocation, generation) = (p.allocation, p.generation);
        let served = self.serve(product, now, handles);
        Some((allocation, generation, served))
    }

    /// Sets the lease: `None` for a standalone server, `Some(until)` for one under a balancer
    /// (`Some(0)` before its first sync). Returns the waiters a renewed lease now serves.
    pub fn set_lease(
        &mut self,
        lease: Option<Millis>,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Vec<Served> {
        let was = self.leased(now);
        self.lease = lease;
        if was || !self.leased(now) {
            return Vec::new();
        }
        let mut names: Vec<Arc<str>> = self.products.keys().cloned().collect();
        names.sort_unstable();
        let mut served = Vec::new();
        for name in names {
            served.extend(self.serve(&name, now, handles));
        }
        served
    }

    /// The lease: `None` when standalone, else when it ends (Unix ms).
    pub fn lease(&self) -> Option<Millis> {
        self.lease
    }

    /// Whether new checkouts may be granted at `now` (standalone, or within the lease).
    pub fn leased(&self, now: Millis) -> bool {
        self.lease.is_none_or(|until| now < until)
    }

    /// Adopts the allocation the balancer's books give a product after the server was declared
    /// lost (its units were reclaimed). Unlike a release this may go below the units in use:
    /// live checkouts continue, new grants follow the new allocation. The generation moves past
    /// both the local one and the books' one, so the balancer sees a change. Returns the new
    /// allocation, generation and the waiters served; `None` for an unknown product.
    pub fn adopt_allocation(
        &mut self,
        product: &str,
        units: u32,
        generation: u64,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Option<(u32, u64, Vec<Served>)> {
        let p = self.products.get_mut(product)?;
        p.allocation = units;
        p.generation = p.generation.saturating_add(1).max(generation);
        let (allocation, generation) = (p.allocation, p.generation);
        let served = self.serve(product, now, handles);
        Some((allocation, generation, served))
    }

    /// Units asked by the clients queued for a product: the `short_units` of the instant-balance
    /// trigger (`crate::trigger`).
    pub fn queued_units(&self, product: &str) -> u64 {
        self.products.get(product).map_or(0, |p| p.queued_units)
    }

    /// Counts an instant balance asked of the balancer (status counters and totals).
    pub fn count_instant_request(&mut self, product: &str) {
        if let Some(p) = self.products.get_mut(product) {
            p.count(|c| c.instant_requests += 1);
        }
    }

    /// Why a handle is not live: revoked (and remembered), or unknown.
    fn bad_handle(&self, handle: Handle) -> BadHandle {
        match self.revoked.get(&handle) {
            Some(r) => BadHandle::Revoked {
                at: r.at,
                reason: r.reason.clone(),
            },
            None => BadHandle::Unknown,
        }
    }

    /// Keeps a checkout alive, and judges the client's idleness report against the policy's
    /// idle rules. Returns its new staleout deadline (a borrow's stays its return time) and
    /// the idle verdict; a [`IdleVerdict::Revoke`] is the caller's to carry out (it revokes
    /// and records, as an operator's revoke).
    pub fn heartbeat(
        &mut self,
        handle: Handle,
        idle_seconds: Option<u32>,
        now: Millis,
    ) -> Result<(Millis, IdleVerdict), BadHandle> {
        let Some(live) = self.checkouts.get_mut(&handle) else {
            return Err(self.bad_handle(handle));
        };
        live.heartbeat_at = Some(now);
        if live.borrowed_until.is_some() {
            return Ok((live.deadline, IdleVerdict::Active));
        }
        let policy = self.products.get(&live.product).map(|p| &p.policy);
        let staleout = policy.map_or(0, |p| p.staleout_seconds);
        let verdict = match (policy, idle_seconds) {
            (Some(p), Some(idle)) => idle_verdict(&p.options, idle),
            _ => IdleVerdict::Active,
        };
        let deadline = staleout_deadline(now, staleout);
        self.deadlines.remove(&(live.deadline, handle));
        live.deadline = deadline;
        self.deadlines.insert((deadline, handle));
        Ok((deadline, verdict))
    }

    /// What a live checkout's usage record would say if it ended now, for the caller that
    /// ends it (checkin, revoke) to record.
    pub fn ended(&self, handle: Handle) -> Option<Ended> {
        self.checkouts.get(&handle).map(|live| Ended {
            handle,
            product: live.product.clone(),
            user: live.user.to_string(),
            host: live.host.to_string(),
            groups: live.groups.to_vec(),
            units: live.units,
            started_at: live.created_at,
        })
    }

    /// Ends a checkout. Returns the product and the waiters its freed units serve. Under a
    /// policy with `linger_seconds`, the seat's units stay held for its user and host that long
    /// (a borrow's return never lingers).
    pub fn checkin(
        &mut self,
        handle: Handle,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<(Arc<str>, Vec<Served>), BadHandle> {
        self.end(handle, true, now, handles)
    }

    /// Ends a checkout its client never received (a dropped request, a waiter gone, a
    /// cancelled callback): like a checkin, but its seat never lingers.
    pub fn give_back(
        &mut self,
        handle: Handle,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<(Arc<str>, Vec<Served>), BadHandle> {
        self.end(handle, false, now, handles)
    }

    /// Ends a checkout by checkin (`linger`) or by staleout or revoke (no linger: the holder
    /// is gone or was told to stop).
    fn end(
        &mut self,
        handle: Handle,
        linger: bool,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<(Arc<str>, Vec<Served>), BadHandle> {
        let Some(live) = self.checkouts.remove(&handle) else {
            return Err(self.bad_handle(handle));
        };
        self.ids.remove(&live.id);
        self.deadlines.remove(&(live.deadline, handle));
        let product = live.product.clone();
        let mut lingered = None;
        if let Some(p) = self.products.get_mut(&live.product) {
            let frees = match &live.seat {
                Some(k) => match p.seats.get_mut(k) {
                    Some(s) if s.handles > 1 => {
                        s.handles -= 1;
                        None
                    }
                    _ => p.seats.remove(k).map(|s| s.owner),
                },
                None => Some(Owner {
                    user: live.user.clone(),
                    host: live.host.clone(),
                    groups: live.groups.clone(),
                }),
            };
            let linger_ms = u64::from(p.policy.options.linger_seconds) * 1000;
            match frees {
                Some(owner) if linger && linger_ms > 0 && live.borrowed_until.is_none() => {
                    self.next_linger += 1;
                    let id = self.next_linger;
                    let key = options::linger_key(live.seat.as_deref(), &live.user, &live.host);
                    let until = now.saturating_add(linger_ms);
                    p.lingering.entry(key.clone()).or_default().push(Lingering {
                        id,
                        units: live.units,
                        until,
                        owner,
                        seat: live.seat.clone(),
                    });
                    lingered = Some((until, id, key));
                }
                Some(owner) => {
                    p.in_use = p.in_use.saturating_sub(live.units);
                    p.count_owner(&owner, live.units, -1);
                }
                None => {}
            }
        }
        if let Some((until, id, key)) = lingered {
            self.linger_deadlines.insert((until, id));
            self.lingers.insert(id, (product.clone(), key));
        }
        let served = self.serve(&product, now, handles);
        Ok((product, served))
    }

    /// The earliest deadline (a staleout, a borrow's end or a linger's), for the task that
    /// sleeps until it.
    pub fn next_deadline(&self) -> Option<Millis> {
        let staleout = self.deadlines.first().map(|(d, _)| *d);
        let linger = self.linger_deadlines.first().map(|(d, _)| *d);
        staleout.into_iter().chain(linger).min()
    }

    /// Stales out every checkout whose deadline has passed (a borrow past its time included)
    /// and ends the lingers that are up. Returns the staled checkouts and the waiters their
    /// units serve.
    pub fn expire(
        &mut self,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> (Vec<Ended>, Vec<Served>) {
        self.forget_old_revocations(now);
        let mut staled = Vec::new();
        let mut served = Vec::new();
        while let Some(&(until, id)) = self.linger_deadlines.first() {
            if until > now {
                break;
            }
            match self.end_lingering(id) {
                Some(product) => served.extend(self.serve(&product, now, handles)),
                None => {
                    self.linger_deadlines.pop_first();
                }
            }
        }
        while let Some(&(deadline, handle)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let ended = self.ended(handle);
            if let (Some(ended), Ok((product, s))) = (ended, self.end(handle, false, now, handles))
            {
                if let Some(p) = self.products.get_mut(&product) {
                    p.count(|c| c.staleouts += 1);
                }
                staled.push(ended);
                served.extend(s);
            } else {
                self.deadlines.pop_first();
            }
        }
        (staled, served)
    }

    /// The product a live checkout belongs to.
    pub fn product_of(&self, handle: Handle) -> Option<&str> {
        self.checkouts.get(&handle).map(|l| &*l.product)
    }

    /// The policy of a product, if defined.
    pub fn policy(&self, product: &str) -> Option<&Policy> {
        self.products.get(product).map(|p| &p.policy)
    }

    /// A product's allocation, generation and in-use units.
    pub fn figures(&self, product: &str) -> Option<(u32, u64, u32)> {
        self.products
            .get(product)
            .map(|p| (p.allocation, p.generation, p.in_use))
    }

    /// Live checkouts (handles).
    pub fn live_checkouts(&self) -> usize {
        self.checkouts.len()
    }

    /// Clients waiting, over all products.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Holds a live checkout only until `until` unless a heartbeat comes first: a unit served
    /// to a callback is kept that long for its client to claim.
    pub fn hold_until(&mut self, handle: Handle, until: Millis) {
        if let Some(live) = self.checkouts.get_mut(&handle) {
            self.deadlines.remove(&(live.deadline, handle));
            live.deadline = until;
            self.deadlines.insert((until, handle));
        }
    }

    /// A waiter's place in its product's queue (0 is next), if it still waits.
    pub fn queue_position(&self, product: &str, waiter: u64) -> Option<usize> {
        self.products
            .get(product)?
            .queue
            .iter()
            .position(|w| w.id == waiter)
    }

    /// Whether a handle is a live borrow.
    pub fn is_borrowed(&self, handle: Handle) -> bool {
        self.checkouts
            .get(&handle)
            .is_some_and(|l| l.borrowed_until.is_some())
    }

    /// Whether a handle is live.
    pub fn is_live(&self, handle: Handle) -> bool {
        self.checkouts.contains_key(&handle)
    }

    /// The client view of every product, sorted by name.
    pub fn products(&self) -> Vec<AgentProduct> {
        let mut out: Vec<AgentProduct> = self
            .products
            .values()
            .map(|p| AgentProduct {
                product: p.name.to_string(),
                allocated: p.allocation,
                in_use: p.in_use,
                free: p.allocation.saturating_sub(p.in_use),
                waiting: u32::try_from(p.queue.len()).unwrap_or(u32::MAX),
                policy: p.policy.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.product.cmp(&b.product));
        out
    }

    /// Every product's totals, for the store.
    pub fn totals(&self) -> Vec<(String, UsageCounters)> {
        self.products
            .values()
            .map(|p| (p.name.to_string(), p.totals.clone()))
            .collect()
    }

    /// The balancer's view of every product, sorted by name. With `reset`, the counters since
    /// the last read start again (the peak restarts at the current in-use).
    pub fn status(&mut self, reset: bool) -> Vec<ProductStatus> {
        let mut out: Vec<ProductStatus> = self
            .products
            .values_mut()
            .map(|p| {
                let s = ProductStatus {
                    product: p.name.to_string(),
                    allocation: p.allocation,
                    generation: p.generation,
                    in_use: p.in_use,
                    reserved: p.reserved_idle().min(p.allocation.saturating_sub(p.in_use)),
                    waiting: u32::try_from(p.queue.len()).unwrap_or(u32::MAX),
                    since_last: p.since_last.clone(),
                    totals: p.totals.clone(),
                };
                if reset {
                    p.since_last = UsageCounters {
                        peak_in_use: p.in_use,
                        ..UsageCounters::default()
                    };
                }
                s
            })
            .collect();
        out.sort_by(|a, b| a.product.cmp(&b.product));
        out
    }
}

#[cfg(test)]
mod options_tests;
#[cfg(test)]
mod tests;
