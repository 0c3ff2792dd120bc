//! Twilio's status callback, `POST /api/v1/callbacks/twilio`: form fields `MessageSid`,
//! `MessageStatus`, `ErrorCode`; `X-Twilio-Signature` = Base64(HMAC-SHA1(auth token,
//! URL + every POST parameter name and value, sorted by name)).

use super::{record, CallbackConfig};
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, TWILIO_CALLBACK};
use actors::domain::Status;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

pub(super) const SIGNATURE_HEADER: &str = "X-Twilio-Signature";

pub fn routes(cfg: Arc<CallbackConfig>) -> BoxedFilter<(Response,)> {
    at(TWILIO_CALLBACK)
        .and(warp::header::optional::<String>("x-twilio-signature"))
        .and(limited_body())
        .then(move |sig, body| {
            let cfg = cfg.clone();
            async move { respond(callback(&cfg, sig, body).await) }
        })
        .boxed()
}

/// HMAC-SHA1 with the auth token over the URL and every parameter name and value, sorted
/// by name (<https://www.twilio.com/docs/usage/security>).
fn mac(auth_token: &str, url: &str, params: &[(String, String)]) -> Hmac<sha1::Sha1> {
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

/// Twilio's request signature: Base64 of the MAC.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    use base64::Engine;
    let mac = mac(auth_token, url, params);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Constant-time check of `X-Twilio-Signature`.
pub fn valid(auth_token: &str, url: &str, params: &[(String, String)], given: &str) -> bool {
    use base64::Engine;
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(given.trim()) else {
        return false;
    };
    mac(auth_token, url, params).verify_slice(&sig).is_ok()
}

/// Twilio `MessageStatus` → our status; statuses before delivery are not receipts.
pub fn status(s: &str) -> Option<Status> {
    match s {
        "delivered" => Some(Status::Delivered),
        "read" => Some(Status::Read),
        "undelivered" | "failed" => Some(Status::Undelivered),
        _ => None,
    }
}

async fn callback(
    cfg: &CallbackConfig,
    signature: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    // Without the public URL the signature could only be checked against one built from
    // the caller's own `Host` header, which the caller chooses.
    let url = cfg
        .twilio_url
        .as_deref()
        .ok_or(ApiError::CallbacksNotConfigured)?;
    let sig = signature.ok_or(ApiError::Unsigned(SIGNATURE_HEADER))?;
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    if !valid(cfg.twilio_auth_token.expose_secret(), url, &params, &sig) {
        return Err(ApiError::BadSignature(SIGNATURE_HEADER));
    }
    let p: HashMap<&str, &str> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (Some(sid), Some(st)) = (p.get("MessageSid"), p.get("MessageStatus")) else {
        return Err(ApiError::InvalidCallback);
    };
    let Some(status) = status(st) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let err = p
        .get("ErrorCode")
        .filter(|c| !c.is_empty())
        .map(|c| (c.to_string(), format!("Twilio reported {st} (error {c})")));
    // Twilio's WhatsApp sender reports through the same callback, `To` as `whatsapp:+…`.
    let provider = if p.get("To").is_some_and(|to| to.starts_with("whatsapp:")) {
        crate::providers::twilio::WHATSAPP_NAME
    } else {
        crate::providers::twilio::NAME
    };
    record(
        cfg.apply_timeout,
        provider,
        "twilio-callback",
        sid,
        status,
        err,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_an_independent_implementation() {
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
        let sig = signature("12345", url, &params);
        assert_eq!(sig, "3KI2uRuYyAdhZIJXcpU0izDUzWI=");
        assert!(valid("12345", url, &params, &sig));
        assert!(!valid("12345", url, &params[1..], &sig));
        assert!(!valid("other", url, &params, &sig));
    }

    #[test]
    fn only_final_statuses_are_receipts() {
        assert_eq!(status("delivered"), Some(Status::Delivered));
        assert_eq!(status("failed"), Some(Status::Undelivered));
        assert_eq!(status("sent"), None);
    }
}
