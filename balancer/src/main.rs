//! `allot-balancer`: the central balancer service and its admin CLI.
#![forbid(unsafe_code)]

use allot_balancer::cli::{Cli, Command};
use allot_balancer::config::LogFormat;
use allot_balancer::service;
use clap::Parser;

/// mimalloc rather than glibc's malloc: a run over a large estate allocates and frees on every
/// runtime thread, and glibc's per-thread arenas keep much of what was freed resident.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    allot_http::tls::install_crypto_provider();
    let cli = Cli::parse();
    let service = matches!(
        cli.command,
        Command::Serve(_) | Command::Migrate(_) | Command::Shards(_)
    );
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
            Ok(service::serve(args, service::shutdown_signal()).await?)
        }
        Command::Migrate(args) => {
            init_logging(cli.log_format);
            let store = service::open_store(&args).await?;
            tracing::info!(backend = store.backend(), "migrations applied");
            store.close().await;
            Ok(())
        }
        Command::Shards(args) => {
            init_logging(cli.log_format);
            let store = service::open_store(&args.store).await?;
            args.run(store).await
        }
        Command::Product(cmd) => cmd.run().await,
        Command::Entitlement(cmd) => cmd.run().await,
        Command::Server(cmd) => cmd.run().await,
        Command::Allocation(cmd) => cmd.run().await,
        Command::Schedule(cmd) => cmd.run().await,
        Command::Audit(cmd) => cmd.run().await,
        Command::Checkouts(cmd) => cmd.run().await,
        Command::Revoke(cmd) => cmd.run().await,
        Command::Operator(cmd) => cmd.run().await,
        Command::Balance(cmd) => cmd.run().await,
        Command::Runs(cmd) => cmd.run().await,
        Command::Doctor(cmd) => cmd.run().await,
        Command::Explain(cmd) => cmd.run().await,
        Command::History(cmd) => cmd.run().await,
        Command::Usage(cmd) => cmd.run().await,
        Command::Renewal(cmd) => cmd.run().await,
        Command::Advise(cmd) => cmd.run().await,
        Command::Autotune(cmd) => cmd.run().await,
        Command::Openapi => {
            println!("{}", allot_balancer::api::document().to_pretty_json()?);
            Ok(())
        }
        Command::Demo(args) => {
            init_logging_to_stderr_quietly();
            allot_balancer::demo::run(args).await
        }
    }
}

/// The demo draws on the terminal: only warnings and errors may interrupt it.
fn init_logging_to_stderr_quietly() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
