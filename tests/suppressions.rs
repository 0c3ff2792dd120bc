//! Opt-outs (issue #16, suppression list), on real servers: a tenant's list is added to
//! (201, then 200 for the same address), listed, filtered by channel and removed (204, then
//! 404), and no other tenant sees or changes it; an inbound SMS `STOP` signed as Twilio
//! signs suppresses the next message to that number (recorded `suppressed`, never at the
//! provider) and `START` lets the one after through; a bad signature changes nothing; a
//! SendGrid bounce event suppresses the address.

mod common;

use common::{client, client_for, eventually, shared_with, unique, Service, Stack, OTHER_KEY};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
/// SMS through Twilio's stand-in (the default), email through SendGrid's (whose stand-in
/// posts a signed `bounce` event for an address starting `bounce@`).
const ENV: &[(&str, &str)] = &[("EMAIL_PROVIDERS", "sendgrid")];
/// A number of the `tests` tenant's table only (tests/common `TENANTS`).
const TESTS_NUMBER: &str = "+15550003333";

fn stack() -> &'static (Stack, Service) {
    shared_with(ENV)
}

/// A phone number no other test uses.
fn phone() -> String {
    let u = unique("p");
    let digits: String = u.chars().filter(char::is_ascii_digit).collect();
    format!("+1999{}", &digits[digits.len() - 8..])
}

async fn answer(res: reqwest::Response) -> (u16, Value) {
    let s = res.status().as_u16();
    (s, res.json().await.unwrap_or(Value::Null))
}

async fn listed(key: Option<&str>, kind: &str) -> Vec<Value> {
    let (_, svc) = stack();
    let c = key.map_or_else(client, client_for);
    let (s, v) = answer(
        c.get(svc.url(&format!("/api/v1/suppressions?type={kind}&limit=1000")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["suppressions"].as_array().unwrap().clone()
}

fn has(list: &[Value], address: &str) -> bool {
    list.iter().any(|s| s["address"] == address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppression_is_added_listed_and_removed_per_tenant() {
    let (_, svc) = stack();
    let url = svc.url("/api/v1/suppressions");
    let address = format!("{}@Example.ORG", unique("Ada"));
    let lower = address.to_lowercase();
    let add = json!({"type": "email", "address": address, "reason": "asked by phone"});
    let (s, v) = answer(client().post(&url).json(&add).send().await.unwrap()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (
            v["address"].as_str(),
            v["type"].as_str(),
            v["source"].as_str()
        ),
        (Some(lower.as_str()), Some("email"), Some("api"))
    );
    let (s, again) = answer(client().post(&url).json(&add).send().await.unwrap()).await;
    assert_eq!((s, &again["createdAt"]), (200, &v["createdAt"]), "{again}");
    assert!(has(&listed(None, "email").await, &lower));
    assert!(!has(&listed(None, "sms").await, &lower));
    // Another tenant neither sees it nor removes it.
    assert!(!has(&listed(Some(OTHER_KEY), "email").await, &lower));
    let del = format!("{url}?type=email&address={}", lower.replace('+', "%2B"));
    let (s, v) = answer(client_for(OTHER_KEY).delete(&del).send().await.unwrap()).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, _) = answer(client().delete(&del).send().await.unwrap()).await;
    assert_eq!(s, 204);
    assert!(!has(&listed(None, "email").await, &lower));
    let (s, _) = answer(client().delete(&del).send().await.unwrap()).await;
    assert_eq!(s, 404);
    // Bad input: the existing error shape, naming the field.
    for (body, field) in [
        (json!({"type": "fax", "address": "+15550001111"}), "type"),
        (json!({"type": "sms", "address": "0041 79"}), "address"),
        (json!({"type": "email", "address": "nobody"}), "address"),
    ] {
        let (s, v) = answer(client().post(&url).json(&body).send().await.unwrap()).await;
        assert_eq!((s, v["error"]["field"].as_str()), (400, Some(field)), "{v}");
    }
}

/// An inbound message to Twilio's webhook, signed as Twilio signs it (or with `token`).
async fn inbound(from: &str, body: &str, token: &str) -> reqwest::Response {
    let (_, svc) = stack();
    let url = svc.url("/api/v1/callbacks/twilio/inbound");
    let form: Vec<(String, String)> = [("From", from), ("To", TESTS_NUMBER), ("Body", body)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sig = comm_aggregator::callbacks::twilio_signature(token, &url, &form);
    reqwest::Client::new()
        .post(&url)
        .header("X-Twilio-Signature", sig)
        .form(&form)
        .send()
        .await
        .unwrap()
}

async fn send(body: Value) -> String {
    let (_, svc) = stack();
    let (s, v) = answer(
        client()
            .post(svc.url("/api/v1/communication"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(matches!(s, 200 | 202), "{s} {v}");
    v["id"].as_str().unwrap().to_string()
}

async fn settled(id: &str) -> String {
    let (_, svc) = stack();
    eventually(WAIT, &format!("{id} settles"), || async {
        let (_, v) = svc.get(&format!("/api/v1/communication/{id}")).await;
        let st = v["status"].as_str()?.to_string();
        (!matches!(st.as_str(), "pending" | "sending")).then_some(st)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_stop_suppresses_the_next_sms_and_start_lets_one_through() {
    let (stack, _) = stack();
    let to = phone();
    let r = inbound(&to, "STOP", "wrong-token").await;
    assert_eq!(r.status(), 403);
    assert!(!has(&listed(None, "sms").await, &to));

    let r = inbound(&to, " stop ", "sandbox-auth-token").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/xml");
    assert!(r.text().await.unwrap().contains("<Response/>"));
    let l = listed(None, "sms").await;
    let s = l
        .iter()
        .find(|s| s["address"] == to.as_str())
        .expect("listed");
    assert_eq!(s["source"], "twilio-inbound");
    assert!(!has(&listed(Some(OTHER_KEY), "sms").await, &to));

    let quiet = unique("after stop");
    let id =
        send(json!({"type": "sms", "data": {"from": TESTS_NUMBER, "to": to, "msg": quiet}})).await;
    assert_eq!(settled(&id).await, "suppressed");

    let r = inbound(&to, "START", "sandbox-auth-token").await;
    assert_eq!(r.status(), 200);
    assert!(!has(&listed(None, "sms").await, &to));
    let loud = unique("after start");
    let id =
        send(json!({"type": "sms", "data": {"from": TESTS_NUMBER, "to": to, "msg": loud}})).await;
    assert_ne!(settled(&id).await, "suppressed");
    let at_provider = stack.sandbox_messages().await;
    let got = |m: &str| at_provider.iter().any(|x| x.to_string().contains(m));
    assert!(got(&loud), "the message after START reached the provider");
    assert!(
        !got(&quiet),
        "the message after STOP never reached the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sendgrid_bounce_suppresses_the_address() {
    let address = format!("bounce@{}.example.org", unique("b"));
    let first = send(json!({"type": "email", "data": {"from": "a@example.com", "to": address, "msg": unique("bounces")}})).await;
    assert_ne!(settled(&first).await, "suppressed");
    eventually(WAIT, "the bounce suppresses the address", || async {
        let l = listed(None, "email").await;
        l.iter()
            .any(|s| s["address"] == address.as_str() && s["source"] == "sendgrid-event")
            .then_some(())
    })
    .await;
    let next = send(json!({"type": "email", "data": {"from": "a@example.com", "to": address, "msg": unique("after bounce")}})).await;
    assert_eq!(settled(&next).await, "suppressed");
}
