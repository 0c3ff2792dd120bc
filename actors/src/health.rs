//! Per-provider health, shared (through the channel's `routing::Routes`) by the channel's
//! sender (which reports every call, and skips a provider whose breaker is open), its
//! consumers (which stop reading while every provider's breaker is open) and the HTTP layer
//! (`GET /api/v1/providers`): a circuit breaker and a token bucket, both pure state
//! machines over an explicit `now`, wrapped in one mutex. It lives outside the actors so a
//! restarted sender keeps its provider's history.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many failures in a row...
    pub consecutive_failures: u32,
    /// ...or when at least `min_calls` of the last `window` calls failed at this ratio.
    pub failure_ratio: f64,
    pub window: usize,
    pub min_calls: usize,
    /// How long it stays open before letting one probe through.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is allowed; its outcome closes or re-opens the breaker. A probe that
    /// never reports (nothing to send) is replaced after a cool-down.
    HalfOpen {
        probe_since: Option<Instant>,
    },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    /// For the `provider_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(&self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen { .. } => 1.0,
            BreakerState::Open { .. } => 2.0,
        }
    }
}

/// What the breaker says about the next call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Permit {
    Allowed,
    /// The single half-open probe: read one entry only.
    Probe,
    /// Wait this long before asking again.
    Rejected(Duration),
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: BreakerState,
    consecutive: u32,
    recent: VecDeque<bool>,
}

impl CircuitBreaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        CircuitBreaker {
            cfg,
            state: BreakerState::Closed,
            consecutive: 0,
            recent: VecDeque::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Share of failures among the recent calls.
    pub fn error_rate(&self) -> f64 {
        if self.recent.is_empty() {
            return 0.0;
        }
        self.recent.iter().filter(|ok| !**ok).count() as f64 / self.recent.len() as f64
    }

    /// May a call go out now? Moves Open → HalfOpen when the cool-down is over.
    pub fn permit(&mut self, now: Instant) -> Permit {
        let p = self.peek(now);
        if p == Permit::Probe {
            self.state = BreakerState::HalfOpen {
                probe_since: Some(now),
            };
        }
        p
    }

    /// What [`CircuitBreaker::permit`] would answer now, without taking the probe: for a
    /// reader that only asks whether some call may go out (the channel's consumer).
    pub fn peek(&self, now: Instant) -> Permit {
        match self.state {
            BreakerState::Closed => Permit::Allowed,
            BreakerState::Open { until } if now < until => Permit::Rejected(until - now),
            BreakerState::HalfOpen {
                probe_since: Some(t),
            } if now.saturating_duration_since(t) < self.cfg.cooldown => {
                Permit::Rejected(Duration::from_millis(100))
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => Permit::Probe,
        }
    }

    /// Record a call's result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<BreakerState> {
        self.recent.push_back(ok);
        while self.recent.len() > self.cfg.window.max(1) {
            self.recent.pop_front();
        }
        self.consecutive = if ok { 0 } else { self.consecutive + 1 };
        let before = self.state;
        self.state = match self.state {
            BreakerState::HalfOpen { .. } if ok => {
                self.recent.clear();
                BreakerState::Closed
            }
            BreakerState::HalfOpen { .. } => BreakerState::Open {
                until: now + self.cfg.cooldown,
            },
            BreakerState::Closed if !ok && self.should_open() => BreakerState::Open {
                until: now + self.cfg.cooldown,
            },
            s => s,
        };
        (before.name() != self.state.name()).then_some(self.state)
    }

    fn should_open(&self) -> bool {
        self.consecutive >= self.cfg.consecutive_failures
            || (self.recent.len() >= self.cfg.min_calls.max(1)
                && self.error_rate() >= self.cfg.failure_ratio)
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up; a provider's
/// `Retry-After` pauses it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    pub rate: f64,
    pub burst: f64,
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            last: now,
            paused_until: None,
        }
    }

    /// Take a token, or say how long to wait for one.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(p) = self.paused_until {
            if now < p {
                return Err(p - now);
            }
            self.paused_until = None;
            self.last = p;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate <= 0.0 {
            Err(Duration::from_secs(1))
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// The provider said 429 with `Retry-After`: nothing goes out before then.
    pub fn pause(&mut self, until: Instant) {
        if self.paused_until.is_none_or(|p| p < until) {
            self.paused_until = Some(until);
            self.tokens = 0.0;
        }
    }

    pub fn paused_for(&self, now: Instant) -> Option<Duration> {
        self.paused_until.filter(|p| *p > now).map(|p| p - now)
    }

    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

struct Inner {
    breaker: CircuitBreaker,
    bucket: TokenBucket,
    calls: u64,
    failures: u64,
}

/// One provider's breaker and bucket.
pub struct ProviderHealth {
    pub provider: &'static str,
    pub channel: &'static str,
    inner: Mutex<Inner>,
}

impl ProviderHealth {
    pub fn new(
        provider: &'static str,
        channel: &'static str,
        breaker: BreakerConfig,
        rate: f64,
        burst: f64,
    ) -> Self {
        let h = ProviderHealth {
            provider,
            channel,
            inner: Mutex::new(Inner {
                breaker: CircuitBreaker::new(breaker),
                bucket: TokenBucket::new(rate, burst, Instant::now()),
                calls: 0,
                failures: 0,
            }),
        };
        metrics::gauge!("provider_breaker_state", "provider" => provider).set(0.0);
        h
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn permit(&self) -> Permit {
        let mut g = self.lock();
        let before = g.breaker.state();
        let p = g.breaker.permit(Instant::now());
        let after = g.breaker.state();
        drop(g);
        if before.name() != after.name() {
            self.transition(after);
        }
        p
    }

    /// What [`ProviderHealth::permit`] would answer, the probe left for the sender to take.
    pub fn peek(&self) -> Permit {
        self.lock().breaker.peek(Instant::now())
    }

    /// The provider's `Retry-After` pause still to run, if any.
    pub fn paused_for(&self) -> Option<Duration> {
        self.lock().bucket.paused_for(Instant::now())
    }

    /// Report one provider call: `ok` is false for failures that speak of the provider's
    /// health (network, timeout, 5xx, a refusal about our account there), true otherwise
    /// (a permanent refusal about the message is a healthy provider answering).
    pub fn record(&self, ok: bool) {
        let mut g = self.lock();
        g.calls += 1;
        if !ok {
            g.failures += 1;
        }
        let changed = g.breaker.record(ok, Instant::now());
        drop(g);
        if let Some(s) = changed {
            self.transition(s);
        }
    }

    fn transition(&self, s: BreakerState) {
        metrics::gauge!("provider_breaker_state", "provider" => self.provider).set(s.gauge());
        match s {
            BreakerState::Open { .. } => {
                tracing::warn!(
                    provider = self.provider,
                    state = s.name(),
                    "circuit breaker opened"
                )
            }
            _ => tracing::info!(
                provider = self.provider,
                state = s.name(),
                "circuit breaker changed"
            ),
        }
    }

    /// Wait for a token (the rate limit), however long the provider asked.
    pub async fn acquire(&self) {
        loop {
            let wait = self.lock().bucket.take(Instant::now());
            match wait {
                Ok(()) => return,
                Err(d) => tokio::time::sleep(d.min(Duration::from_secs(5))).await,
            }
        }
    }

    /// Wait for a token, unless the provider's `Retry-After` pause would last beyond
    /// `limit` from now (a claim's lease): then the pause left, at once.
    pub async fn acquire_within(&self, limit: Duration) -> Result<(), Duration> {
        let deadline = Instant::now() + limit;
        loop {
            let (wait, paused) = {
                let mut g = self.lock();
                let now = Instant::now();
                (g.bucket.take(now), g.bucket.paused_for(now))
            };
            let Err(d) = wait else { return Ok(()) };
            if let Some(p) = paused.filter(|p| Instant::now() + *p > deadline) {
                return Err(p);
            }
            tokio::time::sleep(d.min(Duration::from_secs(5))).await;
        }
    }

    pub fn pause_for(&self, d: Duration) {
        self.lock().bucket.pause(Instant::now() + d);
    }

    pub fn snapshot(&self) -> Value {
        let g = self.lock();
        let now = Instant::now();
        let state = g.breaker.state();
        let retry_in = match state {
            BreakerState::Open { until } => {
                Some(until.saturating_duration_since(now).as_millis() as u64)
            }
            _ => None,
        };
        json!({
            "provider": self.provider,
            "channel": self.channel,
            "breaker": {
                "state": state.name(),
                "retryInMs": retry_in,
                "consecutiveFailures": g.breaker.cfg.consecutive_failures,
                "failureRatio": g.breaker.cfg.failure_ratio,
                "window": g.breaker.cfg.window,
                "minCalls": g.breaker.cfg.min_calls,
                "cooldownMs": g.breaker.cfg.cooldown.as_millis() as u64,
            },
            "recentErrorRate": g.breaker.error_rate(),
            "calls": g.calls,
            "failures": g.failures,
            "rateLimit": {
                "ratePerSec": g.bucket.rate,
                "burst": g.bucket.burst,
                "tokens": g.bucket.tokens(),
                "pausedForMs": g.bucket.paused_for(now).map(|d| d.as_millis() as u64),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_ratio: 0.5,
            window: 10,
            min_calls: 6,
            cooldown: Duration::from_secs(5),
        }
    }

    #[test]
    fn breaker_goes_closed_open_half_open_closed() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        assert_eq!(b.permit(t0), Permit::Allowed);
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(false, t0), None);
        assert!(matches!(
            b.record(false, t0),
            Some(BreakerState::Open { .. })
        ));
        assert!(
            matches!(b.permit(t0 + Duration::from_secs(1)), Permit::Rejected(d) if d == Duration::from_secs(4))
        );
        // Cool-down over: exactly one probe.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.permit(t1), Permit::Probe);
        assert!(matches!(b.permit(t1), Permit::Rejected(_)));
        assert_eq!(b.record(true, t1), Some(BreakerState::Closed));
        assert_eq!(b.permit(t1), Permit::Allowed);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.record(false, t0);
        }
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(b.permit(t1), Permit::Probe);
        assert!(
            matches!(b.record(false, t1), Some(BreakerState::Open { until }) if until == t1 + Duration::from_secs(5))
        );
    }

    #[test]
    fn a_failure_ratio_opens_without_a_streak() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        // ok, fail, ok, fail, ... : never 3 in a row, but half of the window fails.
        let mut opened = false;
        for i in 0..10 {
            opened |= b.record(i % 2 == 0, t0).is_some();
        }
        assert!(opened);
        assert_eq!(b.state().name(), "open");
    }

    #[test]
    fn bucket_refills_at_its_rate_and_pauses_for_retry_after() {
        let t0 = Instant::now();
        let mut tb = TokenBucket::new(10.0, 2.0, t0);
        assert!(tb.take(t0).is_ok());
        assert!(tb.take(t0).is_ok());
        let wait = tb.take(t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(90),
            "{wait:?}"
        );
        assert!(tb.take(t0 + Duration::from_millis(100)).is_ok());
        tb.pause(t0 + Duration::from_secs(3));
        assert_eq!(
            tb.take(t0 + Duration::from_secs(1)).unwrap_err(),
            Duration::from_secs(2)
        );
        assert!(tb.take(t0 + Duration::from_secs(4)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_the_rate_in_paused_time() {
        let h = ProviderHealth::new("test", "sms", cfg(), 2.0, 1.0);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            h.acquire().await;
        }
        // One from the burst, then four at 2 a second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }
}
