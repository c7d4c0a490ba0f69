//! Console sessions: a random id in an `HttpOnly; SameSite=Strict` cookie (`Secure` under TLS),
//! kept in this balancer's memory by its SHA-256 digest, with a per-session CSRF token that
//! every change must echo.
//!
//! Sessions live in memory on purpose: a restart or a failover logs operators out, which is
//! the safe direction, and no session secret ever reaches the database. A session is checked
//! against the store on every request (see `super::Console::session`), so removing an operator
//! ends their sessions at once, wherever the removal was made.

use crate::operators::Role;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "allot_console";
/// How long a session lasts from its login, however active.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most; the oldest are dropped beyond it.
const MAX_SESSIONS: usize = 10_000;

/// One logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// The operator's name, the audit log's actor (`admin` for the admin token).
    pub operator: String,
    /// What they may do.
    pub role: Role,
    /// The token every form and change must carry (never the session id).
    pub csrf: String,
    /// When the session ends.
    expires: Instant,
}

impl Session {
    /// Whether `presented` is this session's CSRF token, compared in constant time.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// Whether the operator may change things.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// The live sessions of this balancer, and a one-shot message per session for the page after
/// a change (post/redirect/get).
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Entry>>,
}

/// A session and the message waiting for its next page, by the digest of its id.
type Entry = (Session, Option<Flash>);

/// The outcome of a change, shown once on the next page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Flash {
    /// `ok` or `error`.
    pub kind: &'static str,
    /// What happened, for the operator.
    pub text: String,
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for `operator`; returns its id (for the cookie only).
    pub fn start(&self, operator: &str, role: Role, now: Instant) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let session = Session {
            operator: operator.to_owned(),
            role,
            csrf: hex::encode(rand::random::<[u8; 32]>()),
            expires: now + LIFETIME,
        };
        let mut live = self.live.lock().expect("sessions lock");
        live.retain(|_, (s, _)| s.expires > now);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, (s, _))| s.expires)
                .map(|(k, _)| *k)
        {
            live.remove(&oldest);
        }
        live.insert(digest(&id), (session, None));
        id
    }

    /// The live session of cookie value `id` at `now`.
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut live = self.live.lock().expect("sessions lock");
        let key = digest(id);
        match live.get(&key) {
            Some((s, _)) if s.expires > now => Some(s.clone()),
            Some(_) => {
                live.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Sets the role a session acts with (the operator's role as stored now).
    pub fn set_role(&self, id: &str, role: Role) {
        if let Some((s, _)) = self
            .live
            .lock()
            .expect("sessions lock")
            .get_mut(&digest(id))
        {
            s.role = role;
        }
    }

    /// Ends the session of cookie value `id`.
    pub fn end(&self, id: &str) {
        self.live.lock().expect("sessions lock").remove(&digest(id));
    }

    /// Leaves a message for the session's next page.
    pub fn flash(&self, id: &str, kind: &'static str, text: String) {
        if let Some((_, flash)) = self
            .live
            .lock()
            .expect("sessions lock")
            .get_mut(&digest(id))
        {
            *flash = Some(Flash { kind, text });
        }
    }

    /// Takes the message left for this page, if any.
    pub fn take_flash(&self, id: &str) -> Option<Flash> {
        self.live
            .lock()
            .expect("sessions lock")
            .get_mut(&digest(id))
            .and_then(|(_, flash)| flash.take())
    }
}

/// The value of cookie `name` in a `Cookie:` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value that gives the browser session `id` (or, with `None`, forgets it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_until_it_ends_or_expires() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let id = sessions.start("ann", Role::Viewer, now);
        let s = sessions.get(&id, now).expect("live");
        assert_eq!((s.operator.as_str(), s.role), ("ann", Role::Viewer));
        assert!(s.csrf_matches(&s.csrf.clone()) && !s.csrf_matches("") && !s.csrf_matches(&id));
        assert!(sessions.get(&id, now + LIFETIME).is_none());
        let id = sessions.start("ann", Role::Admin, now);
        sessions.flash(&id, "ok", "done".into());
        assert_eq!(sessions.take_flash(&id).unwrap().text, "done");
        assert!(sessions.take_flash(&id).is_none());
        sessions.end(&id);
        assert!(sessions.get(&id, now).is_none());
    }

    #[test]
    fn cookies_are_read_and_set_strictly() {
        assert_eq!(cookie("a=1; allot_console=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("a=1", COOKIE), None);
        let set = set_cookie(Some("xyz"), true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!set_cookie(Some("xyz"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}
