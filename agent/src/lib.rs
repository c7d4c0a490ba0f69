//! allot's metering server (`allot-agent`): local, durable, policy-true checkouts.
//!
//! - [`server`]: the HTTP server (`run(listener, config, shutdown)`), its group-commit writer
//!   and staleout task, around the pure `allot_core::checkout::Book` that makes every decision.
//! - [`store`]: the SQLite log (WAL, `synchronous=FULL`) the book is rebuilt from at start.
//! - [`balancer`]: outbound calls to the balancer (sync, instant balance) and their settings.
//! - [`fault`]: crash points for the fault-injection tests.
//! - [`client`]: the async Rust client and its [`client::Lease`] guard.
//! - [`cli`]: the `run` wrapper and the `status` table of the binary.
//! - [`error`], [`metrics`], [`openapi`]: the API's error shape, `/metrics` and its document.
#![forbid(unsafe_code)]

pub mod balancer;
pub mod cli;
pub mod client;
pub mod error;
pub mod fault;
pub mod metrics;
pub mod openapi;
pub mod server;
pub mod store;

pub use server::{ServerConfig, run};
