//! Dead letters on `communications` records: the list of
//! `GET /api/v1/dead-letters` and the replay of `POST /api/v1/dead-letters/{id}/replay`.
//!
//! A dead letter is a record the service itself ended `failed`: its sender failed it (a
//! permanent refusal, or its retries spent), or its stream entry was delivered
//! `MAX_DELIVERIES` times without an outcome. Both writes set [`DEAD_LETTER_AT`] and
//! [`DEAD_LETTER_REASON`] with the failure (`src/clients/mongo.rs`); a provider's
//! receipt that reports a failure after a send is not one. The sparse index
//! `dead_letters` on [`DEAD_LETTER_AT`] holds the dead letters alone, so a page is one
//! range read, newest first, filtered by tenant.
//!
//! A replay, under the record's lease in Redis (the one a sender claims it with, as a
//! cancel takes it), sets `failed` with a dead-letter mark to `pending` in one
//! compare-and-set: `attemptBase` becomes its attempts (the sender's retry budget counts
//! from there; attempt numbers keep growing, so search's versions do too), `replays` +1,
//! `replayedAt`, the mark gone. Then its entry goes on its stream; if Redis does not take
//! it, the OutboxSweeper queues it at `nextAttemptAt`. A second replay finds no mark (or
//! the lease held) and is refused: a replay sends once.

use crate::clients::lease::{RedisLeases, Release};
use crate::clients::mongo::MongoStore;
use actors::ports::{Dependency, DependencyError};
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, DateTime as BsonDate, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use std::sync::Arc;
use std::time::Duration;

/// When the record became a dead letter; present only while it is one.
pub const DEAD_LETTER_AT: &str = "deadLetterAt";
/// Why (a [`DeadLetterReason`]); present only while it is one.
pub const DEAD_LETTER_REASON: &str = "deadLetterReason";

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
    leases: Arc<RedisLeases>,
    /// When the OutboxSweeper queues a replayed record whose entry did not go on its stream.
    first_look: Duration,
}

impl MongoDeadLetters {
    pub fn new(store: &MongoStore, first_look: Duration) -> MongoDeadLetters {
        MongoDeadLetters {
            coll: store.collection().clone(),
            leases: store.leases().clone(),
            first_look,
        }
    }

    /// Page `page` (from 1) of `size` of `tenant`'s dead letters, newest first.
    pub async fn list(
        &self,
        tenant: &str,
        page: u32,
        size: u32,
    ) -> Result<Vec<Document>, DependencyError> {
        let skip = u64::from(page.saturating_sub(1)) * u64::from(size);
        self.coll
            .find(doc! {DEAD_LETTER_AT: {"$exists": true}, "tenant": tenant})
            .sort(doc! {DEAD_LETTER_AT: -1})
            .skip(skip)
            .limit(i64::from(size))
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)
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
