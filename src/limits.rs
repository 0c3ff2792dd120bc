//! The limits of a tenant, held in Redis so that they hold across processes and restarts:
//! the per-key rate (a token bucket), a daily quota per channel, the distinct SMS/WhatsApp
//! recipients an hour, and the messages to one recipient in a window (the per-recipient
//! cap, against loops that would text somebody, and the invoice, without end). One round
//! trip a request (`clients::limiter`).
//!
//! When Redis does not answer within `tenants.check_timeout_ms`, a channel listed in
//! `tenants.fail_open` is let through (counted: `limiter_unavailable_total{outcome=
//! "allowed"}`); the others, SMS and WhatsApp by default, are refused with 503 and
//! nothing is stored. Requests that send nothing (reads) are let through.

use crate::clients::limiter::{Bucket, Counter, Counters, Outcome, RedisLimiter};
use crate::tenants::TenantPolicy;
use actors::domain::Channel;
use chrono::{DateTime, TimeZone, Utc};
use std::time::Duration;

const DAY_SECS: u64 = 86_400;
const HOUR_SECS: u64 = 3_600;

pub struct Limiter {
    /// Messages to one number per tenant and channel in a window (0: no cap).
    pub recipient_max: u64,
    pub recipient_window_secs: u64,
    /// Channels accepted when Redis cannot be asked.
    pub fail_open: Vec<Channel>,
    /// How long Redis may take to answer.
    pub timeout: Duration,
    pub redis: RedisLimiter,
}

/// What the limits say about one more request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allowed,
    /// Redis did not answer; let through (a fail-open channel, or a read).
    Unchecked,
    /// The key's bucket is empty; retry after this long.
    RateLimited(Duration),
    /// The channel's daily quota is spent; it resets at `reset_at` (next UTC midnight).
    QuotaExceeded {
        max: u64,
        reset_at: DateTime<Utc>,
        retry_after_secs: u64,
    },
    /// This hour's distinct recipients are spent (a new number is refused).
    TooManyRecipients {
        max: u64,
        retry_after_secs: u64,
    },
    /// This number has had the most messages of the window.
    RecipientLimit {
        max: u64,
        retry_after_secs: u64,
    },
    /// Redis did not answer and the channel fails closed.
    Unavailable,
}

/// The window a moment falls in, and the seconds left in it.
pub fn window(now_secs: u64, window_secs: u64) -> (u64, u64) {
    let w = now_secs / window_secs;
    (w, (w + 1) * window_secs - now_secs)
}

/// The key of one tenant's limit. The tenant is a hash tag (`{…}`), so a Redis Cluster
/// keeps one tenant's keys, which one script touches together, in one slot.
fn key(tenant: &str, rest: std::fmt::Arguments) -> String {
    format!("limits:{{{tenant}}}:{rest}")
}

/// Who asks: the tenant, its key's id (never the key) and the tenant's policy.
pub struct Caller<'a> {
    pub tenant: &'a str,
    pub key_id: &'a str,
    pub policy: &'a TenantPolicy,
}

impl Caller<'_> {
    fn bucket_key(&self) -> String {
        key(self.tenant, format_args!("rate:{}", self.key_id))
    }

    fn bucket(&self) -> Bucket {
        Bucket {
            rate_per_sec: self.policy.rate_per_sec,
            burst: self.policy.burst,
        }
    }
}

impl Limiter {
    /// The counters of one message at `now_secs` (pure).
    pub fn counters(&self, who: &Caller, channel: Channel, to: &str, now_secs: u64) -> Counters {
        let t = who.tenant;
        let ch = channel.as_str();
        let phone = channel != Channel::Email;
        let (day, _) = window(now_secs, DAY_SECS);
        let (hour, _) = window(now_secs, HOUR_SECS);
        let cap_window = self.recipient_window_secs.max(1);
        let (w, _) = window(now_secs, cap_window);
        Counters {
            bucket_key: who.bucket_key(),
            bucket: who.bucket(),
            quota: Counter {
                key: key(t, format_args!("quota:{ch}:{day}")),
                max: *who.policy.daily_quota.get(channel),
                ttl_secs: DAY_SECS + HOUR_SECS,
            },
            recipients: Counter {
                key: key(t, format_args!("recipients:{hour}")),
                max: if phone {
                    who.policy.recipients_per_hour
                } else {
                    0
                },
                ttl_secs: HOUR_SECS + 60,
            },
            to: to.to_string(),
            cap: Counter {
                key: key(t, format_args!("cap:{ch}:{to}:{w}")),
                max: if phone { self.recipient_max } else { 0 },
                ttl_secs: cap_window + 60,
            },
        }
    }

    /// What the script's answer means at `now_secs` (pure).
    pub fn verdict(&self, outcome: Outcome, c: &Counters, now_secs: u64) -> Verdict {
        match outcome {
            Outcome::Allowed => Verdict::Allowed,
            Outcome::RateLimited { wait_ms } => {
                Verdict::RateLimited(Duration::from_millis(wait_ms))
            }
            Outcome::OverQuota => {
                let (day, left) = window(now_secs, DAY_SECS);
                let reset = ((day + 1) * DAY_SECS) as i64;
                Verdict::QuotaExceeded {
                    max: c.quota.max,
                    reset_at: Utc.timestamp_opt(reset, 0).single().unwrap_or_default(),
                    retry_after_secs: left,
                }
            }
            Outcome::OverRecipients => Verdict::TooManyRecipients {
                max: c.recipients.max,
                retry_after_secs: window(now_secs, HOUR_SECS).1,
            },
            Outcome::OverCap => Verdict::RecipientLimit {
                max: c.cap.max,
                retry_after_secs: window(now_secs, self.recipient_window_secs.max(1)).1,
            },
        }
    }

    /// Check and count one message of `channel` to `to`.
    pub async fn admit(&self, who: &Caller<'_>, channel: Channel, to: &str) -> Verdict {
        self.admit_counted(who, channel, to, true).await
    }

    /// Check and count one recipient of a bulk send: its quota, distinct recipients and
    /// per-recipient cap, but no token (the bulk request took one for all of them).
    pub async fn admit_recipient(&self, who: &Caller<'_>, channel: Channel, to: &str) -> Verdict {
        self.admit_counted(who, channel, to, false).await
    }

    async fn admit_counted(
        &self,
        who: &Caller<'_>,
        channel: Channel,
        to: &str,
        with_token: bool,
    ) -> Verdict {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let mut c = self.counters(who, channel, to, now);
        if !with_token {
            c.bucket = Bucket {
                rate_per_sec: 0.0,
                burst: 0.0,
            };
        }
        match tokio::time::timeout(self.timeout, self.redis.check(&c)).await {
            Ok(Ok(outcome)) => {
                let v = self.verdict(outcome, &c, now);
                count_refusal(&v, channel.as_str());
                v
            }
            Ok(Err(e)) => self.unanswered(channel, &e.to_string()),
            Err(_) => self.unanswered(channel, "Redis did not answer in time"),
        }
    }

    /// Take a token for a request that sends nothing; let through if Redis cannot say.
    pub async fn take_token(&self, who: &Caller<'_>) -> Verdict {
        let bucket_key = who.bucket_key();
        let ask = self.redis.take_token(&bucket_key, who.bucket());
        match tokio::time::timeout(self.timeout, ask).await {
            Ok(Ok(Outcome::RateLimited { wait_ms })) => {
                count_refusal(&Verdict::RateLimited(Duration::ZERO), "none");
                Verdict::RateLimited(Duration::from_millis(wait_ms))
            }
            Ok(Ok(_)) => Verdict::Allowed,
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("limiter_unavailable_total", "channel" => "none", "outcome" => "allowed")
                    .increment(1);
                Verdict::Unchecked
            }
        }
    }

    fn unanswered(&self, channel: Channel, why: &str) -> Verdict {
        let open = self.fail_open.contains(&channel);
        let outcome = if open { "allowed" } else { "refused" };
        tracing::warn!(
            channel = channel.as_str(),
            outcome,
            error = why,
            "Tenant limits not checked."
        );
        metrics::counter!("limiter_unavailable_total", "channel" => channel.as_str(), "outcome" => outcome)
            .increment(1);
        if open {
            Verdict::Unchecked
        } else {
            Verdict::Unavailable
        }
    }
}

fn count_refusal(v: &Verdict, channel: &'static str) {
    let reason = match v {
        Verdict::RateLimited(_) => "rate",
        Verdict::QuotaExceeded { .. } => "quota",
        Verdict::TooManyRecipients { .. } => "recipients",
        Verdict::RecipientLimit { .. } => "recipient_cap",
        _ => return,
    };
    metrics::counter!("tenant_limit_refusals_total", "reason" => reason, "channel" => channel)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::{Defaults, PerChannel, Tenants};
    use std::collections::HashMap;

    #[test]
    fn windows_are_fixed_and_say_how_long_is_left() {
        assert_eq!(window(3600, 3600), (1, 3600));
        assert_eq!(window(7199, 3600), (1, 1));
        assert_eq!(window(59, 60), (0, 1));
    }

    fn policy() -> TenantPolicy {
        let d = Defaults {
            countries: vec!["+1".into()],
            daily_quota: PerChannel {
                email: 0,
                sms: 100,
                whatsapp: 50,
            },
            recipients_per_hour: 20,
            rate_per_sec: 5.0,
            burst: 10.0,
            default_from: PerChannel::default(),
            dev_mode: false,
        };
        Tenants::new(&HashMap::new(), &d)
            .policy("acme")
            .as_ref()
            .clone()
    }

    async fn limiter() -> Limiter {
        let q = crate::clients::redis_queue::RedisQueue::open(
            "redis://127.0.0.1:1",
            Duration::from_millis(10),
        )
        .unwrap();
        Limiter {
            recipient_max: 3,
            recipient_window_secs: 600,
            fail_open: vec![Channel::Email],
            timeout: Duration::from_millis(100),
            redis: RedisLimiter::new(std::sync::Arc::new(q)),
        }
    }

    #[tokio::test]
    async fn counters_per_channel_and_what_a_refusal_says() {
        let l = limiter().await;
        let p = policy();
        let who = Caller {
            tenant: "acme",
            key_id: "k1",
            policy: &p,
        };
        let now = 20_000 * DAY_SECS + 5 * HOUR_SECS + 30;
        let sms = l.counters(&who, Channel::Sms, "+15550001111", now);
        assert_eq!(sms.bucket_key, "limits:{acme}:rate:k1");
        assert_eq!(sms.quota.key, "limits:{acme}:quota:sms:20000");
        assert_eq!(
            (sms.quota.max, sms.recipients.max, sms.cap.max),
            (100, 20, 3)
        );
        assert_eq!(
            sms.recipients.key,
            format!("limits:{{acme}}:recipients:{}", now / HOUR_SECS)
        );
        let mail = l.counters(&who, Channel::Email, "a@example.com", now);
        assert_eq!(
            (mail.quota.max, mail.recipients.max, mail.cap.max),
            (0, 0, 0)
        );
        match l.verdict(Outcome::OverQuota, &sms, now) {
            Verdict::QuotaExceeded {
                max,
                reset_at,
                retry_after_secs,
            } => {
                assert_eq!(max, 100);
                assert_eq!(reset_at.timestamp() as u64, 20_001 * DAY_SECS);
                assert_eq!(retry_after_secs, DAY_SECS - 5 * HOUR_SECS - 30);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            l.verdict(Outcome::OverRecipients, &sms, now),
            Verdict::TooManyRecipients {
                max: 20,
                retry_after_secs: HOUR_SECS - 30
            }
        );
    }

    #[tokio::test]
    async fn without_redis_sms_is_refused_and_email_let_through() {
        let l = limiter().await;
        let p = policy();
        let who = Caller {
            tenant: "acme",
            key_id: "k1",
            policy: &p,
        };
        assert_eq!(
            l.admit(&who, Channel::Sms, "+15550001111").await,
            Verdict::Unavailable
        );
        assert_eq!(
            l.admit(&who, Channel::Whatsapp, "+15550001111").await,
            Verdict::Unavailable
        );
        assert_eq!(
            l.admit(&who, Channel::Email, "a@example.com").await,
            Verdict::Unchecked
        );
        assert_eq!(l.take_token(&who).await, Verdict::Unchecked);
    }
}
