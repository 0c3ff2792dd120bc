//! EventFanout: reads `log_stream` once for every live status subscriber (`GET
//! /api/v1/events`, SSE and WebSocket) and publishes each event to them through a bounded
//! broadcast channel held by the [`EventHub`].
//!
//! Owns: a dedicated Redis connection and the id of the last entry it read (kept in the
//! hub, so a restarted fanout goes on from there). It reads with plain `XREAD`, never
//! through the consumer group: the LogIndexer's entries are not taken from it, nothing is
//! acknowledged, and the StatsActor's trimming is unchanged. While nobody subscribes it
//! reads no entry (issue #14: that was every event parsed a second time for no one): it
//! moves its position to the stream's newest entry once a `block`, and a subscriber's
//! arrival wakes it to read on from there.
//! Talks to it: itself (`Poll`); the supervisor starts and stops it (first shutdown stage;
//! a blocking read lasts at most `block`, at most 1 s).
//! Talks to: Redis (`XREAD BLOCK`), the hub's subscribers (a broadcast send never waits: a
//! subscriber that falls a whole channel behind is told it lagged, and is dropped by its
//! own task; no subscriber slows the fanout or another subscriber).
//! On failure: nothing is in flight. A failed read waits by a full-jitter backoff; a
//! restarted fanout reads on from the last id it published, so the live subscribers see
//! no gap, and subscribers resume a closed connection from `log_stream` or Elasticsearch
//! by their own cursor (`Last-Event-ID`), not from this actor's memory.

use crate::backoff::{Backoff, Delays};
use crate::domain::{LogEvent, StreamEntry, LOG_STREAM};
use crate::ports::Queue;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};

pub const NAME: &str = "event-fanout";

/// Waits after a failed read (Redis down): full jitter, 100 ms doubling to 5 s.
const READ_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5)).with_full_jitter();
const READ_BLOCK_MAX: Duration = Duration::from_secs(1);

/// A `log_stream` entry id, `<ms>-<seq>`, as an ordered pair: the subscribers' cursor.
pub fn cursor_key(cursor: &str) -> Option<(u64, u64)> {
    let (ms, seq) = cursor.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Entries of one millisecond that [`cursor_seq`] tells apart.
pub const CURSOR_SEQ_PER_MS: u64 = 1024;

/// The cursor as one number, ordered as the cursors are (`ms * 1024 + seq`): the
/// `cursorSeq` of a `communication-logs` document, so a resume is one range query. It
/// stays below 2^53 (until the year 2255), so it is exact wherever JSON numbers are
/// doubles; more than 1,024 events in one millisecond (a million a second, beyond what
/// `log_stream`'s bounded append does) would share a number.
pub fn cursor_seq(cursor: &str) -> Option<i64> {
    let (ms, seq) = cursor_key(cursor)?;
    let n = ms
        .checked_mul(CURSOR_SEQ_PER_MS)?
        .checked_add(seq.min(CURSOR_SEQ_PER_MS - 1))?;
    i64::try_from(n).ok()
}

/// [`cursor_seq`] as a `communication-logs` document stores it: 20 digits, zero-padded,
/// so that the text orders as the number does and the field can be a `keyword`. osmem
/// spends about four times as much on a `long` as on a `keyword` (README, "The cursor's
/// number as text"). An index created before maps the field `long` and takes the same
/// text as that number, so both kinds of index read and range over it alike.
pub fn cursor_seq_text(seq: i64) -> String {
    format!("{seq:020}")
}

/// The `cursorSeq` of a stored document: [`cursor_seq_text`], or the number that versions
/// before it wrote.
pub fn stored_cursor_seq(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// One status change as the subscribers see it: the event and its `log_stream` entry id.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    pub cursor: String,
    pub event: LogEvent,
}

impl FeedEvent {
    /// The entry as an event; `None` when it does not read as one (the LogIndexer
    /// dead-letters it; subscribers skip it).
    pub fn from_entry(e: &StreamEntry) -> Option<FeedEvent> {
        let event = LogEvent::from_entry(e).ok()?;
        Some(FeedEvent {
            cursor: e.id.clone(),
            event,
        })
    }

    /// Ordered key of the cursor.
    pub fn key(&self) -> (u64, u64) {
        cursor_key(&self.cursor).unwrap_or_default()
    }
}

/// Why a subscriber was admitted or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The tenant holds `events.max_per_tenant` subscriptions already.
    TenantFull,
    /// The process holds `events.max_subscribers` already.
    ProcessFull,
}

/// What the fanout and the subscribers share: the broadcast channel, the subscriber
/// counts, the shutdown signal and the last entry id read.
pub struct EventHub {
    tx: broadcast::Sender<Arc<FeedEvent>>,
    closed: watch::Sender<bool>,
    counts: Mutex<(usize, HashMap<String, usize>)>,
    last_read: Mutex<Option<String>>,
    /// A subscriber joined: the idle fanout reads again.
    joined: Notify,
    max_total: usize,
    max_per_tenant: usize,
}

impl EventHub {
    /// A hub whose channel holds `capacity` events; at most `max_total` subscribers, at
    /// most `max_per_tenant` of one tenant.
    pub fn new(capacity: usize, max_total: usize, max_per_tenant: usize) -> Arc<EventHub> {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let (closed, _) = watch::channel(false);
        Arc::new(EventHub {
            tx,
            closed,
            counts: Mutex::new((0, HashMap::new())),
            last_read: Mutex::new(None),
            joined: Notify::new(),
            max_total,
            max_per_tenant,
        })
    }

    /// Live events from now on (the fanout, if idle, reads on from a position taken
    /// before this call).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEvent>> {
        let rx = self.tx.subscribe();
        self.joined.notify_one();
        rx
    }

    fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn publish(&self, events: impl IntoIterator<Item = FeedEvent>) {
        for ev in events {
            // No receiver: nobody listens, nothing to do.
            let _ = self.tx.send(Arc::new(ev));
        }
    }

    /// End every subscription (shutdown's first stage): the streams close.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Becomes `true` when the hub is closed.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// A place for one more subscriber of `tenant`, given back when the slot is dropped.
    pub fn admit(self: &Arc<Self>, tenant: &str) -> Result<SubscriberSlot, Refusal> {
        let mut guard = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut *guard;
        if c.0 >= self.max_total {
            return Err(Refusal::ProcessFull);
        }
        let n = c.1.entry(tenant.to_string()).or_default();
        if *n >= self.max_per_tenant {
            return Err(Refusal::TenantFull);
        }
        *n += 1;
        c.0 += 1;
        metrics::gauge!("events_subscribers").set(c.0 as f64);
        Ok(SubscriberSlot {
            hub: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    fn release(&self, tenant: &str) {
        let mut guard = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut *guard;
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.1.remove(tenant);
            }
        }
        metrics::gauge!("events_subscribers").set(c.0 as f64);
    }

    fn last_read(&self) -> Option<String> {
        self.last_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_last_read(&self, id: &str) {
        *self.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
    }
}

/// One admitted subscriber; dropping it frees the place.
pub struct SubscriberSlot {
    hub: Arc<EventHub>,
    tenant: String,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.hub.release(&self.tenant);
    }
}

/// A subscriber closed by the service rather than by its client, by reason (`lagged`: it
/// fell a whole broadcast channel behind; `buffer_full`: its own buffer filled).
pub fn count_dropped(reason: &'static str) {
    metrics::counter!("events_subscribers_dropped_total", "reason" => reason).increment(1);
}

pub enum FanoutMsg {
    Poll,
}

#[derive(Clone)]
pub struct FanoutArgs {
    /// A dedicated connection: the read blocks.
    pub queue: Arc<dyn Queue>,
    pub hub: Arc<EventHub>,
    /// Entries a read.
    pub count: usize,
    /// How long a read waits for new entries (at most 1 s).
    pub block: Duration,
}

pub struct FanoutState {
    args: FanoutArgs,
    failures: Delays,
}

pub struct EventFanout;

impl Actor for EventFanout {
    type Msg = FanoutMsg;
    type State = FanoutState;
    type Arguments = FanoutArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FanoutArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(FanoutMsg::Poll)?;
        Ok(FanoutState {
            args,
            failures: READ_BACKOFF.delays(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match read_once(&state.args).await {
            Ok(()) => {
                state.failures.reset();
                myself.send_message(FanoutMsg::Poll)?;
            }
            Err(err) => {
                let backoff = state.failures.next_delay().max(Duration::from_millis(50));
                tracing::warn!(error = %err, ?backoff, "event fanout read failed");
                myself.send_after(backoff, || FanoutMsg::Poll);
            }
        }
        Ok(())
    }
}

/// One read: from the last id read (the newest entry's at the first start), blocking,
/// each entry published; with no subscriber, [`idle`] instead.
async fn read_once(a: &FanoutArgs) -> Result<(), crate::ports::DependencyError> {
    if !a.hub.has_subscribers() {
        return idle(a).await;
    }
    let after = match a.hub.last_read() {
        Some(id) => id,
        None => {
            let id = a
                .queue
                .last_id(LOG_STREAM)
                .await?
                .unwrap_or_else(|| "0-0".into());
            a.hub.set_last_read(&id);
            id
        }
    };
    let block = a.block.clamp(Duration::from_millis(1), READ_BLOCK_MAX);
    let entries = a
        .queue
        .read_after(LOG_STREAM, &after, a.count.max(1), Some(block))
        .await?;
    if let Some(last) = entries.last() {
        a.hub.set_last_read(&last.id);
        metrics::counter!("events_fanout_read_total").increment(entries.len() as u64);
    }
    a.hub
        .publish(entries.iter().filter_map(FeedEvent::from_entry));
    Ok(())
}

/// Nobody subscribes: no entry is read. The position moves to the stream's newest entry,
/// read *before* the subscribers are looked at, so the position of a fanout that a
/// subscriber wakes is older than the subscription (the invariant `src/events.rs` relies
/// on: whatever the fanout reads after a subscriber joined reaches it, whatever it did not
/// read is in the stream the subscriber's replay reads). Then it waits for a subscriber,
/// at most `block`.
async fn idle(a: &FanoutArgs) -> Result<(), crate::ports::DependencyError> {
    let newest = a
        .queue
        .last_id(LOG_STREAM)
        .await?
        .unwrap_or_else(|| "0-0".into());
    if !a.hub.has_subscribers() {
        a.hub.set_last_read(&newest);
    }
    let block = a.block.clamp(Duration::from_millis(1), READ_BLOCK_MAX);
    let _ = tokio::time::timeout(block, a.hub.joined.notified()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_order_as_their_numbers() {
        assert!(cursor_key("1700000000000-10") > cursor_key("1700000000000-9"));
        assert!(cursor_key("1700000000001-0") > cursor_key("1700000000000-99"));
        assert_eq!(cursor_key("nope"), None);
        assert!(cursor_seq("1700000000000-10") > cursor_seq("1700000000000-9"));
        assert_eq!(
            cursor_seq("1700000000000-3"),
            Some(1_700_000_000_000 * 1024 + 3)
        );
        assert!(
            cursor_seq("4102444800000-0").unwrap() < 1 << 53,
            "exact as a double in 2100"
        );
    }

    #[test]
    fn the_cursors_number_as_text_orders_as_the_number_and_reads_back() {
        let cursors = [
            "9-0",
            "1700000000000-9",
            "1700000000000-10",
            "4102444800000-0",
        ];
        let numbers: Vec<i64> = cursors.iter().map(|c| cursor_seq(c).unwrap()).collect();
        let texts: Vec<String> = numbers.iter().map(|&n| cursor_seq_text(n)).collect();
        assert!(texts.windows(2).all(|w| w[0] < w[1]), "{texts:?}");
        assert!(texts.iter().all(|t| t.len() == 20));
        for (n, t) in numbers.iter().zip(&texts) {
            assert_eq!(stored_cursor_seq(&serde_json::json!(t)), Some(*n));
            assert_eq!(stored_cursor_seq(&serde_json::json!(n)), Some(*n));
        }
        assert_eq!(cursor_seq_text(i64::MAX).len(), 20);
    }

    #[test]
    fn admission_counts_per_tenant_and_in_all_and_frees_on_drop() {
        let hub = EventHub::new(8, 3, 2);
        let a1 = hub.admit("a").unwrap();
        let _a2 = hub.admit("a").unwrap();
        assert_eq!(hub.admit("a").err(), Some(Refusal::TenantFull));
        let _b1 = hub.admit("b").unwrap();
        assert_eq!(hub.admit("c").err(), Some(Refusal::ProcessFull));
        drop(a1);
        assert!(hub.admit("a").is_ok());
    }
}
