//! The service's configuration: `serve` and `migrate` flags, each with an `ALLOT_…` twin.
//!
//! A leaf but for `paths` (itself a leaf): plain values, parsed by clap, that the service turns
//! into its parts (the engine's settings, history retention, the metrics cap: see `service`).
//! The admin CLI's commands live with the CLI. Nothing here can pull the service, the API or
//! the CLI into a circle.

use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people at a terminal.
    Human,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Per-(server, product) metric series exported by default: 200 servers × 50 products.
pub const DEFAULT_METRICS_MAX_CELLS: usize = 10_000;

/// Where the books live.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Files of this process (the SQLite database, the generated admin token).
    #[arg(long, env = "ALLOT_DATA_DIR", default_value_os_t = crate::paths::default_data_dir())]
    pub data_dir: PathBuf,
    /// `postgres://…` for PostgreSQL; absent → SQLite `allot.db` in the data directory.
    #[arg(long, env = "ALLOT_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// `allot-balancer serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address and port of the HTTP API (bound by `service::serve`; `service::run` is handed a
    /// listener instead).
    #[arg(long, env = "ALLOT_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Address and port of the operator's web console (its own port, same TLS as the API), or
    /// `off`.
    #[arg(long, env = "ALLOT_CONSOLE_LISTEN", default_value = "127.0.0.1:7410",
          value_parser = parse_console_listen)]
    pub console_listen: ConsoleListen,
    /// The books.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The admin token; absent → read from, or generated into, `<data-dir>/admin-token`.
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Serve HTTPS with this certificate and key.
    #[command(flatten)]
    pub tls: allot_http::tls::ServerTlsArgs,
    /// CA certificates trusted for HTTPS calls to metering servers.
    #[command(flatten)]
    pub ca: allot_http::tls::CaArgs,
    /// The URL other balancers' followers send clients to while this one leads (default
    /// `http://<listen>`, `https://` with TLS).
    #[arg(long, env = "ALLOT_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// The shards this balancer competes for at once, e.g. `0,2` (default: every shard). Any
    /// other shard it takes over only after that shard has been without a leader for
    /// `--shard-grace-seconds`. Set the count with `allot-balancer shards --count N`.
    #[arg(long, env = "ALLOT_LEAD_SHARDS", value_delimiter = ',',
        value_parser = clap::value_parser!(u32).range(0..i64::from(allot_core::shard::MAX_SHARDS)))]
    pub lead_shards: Vec<u32>,
    /// How long a shard this balancer does not prefer must be without a leader before it takes
    /// the shard over.
    #[arg(long, env = "ALLOT_SHARD_GRACE_SECONDS", default_value_t = 30)]
    pub shard_grace_seconds: u64,
    /// A metering server unheard of for this long is declared lost and its units reclaimed.
    #[arg(long, env = "ALLOT_LEASE_SECONDS", default_value_t = 24 * 3600)]
    pub lease_seconds: u64,
    /// Servers stop granting this long before the balancer's lease ends (clock-skew margin).
    #[arg(long, env = "ALLOT_LEASE_MARGIN_SECONDS", default_value_t = 300)]
    pub lease_margin_seconds: u64,
    /// Timeout of each call to a metering server, in milliseconds.
    #[arg(long, env = "ALLOT_CALL_TIMEOUT_MS", default_value_t = 5000)]
    pub call_timeout_ms: u64,
    /// Most calls to metering servers in flight at once during a run.
    #[arg(long, env = "ALLOT_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds units granted to a server are held: no run takes them back (unless a real
    /// shortage elsewhere needs them) and no instant balance reclaims from that server.
    #[arg(long, env = "ALLOT_HOLD_SECONDS", default_value_t = allot_core::planner::DEFAULT_HOLD_MS / 1000)]
    pub hold_seconds: u64,
    /// Days raw usage samples are kept (then only their hourly roll-ups). The demand forecast
    /// reads the same hour last week, so keep at least 8.
    #[arg(long, env = "ALLOT_HISTORY_RAW_DAYS", default_value_t = 30)]
    pub history_raw_days: u64,
    /// Days hourly roll-ups are kept.
    #[arg(long, env = "ALLOT_HISTORY_HOURLY_DAYS", default_value_t = 400)]
    pub history_hourly_days: u64,
    /// Days usage and denial records are kept (a year of reports and a renewal's margin).
    #[arg(long, env = "ALLOT_RECORDS_DAYS", default_value_t = 400)]
    pub records_days: u64,
    /// After `server rotate-token`, seconds a server's old token keeps working unless the
    /// rotation names its own grace (the server presenting its new token ends it sooner).
    #[arg(long, env = "ALLOT_TOKEN_GRACE_SECONDS", default_value_t = 24 * 3600,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(allot_core::validate::MAX_TOKEN_GRACE_SECONDS)))]
    pub token_grace_seconds: u32,
    /// Most per-(server, product) metric series exported; beyond it they are left out, so a
    /// large estate cannot overload Prometheus.
    #[arg(long, env = "ALLOT_METRICS_MAX_CELLS", default_value_t = DEFAULT_METRICS_MAX_CELLS)]
    pub metrics_max_cells: usize,
}

/// Where the console listens: an address, or nowhere (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleListen(pub Option<SocketAddr>);

/// `--console-listen`: `off` or an address and port.
fn parse_console_listen(text: &str) -> Result<ConsoleListen, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(ConsoleListen(None));
    }
    text.parse()
        .map(|addr| ConsoleListen(Some(addr)))
        .map_err(|e| format!("expected `off` or an address:port: {e}"))
}
