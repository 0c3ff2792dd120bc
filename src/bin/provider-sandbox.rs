//! provider-sandbox: a local stand-in for the two HTTP providers we cannot reach from
//! here, speaking their documented formats.
//!
//! - Twilio: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, basic auth, form fields
//!   `To`, `Body`, `From` | `MessagingServiceSid`; answers `201` with a Message resource or
//!   Twilio's error body `{"code","message","more_info","status"}`. Twilio's magic test
//!   numbers behave as documented: +15005550001 → 21211 (invalid), +15005550009 → 21614
//!   (not a mobile number).
//! - Meta WhatsApp Cloud API: `POST /{version}/{phone-number-id}/messages`, bearer token,
//!   JSON body; answers `200 {"messaging_product","contacts","messages":[{"id"}]}` or
//!   `{"error":{"message","type","code","error_data","fbtrace_id"}}`. Recipient
//!   +15005550001 → 131026 (undeliverable).
//! - `GET /__sandbox/messages` lists what was accepted (`?provider=twilio|whatsapp`);
//!   `DELETE /__sandbox/messages` forgets it.
//! - Fault knobs, per provider: `POST /__sandbox/faults` with
//!   `{"provider":"twilio"|"whatsapp","mode":"none"|"5xx"|"429"|"hang"|"error",
//!     "status":503,"code":20500,"message":"...","retry_after":2,"latency_ms":0,"rate":1.0}`
//!   (`rate`: the share of requests affected; `error` answers `status` with the provider's
//!   error body for `code`); `DELETE /__sandbox/faults` clears them; `GET` lists them.
//!
//! Usage: `provider-sandbox [--addr 127.0.0.1:4010]`; credentials from the environment
//! (`ACCOUNTSID`, `AUTHTOKEN`, `WHATSAPP_TOKEN`, `WHATSAPP_PHONE_NUMBER_ID`) or the
//! development defaults printed at start.

use actors::domain::is_e164;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

pub const DEV_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
pub const DEV_AUTH_TOKEN: &str = "sandbox-auth-token";
pub const DEV_WHATSAPP_TOKEN: &str = "sandbox-whatsapp-token";
pub const DEV_PHONE_NUMBER_ID: &str = "100000000000001";
pub const DEV_APP_SECRET: &str = "sandbox-app-secret";

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
struct Fault {
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

#[derive(Clone)]
struct Sandbox {
    faults: Arc<Mutex<HashMap<String, Fault>>>,
    /// Where WhatsApp status webhooks go (Meta: configured in the app dashboard; here with
    /// `POST /__sandbox/webhooks {"whatsapp": URL}` or `WHATSAPP_WEBHOOK_URL`).
    whatsapp_webhook: Arc<Mutex<Option<String>>>,
    app_secret: String,
    http: reqwest::Client,
    account_sid: String,
    auth_token: String,
    wa_token: String,
    phone_number_id: String,
    received: Arc<Mutex<Vec<Value>>>,
    seq: Arc<AtomicU64>,
}

fn json_status(v: Value, status: StatusCode) -> Response {
    warp::reply::with_status(warp::reply::json(&v), status).into_response()
}

fn twilio_error(status: u16, code: u32, message: &str) -> Response {
    json_status(
        json!({"code": code, "message": message,
               "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
        StatusCode::from_u16(status).unwrap(),
    )
}

fn meta_error(status: u16, code: u32, message: &str, details: &str) -> Response {
    json_status(
        json!({"error": {"message": message, "type": "OAuthException", "code": code,
               "error_data": {"messaging_product": "whatsapp", "details": details},
               "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW"}}),
        StatusCode::from_u16(status).unwrap(),
    )
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
async fn fault_for(sb: &Sandbox, provider: &str) -> Option<Response> {
    let f = sb.faults.lock().unwrap().get(provider).cloned()?;
    if f.latency_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(f.latency_ms)).await;
    }
    if f.mode == "none" || rand::random::<f64>() >= f.rate {
        return None;
    }
    let twilio = provider == "twilio";
    Some(match f.mode.as_str() {
        "hang" => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            json_status(json!({}), StatusCode::GATEWAY_TIMEOUT)
        }
        "429" if twilio => {
            with_retry_after(twilio_error(429, 20429, "Too Many Requests"), f.retry_after)
        }
        "429" => with_retry_after(
            meta_error(
                429,
                130429,
                "Rate limit hit",
                "Cloud API message throughput has been reached.",
            ),
            f.retry_after,
        ),
        "5xx" if twilio => with_retry_after(
            twilio_error(
                f.status.unwrap_or(503),
                20500,
                "An internal server error has occurred",
            ),
            f.retry_after,
        ),
        "5xx" => with_retry_after(
            meta_error(
                f.status.unwrap_or(503),
                131016,
                "Service unavailable",
                "A service is temporarily unavailable.",
            ),
            f.retry_after,
        ),
        _ => {
            let status = f.status.unwrap_or(400);
            let msg = f.message.clone().unwrap_or_else(|| "Injected error".into());
            if twilio {
                twilio_error(status, f.code.unwrap_or(21211), &msg)
            } else {
                meta_error(status, f.code.unwrap_or(131026), &msg, &msg)
            }
        }
    })
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

impl Sandbox {
    fn set_fault(&self, f: Fault) -> Response {
        if !["twilio", "whatsapp"].contains(&f.provider.as_str()) {
            return json_status(
                json!({"error": "provider must be twilio or whatsapp"}),
                StatusCode::BAD_REQUEST,
            );
        }
        self.faults
            .lock()
            .unwrap()
            .insert(f.provider.clone(), f.clone());
        json_status(json!({"fault": f}), StatusCode::OK)
    }

    fn next_hex(&self, len: usize) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let s = format!(
            "{:016x}{:016x}{:016x}",
            n,
            t as u64,
            (t >> 64) as u64 ^ n.rotate_left(17)
        );
        s[..len].to_string()
    }

    /// Twilio's `Messages.json`: the checks Twilio makes, in its order, then the Message
    /// resource, and the status callbacks if the request asked for them.
    fn twilio(&self, sid: String, auth: Option<String>, form: HashMap<String, String>) -> Response {
        let req = match self.twilio_request(&sid, auth.as_deref(), &form) {
            Ok(r) => r,
            Err(no) => return twilio_error(no.status, no.code, &no.message),
        };
        let msid = format!("SM{}", self.next_hex(32));
        self.received.lock().unwrap().push(json!({
            "provider": "twilio", "id": msid, "to": req.to, "from": req.from,
            "messagingServiceSid": req.mss, "body": req.body,
        }));
        if let Some(cb) = form.get("StatusCallback") {
            self.twilio_callbacks(cb.clone(), &req, &msid);
        }
        json_status(self.twilio_resource(&req, &msid), StatusCode::CREATED)
    }

    fn twilio_request<'a>(
        &self,
        sid: &str,
        auth: Option<&str>,
        form: &'a HashMap<String, String>,
    ) -> Result<TwilioRequest<'a>, Refusal> {
        match basic_auth(auth) {
            Some((u, p))
                if u == self.account_sid && p == self.auth_token && sid == self.account_sid => {}
            _ => return Err(Refusal::new(401, 20003, "Authenticate", "")),
        }
        let field = |k: &str| form.get(k).map(String::as_str);
        let req = TwilioRequest {
            to: field("To").unwrap_or(""),
            body: field("Body").unwrap_or(""),
            from: field("From"),
            mss: field("MessagingServiceSid"),
        };
        let to = req.to;
        let refusal = if to.is_empty() {
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

    fn twilio_resource(&self, req: &TwilioRequest, msid: &str) -> Value {
        let now = chrono::Utc::now().to_rfc2822();
        let account = &self.account_sid;
        json!({
            "account_sid": account,
            "api_version": "2010-04-01",
            "body": req.body,
            "date_created": now,
            "date_sent": null,
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
        let final_status = if req.to == "+15005550004" {
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

    /// Meta's `messages`: the checks the Cloud API makes, then the answer, and the status
    /// webhooks if a webhook URL is set.
    fn whatsapp(&self, phone_id: String, auth: Option<String>, body: Value) -> Response {
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
    /// `failed` with 131026 for +15005550004).
    fn whatsapp_webhooks(&self, url: String, req: &WhatsAppRequest, wamid: &str, phone_id: &str) {
        let statuses: Vec<(&str, Option<Value>)> = if req.normalized == "+15005550004" {
            let undeliverable = json!([{"code": 131026, "title": "Message undeliverable"}]);
            vec![("sent", None), ("failed", Some(undeliverable))]
        } else {
            vec![("sent", None), ("delivered", None), ("read", None)]
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

/// Why a provider refuses a request, before it is written as that provider's error body.
struct Refusal {
    status: u16,
    code: u32,
    message: String,
    /// Meta's `error_data.details`.
    details: String,
}

impl Refusal {
    fn new(status: u16, code: u32, message: &str, details: &str) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            details: details.into(),
        }
    }
}

/// A Twilio request that passed Twilio's checks.
struct TwilioRequest<'a> {
    to: &'a str,
    body: &'a str,
    from: Option<&'a str>,
    mss: Option<&'a str>,
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

/// The pause before each status callback, as a provider reports a little later.
const CALLBACK_PAUSE: std::time::Duration = std::time::Duration::from_millis(150);

#[derive(Deserialize)]
struct ListQuery {
    provider: Option<String>,
}

fn routes(sb: Sandbox) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    provider_routes(sb.clone())
        .or(admin_routes(sb))
        .unify()
        .recover(|_r: warp::Rejection| async {
            Ok::<_, Infallible>(json_status(
                json!({"error": "not found"}),
                StatusCode::NOT_FOUND,
            ))
        })
        .unify()
}

fn with(sb: Sandbox) -> impl Filter<Extract = (Sandbox,), Error = Infallible> + Clone {
    warp::any().map(move || sb.clone())
}

/// What the service calls: Twilio's and Meta's send endpoints, behind the fault knobs.
fn provider_routes(sb: Sandbox) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let twilio = warp::post()
        .and(warp::path!(
            "2010-04-01" / "Accounts" / String / "Messages.json"
        ))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::form::<HashMap<String, String>>())
        .and(with(sb.clone()))
        .then(|sid, auth, form, sb: Sandbox| async move {
            match fault_for(&sb, "twilio").await {
                Some(r) => r,
                None => sb.twilio(sid, auth, form),
            }
        });
    let wa_versioned = warp::post()
        .and(warp::path!(String / String / "messages"))
        .map(|_version: String, id: String| id);
    let wa_bare = warp::post().and(warp::path!(String / "messages"));
    let whatsapp = wa_versioned
        .or(wa_bare)
        .unify()
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::bytes())
        .and(with(sb))
        .then(|id, auth, body: bytes::Bytes, sb: Sandbox| async move {
            if let Some(r) = fault_for(&sb, "whatsapp").await {
                return r;
            }
            match serde_json::from_slice(&body) {
                Ok(v) => sb.whatsapp(id, auth, v),
                Err(_) => meta_error(400, 100, "(#100) Invalid parameter", "the body is not JSON"),
            }
        });
    twilio.or(whatsapp).unify()
}

/// What the tests call: `/__sandbox/messages`, `/__sandbox/faults`, `/__sandbox/webhooks`.
fn admin_routes(sb: Sandbox) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let messages = warp::path!("__sandbox" / "messages");
    let faults = warp::path!("__sandbox" / "faults");
    let list = warp::get()
        .and(messages)
        .and(warp::query::<ListQuery>())
        .and(with(sb.clone()))
        .map(|q: ListQuery, sb: Sandbox| {
            let all = sb.received.lock().unwrap();
            let items: Vec<&Value> = all
                .iter()
                .filter(|m| q.provider.as_deref().is_none_or(|p| m["provider"] == p))
                .collect();
            warp::reply::json(&json!({"messages": items})).into_response()
        });
    let clear = warp::delete()
        .and(messages)
        .and(with(sb.clone()))
        .map(|sb: Sandbox| {
            sb.received.lock().unwrap().clear();
            StatusCode::NO_CONTENT.into_response()
        });
    let set_fault = warp::post()
        .and(faults)
        .and(warp::body::json::<Fault>())
        .and(with(sb.clone()))
        .map(|f: Fault, sb: Sandbox| sb.set_fault(f));
    let list_faults = warp::get()
        .and(faults)
        .and(with(sb.clone()))
        .map(|sb: Sandbox| {
            let all: Vec<Fault> = sb.faults.lock().unwrap().values().cloned().collect();
            json_status(json!({"faults": all}), StatusCode::OK)
        });
    let clear_faults = warp::delete()
        .and(faults)
        .and(with(sb.clone()))
        .map(|sb: Sandbox| {
            sb.faults.lock().unwrap().clear();
            StatusCode::NO_CONTENT.into_response()
        });
    let webhooks = warp::post()
        .and(warp::path!("__sandbox" / "webhooks"))
        .and(warp::body::json::<Value>())
        .and(with(sb))
        .map(|v: Value, sb: Sandbox| {
            let url = v["whatsapp"].as_str().map(str::to_string);
            *sb.whatsapp_webhook.lock().unwrap() = url.clone();
            json_status(json!({"whatsapp": url}), StatusCode::OK)
        });
    list.or(clear)
        .unify()
        .or(set_fault)
        .unify()
        .or(list_faults)
        .unify()
        .or(clear_faults)
        .unify()
        .or(webhooks)
        .unify()
}

#[tokio::main]
async fn main() {
    let mut addr = "127.0.0.1:4010".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--addr" => addr = args.next().expect("--addr needs host:port"),
            other => {
                eprintln!("unknown argument {other:?}; usage: provider-sandbox [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    let env = |k: &str, d: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| d.into())
    };
    let sb = Sandbox {
        account_sid: env("ACCOUNTSID", DEV_ACCOUNT_SID),
        auth_token: env("AUTHTOKEN", DEV_AUTH_TOKEN),
        wa_token: env("WHATSAPP_TOKEN", DEV_WHATSAPP_TOKEN),
        phone_number_id: env("WHATSAPP_PHONE_NUMBER_ID", DEV_PHONE_NUMBER_ID),
        received: Arc::new(Mutex::new(Vec::new())),
        seq: Arc::new(AtomicU64::new(1)),
        faults: Arc::new(Mutex::new(HashMap::new())),
        whatsapp_webhook: Arc::new(Mutex::new(
            std::env::var("WHATSAPP_WEBHOOK_URL")
                .ok()
                .filter(|v| !v.is_empty()),
        )),
        app_secret: env("WHATSAPP_APP_SECRET", DEV_APP_SECRET),
        http: reqwest::Client::new(),
    };
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("provider-sandbox: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "provider-sandbox on http://{addr} (twilio account {}, whatsapp phone number id {})",
        sb.account_sid, sb.phone_number_id
    );
    warp::serve(routes(sb)).incoming(listener).run().await;
}
