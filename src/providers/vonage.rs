//! Vonage SMS API: `POST {base}/sms/json`, form-encoded `api_key`, `api_secret`, `from`,
//! `to` (international format without the `+`), `text`, `type=unicode` for text outside
//! ASCII, `client-ref` (our communication id, so a delivery receipt names it too) and
//! `callback` (where the delivery receipt goes, when the service knows its public URL).
//!
//! The answer is `200` even when the message was refused: `{"message-count": "1",
//! "messages": [{"to", "message-id", "status": "0", ...}]}`, one entry a part of a long
//! message, each with its own `status` (`"0"` taken, anything else refused, with
//! `error-text`; <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms>).
//! The record keeps the first part's `message-id`; a receipt names it.
//!
//! Vonage offers no way to ask whether a message was taken: `lookup` keeps the port's
//! default ("cannot tell"), so a message whose earlier attempt is unknown is sent again,
//! flagged.

use super::scrub::Scrub;
use super::{network_error, retry_after, status_ambiguity};
use actors::domain::{ErrorClass, OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::time::Duration;

/// The provider name on records, metrics and receipts.
pub const NAME: &str = "vonage";

pub struct Vonage {
    http: reqwest::Client,
    url: String,
    api_key: String,
    api_secret: SecretString,
    callback: Option<String>,
    scrub: Scrub,
}

impl Vonage {
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        api_key: &str,
        api_secret: SecretString,
        callback: Option<String>,
    ) -> Vonage {
        Vonage {
            http,
            url: format!("{}/sms/json", api_base.trim_end_matches('/')),
            scrub: Scrub::new([
                (api_key, "<api key>"),
                (api_secret.expose_secret(), "<secret>"),
            ]),
            api_key: api_key.into(),
            api_secret,
            callback,
        }
    }
}

/// Vonage's per-message `status` (the SMS API error table, linked above).
/// - 1 Throttled, 5 Internal Error, 10 Too Many Existing Binds, 13 Communication Failed:
///   retryable (the first with the rate limit's back-off).
/// - About the account or sender at Vonage (fail over): 4 Invalid Credentials, 8 Partner
///   Account Barred (the account is suspended), 9 Partner Quota Violation (not enough
///   credit), 11 Account Not Enabled For HTTP, 15 Invalid Sender Address (a sender ID not
///   authorised for this account), 29 Non-Whitelisted Destination (a demo account).
/// - About the message: 2 Missing Parameters, 3 Invalid Parameters, 6 Invalid Message,
///   7 Number Barred, 12 Message Too Long, 14 Invalid Signature, 22 Invalid Network Code,
///   23 Invalid Callback URL, 32/33 signature and number errors, and anything else:
///   permanent.
pub fn classify_vonage(status: &str) -> ErrorClass {
    match status {
        "1" => ErrorClass::Retryable {
            retry_after: Some(Duration::from_secs(1)),
        },
        "5" | "10" | "13" => ErrorClass::Retryable { retry_after: None },
        "4" | "8" | "9" | "11" | "15" | "29" => ErrorClass::Account,
        _ => ErrorClass::Permanent,
    }
}

/// The number as Vonage wants it: international format, no `+`.
fn bare(number: &str) -> &str {
    number.strip_prefix('+').unwrap_or(number)
}

/// The form fields of one message.
fn form<'a>(
    msg: &'a OutboundMessage,
    api_key: &'a str,
    api_secret: &'a str,
    callback: Option<&'a str>,
) -> Vec<(&'static str, &'a str)> {
    let mut form = vec![
        ("api_key", api_key),
        ("api_secret", api_secret),
        ("from", bare(&msg.from)),
        ("to", bare(&msg.to)),
        ("text", msg.body.as_str()),
        ("client-ref", msg.communication_id.as_str()),
    ];
    if !msg.body.is_ascii() {
        form.push(("type", "unicode"));
    }
    if let Some(cb) = callback {
        form.push(("callback", cb));
    }
    form
}

/// The answer to a `200`: the first part's `message-id`, or the first refused part's error.
fn read_answer(body: &Value) -> Result<ProviderReceipt, ProviderError> {
    let parts = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| malformed("no messages in the answer"))?;
    let field = |p: &Value, k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
    if let Some(refused) = parts
        .iter()
        .find(|p| field(p, "status").as_deref() != Some("0"))
    {
        let status = field(refused, "status").unwrap_or_default();
        return Err(ProviderError {
            class: classify_vonage(&status),
            ambiguous: None,
            rate_limited: status == "1",
            message: field(refused, "error-text").unwrap_or_else(|| format!("status {status}")),
            code: Some(status),
        });
    }
    Ok(ProviderReceipt {
        provider_message_id: field(&parts[0], "message-id"),
    })
}

/// A `200` whose body is not the documented answer: the message may have been taken.
fn malformed(what: &str) -> ProviderError {
    ProviderError {
        class: ErrorClass::Retryable { retry_after: None },
        ambiguous: Some(actors::domain::Ambiguity::Gateway5xx),
        rate_limited: false,
        code: Some("malformed-answer".into()),
        message: format!("Vonage answered 200 with {what}"),
    }
}

#[async_trait]
impl Provider for Vonage {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Errors scrubbed of our identifiers (see [`Scrub`]): they are stored on records.
    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        self.send_raw(msg).await.map_err(|e| self.scrub.error(e))
    }
}

impl Vonage {
    async fn send_raw(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let fields = form(
            msg,
            &self.api_key,
            self.api_secret.expose_secret(),
            self.callback.as_deref(),
        );
        let res = self
            .http
            .post(&self.url)
            .form(&fields)
            .send()
            .await
            .map_err(|e| network_error(NAME, &e))?;
        let status = res.status().as_u16();
        let ra = retry_after(res.headers());
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if status == 200 {
            return read_answer(&body);
        }
        // Not the SMS API's own answer: something in front of it, or an outage.
        let class = if status == 429 || status >= 500 {
            ErrorClass::Retryable { retry_after: ra }
        } else {
            ErrorClass::Permanent
        };
        Err(ProviderError {
            class,
            ambiguous: status_ambiguity(status, false),
            rate_limited: status == 429,
            code: Some(format!("http-{status}")),
            message: format!("Vonage answered HTTP {status}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vonage_table() {
        let r = |ra| ErrorClass::Retryable { retry_after: ra };
        assert_eq!(classify_vonage("1"), r(Some(Duration::from_secs(1))));
        for s in ["5", "10", "13"] {
            assert_eq!(classify_vonage(s), r(None), "{s}");
        }
        for s in ["2", "3", "6", "7", "12", "14", "22"] {
            assert_eq!(classify_vonage(s), ErrorClass::Permanent, "{s}");
        }
        for s in ["4", "8", "9", "11", "15", "29"] {
            assert_eq!(classify_vonage(s), ErrorClass::Account, "{s}");
        }
    }

    #[test]
    fn answers_are_read_per_part() {
        let ok = json!({"message-count": "2", "messages": [
            {"to": "15557654321", "message-id": "0A0000000123ABCD1", "status": "0"},
            {"to": "15557654321", "message-id": "0A0000000123ABCD2", "status": "0"}]});
        assert_eq!(
            read_answer(&ok).unwrap().provider_message_id.as_deref(),
            Some("0A0000000123ABCD1")
        );
        let throttled = json!({"message-count": "1", "messages": [
            {"status": "1", "error-text": "Throughput Rate Exceeded - please wait [ 30 ] and retry"}]});
        let e = read_answer(&throttled).unwrap_err();
        assert!(
            e.rate_limited && matches!(e.class, ErrorClass::Retryable { .. }),
            "{e:?}"
        );
        assert_eq!(e.code.as_deref(), Some("1"));
        let barred = json!({"message-count": "1", "messages": [
            {"status": "7", "error-text": "Number barred."}]});
        let e = read_answer(&barred).unwrap_err();
        assert_eq!(
            (e.class, e.message.as_str()),
            (ErrorClass::Permanent, "Number barred.")
        );
        assert!(read_answer(&json!({})).unwrap_err().ambiguous.is_some());
    }

    #[test]
    fn numbers_go_without_plus_and_unicode_is_marked() {
        let mut m = OutboundMessage {
            communication_id: "65f000000000000000000001".into(),
            from: "+15550001111".into(),
            to: "+15557654321".into(),
            subject: None,
            body: "hello".into(),
            html: None,
        };
        let f = form(&m, "k", "s", None);
        assert!(f.contains(&("to", "15557654321")) && f.contains(&("from", "15550001111")));
        assert!(f.contains(&("client-ref", "65f000000000000000000001")));
        assert!(!f.iter().any(|(k, _)| *k == "type" || *k == "callback"));
        m.body = "grüezi".into();
        let f = form(&m, "k", "s", Some("https://x/cb"));
        assert!(f.contains(&("type", "unicode")) && f.contains(&("callback", "https://x/cb")));
    }
}
