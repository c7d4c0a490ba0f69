//! The metering server's checkout book: every decision about who gets a unit, as pure code.
//!
//! A metering server keeps its live state — products with their policy and allocation, the
//! checkouts held under their handles, the wait queues, the applied moves — in a [`Book`]. The
//! server's HTTP handlers, its store and its staleout task are shells around it: they call the
//! book with the request, `now` (Unix milliseconds) and fresh handles, persist what it returns and
//! answer. Nothing here reads a clock, draws a random number or does I/O, so every rule (policy,
//! seat, ACL, staleout arithmetic, FIFO wait queue, release of free units only, idempotent moves)
//! is tested directly, including by property tests over random operation sequences.

use crate::domain::{Acl, Enforcement, MoveKind, Policy, Seat};
use crate::wire::agent::{AgentProduct, MoveResponse, ProductStatus, UsageCounters};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use uuid::Uuid;

/// Wall-clock time as milliseconds since the Unix epoch; persisted, so it survives restarts.
pub type Millis = u64;

/// Names one checkout: 128 random bits, shown as 32 lowercase hex digits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub u128);

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for Handle {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        u128::from_str_radix(s, 16).map(Handle).map_err(|_| ())
    }
}

/// The identity a checkout is judged by: ACLs and seat rules read these.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// Who runs the program.
    pub user: &'a str,
    /// Where it runs.
    pub host: &'a str,
    /// Groups the user states it belongs to.
    pub groups: &'a [String],
}

/// Which ACL rule refused a checkout, so the answer can say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclDenial {
    /// The user is denied, or not on a non-empty allow list.
    User,
    /// The host is denied, or not on a non-empty allow list.
    Host,
    /// A group is denied, or none of the user's groups is on a non-empty allow list.
    Group,
}

impl fmt::Display for AclDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AclDenial::User => "the user may not check this product out",
            AclDenial::Host => "this host may not check this product out",
            AclDenial::Group => "the user's groups may not check this product out",
        })
    }
}

/// Applies an ACL: deny lists win over allow lists; an empty allow list allows everyone.
pub fn acl_check(acl: &Acl, who: &Who<'_>) -> Result<(), AclDenial> {
    let has = |list: &[String], v: &str| list.iter().any(|e| e == v);
    if has(&acl.deny_users, who.user) {
        return Err(AclDenial::User);
    }
    if has(&acl.deny_hosts, who.host) {
        return Err(AclDenial::Host);
    }
    if who.groups.iter().any(|g| has(&acl.deny_groups, g)) {
        return Err(AclDenial::Group);
    }
    if !acl.allow_users.is_empty() && !has(&acl.allow_users, who.user) {
        return Err(AclDenial::User);
    }
    if !acl.allow_hosts.is_empty() && !has(&acl.allow_hosts, who.host) {
        return Err(AclDenial::Host);
    }
    if !acl.allow_groups.is_empty() && !who.groups.iter().any(|g| has(&acl.allow_groups, g)) {
        return Err(AclDenial::Group);
    }
    Ok(())
}

/// The key of a shared seat, or `None` when every checkout takes its own units (`concurrent`).
///
/// Names never hold control characters (see `validate::name`), so `\u{1f}` separates safely.
pub fn seat_key(seat: Seat, user: &str, host: &str) -> Option<String> {
    match seat {
        Seat::Concurrent => None,
        Seat::PerUserHost => Some(format!("{user}\u{1f}{host}")),
        Seat::PerUser => Some(user.to_owned()),
    }
}

/// What the policy says about one checkout request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The requester already holds a seat that this checkout shares: no new units.
    Join,
    /// New units are taken; `overdraft` when a soft-stop product goes beyond its allocation.
    Take {
        /// Whether the grant goes beyond the allocation (soft stop only).
        overdraft: bool,
    },
    /// Hard stop and no room (or others are queued first).
    Deny,
}

/// The checkout decision: seat sharing first, then free units, then the enforcement policy.
///
/// `queue_ahead` says that other clients already wait for this product; under hard stop a new
/// request never jumps that queue.
pub fn decide(
    enforcement: Enforcement,
    allocation: u32,
    in_use: u32,
    units: u32,
    seat_held: bool,
    queue_ahead: bool,
) -> Decision {
    if seat_held {
        return Decision::Join;
    }
    let fits = u64::from(in_use) + u64::from(units) <= u64::from(allocation);
    match enforcement {
        Enforcement::HardStop if fits && !queue_ahead => Decision::Take { overdraft: false },
        Enforcement::HardStop => Decision::Deny,
        Enforcement::SoftStop => Decision::Take { overdraft: !fits },
        Enforcement::NoStop => Decision::Take { overdraft: false },
    }
}

/// When a checkout heartbeated at `heartbeat_at` stales out.
pub fn staleout_deadline(heartbeat_at: Millis, staleout_seconds: u32) -> Millis {
    heartbeat_at.saturating_add(u64::from(staleout_seconds) * 1000)
}

/// Whole seconds left before `deadline`, rounded up, for the heartbeat answer.
pub fn seconds_until(deadline: Millis, now: Millis) -> u32 {
    let ms = deadline.saturating_sub(now);
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// Units a release may take: only free units, never more than asked.
pub fn releasable(allocation: u32, in_use: u32, asked: u32) -> u32 {
    asked.min(allocation.saturating_sub(in_use))
}

/// A checkout as persisted: enough to rebuild the book after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutRecord {
    /// The checkout's name.
    pub handle: Handle,
    /// The product checked out.
    pub product: String,
    /// Who holds it.
    pub user: String,
    /// Where it is held.
    pub host: String,
    /// The shared seat it belongs to, if the product shares seats.
    pub seat: Option<String>,
    /// Units held by the checkout's seat.
    pub units: u32,
    /// Granted beyond the allocation (soft stop).
    pub overdraft: bool,
    /// When it was granted.
    pub created_at: Millis,
}

/// A waiter's leaving of its queue ([`Book::cancel_wait`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    /// The server's lease had run out when it left: its timeout is a lease refusal, not a
    /// denial.
    pub lease_expired: bool,
    /// The waiters behind it that its leaving let through, to hand their checkouts to.
    pub served: Vec<Served>,
}

/// A granted checkout, to persist (`record`) and to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// What to persist before answering.
    pub record: CheckoutRecord,
    /// How often the client should heartbeat.
    pub heartbeat_seconds: u32,
    /// Whether this checkout joined a seat already held (no new units were taken).
    pub joined: bool,
}

/// A waiting client that a freed unit was handed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The waiter, as returned by [`Outcome::Queued`].
    pub waiter: u64,
    /// Its checkout.
    pub grant: Grant,
}

/// The result of a checkout request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Granted now.
    Granted(Grant),
    /// Nothing free; the client waits in the product's queue under this id.
    Queued(u64),
}

/// Why a checkout was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The product is not defined here.
    UnknownProduct,
    /// The ACL refuses this user, host or group.
    Forbidden(AclDenial),
    /// Hard stop and nothing free (and the client would not wait).
    Unavailable,
    /// The server's cap on live checkouts or waiting clients is reached.
    Full,
    /// The server's lease from the balancer ran out at `since` (Unix ms; 0 when it never had
    /// one): it may not grant, because the balancer may already have reclaimed its units.
    LeaseExpired {
        /// When the lease ended.
        since: Millis,
    },
}

/// Why a heartbeat or checkin was refused: the handle is unknown or staled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadHandle;

/// Why a move was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveRefusal {
    /// The product is not defined here.
    UnknownProduct,
    /// The move id was already applied as another kind of move or to another product.
    Conflict,
}

/// A move as applied and persisted, so a repeat is answered from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMove {
    /// Release or grant.
    pub kind: MoveKind,
    /// The product moved.
    pub product: String,
    /// Units the balancer asked to move.
    pub requested: u32,
    /// The first answer, repeated verbatim.
    pub response: MoveResponse,
}

/// The answer to a move request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveOutcome {
    /// The answer (the first one, for a repeat).
    pub response: MoveResponse,
    /// The move to persist, or `None` for a repeat that changed nothing.
    pub applied: Option<AppliedMove>,
    /// Waiters served by a grant's new units.
    pub served: Vec<Served>,
}

/// Caps that keep one server's memory and work bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most live checkouts (handles) at once.
    pub max_checkouts: usize,
    /// Most clients waiting at once, over all products.
    pub max_waiting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_checkouts: 1_000_000,
            max_waiting: 10_000,
        }
    }
}

/// A seat shared by several handles (`per_user_host`, `per_user`).
#[derive(Debug, Clone)]
struct SharedSeat {
    units: u32,
    handles: u32,
}

#[derive(Debug, Clone)]
struct Waiter {
    id: u64,
    user: String,
    host: String,
    units: u32,
}

/// One live checkout in memory: only what decisions and staleout need.
#[derive(Debug, Clone)]
struct Live {
    product: Arc<str>,
    seat: Option<Box<str>>,
    units: u32,
    deadline: Millis,
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
}

impl ProductBook {
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
    deadlines: BTreeSet<(Millis, Handle)>,
    moves: HashMap<Uuid, AppliedMove>,
    waiting: usize,
    next_waiter: u64,
    limits: Limits,
    /// `None`: standalone, no lease needed. `Some(t)`: new grants only while `now < t`, so a
    /// server the balancer may have declared lost never grants units it no longer owns.
    lease: Option<Millis>,
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
                p.policy = policy;
                false
            }
            None => {
                let name: Arc<str> = Arc::from(product);
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
        let deadline = staleout_deadline(now, p.policy.staleout_seconds);
        let seat: Option<Box<str>> = record.seat.as_deref().map(Box::from);
        match &seat {
            Some(key) => match p.seats.get_mut(key) {
                Some(s) => s.handles += 1,
                None => {
                    p.seats.insert(
                        key.clone(),
                        SharedSeat {
                            units: record.units,
                            handles: 1,
                        },
                    );
                    p.in_use = p.in_use.saturating_add(record.units);
                }
            },
            None => p.in_use = p.in_use.saturating_add(record.units),
        }
        p.note_in_use();
        self.checkouts.insert(
            record.handle,
            Live {
                product: p.name.clone(),
                seat,
                units: record.units,
                deadline,
            },
        );
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
        let key = seat_key(p.policy.seat, who.user, who.host);
        let seat_held = key.as_deref().is_some_and(|k| p.seats.contains_key(k));
        let decision = decide(
            p.policy.enforcement,
            p.allocation,
            p.in_use,
            units,
            seat_held,
            !p.queue.is_empty(),
        );
        if decision == Decision::Deny {
            if wait {
                if self.waiting >= self.limits.max_waiting {
                    return Err(Refusal::Full);
                }
                self.next_waiter += 1;
                let id = self.next_waiter;
                p.queued_units += u64::from(units);
                p.queue.push_back(Waiter {
                    id,
                    user: who.user.to_owned(),
                    host: who.host.to_owned(),
                    units,
                });
                self.waiting += 1;
                return Ok(Outcome::Queued(id));
            }
            p.count(|c| c.denials += 1);
            return Err(Refusal::Unavailable);
        }
        if self.checkouts.len() >= self.limits.max_checkouts {
            return Err(Refusal::Full);
        }
        Ok(Outcome::Granted(self.take(
            product, who.user, who.host, units, decision, now, handle,
        )))
    }

    /// Applies a non-deny decision: takes the units (or joins the seat) under a new handle.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        product: &str,
        user: &str,
        host: &str,
        units: u32,
        decision: Decision,
        now: Millis,
        handle: Handle,
    ) -> Grant {
        let p = self
            .products
            .get_mut(product)
            .expect("product checked by caller");
        let key = seat_key(p.policy.seat, user, host).map(String::into_boxed_str);
        let (units, joined, overdraft) = match decision {
            Decision::Join => {
                let k = key.as_deref().expect("join needs a seat");
                let s = p.seats.get_mut(k).expect("join needs a held seat");
                s.handles += 1;
                (s.units, true, false)
            }
            Decision::Take { overdraft } => {
                if let Some(k) = &key {
                    p.seats.insert(k.clone(), SharedSeat { units, handles: 1 });
                }
                p.in_use = p.in_use.saturating_add(units);
                p.note_in_use();
                (units, false, overdraft)
            }
            Decision::Deny => unreachable!("take is never called with a denial"),
        };
        p.count(|c| c.checkouts += 1);
        if overdraft {
            p.count(|c| c.overdrafts += 1);
        }
        let deadline = staleout_deadline(now, p.policy.staleout_seconds);
        self.checkouts.insert(
            handle,
            Live {
                product: p.name.clone(),
                seat: key.clone(),
                units,
                deadline,
            },
        );
        self.deadlines.insert((deadline, handle));
        Grant {
            record: CheckoutRecord {
                handle,
                product: product.to_owned(),
                user: user.to_owned(),
                host: host.to_owned(),
                seat: key.map(String::from),
                units,
                overdraft,
                created_at: now,
            },
            heartbeat_seconds: p.policy.heartbeat_seconds,
            joined,
        }
    }

    /// Hands freed units to the product's queue, first come first served, while the head fits.
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
        while let Some(p) = self.products.get_mut(product) {
            let Some(head) = p.queue.front() else { break };
            let key = seat_key(p.policy.seat, &head.user, &head.host);
            let seat_held = key.as_deref().is_some_and(|k| p.seats.contains_key(k));
            let decision = decide(
                p.policy.enforcement,
                p.allocation,
                p.in_use,
                head.units,
                seat_held,
                false,
            );
            if decision == Decision::Deny || self.checkouts.len() >= self.limits.max_checkouts {
                break;
            }
            let w = p.queue.pop_front().expect("head exists");
            p.queued_units -= u64::from(w.units);
            self.waiting -= 1;
            let grant = self.take(product, &w.user, &w.host, w.units, decision, now, handles());
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

    /// Keeps a checkout alive. Returns its new staleout deadline.
    pub fn heartbeat(&mut self, handle: Handle, now: Millis) -> Result<Millis, BadHandle> {
        let live = self.checkouts.get_mut(&handle).ok_or(BadHandle)?;
        let staleout = self
            .products
            .get(&live.product)
            .map_or(0, |p| p.policy.staleout_seconds);
        let deadline = staleout_deadline(now, staleout);
        self.deadlines.remove(&(live.deadline, handle));
        live.deadline = deadline;
        self.deadlines.insert((deadline, handle));
        Ok(deadline)
    }

    /// Ends a checkout. Returns the product and the waiters its freed units serve.
    pub fn checkin(
        &mut self,
        handle: Handle,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<(Arc<str>, Vec<Served>), BadHandle> {
        let live = self.checkouts.remove(&handle).ok_or(BadHandle)?;
        self.deadlines.remove(&(live.deadline, handle));
        let product = live.product.clone();
        if let Some(p) = self.products.get_mut(&live.product) {
            let frees = match &live.seat {
                Some(k) => match p.seats.get_mut(k) {
                    Some(s) if s.handles > 1 => {
                        s.handles -= 1;
                        false
                    }
                    _ => {
                        p.seats.remove(k);
                        true
                    }
                },
                None => true,
            };
            if frees {
                p.in_use = p.in_use.saturating_sub(live.units);
            }
        }
        let served = self.serve(&product, now, handles);
        Ok((product, served))
    }

    /// The earliest staleout deadline, for the task that sleeps until it.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Stales out every checkout whose deadline has passed. Returns the staled handles (with
    /// their product) and the waiters their units serve.
    pub fn expire(
        &mut self,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> (Vec<(Handle, Arc<str>)>, Vec<Served>) {
        let mut staled = Vec::new();
        let mut served = Vec::new();
        while let Some(&(deadline, handle)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Ok((product, s)) = self.checkin(handle, now, handles) {
                if let Some(p) = self.products.get_mut(&product) {
                    p.count(|c| c.staleouts += 1);
                }
                staled.push((handle, product));
                served.extend(s);
            } else {
                self.deadlines.pop_first();
            }
        }
        (staled, served)
    }

    fn apply_move(
        &mut self,
        kind: MoveKind,
        move_id: Uuid,
        product: &str,
        units: u32,
    ) -> Result<Result<AppliedMove, MoveResponse>, MoveRefusal> {
        if let Some(m) = self.moves.get(&move_id) {
            if m.kind != kind || m.product != product {
                return Err(MoveRefusal::Conflict);
            }
            return Ok(Err(m.response.clone()));
        }
        let p = self
            .products
            .get_mut(product)
            .ok_or(MoveRefusal::UnknownProduct)?;
        let moved = match kind {
            MoveKind::Release => releasable(p.allocation, p.in_use, units),
            MoveKind::Grant => units.min(u32::MAX - p.allocation),
        };
        match kind {
            MoveKind::Release => p.allocation -= moved,
            MoveKind::Grant => p.allocation += moved,
        }
        p.generation += 1;
        let applied = AppliedMove {
            kind,
            product: product.to_owned(),
            requested: units,
            response: MoveResponse {
                move_id,
                units: moved,
                allocation: p.allocation,
                generation: p.generation,
            },
        };
        self.moves.insert(move_id, applied.clone());
        Ok(Ok(applied))
    }

    /// A release from the balancer: takes only free units, at most `units`. A repeated move id
    /// returns the first answer and changes nothing.
    pub fn release(
        &mut self,
        move_id: Uuid,
        product: &str,
        units: u32,
    ) -> Result<MoveOutcome, MoveRefusal> {
        Ok(
            match self.apply_move(MoveKind::Release, move_id, product, units)? {
                Ok(applied) => MoveOutcome {
                    response: applied.response.clone(),
                    applied: Some(applied),
                    served: Vec::new(),
                },
                Err(response) => MoveOutcome {
                    response,
                    applied: None,
                    served: Vec::new(),
                },
            },
        )
    }

    /// A grant from the balancer: adds units and serves waiters. Idempotent by move id.
    pub fn grant(
        &mut self,
        move_id: Uuid,
        product: &str,
        units: u32,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<MoveOutcome, MoveRefusal> {
        Ok(
            match self.apply_move(MoveKind::Grant, move_id, product, units)? {
                Ok(applied) => MoveOutcome {
                    response: applied.response.clone(),
                    applied: Some(applied),
                    served: self.serve(product, now, handles),
                },
                Err(response) => MoveOutcome {
                    response,
                    applied: None,
                    served: Vec::new(),
                },
            },
        )
    }

    /// Whether a move id has been applied (its answer, if so).
    pub fn applied_move(&self, move_id: Uuid) -> Option<&AppliedMove> {
        self.moves.get(&move_id)
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(enforcement: Enforcement, seat: Seat) -> Policy {
        Policy {
            enforcement,
            seat,
            heartbeat_seconds: 10,
            staleout_seconds: 30,
            acl: Acl::default(),
        }
    }

    fn who<'a>(user: &'a str, host: &'a str) -> Who<'a> {
        Who {
            user,
            host,
            groups: &[],
        }
    }

    struct Gen(u128);
    impl Gen {
        fn next(&mut self) -> Handle {
            self.0 += 1;
            Handle(self.0)
        }
    }

    fn book_with(enforcement: Enforcement, seat: Seat, allocation: u32) -> (Book, Gen) {
        let mut b = Book::new(Limits::default());
        let mut g = Gen(1000);
        b.define("cad", policy(enforcement, seat), 0, &mut || g.next());
        if allocation > 0 {
            b.grant(Uuid::from_u128(1), "cad", allocation, 0, &mut || g.next())
                .unwrap();
        }
        (b, g)
    }

    fn granted(o: Result<Outcome, Refusal>) -> Grant {
        match o {
            Ok(Outcome::Granted(g)) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn handle_text_round_trips() {
        let h = Handle(0xdead_beef);
        assert_eq!(h.to_string().len(), 32);
        assert_eq!(h.to_string().parse::<Handle>(), Ok(h));
        assert!("xyz".parse::<Handle>().is_err());
        assert!("g".repeat(32).parse::<Handle>().is_err());
    }

    #[test]
    fn acl_deny_wins_over_allow() {
        let acl = Acl {
            allow_users: vec!["ann".into(), "bob".into()],
            deny_users: vec!["bob".into()],
            ..Acl::default()
        };
        assert_eq!(acl_check(&acl, &who("ann", "h")), Ok(()));
        assert_eq!(acl_check(&acl, &who("bob", "h")), Err(AclDenial::User));
        assert_eq!(acl_check(&acl, &who("cy", "h")), Err(AclDenial::User));
    }

    #[test]
    fn acl_hosts_and_groups() {
        let acl = Acl {
            allow_hosts: vec!["ws1".into()],
            deny_groups: vec!["contractors".into()],
            allow_groups: vec!["eng".into(), "contractors".into()],
            ..Acl::default()
        };
        let eng = vec!["eng".to_owned()];
        let both = vec!["eng".to_owned(), "contractors".to_owned()];
        let ok = Who {
            user: "a",
            host: "ws1",
            groups: &eng,
        };
        assert_eq!(acl_check(&acl, &ok), Ok(()));
        assert_eq!(
            acl_check(&acl, &Who { host: "ws2", ..ok }),
            Err(AclDenial::Host)
        );
        assert_eq!(
            acl_check(
                &acl,
                &Who {
                    groups: &both,
                    ..ok
                }
            ),
            Err(AclDenial::Group)
        );
        assert_eq!(
            acl_check(&acl, &Who { groups: &[], ..ok }),
            Err(AclDenial::Group)
        );
        assert_eq!(acl_check(&Acl::default(), &who("x", "y")), Ok(()));
    }

    #[test]
    fn decide_follows_enforcement() {
        use Enforcement::*;
        assert_eq!(
            decide(HardStop, 2, 1, 1, false, false),
            Decision::Take { overdraft: false }
        );
        assert_eq!(decide(HardStop, 2, 2, 1, false, false), Decision::Deny);
        assert_eq!(decide(HardStop, 2, 0, 1, false, true), Decision::Deny);
        assert_eq!(
            decide(SoftStop, 2, 2, 1, false, false),
            Decision::Take { overdraft: true }
        );
        assert_eq!(
            decide(NoStop, 2, 2, 1, false, false),
            Decision::Take { overdraft: false }
        );
        assert_eq!(decide(HardStop, 0, 0, 1, true, true), Decision::Join);
        assert_eq!(
            decide(HardStop, u32::MAX, u32::MAX - 1, 2, false, false),
            Decision::Deny
        );
    }

    #[test]
    fn staleout_arithmetic() {
        assert_eq!(staleout_deadline(1_000, 30), 31_000);
        assert_eq!(staleout_deadline(u64::MAX - 1, 30), u64::MAX);
        assert_eq!(seconds_until(31_000, 1_000), 30);
        assert_eq!(seconds_until(31_000, 30_001), 1);
        assert_eq!(seconds_until(31_000, 40_000), 0);
        assert_eq!(releasable(10, 7, 5), 3);
        assert_eq!(releasable(10, 12, 5), 0);
    }

    #[test]
    fn hard_stop_denies_past_the_allocation() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 2);
        granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        granted(b.checkout("cad", who("b", "h"), 1, false, 0, g.next()));
        assert_eq!(
            b.checkout("cad", who("c", "h"), 1, false, 0, g.next()),
            Err(Refusal::Unavailable)
        );
        assert_eq!(b.status(false)[0].since_last.denials, 1);
    }

    #[test]
    fn soft_stop_flags_overdraft() {
        let (mut b, mut g) = book_with(Enforcement::SoftStop, Seat::Concurrent, 1);
        assert!(
            !granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()))
                .record
                .overdraft
        );
        assert!(
            granted(b.checkout("cad", who("b", "h"), 1, false, 0, g.next()))
                .record
                .overdraft
        );
        let s = &b.status(false)[0];
        assert_eq!((s.in_use, s.since_last.overdrafts), (2, 1));
        assert_eq!(b.products()[0].free, 0);
    }

    #[test]
    fn per_user_host_shares_one_seat_until_the_last_checkin() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::PerUserHost, 1);
        let first = granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        let second = granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        assert!(second.joined);
        assert_eq!(b.figures("cad").unwrap().2, 1);
        assert_eq!(
            b.checkout("cad", who("a", "other"), 1, false, 0, g.next()),
            Err(Refusal::Unavailable)
        );
        b.checkin(first.record.handle, 0, &mut || g.next()).unwrap();
        assert_eq!(b.figures("cad").unwrap().2, 1);
        b.checkin(second.record.handle, 0, &mut || g.next())
            .unwrap();
        assert_eq!(b.figures("cad").unwrap().2, 0);
    }

    #[test]
    fn per_user_shares_across_hosts() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::PerUser, 1);
        granted(b.checkout("cad", who("a", "h1"), 1, false, 0, g.next()));
        assert!(granted(b.checkout("cad", who("a", "h2"), 1, false, 0, g.next())).joined);
        assert_eq!(
            b.checkout("cad", who("b", "h1"), 1, false, 0, g.next()),
            Err(Refusal::Unavailable)
        );
    }

    #[test]
    fn staleout_frees_units_and_reports_next_deadline() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 1);
        let c = granted(b.checkout("cad", who("a", "h"), 1, false, 1_000, g.next()));
        assert_eq!(b.next_deadline(), Some(31_000));
        b.heartbeat(c.record.handle, 20_000).unwrap();
        assert_eq!(b.next_deadline(), Some(50_000));
        assert!(b.expire(49_999, &mut || g.next()).0.is_empty());
        assert_eq!(b.expire(50_000, &mut || g.next()).0[0].0, c.record.handle);
        assert_eq!(b.heartbeat(c.record.handle, 50_001), Err(BadHandle));
        assert_eq!(b.next_deadline(), None);
        assert_eq!(b.status(false)[0].since_last.staleouts, 1);
    }

    #[test]
    fn queue_is_first_come_first_served() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 1);
        let held = granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        let q1 = b
            .checkout("cad", who("b", "h"), 1, true, 0, g.next())
            .unwrap();
        let q2 = b
            .checkout("cad", who("c", "h"), 1, true, 0, g.next())
            .unwrap();
        let (Outcome::Queued(w1), Outcome::Queued(w2)) = (q1, q2) else {
            panic!("both should queue")
        };
        assert_eq!(b.waiting(), 2);
        let (_, served) = b.checkin(held.record.handle, 5, &mut || g.next()).unwrap();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].waiter, w1);
        assert_eq!(served[0].grant.record.user, "b");
        assert!(
            b.cancel_wait("cad", w2, true, 5, &mut || g.next())
                .is_some()
        );
        assert!(
            b.cancel_wait("cad", w1, true, 5, &mut || g.next())
                .is_none()
        );
        assert_eq!(b.waiting(), 0);
    }

    #[test]
    fn a_waiter_leaving_serves_the_queue_behind_it() {
        // Two units, one in use: a head asking for two blocks a smaller request behind it.
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 2);
        granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        let Ok(Outcome::Queued(head)) = b.checkout("cad", who("b", "h"), 2, true, 0, g.next())
        else {
            panic!("the head should queue")
        };
        let Ok(Outcome::Queued(_)) = b.checkout("cad", who("c", "h"), 1, true, 0, g.next()) else {
            panic!("the request behind should queue (no jumping the queue)")
        };
        assert_eq!(b.queued_units("cad"), 3);
        // The head's wait ends: the one behind it now fits and is served at once.
        let left = b
            .cancel_wait("cad", head, true, 0, &mut || g.next())
            .unwrap();
        assert!(!left.lease_expired);
        assert_eq!(left.served.len(), 1);
        assert_eq!(left.served[0].grant.record.user, "c");
        assert_eq!(b.queued_units("cad"), 0, "the waiter behind was not served");
        assert_eq!(b.figures("cad"), Some((2, 1, 2)));
        assert_eq!(b.status(false)[0].since_last.denials, 1);
    }

    #[test]
    fn a_grant_serves_waiters() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 0);
        let Outcome::Queued(w) = b
            .checkout("cad", who("a", "h"), 2, true, 0, g.next())
            .unwrap()
        else {
            panic!("should queue")
        };
        let out = b
            .grant(Uuid::from_u128(7), "cad", 1, 0, &mut || g.next())
            .unwrap();
        assert!(out.served.is_empty());
        let out = b
            .grant(Uuid::from_u128(8), "cad", 1, 0, &mut || g.next())
            .unwrap();
        assert_eq!(out.served[0].waiter, w);
        assert_eq!(b.figures("cad"), Some((2, 2, 2)));
    }

    #[test]
    fn release_never_takes_in_use_units_and_repeats_are_idempotent() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 5);
        for u in ["a", "b", "c"] {
            granted(b.checkout("cad", who(u, "h"), 1, false, 0, g.next()));
        }
        let id = Uuid::from_u128(42);
        let first = b.release(id, "cad", 10).unwrap();
        assert_eq!(first.response.units, 2);
        assert_eq!(first.response.allocation, 3);
        assert!(first.applied.is_some());
        let again = b.release(id, "cad", 10).unwrap();
        assert_eq!(again.response, first.response);
        assert!(again.applied.is_none());
        assert_eq!(b.figures("cad"), Some((3, 2, 3)));
        assert_eq!(
            b.grant(id, "cad", 1, 0, &mut || g.next()).unwrap_err(),
            MoveRefusal::Conflict
        );
        assert_eq!(
            b.release(Uuid::from_u128(43), "nope", 1).unwrap_err(),
            MoveRefusal::UnknownProduct
        );
    }

    #[test]
    fn limits_cap_checkouts_and_waiters() {
        let mut b = Book::new(Limits {
            max_checkouts: 1,
            max_waiting: 1,
        });
        let mut g = Gen(0);
        b.define(
            "cad",
            policy(Enforcement::HardStop, Seat::Concurrent),
            0,
            &mut || g.next(),
        );
        b.grant(Uuid::from_u128(1), "cad", 5, 0, &mut || g.next())
            .unwrap();
        granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        assert_eq!(
            b.checkout("cad", who("b", "h"), 1, false, 0, g.next()),
            Err(Refusal::Full)
        );
    }

    #[test]
    fn restore_rebuilds_seats() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::PerUserHost, 3);
        let a1 = granted(b.checkout("cad", who("a", "h"), 2, false, 0, g.next()));
        let a2 = granted(b.checkout("cad", who("a", "h"), 2, false, 0, g.next()));
        let mut r = Book::new(Limits::default());
        r.restore_product(
            "cad",
            policy(Enforcement::HardStop, Seat::PerUserHost),
            3,
            1,
            UsageCounters::default(),
        );
        r.restore_checkout(&a1.record, 100);
        r.restore_checkout(&a2.record, 100);
        assert_eq!(r.figures("cad"), b.figures("cad"));
        r.checkin(a1.record.handle, 0, &mut || g.next()).unwrap();
        assert_eq!(r.figures("cad").unwrap().2, 2);
        r.checkin(a2.record.handle, 0, &mut || g.next()).unwrap();
        assert_eq!(r.figures("cad").unwrap().2, 0);
    }

    #[test]
    fn expired_lease_refuses_new_checkouts_but_not_heartbeats_or_checkins() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 3);
        assert!(b.set_lease(Some(10_000), 0, &mut || g.next()).is_empty());
        let held = granted(b.checkout("cad", who("a", "h"), 1, false, 9_999, g.next()));
        assert_eq!(
            b.checkout("cad", who("b", "h"), 1, false, 10_000, g.next()),
            Err(Refusal::LeaseExpired { since: 10_000 })
        );
        // Nobody joins a queue without a lease either.
        assert_eq!(
            b.checkout("cad", who("b", "h"), 1, true, 10_000, g.next()),
            Err(Refusal::LeaseExpired { since: 10_000 })
        );
        // Refused for the lease, not for lack of units: not a denial.
        assert_eq!(b.status(false)[0].since_last.denials, 0);
        assert!(b.heartbeat(held.record.handle, 10_001).is_ok());
        assert!(
            b.checkin(held.record.handle, 10_002, &mut || g.next())
                .is_ok()
        );
        assert_eq!(b.figures("cad"), Some((3, 1, 0)));
        // Standalone: no lease at all.
        b.set_lease(None, 20_000, &mut || g.next());
        assert!(b.leased(u64::MAX));
        granted(b.checkout("cad", who("b", "h"), 1, false, 20_000, g.next()));
    }

    #[test]
    fn a_renewed_lease_serves_the_queue_and_an_expired_one_does_not() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 1);
        b.set_lease(Some(1_000), 0, &mut || g.next());
        let held = granted(b.checkout("cad", who("a", "h"), 1, false, 0, g.next()));
        let Ok(Outcome::Queued(w)) = b.checkout("cad", who("b", "h"), 1, true, 0, g.next()) else {
            panic!("should queue")
        };
        assert_eq!(b.queued_units("cad"), 1);
        // The unit frees after the lease ended: the waiter is not served.
        let (_, served) = b
            .checkin(held.record.handle, 2_000, &mut || g.next())
            .unwrap();
        assert!(served.is_empty());
        let served = b.set_lease(Some(5_000), 2_001, &mut || g.next());
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].waiter, w);
        assert_eq!(b.queued_units("cad"), 0);
    }

    #[test]
    fn a_wait_that_ends_after_the_lease_is_a_lease_refusal_not_a_denial() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 0);
        b.set_lease(Some(1_000), 0, &mut || g.next());
        let Ok(Outcome::Queued(w)) = b.checkout("cad", who("a", "h"), 1, true, 0, g.next()) else {
            panic!("should queue")
        };
        let left = b
            .cancel_wait("cad", w, true, 1_000, &mut || g.next())
            .unwrap();
        assert!(left.lease_expired);
        assert!(left.served.is_empty());
        assert_eq!(b.status(false)[0].since_last.denials, 0);
    }

    #[test]
    fn adopting_the_books_allocation_may_go_below_in_use_and_moves_the_generation_on() {
        let (mut b, mut g) = book_with(Enforcement::HardStop, Seat::Concurrent, 4);
        for u in ["a", "b", "c"] {
            granted(b.checkout("cad", who(u, "h"), 1, false, 0, g.next()));
        }
        let (allocation, generation, served) = b
            .adopt_allocation("cad", 1, 0, 0, &mut || g.next())
            .unwrap();
        assert_eq!((allocation, generation), (1, 2));
        assert!(served.is_empty());
        assert_eq!(b.figures("cad"), Some((1, 2, 3)));
        assert_eq!(b.products()[0].free, 0);
        assert_eq!(
            b.checkout("cad", who("d", "h"), 1, false, 0, g.next()),
            Err(Refusal::Unavailable)
        );
        // The books' generation wins when it is ahead.
        let (_, generation, _) = b
            .adopt_allocation("cad", 5, 9, 0, &mut || g.next())
            .unwrap();
        assert_eq!(generation, 9);
        assert!(
            b.adopt_allocation("nope", 1, 1, 0, &mut || g.next())
                .is_none()
        );
    }

    #[test]
    fn instant_requests_are_counted_since_last_and_in_totals() {
        let (mut b, _) = book_with(Enforcement::HardStop, Seat::Concurrent, 0);
        b.count_instant_request("cad");
        b.count_instant_request("nope");
        let s = &b.status(true)[0];
        assert_eq!(
            (s.since_last.instant_requests, s.totals.instant_requests),
            (1, 1)
        );
        let s = &b.status(false)[0];
        assert_eq!(
            (s.since_last.instant_requests, s.totals.instant_requests),
            (0, 1)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Checkout {
            user: u8,
            host: u8,
            units: u32,
            wait: bool,
        },
        Checkin(usize),
        Heartbeat(usize),
        Cancel(usize),
        Release {
            id: u8,
            units: u32,
        },
        Grant {
            id: u8,
            units: u32,
        },
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0u8..3, 1u32..3, any::<bool>())
                .prop_map(|(user, host, units, wait)| Op::Checkout { user, host, units, wait }),
            3 => any::<usize>().prop_map(Op::Checkin),
            1 => any::<usize>().prop_map(Op::Heartbeat),
            1 => any::<usize>().prop_map(Op::Cancel),
            1 => (0u8..6, 0u32..4).prop_map(|(id, units)| Op::Release { id, units }),
            1 => (6u8..12, 0u32..4).prop_map(|(id, units)| Op::Grant { id, units }),
            1 => (0u64..20_000).prop_map(Op::Tick),
        ]
    }

    fn enforcement() -> impl Strategy<Value = Enforcement> {
        prop_oneof![
            Just(Enforcement::HardStop),
            Just(Enforcement::SoftStop),
            Just(Enforcement::NoStop)
        ]
    }

    fn seat() -> impl Strategy<Value = Seat> {
        prop_oneof![
            Just(Seat::Concurrent),
            Just(Seat::PerUserHost),
            Just(Seat::PerUser)
        ]
    }

    proptest! {
        /// Under any sequence of operations: hard stop never exceeds the allocation, in-use is
        /// the sum of distinct seats, releases take only free units, repeats change nothing,
        /// and waiters are served in arrival order.
        #[test]
        fn book_invariants_hold(
            enforcement in enforcement(),
            seat in seat(),
            initial in 0u32..4,
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            let (mut b, mut g) = book_with(enforcement, seat, initial);
            let mut handles: Vec<Handle> = Vec::new();
            let mut waiters: Vec<u64> = Vec::new();
            let mut served_order: Vec<u64> = Vec::new();
            let mut now: Millis = 0;
            let mut records: HashMap<Handle, CheckoutRecord> = HashMap::new();
            for op in ops {
                let mut served = Vec::new();
                match op {
                    Op::Checkout { user, host, units, wait } => {
                        let (u, h) = (format!("u{user}"), format!("h{host}"));
                        match b.checkout("cad", who(&u, &h), units, wait, now, g.next()) {
                            Ok(Outcome::Granted(gr)) => {
                                handles.push(gr.record.handle);
                                records.insert(gr.record.handle, gr.record);
                            }
                            Ok(Outcome::Queued(w)) => {
                                prop_assert_eq!(enforcement, Enforcement::HardStop);
                                waiters.push(w);
                            }
                            Err(r) => prop_assert_eq!(r, Refusal::Unavailable),
                        }
                    }
                    Op::Checkin(i) if !handles.is_empty() => {
                        let h = handles.swap_remove(i % handles.len());
                        if let Ok((_, s)) = b.checkin(h, now, &mut || g.next()) {
                            served = s;
                        }
                    }
                    Op::Heartbeat(i) if !handles.is_empty() => {
                        let h = handles[i % handles.len()];
                        let _ = b.heartbeat(h, now);
                    }
                    Op::Cancel(i) if !waiters.is_empty() => {
                        let w = waiters.remove(i % waiters.len());
                        if let Some(left) = b.cancel_wait("cad", w, true, now, &mut || g.next()) {
                            served = left.served;
                        }
                    }
                    Op::Release { id, units } => {
                        let before = b.figures("cad").unwrap();
                        let first = b.release(Uuid::from_u128(u128::from(id) + 100), "cad", units).unwrap();
                        if first.applied.is_some() {
                            prop_assert!(first.response.units <= units);
                            prop_assert!(first.response.units <= before.0.saturating_sub(before.2));
                            prop_assert_eq!(first.response.generation, before.1 + 1);
                        } else {
                            prop_assert_eq!(b.figures("cad").unwrap(), before);
                        }
                    }
                    Op::Grant { id, units } => {
                        let out = b.grant(Uuid::from_u128(u128::from(id) + 100), "cad", units, now, &mut || g.next()).unwrap();
                        served = out.served;
                    }
                    Op::Tick(ms) => {
                        now += ms;
                        let (staled, s) = b.expire(now, &mut || g.next());
                        for (h, _) in staled {
                            prop_assert!(!b.is_live(h));
                        }
                        served = s;
                    }
                    _ => {}
                }
                for s in served {
                    served_order.push(s.waiter);
                    waiters.retain(|w| *w != s.waiter);
                    handles.push(s.grant.record.handle);
                    records.insert(s.grant.record.handle, s.grant.record);
                }
                handles.retain(|h| b.is_live(*h));
                let (allocation, _, in_use) = b.figures("cad").unwrap();
                if enforcement == Enforcement::HardStop {
                    prop_assert!(in_use <= allocation, "in use {} > allocation {}", in_use, allocation);
                }
                // in-use is the sum over distinct seats of the live checkouts
                let mut seats: HashMap<Option<String>, u32> = HashMap::new();
                let mut sum = 0u32;
                for h in &handles {
                    let r = &records[h];
                    match &r.seat {
                        None => sum += r.units,
                        Some(k) => { seats.entry(Some(k.clone())).or_insert(r.units); }
                    }
                }
                sum += seats.values().sum::<u32>();
                prop_assert_eq!(in_use, sum);
                prop_assert_eq!(b.waiting(), waiters.len());
                let queued: u64 = b.products["cad"].queue.iter().map(|w| u64::from(w.units)).sum();
                prop_assert_eq!(b.queued_units("cad"), queued);
                // Nobody is left waiting for what the book could grant now (whatever left the
                // queue or freed units served the waiters it let through).
                let p = &b.products["cad"];
                if let Some(head) = p.queue.front() {
                    let key = seat_key(p.policy.seat, &head.user, &head.host);
                    let held = key.as_deref().is_some_and(|k| p.seats.contains_key(k));
                    prop_assert_eq!(
                        decide(p.policy.enforcement, p.allocation, p.in_use, head.units, held, false),
                        Decision::Deny,
                        "a waiter that fits is left waiting"
                    );
                }
            }
            let mut sorted = served_order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(served_order, sorted, "waiters served out of order");
        }
    }
}
