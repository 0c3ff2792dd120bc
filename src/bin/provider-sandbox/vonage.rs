//! Vonage's SMS API `POST /sms/json` (form or JSON): `api_key`/`api_secret` in the
//! parameters, the per-message `status` codes of Vonage's error table in a `200` answer,
//! one entry a part of a long message, and the signed delivery receipts (POST-JSON, `sig`
//! = SHA-256 HMAC with the signature secret) to the message's `callback`.
//! Recipient 15005550001 is barred (status 7).

use crate::{json_status, Sandbox, CALLBACK_PAUSE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use warp::http::StatusCode;
use warp::reply::Response;

/// Vonage's refusal of one message: its status and `error-text`.
pub fn vonage_refusal(status: u32, text: &str) -> Response {
    json_status(
        json!({"message-count": "1", "messages": [{"status": status.to_string(), "error-text": text}]}),
        StatusCode::OK,
    )
}

/// The parts a text is sent in: 160 characters in one, 153 a part beyond (70 and 67 for
/// unicode).
fn parts(text: &str, unicode: bool) -> usize {
    let n = text.chars().count();
    let (one, each) = if unicode { (70, 67) } else { (160, 153) };
    if n <= one {
        1
    } else {
        n.div_ceil(each)
    }
}

impl Sandbox {
    pub fn vonage(&self, p: HashMap<String, String>) -> Response {
        let field = |k: &str| p.get(k).map(String::as_str).filter(|v| !v.is_empty());
        if field("api_key") != Some(self.vonage_key.as_str())
            || field("api_secret") != Some(self.vonage_secret.as_str())
        {
            return vonage_refusal(4, "Bad Credentials");
        }
        let (Some(to), Some(from), Some(text)) = (field("to"), field("from"), field("text")) else {
            return vonage_refusal(2, "Missing to param");
        };
        if !to.chars().all(|c| c.is_ascii_digit()) || to.len() < 7 {
            return vonage_refusal(3, "Invalid to param");
        }
        if to == "15005550001" {
            return vonage_refusal(7, "Number barred.");
        }
        let unicode = field("type") == Some("unicode");
        let ids: Vec<String> = (0..parts(text, unicode))
            .map(|_| self.next_hex(16).to_uppercase())
            .collect();
        self.received.lock().unwrap().push(json!({
            "provider": "vonage", "id": ids[0], "to": to, "from": from, "body": text,
            "clientRef": field("client-ref"), "parts": ids.len(),
        }));
        if let Some(cb) = field("callback") {
            self.vonage_receipts(cb.to_string(), to, from, field("client-ref"), &ids);
        }
        let messages: Vec<Value> = ids
            .iter()
            .map(|id| {
                json!({"to": to, "message-id": id, "status": "0",
                       "remaining-balance": "15.53590000", "message-price": "0.03330000",
                       "network": "310004"})
            })
            .collect();
        json_status(
            json!({"message-count": ids.len().to_string(), "messages": messages}),
            StatusCode::OK,
        )
    }

    /// One signed receipt a part, `delivered` (`failed` with err-code 1 for 15005550004).
    fn vonage_receipts(
        &self,
        cb: String,
        to: &str,
        from: &str,
        client_ref: Option<&str>,
        ids: &[String],
    ) {
        let (status, err) = if to == "15005550004" {
            ("failed", "1")
        } else {
            ("delivered", "0")
        };
        let receipts: Vec<BTreeMap<String, String>> = ids
            .iter()
            .map(|id| {
                let mut r: BTreeMap<String, String> = [
                    ("msisdn", to),
                    ("to", from),
                    ("network-code", "310004"),
                    ("messageId", id),
                    ("price", "0.03330000"),
                    ("status", status),
                    ("scts", "2611281200"),
                    ("err-code", err),
                    ("api-key", &self.vonage_key),
                    (
                        "message-timestamp",
                        &chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string(),
                    ),
                    ("timestamp", &chrono::Utc::now().timestamp().to_string()),
                    ("nonce", &self.next_hex(32)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                if let Some(c) = client_ref {
                    r.insert("client-ref".into(), c.into());
                }
                let sig = comm_aggregator::callbacks::vonage::signature(
                    &self.vonage_signature_secret,
                    &r,
                );
                r.insert("sig".into(), sig.to_uppercase());
                r
            })
            .collect();
        let http = self.http.clone();
        tokio::spawn(async move {
            for r in receipts {
                tokio::time::sleep(CALLBACK_PAUSE).await;
                if let Err(e) = http.post(&cb).json(&r).send().await {
                    eprintln!("delivery receipt to {cb} failed: {e}");
                }
            }
        });
    }
}
