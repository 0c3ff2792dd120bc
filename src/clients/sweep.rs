//! The OutboxSweeper's look at `communications` (`Store::take_due` for [`MongoStore`]):
//! the records due, read so that SecantusDB serves the read from an index.
//!
//! SecantusDB plans no index for a filter with a top-level operator (`$or`, `$and`), and
//! otherwise lets one clause ride an index, the others checked on the documents it
//! fetches (`secantus/storage.py`, `_try_index_id_keys`). The look before 2026-11-29
//! put its lanes in a top-level `$or`, so each look (every second) read the whole
//! collection: 28 ms with 1,000 records, 259 ms with 10,000, 1.3 s with 50,000
//! (`scripts/sweep-due.py`), enough to stall the single-threaded store, and every accept
//! behind it, once the collection held some 40,000 records. Now the read is a range of
//! `nextAttemptAt` in the sparse index `next_attempt` (a record carries `nextAttemptAt`
//! only while it may still have to be sent), with the status, the channels and, where
//! every lane has one, the newest acknowledged point as residual clauses; the lanes
//! themselves (channel, priority, queued before the lane's acknowledged point) are
//! checked here, on the documents read. Oldest due first, in pages, at most
//! [`PAGES`] pages a look, so a backlog of due records that are still on their stream
//! costs a bounded answer; a look always starts again from the oldest. (SecantusDB still
//! reads every record of the range to check the residual clauses: a look costs what the
//! records past their next look are, few but for a backlog older than the recheck time.)
//!
//! [`MongoStore`]: crate::clients::mongo::MongoStore

use actors::domain::Priority;
use actors::ports::{Dependency, DependencyError, SweepScope};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime as BsonDate, Document};
use mongodb::Collection;

/// The index the look reads (sparse: only records with `nextAttemptAt`).
pub const INDEX: &str = "next_attempt";
/// Pages of a look, each of twice the batch.
pub const PAGES: usize = 4;

fn bdate(t: DateTime<Utc>) -> BsonDate {
    BsonDate::from_millis(t.timestamp_millis())
}

/// The records of these lanes due by `now`, oldest due first, at most `limit`.
pub async fn due(
    coll: &Collection<Document>,
    now: DateTime<Utc>,
    limit: usize,
    scopes: &[SweepScope],
) -> Result<Vec<Document>, DependencyError> {
    let err = |e: mongodb::error::Error| DependencyError::new(Dependency::MongoDb, e);
    let page = (limit * 2).max(1);
    let mut found = Vec::new();
    let mut after: Option<BsonDate> = None;
    for _ in 0..PAGES {
        let docs: Vec<Document> = coll
            .find(filter(now, after, scopes))
            .sort(doc! {"nextAttemptAt": 1})
            .limit(page as i64)
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        let full = docs.len() == page;
        after = docs
            .last()
            .and_then(|d| d.get_datetime("nextAttemptAt").ok().copied());
        found.extend(
            docs.into_iter()
                .filter(|d| scopes.iter().any(|s| in_scope(d, s))),
        );
        if found.len() >= limit || !full || after.is_none() {
            break;
        }
    }
    found.truncate(limit);
    Ok(found)
}

/// The range first (the clause that rides the index), then residual clauses that hold for
/// every lane; no top-level operator.
fn filter(now: DateTime<Utc>, after: Option<BsonDate>, scopes: &[SweepScope]) -> Document {
    let mut range = doc! {"$lte": bdate(now)};
    if let Some(a) = after {
        range.insert("$gt", a);
    }
    let mut channels: Vec<&str> = scopes.iter().map(|s| s.channel.as_str()).collect();
    channels.sort_unstable();
    channels.dedup();
    let mut f = doc! {
        "nextAttemptAt": range,
        "status": {"$in": ["pending", "sending"]},
        "type": {"$in": channels},
    };
    // A record queued before a point was created before it: when every lane has an
    // acknowledged point, nothing created after the newest of them is in any lane.
    let points: Option<Vec<DateTime<Utc>>> = scopes.iter().map(|s| s.acked_up_to).collect();
    if let Some(newest) = points.and_then(|p| p.into_iter().max()) {
        f.insert("createdAt", doc! {"$lte": bdate(newest)});
    }
    f
}

/// Whether a record read belongs to this lane and its last entry is no longer waiting:
/// its channel and priority (none: normal), and queued (or, for records from before
/// `queuedAt`, created) by the lane's acknowledged point.
pub fn in_scope(d: &Document, s: &SweepScope) -> bool {
    if d.get_str("type").ok() != Some(s.channel.as_str()) {
        return false;
    }
    let priority = match d.get("priority") {
        None | Some(Bson::Null) => Some(Priority::Normal),
        Some(Bson::String(p)) => Priority::parse(p),
        Some(_) => None,
    };
    if priority != Some(s.priority) {
        return false;
    }
    let Some(point) = s.acked_up_to else {
        return true;
    };
    let when = match d.get("queuedAt") {
        Some(Bson::DateTime(q)) => Some(*q),
        _ => d.get_datetime("createdAt").ok().copied(),
    };
    when.is_some_and(|w| w <= bdate(point))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actors::domain::Channel;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn scope(channel: Channel, priority: Priority, acked: Option<i64>) -> SweepScope {
        SweepScope {
            channel,
            priority,
            acked_up_to: acked.map(at),
        }
    }

    #[test]
    fn a_record_is_in_its_lane_only_once_queued_by_the_lanes_acknowledged_point() {
        let queued = doc! {"type": "sms", "priority": "high", "createdAt": bdate(at(0)), "queuedAt": bdate(at(10))};
        assert!(in_scope(
            &queued,
            &scope(Channel::Sms, Priority::High, None)
        ));
        assert!(in_scope(
            &queued,
            &scope(Channel::Sms, Priority::High, Some(10))
        ));
        assert!(!in_scope(
            &queued,
            &scope(Channel::Sms, Priority::High, Some(9))
        ));
        assert!(!in_scope(
            &queued,
            &scope(Channel::Sms, Priority::Normal, None)
        ));
        assert!(!in_scope(
            &queued,
            &scope(Channel::Email, Priority::High, None)
        ));
        // Before lanes and `queuedAt`: normal, and its creation counts.
        let old = doc! {"type": "email", "createdAt": bdate(at(5))};
        assert!(in_scope(
            &old,
            &scope(Channel::Email, Priority::Normal, Some(5))
        ));
        assert!(!in_scope(
            &old,
            &scope(Channel::Email, Priority::Normal, Some(4))
        ));
        let null_queued = doc! {"type": "email", "priority": Bson::Null, "queuedAt": Bson::Null, "createdAt": bdate(at(5))};
        assert!(in_scope(
            &null_queued,
            &scope(Channel::Email, Priority::Normal, Some(6))
        ));
    }

    #[test]
    fn the_filter_has_no_top_level_operator_and_starts_with_the_indexed_range() {
        let scopes = [
            scope(Channel::Sms, Priority::Normal, Some(3)),
            scope(Channel::Sms, Priority::High, Some(7)),
            scope(Channel::Email, Priority::Bulk, Some(5)),
        ];
        let f = filter(at(100), None, &scopes);
        assert!(f.keys().all(|k| !k.starts_with('$')), "{f}");
        assert_eq!(f.keys().next().map(String::as_str), Some("nextAttemptAt"));
        assert_eq!(
            f.get_document("createdAt").unwrap(),
            &doc! {"$lte": bdate(at(7))}
        );
        // A lane with every entry acknowledged bounds nothing.
        let f = filter(
            at(100),
            None,
            &[scopes[0], scope(Channel::Whatsapp, Priority::Normal, None)],
        );
        assert!(f.get("createdAt").is_none(), "{f}");
    }
}
