//! allot's metering server (`allot-agent`): local, durable, policy-true checkouts.
//!
//! Every module, one line each, so any flow is one hop away:
//! - [`server`] — [`run`], the router and the shared state around the pure
//!   `allot_core::checkout::Book` that makes every decision;
//! - `server::config` — [`ServerConfig`], the `--products-file` format and the start errors;
//! - `server::auth` — the balancer-token and client-key extractors (SHA-256, constant time);
//! - `server::handlers` — the route table: every handler with its OpenAPI operation;
//! - `server::handlers::clients` — checkout and its queue, heartbeat, checkin, products;
//! - `server::handlers::balancer` — the balancer's calls: status, moves, product definitions;
//! - `server::handlers::meta` — `/healthz` and `/metrics`;
//! - [`server::openapi`] (also [`openapi`]) — the OpenAPI document of the route table, and
//!   the route serving it;
//! - `server::writer` — the group-commit writer: one SQLite transaction per batch, an answer
//!   only once durable;
//! - `server::tasks` — the timer task: staleouts and due trigger re-evaluations;
//! - `server::pull` — the instant-balance trigger's shell and its request to the balancer;
//! - `server::sync` — the periodic sync: products, lease renewal, adoption after a reset;
//! - [`store`] — the SQLite log (WAL, `synchronous=FULL`) the book is rebuilt from at start;
//! - [`balancer`] — the outbound HTTP calls to the balancer (sync, instant balance) and their
//!   settings;
//! - [`clock`] — the wall clock (Unix ms), read in one place, and RFC 3339 for messages;
//! - [`error`] — the API's error enum (stable codes) and its JSON and path extractors;
//! - `idle` — how idle a wrapped command is (its process tree's CPU time), for the idle rules;
//! - [`metrics`] — the Prometheus metrics behind `/metrics`;
//! - [`client`] — the async Rust client and its [`client::Lease`] guard;
//! - [`cli`] — the binary's `run` wrapper and `status` table.
//!
//! Shared with the balancer through `allot_http`: TLS, the JSON body checks, refusal counting
//! and the fault-injection points.
#![forbid(unsafe_code)]

pub mod balancer;
pub mod cli;
pub mod client;
pub mod clock;
pub mod error;
pub mod idle;
pub mod metrics;
pub mod server;
pub mod store;

pub use server::{ServerConfig, openapi, run};
