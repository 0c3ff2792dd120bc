//! LogIndexer: reads `log_stream` through a consumer group and bulk-writes Elasticsearch:
//! every event to `communication-logs`, and the record's current status to `communications`.
//!
//! Events carry bodies up to `LOG_EVENT_BODY_MAX` bytes; a longer one is read from MongoDB
//! at the flush (one read a batch). `log_stream` is bounded (`LOG_STREAM_MAX_LEN`): an
//! event that found it full was not appended and its record was marked in Redis; every
//! `max_wait`, with nothing else to write, a batch of marked records is indexed from
//! MongoDB as they are now, and their marks dropped once stored.
//!
//! A record's `communications` document in a state about to change (`queued`, `sent`) is
//! held up to `hold` for the version that replaces it, which goes instead: one write where
//! there were two or three (the log documents go at once). A log document carries the
//! message's body and lane only for the event that accepts it ([`CONTENT_FIELDS`]), no
//! `createdAt` ([`RECORD_ONLY_FIELDS`]) and no attempt of 0 ([`attempt_left_out`]); the
//! record's document always carries the whole record, with its `timestamp` (no
//! `updatedAt`, always the same time: search answers it).
//!
//! Owns: a dedicated Redis connection and the buffer of events not yet stored (bounded by
//! the batch's `max_items` and `max_bytes`; while it is full, nothing more is read, so an
//! Elasticsearch outage leaves the backlog in Redis, not in memory), plus at most two
//! batches' worth of held documents.
//! Talks to it: itself (`Poll`); the supervisor starts and stops it (stopping flushes the
//! buffer and what `log_stream` still holds for it; a blocking read lasts at most 1 s, so
//! a stop is never held up by a long `max_wait`).
//! Talks to: Elasticsearch (`_bulk`), Redis (read, XACK, dead letters to `log_stream:dlq`).
//! On failure: entries are acknowledged only after their documents are stored or
//! dead-lettered (a held document's entry too); a crash leaves the rest pending, read again first after a restart under
//! the same name, and taken over (XAUTOCLAIM) by any live indexer once idle `claim_idle`
//! when the process comes back under another name (a container redeploy). Each indexer
//! marks itself alive in Redis; a consumer whose mark lapsed and that holds nothing is
//! removed from the group (never this process's own), so `log_stream` is trimmed again.
//! Document ids are deterministic, so writing an event twice duplicates nothing. A failed
//! step waits by a full-jitter backoff (200 ms doubling to 5 s, at least 50 ms); the
//! indices are made again after an Elasticsearch failure, the group after a missing one.
//! A flush is three stages: one `_bulk` request read item by item, dead letters stored,
//! then what settled acknowledged and the rest kept (only its unfinished operations).

use crate::backoff::{Backoff, Delays};
use crate::batch::BatchSettings;
use crate::domain::{
    Channel, Communication, EventStatus, LogEvent, Status, StreamEntry, LOG_DEAD_LETTER_STREAM,
    LOG_STREAM,
};
use crate::ports::{
    BulkAction, BulkOp, Dependency, DependencyError, Doc, ErrorKind, ItemResult, Queue, ReadFrom,
    SearchSink, Store,
};
use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub const NAME: &str = "log-indexer";

/// Waits after a failed step: full jitter, so restarted peers do not retry in step...
const STEP_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(200), Duration::from_secs(5)).with_full_jitter();
/// ...but never so short that a down Elasticsearch is asked in a tight loop.
const STEP_BACKOFF_FLOOR: Duration = Duration::from_millis(50);
/// The longest blocking read: a stop is handled between steps, so it waits at most this
/// long, however long `max_wait` is.
const READ_BLOCK_MAX: Duration = Duration::from_secs(1);
/// On stop, at most this many more reads of what `log_stream` holds for this consumer.
const STOP_ROUNDS: usize = 100;
/// At most this many batches' worth (`max_items`) of documents are held back at once
/// (about 2 KB each); beyond it the oldest are written.
const HELD_MAX_BATCHES: usize = 2;

pub enum IndexerMsg {
    Poll,
}

#[derive(Clone)]
pub struct IndexerArgs {
    pub queue: Arc<dyn Queue>,
    /// Where bodies left out of events, and records whose events overflowed a full
    /// `log_stream`, are read.
    pub store: Arc<dyn Store>,
    pub search: Arc<dyn SearchSink>,
    pub group: String,
    pub consumer: String,
    pub logs_index: String,
    pub communications_index: String,
    /// Bulk request limits: documents (`max_items`), bytes and time.
    pub batch: BatchSettings,
    /// Entries idle this long in any consumer's pending list (a dead process's, whatever
    /// its name) are taken over.
    pub claim_idle: Duration,
    /// A consumer of `log_stream` not marked alive for this long, with nothing pending, is
    /// gone: it is removed from the group. This process marks itself alive well within it.
    pub forget_after: Duration,
    /// How long a record's `communications` document in a state that is about to change
    /// (`queued`, `sent`) waits for the version that replaces it (0: written at once).
    pub hold: Duration,
}

struct Pending {
    entry_id: String,
    fields: Vec<(String, String)>,
    ops: Vec<BulkOp>,
    bytes: usize,
    /// An event whose body was left out of the entry: its operations are made once the
    /// body is read from MongoDB, at the flush.
    awaiting_body: Option<LogEvent>,
    /// When it was read (its hold counts from here).
    buffered_at: Instant,
    /// Its status is about to change (`queued`, `sent`): its `communications` document
    /// may be held back for the version that replaces it.
    changing: bool,
    /// All that is left of it is a held document: it takes no room in the batch.
    held: bool,
}

pub struct IndexerState {
    args: IndexerArgs,
    from: ReadFrom,
    buf: Vec<Pending>,
    buf_bytes: usize,
    first_at: Option<Instant>,
    /// Waits after failed steps, reset by a good one.
    failures: Delays,
    prepared: bool,
    group_ready: bool,
    /// When this consumer last marked itself alive.
    alive_at: Option<Instant>,
    /// When idle entries were last taken over (and gone consumers removed).
    takeover_at: Option<Instant>,
    /// When records marked by a full `log_stream` were last indexed from MongoDB.
    reindex_at: Option<Instant>,
    /// Whether documents are held back (not while stopping).
    holding: bool,
}

pub struct LogIndexer;

impl Actor for LogIndexer {
    type Msg = IndexerMsg;
    type State = IndexerState;
    type Arguments = IndexerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: IndexerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(IndexerMsg::Poll)?;
        Ok(IndexerState {
            args,
            from: ReadFrom::OwnPending("0".into()),
            buf: Vec::new(),
            buf_bytes: 0,
            first_at: None,
            failures: STEP_BACKOFF.delays(),
            prepared: false,
            group_ready: false,
            alive_at: None,
            takeover_at: None,
            reindex_at: None,
            holding: true,
        })
    }

    /// Index what is buffered and what the stream still holds for this consumer (the last
    /// senders' and receipts' events), until it is empty or a step fails; the stop's
    /// deadline bounds it. What is left stays pending, indexed after the restart.
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.holding = false;
        for _ in 0..STOP_ROUNDS {
            let Ok(read) = read(state, Duration::from_millis(1)).await else {
                break;
            };
            if state.buf.is_empty() {
                break;
            }
            if state_flush(state).await.is_err() || read == 0 {
                break;
            }
        }
        let left = state.buf.len();
        if left > 0 {
            tracing::warn!(
                left,
                "log events not indexed at stop; pending in log_stream"
            );
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match step(state).await {
            Ok(()) => {
                state.failures.reset();
                myself.send_message(IndexerMsg::Poll)?;
            }
            Err(err) => {
                let backoff = state.failures.next_delay().max(STEP_BACKOFF_FLOOR);
                tracing::warn!(error = %err, ?backoff, buffered = state.buf.len(), "log indexing delayed");
                if err.kind == ErrorKind::MissingGroup {
                    state.group_ready = false;
                    state.from = ReadFrom::OwnPending("0".into());
                }
                myself.send_after(backoff, || IndexerMsg::Poll);
            }
        }
        Ok(())
    }
}

async fn step(state: &mut IndexerState) -> Result<(), DependencyError> {
    let a = state.args.clone();
    let block = match state.first_at {
        Some(t) => a.batch.max_wait.saturating_sub(t.elapsed()),
        None => a.batch.max_wait,
    }
    .clamp(Duration::from_millis(1), READ_BLOCK_MAX);
    read(state, block).await?;
    let due = a.batch.is_full(unheld(state), state.buf_bytes)
        || state
            .first_at
            .is_some_and(|t| t.elapsed() >= a.batch.max_wait);
    if due && !state.buf.is_empty() {
        state_flush(state).await?;
    }
    if unheld(state) == 0 {
        reindex(state).await?;
    }
    Ok(())
}

/// Buffered events that take room in the batch: all but those of which only a held
/// document is left (at most `HELD_MAX_BATCHES` batches' worth).
fn unheld(state: &IndexerState) -> usize {
    state.buf.iter().filter(|p| !p.held).count()
}

/// Flush the buffer, making the indices first if needed.
async fn state_flush(state: &mut IndexerState) -> Result<(), DependencyError> {
    if !state.prepared {
        state.args.search.prepare().await?;
        state.prepared = true;
    }
    if let Err(e) = flush(state).await {
        if e.dependency == Dependency::Elasticsearch {
            state.prepared = false;
        }
        return Err(e);
    }
    Ok(())
}

/// Read into the buffer what fits, waiting up to `block`; answers how many were read.
async fn read(state: &mut IndexerState, block: Duration) -> Result<usize, DependencyError> {
    let a = state.args.clone();
    if !state.group_ready {
        a.queue.ensure_group(LOG_STREAM, &a.group).await?;
        state.group_ready = true;
    }
    keep_alive(state).await?;
    // Only once this consumer's own pending entries are read again: taken over first,
    // they would be read twice.
    if state.from == ReadFrom::New && !a.batch.is_full(unheld(state), state.buf_bytes) {
        take_over(state).await?;
    }
    let mut n = 0;
    if !a.batch.is_full(unheld(state), state.buf_bytes) {
        let entries = a
            .queue
            .read_group(
                LOG_STREAM,
                &a.group,
                &a.consumer,
                state.from.clone(),
                a.batch.max_items.saturating_sub(unheld(state)),
                block,
            )
            .await?;
        if let ReadFrom::OwnPending(_) = state.from {
            state.from = match entries.last() {
                Some(last) => ReadFrom::OwnPending(last.id.clone()),
                None => ReadFrom::New,
            };
        }
        n = entries.len();
        buffer(state, entries);
    }
    Ok(n)
}

/// Records whose events found `log_stream` full are marked in Redis: index a batch of them
/// from MongoDB, once a `max_wait`, when nothing else waits to be written. A mark goes once
/// its documents are stored (or refused for good, counted as failed items).
async fn reindex(state: &mut IndexerState) -> Result<(), DependencyError> {
    let a = state.args.clone();
    if state
        .reindex_at
        .is_some_and(|t| t.elapsed() < a.batch.max_wait)
    {
        return Ok(());
    }
    state.reindex_at = Some(Instant::now());
    let ids = a.queue.overflowed(LOG_STREAM, REINDEX_BATCH).await?;
    if ids.is_empty() {
        return Ok(());
    }
    let records = a.store.records(&ids).await?;
    let events: Vec<Vec<BulkOp>> = records
        .iter()
        .map(|r| ops_for(&record_event(r), &a.logs_index, &a.communications_index))
        .collect();
    let (ops, owner, _) = newest_ops(events.iter().map(Vec::as_slice));
    if !ops.is_empty() {
        if !state.prepared {
            a.search.prepare().await?;
            state.prepared = true;
        }
        let results = a.search.bulk(&ops).await.inspect_err(|_| {
            state.prepared = false;
        })?;
        let (retry, _) = settle(&ops, &owner, &results, records.len());
        let left: Vec<&String> = records
            .iter()
            .zip(&retry)
            .filter(|(_, r)| !r.is_empty())
            .map(|(rec, _)| &rec.id)
            .collect();
        let done: Vec<String> = ids.into_iter().filter(|id| !left.contains(&id)).collect();
        metrics::counter!("log_events_reindexed_total").increment(done.len() as u64);
        return a.queue.forget_overflowed(LOG_STREAM, &done).await;
    }
    // None of them is a record any more (voided): nothing to index.
    a.queue.forget_overflowed(LOG_STREAM, &ids).await
}

/// Records indexed again from MongoDB a batch.
const REINDEX_BATCH: usize = 200;

/// The event that leaves a record's documents as MongoDB has the record now.
pub fn record_event(r: &Communication) -> LogEvent {
    let (status, attempt) = match r.status {
        Status::Pending | Status::Sending if r.attempts == 0 => (EventStatus::Queued, 0),
        Status::Pending | Status::Sending => (EventStatus::Retrying, r.attempts),
        Status::Sent => (EventStatus::Sent, r.attempts),
        Status::Failed => (EventStatus::Failed, r.attempts),
        Status::Delivered => (EventStatus::Delivered, r.attempts),
        Status::Undelivered => (EventStatus::Undelivered, r.attempts),
        Status::Read => (EventStatus::Read, r.attempts),
        Status::Scheduled => (EventStatus::Scheduled, 0),
        Status::Canceled => (EventStatus::Canceled, r.attempts),
        Status::Suppressed => (EventStatus::Suppressed, r.attempts),
    };
    let mut ev = LogEvent::for_record(r, "reindex", status, attempt, r.updated_at);
    ev.provider = r.provider.clone();
    ev.provider_message_id = r.provider_message_id.clone();
    ev.error = r.last_error.clone().filter(|_| attempt > 0);
    ev
}

/// Make the operations of events whose body was left out, reading the bodies from MongoDB
/// in one request (a record gone since is indexed with an empty body).
async fn fill_bodies(a: &IndexerArgs, buf: &mut [Pending]) -> Result<(), DependencyError> {
    let ids: Vec<String> = buf
        .iter()
        .filter_map(|p| p.awaiting_body.as_ref())
        .map(|ev| ev.communication_id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let records = a.store.records(&ids).await?;
    for p in buf.iter_mut() {
        if let Some(mut ev) = p.awaiting_body.take() {
            if let Some(r) = records.iter().find(|r| r.id == ev.communication_id) {
                ev.msg = r.msg.clone();
            }
            p.ops = ops_for(&ev, &a.logs_index, &a.communications_index);
        }
    }
    Ok(())
}

fn buffer(state: &mut IndexerState, entries: Vec<StreamEntry>) {
    for e in entries {
        let p = to_pending(&state.args, e);
        state.buf_bytes += p.bytes;
        state.buf.push(p);
        state.first_at.get_or_insert_with(Instant::now);
    }
}

/// Mark this consumer alive, four times within `forget_after`, so no peer removes it.
async fn keep_alive(state: &mut IndexerState) -> Result<(), DependencyError> {
    let a = &state.args;
    if state
        .alive_at
        .is_some_and(|t| t.elapsed() < a.forget_after / 4)
    {
        return Ok(());
    }
    a.queue
        .keep_alive(LOG_STREAM, &a.group, &a.consumer, a.forget_after)
        .await?;
    state.alive_at = Some(Instant::now());
    Ok(())
}

/// Every `claim_idle / 2`: take over entries idle in any consumer's pending list (a
/// process that died, under a name nobody will use again), then remove the consumers that
/// are gone and hold nothing. Entries already in the buffer are not buffered twice.
async fn take_over(state: &mut IndexerState) -> Result<(), DependencyError> {
    let a = state.args.clone();
    if state
        .takeover_at
        .is_some_and(|t| t.elapsed() < a.claim_idle / 2)
    {
        return Ok(());
    }
    state.takeover_at = Some(Instant::now());
    let room = a.batch.max_items.saturating_sub(unheld(state));
    let taken = a
        .queue
        .autoclaim(LOG_STREAM, &a.group, &a.consumer, a.claim_idle, room)
        .await?;
    let fresh: Vec<StreamEntry> = taken
        .into_iter()
        .filter(|e| !state.buf.iter().any(|p| p.entry_id == e.id))
        .collect();
    if !fresh.is_empty() {
        tracing::info!(n = fresh.len(), "took over idle log events");
        metrics::counter!("stream_autoclaimed_total", "stream" => LOG_STREAM)
            .increment(fresh.len() as u64);
        buffer(state, fresh);
    }
    let gone = a
        .queue
        .forget_gone_consumers(LOG_STREAM, &a.group, &a.consumer, a.forget_after)
        .await?;
    if !gone.is_empty() {
        tracing::info!(?gone, "removed log_stream consumers that are gone");
        metrics::counter!("stream_consumers_removed_total", "stream" => LOG_STREAM)
            .increment(gone.len() as u64);
    }
    Ok(())
}

/// Order of a record's states, for the `communications` document's external version:
/// attempt first, then how far that attempt got.
pub fn state_version(status: EventStatus, attempt: u32) -> u64 {
    attempt as u64 * 10 + status.rank() + 1
}

/// A record's document in the `communications` index as one event leaves it: the seed's
/// model, with the record's current state (`status`, `attempts`, provider details) over
/// it. Its `timestamp` is when it last changed; there is no `updatedAt` beside it (always
/// the same time, and a date costs osmem about four times a keyword): search answers
/// `updatedAt` from `timestamp`. Serialised straight from the event's fields.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CommunicationDoc<'a> {
    tenant: &'a str,
    communication_id: &'a str,
    from: &'a str,
    to: &'a str,
    msg: &'a str,
    #[serde(rename = "type")]
    channel: Channel,
    stream: &'static str,
    timestamp: DateTime<Utc>,
    created_at: DateTime<Utc>,
    status: &'static str,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
}

impl<'a> CommunicationDoc<'a> {
    fn of(ev: &'a LogEvent) -> CommunicationDoc<'a> {
        CommunicationDoc {
            tenant: &ev.tenant,
            communication_id: &ev.communication_id,
            from: &ev.from,
            to: &ev.to,
            msg: &ev.msg,
            channel: ev.channel,
            stream: ev.channel.stream(),
            timestamp: ev.timestamp,
            created_at: ev.created_at,
            status: ev.status.record_status().as_str(),
            attempts: ev.attempt,
            provider: ev.provider.as_deref(),
            provider_message_id: ev.provider_message_id.as_deref(),
            batch_id: ev.batch_id.as_deref(),
            priority: ev.priority.map(crate::domain::Priority::as_str),
            last_error: ev.error.as_deref(),
        }
    }
}

/// The two documents one event becomes: the event itself in the logs index, and the
/// record's current state in the communications index.
pub fn ops_for(ev: &LogEvent, logs_index: &str, communications_index: &str) -> Vec<BulkOp> {
    // The record's current state, versioned by how far along it is: a `delivered` that
    // overtook its `sent` in the stream is not undone by it.
    let comm_op = BulkOp {
        index: communications_index.to_string(),
        id: ev.communication_id.clone(),
        action: BulkAction::IndexVersioned {
            version: state_version(ev.status, ev.attempt),
        },
        doc: Doc::json(&CommunicationDoc::of(ev)),
    };
    vec![
        BulkOp {
            index: logs_index.to_string(),
            id: ev.log_doc_id(),
            action: BulkAction::Create,
            doc: log_doc(ev),
        },
        comm_op,
    ]
}

/// What a message says and in which lane it was accepted: on the event that accepts it
/// (`queued`, or `scheduled` first), not again on the events that follow it. The record's
/// `communications` document and that first log document hold them; each later log
/// document names the record by `communicationId`. Elasticsearch's cost of a document
/// grows with its fields, the analysed body most (README, "Log documents without the
/// body": `scripts/es-doc-costs.py`).
pub const CONTENT_FIELDS: [&str; 2] = ["msg", "priority"];

/// What no log document carries: when the record was accepted is the record's
/// (`communications` has it), and the accepting event's own `timestamp` is that time to
/// the group commit's milliseconds. A date costs osmem about four times a keyword
/// (README, "Dates said once").
pub const RECORD_ONLY_FIELDS: [&str; 1] = ["createdAt"];

/// Whether an event's log document leaves out its `attempt`: when it is 0 (the accepting
/// events: `queued`, `scheduled`, and any before a first attempt), which every reader takes
/// a missing `attempt` to be (the timeline sorts and answers it as 0, the status stream's
/// resume reads it as 0, the Kibana histogram counts it in 0). A number costs osmem about
/// four times a keyword (README, "Dates said once").
pub fn attempt_left_out(attempt: u32) -> bool {
    attempt == 0
}

/// Whether `status`'s log document carries [`CONTENT_FIELDS`].
pub fn logs_content(status: EventStatus) -> bool {
    matches!(status, EventStatus::Queued | EventStatus::Scheduled)
}

/// The `communication-logs` document: the event (without [`CONTENT_FIELDS`] after the
/// accepting one, never with [`RECORD_ONLY_FIELDS`], without an attempt of 0: see
/// [`attempt_left_out`]), with its cursor's number (`cursorSeq`, as zero-padded text:
/// [`crate::event_fanout::cursor_seq_text`]) when it came from `log_stream`, for the live
/// subscribers' resume queries.
fn log_doc(ev: &LogEvent) -> Doc {
    let content = logs_content(ev.status);
    Doc::json(&LogDoc {
        tenant: &ev.tenant,
        service: &ev.service,
        status: ev.status,
        from: &ev.from,
        to: &ev.to,
        msg: content.then_some(ev.msg.as_str()),
        error: ev.error.as_deref(),
        communication_id: &ev.communication_id,
        timestamp: &ev.timestamp,
        channel: ev.channel,
        attempt: (!attempt_left_out(ev.attempt)).then_some(ev.attempt),
        provider: ev.provider.as_deref(),
        provider_message_id: ev.provider_message_id.as_deref(),
        batch_id: ev.batch_id.as_deref(),
        cursor: ev.cursor.as_deref(),
        priority: ev.priority.filter(|_| content),
        cursor_seq: ev
            .cursor
            .as_deref()
            .and_then(crate::event_fanout::cursor_seq)
            .map(crate::event_fanout::cursor_seq_text),
    })
}

/// A `communication-logs` document, borrowed from its event and written straight to JSON
/// (three a message: building each as a `serde_json::Value` and taking fields out of it
/// cost the service more than writing it). The fields and their order are [`LogEvent`]'s,
/// less what [`log_doc`] leaves out, then `cursorSeq`; `createdAt`
/// ([`RECORD_ONLY_FIELDS`]) is not among them.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LogDoc<'a> {
    tenant: &'a str,
    service: &'a str,
    status: EventStatus,
    from: &'a str,
    to: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    communication_id: &'a str,
    timestamp: &'a DateTime<Utc>,
    #[serde(rename = "type")]
    channel: Channel,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<crate::domain::Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor_seq: Option<String>,
}

fn to_pending(a: &IndexerArgs, e: StreamEntry) -> Pending {
    let bytes = e
        .fields
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        * 2
        + 64;
    let decoded = LogEvent::from_entry(&e).map(|mut ev| {
        ev.cursor = Some(e.id.clone());
        ev
    });
    let changing = decoded
        .as_ref()
        .is_ok_and(|ev| matches!(ev.status, EventStatus::Queued | EventStatus::Sent));
    let (ops, awaiting_body) = match decoded {
        Ok(ev) if ev.msg_omitted => (Vec::new(), Some(ev)),
        Ok(ev) => (ops_for(&ev, &a.logs_index, &a.communications_index), None),
        Err(why) => {
            tracing::error!(entry = %e.id, error = %why, "undecodable log event; dead-lettered");
            (Vec::new(), None)
        }
    };
    Pending {
        entry_id: e.id,
        fields: e.fields,
        ops,
        bytes,
        awaiting_body,
        buffered_at: Instant::now(),
        changing,
        held: false,
    }
}

/// Read a bulk answer item by item, per event (`owner[k]` is the event of op `k`): which
/// ops to send again (429/5xx), and which events to dead-letter with the reason (refused
/// for good). Done items (2xx, and 409 on create: it exists already) need nothing.
pub fn settle(
    ops: &[BulkOp],
    owner: &[usize],
    results: &[ItemResult],
    events: usize,
) -> (Vec<Vec<BulkOp>>, Vec<Option<String>>) {
    let mut retry = vec![Vec::new(); events];
    let mut dead = vec![None; events];
    for ((op, &i), r) in ops.iter().zip(owner).zip(results) {
        match r {
            ItemResult::Done => {}
            ItemResult::Retry(why) => {
                tracing::debug!(why, "bulk item will be retried");
                retry[i].push(op.clone());
            }
            ItemResult::Rejected(why) => {
                dead[i] = Some(format!("{}: {why}", op.index));
            }
        }
    }
    (retry, dead)
}

/// The operations of a batch of events (one list per event), each with the index of its
/// event, and how many were left out. A record's `communications` document is written
/// whole at each event, versioned by how far along the record is: of several in one
/// batch (its `queued` and `sent` usually are), only the newest is sent; the others are
/// superseded, not lost.
pub fn newest_ops<'a>(
    events: impl Iterator<Item = &'a [BulkOp]> + Clone,
) -> (Vec<BulkOp>, Vec<usize>, u64) {
    let mut newest: HashMap<(&str, &str), (u64, usize, usize)> = HashMap::new();
    for (i, ops) in events.clone().enumerate() {
        for (j, op) in ops.iter().enumerate() {
            if let BulkAction::IndexVersioned { version } = op.action {
                let e = newest
                    .entry((op.index.as_str(), op.id.as_str()))
                    .or_insert((version, i, j));
                if version >= e.0 {
                    *e = (version, i, j);
                }
            }
        }
    }
    let (mut out, mut owner, mut superseded) = (Vec::new(), Vec::new(), 0);
    for (i, ops) in events.enumerate() {
        for (j, op) in ops.iter().enumerate() {
            if let BulkAction::IndexVersioned { version } = op.action {
                if newest.get(&(op.index.as_str(), op.id.as_str())) != Some(&(version, i, j)) {
                    superseded += 1;
                    continue;
                }
            }
            out.push(op.clone());
            owner.push(i);
        }
    }
    (out, owner, superseded)
}

/// What one bulk request made of the buffered events, event by event.
struct Settlement {
    /// Operations to send again.
    left: Vec<Vec<BulkOp>>,
    /// Documents held back for the version that replaces them: not sent.
    held: Vec<Vec<BulkOp>>,
    /// Events to dead-letter, with the reason.
    dead: Vec<Option<String>>,
    /// The first request-level failure, returned once the rest is done.
    error: Option<DependencyError>,
}

/// Send the buffer; acknowledge what is stored or dead-lettered, keep the rest (only what
/// is left of it: what is to be sent again, and held documents). Returns an error when
/// anything is to be sent again.
async fn flush(state: &mut IndexerState) -> Result<(), DependencyError> {
    let a = state.args.clone();
    fill_bodies(&a, &mut state.buf).await?;
    let hold = if state.holding {
        a.hold
    } else {
        Duration::ZERO
    };
    let mut s = send_bulk(&a, &state.buf, hold).await;
    // Dead letters must be safe in Redis before their entries are acknowledged.
    let dlq_ok = match store_dead_letters(&a, &state.buf, &s.dead).await {
        Ok(()) => true,
        Err(err) => {
            s.error.get_or_insert(err);
            false
        }
    };
    let mut ack = Vec::new();
    let mut keep = Vec::new();
    let mut retrying = false;
    for (((mut p, ops_left), held), d) in std::mem::take(&mut state.buf)
        .into_iter()
        .zip(s.left)
        .zip(s.held)
        .zip(s.dead)
    {
        let dead_ok = d.is_none() || dlq_ok;
        if ops_left.is_empty() && held.is_empty() && dead_ok {
            ack.push(p.entry_id);
        } else {
            // Only what is left is sent again; a dead letter already stored stays stored.
            retrying |= !ops_left.is_empty() || !dead_ok;
            p.held = ops_left.is_empty() && dead_ok;
            p.ops = ops_left;
            p.ops.extend(held);
            keep.push(p);
        }
    }
    if !ack.is_empty() {
        if let Err(err) = a.queue.ack(LOG_STREAM, &a.group, &ack).await {
            // Documents are stored; unacknowledged entries are re-read and re-written
            // under the same ids, which duplicates nothing.
            s.error.get_or_insert(err);
        }
        metrics::counter!("log_events_indexed_total").increment(ack.len() as u64);
    }
    let held = keep.iter().filter(|p| p.held).count();
    metrics::gauge!("log_indexer_held_documents").set(held as f64);
    state.buf_bytes = keep.iter().filter(|p| !p.held).map(|p| p.bytes).sum();
    state.first_at = (!keep.is_empty()).then(Instant::now);
    state.buf = keep;
    match s.error {
        Some(e) => Err(e),
        None if retrying => Err(DependencyError::new(
            Dependency::Elasticsearch,
            "some items asked to be retried",
        )
        .with_kind(ErrorKind::ItemsToRetry)),
        None => Ok(()),
    }
}

/// Whether a buffered event's `op` waits for the version that replaces it: the record's
/// `communications` document in a state about to change (`queued`: `sent` follows;
/// `sent`: a receipt may), read less than `hold` ago. Writing it would be overwritten at
/// once (each document write costs Elasticsearch alike); holding it delays search's view
/// of that state by at most `hold` plus a batch's `max_wait`. Its entry stays unacknowledged
/// meanwhile, so a crash loses nothing: the restarted indexer reads it again.
fn held_back(a: &IndexerArgs, p: &Pending, op: &BulkOp, hold: Duration) -> bool {
    p.changing && op.index == a.communications_index && p.buffered_at.elapsed() < hold
}

/// One `_bulk` request for the buffer (the newest version of each record only, less the
/// documents held back), read item by item; an event that did not decode is dead-lettered
/// without a request.
async fn send_bulk(a: &IndexerArgs, buf: &[Pending], hold: Duration) -> Settlement {
    let started = Instant::now();
    let (newest, newest_owner, superseded) = newest_ops(buf.iter().map(|p| p.ops.as_slice()));
    metrics::counter!("log_indexer_superseded_total").increment(superseded);
    let mut s = Settlement {
        left: vec![Vec::new(); buf.len()],
        held: vec![Vec::new(); buf.len()],
        dead: buf
            .iter()
            .map(|p| {
                p.ops
                    .is_empty()
                    .then(|| "undecodable log event".to_string())
            })
            .collect(),
        error: None,
    };
    // Beyond the most that may be held, the oldest go now (the buffer is oldest first).
    let holdable: Vec<bool> = newest
        .iter()
        .zip(&newest_owner)
        .map(|(op, &i)| held_back(a, &buf[i], op, hold))
        .collect();
    let mut over = holdable
        .iter()
        .filter(|h| **h)
        .count()
        .saturating_sub(a.batch.max_items * HELD_MAX_BATCHES);
    let (mut all_ops, mut owner) = (Vec::new(), Vec::new());
    for ((op, i), holdable) in newest.into_iter().zip(newest_owner).zip(holdable) {
        if holdable && over == 0 {
            s.held[i].push(op);
        } else {
            over -= usize::from(holdable);
            all_ops.push(op);
            owner.push(i);
        }
    }
    if all_ops.is_empty() {
        return s;
    }
    metrics::histogram!("log_indexer_batch_documents").record(all_ops.len() as f64);
    match a.search.bulk(&all_ops).await {
        Ok(results) => {
            let (retry, rejected) = settle(&all_ops, &owner, &results, buf.len());
            for (i, ops) in retry.into_iter().enumerate() {
                metrics::counter!("log_indexer_item_retries_total").increment(ops.len() as u64);
                s.left[i].extend(ops);
            }
            for (i, why) in rejected.into_iter().enumerate() {
                if let Some(why) = why {
                    metrics::counter!("log_indexer_failed_items_total").increment(1);
                    s.dead[i] = Some(why);
                }
            }
        }
        Err(err) => {
            for (op, i) in all_ops.into_iter().zip(owner) {
                s.left[i].push(op);
            }
            s.error = Some(err);
        }
    }
    metrics::histogram!("log_indexer_bulk_seconds").record(started.elapsed().as_secs_f64());
    s
}

/// Keep the events refused for good in `log_stream:dlq`, with the reason.
async fn store_dead_letters(
    a: &IndexerArgs,
    buf: &[Pending],
    dead: &[Option<String>],
) -> Result<(), DependencyError> {
    let dlq: Vec<(&str, Vec<(&str, String)>)> = buf
        .iter()
        .zip(dead)
        .filter_map(|(p, d)| d.as_ref().map(|why| (p, why)))
        .map(|(p, why)| {
            let mut f: Vec<(&str, String)> = p
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            f.push(("deadLetterReason", why.clone()));
            f.push(("sourceEntry", p.entry_id.clone()));
            (LOG_DEAD_LETTER_STREAM, f)
        })
        .collect();
    if !dlq.is_empty() {
        a.queue.append(&dlq).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Communication, NewCommunication};
    use chrono::Utc;
    use serde_json::{json, Value};

    /// The two documents as `ops_for` built them before they were serialised straight
    /// from the event: `serde_json::Value` trees, merged key by key.
    fn value_tree_docs(ev: &LogEvent) -> (Value, Value) {
        let mut log_doc = serde_json::to_value(ev).unwrap_or_default();
        if !logs_content(ev.status) {
            for k in CONTENT_FIELDS {
                log_doc.as_object_mut().unwrap().remove(k);
            }
        }
        log_doc.as_object_mut().unwrap().remove("createdAt");
        if ev.attempt == 0 {
            log_doc.as_object_mut().unwrap().remove("attempt");
        }
        if let Some(seq) = ev
            .cursor
            .as_deref()
            .and_then(crate::event_fanout::cursor_seq)
        {
            log_doc["cursorSeq"] = json!(crate::event_fanout::cursor_seq_text(seq));
        }
        let status = ev.status.record_status().as_str();
        let mut current = json!({
            "communicationId": ev.communication_id,
            "status": status,
            "attempts": ev.attempt,
        });
        if let Some(p) = &ev.provider {
            current["provider"] = json!(p);
        }
        if let Some(p) = &ev.provider_message_id {
            current["providerMessageId"] = json!(p);
        }
        if let Some(b) = &ev.batch_id {
            current["batchId"] = json!(b);
        }
        if let Some(p) = ev.priority {
            current["priority"] = json!(p.as_str());
        }
        if let Some(e) = &ev.error {
            current["lastError"] = json!(e);
        }
        let mut full = json!({
            "tenant": ev.tenant,
            "communicationId": ev.communication_id,
            "from": ev.from,
            "to": ev.to,
            "msg": ev.msg,
            "type": ev.channel,
            "stream": ev.channel.stream(),
            "timestamp": ev.timestamp,
            "createdAt": ev.created_at,
        });
        for (k, v) in current.as_object().into_iter().flatten() {
            full[k] = v.clone();
        }
        (log_doc, full)
    }

    #[test]
    fn documents_are_the_json_the_value_trees_were() {
        let rec = Communication::new(
            "65f000000000000000000001".into(),
            NewCommunication {
                channel: crate::domain::Channel::Email,
                from: "a@example.com".into(),
                to: "b@example.com".into(),
                msg: "line \"one\"\n\tzwei – drei \u{1F600} \\ </script>".into(),
                subject: Some("s".into()),
            },
            Utc::now(),
        );
        let mut events = Vec::new();
        for channel in crate::domain::Channel::ALL {
            for status in EventStatus::ALL {
                let r = Communication {
                    channel,
                    ..rec.clone()
                };
                events.push(LogEvent::for_record(&r, "t", status, 2, Utc::now()));
            }
        }
        let mut full = LogEvent::for_record(&rec, "sender", EventStatus::Failed, 3, Utc::now());
        full.provider = Some("twilio".into());
        full.provider_message_id = Some("SM123".into());
        full.error = Some("21211: invalid \"To\"".into());
        full.batch_id = Some("65f0000000000000000000aa".into());
        events.push(full);
        let mut only_id = events[0].clone();
        only_id.provider_message_id = Some("x".into());
        events.push(only_id);
        let mut read_from_the_stream = events[1].clone();
        read_from_the_stream.cursor = Some("1795896097993-7".into());
        read_from_the_stream.priority = Some(crate::domain::Priority::High);
        events.push(read_from_the_stream.clone());
        read_from_the_stream.status = EventStatus::Queued;
        read_from_the_stream.attempt = 0;
        events.push(read_from_the_stream);
        for ev in &events {
            let ops = ops_for(ev, "logs", "comms");
            let (log, comm) = value_tree_docs(ev);
            assert_eq!(ops[0].doc.value(), log, "{}", ops[0].doc.as_str());
            assert_eq!(ops[1].doc.value(), comm, "{}", ops[1].doc.as_str());
            assert!(log.is_object() && comm.is_object());
        }
    }

    /// An SMS record from +15550001111 to +15557654321 saying `msg`.
    fn sms_record(msg: &str) -> Communication {
        Communication::new(
            "65f000000000000000000001".into(),
            NewCommunication {
                channel: crate::domain::Channel::Sms,
                from: "+15550001111".into(),
                to: "+15557654321".into(),
                msg: msg.into(),
                subject: None,
            },
            Utc::now(),
        )
    }

    /// The event of `rec` at `status` and `attempt`, and its two documents (log, record).
    fn docs_of(rec: &Communication, status: EventStatus, attempt: u32) -> (LogEvent, Value, Value) {
        let ev = LogEvent::for_record(rec, "t", status, attempt, Utc::now());
        let ops = ops_for(&ev, "logs", "comms");
        let (log, comm) = (ops[0].doc.value(), ops[1].doc.value());
        (ev, log, comm)
    }

    #[test]
    fn each_time_is_said_once_across_the_two_documents() {
        let rec = sms_record("Your code is 1");
        for status in EventStatus::ALL {
            let (ev, log, comm) = docs_of(&rec, status, 1);
            // When the record was accepted: its document alone.
            assert!(log.get("createdAt").is_none(), "{status:?}: {log}");
            assert_eq!(comm["createdAt"], json!(rec.created_at), "{status:?}");
            // When it last changed: the record's `timestamp`, with no `updatedAt` beside it.
            assert_eq!(log["timestamp"], json!(ev.timestamp), "{status:?}");
            assert_eq!(comm["timestamp"], json!(ev.timestamp), "{status:?}");
            assert!(comm.get("updatedAt").is_none(), "{status:?}: {comm}");
        }
    }

    #[test]
    fn an_attempt_of_0_is_left_out_of_the_log_document_and_kept_in_the_record() {
        let rec = sms_record("Your code is 1");
        for attempt in [0, 1, 3] {
            let (_, log, comm) = docs_of(&rec, EventStatus::Queued, attempt);
            match attempt {
                0 => assert!(log.get("attempt").is_none(), "{log}"),
                n => assert_eq!(log["attempt"], n, "{log}"),
            }
            assert_eq!(comm["attempts"], attempt, "{comm}");
            // Read back as the status stream's resume does (`createdAt` from `timestamp`).
            let mut log = log;
            log["createdAt"] = log["timestamp"].clone();
            let back: LogEvent = serde_json::from_value(log).unwrap();
            assert_eq!(back.attempt, attempt);
        }
    }

    #[test]
    fn the_body_is_logged_with_the_accepting_event_only() {
        let rec = sms_record("Your code is 1");
        for status in EventStatus::ALL {
            let (_, log, comm) = docs_of(&rec, status, 1);
            let accepting = matches!(status, EventStatus::Queued | EventStatus::Scheduled);
            for k in ["msg", "priority"] {
                assert_eq!(log.get(k).is_some(), accepting, "{status:?} {k}: {log}");
            }

            let named = [
                "communicationId",
                "tenant",
                "from",
                "to",
                "type",
                "status",
                "timestamp",
            ];
            for k in named {
                assert!(log.get(k).is_some(), "{status:?} lacks {k}: {log}");
            }
            // The record's document always has the whole record.
            assert_eq!(comm["msg"], "Your code is 1", "{status:?}");
        }
    }

    #[test]
    fn only_the_newest_version_of_a_record_goes_in_one_batch() {
        let rec = sms_record("hi");
        let other = Communication {
            id: "65f000000000000000000002".into(),
            ..rec.clone()
        };
        let ev = |r: &Communication, status: EventStatus| {
            ops_for(
                &LogEvent::for_record(r, "t", status, 1, Utc::now()),
                "logs",
                "comms",
            )
        };
        // Out of order on purpose: `sent` before `queued` of the same record.
        let batch = [
            ev(&rec, EventStatus::Sent),
            ev(&other, EventStatus::Queued),
            ev(&rec, EventStatus::Queued),
        ];
        let (ops, owner, superseded) = newest_ops(batch.iter().map(Vec::as_slice));
        assert_eq!(superseded, 1);
        // Every log document, and one `communications` document per record.
        assert_eq!(ops.iter().filter(|o| o.index == "logs").count(), 3);
        let comms: Vec<(&str, &BulkAction)> = ops
            .iter()
            .filter(|o| o.index == "comms")
            .map(|o| (o.id.as_str(), &o.action))
            .collect();
        assert_eq!(
            comms,
            [
                (
                    "65f000000000000000000001",
                    &BulkAction::IndexVersioned {
                        version: state_version(EventStatus::Sent, 1)
                    }
                ),
                (
                    "65f000000000000000000002",
                    &BulkAction::IndexVersioned {
                        version: state_version(EventStatus::Queued, 1)
                    }
                ),
            ]
        );
        assert_eq!(owner.len(), ops.len());
        assert!(owner.iter().all(|i| *i < 3));
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;
    use crate::domain::{Channel, Status};
    use crate::testing::{self, MemoryQueue, MemorySearch, MemoryStore, SearchMethod};
    use chrono::Utc;

    const GROUP: &str = "g";

    async fn start(queue: &MemoryQueue, search: &Arc<MemorySearch>) {
        let args = test_args(queue, Arc::new(MemoryStore::new()), search);
        Actor::spawn(None, LogIndexer, args).await.unwrap();
    }

    /// A LogIndexer `i1` of group `g`, bulks of 100 or every 10 ms.
    fn test_args(
        queue: &MemoryQueue,
        store: Arc<MemoryStore>,
        search: &Arc<MemorySearch>,
    ) -> IndexerArgs {
        IndexerArgs {
            queue: Arc::new(queue.clone()),
            store,
            search: search.clone(),
            group: GROUP.into(),
            consumer: "i1".into(),
            logs_index: "logs".into(),
            communications_index: "comms".into(),
            batch: BatchSettings::new(100, Duration::from_millis(10)),
            claim_idle: Duration::from_secs(2),
            forget_after: Duration::from_secs(3),
            hold: Duration::ZERO,
        }
    }

    async fn append_events(queue: &MemoryQueue, ns: std::ops::RangeInclusive<u32>) {
        for n in ns {
            append_status(queue, n, EventStatus::Queued, 0).await;
        }
    }

    async fn settled(queue: &MemoryQueue) {
        for _ in 0..1000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let read = !queue.entries(LOG_STREAM).is_empty()
                && queue.script().count(crate::testing::QueueMethod::Ack) > 0;
            if read && queue.pending(LOG_STREAM, GROUP).is_empty() {
                return;
            }
        }
        panic!("log events still pending");
    }

    #[tokio::test(start_paused = true)]
    async fn events_go_in_one_bulk_and_refusals_to_the_dead_letters() {
        let (queue, search) = (MemoryQueue::new(), Arc::new(MemorySearch::new()));
        queue.ensure_group(LOG_STREAM, GROUP).await.unwrap();
        append_events(&queue, 1..=3).await;
        queue
            .append(&[(LOG_STREAM, vec![("status", "garbage".to_string())])])
            .await
            .unwrap();
        // The first record's log document is refused for good.
        search.answer_next_bulk(vec![ItemResult::Rejected("mapping".into())]);
        start(&queue, &search).await;
        settled(&queue).await;
        assert_eq!(search.script.sizes(SearchMethod::Bulk), [6]);
        let dead = queue.entries(LOG_DEAD_LETTER_STREAM);
        let reasons: Vec<&str> = dead
            .iter()
            .filter_map(|e| e.field("deadLetterReason"))
            .collect();
        assert_eq!(reasons, ["logs: mapping", "undecodable log event"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_consumers_events_are_taken_over_and_only_it_is_forgotten() {
        let (queue, search) = (MemoryQueue::new(), Arc::new(MemorySearch::new()));
        queue.ensure_group(LOG_STREAM, GROUP).await.unwrap();
        append_events(&queue, 1..=3).await;
        // Read by a process that died before indexing them, under a name nobody uses again.
        let held = queue
            .read_group(LOG_STREAM, GROUP, "dead", ReadFrom::New, 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(held.len(), 3);
        // A live peer, quiet (nothing pending, nothing read for long), but marked alive.
        queue
            .read_group(LOG_STREAM, GROUP, "peer", ReadFrom::New, 10, Duration::ZERO)
            .await
            .unwrap();
        queue
            .keep_alive(LOG_STREAM, GROUP, "peer", Duration::from_secs(3600))
            .await
            .unwrap();
        start(&queue, &search).await;
        settled(&queue).await;
        let logged: Vec<String> = search
            .bulks()
            .concat()
            .into_iter()
            .filter(|op| op.index == "logs")
            .map(|op| op.id)
            .collect();
        assert_eq!(logged.len(), 3, "every event of the dead consumer indexed");
        for _ in 0..1000 {
            if queue.consumers(LOG_STREAM, GROUP) == ["i1", "peer"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The dead one is gone; this process's own consumer and the live peer stay, however
        // long they have been idle.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(queue.consumers(LOG_STREAM, GROUP), ["i1", "peer"]);
    }

    #[tokio::test(start_paused = true)]
    async fn long_bodies_come_from_the_store_and_overflowed_records_are_indexed_again() {
        let (queue, search) = (MemoryQueue::new(), Arc::new(MemorySearch::new()));
        let store = Arc::new(MemoryStore::new());
        queue.ensure_group(LOG_STREAM, GROUP).await.unwrap();
        // An email whose body is too long for the stream entry.
        let mut long = testing::record(1, Channel::Email);
        long.msg = "x".repeat(crate::domain::LOG_EVENT_BODY_MAX + 1);
        store.put(long.clone());
        let ev = LogEvent::for_record(&long, "router", EventStatus::Queued, 0, Utc::now());
        let fields = ev.to_fields();
        assert!(fields.iter().any(|(k, v)| *k == "msg" && v.is_empty()));
        queue.append(&[(LOG_STREAM, fields)]).await.unwrap();
        // A record whose event found the stream full: sent, marked, never appended.
        let mut over = testing::record(2, Channel::Sms);
        over.status = Status::Sent;
        over.attempts = 1;
        store.put(over.clone());
        queue.mark_overflowed(LOG_STREAM, &over.id);
        let args = test_args(&queue, store, &search);
        Actor::spawn(None, LogIndexer, args).await.unwrap();
        settled(&queue).await;
        for _ in 0..100 {
            if queue.overflowed(LOG_STREAM, 10).await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(queue.overflowed(LOG_STREAM, 10).await.unwrap().is_empty());
        let ops = search.bulks().concat();
        let comm = |id: &str| {
            ops.iter()
                .find(|o| o.index == "comms" && o.id == id)
                .unwrap()
                .clone()
        };
        assert_eq!(comm(&long.id).doc.value()["msg"], long.msg.as_str());
        assert_eq!(comm(&over.id).doc.value()["status"], "sent");
        assert!(ops
            .iter()
            .any(|o| o.index == "logs" && o.id == format!("{}:sent:1", over.id)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_elasticsearch_outage_is_waited_out_and_the_indices_made_again() {
        let (queue, search) = (MemoryQueue::new(), Arc::new(MemorySearch::new()));
        search
            .script
            .fail_next(SearchMethod::Bulk, 3, ErrorKind::Unavailable);
        append_events(&queue, 1..=2).await;
        start(&queue, &search).await;
        settled(&queue).await;
        assert_eq!(search.script.sizes(SearchMethod::Bulk), [4, 4, 4, 4]);
        assert_eq!(search.script.count(SearchMethod::Prepare), 4);
        assert_eq!(search.bulks().len(), 1);
        assert!(queue.entries(LOG_DEAD_LETTER_STREAM).is_empty());
    }

    /// A queue with group `g`, a search, and the arguments of an indexer of them.
    async fn holding_setup() -> (MemoryQueue, Arc<MemorySearch>, IndexerArgs) {
        let (queue, search) = (MemoryQueue::new(), Arc::new(MemorySearch::new()));
        queue.ensure_group(LOG_STREAM, GROUP).await.unwrap();
        let args = test_args(&queue, Arc::new(MemoryStore::new()), &search);
        (queue, search, args)
    }

    async fn append_status(queue: &MemoryQueue, n: u32, status: EventStatus, attempt: u32) {
        let r = testing::record(n, Channel::Sms);
        let ev = LogEvent::for_record(&r, "sender", status, attempt, Utc::now());
        queue.append(&[(LOG_STREAM, ev.to_fields())]).await.unwrap();
    }

    /// The `communications` documents written so far: (record id, status).
    fn comm_writes(search: &MemorySearch) -> Vec<(String, String)> {
        search
            .bulks()
            .iter()
            .flatten()
            .filter(|op| op.index == "comms")
            .map(|op| {
                let doc: serde_json::Value = serde_json::from_str(op.doc.as_str()).unwrap();
                (op.id.clone(), doc["status"].as_str().unwrap().to_string())
            })
            .collect()
    }

    fn log_writes(search: &MemorySearch) -> usize {
        search
            .bulks()
            .iter()
            .flatten()
            .filter(|op| op.index == "logs")
            .count()
    }

    /// Issue #14 (osmem's CPU per message): a `queued` or `sent` document waits up to
    /// `hold` for the version that replaces it; the log documents go at once, and the
    /// entries stay pending until their documents are written.
    #[tokio::test(start_paused = true)]
    async fn a_document_about_to_change_waits_for_its_successor_up_to_the_hold() {
        let (queue, search, mut args) = holding_setup().await;
        args.hold = Duration::from_millis(500);
        Actor::spawn(None, LogIndexer, args).await.unwrap();
        append_events(&queue, 1..=3).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(log_writes(&search), 3, "the log documents went at once");
        assert!(comm_writes(&search).is_empty(), "the queued documents wait");
        assert_eq!(
            queue.pending(LOG_STREAM, GROUP).len(),
            3,
            "held: not acknowledged"
        );
        append_status(&queue, 1, EventStatus::Sent, 1).await;
        append_status(&queue, 2, EventStatus::Sent, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            comm_writes(&search).is_empty(),
            "the sent documents wait too"
        );
        append_status(&queue, 1, EventStatus::Delivered, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut written = comm_writes(&search);
        let id = |n: u32| testing::record(n, Channel::Sms).id;
        assert_eq!(written, [(id(1), "delivered".to_string())]);
        // Past the hold, what nothing replaced is written as it stands.
        tokio::time::sleep(Duration::from_millis(600)).await;
        written = comm_writes(&search);
        written.sort();
        let want = [(1, "delivered"), (2, "sent"), (3, "pending")];
        let want: Vec<(String, String)> =
            want.iter().map(|(n, b)| (id(*n), b.to_string())).collect();
        assert_eq!(written, want, "one document a record");
        assert_eq!(log_writes(&search), 6, "every event logged");
        assert!(queue.pending(LOG_STREAM, GROUP).is_empty());
    }

    /// A stop writes the held documents: nothing waits for a hold that will not end.
    #[tokio::test(start_paused = true)]
    async fn a_stop_writes_the_held_documents() {
        let (queue, search, mut args) = holding_setup().await;
        args.hold = Duration::from_secs(3600);
        let (indexer, handle) = Actor::spawn(None, LogIndexer, args).await.unwrap();
        append_events(&queue, 1..=2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(comm_writes(&search).is_empty());
        indexer.stop(None);
        handle.await.unwrap();
        assert_eq!(comm_writes(&search).len(), 2);
        assert!(queue.pending(LOG_STREAM, GROUP).is_empty());
    }

    /// At most two batches' worth of documents are held; beyond that the oldest go now.
    #[tokio::test(start_paused = true)]
    async fn beyond_two_batches_of_held_documents_the_oldest_are_written() {
        let (queue, search, mut args) = holding_setup().await;
        args.batch = BatchSettings::new(2, Duration::from_millis(10));
        args.hold = Duration::from_secs(3600);
        Actor::spawn(None, LogIndexer, args).await.unwrap();
        append_events(&queue, 1..=6).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id = |n: u32| testing::record(n, Channel::Sms).id;
        let written: Vec<String> = comm_writes(&search).into_iter().map(|(i, _)| i).collect();
        assert_eq!(written, [id(1), id(2)], "four held, the two oldest written");
        assert_eq!(log_writes(&search), 6);
        assert_eq!(queue.pending(LOG_STREAM, GROUP).len(), 4);
    }
}
