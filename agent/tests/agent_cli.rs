//! The `allot-agent run` wrapper and `allot-agent status`, as a user runs them.

use allot_agent::server::{LocalProduct, ServerConfig, run};
use serde_json::json;
use std::process::Command;
use std::time::Duration;
use tokio::sync::oneshot;

struct Server {
    url: String,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

async fn start(allocation: u32) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path());
    config.products = vec![LocalProduct {
        product: "cad".into(),
        allocation: Some(allocation),
        policy: serde_json::from_value(json!({"heartbeat_seconds": 1, "staleout_seconds": 60}))
            .unwrap(),
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(run(listener, config, async move {
        let _ = rx.await;
    }));
    let client = allot_agent::client::Client::new(&url).unwrap();
    for _ in 0..500 {
        if client.health().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Server {
        url,
        _dir: dir,
        _stop: tx,
    }
}

async fn in_use(url: &str) -> u32 {
    let c = allot_agent::client::Client::new(url).unwrap();
    c.products().await.unwrap().products[0].in_use
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_allot-agent"))
}

async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_the_commands_status_and_checks_in() {
    let s = start(1).await;
    let mut cmd = agent();
    cmd.args([
        "run",
        "--url",
        &s.url,
        "--product",
        "cad",
        "--user",
        "ann",
        "--host",
        "h",
        "--",
    ])
    .args(["sh", "-c", "exit 3"]);
    let out = output(cmd).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        in_use(&s.url).await,
        0,
        "checked in after the command exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_holds_the_license_while_the_command_runs() {
    let s = start(1).await;
    let mut cmd = agent();
    cmd.args(["run", "--url", &s.url, "--product", "cad", "--"])
        .args(["sleep", "2"]);
    let child = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let mut seen = false;
    for _ in 0..150 {
        if in_use(&s.url).await == 1 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the license is held while the command runs");
    let out = child.await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(in_use(&s.url).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_run_prints_the_reason_and_exits_75() {
    let s = start(0).await;
    let mut cmd = agent();
    cmd.args(["run", "--url", &s.url, "--product", "cad", "--"])
        .args(["sh", "-c", "echo ran"]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&out.stderr).contains("license_unavailable"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ran"),
        "the command never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_to_the_command_and_the_license_checked_in() {
    let s = start(1).await;
    let child = agent()
        .args([
            "run",
            "--url",
            &s.url,
            "--product",
            "cad",
            "--",
            "sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    let mut held = false;
    for _ in 0..300 {
        if in_use(&s.url).await == 1 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held);
    // Give the wrapper a moment to have spawned the command and installed its handlers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(128 + 15),
        "exit status of a command ended by SIGTERM"
    );
    assert_eq!(in_use(&s.url).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_or_json() {
    let s = start(4).await;
    let mut cmd = agent();
    cmd.args(["status", "--url", &s.url]);
    let out = output(cmd).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("PRODUCT"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("cad") && l.contains("hard_stop")),
        "{text}"
    );
    let mut cmd = agent();
    cmd.args(["status", "--json", "--url", &s.url]);
    let out = output(cmd).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["products"][0]["allocated"], 4);
}
