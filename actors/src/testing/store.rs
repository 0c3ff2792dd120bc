//! A source of truth in memory, with the claim, outcome and receipt rules of the MongoDB
//! store: a claim lasts `stale_after`, a claim whose holder vanished makes the next one a
//! possible duplicate, and receipts move a record only from their predecessors. A voided
//! id is never stored again, as MongoDB's `void` placeholder makes a late insert fail.

use super::{lock, Script};
use crate::domain::{
    Ambiguity, Channel, ClaimResult, Claimed, Communication, Outcome, Status, UnknownAttempt,
};
use crate::ports::{
    Dependency, DependencyError, FailResult, InsertResult, ReceiptResult, ReceiptUpdate, Store,
    SweepScope,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreMethod {
    InsertMany,
    Fail,
    Claim,
    RecordOutcomes,
    TakeDue,
    Get,
    Records,
    ApplyReceipts,
    Ping,
    Stored,
    Void,
    Renew,
    Reschedule,
    Suppressed,
}

#[derive(Debug, Clone)]
struct Slot {
    record: Communication,
    /// A retry is not due before this.
    not_before: Option<DateTime<Utc>>,
    /// The sweeper leaves the record alone until this.
    next_look: Option<DateTime<Utc>>,
    /// When the sweeper last queued it (`None`: only at its creation).
    queued_at: Option<DateTime<Utc>>,
    lease: Option<(String, Instant)>,
    /// An attempt whose outcome is unknown, for the next claim.
    unknown: Option<UnknownAttempt>,
    /// The latest possible duplicate recorded (the record's `possibleDuplicate`).
    flagged: Option<UnknownAttempt>,
}

#[derive(Debug)]
pub struct MemoryStore {
    pub script: Script<StoreMethod>,
    records: Mutex<BTreeMap<String, Slot>>,
    outcomes: Mutex<Vec<Vec<(String, u32, Outcome)>>>,
    /// Ids voided: never stored again (as MongoDB's `void` placeholder fences them).
    voided: Mutex<HashSet<String>>,
    /// The next `insert_many` is applied, then answers an ambiguous error.
    lose_next_insert_answer: AtomicBool,
    /// The suppression list: (tenant, channel, address).
    suppressions: Mutex<HashSet<(String, Channel, String)>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            script: Script::new(Dependency::MongoDb),
            records: Mutex::new(BTreeMap::new()),
            outcomes: Mutex::new(Vec::new()),
            voided: Mutex::new(HashSet::new()),
            lose_next_insert_answer: AtomicBool::new(false),
            suppressions: Mutex::new(HashSet::new()),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Put a recipient on its tenant's suppression list.
    pub fn suppress(&self, tenant: &str, channel: Channel, address: &str) {
        lock(&self.suppressions).insert((tenant.into(), channel, address.into()));
    }

    /// Store a record as it is (any status).
    pub fn put(&self, record: Communication) {
        lock(&self.records).insert(
            record.id.clone(),
            Slot {
                record,
                not_before: None,
                next_look: None,
                queued_at: None,
                lease: None,
                unknown: None,
                flagged: None,
            },
        );
    }

    /// The next `insert_many` stores its records, then fails with
    /// [`ErrorKind::Ambiguous`](crate::ports::ErrorKind::Ambiguous), as a connection that
    /// breaks after the write went through.
    pub fn lose_next_insert_answer(&self) {
        self.lose_next_insert_answer.store(true, Ordering::SeqCst);
    }

    /// The ids voided so far.
    pub fn voided(&self) -> HashSet<String> {
        lock(&self.voided).clone()
    }

    /// The record as stored now.
    pub fn record(&self, id: &str) -> Option<Communication> {
        lock(&self.records).get(id).map(|s| s.record.clone())
    }

    /// Record `id`'s retry is due now (the store's clock is the wall clock, which paused
    /// test time does not move).
    pub fn make_due(&self, id: &str) {
        if let Some(s) = lock(&self.records).get_mut(id) {
            s.not_before = None;
        }
    }

    /// The record's possible-duplicate flag (`possibleDuplicate` with its attempt and cause).
    pub fn flagged(&self, id: &str) -> Option<UnknownAttempt> {
        lock(&self.records).get(id).and_then(|s| s.flagged)
    }

    pub fn records(&self) -> Vec<Communication> {
        lock(&self.records)
            .values()
            .map(|s| s.record.clone())
            .collect()
    }

    /// Let another worker hold a claim on `id` for `for_`.
    pub fn hold(&self, id: &str, owner: &str, for_: Duration) {
        if let Some(s) = lock(&self.records).get_mut(id) {
            s.lease = Some((owner.to_string(), Instant::now() + for_));
        }
    }

    /// The outcomes of every `record_outcomes` call that went through, in order.
    pub fn recorded_outcomes(&self) -> Vec<Vec<(String, u32, Outcome)>> {
        lock(&self.outcomes).clone()
    }

    fn claim_one(
        slot: Option<&mut Slot>,
        owner: &str,
        stale_after: Duration,
        now: Instant,
    ) -> ClaimResult {
        let Some(s) = slot else {
            return ClaimResult::Skip("no such record");
        };
        if s.record.status.is_terminal() {
            return ClaimResult::Skip("already final");
        }
        if s.not_before.is_some_and(|t| t > Utc::now()) || s.record.status == Status::Scheduled {
            return ClaimResult::Skip("retry not yet due");
        }
        if s.lease
            .as_ref()
            .is_some_and(|(o, until)| o != owner && *until > now)
        {
            return ClaimResult::Busy;
        }
        // Still `sending`: the last claim ended without an outcome.
        if s.record.status == Status::Sending {
            let since = s.unknown.map_or(s.record.updated_at, |u| u.since);
            s.unknown = Some(UnknownAttempt {
                attempt: s.record.attempts,
                cause: Ambiguity::StaleLease,
                since: since.min(s.record.updated_at),
                provider: None,
            });
        }
        s.record.status = Status::Sending;
        s.record.attempts += 1;
        s.lease = Some((owner.to_string(), now + stale_after));
        ClaimResult::Claimed(Box::new(Claimed {
            record: s.record.clone(),
            unknown: s.unknown,
        }))
    }

    fn apply_outcome(s: &mut Slot, attempt: u32, outcome: &Outcome) {
        let r = &mut s.record;
        r.attempts = attempt;
        r.updated_at = Utc::now();
        s.lease = None;
        s.flagged = outcome.possible_duplicate().or(s.flagged);
        r.errors.extend(outcome.failovers().iter().cloned());
        match outcome {
            Outcome::Sent {
                provider,
                provider_message_id,
                ..
            } => {
                r.status = Status::Sent;
                r.provider = Some(provider.clone());
                r.provider_message_id = provider_message_id.clone();
            }
            Outcome::Failed {
                provider, error, ..
            } => {
                r.status = Status::Failed;
                r.provider = Some(provider.clone());
                r.last_error = Some(error.message.clone());
                r.errors.push(error.clone());
            }
            Outcome::Retry {
                provider,
                error,
                not_before,
                unknown,
                ..
            } => {
                s.unknown = unknown.or(s.unknown);
                r.status = Status::Pending;
                r.provider = Some(provider.clone());
                r.last_error = Some(error.message.clone());
                r.errors.push(error.clone());
                s.not_before = Some(*not_before);
            }
            Outcome::Suppressed => r.status = Status::Suppressed,
        }
    }

    fn apply_receipt(records: &mut BTreeMap<String, Slot>, u: &ReceiptUpdate) -> ReceiptResult {
        let Some(s) = records
            .values_mut()
            .find(|s| s.record.provider_message_id.as_deref() == Some(&u.provider_message_id))
        else {
            return ReceiptResult::Unknown;
        };
        if s.record.provider.as_deref() != Some(u.provider.as_str()) {
            return ReceiptResult::NotMovable;
        }
        if !u
            .status
            .receipt_predecessors()
            .contains(&s.record.status.as_str())
        {
            return ReceiptResult::NotMovable;
        }
        s.record.status = u.status;
        s.record.updated_at = Utc::now();
        if let Some((code, message)) = &u.error {
            s.record.last_error = Some(format!("{code}: {message}"));
        }
        ReceiptResult::Applied(Box::new(s.record.clone()))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_many(
        &self,
        records: &[Communication],
    ) -> Result<Vec<InsertResult>, DependencyError> {
        self.script
            .enter(StoreMethod::InsertMany, records.len())
            .await?;
        let mut all = lock(&self.records);
        let voided = lock(&self.voided);
        let mut answers = Vec::with_capacity(records.len());
        for r in records {
            if voided.contains(&r.id) {
                answers.push(InsertResult::NotStored);
                continue;
            }
            let holder = r.idempotency_key.as_ref().and_then(|k| {
                all.values().find(|s| {
                    s.record.tenant == r.tenant && s.record.idempotency_key.as_ref() == Some(k)
                })
            });
            if let Some(h) = holder {
                answers.push(InsertResult::KeyTaken(Box::new(h.record.clone())));
                continue;
            }
            let slot = Slot {
                record: r.clone(),
                not_before: None,
                next_look: None,
                queued_at: None,
                lease: None,
                unknown: None,
                flagged: None,
            };
            all.insert(r.id.clone(), slot);
            answers.push(InsertResult::Inserted);
        }
        if self.lose_next_insert_answer.swap(false, Ordering::SeqCst) {
            let lost = DependencyError::new(Dependency::MongoDb, "connection reset");
            return Err(lost.with_kind(crate::ports::ErrorKind::Ambiguous));
        }
        Ok(answers)
    }

    async fn stored(&self, ids: &[String]) -> Result<Vec<bool>, DependencyError> {
        self.script.enter(StoreMethod::Stored, ids.len()).await?;
        let all = lock(&self.records);
        Ok(ids.iter().map(|id| all.contains_key(id)).collect())
    }

    async fn void(&self, ids: &[String]) -> Result<usize, DependencyError> {
        self.script.enter(StoreMethod::Void, ids.len()).await?;
        let mut all = lock(&self.records);
        let mut voided = lock(&self.voided);
        let mut too_late = 0;
        for id in ids {
            match all.get(id).map(|s| s.record.status) {
                Some(Status::Pending | Status::Scheduled) | None => {
                    all.remove(id);
                    voided.insert(id.clone());
                }
                Some(_) => too_late += 1,
            }
        }
        Ok(too_late)
    }

    async fn fail(&self, id: &str, reason: &str) -> Result<FailResult, DependencyError> {
        self.script.enter(StoreMethod::Fail, 1).await?;
        let mut all = lock(&self.records);
        let Some(s) = all.get_mut(id) else {
            return Ok(FailResult::AlreadyFinal);
        };
        if s.record.status.is_terminal() {
            return Ok(FailResult::AlreadyFinal);
        }
        if s.lease
            .as_ref()
            .is_some_and(|(_, until)| *until > Instant::now())
        {
            return Ok(FailResult::Leased);
        }
        s.record.status = Status::Failed;
        s.record.last_error = Some(reason.to_string());
        s.lease = None;
        Ok(FailResult::Failed)
    }

    async fn claim(
        &self,
        ids: &[String],
        owner: &str,
        stale_after: Duration,
    ) -> Result<Vec<ClaimResult>, DependencyError> {
        self.script.enter(StoreMethod::Claim, ids.len()).await?;
        let now = Instant::now();
        let mut all = lock(&self.records);
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .map(|id| {
                if !seen.insert(id) {
                    return ClaimResult::Skip("duplicate entry in the same batch");
                }
                Self::claim_one(all.get_mut(id), owner, stale_after, now)
            })
            .collect())
    }

    async fn renew(
        &self,
        owner: &str,
        claims: &[(String, u32)],
        stale_after: Duration,
    ) -> Result<Vec<bool>, DependencyError> {
        self.script.enter(StoreMethod::Renew, claims.len()).await?;
        let now = Instant::now();
        let mut all = lock(&self.records);
        Ok(claims
            .iter()
            .map(|(id, attempt)| {
                let Some(s) = all.get_mut(id) else {
                    return false;
                };
                let holds = match &s.lease {
                    Some((o, _)) => o == owner,
                    // Given back since: taken again only if nobody has claimed it since.
                    None => s.record.attempts == *attempt && !s.record.status.is_terminal(),
                };
                if holds {
                    s.lease = Some((owner.to_string(), now + stale_after));
                }
                holds
            })
            .collect())
    }

    async fn reschedule(
        &self,
        owner: &str,
        ids: &[String],
        not_before: DateTime<Utc>,
    ) -> Result<(), DependencyError> {
        self.script
            .enter(StoreMethod::Reschedule, ids.len())
            .await?;
        let mut all = lock(&self.records);
        for id in ids {
            let Some(s) = all.get_mut(id) else { continue };
            if s.lease.as_ref().is_some_and(|(o, _)| o == owner) {
                s.lease = None;
                s.record.attempts -= 1;
                s.record.status = Status::Pending;
                s.not_before = Some(not_before);
            }
        }
        Ok(())
    }

    async fn suppressed(
        &self,
        recipients: &[(String, Channel, String)],
    ) -> Result<Vec<bool>, DependencyError> {
        self.script
            .enter(StoreMethod::Suppressed, recipients.len())
            .await?;
        let list = lock(&self.suppressions);
        Ok(recipients.iter().map(|r| list.contains(r)).collect())
    }

    async fn record_outcomes(
        &self,
        owner: &str,
        outcomes: &[(String, u32, Outcome)],
    ) -> Result<Vec<String>, DependencyError> {
        self.script
            .enter(StoreMethod::RecordOutcomes, outcomes.len())
            .await?;
        let mut all = lock(&self.records);
        let mut fenced = Vec::new();
        for (id, attempt, outcome) in outcomes {
            let Some(s) = all.get_mut(id) else { continue };
            // Only the claim's holder records, and only a record still open: one taken over
            // or finished meanwhile is not touched, only flagged where this claim's call may
            // have reached the provider.
            let open = matches!(s.record.status, Status::Pending | Status::Sending);
            if open && s.lease.as_ref().is_some_and(|(o, _)| o == owner) {
                Self::apply_outcome(s, *attempt, outcome);
                continue;
            }
            if outcome.may_have_reached_provider() && s.flagged.is_none() {
                s.flagged = Some(UnknownAttempt {
                    attempt: *attempt,
                    cause: Ambiguity::LostLease,
                    since: s.record.updated_at,
                    provider: None,
                });
            }
            fenced.push(id.clone());
        }
        lock(&self.outcomes).push(outcomes.to_vec());
        Ok(fenced)
    }

    async fn take_due(
        &self,
        now: DateTime<Utc>,
        recheck: Duration,
        limit: usize,
        channels: &[SweepScope],
    ) -> Result<Vec<Communication>, DependencyError> {
        self.script.enter(StoreMethod::TakeDue, limit).await?;
        let next = now + chrono::Duration::from_std(recheck).unwrap_or_default();
        let mut all = lock(&self.records);
        let mut due = Vec::new();
        for s in all.values_mut() {
            let r = &s.record;
            let Some(scope) = channels
                .iter()
                .find(|c| c.channel == r.channel && c.priority == r.priority)
            else {
                continue;
            };
            let queued = s.queued_at.unwrap_or(r.created_at);
            let ready = matches!(r.status, Status::Pending | Status::Sending)
                && scope.acked_up_to.is_none_or(|t| queued <= t)
                && s.not_before.is_none_or(|t| t <= now)
                && s.next_look.is_none_or(|t| t <= now);
            if ready && due.len() < limit {
                s.next_look = Some(next);
                s.queued_at = Some(now);
                due.push(r.clone());
            }
        }
        Ok(due)
    }

    async fn get(&self, id: &str) -> Result<Option<Communication>, DependencyError> {
        self.script.enter(StoreMethod::Get, 1).await?;
        Ok(self.record(id))
    }

    async fn records(&self, ids: &[String]) -> Result<Vec<Communication>, DependencyError> {
        self.script.enter(StoreMethod::Records, ids.len()).await?;
        Ok(ids.iter().filter_map(|id| self.record(id)).collect())
    }

    async fn apply_receipts(
        &self,
        receipts: &[ReceiptUpdate],
    ) -> Result<Vec<ReceiptResult>, DependencyError> {
        self.script
            .enter(StoreMethod::ApplyReceipts, receipts.len())
            .await?;
        let mut all = lock(&self.records);
        Ok(receipts
            .iter()
            .map(|u| Self::apply_receipt(&mut all, u))
            .collect())
    }

    async fn ping(&self) -> Result<(), DependencyError> {
        self.script.enter(StoreMethod::Ping, 0).await
    }
}
