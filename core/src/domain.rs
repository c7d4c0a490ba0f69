//! The vocabulary of DESIGN.md as types: products and their policies, servers, moves and runs.
//!
//! Units are counted as `u32` (a product never has more than a million units per request and a
//! few billion in total); stores widen them to `BIGINT`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a metering server does when a checkout finds no free unit in its allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Deny (after trying an instant balance) — the licence terms are strict.
    #[default]
    HardStop,
    /// Grant beyond the allocation, flag the checkout as overdraft and raise an event.
    SoftStop,
    /// Grant and only count; for site licences where usage is merely measured.
    NoStop,
}

/// How checkouts consume units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Seat {
    /// Every checkout takes its own units.
    #[default]
    Concurrent,
    /// Repeated launches by one user on one host share one seat.
    PerUserHost,
    /// All launches by one user, on any host, share one seat.
    PerUser,
}

/// Who may check a product out. Deny lists win over allow lists; an empty allow list allows all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// Users allowed; empty means everyone not denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_users: Vec<String>,
    /// Users refused even if allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_users: Vec<String>,
    /// Hosts allowed; empty means every host not denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Hosts refused even if allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_hosts: Vec<String>,
    /// Groups allowed (a client states its groups); empty means every group not denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_groups: Vec<String>,
    /// Groups refused even if allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_groups: Vec<String>,
}

impl Acl {
    /// The lists' names on the wire.
    pub const FIELDS: [&'static str; 6] = [
        "allow_users",
        "deny_users",
        "allow_hosts",
        "deny_hosts",
        "allow_groups",
        "deny_groups",
    ];

    /// Whether the ACL restricts nobody, so it can be skipped in displays.
    pub fn is_open(&self) -> bool {
        *self == Acl::default()
    }

    /// Every list with its field name, so validation and display walk them uniformly.
    pub fn lists(&self) -> [(&'static str, &[String]); 6] {
        [
            ("acl.allow_users", &self.allow_users),
            ("acl.deny_users", &self.deny_users),
            ("acl.allow_hosts", &self.allow_hosts),
            ("acl.deny_hosts", &self.deny_hosts),
            ("acl.allow_groups", &self.allow_groups),
            ("acl.deny_groups", &self.deny_groups),
        ]
    }
}

/// The rules a metering server applies to a product's checkouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Policy {
    /// What happens when no unit is free.
    pub enforcement: Enforcement,
    /// How checkouts share units.
    pub seat: Seat,
    /// How often a client should heartbeat its checkout.
    pub heartbeat_seconds: u32,
    /// How long without a heartbeat before a checkout is released (staleout).
    pub staleout_seconds: u32,
    /// Who may check the product out.
    #[serde(
        default,
        skip_serializing_if = "Acl::is_open",
        deserialize_with = "tolerant_acl"
    )]
    pub acl: Acl,
    /// The options-file rules: per user/group/host caps and reservations, linger, borrowing,
    /// idle reclaim and queue priorities.
    #[serde(
        default,
        skip_serializing_if = "Options::is_default",
        deserialize_with = "tolerant_options"
    )]
    pub options: Options,
}

/// Whom a limit or a reservation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One user (the checkout's `user`).
    User,
    /// The members of a group (a checkout counts in every group its client states).
    Group,
    /// One host.
    Host,
}

/// FlexNet's MAX: the most units one user, the members of one group, or one host may hold at
/// once at a metering server. A cap is per server: the balancer moves units between servers,
/// not holders, so a user working at two sites may hold `max` at each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Whom it caps.
    pub scope: Scope,
    /// The user, group or host name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: String,
    /// Most units held at once (0 refuses every checkout of that scope).
    #[cfg_attr(feature = "openapi", schema(maximum = 1_000_000))]
    pub max: u32,
}

/// FlexNet's RESERVE: units of each server's allocation kept for one user, group or host.
/// Others are refused those units while they are free; the balancer counts them as needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// Whom the units are kept for.
    pub scope: Scope,
    /// The user, group or host name.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: String,
    /// Units kept.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub units: u32,
}

/// The wait-queue order of a group's members: higher first, first come first served within
/// one priority (SMS 2.0's callback priorities). Groups not listed have priority 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupPriority {
    /// The group.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub group: String,
    /// Its priority, 0–1000; a client in several groups takes the highest.
    #[cfg_attr(feature = "openapi", schema(maximum = 1000))]
    pub priority: u32,
}

/// A product's options-file rules. Every field defaults to "off", so a policy without them
/// behaves exactly as before they existed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Per user, group or host caps (FlexNet MAX).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Units kept for a user, group or host (FlexNet RESERVE).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<Reservation>,
    /// After a checkin the seat stays held for its user and host this long; a relaunch in
    /// that time reuses it (FlexNet LINGER). 0: off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub linger_seconds: u32,
    /// Whether a waiting client may take a lingering unit before its linger is up (otherwise
    /// lingering units are held to the end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linger_yields: bool,
    /// The longest a unit may be borrowed for offline use, in hours (FlexNet
    /// MAX_BORROW_HOURS). 0: borrowing is not allowed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_borrow_hours: u32,
    /// A client idle this long hears a notice in its heartbeat answer. 0: off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub idle_notify_seconds: u32,
    /// A client idle this long loses its checkout (FlexNet TIMEOUT), recorded as ended by
    /// `idle`. 0: off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub idle_revoke_seconds: u32,
    /// Wait-queue priorities per group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priorities: Vec<GroupPriority>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Options {
    /// The options' names on the wire.
    pub const FIELDS: [&'static str; 8] = [
        "limits",
        "reservations",
        "linger_seconds",
        "linger_yields",
        "max_borrow_hours",
        "idle_notify_seconds",
        "idle_revoke_seconds",
        "priorities",
    ];

    /// Whether every option is off, so it can be left out of answers and displays.
    pub fn is_default(&self) -> bool {
        *self == Options::default()
    }

    /// The queue priority of a client stating `groups`: the highest of its groups', else 0.
    pub fn priority(&self, groups: &[String]) -> u32 {
        self.priorities
            .iter()
            .filter(|p| groups.contains(&p.group))
            .map(|p| p.priority)
            .max()
            .unwrap_or(0)
    }
}

/// Reads the options of a [`Policy`] in an answer: like [`tolerant_acl`], an option this
/// version does not know is ignored only while it is off (empty, 0 or false), and refused
/// otherwise, so an older metering server never silently drops a rule it cannot enforce.
fn tolerant_options<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Options, D::Error> {
    use serde::de::Error as _;
    let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
    if let Some((rule, _)) = map
        .iter()
        .find(|(k, v)| !Options::FIELDS.contains(&k.as_str()) && !is_off(v))
    {
        return Err(D::Error::custom(format!(
            "options.{rule}: an option this metering server cannot enforce; upgrade it before using the option"
        )));
    }
    map.retain(|k, _| Options::FIELDS.contains(&k.as_str()));
    Options::deserialize(serde_json::Value::Object(map)).map_err(D::Error::custom)
}

/// Whether a JSON value says "off": null, empty, zero or false.
fn is_off(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Bool(b) => !b,
        serde_json::Value::Number(n) => n.as_f64() == Some(0.0),
        serde_json::Value::Array(items) => items.is_empty(),
        serde_json::Value::Object(fields) => fields.is_empty(),
        serde_json::Value::String(_) => false,
    }
}

/// Reads the ACL of a [`Policy`] — which travels in answers (products, a sync) — ignoring
/// *empty* lists this version does not know, so a newer balancer's answer shape never breaks an
/// older metering server's sync. A rule this version cannot enforce is refused, never dropped:
/// dropping it would grant checkouts the policy denies (fail open); refusing fails the sync
/// loudly, the server keeps its last policy and, past its lease, stops granting (fail closed).
/// Requests stay strict: [`Acl`] itself refuses unknown fields.
fn tolerant_acl<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Acl, D::Error> {
    use serde::de::Error as _;
    let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
    if let Some((rule, _)) = map
        .iter()
        .find(|(k, v)| !Acl::FIELDS.contains(&k.as_str()) && !is_off(v))
    {
        return Err(D::Error::custom(format!(
            "acl.{rule}: a rule this metering server cannot enforce; upgrade it before using the rule"
        )));
    }
    map.retain(|k, _| Acl::FIELDS.contains(&k.as_str()));
    Acl::deserialize(serde_json::Value::Object(map)).map_err(D::Error::custom)
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            enforcement: Enforcement::HardStop,
            seat: Seat::Concurrent,
            heartbeat_seconds: DEFAULT_HEARTBEAT_SECONDS,
            staleout_seconds: DEFAULT_STALEOUT_SECONDS,
            acl: Acl::default(),
            options: Options::default(),
        }
    }
}

/// Default heartbeat interval: once a minute keeps the load of 100,000 checkouts modest.
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 60;
/// Default staleout: five missed heartbeats, so a brief network hiccup never frees a seat.
pub const DEFAULT_STALEOUT_SECONDS: u32 = 300;

/// Lifecycle of a metering server as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Takes part in balancing.
    Active,
    /// Being emptied: the planner targets zero above in-use and ignores its minimums.
    Draining,
    /// Unheard of beyond its lease; its units have returned to the reserve.
    Lost,
}

/// Direction of a move between a server and the reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// Server → reserve. Only free units are ever released.
    Release,
    /// Reserve → server. The units travel through in-transit until the server confirms.
    Grant,
    /// Server → out of the estate: an expired entitlement's units leave `purchased`. Free units
    /// go first; the server may be left with fewer units than it has in use, and then grants
    /// nothing new until enough are checked in (units in use are never taken from a client).
    Retire,
}

/// Where a move stands in the move log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// Logged before it is sent; a grant's units are already in transit.
    Planned,
    /// Confirmed by the server and booked.
    Applied,
    /// Given up; a grant's in-transit units went back to the reserve.
    Abandoned,
}

/// What started a balance run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RunTrigger {
    /// The cron schedule.
    Scheduled,
    /// A metering server ran dry and asked.
    Instant,
    /// An operator asked (`POST /v1/balance`).
    Manual,
    /// Units the balancer took back outside any plan: a lost server's (back to the reserve)
    /// or an expired entitlement's (`retire` moves, out of the estate).
    Reclaim,
}

macro_rules! wire_enum_text {
    ($($ty:ty { $($variant:ident = $text:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// The name used on the wire, in the store and on the command line.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!(
                        concat!("unknown ", stringify!($ty), " {:?}; expected one of: ", $($text, " "),+),
                        s
                    )),
                }
            }
        }
    )+};
}

/// The same text forms for the wire enums of other modules (`wire::records`).
pub(crate) use wire_enum_text;

wire_enum_text! {
    Enforcement { HardStop = "hard_stop", SoftStop = "soft_stop", NoStop = "no_stop" }
    Seat { Concurrent = "concurrent", PerUserHost = "per_user_host", PerUser = "per_user" }
    ServerState { Active = "active", Draining = "draining", Lost = "lost" }
    MoveKind { Release = "release", Grant = "grant", Retire = "retire" }
    MoveState { Planned = "planned", Applied = "applied", Abandoned = "abandoned" }
    RunTrigger { Scheduled = "scheduled", Instant = "instant", Manual = "manual", Reclaim = "reclaim" }
    Scope { User = "user", Group = "group", Host = "host" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_fields_name_every_list() {
        let full = Acl {
            allow_users: vec!["a".into()],
            deny_users: vec!["a".into()],
            allow_hosts: vec!["a".into()],
            deny_hosts: vec!["a".into()],
            allow_groups: vec!["a".into()],
            deny_groups: vec!["a".into()],
        };
        let json = serde_json::to_value(&full).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut fields = Acl::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
    }

    #[test]
    fn a_policy_in_an_answer_ignores_empty_acl_lists_it_does_not_know_and_refuses_rules() {
        let policy = |acl: serde_json::Value| {
            serde_json::from_value::<Policy>(serde_json::json!({
                "enforcement": "hard_stop", "seat": "concurrent", "heartbeat_seconds": 60,
                "staleout_seconds": 300, "acl": acl
            }))
        };
        let read = policy(serde_json::json!({"allow_users": ["ann"], "allow_sites": []})).unwrap();
        assert_eq!(read.acl.allow_users, ["ann"]);
        // A rule it cannot enforce is never silently dropped (that would fail open).
        let refused = policy(serde_json::json!({"allow_users": ["ann"], "deny_sites": ["x"]}));
        assert!(refused.unwrap_err().to_string().contains("acl.deny_sites"));
        assert!(serde_json::from_str::<Acl>(r#"{"allow_sites": []}"#).is_err());
    }

    #[test]
    fn text_form_round_trips_and_matches_serde() {
        for e in [
            Enforcement::HardStop,
            Enforcement::SoftStop,
            Enforcement::NoStop,
        ] {
            assert_eq!(e.as_str().parse::<Enforcement>().unwrap(), e);
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{e}\""));
        }
        for s in [Seat::Concurrent, Seat::PerUserHost, Seat::PerUser] {
            assert_eq!(s.as_str().parse::<Seat>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("hardstop".parse::<Enforcement>().is_err());
    }
}
