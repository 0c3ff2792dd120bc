//! Channel fallback (issue #15), on real servers: a WhatsApp message that is never
//! delivered is followed by its SMS once its time is up, exactly once, also when the
//! service is killed in between; one that fails for good (a receipt, or a refusal at the
//! send) is followed at once, and the look reads only the fallbacks due; one that is
//! read needs none; a fallback that could not be sent is refused with 400 and nothing is
//! stored. The fallback and its first message are linked both ways. An unsettled fallback
//! written by an earlier version (no `fallbackDueAt`) is seen to after the next start-up,
//! and one whose record that version failed before its time is sent right after it.

mod common;

use common::{eventually, shared_with, unique, Service, Stack};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const FAST: &[(&str, &str)] = &[("FALLBACK_INTERVAL_MS", "200")];

async fn by_id(stack: &Stack, id: &str) -> Document {
    stack.record(id).await.expect("the record")
}

async fn accept(svc: &Service, body: Value) -> String {
    let (status, answer) = svc.post(body).await;
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().expect("an id").to_string()
}

fn whatsapp(to: &str, msg: &str, after: u32) -> Value {
    json!({"type": "whatsapp", "data": {"from": "+15550001111", "to": to, "msg": msg},
           "fallback": {"type": "sms", "afterSeconds": after}})
}

/// The SMS messages the stand-in took with this body.
async fn sms_with(stack: &Stack, msg: &str) -> Vec<Value> {
    stack
        .sandbox_messages()
        .await
        .into_iter()
        .filter(|m| m["provider"] == "twilio" && m["body"] == msg)
        .collect()
}

/// The fallback of `id`, once it is linked both ways.
async fn linked_fallback(stack: &Stack, id: &str) -> Document {
    let first = eventually(WAIT, "the fallback linked to its message", || async {
        let r = by_id(stack, id).await;
        r.get_str("fallbackId").is_ok().then_some(r)
    })
    .await;
    let fid = first.get_str("fallbackId").unwrap();
    let fallback = by_id(stack, fid).await;
    assert_eq!(fallback.get_str("fallbackOf").unwrap(), id);
    assert_eq!(fallback.get_str("type").unwrap(), "sms");
    assert_eq!(
        fallback.get_str("to").unwrap(),
        first.get_str("to").unwrap()
    );
    assert_eq!(
        fallback.get_str("msg").unwrap(),
        first.get_str("msg").unwrap()
    );
    fallback
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_delivered_falls_back_once_across_a_restart() {
    let stack = Stack::start();
    let mut svc = stack.start_service(FAST);
    let msg = unique("Your code is 5555");
    // +15005550007: the stand-in reports it sent, never delivered.
    let id = accept(&svc, whatsapp("+15005550007", &msg, 4)).await;
    eventually(WAIT, "the WhatsApp message sent", || async {
        (by_id(&stack, &id).await.get_str("status") == Ok("sent")).then_some(())
    })
    .await;
    assert!(
        sms_with(&stack, &msg).await.is_empty(),
        "not before its time"
    );
    svc.proc.kill();
    let svc = stack.start_service(FAST);
    let fallback = linked_fallback(&stack, &id).await;
    let got = eventually(WAIT, "the SMS at the stand-in", || async {
        let got = sms_with(&stack, &msg).await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got[0]["to"], "+15005550007");
    let fid = fallback.get_object_id("_id").unwrap().to_hex();
    let sent_as = eventually(WAIT, "the fallback sent", || async {
        let r = by_id(&stack, &fid).await;
        r.get_str("providerMessageId").ok().map(str::to_string)
    })
    .await;
    assert_eq!(got[0]["id"].as_str(), Some(sent_as.as_str()));
    // Exactly once: a few more looks of the FallbackActor make nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sms_with(&stack, &msg).await.len(), 1, "one SMS");
    let n = stack
        .records()
        .await
        .count_documents(doc! {"fallbackOf": &id})
        .await
        .unwrap();
    assert_eq!(n, 1, "one fallback record");
    drop(svc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_falls_back_at_once_and_a_read_one_needs_none() {
    let (stack, svc) = shared_with(FAST);
    // +15005550004: the stand-in reports the WhatsApp message failed (131026).
    let failed_msg = unique("failed, so SMS");
    let failed = accept(svc, whatsapp("+15005550004", &failed_msg, 3600)).await;
    linked_fallback(stack, &failed).await;
    assert_eq!(sms_with(stack, &failed_msg).await.len(), 1);

    let read_msg = unique("read, no SMS");
    let read = accept(svc, whatsapp("+15557654329", &read_msg, 2)).await;
    let settled = eventually(WAIT, "the fallback settled", || async {
        let r = by_id(stack, &read).await;
        r.get_datetime("fallbackSettledAt").is_ok().then_some(r)
    })
    .await;
    assert_eq!(settled.get_str("status").unwrap(), "read");
    assert!(settled.get_str("fallbackId").is_err(), "{settled}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sms_with(stack, &read_msg).await.is_empty());
}

/// A message its provider refuses for good at the send (+15005550001: Meta's error) is
/// `failed` by the sender's write, which makes its fallback due at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_at_send_falls_back_at_once() {
    let (stack, svc) = shared_with(FAST);
    let msg = unique("refused, so SMS");
    let id = accept(svc, whatsapp("+15005550001", &msg, 3600)).await;
    linked_fallback(stack, &id).await;
    assert_eq!(by_id(stack, &id).await.get_str("status").unwrap(), "failed");
}

/// The FallbackActor's look reads the fallbacks due by now, not every unsettled one: it
/// read all of them (up to the year 9999), each look, to find the records that had failed
/// before their time; with a fallback on every message, that was every message of the last
/// `afterSeconds`. Seen in MongoDB's profiler: with a fallback an hour away unsettled,
/// every look's range ends by the time of the look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_look_reads_the_due_fallbacks_not_every_unsettled_one() {
    let (stack, svc) = shared_with(FAST);
    accept(svc, whatsapp("+15557654321", &unique("an hour away"), 3600)).await;
    stack.profile(2).await;
    let looks_filter = doc! {"op": "query", "command.filter.fallbackDueAt": {"$exists": true}};
    let looks = eventually(WAIT, "two fallback looks profiled", || async {
        let looks = stack.profile_entries(looks_filter.clone()).await;
        (looks.len() >= 2).then_some(looks)
    })
    .await;
    stack.profile(0).await;
    for p in &looks {
        let ts = p.get_datetime("ts").unwrap().timestamp_millis();
        let upto = p
            .get_document("command")
            .and_then(|c| c.get_document("filter"))
            .and_then(|f| f.get_document("fallbackDueAt"))
            .and_then(|r| r.get_datetime("$lte"))
            .unwrap()
            .timestamp_millis();
        assert!(upto <= ts + 1_000, "a look read fallbacks not due: {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_that_cannot_be_sent_is_refused_and_nothing_is_stored() {
    let (stack, svc) = shared_with(FAST);
    let msg = unique("refused fallback");
    let cases = [
        (json!({"type": "sms", "afterSeconds": 5}), "fallback.type"),
        (
            json!({"type": "email", "afterSeconds": 5}),
            "fallback.data.from",
        ),
        (
            json!({"type": "email", "afterSeconds": 5, "data": {"from": "a@example.com"}}),
            "fallback.data.to",
        ),
        (
            json!({"type": "email", "afterSeconds": 5, "data": {"from": "a@example.com", "to": "x"}}),
            "fallback.data.to",
        ),
        (
            json!({"type": "whatsapp", "afterSeconds": 9999999}),
            "fallback.afterSeconds",
        ),
        (
            json!({"type": "whatsapp", "afterSeconds": 5, "data": {"from": "+15559999999"}}),
            "sender_not_allowed",
        ),
    ];
    for (fallback, named) in cases {
        let body = json!({"type": "sms", "data": {"from": "+15550001111", "to": "+15557654321", "msg": msg},
                          "fallback": fallback});
        let (status, answer) = svc.post(body).await;
        let said = format!("{}{}", answer["error"]["field"], answer["error"]["code"]);
        assert!(
            status == 400 || status == 403,
            "{fallback}: {status} {answer}"
        );
        assert!(said.contains(named), "{fallback}: {answer}");
    }
    let stored = stack
        .records()
        .await
        .find_one(doc! {"msg": &msg})
        .await
        .unwrap();
    assert!(stored.is_none(), "nothing stored");
}

/// A record of an earlier version (a fallback with `fallbackAt` and no `fallbackDueAt`) is
/// given the due field at the next start-up, so its fallback is still seen to: settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_fallback_of_an_earlier_version_is_seen_to_after_a_start() {
    let (stack, svc) = shared_with(FAST);
    let id = accept(
        svc,
        whatsapp("+15557654328", &unique("earlier version"), 3600),
    )
    .await;
    // As an earlier version wrote it: no due field, and its time already passed.
    let oid = mongodb::bson::oid::ObjectId::parse_str(&id).unwrap();
    let past = mongodb::bson::DateTime::from_millis(
        mongodb::bson::DateTime::now().timestamp_millis() - 1000,
    );
    stack
        .records()
        .await
        .update_one(
            doc! {"_id": oid},
            doc! {"$unset": {"fallbackDueAt": ""}, "$set": {"fallbackAt": past}},
        )
        .await
        .unwrap();
    stack.forget_migrations().await;
    let again = stack.start_service(FAST);
    let settled = eventually(WAIT, "the earlier version's fallback settled", || async {
        let r = by_id(stack, &id).await;
        r.get_datetime("fallbackSettledAt").is_ok().then_some(r)
    })
    .await;
    assert!(settled.get("fallbackDueAt").is_none(), "{settled}");
    drop(again);
}

/// A record an earlier version failed before its fallback's time (that version left
/// `fallbackDueAt` at the record's creation plus `afterSeconds`) is followed by its
/// fallback right after the next start-up, not an hour later: the start-up makes the
/// fallbacks of failed records due now (`fallbacks::failed_due_now`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_an_earlier_version_failed_falls_back_after_the_next_start() {
    let stack = Stack::start();
    let svc = stack.start_service(FAST);
    let msg = unique("failed by an earlier version");
    // +15005550007: sent, never delivered, so no receipt changes it afterwards.
    let id = accept(&svc, whatsapp("+15005550007", &msg, 3600)).await;
    eventually(WAIT, "the WhatsApp message sent", || async {
        (by_id(&stack, &id).await.get_str("status") == Ok("sent")).then_some(())
    })
    .await;
    drop(svc);
    // As an earlier version left a failure: `failed`, the due time still an hour ahead.
    let oid = mongodb::bson::oid::ObjectId::parse_str(&id).unwrap();
    let set = stack
        .records()
        .await
        .update_one(doc! {"_id": oid}, doc! {"$set": {"status": "failed"}})
        .await
        .unwrap();
    assert_eq!(set.modified_count, 1);
    let due = by_id(&stack, &id).await;
    let ahead = due
        .get_datetime("fallbackDueAt")
        .unwrap()
        .timestamp_millis()
        - mongodb::bson::DateTime::now().timestamp_millis();
    assert!(ahead > 3_000_000, "due in an hour: {due}");
    stack.forget_migrations().await;
    let _again = stack.start_service(FAST);
    linked_fallback(&stack, &id).await;
    let got = eventually(WAIT, "the SMS at the stand-in", || async {
        let got = sms_with(&stack, &msg).await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got.len(), 1, "one SMS");
}
