//! The ports: what the actors need from the outside world. The edges (`src/clients`,
//! `src/providers`) implement them over MongoDB, Redis, Elasticsearch and the providers.

use crate::domain::{
    ClaimResult, Communication, Lookup, OutboundMessage, Outcome, ProviderError, ProviderReceipt,
    StreamEntry,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

/// A dependency failed; `dependency` and `kind` say which and how (callers match on those,
/// never on the text), the message says why for logs. Driver internals never reach API
/// clients: the HTTP layer maps these to a generic 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{dependency} unavailable: {message}")]
pub struct DependencyError {
    pub dependency: Dependency,
    pub kind: ErrorKind,
    pub message: String,
}

/// The outside system (or the actor of this process) that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    MongoDb,
    Redis,
    Elasticsearch,
    /// An actor of this process, by name (e.g. one that is restarting).
    Actor(&'static str),
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dependency::MongoDb => "mongodb",
            Dependency::Redis => "redis",
            Dependency::Elasticsearch => "elasticsearch",
            Dependency::Actor(name) => name,
        })
    }
}

/// What went wrong, where a caller acts differently on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not reachable, timed out, or answered with an error: try again later.
    Unavailable,
    /// Redis: the stream's consumer group does not exist (`NOGROUP`), e.g. after Redis
    /// restarted empty: make it again.
    MissingGroup,
    /// Redis: the consumer group exists already (`BUSYGROUP`).
    GroupExists,
    /// Redis: the key does not exist.
    NoSuchKey,
    /// A bulk request went through but some of its items asked to be sent again.
    ItemsToRetry,
    /// The request may or may not have been applied (it left, then the connection broke or
    /// an answer never came): read back to learn which.
    Ambiguous,
}

impl DependencyError {
    /// An [`ErrorKind::Unavailable`] error.
    pub fn new(dependency: Dependency, message: impl std::fmt::Display) -> Self {
        DependencyError {
            dependency,
            kind: ErrorKind::Unavailable,
            message: message.to_string(),
        }
    }

    pub fn with_kind(self, kind: ErrorKind) -> Self {
        DependencyError { kind, ..self }
    }
}

/// The source of truth: one record per communication.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Store new records (status `pending`) in one round trip. One answer per record: a
    /// record whose idempotency key is already taken is not stored, and the answer carries
    /// the record that holds the key.
    async fn insert_many(
        &self,
        records: &[Communication],
    ) -> Result<Vec<InsertResult>, DependencyError>;

    /// Which of these records are stored (and not void), in order: the read-back after an
    /// ambiguous insert.
    async fn stored(&self, ids: &[String]) -> Result<Vec<bool>, DependencyError>;

    /// Make sure these records, whose callers were answered "not stored", are never sent,
    /// whether their insert landed, lands later or never does: a stored one still
    /// `pending` (or `scheduled`) becomes `void` (and gives its idempotency key up); for one not stored, a
    /// `void` placeholder takes its id, so a late insert of it fails. Answers how many had
    /// already moved past `pending` (too late to void; should never happen).
    async fn void(&self, ids: &[String]) -> Result<usize, DependencyError>;

    /// Mark a record `failed` for a reason outside any provider call (dead-lettered),
    /// unless it is final already or another worker holds its lease (its provider call may
    /// be under way: failing it now would record `failed` for a message being sent).
    async fn fail(&self, id: &str, reason: &str) -> Result<FailResult, DependencyError>;

    /// Claim records for one provider call each: `pending` ones whose retry is due, that
    /// no other live worker holds. A claim lasts `stale_after` (then another worker may
    /// take the record: the previous one died). The claimed record carries the number of
    /// the attempt being made, and says whether an earlier attempt ended without an
    /// outcome (its provider call may have gone through). The answer has one entry per
    /// id, in order.
    async fn claim(
        &self,
        ids: &[String],
        owner: &str,
        stale_after: Duration,
    ) -> Result<Vec<ClaimResult>, DependencyError>;

    /// Confirm each claim (`owner`, record id, attempt) right before its provider call, and
    /// keep it while the call runs and its outcome waits to be recorded: a lease still held
    /// is renewed for `stale_after`; one that lapsed is taken again if nobody has claimed
    /// the record since. One answer per claim, in order: `false` means another worker has
    /// claimed the record, so this claim must not call the provider. A lease the store
    /// took or renewed less than a quarter of `stale_after` ago may be answered held
    /// without being extended (it has most of its time left; the sender renews every
    /// third of it).
    async fn renew(
        &self,
        owner: &str,
        claims: &[(String, u32)],
        stale_after: Duration,
    ) -> Result<Vec<bool>, DependencyError>;

    /// Give claims back without a provider call (their try is not counted), the records
    /// due again at `not_before`: for a provider's `Retry-After` that outlasts the lease.
    async fn reschedule(
        &self,
        owner: &str,
        ids: &[String],
        not_before: DateTime<Utc>,
    ) -> Result<(), DependencyError>;

    /// Record outcomes of claims made by `owner`, in one round trip, and end the claims.
    /// Fenced by the lease: a claim that lost its lease to another worker writes nothing
    /// (the other worker records the outcome); where its call may have reached the
    /// provider, the record is flagged `possibleDuplicate` (cause `lost_lease`) instead.
    /// Answers the ids of those fenced claims (empty when every outcome was written).
    async fn record_outcomes(
        &self,
        owner: &str,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<Vec<String>, DependencyError>;

    /// Records that should be on a stream but may not be (never appended, Redis lost
    /// them, a retry came due, a claim went stale), of the given channels; a record last
    /// queued after its channel's `acked_up_to` is left alone (its entry still waits in
    /// the backlog, or is in a consumer's hands: autoclaim takes it from a dead one). Pushes their next look to `now + recheck`, and notes them
    /// queued `now`, so a record is swept at most once per `recheck`.
    async fn take_due(
        &self,
        now: DateTime<Utc>,
        recheck: Duration,
        limit: usize,
        channels: &[SweepScope],
    ) -> Result<Vec<Communication>, DependencyError>;

    /// Which of these recipients (tenant, channel, address as a record holds it) are on
    /// their tenant's suppression list, in one round trip; one answer each, in order.
    async fn suppressed(
        &self,
        recipients: &[(String, crate::domain::Channel, String)],
    ) -> Result<Vec<bool>, DependencyError>;

    async fn get(&self, id: &str) -> Result<Option<Communication>, DependencyError>;

    /// The records with these ids that exist (not void), in one round trip, in no
    /// particular order: bodies a log event left out, records to index again.
    async fn records(&self, ids: &[String]) -> Result<Vec<Communication>, DependencyError>;

    /// Apply providers' delivery receipts to the records with their provider message ids,
    /// where the move is allowed (see `Status::receipt_predecessors`), in one round trip;
    /// one answer per receipt, in order.
    async fn apply_receipts(
        &self,
        receipts: &[ReceiptUpdate],
    ) -> Result<Vec<ReceiptResult>, DependencyError>;

    async fn ping(&self) -> Result<(), DependencyError>;
}

/// What dead-lettering did to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailResult {
    /// Marked `failed`.
    Failed,
    /// Already final: nothing changed.
    AlreadyFinal,
    /// Another worker holds the record's lease: nothing changed, ask again later.
    Leased,
}

/// One channel for the OutboxSweeper to look at, and how far its stream is done with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepScope {
    pub channel: crate::domain::Channel,
    /// The lane: its streams are done with up to `acked_up_to`.
    pub priority: crate::domain::Priority,
    /// `None`: every entry of the stream is read and acknowledged. Otherwise entries
    /// appended after this time may still wait unread or in a consumer's hands: a record
    /// queued after it needs no second entry.
    pub acked_up_to: Option<DateTime<Utc>>,
}

/// A provider's report on a message it accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptUpdate {
    /// The provider that reports (its `Provider::name`): a receipt moves only the records
    /// that provider sent, whatever another provider's message ids look like.
    pub provider: String,
    pub provider_message_id: String,
    pub status: crate::domain::Status,
    /// The provider's error code and message, for `undelivered` / `failed`.
    pub error: Option<(String, String)>,
}

/// A receipt kept in the store because its record was not known when it came (the receipt
/// overtook the recording of its send): tried again until the record catches up, across
/// restarts, however long that takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedReceipt {
    pub update: ReceiptUpdate,
    /// Who reported it (`twilio-callback`, `whatsapp-webhook`), for the log event.
    pub service: String,
    /// Tries since it was parked (the wait before the next one doubles with each).
    pub tries: u32,
}

impl ParkedReceipt {
    /// One key per provider, message and status: parking the same receipt twice (the
    /// provider sent it again) keeps one.
    pub fn key(&self) -> String {
        let u = &self.update;
        format!(
            "{}:{}:{}",
            u.provider,
            u.provider_message_id,
            u.status.as_str()
        )
    }
}

/// Where receipts wait for their records, durably (MongoDB's `parked_receipts`).
#[async_trait]
pub trait ReceiptParking: Send + Sync + 'static {
    /// Keep these receipts, each first tried again at `next_try`; one already parked stays
    /// parked once.
    async fn park(
        &self,
        receipts: &[ParkedReceipt],
        next_try: DateTime<Utc>,
    ) -> Result<(), DependencyError>;

    /// Parked receipts due by `now`, oldest first, at most `limit`, and, when `count`, how
    /// many are parked in all (a count reads every parked receipt: asked for rarely).
    async fn due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        count: bool,
    ) -> Result<(Vec<ParkedReceipt>, Option<u64>), DependencyError>;

    /// Forget the receipts `done` (applied, or found to move nothing), and try the ones in
    /// `later` again at their times (counting a try each).
    async fn settle(
        &self,
        done: &[String],
        later: &[(String, DateTime<Utc>)],
    ) -> Result<(), DependencyError>;
}

/// What became of one record of an `insert_many`.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertResult {
    Inserted,
    /// Refused for itself alone (its id is voided already, or another write error); the
    /// rest of the batch is unaffected.
    NotStored,
    /// The idempotency key belongs to this earlier record.
    KeyTaken(Box<Communication>),
}

/// What a delivery receipt did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiptResult {
    Applied(Box<Communication>),
    /// The record is in a state this receipt may not move it from (e.g. `read` already).
    NotMovable,
    /// No record carries that provider message id (yet: the receipt can overtake the
    /// recording of the send).
    Unknown,
}

/// Where to start reading a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// This consumer's own delivered-but-unacknowledged entries with ids after the given
    /// one (`0` for all).
    OwnPending(String),
    /// Entries never delivered to any consumer (`>`).
    New,
}

/// Redis Streams.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Append entries (stream, fields) in one pipelined round trip; returns entry ids.
    async fn append(
        &self,
        entries: &[(&str, Vec<(&str, String)>)],
    ) -> Result<Vec<String>, DependencyError>;

    /// Create the consumer group (and the stream) if missing, starting at `0` so that
    /// entries appended before the group existed are read too.
    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), DependencyError>;

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        from: ReadFrom,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamEntry>, DependencyError>;

    /// One read over several streams (a channel's lanes, which share a slot): each from its
    /// own position, at most `count` entries from each, in the order given. It blocks (up
    /// to `block`) only when every position is [`ReadFrom::New`] and nothing is there.
    async fn read_lanes(
        &self,
        reads: &[(&str, ReadFrom)],
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Vec<StreamEntry>>, DependencyError>;

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<(), DependencyError>;

    /// Take over entries idle longer than `min_idle` from any consumer of the group: the
    /// first page of [`Queue::autoclaim_from`].
    async fn autoclaim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        let (_, taken) = self
            .autoclaim_from(stream, group, consumer, min_idle, "0-0", count)
            .await?;
        Ok(taken)
    }

    /// One page of [`Queue::autoclaim`], from `start` (`0-0` for the beginning of the
    /// pending list): the entries taken over, and where the next page starts (`0-0` once
    /// the whole list has been scanned). Redis scans a bounded stretch of the pending list
    /// a call, so idle entries behind a long run of live ones are reached only by paging.
    async fn autoclaim_from(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<(String, Vec<StreamEntry>), DependencyError>;

    /// Pending entries idle at least `min_idle`, with how often each was delivered.
    async fn pending_deliveries(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<(String, u64)>, DependencyError>;

    /// Read entries by id (for dead-lettering them with their fields).
    async fn range(
        &self,
        stream: &str,
        ids: &[String],
    ) -> Result<Vec<StreamEntry>, DependencyError>;

    /// Length of a stream and the number of entries pending in its group (0 when missing).
    async fn stream_stats(&self, stream: &str, group: &str) -> Result<(u64, u64), DependencyError>;

    /// How far the group is done with the stream: `None` when no entry waits unread or
    /// unacknowledged (or the stream or group does not exist); otherwise a time (Redis's
    /// clock, from entry ids) before which every entry was delivered and acknowledged: the
    /// older of the oldest pending entry (if delivered only once: one delivered again is
    /// in trouble, and its record may be swept) and the newest entry read. Works on every Redis
    /// with streams (no `XINFO GROUPS` lag, which Redis before 7.0 lacks).
    async fn acked_up_to(
        &self,
        stream: &str,
        group: &str,
    ) -> Result<Option<DateTime<Utc>>, DependencyError>;

    /// Drop entries the group has delivered and acknowledged (all older than both its
    /// last-delivered id and its oldest pending entry); returns how many were dropped.
    async fn trim_acked(&self, stream: &str, group: &str) -> Result<u64, DependencyError>;

    /// Mark `consumer` of the group alive for `ttl` (refreshed by the live process): a
    /// consumer whose mark has lapsed is gone, whatever Redis says of its idle time (which
    /// before 7.2 counts from its last delivery, so a live but quiet consumer looks idle).
    async fn keep_alive(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<(), DependencyError>;

    /// Remove the group's consumers that are gone: no pending entry, no live mark (see
    /// [`Queue::keep_alive`]) and idle at least `idle`; never `keep` (this process's own).
    /// Checked and removed atomically, so an entry delivered meanwhile is never dropped
    /// with its consumer. Returns the names removed.
    async fn forget_gone_consumers(
        &self,
        stream: &str,
        group: &str,
        keep: &str,
        idle: Duration,
    ) -> Result<Vec<String>, DependencyError>;

    /// Communication ids whose events were not appended to the bounded `stream` (it was
    /// full), to be indexed again from MongoDB: up to `count` of them, marks kept.
    async fn overflowed(&self, stream: &str, count: usize) -> Result<Vec<String>, DependencyError>;

    /// Drop these marks: their records are indexed.
    async fn forget_overflowed(&self, stream: &str, ids: &[String]) -> Result<(), DependencyError>;

    /// Entries after `after` (an entry id, exclusive), oldest first, at most `count`,
    /// without a consumer group (plain `XREAD`): waiting up to `block` for one when there
    /// is none yet, or not at all (`None`).
    async fn read_after(
        &self,
        stream: &str,
        after: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        let _ = (stream, after, count, block);
        Err(DependencyError::new(
            Dependency::Redis,
            "read_after: not supported",
        ))
    }

    /// The id of the stream's oldest entry (`first`) or newest one; `None` when the stream
    /// is empty or missing.
    async fn end_id(&self, stream: &str, first: bool) -> Result<Option<String>, DependencyError> {
        let _ = (stream, first);
        Err(DependencyError::new(
            Dependency::Redis,
            "end_id: not supported",
        ))
    }

    /// The id of the stream's newest entry.
    async fn last_id(&self, stream: &str) -> Result<Option<String>, DependencyError> {
        self.end_id(stream, false).await
    }

    /// A client with its own connection, for blocking reads that would otherwise hold up
    /// every other command.
    fn dedicated(&self) -> Arc<dyn Queue>;

    async fn ping(&self) -> Result<(), DependencyError>;
}

/// One operation of a bulk request.
#[derive(Debug, Clone, PartialEq)]
pub enum BulkAction {
    /// Create the document; an existing one with the same id counts as done.
    Create,
    /// Merge `doc` into the document, creating it from `upsert` when missing.
    Update { upsert: serde_json::Value },
    /// Replace the document unless the stored one has a version at least this high
    /// (external versioning): events applied out of order never move a document back.
    IndexVersioned { version: u64 },
    /// Replace the document unless the stored one has a higher version (`external_gte`):
    /// the reconciler's repair from MongoDB, which wins over an equal version.
    IndexAtLeast { version: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BulkOp {
    pub index: String,
    pub id: String,
    pub action: BulkAction,
    pub doc: Doc,
}

/// A document's JSON text, written once when its operation is made (straight from a
/// borrowed struct, no `serde_json::Value` tree in between) and put into the bulk body as
/// it is; copies of the operation (a retry, the batch's newest versions) share the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc(Arc<str>);

impl Doc {
    /// The JSON of `value`: one of our document structs, or a `serde_json::Value`.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Doc {
        // Writing a struct or a map with string keys into a string cannot fail.
        Doc(serde_json::to_string(value)
            .unwrap_or_else(|_| "{}".to_string())
            .into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The document parsed back (tests, and what reads a field of it).
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl From<serde_json::Value> for Doc {
    fn from(v: serde_json::Value) -> Doc {
        Doc::json(&v)
    }
}

/// What happened to one item of a bulk request.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemResult {
    Done,
    /// 429 or 5xx: send again later.
    Retry(String),
    /// Refused for good (400, mapping error): dead-letter it.
    Rejected(String),
}

/// Elasticsearch.
#[async_trait]
pub trait SearchSink: Send + Sync + 'static {
    /// Make the indices (with their mappings) if they are missing. Called before the first
    /// write and again after a failed request, since the server may have restarted empty.
    async fn prepare(&self) -> Result<(), DependencyError>;

    /// One `_bulk` request; one result per op, in order. An error means the request as a
    /// whole failed (nothing can be assumed stored).
    async fn bulk(&self, ops: &[BulkOp]) -> Result<Vec<ItemResult>, DependencyError>;

    async fn ping(&self) -> Result<(), DependencyError>;
}

/// A record's `communications` document as the reconciler compares it with MongoDB.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedState {
    pub status: String,
    /// The document's (external) version.
    pub version: u64,
}

/// The records the reconciler looks at: those MongoDB changed recently.
#[async_trait]
pub trait RecentRecords: Send + Sync + 'static {
    /// Records last changed between `from` and `to`, newest first, at most `limit`.
    async fn changed_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Communication>, DependencyError>;
}

/// What the search index holds of records, for the reconciler.
#[async_trait]
pub trait IndexedRecords: Send + Sync + 'static {
    /// The `communications` documents of these records, by id (missing ones are absent).
    async fn indexed(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, IndexedState>, DependencyError>;
}

/// A message provider (Twilio, Meta WhatsApp Cloud API, SMTP).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short, stable name for records, logs and metric labels.
    fn name(&self) -> &'static str;

    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError>;

    /// Whether the provider already has `msg`, sent no earlier than `since`: asked before
    /// resending a message whose earlier attempt had no known outcome. By default the
    /// provider cannot tell, and the message is sent again (flagged as a possible
    /// duplicate).
    async fn lookup(
        &self,
        _msg: &OutboundMessage,
        _since: DateTime<Utc>,
    ) -> Result<Lookup, ProviderError> {
        Ok(Lookup::CannotTell)
    }
}

/// A record whose fallback is due, as the FallbackActor reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct DueFallback {
    pub id: String,
    pub tenant: String,
    pub status: crate::domain::Status,
    pub fallback: crate::domain::Fallback,
    /// The first message's lane: its fallback goes in the same one.
    pub priority: crate::domain::Priority,
}

/// Where the FallbackActor finds records whose fallback is due (MongoDB's
/// `communications`: `fallback`, `fallbackAt`, `fallbackId`), and marks them settled.
#[async_trait]
pub trait Fallbacks: Send + Sync + 'static {
    /// Records with a fallback not yet settled whose time has come (`fallbackAt` ≤ `now`)
    /// or that failed for good (the write that fails a record makes its fallback due),
    /// oldest first, at most `limit`.
    async fn due_fallbacks(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueFallback>, DependencyError>;

    /// `id`'s fallback is settled: sent as the record `sent_as`, or not needed (`None`:
    /// the first message reached the person).
    async fn settle_fallback(&self, id: &str, sent_as: Option<&str>)
        -> Result<(), DependencyError>;
}

/// Where the SchedulerActor finds scheduled sends that are due (MongoDB's
/// `communications`: an indexed due time, shared with records waiting for the
/// OutboxSweeper's next look), and queues them.
/// A read of [`ScheduledSends::scheduled_in`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduledPage {
    /// The due `scheduled` records read.
    pub due: Vec<String>,
    /// How many records were read, of any status.
    pub read: usize,
    /// The due time of the last record read, when the limit cut the read short.
    pub cut_at: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait ScheduledSends: Send + Sync + 'static {
    /// Ids of `scheduled` records whose `sendAt` ≤ `now` and whose due time is at or after
    /// `from` (every due one when `None`), oldest first, at most `limit`. The store reads
    /// every record due in that range, whatever its status, to find them.
    async fn due_scheduled(
        &self,
        from: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, DependencyError>;

    /// The records whose due time is in `(from, to]`, of any status, oldest first, at most
    /// `limit`: the ids of the `scheduled` ones among them whose `sendAt` ≤ `now`, how
    /// many records were read, and, when `limit` cut the read short, the due time of the
    /// last one read. The store reads every record of the range (whatever `limit`), so the
    /// caller keeps the range narrow.
    async fn scheduled_in(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<ScheduledPage, DependencyError>;

    /// Move these records from `scheduled` to `pending`, compare-and-set on the status:
    /// those still `scheduled` only (another process, or a cancel, may have moved one).
    /// Each is noted queued at `now` and due for the OutboxSweeper's look after its grace
    /// time, so one whose stream entry never gets appended (a crash right after this) is
    /// queued by the sweeper. Answers the records this call moved, now `pending`.
    async fn release_scheduled(
        &self,
        ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<Communication>, DependencyError>;
}
