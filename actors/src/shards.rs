//! Stream shards: each channel's stream may be split into N streams, so that one
//! channel's load spreads over the nodes of a Redis Cluster. With one shard (the default)
//! a channel has the seed's `{type}_stream`; with N, `{type}_stream:{0}` …
//! `{type}_stream:{N-1}`, the shard number in a hash tag, so that each shard (and its
//! dead-letter stream `…:{i}:dlq`) lives in its own slot. A record always goes to the
//! shard its id hashes to; every shard has its own reader.

use crate::domain::Channel;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// How many streams each channel's is split into (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamShards(u32);

impl Default for StreamShards {
    fn default() -> Self {
        StreamShards::ONE
    }
}

impl StreamShards {
    pub const ONE: StreamShards = StreamShards(1);

    pub fn new(n: u32) -> StreamShards {
        StreamShards(n.max(1))
    }

    pub fn count(self) -> u32 {
        self.0
    }

    /// Shard `i`'s stream of `channel` (names are made once and kept for the process's
    /// life: there are at most a few hundred).
    pub fn stream(self, channel: Channel, i: u32) -> &'static str {
        if self.0 == 1 {
            return channel.stream();
        }
        static NAMES: OnceLock<Mutex<HashMap<(Channel, u32), &'static str>>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        names
            .entry((channel, i))
            .or_insert_with(|| Box::leak(format!("{}:{{{i}}}", channel.stream()).into_boxed_str()))
    }

    /// Every shard's stream of `channel`, in shard order.
    pub fn streams(self, channel: Channel) -> Vec<&'static str> {
        (0..self.0).map(|i| self.stream(channel, i)).collect()
    }

    /// Every stream of every channel.
    pub fn all(self) -> Vec<&'static str> {
        Channel::ALL
            .into_iter()
            .flat_map(|c| self.streams(c))
            .collect()
    }

    /// The stream of the shard that the record `id` hashes to (FNV-1a, so the same in
    /// every process).
    pub fn for_record(self, channel: Channel, id: &str) -> &'static str {
        if self.0 == 1 {
            return channel.stream();
        }
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.stream(channel, (hash % u64::from(self.0)) as u32)
    }
}

/// A channel's done-with time over its shards (each `Queue::acked_up_to`): the earliest
/// of the shards still holding something, `None` when none does. A record in a shard
/// that is done may wait for the slowest shard before it is swept again: late, never lost.
pub fn earliest_acked(shards: &[Option<DateTime<Utc>>]) -> Option<DateTime<Utc>> {
    shards.iter().flatten().min().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_keeps_the_seed_names() {
        let one = StreamShards::ONE;
        assert_eq!(one.streams(Channel::Sms), ["sms_stream"]);
        assert_eq!(one.for_record(Channel::Email, "abc"), "email_stream");
        assert_eq!(StreamShards::new(0), one);
    }

    #[test]
    fn shards_carry_their_number_in_a_hash_tag_and_records_spread() {
        let three = StreamShards::new(3);
        assert_eq!(
            three.streams(Channel::Sms),
            ["sms_stream:{0}", "sms_stream:{1}", "sms_stream:{2}"]
        );
        assert_eq!(three.all().len(), 9);
        let mut per_shard: HashMap<&str, usize> = HashMap::new();
        for n in 0..300 {
            let id = format!("65f0c0de00000000{n:08x}");
            let s = three.for_record(Channel::Sms, &id);
            assert_eq!(s, three.for_record(Channel::Sms, &id), "stable");
            *per_shard.entry(s).or_default() += 1;
        }
        assert_eq!(per_shard.len(), 3);
        assert!(per_shard.values().all(|n| *n > 50), "{per_shard:?}");
    }

    #[test]
    fn the_earliest_shard_holding_something_counts() {
        let t = |s| DateTime::from_timestamp(s, 0);
        assert_eq!(earliest_acked(&[None, None]), None);
        assert_eq!(earliest_acked(&[None, t(5), t(3)]), t(3));
    }
}
