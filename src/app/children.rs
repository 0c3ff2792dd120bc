//! The supervisor's children, in start order, each with its arguments from configuration.

use super::parts::Parts;
use crate::clients::fallbacks::MongoFallbacks;
use crate::clients::indexes::{IndexReadiness, IndexState};
use crate::clients::parked::MongoParking;
use crate::clients::reconcile::ElasticIndexed;
use crate::clients::scheduled::MongoScheduled;
use crate::config::Config;
use actors::adaptive::StoreLimiter;
use actors::audit::{self, AuditActor, AuditArgs};
use actors::batch::BatchSettings;
use actors::domain::Channel;
use actors::due::{DueTimer, DueTimerArgs};
use actors::event_fanout::{self, EventFanout, FanoutArgs};
use actors::fallback::{self, FallbackArgs};
use actors::limited_store::LimitedStore;
use actors::log_indexer::{self, IndexerArgs, LogIndexer};
use actors::ports::{Queue, SearchSink, Store};
use actors::ractor::Actor;
use actors::receipts::{self, ReceiptActor, ReceiptArgs};
use actors::reconciler::{self, Reconciler, ReconcilerArgs};
use actors::router::{self, RouterActor, RouterArgs};
use actors::scheduler::{self, SchedulerArgs};
use actors::sender::{self, SenderActor, SenderArgs};
use actors::shards::StreamShards;
use actors::stats::{self, StatsActor, StatsArgs};
use actors::stream_consumer::{self, ConsumerArgs, StreamConsumer};
use actors::supervisor::{ChildSpec, SpawnFn};
use actors::sweeper::{self, OutboxSweeper, SweeperArgs};
use futures::FutureExt;
use std::sync::Arc;

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

/// The ports every child shares, as the actors see them.
struct Ports<'a> {
    store: Arc<dyn Store>,
    /// The store as the senders see it: behind the adaptive limit they share, if it is on.
    sender_store: Arc<dyn Store>,
    /// The store as the ReceiptActor sees it: behind a limit of its own, if it is on.
    receipts_store: Arc<dyn Store>,
    /// The store as the router sees it: its inserts reported to both limits, if they are on.
    router_store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    search: Arc<dyn SearchSink>,
    consumer: String,
    /// MongoDB's database, for the collections beside the records (parked receipts).
    database: &'a mongodb::Database,
}

/// The supervisor's children, in start order: the audit trail, receipts and the LogIndexer first (the
/// senders report to them), then the senders, the consumers that feed them, the router,
/// the stats, the sweeper, the reconciler and the fallbacks.
pub fn child_specs(cfg: &Config, parts: &Parts, indexes: IndexReadiness) -> Vec<ChildSpec> {
    let store: Arc<dyn Store> = parts.store.clone();
    let limits = StoreLimits::new(cfg, &store);
    let ports = Ports {
        sender_store: limits.sender,
        receipts_store: limits.receipts,
        router_store: limits.router,
        store,
        queue: parts.queue.clone(),
        search: parts.search.clone(),
        consumer: consumer_name(cfg),
        database: parts.store.database(),
    };
    let mut specs = vec![
        audit_spec(cfg, &ports),
        receipts_spec(cfg, &ports),
        indexer_spec(cfg, &ports),
    ];
    specs.extend(Channel::ALL.map(|ch| sender_spec(cfg, parts, &ports, ch)));
    let shards = shards(cfg);
    for ch in Channel::ALL {
        specs.extend((0..shards.count()).map(|i| consumer_spec(cfg, parts, &ports, ch, i)));
    }
    specs.push(router_spec(cfg, &ports));
    specs.push(stats_spec(cfg, &ports));
    specs.push(sweeper_spec(cfg, &ports));
    specs.push(reconciler_spec(cfg, parts));
    specs.push(fallback_spec(cfg, parts, indexes));
    specs.push(scheduler_spec(cfg, parts));
    specs.push(fanout_spec(cfg, parts, &ports));
    specs
}

/// The EventFanout: `log_stream` to the live status subscribers.
fn fanout_spec(cfg: &Config, parts: &Parts, p: &Ports) -> ChildSpec {
    let args = FanoutArgs {
        queue: p.queue.dedicated(),
        hub: parts.events.clone(),
        count: cfg.events.read_count,
        block: cfg.events.block,
    };
    spec(event_fanout::NAME.to_string(), || EventFanout, args)
}

/// How each channel's stream is split.
fn shards(cfg: &Config) -> StreamShards {
    StreamShards::new(cfg.redis.stream_shards).by_tenant(cfg.redis.shard_by_tenant)
}

/// The store as the senders, the ReceiptActor and the router see it: with the limiter on,
/// the senders share one limit and the ReceiptActor has its own, both adapting to the
/// router's inserts (checked at start-up, so the settings are valid here).
struct StoreLimits {
    sender: Arc<dyn Store>,
    receipts: Arc<dyn Store>,
    router: Arc<dyn Store>,
}

impl StoreLimits {
    fn new(cfg: &Config, store: &Arc<dyn Store>) -> Self {
        let Ok(Some(settings)) = cfg.store_limiter.settings() else {
            return StoreLimits {
                sender: store.clone(),
                receipts: store.clone(),
                router: store.clone(),
            };
        };
        let sender = Arc::new(StoreLimiter::new("sender", settings));
        let receipts = Arc::new(StoreLimiter::new("receipts", settings));
        let delivery = |l: &Arc<StoreLimiter>| -> Arc<dyn Store> {
            Arc::new(LimitedStore::delivery(store.clone(), l.clone()))
        };
        StoreLimits {
            sender: delivery(&sender),
            receipts: delivery(&receipts),
            router: Arc::new(LimitedStore::accepts(store.clone(), vec![sender, receipts])),
        }
    }
}

/// The children each shutdown stage stops, in groups stopped one after another (see
/// `drain`): accepting (router, sweeper, stats), sending (consumers, then senders),
/// flushing (receipts, then the LogIndexer, which indexes the receipts' events too).
pub fn shutdown_stages(cfg: &Config) -> [Vec<Vec<String>>; 3] {
    let consumers = Channel::ALL
        .into_iter()
        .flat_map(|ch| (0..shards(cfg).count()).map(move |i| stream_consumer::name(ch, i)))
        .collect();
    [
        vec![vec![
            router::NAME.to_string(),
            sweeper::NAME.to_string(),
            stats::NAME.to_string(),
            reconciler::NAME.to_string(),
            fallback::NAME.to_string(),
            scheduler::NAME.to_string(),
            event_fanout::NAME.to_string(),
        ]],
        vec![consumers, Channel::ALL.map(sender::name).to_vec()],
        vec![
            vec![receipts::NAME.to_string()],
            vec![log_indexer::NAME.to_string()],
        ],
    ]
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

fn receipts_spec(cfg: &Config, p: &Ports) -> ChildSpec {
    let args = ReceiptArgs {
        store: p.receipts_store.clone(),
        queue: p.queue.clone(),
        parking: Arc::new(MongoParking::new(p.database)),
        batch: cfg.receipts.batch(),
        wait_for_record: cfg.receipts.wait_for_record,
        recheck: cfg.receipts.recheck,
        parked_recheck: cfg.receipts.parked_recheck,
        parked_recheck_max: cfg.receipts.parked_recheck_max,
    };
    spec(receipts::NAME.to_string(), || ReceiptActor, args)
}

fn indexer_spec(cfg: &Config, p: &Ports) -> ChildSpec {
    let args = IndexerArgs {
        queue: p.queue.dedicated(),
        store: p.store.clone(),
        search: p.search.clone(),
        group: cfg.redis.group.clone(),
        consumer: p.consumer.clone(),
        logs_index: cfg.elasticsearch.logs_index.clone(),
        communications_index: cfg.elasticsearch.communications_index.clone(),
        batch: cfg.log_indexer.batch(),
        claim_idle: cfg.redis.claim_idle,
        forget_after: cfg.log_indexer.forget_consumer,
        hold: cfg.log_indexer_hold(),
    };
    spec(log_indexer::NAME.to_string(), || LogIndexer, args)
}

fn sender_spec(cfg: &Config, parts: &Parts, p: &Ports, ch: Channel) -> ChildSpec {
    let args = SenderArgs {
        channel: ch,
        routes: parts.routes[&ch].clone(),
        store: p.sender_store.clone(),
        queue: p.queue.clone(),
        owner: p.consumer.clone(),
        stale_after: cfg.sender.stale_after,
        provider_timeout: cfg.providers.timeout,
        concurrency: cfg.channels.get(ch).concurrency,
        retry: cfg.channels.get(ch).retry(),
        record_patience: cfg.sender.record_patience,
        faults: cfg.sender.fault_injection,
    };
    spec(sender::name(ch), || SenderActor, args)
}

fn consumer_spec(cfg: &Config, parts: &Parts, p: &Ports, ch: Channel, shard: u32) -> ChildSpec {
    let args = ConsumerArgs {
        channel: ch,
        lanes: shards(cfg).lanes(ch, shard),
        queue: p.queue.dedicated(),
        group: cfg.redis.group.clone(),
        consumer: p.consumer.clone(),
        count: cfg.redis.read_count,
        // One round of the sender's concurrent calls at most: a high entry waits for no more.
        bulk_count: cfg
            .redis
            .bulk_batch
            .min(cfg.redis.read_count)
            .min(cfg.channels.get(ch).concurrency),
        window: cfg.redis.read_count * cfg.redis.lane_window_batches,
        block: cfg.redis.block,
        claim_idle: cfg.redis.claim_idle,
        // The longest a sender may take with a batch: every provider call and the
        // recording of the outcomes.
        deliver_timeout: cfg.sender.record_patience
            + cfg.providers.timeout * 2
            + cfg.redis.deliver_grace,
        max_deliveries: cfg.redis.max_deliveries,
        store: p.store.clone(),
        routes: parts.routes[&ch].clone(),
    };
    spec(stream_consumer::name(ch, shard), || StreamConsumer, args)
}

fn router_spec(cfg: &Config, p: &Ports) -> ChildSpec {
    let args = RouterArgs {
        store: p.router_store.clone(),
        queue: p.queue.clone(),
        batch: cfg.router.batch(),
        max_inflight: cfg.router.max_inflight,
        shards: shards(cfg),
    };
    spec(router::NAME.to_string(), || RouterActor, args)
}

fn stats_spec(cfg: &Config, p: &Ports) -> ChildSpec {
    let args = StatsArgs {
        queue: p.queue.clone(),
        group: cfg.redis.group.clone(),
        interval: cfg.stats.interval,
        shards: shards(cfg),
    };
    spec(stats::NAME.to_string(), || StatsActor, args)
}

fn audit_spec(cfg: &Config, p: &Ports) -> ChildSpec {
    let args = AuditArgs {
        search: p.search.clone(),
        index: cfg.audit.index.clone(),
        batch: BatchSettings::new(cfg.audit.batch_max, cfg.audit.linger),
        max_buffered: cfg.audit.max_buffered,
    };
    spec(audit::NAME.to_string(), || AuditActor, args)
}

fn sweeper_spec(cfg: &Config, p: &Ports) -> ChildSpec {
    let args = SweeperArgs {
        store: p.store.clone(),
        queue: p.queue.clone(),
        interval: cfg.sweeper.interval,
        recheck: cfg.sweeper.recheck,
        batch: cfg.sweeper.batch,
        group: cfg.redis.group.clone(),
        shards: shards(cfg),
    };
    spec(sweeper::NAME.to_string(), || OutboxSweeper, args)
}

fn reconciler_spec(cfg: &Config, parts: &Parts) -> ChildSpec {
    let es = &cfg.elasticsearch;
    let args = ReconcilerArgs {
        records: parts.store.clone(),
        indexed: Arc::new(ElasticIndexed {
            client: parts.search.client().clone(),
            index: es.communications_index.clone(),
        }),
        search: parts.search.clone(),
        logs_index: es.logs_index.clone(),
        communications_index: es.communications_index.clone(),
        interval: cfg.reconciler.interval,
        lookback: cfg.reconciler.lookback,
        settle: cfg.reconciler.settle,
        batch: cfg.reconciler.batch,
    };
    spec(reconciler::NAME.to_string(), || Reconciler, args)
}

/// The FallbackActor submits through its own admission (HTTP's queue is not its to fill),
/// and only once the unique idempotency index exists: that index is what keeps a fallback
/// from being made twice.
fn fallback_spec(cfg: &Config, parts: &Parts, indexes: IndexReadiness) -> ChildSpec {
    let work = FallbackArgs {
        store: Arc::new(MongoFallbacks::new(parts.store.collection().clone())),
        admission: actors::router::Admission::new(cfg.fallback.batch, cfg.router.accept_deadline),
        deadline: cfg.fallback.interval.max(std::time::Duration::from_secs(1)),
        ready: Arc::new(move || indexes.state() == IndexState::Ready),
    };
    let args = DueTimerArgs {
        work: Arc::new(work),
        interval: cfg.fallback.interval,
        batch: cfg.fallback.batch,
    };
    spec(fallback::NAME.to_string(), || DueTimer, args)
}

/// The SchedulerActor: scheduled sends onto their streams when due.
fn scheduler_spec(cfg: &Config, parts: &Parts) -> ChildSpec {
    let work = SchedulerArgs::new(
        Arc::new(MongoScheduled::new(&parts.store, cfg.sweeper.recheck)),
        parts.queue.clone(),
        shards(cfg),
    );
    let args = DueTimerArgs {
        work: Arc::new(work),
        interval: cfg.schedule.interval,
        batch: cfg.schedule.batch,
    };
    spec(scheduler::NAME.to_string(), || DueTimer, args)
}
