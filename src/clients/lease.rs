//! Leases in Redis: which worker may make a record's provider call, and how many tries the
//! record has had. `MongoStore` takes them in its `claim`, the sender confirms and renews
//! them around each provider call (`renew`), and `record_outcomes` checks them before it
//! writes and gives them back after, so that a claim costs MongoDB no write. The try count
//! is the lease's fencing token: it grows with every claim, so a worker whose lease lapsed
//! can tell whether somebody else has claimed the record since.
//!
//! Per record: `lease:{<id>}` (the holder's token, expiring after the lease time) and
//! `tries:{<id>}` (leases ever taken, kept a week after the last): the record id is their
//! hash tag, so a Redis Cluster keeps both in one slot for the scripts that touch both.

use crate::clients::redis_conn::Keyed;
use crate::clients::redis_queue::RedisQueue;
use actors::ports::{Dependency, DependencyError};
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

/// KEYS: `lease:{<id>}`, `tries:{<id>}`. ARGV: token, lease ms, tries ttl. A lease already
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

/// KEYS: `lease:{<id>}`, `tries:{<id>}`. ARGV: token, undo|final|keep. Only the holder
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

/// KEYS: `lease:{<id>}`, `tries:{<id>}`. ARGV: token, lease ms, the claim's try number.
/// The holder's lease is extended; a lease that lapsed is taken again only while the try
/// count shows that nobody has claimed the record since (any claim counts a try). 1: held.
const RENEW_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

pub struct RedisLeases {
    redis: Arc<RedisQueue>,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// One script call on a record's two keys, routed by them.
fn script(text: &str, id: &str) -> Keyed {
    let lease = format!("lease:{{{id}}}");
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(text)
        .arg(2)
        .arg(&lease)
        .arg(format!("tries:{{{id}}}"));
    (lease, cmd)
}

/// The scripts' integer answers.
fn ints(values: Vec<redis::Value>) -> Result<Vec<i64>, DependencyError> {
    values
        .iter()
        .map(|v| {
            redis::from_redis_value_ref(v).map_err(|e| DependencyError::new(Dependency::Redis, e))
        })
        .collect()
}

impl RedisLeases {
    /// Leases over the queue's connection.
    pub fn new(redis: Arc<RedisQueue>) -> RedisLeases {
        RedisLeases { redis }
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
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cmds: Vec<Keyed> = ids
            .iter()
            .map(|id| {
                let (key, mut cmd) = script(LEASE_SCRIPT, id);
                cmd.arg(token).arg(millis(lease)).arg(TRIES_TTL_SECS);
                (key, cmd)
            })
            .collect();
        ints(self.redis.batch(&cmds, false).await?)
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
        let cmds: Vec<Keyed> = ids
            .iter()
            .map(|(id, how)| {
                let (key, mut cmd) = script(RELEASE_SCRIPT, id);
                cmd.arg(token).arg(how.as_str());
                (key, cmd)
            })
            .collect();
        self.redis.batch(&cmds, false).await?;
        Ok(())
    }

    /// Keep the leases of these claims (record id, try number) for another `lease` (see
    /// [`RENEW_SCRIPT`]): one answer per claim, `false` where another worker has claimed
    /// the record since.
    pub async fn renew(
        &self,
        claims: &[(&str, u32)],
        token: &str,
        lease: Duration,
    ) -> Result<Vec<bool>, DependencyError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let cmds: Vec<Keyed> = claims
            .iter()
            .map(|(id, attempt)| {
                let (key, mut cmd) = script(RENEW_SCRIPT, id);
                cmd.arg(token).arg(millis(lease)).arg(*attempt);
                (key, cmd)
            })
            .collect();
        let held = ints(self.redis.batch(&cmds, false).await?)?;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }
}
