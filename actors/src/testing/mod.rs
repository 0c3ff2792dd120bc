//! Test doubles: in-memory implementations of the ports ([`MemoryStore`], [`MemoryQueue`],
//! [`MemorySearch`], [`ScriptedProvider`], [`MemoryParking`]) with scripted failures and recorded calls, so
//! that actor logic is tested in milliseconds and without servers. Compiled always (not
//! only under `cfg(test)`) so the root crate's tests may use them too; nothing in
//! production builds one.
//!
//! Each double keeps a [`Script`] per port: `fail_next(method, n, kind)` makes the next `n`
//! calls of a method fail with that [`ErrorKind`], `delay(method, d)` makes every call of
//! it wait first, and `calls()` / `sizes(method)` tell what was called, in order, with how
//! many items; `peak_in_flight()` the most calls that waited at once.

pub mod consumer;
mod parking;
mod provider;
mod queue;
mod search;
mod store;

pub use parking::{MemoryParking, ParkingMethod};
pub use provider::{Answer, ScriptedProvider};
pub use queue::{MemoryQueue, QueueMethod};
pub use search::{MemorySearch, SearchMethod};
pub use store::{MemoryStore, StoreMethod};

use crate::ports::{Dependency, DependencyError, ErrorKind};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Scripted failures and delays for the methods `M` of one port, and the record of calls.
#[derive(Debug)]
pub struct Script<M> {
    dependency: Dependency,
    inner: Mutex<ScriptInner<M>>,
}

#[derive(Debug)]
struct ScriptInner<M> {
    failures: HashMap<M, VecDeque<ErrorKind>>,
    delays: HashMap<M, Duration>,
    calls: Vec<(M, usize)>,
    /// Calls waiting out their delay now, and the most there were at once.
    in_flight: usize,
    peak: usize,
}

impl<M: Copy + Eq + Hash> Script<M> {
    pub fn new(dependency: Dependency) -> Self {
        Script {
            dependency,
            inner: Mutex::new(ScriptInner {
                failures: HashMap::new(),
                delays: HashMap::new(),
                calls: Vec::new(),
                in_flight: 0,
                peak: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ScriptInner<M>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` calls of `method` fail with `kind`.
    pub fn fail_next(&self, method: M, n: usize, kind: ErrorKind) {
        let mut g = self.lock();
        let q = g.failures.entry(method).or_default();
        q.extend(std::iter::repeat_n(kind, n));
    }

    /// Every call of `method` waits `d` before it does anything.
    pub fn delay(&self, method: M, d: Duration) {
        self.lock().delays.insert(method, d);
    }

    /// Every call so far, in order, with the number of items it carried.
    pub fn calls(&self) -> Vec<(M, usize)> {
        self.lock().calls.clone()
    }

    /// The number of items of each call of `method`, in order.
    pub fn sizes(&self, method: M) -> Vec<usize> {
        let g = self.lock();
        g.calls
            .iter()
            .filter(|(m, _)| *m == method)
            .map(|(_, n)| *n)
            .collect()
    }

    pub fn count(&self, method: M) -> usize {
        self.sizes(method).len()
    }

    /// The most calls that were waiting out their delay at once since the last
    /// [`reset_peak`](Self::reset_peak) (calls of methods without a delay are not counted).
    pub fn peak_in_flight(&self) -> usize {
        self.lock().peak
    }

    pub fn reset_peak(&self) {
        let mut g = self.lock();
        g.peak = g.in_flight;
    }

    /// A delayed call starts waiting.
    fn arrive(&self) -> Leave<'_, M> {
        let mut g = self.lock();
        g.in_flight += 1;
        g.peak = g.peak.max(g.in_flight);
        Leave(self)
    }

    /// Record a call of `method` with `items` items; wait and fail as scripted.
    pub async fn enter(&self, method: M, items: usize) -> Result<(), DependencyError> {
        let (delay, failure) = {
            let mut g = self.lock();
            g.calls.push((method, items));
            let failure = g.failures.get_mut(&method).and_then(VecDeque::pop_front);
            (g.delays.get(&method).copied(), failure)
        };
        if let Some(d) = delay {
            let leave = self.arrive();
            tokio::time::sleep(d).await;
            drop(leave);
        }
        match failure {
            Some(kind) => {
                Err(DependencyError::new(self.dependency, "scripted failure").with_kind(kind))
            }
            None => Ok(()),
        }
    }
}

/// A delayed call leaves the in-flight count when its delay is over, or when it is
/// dropped during it.
struct Leave<'a, M>(&'a Script<M>);

impl<M> Drop for Leave<'_, M> {
    fn drop(&mut self) {
        let mut g = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.in_flight = g.in_flight.saturating_sub(1);
    }
}

/// A breaker that never opens in a test's lifetime (tests that are not about the breaker).
pub fn lenient_breaker() -> crate::health::BreakerConfig {
    crate::health::BreakerConfig {
        consecutive_failures: 100,
        failure_ratio: 1.0,
        window: 100,
        min_calls: 100,
        cooldown: Duration::from_secs(1),
    }
}

/// Lock a std mutex, ignoring poisoning (a panicking test thread must not hide the state).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `pending` record with id `65f0…{n}` (24 hex digits), to a number or address that
/// fits the channel.
pub fn record(n: u32, channel: crate::domain::Channel) -> crate::domain::Communication {
    use crate::domain::{Channel, Communication, NewCommunication};
    let (from, to) = match channel {
        Channel::Email => ("a@example.com".to_string(), format!("b{n}@example.com")),
        _ => ("+15550001111".to_string(), format!("+1555{n:07}")),
    };
    Communication::new(
        format!("65f0{n:020x}"),
        NewCommunication {
            channel,
            from,
            to,
            msg: format!("message {n}"),
            subject: None,
        },
        chrono::Utc::now(),
    )
}

/// The stream entry `id` that carries `record`, as the router appends it.
pub fn stream_entry(id: &str, record: &crate::domain::Communication) -> crate::domain::StreamEntry {
    crate::domain::StreamEntry {
        id: id.to_string(),
        fields: record
            .stream_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

/// The accept path in a test: one new record (ids from 10,000,000 on) inserted into
/// `store` after another, `gap` apart, until the task is aborted; each insert as slow as
/// the store's script makes it.
pub fn keep_inserting(
    store: std::sync::Arc<dyn crate::ports::Store>,
    gap: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in 10_000_000.. {
            let _ = store
                .insert_many(&[record(n, crate::domain::Channel::Sms)])
                .await;
            tokio::time::sleep(gap).await;
        }
    })
}
