//! The fallbacks kept on `communications` records: implements `actors::ports::Fallbacks`.
//!
//! A record that asked for one holds `fallback: {type, afterSeconds, from, to, msg,
//! subject?}` and `fallbackAt` (its creation plus `afterSeconds`). Settling sets
//! `fallbackSettledAt`, and `fallbackId` when a fallback was sent. Due: not settled, and
//! `fallbackAt` passed or the record `failed`.

use super::scheduled::oldest_due;
use actors::domain::{Channel, Fallback, NewCommunication, Status};
use actors::ports::{Dependency, DependencyError, DueFallback, Fallbacks};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{doc, oid::ObjectId, DateTime as BsonDate, Document};
use mongodb::Collection;

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
        let filter = doc! {
            "fallbackAt": {"$exists": true},
            "fallbackSettledAt": {"$exists": false},
            "$or": [
                {"fallbackAt": {"$lte": BsonDate::from_millis(now.timestamp_millis())}},
                {"status": Status::Failed.as_str()},
            ],
        };
        let projection = doc! {"tenant": 1, "status": 1, "fallback": 1, "priority": 1};
        let docs = oldest_due(&self.coll, filter, "fallbackAt", limit, projection).await?;
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
                doc! {"$set": set},
            )
            .await
            .map_err(err)?;
        Ok(())
    }
}
