//! The JSON shapes of allot's HTTP APIs (v1), shared by servers, clients and the CLI.
//!
//! Requests reject unknown fields so a typo in a field name is an error, not a silently
//! ignored setting. Responses are plain data, tolerant readers may ignore what they don't know.

pub mod agent;
pub mod balancer;

use serde::{Deserialize, Serialize};

/// The answer of `GET /healthz` on both processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// `ok` while the process serves requests.
    pub status: String,
    /// Whether this process currently leads (balancer); metering servers always say `false`.
    pub leader: bool,
    /// The crate version of the process.
    pub version: String,
}
