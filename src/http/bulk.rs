//! `POST /api/v1/communications/bulk` (one message to up to [`MAX_RECIPIENTS`] recipients)
//! and `GET /api/v1/batches/{batchId}` (a bulk send's records counted by status, from
//! MongoDB).
//!
//! A bulk send is the single request's steps, once for the envelope and once for each
//! recipient: authenticate → refuse during shutdown → read the body (up to
//! [`BULK_BODY_LIMIT`]) → one token of the key's rate → the template, read once → per
//! recipient: its `data` (the shared `data` with its `to`, and its own `variables` over
//! the shared ones) rendered, validated, held to the tenant's senders and countries, then
//! counted against the tenant's quota and caps → every recipient that passed handed to the
//! router at once, so they share its group commits (a few `insert_many`s for a thousand
//! records, not one write each). One bad recipient is answered in its own place of the
//! answer and refuses no other.
//!
//! Every record carries the `batchId`. With an `Idempotency-Key` the batch id is derived
//! from it and each recipient's record holds the key plus `#` and the recipient's index,
//! so a retry of the same body answers the same ids (and stores only the recipients that
//! were not stored before).

use crate::auth::{AuthError, Identity};
use crate::http::body::limited_body_up_to;
use crate::http::communications::{
    accept_error, check_idempotency_key, check_sender_and_destination, fallback_request,
    indexes_in_place, is_hex_id, is_replay, parse_body, refusal, sending_caller, with_default_from,
};
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, at_with_param, CREATE_BULK, GET_BATCH};
use crate::http::state::{authenticated, authenticated_read, with_state, AppState};
use crate::http::templates::{render_with, request_template, Named};
use crate::limits::{Caller, Verdict};
use crate::tenants::TenantPolicy;
use actors::domain::{priority_of, send_at_of, validate_with, Channel, Priority, RawRequest};
use actors::router::{Accepted, Submission};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::time::Instant;
use warp::filters::BoxedFilter;
use warp::http::header::HeaderValue;
use warp::reply::{Reply, Response};
use warp::Filter;

/// Most recipients of one bulk send.
pub const MAX_RECIPIENTS: usize = 1000;
/// Largest bulk request body.
pub const BULK_BODY_LIMIT: u64 = 1024 * 1024;
/// Recipients whose limits are asked of Redis at once.
const LIMIT_CHECKS_AT_ONCE: usize = 64;

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let create = at(CREATE_BULK)
        .and(authenticated(state))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(limited_body_up_to(BULK_BODY_LIMIT))
        .and(with_state(state))
        .then(create)
        .map(respond);
    let batch = at_with_param(GET_BATCH)
        .and(authenticated_read(state))
        .and(with_state(state))
        .then(get_batch)
        .map(respond);
    create.or(batch).unify().boxed()
}

/// One recipient's place in the answer: its record, or why it has none.
enum Place {
    Refused(ApiError),
    Ready(Box<Submission>),
    Done(Box<Accepted>),
}

async fn create(
    who: Result<Identity, AuthError>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: bytes::Bytes,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let deadline = state.admission.bulk_deadline_from(Instant::now());
    let who = sending_caller(who, content_type.as_deref(), &state)?;
    if let Some(key) = &idempotency_key {
        check_idempotency_key(key)?;
    }
    let (shared, recipients) = envelope(&body)?;
    let policy = state.tenants.policy(&who.tenant);
    let caller = Caller {
        tenant: &who.tenant,
        key_id: &who.key_id,
        policy: &policy,
    };
    take_token(&state, &caller).await?;
    let named = request_template(&state, &who.tenant, &shared).await?;
    let send_at = send_at_of(&shared, chrono::Utc::now(), &state.schedule)?;
    // A bulk send goes in the bulk lane unless it names another.
    let priority = priority_of(&shared, Priority::Bulk)?;
    let batch_id = batch_id(&who.tenant, idempotency_key.as_deref());
    let mut places: Vec<Place> = recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key = idempotency_key.as_ref().map(|k| format!("{k}#{i}"));
            prepare(&state, &policy, &shared, named.as_ref(), r, key)
                .map(|mut s| {
                    s.tenant.clone_from(&who.tenant);
                    s.batch_id = Some(batch_id.clone());
                    s.send_at = send_at;
                    s.priority = priority;
                    Place::Ready(Box::new(s))
                })
                .unwrap_or_else(Place::Refused)
        })
        .collect();
    check_recipient_limits(&state, &caller, &mut places, deadline).await?;
    if places.iter().any(|p| matches!(p, Place::Ready(_))) {
        indexes_in_place(&state, deadline).await?;
        list_members(&state, &who.tenant, &batch_id, &mut places, deadline).await?;
        store(&state, &mut places, deadline).await?;
    }
    Ok(render(
        &batch_id,
        shared_channel(&shared),
        &recipients,
        places,
    ))
}

/// The shared request (`type`, `data`, `fallback`) and the recipients, or a 400 for the
/// whole send.
fn envelope(body: &[u8]) -> Result<(RawRequest, Vec<Value>), ApiError> {
    let mut raw: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(ApiError::InvalidJson(
                "the body must be a JSON object".into(),
            ))
        }
        Err(e) => return Err(ApiError::InvalidJson(format!("malformed JSON: {e}"))),
    };
    let recipients = match raw.remove("recipients") {
        Some(Value::Array(r)) if !r.is_empty() && r.len() <= MAX_RECIPIENTS => r,
        _ => {
            return Err(invalid(
                "recipients",
                format!("recipients must be an array of 1 to {MAX_RECIPIENTS} objects with a to"),
            ))
        }
    };
    let shared = parse_body(&serde_json::to_vec(&Value::Object(raw)).unwrap_or_default())?;
    match shared.data.as_ref() {
        Some(Value::Object(d)) if d.get("to").is_some_and(|t| !t.is_null()) => Err(invalid(
            "to",
            "a bulk send's data has no to: each recipient gives its own".into(),
        )),
        Some(Value::Object(_)) => Ok((shared, recipients)),
        _ => Err(invalid(
            "data",
            "data must be an object with the message every recipient gets".into(),
        )),
    }
}

fn invalid(field: &'static str, message: String) -> ApiError {
    ApiError::Invalid { field, message }
}

fn shared_channel(shared: &RawRequest) -> Option<Channel> {
    shared
        .kind
        .as_ref()
        .and_then(Value::as_str)
        .and_then(Channel::parse)
}

/// The bulk request spends one token of the key's rate, whatever its size; its recipients
/// count against the quotas and caps one by one.
async fn take_token(state: &AppState, caller: &Caller<'_>) -> Result<(), ApiError> {
    match state.limiter.take_token(caller).await {
        Verdict::RateLimited(wait) => Err(AuthError::RateLimited(wait).into()),
        _ => Ok(()),
    }
}

/// With an `Idempotency-Key`, the same id every time the key is used (a retry answers the
/// batch it made); without, a new one.
fn batch_id(tenant: &str, idempotency_key: Option<&str>) -> String {
    match idempotency_key {
        Some(k) => {
            let digest = Sha256::digest(format!("{tenant}\n{k}").as_bytes());
            actors::domain::to_hex(&digest[..12])
        }
        None => bson::oid::ObjectId::new().to_hex(),
    }
}

/// One recipient's request: the shared one with the recipient's `to`, `variables` (over
/// the shared ones) and `locale`, through the single request's steps.
fn prepare(
    state: &AppState,
    policy: &TenantPolicy,
    shared: &RawRequest,
    named: Option<&Named>,
    recipient: &Value,
    idempotency_key: Option<String>,
) -> Result<Submission, ApiError> {
    let mut raw = recipient_request(shared, recipient)?;
    let template = named
        .map(|n| render_with(n, &mut raw, &state.validation))
        .transpose()?;
    let raw = with_default_from(raw, policy)?;
    let request = validate_with(&raw, &state.validation)?;
    check_sender_and_destination(policy, &request)?;
    let fallback = fallback_request(&raw, &request, policy, &state.validation)?;
    let (template, html) = crate::http::templates::Used::into_record(template);
    Ok(Submission {
        id: None,
        request,
        tenant: String::new(),
        idempotency_key,
        fallback,
        fallback_of: None,
        template,
        html,
        batch_id: None,
        send_at: None,
        priority: Priority::Bulk,
    })
}

fn recipient_request(shared: &RawRequest, recipient: &Value) -> Result<RawRequest, ApiError> {
    let Value::Object(r) = recipient else {
        return Err(invalid("to", "a recipient is an object with a to".into()));
    };
    if let Some(k) = r
        .keys()
        .find(|k| !matches!(k.as_str(), "to" | "variables" | "locale"))
    {
        return Err(invalid(
            "recipients",
            format!("unknown recipient field {k:?}: a recipient has to, variables and locale"),
        ));
    }
    let mut raw = shared.clone();
    let Some(Value::Object(data)) = raw.data.as_mut() else {
        return Err(invalid("data", "data must be an object".into()));
    };
    data.insert("to".into(), r.get("to").cloned().unwrap_or(Value::Null));
    if let Some(l) = r.get("locale") {
        data.insert("locale".into(), l.clone());
    }
    match (r.get("variables"), data.get_mut("variables")) {
        (None | Some(Value::Null), _) => {}
        (Some(Value::Object(own)), Some(Value::Object(common))) => {
            common.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        (Some(own), _) => {
            data.insert("variables".into(), own.clone());
        }
    }
    Ok(raw)
}

/// Each ready recipient counted against the tenant's quota and caps (a few Redis round
/// trips at once); a refused one is refused in its place, unless its record was stored by
/// an earlier try of the same send.
async fn check_recipient_limits(
    state: &AppState,
    caller: &Caller<'_>,
    places: &mut [Place],
    deadline: Instant,
) -> Result<(), ApiError> {
    let mut asks = Vec::new();
    for (i, p) in places.iter().enumerate() {
        if let Place::Ready(s) = p {
            asks.push((i, s.request.channel, s.request.to.clone()));
        }
    }
    let verdicts: Vec<(usize, Verdict, Channel)> = futures::stream::iter(asks)
        .map(|(i, channel, to)| async move {
            let v = state.limiter.admit_recipient(caller, channel, &to).await;
            (i, v, channel)
        })
        .buffer_unordered(LIMIT_CHECKS_AT_ONCE)
        .collect()
        .await;
    for (i, verdict, channel) in verdicts {
        let Some(refused) = refusal(verdict, channel)? else {
            continue;
        };
        let Place::Ready(s) = &places[i] else {
            continue;
        };
        let key = s.idempotency_key.as_deref();
        if !is_replay(state, caller.tenant, key, deadline).await? {
            places[i] = Place::Refused(refused);
        }
    }
    Ok(())
}

/// Gives every ready recipient its record's id and lists the ids in the batch's document
/// (`src/clients/batches.rs`) before anything is stored, so every stored record is listed.
async fn list_members(
    state: &AppState,
    tenant: &str,
    batch_id: &str,
    places: &mut [Place],
    deadline: Instant,
) -> Result<(), ApiError> {
    let mut ids = Vec::new();
    for p in places.iter_mut() {
        if let Place::Ready(s) = p {
            let id = bson::oid::ObjectId::new().to_hex();
            ids.push(id.clone());
            s.id = Some(id);
        }
    }
    match tokio::time::timeout_at(deadline, state.store.list_batch(tenant, batch_id, &ids)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "bulk send's members not listed; nothing stored");
            Err(ApiError::NothingStored)
        }
        Err(_) => {
            tracing::warn!("bulk send's members not listed by the deadline; nothing stored");
            Err(ApiError::NothingStored)
        }
    }
}

/// Every ready recipient to the router at once; each answered in its place.
async fn store(state: &AppState, places: &mut [Place], deadline: Instant) -> Result<(), ApiError> {
    let mut at = Vec::new();
    let mut submissions = Vec::new();
    for (i, p) in places.iter_mut().enumerate() {
        if matches!(p, Place::Ready(_)) {
            if let Place::Ready(s) = std::mem::replace(p, Place::Refused(ApiError::NothingStored)) {
                at.push(i);
                submissions.push(*s);
            }
        }
    }
    let answers = state
        .admission
        .accept_many(submissions, deadline)
        .await
        .map_err(|e| accept_error(actors::call::CallError::Refused(e)))?;
    for (i, answer) in at.into_iter().zip(answers) {
        places[i] = match answer {
            Ok(a) => Place::Done(Box::new(a)),
            Err(e) => Place::Refused(accept_error(e)),
        };
    }
    Ok(())
}

fn render(
    batch_id: &str,
    channel: Option<Channel>,
    recipients: &[Value],
    places: Vec<Place>,
) -> Response {
    let (mut accepted, mut replayed) = (0, 0);
    let results: Vec<Value> = places
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let to = recipients[i].get("to").cloned().unwrap_or(Value::Null);
            match p {
                Place::Done(a) => {
                    accepted += 1;
                    replayed += usize::from(a.replayed);
                    let status = if a.record.send_at.is_some() {
                        "scheduled"
                    } else {
                        "queued"
                    };
                    json!({"index": i, "to": to, "status": status, "id": a.record.id})
                }
                Place::Refused(e) => {
                    let mut v = e.body();
                    v["index"] = json!(i);
                    v["to"] = to;
                    v["status"] = json!(e.status().as_u16());
                    v
                }
                Place::Ready(_) => unreachable!("every ready recipient is stored or refused"),
            }
        })
        .collect();
    let body = json!({
        "batchId": batch_id,
        "type": channel.map(Channel::as_str),
        "accepted": accepted,
        "refused": results.len() - accepted,
        "results": results,
    });
    let mut r = warp::reply::json(&body).into_response();
    if accepted > 0 && replayed == accepted {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

async fn get_batch(
    batch_id: String,
    who: Result<Identity, AuthError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    if !is_hex_id(&batch_id) {
        return Err(ApiError::InvalidBatchId);
    }
    let counts = state
        .store
        .batch_counts(&who.tenant, &batch_id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "batch lookup failed");
            ApiError::StoreUnavailable
        })?;
    if counts.is_empty() {
        return Err(ApiError::NoBatch(batch_id));
    }
    let total: u64 = counts.values().sum();
    Ok(
        warp::reply::json(&json!({"batchId": batch_id, "total": total, "counts": counts}))
            .into_response(),
    )
}
