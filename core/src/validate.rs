//! Validation rules applied at every edge, before anything is stored or sent.
//!
//! One definition per rule so the balancer, the metering server and the CLI refuse the same
//! things with the same words.

use crate::domain::{Acl, Options, Policy};

/// The largest unit count a single request may name.
pub const MAX_UNITS: u32 = 1_000_000;
/// The longest name (product, server, site, user, host, reference) in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// The largest request body any allot API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The most entries one ACL list may hold, to bound the work of every checkout.
pub const MAX_ACL_ENTRIES: usize = 1_000;
/// The longest heartbeat interval or staleout: one week.
pub const MAX_POLICY_SECONDS: u32 = 7 * 24 * 3600;
/// The longest grace a rotated-out server token may get: 30 days. A longer overlap would
/// defeat the purpose of rotating.
pub const MAX_TOKEN_GRACE_SECONDS: u32 = 30 * 86_400;

/// A field that failed validation, with a message that names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The JSON field or flag that was wrong.
    pub field: String,
    /// What was wrong with it.
    pub message: String,
}

impl Invalid {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A name: 1–128 printable characters, no control characters, no surrounding whitespace.
pub fn name(field: &str, value: &str) -> Result<(), Invalid> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if chars > MAX_NAME_CHARS {
        return Err(Invalid::new(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters, got {chars}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    if value.trim() != value {
        return Err(Invalid::new(field, "must not start or end with whitespace"));
    }
    Ok(())
}

/// A name that also appears in URL paths: no `/`, so `/v1/products/{name}` stays unambiguous.
pub fn path_name(field: &str, value: &str) -> Result<(), Invalid> {
    name(field, value)?;
    if value.contains('/') {
        return Err(Invalid::new(field, "must not contain '/'"));
    }
    Ok(())
}

/// A unit count of a request: 1–1,000,000.
pub fn units(field: &str, value: u32) -> Result<(), Invalid> {
    if value == 0 || value > MAX_UNITS {
        return Err(Invalid::new(
            field,
            format!("must be between 1 and {MAX_UNITS}, got {value}"),
        ));
    }
    Ok(())
}

/// A unit count that may be zero (a minimum or a buffer): 0–1,000,000.
pub fn units_or_zero(field: &str, value: u32) -> Result<(), Invalid> {
    if value > MAX_UNITS {
        return Err(Invalid::new(
            field,
            format!("must be between 0 and {MAX_UNITS}, got {value}"),
        ));
    }
    Ok(())
}

/// A URL a balancer can call: http or https, with a host.
pub fn http_url(field: &str, value: &str) -> Result<(), Invalid> {
    if value.len() > 2048 {
        return Err(Invalid::new(field, "must be at most 2048 bytes"));
    }
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .ok_or_else(|| Invalid::new(field, "must start with http:// or https://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Invalid::new(
            field,
            "must name a host and contain no whitespace",
        ));
    }
    Ok(())
}

/// A product policy: sane heartbeat and staleout, bounded ACL of valid names.
pub fn policy(policy: &Policy) -> Result<(), Invalid> {
    let (hb, so) = (policy.heartbeat_seconds, policy.staleout_seconds);
    if hb == 0 || hb > MAX_POLICY_SECONDS {
        return Err(Invalid::new(
            "heartbeat_seconds",
            format!("must be between 1 and {MAX_POLICY_SECONDS}, got {hb}"),
        ));
    }
    if so < hb || so > MAX_POLICY_SECONDS {
        return Err(Invalid::new(
            "staleout_seconds",
            format!("must be between heartbeat_seconds ({hb}) and {MAX_POLICY_SECONDS}, got {so}"),
        ));
    }
    acl(&policy.acl)?;
    options(&policy.options)
}

/// The most rules one list of a product's options may hold (limits, reservations,
/// priorities), to bound the work of every checkout.
pub const MAX_OPTION_RULES: usize = 1_000;
/// The longest borrow a policy may allow: one year.
pub const MAX_BORROW_HOURS: u32 = 366 * 24;
/// The highest queue priority.
pub const MAX_PRIORITY: u32 = 1_000;

/// A product's options: bounded lists of valid names, no rule twice, times within bounds and
/// the idle notice before the idle revoke.
pub fn options(options: &Options) -> Result<(), Invalid> {
    fn list<T>(
        field: &str,
        items: &[T],
        key: impl Fn(&T) -> (String, &str),
    ) -> Result<(), Invalid> {
        if items.len() > MAX_OPTION_RULES {
            return Err(Invalid::new(
                field,
                format!("must hold at most {MAX_OPTION_RULES} entries"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let (k, n) = key(item);
            name(&format!("{field}[{i}].name"), n)?;
            if !seen.insert(k.clone()) {
                return Err(Invalid::new(
                    format!("{field}[{i}]"),
                    format!("duplicate rule for {k}; give each scope and name one rule"),
                ));
            }
        }
        Ok(())
    }
    list("options.limits", &options.limits, |l| {
        (format!("{} {:?}", l.scope, l.name), &l.name)
    })?;
    for (i, l) in options.limits.iter().enumerate() {
        units_or_zero(&format!("options.limits[{i}].max"), l.max)?;
    }
    list("options.reservations", &options.reservations, |r| {
        (format!("{} {:?}", r.scope, r.name), &r.name)
    })?;
    for (i, r) in options.reservations.iter().enumerate() {
        units(&format!("options.reservations[{i}].units"), r.units)?;
    }
    list("options.priorities", &options.priorities, |p| {
        (format!("group {:?}", p.group), &p.group)
    })?;
    for (i, p) in options.priorities.iter().enumerate() {
        if p.priority > MAX_PRIORITY {
            return Err(Invalid::new(
                format!("options.priorities[{i}].priority"),
                format!("must be between 0 and {MAX_PRIORITY}, got {}", p.priority),
            ));
        }
    }
    for (field, value) in [
        ("options.linger_seconds", options.linger_seconds),
        ("options.idle_notify_seconds", options.idle_notify_seconds),
        ("options.idle_revoke_seconds", options.idle_revoke_seconds),
    ] {
        if value > MAX_POLICY_SECONDS {
            return Err(Invalid::new(
                field,
                format!("must be between 0 and {MAX_POLICY_SECONDS}, got {value}"),
            ));
        }
    }
    if options.max_borrow_hours > MAX_BORROW_HOURS {
        return Err(Invalid::new(
            "options.max_borrow_hours",
            format!(
                "must be between 0 and {MAX_BORROW_HOURS}, got {}",
                options.max_borrow_hours
            ),
        ));
    }
    let (notify, revoke) = (options.idle_notify_seconds, options.idle_revoke_seconds);
    if notify > 0 && revoke > 0 && notify >= revoke {
        return Err(Invalid::new(
            "options.idle_notify_seconds",
            format!("must be below idle_revoke_seconds ({revoke}), got {notify}"),
        ));
    }
    Ok(())
}

/// An ACL: each list bounded, each entry a valid name.
pub fn acl(acl: &Acl) -> Result<(), Invalid> {
    for (field, list) in acl.lists() {
        if list.len() > MAX_ACL_ENTRIES {
            return Err(Invalid::new(
                field,
                format!("must hold at most {MAX_ACL_ENTRIES} entries"),
            ));
        }
        for entry in list {
            name(field, entry)?;
        }
    }
    Ok(())
}

/// Whether a `Content-Type` names JSON: `application/json` or an `application/*+json`, with
/// any parameters (the rule axum's `Json` applies, so both servers agree with it).
pub fn is_json_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

/// A request body must be a JSON object. serde's derived structs also accept a JSON array of
/// the fields in order, so without this `[]` would pass as a request whose fields all have
/// defaults (a balance of every product, a product reset to the default policy).
pub fn json_object(body: &[u8]) -> Result<(), Invalid> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err(Invalid::new("body", "must be a JSON object")),
    }
}

/// A query string must percent-decode to UTF-8. The usual decoders replace a bad sequence with
/// U+FFFD, so `?product=%FF` would quietly ask about a product named "\u{FFFD}".
pub fn query_utf8(query: &str) -> Result<(), Invalid> {
    let bytes = query.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    decoded.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                    i += 3;
                    continue;
                }
                _ => decoded.push(b'%'),
            },
            b => decoded.push(b),
        }
        i += 1;
    }
    std::str::from_utf8(&decoded)
        .map(|_| ())
        .map_err(|_| Invalid::new("query", "must percent-decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(name("name", "CAD Suite 2026").is_ok());
        assert!(name("name", "").is_err());
        assert!(name("name", &"x".repeat(129)).is_err());
        assert!(name("name", &"é".repeat(128)).is_ok());
        assert!(name("name", "a\nb").is_err());
        assert!(name("name", " a").is_err());
        assert!(path_name("name", "a/b").is_err());
    }

    #[test]
    fn units_are_bounded() {
        assert!(units("units", 0).is_err());
        assert!(units("units", 1).is_ok());
        assert!(units("units", MAX_UNITS).is_ok());
        assert!(units("units", MAX_UNITS + 1).is_err());
        assert!(units_or_zero("min_units", 0).is_ok());
    }

    #[test]
    fn staleout_must_cover_a_heartbeat() {
        let mut p = Policy::default();
        assert!(policy(&p).is_ok());
        p.staleout_seconds = p.heartbeat_seconds - 1;
        assert_eq!(policy(&p).unwrap_err().field, "staleout_seconds");
    }

    #[test]
    fn queries_decode_to_utf8() {
        assert!(query_utf8("product=caf%C3%A9&since=1d").is_ok());
        assert!(query_utf8("product=%FF").is_err());
        assert!(query_utf8("a=%").is_ok());
        assert!(query_utf8("a=%E2%82").is_err());
    }

    #[test]
    fn bodies_are_json_objects() {
        assert!(json_object(b" {}").is_ok());
        assert!(json_object(b"[]").is_err());
        assert!(json_object(b"").is_err());
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/problem+json"));
        assert!(!is_json_content_type("application/jsonx"));
        assert!(!is_json_content_type("text/plain"));
    }

    #[test]
    fn urls_need_scheme_and_host() {
        assert!(http_url("url", "http://127.0.0.1:7401").is_ok());
        assert!(http_url("url", "https://meter.example.com/").is_ok());
        assert!(http_url("url", "ftp://x").is_err());
        assert!(http_url("url", "http://").is_err());
        assert!(http_url("url", "http://a b").is_err());
    }
}
