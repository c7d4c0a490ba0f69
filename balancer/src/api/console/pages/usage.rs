//! The console's usage and renewal page.

use super::{params, reader};
use crate::api::console::{Console, ConsoleError, Visitor};
use crate::api::{ApiQuery, records};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// `?by=&since=`.
#[derive(Deserialize)]
pub(in crate::api::console) struct UsageQuery {
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
pub(in crate::api::console) async fn usage(
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
pub(in crate::api::console) async fn usage_csv(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("ann"), "ann");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
