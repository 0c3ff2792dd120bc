//! Supervisor: starts every actor, restarts one that fails, and stops them all in order.
//!
//! Owns: the child specifications (how to start each child) and the restart history.
//! Talks to it: the wiring's `app::run` (`Shutdown`), ractor's supervision events from its
//! children.
//! Talks to: its children, only to start and stop them.
//! On a child's failure: the child is restarted alone, after a backoff (the crate's
//! [`Backoff`], without jitter) that doubles with each recent restart, as long as fewer than `max_restarts` happened within `window`;
//! past that it stops itself with the reason (escalation: the process exits non-zero and
//! its own supervisor, systemd or the orchestrator, takes over). Children keep no
//! references to one another: they look peers up by name when they need them, so a
//! restarted peer is found under its old name.
//! Shutdown goes by stages (`StopStage`, one per stage, each within its own deadline): the
//! wiring names the children of each stage in groups, a group's children are stopped
//! together and the groups one after another; whatever is still running when the stage's
//! deadline passes is killed, so the next stage always runs (the LogIndexer and the
//! ReceiptActor flush even when the senders used up theirs). `Shutdown` then stops what is
//! left, in the reverse of the start order, and the supervisor itself.

use crate::backoff::Backoff;
use futures::future::BoxFuture;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type SpawnFn =
    Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, SpawnErr>> + Send + Sync>;

#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub spawn: SpawnFn,
}

#[derive(Clone)]
pub struct SupervisorArgs {
    /// In start order.
    pub children: Vec<ChildSpec>,
    pub max_restarts: usize,
    pub window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest wait for one child to stop on shutdown.
    pub stop_timeout: Duration,
}

pub enum SupervisorMsg {
    Restart(String),
    /// Stop these children (group after group, each group's at once) within the deadline,
    /// then kill what still runs; no child is restarted any more. Answers the names killed.
    StopStage(Vec<Vec<String>>, Duration, RpcReplyPort<Vec<String>>),
    Shutdown(RpcReplyPort<()>),
}

pub struct SupervisorState {
    args: SupervisorArgs,
    running: HashMap<ActorId, String>,
    cells: HashMap<String, ActorCell>,
    restarts: VecDeque<Instant>,
    shutting_down: bool,
}

pub struct Supervisor;

impl Supervisor {
    /// The backoff before the `n`-th restart within the window (1-based).
    pub fn backoff(args: &SupervisorArgs, n: usize) -> Duration {
        Backoff::exponential(args.backoff_base, args.backoff_max)
            .ceiling(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

async fn start_child(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    spec: &ChildSpec,
) -> Result<(), SpawnErr> {
    let cell = (spec.spawn)(myself.get_cell()).await?;
    state.running.insert(cell.get_id(), spec.name.clone());
    state.cells.insert(spec.name.clone(), cell);
    Ok(())
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SupervisorState {
            args: args.clone(),
            running: HashMap::new(),
            cells: HashMap::new(),
            restarts: VecDeque::new(),
            shutting_down: false,
        };
        for spec in &args.children {
            start_child(&myself, &mut state, spec).await?;
            tracing::info!(actor = %spec.name, "started");
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(name) => {
                if state.shutting_down {
                    return Ok(());
                }
                let Some(spec) = state.args.children.iter().find(|c| c.name == name).cloned()
                else {
                    return Ok(());
                };
                match start_child(&myself, state, &spec).await {
                    Ok(()) => tracing::info!(actor = %name, "restarted"),
                    Err(err) => {
                        tracing::error!(actor = %name, error = %err, "restart failed");
                        child_down(&myself, state, name, &err.to_string());
                    }
                }
            }
            SupervisorMsg::StopStage(groups, within, reply) => {
                state.shutting_down = true;
                let killed = stop_stage(state, groups, within).await;
                let _ = reply.send(killed);
            }
            SupervisorMsg::Shutdown(reply) => {
                state.shutting_down = true;
                let order: Vec<String> = state
                    .args
                    .children
                    .iter()
                    .rev()
                    .map(|c| c.name.clone())
                    .collect();
                for name in order {
                    if let Some(cell) = state.cells.remove(&name) {
                        tracing::info!(actor = %name, "stopping");
                        let _ = cell
                            .stop_and_wait(Some("shutdown".into()), Some(state.args.stop_timeout))
                            .await;
                    }
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped: {}", reason.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        let Some(name) = state.running.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.cells.get(&name).map(|c| c.get_id()) == Some(cell.get_id()) {
            state.cells.remove(&name);
        }
        if state.shutting_down {
            return Ok(());
        }
        child_down(&myself, state, name, &why);
        Ok(())
    }
}

/// Stop the groups in order within `within`; kill (without its `post_stop`) every child
/// of them still running at the deadline, and name those.
async fn stop_stage(
    state: &mut SupervisorState,
    groups: Vec<Vec<String>>,
    within: Duration,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut killed = Vec::new();
    for group in groups {
        let cells: Vec<(String, ActorCell)> = group
            .into_iter()
            .filter_map(|name| state.cells.remove(&name).map(|c| (name, c)))
            .collect();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let stops = cells.iter().map(|(name, cell)| {
            tracing::info!(actor = %name, "stopping");
            cell.stop_and_wait(Some("shutdown".into()), Some(left))
        });
        let results = futures::future::join_all(stops).await;
        for ((name, cell), result) in cells.into_iter().zip(results) {
            if result.is_err() {
                tracing::warn!(actor = %name, "not stopped within its stage's deadline; killed");
                cell.kill();
                killed.push(name);
            }
        }
    }
    killed
}

fn child_down(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    name: String,
    why: &str,
) {
    metrics::counter!("actor_restarts_total", "actor" => name.clone()).increment(1);
    let now = Instant::now();
    state.restarts.push_back(now);
    while state
        .restarts
        .front()
        .is_some_and(|t| now.duration_since(*t) > state.args.window)
    {
        state.restarts.pop_front();
    }
    let n = state.restarts.len();
    if n > state.args.max_restarts {
        tracing::error!(actor = %name, why, restarts = n, window = ?state.args.window,
            "restart intensity exceeded; escalating");
        myself.stop(Some(format!(
            "restart intensity exceeded: {n} restarts within {:?}, last {name} {why}",
            state.args.window
        )));
        return;
    }
    let backoff = Supervisor::backoff(&state.args, n);
    tracing::warn!(actor = %name, why, ?backoff, "child down; restarting");
    myself.send_after(backoff, move || SupervisorMsg::Restart(name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    struct Flaky;

    impl Actor for Flaky {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            Err("boom".into())
        }
    }

    fn args(name: &str, max_restarts: usize) -> SupervisorArgs {
        let n = name.to_string();
        let spawn: SpawnFn = Arc::new(move |sup| {
            let n = n.clone();
            async move {
                let (r, _) = Actor::spawn_linked(Some(n), Flaky, (), sup).await?;
                Ok(r.get_cell())
            }
            .boxed()
        });
        SupervisorArgs {
            children: vec![ChildSpec {
                name: name.to_string(),
                spawn,
            }],
            max_restarts,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            stop_timeout: Duration::from_secs(1),
        }
    }

    async fn child(name: &str) -> ActorRef<()> {
        for _ in 0..200 {
            if let Some(c) = ActorRef::<()>::where_is(name.to_string()) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{name} was not (re)started");
    }

    #[tokio::test]
    async fn a_failed_child_is_restarted_under_its_name() {
        let (sup, _h) = Actor::spawn(None, Supervisor, args("flaky-a", 5))
            .await
            .unwrap();
        let first = child("flaky-a").await;
        first.send_message(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = child("flaky-a").await;
        assert_ne!(first.get_id(), second.get_id(), "a new instance");
        assert_eq!(sup.get_status(), ractor::ActorStatus::Running);
        sup.stop(None);
    }

    #[tokio::test]
    async fn too_many_restarts_escalate_by_stopping_the_supervisor() {
        let (sup, handle) = Actor::spawn(None, Supervisor, args("flaky-b", 2))
            .await
            .unwrap();
        for _ in 0..3 {
            child("flaky-b").await.send_message(()).unwrap();
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        tokio::time::timeout(Duration::from_secs(2), handle)
            .await
            .expect("the supervisor gave up")
            .unwrap();
        assert_eq!(sup.get_status(), ractor::ActorStatus::Stopped);
    }

    /// Blocks in its first message for an hour; its `post_stop` counts.
    struct Stuck;

    impl Actor for Stuck {
        type Msg = ();
        type State = ();
        type Arguments = Arc<std::sync::atomic::AtomicUsize>;

        async fn pre_start(
            &self,
            me: ActorRef<()>,
            _: Self::Arguments,
        ) -> Result<(), ActorProcessingErr> {
            me.send_message(())?;
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    }

    /// A quick child: stops at once, and counts its `post_stop` (its flush).
    struct Quick;

    impl Actor for Quick {
        type Msg = ();
        type State = Arc<std::sync::atomic::AtomicUsize>;
        type Arguments = Arc<std::sync::atomic::AtomicUsize>;

        async fn pre_start(
            &self,
            _: ActorRef<()>,
            n: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(n)
        }

        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn post_stop(
            &self,
            _: ActorRef<()>,
            n: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    fn child_spec<A>(name: &str, actor: fn() -> A, args: A::Arguments) -> ChildSpec
    where
        A: Actor<Msg = ()>,
        A::Arguments: Clone + Sync,
    {
        let n = name.to_string();
        let spawn: SpawnFn = Arc::new(move |sup| {
            let (n, args) = (n.clone(), args.clone());
            async move {
                let (r, _) = Actor::spawn_linked(Some(n), actor(), args, sup).await?;
                Ok(r.get_cell())
            }
            .boxed()
        });
        ChildSpec {
            name: name.to_string(),
            spawn,
        }
    }

    /// A stage whose child never stops is cut at its deadline (the child killed), and the
    /// next stage still stops its children, with their `post_stop`.
    #[tokio::test]
    async fn a_stage_past_its_deadline_is_cut_and_the_next_stage_still_runs() {
        let flushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut a = args("unused-stage", 1);
        a.children = vec![
            child_spec("quick-stage", || Quick, flushed.clone()),
            child_spec("stuck-stage", || Stuck, flushed.clone()),
        ];
        let (sup, _h) = Actor::spawn(None, Supervisor, a).await.unwrap();
        let started = Instant::now();
        let stage = |name: &str, within| {
            let groups = vec![vec![name.to_string()]];
            sup.call(move |r| SupervisorMsg::StopStage(groups, within, r), None)
        };
        let killed = stage("stuck-stage", Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(killed.unwrap(), ["stuck-stage"]);
        assert!(started.elapsed() < Duration::from_secs(2));
        let killed = stage("quick-stage", Duration::from_secs(1)).await.unwrap();
        assert!(killed.unwrap().is_empty());
        assert_eq!(flushed.load(std::sync::atomic::Ordering::SeqCst), 1);
        sup.stop(None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let a = args("x", 1);
        assert_eq!(Supervisor::backoff(&a, 1), Duration::from_millis(10));
        assert_eq!(Supervisor::backoff(&a, 2), Duration::from_millis(20));
        assert_eq!(Supervisor::backoff(&a, 5), Duration::from_millis(40));
    }
}
