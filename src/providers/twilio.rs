//! Twilio Programmable Messaging: `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`,
//! form-encoded `To`, `Body` and `MessagingServiceSid` (or `From`), HTTP basic auth with the
//! Account SID and auth token. Success is `201` with the Message resource (`sid`); errors are
//! `{"code", "message", "more_info", "status"}`.
//!
//! Twilio's Messages API has no idempotency key. When an attempt's outcome is unknown
//! (timeout, reset, a 502/503/504 without Twilio's body), `lookup` reads Twilio's list of
//! Message resources (`GET .../Messages.json?To=&From=&DateSent>=`, newest first, paged by
//! `next_page_uri`) and looks for ours: same `to`, same `from` (unless a Messaging
//! Service picks the sender), same body, created no earlier than the unknown attempt.
//! What it cannot rule out: an identical body sent to the same number by something else
//! in that window would be taken for ours.

use super::scrub::Scrub;
use super::{classify_twilio, network_error, retry_after, status_ambiguity};
use actors::domain::{Lookup, OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// The provider name on records, metrics and receipts.
pub const NAME: &str = "twilio";

/// The same API sending WhatsApp messages (`whatsapp:`-prefixed addresses).
pub const WHATSAPP_NAME: &str = "twilio-whatsapp";

/// Pages of the list read at most per lookup (of `LOOKUP_PAGE_SIZE` messages each); a
/// lookup that reaches the end of them without finding ours cannot tell.
const LOOKUP_PAGES: usize = 5;
const LOOKUP_PAGE_SIZE: &str = "100";

pub struct Twilio {
    /// [`NAME`], or [`WHATSAPP_NAME`] when the addresses carry the `whatsapp:` prefix.
    name: &'static str,
    http: reqwest::Client,
    /// `{api_base}`, to which the list's `next_page_uri` is relative.
    base: String,
    url: String,
    account_sid: String,
    auth_token: SecretString,
    messaging_service_sid: Option<String>,
    status_callback: Option<String>,
    scrub: Scrub,
}

impl Twilio {
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        account_sid: &str,
        auth_token: SecretString,
        messaging_service_sid: &str,
        status_callback: Option<String>,
    ) -> Twilio {
        Twilio {
            name: NAME,
            http,
            base: api_base.trim_end_matches('/').to_string(),
            url: format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                api_base.trim_end_matches('/'),
                account_sid
            ),
            account_sid: account_sid.into(),
            messaging_service_sid: Some(messaging_service_sid.to_string())
                .filter(|s| !s.is_empty()),
            status_callback,
            // Evaluated before `auth_token` moves in below.
            scrub: Scrub::new([
                (account_sid, "<account>"),
                (auth_token.expose_secret(), "<secret>"),
                (messaging_service_sid, "<messaging service>"),
            ]),
            auth_token,
        }
    }
}

impl Twilio {
    /// The same client sending WhatsApp messages: Twilio's Messages API with
    /// `whatsapp:+…` in `To` and `From` (<https://www.twilio.com/docs/whatsapp/api>).
    pub fn for_whatsapp(self) -> Twilio {
        Twilio {
            name: WHATSAPP_NAME,
            ..self
        }
    }

    /// A number as this client sends it: `whatsapp:+…` for WhatsApp.
    fn address(&self, number: &str) -> String {
        if self.name == WHATSAPP_NAME && !number.starts_with("whatsapp:") {
            format!("whatsapp:{number}")
        } else {
            number.to_string()
        }
    }
}

/// How a message names its sender to Twilio.
#[derive(Debug, PartialEq)]
enum Sender<'a> {
    /// A Messaging Service picks the number: the message's `from` when it is a tenant's
    /// Messaging Service SID, else the service-wide `MSG_ID`.
    Service(&'a str),
    From(&'a str),
}

impl Twilio {
    fn sender<'a>(&'a self, msg: &'a OutboundMessage) -> Sender<'a> {
        if crate::tenants::is_messaging_service_sid(&msg.from) {
            return Sender::Service(&msg.from);
        }
        match &self.messaging_service_sid {
            Some(sid) => Sender::Service(sid),
            None => Sender::From(&msg.from),
        }
    }

    /// `msg` with its addresses as Twilio has them (see [`Twilio::address`]).
    fn addressed(&self, msg: &OutboundMessage) -> OutboundMessage {
        OutboundMessage {
            to: self.address(&msg.to),
            from: if crate::tenants::is_messaging_service_sid(&msg.from) {
                msg.from.clone()
            } else {
                self.address(&msg.from)
            },
            ..msg.clone()
        }
    }

    /// One request with Twilio's basic auth: the JSON body of a 2xx answer, else Twilio's
    /// error (see [`classify_twilio`]; a 502/503/504 without Twilio's body is ambiguous).
    /// Errors scrubbed of our identifiers (see [`Scrub`]): they are stored on records.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
        self.call_raw(request)
            .await
            .map_err(|e| self.scrub.error(e))
    }

    async fn call_raw(&self, request: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
        let res = request
            .basic_auth(&self.account_sid, Some(self.auth_token.expose_secret()))
            .send()
            .await
            .map_err(|e| network_error("twilio", &e))?;
        let status = res.status().as_u16();
        let ra = retry_after(res.headers());
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let code = body.get("code").and_then(Value::as_i64);
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(ProviderError {
            class: classify_twilio(status, code, ra),
            ambiguous: status_ambiguity(status, code.is_some()),
            rate_limited: status == 429 || code == Some(20429),
            code: Some(
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| format!("http-{status}")),
            ),
            message,
        })
    }
}

/// The SID of our message in one page of Twilio's Messages list: same `to`, same `from`
/// (when we name the sender), same body, and `date_created` (RFC 2822) no earlier than
/// `since`.
pub fn find_ours(
    page: &Value,
    msg: &OutboundMessage,
    from: Option<&str>,
    since: DateTime<Utc>,
) -> Option<String> {
    page.get("messages")?
        .as_array()?
        .iter()
        .find(|m| {
            let created = m
                .get("date_created")
                .and_then(Value::as_str)
                .and_then(|d| DateTime::parse_from_rfc2822(d).ok());
            m.get("to").and_then(Value::as_str) == Some(msg.to.as_str())
                && m.get("body").and_then(Value::as_str) == Some(msg.body.as_str())
                && from.is_none_or(|f| m.get("from").and_then(Value::as_str) == Some(f))
                && created.is_some_and(|c| c >= since)
        })
        .and_then(|m| m.get("sid")?.as_str().map(str::to_string))
}

#[async_trait]
impl Provider for Twilio {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn lookup(
        &self,
        msg: &OutboundMessage,
        since: DateTime<Utc>,
    ) -> Result<Lookup, ProviderError> {
        let msg = &self.addressed(msg);
        let from = match self.sender(msg) {
            Sender::Service(_) => None,
            Sender::From(f) => Some(f),
        };
        let day = since.format("%Y-%m-%d").to_string();
        let mut query = vec![
            ("To", msg.to.as_str()),
            ("DateSent>", day.as_str()),
            ("PageSize", LOOKUP_PAGE_SIZE),
        ];
        if let Some(f) = from {
            query.push(("From", f));
        }
        let mut request = self.http.get(&self.url).query(&query);
        for _ in 0..LOOKUP_PAGES {
            let page = self.call(request).await?;
            if let Some(sid) = find_ours(&page, msg, from, since) {
                return Ok(Lookup::Found(ProviderReceipt {
                    provider_message_id: Some(sid),
                }));
            }
            match page.get("next_page_uri").and_then(Value::as_str) {
                Some(next) => request = self.http.get(format!("{}{next}", self.base)),
                None => return Ok(Lookup::NotFound),
            }
        }
        Ok(Lookup::CannotTell)
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let msg = &self.addressed(msg);
        let mut form: Vec<(&str, &str)> = vec![("To", &msg.to), ("Body", &msg.body)];
        match self.sender(msg) {
            Sender::Service(sid) => form.push(("MessagingServiceSid", sid)),
            Sender::From(from) => form.push(("From", from)),
        }
        if let Some(cb) = &self.status_callback {
            form.push(("StatusCallback", cb));
        }
        let body = self.call(self.http.post(&self.url).form(&form)).await?;
        Ok(ProviderReceipt {
            provider_message_id: body.get("sid").and_then(Value::as_str).map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(body: &str) -> OutboundMessage {
        OutboundMessage {
            communication_id: "65f000000000000000000001".into(),
            from: "+15550001111".into(),
            to: "+15557654321".into(),
            subject: None,
            body: body.into(),
            html: None,
        }
    }

    /// A page as Twilio documents it (Read multiple Message resources), newest first.
    fn page() -> Value {
        let m = |sid: &str, from: &str, body: &str, created: &str| {
            json!({"sid": sid, "to": "+15557654321", "from": from, "body": body,
                   "status": "delivered", "date_created": created, "date_sent": created})
        };
        json!({
            "messages": [
                m("SM3", "+15550001111", "hello", "Sat, 28 Nov 2026 09:10:05 +0000"),
                m("SM2", "+15559999999", "other sender", "Sat, 28 Nov 2026 09:10:03 +0000"),
                m("SM1", "+15550001111", "too old", "Sat, 28 Nov 2026 08:00:00 +0000"),
            ],
            "page": 0, "page_size": 50, "start": 0, "end": 2,
            "uri": "/2010-04-01/Accounts/AC1/Messages.json?To=%2B15557654321&PageSize=50&Page=0",
            "first_page_uri": "/2010-04-01/Accounts/AC1/Messages.json?To=%2B15557654321&PageSize=50&Page=0",
            "next_page_uri": null, "previous_page_uri": null,
        })
    }

    #[test]
    fn a_messaging_service_sid_as_from_is_sent_as_the_service() {
        let http = reqwest::Client::new();
        let t = |mss: &str| Twilio::new(http.clone(), "http://x", "AC1", "t".into(), mss, None);
        let mut m = msg("x");
        assert_eq!(t("").sender(&m), Sender::From("+15550001111"));
        assert_eq!(t("MGservice").sender(&m), Sender::Service("MGservice"));
        m.from = "MG0123456789abcdef0123456789abcdef".into();
        assert_eq!(
            t("MGservice").sender(&m),
            Sender::Service("MG0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn whatsapp_numbers_carry_the_prefix() {
        let http = reqwest::Client::new();
        let t = Twilio::new(http, "http://x", "AC1", "t".into(), "", None).for_whatsapp();
        let m = t.addressed(&msg("x"));
        assert_eq!(
            (m.to.as_str(), m.from.as_str()),
            ("whatsapp:+15557654321", "whatsapp:+15550001111")
        );
        assert_eq!(t.name(), WHATSAPP_NAME);
    }

    #[test]
    fn our_message_is_told_by_recipient_sender_body_and_time() {
        let since = DateTime::parse_from_rfc3339("2026-11-28T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let from = Some("+15550001111");
        let rows = [
            ("hello", from, Some("SM3")),
            ("other sender", from, None),
            // A Messaging Service picks the sender: it is not compared.
            ("other sender", None, Some("SM2")),
            ("too old", from, None),
            ("never sent", from, None),
        ];
        for (body, from, want) in rows {
            assert_eq!(
                find_ours(&page(), &msg(body), from, since).as_deref(),
                want,
                "{body}"
            );
        }
        assert_eq!(find_ours(&json!({}), &msg("hello"), from, since), None);
    }
}
