//! Dead letters on `communications` records: the list of
//! `GET /api/v1/dead-letters` and the replay of `POST /api/v1/dead-letters/{id}/replay`.
//!
//! A dead letter is a record the service itself ended `failed`: its sender failed it (a
//! permanent refusal, or its retries spent), or its stream entry was delivered
//! `MAX_DELIVERIES` times without an outcome. Both writes set [`DEAD_LETTER_AT`] and
//! [`DEAD_LETTER_REASON`] with the failure (`src/clients/mongo.rs`); a provider's
//! receipt that reports a failure after a send is not one. The record's mark is the truth.
//!
//! The list is found through `dead_letters` ([`COLLECTION`]): an entry a dead letter
//! (`_id` the record's id, its tenant, when, why), indexed by tenant and time, so a page
//! is one range read, newest first, and then one read of its records by `_id`. Why not an
//! index on `communications.deadLetterAt`: SecantusDB derives every index's keys for every
//! document it writes, a sparse index whose field the document lacks included, so such an
//! index cost every message's three writes, though few messages ever fail for good
//! (README, "What each index costs SecantusDB"). An entry is written ([`enter`]) before
//! the record's mark, so every marked record is listed; a failure between the two leaves
//! an entry whose record is not marked, and the list leaves out every entry whose record
//! is not (or no longer) a dead letter: such an entry shortens its page by one and is
//! otherwise harmless (the record's next failure for good writes it again).
//!
//! A replay, under the record's lease in Redis (the one a sender claims it with, as a
//! cancel takes it), sets `failed` with a dead-letter mark to `pending` in one
//! compare-and-set: `attemptBase` becomes its attempts (the sender's retry budget counts
//! from there; attempt numbers keep growing, so search's versions do too), `replays` +1,
//! `replayedAt`, the mark gone; then its `dead_letters` entry goes. Then the record goes on
//! its stream; if Redis does not take it, the OutboxSweeper queues it at `nextAttemptAt`. A second replay
//! finds no mark (or the lease held) and is refused: a replay sends once.
//!
//! Dead letters of an earlier version (marked records, the sparse index `dead_letters` on
//! `communications`, no entries) are entered at the first start of this one
//! ([`adopt_earlier_dead_letters`]), then the old index goes.

use crate::clients::lease::{RedisLeases, Release};
use crate::clients::mongo::MongoStore;
use actors::ports::{Dependency, DependencyError};
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime as BsonDate, Document};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};
use std::sync::Arc;
use std::time::Duration;

/// When the record became a dead letter; present only while it is one.
pub const DEAD_LETTER_AT: &str = "deadLetterAt";
/// Why (a [`DeadLetterReason`]); present only while it is one.
pub const DEAD_LETTER_REASON: &str = "deadLetterReason";

/// The entries: one a dead letter, `_id` the record's id.
pub const COLLECTION: &str = "dead_letters";
/// The sparse index on `communications.deadLetterAt` the entries replace; dropped at
/// start-up once an earlier version's dead letters are entered.
pub const OLD_INDEX: &str = "dead_letters";
/// The entries' index: a tenant's, newest first.
const ENTRIES_INDEX: &str = "tenant_newest";

/// How long a replay holds a record's lease (one write).
const REPLAY_LEASE: Duration = Duration::from_secs(30);

/// The most records a page holds.
pub const MAX_PAGE: u32 = 100;

/// Why a record is a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Its sender failed it: a permanent refusal, or its attempts spent.
    SendFailed,
    /// Its stream entry was delivered `MAX_DELIVERIES` times without an outcome.
    Undeliverable,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::SendFailed => "send_failed",
            DeadLetterReason::Undeliverable => "undeliverable_entry",
        }
    }
}

/// What a replay came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    /// Back to `pending`: the record as it is now.
    Replayed(Document),
    /// Not a dead letter (any more), or being worked on: its status.
    NotReplayable(String),
    /// No such record of this tenant.
    NotFound,
}

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

pub struct MongoDeadLetters {
    coll: Collection<Document>,
    entries: Collection<Document>,
    leases: Arc<RedisLeases>,
    /// When the OutboxSweeper queues a replayed record whose entry did not go on its stream.
    first_look: Duration,
}

impl MongoDeadLetters {
    pub fn new(store: &MongoStore, first_look: Duration) -> MongoDeadLetters {
        MongoDeadLetters {
            coll: store.collection().clone(),
            entries: entries_of(store.collection()),
            leases: store.leases().clone(),
            first_look,
        }
    }

    /// Page `page` (from 1) of `size` of `tenant`'s dead letters, newest first, and
    /// whether a next page may hold more (this page's entries were `size`).
    pub async fn list(
        &self,
        tenant: &str,
        page: u32,
        size: u32,
    ) -> Result<(Vec<Document>, bool), DependencyError> {
        let skip = u64::from(page.saturating_sub(1)) * u64::from(size);
        let entries: Vec<Document> = self
            .entries
            .find(doc! {"tenant": tenant})
            // The id breaks ties (a batch's failures share their time), so pages do not
            // overlap.
            .sort(doc! {"tenant": 1, "at": -1, "_id": -1})
            .skip(skip)
            .limit(i64::from(size))
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        let full = entries.len() as u32 == size;
        let ids: Vec<Bson> = entries
            .iter()
            .filter_map(|e| e.get_object_id("_id").ok())
            .map(Bson::ObjectId)
            .collect();
        let mut records: Vec<Document> = self
            .coll
            .find(doc! {"_id": {"$in": &ids}, "tenant": tenant, DEAD_LETTER_AT: {"$exists": true}})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        // In the entries' order (newest first).
        let place = |d: &Document| {
            let id = d.get_object_id("_id").ok();
            ids.iter().position(|i| i.as_object_id() == id)
        };
        records.sort_by_key(place);
        Ok((records, full))
    }

    /// Replay `tenant`'s dead letter `id` (see the module's text). The caller appends its
    /// stream entry.
    pub async fn replay(&self, id: &str, tenant: &str) -> Result<Replay, DependencyError> {
        let Ok(oid) = ObjectId::parse_str(id) else {
            return Ok(Replay::NotFound);
        };
        let mine = doc! {"_id": oid, "tenant": tenant};
        let Some(found) = self.coll.find_one(mine.clone()).await.map_err(err)? else {
            return Ok(Replay::NotFound);
        };
        let status = found.get_str("status").unwrap_or_default().to_string();
        if !found.contains_key(DEAD_LETTER_AT) {
            return Ok(Replay::NotReplayable(status));
        }
        let token = format!("replay:{}", ObjectId::new().to_hex());
        let tries = self.leases.lease(&[id], &token, REPLAY_LEASE).await?;
        if tries.first().is_none_or(|n| *n < 0) {
            return Ok(Replay::NotReplayable(status));
        }
        let attempts = found.get_i32("attempts").unwrap_or(0);
        let replayed = self.set_pending(mine, attempts).await;
        if let Ok(Some(_)) = &replayed {
            // Its entry goes; one left behind is left out of the list (see the module).
            if let Err(e) = self.entries.delete_one(doc! {"_id": oid}).await {
                tracing::debug!(error = %e, "a replayed dead letter's entry not removed");
            }
        }
        // Final: the try count goes, so the next claim is a fresh first try.
        let how = match replayed {
            Ok(Some(_)) => Release::Final,
            _ => Release::Undo,
        };
        if let Err(e) = self.leases.release(&[(id, how)], &token).await {
            tracing::debug!(error = %e, "replay lease not given back; it expires");
        }
        Ok(match replayed? {
            Some(d) => Replay::Replayed(d),
            None => Replay::NotReplayable(status),
        })
    }

    /// The compare-and-set: a `failed` dead letter with `attempts` becomes `pending`.
    async fn set_pending(
        &self,
        mine: Document,
        attempts: i32,
    ) -> Result<Option<Document>, DependencyError> {
        let now = Utc::now();
        let look = now + chrono::Duration::from_std(self.first_look).unwrap_or_default();
        let (now, look) = (
            BsonDate::from_millis(now.timestamp_millis()),
            BsonDate::from_millis(look.timestamp_millis()),
        );
        let mut filter = mine;
        filter.insert("status", "failed");
        filter.insert("attempts", attempts);
        filter.insert(DEAD_LETTER_AT, doc! {"$exists": true});
        self.coll
            .find_one_and_update(
                filter,
                doc! {
                    "$set": {
                        "status": "pending", "attemptBase": attempts, "replayedAt": now,
                        "updatedAt": now, "notBefore": now, "queuedAt": now,
                        "nextAttemptAt": look,
                    },
                    "$inc": {"replays": 1},
                    "$unset": {DEAD_LETTER_AT: "", DEAD_LETTER_REASON: "", "failedAt": ""},
                },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(err)
    }
}

fn entries_of(records: &Collection<Document>) -> Collection<Document> {
    crate::clients::mongo::sibling(records, COLLECTION)
}

/// Enters the records `ids` as dead letters (`reason`, `at`), with their tenants read
/// from the records: before their marks are written (see the module). One read and one
/// `update` command of one upsert each, with the records' `write_concern`.
pub async fn enter(
    records: &Collection<Document>,
    ids: &[ObjectId],
    (reason, at): (DeadLetterReason, BsonDate),
    write_concern: &Document,
) -> Result<(), DependencyError> {
    if ids.is_empty() {
        return Ok(());
    }
    let found: Vec<Document> = records
        .find(doc! {"_id": {"$in": ids}})
        .projection(doc! {"tenant": 1})
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)?;
    let updates: Vec<Document> = found
        .iter()
        .filter_map(|d| {
            let id = d.get_object_id("_id").ok()?;
            let tenant = d
                .get_str("tenant")
                .unwrap_or(actors::domain::DEFAULT_TENANT);
            Some(doc! {
                "q": {"_id": id},
                "u": {"$set": {"tenant": tenant, "at": at, "reason": reason.as_str()}},
                "upsert": true,
            })
        })
        .collect();
    if updates.is_empty() {
        return Ok(());
    }
    let db = records.client().database(&records.namespace().db);
    let reply = db
        .run_command(
            doc! {"update": COLLECTION, "updates": updates, "ordered": false,
            "writeConcern": write_concern.clone()},
        )
        .await
        .map_err(err)?;
    match reply.get_array("writeErrors") {
        Ok(errors) if !errors.is_empty() => {
            Err(err(format!("dead letters not entered: {errors:?}")))
        }
        _ => Ok(()),
    }
}

/// The entries' index (a tenant's, newest first). Idempotent.
pub async fn ensure_index(records: &Collection<Document>) -> Result<(), DependencyError> {
    entries_of(records)
        .create_index(
            IndexModel::builder()
                .keys(doc! {"tenant": 1, "at": -1})
                .options(
                    IndexOptions::builder()
                        .name(ENTRIES_INDEX.to_string())
                        .build(),
                )
                .build(),
        )
        .await
        .map_err(err)?;
    Ok(())
}

/// Enters the dead letters of an earlier version (marked records without an entry);
/// returns how many. One read of the marked records (through the old index while it
/// exists), one upsert each (once, at the first start of this version).
pub async fn adopt_earlier_dead_letters(
    records: &Collection<Document>,
) -> Result<usize, DependencyError> {
    let marked: Vec<Document> = records
        .find(doc! {DEAD_LETTER_AT: {"$exists": true}})
        .projection(doc! {"tenant": 1, DEAD_LETTER_AT: 1, DEAD_LETTER_REASON: 1})
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)?;
    let entries = entries_of(records);
    let mut n = 0;
    for d in &marked {
        let (Ok(id), Ok(at)) = (d.get_object_id("_id"), d.get_datetime(DEAD_LETTER_AT)) else {
            continue;
        };
        let tenant = d
            .get_str("tenant")
            .unwrap_or(actors::domain::DEFAULT_TENANT);
        let reason = d
            .get_str(DEAD_LETTER_REASON)
            .unwrap_or(DeadLetterReason::SendFailed.as_str());
        entries
            .update_one(
                doc! {"_id": id},
                doc! {"$set": {"tenant": tenant, "at": at, "reason": reason}},
            )
            .upsert(true)
            .await
            .map_err(err)?;
        n += 1;
    }
    Ok(n)
}
