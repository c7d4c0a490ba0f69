//! `service::run` on a listener the caller bound: how tests and embedders start a balancer
//! without a port race, and how its start-up failures are reported.

use allot_balancer::cli::{Cli, Command};
use allot_balancer::config::ServeArgs;
use allot_balancer::service::{self, ServeError};
use clap::Parser;
use std::time::Duration;

/// `serve` arguments over the data directory `dir`, plus `extra` flags.
fn serve_args(dir: &std::path::Path, extra: &[&str]) -> ServeArgs {
    let mut argv = vec![
        "allot-balancer",
        "serve",
        "--data-dir",
        dir.to_str().expect("a UTF-8 path"),
        "--admin-token",
        "test-admin-token",
        "--console-listen",
        "off",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("serve arguments").command {
        Command::Serve(args) => args,
        other => panic!("not serve: {other:?}"),
    }
}

#[tokio::test]
async fn a_balancer_serves_on_the_listener_it_is_handed_until_shutdown() {
    allot_http::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let balancer = tokio::spawn(service::run(
        listener,
        serve_args(dir.path(), &[]),
        async move {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let health = loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["status"], "ok");
    assert_eq!(health["leader"], true);
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("allot_store_errors_total 0"), "{metrics}");
    assert!(
        metrics.contains("allot_requests_refused_total"),
        "{metrics}"
    );
    stop.send(()).unwrap();
    balancer.await.unwrap().expect("a clean stop");
}

#[tokio::test]
async fn a_missing_certificate_fails_the_start_with_a_stable_code() {
    allot_http::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let args = serve_args(dir.path(), &["--tls-cert", missing, "--tls-key", missing]);
    let err = service::run(listener, args, std::future::pending())
        .await
        .expect_err("no certificate, no start");
    assert!(matches!(err, ServeError::Tls(_)), "{err:?}");
    assert_eq!(err.code(), "tls");
}
