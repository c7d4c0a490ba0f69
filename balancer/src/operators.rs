//! Operators: the people who administer the balancer under their own name.
//!
//! The admin token stays the root credential (bootstrap, scripts, audited as `admin`). An
//! operator has a name, a role (`admin` changes things, `viewer` only reads) and a password
//! kept only as an argon2id hash (a PHC string with its own salt and parameters), so a leaked
//! database yields no usable password. Operators log in to the console or call the API with
//! HTTP Basic; either way [`Authenticator::login`] checks the password, behind a [`Throttle`]
//! that slows guessing per name and per address, and every change they make is audited under
//! their name.
//!
//! Passwords are checked here and nowhere else; the store only keeps the hashes.

pub use crate::store::{Operator, Role};

use crate::store::{Store, StoreError};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `POST /v1/operators`: a new operator and their password (hashed before it is stored).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddOperator {
    /// 1–64 of `A-Z a-z 0-9 . _ -`; not a name the balancer itself audits under.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// 12–256 characters.
    #[schema(min_length = 12, max_length = 256)]
    pub password: String,
}

/// Names the audit log already uses for the root token and the balancer's own acts, so an
/// operator can never be mistaken for them.
const RESERVED_NAMES: [&str; 5] = ["admin", "autotune", "balancer", "expiry", "system"];

/// The shortest password accepted: long enough that the throttle makes guessing hopeless.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest password accepted (hashing cost grows with length; nobody needs more).
pub const MAX_PASSWORD_CHARS: usize = 256;

/// Why an operator's name or password is refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOperator(pub String);

/// Checks an operator's name: short, plain characters (it appears in URLs, logs and tables).
pub fn validate_name(name: &str) -> Result<(), InvalidOperator> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if name.is_empty() || name.len() > 64 || !plain {
        return Err(InvalidOperator(
            "name: 1-64 characters of A-Z a-z 0-9 . _ -".into(),
        ));
    }
    if RESERVED_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(InvalidOperator(format!(
            "name: {name:?} is reserved for the balancer's own audit entries"
        )));
    }
    Ok(())
}

/// Checks a new password's length.
pub fn validate_password(password: &str) -> Result<(), InvalidOperator> {
    let chars = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        return Err(InvalidOperator(format!(
            "password: must be {MIN_PASSWORD_CHARS}-{MAX_PASSWORD_CHARS} characters, got {chars}"
        )));
    }
    if password.chars().any(char::is_control) {
        return Err(InvalidOperator(
            "password: must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// The argon2id hash (PHC string) of `password` under a fresh random salt.
pub fn hash_password(password: &str) -> String {
    let salt =
        SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes are a valid salt");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashes any password of bounded length")
        .to_string()
}

/// Whether `password` matches the PHC string `hash` (false for a malformed hash).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash of no password anyone knows, verified when the name is unknown so that an unknown
/// name costs as much time as a wrong password (no name enumeration by timing).
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password(&crate::auth::generate_token()))
}

/// Failures allowed before a key (a name or an address) is made to wait.
const FREE_FAILURES: u32 = 5;
/// The first wait after the free failures; each further failure doubles it.
const FIRST_DELAY: Duration = Duration::from_secs(30);
/// The longest wait.
const MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// Keys tracked at most; beyond it the ones whose wait is over are forgotten first.
const MAX_KEYS: usize = 10_000;

/// Login throttling: after [`FREE_FAILURES`] failed logins for one name or from one address,
/// each further attempt must wait, the wait doubling per failure up to [`MAX_DELAY`]. A
/// success clears the name's count. Pure bookkeeping: the caller passes `now`.
#[derive(Debug, Default)]
pub struct Throttle {
    keys: Mutex<HashMap<String, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    blocked_until: Option<Instant>,
}

impl Throttle {
    /// How long a login for `name` from `addr` must still wait at `now`; `None` when it may
    /// be tried.
    pub fn wait(&self, name: &str, addr: Option<IpAddr>, now: Instant) -> Option<Duration> {
        let keys = self.keys.lock().expect("throttle lock");
        Self::keys_of(name, addr)
            .iter()
            .filter_map(|k| keys.get(k)?.blocked_until)
            .filter(|until| *until > now)
            .max()
            .map(|until| until - now)
    }

    /// Counts a failed login for `name` from `addr`.
    pub fn failed(&self, name: &str, addr: Option<IpAddr>, now: Instant) {
        let mut keys = self.keys.lock().expect("throttle lock");
        if keys.len() >= MAX_KEYS {
            keys.retain(|_, f| f.blocked_until.is_some_and(|u| u > now));
        }
        for key in Self::keys_of(name, addr) {
            let entry = keys.entry(key).or_insert(Failures {
                count: 0,
                blocked_until: None,
            });
            entry.count = entry.count.saturating_add(1);
            if entry.count >= FREE_FAILURES {
                let doublings = (entry.count - FREE_FAILURES).min(16);
                let delay = FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY);
                entry.blocked_until = Some(now + delay);
            }
        }
    }

    /// Clears the count of `name` after a successful login (its address keeps its count, so
    /// one good account does not unlock guessing at others).
    pub fn succeeded(&self, name: &str) {
        self.keys
            .lock()
            .expect("throttle lock")
            .remove(&format!("name:{name}"));
    }

    fn keys_of(name: &str, addr: Option<IpAddr>) -> Vec<String> {
        let mut keys = vec![format!("name:{name}")];
        if let Some(addr) = addr {
            keys.push(format!("addr:{addr}"));
        }
        keys
    }
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Unknown name or wrong password (never said which).
    #[error("wrong operator name or password")]
    Wrong,
    /// Too many failures: wait this long.
    #[error("too many failed logins; try again in {} s", .0.as_secs().max(1))]
    Throttled(Duration),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks operators' passwords for the API and the console, behind one shared [`Throttle`].
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    throttle: Arc<Throttle>,
}

impl Authenticator {
    /// Checks passwords against `store`'s operators.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            throttle: Arc::default(),
        }
    }

    /// The throttle, shared with the console's root login (the admin token).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// The operator `name` if `password` is theirs and neither the name nor `addr` is
    /// throttled; a failure counts against both.
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        addr: Option<IpAddr>,
    ) -> Result<Operator, LoginError> {
        if let Some(wait) = self.throttle.wait(name, addr, Instant::now()) {
            return Err(LoginError::Throttled(wait));
        }
        let found = if validate_name(name).is_ok() && password.len() <= 4 * MAX_PASSWORD_CHARS {
            self.store.operator_credentials(name).await?
        } else {
            None
        };
        let (hash, operator) = match &found {
            Some((operator, hash)) => (hash.clone(), Some(operator.clone())),
            None => (decoy_hash().to_owned(), None),
        };
        // argon2 is deliberately slow: off the async threads.
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        match operator {
            Some(operator) if matches => {
                self.throttle.succeeded(name);
                Ok(operator)
            }
            _ => {
                self.throttle.failed(name, addr, Instant::now());
                Err(LoginError::Wrong)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_kept_as_salted_argon2id_and_verified() {
        let a = hash_password("correct horse battery");
        let b = hash_password("correct horse battery");
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify_password("correct horse battery", &a));
        assert!(!verify_password("correct horse batterY", &a));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(validate_name("ann.lee-2").is_ok());
        for bad in ["", "a b", "ann/x", "Admin", "system", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_password("short").is_err());
        assert!(validate_password(&"p".repeat(12)).is_ok());
        assert!(validate_password(&"p".repeat(257)).is_err());
        assert!(validate_password("twelve chars\u{7}").is_err());
    }

    #[test]
    fn the_throttle_waits_after_free_failures_and_doubles() {
        let t = Throttle::default();
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            t.failed("ann", Some(addr), now);
            assert_eq!(t.wait("ann", Some(addr), now), None);
        }
        t.failed("ann", Some(addr), now);
        assert_eq!(t.wait("ann", None, now), Some(FIRST_DELAY));
        // The address is throttled for every name, the name from every address.
        assert_eq!(t.wait("bob", Some(addr), now), Some(FIRST_DELAY));
        assert_eq!(t.wait("bob", None, now), None);
        assert_eq!(t.wait("ann", None, now + FIRST_DELAY), None);
        t.failed("ann", None, now + FIRST_DELAY);
        assert_eq!(
            t.wait("ann", None, now + FIRST_DELAY),
            Some(FIRST_DELAY * 2)
        );
        t.succeeded("ann");
        assert_eq!(t.wait("ann", None, now + FIRST_DELAY), None);
        for _ in 0..40 {
            t.failed("eve", None, now);
        }
        assert_eq!(t.wait("eve", None, now), Some(MAX_DELAY));
    }
}
