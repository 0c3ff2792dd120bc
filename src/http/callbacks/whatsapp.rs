//! Meta's WhatsApp webhook:
//! - `GET /api/v1/callbacks/whatsapp`: the verification (`hub.mode=subscribe`,
//!   `hub.verify_token`, answer `hub.challenge`).
//! - `POST /api/v1/callbacks/whatsapp`: status notifications, `X-Hub-Signature-256` =
//!   `sha256=` + hex(HMAC-SHA256(app secret, raw body)).

use super::{record, CallbackConfig};
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, WHATSAPP_CALLBACK, WHATSAPP_VERIFY};
use actors::domain::{Channel, Status};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

pub fn routes(cfg: Arc<CallbackConfig>) -> BoxedFilter<(Response,)> {
    let verify_cfg = cfg.clone();
    let verify_route = at(WHATSAPP_VERIFY)
        .and(warp::query::<HashMap<String, String>>())
        .map(move |q: HashMap<String, String>| respond(verify(&verify_cfg, &q)));
    let statuses = at(WHATSAPP_CALLBACK)
        .and(warp::header::optional::<String>("x-hub-signature-256"))
        .and(limited_body())
        .then(move |sig, body| {
            let cfg = cfg.clone();
            async move { respond(callback(&cfg, sig, body).await) }
        });
    verify_route.or(statuses).unify().boxed()
}

/// HMAC-SHA256 of the raw body with the app secret.
fn mac(app_secret: &str, body: &[u8]) -> Hmac<sha2::Sha256> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(app_secret.as_bytes()).expect("any key");
    mac.update(body);
    mac
}

/// Meta's `X-Hub-Signature-256` value for a body.
pub fn signature(app_secret: &str, body: &[u8]) -> String {
    let hex = actors::domain::to_hex(&mac(app_secret, body).finalize().into_bytes());
    format!("sha256={hex}")
}

/// Constant-time check of `X-Hub-Signature-256`.
pub fn valid(app_secret: &str, body: &[u8], given: &str) -> bool {
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
    mac(app_secret, body).verify_slice(&sig).is_ok()
}

/// WhatsApp `statuses[].status` → our status.
pub fn status(s: &str) -> Option<Status> {
    match s {
        "delivered" => Some(Status::Delivered),
        "read" => Some(Status::Read),
        "failed" => Some(Status::Failed),
        _ => None,
    }
}

fn verify(cfg: &CallbackConfig, q: &HashMap<String, String>) -> Result<Response, ApiError> {
    let mode = q.get("hub.mode").map(String::as_str);
    let token = q.get("hub.verify_token").map(String::as_str);
    match (mode, token, q.get("hub.challenge")) {
        (Some("subscribe"), Some(t), Some(challenge))
            if !cfg.whatsapp_verify_token.expose_secret().is_empty()
                && t == cfg.whatsapp_verify_token.expose_secret() =>
        {
            Ok(challenge.clone().into_response())
        }
        _ => Err(ApiError::VerificationFailed),
    }
}

/// Every `statuses[]` item of a notification.
fn statuses(v: &Value) -> impl Iterator<Item = &Value> {
    v["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["changes"].as_array().into_iter().flatten())
        .flat_map(|c| c["value"]["statuses"].as_array().into_iter().flatten())
}

/// Every status of a notification with its error, if any: `(message id, status, error)`.
fn receipts(v: &Value) -> impl Iterator<Item = (&str, Status, Option<(String, String)>)> {
    statuses(v).filter_map(|s| {
        let id = s["id"].as_str()?;
        let status = status(s["status"].as_str()?)?;
        let err = s["errors"][0].as_object().map(|e| {
            (
                e.get("code").map(|c| c.to_string()).unwrap_or_default(),
                e.get("title")
                    .and_then(Value::as_str)
                    .unwrap_or("failed")
                    .to_string(),
            )
        });
        Some((id, status, err))
    })
}

async fn callback(
    cfg: &CallbackConfig,
    signature: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let sig = signature.ok_or(ApiError::Unsigned(SIGNATURE_HEADER))?;
    let secret = cfg.whatsapp_app_secret.expose_secret();
    if secret.is_empty() || !valid(secret, &body, &sig) {
        return Err(ApiError::BadSignature(SIGNATURE_HEADER));
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return Err(ApiError::InvalidJson("the body is not JSON".into()));
    };
    for (id, status, err) in receipts(&v) {
        // Meta sends the whole notification again when the answer is not a 200.
        record(
            cfg.apply_timeout,
            crate::providers::whatsapp::NAME,
            "whatsapp-webhook",
            id,
            status,
            err,
        )
        .await?;
    }
    suppress(cfg, &v).await?;
    Ok(StatusCode::OK.into_response())
}

/// Meta's error code for a recipient who stopped marketing messages
/// (<https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes>).
pub const OPTED_OUT: i64 = 131050;

/// The failed statuses whose error is [`OPTED_OUT`]: `(message id, recipient)`, the
/// recipient as E.164 (Meta's `recipient_id` is the number's digits).
pub fn opt_outs(v: &Value) -> Vec<(&str, String)> {
    statuses(v)
        .filter(|s| {
            s["errors"]
                .as_array()
                .is_some_and(|es| es.iter().any(|e| e["code"].as_i64() == Some(OPTED_OUT)))
        })
        .filter_map(|s| {
            let to = s["recipient_id"].as_str()?;
            Some((
                s["id"].as_str()?,
                format!("+{}", to.trim_start_matches('+')),
            ))
        })
        .collect()
}

/// Suppress, for WhatsApp, the recipients of [`opt_outs`] for the tenants that sent to
/// them (found by the message id the send was answered with). Only here: the sender's
/// synchronous refusals carry the same code, but the status webhook reports every one.
async fn suppress(cfg: &CallbackConfig, v: &Value) -> Result<(), ApiError> {
    let found = opt_outs(v);
    if found.is_empty() {
        return Ok(());
    }
    let unavailable = |e: actors::ports::DependencyError| {
        tracing::warn!(error = %e, "opt-out not recorded");
        ApiError::StoreUnavailable
    };
    let ids: Vec<String> = found.iter().map(|(id, _)| id.to_string()).collect();
    let tenants = cfg
        .suppressions
        .tenants_of_sent(crate::providers::whatsapp::NAME, &ids)
        .await
        .map_err(unavailable)?;
    for (id, to) in found {
        let (Some(tenant), Some(address)) = (
            tenants.get(id),
            actors::domain::suppression_address(Channel::Whatsapp, &to),
        ) else {
            tracing::warn!(message_id = id, "opt-out of an unknown message; ignored");
            continue;
        };
        cfg.suppressions
            .add(
                tenant,
                Channel::Whatsapp,
                &address,
                Some("131050"),
                "whatsapp-webhook",
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_and_rejects_tampering() {
        let body = br#"{"object":"whatsapp_business_account"}"#;
        let sig = signature("secret", body);
        assert!(sig.starts_with("sha256=") && sig.len() == 71);
        assert!(valid("secret", body, &sig));
        assert!(!valid("secret", b"{}", &sig));
        assert!(!valid("nope", body, &sig));
        assert!(!valid("secret", body, "sha1=abc"));
    }

    #[test]
    fn an_opted_out_recipient_is_found_by_its_error_code() {
        let v = serde_json::json!({"entry": [{"changes": [{"value": {"statuses": [
            {"id": "wamid.1", "status": "failed", "recipient_id": "15550001234",
             "errors": [{"code": 131050, "title": "User has stopped marketing messages"}]},
            {"id": "wamid.2", "status": "failed", "recipient_id": "15550005678",
             "errors": [{"code": 131026, "title": "Undeliverable"}]},
            {"id": "wamid.3", "status": "delivered", "recipient_id": "15550009999"},
        ]}}]}]});
        assert_eq!(opt_outs(&v), vec![("wamid.1", "+15550001234".to_string())]);
    }

    #[test]
    fn a_notification_yields_its_final_statuses() {
        let v = serde_json::json!({"entry": [{"changes": [{"value": {"statuses": [
            {"id": "wamid.1", "status": "delivered"},
            {"id": "wamid.2", "status": "sent"},
            {"id": "wamid.3", "status": "failed", "errors": [{"code": 131026, "title": "Undeliverable"}]},
        ]}}]}]});
        let got: Vec<_> = receipts(&v).collect();
        assert_eq!(
            got,
            vec![
                ("wamid.1", Status::Delivered, None),
                (
                    "wamid.3",
                    Status::Failed,
                    Some(("131026".to_string(), "Undeliverable".to_string()))
                ),
            ]
        );
    }
}
