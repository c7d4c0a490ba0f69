//! allot's pure core: no clock, no I/O, no randomness — every decision of allot as a function.
//!
//! - `domain` — the vocabulary of DESIGN.md as types (products, servers, policies, moves).
//! - `wire` — the JSON shapes of the HTTP APIs (`wire::agent`, `wire::balancer`,
//!   `wire::records`).
//! - `error` — the stable error codes both servers answer with.
//! - `validate` — the edge rules every request is checked against.
//! - `openapi` — the schemas of both APIs (feature `openapi`).
//! - `checkout` — the metering server's book: `rules` (ACL, seat, staleout), `types`, the book.
//! - `trigger` — when a metering server asks the balancer for units, and how many are urgent.
//! - `demand` — demand signals (level, window peak, forecast) from the history.
//! - `planner` — where every unit should sit: `types`, the per-product flow, the water-fill.
//! - `instant` — what an instant balance grants and reclaims.
//! - `advisor` — schedule and buffer recommendations from the history.
//! - `expiry` — which servers retire how many units of an expired entitlement.
//! - `usage` — concurrency over a window from usage records, and the renewal suggestion.
//! - `shard` — which shard a product belongs to, and the fence a shard leader writes with.
//!
//! Everything here is deterministic and free of I/O: the vocabulary of DESIGN.md as types
//! ([`domain`]), the JSON shapes of the HTTP APIs ([`wire`]), the stable error codes
//! ([`error`]), the edge validation rules ([`validate`]) and the decision makers that the
//! balancer and the metering servers call with their inputs (including `now`) as arguments.
//! Shells — stores, HTTP handlers, schedulers — translate and persist around this crate.
#![forbid(unsafe_code)]

pub mod advisor;
pub mod checkout;
pub mod demand;
pub mod domain;
pub mod error;
pub mod expiry;
pub mod instant;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod planner;
pub mod shard;
pub mod trigger;
pub mod usage;
pub mod validate;
pub mod wire;

pub use error::ErrorCode;
