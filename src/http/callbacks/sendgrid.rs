//! SendGrid's event webhook, `POST /api/v1/callbacks/sendgrid`: a JSON array of events
//! (`event`, `sg_message_id`, `reason`, `status`, `type`, …), signed
//! (<https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features>):
//! `X-Twilio-Email-Event-Webhook-Signature` is base64 of an ECDSA P-256 / SHA-256
//! signature (DER) over `X-Twilio-Email-Event-Webhook-Timestamp` followed by the raw body,
//! checked with the verification key SendGrid shows (base64 of the DER public key,
//! `SENDGRID_WEBHOOK_PUBLIC_KEY`).
//!
//! `sg_message_id` starts with the `X-Message-Id` the send was answered with (the record's
//! provider message id), then `.filter…`.

use super::{record, CallbackConfig};
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, SENDGRID_CALLBACK};
use crate::providers::sendgrid::NAME;
use actors::domain::{Channel, Status};
use serde_json::Value;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

const SIGNATURE_HEADER: &str = "X-Twilio-Email-Event-Webhook-Signature";
const TIMESTAMP_HEADER: &str = "X-Twilio-Email-Event-Webhook-Timestamp";

/// The DER `SubjectPublicKeyInfo` of a P-256 key up to its point: SEQUENCE, the algorithm
/// (id-ecPublicKey, prime256v1), and the BIT STRING's header.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// `SENDGRID_WEBHOOK_PUBLIC_KEY` is not a base64 DER P-256 public key.
#[derive(Debug, thiserror::Error)]
#[error("SENDGRID_WEBHOOK_PUBLIC_KEY is not a base64 DER P-256 public key ({0})")]
pub struct PublicKeyError(&'static str);

/// The uncompressed point of the verification key, as ring takes it.
pub fn public_key(b64: &str) -> Result<Vec<u8>, PublicKeyError> {
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| PublicKeyError("not base64"))?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 0x04 => Ok(point.to_vec()),
        _ => Err(PublicKeyError("not a P-256 SubjectPublicKeyInfo")),
    }
}

/// Whether `signature` (base64 DER) signs `timestamp` + `body` under `point`.
pub fn valid(point: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    use base64::Engine;
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    let mut signed = Vec::with_capacity(timestamp.len() + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.extend_from_slice(body);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(&signed, &sig)
        .is_ok()
}

pub fn routes(cfg: Arc<CallbackConfig>) -> BoxedFilter<(Response,)> {
    at(SENDGRID_CALLBACK)
        .and(warp::header::optional::<String>(
            "x-twilio-email-event-webhook-signature",
        ))
        .and(warp::header::optional::<String>(
            "x-twilio-email-event-webhook-timestamp",
        ))
        .and(limited_body())
        .then(move |sig, ts, body| {
            let cfg = cfg.clone();
            async move { respond(callback(&cfg, sig, ts, body).await) }
        })
        .boxed()
}

/// A SendGrid event → our status; `processed`, `deferred`, `click` and the rest are not
/// receipts.
pub fn status(event: &str) -> Option<Status> {
    match event {
        "delivered" => Some(Status::Delivered),
        "bounce" | "dropped" => Some(Status::Undelivered),
        "open" => Some(Status::Read),
        _ => None,
    }
}

/// Every receipt among the events: `(X-Message-Id, status, error)`.
fn receipts(events: &[Value]) -> impl Iterator<Item = (&str, Status, Option<(String, String)>)> {
    events.iter().filter_map(|e| {
        let id = e["sg_message_id"].as_str()?.split('.').next()?;
        let event = e["event"].as_str()?;
        let status = status(event)?;
        let err = (status == Status::Undelivered).then(|| {
            let code = e["status"].as_str().unwrap_or(event).to_string();
            let reason = e["reason"].as_str().unwrap_or("no reason given");
            (code, format!("SendGrid reported {event}: {reason}"))
        });
        Some((id, status, err))
    })
}

async fn callback(
    cfg: &CallbackConfig,
    signature: Option<String>,
    timestamp: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let point = cfg
        .sendgrid_public_key
        .as_deref()
        .ok_or(ApiError::CallbacksNotConfigured)?;
    let sig = signature.ok_or(ApiError::Unsigned(SIGNATURE_HEADER))?;
    let ts = timestamp.ok_or(ApiError::Unsigned(TIMESTAMP_HEADER))?;
    if !valid(point, &ts, &body, &sig) {
        return Err(ApiError::BadSignature(SIGNATURE_HEADER));
    }
    let Ok(Value::Array(events)) = serde_json::from_slice::<Value>(&body) else {
        return Err(ApiError::InvalidJson("the body is not a JSON array".into()));
    };
    for (id, status, err) in receipts(&events) {
        // SendGrid posts the whole batch again when the answer is not a 2xx.
        record(cfg.apply_timeout, NAME, "sendgrid-event", id, status, err).await?;
    }
    suppress(cfg, &events).await?;
    Ok(StatusCode::OK.into_response())
}

/// The events that put an address on the suppression list: `(communicationId, address,
/// event)`. A hard bounce (`bounce` of type `bounce`; `blocked` is a soft one), a spam
/// report, an unsubscribe. `communicationId` is the send's custom argument, which SendGrid
/// puts on each of its events; it tells the tenant.
pub fn opt_outs(events: &[Value]) -> impl Iterator<Item = (&str, &str, &str)> {
    events.iter().filter_map(|e| {
        let event = e["event"].as_str()?;
        let hard = match event {
            "bounce" => e["type"].as_str().is_none_or(|t| t == "bounce"),
            "spamreport" | "unsubscribe" => true,
            _ => false,
        };
        hard.then_some((e["communicationId"].as_str()?, e["email"].as_str()?, event))
    })
}

/// Suppress the addresses of [`opt_outs`] for the tenants whose messages they answer.
async fn suppress(cfg: &CallbackConfig, events: &[Value]) -> Result<(), ApiError> {
    let found: Vec<_> = opt_outs(events).collect();
    if found.is_empty() {
        return Ok(());
    }
    let unavailable = |e: actors::ports::DependencyError| {
        tracing::warn!(error = %e, "opt-out not recorded");
        ApiError::StoreUnavailable
    };
    let ids: Vec<String> = found.iter().map(|(id, _, _)| id.to_string()).collect();
    let tenants = cfg
        .suppressions
        .tenants_of(&ids)
        .await
        .map_err(unavailable)?;
    for (id, email, event) in found {
        let (Some(tenant), Some(address)) = (
            tenants.get(id),
            actors::domain::suppression_address(Channel::Email, email),
        ) else {
            tracing::warn!(
                communication_id = id,
                event,
                "opt-out of an unknown message or address; ignored"
            );
            continue;
        };
        cfg.suppressions
            .add(
                tenant,
                Channel::Email,
                &address,
                Some(event),
                "sendgrid-event",
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair made with `openssl ecparam -name prime256v1 -genkey`; the public half as
    /// `openssl ec -pubout -outform DER | base64` prints it, the way SendGrid shows its key.
    const PUBLIC: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEK9bD4IMlz2G7NOB5/jQwuhCO8Jm9KXQJY9/8QbFsQMckVLQagkh54yMBsTqFAy3/Z1IhaEZenOC3wYvKJVycEA==";
    const BODY: &str = r#"[{"email":"b@example.com","event":"delivered","sg_message_id":"W8yfhWmhRsK9h0Qp6I5vTQ.filterdrecv-5F5FC76C-9.0","timestamp":1764322799}]"#;
    /// `printf '%s' "1764322800$BODY" | openssl dgst -sha256 -sign key.pem | base64`.
    const SIGNATURE: &str = "MEUCIQCFjHQv+rqxYC6dwdvjoRyQiZqWNKHpNwqFXJeHTg6NNgIgSZ4NZNIoBV/yVzCqpOSTVOK53FxnxPkAg27dkrARnn4=";

    #[test]
    fn a_signature_made_by_openssl_is_accepted_and_tampering_is_not() {
        let point = public_key(PUBLIC).unwrap();
        assert!(valid(&point, "1764322800", BODY.as_bytes(), SIGNATURE));
        assert!(!valid(&point, "1764322801", BODY.as_bytes(), SIGNATURE));
        let tampered = BODY.replace("delivered", "bounce");
        assert!(!valid(&point, "1764322800", tampered.as_bytes(), SIGNATURE));
        assert!(!valid(&point, "1764322800", BODY.as_bytes(), "not base64!"));
        assert!(public_key("AAAA").is_err());
        assert!(public_key("%%").is_err());
    }

    #[test]
    fn hard_bounces_spam_reports_and_unsubscribes_are_opt_outs() {
        let events: Vec<Value> = serde_json::from_str(
            r#"[{"event":"bounce","type":"bounce","email":"a@x.org","communicationId":"1"},
                {"event":"bounce","type":"blocked","email":"b@x.org","communicationId":"2"},
                {"event":"spamreport","email":"c@x.org","communicationId":"3"},
                {"event":"unsubscribe","email":"d@x.org","communicationId":"4"},
                {"event":"delivered","email":"e@x.org","communicationId":"5"},
                {"event":"bounce","type":"bounce","email":"f@x.org"}]"#,
        )
        .unwrap();
        let got: Vec<_> = opt_outs(&events).map(|(id, _, _)| id).collect();
        assert_eq!(got, ["1", "3", "4"]);
    }

    #[test]
    fn events_become_receipts_of_the_message_id() {
        let events: Vec<Value> = serde_json::from_str(
            r#"[{"event":"processed","sg_message_id":"A1.filter0"},
                {"event":"delivered","sg_message_id":"A1.filter0"},
                {"event":"bounce","sg_message_id":"B2.filter1","status":"5.1.1","reason":"550 5.1.1 user unknown","type":"bounce"},
                {"event":"open","sg_message_id":"A1.filter0"},
                {"event":"delivered"}]"#,
        )
        .unwrap();
        let got: Vec<_> = receipts(&events).collect();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].0, got[0].1), ("A1", Status::Delivered));
        assert_eq!(
            got[1],
            (
                "B2",
                Status::Undelivered,
                Some((
                    "5.1.1".into(),
                    "SendGrid reported bounce: 550 5.1.1 user unknown".into()
                ))
            )
        );
        assert_eq!((got[2].0, got[2].1), ("A1", Status::Read));
    }
}
