//! An adaptive limit on how many store calls a caller of the delivery side (the senders,
//! the ReceiptActor) has in flight, so that delivery work leaves the store room for the
//! RouterActor's inserts when the store is the bottleneck (issue #14, "Accepts first").
//!
//! The limit is AIMD, as TCP's congestion window is, over the latency the accept path sees
//! from the store: the RouterActor's inserts are observed (never held back), and
//! - an insert that failed or took longer than `target` cuts the limit by `decrease`
//!   (multiplicative), at most once per round trip: only a call that started after the
//!   last cut can cut again, since the calls already under way then did not see the lower
//!   limit;
//! - an insert on time raises it by `increase` (additive), also at most once per round
//!   trip (inserts come by the dozen a second, and overlap);
//! - a delivery call raises it too, but only when no insert has been seen for `quiet` (no
//!   request is waiting, so nothing needs the room: the backlog drains at full speed once
//!   the load stops), and a failed one cuts it.
//!
//! A delivery call's own latency is not judged: on a store that is slow for every caller
//! (a busy machine, a large batch) it cannot tell queueing from work, while an insert's
//! latency is what a request waits for. The limit stays in `[min, max]`.
//!
//! The limit is a number of calls in flight, and it may fall below one: then one call at a
//! time, and after each a pause of `latency × (1/limit − 1)` (at most `max_pause`), so that
//! on average `limit` calls are in flight (Little's law). While the pause lasts the
//! caller's work piles up (stream entries, receipts), so its next call carries more of it:
//! fewer, larger calls while the accept path is slow, and a limit back at `max` once it is not.
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
    /// An insert of the accept path taking longer than this is slow.
    pub target: Duration,
    /// No insert for this long: the accept path is idle, delivery calls raise the limit.
    pub quiet: Duration,
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

/// Whose call a sample is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An insert of the accept path (observed, never held back).
    Accept,
    /// A delivery call that waited for the gate.
    Delivery,
}

/// One finished call, as the limiter sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub started: Instant,
    pub ended: Instant,
    pub source: Source,
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
    /// When an insert last raised the limit: only inserts started after it may raise it again.
    raised_at: Option<Instant>,
    /// When the last insert of the accept path ended.
    last_accept: Option<Instant>,
}

impl Aimd {
    /// Starts at `max`: nothing is held back until the store is seen to be slow.
    pub fn new(settings: LimiterSettings) -> Self {
        Aimd {
            settings,
            limit: settings.max,
            cut_at: None,
            raised_at: None,
            last_accept: None,
        }
    }

    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// Calls that may be in flight at once: the limit rounded down, at least one.
    pub fn slots(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// What a sample says: `Some(true)` slow, `Some(false)` on time, `None` nothing.
    pub fn verdict(&self, s: &Sample) -> Option<bool> {
        match s.source {
            Source::Accept => Some(!s.ok || s.latency() > self.settings.target),
            Source::Delivery if !s.ok => Some(true),
            Source::Delivery => {
                let quiet = self
                    .last_accept
                    .is_none_or(|t| s.ended.saturating_duration_since(t) >= self.settings.quiet);
                quiet.then_some(false)
            }
        }
    }

    pub fn on_sample(&mut self, s: &Sample) -> Change {
        let mut verdict = self.verdict(s);
        if s.source == Source::Accept {
            self.last_accept = Some(self.last_accept.map_or(s.ended, |t| t.max(s.ended)));
            if verdict == Some(false) {
                if self.raised_at.is_some_and(|t| s.started < t) {
                    verdict = None;
                } else {
                    self.raised_at = Some(s.ended);
                }
            }
        }
        let st = &self.settings;
        match verdict {
            None => Change::Held,
            Some(false) => {
                let raised = (self.limit + st.increase).min(st.max);
                let change = if raised > self.limit {
                    Change::Raised
                } else {
                    Change::Held
                };
                self.limit = raised;
                change
            }
            Some(true) if self.cut_at.is_some_and(|t| s.started < t) || self.limit <= st.min => {
                Change::Held
            }
            Some(true) => {
                self.limit = (self.limit * st.decrease).max(st.min);
                self.cut_at = Some(s.ended);
                Change::Cut
            }
        }
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

    /// Wait for the gate, run the delivery call `call`, and learn from how it went. The
    /// wait is counted in `store_limiter_wait_seconds{caller}`.
    pub async fn run<T, E, F>(&self, call: F) -> Result<T, E>
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
            source: Source::Delivery,
            ok: result.is_ok(),
        });
        result
    }

    /// Learn from an insert of the accept path, which did not wait for the gate.
    pub fn observe(&self, sample: &Sample) {
        let change = self.lock().aimd.on_sample(sample);
        self.changed_to(change);
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
        let change = self.lock().finish(sample);
        if let Some(change) = change {
            self.changed_to(change);
        }
        self.changed.notify_waiters();
    }

    /// Report a change of the limit, and wake the callers waiting for it.
    fn changed_to(&self, change: Change) {
        if change == Change::Held {
            return;
        }
        let limit = self.limit();
        metrics::gauge!("store_concurrency_limit", "caller" => self.caller).set(limit);
        if change == Change::Cut {
            tracing::debug!(
                caller = self.caller,
                limit,
                "accept path slow: concurrency cut"
            );
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
            quiet: Duration::from_secs(1),
            min: 0.25,
            max: 4.0,
            increase: 0.5,
            decrease: 0.5,
            max_pause: Duration::from_secs(1),
        }
    }

    fn sample(t0: Instant, source: Source, start_ms: u64, took_ms: u64, ok: bool) -> Sample {
        let started = t0 + Duration::from_millis(start_ms);
        Sample {
            started,
            ended: started + Duration::from_millis(took_ms),
            source,
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

    /// (whose, start ms, took ms, ok) → change and limit after it, from the limit 4.
    #[tokio::test(start_paused = true)]
    async fn slow_inserts_cut_once_a_round_trip_and_quiet_ones_add() {
        use Source::{Accept, Delivery};
        let t0 = Instant::now();
        type Row = ((Source, u64, u64, bool), Change, f64);
        let table: &[Row] = &[
            // An insert on time, the limit at its max already.
            ((Accept, 0, 40, true), Change::Held, 4.0),
            // A slow insert: cut by half, at 100 ms.
            ((Accept, 0, 100, true), Change::Cut, 2.0),
            // Started before that cut: did not see the lower limit, no second cut.
            ((Accept, 50, 80, true), Change::Held, 2.0),
            // A failed insert counts as slow; it started after the cut.
            ((Accept, 130, 5, false), Change::Cut, 1.0),
            // A slow delivery call says nothing while inserts come...
            ((Delivery, 140, 900, true), Change::Held, 1.0),
            // ...a failed one cuts.
            ((Delivery, 140, 100, false), Change::Cut, 0.5),
            ((Accept, 300, 60, true), Change::Cut, 0.25),
            // At the floor.
            ((Accept, 400, 60, true), Change::Held, 0.25),
            // Inserts on time add, once a round trip.
            ((Accept, 500, 10, true), Change::Raised, 0.75),
            ((Accept, 505, 10, true), Change::Held, 0.75),
            ((Accept, 520, 10, true), Change::Raised, 1.25),
            // A delivery call within a second of the last insert: nothing.
            ((Delivery, 600, 500, true), Change::Held, 1.25),
            // No insert for a second: delivery calls add, however slow.
            ((Delivery, 1000, 600, true), Change::Raised, 1.75),
            ((Delivery, 1600, 600, true), Change::Raised, 2.25),
            ((Delivery, 2200, 600, true), Change::Raised, 2.75),
            ((Delivery, 2800, 600, true), Change::Raised, 3.25),
            ((Delivery, 3400, 600, true), Change::Raised, 3.75),
            ((Delivery, 4000, 600, true), Change::Raised, 4.0),
            ((Delivery, 4600, 600, true), Change::Held, 4.0),
        ];
        let mut aimd = Aimd::new(settings());
        for (i, ((source, start, took, ok), change, limit)) in table.iter().enumerate() {
            let got = aimd.on_sample(&sample(t0, *source, *start, *took, *ok));
            assert_eq!((got, aimd.limit()), (*change, *limit), "row {i}");
        }
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
        // A slow insert while both run: cut to 1.
        gate.aimd
            .on_sample(&sample(t0, Source::Accept, 0, 100, true));
        gate.finish(Some(&sample(t0, Source::Delivery, 0, 200, true)));
        gate.finish(Some(&sample(t0, Source::Delivery, 0, 210, true)));
        assert_eq!(gate.aimd.limit(), 1.0);
        let at = t0 + 210 * MS;
        assert_eq!(gate.admit(at), Admission::Go);
        assert_eq!(gate.admit(at), Admission::Full, "one slot now");
        // Another slow insert: cut to 0.5, so a pause as long as the call before the next.
        gate.aimd
            .on_sample(&sample(t0, Source::Accept, 210, 60, true));
        gate.finish(Some(&sample(t0, Source::Delivery, 210, 100, true)));
        assert_eq!(gate.aimd.limit(), 0.5);
        let ended = t0 + 310 * MS;
        assert_eq!(gate.admit(ended), Admission::Until(ended + 100 * MS));
        assert_eq!(gate.admit(ended + 100 * MS), Admission::Go);
        // An abandoned call gives its slot back and teaches nothing.
        assert_eq!(gate.finish(None), None);
        assert_eq!((gate.in_flight(), gate.aimd.limit()), (0, 0.5));
    }

    /// Ten delivery callers at once, each call taking 200 ms, while inserts of the accept
    /// path take 100 ms (slow: target 50 ms): the limiter starts with 4 calls in flight,
    /// cuts to its floor, and then has one in flight a quarter of the time; once inserts
    /// stop, it climbs back to 4.
    #[tokio::test(start_paused = true)]
    async fn the_limiter_holds_callers_back_while_inserts_are_slow() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let limiter = std::sync::Arc::new(StoreLimiter::new("test", settings()));
        let peak = std::sync::Arc::new(AtomicUsize::new(0));
        let calls = |n: usize| {
            let (limiter, peak) = (limiter.clone(), peak.clone());
            tokio::spawn(async move {
                for _ in 0..n {
                    let _: Result<(), ()> = limiter
                        .run(async {
                            peak.fetch_max(limiter.in_flight(), SeqCst);
                            tokio::time::sleep(200 * MS).await;
                            Ok(())
                        })
                        .await;
                }
            })
        };
        let inserts = |secs: u64| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < until {
                    let started = Instant::now();
                    tokio::time::sleep(100 * MS).await;
                    let ended = Instant::now();
                    limiter.observe(&Sample {
                        started,
                        ended,
                        source: Source::Accept,
                        ok: true,
                    });
                }
            })
        };
        let accepting = inserts(20);
        let first: Vec<_> = (0..10).map(|_| calls(2)).collect();
        for t in first {
            t.await.unwrap();
        }
        assert_eq!(peak.load(SeqCst), 4);
        assert_eq!(limiter.limit(), 0.25);
        // At the floor: one call at a time, 600 ms apart.
        peak.store(0, SeqCst);
        let started = Instant::now();
        let slow: Vec<_> = (0..4).map(|_| calls(1)).collect();
        for t in slow {
            t.await.unwrap();
        }
        assert_eq!(peak.load(SeqCst), 1);
        assert!(started.elapsed() >= 4 * 200 * MS + 3 * 600 * MS);
        accepting.await.unwrap();
        // No insert for a second: the limit climbs back.
        tokio::time::sleep(Duration::from_secs(1)).await;
        calls(10).await.unwrap();
        assert_eq!(limiter.limit(), 4.0);
    }
}
