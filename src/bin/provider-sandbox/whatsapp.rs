//! Meta's WhatsApp Cloud API `POST /{version}/{phone-number-id}/messages`: bearer token,
//! JSON body, the checks the Cloud API makes (with Meta's error codes), the answer, and the
//! signed status webhooks.

use crate::{json_status, Refusal, Sandbox, CALLBACK_PAUSE};
use actors::domain::is_e164;
use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::Response;

pub fn meta_error(status: u16, code: u32, message: &str, details: &str) -> Response {
    json_status(
        json!({"error": {"message": message, "type": "OAuthException", "code": code,
               "error_data": {"messaging_product": "whatsapp", "details": details},
               "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW"}}),
        StatusCode::from_u16(status).unwrap(),
    )
}

/// A WhatsApp request that passed Meta's checks.
struct WhatsAppRequest<'a> {
    to: &'a str,
    text: &'a str,
    /// `to` with its `+`.
    normalized: String,
}

impl WhatsAppRequest<'_> {
    fn wa_id(&self) -> &str {
        self.normalized.trim_start_matches('+')
    }
}

impl Sandbox {
    /// Meta's `messages`: the checks the Cloud API makes, then the answer, and the status
    /// webhooks if a webhook URL is set.
    pub fn whatsapp(&self, phone_id: String, auth: Option<String>, body: Value) -> Response {
        let req = match self.whatsapp_request(&phone_id, auth.as_deref(), &body) {
            Ok(r) => r,
            Err(no) => return meta_error(no.status, no.code, &no.message, &no.details),
        };
        let wamid = format!("wamid.{}", self.next_hex(40));
        self.received.lock().unwrap().push(json!({
            "provider": "whatsapp", "id": wamid, "to": req.to, "body": req.text, "phoneNumberId": phone_id,
        }));
        let hook = self.whatsapp_webhook.lock().unwrap().clone();
        if let Some(url) = hook {
            self.whatsapp_webhooks(url, &req, &wamid, &phone_id);
        }
        json_status(
            json!({"messaging_product": "whatsapp",
                   "contacts": [{"input": req.to, "wa_id": req.wa_id()}],
                   "messages": [{"id": wamid}]}),
            StatusCode::OK,
        )
    }

    fn whatsapp_request<'a>(
        &self,
        phone_id: &str,
        auth: Option<&str>,
        body: &'a Value,
    ) -> Result<WhatsAppRequest<'a>, Refusal> {
        if auth.and_then(|a| a.strip_prefix("Bearer ")) != Some(self.wa_token.as_str()) {
            return Err(Refusal::new(
                401,
                190,
                "Invalid OAuth access token - Cannot parse access token",
                "Invalid OAuth access token",
            ));
        }
        if phone_id != self.phone_number_id {
            return Err(Refusal::new(400, 100, "Unsupported post request.", "Object with ID does not exist, cannot be loaded due to missing permissions, or does not support this operation"));
        }
        let missing = |what: &str, details: &str| {
            Refusal::new(
                400,
                100,
                &format!("(#100) The parameter {what} is required."),
                details,
            )
        };
        if body.get("messaging_product").and_then(Value::as_str) != Some("whatsapp") {
            return Err(missing(
                "messaging_product",
                "messaging_product must be \"whatsapp\"",
            ));
        }
        let Some(to) = body.get("to").and_then(Value::as_str) else {
            return Err(missing("to", "to is required"));
        };
        if body.get("type").and_then(Value::as_str).unwrap_or("text") != "text" {
            return Err(Refusal::new(
                400,
                131051,
                "Unsupported message type",
                "only text messages are simulated",
            ));
        }
        let Some(text) = body.pointer("/text/body").and_then(Value::as_str) else {
            return Err(missing("text['body']", "text.body is required"));
        };
        let req = WhatsAppRequest {
            to,
            text,
            normalized: if to.starts_with('+') {
                to.to_string()
            } else {
                format!("+{to}")
            },
        };
        if !is_e164(&req.normalized) {
            let details = format!("Invalid phone number {to}");
            return Err(Refusal::new(400, 100, "(#100) Invalid parameter", &details));
        }
        if req.normalized == "+15005550001" {
            return Err(Refusal::new(
                400,
                131026,
                "Message undeliverable",
                "Unable to deliver message: the recipient is not a WhatsApp user",
            ));
        }
        Ok(req)
    }

    /// Meta posts status webhooks, signed: `sent`, `delivered`, `read` (or `sent`, then
    /// `failed` with 131026 for +15005550004; only `sent` for +15005550007, a phone that
    /// is never reached).
    fn whatsapp_webhooks(&self, url: String, req: &WhatsAppRequest, wamid: &str, phone_id: &str) {
        let statuses: Vec<(&str, Option<Value>)> = match req.normalized.as_str() {
            "+15005550004" => {
                let undeliverable = json!([{"code": 131026, "title": "Message undeliverable"}]);
                vec![("sent", None), ("failed", Some(undeliverable))]
            }
            "+15005550007" => vec![("sent", None)],
            _ => vec![("sent", None), ("delivered", None), ("read", None)],
        };
        let bodies: Vec<Vec<u8>> = statuses
            .into_iter()
            .map(|(status, errors)| {
                let mut st = json!({"id": wamid, "status": status, "recipient_id": req.wa_id(),
                    "timestamp": chrono::Utc::now().timestamp().to_string()});
                if let Some(e) = errors {
                    st["errors"] = e;
                }
                let body = json!({"object": "whatsapp_business_account", "entry": [{
                    "id": "WHATSAPP_BUSINESS_ACCOUNT_ID",
                    "changes": [{"field": "messages", "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone_id},
                        "statuses": [st]}}]}]});
                serde_json::to_vec(&body).unwrap()
            })
            .collect();
        let (http, secret) = (self.http.clone(), self.app_secret.clone());
        tokio::spawn(async move {
            for raw in bodies {
                tokio::time::sleep(CALLBACK_PAUSE).await;
                let sig = comm_aggregator::callbacks::meta_signature(&secret, &raw);
                let r = http
                    .post(&url)
                    .header("X-Hub-Signature-256", sig)
                    .header("content-type", "application/json")
                    .body(raw)
                    .send()
                    .await;
                if let Err(e) = r {
                    eprintln!("webhook to {url} failed: {e}");
                }
            }
        });
    }
}
