//! `allot-balancer`: the central balancer service and its admin CLI.
#![forbid(unsafe_code)]

use allot_balancer::api::{self, AppState};
use allot_balancer::auth::{self, AdminTokenSource};
use allot_balancer::balance::{Engine, scheduler};
use allot_balancer::config::{Cli, Command, LogFormat, ServeArgs, StoreArgs};
use allot_balancer::store;
use anyhow::Context;
use clap::Parser;
use std::sync::Arc;
use tokio::sync::{Notify, watch};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let service = matches!(cli.command, Command::Serve(_) | Command::Migrate(_));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if service {
                tracing::error!(error = format!("{e:#}"), "allot-balancer failed");
            }
            // The admin CLI's errors are its output: one line, no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_logging(cli.log_format);
            serve(args).await
        }
        Command::Migrate(args) => {
            init_logging(cli.log_format);
            let store = open_store(&args).await?;
            tracing::info!(backend = store.backend(), "migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Product(cmd) => cmd.run().await,
        Command::Entitlement(cmd) => cmd.run().await,
        Command::Server(cmd) => cmd.run().await,
        Command::Allocation(cmd) => cmd.run().await,
        Command::Schedule(cmd) => cmd.run().await,
        Command::Audit(cmd) => cmd.run().await,
        Command::Balance(cmd) => cmd.run().await,
        Command::Runs(cmd) => cmd.run().await,
        Command::Doctor(cmd) => cmd.run().await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn open_store(args: &StoreArgs) -> anyhow::Result<std::sync::Arc<dyn store::Store>> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data directory {}", args.data_dir.display()))?;
    store::open(args.database_url.as_deref(), &args.data_dir)
        .await
        .context("open the store")
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store).await?;
    let (admin, source) =
        auth::load_or_create_admin_token(args.admin_token.as_deref(), &args.store.data_dir)
            .context("load the admin token")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let schedule = store.schedule().await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %listener.local_addr()?,
        data_dir = %args.store.data_dir.display(),
        store = store.backend(),
        schedule = %schedule.cron,
        timezone = %schedule.timezone,
        "allot-balancer starting"
    );
    if store.backend() == "sqlite" {
        tracing::info!("SQLite store: single balancer (high availability needs PostgreSQL)");
    }
    match &source {
        AdminTokenSource::Configured => tracing::info!("admin token: from --admin-token"),
        AdminTokenSource::File(path) => {
            tracing::info!(path = %path.display(), "admin token: from file");
        }
        AdminTokenSource::Generated(path, token) => tracing::warn!(
            path = %path.display(),
            token = %token,
            "admin token generated on first start; it is shown only this once and kept in the \
             file (mode 0600)"
        ),
    }
    let tokens = auth::ServerTokens::new(&store.token_key().await?);
    let engine = Engine::new(store.clone(), tokens.clone(), args.engine_config());
    tracing::info!(
        lease_seconds = args.lease_seconds,
        lease_margin_seconds = args.lease_margin_seconds,
        call_timeout_ms = args.call_timeout_ms,
        concurrency = args.concurrency,
        "balancing settings"
    );
    match engine.resume_unfinished().await {
        Ok(errors) if errors.is_empty() => {}
        Ok(errors) => tracing::warn!(
            ?errors,
            "unfinished moves could not all be resumed; the next run retries"
        ),
        Err(e) => tracing::error!(error = %e, "could not resume unfinished moves"),
    }
    let schedule_changed = Arc::new(Notify::new());
    let (stop_scheduler, stopped) = watch::channel(false);
    let scheduler = tokio::spawn(scheduler::run(
        engine.clone(),
        store.clone(),
        schedule_changed.clone(),
        stopped,
    ));
    let state = AppState {
        tokens,
        store: store.clone(),
        admin,
        engine,
        schedule_changed,
    };
    api::run(listener, state, shutdown_signal()).await?;
    tracing::info!("HTTP server stopped; finishing the balance run in flight, if any");
    let _ = stop_scheduler.send(true);
    let _ = scheduler.await;
    store.close().await;
    tracing::info!("store closed; bye");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
