//! Several providers per channel (issue #15, routing), on real servers: with
//! `SMS_PROVIDERS=twilio,vonage`, a Twilio answering 503 sends every message through
//! Vonage (none failed, the books balanced, Twilio's breaker open in `/api/v1/providers`);
//! a timeout at Twilio fails over to Vonage and is flagged a possible duplicate; with
//! `SMS_ROUTING=weighted` and `twilio:3,vonage:1`, messages split by weight; a provider with
//! its own `[provider_limits]` breaker opens it after its own count; Twilio's auth error
//! (401, 20003) fails over to Vonage, an invalid To (21211) does not.

mod common;

use common::{
    check_books, clear_faults, eventually, load, one_at_a_time, set_fault, shared_with, sms,
    unique, Service, Stack,
};
use mongodb::bson::Document;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Twilio first, Vonage second; breakers open after 5 failures in a row, for 2 s.
const FAILOVER: &[(&str, &str)] = &[
    ("SMS_PROVIDERS", "twilio,vonage"),
    ("PROVIDER_TIMEOUT_MS", "1000"),
    ("BREAKER_COOLDOWN_MS", "2000"),
    ("BACKOFF_BASE_MS", "200"),
];

fn failover() -> &'static (Stack, Service) {
    shared_with(FAILOVER)
}

async fn record(stack: &Stack, id: &str) -> Document {
    stack.record(id).await.expect("the record")
}

/// The `/api/v1/providers` entry of `provider`.
async fn provider(svc: &Service, provider: &str) -> Value {
    let (status, v) = svc.get("/api/v1/providers").await;
    assert_eq!(status, 200, "{v}");
    v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == provider)
        .unwrap_or_else(|| panic!("{provider} in {v}"))
        .clone()
}

/// The providers that sent the records of `accepted`, by name.
async fn senders(stack: &Stack, accepted: &[(String, String)]) -> Vec<String> {
    use futures::TryStreamExt;
    let ids: Vec<mongodb::bson::oid::ObjectId> = accepted
        .iter()
        .map(|(_, id)| mongodb::bson::oid::ObjectId::parse_str(id).unwrap())
        .collect();
    // One read for them all (a client a record would be a thousand connections).
    let found: Vec<Document> = stack
        .records()
        .await
        .find(mongodb::bson::doc! {"_id": {"$in": ids}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(found.len(), accepted.len(), "every record found");
    found
        .iter()
        .map(|r| r.get_str("provider").unwrap_or("").to_string())
        .collect()
}

/// How many of `accepted` went to Twilio first in their one attempt (and were refused, its
/// 503 recorded) before Vonage sent them.
async fn tried_twilio_first(stack: &Stack, accepted: &[(String, String)]) -> usize {
    let mut n = 0;
    for (_, id) in accepted {
        let r = record(stack, id).await;
        assert_eq!(
            r.get_i32("attempts").unwrap(),
            1,
            "failed over in the attempt: {r}"
        );
        let Ok(errors) = r.get_array("errors") else {
            continue;
        };
        if let Some(e) = errors.first().and_then(|e| e.as_document()) {
            assert_eq!(e.get_str("provider").unwrap(), "twilio", "{r}");
            assert_eq!(e.get_str("code").unwrap(), "20500", "{r}");
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_down_sends_every_message_through_vonage() {
    let _one = one_at_a_time().await;
    let (stack, svc) = failover();
    let (_, before) = svc.get("/api/v1/providers").await;
    let sms_entries: Vec<(String, i64)> = before["providers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["channel"] == "sms")
        .map(|p| {
            (
                p["provider"].as_str().unwrap().to_string(),
                p["position"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sms_entries,
        [("twilio".to_string(), 1), ("vonage".to_string(), 2)]
    );
    set_fault(
        stack,
        json!({"provider": "twilio", "mode": "5xx", "status": 503}),
    )
    .await;
    let accepted = load(svc.port, &unique("twilio-down"), 60, Duration::ZERO).await;
    assert_eq!(accepted.len(), 60, "every message accepted");
    let twilio = eventually(WAIT, "Twilio's breaker open", || async {
        let p = provider(svc, "twilio").await;
        (p["breaker"]["state"] == "open").then_some(p)
    })
    .await;
    assert!(twilio["failures"].as_u64().unwrap() >= 5, "{twilio}");
    assert_eq!(twilio["strategy"], "failover");
    let vonage = provider(svc, "vonage").await;
    assert_eq!(vonage["breaker"]["state"], "closed", "{vonage}");
    // Sent while the breaker is open: they skip Twilio (but for a probe per cool-down).
    let while_open = load(svc.port, &unique("twilio-open"), 20, Duration::ZERO).await;
    assert_eq!(while_open.len(), 20);
    let all: Vec<_> = accepted.iter().chain(&while_open).cloned().collect();
    let books = check_books(stack, &all, WAIT).await;
    assert_eq!((books.sent, books.failed), (80, 0), "{books:?}");
    assert_eq!(books.duplicates, 0, "a 503 with Twilio's body took nothing");
    let by = senders(stack, &all).await;
    assert!(by.iter().all(|p| p == "vonage"), "{by:?}");
    let first = tried_twilio_first(stack, &accepted).await;
    let later = tried_twilio_first(stack, &while_open).await;
    println!("tried Twilio first: {first} of the first 60, {later} of 20 sent while its breaker was open");
    assert!(first >= 5, "the breaker opened after 5 failures");
    assert!(
        later <= 2,
        "an open breaker is skipped without a call (a probe aside)"
    );
    clear_faults(stack).await;
    twilio_takes_messages_again(stack, svc).await;
}

/// Once Twilio answers again, its breaker's probe closes it and it is first again.
async fn twilio_takes_messages_again(stack: &Stack, svc: &Service) {
    eventually(WAIT, "a message through Twilio again", || async {
        let (status, v) = svc.post(sms(&unique("twilio-back"))).await;
        assert_eq!(status, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let r = eventually(WAIT, "the message sent", || async {
            let r = record(stack, &id).await;
            (r.get_str("status") != Ok("pending")).then_some(r)
        })
        .await;
        (r.get_str("provider") == Ok("twilio")).then_some(())
    })
    .await;
    let twilio = provider(svc, "twilio").await;
    assert_eq!(twilio["breaker"]["state"], "closed", "{twilio}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_at_twilio_fails_over_to_vonage_as_a_possible_duplicate() {
    let _one = one_at_a_time().await;
    let (stack, svc) = failover();
    // Twilio takes the message and answers after 3 s; the provider timeout is 1 s.
    set_fault(
        stack,
        json!({"provider": "twilio", "mode": "late", "latency_ms": 3000}),
    )
    .await;
    let msg = unique("late-twilio");
    let (status, v) = svc.post(sms(&msg)).await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let r = eventually(WAIT, "the record sent", || async {
        let r = record(stack, &id).await;
        (r.get_str("status") == Ok("sent") || r.get_str("status") == Ok("delivered")).then_some(r)
    })
    .await;
    clear_faults(stack).await;
    assert_eq!(r.get_str("provider").unwrap(), "vonage", "{r}");
    assert_eq!(r.get_bool("possibleDuplicate").ok(), Some(true), "{r}");
    assert_eq!(r.get_str("possibleDuplicateCause").unwrap(), "timeout");
    let e = r.get_array("errors").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(
        (e.get_str("provider").unwrap(), e.get_str("code").unwrap()),
        ("twilio", "timeout")
    );
    let seen = eventually(WAIT, "both providers' copies", || async {
        let got: Vec<String> = stack
            .sandbox_messages()
            .await
            .into_iter()
            .filter(|m| m["body"] == msg.as_str())
            .map(|m| m["provider"].as_str().unwrap_or("").to_string())
            .collect();
        (got.len() == 2).then_some(got)
    })
    .await;
    assert!(
        seen.contains(&"twilio".into()) && seen.contains(&"vonage".into()),
        "{seen:?}"
    );
    let metrics = common::get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics.lines().any(|l| {
        l.starts_with("comm_aggregator_possible_duplicate_sends_total")
            && l.contains("cause=\"timeout\"")
            && l.contains("channel=\"sms\"")
    });
    assert!(
        counted,
        "possible_duplicate_sends_total{{cause=\"timeout\"}} counted"
    );
}

/// 1,000 messages at 3:1 through a service of its own (its own Redis database): Twilio's
/// count within 10 % of 750 (675 to 825; the binomial spread is about 14). (The actors'
/// unit test `a_weighted_channel_splits_1000_messages_by_weight` checks the choice alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_channel_splits_messages_by_weight() {
    let _one = one_at_a_time().await;
    let (stack, _) = failover();
    let redis = format!("redis://127.0.0.1:{}/2", stack.redis_port);
    let svc = stack.start_service(&[
        ("REDIS_URL", &redis),
        ("SMS_PROVIDERS", "twilio:3,vonage:1"),
        ("SMS_ROUTING", "weighted"),
    ]);
    let accepted = load(svc.port, &unique("weighted"), 1000, Duration::ZERO).await;
    assert_eq!(accepted.len(), 1000);
    let books = check_books(stack, &accepted, WAIT).await;
    assert_eq!(
        (books.sent, books.failed, books.duplicates),
        (1000, 0, 0),
        "{books:?}"
    );
    let by = senders(stack, &accepted).await;
    let twilio = by.iter().filter(|p| *p == "twilio").count();
    let vonage = by.iter().filter(|p| *p == "vonage").count();
    println!("weighted 3:1 over 1000 messages: twilio {twilio}, vonage {vonage}");
    assert_eq!(twilio + vonage, 1000);
    assert!(
        (675..=825).contains(&twilio),
        "twilio took {twilio} of 1000"
    );
    let p = provider(&svc, "vonage").await;
    assert_eq!(
        (p["strategy"].as_str(), p["weight"].as_u64()),
        (Some("weighted"), Some(1))
    );
}

/// Tenant `other` has its own SMS order, Vonage alone, on a channel that routes through
/// Twilio first (a service of its own): its messages all go through Vonage, while those
/// of tenant `tests` go through Twilio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_its_own_provider_order_gets_it() {
    let _one = one_at_a_time().await;
    let (stack, _) = failover();
    let tenants = stack.dir.join("tenants-routing.toml");
    let table = format!("{}providers = {{ sms = [\"vonage\"] }}\n", Stack::TENANTS);
    std::fs::write(&tenants, table).unwrap();
    let redis = format!("redis://127.0.0.1:{}/3", stack.redis_port);
    let svc = stack.start_service(&[
        ("REDIS_URL", &redis),
        ("SMS_PROVIDERS", "twilio,vonage"),
        ("TENANTS_FILE", &tenants.to_string_lossy()),
    ]);
    let theirs = common::client_for(common::OTHER_KEY);
    let mut ids = Vec::new();
    for i in 0..10 {
        for (http, tenant) in [(common::client(), "tests"), (theirs.clone(), "other")] {
            let res = http
                .post(svc.url("/api/v1/communication"))
                .json(&sms(&unique(&format!("tenant-order-{i}"))))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.unwrap();
            ids.push((tenant, v["id"].as_str().unwrap().to_string()));
        }
    }
    for (tenant, id) in &ids {
        let r = eventually(WAIT, "the message sent", || async {
            let r = record(stack, id).await;
            (r.get_str("status") != Ok("pending")).then_some(r)
        })
        .await;
        let want = if *tenant == "other" {
            "vonage"
        } else {
            "twilio"
        };
        assert_eq!(r.get_str("provider").unwrap(), want, "{tenant}: {r}");
    }
}

/// `[provider_limits.vonage]` (a service of its own, Vonage first, Twilio second): Vonage's
/// breaker opens after its own 2 failures in a row and its bucket has its own rate and
/// burst, while Twilio keeps the channel's (5 failures, 100/s), both as
/// `/api/v1/providers` shows them; with Vonage answering 500, the first message fails over
/// and Vonage's breaker is still closed, the second opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_has_its_own_breaker_and_rate_limit() {
    let _one = one_at_a_time().await;
    let (stack, _) = failover();
    let redis = format!("redis://127.0.0.1:{}/4", stack.redis_port);
    let own: toml::Table =
        toml::from_str("breaker_consecutive_failures = 2\nrate_per_sec = 7.0\nburst = 3.0\n")
            .unwrap();
    let svc = stack.start_service_configured(
        &[
            ("REDIS_URL", &redis),
            ("SMS_PROVIDERS", "vonage,twilio"),
            ("BREAKER_COOLDOWN_MS", "120000"),
        ],
        &[("provider_limits.vonage", toml::Value::Table(own))],
    );
    let vonage = provider(&svc, "vonage").await;
    let twilio = provider(&svc, "twilio").await;
    assert_eq!(vonage["breaker"]["consecutiveFailures"], 2, "{vonage}");
    assert_eq!(vonage["rateLimit"]["ratePerSec"], 7.0, "{vonage}");
    assert_eq!(vonage["rateLimit"]["burst"], 3.0, "{vonage}");
    assert_eq!(twilio["breaker"]["consecutiveFailures"], 5, "{twilio}");
    assert_eq!(twilio["rateLimit"]["ratePerSec"], 100.0, "{twilio}");
    assert_eq!(twilio["breaker"]["cooldownMs"], 120000, "{twilio}");
    set_fault(
        stack,
        json!({"provider": "vonage", "mode": "5xx", "status": 500}),
    )
    .await;
    let mut states = Vec::new();
    for i in 0..2 {
        let (status, v) = svc.post(sms(&unique(&format!("own-breaker-{i}")))).await;
        assert_eq!(status, 200, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let r = eventually(WAIT, "the message sent", || async {
            let r = record(stack, &id).await;
            (r.get_str("status") == Ok("sent") || r.get_str("status") == Ok("delivered"))
                .then_some(r)
        })
        .await;
        assert_eq!(r.get_str("provider").unwrap(), "twilio", "{r}");
        let p = provider(&svc, "vonage").await;
        states.push((p["breaker"]["state"].clone(), p["failures"].clone()));
    }
    clear_faults(stack).await;
    assert_eq!(
        states,
        [(json!("closed"), json!(1)), (json!("open"), json!(2))],
        "Vonage's breaker opens after its own 2 failures"
    );
    let twilio = provider(&svc, "twilio").await;
    assert_eq!(twilio["breaker"]["state"], "closed", "{twilio}");
}

/// A refusal about the message (Twilio 21211, invalid To) is final at Twilio: not failed
/// over to Vonage. A refusal about the account (Twilio's documented auth error, 401 with
/// code 20003) fails over: every message is sent by Vonage in its first attempt, none
/// failed, each with Twilio's 20003 in `errors[]` and counted in `provider_failovers_total`,
/// and Twilio's breaker hears each as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_error_at_twilio_fails_over_a_message_error_does_not() {
    let _one = one_at_a_time().await;
    let (stack, svc) = failover();
    set_fault(
        stack,
        json!({"provider": "twilio", "mode": "error", "status": 400, "code": 21211,
               "message": "The 'To' number is not a valid phone number."}),
    )
    .await;
    let msg = unique("invalid-to");
    let (status, v) = svc.post(sms(&msg)).await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let r = eventually(WAIT, "the record final", || async {
        let r = record(stack, &id).await;
        (r.get_str("status") == Ok("failed") || r.get_str("status") == Ok("sent")).then_some(r)
    })
    .await;
    assert_eq!(
        (r.get_str("status").unwrap(), r.get_str("provider").unwrap()),
        ("failed", "twilio"),
        "{r}"
    );
    let at_vonage = stack
        .sandbox_messages()
        .await
        .into_iter()
        .filter(|m| m["body"] == msg.as_str())
        .count();
    assert_eq!(at_vonage, 0, "no provider took it");

    let twilio_before = provider(svc, "twilio").await["failures"].as_u64().unwrap();
    let failovers_before = svc.metric_total("provider_failovers_total").await;
    set_fault(
        stack,
        json!({"provider": "twilio", "mode": "error", "status": 401, "code": 20003,
               "message": "Authenticate"}),
    )
    .await;
    let accepted = load(svc.port, &unique("twilio-auth"), 10, Duration::ZERO).await;
    assert_eq!(accepted.len(), 10);
    let books = check_books(stack, &accepted, WAIT).await;
    assert_eq!((books.sent, books.failed), (10, 0), "{books:?}");
    let by = senders(stack, &accepted).await;
    assert!(by.iter().all(|p| p == "vonage"), "{by:?}");
    let mut refused = 0;
    for (_, id) in &accepted {
        let r = record(stack, id).await;
        assert_eq!(r.get_i32("attempts").unwrap(), 1, "{r}");
        let codes: Vec<(String, String)> = r
            .get_array("errors")
            .map(|a| a.iter().filter_map(|e| e.as_document()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                let s = |k| e.get_str(k).unwrap_or("").to_string();
                (s("provider"), s("code"))
            })
            .collect();
        assert!(
            codes
                .iter()
                .all(|c| *c == ("twilio".into(), "20003".into())),
            "{codes:?}"
        );
        refused += codes.len();
    }
    clear_faults(stack).await;
    println!("Twilio refused {refused} of 10 for its account; its breaker took the rest to Vonage");
    assert!(refused >= 1, "the first went to Twilio and was failed over");
    let twilio_after = provider(svc, "twilio").await["failures"].as_u64().unwrap();
    assert_eq!(
        twilio_after - twilio_before,
        refused as u64,
        "each account refusal is a failure for Twilio's breaker"
    );
    let failovers = svc.metric_total("provider_failovers_total").await - failovers_before;
    assert_eq!(failovers, refused as f64);
    twilio_takes_messages_again(stack, svc).await;
}
