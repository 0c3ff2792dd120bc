//! SenderActor (one per channel): claims records, calls the channel's providers, records
//! outcomes.
//!
//! Owns: the channel's routes (its providers, each with its breaker and token bucket, and
//! the strategy among them: `routing.rs`) and retry policy.
//! Talks to it: the channel's StreamConsumer (`Deliver`, an RPC answered with the stream
//! entry ids that may be acknowledged, and those to offer again).
//! Talks to: the store (claim before the call: a lease in Redis and one MongoDB read;
//! outcome after it: one MongoDB write; one round trip per batch each), the providers,
//! Redis (`log_stream` events).
//! A batch goes through named stages (`stages.rs`): partition the entries (valid ids vs
//! malformed) → claim → screen (one query for the batch's recipients on the tenants'
//! suppression lists: those are recorded `suppressed`, never sent; if the store cannot
//! say, the claims are given back, due again in 5 s) → call the providers (the order from the routes; rate limit,
//! timeout, panic caught, breaker told; on a result that fails over — a retryable refusal,
//! a timeout, a reset — the next ready provider within the same attempt, a call after an
//! unknown outcome flagged as a possible duplicate; for a record whose earlier attempt has
//! an unknown outcome, first ask the provider of that attempt whether it has the message,
//! and send anywhere only if it cannot say yes) → decide each call (`decision.rs`, pure:
//! outcome, log event, metric label, whether to fail over) → persist the outcomes → append
//! the log events → report.
//! Leases: each record's lease is confirmed right before its own call (a claim whose
//! lease another worker took makes none), renewed while the call runs and until the
//! batch's outcomes are written, and fences the outcome write (a write whose lease was
//! lost is not made; the record is flagged where the call may have reached the provider).
//! A `Retry-After` pause longer than a waiting claim's lease is not slept under it: the
//! claim is given back and the record rescheduled for the pause's end.
//! On failure: a store error at claim hands the entries back to be offered again; outcome
//! writes and log appends are retried for `record_patience` (then the entries stay pending,
//! or the events are dropped and counted). A provider panic is recorded as a retry, the
//! batch is reported, then the actor fails and is restarted. A crash mid-batch leaves the
//! consumer without an answer, so every entry of the batch stays pending in the group; the
//! dead batch's leases expire after `stale_after`, then those records are claimed again
//! (the consumer hands autoclaimed entries over one at a time, which isolates a message
//! that crashes its sender), looked up at every provider of the channel, and sent again
//! only if none finds it: marked `possibleDuplicate` on the record (cause `stale_lease`)
//! and counted in `possible_duplicate_sends_total{channel,cause}`, since the provider call
//! may have been made. A timeout, a reset or an ambiguous 5xx is handled the same way on
//! the next try (asked at the provider it happened at).

mod decision;
#[cfg(test)]
mod failover_tests;
mod stages;

pub use decision::{decide, CallResult, Decision, DecisionContext};
pub use stages::{Call, Claims, Decided, EntryRef, Partition, ToSend};

use crate::domain::StreamEntry;
use crate::ports::{Queue, Store};
use crate::retry::RetryPolicy;
use crate::routing::Routes;
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::SeedableRng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// When claims whose suppression check failed (the store did not answer) are due again.
const SCREEN_RETRY: chrono::Duration = chrono::Duration::seconds(5);

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
    /// The channel's providers (each with its breaker and rate limit, shared with the
    /// consumers and `/api/v1/providers`) and how to choose among them.
    pub routes: Arc<Routes>,
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

/// Fault injection for the fault suite, off unless `faults` is set, and compiled in only with
/// the `fault-injection` feature (test builds): a message whose body holds `#panic-always#`
/// crashes the sender before any provider call of its batch, every time (a poison message);
/// `#panic-once#` does so on its first attempt only.
#[cfg(feature = "fault-injection")]
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

/// Without the `fault-injection` feature no marker is honoured, whatever the settings say.
#[cfg(not(feature = "fault-injection"))]
fn injected_crash(_args: &SenderArgs, _to_send: &[ToSend]) {}

/// One batch through every stage. `owner` names this batch's claims.
pub async fn deliver(args: &SenderArgs, owner: &str, entries: Vec<StreamEntry>) -> Delivery {
    let mut out = Delivery::default();
    let Partition { valid, malformed } = stages::partition(args.channel, &entries);
    out.report.ack.extend(malformed);
    if valid.is_empty() {
        return out;
    }
    let claimed_at = tokio::time::Instant::now();
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
    let held = stages::Held::default();
    let screened = match stages::screen(args, &held, claims.to_send, Utc::now()).await {
        Ok(s) => s,
        Err(unchecked) => {
            let due = Utc::now() + SCREEN_RETRY;
            let back = unchecked
                .into_iter()
                .map(|t| {
                    let record_id = t.claimed.record.id;
                    (
                        stages::EntryRef {
                            entry_id: t.entry_id,
                            record_id,
                            traceparent: t.claimed.record.traceparent,
                        },
                        due,
                    )
                })
                .collect();
            out.report.ack.extend(postpone(args, owner, back).await);
            return out;
        }
    };
    let work = send_and_record(args, owner, &held, screened, claimed_at, &mut out);
    tokio::select! {
        biased;
        () = work => {}
        () = stages::keep_leases(args, owner, &held) => {}
    }
    out
}

/// The claimed records' calls, decisions and outcome writes, with the suppressed ones'
/// (while the caller keeps the leases of `held`), into `out`.
async fn send_and_record(
    args: &SenderArgs,
    owner: &str,
    held: &stages::Held,
    screened: stages::Screened,
    claimed_at: tokio::time::Instant,
    out: &mut Delivery,
) {
    let stages::Screened {
        to_send,
        suppressed,
    } = screened;
    let calls = stages::call_provider(args, owner, held, to_send, claimed_at).await;
    // Lost: the worker that has the record now settles the entry.
    out.report.retry.extend(calls.unconfirmed);
    out.report
        .ack
        .extend(postpone(args, owner, calls.postponed).await);
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut decided = stages::decide_all(args, calls.made, Utc::now(), &mut rng);
    decided.outcomes.extend(suppressed.outcomes);
    decided.events.extend(suppressed.events);
    decided.acks.extend(suppressed.acks);
    out.panicked = decided.panicked;
    if let Some(fenced) = stages::persist(args, owner, &decided.outcomes).await {
        // A fenced write recorded nothing: no event for it (search follows MongoDB, never a
        // write that changed nothing).
        let events: Vec<_> = decided
            .events
            .into_iter()
            .filter(|e| !fenced.contains(&e.communication_id))
            .collect();
        stages::append_log(args, &events).await;
        out.report.ack.extend(decided.acks);
    }
}

/// Give postponed claims back, due again when the provider's pause ends; their entries are
/// done with (the OutboxSweeper queues the records again then). If the store cannot take
/// it, they are offered again instead.
async fn postpone(
    args: &SenderArgs,
    owner: &str,
    postponed: Vec<(stages::EntryRef, chrono::DateTime<Utc>)>,
) -> Vec<String> {
    let Some(due) = postponed.iter().map(|(_, t)| *t).max() else {
        return Vec::new();
    };
    let ids: Vec<String> = postponed.iter().map(|(e, _)| e.record_id.clone()).collect();
    match args.store.reschedule(owner, &ids, due).await {
        Ok(()) => postponed.into_iter().map(|(e, _)| e.entry_id).collect(),
        Err(err) => {
            tracing::warn!(error = %err, n = ids.len(), "postponed claims not given back; they expire");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        Ambiguity, Channel, ClaimResult, ErrorClass, EventStatus, LogEvent, Lookup, Outcome,
        ProviderError, ProviderReceipt, Status, LOG_STREAM,
    };
    use crate::health::ProviderHealth;
    use crate::ports::ErrorKind;
    use crate::testing::{
        self, Answer, MemoryQueue, MemoryStore, QueueMethod, ScriptedProvider, StoreMethod,
    };

    /// The trace context crosses the stream hop in the entry: written by the router
    /// (`stream_fields`), read back with the entry before the claim.
    #[test]
    fn the_stream_entry_carries_the_trace_context_to_the_sender() {
        let mut rec = testing::record(1, Channel::Sms);
        let untraced = testing::stream_entry("1-0", &rec);
        assert_eq!(untraced.field("traceparent"), None);
        rec.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let entry = testing::stream_entry("1-0", &rec);
        let p = stages::partition(Channel::Sms, &[entry, untraced]);
        assert_eq!(p.valid[0].traceparent, rec.traceparent);
        assert_eq!(p.valid[1].traceparent, None);
    }

    pub(super) struct Fixture {
        pub(super) store: Arc<MemoryStore>,
        queue: MemoryQueue,
        provider: Arc<ScriptedProvider>,
        pub(super) args: SenderArgs,
    }

    /// A sender for SMS over in-memory ports, one provider call at a time (so a script's
    /// answers go to the records in order), three attempts per message.
    pub(super) fn fixture() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let queue = MemoryQueue::new();
        let provider = Arc::new(ScriptedProvider::new("scripted"));
        let breaker = crate::testing::lenient_breaker();
        let args = SenderArgs {
            channel: Channel::Sms,
            routes: Arc::new(Routes::single(
                provider.clone(),
                Arc::new(ProviderHealth::new(
                    "scripted", "sms", breaker, 1000.0, 1000.0,
                )),
            )),
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            owner: "test".into(),
            stale_after: Duration::from_secs(30),
            provider_timeout: Duration::from_secs(2),
            concurrency: 1,
            retry: RetryPolicy {
                max_attempts: 3,
                base: Duration::from_secs(1),
                cap: Duration::from_secs(10),
            },
            record_patience: Duration::from_secs(3),
            faults: false,
        };
        Fixture {
            store,
            queue,
            provider,
            args,
        }
    }

    impl Fixture {
        /// Store records `ns` and return their stream entries (entry `n-0` for record `n`).
        fn entries(&self, ns: impl IntoIterator<Item = u32>) -> Vec<StreamEntry> {
            ns.into_iter()
                .map(|n| {
                    let r = testing::record(n, Channel::Sms);
                    self.store.put(r.clone());
                    testing::stream_entry(&format!("{n}-0"), &r)
                })
                .collect()
        }

        async fn deliver(&self, entries: Vec<StreamEntry>) -> Delivery {
            deliver(&self.args, "test:sms:0", entries).await
        }

        fn status(&self, n: u32) -> Status {
            self.store
                .record(&testing::record(n, Channel::Sms).id)
                .unwrap()
                .status
        }

        fn events(&self) -> Vec<LogEvent> {
            self.queue
                .entries(LOG_STREAM)
                .iter()
                .map(|e| LogEvent::from_entry(e).unwrap())
                .collect()
        }
    }

    fn refusal(class: ErrorClass) -> Answer {
        Answer::Refuse(ProviderError {
            class,
            ambiguous: None,
            rate_limited: false,
            code: Some("x".into()),
            message: "refused".into(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn sent_retry_and_failed_are_recorded_in_one_write() {
        let f = fixture();
        f.provider.answer([
            Answer::Accept(Some("SM1".into())),
            refusal(ErrorClass::Retryable { retry_after: None }),
            refusal(ErrorClass::Permanent),
        ]);
        let d = f.deliver(f.entries(1..=3)).await;
        assert!(!d.panicked);
        assert_eq!(d.report.ack, ["1-0", "2-0", "3-0"]);
        assert!(d.report.retry.is_empty());
        assert_eq!(f.store.script.sizes(StoreMethod::RecordOutcomes), [3]);
        let outcomes = &f.store.recorded_outcomes()[0];
        assert!(matches!(outcomes[0].2, Outcome::Sent { .. }));
        assert!(matches!(outcomes[1].2, Outcome::Retry { .. }));
        assert!(matches!(outcomes[2].2, Outcome::Failed { .. }));
        assert_eq!(
            [f.status(1), f.status(2), f.status(3)],
            [Status::Sent, Status::Pending, Status::Failed]
        );
        let statuses: Vec<EventStatus> = f.events().iter().map(|e| e.status).collect();
        assert_eq!(
            statuses,
            [
                EventStatus::Sent,
                EventStatus::Retrying,
                EventStatus::Failed
            ]
        );
        assert_eq!(f.queue.script().sizes(QueueMethod::Append), [3]);
    }

    /// The record is dead-lettered (`failed`) while its provider call is under way: the
    /// `sent` write matches nothing, and no `sent` event reaches search.
    #[tokio::test(start_paused = true)]
    async fn busy_records_stay_pending_and_finished_ones_are_acknowledged() {
        let f = fixture();
        let mut entries = f.entries([1, 2]);
        f.store.hold(
            &testing::record(1, Channel::Sms).id,
            "other",
            Duration::from_secs(30),
        );
        let mut sent = testing::record(2, Channel::Sms);
        sent.status = Status::Sent;
        f.store.put(sent);
        entries.push(StreamEntry {
            id: "9-0".into(),
            fields: vec![("_id".into(), "nope".into())],
        });
        let d = f.deliver(entries).await;
        // The sent one and the malformed one are done with; the busy one is left pending.
        let mut ack = d.report.ack.clone();
        ack.sort();
        assert_eq!(ack, ["2-0", "9-0"]);
        assert!(d.report.retry.is_empty());
        assert!(f.provider.sent().is_empty());
        assert_eq!(f.store.script.count(StoreMethod::RecordOutcomes), 0);
    }

    /// A recipient on its tenant's suppression list: found by one query for the batch,
    /// recorded `suppressed` in the batch's one outcome write with a `suppressed` event,
    /// never handed to the provider; the others are sent.
    #[tokio::test(start_paused = true)]
    async fn a_suppressed_recipient_is_recorded_and_never_sent() {
        let f = fixture();
        let r2 = testing::record(2, Channel::Sms);
        f.store.suppress(&r2.tenant, Channel::Sms, &r2.to);
        f.provider.answer([
            Answer::Accept(Some("SM1".into())),
            Answer::Accept(Some("SM3".into())),
        ]);
        let d = f.deliver(f.entries(1..=3)).await;
        let mut ack = d.report.ack.clone();
        ack.sort();
        assert_eq!(ack, ["1-0", "2-0", "3-0"]);
        assert_eq!(f.store.script.sizes(StoreMethod::Suppressed), [3]);
        assert_eq!(f.store.script.sizes(StoreMethod::RecordOutcomes), [3]);
        assert_eq!(
            [f.status(1), f.status(2), f.status(3)],
            [Status::Sent, Status::Suppressed, Status::Sent]
        );
        let sent = f.provider.sent();
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|m| m.to != r2.to));
        let suppressed: Vec<String> = f
            .events()
            .iter()
            .filter(|e| e.status == EventStatus::Suppressed)
            .map(|e| e.communication_id.clone())
            .collect();
        assert_eq!(suppressed, [r2.id]);
    }

    /// Without an answer from the suppression list nothing is sent: the claims are given
    /// back, due again shortly, and their entries are done with.
    #[tokio::test(start_paused = true)]
    async fn without_the_suppression_list_nothing_is_sent_and_the_claims_come_back() {
        let f = fixture();
        f.store
            .script
            .fail_next(StoreMethod::Suppressed, 1, ErrorKind::Unavailable);
        let d = f.deliver(f.entries(1..=2)).await;
        assert!(f.provider.sent().is_empty());
        assert_eq!(f.store.script.count(StoreMethod::Reschedule), 1);
        let mut ack = d.report.ack.clone();
        ack.sort();
        assert_eq!(ack, ["1-0", "2-0"]);
        assert_eq!(
            [f.status(1), f.status(2)],
            [Status::Pending, Status::Pending]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_down_at_claim_hands_every_entry_back() {
        let f = fixture();
        f.store
            .script
            .fail_next(StoreMethod::Claim, 1, ErrorKind::Unavailable);
        let d = f.deliver(f.entries(1..=2)).await;
        assert_eq!(d.report.retry, ["1-0", "2-0"]);
        assert!(d.report.ack.is_empty());
        assert!(f.provider.sent().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_are_retried_within_patience_then_left_pending() {
        let f = fixture();
        f.store
            .script
            .fail_next(StoreMethod::RecordOutcomes, 2, ErrorKind::Unavailable);
        let d = f.deliver(f.entries([1])).await;
        assert_eq!(d.report.ack, ["1-0"]);
        assert_eq!(f.store.script.count(StoreMethod::RecordOutcomes), 3);
        assert_eq!(f.events().len(), 1);

        let f = fixture();
        f.store
            .script
            .fail_next(StoreMethod::RecordOutcomes, 1000, ErrorKind::Unavailable);
        let started = tokio::time::Instant::now();
        let d = f.deliver(f.entries([1])).await;
        assert!(started.elapsed() >= f.args.record_patience);
        assert!(
            d.report.ack.is_empty(),
            "not recorded: left pending to be claimed again"
        );
        assert!(
            f.events().is_empty(),
            "no event for an outcome not recorded"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn log_events_are_dropped_after_patience_but_the_entries_are_done() {
        let f = fixture();
        f.queue
            .script()
            .fail_next(QueueMethod::Append, 1000, ErrorKind::Unavailable);
        let d = f.deliver(f.entries([1])).await;
        assert_eq!(d.report.ack, ["1-0"]);
        assert_eq!(f.status(1), Status::Sent);
        assert!(f.queue.script().count(QueueMethod::Append) > 1);
        assert!(f.events().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_provider_times_out_and_a_panic_restarts_the_sender() {
        let f = fixture();
        f.provider.answer([Answer::Hang, Answer::Panic]);
        let d = f.deliver(f.entries(1..=2)).await;
        assert!(d.panicked);
        assert_eq!(d.report.ack, ["1-0", "2-0"]);
        let outcomes = &f.store.recorded_outcomes()[0];
        let codes: Vec<Option<&str>> = outcomes
            .iter()
            .map(|(_, _, o)| match o {
                Outcome::Retry { error, .. } => error.code.as_deref(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(codes, [Some("timeout"), Some("internal")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_claim_is_sent_again_as_a_possible_duplicate() {
        let f = fixture();
        let entries = stale(&f).await;
        f.deliver(entries).await;
        let outcomes = &f.store.recorded_outcomes()[0];
        let (_, attempt, sent) = &outcomes[0];
        assert_eq!(*attempt, 2);
        assert!(matches!(sent, Outcome::Sent { .. }), "{sent:?}");
        let dup = sent.possible_duplicate().expect("flagged");
        assert_eq!((dup.attempt, dup.cause), (1, Ambiguity::StaleLease));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_recorded_as_an_unknown_outcome() {
        let f = fixture();
        f.provider.answer([Answer::Hang]);
        f.deliver(f.entries([1])).await;
        let outcomes = &f.store.recorded_outcomes()[0];
        let Outcome::Retry {
            unknown: Some(u),
            possible_duplicate: None,
            ..
        } = &outcomes[0].2
        else {
            panic!("{:?}", outcomes[0].2);
        };
        assert_eq!((u.attempt, u.cause), (1, Ambiguity::Timeout));
    }

    fn id(n: u32) -> String {
        testing::record(n, Channel::Sms).id
    }

    /// A 429 with `Retry-After: 60` pauses the provider for longer than the 30 s lease:
    /// the claims still waiting for their call are given back at once, due when the pause
    /// ends, their try not counted; nothing sleeps the minute out under a lease.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_longer_than_the_lease_is_not_slept_under_it() {
        let f = fixture();
        f.provider.answer([Answer::Refuse(ProviderError {
            class: ErrorClass::Retryable {
                retry_after: Some(Duration::from_secs(60)),
            },
            ambiguous: None,
            rate_limited: true,
            code: Some("20429".into()),
            message: "Too Many Requests".into(),
        })]);
        let started = tokio::time::Instant::now();
        let d = f.deliver(f.entries(1..=3)).await;
        assert!(
            started.elapsed() < f.args.stale_after,
            "slept under the lease"
        );
        assert_eq!(f.provider.sent().len(), 1, "only the first was called");
        let mut ack = d.report.ack.clone();
        ack.sort();
        assert_eq!(
            ack,
            ["1-0", "2-0", "3-0"],
            "the postponed ones are done with"
        );
        assert_eq!(f.store.script.sizes(StoreMethod::Reschedule), [2]);
        for n in [2, 3] {
            let r = f.store.record(&id(n)).unwrap();
            assert_eq!((r.status, r.attempts), (Status::Pending, 0), "{n}");
            let ids = [id(n)];
            let again = f.store.claim(&ids, "later", Duration::from_secs(30));
            let again = again.await.unwrap();
            assert_eq!(again, [ClaimResult::Skip("retry not yet due")], "{n}");
        }
    }

    /// A batch that outlasts the lease (three calls of 1.5 s one at a time, leases of
    /// 3 s): the leases of the calls made are renewed until their outcomes are written, so
    /// another worker cannot claim the first record in the meantime.
    #[tokio::test(start_paused = true)]
    async fn leases_are_kept_while_a_long_batch_runs() {
        let mut f = fixture();
        f.args.stale_after = Duration::from_secs(3);
        let slow = || Answer::After(Duration::from_millis(1500), Box::new(Answer::Accept(None)));
        f.provider.answer([slow(), slow(), slow()]);
        let entries = f.entries(1..=3);
        let store = f.store.clone();
        let other = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            store.claim(&[id(1)], "other", Duration::from_secs(3)).await
        };
        let (d, other) = tokio::join!(f.deliver(entries), other);
        assert_eq!(other.unwrap(), [ClaimResult::Busy], "the lease lapsed");
        assert_eq!(d.report.ack, ["1-0", "2-0", "3-0"]);
        assert_eq!(
            [f.status(1), f.status(2), f.status(3)],
            [Status::Sent, Status::Sent, Status::Sent]
        );
    }

    /// Another worker took the lease while the call ran (this process stalled past it):
    /// the outcome write is fenced off (the record is the other worker's to record), the
    /// record is flagged `possibleDuplicate` with cause `lost_lease`, and no event is
    /// emitted for a write that was not made.
    #[tokio::test(start_paused = true)]
    async fn an_outcome_whose_lease_was_lost_is_not_written_but_flagged() {
        let f = fixture();
        let slow = Answer::After(Duration::from_secs(1), Box::new(Answer::Accept(None)));
        f.provider.answer([slow]);
        let entries = f.entries([1]);
        let store = f.store.clone();
        let take_over = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            store.hold(&id(1), "other", Duration::from_secs(30));
        };
        let (d, ()) = tokio::join!(f.deliver(entries), take_over);
        assert_eq!(d.report.ack, ["1-0"]);
        assert_ne!(f.status(1), Status::Sent, "written under another's lease");
        let flag = f.store.flagged(&id(1)).expect("flagged");
        assert_eq!((flag.attempt, flag.cause), (1, Ambiguity::LostLease));
        assert!(f.events().is_empty(), "an event for a write not made");
    }

    /// The lease of a claim waiting for its turn lapsed and another worker claimed the
    /// record: checked right before the call, it makes none, and its entry is left to
    /// that worker.
    #[tokio::test(start_paused = true)]
    async fn a_claim_whose_lease_was_taken_while_it_waited_makes_no_call() {
        let f = fixture();
        let slow = Answer::After(Duration::from_secs(1), Box::new(Answer::Accept(None)));
        f.provider.answer([slow]);
        let entries = f.entries(1..=2);
        let store = f.store.clone();
        let take_over = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            store.hold(&id(2), "other", Duration::from_secs(30));
        };
        let (d, ()) = tokio::join!(f.deliver(entries), take_over);
        let sent: Vec<String> = f
            .provider
            .sent()
            .iter()
            .map(|m| m.communication_id.clone())
            .collect();
        assert_eq!(sent, [id(1)]);
        assert_eq!(d.report.ack, ["1-0"]);
        assert!(d.report.retry.is_empty());
    }

    /// Four batches at once over the limited store, on records `first..first + 8`; every
    /// message of them is sent.
    async fn four_batches(f: &Fixture, first: u32) {
        let batches = (0..4u32).map(|k| {
            let from = first + 2 * k;
            let entries = f.entries(from..from + 2);
            let owner = format!("test:sms:{from}");
            async move { deliver(&f.args, &owner, entries).await }
        });
        futures::future::join_all(batches).await;
        for n in first..first + 8 {
            assert_eq!(f.status(n), Status::Sent, "{n}");
        }
    }

    /// Claims and outcome writes take 100 ms, and inserts of the accept path go on beside
    /// them, 5 ms each at first: four batches have four calls in flight. Then the inserts
    /// take 200 ms (the target is 50 ms): the limiter the batches share lowers the calls in
    /// flight to one; once the inserts are fast again, the limit climbs back and four are
    /// in flight again.
    #[tokio::test(start_paused = true)]
    async fn slow_inserts_get_fewer_calls_in_flight_until_they_are_fast_again() {
        use crate::adaptive::{LimiterSettings, StoreLimiter};
        use crate::limited_store::LimitedStore;
        let mut f = fixture();
        let limiter = Arc::new(StoreLimiter::new(
            "sender",
            LimiterSettings {
                target: Duration::from_millis(50),
                quiet: Duration::from_secs(1),
                min: 0.25,
                max: 4.0,
                increase: 0.5,
                decrease: 0.5,
                max_pause: Duration::from_secs(1),
            },
        ));
        f.args.store = Arc::new(LimitedStore::delivery(f.store.clone(), limiter.clone()));
        let accepts = LimitedStore::accepts(f.store.clone(), vec![limiter.clone()]);
        let script = &f.store.script;
        for m in [StoreMethod::Claim, StoreMethod::RecordOutcomes] {
            script.delay(m, Duration::from_millis(100));
        }
        let inserts_take = |ms| script.delay(StoreMethod::InsertMany, Duration::from_millis(ms));
        inserts_take(5);
        let inserting = testing::keep_inserting(Arc::new(accepts), Duration::from_millis(20));
        four_batches(&f, 0).await;
        // Store calls in flight: the batches' and the one insert.
        assert_eq!(script.peak_in_flight(), 4 + 1, "fast: not limited");
        inserts_take(200);
        four_batches(&f, 100).await;
        // Four slow inserts cut it to its floor (4 → 2 → 1 → 0.5 → 0.25).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(limiter.limit(), 0.25);
        script.reset_peak();
        four_batches(&f, 300).await;
        assert_eq!(script.peak_in_flight(), 1 + 1, "slow: one at a time");
        inserts_take(5);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(limiter.limit(), 4.0, "recovered");
        script.reset_peak();
        four_batches(&f, 400).await;
        assert_eq!(
            script.peak_in_flight(),
            4 + 1,
            "fast again: as many as before"
        );
        inserting.abort();
    }

    /// A worker claimed record 1 and died before recording anything; its lease expires.
    async fn stale(f: &Fixture) -> Vec<StreamEntry> {
        let entries = f.entries([1]);
        f.store
            .claim(
                &[testing::record(1, Channel::Sms).id],
                "dead",
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        entries
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_the_provider_has_already_is_not_sent_again() {
        let f = fixture();
        let entries = stale(&f).await;
        f.provider
            .answer_lookups([Ok(Lookup::Found(ProviderReceipt {
                provider_message_id: Some("SM-found".into()),
            }))]);
        f.deliver(entries).await;
        assert!(f.provider.sent().is_empty(), "found: not sent again");
        assert_eq!(f.provider.looked_up().len(), 1);
        let id = testing::record(1, Channel::Sms).id;
        let rec = f.store.record(&id).unwrap();
        assert_eq!(rec.status, Status::Sent);
        assert_eq!(rec.provider_message_id.as_deref(), Some("SM-found"));
        assert_eq!(f.store.flagged(&id), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_lookup_or_none_found_means_a_flagged_resend() {
        for answer in [
            Ok(Lookup::NotFound),
            Err(ProviderError {
                class: ErrorClass::Retryable { retry_after: None },
                ambiguous: None,
                rate_limited: false,
                code: Some("http-500".into()),
                message: "down".into(),
            }),
        ] {
            let f = fixture();
            let entries = stale(&f).await;
            f.provider.answer_lookups([answer]);
            f.deliver(entries).await;
            assert_eq!(f.provider.sent().len(), 1);
            let id = testing::record(1, Channel::Sms).id;
            assert_eq!(f.store.record(&id).unwrap().status, Status::Sent);
            let flag = f.store.flagged(&id).expect("flagged");
            assert_eq!((flag.attempt, flag.cause), (1, Ambiguity::StaleLease));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_attempt_left_an_unknown_outcome_is_asked_about_never_resent() {
        for (lookup, status) in [
            (
                Lookup::Found(ProviderReceipt {
                    provider_message_id: Some("SM-found".into()),
                }),
                Status::Sent,
            ),
            (Lookup::CannotTell, Status::Failed),
        ] {
            let f = fixture();
            // The last of the three attempts ended without an outcome.
            let mut r = testing::record(1, Channel::Sms);
            r.status = Status::Sending;
            r.attempts = f.args.retry.max_attempts;
            f.store.put(r.clone());
            let entry = testing::stream_entry("1-0", &r);
            f.provider.answer_lookups([Ok(lookup)]);
            f.deliver(vec![entry]).await;
            assert!(
                f.provider.sent().is_empty(),
                "no attempt left: nothing resent"
            );
            assert_eq!(f.status(1), status);
            assert_eq!(f.store.flagged(&r.id), None);
        }
    }
}
