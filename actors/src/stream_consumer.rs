//! StreamConsumer (one per channel and stream shard): reads the shard's three lanes,
//! `{sms_stream}:high`, `sms_stream` and `{sms_stream}:bulk` (or `…:{i}` of each shard),
//! through a Redis consumer group, and hands batches to the channel's SenderActor.
//!
//! Owns: a dedicated Redis connection (its blocking reads hold no one else up), each
//! lane's read position: first its own pending entries (`0`), then new ones (`>`), with a
//! periodic XAUTOCLAIM of entries left idle by dead consumers, and each lane's entries
//! read ahead (see [`crate::lanes`]): one XREADGROUP reads the lanes together (blocking
//! only when every lane is empty); the high lane's entries go first, then the normal
//! lane's, then the bulk lane's in small batches, round-robin by tenant within a lane.
//! Talks to it: itself (`Poll`); the supervisor starts and stops it.
//! Talks to: the SenderActor, looked up by name for every batch, so a restarted sender is
//! found and no stale reference is kept.
//! On failure: it acknowledges an entry only after the sender reported its outcome
//! recorded, so a crash leaves every unfinished entry (those read ahead too) pending in
//! the group; the restarted consumer (same name) reads them again first. A failed read
//! waits by the crate's [`Backoff`] (100 ms doubling to 5 s), forgets what it read ahead
//! and starts again from its own pending entries; a missing group (Redis restarted
//! empty) is made again.

use crate::backoff::{Backoff, Delays};
use crate::domain::{Channel, EventStatus, LogEvent, Priority, StreamEntry, LOG_STREAM};
use crate::health::Permit;
use crate::lanes::LaneBuffers;
use crate::ports::{DependencyError, FailResult, Queue, ReadFrom, Store};
use crate::routing::Routes;
use crate::sender::{self, SenderMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Waits between failed reads (Redis down, group gone).
const READ_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5));

/// `consumer-{channel}` for shard 0 (the only one, unless the streams are sharded), then
/// `consumer-{channel}-{shard}`.
pub fn name(channel: Channel, shard: u32) -> String {
    match shard {
        0 => format!("consumer-{channel}"),
        _ => format!("consumer-{channel}-{shard}"),
    }
}

pub enum ConsumerMsg {
    Poll,
}

#[derive(Clone)]
pub struct ConsumerArgs {
    pub channel: Channel,
    /// The shard's lanes, in reading order (`StreamShards::lanes`).
    pub lanes: [(Priority, &'static str); 3],
    pub queue: Arc<dyn Queue>,
    pub group: String,
    pub consumer: String,
    /// Entries in a batch to the sender.
    pub count: usize,
    /// Entries in a batch from the bulk lane (at most `count`).
    pub bulk_count: usize,
    /// Entries read ahead per lane, at most: the round-robin by tenant chooses among them.
    pub window: usize,
    pub block: Duration,
    /// Entries idle this long in any consumer's pending list are taken over.
    pub claim_idle: Duration,
    /// Longest wait for the sender to answer a batch.
    pub deliver_timeout: Duration,
    /// An entry delivered this often without an outcome goes to `{stream}:dlq`.
    pub max_deliveries: u64,
    pub store: Arc<dyn Store>,
    /// The channel's providers: while every one's breaker is open, nothing is read (the
    /// backlog waits in the stream instead of burning attempts); one open breaker among
    /// others only moves the sender's calls to the next provider.
    pub routes: Arc<Routes>,
}

impl ConsumerArgs {
    /// The normal lane's stream (the seed's name), which names this consumer in logs.
    fn stream(&self) -> &'static str {
        self.lane_stream(Priority::Normal)
    }

    fn lane_stream(&self, lane: Priority) -> &'static str {
        self.lanes[lane.rank()].1
    }
}

/// Where one lane is read from next.
struct LaneRead {
    from: ReadFrom,
    /// Where the next XAUTOCLAIM starts in the group's pending list (`0-0`: the start).
    autoclaim_cursor: String,
}

impl LaneRead {
    fn start() -> LaneRead {
        LaneRead {
            from: ReadFrom::OwnPending("0".into()),
            autoclaim_cursor: "0-0".into(),
        }
    }
}

pub struct ConsumerState {
    args: ConsumerArgs,
    reads: [LaneRead; 3],
    last_autoclaim: Instant,
    /// Waits after failed reads, reset by a good one.
    read_errors: Delays,
    group_ready: bool,
    /// Entries read and not yet handed to the sender, per lane (pending in the group).
    ahead: LaneBuffers,
    /// Entries the sender could not take because a dependency failed: offered again from
    /// memory (not re-read, so an outage does not count as a failed delivery).
    held: Vec<(Priority, StreamEntry)>,
}

pub struct StreamConsumer;

impl Actor for StreamConsumer {
    type Msg = ConsumerMsg;
    type State = ConsumerState;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConsumerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(ConsumerMsg::Poll)?;
        Ok(ConsumerState {
            reads: [LaneRead::start(), LaneRead::start(), LaneRead::start()],
            last_autoclaim: Instant::now(),
            read_errors: READ_BACKOFF.delays(),
            group_ready: false,
            ahead: LaneBuffers::default(),
            held: Vec::new(),
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
            ConsumerMsg::Poll => {
                if let Err(err) = poll_once(state).await {
                    let stream = state.args.stream();
                    metrics::counter!("stream_read_errors_total", "stream" => stream).increment(1);
                    let backoff = state.read_errors.next_delay();
                    tracing::warn!(error = %err, stream, ?backoff, "stream read failed");
                    if err.kind == crate::ports::ErrorKind::MissingGroup {
                        // The stream or group vanished (Redis restarted empty): make it again;
                        // the outbox sweep re-queues what the lost entries carried.
                        state.group_ready = false;
                    }
                    // What was read ahead is still pending to us: read again from there.
                    state.ahead = LaneBuffers::default();
                    for r in &mut state.reads {
                        r.from = ReadFrom::OwnPending("0".into());
                    }
                    myself.send_after(backoff, || ConsumerMsg::Poll);
                } else {
                    state.read_errors.reset();
                    myself.send_message(ConsumerMsg::Poll)?;
                }
            }
        }
        Ok(())
    }
}

async fn poll_once(state: &mut ConsumerState) -> Result<(), DependencyError> {
    if !state.group_ready {
        for (_, stream) in state.args.lanes {
            state
                .args
                .queue
                .ensure_group(stream, &state.args.group)
                .await?;
        }
        state.group_ready = true;
    }
    let permit = state.args.routes.permit();
    let count = match permit {
        Permit::Allowed => state.args.count,
        Permit::Probe => 1,
        Permit::Rejected(wait) => {
            tokio::time::sleep(wait.min(state.args.block)).await;
            return Ok(());
        }
    };
    if !state.held.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        return deliver_held(state, count).await;
    }
    let probing = permit == Permit::Probe;
    if !probing && state.last_autoclaim.elapsed() >= state.args.claim_idle / 2 {
        return autoclaim_round(state, count).await;
    }
    read_ahead(state).await?;
    let bulk_count = if probing { 1 } else { state.args.bulk_count };
    // Nothing to probe with: the probe was not taken (the sender takes it with its
    // call), so the next poll may try again.
    match state.ahead.next_batch(count, bulk_count) {
        Some((lane, batch)) => deliver(state, lane, batch).await,
        None => Ok(()),
    }
}

/// Held entries of the highest lane holding any, up to `count`, offered again.
async fn deliver_held(state: &mut ConsumerState, count: usize) -> Result<(), DependencyError> {
    let lane = state
        .held
        .iter()
        .map(|(l, _)| *l)
        .min_by_key(|l| l.rank())
        .unwrap_or_default();
    let (mut batch, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut state.held)
        .into_iter()
        .partition(|(l, _)| *l == lane);
    state.held = rest;
    if batch.len() > count {
        state.held.extend(batch.split_off(count));
    }
    deliver(state, lane, batch.into_iter().map(|(_, e)| e).collect()).await
}

/// One XREADGROUP over the lanes worth reading (see [`LaneBuffers::to_read`]): blocking
/// only when nothing is read ahead, each lane from its own position.
async fn read_ahead(state: &mut ConsumerState) -> Result<(), DependencyError> {
    let a = &state.args;
    let lanes = state.ahead.to_read(a.window);
    let Some(last) = lanes.last() else {
        return Ok(());
    };
    let count = a.window.saturating_sub(state.ahead.len(*last)).max(1);
    let reads: Vec<(&str, ReadFrom)> = lanes
        .iter()
        .map(|l| (a.lane_stream(*l), state.reads[l.rank()].from.clone()))
        .collect();
    let block = if state.ahead.is_empty() {
        a.block
    } else {
        Duration::from_millis(1)
    };
    let got = a
        .queue
        .read_lanes(&reads, &a.group, &a.consumer, count, block)
        .await?;
    for (lane, entries) in lanes.into_iter().zip(got) {
        let read = &mut state.reads[lane.rank()];
        if let ReadFrom::OwnPending(_) = read.from {
            // Page through our pending list once, then switch to new entries.
            read.from = match entries.last() {
                Some(last) => ReadFrom::OwnPending(last.id.clone()),
                None => ReadFrom::New,
            };
        }
        let buffer = state.ahead.lane(lane);
        entries.into_iter().for_each(|e| buffer.push(e));
    }
    Ok(())
}

/// Each lane in turn: dead-letter what is over its deliveries, then take over a page of
/// entries idle in any consumer's pending list and deliver them one at a time.
async fn autoclaim_round(state: &mut ConsumerState, count: usize) -> Result<(), DependencyError> {
    state.last_autoclaim = Instant::now();
    for lane in Priority::ALL {
        autoclaim_lane(state, lane, count).await?;
    }
    Ok(())
}

async fn autoclaim_lane(
    state: &mut ConsumerState,
    lane: Priority,
    count: usize,
) -> Result<(), DependencyError> {
    let stream = state.args.lane_stream(lane);
    dead_letter(state, stream).await?;
    let a = &state.args;
    let (next, taken) = a
        .queue
        .autoclaim_from(
            stream,
            &a.group,
            &a.consumer,
            a.claim_idle,
            &state.reads[lane.rank()].autoclaim_cursor,
            count,
        )
        .await?;
    // Page on through the pending list next time, so that idle entries behind many
    // live ones are reached too; `0-0` once the whole list was looked at.
    state.reads[lane.rank()].autoclaim_cursor = next;
    // Our own entries read ahead that waited behind a busy higher lane this long go now,
    // from here (the lanes' order yields to them: no entry waits much past `claim_idle`).
    let ids: Vec<&str> = taken.iter().map(|e| e.id.as_str()).collect();
    state.ahead.forget(&ids);
    if !taken.is_empty() {
        tracing::info!(stream, n = taken.len(), "took over idle entries");
        metrics::counter!("stream_autoclaimed_total", "stream" => stream)
            .increment(taken.len() as u64);
    }
    // These failed before (or their consumer died): one at a time, so that one poison
    // entry cannot hold the others back. Every one is kept: should a delivery fail,
    // those not yet offered are held and offered again.
    let mut taken = taken.into_iter();
    while let Some(e) = taken.next() {
        if let Err(err) = deliver(state, lane, vec![e]).await {
            state.held.extend(taken.map(|e| (lane, e)));
            return Err(err);
        }
    }
    Ok(())
}

/// Entries delivered `max_deliveries` times without an outcome: kept in `{stream}:dlq`
/// with the reason, their records marked `failed` (with a `failed` log event, so search
/// follows), then acknowledged. An entry whose record another worker holds the lease of is
/// left pending: that worker records the outcome.
async fn dead_letter(
    state: &mut ConsumerState,
    stream: &'static str,
) -> Result<(), DependencyError> {
    let a = &state.args;
    let over: Vec<(String, u64)> = a
        .queue
        .pending_deliveries(stream, &a.group, a.claim_idle, a.count)
        .await?
        .into_iter()
        .filter(|(_, n)| *n >= a.max_deliveries)
        .collect();
    if over.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = over.iter().map(|(id, _)| id.clone()).collect();
    let entries = a.queue.range(stream, &ids).await?;
    let dlq = format!("{stream}:dlq");
    for (id, n) in &over {
        let reason = format!("dead-lettered after {n} deliveries without an outcome");
        let fields: Vec<(&str, String)> = match entries.iter().find(|e| &e.id == id) {
            Some(e) => e
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect(),
            None => Vec::new(),
        };
        let record = fields
            .iter()
            .find(|(k, _)| *k == "_id")
            .map(|(_, v)| v.clone());
        let failed = match &record {
            Some(rid) => a.store.fail(rid, &reason).await?,
            None => FailResult::Failed,
        };
        if failed == FailResult::Leased {
            // Another worker holds the record's lease (its provider call may be under
            // way): it records the outcome; the entry stays pending until then.
            tracing::info!(stream, entry = %id, "dead-lettering waits for the record's lease");
            continue;
        }
        if failed == FailResult::Failed {
            let mut dl = fields.clone();
            dl.push(("deadLetterReason", reason.clone()));
            dl.push(("sourceEntry", id.clone()));
            let mut appends = vec![(dlq.as_str(), dl)];
            // The record's `failed` reaches search as every other outcome does.
            if let Some(ev) = failed_event(a, record.as_deref(), &reason).await? {
                appends.push((LOG_STREAM, ev.to_fields()));
            }
            a.queue.append(&appends).await?;
        }
        // Otherwise the record is already final (a second entry for it): just let it go.
        a.queue
            .ack(stream, &a.group, std::slice::from_ref(id))
            .await?;
        tracing::error!(stream, entry = %id, deliveries = n, "entry dead-lettered");
        metrics::counter!("dead_lettered_total", "stream" => stream).increment(1);
    }
    Ok(())
}

/// The `failed` log event of a record just dead-lettered (read back for its fields).
async fn failed_event(
    a: &ConsumerArgs,
    record: Option<&str>,
    reason: &str,
) -> Result<Option<LogEvent>, DependencyError> {
    let Some(rid) = record else {
        return Ok(None);
    };
    let Some(rec) = a.store.get(rid).await? else {
        return Ok(None);
    };
    let mut ev = LogEvent::for_record(
        &rec,
        "dead-letter",
        EventStatus::Failed,
        rec.attempts,
        chrono::Utc::now(),
    );
    ev.error = Some(reason.to_string());
    Ok(Some(ev))
}

async fn deliver(
    state: &mut ConsumerState,
    lane: Priority,
    entries: Vec<StreamEntry>,
) -> Result<(), DependencyError> {
    let a = &state.args;
    let stream = a.lane_stream(lane);
    let Some(sender) = ActorRef::<SenderMsg>::where_is(sender::name(a.channel)) else {
        // The sender is being restarted (perhaps by one of these entries): they stay
        // pending and are taken over one at a time when idle, so a poison entry is found.
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Ok(());
    };
    let n = entries.len();
    let report = match sender
        .call(
            |reply| SenderMsg::Deliver(entries.clone(), reply),
            Some(a.deliver_timeout),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        Ok(ractor::rpc::CallResult::Timeout) => {
            tracing::warn!(stream, n, "sender timed out; entries stay pending");
            return Ok(());
        }
        _ => {
            // The sender died with the batch: its entries stay pending and are taken over
            // (one by one) once idle, so a poison entry is found and dead-lettered.
            tracing::warn!(stream, n, "sender failed; entries stay pending");
            return Ok(());
        }
    };
    metrics::counter!("lane_entries_delivered_total", "channel" => a.channel.as_str(), "lane" => lane.as_str())
        .increment(n as u64);
    if !report.ack.is_empty() {
        a.queue.ack(stream, &a.group, &report.ack).await?;
    }
    if !report.retry.is_empty() {
        // Added to what is held already (other batches' entries, the rest of the held
        // list offered in parts): none is dropped.
        state.held.extend(
            entries
                .into_iter()
                .filter(|e| report.retry.contains(&e.id))
                .map(|e| (lane, e)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::consumer::{
        append_records as append, batches_after, read_new, start_consumer, Batches, SenderAnswer,
        GROUP,
    };
    use crate::testing::{MemoryQueue, QueueMethod};

    /// A consumer whose stand-in sender acknowledges every entry.
    async fn start(channel: Channel, queue: &MemoryQueue, consumer: &str) -> Batches {
        start_consumer(channel, queue, consumer, SenderAnswer::AckAll).await
    }

    #[tokio::test(start_paused = true)]
    async fn its_own_pending_entries_come_first_after_a_start() {
        let ch = Channel::Email;
        let q = MemoryQueue::new();
        q.ensure_group(ch.stream(), GROUP).await.unwrap();
        append(&q, ch, 1..=3).await;
        // Read before a crash: pending for "c1", never acknowledged.
        let before = read_new(&q, ch, "c1", 10).await;
        append(&q, ch, 4..=5).await;
        let batches = batches_after(&start(ch, &q, "c1").await, 2).await;
        let ids = |v: &[StreamEntry]| v.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(batches[0], ids(&before));
        assert_eq!(batches[1], ["4-0", "5-0"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(q.pending(ch.stream(), GROUP).is_empty(), "all acknowledged");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_of_a_dead_consumer_are_handed_over_one_at_a_time() {
        let ch = Channel::Sms;
        let q = MemoryQueue::new();
        q.ensure_group(ch.stream(), GROUP).await.unwrap();
        append(&q, ch, 1..=3).await;
        read_new(&q, ch, "dead", 10).await;
        let batches = batches_after(&start(ch, &q, "c2").await, 3).await;
        assert_eq!(batches, [["1-0"], ["2-0"], ["3-0"]]);
        assert!(q.pending(ch.stream(), GROUP).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_group_is_made_again() {
        let ch = Channel::Whatsapp;
        let q = MemoryQueue::new();
        let batches = start(ch, &q, "c3").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // One group per lane.
        assert_eq!(q.script().count(QueueMethod::EnsureGroup), 3);
        // Redis restarted empty: the stream and its group are gone.
        q.flush_all();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(q.script().count(QueueMethod::EnsureGroup), 6);
        append(&q, ch, 1..=1).await;
        assert_eq!(batches_after(&batches, 1).await, [["1-0"]]);
    }
}
