//! `log_stream` and the sweeper under faults (issue 12, items 4, 5 and 7): a LogIndexer
//! that died under a consumer name nobody uses again, an Elasticsearch outage with a small
//! Redis, and retries under a backlog that never empties. Each scenario starts its own
//! stack, runs one at a time, and ends with the books: accepted = sent + failed, every send
//! seen by the stand-in, every duplicate flagged.

mod common;

use common::*;
use mongodb::bson::{doc, oid::ObjectId};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const BOOKS_WAIT: Duration = Duration::from_secs(60);
const GROUP: &str = "comm-aggregator";

/// The rows of an `XINFO CONSUMERS` / `XINFO GROUPS` answer, field name → value.
fn info_rows(v: redis::Value) -> Vec<HashMap<String, redis::Value>> {
    let redis::Value::Array(rows) = v else {
        return Vec::new();
    };
    let key = |k: &redis::Value| redis::from_redis_value::<String>(k.clone()).ok();
    rows.into_iter()
        .map(|row| match row {
            redis::Value::Array(f) => f
                .chunks(2)
                .filter_map(|kv| Some((key(&kv[0])?, kv.get(1)?.clone())))
                .collect(),
            redis::Value::Map(m) => m
                .into_iter()
                .filter_map(|(k, v)| Some((key(&k)?, v)))
                .collect(),
            _ => HashMap::new(),
        })
        .collect()
}

fn field<T: redis::FromRedisValue>(row: &HashMap<String, redis::Value>, name: &str) -> Option<T> {
    redis::from_redis_value(row.get(name)?.clone()).ok()
}

/// The names of `log_stream`'s consumers, with their pending counts.
async fn log_consumers(stack: &Stack) -> Vec<(String, i64)> {
    let mut c = stack.redis().await;
    let v: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("log_stream")
        .arg(GROUP)
        .query_async(&mut c)
        .await
        .unwrap_or(redis::Value::Nil);
    info_rows(v)
        .iter()
        .filter_map(|r| Some((field(r, "name")?, field(r, "pending")?)))
        .collect()
}

async fn xlen(stack: &Stack, stream: &str) -> i64 {
    let mut c = stack.redis().await;
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut c)
        .await
        .unwrap_or(-1)
}

/// Wait until both indices hold every one of `ids`: the record with the status MongoDB
/// has, and its `sent` event.
async fn all_in_search(stack: &Stack, ids: &[String], within: Duration) {
    let coll = stack.records().await;
    let what = format!("all {} in both indices, with MongoDB's status", ids.len());
    eventually(within, &what, || async {
        let comms = stack
            .es_search("communications", json!({"terms": {"communicationId": ids}}))
            .await;
        let logs = stack
            .es_search(
                "communication-logs",
                json!({"bool": {"filter": [
                    {"terms": {"communicationId": ids}}, {"term": {"status": "sent"}}]}}),
            )
            .await;
        if comms.len() != ids.len() || logs.len() != ids.len() {
            return None;
        }
        for h in &comms {
            let id = h["_id"].as_str()?;
            let d = coll
                .find_one(doc! {"_id": ObjectId::parse_str(id).ok()?})
                .await
                .ok()??;
            if h["_source"]["status"].as_str() != d.get_str("status").ok() {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Item 4: with Elasticsearch down, the events of 20 messages wait in the LogIndexer's
/// pending list; the process is killed and comes back under another consumer name (as a
/// container redeploy does). The new process takes the dead consumer's entries over, every
/// event reaches search, the dead consumer is removed once it holds nothing, and
/// `log_stream` is trimmed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_indexers_events_are_taken_over_under_a_new_consumer_name() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let forget = [("FORGET_CONSUMER_MS", "3000")];
    let env = fast_env(&[("CONSUMER_NAME", "host-before-deploy"), forget[0]]);
    let svc = stack.start_service(&env);
    stack.kill("es");
    let tag = unique("takeover");
    let mut accepted = load(svc.port, &tag, 20, Duration::ZERO).await;
    assert_eq!(
        accepted.len(),
        20,
        "Elasticsearch down must not block accepting"
    );
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, 20, "Elasticsearch down must not block sending");
    // The dead-to-be indexer holds the events: read, not acknowledged.
    eventually(
        Duration::from_secs(20),
        "the old indexer holds the events",
        || async {
            let held = log_consumers(&stack).await;
            held.iter()
                .any(|(n, p)| n == "host-before-deploy" && *p >= 40)
                .then_some(())
        },
    )
    .await;
    let mut svc = svc;
    svc.proc.kill();
    stack.start_es();
    let env = fast_env(&[("CONSUMER_NAME", "host-after-deploy"), forget[0]]);
    // The kill may fall between a receipt's MongoDB write and its log event (the status
    // callbacks keep coming): that window is the Reconciler's, run often here so that search
    // agrees with MongoDB within the wait below.
    let reconcile_often = [
        ("reconciler.interval_ms", toml::Value::Integer(2000)),
        ("reconciler.settle_ms", toml::Value::Integer(1000)),
    ];
    let svc = stack.start_service_configured(&env, &reconcile_often);
    accepted.extend(load(svc.port, &format!("{tag}-after"), 5, Duration::ZERO).await);
    assert_eq!(accepted.len(), 25);
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, 25);
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    all_in_search(&stack, &ids, Duration::from_secs(45)).await;
    eventually(
        Duration::from_secs(30),
        "the dead consumer removed, the live one kept, nothing pending",
        || async {
            let c = log_consumers(&stack).await;
            let names: Vec<&str> = c.iter().map(|(n, _)| n.as_str()).collect();
            let pending: i64 = c.iter().map(|(_, p)| p).sum();
            let gone = !names.contains(&"host-before-deploy");
            (gone && names.contains(&"host-after-deploy") && pending == 0).then_some(())
        },
    )
    .await;
    assert_eq!(stack.pending("log_stream", GROUP).await, 0);
    eventually(
        Duration::from_secs(20),
        "log_stream trimmed again",
        || async {
            // The group's last delivered entry stays (XTRIM MINID keeps it).
            (xlen(&stack, "log_stream").await <= 1).then_some(())
        },
    )
    .await;
}

/// POST `n` SMS with bodies `{tag}-{i}`, one every `every`, each on its tick whatever the
/// answers before it take (so a slow machine does not thin the inflow); the accepted (body,
/// id) pairs.
async fn steady_inflow(port: u16, tag: String, n: usize, every: Duration) -> Vec<(String, String)> {
    let http = client();
    let mut tick = tokio::time::interval(every);
    let mut posts = Vec::new();
    for i in 0..n {
        tick.tick().await;
        let body = format!("{tag}-{i}");
        let req = http
            .post(format!("http://127.0.0.1:{port}/api/v1/communication"))
            .json(&sms(&body));
        posts.push(tokio::spawn(async move {
            // A 503 (here: the tenant's limits not answered by Redis in time on a
            // loaded machine) stores nothing and says to retry: as a client does.
            for _ in 0..5 {
                let r = req.try_clone()?.send().await.ok()?;
                if r.status() == 503 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                if r.status() != 200 {
                    return None;
                }
                let v: serde_json::Value = r.json().await.ok()?;
                return Some((body, v["id"].as_str()?.to_string()));
            }
            None
        }));
    }
    let mut accepted = Vec::new();
    for p in posts {
        accepted.extend(p.await.unwrap());
    }
    accepted
}

/// Item 7: SMS go out at 4 a second, read 5 at a time, while 6 a second come in: the
/// backlog never empties. A message whose first attempt failed (a 500 with `Retry-After:
/// 6`) is retried once due, behind the entries ahead of it then, while the inflow goes on;
/// before, the sweeper waited for the stream's `lag` to be 0, which never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_comes_due_under_a_backlog_that_never_empties() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[
        ("PROVIDER_RATE_PER_SEC", "4"),
        ("PROVIDER_BURST", "1"),
        ("READ_COUNT", "5"),
        ("MAX_ATTEMPTS", "5"),
    ]));
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "5xx", "status": 500, "retry_after": 6}),
    )
    .await;
    let tag = unique("backlog");
    let body = format!("{tag}-retried");
    let (s, v) = svc.post(sms(&body)).await;
    assert_eq!(s, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let oid = ObjectId::parse_str(&id).unwrap();
    let coll = stack.records().await;
    let not_before = eventually(Duration::from_secs(15), "a retry scheduled", || {
        let coll = coll.clone();
        async move {
            let d = coll.find_one(doc! {"_id": oid}).await.ok()??;
            let scheduled =
                d.get_i32("attempts").ok()? >= 1 && d.get_str("status").ok()? == "pending";
            scheduled.then(|| d.get_datetime("notBefore").ok().copied())?
        }
    })
    .await;
    clear_faults(&stack).await;
    let inflow = tokio::spawn(steady_inflow(
        svc.port,
        tag.clone(),
        120,
        Duration::from_millis(166),
    ));
    let inflow_ref = &inflow;
    let (sent_at, inflow_over) = eventually(Duration::from_secs(40), "the retry sent", || {
        let coll = coll.clone();
        async move {
            let d = coll.find_one(doc! {"_id": oid}).await.ok()??;
            // Sent, whatever receipts made of it since (`delivered` follows at once).
            let sent_at = d.get_datetime("sentAt").ok().copied()?;
            Some((sent_at, inflow_ref.is_finished()))
        }
    })
    .await;
    let late = sent_at.timestamp_millis() - not_before.timestamp_millis();
    assert!(late >= 0, "retried before its Retry-After");
    assert!(
        !inflow_over,
        "the retry went out only after the inflow stopped"
    );
    let mut accepted = inflow.await.unwrap();
    assert_eq!(accepted.len(), 120);
    let inflow_ids: Vec<ObjectId> = accepted
        .iter()
        .map(|(_, id)| ObjectId::parse_str(id).unwrap())
        .collect();
    accepted.push((body, id));
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
    // The backlog when the retry went out, from the records themselves: messages accepted
    // before it and sent after it (the stream's own counters do not tell read-but-unsent
    // entries from sent ones).
    let waiting = coll
        .count_documents(doc! {
            "_id": {"$in": &inflow_ids},
            "createdAt": {"$lt": sent_at},
            "sentAt": {"$gt": sent_at},
        })
        .await
        .unwrap();
    println!(
        "retry due at {not_before}, sent {late} ms later, {waiting} accepted earlier still unsent"
    );
    assert!(
        waiting > 0,
        "the retry must go out while the backlog lasts, not once it has drained"
    );
}

/// Run the service binary against `stack`, expecting it to stop by itself: its success and
/// what it printed.
fn start_expecting_exit(stack: &Stack) -> (bool, String) {
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comm-aggregator"));
    cmd.current_dir(root());
    for (k, v) in stack.service_env(port) {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(&format!("refused-{port}"), &stack.dir, &mut cmd);
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            return (status.success(), std::fs::read_to_string(&p.log).unwrap());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the service did not stop by itself:\n{}",
            p.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn config_set(stack: &Stack, key: &str, value: &str) {
    let mut c = stack.redis().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut c)
        .await
        .unwrap();
}

/// POST `n` emails of about 50 KB with subjects `{tag}-{i}`, 16 at a time, the i-th not
/// before `every * i`; the accepted (subject, id) pairs.
async fn big_emails(port: u16, tag: &str, n: usize, every: Duration) -> Vec<(String, String)> {
    use futures::StreamExt;
    let filler = "All work and no play makes a long email. ".repeat(1220);
    let http = client();
    let start = tokio::time::Instant::now();
    let results: Vec<Option<(String, String)>> = futures::stream::iter(0..n)
        .map(|i| {
            let (http, subject) = (http.clone(), format!("{tag}-{i}"));
            let msg = format!("{subject}\n{filler}");
            async move {
                tokio::time::sleep_until(start + every * i as u32).await;
                let res = http
                    .post(format!("http://127.0.0.1:{port}/api/v1/communication"))
                    .json(
                        &json!({"type": "email", "data": {"from": "noreply@example.com",
                        "to": "ada@example.org", "subject": subject, "msg": msg}}),
                    )
                    .send()
                    .await
                    .ok()?;
                if res.status() != 200 {
                    return None;
                }
                let v: serde_json::Value = res.json().await.ok()?;
                Some((subject, v["id"].as_str()?.to_string()))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().flatten().collect()
}

/// The books for emails: every accepted one final, every sent one at the SMTP server
/// (found by its `Message-ID`, `<{id}@comm-aggregator>`), more than once only if flagged.
async fn email_books(stack: &Stack, accepted: &[(String, String)]) -> Books {
    let coll = stack.records().await;
    let oids: Vec<ObjectId> = accepted
        .iter()
        .map(|(_, id)| ObjectId::parse_str(id).unwrap())
        .collect();
    eventually(BOOKS_WAIT, "every accepted email final", || async {
        let open = coll
            .count_documents(doc! {"_id": {"$in": &oids}, "status": "pending"})
            .await
            .ok()?;
        (open == 0).then_some(())
    })
    .await;
    let mut seen = HashMap::<String, usize>::new();
    for m in stack.mails() {
        if let Some(line) = m
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
        {
            *seen.entry(line[11..].trim().to_string()).or_default() += 1;
        }
    }
    let mut books = Books {
        accepted: accepted.len(),
        ..Default::default()
    };
    for (_, id) in accepted {
        let d = coll
            .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
            .await
            .unwrap()
            .unwrap();
        let n = seen
            .get(&format!("<{id}@comm-aggregator>"))
            .copied()
            .unwrap_or(0);
        if d.get_str("status").unwrap() == "sent" {
            books.sent += 1;
            assert!(
                n >= 1,
                "{id} is recorded sent but the SMTP server never got it"
            );
            if n > 1 {
                assert_eq!(
                    d.get_bool("possibleDuplicate").ok(),
                    Some(true),
                    "{id} sent {n} times: {d}"
                );
                books.duplicates += 1;
            }
        } else {
            books.failed += 1;
        }
    }
    println!("books: {books:?}");
    books
}

/// Item 5: Redis is refused at start-up with an evicting `maxmemory-policy`; with
/// `noeviction` and 64 MB, Elasticsearch down, 50 KB emails for 40 s: sending goes on
/// (events carry no 50 KB body, and `log_stream`, bounded at 300 here, refuses the rest,
/// counted); once Elasticsearch is back, search has every message, the overflowed ones
/// indexed from MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elasticsearch_outage_with_a_small_redis_never_stops_sending() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    config_set(&stack, "maxmemory-policy", "volatile-lru").await;
    let (ok, out) = start_expecting_exit(&stack);
    assert!(!ok, "an evicting Redis must stop start-up: {out}");
    assert!(
        out.contains("maxmemory-policy is volatile-lru") && out.contains("noeviction"),
        "the message names the policy and the fix: {out}"
    );
    config_set(&stack, "maxmemory-policy", "noeviction").await;
    config_set(&stack, "maxmemory", "64mb").await;
    let svc = stack.start_service(&fast_env(&[("LOG_STREAM_MAX_LEN", "300")]));
    stack.kill("es");
    let tag = unique("bigmail");
    let accepted = big_emails(svc.port, &tag, 960, Duration::from_millis(42)).await;
    assert_eq!(accepted.len(), 960, "a full Redis must not stop accepting");
    let books = email_books(&stack, &accepted).await;
    assert_eq!(
        books.sent, books.accepted,
        "Elasticsearch down must not stop sending"
    );
    assert!(
        xlen(&stack, "log_stream").await <= 300,
        "log_stream stays bounded"
    );
    let metrics = client()
        .get(svc.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let overflowed: f64 = metrics
        .lines()
        .find(|l| l.starts_with("comm_aggregator_log_events_overflowed_total"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0);
    assert!(overflowed > 0.0, "the bound was reached and counted");
    stack.start_es();
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    for chunk in ids.chunks(240) {
        all_in_search(&stack, chunk, Duration::from_secs(60)).await;
    }
}

/// A batch of log events costs one script call however many events it holds (issue 14):
/// a router batch appends 7 events and a stream entry at once to a `log_stream` bounded at
/// 5 entries; the first 5 events are added in order, the 2 over the bound are not but
/// their communications are marked to be indexed from MongoDB, the stream entry is added,
/// and Redis ran one script for all of it.
#[tokio::test]
async fn a_batch_of_log_events_is_appended_in_one_script_call() {
    use actors::ports::Queue;
    use comm_aggregator::clients::redis_queue::RedisQueue;
    let (mut server, url) = scratch_redis("append");
    let queue = RedisQueue::open(&url, Duration::from_secs(5))
        .unwrap()
        .with_stream_bound("log_stream", 5);
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ids: Vec<String> = (0..7).map(|_| ObjectId::new().to_hex()).collect();
    let event = |id: &str| {
        let fields = vec![
            ("communicationId", id.to_string()),
            ("status", "queued".into()),
        ];
        ("log_stream", fields)
    };
    let mut entries: Vec<(&str, Vec<(&str, String)>)> = ids[..3].iter().map(|i| event(i)).collect();
    entries.push(("sms_stream", vec![("_id", ids[0].clone())]));
    entries.extend(ids[3..].iter().map(|i| event(i)));

    let before = script_calls(&mut redis).await;
    let added = queue.append(&entries).await.unwrap();
    assert_eq!(
        script_calls(&mut redis).await - before,
        1,
        "one script call"
    );
    let empty: Vec<bool> = added.iter().map(String::is_empty).collect();
    assert_eq!(
        empty,
        [false, false, false, false, false, false, true, true]
    );
    let log: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("log_stream")
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    let order: Vec<&str> = log
        .iter()
        .map(|(_, f)| f["communicationId"].as_str())
        .collect();
    assert_eq!(
        order,
        ids[..5].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let sms: u64 = redis::cmd("XLEN")
        .arg("sms_stream")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(sms, 1);
    let mut marked: Vec<String> = redis::cmd("SMEMBERS")
        .arg("{log_stream}:reindex")
        .query_async(&mut redis)
        .await
        .unwrap();
    marked.sort();
    let mut over = ids[5..].to_vec();
    over.sort();
    assert_eq!(
        marked, over,
        "the events over the bound are marked for reindexing"
    );
    server.kill();
}
