//! RouterActor: turns validated requests into stored, queued communications.
//!
//! Owns: the batch of requests waiting for the next group commit.
//! Talks to it: the HTTP layer, through [`accept`] (`Accept`, an RPC answered once the record
//! is stored; the caller gets a typed error, never ractor's call result).
//! Talks to: MongoDB (one `insert_many` per batch), Redis (one pipeline per batch: the
//! `queued` log event to `log_stream`, the entry to `{type}_stream`).
//! On failure: a batch already handed to its writer task finishes and answers its callers;
//! requests still in the mailbox are dropped unanswered, so their callers get 503 and
//! nothing was stored for them. A request is answered `queued` only after MongoDB has it;
//! if the stream append fails afterwards, the OutboxSweeper appends it after its grace time.

use crate::batch::BatchSettings;
use crate::domain::{Communication, EventStatus, LogEvent, NewCommunication, LOG_STREAM};
use crate::ports::{DependencyError, InsertResult, Queue, Store};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

pub const NAME: &str = "router";

/// A request the router took.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub record: Communication,
    /// The idempotency key was seen before with the same request: this is the original.
    pub replayed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Unavailable(#[from] DependencyError),
    #[error("the Idempotency-Key {0:?} was already used for a different request")]
    KeyConflict(String),
}

pub type AcceptReply = RpcReplyPort<Result<Accepted, AcceptError>>;

/// What the HTTP layer hands over: a validated request, whose it is, and its optional
/// `Idempotency-Key` (unique per tenant).
#[derive(Debug, Clone)]
pub struct Submission {
    pub request: NewCommunication,
    pub tenant: String,
    pub idempotency_key: Option<String>,
}

pub enum RouterMsg {
    Accept(Submission, AcceptReply),
    Flush,
}

/// Hand a submission to the running router and wait up to `timeout` for its answer (given
/// once the record is stored). `NotRunning`: nothing was stored; `TimedOut`/`Stopped`: it
/// may have been.
pub async fn accept(
    submission: Submission,
    timeout: std::time::Duration,
) -> Result<Accepted, crate::call::CallError<AcceptError>> {
    crate::call::call_registered(NAME, |reply| RouterMsg::Accept(submission, reply), timeout).await
}

#[derive(Clone)]
pub struct RouterArgs {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// The group commit: most requests written in one round trip, and how long the first
    /// of them waits for company.
    pub batch: BatchSettings,
    /// Batches being written at once; beyond it, new requests wait in the mailbox.
    pub max_inflight: usize,
}

pub struct RouterState {
    args: RouterArgs,
    batch: Vec<(Communication, AcceptReply)>,
    flush_scheduled: bool,
    inflight: Arc<Semaphore>,
    /// After a failed append, appends are skipped until this time (ms since the epoch), so
    /// a Redis outage costs requests no latency; the sweeper queues what was skipped.
    redis_down_until: Arc<AtomicI64>,
}

pub struct RouterActor;

impl Actor for RouterActor {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RouterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RouterState {
            inflight: Arc::new(Semaphore::new(args.max_inflight.max(1))),
            batch: Vec::with_capacity(args.batch.max_items),
            flush_scheduled: false,
            redis_down_until: Arc::new(AtomicI64::new(0)),
            args,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Accept(sub, reply) => {
                let id = bson::oid::ObjectId::new().to_hex();
                let mut rec = Communication::new(id, sub.request, Utc::now());
                rec.tenant = sub.tenant;
                rec.idempotency_key = sub.idempotency_key;
                state.batch.push((rec, reply));
                if state.args.batch.is_full(state.batch.len(), 0) {
                    flush(state).await;
                } else if !state.flush_scheduled {
                    state.flush_scheduled = true;
                    myself.send_after(state.args.batch.max_wait, || RouterMsg::Flush);
                }
            }
            RouterMsg::Flush => {
                state.flush_scheduled = false;
                flush(state).await;
            }
        }
        Ok(())
    }
}

async fn flush(state: &mut RouterState) {
    if state.batch.is_empty() {
        return;
    }
    // Waiting here is the backpressure: the mailbox holds new requests meanwhile.
    let Ok(permit) = state.inflight.clone().acquire_owned().await else {
        return;
    };
    let batch = std::mem::replace(
        &mut state.batch,
        Vec::with_capacity(state.args.batch.max_items),
    );
    let store = state.args.store.clone();
    let queue = state.args.queue.clone();
    let down = state.redis_down_until.clone();
    tokio::spawn(async move {
        write_batch(store.as_ref(), queue.as_ref(), &down, batch).await;
        drop(permit);
    });
}

/// Group commit: one insert, one pipeline, then every caller is answered.
pub async fn write_batch(
    store: &dyn Store,
    queue: &dyn Queue,
    redis_down_until: &AtomicI64,
    batch: Vec<(Communication, AcceptReply)>,
) {
    let started = Instant::now();
    let records: Vec<Communication> = batch.iter().map(|(r, _)| r.clone()).collect();
    metrics::histogram!("router_batch_size").record(records.len() as f64);
    let results = match store.insert_many(&records).await {
        Ok(r) => r,
        Err(err) => {
            tracing::warn!(error = %err, batch = records.len(), "store refused a batch; answering 503");
            metrics::counter!("router_store_failures_total").increment(1);
            for (_, reply) in batch {
                let _ = reply.send(Err(err.clone().into()));
            }
            return;
        }
    };
    let now = Utc::now();
    let mut answers = Vec::with_capacity(batch.len());
    let mut entries: Vec<(&str, Vec<(&str, String)>)> = Vec::with_capacity(records.len() * 2);
    for ((rec, reply), result) in batch.into_iter().zip(results) {
        match result {
            InsertResult::Inserted => {
                // The log event first: the `communications` index sees `queued` before any outcome.
                entries.push((
                    LOG_STREAM,
                    LogEvent::for_record(&rec, "router", EventStatus::Queued, 0, now).to_fields(),
                ));
                entries.push((rec.channel.stream(), rec.stream_fields()));
                metrics::counter!("communications_accepted_total", "channel" => rec.channel.as_str())
                    .increment(1);
                answers.push((
                    reply,
                    Ok(Accepted {
                        record: rec,
                        replayed: false,
                    }),
                ));
            }
            InsertResult::KeyTaken(original) if original.request_hash == rec.request_hash => {
                metrics::counter!("idempotent_replays_total").increment(1);
                answers.push((
                    reply,
                    Ok(Accepted {
                        record: *original,
                        replayed: true,
                    }),
                ));
            }
            InsertResult::KeyTaken(_) => {
                let key = rec.idempotency_key.clone().unwrap_or_default();
                answers.push((reply, Err(AcceptError::KeyConflict(key))));
            }
        }
    }
    let now_ms = now.timestamp_millis();
    if !entries.is_empty() {
        if redis_down_until.load(Ordering::Relaxed) > now_ms {
            metrics::counter!("router_queue_skipped_total").increment(1);
        } else if let Err(err) = queue.append(&entries).await {
            tracing::warn!(error = %err, batch = entries.len() / 2,
                "stored but not yet queued; the outbox sweep will queue them");
            metrics::counter!("router_queue_failures_total").increment(1);
            redis_down_until.store(now_ms + 2000, Ordering::Relaxed);
        }
    }
    for (reply, answer) in answers {
        let _ = reply.send(answer);
    }
    metrics::histogram!("router_batch_seconds").record(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, EventStatus};
    use crate::ports::ErrorKind;
    use crate::testing::{self, MemoryQueue, MemoryStore, QueueMethod, StoreMethod};
    use std::time::Duration;

    struct Fixture {
        store: Arc<MemoryStore>,
        queue: MemoryQueue,
        router: ActorRef<RouterMsg>,
    }

    /// A router whose batches close at `items` requests (or after 10 ms).
    async fn fixture(items: usize) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let queue = MemoryQueue::new();
        let args = RouterArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            batch: BatchSettings::new(items, Duration::from_millis(10)),
            max_inflight: 2,
        };
        let (router, _) = Actor::spawn(None, RouterActor, args).await.unwrap();
        Fixture {
            store,
            queue,
            router,
        }
    }

    fn submission(n: u32, key: Option<&str>) -> Submission {
        let r = testing::record(n, Channel::Sms);
        Submission {
            request: NewCommunication {
                channel: r.channel,
                from: r.from,
                to: r.to,
                msg: r.msg,
                subject: None,
            },
            tenant: "acme".into(),
            idempotency_key: key.map(str::to_string),
        }
    }

    async fn accept_all(
        router: &ActorRef<RouterMsg>,
        subs: Vec<Submission>,
    ) -> Vec<Result<Accepted, AcceptError>> {
        let calls = subs.into_iter().map(|s| async move {
            match router.call(|r| RouterMsg::Accept(s, r), None).await {
                Ok(ractor::rpc::CallResult::Success(a)) => a,
                _ => panic!("the router did not answer"),
            }
        });
        futures::future::join_all(calls).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_one_insert_and_one_append() {
        let f = fixture(3).await;
        let answers = accept_all(&f.router, (1..=3).map(|n| submission(n, None)).collect()).await;
        assert!(answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|a| !a.replayed)));
        assert_eq!(f.store.script.sizes(StoreMethod::InsertMany), [3]);
        // Per record, its `queued` event and its stream entry, in one pipeline.
        assert_eq!(f.queue.script().sizes(QueueMethod::Append), [6]);
        let events = f.queue.entries(LOG_STREAM);
        assert_eq!(events.len(), 3);
        for e in &events {
            let ev = LogEvent::from_entry(e).unwrap();
            assert_eq!(
                (ev.status, ev.attempt, ev.tenant.as_str()),
                (EventStatus::Queued, 0, "acme")
            );
        }
        assert_eq!(f.queue.entries(Channel::Sms.stream()).len(), 3);
        assert_eq!(f.store.records().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_key_answers_with_the_earlier_record_or_a_conflict() {
        let f = fixture(2).await;
        let first = accept_all(&f.router, vec![submission(1, Some("k"))]).await;
        let original = first[0].as_ref().unwrap().record.clone();
        let answers = accept_all(
            &f.router,
            vec![submission(1, Some("k")), submission(2, Some("k"))],
        )
        .await;
        let replay = answers[0].as_ref().unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.record.id, original.id);
        assert!(matches!(&answers[1], Err(AcceptError::KeyConflict(k)) if k == "k"));
        // Nothing new to queue: the second batch appended nothing.
        assert_eq!(f.queue.script().sizes(QueueMethod::Append), [2]);
        assert_eq!(f.store.records().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_failure_is_answered_to_every_request_and_nothing_is_queued() {
        let f = fixture(2).await;
        f.store
            .script
            .fail_next(StoreMethod::InsertMany, 1, ErrorKind::Unavailable);
        let answers = accept_all(&f.router, vec![submission(1, None), submission(2, None)]).await;
        for a in answers {
            assert!(
                matches!(a, Err(AcceptError::Unavailable(e)) if e.dependency == crate::ports::Dependency::MongoDb)
            );
        }
        assert_eq!(f.queue.script().count(QueueMethod::Append), 0);
        assert!(f.store.records().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_redis_failure_still_answers_and_skips_appends_for_a_while() {
        let f = fixture(1).await;
        f.queue
            .script()
            .fail_next(QueueMethod::Append, 1, ErrorKind::Unavailable);
        let answers = accept_all(&f.router, vec![submission(1, None)]).await;
        assert!(answers[0].is_ok(), "stored, so answered");
        assert_eq!(f.store.records().len(), 1);
        // The next batch, right after, does not even try: the sweeper will queue both.
        let answers = accept_all(&f.router, vec![submission(2, None)]).await;
        assert!(answers[0].is_ok());
        assert_eq!(f.queue.script().count(QueueMethod::Append), 1);
        assert!(f.queue.entries(Channel::Sms.stream()).is_empty());
    }
}
