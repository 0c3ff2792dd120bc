//! Bulk sends (issue #16), on real servers: a thousand recipients with three bad ones store
//! the other 997 in a few group commits and every one of them reaches the provider once; the
//! batch counts and search by `batchId` find them; a retry with the same `Idempotency-Key`
//! answers the same batch and ids and stores nothing more; a template is rendered with each
//! recipient's variables and locale; a recipient over its cap is refused in its own place;
//! a bad envelope stores nothing; another tenant cannot read the batch; a batch's members
//! are listed in a document of its own (no index on `communications` for batches), and a
//! batch an earlier version stored is still counted.

mod common;

use common::{
    client, client_for, eventually, fast_env, one_at_a_time, shared, start_isolated, unique, Stack,
    OTHER_KEY,
};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

async fn bulk_to(url: &str, body: &Value, key: Option<&str>) -> (u16, Value, bool) {
    let mut rb = client().post(url).json(body);
    if let Some(k) = key {
        rb = rb.header("idempotency-key", k);
    }
    let res = rb.send().await.unwrap();
    let status = res.status().as_u16();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    (status, res.json().await.unwrap_or(Value::Null), replayed)
}

async fn bulk(body: &Value, key: Option<&str>) -> (u16, Value, bool) {
    let (_, svc) = shared();
    bulk_to(&svc.url("/api/v1/communications/bulk"), body, key).await
}

/// Group commits the shared service has written so far (`router_batch_records` samples).
async fn group_commits() -> u64 {
    let (_, svc) = shared();
    let text = reqwest::get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("comm_aggregator_router_batch_records_count "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

async fn records_of_batch(batch: &str) -> u64 {
    let (stack, _) = shared();
    stack
        .records()
        .await
        .count_documents(doc! {"batchId": batch})
        .await
        .unwrap()
}

/// Distinct numbers for one test: `+1555` and seven digits from `base`.
fn numbers(base: u32, n: u32) -> Vec<String> {
    (0..n).map(|i| format!("+1555{:07}", base + i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_recipients_with_three_bad_are_stored_in_a_few_writes_and_delivered_once() {
    let (stack, svc) = shared();
    let tag = unique("bulk-1000");
    let mut recipients: Vec<Value> = numbers(1_000_000, 1000)
        .into_iter()
        .map(|to| json!({"to": to}))
        .collect();
    recipients[10] = json!({"to": "not-a-number"});
    recipients[500] = json!({"to": "+0123"});
    recipients[999] = json!({"to": "+15550000000", "colour": "red"});
    let commits_before = group_commits().await;
    let body = json!({"type": "sms", "data": {"from": "+15550001111", "msg": tag}, "recipients": recipients});
    let (status, answer, _) = bulk(&body, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["accepted"].as_u64(), answer["refused"].as_u64()),
        (Some(997), Some(3))
    );
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    for (i, field) in [(10, "to"), (500, "to"), (999, "recipients")] {
        assert_eq!(results[i]["status"], 400, "{}", results[i]);
        assert_eq!(results[i]["index"], i);
        assert_eq!(results[i]["error"]["field"], field, "{}", results[i]);
    }
    let ids: HashSet<&str> = results.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), 997, "each stored recipient has an id of its own");
    let commits = group_commits().await - commits_before;
    assert!(
        (4..=8).contains(&commits),
        "997 records at 256 a group commit took {commits} inserts"
    );
    let batch = answer["batchId"].as_str().unwrap().to_string();
    assert_eq!(records_of_batch(&batch).await, 997);

    let sent = eventually(WAIT, "997 messages at the provider", || async {
        let got: Vec<Value> = stack
            .sandbox_messages()
            .await
            .into_iter()
            .filter(|m| m["body"] == tag.as_str())
            .collect();
        (got.len() >= 997).then_some(got)
    })
    .await;
    let to: HashSet<&str> = sent.iter().filter_map(|m| m["to"].as_str()).collect();
    assert_eq!((sent.len(), to.len()), (997, 997), "each recipient once");

    let path = svc.url(&format!("/api/v1/batches/{batch}"));
    eventually(WAIT, "the batch counted as sent", || async {
        let b: Value = client().get(&path).send().await.ok()?.json().await.ok()?;
        let c = &b["counts"];
        let done = c["sent"].as_u64().unwrap_or(0) + c["delivered"].as_u64().unwrap_or(0);
        (b["total"] == 997 && done == 997).then_some(())
    })
    .await;
    let search = svc.url(&format!("/api/v1/communications?batchId={batch}&size=1"));
    eventually(WAIT, "search by batchId finds the 997", || async {
        let r: Value = client().get(&search).send().await.ok()?.json().await.ok()?;
        (r["total"] == 997 && r["items"][0]["batchId"] == batch.as_str()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_answers_the_same_batch_and_stores_nothing_more() {
    let tag = unique("bulk-key");
    let key = unique("bulk-key");
    let recipients: Vec<Value> = numbers(2_000_000, 5)
        .into_iter()
        .map(|to| json!({"to": to}))
        .collect();
    let body = json!({"type": "sms", "data": {"from": "+15550001111", "msg": tag}, "recipients": recipients});
    let (s, first, replayed) = bulk(&body, Some(&key)).await;
    assert_eq!(
        (s, first["accepted"].as_u64(), replayed),
        (200, Some(5), false),
        "{first}"
    );
    let (s, again, replayed) = bulk(&body, Some(&key)).await;
    assert_eq!((s, replayed), (200, true), "{again}");
    assert_eq!(again["batchId"], first["batchId"]);
    let ids = |a: &Value| -> Vec<Value> {
        a["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].clone())
            .collect()
    };
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(
        records_of_batch(first["batchId"].as_str().unwrap()).await,
        5
    );

    let mut other = body.clone();
    other["data"]["msg"] = json!(format!("{tag}-changed"));
    let (s, changed, _) = bulk(&other, Some(&key)).await;
    assert_eq!(
        (s, changed["accepted"].as_u64()),
        (200, Some(0)),
        "{changed}"
    );
    assert_eq!(changed["results"][0]["status"], 409);
    assert_eq!(
        changed["results"][0]["error"]["code"],
        "idempotency_key_reused"
    );
    assert_eq!(
        records_of_batch(first["batchId"].as_str().unwrap()).await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_rendered_with_each_recipients_variables_and_locale() {
    let (stack, _) = shared();
    let name = unique("bulk_tpl").replace('-', "_");
    let tag = unique("bulk-tpl");
    let (_, svc) = shared();
    let created = client()
        .post(svc.url("/api/v1/templates"))
        .json(&json!({"name": name, "type": "sms", "body": format!("{tag} {{{{ code }}}} in {{{{ minutes }}}}"),
                      "locales": {"de": {"body": format!("{tag} Code {{{{ code }}}}")}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let [a, b, c]: [String; 3] = numbers(3_000_000, 3).try_into().unwrap();
    let body = json!({"type": "sms",
    "data": {"from": "+15550001111", "template": name, "variables": {"minutes": 5}},
    "recipients": [
        {"to": a, "variables": {"code": "111"}},
        {"to": b, "variables": {"code": "222"}, "locale": "de-CH"},
        {"to": c},
    ]});
    let (s, answer, _) = bulk(&body, None).await;
    assert_eq!((s, answer["accepted"].as_u64()), (200, Some(2)), "{answer}");
    assert_eq!(
        answer["results"][2]["error"]["code"],
        "template_variable_missing"
    );
    assert_eq!(answer["results"][2]["error"]["field"], "variables.code");
    let bodies = eventually(WAIT, "both rendered messages at the provider", || async {
        let got: Vec<(String, String)> = stack
            .sandbox_messages()
            .await
            .into_iter()
            .filter(|m| m["body"].as_str().is_some_and(|b| b.starts_with(&tag)))
            .map(|m| {
                (
                    m["to"].as_str().unwrap().into(),
                    m["body"].as_str().unwrap().into(),
                )
            })
            .collect();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let mut bodies = bodies;
    bodies.sort();
    assert_eq!(
        bodies,
        [
            (a, format!("{tag} 111 in 5")),
            (b, format!("{tag} Code 222"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_over_its_cap_is_refused_in_its_own_place() {
    let svc = start_isolated(7, &[("RECIPIENT_MAX", "1")]);
    let to = numbers(4_000_000, 1).remove(0);
    let body = json!({"type": "sms", "data": {"from": "+15550001111", "msg": unique("bulk-cap")},
                      "recipients": [{"to": to}, {"to": to}]});
    let (s, answer, _) = bulk_to(&svc.url("/api/v1/communications/bulk"), &body, None).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "queued");
    assert_eq!(answer["results"][1]["status"], 429);
    assert_eq!(answer["results"][1]["error"]["code"], "recipient_limit");
    assert_eq!(
        records_of_batch(answer["batchId"].as_str().unwrap()).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_envelope_stores_nothing_and_a_batch_is_its_tenants_alone() {
    let tag = unique("bulk-bad");
    let one = json!([{"to": "+15557654321"}]);
    let cases = [
        (
            json!({"type": "sms", "data": {"from": "+15550001111", "msg": tag}, "recipients": []}),
            "recipients",
        ),
        (
            json!({"type": "sms", "data": {"from": "+15550001111", "msg": tag},
                "recipients": vec![json!({"to": "+15557654321"}); 1001]}),
            "recipients",
        ),
        (
            json!({"type": "sms", "data": {"from": "+15550001111", "to": "+15557654321", "msg": tag},
                "recipients": one}),
            "to",
        ),
        (json!({"type": "sms", "recipients": one}), "data"),
        (
            json!({"type": "sms", "data": {"from": "+15550001111", "template": "no_such_template"},
                "recipients": one}),
            "template",
        ),
    ];
    for (body, field) in cases {
        let (s, answer, _) = bulk(&body, None).await;
        assert_eq!(
            (s, answer["error"]["field"].as_str()),
            (400, Some(field)),
            "{answer}"
        );
    }
    let (stack, svc) = shared();
    let stored = stack
        .records()
        .await
        .count_documents(doc! {"msg": &tag})
        .await
        .unwrap();
    assert_eq!(stored, 0, "a refused envelope stores nothing");

    let ok =
        json!({"type": "sms", "data": {"from": "+15550001111", "msg": tag}, "recipients": one});
    let (_, answer, _) = bulk(&ok, None).await;
    let batch = answer["batchId"].as_str().unwrap();
    let path = svc.url(&format!("/api/v1/batches/{batch}"));
    assert_eq!(client().get(&path).send().await.unwrap().status(), 200);
    let theirs = client_for(OTHER_KEY).get(&path).send().await.unwrap();
    assert_eq!(theirs.status(), 404, "another tenant's batch is not found");
    let bad = client()
        .get(svc.url("/api/v1/batches/not-an-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// The ids a batch's document lists, hex.
async fn listed(db: &mongodb::Database, batch: &str) -> Option<HashSet<String>> {
    let d = db
        .collection::<Document>("batches")
        .find_one(doc! {"_id": batch})
        .await
        .unwrap()?;
    Some(
        d.get_array("ids")
            .unwrap()
            .iter()
            .map(|b| b.as_object_id().unwrap().to_hex())
            .collect(),
    )
}

/// SecantusDB derives every index's keys for every document it writes, so an index on
/// `communications` for batches cost every message's three writes. A bulk send's members
/// are listed in `batches` instead (its stored recipients' ids), `communications` has no
/// index on `batchId`, and a batch stored by an earlier version (its records' `batchId`
/// under the sparse index `batch`, no document of its own) is listed at the first start of
/// this one, counted as before, and the old index goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_listed_in_a_document_of_its_own_and_an_earlier_versions_batch_still_counts() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let mut svc = stack.start_service(&fast_env(&[]));
    let body = json!({"type": "sms", "data": {"from": "+15550001111", "msg": unique("listed")},
        "recipients": [{"to": "+15557000001"}, {"to": "+15557000002"}, {"to": "bad"}]});
    let (status, answer, _) = bulk_to(&svc.url("/api/v1/communications/bulk"), &body, None).await;
    assert_eq!(status, 200, "{answer}");
    let batch = answer["batchId"].as_str().unwrap().to_string();
    let ids: HashSet<String> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 2, "{answer}");
    let db = stack
        .mongo_client()
        .await
        .database("communication-aggregator");
    assert_eq!(
        listed(&db, &batch).await.as_ref(),
        Some(&ids),
        "the stored recipients listed"
    );
    let coll = stack.records().await;
    assert!(
        !common::indexes(&coll)
            .await
            .iter()
            .any(|m| m.keys.contains_key("batchId")),
        "no index on communications for batches"
    );

    // As an earlier version left it: no batch document, the sparse index, no mark.
    svc.proc.kill();
    db.collection::<Document>("batches")
        .delete_many(doc! {})
        .await
        .unwrap();
    let sparse = mongodb::options::IndexOptions::builder()
        .name("batch".to_string())
        .sparse(true)
        .build();
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"batchId": 1})
            .options(sparse)
            .build(),
    )
    .await
    .unwrap();
    stack.forget_migrations().await;

    let svc = stack.start_service(&fast_env(&[]));
    let path = svc.url(&format!("/api/v1/batches/{batch}"));
    eventually(WAIT, "the earlier batch counted", || async {
        let b: Value = client().get(&path).send().await.ok()?.json().await.ok()?;
        (b["total"] == 2).then_some(())
    })
    .await;
    assert_eq!(
        listed(&db, &batch).await.as_ref(),
        Some(&ids),
        "listed at the start"
    );
    assert!(
        !common::indexes(&coll)
            .await
            .iter()
            .any(|m| m.keys.contains_key("batchId")),
        "the old index dropped"
    );
}
