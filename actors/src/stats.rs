//! StatsActor: every few seconds, trims what the consumer group has delivered and
//! acknowledged from every stream (the three work streams, each of their shards, and `log_stream`), then reports
//! their length and pending count and the length of the dead-letter streams as Prometheus
//! gauges (`stream_length`, `stream_pending`, `dead_letter_length`).
//!
//! Owns: nothing but its timer. Talks to it: itself (`Tick`). Talks to: Redis (XLEN,
//! XPENDING, one pipeline per stream). On failure: nothing is in flight; the gauges keep
//! their last values until the restarted actor's next tick.

use crate::domain::{LOG_DEAD_LETTER_STREAM, LOG_STREAM};
use crate::ports::Queue;
use crate::shards::StreamShards;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "stats";

pub enum StatsMsg {
    Tick,
}

#[derive(Clone)]
pub struct StatsArgs {
    pub queue: Arc<dyn Queue>,
    pub group: String,
    pub interval: Duration,
    pub shards: StreamShards,
}

pub struct StatsActor;

impl Actor for StatsActor {
    type Msg = StatsMsg;
    type State = StatsArgs;
    type Arguments = StatsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StatsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(StatsMsg::Tick)?;
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        a: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let streams = a.shards.all().into_iter().chain([LOG_STREAM]);
        for s in streams {
            // Entries delivered and acknowledged are of no more use in Redis (MongoDB and
            // Elasticsearch have them): trimming keeps Redis memory bounded.
            if let Ok(n) = a.queue.trim_acked(s, &a.group).await {
                if n > 0 {
                    metrics::counter!("stream_trimmed_total", "stream" => s).increment(n);
                }
            }
            match a.queue.stream_stats(s, &a.group).await {
                Ok((len, pending)) => {
                    metrics::gauge!("stream_length", "stream" => s).set(len as f64);
                    metrics::gauge!("stream_pending", "stream" => s).set(pending as f64);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "stream stats unavailable");
                    break;
                }
            }
        }
        let dlqs = a
            .shards
            .all()
            .into_iter()
            .map(|s| format!("{s}:dlq"))
            .chain([LOG_DEAD_LETTER_STREAM.to_string()]);
        for d in dlqs {
            if let Ok((len, _)) = a.queue.stream_stats(&d, &a.group).await {
                metrics::gauge!("dead_letter_length", "stream" => d).set(len as f64);
            }
        }
        myself.send_after(a.interval, || StatsMsg::Tick);
        Ok(())
    }
}
