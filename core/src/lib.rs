//! allot's pure core.
//!
//! Modules: `domain` (the vocabulary), `wire` (JSON shapes), `error` (stable codes), `validate`
//! (edge rules), `openapi` (schemas), `checkout` (the metering server's book), `trigger` (when
//! a metering server asks for units), `demand` (demand signals from the history), `planner`
//! (where every unit should sit), `instant` (what an instant balance does), `advisor`
//! (schedule and buffer recommendations).
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
pub mod instant;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod planner;
pub mod trigger;
pub mod validate;
pub mod wire;

pub use error::ErrorCode;
