//! A [`Store`] that reports every database error to its owner.
//!
//! The store knows nothing of metrics: the service wraps the store it opened in
//! [`ErrorReporting`] with a hook that counts `allot_store_errors_total` in its own
//! metrics. Constraint refusals ([`StoreError::Conflict`], not-found, fencing) are answers, not
//! failures, and are not reported.

use super::{
    AuditQuery, BooksCheck, CellRecord, HistoryBucket, HistoryQuery, InstantLog, InstantRecord,
    InstantStart, MoveRecord, NewMove, RunOutcome, RunsQuery, ScheduleSetting, ServerRecord,
    ShardLeader, Store, StoreError, StoreResult, UsageSample,
};
use crate::store::{RecordsQuery, UsageTotals};
use allot_core::domain::RunTrigger;
use allot_core::shard::Fence;
use allot_core::usage::Interval;
use allot_core::wire::balancer::{
    AddEntitlement, AllocationView, AuditEntry, CreateProduct, Entitlement, Product, ProductDetail,
    RegisterServer, RunDecision, RunDetail, RunSummary, Server, SetAllocation,
};
use allot_core::wire::records::{RecordAck, RecordBatch};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// What a store does when the database fails: the caller's, so it can count or log.
pub type DatabaseErrorHook = Box<dyn Fn(&sqlx::Error) + Send + Sync>;

/// Delegates every call to the store it wraps and calls its hook with each database error
/// returned.
pub struct ErrorReporting {
    inner: Arc<dyn Store>,
    on_database_error: DatabaseErrorHook,
}

impl ErrorReporting {
    /// Wraps `inner`; `on_database_error` runs once per call that failed in the database.
    pub fn new(inner: Arc<dyn Store>, on_database_error: DatabaseErrorHook) -> Self {
        Self {
            inner,
            on_database_error,
        }
    }

    /// Passes `result` on, reporting it first if the database failed.
    fn seen<T>(&self, result: StoreResult<T>) -> StoreResult<T> {
        if let Err(StoreError::Database(e)) = &result {
            (self.on_database_error)(e);
        }
        result
    }
}

#[async_trait]
impl Store for ErrorReporting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn close(&self) {
        self.inner.close().await
    }

    async fn create_product(&self, actor: &str, def: &CreateProduct) -> StoreResult<Product> {
        self.seen(self.inner.create_product(actor, def).await)
    }

    async fn products(&self) -> StoreResult<Vec<Product>> {
        self.seen(self.inner.products().await)
    }

    async fn product(&self, name: &str) -> StoreResult<ProductDetail> {
        self.seen(self.inner.product(name).await)
    }

    async fn product_books(&self, name: &str) -> StoreResult<Product> {
        self.seen(self.inner.product_books(name).await)
    }

    async fn reserve(&self, product: &str) -> StoreResult<u64> {
        self.seen(self.inner.reserve(product).await)
    }

    async fn set_policy(
        &self,
        actor: &str,
        name: &str,
        policy: &allot_core::domain::Policy,
    ) -> StoreResult<Product> {
        self.seen(self.inner.set_policy(actor, name, policy).await)
    }

    async fn add_entitlement(
        &self,
        actor: &str,
        product: &str,
        req: &AddEntitlement,
    ) -> StoreResult<Entitlement> {
        self.seen(self.inner.add_entitlement(actor, product, req).await)
    }

    async fn dated_entitlements(&self) -> StoreResult<Vec<Entitlement>> {
        self.seen(self.inner.dated_entitlements().await)
    }

    async fn entitlements(&self, product: &str) -> StoreResult<Vec<Entitlement>> {
        self.seen(self.inner.entitlements(product).await)
    }

    async fn remove_entitlement(
        &self,
        actor: &str,
        product: &str,
        id: i64,
    ) -> StoreResult<Entitlement> {
        self.seen(self.inner.remove_entitlement(actor, product, id).await)
    }

    async fn register_server(
        &self,
        actor: &str,
        req: &RegisterServer,
        token_salt: &str,
        token_hash: &str,
    ) -> StoreResult<Server> {
        self.seen(
            self.inner
                .register_server(actor, req, token_salt, token_hash)
                .await,
        )
    }

    async fn servers(&self) -> StoreResult<Vec<Server>> {
        self.seen(self.inner.servers().await)
    }

    async fn server_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<ServerRecord>> {
        self.seen(self.inner.server_by_token_hash(token_hash).await)
    }

    async fn rotate_server_token(
        &self,
        actor: &str,
        name: &str,
        token_salt: &str,
        token_hash: &str,
        previous_until: Option<DateTime<Utc>>,
    ) -> StoreResult<ServerRecord> {
        self.seen(
            self.inner
                .rotate_server_token(actor, name, token_salt, token_hash, previous_until)
                .await,
        )
    }

    async fn retire_previous_token(&self, name: &str, current_salt: &str) -> StoreResult<bool> {
        self.seen(self.inner.retire_previous_token(name, current_salt).await)
    }

    async fn drain_server(&self, actor: &str, name: &str) -> StoreResult<Server> {
        self.seen(self.inner.drain_server(actor, name).await)
    }

    async fn remove_server(&self, actor: &str, name: &str) -> StoreResult<Server> {
        self.seen(self.inner.remove_server(actor, name).await)
    }

    async fn set_allocation_limits(
        &self,
        actor: &str,
        server: &str,
        product: &str,
        req: &SetAllocation,
    ) -> StoreResult<AllocationView> {
        self.seen(
            self.inner
                .set_allocation_limits(actor, server, product, req)
                .await,
        )
    }

    async fn schedule(&self) -> StoreResult<ScheduleSetting> {
        self.seen(self.inner.schedule().await)
    }

    async fn set_schedule(&self, actor: &str, setting: &ScheduleSetting) -> StoreResult<()> {
        self.seen(self.inner.set_schedule(actor, setting).await)
    }

    async fn audit(&self, query: AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        self.seen(self.inner.audit(query).await)
    }

    async fn record_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        self.seen(self.inner.record_audit(actor, action, target, detail).await)
    }

    async fn add_operator(
        &self,
        actor: &str,
        name: &str,
        role: crate::store::Role,
        password_hash: &str,
    ) -> StoreResult<crate::store::Operator> {
        self.seen(
            self.inner
                .add_operator(actor, name, role, password_hash)
                .await,
        )
    }

    async fn operators(&self) -> StoreResult<Vec<crate::store::Operator>> {
        self.seen(self.inner.operators().await)
    }

    async fn estate_totals(&self) -> StoreResult<Vec<crate::store::EstateTotal>> {
        self.seen(self.inner.estate_totals().await)
    }

    async fn operator_credentials(
        &self,
        name: &str,
    ) -> StoreResult<Option<(crate::store::Operator, String)>> {
        self.seen(self.inner.operator_credentials(name).await)
    }

    async fn remove_operator(
        &self,
        actor: &str,
        name: &str,
    ) -> StoreResult<crate::store::Operator> {
        self.seen(self.inner.remove_operator(actor, name).await)
    }

    async fn begin_moves(&self, moves: &[NewMove]) -> StoreResult<Vec<MoveRecord>> {
        self.seen(self.inner.begin_moves(moves).await)
    }

    async fn complete_moves(
        &self,
        landed: &[crate::store::LandedMove],
        fence: &Fence,
    ) -> StoreResult<Vec<MoveRecord>> {
        self.seen(self.inner.complete_moves(landed, fence).await)
    }

    async fn abandon_move(&self, id: Uuid, reason: &str, fence: &Fence) -> StoreResult<MoveRecord> {
        self.seen(self.inner.abandon_move(id, reason, fence).await)
    }

    async fn unfinished_moves(&self) -> StoreResult<Vec<MoveRecord>> {
        self.seen(self.inner.unfinished_moves().await)
    }

    async fn books(&self) -> StoreResult<Vec<BooksCheck>> {
        self.seen(self.inner.books().await)
    }

    async fn token_key(&self) -> StoreResult<String> {
        self.seen(self.inner.token_key().await)
    }

    async fn server_records(&self) -> StoreResult<Vec<ServerRecord>> {
        self.seen(self.inner.server_records().await)
    }

    async fn touch_server(&self, name: &str) -> StoreResult<()> {
        self.seen(self.inner.touch_server(name).await)
    }

    async fn reclaim_lost_server(
        &self,
        name: &str,
        fence: &Fence,
    ) -> StoreResult<Vec<(String, u64)>> {
        self.seen(self.inner.reclaim_lost_server(name, fence).await)
    }

    async fn take_shard(&self, shard: u32, url: &str) -> StoreResult<i64> {
        self.seen(self.inner.take_shard(shard, url).await)
    }

    async fn shard_leaders(&self) -> StoreResult<Vec<ShardLeader>> {
        self.seen(self.inner.shard_leaders().await)
    }

    async fn set_shard_count(&self, actor: &str, count: u32) -> StoreResult<()> {
        self.seen(self.inner.set_shard_count(actor, count).await)
    }

    async fn revive_server(&self, name: &str) -> StoreResult<bool> {
        self.seen(self.inner.revive_server(name).await)
    }

    async fn clear_reset(&self, name: &str) -> StoreResult<()> {
        self.seen(self.inner.clear_reset(name).await)
    }

    async fn cells(&self) -> StoreResult<Vec<CellRecord>> {
        self.seen(self.inner.cells().await)
    }

    async fn products_and_cells(&self) -> StoreResult<(Vec<Product>, Vec<CellRecord>)> {
        self.seen(self.inner.products_and_cells().await)
    }

    async fn product_cells(&self, product: &str) -> StoreResult<Vec<CellRecord>> {
        self.seen(self.inner.product_cells(product).await)
    }

    async fn product_cells_of(
        &self,
        product: &str,
        servers: &[String],
    ) -> StoreResult<Vec<CellRecord>> {
        self.seen(self.inner.product_cells_of(product, servers).await)
    }

    async fn cell(&self, server: &str, product: &str) -> StoreResult<Option<CellRecord>> {
        self.seen(self.inner.cell(server, product).await)
    }

    async fn last_peaks(&self, product: &str) -> StoreResult<HashMap<String, u64>> {
        self.seen(self.inner.last_peaks(product).await)
    }

    async fn touch_servers(&self, names: &[String]) -> StoreResult<()> {
        self.seen(self.inner.touch_servers(names).await)
    }

    async fn begin_run(&self, trigger: RunTrigger, fence: &Fence) -> StoreResult<i64> {
        self.seen(self.inner.begin_run(trigger, fence).await)
    }

    async fn finish_run(&self, run_id: i64, outcome: &RunOutcome) -> StoreResult<()> {
        self.seen(self.inner.finish_run(run_id, outcome).await)
    }

    async fn begin_run_with_moves(
        &self,
        trigger: RunTrigger,
        fence: &Fence,
        moves: &[NewMove],
    ) -> StoreResult<(i64, Vec<MoveRecord>)> {
        self.seen(self.inner.begin_run_with_moves(trigger, fence, moves).await)
    }

    async fn log_instant_grant(
        &self,
        fence: &Fence,
        grant: &NewMove,
        request_id: Uuid,
        reserve_as_read: u64,
    ) -> StoreResult<InstantLog> {
        self.seen(
            self.inner
                .log_instant_grant(fence, grant, request_id, reserve_as_read)
                .await,
        )
    }

    async fn finish_instant_run(
        &self,
        run_id: i64,
        outcome: &RunOutcome,
        answered: Option<(Uuid, &InstantRecord)>,
    ) -> StoreResult<()> {
        self.seen(
            self.inner
                .finish_instant_run(run_id, outcome, answered)
                .await,
        )
    }

    async fn complete_instant_grant(
        &self,
        landed: crate::store::LandedMove,
        fence: &Fence,
        run_id: i64,
        outcome: &RunOutcome,
        answered: (Uuid, &InstantRecord),
    ) -> StoreResult<MoveRecord> {
        self.seen(
            self.inner
                .complete_instant_grant(landed, fence, run_id, outcome, answered)
                .await,
        )
    }

    async fn record_samples(
        &self,
        run_id: i64,
        at_ms: i64,
        samples: &[UsageSample],
    ) -> StoreResult<()> {
        self.seen(self.inner.record_samples(run_id, at_ms, samples).await)
    }

    async fn record_decisions(
        &self,
        run_id: i64,
        at_ms: i64,
        decisions: &[RunDecision],
    ) -> StoreResult<()> {
        self.seen(self.inner.record_decisions(run_id, at_ms, decisions).await)
    }

    async fn expire_from_reserve(
        &self,
        now_ms: i64,
        fence: &Fence,
    ) -> StoreResult<Vec<(String, u64)>> {
        self.seen(self.inner.expire_from_reserve(now_ms, fence).await)
    }

    async fn store_records(
        &self,
        server: &str,
        batch: &RecordBatch,
    ) -> StoreResult<(RecordAck, u64)> {
        self.seen(self.inner.store_records(server, batch).await)
    }

    async fn usage_totals(&self, query: &RecordsQuery) -> StoreResult<Vec<UsageTotals>> {
        self.seen(self.inner.usage_totals(query).await)
    }

    async fn usage_intervals(
        &self,
        product: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<Interval>> {
        self.seen(
            self.inner
                .usage_intervals(product, since_ms, until_ms)
                .await,
        )
    }

    async fn prune_records(&self, before_ms: i64) -> StoreResult<u64> {
        self.seen(self.inner.prune_records(before_ms).await)
    }

    async fn runs(&self, query: &RunsQuery) -> StoreResult<Vec<RunSummary>> {
        self.seen(self.inner.runs(query).await)
    }

    async fn run(&self, run_id: i64) -> StoreResult<RunDetail> {
        self.seen(self.inner.run(run_id).await)
    }

    async fn history(&self, query: &HistoryQuery) -> StoreResult<Vec<HistoryBucket>> {
        self.seen(self.inner.history(query).await)
    }

    async fn roll_up(&self, until_ms: i64) -> StoreResult<u64> {
        self.seen(self.inner.roll_up(until_ms).await)
    }

    async fn prune_history(
        &self,
        raw_before_ms: i64,
        hourly_before_ms: i64,
    ) -> StoreResult<(u64, u64)> {
        self.seen(
            self.inner
                .prune_history(raw_before_ms, hourly_before_ms)
                .await,
        )
    }

    async fn samples_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, UsageSample)>> {
        self.seen(self.inner.samples_between(from_ms, to_ms).await)
    }

    async fn peak_samples(
        &self,
        ranges: &[(i64, i64)],
    ) -> StoreResult<Vec<(String, String, i64, u64)>> {
        self.seen(self.inner.peak_samples(ranges).await)
    }

    async fn instant_grants_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<Vec<(i64, String, String, u64)>> {
        self.seen(self.inner.instant_grants_between(from_ms, to_ms).await)
    }

    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        self.seen(self.inner.setting(key).await)
    }

    async fn set_setting(&self, actor: &str, key: &str, value: &str) -> StoreResult<()> {
        self.seen(self.inner.set_setting(actor, key, value).await)
    }

    async fn instant_start(&self, request_id: Uuid, product: &str) -> StoreResult<InstantStart> {
        self.seen(self.inner.instant_start(request_id, product).await)
    }
}
