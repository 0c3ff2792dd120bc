//! `GET /api/v1/dead-letters` (this tenant's dead letters, newest first, `?page=` from 1
//! and `?size=` up to 100, default 20) and `POST /api/v1/dead-letters/{id}/replay` (put one
//! back on its stream with a fresh attempt budget: 202 with the record; 409
//! `not_replayable` once it is not a dead letter, so a second replay sends nothing; 404 for
//! an unknown id or another tenant's). What a dead letter is and how a replay holds:
//! [`crate::clients::dead_letters`].

use crate::auth::{AuthError, Identity};
use crate::clients::dead_letters::{Replay, MAX_PAGE};
use crate::clients::mongo::MongoStore;
use crate::http::communications::is_hex_id;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, at_with_param, LIST_DEAD_LETTERS, REPLAY_DEAD_LETTER};
use crate::http::state::{authenticated, authenticated_read, with_state, AppState};
use actors::domain::{EventStatus, LogEvent, LOG_STREAM};
use mongodb::bson::Document;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

const DEFAULT_SIZE: u32 = 20;

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let list = at(LIST_DEAD_LETTERS)
        .and(authenticated_read(state))
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state(state))
        .then(list)
        .map(respond);
    let replay = at_with_param(REPLAY_DEAD_LETTER)
        .and(authenticated(state))
        .and(with_state(state))
        .then(replay)
        .map(respond);
    list.or(replay).unify().boxed()
}

/// A whole number from 1 to `max` in `q[name]`, or `default` when it is absent.
fn number(
    q: &HashMap<String, String>,
    name: &'static str,
    max: u32,
    default: u32,
) -> Result<u32, ApiError> {
    let Some(v) = q.get(name) else {
        return Ok(default);
    };
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or(ApiError::Invalid {
            field: name,
            message: format!("{name} must be a whole number from 1 to {max}"),
        })
}

async fn list(
    who: Result<Identity, AuthError>,
    q: HashMap<String, String>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let page = number(&q, "page", 1_000_000, 1)?;
    let size = number(&q, "size", MAX_PAGE, DEFAULT_SIZE)?;
    let (docs, full) = state
        .dead_letters
        .list(&who.tenant, page, size)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "dead letters unavailable");
            ApiError::StoreUnavailable
        })?;
    let next = full.then_some(page + 1);
    let items: Vec<Value> = docs.iter().map(shown).collect();
    let body = json!({"items": items, "page": page, "size": size, "nextPage": next});
    Ok(warp::reply::json(&body).into_response())
}

fn shown(d: &Document) -> Value {
    super::view::record(MongoStore::to_api_json(d))
}

async fn replay(
    id: String,
    who: Result<Identity, AuthError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    if !is_hex_id(&id) {
        return Err(ApiError::InvalidId);
    }
    let doc = match state.dead_letters.replay(&id, &who.tenant).await {
        Ok(Replay::Replayed(d)) => d,
        Ok(Replay::NotReplayable(status)) => return Err(ApiError::NotReplayable(status)),
        Ok(Replay::NotFound) => return Err(ApiError::NoCommunication(id)),
        Err(e) => {
            tracing::warn!(error = %e, "replay failed");
            return Err(ApiError::StoreUnavailable);
        }
    };
    queue_replayed(&state, &doc).await;
    let r = warp::reply::json(&shown(&doc));
    Ok(warp::reply::with_status(r, StatusCode::ACCEPTED).into_response())
}

/// The replayed record's entry on its stream and its `queued` event (service `replay`,
/// at the coming attempt, so search moves on from `failed` at once). If Redis does not
/// take the entry, the OutboxSweeper queues the record at its `nextAttemptAt`; if it does
/// not take the event, the Reconciler brings search in line.
async fn queue_replayed(state: &AppState, d: &Document) {
    let Some(rec) = MongoStore::from_doc(d) else {
        return;
    };
    metrics::counter!("dead_letters_replayed_total", "channel" => rec.channel.as_str())
        .increment(1);
    tracing::info!(id = %rec.id, "dead letter replayed");
    let stream = state.shards.for_record(&rec);
    if let Err(e) = state.queue.append(&[(stream, rec.stream_fields())]).await {
        tracing::warn!(error = %e, id = %rec.id, "replayed entry not queued; the sweeper queues it");
    }
    let ev = LogEvent::for_record(
        &rec,
        "replay",
        EventStatus::Queued,
        rec.attempts + 1,
        rec.updated_at,
    );
    if let Err(e) = state.queue.append(&[(LOG_STREAM, ev.to_fields())]).await {
        tracing::warn!(error = %e, id = %rec.id, "replay event not logged; the reconciler repairs search");
    }
}
