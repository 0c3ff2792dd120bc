//! The per-recipient cap for SMS and WhatsApp: at most `max` messages to one number per
//! tenant in a fixed window, against loops that would text somebody (and the invoice)
//! without end. Counted in Redis, so it holds across restarts and instances.
//!
//! If Redis does not answer within [`CHECK_TIMEOUT`], the request goes through (the
//! accept path keeps working in a Redis outage, as it does for queueing) and
//! `recipient_cap_unavailable_total` counts it.

use crate::clients::redis_queue::RedisQueue;
use actors::domain::Channel;
use std::sync::Arc;
use std::time::Duration;

pub const CHECK_TIMEOUT: Duration = Duration::from_millis(250);

pub struct RecipientCap {
    pub max: u64,
    pub window_secs: u64,
    pub redis: Arc<RedisQueue>,
}

/// What the cap says about one more message.
#[derive(Debug, PartialEq)]
pub enum CapDecision {
    Allowed,
    /// Over the cap; the window ends in this many seconds.
    Exceeded {
        retry_after_secs: u64,
    },
    /// Redis did not answer; allowed.
    Unchecked,
}

/// The window a moment falls in, and the seconds left in it.
pub fn window(now_secs: u64, window_secs: u64) -> (u64, u64) {
    let w = now_secs / window_secs;
    (w, (w + 1) * window_secs - now_secs)
}

impl RecipientCap {
    pub fn applies_to(&self, channel: Channel) -> bool {
        self.max > 0 && matches!(channel, Channel::Sms | Channel::Whatsapp)
    }

    pub async fn check(&self, tenant: &str, channel: Channel, to: &str) -> CapDecision {
        if !self.applies_to(channel) {
            return CapDecision::Allowed;
        }
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let (w, left) = window(now, self.window_secs);
        let key = format!("recipient_cap:{tenant}:{}:{to}:{w}", channel.as_str());
        match tokio::time::timeout(
            CHECK_TIMEOUT,
            self.redis.incr_window(&key, self.window_secs + 60),
        )
        .await
        {
            Ok(Ok(n)) if n > self.max => {
                metrics::counter!("recipient_cap_exceeded_total", "channel" => channel.as_str())
                    .increment(1);
                CapDecision::Exceeded {
                    retry_after_secs: left.max(1),
                }
            }
            Ok(Ok(_)) => CapDecision::Allowed,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "recipient cap not checked");
                metrics::counter!("recipient_cap_unavailable_total").increment(1);
                CapDecision::Unchecked
            }
            Err(_) => {
                tracing::warn!("recipient cap not checked: Redis did not answer in time");
                metrics::counter!("recipient_cap_unavailable_total").increment(1);
                CapDecision::Unchecked
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_fixed_and_say_how_long_is_left() {
        assert_eq!(window(3600, 3600), (1, 3600));
        assert_eq!(window(7199, 3600), (1, 1));
        assert_eq!(window(59, 60), (0, 1));
    }
}
