//! What the Reconciler reads (`actors::reconciler`): records MongoDB changed recently
//! ([`RecentRecords`] for [`MongoStore`], by `updatedAt`), and their `communications`
//! documents with their versions ([`IndexedRecords`] for [`ElasticIndexed`], one `_search`
//! by ids).

use crate::clients::mongo::MongoStore;
use actors::domain::Communication;
use actors::ports::{Dependency, DependencyError, IndexedRecords, IndexedState, RecentRecords};
use actors::walk::resized;
use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use elasticsearch::{Elasticsearch, SearchParts};
use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime as BsonDate, Document};
use serde_json::{json, Value};
use std::collections::HashMap;

fn bdate(t: DateTime<Utc>) -> BsonDate {
    BsonDate::from_millis(t.timestamp_millis())
}

/// The first slice of a pass's walk back through its window.
const FIRST_SLICE: Duration = Duration::seconds(1);
const NARROWEST_SLICE: Duration = Duration::milliseconds(100);
/// SecantusDB reads every record of the range a query names: a slice of a minute at most.
const WIDEST_SLICE: Duration = Duration::seconds(60);

#[async_trait]
impl RecentRecords for MongoStore {
    /// The records changed between `from` and `to`, newest first, at most `limit`: the
    /// window walked back from `to` in slices (`(lo, hi]`, the oldest `[from, hi]`), each
    /// read newest first with the limit still wanted, until `limit` are found or the window
    /// is done. Until 2026-11-29 this was one read of the whole window, and SecantusDB
    /// reads every record of the range a query names before it sorts and cuts: a pass
    /// (every minute) read every record changed in the last 10 minutes, 50,000 of them in
    /// about a second (`scripts/reconcile-pass.py`), holding the store, and every accept,
    /// meanwhile.
    async fn changed_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Communication>, DependencyError> {
        let err = |e: mongodb::error::Error| DependencyError::new(Dependency::MongoDb, e);
        let mut docs: Vec<Document> = Vec::new();
        let (mut hi, mut width) = (to, FIRST_SLICE);
        while docs.len() < limit {
            let lo = (hi - width).max(from);
            let range = if lo <= from {
                doc! {"$gte": bdate(from), "$lte": bdate(hi)}
            } else {
                doc! {"$gt": bdate(lo), "$lte": bdate(hi)}
            };
            let want = limit - docs.len();
            let page: Vec<Document> = self
                .collection()
                .find(doc! {"updatedAt": range})
                .sort(doc! {"updatedAt": -1})
                .limit(want as i64)
                .await
                .map_err(err)?
                .try_collect()
                .await
                .map_err(err)?;
            // Each next (older) slice sized to hold about the records still wanted, by the
            // walks' own rule (`actors::walk::resized`).
            width = resized(width, width, page.len(), want - page.len())
                .clamp(NARROWEST_SLICE, WIDEST_SLICE);
            docs.extend(page);
            if lo <= from {
                break;
            }
            hi = lo;
        }
        // A `void` record (answered 503, never sent) reads as no communication: skipped.
        Ok(docs.iter().filter_map(MongoStore::from_doc).collect())
    }
}

/// The `communications` index, read for the reconciler.
pub struct ElasticIndexed {
    pub client: Elasticsearch,
    pub index: String,
}

#[async_trait]
impl IndexedRecords for ElasticIndexed {
    async fn indexed(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, IndexedState>, DependencyError> {
        let err = |e: String| DependencyError::new(Dependency::Elasticsearch, e);
        let res = self
            .client
            .search(SearchParts::Index(&[&self.index]))
            .body(json!({"query": {"ids": {"values": ids}}, "size": ids.len(),
                         "version": true, "_source": ["status"]}))
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let code = res.status_code();
        if code.as_u16() == 404 {
            // No index yet: nothing indexed.
            return Ok(HashMap::new());
        }
        if !code.is_success() {
            return Err(err(format!("search answered {code}")));
        }
        let body: Value = res.json().await.map_err(|e| err(e.to_string()))?;
        Ok(hits(&body))
    }
}

/// The documents of a search answer, by id, with their status and version.
fn hits(body: &Value) -> HashMap<String, IndexedState> {
    body["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let state = IndexedState {
                status: h["_source"]["status"].as_str()?.to_string(),
                version: h["_version"].as_u64().unwrap_or(0),
            };
            Some((h["_id"].as_str()?.to_string(), state))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_answer_gives_each_documents_status_and_version() {
        let body = json!({"hits": {"hits": [
            {"_id": "a", "_version": 14, "_source": {"status": "pending"}},
            {"_id": "b", "_source": {"status": "sent"}},
            {"_id": "c", "_version": 3, "_source": {}},
        ]}});
        let got = hits(&body);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got["a"],
            IndexedState {
                status: "pending".into(),
                version: 14
            }
        );
        assert_eq!(got["b"].version, 0);
    }
}
