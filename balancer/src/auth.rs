//! Tokens: how the balancer recognises its admins and its metering servers.
//!
//! Tokens are 256-bit random secrets shown once. Only their SHA-256 digest is stored or kept in
//! memory, and presented tokens are compared digest to digest in constant time, so neither a
//! leaked database nor response timing reveals a usable token. A plain digest (no salt, no
//! key stretching) is enough because the secrets are random, not chosen by people.

use crate::store::ServerRecord;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// The longest grace a rotated-out server token may keep working: the token policy the API,
/// the CLI and `serve` all check against (defined with the other wire limits in `allot-core`).
pub use allot_core::validate::MAX_TOKEN_GRACE_SECONDS;

/// The prefix of every allot token, so secret scanners and people recognise one.
const TOKEN_PREFIX: &str = "allot_";

/// A fresh random token.
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The stored form of a token: its SHA-256 digest, hex-encoded.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Derives each metering server's token from the balancer's key and a per-registration salt.
///
/// The balancer must present a server's token when it calls that server, and check it when the
/// server calls back, yet never store it: `token = HMAC-SHA256(key, name ‖ salt)` lets it
/// recompute the token on demand while the store keeps only the salt and the token's digest.
/// The key lives in the store (shared by every balancer on it), so the store must be protected
/// like the tokens themselves; rotating a token is a new salt.
#[derive(Clone)]
pub struct ServerTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for ServerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTokens(…)")
    }
}

impl ServerTokens {
    /// Tokens under `key` (the store's `server.token.key`).
    pub fn new(key: &str) -> Self {
        Self {
            key: key.as_bytes().to_vec(),
        }
    }

    /// A fresh salt for a registration or a rotation.
    pub fn new_salt() -> String {
        hex::encode(rand::random::<[u8; 16]>())
    }

    /// Which of `server`'s tokens `presented` is at `now`: its current one, or its previous one
    /// while a rotation's grace runs; `None` for anything else (an expired previous token
    /// included). Compared digest to digest in constant time.
    pub fn check(
        &self,
        server: &ServerRecord,
        presented: &str,
        now: DateTime<Utc>,
    ) -> Option<TokenMatch> {
        let presented = AdminToken::new(presented);
        if presented.verify(&self.token(&server.name, &server.token_salt)) {
            return Some(TokenMatch::Current);
        }
        server
            .previous_token
            .as_ref()
            .filter(|previous| now < previous.until)
            .filter(|previous| presented.verify(&self.token(&server.name, &previous.salt)))
            .map(|_| TokenMatch::Previous)
    }

    /// The token of server `name` registered with `salt`.
    pub fn token(&self, name: &str, salt: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        mac.update(name.as_bytes());
        mac.update(b"\n");
        mac.update(salt.as_bytes());
        format!("{TOKEN_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// Which of a metering server's tokens a call presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMatch {
    /// The newest one: any previous token's grace can end now.
    Current,
    /// The one before the latest rotation, still within its grace period.
    Previous,
}

/// The admin token's digest, checked against every admin call.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

impl AdminToken {
    /// Keeps only the digest of `token`.
    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the admin token, in time independent of where they differ.
    pub fn verify(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest.ct_eq(&digest).into()
    }
}

/// Where the admin token comes from, for the start-up summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTokenSource {
    /// `--admin-token` / `ALLOT_ADMIN_TOKEN`.
    Configured,
    /// Read from the file written at an earlier first start.
    File(PathBuf),
    /// Generated now and written to this file; the caller prints it once.
    Generated(PathBuf, String),
}

/// The admin token file under a data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// The configured admin token, or the one in the data directory, or a new one written there
/// with mode 0600 (owner-only) on first start.
pub fn load_or_create_admin_token(
    configured: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<(AdminToken, AdminTokenSource)> {
    if let Some(token) = configured {
        return Ok((AdminToken::new(token), AdminTokenSource::Configured));
    }
    let path = admin_token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(token) => Ok((AdminToken::new(token.trim()), AdminTokenSource::File(path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = generate_token();
            write_secret(&path, &token)?;
            Ok((
                AdminToken::new(&token),
                AdminTokenSource::Generated(path, token),
            ))
        }
        Err(e) => Err(e),
    }
}

/// Writes a secret readable by its owner only; refuses to overwrite an existing file.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_verified_by_digest() {
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let admin = AdminToken::new(&a);
        assert!(admin.verify(&a));
        assert!(!admin.verify(&b));
        assert!(!admin.verify(""));
        assert_eq!(hash_token(&a).len(), 64);
    }

    #[test]
    fn server_tokens_are_stable_per_salt_and_differ_between_servers() {
        let tokens = ServerTokens::new("key");
        let salt = ServerTokens::new_salt();
        assert_eq!(tokens.token("a", &salt), tokens.token("a", &salt));
        assert_ne!(tokens.token("a", &salt), tokens.token("b", &salt));
        assert_ne!(
            tokens.token("a", &salt),
            tokens.token("a", &ServerTokens::new_salt())
        );
        assert_ne!(
            tokens.token("a", &salt),
            ServerTokens::new("other").token("a", &salt)
        );
    }

    #[test]
    fn a_previous_token_works_only_during_its_grace() {
        use crate::store::PreviousToken;
        use allot_core::domain::ServerState;
        let tokens = ServerTokens::new("key");
        let now = Utc::now();
        let (old, new) = (ServerTokens::new_salt(), ServerTokens::new_salt());
        let mut server = ServerRecord {
            name: "paris".into(),
            url: "http://paris".into(),
            site: "eu".into(),
            state: ServerState::Active,
            token_salt: new.clone(),
            previous_token: Some(PreviousToken {
                salt: old.clone(),
                until: now + chrono::Duration::hours(1),
            }),
            last_seen_at: None,
            created_at: now,
            needs_reset: false,
        };
        let (old_token, new_token) = (tokens.token("paris", &old), tokens.token("paris", &new));
        assert_eq!(
            tokens.check(&server, &new_token, now),
            Some(TokenMatch::Current)
        );
        assert_eq!(
            tokens.check(&server, &old_token, now),
            Some(TokenMatch::Previous)
        );
        assert_eq!(server.token_salts(now), [old.as_str(), new.as_str()]);
        let later = now + chrono::Duration::hours(2);
        assert_eq!(tokens.check(&server, &old_token, later), None);
        assert_eq!(server.token_salts(later), [new.as_str()]);
        assert_eq!(tokens.check(&server, "allot_nonsense", now), None);
        server.previous_token = None;
        assert_eq!(tokens.check(&server, &old_token, now), None);
        assert_eq!(
            tokens.check(&server, &new_token, later),
            Some(TokenMatch::Current)
        );
    }

    #[test]
    fn first_start_writes_an_owner_only_token_and_later_starts_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let (token, source) = load_or_create_admin_token(None, dir.path()).unwrap();
        let AdminTokenSource::Generated(path, secret) = source else {
            panic!("expected a generated token");
        };
        assert!(token.verify(&secret));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, source) = load_or_create_admin_token(None, dir.path()).unwrap();
        assert!(matches!(source, AdminTokenSource::File(_)));
        assert!(again.verify(&secret));
        let (configured, _) = load_or_create_admin_token(Some("x"), dir.path()).unwrap();
        assert!(configured.verify("x") && !configured.verify(&secret));
    }
}
