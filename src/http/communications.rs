//! `POST /api/v1/communication` (accept a message, now or at its `sendAt`),
//! `GET /api/v1/communication/{id}` (one record, from MongoDB, the source of truth) and
//! `DELETE /api/v1/communication/{id}` (cancel it while no sender has started on it).
//!
//! Accepting goes in named steps: authenticate → refuse during shutdown → read the JSON
//! body → render `data.template`, if named → the tenant's default `from` where it is left
//! out → validate (and read `sendAt`) → the tenant's
//! senders and destination countries (403) → check the `Idempotency-Key` → the tenant's
//! limits in Redis (rate, daily quota, distinct recipients, per-recipient cap: one round
//! trip) → wait for MongoDB's indexes (they exist a moment after start-up) → hand to the
//! router (answered once MongoDB has the record) → render. The waits after arrival share
//! one deadline. Every refusal comes before the router: a refused request is stored
//! nowhere and sent nowhere.

use crate::auth::{AuthError, Identity};
use crate::clients::indexes::IndexState;
use crate::clients::mongo::MongoStore;
use crate::clients::scheduled::Cancel;
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{
    at, at_with_param, CANCEL_COMMUNICATION, CREATE_COMMUNICATION, GET_COMMUNICATION,
};
use crate::http::state::{authenticated, authenticated_read, with_state, AppState};
use crate::limits::{Caller, Verdict};
use crate::tenants::TenantPolicy;
use actors::call::CallError;
use actors::domain::{
    fallback_field, fallback_of, priority_of, send_at_of, validate_with, Channel, EventStatus,
    Fallback, LogEvent, NewCommunication, Priority, RawRequest, Status, ValidationLimits,
    LOG_STREAM,
};
use actors::router::{AcceptError, Accepted, Submission};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
        .and(authenticated_read(state))
        .and(with_state(state))
        .then(get)
        .map(respond);
    let cancel_one = at_with_param(CANCEL_COMMUNICATION)
        .and(authenticated_read(state))
        .and(with_state(state))
        .then(cancel)
        .map(respond);
    create.or(get_one).unify().or(cancel_one).unify().boxed()
}

async fn create(
    who: Result<Identity, AuthError>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: bytes::Bytes,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let deadline = state.admission.deadline_from(Instant::now());
    let who = sending_caller(who, content_type.as_deref(), &state)?;
    let policy = state.tenants.policy(&who.tenant);
    let mut raw = parse_body(&body)?;
    let template = super::templates::render_request(&state, &who.tenant, &mut raw).await?;
    let raw = with_default_from(raw, &policy)?;
    let request = validate_with(&raw, &state.validation)?;
    let send_at = send_at_of(&raw, chrono::Utc::now(), &state.schedule)?;
    let priority = priority_of(&raw, Priority::Normal)?;
    check_sender_and_destination(&policy, &request)?;
    let fallback = fallback_request(&raw, &request, &policy, &state.validation)?;
    if let Some(key) = &idempotency_key {
        check_idempotency_key(key)?;
    }
    let key = idempotency_key.as_deref();
    let caller = Caller {
        tenant: &who.tenant,
        key_id: &who.key_id,
        policy: &policy,
    };
    check_limits(&state, &caller, &request, key, deadline).await?;
    indexes_in_place(&state, deadline).await?;
    let (template, html) = super::templates::Used::into_record(template);
    let submission = Submission {
        id: None,
        request,
        tenant: who.tenant,
        idempotency_key,
        fallback,
        fallback_of: None,
        template,
        html,
        batch_id: None,
        send_at,
        priority,
    };
    let accepted = state
        .admission
        .accept(submission, deadline)
        .await
        .map_err(accept_error)?;
    Ok(render_accepted(accepted))
}

/// The caller of a request that sends: known, while the service takes new messages, with
/// a JSON body.
pub(super) fn sending_caller(
    who: Result<Identity, AuthError>,
    content_type: Option<&str>,
    state: &AppState,
) -> Result<Identity, ApiError> {
    let who = who?;
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::ShuttingDown);
    }
    require_json(content_type)?;
    Ok(who)
}

/// Nothing is stored before the unique `Idempotency-Key` index exists: a request that
/// comes in the first moments after start-up waits for it, within its deadline.
pub(super) async fn indexes_in_place(state: &AppState, deadline: Instant) -> Result<(), ApiError> {
    match state.indexes.wait_until(deadline).await {
        Ok(()) => Ok(()),
        Err(IndexState::Failed(_)) => Err(ApiError::IndexesFailed),
        Err(_) => Err(ApiError::IndexesBuilding),
    }
}

/// 24 hexadecimal digits: the form of our ids (MongoDB ObjectIds).
pub(super) fn is_hex_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `application/json` or any `+json` type, parameters aside.
pub(super) fn require_json(content_type: Option<&str>) -> Result<(), ApiError> {
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

pub(super) fn parse_body(body: &[u8]) -> Result<RawRequest, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(object @ Value::Object(_)) => serde_json::from_value(object)
            .map_err(|e| ApiError::InvalidJson(format!("malformed request: {e}"))),
        Ok(_) => Err(ApiError::InvalidJson(
            "the body must be a JSON object with type and data".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(format!("malformed JSON: {e}"))),
    }
}

pub(super) fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ApiError::Invalid {
            field: "Idempotency-Key",
            message: "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        });
    }
    Ok(())
}

/// A request that leaves `data.from` out is sent as the tenant's default sender of the
/// channel; without one, `from` is required.
pub(super) fn with_default_from(
    mut raw: RawRequest,
    policy: &TenantPolicy,
) -> Result<RawRequest, ApiError> {
    let channel = raw
        .kind
        .as_ref()
        .and_then(Value::as_str)
        .and_then(Channel::parse);
    let (Some(channel), Some(Value::Object(data))) = (channel, raw.data.as_mut()) else {
        return Ok(raw);
    };
    if !data.get("from").is_none_or(Value::is_null) {
        return Ok(raw);
    }
    match policy.default_from(channel) {
        Some(from) => {
            data.insert("from".into(), json!(from));
            Ok(raw)
        }
        None => Err(ApiError::Invalid {
            field: "from",
            message: format!("data.from is required: this tenant has no default {channel} sender"),
        }),
    }
}

/// The request's `fallback`, validated as a message of its own (what it leaves out taken
/// from the first message, its `from` from the tenant's default sender of its channel) and
/// held to the tenant's senders and countries like the first. Its errors name
/// `fallback.*` fields.
pub(super) fn fallback_request(
    raw: &RawRequest,
    first: &NewCommunication,
    policy: &TenantPolicy,
    limits: &ValidationLimits,
) -> Result<Option<Fallback>, ApiError> {
    let Some(f) = fallback_of(raw, first, limits.fallback_max_after_secs)? else {
        return Ok(None);
    };
    let raw = with_default_from(f.request, policy).map_err(|e| match e {
        ApiError::Invalid { message, .. } => ApiError::Invalid {
            field: "fallback.data.from",
            message: format!("fallback.{message}"),
        },
        other => other,
    })?;
    let request = validate_with(&raw, limits).map_err(|e| ApiError::Invalid {
        field: fallback_field(e.field),
        message: format!("fallback: {}", e.message),
    })?;
    check_sender_and_destination(policy, &request)?;
    Ok(Some(Fallback {
        after_secs: f.after_secs,
        request,
    }))
}

/// A `from` the tenant does not own, or a destination outside its countries, is a 403.
pub(super) fn check_sender_and_destination(
    policy: &TenantPolicy,
    request: &NewCommunication,
) -> Result<(), ApiError> {
    let channel = request.channel;
    if !policy.may_send_as(channel, &request.from) {
        metrics::counter!("tenant_refusals_total", "reason" => "sender", "channel" => channel.as_str())
            .increment(1);
        return Err(ApiError::SenderNotAllowed { channel });
    }
    if !policy.may_send_to(channel, &request.to) {
        metrics::counter!("tenant_refusals_total", "reason" => "destination", "channel" => channel.as_str())
            .increment(1);
        return Err(ApiError::DestinationNotAllowed { channel });
    }
    Ok(())
}

/// The tenant's limits, in one round trip to Redis. Over a quota or a cap is a 429,
/// unless this is a retry of a request already accepted: that one is answered as before
/// (looking that up waits for MongoDB until the deadline at most). An empty bucket is a
/// 429 for retries too, as it always was.
async fn check_limits(
    state: &AppState,
    caller: &Caller<'_>,
    request: &NewCommunication,
    idempotency_key: Option<&str>,
    deadline: Instant,
) -> Result<(), ApiError> {
    let verdict = state
        .limiter
        .admit(caller, request.channel, &request.to)
        .await;
    let Some(refusal) = refusal(verdict, request.channel)? else {
        return Ok(());
    };
    if is_replay(state, caller.tenant, idempotency_key, deadline).await? {
        return Ok(());
    }
    Err(refusal)
}

/// What the limits' verdict means for a request: let through (`None`), refused at once
/// (`Err`: the limits could not be asked, or the key's bucket is empty), or a refusal
/// that a retry of a request already accepted is spared (`Some`).
pub(super) fn refusal(verdict: Verdict, channel: Channel) -> Result<Option<ApiError>, ApiError> {
    Ok(Some(match verdict {
        Verdict::Allowed | Verdict::Unchecked => return Ok(None),
        Verdict::Unavailable => return Err(ApiError::LimiterUnavailable),
        Verdict::RateLimited(wait) => return Err(AuthError::RateLimited(wait).into()),
        Verdict::QuotaExceeded {
            max,
            reset_at,
            retry_after_secs,
        } => ApiError::QuotaExceeded {
            channel,
            max,
            reset_at,
            retry_after_secs,
        },
        Verdict::TooManyRecipients {
            max,
            retry_after_secs,
        } => ApiError::TooManyRecipients {
            max,
            retry_after_secs,
        },
        Verdict::RecipientLimit {
            max,
            retry_after_secs,
        } => ApiError::RecipientLimit {
            max,
            channel,
            retry_after_secs,
        },
    }))
}

/// Whether `idempotency_key` already holds an accepted request of this tenant.
pub(super) async fn is_replay(
    state: &AppState,
    tenant: &str,
    idempotency_key: Option<&str>,
    deadline: Instant,
) -> Result<bool, ApiError> {
    let Some(k) = idempotency_key else {
        return Ok(false);
    };
    let holder = state.store.idempotency_holder(tenant, k);
    match tokio::time::timeout_at(deadline, holder).await {
        Ok(found) => Ok(matches!(found, Ok(Some(_)))),
        Err(_) => Err(ApiError::NotProcessedInTime),
    }
}

pub(super) fn accept_error(e: CallError<AcceptError>) -> ApiError {
    match e {
        CallError::Refused(AcceptError::KeyConflict(k)) => ApiError::KeyReused(k),
        CallError::Refused(AcceptError::Unavailable(e)) => {
            tracing::warn!(error = %e, "request not stored");
            ApiError::NothingStored
        }
        CallError::Refused(AcceptError::QueueFull) => ApiError::AcceptQueueFull,
        CallError::NotRunning(_) | CallError::Refused(AcceptError::Restarting) => {
            ApiError::RouterRestarting
        }
        // The router dropped the request, or voids its record: nothing is stored.
        CallError::TimedOut(_) | CallError::Stopped(_) => ApiError::NotProcessedInTime,
    }
}

fn render_accepted(Accepted { record, replayed }: Accepted) -> Response {
    let mut data = json!({"from": record.from, "to": record.to, "msg": record.msg});
    if let Some(s) = &record.subject {
        data["subject"] = json!(s);
    }
    let status = match record.status {
        Status::Scheduled => "scheduled",
        _ => "queued",
    };
    let mut body = json!({
        "status": status,
        "stream": record.channel.stream(),
        "id": record.id,
        "data": data,
        "priority": record.priority.as_str(),
    });
    if let Some(at) = record.send_at {
        body["sendAt"] = json!(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
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
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    check_id(&id)?;
    match state.store.get_doc(&id, &who.tenant).await {
        Ok(Some(d)) => Ok(shown(&d)),
        Ok(None) => Err(ApiError::NoCommunication(id)),
        Err(e) => {
            tracing::warn!(error = %e, "lookup failed");
            Err(ApiError::StoreUnavailable)
        }
    }
}

/// A 24-hex-digit id, or 400.
fn check_id(id: &str) -> Result<(), ApiError> {
    if !is_hex_id(id) {
        return Err(ApiError::InvalidId);
    }
    Ok(())
}

/// Cancel: 200 with the record once it is `canceled` (again, for a second cancel), 409
/// once sending has started, 404 for an unknown id or another tenant's.
async fn cancel(
    id: String,
    who: Result<Identity, AuthError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    check_id(&id)?;
    let doc = match state.scheduled.cancel(&id, &who.tenant).await {
        Ok(Cancel::Canceled(d)) => {
            log_canceled(&state, &d).await;
            d
        }
        Ok(Cancel::AlreadyCanceled(d)) => d,
        Ok(Cancel::TooLate(status)) => return Err(ApiError::NotCancelable(status)),
        Ok(Cancel::NotFound) => return Err(ApiError::NoCommunication(id)),
        Err(e) => {
            tracing::warn!(error = %e, "cancel failed");
            return Err(ApiError::StoreUnavailable);
        }
    };
    Ok(shown(&doc))
}

/// A record as its tenant sees it (the allow-list of `view.rs`).
fn shown(d: &mongodb::bson::Document) -> Response {
    let v = super::view::record(MongoStore::to_api_json(d));
    warp::reply::json(&v).into_response()
}

/// The `canceled` log event; if Redis does not take it, the Reconciler brings search in
/// line with MongoDB within its interval.
async fn log_canceled(state: &AppState, d: &mongodb::bson::Document) {
    let Some(rec) = MongoStore::from_doc(d) else {
        return;
    };
    metrics::counter!("communications_canceled_total", "channel" => rec.channel.as_str())
        .increment(1);
    tracing::info!(id = %rec.id, "communication canceled");
    let ev = LogEvent::for_record(
        &rec,
        "api",
        EventStatus::Canceled,
        rec.attempts,
        rec.updated_at,
    );
    if let Err(e) = state.queue.append(&[(LOG_STREAM, ev.to_fields())]).await {
        tracing::warn!(error = %e, id = %rec.id, "canceled event not logged; the reconciler repairs search");
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
