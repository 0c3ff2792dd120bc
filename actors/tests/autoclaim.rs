//! The StreamConsumer's takeover of idle entries (XAUTOCLAIM) keeps every entry it takes
//! (issue 12, item 11), over the in-memory queue and store. A binary of its own: senders are
//! found by a process-wide name per channel, and the crate's unit tests use every channel.

use actors::domain::{Channel, StreamEntry};
use actors::ports::{Queue, ReadFrom};
use actors::testing::consumer::{
    append_records as append, batches_after, read_new, start_consumer, Batches, SenderAnswer, GROUP,
};
use actors::testing::MemoryQueue;
use std::time::Duration;

/// A consumer whose stand-in sender hands every entry back the first time it sees it.
async fn start(channel: Channel, queue: &MemoryQueue, consumer: &str) -> Batches {
    start_consumer(channel, queue, consumer, SenderAnswer::RetryFirstTime).await
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
    let dead = read_new(&q, ch, "gone", 10).await;
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
    read_new(&q, ch, live, 1000).await;
    append(&q, ch, 121..=121).await;
    let dead = read_new(&q, ch, "gone", 10).await;
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
