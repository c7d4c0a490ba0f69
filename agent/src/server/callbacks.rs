//! User callbacks (issue 16, after SMS 2.0): a client that would wait leaves a callback in the
//! product's queue instead of an open request. When the book serves it, the unit is kept for
//! it — a real checkout whose staleout is the hold time — and the client is told: its webhook
//! (on the operator's allow-list) is called, and its long-polls wake. It claims the checkout
//! within the hold, or the unit frees for the next in line.
//!
//! The queue order, priorities and the keeping of the unit are the book's; this module only
//! remembers which waiter is whose callback and where each stands. Callbacks live in memory:
//! after a restart their clients register again (a kept unit that was logged is a checkout the
//! restart restores and the hold's staleout frees).

use allot_core::checkout::{Book, Handle, Millis};
use allot_core::wire::agent::{CallbackState, CallbackStatus, CheckoutResponse};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// How long a long-polled callback stays without a poll before it is dropped.
pub const RENEW_MS: Millis = 60_000;
/// The most callbacks one server remembers (waiting, ready or recently over).
pub const MAX_CALLBACKS: usize = 10_000;
/// How long an ended or claimed callback is still answered before it is forgotten.
const FORGET_AFTER_MS: Millis = 600_000;

/// One callback.
#[derive(Debug)]
pub(super) struct Callback {
    pub product: String,
    pub state: CallbackState,
    /// Its waiter while queued.
    pub waiter: Option<u64>,
    /// The checkout kept for it, and the answer its claim gives.
    pub kept: Option<CheckoutResponse>,
    pub handle: Option<Handle>,
    pub claim_by: Option<Millis>,
    /// `None` with a webhook; else the poll deadline while waiting.
    pub renew_by: Option<Millis>,
    pub expires_at: Millis,
    pub hold_ms: Millis,
    pub webhook: Option<String>,
    /// When it last changed state, to forget it later.
    pub changed_at: Millis,
    /// Wakes its long-polls.
    pub wake: Arc<Notify>,
}

/// Every callback of the server, by id and by waiter.
#[derive(Debug, Default)]
pub(super) struct Callbacks {
    by_id: HashMap<u128, Callback>,
    by_waiter: HashMap<u64, u128>,
}

/// A callback's public id (its client's secret): `cb_` and 32 hex digits.
pub(super) fn id_text(id: u128) -> String {
    format!("cb_{id:032x}")
}

/// Reads a callback id.
pub(super) fn parse_id(text: &str) -> Option<u128> {
    let hex = text.strip_prefix("cb_")?;
    (hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u128::from_str_radix(hex, 16).ok())
        .flatten()
}

fn utc(ms: Millis) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

impl Callbacks {
    /// Registers a callback.
    pub fn insert(&mut self, id: u128, callback: Callback) {
        if let Some(w) = callback.waiter {
            self.by_waiter.insert(w, id);
        }
        self.by_id.insert(id, callback);
    }

    /// The callback `id`.
    pub fn get_mut(&mut self, id: u128) -> Option<&mut Callback> {
        self.by_id.get_mut(&id)
    }

    /// The book served `waiter`: if it is a callback, keeps the unit for its claim (the
    /// checkout's staleout becomes the hold) and returns its id with its webhook.
    pub fn served(
        &mut self,
        waiter: u64,
        grant: &allot_core::checkout::Grant,
        book: &mut Book,
        now: Millis,
    ) -> Option<(u128, Option<String>)> {
        let id = self.by_waiter.remove(&waiter)?;
        let c = self.by_id.get_mut(&id)?;
        c.keep(grant, book, now);
        Some((id, c.webhook.clone()))
    }

    /// The earliest time a waiting callback runs out (its wait or its renewal).
    pub fn next_deadline(&self) -> Option<Millis> {
        self.by_id
            .values()
            .filter(|c| c.state == CallbackState::Waiting)
            .map(Callback::runs_out_at)
            .min()
    }

    /// Waiting callbacks run out at `now`: (product, waiter). Marks them ended.
    pub fn run_out(&mut self, now: Millis) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for c in self.by_id.values_mut() {
            if c.state == CallbackState::Waiting && c.runs_out_at() <= now {
                if let Some(w) = c.waiter.take() {
                    self.by_waiter.remove(&w);
                    out.push((c.product.clone(), w));
                }
                c.end(now);
            }
        }
        self.by_id.retain(|_, c| {
            !(matches!(c.state, CallbackState::Ended | CallbackState::Claimed)
                && c.changed_at.saturating_add(FORGET_AFTER_MS) <= now)
        });
        out
    }

    /// Whether `handle` is a unit kept for a callback that was never claimed: its end is no
    /// one's usage.
    pub fn kept_unclaimed(&self, handle: Handle) -> bool {
        self.by_id
            .values()
            .any(|c| c.state == CallbackState::Ready && c.handle == Some(handle))
    }

    /// Forgets `waiter` (it left the queue some other way).
    pub fn forget_waiter(&mut self, waiter: u64) {
        self.by_waiter.remove(&waiter);
    }

    /// How many callbacks are remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

impl Callback {
    fn runs_out_at(&self) -> Millis {
        self.renew_by
            .map_or(self.expires_at, |r| r.min(self.expires_at))
    }

    /// Keeps a served unit for the claim.
    pub fn keep(&mut self, grant: &allot_core::checkout::Grant, book: &mut Book, now: Millis) {
        let until = now.saturating_add(self.hold_ms);
        book.hold_until(grant.record.handle, until);
        self.state = CallbackState::Ready;
        self.waiter = None;
        self.handle = Some(grant.record.handle);
        self.kept = Some(CheckoutResponse {
            handle: grant.record.handle.to_string(),
            units: grant.record.units,
            heartbeat_seconds: grant.heartbeat_seconds,
            overdraft: grant.record.overdraft,
        });
        self.claim_by = Some(until);
        self.changed_at = now;
        self.wake.notify_waiters();
    }

    /// Leaves the callback ended.
    pub fn end(&mut self, now: Millis) {
        self.state = CallbackState::Ended;
        self.waiter = None;
        self.changed_at = now;
        self.wake.notify_waiters();
    }

    /// Where it stands, as its client is told. A kept unit whose hold ran out is ended.
    pub fn status(&mut self, id: u128, book: &Book, now: Millis) -> CallbackStatus {
        if self.state == CallbackState::Ready && !self.handle.is_some_and(|h| book.is_live(h)) {
            self.end(now);
        }
        CallbackStatus {
            id: id_text(id),
            product: self.product.clone(),
            state: self.state,
            position: self
                .waiter
                .and_then(|w| book.queue_position(&self.product, w))
                .map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
            claim_by: (self.state == CallbackState::Ready)
                .then_some(self.claim_by)
                .flatten()
                .map(utc),
            renew_by: (self.state == CallbackState::Waiting)
                .then_some(self.renew_by)
                .flatten()
                .map(utc),
            expires_at: utc(self.expires_at),
        }
    }
}

/// Whether a webhook URL's host (and port, when the entry names one) is on the allow-list.
pub(super) fn host_allowed(url: &str, allowed: &[String]) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or("");
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(authority) || a.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_garbage_is_refused() {
        let id = 0xabcdef_u128;
        assert_eq!(parse_id(&id_text(id)), Some(id));
        assert_eq!(parse_id("cb_xyz"), None);
        assert_eq!(parse_id(&format!("co_{:032x}", 5)), None);
    }

    #[test]
    fn webhook_hosts_must_be_on_the_allow_list() {
        let allowed = ["hooks.example.com".to_owned(), "10.0.0.5:8080".to_owned()];
        assert!(host_allowed("https://hooks.example.com/x", &allowed));
        assert!(host_allowed("http://hooks.example.com:9000/x", &allowed));
        assert!(host_allowed("http://10.0.0.5:8080/cb", &allowed));
        assert!(!host_allowed("http://10.0.0.5:9090/cb", &allowed));
        assert!(!host_allowed("http://evil.example.com/", &allowed));
        assert!(!host_allowed("http://evil.com@x/", &allowed));
        assert!(!host_allowed(
            "http://hooks.example.com.evil.com/",
            &allowed
        ));
        assert!(!host_allowed("https://hooks.example.com/", &[]));
    }
}
