//! An adaptive limit on how many store calls a caller (the senders, the ReceiptActor) has
//! in flight, so that delivery work leaves the store room for the RouterActor's inserts
//! when the store is the bottleneck (issue #14, "Accepts first").
//!
//! The limit is AIMD over the calls' latency, as TCP's congestion window is over loss:
//! - A call is **slow** when it failed or took longer than `target + unit × items`: a
//!   batch of 100 outcomes costs the store more than a batch of 1, so the allowance grows
//!   with the call's size by `unit`, the store's own cost of an item, and what is left over
//!   is time spent queued behind other work, which is what the limit reacts to. `unit` is
//!   learnt, per kind of call (reads cost a store a fraction of what writes do): the
//!   lowest latency per item seen, forgotten slowly (it may rise by `UNIT_RISE` a call), so
//!   that a machine slower or faster than assumed (`per_item`, the first guess) is judged
//!   by its own speed, and a backlog drained in large calls after the load has stopped is
//!   not taken for congestion.
//! - A slow call cuts the limit by `decrease` (multiplicative), at most once per round
//!   trip: only a call that started after the last cut can cut again, since the calls
//!   already under way then did not see the lower limit.
//! - A call on time raises it by `increase` (additive). The limit stays in `[min, max]`.
//!
//! The limit is a number of calls in flight, and it may fall below one: then one call at a
//! time, and after each a pause of `latency × (1/limit − 1)` (at most `max_pause`), so that
//! on average `limit` calls are in flight (Little's law). While the pause lasts the
//! caller's work piles up (stream entries, receipts), so its next call carries more of it:
//! fewer, larger calls while the store is slow, and a limit back at `max` once it is not.
//!
//! [`Aimd`] is the pure rule and [`Gate`] the admission over an explicit `now` (tested by
//! tables); [`StoreLimiter`] is the shared, async mechanism that callers wait on, and
//! reports the limit as the gauge `store_concurrency_limit{caller}`.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The limiter's settings (config.toml `[store_limiter]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterSettings {
    /// A call of no items taking longer than this is slow...
    pub target: Duration,
    /// ...plus this much per item it carries, until calls have shown the store's own cost.
    pub per_item: Duration,
    /// The lowest limit (calls in flight; below 1: the share of the time with one in flight).
    pub min: f64,
    /// The highest limit, and the one it starts at.
    pub max: f64,
    /// Added after a call on time.
    pub increase: f64,
    /// The limit is multiplied by this after a slow call.
    pub decrease: f64,
    /// The longest pause between two calls when the limit is below one.
    pub max_pause: Duration,
}

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("min_limit must be above 0 and at most max_limit (min {min}, max {max})")]
    Bounds { min: f64, max: f64 },
    #[error("increase must be above 0 (got {0})")]
    Increase(f64),
    #[error("decrease must be above 0 and below 1 (got {0})")]
    Decrease(f64),
    #[error("target_ms must be above 0")]
    Target,
}

impl LimiterSettings {
    pub fn validate(self) -> Result<Self, SettingsError> {
        if !(self.min > 0.0 && self.min <= self.max && self.max.is_finite()) {
            return Err(SettingsError::Bounds {
                min: self.min,
                max: self.max,
            });
        }
        if !(self.increase > 0.0 && self.increase.is_finite()) {
            return Err(SettingsError::Increase(self.increase));
        }
        if !(self.decrease > 0.0 && self.decrease < 1.0) {
            return Err(SettingsError::Decrease(self.decrease));
        }
        if self.target.is_zero() {
            return Err(SettingsError::Target);
        }
        Ok(self)
    }
}

/// How much the store's cost grows per item of a call differs by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A read (the claim's).
    Read,
    /// A write (outcomes, a reschedule, receipts).
    Write,
}

/// How fast the learnt cost of an item may rise a call (when no call was as cheap): a
/// lucky call is forgotten within a few hundred calls, and a sustained queue is not taken
/// for the store's own cost within a load of a minute or so.
pub const UNIT_RISE: f64 = 0.005;

/// One finished call, as the limiter sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub started: Instant,
    pub ended: Instant,
    pub kind: CallKind,
    /// Records (or receipts) the call carried.
    pub items: usize,
    /// `false`: the store answered with an error (or not at all).
    pub ok: bool,
}

impl Sample {
    pub fn latency(&self) -> Duration {
        self.ended.saturating_duration_since(self.started)
    }
}

/// What a sample did to the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Raised,
    Cut,
    /// Slow, but started before the last cut (or the limit is at its bound already).
    Held,
}

/// The AIMD rule, pure.
#[derive(Debug, Clone)]
pub struct Aimd {
    settings: LimiterSettings,
    limit: f64,
    /// When the limit was last cut: only calls started after it may cut it again.
    cut_at: Option<Instant>,
    /// The store's cost of an item, per kind (read, write), as learnt.
    units: [Option<Duration>; 2],
}

impl Aimd {
    /// Starts at `max`: nothing is held back until the store is seen to be slow.
    pub fn new(settings: LimiterSettings) -> Self {
        Aimd {
            settings,
            limit: settings.max,
            cut_at: None,
            units: [None, None],
        }
    }

    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// Calls that may be in flight at once: the limit rounded down, at least one.
    pub fn slots(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// The store's cost of an item of this kind: learnt, or the first guess.
    pub fn unit(&self, kind: CallKind) -> Duration {
        self.units[kind as usize].unwrap_or(self.settings.per_item)
    }

    pub fn is_slow(&self, s: &Sample) -> bool {
        let allowed = self.settings.target + self.unit(s.kind) * s.items as u32;
        !s.ok || s.latency() > allowed
    }

    /// The lowest latency per item seen, allowed to rise by [`UNIT_RISE`] a call.
    fn learn(&mut self, s: &Sample) {
        if !s.ok || s.items == 0 {
            return;
        }
        let per_item = s.latency() / s.items as u32;
        let unit = &mut self.units[s.kind as usize];
        *unit = Some(unit.map_or(per_item, |u| per_item.min(u.mul_f64(1.0 + UNIT_RISE))));
    }

    pub fn on_sample(&mut self, s: &Sample) -> Change {
        let slow = self.is_slow(s);
        self.learn(s);
        let st = &self.settings;
        if !slow {
            let raised = (self.limit + st.increase).min(st.max);
            let change = if raised > self.limit {
                Change::Raised
            } else {
                Change::Held
            };
            self.limit = raised;
            return change;
        }
        if self.cut_at.is_some_and(|t| s.started < t) || self.limit <= st.min {
            return Change::Held;
        }
        self.limit = (self.limit * st.decrease).max(st.min);
        self.cut_at = Some(s.ended);
        Change::Cut
    }

    /// The pause after a call that took `latency` before the next may start: none while
    /// the limit is one or more; below one, enough that the store sees `limit` calls in
    /// flight on average.
    pub fn pause_after(&self, latency: Duration) -> Duration {
        if self.limit >= 1.0 {
            return Duration::ZERO;
        }
        let idle = latency.as_secs_f64() * (1.0 / self.limit - 1.0);
        Duration::from_secs_f64(idle.min(self.settings.max_pause.as_secs_f64()))
    }
}

/// Whether a call may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Every slot is taken: wait for a call to finish.
    Full,
    /// The pause after the last call lasts until then.
    Until(Instant),
}

/// The admission state over the rule: calls in flight and the end of the current pause.
#[derive(Debug, Clone)]
pub struct Gate {
    pub aimd: Aimd,
    in_flight: usize,
    not_before: Option<Instant>,
}

impl Gate {
    pub fn new(settings: LimiterSettings) -> Self {
        Gate {
            aimd: Aimd::new(settings),
            in_flight: 0,
            not_before: None,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Admit a call at `now` (it then counts as in flight) or say what it waits for.
    pub fn admit(&mut self, now: Instant) -> Admission {
        if self.in_flight >= self.aimd.slots() {
            return Admission::Full;
        }
        if let Some(t) = self.not_before.filter(|t| *t > now) {
            return Admission::Until(t);
        }
        self.in_flight += 1;
        Admission::Go
    }

    /// A call admitted earlier ended (`None`: abandoned, nothing learnt).
    pub fn finish(&mut self, sample: Option<&Sample>) -> Option<Change> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let s = sample?;
        let change = self.aimd.on_sample(s);
        let pause = self.aimd.pause_after(s.latency());
        self.not_before = (!pause.is_zero()).then(|| s.ended + pause);
        Some(change)
    }
}

/// The mechanism: callers wait in [`StoreLimiter::run`] for the gate; the limit is shared
/// by every caller holding the same `Arc` (the three senders share one).
#[derive(Debug)]
pub struct StoreLimiter {
    caller: &'static str,
    gate: Mutex<Gate>,
    /// Woken whenever a call ends (a slot or the pause may have changed).
    changed: Notify,
}

impl StoreLimiter {
    pub fn new(caller: &'static str, settings: LimiterSettings) -> Self {
        metrics::gauge!("store_concurrency_limit", "caller" => caller).set(settings.max);
        StoreLimiter {
            caller,
            gate: Mutex::new(Gate::new(settings)),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limit(&self) -> f64 {
        self.lock().aimd.limit()
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight()
    }

    /// Wait for the gate, run `call` (of `kind`, carrying `items` items), and learn from how
    /// it went. The wait is counted in `store_limiter_wait_seconds{caller}`.
    pub async fn run<T, E, F>(&self, kind: CallKind, items: usize, call: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let waited = Instant::now();
        self.admitted().await;
        metrics::histogram!("store_limiter_wait_seconds", "caller" => self.caller)
            .record(waited.elapsed().as_secs_f64());
        let mut slot = Slot {
            limiter: self,
            sample: None,
        };
        let started = Instant::now();
        let result = call.await;
        slot.sample = Some(Sample {
            started,
            ended: Instant::now(),
            kind,
            items,
            ok: result.is_ok(),
        });
        result
    }

    async fn admitted(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the gate is read: a call ending in between still wakes us.
            notified.as_mut().enable();
            let admission = self.lock().admit(Instant::now());
            match admission {
                Admission::Go => return,
                Admission::Full => notified.await,
                Admission::Until(t) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(t) => {}
                        () = notified => {}
                    }
                }
            }
        }
    }

    fn finish(&self, sample: Option<&Sample>) {
        let (change, limit) = {
            let mut gate = self.lock();
            let change = gate.finish(sample);
            (change, gate.aimd.limit())
        };
        if matches!(change, Some(Change::Cut | Change::Raised)) {
            metrics::gauge!("store_concurrency_limit", "caller" => self.caller).set(limit);
        }
        if change == Some(Change::Cut) {
            tracing::debug!(caller = self.caller, limit, "store slow: concurrency cut");
        }
        self.changed.notify_waiters();
    }
}

/// A call in flight; its slot is given back when it ends or is dropped unfinished.
struct Slot<'a> {
    limiter: &'a StoreLimiter,
    sample: Option<Sample>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.limiter.finish(self.sample.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings() -> LimiterSettings {
        LimiterSettings {
            target: 50 * MS,
            per_item: MS,
            min: 0.25,
            max: 4.0,
            increase: 0.5,
            decrease: 0.5,
            max_pause: Duration::from_secs(1),
        }
    }

    fn sample(t0: Instant, start_ms: u64, took_ms: u64, items: usize, ok: bool) -> Sample {
        let started = t0 + Duration::from_millis(start_ms);
        Sample {
            started,
            ended: started + Duration::from_millis(took_ms),
            kind: CallKind::Write,
            items,
            ok,
        }
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let bad = [
            LimiterSettings {
                min: 0.0,
                ..settings()
            },
            LimiterSettings {
                min: 5.0,
                ..settings()
            },
            LimiterSettings {
                max: f64::INFINITY,
                ..settings()
            },
            LimiterSettings {
                increase: 0.0,
                ..settings()
            },
            LimiterSettings {
                decrease: 1.0,
                ..settings()
            },
            LimiterSettings {
                target: Duration::ZERO,
                ..settings()
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
        assert!(settings().validate().is_ok());
    }

    /// (start ms, took ms, items, ok) → change and limit after it, from the limit 4.
    #[tokio::test(start_paused = true)]
    async fn slow_calls_cut_once_a_round_trip_and_calls_on_time_add() {
        let t0 = Instant::now();
        type Row = ((u64, u64, usize, bool), Change, f64);
        let table: &[Row] = &[
            // 40 ms for nothing: on time, but the limit is at its max already.
            ((0, 40, 0, true), Change::Held, 4.0),
            // 100 ms for 60 items (allowed 50 + 60): on time.
            ((0, 100, 60, true), Change::Held, 4.0),
            // 100 ms for 10 items (allowed 60): slow, cut by half, at 100 ms.
            ((0, 100, 10, true), Change::Cut, 2.0),
            // Started before that cut: did not see the lower limit, no second cut.
            ((50, 80, 0, true), Change::Held, 2.0),
            // An error counts as slow; it started after the cut.
            ((100, 5, 0, false), Change::Cut, 1.0),
            ((110, 60, 0, true), Change::Cut, 0.5),
            ((200, 60, 0, true), Change::Cut, 0.25),
            // At the floor.
            ((300, 60, 0, true), Change::Held, 0.25),
            // Healthy again: back up by 0.5 a call, to the max and no further.
            ((400, 10, 0, true), Change::Raised, 0.75),
            ((410, 10, 0, true), Change::Raised, 1.25),
            ((420, 10, 0, true), Change::Raised, 1.75),
            ((430, 10, 0, true), Change::Raised, 2.25),
            ((440, 10, 0, true), Change::Raised, 2.75),
            ((450, 10, 0, true), Change::Raised, 3.25),
            ((460, 10, 0, true), Change::Raised, 3.75),
            ((470, 10, 0, true), Change::Raised, 4.0),
            ((480, 10, 0, true), Change::Held, 4.0),
        ];
        let mut aimd = Aimd::new(settings());
        for (i, ((start, took, items, ok), change, limit)) in table.iter().enumerate() {
            let got = aimd.on_sample(&sample(t0, *start, *took, *items, *ok));
            assert_eq!((got, aimd.limit()), (*change, *limit), "row {i}");
        }
    }

    /// The first guess is 0.1 ms an item; this store takes 2 ms an item to write and
    /// 0.2 ms to read. Once it has shown that, a write or read of 100 items at its own speed
    /// is on time, and one that queued 100 ms more is slow.
    #[tokio::test(start_paused = true)]
    async fn the_cost_of_an_item_is_learnt_per_kind_and_forgotten_slowly() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new(LimiterSettings {
            per_item: Duration::from_micros(100),
            ..settings()
        });
        let call = |kind, start_ms, took_ms| Sample {
            kind,
            items: 100,
            ..sample(t0, start_ms, took_ms, 100, true)
        };
        use CallKind::{Read, Write};
        // Judged by the guess (allowed 60 ms): slow; then learnt.
        assert_eq!(aimd.on_sample(&call(Write, 0, 200)), Change::Cut);
        assert_eq!(aimd.unit(Write), 2 * MS);
        assert_eq!(aimd.unit(Read), Duration::from_micros(100), "not learnt");
        assert_eq!(aimd.on_sample(&call(Read, 300, 20)), Change::Raised);
        assert_eq!(aimd.unit(Read), Duration::from_micros(200));
        let rows = [
            (Write, 400, 210, Change::Raised),
            (Write, 700, 310, Change::Cut),
            (Read, 1100, 30, Change::Raised),
            (Read, 1200, 130, Change::Cut),
        ];
        for (kind, start, took, change) in rows {
            assert_eq!(
                aimd.on_sample(&call(kind, start, took)),
                change,
                "{kind:?} {took}"
            );
        }
        // Only slower calls for a while: the unit rises 0.5 % a call.
        let before = aimd.unit(Write);
        for i in 0..100 {
            aimd.on_sample(&call(Write, 2000 + 1000 * i, 1000));
        }
        let risen = aimd.unit(Write).as_secs_f64() / before.as_secs_f64();
        assert!((1.64..1.66).contains(&risen), "{risen}");
    }

    #[test]
    fn below_one_the_pause_keeps_that_share_of_the_time_busy() {
        let mut aimd = Aimd::new(settings());
        let cases: &[(f64, u64, u64)] = &[
            // (limit, latency ms, pause ms)
            (4.0, 100, 0),
            (1.0, 100, 0),
            (0.5, 100, 100),
            (0.25, 100, 300),
            // Capped at max_pause.
            (0.25, 1000, 1000),
        ];
        for (limit, took, pause) in cases {
            aimd.limit = *limit;
            let got = aimd.pause_after(Duration::from_millis(*took));
            assert_eq!(got.as_millis() as u64, *pause, "limit {limit}");
        }
        for (limit, slots) in [(4.0, 4), (3.9, 3), (1.0, 1), (0.25, 1)] {
            aimd.limit = limit;
            assert_eq!(aimd.slots(), slots, "limit {limit}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_admits_up_to_the_slots_then_paces_below_one() {
        let t0 = Instant::now();
        let mut gate = Gate::new(LimiterSettings {
            max: 2.0,
            ..settings()
        });
        assert_eq!(gate.admit(t0), Admission::Go);
        assert_eq!(gate.admit(t0), Admission::Go);
        assert_eq!(gate.admit(t0), Admission::Full);
        // Both slow: the first cuts to 1, the second started before the cut.
        gate.finish(Some(&sample(t0, 0, 200, 0, true)));
        gate.finish(Some(&sample(t0, 0, 210, 0, true)));
        assert_eq!(gate.aimd.limit(), 1.0);
        let at = t0 + 210 * MS;
        assert_eq!(gate.admit(at), Admission::Go);
        assert_eq!(gate.admit(at), Admission::Full, "one slot now");
        // Slow again: cut to 0.5, so a pause as long as the call before the next.
        gate.finish(Some(&sample(t0, 210, 100, 0, true)));
        assert_eq!(gate.aimd.limit(), 0.5);
        let ended = t0 + 310 * MS;
        assert_eq!(gate.admit(ended), Admission::Until(ended + 100 * MS));
        assert_eq!(gate.admit(ended + 100 * MS), Admission::Go);
        // An abandoned call gives its slot back and teaches nothing.
        assert_eq!(gate.finish(None), None);
        assert_eq!((gate.in_flight(), gate.aimd.limit()), (0, 0.5));
    }

    /// Ten callers at once, each call taking 200 ms (slow: target 50 ms): the limiter
    /// starts with 4 in flight, cuts to its floor, and then has one call in flight a
    /// quarter of the time; a fast store brings it back to 4.
    #[tokio::test(start_paused = true)]
    async fn the_limiter_holds_callers_back_while_calls_are_slow() {
        let limiter = std::sync::Arc::new(StoreLimiter::new("test", settings()));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let took = std::sync::Arc::new(Mutex::new(200 * MS));
        let calls = |n: usize| {
            let (limiter, peak, took) = (limiter.clone(), peak.clone(), took.clone());
            tokio::spawn(async move {
                for _ in 0..n {
                    let d = *took.lock().unwrap();
                    let _: Result<(), ()> = limiter
                        .run(CallKind::Write, 0, async {
                            let now = limiter.in_flight();
                            peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(d).await;
                            Ok(())
                        })
                        .await;
                }
            })
        };
        let first: Vec<_> = (0..10).map(|_| calls(3)).collect();
        for t in first {
            t.await.unwrap();
        }
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(limiter.limit(), 0.25);
        // Slow and at the floor: one call at a time, 600 ms apart.
        peak.store(0, std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        let slow: Vec<_> = (0..4).map(|_| calls(1)).collect();
        for t in slow {
            t.await.unwrap();
        }
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(started.elapsed() >= 4 * 200 * MS + 3 * 600 * MS);
        // Fast again: the limit climbs back.
        *took.lock().unwrap() = 10 * MS;
        calls(10).await.unwrap();
        assert_eq!(limiter.limit(), 4.0);
    }
}
