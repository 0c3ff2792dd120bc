//! The other providers of each channel (issue #15, first part), on real servers: with
//! `SMS_PROVIDERS=vonage`, `EMAIL_PROVIDERS=sendgrid` and `WHATSAPP_PROVIDERS=twilio`,
//! messages go out through the stand-in's Vonage SMS API, SendGrid Mail Send and Twilio's
//! WhatsApp sender in their documented formats, once each; the providers' signed receipts
//! (Vonage delivery receipts, SendGrid's event webhook, Twilio's status callbacks for
//! WhatsApp) move the records on; forged receipts change nothing; a throttled Vonage is
//! tried again.

mod common;

use common::{eventually, shared_with, unique, Service, Stack};
use mongodb::bson::Document;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

const ROUTED: &[(&str, &str)] = &[
    ("SMS_PROVIDERS", "vonage"),
    ("EMAIL_PROVIDERS", "sendgrid"),
    ("WHATSAPP_PROVIDERS", "twilio"),
    ("BACKOFF_BASE_MS", "200"),
];

fn routed() -> &'static (Stack, Service) {
    shared_with(ROUTED)
}

async fn accept(body: Value) -> String {
    let (_, svc) = routed();
    let (status, answer) = svc.post(body).await;
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().expect("an id").to_string()
}

async fn record(id: &str) -> Document {
    routed().0.record(id).await.expect("the record")
}

async fn wait_status(id: &str, status: &str) -> Document {
    eventually(WAIT, &format!("record {id} to be {status}"), || async {
        let r = record(id).await;
        (r.get_str("status") == Ok(status)).then_some(r)
    })
    .await
}

/// What the stand-in took with this body, once it has.
async fn taken(body: &str) -> Vec<Value> {
    let (stack, _) = routed();
    eventually(WAIT, "the message at the stand-in", || async {
        let got: Vec<Value> = stack
            .sandbox_messages()
            .await
            .into_iter()
            .filter(|m| m["body"] == body)
            .collect();
        (!got.is_empty()).then_some(got)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_goes_through_vonage_and_its_signed_receipts_apply() {
    let msg = unique("Your Vonage code is 1234");
    let id =
        accept(json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":msg}}))
            .await;
    let got = taken(&msg).await;
    assert_eq!(got.len(), 1, "sent once: {got:?}");
    assert_eq!(got[0]["provider"], "vonage");
    assert_eq!(
        got[0]["to"], "15557654321",
        "international format without +"
    );
    assert_eq!(got[0]["clientRef"], id.as_str());
    let rec = wait_status(&id, "delivered").await;
    assert_eq!(rec.get_str("provider").unwrap(), "vonage");
    assert_eq!(
        rec.get_str("providerMessageId").unwrap(),
        got[0]["id"].as_str().unwrap()
    );
    // The stand-in reports +15005550004 failed with err-code 1.
    let failed = accept(json!({"type":"sms","data":{"from":"+15550001111","to":"+15005550004","msg":unique("unreachable")}})).await;
    let rec = wait_status(&failed, "undelivered").await;
    assert!(
        rec.get_array("errors")
            .unwrap()
            .iter()
            .any(|e| e.as_document().unwrap().get_str("code") == Ok("1")),
        "{rec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_through_sendgrid_and_its_signed_events_apply() {
    let msg = unique("Your SendGrid receipt");
    let id = accept(json!({"type":"email","data":{"from":"a@example.com","to":"b@example.com","subject":"Receipt","msg":msg}})).await;
    let got = taken(&msg).await;
    assert_eq!(got.len(), 1, "sent once: {got:?}");
    assert_eq!(got[0]["provider"], "sendgrid");
    assert_eq!(got[0]["subject"], "Receipt");
    assert_eq!(got[0]["customArgs"]["communicationId"], id.as_str());
    let rec = wait_status(&id, "delivered").await;
    assert_eq!(rec.get_str("provider").unwrap(), "sendgrid");
    assert_eq!(
        rec.get_str("providerMessageId").unwrap(),
        got[0]["id"].as_str().unwrap()
    );
    let bounced = accept(json!({"type":"email","data":{"from":"a@example.com","to":"bounce@example.com","msg":unique("bounce")}})).await;
    let rec = wait_status(&bounced, "undelivered").await;
    assert!(
        rec.get_str("lastError").unwrap().contains("bounce"),
        "{rec}"
    );
}

/// An email template's HTML body goes to SendGrid as the `text/html` content after the
/// `text/plain` one, every value escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_template_goes_to_sendgrid_as_text_and_html() {
    let (_, svc) = routed();
    let name = unique("html_sg").replace('-', "_");
    let created = common::client()
        .post(svc.url("/api/v1/templates"))
        .json(
            &json!({"name": name, "type": "email", "subject": "Hi", "body": "Hi {{ who }}",
                      "html": "<p>Hi {{ who }}</p>"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let who = format!("<b>{}</b>", unique("sg"));
    accept(
        json!({"type": "email", "data": {"from": "a@example.com", "to": "b@example.com",
        "template": name, "variables": {"who": who}}}),
    )
    .await;
    let got = taken(&format!("Hi {who}")).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let escaped = who
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('/', "&#x2f;");
    assert_eq!(got[0]["html"], format!("<p>Hi {escaped}</p>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_goes_through_twilio_with_whatsapp_addresses() {
    let msg = unique("Your order shipped (Twilio WhatsApp)");
    let id = accept(
        json!({"type":"whatsapp","data":{"from":"+15550001111","to":"+15557654322","msg":msg}}),
    )
    .await;
    let got = taken(&msg).await;
    assert_eq!(got.len(), 1, "sent once: {got:?}");
    assert_eq!(got[0]["provider"], "twilio");
    assert_eq!(got[0]["to"], "whatsapp:+15557654322");
    assert_eq!(got[0]["from"], "whatsapp:+15550001111");
    let rec = wait_status(&id, "delivered").await;
    assert_eq!(rec.get_str("provider").unwrap(), "twilio-whatsapp");
    assert!(rec.get_str("providerMessageId").unwrap().starts_with("SM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_vonage_and_sendgrid_receipts_change_nothing() {
    let (_, svc) = routed();
    let msg = unique("genuine");
    let id =
        accept(json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":msg}}))
            .await;
    let rec = wait_status(&id, "delivered").await;
    let mid = rec.get_str("providerMessageId").unwrap().to_string();
    let http = common::client();
    let mut receipt: BTreeMap<String, String> = [
        ("messageId", mid.as_str()),
        ("status", "failed"),
        ("err-code", "99"),
        ("timestamp", "1764322800"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let vurl = svc.url("/api/v1/callbacks/vonage");
    let r = http.post(&vurl).json(&receipt).send().await.unwrap();
    assert_eq!(r.status(), 401, "unsigned");
    let sig = comm_aggregator::callbacks::vonage::signature("not-the-secret", &receipt);
    receipt.insert("sig".into(), sig);
    let r = http.post(&vurl).json(&receipt).send().await.unwrap();
    assert_eq!(r.status(), 403, "signed with another secret");

    let email = unique("genuine mail");
    let eid = accept(
        json!({"type":"email","data":{"from":"a@example.com","to":"b@example.com","msg":email}}),
    )
    .await;
    let erec = wait_status(&eid, "delivered").await;
    let sg = erec.get_str("providerMessageId").unwrap();
    let events =
        json!([{"event":"bounce","sg_message_id": format!("{sg}.filter0"),"reason":"forged"}])
            .to_string();
    let surl = svc.url("/api/v1/callbacks/sendgrid");
    let r = http.post(&surl).body(events.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401, "unsigned");
    let r = http
        .post(&surl)
        .header("X-Twilio-Email-Event-Webhook-Signature", "MEUCIQCFjHQv+rqxYC6dwdvjoRyQiZqWNKHpNwqFXJeHTg6NNgIgSZ4NZNIoBV/yVzCqpOSTVOK53FxnxPkAg27dkrARnn4=")
        .header("X-Twilio-Email-Event-Webhook-Timestamp", "1764322800")
        .body(events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a signature of another body");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(record(&id).await.get_str("status").unwrap(), "delivered");
    assert_eq!(record(&eid).await.get_str("status").unwrap(), "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_vonage_is_tried_again_and_sends_once() {
    let (stack, _) = routed();
    let http = reqwest::Client::new();
    let faults = format!("{}/__sandbox/faults", stack.sandbox());
    let r = http
        .post(&faults)
        .json(&json!({"provider": "vonage", "mode": "429"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let msg = unique("throttled");
    let id =
        accept(json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654323","msg":msg}}))
            .await;
    eventually(WAIT, "a throttled attempt", || async {
        let r = record(&id).await;
        r.get_array("errors")
            .is_ok_and(|e| !e.is_empty())
            .then_some(())
    })
    .await;
    http.delete(&faults).send().await.unwrap();
    let rec = wait_status(&id, "delivered").await;
    assert!(rec.get_i32("attempts").unwrap() >= 2, "{rec}");
    assert_eq!(taken(&msg).await.len(), 1, "sent once");
}
