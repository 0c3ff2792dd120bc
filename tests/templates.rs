//! Templates (issue #16, first part), on real servers: created, changed (a new version,
//! the old one still readable), listed, previewed, deleted, per tenant; a message sent
//! from a template carries the rendered text to the provider and the template's name and
//! version on its record; a missing variable is a 400 naming it and nothing is stored; a
//! locale variant is chosen; an SMS too long once rendered is refused.

mod common;

use common::{client, client_for, eventually, shared, unique, OTHER_KEY};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

async fn call(method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let (_, svc) = shared();
    let mut rb = client().request(method, svc.url(path));
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let res = rb.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_versioned_previewed_and_kept_per_tenant() {
    use reqwest::Method;
    let name = unique("otp").replace('-', "_");
    let path = format!("/api/v1/templates/{name}");
    let (s, t) = call(
        Method::POST,
        "/api/v1/templates",
        Some(json!({"name": name, "type": "sms", "body": "Code {{ code }}"})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(
        (t["version"].as_u64(), t["type"].as_str()),
        (Some(1), Some("sms"))
    );
    let (s, again) = call(
        Method::POST,
        "/api/v1/templates",
        Some(json!({"name": name, "type": "sms", "body": "other"})),
    )
    .await;
    assert_eq!(
        (s, again["error"]["code"].as_str()),
        (409, Some("template_exists"))
    );
    let (s, t) = call(Method::PUT, &path,
        Some(json!({"body": "Your code: {{ code }}", "locales": {"de": {"body": "Ihr Code: {{ code }}"}}}))).await;
    assert_eq!((s, t["version"].as_u64()), (200, Some(2)), "{t}");
    let (s, v1) = call(Method::GET, &format!("{path}?version=1"), None).await;
    assert_eq!((s, v1["body"].as_str()), (200, Some("Code {{ code }}")));
    let (s, none) = call(Method::GET, &format!("{path}?version=99"), None).await;
    assert_eq!(
        (s, none["error"]["field"].as_str()),
        (400, Some("version")),
        "{none}"
    );
    let (_, cur) = call(Method::GET, &path, None).await;
    assert_eq!(cur["versions"], json!([1, 2]));
    let (s, p) = call(
        Method::POST,
        &format!("{path}/preview"),
        Some(json!({"variables": {"code": "9"}, "locale": "de-CH"})),
    )
    .await;
    assert_eq!(
        (s, p["body"].as_str(), p["locale"].as_str()),
        (200, Some("Ihr Code: 9"), Some("de")),
        "{p}"
    );
    let (s, p) = call(
        Method::POST,
        &format!("{path}/preview"),
        Some(json!({"variables": {}})),
    )
    .await;
    assert_eq!(
        (s, p["error"]["code"].as_str(), p["error"]["field"].as_str()),
        (
            400,
            Some("template_variable_missing"),
            Some("variables.code")
        )
    );
    let (s, bad) = call(Method::PUT, &path, Some(json!({"body": "{{ broken"}))).await;
    assert_eq!(
        (s, bad["error"]["code"].as_str()),
        (400, Some("template_syntax"))
    );
    // Another tenant sees none of it.
    let (_, svc) = shared();
    let other = client_for(OTHER_KEY)
        .get(svc.url(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let (_, list) = call(Method::GET, "/api/v1/templates", None).await;
    assert!(list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == name.as_str()));
    let (s, _) = call(Method::DELETE, &path, None).await;
    assert_eq!(s, 204);
    assert_eq!(call(Method::GET, &path, None).await.0, 404);
    assert_eq!(
        call(Method::GET, &format!("{path}?version=2"), None)
            .await
            .0,
        404,
        "deleted is gone"
    );
    // Made again, it goes on from its last version.
    let (s, t) = call(
        Method::POST,
        "/api/v1/templates",
        Some(json!({"name": name, "type": "sms", "body": "Back: {{ code }}"})),
    )
    .await;
    assert_eq!((s, t["version"].as_u64()), (201, Some(3)), "{t}");
    assert_eq!(
        call(Method::GET, &format!("{path}?version=1"), None)
            .await
            .0,
        200
    );
}

/// An email template with an `html` body: the mail is multipart/alternative, its HTML part
/// has every value escaped and its text part has them as given; the record keeps the HTML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_template_sends_a_text_and_an_escaped_html_part() {
    use reqwest::Method;
    let (stack, svc) = shared();
    let name = unique("html").replace('-', "_");
    let marker = unique("ref").replace('-', "");
    let (s, t) = call(
        Method::POST,
        "/api/v1/templates",
        Some(json!({"name": name, "type": "email", "subject": "Ref {{ ref }}",
            "body": "Dear {{ who }}, ref {{ ref }}", "html": "<p>Dear {{ who }}, ref {{ ref }}</p>"})),
    )
    .await;
    assert_eq!(
        (s, t["html"].as_str()),
        (201, Some("<p>Dear {{ who }}, ref {{ ref }}</p>")),
        "{t}"
    );
    let (s, answer) = svc
        .post(
            json!({"type": "email", "data": {"from": "a@example.com", "to": "b@example.com",
            "template": name, "variables": {"who": "<i>Ann</i>", "ref": marker}}}),
        )
        .await;
    assert_eq!(s, 200, "{answer}");
    let mail = eventually(WAIT, "the mail at the SMTP server", || async {
        stack.mails().into_iter().find(|m| m.contains(&marker))
    })
    .await;
    assert!(mail.contains("multipart/alternative"), "{mail}");
    assert!(mail.contains("Content-Type: text/plain"), "{mail}");
    assert!(mail.contains("Content-Type: text/html"), "{mail}");
    assert!(
        mail.contains(&format!("Dear <i>Ann</i>, ref {marker}")),
        "{mail}"
    );
    assert!(
        mail.contains(&format!(
            "<p>Dear &lt;i&gt;Ann&lt;&#x2f;i&gt;, ref {marker}</p>"
        )),
        "{mail}"
    );
    let id = answer["id"].as_str().unwrap();
    let (_, rec) = svc.get(&format!("/api/v1/communication/{id}")).await;
    assert_eq!(
        rec["html"].as_str(),
        Some(format!("<p>Dear &lt;i&gt;Ann&lt;&#x2f;i&gt;, ref {marker}</p>").as_str())
    );
    assert_eq!(
        rec["msg"].as_str(),
        Some(format!("Dear <i>Ann</i>, ref {marker}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_a_template_is_rendered_and_remembers_its_version() {
    use reqwest::Method;
    let (stack, svc) = shared();
    let name = unique("welcome").replace('-', "_");
    let marker = unique("m");
    let (s, _) = call(
        Method::POST,
        "/api/v1/templates",
        Some(json!({
        "name": name, "type": "email", "subject": "Welcome {{ user }}",
        "body": "Hello {{ user }}, your ref is {{ ref }}",
        "locales": {"fr": {"body": "Bonjour {{ user }}, ref {{ ref }}", "subject": "Bienvenue"}}})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, answer) = svc
        .post(
            json!({"type": "email", "data": {"from": "a@example.com", "to": "b@example.com",
        "template": name, "variables": {"user": "Zoë", "ref": marker}, "locale": "fr-CA"}}),
        )
        .await;
    assert_eq!(s, 200, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    let mail = eventually(WAIT, "the mail at the SMTP server", || async {
        stack.mails().into_iter().find(|m| m.contains(&marker))
    })
    .await;
    assert!(
        mail.contains("Bonjour") && mail.contains("Bienvenue"),
        "{mail}"
    );
    let rec = stack.record(&id).await.unwrap();
    let t = rec.get_document("template").unwrap();
    assert_eq!(t.get_str("name").unwrap(), name);
    assert_eq!(t.get_i64("version").unwrap(), 1);
    assert_eq!(t.get_str("locale").unwrap(), "fr");

    // A missing variable: 400 naming it, nothing stored.
    let (s, refused) = svc
        .post(
            json!({"type": "email", "data": {"from": "a@example.com", "to": "b@example.com",
        "template": name, "variables": {"user": unique("nobody")}}}),
        )
        .await;
    assert_eq!(
        (s, refused["error"]["field"].as_str()),
        (400, Some("variables.ref")),
        "{refused}"
    );
    // msg and template together, an unknown template, a template of another channel.
    for (data, field) in [
        (
            json!({"to": "+15557654321", "template": name, "msg": "x"}),
            "msg",
        ),
        (
            json!({"to": "+15557654321", "template": "no_such_template"}),
            "template",
        ),
        (
            json!({"to": "+15557654321", "template": name, "variables": {"user": "u", "ref": "r"}}),
            "template",
        ),
    ] {
        let mut data = data;
        data["from"] = json!("+15550001111");
        let (s, a) = svc.post(json!({"type": "sms", "data": data})).await;
        assert_eq!((s, a["error"]["field"].as_str()), (400, Some(field)), "{a}");
    }
    // Rendered too long for an SMS.
    let long = unique("long").replace('-', "_");
    call(
        Method::POST,
        "/api/v1/templates",
        Some(json!({"name": long, "type": "sms", "body": "{{ x }}{{ x }}"})),
    )
    .await;
    let (s, a) = svc
        .post(
            json!({"type": "sms", "data": {"from": "+15550001111", "to": "+15557654321",
        "template": long, "variables": {"x": "y".repeat(900)}}}),
        )
        .await;
    assert_eq!((s, a["error"]["field"].as_str()), (400, Some("msg")), "{a}");
}
