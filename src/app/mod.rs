//! The wiring: build the clients and providers from configuration, start the actors under
//! one supervisor and the HTTP server in front of them, and stop both in order when
//! `shutdown` resolves. [`run`] is all `main` calls, and what the tests call in-process.

mod children;
mod metric_docs;
pub mod otel;
mod parts;
pub mod server;
mod telemetry;

use actors::audit::{AuditEvent, AuditKind};
use children::{child_specs, consumer_name};
pub use parts::Parts;
pub use telemetry::{install_metrics, MetricsError};

use crate::clients::indexes::{self, IndexReadiness};
use crate::clients::limiter::RedisLimiter;
use crate::clients::mongo::MongoStore;
use crate::clients::redis_checks::{self, RedisCheckError, StartupCheck};
use crate::config::Config;
use crate::providers::smtp::SmtpUrlError;
use crate::tenants::Tenants;
use crate::{auth, callbacks, http, limits};
use actors::backoff::Backoff;
use actors::domain::Channel;
use actors::ports::DependencyError;
use actors::ractor::{Actor, ActorRef, SpawnErr};
use actors::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Why the service could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("REDIS_URL: {0}")]
    Redis(DependencyError),
    #[error(transparent)]
    RedisUnsuitable(RedisCheckError),
    #[error("MONGODB_URL: {0}")]
    MongoDb(DependencyError),
    #[error("ELASTICSEARCH_NODE: {0}")]
    Elasticsearch(DependencyError),
    #[error("http client: {0}")]
    HttpClient(reqwest::Error),
    #[error(transparent)]
    Smtp(#[from] SmtpUrlError),
    #[error("starting the actors: {0}")]
    Actors(SpawnErr),
    #[error("cannot listen on {addr} (HOST/PORT): {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("the supervisor gave up (restart intensity exceeded); see the log")]
    SupervisorGaveUp,
}

/// How long the HTTP server gets to close when the supervisor has given up.
const ESCALATION_STOP: Duration = Duration::from_secs(2);

/// Run the service until `shutdown` resolves (then stop in order within
/// three stages, see [`drain`]) or until the supervisor gives up.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let prometheus = install_metrics()?;
    let parts = Parts::build(&cfg).await?;
    check_redis(&parts).await?;
    let (_index_task, indexes) = spawn_index_creation(&cfg, &parts.store);
    let (supervisor, mut supervisor_done) = start_actors(&cfg, &parts, indexes.clone()).await?;
    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = http_state(&cfg, &parts, prometheus, shutting_down.clone(), indexes);
    log_start(&cfg, &state);
    let server = match HttpServer::start(&cfg, state).await {
        Ok(s) => s,
        Err(e) => {
            supervisor.stop(None);
            return Err(e);
        }
    };
    let escalated = tokio::select! {
        _ = shutdown => false,
        _ = &mut supervisor_done => true,
    };
    shutting_down.store(true, Ordering::SeqCst);
    // The live status streams end now: the server waits for the requests inside.
    parts.events.close();
    if escalated {
        server.stop_within(ESCALATION_STOP).await;
        return Err(RunError::SupervisorGaveUp);
    }
    drain(&cfg, supervisor, server).await;
    Ok(())
}

/// Refuse a Redis this service cannot trust (too old, or evicting keys when full); one that
/// does not answer yet is let be, as any Redis outage is.
async fn check_redis(parts: &Parts) -> Result<(), RunError> {
    match redis_checks::check_server(&parts.queue).await {
        Ok(s) => {
            tracing::info!(version = %s.version, maxmemory_policy = ?s.maxmemory_policy, "Redis checked");
            Ok(())
        }
        Err(StartupCheck::Unreachable(e)) => {
            tracing::warn!(error = %e, "Redis does not answer at start-up: its version and maxmemory-policy are not checked");
            Ok(())
        }
        Err(StartupCheck::Refused(e)) => Err(RunError::RedisUnsuitable(e)),
    }
}

/// MongoDB indexes: made in the background (retried until MongoDB answers, or until the
/// records that block them are fixed), ended with `run`. Until they exist, readiness fails
/// and no communication is accepted: the unique index is what makes idempotency hold.
fn spawn_index_creation(cfg: &Config, store: &MongoStore) -> (AbortOnDrop, IndexReadiness) {
    let backoff =
        Backoff::exponential(cfg.mongodb.index_retry_initial, cfg.mongodb.index_retry_max);
    let (status, readiness) = IndexReadiness::new();
    let coll = store.collection().clone();
    let task = tokio::spawn(indexes::build(coll, backoff, status));
    (AbortOnDrop(task), readiness)
}

/// A background task that ends with its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn start_actors(
    cfg: &Config,
    parts: &Parts,
    indexes: IndexReadiness,
) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), RunError> {
    let args = SupervisorArgs {
        children: child_specs(cfg, parts, indexes),
        max_restarts: cfg.supervisor.max_restarts,
        window: cfg.supervisor.window,
        backoff_base: cfg.supervisor.backoff_base,
        backoff_max: cfg.supervisor.backoff_max,
        stop_timeout: cfg.server.shutdown_flush,
    };
    Actor::spawn(Some("supervisor".into()), Supervisor, args)
        .await
        .map_err(RunError::Actors)
}

fn http_state(
    cfg: &Config,
    parts: &Parts,
    prometheus: PrometheusHandle,
    shutting_down: Arc<AtomicBool>,
    indexes: IndexReadiness,
) -> http::AppState {
    let tenants = Arc::new(Tenants::new(&cfg.tenants.tables, &cfg.tenant_defaults()));
    let suppressions = Arc::new(crate::clients::suppressions::MongoSuppressions::new(
        parts.store.database(),
    ));
    http::AppState {
        indexes,
        admission: actors::router::Admission::new(
            cfg.router.max_pending,
            cfg.router.accept_deadline,
        )
        .with_bulk_deadline(cfg.router.bulk_deadline),
        store: parts.store.clone(),
        queue: parts.queue.clone(),
        search: parts.search.clone(),
        prometheus,
        shutting_down,
        routes: Channel::ALL
            .iter()
            .map(|c| parts.routes[c].clone())
            .collect(),
        callbacks: callback_config(cfg, suppressions.clone()),
        communications_index: cfg.elasticsearch.communications_index.clone(),
        logs_index: cfg.elasticsearch.logs_index.clone(),
        auth: Arc::new(auth::ApiKeys::with_rates(
            cfg.auth.keys.clone(),
            cfg.auth.dev_mode,
            &|t| {
                let p = tenants.policy(t);
                (p.rate_per_sec, p.burst)
            },
        )),
        limiter: limiter(cfg, parts),
        tenants,
        validation: actors::domain::ValidationLimits {
            email_max_chars: cfg.limits.email_max_chars,
            fallback_max_after_secs: cfg.fallback.max_after_secs,
        },
        schedule: actors::domain::ScheduleLimits::with_horizon_days(cfg.schedule.horizon_days),
        scheduled: Arc::new(crate::clients::scheduled::MongoScheduled::new(
            &parts.store,
            cfg.sweeper.recheck,
        )),
        dead_letters: Arc::new(crate::clients::dead_letters::MongoDeadLetters::new(
            &parts.store,
            cfg.sweeper.recheck,
        )),
        shards: actors::shards::StreamShards::new(cfg.redis.stream_shards)
            .by_tenant(cfg.redis.shard_by_tenant),
        templates: Arc::new(crate::clients::templates::MongoTemplates::new(
            parts.store.database(),
        )),
        suppressions: suppressions.clone(),
        metrics_token: cfg.auth.metrics_token.clone(),
        events: Arc::new(http::EventsConfig {
            hub: parts.events.clone(),
            logs_index: cfg.elasticsearch.logs_index.clone(),
            keep_alive: cfg.events.keep_alive,
            buffer: cfg.events.subscriber_buffer,
        }),
    }
}

/// What the provider callbacks need: their signature secrets, the receipts' deadline and
/// the opt-out lists they fill.
fn callback_config(
    cfg: &Config,
    suppressions: Arc<crate::clients::suppressions::MongoSuppressions>,
) -> Arc<callbacks::CallbackConfig> {
    Arc::new(callbacks::CallbackConfig {
        twilio_url: cfg.callbacks.twilio_url(),
        twilio_auth_token: cfg.providers.sms.auth_token.clone(),
        whatsapp_app_secret: cfg.callbacks.whatsapp_app_secret.clone(),
        whatsapp_verify_token: cfg.callbacks.whatsapp_verify_token.clone(),
        vonage_signature_secret: cfg.providers.vonage.signature_secret.clone(),
        sendgrid_public_key: sendgrid_key(cfg),
        apply_timeout: cfg.receipts.apply_timeout,
        suppressions,
    })
}

/// The tenants' limits counted in Redis.
fn limiter(cfg: &Config, parts: &Parts) -> Arc<limits::Limiter> {
    Arc::new(limits::Limiter {
        recipient_max: cfg.limits.recipient_max,
        recipient_window_secs: cfg.limits.recipient_window_secs.max(1),
        fail_open: cfg.tenants.fail_open.clone(),
        timeout: cfg.tenants.check_timeout,
        // A connection of its own: a check never waits behind the router's pipelines (a
        // bulk send's entries) or the senders' scripts on the shared one.
        redis: RedisLimiter::new(Arc::new(parts.queue.own_connection())),
    })
}

fn log_start(cfg: &Config, state: &http::AppState) {
    if state.auth.is_dev_mode() {
        tracing::warn!(
            "DEV_MODE: no API keys are configured and every request is served as tenant \"default\"; never expose this service like this"
        );
    } else {
        tracing::info!(keys = cfg.auth.keys.len(), "API keys loaded");
    }
    tracing::info!(
        tenants_with_tables = state.tenants.configured(),
        countries = ?cfg.tenants.countries,
        fail_open = ?cfg.tenants.fail_open,
        "Tenant senders and limits loaded."
    );
    if cfg.sender.fault_injection {
        tracing::warn!("FAULT_INJECTION is on: test markers in message bodies crash the sender");
    }
    let mut started = AuditEvent::new(AuditKind::ConfigLoaded, config_summary(cfg));
    started.route = Some(format!("start {}", consumer_name(cfg)));
    actors::audit::record(started);
}

/// What a process started with, for the audit trail: the switches and where it connects,
/// never a secret (URLs through [`crate::config::redact::url`], keys as a count per tenant).
fn config_summary(cfg: &Config) -> serde_json::Value {
    use crate::config::redact::url;
    let mut tenants: Vec<&str> = cfg.auth.keys.iter().map(|k| k.tenant.as_str()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    serde_json::json!({
        "keys": cfg.auth.keys.len(),
        "tenants": tenants,
        "devMode": cfg.auth.dev_mode,
        "faultInjection": cfg.sender.fault_injection,
        "allowInsecureTransport": cfg.server.allow_insecure_transport,
        "metricsToken": cfg.auth.metrics_token.is_some(),
        "publicBaseUrl": url(&cfg.callbacks.public_base_url),
        "mongodb": cfg.mongodb.url.redacted(),
        "redis": cfg.redis.url.redacted(),
        "elasticsearch": url(&cfg.elasticsearch.node),
        "smtp": cfg.providers.email.smtp_url.redacted(),
        "twilioApiBase": url(&cfg.providers.sms.api_base),
        "whatsappApiBase": url(&cfg.providers.whatsapp.api_base),
        "ratePerSec": cfg.auth.rate_per_sec,
        "burst": cfg.auth.burst,
    })
}

/// The HTTP server, running, and how to stop it.
struct HttpServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl HttpServer {
    async fn start(cfg: &Config, state: http::AppState) -> Result<HttpServer, RunError> {
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| RunError::Listen {
                addr: addr.clone(),
                source,
            })?;
        tracing::info!(%addr, consumer = %consumer_name(cfg), "listening");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            http::routes(state),
            cfg.server.limits(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(HttpServer { stop, task })
    }

    /// Close the listener and wait for the requests inside to be answered.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }

    async fn stop_within(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.stop()).await;
    }
}

/// Shutdown in three stages, each within its own deadline, so a stage that uses its
/// deadline up takes nothing from the next:
/// 1. stop accepting (`server.shutdown_accept_ms`): new requests get 503; the ReceiptActor
///    applies its batch and parks what waits, so the callbacks inside are answered; the
///    listener closes once the requests inside are answered (the live status streams are
///    ended first, so they do not hold it open); the router, sweeper, stats and
///    EventFanout stop;
/// 2. in-flight sends (`server.shutdown_deadline_ms`): consumers finish their batch,
///    senders their calls; what is still running then is cut (its entries stay pending,
///    and its records are claimed again once their leases expire, flagged);
/// 3. flush (`server.shutdown_flush_ms`): the ReceiptActor applies and parks what it holds,
///    then the LogIndexer indexes what it holds and what `log_stream` still has for it.
async fn drain(cfg: &Config, supervisor: ActorRef<SupervisorMsg>, server: HttpServer) {
    let s = &cfg.server;
    tracing::info!(
        accept = ?s.shutdown_accept, send = ?s.shutdown_deadline, flush = ?s.shutdown_flush,
        "shutting down: no new requests, finishing in-flight work"
    );
    let [accepting, sending, flushing] = children::shutdown_stages(cfg);
    let accept = async {
        tokio::time::sleep(s.drain_grace).await;
        use actors::receipts::{ReceiptMsg, NAME};
        if let Some(receipts) = ActorRef::<ReceiptMsg>::where_is(NAME.to_string()) {
            let _ = receipts
                .call(ReceiptMsg::Drain, Some(s.shutdown_accept))
                .await;
        }
        server.stop().await;
    };
    if tokio::time::timeout(s.shutdown_accept, accept)
        .await
        .is_err()
    {
        tracing::warn!("requests still inside at the accept stage's deadline; closing");
    }
    stop_stage(&supervisor, "accept", accepting, s.shutdown_accept).await;
    stop_stage(&supervisor, "send", sending, s.shutdown_deadline).await;
    stop_stage(&supervisor, "flush", flushing, s.shutdown_flush).await;
    let _ = supervisor
        .call(SupervisorMsg::Shutdown, Some(s.shutdown_flush))
        .await;
    tracing::info!("stopped");
}

/// One stage of the shutdown: its children stopped within `within`, or killed.
async fn stop_stage(
    supervisor: &ActorRef<SupervisorMsg>,
    stage: &'static str,
    groups: Vec<Vec<String>>,
    within: Duration,
) {
    let asked = supervisor
        .call(
            |reply| SupervisorMsg::StopStage(groups, within, reply),
            // The supervisor kills what is left at `within`; a margin for the answer.
            Some(within + Duration::from_secs(1)),
        )
        .await;
    match asked {
        Ok(actors::ractor::rpc::CallResult::Success(killed)) if killed.is_empty() => {
            tracing::info!(stage, "shutdown stage done")
        }
        Ok(actors::ractor::rpc::CallResult::Success(killed)) => {
            tracing::warn!(stage, ?killed, "shutdown stage's deadline passed; cut")
        }
        _ => tracing::warn!(stage, "shutdown stage not confirmed"),
    }
}

/// SendGrid's verification key, checked at start-up (`config::checks`).
fn sendgrid_key(cfg: &Config) -> Option<Vec<u8>> {
    let key = &cfg.providers.sendgrid.webhook_public_key;
    (!key.is_empty()).then(|| callbacks::sendgrid::public_key(key).ok())?
}
