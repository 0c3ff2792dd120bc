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
//! costs a bounded answer; a look always starts again from the oldest. A lane stalled for
//! longer than the recheck time (its entries waiting unread) is looked past: see [`due`].
//!
//! [`MongoStore`]: crate::clients::mongo::MongoStore

use actors::domain::Priority;
use actors::ports::{Dependency, DependencyError, SweepScope};
use actors::walk::Walk;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime as BsonDate, Document};
use mongodb::Collection;

/// The index the look reads (sparse: only records with `nextAttemptAt`).
pub const INDEX: &str = "next_attempt";
/// Pages of a look, each of twice the batch.
pub const PAGES: usize = 4;
/// About how many records a slice past the stalled lanes' point holds (a slice of 1,000
/// cost SecantusDB about 100 ms a look under a stream stalled at 300 requests/s).
pub const SLICE: usize = 200;

fn bdate(t: DateTime<Utc>) -> BsonDate {
    BsonDate::from_millis(t.timestamp_millis())
}

/// Where the look past the stalled lanes' point has reached: a walk over that range one
/// slice a look (none yet: from the point).
pub type Cursor = std::sync::Arc<std::sync::Mutex<Option<Walk>>>;

/// One look: its time, the sweeper's recheck time (a queued record's next look is its
/// queue time plus this), and how many records it takes at most.
#[derive(Debug, Clone, Copy)]
pub struct Look {
    pub now: DateTime<Utc>,
    pub recheck: std::time::Duration,
    pub limit: usize,
}

/// The records of these lanes due by `now`, at most `limit`.
///
/// A lane with an acknowledged point `a` has entries queued after `a` still waiting on its
/// stream (a stalled lane: an open breaker, a rate limit), and each of their records has
/// its next look after `a + recheck`. With `a` the oldest such point, once `a + recheck`
/// has passed, the range up to `a + recheck` holds no waiting record of any lane and is
/// read as before (oldest due first, exact), and the rest of the range
/// (those stalled records, mixed with retries and dead claims that are due) one slice a
/// look ([`Walk`]: SecantusDB reads every record of the range a query names, whatever its
/// limit, so the slice's width bounds the read, adapting to hold about a page), without
/// the residual `createdAt` clause, from where the last look left off: each look costs
/// about a page, and every due record there is reached within (stalled records / page)
/// looks.
pub async fn due(
    coll: &Collection<Document>,
    look: Look,
    scopes: &[SweepScope],
    cursor: &Cursor,
) -> Result<Vec<Document>, DependencyError> {
    let recheck = chrono::Duration::from_std(look.recheck).unwrap_or(chrono::Duration::MAX);
    let settled = oldest_point(scopes)
        .and_then(|a| a.checked_add_signed(recheck))
        .filter(|b| *b < look.now);
    let Some(bound) = settled else {
        return oldest_first(coll, look.now, look.limit, scopes).await;
    };
    let mut found = oldest_first(coll, bound, look.limit, scopes).await?;
    if found.len() < look.limit {
        found.extend(past_the_point(coll, look, bound, scopes, cursor).await?);
        found.truncate(look.limit);
    }
    Ok(found)
}

/// The oldest acknowledged point of the lanes that have one (entries waiting).
fn oldest_point(scopes: &[SweepScope]) -> Option<DateTime<Utc>> {
    scopes.iter().filter_map(|s| s.acked_up_to).min()
}

/// The newest acknowledged point, when every lane has one.
fn newest_point(scopes: &[SweepScope]) -> Option<DateTime<Utc>> {
    let points: Option<Vec<DateTime<Utc>>> = scopes.iter().map(|s| s.acked_up_to).collect();
    points.and_then(|p| p.into_iter().max())
}

fn mongo_err(e: mongodb::error::Error) -> DependencyError {
    DependencyError::new(Dependency::MongoDb, e)
}

/// A read of a look's range, in `nextAttemptAt` order, at most `size` records: the
/// records of these lanes read, how many records it read, and, when it was full, the due
/// time of its last record (where the next read starts).
async fn page(
    coll: &Collection<Document>,
    filter: Document,
    size: usize,
    scopes: &[SweepScope],
) -> Result<(Vec<Document>, usize, Option<BsonDate>), DependencyError> {
    let docs: Vec<Document> = coll
        .find(filter)
        .sort(doc! {"nextAttemptAt": 1})
        .limit(size as i64)
        .await
        .map_err(mongo_err)?
        .try_collect()
        .await
        .map_err(mongo_err)?;
    let read = docs.len();
    let next = (read == size)
        .then(|| docs.last()?.get_datetime("nextAttemptAt").ok().copied())
        .flatten();
    let in_lanes = docs
        .into_iter()
        .filter(|d| scopes.iter().any(|s| in_scope(d, s)))
        .collect();
    Ok((in_lanes, read, next))
}

/// The records of these lanes due by `upto`, oldest due first, at most `limit`.
async fn oldest_first(
    coll: &Collection<Document>,
    upto: DateTime<Utc>,
    limit: usize,
    scopes: &[SweepScope],
) -> Result<Vec<Document>, DependencyError> {
    let size = (limit * 2).max(1);
    let mut found = Vec::new();
    let mut after: Option<BsonDate> = None;
    for _ in 0..PAGES {
        let (docs, _, next) = page(coll, filter(upto, after, scopes, true), size, scopes).await?;
        found.extend(docs);
        if found.len() >= limit || next.is_none() {
            break;
        }
        after = next;
    }
    found.truncate(limit);
    Ok(found)
}

/// One slice of the range after `bound`, from where the walk has reached; the walk moves
/// on (past the range's end, it starts again from `bound`).
async fn past_the_point(
    coll: &Collection<Document>,
    look: Look,
    bound: DateTime<Utc>,
    scopes: &[SweepScope],
    cursor: &Cursor,
) -> Result<Vec<Document>, DependencyError> {
    let size = (look.limit * 2).max(1);
    let mut walk = held(cursor).unwrap_or_else(|| Walk::new(SLICE.min(size)));
    let Some((from, to)) = walk.slice(bound, look.now) else {
        return Ok(Vec::new());
    };
    let f = filter(to, Some(bdate(from)), scopes, false);
    let (docs, read, next) = page(coll, f, size, scopes).await?;
    let next = next.map_or(to, |n| n.to_chrono());
    walk.went((from, to), next, look.now, read);
    *held(cursor) = Some(walk);
    Ok(docs)
}

/// The cursor (a look that panicked holding it left a position, still a valid one).
fn held(cursor: &Cursor) -> std::sync::MutexGuard<'_, Option<Walk>> {
    cursor.lock().unwrap_or_else(|p| p.into_inner())
}

/// The range first (the clause that rides the index), then residual clauses that hold for
/// every lane (with `by_point`, created by the newest acknowledged point); no top-level
/// operator.
fn filter(
    upto: DateTime<Utc>,
    after: Option<BsonDate>,
    scopes: &[SweepScope],
    by_point: bool,
) -> Document {
    let mut range = doc! {"$lte": bdate(upto)};
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
    if let Some(newest) = newest_point(scopes).filter(|_| by_point) {
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
        let f = filter(at(100), None, &scopes, true);
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
            true,
        );
        assert!(f.get("createdAt").is_none(), "{f}");
        // Past the stalled lanes' point: no residual the stalled records fail.
        let f = filter(at(100), Some(bdate(at(40))), &scopes, false);
        assert!(f.get("createdAt").is_none(), "{f}");
        assert_eq!(
            f.get_document("nextAttemptAt").unwrap(),
            &doc! {"$lte": bdate(at(100)), "$gt": bdate(at(40))}
        );
    }
}
