//! The JSON shapes of allot's HTTP APIs (v1), shared by servers, clients and the CLI.
//!
//! Requests reject unknown fields so a typo in a field name is an error, not a silently
//! ignored setting. Responses are plain data, tolerant readers may ignore what they don't know.

pub mod agent;
pub mod balancer;
pub mod records;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

/// Deserialises a nested request struct from a JSON object only, for `deserialize_with`.
///
/// serde's derived structs also accept an array of their fields in order, so `"acl": []` would
/// silently mean "no ACL" and `"bounds": [1, 2, 3, 4]` would set bounds nobody named. Request
/// bodies are refused unless they are objects at the edge; this does the same one level down.
pub fn object_only<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
    T::deserialize(serde_json::Value::Object(map)).map_err(D::Error::custom)
}

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
    /// The shards whose products this balancer balances; empty on followers and metering
    /// servers.
    #[serde(default)]
    pub shards: Vec<u32>,
}
