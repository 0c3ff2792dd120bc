//! Scheduled sends and cancels (issue #16), on real servers: a message with `sendAt` is
//! stored `scheduled`, reaches the provider after its time and not before, also when the
//! service is down at that time, and once when two processes watch the same store; a
//! canceled one never reaches the provider; a queued one is canceled while no sender has
//! claimed it, and refused (409) once one has; a bad `sendAt` is a 400 naming it.

mod common;

use chrono::{DateTime, Utc};
use common::{
    clear_faults, client, client_for, eventually, set_fault, shared_with, unique, Service, Stack,
    OTHER_KEY,
};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
/// The scheduler looks every 200 ms; sendAt may be at most 2 days ahead.
const SCHED: &[(&str, &str)] = &[
    ("SCHEDULE_INTERVAL_MS", "200"),
    ("SCHEDULE_HORIZON_DAYS", "2"),
    ("SWEEP_RECHECK_MS", "3000"),
];

fn in_secs(secs: i64) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(secs)
}

fn sms_at(to: &str, msg: &str, at: &str) -> Value {
    json!({"type": "sms", "data": {"from": "+15550001111", "to": to, "msg": msg}, "sendAt": at})
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn accept(svc: &Service, body: Value) -> Value {
    let (status, answer) = svc.post(body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn status_of(stack: &Stack, id: &str) -> String {
    let r = stack.record(id).await.expect("the record");
    r.get_str("status").unwrap().to_string()
}

/// The SMS messages the stand-in took with this body.
async fn at_provider(stack: &Stack, msg: &str) -> usize {
    stack
        .sandbox_messages()
        .await
        .iter()
        .filter(|m| m["body"] == msg)
        .count()
}

async fn cancel(svc: &Service, id: &str) -> (u16, Value) {
    cancel_as(&client(), svc, id).await
}

async fn cancel_as(http: &reqwest::Client, svc: &Service, id: &str) -> (u16, Value) {
    let res = http
        .delete(svc.url(&format!("/api/v1/communication/{id}")))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Until `at` has passed, the provider has nothing with `msg` (checked every 100 ms).
async fn nothing_before(stack: &Stack, msg: &str, at: DateTime<Utc>) {
    while Utc::now() < at - chrono::Duration::milliseconds(300) {
        assert_eq!(at_provider(stack, msg).await, 0, "sent before its sendAt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The record once it is sent (the stand-in's receipts may have moved it on since).
async fn sent(stack: &Stack, id: &str) -> Document {
    eventually(WAIT, "the message sent", || async {
        let r = stack.record(id).await?;
        r.get_datetime("sentAt").is_ok().then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_scheduled_ahead_is_sent_after_its_time_and_not_before() {
    let (stack, svc) = shared_with(SCHED);
    let msg = unique("scheduled in 3 s");
    let at = in_secs(3);
    let answer = accept(svc, sms_at("+15557654321", &msg, &rfc3339(at))).await;
    assert_eq!(answer["status"], "scheduled");
    assert_eq!(answer["sendAt"], rfc3339(at));
    let id = answer["id"].as_str().unwrap().to_string();
    let (_, shown) = svc.get(&format!("/api/v1/communication/{id}")).await;
    assert_eq!(shown["status"], "scheduled");
    // The record's dates are written with as many fraction digits as they need
    // (`.12Z` for 120 ms): the same instant, not the same text.
    let shown_at = DateTime::parse_from_rfc3339(shown["sendAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        shown_at,
        DateTime::parse_from_rfc3339(&rfc3339(at)).unwrap()
    );
    nothing_before(stack, &msg, at).await;
    let record = sent(stack, &id).await;
    assert_eq!(at_provider(stack, &msg).await, 1);
    let sent_at = record.get_datetime("sentAt").unwrap().to_chrono();
    assert!(sent_at >= at, "sent at {sent_at}, scheduled for {at}");
}

/// A look reads the due times since the last look less 1 s, so a record stored after
/// the looks had passed its time by more than that (an insert that slow) is before every
/// later window: here its `sendAt` (and the due time the look reads) is moved a minute back
/// once it is stored. It is found by the walk over the 15 minutes before the window (a
/// slice a look, at most 10 s wide: at a look every 200 ms, one walk takes about 20 s
/// here), and sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_after_the_looks_passed_its_time_is_still_sent_once() {
    let (stack, svc) = shared_with(SCHED);
    let msg = unique("stored late");
    let answer = accept(svc, sms_at("+15557654321", &msg, &rfc3339(in_secs(600)))).await;
    let id = answer["id"].as_str().unwrap().to_string();
    let past = mongodb::bson::DateTime::from_chrono(in_secs(-60));
    let oid = mongodb::bson::oid::ObjectId::parse_str(&id).unwrap();
    let moved = stack
        .records()
        .await
        .update_one(
            doc! {"_id": oid, "status": "scheduled"},
            doc! {"$set": {"sendAt": past, "nextAttemptAt": past}},
        )
        .await
        .unwrap();
    assert_eq!(moved.modified_count, 1);
    eventually(Duration::from_secs(90), "the message sent", || async {
        let r = stack.record(&id).await?;
        r.get_datetime("sentAt").is_ok().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(at_provider(stack, &msg).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_is_sent_once_across_a_restart() {
    let stack = Stack::start();
    let mut svc = stack.start_service(SCHED);
    let msg = unique("scheduled across a restart");
    let at = in_secs(3);
    let id = accept(&svc, sms_at("+15557654321", &msg, &rfc3339(at))).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    svc.proc.kill();
    // Down when its time comes, and a little after.
    let past = (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
    tokio::time::sleep(past).await;
    assert_eq!(at_provider(&stack, &msg).await, 0);
    assert_eq!(status_of(&stack, &id).await, "scheduled");
    let svc = stack.start_service(SCHED);
    sent(&stack, &id).await;
    // Exactly once: more looks of the scheduler, and of the sweeper, send nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(at_provider(&stack, &msg).await, 1);
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_queue_each_scheduled_message_once() {
    let stack = Stack::start();
    // Batches of 5: a full batch looks again at once, so both processes read the same due
    // records over and over while 60 come due together, and race for each.
    let small = [("schedule.batch", toml::Value::Integer(5))];
    let start = || stack.start_service_configured(SCHED, &small);
    let (one, two) = (start(), start());
    let tag = unique("two schedulers");
    let at = rfc3339(in_secs(3));
    let n = 60;
    let accepts = (0..n).map(|i| {
        let body = sms_at("+15557654321", &format!("{tag}-{i}"), &at);
        accept(if i % 2 == 0 { &one } else { &two }, body)
    });
    let ids: Vec<Value> = futures::future::join_all(accepts)
        .await
        .into_iter()
        .map(|a| a["id"].clone())
        .collect();
    for id in &ids {
        sent(&stack, id.as_str().unwrap()).await;
    }
    // Each was moved and appended by one process only (compare-and-set on the status).
    let name = "scheduled_sends_queued_total";
    let queued = one.metric_total(name).await + two.metric_total(name).await;
    assert_eq!(queued, f64::from(n));
    for i in 0..n {
        assert_eq!(at_provider(&stack, &format!("{tag}-{i}")).await, 1, "{i}");
    }
}

/// Search finds the one message with `tag` under `status`, once indexed.
async fn found_as(svc: &Service, tag: &str, status: &str, id: &str) {
    let path = format!("/api/v1/communications?q={tag}&status={status}");
    eventually(WAIT, &format!("search finds it {status}"), || async {
        let (code, v) = svc.get(&path).await;
        (code == 200 && v["total"] == 1 && v["items"][0]["id"] == id).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canceled_message_never_reaches_the_provider() {
    let (stack, svc) = shared_with(SCHED);
    let tag = unique("zc").replace('-', "x");
    let msg = format!("canceled before its time {tag}");
    let at = in_secs(4);
    let id = accept(svc, sms_at("+15557654321", &msg, &rfc3339(at))).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    found_as(svc, &tag, "scheduled", &id).await;
    // Another tenant cannot see it, let alone cancel it.
    let (status, body) = cancel_as(&client_for(OTHER_KEY), svc, &id).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = cancel(svc, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "canceled");
    assert!(body["canceledAt"].is_string());
    // Idempotent.
    let (status, again) = cancel(svc, &id).await;
    assert_eq!((status, &again["status"]), (200, &json!("canceled")));
    found_as(svc, &tag, "canceled", &id).await;
    // Past its time and a few of the scheduler's looks: never sent.
    let past = (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(2);
    tokio::time::sleep(past).await;
    assert_eq!(at_provider(stack, &msg).await, 0);
    assert_eq!(status_of(stack, &id).await, "canceled");
    // Unknown and malformed ids.
    let (status, _) = cancel(svc, "65f000000000000000000000").await;
    assert_eq!(status, 404);
    let (status, body) = cancel(svc, "nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_id"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_is_canceled_before_a_claim_and_refused_after() {
    let stack = Stack::start();
    // Long provider calls: while one hangs, the SMS sender takes no other batch.
    let svc = stack.start_service(&[("PROVIDER_TIMEOUT_MS", "15000"), ("MAX_ATTEMPTS", "5")]);
    let redis = stack.redis().await;
    set_fault(&stack, json!({"provider": "twilio", "mode": "hang"})).await;
    let first = unique("hangs at the provider");
    let first_id = accept(&svc, common::sms(&first)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(WAIT, "the first message claimed", || {
        let mut redis = redis.clone();
        let key = format!("lease:{{{first_id}}}");
        async move {
            let held: bool = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut redis)
                .await
                .unwrap();
            held.then_some(())
        }
    })
    .await;
    // Queued behind it, claimed by nobody: canceled.
    let msg = unique("queued, then canceled");
    let id = accept(&svc, common::sms(&msg)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = cancel(&svc, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "canceled");
    // While a sender holds the first one's lease, it cannot be canceled.
    let (status, body) = cancel(&svc, &first_id).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_cancelable"))
    );
    clear_faults(&stack).await;
    // The first is sent on its next try; the canceled one's entry is read after it and
    // acknowledged without a send.
    sent(&stack, &first_id).await;
    eventually(WAIT, "every sms_stream entry acknowledged", || async {
        (stack.pending("sms_stream", "comm-aggregator").await == 0).then_some(())
    })
    .await;
    assert_eq!(at_provider(&stack, &msg).await, 0);
    assert_eq!(status_of(&stack, &id).await, "canceled");
    // Once sent, 409.
    let (status, body) = cancel(&svc, &first_id).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_cancelable"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_send_at_is_400_naming_it_and_nothing_is_stored() {
    let (stack, svc) = shared_with(SCHED);
    let tag = unique("bad sendAt");
    let cases = [
        json!("tomorrow"),
        json!(1_900_000_000),
        json!("2026-13-01T00:00:00Z"),
        json!(rfc3339(in_secs(-3600))),
        // The horizon is 2 days here (SCHEDULE_HORIZON_DAYS).
        json!(rfc3339(in_secs(3 * 24 * 3600))),
    ];
    for at in cases {
        let mut body = common::sms(&tag);
        body["sendAt"] = at.clone();
        let (status, answer) = svc.post(body).await;
        assert_eq!(status, 400, "{at}: {answer}");
        assert_eq!(answer["error"]["code"], "validation_failed", "{at}");
        assert_eq!(answer["error"]["field"], "sendAt", "{at}");
    }
    let stored = stack
        .records()
        .await
        .count_documents(doc! {"msg": &tag})
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // Within the horizon: scheduled. A moment ago (clock skew): sent now.
    let ahead = accept(
        svc,
        sms_at("+15557654321", &tag, &rfc3339(in_secs(24 * 3600))),
    )
    .await;
    assert_eq!(ahead["status"], "scheduled");
    let now_msg = unique("sendAt a moment ago");
    let now = accept(svc, sms_at("+15557654321", &now_msg, &rfc3339(in_secs(-1)))).await;
    assert_eq!(now["status"], "queued");
    assert!(now.get("sendAt").is_none());
    sent(stack, now["id"].as_str().unwrap()).await;
}

/// A record as versions before 2026-11-29 stored it: the due time in `scheduledDueAt`
/// (under a sparse index of its own) and `nextAttemptAt` at the sweeper's first look, long
/// past before `sendAt`. After a start it goes out at `sendAt`, not before, once; start-up
/// has moved its due time to where a look reads it and dropped that index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_scheduled_by_an_earlier_version_is_sent_at_its_time_after_a_start() {
    let stack = Stack::start();
    let mut svc = stack.start_service(SCHED);
    let msg = unique("scheduled by an earlier version");
    let at = in_secs(6);
    let id = accept(&svc, sms_at("+15557654321", &msg, &rfc3339(at))).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    svc.proc.kill();
    let records = stack.records().await;
    let oid = mongodb::bson::oid::ObjectId::parse_str(&id).unwrap();
    let long_ago = mongodb::bson::DateTime::from_millis(Utc::now().timestamp_millis() - 60_000);
    let due = mongodb::bson::DateTime::from_millis(at.timestamp_millis());
    records
        .update_one(
            doc! {"_id": oid},
            doc! {"$set": {"nextAttemptAt": long_ago, "scheduledDueAt": due}},
        )
        .await
        .unwrap();
    let old_index = mongodb::IndexModel::builder()
        .keys(doc! {"scheduledDueAt": 1})
        .options(
            mongodb::options::IndexOptions::builder()
                .name("scheduled_due".to_string())
                .sparse(true)
                .build(),
        )
        .build();
    records.create_index(old_index).await.unwrap();
    stack.forget_migrations().await;
    let svc = stack.start_service(SCHED);
    let moved = eventually(WAIT, "the due time moved to nextAttemptAt", || async {
        let r = stack.record(&id).await?;
        r.get("scheduledDueAt").is_none().then_some(r)
    })
    .await;
    assert_eq!(moved.get_str("status").unwrap(), "scheduled", "{moved}");
    assert_eq!(
        moved.get_datetime("nextAttemptAt").unwrap(),
        &due,
        "{moved}"
    );
    let names = records.list_index_names().await.unwrap();
    assert!(!names.iter().any(|n| n == "scheduled_due"), "{names:?}");
    nothing_before(&stack, &msg, at).await;
    let record = sent(&stack, &id).await;
    let sent_at = record.get_datetime("sentAt").unwrap().to_chrono();
    assert!(sent_at >= at, "sent at {sent_at}, scheduled for {at}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(at_provider(&stack, &msg).await, 1);
    drop(svc);
}
