//! The MongoDB indexes of `communications`, and whether they exist yet.
//!
//! Idempotency rests on the unique index `idempotency_key`: until it exists two
//! concurrent requests with one key can both be stored. So the service builds the indexes
//! at start-up and says whether they exist ([`IndexReadiness`]): `/readyz` is 503 and
//! `POST /api/v1/communication` refuses (or holds) requests until then. The index that
//! replaces an older one is created before the older one is dropped, so there is no moment
//! without a unique index. Records that already share a key (written by a version that
//! served without the index) make the build impossible: that is an error naming them and
//! saying what to do, checked again every `index_retry_max_ms` so fixing the data heals it.
//!
//! Start-up also rewrites records of earlier versions (no tenant, no `tenantKey`, fallbacks
//! and scheduled sends kept as before). Each rewrite is a filter no index serves, so it
//! reads the whole collection; a mark in the `migrations` collection says they are done,
//! and a start that finds it reads nothing. (Processes of an earlier version must be
//! stopped before the first start of this one: records they write later are not rewritten.)

use actors::backoff::Backoff;
use actors::domain::DEFAULT_TENANT;
use actors::ports::DependencyError;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use tokio::sync::watch;
use tokio::time::Instant;

/// The unique index that makes an `Idempotency-Key` hold (per tenant): on `tenantKey`
/// (`<tenant>:<key>`), which only keyed records carry, so a sparse index holds those alone
/// and SecantusDB serves a lookup by key from it.
pub const IDEMPOTENCY_INDEX: &str = "idempotency_key";
/// The field it is on: the tenant and the key in one string (a tenant name has no `:`).
pub const TENANT_KEY: &str = "tenantKey";
/// Its predecessors: one key space for every tenant, then (`tenant`, `idempotencyKey`)
/// partial, which SecantusDB never plans a read with (a lookup by key read every record);
/// dropped once the new one exists.
const OLD_IDEMPOTENCY_INDEX: &str = "idempotency";
const PER_TENANT_IDEMPOTENCY_INDEX: &str = "idempotency_per_tenant";
/// The collection of the start-up mark, and the rewrites it says are done.
const MARKS: &str = "migrations";
const MARK_ID: &str = "communications";
/// 2 since the fallbacks of records failed before their time are made due at start-up
/// (`super::fallbacks::failed_due_now`), 3 since bulk sends' members are listed in
/// `batches` (`super::batches::adopt_earlier_batches`), 4 since dead letters are entered in
/// `dead_letters` (`super::dead_letters::adopt_earlier_dead_letters`); an older mark runs
/// the rewrites once more (each is idempotent).
const MIGRATIONS_DONE: i32 = 4;
/// The FallbackActor's partial index before `fallback_due_at`; dropped once that exists.
const OLD_FALLBACK_INDEX: &str = "fallback_due";
/// The OutboxSweeper's index before `next_attempt`; dropped once that exists.
const OLD_DUE_INDEX: &str = "due";
/// The SchedulerActor's sparse index before it read `next_attempt`; dropped at start-up.
const OLD_SCHEDULED_INDEX: &str = "scheduled_due";
/// Examples of clashing keys named in the error.
const CLASH_EXAMPLES: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Unavailable(#[from] DependencyError),
    /// Records share an idempotency key, so the unique index cannot be built.
    #[error("{}", clash_message(.0))]
    KeyClashes(Vec<KeyClash>),
}

/// Records holding the same (tenant, `idempotencyKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClash {
    pub tenant: String,
    pub key: String,
    pub ids: Vec<String>,
}

fn clash_message(clashes: &[KeyClash]) -> String {
    let examples: Vec<String> = clashes
        .iter()
        .map(|c| {
            format!(
                "tenant {:?} key {:?}: {}",
                c.tenant,
                c.key,
                c.ids.join(", ")
            )
        })
        .collect();
    format!(
        "cannot build the unique index {IDEMPOTENCY_INDEX}: records share an Idempotency-Key \
         ({}); keep one record of each and remove the key from the others \
         (db.communications.updateOne({{_id: ObjectId(\"<id>\")}}, {{$unset: {{idempotencyKey: \"\"}}}})); \
         the service tries again every index_retry_max_ms, and until then /readyz is 503 \
         and new communications are refused",
        examples.join("; ")
    )
}

/// Where the index build stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexState {
    Building,
    Ready,
    /// The build cannot succeed as the data stands; the message says what to do.
    Failed(String),
}

/// Whether the indexes exist, for those who must not act before (readiness, accepting).
#[derive(Debug, Clone)]
pub struct IndexReadiness(watch::Receiver<IndexState>);

impl IndexReadiness {
    /// A readiness that is set through the returned sender.
    pub fn new() -> (watch::Sender<IndexState>, IndexReadiness) {
        let (tx, rx) = watch::channel(IndexState::Building);
        (tx, IndexReadiness(rx))
    }

    /// Already built (for tests and tools that made the indexes themselves).
    pub fn ready() -> IndexReadiness {
        IndexReadiness(watch::channel(IndexState::Ready).1)
    }

    pub fn state(&self) -> IndexState {
        self.0.borrow().clone()
    }

    /// Wait while the indexes are being built, until `until` at most; the state then if
    /// they do not exist (a failed build answers at once).
    pub async fn wait_until(&self, until: Instant) -> Result<(), IndexState> {
        let mut rx = self.0.clone();
        let building = |s: &IndexState| *s != IndexState::Building;
        let _ = tokio::time::timeout_at(until, async { rx.wait_for(building).await.is_ok() }).await;
        match self.state() {
            IndexState::Ready => Ok(()),
            other => Err(other),
        }
    }
}

/// Build the indexes, retrying while MongoDB does not answer (waits from `backoff`) and
/// every `backoff.max` while records clash, until they exist; `status` follows.
pub async fn build(
    coll: Collection<Document>,
    backoff: Backoff,
    status: watch::Sender<IndexState>,
) {
    let mut delays = backoff.delays();
    loop {
        let wait = match ensure(&coll).await {
            Ok(()) => {
                tracing::info!("MongoDB indexes in place; accepting communications");
                status.send_replace(IndexState::Ready);
                return;
            }
            Err(IndexError::Unavailable(e)) => {
                let wait = delays.next_delay();
                tracing::warn!(error = %e, ?wait, "cannot create MongoDB indexes yet; not accepting communications until they exist");
                wait
            }
            Err(e @ IndexError::KeyClashes(_)) => {
                let message = e.to_string();
                tracing::error!("{message}");
                metrics::counter!("mongodb_index_build_failures_total").increment(1);
                status.send_replace(IndexState::Failed(message));
                backoff.max
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn models() -> Vec<IndexModel> {
    let named = |name: &str| IndexOptions::builder().name(name.to_string());
    vec![
        // The OutboxSweeper's look (`super::sweep`): a range of `nextAttemptAt`, which a
        // record carries only while it may still have to be sent, so the index holds those
        // alone. It replaces `due` (`status`, `nextAttemptAt`), dropped below, which
        // SecantusDB never planned the look with.
        IndexModel::builder()
            .keys(doc! {"nextAttemptAt": 1})
            .options(named(super::sweep::INDEX).sparse(true).build())
            .build(),
        IndexModel::builder()
            .keys(doc! {TENANT_KEY: 1})
            .options(named(IDEMPOTENCY_INDEX).unique(true).sparse(true).build())
            .build(),
        IndexModel::builder()
            .keys(doc! {"providerMessageId": 1})
            .options(named("provider_message").build())
            .build(),
        // The Reconciler's look at recently changed records.
        IndexModel::builder()
            .keys(doc! {"updatedAt": -1})
            .options(named("recently_changed").build())
            .build(),
        // The FallbackActor's look: `fallbackDueAt` exists only while a record's fallback
        // is not settled, so the index holds those alone. Sparse, not partial: SecantusDB
        // plans a collection scan for a query on a partial index (measured, README
        // "Scheduled sends and cancels"); it replaces the partial `fallback_due`, dropped
        // below.
        IndexModel::builder()
            .keys(doc! {super::fallbacks::DUE_FIELD: 1})
            .options(named("fallback_due_at").sparse(true).build())
            .build(),
        // (A bulk send's members are listed in `batches`, not found through an index here:
        // `super::batches`.)
        // (A tenant's dead letters are listed in `dead_letters`, not found through an index
        // here: `super::dead_letters`.)
    ]
}

fn err(e: impl std::fmt::Display) -> DependencyError {
    DependencyError::new(actors::ports::Dependency::MongoDb, e)
}

/// The indexes the queries need, and the records of earlier versions rewritten for them
/// (once: see [`migrated`]). Idempotent. Records from before tenants existed are given the
/// default tenant first; a replaced key index goes only once its successor exists.
pub async fn ensure(coll: &Collection<Document>) -> Result<(), IndexError> {
    let done = migrated(coll).await?;
    if !done {
        coll.update_many(
            doc! {"tenant": {"$exists": false}},
            doc! {"$set": {"tenant": DEFAULT_TENANT}},
        )
        .await
        .map_err(err)?;
        give_tenant_keys(coll).await?;
    }
    if let Err(e) = coll.create_indexes(models()).await {
        let clashes = key_clashes(coll).await?;
        if clashes.is_empty() {
            return Err(err(e).into());
        }
        return Err(IndexError::KeyClashes(clashes));
    }
    drop_replaced(coll, OLD_IDEMPOTENCY_INDEX).await;
    drop_replaced(coll, PER_TENANT_IDEMPOTENCY_INDEX).await;
    super::dead_letters::ensure_index(coll).await?;
    if !done {
        let n = super::fallbacks::add_due_fields(coll).await?;
        let failed = super::fallbacks::failed_due_now(coll).await?;
        if failed > 0 {
            tracing::info!(
                n = failed,
                "fallbacks of records that failed before their time made due"
            );
        }
        if n > 0 {
            tracing::info!(
                n,
                "unsettled fallbacks of an earlier version given fallbackDueAt"
            );
        }
        let n = super::scheduled::adopt_earlier_due_times(coll).await?;
        if n > 0 {
            tracing::info!(
                n,
                "scheduled records of an earlier version given their due time in nextAttemptAt"
            );
        }
        let n = super::batches::adopt_earlier_batches(coll).await?;
        if n > 0 {
            tracing::info!(n, "bulk sends of an earlier version listed in batches");
        }
        let n = super::dead_letters::adopt_earlier_dead_letters(coll).await?;
        if n > 0 {
            tracing::info!(n, "dead letters of an earlier version entered");
        }
        mark_migrated(coll).await?;
    }
    drop_replaced(coll, OLD_FALLBACK_INDEX).await;
    drop_replaced(coll, OLD_DUE_INDEX).await;
    drop_replaced(coll, OLD_SCHEDULED_INDEX).await;
    drop_replaced(coll, super::batches::OLD_INDEX).await;
    drop_replaced(coll, super::dead_letters::OLD_INDEX).await;
    Ok(())
}

/// The `tenantKey` of a record that holds `key` for `tenant`.
pub fn tenant_key(tenant: &str, key: &str) -> String {
    format!("{tenant}:{key}")
}

/// Keyed records of an earlier version get their `tenantKey`; one whose key was removed by
/// hand (the fix for a clash, see [`clash_message`]) loses it too.
async fn give_tenant_keys(coll: &Collection<Document>) -> Result<(), IndexError> {
    let given = coll
        .update_many(
            doc! {"idempotencyKey": {"$exists": true}, TENANT_KEY: {"$exists": false}},
            vec![doc! {"$set": {TENANT_KEY: {"$concat": ["$tenant", ":", "$idempotencyKey"]}}}],
        )
        .await
        .map_err(err)?;
    let taken = coll
        .update_many(
            doc! {"idempotencyKey": {"$exists": false}, TENANT_KEY: {"$exists": true}},
            doc! {"$unset": {TENANT_KEY: ""}},
        )
        .await
        .map_err(err)?;
    if given.modified_count + taken.modified_count > 0 {
        tracing::info!(
            given = given.modified_count,
            taken = taken.modified_count,
            "records of an earlier version given their tenantKey"
        );
    }
    Ok(())
}

fn marks(coll: &Collection<Document>) -> Collection<Document> {
    super::mongo::sibling(coll, MARKS)
}

/// Whether an earlier start rewrote the records of earlier versions already.
async fn migrated(coll: &Collection<Document>) -> Result<bool, IndexError> {
    let mark = marks(coll)
        .find_one(doc! {"_id": MARK_ID})
        .await
        .map_err(err)?;
    Ok(mark.and_then(|m| m.get_i32("done").ok()).unwrap_or(0) >= MIGRATIONS_DONE)
}

async fn mark_migrated(coll: &Collection<Document>) -> Result<(), IndexError> {
    marks(coll)
        .update_one(
            doc! {"_id": MARK_ID},
            doc! {"$set": {"done": MIGRATIONS_DONE, "at": mongodb::bson::DateTime::now()}},
        )
        .upsert(true)
        .await
        .map_err(err)?;
    Ok(())
}

/// Drop an index a newer one replaced, once that exists; gone already is fine.
async fn drop_replaced(coll: &Collection<Document>, name: &str) {
    if let Err(e) = coll.drop_index(name).await {
        tracing::debug!(error = %e, index = name, "no replaced index to drop");
    }
}

/// Some (tenant, key) pairs held by more than one record, with their ids.
pub async fn key_clashes(coll: &Collection<Document>) -> Result<Vec<KeyClash>, IndexError> {
    let pipeline = vec![
        doc! {"$match": {"idempotencyKey": {"$exists": true}}},
        doc! {"$group": {"_id": {"tenant": "$tenant", "key": "$idempotencyKey"},
        "ids": {"$push": "$_id"}, "n": {"$sum": 1}}},
        doc! {"$match": {"n": {"$gt": 1}}},
        doc! {"$limit": CLASH_EXAMPLES},
    ];
    let groups: Vec<Document> = coll
        .aggregate(pipeline)
        .await
        .map_err(err)?
        .try_collect()
        .await
        .map_err(err)?;
    Ok(groups.iter().filter_map(clash_of).collect())
}

fn clash_of(group: &Document) -> Option<KeyClash> {
    let id = group.get_document("_id").ok()?;
    Some(KeyClash {
        tenant: id.get_str("tenant").unwrap_or(DEFAULT_TENANT).to_string(),
        key: id.get_str("key").ok()?.to_string(),
        ids: group
            .get_array("ids")
            .ok()?
            .iter()
            .filter_map(|b| b.as_object_id().map(|o| o.to_hex()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_clash_names_the_records_and_the_fix() {
        let e = IndexError::KeyClashes(vec![KeyClash {
            tenant: "acme".into(),
            key: "order-42".into(),
            ids: vec!["65f0a".into(), "65f0b".into()],
        }]);
        let m = e.to_string();
        for part in [
            "idempotency_key",
            "\"acme\"",
            "\"order-42\"",
            "65f0a, 65f0b",
            "$unset",
        ] {
            assert!(m.contains(part), "{part} missing from {m}");
        }
    }

    #[tokio::test]
    async fn waiting_for_the_indexes_ends_when_they_exist_or_at_the_deadline() {
        let (tx, r) = IndexReadiness::new();
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(r.wait_until(soon).await, Err(IndexState::Building));
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_until(Instant::now() + Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_replace(IndexState::Ready);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(IndexReadiness::ready().state(), IndexState::Ready);
        let (tx, r) = IndexReadiness::new();
        tx.send_replace(IndexState::Failed("clash".into()));
        let forever = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            r.wait_until(forever).await,
            Err(IndexState::Failed("clash".into()))
        );
    }
}
