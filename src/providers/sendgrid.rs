//! SendGrid v3 Mail Send: `POST {base}/v3/mail/send` with `Authorization: Bearer <key>` and
//! `{"personalizations":[{"to":[{"email"}],"custom_args":{"communicationId"}}],"from":{"email"},
//! "subject","content":[{"type":"text/plain","value"}]}`. Success is `202 Accepted` with the
//! message's id in `X-Message-Id` (the event webhook's `sg_message_id` starts with it);
//! errors are `{"errors":[{"message","field","help"}]}`
//! (<https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send>).
//!
//! - 429: the rate limit; `X-RateLimit-Reset` (a Unix time) says when it lifts.
//! - 5xx: retryable (a 502/503/504 without SendGrid's body may have been taken: ambiguous).
//! - 401 (the API key is invalid, or not allowed to send mail) and 403 (the from address
//!   is not a verified Sender Identity, or the key lacks the Mail Send scope): about the
//!   account or sender at SendGrid, failed over to the next provider.
//! - 400, 413 and other 4xx: permanent, about the message.
//!
//! Mail Send has no way to ask whether a message was taken (the Email Activity API is a
//! paid add-on): `lookup` keeps the port's default, so an unknown attempt is sent again,
//! flagged.

use super::scrub::Scrub;
use super::{network_error, retry_after, status_ambiguity};
use actors::domain::{ErrorClass, OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use std::time::Duration;

/// The provider name on records, metrics and receipts.
pub const NAME: &str = "sendgrid";

pub struct SendGrid {
    http: reqwest::Client,
    url: String,
    api_key: SecretString,
    default_subject: String,
    scrub: Scrub,
}

impl SendGrid {
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        api_key: SecretString,
        default_subject: &str,
    ) -> SendGrid {
        SendGrid {
            http,
            url: format!("{}/v3/mail/send", api_base.trim_end_matches('/')),
            scrub: Scrub::new([(api_key.expose_secret(), "<secret>")]),
            api_key,
            default_subject: default_subject.into(),
        }
    }

    /// The Mail Send body; an HTML part goes after the text one (SendGrid wants
    /// `text/plain` first when both are given).
    fn body(&self, msg: &OutboundMessage) -> Value {
        let mut content = vec![json!({"type": "text/plain", "value": msg.body})];
        if let Some(h) = &msg.html {
            content.push(json!({"type": "text/html", "value": h}));
        }
        json!({
            "personalizations": [{
                "to": [{"email": msg.to}],
                "custom_args": {"communicationId": msg.communication_id},
            }],
            "from": {"email": msg.from},
            "subject": msg.subject.as_deref().unwrap_or(&self.default_subject),
            "content": content,
        })
    }
}

/// HTTP status → what to do (the table above); `reset_in`: how long until
/// `X-RateLimit-Reset`.
pub fn classify_sendgrid(status: u16, reset_in: Option<Duration>) -> ErrorClass {
    match status {
        429 | 500..=599 => ErrorClass::Retryable {
            retry_after: reset_in,
        },
        401 | 403 => ErrorClass::Account,
        _ => ErrorClass::Permanent,
    }
}

/// `X-RateLimit-Reset` (seconds since the epoch) as a wait from `now`; `Retry-After` if
/// SendGrid sends that instead.
fn reset_in(headers: &reqwest::header::HeaderMap, now: i64) -> Option<Duration> {
    let reset = headers
        .get("x-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    match reset {
        Some(at) => Some(Duration::from_secs(at.saturating_sub(now).max(1) as u64)),
        None => retry_after(headers),
    }
}

/// The messages of SendGrid's error body, joined.
fn error_text(body: &Value) -> Option<String> {
    let errors = body.get("errors")?.as_array()?;
    let texts: Vec<String> = errors
        .iter()
        .filter_map(|e| {
            let m = e.get("message")?.as_str()?;
            Some(match e.get("field").and_then(Value::as_str) {
                Some(f) if !f.is_empty() => format!("{m} ({f})"),
                _ => m.to_string(),
            })
        })
        .collect();
    (!texts.is_empty()).then(|| texts.join("; "))
}

#[async_trait]
impl Provider for SendGrid {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Errors scrubbed of our identifiers (see [`Scrub`]): they are stored on records.
    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        self.send_raw(msg).await.map_err(|e| self.scrub.error(e))
    }
}

impl SendGrid {
    async fn send_raw(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let res = self
            .http
            .post(&self.url)
            .bearer_auth(self.api_key.expose_secret())
            .json(&self.body(msg))
            .send()
            .await
            .map_err(|e| network_error(NAME, &e))?;
        let status = res.status().as_u16();
        let wait = reset_in(res.headers(), chrono::Utc::now().timestamp());
        let id = res
            .headers()
            .get("x-message-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if (200..300).contains(&status) {
            return Ok(ProviderReceipt {
                provider_message_id: id,
            });
        }
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let text = error_text(&body);
        Err(ProviderError {
            class: classify_sendgrid(status, wait),
            ambiguous: status_ambiguity(status, text.is_some()),
            rate_limited: status == 429,
            code: Some(format!("http-{status}")),
            message: text.unwrap_or_else(|| format!("SendGrid answered HTTP {status}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendgrid_table() {
        let w = Some(Duration::from_secs(7));
        assert_eq!(
            classify_sendgrid(429, w),
            ErrorClass::Retryable { retry_after: w }
        );
        for s in [500, 502, 503, 504] {
            assert!(matches!(
                classify_sendgrid(s, None),
                ErrorClass::Retryable { .. }
            ));
        }
        for s in [400, 404, 413] {
            assert_eq!(classify_sendgrid(s, None), ErrorClass::Permanent, "{s}");
        }
        for s in [401, 403] {
            assert_eq!(classify_sendgrid(s, None), ErrorClass::Account, "{s}");
        }
    }

    #[test]
    fn the_rate_limit_reset_is_a_wait() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-reset", "1000007".parse().unwrap());
        assert_eq!(reset_in(&h, 1_000_000), Some(Duration::from_secs(7)));
        assert_eq!(reset_in(&h, 2_000_000), Some(Duration::from_secs(1)));
        assert_eq!(reset_in(&reqwest::header::HeaderMap::new(), 0), None);
    }

    #[test]
    fn error_bodies_are_read_as_documented() {
        let b = json!({"errors": [
            {"message": "The from email does not contain a valid address.", "field": "from.email", "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.from"},
            {"message": "Authorization required", "field": null}]});
        assert_eq!(
            error_text(&b).as_deref(),
            Some("The from email does not contain a valid address. (from.email); Authorization required")
        );
        assert_eq!(error_text(&json!({"errors": []})), None);
    }

    #[test]
    fn the_request_names_our_id_for_the_events() {
        let sg = SendGrid::new(reqwest::Client::new(), "http://x", "k".into(), "Message");
        let b = sg.body(&OutboundMessage {
            communication_id: "65f000000000000000000001".into(),
            from: "a@example.com".into(),
            to: "b@example.com".into(),
            subject: None,
            body: "hi".into(),
            html: Some("<p>hi</p>".into()),
        });
        assert_eq!(
            b["personalizations"][0]["custom_args"]["communicationId"],
            "65f000000000000000000001"
        );
        assert_eq!(b["subject"], "Message");
        assert_eq!(
            b["content"],
            json!([{"type": "text/plain", "value": "hi"}, {"type": "text/html", "value": "<p>hi</p>"}])
        );
    }
}
