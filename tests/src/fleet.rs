//! A balancer and its metering servers as real child processes on loopback: the fleet the
//! balancing tests drive over HTTP and kill at awkward moments.

use crate::Backend;
use crate::balancer::{Api, Balancer};
use crate::process::{Running, binary, free_port};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A metering server process registered with the fleet's balancer.
pub struct Meter {
    /// The server's registered name.
    pub name: String,
    /// Its token, as the balancer gave it at registration.
    pub token: String,
    process: Option<Running>,
    port: u16,
    data_dir: PathBuf,
    balancer_url: String,
    env: Vec<(String, String)>,
}

impl Meter {
    /// The server's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client of its API, with its token (for the balancer-facing calls).
    pub fn api(&self) -> Api {
        Api::new(&self.url(), Some(&self.token))
    }

    /// Starts (or restarts) the process with extra environment `env` (e.g. a crash point).
    pub async fn start(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let port = self.port.to_string();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = self.data_dir.display().to_string();
        let args = [
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            &data_dir,
            "--name",
            &self.name,
            "--token",
            &self.token,
            "--balancer",
            &self.balancer_url,
            "--sync-seconds",
            "1",
        ];
        let mut envs: Vec<(&str, &str)> = vec![("RUST_LOG", "warn")];
        envs.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.process = Some(Running::start(&binary("allot-agent"), &args, &envs, self.port).await);
    }

    /// Starts it again with the environment of its last start (after [`Meter::kill9`]), on the
    /// same port and data directory.
    pub async fn restart(&mut self) {
        let env = std::mem::take(&mut self.env);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.start(&env).await;
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// SIGSTOP: the process freezes with its sockets open, so requests hang rather than fail,
    /// until [`Meter::resume`]; its clock runs on meanwhile.
    pub fn pause(&self) {
        if let Some(p) = &self.process {
            p.signal("STOP");
        }
    }

    /// SIGCONT after [`Meter::pause`].
    pub fn resume(&self) {
        if let Some(p) = &self.process {
            p.signal("CONT");
        }
    }

    /// Waits (at most `limit`) for the process to exit by itself, e.g. at a crash point.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        self.process.as_mut().is_some_and(|p| p.wait_exit(limit))
    }

    /// Checks out `units` of `product` for `user`; answers status and body.
    pub async fn checkout(&self, product: &str, user: &str) -> (u16, Value) {
        let (status, body) = Api::new(&self.url(), None)
            .send(
                reqwest::Method::POST,
                "/v1/checkout",
                Some(json!({"product": product, "user": user, "host": "h"})),
            )
            .await;
        (status.as_u16(), body)
    }

    /// Checks a handle in.
    pub async fn checkin(&self, handle: &str) {
        let (status, body) = Api::new(&self.url(), None)
            .send(
                reqwest::Method::POST,
                "/v1/checkin",
                Some(json!({"handle": handle})),
            )
            .await;
        assert_eq!(status.as_u16(), 200, "checkin: {body}");
    }

    /// The server's own view of a product (allocated, in use, free, waiting).
    pub async fn product(&self, product: &str) -> Value {
        let products = Api::new(&self.url(), None).get("/v1/products").await;
        products["products"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["product"] == product))
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// A balancer with metering servers.
pub struct Fleet {
    /// The balancer.
    pub balancer: Balancer,
    /// The metering servers, in registration order.
    pub meters: Vec<Meter>,
    /// The books' backend; kept alive for the fleet's lifetime.
    pub backend: Backend,
    /// Every balancer URL metering servers are given (`--balancer A,B`); the first balancer's
    /// alone when empty.
    pub balancer_urls: Vec<String>,
    /// Environment every metering server started from now on is given (see
    /// [`Fleet::meter_env`]).
    meter_env: Vec<(String, String)>,
}

impl Fleet {
    /// A balancer on `backend` (with `extra` serve flags and `env`) and no servers yet.
    pub async fn start(backend: Backend, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let balancer = Balancer::start_with(&backend, extra, env).await;
        // Tests run balances themselves; a scheduled run must not interleave with their steps.
        balancer
            .api()
            .put("/v1/schedule", json!({"cron": "0 0 1 1 *"}))
            .await;
        Self {
            balancer,
            meters: Vec::new(),
            backend,
            balancer_urls: Vec::new(),
            meter_env: Vec::new(),
        }
    }

    /// Gives every metering server added from now on `key=value` in its environment: e.g. a
    /// hold bound long enough that a test asserting every checkout is served does not turn on
    /// how fast a loaded CI machine answers an instant balance.
    pub fn meter_env(&mut self, key: &str, value: &str) {
        self.meter_env.push((key.to_owned(), value.to_owned()));
    }

    /// The admin API.
    pub fn api(&self) -> Api {
        self.balancer.api()
    }

    /// Registers a server named `name` and starts its process; returns its index.
    pub async fn add_meter(&mut self, name: &str) -> usize {
        let port = free_port();
        let balancer_url = if self.balancer_urls.is_empty() {
            self.balancer.url().to_owned()
        } else {
            self.balancer_urls.join(",")
        };
        self.add_meter_at(
            name,
            port,
            &format!("http://127.0.0.1:{port}"),
            &balancer_url,
        )
        .await
    }

    /// Registers a server named `name` that listens on `port` but is known to the balancer by
    /// `registered_url`, and starts it with `--balancer balancer_url`: either may be a proxy
    /// (see [`crate::proxy`]) so a test can cut the network between them. Returns its index.
    pub async fn add_meter_at(
        &mut self,
        name: &str,
        port: u16,
        registered_url: &str,
        balancer_url: &str,
    ) -> usize {
        let registered = self
            .api()
            .post(
                "/v1/servers",
                json!({"name": name, "url": registered_url, "site": name}),
            )
            .await;
        let data_dir = self.backend.data_dir.path().join(format!("meter-{name}"));
        std::fs::create_dir_all(&data_dir).expect("meter data dir");
        let mut meter = Meter {
            name: name.into(),
            token: registered["token"].as_str().expect("a token").into(),
            process: None,
            port,
            data_dir,
            balancer_url: balancer_url.to_owned(),
            env: Vec::new(),
        };
        let env: Vec<(&str, &str)> = self
            .meter_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        meter.start(&env).await;
        self.meters.push(meter);
        self.meters.len() - 1
    }

    /// Defines a product with `units` purchased.
    pub async fn product(&self, name: &str, units: u32) {
        self.api().post("/v1/products", json!({"name": name})).await;
        self.api()
            .post(
                &format!("/v1/products/{name}/entitlements"),
                json!({"units": units}),
            )
            .await;
    }

    /// Checks out `n` units one at a time at meter `meter` (users `user<meter>-<i>`); returns
    /// the handles of those granted.
    pub async fn checkout_n(&self, meter: usize, product: &str, n: usize) -> Vec<String> {
        let mut handles = Vec::new();
        for i in 0..n {
            let (status, body) = self.meters[meter]
                .checkout(product, &format!("user{meter}-{i}"))
                .await;
            if status == 200 {
                handles.push(body["handle"].as_str().unwrap().to_owned());
            }
        }
        handles
    }

    /// Sets a cell's min and buffer.
    pub async fn limits(&self, server: &str, product: &str, min: u32, buffer: u32) {
        self.api()
            .put(
                &format!("/v1/servers/{server}/products/{product}"),
                json!({"min_units": min, "buffer_units": buffer}),
            )
            .await;
    }

    /// Runs a manual balance; returns the run.
    pub async fn balance(&self) -> Value {
        self.api().post("/v1/balance", json!({})).await
    }

    /// The books' allocation of `server` for `product`.
    pub async fn allocation(&self, server: &str, product: &str) -> u64 {
        let detail = self.api().get(&format!("/v1/products/{product}")).await;
        detail["servers"]
            .as_array()
            .and_then(|cells| cells.iter().find(|c| c["server"] == server))
            .and_then(|c| c["allocation"].as_u64())
            .unwrap_or(0)
    }

    /// Runs `sql` on the balancer's database behind its back: how a test breaks the books or
    /// moves the clock of a stored row.
    pub async fn execute_sql(&self, sql: &str) {
        use sqlx::{Connection, Executor};
        match &self.backend.database_url {
            Some(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                conn.execute(sqlx::AssertSqlSafe(sql.to_owned()))
                    .await
                    .unwrap();
            }
            None => {
                let path = self.backend.data_dir.path().join("allot.db");
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                conn.execute(sqlx::AssertSqlSafe(sql.to_owned()))
                    .await
                    .unwrap();
            }
        }
    }

    /// The doctor's report.
    pub async fn doctor(&self) -> Value {
        self.api().get("/v1/doctor").await
    }

    /// Waits until every server knows `product` (they learn it by syncing).
    pub async fn wait_synced(&self, product: &str) {
        for meter in &self.meters {
            let deadline = Instant::now() + Duration::from_secs(20);
            while meter.product(product).await.is_null() {
                assert!(
                    Instant::now() < deadline,
                    "{} never learned {product}",
                    meter.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Asserts that the doctor finds the books and every server in agreement once the servers'
    /// own proactive pulls (moves briefly in flight) have settled: a real discrepancy persists
    /// past the 10 s it is given.
    pub async fn assert_doctor_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let report = self.doctor().await;
            if report["ok"] == true {
                return;
            }
            assert!(Instant::now() < deadline, "doctor: {report:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asserts invariant 2 as the servers see it: the allocations they have applied never sum
    /// above what was purchased.
    pub async fn assert_no_over_grant(&self, product: &str, purchased: u64) {
        let mut applied = 0;
        for meter in &self.meters {
            applied += meter.product(product).await["allocated"]
                .as_u64()
                .unwrap_or(0);
        }
        assert!(
            applied <= purchased,
            "servers applied {applied} > purchased {purchased}"
        );
    }
}
