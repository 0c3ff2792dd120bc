//! Typed calls into a registered actor, for the edges (the HTTP layer): find the actor by
//! its registered name (after a restart its `ActorRef` changes, so none is kept), ask,
//! wait up to a timeout, and say in a type why no answer came. Callers never see ractor's
//! `CallResult` or `MessagingErr`.
//!
//! [`call_registered_until`] adds a [`Ticket`] for calls whose answer must be the truth:
//! when the caller stops waiting at its deadline, the actor learns it, so it never acts on
//! a request whose caller was already told "no".

use ractor::rpc::CallResult;
use ractor::{ActorRef, Message, RpcReplyPort};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const WAITING: u8 = 0;
const COMMITTED: u8 = 1;
const ABANDONED: u8 = 2;

/// Shared by a caller that may stop waiting and the actor that answers it: exactly one of
/// "the actor commits to answering" ([`Ticket::commit`]) and "the caller gives up"
/// ([`Ticket::abandon`]) happens, whatever the timing.
#[derive(Debug, Clone, Default)]
pub struct Ticket(Arc<AtomicU8>);

impl Ticket {
    pub fn new() -> Ticket {
        Ticket::default()
    }

    /// The actor will answer now; `false` if the caller has given up already.
    pub fn commit(&self) -> bool {
        let won = self
            .0
            .compare_exchange(WAITING, COMMITTED, Ordering::SeqCst, Ordering::SeqCst);
        matches!(won, Ok(_) | Err(COMMITTED))
    }

    /// Nobody will wait for an answer any more (the caller's deadline passed); `false` if
    /// the actor committed first, and its answer is on the way.
    pub fn abandon(&self) -> bool {
        let won = self
            .0
            .compare_exchange(WAITING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst);
        matches!(won, Ok(_) | Err(ABANDONED))
    }

    pub fn is_abandoned(&self) -> bool {
        self.0.load(Ordering::SeqCst) == ABANDONED
    }
}

/// Ask the actor registered as `name` and wait until `deadline` at most. At the deadline
/// the ticket is abandoned (`TimedOut`: the actor will not act on the request) unless the
/// actor has committed to its answer, which is then awaited (it is being sent).
pub async fn call_registered_until<M, T, E>(
    name: &'static str,
    ask: impl FnOnce(RpcReplyPort<Result<T, E>>, Ticket) -> M,
    deadline: Instant,
) -> Result<T, CallError<E>>
where
    M: Message,
    T: Send + 'static,
    E: Send + 'static,
{
    let actor = ActorRef::<M>::where_is(name.to_string()).ok_or(CallError::NotRunning(name))?;
    let ticket = Ticket::new();
    let (tx, rx) = ractor::concurrency::oneshot();
    if actor.cast(ask(tx.into(), ticket.clone())).is_err() {
        return Err(CallError::Stopped(name));
    }
    answer_until(name, rx, ticket, deadline).await
}

/// [`call_registered_until`] for many requests in one message: `ask` gets each request
/// with its reply port and ticket; each is answered (or times out at `deadline`) on its
/// own. `Err` when the message could not be delivered at all (no request was seen).
pub async fn call_registered_many_until<M, R, T, E>(
    name: &'static str,
    requests: Vec<R>,
    ask: impl FnOnce(Vec<(R, RpcReplyPort<Result<T, E>>, Ticket)>) -> M,
    deadline: Instant,
) -> Result<Vec<Result<T, CallError<E>>>, CallError<E>>
where
    M: Message,
    T: Send + 'static,
    E: Send + 'static,
{
    let actor = ActorRef::<M>::where_is(name.to_string()).ok_or(CallError::NotRunning(name))?;
    let mut asked = Vec::with_capacity(requests.len());
    let mut waits = Vec::with_capacity(requests.len());
    for r in requests {
        let ticket = Ticket::new();
        let (tx, rx) = ractor::concurrency::oneshot();
        asked.push((r, tx.into(), ticket.clone()));
        waits.push(answer_until(name, rx, ticket, deadline));
    }
    if actor.cast(ask(asked)).is_err() {
        return Err(CallError::Stopped(name));
    }
    Ok(futures::future::join_all(waits).await)
}

/// The answer on `rx`, or `TimedOut` at `deadline` unless the actor committed first.
async fn answer_until<T, E>(
    name: &'static str,
    mut rx: ractor::concurrency::OneshotReceiver<Result<T, E>>,
    ticket: Ticket,
    deadline: Instant,
) -> Result<T, CallError<E>> {
    let answer = match tokio::time::timeout_at(deadline, &mut rx).await {
        Ok(answer) => answer,
        Err(_) if ticket.abandon() => return Err(CallError::TimedOut(name)),
        Err(_) => rx.await,
    };
    match answer {
        Ok(answer) => answer.map_err(CallError::Refused),
        Err(_) => {
            ticket.abandon();
            Err(CallError::Stopped(name))
        }
    }
}

/// Why a call brought no answer, or the actor's own refusal (`Refused`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError<E> {
    /// No actor is registered under the name: it is restarting. It never saw the request.
    #[error("the {0} actor is not running (it is restarting)")]
    NotRunning(&'static str),
    /// No answer within the timeout: the actor may still act on the request.
    #[error("the {0} actor did not answer in time")]
    TimedOut(&'static str),
    /// The actor stopped before it answered (or before it took the request).
    #[error("the {0} actor stopped before answering")]
    Stopped(&'static str),
    /// The actor answered with an error.
    #[error(transparent)]
    Refused(E),
}

/// Ask the actor registered as `name` with the message `ask` builds around the reply port.
pub async fn call_registered<M, T, E>(
    name: &'static str,
    ask: impl FnOnce(RpcReplyPort<Result<T, E>>) -> M,
    timeout: Duration,
) -> Result<T, CallError<E>>
where
    M: Message,
    T: Send + 'static,
    E: Send + 'static,
{
    let actor = ActorRef::<M>::where_is(name.to_string()).ok_or(CallError::NotRunning(name))?;
    match actor.call(ask, Some(timeout)).await {
        Ok(CallResult::Success(answer)) => answer.map_err(CallError::Refused),
        Ok(CallResult::Timeout) => Err(CallError::TimedOut(name)),
        Ok(CallResult::SenderError) | Err(_) => Err(CallError::Stopped(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};

    struct Echo;

    enum EchoMsg {
        Ask(u32, RpcReplyPort<Result<u32, String>>),
    }

    impl Actor for Echo {
        type Msg = EchoMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            msg: Self::Msg,
            _state: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            let EchoMsg::Ask(n, reply) = msg;
            match n {
                0 => drop(reply),
                1 => tokio::time::sleep(Duration::from_millis(200)).await,
                2 => {
                    let _ = reply.send(Err("no".into()));
                }
                n => {
                    let _ = reply.send(Ok(n));
                }
            }
            Ok(())
        }
    }

    async fn ask(n: u32) -> Result<u32, CallError<String>> {
        call_registered(
            "call-test-echo",
            |r| EchoMsg::Ask(n, r),
            Duration::from_millis(50),
        )
        .await
    }

    #[test]
    fn a_ticket_is_either_committed_or_abandoned() {
        let t = Ticket::new();
        assert!(
            t.commit() && t.commit(),
            "committing twice is still committed"
        );
        assert!(!t.abandon() && !t.is_abandoned());
        let t = Ticket::new();
        assert!(t.abandon() && t.abandon() && t.is_abandoned());
        assert!(!t.commit());
    }

    struct Slow;

    enum SlowMsg {
        /// Commit after `commit_after`, answer `answer_after` later.
        Ask(
            Duration,
            Duration,
            RpcReplyPort<Result<u32, String>>,
            Ticket,
        ),
    }

    impl Actor for Slow {
        type Msg = SlowMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<SlowMsg>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<SlowMsg>,
            msg: SlowMsg,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            let SlowMsg::Ask(commit_after, answer_after, reply, ticket) = msg;
            tokio::spawn(async move {
                tokio::time::sleep(commit_after).await;
                if ticket.commit() {
                    tokio::time::sleep(answer_after).await;
                    let _ = reply.send(Ok(1));
                }
            });
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_call_abandons_unless_the_actor_committed_first() {
        let (actor, handle) = Actor::spawn(Some("call-test-slow".into()), Slow, ())
            .await
            .unwrap();
        let ms = Duration::from_millis;
        let ask = |commit, answer| {
            call_registered_until(
                "call-test-slow",
                move |r, t| SlowMsg::Ask(ms(commit), ms(answer), r, t),
                Instant::now() + ms(100),
            )
        };
        assert_eq!(ask(10, 0).await, Ok(1));
        assert_eq!(
            ask(200, 0).await,
            Err(CallError::TimedOut("call-test-slow"))
        );
        // Committed just before the deadline: the answer is awaited past it.
        assert_eq!(ask(90, 50).await, Ok(1));
        actor.stop(None);
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn every_way_a_call_ends_has_its_own_variant() {
        assert_eq!(ask(7).await, Err(CallError::NotRunning("call-test-echo")));
        let (actor, handle) = Actor::spawn(Some("call-test-echo".into()), Echo, ())
            .await
            .unwrap();
        assert_eq!(ask(7).await, Ok(7));
        assert_eq!(ask(2).await, Err(CallError::Refused("no".into())));
        assert_eq!(ask(0).await, Err(CallError::Stopped("call-test-echo")));
        assert_eq!(ask(1).await, Err(CallError::TimedOut("call-test-echo")));
        actor.stop(None);
        handle.await.unwrap();
    }
}
