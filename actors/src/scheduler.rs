//! SchedulerActor: puts a scheduled send (`"sendAt"` on the request, stored `scheduled`
//! and on no stream) on its stream when its time comes. A [`DueWork`] looked at by a
//! [`crate::due::DueTimer`] registered as [`NAME`], every `schedule.interval_ms`.
//!
//! Owns: nothing; MongoDB holds every scheduled send and its due time (indexed, carried
//! only while the record is `scheduled`), so the timer survives restarts and a look costs
//! one indexed range read of the due records, not a scan of the scheduled ones.
//! Talks to it: its DueTimer; the supervisor starts and stops that.
//! Talks to: the store ([`ScheduledSends`]: the due ones, oldest first; a compare-and-set
//! from `scheduled` to `pending`), Redis (one pipeline a batch: the `queued` log event and
//! the entry on the record's stream shard, as the router appends them).
//! On failure: a record is appended only by the process whose compare-and-set moved it,
//! so two processes, or a look repeated after a restart, queue it once. A crash (or a
//! Redis error) between the compare-and-set and the append leaves it `pending` with no
//! entry, noted queued at the move: the OutboxSweeper appends it after its grace time
//! (`SWEEP_RECHECK_MS`), as for a record the router stored and could not append. A sender
//! claims a record before sending it, so an entry appended twice sends it once.

use crate::due::{DueError, DueWork};
use crate::ports::{Queue, ScheduledSends};
use crate::router::queue_entries;
use crate::shards::StreamShards;
use async_trait::async_trait;
use chrono::Utc;
use std::sync::Arc;

pub const NAME: &str = "scheduler";

#[derive(Clone)]
pub struct SchedulerArgs {
    pub store: Arc<dyn ScheduledSends>,
    pub queue: Arc<dyn Queue>,
    pub shards: StreamShards,
}

#[async_trait]
impl DueWork for SchedulerArgs {
    fn what(&self) -> &'static str {
        "scheduled sends"
    }

    fn errors_metric(&self) -> &'static str {
        "scheduler_errors_total"
    }

    /// One look: the due records moved to `pending` (those this process won), then their
    /// `queued` events and stream entries in one pipeline.
    async fn pass(&self, batch: usize) -> Result<usize, DueError> {
        let now = Utc::now();
        let due = self.store.due_scheduled(now, batch).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let released = self.store.release_scheduled(&due, now).await?;
        let entries: Vec<_> = released
            .iter()
            .flat_map(|r| queue_entries(r, NAME, self.shards, now))
            .collect();
        if !entries.is_empty() {
            self.queue.append(&entries).await?;
            metrics::counter!("scheduled_sends_queued_total").increment(released.len() as u64);
            tracing::info!(n = released.len(), "scheduled sends queued");
        }
        Ok(due.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Communication, EventStatus, Status, LOG_STREAM};
    use crate::ports::DependencyError;
    use crate::testing::{self, MemoryQueue};
    use chrono::DateTime;
    use std::sync::Mutex;

    /// Scheduled records in memory; `release_scheduled` is the compare-and-set.
    #[derive(Default)]
    struct Scheduled(Mutex<Vec<Communication>>);

    #[async_trait]
    impl ScheduledSends for Scheduled {
        async fn due_scheduled(
            &self,
            now: DateTime<Utc>,
            limit: usize,
        ) -> Result<Vec<String>, DependencyError> {
            let mut due: Vec<_> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.status == Status::Scheduled && r.send_at.is_some_and(|t| t <= now))
                .cloned()
                .collect();
            due.sort_by_key(|r| r.send_at);
            Ok(due.into_iter().take(limit).map(|r| r.id).collect())
        }

        async fn release_scheduled(
            &self,
            ids: &[String],
            _now: DateTime<Utc>,
        ) -> Result<Vec<Communication>, DependencyError> {
            let mut all = self.0.lock().unwrap();
            let moved = all
                .iter_mut()
                .filter(|r| ids.contains(&r.id) && r.status == Status::Scheduled)
                .map(|r| {
                    r.status = Status::Pending;
                    r.clone()
                })
                .collect();
            Ok(moved)
        }
    }

    fn scheduled(n: u32, secs_from_now: i64) -> Communication {
        let at = Utc::now() + chrono::Duration::seconds(secs_from_now);
        testing::record(n, Channel::Sms).scheduled_at(Some(at))
    }

    fn ids_on(queue: &MemoryQueue, stream: &str) -> Vec<String> {
        queue
            .entries(stream)
            .iter()
            .filter_map(|e| {
                e.field("_id")
                    .or(e.field("communicationId"))
                    .map(str::to_string)
            })
            .collect()
    }

    #[tokio::test]
    async fn due_sends_are_queued_once_oldest_first_and_the_rest_wait() {
        let store = Arc::new(Scheduled::default());
        let (early, later, future) = (scheduled(1, -5), scheduled(2, -1), scheduled(3, 60));
        *store.0.lock().unwrap() = vec![later.clone(), future.clone(), early.clone()];
        let queue = MemoryQueue::new();
        let work = SchedulerArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            shards: StreamShards::ONE,
        };
        // A batch of one: the oldest first, and a full batch says more may be due.
        assert_eq!(work.pass(1).await.unwrap(), 1);
        assert_eq!(work.pass(10).await.unwrap(), 1);
        // A second process's look (or this one's again) finds nothing left to move.
        assert_eq!(work.pass(10).await.unwrap(), 0);
        assert_eq!(
            ids_on(&queue, "sms_stream"),
            [early.id.clone(), later.id.clone()]
        );
        let events = queue.entries(LOG_STREAM);
        assert_eq!(ids_on(&queue, LOG_STREAM), [early.id, later.id]);
        assert!(events
            .iter()
            .all(|e| e.field("status") == Some(EventStatus::Queued.as_str())));
        assert!(queue
            .entries("sms_stream")
            .iter()
            .all(|e| e.field("status") == Some("pending")));
        let left = store.0.lock().unwrap();
        assert_eq!(
            left.iter().find(|r| r.id == future.id).unwrap().status,
            Status::Scheduled
        );
    }

    #[tokio::test]
    async fn a_failed_append_is_an_error_and_leaves_the_record_to_the_sweeper() {
        let store = Arc::new(Scheduled::default());
        let rec = scheduled(1, -1);
        *store.0.lock().unwrap() = vec![rec.clone()];
        let queue = MemoryQueue::new();
        queue.script().fail_next(
            testing::QueueMethod::Append,
            1,
            crate::ports::ErrorKind::Unavailable,
        );
        let work = SchedulerArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            shards: StreamShards::ONE,
        };
        assert!(matches!(work.pass(10).await, Err(DueError::Store(_))));
        // Moved (so no other look appends it again), not on the stream: the OutboxSweeper
        // queues a `pending` record with no entry after its grace time.
        assert_eq!(store.0.lock().unwrap()[0].status, Status::Pending);
        assert!(queue.entries("sms_stream").is_empty());
        assert_eq!(work.pass(10).await.unwrap(), 0);
    }
}
