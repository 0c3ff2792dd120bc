//! The actor system of the communication aggregator: the actors that move a communication
//! from request to provider to search index, and the ports they reach the world through.
//! Nothing here touches a driver: the root crate implements the ports over MongoDB, Redis,
//! Elasticsearch and the providers, and [`testing`] implements them in memory.
//!
//! # The actor tree
//!
//! ```text
//!                                    Supervisor
//!   ┌─────────┬────────────────┬──────────┬────────────┬───────────────┬──────────┬───────┬────────────┬──────────┬───────────┐
//! Router  StreamConsumer×3N Sender×3  LogIndexer  OutboxSweeper  Receipts  Stats  Reconciler  Fallback  Scheduler
//! ```
//! A request goes HTTP → Router (stored, then on `{type}_stream` and `log_stream`) →
//! StreamConsumer → Sender (claim, provider call, outcome) ; every step's log event goes
//! `log_stream` → LogIndexer → Elasticsearch. Receipts apply the providers' delivery
//! reports; the OutboxSweeper re-queues what MongoDB says should be moving; Stats trims
//! streams and reports their gauges; Fallback sends a message's fallback when it did not
//! reach the person in time; Scheduler queues a scheduled send (`sendAt`) when it is due.
//! Fallback and Scheduler are each a [`due::DueTimer`] over their own [`due::DueWork`].
//!
//! # Layout
//!
//! - [`supervisor`]: starts the children, restarts one that fails, stops them in order.
//! - [`router`]: RouterActor, the group commit of new requests.
//! - [`stream_consumer`]: StreamConsumer, one per channel and stream shard, reading its
//!   stream's group.
//! - [`sender`]: SenderActor, one per channel, its stages (`sender/stages.rs`) and its
//!   pure decision with table tests (`sender/decision.rs`).
//! - [`receipts`]: ReceiptActor, providers' delivery receipts in batches.
//! - [`log_indexer`]: LogIndexer, `log_stream` into Elasticsearch.
//! - [`event_fanout`]: EventFanout, `log_stream` to the live status subscribers (SSE, WebSocket).
//! - [`reconciler`]: Reconciler, makes search agree with MongoDB for recent records.
//! - [`due`]: DueTimer, the one timer for work MongoDB keeps due times of (oldest first,
//!   in batches); [`walk`]: a range of due times read one slice a look, the slice's
//!   width adapting to what it holds (pure).
//! - [`fallback`]: FallbackActor, a message's fallback on another channel, on time.
//! - [`scheduler`]: SchedulerActor, a scheduled send onto its stream when its time comes.
//! - [`sweeper`]: OutboxSweeper, the outbox re-queue.
//! - [`stats`]: StatsActor, stream trimming and gauges.
//! - [`audit`]: AuditActor, security events into their own index.
//! - [`shards`]: the names of each channel's stream shards and lanes, and which one a
//!   record goes to; [`lanes`]: the lane order and the round-robin by tenant (pure).
//! - [`domain`]: pure data and rules — channels, validation, records, outcomes, log
//!   events ([`domain::EventStatus`]).
//! - [`ports`]: the traits the actors need (`Store`, `Queue`, `SearchSink`, `Provider`) and
//!   [`ports::DependencyError`] with its typed kinds.
//! - [`testing`]: in-memory ports with scripted failures and recorded calls (test doubles).
//! - [`trace_context`]: the W3C `traceparent` a message carries from its request to its
//!   provider call and receipt, through hooks the edge installs when traces are exported.
//! - [`health`]: per-provider circuit breaker and token bucket, pure over an explicit `now`.
//! - [`routing`]: a channel's providers (each with its health and weight) and the pure
//!   choice of the order to try them in (`failover` or `weighted`).
//! - [`retry`]: the per-message retry policy; [`backoff`]: the one backoff mechanism and
//!   `retry_until`; [`batch`]: the batch limits (items, bytes, time).
//! - [`adaptive`]: the AIMD limit on the delivery side's store calls (pure rule, tested by
//!   tables, and the shared mechanism); [`limited_store`]: the `Store` that applies it.

pub mod adaptive;
pub mod audit;
pub mod backoff;
pub mod batch;
pub mod call;
pub mod domain;
pub mod due;
pub mod event_fanout;
pub mod fallback;
pub mod health;
pub mod lanes;
pub mod limited_store;
pub mod log_indexer;
pub mod ports;
pub mod receipts;
pub mod reconciler;
pub mod retry;
pub mod router;
pub mod routing;
pub mod scheduler;
pub mod sender;
pub mod shards;
pub mod stats;
pub mod stream_consumer;
pub mod supervisor;
pub mod sweeper;
pub mod testing;
pub mod trace_context;
pub mod walk;

pub use ractor;

/// Whether this build honours the fault suite's markers (the `fault-injection` feature, which
/// only test builds enable). The service refuses `FAULT_INJECTION=true` when it is `false`.
pub const FAULT_INJECTION_BUILT: bool = cfg!(feature = "fault-injection");
