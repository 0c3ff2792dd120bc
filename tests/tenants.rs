//! Safe to hand to tenants (issue #13, items 1 and 2), on real servers: a tenant sends only
//! as its own senders (a spoofed `from` is 403 and reaches neither the provider stand-in
//! nor MongoDB), only to its countries, and within its limits, which live in Redis and so
//! hold across processes: the distinct recipients of an hour (rotating numbers meets it),
//! the daily quota, one per-key rate shared by two processes; and with Redis down, SMS is
//! refused with 503 and nothing stored while email (fail-open) passes.

mod common;

use common::{
    check_books, client_for, eventually, shared, start_isolated, unique, Stack, API_KEY, OTHER_KEY,
};
use mongodb::bson::{doc, oid::ObjectId};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const BARE_KEY: &str = "bare-key-0123456789abcdef";

/// Write a tenants file into the stack's folder; its path.
fn tenants_file(stack: &Stack, text: &str) -> String {
    let path = stack.dir.join(format!("{}.toml", unique("tenants")));
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

async fn post(url: &str, key: &str, body: Value) -> Answer {
    let res = client_for(key)
        .post(format!("{url}/api/v1/communication"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    Answer {
        status: res.status().as_u16(),
        retry_after,
        body: res.json().await.unwrap_or(Value::Null),
    }
}

fn message(kind: &str, from: Option<&str>, to: &str, msg: &str) -> Value {
    let mut data = json!({"to": to, "msg": msg});
    if let Some(f) = from {
        data["from"] = json!(f);
    }
    json!({"type": kind, "data": data})
}

async fn stored_with_msg(stack: &Stack, msg: &str) -> u64 {
    stack
        .records()
        .await
        .count_documents(doc! {"msg": msg})
        .await
        .unwrap()
}

async fn record(stack: &Stack, id: &str) -> mongodb::bson::Document {
    stack
        .records()
        .await
        .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
        .await
        .unwrap()
        .unwrap()
}

const SENDERS: &str = r#"
[tests]
numbers = ["+15550001111"]
sender_ids = ["TESTS"]
email_domains = ["example.com"]
messaging_service_sid = "MG0123456789abcdef0123456789abcdef"
default_from = { sms = "TESTS", email = "noreply@example.com" }
countries = ["+1", "+44"]

[other]
numbers = ["+15550002222"]
"#;

/// One request of a table: key, type, `from` (`None`: left out), `to`, and what is expected
/// (the error code of a refusal, or the `From` the stand-in sees; "" for the SID).
type Row = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
);

const SID: &str = "MG0123456789abcdef0123456789abcdef";

/// A `from` the tenant does not own, or a country it may not send to: each a 403.
#[rustfmt::skip]
const REFUSED: &[Row] = &[
    (API_KEY, "sms", Some("+15550002222"), "+15557654321", "sender_not_allowed"),
    (API_KEY, "sms", Some("GlobexBank"), "+15557654321", "sender_not_allowed"),
    (API_KEY, "sms", Some("MG0123456789abcdef0123456789abcdee"), "+15557654321", "sender_not_allowed"),
    (API_KEY, "whatsapp", Some("+15550002222"), "+15557654321", "sender_not_allowed"),
    (API_KEY, "email", Some("security@globex.com"), "ada@example.org", "sender_not_allowed"),
    (API_KEY, "email", Some("ceo@mail.example.com"), "ada@example.org", "sender_not_allowed"),
    (OTHER_KEY, "sms", Some("+15550001111"), "+15557654321", "sender_not_allowed"),
    (BARE_KEY, "sms", Some("+15550001111"), "+15557654321", "sender_not_allowed"),
    (API_KEY, "sms", Some("+15550001111"), "+881612345678", "destination_not_allowed"),
    (API_KEY, "whatsapp", Some("+15550001111"), "+4915112345678", "destination_not_allowed"),
    (BARE_KEY, "sms", None, "+447700900123", "destination_not_allowed"),
];

/// What each tenant owns goes through; a left-out `from` is the tenant's default.
#[rustfmt::skip]
const ALLOWED: &[Row] = &[
    (API_KEY, "sms", Some("+15550001111"), "+447700900123", "+15550001111"),
    (API_KEY, "sms", None, "+15557654321", "TESTS"),
    (API_KEY, "sms", Some("tests"), "+15557654321", "tests"),
    (API_KEY, "sms", Some(SID), "+15557654321", ""),
    (OTHER_KEY, "sms", Some("+15550002222"), "+15557654321", "+15550002222"),
    (BARE_KEY, "sms", None, "+15557654321", "+15550009999"),
    (BARE_KEY, "sms", Some("+15550009999"), "+15557654321", "+15550009999"),
];

/// Send the refused rows: each is a 403 with its code. Their bodies.
async fn send_refused(url: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    for &(key, kind, from, to, code) in REFUSED {
        let msg = unique("spoof");
        let a = post(url, key, message(kind, from, to, &msg)).await;
        assert_eq!(a.status, 403, "{kind} from {from:?} to {to}: {}", a.body);
        assert_eq!(a.body["error"]["code"], code, "{}", a.body);
        bodies.push(msg);
    }
    bodies
}

/// Send the allowed rows: each is accepted. (body, id, expected `From`).
async fn send_allowed(url: &str) -> Vec<(String, String, &'static str)> {
    let mut accepted = Vec::new();
    for &(key, kind, from, to, sent_as) in ALLOWED {
        let msg = unique("own");
        let a = post(url, key, message(kind, from, to, &msg)).await;
        assert_eq!(a.status, 200, "{kind} from {from:?}: {}", a.body);
        let id = a.body["id"].as_str().unwrap().to_string();
        accepted.push((msg, id, sent_as));
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_sender_is_403_and_reaches_neither_the_provider_nor_mongodb() {
    let (stack, _) = shared();
    let keys = format!("tests:{API_KEY},other:{OTHER_KEY},bare:{BARE_KEY}");
    let file = tenants_file(stack, SENDERS);
    let env = [
        ("API_KEYS", keys.as_str()),
        ("TENANTS_FILE", &file),
        ("SMS_FROM", "+15550009999"),
    ];
    let svc = start_isolated(1, &env);
    let url = svc.url("");
    let refused = send_refused(&url).await;
    let accepted = send_allowed(&url).await;
    let mail = unique("own-mail");
    let a = post(
        &url,
        API_KEY,
        message("email", None, "ada@example.org", &mail),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["data"]["from"], "noreply@example.com");
    // No default sender, no `from`: still a 400 naming the field.
    let a = post(
        &url,
        OTHER_KEY,
        message("email", None, "ada@example.org", "x"),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["field"].as_str()),
        (400, Some("from"))
    );

    let pairs: Vec<(String, String)> = accepted
        .iter()
        .map(|(m, id, _)| (m.clone(), id.clone()))
        .collect();
    let books = check_books(stack, &pairs, WAIT).await;
    assert_eq!(books.sent, accepted.len(), "{books:?}");
    let seen = stack.sandbox_messages().await;
    for (msg, _, sent_as) in &accepted {
        let m = seen.iter().find(|m| m["body"] == msg.as_str()).unwrap();
        match *sent_as {
            "" => assert_eq!(m["messagingServiceSid"], SID, "{m}"),
            from => assert_eq!(m["from"], from, "{m}"),
        }
    }
    eventually(WAIT, "the email at the SMTP server", || async {
        stack
            .mails()
            .iter()
            .any(|m| m.contains(&mail))
            .then_some(())
    })
    .await;
    // Everything accepted has been sent; nothing refused was stored or sent.
    for msg in &refused {
        assert_eq!(stored_with_msg(stack, msg).await, 0, "{msg} was stored");
        assert!(
            !seen.iter().any(|m| m["body"] == msg.as_str()),
            "{msg} sent"
        );
        assert!(!stack.mails().iter().any(|m| m.contains(msg.as_str())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_200_distinct_numbers_meets_the_distinct_recipient_limit() {
    let (stack, _) = shared();
    let svc = start_isolated(2, &[("RECIPIENTS_PER_HOUR", "150")]);
    let url = svc.url("");
    // The limit counts per clock hour: start well inside one (200 requests take seconds).
    let into_hour = chrono::Utc::now().timestamp() % 3600;
    if into_hour > 3600 - 30 {
        tokio::time::sleep(Duration::from_secs((3600 - into_hour + 1) as u64)).await;
    }
    let base = 1_000_000 + (rand::random::<u32>() % 8_000_000);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..200u32 {
        let to = format!("+1555{:07}", base + i);
        let msg = unique("pump");
        let a = post(
            &url,
            API_KEY,
            message("sms", Some("+15550001111"), &to, &msg),
        )
        .await;
        match a.status {
            200 => accepted.push((msg, a.body["id"].as_str().unwrap().to_string())),
            429 => {
                assert_eq!(
                    a.body["error"]["code"], "distinct_recipient_limit",
                    "{}",
                    a.body
                );
                let wait = a.retry_after.expect("Retry-After");
                assert!((1..=3600).contains(&wait), "Retry-After {wait}");
                refused.push(msg);
            }
            s => panic!("{s}: {}", a.body),
        }
    }
    assert_eq!((accepted.len(), refused.len()), (150, 50));
    // A number already texted this hour is not a new recipient.
    let again = unique("pump-again");
    let to = format!("+1555{:07}", base);
    let a = post(
        &url,
        API_KEY,
        message("sms", Some("+15550001111"), &to, &again),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    accepted.push((again, a.body["id"].as_str().unwrap().to_string()));
    for msg in &refused {
        assert_eq!(stored_with_msg(stack, msg).await, 0);
    }
    let books = check_books(stack, &accepted, Duration::from_secs(60)).await;
    assert_eq!(books.sent, accepted.len(), "{books:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_daily_quota_gets_429_quota_exceeded() {
    let (stack, _) = shared();
    let svc = start_isolated(3, &[("DAILY_QUOTA", "3")]);
    let url = svc.url("");
    let mut accepted = Vec::new();
    for _ in 0..3 {
        let msg = unique("quota");
        let a = post(
            &url,
            API_KEY,
            message("sms", Some("+15550001111"), "+15557654321", &msg),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        accepted.push((msg, a.body["id"].as_str().unwrap().to_string()));
    }
    let over = unique("quota-over");
    let a = post(
        &url,
        API_KEY,
        message("sms", Some("+15550001111"), "+15557654321", &over),
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "quota_exceeded");
    let reset: chrono::DateTime<chrono::Utc> = a.body["error"]["resetAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = chrono::Utc::now();
    assert!(
        reset > now && reset - now <= chrono::Duration::days(1),
        "{reset}"
    );
    assert_eq!(reset.timestamp() % 86_400, 0, "UTC midnight: {reset}");
    let wait = a.retry_after.expect("Retry-After");
    assert!(
        (wait as i64 - (reset - now).num_seconds()).abs() <= 2,
        "Retry-After {wait}"
    );
    assert_eq!(stored_with_msg(stack, &over).await, 0);
    // The quota is per channel and per tenant.
    let wa = unique("quota-wa");
    let a = post(
        &url,
        API_KEY,
        message("whatsapp", Some("+15550001111"), "+15557654321", &wa),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    accepted.push((wa, a.body["id"].as_str().unwrap().to_string()));
    let theirs = unique("quota-other");
    let a = post(
        &url,
        OTHER_KEY,
        message("sms", Some("+15550001111"), "+15557654321", &theirs),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    accepted.push((theirs, a.body["id"].as_str().unwrap().to_string()));
    let books = check_books(stack, &accepted, WAIT).await;
    assert_eq!(books.sent, accepted.len(), "{books:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_together_hold_one_per_key_rate() {
    let (stack, _) = shared();
    // Ten requests, then one every 100 s: the test never waits for a refill.
    let env = [("API_RATE_PER_SEC", "0.01"), ("API_BURST", "10")];
    let a = start_isolated(4, &env);
    let b = start_isolated(4, &env);
    let mut accepted = Vec::new();
    let mut limited = 0;
    for i in 0..16 {
        let svc = if i % 2 == 0 { &a } else { &b };
        let msg = unique("rate");
        let ans = post(
            &svc.url(""),
            API_KEY,
            message("sms", Some("+15550001111"), "+15557654321", &msg),
        )
        .await;
        match ans.status {
            200 => accepted.push((msg, ans.body["id"].as_str().unwrap().to_string())),
            429 => {
                assert_eq!(ans.body["error"]["code"], "rate_limited", "{}", ans.body);
                assert!(ans.retry_after.is_some_and(|w| w >= 1));
                assert_eq!(stored_with_msg(stack, &msg).await, 0);
                limited += 1;
            }
            s => panic!("{s}: {}", ans.body),
        }
    }
    assert_eq!(
        (accepted.len(), limited),
        (10, 6),
        "one bucket of 10 for the key, whichever process is asked"
    );
    // Reads count against the same bucket, in either process; another key has its own.
    let read = client_for(API_KEY)
        .get(b.url("/api/v1/providers"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 429);
    let other = client_for(OTHER_KEY)
        .get(a.url("/api/v1/providers"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    let books = check_books(stack, &accepted, WAIT).await;
    assert_eq!(books.sent, 10, "{books:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_sms_is_refused_with_503_and_email_passes() {
    let _alone = common::one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&[]);
    let url = svc.url("");
    // Up: both are accepted (and the script is loaded).
    let up = unique("up");
    let a = post(
        &url,
        API_KEY,
        message("sms", Some("+15550001111"), "+15557654321", &up),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let up_id = a.body["id"].as_str().unwrap().to_string();

    stack.kill("redis");
    let mut refused = Vec::new();
    for kind in ["sms", "whatsapp", "sms"] {
        let msg = unique("down");
        let a = post(
            &url,
            API_KEY,
            message(kind, Some("+15550001111"), "+15557654321", &msg),
        )
        .await;
        assert_eq!(a.status, 503, "{kind}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "limiter_unavailable");
        assert_eq!(a.retry_after, Some(1));
        refused.push(msg);
    }
    let mail = unique("down-mail");
    let a = post(
        &url,
        API_KEY,
        message(
            "email",
            Some("noreply@example.com"),
            "ada@example.org",
            &mail,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "email fails open: {}", a.body);
    let mail_id = a.body["id"].as_str().unwrap().to_string();
    for msg in &refused {
        assert_eq!(stored_with_msg(&stack, msg).await, 0, "{msg} was stored");
    }

    // Back up: the email is sent (the OutboxSweeper queues what could not be), the SMS
    // refused during the outage never.
    stack.start_redis();
    eventually(
        Duration::from_secs(60),
        "the email sent after Redis is back",
        || async {
            let d = record(&stack, &mail_id).await;
            (d.get_str("status").ok() == Some("sent")).then_some(())
        },
    )
    .await;
    assert!(stack.mails().iter().any(|m| m.contains(&mail)));
    let books = check_books(&stack, &[(up, up_id)], WAIT).await;
    assert_eq!(books.sent, 1, "{books:?}");
    let seen = stack.sandbox_messages().await;
    for msg in &refused {
        assert!(
            !seen.iter().any(|m| m["body"] == msg.as_str()),
            "{msg} was sent"
        );
        assert_eq!(stored_with_msg(&stack, msg).await, 0);
    }
}

/// Tenant safety (issue #14): a request's limits check goes to Redis on a connection of its
/// own, never in line behind the router's pipelines (a bulk send's thousand stream entries)
/// or the senders' scripts on the shared connection, where another tenant's bulk send
/// made it wait past its timeout (503 `limiter_unavailable`). Read off Redis's `MONITOR`:
/// each command with the client address it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_check_has_a_redis_connection_of_its_own() {
    let stack = Stack::start();
    let svc = stack.start_service(&[]);
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &stack.redis_port.to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    let out = monitor.stdout.take().unwrap();
    let (started, monitoring) = std::sync::mpsc::channel();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // `MONITOR` answers OK once it watches; every command after it is seen.
            if line == "OK" {
                let _ = started.send(());
            }
            seen.push(line);
        }
        seen
    });
    monitoring
        .recv_timeout(Duration::from_secs(10))
        .expect("redis-cli monitor started");
    for i in 0..5 {
        let a = post(
            &svc.url(""),
            API_KEY,
            message(
                "sms",
                Some("+15550001111"),
                "+15557654321",
                &unique(&format!("own line {i}")),
            ),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    monitor.kill().unwrap();
    monitor.wait().unwrap();
    let seen = lines.join().unwrap();
    // `<time> [<db> <addr>] "<COMMAND>" "<arg>" ...`; a script's own calls say `lua`.
    let client = |l: &str| {
        l.split_once(" [")?
            .1
            .split(']')
            .next()?
            .split(' ')
            .nth(1)
            .map(str::to_string)
    };
    let from = |pred: &dyn Fn(&str) -> bool| -> std::collections::BTreeSet<String> {
        seen.iter()
            .filter(|l| pred(l))
            .filter_map(|l| client(l))
            .filter(|c| c != "lua")
            .collect()
    };
    let checks = from(&|l| {
        (l.contains("\"EVALSHA\"") || l.contains("\"EVAL\"")) && l.contains("\"limits:{")
    });
    let appends = from(&|l| l.contains("\"XADD\" \"sms_stream\""));
    assert!(
        !checks.is_empty() && !appends.is_empty(),
        "{checks:?} {appends:?}\n{}",
        seen.join("\n")
    );
    assert!(
        checks.is_disjoint(&appends),
        "the limits checks went over the router's connection: {checks:?} {appends:?}"
    );
}
