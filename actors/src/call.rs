//! Typed calls into a registered actor, for the edges (the HTTP layer): find the actor by
//! its registered name (after a restart its `ActorRef` changes, so none is kept), ask,
//! wait up to a timeout, and say in a type why no answer came. Callers never see ractor's
//! `CallResult` or `MessagingErr`.

use ractor::rpc::CallResult;
use ractor::{ActorRef, Message, RpcReplyPort};
use std::time::Duration;

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
