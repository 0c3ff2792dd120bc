//! loadgen: drives a running service and prints what the Performance section quotes.
//!
//! `loadgen [--url http://127.0.0.1:3001] [--connections 32] [--seconds 20] [--type sms]
//! [--api-key KEY] [--accept-only]` (the key also from `LOADGEN_API_KEY`; none is needed
//! in `DEV_MODE`). `--accept-only` stops after phase 1.
//! Start the service with a high `API_RATE_PER_SEC` and `RECIPIENT_MAX=0` (or distinct
//! numbers), or the limits, not the pipeline, are what gets measured.
//!
//! Phase 1 (accept): `connections` workers POST as fast as answers come for `seconds`, each
//! request to a new recipient. Prints accepted requests/s and p50/p99/p99.9 latency.
//! Phase 2 (end to end): waits until the service reports every accepted message sent
//! (`deliveries_total` on `/metrics`) and prints messages/s from the first request to the
//! last send, and the p99 accept→sent latency (from `accept_to_sent_seconds`).
//! Also: the service's idle and peak RSS (VmRSS before, VmHWM after, from /proc), and the
//! CPU each local server used during the run, to show which one is the limit.

use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Processes by name, as /proc shows them: name → (pid, cpu ticks).
fn processes() -> HashMap<&'static str, Vec<(i32, u64)>> {
    let watch = [
        ("comm-aggregator", "target/release/comm-aggregator"),
        ("secantusdb (MongoDB)", "secantusd"),
        ("redis", "redis-server"),
        ("osmem (Elasticsearch)", "osmem-server"),
        ("provider-sandbox", "provider-sandbox"),
        ("aiosmtpd", "aiosmtpd"),
    ];
    let mut out: HashMap<&'static str, Vec<(i32, u64)>> = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let Some((label, _)) = watch.iter().find(|(_, needle)| cmd.contains(needle)) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.entry(label).or_default().push((pid, ticks));
    }
    out
}

fn status_kb(pid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn metric_sum(text: &str, name: &str, must: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && must.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn buckets(text: &str, channel: &str) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| {
            l.starts_with("accept_to_sent_seconds_bucket")
                && l.contains(&format!("channel=\"{channel}\""))
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    v
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let url = arg("--url", "http://127.0.0.1:3001");
    let conns: usize = arg("--connections", "32").parse().expect("--connections");
    let secs: u64 = arg("--seconds", "20").parse().expect("--seconds");
    let kind = arg("--type", "sms");
    let key = std::env::var("LOADGEN_API_KEY").unwrap_or_default();
    let key = arg("--api-key", &key);
    let mut headers = reqwest::header::HeaderMap::new();
    if !key.is_empty() {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse().expect("--api-key"),
        );
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(conns)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let metrics = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let before = metrics(http.clone(), url.clone())
        .await
        .expect("the service's /metrics (is it running?)");
    let sent_before = metric_sum(
        &before,
        "deliveries_total",
        &[&format!("channel=\"{kind}\""), "outcome=\"sent\""],
    );
    let buckets_before = buckets(&before, &kind);
    let procs_before = processes();
    let service_pid = procs_before
        .get("comm-aggregator")
        .and_then(|v| v.first())
        .map(|p| p.0);
    let idle_rss = service_pid.and_then(|p| status_kb(p, "VmRSS:"));

    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let run_id = std::process::id() as u64 % 100;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (http, url, kind, counter, errors) = (
            http.clone(),
            url.clone(),
            kind.clone(),
            counter.clone(),
            errors.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let to = format!("+1555{:02}{:05}", run_id, n % 100_000);
                let (to, from) = if kind == "email" {
                    (format!("user{n}@example.com"), "noreply@example.com".to_string())
                } else {
                    (to, "+15550001111".to_string())
                };
                let body = json!({"type": kind, "data": {"from": from, "to": to, "msg": format!("load {n}")}});
                let t = Instant::now();
                match http.post(format!("{url}/api/v1/communication")).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat: Vec<u64> = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    let accept_secs = start.elapsed().as_secs_f64();
    let procs_mid = processes();
    lat.sort_unstable();
    let ok = lat.len() as f64;
    println!(
        "accept: {} connections, {:.1} s, {} accepted, {} errors",
        conns,
        accept_secs,
        lat.len(),
        errors.load(Ordering::Relaxed)
    );
    println!("accepted requests/s: {:.0}", ok / accept_secs);
    println!(
        "accept latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        pct(&lat, 1.0)
    );
    println!("CPU during the accept phase (cores):");
    for (name, list) in &procs_mid {
        let used: u64 = list
            .iter()
            .map(|(pid, t)| {
                let b = procs_before
                    .get(name)
                    .and_then(|v| v.iter().find(|(p, _)| p == pid))
                    .map(|x| x.1)
                    .unwrap_or(0);
                t.saturating_sub(b)
            })
            .sum();
        println!("  {name:<24} {:.2}", used as f64 / 100.0 / accept_secs);
    }

    if std::env::args().any(|a| a == "--accept-only") {
        if let Some(pid) = service_pid {
            if let Some(kb) = status_kb(pid, "VmHWM:") {
                println!("service RSS: peak {} MB (VmHWM)", kb / 1024);
            }
        }
        return;
    }

    // End to end: until every accepted message is reported sent.
    let mut last = before;
    let drained = loop {
        if let Some(m) = metrics(http.clone(), url.clone()).await {
            let sent = metric_sum(
                &m,
                "deliveries_total",
                &[&format!("channel=\"{kind}\""), "outcome=\"sent\""],
            ) - sent_before;
            last = m;
            if sent >= ok {
                break Some(start.elapsed().as_secs_f64());
            }
        }
        if start.elapsed() > Duration::from_secs(secs + 600) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    match drained {
        Some(t) => println!(
            "end to end: {} messages sent in {:.1} s: {:.0} messages/s",
            lat.len(),
            t,
            ok / t
        ),
        None => println!("end to end: not drained within the time limit"),
    }
    let after = buckets(&last, &kind);
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - buckets_before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map(|x| x.1)
                    .unwrap_or(0.0),
            )
        })
        .collect();
    if let Some(total) = delta.last().map(|x| x.1).filter(|t| *t > 0.0) {
        let p99 = delta
            .iter()
            .find(|(_, c)| *c >= 0.99 * total)
            .map(|x| x.0)
            .unwrap_or(f64::INFINITY);
        println!("accept->sent latency p99: <= {p99} s (histogram bucket)");
    }
    if let Some(pid) = service_pid {
        println!(
            "service RSS: idle {} MB, peak {} MB (VmHWM)",
            idle_rss.unwrap_or(0) / 1024,
            status_kb(pid, "VmHWM:").unwrap_or(0) / 1024
        );
    }
}
