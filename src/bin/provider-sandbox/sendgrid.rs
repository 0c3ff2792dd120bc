//! SendGrid's v3 Mail Send `POST /v3/mail/send`: bearer key, the JSON body's required
//! fields (with SendGrid's error body `{"errors":[{"message","field","help"}]}`), `202`
//! with `X-Message-Id`, and the signed event webhook (`processed`, then `delivered`, or
//! `bounce` for an address starting `bounce@`), ECDSA P-256 over the timestamp and body.

use crate::{json_status, Sandbox, CALLBACK_PAUSE};
use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// A development key pair (PKCS#8, base64); its public half is [`DEV_SENDGRID_PUBLIC_KEY`].
pub const DEV_SENDGRID_PRIVATE_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMfDtcqFRu+F3X8n3tVCxd7MufCCH+gthXmEEJf0R66OhRANCAAQr1sPggyXPYbs04Hn+NDC6EI7wmb0pdAlj3/xBsWxAxyRUtBqCSHnjIwGxOoUDLf9nUiFoRl6c4LfBi8olXJwQ";
/// What the service's `SENDGRID_WEBHOOK_PUBLIC_KEY` must be for the stand-in's events.
pub const DEV_SENDGRID_PUBLIC_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEK9bD4IMlz2G7NOB5/jQwuhCO8Jm9KXQJY9/8QbFsQMckVLQagkh54yMBsTqFAy3/Z1IhaEZenOC3wYvKJVycEA==";

pub fn sendgrid_error(status: u16, message: &str, field: Option<&str>) -> Response {
    json_status(
        json!({"errors": [{"message": message, "field": field, "help": null}]}),
        StatusCode::from_u16(status).unwrap(),
    )
}

/// The first of the body's required fields that is missing: (message, field).
fn missing(v: &Value) -> Option<(&'static str, &'static str)> {
    let to = v
        .pointer("/personalizations/0/to/0/email")
        .and_then(Value::as_str);
    if to.is_none_or(|t| !t.contains('@')) {
        return Some((
            "The to email does not contain a valid address.",
            "personalizations.0.to",
        ));
    }
    if v.pointer("/from/email")
        .and_then(Value::as_str)
        .is_none_or(|f| !f.contains('@'))
    {
        return Some((
            "The from email does not contain a valid address.",
            "from.email",
        ));
    }
    if v["subject"].as_str().is_none_or(str::is_empty) {
        return Some(("The subject is required.", "subject"));
    }
    if v.pointer("/content/0/value")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Some((
            "The content value must be a string at least one character in length.",
            "content.0.value",
        ));
    }
    let types: Vec<&str> = v["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["type"].as_str())
        .collect();
    let html_at = types.iter().position(|t| *t == "text/html");
    let plain_at = types.iter().position(|t| *t == "text/plain");
    if html_at.is_some_and(|h| h > 1 || plain_at.is_some_and(|p| p > h)) {
        return Some((
            "If present, text/plain and text/html may only be provided in this order, and must be the first content types.",
            "content",
        ));
    }
    None
}

impl Sandbox {
    pub fn sendgrid(&self, auth: Option<String>, body: &[u8]) -> Response {
        if auth.as_deref() != Some(&format!("Bearer {}", self.sendgrid_key)) {
            return sendgrid_error(
                401,
                "The provided authorization grant is invalid, expired, or revoked",
                None,
            );
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return sendgrid_error(400, "Bad Request", None);
        };
        if let Some((message, field)) = missing(&v) {
            return sendgrid_error(400, message, Some(field));
        }
        let id = self.next_hex(22);
        let to = v
            .pointer("/personalizations/0/to/0/email")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.received.lock().unwrap().push(json!({
            "provider": "sendgrid", "id": id, "to": to, "from": v.pointer("/from/email"),
            "subject": v["subject"], "body": v.pointer("/content/0/value"),
            "html": v["content"].as_array().into_iter().flatten()
                .find(|c| c["type"] == "text/html").map(|c| c["value"].clone()),
            "customArgs": v.pointer("/personalizations/0/custom_args"),
        }));
        let hook = self.sendgrid_webhook.lock().unwrap().clone();
        if let Some(url) = hook {
            let args = v.pointer("/personalizations/0/custom_args").cloned();
            self.sendgrid_events(url, to, &id, args);
        }
        let mut r = warp::reply::with_status(warp::reply(), StatusCode::ACCEPTED).into_response();
        r.headers_mut().insert("x-message-id", id.parse().unwrap());
        r
    }

    /// `processed`, then `delivered` (or `bounce`), one signed post each; the send's
    /// `custom_args` are fields of every event, as SendGrid puts them.
    fn sendgrid_events(&self, url: String, to: &str, id: &str, custom_args: Option<Value>) {
        let sg_id = format!(
            "{id}.filterdrecv-sandbox-1-{}.0",
            self.next_hex(8).to_uppercase()
        );
        let event = |name: &str| {
            let mut e = json!({"email": to, "event": name, "sg_message_id": sg_id,
                "smtp-id": format!("<{id}@sandbox>"), "timestamp": chrono::Utc::now().timestamp()});
            if let Some(Value::Object(args)) = &custom_args {
                for (k, v) in args {
                    e[k] = v.clone();
                }
            }
            if name == "bounce" {
                e["reason"] =
                    json!("550 5.1.1 The email account that you tried to reach does not exist.");
                e["status"] = json!("5.1.1");
                e["type"] = json!("bounce");
            }
            e
        };
        let last = if to.starts_with("bounce@") {
            "bounce"
        } else {
            "delivered"
        };
        let posts = [vec![event("processed")], vec![event(last)]];
        let (http, key) = (self.http.clone(), self.sendgrid_signing_key.clone());
        tokio::spawn(async move {
            for events in posts {
                tokio::time::sleep(CALLBACK_PAUSE).await;
                let body = serde_json::to_vec(&events).unwrap();
                let ts = chrono::Utc::now().timestamp().to_string();
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header(
                        "X-Twilio-Email-Event-Webhook-Signature",
                        sign(&key, &ts, &body),
                    )
                    .header("X-Twilio-Email-Event-Webhook-Timestamp", ts)
                    .body(body)
                    .send()
                    .await;
                if let Err(e) = r {
                    eprintln!("event webhook to {url} failed: {e}");
                }
            }
        });
    }
}

/// Base64 of the DER ECDSA P-256 / SHA-256 signature over `timestamp` + `body`.
fn sign(pkcs8_b64: &str, timestamp: &str, body: &[u8]) -> String {
    use base64::Engine;
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let b64 = base64::engine::general_purpose::STANDARD;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = b64.decode(pkcs8_b64).expect("a base64 PKCS#8 key");
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
        .expect("a P-256 PKCS#8 key");
    let mut signed = timestamp.as_bytes().to_vec();
    signed.extend_from_slice(body);
    b64.encode(key.sign(&rng, &signed).expect("signing works").as_ref())
}
