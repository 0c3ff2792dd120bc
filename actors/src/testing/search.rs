//! An Elasticsearch that keeps the bulk requests it was sent.

use super::{lock, Script};
use crate::ports::{BulkOp, Dependency, DependencyError, ItemResult, SearchSink};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SearchMethod {
    Prepare,
    Bulk,
    Ping,
}

/// Every item of a bulk request is done, unless the answers were scripted.
#[derive(Debug)]
pub struct MemorySearch {
    pub script: Script<SearchMethod>,
    answers: Mutex<VecDeque<Vec<ItemResult>>>,
    bulks: Mutex<Vec<Vec<BulkOp>>>,
}

impl Default for MemorySearch {
    fn default() -> Self {
        MemorySearch {
            script: Script::new(Dependency::Elasticsearch),
            answers: Mutex::new(VecDeque::new()),
            bulks: Mutex::new(Vec::new()),
        }
    }
}

impl MemorySearch {
    pub fn new() -> Self {
        Self::default()
    }

    /// The item results of the next successful bulk request (missing items are done).
    pub fn answer_next_bulk(&self, items: Vec<ItemResult>) {
        lock(&self.answers).push_back(items);
    }

    /// The operations of every bulk request that went through, in order.
    pub fn bulks(&self) -> Vec<Vec<BulkOp>> {
        lock(&self.bulks).clone()
    }
}

#[async_trait]
impl SearchSink for MemorySearch {
    async fn prepare(&self) -> Result<(), DependencyError> {
        self.script.enter(SearchMethod::Prepare, 0).await
    }

    async fn bulk(&self, ops: &[BulkOp]) -> Result<Vec<ItemResult>, DependencyError> {
        self.script.enter(SearchMethod::Bulk, ops.len()).await?;
        lock(&self.bulks).push(ops.to_vec());
        let mut answer = lock(&self.answers).pop_front().unwrap_or_default();
        answer.resize(ops.len(), ItemResult::Done);
        Ok(answer)
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.script.enter(SearchMethod::Ping, 0).await
    }
}
