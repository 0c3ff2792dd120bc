//! RouterActor: turns validated requests into stored, queued communications.
//!
//! Owns: the batch of requests waiting for the next group commit.
//! Talks to it: the HTTP layer, through [`Admission`] (`Accept`, answered once the record
//! is stored, or 503 at the request's deadline).
//! Talks to: MongoDB (one `insert_many` per batch; a read-back by `_id` after an ambiguous
//! insert; `void` for records whose callers were already answered), Redis (one pipeline
//! per batch: the `queued` log event to `log_stream`, the entry to the record's lane of
//! `{type}_stream`, in the shard its id picks).
//! On failure: a batch already handed to its writer task finishes and answers its callers;
//! requests still in the mailbox are dropped unanswered, so their callers get 503 and
//! nothing was stored for them. A request is answered `queued` only after MongoDB has it;
//! if the stream append fails afterwards, the OutboxSweeper appends it after its grace time.
//!
//! A 503 means "not stored": [`Admission`] bounds the requests waiting (full: 503 at once)
//! and gives each a deadline. A request whose deadline passes before its batch is written
//! is dropped from the batch; one whose insert is under way when it passes is voided
//! ([`Store::void`]), so whether the insert lands before, after or never, the record is
//! never sent. After an ambiguous insert error the batch is read back by `_id`.

use crate::backoff::{retry_until, Backoff};
use crate::batch::BatchSettings;
use crate::call::{CallError, Ticket};
use crate::domain::{Communication, EventStatus, LogEvent, NewCommunication, Status, LOG_STREAM};
use crate::ports::{DependencyError, ErrorKind, InsertResult, Queue, Store};
use crate::shards::StreamShards;
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

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
    /// `max_pending` requests wait for the store already.
    #[error("too many requests are waiting for the store")]
    QueueFull,
    /// The router is not running (it is restarting); nothing was stored.
    #[error("the router is restarting")]
    Restarting,
}

pub type AcceptReply = RpcReplyPort<Result<Accepted, AcceptError>>;

/// What the HTTP layer hands over: a validated request, whose it is, and its optional
/// `Idempotency-Key` (unique per tenant).
#[derive(Debug, Clone)]
pub struct Submission {
    /// The record's id when its caller chose it (a bulk send lists its recipients' ids in
    /// its batch before they are stored); otherwise a new one.
    pub id: Option<String>,
    pub request: NewCommunication,
    pub tenant: String,
    pub idempotency_key: Option<String>,
    /// What to send instead if this does not reach the person.
    pub fallback: Option<crate::domain::Fallback>,
    /// The record this is the fallback of (the FallbackActor's submissions).
    pub fallback_of: Option<String>,
    /// The template the message was rendered from.
    pub template: Option<crate::domain::TemplateRef>,
    /// The bulk send it is one recipient of.
    pub batch_id: Option<String>,
    /// An email's HTML part, rendered from its template.
    pub html: Option<String>,
    /// When to send it, if later than now: stored `scheduled`, on no stream until then.
    pub send_at: Option<chrono::DateTime<Utc>>,
    /// Its lane (`high`, `normal`, `bulk`).
    pub priority: crate::domain::Priority,
}

/// A submission on its way to the store, with who waits for it and until when.
pub struct Pending {
    pub submission: Submission,
    pub reply: AcceptReply,
    pub ticket: Ticket,
    pub deadline: Instant,
    /// Its place in the bounded queue, given back when it is answered or dropped.
    pub slot: Option<OwnedSemaphorePermit>,
    /// The caller's trace context ([`crate::trace_context`]), kept on the record.
    pub traceparent: Option<String>,
}

pub enum RouterMsg {
    Accept(Box<Pending>),
    /// A bulk send's submissions, in one message so that they fill whole group commits.
    AcceptMany(Vec<Pending>),
    Flush,
}

/// The way in: at most `max_pending` requests admitted and not yet answered (beyond it,
/// `QueueFull` at once, so a frozen store grows no queue), each answered by its deadline.
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max_pending: usize,
    deadline: Duration,
    /// A bulk send's deadline: its recipients go through the same group commits, a few
    /// batches' worth at once.
    bulk_deadline: Duration,
}

impl Admission {
    pub fn new(max_pending: usize, deadline: Duration) -> Admission {
        let max_pending = max_pending.max(1);
        Admission {
            slots: Arc::new(Semaphore::new(max_pending)),
            max_pending,
            deadline,
            bulk_deadline: deadline,
        }
    }

    /// This admission with the deadline of bulk sends.
    pub fn with_bulk_deadline(mut self, bulk_deadline: Duration) -> Admission {
        self.bulk_deadline = bulk_deadline.max(self.deadline);
        self
    }

    /// The deadline of a request that arrived at `arrived`.
    pub fn deadline_from(&self, arrived: Instant) -> Instant {
        arrived + self.deadline
    }

    /// The deadline of a bulk send that arrived at `arrived`.
    pub fn bulk_deadline_from(&self, arrived: Instant) -> Instant {
        arrived + self.bulk_deadline
    }

    /// A bulk send's submissions, each answered on its own (a refusal of one is its own),
    /// all written through the router's group commits. Admitted together or not at all:
    /// when fewer than all of them fit in `max_pending`, `QueueFull` and nothing is stored.
    pub async fn accept_many(
        &self,
        submissions: Vec<Submission>,
        deadline: Instant,
    ) -> Result<Vec<Result<Accepted, CallError<AcceptError>>>, AcceptError> {
        self.ask_many(NAME, submissions, deadline).await
    }

    /// [`Admission::accept_many`] to the router registered as `name`.
    async fn ask_many(
        &self,
        name: &'static str,
        submissions: Vec<Submission>,
        deadline: Instant,
    ) -> Result<Vec<Result<Accepted, CallError<AcceptError>>>, AcceptError> {
        let n = u32::try_from(submissions.len()).map_err(|_| AcceptError::QueueFull)?;
        let mut slots = match self.slots.clone().try_acquire_many_owned(n) {
            Ok(s) => s,
            Err(_) => {
                metrics::counter!("router_queue_full_total").increment(1);
                return Err(AcceptError::QueueFull);
            }
        };
        let traceparent = crate::trace_context::current();
        let ask = |asked: Vec<(Submission, AcceptReply, Ticket)>| {
            let pending = asked
                .into_iter()
                .map(|(submission, reply, ticket)| Pending {
                    submission,
                    reply,
                    ticket,
                    deadline,
                    slot: slots.split(1),
                    traceparent: traceparent.clone(),
                });
            RouterMsg::AcceptMany(pending.collect())
        };
        crate::call::call_registered_many_until(name, submissions, ask, deadline)
            .await
            .map_err(|_| AcceptError::Restarting)
    }

    /// Hand a submission to the running router and wait until `deadline` at most.
    /// Every error means nothing is stored for it (or ever will be): `TimedOut` requests
    /// are dropped or voided by the router.
    pub async fn accept(
        &self,
        submission: Submission,
        deadline: Instant,
    ) -> Result<Accepted, CallError<AcceptError>> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("router_queue_full_total").increment(1);
            CallError::Refused(AcceptError::QueueFull)
        })?;
        metrics::gauge!("router_pending_requests")
            .set((self.max_pending - self.slots.available_permits()) as f64);
        self.ask(NAME, submission, slot, deadline).await
    }

    /// The call itself, to the router registered as `name` (tests run several).
    async fn ask(
        &self,
        name: &'static str,
        submission: Submission,
        slot: OwnedSemaphorePermit,
        deadline: Instant,
    ) -> Result<Accepted, CallError<AcceptError>> {
        let traceparent = crate::trace_context::current();
        let ask = |reply, ticket| {
            RouterMsg::Accept(Box::new(Pending {
                submission,
                reply,
                ticket,
                deadline,
                slot: Some(slot),
                traceparent,
            }))
        };
        crate::call::call_registered_until(name, ask, deadline).await
    }
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
    /// Which stream shard each record's entry goes to.
    pub shards: StreamShards,
}

/// A request in a batch: its record, and who waits for it until when.
struct Waiting {
    record: Communication,
    reply: AcceptReply,
    ticket: Ticket,
    deadline: Instant,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Waiting {
    /// Still worth writing: its caller waits, and has time left. A request past its
    /// deadline is given up here, so its caller's 503 is the truth.
    fn is_live(&self, now: Instant) -> bool {
        if self.ticket.is_abandoned() {
            return false;
        }
        self.deadline > now || !self.ticket.abandon()
    }
}

pub struct RouterState {
    args: RouterArgs,
    batch: Vec<Waiting>,
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
            RouterMsg::Accept(p) => take(&myself, state, *p).await,
            RouterMsg::AcceptMany(many) => {
                for p in many {
                    take(&myself, state, p).await;
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

/// A submission into the batch: its record made, written with the batch once the batch
/// is full or has waited `linger`.
async fn take(myself: &ActorRef<RouterMsg>, state: &mut RouterState, p: Pending) {
    let id = p
        .submission
        .id
        .unwrap_or_else(|| bson::oid::ObjectId::new().to_hex());
    let mut record = Communication::new(id, p.submission.request, Utc::now())
        .with_fallback(p.submission.fallback)
        .scheduled_at(p.submission.send_at);
    record.tenant = p.submission.tenant;
    record.idempotency_key = p.submission.idempotency_key;
    record.fallback_of = p.submission.fallback_of;
    record.template = p.submission.template;
    record.batch_id = p.submission.batch_id;
    record.html = p.submission.html;
    record.priority = p.submission.priority;
    record.traceparent = p.traceparent;
    let waiting = Waiting {
        record,
        reply: p.reply,
        ticket: p.ticket,
        deadline: p.deadline,
        _slot: p.slot,
    };
    if !waiting.is_live(Instant::now()) {
        metrics::counter!("router_expired_total").increment(1);
        return;
    }
    state.batch.push(waiting);
    if state.args.batch.is_full(state.batch.len(), 0) {
        flush(state).await;
    } else if !state.flush_scheduled {
        state.flush_scheduled = true;
        myself.send_after(state.args.batch.max_wait, || RouterMsg::Flush);
    }
}

async fn flush(state: &mut RouterState) {
    if state.batch.is_empty() {
        return;
    }
    // Waiting here is the backpressure: the mailbox holds new requests meanwhile, and
    // `Admission` bounds how many.
    let Ok(permit) = state.inflight.clone().acquire_owned().await else {
        return;
    };
    let mut batch = std::mem::replace(
        &mut state.batch,
        Vec::with_capacity(state.args.batch.max_items),
    );
    // Requests whose deadline passed while the writers were busy are not written.
    let now = Instant::now();
    let before = batch.len();
    batch.retain(|w| w.is_live(now));
    metrics::counter!("router_expired_total").increment((before - batch.len()) as u64);
    if batch.is_empty() {
        return;
    }
    let writer = Writer {
        store: state.args.store.clone(),
        queue: state.args.queue.clone(),
        redis_down_until: state.redis_down_until.clone(),
        shards: state.args.shards,
    };
    tokio::spawn(async move {
        writer.write_batch(batch).await;
        drop(permit);
    });
}

/// One `commit` span per record of a traced request, child of its request's span: the group
/// commit is shared, each message's trace shows it (insert, answer, stream append). Ended
/// when dropped, after the append.
fn commit_spans(records: &[Communication]) -> Vec<tracing::Span> {
    let n = records.len();
    records
        .iter()
        .filter(|r| r.traceparent.is_some())
        .map(|r| {
            let span = tracing::info_span!("commit", communication_id = %r.id, batch = n);
            crate::trace_context::adopt(&span, r.traceparent.as_deref());
            span
        })
        .collect()
}

/// What a batch's writer task needs.
struct Writer {
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    redis_down_until: Arc<AtomicI64>,
    shards: StreamShards,
}

/// A caller's answer, to be sent once the batch is settled.
type Answer = (AcceptReply, Result<Accepted, AcceptError>);

impl Writer {
    /// Group commit: one insert (racing the callers' deadlines), then every caller still
    /// waiting is answered, then one pipeline queues what was stored.
    async fn write_batch(&self, batch: Vec<Waiting>) {
        let started = std::time::Instant::now();
        let records: Vec<Communication> = batch.iter().map(|w| w.record.clone()).collect();
        metrics::histogram!("router_batch_records").record(records.len() as f64);
        let _spans = commit_spans(&records);
        let mut voided = vec![false; batch.len()];
        let insert = self.store.insert_many(&records);
        let results = match self.race_deadlines(insert, &batch, &mut voided).await {
            Ok(r) => r.into_iter().map(Ok).collect(),
            Err(e) if e.kind == ErrorKind::Ambiguous => {
                self.read_back(&batch, &mut voided, e).await
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = records.len(), "store refused a batch; answering 503");
                metrics::counter!("router_store_failures_total").increment(1);
                vec![Err(e); batch.len()]
            }
        };
        let (answers, entries, late) = settle(batch, results, &voided, self.shards);
        self.void(late);
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        self.append(&entries).await;
        metrics::histogram!("router_batch_seconds").record(started.elapsed().as_secs_f64());
    }

    /// Await `op` while the callers' deadlines pass: each caller whose deadline comes
    /// first is given up (its HTTP request answers 503) and its record voided.
    async fn race_deadlines<T>(
        &self,
        op: impl Future<Output = T>,
        batch: &[Waiting],
        voided: &mut [bool],
    ) -> T {
        tokio::pin!(op);
        loop {
            let next = batch
                .iter()
                .zip(voided.iter())
                .filter(|(_, v)| !**v)
                .map(|(w, _)| w.deadline)
                .min();
            let Some(next) = next else {
                return op.await;
            };
            tokio::select! {
                out = &mut op => return out,
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = Instant::now();
            let mut late = Vec::new();
            for (w, v) in batch.iter().zip(voided.iter_mut()) {
                if !*v && w.deadline <= now && w.ticket.abandon() {
                    *v = true;
                    late.push(w.record.id.clone());
                }
            }
            self.void(late);
        }
    }

    /// After an ambiguous insert: what is stored is stored (and answered so); what is not
    /// is fenced off with `void`, since the insert may still land, and answered 503.
    async fn read_back(
        &self,
        batch: &[Waiting],
        voided: &mut [bool],
        e: DependencyError,
    ) -> Vec<Result<InsertResult, DependencyError>> {
        metrics::counter!("router_ambiguous_inserts_total").increment(1);
        let ids: Vec<String> = batch.iter().map(|w| w.record.id.clone()).collect();
        let stored = self
            .race_deadlines(self.store.stored(&ids), batch, voided)
            .await
            .unwrap_or_else(|read| {
                tracing::warn!(error = %read, "cannot read an ambiguous batch back; voiding it");
                vec![false; ids.len()]
            });
        tracing::warn!(error = %e, stored = stored.iter().filter(|s| **s).count(),
            batch = ids.len(), "ambiguous insert read back by _id");
        let mut fence = Vec::new();
        let results = stored
            .iter()
            .zip(voided.iter_mut())
            .zip(&ids)
            .map(|((stored, v), id)| {
                if *stored {
                    return Ok(InsertResult::Inserted);
                }
                if !*v {
                    *v = true;
                    fence.push(id.clone());
                }
                Err(e.clone())
            })
            .collect();
        self.void(fence);
        results
    }

    /// Void `ids` in the background until MongoDB has done it (it may be frozen or down
    /// now): those records are never sent, whenever their inserts land.
    fn void(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        metrics::counter!("router_voided_total").increment(ids.len() as u64);
        let store = self.store.clone();
        tokio::spawn(async move {
            let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5));
            let done = retry_until(
                &backoff,
                None,
                || store.void(&ids),
                |e, _| {
                    tracing::warn!(error = %e, records = ids.len(), "cannot void records answered 503 yet; retrying");
                },
            );
            if let Ok(too_late) = done.await {
                if too_late > 0 {
                    tracing::error!(
                        too_late,
                        "records answered 503 had moved on before they could be voided"
                    );
                    metrics::counter!("router_void_too_late_total").increment(too_late as u64);
                }
            }
        });
    }

    /// Queue what was stored: its `queued` event and its stream entry, one pipeline.
    async fn append(&self, entries: &[(&str, Vec<(&str, String)>)]) {
        if entries.is_empty() {
            return;
        }
        let now_ms = Utc::now().timestamp_millis();
        if self.redis_down_until.load(Ordering::Relaxed) > now_ms {
            metrics::counter!("router_queue_skipped_total").increment(1);
        } else if let Err(err) = self.queue.append(entries).await {
            tracing::warn!(error = %err, batch = entries.len() / 2,
                "stored but not yet queued; the outbox sweep will queue them");
            metrics::counter!("router_queue_failures_total").increment(1);
            self.redis_down_until
                .store(now_ms + 2000, Ordering::Relaxed);
        }
    }
}

/// A new record's answer, counted.
fn accepted(record: Communication) -> Result<Accepted, AcceptError> {
    metrics::counter!("communications_accepted_total", "channel" => record.channel.as_str())
        .increment(1);
    Ok(Accepted {
        record,
        replayed: false,
    })
}

/// What puts a record on its stream: its `queued` log event, then its entry on the shard
/// its id picks (the router's at acceptance, the SchedulerActor's when a scheduled one is
/// due).
pub fn queue_entries(
    rec: &Communication,
    service: &str,
    shards: StreamShards,
    now: chrono::DateTime<Utc>,
) -> [(&'static str, Vec<(&'static str, String)>); 2] {
    let event = LogEvent::for_record(rec, service, EventStatus::Queued, 0, now);
    [
        (LOG_STREAM, event.to_fields()),
        (shards.for_record(rec), rec.stream_fields()),
    ]
}

/// The stream entries of the stored records answered `queued`.
type Entries = Vec<(&'static str, Vec<(&'static str, String)>)>;

/// Per request, its answer (if its caller still waits: the ticket is committed first) and
/// its stream entries; and the stored records whose callers were already answered 503,
/// which must be voided.
fn settle(
    batch: Vec<Waiting>,
    results: Vec<Result<InsertResult, DependencyError>>,
    voided: &[bool],
    shards: StreamShards,
) -> (Vec<Answer>, Entries, Vec<String>) {
    let now = Utc::now();
    let mut answers = Vec::with_capacity(batch.len());
    let mut entries: Entries = Vec::with_capacity(batch.len() * 2);
    let mut late = Vec::new();
    for ((w, result), voided) in batch.into_iter().zip(results).zip(voided) {
        let rec = w.record;
        let answer = match result {
            Ok(InsertResult::Inserted) if !w.ticket.commit() => {
                if !voided {
                    late.push(rec.id);
                }
                continue;
            }
            Ok(InsertResult::Inserted) if rec.status == Status::Scheduled => {
                // On no stream until its time: the SchedulerActor queues it then.
                let event = LogEvent::for_record(&rec, "router", EventStatus::Scheduled, 0, now);
                entries.push((LOG_STREAM, event.to_fields()));
                accepted(rec)
            }
            Ok(InsertResult::Inserted) => {
                // The log event first: the `communications` index sees `queued` before any outcome.
                entries.extend(queue_entries(&rec, "router", shards, now));
                accepted(rec)
            }
            Ok(InsertResult::KeyTaken(original)) if original.request_hash == rec.request_hash => {
                metrics::counter!("idempotent_replays_total").increment(1);
                Ok(Accepted {
                    record: *original,
                    replayed: true,
                })
            }
            Ok(InsertResult::KeyTaken(_)) => Err(AcceptError::KeyConflict(
                rec.idempotency_key.clone().unwrap_or_default(),
            )),
            Ok(InsertResult::NotStored) => Err(AcceptError::Unavailable(DependencyError::new(
                crate::ports::Dependency::MongoDb,
                "the record was refused",
            ))),
            Err(e) => Err(e.into()),
        };
        if w.ticket.commit() {
            answers.push((w.reply, answer));
        }
    }
    (answers, entries, late)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, EventStatus};
    use crate::testing::{self, MemoryQueue, MemoryStore, QueueMethod, StoreMethod};

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
            shards: StreamShards::ONE,
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
            id: None,
            request: NewCommunication {
                channel: r.channel,
                from: r.from,
                to: r.to,
                msg: r.msg,
                subject: None,
            },
            tenant: "acme".into(),
            idempotency_key: key.map(str::to_string),
            batch_id: None,
            fallback: None,
            fallback_of: None,
            send_at: None,
            template: None,
            priority: Default::default(),
            html: None,
        }
    }

    async fn accept_all(
        router: &ActorRef<RouterMsg>,
        subs: Vec<Submission>,
    ) -> Vec<Result<Accepted, AcceptError>> {
        let calls = subs.into_iter().map(|submission| async move {
            let ask = |reply| {
                RouterMsg::Accept(Box::new(Pending {
                    submission,
                    reply,
                    ticket: Ticket::new(),
                    deadline: Instant::now() + Duration::from_secs(60),
                    slot: None,
                    traceparent: None,
                }))
            };
            match router.call(ask, None).await {
                Ok(ractor::rpc::CallResult::Success(a)) => a,
                _ => panic!("the router did not answer"),
            }
        });
        let answers = futures::future::join_all(calls).await;
        // The answers go out before the stream append: let the writer finish.
        tokio::time::sleep(Duration::from_millis(1)).await;
        answers
    }

    /// A router registered as `name` (so [`Admission`] finds it) whose store answers
    /// inserts after `insert_delay`.
    async fn named(name: &'static str, insert_delay: Duration, max_inflight: usize) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        store.script.delay(StoreMethod::InsertMany, insert_delay);
        let queue = MemoryQueue::new();
        let args = RouterArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            batch: BatchSettings::new(1, Duration::from_millis(1)),
            max_inflight,
            shards: StreamShards::ONE,
        };
        let (router, _) = Actor::spawn(Some(name.into()), RouterActor, args)
            .await
            .unwrap();
        Fixture {
            store,
            queue,
            router,
        }
    }

    async fn accept_via(
        admission: &Admission,
        name: &'static str,
        sub: Submission,
    ) -> Result<Accepted, CallError<AcceptError>> {
        let deadline = admission.deadline_from(Instant::now());
        let slot = admission
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| CallError::Refused(AcceptError::QueueFull))?;
        admission.ask(name, sub, slot, deadline).await
    }

    /// A bulk send's submissions go in one message and fill whole group commits; beyond
    /// what `max_pending` admits, none of them is taken.
    #[tokio::test]
    async fn a_bulk_send_fills_whole_group_commits_and_is_admitted_whole_or_not_at_all() {
        let name = "router-test-bulk";
        let store = Arc::new(MemoryStore::new());
        let args = RouterArgs {
            store: store.clone(),
            queue: Arc::new(MemoryQueue::new()),
            batch: BatchSettings::new(100, Duration::from_millis(50)),
            max_inflight: 2,
            shards: StreamShards::ONE,
        };
        let (router, _) = Actor::spawn(Some(name.into()), RouterActor, args)
            .await
            .unwrap();
        let admission = Admission::new(300, Duration::from_secs(10));
        let deadline = admission.deadline_from(Instant::now());
        let subs: Vec<Submission> = (0..250).map(|n| submission(n, None)).collect();
        let answers = admission.ask_many(name, subs, deadline).await.unwrap();
        assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 250);
        let sizes = store.script.sizes(StoreMethod::InsertMany);
        assert_eq!(sizes, [100, 100, 50], "whole group commits");
        let too_many: Vec<Submission> = (0..301).map(|n| submission(n, None)).collect();
        let refused = admission.ask_many(name, too_many, deadline).await;
        assert!(
            matches!(refused, Err(AcceptError::QueueFull)),
            "{refused:?}"
        );
        assert_eq!(
            store.script.count(StoreMethod::InsertMany),
            3,
            "nothing of it was taken"
        );
        router.stop(None);
    }

    /// A store slower than the deadline: the caller gets `TimedOut` at the deadline; the
    /// insert lands later, and the record is voided and never queued.
    #[tokio::test(start_paused = true)]
    async fn an_insert_slower_than_the_deadline_is_answered_in_time_and_voided() {
        let name = "router-test-slow-insert";
        let f = named(name, Duration::from_secs(5), 2).await;
        let admission = Admission::new(8, Duration::from_secs(2));
        let started = Instant::now();
        let answer = accept_via(&admission, name, submission(1, None)).await;
        assert!(matches!(answer, Err(CallError::TimedOut(_))), "{answer:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(f.store.script.count(StoreMethod::InsertMany), 1);
        assert!(f.store.records().is_empty(), "voided once it landed");
        assert_eq!(f.store.voided().len(), 1);
        assert_eq!(f.queue.script().count(QueueMethod::Append), 0);
        f.router.stop(None);
    }

    /// The same when the void reaches the store after the late insert (MongoDB thawing):
    /// the stored record is voided, never queued.
    #[tokio::test(start_paused = true)]
    async fn a_void_that_lands_after_the_insert_still_voids_the_record() {
        let name = "router-test-late-void";
        let f = named(name, Duration::from_secs(3), 2).await;
        f.store
            .script
            .delay(StoreMethod::Void, Duration::from_secs(6));
        let admission = Admission::new(8, Duration::from_secs(2));
        let answer = accept_via(&admission, name, submission(1, None)).await;
        assert!(matches!(answer, Err(CallError::TimedOut(_))));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(f.store.records().len(), 1, "landed, the void not yet");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(f.store.records().is_empty());
        assert_eq!(f.queue.script().count(QueueMethod::Append), 0);
        f.router.stop(None);
    }

    /// While the store is frozen, at most `max_pending` requests wait; the next ones are
    /// refused at once, and a request that expired waiting is never written.
    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_and_expired_requests_are_not_written() {
        let name = "router-test-bounded";
        let f = named(name, Duration::from_secs(30), 1).await;
        let admission = Admission::new(3, Duration::from_secs(2));
        let waiting: Vec<_> = (1..=3)
            .map(|n| {
                let a = admission.clone();
                tokio::spawn(async move { accept_via(&a, name, submission(n, None)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let full = accept_via(&admission, name, submission(4, None)).await;
        assert!(matches!(
            full,
            Err(CallError::Refused(AcceptError::QueueFull))
        ));
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
        for w in waiting {
            assert!(matches!(w.await.unwrap(), Err(CallError::TimedOut(_))));
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        // One batch reached the store (max_inflight 1); the two behind it expired unwritten.
        assert_eq!(f.store.script.sizes(StoreMethod::InsertMany), [1]);
        assert!(f.store.records().is_empty());
        assert_eq!(f.store.voided().len(), 1);
        assert_eq!(f.queue.script().count(QueueMethod::Append), 0);
        assert_eq!(
            admission.slots.available_permits(),
            3,
            "every place free again"
        );
        f.router.stop(None);
    }

    /// An insert that went through but whose answer was lost is read back by `_id`: the
    /// caller learns the truth (stored) and the record is queued.
    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_insert_that_landed_is_read_back_and_answered_stored() {
        let f = fixture(2).await;
        f.store.lose_next_insert_answer();
        let answers = accept_all(&f.router, vec![submission(1, None), submission(2, None)]).await;
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        assert_eq!(f.store.script.count(StoreMethod::Stored), 1);
        assert_eq!(f.store.records().len(), 2);
        assert_eq!(f.queue.entries(Channel::Sms.stream()).len(), 2);
        assert!(f.store.voided().is_empty());
    }

    /// An ambiguous insert that did not land: 503, and the ids are fenced so that a late
    /// landing stores nothing.
    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_insert_that_did_not_land_is_fenced_and_answered_503() {
        let f = fixture(1).await;
        f.store
            .script
            .fail_next(StoreMethod::InsertMany, 1, ErrorKind::Ambiguous);
        let answers = accept_all(&f.router, vec![submission(1, None)]).await;
        assert!(matches!(&answers[0], Err(AcceptError::Unavailable(_))));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(f.store.voided().len(), 1);
        assert!(f.store.records().is_empty());
        assert_eq!(f.queue.script().count(QueueMethod::Append), 0);
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
    async fn a_scheduled_submission_is_stored_and_logged_but_on_no_stream() {
        let f = fixture(2).await;
        let at = Utc::now() + chrono::Duration::hours(1);
        let later = Submission {
            send_at: Some(at),
            ..submission(1, None)
        };
        let answers = accept_all(&f.router, vec![later, submission(2, None)]).await;
        let scheduled = &answers[0].as_ref().unwrap().record;
        assert_eq!(
            (scheduled.status, scheduled.send_at),
            (Status::Scheduled, Some(at))
        );
        let events: Vec<_> = f
            .queue
            .entries(LOG_STREAM)
            .iter()
            .map(|e| LogEvent::from_entry(e).unwrap())
            .map(|e| (e.communication_id, e.status))
            .collect();
        let now = answers[1].as_ref().unwrap().record.id.clone();
        assert_eq!(
            events,
            [
                (scheduled.id.clone(), EventStatus::Scheduled),
                (now.clone(), EventStatus::Queued)
            ]
        );
        let on_stream = f.queue.entries(Channel::Sms.stream());
        assert_eq!(on_stream.len(), 1);
        assert_eq!(on_stream[0].field("_id"), Some(now.as_str()));
    }

    /// A scheduled record whose caller was answered 503 is voided like any other.
    #[tokio::test(start_paused = true)]
    async fn a_scheduled_insert_slower_than_the_deadline_is_voided() {
        let name = "router-test-slow-scheduled";
        let f = named(name, Duration::from_secs(3), 2).await;
        // The void comes after the insert has landed.
        f.store
            .script
            .delay(StoreMethod::Void, Duration::from_secs(6));
        let admission = Admission::new(8, Duration::from_secs(2));
        let later = Submission {
            send_at: Some(Utc::now() + chrono::Duration::hours(1)),
            ..submission(1, None)
        };
        let answer = accept_via(&admission, name, later).await;
        assert!(matches!(answer, Err(CallError::TimedOut(_))));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(f.store.records().len(), 1, "landed, the void not yet");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(f.store.records().is_empty());
        assert_eq!(f.store.voided().len(), 1);
        f.router.stop(None);
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
