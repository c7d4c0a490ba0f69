//! The balancer service as a function: open the books, resume unfinished moves, start the
//! scheduler and serve the API on a listener until a shutdown future resolves, then finish the
//! run in flight and close the store.
//!
//! [`run`] takes a bound listener, so tests (and the demo) bind `127.0.0.1:0` and pass a
//! oneshot; the binary goes through [`serve`], which binds `--listen` and passes SIGTERM/SIGINT.
//! Failures are [`ServeError`]s with stable codes; `anyhow` stays in `main`.

use crate::api::{self, AppState};
use crate::auth::{self, AdminTokenSource};
use crate::balance::{Engine, scheduler};
use crate::config::{ServeArgs, StoreArgs};
use crate::metrics::Metrics;
use crate::store::{self, Fence, StoreError};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// Why the service could not start or stopped with an error; [`ServeError::code`] names each
/// kind stably for logs and scripts.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `--listen` could not be bound.
    #[error("listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it could not be bound.
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS certificate or key could not be read.
    #[error("load --tls-cert/--tls-key")]
    Tls(#[source] allot_http::tls::TlsError),
    /// The CA certificates for calls to metering servers could not be read.
    #[error("load --ca-file")]
    Ca(#[source] allot_http::tls::TlsError),
    /// The data directory could not be created.
    #[error("create data directory {}", .path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why it could not be created.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened or migrated.
    #[error("open the store")]
    OpenStore(#[source] StoreError),
    /// The admin token could not be read or written.
    #[error("load the admin token")]
    AdminToken(#[source] std::io::Error),
    /// The store failed while the service started or stopped.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP server failed.
    #[error("serve HTTP")]
    Http(#[source] std::io::Error),
    /// `--console-listen` could not be bound.
    #[error("listen on {addr} (the console; `--console-listen off` turns it off)")]
    ConsoleListen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it could not be bound.
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// A stable, machine-readable name of the failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Listen { .. } => "listen",
            Self::Tls(_) => "tls",
            Self::Ca(_) => "ca",
            Self::DataDir { .. } => "data_dir",
            Self::OpenStore(_) => "open_store",
            Self::AdminToken(_) => "admin_token",
            Self::Store(_) => "store",
            Self::Http(_) => "http",
            Self::ConsoleListen { .. } => "console_listen",
        }
    }
}

/// Opens (creating the data directory and migrating) the store the arguments name.
pub async fn open_store(args: &StoreArgs) -> Result<Arc<dyn store::Store>, ServeError> {
    std::fs::create_dir_all(&args.data_dir).map_err(|source| ServeError::DataDir {
        path: args.data_dir.clone(),
        source,
    })?;
    store::open(args.database_url.as_deref(), &args.data_dir)
        .await
        .map_err(ServeError::OpenStore)
}

/// The binary's entry: binds `--listen`, then [`run`]s until `shutdown` resolves.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.listen,
            source,
        })?;
    run(listener, args, shutdown).await
}

/// Runs the balancer on `listener` until `shutdown` resolves (`config.listen` is not bound
/// again), with metrics of its own.
pub async fn run(
    listener: TcpListener,
    config: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_metrics(listener, config, Arc::default(), shutdown).await
}

/// [`run`], counting into `metrics`, which the caller can read (the demo shows them).
pub async fn run_with_metrics(
    listener: TcpListener,
    args: ServeArgs,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // TLS files are read before anything else, so a wrong path fails the start at once.
    let tls = args.tls.load().map_err(ServeError::Tls)?;
    let trust = args.ca.load().map_err(ServeError::Ca)?;
    let opened = open_store(&args.store).await?;
    let counted = metrics.clone();
    let store: Arc<dyn store::Store> = Arc::new(store::ErrorReporting::new(
        opened,
        Box::new(move |_| counted.store_errors.inc()),
    ));
    let (admin, source) =
        auth::load_or_create_admin_token(args.admin_token.as_deref(), &args.store.data_dir)
            .map_err(ServeError::AdminToken)?;
    let local = listener.local_addr().map_err(ServeError::Http)?;
    // The console's port is bound before anything runs, so a taken port fails the start.
    let console_listener = match args.console_listen.0 {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::ConsoleListen { addr, source })?,
        ),
        None => None,
    };
    let console_addr = console_listener.as_ref().and_then(|l| l.local_addr().ok());
    let schedule = store.schedule().await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %local,
        data_dir = %args.store.data_dir.display(),
        store = store.backend(),
        schedule = %schedule.cron,
        tls = tls.is_some(),
        timezone = %schedule.timezone,
        console = %console_addr.map_or("off".to_owned(), |a| {
            format!("{}://{a}/", if tls.is_some() { "https" } else { "http" })
        }),
        "allot-balancer starting"
    );
    if store.backend() == "sqlite" {
        tracing::info!("SQLite store: single balancer (high availability needs PostgreSQL)");
    }
    if tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(listen = %local, "plain HTTP beyond loopback: tokens cross the network in clear text; use --tls-cert/--tls-key or a TLS-terminating proxy");
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
    metrics.set_max_cells(args.metrics_max_cells);
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
        format!("{scheme}://{local}")
    });
    let (won, mut wins) = tokio::sync::mpsc::unbounded_channel::<Fence>();
    let leadership = match &args.store.database_url {
        Some(url) if store.backend() == "postgres" => {
            tracing::info!(%advertise, "competing for leadership (PostgreSQL advisory lock)");
            let candidacy = crate::leader::Candidacy {
                url: advertise,
                preferred: Some(args.lead_shards.iter().copied().collect())
                    .filter(|p: &std::collections::BTreeSet<u32>| !p.is_empty()),
                grace: Duration::from_secs(args.shard_grace_seconds),
            };
            crate::leader::compete(
                store.clone(),
                url.clone(),
                candidacy,
                stop_scheduler.subscribe(),
                move |fence| {
                    let _ = won.send(fence);
                },
            )
            .await
        }
        _ => {
            let leadership = crate::leader::lead_alone(&*store, &advertise).await?;
            let _ = won.send(leadership.borrow().clone());
            leadership
        }
    };
    let engine = Engine::with_leadership(
        store.clone(),
        tokens.clone(),
        engine_config(&args, trust),
        leadership.clone(),
        metrics.clone(),
    );
    // Each time leadership is won, unfinished moves are resumed before anything is planned.
    let resumer = engine.clone();
    tokio::spawn(async move {
        while let Some(fence) = wins.recv().await {
            let epochs = fence.epochs();
            match resumer.resume_unfinished().await {
                Ok(errors) if errors.is_empty() => {
                    tracing::info!(?epochs, "unfinished moves resumed")
                }
                Ok(errors) => tracing::warn!(
                    ?epochs,
                    ?errors,
                    "unfinished moves could not all be resumed; the next run retries"
                ),
                Err(e) => {
                    tracing::error!(?epochs, error = %e, "could not resume unfinished moves")
                }
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
    let expiry = tokio::spawn(crate::balance::expiry::run(
        engine.clone(),
        stop_scheduler.subscribe(),
    ));
    let retention = retention(&args);
    let history = tokio::spawn(crate::history::retention_task(
        store.clone(),
        retention,
        stop_scheduler.subscribe(),
    ));
    let autotune = tokio::spawn(crate::advice::autotune_task(
        store.clone(),
        engine.clone(),
        schedule_changed.clone(),
        std::time::Duration::from_secs(6 * 3600),
        stop_scheduler.subscribe(),
    ));
    // Kept to wait, at shutdown, for the bookings of instant grants already answered.
    let settling = engine.clone();
    let state = AppState {
        metrics,
        retention,
        tokens,
        store: store.clone(),
        admin,
        engine,
        schedule_changed,
        leadership,
        token_grace: std::time::Duration::from_secs(u64::from(args.token_grace_seconds)),
        operators: crate::operators::Authenticator::new(store.clone()),
    };
    // One shutdown signal, heard by the API and the console alike.
    let (stop_http, http_stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_http.send(true);
    });
    let stopped_signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let console = console_listener.map(|listener| {
        tokio::spawn(crate::api::console::run(
            listener,
            tls.clone(),
            crate::api::console::Console::new(state.clone(), tls.is_some()),
            stopped_signal(http_stopped.clone()),
        ))
    });
    api::run(listener, tls, state, stopped_signal(http_stopped))
        .await
        .map_err(ServeError::Http)?;
    if let Some(console) = console {
        match console.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the console stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "the console's task failed"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("HTTP server stopped; finishing the balance run in flight, if any");
    let _ = stop_scheduler.send(true);
    let _ = scheduler.await;
    let _ = history.await;
    let _ = autotune.await;
    let _ = expiry.await;
    settling.settle().await;
    store.close().await;
    tracing::info!("store closed; bye");
    Ok(())
}

/// How long history is kept.
pub fn retention(args: &ServeArgs) -> crate::history::Retention {
    crate::history::Retention {
        raw: std::time::Duration::from_secs(args.history_raw_days.max(1) * 86_400),
        hourly: std::time::Duration::from_secs(args.history_hourly_days.max(1) * 86_400),
        records: std::time::Duration::from_secs(args.records_days.max(1) * 86_400),
    }
}

/// The balancing engine's settings; `trust` holds the CA certificates its calls to metering
/// servers accept.
pub fn engine_config(
    args: &ServeArgs,
    trust: allot_http::tls::Trust,
) -> crate::balance::EngineConfig {
    crate::balance::EngineConfig {
        trust,
        call_timeout: std::time::Duration::from_millis(args.call_timeout_ms.max(1)),
        concurrency: args.concurrency.max(1),
        lease: std::time::Duration::from_secs(args.lease_seconds.max(1)),
        lease_margin: std::time::Duration::from_secs(args.lease_margin_seconds),
        hold: std::time::Duration::from_secs(args.hold_seconds),
        ..crate::balance::EngineConfig::default()
    }
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
