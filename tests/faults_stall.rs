//! Faults of a store that is slow or not ready rather than gone: a MongoDB frozen in place
//! (SIGSTOP, as a long GC pause or a disk stall looks from outside), and a service taking
//! requests before its unique idempotency index exists. In both, a `503` must mean "not
//! stored, safe to retry", and an idempotency key must never produce a second record.

mod common;

use common::*;
use mongodb::bson::doc;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const BOOKS_WAIT: Duration = Duration::from_secs(60);

/// The accept deadline the stalled-store test configures, and how much later than it an
/// answer may come (scheduling, the HTTP round trip, a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_millis(2000);
const SLACK: Duration = Duration::from_millis(1500);

async fn post_timed(svc: &Service, body: serde_json::Value) -> (u16, Duration) {
    let started = Instant::now();
    let status = common::client()
        .post(svc.url("/api/v1/communication"))
        .timeout(Duration::from_secs(30))
        .json(&body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    (status, started.elapsed())
}

/// Freeze MongoDB (SIGSTOP) under a burst of requests: each is answered 503 within the
/// deadline; once MongoDB thaws, none of them is stored as sendable or reaches the
/// provider, and a retry of each is stored and sent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_mongodb_gets_503_in_time_and_nothing_answered_503_is_ever_sent() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[("ACCEPT_DEADLINE_MS", "2000")]));
    let tag = unique("stall");
    let mut accepted = load(svc.port, &format!("{tag}-before"), 10, Duration::ZERO).await;
    assert_eq!(accepted.len(), 10, "accepted before the freeze");

    stack.signal("mongo", libc::SIGSTOP);
    let bodies: Vec<String> = (0..40).map(|i| format!("{tag}-frozen-{i}")).collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| post_timed(&svc, sms(b)))).await;
    // Keep it frozen a little longer: the writes sent meanwhile sit in its socket buffers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.signal("mongo", libc::SIGCONT);
    for (body, (status, took)) in bodies.iter().zip(&answers) {
        assert_eq!(*status, 503, "{body} while MongoDB is frozen");
        assert!(
            *took <= DEADLINE + SLACK,
            "{body} answered after {took:?}, deadline {DEADLINE:?}"
        );
    }

    // Long enough for the frozen writes to land, the sweeper to look (SWEEP_RECHECK_MS
    // 3000) and a sender to send whatever it found.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let coll = stack.records().await;
    let sendable = coll
        .count_documents(doc! {"msg": {"$in": &bodies}, "status": {"$ne": "void"}})
        .await
        .unwrap();
    assert_eq!(sendable, 0, "a request answered 503 was stored to be sent");
    let voided = coll
        .count_documents(doc! {"msg": {"$in": &bodies}, "status": "void"})
        .await
        .unwrap();
    println!("inserts that landed after their 503 and were voided: {voided}");
    let seen = stack.sandbox_messages().await;
    let leaked: Vec<&str> = seen
        .iter()
        .filter_map(|m| m["body"].as_str())
        .filter(|b| bodies.iter().any(|x| x == b))
        .collect();
    assert!(leaked.is_empty(), "answered 503 yet sent: {leaked:?}");

    // The client's retries: each stored once and sent exactly once.
    let retries = load(svc.port, &format!("{tag}-frozen"), 40, Duration::ZERO).await;
    assert_eq!(
        retries.len(),
        40,
        "every retry accepted once MongoDB is back"
    );
    accepted.extend(retries);
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent + books.failed, books.accepted);
    assert_eq!(books.sent, books.accepted);
    let seen = stack.sandbox_messages().await;
    for body in &bodies {
        let n = seen.iter().filter(|m| m["body"] == body.as_str()).count();
        assert_eq!(n, 1, "{body} reached the provider {n} times");
    }
    assert_eq!(
        books.duplicates, 0,
        "nothing crashed, so nothing is sent twice"
    );
}

/// What one request with an `Idempotency-Key` was answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    id: Option<String>,
    replayed: bool,
}

async fn post_with_key(svc: &Service, key: &str, msg: &str) -> Answer {
    let r = common::client()
        .post(svc.url("/api/v1/communication"))
        .timeout(Duration::from_secs(30))
        .header("idempotency-key", key)
        .json(&sms(msg))
        .send()
        .await;
    let Ok(r) = r else {
        return Answer {
            status: 0,
            id: None,
            replayed: false,
        };
    };
    let status = r.status().as_u16();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    Answer {
        status,
        id: v["id"].as_str().map(str::to_string),
        replayed,
    }
}

/// Concurrent requests with one `Idempotency-Key`, from the moment the port opens on a
/// fresh MongoDB: per key one record at most, one original answer carrying its id, every
/// other answer a replay of it or a 503 (nothing stored), never a second record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_holds_from_the_first_request_after_start() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service_bare(&fast_env(&[]));
    let tag = unique("idem-start");
    // Rounds of 8 concurrent requests a key, 4 keys at a time, for the first 2 seconds.
    let started = Instant::now();
    let mut answers: HashMap<String, (String, Vec<Answer>)> = HashMap::new();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let keys: Vec<String> = (0..4).map(|k| format!("{tag}-{round}-{k}")).collect();
        let svc = &svc;
        let calls = keys.iter().flat_map(|key| {
            (0..8).map(move |_| async move {
                let msg = format!("{key}-msg");
                let a = post_with_key(svc, key, &msg).await;
                (key.clone(), msg, a)
            })
        });
        for (key, msg, a) in futures::future::join_all(calls).await {
            answers.entry(key).or_insert((msg, Vec::new())).1.push(a);
        }
        round += 1;
    }

    let coll = stack.records().await;
    let mut accepted = Vec::new();
    for (key, (msg, list)) in &answers {
        let holders: Vec<String> = {
            use futures::TryStreamExt;
            coll.find(doc! {"tenant": TENANT, "idempotencyKey": key})
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .iter()
                .map(|d| d.get_object_id("_id").unwrap().to_hex())
                .collect()
        };
        assert!(
            holders.len() <= 1,
            "key {key}: {} records {list:?}",
            holders.len()
        );
        for a in list {
            assert!(
                a.status == 200 || a.status == 503,
                "key {key}: unexpected answer {a:?}"
            );
        }
        let ok: Vec<&Answer> = list.iter().filter(|a| a.status == 200).collect();
        let originals = ok.iter().filter(|a| !a.replayed).count();
        match holders.first() {
            Some(id) => {
                assert_eq!(originals, 1, "key {key}: one original answer: {list:?}");
                assert!(
                    ok.iter().all(|a| a.id.as_deref() == Some(id.as_str())),
                    "key {key}: every 200 carries the one record {id}: {list:?}"
                );
                accepted.push((msg.clone(), id.clone()));
            }
            None => assert!(
                ok.is_empty(),
                "key {key}: answered 200 but no record: {list:?}"
            ),
        }
    }
    assert!(!accepted.is_empty(), "nothing was accepted in 2 seconds");
    let (status, ready) = svc.get("/readyz").await;
    assert_eq!(
        (status, &ready["checks"]["indexes"]),
        (200, &serde_json::json!(true))
    );
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
    let seen = stack.sandbox_messages().await;
    for (msg, _) in &accepted {
        let n = seen.iter().filter(|m| m["body"] == msg.as_str()).count();
        assert_eq!(n, 1, "{msg} reached the provider {n} times");
    }
}

/// Records that already share a key (written by a version that served without the unique
/// index) make the index impossible: readiness says so and names them, requests are refused
/// with nothing stored, and once the data is fixed the index is built and requests flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_index_blocked_by_clashing_keys_is_an_error_that_names_them() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let coll = stack.records().await;
    let key = unique("clash");
    let ids: Vec<mongodb::bson::oid::ObjectId> = (0..2)
        .map(|_| mongodb::bson::oid::ObjectId::new())
        .collect();
    for id in &ids {
        coll.insert_one(doc! {"_id": id, "tenant": TENANT, "idempotencyKey": &key,
        "type": "sms", "from": "+15550001111", "to": "+15557654321", "msg": "old",
        "status": "sent", "attempts": 1})
            .await
            .unwrap();
    }
    let svc = stack.start_service(&fast_env(&[]));
    let ready = eventually(
        Duration::from_secs(20),
        "readyz naming the clash",
        || async {
            let (s, v) = svc.get("/readyz").await;
            (s == 503 && v["indexError"].is_string()).then_some(v)
        },
    )
    .await;
    let why = ready["indexError"].as_str().unwrap();
    assert_eq!(ready["checks"]["indexes"], false, "{ready}");
    for id in &ids {
        assert!(why.contains(&id.to_hex()), "{why} names {id}");
    }
    assert!(why.contains(&key), "{why} names the key");
    let refused = unique("refused");
    let (status, took) = post_timed(&svc, sms(&refused)).await;
    assert_eq!(status, 503);
    assert!(took <= DEADLINE + SLACK, "refused after {took:?}");
    let stored = coll.count_documents(doc! {"msg": &refused}).await.unwrap();
    assert_eq!(stored, 0, "refused, so nothing stored");

    // The fix the message asks for; the service notices within index_retry_max_ms (10 s).
    coll.update_one(
        doc! {"_id": ids[1]},
        doc! {"$unset": {"idempotencyKey": ""}},
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "readyz 200 once fixed", || async {
        let (s, v) = svc.get("/readyz").await;
        (s == 200 && v["checks"]["indexes"] == true).then_some(())
    })
    .await;
    let accepted = load(svc.port, &unique("after-fix"), 5, Duration::ZERO).await;
    assert_eq!(accepted.len(), 5);
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
}

/// A retry with an `Idempotency-Key` is answered from the record holding the key, found
/// through the unique index (issue 14). The key is kept as `tenantKey` (`<tenant>:<key>`)
/// under a sparse unique index, which SecantusDB serves a lookup from; before, the lookup
/// (`{idempotencyKey: {$in}}`, under a partial index led by `tenant` that SecantusDB never
/// plans with) read every record: 520-630 ms with 20,000 of them, and past the accept
/// deadline with a few hundred thousand. A key stored by an earlier version (no
/// `tenantKey`, the old index) holds after a start as well, and the old index is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_is_found_through_the_unique_index_and_earlier_keys_still_hold() {
    use mongodb::options::IndexOptions;
    use mongodb::IndexModel;
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let mut svc = stack.start_service(&fast_env(&[]));
    let key = unique("earlier-key");
    let msg = unique("keyed");
    let first = post_with_key(&svc, &key, &msg).await;
    assert_eq!(first.status, 200);
    let id = first.id.clone().unwrap();
    svc.proc.kill();
    // As an earlier version left it: no `tenantKey`, the (tenant, idempotencyKey) partial
    // index, no mark of start-up's rewrites.
    let coll = stack.records().await;
    coll.update_many(doc! {}, doc! {"$unset": {"tenantKey": ""}})
        .await
        .unwrap();
    let _ = coll.drop_index("idempotency_key").await;
    let old = IndexOptions::builder()
        .name("idempotency_per_tenant".to_string())
        .unique(true)
        .partial_filter_expression(doc! {"idempotencyKey": {"$exists": true}})
        .build();
    coll.create_index(
        IndexModel::builder()
            .keys(doc! {"tenant": 1, "idempotencyKey": 1})
            .options(old)
            .build(),
    )
    .await
    .unwrap();
    stack.forget_migrations().await;

    let svc = stack.start_service(&fast_env(&[]));
    let db = stack
        .mongo_client()
        .await
        .database("communication-aggregator");
    db.run_command(doc! {"profile": 2}).await.unwrap();
    let again = eventually(Duration::from_secs(20), "the retry answered", || async {
        let a = post_with_key(&svc, &key, &msg).await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert!(again.replayed, "answered as a replay: {again:?}");
    assert_eq!(again.id.as_deref(), Some(id.as_str()), "the original's id");
    let stored = coll.count_documents(doc! {"msg": &msg}).await.unwrap();
    assert_eq!(stored, 1, "one record for the key");

    let lookups = stack
        .profile_entries(doc! {"op": "query", "$or": [
            {"command.filter.tenantKey": {"$exists": true}},
            {"command.filter.idempotencyKey": {"$exists": true}},
        ]})
        .await;
    assert!(!lookups.is_empty(), "the key's lookup was profiled");
    for p in &lookups {
        let filter = p
            .get_document("command")
            .and_then(|c| c.get_document("filter"))
            .unwrap();
        let fields: Vec<&str> = filter.keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            ["tenantKey"],
            "a lookup by the indexed field alone: {p}"
        );
    }
    let indexes = indexes(&coll).await;
    let by_key = indexes
        .iter()
        .find(|m| m.keys == doc! {"tenantKey": 1})
        .unwrap_or_else(|| panic!("an index on tenantKey alone: {indexes:?}"));
    let o = by_key.options.as_ref().unwrap();
    assert_eq!((o.unique, o.sparse), (Some(true), Some(true)), "{by_key:?}");
    let names: Vec<String> = indexes
        .iter()
        .filter_map(|m| m.options.as_ref()?.name.clone())
        .collect();
    assert!(
        !names.iter().any(|n| n == "idempotency_per_tenant"),
        "the old index is dropped: {names:?}"
    );
}

/// Start-up rewrites the records of earlier versions with filters no index serves, so each
/// reads the whole collection (three of them, at every start, before). The first start
/// marks them done; the next reads nothing to rewrite: no update with an `$exists` filter
/// in MongoDB's profiler, and requests are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_after_the_first_rewrites_nothing() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let mut svc = stack.start_service(&fast_env(&[]));
    let accepted = load(svc.port, &unique("first start"), 3, Duration::ZERO).await;
    assert_eq!(accepted.len(), 3);
    svc.proc.kill();
    let db = stack
        .mongo_client()
        .await
        .database("communication-aggregator");
    db.run_command(doc! {"profile": 2}).await.unwrap();

    let svc = stack.start_service(&fast_env(&[]));
    eventually(Duration::from_secs(20), "ready", || async {
        let (s, _) = svc.get("/readyz").await;
        (s == 200).then_some(())
    })
    .await;
    let mut more = load(svc.port, &unique("second start"), 3, Duration::ZERO).await;
    assert_eq!(more.len(), 3, "accepted after the second start");
    let rewrites: Vec<String> = stack
        .profile_entries(doc! {"op": "update"})
        .await
        .iter()
        .flat_map(|p| {
            p.get_document("command")
                .and_then(|c| c.get_array("updates"))
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|u| Some(u.as_document()?.get_document("q").ok()?.to_string()))
        .filter(|q| q.contains("$exists"))
        .collect();
    assert!(
        rewrites.is_empty(),
        "a start after the first rewrote records: {rewrites:?}"
    );
    let mark = db
        .collection::<mongodb::bson::Document>("migrations")
        .find_one(doc! {"_id": "communications"})
        .await
        .unwrap();
    assert!(mark.is_some(), "the first start left its mark");
    more.extend(accepted);
    let books = check_books(&stack, &more, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
}
