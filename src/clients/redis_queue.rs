//! Redis Streams: implements `actors::ports::Queue` over a [`RedisConn`], one Redis
//! server or a Redis Cluster (it reconnects by itself after Redis restarts or fails over).
//! Every key a script or an append touches together shares a hash tag ([`hash_tag`]).

use super::redis_conn::{hash_tag, into_text, text, Keyed, RedisConn, RedisTarget, Settings};
use actors::domain::StreamEntry;
use actors::ports::{Dependency, DependencyError, ErrorKind, Queue, ReadFrom};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Making a connection, for [`RedisQueue::open`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisQueue {
    target: RedisTarget,
    connect_timeout: Duration,
    /// The longest any command may take, a blocking read included.
    response_timeout: Duration,
    conn: Mutex<Option<RedisConn>>,
    /// A stream kept at most this long: an entry over the bound is not appended, and the
    /// communication it names is marked to be indexed again from MongoDB.
    bound: Option<(String, u64)>,
}

/// Classify a Redis error by the server's error code, so callers match kinds, not text.
fn err(e: redis::RedisError) -> DependencyError {
    let kind = match e.code() {
        Some("NOGROUP") => ErrorKind::MissingGroup,
        Some("BUSYGROUP") => ErrorKind::GroupExists,
        Some("ERR") if e.detail().is_some_and(|d| d.contains("no such key")) => {
            ErrorKind::NoSuchKey
        }
        _ => ErrorKind::Unavailable,
    };
    DependencyError::new(Dependency::Redis, e).with_kind(kind)
}

impl RedisQueue {
    /// `urls`: one server's URL, or a cluster's seed nodes (`cluster`). `ca_file`: PEM
    /// roots to trust for `rediss://` instead of the system's.
    pub fn new(
        urls: &[&str],
        cluster: bool,
        ca_file: Option<&str>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<RedisQueue, DependencyError> {
        let root_cert = match ca_file {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                DependencyError::new(Dependency::Redis, format!("REDIS_CA_FILE {path:?}: {e}"))
            })?),
        };
        let target = RedisTarget::new(&Settings {
            urls,
            cluster,
            root_cert,
            connect_timeout,
            response_timeout,
        })
        .map_err(err)?;
        Ok(RedisQueue {
            target,
            connect_timeout,
            response_timeout,
            conn: Mutex::new(None),
            bound: None,
        })
    }

    /// Keep `stream` at most `max_len` entries long (see [`BOUNDED_XADD`]).
    pub fn with_stream_bound(self, stream: &str, max_len: u64) -> RedisQueue {
        RedisQueue {
            bound: Some((stream.to_string(), max_len)),
            ..self
        }
    }

    /// One server at `url`, with the default connect timeout (tests, benchmarks).
    pub fn open(url: &str, response_timeout: Duration) -> Result<RedisQueue, DependencyError> {
        RedisQueue::new(&[url], false, None, CONNECT_TIMEOUT, response_timeout)
    }

    /// The connection, made on first use and again after a failed attempt.
    async fn conn(&self) -> Result<RedisConn, DependencyError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .target
            .connect(self.connect_timeout, self.response_timeout)
            .await
            .map_err(err)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, DependencyError> {
        let mut c = self.conn().await?;
        cmd.query_async(&mut c).await.map_err(err)
    }

    /// The XADD of one entry, or the [`BOUNDED_XADD`] script for the bounded stream.
    fn append_cmd(&self, stream: &str, fields: &[(&str, String)]) -> redis::Cmd {
        let mut c = match &self.bound {
            Some((bounded, max)) if bounded == stream => {
                let id = fields.iter().find(|(k, _)| *k == "communicationId");
                let mut c = redis::cmd("EVAL");
                c.arg(BOUNDED_XADD)
                    .arg(2)
                    .arg(stream)
                    .arg(overflow_key(stream))
                    .arg(*max)
                    .arg(id.map_or("", |(_, v)| v.as_str()))
                    .arg(fields.len() * 2);
                c
            }
            _ => {
                let mut c = redis::cmd("XADD");
                c.arg(stream).arg("*");
                c
            }
        };
        for (k, v) in fields {
            c.arg(*k).arg(v.as_str());
        }
        c
    }

    /// This group's `XINFO GROUPS` fields (name → value); `None` when the stream or the
    /// group does not exist.
    async fn group_info(
        &self,
        stream: &str,
        group: &str,
    ) -> Result<Option<HashMap<String, Value>>, DependencyError> {
        let groups = match self
            .query(redis::cmd("XINFO").arg("GROUPS").arg(stream))
            .await
        {
            Ok(Value::Array(g)) => g,
            Ok(_) => return Ok(None),
            Err(e) if e.kind == ErrorKind::NoSuchKey => return Ok(None),
            Err(e) => return Err(e),
        };
        for g in groups {
            let pairs: Vec<(Value, Value)> = match g {
                Value::Array(f) => f
                    .chunks(2)
                    .filter_map(|kv| match kv {
                        [k, v] => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
                Value::Map(m) => m,
                _ => continue,
            };
            let info: HashMap<String, Value> = pairs
                .into_iter()
                .filter_map(|(k, v)| Some((into_text(k)?, v)))
                .collect();
            if info.get("name").and_then(text).as_deref() == Some(group) {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    /// The same servers over a connection of its own (made on first use): for blocking
    /// reads, and for calls that must not wait in line behind the shared connection's
    /// pipelines (the tenants' limits checks).
    pub fn own_connection(&self) -> RedisQueue {
        RedisQueue {
            target: self.target.clone(),
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            conn: Mutex::new(None),
            bound: self.bound.clone(),
        }
    }

    /// Whether this is a Redis Cluster (scripts over several records' keys are then one
    /// call a record).
    pub fn is_cluster(&self) -> bool {
        self.target.is_cluster()
    }

    /// Run commands, each with the key it is routed by, in as few round trips as the
    /// server allows (see [`RedisConn::batch`]); one answer each.
    pub(crate) async fn batch(
        &self,
        cmds: &[Keyed],
        ordered: bool,
    ) -> Result<Vec<Value>, DependencyError> {
        let mut c = self.conn().await?;
        c.batch(cmds, ordered).await.map_err(err)
    }

    /// Run a Lua script by its SHA-1 (`EVALSHA`); only when Redis does not know it (the
    /// first call, or after a restart) is its text sent (`EVAL`, which also caches it).
    pub(crate) async fn eval_script<T: redis::FromRedisValue>(
        &self,
        text: &str,
        sha: &str,
        keys: &[impl AsRef<str>],
        args: &[String],
    ) -> Result<T, DependencyError> {
        let call = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script).arg(keys.len());
            for k in keys {
                cmd.arg(k.as_ref());
            }
            cmd.arg(args);
            cmd
        };
        let mut c = self.conn().await?;
        match call("EVALSHA", sha).query_async(&mut c).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                call("EVAL", text).query_async(&mut c).await.map_err(err)
            }
            other => other.map_err(err),
        }
    }

    /// A cluster's append: each entry with the key it is routed by, in slot order (see
    /// [`RedisQueue::batch`]); a bounded stream's entry is a [`BOUNDED_XADD`] call of its own.
    async fn append_by_slot(
        &self,
        entries: &[(&str, Vec<(&str, String)>)],
    ) -> Result<Vec<Value>, DependencyError> {
        let cmds: Vec<Keyed> = entries
            .iter()
            .map(|(stream, fields)| (stream.to_string(), self.append_cmd(stream, fields)))
            .collect();
        // In order: a record's `queued` event lands before its entry can be read.
        let replies = self.batch(&cmds, true).await?;
        Ok(replies
            .into_iter()
            .map(|v| match v {
                Value::Array(mut one) if !one.is_empty() => one.swap_remove(0),
                other => other,
            })
            .collect())
    }

    /// A single server's append: one pipeline, the bounded stream's entries all in one
    /// [`BOUNDED_XADD`] call.
    async fn append_in_one_pipeline(
        &self,
        entries: &[(&str, Vec<(&str, String)>)],
    ) -> Result<Vec<Value>, DependencyError> {
        // Entries for the bounded stream go in one script call (sent as text: a pipeline
        // cannot fall back from EVALSHA), the others one XADD each, in one pipeline.
        let bounded = |stream: &str| self.bound.as_ref().filter(|(b, _)| b == stream);
        let mut pipe = redis::pipe();
        let mut script: Option<redis::Cmd> = None;
        for (stream, fields) in entries {
            if let Some((_, max)) = bounded(stream) {
                let c = script.get_or_insert_with(|| {
                    let mut c = redis::cmd("EVAL");
                    c.arg(BOUNDED_XADD)
                        .arg(2)
                        .arg(*stream)
                        .arg(overflow_key(stream))
                        .arg(*max);
                    c
                });
                let id = fields.iter().find(|(k, _)| *k == "communicationId");
                c.arg(id.map_or("", |(_, v)| v.as_str()))
                    .arg(fields.len() * 2);
                for (k, v) in fields {
                    c.arg(*k).arg(v.as_str());
                }
                continue;
            }
            let c = pipe.cmd("XADD").arg(*stream).arg("*");
            for (k, v) in fields {
                c.arg(*k).arg(v.as_str());
            }
        }
        let in_script = script.is_some();
        if let Some(c) = script {
            pipe.add_command(c);
        }
        let mut c = self.conn().await?;
        let mut replies: Vec<Value> = pipe.query_async(&mut c).await.map_err(err)?;
        let mut added = match (in_script, replies.pop()) {
            (true, Some(Value::Array(ids))) => ids.into_iter(),
            (true, _) => Vec::new().into_iter(),
            (false, last) => {
                replies.extend(last);
                Vec::new().into_iter()
            }
        };
        let mut plain = replies.into_iter();
        let replies: Vec<Value> = entries
            .iter()
            .map(|(stream, _)| {
                let next = if bounded(stream).is_some() {
                    added.next()
                } else {
                    plain.next()
                };
                next.unwrap_or(Value::Nil)
            })
            .collect();
        Ok(replies)
    }

    /// The `INFO` text (all default sections) of the server, or of each master of a cluster.
    pub async fn info(&self) -> Result<Vec<String>, DependencyError> {
        let mut c = self.conn().await?;
        c.info().await.map_err(err)
    }

    /// Length and pending count of a stream's group, for metrics and tests.
    pub async fn group_pending(&self, stream: &str, group: &str) -> Result<i64, DependencyError> {
        let v = self
            .query(redis::cmd("XPENDING").arg(stream).arg(group))
            .await?;
        match v {
            Value::Array(items) => match items.first() {
                Some(Value::Int(n)) => Ok(*n),
                _ => Ok(0),
            },
            _ => Ok(0),
        }
    }
}

/// The hash of a group's live consumers (name → until when, in Redis's clock), in the
/// stream's hash slot (`{log_stream}:alive:…` for `log_stream`), so a script may touch both.
fn alive_key(stream: &str, group: &str) -> String {
    format!("{{{}}}:alive:{group}", hash_tag(stream))
}

/// The set of communication ids whose events a full `stream` refused, in its hash slot.
fn overflow_key(stream: &str) -> String {
    format!("{{{}}}:reindex", hash_tag(stream))
}

/// XADD each entry of a batch to KEYS[1] while it holds fewer than ARGV[1] entries; an
/// entry over the bound is not added: its communication (if any) is marked in the set
/// KEYS[2], to be indexed again from MongoDB, and answered nil. ARGV[2..], per entry: the
/// communication id (or ''), the number n of field names and values, and those n. One
/// script call (one `XLEN`) for a whole batch. A mark is a few dozen bytes where an event
/// is hundreds.
const BOUNDED_XADD: &str = r#"
local max = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
local out = {}
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  if len >= max then
    if ARGV[i] ~= '' then redis.call('SADD', KEYS[2], ARGV[i]) end
    out[#out + 1] = false
  else
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 2, i + 1 + n))
    len = len + 1
  end
  i = i + 2 + n
end
return out
"#;

/// Mark a consumer alive until now + ARGV[2] ms (Redis's clock, one for every process).
const KEEP_ALIVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
return 1
"#;

/// Remove consumers of group ARGV[1] on stream KEYS[1] that are gone: not ARGV[2], no
/// pending entry, no live mark in KEYS[2], idle (and, from Redis 7.2, inactive) at least
/// ARGV[3] ms. One script, so nothing is delivered to a consumer between the check and
/// its removal (XGROUP DELCONSUMER drops the consumer's pending entries).
const FORGET_GONE: &str = r#"
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local min_idle = tonumber(ARGV[3])
local removed = {}
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  local name = info['name']
  local alive_until = tonumber(redis.call('HGET', KEYS[2], name) or '0')
  local inactive = info['inactive']
  local quiet = info['idle'] >= min_idle and (inactive == nil or inactive < 0 or inactive >= min_idle)
  if name ~= ARGV[2] and info['pending'] == 0 and alive_until < now and quiet then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    redis.call('HDEL', KEYS[2], name)
    table.insert(removed, name)
  end
end
return removed
"#;

/// A stream entry id as (milliseconds, sequence), for ordering.
fn id_key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// `[id, [field, value, ...]]`; a nil body (entry deleted meanwhile) yields no fields.
/// Every reader of a stream parses its entries here, so the reply's strings are moved into
/// the entry, not copied.
fn parse_entry(v: Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = into_text(parts.next()?)?;
    let mut fields = Vec::new();
    match parts.next() {
        Some(Value::Array(kv)) => {
            fields.reserve(kv.len() / 2);
            let mut kv = kv.into_iter();
            while let (Some(k), Some(val)) = (kv.next(), kv.next()) {
                fields.push((into_text(k)?, into_text(val).unwrap_or_default()));
            }
        }
        Some(Value::Map(kv)) => {
            for (k, val) in kv {
                fields.push((into_text(k)?, into_text(val).unwrap_or_default()));
            }
        }
        _ => {}
    }
    Some(StreamEntry { id, fields })
}

fn parse_entries(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(items) => items.into_iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// XREADGROUP answers `[[stream, [entries]]]` (or a map in RESP3), nil on timeout.
fn parse_read(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => parse_entries(pair.swap_remove(1)),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, e)| parse_entries(e))
            .collect(),
        _ => Vec::new(),
    }
}

/// A multi-stream XREADGROUP reply: each stream's entries by its name.
fn parse_read_streams(v: Value) -> std::collections::HashMap<String, Vec<StreamEntry>> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    Some((pair.next()?, pair.next()?))
                }
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams,
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, e)| Some((into_text(k)?, parse_entries(e))))
        .collect()
}

#[async_trait]
impl Queue for RedisQueue {
    async fn append(
        &self,
        entries: &[(&str, Vec<(&str, String)>)],
    ) -> Result<Vec<String>, DependencyError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let replies = if self.target.is_cluster() {
            self.append_by_slot(entries).await?
        } else {
            self.append_in_one_pipeline(entries).await?
        };
        let ids: Vec<String> = replies
            .into_iter()
            .map(|v| into_text(v).unwrap_or_default())
            .collect();
        let over = ids.iter().filter(|id| id.is_empty()).count();
        if over > 0 {
            tracing::warn!(
                n = over,
                "log_stream is full: events left to be indexed from MongoDB"
            );
            metrics::counter!("log_events_overflowed_total").increment(over as u64);
        }
        Ok(ids)
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), DependencyError> {
        let res = self
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::GroupExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        from: ReadFrom,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        let start = match from {
            ReadFrom::OwnPending(after) => after,
            ReadFrom::New => {
                cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
                ">".to_string()
            }
        };
        cmd.arg("STREAMS").arg(stream).arg(start);
        Ok(parse_read(self.query(&cmd).await?))
    }

    async fn read_lanes(
        &self,
        reads: &[(&str, ReadFrom)],
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Vec<StreamEntry>>, DependencyError> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if reads.iter().all(|(_, from)| *from == ReadFrom::New) {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for (stream, _) in reads {
            cmd.arg(*stream);
        }
        for (_, from) in reads {
            match from {
                ReadFrom::OwnPending(after) => cmd.arg(after.as_str()),
                ReadFrom::New => cmd.arg(">"),
            };
        }
        let mut per_stream = parse_read_streams(self.query(&cmd).await?);
        Ok(reads
            .iter()
            .map(|(stream, _)| per_stream.remove(*stream).unwrap_or_default())
            .collect())
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<(), DependencyError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.query(redis::cmd("XACK").arg(stream).arg(group).arg(ids))
            .await?;
        Ok(())
    }

    async fn autoclaim_from(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<(String, Vec<StreamEntry>), DependencyError> {
        let v = self
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(group)
                    .arg(consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg(start)
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        match v {
            Value::Array(parts) if parts.len() >= 2 => {
                let mut parts = parts.into_iter();
                let next = parts
                    .next()
                    .and_then(into_text)
                    .unwrap_or_else(|| "0-0".into());
                let entries = parts
                    .next()
                    .map(parse_entries)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| !e.fields.is_empty())
                    .collect();
                Ok((next, entries))
            }
            _ => Ok(("0-0".into(), Vec::new())),
        }
    }

    async fn pending_deliveries(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<(String, u64)>, DependencyError> {
        let v = self
            .query(
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(group)
                    .arg("IDLE")
                    .arg(min_idle.as_millis() as u64)
                    .arg("-")
                    .arg("+")
                    .arg(count.max(1)),
            )
            .await?;
        let Value::Array(items) = v else {
            return Ok(Vec::new());
        };
        Ok(items
            .iter()
            .filter_map(|it| match it {
                Value::Array(p) if p.len() >= 4 => {
                    let id = text(&p[0])?;
                    let n = match &p[3] {
                        Value::Int(n) => *n as u64,
                        other => text(other)?.parse().ok()?,
                    };
                    Some((id, n))
                }
                _ => None,
            })
            .collect())
    }

    async fn range(
        &self,
        stream: &str,
        ids: &[String],
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cmds: Vec<Keyed> = ids
            .iter()
            .map(|id| {
                let mut cmd = redis::cmd("XRANGE");
                cmd.arg(stream).arg(id).arg(id);
                (stream.to_string(), cmd)
            })
            .collect();
        let replies = self.batch(&cmds, false).await?;
        Ok(replies.into_iter().flat_map(parse_entries).collect())
    }

    async fn read_after(
        &self,
        stream: &str,
        after: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count.max(1));
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(stream).arg(after);
        Ok(parse_read(self.query(&cmd).await?))
    }

    async fn end_id(&self, stream: &str, first: bool) -> Result<Option<String>, DependencyError> {
        let mut cmd = redis::cmd(if first { "XRANGE" } else { "XREVRANGE" });
        if first {
            cmd.arg(stream).arg("-").arg("+");
        } else {
            cmd.arg(stream).arg("+").arg("-");
        }
        cmd.arg("COUNT").arg(1);
        let v = self.query(&cmd).await?;
        Ok(parse_entries(v).into_iter().next().map(|e| e.id))
    }

    async fn stream_stats(&self, stream: &str, group: &str) -> Result<(u64, u64), DependencyError> {
        let len = match self.query(redis::cmd("XLEN").arg(stream)).await? {
            Value::Int(n) => n as u64,
            _ => 0,
        };
        // NOGROUP: no group on this stream (dead-letter streams, or not created yet).
        let pending = match self
            .query(redis::cmd("XPENDING").arg(stream).arg(group))
            .await
        {
            Ok(Value::Array(a)) => match a.first() {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            },
            Ok(_) => 0,
            Err(e) if e.kind == ErrorKind::MissingGroup => 0,
            Err(e) => return Err(e),
        };
        Ok((len, pending))
    }

    async fn acked_up_to(
        &self,
        stream: &str,
        group: &str,
    ) -> Result<Option<DateTime<Utc>>, DependencyError> {
        let Some(info) = self.group_info(stream, group).await? else {
            return Ok(None);
        };
        let last_read = info
            .get("last-delivered-id")
            .and_then(text)
            .map_or((0, 0), |id| id_key(&id));
        let newest = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let unread = parse_entries(newest)
            .first()
            .is_some_and(|e| id_key(&e.id) > last_read);
        let mut done_up_to = unread.then_some(last_read.0);
        // The oldest pending entry, if delivered once: in a consumer's hands. One delivered
        // again is in trouble (its consumer died, its sender crashed): its record may be
        // swept, as a safety net beside autoclaim.
        let oldest = self
            .query(
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(group)
                    .arg("-")
                    .arg("+")
                    .arg(1),
            )
            .await?;
        if let Value::Array(items) = oldest {
            if let Some(Value::Array(p)) = items.first() {
                let deliveries = p.get(3).and_then(text).and_then(|n| n.parse::<u64>().ok());
                if let (Some(id), Some(1)) = (p.first().and_then(text), deliveries) {
                    let t = id_key(&id).0;
                    done_up_to = Some(done_up_to.map_or(t, |d| d.min(t)));
                }
            }
        }
        Ok(done_up_to.and_then(|ms| DateTime::from_timestamp_millis(ms as i64)))
    }

    async fn trim_acked(&self, stream: &str, group: &str) -> Result<u64, DependencyError> {
        let last_delivered = self
            .group_info(stream, group)
            .await?
            .and_then(|info| info.get("last-delivered-id").and_then(text));
        let Some(mut boundary) = last_delivered.filter(|id| id != "0-0") else {
            return Ok(0);
        };
        if let Value::Array(p) = self
            .query(redis::cmd("XPENDING").arg(stream).arg(group))
            .await?
        {
            if let (Some(Value::Int(n)), Some(min)) = (p.first(), p.get(1).and_then(text)) {
                if *n > 0 && id_key(&min) < id_key(&boundary) {
                    boundary = min;
                }
            }
        }
        match self
            .query(redis::cmd("XTRIM").arg(stream).arg("MINID").arg(&boundary))
            .await?
        {
            Value::Int(n) => Ok(n as u64),
            _ => Ok(0),
        }
    }

    async fn keep_alive(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<(), DependencyError> {
        self.query(
            redis::cmd("EVAL")
                .arg(KEEP_ALIVE)
                .arg(1)
                .arg(alive_key(stream, group))
                .arg(consumer)
                .arg(ttl.as_millis() as u64),
        )
        .await?;
        Ok(())
    }

    async fn forget_gone_consumers(
        &self,
        stream: &str,
        group: &str,
        keep: &str,
        idle: Duration,
    ) -> Result<Vec<String>, DependencyError> {
        let v = self
            .query(
                redis::cmd("EVAL")
                    .arg(FORGET_GONE)
                    .arg(2)
                    .arg(stream)
                    .arg(alive_key(stream, group))
                    .arg(group)
                    .arg(keep)
                    .arg(idle.as_millis() as u64),
            )
            .await?;
        Ok(match v {
            Value::Array(names) => names.iter().filter_map(text).collect(),
            _ => Vec::new(),
        })
    }

    async fn overflowed(&self, stream: &str, count: usize) -> Result<Vec<String>, DependencyError> {
        let v = self
            .query(
                redis::cmd("SRANDMEMBER")
                    .arg(overflow_key(stream))
                    .arg(count.max(1)),
            )
            .await?;
        Ok(match v {
            Value::Array(ids) => ids.iter().filter_map(text).collect(),
            Value::Set(ids) => ids.iter().filter_map(text).collect(),
            _ => Vec::new(),
        })
    }

    async fn forget_overflowed(&self, stream: &str, ids: &[String]) -> Result<(), DependencyError> {
        if !ids.is_empty() {
            self.query(redis::cmd("SREM").arg(overflow_key(stream)).arg(ids))
                .await?;
        }
        Ok(())
    }

    fn dedicated(&self) -> Arc<dyn Queue> {
        Arc::new(self.own_connection())
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}
