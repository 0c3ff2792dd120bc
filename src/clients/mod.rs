//! Clients for the servers: MongoDB (the source of truth), Redis (streams), Elasticsearch.
pub mod elastic;
pub mod mongo;
pub mod redis_queue;
