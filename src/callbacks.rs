//! Provider callbacks (delivery receipts), verified before anything changes:
//! - `POST /api/v1/callbacks/twilio`: Twilio's status callback, form fields `MessageSid`,
//!   `MessageStatus`, `ErrorCode`; `X-Twilio-Signature` = Base64(HMAC-SHA1(auth token,
//!   URL + every POST parameter name and value, sorted by name)).
//! - `GET /api/v1/callbacks/whatsapp`: Meta's webhook verification (`hub.mode=subscribe`,
//!   `hub.verify_token`, answer `hub.challenge`).
//! - `POST /api/v1/callbacks/whatsapp`: status notifications, `X-Hub-Signature-256` =
//!   `sha256=` + hex(HMAC-SHA256(app secret, raw body)).
//!
//! A missing signature is 401, a wrong one 403; neither changes anything.

use crate::http::error;
use actors::domain::Status;
use actors::ports::ReceiptUpdate;
use actors::ractor::rpc::CallResult;
use actors::ractor::ActorRef;
use actors::receipts::{self, Receipt, ReceiptMsg};
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

#[derive(Clone)]
pub struct CallbackConfig {
    /// The URL Twilio calls (the public base URL + the route); signatures are over it.
    pub twilio_url: Option<String>,
    pub twilio_auth_token: String,
    pub whatsapp_app_secret: String,
    pub whatsapp_verify_token: String,
}

/// HMAC-SHA1 with the auth token over the URL and every parameter name and value, sorted
/// by name (<https://www.twilio.com/docs/usage/security>).
fn twilio_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<sha1::Sha1> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).expect("any key");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    mac
}

/// Twilio's request signature: Base64 of `twilio_mac`.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    use base64::Engine;
    let mac = twilio_mac(auth_token, url, params);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Constant-time check of `X-Twilio-Signature`.
pub fn twilio_valid(auth_token: &str, url: &str, params: &[(String, String)], given: &str) -> bool {
    use base64::Engine;
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(given.trim()) else {
        return false;
    };
    twilio_mac(auth_token, url, params)
        .verify_slice(&sig)
        .is_ok()
}

/// HMAC-SHA256 of the raw body with the app secret.
fn meta_mac(app_secret: &str, body: &[u8]) -> Hmac<sha2::Sha256> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(app_secret.as_bytes()).expect("any key");
    mac.update(body);
    mac
}

/// Meta's `X-Hub-Signature-256` value for a body.
pub fn meta_signature(app_secret: &str, body: &[u8]) -> String {
    let hex: String = meta_mac(app_secret, body)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// Constant-time check of `X-Hub-Signature-256`.
pub fn meta_valid(app_secret: &str, body: &[u8], given: &str) -> bool {
    let Some(hex) = given.trim().strip_prefix("sha256=") else {
        return false;
    };
    if hex.len() != 64 || !hex.is_ascii() {
        return false;
    }
    let Ok(sig) = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    meta_mac(app_secret, body).verify_slice(&sig).is_ok()
}

/// Twilio `MessageStatus` → our status; statuses before delivery are not receipts.
pub fn twilio_status(s: &str) -> Option<Status> {
    match s {
        "delivered" => Some(Status::Delivered),
        "read" => Some(Status::Read),
        "undelivered" | "failed" => Some(Status::Undelivered),
        _ => None,
    }
}

/// WhatsApp `statuses[].status` → our status.
pub fn whatsapp_status(s: &str) -> Option<Status> {
    match s {
        "delivered" => Some(Status::Delivered),
        "read" => Some(Status::Read),
        "failed" => Some(Status::Failed),
        _ => None,
    }
}

/// Hand a receipt to the ReceiptActor and wait for its answer (it waits, in memory, up to
/// 10 s for a record the receipt overtook).
async fn apply(
    service: &'static str,
    pmid: &str,
    status: Status,
    err: Option<(String, String)>,
) -> Result<bool, actors::ports::DependencyError> {
    let unavailable = |why: &str| {
        actors::ports::DependencyError::new(actors::ports::Dependency::Actor("receipts"), why)
    };
    let Some(actor) = ActorRef::<ReceiptMsg>::where_is(receipts::NAME.to_string()) else {
        return Err(unavailable("the receipt actor is restarting"));
    };
    let receipt = Receipt {
        update: ReceiptUpdate {
            provider_message_id: pmid.to_string(),
            status,
            error: err,
        },
        service,
    };
    match actor
        .call(
            |reply| ReceiptMsg::Apply(receipt, reply),
            Some(std::time::Duration::from_secs(15)),
        )
        .await
    {
        Ok(CallResult::Success(r)) => r,
        _ => Err(unavailable("no answer in time")),
    }
}

pub async fn twilio(
    cfg: Arc<CallbackConfig>,
    host: Option<String>,
    path: String,
    signature: Option<String>,
    body: bytes::Bytes,
) -> Response {
    let Some(sig) = signature else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unsigned",
            "X-Twilio-Signature is required",
        );
    };
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let url = cfg
        .twilio_url
        .clone()
        .unwrap_or_else(|| format!("http://{}{path}", host.unwrap_or_default()));
    if !twilio_valid(&cfg.twilio_auth_token, &url, &params, &sig) {
        return error(
            StatusCode::FORBIDDEN,
            "bad_signature",
            "X-Twilio-Signature does not match",
        );
    }
    let p: HashMap<&str, &str> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (Some(sid), Some(st)) = (p.get("MessageSid"), p.get("MessageStatus")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_callback",
            "MessageSid and MessageStatus are required",
        );
    };
    let Some(status) = twilio_status(st) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let err = p
        .get("ErrorCode")
        .filter(|c| !c.is_empty())
        .map(|c| (c.to_string(), format!("Twilio reported {st} (error {c})")));
    match apply("twilio-callback", sid, status, err).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "receipt not recorded");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "try again later",
            )
        }
    }
}

pub fn whatsapp_verify(cfg: &CallbackConfig, q: &HashMap<String, String>) -> Response {
    let mode = q.get("hub.mode").map(String::as_str);
    let token = q.get("hub.verify_token").map(String::as_str);
    match (mode, token, q.get("hub.challenge")) {
        (Some("subscribe"), Some(t), Some(challenge))
            if !cfg.whatsapp_verify_token.is_empty() && t == cfg.whatsapp_verify_token =>
        {
            challenge.clone().into_response()
        }
        _ => error(
            StatusCode::FORBIDDEN,
            "verification_failed",
            "hub.verify_token does not match",
        ),
    }
}

pub async fn whatsapp(
    cfg: Arc<CallbackConfig>,
    signature: Option<String>,
    body: bytes::Bytes,
) -> Response {
    let Some(sig) = signature else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unsigned",
            "X-Hub-Signature-256 is required",
        );
    };
    if cfg.whatsapp_app_secret.is_empty() || !meta_valid(&cfg.whatsapp_app_secret, &body, &sig) {
        return error(
            StatusCode::FORBIDDEN,
            "bad_signature",
            "X-Hub-Signature-256 does not match",
        );
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body is not JSON",
        );
    };
    let statuses = v["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["changes"].as_array().into_iter().flatten())
        .flat_map(|c| c["value"]["statuses"].as_array().into_iter().flatten());
    for s in statuses {
        let (Some(id), Some(st)) = (s["id"].as_str(), s["status"].as_str()) else {
            continue;
        };
        let Some(status) = whatsapp_status(st) else {
            continue;
        };
        let err = s["errors"][0].as_object().map(|e| {
            (
                e.get("code").map(|c| c.to_string()).unwrap_or_default(),
                e.get("title")
                    .and_then(Value::as_str)
                    .unwrap_or("failed")
                    .to_string(),
            )
        });
        if let Err(e) = apply("whatsapp-webhook", id, status, err).await {
            // Meta retries a webhook that did not answer 200.
            tracing::warn!(error = %e, "receipt not recorded");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "try again later",
            );
        }
    }
    StatusCode::OK.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_signature_matches_an_independent_implementation() {
        // Parameters of Twilio's security docs; the expected value computed with Python's
        // hmac/hashlib/base64 from the documented algorithm.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let url = "https://mycompany.com/myapp";
        let sig = twilio_signature("12345", url, &params);
        assert_eq!(sig, "3KI2uRuYyAdhZIJXcpU0izDUzWI=");
        assert!(twilio_valid("12345", url, &params, &sig));
        assert!(!twilio_valid("12345", url, &params[1..], &sig));
        assert!(!twilio_valid("other", url, &params, &sig));
    }

    #[test]
    fn meta_signature_round_trips_and_rejects_tampering() {
        let body = br#"{"object":"whatsapp_business_account"}"#;
        let sig = meta_signature("secret", body);
        assert!(sig.starts_with("sha256=") && sig.len() == 71);
        assert!(meta_valid("secret", body, &sig));
        assert!(!meta_valid("secret", b"{}", &sig));
        assert!(!meta_valid("nope", body, &sig));
        assert!(!meta_valid("secret", body, "sha1=abc"));
    }
}
