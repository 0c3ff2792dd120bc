//! Lanes (issue #15) at the StreamConsumer, over the in-memory queue: the high lane is
//! read before the normal lane before the bulk lane, bulk entries go in small batches with
//! tenants in turn, and a high entry pending before a restart is read first after it. A
//! binary of its own: senders are found by a process-wide name per channel, and the
//! crate's unit tests use every channel.

use actors::domain::Channel;
use actors::ports::{Queue, ReadFrom};
use actors::shards::StreamShards;
use actors::testing::consumer::{batches_after, start_consumer, SenderAnswer, GROUP};
use actors::testing::MemoryQueue;
use std::time::Duration;

/// Append one entry to `stream` for tenant `tenant`, body `id`.
async fn push(q: &MemoryQueue, stream: &str, tenant: &str, id: &str) {
    let fields = vec![("_id", id.to_string()), ("tenant", tenant.to_string())];
    q.append(&[(stream, fields)]).await.unwrap();
}

fn records(batches: &[Vec<String>], q: &MemoryQueue, streams: &[&str]) -> Vec<Vec<String>> {
    let by_id: std::collections::HashMap<String, String> = streams
        .iter()
        .flat_map(|s| q.entries(s))
        .map(|e| (e.id.clone(), e.field("_id").unwrap_or_default().to_string()))
        .collect();
    batches
        .iter()
        .map(|b| b.iter().map(|id| by_id[id].clone()).collect())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn high_goes_before_normal_before_bulk_in_small_bulk_batches_tenants_in_turn() {
    let ch = Channel::Sms;
    let q = MemoryQueue::new();
    let [(_, high), (_, normal), (_, bulk)] = StreamShards::ONE.lanes(ch, 0);
    for s in [high, normal, bulk] {
        q.ensure_group(s, GROUP).await.unwrap();
    }
    for i in 0..4 {
        push(&q, bulk, "A", &format!("bulk-a{i}")).await;
    }
    push(&q, bulk, "B", "bulk-b0").await;
    push(&q, normal, "A", "normal-a0").await;
    push(&q, high, "B", "high-b0").await;
    let batches = batches_after(&start_consumer(ch, &q, "c4", SenderAnswer::AckAll).await, 5).await;
    // (count 10, bulk batches of 2, the bulk lane's tenants in turn)
    assert_eq!(
        records(&batches, &q, &[high, normal, bulk]),
        [
            vec!["high-b0"],
            vec!["normal-a0"],
            vec!["bulk-a0", "bulk-b0"],
            vec!["bulk-a1", "bulk-a2"],
            vec!["bulk-a3"],
        ]
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for s in [high, normal, bulk] {
        assert!(q.pending(s, GROUP).is_empty(), "{s} acknowledged");
    }
}

#[tokio::test(start_paused = true)]
async fn a_high_entry_pending_before_a_restart_is_read_first_after_it() {
    let ch = Channel::Email;
    let q = MemoryQueue::new();
    let [(_, high), (_, normal), _] = StreamShards::ONE.lanes(ch, 0);
    for s in [high, normal] {
        q.ensure_group(s, GROUP).await.unwrap();
    }
    push(&q, high, "A", "high-1").await;
    // Read before a crash: pending for "c5", never acknowledged.
    q.read_group(high, GROUP, "c5", ReadFrom::New, 10, Duration::ZERO)
        .await
        .unwrap();
    push(&q, normal, "A", "normal-1").await;
    let batches = batches_after(&start_consumer(ch, &q, "c5", SenderAnswer::AckAll).await, 2).await;
    assert_eq!(
        records(&batches, &q, &[high, normal]),
        [vec!["high-1"], vec!["normal-1"]]
    );
}
