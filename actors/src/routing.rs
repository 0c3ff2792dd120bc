//! A channel's providers and the choice among them, message by message (not an actor: the
//! channel's SenderActor holds it, shared with the channel's StreamConsumers and
//! `GET /api/v1/providers`, which ask it whether any provider may take a call).
//!
//! Each provider of the list has its own health (circuit breaker and token bucket, see
//! [`crate::health`]) and a weight. For each message, [`Routes::order`] says in what order
//! to try them, by the pure [`plan`]:
//! - `failover`: the providers whose breaker lets a call through, in list order;
//! - `weighted`: the same, except that the first is drawn by weight among them;
//! - a tenant with an order of its own: `failover` over that order.
//!
//! The sender calls the first; on a result worth failing over (`decision::fails_over`: a
//! retryable refusal, a timeout, a reset) it calls the next, within the same attempt. A
//! provider whose breaker is open is skipped at once; only when every breaker of the
//! channel is open does [`Routes::permit`] tell the consumer to stop reading.

use crate::health::{Permit, ProviderHealth};
use crate::ports::Provider;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How a channel spreads its messages over its providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The first healthy provider of the list takes every message.
    Failover,
    /// Messages split by weight among the healthy providers.
    Weighted,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Failover => "failover",
            Strategy::Weighted => "weighted",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        [Strategy::Failover, Strategy::Weighted]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// One provider of a channel.
pub struct Route {
    pub provider: Arc<dyn Provider>,
    pub health: Arc<ProviderHealth>,
    /// Its share under `weighted` (0: only ever a failover target); unused by `failover`.
    pub weight: u32,
}

/// A channel's providers, in order, and its strategy; and the tenants with an order of
/// their own.
pub struct Routes {
    strategy: Strategy,
    routes: Vec<Route>,
    /// Per tenant, the positions of the providers its messages go to, in its order
    /// (failed over in that order, whatever the channel's strategy).
    tenants: HashMap<String, Vec<usize>>,
    /// The weighted draws' source: seeded from the OS, or by a test for a split it can
    /// repeat. A std mutex: held for one draw, never across an await.
    rng: Mutex<StdRng>,
}

/// What [`plan`] knows of one provider.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub weight: u32,
    /// Its breaker lets a call through and no `Retry-After` pause holds it.
    pub ready: bool,
}

/// The order to try the providers in for one message (indices into the list): the ready
/// ones, in list order, except that `weighted` draws the first by weight among them (all
/// weights 0: list order). When none is ready, the first of the list alone: the call goes
/// out as it would with one provider, and its breaker hears how it went.
pub fn plan(strategy: Strategy, candidates: &[Candidate], rng: &mut impl Rng) -> Vec<usize> {
    let mut ready: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].ready)
        .collect();
    if ready.is_empty() {
        return vec![0];
    }
    let total: u64 = ready.iter().map(|&i| u64::from(candidates[i].weight)).sum();
    if strategy == Strategy::Weighted && total > 0 {
        let mut draw = rng.gen_range(0..total);
        let pos = ready
            .iter()
            .position(|&i| {
                let w = u64::from(candidates[i].weight);
                if draw < w {
                    return true;
                }
                draw -= w;
                false
            })
            .unwrap_or(0);
        let first = ready.remove(pos);
        ready.insert(0, first);
    }
    ready
}

/// The best of several breakers' answers: a call allowed anywhere, else a probe, else the
/// shortest wait.
fn best(permits: impl IntoIterator<Item = Permit>) -> Permit {
    let mut out: Option<Permit> = None;
    for p in permits {
        out = Some(match (out, p) {
            (_, Permit::Allowed) | (Some(Permit::Allowed), _) => Permit::Allowed,
            (_, Permit::Probe) | (Some(Permit::Probe), _) => Permit::Probe,
            (Some(Permit::Rejected(a)), Permit::Rejected(b)) => Permit::Rejected(a.min(b)),
            (None, r) => r,
        });
    }
    out.unwrap_or(Permit::Allowed)
}

impl Routes {
    /// `routes` must not be empty (the start-up checks refuse a channel without a provider).
    pub fn new(strategy: Strategy, routes: Vec<Route>) -> Routes {
        assert!(!routes.is_empty(), "a channel needs at least one provider");
        Routes {
            strategy,
            routes,
            tenants: HashMap::new(),
            rng: Mutex::new(StdRng::from_entropy()),
        }
    }

    /// These routes with their draws from `seed`: the same split every run (tests).
    pub fn with_seed(self, seed: u64) -> Routes {
        Routes {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            ..self
        }
    }

    /// `tenant`'s messages go to the providers at `positions` (of this list), in that
    /// order; positions out of the list are dropped, and an empty order is none.
    pub fn with_tenant_order(mut self, tenant: &str, positions: Vec<usize>) -> Routes {
        let positions: Vec<usize> = positions
            .into_iter()
            .filter(|&i| i < self.routes.len())
            .collect();
        if !positions.is_empty() {
            self.tenants.insert(tenant.to_string(), positions);
        }
        self
    }

    /// One provider alone.
    pub fn single(provider: Arc<dyn Provider>, health: Arc<ProviderHealth>) -> Routes {
        Routes::new(
            Strategy::Failover,
            vec![Route {
                provider,
                health,
                weight: 1,
            }],
        )
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn get(&self, i: usize) -> &Route {
        &self.routes[i]
    }

    pub fn all(&self) -> &[Route] {
        &self.routes
    }

    /// The position of the provider named `name`, if the channel has it.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.provider.name() == name)
    }

    /// May the channel's consumer read? Allowed while any provider's breaker is closed; a
    /// probe (one entry) while the best is a half-open one; a wait only when every
    /// provider's breaker is open. Takes no probe (the sender does, with its call).
    pub fn permit(&self) -> Permit {
        best(self.routes.iter().map(|r| r.health.peek()))
    }

    /// The order to try the providers in for one message of `tenant` (see [`plan`]): the
    /// tenant's own order, failed over, where it has one; else the channel's.
    pub fn order(&self, tenant: &str) -> Vec<usize> {
        let (strategy, positions) = match self.tenants.get(tenant) {
            Some(own) => (Strategy::Failover, own.clone()),
            None => (self.strategy, (0..self.routes.len()).collect()),
        };
        let candidates: Vec<Candidate> = positions
            .iter()
            .map(|&i| {
                let r = &self.routes[i];
                Candidate {
                    weight: r.weight,
                    ready: !matches!(r.health.peek(), Permit::Rejected(_))
                        && r.health.paused_for().is_none(),
                }
            })
            .collect();
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let order = plan(strategy, &candidates, &mut *rng);
        order.into_iter().map(|k| positions[k]).collect()
    }

    /// Each provider's health, with its place in the channel's routing.
    pub fn snapshot(&self) -> Vec<Value> {
        self.routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut v = r.health.snapshot();
                if let Some(o) = v.as_object_mut() {
                    o.insert("position".into(), json!(i + 1));
                    o.insert("weight".into(), json!(r.weight));
                    o.insert("strategy".into(), json!(self.strategy.as_str()));
                }
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::time::Duration;

    fn c(weight: u32, ready: bool) -> Candidate {
        Candidate { weight, ready }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(15)
    }

    /// (strategy, candidates) → the order, where it does not depend on the draw.
    #[test]
    fn failover_keeps_the_list_order_of_the_ready_ones() {
        use Strategy::*;
        let rows: [(&str, Strategy, Vec<Candidate>, Vec<usize>); 6] = [
            (
                "all ready",
                Failover,
                vec![c(1, true), c(1, true)],
                vec![0, 1],
            ),
            (
                "first open",
                Failover,
                vec![c(1, false), c(1, true)],
                vec![1],
            ),
            (
                "middle open",
                Failover,
                vec![c(1, true), c(1, false), c(1, true)],
                vec![0, 2],
            ),
            (
                "none ready: the first",
                Failover,
                vec![c(1, false), c(1, false)],
                vec![0],
            ),
            (
                "weighted, one ready",
                Weighted,
                vec![c(9, false), c(1, true)],
                vec![1],
            ),
            (
                "weighted, all weights 0",
                Weighted,
                vec![c(0, true), c(0, true)],
                vec![0, 1],
            ),
        ];
        for (name, strategy, candidates, want) in rows {
            assert_eq!(plan(strategy, &candidates, &mut rng()), want, "{name}");
        }
    }

    /// 3:1 over 100,000 draws: the first pick splits 75/25 (within a percent), the other
    /// ready provider always follows as the failover, a weight of 0 is never first.
    #[test]
    fn weighted_draws_the_first_by_weight_and_keeps_the_rest_as_failover() {
        let mut r = rng();
        let mut firsts = [0u32; 3];
        let n = 100_000;
        for _ in 0..n {
            let order = plan(
                Strategy::Weighted,
                &[c(3, true), c(1, true), c(0, true)],
                &mut r,
            );
            assert_eq!(order.len(), 3);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2]);
            firsts[order[0]] += 1;
        }
        let share = |k: usize| f64::from(firsts[k]) / f64::from(n);
        assert!((share(0) - 0.75).abs() < 0.01, "{firsts:?}");
        assert!((share(1) - 0.25).abs() < 0.01, "{firsts:?}");
        assert_eq!(firsts[2], 0);
    }

    #[test]
    fn the_best_permit_of_a_channel_is_the_most_open_breaker() {
        let s = |ms| Permit::Rejected(Duration::from_millis(ms));
        let rows = [
            (vec![Permit::Allowed, s(5)], Permit::Allowed),
            (vec![s(5), Permit::Allowed], Permit::Allowed),
            (vec![s(5), Permit::Probe], Permit::Probe),
            (vec![Permit::Probe, Permit::Allowed], Permit::Allowed),
            (vec![s(500), s(20)], s(20)),
            (vec![s(20)], s(20)),
        ];
        for (permits, want) in rows {
            assert_eq!(best(permits.clone()), want, "{permits:?}");
        }
    }

    /// The consumer reads while any breaker of the channel lets calls through; it pauses
    /// only when every one is open, for the shortest wait among them.
    #[tokio::test(start_paused = true)]
    async fn a_channel_pauses_only_when_every_breaker_is_open() {
        let strict = crate::health::BreakerConfig {
            consecutive_failures: 1,
            failure_ratio: 1.0,
            window: 10,
            min_calls: 10,
            cooldown: Duration::from_secs(10),
        };
        let route = |name| Route {
            provider: Arc::new(crate::testing::ScriptedProvider::new(name)),
            health: Arc::new(ProviderHealth::new(name, "sms", strict, 1e6, 1e6)),
            weight: 1,
        };
        let routes = Routes::new(Strategy::Failover, vec![route("a"), route("b")]);
        assert_eq!(routes.permit(), Permit::Allowed);
        routes.get(0).health.record(false);
        assert_eq!(routes.permit(), Permit::Allowed, "b is closed");
        assert_eq!(routes.order("t"), [1], "a skipped at once");
        tokio::time::advance(Duration::from_secs(4)).await;
        routes.get(1).health.record(false);
        assert_eq!(
            routes.permit(),
            Permit::Rejected(Duration::from_secs(6)),
            "both open: wait for a's cool-down"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(routes.permit(), Permit::Probe);
        assert_eq!(routes.permit(), Permit::Probe, "asking takes no probe");
        assert_eq!(
            routes.get(0).health.permit(),
            Permit::Probe,
            "the sender takes it"
        );
        assert!(matches!(routes.permit(), Permit::Rejected(_)));
    }

    /// A tenant with an order of its own gets it (failed over, even on a weighted
    /// channel); the others get the channel's.
    #[test]
    fn a_tenant_order_overrides_the_channels() {
        let route = |name, weight| Route {
            provider: Arc::new(crate::testing::ScriptedProvider::new(name)),
            health: Arc::new(ProviderHealth::new(
                name,
                "sms",
                crate::testing::lenient_breaker(),
                1e6,
                1e6,
            )),
            weight,
        };
        let routes = Routes::new(Strategy::Weighted, vec![route("a", 1), route("b", 0)])
            .with_tenant_order("acme", vec![1, 0])
            .with_tenant_order("zeta", vec![1])
            .with_tenant_order("none", vec![7]);
        for _ in 0..100 {
            assert_eq!(routes.order("acme"), [1, 0]);
            assert_eq!(routes.order("zeta"), [1]);
            assert_eq!(
                routes.order("none"),
                [0, 1],
                "no usable order: the channel's"
            );
            assert_eq!(routes.order("other"), [0, 1], "b weighs 0");
        }
    }

    #[test]
    fn strategies_parse_from_their_names() {
        for s in [Strategy::Failover, Strategy::Weighted] {
            assert_eq!(Strategy::parse(s.as_str()), Some(s));
        }
        assert_eq!(Strategy::parse("random"), None);
    }
}
