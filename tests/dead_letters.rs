//! Dead letters against real servers: a message whose provider fails until its attempts
//! are spent is listed (for its tenant only), replayed once the provider is back, and sent
//! exactly once however often, or however concurrently, it is replayed.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

async fn record(svc: &Service, id: &str) -> Value {
    svc.get(&format!("/api/v1/communication/{id}")).await.1
}

async fn replay(http: &reqwest::Client, svc: &Service, id: &str) -> (u16, Value) {
    let r = http
        .post(svc.url(&format!("/api/v1/dead-letters/{id}/replay")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn dead_letters(http: &reqwest::Client, svc: &Service, query: &str) -> (u16, Value) {
    let r = http
        .get(svc.url(&format!("/api/v1/dead-letters{query}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// How many messages with body `msg` the provider stand-in took.
async fn sends_of(stack: &Stack, msg: &str) -> usize {
    let all = stack.sandbox_messages().await;
    all.iter().filter(|m| m["body"] == msg).count()
}

/// Wait for `id` to be `status`; the record then.
async fn until_status(svc: &Service, id: &str, status: &str) -> Value {
    eventually(WAIT, &format!("{id} {status}"), || async {
        let r = record(svc, id).await;
        (r["status"] == status).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_for_its_tenant_and_a_replay_sends_it_once() {
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[("MAX_ATTEMPTS", "2")]));
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "5xx", "status": 503}),
    )
    .await;
    let (once, twice) = (unique("dl-once"), unique("dl-race"));
    let mut ids = Vec::new();
    for msg in [&once, &twice] {
        let (status, answer) = svc.post(sms(msg)).await;
        assert_eq!(status, 200, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let r = until_status(&svc, id, "failed").await;
        assert_eq!(r["deadLetterReason"], "send_failed", "{r}");
        assert_eq!(r["attempts"], 2, "its retries were spent: {r}");
        assert!(r["deadLetterAt"].is_string(), "{r}");
    }

    // Listed, newest first, for its tenant; another tenant sees none and cannot replay.
    let (status, page) = dead_letters(&client(), &svc, "?size=10").await;
    assert_eq!(status, 200, "{page}");
    let listed: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{page}");
    assert!(ids.iter().all(|id| listed.contains(&id.as_str())), "{page}");
    // Compared as instants (a record's dates may drop trailing zero digits: .27Z).
    let at: Vec<chrono::DateTime<chrono::FixedOffset>> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| chrono::DateTime::parse_from_rfc3339(i["deadLetterAt"].as_str().unwrap()).unwrap())
        .collect();
    assert!(at[0] >= at[1], "newest first: {at:?}");
    assert_eq!(page["nextPage"], Value::Null);
    let (_, first) = dead_letters(&client(), &svc, "?size=1&page=1").await;
    let (_, second) = dead_letters(&client(), &svc, "?size=1&page=2").await;
    assert_eq!(first["nextPage"], 2, "{first}");
    let mut paged = vec![
        first["items"][0]["id"].as_str().unwrap(),
        second["items"][0]["id"].as_str().unwrap(),
    ];
    paged.sort();
    let mut both: Vec<&str> = ids.iter().map(String::as_str).collect();
    both.sort();
    assert_eq!(paged, both, "a page at a time: {first} {second}");
    assert_eq!(dead_letters(&client(), &svc, "?size=0").await.0, 400);
    let other = client_for(OTHER_KEY);
    let (status, theirs) = dead_letters(&other, &svc, "").await;
    assert_eq!(status, 200);
    assert_eq!(theirs["items"], json!([]), "another tenant's dead letters");
    assert_eq!(replay(&other, &svc, &ids[0]).await.0, 404);

    clear_faults(&stack).await;
    // One replay: pending again, then sent, once.
    let (status, answer) = replay(&client(), &svc, &ids[0]).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["status"], "pending");
    assert_eq!(answer["replays"], 1);
    assert!(answer["replayedAt"].is_string() && answer.get("deadLetterAt").is_none());
    let sent = until_status(&svc, &ids[0], "sent").await;
    assert_eq!(sent["attempts"], 3, "attempt numbers keep growing: {sent}");
    assert_eq!(sends_of(&stack, &once).await, 1);
    // Again: refused, nothing sent.
    let (status, answer) = replay(&client(), &svc, &ids[0]).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("not_replayable"))
    );
    assert_eq!(sends_of(&stack, &once).await, 1);

    // Two at once: one is taken, the other refused; sent once.
    let (first, second) = (client(), client());
    let (a, b) = tokio::join!(
        replay(&first, &svc, &ids[1]),
        replay(&second, &svc, &ids[1])
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [202, 409], "{a:?} {b:?}");
    until_status(&svc, &ids[1], "sent").await;
    assert_eq!(sends_of(&stack, &twice).await, 1);
    let (_, page) = dead_letters(&client(), &svc, "").await;
    assert_eq!(page["items"], json!([]), "no dead letter left");

    // The replay is on the message's timeline.
    eventually(WAIT, "the replay's event", || async {
        stack
            .es_search(
                "communication-logs",
                json!({"term": {"communicationId": ids[0]}}),
            )
            .await
            .into_iter()
            .find(|h| h["_source"]["service"] == "replay" && h["_source"]["status"] == "queued")
    })
    .await;
}

/// Whether `communications` has an index on `deadLetterAt`.
async fn dead_letter_index(coll: &mongodb::Collection<mongodb::bson::Document>) -> bool {
    indexes(coll)
        .await
        .iter()
        .any(|m| m.keys.contains_key("deadLetterAt"))
}

/// SecantusDB derives every index's keys for every document it writes, so an index on
/// `communications.deadLetterAt` cost every message's three writes. A dead letter is
/// entered in `dead_letters` instead (its record's id and tenant), `communications` has
/// no index on `deadLetterAt`; a dead letter of an earlier version (the record's mark under
/// the sparse index `dead_letters`, no entry) is entered at the first start of this one and
/// listed as before, the old index goes, and a replay takes the entry away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_entered_in_a_collection_of_its_own_and_an_earlier_versions_still_lists() {
    use mongodb::bson::{doc, oid::ObjectId, Document};
    let stack = Stack::start();
    let mut svc = stack.start_service(&fast_env(&[("MAX_ATTEMPTS", "1")]));
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "5xx", "status": 503}),
    )
    .await;
    let (status, answer) = svc.post(sms(&unique("dl-entry"))).await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    until_status(&svc, &id, "failed").await;
    let db = stack
        .mongo_client()
        .await
        .database("communication-aggregator");
    let entries = db.collection::<Document>("dead_letters");
    let oid = ObjectId::parse_str(&id).unwrap();
    let entry = entries
        .find_one(doc! {"_id": oid})
        .await
        .unwrap()
        .expect("the dead letter's entry");
    assert!(entry.get_str("tenant").is_ok(), "{entry}");
    let coll = stack.records().await;
    assert!(!dead_letter_index(&coll).await, "no index on deadLetterAt");

    // As an earlier version left it: no entry, the sparse index, no mark.
    svc.proc.kill();
    entries.delete_many(doc! {}).await.unwrap();
    let sparse = mongodb::options::IndexOptions::builder()
        .name("dead_letters".to_string())
        .sparse(true)
        .build();
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"deadLetterAt": -1})
            .options(sparse)
            .build(),
    )
    .await
    .unwrap();
    stack.forget_migrations().await;

    let svc = stack.start_service(&fast_env(&[("MAX_ATTEMPTS", "1")]));
    let (status, page) = dead_letters(&client(), &svc, "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["id"], id.as_str(), "listed: {page}");
    assert!(!dead_letter_index(&coll).await, "the old index dropped");

    clear_faults(&stack).await;
    let (status, answer) = replay(&client(), &svc, &id).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        entries.count_documents(doc! {"_id": oid}).await.unwrap(),
        0,
        "the replay took the entry away"
    );
    until_status(&svc, &id, "sent").await;
    let (_, page) = dead_letters(&client(), &svc, "").await;
    assert_eq!(page["items"], json!([]), "{page}");
}
