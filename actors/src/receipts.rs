//! ReceiptActor: applies the providers' delivery receipts (Twilio status callbacks,
//! WhatsApp status webhooks) in batches.
//!
//! Owns: the receipts waiting for the next batch, and those waiting for their record (a
//! receipt can overtake the recording of its send: the provider answers the call, calls
//! back at once, and the sender's outcome write is still to come).
//! Talks to it: the HTTP callbacks, through [`apply`] (`Apply`, an RPC answered once the
//! receipt is applied, found inapplicable, or given up on after `wait_for_record`).
//! Talks to: the store (one batched write and one read per batch, however many receipts),
//! Redis (the receipts' log events, one pipeline per batch).
//! On failure: receipts in the batch being written are answered with the error (the
//! callback answers 503, and the provider sends it again); receipts still in the mailbox
//! are dropped unanswered, so their callbacks time out into a 503 as well. Nothing is
//! half-applied: a receipt is one conditional update of one record.

use crate::batch::BatchSettings;
use crate::domain::{EventStatus, LogEvent, LOG_STREAM};
use crate::ports::{DependencyError, Queue, ReceiptResult, ReceiptUpdate, Store};
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

/// `true`: applied; `false`: nothing it could move (logged).
pub type ReceiptReply = RpcReplyPort<Result<bool, DependencyError>>;

pub enum ReceiptMsg {
    Apply(Receipt, ReceiptReply),
    Flush,
}

/// Hand a receipt to the running ReceiptActor and wait up to `timeout` for its answer (it
/// holds a receipt that overtook its record for up to `wait_for_record`): `true` applied,
/// `false` nothing it could move.
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
    /// Most receipts applied in one round trip, and how long the first waits for company.
    pub batch: BatchSettings,
    /// How long a receipt waits for its record to be recorded as sent.
    pub wait_for_record: Duration,
    /// How often a waiting receipt is tried again.
    pub recheck: Duration,
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
}

pub struct ReceiptActor;

impl Actor for ReceiptActor {
    type Msg = ReceiptMsg;
    type State = ReceiptState;
    type Arguments = ReceiptArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ReceiptArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ReceiptState {
            batch: Vec::new(),
            waiting: Vec::new(),
            next_recheck: Instant::now(),
            flush_scheduled: false,
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
            ReceiptMsg::Apply(receipt, reply) => {
                let Ok(status) = EventStatus::try_from(receipt.update.status) else {
                    // `pending`/`sending`: no receipt may move a record there.
                    log_ignored(&receipt, &ReceiptResult::NotMovable);
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
                    flush(state).await;
                }
            }
            ReceiptMsg::Flush => {
                state.flush_scheduled = false;
                flush(state).await;
            }
        }
        if !state.flush_scheduled && (!state.batch.is_empty() || !state.waiting.is_empty()) {
            state.flush_scheduled = true;
            let after = if state.batch.is_empty() {
                state
                    .next_recheck
                    .saturating_duration_since(Instant::now())
                    .max(state.args.batch.max_wait)
            } else {
                state.args.batch.max_wait
            };
            myself.send_after(after, || ReceiptMsg::Flush);
        }
        Ok(())
    }
}

async fn flush(state: &mut ReceiptState) {
    let now = Instant::now();
    let mut work = std::mem::take(&mut state.batch);
    if now >= state.next_recheck {
        work.append(&mut state.waiting);
        state.next_recheck = now + state.args.recheck;
    }
    if work.is_empty() {
        return;
    }
    metrics::histogram!("receipt_batch_size").record(work.len() as f64);
    let updates: Vec<ReceiptUpdate> = work.iter().map(|w| w.receipt.update.clone()).collect();
    let results = match state.args.store.apply_receipts(&updates).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, receipts = work.len(), "receipts not recorded; the callbacks answer 503");
            for w in work {
                let _ = w.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let stamp = Utc::now();
    let mut events = Vec::new();
    let mut answers = Vec::new();
    for (w, result) in work.into_iter().zip(results) {
        let u = &w.receipt.update;
        match result {
            ReceiptResult::Applied(rec) => {
                let mut ev =
                    LogEvent::for_record(&rec, w.receipt.service, w.status, rec.attempts, stamp);
                ev.provider_message_id = Some(u.provider_message_id.clone());
                ev.error = u.error.as_ref().map(|(c, m)| format!("{c}: {m}"));
                events.push((LOG_STREAM, ev.to_fields()));
                metrics::counter!("delivery_receipts_total", "service" => w.receipt.service, "status" => u.status.as_str())
                    .increment(1);
                answers.push((w.reply, true));
            }
            ReceiptResult::Unknown if now < w.give_up_at => state.waiting.push(w),
            other => {
                log_ignored(&w.receipt, &other);
                answers.push((w.reply, false));
            }
        }
    }
    if !events.is_empty() {
        if let Err(e) = state.args.queue.append(&events).await {
            tracing::warn!(error = %e, "receipts recorded but their log events were not queued");
        }
    }
    for (reply, applied) in answers {
        let _ = reply.send(Ok(applied));
    }
}

fn log_ignored(r: &Receipt, why: &ReceiptResult) {
    tracing::info!(
        service = r.service,
        provider_message_id = r.update.provider_message_id,
        status = r.update.status.as_str(),
        ?why,
        "receipt ignored: no record it can move"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Status};
    use crate::testing::{self, MemoryQueue, MemoryStore, StoreMethod};

    struct Fixture {
        store: Arc<MemoryStore>,
        queue: MemoryQueue,
        actor: ActorRef<ReceiptMsg>,
    }

    /// Batches of up to 10 receipts after 20 ms; a receipt waits 1 s for its record,
    /// looked for again every 100 ms.
    async fn fixture() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let queue = MemoryQueue::new();
        let args = ReceiptArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            batch: BatchSettings::new(10, Duration::from_millis(20)),
            wait_for_record: Duration::from_secs(1),
            recheck: Duration::from_millis(100),
        };
        let (actor, _) = Actor::spawn(None, ReceiptActor, args).await.unwrap();
        Fixture {
            store,
            queue,
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

    #[tokio::test(start_paused = true)]
    async fn a_receipt_for_no_record_is_given_up_after_wait_for_record() {
        let f = fixture().await;
        let started = Instant::now();
        assert_eq!(f.apply(1, Status::Delivered).await, Ok(false));
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(f.queue.entries(LOG_STREAM).is_empty());
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
