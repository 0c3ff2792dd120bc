//! Scheduled sends and cancels on `communications` records: implements
//! `actors::ports::ScheduledSends` (the SchedulerActor's due range and its compare-and-set)
//! and the cancel of `DELETE /api/v1/communication/{id}`.
//!
//! A scheduled record is stored `scheduled` with `sendAt`, and with the same time in
//! `nextAttemptAt` while it stays `scheduled`: a look is one range read of the sparse
//! index `next_attempt` (the OutboxSweeper's, `super::sweep`), which holds only records
//! that may still have to be sent, with `status: scheduled` as a residual clause, so it
//! reads the records due, not every scheduled one, and needs no index of its own (each
//! index costs SecantusDB CPU on every write of every record: README "Performance").
//! Records of versions before 2026-11-29 kept the time in [`DUE_FIELD`], with a sparse
//! index of its own, and another `nextAttemptAt`: start-up moves it
//! ([`adopt_earlier_due_times`]) and drops that index, and a look also asks `sendAt` to
//! have passed, so such a record is never sent early meanwhile. Moving a record on sets
//! `status: pending`, `queuedAt` and `nextAttemptAt` (the OutboxSweeper's next look, after
//! its grace time), and stamps the move (`releasedBy`), so that the records this call
//! moved can be read back by the stamp: an `update_many` tells how many it moved, not
//! which.
//!
//! A cancel sets `status: canceled` and `canceledAt`, from `scheduled`, or from `pending`
//! with no attempt made, under the record's lease in Redis (`lease:{id}`, the one a sender
//! takes to claim it): while a sender holds it the cancel is refused (sending has
//! started), and a sender that leases the record after the cancel reads it `canceled` and
//! sends nothing. A lease whose try count shows an earlier claim that never recorded an
//! outcome (its worker died; the provider may have the message) refuses the cancel too.

use crate::clients::lease::{RedisLeases, Release};
use crate::clients::mongo::{object_ids, MongoStore};
use actors::domain::{Communication, Status};
use actors::ports::{Dependency, DependencyError, ScheduledPage, ScheduledSends};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, DateTime as BsonDate, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use std::sync::Arc;
use std::time::Duration;

/// Where versions before 2026-11-29 kept a scheduled record's due time; still removed
/// wherever a record leaves `scheduled`, for the records they wrote.
pub const DUE_FIELD: &str = "scheduledDueAt";

/// How long a cancel holds a record's lease (one write).
const CANCEL_LEASE: Duration = Duration::from_secs(30);

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

fn bdate(t: DateTime<Utc>) -> BsonDate {
    BsonDate::from_millis(t.timestamp_millis())
}

/// The documents matching `filter`, oldest `due_field` first, at most `limit`, with the
/// fields of `projection`: the due-time range read of the timers (fallbacks, scheduled
/// sends), each served by an index on its due field.
pub async fn oldest_due(
    coll: &Collection<Document>,
    filter: Document,
    due_field: &str,
    limit: usize,
    projection: Document,
) -> Result<Vec<Document>, DependencyError> {
    coll.find(filter)
        .sort(doc! {due_field: 1})
        .limit(limit as i64)
        .projection(projection)
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)
}

/// What a cancel came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// Canceled now: the record as it is after the cancel.
    Canceled(Document),
    /// It was canceled before: the record.
    AlreadyCanceled(Document),
    /// Sending has started (a sender holds it, it was attempted, or it is final): its
    /// status.
    TooLate(String),
    /// No such record of this tenant.
    NotFound,
}

pub struct MongoScheduled {
    coll: Collection<Document>,
    leases: Arc<RedisLeases>,
    /// How long after its move a record is left to its stream entry before the
    /// OutboxSweeper queues it (the store's first look at a new record).
    first_look: Duration,
}

impl MongoScheduled {
    pub fn new(store: &MongoStore, first_look: Duration) -> MongoScheduled {
        MongoScheduled {
            coll: store.collection().clone(),
            leases: store.leases().clone(),
            first_look,
        }
    }

    /// Cancel `tenant`'s record `id` unless sending has started (see the module's text).
    pub async fn cancel(&self, id: &str, tenant: &str) -> Result<Cancel, DependencyError> {
        let Ok(oid) = ObjectId::parse_str(id) else {
            return Ok(Cancel::NotFound);
        };
        let mine = doc! {"_id": oid, "tenant": tenant};
        let Some(found) = self.coll.find_one(mine.clone()).await.map_err(err)? else {
            return Ok(Cancel::NotFound);
        };
        if let Some(settled) = settled(found) {
            return Ok(settled);
        }
        let token = format!("cancel:{}", ObjectId::new().to_hex());
        let tries = self.leases.lease(&[id], &token, CANCEL_LEASE).await?;
        let n = tries.first().copied().unwrap_or(-1);
        if n < 0 {
            return Ok(Cancel::TooLate(Status::Sending.as_str().into()));
        }
        let canceled = if n == 1 {
            self.set_canceled(mine.clone()).await
        } else {
            // An earlier claim ended without an outcome: the provider may have it.
            Ok(None)
        };
        let how = match canceled {
            Ok(Some(_)) => Release::Final,
            _ => Release::Undo,
        };
        if let Err(e) = self.leases.release(&[(id, how)], &token).await {
            tracing::debug!(error = %e, "cancel lease not given back; it expires");
        }
        match canceled? {
            Some(d) => Ok(Cancel::Canceled(d)),
            None if n == 1 => {
                let now = self.coll.find_one(mine).await.map_err(err)?;
                Ok(now.map_or(Cancel::NotFound, |d| {
                    settled(d).unwrap_or(Cancel::TooLate(Status::Sending.as_str().into()))
                }))
            }
            None => Ok(Cancel::TooLate(Status::Sending.as_str().into())),
        }
    }

    /// The compare-and-set: `scheduled`, or `pending` with no attempt, becomes `canceled`.
    async fn set_canceled(&self, mine: Document) -> Result<Option<Document>, DependencyError> {
        let now = bdate(Utc::now());
        let mut filter = mine;
        filter.insert("status", doc! {"$in": ["scheduled", "pending"]});
        filter.insert("attempts", 0);
        self.coll
            .find_one_and_update(
                filter,
                doc! {
                    "$set": {"status": Status::Canceled.as_str(), "canceledAt": now, "updatedAt": now},
                    "$unset": {"nextAttemptAt": "", DUE_FIELD: ""},
                },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(err)
    }
}

/// What a record's stored state already answers: canceled before, or past canceling.
/// `None` while it may still be canceled (`scheduled`, or `pending` with no attempt).
fn settled(d: Document) -> Option<Cancel> {
    let status = d.get_str("status").unwrap_or_default().to_string();
    let attempts = d.get_i32("attempts").unwrap_or(0);
    match Status::parse(&status) {
        Some(Status::Canceled) => Some(Cancel::AlreadyCanceled(d)),
        Some(Status::Scheduled) => None,
        Some(Status::Pending) if attempts == 0 => None,
        _ => Some(Cancel::TooLate(status)),
    }
}

#[async_trait]
impl ScheduledSends for MongoScheduled {
    async fn due_scheduled(
        &self,
        from: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, DependencyError> {
        // The range first: the clause SecantusDB serves from the index.
        let mut range = doc! {"$lte": bdate(now)};
        if let Some(from) = from {
            range.insert("$gte", bdate(from));
        }
        let filter = doc! {
            "nextAttemptAt": range,
            "status": Status::Scheduled.as_str(),
            "sendAt": {"$lte": bdate(now)},
        };
        let docs = oldest_due(&self.coll, filter, "nextAttemptAt", limit, doc! {"_id": 1}).await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok().map(|o| o.to_hex()))
            .collect())
    }

    /// The range alone, no residual clause: the record's status and `sendAt` are checked
    /// here.
    async fn scheduled_in(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<ScheduledPage, DependencyError> {
        let range = doc! {"$gt": bdate(from), "$lte": bdate(to)};
        let projection = doc! {"_id": 1, "status": 1, "sendAt": 1, "nextAttemptAt": 1};
        let limit = limit.max(1);
        let docs = oldest_due(
            &self.coll,
            doc! {"nextAttemptAt": range},
            "nextAttemptAt",
            limit,
            projection,
        )
        .await?;
        Ok(page_of(&docs, limit, now))
    }

    async fn release_scheduled(
        &self,
        ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<Communication>, DependencyError> {
        let oids: Vec<ObjectId> = object_ids(ids);
        if oids.is_empty() {
            return Ok(Vec::new());
        }
        let stamp = ObjectId::new().to_hex();
        let look = now + chrono::Duration::from_std(self.first_look).unwrap_or_default();
        let moved = self
            .coll
            .update_many(
                doc! {"_id": {"$in": &oids}, "status": Status::Scheduled.as_str()},
                doc! {
                    "$set": {
                        "status": Status::Pending.as_str(), "updatedAt": bdate(now),
                        "notBefore": bdate(now), "queuedAt": bdate(now),
                        "nextAttemptAt": bdate(look), "releasedBy": &stamp,
                    },
                    "$unset": {DUE_FIELD: ""},
                },
            )
            .await
            .map_err(err)?;
        if moved.modified_count == 0 {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"_id": {"$in": oids}, "releasedBy": &stamp})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(docs.iter().filter_map(MongoStore::from_doc).collect())
    }
}

/// What a read of the range (`limit` asked) holds for the SchedulerActor: its `scheduled`
/// records whose `sendAt` has passed, how many it read, and its last due time when the
/// limit cut it short.
fn page_of(docs: &[Document], limit: usize, now: DateTime<Utc>) -> ScheduledPage {
    let passed = bdate(now);
    let due = docs
        .iter()
        .filter(|d| d.get_str("status") == Ok(Status::Scheduled.as_str()))
        .filter(|d| d.get_datetime("sendAt").is_ok_and(|t| *t <= passed))
        .filter_map(|d| d.get_object_id("_id").ok().map(|o| o.to_hex()))
        .collect();
    let cut_at = (docs.len() >= limit)
        .then(|| {
            docs.last()?
                .get_datetime("nextAttemptAt")
                .ok()
                .map(|t| t.to_chrono())
        })
        .flatten();
    ScheduledPage {
        due,
        read: docs.len(),
        cut_at,
    }
}

/// Give the `scheduled` records of earlier versions their due time where a look reads it
/// (`nextAttemptAt` = `sendAt`), at start-up; how many were moved.
pub async fn adopt_earlier_due_times(coll: &Collection<Document>) -> Result<u64, DependencyError> {
    let moved = coll
        .update_many(
            doc! {DUE_FIELD: {"$exists": true}, "status": Status::Scheduled.as_str()},
            vec![
                doc! {"$set": {"nextAttemptAt": "$sendAt"}},
                doc! {"$unset": [DUE_FIELD]},
            ],
        )
        .await
        .map_err(err)?;
    Ok(moved.modified_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: &str, attempts: i32) -> Document {
        doc! {"_id": ObjectId::new(), "status": status, "attempts": attempts}
    }

    fn at(status: &str, due_ms: i64, send_ms: i64) -> Document {
        doc! {"_id": ObjectId::new(), "status": status,
        "nextAttemptAt": BsonDate::from_millis(due_ms), "sendAt": BsonDate::from_millis(send_ms)}
    }

    #[test]
    fn a_read_holds_its_due_scheduled_records_and_where_a_limit_cut_it() {
        let now = DateTime::from_timestamp_millis(10_000).unwrap();
        let docs = vec![
            at("scheduled", 1_000, 1_000),
            at("pending", 2_000, 1_000),
            at("scheduled", 3_000, 20_000), // its `sendAt` not passed (an earlier version's)
            at("scheduled", 4_000, 4_000),
        ];
        let page = page_of(&docs, 4, now);
        let id = |d: &Document| d.get_object_id("_id").unwrap().to_hex();
        assert_eq!(page.due, [id(&docs[0]), id(&docs[3])]);
        assert_eq!(page.read, 4);
        assert_eq!(page.cut_at, DateTime::from_timestamp_millis(4_000));
        assert_eq!(page_of(&docs, 5, now).cut_at, None, "not cut");
    }

    #[test]
    fn what_a_stored_state_answers_to_a_cancel() {
        assert!(settled(rec("scheduled", 0)).is_none());
        assert!(settled(rec("pending", 0)).is_none());
        assert!(matches!(
            settled(rec("canceled", 0)),
            Some(Cancel::AlreadyCanceled(_))
        ));
        for (status, attempts) in [
            ("pending", 1),
            ("sending", 1),
            ("sent", 1),
            ("delivered", 1),
            ("failed", 2),
            ("void", 0),
        ] {
            assert_eq!(
                settled(rec(status, attempts)),
                Some(Cancel::TooLate(status.into())),
                "{status}"
            );
        }
    }
}
