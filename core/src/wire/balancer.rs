//! The balancer's admin API.

use crate::domain::{Acl, Enforcement, Policy, Seat, ServerState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

fn default_heartbeat() -> u32 {
    crate::domain::DEFAULT_HEARTBEAT_SECONDS
}
fn default_staleout() -> u32 {
    crate::domain::DEFAULT_STALEOUT_SECONDS
}

/// `POST /v1/products`: define a product and its policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// Unique name; used in URLs.
    pub name: String,
    /// Who sells it, for people reading reports.
    #[serde(default)]
    pub publisher: Option<String>,
    /// Which release, for people reading reports.
    #[serde(default)]
    pub version: Option<String>,
    /// What happens when a server has no free unit.
    #[serde(default)]
    pub enforcement: Enforcement,
    /// How checkouts share units.
    #[serde(default)]
    pub seat: Seat,
    /// Heartbeat interval for clients.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
    /// Release a checkout after this long without a heartbeat.
    #[serde(default = "default_staleout")]
    pub staleout_seconds: u32,
    /// Who may check it out.
    #[serde(default)]
    pub acl: Acl,
}

impl CreateProduct {
    /// The policy part of the definition.
    pub fn policy(&self) -> Policy {
        Policy {
            enforcement: self.enforcement,
            seat: self.seat,
            heartbeat_seconds: self.heartbeat_seconds,
            staleout_seconds: self.staleout_seconds,
            acl: self.acl.clone(),
        }
    }
}

/// A product with its books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Unique name.
    pub name: String,
    /// Who sells it.
    pub publisher: Option<String>,
    /// Which release.
    pub version: Option<String>,
    /// The checkout rules.
    pub policy: Policy,
    /// Σ live entitlements.
    pub purchased: u64,
    /// Units held by nobody: purchased − allocated − in transit.
    pub reserve: u64,
    /// Units granted but not yet confirmed by their server.
    pub in_transit: u64,
    /// Σ allocations over servers.
    pub allocated: u64,
    /// When it was defined.
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/products/{product}`: the product and how it is split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductDetail {
    /// The product and its books.
    #[serde(flatten)]
    pub product: Product,
    /// One entry per server holding or configured for the product.
    pub servers: Vec<AllocationView>,
}

/// One (server, product) cell of the books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationView {
    /// The server's name.
    pub server: String,
    /// The server's site.
    pub site: String,
    /// The server's state.
    pub state: ServerState,
    /// Units the server holds.
    pub allocation: u64,
    /// Units in use at the last status read, when one has been made.
    pub in_use: Option<u64>,
    /// Floor the balancer never reclaims below while the server is alive.
    pub min_units: u64,
    /// Free units the server should hold above its demand.
    pub buffer_units: u64,
    /// The last generation the server confirmed.
    pub generation: u64,
}

/// `POST /v1/products/{product}/entitlements`: record a purchase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddEntitlement {
    /// Units purchased.
    pub units: u32,
    /// When the purchase stops counting, if ever.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The order number, contract or note that justifies it.
    #[serde(default)]
    pub reference: Option<String>,
}

/// A purchase record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlement {
    /// Store id, used to remove it.
    pub id: i64,
    /// The product's name.
    pub product: String,
    /// Units purchased.
    pub units: u64,
    /// When it stops counting.
    pub expires_at: Option<DateTime<Utc>>,
    /// Order number or note.
    pub reference: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// Who recorded it.
    pub created_by: String,
}

/// `POST /v1/servers`: register a metering server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterServer {
    /// Unique name; used in URLs.
    pub name: String,
    /// Where the balancer reaches its balancer-facing API.
    pub url: String,
    /// The site or region it serves, for reports and dashboards.
    pub site: String,
}

/// A metering server as the balancer knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// Unique name.
    pub name: String,
    /// Its balancer-facing URL.
    pub url: String,
    /// Its site.
    pub site: String,
    /// Active, draining or lost.
    pub state: ServerState,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When the balancer last heard from it.
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// The answer to a registration: the only time the server's token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredServer {
    /// The new server.
    #[serde(flatten)]
    pub server: Server,
    /// The server's secret; stored hashed, so it cannot be shown again.
    pub token: String,
}

/// `PUT /v1/servers/{server}/products/{product}`: the floor and the buffer of one cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAllocation {
    /// Floor the balancer never reclaims below while the server is alive.
    pub min_units: u32,
    /// Free units the server should hold above its demand.
    pub buffer_units: u32,
}

/// `PUT /v1/schedule`: when scheduled balance runs happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSchedule {
    /// A standard 5- or 6-field cron expression.
    pub cron: String,
    /// IANA time zone the expression is read in; UTC when absent.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// `GET /v1/schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The cron expression.
    pub cron: String,
    /// The IANA time zone it is read in.
    pub timezone: String,
    /// The next five run times, so an operator can check the expression means what they think.
    pub next_runs: Vec<DateTime<Utc>>,
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who (`admin`, a server's name, `balancer`).
    pub actor: String,
    /// What was done, e.g. `entitlement.add`.
    pub action: String,
    /// What it was done to, e.g. a product's name.
    pub target: String,
    /// The state before, when there was one.
    pub before: Option<serde_json::Value>,
    /// The state after, when there is one.
    pub after: Option<serde_json::Value>,
}

/// A list answer: `{"items": [...]}` so lists can grow paging fields later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct List<T> {
    /// The entries.
    pub items: Vec<T>,
}
