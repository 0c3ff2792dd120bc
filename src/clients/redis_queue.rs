//! Redis Streams: implements `actors::ports::Queue` with a `ConnectionManager` (it
//! reconnects by itself after Redis restarts).

use actors::domain::StreamEntry;
use actors::ports::{Dependency, DependencyError, ErrorKind, Queue, ReadFrom};
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Making a connection, unless [`RedisQueue::with_connect_timeout`] says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisQueue {
    client: redis::Client,
    connect_timeout: Duration,
    /// The longest any command may take, a blocking read included.
    response_timeout: Duration,
    conn: Mutex<Option<ConnectionManager>>,
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
    /// `ca_file`: PEM roots to trust for `rediss://` instead of the system's.
    pub fn new(
        url: &str,
        ca_file: Option<&str>,
        response_timeout: Duration,
    ) -> Result<RedisQueue, DependencyError> {
        let client = match ca_file {
            None => redis::Client::open(url).map_err(err)?,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    DependencyError::new(Dependency::Redis, format!("REDIS_CA_FILE {path:?}: {e}"))
                })?;
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(err)?
            }
        };
        Ok(RedisQueue {
            client,
            connect_timeout: CONNECT_TIMEOUT,
            response_timeout,
            conn: Mutex::new(None),
        })
    }

    pub fn with_connect_timeout(self, connect_timeout: Duration) -> RedisQueue {
        RedisQueue {
            connect_timeout,
            ..self
        }
    }

    /// The connection, made on first use and again after a failed attempt.
    async fn conn(&self) -> Result<ConnectionManager, DependencyError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let c = ConnectionManager::new_with_config(self.client.clone(), cfg)
            .await
            .map_err(err)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, DependencyError> {
        let mut c = self.conn().await?;
        cmd.query_async(&mut c).await.map_err(err)
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
                .filter_map(|(k, v)| Some((text(&k)?, v)))
                .collect();
            if info.get("name").and_then(text).as_deref() == Some(group) {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    /// Run a pipeline on the shared connection (the leases use it).
    pub(crate) async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, DependencyError> {
        let mut c = self.conn().await?;
        pipe.query_async(&mut c).await.map_err(err)
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

    /// Count one more event under `key`, which lives `ttl_secs`; the count so far.
    pub async fn incr_window(&self, key: &str, ttl_secs: u64) -> Result<u64, DependencyError> {
        let mut c = self.conn().await?;
        let (n,): (u64,) = redis::pipe()
            .cmd("INCR")
            .arg(key)
            .cmd("EXPIRE")
            .arg(key)
            .arg(ttl_secs)
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(n)
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

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// `[id, [field, value, ...]]`; a nil body (entry deleted meanwhile) yields no fields.
fn parse_entry(v: &Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let mut fields = Vec::new();
    match parts.get(1) {
        Some(Value::Array(kv)) => {
            for pair in kv.chunks(2) {
                if let [k, val] = pair {
                    fields.push((text(k)?, text(val).unwrap_or_default()));
                }
            }
        }
        Some(Value::Map(kv)) => {
            for (k, val) in kv {
                fields.push((text(k)?, text(val).unwrap_or_default()));
            }
        }
        _ => {}
    }
    Some(StreamEntry { id, fields })
}

fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(items) => items.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// XREADGROUP answers `[[stream, [entries]]]` (or a map in RESP3), nil on timeout.
fn parse_read(v: &Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => parse_entries(&pair[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        _ => Vec::new(),
    }
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
        let mut pipe = redis::pipe();
        for (stream, fields) in entries {
            let c = pipe.cmd("XADD").arg(*stream).arg("*");
            for (k, v) in fields {
                c.arg(*k).arg(v.as_str());
            }
        }
        let mut c = self.conn().await?;
        let ids: Vec<String> = pipe.query_async(&mut c).await.map_err(err)?;
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
        Ok(parse_read(&self.query(&cmd).await?))
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<(), DependencyError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.query(redis::cmd("XACK").arg(stream).arg(group).arg(ids))
            .await?;
        Ok(())
    }

    async fn autoclaim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        let (_, entries) = self
            .autoclaim_from(stream, group, consumer, min_idle, "0-0", count)
            .await?;
        Ok(entries)
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
                let next = text(&parts[0]).unwrap_or_else(|| "0-0".into());
                let entries = parse_entries(&parts[1])
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
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XRANGE").arg(stream).arg(id).arg(id);
        }
        let mut c = self.conn().await?;
        let replies: Vec<Value> = pipe.query_async(&mut c).await.map_err(err)?;
        Ok(replies.iter().flat_map(parse_entries).collect())
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

    async fn stream_lag(&self, stream: &str, group: &str) -> Result<u64, DependencyError> {
        let Some(info) = self.group_info(stream, group).await? else {
            return Ok(0);
        };
        Ok(match info.get("lag") {
            Some(Value::Int(n)) => *n as u64,
            // Nil: Redis cannot tell (entries were deleted); assume a backlog.
            _ => u64::MAX,
        })
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
                let key = |id: &str| {
                    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
                    (a.parse::<u64>().unwrap_or(0), b.parse::<u64>().unwrap_or(0))
                };
                if *n > 0 && key(&min) < key(&boundary) {
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

    fn dedicated(&self) -> Arc<dyn Queue> {
        Arc::new(RedisQueue {
            client: self.client.clone(),
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            conn: Mutex::new(None),
        })
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}
