//! MongoDB's `parked_receipts`: delivery receipts that came before their record was known,
//! kept until it is. Implements `actors::ports::ReceiptParking`.
//!
//! One document per provider, message and status (`_id` = [`ParkedReceipt::key`]):
//! `provider, providerMessageId, status, errorCode?, errorMessage?, service, tries,
//! parkedAt, nextTryAt`. Parking upserts (a receipt the provider sent again stays one), a
//! look reads the due ones by `nextTryAt` and counts the rest, a settle deletes the done
//! ones and pushes the others' `nextTryAt`: one round trip each.

use actors::domain::Status;
use actors::ports::{Dependency, DependencyError, ParkedReceipt, ReceiptParking, ReceiptUpdate};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime as BsonDate, Document};
use mongodb::{Collection, Database};

pub const COLLECTION: &str = "parked_receipts";

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

fn bdate(t: DateTime<Utc>) -> BsonDate {
    BsonDate::from_millis(t.timestamp_millis())
}

pub struct MongoParking {
    db: Database,
    coll: Collection<Document>,
}

impl MongoParking {
    pub fn new(db: &Database) -> MongoParking {
        MongoParking {
            db: db.clone(),
            coll: db.collection(COLLECTION),
        }
    }

    fn from_doc(d: &Document) -> Option<ParkedReceipt> {
        let error = match (d.get_str("errorCode"), d.get_str("errorMessage")) {
            (Ok(c), Ok(m)) => Some((c.to_string(), m.to_string())),
            _ => None,
        };
        Some(ParkedReceipt {
            update: ReceiptUpdate {
                provider: d.get_str("provider").ok()?.to_string(),
                provider_message_id: d.get_str("providerMessageId").ok()?.to_string(),
                status: Status::parse(d.get_str("status").ok()?)?,
                error,
            },
            service: d.get_str("service").unwrap_or("parked-receipt").to_string(),
            tries: d.get_i32("tries").unwrap_or(0).max(0) as u32,
        })
    }

    async fn run_update(&self, updates: Vec<Document>) -> Result<(), DependencyError> {
        let reply = self
            .db
            .run_command(
                doc! {"update": COLLECTION, "updates": updates, "ordered": false,
                "writeConcern": {"j": true}},
            )
            .await
            .map_err(err)?;
        match reply.get_array("writeErrors") {
            Ok(errs) if !errs.is_empty() => Err(err(format!("write errors: {errs:?}"))),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl ReceiptParking for MongoParking {
    async fn park(
        &self,
        receipts: &[ParkedReceipt],
        next_try: DateTime<Utc>,
    ) -> Result<(), DependencyError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let now = bdate(Utc::now());
        let updates = receipts
            .iter()
            .map(|r| {
                let u = &r.update;
                let mut set = doc! {"provider": &u.provider, "providerMessageId": &u.provider_message_id,
                    "status": u.status.as_str(), "service": &r.service};
                if let Some((code, message)) = &u.error {
                    set.insert("errorCode", code);
                    set.insert("errorMessage", message);
                }
                doc! {
                    "q": {"_id": r.key()},
                    "u": {"$set": set,
                          "$setOnInsert": {"parkedAt": now, "tries": 0, "nextTryAt": bdate(next_try)}},
                    "upsert": true,
                }
            })
            .collect();
        self.run_update(updates).await
    }

    async fn due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        count: bool,
    ) -> Result<(Vec<ParkedReceipt>, Option<u64>), DependencyError> {
        // SecantusDB counts by reading every document (20,000 parked: 162 ms, holding the
        // store): only when asked, not at every look.
        let total = if count {
            Some(self.coll.count_documents(doc! {}).await.map_err(err)?)
        } else {
            None
        };
        if total == Some(0) {
            return Ok((Vec::new(), total));
        }
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"nextTryAt": {"$lte": bdate(now)}})
            .sort(doc! {"nextTryAt": 1})
            .limit(limit as i64)
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok((
            docs.iter().filter_map(MongoParking::from_doc).collect(),
            total,
        ))
    }

    async fn settle(
        &self,
        done: &[String],
        later: &[(String, DateTime<Utc>)],
    ) -> Result<(), DependencyError> {
        if !done.is_empty() {
            self.coll
                .delete_many(doc! {"_id": {"$in": done}})
                .await
                .map_err(err)?;
        }
        if later.is_empty() {
            return Ok(());
        }
        let updates = later
            .iter()
            .map(|(key, at)| {
                doc! {"q": {"_id": key},
                "u": {"$set": {"nextTryAt": bdate(*at)}, "$inc": {"tries": 1}}}
            })
            .collect();
        self.run_update(updates).await
    }
}
