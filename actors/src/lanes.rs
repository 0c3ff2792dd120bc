//! Lanes and fair share: which entries a channel's consumer hands to its sender next.
//! Pure data, no I/O (the StreamConsumer owns one [`LaneBuffers`] per shard it reads).
//!
//! Order: the high lane before the normal lane before the bulk lane, whenever the
//! higher one holds anything. Within a lane, the entries read ahead (still pending in the
//! group, so a crash loses none) are taken round-robin by tenant: each tenant in turn
//! gives one entry, so among the entries read ahead one tenant's many cannot keep
//! another's few waiting. A batch from the bulk lane is capped smaller than the others,
//! so a high entry that arrives meanwhile waits for at most one small batch.

use crate::domain::{Priority, StreamEntry};
use std::collections::{HashMap, VecDeque};

/// One lane's entries read ahead, queued per tenant, and the tenants' turn order.
#[derive(Debug, Default)]
pub struct LaneBuffer {
    by_tenant: HashMap<String, VecDeque<StreamEntry>>,
    /// Tenants with entries, in the order of their next turn.
    turns: VecDeque<String>,
    len: usize,
}

impl LaneBuffer {
    /// Queue `entry` behind its tenant's others (entries without `tenant`, from before
    /// lanes, count as one tenant).
    pub fn push(&mut self, entry: StreamEntry) {
        let tenant = entry.field("tenant").unwrap_or_default().to_string();
        let queue = self.by_tenant.entry(tenant.clone()).or_default();
        if queue.is_empty() {
            self.turns.push_back(tenant);
        }
        queue.push_back(entry);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drop these entries (taken over elsewhere); the others keep their places.
    pub fn forget(&mut self, ids: &[&str]) {
        for queue in self.by_tenant.values_mut() {
            queue.retain(|e| !ids.contains(&e.id.as_str()));
        }
        self.by_tenant.retain(|_, q| !q.is_empty());
        let by_tenant = &self.by_tenant;
        self.turns.retain(|t| by_tenant.contains_key(t));
        self.len = self.by_tenant.values().map(VecDeque::len).sum();
    }

    /// Up to `n` entries, one per tenant in turn, round after round.
    pub fn take(&mut self, n: usize) -> Vec<StreamEntry> {
        let mut out = Vec::with_capacity(n.min(self.len));
        while out.len() < n {
            let Some(tenant) = self.turns.pop_front() else {
                break;
            };
            let Some(queue) = self.by_tenant.get_mut(&tenant) else {
                continue;
            };
            if let Some(e) = queue.pop_front() {
                out.push(e);
                self.len -= 1;
            }
            if queue.is_empty() {
                self.by_tenant.remove(&tenant);
            } else {
                self.turns.push_back(tenant);
            }
        }
        out
    }
}

/// The read-ahead of each lane of one shard, in reading order (see [`Priority::ALL`]).
#[derive(Debug, Default)]
pub struct LaneBuffers {
    lanes: [LaneBuffer; 3],
}

impl LaneBuffers {
    pub fn lane(&mut self, lane: Priority) -> &mut LaneBuffer {
        &mut self.lanes[lane.rank()]
    }

    pub fn len(&self, lane: Priority) -> usize {
        self.lanes[lane.rank()].len()
    }

    /// Drop these entries from every lane.
    pub fn forget(&mut self, ids: &[&str]) {
        self.lanes.iter_mut().for_each(|l| l.forget(ids));
    }

    /// The lanes worth reading now: those up to the first that holds entries (a lower
    /// lane is read only once every higher one is empty, so what it reads ahead waits
    /// for no more than what is already in hand), and only those holding fewer than
    /// `window`. Empty when the first holding lane is full.
    pub fn to_read(&self, window: usize) -> Vec<Priority> {
        let mut out = Vec::new();
        for lane in Priority::ALL {
            let held = self.len(lane);
            if held < window {
                out.push(lane);
            }
            if held > 0 {
                break;
            }
        }
        out
    }

    /// The next batch: from the highest lane holding entries, up to `count` of them (up to
    /// `bulk_count` from the bulk lane), round-robin by tenant.
    pub fn next_batch(
        &mut self,
        count: usize,
        bulk_count: usize,
    ) -> Option<(Priority, Vec<StreamEntry>)> {
        let lane = Priority::ALL.into_iter().find(|l| self.len(*l) > 0)?;
        let n = match lane {
            Priority::Bulk => bulk_count.min(count),
            _ => count,
        };
        Some((lane, self.lane(lane).take(n.max(1))))
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(LaneBuffer::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, tenant: &str) -> StreamEntry {
        StreamEntry {
            id: id.into(),
            fields: vec![("tenant".into(), tenant.into())],
        }
    }

    fn ids(v: &[StreamEntry]) -> Vec<&str> {
        v.iter().map(|e| e.id.as_str()).collect()
    }

    /// Entries pushed as (id, tenant), the batch size, the batches expected.
    type Case<'a> = (&'a [(&'a str, &'a str)], usize, &'a [&'a [&'a str]]);

    #[test]
    fn tenants_take_turns_within_a_lane() {
        let table: &[Case] = &[
            (
                &[
                    ("a1", "A"),
                    ("a2", "A"),
                    ("a3", "A"),
                    ("b1", "B"),
                    ("b2", "B"),
                ],
                2,
                &[&["a1", "b1"], &["a2", "b2"], &["a3"]],
            ),
            (
                &[
                    ("a1", "A"),
                    ("a2", "A"),
                    ("a3", "A"),
                    ("a4", "A"),
                    ("c1", "C"),
                ],
                3,
                &[&["a1", "c1", "a2"], &["a3", "a4"]],
            ),
            (
                &[("a1", "A"), ("b1", "B"), ("c1", "C"), ("a2", "A")],
                10,
                &[&["a1", "b1", "c1", "a2"]],
            ),
            (&[("x1", ""), ("x2", "")], 1, &[&["x1"], &["x2"]]),
        ];
        for (pushed, n, want) in table {
            let mut lane = LaneBuffer::default();
            for (id, t) in *pushed {
                lane.push(entry(id, t));
            }
            let mut got: Vec<Vec<&str>> = Vec::new();
            let mut batches = Vec::new();
            while !lane.is_empty() {
                batches.push(lane.take(*n));
            }
            got.extend(batches.iter().map(|b| ids(b)));
            assert_eq!(got, *want, "{pushed:?} by {n}");
            assert_eq!(lane.len(), 0);
        }
    }

    #[test]
    fn a_higher_lane_always_goes_first_and_bulk_batches_are_capped() {
        let mut b = LaneBuffers::default();
        for i in 0..5 {
            b.lane(Priority::Bulk).push(entry(&format!("k{i}"), "A"));
        }
        b.lane(Priority::Normal).push(entry("n1", "A"));
        b.lane(Priority::High).push(entry("h1", "B"));
        // (count, bulk_count, lane expected, ids expected)
        let table: &[(usize, usize, Priority, &[&str])] = &[
            (10, 2, Priority::High, &["h1"]),
            (10, 2, Priority::Normal, &["n1"]),
            (10, 2, Priority::Bulk, &["k0", "k1"]),
            (1, 2, Priority::Bulk, &["k2"]),
            (10, 5, Priority::Bulk, &["k3", "k4"]),
        ];
        for (count, bulk, lane, want) in table {
            let (got_lane, got) = b.next_batch(*count, *bulk).unwrap();
            assert_eq!((got_lane, ids(&got)), (*lane, want.to_vec()));
        }
        assert!(b.next_batch(10, 2).is_none());
        assert!(b.is_empty());
    }

    #[test]
    fn entries_taken_over_are_forgotten_and_the_turns_go_on() {
        let mut lane = LaneBuffer::default();
        for (id, t) in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("c1", "C")] {
            lane.push(entry(id, t));
        }
        lane.forget(&["b1", "a1"]);
        assert_eq!(lane.len(), 2);
        assert_eq!(ids(&lane.take(10)), ["a2", "c1"]);
    }

    #[test]
    fn lower_lanes_are_read_only_while_the_higher_ones_are_empty() {
        // (entries held per lane [high, normal, bulk], window, lanes to read)
        let table: &[([usize; 3], usize, &[Priority])] = &[
            (
                [0, 0, 0],
                4,
                &[Priority::High, Priority::Normal, Priority::Bulk],
            ),
            (
                [0, 0, 2],
                4,
                &[Priority::High, Priority::Normal, Priority::Bulk],
            ),
            ([0, 0, 4], 4, &[Priority::High, Priority::Normal]),
            ([0, 3, 4], 4, &[Priority::High, Priority::Normal]),
            ([0, 4, 0], 4, &[Priority::High]),
            ([2, 0, 0], 4, &[Priority::High]),
            ([4, 0, 0], 4, &[]),
        ];
        for (held, window, want) in table {
            let mut b = LaneBuffers::default();
            for (lane, n) in Priority::ALL.into_iter().zip(held) {
                for i in 0..*n {
                    b.lane(lane).push(entry(&format!("{lane:?}{i}"), "A"));
                }
            }
            assert_eq!(b.to_read(*window), *want, "{held:?}");
        }
    }
}
