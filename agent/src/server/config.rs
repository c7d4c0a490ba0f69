//! What the metering server is started with: its settings ([`ServerConfig`]), the
//! `--products-file` format, and why it could not start ([`ServeError`]).

use super::BalancerConfig;
use crate::store::StoreError;
use allot_core::checkout::Limits;
use allot_core::wire::agent::ProductDefinition;
use serde::Deserialize;
use std::path::PathBuf;

/// A product from `--products-file`: its policy and, optionally, its allocation (standalone
/// use, without a balancer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalProduct {
    /// The product's name.
    pub product: String,
    /// Units this server holds; absent → left as the store has it (the balancer's moves).
    #[serde(default)]
    pub allocation: Option<u32>,
    /// The policy.
    pub policy: ProductDefinition,
}

/// The `--products-file` format: `{"products": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductsFile {
    /// Product definitions applied at start.
    pub products: Vec<LocalProduct>,
}

/// Everything the server needs besides its listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where `agent.db` lives.
    pub data_dir: PathBuf,
    /// The server's name in status reports.
    pub name: String,
    /// The token the balancer presents; `None` disables the balancer-facing API (401).
    pub token: Option<String>,
    /// The key clients present; `None` lets any client on the network check out.
    pub client_key: Option<String>,
    /// Products applied at start (from `--products-file`).
    pub products: Vec<LocalProduct>,
    /// Caps on live checkouts and waiting clients.
    pub limits: Limits,
    /// The balancer this server syncs with, asks for instant balances and holds a lease from;
    /// `None`: standalone (no lease, no instant balance).
    pub balancer: Option<BalancerConfig>,
    /// Serve HTTPS with this certificate; `None`: plain HTTP.
    pub tls: Option<allot_http::tls::ServerTls>,
    /// Hosts (or host:port) a callback's webhook may name; empty: long-polled callbacks only.
    pub callback_hosts: Vec<String>,
}

impl ServerConfig {
    /// A configuration with defaults, for tests and embedding.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            name: "agent".to_owned(),
            token: None,
            client_key: None,
            products: Vec::new(),
            limits: Limits::default(),
            balancer: None,
            tls: None,
            callback_hosts: Vec::new(),
        }
    }
}

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened, loaded or closed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A configured product is invalid.
    #[error("products file: {0}")]
    Config(String),
    /// The balancer settings are unusable.
    #[error("balancer: {0}")]
    Balancer(String),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}
