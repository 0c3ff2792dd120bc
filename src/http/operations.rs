//! The routes for operators and tools: liveness (`/healthz`), readiness (`/readyz`),
//! Prometheus metrics (`/metrics`), the OpenAPI document, and the providers' health.

use crate::auth::{AuthError, Identity};
use crate::clients::indexes::IndexState;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, HEALTHZ, METRICS, OPENAPI_DOCUMENT, PROVIDERS, READYZ};
use crate::http::state::{authenticated_read, with_state, AppState};
use actors::ports::{DependencyError, SearchSink, Store};
use secrecy::ExposeSecret;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use warp::filters::BoxedFilter;
use warp::http::header::{self, HeaderValue};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

/// The OpenAPI 3 document of every route; `tests/api.rs` holds the two together (every
/// documented operation answers, no other does, and a fuzzer finds every answer in the
/// document).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// How long readiness waits for each dependency.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

pub fn routes(state: &AppState) -> BoxedFilter<(Response,)> {
    let openapi = at(OPENAPI_DOCUMENT)
        .and(authenticated_read(state))
        .map(|who| respond(openapi(who)));
    let providers = at(PROVIDERS)
        .and(authenticated_read(state))
        .and(with_state(state))
        .map(|who, s: Arc<AppState>| respond(providers(who, &s)));
    let metrics = at(METRICS)
        .and(warp::header::optional::<String>("authorization"))
        .and(with_state(state))
        .map(|authz: Option<String>, s: Arc<AppState>| respond(metrics(authz.as_deref(), &s)));
    let healthz = at(HEALTHZ).map(|| warp::reply::json(&json!({"status": "ok"})).into_response());
    let readyz = at(READYZ).and(with_state(state)).then(readiness);
    openapi
        .or(providers)
        .unify()
        .or(metrics)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .boxed()
}

fn with_content_type(body: impl Reply, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn openapi(who: Result<Identity, AuthError>) -> Result<Response, ApiError> {
    who?;
    Ok(with_content_type(OPENAPI, "application/json"))
}

fn providers(who: Result<Identity, AuthError>, state: &AppState) -> Result<Response, ApiError> {
    who?;
    let list: Vec<serde_json::Value> = state.routes.iter().flat_map(|r| r.snapshot()).collect();
    Ok(warp::reply::json(&json!({"providers": list})).into_response())
}

/// The Prometheus text, behind `METRICS_TOKEN` when one is set.
fn metrics(authorization: Option<&str>, state: &AppState) -> Result<Response, ApiError> {
    if let Some(token) = &state.metrics_token {
        let given = authorization.and_then(|h| h.strip_prefix("Bearer "));
        // Digests of both sides, so the comparison takes as long whatever the token.
        let ok = given.is_some_and(|g| {
            use sha2::Digest;
            sha2::Sha256::digest(g.as_bytes())
                == sha2::Sha256::digest(token.expose_secret().as_bytes())
        });
        if !ok {
            return Err(ApiError::MetricsToken);
        }
    }
    Ok(with_content_type(
        state.prometheus.render(),
        "text/plain; version=0.0.4",
    ))
}

/// Ready when MongoDB, Redis and Elasticsearch answer, MongoDB's indexes exist (so an
/// `Idempotency-Key` holds from the first request) and shutdown has not begun; a failed
/// index build is named in `indexError`.
async fn readiness(state: Arc<AppState>) -> Response {
    let t = READINESS_TIMEOUT;
    let (m, r, e) = tokio::join!(
        tokio::time::timeout(t, state.store.ping()),
        tokio::time::timeout(t, state.queue.ping()),
        tokio::time::timeout(t, state.search.ping()),
    );
    let ok = |x: Result<Result<(), DependencyError>, _>| matches!(x, Ok(Ok(())));
    let (m, r, e) = (ok(m), ok(r), ok(e));
    let index_state = state.indexes.state();
    let i = index_state == IndexState::Ready;
    let checks = json!({"mongodb": m, "redis": r, "elasticsearch": e, "indexes": i});
    let shutting = state.shutting_down.load(Ordering::Relaxed);
    let ready = m && r && e && i && !shutting;
    let mut body = json!({"ready": ready, "checks": checks, "shuttingDown": shutting});
    if let IndexState::Failed(why) = index_state {
        body["indexError"] = json!(why);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}
