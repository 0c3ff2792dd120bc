//! Issue 12, items 6, 9 and 10, on real servers: no delivery receipt is dropped (one that
//! overtakes the recording of its send is parked in MongoDB until the record catches up,
//! across restarts); SIGTERM flushes what the service holds (receipts and log events still
//! buffered), stage by stage, even when the send stage used up its deadline; MongoDB and
//! Elasticsearch agree. Each scenario starts its own stack, runs one at a time, and ends
//! with the books where messages are sent: accepted = sent + failed, every send seen by the
//! stand-in, every duplicate flagged.

mod common;

use common::*;
use mongodb::bson::{doc, oid::ObjectId};
use serde_json::{json, Value};
use std::time::Duration;

/// Provider calls answered within 5 s; leases and idle claims outlast them.
const SLOW_CALLS: &[(&str, &str)] = &[
    ("PROVIDER_TIMEOUT_MS", "5000"),
    ("STALE_AFTER_MS", "6000"),
    ("CLAIM_IDLE_MS", "6000"),
    ("SWEEP_RECHECK_MS", "15000"),
];

/// Receipts wait 300 ms in memory for their record, then are parked, looked at again
/// every 500 ms.
fn parking() -> Vec<(&'static str, toml::Value)> {
    vec![
        ("receipts.wait_for_record_ms", toml::Value::Integer(300)),
        ("receipts.parked_recheck_ms", toml::Value::Integer(500)),
        ("receipts.parked_recheck_max_ms", toml::Value::Integer(1000)),
    ]
}

/// A metric's value (summed over its labels) from the `/metrics` text at `url`; `None`
/// when absent.
async fn metric_at(url: &str, name: &str) -> Option<f64> {
    let text = get(url).await.ok()?.text().await.ok()?;
    let name = common::metric_name(name);
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

async fn metric(svc: &Service, name: &str) -> Option<f64> {
    metric_at(&svc.url("/metrics"), name).await
}

/// The highest value `name` shows until the returned sender is dropped or sent to.
fn watch_highest(
    svc: &Service,
    name: &'static str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<f64>,
) {
    let url = svc.url("/metrics");
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut highest = 0.0f64;
        while stopped.try_recv() == Err(tokio::sync::oneshot::error::TryRecvError::Empty) {
            if let Some(v) = metric_at(&url, name).await {
                highest = highest.max(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        highest
    });
    (stop, task)
}

/// Wait until `name` satisfies `ok`.
async fn wait_metric(svc: &Service, name: &str, what: &str, ok: fn(f64) -> bool) {
    eventually(Duration::from_secs(10), what, || async move {
        metric(svc, name).await.filter(|v| ok(*v)).map(|_| ())
    })
    .await;
}

/// POST `n` SMS with bodies `{tag}-{i}`; every one must be accepted.
async fn post_sms(svc: &Service, tag: &str, n: usize) -> Vec<(String, String)> {
    let mut accepted = Vec::new();
    for i in 0..n {
        let body = format!("{tag}-{i}");
        let (s, v) = svc.post(sms(&body)).await;
        assert_eq!(s, 200, "{v}");
        accepted.push((body, v["id"].as_str().unwrap().to_string()));
    }
    accepted
}

/// Wait until every record has `status`.
async fn all_reach(stack: &Stack, accepted: &[(String, String)], status: &str, within: Duration) {
    let coll = stack.records().await;
    let oids: Vec<ObjectId> = accepted
        .iter()
        .map(|(_, id)| ObjectId::parse_str(id).unwrap())
        .collect();
    let what = format!("every record {status}");
    eventually(within, &what, || {
        let (coll, oids) = (coll.clone(), oids.clone());
        async move {
            let n = coll
                .count_documents(doc! {"_id": {"$in": &oids}, "status": status})
                .await
                .ok()?;
            (n as usize == oids.len()).then_some(())
        }
    })
    .await;
}

/// The books of a scenario without crashes inside a provider call: all sent, each once.
async fn sent_once_each(stack: &Stack, accepted: &[(String, String)]) {
    clear_faults(stack).await;
    let books = check_books(stack, accepted, Duration::from_secs(30)).await;
    assert_eq!(books.sent, accepted.len(), "accepted = sent: {books:?}");
    assert_eq!(books.duplicates, 0, "{books:?}");
}

/// Twilio takes each SMS and calls back at once (`sent`, then `delivered`), but answers the
/// call 3 s later: every receipt comes long before its send is recorded, and long after the
/// 300 ms a receipt waits in memory. It is parked (counted while parked), not dropped, and
/// applied once the record catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_that_overtakes_its_send_is_parked_and_applied_later() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service_configured(&fast_env(SLOW_CALLS), &parking());
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "late", "latency_ms": 3000}),
    )
    .await;
    let (stop, parked) = watch_highest(&svc, "receipts_parked");
    let accepted = post_sms(&svc, &unique("overtaken"), 3).await;
    all_reach(&stack, &accepted, "delivered", Duration::from_secs(20)).await;
    let _ = stop.send(());
    assert!(
        parked.await.unwrap() >= 3.0,
        "the parked receipts were counted while parked"
    );
    wait_metric(&svc, "receipts_parked", "nothing left parked", |v| v == 0.0).await;
    assert!(metric(&svc, "receipts_parked_total").await.unwrap_or(0.0) >= 3.0);
    sent_once_each(&stack, &accepted).await;
}

/// As above, but the service is killed (SIGKILL) while the receipts are parked and the
/// sends not yet recorded. The next process claims the records once their leases expire,
/// finds them in Twilio's list (not sent again), and the receipts parked by the dead one
/// are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_receipt_survives_a_restart() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let mut first = stack.start_service_configured(&fast_env(SLOW_CALLS), &parking());
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "late", "latency_ms": 3000}),
    )
    .await;
    let accepted = post_sms(&first, &unique("parked-restart"), 2).await;
    // Twilio's callbacks come 300 ms after it took a message; 300 ms more in memory.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.proc.kill();
    clear_faults(&stack).await;
    let coll = stack.records().await;
    for (_, id) in &accepted {
        let d = coll
            .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            d.get_str("status").unwrap(),
            "pending",
            "killed mid-call: {d}"
        );
    }
    let _next = stack.start_service_configured(&fast_env(SLOW_CALLS), &parking());
    all_reach(&stack, &accepted, "delivered", Duration::from_secs(40)).await;
    sent_once_each(&stack, &accepted).await;
}

/// Log events and receipts are held a minute in their batches.
fn long_batches() -> Vec<(&'static str, toml::Value)> {
    vec![
        ("log_indexer.max_wait_ms", toml::Value::Integer(60_000)),
        ("receipts.linger_ms", toml::Value::Integer(60_000)),
        ("receipts.apply_timeout_ms", toml::Value::Integer(120_000)),
    ]
}

/// Provider calls up to 8 s; the send stage of a shutdown gets 2 s, the flush stage 10 s.
const DRAIN: &[(&str, &str)] = &[
    ("PROVIDER_TIMEOUT_MS", "8000"),
    ("STALE_AFTER_MS", "9000"),
    ("CLAIM_IDLE_MS", "9000"),
    ("SWEEP_RECHECK_MS", "15000"),
    ("SHUTDOWN_DEADLINE_MS", "2000"),
    ("SHUTDOWN_FLUSH_MS", "10000"),
];

/// Documents of `index` with these ids.
async fn es_ids(stack: &Stack, index: &str, ids: &[String]) -> Vec<Value> {
    stack
        .es_search(index, json!({"ids": {"values": ids}}))
        .await
}

/// Wait for the process to exit; its status.
async fn exited(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < within,
            "still running {within:?} after SIGTERM:\n{}",
            proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Five SMS sent, their `delivered` receipts held in the receipts' batch and every log
/// event in the LogIndexer's, and a WhatsApp call hanging (longer than the send stage's
/// 2 s): at SIGTERM the send stage is cut, and still, after the exit, MongoDB has every
/// receipt applied and Elasticsearch every event (indexed before the exit, not left
/// pending). After a restart the cut WhatsApp message is sent, and the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_buffered_receipts_and_events_even_when_sends_are_cut() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let mut svc = stack.start_service_configured(&fast_env(DRAIN), &long_batches());
    let mut accepted = post_sms(&svc, &unique("drain"), 5).await;
    all_reach(&stack, &accepted, "sent", Duration::from_secs(15)).await;
    // The stand-in calls back `delivered` 300 ms after taking each message.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    set_fault(&stack, json!({"provider": "whatsapp", "mode": "hang"})).await;
    let body = unique("drain-wa");
    let (s, v) = svc
        .post(json!({"type": "whatsapp", "data": {"from": "+15550001111", "to": "+15557654321", "msg": body}}))
        .await;
    assert_eq!(s, 200, "{v}");
    let wa = (body, v["id"].as_str().unwrap().to_string());
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Held, not yet written: no receipt applied, no event indexed.
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    let coll = stack.records().await;
    let oids: Vec<ObjectId> = ids
        .iter()
        .map(|i| ObjectId::parse_str(i).unwrap())
        .collect();
    let delivered = doc! {"_id": {"$in": &oids}, "status": "delivered"};
    assert_eq!(coll.count_documents(delivered.clone()).await.unwrap(), 0);
    assert!(es_ids(&stack, "communications", &ids).await.is_empty());

    svc.proc.signal(libc::SIGTERM);
    let status = exited(&mut svc.proc, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}:\n{}", svc.proc.log_tail());
    assert_eq!(
        coll.count_documents(delivered).await.unwrap(),
        5,
        "every buffered receipt applied before the exit:\n{}",
        svc.proc.log_tail()
    );
    let docs = es_ids(&stack, "communications", &ids).await;
    assert_eq!(docs.len(), 5, "{docs:?}");
    for d in &docs {
        assert_eq!(d["_source"]["status"], "delivered", "{d}");
    }
    let log_ids: Vec<String> = ids
        .iter()
        .flat_map(|id| ["queued:0", "sent:1", "delivered:1"].map(|e| format!("{id}:{e}")))
        .collect();
    let logs = es_ids(&stack, "communication-logs", &log_ids).await;
    assert_eq!(
        logs.len(),
        15,
        "every event indexed before the exit: {logs:?}"
    );

    clear_faults(&stack).await;
    let _next = stack.start_service_configured(&fast_env(DRAIN), &[]);
    accepted.push(wa);
    let books = check_books(&stack, &accepted, Duration::from_secs(45)).await;
    assert_eq!(books.sent, accepted.len(), "{books:?}");
}

/// The `communications` document of record `id`, once it shows `status`.
async fn indexed_as(stack: &Stack, id: &str, status: &str, within: Duration) -> Value {
    let what = format!("{id} indexed as {status}");
    eventually(within, &what, || async move {
        let docs = es_ids(stack, "communications", &[id.to_string()]).await;
        docs.into_iter().find(|d| d["_source"]["status"] == status)
    })
    .await
}

/// The record, once MongoDB has it with `status`.
async fn recorded_as(
    stack: &Stack,
    id: &str,
    status: &str,
    within: Duration,
) -> mongodb::bson::Document {
    let coll = stack.records().await;
    let oid = ObjectId::parse_str(id).unwrap();
    let what = format!("{id} {status} in MongoDB");
    eventually(within, &what, || {
        let coll = coll.clone();
        async move {
            coll.find_one(doc! {"_id": oid, "status": status})
                .await
                .ok()?
        }
    })
    .await
}

/// A poison message (it crashes its sender every time) is dead-lettered and its record
/// `failed` in MongoDB; search says `failed` too, through the dead-letter's own `failed`
/// event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_record_reaches_search_as_failed() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[]));
    let body = format!("{} #panic-always#", unique("poison"));
    let (s, v) = svc.post(sms(&body)).await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    recorded_as(&stack, &id, "failed", Duration::from_secs(60)).await;
    indexed_as(&stack, &id, "failed", Duration::from_secs(10)).await;
    let logs = stack
        .es_search(
            "communication-logs",
            json!({"bool": {"filter": [{"term": {"communicationId": id}}, {"term": {"status": "failed"}}]}}),
        )
        .await;
    assert!(
        logs.iter()
            .any(|l| l["_source"]["service"] == "dead-letter"),
        "the dead-letter's failed event: {logs:?}"
    );
    let books = check_books(&stack, &[(body, id)], Duration::from_secs(5)).await;
    assert_eq!((books.sent, books.failed), (0, 1));
}

/// A delivered SMS that Twilio then reports `undelivered` (a move MongoDB allows): search
/// follows to `undelivered`, not held at `delivered` by an equal version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_record_later_undelivered_reads_undelivered_in_search() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[]));
    let accepted = post_sms(&svc, &unique("then-undelivered"), 1).await;
    let id = accepted[0].1.clone();
    let rec = recorded_as(&stack, &id, "delivered", Duration::from_secs(20)).await;
    indexed_as(&stack, &id, "delivered", Duration::from_secs(10)).await;
    let sid = rec.get_str("providerMessageId").unwrap().to_string();
    let url = svc.url("/api/v1/callbacks/twilio");
    let form: Vec<(String, String)> = [
        ("MessageSid", sid.as_str()),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30003"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sig = comm_aggregator::callbacks::twilio_signature("sandbox-auth-token", &url, &form);
    let r = reqwest::Client::new()
        .post(&url)
        .header("X-Twilio-Signature", sig)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    recorded_as(&stack, &id, "undelivered", Duration::from_secs(10)).await;
    indexed_as(&stack, &id, "undelivered", Duration::from_secs(10)).await;
    sent_once_each(&stack, &accepted).await;
}

/// A service whose Reconciler passes every second over the last 2 minutes, leaving out
/// the last `settle_ms`.
fn with_fast_reconciler(stack: &Stack, settle_ms: i64) -> Service {
    stack.start_service_configured(
        &fast_env(&[]),
        &[
            ("reconciler.interval_ms", toml::Value::Integer(1000)),
            ("reconciler.lookback_ms", toml::Value::Integer(120_000)),
            ("reconciler.settle_ms", toml::Value::Integer(settle_ms)),
        ],
    )
}

/// Search drifts from MongoDB behind the service's back (a document overwritten with an
/// old status, another deleted, written straight to Elasticsearch): the reconciler finds
/// both and writes MongoDB's state back, counted in `reconciler_repairs_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_repairs_search_that_drifted() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = with_fast_reconciler(&stack, 3000);
    let accepted = post_sms(&svc, &unique("drift"), 2).await;
    let (a, b) = (accepted[0].1.clone(), accepted[1].1.clone());
    for id in [&a, &b] {
        recorded_as(&stack, id, "delivered", Duration::from_secs(20)).await;
        indexed_as(&stack, id, "delivered", Duration::from_secs(10)).await;
    }
    // Nothing to repair while the events keep search in step.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = metric(&svc, "reconciler_repairs_total")
        .await
        .unwrap_or(0.0);
    let drifted = json!({"communicationId": a, "status": "pending", "tenant": TENANT});
    let path = format!("/communications/_doc/{a}?refresh=true");
    stack.es_put(&path, &drifted).await;
    let deleted = reqwest::Client::new()
        .delete(format!(
            "{}/communications/_doc/{b}?refresh=true",
            stack.es()
        ))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    assert!(es_ids(&stack, "communications", std::slice::from_ref(&b))
        .await
        .is_empty());
    indexed_as(&stack, &a, "delivered", Duration::from_secs(15)).await;
    indexed_as(&stack, &b, "delivered", Duration::from_secs(15)).await;
    let repairs = metric(&svc, "reconciler_repairs_total")
        .await
        .unwrap_or(0.0)
        - before;
    assert!(repairs >= 2.0, "{repairs} repairs counted");
    // Repaired for good: the next passes find nothing more to do.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = metric(&svc, "reconciler_repairs_total")
        .await
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        metric(&svc, "reconciler_repairs_total")
            .await
            .unwrap_or(0.0),
        settled
    );
    sent_once_each(&stack, &accepted).await;
}

/// Issue #14: the reconciler's pass read its whole window (records changed from
/// `lookback_ms` to `settle_ms` ago) in one query, and SecantusDB reads every record of the
/// range a query names before it sorts and cuts to the limit: under load, each pass held
/// the store, and every accept, for as long as reading ten minutes of changes took. Now
/// the window is walked back from its newest end in slices of at most a minute, seen in
/// MongoDB's profiler (here a window of 119 s: on the commit before, every read named all
/// of it); the records of the window are still all found (the repair test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcilers_pass_reads_its_window_in_slices_of_at_most_a_minute() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = with_fast_reconciler(&stack, 1000);
    let accepted = post_sms(&svc, &unique("slices"), 5).await;
    for (_, id) in &accepted {
        recorded_as(&stack, id, "delivered", Duration::from_secs(20)).await;
    }
    stack.profile(2).await;
    let reads = doc! {"op": "query", "command.filter.updatedAt": {"$exists": true}};
    let passes = eventually(Duration::from_secs(20), "reads of three passes", || async {
        let got = stack.profile_entries(reads.clone()).await;
        (got.len() >= 3).then_some(got)
    })
    .await;
    stack.profile(0).await;
    for p in &passes {
        let range = p
            .get_document("command")
            .and_then(|c| c.get_document("filter"))
            .and_then(|f| f.get_document("updatedAt"))
            .unwrap();
        let lo = range
            .get_datetime("$gt")
            .or_else(|_| range.get_datetime("$gte"))
            .unwrap();
        let hi = range.get_datetime("$lte").unwrap();
        let wide = hi.timestamp_millis() - lo.timestamp_millis();
        assert!(wide <= 60_000, "a read named {wide} ms of the window: {p}");
    }
    sent_once_each(&stack, &accepted).await;
}

/// Issue #14: while any receipt was parked, the ReceiptActor counted the whole
/// `parked_receipts` collection at every look (each second), and SecantusDB counts by
/// reading every document (20,000 parked: 162 ms a look, holding the store and every
/// accept behind it; receipts whose records never come stay parked for good). Now, with
/// more than 1,000 parked, a look reads only the due ones, and the count (for the
/// `receipts_parked` gauge) comes once a minute: seen in MongoDB's profiler over 4 s of
/// looks with 1,500 parked, one count at start-up and no more (on the commit before, one a
/// second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_receipts_are_counted_once_a_minute_not_at_every_look() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let client = stack.mongo_client().await;
    let db = client.database("communication-aggregator");
    let later = mongodb::bson::DateTime::from_millis(
        mongodb::bson::DateTime::now().timestamp_millis() + 3_600_000,
    );
    let parked: Vec<_> = (0..1500)
        .map(|i| doc! {"_id": format!("twilio:SMunknown{i}"), "nextTryAt": later, "tries": 3})
        .collect();
    db.collection::<mongodb::bson::Document>("parked_receipts")
        .insert_many(parked)
        .await
        .unwrap();
    db.run_command(doc! {"profile": 2}).await.unwrap();
    let svc = stack.start_service(&fast_env(&[]));
    let profiled = |filter: mongodb::bson::Document| {
        let db = db.clone();
        async move {
            use futures::TryStreamExt;
            let mut f = filter;
            f.insert("ns", "communication-aggregator.parked_receipts");
            db.collection::<mongodb::bson::Document>("system.profile")
                .find(f)
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
        }
    };
    let looks = doc! {"op": "query", "command.filter.nextTryAt": {"$exists": true}};
    eventually(
        Duration::from_secs(20),
        "four looks at the parked receipts",
        || async { (profiled(looks.clone()).await.len() >= 4).then_some(()) },
    )
    .await;
    db.run_command(doc! {"profile": 0}).await.unwrap();
    let counts = profiled(doc! {"command.aggregate": "parked_receipts"}).await;
    assert_eq!(counts.len(), 1, "counted once: {counts:?}");
    assert_eq!(metric(&svc, "receipts_parked").await, Some(1500.0));
    drop(svc);
}
