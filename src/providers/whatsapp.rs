//! Meta WhatsApp Cloud API: `POST {base}/{phone-number-id}/messages` with a bearer token and
//! `{"messaging_product":"whatsapp","recipient_type":"individual","to":...,"type":"text",
//! "text":{"body":...}}`. Success is `200` with `messages[0].id`; errors are
//! `{"error":{"message","type","code","error_data","fbtrace_id"}}`. The Cloud API offers no
//! way to ask whether a message was taken, so `lookup` keeps the port's default ("cannot
//! tell") and a message whose earlier attempt is unknown is sent again, flagged.

use super::scrub::Scrub;
use super::{classify_meta, network_error, retry_after, status_ambiguity};
use actors::domain::{OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

/// The provider name on records, metrics and receipts.
pub const NAME: &str = "meta-whatsapp";

pub struct WhatsApp {
    http: reqwest::Client,
    url: String,
    token: SecretString,
    scrub: Scrub,
}

impl WhatsApp {
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        phone_number_id: &str,
        token: SecretString,
    ) -> WhatsApp {
        WhatsApp {
            http,
            url: format!(
                "{}/{}/messages",
                api_base.trim_end_matches('/'),
                phone_number_id
            ),
            scrub: Scrub::new([
                (phone_number_id, "<phone-number-id>"),
                (token.expose_secret(), "<secret>"),
            ]),
            token,
        }
    }
}

#[async_trait]
impl Provider for WhatsApp {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Errors scrubbed of our identifiers (see [`Scrub`]): they are stored on records.
    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        self.send_raw(msg).await.map_err(|e| self.scrub.error(e))
    }
}

impl WhatsApp {
    async fn send_raw(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let body = json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": msg.to,
            "type": "text",
            "text": {"preview_url": false, "body": msg.body},
        });
        let res = self
            .http
            .post(&self.url)
            .bearer_auth(self.token.expose_secret())
            .json(&body)
            .send()
            .await
            .map_err(|e| network_error("meta-whatsapp", &e))?;
        let status = res.status().as_u16();
        let ra = retry_after(res.headers());
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(ProviderReceipt {
                provider_message_id: body
                    .pointer("/messages/0/id")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
        let code = body.pointer("/error/code").and_then(Value::as_i64);
        let mut message = body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        if let Some(details) = body
            .pointer("/error/error_data/details")
            .and_then(Value::as_str)
        {
            message = format!("{message}: {details}");
        }
        Err(ProviderError {
            class: classify_meta(status, code, ra),
            ambiguous: status_ambiguity(status, code.is_some()),
            rate_limited: status == 429
                || matches!(code, Some(4) | Some(80007) | Some(130429) | Some(131056)),
            code: Some(
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| format!("http-{status}")),
            ),
            message,
        })
    }
}
