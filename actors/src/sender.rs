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

use crate::domain::{
    AttemptError, ClaimResult, Claimed, ErrorClass, LogEvent, OutboundMessage, Outcome,
    ProviderError, StreamEntry, LOG_STREAM,
};
use crate::health::ProviderHealth;
use crate::ports::{Provider, Queue, Store};
use crate::retry::RetryPolicy;
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::SeedableRng;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

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
                let (report, panicked) = deliver(&state.args, &owner, entries).await;
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

/// One provider call: the stream entry, the claim, what the provider said, how long it took.
type CallResult = (
    String,
    Claimed,
    Result<Option<String>, ProviderError>,
    Duration,
    bool,
);

fn is_object_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Fault injection for the fault suite, off unless `faults.enabled`: a message whose body
/// holds `#panic-always#` crashes the sender before any provider call of its batch, every
/// time (a poison message); `#panic-once#` does so on its first attempt only.
fn injected_crash(args: &SenderArgs, claims: &[(String, Claimed)]) {
    if !args.faults {
        return;
    }
    for (_, c) in claims {
        let body = &c.record.msg;
        if body.contains("#panic-always#")
            || (body.contains("#panic-once#") && c.record.attempts == 1)
        {
            panic!("injected fault: sender crash on {}", c.record.id);
        }
    }
}

async fn deliver(
    args: &SenderArgs,
    owner: &str,
    entries: Vec<StreamEntry>,
) -> (DeliverReport, bool) {
    let channel = args.channel.as_str();
    let mut report = DeliverReport::default();
    let mut ids = Vec::with_capacity(entries.len());
    let mut entry_of = Vec::with_capacity(entries.len());
    for e in &entries {
        match e.field("_id") {
            Some(id) if is_object_id(id) => {
                ids.push(id.to_string());
                entry_of.push(e.id.clone());
            }
            _ => {
                tracing::error!(entry = %e.id, channel, "stream entry without a valid _id; acknowledged and dropped");
                metrics::counter!("stream_malformed_entries_total", "channel" => channel)
                    .increment(1);
                report.ack.push(e.id.clone());
            }
        }
    }
    if ids.is_empty() {
        return (report, false);
    }
    let claims = match args.store.claim(&ids, owner, args.stale_after).await {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(error = %err, channel, "cannot claim; will offer again");
            report.retry = entry_of;
            return (report, false);
        }
    };
    let mut to_send: Vec<(String, Claimed)> = Vec::new();
    for ((entry_id, id), claim) in entry_of.into_iter().zip(&ids).zip(claims) {
        match claim {
            ClaimResult::Claimed(c) => to_send.push((entry_id, *c)),
            ClaimResult::Skip(why) => {
                tracing::debug!(id = %id, why, "nothing to send");
                report.ack.push(entry_id);
            }
            ClaimResult::Busy => {}
        }
    }
    if to_send.is_empty() {
        return (report, false);
    }
    injected_crash(args, &to_send);
    let provider = args.provider.clone();
    let timeout = args.provider_timeout;
    let results: Vec<CallResult> =
        futures::stream::iter(to_send.into_iter().map(|(entry_id, claimed)| {
            let provider = provider.clone();
            let health = args.health.clone();
            let span = tracing::info_span!("communication", id = %claimed.record.id, channel);
            async move {
                health.acquire().await;
                let msg = OutboundMessage {
                    communication_id: claimed.record.id.clone(),
                    from: claimed.record.from.clone(),
                    to: claimed.record.to.clone(),
                    subject: claimed.record.subject.clone(),
                    body: claimed.record.msg.clone(),
                };
                let started = Instant::now();
                let call = AssertUnwindSafe(tokio::time::timeout(timeout, provider.send(&msg)));
                let (res, panicked) = match call.catch_unwind().await {
                    Ok(Ok(Ok(receipt))) => (Ok(receipt.provider_message_id), false),
                    Ok(Ok(Err(e))) => (Err(e), false),
                    Ok(Err(_)) => (
                        Err(ProviderError {
                            class: ErrorClass::Retryable { retry_after: None },
                            rate_limited: false,
                            code: Some("timeout".into()),
                            message: format!(
                                "no answer from {} within {:?}",
                                provider.name(),
                                timeout
                            ),
                        }),
                        false,
                    ),
                    Err(_) => (
                        Err(ProviderError {
                            class: ErrorClass::Retryable { retry_after: None },
                            rate_limited: false,
                            code: Some("internal".into()),
                            message: "internal error: the provider call panicked".into(),
                        }),
                        true,
                    ),
                };
                match &res {
                    Ok(_) => health.record(true),
                    Err(e) if e.rate_limited => {
                        let wait = match e.class {
                            ErrorClass::Retryable {
                                retry_after: Some(d),
                            } => d,
                            _ => Duration::from_secs(1),
                        };
                        health.pause_for(wait);
                    }
                    Err(e) => health.record(e.class == ErrorClass::Permanent),
                }
                (entry_id, claimed, res, started.elapsed(), panicked)
            }
            .instrument(span)
        }))
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;

    let now = Utc::now();
    let pname = args.provider.name().to_string();
    let mut outcomes = Vec::with_capacity(results.len());
    let mut events = Vec::with_capacity(results.len());
    let mut acks = Vec::with_capacity(results.len());
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut any_panic = false;
    for (entry_id, claimed, res, took, panicked) in results {
        any_panic |= panicked;
        let rec = &claimed.record;
        let attempt = rec.attempts;
        metrics::histogram!("provider_call_seconds", "provider" => pname.clone())
            .record(took.as_secs_f64());
        if claimed.possible_duplicate {
            metrics::counter!("possible_duplicate_sends_total", "channel" => channel).increment(1);
            tracing::warn!(id = %rec.id, "resending a message whose earlier provider call may have gone through");
        }
        let (outcome, mut ev) = match res {
            Ok(pmid) => {
                let mut ev = LogEvent::for_record(rec, channel, "sent", attempt, now);
                ev.provider = Some(pname.clone());
                ev.provider_message_id = pmid.clone();
                let latency = (now - rec.created_at).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::histogram!("accept_to_sent_seconds", "channel" => channel).record(latency);
                (
                    Outcome::Sent {
                        provider: pname.clone(),
                        provider_message_id: pmid,
                        possible_duplicate: claimed.possible_duplicate,
                    },
                    ev,
                )
            }
            Err(err) => {
                let error = AttemptError {
                    attempt,
                    at: now,
                    code: err.code.clone(),
                    message: err.message.clone(),
                };
                let text = match &err.code {
                    Some(c) => format!("{} (code {c}): {}", pname, err.message),
                    None => format!("{}: {}", pname, err.message),
                };
                match err.class {
                    ErrorClass::Retryable { retry_after } if attempt < args.retry.max_attempts => {
                        let delay = args.retry.delay(attempt, retry_after, &mut rng);
                        let not_before = now
                            + chrono::Duration::from_std(delay)
                                .unwrap_or_else(|_| chrono::Duration::seconds(60));
                        let mut ev = LogEvent::for_record(rec, channel, "retrying", attempt, now);
                        ev.error = Some(text);
                        (
                            Outcome::Retry {
                                provider: pname.clone(),
                                error,
                                not_before,
                            },
                            ev,
                        )
                    }
                    _ => {
                        let mut ev = LogEvent::for_record(rec, channel, "failed", attempt, now);
                        ev.error = Some(text);
                        (
                            Outcome::Failed {
                                provider: pname.clone(),
                                error,
                            },
                            ev,
                        )
                    }
                }
            }
        };
        let label = match &outcome {
            Outcome::Sent { .. } => "sent",
            Outcome::Failed { .. } => "failed",
            Outcome::Retry { .. } => "retry",
        };
        metrics::counter!("deliveries_total", "channel" => channel, "provider" => pname.clone(), "outcome" => label)
            .increment(1);
        ev.provider.get_or_insert_with(|| pname.clone());
        outcomes.push((rec.id.clone(), attempt, outcome));
        events.push(ev.to_fields());
        acks.push(entry_id);
    }

    // The provider has spoken: recording it matters more than anything else, so keep
    // trying (nothing else on this channel can progress without MongoDB anyway).
    let mut wait = Duration::from_millis(100);
    let mut recorded = false;
    let give_up = Instant::now() + args.record_patience;
    while Instant::now() < give_up {
        match args.store.record_outcomes(owner, &outcomes).await {
            Ok(()) => {
                recorded = true;
                break;
            }
            Err(err) => {
                tracing::warn!(error = %err, channel, "cannot record outcomes yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    if !recorded {
        tracing::error!(
            channel,
            n = outcomes.len(),
            "outcomes not recorded; entries stay pending and will be claimed again when stale"
        );
        return (report, any_panic);
    }
    let log_entries: Vec<(&str, Vec<(&str, String)>)> =
        events.into_iter().map(|f| (LOG_STREAM, f)).collect();
    // Without Redis the consumer cannot read more work either, so waiting here costs nothing.
    let mut wait = Duration::from_millis(100);
    let give_up = Instant::now() + args.record_patience;
    loop {
        match args.queue.append(&log_entries).await {
            Ok(_) => break,
            Err(err) if Instant::now() >= give_up => {
                tracing::error!(error = %err, n = log_entries.len(), "log events dropped: Redis unavailable too long");
                metrics::counter!("log_events_dropped_total").increment(log_entries.len() as u64);
                break;
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
    report.ack.extend(acks);
    (report, any_panic)
}
