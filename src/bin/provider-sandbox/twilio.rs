//! Twilio's `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`: basic auth, form
//! fields, the checks Twilio makes (with its error codes and magic test numbers), the
//! Message resource, and the signed status callbacks.

use crate::{json_status, Refusal, Sandbox, CALLBACK_PAUSE};
use actors::domain::is_e164;
use serde_json::{json, Value};
use std::collections::HashMap;
use warp::http::StatusCode;
use warp::reply::Response;

pub fn twilio_error(status: u16, code: u32, message: &str) -> Response {
    json_status(
        json!({"code": code, "message": message,
               "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
        StatusCode::from_u16(status).unwrap(),
    )
}

fn basic_auth(header: Option<&str>) -> Option<(String, String)> {
    use base64::Engine;
    let b64 = header?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The GMT day (`YYYY-MM-DD`) of a Message resource's `date_sent` (RFC 2822).
fn sent_day(resource: &Value) -> String {
    resource["date_sent"]
        .as_str()
        .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
        .map(|d| d.with_timezone(&chrono::Utc).format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// A Twilio request that passed Twilio's checks.
struct TwilioRequest<'a> {
    to: &'a str,
    body: &'a str,
    from: Option<&'a str>,
    mss: Option<&'a str>,
}

impl Sandbox {
    /// Twilio's `Messages.json`: the checks Twilio makes, in its order, then the Message
    /// resource, and the status callbacks if the request asked for them.
    pub fn twilio(
        &self,
        sid: String,
        auth: Option<String>,
        form: HashMap<String, String>,
    ) -> Response {
        let req = match self.twilio_request(&sid, auth.as_deref(), &form) {
            Ok(r) => r,
            Err(no) => return twilio_error(no.status, no.code, &no.message),
        };
        let msid = format!("SM{}", self.next_hex(32));
        let resource = self.twilio_resource(&req, &msid);
        self.received.lock().unwrap().push(json!({
            "provider": "twilio", "id": msid, "to": req.to, "from": req.from,
            "messagingServiceSid": req.mss, "body": req.body, "resource": resource,
        }));
        if let Some(cb) = form.get("StatusCallback") {
            self.twilio_callbacks(cb.clone(), &req, &msid);
        }
        json_status(resource, StatusCode::CREATED)
    }

    /// Twilio's `GET .../Messages.json` (read multiple Message resources): filters `To`,
    /// `From`, `DateSent` / `DateSent<` / `DateSent>` (`YYYY-MM-DD`, GMT, inclusive), newest
    /// first, paged with `PageSize` (default 50, at most 1000) and `Page`; the page answer
    /// carries `messages`, `page`, `page_size`, `start`, `end`, `uri`, `first_page_uri`,
    /// `next_page_uri` and `previous_page_uri` as Twilio's does.
    pub fn twilio_list(
        &self,
        sid: String,
        auth: Option<String>,
        query: HashMap<String, String>,
    ) -> Response {
        if !self.twilio_auth_ok(&sid, auth.as_deref()) {
            return twilio_error(401, 20003, "Authenticate");
        }
        let q = |k: &str| query.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let day = |k: &str| q(k).map(|v| v.get(..10).unwrap_or(v).to_string());
        let (on, before, after) = (day("DateSent"), day("DateSent<"), day("DateSent>"));
        let page_size: usize = q("PageSize")
            .and_then(|v| v.parse().ok())
            .unwrap_or(50)
            .clamp(1, 1000);
        let page: usize = q("Page").and_then(|v| v.parse().ok()).unwrap_or(0);
        let all: Vec<Value> = self
            .received
            .lock()
            .unwrap()
            .iter()
            .rev()
            .filter(|m| m["provider"] == "twilio")
            .map(|m| m["resource"].clone())
            .filter(|r| q("To").is_none_or(|to| r["to"] == to))
            .filter(|r| q("From").is_none_or(|from| r["from"] == from))
            .filter(|r| {
                let sent = sent_day(r);
                on.as_ref().is_none_or(|d| &sent == d)
                    && before.as_ref().is_none_or(|d| &sent <= d)
                    && after.as_ref().is_none_or(|d| &sent >= d)
            })
            .collect();
        let start = page * page_size;
        let items: Vec<Value> = all.iter().skip(start).take(page_size).cloned().collect();
        let mut filters: Vec<(String, String)> =
            ["To", "From", "DateSent", "DateSent<", "DateSent>"]
                .iter()
                .filter_map(|k| q(k).map(|v| (k.to_string(), v.to_string())))
                .collect();
        filters.push(("PageSize".into(), page_size.to_string()));
        let uri = |p: usize| {
            let mut f = filters.clone();
            f.push(("Page".into(), p.to_string()));
            let qs = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(f)
                .finish();
            format!("/2010-04-01/Accounts/{sid}/Messages.json?{qs}")
        };
        let more = start + items.len() < all.len();
        json_status(
            json!({
                "messages": items,
                "page": page,
                "page_size": page_size,
                "start": start,
                "end": (start + items.len()).saturating_sub(1),
                "uri": uri(page),
                "first_page_uri": uri(0),
                "next_page_uri": if more { Value::from(uri(page + 1)) } else { Value::Null },
                "previous_page_uri": if page > 0 { Value::from(uri(page - 1)) } else { Value::Null },
            }),
            StatusCode::OK,
        )
    }

    fn twilio_auth_ok(&self, sid: &str, auth: Option<&str>) -> bool {
        matches!(basic_auth(auth), Some((u, p))
            if u == self.account_sid && p == self.auth_token && sid == self.account_sid)
    }

    fn twilio_request<'a>(
        &self,
        sid: &str,
        auth: Option<&str>,
        form: &'a HashMap<String, String>,
    ) -> Result<TwilioRequest<'a>, Refusal> {
        if !self.twilio_auth_ok(sid, auth) {
            return Err(Refusal::new(401, 20003, "Authenticate", ""));
        }
        let field = |k: &str| form.get(k).map(String::as_str);
        let req = TwilioRequest {
            to: field("To").unwrap_or(""),
            body: field("Body").unwrap_or(""),
            from: field("From"),
            mss: field("MessagingServiceSid"),
        };
        // Twilio's WhatsApp sender: both addresses `whatsapp:+…`, or neither.
        let to = req.to.strip_prefix("whatsapp:").unwrap_or(req.to);
        let wa_to = to.len() != req.to.len();
        let wa_from = req.from.is_some_and(|f| f.starts_with("whatsapp:"));
        let refusal = if req.from.is_some() && wa_to != wa_from {
            Some((
                21910,
                "Invalid From and To pair. From and To should be of the same channel".to_string(),
            ))
        } else if to.is_empty() {
            Some((21604, "A 'To' phone number is required.".to_string()))
        } else if req.body.is_empty() {
            Some((21602, "Message body is required.".into()))
        } else if req.from.is_none() && req.mss.is_none() {
            Some((
                21603,
                "A 'From' or 'MessagingServiceSid' parameter is required to send a message.".into(),
            ))
        } else if req.body.chars().count() > 1600 {
            Some((
                21617,
                "The concatenated message body exceeds the 1600 character limit.".into(),
            ))
        } else if !is_e164(to) || to == "+15005550001" {
            Some((
                21211,
                format!("The 'To' number {to} is not a valid phone number."),
            ))
        } else if to == "+15005550009" {
            Some((
                21614,
                format!("'To' number {to} is not a valid mobile number"),
            ))
        } else {
            None
        };
        match refusal {
            Some((code, message)) => Err(Refusal::new(400, code, &message, "")),
            None => Ok(req),
        }
    }

    /// The Message resource. The stand-in hands a message on at once, so `date_sent` is
    /// its creation time (Twilio sets it once the carrier takes it).
    fn twilio_resource(&self, req: &TwilioRequest, msid: &str) -> Value {
        let now = chrono::Utc::now().to_rfc2822();
        let account = &self.account_sid;
        json!({
            "account_sid": account,
            "api_version": "2010-04-01",
            "body": req.body,
            "date_created": now,
            "date_sent": now,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": null,
            "error_message": null,
            "from": req.from,
            "messaging_service_sid": req.mss,
            "num_media": "0",
            "num_segments": "1",
            "price": null,
            "price_unit": "USD",
            "sid": msid,
            "status": if req.mss.is_some() { "accepted" } else { "queued" },
            "subresource_uris": {"media": format!("/2010-04-01/Accounts/{account}/Messages/{msid}/Media.json")},
            "to": req.to,
            "uri": format!("/2010-04-01/Accounts/{account}/Messages/{msid}.json"),
        })
    }

    /// Twilio posts the message's status changes to `StatusCallback`, signed: `sent`,
    /// then `delivered` (or `undelivered` for +15005550004).
    fn twilio_callbacks(&self, cb: String, req: &TwilioRequest, msid: &str) {
        let final_status = if req.to.trim_start_matches("whatsapp:") == "+15005550004" {
            "undelivered"
        } else {
            "delivered"
        };
        let params = |status: &str| {
            let mut p: Vec<(String, String)> = vec![
                ("AccountSid".into(), self.account_sid.clone()),
                ("ApiVersion".into(), "2010-04-01".into()),
                ("From".into(), req.from.unwrap_or_default().into()),
                ("MessageSid".into(), msid.into()),
                ("MessageStatus".into(), status.into()),
                ("SmsSid".into(), msid.into()),
                ("SmsStatus".into(), status.into()),
                ("To".into(), req.to.into()),
            ];
            if status == "undelivered" {
                p.push(("ErrorCode".into(), "30003".into()));
            }
            p
        };
        let steps = [params("sent"), params(final_status)];
        let (http, token) = (self.http.clone(), self.auth_token.clone());
        tokio::spawn(async move {
            for p in steps {
                tokio::time::sleep(CALLBACK_PAUSE).await;
                let sig = comm_aggregator::callbacks::twilio_signature(&token, &cb, &p);
                let r = http
                    .post(&cb)
                    .header("X-Twilio-Signature", sig)
                    .form(&p)
                    .send()
                    .await;
                if let Err(e) = r {
                    eprintln!("status callback to {cb} failed: {e}");
                }
            }
        });
    }
}
