//! Leases in Redis: which worker may make a record's provider call, and how many tries the
//! record has had. `MongoStore` takes them in its `claim` and gives them back (or renews
//! them) in its `record_outcomes`, so that a claim costs MongoDB no write.
//!
//! Per record: `lease:{id}` (the holder's token, expiring after the lease time) and
//! `tries:{id}` (leases ever taken, kept a week after the last).

use crate::clients::redis_queue::RedisQueue;
use actors::ports::DependencyError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How a lease is given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The lease led to no provider call (the record was final, not due, or unreadable):
    /// its try is not counted.
    Undo,
    /// The record reached a final state: its try count goes too.
    Final,
    /// A retry is scheduled: the try count stays.
    Keep,
}

impl Release {
    fn as_str(self) -> &'static str {
        match self {
            Release::Undo => "undo",
            Release::Final => "final",
            Release::Keep => "keep",
        }
    }
}

/// How long a record's try count outlives its last lease.
const TRIES_TTL_SECS: u64 = 7 * 24 * 3600;

/// What a renewal lasts until the first lease is asked for.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// KEYS: `lease:{id}`, `tries:{id}`. ARGV: token, lease ms, tries ttl. A lease already
/// held is -1, whoever holds it: a dead batch's leases are left to expire, so that a
/// message that crashes its sender is retried only after the consumer has split it from
/// the others (an XAUTOCLAIM delivers one entry at a time). The answer counts every lease
/// taken: the attempt number, which tells a crashed attempt (one that never recorded an
/// outcome) from a fresh one.
const LEASE_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return n
";

/// KEYS: `lease:{id}`, `tries:{id}`. ARGV: token, undo|final|keep. Only the holder
/// releases.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == 'undo' then
  if redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
elseif ARGV[2] == 'final' then
  redis.call('DEL', KEYS[2])
end
return 1
";

/// KEYS: `lease:{id}`. ARGV: token, lease ms.
const RENEW_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

pub struct RedisLeases {
    redis: Arc<RedisQueue>,
    /// The lease time last asked for (the senders' `stale_after`): a renewal lasts as long.
    lease_ms: AtomicU64,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl RedisLeases {
    /// Leases over the queue's connection.
    pub fn new(redis: Arc<RedisQueue>) -> RedisLeases {
        RedisLeases {
            redis,
            lease_ms: AtomicU64::new(millis(DEFAULT_LEASE)),
        }
    }

    /// Take the lease of each record for one provider call (see [`LEASE_SCRIPT`]): one
    /// answer per id, the attempt number (the count of leases ever taken on the record),
    /// or -1 when another worker holds it.
    pub async fn lease(
        &self,
        ids: &[&str],
        token: &str,
        lease: Duration,
    ) -> Result<Vec<i64>, DependencyError> {
        self.lease_ms.store(millis(lease), Ordering::Relaxed);
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("EVAL")
                .arg(LEASE_SCRIPT)
                .arg(2)
                .arg(format!("lease:{id}"))
                .arg(format!("tries:{id}"))
                .arg(token)
                .arg(millis(lease))
                .arg(TRIES_TTL_SECS);
        }
        self.redis.pipeline(&pipe).await
    }

    /// Give leases back (see [`Release`]).
    pub async fn release(
        &self,
        ids: &[(&str, Release)],
        token: &str,
    ) -> Result<(), DependencyError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (id, how) in ids {
            pipe.cmd("EVAL")
                .arg(RELEASE_SCRIPT)
                .arg(2)
                .arg(format!("lease:{id}"))
                .arg(format!("tries:{id}"))
                .arg(token)
                .arg(how.as_str())
                .ignore();
        }
        self.redis.pipeline(&pipe).await
    }

    /// Extend leases still held by `token` by the lease time last asked for: a slow
    /// outcome write keeps its leases while the sender tries again.
    pub async fn renew(&self, ids: &[&str], token: &str) -> Result<(), DependencyError> {
        if ids.is_empty() {
            return Ok(());
        }
        let lease = self.lease_ms.load(Ordering::Relaxed);
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("EVAL")
                .arg(RENEW_SCRIPT)
                .arg(1)
                .arg(format!("lease:{id}"))
                .arg(token)
                .arg(lease)
                .ignore();
        }
        self.redis.pipeline(&pipe).await
    }
}
