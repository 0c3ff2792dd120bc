//! MongoDB's `suppressions`: the recipients a tenant must not send to on a channel (they
//! opted out, bounced, complained). One document per tenant, channel and address:
//! `_id` is [`key`] of the three (the unique index that makes an add idempotent), with
//! `tenant`, `type`, `address`, `reason`, `source` and `createdAt` beside it. Addresses are
//! stored normalised (`actors::domain::suppression_address`).

use actors::domain::Channel;
use actors::ports::{Dependency, DependencyError};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime as BsonDate, Document};
use mongodb::{Collection, Database};
use std::collections::HashMap;

pub const COLLECTION: &str = "suppressions";

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

/// The `_id` of a suppression: one string, so a batch's lookup is one `$in`. The unit
/// separator cannot occur in a tenant name, a channel or a valid address.
pub fn key(tenant: &str, channel: Channel, address: &str) -> String {
    format!("{tenant}\u{1f}{}\u{1f}{address}", channel.as_str())
}

/// A suppression as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Suppression {
    pub channel: Channel,
    pub address: String,
    pub reason: Option<String>,
    /// Who added it: `api`, `twilio-inbound`, `sendgrid-event`, `whatsapp-webhook`.
    pub source: String,
    pub created_at: DateTime<Utc>,
}

fn from_doc(d: &Document) -> Option<Suppression> {
    Some(Suppression {
        channel: Channel::parse(d.get_str("type").ok()?)?,
        address: d.get_str("address").ok()?.to_string(),
        reason: d.get_str("reason").ok().map(str::to_string),
        source: d.get_str("source").ok()?.to_string(),
        created_at: d.get_datetime("createdAt").ok()?.to_chrono(),
    })
}

pub struct MongoSuppressions {
    coll: Collection<Document>,
    /// The communications, to learn whose a provider's report is.
    records: Collection<Document>,
}

impl MongoSuppressions {
    pub fn new(db: &Database) -> MongoSuppressions {
        MongoSuppressions {
            coll: db.collection(COLLECTION),
            records: db.collection(crate::clients::mongo::COLLECTION),
        }
    }

    /// Add one (the address normalised already); `false` if it was there (it is kept as
    /// it was).
    pub async fn add(
        &self,
        tenant: &str,
        channel: Channel,
        address: &str,
        reason: Option<&str>,
        source: &str,
    ) -> Result<bool, DependencyError> {
        let mut set = doc! {
            "tenant": tenant, "type": channel.as_str(), "address": address, "source": source,
            "createdAt": BsonDate::now(),
        };
        if let Some(r) = reason {
            set.insert("reason", r);
        }
        let res = self
            .coll
            .update_one(
                doc! {"_id": key(tenant, channel, address)},
                doc! {"$setOnInsert": set},
            )
            .upsert(true)
            .await;
        match res {
            Ok(r) => Ok(r.upserted_id.is_some()),
            // Two adds raced: the other one inserted it.
            Err(e) if super::templates::is_duplicate(&e) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// `false` if there was none.
    pub async fn remove(
        &self,
        tenant: &str,
        channel: Channel,
        address: &str,
    ) -> Result<bool, DependencyError> {
        let r = self
            .coll
            .delete_one(doc! {"_id": key(tenant, channel, address)})
            .await
            .map_err(err)?;
        Ok(r.deleted_count > 0)
    }

    pub async fn get(
        &self,
        tenant: &str,
        channel: Channel,
        address: &str,
    ) -> Result<Option<Suppression>, DependencyError> {
        let d = self
            .coll
            .find_one(doc! {"_id": key(tenant, channel, address)})
            .await
            .map_err(err)?;
        Ok(d.as_ref().and_then(from_doc))
    }

    /// The tenant's suppressions (of one channel, if given), by address, at most `limit`.
    pub async fn list(
        &self,
        tenant: &str,
        channel: Option<Channel>,
        limit: i64,
    ) -> Result<Vec<Suppression>, DependencyError> {
        let mut filter = doc! {"tenant": tenant};
        if let Some(c) = channel {
            filter.insert("type", c.as_str());
        }
        let docs: Vec<Document> = self
            .coll
            .find(filter)
            .sort(doc! {"address": 1, "type": 1})
            .limit(limit)
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(docs.iter().filter_map(from_doc).collect())
    }
}

impl MongoSuppressions {
    /// The tenant of each of these communications that exists, in one query.
    pub async fn tenants_of(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, String>, DependencyError> {
        let oids: Vec<_> = ids
            .iter()
            .filter_map(|i| mongodb::bson::oid::ObjectId::parse_str(i).ok())
            .collect();
        self.tenants(doc! {"_id": {"$in": oids}}, |d| {
            d.get_object_id("_id").ok().map(|o| o.to_hex())
        })
        .await
    }

    /// The tenant of each of `provider`'s messages with these message ids that a record
    /// holds, in one query.
    pub async fn tenants_of_sent(
        &self,
        provider: &str,
        message_ids: &[String],
    ) -> Result<HashMap<String, String>, DependencyError> {
        let filter = doc! {"provider": provider, "providerMessageId": {"$in": message_ids}};
        self.tenants(filter, |d| {
            d.get_str("providerMessageId").ok().map(str::to_string)
        })
        .await
    }

    async fn tenants(
        &self,
        filter: Document,
        key: impl Fn(&Document) -> Option<String>,
    ) -> Result<HashMap<String, String>, DependencyError> {
        let docs = find_projected(
            &self.records,
            filter,
            doc! {"tenant": 1, "providerMessageId": 1},
        )
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                let tenant = d
                    .get_str("tenant")
                    .unwrap_or(actors::domain::DEFAULT_TENANT);
                Some((key(d)?, tenant.to_string()))
            })
            .collect())
    }
}

/// The documents matching `filter`, only the fields of `projection`.
async fn find_projected(
    coll: &Collection<Document>,
    filter: Document,
    projection: Document,
) -> Result<Vec<Document>, DependencyError> {
    coll.find(filter)
        .projection(projection)
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)
}

/// Which of these keys ([`key`]) are suppressed, in one query: the sender's check of a
/// batch.
pub async fn suppressed_keys(
    coll: &Collection<Document>,
    keys: &[String],
) -> Result<std::collections::HashSet<String>, DependencyError> {
    if keys.is_empty() {
        return Ok(Default::default());
    }
    let docs = find_projected(coll, doc! {"_id": {"$in": keys}}, doc! {"_id": 1}).await?;
    Ok(docs
        .iter()
        .filter_map(|d| d.get_str("_id").ok().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_tenants_channels_and_addresses_apart() {
        let a = key("acme", Channel::Sms, "+15550001111");
        assert_ne!(a, key("acme", Channel::Whatsapp, "+15550001111"));
        assert_ne!(a, key("other", Channel::Sms, "+15550001111"));
        assert_eq!(a, key("acme", Channel::Sms, "+15550001111"));
    }
}
