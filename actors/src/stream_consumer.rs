//! StreamConsumer (one per channel): reads `{type}_stream` through a Redis consumer group
//! and hands batches to the channel's SenderActor.
//!
//! Owns: a dedicated Redis connection (its blocking reads hold no one else up) and its read
//! position: first its own pending entries (`0`), then new ones (`>`), with a periodic
//! XAUTOCLAIM of entries left idle by dead consumers.
//! Talks to it: itself (`Poll`); the supervisor starts and stops it.
//! Talks to: the SenderActor, looked up by name for every batch, so a restarted sender is
//! found and no stale reference is kept.
//! On failure: it acknowledges an entry only after the sender reported its outcome
//! recorded, so a crash leaves every unfinished entry pending in the group; the restarted
//! consumer (same name) reads them again first.

use crate::domain::Channel;
use crate::ports::{DependencyError, Queue, ReadFrom};
use crate::sender::{self, SenderMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn name(channel: Channel) -> String {
    format!("consumer-{channel}")
}

pub enum ConsumerMsg {
    Poll,
}

#[derive(Clone)]
pub struct ConsumerArgs {
    pub channel: Channel,
    pub queue: Arc<dyn Queue>,
    pub group: String,
    pub consumer: String,
    pub count: usize,
    pub block: Duration,
    /// Entries idle this long in any consumer's pending list are taken over.
    pub claim_idle: Duration,
    /// Longest wait for the sender to answer a batch.
    pub deliver_timeout: Duration,
}

pub struct ConsumerState {
    args: ConsumerArgs,
    from: ReadFrom,
    last_autoclaim: Instant,
    backoff: Duration,
    group_ready: bool,
}

pub struct StreamConsumer;

impl Actor for StreamConsumer {
    type Msg = ConsumerMsg;
    type State = ConsumerState;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConsumerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(ConsumerMsg::Poll)?;
        Ok(ConsumerState {
            from: ReadFrom::OwnPending("0".into()),
            last_autoclaim: Instant::now(),
            backoff: Duration::ZERO,
            group_ready: false,
            args,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConsumerMsg::Poll => {
                if let Err(err) = poll_once(state).await {
                    metrics::counter!("stream_read_errors_total", "stream" => state.args.channel.stream())
                        .increment(1);
                    state.backoff = (state.backoff * 2)
                        .clamp(Duration::from_millis(100), Duration::from_secs(5));
                    tracing::warn!(error = %err, stream = state.args.channel.stream(), backoff = ?state.backoff, "stream read failed");
                    if err.message.contains("NOGROUP") {
                        // The stream or group vanished (Redis restarted empty): make it again;
                        // the outbox sweep re-queues what the lost entries carried.
                        state.group_ready = false;
                    }
                    state.from = ReadFrom::OwnPending("0".into());
                    myself.send_after(state.backoff, || ConsumerMsg::Poll);
                } else {
                    state.backoff = Duration::ZERO;
                    myself.send_message(ConsumerMsg::Poll)?;
                }
            }
        }
        Ok(())
    }
}

async fn poll_once(state: &mut ConsumerState) -> Result<(), DependencyError> {
    let a = &state.args;
    let stream = a.channel.stream();
    if !state.group_ready {
        a.queue.ensure_group(stream, &a.group).await?;
        state.group_ready = true;
    }
    let entries = if state.last_autoclaim.elapsed() >= a.claim_idle / 2 {
        state.last_autoclaim = Instant::now();
        let e = a
            .queue
            .autoclaim(stream, &a.group, &a.consumer, a.claim_idle, a.count)
            .await?;
        if !e.is_empty() {
            tracing::info!(stream, n = e.len(), "took over idle entries");
            metrics::counter!("stream_autoclaimed_total", "stream" => stream)
                .increment(e.len() as u64);
        }
        e
    } else {
        let e = a
            .queue
            .read_group(
                stream,
                &a.group,
                &a.consumer,
                state.from.clone(),
                a.count,
                a.block,
            )
            .await?;
        if let ReadFrom::OwnPending(_) = state.from {
            // Page through our pending list once, then switch to new entries.
            state.from = match e.last() {
                Some(last) => ReadFrom::OwnPending(last.id.clone()),
                None => ReadFrom::New,
            };
        }
        e
    };
    if entries.is_empty() {
        return Ok(());
    }
    let Some(sender) = ActorRef::<SenderMsg>::where_is(sender::name(a.channel)) else {
        // The sender is being restarted; read these again from our pending list.
        state.from = ReadFrom::OwnPending("0".into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Ok(());
    };
    let n = entries.len();
    let report = match sender
        .call(
            |reply| SenderMsg::Deliver(entries, reply),
            Some(a.deliver_timeout),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        other => {
            let why = match other {
                Ok(ractor::rpc::CallResult::Timeout) => "timed out".to_string(),
                Ok(ractor::rpc::CallResult::SenderError) => "sender stopped".to_string(),
                Err(e) => e.to_string(),
                Ok(_) => unreachable!(),
            };
            tracing::warn!(
                stream,
                n,
                why,
                "sender gave no answer; entries stay pending"
            );
            state.from = ReadFrom::OwnPending("0".into());
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
    };
    if !report.ack.is_empty() {
        a.queue.ack(stream, &a.group, &report.ack).await?;
    }
    if report.retry_soon {
        state.from = ReadFrom::OwnPending("0".into());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
