//! FallbackActor: sends a message's fallback (`"fallback": {"type", "afterSeconds"}` on
//! the request) when the message did not reach the person: not `delivered` or `read`
//! `afterSeconds` after it was accepted, or `failed` for good before that.
//!
//! A [`DueWork`] looked at by a [`crate::due::DueTimer`] registered as [`NAME`].
//!
//! Owns: nothing; MongoDB holds every fallback, when it is due (`fallbackAt`) and whether
//! it is settled, so the timer survives restarts.
//! Talks to it: its DueTimer, every `fallback.interval_ms`; the supervisor starts and
//! stops that.
//! Talks to: the store ([`Fallbacks`]: the due ones, oldest first; settling them), the
//! RouterActor through [`Admission`], as an HTTP request would.
//! On failure: nothing is in flight between looks. A fallback goes to the router with the
//! idempotency key `fallback of {id}` (with a space, which no client's key can hold), so
//! one submitted before a crash, or by another process at the same time, is answered as
//! the same record the next time instead of being made twice; settling is idempotent. A
//! store or router error leaves the record due, for the next look.

use crate::domain::Status;
use crate::due::{DueError, DueWork};
use crate::ports::{DueFallback, Fallbacks};
use crate::router::{AcceptError, Admission, Submission};
use async_trait::async_trait;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "fallback";

#[derive(Clone)]
pub struct FallbackArgs {
    pub store: Arc<dyn Fallbacks>,
    pub admission: Admission,
    /// How long the router may take with one fallback.
    pub deadline: Duration,
    /// Whether fallbacks may be submitted yet (the store's unique idempotency index, which
    /// keeps a fallback from being made twice, exists).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// The idempotency key of `id`'s fallback.
pub fn key_of(id: &str) -> String {
    format!("fallback of {id}")
}

#[async_trait]
impl DueWork for FallbackArgs {
    fn what(&self) -> &'static str {
        "fallbacks"
    }

    fn errors_metric(&self) -> &'static str {
        "fallback_errors_total"
    }

    /// One look: every due fallback sent or found not needed, and settled.
    async fn pass(&self, batch: usize) -> Result<usize, DueError> {
        if !(self.ready)() {
            return Ok(0);
        }
        let due = self.store.due_fallbacks(Utc::now(), batch).await?;
        let n = due.len();
        for d in due {
            settle(self, d).await?;
        }
        Ok(n)
    }
}

async fn settle(a: &FallbackArgs, d: DueFallback) -> Result<(), DueError> {
    // A canceled message was meant not to reach the person: nor is its fallback.
    if matches!(
        d.status,
        Status::Delivered | Status::Read | Status::Canceled
    ) {
        metrics::counter!("fallbacks_total", "outcome" => "not_needed").increment(1);
        a.store.settle_fallback(&d.id, None).await?;
        return Ok(());
    }
    let submission = Submission {
        id: None,
        request: d.fallback.request,
        tenant: d.tenant,
        idempotency_key: Some(key_of(&d.id)),
        fallback: None,
        fallback_of: Some(d.id.clone()),
        template: None,
        batch_id: None,
        send_at: None,
        html: None,
        priority: d.priority,
    };
    let deadline = tokio::time::Instant::now() + a.deadline;
    let accepted = a
        .admission
        .accept(submission, deadline)
        .await
        .map_err(|e| match e {
            crate::call::CallError::Refused(AcceptError::KeyConflict(k)) => {
                DueError::Router(format!("key {k:?} holds another request"))
            }
            other => DueError::Router(other.to_string()),
        })?;
    if !accepted.replayed {
        metrics::counter!("fallbacks_total", "outcome" => "sent").increment(1);
        tracing::info!(of = %d.id, fallback = %accepted.record.id, status = %d.status.as_str(), "fallback queued");
    }
    a.store
        .settle_fallback(&d.id, Some(&accepted.record.id))
        .await?;
    Ok(())
}
