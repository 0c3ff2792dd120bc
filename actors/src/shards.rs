//! Stream shards: each channel's stream may be split into N streams, so that one
//! channel's load spreads over the nodes of a Redis Cluster. With one shard (the default)
//! a channel has the seed's `{type}_stream`; with N, `{type}_stream:{0}` …
//! `{type}_stream:{N-1}`, the shard number in a hash tag, so that each shard (and its
//! dead-letter stream `…:{i}:dlq`) lives in its own slot. A record goes to the shard its
//! id hashes to, or with `by_tenant` the shard its tenant hashes to; every shard has its
//! own reader, and the shards' readers take turns at the channel's sender, so tenants in
//! different shards are served side by side whatever backlog another has queued (README,
//! "Lanes and fair share").
//!
//! Lanes: a record's `priority` picks the lane. Normal keeps the names above (so nothing
//! queued before lanes is stranded); high and bulk have their own streams beside each:
//! `{sms_stream}:high` and `{sms_stream}:bulk` with one shard (the hash tag puts them in
//! `sms_stream`'s slot), `sms_stream:high:{i}` and `sms_stream:bulk:{i}` in shard `i`'s.
//! So the three lanes of a shard (and their `…:dlq`) share a slot, and one XREADGROUP
//! reads them together, even on a Redis Cluster.

use crate::domain::{Channel, Communication, Priority};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The stream names made so far, by channel, lane and shard.
type Names = HashMap<(Channel, Priority, u32), &'static str>;

/// How many streams each channel's is split into (at least one), and whether a record's
/// tenant picks its shard (rather than its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamShards(u32, bool);

impl Default for StreamShards {
    fn default() -> Self {
        StreamShards::ONE
    }
}

impl StreamShards {
    pub const ONE: StreamShards = StreamShards(1, false);

    pub fn new(n: u32) -> StreamShards {
        StreamShards(n.max(1), false)
    }

    /// The shard of a record picked by its tenant: all of a tenant's records in one shard,
    /// tenants spread over the shards.
    pub fn by_tenant(self, yes: bool) -> StreamShards {
        StreamShards(self.0, yes)
    }

    pub fn is_by_tenant(self) -> bool {
        self.1
    }

    pub fn count(self) -> u32 {
        self.0
    }

    /// Shard `i`'s normal-lane stream of `channel`.
    pub fn stream(self, channel: Channel, i: u32) -> &'static str {
        self.lane_stream(channel, Priority::Normal, i)
    }

    /// Shard `i`'s stream of `channel`'s `lane` (names are made once and kept for the
    /// process's life: there are at most a few hundred).
    pub fn lane_stream(self, channel: Channel, lane: Priority, i: u32) -> &'static str {
        if self.0 == 1 && lane == Priority::Normal {
            return channel.stream();
        }
        static NAMES: OnceLock<Mutex<Names>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        names.entry((channel, lane, i)).or_insert_with(|| {
            let base = channel.stream();
            let name = match (self.0, lane) {
                (1, lane) => format!("{{{base}}}:{}", lane.as_str()),
                (_, Priority::Normal) => format!("{base}:{{{i}}}"),
                (_, lane) => format!("{base}:{}:{{{i}}}", lane.as_str()),
            };
            Box::leak(name.into_boxed_str())
        })
    }

    /// Shard `i`'s lanes of `channel`, in reading order (high, normal, bulk).
    pub fn lanes(self, channel: Channel, i: u32) -> [(Priority, &'static str); 3] {
        Priority::ALL.map(|lane| (lane, self.lane_stream(channel, lane, i)))
    }

    /// Every shard's stream of `channel`'s `lane`, in shard order.
    pub fn lane_streams(self, channel: Channel, lane: Priority) -> Vec<&'static str> {
        (0..self.0)
            .map(|i| self.lane_stream(channel, lane, i))
            .collect()
    }

    /// Every stream of `channel`: each lane of each shard.
    pub fn streams(self, channel: Channel) -> Vec<&'static str> {
        Priority::ALL
            .into_iter()
            .flat_map(|lane| self.lane_streams(channel, lane))
            .collect()
    }

    /// Every stream of every channel.
    pub fn all(self) -> Vec<&'static str> {
        Channel::ALL
            .into_iter()
            .flat_map(|c| self.streams(c))
            .collect()
    }

    /// The stream of the record's lane in its shard: the one its id hashes to, or its
    /// tenant with `by_tenant`.
    pub fn for_record(self, rec: &Communication) -> &'static str {
        let key = if self.1 { &rec.tenant } else { &rec.id };
        self.for_key(rec.channel, rec.priority, key)
    }

    /// The stream of `lane` in the shard that `key` hashes to (FNV-1a, so the same in
    /// every process).
    pub fn for_key(self, channel: Channel, lane: Priority, key: &str) -> &'static str {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.lane_stream(channel, lane, (hash % u64::from(self.0)) as u32)
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
        assert_eq!(
            one.lane_streams(Channel::Sms, Priority::Normal),
            ["sms_stream"]
        );
        assert_eq!(
            one.for_key(Channel::Email, Priority::Normal, "abc"),
            "email_stream"
        );
        assert_eq!(StreamShards::new(0), one);
    }

    #[test]
    fn shards_carry_their_number_in_a_hash_tag_and_records_spread() {
        let three = StreamShards::new(3);
        assert_eq!(
            three.lane_streams(Channel::Sms, Priority::Normal),
            ["sms_stream:{0}", "sms_stream:{1}", "sms_stream:{2}"]
        );
        assert_eq!(three.all().len(), 27);
        let mut per_shard: HashMap<&str, usize> = HashMap::new();
        for n in 0..300 {
            let id = format!("65f0c0de00000000{n:08x}");
            let s = three.for_key(Channel::Sms, Priority::Normal, &id);
            assert_eq!(
                s,
                three.for_key(Channel::Sms, Priority::Normal, &id),
                "stable"
            );
            *per_shard.entry(s).or_default() += 1;
        }
        assert_eq!(per_shard.len(), 3);
        assert!(per_shard.values().all(|n| *n > 50), "{per_shard:?}");
    }

    #[test]
    fn lanes_have_their_own_streams_in_the_slot_of_their_shard() {
        let one = StreamShards::ONE;
        assert_eq!(
            one.lanes(Channel::Sms, 0),
            [
                (Priority::High, "{sms_stream}:high"),
                (Priority::Normal, "sms_stream"),
                (Priority::Bulk, "{sms_stream}:bulk"),
            ]
        );
        assert_eq!(one.all().len(), 9);
        let two = StreamShards::new(2);
        assert_eq!(
            two.lanes(Channel::Email, 1).map(|(_, s)| s),
            [
                "email_stream:high:{1}",
                "email_stream:{1}",
                "email_stream:bulk:{1}"
            ]
        );
        let id = "65f0c0de0000000000000001";
        let high = two.for_key(Channel::Email, Priority::High, id);
        let normal = two.for_key(Channel::Email, Priority::Normal, id);
        assert_eq!(
            high.rsplit(':').next(),
            normal.rsplit(':').next(),
            "same shard"
        );
    }

    #[test]
    fn the_earliest_shard_holding_something_counts() {
        let t = |s| DateTime::from_timestamp(s, 0);
        assert_eq!(earliest_acked(&[None, None]), None);
        assert_eq!(earliest_acked(&[None, t(5), t(3)]), t(3));
    }
}
