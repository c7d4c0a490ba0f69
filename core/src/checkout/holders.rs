//! Who holds what, and force release: the book's operator view of its live checkouts and
//! waiting clients, the public ids that name them, and revocation.
//!
//! A checkout's handle is the client's secret: whoever knows it may heartbeat and check in. An
//! operator's listing must name a checkout without giving that power away, so it carries a
//! [`CheckoutId`], a one-way hash of the handle (handles are 128 random bits, so the hash
//! cannot be searched back into one). A revoked handle is remembered for
//! [`REVOCATION_KEPT_MS`], so the holder's next heartbeat or checkin learns it was revoked
//! (`license_revoked`) rather than that it was forgotten (`bad_handle`).
//!
//! The balancer pages over every server's holders with a [`Cursor`]: the server and the id of
//! the last holder shown.

use super::rules::{Handle, Millis};
use super::{Book, Served};
use crate::wire::agent::{Holder, HolderState};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Most holders one page may hold (`limit`), on the balancer and on a metering server.
pub const MAX_HOLDERS_PAGE: u32 = 1000;

/// Longest revoke reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// How long a revoked handle is remembered (7 days, the longest staleout a policy may have):
/// past it the holder would have staled out anyway and hears `bad_handle`.
pub const REVOCATION_KEPT_MS: Millis = 7 * 24 * 3600 * 1000;

/// The public name of a checkout: the first 128 bits of SHA-256 over a fixed label and the
/// handle. It names the checkout in listings and revokes but cannot heartbeat or check in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckoutId(pub u128);

impl CheckoutId {
    /// The id of the checkout named by `handle`.
    pub fn of(handle: Handle) -> Self {
        let mut h = Sha256::new();
        h.update(b"allot checkout id v1\0");
        h.update(handle.0.to_be_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(u128::from_be_bytes(first))
    }
}

impl fmt::Display for CheckoutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "co_{:032x}", self.0)
    }
}

impl FromStr for CheckoutId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let hex = s.strip_prefix("co_").ok_or(())?;
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(());
        }
        u128::from_str_radix(hex, 16).map(Self).map_err(|_| ())
    }
}

/// The public id of a waiting client: `wt_` and its waiter number, zero-padded so ids sort as
/// numbers. Waiters never outlive the process, so the number is enough.
pub fn waiter_id(waiter: u64) -> String {
    format!("wt_{waiter:020}")
}

/// The public id of a lingering seat: `lg_` and its number, zero-padded like a waiter's.
pub fn lingering_id(id: u64) -> String {
    format!("lg_{id:020}")
}

/// Whether `s` is a holder id as [`CheckoutId`], [`waiter_id`] or [`lingering_id`] write them.
pub fn is_holder_id(s: &str) -> bool {
    s.parse::<CheckoutId>().is_ok()
        || s.strip_prefix("wt_")
            .or_else(|| s.strip_prefix("lg_"))
            .is_some_and(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a revoke reason: 1–500 characters, not blank, no control characters.
pub fn validate_reason(reason: &str) -> Result<(), String> {
    let chars = reason.chars().count();
    if reason.trim().is_empty() {
        return Err("reason: must not be empty".to_owned());
    }
    if chars > MAX_REASON_CHARS {
        return Err(format!(
            "reason: must be at most {MAX_REASON_CHARS} characters, got {chars}"
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err("reason: must not contain control characters".to_owned());
    }
    Ok(())
}

/// Where the next page of the estate's holders starts: after holder `after` of `server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The server of the last holder shown.
    pub server: String,
    /// The id of the last holder shown.
    pub after: String,
}

impl Cursor {
    /// The opaque text form: the server's name in hex, a dot, the id.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(self.server.len() * 2 + 1 + self.after.len());
        for b in self.server.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('.');
        out.push_str(&self.after);
        out
    }

    /// Reads a cursor written by [`Cursor::encode`]; anything else is refused.
    pub fn decode(text: &str) -> Result<Self, String> {
        let bad = || "cursor: not a cursor this API gave (use `next_cursor` as is)".to_owned();
        if text.len() > 2 * crate::validate::MAX_NAME_CHARS * 4 + 64 {
            return Err(bad());
        }
        let (hex, after) = text.split_once('.').ok_or_else(bad)?;
        if hex.len() % 2 != 0 || !is_holder_id(after) {
            return Err(bad());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
            .collect::<Result<Vec<u8>, String>>()?;
        let server = String::from_utf8(bytes).map_err(|_| bad())?;
        crate::validate::path_name("server", &server).map_err(|_| bad())?;
        Ok(Self {
            server,
            after: after.to_owned(),
        })
    }
}

/// Which holders a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderFilter {
    /// Only this product.
    pub product: Option<String>,
    /// Only this user.
    pub user: Option<String>,
}

impl HolderFilter {
    fn matches(&self, product: &str, user: &str) -> bool {
        self.product.as_deref().is_none_or(|p| p == product)
            && self.user.as_deref().is_none_or(|u| u == user)
    }
}

/// A revocation as remembered and persisted: the holder's next heartbeat or checkin is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The revoked checkout's handle.
    pub handle: Handle,
    /// Its product.
    pub product: String,
    /// When it was revoked.
    pub at: Millis,
    /// Why, as the operator said.
    pub reason: String,
}

/// What a revoke did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The checkout as it was, for the answer and the audit.
    pub holder: Holder,
    /// What to persist (the checkout's row goes with it).
    pub revocation: Revocation,
    /// The waiters its freed units were handed to.
    pub served: Vec<Served>,
}

/// Why a revoke changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeRefusal {
    /// No live checkout has this id here (or it is a waiter's id).
    Unknown,
    /// It was already revoked; the first revocation stands.
    AlreadyRevoked(Revocation),
    /// It is borrowed: the unit is away with its holder, offline, until returned or expired.
    Borrowed,
}

/// Unix milliseconds as a UTC time, for the wire.
pub(super) fn utc(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or_default()
}

impl Book {
    /// One page of this server's holders (`server` is its name), ordered by id: the live
    /// checkouts and waiting clients matching `filter` whose id sorts after `after`, at most
    /// `limit`. Returns the page and whether more follow.
    pub fn holders(
        &self,
        server: &str,
        filter: &HolderFilter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Holder>, bool) {
        let after = after.unwrap_or("");
        let mut ids: Vec<(String, Entry<'_>)> = Vec::new();
        for (handle, live) in &self.checkouts {
            if !filter.matches(&live.product, &live.user) {
                continue;
            }
            let id = live.id.to_string();
            if *id > *after {
                ids.push((id, Entry::Held(*handle)));
            }
        }
        for p in self.products.values() {
            if filter.product.as_deref().is_some_and(|f| f != &*p.name) {
                continue;
            }
            for w in &p.queue {
                if !filter.matches(&p.name, &w.user) {
                    continue;
                }
                let id = waiter_id(w.id);
                if *id > *after {
                    ids.push((id, Entry::Waiting(&p.name, w)));
                }
            }
            for l in p.lingering.values().flatten() {
                if !filter.matches(&p.name, &l.owner.user) {
                    continue;
                }
                let id = lingering_id(l.id);
                if *id > *after {
                    ids.push((id, Entry::Lingering(&p.name, l)));
                }
            }
        }
        let more = ids.len() > limit;
        if more {
            ids.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            ids.truncate(limit);
        }
        ids.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let items = ids
            .into_iter()
            .filter_map(|(id, entry)| match entry {
                Entry::Held(handle) => self.holder(server, handle),
                Entry::Waiting(product, w) => Some(Holder {
                    id,
                    server: server.to_owned(),
                    product: product.to_owned(),
                    user: w.user.clone(),
                    host: w.host.clone(),
                    groups: w.groups.to_vec(),
                    units: w.units,
                    state: HolderState::Waiting,
                    overdraft: false,
                    granted_at: None,
                    last_heartbeat: None,
                    waiting_since: Some(utc(w.since)),
                    until: None,
                }),
                Entry::Lingering(product, l) => Some(Holder {
                    id,
                    server: server.to_owned(),
                    product: product.to_owned(),
                    user: l.owner.user.to_string(),
                    host: l.owner.host.to_string(),
                    groups: l.owner.groups.to_vec(),
                    units: l.units,
                    state: HolderState::Lingering,
                    overdraft: false,
                    granted_at: None,
                    last_heartbeat: None,
                    waiting_since: None,
                    until: Some(utc(l.until)),
                }),
            })
            .collect();
        (items, more)
    }

    /// The holder view of one live checkout.
    fn holder(&self, server: &str, handle: Handle) -> Option<Holder> {
        let live = self.checkouts.get(&handle)?;
        Some(Holder {
            id: live.id.to_string(),
            server: server.to_owned(),
            product: live.product.to_string(),
            user: live.user.to_string(),
            host: live.host.to_string(),
            groups: live.groups.to_vec(),
            units: live.units,
            state: match live.borrowed_until {
                Some(_) => HolderState::Borrowed,
                None => HolderState::Held,
            },
            overdraft: live.overdraft,
            granted_at: Some(utc(live.created_at)),
            last_heartbeat: live.heartbeat_at.map(utc),
            waiting_since: None,
            until: live.borrowed_until.map(utc),
        })
    }

    /// Force-releases the checkout named `id`: it ends at once exactly as a checkin would (its
    /// units free, the first waiting clients are served), and its handle is remembered as
    /// revoked so the holder's next heartbeat or checkin is told so. A checkout sharing a seat
    /// with other handles of the same user ends alone; the seat stays theirs.
    pub fn revoke(
        &mut self,
        server: &str,
        id: CheckoutId,
        reason: &str,
        now: Millis,
        handles: &mut impl FnMut() -> Handle,
    ) -> Result<RevokeOutcome, RevokeRefusal> {
        let Some(&handle) = self.ids.get(&id) else {
            let earlier = self
                .revoked
                .values()
                .find(|r| CheckoutId::of(r.handle) == id);
            return Err(match earlier {
                Some(r) => RevokeRefusal::AlreadyRevoked(r.clone()),
                None => RevokeRefusal::Unknown,
            });
        };
        let holder = self.holder(server, handle).ok_or(RevokeRefusal::Unknown)?;
        if self
            .checkouts
            .get(&handle)
            .is_some_and(|l| l.borrowed_until.is_some())
        {
            return Err(RevokeRefusal::Borrowed);
        }
        let (product, served) = self
            .end(handle, false, now, handles)
            .map_err(|_| RevokeRefusal::Unknown)?;
        let revocation = Revocation {
            handle,
            product: product.to_string(),
            at: now,
            reason: reason.to_owned(),
        };
        self.restore_revocation(revocation.clone());
        Ok(RevokeOutcome {
            holder,
            revocation,
            served,
        })
    }

    /// Remembers a revocation (at start, from the store, and when one is made).
    pub fn restore_revocation(&mut self, revocation: Revocation) {
        self.revoked_order
            .push_back((revocation.at, revocation.handle));
        self.revoked.insert(revocation.handle, revocation);
    }

    /// The revocation of a handle, if it was revoked.
    pub fn revocation(&self, handle: Handle) -> Option<&Revocation> {
        self.revoked.get(&handle)
    }

    /// Forgets revocations older than [`REVOCATION_KEPT_MS`] at `now`.
    pub(super) fn forget_old_revocations(&mut self, now: Millis) {
        while let Some(&(at, handle)) = self.revoked_order.front() {
            if at.saturating_add(REVOCATION_KEPT_MS) > now {
                break;
            }
            self.revoked_order.pop_front();
            if self.revoked.get(&handle).is_some_and(|r| r.at == at) {
                self.revoked.remove(&handle);
            }
        }
    }
}

/// A holder found while listing, before its view is built.
enum Entry<'a> {
    Held(Handle),
    Waiting(&'a str, &'a super::Waiter),
    Lingering(&'a str, &'a super::options::Lingering),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkout::{BadHandle, Limits, Outcome, Who};
    use crate::domain::{Acl, Enforcement, Policy, Seat};
    use uuid::Uuid;

    fn book(allocation: u32) -> (Book, impl FnMut() -> Handle) {
        let mut b = Book::new(Limits::default());
        let mut n = 1000u128;
        let mut next = move || {
            n += 1;
            Handle(n)
        };
        let policy = Policy {
            enforcement: Enforcement::HardStop,
            seat: Seat::Concurrent,
            heartbeat_seconds: 10,
            staleout_seconds: 30,
            acl: Acl::default(),
            options: Default::default(),
        };
        b.define("cad", policy.clone(), 0, &mut next);
        b.define("sim", policy, 0, &mut next);
        b.grant(Uuid::from_u128(1), "cad", allocation, 0, &mut next)
            .unwrap();
        b.grant(Uuid::from_u128(2), "sim", allocation, 0, &mut next)
            .unwrap();
        (b, next)
    }

    fn take(b: &mut Book, product: &str, user: &str, wait: bool, h: Handle) -> Outcome {
        let groups = ["eng".to_owned()];
        let who = Who {
            user,
            host: "h1",
            groups: &groups,
        };
        b.checkout(product, who, 1, wait, 5, h).unwrap()
    }

    #[test]
    fn a_checkout_id_names_the_checkout_without_being_its_handle() {
        let h = Handle(0x1234);
        let id = CheckoutId::of(h);
        assert_eq!(id, CheckoutId::of(h), "stable");
        assert_ne!(id, CheckoutId::of(Handle(0x1235)));
        assert_ne!(id.0, h.0);
        let text = id.to_string();
        assert!(text.starts_with("co_") && text.len() == 35);
        assert!(!text.contains(&h.to_string()));
        assert_eq!(text.parse::<CheckoutId>(), Ok(id));
        assert!(h.to_string().parse::<CheckoutId>().is_err());
        assert!("co_XYZ".parse::<CheckoutId>().is_err());
        assert!(is_holder_id(&waiter_id(7)) && is_holder_id(&text) && !is_holder_id("wt_7"));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            server: "site a".into(),
            after: CheckoutId::of(Handle(9)).to_string(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Ok(c));
        for bad in [
            "",
            ".",
            "zz.co_1",
            "61.co_1",
            "6.wt_00000000000000000001",
            "612f62.wt_00000000000000000001",
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reasons_are_bounded_and_required() {
        assert!(validate_reason("licence audit").is_ok());
        assert!(validate_reason(" ").is_err());
        assert!(validate_reason(&"x".repeat(500)).is_ok());
        assert!(validate_reason(&"x".repeat(501)).is_err());
        assert!(validate_reason("a\nb").is_err());
    }

    #[test]
    fn holders_list_checkouts_and_waiters_filtered_and_paged() {
        let (mut b, mut next) = book(1);
        let a = take(&mut b, "cad", "ann", false, next());
        take(&mut b, "sim", "bob", false, next());
        let queued = take(&mut b, "cad", "bob", true, next());
        assert!(matches!(a, Outcome::Granted(_)) && matches!(queued, Outcome::Queued(_)));
        let all = HolderFilter::default();
        let (items, more) = b.holders("s1", &all, None, 10);
        assert_eq!(items.len(), 3);
        assert!(!more);
        assert!(items.windows(2).all(|w| w[0].id < w[1].id), "ordered by id");
        let waiting: Vec<_> = items
            .iter()
            .filter(|h| h.state == HolderState::Waiting)
            .collect();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].user, "bob");
        assert!(waiting[0].waiting_since.is_some() && waiting[0].granted_at.is_none());
        for h in &items {
            assert_eq!(h.server, "s1");
            assert_eq!(h.groups, vec!["eng".to_owned()]);
            assert!(!h.id.contains(&format!("{:032x}", 1001u128)));
        }
        let cad = HolderFilter {
            product: Some("cad".into()),
            user: None,
        };
        assert_eq!(b.holders("s1", &cad, None, 10).0.len(), 2);
        let bob_cad = HolderFilter {
            product: Some("cad".into()),
            user: Some("bob".into()),
        };
        assert_eq!(b.holders("s1", &bob_cad, None, 10).0.len(), 1);
        let (first, more) = b.holders("s1", &all, None, 2);
        assert!(more);
        let (rest, more) = b.holders("s1", &all, Some(&first[1].id), 2);
        assert!(!more);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0], items[2]);
    }

    #[test]
    fn a_revoke_frees_the_unit_for_the_first_waiter_and_the_holder_hears_it() {
        let (mut b, mut next) = book(1);
        let held = next();
        take(&mut b, "cad", "ann", false, held);
        let Outcome::Queued(waiter) = take(&mut b, "cad", "bob", true, next()) else {
            panic!("bob waits");
        };
        b.heartbeat(held, None, 7).unwrap();
        let id = CheckoutId::of(held);
        let listed = b.holders("s1", &HolderFilter::default(), None, 10).0;
        let ann = listed.iter().find(|h| h.user == "ann").unwrap();
        assert_eq!(ann.id, id.to_string());
        assert!(ann.last_heartbeat.is_some());

        let out = b.revoke("s1", id, "audit", 10, &mut next).expect("revoked");
        assert_eq!(out.holder.user, "ann");
        assert_eq!(out.revocation.reason, "audit");
        assert_eq!(out.served.len(), 1);
        assert_eq!(out.served[0].waiter, waiter);
        assert_eq!(out.served[0].grant.record.user, "bob");
        assert_eq!(b.figures("cad").unwrap().2, 1, "the unit passed on");
        let told = BadHandle::Revoked {
            at: 10,
            reason: "audit".into(),
        };
        assert_eq!(b.heartbeat(held, None, 11), Err(told.clone()));
        assert_eq!(b.checkin(held, 11, &mut next).map(|_| ()), Err(told));
        assert!(matches!(
            b.revoke("s1", id, "again", 12, &mut next),
            Err(RevokeRefusal::AlreadyRevoked(r)) if r.at == 10
        ));
        assert_eq!(
            b.revoke("s1", CheckoutId::of(Handle(1)), "x", 12, &mut next),
            Err(RevokeRefusal::Unknown)
        );
        // Long after, the revocation is forgotten: the handle is just unknown.
        b.expire(10 + REVOCATION_KEPT_MS, &mut next);
        assert_eq!(
            b.heartbeat(held, None, 10 + REVOCATION_KEPT_MS),
            Err(BadHandle::Unknown)
        );
    }

    #[test]
    fn a_restored_revocation_still_answers_revoked() {
        let (mut b, _) = book(1);
        b.restore_revocation(Revocation {
            handle: Handle(77),
            product: "cad".into(),
            at: 3,
            reason: "moved to another team".into(),
        });
        assert!(matches!(
            b.heartbeat(Handle(77), None, 4),
            Err(BadHandle::Revoked { at: 3, .. })
        ));
        assert!(b.revocation(Handle(77)).is_some());
    }
}
