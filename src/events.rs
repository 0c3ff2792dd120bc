//! The live status stream's subscriptions, behind `GET /api/v1/events` and its WebSocket
//! (`http/events.rs`, which knows the HTTP; this file knows none).
//!
//! A subscription is a task of its own that feeds the client's bounded buffer: it joins
//! the EventFanout's broadcast first, then replays what came after the client's cursor
//! (`Last-Event-ID`), from `log_stream` while the stream still holds it and from
//! Elasticsearch `communication-logs` (by `cursorSeq`) for what was trimmed, then passes
//! on the live events it has not replayed (by cursor: no gap, no duplicate). Only the
//! subscriber's tenant's events, and those its filters ask for, are passed on.
//!
//! A slow client never holds anything else up: when its buffer is full, or it fell a
//! whole broadcast channel behind, its subscription ends and is counted
//! (`events_subscribers_dropped_total{reason}`); the client reconnects with its cursor.

use actors::domain::{Channel, LogEvent, LOG_STREAM};
use actors::event_fanout::{
    count_dropped, cursor_key, cursor_seq, cursor_seq_text, stored_cursor_seq, EventHub, FeedEvent,
    SubscriberSlot,
};
use actors::ports::Queue;
use elasticsearch::{Elasticsearch, SearchParts};
use serde_json::{json, Value};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};

/// Events a replay reads at a time (from `log_stream` or Elasticsearch).
const REPLAY_PAGE: usize = 500;
/// Events between a subscription's task and the connection's writer; the subscriber's
/// buffer (`events.subscriber_buffer`) is the task's queue in front of it.
const HANDOFF: usize = 16;

/// Which events a subscriber gets: its tenant's, narrowed by the query's filters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub tenant: String,
    pub ids: Option<HashSet<String>>,
    pub channel: Option<Channel>,
    pub batch_id: Option<String>,
}

impl EventFilter {
    pub fn matches(&self, ev: &LogEvent) -> bool {
        ev.tenant == self.tenant
            && self
                .ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&ev.communication_id))
            && self.channel.is_none_or(|c| c == ev.channel)
            && self
                .batch_id
                .as_ref()
                .is_none_or(|b| ev.batch_id.as_ref() == Some(b))
    }
}

/// Where a subscription reads.
#[derive(Clone)]
pub struct Sources {
    pub hub: Arc<EventHub>,
    pub queue: Arc<dyn Queue>,
    pub es: Elasticsearch,
    pub logs_index: String,
}

/// The event as a client sees it (the SSE `data`; the WebSocket frame adds `cursor`).
pub fn event_json(e: &FeedEvent) -> Value {
    let ev = &e.event;
    let mut v = json!({
        "id": ev.communication_id,
        "type": ev.channel.as_str(),
        "status": ev.status.as_str(),
        "at": ev.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "attempt": ev.attempt,
    });
    let extra = [
        ("provider", &ev.provider),
        ("batchId", &ev.batch_id),
        ("error", &ev.error),
    ];
    for (k, val) in extra {
        if let Some(s) = val {
            v[k] = json!(s);
        }
    }
    v
}

/// Start a subscription: its events arrive on the receiver, which ends when the
/// subscription does (client too slow, shutdown, or a replay that could not be served).
pub fn subscribe(
    src: Sources,
    filter: EventFilter,
    after: Option<String>,
    buffer: usize,
    slot: SubscriberSlot,
) -> mpsc::Receiver<Arc<FeedEvent>> {
    let (tx, rx) = mpsc::channel(HANDOFF);
    tokio::spawn(async move {
        let _slot = slot;
        let mut closed = src.hub.closed();
        tokio::select! {
            _ = closed.wait_for(|c| *c) => {}
            _ = run(&src, &filter, after, &tx, buffer.max(1)) => {}
        }
    });
    rx
}

/// Why a subscription ended early.
#[derive(Debug)]
enum Ended {
    /// The client went away.
    Gone,
    /// The replay could not be read (Redis or Elasticsearch): the client reconnects.
    Unavailable(String),
}

async fn run(
    src: &Sources,
    filter: &EventFilter,
    after: Option<String>,
    tx: &mpsc::Sender<Arc<FeedEvent>>,
    queue_max: usize,
) {
    // Joined before the replay reads: whatever the fanout reads from now on is in it,
    // and whatever it read before is in the stream the replay reads.
    let live = src.hub.subscribe();
    let mut last = (0, 0);
    if let Some(after) = after {
        match replay(src, filter, &after, tx).await {
            Ok(k) => last = k,
            Err(Ended::Gone) => return,
            Err(Ended::Unavailable(why)) => {
                tracing::warn!(error = %why, "event replay failed; the subscription ends");
                return;
            }
        }
    }
    if let Some(reason) = pass_live(live, filter, last, tx, queue_max).await {
        count_dropped(reason);
    }
}

/// Live events after `last` into the client's channel, through a queue of at most
/// `queue_max` events: the broadcast is read at once whatever the client does, and a
/// client that lets its queue fill is dropped (the reason returned). `None`: the client
/// went away.
async fn pass_live(
    mut live: broadcast::Receiver<Arc<FeedEvent>>,
    filter: &EventFilter,
    mut last: (u64, u64),
    tx: &mpsc::Sender<Arc<FeedEvent>>,
    queue_max: usize,
) -> Option<&'static str> {
    let mut queue: VecDeque<Arc<FeedEvent>> = VecDeque::new();
    loop {
        tokio::select! {
            permit = tx.reserve(), if !queue.is_empty() => match (permit, queue.pop_front()) {
                (Ok(p), Some(ev)) => p.send(ev),
                _ => return None,
            },
            _ = tx.closed(), if queue.is_empty() => return None,
            r = live.recv() => {
                let ev = match r {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(_)) => return Some("lagged"),
                    Err(RecvError::Closed) => return None,
                };
                if ev.key() <= last || !filter.matches(&ev.event) {
                    continue;
                }
                last = ev.key();
                if queue.len() >= queue_max {
                    return Some("buffer_full");
                }
                queue.push_back(ev);
            }
        }
    }
}

/// Pass on every event after `after` the filter asks for: the trimmed part from
/// Elasticsearch, the rest from `log_stream`. Returns the cursor of the last event read.
async fn replay(
    src: &Sources,
    filter: &EventFilter,
    after: &str,
    tx: &mpsc::Sender<Arc<FeedEvent>>,
) -> Result<(u64, u64), Ended> {
    let first = src
        .queue
        .end_id(LOG_STREAM, true)
        .await
        .map_err(|e| Ended::Unavailable(e.to_string()))?;
    let first_key = first.as_deref().and_then(cursor_key);
    let mut last = cursor_key(after).unwrap_or_default();
    // Entries after the cursor may have been trimmed: the stream starts later.
    if first_key.is_none_or(|f| f > last) {
        last = replay_search(src, filter, after, first.as_deref(), tx).await?;
    }
    // After what the search passed on: an event indexed meanwhile is not passed twice.
    let mut pos = format!("{}-{}", last.0, last.1);
    loop {
        let page = src
            .queue
            .read_after(LOG_STREAM, &pos, REPLAY_PAGE, None)
            .await
            .map_err(|e| Ended::Unavailable(e.to_string()))?;
        let Some(end) = page.last() else {
            return Ok(last);
        };
        pos = end.id.clone();
        for ev in page.iter().filter_map(FeedEvent::from_entry) {
            last = last.max(ev.key());
            send(filter, ev, tx).await?;
        }
        last = last.max(cursor_key(&pos).unwrap_or_default());
    }
}

async fn send(
    filter: &EventFilter,
    ev: FeedEvent,
    tx: &mpsc::Sender<Arc<FeedEvent>>,
) -> Result<(), Ended> {
    if filter.matches(&ev.event) {
        tx.send(Arc::new(ev)).await.map_err(|_| Ended::Gone)?;
    }
    Ok(())
}

/// The events of `communication-logs` after `after` and before `before` (the stream's
/// first entry, when it has one), oldest first. Returns the last cursor passed.
async fn replay_search(
    src: &Sources,
    filter: &EventFilter,
    after: &str,
    before: Option<&str>,
    tx: &mpsc::Sender<Arc<FeedEvent>>,
) -> Result<(u64, u64), Ended> {
    let mut from = cursor_seq(after).unwrap_or(0);
    let until = before.and_then(cursor_seq);
    let mut last = cursor_key(after).unwrap_or_default();
    loop {
        let hits = search_page(src, &filter.tenant, from, until).await?;
        let n = hits.len();
        for (seq, ev) in hits {
            from = from.max(seq);
            last = last.max(ev.key());
            send(filter, ev, tx).await?;
        }
        if n < REPLAY_PAGE {
            return Ok(last);
        }
    }
}

/// One page of a tenant's logged events with `from < cursorSeq < until`, by `cursorSeq`.
async fn search_page(
    src: &Sources,
    tenant: &str,
    from: i64,
    until: Option<i64>,
) -> Result<Vec<(i64, FeedEvent)>, Ended> {
    // As text (`cursor_seq_text`): a keyword compares it as the number it spells, and an
    // index an earlier version created, where the field is a `long`, reads it as that number.
    let mut range = json!({"gt": cursor_seq_text(from)});
    if let Some(u) = until {
        range["lt"] = json!(cursor_seq_text(u));
    }
    let body = json!({
        "size": REPLAY_PAGE,
        "query": {"bool": {"filter": [
            {"term": {"tenant": tenant}},
            {"range": {"cursorSeq": range}},
        ]}},
        "sort": [{"cursorSeq": {"order": "asc"}}],
    });
    let unavailable = |e: &dyn std::fmt::Display| Ended::Unavailable(e.to_string());
    let res = src
        .es
        .search(SearchParts::Index(&[&src.logs_index]))
        .body(body)
        .send()
        .await
        .map_err(|e| unavailable(&e))?;
    let code = res.status_code();
    if code.as_u16() == 404 {
        return Ok(Vec::new());
    }
    if !code.is_success() {
        return Err(unavailable(&format!("search answered {code}")));
    }
    let v: Value = res.json().await.map_err(|e| unavailable(&e))?;
    Ok(v["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| logged_event(&h["_source"]))
        .collect())
}

/// A `communication-logs` document as an event with its cursor. The documents after a
/// record's accepting one leave out what it says and when it was accepted
/// (`actors::log_indexer::CONTENT_FIELDS`), and none carries `createdAt`
/// (`RECORD_ONLY_FIELDS`); no event a subscriber sees carries them, so they are read as
/// empty (`createdAt` as the event's time).
fn logged_event(doc: &Value) -> Option<(i64, FeedEvent)> {
    let seq = stored_cursor_seq(&doc["cursorSeq"])?;
    let mut doc = doc.clone();
    let o = doc.as_object_mut()?;
    o.entry("msg").or_insert_with(|| Value::from(""));
    if !o.contains_key("createdAt") {
        o.insert("createdAt".into(), o.get("timestamp")?.clone());
    }
    let event: LogEvent = serde_json::from_value(doc).ok()?;
    let cursor = event.cursor.clone()?;
    Some((seq, FeedEvent { cursor, event }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tenant: &str, id: &str, batch: Option<&str>) -> LogEvent {
        let doc = json!({
            "tenant": tenant, "service": "router", "status": "queued", "from": "+1",
            "to": "+2", "msg": "m", "communicationId": id, "timestamp": "2026-11-28T10:00:00Z",
            "type": "sms", "attempt": 0, "createdAt": "2026-11-28T10:00:00Z",
            "batchId": batch, "cursor": "1-0", "cursorSeq": 1_000_000,
        });
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn the_filter_passes_its_tenants_events_that_match_every_field() {
        let f = EventFilter {
            tenant: "a".into(),
            ids: Some(["x".to_string()].into()),
            channel: Some(Channel::Sms),
            batch_id: Some("b".into()),
        };
        assert!(f.matches(&event("a", "x", Some("b"))));
        assert!(!f.matches(&event("other", "x", Some("b"))));
        assert!(!f.matches(&event("a", "y", Some("b"))));
        assert!(!f.matches(&event("a", "x", None)));
        let any = EventFilter {
            tenant: "a".into(),
            ..Default::default()
        };
        assert!(any.matches(&event("a", "y", None)));
        let email = EventFilter {
            channel: Some(Channel::Email),
            ..any
        };
        assert!(!email.matches(&event("a", "y", None)));
    }

    #[test]
    fn a_logged_document_reads_back_with_its_cursor_and_the_client_json_has_the_contract() {
        let doc = serde_json::to_value(event("a", "x", Some("b"))).unwrap();
        let mut doc = doc;
        doc["cursorSeq"] = json!("00000000000001000000");
        let (seq, ev) = logged_event(&doc).unwrap();
        assert_eq!((seq, ev.cursor.as_str()), (1_000_000, "1-0"));
        // As versions before the text wrote it: the number.
        doc["cursorSeq"] = json!(1_000_000);
        let (seq, same) = logged_event(&doc).unwrap();
        assert_eq!(seq, 1_000_000);
        assert_eq!(event_json(&same), event_json(&ev));
        doc["cursorSeq"] = json!("a million");
        assert!(logged_event(&doc).is_none());
        let v = event_json(&ev);
        assert_eq!(v["id"], "x");
        assert_eq!(v["type"], "sms");
        assert_eq!(v["status"], "queued");
        assert_eq!(v["batchId"], "b");
        assert_eq!(v["at"], "2026-11-28T10:00:00.000Z");
        assert!(v.get("provider").is_none() && v.get("error").is_none());
    }

    #[test]
    fn a_logged_document_without_the_body_reads_back_as_the_same_client_event() {
        let mut full = event("a", "x", Some("b"));
        full.status = actors::domain::EventStatus::Sent;
        full.provider = Some("twilio".into());
        let mut doc = serde_json::to_value(&full).unwrap();
        doc["cursorSeq"] = json!(1_000_000);
        let (_, whole) = logged_event(&doc).unwrap();
        let omitted = actors::log_indexer::CONTENT_FIELDS
            .iter()
            .chain(&actors::log_indexer::RECORD_ONLY_FIELDS);
        for k in omitted {
            doc.as_object_mut().unwrap().remove(*k);
        }
        assert!(doc.get("createdAt").is_none());
        // An attempt of 0 is left out too (`actors::log_indexer::attempt_left_out`).
        assert_eq!(full.attempt, 0);
        doc.as_object_mut().unwrap().remove("attempt");
        let (seq, slim) = logged_event(&doc).expect("read without the body");
        assert_eq!((seq, slim.cursor.as_str()), (1_000_000, "1-0"));
        assert_eq!(event_json(&slim), event_json(&whole));
        assert_eq!(event_json(&slim)["provider"], "twilio");
        assert_eq!(event_json(&slim)["attempt"], 0);
    }
}
