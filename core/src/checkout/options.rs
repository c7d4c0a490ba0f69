//! The options-file rules as the book applies them (issue 16): per user, group and host caps
//! (`limits`) and kept units (`reservations`) over a tally of the units each scope holds, the
//! lingering of seats after a checkin, and the idle verdict of a heartbeat.
//!
//! A *tally* counts, per `(scope, name)` that some rule of the product names, the units its
//! holders hold at this server now (lingering units included: they are still theirs). Only
//! named keys are tallied, so a product without rules costs nothing per checkout.

use super::rules::Millis;
use crate::domain::{Limit, Options, Scope};
use std::collections::HashMap;

/// Units held per rule key: by scope, then by name (so a lookup by `&str` allocates nothing).
pub(super) type Tally = HashMap<Scope, HashMap<Box<str>, u32>>;

/// Who holds units, as the tally and the rules see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Owner {
    pub user: Box<str>,
    pub host: Box<str>,
    pub groups: Box<[String]>,
}

/// The rule keys a holder counts under: its user, its host and each of its groups once.
fn keys<'a>(
    user: &'a str,
    host: &'a str,
    groups: &'a [String],
) -> impl Iterator<Item = (Scope, &'a str)> + 'a {
    [(Scope::User, user), (Scope::Host, host)]
        .into_iter()
        .chain(
            groups
                .iter()
                .enumerate()
                .filter(|(i, g)| !groups[..*i].contains(g))
                .map(|(_, g)| (Scope::Group, g.as_str())),
        )
}

/// Whether a rule of `scope` and `name` applies to a holder.
fn applies(scope: Scope, name: &str, user: &str, host: &str, groups: &[String]) -> bool {
    match scope {
        Scope::User => user == name,
        Scope::Host => host == name,
        Scope::Group => groups.iter().any(|g| g == name),
    }
}

/// An empty tally for the keys `options` names.
pub(super) fn tally_for(options: &Options) -> Tally {
    let limits = options.limits.iter().map(|l| (l.scope, l.name.as_str()));
    let reservations = options
        .reservations
        .iter()
        .map(|r| (r.scope, r.name.as_str()));
    let mut tally = Tally::new();
    for (scope, name) in limits.chain(reservations) {
        tally.entry(scope).or_default().insert(Box::from(name), 0);
    }
    tally
}

/// Adds (`sign` > 0) or removes `units` held by a holder to the tally's named keys.
pub(super) fn count(tally: &mut Tally, user: &str, host: &str, groups: &[String], units: i64) {
    if tally.is_empty() {
        return;
    }
    for (scope, name) in keys(user, host, groups) {
        if let Some(held) = tally.get_mut(&scope).and_then(|names| names.get_mut(name)) {
            *held = u32::try_from((i64::from(*held) + units).max(0)).unwrap_or(u32::MAX);
        }
    }
}

/// The first limit taking `units` more would break for this holder, if any.
pub(super) fn breached<'a>(
    options: &'a Options,
    tally: &Tally,
    user: &str,
    host: &str,
    groups: &[String],
    units: u32,
) -> Option<&'a Limit> {
    options.limits.iter().find(|l| {
        applies(l.scope, &l.name, user, host, groups)
            && u64::from(held(tally, l.scope, &l.name)) + u64::from(units) > u64::from(l.max)
    })
}

fn held(tally: &Tally, scope: Scope, name: &str) -> u32 {
    tally
        .get(&scope)
        .and_then(|names| names.get(name))
        .copied()
        .unwrap_or(0)
}

/// Reserved units not yet taken: split into those kept for this holder and those kept for
/// others. With `None` for the holder, every reservation's unfilled units are "others'".
pub(super) fn unfilled(
    options: &Options,
    tally: &Tally,
    holder: Option<(&str, &str, &[String])>,
) -> (u32, u32) {
    let (mut own, mut others) = (0u32, 0u32);
    for r in &options.reservations {
        let open = r.units.saturating_sub(held(tally, r.scope, &r.name));
        match holder {
            Some((u, h, g)) if applies(r.scope, &r.name, u, h, g) => own = own.saturating_add(open),
            _ => others = others.saturating_add(open),
        }
    }
    (own, others)
}

/// A seat held on after its last checkin, for its user and host (FlexNet LINGER).
#[derive(Debug, Clone)]
pub(super) struct Lingering {
    /// Its number, for its deadline and the holders' listing.
    pub id: u64,
    /// Units it keeps.
    pub units: u32,
    /// When it ends.
    pub until: Millis,
    /// Who checked it in.
    pub owner: Owner,
    /// The seat it was, recreated when it is reused.
    pub seat: Option<Box<str>>,
}

/// The key a lingering seat is found under: the seat's key, or the user and host.
pub(super) fn linger_key(seat: Option<&str>, user: &str, host: &str) -> Box<str> {
    match seat {
        Some(k) => k.into(),
        None => format!("{user}\u{1f}{host}").into(),
    }
}

/// What a heartbeat's idle report means under a product's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleVerdict {
    /// Not idle (or idle reclaim is off, or the checkout is borrowed).
    Active,
    /// Idle past `idle_notify_seconds`: the answer warns; the checkout is revoked in
    /// `revoke_in` seconds of further idleness (when idle revoke is on).
    Notify {
        /// Seconds of idleness left before the revoke, if one is configured.
        revoke_in: Option<u32>,
    },
    /// Idle past `idle_revoke_seconds`: the checkout is taken back.
    Revoke {
        /// The idleness reported.
        idle_seconds: u32,
    },
}

/// The idle rule: revoke at or past `idle_revoke_seconds`, warn at or past
/// `idle_notify_seconds` (0 turns either off).
pub fn idle_verdict(options: &Options, idle_seconds: u32) -> IdleVerdict {
    let (notify, revoke) = (options.idle_notify_seconds, options.idle_revoke_seconds);
    if revoke > 0 && idle_seconds >= revoke {
        return IdleVerdict::Revoke { idle_seconds };
    }
    if notify > 0 && idle_seconds >= notify {
        return IdleVerdict::Notify {
            revoke_in: (revoke > 0).then(|| revoke - idle_seconds),
        };
    }
    IdleVerdict::Active
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Reservation;

    fn opts() -> Options {
        Options {
            limits: vec![Limit {
                scope: Scope::Group,
                name: "eng".into(),
                max: 2,
            }],
            reservations: vec![Reservation {
                scope: Scope::User,
                name: "ann".into(),
                units: 2,
            }],
            ..Options::default()
        }
    }

    #[test]
    fn only_named_keys_are_tallied_and_a_group_counts_once() {
        let o = opts();
        let mut t = tally_for(&o);
        let eng = ["eng".to_owned(), "eng".to_owned()];
        count(&mut t, "bob", "h", &eng, 1);
        count(&mut t, "zed", "h", &[], 5);
        assert_eq!(held(&t, Scope::Group, "eng"), 1);
        assert_eq!(t.values().map(HashMap::len).sum::<usize>(), 2);
        assert!(breached(&o, &t, "bob", "h", &eng, 1).is_none());
        assert_eq!(breached(&o, &t, "bob", "h", &eng, 2).unwrap().name, "eng");
        assert!(breached(&o, &t, "bob", "h", &[], 9).is_none());
    }

    #[test]
    fn unfilled_reservations_are_the_holders_own_or_others() {
        let o = opts();
        let mut t = tally_for(&o);
        assert_eq!(unfilled(&o, &t, Some(("ann", "h", &[]))), (2, 0));
        assert_eq!(unfilled(&o, &t, Some(("bob", "h", &[]))), (0, 2));
        count(&mut t, "ann", "h", &[], 1);
        assert_eq!(unfilled(&o, &t, None), (0, 1));
        count(&mut t, "ann", "h", &[], 4);
        assert_eq!(unfilled(&o, &t, None), (0, 0));
    }

    #[test]
    fn idle_notifies_then_revokes() {
        let o = Options {
            idle_notify_seconds: 60,
            idle_revoke_seconds: 300,
            ..Options::default()
        };
        assert_eq!(idle_verdict(&o, 59), IdleVerdict::Active);
        assert_eq!(
            idle_verdict(&o, 100),
            IdleVerdict::Notify {
                revoke_in: Some(200)
            }
        );
        assert_eq!(
            idle_verdict(&o, 300),
            IdleVerdict::Revoke { idle_seconds: 300 }
        );
        assert_eq!(
            idle_verdict(&Options::default(), u32::MAX),
            IdleVerdict::Active
        );
    }
}
