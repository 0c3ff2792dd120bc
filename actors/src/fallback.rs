//! FallbackActor: sends a message's fallback (`"fallback": {"type", "afterSeconds"}` on
//! the request) when the message did not reach the person: not `delivered` or `read`
//! `afterSeconds` after it was accepted, or `failed` for good before that.
//!
//! Owns: nothing but its timer; MongoDB holds every fallback, when it is due
//! (`fallbackAt`) and whether it is settled, so the timer survives restarts.
//! Talks to it: itself (`Tick`); the supervisor starts and stops it.
//! Talks to: the store ([`Fallbacks`]: the due ones, oldest first; settling them), the
//! RouterActor through [`Admission`], as an HTTP request would.
//! On failure: nothing is in flight between ticks. A fallback goes to the router with the
//! idempotency key `fallback of {id}` (with a space, which no client's key can hold), so
//! one submitted before a crash, or by another process at the same time, is answered as
//! the same record the next time instead of being made twice; settling is idempotent. A
//! store or router error leaves the record due, for the next tick.

use crate::domain::Status;
use crate::ports::{DependencyError, DueFallback, Fallbacks};
use crate::router::{AcceptError, Admission, Submission};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "fallback";

pub enum FallbackMsg {
    Tick,
}

#[derive(Clone)]
pub struct FallbackArgs {
    pub store: Arc<dyn Fallbacks>,
    pub admission: Admission,
    /// Time between looks for due fallbacks.
    pub interval: Duration,
    /// Most fallbacks handled a look.
    pub batch: usize,
    /// Whether fallbacks may be submitted yet (the store's unique idempotency index, which
    /// keeps a fallback from being made twice, exists).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// The idempotency key of `id`'s fallback.
pub fn key_of(id: &str) -> String {
    format!("fallback of {id}")
}

/// Why a fallback could not be settled this time.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    #[error(transparent)]
    Store(#[from] DependencyError),
    #[error("the router did not take the fallback: {0}")]
    Router(String),
}

pub struct FallbackActor;

impl Actor for FallbackActor {
    type Msg = FallbackMsg;
    type State = FallbackArgs;
    type Arguments = FallbackArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FallbackArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_after(args.interval, || FallbackMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        args: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Err(e) = pass(args).await {
            metrics::counter!("fallback_errors_total").increment(1);
            tracing::warn!(error = %e, "fallbacks not settled; trying again next time");
        }
        myself.send_after(args.interval, || FallbackMsg::Tick);
        Ok(())
    }
}

/// One look: every due fallback sent or found not needed, and settled.
pub async fn pass(a: &FallbackArgs) -> Result<usize, FallbackError> {
    if !(a.ready)() {
        return Ok(0);
    }
    let due = a.store.due_fallbacks(Utc::now(), a.batch).await?;
    let n = due.len();
    for d in due {
        settle(a, d).await?;
    }
    Ok(n)
}

async fn settle(a: &FallbackArgs, d: DueFallback) -> Result<(), FallbackError> {
    if matches!(d.status, Status::Delivered | Status::Read) {
        metrics::counter!("fallbacks_total", "outcome" => "not_needed").increment(1);
        a.store.settle_fallback(&d.id, None).await?;
        return Ok(());
    }
    let submission = Submission {
        request: d.fallback.request,
        tenant: d.tenant,
        idempotency_key: Some(key_of(&d.id)),
        fallback: None,
        fallback_of: Some(d.id.clone()),
        template: None,
        batch_id: None,
    };
    let deadline = tokio::time::Instant::now() + a.interval.max(Duration::from_secs(1));
    let accepted = a
        .admission
        .accept(submission, deadline)
        .await
        .map_err(|e| match e {
            crate::call::CallError::Refused(AcceptError::KeyConflict(k)) => {
                FallbackError::Router(format!("key {k:?} holds another request"))
            }
            other => FallbackError::Router(other.to_string()),
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
