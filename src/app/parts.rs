//! Everything the service is made of, built from configuration: the clients and the
//! providers (no I/O yet: every client connects on first use).

use super::RunError;
use crate::clients::elastic::{ElasticAccess, ElasticSink};
use crate::clients::lease::RedisLeases;
use crate::clients::mongo::MongoStore;
use crate::clients::redis_queue::RedisQueue;
use crate::config::Config;
use crate::providers::{
    sendgrid::SendGrid, smtp::Smtp, twilio::Twilio, vonage::Vonage, whatsapp::WhatsApp,
};
use actors::domain::{Channel, LOG_STREAM};
use actors::health::ProviderHealth;
use actors::ports::Provider;
use actors::routing::{Route, Routes};
use std::collections::HashMap;
use std::sync::Arc;

pub struct Parts {
    pub store: Arc<MongoStore>,
    pub queue: Arc<RedisQueue>,
    pub search: Arc<ElasticSink>,
    /// Each channel's providers, each with its breaker and rate limit, shared by the
    /// channel's sender and consumers and `/api/v1/providers`.
    pub routes: HashMap<Channel, Arc<Routes>>,
    /// The live status stream: the EventFanout publishes to it, `GET /api/v1/events`
    /// subscribes.
    pub events: Arc<actors::event_fanout::EventHub>,
}

impl Parts {
    pub async fn build(cfg: &Config) -> Result<Parts, RunError> {
        let queue = Arc::new(
            RedisQueue::new(
                &cfg.redis.urls(),
                cfg.redis.cluster,
                cfg.redis.ca_file.as_deref(),
                cfg.redis.connect_timeout,
                cfg.redis.response_timeout(),
            )
            .map_err(RunError::Redis)?
            .with_stream_bound(LOG_STREAM, cfg.log_indexer.max_stream_len),
        );
        let leases = Arc::new(RedisLeases::new(queue.clone()));
        let store = MongoStore::new(&cfg.mongodb, cfg.sweeper.recheck, leases)
            .await
            .map_err(RunError::MongoDb)?;
        Ok(Parts {
            store: Arc::new(store),
            queue,
            search: Arc::new(search(cfg)?),
            routes: routes(cfg)?,
            events: actors::event_fanout::EventHub::new(
                cfg.events.channel_capacity,
                cfg.events.max_subscribers,
                cfg.events.max_per_tenant,
            ),
        })
    }
}

fn search(cfg: &Config) -> Result<ElasticSink, RunError> {
    let es = &cfg.elasticsearch;
    let access = ElasticAccess {
        user: es.user.clone(),
        password: es.password.clone(),
        api_key: es.api_key.clone(),
        ca_file: es.ca_file.clone(),
        timeout: Some(es.timeout),
    };
    ElasticSink::new(&es.node, &access, &es.communications_index, &es.logs_index)
        .map(|sink| sink.with_audit_index(&cfg.audit.index))
        .map_err(RunError::Elasticsearch)
}

/// Each channel's providers, in the `[routing]` order, with their weights and a breaker
/// and token bucket each (the provider's `[provider_limits]`, else the channel's settings).
fn routes(cfg: &Config) -> Result<HashMap<Channel, Arc<Routes>>, RunError> {
    let p = &cfg.providers;
    let http = reqwest::Client::builder()
        .timeout(p.timeout)
        .connect_timeout(p.connect_timeout)
        .pool_max_idle_per_host(p.pool_max_idle_per_host)
        .user_agent(concat!("comm-aggregator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(RunError::HttpClient)?;
    let mut out = HashMap::new();
    for ch in Channel::ALL {
        let names = cfg.routing.names(ch);
        let weights = cfg.routing.weights(ch);
        let mut list = Vec::with_capacity(names.len());
        for (name, weight) in names.into_iter().zip(weights) {
            let provider = provider(cfg, &http, ch, name)?;
            let own = cfg.provider_settings(ch, name);
            let health = ProviderHealth::new(
                provider.name(),
                ch.as_str(),
                own.breaker,
                own.rate_per_sec,
                own.burst,
            );
            list.push(Route {
                provider,
                health: Arc::new(health),
                weight,
            });
        }
        let routes = Routes::new(cfg.routing.strategy(ch), list);
        out.insert(ch, Arc::new(tenant_orders(cfg, ch, routes)));
    }
    Ok(out)
}

/// `routes` with the provider orders of the tenants that have one for `ch` (their names
/// checked at start-up against the channel's list).
fn tenant_orders(cfg: &Config, ch: Channel, mut routes: Routes) -> Routes {
    let names = cfg.routing.names(ch);
    for (tenant, t) in &cfg.tenants.tables {
        if let Some(own) = t.providers.get(ch) {
            let positions = own
                .iter()
                .filter_map(|p| names.iter().position(|n| n == p))
                .collect();
            routes = routes.with_tenant_order(tenant, positions);
        }
    }
    routes
}

/// The client of provider `name` (a `[routing]` name, checked at start-up) for `channel`.
fn provider(
    cfg: &Config,
    http: &reqwest::Client,
    channel: Channel,
    name: &str,
) -> Result<Arc<dyn Provider>, RunError> {
    let p = &cfg.providers;
    let twilio = || {
        Twilio::new(
            http.clone(),
            &p.sms.api_base,
            &p.sms.account_sid,
            p.sms.auth_token.clone(),
            &p.sms.messaging_service_sid,
            cfg.callbacks.twilio_url(),
        )
    };
    Ok(match (channel, name) {
        (Channel::Sms, "twilio") => Arc::new(twilio()),
        (Channel::Whatsapp, "twilio") => Arc::new(twilio().for_whatsapp()),
        (Channel::Sms, "vonage") => Arc::new(Vonage::new(
            http.clone(),
            &p.vonage.api_base,
            &p.vonage.api_key,
            p.vonage.api_secret.clone(),
            cfg.callbacks.vonage_url(),
        )),
        (Channel::Whatsapp, "meta") => Arc::new(WhatsApp::new(
            http.clone(),
            &p.whatsapp.api_base,
            &p.whatsapp.phone_number_id,
            p.whatsapp.token.clone(),
        )),
        (Channel::Email, "sendgrid") => Arc::new(SendGrid::new(
            http.clone(),
            &p.sendgrid.api_base,
            p.sendgrid.api_key.clone(),
            &p.email.default_subject,
        )),
        (Channel::Email, "smtp") => Arc::new(Smtp::new(
            p.email.smtp_url.expose(),
            &p.email.default_subject,
            p.timeout,
        )?),
        (ch, other) => unreachable!("{other:?} for {ch:?}: refused by the start-up checks"),
    })
}
