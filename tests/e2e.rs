//! End to end, on real servers: the API accepts, the actors deliver through the provider
//! stand-in / the SMTP server, MongoDB records the outcome, both Elasticsearch indices hold
//! the message, and the consumer groups have nothing left pending.

mod common;

use common::{eventually, shared, unique};
use mongodb::bson::{doc, oid::ObjectId, Document};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

async fn record(id: &str) -> Option<Document> {
    let (stack, _) = shared();
    stack
        .records()
        .await
        .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
        .await
        .unwrap()
}

async fn wait_status(id: &str, status: &str) -> Document {
    eventually(WAIT, &format!("record {id} to be {status}"), || async {
        record(id)
            .await
            .filter(|d| d.get_str("status") == Ok(status))
    })
    .await
}

/// Both indices hold the message: `communications` with its current status, and
/// `communication-logs` with each event of `events`; the streams have nothing pending.
async fn check_indexed_and_drained(id: &str, status: &str, events: &[&str], stream: &str) {
    let (stack, _) = shared();
    let comm = eventually(WAIT, "the communications document", || async {
        stack
            .es_search("communications", json!({"term": {"communicationId": id}}))
            .await
            .into_iter()
            .find(|h| h["_source"]["status"] == status)
    })
    .await;
    assert_eq!(comm["_id"], id);
    assert_eq!(comm["_source"]["stream"], stream);
    for ev in events {
        eventually(
            WAIT,
            &format!("the communication-logs event {ev}"),
            || async {
                stack
                    .es_search(
                        "communication-logs",
                        json!({"term": {"communicationId": id}}),
                    )
                    .await
                    .into_iter()
                    .find(|h| h["_source"]["status"] == *ev)
            },
        )
        .await;
    }
    eventually(WAIT, "nothing pending in the consumer groups", || async {
        let a = stack.pending(stream, "comm-aggregator").await;
        let b = stack.pending("log_stream", "comm-aggregator").await;
        (a == 0 && b == 0).then_some(())
    })
    .await;
}

async fn accept(body: Value, stream: &str) -> String {
    let (_, svc) = shared();
    let (status, answer) = svc.post(body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "queued");
    assert_eq!(answer["stream"], stream);
    assert_eq!(answer["data"], body["data"]);
    answer["id"].as_str().expect("an id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_is_sent_through_twilio_recorded_and_indexed() {
    let (stack, _) = shared();
    let msg = unique("Your code is 424242");
    let id = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":msg}}),
        "sms_stream",
    )
    .await;
    let got = eventually(WAIT, "the SMS at the Twilio stand-in", || async {
        stack
            .sandbox_messages()
            .await
            .into_iter()
            .find(|m| m["body"] == msg.as_str())
    })
    .await;
    assert_eq!(got["provider"], "twilio");
    assert_eq!(got["to"], "+15557654321");
    assert_eq!(got["from"], "+15550001111");
    // Sent, then Twilio's signed status callback says delivered.
    let rec = wait_status(&id, "delivered").await;
    assert_eq!(
        rec.get_str("providerMessageId").unwrap(),
        got["id"].as_str().unwrap()
    );
    assert_eq!(rec.get_str("type").unwrap(), "sms");
    assert_eq!(rec.get_i32("attempts").unwrap(), 1);
    assert!(rec.get_datetime("sentAt").is_ok() && rec.get_datetime("deliveredAt").is_ok());
    check_indexed_and_drained(
        &id,
        "delivered",
        &["queued", "sent", "delivered"],
        "sms_stream",
    )
    .await;
    // The receipt's update keeps the provider that sent it in the search document.
    let docs = stack
        .es_search("communications", json!({"term": {"communicationId": id}}))
        .await;
    assert_eq!(docs[0]["_source"]["provider"], "twilio", "{docs:?}");
    let matches = stack
        .sandbox_messages()
        .await
        .into_iter()
        .filter(|m| m["body"] == msg.as_str())
        .count();
    assert_eq!(matches, 1, "sent exactly once");
}

/// An SMS to `to` saying `msg`, accepted, delivered (with its receipt), in both indices and
/// drained: its id, its MongoDB record and its `communication-logs` documents.
async fn delivered_sms(to: &str, msg: &str) -> (String, Document, Vec<Value>) {
    let (stack, _) = shared();
    let id = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":to,"msg":msg}}),
        "sms_stream",
    )
    .await;
    let rec = wait_status(&id, "delivered").await;
    check_indexed_and_drained(
        &id,
        "delivered",
        &["queued", "sent", "delivered"],
        "sms_stream",
    )
    .await;
    let logs = stack
        .es_search(
            "communication-logs",
            json!({"term": {"communicationId": id}}),
        )
        .await;
    (id, rec, logs)
}

/// A message's body and its lane are logged with the event that accepts it, not again
/// with each later one (Elasticsearch's cost of a document grows with its fields); the
/// later ones still name the record, the parties and the channel, and the timeline still
/// shows every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_is_logged_with_the_queued_event_not_again_with_each_later_one() {
    let (stack, svc) = shared();
    let msg = unique("Your code is 515151");
    let (id, _, logs) = delivered_sms("+15557654323", &msg).await;
    let doc = |status: &str| {
        logs.iter()
            .find(|h| h["_source"]["status"] == status)
            .map(|h| h["_source"].clone())
            .unwrap_or_else(|| panic!("no {status} log document: {logs:?}"))
    };
    let queued = doc("queued");
    assert_eq!(queued["msg"], msg.as_str(), "{queued}");
    assert_eq!(queued["priority"], "normal", "{queued}");
    for status in ["sent", "delivered"] {
        let d = doc(status);
        for k in ["msg", "priority"] {
            assert!(d.get(k).is_none(), "{status} log document carries {k}: {d}");
        }
        assert_eq!(d["to"], "+15557654323", "{d}");
        assert_eq!(d["from"], "+15550001111", "{d}");
        assert_eq!(d["type"], "sms", "{d}");
        assert_eq!(d["tenant"], queued["tenant"], "{d}");
        assert!(
            d["cursorSeq"].as_str().is_some_and(|t| t.len() == 20),
            "{d}"
        );
    }
    assert_eq!(doc("sent")["provider"], "twilio");
    // The record's search document keeps the whole record.
    let comm = stack
        .es_search("communications", json!({"term": {"communicationId": id}}))
        .await;
    assert_eq!(comm[0]["_source"]["msg"], msg.as_str(), "{comm:?}");
    let (code, timeline) = svc.get(&format!("/api/v1/communication/{id}/events")).await;
    assert_eq!(code, 200, "{timeline}");
    let statuses: Vec<&str> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["status"].as_str())
        .collect();
    assert_eq!(statuses, ["queued", "sent", "delivered"], "{timeline}");
}

/// Search documents say nothing twice and nothing they can leave out (a number or a date
/// costs Elasticsearch about four times a keyword): when the record was accepted
/// (`createdAt`) is in its `communications` document alone, when it last changed in that
/// document's `timestamp` (no `updatedAt` beside it), and the accepting event's attempt
/// of 0 is left out of its log document. The API still answers all three: search
/// `updatedAt` from `timestamp`, the timeline `attempt` 0 first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_documents_say_each_time_once_and_the_api_answers_what_they_leave_out() {
    let (stack, svc) = shared();
    let msg = unique("Your code is 626262");
    let (id, rec, logs) = delivered_sms("+15557654324", &msg).await;
    assert_eq!(logs.len(), 3, "{logs:?}");
    for h in &logs {
        let d = &h["_source"];
        assert!(
            d.get("createdAt").is_none(),
            "a log document carries createdAt: {d}"
        );
        assert!(d["timestamp"].is_string(), "{d}");
        match d["status"].as_str() {
            Some("queued") => assert!(d.get("attempt").is_none(), "{d}"),
            _ => assert_eq!(d["attempt"], 1, "{d}"),
        }
    }
    let (code, timeline) = svc.get(&format!("/api/v1/communication/{id}/events")).await;
    assert_eq!(code, 200, "{timeline}");
    let steps: Vec<(&str, u64)> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["status"].as_str().unwrap(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [("queued", 0), ("sent", 1), ("delivered", 1)],
        "{timeline}"
    );
    let comm = stack
        .es_search("communications", json!({"term": {"communicationId": id}}))
        .await;
    let doc = &comm[0]["_source"];
    assert!(doc.get("updatedAt").is_none(), "{doc}");
    let millis = |v: &Value| {
        let t = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .timestamp_millis()
    };
    let created = rec.get_datetime("createdAt").unwrap().timestamp_millis();
    assert_eq!(millis(&doc["createdAt"]), created, "{doc}");
    let (code, found) = svc
        .get(&format!(
            "/api/v1/communications?to=%2B15557654324&q={}",
            msg.replace(' ', "%20")
        ))
        .await;
    assert_eq!(code, 200, "{found}");
    let item = found["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not found: {found}"));
    assert_eq!(item["status"], "delivered", "{item}");
    assert_eq!(item["updatedAt"], doc["timestamp"], "{item}");
    assert_eq!(millis(&item["createdAt"]), created, "{item}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_is_sent_through_the_cloud_api_recorded_and_indexed() {
    let (stack, _) = shared();
    let msg = unique("Your order shipped");
    let id = accept(
        json!({"type":"whatsapp","data":{"from":"+15550001111","to":"+15557654322","msg":msg}}),
        "whatsapp_stream",
    )
    .await;
    let got = eventually(WAIT, "the message at the WhatsApp stand-in", || async {
        stack
            .sandbox_messages()
            .await
            .into_iter()
            .find(|m| m["body"] == msg.as_str())
    })
    .await;
    assert_eq!(got["provider"], "whatsapp");
    assert_eq!(got["to"], "+15557654322");
    // Sent, then the signed webhook says delivered, then read.
    let rec = wait_status(&id, "read").await;
    assert!(rec
        .get_str("providerMessageId")
        .unwrap()
        .starts_with("wamid."));
    check_indexed_and_drained(
        &id,
        "read",
        &["sent", "delivered", "read"],
        "whatsapp_stream",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_is_sent_over_smtp_recorded_and_indexed() {
    let (stack, _) = shared();
    let msg = unique("Welcome aboard");
    let id = accept(
        json!({"type":"email","data":{"from":"noreply@example.com","to":"ada@example.org","msg":msg,"subject":"Hello"}}),
        "email_stream",
    )
    .await;
    let mail = eventually(WAIT, "the mail at the SMTP server", || async {
        stack.mails().into_iter().find(|m| m.contains(&msg))
    })
    .await;
    assert!(mail.contains("To: ada@example.org"), "{mail}");
    assert!(mail.contains("From: noreply@example.com"), "{mail}");
    assert!(mail.contains("Subject: Hello"), "{mail}");
    wait_status(&id, "sent").await;
    check_indexed_and_drained(&id, "sent", &["queued", "sent"], "email_stream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_provider_error_ends_failed_with_the_providers_message() {
    let (stack, svc) = shared();
    // Twilio's documented magic number for an invalid 'To'.
    let id = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":"+15005550001","msg":unique("bad number")}}),
        "sms_stream",
    )
    .await;
    let rec = wait_status(&id, "failed").await;
    assert!(
        rec.get_str("lastError")
            .unwrap()
            .contains("is not a valid phone number"),
        "{rec}"
    );
    let errors = rec.get_array("errors").unwrap();
    assert_eq!(errors.len(), 1, "permanent: not retried");
    assert_eq!(
        errors[0].as_document().unwrap().get_str("code").unwrap(),
        "21211"
    );
    check_indexed_and_drained(&id, "failed", &["failed"], "sms_stream").await;

    // Meta's "message undeliverable".
    let id = accept(
        json!({"type":"whatsapp","data":{"from":"+15550001111","to":"+15005550001","msg":unique("bad wa")}}),
        "whatsapp_stream",
    )
    .await;
    let rec = wait_status(&id, "failed").await;
    assert_eq!(
        rec.get_array("errors").unwrap()[0]
            .as_document()
            .unwrap()
            .get_str("code")
            .unwrap(),
        "131026"
    );

    // The service keeps running and delivering.
    let msg = unique("still alive");
    let id = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":msg}}),
        "sms_stream",
    )
    .await;
    wait_status(&id, "delivered").await;
    let (status, _) = svc.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(stack
        .sandbox_messages()
        .await
        .iter()
        .any(|m| m["body"] == msg.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_can_receive_many_messages() {
    // The seed made `to` unique: the second message to a number failed. Not here.
    let (stack, _) = shared();
    let to = "+15557650000";
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            accept(
                json!({"type":"sms","data":{"from":"+15550001111","to":to,"msg":unique(&format!("n{i}"))}}),
                "sms_stream",
            )
            .await,
        );
    }
    for id in &ids {
        wait_status(id, "delivered").await;
    }
    let n = stack
        .records()
        .await
        .count_documents(doc! {"to": to, "status": "delivered"})
        .await
        .unwrap();
    assert!(n >= 3);
}

async fn post_raw(body: &str, content_type: &str) -> (u16, Value) {
    let (_, svc) = shared();
    let res = common::client()
        .post(svc.url("/api/v1/communication"))
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let s = res.status().as_u16();
    (s, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_answers_400_naming_the_field() {
    let (stack, _) = shared();
    let before = stack
        .records()
        .await
        .count_documents(doc! {})
        .await
        .unwrap();
    let ok = json!({"from":"+15550001111","to":"+15557654321","msg":"m"});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"data": ok}), "type"),
        (json!({"type":"fax","data": ok}), "type"),
        (json!({"type":7,"data": ok}), "type"),
        (json!({"type":"sms"}), "data"),
        (json!({"type":"sms","data":[1]}), "data"),
        (
            json!({"type":"sms","data":{"to":"+15557654321","msg":"m"}}),
            "from",
        ),
        (
            json!({"type":"sms","data":{"from":"+15550001111","msg":"m"}}),
            "to",
        ),
        (
            json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321"}}),
            "msg",
        ),
        (
            json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":""}}),
            "msg",
        ),
        (
            json!({"type":"sms","data":{"from":"+15550001111","to":"15557654321","msg":"m"}}),
            "to",
        ),
        (
            json!({"type":"whatsapp","data":{"from":"+15550001111","to":"+0123","msg":"m"}}),
            "to",
        ),
        (
            json!({"type":"email","data":{"from":"noreply@example.com","to":"not-an-address","msg":"m"}}),
            "to",
        ),
        (
            json!({"type":"email","data":{"from":"nobody","to":"a@example.com","msg":"m"}}),
            "from",
        ),
        (
            json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"x".repeat(1601)}}),
            "msg",
        ),
        (
            json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"m\u{0}"}}),
            "msg",
        ),
    ];
    for (body, field) in cases {
        let (_, svc) = shared();
        let (status, answer) = svc.post(body.clone()).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert_eq!(answer["error"]["code"], "validation_failed", "{answer}");
        assert_eq!(answer["error"]["field"], field, "{body} → {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().len() > 5);
    }
    for bad in [
        "{",
        "not json",
        "[1,2]",
        "\"text\"",
        "{\"type\":\"sms\",\"data\":",
    ] {
        let (status, answer) = post_raw(bad, "application/json").await;
        assert_eq!(status, 400, "{bad} → {answer}");
        assert_eq!(answer["error"]["code"], "invalid_json", "{bad} → {answer}");
    }
    let (status, answer) = post_raw("type=sms", "application/x-www-form-urlencoded").await;
    assert_eq!(status, 415, "{answer}");
    let big = format!(
        "{{\"type\":\"sms\",\"data\":{{\"msg\":\"{}\"}}}}",
        "x".repeat(70_000)
    );
    let (status, answer) = post_raw(&big, "application/json").await;
    assert_eq!(status, 413, "{answer}");
    let after = stack
        .records()
        .await
        .count_documents(doc! {"msg": "m"})
        .await
        .unwrap();
    assert_eq!(
        after, 0,
        "nothing invalid was stored (records before: {before})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_and_unknown_routes_answer_in_the_error_shape() {
    let (_, svc) = shared();
    let (s, v) = svc.get("/api/v1/communication/zzz").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid_id")));
    let (s, v) = svc
        .get("/api/v1/communication/0123456789abcdef01234567")
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, v) = svc.get("/nope").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, v) = svc.get("/readyz").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["checks"]["mongodb"], true);
    let text = common::get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("comm_aggregator_http_requests_total"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_report_failures_and_forged_callbacks_change_nothing() {
    let (_, svc) = shared();
    // The stand-in reports +15005550004 undelivered (Twilio 30003) / failed (Meta 131026).
    let sms = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":"+15005550004","msg":unique("unreachable")}}),
        "sms_stream",
    )
    .await;
    let rec = wait_status(&sms, "undelivered").await;
    assert!(
        rec.get_array("errors")
            .unwrap()
            .iter()
            .any(|e| e.as_document().unwrap().get_str("code") == Ok("30003")),
        "{rec}"
    );
    let wa = accept(
        json!({"type":"whatsapp","data":{"from":"+15550001111","to":"+15005550004","msg":unique("unreachable")}}),
        "whatsapp_stream",
    )
    .await;
    let rec = wait_status(&wa, "failed").await;
    assert!(
        rec.get_str("lastError").unwrap().contains("undeliverable"),
        "{rec}"
    );

    // A delivered SMS, then forged callbacks that try to change it.
    let id = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":unique("genuine")}}),
        "sms_stream",
    )
    .await;
    let rec = wait_status(&id, "delivered").await;
    let sid = rec.get_str("providerMessageId").unwrap().to_string();
    let http = common::client();
    let form = [
        ("MessageSid", sid.as_str()),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30008"),
    ];
    let owned: Vec<(String, String)> = form
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let url = svc.url("/api/v1/callbacks/twilio");
    let r = http.post(&url).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let forged = comm_aggregator::callbacks::twilio_signature("wrong-token", &url, &owned);
    let r = http
        .post(&url)
        .header("X-Twilio-Signature", forged)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body =
        json!({"entry":[{"changes":[{"value":{"statuses":[{"id": sid, "status":"failed"}]}}]}]})
            .to_string();
    let wurl = svc.url("/api/v1/callbacks/whatsapp");
    let r = http.post(&wurl).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let forged = comm_aggregator::callbacks::meta_signature("not-the-secret", body.as_bytes());
    let r = http
        .post(&wurl)
        .header("X-Hub-Signature-256", forged)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        record(&id).await.unwrap().get_str("status").unwrap(),
        "delivered",
        "nothing changed"
    );

    // Meta's webhook verification handshake.
    let ok = http
        .get(format!("{wurl}?hub.mode=subscribe&hub.verify_token=sandbox-verify-token&hub.challenge=1158201444"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    let bad = http
        .get(format!(
            "{wurl}?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_endpoint_shows_breakers_and_rate_limits() {
    let (_, svc) = shared();
    let (s, v) = svc.get("/api/v1/providers").await;
    assert_eq!(s, 200);
    let list = v["providers"].as_array().unwrap();
    let names: Vec<&str> = list
        .iter()
        .map(|p| p["provider"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["smtp", "twilio", "meta-whatsapp"]);
    for p in list {
        assert!(p["breaker"]["state"].is_string());
        assert!(p["rateLimit"]["ratePerSec"].as_f64().unwrap() > 0.0);
        assert!(p["recentErrorRate"].is_number());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_full_text_pagination_and_counts_return_what_was_sent() {
    let (_, svc) = shared();
    let tag = unique("zq").replace('-', "x");
    let to = "+15559870001";
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(accept(json!({"type":"sms","data":{"from":"+15550001111","to":to,"msg":format!("searchable {tag} alpha {i}")}}), "sms_stream").await);
    }
    for i in 0..2 {
        ids.push(accept(json!({"type":"whatsapp","data":{"from":"+15550001111","to":to,"msg":format!("searchable {tag} beta {i}")}}), "whatsapp_stream").await);
    }
    ids.push(accept(json!({"type":"sms","data":{"from":"+15550001111","to":"+15005550001","msg":format!("searchable {tag} gamma")}}), "sms_stream").await);
    let q = |extra: &str| format!("/api/v1/communications?q={tag}{extra}");
    let all = eventually(WAIT, "all 8 searchable in their final state", || async {
        let (s, v) = svc.get(&q("")).await;
        let done = s == 200
            && v["total"] == 8
            && v["counts"]["byStatus"] == json!({"delivered": 5, "read": 2, "failed": 1});
        done.then_some(v)
    })
    .await;
    assert_eq!(all["counts"]["byType"], json!({"sms": 6, "whatsapp": 2}));
    let (_, v) = svc.get(&q("&type=sms")).await;
    assert_eq!(v["total"], 6);
    let (_, v) = svc.get(&q("+alpha")).await;
    assert_eq!(v["total"], 5, "full text: every word must match");
    let (_, v) = svc.get(&q("&status=failed")).await;
    assert_eq!(v["total"], 1);
    assert_eq!(v["items"][0]["to"], "+15005550001");
    assert_eq!(v["items"][0]["id"], ids[7].as_str());
    let (_, v) = svc.get(&format!("{}&to=%2B15559870001", q(""))).await;
    assert_eq!(v["total"], 7);
    let (_, v) = svc
        .get(&format!("{}&from=%2B15550001111&type=whatsapp", q("")))
        .await;
    assert_eq!(v["total"], 2);
    // Pages: newest first, disjoint, together everything.
    let mut seen = Vec::new();
    let mut last_created = String::from("9999");
    for (page, n) in [(1, 3), (2, 3), (3, 2)] {
        let (_, v) = svc.get(&q(&format!("&size=3&page={page}"))).await;
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), n, "page {page}");
        for it in items {
            let created = it["createdAt"].as_str().unwrap().to_string();
            assert!(created <= last_created, "newest first");
            last_created = created;
            seen.push(it["id"].as_str().unwrap().to_string());
        }
    }
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    let (_, v) = svc.get(&q("&since=2999-01-01T00:00:00Z")).await;
    assert_eq!(v["total"], 0);
    let (_, v) = svc.get(&q("&until=2999-01-01T00:00:00Z")).await;
    assert_eq!(v["total"], 8);
    let (s, v) = svc.get(&q("&status=lost")).await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("status")));
    let (s, v) = svc.get(&q("&since=yesterday")).await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("since")));
    let (s, _) = svc.get(&q("&colour=red")).await;
    assert_eq!(s, 400);
}

/// The sum of the series starting with `name_and_labels` (the bare name, prefixed here).
fn metric(text: &str, name_and_labels: &str) -> f64 {
    let wanted = common::metric_name(name_and_labels);
    text.lines()
        .filter(|l| l.starts_with(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_answers_carry_a_request_id() {
    let (_, svc) = shared();
    let scrape = || async {
        common::get(svc.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    for _ in 0..2 {
        let id = accept(
            json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654323","msg":unique("metrics")}}),
            "sms_stream",
        )
        .await;
        wait_status(&id, "delivered").await;
    }
    let res = common::client()
        .get(svc.url("/healthz"))
        .header("x-request-id", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "req-abc-123");
    let res = common::get(svc.url("/healthz")).await.unwrap();
    assert_eq!(
        res.headers()["x-request-id"].len(),
        16,
        "a new id when none was sent"
    );
    let after = eventually(WAIT, "the stream gauges and indexer histograms", || async {
        let m = scrape().await;
        (m.contains("comm_aggregator_stream_length{stream=\"sms_stream\"}")
            && metric(&m, "log_indexer_batch_documents_count") > 0.0
            && metric(&m, "stream_trimmed_total{stream=\"sms_stream\"}")
                > metric(&before, "stream_trimmed_total{stream=\"sms_stream\"}"))
        .then_some(m)
    })
    .await;
    for series in [
        "communications_accepted_total{channel=\"sms\"}",
        "deliveries_total{channel=\"sms\",provider=\"twilio\",outcome=\"sent\"}",
        "http_requests_total{route=\"/api/v1/communication\",status=\"200\"}",
        "accept_to_sent_seconds_count{channel=\"sms\"}",
        "provider_call_seconds_count{provider=\"twilio\"}",
        "router_batch_records_count",
        "delivery_receipts_total{service=\"twilio-callback\",status=\"delivered\"}",
        "stream_trimmed_total{stream=\"sms_stream\"}",
    ] {
        assert!(
            metric(&after, series) > metric(&before, series),
            "{series} did not move: {} -> {}",
            metric(&before, series),
            metric(&after, series)
        );
    }
    for present in [
        "stream_pending{stream=\"log_stream\"}",
        "provider_breaker_state{provider=\"twilio\"}",
        "dead_letter_length{stream=\"sms_stream:dlq\"}",
        "http_request_duration_seconds_bucket",
    ] {
        let present = common::metric_name(present);
        assert!(after.contains(&present), "{present} missing from /metrics");
    }
}

/// A receipt moves only a record its own provider sent: a Twilio-signed status callback
/// naming another provider's message id changes nothing (and is acknowledged, so Twilio
/// does not resend it); the same receipt twice is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_touches_only_its_own_providers_records_and_applies_once() {
    let (_, svc) = shared();
    let http = common::client();
    let url = svc.url("/api/v1/callbacks/twilio");
    let twilio_callback = |sid: String, status: &'static str| {
        let form = vec![
            ("MessageSid".to_string(), sid),
            ("MessageStatus".to_string(), status.to_string()),
        ];
        let sig = comm_aggregator::callbacks::twilio_signature("sandbox-auth-token", &url, &form);
        http.post(&url)
            .header("X-Twilio-Signature", sig)
            .form(&form)
            .send()
    };

    // An email (sent over SMTP, with its Message-ID as the provider message id).
    let email = accept(
        json!({"type":"email","data":{"from":"noreply@example.com","to":"ada@example.org","msg":unique("not twilio's")}}),
        "email_stream",
    )
    .await;
    let rec = wait_status(&email, "sent").await;
    let mid = rec.get_str("providerMessageId").unwrap().to_string();
    let r = twilio_callback(mid, "delivered").await.unwrap();
    assert_eq!(r.status(), 204);
    let rec = record(&email).await.unwrap();
    assert_eq!(rec.get_str("status").unwrap(), "sent", "{rec}");
    assert!(rec.get_datetime("deliveredAt").is_err(), "{rec}");

    // A delivered SMS, and Twilio's `delivered` callback once more.
    let sms = accept(
        json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":unique("twice")}}),
        "sms_stream",
    )
    .await;
    let rec = wait_status(&sms, "delivered").await;
    let sid = rec.get_str("providerMessageId").unwrap().to_string();
    let r = twilio_callback(sid, "delivered").await.unwrap();
    assert_eq!(r.status(), 204);
    let again = record(&sms).await.unwrap();
    assert_eq!(
        again.get_datetime("deliveredAt").unwrap(),
        rec.get_datetime("deliveredAt").unwrap(),
        "the second `delivered` changed nothing"
    );
}

/// Writes osmem counted into one index (`_stats`' `indexing.index_total`).
async fn index_writes(es: &str, index: &str) -> u64 {
    let v: Value = reqwest::get(format!("{es}/_stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["indices"][index]["total"]["indexing"]["index_total"]
        .as_u64()
        .unwrap_or(0)
}

/// Issue #14 (osmem's CPU per message): a record's `communications` document is written
/// when its status stops changing, not at every event on the way. With a bulk every 200 ms
/// and Twilio's status callbacks, an SMS's `queued`, `sent` and `delivered` reach the
/// LogIndexer in different bulks, and each rewrote the record's document: 2-3 writes a
/// message. Now a `queued` or `sent` version waits up to `log_indexer.hold_ms` for the one
/// that replaces it. Every event keeps its log document, and a version nothing replaces (an
/// email's `sent`) is written once the hold is over, also when the service was killed
/// (`kill -9`) while holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_search_document_is_written_once_its_status_settles_not_at_every_event() {
    const COMMS: &str = "held-communications";
    const LOGS: &str = "held-communication-logs";
    let (stack, _) = shared();
    // A service of its own: its Redis database, MongoDB database and indices, so the
    // index's write count is its alone.
    let redis = format!("redis://127.0.0.1:{}/4", stack.redis_port);
    let env = [
        ("REDIS_URL", redis.as_str()),
        ("CONSUMER_NAME", "held-docs"),
        ("MONGODB_DATABASE", "held_docs"),
    ];
    let settings = [
        (
            "elasticsearch.communications_index",
            toml::Value::from(COMMS),
        ),
        ("elasticsearch.logs_index", LOGS.into()),
        ("log_indexer.max_wait_ms", 200.into()),
        ("log_indexer.hold_ms", 10_000.into()),
    ];
    let mut own = stack.start_service_beside(&env, &settings);
    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, v) = own.post(common::sms(&unique(&format!("held-{i}")))).await;
        assert_eq!(status, 200, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(
        Duration::from_secs(40),
        "every SMS delivered in search",
        || async {
            let docs = stack
                .es_search(COMMS, json!({"term": {"status": "delivered"}}))
                .await;
            (docs.len() == ids.len()).then_some(())
        },
    )
    .await;
    let logs = stack.es_search(LOGS, json!({"match_all": {}})).await;
    assert_eq!(
        logs.len(),
        3 * ids.len(),
        "queued, sent and delivered each logged"
    );
    let writes = index_writes(&stack.es(), COMMS).await;
    assert!(
        writes <= ids.len() as u64 + 2,
        "{writes} writes of {COMMS} for {} messages: each record's document was rewritten \
         at its events on the way",
        ids.len()
    );

    // An email's `sent` is replaced by nothing: held, then written, across a kill -9.
    let (status, v) = own
        .post(json!({"type":"email","data":{"from":"noreply@example.com","to":"ada@example.org","msg":unique("held email")}}))
        .await;
    assert_eq!(status, 200, "{v}");
    let email = v["id"].as_str().unwrap().to_string();
    let of_email = || json!({"term": {"communicationId": email.clone()}});
    // Its `sent` event is read (the log document is written at once)...
    eventually(WAIT, "the email's sent event logged", || async {
        let logs = stack.es_search(LOGS, of_email()).await;
        logs.iter()
            .any(|d| d["_source"]["status"] == "sent")
            .then_some(())
    })
    .await;
    // ...and its record's document held, when the service is killed.
    let docs = stack.es_search(COMMS, of_email()).await;
    let sent = |docs: &[Value]| docs.iter().any(|d| d["_source"]["status"] == "sent");
    assert!(!sent(&docs), "the sent document is held: {docs:?}");
    own.proc.kill();
    let _own = stack.start_service_beside(&env, &settings);
    eventually(
        Duration::from_secs(40),
        "the email's document, sent",
        || async {
            let docs = stack.es_search(COMMS, of_email()).await;
            sent(&docs).then_some(())
        },
    )
    .await;
}
