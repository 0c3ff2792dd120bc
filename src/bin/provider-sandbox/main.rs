//! provider-sandbox: a local stand-in for the HTTP providers we cannot reach from here,
//! speaking their documented formats.
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
//!   `GET /2010-04-01/Accounts/{AccountSid}/Messages.json` lists Message resources as
//!   Twilio does (filters `To`, `From`, `DateSent`, `DateSent<`, `DateSent>`; paged).
//! - Vonage SMS API: `POST /sms/json` (see `vonage.rs`); SendGrid v3 Mail Send:
//!   `POST /v3/mail/send` (see `sendgrid.rs`); Twilio's WhatsApp sender: the Twilio
//!   endpoint with `whatsapp:+…` addresses.
//! - `GET /__sandbox/messages` lists what was accepted
//!   (`?provider=twilio|whatsapp|vonage|sendgrid`);
//!   `DELETE /__sandbox/messages` forgets it.
//! - Fault knobs, per provider: `POST /__sandbox/faults` with
//!   `{"provider":"twilio"|"whatsapp"|"vonage"|"sendgrid","mode":"none"|"5xx"|"429"|"hang"|"error"|"late"|"gateway",
//!     "status":503,"code":20500,"message":"...","retry_after":2,"latency_ms":0,"rate":1.0}`
//!   (`rate`: the share of requests affected; `error` answers `status` with the provider's
//!   error body for `code`; `late` takes the message, then answers after `latency_ms`;
//!   `gateway` takes it, then answers a bare `502 Bad Gateway` as a proxy would);
//!   `DELETE /__sandbox/faults` clears them; `GET` lists them.
//!
//! `twilio.rs` and `whatsapp.rs` hold each provider's checks, answers and callbacks,
//! `faults.rs` the fault knobs; this file the shared state, the routes and `main`.
//!
//! Usage: `provider-sandbox [--addr 127.0.0.1:4010]`; credentials from the environment
//! (`ACCOUNTSID`, `AUTHTOKEN`, `WHATSAPP_TOKEN`, `WHATSAPP_PHONE_NUMBER_ID`) or the
//! development defaults printed at start.

mod faults;
mod sendgrid;
mod twilio;
mod vonage;
mod whatsapp;

use faults::{after_taking, answer_after, fault_for, Fault};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};
use whatsapp::meta_error;

pub const DEV_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
pub const DEV_AUTH_TOKEN: &str = "sandbox-auth-token";
pub const DEV_WHATSAPP_TOKEN: &str = "sandbox-whatsapp-token";
pub const DEV_PHONE_NUMBER_ID: &str = "100000000000001";
pub const DEV_APP_SECRET: &str = "sandbox-app-secret";
pub const DEV_VONAGE_KEY: &str = "sandboxkey";
pub const DEV_VONAGE_SECRET: &str = "sandbox-vonage-secret";
pub const DEV_VONAGE_SIGNATURE_SECRET: &str = "sandbox-vonage-signature-secret";
pub const DEV_SENDGRID_KEY: &str = "SG.sandbox-sendgrid-key";

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
    vonage_key: String,
    vonage_secret: String,
    vonage_signature_secret: String,
    sendgrid_key: String,
    /// Where SendGrid's events go (`POST /__sandbox/webhooks {"sendgrid": URL}` or
    /// `SENDGRID_EVENT_WEBHOOK_URL`).
    sendgrid_webhook: Arc<Mutex<Option<String>>>,
    /// The event webhook's signing key (PKCS#8, base64).
    sendgrid_signing_key: String,
    received: Arc<Mutex<Vec<Value>>>,
    seq: Arc<AtomicU64>,
}

fn json_status(v: Value, status: StatusCode) -> Response {
    warp::reply::with_status(warp::reply::json(&v), status).into_response()
}

impl Sandbox {
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
            let after = after_taking(&sb, "twilio");
            let answer = match fault_for(&sb, "twilio").await {
                Some(r) => r,
                None => sb.twilio(sid, auth, form),
            };
            answer_after(after, answer).await
        });
    let twilio_list = warp::get()
        .and(warp::path!(
            "2010-04-01" / "Accounts" / String / "Messages.json"
        ))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::query::<HashMap<String, String>>())
        .and(with(sb.clone()))
        .map(|sid, auth, query, sb: Sandbox| sb.twilio_list(sid, auth, query));
    let wa_versioned = warp::post()
        .and(warp::path!(String / String / "messages"))
        .map(|_version: String, id: String| id);
    let wa_bare = warp::post().and(warp::path!(String / "messages"));
    let whatsapp = wa_versioned
        .or(wa_bare)
        .unify()
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::bytes())
        .and(with(sb.clone()))
        .then(|id, auth, body: bytes::Bytes, sb: Sandbox| async move {
            let after = after_taking(&sb, "whatsapp");
            if let Some(r) = fault_for(&sb, "whatsapp").await {
                return r;
            }
            let answer = match serde_json::from_slice(&body) {
                Ok(v) => sb.whatsapp(id, auth, v),
                Err(_) => meta_error(400, 100, "(#100) Invalid parameter", "the body is not JSON"),
            };
            answer_after(after, answer).await
        });
    twilio
        .or(twilio_list)
        .unify()
        .or(whatsapp)
        .unify()
        .or(vonage_route(sb.clone()))
        .unify()
        .or(sendgrid_route(sb))
        .unify()
}

/// Vonage's `POST /sms/json`, form or JSON parameters.
fn vonage_route(sb: Sandbox) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::post()
        .and(warp::path!("sms" / "json"))
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::bytes())
        .and(with(sb))
        .then(
            |ct: Option<String>, body: bytes::Bytes, sb: Sandbox| async move {
                let after = after_taking(&sb, "vonage");
                if let Some(r) = fault_for(&sb, "vonage").await {
                    return r;
                }
                let params: HashMap<String, String> = if ct
                    .is_some_and(|c| c.starts_with("application/json"))
                {
                    serde_json::from_slice::<HashMap<String, Value>>(&body)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                        .collect()
                } else {
                    url::form_urlencoded::parse(&body).into_owned().collect()
                };
                answer_after(after, sb.vonage(params)).await
            },
        )
}

/// SendGrid's `POST /v3/mail/send`.
fn sendgrid_route(sb: Sandbox) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::post()
        .and(warp::path!("v3" / "mail" / "send"))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::bytes())
        .and(with(sb))
        .then(|auth, body: bytes::Bytes, sb: Sandbox| async move {
            let after = after_taking(&sb, "sendgrid");
            if let Some(r) = fault_for(&sb, "sendgrid").await {
                return r;
            }
            answer_after(after, sb.sendgrid(auth, &body)).await
        })
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
            for (name, slot) in [
                ("whatsapp", &sb.whatsapp_webhook),
                ("sendgrid", &sb.sendgrid_webhook),
            ] {
                if let Some(url) = v.get(name) {
                    *slot.lock().unwrap() = url.as_str().map(str::to_string);
                }
            }
            let current = |slot: &Mutex<Option<String>>| slot.lock().unwrap().clone();
            json_status(
                json!({"whatsapp": current(&sb.whatsapp_webhook), "sendgrid": current(&sb.sendgrid_webhook)}),
                StatusCode::OK,
            )
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
        vonage_key: env("VONAGE_API_KEY", DEV_VONAGE_KEY),
        vonage_secret: env("VONAGE_API_SECRET", DEV_VONAGE_SECRET),
        vonage_signature_secret: env("VONAGE_SIGNATURE_SECRET", DEV_VONAGE_SIGNATURE_SECRET),
        sendgrid_key: env("SENDGRID_API_KEY", DEV_SENDGRID_KEY),
        sendgrid_webhook: Arc::new(Mutex::new(
            std::env::var("SENDGRID_EVENT_WEBHOOK_URL")
                .ok()
                .filter(|v| !v.is_empty()),
        )),
        sendgrid_signing_key: env("SENDGRID_SIGNING_KEY", sendgrid::DEV_SENDGRID_PRIVATE_KEY),
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
        "provider-sandbox on http://{addr} (twilio account {}, whatsapp phone number id {}, vonage key {}; sendgrid events signed for SENDGRID_WEBHOOK_PUBLIC_KEY={})",
        sb.account_sid, sb.phone_number_id, sb.vonage_key, sendgrid::DEV_SENDGRID_PUBLIC_KEY
    );
    warp::serve(routes(sb)).incoming(listener).run().await;
}
