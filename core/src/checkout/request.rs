//! The request path of the [`Book`]: a checkout or a borrow decided (ACL, lease, a lingering
//! seat to reuse, limits, reservations), the units taken under a new handle, the wait queue
//! served in its order and left, and lingering seats ended or yielded to a waiting request.

use super::options::{self, Lingering, Tally};
use super::*;

impl Book {
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
    pub(super) fn request(
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
    pub(super) fn yield_lingering(
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
    pub(super) fn unlinger(&mut self, id: u64) -> Option<Lingering> {
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
    pub(super) fn end_lingering(&mut self, id: u64) -> Option<Arc<str>> {
        let product = self.lingers.get(&id)?.0.clone();
        let l = self.unlinger(id)?;
        let p = self.products.get_mut(&product)?;
        p.in_use = p.in_use.saturating_sub(l.units);
        p.count_owner(&l.owner, l.units, -1);
        Some(product)
    }

    /// Applies a non-deny decision under a new handle: new units, a seat joined, a lingering
    /// seat reused or a borrow.
    pub(super) fn take(
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
    pub(super) fn serve(
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
}

/// How a granted checkout comes by its units.
pub(super) enum Take {
    /// It shares a seat its user already holds.
    Join,
    /// It reuses its user's lingering seat.
    Reuse(Lingering),
    /// It takes new units (beyond the allocation under soft stop: `overdraft`).
    New { units: u32, overdraft: bool },
    /// It borrows units until then.
    Borrow { units: u32, until: Millis },
}
