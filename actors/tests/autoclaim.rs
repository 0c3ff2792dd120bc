//! The StreamConsumer's takeover of idle entries (XAUTOCLAIM) keeps every entry it takes
//! (issue 12, item 11), over the in-memory queue and store. A binary of its own: senders are
//! found by a process-wide name per channel, and the crate's unit tests use every channel.

use actors::domain::{Channel, StreamEntry};
use actors::health::{BreakerConfig, ProviderHealth};
use actors::ports::{Queue, ReadFrom};
use actors::sender::{self, DeliverReport, SenderMsg};
use actors::stream_consumer::{ConsumerArgs, StreamConsumer};
use actors::testing::{self, MemoryQueue, MemoryStore};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GROUP: &str = "g";

type Batches = Arc<Mutex<Vec<Vec<String>>>>;

/// Stands in for the channel's sender: hands every entry back (`retry`, as when MongoDB
/// is down at its claim) the first time it sees it, acknowledges it the next time.
struct FlakySender;

impl Actor for FlakySender {
    type Msg = SenderMsg;
    type State = (Batches, HashSet<String>);
    type Arguments = Batches;

    async fn pre_start(
        &self,
        _: ActorRef<SenderMsg>,
        batches: Batches,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((batches, HashSet::new()))
    }

    async fn handle(
        &self,
        _: ActorRef<SenderMsg>,
        SenderMsg::Deliver(entries, reply): SenderMsg,
        (batches, seen): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        batches.lock().unwrap().push(ids.clone());
        let (retry, ack) = ids.into_iter().partition(|id| seen.insert(id.clone()));
        let _ = reply.send(DeliverReport { ack, retry });
        Ok(())
    }
}

/// A consumer `consumer` of `channel`'s stream (10 entries a read, idle after 2 s) and its
/// flaky sender.
async fn start(channel: Channel, queue: &MemoryQueue, consumer: &str) -> Batches {
    let batches = Batches::default();
    Actor::spawn(Some(sender::name(channel)), FlakySender, batches.clone())
        .await
        .unwrap();
    let breaker = BreakerConfig {
        consecutive_failures: 100,
        failure_ratio: 1.0,
        window: 100,
        min_calls: 100,
        cooldown: Duration::from_secs(1),
    };
    let args = ConsumerArgs {
        channel,
        stream: channel.stream(),
        queue: Arc::new(queue.clone()),
        group: GROUP.into(),
        consumer: consumer.into(),
        count: 10,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(2),
        deliver_timeout: Duration::from_secs(5),
        max_deliveries: 5,
        store: Arc::new(MemoryStore::new()),
        health: Arc::new(ProviderHealth::new("p", "c", breaker, 1000.0, 1000.0)),
    };
    Actor::spawn(None, StreamConsumer, args).await.unwrap();
    batches
}

async fn append(queue: &MemoryQueue, channel: Channel, ns: std::ops::RangeInclusive<u32>) {
    for n in ns {
        let r = testing::record(n, channel);
        queue
            .append(&[(channel.stream(), r.stream_fields())])
            .await
            .unwrap();
    }
}

/// Wait (in paused time, up to 10 s) until `batches` holds `n` batches.
async fn batches_after(batches: &Batches, n: usize) -> Vec<Vec<String>> {
    for _ in 0..1000 {
        if batches.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    batches.lock().unwrap().clone()
}

fn ids(entries: &[StreamEntry]) -> Vec<String> {
    entries.iter().map(|e| e.id.clone()).collect()
}

/// Entries taken over from a dead consumer go to the sender one at a time; when the sender
/// hands each back, every one of them is kept and offered again from memory, none left
/// behind to wait for the next takeover (which would count as one more failed delivery).
#[tokio::test(start_paused = true)]
async fn taken_over_entries_handed_back_are_all_offered_again() {
    let ch = Channel::Sms;
    let q = MemoryQueue::new();
    q.ensure_group(ch.stream(), GROUP).await.unwrap();
    append(&q, ch, 1..=3).await;
    let dead = q
        .read_group(
            ch.stream(),
            GROUP,
            "gone",
            ReadFrom::New,
            10,
            Duration::ZERO,
        )
        .await
        .unwrap();
    let batches = start(ch, &q, "c1").await;
    let seen = batches_after(&batches, 4).await;
    let one_each: Vec<Vec<String>> = ids(&dead).into_iter().map(|id| vec![id]).collect();
    assert_eq!(seen[..3], one_each[..], "taken over one at a time");
    let mut again = seen[3].clone();
    again.sort();
    assert_eq!(again, ids(&dead), "all three offered again: {seen:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(q.pending(ch.stream(), GROUP).is_empty(), "all acknowledged");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        batches.lock().unwrap().len(),
        4,
        "none had to wait for another takeover"
    );
}

/// Redis looks at a bounded stretch of the pending list per XAUTOCLAIM (ten times COUNT):
/// an idle entry behind many live ones is reached by paging on from where the last call
/// stopped, not by starting over from the beginning each time.
#[tokio::test(start_paused = true)]
async fn an_idle_entry_behind_many_live_ones_is_taken_over() {
    let ch = Channel::Email;
    let q = MemoryQueue::new();
    q.ensure_group(ch.stream(), GROUP).await.unwrap();
    append(&q, ch, 1..=120).await;
    let live = "live";
    q.read_group(
        ch.stream(),
        GROUP,
        live,
        ReadFrom::New,
        1000,
        Duration::ZERO,
    )
    .await
    .unwrap();
    append(&q, ch, 121..=121).await;
    let dead = q
        .read_group(
            ch.stream(),
            GROUP,
            "gone",
            ReadFrom::New,
            10,
            Duration::ZERO,
        )
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3)).await;
    // A live consumer keeps its 120 entries busy (delivered again every 200 ms).
    let toucher = q.clone();
    let touch = move || {
        let q = toucher.clone();
        async move {
            let own = ReadFrom::OwnPending("0".into());
            q.read_group(ch.stream(), GROUP, live, own, 1000, Duration::ZERO)
                .await
                .unwrap();
        }
    };
    touch().await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            touch().await;
        }
    });
    let batches = start(ch, &q, "c2").await;
    let seen = batches_after(&batches, 1).await;
    assert_eq!(
        seen.first(),
        Some(&ids(&dead)),
        "the idle entry was reached"
    );
}
