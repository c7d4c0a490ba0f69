//! The console's estate page.

use super::days_left;
use crate::api::console::{Console, ConsoleError, Visitor};
use crate::store::RecordsQuery;
use allot_core::wire::records::GroupBy;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Serialize;
use std::collections::BTreeMap;

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
        store.estate_totals(),
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
    for cell in cells {
        *in_use.entry(cell.product).or_default() += cell.in_use;
        let site = sites.entry(cell.site.clone()).or_default();
        site.site = cell.site;
        site.allocation += cell.allocation;
        site.in_use += cell.in_use;
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
pub(in crate::api::console) async fn estate(
    State(console): State<Console>,
    visitor: Visitor,
) -> Result<Response, ConsoleError> {
    let context = estate_context(&console).await?;
    console.page(&visitor, "estate.html", "estate", "Estate", context)
}

/// The estate's live part, fetched by the page every 5 s.
pub(in crate::api::console) async fn estate_live(
    State(console): State<Console>,
    _: Visitor,
) -> Result<Response, ConsoleError> {
    let context = estate_context(&console).await?;
    Ok(axum::response::Html(console.render("estate_live.html", context)?).into_response())
}
