//! The command line of `allot-balancer`: the parser ([`Cli`]), every subcommand and its
//! arguments. The admin subcommands talk to a balancer's HTTP API (never to its database), with
//! human tables by default and the API's JSON with `--json`.
//!
//! - `client`: [`AdminClient`], the HTTP client of the API;
//! - `render`: the one table renderer every listing uses, and the other human output;
//! - `run`: what each admin subcommand does (its `run` method).
//!
//! `serve` and `migrate` take the service's configuration ([`crate::config`]); `demo` runs the
//! `demo` module, which uses this one (not the other way round).

mod client;
mod operators;
pub(crate) use client::segment;
pub use operators::OperatorCommand;
mod render;
mod run;

pub use client::AdminClient;

use crate::auth::MAX_TOKEN_GRACE_SECONDS;
use crate::config::{LogFormat, ServeArgs, StoreArgs};
use crate::paths::default_data_dir;
use allot_core::domain::{Enforcement, GroupPriority, Limit, Options, Reservation, Scope, Seat};
use clap::{Args, Parser, Subcommand};
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

/// `allot-balancer shards`.
#[derive(Debug, Args)]
pub struct ShardsArgs {
    /// The database to read or change.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Shard the products this many ways (1 to 64); every shard gets a new epoch and no leader.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(allot_core::shard::MAX_SHARDS)))]
    pub count: Option<u32>,
    /// Who the audit log names for a new count.
    #[arg(long, default_value = "cli")]
    pub actor: String,
}

impl ShardsArgs {
    /// Sets the count when asked, then prints every shard and its leader, on the `store` the
    /// binary opened from [`ShardsArgs::store`].
    pub async fn run(self, store: std::sync::Arc<dyn crate::store::Store>) -> anyhow::Result<()> {
        if let Some(count) = self.count {
            store.set_shard_count(&self.actor, count).await?;
        }
        let shards = store.shard_leaders().await?;
        store.close().await;
        println!("{}", render::table(&shards));
        Ok(())
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the balancer: HTTP API and scheduler.
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(StoreArgs),
    /// Shards: each shard's leader, or `--count N` to shard the products N ways (straight on
    /// the database, like `migrate`; every balancer then competes for the shards anew).
    Shards(ShardsArgs),
    /// Products: add, list, show.
    #[command(subcommand)]
    Product(ProductCommand),
    /// Purchases: add, list, remove.
    #[command(subcommand)]
    Entitlement(EntitlementCommand),
    /// Metering servers: add, list, drain, remove.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Per (server, product) floors and buffers.
    #[command(subcommand)]
    Allocation(AllocationCommand),
    /// The balance schedule.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// The audit log, newest first.
    Audit(AuditArgs),
    /// Who holds what: every live checkout and waiting client of the estate, lmstat-style.
    /// Servers that do not answer are named, never silently left out.
    Checkouts(CheckoutsArgs),
    /// Force-release a checkout by its id (`co_…`, from `checkouts`): its units free at once,
    /// its holder is told `license_revoked`; audited with the reason.
    Revoke(RevokeArgs),
    /// Operators: people who log in to the console (or call the API with HTTP Basic) under
    /// their own name, as `admin` or `viewer`.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Usage per user, group, host, server, site or product over a window: checkouts, hours,
    /// peak concurrent, true and false denials (for chargeback).
    Usage(UsageArgs),
    /// Per product, purchased against peak, 95th percentile and mean use, hours at the cap,
    /// denials and units never used — and what that suggests at renewal.
    Renewal(RenewalArgs),
    /// Run a balance now and print its moves.
    Balance(BalanceArgs),
    /// Balance runs: list, show.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Compare the books with every server; exits non-zero on any discrepancy.
    Doctor(DoctorArgs),
    /// What a run would decide for a product now, and the rule behind each server's target.
    Explain(ExplainArgs),
    /// The advisor's schedule and buffer recommendations; `--apply` applies them.
    Advise(AdviseArgs),
    /// The opt-in autotune setting.
    #[command(subcommand)]
    Autotune(AutotuneCommand),
    /// Usage history as sparklines, CSV or JSON.
    History(HistoryArgs),
    /// A balancer, three metering servers and simulated users over a compressed day.
    Demo(DemoArgs),
    /// Print the API's OpenAPI document (as served at /v1/openapi.json) and exit; this is how
    /// docs/openapi/balancer.json is written.
    Openapi,
}

/// `allot-balancer demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_seconds: Option<u64>,
    /// Print each frame below the previous one instead of redrawing the screen.
    #[arg(long)]
    pub no_clear: bool,
    /// The `allot-agent` binary (default: next to this executable).
    #[arg(long, env = "ALLOT_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
    /// The demo balancer's admin token, so other terminals can run the admin CLI against it
    /// (`allot-balancer history`, `runs list`, `advise`); a fresh one when absent.
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// How to reach the balancer.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The balancer's URL.
    #[arg(long, env = "ALLOT_URL", default_value = "http://127.0.0.1:7400")]
    pub url: String,
    /// The admin token; absent → `<data-dir>/admin-token` of a balancer on this machine.
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Act as this operator (HTTP Basic, password from `ALLOT_OPERATOR_PASSWORD`) instead of
    /// the admin token, so the audit log names you.
    #[arg(long, env = "ALLOT_OPERATOR")]
    pub operator: Option<String>,
    /// Where a local balancer keeps its admin token.
    #[arg(long, env = "ALLOT_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, env = "ALLOT_JSON")]
    pub json: bool,
    /// CA certificates trusted for an `https://` balancer URL.
    #[command(flatten)]
    pub ca: allot_http::tls::CaArgs,
}

/// `allot-balancer product …`.
#[derive(Debug, Subcommand)]
pub enum ProductCommand {
    /// Define a product and its policy.
    Add {
        /// Unique name.
        name: String,
        /// Who sells it.
        #[arg(long)]
        publisher: Option<String>,
        /// Which release.
        #[arg(long = "product-version")]
        version: Option<String>,
        /// hard_stop, soft_stop or no_stop.
        #[arg(long, default_value = "hard_stop")]
        enforcement: Enforcement,
        /// concurrent, per_user_host or per_user.
        #[arg(long, default_value = "concurrent")]
        seat: Seat,
        /// Client heartbeat interval.
        #[arg(long, default_value_t = allot_core::domain::DEFAULT_HEARTBEAT_SECONDS)]
        heartbeat_seconds: u32,
        /// Release a checkout after this long without a heartbeat.
        #[arg(long, default_value_t = allot_core::domain::DEFAULT_STALEOUT_SECONDS)]
        staleout_seconds: u32,
        /// Limits, reservations, linger, borrowing, idle reclaim, priorities.
        #[command(flatten)]
        options: OptionFlags,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change a product's policy: each flag given replaces that setting, the rest stay.
    /// Metering servers adopt it at their next sync.
    Set {
        /// The product's name.
        name: String,
        /// hard_stop, soft_stop or no_stop.
        #[arg(long)]
        enforcement: Option<Enforcement>,
        /// concurrent, per_user_host or per_user.
        #[arg(long)]
        seat: Option<Seat>,
        /// Client heartbeat interval.
        #[arg(long)]
        heartbeat_seconds: Option<u32>,
        /// Release a checkout after this long without a heartbeat.
        #[arg(long)]
        staleout_seconds: Option<u32>,
        /// Limits, reservations, linger, borrowing, idle reclaim, priorities.
        #[command(flatten)]
        options: OptionFlags,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every product with its books.
    List {
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One product and how it is split among servers.
    Show {
        /// The product's name.
        name: String,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The options-file rules as flags, shared by `product add` and `product set`. A list flag
/// given replaces the whole list; `--no-…` empties it.
#[derive(Debug, Clone, Default, Args)]
pub struct OptionFlags {
    /// Cap a user, group or host (FlexNet MAX): `SCOPE:NAME=MAX`, e.g. `group:interns=2`;
    /// repeat for more.
    #[arg(long = "limit", value_name = "SCOPE:NAME=MAX", value_parser = parse_limit)]
    pub limits: Vec<Limit>,
    /// Remove every limit.
    #[arg(long, conflicts_with = "limits")]
    pub no_limits: bool,
    /// Keep units for a user, group or host (FlexNet RESERVE): `SCOPE:NAME=UNITS`; repeat
    /// for more.
    #[arg(long = "reserve", value_name = "SCOPE:NAME=UNITS", value_parser = parse_reservation)]
    pub reservations: Vec<Reservation>,
    /// Remove every reservation.
    #[arg(long, conflicts_with = "reservations")]
    pub no_reservations: bool,
    /// Hold a seat for its user and host this long after a checkin (FlexNet LINGER); 0: off.
    #[arg(long)]
    pub linger_seconds: Option<u32>,
    /// Whether a waiting client may take a lingering unit before its linger is up.
    #[arg(long)]
    pub linger_yields: Option<bool>,
    /// Longest borrow for offline use, in hours (FlexNet MAX_BORROW_HOURS); 0: no borrowing.
    #[arg(long)]
    pub max_borrow_hours: Option<u32>,
    /// Warn a client idle this long, in its heartbeat answer; 0: off.
    #[arg(long)]
    pub idle_notify_seconds: Option<u32>,
    /// Take back a checkout idle this long (FlexNet TIMEOUT); 0: off.
    #[arg(long)]
    pub idle_revoke_seconds: Option<u32>,
    /// Wait-queue priority of a group's members: `GROUP=N` (0–1000, higher first); repeat.
    #[arg(long = "priority", value_name = "GROUP=N", value_parser = parse_priority)]
    pub priorities: Vec<GroupPriority>,
    /// Remove every priority.
    #[arg(long, conflicts_with = "priorities")]
    pub no_priorities: bool,
}

impl OptionFlags {
    /// Applies the flags given to `options`; those not given leave their setting alone.
    pub fn apply(&self, options: &mut Options) {
        if self.no_limits || !self.limits.is_empty() {
            options.limits = self.limits.clone();
        }
        if self.no_reservations || !self.reservations.is_empty() {
            options.reservations = self.reservations.clone();
        }
        if self.no_priorities || !self.priorities.is_empty() {
            options.priorities = self.priorities.clone();
        }
        let set = |flag: Option<u32>, value: &mut u32| {
            if let Some(v) = flag {
                *value = v;
            }
        };
        set(self.linger_seconds, &mut options.linger_seconds);
        set(self.max_borrow_hours, &mut options.max_borrow_hours);
        set(self.idle_notify_seconds, &mut options.idle_notify_seconds);
        set(self.idle_revoke_seconds, &mut options.idle_revoke_seconds);
        if let Some(y) = self.linger_yields {
            options.linger_yields = y;
        }
    }
}

/// `SCOPE:NAME=N` → (scope, name, n). The name may hold `:` and `=`; the scope ends at the
/// first `:` and the number starts after the last `=`.
fn scoped(text: &str) -> Result<(Scope, String, u32), String> {
    let (scope, rest) = text
        .split_once(':')
        .ok_or("expected SCOPE:NAME=N, e.g. group:interns=2")?;
    let (name, n) = rest
        .rsplit_once('=')
        .ok_or("expected SCOPE:NAME=N, e.g. group:interns=2")?;
    let n = n.parse().map_err(|e| format!("{n:?}: {e}"))?;
    Ok((scope.parse()?, name.to_owned(), n))
}

fn parse_limit(text: &str) -> Result<Limit, String> {
    let (scope, name, max) = scoped(text)?;
    Ok(Limit { scope, name, max })
}

fn parse_reservation(text: &str) -> Result<Reservation, String> {
    let (scope, name, units) = scoped(text)?;
    Ok(Reservation { scope, name, units })
}

fn parse_priority(text: &str) -> Result<GroupPriority, String> {
    let (group, n) = text
        .rsplit_once('=')
        .ok_or("expected GROUP=N, e.g. design=10")?;
    Ok(GroupPriority {
        group: group.to_owned(),
        priority: n.parse().map_err(|e| format!("{n:?}: {e}"))?,
    })
}

/// `allot-balancer entitlement …`.
#[derive(Debug, Subcommand)]
pub enum EntitlementCommand {
    /// Record a purchase.
    Add {
        /// The product.
        product: String,
        /// Units purchased.
        units: u32,
        /// RFC 3339 expiry, e.g. 2027-12-31T23:59:59Z.
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Order number or note.
        #[arg(long)]
        reference: Option<String>,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A product's purchases.
    List {
        /// The product.
        product: String,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a purchase (refused unless its units are free in the reserve).
    Remove {
        /// The product.
        product: String,
        /// The entitlement's id.
        id: i64,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `allot-balancer server …`.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Register a metering server; prints its token once.
    Add {
        /// Unique name.
        name: String,
        /// Its balancer-facing URL.
        #[arg(long = "server-url")]
        server_url: String,
        /// Its site or region.
        #[arg(long)]
        site: String,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every registered server.
    List {
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Empty a server down to its in-use units.
    Drain {
        /// The server.
        name: String,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an empty server.
    Remove {
        /// The server.
        name: String,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Issue a new token for a server; prints it once. The old token keeps working for the
    /// grace period (or until the server presents the new one), so the server can be restarted
    /// with the new token without downtime.
    RotateToken {
        /// The server.
        name: String,
        /// Seconds the old token keeps working; 0 refuses it at once (a leaked token).
        /// Absent: the balancer's `--token-grace-seconds` (default 24 h).
        #[arg(long, env = "ALLOT_TOKEN_GRACE_SECONDS",
              value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_TOKEN_GRACE_SECONDS)))]
        grace_seconds: Option<u32>,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `allot-balancer allocation …`.
#[derive(Debug, Subcommand)]
pub enum AllocationCommand {
    /// Set a server's floor and buffer for a product.
    Set {
        /// The server.
        server: String,
        /// The product.
        product: String,
        /// Units never reclaimed while the server is alive.
        #[arg(long = "min")]
        min_units: u32,
        /// Free units the server should hold above its demand.
        #[arg(long = "buffer")]
        buffer_units: u32,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `allot-balancer schedule …`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// The schedule and its next five runs.
    Get {
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace the schedule.
    Set {
        /// A 5- or 6-field cron expression, e.g. "*/15 7-19 * * 1-5".
        cron: String,
        /// IANA time zone, e.g. Europe/Paris (default UTC).
        #[arg(long)]
        timezone: Option<String>,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `allot-balancer audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// At most this many entries.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer checkouts`.
#[derive(Debug, Args)]
pub struct CheckoutsArgs {
    /// Only this product.
    #[arg(long)]
    pub product: Option<String>,
    /// Only this user.
    #[arg(long)]
    pub user: Option<String>,
    /// Only this metering server.
    #[arg(long)]
    pub server: Option<String>,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The checkout's public id, as `checkouts` lists it (`co_…`).
    pub id: String,
    /// Why (required, at most 500 characters): kept in the audit log and told to the holder.
    #[arg(long)]
    pub reason: String,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer balance`.
#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// Only this product.
    #[arg(long)]
    pub product: Option<String>,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer runs …`.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Recent runs, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only runs started within this long, e.g. `1d`.
        #[arg(long)]
        since: Option<String>,
        /// Only scheduled, instant, manual or reclaim runs.
        #[arg(long)]
        trigger: Option<allot_core::domain::RunTrigger>,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One run and its moves.
    Show {
        /// The run's id.
        id: i64,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `allot-balancer doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The product.
    pub product: String,
    /// Only this server.
    #[arg(long)]
    pub server: Option<String>,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// What rows are: user, group, host, server, site or product.
    #[arg(long = "by", default_value = "user")]
    pub by: String,
    /// Window start: how far back (`30d`) or an RFC 3339 time.
    #[arg(long, default_value = "30d")]
    pub since: String,
    /// Window end (RFC 3339); default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this product.
    #[arg(long)]
    pub product: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer renewal`.
#[derive(Debug, Args)]
pub struct RenewalArgs {
    /// Window start: how far back (`365d`) or an RFC 3339 time.
    #[arg(long, default_value = "365d")]
    pub since: String,
    /// Only this product.
    #[arg(long)]
    pub product: Option<String>,
    /// Print CSV instead of a table.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only this product.
    #[arg(long)]
    pub product: Option<String>,
    /// Only this server.
    #[arg(long)]
    pub server: Option<String>,
    /// Only servers of this site.
    #[arg(long)]
    pub site: Option<String>,
    /// How far back, e.g. `7d`.
    #[arg(long, default_value = "1d")]
    pub since: String,
    /// Bucket width, e.g. `15m`, `1h`.
    #[arg(long, default_value = "1h")]
    pub step: String,
    /// Print CSV (one row per bucket) instead of a table.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer advise`.
#[derive(Debug, Args)]
pub struct AdviseArgs {
    /// How far back to read, e.g. `7d` (at most 30 days).
    #[arg(long, default_value = "7d")]
    pub since: String,
    /// Apply the recommendations (audited).
    #[arg(long)]
    pub apply: bool,
    /// How to reach the balancer.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `allot-balancer autotune …`.
#[derive(Debug, Subcommand)]
pub enum AutotuneCommand {
    /// Show the autotune setting.
    Get {
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Turn autotune on or off, within bounds.
    Set {
        /// Apply the advice automatically (every six hours).
        #[arg(long)]
        enabled: bool,
        /// The largest buffer autotune may set.
        #[arg(long, default_value_t = 50)]
        max_buffer: u32,
        /// The largest min autotune may set.
        #[arg(long, default_value_t = 10)]
        max_min: u32,
        /// The shortest schedule interval autotune may choose, in minutes.
        #[arg(long, default_value_t = 5)]
        min_interval_minutes: u32,
        /// The longest schedule interval autotune may choose, in minutes.
        #[arg(long, default_value_t = 240)]
        max_interval_minutes: u32,
        /// How far back each pass reads, in days.
        #[arg(long, default_value_t = 7)]
        window_days: u32,
        /// How to reach the balancer.
        #[command(flatten)]
        client: ClientArgs,
    },
}
