//! Redis Streams in memory: streams of entries, consumer groups with a last-delivered id
//! and a pending list per entry (consumer, last delivery, delivery count).

use super::{lock, Script};
use crate::domain::StreamEntry;
use crate::ports::{Dependency, DependencyError, ErrorKind, Queue, ReadFrom};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueMethod {
    Append,
    EnsureGroup,
    ReadGroup,
    Ack,
    Autoclaim,
    PendingDeliveries,
    Range,
    StreamStats,
    AckedUpTo,
    TrimAcked,
    KeepAlive,
    ForgetGone,
    Overflowed,
    ForgetOverflowed,
    Ping,
}

#[derive(Debug, Clone)]
struct Delivery {
    consumer: String,
    at: Instant,
    count: u64,
}

#[derive(Debug, Default)]
struct Group {
    last_delivered: u64,
    pending: BTreeMap<u64, Delivery>,
    /// Every consumer that read or claimed, with when it last did.
    consumers: HashMap<String, Instant>,
    /// Live marks: consumer → until when.
    alive: HashMap<String, Instant>,
}

#[derive(Debug, Default)]
struct Stream {
    entries: BTreeMap<u64, Vec<(String, String)>>,
    /// When each entry was appended (kept after a trim), as Redis's entry ids tell.
    appended_at: BTreeMap<u64, DateTime<Utc>>,
    groups: HashMap<String, Group>,
}

#[derive(Debug)]
struct Shared {
    script: Script<QueueMethod>,
    streams: Mutex<HashMap<String, Stream>>,
    next_id: Mutex<u64>,
    appended: Notify,
    /// Per bounded stream, the communication ids its events overflowed for.
    overflow: Mutex<HashMap<String, BTreeSet<String>>>,
}

/// Entry ids are `{n}-0`, `n` counting up across all streams. Clones share the streams
/// (as `dedicated` connections to one server do).
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue {
            shared: Arc::new(Shared {
                script: Script::new(Dependency::Redis),
                streams: Mutex::new(HashMap::new()),
                next_id: Mutex::new(0),
                appended: Notify::new(),
                overflow: Mutex::new(HashMap::new()),
            }),
        }
    }
}

fn seq(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn entry(n: u64, fields: &[(String, String)]) -> StreamEntry {
    StreamEntry {
        id: format!("{n}-0"),
        fields: fields.to_vec(),
    }
}

fn missing_group(stream: &str, group: &str) -> DependencyError {
    DependencyError::new(Dependency::Redis, format!("NOGROUP {stream} {group}"))
        .with_kind(ErrorKind::MissingGroup)
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn script(&self) -> &Script<QueueMethod> {
        &self.shared.script
    }

    /// Every entry of `stream` still held, in order.
    pub fn entries(&self, stream: &str) -> Vec<StreamEntry> {
        lock(&self.shared.streams)
            .get(stream)
            .map(|s| s.entries.iter().map(|(n, f)| entry(*n, f)).collect())
            .unwrap_or_default()
    }

    /// The ids of the entries of `stream` pending in `group`, with their consumer.
    pub fn pending(&self, stream: &str, group: &str) -> Vec<(String, String)> {
        lock(&self.shared.streams)
            .get(stream)
            .and_then(|s| s.groups.get(group))
            .map(|g| {
                g.pending
                    .iter()
                    .map(|(n, d)| (format!("{n}-0"), d.consumer.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The consumers `group` of `stream` knows, sorted.
    pub fn consumers(&self, stream: &str, group: &str) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.shared.streams)
            .get(stream)
            .and_then(|s| s.groups.get(group))
            .map(|g| g.consumers.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Mark communication `id` as one whose event `stream` refused (it was full).
    pub fn mark_overflowed(&self, stream: &str, id: &str) {
        lock(&self.shared.overflow)
            .entry(stream.to_string())
            .or_default()
            .insert(id.to_string());
    }

    /// Forget every stream and group, as a Redis restarted without its data.
    pub fn flush_all(&self) {
        lock(&self.shared.streams).clear();
    }

    /// One read attempt; `None` when the group is missing.
    fn read_now(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        from: &ReadFrom,
        count: usize,
    ) -> Option<Vec<StreamEntry>> {
        let mut all = lock(&self.shared.streams);
        let s = all.get_mut(stream)?;
        let g = s.groups.get_mut(group)?;
        let now = Instant::now();
        g.consumers.insert(consumer.to_string(), now);
        let picked: Vec<u64> = match from {
            ReadFrom::OwnPending(after) => g
                .pending
                .range(seq(after) + 1..)
                .filter(|(_, d)| d.consumer == consumer)
                .map(|(n, _)| *n)
                .take(count)
                .collect(),
            ReadFrom::New => s
                .entries
                .range(g.last_delivered + 1..)
                .map(|(n, _)| *n)
                .take(count)
                .collect(),
        };
        if let ReadFrom::OwnPending(_) = from {
            // As XREADGROUP with an id: delivered again, so no longer idle.
            for n in &picked {
                if let Some(d) = g.pending.get_mut(n) {
                    d.at = now;
                    d.count += 1;
                }
            }
        }
        if let ReadFrom::New = from {
            for n in &picked {
                g.last_delivered = *n;
                g.pending.insert(
                    *n,
                    Delivery {
                        consumer: consumer.to_string(),
                        at: now,
                        count: 1,
                    },
                );
            }
        }
        Some(
            picked
                .iter()
                .filter_map(|n| s.entries.get(n).map(|f| entry(*n, f)))
                .collect(),
        )
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn append(
        &self,
        entries: &[(&str, Vec<(&str, String)>)],
    ) -> Result<Vec<String>, DependencyError> {
        self.script()
            .enter(QueueMethod::Append, entries.len())
            .await?;
        let mut ids = Vec::with_capacity(entries.len());
        {
            let mut all = lock(&self.shared.streams);
            let mut next = lock(&self.shared.next_id);
            for (stream, fields) in entries {
                *next += 1;
                let fields = fields.iter().map(|(k, v)| (k.to_string(), v.clone()));
                let s = all.entry(stream.to_string()).or_default();
                s.entries.insert(*next, fields.collect());
                s.appended_at.insert(*next, Utc::now());
                ids.push(format!("{next}-0"));
            }
        }
        self.shared.appended.notify_waiters();
        Ok(ids)
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), DependencyError> {
        self.script().enter(QueueMethod::EnsureGroup, 0).await?;
        lock(&self.shared.streams)
            .entry(stream.to_string())
            .or_default()
            .groups
            .entry(group.to_string())
            .or_default();
        Ok(())
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
        self.script().enter(QueueMethod::ReadGroup, count).await?;
        let deadline = Instant::now() + block;
        loop {
            // Registered before looking, so an append in between is not missed.
            let appended = self.shared.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let got = self
                .read_now(stream, group, consumer, &from, count)
                .ok_or_else(|| missing_group(stream, group))?;
            // Like XREADGROUP: only a read of new entries blocks.
            if !got.is_empty() || from != ReadFrom::New || Instant::now() >= deadline {
                return Ok(got);
            }
            let _ = tokio::time::timeout_at(deadline, appended).await;
        }
    }

    async fn read_lanes(
        &self,
        reads: &[(&str, ReadFrom)],
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Vec<StreamEntry>>, DependencyError> {
        self.script().enter(QueueMethod::ReadGroup, count).await?;
        let deadline = Instant::now() + block;
        loop {
            let appended = self.shared.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let mut got = Vec::new();
            for (stream, from) in reads {
                got.push(
                    self.read_now(stream, group, consumer, from, count)
                        .ok_or_else(|| missing_group(stream, group))?,
                );
            }
            let all_new = reads.iter().all(|(_, f)| *f == ReadFrom::New);
            if got.iter().any(|g| !g.is_empty()) || !all_new || Instant::now() >= deadline {
                return Ok(got);
            }
            let _ = tokio::time::timeout_at(deadline, appended).await;
        }
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<(), DependencyError> {
        self.script().enter(QueueMethod::Ack, ids.len()).await?;
        if let Some(g) = lock(&self.shared.streams)
            .get_mut(stream)
            .and_then(|s| s.groups.get_mut(group))
        {
            for id in ids {
                g.pending.remove(&seq(id));
            }
        }
        Ok(())
    }

    /// As Redis: from `start`, at most `count` entries taken and `count * 10` pending
    /// entries looked at; the next page starts after the last one looked at.
    async fn autoclaim_from(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<(String, Vec<StreamEntry>), DependencyError> {
        self.script().enter(QueueMethod::Autoclaim, count).await?;
        let now = Instant::now();
        let from: u64 = start
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut all = lock(&self.shared.streams);
        let s = all
            .get_mut(stream)
            .ok_or_else(|| missing_group(stream, group))?;
        let g = s
            .groups
            .get_mut(group)
            .ok_or_else(|| missing_group(stream, group))?;
        g.consumers.insert(consumer.to_string(), now);
        let mut taken = Vec::new();
        let mut next = 0;
        for (looked, (n, d)) in g.pending.range_mut(from..).enumerate() {
            if taken.len() >= count || looked >= count * 10 {
                next = *n;
                break;
            }
            if now.saturating_duration_since(d.at) >= min_idle {
                d.consumer = consumer.to_string();
                d.at = now;
                d.count += 1;
                if let Some(f) = s.entries.get(n) {
                    taken.push(entry(*n, f));
                }
            }
        }
        Ok((format!("{next}-0"), taken))
    }

    async fn pending_deliveries(
        &self,
        stream: &str,
        group: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<(String, u64)>, DependencyError> {
        self.script()
            .enter(QueueMethod::PendingDeliveries, count)
            .await?;
        let now = Instant::now();
        let all = lock(&self.shared.streams);
        let Some(g) = all.get(stream).and_then(|s| s.groups.get(group)) else {
            return Err(missing_group(stream, group));
        };
        Ok(g.pending
            .iter()
            .filter(|(_, d)| now.saturating_duration_since(d.at) >= min_idle)
            .take(count)
            .map(|(n, d)| (format!("{n}-0"), d.count))
            .collect())
    }

    async fn range(
        &self,
        stream: &str,
        ids: &[String],
    ) -> Result<Vec<StreamEntry>, DependencyError> {
        self.script().enter(QueueMethod::Range, ids.len()).await?;
        let all = lock(&self.shared.streams);
        let Some(s) = all.get(stream) else {
            return Ok(Vec::new());
        };
        Ok(ids
            .iter()
            .filter_map(|id| s.entries.get(&seq(id)).map(|f| entry(seq(id), f)))
            .collect())
    }

    async fn stream_stats(&self, stream: &str, group: &str) -> Result<(u64, u64), DependencyError> {
        self.script().enter(QueueMethod::StreamStats, 0).await?;
        let all = lock(&self.shared.streams);
        Ok(all.get(stream).map_or((0, 0), |s| {
            let pending = s.groups.get(group).map_or(0, |g| g.pending.len());
            (s.entries.len() as u64, pending as u64)
        }))
    }

    async fn acked_up_to(
        &self,
        stream: &str,
        group: &str,
    ) -> Result<Option<DateTime<Utc>>, DependencyError> {
        self.script().enter(QueueMethod::AckedUpTo, 0).await?;
        let all = lock(&self.shared.streams);
        let Some((s, g)) = all
            .get(stream)
            .and_then(|s| Some((s, s.groups.get(group)?)))
        else {
            return Ok(None);
        };
        let at = |n: &u64| {
            s.appended_at
                .get(n)
                .copied()
                .unwrap_or(DateTime::UNIX_EPOCH)
        };
        let unread = s.entries.range(g.last_delivered + 1..).next().is_some();
        let read = unread.then(|| at(&g.last_delivered));
        // The oldest pending entry counts only if delivered once (in a consumer's hands).
        let pending = g
            .pending
            .iter()
            .next()
            .filter(|(_, d)| d.count == 1)
            .map(|(n, _)| at(n));
        Ok(match (read, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    async fn trim_acked(&self, stream: &str, group: &str) -> Result<u64, DependencyError> {
        self.script().enter(QueueMethod::TrimAcked, 0).await?;
        let mut all = lock(&self.shared.streams);
        let Some(s) = all.get_mut(stream) else {
            return Ok(0);
        };
        let Some(g) = s.groups.get(group) else {
            return Ok(0);
        };
        let keep_from = g
            .pending
            .keys()
            .next()
            .copied()
            .unwrap_or(u64::MAX)
            .min(g.last_delivered + 1);
        let before = s.entries.len();
        s.entries = s.entries.split_off(&keep_from);
        Ok((before - s.entries.len()) as u64)
    }

    async fn keep_alive(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<(), DependencyError> {
        self.script().enter(QueueMethod::KeepAlive, 0).await?;
        let mut all = lock(&self.shared.streams);
        let g = all
            .entry(stream.to_string())
            .or_default()
            .groups
            .entry(group.to_string())
            .or_default();
        g.alive.insert(consumer.to_string(), Instant::now() + ttl);
        Ok(())
    }

    async fn forget_gone_consumers(
        &self,
        stream: &str,
        group: &str,
        keep: &str,
        idle: Duration,
    ) -> Result<Vec<String>, DependencyError> {
        self.script().enter(QueueMethod::ForgetGone, 0).await?;
        let now = Instant::now();
        let mut all = lock(&self.shared.streams);
        let Some(g) = all.get_mut(stream).and_then(|s| s.groups.get_mut(group)) else {
            return Ok(Vec::new());
        };
        let mut gone: Vec<String> = g
            .consumers
            .iter()
            .filter(|(name, seen)| {
                name.as_str() != keep
                    && now.saturating_duration_since(**seen) >= idle
                    && g.alive.get(name.as_str()).is_none_or(|until| *until < now)
                    && !g.pending.values().any(|d| &d.consumer == *name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        gone.sort();
        for name in &gone {
            g.consumers.remove(name);
            g.alive.remove(name);
        }
        Ok(gone)
    }

    async fn overflowed(&self, stream: &str, count: usize) -> Result<Vec<String>, DependencyError> {
        self.script().enter(QueueMethod::Overflowed, count).await?;
        Ok(lock(&self.shared.overflow)
            .get(stream)
            .map(|s| s.iter().take(count).cloned().collect())
            .unwrap_or_default())
    }

    async fn forget_overflowed(&self, stream: &str, ids: &[String]) -> Result<(), DependencyError> {
        self.script()
            .enter(QueueMethod::ForgetOverflowed, ids.len())
            .await?;
        if let Some(s) = lock(&self.shared.overflow).get_mut(stream) {
            for id in ids {
                s.remove(id);
            }
        }
        Ok(())
    }

    fn dedicated(&self) -> Arc<dyn Queue> {
        Arc::new(self.clone())
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.script().enter(QueueMethod::Ping, 0).await
    }
}
