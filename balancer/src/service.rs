//! The balancer service as a function: open the books, resume unfinished moves, start the
//! scheduler and serve the API until a shutdown future resolves, then finish the run in flight
//! and close the store. The binary calls it with a SIGTERM/SIGINT future; the demo with its own.

use crate::api::{self, AppState};
use crate::auth::{self, AdminTokenSource};
use crate::balance::{Engine, scheduler};
use crate::config::{ServeArgs, StoreArgs};
use crate::store;
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Notify, watch};

/// Opens (creating the data directory and migrating) the store the arguments name.
pub async fn open_store(args: &StoreArgs) -> anyhow::Result<Arc<dyn store::Store>> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data directory {}", args.data_dir.display()))?;
    store::open(args.database_url.as_deref(), &args.data_dir)
        .await
        .context("open the store")
}

/// Runs the balancer until `shutdown` resolves.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // TLS files are read before anything else, so a wrong path fails the start at once.
    let tls = args.tls.load().context("load --tls-cert/--tls-key")?;
    let trust = args.ca.load().context("load --ca-file")?;
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
        tls = tls.is_some(),
        timezone = %schedule.timezone,
        "allot-balancer starting"
    );
    if store.backend() == "sqlite" {
        tracing::info!("SQLite store: single balancer (high availability needs PostgreSQL)");
    }
    if tls.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "plain HTTP beyond loopback: tokens cross the network in clear text; use --tls-cert/--tls-key or a TLS-terminating proxy");
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
    crate::metrics::METRICS.set_max_cells(args.metrics_max_cells);
    tracing::info!(
        lease_seconds = args.lease_seconds,
        lease_margin_seconds = args.lease_margin_seconds,
        call_timeout_ms = args.call_timeout_ms,
        concurrency = args.concurrency,
        "balancing settings"
    );
    let (stop_scheduler, stopped) = watch::channel(false);
    let advertise = args.advertise_url.clone().unwrap_or_else(|| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", args.listen)
    });
    let (won, mut wins) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let leadership = match &args.store.database_url {
        Some(url) if store.backend() == "postgres" => {
            tracing::info!(%advertise, "competing for leadership (PostgreSQL advisory lock)");
            crate::leader::compete(
                store.clone(),
                url.clone(),
                advertise,
                stop_scheduler.subscribe(),
                move |epoch| {
                    let _ = won.send(epoch);
                },
            )
            .await
        }
        _ => {
            let leadership = crate::leader::lead_alone(&*store, &advertise).await?;
            if let Some(epoch) = *leadership.borrow() {
                let _ = won.send(epoch);
            }
            leadership
        }
    };
    let engine = Engine::with_leadership(
        store.clone(),
        tokens.clone(),
        args.engine_config(trust),
        leadership.clone(),
    );
    // Each time leadership is won, unfinished moves are resumed before anything is planned.
    let resumer = engine.clone();
    tokio::spawn(async move {
        while let Some(epoch) = wins.recv().await {
            match resumer.resume_unfinished().await {
                Ok(errors) if errors.is_empty() => {
                    tracing::info!(epoch, "unfinished moves resumed")
                }
                Ok(errors) => tracing::warn!(
                    epoch,
                    ?errors,
                    "unfinished moves could not all be resumed; the next run retries"
                ),
                Err(e) => tracing::error!(epoch, error = %e, "could not resume unfinished moves"),
            }
        }
    });
    let schedule_changed = Arc::new(Notify::new());
    let scheduler = tokio::spawn(scheduler::run(
        engine.clone(),
        store.clone(),
        schedule_changed.clone(),
        stopped,
    ));
    let retention = args.retention();
    let history = tokio::spawn(crate::history::retention_task(
        store.clone(),
        retention,
        stop_scheduler.subscribe(),
    ));
    let autotune = tokio::spawn(crate::advice::autotune_task(
        store.clone(),
        schedule_changed.clone(),
        std::time::Duration::from_secs(6 * 3600),
        stop_scheduler.subscribe(),
    ));
    let state = AppState {
        retention,
        tokens,
        store: store.clone(),
        admin,
        engine,
        schedule_changed,
        leadership,
        token_grace: std::time::Duration::from_secs(u64::from(args.token_grace_seconds)),
    };
    api::run(listener, tls, state, shutdown).await?;
    tracing::info!("HTTP server stopped; finishing the balance run in flight, if any");
    let _ = stop_scheduler.send(true);
    let _ = scheduler.await;
    let _ = history.await;
    let _ = autotune.await;
    store.close().await;
    tracing::info!("store closed; bye");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
