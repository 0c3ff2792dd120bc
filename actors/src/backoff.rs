//! One backoff for every "try again later" in the system, with the policy (how long to wait
//! after the n-th failure) kept apart from the mechanism (the loop that waits), as tower's
//! retry middleware does. Every retry loop — recording outcomes, appending log events,
//! reconnecting at start-up, a consumer or the LogIndexer waiting out an outage, the
//! supervisor's restarts — is a [`Backoff`] value driven by [`Delays`] or [`retry_until`].

use rand::Rng;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How the wait grows: `initial · factor^(n-1)`, never above `max`, optionally with full
/// jitter (uniform in `[0, ceiling]`, which spreads a crowd of clients retrying at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: u32,
    pub jitter: Jitter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// The ceiling itself: predictable waits for local loops that no crowd shares.
    None,
    /// Uniform in `[0, ceiling]`.
    Full,
}

impl Backoff {
    /// Doubling from `initial` up to `max`, without jitter.
    pub const fn exponential(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            factor: 2,
            jitter: Jitter::None,
        }
    }

    pub const fn with_full_jitter(self) -> Backoff {
        Backoff {
            jitter: Jitter::Full,
            ..self
        }
    }

    /// The longest wait after failure number `n` (1-based).
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        let mult = self.factor.max(1).saturating_pow(exp);
        self.initial.saturating_mul(mult).min(self.max)
    }

    /// The wait after failure number `n` (1-based).
    pub fn delay(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(n);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => Duration::from_millis(rng.gen_range(0..=ceiling.as_millis() as u64)),
        }
    }

    /// The successive waits of one run of failures.
    pub fn delays(&self) -> Delays {
        Delays {
            backoff: *self,
            failures: 0,
        }
    }
}

/// The mechanism's state: how many failures in a row so far.
#[derive(Debug, Clone)]
pub struct Delays {
    backoff: Backoff,
    failures: u32,
}

impl Delays {
    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures, &mut rand::thread_rng())
    }

    /// A success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Run `op` until it succeeds or `deadline` has passed (`None`: until it succeeds), waiting
/// by `backoff` between tries. `on_error` sees each failure and the wait that follows it
/// (for logs and metrics). The error returned is the last one.
pub async fn retry_until<T, E, F, Fut>(
    backoff: &Backoff,
    deadline: Option<Instant>,
    mut op: F,
    mut on_error: impl FnMut(&E, Duration),
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = backoff.delays();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(e);
                }
                let wait = delays.next_delay();
                on_error(&e, wait);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2));
        let got: Vec<_> = (1..=7).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(2));
        let mut d = b.delays();
        assert_eq!(d.next_delay(), Duration::from_millis(100));
        assert_eq!(d.next_delay(), Duration::from_millis(200));
        d.reset();
        assert_eq!(d.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2))
            .with_full_jitter();
        let mut rng = rand::thread_rng();
        for n in 1..10 {
            for _ in 0..100 {
                assert!(b.delay(n, &mut rng) <= b.ceiling(n));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1));
        let tries = Cell::new(0);
        let mut waits = Vec::new();
        let start = Instant::now();
        let r: Result<u32, &str> = retry_until(
            &b,
            None,
            || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move {
                    if n < 4 {
                        Err("down")
                    } else {
                        Ok(n)
                    }
                }
            },
            |_, w| waits.push(w.as_millis()),
        )
        .await;
        assert_eq!(r, Ok(4));
        assert_eq!(waits, [100, 200, 400]);
        assert_eq!(start.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_with_the_last_error_after_the_deadline() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_millis(100));
        let tries = Cell::new(0u32);
        let deadline = Instant::now() + Duration::from_millis(250);
        let r: Result<(), u32> = retry_until(
            &b,
            Some(deadline),
            || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move { Err(n) }
            },
            |_, _| {},
        )
        .await;
        // Tries at 0, 100, 200 and 300 ms; the one at 300 ms is past the deadline.
        assert_eq!(r, Err(4));
    }
}
