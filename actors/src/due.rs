//! DueTimer: the one timer behind work that comes due at times MongoDB keeps (a message's
//! fallback at `fallbackAt`, a scheduled send at `sendAt`). Each look asks the work to
//! handle what is due, oldest first, at most a batch; a full batch means more may be due,
//! so the next look comes at once, else after the interval. No record is polled: the work
//! reads an indexed range of due times.
//!
//! Owns: nothing but its timer; MongoDB holds every due time, so the timer survives
//! restarts.
//! Talks to it: itself (`Tick`); the supervisor starts and stops it.
//! Talks to: its [`DueWork`] (the FallbackActor's and the SchedulerActor's looks).
//! On failure: nothing is in flight between looks. A look that fails (a store or router
//! error) is logged and counted (the work's `errors_metric`), and what it left is still
//! due at the next look; each work makes a look safe to repeat, and safe to run in two
//! processes at once.

use crate::ports::DependencyError;
use async_trait::async_trait;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::Duration;

/// Why a look did not finish; what it left is due again at the next.
#[derive(Debug, thiserror::Error)]
pub enum DueError {
    #[error(transparent)]
    Store(#[from] DependencyError),
    #[error("the router did not take the message: {0}")]
    Router(String),
}

/// Work that comes due: one look handles what is due now.
#[async_trait]
pub trait DueWork: Send + Sync + 'static {
    /// What it is, for the log.
    fn what(&self) -> &'static str;

    /// The counter of failed looks (e.g. `fallback_errors_total`).
    fn errors_metric(&self) -> &'static str;

    /// Handle what is due, oldest first, at most `batch`; answers how many were due (a
    /// full batch means more may be).
    async fn pass(&self, batch: usize) -> Result<usize, DueError>;
}

pub enum DueMsg {
    Tick,
}

#[derive(Clone)]
pub struct DueTimerArgs {
    pub work: Arc<dyn DueWork>,
    /// Time between looks while nothing more is due.
    pub interval: Duration,
    /// Most due items a look handles.
    pub batch: usize,
}

pub struct DueTimer;

/// When the next look comes: at once after a full batch, else after the interval.
pub fn next_look(handled: Result<usize, ()>, batch: usize, interval: Duration) -> Duration {
    match handled {
        Ok(n) if n >= batch.max(1) => Duration::ZERO,
        _ => interval,
    }
}

impl Actor for DueTimer {
    type Msg = DueMsg;
    type State = DueTimerArgs;
    type Arguments = DueTimerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DueTimerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_after(args.interval, || DueMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        a: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let handled = a.work.pass(a.batch).await.map_err(|e| {
            metrics::counter!(a.work.errors_metric()).increment(1);
            tracing::warn!(error = %e, what = a.work.what(), "due work not done; trying again next time");
        });
        myself.send_after(next_look(handled, a.batch, a.interval), || DueMsg::Tick);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_looks_again_at_once() {
        let i = Duration::from_secs(1);
        assert_eq!(next_look(Ok(10), 10, i), Duration::ZERO);
        assert_eq!(next_look(Ok(9), 10, i), i);
        assert_eq!(next_look(Ok(0), 10, i), i);
        assert_eq!(next_look(Err(()), 10, i), i);
        // A batch of 0 is taken as 1, so an empty look never spins.
        assert_eq!(next_look(Ok(0), 0, i), i);
    }
}
