//! Vonage's SMS delivery receipts, `POST /api/v1/callbacks/vonage` (the dashboard's
//! "POST" or "POST-JSON" method): `messageId`, `status`, `err-code`, `client-ref`, … and,
//! with signed webhooks, `timestamp`, `nonce` and `sig`. `sig` = hex(HMAC-SHA256(signature
//! secret, "&k=v" for every other parameter sorted by name, `&` and `=` in values replaced
//! by `_`)) (<https://developer.vonage.com/en/getting-started/concepts/signing-messages>,
//! the SHA-256 HMAC method; the others are not accepted).

use super::{record, CallbackConfig};
use crate::http::body::limited_body;
use crate::http::errors::{respond, ApiError};
use crate::http::routes::{at, VONAGE_CALLBACK};
use crate::providers::vonage::NAME;
use actors::domain::Status;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

/// Where the signature travels: a parameter, not a header.
const SIGNATURE_PARAM: &str = "sig";

pub fn routes(cfg: Arc<CallbackConfig>) -> BoxedFilter<(Response,)> {
    at(VONAGE_CALLBACK)
        .and(warp::header::optional::<String>("content-type"))
        .and(limited_body())
        .then(move |ct: Option<String>, body| {
            let cfg = cfg.clone();
            async move { respond(callback(&cfg, ct.as_deref(), body).await) }
        })
        .boxed()
}

/// The parameters of a receipt, from a JSON object or a form, as strings.
fn params(content_type: Option<&str>, body: &[u8]) -> Result<BTreeMap<String, String>, ApiError> {
    if content_type.is_some_and(|c| c.starts_with("application/json")) {
        let v: Value = serde_json::from_slice(body)
            .map_err(|_| ApiError::InvalidJson("the body is not JSON".into()))?;
        let obj = v.as_object().ok_or(ApiError::InvalidCallback)?;
        return Ok(obj
            .iter()
            .map(|(k, v)| {
                let s = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                (k.clone(), s)
            })
            .collect());
    }
    Ok(url::form_urlencoded::parse(body).into_owned().collect())
}

fn mac(secret: &str, params: &BTreeMap<String, String>) -> Hmac<sha2::Sha256> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    for (k, v) in params.iter().filter(|(k, _)| *k != SIGNATURE_PARAM) {
        mac.update(format!("&{k}={}", v.replace(['&', '='], "_")).as_bytes());
    }
    mac
}

/// The `sig` Vonage sends with `params` (hex, lower case; Vonage's may be upper case).
pub fn signature(secret: &str, params: &BTreeMap<String, String>) -> String {
    actors::domain::to_hex(&mac(secret, params).finalize().into_bytes())
}

/// Constant-time check of `sig`, in either case.
pub fn valid(secret: &str, params: &BTreeMap<String, String>, given: &str) -> bool {
    let given = given.trim();
    if !given.len().is_multiple_of(2) {
        return false;
    }
    let bytes: Option<Vec<u8>> = (0..given.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(given.get(i..i + 2)?, 16).ok())
        .collect();
    bytes.is_some_and(|b| mac(secret, params).verify_slice(&b).is_ok())
}

/// Vonage's receipt `status` → ours; `accepted`, `buffered` and `unknown` are not final.
pub fn status(s: &str) -> Option<Status> {
    match s {
        "delivered" => Some(Status::Delivered),
        "expired" | "failed" | "rejected" => Some(Status::Undelivered),
        _ => None,
    }
}

async fn callback(
    cfg: &CallbackConfig,
    content_type: Option<&str>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let secret = cfg.vonage_signature_secret.expose_secret();
    if secret.is_empty() {
        return Err(ApiError::CallbacksNotConfigured);
    }
    let p = params(content_type, &body)?;
    let sig = p
        .get(SIGNATURE_PARAM)
        .ok_or(ApiError::Unsigned(SIGNATURE_PARAM))?;
    if !valid(secret, &p, sig) {
        return Err(ApiError::BadSignature(SIGNATURE_PARAM));
    }
    let (Some(id), Some(st)) = (p.get("messageId"), p.get("status")) else {
        return Err(ApiError::InvalidCallback);
    };
    let Some(status) = status(st) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let err = p
        .get("err-code")
        .filter(|c| !c.is_empty() && *c != "0")
        .map(|c| (c.to_string(), format!("Vonage reported {st} (error {c})")));
    record(cfg.apply_timeout, NAME, "vonage-receipt", id, status, err).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> BTreeMap<String, String> {
        [
            ("msisdn", "15557654321"),
            ("to", "15550001111"),
            ("messageId", "0A0000000123ABCD1"),
            ("status", "delivered"),
            ("err-code", "0"),
            ("client-ref", "65f0&x=1"),
            ("timestamp", "1764322800"),
            ("nonce", "4b0e9d7e-5b4a-4e62-9c43-1c6f0b5a8e11"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The expected value computed with Python's hmac/hashlib from the documented rule:
    /// hmac.new(b"secret", "".join(f"&{k}={v.replace('&','_').replace('=','_')}" for k, v
    /// in sorted(params.items())).encode(), hashlib.sha256).hexdigest()
    #[test]
    fn signature_matches_an_independent_implementation() {
        let p = receipt();
        assert_eq!(
            signature("secret", &p),
            "852e5699bdff966f317f0912e65ecd0c3b1ecfb332a28cd902855a51919cbdcf"
        );
        let mut signed = p.clone();
        signed.insert("sig".into(), signature("secret", &p).to_uppercase());
        assert!(valid("secret", &signed, &signed["sig"]));
        let mut tampered = signed.clone();
        tampered.insert("status".into(), "failed".into());
        assert!(!valid("secret", &tampered, &signed["sig"]));
        assert!(!valid("other", &signed, &signed["sig"]));
        assert!(!valid("secret", &signed, "zz"));
    }

    #[test]
    fn statuses() {
        assert_eq!(status("delivered"), Some(Status::Delivered));
        for s in ["expired", "failed", "rejected"] {
            assert_eq!(status(s), Some(Status::Undelivered), "{s}");
        }
        for s in ["accepted", "buffered", "unknown", ""] {
            assert_eq!(status(s), None, "{s}");
        }
    }
}
