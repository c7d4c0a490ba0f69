use super::*;
use crate::domain::{Acl, Enforcement, Seat};
use proptest::prelude::*;

fn policy(enforcement: Enforcement, seat: Seat) -> Policy {
    Policy {
        enforcement,
        seat,
        heartbeat_seconds: 10,
        staleout_seconds: 30,
        acl: Acl::default(),
        options: Default::default(),
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
    b.heartbeat(c.record.handle, None, 20_000).unwrap();
    assert_eq!(b.next_deadline(), Some(50_000));
    assert!(b.expire(49_999, &mut || g.next()).0.is_empty());
    let staled = b.expire(50_000, &mut || g.next()).0;
    assert_eq!(staled[0].handle, c.record.handle);
    assert_eq!(
        (staled[0].units, staled[0].started_at),
        (1, c.record.created_at)
    );
    assert_eq!(
        b.heartbeat(c.record.handle, None, 50_001),
        Err(BadHandle::Unknown)
    );
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
    let Ok(Outcome::Queued(head)) = b.checkout("cad", who("b", "h"), 2, true, 0, g.next()) else {
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
    assert!(b.heartbeat(held.record.handle, None, 10_001).is_ok());
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
    Revoke(usize),
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
        1 => any::<usize>().prop_map(Op::Revoke),
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
                Op::Revoke(i) if !handles.is_empty() => {
                    // A revoke ends the checkout as a checkin does, and its holder is told.
                    let h = handles.swap_remove(i % handles.len());
                    let out = b.revoke("s", CheckoutId::of(h), "why", now, &mut || g.next());
                    prop_assert!(out.is_ok());
                    served = out.map(|o| o.served).unwrap_or_default();
                    let revoked = matches!(b.heartbeat(h, None, now), Err(BadHandle::Revoked { .. }));
                    prop_assert!(revoked);
                }
                Op::Heartbeat(i) if !handles.is_empty() => {
                    let h = handles[i % handles.len()];
                    let _ = b.heartbeat(h, None, now);
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
                    for ended in staled {
                        prop_assert!(!b.is_live(ended.handle));
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
