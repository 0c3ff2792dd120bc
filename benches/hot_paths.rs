//! Micro-benchmarks of the per-message hot paths: request validation, stream entry and log
//! event encoding/decoding, writing a bulk body and reading a bulk answer. `make bench`
//! prints the figures.

use actors::domain::{validate, Communication, EventStatus, LogEvent, RawRequest, StreamEntry};
use actors::log_indexer::ops_for;
use chrono::Utc;
use comm_aggregator::clients::elastic::{bulk_body, read_bulk_answer};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;

fn hot_paths(c: &mut Criterion) {
    let body = br#"{"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"Your code is 424242"}}"#;
    c.bench_function("parse+validate request", |b| {
        b.iter(|| {
            let raw: RawRequest = serde_json::from_slice(black_box(body)).unwrap();
            validate(&raw).unwrap()
        })
    });
    let raw: RawRequest = serde_json::from_slice(body).unwrap();
    let rec = Communication::new(
        "65f000000000000000000001".into(),
        validate(&raw).unwrap(),
        Utc::now(),
    );
    c.bench_function("stream entry fields", |b| {
        b.iter(|| black_box(&rec).stream_fields())
    });
    let ev = LogEvent::for_record(&rec, "sms", EventStatus::Sent, 1, Utc::now());
    let entry = StreamEntry {
        id: "1-0".into(),
        fields: ev
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    c.bench_function("log event decode + bulk ops", |b| {
        b.iter(|| {
            let ev = LogEvent::from_entry(black_box(&entry)).unwrap();
            ops_for(&ev, "communication-logs", "communications")
        })
    });
    let ops: Vec<_> = (0..500)
        .flat_map(|_| ops_for(&ev, "communication-logs", "communications"))
        .collect();
    c.bench_function("write a 1000-operation bulk body", |b| {
        b.iter(|| bulk_body(black_box(&ops)))
    });
    // As Elasticsearch answers: every item with its index, id, version and shards.
    let answer =
        json!({"took": 30, "errors": false, "items": (0..ops.len()).map(|k| json!({"create": {
        "_index": "communication-logs", "_id": format!("65f000000000000000000001:sent:{k}"),
        "_version": 1, "result": "created", "_shards": {"total": 2, "successful": 1, "failed": 0},
        "_seq_no": k, "_primary_term": 1, "status": 201}})).collect::<Vec<_>>()})
        .to_string();
    c.bench_function("read a 1000-item bulk answer", |b| {
        b.iter(|| read_bulk_answer(black_box(&ops), black_box(answer.as_bytes())))
    });
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
