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
//! the operator's view (public checkout ids, the listing, revoke), and this file the [`Book`]
//! itself: checkouts, the wait queue, heartbeats, checkins and staleouts.

pub mod holders;
mod moves;
mod options;
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

    /// A checkout request. `wait` says the client will wait in the queue when nothing is free.
    pub fn checkout(
        &mut self,
        product: &str,
        who: Who<'_>,
        units: u32,
        wait: bool,
        now: Millis,
        handle: Handle,
    ) -> Result<Outcome, Refusal> {
        self.request(product, who, units, wait, None, now, handle)
    }

    /// A borrow: one checkout held without heartbeats until `until` (Unix ms) for offline
    /// use, granted only from units free now (never queued) and only where the policy allows
    /// borrowing for that long. It is never revoked nor reclaimed; it ends by its return (a
    /// checkin) or at `until` (a staleout).
    pub fn borrow(
        &mut self,
        product: &str,
        who: Who<'_>,
        units: u32,
        until: Millis,
        now: Millis,
        handle: Handle,
    ) -> Result<Grant, Refusal> {
        let p = self.products.get(product).ok_or(Refusal::UnknownProduct)?;
        let max_hours = p.policy.options.max_borrow_hours;
        if max_hours == 0 {
            return Err(Refusal::BorrowNotAllowed);
        }
        if until.saturating_sub(now) > u64::from(max_hours) * 3_600_000 || until <= now {
            return Err(Refusal::BorrowTooLong { max_hours });
        }
        match self.request(product, who, units, false, Some(until), now, handle)? {
            Outcome::Granted(grant) => Ok(grant),
            Outcome::Queued(_) => unreachable!("a borrow never waits"),
        }
    }

    /// The checkout and the borrow: ACL, lease, a lingering seat to reuse, limits, then the
    /// decision over what the reservations leave this requester.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        product: &str,
        who: Who<'_>,
        units: u32,
        wait: bool,
        borrow: Option<Millis>,
        now: Millis,
        handle: Handle,
    ) -> Result<Outcome, Refusal> {
        let p = self
            .products
            .get_mut(product)
            .ok_or(Refusal::UnknownProduct)?;
        acl_check(&p.policy.acl, &who).map_err(Refusal::Forbidden)?;
        if let Some(until) = self.lease
            && now >= until
        {
            // Not a denial: no move of units could have prevented it (the balancer may already
            // have reclaimed them), so it is not demand the balancer should act on.
            return Err(Refusal::LeaseExpired { since: until });
        }
        // A borrowed unit is its own seat: it leaves the site with its holder.
        let key = seat_key(p.policy.seat, who.user, who.host).filter(|_| borrow.is_none());
        let seat_held = key.as_deref().is_some_and(|k| p.seats.contains_key(k));
        if !seat_held && borrow.is_none() && p.policy.options.linger_seconds > 0 {
            let lkey = options::linger_key(key.as_deref(), who.user, who.host);
            let found = p.lingering.get(&lkey).and_then(|list| {
                // The same holder (user, host and groups), so no tally or limit changes.
                list.iter()
                    .position(|l| {
                        *l.owner.groups == *who.groups && (key.is_some() || l.units == units)
                    })
                    .map(|i| list[i].id)
            });
            if let Some(id) = found {
                if self.checkouts.len() >= self.limits.max_checkouts {
                    return Err(Refusal::Full);
                }
                let lingering = self.unlinger(id).expect("found above");
                return Ok(Outcome::Granted(self.take(
                    product,
                    who,
                    Take::Reuse(lingering),
                    now,
                    handle,
                )));
            }
        }
        let p = self.products.get_mut(product).expect("found above");
        if !seat_held
            && let Some(limit) = options::breached(
                &p.policy.options,
                &p.tally,
                who.user,
                who.host,
                who.groups,
                units,
            )
        {
            return Err(Refusal::Limit {
                scope: limit.scope,
                name: limit.name.clone(),
                max: limit.max,
            });
        }
        let (committed, own) = p.committed(Some((who.user, who.host, who.groups)));
        // Units kept for this requester are its own: no queue stands before them. Nor does a
        // waiter a limit holds back (it keeps its place, but blocks no one).
        let opts = &p.policy.options;
        let queue_ahead = borrow.is_none()
            && units > own
            && p.queue.iter().any(|w| {
                opts.limits.is_empty()
                    || options::breached(opts, &p.tally, &w.user, &w.host, &w.groups, w.units)
                        .is_none()
            });
        let mut decision = decide(
            p.policy.enforcement,
            p.allocation,
            committed,
            units,
            seat_held,
            queue_ahead,
        );
        if decision == Decision::Deny
            && !queue_ahead
            && self.yield_lingering(product, (who.user, who.host, who.groups), units)
        {
            decision = Decision::Take { overdraft: false };
        }
        let p = self.products.get_mut(product).expect("found above");
        if decision == Decision::Deny
            || (borrow.is_some() && decision != (Decision::Take { overdraft: false }))
        {
            if wait && borrow.is_none() {
                if self.waiting >= self.limits.max_waiting {
                    return Err(Refusal::Full);
                }
                self.next_waiter += 1;
                let id = self.next_waiter;
                p.queued_units += u64::from(units);
                let priority = p.policy.options.priority(who.groups);
                let at = p
                    .queue
                    .iter()
                    .position(|w| w.priority < priority)
                    .unwrap_or(p.queue.len());
                p.queue.insert(
                    at,
                    Waiter {
                        id,
                        user: who.user.to_owned(),
                        host: who.host.to_owned(),
                        groups: who.groups.into(),
                        units,
                        since: now,
                        priority,
                    },
                );
                self.waiting += 1;
                return Ok(Outcome::Queued(id));
            }
            p.count(|c| c.denials += 1);
            return Err(Refusal::Unavailable);
        }
        if self.checkouts.len() >= self.limits.max_checkouts {
            return Err(Refusal::Full);
        }
        let take = match (decision, borrow) {
            (_, Some(until)) => Take::Borrow { units, until },
            (Decision::Join, None) => Take::Join,
            (Decision::Take { overdraft }, None) => Take::New { units, overdraft },
            (Decision::Deny, None) => unreachable!("denials returned above"),
        };
        Ok(Outcome::Granted(self.take(product, who, take, now, handle)))
    }

    /// Ends lingering seats of a product, the soonest to end first, until `units` more fit for
    /// `holder` — when its policy lets waiting clients take lingering units. Ending a seat may
    /// reopen a reservation it filled, so the fit is recounted as each would end, and nothing
    /// ends unless the request fits at the last. Returns whether it now fits.
    fn yield_lingering(
        &mut self,
        product: &str,
        holder: (&str, &str, &[String]),
        units: u32,
    ) -> bool {
        let Some(p) = self.products.get(product) else {
            return false;
        };
        if !p.policy.options.linger_yields
            || p.policy.enforcement != crate::domain::Enforcement::HardStop
            || p.lingering.is_empty()
        {
            return false;
        }
        let mut soonest: Vec<&Lingering> = p.lingering.values().flatten().collect();
        soonest.sort_unstable_by_key(|l| (l.until, l.id));
        let mut tally = p.tally.clone();
        let mut in_use = p.in_use;
        let fits = |tally: &Tally, in_use: u32| {
            let (_, others) = options::unfilled(&p.policy.options, tally, Some(holder));
            u64::from(in_use) + u64::from(others) + u64::from(units) <= u64::from(p.allocation)
        };
        let mut ending = Vec::new();
        for l in soonest {
            if fits(&tally, in_use) {
                break;
            }
            let o = &l.owner;
            options::count(&mut tally, &o.user, &o.host, &o.groups, -i64::from(l.units));
            in_use -= l.units;
            ending.push(l.id);
        }
        if !fits(&tally, in_use) {
            return false;
        }
        for id in ending {
            self.end_lingering(id);
        }
        true
    }

    /// Takes a lingering seat out of the book's indexes, its units still counted in use.
    fn unlinger(&mut self, id: u64) -> Option<Lingering> {
        let (product, key) = self.lingers.remove(&id)?;
        let p = self.products.get_mut(&product)?;
        let list = p.lingering.get_mut(&key)?;
        let i = list.iter().position(|l| l.id == id)?;
        let l = list.swap_remove(i);
        if list.is_empty() {
            p.lingering.remove(&key);
        }
        self.linger_deadlines.remove(&(l.until, id));
        Some(l)
    }

    /// Ends a lingering seat: its units free. Returns its product.
    fn end_lingering(&mut self, id: u64) -> Option<Arc<str>> {
        let product = self.lingers.get(&id)?.0.clone();
        let l = self.unlinger(id)?;
        let p = self.products.get_mut(&product)?;
        p.in_use = p.in_use.saturating_sub(l.units);
        p.count_owner(&l.owner, l.units, -1);
        Some(product)
    }

    /// Applies a non-deny decision under a new handle: new units, a seat joined, a lingering
    /// seat reused or a borrow.
    fn take(
        &mut self,
        product: &str,
        who: Who<'_>,
        take: Take,
        now: Millis,
        handle: Handle,
    ) -> Grant {
        let p = self
            .products
            .get_mut(product)
            .expect("product checked by caller");
        let (user, host) = (who.user, who.host);
        let owner = || Owner {
            user: user.into(),
            host: host.into(),
            groups: who.groups.into(),
        };
        let mut key = seat_key(p.policy.seat, user, host).map(String::into_boxed_str);
        let mut borrowed_until = None;
        let (units, joined, overdraft) = match take {
            Take::Join => {
                let k = key.as_deref().expect("join needs a seat");
                let s = p.seats.get_mut(k).expect("join needs a held seat");
                s.handles += 1;
                (s.units, true, false)
            }
            Take::Reuse(l) => {
                // Its units are still in use; they change hands from the lingering owner.
                p.count_owner(&l.owner, l.units, -1);
                p.count_owner(&owner(), l.units, 1);
                if let Some(k) = &l.seat {
                    p.seats.insert(
                        k.clone(),
                        SharedSeat {
                            units: l.units,
                            handles: 1,
                            owner: owner(),
                        },
                    );
                }
                key = l.seat;
                (l.units, true, false)
            }
            Take::New { units, overdraft } => {
                if let Some(k) = &key {
                    p.seats.insert(
                        k.clone(),
                        SharedSeat {
                            units,
                            handles: 1,
                            owner: owner(),
                        },
                    );
                }
                p.in_use = p.in_use.saturating_add(units);
                p.count_owner(&owner(), units, 1);
                p.note_in_use();
                (units, false, overdraft)
            }
            Take::Borrow { units, until } => {
                key = None;
                borrowed_until = Some(until);
                p.in_use = p.in_use.saturating_add(units);
                p.count_owner(&owner(), units, 1);
                p.note_in_use();
                (units, false, false)
            }
        };
        p.count(|c| c.checkouts += 1);
        if overdraft {
            p.count(|c| c.overdrafts += 1);
        }
        let deadline =
            borrowed_until.unwrap_or_else(|| staleout_deadline(now, p.policy.staleout_seconds));
        let id = CheckoutId::of(handle);
        self.checkouts.insert(
            handle,
            Live {
                product: p.name.clone(),
                seat: key.clone(),
                units,
                deadline,
                id,
                user: user.into(),
                host: host.into(),
                groups: who.groups.into(),
                overdraft,
                created_at: now,
                heartbeat_at: None,
                borrowed_until,
            },
        );
        self.ids.insert(id, handle);
        self.deadlines.insert((deadline, handle));
        Grant {
            record: CheckoutRecord {
                handle,
                product: product.to_owned(),
                user: user.to_owned(),
                host: host.to_owned(),
                groups: who.groups.to_vec(),
                seat: key.map(String::from),
                units,
                overdraft,
                created_at: now,
                borrowed_until,
            },
            heartbeat_seconds: p.policy.heartbeat_seconds,
            joined,
        }
    }

    /// Hands freed units to the product's queue in its order (priority, then first come first
    /// served). A waiter a limit holds back keeps its place without blocking those behind it;
    /// behind a waiter that does not fit, only waiters taking units reserved for them go on.
    fn serve(
        &mut self,
        product: &str,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Vec<Served> {
        let mut served = Vec::new();
        if !self.leased(now) {
            // Without a lease nothing new is granted; the waiters stay until their timeout.
            return served;
        }
        let mut i = 0;
        let mut blocked = false;
        while let Some(p) = self.products.get_mut(product) {
            let Some(w) = p.queue.get(i) else { break };
            let key = seat_key(p.policy.seat, &w.user, &w.host);
            let seat_held = key.as_deref().is_some_and(|k| p.seats.contains_key(k));
            let opts = &p.policy.options;
            if !seat_held
                && options::breached(opts, &p.tally, &w.user, &w.host, &w.groups, w.units).is_some()
            {
                i += 1;
                continue;
            }
            let (committed, own) = p.committed(Some((&w.user, &w.host, &w.groups)));
            if blocked && (w.units > own || opts.reservations.is_empty()) {
                if opts.reservations.is_empty() {
                    break;
                }
                i += 1;
                continue;
            }
            let (enforcement, allocation, units) = (p.policy.enforcement, p.allocation, w.units);
            let mut decision = decide(enforcement, allocation, committed, units, seat_held, false);
            if decision == Decision::Deny {
                let (user, host, groups) = (w.user.clone(), w.host.clone(), w.groups.clone());
                if self.yield_lingering(product, (&user, &host, &groups), units) {
                    decision = Decision::Take { overdraft: false };
                }
            }
            if self.checkouts.len() >= self.limits.max_checkouts {
                break;
            }
            if decision == Decision::Deny {
                blocked = true;
                i += 1;
                continue;
            }
            let p = self.products.get_mut(product).expect("found above");
            let w = p.queue.remove(i).expect("index checked");
            p.queued_units -= u64::from(w.units);
            self.waiting -= 1;
            let who = Who {
                user: &w.user,
                host: &w.host,
                groups: &w.groups,
            };
            let take = match decision {
                Decision::Join => Take::Join,
                Decision::Take { overdraft } => Take::New {
                    units: w.units,
                    overdraft,
                },
                Decision::Deny => unreachable!("denials skipped above"),
            };
            let grant = self.take(product, who, take, now, handles());
            served.push(Served {
                waiter: w.id,
                grant,
            });
        }
        served
    }

    /// Removes a waiter from its queue (timeout or disconnect) and serves the waiters behind
    /// it that its leaving lets through: a smaller request that fits where the waiter's did
    /// not, or the end of its head-of-line blocking. Returns `None` when it is no longer
    /// queued, i.e. it was already served.
    ///
    /// A timeout counts as a denial — unless the lease had run out at `now`: nothing could be
    /// granted then, whatever units the balancer moved, so it is a lease refusal
    /// ([`Left::lease_expired`]) and not counted in `denials`.
    pub fn cancel_wait(
        &mut self,
        product: &str,
        waiter: u64,
        timed_out: bool,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Option<Left> {
        let leased = self.leased(now);
        let p = self.products.get_mut(product)?;
        let pos = p.queue.iter().position(|w| w.id == waiter)?;
        if let Some(w) = p.queue.remove(pos) {
            p.queued_units -= u64::from(w.units);
        }
        self.waiting -= 1;
        if timed_out && leased {
            p.count(|c| c.denials += 1);
        }
        Some(Left {
            lease_expired: !leased,
            served: self.serve(product, now, handles),
        })
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

/// How a granted checkout comes by its units.
enum Take {
    /// It shares a seat its user already holds.
    Join,
    /// It reuses its user's lingering seat.
    Reuse(Lingering),
    /// It takes new units (beyond the allocation under soft stop: `overdraft`).
    New { units: u32, overdraft: bool },
    /// It borrows units until then.
    Borrow { units: u32, until: Millis },
}

#[cfg(test)]
mod options_tests;
#[cfg(test)]
mod tests;
