//! A [`Store`] whose calls that reach MongoDB on the delivery side (the claim's read, the
//! outcome write, a reschedule, the receipts' batch) wait for a [`StoreLimiter`] first, so
//! that while the store is slow they come fewer and larger, and leave it room for the
//! RouterActor's inserts (which go to the store unwrapped). Lease renewals (Redis alone)
//! and everything else pass straight through: a renewal held back could lose a lease.

use crate::adaptive::{CallKind, StoreLimiter};
use crate::domain::{ClaimResult, Communication, Outcome};
use crate::ports::{
    DependencyError, FailResult, InsertResult, ReceiptResult, ReceiptUpdate, Store, SweepScope,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

pub struct LimitedStore {
    inner: Arc<dyn Store>,
    limiter: Arc<StoreLimiter>,
}

impl LimitedStore {
    pub fn new(inner: Arc<dyn Store>, limiter: Arc<StoreLimiter>) -> Self {
        LimitedStore { inner, limiter }
    }
}

#[async_trait]
impl Store for LimitedStore {
    async fn claim(
        &self,
        ids: &[String],
        owner: &str,
        stale_after: Duration,
    ) -> Result<Vec<ClaimResult>, DependencyError> {
        let call = self.inner.claim(ids, owner, stale_after);
        self.limiter.run(CallKind::Read, ids.len(), call).await
    }

    async fn record_outcomes(
        &self,
        owner: &str,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<Vec<String>, DependencyError> {
        let call = self.inner.record_outcomes(owner, outcomes);
        self.limiter
            .run(CallKind::Write, outcomes.len(), call)
            .await
    }

    async fn reschedule(
        &self,
        owner: &str,
        ids: &[String],
        not_before: DateTime<Utc>,
    ) -> Result<(), DependencyError> {
        let call = self.inner.reschedule(owner, ids, not_before);
        self.limiter.run(CallKind::Write, ids.len(), call).await
    }

    async fn apply_receipts(
        &self,
        receipts: &[ReceiptUpdate],
    ) -> Result<Vec<ReceiptResult>, DependencyError> {
        let call = self.inner.apply_receipts(receipts);
        self.limiter
            .run(CallKind::Write, receipts.len(), call)
            .await
    }

    async fn renew(
        &self,
        owner: &str,
        claims: &[(String, u32)],
        stale_after: Duration,
    ) -> Result<Vec<bool>, DependencyError> {
        self.inner.renew(owner, claims, stale_after).await
    }

    async fn insert_many(
        &self,
        records: &[Communication],
    ) -> Result<Vec<InsertResult>, DependencyError> {
        self.inner.insert_many(records).await
    }

    async fn stored(&self, ids: &[String]) -> Result<Vec<bool>, DependencyError> {
        self.inner.stored(ids).await
    }

    async fn void(&self, ids: &[String]) -> Result<usize, DependencyError> {
        self.inner.void(ids).await
    }

    async fn fail(&self, id: &str, reason: &str) -> Result<FailResult, DependencyError> {
        self.inner.fail(id, reason).await
    }

    async fn take_due(
        &self,
        now: DateTime<Utc>,
        recheck: Duration,
        limit: usize,
        channels: &[SweepScope],
    ) -> Result<Vec<Communication>, DependencyError> {
        self.inner.take_due(now, recheck, limit, channels).await
    }

    async fn get(&self, id: &str) -> Result<Option<Communication>, DependencyError> {
        self.inner.get(id).await
    }

    async fn records(&self, ids: &[String]) -> Result<Vec<Communication>, DependencyError> {
        self.inner.records(ids).await
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.inner.ping().await
    }
}
