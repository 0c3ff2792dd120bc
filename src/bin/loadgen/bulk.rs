//! Bulk sends (`--bulk N`): `connections` workers POST `/api/v1/communications/bulk` with N
//! recipients each (every recipient a new number) until `seconds` or `--messages`
//! recipients, then the usual end-to-end phase waits for every accepted recipient to be
//! sent. Prints recipients accepted a second and each send's latency.

use super::{pct, Options};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What the bulk phase did: each send's latency (µs, sorted), the recipients accepted,
/// and the sends that failed.
pub struct BulkRun {
    pub latencies: Vec<u64>,
    pub accepted: u64,
    pub errors: u64,
}

pub async fn accept_phase(
    http: &reqwest::Client,
    opts: &Options,
    size: u64,
    deadline: Instant,
) -> BulkRun {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..opts.connections)
        .map(|_| {
            let (http, next) = (http.clone(), next.clone());
            let (url, kind, limit) = (opts.url.clone(), opts.kind.clone(), opts.messages);
            tokio::spawn(async move {
                let mut mine = (Vec::new(), 0u64, 0u64);
                while Instant::now() < deadline {
                    let first = next.fetch_add(size, Ordering::Relaxed);
                    if first >= limit {
                        break;
                    }
                    let t = Instant::now();
                    match send(&http, &url, &kind, first, size).await {
                        Some(n) => {
                            mine.0.push(t.elapsed().as_micros() as u64);
                            mine.1 += n;
                        }
                        None => mine.2 += 1,
                    }
                }
                mine
            })
        })
        .collect();
    let mut run = BulkRun {
        latencies: Vec::new(),
        accepted: 0,
        errors: 0,
    };
    for w in workers {
        let (lat, accepted, errors) = w.await.unwrap();
        run.latencies.extend(lat);
        run.accepted += accepted;
        run.errors += errors;
    }
    run.latencies.sort_unstable();
    run
}

/// One bulk send of recipients `first..first + size`; the recipients it accepted.
async fn send(http: &reqwest::Client, url: &str, kind: &str, first: u64, size: u64) -> Option<u64> {
    let run_id = std::process::id() as u64 % 100;
    let recipients: Vec<Value> = (first..first + size)
        .map(|n| match kind {
            "email" => json!({"to": format!("user{n}@example.com")}),
            _ => json!({"to": format!("+1555{:02}{:05}", run_id, n % 100_000)}),
        })
        .collect();
    let from = if kind == "email" {
        "noreply@example.com"
    } else {
        "+15550001111"
    };
    let body = json!({"type": kind, "data": {"from": from, "msg": format!("bulk from {first}")},
                      "recipients": recipients});
    let r = http
        .post(format!("{url}/api/v1/communications/bulk"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json::<Value>().await.ok()?["accepted"].as_u64()
}

pub fn report(run: &BulkRun, size: u64, connections: usize, secs: f64) {
    println!(
        "bulk: {connections} connections, {size} recipients a send, {secs:.1} s, {} sends, {} recipients accepted, {} failed sends",
        run.latencies.len(),
        run.accepted,
        run.errors
    );
    println!("recipients accepted/s: {:.0}", run.accepted as f64 / secs);
    let lat = &run.latencies;
    println!(
        "bulk send latency ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        pct(lat, 0.50),
        pct(lat, 0.99),
        pct(lat, 1.0)
    );
}
