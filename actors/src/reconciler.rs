//! Reconciler: makes Elasticsearch agree with MongoDB for recently changed records.
//!
//! Owns: nothing but its timer; every `interval` it reads the records MongoDB changed
//! between `lookback` and `settle` ago (newest first, at most `batch`), reads their
//! `communications` documents, and where a document is missing or shows another status
//! than the record (an event lost to a crash between the MongoDB write and the append, a
//! document written or deleted by hand, an index restored from an old snapshot), writes
//! the record's state from MongoDB (`index` with `version_type=external_gte`, at least the
//! version the document has, so the repair wins and later events still apply; a missing
//! document is created) and the log document of its current status (`create`: one that
//! exists is left). Repairs are counted in
//! `reconciler_repairs_total`, records compared in `reconciler_checked_total`.
//! Talks to it: itself (`Tick`); the supervisor starts and stops it.
//! Talks to: MongoDB (a pass's window read newest first in slices of at most a minute, until
//! `batch` records: a few reads), Elasticsearch (one read and at most one `_bulk` a
//! pass).
//! On failure: a failed pass is logged and counted (`reconciler_errors_total`) and the
//! next one tries again; a crash loses nothing (it holds nothing), and the restarted actor
//! starts a pass after `interval`. Records changed within `settle` are left to their
//! events, which are normally on their way.

use crate::domain::{Communication, EventStatus, LogEvent};
use crate::log_indexer::{ops_for, state_version};
use crate::ports::{
    BulkAction, BulkOp, DependencyError, IndexedRecords, IndexedState, ItemResult, RecentRecords,
    SearchSink,
};
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "reconciler";

pub enum ReconcilerMsg {
    Tick,
}

#[derive(Clone)]
pub struct ReconcilerArgs {
    pub records: Arc<dyn RecentRecords>,
    pub indexed: Arc<dyn IndexedRecords>,
    pub search: Arc<dyn SearchSink>,
    pub logs_index: String,
    pub communications_index: String,
    /// Time between passes.
    pub interval: Duration,
    /// How far back a pass looks...
    pub lookback: Duration,
    /// ...leaving out what changed this recently (its events are on their way).
    pub settle: Duration,
    /// Most records a pass compares.
    pub batch: usize,
}

pub struct Reconciler;

impl Actor for Reconciler {
    type Msg = ReconcilerMsg;
    type State = ReconcilerArgs;
    type Arguments = ReconcilerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ReconcilerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_after(args.interval, || ReconcilerMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: Self::Msg,
        args: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match pass(args).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(repaired = n, "search had drifted from MongoDB; repaired"),
            Err(e) => {
                metrics::counter!("reconciler_errors_total").increment(1);
                tracing::warn!(error = %e, "reconciliation pass failed; trying again next time");
            }
        }
        myself.send_after(args.interval, || ReconcilerMsg::Tick);
        Ok(())
    }
}

/// One pass: compare, repair; answers how many records were repaired.
async fn pass(a: &ReconcilerArgs) -> Result<usize, DependencyError> {
    let now = Utc::now();
    let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or_default();
    let records = a
        .records
        .changed_between(now - span(a.lookback), now - span(a.settle), a.batch)
        .await?;
    if records.is_empty() {
        return Ok(0);
    }
    metrics::counter!("reconciler_checked_total").increment(records.len() as u64);
    let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
    let indexed = a.indexed.indexed(&ids).await?;
    let ops = repairs(&records, &indexed, &a.logs_index, &a.communications_index);
    if ops.is_empty() {
        return Ok(0);
    }
    a.search.prepare().await?;
    let results = a.search.bulk(&ops).await?;
    let repaired = ops
        .iter()
        .zip(&results)
        .filter(|(op, r)| op.index == a.communications_index && **r == ItemResult::Done)
        .count();
    metrics::counter!("reconciler_repairs_total").increment(repaired as u64);
    Ok(repaired)
}

/// The writes that make search agree with these records (pure): for each record whose
/// document is missing or shows another status, its current state (at least the
/// document's version) and the log document of that status.
pub fn repairs(
    records: &[Communication],
    indexed: &HashMap<String, IndexedState>,
    logs_index: &str,
    communications_index: &str,
) -> Vec<BulkOp> {
    let mut ops = Vec::new();
    for rec in records {
        let Some(status) = EventStatus::of_record(rec.status, rec.attempts) else {
            continue;
        };
        let doc = indexed.get(&rec.id);
        if doc.is_some_and(|d| d.status == rec.status.as_str()) {
            continue;
        }
        let version = state_version(status, rec.attempts).max(doc.map_or(0, |d| d.version));
        let mut ev = LogEvent::for_record(rec, NAME, status, rec.attempts, rec.updated_at);
        ev.provider = rec.provider.clone();
        ev.provider_message_id = rec.provider_message_id.clone();
        ev.error = rec.last_error.clone();
        for mut op in ops_for(&ev, logs_index, communications_index) {
            if let BulkAction::IndexVersioned { .. } = op.action {
                // A deleted document may have left a higher version behind, unknown
                // here: a missing one is created (without a version) instead.
                op.action = match doc {
                    Some(_) => BulkAction::IndexAtLeast { version },
                    None => BulkAction::Create,
                };
            }
            ops.push(op);
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Channel, Status};
    use crate::testing;

    fn indexed(status: &str, version: u64) -> IndexedState {
        IndexedState {
            status: status.into(),
            version,
        }
    }

    /// (record status, attempts, document) → repaired, at which version (0: created).
    #[test]
    fn only_drifted_records_are_rewritten_at_least_at_their_version() {
        let sent_v = state_version(EventStatus::Sent, 1);
        let cases = [
            (Status::Sent, 1, Some(indexed("sent", sent_v)), None),
            (Status::Sent, 1, None, Some(0)),
            (
                Status::Failed,
                0,
                Some(indexed("pending", 1)),
                Some(state_version(EventStatus::Failed, 0)),
            ),
            (Status::Delivered, 1, Some(indexed("pending", 99)), Some(99)),
            (Status::Sending, 1, None, None),
        ];
        for (status, attempts, doc, want) in cases {
            let mut r = testing::record(1, Channel::Sms);
            r.status = status;
            r.attempts = attempts;
            let docs: HashMap<String, IndexedState> =
                doc.clone().map(|d| (r.id.clone(), d)).into_iter().collect();
            let ops = repairs(&[r], &docs, "logs", "comms");
            let got = ops
                .iter()
                .find(|o| o.index == "comms")
                .map(|o| match o.action {
                    BulkAction::IndexAtLeast { version } => version,
                    // Missing: created without a version.
                    _ => 0,
                });
            assert_eq!(got, want, "{status:?} {doc:?}");
            if want.is_some() {
                let log = ops.iter().find(|o| o.index == "logs").unwrap();
                assert_eq!(log.action, BulkAction::Create);
                assert_eq!(ops[1].doc.value()["status"], status.as_str());
            }
        }
    }
}
