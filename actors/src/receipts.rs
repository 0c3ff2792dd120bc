//! ReceiptActor: applies the providers' delivery receipts (Twilio status callbacks,
//! WhatsApp status webhooks) in batches.
//!
//! Owns: the receipts waiting for the next batch, and those waiting for their record (a
//! receipt can overtake the recording of its send: the provider answers the call, calls
//! back at once, and the sender's outcome write is still to come).
//! Talks to it: the HTTP callbacks (`Apply`, an RPC answered once the receipt is applied,
//! found inapplicable, or given up on after `wait_for_record`).
//! Talks to: the store (one batched write and one read per batch, however many receipts),
//! Redis (the receipts' log events, one pipeline per batch).
//! On failure: receipts in the batch being written are answered with the error (the
//! callback answers 503, and the provider sends it again); receipts still in the mailbox
//! are dropped unanswered, so their callbacks time out into a 503 as well. Nothing is
//! half-applied: a receipt is one conditional update of one record.

use crate::batch::BatchSettings;
use crate::domain::{LogEvent, Status, LOG_STREAM};
use crate::ports::{DependencyError, Queue, ReceiptResult, ReceiptUpdate, Store};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
                state.batch.push(Waiting {
                    receipt,
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
                let mut ev = LogEvent::for_record(
                    &rec,
                    w.receipt.service,
                    u.status.as_str(),
                    rec.attempts,
                    stamp,
                );
                ev.provider_message_id = Some(u.provider_message_id.clone());
                ev.error = u.error.as_ref().map(|(c, m)| format!("{c}: {m}"));
                events.push((LOG_STREAM, ev.to_fields()));
                metrics::counter!("delivery_receipts_total", "service" => w.receipt.service, "status" => u.status.as_str())
                    .increment(1);
                answers.push((w.reply, true));
            }
            ReceiptResult::Unknown if now < w.give_up_at => state.waiting.push(w),
            other => {
                log_ignored(w.receipt.service, &u.provider_message_id, u.status, &other);
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

fn log_ignored(service: &str, pmid: &str, status: Status, why: &ReceiptResult) {
    tracing::info!(
        service,
        provider_message_id = pmid,
        status = status.as_str(),
        ?why,
        "receipt ignored: no record it can move"
    );
}
