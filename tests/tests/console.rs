//! The operator's console (issue 17), end to end: a real `allot-balancer` with real
//! `allot-agent` metering servers on loopback, and a real headless Chromium driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`; the test starts `chromedriver` itself).
//!
//! In the browser (SQLite): log in, every page shows the books' real data (screenshots of each
//! go to `docs/img/console-*.png`), a force release frees the unit and is audited under the
//! operator's name, the estate refreshes itself, a viewer sees no form and a forged change of
//! theirs is refused, logging out ends the session, the layout fits a phone's width, and the
//! browser meets no error (script, rejected promise or CSP violation) on any page.
//!
//! Over HTTP (both backends): the session cookie's attributes, the CSP, a change without (or
//! with a wrong) CSRF token refused, a viewer's forged change refused, bad input answered 400
//! with no change, operators on the API with HTTP Basic (a viewer reads only; an admin's change
//! audited under their name), a removed operator's session ended, no secret in any page, and
//! logins throttled.
//!
//! Without chromium the browser test fails under `CI=true` and says how to install it;
//! elsewhere it says so and returns.

use allot_tests::balancer::{ADMIN_TOKEN, Api, Balancer};
use allot_tests::fleet::Fleet;
use allot_tests::process::free_port;
use allot_tests::{Backend, eventually, on_both_backends};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ANN: (&str, &str) = ("ann", "ann-password-123");
const VIC: (&str, &str) = ("vic", "vic-password-123");

/// Adds the admin `ann` and the viewer `vic` through the API (with the admin token).
async fn operators(api: &Api) {
    for ((name, password), role) in [(ANN, "admin"), (VIC, "viewer")] {
        let (status, body) = api
            .send(
                reqwest::Method::POST,
                "/v1/operators",
                Some(json!({"name": name, "role": role, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

// ---------------------------------------------------------------------------------------------
// The browser.

/// A path to an executable, from `env` or the first of `candidates` that exists.
fn executable(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(path) = std::env::var(env) {
        return Some(PathBuf::from(path));
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// `chromedriver` on a free loopback port and a WebDriver session of headless Chromium;
/// chromedriver (and with it the browser) is killed when this is dropped.
struct Browser {
    client: Client,
    driver: std::process::Child,
}

impl Drop for Browser {
    /// Kills chromedriver's whole process group: the browser it started goes with it (killing
    /// chromedriver alone leaves Chromium's processes behind).
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// A fresh browser, or `None` (with a note) when Chromium is not installed outside CI.
    async fn start() -> Option<Browser> {
        Self::start_with(&[]).await
    }

    /// A fresh browser with extra Chromium flags.
    async fn start_with(flags: &[&str]) -> Option<Browser> {
        let driver = executable(
            "CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        );
        let chromium = executable(
            "CHROMIUM",
            &["/usr/bin/chromium", "/usr/lib/chromium/chromium"],
        );
        let (Some(driver), Some(chromium)) = (driver, chromium) else {
            let message = "the console's browser tests need Debian's `chromium` and \
                           `chromium-driver` (apt-get install chromium chromium-driver; .ci/run \
                           installs them), or CHROMIUM and CHROMEDRIVER naming the binaries";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
            eprintln!("SKIPPED: {message}");
            return None;
        };
        let port = free_port();
        let driver = std::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", driver.display()));
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let status = format!("{url}/status");
        eventually("chromedriver answers", Duration::from_secs(30), || {
            let http = http.clone();
            let status = status.clone();
            async move {
                http.get(&status)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            "--hide-scrollbars",
            "--lang=en-GB",
        ];
        args.extend_from_slice(flags);
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chromium, "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a WebDriver session of headless Chromium");
        Some(Browser { client, driver })
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .expect("text")
    }

    async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .expect("find_all")
            .len()
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current url")
            .path()
            .to_owned()
    }

    async fn login(&self, console: &str, (name, password): (&str, &str)) {
        self.goto(&format!("{console}/login")).await;
        let form = self
            .client
            .form(Locator::Css("form"))
            .await
            .expect("login form");
        form.set_by_name("name", name).await.expect("name");
        form.set_by_name("password", password)
            .await
            .expect("password");
        form.submit().await.expect("submit");
        self.wait_for_path("/").await;
        assert!(self.text("#operator").await.contains(name));
    }

    async fn logout(&self) {
        self.client
            .find(Locator::Id("logout"))
            .await
            .expect("logout button")
            .click()
            .await
            .expect("click logout");
        self.wait_for_path("/login").await;
    }

    /// Waits for the navigation a click or a submit started to land on `path`.
    async fn wait_for_path(&self, path: &str) {
        eventually(
            &format!("the browser is at {path}"),
            Duration::from_secs(20),
            || async { self.path().await == path },
        )
        .await;
    }

    /// Every error the page script collected in this tab (see `console.js`).
    async fn errors(&self) -> Vec<String> {
        let value = self
            .client
            .execute(
                "return sessionStorage.getItem('allot-errors') || '[]';",
                vec![],
            )
            .await
            .expect("read the error collector");
        serde_json::from_str(value.as_str().unwrap_or("[]")).unwrap_or_default()
    }

    /// Saves a screenshot of the page as `docs/img/console-<name>.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
        std::fs::create_dir_all(&dir).expect("docs/img");
        std::fs::write(dir.join(format!("console-{name}.png")), png).expect("write screenshot");
    }

    /// POSTs a form from inside the page (same origin, the session's cookie); the status.
    async fn post_from_page(&self, path: &str, body: &str) -> u64 {
        self.client
            .execute_async(
                "const [path, body, done] = arguments; \
                 fetch(path, {method: 'POST', body, redirect: 'manual', \
                   headers: {'content-type': 'application/x-www-form-urlencoded'}}) \
                 .then(r => done(r.status), e => done(String(e)));",
                vec![json!(path), json!(body)],
            )
            .await
            .expect("fetch from the page")
            .as_u64()
            .expect("a status")
    }
}

/// An estate: `cad` (4 units, one expiring in 20 days) on `paris`, `sim` (2 units) in the
/// reserve; one unit of `cad` checked out by `user0-0`; a manual run recorded the usage.
async fn estate() -> (Fleet, String) {
    let mut fleet = Fleet::start(Backend::sqlite(), &[], &[]).await;
    let api = fleet.api();
    for product in ["cad", "sim"] {
        api.post(
            "/v1/products",
            json!({"name": product, "enforcement": "hard_stop", "heartbeat_seconds": 60,
                   "staleout_seconds": 3600}),
        )
        .await;
    }
    api.post(
        "/v1/products/cad/entitlements",
        json!({"units": 3, "reference": "PO-1"}),
    )
    .await;
    let expires = chrono::Utc::now() + chrono::Duration::days(20);
    api.post(
        "/v1/products/cad/entitlements",
        json!({"units": 1, "expires_at": expires, "reference": "PO-2"}),
    )
    .await;
    api.post("/v1/products/sim/entitlements", json!({"units": 2}))
        .await;
    fleet.add_meter("paris").await;
    fleet.wait_synced("cad").await;
    fleet.limits("paris", "cad", 2, 1).await;
    fleet.balance().await;
    let handles = fleet.checkout_n(0, "cad", 1).await;
    assert_eq!(handles.len(), 1);
    // sim lets its seats linger and be borrowed: one of each shows on the checkouts page.
    api.put(
        "/v1/products/sim/policy",
        json!({"heartbeat_seconds": 60, "staleout_seconds": 3600,
               "options": {"linger_seconds": 3600, "max_borrow_hours": 8}}),
    )
    .await;
    fleet.limits("paris", "sim", 2, 0).await;
    fleet.balance().await;
    let meter = &fleet.meters[0];
    eventually(
        "paris lets sim be borrowed",
        Duration::from_secs(20),
        || async { meter.product("sim").await["policy"]["options"]["max_borrow_hours"] == 8 },
    )
    .await;
    let (status, borrowed) = Api::new(&meter.url(), None)
        .send(
            reqwest::Method::POST,
            "/v1/borrow",
            Some(json!({"product": "sim", "user": "ivy", "host": "ivy-laptop", "hours": 8})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{borrowed}");
    let (status, lingering) = meter.checkout("sim", "lee").await;
    assert_eq!(status, 200, "{lingering}");
    meter
        .checkin(lingering["handle"].as_str().expect("a handle"))
        .await;
    fleet.balance().await;
    operators(&api).await;
    (fleet, handles[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_real_browser_every_page_shows_the_books_and_a_force_release_is_audited_by_name() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let (fleet, handle) = estate().await;
    let console = fleet.balancer.console_url();
    let api = fleet.api();

    browser.login(&console, ANN).await;
    // The estate: the books' figures, the unit in use, the expiring purchase, the site.
    eventually(
        "the estate shows the unit in use",
        Duration::from_secs(20),
        || async {
            browser.goto(&format!("{console}/")).await;
            browser.text("tr[data-product='cad'] .in-use").await == "1"
        },
    )
    .await;
    let cad = browser.text("tr[data-product='cad']").await;
    for figure in ["cad", "4", "in 20 d"] {
        assert!(cad.contains(figure), "{figure:?} in {cad:?}");
    }
    assert!(browser.text("#sites").await.contains("paris"));
    browser.screenshot("estate").await;
    // Keyboard: the first Tab reaches the skip link, then the navigation.
    browser
        .client
        .find(Locator::Css("body"))
        .await
        .expect("body")
        .send_keys("\u{E004}")
        .await
        .expect("tab");
    let focused = browser
        .client
        .execute(
            "return document.activeElement.getAttribute('href');",
            vec![],
        )
        .await
        .expect("focus");
    assert_eq!(focused, json!("#main"), "the skip link comes first");
    // It refreshes itself without a reload.
    eventually(
        "the estate refreshes itself",
        Duration::from_secs(20),
        || async {
            browser
                .client
                .find(Locator::Id("live"))
                .await
                .expect("live region")
                .attr("data-refreshed-at")
                .await
                .expect("attr")
                .is_some()
        },
    )
    .await;

    // Every page, with the books' own data.
    let pages: &[(&str, &str, &str, &str)] = &[
        ("product", "/products/cad", "#cells", "paris"),
        ("checkouts", "/checkouts", "#holders", "user0-0"),
        ("usage", "/usage?by=site", "#renewal", "cad"),
        ("runs", "/runs", "#runs", "manual"),
        ("audit", "/audit", "#audit", "operator.add"),
        ("schedule", "/schedule", "#cron", "0 0 1 1 *"),
        ("entitlements", "/entitlements", "#entitlements", "PO-2"),
        ("servers", "/servers", "#servers", "paris"),
        ("operators", "/operators", "#operators", "vic"),
    ];
    for (name, path, css, expected) in pages {
        browser.goto(&format!("{console}{path}")).await;
        let text = browser.text(css).await;
        assert!(
            text.contains(expected),
            "{path}: {expected:?} not in {css}: {text:?}"
        );
        let html = browser.client.source().await.expect("page source");
        for secret in [ADMIN_TOKEN, handle.as_str()] {
            assert!(!html.contains(secret), "{path} renders a secret");
        }
        browser.screenshot(name).await;
    }
    // A borrowed and a lingering seat, each with the time it ends.
    browser.goto(&format!("{console}/checkouts")).await;
    for (state, user) in [("borrowed", "ivy"), ("lingering", "lee")] {
        let row = browser
            .text(&format!("#holders tr[data-state='{state}']"))
            .await;
        assert!(row.contains(user), "{state}: {row:?}");
        let until = browser
            .text(&format!("#holders tr[data-state='{state}'] .until"))
            .await;
        assert!(until.starts_with("20"), "{state} until {until:?}");
    }
    // The product page's cells are editable: min and buffer of paris.
    browser.goto(&format!("{console}/products/cad")).await;
    let form = browser
        .client
        .form(Locator::Css("tr[data-server='paris'] form"))
        .await
        .expect("limits form");
    form.set_by_name("buffer_units", "2").await.expect("buffer");
    form.submit().await.expect("save limits");
    eventually(
        "the change is reported",
        Duration::from_secs(20),
        || async { browser.count("#flash").await == 1 },
    )
    .await;
    assert!(browser.text("#flash").await.contains("buffer 2"));
    assert_eq!(
        api.get("/v1/products/cad").await["servers"][0]["buffer_units"],
        2
    );

    // Force release, with a reason and a confirmation.
    browser.goto(&format!("{console}/checkouts")).await;
    let row = browser
        .client
        .find(Locator::Css("#holders tbody tr[data-state='held']"))
        .await
        .expect("a holder row");
    row.find(Locator::Css("input[name='reason']"))
        .await
        .expect("reason")
        .send_keys("licence audit")
        .await
        .expect("type the reason");
    row.find(Locator::Css("input[name='confirm']"))
        .await
        .expect("confirm box")
        .click()
        .await
        .expect("tick");
    row.find(Locator::Css("button.danger"))
        .await
        .expect("release button")
        .click()
        .await
        .expect("click release");
    browser
        .client
        .accept_alert()
        .await
        .expect("confirm the dialog");
    eventually(
        "the release is reported",
        Duration::from_secs(20),
        || async { browser.count("#flash").await == 1 },
    )
    .await;
    assert!(
        browser
            .text("#flash")
            .await
            .contains("released 1 unit(s) of cad")
    );
    // The unit is free on the metering server, and the audit names ann.
    assert_eq!(fleet.meters[0].product("cad").await["in_use"], 0);
    let audit = api.get("/v1/audit?limit=20").await;
    let revoke = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "checkout.revoke")
        .unwrap_or_else(|| panic!("no revoke audited: {audit}"));
    assert_eq!(revoke["actor"], "ann", "{revoke}");
    browser.goto(&format!("{console}/audit")).await;
    let first = browser.text("#audit tbody tr:first-child").await;
    assert!(
        first.contains("ann") && first.contains("checkout.revoke"),
        "{first}"
    );

    // A phone's width: the page itself never scrolls sideways (wide tables scroll inside).
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("resize");
    browser.goto(&format!("{console}/")).await;
    let fits = browser
        .client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            vec![],
        )
        .await
        .expect("measure");
    assert_eq!(fits, json!(true), "the estate overflows a phone's width");
    browser.screenshot("estate-phone").await;
    browser
        .client
        .set_window_size(1280, 900)
        .await
        .expect("resize");

    assert_eq!(
        browser.errors().await,
        Vec::<String>::new(),
        "errors in the browser"
    );
    browser.logout().await;
    // The session is over: the console sends the browser back to the login form.
    browser.goto(&format!("{console}/checkouts")).await;
    assert_eq!(browser.path().await, "/login");
    browser.screenshot("login").await;

    // A viewer reads everything and is offered no change; a forged one is refused.
    browser.login(&console, VIC).await;
    for (path, css) in [
        ("/checkouts", "form[action$='/revoke']"),
        ("/products/cad", "form[action$='/limits']"),
        ("/entitlements", "form[action='/entitlements']"),
        ("/operators", "form[action='/operators']"),
        ("/servers", "form[action$='/drain']"),
        ("/schedule", "form[action='/schedule']"),
    ] {
        browser.goto(&format!("{console}{path}")).await;
        assert_eq!(
            browser.count(css).await,
            0,
            "a viewer is offered {css} on {path}"
        );
    }
    let before = api.get("/v1/products/cad/entitlements").await;
    let csrf = browser
        .client
        .find(Locator::Css("input[name='csrf']"))
        .await
        .expect("the logout form's token")
        .attr("value")
        .await
        .expect("value")
        .expect("a token");
    let status = browser
        .post_from_page(
            "/entitlements",
            &format!("csrf={csrf}&product=cad&units=5&expires=&reference="),
        )
        .await;
    assert_eq!(status, 403, "a viewer's forged change is refused");
    assert_eq!(api.get("/v1/products/cad/entitlements").await, before);
    assert_eq!(
        browser.errors().await,
        Vec::<String>::new(),
        "errors in the browser"
    );
    browser.logout().await;
    drop(browser);

    // Dark mode: the same pages, readable on a dark background.
    let Some(dark) = Browser::start_with(&[
        "--force-dark-mode",
        "--blink-settings=preferredColorScheme=0",
    ])
    .await
    else {
        return;
    };
    dark.login(&console, ANN).await;
    let background = dark
        .client
        .execute(
            "return getComputedStyle(document.body).backgroundColor;",
            vec![],
        )
        .await
        .expect("style");
    assert_eq!(
        background,
        json!("rgb(13, 17, 23)"),
        "the dark palette applies"
    );
    dark.screenshot("estate-dark").await;
    assert_eq!(
        dark.errors().await,
        Vec::<String>::new(),
        "errors in the browser"
    );
}

// ---------------------------------------------------------------------------------------------
// Over HTTP, on both backends.

/// A cookie-keeping HTTP client of the console that does not follow redirects.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A urlencoded form body.
fn urlencoded(pairs: &[(&str, &str)]) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Logs in; the session cookie (`name=value`).
async fn login(http: &reqwest::Client, console: &str, (name, password): (&str, &str)) -> String {
    let r = http
        .post(format!("{console}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[("name", name), ("password", password)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "login of {name}");
    let set = r
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{attribute} missing from {set}");
    }
    assert!(
        !set.contains("Secure"),
        "no Secure over plain HTTP on loopback"
    );
    set.split(';').next().unwrap().to_owned()
}

async fn get(http: &reqwest::Client, url: &str, cookie: &str) -> (StatusCode, String) {
    let r = http
        .get(url)
        .header("cookie", cookie)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> (StatusCode, String) {
    let r = http
        .post(url)
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(form))
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

/// The CSRF token of the page (every page's logout form carries it).
fn csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..at + 64].to_owned()
}

on_both_backends!(
    the_console_refuses_changes_without_csrf_from_viewers_and_of_bad_input,
    operators_act_on_the_api_under_their_name_and_logins_are_throttled,
);

async fn the_console_refuses_changes_without_csrf_from_viewers_and_of_bad_input(backend: Backend) {
    let balancer = Balancer::start(&backend).await;
    let api = balancer.api();
    let console = balancer.console_url();
    api.post("/v1/products", json!({"name": "cad"})).await;
    let registered = api
        .post(
            "/v1/servers",
            json!({"name": "s1", "url": "http://127.0.0.1:1", "site": "hq"}),
        )
        .await;
    let server_token = registered["token"].as_str().unwrap().to_owned();
    operators(&api).await;
    let http = client();

    // No session: pages go to the login form, fragments answer 401.
    let (status, _) = get(&http, &format!("{console}/"), "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let r = http
        .get(format!("{console}/estate/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A wrong password is refused.
    let r = http
        .post(format!("{console}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[
            ("name", "ann"),
            ("password", "wrong-password-1"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());

    let ann = login(&http, &console, ANN).await;
    let r = http
        .get(format!("{console}/"))
        .header("cookie", &ann)
        .send()
        .await
        .unwrap();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let html = r.text().await.unwrap();
    // No inline script or style anywhere, no secret.
    for page in ["/", "/servers", "/entitlements", "/operators", "/audit"] {
        let (status, html) = get(&http, &format!("{console}{page}"), &ann).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(
            !html.contains("<script>") && !html.contains(" style=") && !html.contains(" onclick="),
            "{page}"
        );
        for secret in [
            ADMIN_TOKEN,
            server_token.as_str(),
            &ann[ann.find('=').unwrap() + 1..],
        ] {
            assert!(!html.contains(secret), "{page} renders a secret");
        }
    }
    let token = csrf(&html);
    let entitlements = || async { api.get("/v1/products/cad/entitlements").await };
    let before = entitlements().await;
    let add = format!("{console}/entitlements");

    // Without the CSRF token, or with a wrong one: refused, nothing changes.
    for form in [
        vec![("product", "cad"), ("units", "5")],
        vec![
            ("csrf", "0".repeat(64).leak() as &str),
            ("product", "cad"),
            ("units", "5"),
        ],
    ] {
        let (status, body) = post(&http, &add, &ann, &form).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("data-code=\"forbidden\""), "{body}");
    }
    assert_eq!(entitlements().await, before);

    // Bad input: 400 with a stable code, nothing changes.
    for form in [
        vec![
            ("csrf", token.as_str()),
            ("product", "cad"),
            ("units", "many"),
        ],
        vec![("csrf", token.as_str()), ("product", "cad"), ("units", "0")],
        vec![
            ("csrf", token.as_str()),
            ("product", "cad"),
            ("units", "1"),
            ("expires", "soon"),
        ],
        vec![("csrf", token.as_str()), ("product", "cad")],
    ] {
        let (status, body) = post(&http, &add, &ann, &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{form:?}: {body}");
        assert!(body.contains("data-code=\"bad_request\""), "{body}");
    }
    let (status, _) = post(
        &http,
        &format!("{console}/products/cad/limits"),
        &ann,
        &[
            ("csrf", &token),
            ("server", "s1"),
            ("min_units", "-1"),
            ("buffer_units", "0"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(
        &http,
        &format!("{console}/checkouts/co_00000000000000000000000000000000/revoke"),
        &ann,
        &[("csrf", &token), ("reason", "audit")],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a release needs its confirmation"
    );
    let (status, _) = post(
        &http,
        &format!("{console}/operators"),
        &ann,
        &[
            ("csrf", &token),
            ("name", "x y"),
            ("role", "viewer"),
            ("password", "long-enough-pw"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(
        &http,
        &format!("{console}/operators"),
        &ann,
        &[
            ("csrf", &token),
            ("name", "zed"),
            ("role", "root"),
            ("password", "long-enough-pw"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&http, &format!("{console}/runs/x"), &ann).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&http, &format!("{console}/usage?by=planet"), &ann).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&http, &format!("{console}/no-such-page"), &ann).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(entitlements().await, before);
    assert_eq!(
        api.get("/v1/operators").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // With the token: done, and audited under ann's name.
    let (status, _) = post(
        &http,
        &add,
        &ann,
        &[("csrf", &token), ("product", "cad"), ("units", "5")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let added = entitlements().await;
    assert_eq!(added["items"].as_array().unwrap().len(), 1, "{added}");
    assert_eq!(added["items"][0]["created_by"], "ann");
    let audit = api.get("/v1/audit?limit=1").await;
    assert_eq!(
        (
            audit["items"][0]["actor"].as_str(),
            audit["items"][0]["action"].as_str()
        ),
        (Some("ann"), Some("entitlement.add")),
        "{audit}"
    );
    // A server's token comes back as a file to save, never inside a page.
    let r = http
        .post(format!("{console}/servers/s1/rotate-token"))
        .header("cookie", &ann)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(urlencoded(&[("csrf", token.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );

    // A viewer is offered no change and a forged one is refused.
    let vic = login(&http, &console, VIC).await;
    let (_, html) = get(&http, &format!("{console}/entitlements"), &vic).await;
    assert_eq!(
        html.matches("<form").count(),
        1,
        "only the logout form: {html}"
    );
    let vic_token = csrf(&html);
    let (status, _) = post(
        &http,
        &add,
        &vic,
        &[("csrf", &vic_token), ("product", "cad"), ("units", "5")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(
        &http,
        &format!("{console}/servers/s1/drain"),
        &vic,
        &[("csrf", &vic_token)],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(entitlements().await, added);
    assert_eq!(api.get("/v1/servers").await["items"][0]["state"], "active");

    // Logging out ends the session; removing an operator ends theirs.
    let (status, _) = post(
        &http,
        &format!("{console}/logout"),
        &ann,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _) = get(&http, &format!("{console}/"), &ann).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "a logged-out session reads nothing"
    );
    let (status, _) = post(
        &http,
        &add,
        &ann,
        &[("csrf", &token), ("product", "cad"), ("units", "5")],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = api
        .send(reqwest::Method::DELETE, "/v1/operators/vic", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = get(&http, &format!("{console}/"), &vic).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "a removed operator's session ends"
    );
    assert_eq!(entitlements().await, added);
}

async fn operators_act_on_the_api_under_their_name_and_logins_are_throttled(backend: Backend) {
    let balancer = Balancer::start(&backend).await;
    let root = balancer.api();
    operators(&root).await;
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method,
                path: &str,
                (name, password): (&str, &str),
                body: Option<Value>| {
        let mut request = http
            .request(method, format!("{}{path}", balancer.url()))
            .basic_auth(name, Some(password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    // A viewer reads, and changes nothing.
    let r = call(reqwest::Method::GET, "/v1/products", VIC, None)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = call(
        reqwest::Method::POST,
        "/v1/products",
        VIC,
        Some(json!({"name": "cad"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(root.get("/v1/products").await["items"], json!([]));
    // An admin operator changes, audited under their name.
    let r = call(
        reqwest::Method::POST,
        "/v1/products",
        ANN,
        Some(json!({"name": "cad"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let audit = root.get("/v1/audit?limit=1").await;
    assert_eq!(audit["items"][0]["actor"], "ann", "{audit}");
    // Operators never show their password hash.
    let listed = root.get("/v1/operators").await;
    assert!(!listed.to_string().contains("argon2"), "{listed}");
    // The CLI acts as an operator too.
    let out = std::process::Command::new(allot_tests::process::binary("allot-balancer"))
        .args(["entitlement", "add", "cad", "2", "--url", balancer.url()])
        .env("ALLOT_OPERATOR", ANN.0)
        .env("ALLOT_OPERATOR_PASSWORD", ANN.1)
        .env_remove("ALLOT_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        root.get("/v1/audit?limit=1").await["items"][0]["actor"],
        "ann"
    );

    // Throttled: after five wrong passwords even the right one waits.
    for _ in 0..5 {
        let r = call(
            reqwest::Method::GET,
            "/v1/products",
            (ANN.0, "wrong-password-0"),
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = call(reqwest::Method::GET, "/v1/products", ANN, None)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many"),
        "{body}"
    );
    // The admin token, the root credential, is never throttled.
    assert_eq!(
        root.get("/v1/operators").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
