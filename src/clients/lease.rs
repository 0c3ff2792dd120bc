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
//!
//! One round trip a batch: on a single server each operation is one script call
//! (`EVALSHA`, the text sent only when Redis does not know it yet) over every record of
//! the batch; on a cluster, whose records' keys lie in different slots, one call a record,
//! sent together, grouped by slot. And a lease this
//! client took or renewed less than [`FRESH`] of its time ago is known to be held (its
//! expiry is counted from before the request left), so confirming it (before a provider
//! call, before an outcome write) costs no round trip at all.

use crate::clients::redis_conn::Keyed;
use crate::clients::redis_queue::RedisQueue;
use actors::ports::{Dependency, DependencyError};
use redis::Value;
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A lease confirmed less than this part of its time ago (a claim, a renewal) is confirmed
/// again without asking Redis: it has at least three quarters of its time left, and the
/// sender's renewals (every third of it) come long before it could lapse.
const FRESH: u32 = 4;

/// KEYS: `lease:{id}`, `tries:{id}` for each record of the batch. ARGV: token, lease ms,
/// tries ttl. One answer per record: the attempt number (leases ever taken on it, this
/// one included), or -1 when the lease is already held, whoever holds it: a dead batch's
/// leases are left to expire, so that a message that crashes its sender is retried only
/// after the consumer has split it from the others (an XAUTOCLAIM delivers one entry at a
/// time). The attempt number tells a crashed attempt (one that never recorded an outcome)
/// from a fresh one.
const LEASE_SCRIPT: &str = r"
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local n = redis.call('INCR', KEYS[i + 1])
    redis.call('EXPIRE', KEYS[i + 1], ARGV[3])
    out[#out + 1] = n
  else
    out[#out + 1] = -1
  end
end
return out
";

/// KEYS: `lease:{id}`, `tries:{id}` for each record. ARGV: token, then undo|final|keep for
/// each record. Only the holder releases. Answers how many were released.
const RELEASE_SCRIPT: &str = r"
local n = 0
for i = 1, #KEYS, 2 do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    local how = ARGV[(i + 1) / 2 + 1]
    if how == 'final' then
      redis.call('DEL', KEYS[i], KEYS[i + 1])
    else
      redis.call('DEL', KEYS[i])
      if how == 'undo' and redis.call('DECR', KEYS[i + 1]) <= 0 then
        redis.call('DEL', KEYS[i + 1])
      end
    end
    n = n + 1
  end
end
return n
";

/// KEYS: `lease:{id}`, `tries:{id}` for each record. ARGV: token, lease ms, then the
/// claim's try number for each record. The holder's lease is extended; a lease that lapsed
/// is taken again only while the try count shows that nobody has claimed the record since
/// (any claim counts a try). One answer per record, 1: held.
const RENEW_SCRIPT: &str = r"
local out = {}
for i = 1, #KEYS, 2 do
  local cur = redis.call('GET', KEYS[i])
  local held = 0
  if cur == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    held = 1
  elseif not cur
      and tonumber(redis.call('GET', KEYS[i + 1]) or '0') == tonumber(ARGV[(i + 1) / 2 + 2]) then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    held = 1
  end
  out[#out + 1] = held
end
return out
";

/// A Lua script and its SHA-1 (`EVALSHA`), computed once.
struct Script {
    text: &'static str,
    sha: String,
}

impl Script {
    fn new(text: &'static str) -> Script {
        Script {
            text,
            sha: actors::domain::to_hex(&Sha1::digest(text.as_bytes())),
        }
    }
}

/// A lease this client holds, as far as it knows: its token and a time before which it
/// cannot have lapsed (its expiry, counted from before the request that set it left).
struct Known {
    token: String,
    until: Instant,
}

pub struct RedisLeases {
    redis: Arc<RedisQueue>,
    lease_script: Script,
    release_script: Script,
    renew_script: Script,
    /// The leases this client took or renewed, by record id; given-back and lapsed ones
    /// are dropped.
    known: Mutex<HashMap<String, Known>>,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// The keys of these records, in the scripts' order; each record's id is their hash tag.
fn keys<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    ids.flat_map(|id| [format!("lease:{{{id}}}"), format!("tries:{{{id}}}")])
        .collect()
}

/// The integers of the scripts' answers, in order (arrays flattened).
fn ints(values: Vec<Value>) -> Result<Vec<i64>, DependencyError> {
    let mut out = Vec::new();
    for v in values {
        match v {
            Value::Array(items) => {
                for i in items {
                    out.push(
                        redis::from_redis_value_ref(&i)
                            .map_err(|e| DependencyError::new(Dependency::Redis, e))?,
                    );
                }
            }
            other => out.push(
                redis::from_redis_value_ref(&other)
                    .map_err(|e| DependencyError::new(Dependency::Redis, e))?,
            ),
        }
    }
    Ok(out)
}

impl RedisLeases {
    /// Leases over the queue's connection.
    pub fn new(redis: Arc<RedisQueue>) -> RedisLeases {
        RedisLeases {
            redis,
            lease_script: Script::new(LEASE_SCRIPT),
            release_script: Script::new(RELEASE_SCRIPT),
            renew_script: Script::new(RENEW_SCRIPT),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Run `s` over these records with the arguments `common` to all, then `per[i]` for
    /// record `i` (if any): one call on a single server; on a cluster one call a record.
    async fn run(
        &self,
        s: &Script,
        ids: &[&str],
        common: &[String],
        per: &[String],
    ) -> Result<Vec<Value>, DependencyError> {
        if !self.redis.is_cluster() {
            let args: Vec<String> = common.iter().chain(per).cloned().collect();
            let v: Value = self
                .redis
                .eval_script(s.text, &s.sha, &keys(ids.iter().copied()), &args)
                .await?;
            return Ok(vec![v]);
        }
        let cmds: Vec<Keyed> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let k = keys(std::iter::once(*id));
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(s.text).arg(2).arg(&k[0]).arg(&k[1]).arg(common);
                if let Some(p) = per.get(i) {
                    cmd.arg(p);
                }
                (k[0].clone(), cmd)
            })
            .collect();
        self.redis.batch(&cmds, false).await
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note leases held from `sent` (before the request left) for `lease`.
    fn remember<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
        token: &str,
        sent: Instant,
        lease: Duration,
    ) {
        let mut known = self.known();
        // Lapsed ones go: a batch that died or never gave its leases back leaves them.
        known.retain(|_, k| k.until > sent);
        for id in ids {
            let until = sent + lease;
            known.insert(
                id.to_string(),
                Known {
                    token: token.to_string(),
                    until,
                },
            );
        }
    }

    /// Whether this client knows `token` holds the lease of `id` with more than
    /// `1 - 1/FRESH` of `lease` left.
    fn fresh(known: &HashMap<String, Known>, id: &str, token: &str, lease: Duration) -> bool {
        known.get(id).is_some_and(|k| {
            k.token == token
                && k.until.saturating_duration_since(Instant::now()) > lease - lease / FRESH
        })
    }

    /// Take the lease of each record for one provider call (see [`LEASE_SCRIPT`]), in one
    /// script call: one answer per id, the attempt number (the count of leases ever taken
    /// on the record), or -1 when another worker holds it.
    pub async fn lease(
        &self,
        ids: &[&str],
        token: &str,
        lease: Duration,
    ) -> Result<Vec<i64>, DependencyError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let args = [
            token.to_string(),
            millis(lease).to_string(),
            TRIES_TTL_SECS.to_string(),
        ];
        let sent = Instant::now();
        let tries = ints(self.run(&self.lease_script, ids, &args, &[]).await?)?;
        let taken = ids.iter().zip(&tries).filter(|(_, n)| **n > 0);
        self.remember(taken.map(|(id, _)| *id), token, sent, lease);
        Ok(tries)
    }

    /// Give leases back (see [`Release`]), in one script call.
    pub async fn release(
        &self,
        ids: &[(&str, Release)],
        token: &str,
    ) -> Result<(), DependencyError> {
        if ids.is_empty() {
            return Ok(());
        }
        {
            let mut known = self.known();
            for (id, _) in ids {
                if known.get(*id).is_some_and(|k| k.token == token) {
                    known.remove(*id);
                }
            }
        }
        let per: Vec<String> = ids
            .iter()
            .map(|(_, how)| how.as_str().to_string())
            .collect();
        let just_ids: Vec<&str> = ids.iter().map(|(id, _)| *id).collect();
        self.run(&self.release_script, &just_ids, &[token.to_string()], &per)
            .await?;
        Ok(())
    }

    /// Keep the leases of these claims (record id, try number) for another `lease` (see
    /// [`RENEW_SCRIPT`]), in one script call for those not confirmed less than a
    /// [`FRESH`]th of `lease` ago (they are held, and answered so without a round trip):
    /// one answer per claim, `false` where another worker has claimed the record since.
    pub async fn renew(
        &self,
        claims: &[(&str, u32)],
        token: &str,
        lease: Duration,
    ) -> Result<Vec<bool>, DependencyError> {
        let ask: Vec<(usize, &(&str, u32))> = {
            let known = self.known();
            claims
                .iter()
                .enumerate()
                .filter(|(_, (id, _))| !Self::fresh(&known, id, token, lease))
                .collect()
        };
        let mut held = vec![true; claims.len()];
        if ask.is_empty() {
            return Ok(held);
        }
        let common = [token.to_string(), millis(lease).to_string()];
        let per: Vec<String> = ask
            .iter()
            .map(|(_, (_, attempt))| attempt.to_string())
            .collect();
        let ask_ids: Vec<&str> = ask.iter().map(|(_, (id, _))| *id).collect();
        let sent = Instant::now();
        let answers = ints(
            self.run(&self.renew_script, &ask_ids, &common, &per)
                .await?,
        )?;
        // An answer missing is a lease not held.
        for (n, (i, _)) in ask.iter().enumerate() {
            held[*i] = answers.get(n) == Some(&1);
        }
        let (kept, lost): (Vec<_>, Vec<_>) = ask.iter().partition(|(i, _)| held[*i]);
        self.remember(kept.iter().map(|(_, (id, _))| *id), token, sent, lease);
        let mut known = self.known();
        for (_, (id, _)) in lost {
            if known.get(*id).is_some_and(|k| k.token == token) {
                known.remove(*id);
            }
        }
        Ok(held)
    }
}
