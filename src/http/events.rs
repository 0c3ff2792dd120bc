//! `GET /api/v1/events` (Server-Sent Events) and `GET /api/v1/events/ws` (WebSocket): the
//! caller's tenant's status changes as they happen. The query (`ids`, `type`, `batchId`,
//! `lastEventId`) and the `Last-Event-ID` header are read here; [`crate::events`] serves
//! the subscription.

use crate::auth::{AuthError, Identity};
use crate::events::{self, EventFilter, Sources};
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, EVENTS, EVENTS_WS};
use crate::http::state::{authenticated_read, with_state, AppState};
use crate::search::QueryError;
use actors::domain::Channel;
use actors::event_fanout::{cursor_key, EventHub, FeedEvent, Refusal};
use futures::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};
use warp::Filter;

/// Most communication ids one `ids=` names.
const MAX_IDS: usize = 100;

/// The live stream's shared parts and settings.
pub struct EventsConfig {
    pub hub: Arc<EventHub>,
    pub logs_index: String,
    pub keep_alive: Duration,
    /// Events a subscriber's own buffer holds.
    pub buffer: usize,
}

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let raw = || warp::query::raw().or(warp::any().map(String::new)).unify();
    let sse = at(EVENTS)
        .and(authenticated_read(state))
        .and(raw())
        .and(warp::header::optional::<String>("last-event-id"))
        .and(with_state(state))
        .then(sse_events)
        .map(respond);
    let upgrade = warp::ws().map(Some).or(warp::any().map(|| None)).unify();
    let ws = at(EVENTS_WS)
        .and(authenticated_read(state))
        .and(raw())
        .and(upgrade)
        .and(with_state(state))
        .then(ws_events)
        .map(respond);
    sse.or(ws).unify().boxed()
}

/// What a query asks for.
#[derive(Debug, Default, PartialEq)]
struct EventQuery {
    ids: Option<HashSet<String>>,
    channel: Option<Channel>,
    batch_id: Option<String>,
    after: Option<String>,
}

fn invalid(field: &'static str, message: &str) -> ApiError {
    ApiError::Invalid {
        field,
        message: message.to_string(),
    }
}

fn is_hex_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn cursor(field: &'static str, v: &str) -> Result<String, ApiError> {
    match cursor_key(v.trim()) {
        Some(_) => Ok(v.trim().to_string()),
        None => Err(invalid(
            field,
            &format!("{field} must be an event id this stream sent (<ms>-<seq>)"),
        )),
    }
}

/// The query string and the `Last-Event-ID` header (which wins over `lastEventId`: a
/// browser's EventSource sends it on reconnecting, with the first URL).
fn parse_query(raw: &str, last_event_id: Option<&str>) -> Result<EventQuery, ApiError> {
    let mut q = EventQuery::default();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "ids" => {
                let ids: HashSet<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                if ids.is_empty() || ids.len() > MAX_IDS || !ids.iter().all(|i| is_hex_id(i)) {
                    return Err(invalid(
                        "ids",
                        "ids must be 1 to 100 communication ids (24 hexadecimal digits each), comma-separated",
                    ));
                }
                q.ids = Some(ids);
            }
            "type" => {
                let c = Channel::parse(&v)
                    .ok_or_else(|| invalid("type", "type must be one of email, sms, whatsapp"))?;
                q.channel = Some(c);
            }
            "batchId" if is_hex_id(&v) => q.batch_id = Some(v.into_owned()),
            "batchId" => return Err(ApiError::InvalidBatchId),
            "lastEventId" => q.after = Some(cursor("lastEventId", &v)?),
            other => return Err(QueryError::Unknown(other.to_string()).into()),
        }
    }
    if let Some(h) = last_event_id.filter(|h| !h.trim().is_empty()) {
        q.after = Some(cursor("Last-Event-ID", h)?);
    }
    Ok(q)
}

/// Admit and start the caller's subscription.
fn open(
    state: &AppState,
    who: &Identity,
    q: EventQuery,
) -> Result<mpsc::Receiver<Arc<FeedEvent>>, ApiError> {
    let cfg = &state.events;
    if state.shutting_down.load(Ordering::SeqCst) || cfg.hub.is_closed() {
        return Err(ApiError::ShuttingDown);
    }
    let slot = cfg.hub.admit(&who.tenant).map_err(|r| match r {
        Refusal::TenantFull => ApiError::TooManySubscribers("this tenant"),
        Refusal::ProcessFull => ApiError::TooManySubscribers("this instance"),
    })?;
    let sources = Sources {
        hub: cfg.hub.clone(),
        // The replay's reads do not block: the shared connection serves them.
        queue: state.queue.clone(),
        es: state.search.client().clone(),
        logs_index: cfg.logs_index.clone(),
    };
    let filter = EventFilter {
        tenant: who.tenant.clone(),
        ids: q.ids,
        channel: q.channel,
        batch_id: q.batch_id,
    };
    Ok(events::subscribe(
        sources, filter, q.after, cfg.buffer, slot,
    ))
}

async fn sse_events(
    who: Result<Identity, AuthError>,
    raw: String,
    last_event_id: Option<String>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let q = parse_query(&raw, last_event_id.as_deref())?;
    let rx = open(&state, &who, q)?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let sse = warp::sse::Event::default()
            .id(ev.cursor.clone())
            .event("status")
            .data(events::event_json(&ev).to_string());
        Some((Ok::<_, Infallible>(sse), rx))
    });
    let body = warp::sse::keep_alive()
        .interval(state.events.keep_alive)
        .text(" keep-alive")
        .stream(stream);
    Ok(warp::sse::reply(body).into_response())
}

async fn ws_events(
    who: Result<Identity, AuthError>,
    raw: String,
    ws: Option<Ws>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let q = parse_query(&raw, None)?;
    let ws = ws.ok_or_else(|| {
        invalid(
            "upgrade",
            "this route is a WebSocket: send Connection: Upgrade and Upgrade: websocket",
        )
    })?;
    let rx = open(&state, &who, q)?;
    let keep_alive = state.events.keep_alive;
    Ok(ws
        .on_upgrade(move |socket| pump(socket, rx, keep_alive))
        .into_response())
}

/// Each event a text frame (its JSON with `cursor`), a ping every `keep_alive`; ends when
/// the subscription or the client does.
async fn pump(socket: WebSocket, mut rx: mpsc::Receiver<Arc<FeedEvent>>, keep_alive: Duration) {
    let (mut out, mut incoming) = socket.split();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    loop {
        let frame = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    let mut v = events::event_json(&ev);
                    v["cursor"] = serde_json::json!(ev.cursor);
                    Message::text(v.to_string())
                }
                None => break,
            },
            _ = tick.tick() => Message::ping(Vec::new()),
            m = incoming.next() => match m {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => break,
            },
        };
        if out.send(frame).await.is_err() {
            return;
        }
    }
    let _ = out.send(Message::close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_reads_its_filters_and_names_a_bad_one() {
        let id = "65f0c0ffee0123456789abcd";
        let q = parse_query(
            &format!("ids={id}&type=sms&batchId={id}&lastEventId=5-1"),
            None,
        )
        .unwrap();
        assert_eq!(q.ids, Some([id.to_string()].into()));
        assert_eq!(q.channel, Some(Channel::Sms));
        assert_eq!(q.batch_id.as_deref(), Some(id));
        assert_eq!(q.after.as_deref(), Some("5-1"));
        let h = parse_query("lastEventId=5-1", Some("7-0")).unwrap();
        assert_eq!(h.after.as_deref(), Some("7-0"), "the header wins");
        let field = |raw: &str, h: Option<&str>| match parse_query(raw, h) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{raw}: {other:?}"),
        };
        assert_eq!(field("ids=nope", None), "ids");
        assert_eq!(field("type=fax", None), "type");
        assert_eq!(field("lastEventId=x", None), "lastEventId");
        assert_eq!(field("", Some("x")), "Last-Event-ID");
        assert!(matches!(
            parse_query("batchId=1", None),
            Err(ApiError::InvalidBatchId)
        ));
        assert!(matches!(
            parse_query("page=1", None),
            Err(ApiError::InvalidQuery(_))
        ));
    }
}
