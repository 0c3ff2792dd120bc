//! Leases and the writes they fence (issue 12, items 2 and 11): a record's lease is held
//! for its own provider call (confirmed right before it, renewed while it runs and until its
//! outcome is written), an outcome write whose lease was lost writes nothing and is flagged
//! and counted, dead-lettering waits for a live lease, and every write asks a replica set
//! for a majority. Each scenario starts its own stack, runs one at a time, and ends with the
//! books: accepted = sent + failed + dead-lettered, every send seen by the stand-in, every
//! duplicate flagged and counted.

mod common;

use common::*;
use mongodb::bson::{doc, oid::ObjectId, Document};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const BOOKS_WAIT: Duration = Duration::from_secs(60);

/// `possible_duplicate_sends_total` of one service, every channel and cause together.
async fn duplicates_counted(svc: &Service) -> u64 {
    let text = get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("comm_aggregator_possible_duplicate_sends_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// How often the stand-in saw each body.
async fn seen_by_body(stack: &Stack) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in stack.sandbox_messages().await {
        if let Some(b) = m["body"].as_str() {
            *seen.entry(b.to_string()).or_default() += 1;
        }
    }
    seen
}

/// The scenario (two processes, Twilio calls within a 2.5 s timeout, claims
/// idle after 3 s, leases of 3 s), with the batch outlasting its lease the way a provider
/// makes it: a 429 with `Retry-After: 8` pauses process A's sender while a batch of SMS
/// waits to be called under leases of 3 s. Process B comes up, takes the idle entries over
/// and, the leases having lapsed, sends them; A wakes up and sends them again. Now a claim
/// does not sleep out a pause longer than its lease (it is given back and rescheduled for
/// the pause's end), and a lease is confirmed right before its call: each message reaches
/// Twilio once, and the books hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_lease_sends_nothing_twice_across_two_processes() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let env = |name: &'static str| {
        fast_env(&[
            ("PROVIDER_TIMEOUT_MS", "2500"),
            ("CLAIM_IDLE_MS", "3000"),
            ("STALE_AFTER_MS", "3000"),
            ("CONSUMER_NAME", name),
        ])
    };
    let a = stack.start_service(&env("node-a"));
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "429", "retry_after": 8}),
    )
    .await;
    let tag = unique("paused");
    let accepted = load(a.port, &tag, 60, Duration::ZERO).await;
    assert_eq!(accepted.len(), 60);
    let coll = stack.records().await;
    eventually(Duration::from_secs(10), "a 429 recorded", || {
        let coll = coll.clone();
        async move {
            let n = coll
                .count_documents(doc! {"errors.code": "20429"})
                .await
                .ok()?;
            (n > 0).then_some(())
        }
    })
    .await;
    clear_faults(&stack).await;
    let b = stack.start_service(&env("node-b"));
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, 60);
    let seen = seen_by_body(&stack).await;
    let extra: usize = accepted
        .iter()
        .map(|(body, _)| seen.get(body).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    let counted = duplicates_counted(&a).await + duplicates_counted(&b).await;
    println!(
        "extra sends {extra}, counted {counted}, flagged {}",
        books.duplicates
    );
    assert_eq!(extra, 0, "no claim outlived its lease: nothing sent twice");
}

/// POST `n` WhatsApp messages with bodies `{tag}-{i}`, 16 at a time; all must be accepted.
async fn post_whatsapp(svc: &Service, tag: &str, n: usize) -> Vec<(String, String)> {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| async move {
            let body = format!("{tag}-{i}");
            let (s, v) = svc
                .post(json!({"type": "whatsapp", "data": {"from": "+15550001111", "to": "+15557654321", "msg": body}}))
                .await;
            assert_eq!(s, 200, "{v}");
            (body, v["id"].as_str().unwrap().to_string())
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// The slow calls: the provider answers each message after 1.8 s (within a 2.5 s
/// timeout), claims go idle after 3 s and leases last 3 s, and a rate limit of 20 a second
/// makes a batch of 100 take 5 s to call. Process B comes up while A works through it and
/// takes A's idle entries over, the leases having lapsed under A's calls. WhatsApp, since
/// Meta cannot be asked whether it has a message (Twilio's list hides this for SMS): B
/// sent them again. Now A's leases are renewed through its calls and until its outcomes
/// are written (B finds them busy), and a claim whose lease B took makes no call: each
/// message reaches the provider once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_outlasting_their_lease_are_not_taken_over_by_a_second_process() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let env = |name: &'static str| {
        fast_env(&[
            ("PROVIDER_TIMEOUT_MS", "2500"),
            ("CLAIM_IDLE_MS", "3000"),
            ("STALE_AFTER_MS", "3000"),
            ("PROVIDER_RATE_PER_SEC", "20"),
            ("PROVIDER_BURST", "20"),
            ("CONSUMER_NAME", name),
        ])
    };
    let a = stack.start_service(&env("node-a"));
    set_fault(&stack, json!({"provider": "whatsapp", "latency_ms": 1800})).await;
    let tag = unique("slow");
    let accepted = post_whatsapp(&a, &tag, 100).await;
    eventually(Duration::from_secs(10), "A read every entry", || async {
        let n = stack.pending("whatsapp_stream", "comm-aggregator").await;
        (n >= 95).then_some(())
    })
    .await;
    let b = stack.start_service(&env("node-b"));
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, 100, "calls within the timeout all succeed");
    let seen = seen_by_body(&stack).await;
    let extra: usize = accepted
        .iter()
        .map(|(body, _)| seen.get(body).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    let counted = duplicates_counted(&a).await + duplicates_counted(&b).await;
    println!(
        "extra sends {extra}, counted {counted}, flagged {}",
        books.duplicates
    );
    assert_eq!(extra, 0, "no lease lapsed under a call: nothing sent twice");
}

/// Take `lease:{<id>}` as another process's sender would (the lease and its try), retrying
/// while the service still holds it.
async fn hold_lease(stack: &Stack, id: &str, token: &str) {
    let mut c = stack.redis().await;
    eventually(Duration::from_secs(10), "the lease to be free", || {
        let mut c = c.clone();
        async move {
            let ok: Option<String> = redis::cmd("SET")
                .arg(format!("lease:{{{id}}}"))
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .query_async(&mut c)
                .await
                .unwrap();
            ok.map(|_| ())
        }
    })
    .await;
    let _: i64 = redis::cmd("INCR")
        .arg(format!("tries:{{{id}}}"))
        .query_async(&mut c)
        .await
        .unwrap();
}

/// The pending entries of `sms_stream` for the service's group: (id, deliveries).
async fn sms_pending(stack: &Stack) -> Vec<(String, i64)> {
    let mut c = stack.redis().await;
    let v: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg("sms_stream")
        .arg("comm-aggregator")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    v.into_iter().map(|(id, _, _, n)| (id, n)).collect()
}

async fn dead_letters(stack: &Stack) -> usize {
    let mut c = stack.redis().await;
    let dlq: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("sms_stream:dlq")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    dlq.len()
}

async fn record(stack: &Stack, id: &str) -> Document {
    stack
        .records()
        .await
        .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
        .await
        .unwrap()
        .unwrap()
}

/// Another process holds a record's lease (its provider call may be under way) while this
/// one's entries for the record pass `MAX_DELIVERIES` (each claim finds the record busy and
/// leaves the entry pending). Dead-lettering must wait: failing the record under the other
/// process's call would record `failed` for a message being sent. Once the other process
/// lets go without a call, the record is dead-lettered or sent, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_waits_for_a_live_lease_held_by_another_process() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[]));
    // A first attempt answered 429, Retry-After 4 s: a window to take the lease in.
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "429", "retry_after": 4}),
    )
    .await;
    let body = unique("leased");
    let (s, v) = svc.post(sms(&body)).await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "the first attempt refused", || {
        let stack = &stack;
        let id = id.clone();
        async move { (record(stack, &id).await.get_i32("attempts").ok()? == 1).then_some(()) }
    })
    .await;
    hold_lease(&stack, &id, "other-process:sms:0").await;
    clear_faults(&stack).await;
    // The retry comes due and is queued again; every delivery finds the record busy.
    eventually(
        Duration::from_secs(30),
        "an entry delivered MAX_DELIVERIES (3) times",
        || async {
            sms_pending(&stack)
                .await
                .iter()
                .any(|(_, n)| *n >= 3)
                .then_some(())
        },
    )
    .await;
    // Several dead-letter passes (every CLAIM_IDLE_MS / 2) while the lease is held.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let d = record(&stack, &id).await;
    assert_eq!(
        d.get_str("status").ok(),
        Some("pending"),
        "a record under another process's lease was failed: {d}"
    );
    assert_eq!(dead_letters(&stack).await, 0);

    // The other process lets go without calling (as one that finds the record not due).
    let mut c = stack.redis().await;
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(format!("lease:{{{id}}}"))
        .ignore()
        .cmd("DECR")
        .arg(format!("tries:{{{id}}}"))
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    let accepted = vec![(body.clone(), id.clone())];
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent + books.failed, 1);
    eventually(Duration::from_secs(10), "every entry settled", || async {
        sms_pending(&stack).await.is_empty().then_some(())
    })
    .await;
    // Now free, the record is dead-lettered, or sent by a delivery still under the limit
    // (a re-queued entry): either way once.
    let d = record(&stack, &id).await;
    let sends = seen_by_body(&stack).await.get(&body).copied().unwrap_or(0);
    if books.failed == 1 {
        assert!(
            d.get_str("lastError")
                .unwrap_or("")
                .contains("dead-lettered"),
            "{d}"
        );
        assert_eq!((sends, dead_letters(&stack).await), (0, 1), "{d}");
    } else {
        assert_eq!((sends, dead_letters(&stack).await), (1, 0), "{d}");
    }
}

/// SecantusDB reports itself as a one-member replica set, as MongoDB does: every write of
/// a record (insert, claim-free outcome write, sweeps) asks for `w: "majority"` and the
/// journal, so that no acknowledged write can be rolled back by a failover, and every read
/// of records asks for what a majority holds. Seen in MongoDB's own profiler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_write_asks_the_replica_set_for_a_majority() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[]));
    let db = stack
        .mongo_client()
        .await
        .database("communication-aggregator");
    let hello = db.run_command(doc! {"hello": 1}).await.unwrap();
    assert!(hello.get_str("setName").is_ok(), "a replica set: {hello}");
    db.run_command(doc! {"profile": 2}).await.unwrap();
    let tag = unique("majority");
    let accepted = load(svc.port, &tag, 5, Duration::ZERO).await;
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, 5);
    let profiled = stack
        .profile_entries(doc! {"op": {"$in": ["insert", "update"]}})
        .await;
    let ops: Vec<&str> = profiled
        .iter()
        .filter_map(|p| p.get_str("op").ok())
        .collect();
    assert!(
        ops.contains(&"insert") && ops.contains(&"update"),
        "the inserts and outcome writes were profiled: {ops:?}"
    );
    for p in &profiled {
        let wc = p
            .get_document("command")
            .and_then(|c| c.get_document("writeConcern"))
            .unwrap_or_else(|_| panic!("a write without a write concern: {p}"));
        assert_eq!(wc.get_str("w").ok(), Some("majority"), "{p}");
        assert_eq!(wc.get_bool("j").ok(), Some(true), "{p}");
    }
    // The reads that decide something (the claim's read of the batch, `_id $in`) read
    // what a majority holds: a failover cannot roll back what they act on. (The test's own
    // reads, by one `_id`, are left out.)
    let reads = stack
        .profile_entries(doc! {"op": "query", "command.filter._id.$in": {"$exists": true}})
        .await;
    assert!(!reads.is_empty(), "the claim reads were profiled");
    for p in &reads {
        let level = p
            .get_document("command")
            .and_then(|c| c.get_document("readConcern"))
            .and_then(|rc| rc.get_str("level"));
        assert_eq!(level.ok(), Some("majority"), "a read without majority: {p}");
    }
}

/// The OutboxSweeper looks every second, so its read must be one SecantusDB serves from an
/// index, whatever the collection holds (issue 14). SecantusDB plans no index for a filter
/// with a top-level operator (`$or`, `$and`), and otherwise lets one clause ride an index
/// whose leading field it names (`secantus/storage.py`, `_try_index_id_keys`). Before,
/// the look's lanes were a top-level `$or`: every look read the whole collection (1.3 s
/// with 50,000 records, `scripts/sweep-due.py`). Seen in the profiler: the look the service
/// makes, and the indexes it built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweepers_look_is_a_range_read_secantusdb_serves_from_an_index() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[]));
    let db = stack
        .mongo_client()
        .await
        .database("communication-aggregator");
    // The service has built its indexes once it is ready.
    let tag = unique("sweep look");
    let accepted = load(svc.port, &tag, 3, Duration::ZERO).await;
    check_books(&stack, &accepted, BOOKS_WAIT).await;
    db.run_command(doc! {"profile": 2}).await.unwrap();
    let looks: Vec<Document> = eventually(BOOKS_WAIT, "a sweeper look profiled", || async {
        let filter = doc! {"op": "query", "command.filter.nextAttemptAt": {"$exists": true}};
        let found = stack.profile_entries(filter).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    for p in &looks {
        let filter = p
            .get_document("command")
            .and_then(|c| c.get_document("filter"))
            .unwrap();
        assert!(
            filter.keys().all(|k| !k.starts_with('$')),
            "a top-level operator: SecantusDB reads the whole collection: {filter}"
        );
        assert_eq!(
            filter.keys().next().map(String::as_str),
            Some("nextAttemptAt"),
            "{filter}"
        );
        let range = filter.get_document("nextAttemptAt").unwrap();
        assert!(range.contains_key("$lte"), "{filter}");
    }
    let indexes: Vec<Document> = {
        indexes(&stack.records().await)
            .await
            .into_iter()
            .map(|m| {
                let mut d = doc! {"keys": m.keys};
                if let Some(o) = m.options {
                    d.insert("sparse", o.sparse.unwrap_or(false));
                }
                d
            })
            .collect()
    };
    assert!(
        indexes.iter().any(
            |i| i.get_document("keys").ok() == Some(&doc! {"nextAttemptAt": 1})
                && i.get_bool("sparse") == Ok(true)
        ),
        "a sparse index led by nextAttemptAt alone: {indexes:?}"
    );
    assert!(
        !indexes
            .iter()
            .any(|i| i.get_document("keys").ok() == Some(&doc! {"status": 1, "nextAttemptAt": 1})),
        "the index the look never used is dropped: {indexes:?}"
    );
}

/// A service whose provider takes one message in 1,000 s (so its SMS stream stalls), with
/// 200 SMS accepted over 12 s and (most of them) waiting past their next look
/// (`SWEEP_RECHECK_MS` 1000): the service, and the oldest and newest due time of the
/// waiting records.
async fn stalled_lane(
    stack: &Stack,
) -> (Service, (mongodb::bson::DateTime, mongodb::bson::DateTime)) {
    let svc = stack.start_service(&fast_env(&[
        ("PROVIDER_RATE_PER_SEC", "0.001"),
        ("PROVIDER_BURST", "1"),
        ("SWEEP_RECHECK_MS", "1000"),
    ]));
    let accepted = load(svc.port, &unique("stalled"), 200, Duration::from_secs(1)).await;
    // A 503 (the tenant's limits not answered by Redis in time on a loaded machine)
    // stores nothing; the records accepted are the lane.
    assert!(accepted.len() >= 190, "{} accepted of 200", accepted.len());
    let coll = stack.records().await;
    let ids: Vec<ObjectId> = accepted
        .iter()
        .map(|(_, id)| ObjectId::parse_str(id).unwrap())
        .collect();
    // Past their next look, still waiting: the situation under test.
    let due = eventually(Duration::from_secs(20), "the stalled records due", || {
        let (coll, ids) = (&coll, &ids);
        async move {
            use futures::TryStreamExt;
            let waiting: Vec<Document> = coll
                .find(doc! {"_id": {"$in": ids}, "status": "pending"})
                .await
                .ok()?
                .try_collect()
                .await
                .ok()?;
            let times: Vec<_> = waiting
                .iter()
                .filter_map(|d| d.get_datetime("nextAttemptAt").ok().copied())
                .collect();
            let (first, last) = (*times.iter().min()?, *times.iter().max()?);
            (waiting.len() >= 150 && first < mongodb::bson::DateTime::now())
                .then_some((first, last))
        }
    })
    .await;
    (svc, due)
}

/// The `nextAttemptAt` range of a profiled read.
fn range_of(p: &Document) -> &Document {
    p.get_document("command")
        .and_then(|c| c.get_document("filter"))
        .and_then(|f| f.get_document("nextAttemptAt"))
        .unwrap()
}

/// How wide a profiled read's range is, in ms (`None`: open at its start).
fn width_of(p: &Document) -> Option<i64> {
    let r = range_of(p);
    let from = r.get_datetime("$gt").or(r.get_datetime("$gte")).ok()?;
    let to = r.get_datetime("$lte").or(r.get_datetime("$lt")).ok()?;
    Some(to.timestamp_millis() - from.timestamp_millis())
}

/// SecantusDB reads every record of the range a query names, whatever its limit; a slice
/// of the stalled range is at most this wide (`actors::walk::WIDEST`, and a second of
/// slack for the clock).
const WIDEST_SLICE_MS: i64 = 11_000;

/// A lane whose entries wait unread (here the provider's rate is one message in 1,000 s,
/// so the consumer reads no further) holds records that are past their next look
/// (`SWEEP_RECHECK_MS` 1000) yet must be left alone. Before, every look read them all to
/// reject them, every second: with deliveries held back at 300 requests/s the accept p99
/// reached 1,478 ms after 90 s (README "Performance"). Then the look read the range up to
/// the lane's acknowledged point plus the recheck time, which holds none of them, and the
/// rest a page at a time from a cursor to the look's time; but SecantusDB reads every
/// record of the range a query names, whatever its limit, so that was all of them still.
/// Now the rest is read one slice a look, at most 10 s wide: seen in MongoDB's profiler,
/// every look whose range reaches the stalled records (spread over 12 s) names at most
/// 10 s of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_does_not_read_a_stalled_lane_whole_at_every_look() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let (svc, (first_look, _)) = stalled_lane(&stack).await;
    stack.profile(2).await;
    // The sweeper's looks (`pending`, `sending`) whose range reaches the stalled records
    // (the SchedulerActor's, `status: "scheduled"`: the next test).
    let reaching = doc! {"op": "query",
    "command.filter.nextAttemptAt.$lte": {"$gte": first_look},
    "command.filter.status.$in": {"$exists": true}};
    let looks = eventually(Duration::from_secs(20), "three looks profiled", || async {
        let looks = stack.profile_entries(reaching.clone()).await;
        (looks.len() >= 3).then_some(looks)
    })
    .await;
    stack.profile(0).await;
    for p in &looks {
        let wide = width_of(p);
        assert!(
            wide.is_some_and(|w| w <= WIDEST_SLICE_MS),
            "a look named {wide:?} ms of the stalled range: {p}"
        );
    }
    drop(svc);
}

/// The SchedulerActor's look reads the same index for `scheduled` records, and read the
/// whole due range every second, stalled records and all. Now, after the first look after
/// a start, a look reads from the last look's time less 1 s (its window), and one slice of
/// the 15 minutes before that, at most 10 s wide. Seen in MongoDB's profiler: every window
/// starts at most 10 s before its end, windows come to start past the stalled records,
/// and every slice names at most 10 s and carries no residual clause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_does_not_read_a_stalled_lane_whole_at_every_look() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let (svc, (_, newest)) = stalled_lane(&stack).await;
    stack.profile(2).await;
    let windows = doc! {"op": "query", "command.filter.status": "scheduled"};
    let looks = eventually(
        Duration::from_secs(30),
        "two windows starting past the stalled records",
        || async {
            let looks = stack.profile_entries(windows.clone()).await;
            let past = looks
                .iter()
                .filter(|p| range_of(p).get_datetime("$gte").is_ok_and(|g| *g > newest))
                .count();
            (past >= 2).then_some(looks)
        },
    )
    .await;
    let slices = doc! {"op": "query", "command.filter.status": {"$exists": false},
    "command.filter.nextAttemptAt.$gt": {"$exists": true}};
    let slices = stack.profile_entries(slices).await;
    stack.profile(0).await;
    for p in &looks {
        let wide = width_of(p).expect("a window has a start");
        assert!(wide <= 10_000, "a window {wide} ms wide: {p}");
    }
    assert!(!slices.is_empty(), "no slice read before the windows");
    for p in &slices {
        let wide = width_of(p);
        assert!(
            wide.is_some_and(|w| w <= WIDEST_SLICE_MS),
            "a slice of {wide:?} ms: {p}"
        );
        let filter = p
            .get_document("command")
            .and_then(|c| c.get_document("filter"))
            .unwrap();
        assert_eq!(filter.keys().collect::<Vec<_>>(), ["nextAttemptAt"], "{p}");
    }
    drop(svc);
}

/// The claim is one round trip a batch (issue 14): one script call takes the leases of a
/// batch of 20 records and counts their tries, and one gives them back; confirming a lease
/// taken a moment ago costs no call, and one confirmed over a quarter of its time ago is
/// asked about again (one call for the batch), and still held.
#[tokio::test]
async fn a_batch_is_leased_and_given_back_in_one_script_call_each() {
    use comm_aggregator::clients::lease::{RedisLeases, Release};
    use comm_aggregator::clients::redis_queue::RedisQueue;
    let (mut server, url) = scratch_redis("leases");
    let queue = RedisQueue::open(&url, Duration::from_secs(5)).unwrap();
    let leases = RedisLeases::new(std::sync::Arc::new(queue));
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ids: Vec<String> = (0..20).map(|_| ObjectId::new().to_hex()).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let lease = Duration::from_secs(2);

    let before = script_calls(&mut redis).await;
    let tries = leases.lease(&refs, "batch-1", lease).await.unwrap();
    assert_eq!(tries, vec![1; 20], "each record leased, its first try");
    assert_eq!(
        script_calls(&mut redis).await - before,
        1,
        "one call for the batch"
    );
    assert_eq!(
        leases.lease(&refs, "batch-2", lease).await.unwrap(),
        vec![-1; 20],
        "held leases are not taken twice"
    );

    let claims: Vec<(&str, u32)> = refs.iter().map(|id| (*id, 1)).collect();
    let before = script_calls(&mut redis).await;
    let held = leases.renew(&claims, "batch-1", lease).await.unwrap();
    assert_eq!(held, vec![true; 20]);
    assert_eq!(
        script_calls(&mut redis).await,
        before,
        "a fresh lease is confirmed without a call"
    );

    tokio::time::sleep(lease / 3).await;
    let held = leases.renew(&claims, "batch-1", lease).await.unwrap();
    assert_eq!(held, vec![true; 20]);
    assert_eq!(
        script_calls(&mut redis).await - before,
        1,
        "older ones: one call for the batch"
    );
    assert_eq!(
        leases.renew(&claims, "batch-2", lease).await.unwrap(),
        vec![false; 20],
        "another holder's leases are not confirmed"
    );

    let before = script_calls(&mut redis).await;
    let back: Vec<(&str, Release)> = refs.iter().map(|id| (*id, Release::Final)).collect();
    leases.release(&back, "batch-1").await.unwrap();
    assert_eq!(
        script_calls(&mut redis).await - before,
        1,
        "given back in one call"
    );
    assert_eq!(
        leases.lease(&refs, "batch-3", lease).await.unwrap(),
        vec![1; 20],
        "free again, the try count gone with the final release"
    );
    server.kill();
}
