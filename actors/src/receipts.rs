//! ReceiptActor: applies the providers' delivery receipts (Twilio status callbacks,
//! WhatsApp status webhooks) in batches.
//!
//! Owns: the receipts waiting for the next batch, and those waiting for their record (a
//! receipt can overtake the recording of its send: the provider answers the call, calls
//! back at once, and the sender's outcome write is still to come). A receipt whose record
//! is still unknown after `wait_for_record` is parked in the store ([`ReceiptParking`],
//! MongoDB's `parked_receipts`) before its callback is answered, and tried again from there
//! (waits doubling from `parked_recheck` to `parked_recheck_max`) until its record catches
//! up, however long that takes and across restarts; counted in `receipts_parked_total`,
//! with the gauge `receipts_parked`.
//! Talks to it: the HTTP callbacks, through [`apply`] (`Apply`, an RPC answered once the
//! receipt is applied, found inapplicable, or parked); the shutdown (`Drain`: apply the
//! batch now and park every receipt still waiting).
//! Talks to: the store (one batched write and one read per batch, however many receipts,
//! parked ones included), the parking (one write per batch that parks, one read and one
//! write per look at the parked ones), Redis (the receipts' log events, one pipeline per
//! batch).
//! On failure: receipts in the batch being written are answered with the error (the
//! callback answers 503, and the provider sends it again); receipts still in the mailbox
//! are dropped unanswered, so their callbacks time out into a 503 as well. A stop (not a
//! crash) applies the batch and parks what waits. Parked receipts are in the store: a
//! failure loses none. Nothing is half-applied: a receipt is one conditional update of one
//! record, and a parked one is forgotten only after it was applied or found to move nothing.

use crate::batch::BatchSettings;
use crate::domain::{EventStatus, LogEvent, LOG_STREAM};
use crate::ports::{
    DependencyError, ParkedReceipt, Queue, ReceiptParking, ReceiptResult, ReceiptUpdate, Store,
};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub const NAME: &str = "receipts";

/// One receipt from a provider.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub update: ReceiptUpdate,
    /// Who reported it (`twilio-callback`, `whatsapp-webhook`), for the log event.
    pub service: &'static str,
}

/// `true`: applied; `false`: nothing it could move now (logged), or parked until its
/// record is known.
pub type ReceiptReply = RpcReplyPort<Result<bool, DependencyError>>;

pub enum ReceiptMsg {
    Apply(Receipt, ReceiptReply),
    Flush,
    /// Shutting down: apply the batch now and park every receipt still waiting, so their
    /// callbacks are answered before the HTTP server closes.
    Drain(RpcReplyPort<()>),
}

/// Hand a receipt to the running ReceiptActor and wait up to `timeout` for its answer (it
/// holds a receipt that overtook its record for up to `wait_for_record`, then parks it):
/// `true` applied, `false` nothing it could move now, or parked.
pub async fn apply(
    receipt: Receipt,
    timeout: Duration,
) -> Result<bool, crate::call::CallError<DependencyError>> {
    crate::call::call_registered(NAME, |reply| ReceiptMsg::Apply(receipt, reply), timeout).await
}

#[derive(Clone)]
pub struct ReceiptArgs {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// Where receipts wait for records that take long to appear.
    pub parking: Arc<dyn ReceiptParking>,
    /// Most receipts applied in one round trip, and how long the first waits for company.
    pub batch: BatchSettings,
    /// How long a receipt waits in memory for its record before it is parked.
    pub wait_for_record: Duration,
    /// How often a waiting receipt is tried again.
    pub recheck: Duration,
    /// The first wait of a parked receipt before it is tried again; doubles with each try...
    pub parked_recheck: Duration,
    /// ...up to this.
    pub parked_recheck_max: Duration,
}

struct Waiting {
    receipt: Receipt,
    /// The receipt's status as its log event reports it.
    status: EventStatus,
    reply: ReceiptReply,
    give_up_at: Instant,
}

pub struct ReceiptState {
    args: ReceiptArgs,
    batch: Vec<Waiting>,
    /// Unknown so far; tried again with a later batch.
    waiting: Vec<Waiting>,
    next_recheck: Instant,
    flush_scheduled: bool,
    /// Receipts may be parked (true at start: a previous run may have parked some).
    parked_maybe: bool,
    next_parked_look: Instant,
    /// When the parked receipts are next counted (the gauge, and whether any are left)
    /// while more than [`PARKED_COUNT_CHEAP`] are parked: a count reads every one of them.
    next_parked_count: Instant,
    /// How many the last count found.
    last_parked_count: u64,
    /// The wall clock at start and the monotonic clock then: parked receipts' times are
    /// wall-clock times (they outlive the process), read off the monotonic clock so that
    /// they follow tokio's (paused) time in tests.
    started: (chrono::DateTime<Utc>, Instant),
}

impl ReceiptState {
    fn wall_now(&self) -> chrono::DateTime<Utc> {
        let (wall, at) = self.started;
        wall + chrono::Duration::from_std(at.elapsed()).unwrap_or_default()
    }
}

pub struct ReceiptActor;

impl Actor for ReceiptActor {
    type Msg = ReceiptMsg;
    type State = ReceiptState;
    type Arguments = ReceiptArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ReceiptArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Look at what a previous run parked.
        myself.send_message(ReceiptMsg::Flush)?;
        Ok(ReceiptState {
            batch: Vec::new(),
            waiting: Vec::new(),
            next_recheck: Instant::now(),
            flush_scheduled: false,
            parked_maybe: true,
            next_parked_look: Instant::now(),
            next_parked_count: Instant::now(),
            last_parked_count: 0,
            started: (Utc::now(), Instant::now()),
            args,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        flush(state, true).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReceiptMsg::Apply(receipt, reply) => {
                let Ok(status) = EventStatus::try_from(receipt.update.status) else {
                    // `pending`/`sending`: no receipt may move a record there.
                    log_ignored(&receipt.update, receipt.service, &ReceiptResult::NotMovable);
                    let _ = reply.send(Ok(false));
                    return Ok(());
                };
                state.batch.push(Waiting {
                    receipt,
                    status,
                    reply,
                    give_up_at: Instant::now() + state.args.wait_for_record,
                });
                if state.args.batch.is_full(state.batch.len(), 0) {
                    flush(state, false).await;
                }
            }
            ReceiptMsg::Flush => {
                state.flush_scheduled = false;
                flush(state, false).await;
            }
            ReceiptMsg::Drain(reply) => {
                flush(state, true).await;
                let _ = reply.send(());
            }
        }
        schedule(&myself, state);
        Ok(())
    }
}

/// The next `Flush`: soon for a batch, at the next recheck for waiting receipts, at the next
/// look for parked ones.
fn schedule(myself: &ActorRef<ReceiptMsg>, state: &mut ReceiptState) {
    if state.flush_scheduled {
        return;
    }
    let now = Instant::now();
    let mut at: Option<Instant> = None;
    if !state.waiting.is_empty() {
        at = Some(state.next_recheck);
    }
    if state.parked_maybe {
        at = Some(at.map_or(state.next_parked_look, |t| t.min(state.next_parked_look)));
    }
    let after = match at {
        _ if !state.batch.is_empty() => state.args.batch.max_wait,
        Some(t) => t
            .saturating_duration_since(now)
            .max(state.args.batch.max_wait),
        None => return,
    };
    state.flush_scheduled = true;
    myself.send_after(after, || ReceiptMsg::Flush);
}

/// How often the parked receipts are counted once more than [`PARKED_COUNT_CHEAP`] are
/// parked. Until 2026-11-29 every look (each `parked_recheck`, 1 s) counted them however
/// many there were, and SecantusDB counts by reading each one: 162 ms a look with 20,000
/// parked (receipts whose records never come stay parked for good).
const PARKED_COUNT_EVERY: Duration = Duration::from_secs(60);
/// Up to this many parked, a count costs SecantusDB under 10 ms: every look counts.
const PARKED_COUNT_CHEAP: u64 = 1000;

/// The parked receipts due for another try, if it is time to look.
async fn due_parked(state: &mut ReceiptState, now: Instant) -> Vec<ParkedReceipt> {
    if !state.parked_maybe || now < state.next_parked_look {
        return Vec::new();
    }
    state.next_parked_look = now + state.args.parked_recheck;
    let count = state.last_parked_count <= PARKED_COUNT_CHEAP || now >= state.next_parked_count;
    match state
        .args
        .parking
        .due(state.wall_now(), state.args.batch.max_items, count)
        .await
    {
        Ok((due, total)) => {
            if let Some(total) = total {
                state.next_parked_count = now + PARKED_COUNT_EVERY;
                state.last_parked_count = total;
                metrics::gauge!("receipts_parked").set(total as f64);
                state.parked_maybe = total > 0;
            }
            due
        }
        Err(e) => {
            tracing::warn!(error = %e, "parked receipts not read; looking again later");
            Vec::new()
        }
    }
}

/// What a batch came to, before anything is answered.
#[derive(Default)]
struct Settled {
    events: Vec<LogEvent>,
    answers: Vec<(ReceiptReply, Result<bool, DependencyError>)>,
    /// Live receipts whose record is still unknown after their wait: parked, then answered.
    to_park: Vec<Waiting>,
    /// Parked receipts to forget, and to try again later.
    done: Vec<String>,
    later: Vec<(String, chrono::DateTime<Utc>)>,
}

/// Apply the batch (with the waiting receipts when they are due, and the parked ones when
/// they are), park what waited long enough (`draining`: everything still waiting), record
/// the log events, then answer.
async fn flush(state: &mut ReceiptState, draining: bool) {
    let now = Instant::now();
    let mut work = std::mem::take(&mut state.batch);
    if draining || now >= state.next_recheck {
        work.append(&mut state.waiting);
        state.next_recheck = now + state.args.recheck;
    }
    let parked = if draining {
        Vec::new()
    } else {
        due_parked(state, now).await
    };
    if work.is_empty() && parked.is_empty() {
        return;
    }
    metrics::histogram!("receipt_batch_records").record((work.len() + parked.len()) as f64);
    let updates: Vec<ReceiptUpdate> = work
        .iter()
        .map(|w| w.receipt.update.clone())
        .chain(parked.iter().map(|p| p.update.clone()))
        .collect();
    let mut results = match state.args.store.apply_receipts(&updates).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, receipts = work.len(), "receipts not recorded; the callbacks answer 503");
            for w in work {
                let _ = w.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let parked_results = results.split_off(work.len().min(results.len()));
    let mut out = Settled::default();
    for (w, result) in work.into_iter().zip(results) {
        settle_live(w, result, now, draining, &mut out, &mut state.waiting);
    }
    let wall = state.wall_now();
    settle_parked(&state.args, wall, parked, parked_results, &mut out);
    park(state, &mut out).await;
    if !out.done.is_empty() || !out.later.is_empty() {
        if let Err(e) = state.args.parking.settle(&out.done, &out.later).await {
            // Applied ones are tried again and move nothing then: forgotten next time.
            tracing::warn!(error = %e, "parked receipts not settled; tried again later");
        }
    }
    record_events(&state.args, &out.events).await;
    for (reply, answer) in out.answers {
        let _ = reply.send(answer);
    }
}

/// One live receipt's result: applied (its event and answer), still unknown (waits on, or
/// is parked once its wait is over or the actor is draining), or nothing to move.
fn settle_live(
    w: Waiting,
    result: ReceiptResult,
    now: Instant,
    draining: bool,
    out: &mut Settled,
    waiting: &mut Vec<Waiting>,
) {
    match result {
        ReceiptResult::Applied(rec) => {
            trace_receipt(&rec, &w.receipt.update, w.receipt.service);
            out.events.push(receipt_event(
                &rec,
                &w.receipt.update,
                w.receipt.service,
                w.status,
            ));
            out.answers.push((w.reply, Ok(true)));
        }
        ReceiptResult::Unknown if draining || now >= w.give_up_at => out.to_park.push(w),
        ReceiptResult::Unknown => waiting.push(w),
        other => {
            log_ignored(&w.receipt.update, w.receipt.service, &other);
            out.answers.push((w.reply, Ok(false)));
        }
    }
}

/// The parked receipts' results: applied or not movable are done with; unknown ones wait
/// longer, doubling with each try.
fn settle_parked(
    args: &ReceiptArgs,
    now: chrono::DateTime<Utc>,
    parked: Vec<ParkedReceipt>,
    results: Vec<ReceiptResult>,
    out: &mut Settled,
) {
    for (p, result) in parked.into_iter().zip(results) {
        match result {
            ReceiptResult::Applied(rec) => {
                trace_receipt(&rec, &p.update, &p.service);
                if let Ok(status) = EventStatus::try_from(p.update.status) {
                    out.events
                        .push(receipt_event(&rec, &p.update, &p.service, status));
                }
                tracing::info!(provider_message_id = %p.update.provider_message_id, tries = p.tries, "parked receipt applied");
                out.done.push(p.key());
            }
            ReceiptResult::Unknown => {
                let wait = parked_wait(args, p.tries + 1);
                let at = now + chrono::Duration::from_std(wait).unwrap_or_default();
                out.later.push((p.key(), at));
            }
            other => {
                log_ignored(&p.update, &p.service, &other);
                out.done.push(p.key());
            }
        }
    }
}

/// The wait before try `n` of a parked receipt: `parked_recheck` doubling, at most
/// `parked_recheck_max`.
pub fn parked_wait(args: &ReceiptArgs, n: u32) -> Duration {
    let doubled = args
        .parked_recheck
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)));
    doubled.min(args.parked_recheck_max)
}

/// Park the receipts whose wait is over, then answer their callbacks: parked (`false`),
/// or the store's error (503: the provider sends the receipt again).
async fn park(state: &mut ReceiptState, out: &mut Settled) {
    if out.to_park.is_empty() {
        return;
    }
    let parked: Vec<ParkedReceipt> = out
        .to_park
        .iter()
        .map(|w| ParkedReceipt {
            update: w.receipt.update.clone(),
            service: w.receipt.service.to_string(),
            tries: 0,
        })
        .collect();
    let next = state.wall_now()
        + chrono::Duration::from_std(state.args.parked_recheck).unwrap_or_default();
    let result = state.args.parking.park(&parked, next).await;
    match &result {
        Ok(()) => {
            tracing::info!(
                n = parked.len(),
                "receipts parked until their records are known"
            );
            metrics::counter!("receipts_parked_total").increment(parked.len() as u64);
            metrics::gauge!("receipts_parked").increment(parked.len() as f64);
            state.parked_maybe = true;
        }
        Err(e) => tracing::warn!(error = %e, "receipts not parked; the callbacks answer 503"),
    }
    for w in out.to_park.drain(..) {
        out.answers.push((w.reply, result.clone().map(|()| false)));
    }
}

/// A `receipt` span in the message's trace (the context stored on its record), ended at
/// once: it marks when the receipt was applied and what it said.
fn trace_receipt(rec: &crate::domain::Communication, u: &ReceiptUpdate, service: &str) {
    if rec.traceparent.is_none() {
        return;
    }
    let span = tracing::info_span!("receipt", communication_id = %rec.id,
        status = u.status.as_str(), service);
    crate::trace_context::adopt(&span, rec.traceparent.as_deref());
    drop(span.enter());
}

fn receipt_event(
    rec: &crate::domain::Communication,
    u: &ReceiptUpdate,
    service: &str,
    status: EventStatus,
) -> LogEvent {
    let mut ev = LogEvent::for_record(rec, service, status, rec.attempts, Utc::now());
    // The provider that sent it, so the search document keeps it after a receipt.
    ev.provider = rec.provider.clone();
    ev.provider_message_id = Some(u.provider_message_id.clone());
    ev.error = u.error.as_ref().map(|(c, m)| format!("{c}: {m}"));
    metrics::counter!("delivery_receipts_total", "service" => service.to_string(), "status" => u.status.as_str())
        .increment(1);
    ev
}

async fn record_events(args: &ReceiptArgs, events: &[LogEvent]) {
    if events.is_empty() {
        return;
    }
    let entries: Vec<(&str, Vec<(&str, String)>)> =
        events.iter().map(|e| (LOG_STREAM, e.to_fields())).collect();
    if let Err(e) = args.queue.append(&entries).await {
        tracing::warn!(error = %e, "receipts recorded but their log events were not queued");
    }
}

fn log_ignored(u: &ReceiptUpdate, service: &str, why: &ReceiptResult) {
    tracing::info!(
        service,
        provider_message_id = u.provider_message_id,
        status = u.status.as_str(),
        ?why,
        "receipt ignored: no record it can move"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Status};
    use crate::testing::{self, MemoryParking, MemoryQueue, MemoryStore, StoreMethod};

    struct Fixture {
        store: Arc<MemoryStore>,
        queue: MemoryQueue,
        parking: Arc<MemoryParking>,
        actor: ActorRef<ReceiptMsg>,
    }

    /// Batches of up to 10 receipts after 20 ms; a receipt waits 1 s for its record,
    /// looked for again every 100 ms, then is parked and tried every 2 s (doubling to 8 s).
    fn args(
        store: &Arc<MemoryStore>,
        queue: &MemoryQueue,
        parking: &Arc<MemoryParking>,
    ) -> ReceiptArgs {
        ReceiptArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            parking: parking.clone(),
            batch: BatchSettings::new(10, Duration::from_millis(20)),
            wait_for_record: Duration::from_secs(1),
            recheck: Duration::from_millis(100),
            parked_recheck: Duration::from_secs(2),
            parked_recheck_max: Duration::from_secs(8),
        }
    }

    async fn fixture() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let queue = MemoryQueue::new();
        let parking = Arc::new(MemoryParking::new());
        let (actor, _) = Actor::spawn(None, ReceiptActor, args(&store, &queue, &parking))
            .await
            .unwrap();
        Fixture {
            store,
            queue,
            parking,
            actor,
        }
    }

    impl Fixture {
        /// A `sent` record with provider message id `pm-{n}`.
        fn sent(&self, n: u32) {
            let mut r = testing::record(n, Channel::Sms);
            r.status = Status::Sent;
            r.provider_message_id = Some(format!("pm-{n}"));
            r.provider = Some("twilio".into());
            self.store.put(r);
        }

        async fn apply(&self, n: u32, status: Status) -> Result<bool, DependencyError> {
            let receipt = Receipt {
                update: ReceiptUpdate {
                    provider: "twilio".into(),
                    provider_message_id: format!("pm-{n}"),
                    status,
                    error: None,
                },
                service: "twilio-callback",
            };
            match self
                .actor
                .call(|r| ReceiptMsg::Apply(receipt, r), None)
                .await
            {
                Ok(ractor::rpc::CallResult::Success(a)) => a,
                _ => panic!("no answer"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn many_receipts_are_one_store_write() {
        let f = fixture().await;
        for n in 1..=4 {
            f.sent(n);
        }
        let answers =
            futures::future::join_all((1..=4).map(|n| f.apply(n, Status::Delivered))).await;
        assert!(answers.into_iter().all(|a| a == Ok(true)));
        assert_eq!(f.store.script.sizes(StoreMethod::ApplyReceipts), [4]);
        assert_eq!(f.queue.entries(LOG_STREAM).len(), 4);
        let rec = f
            .store
            .record(&testing::record(1, Channel::Sms).id)
            .unwrap();
        assert_eq!(rec.status, Status::Delivered);
    }

    #[tokio::test(start_paused = true)]
    async fn a_receipt_that_overtook_its_send_waits_for_the_record() {
        let f = fixture().await;
        let waiting = f.apply(1, Status::Delivered);
        let record_later = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            f.sent(1);
        };
        let (answer, ()) = tokio::join!(waiting, record_later);
        assert_eq!(answer, Ok(true));
        assert!(f.store.script.count(StoreMethod::ApplyReceipts) >= 2);
        let ev = LogEvent::from_entry(&f.queue.entries(LOG_STREAM)[0]).unwrap();
        assert_eq!(ev.status, EventStatus::Delivered);
        assert_eq!(
            ev.provider.as_deref(),
            Some("twilio"),
            "the sender's provider kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_receipt_moves_only_its_own_providers_record() {
        let f = fixture().await;
        f.sent(1);
        let id = testing::record(1, Channel::Sms).id;
        let mut rec = f.store.record(&id).unwrap();
        rec.provider = Some("smtp".into());
        f.store.put(rec);
        assert_eq!(f.apply(1, Status::Delivered).await, Ok(false));
        assert_eq!(f.store.record(&id).unwrap().status, Status::Sent);
        assert!(f.queue.entries(LOG_STREAM).is_empty());
    }

    /// The record of a parked receipt's message, `sent` by now, has its receipt applied.
    async fn applied_eventually(f: &Fixture, n: u32) {
        let id = testing::record(n, Channel::Sms).id;
        for _ in 0..200 {
            if f.store.record(&id).map(|r| r.status) == Some(Status::Delivered) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the parked receipt was never applied");
    }

    #[tokio::test(start_paused = true)]
    async fn a_receipt_whose_record_takes_long_is_parked_then_applied() {
        let f = fixture().await;
        let started = Instant::now();
        assert_eq!(f.apply(1, Status::Delivered).await, Ok(false));
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(f.parking.parked().len(), 1, "parked before the answer");
        // The record is recorded a minute later: the parked receipt is still applied.
        tokio::time::sleep(Duration::from_secs(60)).await;
        f.sent(1);
        applied_eventually(&f, 1).await;
        assert!(f.parking.parked().is_empty(), "forgotten once applied");
        let ev = LogEvent::from_entry(&f.queue.entries(LOG_STREAM)[0]).unwrap();
        assert_eq!(ev.status, EventStatus::Delivered);
        assert_eq!(ev.service, "twilio-callback");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_receipt_is_applied_by_the_next_actor() {
        let f = fixture().await;
        assert_eq!(f.apply(1, Status::Delivered).await, Ok(false));
        f.actor.stop(None);
        f.sent(1);
        let (next, _) = Actor::spawn(None, ReceiptActor, args(&f.store, &f.queue, &f.parking))
            .await
            .unwrap();
        let f = Fixture { actor: next, ..f };
        applied_eventually(&f, 1).await;
        assert!(f.parking.parked().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn draining_applies_the_batch_and_parks_what_waits() {
        let f = fixture().await;
        f.sent(2);
        let waiting = f.apply(1, Status::Delivered);
        let batched = f.apply(2, Status::Delivered);
        let drain = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            f.actor.call(ReceiptMsg::Drain, None).await.unwrap();
            Instant::now()
        };
        let started = Instant::now();
        let (w, b, drained) = tokio::join!(waiting, batched, drain);
        assert_eq!((w, b), (Ok(false), Ok(true)));
        assert!(
            drained - started < Duration::from_secs(1),
            "not held to wait_for_record"
        );
        assert_eq!(f.parking.parked().len(), 1);
    }

    /// 400 receipts, one every 10 ms, over a store that takes 200 ms a write and as long
    /// for the inserts of the accept path going on beside them: the sizes of the writes,
    /// with the adaptive limit (target 20 ms, floor 0.1) or without.
    async fn steady_receipts(limited: bool) -> Vec<usize> {
        use crate::adaptive::{LimiterSettings, StoreLimiter};
        use crate::limited_store::LimitedStore;
        let store = Arc::new(MemoryStore::new());
        for m in [StoreMethod::ApplyReceipts, StoreMethod::InsertMany] {
            store.script.delay(m, Duration::from_millis(200));
        }
        let mut accepts: Arc<dyn crate::ports::Store> = store.clone();
        let (queue, parking) = (MemoryQueue::new(), Arc::new(MemoryParking::new()));
        let mut a = args(&store, &queue, &parking);
        a.batch = BatchSettings::new(500, Duration::from_millis(20));
        if limited {
            let settings = LimiterSettings {
                target: Duration::from_millis(20),
                quiet: Duration::from_secs(1),
                min: 0.1,
                max: 1.0,
                increase: 0.1,
                decrease: 0.5,
                max_pause: Duration::from_secs(2),
            };
            let limiter = Arc::new(StoreLimiter::new("receipts", settings));
            a.store = Arc::new(LimitedStore::delivery(store.clone(), limiter.clone()));
            accepts = Arc::new(LimitedStore::accepts(store.clone(), vec![limiter]));
        }
        let inserting = testing::keep_inserting(accepts, Duration::from_millis(10));
        let (actor, _) = Actor::spawn(None, ReceiptActor, a).await.unwrap();
        let f = Fixture {
            store,
            queue,
            parking,
            actor,
        };
        (1..=400).for_each(|n| f.sent(n));
        let receipts = (1..=400u32).map(|n| {
            let f = &f;
            async move {
                tokio::time::sleep(Duration::from_millis(10) * n).await;
                f.apply(n, Status::Delivered).await
            }
        });
        let answers = futures::future::join_all(receipts).await;
        assert!(answers.into_iter().all(|a| a == Ok(true)), "all applied");
        inserting.abort();
        f.store.script.sizes(StoreMethod::ApplyReceipts)
    }

    /// While the accept path's inserts are slow, the adaptive limit paces the ReceiptActor's
    /// writes: the same receipts go in fewer, larger writes, and every one is applied.
    #[tokio::test(start_paused = true)]
    async fn slow_inserts_get_fewer_larger_receipt_writes() {
        let plain = steady_receipts(false).await;
        let limited = steady_receipts(true).await;
        assert!(
            limited.len() * 2 < plain.len(),
            "writes: {} limited, {} plain",
            limited.len(),
            plain.len()
        );
        let largest = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
        assert!(
            largest(&limited) > 2 * largest(&plain),
            "{limited:?} vs {plain:?}"
        );
    }

    #[test]
    fn a_parked_receipt_waits_longer_with_each_try() {
        let store = Arc::new(MemoryStore::new());
        let a = args(&store, &MemoryQueue::new(), &Arc::new(MemoryParking::new()));
        let waits: Vec<u64> = (1..=5).map(|n| parked_wait(&a, n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 8, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_failure_is_answered_and_a_backward_move_refused() {
        let f = fixture().await;
        f.sent(1);
        f.store.script.fail_next(
            StoreMethod::ApplyReceipts,
            1,
            crate::ports::ErrorKind::Unavailable,
        );
        assert!(f.apply(1, Status::Read).await.is_err());
        assert_eq!(f.apply(1, Status::Read).await, Ok(true));
        assert_eq!(
            f.apply(1, Status::Delivered).await,
            Ok(false),
            "read never goes back"
        );
    }
}
