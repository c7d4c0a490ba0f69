//! The options-file rules in the book: unit tests for each rule and a property test that
//! runs random operations under random options and checks the invariants of DESIGN.md with
//! them (a linger, a borrow or a reservation never lets a hard-stop server exceed its
//! allocation; a release never takes a lingering, borrowed or reserved unit; no limit is
//! exceeded; no one outside a reservation takes its free units).

use super::*;
use crate::domain::{Acl, Enforcement, GroupPriority, Limit, Options, Reservation, Scope, Seat};
use proptest::prelude::*;

fn policy(enforcement: Enforcement, seat: Seat, options: Options) -> Policy {
    Policy {
        enforcement,
        seat,
        heartbeat_seconds: 10,
        staleout_seconds: 30,
        acl: Acl::default(),
        options,
    }
}

struct Gen(u128);
impl Gen {
    fn next(&mut self) -> Handle {
        self.0 += 1;
        Handle(self.0)
    }
}

fn book(options: Options, enforcement: Enforcement, seat: Seat, units: u32) -> (Book, Gen) {
    let mut b = Book::new(Limits::default());
    let mut g = Gen(1);
    b.define("cad", policy(enforcement, seat, options), 0, &mut || {
        g.next()
    });
    if units > 0 {
        b.grant(Uuid::from_u128(1), "cad", units, 0, &mut || g.next())
            .unwrap();
    }
    (b, g)
}

fn who<'a>(user: &'a str, groups: &'a [String]) -> Who<'a> {
    Who {
        user,
        host: "h",
        groups,
    }
}

fn grant(o: Result<Outcome, Refusal>) -> Grant {
    match o {
        Ok(Outcome::Granted(g)) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn a_limit_caps_a_group_and_names_itself() {
    let eng = ["eng".to_owned()];
    let options = Options {
        limits: vec![Limit {
            scope: Scope::Group,
            name: "eng".into(),
            max: 2,
        }],
        ..Options::default()
    };
    let (mut b, mut g) = book(options, Enforcement::HardStop, Seat::Concurrent, 5);
    let first = grant(b.checkout("cad", who("a", &eng), 1, false, 0, g.next()));
    grant(b.checkout("cad", who("b", &eng), 1, false, 0, g.next()));
    let refused = b.checkout("cad", who("c", &eng), 1, true, 0, g.next());
    assert_eq!(
        refused,
        Err(Refusal::Limit {
            scope: Scope::Group,
            name: "eng".into(),
            max: 2
        })
    );
    // Others are not capped, and a checkin makes room in the group.
    grant(b.checkout("cad", who("d", &[]), 1, false, 0, g.next()));
    b.checkin(first.record.handle, 1, &mut || g.next()).unwrap();
    grant(b.checkout("cad", who("c", &eng), 1, false, 1, g.next()));
}

#[test]
fn a_waiter_a_limit_holds_back_keeps_its_place_but_blocks_no_one() {
    let (mut b, mut g) = book(
        Options::default(),
        Enforcement::HardStop,
        Seat::Concurrent,
        1,
    );
    let x = grant(b.checkout("cad", who("x", &[]), 1, false, 0, g.next()));
    let queued = b.checkout("cad", who("a", &[]), 1, true, 0, g.next());
    assert!(matches!(queued, Ok(Outcome::Queued(_))));
    // The policy now caps a at 0: a stays queued but is passed over.
    let capped = Options {
        limits: vec![Limit {
            scope: Scope::User,
            name: "a".into(),
            max: 0,
        }],
        ..Options::default()
    };
    b.define(
        "cad",
        policy(Enforcement::HardStop, Seat::Concurrent, capped),
        1,
        &mut || g.next(),
    );
    let (_, served) = b.checkin(x.record.handle, 2, &mut || g.next()).unwrap();
    assert!(served.is_empty());
    assert_eq!(b.waiting(), 1);
    grant(b.checkout("cad", who("b", &[]), 1, false, 3, g.next()));
}

#[test]
fn reserved_units_are_kept_for_their_holder_and_not_released() {
    let options = Options {
        reservations: vec![Reservation {
            scope: Scope::User,
            name: "ann".into(),
            units: 2,
        }],
        ..Options::default()
    };
    let (mut b, mut g) = book(options, Enforcement::HardStop, Seat::Concurrent, 3);
    assert_eq!(b.status(false)[0].reserved, 2);
    grant(b.checkout("cad", who("bob", &[]), 1, false, 0, g.next()));
    assert_eq!(
        b.checkout("cad", who("bob", &[]), 1, false, 0, g.next()),
        Err(Refusal::Unavailable),
        "the other two units are ann's"
    );
    // A release takes no reserved unit.
    let out = b.release(Uuid::from_u128(9), "cad", 3).unwrap();
    assert_eq!(out.response.units, 0);
    // Ann takes hers even with someone queued (the queue is for the units she cannot use).
    let queued = b.checkout("cad", who("bob", &[]), 1, true, 0, g.next());
    assert!(matches!(queued, Ok(Outcome::Queued(_))));
    grant(b.checkout("cad", who("ann", &[]), 2, false, 0, g.next()));
    assert_eq!(b.status(false)[0].reserved, 0);
}

#[test]
fn a_lingering_seat_is_reused_by_its_user_and_freed_at_its_time() {
    let options = Options {
        linger_seconds: 60,
        ..Options::default()
    };
    let (mut b, mut g) = book(options, Enforcement::HardStop, Seat::Concurrent, 1);
    let first = grant(b.checkout("cad", who("ann", &[]), 1, false, 0, g.next()));
    b.checkin(first.record.handle, 1_000, &mut || g.next())
        .unwrap();
    assert_eq!(
        b.figures("cad").unwrap().2,
        1,
        "a lingering unit stays in use"
    );
    assert_eq!(
        b.release(Uuid::from_u128(7), "cad", 1)
            .unwrap()
            .response
            .units,
        0,
        "a release never takes a lingering unit"
    );
    let (page, _) = b.holders("s", &HolderFilter::default(), None, 10);
    assert_eq!(page[0].state, crate::wire::agent::HolderState::Lingering);
    assert_eq!(
        b.checkout("cad", who("bob", &[]), 1, false, 2_000, g.next()),
        Err(Refusal::Unavailable)
    );
    let again = grant(b.checkout("cad", who("ann", &[]), 1, false, 3_000, g.next()));
    assert!(again.joined, "the relaunch reuses the seat: no new unit");
    assert_eq!(b.figures("cad").unwrap().2, 1);
    b.checkin(again.record.handle, 4_000, &mut || g.next())
        .unwrap();
    assert_eq!(b.next_deadline(), Some(64_000));
    b.expire(64_000, &mut || g.next());
    assert_eq!(b.figures("cad").unwrap().2, 0, "the linger ended");
}

#[test]
fn a_lingering_unit_yields_to_a_waiter_only_when_the_policy_says_so() {
    for yields in [false, true] {
        let options = Options {
            linger_seconds: 60,
            linger_yields: yields,
            ..Options::default()
        };
        let (mut b, mut g) = book(options, Enforcement::HardStop, Seat::Concurrent, 1);
        let first = grant(b.checkout("cad", who("ann", &[]), 1, false, 0, g.next()));
        b.checkin(first.record.handle, 0, &mut || g.next()).unwrap();
        let bob = b.checkout("cad", who("bob", &[]), 1, false, 0, g.next());
        assert_eq!(bob.is_ok(), yields);
        assert_eq!(b.figures("cad").unwrap().2, 1);
    }
}

#[test]
fn a_borrow_needs_no_heartbeat_is_never_revoked_and_ends_at_its_time() {
    let (mut b, mut g) = book(Options::default(), Enforcement::HardStop, Seat::PerUser, 2);
    let hour = 3_600_000;
    assert_eq!(
        b.borrow("cad", who("ann", &[]), 1, hour, 0, g.next()),
        Err(Refusal::BorrowNotAllowed)
    );
    let options = Options {
        max_borrow_hours: 24,
        ..Options::default()
    };
    b.define(
        "cad",
        policy(Enforcement::HardStop, Seat::PerUser, options),
        0,
        &mut || g.next(),
    );
    assert_eq!(
        b.borrow("cad", who("ann", &[]), 1, 25 * hour, 0, g.next()),
        Err(Refusal::BorrowTooLong { max_hours: 24 })
    );
    let borrowed = b
        .borrow("cad", who("ann", &[]), 1, 2 * hour, 0, g.next())
        .unwrap();
    let h = borrowed.record.handle;
    // Far past any staleout, with no heartbeat, it is still held.
    b.expire(hour, &mut || g.next());
    assert!(b.is_borrowed(h));
    assert_eq!(
        b.revoke("s", CheckoutId::of(h), "why", hour, &mut || g.next())
            .unwrap_err(),
        RevokeRefusal::Borrowed
    );
    assert_eq!(
        b.release(Uuid::from_u128(8), "cad", 2)
            .unwrap()
            .response
            .units,
        1,
        "a release takes the free unit only"
    );
    let (staled, _) = b.expire(2 * hour, &mut || g.next());
    assert_eq!(staled.len(), 1);
    assert_eq!(b.figures("cad").unwrap().2, 0);
}

#[test]
fn heartbeats_carry_the_idle_verdict() {
    let options = Options {
        idle_notify_seconds: 60,
        idle_revoke_seconds: 120,
        ..Options::default()
    };
    let (mut b, mut g) = book(options, Enforcement::HardStop, Seat::Concurrent, 1);
    let h = grant(b.checkout("cad", who("ann", &[]), 1, false, 0, g.next()))
        .record
        .handle;
    assert_eq!(b.heartbeat(h, None, 1).unwrap().1, IdleVerdict::Active);
    assert_eq!(
        b.heartbeat(h, Some(90), 2).unwrap().1,
        IdleVerdict::Notify {
            revoke_in: Some(30)
        }
    );
    assert_eq!(
        b.heartbeat(h, Some(120), 3).unwrap().1,
        IdleVerdict::Revoke { idle_seconds: 120 }
    );
}

#[test]
fn a_higher_priority_group_is_served_first_then_first_come_first_served() {
    let options = Options {
        priorities: vec![GroupPriority {
            group: "design".into(),
            priority: 10,
        }],
        ..Options::default()
    };
    let (mut b, mut g) = book(options, Enforcement::HardStop, Seat::Concurrent, 1);
    let held = grant(b.checkout("cad", who("x", &[]), 1, false, 0, g.next()));
    let design = ["design".to_owned()];
    let queue = |b: &mut Book, g: &mut Gen, user: &str, groups: &[String]| match b.checkout(
        "cad",
        who(user, groups),
        1,
        true,
        0,
        g.next(),
    ) {
        Ok(Outcome::Queued(w)) => w,
        other => panic!("expected to queue, got {other:?}"),
    };
    let plain = queue(&mut b, &mut g, "a", &[]);
    let urgent = queue(&mut b, &mut g, "b", &design);
    let (_, served) = b.checkin(held.record.handle, 1, &mut || g.next()).unwrap();
    assert_eq!(served[0].waiter, urgent);
    let (_, served) = b
        .checkin(served[0].grant.record.handle, 2, &mut || g.next())
        .unwrap();
    assert_eq!(served[0].waiter, plain);
}

#[derive(Debug, Clone)]
enum Op {
    Checkout { user: u8, group: u8, units: u32 },
    Borrow { user: u8 },
    Checkin(usize),
    Release { id: u8, units: u32 },
    Grant { id: u8, units: u32 },
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..4, 0u8..3, 1u32..3).prop_map(|(user, group, units)| Op::Checkout { user, group, units }),
        1 => (0u8..4).prop_map(|user| Op::Borrow { user }),
        4 => any::<usize>().prop_map(Op::Checkin),
        1 => (0u8..6, 0u32..4).prop_map(|(id, units)| Op::Release { id, units }),
        1 => (6u8..12, 0u32..3).prop_map(|(id, units)| Op::Grant { id, units }),
        2 => (0u64..40_000).prop_map(Op::Tick),
    ]
}

fn scope() -> impl Strategy<Value = Scope> {
    prop_oneof![Just(Scope::User), Just(Scope::Group)]
}

/// Rules over users `u0`–`u3` and groups `g0`–`g2`, at most one per scope and name.
fn options() -> impl Strategy<Value = Options> {
    (
        proptest::collection::btree_map((scope(), 0u8..4), 0u32..3, 0..3),
        proptest::collection::btree_map((scope(), 0u8..4), 1u32..3, 0..3),
        prop_oneof![Just(0u32), Just(20)],
        any::<bool>(),
    )
        .prop_map(|(limits, reservations, linger_seconds, linger_yields)| {
            let name = |s: Scope, n: u8| match s {
                Scope::Group => format!("g{}", n % 3),
                _ => format!("u{n}"),
            };
            let mut seen = std::collections::HashSet::new();
            Options {
                limits: limits
                    .into_iter()
                    .filter(|((s, n), _)| seen.insert((*s, name(*s, *n))))
                    .map(|((scope, n), max)| Limit {
                        scope,
                        name: name(scope, n),
                        max,
                    })
                    .collect(),
                reservations: {
                    let mut seen = std::collections::HashSet::new();
                    reservations
                        .into_iter()
                        .filter(|((s, n), _)| seen.insert((*s, name(*s, *n))))
                        .map(|((scope, n), units)| Reservation {
                            scope,
                            name: name(scope, n),
                            units,
                        })
                        .collect()
                },
                linger_seconds,
                linger_yields,
                max_borrow_hours: 1,
                ..Options::default()
            }
        })
}

/// Units each limit's scope holds now, recounted from the book's live checkouts and lingering
/// seats (not from its tally).
fn held_by(b: &Book, scope: Scope, name: &str) -> u32 {
    let p = &b.products["cad"];
    let matches = |user: &str, groups: &[String]| match scope {
        Scope::User => user == name,
        Scope::Group => groups.iter().any(|g| g == name),
        Scope::Host => name == "h",
    };
    let live: u32 = b
        .checkouts
        .values()
        .filter(|l| matches(&l.user, &l.groups))
        .map(|l| l.units)
        .sum();
    let lingering: u32 = p
        .lingering
        .values()
        .flatten()
        .filter(|l| matches(&l.owner.user, &l.owner.groups))
        .map(|l| l.units)
        .sum();
    live + lingering
}

proptest! {
    /// Under random options and operations on a hard-stop product: in use never exceeds the
    /// allocation and is exactly the live and lingering units; no limit is ever exceeded; a
    /// release takes only units neither in use, lingering, borrowed nor reserved; a grant to
    /// someone no reservation names leaves every reservation's free units untouched; a
    /// borrow outlives any staleout and ends at its time.
    #[test]
    fn options_keep_the_invariants(
        options in options(),
        initial in 0u32..5,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let (mut b, mut g) = book(options.clone(), Enforcement::HardStop, Seat::Concurrent, initial);
        let groups: Vec<Vec<String>> = (0..3).map(|i| vec![format!("g{i}")]).collect();
        let mut handles: Vec<Handle> = Vec::new();
        let mut borrowed: Vec<(Handle, Millis)> = Vec::new();
        let mut now: Millis = 0;
        for op in ops {
            let (allocation, _, in_use) = b.figures("cad").unwrap();
            let reserved_before = b.products["cad"].reserved_idle();
            match op {
                Op::Checkout { user, group, units } => {
                    let u = format!("u{user}");
                    let gs = &groups[usize::from(group)];
                    let named = options.reservations.iter().any(|r| match r.scope {
                        Scope::User => r.name == u,
                        _ => gs.contains(&r.name),
                    });
                    match b.checkout("cad", who(&u, gs), units, false, now, g.next()) {
                        Ok(Outcome::Granted(gr)) => {
                            if !named && !gr.joined {
                                let p = &b.products["cad"];
                                prop_assert!(
                                    p.allocation >= p.in_use + p.reserved_idle(),
                                    "a non-member took reserved units"
                                );
                            }
                            handles.push(gr.record.handle);
                        }
                        Ok(Outcome::Queued(_)) => prop_assert!(false, "never asked to wait"),
                        Err(Refusal::Unavailable | Refusal::Limit { .. }) => {}
                        Err(other) => prop_assert!(false, "unexpected refusal {:?}", other),
                    }
                }
                Op::Borrow { user } => {
                    let until = now + 3_600_000;
                    if let Ok(gr) = b.borrow("cad", who(&format!("u{user}"), &[]), 1, until, now, g.next()) {
                        borrowed.push((gr.record.handle, until));
                    }
                }
                Op::Checkin(i) if !handles.is_empty() => {
                    let h = handles.swap_remove(i % handles.len());
                    let _ = b.checkin(h, now, &mut || g.next());
                }
                Op::Release { id, units } => {
                    let out = b.release(Uuid::from_u128(u128::from(id) + 100), "cad", units).unwrap();
                    if out.applied.is_some() {
                        prop_assert!(
                            out.response.units <= allocation.saturating_sub(in_use + reserved_before),
                            "a release took a unit in use, lingering, borrowed or reserved"
                        );
                    }
                }
                Op::Grant { id, units } => {
                    let _ = b.grant(Uuid::from_u128(u128::from(id) + 100), "cad", units, now, &mut || g.next());
                }
                Op::Tick(ms) => {
                    now += ms;
                    for h in &handles {
                        let _ = b.heartbeat(*h, None, now);
                    }
                    b.expire(now, &mut || g.next());
                }
                _ => {}
            }
            handles.retain(|h| b.is_live(*h));
            for (h, until) in &borrowed {
                prop_assert_eq!(b.is_live(*h), now < *until, "a borrow ends at its time only");
            }
            let (allocation, _, in_use) = b.figures("cad").unwrap();
            prop_assert!(in_use <= allocation, "in use {} > allocation {}", in_use, allocation);
            let p = &b.products["cad"];
            let live: u32 = b.checkouts.values().map(|l| l.units).sum();
            let lingering: u32 = p.lingering.values().flatten().map(|l| l.units).sum();
            prop_assert_eq!(in_use, live + lingering);
            for l in &options.limits {
                let held = held_by(&b, l.scope, &l.name);
                prop_assert!(held <= l.max, "{} {} holds {} > max {}", l.scope, l.name, held, l.max);
            }
        }
    }
}
