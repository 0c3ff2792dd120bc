//! The actor system of the communication aggregator.
//!
//! ```text
//!                        Supervisor
//!    ┌──────────┬────────────┼──────────────┬──────────────┬──────────┬────────┐
//!  Router   StreamConsumer×3  Sender×3   LogIndexer   OutboxSweeper  Receipts  Stats
//! ```
//! `domain` and `retry` are pure; `ports` names what the actors need from MongoDB, Redis,
//! Elasticsearch and the providers, which the root crate implements.

pub mod backoff;
pub mod batch;
pub mod call;
pub mod domain;
pub mod health;
pub mod log_indexer;
pub mod ports;
pub mod receipts;
pub mod retry;
pub mod router;
pub mod sender;
pub mod stats;
pub mod stream_consumer;
pub mod supervisor;
pub mod sweeper;

pub use ractor;
