//! Twilio Programmable Messaging: `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`,
//! form-encoded `To`, `Body` and `MessagingServiceSid` (or `From`), HTTP basic auth with the
//! Account SID and auth token. Success is `201` with the Message resource (`sid`); errors are
//! `{"code", "message", "more_info", "status"}`.

use super::{classify_twilio, network_error, retry_after};
use actors::domain::{OutboundMessage, ProviderError, ProviderReceipt};
use actors::ports::Provider;
use async_trait::async_trait;
use serde_json::Value;

/// The provider name on records, metrics and receipts.
pub const NAME: &str = "twilio";

pub struct Twilio {
    http: reqwest::Client,
    url: String,
    account_sid: String,
    auth_token: String,
    messaging_service_sid: Option<String>,
    status_callback: Option<String>,
}

impl Twilio {
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        account_sid: &str,
        auth_token: &str,
        messaging_service_sid: &str,
        status_callback: Option<String>,
    ) -> Twilio {
        Twilio {
            http,
            url: format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                api_base.trim_end_matches('/'),
                account_sid
            ),
            account_sid: account_sid.into(),
            auth_token: auth_token.into(),
            messaging_service_sid: Some(messaging_service_sid.to_string())
                .filter(|s| !s.is_empty()),
            status_callback,
        }
    }
}

#[async_trait]
impl Provider for Twilio {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn send(&self, msg: &OutboundMessage) -> Result<ProviderReceipt, ProviderError> {
        let mut form: Vec<(&str, &str)> = vec![("To", &msg.to), ("Body", &msg.body)];
        match &self.messaging_service_sid {
            Some(sid) => form.push(("MessagingServiceSid", sid)),
            None => form.push(("From", &msg.from)),
        }
        if let Some(cb) = &self.status_callback {
            form.push(("StatusCallback", cb));
        }
        let res = self
            .http
            .post(&self.url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&form)
            .send()
            .await
            .map_err(|e| network_error("twilio", &e))?;
        let status = res.status().as_u16();
        let ra = retry_after(res.headers());
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(ProviderReceipt {
                provider_message_id: body.get("sid").and_then(Value::as_str).map(str::to_string),
            });
        }
        let code = body.get("code").and_then(Value::as_i64);
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(ProviderError {
            class: classify_twilio(status, code, ra),
            rate_limited: status == 429 || code == Some(20429),
            code: Some(
                code.map(|c| c.to_string())
                    .unwrap_or_else(|| format!("http-{status}")),
            ),
            message,
        })
    }
}
