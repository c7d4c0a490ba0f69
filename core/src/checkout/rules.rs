//! The stateless rules of a checkout: who may check out (ACL), which seat a checkout takes,
//! what the enforcement mode decides when the allocation is full, and the staleout arithmetic.

use crate::domain::{Acl, Enforcement, Seat};
use std::fmt;
use std::str::FromStr;

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
