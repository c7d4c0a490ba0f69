//! A real Prometheus for the observability test: found on `PATH` (Debian's `prometheus`
//! package), started on a free loopback port with a throwaway storage directory, and queried
//! over its HTTP API. Also the small pure helpers that test needs: rewriting the example scrape
//! configuration to the test's ports, collecting every PromQL expression of a Grafana dashboard,
//! substituting Grafana's template variables, and naming the metrics an expression reads.

use crate::process::free_port;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `prometheus` and `promtool` binaries.
pub struct Tools {
    /// The server.
    pub prometheus: PathBuf,
    /// Its checker (`check config`, `check rules`).
    pub promtool: PathBuf,
}

/// Finds `name` in a `PATH`-style list of directories.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The Prometheus tools, or `None` after a loud message when they are absent outside CI.
/// With `CI=true` their absence fails the test: CI installs them (`.ci/run`), so a missing
/// binary there is a broken pipeline, not a reason to skip.
pub fn tools(test: &str) -> Option<Tools> {
    match (on_path("prometheus"), on_path("promtool")) {
        (Some(prometheus), Some(promtool)) => Some(Tools {
            prometheus,
            promtool,
        }),
        _ => {
            let msg = format!(
                "{test}: `prometheus` and `promtool` are not on PATH; install Debian's package \
                 (apt-get install -y prometheus) to run this test"
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: {msg}"
            );
            eprintln!("\n!!! SKIPPED {msg}\n");
            None
        }
    }
}

/// Runs `promtool` with `args`; `Err` carries its output when it fails.
pub fn promtool(tools: &Tools, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&tools.promtool)
        .args(args)
        .output()
        .map_err(|e| format!("run promtool: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("promtool {}: {text}", args.join(" ")))
    }
}

/// Rewrites an example scrape configuration for a test: every job's `targets:` list becomes
/// `targets[job]`, every `*_interval:` becomes `interval`, and `rule_files` entries are made
/// absolute against `rules_dir`. Line-based on purpose: the example keeps one `targets:` list
/// per job on one line, and the rewrite leaves every other line as the operator reads it.
pub fn rewrite_scrape_config(
    example: &str,
    targets: &BTreeMap<&str, Vec<String>>,
    interval: &str,
    rules_dir: &Path,
) -> Result<String, String> {
    let mut out = String::new();
    let mut job: Option<String> = None;
    let mut in_rule_files = false;
    let mut rewritten = BTreeSet::new();
    for line in example.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if !line.starts_with(' ') && !trimmed.is_empty() && !trimmed.starts_with('#') {
            in_rule_files = trimmed.starts_with("rule_files:");
        }
        let text = if let Some(name) = trimmed
            .strip_prefix("- job_name:")
            .or_else(|| trimmed.strip_prefix("job_name:"))
        {
            job = Some(name.trim().trim_matches('"').to_owned());
            line.to_owned()
        } else if let Some(rest) = trimmed.strip_prefix("- targets:") {
            let name = job.clone().ok_or("a targets list outside any job")?;
            if !rest.trim().starts_with('[') {
                return Err(format!("job {name}: keep its targets on one line"));
            }
            let list = targets
                .get(name.as_str())
                .ok_or_else(|| format!("the test has no targets for job {name}"))?;
            rewritten.insert(name);
            format!("{indent}- targets: {}", serde_json::json!(list))
        } else if let Some((key, _)) = trimmed.split_once("_interval:") {
            format!("{indent}{key}_interval: {interval}")
        } else if in_rule_files && let Some(file) = trimmed.strip_prefix("- ") {
            let path = rules_dir.join(file.trim().trim_matches('"'));
            format!(
                "{indent}- {}",
                serde_json::json!(path.display().to_string())
            )
        } else {
            line.to_owned()
        };
        out.push_str(&text);
        out.push('\n');
    }
    for name in targets.keys() {
        if !rewritten.contains(*name) {
            return Err(format!("the example has no job {name}"));
        }
    }
    Ok(out)
}

/// One PromQL expression found in a dashboard, with where it was found.
#[derive(Debug, Clone)]
pub struct DashboardQuery {
    /// Dashboard title, panel title and target (or variable) name, for failure messages.
    pub location: String,
    /// The expression, template variables still in it.
    pub expr: String,
    /// A template variable's query, which may legitimately find nothing on a small estate.
    pub variable: bool,
}

/// Every PromQL expression of a Grafana dashboard: panel targets (rows' nested panels too) and
/// template variables' queries, `label_values(…)` turned into the PromQL it stands for.
pub fn dashboard_queries(dashboard: &Value) -> Vec<DashboardQuery> {
    let title = dashboard["title"].as_str().unwrap_or("?").to_owned();
    let mut found = Vec::new();
    fn panels(title: &str, list: &Value, found: &mut Vec<DashboardQuery>) {
        for panel in list.as_array().into_iter().flatten() {
            let name = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    found.push(DashboardQuery {
                        location: format!(
                            "{title} / {name} / {}",
                            target["refId"].as_str().unwrap_or("?")
                        ),
                        expr: expr.to_owned(),
                        variable: false,
                    });
                }
            }
            panels(title, &panel["panels"], found);
        }
    }
    panels(&title, &dashboard["panels"], &mut found);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default();
        found.push(DashboardQuery {
            location: format!(
                "{title} / variable ${}",
                var["name"].as_str().unwrap_or("?")
            ),
            expr: variable_promql(query),
            variable: true,
        });
    }
    found
}

/// The PromQL a Grafana variable query runs: `label_values(m, l)` → `group by (l) (m)`,
/// `query_result(e)` → `e`; anything else is taken as PromQL.
fn variable_promql(query: &str) -> String {
    let query = query.trim();
    if let Some(inner) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        && let Some((metric, label)) = inner.rsplit_once(',')
    {
        return format!("group by ({}) ({})", label.trim(), metric.trim());
    }
    if let Some(inner) = query
        .strip_prefix("query_result(")
        .and_then(|q| q.strip_suffix(')'))
    {
        return inner.to_owned();
    }
    query.to_owned()
}

/// Replaces Grafana's template variables (`$name`, `${name}`, `${name:format}`) with `values`;
/// `Err` names a variable `values` does not define, so a typo in a variable fails the test.
pub fn substitute(expr: &str, values: &BTreeMap<&str, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            let name = braced[..end].split(':').next().unwrap_or_default();
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = values
            .get(name)
            .ok_or_else(|| format!("undefined template variable ${name} in {expr}"))?;
        out.push_str(value);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The allot metric names an expression reads (`allot_…` identifiers outside strings), with
/// the histogram suffixes kept: Prometheus lists `…_bucket`, `…_sum` and `…_count` as names.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_string: Option<char> = None;
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = in_string {
            if c == '\\' {
                i += 1;
            } else if c == q {
                in_string = None;
            }
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            in_string = Some(c);
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("allot_") {
                names.insert(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

/// Percent-encodes a form value (everything but unreserved characters).
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback, killed on drop.
pub struct Prometheus {
    child: Child,
    /// Its base URL.
    pub url: String,
    http: reqwest::Client,
    _storage: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` with `config_file` and waits (at most 30 s) until it is ready.
    pub async fn start(tools: &Tools, config_file: &Path) -> Self {
        let storage = tempfile::tempdir().expect("a storage directory");
        let port = free_port();
        let child = Command::new(&tools.prometheus)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", storage.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", tools.prometheus.display()));
        let mut prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _storage: storage,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = prometheus
                .http
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await
                && r.status().is_success()
            {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited at start ({status}); see its log above");
            }
            assert!(Instant::now() < deadline, "prometheus never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET` of an API path; the `data` field, or the API's error.
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Self::data(r).await
    }

    /// Evaluates `expr` now (`/api/v1/query`); the result vector, or Prometheus's error.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let r = self
            .http
            .post(format!("{}/api/v1/query", self.url))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(format!("query={}", form_encode(expr)))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let data = Self::data(r).await?;
        Ok(match &data["result"] {
            Value::Array(series) => series.clone(),
            Value::Null => Vec::new(),
            // A scalar or string result is one value.
            other => vec![other.clone()],
        })
    }

    async fn data(r: reqwest::Response) -> Result<Value, String> {
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "{status} {}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ))
        }
    }

    /// Every metric name Prometheus has stored.
    pub async fn metric_names(&self) -> BTreeSet<String> {
        let names = self
            .get("/api/v1/label/__name__/values")
            .await
            .expect("metric names");
        names
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect()
    }

    /// Waits (at most `limit`) until every one of `targets` targets is up and has been scraped
    /// `scrapes` times.
    pub async fn wait_scraped(&self, targets: usize, scrapes: u32, limit: Duration) {
        let deadline = Instant::now() + limit;
        let expr = "count_over_time(up[5m]) and on (instance, job) up == 1";
        loop {
            if let Ok(series) = self.query(expr).await
                && series.len() == targets
                && series.iter().all(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|n| n >= f64::from(scrapes))
                })
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape all {targets} targets {scrapes} times: {:?}",
                self.get("/api/v1/targets").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_replaces_every_form_and_refuses_unknown_variables() {
        let values = BTreeMap::from([
            ("server", "paris".to_owned()),
            ("__rate_interval", "1m".to_owned()),
        ]);
        assert_eq!(
            substitute(
                r#"rate(x{server="$server"}[$__rate_interval]) + y{s="${server:regex}"}"#,
                &values
            )
            .unwrap(),
            r#"rate(x{server="paris"}[1m]) + y{s="paris"}"#
        );
        assert!(substitute("x{a=\"$nope\"}", &values).is_err());
    }

    #[test]
    fn metric_names_skip_strings_and_functions() {
        let names = metric_names(
            r#"sum by (le) (rate(allot_a_bucket{x="allot_not"}[5m])) / allot_b or vector(0)"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["allot_a_bucket", "allot_b"]
        );
    }

    #[test]
    fn label_values_becomes_a_group_by() {
        assert_eq!(
            variable_promql(r#"label_values(allot_x{server="$server"}, product)"#),
            r#"group by (product) (allot_x{server="$server"})"#
        );
    }
}
