//! allot's central balancer: the books ([`store`]), the admin API ([`api`]), tokens
//! ([`auth`]), the balance schedule ([`schedule`]), configuration ([`config`]) and the admin
//! CLI ([`cli`]).
//!
//! Every module: `advice` (the trend advisor's shell), `api` (HTTP routes), `auth` (tokens),
//! `balance` (the engine: runs, instant balances, explain, reconciliation, doctor), `cli`,
//! `config`, `demo`, `history` (roll-ups and
//! retention), `leader` (leadership and epochs), `metrics` (Prometheus), `schedule` (cron),
//! `service` (the `serve` process), `store` (the books in SQL).
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
pub mod schedule;
pub mod service;
pub mod store;
