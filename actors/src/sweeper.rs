//! OutboxSweeper: puts back on its stream every record MongoDB says should be moving but
//! may not be: never appended (a crash or a Redis outage between the two writes), lost
//! (Redis restarted without its data), due for a retry, or claimed by a worker that died.
//!
//! Owns: nothing but its timer; MongoDB holds all the state (`nextAttemptAt`).
//! Talks to it: itself (`Tick`); the supervisor starts and stops it.
//! Talks to: MongoDB (`take_due`), Redis (XADD to `{type}_stream`).
//! On failure: records it took are due again after `recheck`, so a crash loses nothing; an
//! entry appended twice is harmless, since a worker claims a record before sending it.

use crate::domain::Channel;
use crate::ports::{Queue, Store};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "sweeper";

pub enum SweeperMsg {
    Tick,
}

#[derive(Clone)]
pub struct SweeperArgs {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    pub interval: Duration,
    /// How long a swept record is left alone before it may be swept again.
    pub recheck: Duration,
    pub batch: usize,
    pub group: String,
}

pub struct OutboxSweeper;

impl Actor for OutboxSweeper {
    type Msg = SweeperMsg;
    type State = SweeperArgs;
    type Arguments = SweeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SweeperArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_after(args.interval, || SweeperMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        a: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let mut next = a.interval;
        // Only channels whose stream has no unread backlog: a backlog (say, behind an open
        // breaker) will be read anyway, and re-queueing into it would only grow it.
        let mut idle = Vec::new();
        for ch in Channel::ALL {
            match a.queue.stream_lag(ch.stream(), &a.group).await {
                Ok(0) => idle.push(ch),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "sweep skipped: Redis unavailable");
                    myself.send_after(a.interval, || SweeperMsg::Tick);
                    return Ok(());
                }
            }
        }
        match a
            .store
            .take_due(Utc::now(), a.recheck, a.batch, &idle)
            .await
        {
            Ok(records) if !records.is_empty() => {
                let entries: Vec<(&str, Vec<(&str, String)>)> = records
                    .iter()
                    .map(|r| (r.channel.stream(), r.stream_fields()))
                    .collect();
                match a.queue.append(&entries).await {
                    Ok(_) => {
                        tracing::info!(n = records.len(), "outbox sweep re-queued records");
                        metrics::counter!("outbox_requeued_total").increment(records.len() as u64);
                        if records.len() == a.batch {
                            next = Duration::ZERO;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, n = records.len(), "outbox sweep could not queue; will try after recheck")
                    }
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "outbox sweep could not read the store"),
        }
        myself.send_after(next, || SweeperMsg::Tick);
        Ok(())
    }
}
