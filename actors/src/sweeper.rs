//! OutboxSweeper: puts back on its stream every record MongoDB says should be moving but
//! may not be: never appended (a crash or a Redis outage between the two writes), lost
//! (Redis restarted without its data), due for a retry, or claimed by a worker that died.
//!
//! Owns: nothing but its timer; MongoDB holds all the state (`nextAttemptAt`).
//! Talks to it: itself (`Tick`); the supervisor starts and stops it.
//! Talks to: MongoDB (`take_due`), Redis (XADD to the record's lane of `{type}_stream`, in
//! the shard its id picks, as the router does).
//! On failure: records it took are due again after `recheck`, so a crash loses nothing; an
//! entry appended twice is harmless, since a worker claims a record before sending it.
//!
//! Each lane (high, normal, bulk) is looked at on its own, so a backlog in one lane holds
//! back only that lane's records.
//!
//! A record is left alone while its last entry may still be waiting: it was queued (at
//! its creation, or by this sweeper, noted in MongoDB) after the time up to which the
//! group has read and acknowledged every entry (the older of its oldest pending entry, if
//! delivered only once, and the newest entry it read, from entry ids). So a backlog that never empties holds back
//! only the records inside it or in a consumer's hands (a dead consumer's are taken over
//! by autoclaim): a retry that comes due (its entry was acknowledged long ago) is queued
//! at once and waits only for the entries ahead of it. No `XINFO GROUPS` `lag`, which
//! Redis before 7.0 lacks.

use crate::domain::{Channel, Priority};
use crate::ports::{DependencyError, Queue, Store, SweepScope};
use crate::shards::{earliest_acked, StreamShards};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "sweeper";

/// A record is stamped queued (by the router at its creation, by this sweeper before its
/// append) a little before its entry's id is: up to the router's accept deadline (2 s by
/// default). Only records queued this much before the group's done-with time count as
/// having no entry waiting; a record inside this gap may be queued twice (harmless: a
/// worker claims a record before sending it).
const QUEUE_GAP: chrono::Duration = chrono::Duration::seconds(2);

pub enum SweeperMsg {
    Tick,
}

#[derive(Clone)]
pub struct SweeperArgs {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    pub interval: Duration,
    /// How long a swept record is left alone before it may be swept again.
    pub recheck: Duration,
    pub batch: usize,
    pub group: String,
    pub shards: StreamShards,
}

pub struct OutboxSweeper;

impl Actor for OutboxSweeper {
    type Msg = SweeperMsg;
    type State = SweeperArgs;
    type Arguments = SweeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SweeperArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_after(args.interval, || SweeperMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        a: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let mut next = a.interval;
        // Records whose entry still waits unread in a backlog (say, behind an open breaker)
        // will be read anyway: re-queueing them would only grow it.
        let scopes = match scopes(a).await {
            Ok(scopes) => scopes,
            Err(e) => {
                tracing::debug!(error = %e, "sweep skipped: Redis unavailable");
                myself.send_after(a.interval, || SweeperMsg::Tick);
                return Ok(());
            }
        };
        match a
            .store
            .take_due(Utc::now(), a.recheck, a.batch, &scopes)
            .await
        {
            Ok(records) if !records.is_empty() => {
                let entries: Vec<(&str, Vec<(&str, String)>)> = records
                    .iter()
                    .map(|r| {
                        let stream = a.shards.for_record(r);
                        (stream, r.stream_fields())
                    })
                    .collect();
                match a.queue.append(&entries).await {
                    Ok(_) => {
                        tracing::info!(n = records.len(), "outbox sweep re-queued records");
                        metrics::counter!("outbox_requeued_total").increment(records.len() as u64);
                        if records.len() == a.batch {
                            next = Duration::ZERO;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, n = records.len(), "outbox sweep could not queue; will try after recheck")
                    }
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "outbox sweep could not read the store"),
        }
        myself.send_after(next, || SweeperMsg::Tick);
        Ok(())
    }
}

/// How far each channel's lanes are done with (each lane the earliest of its shards): a
/// bulk backlog holds back only bulk records, never a high one's retry.
async fn scopes(a: &SweeperArgs) -> Result<Vec<SweepScope>, DependencyError> {
    let mut scopes = Vec::new();
    for channel in Channel::ALL {
        for priority in Priority::ALL {
            let mut per_shard = Vec::new();
            for stream in a.shards.lane_streams(channel, priority) {
                per_shard.push(a.queue.acked_up_to(stream, &a.group).await?);
            }
            scopes.push(SweepScope {
                channel,
                priority,
                acked_up_to: earliest_acked(&per_shard).map(|t| t - QUEUE_GAP),
            });
        }
    }
    Ok(scopes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Communication;
    use crate::ports::ReadFrom;
    use crate::testing::{self, MemoryQueue, MemoryStore};

    const GROUP: &str = "g";

    /// The ids of the records the stream of `channel` carries, in order.
    fn queued(queue: &MemoryQueue, channel: Channel) -> Vec<String> {
        queue
            .entries(channel.stream())
            .iter()
            .filter_map(|e| e.field("_id").map(str::to_string))
            .collect()
    }

    async fn append(queue: &MemoryQueue, r: &Communication) {
        queue
            .append(&[(r.channel.stream(), r.stream_fields())])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_due_retry_is_queued_under_a_backlog_that_never_empties() {
        let (store, queue) = (Arc::new(MemoryStore::new()), MemoryQueue::new());
        let ch = Channel::Sms;
        queue.ensure_group(ch.stream(), GROUP).await.unwrap();
        // A record whose entry was read and acknowledged a while ago: its retry is due.
        let mut retry = testing::record(1, ch);
        retry.created_at -= chrono::Duration::seconds(10);
        store.put(retry.clone());
        append(&queue, &retry).await;
        let read = queue
            .read_group(ch.stream(), GROUP, "c", ReadFrom::New, 1, Duration::ZERO)
            .await
            .unwrap();
        queue
            .ack(ch.stream(), GROUP, &[read[0].id.clone()])
            .await
            .unwrap();
        // One in a consumer's hands (read, not acknowledged), then a backlog nobody reads
        // with a record inside it.
        let inflight = testing::record(2, ch);
        store.put(inflight.clone());
        append(&queue, &inflight).await;
        queue
            .read_group(ch.stream(), GROUP, "c", ReadFrom::New, 1, Duration::ZERO)
            .await
            .unwrap();
        let waiting = testing::record(3, ch);
        store.put(waiting.clone());
        append(&queue, &waiting).await;
        // A record of another channel with no backlog at all.
        let email = testing::record(4, Channel::Email);
        store.put(email.clone());
        let args = SweeperArgs {
            store: store.clone(),
            queue: Arc::new(queue.clone()),
            interval: Duration::from_millis(10),
            recheck: Duration::from_secs(60),
            batch: 100,
            group: GROUP.into(),
            shards: StreamShards::ONE,
        };
        let (sweeper, handle) = Actor::spawn(None, OutboxSweeper, args).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        sweeper.stop(None);
        handle.await.unwrap();
        // The retry is queued again (once: it is now inside the backlog itself); the
        // records in a consumer's hands and in the backlog are not queued a second time;
        // the email is queued.
        let ids = [&retry.id, &inflight.id, &waiting.id, &retry.id].map(String::clone);
        assert_eq!(queued(&queue, ch), ids);
        assert_eq!(queued(&queue, Channel::Email), [email.id]);
    }
}
