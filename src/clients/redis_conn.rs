//! One Redis connection type over either a single server or a Redis Cluster, so that the
//! queue, the leases and the limiter send the same commands to both.
//!
//! A single server is reached through a `ConnectionManager` (it reconnects by itself after
//! a restart); a cluster through the crate's async cluster connection, which follows the
//! cluster's slot map (MOVED/ASK, a failover's new master) by itself. Both multiplex: a
//! blocking read holds up every command behind it on the same connection, which is why
//! readers ask for a connection of their own (`Queue::dedicated`).
//!
//! A pipeline is one round trip to one server. A cluster refuses one whose keys live in
//! different slots (the crate sends a pipeline to the node of its first key), so
//! [`RedisConn::batch`] groups the commands by the slot of the key each names: one
//! pipeline per slot, in the order the slots first appear or all at once. Every command
//! and script names its keys in one slot (see [`hash_tag`]).

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::collections::HashMap;
use std::time::Duration;

/// How a client is made: the servers' URLs and how long to wait for them.
pub struct Settings<'a> {
    /// One URL, or a cluster's seed nodes.
    pub urls: &'a [&'a str],
    pub cluster: bool,
    /// PEM roots to trust for `rediss://` instead of the system's.
    pub root_cert: Option<Vec<u8>>,
    pub connect_timeout: Duration,
    /// The longest any command may take, a blocking read included.
    pub response_timeout: Duration,
}

/// Where the service's Redis is.
// A few of these exist per process (one per queue): their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisTarget {
    Node(redis::Client),
    Cluster(ClusterClient),
}

/// A connection to [`RedisTarget`]; cheap to clone (clones share the connection).
#[derive(Clone)]
pub enum RedisConn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisTarget {
    /// No I/O: the URLs are only parsed.
    pub fn new(s: &Settings) -> RedisResult<RedisTarget> {
        let certs = |root_cert: Vec<u8>| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        };
        if !s.cluster {
            let url = s.urls.first().copied().unwrap_or_default();
            return Ok(RedisTarget::Node(match &s.root_cert {
                None => redis::Client::open(url)?,
                Some(pem) => redis::Client::build_with_tls(url, certs(pem.clone()))?,
            }));
        }
        let mut b = ClusterClientBuilder::new(s.urls.iter().copied())
            .connection_timeout(s.connect_timeout)
            .response_timeout(s.response_timeout)
            // A command waits through a failover's retries, up to twice its own timeout.
            .overall_response_timeout(Some(s.response_timeout * 2))
            .retries(4)
            .min_retry_wait(50)
            .max_retry_wait(1000);
        if let Some(pem) = &s.root_cert {
            b = b.certs(certs(pem.clone()));
        }
        Ok(RedisTarget::Cluster(b.build()?))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// A new connection (a cluster's: one to each node it needs).
    pub async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<RedisConn> {
        match self {
            RedisTarget::Node(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let c = ConnectionManager::new_with_config(client.clone(), cfg).await?;
                Ok(RedisConn::Node(c))
            }
            RedisTarget::Cluster(client) => {
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// One command and the key it is routed by (a script's first key).
pub type Keyed = (String, Cmd);

impl RedisConn {
    /// Run every command, one answer each in order. On one server: one pipeline. On a
    /// cluster: one pipeline per slot, one after another in the order the slots first
    /// appear when `ordered` (an earlier slot's writes land first), else all at once.
    /// Not atomic, as a pipeline is not.
    pub async fn batch(&mut self, cmds: &[Keyed], ordered: bool) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let c = match self {
            RedisConn::Node(_) => {
                let mut pipe = redis::pipe();
                for (_, cmd) in cmds {
                    pipe.add_command(cmd.clone());
                }
                return pipe.query_async(self).await;
            }
            RedisConn::Cluster(c) => c.clone(),
        };
        let groups = by_slot(cmds);
        let run = |(pipe, at): (Pipeline, Vec<usize>)| {
            let mut c = c.clone();
            async move {
                let values: Vec<Value> = pipe.query_async(&mut c).await?;
                Ok::<_, redis::RedisError>(at.into_iter().zip(values).collect::<Vec<_>>())
            }
        };
        let mut answers = vec![Value::Nil; cmds.len()];
        let done = if ordered {
            let mut done = Vec::new();
            for g in groups {
                done.push(run(g).await?);
            }
            done
        } else {
            futures::future::try_join_all(groups.into_iter().map(run)).await?
        };
        for (i, v) in done.into_iter().flatten() {
            answers[i] = v;
        }
        Ok(answers)
    }

    /// `INFO` of the server, or of every master of a cluster.
    pub async fn info(&mut self) -> RedisResult<Vec<String>> {
        let v: Value = redis::cmd("INFO").query_async(self).await?;
        Ok(match v {
            Value::Map(per_node) => per_node
                .into_iter()
                .filter_map(|(_, v)| into_text(v))
                .collect(),
            other => into_text(other).into_iter().collect(),
        })
    }
}

/// The commands grouped by slot, as pipelines with their places in `cmds`, in the order
/// the slots first appear.
fn by_slot(cmds: &[Keyed]) -> Vec<(Pipeline, Vec<usize>)> {
    let mut groups: Vec<(Pipeline, Vec<usize>)> = Vec::new();
    let mut index: HashMap<Slot, usize> = HashMap::new();
    for (i, (key, cmd)) in cmds.iter().enumerate() {
        let g = *index.entry(Slot::for_key(key)).or_insert_with(|| {
            groups.push((redis::pipe(), Vec::new()));
            groups.len() - 1
        });
        groups[g].0.add_command(cmd.clone());
        groups[g].1.push(i);
    }
    groups
}

/// The part of a key that Redis Cluster hashes to find its slot: the first non-empty
/// `{…}`, else the whole key. Keys that must meet in one script share it.
pub fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}').map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}

/// A reply's text, taking it out of the reply (a bulk string's bytes become the `String`
/// without a copy when they are UTF-8, as stream fields written by this service are).
pub fn into_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Node(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Node(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Node(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hashed_part_of_a_key() {
        let table = [
            ("log_stream", "log_stream"),
            ("sms_stream:{2}", "2"),
            ("sms_stream:{2}:dlq", "2"),
            ("{log_stream}:alive:g", "log_stream"),
            ("lease:{abc}", "abc"),
            ("a{}b", "a{}b"),
            ("a{b", "a{b"),
            ("limits:{acme}:rate:{k}", "acme"),
        ];
        for (key, tag) in table {
            assert_eq!(hash_tag(key), tag, "{key}");
        }
    }

    #[test]
    fn commands_are_grouped_by_slot_in_first_seen_order() {
        let keyed = |k: &str| (k.to_string(), redis::cmd("GET").arg(k).clone());
        let cmds = [
            keyed("log_stream"),
            keyed("sms_stream:{1}"),
            keyed("{log_stream}:reindex"),
            keyed("sms_stream:{2}"),
            keyed("sms_stream:{1}:dlq"),
        ];
        let places: Vec<Vec<usize>> = by_slot(&cmds).into_iter().map(|(_, at)| at).collect();
        assert_eq!(places, [vec![0, 2], vec![1, 4], vec![3]]);
    }
}
