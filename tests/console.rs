//! The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver by `tests/common/webdriver.rs`), against the service on real
//! servers: sign in with a key, a message sent through the API appears and turns
//! `delivered` without a reload, its timeline, a dead letter replayed (sent once), another
//! tenant's key sees none of it; and a screenshot of each page for the README
//! (`docs/console/*.png`).

mod common;

use common::webdriver::Browser;
use common::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A message accepted through the API; its id.
async fn send(svc: &Service, msg: &str) -> String {
    let (status, answer) = svc.post(sms(msg)).await;
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().unwrap().to_string()
}

async fn until_status(svc: &Service, id: &str, status: &str) {
    eventually(WAIT, &format!("{id} {status}"), || async {
        (svc.get(&format!("/api/v1/communication/{id}")).await.1["status"] == status).then_some(())
    })
    .await;
}

/// Sign in on the console's page with `key`; the messages page is shown.
async fn sign_in(b: &Browser, svc: &Service, key: &str) {
    b.goto(&svc.url("/console")).await;
    let field = b.wait_for("#key", WAIT, "the sign-in form").await;
    field.send_keys(key).await;
    b.find("#signin-submit").await.unwrap().click().await;
    b.wait_for("#messages", WAIT, "the messages page").await;
}

/// The status the page shows for message `id` on the messages list, once it is `status`.
async fn row_turns(b: &Browser, id: &str, status: &str) {
    let css = format!("tr[data-id='{id}'] td[data-status='{status}']");
    b.wait_for(&css, WAIT, &format!("{id} {status} on the list"))
        .await;
}

fn shot(name: &str) -> std::path::PathBuf {
    root().join("docs/console").join(format!("{name}.png"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_a_message_live_replays_a_dead_letter_and_shows_one_tenant() {
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[("MAX_ATTEMPTS", "1")]));
    // A dead letter to replay: the provider refuses it.
    set_fault(
        &stack,
        json!({"provider": "twilio", "mode": "5xx", "status": 503}),
    )
    .await;
    let dead_msg = unique("console-dead <b>not bold</b>");
    let dead = send(&svc, &dead_msg).await;
    until_status(&svc, &dead, "failed").await;
    clear_faults(&stack).await;

    // Served with a policy that allows this origin's script only (no inline script).
    let page = client().get(svc.url("/console")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    let b = Browser::start(&stack.dir).await;
    b.goto(&svc.url("/console")).await;
    b.wait_for("#signin", WAIT, "the sign-in form").await;
    b.screenshot(&shot("sign-in")).await;
    sign_in(&b, &svc, API_KEY).await;
    // Marks this page load: still there at the end means nothing reloaded it.
    b.script("window.__sameLoad = 42; return null", json!([]))
        .await;

    // Sent through the API: it appears on the list and turns delivered by itself.
    let msg = unique("console-live");
    let id = send(&svc, &msg).await;
    row_turns(&b, &id, "delivered").await;
    let text = b.find(&format!("tr[data-id='{id}'] td.msg")).await.unwrap();
    assert_eq!(text.text().await, msg);
    b.wait_for("#counts span[data-count='delivered']", WAIT, "the counts")
        .await;
    // Bodies are text, never markup.
    assert!(
        b.find("#messages b").await.is_none(),
        "a body became markup"
    );
    let live = b.find("#live").await.unwrap().text().await;
    println!("the list followed the message by {live}");
    b.screenshot(&shot("messages")).await;

    // Its page: the record and every event.
    b.find(&format!("tr[data-id='{id}']"))
        .await
        .unwrap()
        .click()
        .await;
    for ev in ["queued", "sent", "delivered"] {
        b.wait_for(
            &format!("#timeline tr[data-event='{ev}']"),
            WAIT,
            &format!("the {ev} event"),
        )
        .await;
    }
    let status = b.wait_for("#record-status", WAIT, "the record").await;
    assert_eq!(status.text().await, "delivered");
    b.screenshot(&shot("message")).await;

    b.find("#nav-providers").await.unwrap().click().await;
    b.wait_for(
        "#providers tr[data-provider='sms:twilio']",
        WAIT,
        "Twilio's row",
    )
    .await;
    b.screenshot(&shot("providers")).await;

    // The dead letter, replayed from its row: sent once.
    b.find("#nav-dead-letters").await.unwrap().click().await;
    let replay = format!("#dead-letters button.replay[data-id='{dead}']");
    b.wait_for(&replay, WAIT, "the dead letter's Replay button")
        .await;
    b.screenshot(&shot("dead-letters")).await;
    b.find(&replay).await.unwrap().click().await;
    b.wait_for("#no-dead-letters", WAIT, "the list without it")
        .await;
    until_status(&svc, &dead, "sent").await;
    let sent = stack.sandbox_messages().await;
    assert_eq!(sent.iter().filter(|m| m["body"] == dead_msg).count(), 1);
    let same = b.script("return window.__sameLoad", json!([])).await;
    assert_eq!(same, json!(42), "the page was reloaded");

    // Another tenant's key: none of this tenant's messages or dead letters.
    b.find("#signout").await.unwrap().click().await;
    sign_in(&b, &svc, OTHER_KEY).await;
    b.wait_for("#total", WAIT, "the other tenant's list").await;
    eventually(WAIT, "the other tenant's search answered", || async {
        let t = b.find("#total").await?.text().await;
        t.contains("message(s)").then_some(())
    })
    .await;
    assert!(b.find_all("#messages tr").await.is_empty());
    b.find("#nav-dead-letters").await.unwrap().click().await;
    b.wait_for("#no-dead-letters", WAIT, "an empty list").await;
    let page = b
        .script("return document.documentElement.outerHTML", json!([]))
        .await;
    let page = page.as_str().unwrap();
    for theirs in [&id, &dead, &msg, &dead_msg] {
        assert!(
            !page.contains(theirs.as_str()),
            "{theirs} reached the other tenant"
        );
    }
    b.quit().await;
}
