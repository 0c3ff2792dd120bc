//! A StreamConsumer over the in-memory queue and store, with a recording stand-in for its
//! channel's sender: what the consumer's tests (unit and `actors/tests/autoclaim.rs`) share.

use super::{record, MemoryQueue, MemoryStore};
use crate::domain::Channel;
use crate::health::ProviderHealth;
use crate::ports::Queue;
use crate::routing::Routes;
use crate::sender::{self, DeliverReport, SenderMsg};
use crate::stream_consumer::{ConsumerArgs, StreamConsumer};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The consumer group every consumer started here reads in.
pub const GROUP: &str = "g";

/// The entry ids of each batch the sender was handed, in order.
pub type Batches = Arc<Mutex<Vec<Vec<String>>>>;

/// What the stand-in sender answers.
#[derive(Clone, Copy, Debug)]
pub enum SenderAnswer {
    /// Acknowledge every entry.
    AckAll,
    /// Hand every entry back (`retry`, as when MongoDB is down at its claim) the first time
    /// it is seen, acknowledge it the next time.
    RetryFirstTime,
}

/// Stands in for the channel's sender: records each batch and answers as told.
struct RecordingSender;

impl Actor for RecordingSender {
    type Msg = SenderMsg;
    type State = (Batches, SenderAnswer, HashSet<String>);
    type Arguments = (Batches, SenderAnswer);

    async fn pre_start(
        &self,
        _: ActorRef<SenderMsg>,
        (batches, answer): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((batches, answer, HashSet::new()))
    }

    async fn handle(
        &self,
        _: ActorRef<SenderMsg>,
        SenderMsg::Deliver(entries, reply): SenderMsg,
        (batches, answer, seen): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        super::lock(batches).push(ids.clone());
        let (retry, ack) = match answer {
            SenderAnswer::AckAll => (Vec::new(), ids),
            SenderAnswer::RetryFirstTime => ids.into_iter().partition(|id| seen.insert(id.clone())),
        };
        let _ = reply.send(DeliverReport { ack, retry });
        Ok(())
    }
}

/// A consumer `consumer` of `channel`'s stream (10 entries a read, idle after 2 s, breaker
/// never opening) and its stand-in sender. Each test uses its own channel per process:
/// senders are found by a process-wide name.
pub async fn start_consumer(
    channel: Channel,
    queue: &MemoryQueue,
    consumer: &str,
    answer: SenderAnswer,
) -> Batches {
    let batches = Batches::default();
    Actor::spawn(
        Some(sender::name(channel)),
        RecordingSender,
        (batches.clone(), answer),
    )
    .await
    .unwrap();
    let breaker = super::lenient_breaker();
    let args = ConsumerArgs {
        channel,
        lanes: crate::shards::StreamShards::ONE.lanes(channel, 0),
        queue: Arc::new(queue.clone()),
        group: GROUP.into(),
        consumer: consumer.into(),
        count: 10,
        bulk_count: 2,
        window: 20,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(2),
        deliver_timeout: Duration::from_secs(5),
        max_deliveries: 5,
        store: Arc::new(MemoryStore::new()),
        routes: Arc::new(Routes::single(
            Arc::new(super::ScriptedProvider::new("p")),
            Arc::new(ProviderHealth::new("p", "c", breaker, 1000.0, 1000.0)),
        )),
    };
    Actor::spawn(None, StreamConsumer, args).await.unwrap();
    batches
}

/// Append records `ns` (see [`record`]) to `channel`'s stream, one entry each.
pub async fn append_records(
    queue: &MemoryQueue,
    channel: Channel,
    ns: std::ops::RangeInclusive<u32>,
) {
    for n in ns {
        let r = record(n, channel);
        queue
            .append(&[(channel.stream(), r.stream_fields())])
            .await
            .unwrap();
    }
}

/// Wait (in paused time, up to 10 s) until `batches` holds `n` batches; what it holds then.
pub async fn batches_after(batches: &Batches, n: usize) -> Vec<Vec<String>> {
    for _ in 0..1000 {
        if super::lock(batches).len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    super::lock(batches).clone()
}

/// Read up to `count` new entries of `channel`'s stream as `consumer` (which then holds
/// them pending, as a consumer that died after its read would).
pub async fn read_new(
    queue: &MemoryQueue,
    channel: Channel,
    consumer: &str,
    count: usize,
) -> Vec<crate::domain::StreamEntry> {
    queue
        .read_group(
            channel.stream(),
            GROUP,
            consumer,
            crate::ports::ReadFrom::New,
            count,
            Duration::ZERO,
        )
        .await
        .unwrap()
}
