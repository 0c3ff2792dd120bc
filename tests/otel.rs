//! OpenTelemetry traces (README, "OpenTelemetry traces"): with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at an OTLP/HTTP receiver this test runs, one message's spans (its request, its
//! group commit, its provider call, its receipt) come in one trace, the caller's
//! `traceparent` at its root; without it no trace context is carried at all.

mod common;

use common::{client, eventually, one_at_a_time, sms, unique, Stack};
use mongodb::bson::{doc, oid::ObjectId, Document};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warp::Filter;

const WAIT: Duration = Duration::from_secs(30);
/// The caller's trace and span, as its `traceparent` names them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What the receiver was sent: each POST /v1/traces body.
type Received = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP (JSON) receiver on a free port: its base URL and what it received.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let store = got.clone();
    let route = warp::post()
        .and(warp::path!("v1" / "traces"))
        .and(warp::body::bytes())
        .map(move |body: bytes::Bytes| {
            let v: Value = serde_json::from_slice(&body).expect("an OTLP/JSON body");
            store.lock().unwrap().push(v);
            warp::reply::json(&serde_json::json!({}))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (url, got)
}

/// Every span received, flattened out of its resource and scope.
fn spans(got: &Received) -> Vec<Value> {
    let bodies = got.lock().unwrap().clone();
    bodies
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// A span's string attribute.
fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

/// The span named `name` about communication `id` (attribute `key`).
fn find<'a>(spans: &'a [Value], name: &str, key: &str, id: &str) -> Option<&'a Value> {
    spans
        .iter()
        .find(|s| s["name"] == name && attr(s, key) == Some(id))
}

async fn accept(port: u16, msg: &str, traceparent: &str) -> String {
    let res = client()
        .post(format!("http://127.0.0.1:{port}/api/v1/communication"))
        .header("traceparent", traceparent)
        .json(&sms(msg))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["id"].as_str().expect("an id").to_string()
}

async fn record_in(stack: &Stack, id: &str, status: &str) -> Document {
    eventually(WAIT, &format!("record {id} {status}"), || async {
        stack
            .records()
            .await
            .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
            .await
            .unwrap()
            .filter(|d| d.get_str("status") == Ok(status))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_from_its_request_through_the_stream_to_its_receipt() {
    let _one = one_at_a_time().await;
    let (url, got) = receiver().await;
    let (stack, svc) = tokio::task::block_in_place(|| {
        let stack = Stack::start();
        let svc = stack.start_service(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &url),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ]);
        (stack, svc)
    });
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let id = accept(svc.port, &unique("traced"), &traceparent).await;
    let rec = record_in(&stack, &id, "delivered").await;
    // The context is kept on the record for the receipt, and no tenant sees it.
    assert!(rec.get_str("traceparent").unwrap().contains(TRACE_ID));
    let (_, view) = svc.get(&format!("/api/v1/communication/{id}")).await;
    assert_eq!(view["id"], id.as_str());
    assert!(view.get("traceparent").is_none(), "{view}");

    let all = eventually(WAIT, "the message's four spans", || async {
        let all = spans(&got);
        let complete = find(&all, "http", "path", "/api/v1/communication").is_some()
            && find(&all, "commit", "communication_id", &id).is_some()
            && find(&all, "communication", "id", &id).is_some()
            && find(&all, "receipt", "communication_id", &id).is_some();
        complete.then_some(all)
    })
    .await;
    let http = all
        .iter()
        .find(|s| s["name"] == "http" && s["traceId"] == TRACE_ID)
        .expect("the request's span in the caller's trace");
    assert_eq!(http["parentSpanId"], CALLER_SPAN, "{http}");
    let http_span = http["spanId"].as_str().unwrap();
    for (name, key) in [
        ("commit", "communication_id"),
        ("communication", "id"),
        ("receipt", "communication_id"),
    ] {
        let s = find(&all, name, key, &id).unwrap();
        assert_eq!(s["traceId"], TRACE_ID, "{name}: {s}");
        assert_eq!(s["parentSpanId"], http_span, "{name}: {s}");
    }
    let provider_call = find(&all, "communication", "id", &id).unwrap();
    assert_eq!(attr(provider_call, "channel"), Some("sms"));
    assert!(got.lock().unwrap().iter().any(|b| {
        b["resourceSpans"][0]["resource"]["attributes"]
            .as_array()
            .is_some_and(|a| {
                a.iter().any(|kv| {
                    kv["key"] == "service.name" && kv["value"]["stringValue"] == "comm-aggregator"
                })
            })
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_trace_context_is_carried() {
    let _one = one_at_a_time().await;
    let (stack, svc) = tokio::task::block_in_place(|| {
        let stack = Stack::start();
        let svc = stack.start_service(&[]);
        (stack, svc)
    });
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let id = accept(svc.port, &unique("untraced"), &traceparent).await;
    // Stored, sent and delivered as ever, with no context on the record: the hooks that
    // read and carry it are installed only with an exporter.
    let rec = record_in(&stack, &id, "delivered").await;
    assert!(rec.get("traceparent").is_none(), "{rec}");
}

/// The spans still batched when SIGTERM comes (the export interval here is ten minutes) are
/// exported once the shutdown's stages are over, before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_batched_at_shutdown_are_exported_before_the_exit() {
    let _one = one_at_a_time().await;
    let (url, got) = receiver().await;
    let (_stack, mut svc) = tokio::task::block_in_place(|| {
        let stack = Stack::start();
        let svc = stack.start_service(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &url),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ]);
        (stack, svc)
    });
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    accept(svc.port, &unique("flushed"), &traceparent).await;
    svc.proc.signal(libc::SIGTERM);
    let exit = tokio::task::block_in_place(|| svc.proc.child.wait()).unwrap();
    assert!(exit.success(), "{exit:?}");
    let all = spans(&got);
    let http = all
        .iter()
        .find(|s| s["name"] == "http" && s["traceId"] == TRACE_ID)
        .expect("the request's span, exported at shutdown");
    assert_eq!(http["parentSpanId"], CALLER_SPAN);
}
