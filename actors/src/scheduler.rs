//! SchedulerActor: puts a scheduled send (`"sendAt"` on the request, stored `scheduled`
//! and on no stream) on its stream when its time comes. A [`DueWork`] looked at by a
//! [`crate::due::DueTimer`] registered as [`NAME`], every `schedule.interval_ms`.
//!
//! Owns: where its looks have reached ([`Reach`]); MongoDB holds every scheduled send and
//! its due time (indexed, carried only while the record is `scheduled`), so the timer
//! survives restarts.
//! Talks to it: its DueTimer; the supervisor starts and stops that.
//! Talks to: the store ([`ScheduledSends`]: the due ones, oldest first; a compare-and-set
//! from `scheduled` to `pending`), Redis (one pipeline a batch: the `queued` log event and
//! the entry on the record's stream shard, as the router appends them).
//! On failure: a record is appended only by the process whose compare-and-set moved it,
//! so two processes, or a look repeated after a restart, queue it once. A crash (or a
//! Redis error) between the compare-and-set and the append leaves it `pending` with no
//! entry, noted queued at the move: the OutboxSweeper appends it after its grace time
//! (`SWEEP_RECHECK_MS`), as for a record the router stored and could not append. A sender
//! claims a record before sending it, so an entry appended twice sends it once. A look
//! that fails moves no [`Reach`]: the next reads from where it started.
//!
//! What a look reads: the due-time index is shared with the records that wait for the
//! OutboxSweeper's next look, and while a channel's stream stalls (an open breaker, a
//! rate limit) those pile up in the due range; SecantusDB reads every record of the range
//! a query names to reject them (before 2026-11-29 the whole due range, every second). So
//! the first look after a start reads the whole due range; later looks read their window,
//! from the last complete look's time less [`MARGIN`], which holds every scheduled record
//! whose time came since, unless it was stored more than [`MARGIN`] after its time had
//! passed (an accept slower than that, answered within `accept_deadline_ms`, 2 s, or a bulk
//! send's recipient, within `bulk_deadline_ms`, 15 s). The window's records are read to be
//! rejected too, so the margin is short: under a stream stalled at 300 requests/s a window
//! of 4 s cost SecantusDB about 90 ms a look. For those, each look also reads one slice of the
//! [`LOOKBACK`] before the window ([`crate::walk::Walk`]: about [`SLICE`] records, the
//! slice's width adapting), so a look costs its window and a slice however long a stream
//! has stalled, and such a record is found within one walk over the lookback: a minute and
//! a half when nothing else waits there, longer behind a stalled stream (the lookback's
//! records / [`SLICE`] looks).

use crate::due::{DueError, DueWork};
use crate::ports::{Queue, ScheduledSends};
use crate::router::queue_entries;
use crate::shards::StreamShards;
use crate::walk::Walk;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const NAME: &str = "scheduler";

/// How far before the last complete look's time a look's window starts.
pub const MARGIN: Duration = Duration::from_secs(1);
/// How far before its window a look's slices reach.
pub const LOOKBACK: Duration = Duration::from_secs(15 * 60);
/// About how many records of the lookback a look reads.
pub const SLICE: usize = 200;

/// Where the looks have reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reach {
    /// Where a look's window starts (`None`: the whole due range, as after a start).
    pub window_from: Option<DateTime<Utc>>,
    /// The walk over the lookback.
    pub walk: Walk,
}

impl Default for Reach {
    fn default() -> Self {
        Reach {
            window_from: None,
            walk: Walk::new(SLICE),
        }
    }
}

#[derive(Clone)]
pub struct SchedulerArgs {
    pub store: Arc<dyn ScheduledSends>,
    pub queue: Arc<dyn Queue>,
    pub shards: StreamShards,
    /// Where the looks have reached; shared by the clones of these args, so a restarted
    /// timer goes on from it.
    pub reach: Arc<Mutex<Reach>>,
}

impl SchedulerArgs {
    pub fn new(
        store: Arc<dyn ScheduledSends>,
        queue: Arc<dyn Queue>,
        shards: StreamShards,
    ) -> Self {
        SchedulerArgs {
            store,
            queue,
            shards,
            reach: Arc::default(),
        }
    }

    fn reach(&self) -> std::sync::MutexGuard<'_, Reach> {
        self.reach.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The due ones: the window's (at most `batch`), then, when the window is not the
    /// whole range, those of a slice of the lookback. Answers them, whether the window had
    /// more, and the walk moved on.
    async fn due(
        &self,
        reach: Reach,
        now: DateTime<Utc>,
        batch: usize,
    ) -> Result<(Vec<String>, bool, Walk), DueError> {
        let mut due = self
            .store
            .due_scheduled(reach.window_from, now, batch)
            .await?;
        let full = due.len() >= batch.max(1);
        let mut walk = reach.walk;
        let Some(end) = reach.window_from else {
            return Ok((due, full, walk));
        };
        let start = end - chrono::Duration::from_std(LOOKBACK).unwrap_or_default();
        if let Some(slice) = walk.slice(start, end) {
            let read = self
                .store
                .scheduled_in(slice.0, slice.1, now, walk.target() * 4)
                .await?;
            walk.went(slice, read.cut_at.unwrap_or(slice.1), end, read.read);
            due.extend(read.due);
        }
        Ok((due, full, walk))
    }
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
    /// `queued` events and stream entries in one pipeline; then, the look complete, its
    /// reach (a full window is read again from where it started).
    async fn pass(&self, batch: usize) -> Result<usize, DueError> {
        let now = Utc::now();
        let reach = *self.reach();
        let (due, full, walk) = self.due(reach, now, batch).await?;
        if !due.is_empty() {
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
        }
        let margin = chrono::Duration::from_std(MARGIN).unwrap_or_default();
        *self.reach() = Reach {
            window_from: if full {
                reach.window_from
            } else {
                Some(now - margin)
            },
            walk,
        };
        Ok(due.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Communication, EventStatus, Status, LOG_STREAM};
    use crate::ports::{DependencyError, ScheduledPage};
    use crate::testing::{self, MemoryQueue};

    /// The due range in memory: scheduled records (due at their `sendAt` while
    /// `scheduled`) and the due times of records waiting for the sweeper's look.
    /// `release_scheduled` is the compare-and-set; each read counts the records it read.
    #[derive(Default)]
    struct Scheduled {
        records: Mutex<Vec<Communication>>,
        waiting: Mutex<Vec<DateTime<Utc>>>,
        /// Each window read's start and how many records it read.
        windows: Mutex<Vec<(Option<DateTime<Utc>>, usize)>>,
        /// The records each slice read.
        sliced: Mutex<Vec<usize>>,
    }

    impl Scheduled {
        fn with(records: Vec<Communication>) -> Arc<Scheduled> {
            let s = Scheduled::default();
            *s.records.lock().unwrap() = records;
            Arc::new(s)
        }

        /// The due range, oldest first: (due time, the record if it is a scheduled one).
        fn range(&self) -> Vec<(DateTime<Utc>, Option<Communication>)> {
            let records = self.records.lock().unwrap();
            let scheduled = records
                .iter()
                .filter(|r| r.status == Status::Scheduled)
                .filter_map(|r| Some((r.send_at?, Some(r.clone()))));
            let waiting = self.waiting.lock().unwrap();
            let mut all: Vec<_> = scheduled
                .chain(waiting.iter().map(|t| (*t, None)))
                .collect();
            all.sort_by_key(|(t, _)| *t);
            all
        }

        fn last_window(&self) -> (Option<DateTime<Utc>>, usize) {
            *self.windows.lock().unwrap().last().unwrap()
        }
    }

    #[async_trait]
    impl ScheduledSends for Scheduled {
        async fn due_scheduled(
            &self,
            from: Option<DateTime<Utc>>,
            now: DateTime<Utc>,
            limit: usize,
        ) -> Result<Vec<String>, DependencyError> {
            let read: Vec<_> = self
                .range()
                .into_iter()
                .filter(|(t, _)| from.is_none_or(|f| *t >= f) && *t <= now)
                .collect();
            self.windows.lock().unwrap().push((from, read.len()));
            Ok(read
                .into_iter()
                .filter_map(|(_, r)| r.map(|r| r.id))
                .take(limit)
                .collect())
        }

        async fn scheduled_in(
            &self,
            from: DateTime<Utc>,
            to: DateTime<Utc>,
            now: DateTime<Utc>,
            limit: usize,
        ) -> Result<ScheduledPage, DependencyError> {
            let range: Vec<_> = self
                .range()
                .into_iter()
                .filter(|(t, _)| *t > from && *t <= to)
                .collect();
            // As SecantusDB: the whole range is read, then cut.
            self.sliced.lock().unwrap().push(range.len());
            let read: Vec<_> = range.into_iter().take(limit).collect();
            let cut_at = (read.len() == limit)
                .then(|| read.last().map(|(t, _)| *t))
                .flatten();
            let n = read.len();
            let due = read
                .into_iter()
                .filter_map(|(t, r)| r.filter(|_| t <= now).map(|r| r.id))
                .collect();
            Ok(ScheduledPage {
                due,
                read: n,
                cut_at,
            })
        }

        async fn release_scheduled(
            &self,
            ids: &[String],
            _now: DateTime<Utc>,
        ) -> Result<Vec<Communication>, DependencyError> {
            let mut all = self.records.lock().unwrap();
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

    fn work(store: &Arc<Scheduled>, queue: &MemoryQueue) -> SchedulerArgs {
        SchedulerArgs::new(store.clone(), Arc::new(queue.clone()), StreamShards::ONE)
    }

    #[tokio::test]
    async fn due_sends_are_queued_once_oldest_first_and_the_rest_wait() {
        let (early, later, future) = (scheduled(1, -5), scheduled(2, -1), scheduled(3, 60));
        let store = Scheduled::with(vec![later.clone(), future.clone(), early.clone()]);
        let queue = MemoryQueue::new();
        let work = work(&store, &queue);
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
        let left = store.records.lock().unwrap();
        assert_eq!(
            left.iter().find(|r| r.id == future.id).unwrap().status,
            Status::Scheduled
        );
    }

    #[tokio::test]
    async fn a_failed_append_is_an_error_and_leaves_the_record_to_the_sweeper() {
        let rec = scheduled(1, -1);
        let store = Scheduled::with(vec![rec.clone()]);
        let queue = MemoryQueue::new();
        queue.script().fail_next(
            testing::QueueMethod::Append,
            1,
            crate::ports::ErrorKind::Unavailable,
        );
        let work = work(&store, &queue);
        assert!(matches!(work.pass(10).await, Err(DueError::Store(_))));
        // Moved (so no other look appends it again), not on the stream: the OutboxSweeper
        // queues a `pending` record with no entry after its grace time.
        assert_eq!(store.records.lock().unwrap()[0].status, Status::Pending);
        assert!(queue.entries("sms_stream").is_empty());
        assert_eq!(work.pass(10).await.unwrap(), 0);
    }

    /// 20,000 records of a stalled stream wait in the due range, 500 a second for 40 s: the
    /// first look reads them all; later ones read none in their window, and the slices of
    /// the lookback read each of them about once a walk, not at every look.
    #[tokio::test]
    async fn after_the_first_look_a_look_reads_its_window_and_a_slice_not_a_stalled_range() {
        let store = Scheduled::with(vec![]);
        let now = Utc::now();
        *store.waiting.lock().unwrap() = (0..20_000)
            .map(|i| now - chrono::Duration::seconds(60) + chrono::Duration::milliseconds(2 * i))
            .collect();
        let queue = MemoryQueue::new();
        let work = work(&store, &queue);
        assert_eq!(work.pass(500).await.unwrap(), 0);
        assert_eq!(store.last_window(), (None, 20_000));
        let mut looks = 0;
        loop {
            looks += 1;
            assert!(looks < 1_000, "no walk ended");
            assert_eq!(work.pass(500).await.unwrap(), 0);
            let (_, read) = store.last_window();
            assert_eq!(read, 0, "the stalled records are older than the window");
            if work.reach().walk.at_start() {
                break;
            }
        }
        let sliced = store.sliced.lock().unwrap();
        let total: usize = sliced.iter().sum();
        let widest = (crate::walk::WIDEST.num_seconds() * 500) as usize;
        assert!(sliced.iter().all(|n| *n <= widest), "{sliced:?}");
        assert!(
            total <= 20_000 + widest,
            "read {total} in one walk: {sliced:?}"
        );
        assert!(total >= 20_000, "the walk read them all: {total}");
    }

    /// A record stored after the look that passed its time by more than the margin (a slow
    /// insert) is before every later window: the walk over the lookback reaches it.
    #[tokio::test]
    async fn a_record_stored_after_its_time_was_looked_past_is_found_by_the_walk() {
        let store = Scheduled::with(vec![]);
        let queue = MemoryQueue::new();
        let work = work(&store, &queue);
        work.pass(500).await.unwrap();
        let late = scheduled(7, -60);
        store.records.lock().unwrap().push(late.clone());
        let mut looks = 0;
        while ids_on(&queue, "sms_stream").is_empty() {
            looks += 1;
            assert!(looks <= 200, "not found within 200 looks");
            work.pass(500).await.unwrap();
        }
        assert_eq!(ids_on(&queue, "sms_stream"), [late.id]);
    }

    /// A look that fails, or that finds a full batch, leaves the window where it was: the
    /// next look reads the same range again.
    #[tokio::test]
    async fn a_failed_or_full_look_does_not_move_the_window() {
        let store = Scheduled::with(vec![]);
        let queue = MemoryQueue::new();
        let work = work(&store, &queue);
        work.pass(10).await.unwrap();
        let from = work.reach().window_from;
        assert!(from.is_some());
        store
            .records
            .lock()
            .unwrap()
            .extend([scheduled(1, -1), scheduled(2, -1)]);
        queue.script().fail_next(
            testing::QueueMethod::Append,
            1,
            crate::ports::ErrorKind::Unavailable,
        );
        assert!(work.pass(10).await.is_err());
        assert_eq!(work.reach().window_from, from, "failed: not moved");
        store
            .records
            .lock()
            .unwrap()
            .extend([scheduled(3, -1), scheduled(4, -1)]);
        assert_eq!(work.pass(1).await.unwrap(), 1);
        assert_eq!(work.reach().window_from, from, "full: not moved");
        assert_eq!(store.last_window().0, from);
        assert_eq!(work.pass(10).await.unwrap(), 1);
        assert!(work.reach().window_from > from, "complete: moved on");
    }
}
