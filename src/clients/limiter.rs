//! The tenants' counters in Redis, all asked in one round trip: one Lua script (run by
//! its SHA-1, `EVALSHA`; its text is sent only when Redis does not know it yet) takes a
//! token from the key's bucket and checks, then counts, the daily quota, the distinct
//! recipients of the hour and the messages to one recipient. Redis runs a script
//! atomically, so processes sharing the Redis share every limit exactly.
//!
//! A refused request counts nowhere except in the token bucket (a refused request is
//! still a request).

use crate::clients::redis_queue::RedisQueue;
use actors::ports::DependencyError;
use sha1::{Digest, Sha1};
use std::sync::{Arc, OnceLock};

/// KEYS: bucket, quota, recipients (a set), cap. ARGV: rate a second, burst, quota max,
/// quota ttl s, recipients max, recipients ttl s, to, cap max, cap ttl s. A max of 0 is
/// "no limit", and its key is then not touched (a rate-only check passes one key).
/// Answers `{0, 0}` allowed, `{1, ms}` rate limited for ms, `{2, n}` over the quota,
/// `{3, n}` over the distinct recipients, `{4, n}` over the cap for this recipient.
/// The bucket's clock is Redis's (`TIME`), the same for every process.
const SCRIPT: &str = r"
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[1], 't', 'at')
  local tokens = tonumber(b[1]) or burst
  local at = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
  if tokens < 1 then return {1, math.ceil((1 - tokens) * 1000 / rate)} end
  redis.call('HSET', KEYS[1], 't', tostring(tokens - 1), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
local qmax, dmax, cmax = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[8])
if qmax > 0 then
  local n = tonumber(redis.call('GET', KEYS[2])) or 0
  if n >= qmax then return {2, n} end
end
local known = 1
if dmax > 0 then
  known = redis.call('SISMEMBER', KEYS[3], ARGV[7])
  if known == 0 then
    local n = redis.call('SCARD', KEYS[3])
    if n >= dmax then return {3, n} end
  end
end
if cmax > 0 then
  local n = tonumber(redis.call('GET', KEYS[4])) or 0
  if n >= cmax then return {4, n} end
end
if qmax > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
if dmax > 0 and known == 0 then
  redis.call('SADD', KEYS[3], ARGV[7])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
if cmax > 0 then
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[9])
end
return {0, 0}
";

fn script_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| actors::domain::to_hex(&Sha1::digest(SCRIPT.as_bytes())))
}

/// A token bucket: the rate a second and the burst (0: no bucket).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub rate_per_sec: f64,
    pub burst: f64,
}

/// A counter with a maximum (0: none) and the life of its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    pub key: String,
    pub max: u64,
    pub ttl_secs: u64,
}

/// What one request is checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Counters {
    pub bucket_key: String,
    pub bucket: Bucket,
    pub quota: Counter,
    /// The set of distinct recipients of the window.
    pub recipients: Counter,
    pub to: String,
    /// Messages to this one recipient in the window.
    pub cap: Counter,
}

/// The script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    RateLimited { wait_ms: u64 },
    OverQuota,
    OverRecipients,
    OverCap,
}

impl Outcome {
    /// `[code, n]` from the script.
    fn from_reply(code: i64, n: i64) -> Outcome {
        match code {
            1 => Outcome::RateLimited {
                wait_ms: n.max(1) as u64,
            },
            2 => Outcome::OverQuota,
            3 => Outcome::OverRecipients,
            4 => Outcome::OverCap,
            _ => Outcome::Allowed,
        }
    }
}

pub struct RedisLimiter {
    redis: Arc<RedisQueue>,
}

impl RedisLimiter {
    pub fn new(redis: Arc<RedisQueue>) -> RedisLimiter {
        RedisLimiter { redis }
    }

    /// Take a token and check and count everything in `c`, in one round trip.
    pub async fn check(&self, c: &Counters) -> Result<Outcome, DependencyError> {
        let keys = [&c.bucket_key, &c.quota.key, &c.recipients.key, &c.cap.key];
        let args = [
            c.bucket.rate_per_sec.to_string(),
            c.bucket.burst.to_string(),
            c.quota.max.to_string(),
            c.quota.ttl_secs.to_string(),
            c.recipients.max.to_string(),
            c.recipients.ttl_secs.to_string(),
            c.to.clone(),
            c.cap.max.to_string(),
            c.cap.ttl_secs.to_string(),
        ];
        let (code, n): (i64, i64) = self
            .redis
            .eval_script(SCRIPT, script_sha(), &keys, &args)
            .await?;
        Ok(Outcome::from_reply(code, n))
    }

    /// Take a token from the bucket alone (requests that send nothing).
    pub async fn take_token(
        &self,
        bucket_key: &str,
        bucket: Bucket,
    ) -> Result<Outcome, DependencyError> {
        let args = [
            bucket.rate_per_sec.to_string(),
            bucket.burst.to_string(),
            "0".into(),
            "0".into(),
            "0".into(),
            "0".into(),
            String::new(),
            "0".into(),
            "0".into(),
        ];
        let (code, n): (i64, i64) = self
            .redis
            .eval_script(SCRIPT, script_sha(), &[bucket_key], &args)
            .await?;
        Ok(Outcome::from_reply(code, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_as_outcomes() {
        assert_eq!(Outcome::from_reply(0, 0), Outcome::Allowed);
        assert_eq!(
            Outcome::from_reply(1, 250),
            Outcome::RateLimited { wait_ms: 250 }
        );
        assert_eq!(Outcome::from_reply(2, 5), Outcome::OverQuota);
        assert_eq!(Outcome::from_reply(3, 5), Outcome::OverRecipients);
        assert_eq!(Outcome::from_reply(4, 5), Outcome::OverCap);
        assert_eq!(script_sha().len(), 40);
    }
}
