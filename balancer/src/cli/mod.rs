//! The admin CLI: subcommands that talk to a balancer's HTTP API (never to its database), with
//! human tables by default and the API's JSON with `--json`.

use crate::auth::admin_token_path;
use crate::config::{MAX_TOKEN_GRACE_SECONDS, default_data_dir};
use allot_core::domain::{Enforcement, Seat};
use allot_core::error::ErrorBody;
use allot_core::wire::balancer::History;
use allot_core::wire::balancer::{
    AddEntitlement, AllocationView, AuditEntry, BalanceRequest, CreateProduct, DoctorReport,
    Entitlement, List, Product, ProductDetail, RegisterServer, RegisteredServer, RotateToken,
    RotatedToken, RunDetail, RunSummary, Schedule, Server, SetAllocation, SetSchedule,
};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;

/// How to reach the balancer.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The balancer's URL.
    #[arg(long, env = "ALLOT_URL", default_value = "http://127.0.0.1:7400")]
    pub url: String,
    /// The admin token; absent → `<data-dir>/admin-token` of a balancer on this machine.
    #[arg(long, env = "ALLOT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Where a local balancer keeps its admin token.
    #[arg(long, env = "ALLOT_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, env = "ALLOT_JSON")]
    pub json: bool,
    /// CA certificates trusted for an `https://` balancer URL.
    #[command(flatten)]
    pub ca: allot_tls::CaArgs,
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

/// A typed admin client of the balancer's API.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// A client for `args.url` with the admin token from the flag, the environment or the
    /// local balancer's data directory.
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let token = match &args.admin_token {
            Some(token) => token.clone(),
            None => {
                let path = admin_token_path(&args.data_dir);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no admin token: pass --admin-token or ALLOT_ADMIN_TOKEN (could not \
                             read {})",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Self {
            http: args
                .ca
                .load()
                .context("load --ca-file")?
                .client_builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
            base: args.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Calls the API; a non-2xx answer becomes an error naming its code and message.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("could not reach the balancer at {url}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => bail!("{} ({status}): {}", body.error.code, body.error.message),
                Err(_) => bail!("{status}: {}", String::from_utf8_lossy(&bytes)),
            }
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {url}"))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }
}

/// Percent-encodes one path segment (names may hold spaces and other characters).
fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    table
}

fn opt<T: ToString>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

/// Prints `value` as JSON or through `human`.
fn output<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

fn products_table(products: &[Product]) -> Table {
    let mut t = table(&[
        "product",
        "enforcement",
        "seat",
        "purchased",
        "allocated",
        "in transit",
        "reserve",
    ]);
    for p in products {
        t.add_row(vec![
            p.name.clone(),
            p.policy.enforcement.to_string(),
            p.policy.seat.to_string(),
            p.purchased.to_string(),
            p.allocated.to_string(),
            p.in_transit.to_string(),
            p.reserve.to_string(),
        ]);
    }
    t
}

fn cells_table(cells: &[AllocationView]) -> Table {
    let mut t = table(&[
        "server",
        "site",
        "state",
        "allocation",
        "in use",
        "min",
        "buffer",
    ]);
    for c in cells {
        t.add_row(vec![
            c.server.clone(),
            c.site.clone(),
            c.state.to_string(),
            c.allocation.to_string(),
            opt(&c.in_use),
            c.min_units.to_string(),
            c.buffer_units.to_string(),
        ]);
    }
    t
}

fn entitlements_table(items: &[Entitlement]) -> Table {
    let mut t = table(&[
        "id",
        "product",
        "units",
        "expires",
        "reference",
        "added",
        "by",
    ]);
    for e in items {
        t.add_row(vec![
            e.id.to_string(),
            e.product.clone(),
            e.units.to_string(),
            opt(&e.expires_at.map(|t| t.to_rfc3339())),
            opt(&e.reference),
            e.created_at.to_rfc3339(),
            e.created_by.clone(),
        ]);
    }
    t
}

fn servers_table(items: &[Server]) -> Table {
    let mut t = table(&[
        "server",
        "site",
        "state",
        "url",
        "last seen",
        "old token until",
    ]);
    for s in items {
        t.add_row(vec![
            s.name.clone(),
            s.site.clone(),
            s.state.to_string(),
            s.url.clone(),
            opt(&s.last_seen_at.map(|t| t.to_rfc3339())),
            opt(&s.previous_token_until.map(|t| t.to_rfc3339())),
        ]);
    }
    t
}

impl ProductCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                name,
                publisher,
                version,
                enforcement,
                seat,
                heartbeat_seconds,
                staleout_seconds,
                client,
            } => {
                let def = CreateProduct {
                    name,
                    publisher,
                    version,
                    enforcement,
                    seat,
                    heartbeat_seconds,
                    staleout_seconds,
                    acl: Default::default(),
                };
                let product: Product = AdminClient::new(&client)?
                    .call(Method::POST, "/v1/products", Some(&def))
                    .await?;
                output(client.json, &product, |p| {
                    println!("{}", products_table(std::slice::from_ref(p)));
                })
            }
            Self::List { client } => {
                let list: List<Product> = AdminClient::new(&client)?.get("/v1/products").await?;
                output(client.json, &list, |l| {
                    println!("{}", products_table(&l.items))
                })
            }
            Self::Show { name, client } => {
                let detail: ProductDetail = AdminClient::new(&client)?
                    .get(&format!("/v1/products/{}", segment(&name)))
                    .await?;
                output(client.json, &detail, |d| {
                    println!("{}", products_table(std::slice::from_ref(&d.product)));
                    println!("{}", cells_table(&d.servers));
                })
            }
        }
    }
}

impl EntitlementCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                product,
                units,
                expires_at,
                reference,
                client,
            } => {
                let req = AddEntitlement {
                    units,
                    expires_at,
                    reference,
                };
                let e: Entitlement = AdminClient::new(&client)?
                    .call(
                        Method::POST,
                        &format!("/v1/products/{}/entitlements", segment(&product)),
                        Some(&req),
                    )
                    .await?;
                output(client.json, &e, |e| {
                    println!("{}", entitlements_table(std::slice::from_ref(e)));
                })
            }
            Self::List { product, client } => {
                let list: List<Entitlement> = AdminClient::new(&client)?
                    .get(&format!("/v1/products/{}/entitlements", segment(&product)))
                    .await?;
                output(client.json, &list, |l| {
                    println!("{}", entitlements_table(&l.items))
                })
            }
            Self::Remove {
                product,
                id,
                client,
            } => {
                let e: Entitlement = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::DELETE,
                        &format!("/v1/products/{}/entitlements/{id}", segment(&product)),
                        None,
                    )
                    .await?;
                output(client.json, &e, |e| {
                    println!(
                        "removed entitlement {} ({} units of {})",
                        e.id, e.units, e.product
                    );
                })
            }
        }
    }
}

impl ServerCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                name,
                server_url,
                site,
                client,
            } => {
                let req = RegisterServer {
                    name,
                    url: server_url,
                    site,
                };
                let r: RegisteredServer = AdminClient::new(&client)?
                    .call(Method::POST, "/v1/servers", Some(&req))
                    .await?;
                output(client.json, &r, |r| {
                    println!("{}", servers_table(std::slice::from_ref(&r.server)));
                    println!(
                        "token (shown once, give it to the metering server): {}",
                        r.token
                    );
                })
            }
            Self::List { client } => {
                let list: List<Server> = AdminClient::new(&client)?.get("/v1/servers").await?;
                output(client.json, &list, |l| {
                    println!("{}", servers_table(&l.items))
                })
            }
            Self::Drain { name, client } => {
                let s: Server = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::POST,
                        &format!("/v1/servers/{}/drain", segment(&name)),
                        None,
                    )
                    .await?;
                output(client.json, &s, |s| {
                    println!("{}", servers_table(std::slice::from_ref(s)))
                })
            }
            Self::Remove { name, client } => {
                let s: Server = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::DELETE,
                        &format!("/v1/servers/{}", segment(&name)),
                        None,
                    )
                    .await?;
                output(client.json, &s, |s| println!("removed server {}", s.name))
            }
            Self::RotateToken {
                name,
                grace_seconds,
                client,
            } => {
                let r: RotatedToken = AdminClient::new(&client)?
                    .call(
                        Method::POST,
                        &format!("/v1/servers/{}/rotate-token", segment(&name)),
                        Some(&RotateToken { grace_seconds }),
                    )
                    .await?;
                output(client.json, &r, |r| {
                    println!(
                        "new token (shown once, restart the metering server with it): {}",
                        r.token
                    );
                    match r.server.previous_token_until {
                        Some(until) => println!(
                            "the old token keeps working until {until} or until the server \
                             presents the new one"
                        ),
                        None => println!("the old token is refused from now on"),
                    }
                })
            }
        }
    }
}

impl AllocationCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self::Set {
            server,
            product,
            min_units,
            buffer_units,
            client,
        } = self;
        let req = SetAllocation {
            min_units,
            buffer_units,
        };
        let cell: AllocationView = AdminClient::new(&client)?
            .call(
                Method::PUT,
                &format!(
                    "/v1/servers/{}/products/{}",
                    segment(&server),
                    segment(&product)
                ),
                Some(&req),
            )
            .await?;
        output(client.json, &cell, |c| {
            println!("{}", cells_table(std::slice::from_ref(c)))
        })
    }
}

fn print_schedule(s: &Schedule) {
    println!("cron:     {}", s.cron);
    println!("timezone: {}", s.timezone);
    println!("next runs:");
    for run in &s.next_runs {
        println!("  {}", run.to_rfc3339());
    }
}

impl ScheduleCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Get { client } => {
                let s: Schedule = AdminClient::new(&client)?.get("/v1/schedule").await?;
                output(client.json, &s, print_schedule)
            }
            Self::Set {
                cron,
                timezone,
                client,
            } => {
                let req = SetSchedule { cron, timezone };
                let s: Schedule = AdminClient::new(&client)?
                    .call(Method::PUT, "/v1/schedule", Some(&req))
                    .await?;
                output(client.json, &s, print_schedule)
            }
        }
    }
}

impl AuditArgs {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        let list: List<AuditEntry> = AdminClient::new(&self.client)?
            .get(&format!("/v1/audit?limit={}", self.limit))
            .await?;
        output(self.client.json, &list, |l| {
            let mut t = table(&["id", "at", "actor", "action", "target", "after"]);
            for e in &l.items {
                t.add_row(vec![
                    e.id.to_string(),
                    e.at.to_rfc3339(),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    opt(&e.after.as_ref().map(|v| v.to_string())),
                ]);
            }
            println!("{t}");
        })
    }
}

fn runs_table(runs: &[RunSummary]) -> Table {
    let mut t = table(&[
        "run",
        "trigger",
        "status",
        "started",
        "ms",
        "servers",
        "unreachable",
        "moves",
        "units",
        "unserved false/true",
        "ping-pong",
    ]);
    for r in runs {
        let ms = r
            .finished_at
            .map(|f| (f - r.started_at).num_milliseconds().to_string())
            .unwrap_or_else(|| "-".into());
        t.add_row(vec![
            r.id.to_string(),
            r.trigger.to_string(),
            r.status.clone(),
            r.started_at.to_rfc3339(),
            ms,
            r.servers_queried.to_string(),
            r.servers_unreachable.to_string(),
            r.moves.to_string(),
            r.units_moved.to_string(),
            format!("{}/{}", r.unserved_false, r.unserved_true),
            r.ping_pong_units.to_string(),
        ]);
    }
    t
}

fn print_run(detail: &RunDetail) {
    println!("{}", runs_table(std::slice::from_ref(&detail.run)));
    let mut t = table(&[
        "move", "kind", "product", "server", "units", "state", "applied",
    ]);
    for m in &detail.move_log {
        t.add_row(vec![
            m.id.to_string(),
            m.kind.to_string(),
            m.product.clone(),
            m.server.clone(),
            m.units.to_string(),
            m.state.to_string(),
            opt(&m.applied_units),
        ]);
    }
    println!("{t}");
    for e in &detail.run.errors {
        println!("! {e}");
    }
}

impl BalanceArgs {
    /// Runs a manual balance and prints its moves.
    pub async fn run(self) -> anyhow::Result<()> {
        let req = BalanceRequest {
            product: self.product,
        };
        let detail: RunDetail = AdminClient::new(&self.client)?
            .call(Method::POST, "/v1/balance", Some(&req))
            .await?;
        output(self.client.json, &detail, print_run)
    }
}

impl RunsCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::List {
                limit,
                since,
                trigger,
                client,
            } => {
                let mut path = format!("/v1/runs?limit={limit}");
                if let Some(since) = since {
                    path.push_str(&format!("&since={}", segment(&since)));
                }
                if let Some(trigger) = trigger {
                    path.push_str(&format!("&trigger={trigger}"));
                }
                let list: List<RunSummary> = AdminClient::new(&client)?.get(&path).await?;
                output(client.json, &list, |l| println!("{}", runs_table(&l.items)))
            }
            Self::Show { id, client } => {
                let detail: RunDetail = AdminClient::new(&client)?
                    .get(&format!("/v1/runs/{id}"))
                    .await?;
                output(client.json, &detail, print_run)
            }
        }
    }
}

impl DoctorArgs {
    /// Prints the books, each server's view and every discrepancy; fails when any is found.
    pub async fn run(self) -> anyhow::Result<()> {
        let report: DoctorReport = AdminClient::new(&self.client)?.get("/v1/doctor").await?;
        output(self.client.json, &report, |r| {
            for p in &r.products {
                println!(
                    "{}: purchased {} = reserve {} + in transit {} + allocated {}",
                    p.product, p.purchased, p.reserve, p.in_transit, p.allocated
                );
                let mut t = table(&[
                    "server",
                    "books",
                    "books gen",
                    "server",
                    "server gen",
                    "in use",
                ]);
                for c in &p.servers {
                    t.add_row(vec![
                        c.server.clone(),
                        c.store_allocation.to_string(),
                        c.store_generation.to_string(),
                        opt(&c.server_allocation),
                        opt(&c.server_generation),
                        opt(&c.in_use),
                    ]);
                }
                println!("{t}");
            }
            for d in &r.discrepancies {
                println!("DISCREPANCY: {d}");
            }
            for u in &r.unreachable {
                println!("UNREACHABLE: {u}");
            }
            for m in &r.unfinished_moves {
                println!(
                    "UNFINISHED: {} {} {} of {} to {}",
                    m.id, m.kind, m.units, m.product, m.server
                );
            }
            println!(
                "{}",
                if r.ok {
                    "OK: the books and every server agree"
                } else {
                    "NOT OK"
                }
            );
        })?;
        if report.ok {
            Ok(())
        } else {
            anyhow::bail!("doctor found problems")
        }
    }
}

impl ExplainArgs {
    /// Prints, per server, the demand signals, want, fair share, target and the deciding rule.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut path = format!("/v1/products/{}/explain", segment(&self.product));
        if let Some(server) = &self.server {
            path.push_str(&format!("?server={}", segment(server)));
        }
        let e: allot_core::wire::balancer::Explanation =
            AdminClient::new(&self.client)?.get(&path).await?;
        output(self.client.json, &e, |e| {
            println!(
                "{}: purchased {}, reserve {} (after the plan: {}), in transit {}; scarcity: {}",
                e.product, e.purchased, e.reserve, e.reserve_after, e.in_transit, e.scarcity
            );
            let mut t = table(&[
                "server", "alloc", "in use", "waiting", "peak", "denials", "level", "forecast",
                "window", "min", "buffer", "need", "want", "fair", "target", "decision",
            ]);
            for c in &e.servers {
                t.add_row(vec![
                    c.server.clone(),
                    c.allocation.to_string(),
                    c.in_use.to_string(),
                    c.waiting.to_string(),
                    c.peak_in_use.to_string(),
                    c.denials.to_string(),
                    c.level.to_string(),
                    c.forecast.to_string(),
                    opt(&c.window_peak),
                    c.min_units.to_string(),
                    c.buffer_units.to_string(),
                    c.need.to_string(),
                    c.want.to_string(),
                    c.fair_share.to_string(),
                    c.target.to_string(),
                    if c.held {
                        format!("{} (held)", c.decision)
                    } else {
                        c.decision.clone()
                    },
                ]);
            }
            println!("{t}");
            for u in &e.unreachable {
                println!("UNREACHABLE: {u} (its units stay where they are)");
            }
            if let Some(note) = &e.note {
                println!("NOTE: {note}");
            }
        })
    }
}

/// A unicode sparkline of `values`, scaled to `scale` (the series' own maximum when 0).
pub fn sparkline(values: &[u64], scale: u64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let top = if scale == 0 {
        values.iter().copied().max().unwrap_or(0)
    } else {
        scale
    };
    values
        .iter()
        .map(|&v| {
            if top == 0 {
                BARS[0]
            } else {
                let level = (v.min(top) * 7).div_ceil(top);
                BARS[usize::try_from(level).unwrap_or(7).min(7)]
            }
        })
        .collect()
}

impl HistoryArgs {
    /// Prints the history as sparklines, CSV or JSON.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut path = format!(
            "/v1/history?since={}&step={}",
            segment(&self.since),
            segment(&self.step)
        );
        for (key, value) in [
            ("product", &self.product),
            ("server", &self.server),
            ("site", &self.site),
        ] {
            if let Some(value) = value {
                path.push_str(&format!("&{key}={}", segment(value)));
            }
        }
        let history: History = AdminClient::new(&self.client)?.get(&path).await?;
        if self.csv {
            println!(
                "product,server,site,at,samples,allocation_mean,allocation_max,in_use_mean,\
                 in_use_max,peak_in_use,checkouts,denials,overdrafts,staleouts,waiting_max,\
                 instant_requests"
            );
            for s in &history.series {
                for p in &s.points {
                    println!(
                        "{},{},{},{},{},{:.3},{},{:.3},{},{},{},{},{},{},{},{}",
                        csv_field(&s.product),
                        csv_field(&s.server),
                        csv_field(&s.site),
                        p.at.to_rfc3339(),
                        p.samples,
                        p.allocation_mean,
                        p.allocation_max,
                        p.in_use_mean,
                        p.in_use_max,
                        p.peak_in_use,
                        p.checkouts,
                        p.denials,
                        p.overdrafts,
                        p.staleouts,
                        p.waiting_max,
                        p.instant_requests
                    );
                }
            }
            return Ok(());
        }
        output(self.client.json, &history, |h| {
            println!(
                "{} → {}, one bucket every {} s",
                h.from.to_rfc3339(),
                h.to.to_rfc3339(),
                h.step_seconds
            );
            let mut t = table(&[
                "product",
                "server",
                "site",
                "in use (peak) vs allocation",
                "denials",
                "instant",
            ]);
            for s in &h.series {
                let peaks: Vec<u64> = s
                    .points
                    .iter()
                    .map(|p| p.peak_in_use.max(p.in_use_max))
                    .collect();
                let allocations: Vec<u64> = s.points.iter().map(|p| p.allocation_max).collect();
                let scale = peaks.iter().chain(&allocations).copied().max().unwrap_or(0);
                let denials: Vec<u64> = s.points.iter().map(|p| p.denials).collect();
                let instant: Vec<u64> = s.points.iter().map(|p| p.instant_requests).collect();
                t.add_row(vec![
                    s.product.clone(),
                    s.server.clone(),
                    s.site.clone(),
                    format!(
                        "{}  max {}\n{}  max {}",
                        sparkline(&peaks, scale),
                        peaks.iter().max().unwrap_or(&0),
                        sparkline(&allocations, scale),
                        allocations.iter().max().unwrap_or(&0)
                    ),
                    format!(
                        "{} Σ{}",
                        sparkline(&denials, 0),
                        denials.iter().sum::<u64>()
                    ),
                    format!(
                        "{} Σ{}",
                        sparkline(&instant, 0),
                        instant.iter().sum::<u64>()
                    ),
                ]);
            }
            println!("{t}");
        })
    }
}

/// Quotes a CSV field when it holds a comma, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

fn print_advice(advice: &allot_core::advisor::Advice) {
    use allot_core::advisor::Action;
    let s = &advice.schedule;
    match s.action {
        Action::Keep => println!("schedule: keep {} ({})", s.current.cron, s.current.timezone),
        Action::Change => println!(
            "schedule: {} ({}) → {} ({}), {} runs a day",
            s.current.cron,
            s.current.timezone,
            s.recommended.cron,
            s.recommended.timezone,
            s.recommended.runs_per_day
        ),
    }
    for e in &s.evidence {
        println!("  evidence: {}", e.text);
    }
    for e in &s.expected_effect {
        println!("  expected: {}", e.text);
    }
    let changes: Vec<_> = advice
        .cells
        .iter()
        .filter(|c| c.action == Action::Change)
        .collect();
    if changes.is_empty() {
        println!("cells: no change");
    }
    for c in changes {
        println!(
            "{} / {}: min {} → {}, buffer {} → {}",
            c.server,
            c.product,
            c.current.min_units,
            c.recommended.min_units,
            c.current.buffer_units,
            c.recommended.buffer_units
        );
        for e in &c.evidence {
            println!("  evidence: {}", e.text);
        }
        for e in &c.expected_effect {
            println!("  expected: {}", e.text);
        }
    }
    for note in &advice.notes {
        println!("note: {note}");
    }
}

impl AdviseArgs {
    /// Prints (and with `--apply` applies) the advisor's recommendations.
    pub async fn run(self) -> anyhow::Result<()> {
        let client = AdminClient::new(&self.client)?;
        if self.apply {
            let answer: serde_json::Value = client
                .call(
                    Method::POST,
                    "/v1/advice/apply",
                    Some(&serde_json::json!({"since": self.since})),
                )
                .await?;
            return output(self.client.json, &answer, |a| {
                if let Ok(advice) = serde_json::from_value(a["advice"].clone()) {
                    print_advice(&advice);
                }
                println!("applied: {}", a["applied"]);
            });
        }
        let advice: allot_core::advisor::Advice = client
            .get(&format!("/v1/advice?since={}", segment(&self.since)))
            .await?;
        output(self.client.json, &advice, print_advice)
    }
}

impl AutotuneCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Get { client } => {
                let setting: crate::advice::Autotune =
                    AdminClient::new(&client)?.get("/v1/autotune").await?;
                output(client.json, &setting, |s| {
                    println!("{}", serde_json::to_string_pretty(s).unwrap_or_default())
                })
            }
            Self::Set {
                enabled,
                max_buffer,
                max_min,
                min_interval_minutes,
                max_interval_minutes,
                window_days,
                client,
            } => {
                let setting = crate::advice::Autotune {
                    enabled,
                    bounds: allot_core::advisor::AutotuneBounds {
                        max_buffer_units: max_buffer,
                        max_min_units: max_min,
                        min_interval_minutes,
                        max_interval_minutes,
                    },
                    window_days,
                };
                let saved: crate::advice::Autotune = AdminClient::new(&client)?
                    .call(Method::PUT, "/v1/autotune", Some(&setting))
                    .await?;
                output(client.json, &saved, |s| {
                    println!("{}", serde_json::to_string_pretty(s).unwrap_or_default())
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sparklines_scale_to_the_series() {
        assert_eq!(super::sparkline(&[0, 4, 8], 0), "▁▅█");
        assert_eq!(super::sparkline(&[0, 0], 0), "▁▁");
        assert_eq!(super::sparkline(&[2], 8), "▃");
        assert_eq!(super::csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(super::segment("CAD Suite/2"), "CAD%20Suite%2F2");
        assert_eq!(super::segment("matlab-r2026a"), "matlab-r2026a");
    }
}
