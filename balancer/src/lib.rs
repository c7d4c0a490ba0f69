//! allot's central balancer: the books ([`store`]), the admin API ([`api`]), tokens
//! ([`auth`]), the balance schedule ([`schedule`]), configuration ([`config`]) and the admin
//! CLI ([`cli`]).
#![forbid(unsafe_code)]

pub mod advice;
pub mod api;
pub mod auth;
pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fault;
pub mod history;
pub mod leader;
pub mod metrics;
pub mod schedule;
pub mod service;
pub mod store;
