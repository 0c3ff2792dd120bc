//! A walk over a range of due times, one slice a look: for the looks that must reach every
//! record of a range (the OutboxSweeper's past a stalled lane's point, the
//! SchedulerActor's before its window) without reading all of it each time.
//!
//! SecantusDB reads every record of the range a query names, whatever its limit: it
//! fetches the range's records from the index, then filters, sorts and cuts them (its
//! `find_matching`). A page of 100 records from a range of 60 s that holds 18,000 took
//! 493 ms, from a range of 1 s, 11 ms (2026-11-29, a stalled SMS stream at 300 requests/s).
//! So a look bounds its read by the slice's width, and the width adapts to what the last
//! slice held: about [`Walk::target`] records a look, however dense the range.
//!
//! A slice is `(from, to]`. The walk goes from the range's start to its end and starts
//! again; each look gives it the range as it is then (its ends move with time).

use chrono::{DateTime, Duration, Utc};

/// The narrowest and widest a slice gets: a slice that runs from an empty stretch into a
/// dense one reads at most 10 s of it (3,000 records at 300 a second).
const NARROWEST: Duration = Duration::milliseconds(10);
pub const WIDEST: Duration = Duration::seconds(10);
/// The first slice's width.
const FIRST: Duration = Duration::seconds(1);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Walk {
    /// Where the next slice starts (`None`: at the range's start).
    from: Option<DateTime<Utc>>,
    width: Duration,
    /// The records a slice should hold.
    target: usize,
}

impl Walk {
    pub fn new(target: usize) -> Walk {
        Walk {
            from: None,
            width: FIRST,
            target: target.max(1),
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    /// Whether the next slice starts at the range's start (a walk ended, or none began).
    pub fn at_start(&self) -> bool {
        self.from.is_none()
    }

    /// The next slice of the range `(start, end]`: from where the last one ended (or the
    /// start, when that is outside the range), at most the width, not past `end`. `None`
    /// when the range is empty.
    pub fn slice(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if start >= end {
            return None;
        }
        let from = self
            .from
            .filter(|f| *f >= start && *f < end)
            .unwrap_or(start);
        let to = from
            .checked_add_signed(self.width)
            .map_or(end, |t| t.min(end));
        Some((from, to))
    }

    /// The slice `(from, to]` of a range ending at `end` held `read` records, and the
    /// next slice starts at `next` (`to`, or the last record read when the read was cut
    /// short: records at that time not read are left to the next time round). The width scales toward the target: at most doubled, at least quartered.
    /// Past the end, the walk starts again at the range's start.
    pub fn went(
        &mut self,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        next: DateTime<Utc>,
        end: DateTime<Utc>,
        read: usize,
    ) {
        let span = to - from;
        self.width = resized(self.width, span, read, self.target).clamp(NARROWEST, WIDEST);
        // A slice clipped at the end says little of the width: keep it from shrinking.
        if to >= end && read < self.target {
            self.width = self.width.max(span);
        }
        // A slice holds records after its `from`, so `next` (its end, or a record of it)
        // is past `from`: the walk always moves on.
        self.from = (next < end).then_some(next.max(from + Duration::milliseconds(1)));
    }
}

/// The next width of a walk whose slice of `width` (`span` of it read: less where the
/// range ended) held `read` records: sized to hold about `target` at that density, at most
/// doubled, at least quartered; twice as wide after an empty one. Bounds are the caller's.
pub fn resized(width: Duration, span: Duration, read: usize, target: usize) -> Duration {
    let scaled = if read == 0 {
        span * 2
    } else {
        let ms = span.num_milliseconds() as f64 * target as f64 / read as f64;
        Duration::milliseconds(ms as i64)
    };
    scaled.clamp(width / 4, width * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    /// A range of `n` records a millisecond apart from `at(0)`; how many lie in `(a, b]`.
    fn held(a: DateTime<Utc>, b: DateTime<Utc>, n: i64) -> usize {
        (1..=n).filter(|i| at(*i) > a && at(*i) <= b).count()
    }

    #[test]
    fn the_width_comes_to_hold_about_the_target_and_the_walk_covers_the_range_then_starts_again() {
        let mut w = Walk::new(100);
        let (start, end) = (at(0), at(20_000));
        let mut covered = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..200 {
            let (a, b) = w.slice(start, end).unwrap();
            let n = held(a, b, 20_000);
            reads.push(n);
            covered.push((a, b));
            w.went((a, b), b, end, n);
            if w.from.is_none() {
                break;
            }
        }
        // Contiguous from the start to the end.
        assert_eq!(covered[0].0, start);
        assert_eq!(covered.last().unwrap().1, end);
        assert!(covered.windows(2).all(|p| p[0].1 == p[1].0));
        // A slice of 1 s held 1,000; the walk comes down to about 100 and stays there.
        assert_eq!(reads[0], 1_000);
        let settled = &reads[4..reads.len() - 1];
        assert!(settled.iter().all(|n| (50..=200).contains(n)), "{reads:?}");
        // Then from the start again.
        assert_eq!(w.slice(start, end).unwrap().0, start);
    }

    #[test]
    fn a_width_is_sized_to_the_target_at_most_doubled_at_least_quartered() {
        let s = Duration::seconds;
        // 1 s held 300 of a target of 500: about 1.67 s.
        assert_eq!(resized(s(1), s(1), 300, 500), Duration::milliseconds(1666));
        // Empty: twice as wide; sparse: at most doubled; dense: at least quartered.
        assert_eq!(resized(s(1), s(1), 0, 1000), s(2));
        assert_eq!(resized(s(2), s(2), 1, 999), s(4));
        assert_eq!(resized(s(4), s(4), 999, 1), s(1));
        // A slice cut short by the range's end scales from what it spanned.
        assert_eq!(resized(s(4), s(1), 100, 200), s(2));
    }

    #[test]
    fn an_empty_range_widens_the_slices_and_a_start_outside_the_range_starts_at_its_start() {
        let mut w = Walk::new(100);
        let (a, b) = w.slice(at(0), at(1_000_000)).unwrap();
        w.went((a, b), b, at(1_000_000), 0);
        assert_eq!(w.slice(at(0), at(1_000_000)).unwrap(), (b, b + FIRST * 2));
        // The range moved on past where the walk was: from its new start.
        assert_eq!(
            w.slice(at(5_000_000), at(6_000_000)).unwrap().0,
            at(5_000_000)
        );
        assert_eq!(w.slice(at(5), at(5)), None);
    }

    #[test]
    fn a_read_cut_short_goes_on_from_its_last_record() {
        let mut w = Walk::new(10);
        let (a, b) = w.slice(at(0), at(10_000)).unwrap();
        w.went((a, b), at(400), at(10_000), 20);
        assert_eq!(w.slice(at(0), at(10_000)).unwrap().0, at(400));
    }
}
