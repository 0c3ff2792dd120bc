//! The HTTP edge (warp): the API, health, readiness and `/metrics`. Every error has the
//! shape `{"error":{"code":"...","message":"..."}}`; driver messages never reach clients.

use crate::auth::{ApiKeys, AuthError, Identity};
use crate::clients::mongo::MongoStore;
use crate::limits::{CapDecision, RecipientCap};
use actors::domain::{validate_with, RawRequest, ValidationLimits};
use actors::ports::{Queue, SearchSink, Store};
use actors::ractor::ActorRef;
use actors::router::{self, AcceptError, Accepted, RouterMsg, Submission};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use warp::http::{header, StatusCode};
use warp::reply::{Reply, Response};
use warp::Filter;

/// Largest request body accepted.
pub const BODY_LIMIT: u64 = 64 * 1024;

/// The OpenAPI 3 document of every route below; `tests/openapi.rs` holds the two together
/// (every documented operation answers, no other does, and a fuzzer finds every answer
/// in the document).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route: method and path template, as in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/communication"),
    ("GET", "/api/v1/communication/{id}"),
    ("GET", "/api/v1/communications"),
    ("GET", "/api/v1/providers"),
    ("GET", "/api/v1/openapi.json"),
    ("POST", "/api/v1/callbacks/twilio"),
    ("GET", "/api/v1/callbacks/whatsapp"),
    ("POST", "/api/v1/callbacks/whatsapp"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<MongoStore>,
    pub queue: Arc<dyn Queue>,
    pub search: Arc<crate::clients::elastic::ElasticSink>,
    pub prometheus: PrometheusHandle,
    pub shutting_down: Arc<AtomicBool>,
    pub health: Vec<Arc<actors::health::ProviderHealth>>,
    pub callbacks: Arc<crate::callbacks::CallbackConfig>,
    pub communications_index: String,
    pub auth: Arc<ApiKeys>,
    pub cap: Arc<RecipientCap>,
    pub validation: ValidationLimits,
    pub metrics_token: Option<String>,
}

pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"code": code, "message": message.into()}});
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn unavailable(code: &str, message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

fn unauthorized(e: AuthError) -> Response {
    match e {
        AuthError::RateLimited(wait) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this API key; retry after the Retry-After seconds",
            );
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
            r
        }
        AuthError::Missing | AuthError::Invalid => {
            let message = if e == AuthError::Missing {
                "an API key is required: Authorization: Bearer <key>"
            } else {
                "the API key is not valid"
            };
            let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

/// A body larger than [`BODY_LIMIT`].
#[derive(Debug)]
struct TooLarge;
impl warp::reject::Reject for TooLarge {}

/// The request body, up to [`BODY_LIMIT`] bytes, with or without a `content-length`
/// (a declared length over the limit is refused before anything is read).
fn limited_body() -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|len: Option<u64>| async move {
            match len {
                Some(n) if n > BODY_LIMIT => Err(warp::reject::custom(TooLarge)),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(collect_body)
}

async fn collect_body<S, B>(body: S) -> Result<bytes::Bytes, warp::Rejection>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use bytes::BufMut;
    use futures::StreamExt;
    let mut body = std::pin::pin!(body);
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| warp::reject::custom(Unreadable))?;
        if out.len() + chunk.remaining() > BODY_LIMIT as usize {
            return Err(warp::reject::custom(TooLarge));
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            let n = c.len();
            out.put_slice(c);
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

/// The body could not be read (the client went away mid-request).
#[derive(Debug)]
struct Unreadable;
impl warp::reject::Reject for Unreadable {}

/// The methods a path answers, from [`ROUTES`] (for `Allow` on a 405).
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTES
        .iter()
        .filter(|(_, template)| {
            let t: Vec<&str> = template.split('/').collect();
            t.len() == segs.len()
                && t.iter()
                    .zip(&segs)
                    .all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
        })
        .map(|(m, _)| *m)
        .collect()
}

/// The caller's identity (or why there is none), from `Authorization`.
fn authenticated(
    state: &AppState,
) -> impl Filter<Extract = (Result<Identity, AuthError>,), Error = warp::Rejection> + Clone {
    let auth = state.auth.clone();
    warp::header::optional::<String>("authorization")
        .map(move |h: Option<String>| auth.authenticate(h.as_deref()))
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/api/v1/openapi.json" => "/api/v1/openapi.json",
        "/api/v1/communication" => "/api/v1/communication",
        p if p.starts_with("/api/v1/communication/") => "/api/v1/communication/{id}",
        "/api/v1/providers" => "/api/v1/providers",
        "/api/v1/communications" => "/api/v1/communications",
        "/api/v1/callbacks/twilio" => "/api/v1/callbacks/twilio",
        "/api/v1/callbacks/whatsapp" => "/api/v1/callbacks/whatsapp",
        "/metrics" => "/metrics",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        _ => "other",
    }
}

pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (impl Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let with_state = {
        let s = state.clone();
        warp::any().map(move || s.clone())
    };

    let create = warp::path!("api" / "v1" / "communication")
        .and(warp::post())
        .and(authenticated(&state))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(limited_body())
        .and(with_state.clone())
        .then(create_communication);

    let get_one = warp::path!("api" / "v1" / "communication" / String)
        .and(warp::get())
        .and(authenticated(&state))
        .and(with_state.clone())
        .then(get_communication);

    let openapi = warp::path!("api" / "v1" / "openapi.json")
        .and(warp::get())
        .and(authenticated(&state))
        .map(|who: Result<Identity, AuthError>| match who {
            Ok(_) => {
                let mut r = OPENAPI.into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => unauthorized(e),
        });

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .and(with_state.clone())
        .map(|authz: Option<String>, s: AppState| {
            if let Some(token) = &s.metrics_token {
                let given = authz.as_deref().and_then(|h| h.strip_prefix("Bearer "));
                let ok = given.is_some_and(|g| {
                    use sha2::Digest;
                    sha2::Sha256::digest(g.as_bytes()) == sha2::Sha256::digest(token.as_bytes())
                });
                if !ok {
                    let mut r = error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "/metrics wants Authorization: Bearer <METRICS_TOKEN>",
                    );
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer"),
                    );
                    return r;
                }
            }
            let mut r = s.prometheus.render().into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        });

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response());

    let providers = warp::path!("api" / "v1" / "providers")
        .and(warp::get())
        .and(authenticated(&state))
        .and(with_state.clone())
        .map(|who: Result<Identity, AuthError>, s: AppState| {
            if let Err(e) = who {
                return unauthorized(e);
            }
            let list: Vec<serde_json::Value> = s.health.iter().map(|h| h.snapshot()).collect();
            warp::reply::json(&json!({"providers": list})).into_response()
        });

    let twilio_cb = warp::path!("api" / "v1" / "callbacks" / "twilio")
        .and(warp::post())
        .and(warp::header::optional::<String>("host"))
        .and(warp::path::full())
        .and(warp::header::optional::<String>("x-twilio-signature"))
        .and(limited_body())
        .and(with_state.clone())
        .then(
            |host, path: warp::path::FullPath, sig, body, s: AppState| async move {
                crate::callbacks::twilio(
                    s.callbacks.clone(),
                    host,
                    path.as_str().to_string(),
                    sig,
                    body,
                )
                .await
            },
        );
    let whatsapp_verify = warp::path!("api" / "v1" / "callbacks" / "whatsapp")
        .and(warp::get())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(with_state.clone())
        .map(|q, s: AppState| crate::callbacks::whatsapp_verify(&s.callbacks, &q));
    let whatsapp_cb = warp::path!("api" / "v1" / "callbacks" / "whatsapp")
        .and(warp::post())
        .and(warp::header::optional::<String>("x-hub-signature-256"))
        .and(limited_body())
        .and(with_state.clone())
        .then(|sig, body, s: AppState| async move {
            crate::callbacks::whatsapp(s.callbacks.clone(), sig, body).await
        });

    let search = warp::path!("api" / "v1" / "communications")
        .and(warp::get())
        .and(authenticated(&state))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_state.clone())
        .then(search_communications);

    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .then(readiness);

    let api = create
        .or(get_one)
        .unify()
        .or(openapi)
        .unify()
        .or(providers)
        .unify()
        .or(search)
        .unify()
        .or(twilio_cb)
        .unify()
        .or(whatsapp_verify)
        .unify()
        .or(whatsapp_cb)
        .unify()
        .or(metrics)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .recover(handle_rejection)
        .unify()
        .boxed();
    // Every answer carries `x-request-id` (the caller's, or a new one), which is also on
    // the request's span, so a client's report finds its log lines.
    let request_id = warp::header::headers_cloned().map(|h: warp::http::HeaderMap| {
        let id = h
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
        tracing::Span::current().record("request_id", id.as_str());
        id
    });
    request_id
        .and(warp::path::full())
        .and(api)
        .map(|id: String, path: warp::path::FullPath, reply: Response| {
            let mut r = reply;
            if let Ok(v) = header::HeaderValue::from_str(&id) {
                r.headers_mut().insert("x-request-id", v);
            }
            if r.status() == StatusCode::METHOD_NOT_ALLOWED {
                let allow = allowed_methods(path.as_str()).join(", ");
                if let Ok(v) = header::HeaderValue::from_str(&allow) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
            }
            r
        })
        .with(warp::trace(|info| {
            tracing::info_span!("http", method = %info.method(), path = %info.path(),
                request_id = tracing::field::Empty)
        }))
        .with(warp::log::custom(|info| {
            let route = route_label(info.path());
            let status = info.status().as_u16().to_string();
            metrics::counter!("http_requests_total", "route" => route, "status" => status)
                .increment(1);
            metrics::histogram!("http_request_duration_seconds", "route" => route)
                .record(info.elapsed().as_secs_f64());
        }))
}

async fn create_communication(
    who: Result<Identity, AuthError>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: bytes::Bytes,
    state: AppState,
) -> Response {
    let who = match who {
        Ok(w) => w,
        Err(e) => return unauthorized(e),
    };
    if state.shutting_down.load(Ordering::Relaxed) {
        return unavailable(
            "shutting_down",
            "the service is shutting down; retry on another instance or shortly",
        );
    }
    let is_json = content_type
        .as_deref()
        .map(|ct| {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        })
        .unwrap_or(false);
    if !is_json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON, sent with content-type: application/json",
        );
    }
    let raw: RawRequest = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(map)) => {
            match serde_json::from_value(serde_json::Value::Object(map)) {
                Ok(r) => r,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_json",
                        format!("malformed request: {e}"),
                    )
                }
            }
        }
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the body must be a JSON object with type and data",
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("malformed JSON: {e}"),
            )
        }
    };
    let req = match validate_with(&raw, &state.validation) {
        Ok(r) => r,
        Err(e) => {
            let body = json!({"error": {"code": "validation_failed", "field": e.field, "message": e.message}});
            return warp::reply::with_status(warp::reply::json(&body), StatusCode::BAD_REQUEST)
                .into_response();
        }
    };
    if let Some(k) = &idempotency_key {
        if k.is_empty() || k.len() > 255 || !k.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            let body = json!({"error": {"code": "validation_failed", "field": "Idempotency-Key",
                "message": "Idempotency-Key must be 1 to 255 visible ASCII characters"}});
            return warp::reply::with_status(warp::reply::json(&body), StatusCode::BAD_REQUEST)
                .into_response();
        }
    }
    if let CapDecision::Exceeded { retry_after_secs } =
        state.cap.check(&who.tenant, req.channel, &req.to).await
    {
        // A retry of a request that was already accepted is answered as before.
        let replay = match &idempotency_key {
            Some(k) => matches!(
                state.store.idempotency_holder(&who.tenant, k).await,
                Ok(Some(_))
            ),
            None => false,
        };
        if !replay {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "recipient_limit",
                format!(
                    "data.to has had {} {} messages in this window, the most allowed; retry after the Retry-After seconds",
                    state.cap.max, req.channel
                ),
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(retry_after_secs),
            );
            return r;
        }
    }
    let Some(router) = ActorRef::<RouterMsg>::where_is(router::NAME.to_string()) else {
        return unavailable(
            "unavailable",
            "the router is restarting; nothing was stored, retry shortly",
        );
    };
    let submission = Submission {
        request: req,
        tenant: who.tenant,
        idempotency_key,
    };
    let answer = router
        .call(
            |reply| RouterMsg::Accept(submission, reply),
            Some(Duration::from_secs(15)),
        )
        .await;
    match answer {
        Ok(actors::ractor::rpc::CallResult::Success(Ok(Accepted {
            record: rec,
            replayed,
        }))) => {
            let mut data = json!({"from": rec.from, "to": rec.to, "msg": rec.msg});
            if let Some(s) = &rec.subject {
                data["subject"] = json!(s);
            }
            let body = json!({
                "status": "queued",
                "stream": rec.channel.stream(),
                "id": rec.id,
                "data": data,
            });
            let mut r = warp::reply::json(&body).into_response();
            if replayed {
                r.headers_mut().insert(
                    "idempotent-replayed",
                    header::HeaderValue::from_static("true"),
                );
            }
            r
        }
        Ok(actors::ractor::rpc::CallResult::Success(Err(AcceptError::KeyConflict(k)))) => error(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            format!("Idempotency-Key {k:?} was already used for a different request"),
        ),
        Ok(actors::ractor::rpc::CallResult::Success(Err(AcceptError::Unavailable(e)))) => {
            tracing::warn!(error = %e, "request not stored");
            unavailable(
                "store_unavailable",
                "the message store is unavailable; nothing was stored, retry later",
            )
        }
        _ => unavailable(
            "unavailable",
            "the request could not be processed in time; it may not have been stored, retry later",
        ),
    }
}

async fn search_communications(
    who: Result<Identity, AuthError>,
    raw: String,
    state: AppState,
) -> Response {
    let who = match who {
        Ok(w) => w,
        Err(e) => return unauthorized(e),
    };
    let params: crate::search::SearchParams = match parse_search_params(&raw) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_query", e),
    };
    let (body, page, size) = match crate::search::build_query(&params, &who.tenant) {
        Ok(x) => x,
        Err(crate::search::BadParam(field, message)) => {
            let body =
                json!({"error": {"code": "validation_failed", "field": field, "message": message}});
            return warp::reply::with_status(warp::reply::json(&body), StatusCode::BAD_REQUEST)
                .into_response();
        }
    };
    match crate::search::search(
        state.search.client(),
        &state.communications_index,
        body,
        page,
        size,
    )
    .await
    {
        Ok(v) => warp::reply::json(&v).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "search failed");
            unavailable("search_unavailable", "search is unavailable; GET /api/v1/communication/{id} still answers from the store")
        }
    }
}

/// Query string → parameters, with a message naming what could not be read.
fn parse_search_params(raw: &str) -> Result<crate::search::SearchParams, String> {
    let mut map = serde_json::Map::new();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        let val = match k.as_ref() {
            "page" | "size" => match v.parse::<u32>() {
                Ok(n) => json!(n),
                Err(_) => return Err(format!("{k} must be a positive integer")),
            },
            "q" | "type" | "status" | "to" | "from" | "since" | "until" => json!(v),
            other => return Err(format!("unknown parameter {other:?}")),
        };
        map.insert(k.into_owned(), val);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

async fn get_communication(
    id: String,
    who: Result<Identity, AuthError>,
    state: AppState,
) -> Response {
    let who = match who {
        Ok(w) => w,
        Err(e) => return unauthorized(e),
    };
    if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "a communication id is 24 hexadecimal digits",
        );
    }
    match state.store.get_doc(&id, &who.tenant).await {
        Ok(Some(d)) => warp::reply::json(&MongoStore::to_api_json(&d)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no communication {id}"),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "lookup failed");
            unavailable(
                "store_unavailable",
                "the message store is unavailable, retry later",
            )
        }
    }
}

async fn readiness(state: AppState) -> Response {
    let t = Duration::from_secs(2);
    let (m, r, e) = tokio::join!(
        tokio::time::timeout(t, state.store.ping()),
        tokio::time::timeout(t, state.queue.ping()),
        tokio::time::timeout(t, state.search.ping()),
    );
    let ok = |x: Result<Result<(), actors::ports::DependencyError>, _>| matches!(x, Ok(Ok(())));
    let checks = json!({"mongodb": ok(m), "redis": ok(r), "elasticsearch": ok(e)});
    let all = checks.as_object().unwrap().values().all(|v| v == true);
    let shutting = state.shutting_down.load(Ordering::Relaxed);
    let body = json!({"ready": all && !shutting, "checks": checks, "shuttingDown": shutting});
    let status = if all && !shutting {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

async fn handle_rejection(err: warp::Rejection) -> Result<Response, Infallible> {
    let r = if err.is_not_found() {
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some()
        || err.find::<TooLarge>().is_some()
    {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {BODY_LIMIT} bytes"),
        )
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        error(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "a content-length is required",
        )
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        )
    } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "unsupported content type",
        )
    } else {
        tracing::debug!(?err, "unhandled rejection");
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request could not be read",
        )
    };
    Ok(r)
}
