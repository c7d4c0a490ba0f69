//! What the checkout book takes from and gives back to its shells: persisted records, grants,
//! outcomes, refusals, applied moves and the book's limits.

use super::rules::{AclDenial, Handle, Millis};
use crate::domain::MoveKind;
use crate::wire::agent::MoveResponse;

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
    /// The groups the client stated, shown to operators with the checkout.
    pub groups: Vec<String>,
    /// The shared seat it belongs to, if the product shares seats.
    pub seat: Option<String>,
    /// Units held by the checkout's seat.
    pub units: u32,
    /// Granted beyond the allocation (soft stop).
    pub overdraft: bool,
    /// When it was granted.
    pub created_at: Millis,
    /// Borrowed for offline use until then (no heartbeats; ends by return or at that time).
    pub borrowed_until: Option<Millis>,
}

/// A checkout as it ended: what its usage record says (who, where, how many, since when).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Its handle.
    pub handle: Handle,
    /// The product.
    pub product: std::sync::Arc<str>,
    /// Who held it.
    pub user: String,
    /// Where.
    pub host: String,
    /// The groups the client stated.
    pub groups: Vec<String>,
    /// Units it held.
    pub units: u32,
    /// When it was granted.
    pub started_at: Millis,
}

/// A waiter's leaving of its queue ([`Book::cancel_wait`](super::Book::cancel_wait)).
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The product is not defined here.
    UnknownProduct,
    /// The ACL refuses this user, host or group.
    Forbidden(AclDenial),
    /// A limit of the product's options caps this user, group or host (FlexNet MAX).
    Limit {
        /// Whom the limit caps.
        scope: crate::domain::Scope,
        /// The user, group or host it names.
        name: String,
        /// Its cap.
        max: u32,
    },
    /// The product's policy does not allow borrowing (`max_borrow_hours` is 0).
    BorrowNotAllowed,
    /// The borrow asks for longer than the policy's `max_borrow_hours` (or ends in the past).
    BorrowTooLong {
        /// The policy's longest borrow.
        max_hours: u32,
    },
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

/// Why a heartbeat or checkin was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadHandle {
    /// The handle is unknown, or its checkout ended (checkin, staleout).
    Unknown,
    /// An operator revoked the checkout: its units went to someone else.
    Revoked {
        /// When (Unix ms).
        at: Millis,
        /// Why, as the operator said.
        reason: String,
    },
}

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
