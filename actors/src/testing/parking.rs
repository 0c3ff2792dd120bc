//! Receipts parked in memory, as MongoDB's `parked_receipts` keeps them: one per key, each
//! with its next try.

use super::{lock, Script};
use crate::ports::{Dependency, DependencyError, ParkedReceipt, ReceiptParking};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParkingMethod {
    Park,
    Due,
    Settle,
}

#[derive(Debug)]
pub struct MemoryParking {
    pub script: Script<ParkingMethod>,
    parked: Mutex<BTreeMap<String, (ParkedReceipt, DateTime<Utc>)>>,
}

impl Default for MemoryParking {
    fn default() -> Self {
        MemoryParking {
            script: Script::new(Dependency::MongoDb),
            parked: Mutex::new(BTreeMap::new()),
        }
    }
}

impl MemoryParking {
    pub fn new() -> Self {
        Self::default()
    }

    /// What is parked now.
    pub fn parked(&self) -> Vec<ParkedReceipt> {
        lock(&self.parked)
            .values()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

#[async_trait]
impl ReceiptParking for MemoryParking {
    async fn park(
        &self,
        receipts: &[ParkedReceipt],
        next_try: DateTime<Utc>,
    ) -> Result<(), DependencyError> {
        self.script
            .enter(ParkingMethod::Park, receipts.len())
            .await?;
        let mut all = lock(&self.parked);
        for r in receipts {
            all.entry(r.key()).or_insert_with(|| (r.clone(), next_try));
        }
        Ok(())
    }

    async fn due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        count: bool,
    ) -> Result<(Vec<ParkedReceipt>, Option<u64>), DependencyError> {
        self.script.enter(ParkingMethod::Due, 0).await?;
        let all = lock(&self.parked);
        let due = all
            .values()
            .filter(|(_, at)| *at <= now)
            .take(limit)
            .map(|(p, _)| p.clone())
            .collect();
        Ok((due, count.then_some(all.len() as u64)))
    }

    async fn settle(
        &self,
        done: &[String],
        later: &[(String, DateTime<Utc>)],
    ) -> Result<(), DependencyError> {
        self.script
            .enter(ParkingMethod::Settle, done.len() + later.len())
            .await?;
        let mut all = lock(&self.parked);
        for k in done {
            all.remove(k);
        }
        for (k, at) in later {
            if let Some((p, next)) = all.get_mut(k) {
                p.tries += 1;
                *next = *at;
            }
        }
        Ok(())
    }
}
