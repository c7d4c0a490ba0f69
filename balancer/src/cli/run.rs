//! What each admin command does: one call (or a few) to the API through the
//! [`AdminClient`], then the answer printed through [`render`](super::render) or as JSON.

use super::client::{AdminClient, segment};
use super::render::{
    csv_field, output, print_advice, print_options, print_run, print_schedule, table,
};
use super::{
    AdviseArgs, AllocationCommand, AuditArgs, AutotuneCommand, BalanceArgs, CheckoutsArgs,
    DoctorArgs, EntitlementCommand, ExplainArgs, HistoryArgs, ProductCommand, RenewalArgs,
    RevokeArgs, RunsCommand, ScheduleCommand, ServerCommand, UsageArgs,
};
use allot_core::wire::agent::{RevokeRequest, Revoked};
use allot_core::wire::balancer::Holders;
use allot_core::wire::balancer::{
    AddEntitlement, AllocationView, AuditEntry, BalanceRequest, CreateProduct, DoctorReport,
    Entitlement, History, List, Product, ProductDetail, RegisterServer, RegisteredServer,
    RotateToken, RotatedToken, RunDetail, RunSummary, Schedule, Server, SetAllocation, SetSchedule,
};
use allot_core::wire::records::{RenewalReport, UsageReport};
use reqwest::Method;

impl ProductCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                name,
                publisher,
                version,
                enforcement,
                seat,
                heartbeat_seconds,
                staleout_seconds,
                options,
                client,
            } => {
                let mut def = CreateProduct {
                    name,
                    publisher,
                    version,
                    enforcement,
                    seat,
                    heartbeat_seconds,
                    staleout_seconds,
                    acl: Default::default(),
                    options: Default::default(),
                };
                options.apply(&mut def.options);
                let product: Product = AdminClient::new(&client)?
                    .call(Method::POST, "/v1/products", Some(&def))
                    .await?;
                output(client.json, &product, |p| {
                    println!("{}", table(std::slice::from_ref(p)));
                })
            }
            Self::Set {
                name,
                enforcement,
                seat,
                heartbeat_seconds,
                staleout_seconds,
                options,
                client,
            } => {
                let admin = AdminClient::new(&client)?;
                let path = format!("/v1/products/{}", segment(&name));
                let current: ProductDetail = admin.get(&path).await?;
                let mut policy = current.product.policy;
                policy.enforcement = enforcement.unwrap_or(policy.enforcement);
                policy.seat = seat.unwrap_or(policy.seat);
                policy.heartbeat_seconds = heartbeat_seconds.unwrap_or(policy.heartbeat_seconds);
                policy.staleout_seconds = staleout_seconds.unwrap_or(policy.staleout_seconds);
                options.apply(&mut policy.options);
                let def = allot_core::wire::agent::ProductDefinition::from(policy);
                let product: Product = admin
                    .call(Method::PUT, &format!("{path}/policy"), Some(&def))
                    .await?;
                output(client.json, &product, |p| {
                    println!("{}", table(std::slice::from_ref(p)));
                    print_options(&p.policy.options);
                })
            }
            Self::List { client } => {
                let list: List<Product> = AdminClient::new(&client)?.get("/v1/products").await?;
                output(client.json, &list, |l| println!("{}", table(&l.items)))
            }
            Self::Show { name, client } => {
                let detail: ProductDetail = AdminClient::new(&client)?
                    .get(&format!("/v1/products/{}", segment(&name)))
                    .await?;
                output(client.json, &detail, |d| {
                    println!("{}", table(std::slice::from_ref(&d.product)));
                    print_options(&d.product.policy.options);
                    println!("{}", table(&d.servers));
                })
            }
        }
    }
}

impl EntitlementCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                product,
                units,
                expires_at,
                reference,
                client,
            } => {
                let req = AddEntitlement {
                    units,
                    expires_at,
                    reference,
                };
                let e: Entitlement = AdminClient::new(&client)?
                    .call(
                        Method::POST,
                        &format!("/v1/products/{}/entitlements", segment(&product)),
                        Some(&req),
                    )
                    .await?;
                output(client.json, &e, |e| {
                    println!("{}", table(std::slice::from_ref(e)));
                })
            }
            Self::List { product, client } => {
                let list: List<Entitlement> = AdminClient::new(&client)?
                    .get(&format!("/v1/products/{}/entitlements", segment(&product)))
                    .await?;
                output(client.json, &list, |l| println!("{}", table(&l.items)))
            }
            Self::Remove {
                product,
                id,
                client,
            } => {
                let e: Entitlement = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::DELETE,
                        &format!("/v1/products/{}/entitlements/{id}", segment(&product)),
                        None,
                    )
                    .await?;
                output(client.json, &e, |e| {
                    println!(
                        "removed entitlement {} ({} units of {})",
                        e.id, e.units, e.product
                    );
                })
            }
        }
    }
}

impl ServerCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Add {
                name,
                server_url,
                site,
                client,
            } => {
                let req = RegisterServer {
                    name,
                    url: server_url,
                    site,
                };
                let r: RegisteredServer = AdminClient::new(&client)?
                    .call(Method::POST, "/v1/servers", Some(&req))
                    .await?;
                output(client.json, &r, |r| {
                    println!("{}", table(std::slice::from_ref(&r.server)));
                    println!(
                        "token (shown once, give it to the metering server): {}",
                        r.token
                    );
                })
            }
            Self::List { client } => {
                let list: List<Server> = AdminClient::new(&client)?.get("/v1/servers").await?;
                output(client.json, &list, |l| println!("{}", table(&l.items)))
            }
            Self::Drain { name, client } => {
                let s: Server = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::POST,
                        &format!("/v1/servers/{}/drain", segment(&name)),
                        None,
                    )
                    .await?;
                output(client.json, &s, |s| {
                    println!("{}", table(std::slice::from_ref(s)))
                })
            }
            Self::Remove { name, client } => {
                let s: Server = AdminClient::new(&client)?
                    .call::<(), _>(
                        Method::DELETE,
                        &format!("/v1/servers/{}", segment(&name)),
                        None,
                    )
                    .await?;
                output(client.json, &s, |s| println!("removed server {}", s.name))
            }
            Self::RotateToken {
                name,
                grace_seconds,
                client,
            } => {
                let r: RotatedToken = AdminClient::new(&client)?
                    .call(
                        Method::POST,
                        &format!("/v1/servers/{}/rotate-token", segment(&name)),
                        Some(&RotateToken { grace_seconds }),
                    )
                    .await?;
                output(client.json, &r, |r| {
                    println!(
                        "new token (shown once, restart the metering server with it): {}",
                        r.token
                    );
                    match r.server.previous_token_until {
                        Some(until) => println!(
                            "the old token keeps working until {until} or until the server \
                             presents the new one"
                        ),
                        None => println!("the old token is refused from now on"),
                    }
                })
            }
        }
    }
}

impl AllocationCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self::Set {
            server,
            product,
            min_units,
            buffer_units,
            client,
        } = self;
        let req = SetAllocation {
            min_units,
            buffer_units,
        };
        let cell: AllocationView = AdminClient::new(&client)?
            .call(
                Method::PUT,
                &format!(
                    "/v1/servers/{}/products/{}",
                    segment(&server),
                    segment(&product)
                ),
                Some(&req),
            )
            .await?;
        output(client.json, &cell, |c| {
            println!("{}", table(std::slice::from_ref(c)))
        })
    }
}

impl ScheduleCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Get { client } => {
                let s: Schedule = AdminClient::new(&client)?.get("/v1/schedule").await?;
                output(client.json, &s, print_schedule)
            }
            Self::Set {
                cron,
                timezone,
                client,
            } => {
                let req = SetSchedule { cron, timezone };
                let s: Schedule = AdminClient::new(&client)?
                    .call(Method::PUT, "/v1/schedule", Some(&req))
                    .await?;
                output(client.json, &s, print_schedule)
            }
        }
    }
}

impl AuditArgs {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        let list: List<AuditEntry> = AdminClient::new(&self.client)?
            .get(&format!("/v1/audit?limit={}", self.limit))
            .await?;
        output(self.client.json, &list, |l| println!("{}", table(&l.items)))
    }
}

/// Most pages `checkouts` follows (of 1000 holders each) before it stops and says so.
const MAX_HOLDER_PAGES: usize = 1000;

impl CheckoutsArgs {
    /// Lists every holder, following the pages, as a table (or the JSON of one big page).
    pub async fn run(self) -> anyhow::Result<()> {
        let client = AdminClient::new(&self.client)?;
        let mut filters = String::new();
        for (name, value) in [
            ("product", &self.product),
            ("user", &self.user),
            ("server", &self.server),
        ] {
            if let Some(v) = value {
                filters.push_str(&format!("&{name}={}", segment(v)));
            }
        }
        let mut all = Holders {
            items: Vec::new(),
            next_cursor: None,
            unreachable: Vec::new(),
        };
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_HOLDER_PAGES {
            let after = cursor
                .as_deref()
                .map(|c| format!("&cursor={}", segment(c)))
                .unwrap_or_default();
            let page: Holders = client
                .get(&format!("/v1/checkouts?limit=1000{filters}{after}"))
                .await?;
            all.items.extend(page.items);
            for s in page.unreachable {
                if !all.unreachable.contains(&s) {
                    all.unreachable.push(s);
                }
            }
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        all.next_cursor = cursor;
        output(self.client.json, &all, |h| {
            println!("{}", table(&h.items));
            println!(
                "{} held, {} waiting",
                h.items
                    .iter()
                    .filter(|i| i.state == allot_core::wire::agent::HolderState::Held)
                    .count(),
                h.items
                    .iter()
                    .filter(|i| i.state == allot_core::wire::agent::HolderState::Waiting)
                    .count()
            );
            if !h.unreachable.is_empty() {
                println!(
                    "unreachable (their holders are not listed): {}",
                    h.unreachable.join(", ")
                );
            }
            if h.next_cursor.is_some() {
                println!(
                    "more holders than this listing shows; narrow it with --product, --user or --server"
                );
            }
        })
    }
}

impl RevokeArgs {
    /// Force-releases one checkout and prints what it was.
    pub async fn run(self) -> anyhow::Result<()> {
        let req = RevokeRequest {
            reason: self.reason,
        };
        let revoked: Revoked = AdminClient::new(&self.client)?
            .call(
                Method::POST,
                &format!("/v1/checkouts/{}/revoke", segment(&self.id)),
                Some(&req),
            )
            .await?;
        output(self.client.json, &revoked, |r| {
            println!(
                "revoked {} on {}: {} of {} held by {}@{}; {} waiting client(s) served",
                r.checkout.id,
                r.checkout.server,
                r.checkout.units,
                r.checkout.product,
                r.checkout.user,
                r.checkout.host,
                r.served_waiters
            );
        })
    }
}

impl BalanceArgs {
    /// Runs a manual balance and prints its moves.
    pub async fn run(self) -> anyhow::Result<()> {
        let req = BalanceRequest {
            product: self.product,
        };
        let detail: RunDetail = AdminClient::new(&self.client)?
            .call(Method::POST, "/v1/balance", Some(&req))
            .await?;
        output(self.client.json, &detail, print_run)
    }
}

impl RunsCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::List {
                limit,
                since,
                trigger,
                client,
            } => {
                let mut path = format!("/v1/runs?limit={limit}");
                if let Some(since) = since {
                    path.push_str(&format!("&since={}", segment(&since)));
                }
                if let Some(trigger) = trigger {
                    path.push_str(&format!("&trigger={trigger}"));
                }
                let list: List<RunSummary> = AdminClient::new(&client)?.get(&path).await?;
                output(client.json, &list, |l| println!("{}", table(&l.items)))
            }
            Self::Show { id, client } => {
                let detail: RunDetail = AdminClient::new(&client)?
                    .get(&format!("/v1/runs/{id}"))
                    .await?;
                output(client.json, &detail, print_run)
            }
        }
    }
}

impl DoctorArgs {
    /// Prints the books, each server's view and every discrepancy; fails when any is found.
    pub async fn run(self) -> anyhow::Result<()> {
        let report: DoctorReport = AdminClient::new(&self.client)?.get("/v1/doctor").await?;
        output(self.client.json, &report, |r| {
            for p in &r.products {
                println!(
                    "{}: purchased {} = reserve {} + in transit {} + allocated {}",
                    p.product, p.purchased, p.reserve, p.in_transit, p.allocated
                );
                println!("{}", table(&p.servers));
            }
            for d in &r.discrepancies {
                println!("DISCREPANCY: {d}");
            }
            for u in &r.unreachable {
                println!("UNREACHABLE: {u}");
            }
            for m in &r.unfinished_moves {
                println!(
                    "UNFINISHED: {} {} {} of {} to {}",
                    m.id, m.kind, m.units, m.product, m.server
                );
            }
            println!(
                "{}",
                if r.ok {
                    "OK: the books and every server agree"
                } else {
                    "NOT OK"
                }
            );
        })?;
        if report.ok {
            Ok(())
        } else {
            anyhow::bail!("doctor found problems")
        }
    }
}

impl ExplainArgs {
    /// Prints, per server, the demand signals, want, fair share, target and the deciding rule.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut path = format!("/v1/products/{}/explain", segment(&self.product));
        if let Some(server) = &self.server {
            path.push_str(&format!("?server={}", segment(server)));
        }
        let e: allot_core::wire::balancer::Explanation =
            AdminClient::new(&self.client)?.get(&path).await?;
        output(self.client.json, &e, |e| {
            println!(
                "{}: purchased {}, reserve {} (after the plan: {}), in transit {}; scarcity: {}",
                e.product, e.purchased, e.reserve, e.reserve_after, e.in_transit, e.scarcity
            );
            println!("{}", table(&e.servers));
            for u in &e.unreachable {
                println!("UNREACHABLE: {u} (its units stay where they are)");
            }
            if let Some(note) = &e.note {
                println!("NOTE: {note}");
            }
        })
    }
}

/// A report's query string: each given parameter, encoded.
fn report_query(params: &[(&str, Option<&str>)]) -> String {
    params
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", segment(v))))
        .collect::<Vec<_>>()
        .join("&")
}

impl UsageArgs {
    /// Prints the usage report as a table, CSV or JSON.
    pub async fn run(self) -> anyhow::Result<()> {
        let path = format!(
            "/v1/usage?{}",
            report_query(&[
                ("group_by", Some(&self.by)),
                ("since", Some(&self.since)),
                ("until", self.until.as_deref()),
                ("product", self.product.as_deref()),
            ])
        );
        let report: UsageReport = AdminClient::new(&self.client)?.get(&path).await?;
        if self.csv {
            println!(
                "{},checkouts,hours,peak_concurrent,denials_true,denials_false,denials_other",
                report.group_by.as_str()
            );
            for r in &report.rows {
                println!(
                    "{},{},{:.3},{},{},{},{}",
                    csv_field(&r.key),
                    r.checkouts,
                    r.hours,
                    r.peak_concurrent,
                    r.denials_true,
                    r.denials_false,
                    r.denials_other
                );
            }
            return Ok(());
        }
        output(self.client.json, &report, |r| {
            println!(
                "{} → {}, by {}",
                r.since.to_rfc3339(),
                r.until.to_rfc3339(),
                r.group_by.as_str()
            );
            println!("{}", table(&r.rows));
        })
    }
}

impl RenewalArgs {
    /// Prints the renewal report as a table, CSV or JSON.
    pub async fn run(self) -> anyhow::Result<()> {
        let path = format!(
            "/v1/usage/renewal?{}",
            report_query(&[
                ("since", Some(&self.since)),
                ("product", self.product.as_deref()),
            ])
        );
        let report: RenewalReport = AdminClient::new(&self.client)?.get(&path).await?;
        if self.csv {
            println!(
                "product,purchased,peak,p95,average,hours_at_cap,denials_true,denials_false,never_used,suggestion"
            );
            for r in &report.products {
                println!(
                    "{},{},{},{},{:.3},{:.3},{},{},{},{}",
                    csv_field(&r.product),
                    r.purchased,
                    r.peak,
                    r.p95,
                    r.average,
                    r.hours_at_cap,
                    r.denials_true,
                    r.denials_false,
                    r.never_used,
                    csv_field(&r.suggestion)
                );
            }
            return Ok(());
        }
        output(self.client.json, &report, |r| {
            println!("{} → {}", r.since.to_rfc3339(), r.until.to_rfc3339());
            println!("{}", table(&r.products));
        })
    }
}

impl HistoryArgs {
    /// Prints the history as sparklines, CSV or JSON.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut path = format!(
            "/v1/history?since={}&step={}",
            segment(&self.since),
            segment(&self.step)
        );
        for (key, value) in [
            ("product", &self.product),
            ("server", &self.server),
            ("site", &self.site),
        ] {
            if let Some(value) = value {
                path.push_str(&format!("&{key}={}", segment(value)));
            }
        }
        let history: History = AdminClient::new(&self.client)?.get(&path).await?;
        if self.csv {
            println!(
                "product,server,site,at,samples,allocation_mean,allocation_max,in_use_mean,\
                 in_use_max,peak_in_use,checkouts,denials,overdrafts,staleouts,waiting_max,\
                 instant_requests,units_granted,units_released,ping_pong_units,unserved_true,\
                 unserved_false"
            );
            for s in &history.series {
                for p in &s.points {
                    println!(
                        "{},{},{},{},{},{:.3},{},{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                        csv_field(&s.product),
                        csv_field(&s.server),
                        csv_field(&s.site),
                        p.at.to_rfc3339(),
                        p.samples,
                        p.allocation_mean,
                        p.allocation_max,
                        p.in_use_mean,
                        p.in_use_max,
                        p.peak_in_use,
                        p.checkouts,
                        p.denials,
                        p.overdrafts,
                        p.staleouts,
                        p.waiting_max,
                        p.instant_requests,
                        p.units_granted,
                        p.units_released,
                        p.ping_pong_units,
                        p.unserved_true,
                        p.unserved_false
                    );
                }
            }
            return Ok(());
        }
        output(self.client.json, &history, |h| {
            println!(
                "{} → {}, one bucket every {} s",
                h.from.to_rfc3339(),
                h.to.to_rfc3339(),
                h.step_seconds
            );
            println!("{}", table(&h.series));
        })
    }
}

impl AdviseArgs {
    /// Prints (and with `--apply` applies) the advisor's recommendations.
    pub async fn run(self) -> anyhow::Result<()> {
        let client = AdminClient::new(&self.client)?;
        if self.apply {
            let answer: serde_json::Value = client
                .call(
                    Method::POST,
                    "/v1/advice/apply",
                    Some(&serde_json::json!({"since": self.since})),
                )
                .await?;
            return output(self.client.json, &answer, |a| {
                if let Ok(advice) = serde_json::from_value(a["advice"].clone()) {
                    print_advice(&advice);
                }
                println!("applied: {}", a["applied"]);
            });
        }
        let advice: allot_core::advisor::Advice = client
            .get(&format!("/v1/advice?since={}", segment(&self.since)))
            .await?;
        output(self.client.json, &advice, print_advice)
    }
}

impl AutotuneCommand {
    /// Runs the subcommand against the API.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Get { client } => {
                let setting: crate::advice::Autotune =
                    AdminClient::new(&client)?.get("/v1/autotune").await?;
                output(client.json, &setting, |s| {
                    println!("{}", serde_json::to_string_pretty(s).unwrap_or_default())
                })
            }
            Self::Set {
                enabled,
                max_buffer,
                max_min,
                min_interval_minutes,
                max_interval_minutes,
                window_days,
                client,
            } => {
                let setting = crate::advice::Autotune {
                    enabled,
                    bounds: allot_core::advisor::AutotuneBounds {
                        max_buffer_units: max_buffer,
                        max_min_units: max_min,
                        min_interval_minutes,
                        max_interval_minutes,
                    },
                    window_days,
                };
                let saved: crate::advice::Autotune = AdminClient::new(&client)?
                    .call(Method::PUT, "/v1/autotune", Some(&setting))
                    .await?;
                output(client.json, &saved, |s| {
                    println!("{}", serde_json::to_string_pretty(s).unwrap_or_default())
                })
            }
        }
    }
}
