//! The fallbacks kept on `communications` records: implements `actors::ports::Fallbacks`.
//!
//! A record that asked for one holds `fallback: {type, afterSeconds, from, to, msg,
//! subject?}` and `fallbackAt` (its creation plus `afterSeconds`). Settling sets
//! `fallbackSettledAt`, and `fallbackId` when a fallback was sent. Due: not settled, and
//! `fallbackAt` passed or the record `failed`.
//!
//! The look reads `fallbackDueAt`, a copy of `fallbackAt` that a record carries only until
//! its fallback is settled, by one range read in its sparse index: SecantusDB plans a
//! range on one field with an index, but scans the whole collection for the `$exists` /
//! `$or` filter this look had before (`scripts/fallback-due.py`). A write that fails a
//! record for good (its sender's, a dead-lettering, a provider's receipt) then moves its
//! `fallbackDueAt` to that time ([`due_now`]), so a look reads the fallbacks due by now
//! and no other record. Before 2026-11-29 the look read every unsettled fallback, due or
//! not, each second, to find the records that had failed before their time: with a
//! fallback on every message, all of the last `afterSeconds` of traffic (SecantusDB reads
//! every record of the range a query names). A crash between the failing write and the
//! move leaves the fallback due at its own time: late, not lost.

use super::scheduled::oldest_due;
use actors::domain::{Channel, Fallback, NewCommunication, Status};
use actors::ports::{Dependency, DependencyError, DueFallback, Fallbacks};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{doc, oid::ObjectId, DateTime as BsonDate, Document};
use mongodb::Collection;

/// A record's fallback time while its fallback is not settled (absent once it is).
pub const DUE_FIELD: &str = "fallbackDueAt";

/// 9999-12-31T23:59:59Z: the upper end of the range of every unsettled fallback.
const LAST_DATE: BsonDate = BsonDate::from_millis(253_402_300_799_000);

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

/// The `fallback` subdocument of a record.
pub fn fallback_doc(f: &Fallback) -> Document {
    let r = &f.request;
    let mut d = doc! {
        "type": r.channel.as_str(),
        "afterSeconds": f.after_secs as i64,
        "from": &r.from,
        "to": &r.to,
        "msg": &r.msg,
    };
    if let Some(s) = &r.subject {
        d.insert("subject", s);
    }
    d
}

fn fallback_from(d: &Document) -> Option<Fallback> {
    Some(Fallback {
        after_secs: d.get_i64("afterSeconds").ok()? as u32,
        request: NewCommunication {
            channel: Channel::parse(d.get_str("type").ok()?)?,
            from: d.get_str("from").ok()?.to_string(),
            to: d.get_str("to").ok()?.to_string(),
            msg: d.get_str("msg").ok()?.to_string(),
            subject: d.get_str("subject").ok().map(str::to_string),
        },
    })
}

/// Over the `communications` collection of the store's client, whose write concern (`w:
/// majority, j: true`) every write here takes.
pub struct MongoFallbacks {
    coll: Collection<Document>,
}

impl MongoFallbacks {
    pub fn new(coll: Collection<Document>) -> MongoFallbacks {
        MongoFallbacks { coll }
    }
}

#[async_trait]
impl Fallbacks for MongoFallbacks {
    async fn due_fallbacks(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueFallback>, DependencyError> {
        // The unsettled fallbacks due by now, oldest first (a range on one field, so an
        // index read); a record that failed has its due time moved to its failure.
        let filter = doc! {DUE_FIELD: {"$lte": BsonDate::from_millis(now.timestamp_millis())}};
        let projection =
            doc! {"tenant": 1, "status": 1, "fallback": 1, "priority": 1, DUE_FIELD: 1};
        let docs: Vec<Document> =
            oldest_due(&self.coll, filter, DUE_FIELD, limit, projection).await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(DueFallback {
                    id: d.get_object_id("_id").ok()?.to_hex(),
                    tenant: d
                        .get_str("tenant")
                        .unwrap_or(actors::domain::DEFAULT_TENANT)
                        .to_string(),
                    status: Status::parse(d.get_str("status").ok()?)?,
                    fallback: fallback_from(d.get_document("fallback").ok()?)?,
                    priority: d
                        .get_str("priority")
                        .ok()
                        .and_then(actors::domain::Priority::parse)
                        .unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn settle_fallback(
        &self,
        id: &str,
        sent_as: Option<&str>,
    ) -> Result<(), DependencyError> {
        let oid = ObjectId::parse_str(id).map_err(err)?;
        let mut set = doc! {"fallbackSettledAt": BsonDate::now()};
        if let Some(f) = sent_as {
            set.insert("fallbackId", f);
        }
        self.coll
            .update_one(
                doc! {"_id": oid, "fallbackSettledAt": {"$exists": false}},
                doc! {"$set": set, "$unset": {DUE_FIELD: ""}},
            )
            .await
            .map_err(err)?;
        Ok(())
    }
}

/// The records of `filter` that are `failed` and whose fallback is not settled become due
/// now (their `fallbackDueAt` moved to `now`, if later): after a write failed them for
/// good. `filter` must name the records by an indexed field (`_id`, `providerMessageId`,
/// or a range of `fallbackDueAt` itself).
pub async fn due_now(
    coll: &Collection<Document>,
    mut filter: Document,
    now: BsonDate,
) -> Result<u64, DependencyError> {
    filter.insert("status", Status::Failed.as_str());
    if !filter.contains_key(DUE_FIELD) {
        filter.insert(DUE_FIELD, doc! {"$exists": true});
    }
    let moved = coll
        .update_many(filter, doc! {"$min": {DUE_FIELD: now}})
        .await
        .map_err(err)?;
    Ok(moved.modified_count)
}

/// The unsettled fallbacks of records that failed before this version moved their due
/// time at the failure: due now. Run at the first start-up of this version (one read of
/// the unsettled fallbacks, in their index).
pub async fn failed_due_now(coll: &Collection<Document>) -> Result<u64, DependencyError> {
    due_now(coll, doc! {DUE_FIELD: {"$lte": LAST_DATE}}, BsonDate::now()).await
}

/// Records from before `fallbackDueAt` whose fallback is not settled get it (a copy of
/// `fallbackAt`), so the look finds them; run at start-up, before the index is used. One
/// write for them all; how many it gave the field.
pub async fn add_due_fields(coll: &Collection<Document>) -> Result<u64, DependencyError> {
    let given = coll
        .update_many(
            doc! {
                "fallbackAt": {"$exists": true},
                "fallbackSettledAt": {"$exists": false},
                DUE_FIELD: {"$exists": false},
            },
            vec![doc! {"$set": {DUE_FIELD: "$fallbackAt"}}],
        )
        .await
        .map_err(err)?;
    Ok(given.modified_count)
}
