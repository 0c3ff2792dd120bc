//! Batch limits shared by every actor that groups work into one round trip (the router's
//! group commit, the receipts batches, the LogIndexer's bulk requests): a batch is flushed
//! on whichever limit comes first — items, bytes or the time its first item has waited.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most items in one batch.
    pub max_items: usize,
    /// Most bytes in one batch; `usize::MAX` where size is not counted.
    pub max_bytes: usize,
    /// How long the first item of a batch waits for company before it is flushed.
    pub max_wait: Duration,
}

impl BatchSettings {
    /// A batch limited by count and time only.
    pub const fn new(max_items: usize, max_wait: Duration) -> BatchSettings {
        BatchSettings {
            max_items,
            max_bytes: usize::MAX,
            max_wait,
        }
    }

    pub const fn with_max_bytes(self, max_bytes: usize) -> BatchSettings {
        BatchSettings { max_bytes, ..self }
    }

    /// Whether a batch of `items` items and `bytes` bytes must be flushed now.
    pub fn is_full(&self, items: usize, bytes: usize) -> bool {
        items >= self.max_items || bytes >= self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_on_whichever_limit_comes_first() {
        let b = BatchSettings::new(3, Duration::from_millis(5)).with_max_bytes(100);
        assert!(!b.is_full(2, 99));
        assert!(b.is_full(3, 0));
        assert!(b.is_full(1, 100));
        assert!(!BatchSettings::new(3, Duration::ZERO).is_full(2, usize::MAX - 1));
    }
}
