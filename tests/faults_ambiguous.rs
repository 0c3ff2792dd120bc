//! Ambiguous provider outcomes (issue 12, item 1): a provider that takes a message but
//! answers after our timeout. The outcome of such a call is unknown, not failed: before a
//! resend the sender asks the provider where it can (Twilio's Messages list), and every
//! resend that may duplicate is flagged on the record and counted. Each scenario starts its
//! own stack, runs one at a time, and ends with the books: accepted = sent + failed, every
//! send seen by the stand-in, every duplicate flagged and counted.

mod common;

use common::*;
use mongodb::bson::{doc, oid::ObjectId, Document};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const BOOKS_WAIT: Duration = Duration::from_secs(45);

/// A stack whose `provider` stand-in takes every message and answers 3 s later, and a
/// service that waits 1.5 s for an answer.
async fn late_provider(provider: &str, max_attempts: &'static str) -> (Stack, Service) {
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[
        ("PROVIDER_TIMEOUT_MS", "1500"),
        ("MAX_ATTEMPTS", max_attempts),
    ]));
    set_fault(
        &stack,
        json!({"provider": provider, "mode": "late", "latency_ms": 3000}),
    )
    .await;
    (stack, svc)
}

/// POST `n` messages of `channel` with bodies `{tag}-{i}`; all must be accepted.
async fn post_all(svc: &Service, channel: &str, tag: &str, n: usize) -> Vec<(String, String)> {
    let mut accepted = Vec::new();
    for i in 0..n {
        let body = format!("{tag}-{i}");
        let (s, v) = svc
            .post(json!({"type": channel, "data": {"from": "+15550001111", "to": "+15557654321", "msg": body}}))
            .await;
        assert_eq!(s, 200, "{v}");
        accepted.push((body, v["id"].as_str().unwrap().to_string()));
    }
    accepted
}

/// Wait until every record is final; return them by id.
async fn final_records(stack: &Stack, accepted: &[(String, String)]) -> HashMap<String, Document> {
    let coll = stack.records().await;
    let oids: Vec<ObjectId> = accepted
        .iter()
        .map(|(_, id)| ObjectId::parse_str(id).unwrap())
        .collect();
    eventually(BOOKS_WAIT, "every accepted message final", || {
        let (coll, oids) = (coll.clone(), oids.clone());
        async move {
            let open = coll
                .count_documents(
                    doc! {"_id": {"$in": &oids}, "status": {"$in": ["pending", "sending"]}},
                )
                .await
                .ok()?;
            (open == 0).then_some(())
        }
    })
    .await;
    let mut out = HashMap::new();
    for (_, id) in accepted {
        let d = coll
            .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("accepted {id} is not in MongoDB"));
        out.insert(id.clone(), d);
    }
    out
}

/// What the stand-in took, by body: the provider message ids it gave.
async fn seen_by_body(stack: &Stack) -> HashMap<String, Vec<String>> {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for m in stack.sandbox_messages().await {
        if let (Some(b), Some(id)) = (m["body"].as_str(), m["id"].as_str()) {
            seen.entry(b.to_string()).or_default().push(id.to_string());
        }
    }
    seen
}

/// `possible_duplicate_sends_total` for one channel and cause, from `/metrics`.
async fn duplicates_counted(svc: &Service, channel: &str, cause: &str) -> u64 {
    let text = get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("comm_aggregator_possible_duplicate_sends_total{"))
        .filter(|l| {
            l.contains(&format!("channel=\"{channel}\""))
                && l.contains(&format!("cause=\"{cause}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The books of an SMS scenario where every first answer was lost: once every record is
/// final, each message reached Twilio exactly once, its record is `sent` (accepted = sent)
/// with Twilio's SID and unflagged, and it remembers the unknown attempt and its `cause`.
async fn found_once(stack: &Stack, accepted: &[(String, String)], cause: &str) {
    let records = final_records(stack, accepted).await;
    clear_faults(stack).await;
    let seen = seen_by_body(stack).await;
    for (body, id) in accepted {
        let d = &records[id];
        let sids = seen.get(body).cloned().unwrap_or_default();
        assert_eq!(
            sids.len(),
            1,
            "{body} reached Twilio {} times: {d}",
            sids.len()
        );
        // Sent; Twilio's status callbacks (matched by that SID) may have moved it on.
        assert!(
            matches!(d.get_str("status"), Ok("sent" | "delivered")),
            "{d}"
        );
        assert_eq!(
            d.get_str("providerMessageId").ok(),
            Some(sids[0].as_str()),
            "the record carries the SID Twilio gave: {d}"
        );
        assert!(
            d.get_bool("possibleDuplicate").is_err(),
            "nothing was sent twice, nothing to flag: {d}"
        );
        assert_eq!(d.get_str("unknownCause").ok(), Some(cause), "{d}");
    }
}

/// The scenario: timeout 1.5 s, a Twilio that takes each SMS and answers after 3 s.
/// The first call of each times out; before sending again the sender finds the message in
/// Twilio's list, so each SMS reaches Twilio exactly once and its record says `sent` with
/// Twilio's SID, unflagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_answer_after_the_timeout_is_found_not_sent_again() {
    let _one = one_at_a_time().await;
    let (stack, svc) = late_provider("twilio", "5").await;
    let tag = unique("late-sms");
    let accepted = post_all(&svc, "sms", &tag, 10).await;
    found_once(&stack, &accepted, "timeout").await;
    assert_eq!(duplicates_counted(&svc, "sms", "timeout").await, 0);
}

/// A proxy in front of Twilio loses the answer: the message is taken, the service gets a
/// bare `502 Bad Gateway` (no Twilio body). That outcome is unknown too: the lookup finds
/// the message, and each SMS reaches Twilio once and is recorded with Twilio's SID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_502_after_twilio_took_the_message_is_found_not_sent_again() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[("MAX_ATTEMPTS", "5")]));
    set_fault(&stack, json!({"provider": "twilio", "mode": "gateway"})).await;
    let tag = unique("gateway-sms");
    let accepted = post_all(&svc, "sms", &tag, 5).await;
    found_once(&stack, &accepted, "ambiguous_5xx").await;
    assert_eq!(duplicates_counted(&svc, "sms", "ambiguous_5xx").await, 0);
}

/// Meta has no lookup: after a timeout the message is sent again, and every record the
/// stand-in saw more than once is flagged `possibleDuplicate` (cause `timeout`, with the
/// attempt that timed out) and counted. A duplicate nobody flagged fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_resend_after_a_timeout_is_flagged_and_counted() {
    let _one = one_at_a_time().await;
    let (stack, svc) = late_provider("whatsapp", "8").await;
    let tag = unique("late-wa");
    let accepted = post_all(&svc, "whatsapp", &tag, 10).await;
    // Every first call times out; then the provider answers in time again.
    let coll = stack.records().await;
    eventually(
        Duration::from_secs(20),
        "every first call timed out",
        || {
            let coll = coll.clone();
            let tag = tag.clone();
            async move {
                let n = coll
                    .count_documents(
                        doc! {"msg": {"$regex": format!("^{tag}-")}, "errors.code": "timeout"},
                    )
                    .await
                    .ok()?;
                (n == 10).then_some(())
            }
        },
    )
    .await;
    clear_faults(&stack).await;
    let records = final_records(&stack, &accepted).await;
    let seen = seen_by_body(&stack).await;
    let (mut sent, mut failed, mut extra_sends) = (0, 0, 0u64);
    for (body, id) in &accepted {
        let d = &records[id];
        let n = seen.get(body).map_or(0, Vec::len);
        assert!(n >= 1, "{body} never reached the stand-in: {d}");
        match d.get_str("status").unwrap() {
            "sent" | "delivered" | "read" | "undelivered" => sent += 1,
            _ => failed += 1,
        }
        if n > 1 {
            extra_sends += n as u64 - 1;
            assert_eq!(
                d.get_bool("possibleDuplicate").ok(),
                Some(true),
                "{body} reached the stand-in {n} times, unflagged: {d}"
            );
            assert_eq!(
                d.get_str("possibleDuplicateCause").ok(),
                Some("timeout"),
                "{d}"
            );
            assert!(
                d.get_i32("possibleDuplicateAttempt").unwrap_or(0) >= 1,
                "the flag names the attempt that timed out: {d}"
            );
        }
    }
    assert_eq!(sent + failed, accepted.len(), "accepted = sent + failed");
    assert!(extra_sends >= 10, "every message was resent at least once");
    let counted = duplicates_counted(&svc, "whatsapp", "timeout").await;
    assert!(
        counted >= extra_sends,
        "{extra_sends} resends reached the stand-in, {counted} counted"
    );
}
