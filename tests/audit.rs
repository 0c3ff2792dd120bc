//! Issue #13 item 9: the audit trail of security events. Failed authentications (named by
//! the key's digest and the source address, never the key), rate-limit and cap hits,
//! callbacks with bad signatures and the configuration at start-up land in their own
//! Elasticsearch index, searchable by tenant and kind, each counted by kind in /metrics.
//! Real servers: the shared stack's osmem, the service binary.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

const INDEX: &str = "security-audit";

fn digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The audit documents of `kind` that `pick` accepts, once there are any.
async fn audit_docs(kind: &str, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    let (stack, _) = shared();
    eventually(
        Duration::from_secs(20),
        &format!("{kind} in {INDEX}"),
        || async {
            let hits = stack
                .es_search(INDEX, json!({"term": {"kind": kind}}))
                .await;
            let docs: Vec<Value> = hits
                .into_iter()
                .map(|h| h["_source"].clone())
                .filter(|d| pick(d))
                .collect();
            (!docs.is_empty()).then_some(docs)
        },
    )
    .await
}

#[tokio::test]
async fn refusals_and_the_start_up_are_in_the_audit_index_without_secrets() {
    let svc = start_isolated(12, &[("API_RATE_PER_SEC", "1"), ("API_BURST", "2")]);
    let port = svc.port.to_string();

    // A key nobody configured, and no key at all.
    let stolen = "acme-guessed-key-0000000000";
    let r = client_for(stolen)
        .post(svc.url("/api/v1/communication"))
        .json(&sms("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = reqwest::Client::new()
        .get(svc.url("/api/v1/communications"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A sender the tenant does not own, and a destination outside its countries (+1).
    let spoofed =
        json!({"type": "sms", "data": {"from": "+15559990000", "to": "+15557654321", "msg": "x"}});
    let abroad =
        json!({"type": "sms", "data": {"from": "+15550001111", "to": "+447700900123", "msg": "x"}});
    for (body, status) in [(spoofed, 403), (abroad, 403)] {
        let r = client()
            .post(svc.url("/api/v1/communication"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }
    // The test tenant over its rate (burst 2).
    let mut limited = 0;
    for _ in 0..6 {
        let r = client()
            .get(svc.url("/api/v1/communications"))
            .send()
            .await
            .unwrap();
        limited += usize::from(r.status() == 429);
    }
    assert!(limited > 0, "burst 2 at 1/s must refuse some of 6");
    // A Twilio status callback that is not signed with our auth token.
    let r = reqwest::Client::new()
        .post(svc.url("/api/v1/callbacks/twilio"))
        .header("X-Twilio-Signature", "bm90LXRoZS1zaWduYXR1cmU=")
        .form(&[("MessageSid", "SM0"), ("MessageStatus", "delivered")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let stolen_digest = digest(stolen);
    let failed = audit_docs("auth_failed", |d| d["keyDigest"] == stolen_digest.as_str()).await;
    let d = &failed[0];
    assert_eq!(d["route"], "POST /api/v1/communication", "{d}");
    assert!(
        d["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{d}"
    );
    assert_eq!(
        d["tenant"],
        Value::Null,
        "an unknown key names no tenant: {d}"
    );
    audit_docs("auth_failed", |d| {
        d["keyDigest"].is_null() && d["route"] == "GET /api/v1/communications"
    })
    .await;
    let limited_docs = audit_docs("rate_limited", |d| d["tenant"] == TENANT).await;
    assert_eq!(limited_docs[0]["keyDigest"], digest(API_KEY));
    for kind in ["sender_refused", "destination_refused"] {
        let docs = audit_docs(kind, |d| d["tenant"] == TENANT).await;
        assert_eq!(docs[0]["detail"]["status"], 403, "{}", docs[0]);
    }
    audit_docs("bad_callback_signature", |d| {
        d["route"] == "POST /api/v1/callbacks/twilio"
    })
    .await;
    let started = audit_docs("config_loaded", |d| {
        d["route"].as_str().is_some_and(|r| r.ends_with(&port))
    })
    .await;
    let all = serde_json::to_string(&started[0]).unwrap();
    assert!(all.contains(TENANT), "{all}");
    for secret in [
        API_KEY,
        OTHER_KEY,
        "sandbox-auth-token",
        "sandbox-whatsapp-token",
        "sandbox-app-secret",
    ] {
        assert!(!all.contains(secret), "{secret} in the audit trail: {all}");
    }
    // Nothing of any document holds the keys themselves.
    let (stack, _) = shared();
    let everything = stack.es_search(INDEX, json!({"match_all": {}})).await;
    let text = serde_json::to_string(&everything).unwrap();
    for secret in [stolen, API_KEY, OTHER_KEY] {
        assert!(!text.contains(secret), "{secret} in the audit index");
    }

    // Counted by kind.
    let metrics = reqwest::get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for kind in [
        "auth_failed",
        "rate_limited",
        "bad_callback_signature",
        "config_loaded",
    ] {
        let line = format!("comm_aggregator_security_events_total{{kind=\"{kind}\"}}");
        assert!(metrics.contains(&line), "{line} in /metrics");
    }
}
