//! `/api/v1/suppressions`: a tenant's opt-out list. `GET` lists it (`?type=` one channel,
//! `?limit=` at most 1,000, default 100), `POST {type, address, reason?}` adds one (201; 200
//! if it was there), `DELETE ?type=&address=` removes one (204; 404 if there was none).
//! Addresses are normalised as the sender looks them up (email lowercased, phone E.164).

use crate::auth::{AuthError, Identity};
use crate::clients::suppressions::Suppression;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, ADD_SUPPRESSION, LIST_SUPPRESSIONS, REMOVE_SUPPRESSION};
use crate::http::state::{authenticated, authenticated_read, with_state, AppState};
use crate::http::templates::json_body;
use actors::domain::{suppression_address, Channel};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let list = at(LIST_SUPPRESSIONS)
        .and(authenticated_read(state))
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state(state))
        .then(list)
        .map(respond);
    let add = at(ADD_SUPPRESSION)
        .and(authenticated(state))
        .and(json_body())
        .and(with_state(state))
        .then(add)
        .map(respond);
    let remove = at(REMOVE_SUPPRESSION)
        .and(authenticated(state))
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state(state))
        .then(remove)
        .map(respond);
    list.or(add)
        .unify()
        .or(remove)
        .unify()
        .or(crate::http::callbacks::twilio_inbound::routes(state))
        .unify()
        .boxed()
}

fn unavailable(e: actors::ports::DependencyError) -> ApiError {
    tracing::warn!(error = %e, "suppressions unavailable");
    ApiError::StoreUnavailable
}

fn shown(s: &Suppression) -> Value {
    json!({
        "type": s.channel.as_str(), "address": s.address, "reason": s.reason,
        "source": s.source,
        "createdAt": s.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

fn channel(v: Option<&str>) -> Result<Channel, ApiError> {
    v.and_then(Channel::parse).ok_or(ApiError::Invalid {
        field: "type",
        message: "type must be one of email, sms, whatsapp".into(),
    })
}

/// The channel and normalised address a request names.
pub fn target(kind: Option<&str>, address: Option<&str>) -> Result<(Channel, String), ApiError> {
    let c = channel(kind)?;
    let a = address
        .and_then(|a| suppression_address(c, a))
        .ok_or_else(|| ApiError::Invalid {
            field: "address",
            message: match c {
                Channel::Email => "address must be an email address".into(),
                _ => "address must be an E.164 number: '+' then up to 15 digits".into(),
            },
        })?;
    Ok((c, a))
}

async fn list(
    who: Result<Identity, AuthError>,
    q: HashMap<String, String>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let c = q.get("type").map(|t| channel(Some(t))).transpose()?;
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or(ApiError::Invalid {
                field: "limit",
                message: format!("limit must be a whole number from 1 to {MAX_LIMIT}"),
            })?,
    };
    let all = state
        .suppressions
        .list(&who.tenant, c, limit)
        .await
        .map_err(unavailable)?;
    let items: Vec<Value> = all.iter().map(shown).collect();
    Ok(warp::reply::json(&json!({"suppressions": items})).into_response())
}

async fn add(
    who: Result<Identity, AuthError>,
    body: Result<Value, ApiError>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let body = body?;
    if !body.is_object() {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    }
    let (c, a) = target(body["type"].as_str(), body["address"].as_str())?;
    let reason = match &body["reason"] {
        Value::Null => None,
        Value::String(r) if r.chars().count() <= 200 => Some(r.as_str()),
        _ => {
            return Err(ApiError::Invalid {
                field: "reason",
                message: "reason must be a string of at most 200 characters".into(),
            })
        }
    };
    let store = &state.suppressions;
    let created = store
        .add(&who.tenant, c, &a, reason, "api")
        .await
        .map_err(unavailable)?;
    let s = store
        .get(&who.tenant, c, &a)
        .await
        .map_err(unavailable)?
        .ok_or(ApiError::StoreUnavailable)?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(warp::reply::with_status(warp::reply::json(&shown(&s)), code).into_response())
}

async fn remove(
    who: Result<Identity, AuthError>,
    q: HashMap<String, String>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let who = who?;
    let (c, a) = target(
        q.get("type").map(String::as_str),
        q.get("address").map(String::as_str),
    )?;
    match state
        .suppressions
        .remove(&who.tenant, c, &a)
        .await
        .map_err(unavailable)?
    {
        true => Ok(StatusCode::NO_CONTENT.into_response()),
        false => Err(ApiError::NoSuppression),
    }
}
