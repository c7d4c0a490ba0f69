//! Command-line and environment configuration. Every flag has an `ALLOT_…` twin.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// allot's central balancer and its admin CLI.
#[derive(Debug, Parser)]
#[command(name = "allot-balancer", version, about)]
pub struct Cli {
    /// Log format of the service.
    #[arg(long, env = "ALLOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people at a terminal.
    Human,
    /// One JSON object a line, for log collectors.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the balancer: HTTP API and scheduler.
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(StoreArgs),
    /// Products: add, list, show.
    #[command(subcommand)]
    Product(crate::cli::ProductCommand),
    /// Purchases: add, list, remove.
    #[command(subcommand)]
    Entitlement(crate::cli::EntitlementCommand),
    /// Metering servers: add, list, drain, remove.
    #[command(subcommand)]
    Server(crate::cli::ServerCommand),
    /// Per (server, product) floors and buffers.
    #[command(subcommand)]
    Allocation(crate::cli::AllocationCommand),
    /// The balance schedule.
    #[command(subcommand)]
    Schedule(crate::cli::ScheduleCommand),
    /// The audit log, newest first.
    Audit(crate::cli::AuditArgs),
    /// Run a balance now and print its moves.
    Balance(crate::cli::BalanceArgs),
    /// Balance runs: list, show.
    #[command(subcommand)]
    Runs(crate::cli::RunsCommand),
    /// Compare the books with every server; exits non-zero on any discrepancy.
    Doctor(crate::cli::DoctorArgs),
    /// What a run would decide for a product now, and the rule behind each server's target.
    Explain(crate::cli::ExplainArgs),
    /// The advisor's schedule and buffer recommendations; `--apply` applies them.
    Advise(crate::cli::AdviseArgs),
    /// The opt-in autotune setting.
    #[command(subcommand)]
    Autotune(crate::cli::AutotuneCommand),
    /// Usage history as sparklines, CSV or JSON.
    History(crate::cli::HistoryArgs),
    /// A balancer, three metering servers and simulated users over a compressed day.
    Demo(crate::demo::DemoArgs),
    /// Print the API's OpenAPI document (as served at /v1/openapi.json) and exit; this is how
    /// docs/openapi/balancer.json is written.
    Openapi,
}

/// Where the books live.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Files of this process (the SQLite database, the generated admin token).
    #[arg(long, env = "ALLOT_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// `postgres://…` for PostgreSQL; absent → SQLite `allot.db` in the data directory.
    #[arg(long, env = "ALLOT_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// `allot-balancer serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address and port of the HTTP API.
    #[arg(long, env = "ALLOT_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
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
    /// After `server rotate-token`, seconds a server's old token keeps working unless the
    /// rotation names its own grace (the server presenting its new token ends it sooner).
    #[arg(long, env = "ALLOT_TOKEN_GRACE_SECONDS", default_value_t = 24 * 3600,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_TOKEN_GRACE_SECONDS)))]
    pub token_grace_seconds: u32,
    /// Most per-(server, product) metric series exported; beyond it they are left out, so a
    /// large estate cannot overload Prometheus.
    #[arg(long, env = "ALLOT_METRICS_MAX_CELLS", default_value_t = crate::metrics::DEFAULT_MAX_CELLS)]
    pub metrics_max_cells: usize,
}

impl ServeArgs {
    /// How long history is kept.
    pub fn retention(&self) -> crate::history::Retention {
        crate::history::Retention {
            raw: std::time::Duration::from_secs(self.history_raw_days.max(1) * 86_400),
            hourly: std::time::Duration::from_secs(self.history_hourly_days.max(1) * 86_400),
        }
    }

    /// The balancing engine's settings; `trust` holds the CA certificates its calls to metering
    /// servers accept.
    pub fn engine_config(&self, trust: allot_http::tls::Trust) -> crate::balance::EngineConfig {
        crate::balance::EngineConfig {
            trust,
            call_timeout: std::time::Duration::from_millis(self.call_timeout_ms.max(1)),
            concurrency: self.concurrency.max(1),
            lease: std::time::Duration::from_secs(self.lease_seconds.max(1)),
            lease_margin: std::time::Duration::from_secs(self.lease_margin_seconds),
            hold: std::time::Duration::from_secs(self.hold_seconds),
            ..crate::balance::EngineConfig::default()
        }
    }
}

pub use allot_core::validate::MAX_TOKEN_GRACE_SECONDS;

/// The data directory a laptop user expects: `$XDG_DATA_HOME/allot/balancer`, else
/// `~/.local/share/allot/balancer`, else `./allot-data`.
pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    match base {
        Some(base) => base.join("allot").join("balancer"),
        None => PathBuf::from("allot-data"),
    }
}
