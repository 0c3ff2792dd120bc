//! Clients for the servers: MongoDB (the source of truth; its indexes, and whether they
//! exist yet, in `indexes`), Redis (one server or a cluster, `redis_conn`; streams, and the leases that make one worker the only
//! one to send a record, and the start-up check of the server in `redis_checks`),
//! Elasticsearch; `parked` keeps the delivery receipts that came before their records
//! (MongoDB); `reconcile` reads both stores for the Reconciler; `scheduled` the scheduled
//! sends due and the cancel of a message; `suppressions` is the tenants' opt-out list
//! (MongoDB); `dead_letters` the records failed for good, listed and replayed; `batches`
//! the members of each bulk send.
pub mod batches;
pub mod dead_letters;
pub mod elastic;
pub mod fallbacks;
pub mod indexes;
pub mod lease;
pub mod limiter;
pub mod mongo;
pub mod parked;
pub mod reconcile;
pub mod redis_checks;
pub mod redis_conn;
pub mod redis_queue;
pub mod scheduled;
pub mod suppressions;
pub mod sweep;
pub mod templates;
