//! `GET /api/v1/communication/{id}/events`: one message's timeline, every event
//! `communication-logs` holds for it (queued, each attempt's retrying / sent / failed with
//! its provider and error, receipts, cancels, replays), oldest first. The record is looked
//! up in MongoDB first, so an unknown id and another tenant's are 404 alike; the events are
//! filtered by tenant too, and each is an allow-list of fields ([`EVENT_FIELDS`]).

use crate::auth::{AuthError, Identity};
use crate::http::communications::is_hex_id;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at_with_param, COMMUNICATION_EVENTS};
use crate::http::state::{authenticated_read, with_state, AppState};
use elasticsearch::SearchParts;
use serde_json::{json, Value};
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};
use warp::Filter;

/// The fields of each event a tenant sees.
pub const EVENT_FIELDS: &[&str] = &[
    "status",
    "service",
    "timestamp",
    "attempt",
    "provider",
    "providerMessageId",
    "error",
];

/// The most events a timeline shows.
const MAX_EVENTS: u32 = 500;

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    at_with_param(COMMUNICATION_EVENTS)
        .and(authenticated_read(state))
        .and(with_state(state))
        .then(events)
        .map(respond)
        .boxed()
}

async fn events(
    id: String,
    who: Result<Identity, AuthError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    if !is_hex_id(&id) {
        return Err(ApiError::InvalidId);
    }
    match state.store.get_doc(&id, &who.tenant).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(ApiError::NoCommunication(id)),
        Err(e) => {
            tracing::warn!(error = %e, "lookup failed");
            return Err(ApiError::StoreUnavailable);
        }
    }
    let events = read_events(&state, &id, &who.tenant).await.map_err(|e| {
        tracing::warn!(error = %e, "timeline search failed");
        ApiError::SearchUnavailable
    })?;
    Ok(warp::reply::json(&json!({"id": id, "events": events})).into_response())
}

async fn read_events(state: &AppState, id: &str, tenant: &str) -> Result<Vec<Value>, String> {
    let body = json!({
        "query": {"bool": {"filter": [
            {"term": {"tenant": tenant}},
            {"term": {"communicationId": id}},
        ]}},
        // A log document leaves out an attempt of 0 (`actors::log_indexer::attempt_left_out`).
        "sort": [{"timestamp": {"order": "asc"}}, {"attempt": {"order": "asc", "missing": 0}}],
        "size": MAX_EVENTS,
    });
    let res = state
        .search
        .client()
        .search(SearchParts::Index(&[&state.logs_index]))
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let code = res.status_code();
    if code.as_u16() == 404 {
        return Ok(Vec::new());
    }
    if !code.is_success() {
        return Err(format!("status {code}"));
    }
    let v: Value = res.json().await.map_err(|e| e.to_string())?;
    Ok(v["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| shown(h["_source"].clone()))
        .collect())
}

fn shown(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| EVENT_FIELDS.contains(&k.as_str()));
        o.entry("attempt").or_insert(Value::from(0));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_its_allowed_fields_with_a_left_out_attempt_as_0() {
        let queued = json!({"status": "queued", "timestamp": "t", "tenant": "a", "msg": "m"});
        assert_eq!(
            shown(queued),
            json!({"status": "queued", "timestamp": "t", "attempt": 0})
        );
        let sent = json!({"status": "sent", "timestamp": "t", "attempt": 2, "cursor": "1-0"});
        assert_eq!(
            shown(sent),
            json!({"status": "sent", "timestamp": "t", "attempt": 2})
        );
    }
}
