//! A bulk send's members, for `GET /api/v1/batches/{batchId}`: one document a batch in
//! `batches` (`_id` the batch id, the tenant, the ids of its recipients' records), so
//! `communications` needs no index of its own for batches.
//!
//! Why not an index on `batchId`: SecantusDB derives the keys of every index of a
//! collection for every document it writes, a sparse index whose field the document lacks
//! included, so an index on `communications` is paid on each of every message's three
//! writes whether or not it was ever part of a bulk send (README, "What each index costs
//! SecantusDB"). A batch's document is written once per bulk send instead.
//!
//! The bulk handler chooses its recipients' record ids and lists them here before it
//! stores the records, so a stored record is always listed: a failure between the two
//! leaves ids listed that no record has, and the counts read the records, so those count
//! for nothing, as the recipients refused do. A retry with the same `Idempotency-Key`
//! makes the same batch id and adds its ids (its recipients answered as replays keep the
//! records, and ids, of the first try, already listed). The counts read the batch's
//! document by `_id`, then its records by `_id`: two reads through `_id` alone.
//!
//! Records of an earlier version carry `batchId` without a batch document; the first start
//! of this version lists them ([`adopt_earlier_batches`]), then the index `batch` goes.

use actors::ports::{Dependency, DependencyError};
use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime as BsonDate, Document};
use mongodb::{Collection, Database};
use std::collections::{BTreeMap, HashMap};

pub const COLLECTION: &str = "batches";
/// The sparse index on `communications.batchId` this replaces; dropped at start-up once the
/// batches of an earlier version are listed.
pub const OLD_INDEX: &str = "batch";

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

pub struct MongoBatches {
    batches: Collection<Document>,
    records: Collection<Document>,
}

impl MongoBatches {
    pub fn new(db: &Database) -> MongoBatches {
        MongoBatches {
            batches: db.collection(COLLECTION),
            records: db.collection(crate::clients::mongo::COLLECTION),
        }
    }

    /// Lists `ids` (record ids, hex) as members of `tenant`'s batch `batch_id`, before
    /// their records are stored. One upsert; ids already listed are kept once.
    pub async fn list(
        &self,
        tenant: &str,
        batch_id: &str,
        ids: &[String],
    ) -> Result<(), DependencyError> {
        let oids: Vec<Bson> = ids
            .iter()
            .filter_map(|id| ObjectId::parse_str(id).ok())
            .map(Bson::ObjectId)
            .collect();
        add_members(&self.batches, tenant, batch_id, oids).await
    }

    /// How many of the batch's stored records are in each status; empty when the tenant
    /// has no such batch (or none of its records was stored).
    pub async fn counts(
        &self,
        tenant: &str,
        batch_id: &str,
    ) -> Result<BTreeMap<String, u64>, DependencyError> {
        let mut counts = BTreeMap::new();
        let Some(batch) = self
            .batches
            .find_one(doc! {"_id": batch_id, "tenant": tenant})
            .await
            .map_err(err)?
        else {
            return Ok(counts);
        };
        let ids = batch.get_array("ids").cloned().unwrap_or_default();
        let mut found = self
            .records
            .find(doc! {"_id": {"$in": ids}, "tenant": tenant})
            .projection(doc! {"status": 1})
            .await
            .map_err(err)?;
        while let Some(d) = found.try_next().await.map_err(err)? {
            let status = d.get_str("status").unwrap_or("unknown").to_string();
            *counts.entry(status).or_insert(0) += 1;
        }
        Ok(counts)
    }
}

/// Lists the records of an earlier version's bulk sends (`batchId`, no batch document) in
/// `batches`; returns how many batches. One read of those records (through the old index
/// while it exists), one upsert a batch.
pub async fn adopt_earlier_batches(
    records: &Collection<Document>,
) -> Result<usize, DependencyError> {
    let mut found = records
        .find(doc! {"batchId": {"$exists": true}})
        .projection(doc! {"batchId": 1, "tenant": 1})
        .await
        .map_err(err)?;
    let mut members: HashMap<(String, String), Vec<Bson>> = HashMap::new();
    while let Some(d) = found.try_next().await.map_err(err)? {
        let (Ok(batch), Ok(id)) = (d.get_str("batchId"), d.get_object_id("_id")) else {
            continue;
        };
        let tenant = d
            .get_str("tenant")
            .unwrap_or(actors::domain::DEFAULT_TENANT);
        members
            .entry((tenant.to_string(), batch.to_string()))
            .or_default()
            .push(Bson::ObjectId(id));
    }
    let batches = super::mongo::sibling(records, COLLECTION);
    for ((tenant, batch), ids) in members.iter_mut() {
        add_members(&batches, tenant, batch, std::mem::take(ids)).await?;
    }
    Ok(members.len())
}

/// One upsert: the batch's document made if it is not there yet, `ids` added to its
/// members (each once).
async fn add_members(
    batches: &Collection<Document>,
    tenant: &str,
    batch_id: &str,
    ids: Vec<Bson>,
) -> Result<(), DependencyError> {
    batches
        .update_one(
            doc! {"_id": batch_id, "tenant": tenant},
            doc! {
                "$setOnInsert": {"createdAt": BsonDate::now()},
                "$addToSet": {"ids": {"$each": ids}},
            },
        )
        .upsert(true)
        .await
        .map_err(err)?;
    Ok(())
}
