//! Real allot processes for end-to-end tests: built by cargo, started on a free loopback port,
//! waited for with a deadline, killed (gracefully or with SIGKILL) on demand and on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace's target directory binaries live in (next to this test's executable).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf()
}

/// The path of a workspace binary, built once per test process so it is never stale.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "allot-balancer",
                "-p",
                "allot-agent",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the allot binaries failed");
    });
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Where [`free_port`] looks: below Linux's ephemeral range (32768–60999 by default), from which
/// the kernel takes the local port of every outgoing connection. A port found free by binding
/// port 0 lies in that range, and a parallel test's connection to PostgreSQL or to an agent can
/// take it before the child process binds it (a start-up that then never becomes healthy).
const FREE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback port, chosen at random in [`FREE_PORTS`]. Another test could still pick the
/// same port before our child binds it, but only within that short window and one chance in
/// twelve thousand.
pub fn free_port() -> u16 {
    let span = u128::from(FREE_PORTS.end - FREE_PORTS.start);
    for _ in 0..1_000 {
        let offset = u16::try_from(uuid::Uuid::new_v4().as_u128() % span).expect("below the span");
        let port = FREE_PORTS.start + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
pub struct Running {
    child: Child,
    /// The base URL the process serves, e.g. `http://127.0.0.1:40123`.
    pub url: String,
}

impl Running {
    /// Starts `binary` with `args` and `envs`, serving on `port`, and waits until `/healthz`
    /// answers (at most 30 s).
    pub async fn start(binary: &Path, args: &[&str], envs: &[(&str, &str)], port: u16) -> Self {
        let url = format!("http://127.0.0.1:{port}");
        Self::start_at(binary, args, envs, url, &reqwest::Client::new()).await
    }

    /// Like [`Running::start`] for a process serving `url` (e.g. `https://…`), polled with
    /// `client` (e.g. one that trusts a test CA).
    pub async fn start_at(
        binary: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        url: String,
        client: &reqwest::Client,
    ) -> Self {
        let url_shown = url.clone();
        Self::try_start_at(binary, args, envs, url, client)
            .await
            .unwrap_or_else(|status| {
                panic!("the process for {url_shown} exited before it became healthy: {status}")
            })
    }

    /// Like [`Running::start_at`], but a process that exits before it becomes healthy (e.g.
    /// because another test bound its port first) is its exit status, for a caller that can
    /// try again on other ports.
    pub async fn try_start_at(
        binary: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        url: String,
        client: &reqwest::Client,
    ) -> Result<Self, std::process::ExitStatus> {
        let child = Command::new(binary)
            .args(args)
            // No balancer's console on its default port (tests run in parallel); a test that
            // wants one passes `--console-listen` (see `Balancer::start_with`).
            .env("ALLOT_CONSOLE_LISTEN", "off")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut running = Self { child, url };
        running
            .wait_healthy(client, Duration::from_secs(30))
            .await?;
        Ok(running)
    }

    /// Polls `/healthz` until it answers; returns at once, with the exit status, if the
    /// process has ended (e.g. its port was taken), rather than waiting out `limit`.
    async fn wait_healthy(
        &mut self,
        client: &reqwest::Client,
        limit: Duration,
    ) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "{} never became healthy",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the signal named `name` (e.g. `STOP`, `CONT`), as `kill -<name>` does.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most `limit`) for the process to exit by itself; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGTERM, then wait (at most 30 s) for a graceful exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill9();
    }
}
