//! The communication aggregator: accepts email, SMS and WhatsApp messages over HTTP,
//! stores them in MongoDB, queues them on Redis streams and sends them through the
//! providers, with their history indexed in Elasticsearch.
//!
//! # Layout
//!
//! The actors, the running system, live in the `actors` crate, which knows no driver:
//! it declares what it needs from the outside (`actors::ports`: `Store`, `Queue`,
//! `SearchSink`, `Provider`) and this crate, the edges, implements it.
//!
//! - [`app`]: the wiring. [`app::run`]`(config, shutdown)` builds the clients, starts the
//!   actors under one supervisor and the HTTP server, and stops them in order.
//! - [`config`]: `config.toml` and the environment (one table of variables), validated at
//!   start-up.
//! - [`http`]: the warp routes of the API, operations (`/healthz`, `/metrics`) included;
//!   [`callbacks`] (provider delivery receipts), [`search`] (the search endpoint),
//!   [`auth`] (API keys and the per-key rate limit), [`tenants`] (each tenant's senders,
//!   countries and limits), [`limits`] (the tenants' limits in Redis: rate, quotas,
//!   distinct recipients, the per-recipient cap).
//! - [`clients`]: MongoDB (the source of truth), Redis (one server or a Redis Cluster;
//!   streams, and the leases that let one worker send a record), Elasticsearch.
//! - [`providers`]: Twilio, WhatsApp Cloud API and SMTP, and the pure classification of
//!   their answers (retry, give up, rate limited).
//! - `main.rs`: the binary; `bin/provider-sandbox/` (the providers' stand-in) and
//!   `bin/loadgen.rs` (the load tool).
//!
//! # The actor tree
//!
//! ```text
//! supervisor (restarts a dead child with backoff; gives up past a restart intensity)
//! ├── receipts           provider receipts, applied to MongoDB in batches
//! ├── log-indexer        the log stream into Elasticsearch, in bulk
//! ├── sender-{channel}   claims, calls the provider, records the outcome (one per channel)
//! ├── consumer-{channel}[-{shard}] reads its channel's stream (or one shard of it) for its sender
//! ├── router             accepted requests into MongoDB and onto the streams (group commit)
//! ├── stats              trims what the group acknowledged; stream gauges for /metrics
//! ├── sweeper            queues again what was stored but never reached a stream
//! └── event-fanout       reads log_stream once for the live status streams (SSE, WebSocket)
//! ```
//!
//! HTTP requests reach the router; nothing else in the HTTP layer talks to an actor.

pub mod app;
pub mod auth;
pub use http::callbacks;
pub mod clients;
pub mod config;
pub mod events;
pub mod http;
pub mod limits;
pub mod providers;
pub mod search;
pub mod templates;
pub mod tenants;

pub use app::{run, RunError};
pub use config::Config;
