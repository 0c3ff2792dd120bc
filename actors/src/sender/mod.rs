//! SenderActor (one per channel): claims records, calls the provider, records outcomes.
//!
//! Owns: the channel's provider client and retry policy.
//! Talks to it: the channel's StreamConsumer (`Deliver`, an RPC answered with the stream
//! entry ids that may be acknowledged).
//! Talks to: the store (claim before the call: a lease in Redis and one MongoDB read;
//! outcome after it: one MongoDB write; one round trip per batch each), the provider,
//! Redis (`log_stream` events).
//! On failure (a panic, a dependency error): the consumer gets no answer and acknowledges
//! nothing, so every entry of the batch stays pending in the consumer group. The dead
//! batch's leases expire after `stale_after`; then those records are claimed again (the
//! consumer hands autoclaimed entries over one at a time, which isolates a message that
//! crashes its sender) and sent, marked `possibleDuplicate` on the record and counted in
//! `possible_duplicate_sends_total`, since the provider call may have been made.

mod decision;
mod stages;

pub use decision::{decide, CallResult, Decision, DecisionContext};
pub use stages::{Call, Claims, Decided, EntryRef, Partition, ToSend};

use crate::domain::StreamEntry;
use crate::health::ProviderHealth;
use crate::ports::{Provider, Queue, Store};
use crate::retry::RetryPolicy;
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::SeedableRng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub fn name(channel: crate::domain::Channel) -> String {
    format!("sender-{channel}")
}

/// What the consumer may do with the entries it handed over.
#[derive(Debug, Default)]
pub struct DeliverReport {
    /// Handled for good (outcome recorded, retry scheduled, or nothing to do).
    pub ack: Vec<String>,
    /// A dependency failed before anything was sent: offer these again soon.
    pub retry: Vec<String>,
}

pub enum SenderMsg {
    Deliver(Vec<StreamEntry>, RpcReplyPort<DeliverReport>),
}

#[derive(Clone)]
pub struct SenderArgs {
    pub channel: crate::domain::Channel,
    pub provider: Arc<dyn Provider>,
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// This process's consumer name; claims are `{owner}:{n}`.
    pub owner: String,
    pub stale_after: Duration,
    pub provider_timeout: Duration,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// How long to keep trying to record outcomes before leaving the entries pending.
    pub record_patience: Duration,
    /// Honour the fault-injection markers (tests only).
    pub faults: bool,
    /// The provider's circuit breaker and rate limit, shared with the consumer.
    pub health: Arc<ProviderHealth>,
}

pub struct SenderState {
    args: SenderArgs,
    batches: AtomicU64,
}

pub struct SenderActor;

impl Actor for SenderActor {
    type Msg = SenderMsg;
    type State = SenderState;
    type Arguments = SenderArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SenderArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SenderState {
            args,
            batches: AtomicU64::new(0),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SenderMsg::Deliver(entries, reply) => {
                let seq = state.batches.fetch_add(1, Ordering::Relaxed);
                let owner = format!("{}:{}:{}", state.args.owner, state.args.channel, seq);
                let Delivery { report, panicked } = deliver(&state.args, &owner, entries).await;
                let _ = reply.send(report);
                if panicked {
                    // Outcomes are recorded (the panicking sends as retries); now let the
                    // supervisor give this actor a fresh start.
                    return Err("a provider call panicked; restarting the sender".into());
                }
            }
        }
        Ok(())
    }
}

/// What one `Deliver` came to.
#[derive(Debug, Default)]
pub struct Delivery {
    pub report: DeliverReport,
    /// A provider call panicked (its outcome is recorded as a retry).
    pub panicked: bool,
}

/// Fault injection for the fault suite, off unless `faults.enabled`: a message whose body
/// holds `#panic-always#` crashes the sender before any provider call of its batch, every
/// time (a poison message); `#panic-once#` does so on its first attempt only.
fn injected_crash(args: &SenderArgs, to_send: &[ToSend]) {
    if !args.faults {
        return;
    }
    for t in to_send {
        let rec = &t.claimed.record;
        if rec.msg.contains("#panic-always#")
            || (rec.msg.contains("#panic-once#") && rec.attempts == 1)
        {
            panic!("injected fault: sender crash on {}", rec.id);
        }
    }
}

/// One batch through every stage. `owner` names this batch's claims.
pub async fn deliver(args: &SenderArgs, owner: &str, entries: Vec<StreamEntry>) -> Delivery {
    let mut out = Delivery::default();
    let Partition { valid, malformed } = stages::partition(args.channel, &entries);
    out.report.ack.extend(malformed);
    if valid.is_empty() {
        return out;
    }
    let claims = match stages::claim(args, owner, valid).await {
        Ok(c) => c,
        Err(offer_again) => {
            out.report.retry = offer_again;
            return out;
        }
    };
    out.report.ack.extend(claims.skipped);
    if claims.to_send.is_empty() {
        return out;
    }
    injected_crash(args, &claims.to_send);
    let calls = stages::call_provider(args, claims.to_send).await;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let decided = stages::decide_all(args, calls, Utc::now(), &mut rng);
    out.panicked = decided.panicked;
    if stages::persist(args, owner, &decided.outcomes).await {
        stages::append_log(args, &decided.events).await;
        out.report.ack.extend(decided.acks);
    }
    out
}
