//! TLS end to end: a throwaway CA and a certificate for 127.0.0.1 made at test time, the real
//! balancer and metering server both serving HTTPS, the server syncing and a balance run moving
//! units over TLS, the admin CLI trusting the CA with `--ca-file`, and clients without the CA
//! refused.

use allot_tests::balancer::Api;
use allot_tests::process::{Running, binary, free_port};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "test-admin-token";

/// The PEM files a test deployment needs: the CA the clients trust, and the certificate and key
/// both servers present (one certificate for 127.0.0.1 serves both, as on one host).
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "allot test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "allot test server");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

/// A client that trusts the test CA (besides the system's roots).
fn trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the admin CLI against `url`; answers whether it succeeded, and its output.
fn cli(url: &str, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(binary("allot-balancer"))
        .args(extra)
        .args(["--url", url, "--admin-token", ADMIN_TOKEN, "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the admin CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Starts `allot-balancer serve` on `port` with its data in `dir` and the extra `tls` flags.
async fn start_balancer(dir: &Path, port: u16, tls: &[String], http: &reqwest::Client) -> Running {
    let listen = format!("127.0.0.1:{port}");
    let data_dir = path(&dir.join("balancer"));
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--data-dir",
        &data_dir,
        "--admin-token",
        ADMIN_TOKEN,
    ];
    args.extend(tls.iter().map(String::as_str));
    Running::start_at(
        &binary("allot-balancer"),
        &args,
        &[("RUST_LOG", "warn")],
        format!("https://127.0.0.1:{port}"),
        http,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_and_server_talk_over_tls_and_refuse_untrusting_clients() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let http = trusting(&pki.ca);
    let (balancer_port, agent_port) = (free_port(), free_port());
    let balancer_url = format!("https://127.0.0.1:{balancer_port}");
    let agent_url = format!("https://127.0.0.1:{agent_port}");
    let tls = [
        "--tls-cert".to_owned(),
        path(&pki.cert),
        "--tls-key".to_owned(),
        path(&pki.key),
        "--ca-file".to_owned(),
        path(&pki.ca),
    ];

    let mut balancer = start_balancer(dir.path(), balancer_port, &tls, &http).await;
    let api = Api::with_http(http.clone(), &balancer_url, Some(ADMIN_TOKEN));
    api.put("/v1/schedule", json!({"cron": "0 0 1 1 *"})).await;

    // The admin CLI trusts the CA with --ca-file, and refuses the server without it.
    let (ok, out) = cli(
        &balancer_url,
        &["product", "add", "cad", "--ca-file", &path(&pki.ca)],
    );
    assert!(ok, "product add over TLS: {out}");
    let (ok, out) = cli(&balancer_url, &["product", "list"]);
    assert!(
        !ok,
        "a CLI without the CA must not trust the balancer: {out}"
    );
    api.post("/v1/products/cad/entitlements", json!({"units": 10}))
        .await;
    let registered = api
        .post(
            "/v1/servers",
            json!({"name": "paris", "url": agent_url, "site": "eu"}),
        )
        .await;
    let token = registered["token"].as_str().unwrap().to_owned();

    let listen = format!("127.0.0.1:{agent_port}");
    let data_dir = path(&dir.path().join("agent"));
    let mut args = vec![
        "serve",
        "--listen",
        &listen,
        "--data-dir",
        &data_dir,
        "--name",
        "paris",
        "--token",
        &token,
        "--balancer",
        &balancer_url,
        "--sync-seconds",
        "1",
    ];
    args.extend(tls.iter().map(String::as_str));
    let mut agent_process = Running::start_at(
        &binary("allot-agent"),
        &args,
        &[("RUST_LOG", "warn")],
        agent_url.clone(),
        &http,
    )
    .await;

    // The server syncs over TLS: it learns the product.
    let agent = Api::with_http(http.clone(), &agent_url, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.get("/v1/products").await["products"]
        .as_array()
        .is_none_or(|p| p.is_empty())
    {
        assert!(Instant::now() < deadline, "paris never synced over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A balance run calls the server over TLS: status, then a grant.
    api.put(
        "/v1/servers/paris/products/cad",
        json!({"min_units": 3, "buffer_units": 0}),
    )
    .await;
    let run = api.post("/v1/balance", json!({})).await;
    assert_eq!(run["status"], "ok", "{run}");
    let products = agent.get("/v1/products").await;
    assert_eq!(products["products"][0]["allocated"], 3, "{products}");
    let doctor = api.get("/v1/doctor").await;
    assert_eq!(doctor["ok"], true, "{doctor}");

    // Clients that do not trust the CA, or that speak plain HTTP, get nothing.
    let untrusting = reqwest::Client::new();
    for url in [&balancer_url, &agent_url] {
        let err = untrusting
            .get(format!("{url}/healthz"))
            .send()
            .await
            .expect_err("a client without the CA must refuse the certificate");
        assert!(err.is_connect(), "{err:?}");
        let plain = url.replace("https://", "http://");
        assert!(
            untrusting
                .get(format!("{plain}/healthz"))
                .send()
                .await
                .is_err(),
            "plain HTTP to a TLS port must fail"
        );
    }
    // Graceful shutdown works over TLS as over HTTP.
    assert!(
        agent_process.terminate(),
        "SIGTERM stops the TLS server cleanly"
    );
    assert!(
        balancer.terminate(),
        "SIGTERM stops the TLS balancer cleanly"
    );
}

/// A flood of idle connections from one host — more than the balancer's bound on handshakes in
/// progress — must not stall anyone else's: accepting goes on, the flooding address is held to
/// its own share, and a client on another address is served while the flood still holds its
/// connections open (they would only be dropped at the 5 s handshake timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_one_host_does_not_stall_others() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let tls = [
        "--tls-cert".to_owned(),
        path(&pki.cert),
        "--tls-key".to_owned(),
        path(&pki.key),
    ];
    let _balancer = start_balancer(dir.path(), port, &tls, &trusting(&pki.ca)).await;

    // 1,100 connections from 127.0.0.2 that never send a ClientHello: past the 1,024
    // handshakes the balancer runs at once.
    let mut flood = Vec::new();
    for _ in 0..1_100 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
        {
            flood.push(stream);
        }
    }
    assert!(flood.len() > 1_024, "the flood connected: {}", flood.len());

    let started = Instant::now();
    let answer = trusting(&pki.ca)
        .get(format!("{url}/healthz"))
        .timeout(Duration::from_secs(4))
        .send()
        .await
        .expect("served while the flood holds its connections");
    assert!(answer.status().is_success());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before any flooding handshake timed out"
    );
    drop(flood);
}
