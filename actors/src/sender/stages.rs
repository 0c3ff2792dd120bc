//! The stages of one `Deliver`, each a function with a named hand-off:
//! [`partition`] (valid ids vs malformed entries) → [`claim`] → [`call_provider`] →
//! [`decide_all`] → [`persist`] → [`append_log`]; `deliver` in the actor strings them
//! together and reports.

use super::decision::{decide, CallResult, DecisionContext};
use super::SenderArgs;
use crate::backoff::{retry_until, Backoff};
use crate::domain::{
    Channel, ClaimResult, Claimed, ErrorClass, LogEvent, Lookup, OutboundMessage, Outcome,
    StreamEntry, LOG_STREAM,
};
use crate::health::ProviderHealth;
use crate::ports::{DependencyError, Provider};
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use rand::Rng;
use std::panic::AssertUnwindSafe;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

/// Recording outcomes is retried this way within `record_patience`.
const RECORD_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5));
/// How far before an unknown attempt's start a lookup at the provider begins: the
/// provider's clock and ours may differ by this much.
const LOOKUP_CLOCK_SKEW: chrono::Duration = chrono::Duration::seconds(60);
/// Appending log events is retried this way within `record_patience`.
const LOG_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2));

/// A stream entry and the record it names.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryRef {
    pub entry_id: String,
    pub record_id: String,
}

/// The entries of a batch, sorted by whether they name a record.
#[derive(Debug, Default, PartialEq)]
pub struct Partition {
    pub valid: Vec<EntryRef>,
    /// Entries without a valid `_id`: acknowledged and dropped.
    pub malformed: Vec<String>,
}

/// What the claim step left to do.
#[derive(Debug, Default)]
pub struct Claims {
    pub to_send: Vec<ToSend>,
    /// Nothing to send for these (already final, retry not due...): acknowledge them.
    pub skipped: Vec<String>,
}

/// A claimed record and its stream entry.
#[derive(Debug, Clone)]
pub struct ToSend {
    pub entry_id: String,
    pub claimed: Claimed,
}

/// One provider call made.
#[derive(Debug, Clone)]
pub struct Call {
    pub entry_id: String,
    pub claimed: Claimed,
    pub result: CallResult,
    pub took: Duration,
}

/// The decisions of a batch, ready to be written.
#[derive(Debug, Default)]
pub struct Decided {
    pub outcomes: Vec<(String, u32, Outcome)>,
    pub events: Vec<LogEvent>,
    /// The stream entries these settle, acknowledged once the outcomes are recorded.
    pub acks: Vec<String>,
    /// A provider call panicked: restart the sender once the batch is reported.
    pub panicked: bool,
}

fn is_object_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn partition(channel: Channel, entries: &[StreamEntry]) -> Partition {
    let channel = channel.as_str();
    let mut p = Partition::default();
    for e in entries {
        match e.field("_id") {
            Some(id) if is_object_id(id) => p.valid.push(EntryRef {
                entry_id: e.id.clone(),
                record_id: id.to_string(),
            }),
            _ => {
                tracing::error!(entry = %e.id, channel, "stream entry without a valid _id; acknowledged and dropped");
                metrics::counter!("stream_malformed_entries_total", "channel" => channel)
                    .increment(1);
                p.malformed.push(e.id.clone());
            }
        }
    }
    p
}

/// Claim the records; on a store error, the entries are handed back to be offered again.
pub async fn claim(
    args: &SenderArgs,
    owner: &str,
    valid: Vec<EntryRef>,
) -> Result<Claims, Vec<String>> {
    let ids: Vec<String> = valid.iter().map(|e| e.record_id.clone()).collect();
    let answers = match args.store.claim(&ids, owner, args.stale_after).await {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(error = %err, channel = args.channel.as_str(), "cannot claim; will offer again");
            return Err(valid.into_iter().map(|e| e.entry_id).collect());
        }
    };
    let mut claims = Claims::default();
    for (entry, answer) in valid.into_iter().zip(answers) {
        match answer {
            ClaimResult::Claimed(c) => claims.to_send.push(ToSend {
                entry_id: entry.entry_id,
                claimed: *c,
            }),
            ClaimResult::Skip(why) => {
                tracing::debug!(id = %entry.record_id, why, "nothing to send");
                claims.skipped.push(entry.entry_id);
            }
            // Another live worker has it: its entry stays pending.
            ClaimResult::Busy => {}
        }
    }
    Ok(claims)
}

/// Call the provider for every claimed record, `concurrency` at a time, each within the
/// rate limit and the provider timeout; a panic is caught and becomes a result.
pub async fn call_provider(args: &SenderArgs, to_send: Vec<ToSend>) -> Vec<Call> {
    let channel = args.channel.as_str();
    futures::stream::iter(to_send.into_iter().map(|t| {
        let span = tracing::info_span!("communication", id = %t.claimed.record.id, channel);
        async move {
            args.health.acquire().await;
            let started = Instant::now();
            let result = find_or_call(args, &t.claimed).await;
            report_health(&args.health, &result);
            Call {
                entry_id: t.entry_id,
                claimed: t.claimed,
                result,
                took: started.elapsed(),
            }
        }
        .instrument(span)
    }))
    .buffer_unordered(args.concurrency.max(1))
    .collect()
    .await
}

fn outbound(claimed: &Claimed) -> OutboundMessage {
    let r = &claimed.record;
    OutboundMessage {
        communication_id: r.id.clone(),
        from: r.from.clone(),
        to: r.to.clone(),
        subject: r.subject.clone(),
        body: r.msg.clone(),
    }
}

/// The provider call, unless an earlier attempt's outcome is unknown and the provider
/// says it has the message already. Where it cannot tell (or the lookup fails), the
/// message is sent again (the decision flags that send as a possible duplicate), unless
/// the attempts are spent: the claim was only to ask.
async fn find_or_call(args: &SenderArgs, claimed: &Claimed) -> CallResult {
    let provider = args.provider.as_ref();
    let msg = outbound(claimed);
    if let Some(unknown) = claimed.unknown {
        let since = unknown.since - LOOKUP_CLOCK_SKEW;
        let found = lookup_once(provider, &msg, since, args.provider_timeout).await;
        if let Lookup::Found(receipt) = found {
            tracing::info!(
                attempt = unknown.attempt,
                cause = unknown.cause.as_str(),
                "the provider has the message already; not sending it again"
            );
            return CallResult::Found {
                provider_message_id: receipt.provider_message_id,
            };
        }
        if !args.retry.allows_another(claimed.record.attempts - 1) {
            tracing::warn!(
                attempt = unknown.attempt,
                cause = unknown.cause.as_str(),
                "no attempt left and the provider cannot tell whether the last one went through"
            );
            return CallResult::NotResent;
        }
        tracing::warn!(
            attempt = unknown.attempt,
            cause = unknown.cause.as_str(),
            "resending a message whose earlier provider call may have gone through"
        );
    }
    call_once(provider, &msg, args.provider_timeout).await
}

/// Ask the provider about `msg` within `timeout`; a failed, slow or panicking lookup
/// tells nothing. Counted in `provider_lookups_total{provider,result}`.
async fn lookup_once(
    provider: &dyn Provider,
    msg: &OutboundMessage,
    since: DateTime<Utc>,
    timeout: Duration,
) -> Lookup {
    let call = AssertUnwindSafe(tokio::time::timeout(timeout, provider.lookup(msg, since)));
    let (lookup, result) = match call.catch_unwind().await {
        Ok(Ok(Ok(l))) => {
            let label = match &l {
                Lookup::Found(_) => "found",
                Lookup::NotFound => "not_found",
                Lookup::CannotTell => "cannot_tell",
            };
            (l, label)
        }
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "the provider lookup failed; cannot tell");
            (Lookup::CannotTell, "error")
        }
        Ok(Err(_)) | Err(_) => (Lookup::CannotTell, "error"),
    };
    metrics::counter!("provider_lookups_total", "provider" => provider.name(), "result" => result)
        .increment(1);
    lookup
}

async fn call_once(
    provider: &dyn Provider,
    msg: &OutboundMessage,
    timeout: Duration,
) -> CallResult {
    let call = AssertUnwindSafe(tokio::time::timeout(timeout, provider.send(msg)));
    match call.catch_unwind().await {
        Ok(Ok(Ok(receipt))) => CallResult::Accepted {
            provider_message_id: receipt.provider_message_id,
        },
        Ok(Ok(Err(e))) => CallResult::Refused(e),
        Ok(Err(_)) => CallResult::TimedOut(timeout),
        Err(_) => CallResult::Panicked,
    }
}

/// The breaker hears of every call; a rate limit pauses the bucket instead, since it says
/// nothing of the provider's health.
fn report_health(health: &ProviderHealth, result: &CallResult) {
    match result {
        CallResult::Accepted { .. } | CallResult::Found { .. } => health.record(true),
        CallResult::Refused(e) if e.rate_limited => {
            let wait = match e.class {
                ErrorClass::Retryable {
                    retry_after: Some(d),
                } => d,
                _ => Duration::from_secs(1),
            };
            health.pause_for(wait);
        }
        // A permanent refusal is a healthy provider answering.
        CallResult::Refused(e) => health.record(e.class == ErrorClass::Permanent),
        CallResult::TimedOut(_) | CallResult::Panicked => health.record(false),
        // No call made beyond the lookup, which could not tell: nothing learnt.
        CallResult::NotResent => {}
    }
}

/// Decide every call (see [`decide`]) and count what was decided.
pub fn decide_all(
    args: &SenderArgs,
    calls: Vec<Call>,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> Decided {
    let channel = args.channel.as_str();
    let provider = args.provider.name();
    let ctx = DecisionContext {
        service: channel,
        provider,
        retry: &args.retry,
        timeout: args.provider_timeout,
    };
    let mut d = Decided::default();
    for call in calls {
        let rec = &call.claimed.record;
        d.panicked |= call.result == CallResult::Panicked;
        metrics::histogram!("provider_call_seconds", "provider" => provider)
            .record(call.took.as_secs_f64());
        let decision = decide(&call.result, &call.claimed, ctx, now, rng);
        if let Some(dup) = decision.outcome.possible_duplicate() {
            metrics::counter!("possible_duplicate_sends_total", "channel" => channel, "cause" => dup.cause.as_str())
                .increment(1);
        }
        if let Outcome::Sent { .. } = decision.outcome {
            let latency = (now - rec.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("accept_to_sent_seconds", "channel" => channel).record(latency);
        }
        metrics::counter!("deliveries_total", "channel" => channel, "provider" => provider, "outcome" => decision.label)
            .increment(1);
        d.outcomes
            .push((rec.id.clone(), rec.attempts, decision.outcome));
        d.events.push(decision.event);
        d.acks.push(call.entry_id);
    }
    d
}

/// Record the outcomes, trying for `record_patience`: the provider has spoken, and nothing
/// else on this channel can progress without the store anyway. `None`: not recorded, so
/// the entries stay pending and are claimed again once stale; else whether each write
/// matched its record (one that moved on meanwhile is left alone, counted in
/// `outcomes_unmatched_total{channel}`, and gets no log event).
pub async fn persist(
    args: &SenderArgs,
    owner: &str,
    outcomes: &[(String, u32, Outcome)],
) -> Option<Vec<bool>> {
    let channel = args.channel.as_str();
    let deadline = Instant::now() + args.record_patience;
    let recorded = retry_until(
        &RECORD_BACKOFF,
        Some(deadline),
        || args.store.record_outcomes(owner, outcomes),
        |err: &DependencyError, _| {
            tracing::warn!(error = %err, channel, "cannot record outcomes yet; retrying")
        },
    )
    .await;
    let Ok(matched) = recorded else {
        tracing::error!(
            channel,
            n = outcomes.len(),
            "outcomes not recorded; entries stay pending and will be claimed again when stale"
        );
        return None;
    };
    for ((id, attempt, _), _) in outcomes.iter().zip(&matched).filter(|(_, m)| !**m) {
        tracing::warn!(%id, attempt, channel, "outcome matched no open record (it moved on meanwhile); no event");
        metrics::counter!("outcomes_unmatched_total", "channel" => channel).increment(1);
    }
    Some(matched)
}

/// Append the log events, trying for `record_patience` (without Redis the consumer cannot
/// read more work either, so waiting costs nothing), then dropping and counting them.
pub async fn append_log(args: &SenderArgs, events: &[LogEvent]) {
    let entries: Vec<(&str, Vec<(&str, String)>)> =
        events.iter().map(|e| (LOG_STREAM, e.to_fields())).collect();
    let deadline = Instant::now() + args.record_patience;
    let appended = retry_until(
        &LOG_BACKOFF,
        Some(deadline),
        || args.queue.append(&entries),
        |_, _| {},
    )
    .await;
    if let Err(err) = appended {
        tracing::error!(error = %err, n = entries.len(), "log events dropped: Redis unavailable too long");
        metrics::counter!("log_events_dropped_total").increment(entries.len() as u64);
    }
}
