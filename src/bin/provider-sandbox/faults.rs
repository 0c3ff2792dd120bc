//! The fault knobs: per provider, a latency, and a share of requests answered with an
//! outage (`5xx`, `429`), a hang, or a fixed error in the provider's own body; or taken
//! and answered late (`late`: the message is accepted at once, the answer comes after
//! `latency_ms`, as when a provider is slow to reply) or by a proxy (`gateway`: the
//! message is accepted, the answer is a bare `502 Bad Gateway`, as when a proxy in front
//! of the provider loses the answer).

use crate::sendgrid::sendgrid_error;
use crate::twilio::twilio_error;
use crate::vonage::vonage_refusal;
use crate::whatsapp::meta_error;
use crate::{json_status, Sandbox};
use serde::Deserialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Fault {
    provider: String,
    #[serde(default = "none_mode")]
    mode: String,
    status: Option<u16>,
    code: Option<u32>,
    message: Option<String>,
    retry_after: Option<u64>,
    #[serde(default)]
    latency_ms: u64,
    #[serde(default = "one")]
    rate: f64,
}

fn none_mode() -> String {
    "none".into()
}

fn one() -> f64 {
    1.0
}

fn with_retry_after(mut r: Response, secs: Option<u64>) -> Response {
    if let Some(s) = secs {
        r.headers_mut().insert(
            warp::http::header::RETRY_AFTER,
            warp::http::HeaderValue::from_str(&s.to_string()).unwrap(),
        );
    }
    r
}

/// Apply the provider's fault, if any: `Some(answer)` short-cuts the request.
pub async fn fault_for(sb: &Sandbox, provider: &str) -> Option<Response> {
    let f = sb.faults.lock().unwrap().get(provider).cloned()?;
    if f.mode == "late" || f.mode == "gateway" {
        return None;
    }
    if f.latency_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(f.latency_ms)).await;
    }
    if f.mode == "none" || rand::random::<f64>() >= f.rate {
        return None;
    }
    Some(match (provider, f.mode.as_str()) {
        (_, "hang") => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            json_status(json!({}), StatusCode::GATEWAY_TIMEOUT)
        }
        (_, "429") => with_retry_after(throttled(provider), f.retry_after),
        (_, "5xx") => with_retry_after(outage(provider, f.status.unwrap_or(503)), f.retry_after),
        _ => {
            let status = f.status.unwrap_or(400);
            let msg = f.message.clone().unwrap_or_else(|| "Injected error".into());
            match provider {
                "twilio" => twilio_error(status, f.code.unwrap_or(21211), &msg),
                "vonage" => vonage_refusal(f.code.unwrap_or(6), &msg),
                "sendgrid" => sendgrid_error(status, &msg, None),
                _ => meta_error(status, f.code.unwrap_or(131026), &msg, &msg),
            }
        }
    })
}

/// Each provider's "too many requests" (Vonage's is status 1 in a `200`).
fn throttled(provider: &str) -> Response {
    match provider {
        "twilio" => twilio_error(429, 20429, "Too Many Requests"),
        "vonage" => vonage_refusal(1, "Throughput Rate Exceeded - please wait [ 1 ] and retry"),
        "sendgrid" => sendgrid_error(429, "too many requests", None),
        _ => meta_error(
            429,
            130429,
            "Rate limit hit",
            "Cloud API message throughput has been reached.",
        ),
    }
}

/// Each provider's outage answer with HTTP `status`.
fn outage(provider: &str, status: u16) -> Response {
    match provider {
        "twilio" => twilio_error(status, 20500, "An internal server error has occurred"),
        "vonage" => json_status(json!({}), StatusCode::from_u16(status).unwrap()),
        "sendgrid" => sendgrid_error(status, "Service Unavailable", None),
        _ => meta_error(
            status,
            131016,
            "Service unavailable",
            "A service is temporarily unavailable.",
        ),
    }
}

/// What becomes of the answer of a request that is otherwise handled as usual (the
/// message is taken first).
pub enum AfterTaking {
    /// `late`: held this long.
    Late(std::time::Duration),
    /// `gateway`: replaced by a proxy's `502 Bad Gateway`, without the provider's body.
    Gateway,
}

/// Under the `late` or `gateway` knob (for the share `rate` of requests), what becomes of
/// the answer.
pub fn after_taking(sb: &Sandbox, provider: &str) -> Option<AfterTaking> {
    let f = sb.faults.lock().unwrap().get(provider).cloned()?;
    if rand::random::<f64>() >= f.rate {
        return None;
    }
    match f.mode.as_str() {
        "late" => Some(AfterTaking::Late(std::time::Duration::from_millis(
            f.latency_ms,
        ))),
        "gateway" => Some(AfterTaking::Gateway),
        _ => None,
    }
}

/// The answer, as `after` makes it.
pub async fn answer_after(after: Option<AfterTaking>, answer: Response) -> Response {
    match after {
        None => answer,
        Some(AfterTaking::Late(d)) => {
            tokio::time::sleep(d).await;
            answer
        }
        Some(AfterTaking::Gateway) => warp::reply::with_status(
            warp::reply::html("<html><body><h1>502 Bad Gateway</h1></body></html>"),
            StatusCode::BAD_GATEWAY,
        )
        .into_response(),
    }
}

impl Sandbox {
    pub fn set_fault(&self, f: Fault) -> Response {
        if !["twilio", "whatsapp", "vonage", "sendgrid"].contains(&f.provider.as_str()) {
            return json_status(
                json!({"error": "provider must be twilio, whatsapp, vonage or sendgrid"}),
                StatusCode::BAD_REQUEST,
            );
        }
        self.faults
            .lock()
            .unwrap()
            .insert(f.provider.clone(), f.clone());
        json_status(json!({"fault": f}), StatusCode::OK)
    }
}
