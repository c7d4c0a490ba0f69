//! allot's central balancer: the books, the admin API, the scheduler, the moves, the history
//! and the admin CLI. One line per module (and important submodule), so any question is one
//! hop from its answer; the dependencies run downwards, with no circles.
//!
//! - `advice`: the trend advisor's shell (reads history, calls `allot_core::advisor`) and the
//!   autotune task.
//! - `api`: the HTTP API (v1) and its state ([`api::AppState`]); one file per family of routes:
//!   `api/books.rs` (products, entitlements), `api/servers.rs` (servers, limits, token
//!   rotation), `api/balancing.rs` (balance on demand, runs, doctor, explain),
//!   `api/metering.rs` (the metering servers' sync and instant balance), `api/history.rs`,
//!   `api/advice.rs`, `api/settings.rs` (schedule, audit), `api/error.rs` (the one error type),
//!   `api/openapi.rs`, `api/operators.rs`; `api/console/` is the operator's web console (HTML on
//!   its own port), whose changes go through the same handlers.
//! - `operators`: operators (named logins with a role), their argon2 password hashes and the
//!   login throttle.
//! - `auth`: tokens (admin, metering servers) and the token policy (grace limits).
//! - `balance`: the engine ([`balance::Engine`]). **A move is executed** by
//!   `Engine::execute` in `balance/mod.rs`; runs in `balance/run.rs`, instant balances in
//!   `balance/instant.rs`, the plan explained in `balance/explain.rs`, the planner's inputs
//!   in `balance/snapshot.rs`, calls to metering servers in `balance/agent_client.rs`, the
//!   cron loop in [`balance::scheduler`].
//! - `cli`: the command line ([`cli::Cli`], every subcommand); `cli/client.rs` (the HTTP
//!   client), `cli/render.rs` (the one table renderer), `cli/run.rs` (what each command does).
//! - `config`: the `serve`/`migrate` flags; a leaf (it uses only `paths`).
//! - `demo`: `allot-balancer demo`, a whole estate on one laptop.
//! - `history`: history queries, hourly roll-ups and retention.
//! - `leader`: leadership per shard (PostgreSQL advisory locks) and epochs.
//! - `metrics`: Prometheus metrics, one [`metrics::Metrics`] per balancer.
//! - `paths`: default file locations (the data directory).
//! - `schedule`: cron expressions and time zones.
//! - `service`: the `serve` process as a function, [`service::run`] on a given listener.
//! - `store`: the books ([`store::Store`]); `store/sql/` is the SQL both backends share, one
//!   file per family (`books`, `fleet`, `moves`, `runs`, `history`, `settings`), compiled by
//!   [`store::sqlite`] and [`store::postgres`]; `store/reporting.rs` reports database errors
//!   to the service.
#![forbid(unsafe_code)]

pub mod advice;
pub mod api;
pub mod auth;
pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod history;
pub mod leader;
pub mod metrics;
pub mod operators;
pub mod paths;
pub mod schedule;
pub mod service;
pub mod store;
