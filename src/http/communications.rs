//! `POST /api/v1/communication` (accept a message) and `GET /api/v1/communication/{id}`
//! (one record, from MongoDB, the source of truth).
//!
//! Accepting goes in named steps: authenticate → refuse during shutdown → read the JSON
//! body → validate → check the `Idempotency-Key` → the per-recipient cap → wait for
//! MongoDB's indexes (they exist a moment after start-up) → hand to the router (answered
//! once MongoDB has the record) → render. The waits after arrival share one deadline.

use crate::auth::{AuthError, Identity};
use crate::clients::indexes::IndexState;
use crate::clients::mongo::MongoStore;
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, at_with_param, CREATE_COMMUNICATION, GET_COMMUNICATION};
use crate::http::state::{authenticated, with_state, AppState};
use crate::limits::CapDecision;
use actors::call::CallError;
use actors::domain::{validate_with, NewCommunication, RawRequest};
use actors::router::{AcceptError, Accepted, Submission};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use warp::filters::BoxedFilter;
use warp::http::header::HeaderValue;
use warp::reply::{Reply, Response};
use warp::Filter;

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let create = at(CREATE_COMMUNICATION)
        .and(authenticated(state))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(limited_body())
        .and(with_state(state))
        .then(create)
        .map(respond);
    let get_one = at_with_param(GET_COMMUNICATION)
        .and(authenticated(state))
        .and(with_state(state))
        .then(get)
        .map(respond);
    create.or(get_one).unify().boxed()
}

async fn create(
    who: Result<Identity, AuthError>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: bytes::Bytes,
    state: AppState,
) -> Result<Response, ApiError> {
    let deadline = state.admission.deadline_from(Instant::now());
    let who = who?;
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::ShuttingDown);
    }
    require_json(content_type.as_deref())?;
    let request = validate_with(&parse_body(&body)?, &state.validation)?;
    if let Some(key) = &idempotency_key {
        check_idempotency_key(key)?;
    }
    let key = idempotency_key.as_deref();
    check_recipient_cap(&state, &who.tenant, &request, key, deadline).await?;
    indexes_in_place(&state, deadline).await?;
    let submission = Submission {
        request,
        tenant: who.tenant,
        idempotency_key,
    };
    let accepted = state
        .admission
        .accept(submission, deadline)
        .await
        .map_err(accept_error)?;
    Ok(render_accepted(accepted))
}

/// Nothing is stored before the unique `Idempotency-Key` index exists: a request that
/// comes in the first moments after start-up waits for it, within its deadline.
async fn indexes_in_place(state: &AppState, deadline: Instant) -> Result<(), ApiError> {
    match state.indexes.wait_until(deadline).await {
        Ok(()) => Ok(()),
        Err(IndexState::Failed(_)) => Err(ApiError::IndexesFailed),
        Err(_) => Err(ApiError::IndexesBuilding),
    }
}

/// `application/json` or any `+json` type, parameters aside.
fn require_json(content_type: Option<&str>) -> Result<(), ApiError> {
    let is_json = content_type.is_some_and(|ct| {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || mime.ends_with("+json")
    });
    is_json.then_some(()).ok_or(ApiError::NotJson)
}

fn parse_body(body: &[u8]) -> Result<RawRequest, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(object @ Value::Object(_)) => serde_json::from_value(object)
            .map_err(|e| ApiError::InvalidJson(format!("malformed request: {e}"))),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object with type and data".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(format!("malformed JSON: {e}"))),
    }
}

fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ApiError::Invalid {
            field: "Idempotency-Key",
            message: "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        });
    }
    Ok(())
}

/// Over the cap is a 429, unless this is a retry of a request already accepted: that one
/// is answered as before. Looking that up waits for MongoDB until the deadline at most.
async fn check_recipient_cap(
    state: &AppState,
    tenant: &str,
    request: &NewCommunication,
    idempotency_key: Option<&str>,
    deadline: Instant,
) -> Result<(), ApiError> {
    let CapDecision::Exceeded { retry_after_secs } =
        state.cap.check(tenant, request.channel, &request.to).await
    else {
        return Ok(());
    };
    let replay = match idempotency_key {
        Some(k) => {
            let holder = state.store.idempotency_holder(tenant, k);
            match tokio::time::timeout_at(deadline, holder).await {
                Ok(found) => matches!(found, Ok(Some(_))),
                Err(_) => return Err(ApiError::NotProcessedInTime),
            }
        }
        None => false,
    };
    if replay {
        return Ok(());
    }
    Err(ApiError::RecipientLimit {
        max: state.cap.max,
        channel: request.channel,
        retry_after_secs,
    })
}

fn accept_error(e: CallError<AcceptError>) -> ApiError {
    match e {
        CallError::Refused(AcceptError::KeyConflict(k)) => ApiError::KeyReused(k),
        CallError::Refused(AcceptError::Unavailable(e)) => {
            tracing::warn!(error = %e, "request not stored");
            ApiError::NothingStored
        }
        CallError::Refused(AcceptError::QueueFull) => ApiError::AcceptQueueFull,
        CallError::NotRunning(_) => ApiError::RouterRestarting,
        // The router dropped the request, or voids its record: nothing is stored.
        CallError::TimedOut(_) | CallError::Stopped(_) => ApiError::NotProcessedInTime,
    }
}

fn render_accepted(Accepted { record, replayed }: Accepted) -> Response {
    let mut data = json!({"from": record.from, "to": record.to, "msg": record.msg});
    if let Some(s) = &record.subject {
        data["subject"] = json!(s);
    }
    let body = json!({
        "status": "queued",
        "stream": record.channel.stream(),
        "id": record.id,
        "data": data,
    });
    let mut r = warp::reply::json(&body).into_response();
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

async fn get(
    id: String,
    who: Result<Identity, AuthError>,
    state: AppState,
) -> Result<Response, ApiError> {
    let who = who?;
    if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::InvalidId);
    }
    match state.store.get_doc(&id, &who.tenant).await {
        Ok(Some(d)) => {
            let shown = super::view::record(MongoStore::to_api_json(&d));
            Ok(warp::reply::json(&shown).into_response())
        }
        Ok(None) => Err(ApiError::NoCommunication(id)),
        Err(e) => {
            tracing::warn!(error = %e, "lookup failed");
            Err(ApiError::StoreUnavailable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_and_bodies() {
        assert!(require_json(Some("application/json; charset=utf-8")).is_ok());
        assert!(require_json(Some("Application/Problem+JSON")).is_ok());
        assert!(matches!(
            require_json(Some("text/plain")),
            Err(ApiError::NotJson)
        ));
        assert!(matches!(require_json(None), Err(ApiError::NotJson)));
        let message = |b: &[u8]| parse_body(b).unwrap_err().to_string();
        assert_eq!(
            message(b"[1]"),
            "the body must be a JSON object with type and data"
        );
        assert!(message(b"{").starts_with("malformed JSON: "));
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_255() {
        assert!(check_idempotency_key("order-42").is_ok());
        assert!(check_idempotency_key(&"k".repeat(255)).is_ok());
        for bad in ["", "has space", "é", &"k".repeat(256)] {
            assert!(check_idempotency_key(bad).is_err(), "{bad:?}");
        }
    }
}
