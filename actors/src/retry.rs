//! The per-message retry policy: how many attempts a message gets, and how long it waits
//! after each failed one. The policy decides; the wait is a [`Backoff`] with full jitter
//! (uniform in `[0, min(cap, base·2^(attempt-1))]`), the one mechanism every retry uses.

use crate::backoff::Backoff;
use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. After the last, the message is `failed`.
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The waits between attempts.
    pub fn backoff(&self) -> Backoff {
        Backoff::exponential(self.base, self.cap).with_full_jitter()
    }

    /// Whether a retryable failure of attempt `attempt` (1-based) gets another attempt.
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The ceiling for the wait after `attempt` (1-based) failed: min(cap, base·2^(attempt-1)).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.backoff().ceiling(attempt)
    }

    /// Full jitter: uniform in [0, ceiling], never below what the provider asked for.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let jittered = self.backoff().delay(attempt, rng);
        match retry_after {
            Some(ra) => jittered.max(ra),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_full_jitter_bounds() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        let mut rng = rand::thread_rng();
        for attempt in 1..10 {
            let ceiling = p.ceiling(attempt);
            assert!(ceiling <= Duration::from_secs(2));
            for _ in 0..200 {
                assert!(p.delay(attempt, None, &mut rng) <= ceiling);
            }
        }
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(3), Duration::from_millis(400));
        assert_eq!(p.ceiling(9), Duration::from_secs(2));
        let ra = Duration::from_secs(7);
        assert!(p.delay(1, Some(ra), &mut rng) >= ra);
    }
}
