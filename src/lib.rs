//! The edges of the communication aggregator: configuration, the HTTP layer, and the
//! clients for MongoDB, Redis, Elasticsearch and the providers. The actors live in the
//! `actors` crate; `run` wires them together under one supervisor.

pub mod auth;
pub use http::callbacks;
pub mod clients;
pub mod config;
pub mod http;
pub mod limits;
pub mod providers;
pub mod search;

use actors::batch::BatchSettings;
use actors::domain::Channel;
use actors::health::{BreakerConfig, ProviderHealth};
use actors::log_indexer::{self, IndexerArgs, LogIndexer};
use actors::ports::{Provider, Queue, SearchSink, Store};
use actors::ractor::{Actor, ActorRef};
use actors::retry::RetryPolicy;
use actors::router::{self, RouterActor, RouterArgs};
use actors::sender::{self, SenderActor, SenderArgs};
use actors::stream_consumer::{self, ConsumerArgs, StreamConsumer};
use actors::supervisor::{ChildSpec, SpawnFn, Supervisor, SupervisorArgs, SupervisorMsg};
use actors::sweeper::{self, OutboxSweeper, SweeperArgs};
use clients::elastic::ElasticSink;
use clients::mongo::MongoStore;
use clients::redis_queue::RedisQueue;
use config::Config;
use futures::FutureExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Install the Prometheus recorder (once per process).
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let latency = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_size".into()),
                &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_docs".into()),
                &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0],
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("metrics: {e}"))
}

/// The consumer name: configured, or `<hostname>-<port>`, unique per instance on a host
/// and the same across restarts of that instance.
pub fn consumer_name(cfg: &Config) -> String {
    if !cfg.redis.consumer_name.is_empty() {
        return cfg.redis.consumer_name.clone();
    }
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", cfg.server.port)
}

fn spec<A, F>(name: String, actor: F, args: A::Arguments) -> ChildSpec
where
    A: Actor,
    A::Arguments: Clone + Send + Sync + 'static,
    F: Fn() -> A + Send + Sync + 'static,
{
    let actor = Arc::new(actor);
    let n = name.clone();
    let spawn: SpawnFn = Arc::new(move |sup| {
        let args = args.clone();
        let n = n.clone();
        let handler = actor();
        async move {
            let (r, _) = A::spawn_linked(Some(n), handler, args, sup).await?;
            Ok(r.get_cell())
        }
        .boxed()
    });
    ChildSpec { name, spawn }
}

/// Everything the service is made of, built from configuration (no I/O yet).
pub struct Parts {
    pub store: Arc<MongoStore>,
    pub queue: Arc<RedisQueue>,
    pub search: Arc<ElasticSink>,
    pub providers: HashMap<Channel, Arc<dyn Provider>>,
    /// Breaker and rate limit per provider, shared by sender, consumer and `/api/v1/providers`.
    pub health: HashMap<Channel, Arc<ProviderHealth>>,
}

pub async fn build_parts(cfg: &Config) -> Result<Parts, String> {
    let queue = Arc::new(
        RedisQueue::new(
            &cfg.redis.url,
            cfg.redis.ca_file.as_deref(),
            Config::ms(cfg.redis.block_ms) + Duration::from_secs(5),
        )
        .map_err(|e| format!("REDIS_URL: {e}"))?,
    );
    let store = MongoStore::new(
        &cfg.mongodb.url,
        &cfg.mongodb.database,
        Config::ms(cfg.sweeper.recheck_ms),
        queue.clone(),
    )
    .await
    .map_err(|e| format!("MONGODB_URL: {e}"))?;
    let search = ElasticSink::new(
        &cfg.elasticsearch.node,
        &clients::elastic::ElasticAccess {
            user: cfg.elasticsearch.user.clone(),
            password: cfg.elasticsearch.password.clone(),
            api_key: cfg.elasticsearch.api_key.clone(),
            ca_file: cfg.elasticsearch.ca_file.clone(),
        },
        &cfg.elasticsearch.communications_index,
        &cfg.elasticsearch.logs_index,
    )
    .map_err(|e| format!("ELASTICSEARCH_NODE: {e}"))?;
    let timeout = Config::ms(cfg.providers.timeout_ms);
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .user_agent(concat!("comm-aggregator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let p = &cfg.providers;
    let mut providers: HashMap<Channel, Arc<dyn Provider>> = HashMap::new();
    providers.insert(
        Channel::Sms,
        Arc::new(providers::twilio::Twilio::new(
            http.clone(),
            &p.sms.api_base,
            &p.sms.account_sid,
            &p.sms.auth_token,
            &p.sms.messaging_service_sid,
            cfg.callbacks.twilio_url(),
        )),
    );
    providers.insert(
        Channel::Whatsapp,
        Arc::new(providers::whatsapp::WhatsApp::new(
            http,
            &p.whatsapp.api_base,
            &p.whatsapp.phone_number_id,
            &p.whatsapp.token,
        )),
    );
    providers.insert(
        Channel::Email,
        Arc::new(providers::smtp::Smtp::new(
            &p.email.smtp_url,
            &p.email.default_subject,
            timeout,
        )?),
    );
    let health = Channel::ALL
        .into_iter()
        .map(|ch| {
            let c = cfg.channels.get(ch);
            let h = ProviderHealth::new(
                providers[&ch].name(),
                ch.as_str(),
                BreakerConfig {
                    consecutive_failures: c.breaker_consecutive_failures,
                    failure_ratio: c.breaker_failure_ratio,
                    window: c.breaker_window,
                    min_calls: c.breaker_min_calls,
                    cooldown: Config::ms(c.breaker_cooldown_ms),
                },
                c.rate_per_sec,
                c.burst,
            );
            (ch, Arc::new(h))
        })
        .collect();
    Ok(Parts {
        store: Arc::new(store),
        queue,
        search: Arc::new(search),
        providers,
        health,
    })
}

/// The supervisor's children, in start order.
pub fn child_specs(cfg: &Config, parts: &Parts) -> Vec<ChildSpec> {
    let consumer = consumer_name(cfg);
    let store: Arc<dyn Store> = parts.store.clone();
    let queue: Arc<dyn Queue> = parts.queue.clone();
    let search: Arc<dyn SearchSink> = parts.search.clone();
    let provider_timeout = Config::ms(cfg.providers.timeout_ms);
    let mut specs = vec![spec(
        actors::receipts::NAME.to_string(),
        || actors::receipts::ReceiptActor,
        actors::receipts::ReceiptArgs {
            store: store.clone(),
            queue: queue.clone(),
            batch: BatchSettings::new(500, Duration::from_millis(10)),
            wait_for_record: Duration::from_secs(10),
            recheck: Duration::from_millis(250),
        },
    )];
    specs.push(spec(
        log_indexer::NAME.to_string(),
        || LogIndexer,
        IndexerArgs {
            queue: queue.dedicated(),
            search,
            group: cfg.redis.group.clone(),
            consumer: consumer.clone(),
            logs_index: cfg.elasticsearch.logs_index.clone(),
            communications_index: cfg.elasticsearch.communications_index.clone(),
            batch: BatchSettings::new(
                cfg.log_indexer.max_docs,
                Config::ms(cfg.log_indexer.max_wait_ms),
            )
            .with_max_bytes(cfg.log_indexer.max_bytes),
        },
    ));
    for ch in Channel::ALL {
        specs.push(spec(
            sender::name(ch),
            || SenderActor,
            SenderArgs {
                channel: ch,
                provider: parts.providers[&ch].clone(),
                store: store.clone(),
                queue: queue.clone(),
                owner: consumer.clone(),
                stale_after: Config::ms(cfg.sender.stale_after_ms),
                provider_timeout,
                concurrency: cfg.channels.get(ch).concurrency,
                retry: RetryPolicy {
                    max_attempts: cfg.channels.get(ch).max_attempts,
                    base: Config::ms(cfg.channels.get(ch).backoff_base_ms),
                    cap: Config::ms(cfg.channels.get(ch).backoff_cap_ms),
                },
                health: parts.health[&ch].clone(),
                record_patience: Config::ms(cfg.sender.record_patience_ms),
                faults: cfg.sender.fault_injection,
            },
        ));
    }
    for ch in Channel::ALL {
        specs.push(spec(
            stream_consumer::name(ch),
            || StreamConsumer,
            ConsumerArgs {
                channel: ch,
                queue: queue.dedicated(),
                group: cfg.redis.group.clone(),
                consumer: consumer.clone(),
                count: cfg.redis.read_count,
                block: Config::ms(cfg.redis.block_ms),
                claim_idle: Config::ms(cfg.redis.claim_idle_ms),
                deliver_timeout: Config::ms(cfg.sender.record_patience_ms)
                    + provider_timeout * 2
                    + Duration::from_secs(60),
                max_deliveries: cfg.redis.max_deliveries,
                store: store.clone(),
                health: parts.health[&ch].clone(),
            },
        ));
    }
    specs.push(spec(
        router::NAME.to_string(),
        || RouterActor,
        RouterArgs {
            store: store.clone(),
            queue: queue.clone(),
            batch: BatchSettings::new(cfg.router.batch_max, Config::ms(cfg.router.linger_ms)),
            max_inflight: cfg.router.max_inflight,
        },
    ));
    specs.push(spec(
        actors::stats::NAME.to_string(),
        || actors::stats::StatsActor,
        actors::stats::StatsArgs {
            queue: queue.clone(),
            group: cfg.redis.group.clone(),
            interval: Duration::from_secs(2),
        },
    ));
    specs.push(spec(
        sweeper::NAME.to_string(),
        || OutboxSweeper,
        SweeperArgs {
            store,
            queue,
            interval: Config::ms(cfg.sweeper.interval_ms),
            recheck: Config::ms(cfg.sweeper.recheck_ms),
            batch: cfg.sweeper.batch,
            group: cfg.redis.group.clone(),
        },
    ));
    specs
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Run the service until SIGTERM/SIGINT (or until the supervisor gives up).
pub async fn run(cfg: Config, prometheus: PrometheusHandle) -> Result<(), String> {
    let parts = build_parts(&cfg).await?;

    // MongoDB indexes: made in the background, retried until MongoDB answers.
    {
        let store = parts.store.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(200);
            loop {
                match store.ensure_indexes().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create MongoDB indexes yet");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
    }

    let sup_args = SupervisorArgs {
        children: child_specs(&cfg, &parts),
        max_restarts: cfg.supervisor.max_restarts,
        window: Config::ms(cfg.supervisor.window_ms),
        backoff_base: Config::ms(cfg.supervisor.backoff_base_ms),
        backoff_max: Config::ms(cfg.supervisor.backoff_max_ms),
        stop_timeout: Config::ms(cfg.server.shutdown_deadline_ms),
    };
    let (supervisor, sup_handle): (ActorRef<SupervisorMsg>, _) =
        Actor::spawn(Some("supervisor".into()), Supervisor, sup_args)
            .await
            .map_err(|e| format!("starting the actors: {e}"))?;

    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = http::AppState {
        store: parts.store.clone(),
        queue: parts.queue.clone(),
        search: parts.search.clone(),
        prometheus,
        shutting_down: shutting_down.clone(),
        health: Channel::ALL
            .iter()
            .map(|c| parts.health[c].clone())
            .collect(),
        callbacks: Arc::new(callbacks::CallbackConfig {
            twilio_url: cfg.callbacks.twilio_url(),
            twilio_auth_token: cfg.providers.sms.auth_token.clone(),
            whatsapp_app_secret: cfg.callbacks.whatsapp_app_secret.clone(),
            whatsapp_verify_token: cfg.callbacks.whatsapp_verify_token.clone(),
        }),
        communications_index: cfg.elasticsearch.communications_index.clone(),
        auth: Arc::new(auth::ApiKeys::new(
            cfg.auth.keys.clone(),
            cfg.auth.dev_mode,
            cfg.auth.rate_per_sec,
            cfg.auth.burst,
        )),
        cap: Arc::new(limits::RecipientCap {
            max: cfg.limits.recipient_max,
            window_secs: cfg.limits.recipient_window_secs.max(1),
            redis: parts.queue.clone(),
        }),
        validation: actors::domain::ValidationLimits {
            email_max_chars: cfg.limits.email_max_chars,
        },
        metrics_token: cfg.auth.metrics_token.clone(),
    };
    if state.auth.is_dev_mode() {
        tracing::warn!(
            "DEV_MODE: no API keys are configured and every request is served as tenant \"default\"; never expose this service like this"
        );
    } else {
        tracing::info!(keys = cfg.auth.keys.len(), "API keys loaded");
    }
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (HOST/PORT): {e}"))?;
    tracing::info!(%addr, consumer = %consumer_name(&cfg), "listening");

    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        warp::serve(http::routes(state))
            .incoming(listener)
            .graceful(async move {
                let _ = stop_http_rx.await;
            })
            .run(),
    );

    let mut sup_handle = sup_handle;
    let escalated = tokio::select! {
        _ = shutdown_signal() => false,
        _ = &mut sup_handle => true,
    };
    shutting_down.store(true, Ordering::SeqCst);
    let deadline = Config::ms(cfg.server.shutdown_deadline_ms);
    if cfg.sender.fault_injection {
        tracing::warn!("FAULT_INJECTION is on: test markers in message bodies crash the sender");
    }
    if escalated {
        let _ = stop_http_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        return Err("the supervisor gave up (restart intensity exceeded); see the log".into());
    }
    tracing::info!(
        ?deadline,
        "shutting down: no new requests, finishing in-flight work"
    );
    let drain = async {
        // Requests already inside get their answers; new ones get 503 until the listener closes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = stop_http_tx.send(());
        let _ = supervisor
            .call(SupervisorMsg::Shutdown, Some(deadline))
            .await;
        let _ = server.await;
    };
    if tokio::time::timeout(deadline, drain).await.is_err() {
        tracing::warn!("shutdown deadline passed; stopping now (unfinished entries stay pending)");
    }
    tracing::info!("stopped");
    Ok(())
}
