//! RouterActor: turns validated requests into stored, queued communications.
//!
//! Owns: the batch of requests waiting for the next group commit.
//! Talks to it: the HTTP layer (`Accept`, an RPC answered once the record is stored).
//! Talks to: MongoDB (one `insert_many` per batch), Redis (one pipeline per batch: the
//! `queued` log event to `log_stream`, the entry to `{type}_stream`).
//! On failure: a batch already handed to its writer task finishes and answers its callers;
//! requests still in the mailbox are dropped unanswered, so their callers get 503 and
//! nothing was stored for them. A request is answered `queued` only after MongoDB has it;
//! if the stream append fails afterwards, the OutboxSweeper appends it after its grace time.

use crate::domain::{Communication, LogEvent, NewCommunication, LOG_STREAM};
use crate::ports::{DependencyError, Queue, Store};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub const NAME: &str = "router";

pub type AcceptReply = RpcReplyPort<Result<Communication, DependencyError>>;

pub enum RouterMsg {
    Accept(NewCommunication, AcceptReply),
    Flush,
}

#[derive(Clone)]
pub struct RouterArgs {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// Largest batch written in one round trip.
    pub batch_max: usize,
    /// How long the first request of a batch waits for company.
    pub linger: Duration,
    /// Batches being written at once; beyond it, new requests wait in the mailbox.
    pub max_inflight: usize,
}

pub struct RouterState {
    args: RouterArgs,
    batch: Vec<(Communication, AcceptReply)>,
    flush_scheduled: bool,
    inflight: Arc<Semaphore>,
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
            batch: Vec::with_capacity(args.batch_max),
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
            RouterMsg::Accept(req, reply) => {
                let id = bson::oid::ObjectId::new().to_hex();
                state
                    .batch
                    .push((Communication::new(id, req, Utc::now()), reply));
                if state.batch.len() >= state.args.batch_max {
                    flush(state).await;
                } else if !state.flush_scheduled {
                    state.flush_scheduled = true;
                    myself.send_after(state.args.linger, || RouterMsg::Flush);
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
    let batch = std::mem::replace(&mut state.batch, Vec::with_capacity(state.args.batch_max));
    let store = state.args.store.clone();
    let queue = state.args.queue.clone();
    tokio::spawn(async move {
        write_batch(store.as_ref(), queue.as_ref(), batch).await;
        drop(permit);
    });
}

/// Group commit: one insert, one pipeline, then every caller is answered.
pub async fn write_batch(
    store: &dyn Store,
    queue: &dyn Queue,
    batch: Vec<(Communication, AcceptReply)>,
) {
    let started = Instant::now();
    let records: Vec<Communication> = batch.iter().map(|(r, _)| r.clone()).collect();
    metrics::histogram!("router_batch_size").record(records.len() as f64);
    if let Err(err) = store.insert_many(&records).await {
        tracing::warn!(error = %err, batch = records.len(), "store refused a batch; answering 503");
        metrics::counter!("router_store_failures_total").increment(1);
        for (_, reply) in batch {
            let _ = reply.send(Err(err.clone()));
        }
        return;
    }
    let now = Utc::now();
    let events: Vec<Vec<(&str, String)>> = records
        .iter()
        .map(|r| LogEvent::for_record(r, "router", "queued", 0, now).to_fields())
        .collect();
    let mut entries: Vec<(&str, Vec<(&str, String)>)> = Vec::with_capacity(records.len() * 2);
    for (rec, ev) in records.iter().zip(events) {
        // The log event first: the `communications` index sees `queued` before any outcome.
        entries.push((LOG_STREAM, ev));
        entries.push((rec.channel.stream(), rec.stream_fields()));
    }
    if let Err(err) = queue.append(&entries).await {
        tracing::warn!(error = %err, batch = records.len(),
            "stored but not yet queued; the outbox sweep will queue them");
        metrics::counter!("router_queue_failures_total").increment(1);
    }
    for (rec, reply) in batch {
        metrics::counter!("communications_accepted_total", "channel" => rec.channel.as_str())
            .increment(1);
        let _ = reply.send(Ok(rec));
    }
    metrics::histogram!("router_batch_seconds").record(started.elapsed().as_secs_f64());
}
