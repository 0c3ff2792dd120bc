//! A [`Store`] in one of two roles around the adaptive limit ([`StoreLimiter`]):
//! - **delivery** (the senders', the ReceiptActor's): the calls that reach MongoDB on the
//!   delivery side (the claim's read, the suppression check, the outcome write, a
//!   reschedule, the receipts' batch)
//!   wait for the limiter first, so that while the accept path is slow they come fewer and
//!   larger. Lease renewals (Redis alone) and everything else pass straight through: a
//!   renewal held back could lose a lease.
//! - **accepts** (the RouterActor's): every `insert_many` goes at once, and its latency is
//!   reported to the limiters, which is what they adapt to.

use crate::adaptive::{Sample, Source, StoreLimiter};
use crate::domain::{ClaimResult, Communication, Outcome};
use crate::ports::{
    DependencyError, FailResult, InsertResult, ReceiptResult, ReceiptUpdate, Store, SweepScope,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub struct LimitedStore {
    inner: Arc<dyn Store>,
    role: Role,
}

enum Role {
    Delivery(Arc<StoreLimiter>),
    Accepts(Vec<Arc<StoreLimiter>>),
}

impl LimitedStore {
    /// The delivery side's store: its MongoDB calls wait for `limiter`.
    pub fn delivery(inner: Arc<dyn Store>, limiter: Arc<StoreLimiter>) -> Self {
        LimitedStore {
            inner,
            role: Role::Delivery(limiter),
        }
    }

    /// The accept path's store: its inserts are reported to `limiters`, never held back.
    pub fn accepts(inner: Arc<dyn Store>, limiters: Vec<Arc<StoreLimiter>>) -> Self {
        LimitedStore {
            inner,
            role: Role::Accepts(limiters),
        }
    }

    async fn gated<T>(
        &self,
        call: impl Future<Output = Result<T, DependencyError>>,
    ) -> Result<T, DependencyError> {
        match &self.role {
            Role::Delivery(limiter) => limiter.run(call).await,
            Role::Accepts(_) => call.await,
        }
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
        self.gated(self.inner.claim(ids, owner, stale_after)).await
    }

    async fn record_outcomes(
        &self,
        owner: &str,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<Vec<String>, DependencyError> {
        self.gated(self.inner.record_outcomes(owner, outcomes))
            .await
    }

    async fn reschedule(
        &self,
        owner: &str,
        ids: &[String],
        not_before: DateTime<Utc>,
    ) -> Result<(), DependencyError> {
        self.gated(self.inner.reschedule(owner, ids, not_before))
            .await
    }

    async fn apply_receipts(
        &self,
        receipts: &[ReceiptUpdate],
    ) -> Result<Vec<ReceiptResult>, DependencyError> {
        self.gated(self.inner.apply_receipts(receipts)).await
    }

    async fn suppressed(
        &self,
        recipients: &[(String, crate::domain::Channel, String)],
    ) -> Result<Vec<bool>, DependencyError> {
        self.gated(self.inner.suppressed(recipients)).await
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
        let Role::Accepts(limiters) = &self.role else {
            return self.inner.insert_many(records).await;
        };
        let started = tokio::time::Instant::now();
        let result = self.inner.insert_many(records).await;
        let sample = Sample {
            started,
            ended: tokio::time::Instant::now(),
            source: Source::Accept,
            ok: result.is_ok(),
        };
        limiters.iter().for_each(|l| l.observe(&sample));
        result
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
