//! The console's pages and changes. Reads go through the API's handlers (or the store and
//! engine functions behind them); every change calls the API handler that makes it, so the
//! console validates and audits exactly as the JSON API does.

use super::super::{
    ApiJson, ApiPath, ApiQuery, advice, balancing, books, holders, operators as api_operators,
    records, servers, settings,
};
use super::{Console, ConsoleError, ConsoleForm, CsrfForm, Visitor, svg};
use crate::api::Admin;
use crate::balance::HoldersQuery;
use crate::operators::{AddOperator, Role};
use crate::store::{RecordsQuery, RunsQuery};
use allot_core::checkout::MAX_HOLDERS_PAGE;
use allot_core::validate;
use allot_core::wire::agent::RevokeRequest;
use allot_core::wire::balancer::{
    AddEntitlement, RegisterServer, RotateToken, SetAllocation, SetSchedule,
};
use allot_core::wire::records::GroupBy;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The read-only [`Admin`] a page reads the API's handlers as.
fn reader(visitor: &Visitor) -> Admin {
    Admin {
        actor: visitor.session.operator.clone(),
    }
}

/// Parameters for an API handler's query, from the console's own (a wrong one is `400`).
fn params<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ConsoleError> {
    serde_json::from_value(value).map_err(|e| ConsoleError::BadRequest(e.to_string()))
}

/// Whole days from `now` until `at`, rounded up (0 on the day, negative once past).
fn days_left(at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let seconds = (at - now).num_seconds();
    seconds.div_euclid(86_400) + i64::from(seconds.rem_euclid(86_400) > 0)
}

// ---------------------------------------------------------------------------------------------
// Estate.

/// Purchases expiring within this many days show on the estate page.
const EXPIRY_HORIZON_DAYS: i64 = 90;

#[derive(Serialize)]
struct ProductRow {
    name: String,
    purchased: u64,
    reserve: u64,
    in_transit: u64,
    allocated: u64,
    in_use: u64,
    denials_true: u64,
    denials_false: u64,
    expiring: Vec<Expiring>,
}

#[derive(Serialize)]
struct Expiring {
    units: u64,
    days_left: i64,
}

#[derive(Serialize, Default)]
struct SiteRow {
    site: String,
    servers: usize,
    allocation: u64,
    in_use: u64,
}

/// The estate's figures: per product and per site, as of now.
async fn estate_context(console: &Console) -> Result<minijinja::Value, ConsoleError> {
    let store = &*console.app.store;
    let now = Utc::now();
    let day_start = now.date_naive().and_hms_opt(0, 0, 0).map(|d| d.and_utc());
    let today = RecordsQuery {
        since_ms: day_start.unwrap_or(now).timestamp_millis(),
        until_ms: now.timestamp_millis() + 1,
        product: None,
        group_by: GroupBy::Product,
    };
    // Independent reads, concurrently (each on its own connection of the pool).
    let (totals, dated, servers, cells, product_list) = tokio::try_join!(
        store.usage_totals(&today),
        store.dated_entitlements(),
        store.servers(),
        store.all_cells(),
        store.products(),
    )?;
    let denials: BTreeMap<String, (u64, u64)> = totals
        .into_iter()
        .map(|t| (t.key, (t.denials_true, t.denials_false)))
        .collect();
    let mut expiring: BTreeMap<String, Vec<Expiring>> = BTreeMap::new();
    for e in dated {
        let Some(at) = e.expires_at else { continue };
        let left = days_left(at, now);
        if left <= EXPIRY_HORIZON_DAYS && e.units > e.retired_units {
            expiring
                .entry(e.product.clone())
                .or_default()
                .push(Expiring {
                    units: e.units - e.retired_units,
                    days_left: left,
                });
        }
    }
    let mut sites: BTreeMap<String, SiteRow> = BTreeMap::new();
    for server in servers {
        let row = sites.entry(server.site.clone()).or_default();
        row.site = server.site;
        row.servers += 1;
    }
    let mut in_use: BTreeMap<String, u64> = BTreeMap::new();
    for (product, cell) in cells {
        let used = cell.in_use.unwrap_or(0);
        *in_use.entry(product).or_default() += used;
        let site = sites.entry(cell.site.clone()).or_default();
        site.site = cell.site;
        site.allocation += cell.allocation;
        site.in_use += used;
    }
    let mut products = Vec::new();
    for p in product_list {
        let (denials_true, denials_false) = denials.get(&p.name).copied().unwrap_or_default();
        products.push(ProductRow {
            expiring: expiring.remove(&p.name).unwrap_or_default(),
            in_use: in_use.get(&p.name).copied().unwrap_or(0),
            name: p.name,
            purchased: p.purchased,
            reserve: p.reserve,
            in_transit: p.in_transit,
            allocated: p.allocated,
            denials_true,
            denials_false,
        });
    }
    Ok(minijinja::context! {
        now => now.format("%Y-%m-%d %H:%M:%S").to_string(),
        products => products,
        sites => sites.into_values().collect::<Vec<_>>(),
    })
}

/// The estate: every product's books and the sites' allocation, refreshed live.
pub(super) async fn estate(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let context = estate_context(&console).await?;
    console.page(&visitor, "estate.html", "estate", "Estate", context)
}

/// The estate's live part, fetched by the page every 5 s.
pub(super) async fn estate_live(
    State(console): State<Console>,
    _: Visitor,
) -> Result<Response, ConsoleError> {
    let context = estate_context(&console).await?;
    Ok(axum::response::Html(console.render("estate_live.html", context)?).into_response())
}

// ---------------------------------------------------------------------------------------------
// Product.

#[derive(Serialize)]
struct MoveRow {
    run: i64,
    trigger: String,
    at: DateTime<Utc>,
    server: String,
    kind: String,
    units: u64,
    state: String,
}

/// Runs read for the moves that touched a product, and runs opened among them.
const RECENT_RUNS: u32 = 50;
const RUNS_OPENED: usize = 15;

/// One product: its cells (min and buffer editable), its history, the moves that touched it.
pub(super) async fn product(
    State(console): State<Console>,
    visitor: Visitor,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let app = &console.app;
    let detail = books::show_product(State(app.clone()), reader(&visitor), ApiPath(name.clone()))
        .await?
        .0;
    let now = Utc::now();
    let mut charts = Vec::new();
    for (label, span_h, step_h) in [
        ("Last 24 hours", 24, 1),
        ("Last 7 days", 168, 6),
        ("Last 30 days", 720, 24),
    ] {
        let history = crate::history::query(
            &*app.store,
            crate::history::Filter {
                product: Some(name.clone()),
                ..Default::default()
            },
            now - chrono::Duration::hours(span_h),
            now,
            std::time::Duration::from_secs(step_h as u64 * 3600),
            now,
            &app.retention,
        )
        .await?;
        charts.push(minijinja::context! {
            label => label,
            svg => svg::chart(&history, detail.product.purchased, span_h as u64 / step_h as u64),
        });
    }
    let mut moves = Vec::new();
    let runs = app
        .store
        .runs(&RunsQuery {
            limit: RECENT_RUNS,
            before_id: None,
            trigger: None,
            since_ms: None,
        })
        .await?;
    for run in runs.iter().filter(|r| r.moves > 0).take(RUNS_OPENED) {
        let detail = app.store.run(run.id).await?;
        for m in detail.move_log.into_iter().filter(|m| m.product == name) {
            moves.push(MoveRow {
                run: run.id,
                trigger: run.trigger.to_string(),
                at: run.started_at,
                server: m.server,
                kind: m.kind.to_string(),
                units: m.units,
                state: m.state.to_string(),
            });
        }
    }
    let title = detail.product.name.clone();
    console.page(
        &visitor,
        "product.html",
        "estate",
        &title,
        minijinja::context! {
            product => detail.product,
            cells => detail.servers,
            charts => charts,
            moves => moves,
        },
    )
}

/// The min and buffer form of one cell.
#[derive(Deserialize)]
pub(super) struct LimitsForm {
    #[serde(default)]
    csrf: String,
    server: String,
    min_units: String,
    buffer_units: String,
}

/// A whole number of a form field, or `400` naming it.
fn number<T: std::str::FromStr>(field: &str, text: &str) -> Result<T, ConsoleError> {
    text.trim().parse().map_err(|_| {
        ConsoleError::BadRequest(format!("{field}: expected a whole number, got {text:?}"))
    })
}

/// Sets a cell's min and buffer (the API's `PUT /v1/servers/{server}/products/{product}`).
pub(super) async fn set_limits(
    State(console): State<Console>,
    visitor: Visitor,
    Path(product): Path<String>,
    ConsoleForm(form): ConsoleForm<LimitsForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let req = SetAllocation {
        min_units: number("min_units", &form.min_units)?,
        buffer_units: number("buffer_units", &form.buffer_units)?,
    };
    let set = servers::set_allocation_limits(
        State(console.app.clone()),
        admin,
        ApiPath((form.server.clone(), product.clone())),
        ApiJson(req),
    )
    .await?
    .0;
    Ok(console.done(
        &visitor,
        &format!("/products/{}", crate::cli::segment(&product)),
        format!(
            "{} on {}: min {} and buffer {} set",
            product, set.server, set.min_units, set.buffer_units
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Checkouts.

/// `?q=`: a search over product, server, user and host.
#[derive(Deserialize)]
pub(super) struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// Live holders across the estate, searchable; admins can force-release each.
pub(super) async fn checkouts(
    State(console): State<Console>,
    visitor: Visitor,
    Query(search): Query<SearchQuery>,
) -> Result<Response, ConsoleError> {
    let found = console
        .app
        .engine
        .holders(&HoldersQuery {
            product: None,
            user: None,
            server: None,
            limit: MAX_HOLDERS_PAGE,
            cursor: None,
        })
        .await
        .map_err(super::super::ApiError::from)?;
    let q = search.q.trim().to_lowercase();
    let holders: Vec<_> = found
        .items
        .into_iter()
        .filter(|h| {
            q.is_empty()
                || [&h.product, &h.server, &h.user, &h.host]
                    .iter()
                    .any(|f| f.to_lowercase().contains(&q))
        })
        .collect();
    console.page(
        &visitor,
        "checkouts.html",
        "checkouts",
        "Checkouts",
        minijinja::context! {
            q => search.q, holders => holders, unreachable => found.unreachable,
        },
    )
}

/// The force-release form: a reason and an explicit confirmation.
#[derive(Deserialize)]
pub(super) struct RevokeForm {
    #[serde(default)]
    csrf: String,
    reason: String,
    #[serde(default)]
    confirm: String,
}

/// Force-releases a checkout through the API's revoke (audited under the operator's name).
pub(super) async fn revoke(
    State(console): State<Console>,
    visitor: Visitor,
    Path(id): Path<String>,
    ConsoleForm(form): ConsoleForm<RevokeForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    if form.confirm != "yes" {
        return Err(ConsoleError::BadRequest(
            "confirm: tick the box to confirm the release".into(),
        ));
    }
    let revoked = holders::revoke(
        State(console.app.clone()),
        admin,
        ApiPath(id),
        ApiJson(RevokeRequest {
            reason: form.reason,
        }),
    )
    .await?
    .0;
    let c = &revoked.checkout;
    Ok(console.done(
        &visitor,
        "/checkouts",
        format!(
            "released {} unit(s) of {} held by {}@{} on {}",
            c.units, c.product, c.user, c.host, c.server
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Usage and renewal.

/// `?by=&since=`.
#[derive(Deserialize)]
pub(super) struct UsageQuery {
    by: Option<String>,
    since: Option<String>,
}

const GROUPINGS: [&str; 6] = ["user", "group", "site", "host", "server", "product"];

async fn usage_report(
    console: &Console,
    visitor: &Visitor,
    query: &UsageQuery,
) -> Result<(String, String, allot_core::wire::records::UsageReport), ConsoleError> {
    let by = query.by.clone().unwrap_or_else(|| "user".into());
    let since = query.since.clone().unwrap_or_else(|| "30d".into());
    let report = records::usage(
        State(console.app.clone()),
        reader(visitor),
        ApiQuery(params(serde_json::json!({"group_by": by, "since": since}))?),
    )
    .await?
    .0;
    Ok((by, since, report))
}

/// Usage per user, group, site…, with a CSV download, and the renewal report.
pub(super) async fn usage(
    State(console): State<Console>,
    visitor: Visitor,
    Query(query): Query<UsageQuery>,
) -> Result<Response, ConsoleError> {
    let (by, since, report) = usage_report(&console, &visitor, &query).await?;
    let renewal = records::renewal(
        State(console.app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({"since": "365d"}))?),
    )
    .await?
    .0;
    let head = [
        "Product",
        "Purchased",
        "Peak",
        "P95",
        "Average",
        "Hours at cap",
        "True denials",
        "False denials",
        "Never used",
        "Suggestion",
    ];
    let rows: Vec<Vec<String>> = renewal
        .products
        .iter()
        .map(|r| {
            vec![
                r.product.clone(),
                r.purchased.to_string(),
                r.peak.to_string(),
                r.p95.to_string(),
                format!("{:.1}", r.average),
                format!("{:.1}", r.hours_at_cap),
                r.denials_true.to_string(),
                r.denials_false.to_string(),
                r.never_used.to_string(),
                r.suggestion.clone(),
            ]
        })
        .collect();
    console.page(
        &visitor,
        "usage.html",
        "usage",
        "Usage and renewal",
        minijinja::context! {
            by => by, since => since, report => report, groupings => GROUPINGS,
            renewal_head => head, renewal_rows => rows,
        },
    )
}

/// The usage table as CSV.
pub(super) async fn usage_csv(
    State(console): State<Console>,
    visitor: Visitor,
    Query(query): Query<UsageQuery>,
) -> Result<Response, ConsoleError> {
    let (by, _, report) = usage_report(&console, &visitor, &query).await?;
    let mut csv =
        format!("{by},checkouts,hours,peak_concurrent,denials_true,denials_false,denials_other\n");
    for r in &report.rows {
        csv.push_str(&format!(
            "{},{},{:.3},{},{},{},{}\n",
            csv_field(&r.key),
            r.checkouts,
            r.hours,
            r.peak_concurrent,
            r.denials_true,
            r.denials_false,
            r.denials_other
        ));
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"allot-usage-by-{by}.csv\""),
            ),
        ],
        csv,
    )
        .into_response())
}

/// One CSV field: quoted when it holds a comma, a quote or a line break; a leading `=`, `+`,
/// `-` or `@` is prefixed with `'` so a spreadsheet never runs it as a formula.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

// ---------------------------------------------------------------------------------------------
// Runs and audit.

/// Balance runs, newest first.
pub(super) async fn runs(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let runs = balancing::runs(
        State(console.app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({"limit": 100}))?),
    )
    .await?
    .0;
    console.page(
        &visitor,
        "runs.html",
        "runs",
        "Runs",
        minijinja::context! { runs => runs.items },
    )
}

/// One run and its moves.
pub(super) async fn run(
    State(console): State<Console>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let id: i64 = number("id", &id)?;
    let run = balancing::run(State(console.app.clone()), reader(&visitor), ApiPath(id))
        .await?
        .0;
    console.page(
        &visitor,
        "run.html",
        "runs",
        &format!("Run {id}"),
        minijinja::context! { run => run },
    )
}

/// The audit log, newest first.
pub(super) async fn audit(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let entries = settings::audit(
        State(console.app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({"limit": 200}))?),
    )
    .await?
    .0;
    console.page(
        &visitor,
        "audit.html",
        "audit",
        "Audit log",
        minijinja::context! { entries => entries.items },
    )
}

// ---------------------------------------------------------------------------------------------
// Schedule and advice.

/// The schedule, the advisor's recommendation and the button that applies it.
pub(super) async fn schedule(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let app = &console.app;
    let schedule = settings::schedule(State(app.clone()), reader(&visitor))
        .await?
        .0;
    let advice = advice::get_advice(
        State(app.clone()),
        reader(&visitor),
        ApiQuery(params(serde_json::json!({}))?),
    )
    .await;
    let (advice, advice_error, has_changes) = match advice {
        Ok(a) => {
            let changes = a.0.has_changes();
            (Some(a.0), None, changes)
        }
        Err(e) => (None, Some(e.message().to_owned()), false),
    };
    console.page(
        &visitor,
        "schedule.html",
        "schedule",
        "Schedule",
        minijinja::context! {
            schedule => schedule, advice => advice, advice_error => advice_error,
            has_changes => has_changes,
        },
    )
}

/// The schedule form.
#[derive(Deserialize)]
pub(super) struct ScheduleForm {
    #[serde(default)]
    csrf: String,
    cron: String,
    #[serde(default)]
    timezone: String,
}

/// Sets the schedule (the API's `PUT /v1/schedule`).
pub(super) async fn set_schedule(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<ScheduleForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let timezone = Some(form.timezone.trim().to_owned()).filter(|t| !t.is_empty());
    let set = settings::set_schedule(
        State(console.app.clone()),
        admin,
        ApiJson(SetSchedule {
            cron: form.cron,
            timezone,
        }),
    )
    .await?
    .0;
    Ok(console.done(
        &visitor,
        "/schedule",
        format!("schedule set to {} ({})", set.cron, set.timezone),
    ))
}

/// Applies the advisor's recommendation (the API's `POST /v1/advice/apply`).
pub(super) async fn apply_advice(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let applied = advice::apply_advice(
        State(console.app.clone()),
        admin,
        ApiJson(params(serde_json::json!({"since": "7d"}))?),
    )
    .await?
    .0;
    let applied = serde_json::to_value(&applied).unwrap_or_default();
    Ok(console.done(
        &visitor,
        "/schedule",
        format!("recommendation applied: {}", applied["applied"]),
    ))
}

// ---------------------------------------------------------------------------------------------
// Entitlements.

#[derive(Serialize)]
struct EntitlementRow {
    #[serde(flatten)]
    entitlement: allot_core::wire::balancer::Entitlement,
    days_left: Option<i64>,
}

/// Every product's purchases with the days left before each expires.
pub(super) async fn entitlements(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let app = &console.app;
    let now = Utc::now();
    let mut rows = Vec::new();
    let mut names = Vec::new();
    for p in app.store.products().await? {
        for e in app.store.entitlements(&p.name).await? {
            rows.push(EntitlementRow {
                days_left: e.expires_at.map(|at| days_left(at, now)),
                entitlement: e,
            });
        }
        names.push(p.name);
    }
    console.page(
        &visitor,
        "entitlements.html",
        "entitlements",
        "Entitlements",
        minijinja::context! { entitlements => rows, products => names },
    )
}

/// The add-a-purchase form.
#[derive(Deserialize)]
pub(super) struct EntitlementForm {
    #[serde(default)]
    csrf: String,
    product: String,
    units: String,
    #[serde(default)]
    expires: String,
    #[serde(default)]
    reference: String,
}

/// Records a purchase (the API's `POST /v1/products/{product}/entitlements`); `expires` is a
/// date, the purchase ending at the start of that day (UTC).
pub(super) async fn add_entitlement(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<EntitlementForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let expires_at = match form.expires.trim() {
        "" => None,
        text => Some(
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map_err(|_| {
                    ConsoleError::BadRequest(format!("expires: expected YYYY-MM-DD, got {text:?}"))
                })?
                .and_hms_opt(0, 0, 0)
                .expect("midnight exists")
                .and_utc(),
        ),
    };
    let reference = Some(form.reference.trim().to_owned()).filter(|r| !r.is_empty());
    let req = AddEntitlement {
        units: number("units", &form.units)?,
        expires_at,
        reference,
    };
    let added = books::add_entitlement(
        State(console.app.clone()),
        admin,
        ApiPath(form.product.clone()),
        ApiJson(req),
    )
    .await?
    .1
    .0;
    Ok(console.done(
        &visitor,
        "/entitlements",
        format!(
            "{} unit(s) of {} added (entitlement {})",
            added.units, added.product, added.id
        ),
    ))
}

/// Removes a purchase (the API's `DELETE /v1/products/{product}/entitlements/{id}`).
pub(super) async fn remove_entitlement(
    State(console): State<Console>,
    visitor: Visitor,
    Path((product, id)): Path<(String, String)>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let id: i64 = number("id", &id)?;
    let removed =
        books::remove_entitlement(State(console.app.clone()), admin, ApiPath((product, id)))
            .await?
            .0;
    Ok(console.done(
        &visitor,
        "/entitlements",
        format!("entitlement {} of {} removed", removed.id, removed.product),
    ))
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// A server unheard of for longer than this is shown as silent.
const SILENT_AFTER: chrono::Duration = chrono::Duration::minutes(15);

#[derive(Serialize)]
struct ServerRow {
    #[serde(flatten)]
    server: allot_core::wire::balancer::Server,
    health: String,
    lease_ends: DateTime<Utc>,
}

/// The metering servers: state, health, lease; drain, rotate a token, register.
pub(super) async fn servers(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let lease = chrono::Duration::from_std(console.app.engine.config().lease).unwrap_or_default();
    let now = Utc::now();
    let rows: Vec<ServerRow> = console
        .app
        .store
        .servers()
        .await?
        .into_iter()
        .map(|server| {
            let heard = server.last_seen_at.unwrap_or(server.created_at);
            let health = match server.last_seen_at {
                None => "never heard from".to_owned(),
                Some(at) if now - at > SILENT_AFTER => {
                    format!("silent for {} min", (now - at).num_minutes())
                }
                Some(_) => "ok".to_owned(),
            };
            ServerRow {
                lease_ends: heard + lease,
                health,
                server,
            }
        })
        .collect();
    console.page(
        &visitor,
        "servers.html",
        "servers",
        "Servers",
        minijinja::context! { servers => rows },
    )
}

/// The new server's token, offered once as a file to save: never rendered into a page.
fn token_download(server: &str, token: &str) -> Response {
    let name: String = server
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"allot-server-{name}.token\""),
            ),
        ],
        format!("{token}\n"),
    )
        .into_response()
}

/// The register form.
#[derive(Deserialize)]
pub(super) struct RegisterForm {
    #[serde(default)]
    csrf: String,
    name: String,
    url: String,
    site: String,
}

/// Registers a server (the API's `POST /v1/servers`); its token comes back as a download.
pub(super) async fn register_server(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<RegisterForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let registered = servers::register(
        State(console.app.clone()),
        admin,
        ApiJson(RegisterServer {
            name: form.name,
            url: form.url,
            site: form.site,
        }),
    )
    .await?
    .1
    .0;
    Ok(token_download(&registered.server.name, &registered.token))
}

/// Drains a server (the API's `POST /v1/servers/{server}/drain`).
pub(super) async fn drain_server(
    State(console): State<Console>,
    visitor: Visitor,
    Path(server): Path<String>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let drained = servers::drain(State(console.app.clone()), admin, ApiPath(server))
        .await?
        .0;
    Ok(console.done(
        &visitor,
        "/servers",
        format!("{} is draining", drained.name),
    ))
}

/// Rotates a server's token with the default grace; the new token comes back as a download.
pub(super) async fn rotate_token(
    State(console): State<Console>,
    visitor: Visitor,
    Path(server): Path<String>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let rotated = servers::rotate_token(
        State(console.app.clone()),
        admin,
        ApiPath(server),
        ApiJson(RotateToken {
            grace_seconds: None,
        }),
    )
    .await?
    .0;
    Ok(token_download(&rotated.server.name, &rotated.token))
}

// ---------------------------------------------------------------------------------------------
// Operators.

/// Every operator; admins add and remove them.
pub(super) async fn operators(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let operators = console.app.store.operators().await?;
    console.page(
        &visitor,
        "operators.html",
        "operators",
        "Operators",
        minijinja::context! { operators => operators },
    )
}

/// The add-an-operator form.
#[derive(Deserialize)]
pub(super) struct OperatorForm {
    #[serde(default)]
    csrf: String,
    name: String,
    role: String,
    password: String,
}

/// Adds an operator (the API's `POST /v1/operators`).
pub(super) async fn add_operator(
    State(console): State<Console>,
    visitor: Visitor,
    ConsoleForm(form): ConsoleForm<OperatorForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    let role = Role::parse(&form.role)
        .ok_or_else(|| ConsoleError::BadRequest("role: admin or viewer".into()))?;
    let added = api_operators::add_operator(
        &console.app,
        admin.actor(),
        &AddOperator {
            name: form.name,
            role,
            password: form.password,
        },
    )
    .await?;
    Ok(console.done(
        &visitor,
        "/operators",
        format!("operator {} added as {}", added.name, added.role.as_str()),
    ))
}

/// Removes an operator (the API's `DELETE /v1/operators/{name}`); their sessions end.
pub(super) async fn remove_operator(
    State(console): State<Console>,
    visitor: Visitor,
    Path(name): Path<String>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, ConsoleError> {
    let admin = console.change(&visitor, &form.csrf)?;
    validate::path_name("name", &name).map_err(|e| ConsoleError::BadRequest(e.to_string()))?;
    let removed = api_operators::remove(State(console.app.clone()), admin, ApiPath(name))
        .await?
        .0;
    Ok(console.done(
        &visitor,
        "/operators",
        format!("operator {} removed", removed.name),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_left_round_up_and_go_negative() {
        let now = Utc::now();
        assert_eq!(days_left(now + chrono::Duration::hours(1), now), 1);
        assert_eq!(days_left(now + chrono::Duration::days(3), now), 3);
        assert_eq!(days_left(now, now), 0);
        assert_eq!(days_left(now - chrono::Duration::hours(25), now), -1);
    }

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("ann"), "ann");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
