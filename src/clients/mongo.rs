//! MongoDB: the source of truth. Implements `actors::ports::Store`.
//!
//! One document per communication in `communications`; fields in camelCase:
//! `_id, tenant, type, from, to, msg, subject?, status, attempts, createdAt, updatedAt,
//! notBefore, nextAttemptAt, sentAt?, failedAt?, deliveredAt?, readAt?, undeliveredAt?,
//! provider?, providerMessageId?, possibleDuplicate?, possibleDuplicateCause?,
//! possibleDuplicateAttempt?, unknownAttempt?, unknownCause?, unknownSince?, lastError?,
//! errors[], idempotencyKey? and tenantKey? (`<tenant>:<key>`, under the unique index), requestHash, sendAt? (also in nextAttemptAt while `scheduled`),
//! canceledAt?, deadLetterAt? and deadLetterReason? (while a dead letter), attemptBase?,
//! replays?, replayedAt?` (see [`crate::clients::dead_letters`]). There is deliberately no unique index on `to`.
//! `unknown*` name an attempt whose outcome is unknown (timeout, reset, ambiguous 5xx), so
//! the next claim asks the provider before sending again; `possibleDuplicate*` mark a
//! send made after one (or after a stale claim), with that attempt and its cause.
//!
//! Per message sent, MongoDB does one insert (batched by the router), one read (batched
//! by the sender's claim) and one write (the batch's outcomes); the claim itself is a
//! lease in Redis ([`crate::clients::lease`]). Receipts add one batched write and read each.

use crate::clients::dead_letters::{DeadLetterReason, DEAD_LETTER_AT, DEAD_LETTER_REASON};
use crate::clients::indexes::{tenant_key, TENANT_KEY};
use crate::clients::lease::{RedisLeases, Release};
use actors::domain::{
    Ambiguity, AttemptError, Channel, ClaimResult, Claimed, Communication, Outcome, Priority,
    Status, UnknownAttempt, DEFAULT_TENANT,
};
use actors::ports::{
    Dependency, DependencyError, ErrorKind, FailResult, InsertResult, ReceiptResult, ReceiptUpdate,
    Store, SweepScope,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime as BsonDate, Document};
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::{Client, Collection, Database};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const COLLECTION: &str = "communications";

/// How long dead-lettering holds a record's lease (one write).
const DEAD_LETTER_LEASE: Duration = Duration::from_secs(30);

/// Records per `sent` statement of an outcome write.
const SENT_CHUNK: usize = 25;

/// Most records one `update` command of a delivery write (outcomes, receipts) covers: see
/// [`MongoStore::run_update_in_turns`].
const WRITE_COMMAND_RECORDS: usize = 25;

/// Records an update statement covers: its `_id $in`'s length, else one.
fn statement_records(statement: &Document) -> usize {
    statement
        .get_document("q")
        .and_then(|q| q.get_document("_id"))
        .and_then(|id| id.get_array("$in"))
        .map_or(1, |ids| ids.len().max(1))
}

/// `statements` in order, in groups of at most `most` records (a statement larger than
/// that is a group of its own).
fn in_turns(statements: Vec<Document>, most: usize) -> Vec<Vec<Document>> {
    let mut groups: Vec<Vec<Document>> = Vec::new();
    let mut size = 0;
    for s in statements {
        let n = statement_records(&s);
        match groups.last_mut() {
            Some(g) if size + n <= most => g.push(s),
            _ => {
                groups.push(vec![s]);
                size = 0;
            }
        }
        size += n;
    }
    groups
}

#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    coll: Collection<Document>,
    /// A new record is swept (queued again) if it is still pending this long after insert.
    first_look: Duration,
    /// Who may make a record's provider call: a lease in Redis (see `claim`).
    leases: Arc<RedisLeases>,
    /// The write concern of every write, also for the writes sent as commands.
    write_concern: Document,
    /// Where the sweeper's look past the stalled lanes' point left off (`super::sweep`).
    sweep_cursor: super::sweep::Cursor,
    /// The lease time the senders last asked for (`stale_after`, in ms): the lease an
    /// outcome write renews before it is made lasts as long.
    lease_ms: Arc<AtomicU64>,
}

/// Count documents this client wrote to `communications`
/// (`mongo_documents_written_total{op}`): SecantusDB's counters count commands, not the
/// documents they wrote (README Performance).
fn count_written(op: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!("mongo_documents_written_total", "op" => op).increment(n);
    }
}

/// A count in a write's reply (`n`, `nModified`), whichever integer type it came as.
fn reply_count(reply: &Document, key: &str) -> Option<i64> {
    reply
        .get_i32(key)
        .map(i64::from)
        .or(reply.get_i64(key))
        .ok()
}

/// The documents an `update` command's reply says it modified (and upserted).
fn modified(reply: &Document) -> u64 {
    let upserted = reply.get_array("upserted").map_or(0, Vec::len) as i64;
    (reply_count(reply, "nModified").unwrap_or(0) + upserted).max(0) as u64
}

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

/// A write that may or may not have been applied.
fn ambiguous(e: impl std::fmt::Display) -> DependencyError {
    err(e).with_kind(ErrorKind::Ambiguous)
}

/// The status of a record whose caller was answered 503 while its insert was under way
/// (or of the placeholder that keeps that insert from landing): never sent.
pub const VOID: &str = "void";

/// The ids that are ObjectIds (others name no record).
/// The collection `name` in the same database as `coll` (and with its client's options).
pub fn sibling(coll: &Collection<Document>, name: &str) -> Collection<Document> {
    coll.client()
        .database(&coll.namespace().db)
        .collection(name)
}

pub fn object_ids<S: AsRef<str>>(ids: &[S]) -> Vec<ObjectId> {
    ids.iter()
        .filter_map(|i| ObjectId::parse_str(i.as_ref()).ok())
        .collect()
}

fn bdate(t: DateTime<Utc>) -> BsonDate {
    BsonDate::from_millis(t.timestamp_millis())
}

fn cdate(d: &Document, k: &str) -> Option<DateTime<Utc>> {
    d.get_datetime(k).ok().map(|t| t.to_chrono())
}

impl MongoStore {
    /// Connects lazily: the driver reconnects by itself, so a MongoDB that is down at start
    /// or restarts later only delays work.
    pub async fn new(
        cfg: &crate::config::Mongo,
        first_look: Duration,
        leases: Arc<RedisLeases>,
    ) -> Result<MongoStore, DependencyError> {
        let mut opts = ClientOptions::parse(cfg.url.expose()).await.map_err(err)?;
        opts.app_name = Some("comm-aggregator".into());
        // Acknowledged means journaled (without j, SecantusDB was seen to lose acknowledged
        // inserts on kill -9) and, on a replica set, held by a majority: a write only the
        // primary has can be rolled back by a failover, and an insert rolled back after
        // its `queued` answer would be acknowledged away as "no such record". A standalone
        // server takes `majority` as its own acknowledgement. A URL's `w`/`journal` wins.
        let wc = opts.write_concern.get_or_insert_with(WriteConcern::default);
        wc.w.get_or_insert(Acknowledgment::Majority);
        wc.journal.get_or_insert(true);
        let write_concern = mongodb::bson::to_document(&*wc).map_err(err)?;
        // Reads that decide something (the claim's "still pending?", the receipts' record
        // lookup, an idempotency key's holder) must not act on a write a failover can roll
        // back: on a replica set they read what a majority holds, which every write of
        // ours waits for anyway. A URL's `readConcernLevel` wins.
        opts.read_concern
            .get_or_insert(mongodb::options::ReadConcern::majority());
        opts.server_selection_timeout
            .get_or_insert(cfg.server_selection_timeout);
        opts.connect_timeout.get_or_insert(cfg.connect_timeout);
        let client = Client::with_options(opts).map_err(err)?;
        let db = client.database(&cfg.database);
        let coll = db.collection::<Document>(COLLECTION);
        Ok(MongoStore {
            db,
            coll,
            first_look,
            leases,
            write_concern,
            sweep_cursor: Default::default(),
            lease_ms: Arc::new(AtomicU64::new(30_000)),
        })
    }

    /// The record holding `key` for `tenant`, if any.
    pub async fn idempotency_holder(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<Document>, DependencyError> {
        self.coll
            .find_one(doc! {TENANT_KEY: tenant_key(tenant, key)})
            .await
            .map_err(err)
    }

    pub fn collection(&self) -> &Collection<Document> {
        &self.coll
    }

    /// The leases that make one worker the only one to call the provider for a record.
    pub fn leases(&self) -> &Arc<RedisLeases> {
        &self.leases
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    fn to_doc(r: &Communication, next_look: DateTime<Utc>) -> Result<Document, DependencyError> {
        let oid = ObjectId::parse_str(&r.id).map_err(err)?;
        let mut d = doc! {
            "_id": oid,
            "tenant": &r.tenant,
            "type": r.channel.as_str(),
            "from": &r.from,
            "to": &r.to,
            "msg": &r.msg,
            "status": r.status.as_str(),
            "attempts": r.attempts as i32,
            "createdAt": bdate(r.created_at),
            "updatedAt": bdate(r.updated_at),
            "notBefore": bdate(r.created_at),
            "nextAttemptAt": bdate(next_look),
            "errors": [],
            "requestHash": &r.request_hash,
        };
        if let Some(s) = &r.subject {
            d.insert("subject", s);
        }
        if let Some(k) = &r.idempotency_key {
            d.insert("idempotencyKey", k);
            d.insert(TENANT_KEY, tenant_key(&r.tenant, k));
        }
        if let Some(f) = &r.fallback {
            d.insert("fallback", super::fallbacks::fallback_doc(f));
            // A scheduled message's wait starts when it is sent.
            let at = bdate(
                r.send_at.unwrap_or(r.created_at)
                    + chrono::Duration::seconds(i64::from(f.after_secs)),
            );
            d.insert("fallbackAt", at);
            // Its copy, kept only until the fallback is settled (the FallbackActor's index).
            d.insert(super::fallbacks::DUE_FIELD, at);
        }
        if let Some(of) = &r.fallback_of {
            d.insert("fallbackOf", of);
        }
        if let Some(b) = &r.batch_id {
            d.insert("batchId", b);
        }
        if let Some(h) = &r.html {
            d.insert("html", h);
        }
        // Its trace context, for its receipts' spans; not in the tenants' view.
        if let Some(t) = &r.traceparent {
            d.insert("traceparent", t);
        }
        // Records from before lanes have none: normal.
        d.insert("priority", r.priority.as_str());
        if let Some(at) = r.send_at {
            d.insert("sendAt", bdate(at));
            // The SchedulerActor's due time, read in the index `next_attempt` under the
            // status `scheduled` (the OutboxSweeper's look keeps to `pending`/`sending`).
            d.insert("nextAttemptAt", bdate(at));
        }
        if let Some(t) = &r.template {
            let mut td = doc! {"name": &t.name, "version": t.version as i64};
            if let Some(l) = &t.locale {
                td.insert("locale", l);
            }
            d.insert("template", td);
        }
        Ok(d)
    }

    pub fn from_doc(d: &Document) -> Option<Communication> {
        let errors = d
            .get_array("errors")
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_document())
                    .map(|e| AttemptError {
                        attempt: e.get_i32("attempt").unwrap_or(0) as u32,
                        at: cdate(e, "at").unwrap_or_default(),
                        provider: e.get_str("provider").ok().map(str::to_string),
                        code: e.get_str("code").ok().map(str::to_string),
                        message: e.get_str("message").unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Communication {
            id: d.get_object_id("_id").ok()?.to_hex(),
            tenant: d.get_str("tenant").unwrap_or(DEFAULT_TENANT).to_string(),
            channel: Channel::parse(d.get_str("type").ok()?)?,
            from: d.get_str("from").ok()?.to_string(),
            to: d.get_str("to").ok()?.to_string(),
            msg: d.get_str("msg").ok()?.to_string(),
            subject: d.get_str("subject").ok().map(str::to_string),
            status: Status::parse(d.get_str("status").ok()?)?,
            attempts: d.get_i32("attempts").unwrap_or(0) as u32,
            attempt_base: d.get_i32("attemptBase").unwrap_or(0) as u32,
            created_at: cdate(d, "createdAt")?,
            updated_at: cdate(d, "updatedAt").or_else(|| cdate(d, "createdAt"))?,
            provider: d.get_str("provider").ok().map(str::to_string),
            provider_message_id: d.get_str("providerMessageId").ok().map(str::to_string),
            last_error: d.get_str("lastError").ok().map(str::to_string),
            errors,
            idempotency_key: d.get_str("idempotencyKey").ok().map(str::to_string),
            request_hash: d.get_str("requestHash").unwrap_or_default().to_string(),
            fallback: None,
            fallback_of: d.get_str("fallbackOf").ok().map(str::to_string),
            template: None,
            batch_id: d.get_str("batchId").ok().map(str::to_string),
            html: d.get_str("html").ok().map(str::to_string),
            send_at: cdate(d, "sendAt"),
            priority: d
                .get_str("priority")
                .ok()
                .and_then(Priority::parse)
                .unwrap_or_default(),
            traceparent: d.get_str("traceparent").ok().map(str::to_string),
        })
    }

    /// The document as JSON: `_id` as `id`, dates as RFC 3339. What of it a tenant sees is
    /// decided by the HTTP edge's allow-list (`http/view.rs`).
    pub fn to_api_json(d: &Document) -> serde_json::Value {
        let mut v: serde_json::Value = Bson::Document(d.clone()).into_relaxed_extjson();
        if let Some(obj) = v.as_object_mut() {
            if let Ok(id) = d.get_object_id("_id") {
                obj.remove("_id");
                obj.insert("id".into(), serde_json::Value::String(id.to_hex()));
            }
            for (_, val) in obj.iter_mut() {
                flatten_dates(val);
            }
        }
        v
    }

    /// One record as `tenant` may see it: another tenant's record is not found.
    pub async fn get_doc(
        &self,
        id: &str,
        tenant: &str,
    ) -> Result<Option<Document>, DependencyError> {
        let Ok(oid) = ObjectId::parse_str(id) else {
            return Ok(None);
        };
        self.coll
            .find_one(doc! {"_id": oid, "tenant": tenant})
            .await
            .map_err(err)
    }

    /// How many records of a tenant's bulk send are in each status (as the API names
    /// them); empty when the tenant has no such batch. See [`super::batches`].
    pub async fn batch_counts(
        &self,
        tenant: &str,
        batch_id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, DependencyError> {
        super::batches::MongoBatches::new(&self.db)
            .counts(tenant, batch_id)
            .await
    }

    /// Lists record ids as members of a tenant's bulk send, before the records are
    /// stored. See [`super::batches`].
    pub async fn list_batch(
        &self,
        tenant: &str,
        batch_id: &str,
        ids: &[String],
    ) -> Result<(), DependencyError> {
        super::batches::MongoBatches::new(&self.db)
            .list(tenant, batch_id, ids)
            .await
    }

    /// The leased records; on failure the leases go back, since no provider call follows.
    async fn read_leased(
        &self,
        leased: &[&str],
        owner: &str,
    ) -> Result<Vec<Document>, DependencyError> {
        let oids: Vec<ObjectId> = object_ids(leased);
        let read = async {
            self.coll
                .find(doc! {"_id": {"$in": &oids}})
                .await?
                .try_collect()
                .await
        };
        match read.await {
            Ok(docs) => Ok(docs),
            Err(e) => {
                let undo: Vec<(&str, Release)> =
                    leased.iter().map(|id| (*id, Release::Undo)).collect();
                let _ = self.leases.release(&undo, owner).await;
                Err(err(e))
            }
        }
    }

    async fn run_update(
        &self,
        updates: Vec<Document>,
        ordered: bool,
    ) -> Result<Document, DependencyError> {
        let reply = self
            .db
            .run_command(
                doc! {"update": COLLECTION, "updates": updates, "ordered": ordered,
                "writeConcern": self.write_concern.clone()},
            )
            .await
            .map_err(err)?;
        if let Ok(errs) = reply.get_array("writeErrors") {
            if !errs.is_empty() {
                return Err(err(format!("write errors: {errs:?}")));
            }
        }
        Ok(reply)
    }

    /// The statements in `update` commands of at most [`WRITE_COMMAND_RECORDS`] records
    /// each, one after another; the replies' `n` and `nModified` summed into one. A
    /// delivery write of a hundred records held SecantusDB, which runs one command at a
    /// time, for 70-300 ms, and every insert that arrived meanwhile (so every accept)
    /// waited behind it; between two short commands an insert goes first. A failed command
    /// fails the write with the earlier commands' statements applied, as a failure in the
    /// middle of one command leaves them: the caller's retry finds them written.
    async fn run_update_in_turns(
        &self,
        updates: Vec<Document>,
    ) -> Result<Document, DependencyError> {
        let (mut n, mut modified_n) = (0i64, 0i64);
        for command in in_turns(updates, WRITE_COMMAND_RECORDS) {
            let reply = self.run_update(command, false).await?;
            n += reply_count(&reply, "n").unwrap_or(0);
            modified_n += modified(&reply) as i64;
        }
        Ok(doc! {"n": n, "nModified": modified_n})
    }

    /// The unsettled fallbacks of the records of `filter` that a write just failed become
    /// due now (`super::fallbacks::due_now`). A failure here is logged: the fallback is
    /// then due at its own time, later but not lost.
    async fn fallbacks_due_now(&self, filter: Document) {
        if let Err(e) = super::fallbacks::due_now(&self.coll, filter, bdate(Utc::now())).await {
            metrics::counter!("fallback_errors_total").increment(1);
            tracing::warn!(error = %e, "failed records' fallbacks not moved to now; each is due at its own time");
        }
    }

    fn remember_lease(&self, lease: Duration) {
        self.lease_ms
            .store(lease.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Split outcomes by their claims' leases, renewed here for the write: those still
    /// held (or taken again, nobody having claimed the record since), and the ids of
    /// those another worker has claimed since, which must not be written.
    async fn fence(
        &self,
        owner: &str,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<(Vec<(String, u32, Outcome)>, Vec<String>), DependencyError> {
        let claims: Vec<(&str, u32)> = outcomes
            .iter()
            .map(|(id, a, _)| (id.as_str(), *a))
            .collect();
        let lease = Duration::from_millis(self.lease_ms.load(Ordering::Relaxed));
        let leases = self.leases.renew(&claims, owner, lease).await?;
        let (mut held, mut lost) = (Vec::new(), Vec::new());
        for (o, holds) in outcomes.iter().zip(leases) {
            if holds {
                held.push(o.clone());
            } else {
                lost.push(o.0.clone());
            }
        }
        Ok((held, lost))
    }

    /// The ids whose outcome the last write did not apply, read back: a record this
    /// write moved carries its attempt number and a status the outcome leads to.
    async fn not_written(
        &self,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<Vec<String>, DependencyError> {
        let oids: Vec<ObjectId> = outcomes
            .iter()
            .filter_map(|(id, _, _)| ObjectId::parse_str(id).ok())
            .collect();
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"_id": {"$in": oids}})
            .projection(doc! {"status": 1, "attempts": 1})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        let written = |id: &str, attempt: u32, o: &Outcome| {
            docs.iter().any(|d| {
                d.get_object_id("_id").is_ok_and(|x| x.to_hex() == id)
                    && d.get_i32("attempts").ok() == Some(attempt as i32)
                    && d.get_str("status").is_ok_and(|s| outcome_led_to(o, s))
            })
        };
        Ok(outcomes
            .iter()
            .filter(|(id, a, o)| !written(id, *a, o))
            .map(|(id, _, _)| id.clone())
            .collect())
    }

    /// Flag the records of fenced claims whose call may have reached the provider: the
    /// worker that holds the record now records its outcome, and the provider may have the
    /// message twice. A flag already set (with its own cause) is kept.
    async fn flag_lost(
        &self,
        outcomes: &[(String, u32, Outcome)],
        fenced: &[String],
    ) -> Result<(), DependencyError> {
        let now = bdate(Utc::now());
        let updates: Vec<Document> = outcomes
            .iter()
            .filter(|(id, _, o)| fenced.contains(id) && o.may_have_reached_provider())
            .filter_map(|(id, attempt, _)| {
                let oid = ObjectId::parse_str(id).ok()?;
                Some(doc! {
                    "q": {"_id": oid, "possibleDuplicate": {"$ne": true}},
                    "u": {"$set": {"possibleDuplicate": true,
                                   "possibleDuplicateCause": Ambiguity::LostLease.as_str(),
                                   "possibleDuplicateAttempt": *attempt as i32,
                                   "updatedAt": now}},
                })
            })
            .collect();
        if updates.is_empty() {
            return Ok(());
        }
        let reply = self.run_update(updates, false).await?;
        count_written("other", modified(&reply));
        Ok(())
    }

    /// The answers of an unordered insert that had write errors: a duplicate key whose
    /// idempotency key has another holder is that holder's (a replay or a conflict); any
    /// other error (a `void` placeholder holding the `_id`, a refused document) leaves that
    /// record alone unstored. The others are stored.
    async fn settle_write_errors(
        &self,
        records: &[Communication],
        write_errors: &[mongodb::error::IndexedWriteError],
    ) -> Result<Vec<InsertResult>, DependencyError> {
        let mut results = vec![InsertResult::Inserted; records.len()];
        let keys: Vec<String> = write_errors
            .iter()
            .filter(|w| w.code == 11000)
            .filter_map(|w| {
                let r = records.get(w.index)?;
                Some(tenant_key(&r.tenant, r.idempotency_key.as_ref()?))
            })
            .collect();
        let holders: Vec<Document> = if keys.is_empty() {
            Vec::new()
        } else {
            // The rest of the batch is stored: a failure here leaves it ambiguous.
            // By `tenantKey`: a read SecantusDB serves from its sparse unique index.
            let found = self.coll.find(doc! {TENANT_KEY: {"$in": keys}}).await;
            found
                .map_err(ambiguous)?
                .try_collect()
                .await
                .map_err(ambiguous)?
        };
        for w in write_errors {
            let Some(r) = records.get(w.index) else {
                continue;
            };
            let holder = holders
                .iter()
                .filter(|_| w.code == 11000)
                .find(|d| {
                    d.get_str("idempotencyKey").ok() == r.idempotency_key.as_deref()
                        && d.get_str("tenant").unwrap_or(DEFAULT_TENANT) == r.tenant
                        && d.get_object_id("_id").ok().map(|o| o.to_hex()) != Some(r.id.clone())
                })
                .and_then(MongoStore::from_doc);
            results[w.index] = match holder {
                Some(h) => InsertResult::KeyTaken(Box::new(h)),
                None => {
                    tracing::warn!(id = %r.id, code = w.code, message = %w.message, "record not stored");
                    InsertResult::NotStored
                }
            };
        }
        Ok(results)
    }
}

/// A date as the API writes every date: RFC 3339 in UTC with exactly three fraction digits
/// (`.120Z`, never the `.12Z` that BSON's own text gives for 120 ms), so dates compare as
/// text and read the same in every answer.
fn api_date(bson_text: &str) -> String {
    match DateTime::parse_from_rfc3339(bson_text) {
        Ok(t) => t
            .with_timezone(&Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        Err(_) => bson_text.to_string(),
    }
}

/// `{"$date": "…"}` (relaxed extended JSON) replaced by the date's text, at any depth.
fn flatten_dates(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if o.len() == 1 {
                if let Some(serde_json::Value::String(s)) = o.get("$date") {
                    *v = serde_json::Value::String(api_date(s));
                    return;
                }
            }
            for (_, x) in o.iter_mut() {
                flatten_dates(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(flatten_dates),
        _ => {}
    }
}

/// Whether a record in `status` may be one this outcome was written to (receipts may have
/// moved a sent one on since).
fn outcome_led_to(o: &Outcome, status: &str) -> bool {
    match o {
        Outcome::Sent { .. } => matches!(status, "sent" | "delivered" | "read" | "undelivered"),
        Outcome::Failed { .. } => status == "failed",
        Outcome::Retry { .. } => status == "pending",
        Outcome::Suppressed => status == "suppressed",
    }
}

/// Each id once, and only ids that can be records.
fn unique_ids(ids: &[String]) -> Vec<&str> {
    let mut seen = HashSet::new();
    ids.iter()
        .map(String::as_str)
        .filter(|id| seen.insert(*id) && ObjectId::parse_str(id).is_ok())
        .collect()
}

/// What a claim answers for one record, given its try number `n` (-1: leased by another
/// worker, 0: not leased) and the stored document; and whether the lease goes back
/// undone (no provider call follows).
fn claim_one(n: i64, doc: Option<&Document>, now: DateTime<Utc>) -> (ClaimResult, bool) {
    if n < 0 {
        return (ClaimResult::Busy, false);
    }
    let Some(d) = doc else {
        return (ClaimResult::Skip("no such record"), n > 0);
    };
    let status = d.get_str("status").ok().and_then(Status::parse);
    let due = cdate(d, "notBefore").is_none_or(|t| t <= now);
    match (status, MongoStore::from_doc(d)) {
        (Some(Status::Pending | Status::Sending), Some(mut record)) if due => {
            let stored = record.attempts as i64;
            record.attempts = n.max(stored + 1) as u32;
            // More tries than outcomes: a lease ended without one. (A record left
            // `sending` by an older version is the same.)
            let stale = n > stored + 1 || status == Some(Status::Sending);
            let claimed = Claimed {
                unknown: unknown_attempt(d, stale, &record),
                record,
            };
            (ClaimResult::Claimed(Box::new(claimed)), false)
        }
        (Some(s), _) if s.is_terminal() => (ClaimResult::Skip("already final"), true),
        (Some(_), Some(_)) => (ClaimResult::Skip("retry not yet due"), true),
        _ => (ClaimResult::Skip("unreadable record"), true),
    }
}

/// The attempt of unknown outcome a claim carries: the stale claim's (the try before
/// this one), else the one recorded by an earlier retry (`unknownAttempt`); looked up from
/// the earliest start known.
fn unknown_attempt(d: &Document, stale: bool, record: &Communication) -> Option<UnknownAttempt> {
    let recorded = match (
        d.get_i32("unknownAttempt"),
        d.get_str("unknownCause").ok().and_then(Ambiguity::parse),
        cdate(d, "unknownSince"),
    ) {
        (Ok(attempt), Some(cause), Some(since)) => Some(UnknownAttempt {
            attempt: attempt as u32,
            cause,
            since,
            provider: d
                .get_str("unknownProvider")
                .ok()
                .and_then(crate::providers::known_name),
        }),
        _ => None,
    };
    if !stale {
        return recorded;
    }
    let since = recorded.map_or(record.updated_at, |u| u.since.min(record.updated_at));
    Some(UnknownAttempt {
        attempt: record.attempts.saturating_sub(1),
        cause: Ambiguity::StaleLease,
        since,
        // The lost claim may have called any provider of the channel.
        provider: None,
    })
}

/// The `$set` fields of a possible duplicate: the flag, its cause and the attempt.
fn duplicate_fields(dup: &UnknownAttempt) -> Document {
    doc! {
        "possibleDuplicate": true,
        "possibleDuplicateCause": dup.cause.as_str(),
        "possibleDuplicateAttempt": dup.attempt as i32,
    }
}

fn error_doc(e: &AttemptError) -> Document {
    let mut d = doc! {"attempt": e.attempt as i32, "at": bdate(e.at), "message": &e.message};
    if let Some(p) = &e.provider {
        d.insert("provider", p);
    }
    if let Some(c) = &e.code {
        d.insert("code", c);
    }
    d
}

/// The errors an outcome adds to the record: those of the providers failed over from,
/// then its own.
fn errors_push(failovers: &[AttemptError], last: Option<&AttemptError>) -> Document {
    let each: Vec<Document> = failovers.iter().chain(last).map(error_doc).collect();
    doc! {"errors": {"$each": each}}
}

/// The `sent` outcomes of one provider (and one possible-duplicate cause): records, their
/// provider message ids, attempt numbers and the attempts that make them possible
/// duplicates, in step.
#[derive(Default)]
struct SentGroup {
    oids: Vec<ObjectId>,
    message_ids: Vec<Bson>,
    attempts: Vec<i32>,
    duplicate_of: Vec<i32>,
}

/// The statements of one outcome write: failures and retries one each, the `sent` ones
/// grouped (see [`sent_statements`]). Only records still `pending` (or `sending`, from an
/// older version) change.
fn outcome_statements(
    owner: &str,
    outcomes: &[(String, u32, Outcome)],
    now: BsonDate,
) -> Result<Vec<Document>, DependencyError> {
    let open = doc! {"$in": ["pending", "sending"]};
    let mut sent: HashMap<(&str, Option<Ambiguity>), SentGroup> = HashMap::new();
    let mut updates = Vec::with_capacity(outcomes.len());
    for (id, attempt, outcome) in outcomes {
        let oid = ObjectId::parse_str(id).map_err(err)?;
        let u = match outcome {
            Outcome::Sent {
                provider,
                provider_message_id,
                possible_duplicate,
                failovers,
            } if !failovers.is_empty() => sent_after_failover(
                provider,
                provider_message_id.as_deref(),
                *possible_duplicate,
                failovers,
                (owner, *attempt),
                now,
            ),
            Outcome::Sent {
                provider,
                provider_message_id,
                possible_duplicate,
                ..
            } => {
                let g = sent
                    .entry((provider.as_str(), possible_duplicate.map(|d| d.cause)))
                    .or_default();
                g.oids.push(oid);
                g.message_ids
                    .push(provider_message_id.clone().map_or(Bson::Null, Bson::String));
                g.attempts.push(*attempt as i32);
                g.duplicate_of
                    .push(possible_duplicate.map_or(0, |d| d.attempt as i32));
                continue;
            }
            Outcome::Failed {
                provider,
                error,
                possible_duplicate,
                failovers,
            } => failed_update(
                provider,
                (failovers, error),
                *possible_duplicate,
                *attempt,
                now,
            ),
            Outcome::Retry {
                provider,
                error,
                not_before,
                possible_duplicate,
                unknown,
                failovers,
            } => retry_update(
                provider,
                (failovers, error),
                *not_before,
                (*possible_duplicate, *unknown),
                *attempt,
                now,
            ),
            Outcome::Suppressed => suppressed_update(*attempt, now),
        };
        updates.push(doc! {"q": {"_id": oid, "status": open.clone()}, "u": u});
    }
    let sent_by = owner.rsplitn(3, ':').last().unwrap_or(owner);
    for ((provider, dup), group) in sent {
        updates.extend(sent_statements(provider, dup, &group, sent_by, now, &open));
    }
    Ok(updates)
}

/// A failure for good: `failed`, the attempt's errors kept (those of the providers failed
/// over from, then its own), a possible duplicate flagged.
fn failed_update(
    provider: &str,
    (failovers, error): (&[AttemptError], &AttemptError),
    possible_duplicate: Option<UnknownAttempt>,
    attempt: u32,
    now: BsonDate,
) -> Document {
    let set = doc! {"status": "failed", "failedAt": now, "updatedAt": now,
    "provider": provider, "lastError": &error.message, "attempts": attempt as i32,
    DEAD_LETTER_AT: now, DEAD_LETTER_REASON: DeadLetterReason::SendFailed.as_str()};
    closing_update(set, possible_duplicate, errors_push(failovers, Some(error)))
}

/// The recipient is on the suppression list: `suppressed` for good, no provider called.
fn suppressed_update(attempt: u32, now: BsonDate) -> Document {
    let set = doc! {"status": "suppressed", "updatedAt": now,
    "attempts": attempt as i32};
    closing_update(set, None, errors_push(&[], None))
}

/// The update of an outcome that ends the record's attempts (`sent`, `failed`): `set`, a
/// possible duplicate flagged, the errors `push`ed, the claim and the next look gone.
fn closing_update(
    mut set: Document,
    possible_duplicate: Option<UnknownAttempt>,
    push: Document,
) -> Document {
    set.extend(
        possible_duplicate
            .as_ref()
            .map(duplicate_fields)
            .unwrap_or_default(),
    );
    doc! {
        "$set": set,
        "$push": push,
        "$unset": {"claimedBy": "", "claimKind": "", "nextAttemptAt": ""},
    }
}

/// A retry: back to `pending` until `not_before`, the attempt's errors kept (those of the
/// providers failed over from, then its own); an attempt of unknown outcome is remembered
/// for the next claim (`unknown*`, the lookup window's start kept from the first, and the
/// provider to ask: none when not known), and a possible duplicate flagged.
fn retry_update(
    provider: &str,
    (failovers, error): (&[AttemptError], &AttemptError),
    not_before: DateTime<Utc>,
    (possible_duplicate, unknown): (Option<UnknownAttempt>, Option<UnknownAttempt>),
    attempt: u32,
    now: BsonDate,
) -> Document {
    let mut set = doc! {"status": "pending", "updatedAt": now, "provider": provider,
    "lastError": &error.message, "notBefore": bdate(not_before),
    "nextAttemptAt": bdate(not_before), "attempts": attempt as i32};
    set.extend(
        possible_duplicate
            .as_ref()
            .map(duplicate_fields)
            .unwrap_or_default(),
    );
    if let Some(u) = unknown {
        set.insert("unknownAttempt", u.attempt as i32);
        set.insert("unknownCause", u.cause.as_str());
        set.insert("unknownSince", bdate(u.since));
        set.insert("unknownProvider", u.provider.map_or(Bson::Null, Bson::from));
    }
    doc! {
        "$set": set,
        "$push": errors_push(failovers, Some(error)),
        "$unset": {"claimedBy": "", "claimKind": ""},
    }
}

/// A `sent` after providers failed over from, on its own (rare: only while a provider
/// fails): the refusals of those providers pushed to `errors` with the send's fields.
fn sent_after_failover(
    provider: &str,
    provider_message_id: Option<&str>,
    possible_duplicate: Option<UnknownAttempt>,
    failovers: &[AttemptError],
    (owner, attempt): (&str, u32),
    now: BsonDate,
) -> Document {
    let sent_by = owner.rsplitn(3, ':').last().unwrap_or(owner);
    let set = doc! {"status": "sent", "sentAt": now, "updatedAt": now, "provider": provider,
    "sentBy": sent_by, "providerMessageId": provider_message_id.map_or(Bson::Null, Bson::from),
    "attempts": attempt as i32};
    closing_update(set, possible_duplicate, errors_push(failovers, None))
}

/// Every `sent` of a group in statements of [`SENT_CHUNK`] records: a pipeline update that
/// picks each record's provider message id and attempt number from arrays. Each record
/// looks itself up in its statement's arrays, so a long array costs every record of it
/// (measured on SecantusDB: 25 a statement writes about 1.35x as fast as 100).
fn sent_statements(
    provider: &str,
    possible_duplicate: Option<Ambiguity>,
    group: &SentGroup,
    sent_by: &str,
    now: BsonDate,
    open: &Document,
) -> Vec<Document> {
    let chunks = group
        .oids
        .chunks(SENT_CHUNK)
        .zip(group.message_ids.chunks(SENT_CHUNK))
        .zip(group.attempts.chunks(SENT_CHUNK))
        .zip(group.duplicate_of.chunks(SENT_CHUNK));
    chunks
        .map(|(((oids, message_ids), attempts), duplicate_of)| {
            let ids: Vec<Bson> = oids.iter().map(|o| Bson::ObjectId(*o)).collect();
            let at = doc! {"$indexOfArray": [Bson::Array(ids), "$_id"]};
            let mut set = doc! {
                "status": "sent", "sentAt": now, "updatedAt": now, "provider": provider,
                "sentBy": sent_by,
                "providerMessageId": {"$arrayElemAt": [message_ids.to_vec(), at.clone()]},
                "attempts": {"$arrayElemAt": [attempts.to_vec(), at.clone()]},
            };
            if let Some(cause) = possible_duplicate {
                set.insert("possibleDuplicate", true);
                set.insert("possibleDuplicateCause", cause.as_str());
                set.insert(
                    "possibleDuplicateAttempt",
                    doc! {"$arrayElemAt": [duplicate_of.to_vec(), at]},
                );
            }
            doc! {
                "q": {"_id": {"$in": oids.to_vec()}, "status": open.clone()},
                "u": [
                    {"$set": set},
                    {"$unset": ["claimedBy", "claimKind", "nextAttemptAt"]},
                ],
                "multi": true,
            }
        })
        .collect()
}

#[async_trait]
impl Store for MongoStore {
    /// One `$in` on `suppressions` for the whole batch; a record's address is normalised
    /// as the list's are (an email address lowercased).
    async fn suppressed(
        &self,
        recipients: &[(String, Channel, String)],
    ) -> Result<Vec<bool>, DependencyError> {
        use crate::clients::suppressions::{key, suppressed_keys, COLLECTION};
        let keys: Vec<String> = recipients
            .iter()
            .map(|(t, c, a)| {
                let a = actors::domain::suppression_address(*c, a).unwrap_or_else(|| a.clone());
                key(t, *c, &a)
            })
            .collect();
        let found = suppressed_keys(&self.db.collection(COLLECTION), &keys).await?;
        Ok(keys.iter().map(|k| found.contains(k)).collect())
    }

    async fn insert_many(
        &self,
        records: &[Communication],
    ) -> Result<Vec<InsertResult>, DependencyError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Not swept before the batch has had time to reach its stream.
        let next_look = Utc::now()
            + chrono::Duration::from_std(self.first_look).unwrap_or(chrono::Duration::seconds(30));
        let docs = records
            .iter()
            .map(|r| MongoStore::to_doc(r, next_look))
            .collect::<Result<Vec<_>, _>>()?;
        let e = match self.coll.insert_many(docs).ordered(false).await {
            Ok(_) => {
                count_written("insert", records.len() as u64);
                return Ok(vec![InsertResult::Inserted; records.len()]);
            }
            Err(e) => e,
        };
        // With ordered(false) every record was tried, and those without a write error are
        // stored. Anything else may have been applied or not: the router reads it back.
        let write_errors = match e.kind.as_ref() {
            mongodb::error::ErrorKind::InsertMany(ime)
                if ime.write_concern_error.is_none()
                    && ime.write_errors.as_ref().is_some_and(|w| !w.is_empty()) =>
            {
                ime.write_errors.clone().unwrap_or_default()
            }
            // Nothing was sent: no server to send it to.
            mongodb::error::ErrorKind::ServerSelection { .. } => return Err(err(e)),
            _ => return Err(ambiguous(e)),
        };
        let results = self.settle_write_errors(records, &write_errors).await?;
        let stored = results
            .iter()
            .filter(|r| matches!(r, InsertResult::Inserted));
        count_written("insert", stored.count() as u64);
        Ok(results)
    }

    async fn stored(&self, ids: &[String]) -> Result<Vec<bool>, DependencyError> {
        let oids: Vec<ObjectId> = object_ids(ids);
        let found: Vec<Document> = self
            .coll
            .find(doc! {"_id": {"$in": oids}, "status": {"$ne": VOID}})
            .projection(doc! {"_id": 1})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        let found: HashSet<String> = found
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok().map(|o| o.to_hex()))
            .collect();
        Ok(ids.iter().map(|id| found.contains(id)).collect())
    }

    /// One upsert a record, matching it only while `pending` or `scheduled` (or already
    /// void): a stored record becomes `void` and gives its idempotency key up; a missing one gets a `void`
    /// placeholder under its id, so its late insert fails on the `_id` index. A record
    /// that has moved on makes the upsert clash on `_id` (11000): too late, counted.
    async fn void(&self, ids: &[String]) -> Result<usize, DependencyError> {
        let now = bdate(Utc::now());
        let updates: Vec<Document> = ids
            .iter()
            .filter_map(|i| ObjectId::parse_str(i).ok())
            .map(|oid| {
                doc! {
                    "q": {"_id": oid, "status": {"$in": ["pending", "scheduled", VOID]}},
                    "u": {
                        "$set": {"status": VOID, "voidedAt": now, "updatedAt": now,
                                 "lastError": "answered 503 before its insert completed; never sent"},
                        // Never accepted: the record keeps nothing of the message.
                        "$unset": {"idempotencyKey": "", TENANT_KEY: "", "nextAttemptAt": "", "sendAt": "",
                                   "scheduledDueAt": "", "msg": "",
                                   "from": "", "to": "", "subject": "", "requestHash": ""},
                    },
                    "upsert": true,
                }
            })
            .collect();
        if updates.is_empty() {
            return Ok(0);
        }
        let reply = self
            .db
            .run_command(
                doc! {"update": COLLECTION, "updates": updates, "ordered": false,
                "writeConcern": self.write_concern.clone()},
            )
            .await
            .map_err(err)?;
        count_written("other", modified(&reply));
        let errors = reply.get_array("writeErrors").cloned().unwrap_or_default();
        let codes = errors
            .iter()
            .filter_map(|w| w.as_document()?.get_i32("code").ok());
        let (too_late, other): (Vec<i32>, Vec<i32>) = codes.partition(|c| *c == 11000);
        if !other.is_empty() {
            return Err(err(format!("void refused: {errors:?}")));
        }
        Ok(too_late.len())
    }

    /// Under a lease of its own, so that a record whose provider call another worker is
    /// making is never failed under it: that worker records the outcome, and the entry is
    /// dead-lettered later (or acknowledged, the record being final by then).
    async fn fail(&self, id: &str, reason: &str) -> Result<FailResult, DependencyError> {
        let oid = ObjectId::parse_str(id).map_err(err)?;
        let token = format!("dead-letter:{}", ObjectId::new().to_hex());
        let leased = self.leases.lease(&[id], &token, DEAD_LETTER_LEASE).await?;
        if leased.first().is_none_or(|n| *n < 0) {
            return Ok(FailResult::Leased);
        }
        let now = bdate(Utc::now());
        // Listed before it is marked (`super::dead_letters`).
        let why = (DeadLetterReason::Undeliverable, now);
        let entered =
            super::dead_letters::enter(&self.coll, &[oid], why, &self.write_concern).await;
        if let Err(e) = entered {
            let _ = self.leases.release(&[(id, Release::Undo)], &token).await;
            return Err(e);
        }
        let r = self
            .coll
            .update_one(
                doc! {"_id": oid, "status": {"$in": ["pending", "sending"]}},
                doc! {
                    "$set": {"status": "failed", "failedAt": now, "updatedAt": now, "lastError": reason,
                        DEAD_LETTER_AT: now, DEAD_LETTER_REASON: DeadLetterReason::Undeliverable.as_str()},
                    "$push": {"errors": {"attempt": 0, "at": now, "code": "dead-lettered", "message": reason}},
                    "$unset": {"claimedBy": "", "nextAttemptAt": ""},
                },
            )
            .await;
        let (how, result) = match &r {
            Ok(u) if u.modified_count > 0 => {
                count_written("other", u.modified_count);
                self.fallbacks_due_now(doc! {"_id": oid}).await;
                (Release::Final, FailResult::Failed)
            }
            _ => (Release::Undo, FailResult::AlreadyFinal),
        };
        if let Err(e) = self.leases.release(&[(id, how)], &token).await {
            tracing::debug!(error = %e, "dead-letter lease not given back; it expires");
        }
        r.map_err(err)?;
        Ok(result)
    }

    /// A claim costs MongoDB one read and no write: the lease that makes one worker the
    /// only one to call the provider for a record lives in Redis ([`RedisLeases`]:
    /// `lease:{id}`, expiring after `stale_after`), together with the record's try count
    /// (`tries:{id}`). The record itself stays `pending` until its outcome is recorded,
    /// which is the one write a send costs. A try count beyond the stored attempts means an earlier lease
    /// ended without an outcome: its provider call may have gone through.
    async fn claim(
        &self,
        ids: &[String],
        owner: &str,
        stale_after: Duration,
    ) -> Result<Vec<ClaimResult>, DependencyError> {
        self.remember_lease(stale_after);
        let unique = unique_ids(ids);
        let tries = self.leases.lease(&unique, owner, stale_after).await?;
        let try_of: HashMap<&str, i64> = unique.iter().copied().zip(tries).collect();
        let leased: Vec<&str> = unique
            .iter()
            .copied()
            .filter(|id| try_of.get(id).is_some_and(|n| *n > 0))
            .collect();
        let docs = self.read_leased(&leased, owner).await?;
        let by_id: HashMap<String, &Document> = docs
            .iter()
            .filter_map(|d| Some((d.get_object_id("_id").ok()?.to_hex(), d)))
            .collect();
        let now = Utc::now();
        let mut undo = Vec::new();
        let mut answered = HashSet::new();
        let results = ids
            .iter()
            .map(|id| {
                if !answered.insert(id.as_str()) {
                    return ClaimResult::Skip("duplicate entry in the same batch");
                }
                let n = try_of.get(id.as_str()).copied().unwrap_or(0);
                let (result, release) = claim_one(n, by_id.get(id).copied(), now);
                if release {
                    undo.push((id.as_str(), Release::Undo));
                }
                result
            })
            .collect();
        if let Err(e) = self.leases.release(&undo, owner).await {
            tracing::debug!(error = %e, "leases not given back; they expire");
        }
        Ok(results)
    }

    async fn renew(
        &self,
        owner: &str,
        claims: &[(String, u32)],
        stale_after: Duration,
    ) -> Result<Vec<bool>, DependencyError> {
        self.remember_lease(stale_after);
        let claims: Vec<(&str, u32)> = claims.iter().map(|(id, a)| (id.as_str(), *a)).collect();
        self.leases.renew(&claims, owner, stale_after).await
    }

    /// One write: due again at `not_before` (records still open only), then the leases go
    /// back with their tries uncounted.
    async fn reschedule(
        &self,
        owner: &str,
        ids: &[String],
        not_before: DateTime<Utc>,
    ) -> Result<(), DependencyError> {
        let oids: Vec<ObjectId> = object_ids(ids);
        if oids.is_empty() {
            return Ok(());
        }
        let due = bdate(not_before);
        let r = self
            .coll
            .update_many(
                doc! {"_id": {"$in": oids}, "status": {"$in": ["pending", "sending"]}},
                doc! {"$set": {"notBefore": due, "nextAttemptAt": due, "updatedAt": bdate(Utc::now())}},
            )
            .await
            .map_err(err)?;
        count_written("other", r.modified_count);
        let undo: Vec<(&str, Release)> =
            ids.iter().map(|id| (id.as_str(), Release::Undo)).collect();
        if let Err(e) = self.leases.release(&undo, owner).await {
            tracing::debug!(error = %e, "leases not given back; they expire");
        }
        Ok(())
    }

    /// Fenced by the leases (see [`MongoStore::fence`]), then one write for the outcomes
    /// of the claims that hold theirs (see [`outcome_statements`]), then those leases go
    /// back. A statement that matched nothing (the record moved on under another worker's
    /// claim meanwhile) is found by reading the batch back, and fenced too.
    async fn record_outcomes(
        &self,
        owner: &str,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<Vec<String>, DependencyError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let (held, mut fenced) = self.fence(owner, outcomes).await?;
        if !held.is_empty() {
            let now = bdate(Utc::now());
            let failed: Vec<String> = held
                .iter()
                .filter(|(_, _, o)| matches!(o, Outcome::Failed { .. }))
                .map(|(id, _, _)| id.clone())
                .collect();
            // Listed before they are marked (`super::dead_letters`).
            let reason = (DeadLetterReason::SendFailed, now);
            let wc = &self.write_concern;
            super::dead_letters::enter(&self.coll, &object_ids(&failed), reason, wc).await?;
            let updates = outcome_statements(owner, &held, now)?;
            let reply = self.run_update_in_turns(updates).await?;
            count_written("outcome", modified(&reply));
            if reply_count(&reply, "n").is_none_or(|n| n < held.len() as i64) {
                fenced.extend(self.not_written(&held).await?);
            }
            if !failed.is_empty() {
                self.fallbacks_due_now(doc! {"_id": {"$in": object_ids(&failed)}})
                    .await;
            }
        }
        self.flag_lost(outcomes, &fenced).await?;
        // Last: a failure before this leaves the leases held for the sender's next try,
        // which then finds its own writes made rather than taking them for lost ones.
        let release: Vec<(&str, Release)> = held
            .iter()
            .filter(|(id, _, _)| !fenced.contains(id))
            .map(|(id, _, o)| {
                let how = match o {
                    Outcome::Retry { .. } => Release::Keep,
                    _ => Release::Final,
                };
                (id.as_str(), how)
            })
            .collect();
        if let Err(e) = self.leases.release(&release, owner).await {
            tracing::debug!(error = %e, "leases not given back; they expire");
        }
        Ok(fenced)
    }

    async fn take_due(
        &self,
        now: DateTime<Utc>,
        recheck: Duration,
        limit: usize,
        channels: &[SweepScope],
    ) -> Result<Vec<Communication>, DependencyError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let look = super::sweep::Look {
            now,
            recheck,
            limit,
        };
        let docs = super::sweep::due(&self.coll, look, channels, &self.sweep_cursor).await?;
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        let oids: Vec<Bson> = docs.iter().filter_map(|d| d.get("_id").cloned()).collect();
        let next = bdate(
            now + chrono::Duration::from_std(recheck).unwrap_or(chrono::Duration::seconds(30)),
        );
        let swept = self
            .coll
            .update_many(
                doc! {"_id": {"$in": oids}, "nextAttemptAt": {"$lte": bdate(now)}},
                doc! {"$set": {"nextAttemptAt": next, "queuedAt": bdate(now)}},
            )
            .await
            .map_err(err)?;
        count_written("sweep", swept.modified_count);
        Ok(docs.iter().filter_map(MongoStore::from_doc).collect())
    }

    /// One `update` command for the batch (receipts without an error grouped by provider
    /// and status into one statement each, the others one statement each), then one read of
    /// every record concerned. A record this batch moved carries the batch's stamp. Every
    /// statement names the reporting provider: a receipt moves only that provider's records.
    async fn apply_receipts(
        &self,
        receipts: &[ReceiptUpdate],
    ) -> Result<Vec<ReceiptResult>, DependencyError> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let stamp = ObjectId::new().to_hex();
        let reply = self
            .run_update_in_turns(receipt_statements(receipts, &stamp, Utc::now()))
            .await?;
        count_written("receipt", modified(&reply));
        let failed: Vec<&str> = receipts
            .iter()
            .filter(|r| r.status == Status::Failed)
            .map(|r| r.provider_message_id.as_str())
            .collect();
        if !failed.is_empty() {
            self.fallbacks_due_now(doc! {"providerMessageId": {"$in": failed}})
                .await;
        }
        let pmids: Vec<&str> = receipts
            .iter()
            .map(|r| r.provider_message_id.as_str())
            .collect();
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"providerMessageId": {"$in": pmids}})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(receipts
            .iter()
            .map(|r| receipt_result(r, &docs, &stamp))
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<Communication>, DependencyError> {
        let Ok(oid) = ObjectId::parse_str(id) else {
            return Ok(None);
        };
        let d = self.coll.find_one(doc! {"_id": oid}).await.map_err(err)?;
        Ok(d.as_ref().and_then(MongoStore::from_doc))
    }

    async fn records(&self, ids: &[String]) -> Result<Vec<Communication>, DependencyError> {
        let oids: Vec<ObjectId> = object_ids(ids);
        if oids.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"_id": {"$in": oids}})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(docs.iter().filter_map(MongoStore::from_doc).collect())
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.db.run_command(doc! {"ping": 1}).await.map_err(err)?;
        Ok(())
    }
}

/// The update statements for a batch of receipts (see `apply_receipts`).
fn receipt_statements(
    receipts: &[ReceiptUpdate],
    stamp: &str,
    now: chrono::DateTime<Utc>,
) -> Vec<Document> {
    let now = bdate(now);
    let mut plain: HashMap<(Status, &str), Vec<&str>> = HashMap::new();
    let mut updates = Vec::new();
    for r in receipts {
        let field = format!("{}At", r.status.as_str());
        let preds = r.status.receipt_predecessors().to_vec();
        match &r.error {
            None => plain
                .entry((r.status, r.provider.as_str()))
                .or_default()
                .push(r.provider_message_id.as_str()),
            Some((code, message)) => updates.push(doc! {
                "q": {"providerMessageId": &r.provider_message_id, "provider": &r.provider,
                      "status": {"$in": preds}},
                "u": {
                    "$set": {"status": r.status.as_str(), "updatedAt": now, field: now,
                             "lastError": message, "receiptStamp": stamp},
                    "$push": {"errors": {"attempt": 0, "at": now, "code": code, "message": message}},
                },
            }),
        }
    }
    for ((status, provider), pmids) in plain {
        let field = format!("{}At", status.as_str());
        updates.push(doc! {
            "q": {"providerMessageId": {"$in": pmids}, "provider": provider,
                  "status": {"$in": status.receipt_predecessors().to_vec()}},
            "u": {"$set": {"status": status.as_str(), "updatedAt": now, field: now,
                           "receiptStamp": stamp}},
            "multi": true,
        });
    }
    updates
}

/// What one receipt did, from the records read back after the batch's update: applied
/// (the record carries this batch's stamp and the receipt's status), not movable (the
/// record is in a later state, or another provider sent it), or unknown (no record yet).
fn receipt_result(r: &ReceiptUpdate, docs: &[Document], stamp: &str) -> ReceiptResult {
    let mut same_id = docs
        .iter()
        .filter(|d| d.get_str("providerMessageId").ok() == Some(r.provider_message_id.as_str()))
        .peekable();
    if same_id.peek().is_none() {
        return ReceiptResult::Unknown;
    }
    let Some(d) = same_id.find(|d| d.get_str("provider").ok() == Some(r.provider.as_str())) else {
        return ReceiptResult::NotMovable;
    };
    let applied = d.get_str("receiptStamp").ok() == Some(stamp)
        && d.get_str("status").ok() == Some(r.status.as_str());
    match MongoStore::from_doc(d) {
        Some(rec) if applied => ReceiptResult::Applied(Box::new(rec)),
        _ => ReceiptResult::NotMovable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every date of a record comes out with three fraction digits, at any depth.
    #[test]
    fn api_dates_have_three_fraction_digits() {
        let at = |ms: i64| BsonDate::from_millis(1_764_331_200_000 + ms);
        let d = doc! {"createdAt": at(120), "errors": [{"at": at(0)}], "sentAt": at(7)};
        let v = MongoStore::to_api_json(&d);
        assert_eq!(v["createdAt"], "2025-11-28T12:00:00.120Z");
        assert_eq!(v["errors"][0]["at"], "2025-11-28T12:00:00.000Z");
        assert_eq!(v["sentAt"], "2025-11-28T12:00:00.007Z");
    }

    fn record(status: &str, attempts: i32, not_before: DateTime<Utc>) -> Document {
        doc! {
            "_id": ObjectId::new(), "tenant": "t", "type": "sms", "from": "+15550001111",
            "to": "+15557654321", "msg": "hi", "status": status, "attempts": attempts,
            "createdAt": bdate(Utc::now()), "notBefore": bdate(not_before), "errors": [],
        }
    }

    /// (try number, status, stored attempts, due) → (answer, attempts claimed, possible
    /// duplicate, lease undone).
    #[test]
    fn claim_decisions() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(60);
        let claimed = |attempts, dup| Some((attempts, dup));
        for (n, status, stored, due, want, undo) in [
            (-1, "pending", 0, true, None, false),
            (1, "pending", 0, true, claimed(1, false), false),
            (3, "pending", 1, true, claimed(3, true), false),
            (2, "pending", 1, true, claimed(2, false), false),
            (1, "sending", 0, true, claimed(1, true), false),
            (1, "sent", 1, true, None, true),
            (1, "failed", 1, true, None, true),
            (1, "pending", 1, false, None, true),
        ] {
            let d = record(status, stored, if due { now } else { later });
            let (got, undone) = claim_one(n, Some(&d), now);
            let got = match got {
                ClaimResult::Claimed(c) => Some((
                    c.record.attempts,
                    c.unknown.map(|u| u.cause) == Some(Ambiguity::StaleLease),
                )),
                _ => None,
            };
            assert_eq!(
                (got, undone),
                (want, undo),
                "n={n} {status} stored={stored}"
            );
        }
    }

    #[test]
    fn claims_that_are_not_sends() {
        let now = Utc::now();
        assert_eq!(claim_one(-1, None, now), (ClaimResult::Busy, false));
        let missing = ClaimResult::Skip("no such record");
        assert_eq!(claim_one(1, None, now), (missing.clone(), true));
        assert_eq!(claim_one(0, None, now), (missing, false));
        let unreadable = doc! {"_id": ObjectId::new(), "status": "pending"};
        assert_eq!(
            claim_one(1, Some(&unreadable), now),
            (ClaimResult::Skip("unreadable record"), true)
        );
        let final_doc = record("delivered", 1, now);
        assert_eq!(
            claim_one(1, Some(&final_doc), now).0,
            ClaimResult::Skip("already final")
        );
    }

    fn sent(provider: &str, dup: bool) -> Outcome {
        Outcome::Sent {
            provider: provider.into(),
            provider_message_id: Some("m".into()),
            possible_duplicate: dup.then_some(UnknownAttempt {
                attempt: 1,
                cause: Ambiguity::Timeout,
                since: Utc::now(),
                provider: Some("twilio"),
            }),
            failovers: Vec::new(),
        }
    }

    /// A stale claim and a recorded unknown attempt both reach the next claim; the lookup
    /// starts at the earliest of them.
    #[test]
    fn a_claim_carries_the_unknown_attempt() {
        let now = Utc::now();
        let first = now - chrono::Duration::seconds(90);
        let mut d = record("pending", 1, now);
        let none = claim_one(2, Some(&d), now).0;
        assert!(matches!(none, ClaimResult::Claimed(c) if c.unknown.is_none()));
        d.insert("unknownAttempt", 1);
        d.insert("unknownCause", "ambiguous_5xx");
        d.insert("unknownSince", bdate(first));
        let want = UnknownAttempt {
            attempt: 1,
            cause: Ambiguity::Gateway5xx,
            // Stored to the millisecond.
            since: cdate(&d, "unknownSince").unwrap(),
            provider: None,
        };
        let ClaimResult::Claimed(c) = claim_one(2, Some(&d), now).0 else {
            panic!("not claimed");
        };
        assert_eq!(c.unknown, Some(want));
        // Try 3 with one outcome stored: try 2 went stale.
        let ClaimResult::Claimed(c) = claim_one(3, Some(&d), now).0 else {
            panic!("not claimed");
        };
        let u = c.unknown.unwrap();
        assert_eq!(
            (u.attempt, u.cause, u.since),
            (2, Ambiguity::StaleLease, want.since)
        );
    }

    /// Every outcome of a resend after an unknown attempt flags the record, with the cause
    /// and the attempt; a retry of unknown outcome is remembered for the next claim.
    #[test]
    fn possible_duplicates_are_flagged_whatever_the_outcome() {
        let error = AttemptError {
            attempt: 2,
            at: Utc::now(),
            provider: Some("meta-whatsapp".into()),
            code: Some("timeout".into()),
            message: "no answer".into(),
        };
        let dup = UnknownAttempt {
            attempt: 1,
            cause: Ambiguity::Timeout,
            since: Utc::now(),
            provider: Some("meta-whatsapp"),
        };
        let outcomes = [
            sent("meta-whatsapp", true),
            Outcome::Failed {
                provider: "meta-whatsapp".into(),
                error: error.clone(),
                possible_duplicate: Some(dup),
                failovers: Vec::new(),
            },
            Outcome::Retry {
                provider: "meta-whatsapp".into(),
                error,
                not_before: Utc::now(),
                possible_duplicate: Some(dup),
                unknown: Some(UnknownAttempt { attempt: 2, ..dup }),
                failovers: Vec::new(),
            },
        ];
        let outcomes: Vec<(String, u32, Outcome)> = outcomes
            .into_iter()
            .map(|o| (ObjectId::new().to_hex(), 2, o))
            .collect();
        let statements = outcome_statements("h:whatsapp:0", &outcomes, bdate(Utc::now())).unwrap();
        assert_eq!(statements.len(), 3);
        for st in &statements {
            let set = match st.get_array("u") {
                Ok(pipeline) => pipeline[0].as_document().unwrap().get_document("$set"),
                Err(_) => st.get_document("u").unwrap().get_document("$set"),
            }
            .unwrap();
            assert_eq!(set.get_bool("possibleDuplicate").ok(), Some(true), "{st}");
            assert_eq!(
                set.get_str("possibleDuplicateCause").ok(),
                Some("timeout"),
                "{st}"
            );
            if set.get_str("status").ok() == Some("pending") {
                assert_eq!(set.get_i32("possibleDuplicateAttempt").ok(), Some(1));
                assert_eq!(set.get_i32("unknownAttempt").ok(), Some(2));
                assert_eq!(set.get_str("unknownCause").ok(), Some("timeout"));
            }
        }
    }

    #[test]
    fn delivery_writes_go_in_commands_of_at_most_25_records_in_order() {
        let one = |n: i32| doc! {"q": {"_id": n}, "u": {"$set": {"n": n}}};
        let many = |k: usize| {
            let ids: Vec<Bson> = (0..k as i32).map(Bson::Int32).collect();
            doc! {"q": {"_id": {"$in": ids}, "status": "pending"}, "u": {"$set": {"k": k as i32}}}
        };
        assert_eq!(statement_records(&one(1)), 1);
        assert_eq!(statement_records(&many(25)), 25);
        let statements = vec![many(25), one(1), one(2), many(20), many(10), one(3)];
        let sizes: Vec<Vec<usize>> = in_turns(statements.clone(), WRITE_COMMAND_RECORDS)
            .iter()
            .map(|c| c.iter().map(statement_records).collect())
            .collect();
        assert_eq!(sizes, [vec![25], vec![1, 1, 20], vec![10, 1]]);
        let flat: Vec<Document> = in_turns(statements.clone(), 25).concat();
        assert_eq!(flat, statements, "every statement once, in order");
        let receipts: Vec<Document> = (0..60).map(one).collect();
        let sizes: Vec<usize> = in_turns(receipts, 25).iter().map(Vec::len).collect();
        assert_eq!(sizes, [25, 25, 10]);
        assert!(in_turns(Vec::new(), 25).is_empty());
    }

    /// One statement per failure or retry; the `sent` ones grouped by provider and
    /// possible-duplicate flag, in statements of at most `SENT_CHUNK` records.
    #[test]
    fn outcome_statements_group_the_sent_ones() {
        let error = AttemptError {
            attempt: 1,
            at: Utc::now(),
            provider: Some("twilio".into()),
            code: Some("21211".into()),
            message: "invalid".into(),
        };
        let mut outcomes: Vec<(String, u32, Outcome)> = (0..SENT_CHUNK + 1)
            .map(|_| (ObjectId::new().to_hex(), 1, sent("twilio", false)))
            .collect();
        outcomes.push((ObjectId::new().to_hex(), 2, sent("twilio", true)));
        outcomes.push((ObjectId::new().to_hex(), 1, sent("smtp", false)));
        let failed = Outcome::Failed {
            provider: "twilio".into(),
            error: error.clone(),
            possible_duplicate: None,
            failovers: Vec::new(),
        };
        outcomes.push((ObjectId::new().to_hex(), 1, failed));
        let retry = Outcome::Retry {
            provider: "twilio".into(),
            error,
            not_before: Utc::now(),
            possible_duplicate: None,
            unknown: None,
            failovers: Vec::new(),
        };
        outcomes.push((ObjectId::new().to_hex(), 1, retry));
        let statements = outcome_statements("host-1:sms:0", &outcomes, bdate(Utc::now())).unwrap();
        // failed, retry; twilio 25 + 1; twilio duplicate; smtp.
        assert_eq!(statements.len(), 2 + 2 + 1 + 1);
        let multi: Vec<usize> = statements
            .iter()
            .filter(|s| s.get_bool("multi").unwrap_or(false))
            .map(|s| s.get_document("q").unwrap().get_document("_id").unwrap())
            .map(|q| q.get_array("$in").unwrap().len())
            .collect();
        let mut sizes = multi.clone();
        sizes.sort_unstable();
        assert_eq!(sizes, [1, 1, 1, SENT_CHUNK]);
        let set = |s: &Document| s.get_array("u").unwrap()[0].as_document().unwrap().clone();
        for s in statements.iter().filter(|s| s.get_bool("multi").is_ok()) {
            let set = set(s).get_document("$set").unwrap().clone();
            assert_eq!(set.get_str("sentBy").unwrap(), "host-1");
        }
        assert!(outcome_statements(
            "o",
            &[("not-an-id".into(), 1, sent("x", false))],
            bdate(Utc::now())
        )
        .is_err());
    }
}
