//! Issue #13 item 7: what a tenant reads of its records carries nothing of our accounts or
//! our network. Provider error texts are stored on records (`lastError`, `errors[]`), and
//! providers put identifiers in them (Meta names the phone-number id it could not find;
//! Twilio names the account; a failed connection names the URL, with the account SID in its
//! path). Real servers and the provider stand-in, as a tenant would see it.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
const PHONE_NUMBER_ID: &str = "100000000000001";

/// Everything a tenant can read of one record: the record itself and its search document.
async fn tenant_view(svc: &Service, id: &str) -> String {
    let (status, rec) = svc.get(&format!("/api/v1/communication/{id}")).await;
    assert_eq!(status, 200, "{rec}");
    rec.to_string()
}

fn assert_clean(view: &str, internal: &[&str]) {
    for needle in internal {
        assert!(
            !view.contains(needle),
            "a tenant's record shows {needle:?}: {view}"
        );
    }
}

async fn wait_for_error(svc: &Service, id: &str) -> Value {
    eventually(
        Duration::from_secs(30),
        "an error on the record",
        || async {
            let (_, rec) = svc.get(&format!("/api/v1/communication/{id}")).await;
            rec.get("lastError").is_some().then_some(rec)
        },
    )
    .await
}

#[tokio::test]
async fn provider_errors_reach_the_tenant_without_our_identifiers() {
    let (stack, _) = shared();
    let svc = start_isolated(9, &[]);
    // Meta's answer to a phone-number id it does not know (Graph API error 100), and
    // Twilio's to a sender that is not on the account: both name what is ours.
    set_fault(
        stack,
        json!({"provider": "whatsapp", "mode": "error", "status": 400, "code": 100,
               "message": format!("(#100) Unsupported post request. Object with ID '{PHONE_NUMBER_ID}' does not exist, cannot be loaded due to missing permissions, or does not support this operation")}),
    )
    .await;
    set_fault(
        stack,
        json!({"provider": "twilio", "mode": "error", "status": 400, "code": 21606,
               "message": format!("The From phone number +15550001111 is not a valid, SMS-capable inbound phone number or short code for your account {ACCOUNT_SID}.")}),
    )
    .await;
    let (s, wa) = svc
        .post(json!({"type": "whatsapp", "data": {"from": "+15550001111", "to": "+15557654321", "msg": unique("leak-wa")}}))
        .await;
    assert_eq!(s, 200, "{wa}");
    let (s, sm) = svc.post(sms(&unique("leak-sms"))).await;
    assert_eq!(s, 200, "{sm}");
    for created in [&wa, &sm] {
        let id = created["id"].as_str().unwrap();
        let rec = wait_for_error(&svc, id).await;
        assert_eq!(rec["status"], "failed", "{rec}");
        // The tenant still learns what went wrong, in the provider's words.
        assert!(
            rec["lastError"].as_str().unwrap().contains("phone number")
                || rec["lastError"]
                    .as_str()
                    .unwrap()
                    .contains("Unsupported post request"),
            "{rec}"
        );
        assert_clean(
            &tenant_view(&svc, id).await,
            &[ACCOUNT_SID, PHONE_NUMBER_ID],
        );
    }
    clear_faults(stack).await;
}

#[tokio::test]
async fn a_failed_connection_does_not_show_the_provider_url() {
    // A provider base nobody answers on: every attempt fails to connect.
    let closed = free_port();
    let base = format!("http://127.0.0.1:{closed}");
    let svc = start_isolated(10, &[("TWILIO_API_BASE", &base), ("MAX_DELIVERIES", "2")]);
    let (s, created) = svc.post(sms(&unique("leak-net"))).await;
    assert_eq!(s, 200, "{created}");
    let id = created["id"].as_str().unwrap();
    let rec = wait_for_error(&svc, id).await;
    assert!(
        rec["lastError"].as_str().unwrap().contains("unreachable"),
        "{rec}"
    );
    assert_clean(
        &tenant_view(&svc, id).await,
        &[
            ACCOUNT_SID,
            &closed.to_string(),
            "127.0.0.1",
            "/2010-04-01/",
        ],
    );
}

#[tokio::test]
async fn a_record_shows_only_the_documented_fields() {
    let svc = start_isolated(11, &[]);
    let (s, created) = svc
        .post(json!({"type": "sms", "data": {"from": "+15550001111", "to": "+15557654321", "msg": unique("fields")}}))
        .await;
    assert_eq!(s, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let rec = eventually(Duration::from_secs(30), "sent", || async {
        let (_, rec) = svc.get(&format!("/api/v1/communication/{id}")).await;
        (rec["status"] == "sent" || rec["status"] == "delivered").then_some(rec)
    })
    .await;
    // The README's list for `GET /api/v1/communication/{id}`: nothing else may reach a
    // tenant, whatever internal field a future change adds to the document.
    let documented = readme_record_fields();
    for key in rec.as_object().unwrap().keys() {
        assert!(
            documented.iter().any(|f| f == key),
            "undocumented field {key:?} reaches the tenant: {rec}"
        );
    }
    // And an internal field written into the document is not shown.
    let (stack, _) = shared();
    stack
        .records()
        .await
        .update_one(
            mongodb::bson::doc! {"_id": mongodb::bson::oid::ObjectId::parse_str(&id).unwrap()},
            mongodb::bson::doc! {"$set": {"internalRoute": "edge-7.internal:4443"}},
        )
        .await
        .unwrap();
    let view = tenant_view(&svc, &id).await;
    assert_clean(&view, &["internalRoute", "edge-7.internal"]);
}

/// The fields the README lists for `GET /api/v1/communication/{id}`: the backquoted list
/// after "as an allow-list of fields", names without their `?` and `[]` marks and notes.
fn readme_record_fields() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("as an allow-list of fields")
        .expect("the README's field list");
    let list = readme[start..]
        .split('`')
        .nth(3)
        .expect("a backquoted list");
    // Notes in brackets out first: "errors[] (one per failed attempt: attempt, at, ...)".
    let mut names = String::new();
    let mut depth = 0;
    for c in list.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if depth == 0 => names.push(c),
            _ => {}
        }
    }
    let fields: Vec<String> = names
        .split(',')
        .map(|f| {
            let name = f.trim().split([' ', '?', '[', '\n']).next().unwrap_or("");
            name.to_string()
        })
        .filter(|f| !f.is_empty())
        .collect();
    assert!(fields.len() > 20, "the README's list read: {fields:?}");
    fields
}
