//! What every handler may read (the clients, the limits and the switches, shared), and
//! the filters that hand it, and the caller's identity, to a handler.

use crate::auth::{ApiKeys, AuthError, Identity};
use crate::clients::elastic::ElasticSink;
use crate::clients::indexes::IndexReadiness;
use crate::clients::mongo::MongoStore;
use crate::http::callbacks::CallbackConfig;
use crate::limits::{Caller, Limiter, Verdict};
use crate::tenants::Tenants;
use actors::domain::ValidationLimits;
use actors::ports::Queue;
use actors::router::Admission;
use actors::routing::Routes;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use warp::Filter;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<MongoStore>,
    pub queue: Arc<dyn Queue>,
    pub search: Arc<ElasticSink>,
    pub prometheus: PrometheusHandle,
    /// Set once shutdown begins: new communications are refused and readiness fails, so
    /// load balancers move on while in-flight work finishes.
    pub shutting_down: Arc<AtomicBool>,
    /// Whether MongoDB's indexes exist: until then no communication is accepted (the
    /// unique index is what makes an `Idempotency-Key` hold) and readiness fails.
    pub indexes: IndexReadiness,
    /// The bounded way into the router, with the accept deadline.
    pub admission: Admission,
    pub routes: Vec<Arc<Routes>>,
    pub callbacks: Arc<CallbackConfig>,
    pub communications_index: String,
    /// The index of every event (`communication-logs`): the timelines.
    pub logs_index: String,
    pub auth: Arc<ApiKeys>,
    /// The tenants' limits in Redis: rate, quotas, distinct recipients, per-recipient cap.
    pub limiter: Arc<Limiter>,
    /// Each tenant's senders, countries and limits.
    pub tenants: Arc<Tenants>,
    pub validation: ValidationLimits,
    /// How far ahead a `sendAt` may be.
    pub schedule: actors::domain::ScheduleLimits,
    /// Cancels (`DELETE /api/v1/communication/{id}`).
    pub scheduled: Arc<crate::clients::scheduled::MongoScheduled>,
    pub dead_letters: Arc<crate::clients::dead_letters::MongoDeadLetters>,
    /// Each channel's stream shards: where a replayed record's entry goes.
    pub shards: actors::shards::StreamShards,
    /// The tenants' message templates (MongoDB's `templates`).
    pub templates: Arc<crate::clients::templates::MongoTemplates>,
    /// The tenants' opt-out lists (MongoDB's `suppressions`).
    pub suppressions: Arc<crate::clients::suppressions::MongoSuppressions>,
    pub metrics_token: Option<secrecy::SecretString>,
    /// The live status stream (`GET /api/v1/events`).
    pub events: Arc<super::events::EventsConfig>,
}

/// The caller's identity (or why there is none), from `Authorization`. Taking it spends a
/// token of the key's bucket, so it comes after the path and method have matched.
pub fn authenticated(
    state: &AppState,
) -> impl Filter<Extract = (Result<Identity, AuthError>,), Error = warp::Rejection> + Clone {
    let auth = state.auth.clone();
    warp::header::optional::<String>("authorization")
        .map(move |h: Option<String>| auth.authenticate(h.as_deref()))
}

/// [`authenticated`], then a token from the key's bucket shared by every process (Redis):
/// for requests that send nothing. A `POST` takes its shared token with the rest of its
/// limits, in one round trip. Should Redis not answer, a read goes through (the
/// per-process bucket above still holds).
pub fn authenticated_read(
    state: &AppState,
) -> impl Filter<Extract = (Result<Identity, AuthError>,), Error = warp::Rejection> + Clone {
    let (tenants, limiter) = (state.tenants.clone(), state.limiter.clone());
    authenticated(state).then(move |who: Result<Identity, AuthError>| {
        let (tenants, limiter) = (tenants.clone(), limiter.clone());
        async move {
            let who = who?;
            let policy = tenants.policy(&who.tenant);
            let caller = Caller {
                tenant: &who.tenant,
                key_id: &who.key_id,
                policy: &policy,
            };
            match limiter.take_token(&caller).await {
                Verdict::RateLimited(wait) => Err(AuthError::RateLimited(wait)),
                _ => Ok(who),
            }
        }
    })
}

/// A clone of the shared state for each request.
pub fn with_state(
    state: &AppState,
) -> impl Filter<Extract = (Arc<AppState>,), Error = std::convert::Infallible> + Clone {
    let s = Arc::new(state.clone());
    warp::any().map(move || s.clone())
}
