//! `allot-agent`: the metering server (`serve`) and its client commands (`run`, `status`).
#![forbid(unsafe_code)]

use allot_agent::balancer::BalancerConfig;
use allot_agent::cli;
use allot_agent::client::Client;
use allot_agent::server::{self, ProductsFile, ServerConfig};
use allot_core::checkout::Limits;
use allot_core::wire::agent::CheckoutRequest;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// mimalloc rather than glibc's malloc: every request allocates and frees on whichever runtime
/// thread serves it, and glibc's malloc and free were an eighth of the agent's CPU samples
/// under load (BENCHMARKS.md, "Where a checkout's time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// allot's metering server and its client commands.
#[derive(Debug, Parser)]
#[command(name = "allot-agent", version, about)]
struct Args {
    /// Log format.
    #[arg(
        long,
        env = "ALLOT_LOG_FORMAT",
        value_enum,
        default_value = "human",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the metering server.
    Serve(ServeArgs),
    /// Check a license out, run a command while heartbeating, check in when it exits.
    Run(RunArgs),
    /// Show the server's products.
    Status(StatusArgs),
    /// Borrow one unit for offline use (if the product's policy allows borrowing); prints the
    /// handle to return it with.
    Borrow(BorrowArgs),
    /// Return a borrowed unit before its time.
    Return(ReturnArgs),
    /// Print the API's OpenAPI document (as served at /v1/openapi.json) and exit; this is how
    /// docs/openapi/agent.json is written.
    Openapi,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "ALLOT_LISTEN", default_value = "127.0.0.1:7401")]
    listen: SocketAddr,
    /// Directory of the server's store (default: $XDG_DATA_HOME/allot/agent or
    /// ~/.local/share/allot/agent).
    #[arg(long, env = "ALLOT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The server's own token: the balancer presents it (status, release, grant, products) and
    /// this server presents it to the balancer (sync, instant balance).
    #[arg(long, env = "ALLOT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A key clients must present as a bearer token; none → any client may check out.
    #[arg(long, env = "ALLOT_CLIENT_KEY", hide_env_values = true)]
    client_key: Option<String>,
    /// The server's name in status reports.
    #[arg(long, env = "ALLOT_NAME", default_value = "agent")]
    name: String,
    /// Local product definitions (JSON), for running without a balancer.
    #[arg(long, env = "ALLOT_PRODUCTS_FILE")]
    products_file: Option<PathBuf>,
    /// Most live checkouts; past it checkouts answer 503 `unavailable`.
    #[arg(long, env = "ALLOT_MAX_CHECKOUTS", default_value_t = 1_000_000)]
    max_checkouts: usize,
    /// Most waiting clients; past it waiting checkouts answer 503 `unavailable`.
    #[arg(long, env = "ALLOT_MAX_WAITING", default_value_t = 10_000)]
    max_waiting: usize,
    /// Threads serving HTTP. One by default: every change passes through one book lock and one
    /// writer thread anyway, and on a shared 2-core machine one thread served more checkouts
    /// than one per core (fewer hand-offs between threads; docs/BENCHMARKS.md). Raise it only
    /// if one core of HTTP is the limit.
    #[arg(long, env = "ALLOT_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Balancer URL(s), comma-separated, tried in order; none → standalone (no lease).
    #[arg(long, env = "ALLOT_BALANCER", value_delimiter = ',')]
    balancer: Vec<String>,
    /// Seconds between syncs with the balancer (products, lease).
    #[arg(long, env = "ALLOT_SYNC_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    sync_seconds: u64,
    /// Serve HTTPS with this certificate and key.
    #[command(flatten)]
    tls: allot_http::tls::ServerTlsArgs,
    /// CA certificates trusted for an `https://` balancer.
    #[command(flatten)]
    ca: allot_http::tls::CaArgs,
    /// Milliseconds a hard-stop checkout that found nothing free is held for an instant
    /// balance before it is denied.
    #[arg(long, env = "ALLOT_INSTANT_WAIT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    instant_wait_ms: u64,
    /// Hosts (or host:port) a client's callback webhook may name, comma-separated; none →
    /// clients long-poll their callbacks.
    #[arg(long, env = "ALLOT_CALLBACK_HOSTS", value_delimiter = ',')]
    callback_hosts: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The metering server.
    #[arg(long, env = "ALLOT_URL", default_value = "http://127.0.0.1:7401")]
    url: String,
    /// The client key, if the server wants one.
    #[arg(long, env = "ALLOT_CLIENT_KEY", hide_env_values = true)]
    client_key: Option<String>,
    /// CA certificates trusted for an `https://` server URL.
    #[command(flatten)]
    ca: allot_http::tls::CaArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The product to check out.
    #[arg(long, env = "ALLOT_PRODUCT")]
    product: String,
    /// Seconds to wait in the queue when nothing is free.
    #[arg(long, env = "ALLOT_WAIT", default_value_t = 0)]
    wait: u32,
    /// Units to check out.
    #[arg(long, env = "ALLOT_UNITS", default_value_t = 1)]
    units: u32,
    /// User to check out as (default: $USER).
    #[arg(long, env = "ALLOT_USER")]
    user: Option<String>,
    /// Host to check out from (default: this host's name).
    #[arg(long, env = "ALLOT_HOST")]
    host: Option<String>,
    /// Groups for group ACLs (comma-separated).
    #[arg(long, env = "ALLOT_GROUPS", value_delimiter = ',')]
    groups: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

#[derive(Debug, clap::Args)]
struct BorrowArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The product to borrow.
    #[arg(long, env = "ALLOT_PRODUCT")]
    product: String,
    /// For how long, in hours (at most the product's max_borrow_hours).
    #[arg(long)]
    hours: u32,
    /// User to borrow as (default: $USER).
    #[arg(long, env = "ALLOT_USER")]
    user: Option<String>,
    /// The host the unit goes away on (default: this host's name).
    #[arg(long, env = "ALLOT_HOST")]
    host: Option<String>,
    /// Groups for group ACLs, limits and reservations (comma-separated).
    #[arg(long, env = "ALLOT_GROUPS", value_delimiter = ',')]
    groups: Vec<String>,
    /// Machine output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ReturnArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The handle `borrow` printed.
    handle: String,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Machine output.
    #[arg(long)]
    json: bool,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("allot").join("agent")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // TLS files are read first, so a wrong path fails the start at once.
    let tls = args.tls.load().context("load --tls-cert/--tls-key")?;
    let trust = args.ca.load().context("load --ca-file")?;
    let products = match &args.products_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file: ProductsFile = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            file.products
        }
        None => Vec::new(),
    };
    let urls: Vec<String> = args
        .balancer
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    for url in &urls {
        reqwest::Url::parse(url).with_context(|| format!("--balancer {url:?}"))?;
    }
    let balancer = (!urls.is_empty()).then(|| BalancerConfig {
        sync_interval: Duration::from_secs(args.sync_seconds),
        instant_wait: Duration::from_millis(args.instant_wait_ms),
        trust,
        ..BalancerConfig::new(urls)
    });
    let config = ServerConfig {
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        name: args.name,
        token: args.token.filter(|t| !t.is_empty()),
        client_key: args.client_key.filter(|k| !k.is_empty()),
        products,
        limits: Limits {
            max_checkouts: args.max_checkouts,
            max_waiting: args.max_waiting,
        },
        balancer,
        tls,
        callback_hosts: args.callback_hosts,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        worker_threads = args.worker_threads,
        "HTTP served by {} runtime thread(s)",
        args.worker_threads
    );
    server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    let trust = args.ca.load().context("load --ca-file")?;
    Ok(Client::with_trust(&args.url, &trust)?.with_bearer(args.client_key.clone()))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(a) = &args.command {
        runtime.worker_threads(usize::from(a.worker_threads));
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::process::ExitCode {
    allot_http::tls::install_crypto_provider();
    let code = match args.command {
        Command::Serve(a) => match serve(a).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "metering server failed");
                1
            }
        },
        Command::Run(a) => match client(&a.client) {
            Ok(c) => {
                let req = CheckoutRequest {
                    product: a.product,
                    user: a.user.unwrap_or_else(cli::default_user),
                    host: a.host.unwrap_or_else(cli::default_host),
                    groups: a.groups,
                    units: a.units,
                    wait_seconds: a.wait,
                };
                cli::run_command(&c, req, &a.command).await
            }
            Err(e) => {
                eprintln!("allot-agent: {e:#}");
                64
            }
        },
        Command::Openapi => match allot_agent::openapi::document().to_pretty_json() {
            Ok(json) => {
                println!("{json}");
                0
            }
            Err(e) => {
                eprintln!("allot-agent: {e}");
                1
            }
        },
        Command::Borrow(a) => match borrow(a).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("allot-agent: {e:#}");
                cli::EXIT_DENIED
            }
        },
        Command::Return(a) => match client(&a.client) {
            Ok(c) => match c.return_borrow(&a.handle).await {
                Ok(_) => {
                    println!("returned");
                    0
                }
                Err(e) => {
                    eprintln!("allot-agent: {e}");
                    1
                }
            },
            Err(e) => {
                eprintln!("allot-agent: {e:#}");
                64
            }
        },
        Command::Status(a) => match status(&a).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("allot-agent: {e:#}");
                1
            }
        },
    };
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn borrow(args: BorrowArgs) -> anyhow::Result<()> {
    let borrowed = client(&args.client)?
        .borrow(&allot_core::wire::agent::BorrowRequest {
            product: args.product,
            user: args.user.unwrap_or_else(cli::default_user),
            host: args.host.unwrap_or_else(cli::default_host),
            groups: args.groups,
            hours: args.hours,
        })
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&borrowed)?);
    } else {
        println!(
            "borrowed {} unit of {:?} until {}\nhandle (to return it early): {}\nid: {}",
            borrowed.units,
            borrowed.product,
            borrowed
                .until
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            borrowed.handle,
            borrowed.id
        );
    }
    Ok(())
}

async fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let products = client(&args.client)?.products().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&products)?);
    } else {
        print!("{}", cli::products_table(&products));
    }
    Ok(())
}
