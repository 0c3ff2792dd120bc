//! The HTTP edge (warp): the API, the provider callbacks, and the routes for operators.
//! Every error is an [`ApiError`], with the shape `{"error":{"code":"...","message":"..."}}`;
//! driver messages never reach clients.
//!
//! # Layout
//! - `routes.rs`: the route table, written once; the filters, the metric labels and the
//!   `Allow` of a 405 come from it.
//! - `errors.rs`: [`ApiError`], its status, code, message and headers.
//! - `state.rs`: [`AppState`], what the handlers share, and the filters that hand it and
//!   the caller's identity to them.
//! - `body.rs`: the request body, bounded.
//! - `communications.rs`: accept a communication, read one back.
//! - `bulk.rs`: one message to many recipients; a bulk send's counts.
//! - `search.rs`: search the communications.
//! - `events.rs`: the live status stream, SSE and WebSocket (`crate::events` serves it).
//! - `timeline.rs`: one message's events, from the log index.
//! - `dead_letters.rs`: the records failed for good, listed and replayed.
//! - `console.rs` (and `console/`): the web console, static files built into the binary.
//! - `callbacks/`: the providers' delivery receipts, a file per provider.
//! - `templates.rs`: a tenant's message templates, and rendering a request from one.
//! - `view.rs`: what a tenant sees of a record, an allow-list of fields.
//! - `operations.rs`: health, readiness, metrics, the OpenAPI document, provider health.
//!
//! This file assembles the routes and wraps them in what every request gets: an
//! `x-request-id`, a tracing span (a child of the caller's `traceparent`, when traces are
//! exported), and the request metrics.

mod body;
mod bulk;
pub mod callbacks;
mod communications;
mod console;
mod dead_letters;
pub mod errors;
mod events;
mod operations;
pub mod routes;
mod search;
mod state;
pub mod suppressions;
pub mod templates;
mod timeline;
mod view;

pub use body::BODY_LIMIT;
pub use errors::ApiError;
pub use events::EventsConfig;
pub use operations::OPENAPI;
pub use routes::{allowed_methods, ROUTES};
pub use state::AppState;

use crate::auth::ApiKeys;
use actors::audit::{key_digest, AuditEvent};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Mutex, OnceLock};
use warp::http::header::HeaderValue;
use warp::path::FullPath;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone + Send + Sync + 'static {
    // Tried in this order until one matches, each filter boxed: the two a message makes
    // (its `POST` and its provider's receipt) first, so neither walks the others' filters.
    let api = [
        communications::routes(&state),
        callbacks::routes(state.callbacks.clone()),
        bulk::routes(&state),
        search::routes(&state),
        events::routes(&state),
        dead_letters::routes(&state),
        timeline::routes(&state),
        console::routes(),
        templates::routes(&state),
        suppressions::routes(&state),
        operations::routes(&state),
    ]
    .into_iter()
    .reduce(|a, b| a.or(b).unify().boxed())
    .expect("routes");
    // A rejection is kept to be answered below, where the path (for `Allow`) is known.
    let answer = api
        .map(Ok)
        .recover(|r| async move { Ok::<_, Infallible>(Err(r)) })
        .unify();
    let keys = state.auth.clone();
    caller()
        .and(warp::path::full())
        .and(answer)
        .map(
            move |(id, asker): (String, Asker), path: FullPath, answer| {
                let r = finish(id, path.as_str(), answer);
                audit_refusal(&r, path.as_str(), &asker, &keys);
                r
            },
        )
        .with(warp::trace(|info| {
            let span = tracing::info_span!("http", method = %info.method(), path = %info.path(),
                request_id = tracing::field::Empty);
            // A caller's W3C `traceparent` makes this request's span part of its trace.
            let parent = info.request_headers().get("traceparent");
            actors::trace_context::adopt(&span, parent.and_then(|v| v.to_str().ok()));
            span
        }))
        .with(warp::log::custom(|info| {
            let (count, duration) = request_metrics(info.path(), info.status().as_u16());
            count.increment(1);
            duration.record(info.elapsed().as_secs_f64());
        }))
}

/// The request counter and duration histogram of a route and status, registered once and
/// kept (every request records both: looking them up in the registry each time cost about
/// as much as routing the request).
fn request_metrics(path: &str, status: u16) -> (metrics::Counter, metrics::Histogram) {
    type Handles = HashMap<(&'static str, u16), (metrics::Counter, metrics::Histogram)>;
    static HANDLES: OnceLock<Mutex<Handles>> = OnceLock::new();
    let route = routes::route_label(path);
    let mut handles = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    handles
        .entry((route, status))
        .or_insert_with(|| {
            let status = status.to_string();
            (
                metrics::counter!("http_requests_total", "route" => route, "status" => status),
                metrics::histogram!("http_request_duration_seconds", "route" => route),
            )
        })
        .clone()
}

/// The client's address, put on each request by the server's accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Who asked, as far as the audit trail needs it.
#[derive(Debug, Clone)]
struct Asker {
    method: warp::http::Method,
    peer: Option<Peer>,
    /// The bearer key presented, if any: only its digest is ever recorded.
    key: Option<String>,
}

/// The caller's `x-request-id` (or a new one, also put on the request's span, so a
/// client's report finds its log lines) and who asked, from one look at the headers.
fn caller() -> impl Filter<Extract = ((String, Asker),), Error = Infallible> + Clone {
    warp::method()
        .and(warp::ext::optional::<Peer>())
        .and(header_text("x-request-id"))
        .and(header_text("authorization"))
        .map(|method, peer, id: Option<String>, auth: Option<String>| {
            let id = id
                .filter(|v| {
                    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
                })
                .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
            tracing::Span::current().record("request_id", id.as_str());
            let key = auth
                .as_deref()
                .and_then(|v| v.trim().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, key)| key.trim().to_string());
            (id, Asker { method, peer, key })
        })
}

/// A header's value as text, or `None` when it is absent or not visible ASCII; it never
/// rejects (the header map itself is not cloned, as `headers_cloned` would).
fn header_text(
    name: &'static str,
) -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::optional::<String>(name)
        .or(warp::any().map(|| None))
        .unify()
}

/// A refusal that is a security event (see [`errors::AuditNote`]) goes to the audit trail,
/// with the caller's address, its key's digest and, where the key is valid, its tenant.
fn audit_refusal(r: &Response, path: &str, asker: &Asker, keys: &ApiKeys) {
    let Some(note) = r.extensions().get::<errors::AuditNote>() else {
        return;
    };
    let mut event = AuditEvent::new(
        note.kind,
        serde_json::json!({"code": note.code, "status": r.status().as_u16()}),
    );
    event.route = Some(format!("{} {}", asker.method, routes::route_label(path)));
    event.source = asker.peer.map(|p| p.0.to_string());
    event.key_digest = asker.key.as_deref().map(key_digest);
    event.tenant = keys.tenant_of(asker.key.as_deref());
    actors::audit::record(event);
}

/// The answer, or the rejection rendered, carrying the request id.
fn finish(id: String, path: &str, answer: Result<Response, Rejection>) -> Response {
    let mut r = answer.unwrap_or_else(|rejection| {
        ApiError::from_rejection(&rejection, || allowed_methods(path)).into_response()
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}
