//! The stages of one `Deliver`, each a function with a named hand-off:
//! [`partition`] (valid ids vs malformed entries) → [`claim`] → [`screen`] (the suppression
//! list, one query) → [`call_provider`] (per
//! claim: the routes' order, then the calls, failing over from one provider to the next)
//! → [`decide_all`] → [`persist`] → [`append_log`]; `deliver` in the actor strings them
//! together and reports, while [`keep_leases`] renews the leases of the calls under way
//! until their outcomes are recorded.

use super::decision::{self, decide, CallResult, DecisionContext};
use super::SenderArgs;
use crate::backoff::{retry_until, Backoff};
use crate::domain::{
    Ambiguity, Channel, ClaimResult, Claimed, ErrorClass, EventStatus, LogEvent, Lookup,
    OutboundMessage, Outcome, StreamEntry, UnknownAttempt, LOG_STREAM,
};
use crate::health::{Permit, ProviderHealth};
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
    /// The trace context the entry carries ([`crate::trace_context`]).
    pub traceparent: Option<String>,
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

/// One claim's provider calls made: the last one's result, and the ones failed over from.
#[derive(Debug, Clone)]
pub struct Call {
    pub entry_id: String,
    /// The claim, carrying the unknown outcome of a provider failed over from, if any.
    pub claimed: Claimed,
    /// The provider of `result` (the one asked, where the message was found).
    pub provider: &'static str,
    pub result: CallResult,
    /// The providers tried before, in order, and what each said.
    pub failovers: Vec<(&'static str, CallResult)>,
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
                traceparent: e.field("traceparent").map(str::to_string),
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
            ClaimResult::Claimed(mut c) => {
                // The provider call continues the trace the stream entry carries.
                if entry.traceparent.is_some() {
                    c.record.traceparent = entry.traceparent;
                }
                claims.to_send.push(ToSend {
                    entry_id: entry.entry_id,
                    claimed: *c,
                })
            }
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

/// What the suppression check left: the claims to send, and the claims whose recipient is
/// on the tenant's suppression list, decided already (`suppressed`, recorded with the
/// batch's other outcomes).
#[derive(Debug, Default)]
pub struct Screened {
    pub to_send: Vec<ToSend>,
    pub suppressed: Decided,
}

/// Ask the store, in one query for the whole batch, which claims' recipients are
/// suppressed; their leases join `held` until their outcomes are written. On a store error
/// the claims come back (`Err`): nothing is sent unchecked.
pub async fn screen(
    args: &SenderArgs,
    held: &Held,
    to_send: Vec<ToSend>,
    now: DateTime<Utc>,
) -> Result<Screened, Vec<ToSend>> {
    let channel = args.channel.as_str();
    let recipients: Vec<_> = to_send
        .iter()
        .map(|t| {
            let r = &t.claimed.record;
            (r.tenant.clone(), r.channel, r.to.clone())
        })
        .collect();
    let answers = match args.store.suppressed(&recipients).await {
        Ok(a) => a,
        Err(err) => {
            tracing::warn!(error = %err, channel, "cannot check the suppression list; claims given back");
            return Err(to_send);
        }
    };
    let mut s = Screened::default();
    for (t, hit) in to_send.into_iter().zip(answers) {
        if !hit {
            s.to_send.push(t);
            continue;
        }
        let rec = &t.claimed.record;
        tracing::info!(id = %rec.id, channel, "Recipient suppressed; not sent.");
        metrics::counter!("suppressed_total", "channel" => channel).increment(1);
        held.add(&rec.id, rec.attempts);
        let event = LogEvent::for_record(rec, channel, EventStatus::Suppressed, rec.attempts, now);
        let d = &mut s.suppressed;
        d.outcomes
            .push((rec.id.clone(), rec.attempts, Outcome::Suppressed));
        d.events.push(event);
        d.acks.push(t.entry_id);
    }
    Ok(s)
}

/// What the call stage came to: the calls made, and the claims that made none.
#[derive(Debug, Default)]
pub struct Calls {
    pub made: Vec<Call>,
    /// Another worker claimed these records after their lease lapsed in the queue: no
    /// call; their entries stay pending (that worker records the outcomes).
    pub lost: Vec<String>,
    /// The lease could not be confirmed (Redis unavailable): no call; offer them again.
    pub unconfirmed: Vec<String>,
    /// The provider asked (`Retry-After`) for a pause longer than the lease: no call;
    /// given back, due again at the time given.
    pub postponed: Vec<(EntryRef, DateTime<Utc>)>,
}

/// What became of one claim in the call stage.
enum Turn {
    Called(Box<Call>),
    Lost(String),
    Unconfirmed(String),
    Postponed(EntryRef, DateTime<Utc>),
}

/// The claims whose provider call has started: their leases are kept (see
/// [`keep_leases`]) until their outcomes are recorded.
#[derive(Debug, Default)]
pub struct Held(std::sync::Mutex<Vec<(String, u32)>>);

impl Held {
    fn add(&self, id: &str, attempt: u32) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.push((id.to_string(), attempt));
    }

    fn all(&self) -> Vec<(String, u32)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Renew the leases of `held` every third of `stale_after`, for as long as this is polled
/// (a batch's calls and the recording of their outcomes): a slow call, a long batch or a
/// slow outcome write never lets a lease lapse under a call. Never returns.
pub async fn keep_leases(args: &SenderArgs, owner: &str, held: &Held) {
    let every = (args.stale_after / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let claims = held.all();
        if claims.is_empty() {
            continue;
        }
        match args.store.renew(owner, &claims, args.stale_after).await {
            Ok(kept) => {
                for ((id, _), _) in claims.iter().zip(kept).filter(|(_, k)| !k) {
                    // Only a lapse (Redis unreachable, this process stalled) gets here: the
                    // outcome write is fenced off and the record flagged.
                    tracing::warn!(%id, "lease lost to another worker during the call");
                }
            }
            Err(err) => tracing::warn!(error = %err, "leases not renewed; trying again"),
        }
    }
}

/// Call the provider for every claimed record, `concurrency` at a time, each within the
/// rate limit and the provider timeout; a panic is caught and becomes a result. Right
/// before its call each claim's lease is confirmed (renewed, or taken again if it lapsed
/// in the queue and nobody claimed the record since) and joins `held`; a claim that lost
/// its lease makes no call. A `Retry-After` pause that would outlast a claim's lease
/// (counted from `claimed_at`) is not waited out under it: the claim is postponed.
pub async fn call_provider(
    args: &SenderArgs,
    owner: &str,
    held: &Held,
    to_send: Vec<ToSend>,
    claimed_at: Instant,
) -> Calls {
    let channel = args.channel.as_str();
    let turns: Vec<Turn> = futures::stream::iter(to_send.into_iter().map(|t| {
        let span = tracing::info_span!("communication", id = %t.claimed.record.id, channel);
        crate::trace_context::adopt(&span, t.claimed.record.traceparent.as_deref());
        take_turn(args, owner, held, t, claimed_at).instrument(span)
    }))
    .buffer_unordered(args.concurrency.max(1))
    .collect()
    .await;
    let mut calls = Calls::default();
    for turn in turns {
        match turn {
            Turn::Called(c) => calls.made.push(*c),
            Turn::Lost(e) => calls.lost.push(e),
            Turn::Unconfirmed(e) => calls.unconfirmed.push(e),
            Turn::Postponed(e, t) => calls.postponed.push((e, t)),
        }
    }
    calls
}

/// One claim's turn: the providers' order, the first one's breaker and rate limit, the
/// lease check, the calls.
async fn take_turn(
    args: &SenderArgs,
    owner: &str,
    held: &Held,
    t: ToSend,
    claimed_at: Instant,
) -> Turn {
    let record = &t.claimed.record;
    let entry = EntryRef {
        entry_id: t.entry_id.clone(),
        record_id: record.id.clone(),
        traceparent: record.traceparent.clone(),
    };
    let lease_until = claimed_at + args.stale_after;
    let order = args.routes.order(&record.tenant);
    let first = match first_route(args, &order, lease_until).await {
        Ok(first) => first,
        Err(pause) => {
            tracing::info!(
                ?pause,
                "the provider asked for a pause longer than the lease; postponed"
            );
            let due = Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default();
            return Turn::Postponed(entry, due);
        }
    };
    let claim = [(record.id.clone(), record.attempts)];
    match args.store.renew(owner, &claim, args.stale_after).await {
        Ok(kept) if kept == [true] => held.add(&record.id, record.attempts),
        Ok(_) => {
            tracing::warn!("the lease lapsed and another worker claimed the record; not calling");
            metrics::counter!("sender_leases_lost_total", "channel" => args.channel.as_str())
                .increment(1);
            return Turn::Lost(t.entry_id);
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot confirm the lease; will offer again");
            return Turn::Unconfirmed(t.entry_id);
        }
    }
    let started = Instant::now();
    let mut call = route_calls(args, t.claimed, &order, first, lease_until).await;
    call.entry_id = t.entry_id;
    call.took = started.elapsed();
    Turn::Called(Box::new(call))
}

/// The first provider of `order` whose breaker lets a call through (taking a half-open
/// breaker's probe), else the first of `order`; with a token of its rate limit. `Err`: its
/// `Retry-After` pause lasts beyond the lease.
async fn first_route(
    args: &SenderArgs,
    order: &[usize],
    lease_until: Instant,
) -> Result<usize, Duration> {
    let pick = order
        .iter()
        .copied()
        .find(|&i| !matches!(args.routes.get(i).health.permit(), Permit::Rejected(_)))
        .unwrap_or(order[0]);
    let left = lease_until.saturating_duration_since(Instant::now());
    args.routes.get(pick).health.acquire_within(left).await?;
    Ok(pick)
}

/// The next provider of `rest` whose breaker lets a call through and whose rate limit
/// gives a token before the lease ends.
async fn next_route(
    args: &SenderArgs,
    rest: &mut impl Iterator<Item = usize>,
    lease_until: Instant,
) -> Option<usize> {
    for i in rest.by_ref() {
        let health = &args.routes.get(i).health;
        if matches!(health.permit(), Permit::Rejected(_)) {
            continue;
        }
        let left = lease_until.saturating_duration_since(Instant::now());
        if health.acquire_within(left).await.is_ok() {
            return Some(i);
        }
    }
    None
}

fn outbound(claimed: &Claimed) -> OutboundMessage {
    let r = &claimed.record;
    OutboundMessage {
        communication_id: r.id.clone(),
        from: r.from.clone(),
        to: r.to.clone(),
        subject: r.subject.clone(),
        body: r.msg.clone(),
        html: r.html.clone(),
    }
}

/// One claim's calls: unless an earlier attempt's outcome is unknown and a provider says
/// it has the message (see [`find_earlier`]), the provider `first`, then, while a result
/// fails over (`decision::fails_over`), the next ready provider of `order`. A call after one
/// whose outcome is unknown carries that unknown attempt, so its decision flags it as a
/// possible duplicate.
async fn route_calls(
    args: &SenderArgs,
    mut claimed: Claimed,
    order: &[usize],
    first: usize,
    lease_until: Instant,
) -> Call {
    let msg = outbound(&claimed);
    let mut call = Call {
        entry_id: String::new(),
        provider: args.routes.get(first).provider.name(),
        result: CallResult::NotResent,
        failovers: Vec::new(),
        took: Duration::ZERO,
        claimed: claimed.clone(),
    };
    if let Some((provider, result)) = find_earlier(args, &claimed, &msg, first).await {
        if let Some(i) = args.routes.position(provider) {
            report_health(&args.routes.get(i).health, &result);
        }
        (call.provider, call.result) = (provider, result);
        return call;
    }
    let mut rest = order.iter().copied().filter(|&i| i != first);
    let mut route = args.routes.get(first);
    loop {
        let at = Utc::now();
        let result = call_once(route.provider.as_ref(), &msg, args.provider_timeout).await;
        report_health(&route.health, &result);
        let name = route.provider.name();
        let next = if decision::fails_over(&result) {
            next_route(args, &mut rest, lease_until).await
        } else {
            None
        };
        let Some(next) = next else {
            (call.claimed, call.provider, call.result) = (claimed, name, result);
            return call;
        };
        if let Some(cause) = result.error(name).and_then(|e| e.ambiguous) {
            claimed.unknown = Some(failed_over_unknown(&claimed, cause, at, name));
        }
        tracing::warn!(
            from = name,
            to = args.routes.get(next).provider.name(),
            "failing over to the next provider"
        );
        metrics::counter!("provider_failovers_total", "channel" => args.channel.as_str(), "provider" => name)
            .increment(1);
        call.failovers.push((name, result));
        route = args.routes.get(next);
    }
}

/// The unknown attempt a call failed over from leaves behind (its lookup window from
/// `at`, when it started, or earlier); at `provider`, unless an earlier one was elsewhere.
fn failed_over_unknown(
    claimed: &Claimed,
    cause: Ambiguity,
    at: DateTime<Utc>,
    provider: &'static str,
) -> UnknownAttempt {
    let earlier = claimed.unknown;
    UnknownAttempt {
        attempt: claimed.record.attempts,
        cause,
        since: earlier.map_or(at, |e| e.since.min(at)),
        provider: match earlier {
            Some(e) if e.provider != Some(provider) => None,
            _ => Some(provider),
        },
    }
}

/// For a claim whose earlier attempt's outcome is unknown: ask the provider of that attempt
/// (every provider of the channel when that is not known) before sending anywhere.
/// `Some`: no send: found (at that provider), or not resent (the attempts are spent and no
/// provider could say it has the message). `None`: send (flagged as a possible duplicate).
async fn find_earlier(
    args: &SenderArgs,
    claimed: &Claimed,
    msg: &OutboundMessage,
    first: usize,
) -> Option<(&'static str, CallResult)> {
    let unknown = claimed.unknown?;
    let since = unknown.since - LOOKUP_CLOCK_SKEW;
    let asked: Vec<usize> = match unknown.provider.and_then(|p| args.routes.position(p)) {
        Some(i) => vec![i],
        None => (0..args.routes.all().len()).collect(),
    };
    for i in asked {
        let provider = args.routes.get(i).provider.as_ref();
        if let Lookup::Found(receipt) =
            lookup_once(provider, msg, since, args.provider_timeout).await
        {
            tracing::info!(
                attempt = unknown.attempt,
                cause = unknown.cause.as_str(),
                provider = provider.name(),
                "the provider has the message already; not sending it again"
            );
            let found = CallResult::Found {
                provider_message_id: receipt.provider_message_id,
            };
            return Some((provider.name(), found));
        }
    }
    let spent = claimed.record.attempts - 1;
    if !args
        .retry
        .allows_another(spent.saturating_sub(claimed.record.attempt_base))
    {
        tracing::warn!(
            attempt = unknown.attempt,
            cause = unknown.cause.as_str(),
            "no attempt left and the provider cannot tell whether the last one went through"
        );
        let asked = unknown
            .provider
            .unwrap_or(args.routes.get(first).provider.name());
        return Some((asked, CallResult::NotResent));
    }
    tracing::warn!(
        attempt = unknown.attempt,
        cause = unknown.cause.as_str(),
        "resending a message whose earlier provider call may have gone through"
    );
    None
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
        // A permanent refusal about the message is a healthy provider answering; one about
        // the account (bad credentials, suspended) is a failure of this provider.
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
    let mut d = Decided::default();
    for call in calls {
        let rec = &call.claimed.record;
        let provider = call.provider;
        let ctx = DecisionContext {
            service: channel,
            provider,
            retry: &args.retry,
            timeout: args.provider_timeout,
        };
        d.panicked |= call.result == CallResult::Panicked;
        metrics::histogram!("provider_call_seconds", "provider" => provider)
            .record(call.took.as_secs_f64());
        let decision = decide(&call.result, &call.claimed, ctx, now, rng);
        let failovers = decision::failover_errors(&call.failovers, rec.attempts, now);
        let outcome = decision.outcome.with_failovers(failovers);
        if let Some(dup) = outcome.possible_duplicate() {
            metrics::counter!("possible_duplicate_sends_total", "channel" => channel, "cause" => dup.cause.as_str())
                .increment(1);
        }
        if let Outcome::Sent { .. } = outcome {
            let latency = (now - rec.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("accept_to_sent_seconds", "channel" => channel).record(latency);
        }
        for (from, _) in &call.failovers {
            metrics::counter!("deliveries_total", "channel" => channel, "provider" => *from, "outcome" => "failover")
                .increment(1);
        }
        metrics::counter!("deliveries_total", "channel" => channel, "provider" => provider, "outcome" => decision.label)
            .increment(1);
        d.outcomes.push((rec.id.clone(), rec.attempts, outcome));
        d.events.push(decision.event);
        d.acks.push(call.entry_id);
    }
    d
}

/// Record the outcomes, trying for `record_patience`: the provider has spoken, and nothing
/// else on this channel can progress without the store anyway. `None`: not recorded, so
/// the entries stay pending and are claimed again when stale. `Some(fenced)`: recorded,
/// except for the records in `fenced`, whose leases another worker took meanwhile (that
/// worker records them; the ones whose call may have reached the provider are flagged and
/// counted as possible duplicates, cause `lost_lease`).
pub async fn persist(
    args: &SenderArgs,
    owner: &str,
    outcomes: &[(String, u32, Outcome)],
) -> Option<Vec<String>> {
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
    let Ok(fenced) = recorded else {
        tracing::error!(
            channel,
            n = outcomes.len(),
            "outcomes not recorded; entries stay pending and will be claimed again when stale"
        );
        return None;
    };
    for (id, attempt, outcome) in outcomes.iter().filter(|(id, _, _)| fenced.contains(id)) {
        metrics::counter!("sender_fenced_writes_total", "channel" => channel).increment(1);
        if outcome.may_have_reached_provider() {
            tracing::error!(%id, attempt, channel, "lease lost after a call that may have reached the provider: flagged as a possible duplicate");
            metrics::counter!("possible_duplicate_sends_total", "channel" => channel, "cause" => Ambiguity::LostLease.as_str())
                .increment(1);
        } else {
            tracing::warn!(%id, attempt, channel, "lease lost; outcome left to the worker that holds the record");
        }
    }
    Some(fenced)
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
