//! A throwaway PostgreSQL cluster of a test's own, for tests that restart the database: the
//! shared server at 127.0.0.1:5432 serves other tests in parallel and must never be restarted.
//!
//! The cluster is made with `initdb` and run with `pg_ctl` from `/usr/lib/postgresql/*/bin/`
//! (or `PATH`), as `scripts/test` does; when the test runs as root it runs as the `postgres`
//! user through `runuser`, since PostgreSQL refuses to run as root. It is stopped and removed
//! when the value is dropped.

use crate::process::free_port;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running throwaway cluster.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_root: bool,
}

/// The directory of the newest installed PostgreSQL server binaries, if any.
fn server_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    // Versions are directory names ("15", "16"): the newest sorts last numerically.
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().or_else(|| {
        let which = Command::new("sh")
            .args(["-c", "command -v pg_ctl"])
            .output()
            .ok()?;
        let path = String::from_utf8(which.stdout).ok()?;
        Path::new(path.trim()).parent().map(Path::to_path_buf)
    })
}

impl PgCluster {
    /// Creates and starts a cluster on a free port, or returns `None` (after saying so loudly
    /// on stderr) when PostgreSQL's server binaries are not installed and not required; under
    /// `CI=true` (or `ALLOT_TEST_REQUIRE_PG=1`) their absence panics.
    pub fn start(test: &str) -> Option<Self> {
        let Some(bin) = server_bin_dir() else {
            assert!(
                !crate::pg::required(),
                "{test} needs PostgreSQL's server binaries (initdb, pg_ctl) under CI=true"
            );
            eprintln!(
                "\n*** SKIPPED {test}: PostgreSQL's server binaries (initdb, pg_ctl) are not \
                 installed; it restarts a PostgreSQL cluster of its own.\n\
                 *** Install PostgreSQL (e.g. apt install postgresql). With CI=true this is a \
                 failure.\n"
            );
            return None;
        };
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let dir = tempfile::Builder::new()
            .prefix("allot-pg-")
            .tempdir()
            .expect("a directory for the cluster");
        let cluster = Self {
            bin,
            dir,
            port: free_port(),
            as_root,
        };
        if as_root {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            let owned = Command::new("chown")
                .arg("postgres")
                .arg(cluster.dir.path())
                .status()
                .expect("run chown");
            assert!(owned.success(), "chown of the cluster directory failed");
        }
        let data = cluster.data_dir().display().to_string();
        cluster.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust"]);
        cluster.start_server();
        Some(cluster)
    }

    /// The URL of the cluster's `postgres` database (the test owns the whole cluster).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Crashes the server (`pg_ctl -m immediate stop`: no shutdown checkpoint, every session
    /// cut, as a kill -9 of the database would) and starts it again on the same data.
    pub fn restart_immediate(&self) {
        self.stop_immediate();
        self.start_server();
    }

    /// Crashes the server (`pg_ctl -m immediate stop`) and leaves it down.
    pub fn stop_immediate(&self) {
        let data = self.data_dir().display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server again on the same data and port (after [`PgCluster::stop_immediate`]).
    pub fn start_server(&self) {
        let data = self.data_dir().display().to_string();
        let log = self.dir.path().join("log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// One of the cluster's binaries, to be run as the cluster's owner.
    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    /// Runs one of the cluster's binaries; panics with its output on failure.
    fn run(&self, tool: &str, args: &[&str]) {
        let output = self
            .command(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data_dir().display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
