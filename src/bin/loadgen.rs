//! loadgen: drives a running service and prints what the Performance section quotes.
//!
//! `loadgen [--url http://127.0.0.1:3001] [--connections 32] [--seconds 20] [--type sms]
//! [--api-key KEY] [--accept-only] [--rate R]` (the key also from `LOADGEN_API_KEY`; none is
//! needed in `DEV_MODE`). `--accept-only` stops after phase 1. `--messages N` stops after N
//! requests. `--rate R` makes phase 1 open-loop: R requests a second on a fixed schedule,
//! latency from each one's due time (`loadgen/rate.rs`), instead of `connections` workers. `--costs` measures what one message costs each server instead (see
//! `loadgen/costs.rs`; `scripts/costs.sh` runs it). `--bulk N` sends bulk sends of N
//! recipients instead of single requests (`loadgen/bulk.rs`; `--messages` then counts
//! recipients).
//! Start the service with a high `API_RATE_PER_SEC` and `RECIPIENT_MAX=0` (or distinct
//! numbers), or the limits, not the pipeline, are what gets measured.
//!
//! Phase 1 (accept): `connections` workers POST as fast as answers come for `seconds`, each
//! request to a new recipient. Prints accepted requests/s and p50/p99/p99.9 latency.
//! Phase 2 (end to end): waits until the service reports every accepted message sent
//! (`deliveries_total` on `/metrics`) and prints messages/s from the first request to the
//! last send, how long after the last answer the backlog reached zero, and the p99
//! accept→sent latency (from `accept_to_sent_seconds`).
//! Also: the service's idle and peak RSS (VmRSS before, VmHWM after, from /proc), and the
//! CPU each local server used during the run, to show which one is the limit.

use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// Beside this file rather than `src/bin/costs.rs`, which Cargo would take for a binary of
// its own; the crate root stays `loadgen.rs`, where the layout (lib.rs, README) says it is.
#[path = "loadgen/bulk.rs"]
mod bulk;
#[path = "loadgen/costs.rs"]
mod costs;
#[path = "loadgen/rate.rs"]
mod rate;

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
        .filter(|l| named(l, name) && must.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether a `/metrics` line is of the metric `name`, or of its name without the
/// `comm_aggregator_` prefix (builds before 2026-11-28 had none; loadgen measures them side
/// by side with this one).
fn named(line: &str, name: &str) -> bool {
    line.starts_with(name)
        || name
            .strip_prefix("comm_aggregator_")
            .is_some_and(|n| line.starts_with(n))
}

fn buckets(text: &str, channel: &str) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| {
            named(l, "comm_aggregator_accept_to_sent_seconds_bucket")
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

/// What the command line asks for.
#[derive(Clone)]
struct Options {
    url: String,
    connections: usize,
    seconds: u64,
    kind: String,
    api_key: String,
    accept_only: bool,
    /// Stop after this many requests (`--messages`; unlimited by default).
    messages: u64,
    /// `--rate R`: open loop, R requests a second whatever the answers do (`rate.rs`),
    /// instead of `connections` workers each waiting for its answer.
    rate: Option<f64>,
    /// `--bulk N`: bulk sends of N recipients instead of single requests.
    bulk: Option<u64>,
    costs: Option<costs::CostOptions>,
}

impl Options {
    fn from_args() -> Options {
        let key = std::env::var("LOADGEN_API_KEY").unwrap_or_default();
        Options {
            url: arg("--url", "http://127.0.0.1:3001"),
            connections: arg("--connections", "32").parse().expect("--connections"),
            seconds: arg("--seconds", "20").parse().expect("--seconds"),
            kind: arg("--type", "sms"),
            api_key: arg("--api-key", &key),
            accept_only: std::env::args().any(|a| a == "--accept-only"),
            messages: arg("--messages", &u64::MAX.to_string())
                .parse()
                .expect("--messages"),
            rate: std::env::args().any(|a| a == "--rate").then(|| {
                arg("--rate", "")
                    .parse()
                    .expect("--rate: requests a second")
            }),
            bulk: std::env::args().any(|a| a == "--bulk").then(|| {
                arg("--bulk", "")
                    .parse()
                    .expect("--bulk: recipients a send (1-1000)")
            }),
            costs: costs::CostOptions::from_args(),
        }
    }

    fn client(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if !self.api_key.is_empty() {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {}", self.api_key)
                    .parse()
                    .expect("--api-key"),
            );
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(self.connections)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// `deliveries_total` of this run's channel, outcome `sent`, in a `/metrics` text.
    fn sent(&self, metrics: &str) -> f64 {
        metric_sum(
            metrics,
            "comm_aggregator_deliveries_total",
            &[&format!("channel=\"{}\"", self.kind), "outcome=\"sent\""],
        )
    }
}

async fn metrics(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// What the service and the servers looked like before the run.
struct Before {
    metrics: String,
    procs: HashMap<&'static str, Vec<(i32, u64)>>,
    service_pid: Option<i32>,
    idle_rss: Option<u64>,
}

async fn before(http: &reqwest::Client, opts: &Options) -> Before {
    let metrics = metrics(http, &opts.url)
        .await
        .expect("the service's /metrics (is it running?)");
    let procs = processes();
    let service_pid = procs
        .get("comm-aggregator")
        .and_then(|v| v.first())
        .map(|p| p.0);
    Before {
        metrics,
        procs,
        service_pid,
        idle_rss: service_pid.and_then(|p| status_kb(p, "VmRSS:")),
    }
}

/// Phase 1: `connections` workers POST until the deadline. The latencies (µs) of the
/// accepted requests, sorted, and the count of the others.
async fn accept_phase(
    http: &reqwest::Client,
    opts: &Options,
    deadline: Instant,
) -> (Vec<u64>, u64) {
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..opts.connections)
        .map(|_| {
            let worker = Worker {
                http: http.clone(),
                url: opts.url.clone(),
                kind: opts.kind.clone(),
                counter: counter.clone(),
                errors: errors.clone(),
                limit: opts.messages,
            };
            tokio::spawn(worker.run(deadline))
        })
        .collect();
    let mut lat: Vec<u64> = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    lat.sort_unstable();
    (lat, errors.load(Ordering::Relaxed))
}

struct Worker {
    http: reqwest::Client,
    url: String,
    kind: String,
    counter: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    limit: u64,
}

impl Worker {
    /// POST one request after another, each to a new recipient, until `deadline` or
    /// until `limit` requests have been started by all workers together.
    async fn run(self, deadline: Instant) -> Vec<u64> {
        let run_id = std::process::id() as u64 % 100;
        let mut lat = Vec::with_capacity(4096);
        while Instant::now() < deadline {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            if n >= self.limit {
                break;
            }
            let t = Instant::now();
            if post(&self.http, &self.url, &self.kind, n, run_id).await {
                lat.push(t.elapsed().as_micros() as u64);
            } else {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        lat
    }
}

/// POST request `n` of run `run_id`, to a recipient of its own; `true` if it was accepted.
async fn post(http: &reqwest::Client, url: &str, kind: &str, n: u64, run_id: u64) -> bool {
    let (to, from) = if kind == "email" {
        (
            format!("user{n}@example.com"),
            "noreply@example.com".to_string(),
        )
    } else {
        (
            format!("+1555{:02}{:05}", run_id, n % 100_000),
            "+15550001111".to_string(),
        )
    };
    let body = json!({"type": kind, "data": {"from": from, "to": to, "msg": format!("load {n}")}});
    let url = format!("{url}/api/v1/communication");
    match http.post(url).json(&body).send().await {
        Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
        _ => false,
    }
}

fn report_accept(opts: &Options, lat: &[u64], errors: u64, secs: f64, before: &Before) {
    match opts.rate {
        Some(r) => println!(
            "accept: open loop at {r} requests/s (latency from each request's due time), {secs:.1} s, {} accepted, {errors} errors",
            lat.len()
        ),
        None => println!(
            "accept: {} connections, {secs:.1} s, {} accepted, {errors} errors",
            opts.connections,
            lat.len()
        ),
    }
    println!("accepted requests/s: {:.0}", lat.len() as f64 / secs);
    println!(
        "accept latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        pct(lat, 0.50),
        pct(lat, 0.99),
        pct(lat, 0.999),
        pct(lat, 1.0)
    );
    println!("CPU during the accept phase (cores):");
    for (name, list) in &processes() {
        let used: u64 = list
            .iter()
            .map(|(pid, t)| {
                let b = before
                    .procs
                    .get(name)
                    .and_then(|v| v.iter().find(|(p, _)| p == pid))
                    .map(|x| x.1)
                    .unwrap_or(0);
                t.saturating_sub(b)
            })
            .sum();
        println!("  {name:<24} {:.2}", used as f64 / 100.0 / secs);
    }
}

/// Phase 2: poll `/metrics` until `accepted` more messages are reported sent. The time
/// from the start when they were (`None`: not within the limit), and the last metrics.
async fn wait_drained(
    http: &reqwest::Client,
    opts: &Options,
    before: &str,
    accepted: f64,
    start: Instant,
) -> (Option<f64>, String) {
    let sent_before = opts.sent(before);
    let mut last = before.to_string();
    loop {
        if let Some(m) = metrics(http, &opts.url).await {
            let sent = opts.sent(&m) - sent_before;
            last = m;
            if sent >= accepted {
                return (Some(start.elapsed().as_secs_f64()), last);
            }
        }
        if start.elapsed() > Duration::from_secs(opts.seconds + 600) {
            return (None, last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The p99 accept→sent latency of this run: the histogram's growth since `before`.
fn p99_accept_to_sent(before: &str, after: &str, kind: &str) -> Option<f64> {
    let earlier = buckets(before, kind);
    let delta: Vec<(f64, f64)> = buckets(after, kind)
        .into_iter()
        .map(|(le, c)| {
            let was = earlier.iter().find(|(l, _)| *l == le).map_or(0.0, |x| x.1);
            (le, c - was)
        })
        .collect();
    let total = delta.last().map(|x| x.1).filter(|t| *t > 0.0)?;
    Some(
        delta
            .iter()
            .find(|(_, c)| *c >= 0.99 * total)
            .map_or(f64::INFINITY, |x| x.0),
    )
}

#[tokio::main]
async fn main() {
    let opts = Options::from_args();
    let http = opts.client();
    if let Some(c) = &opts.costs {
        costs::run(&http, &opts, c).await;
        return;
    }
    let before = before(&http, &opts).await;
    let start = Instant::now();
    if let Some(size) = opts.bulk {
        let deadline = start + Duration::from_secs(opts.seconds);
        let run = bulk::accept_phase(&http, &opts, size, deadline).await;
        let secs = start.elapsed().as_secs_f64();
        bulk::report(&run, size, opts.connections, secs);
        if !opts.accept_only {
            end_to_end(&http, &opts, &before, run.accepted as f64, start, secs).await;
        }
        return;
    }
    let (lat, errors) = match opts.rate {
        Some(rate) => {
            let (lat, errors, timeline) = rate::accept_phase(&http, &opts, rate).await;
            timeline.print(start.elapsed().as_secs_f64());
            (lat, errors)
        }
        None => accept_phase(&http, &opts, start + Duration::from_secs(opts.seconds)).await,
    };
    let load_secs = start.elapsed().as_secs_f64();
    report_accept(&opts, &lat, errors, load_secs, &before);
    if opts.accept_only {
        if let Some(kb) = before.service_pid.and_then(|p| status_kb(p, "VmHWM:")) {
            println!("service RSS: peak {} MB (VmHWM)", kb / 1024);
        }
        return;
    }
    end_to_end(&http, &opts, &before, lat.len() as f64, start, load_secs).await;
}

/// Phase 2: wait for `accepted` messages to be sent; print the rate, the drain time, the
/// p99 accept→sent latency and the service's memory.
async fn end_to_end(
    http: &reqwest::Client,
    opts: &Options,
    before: &Before,
    accepted: f64,
    start: Instant,
    load_secs: f64,
) {
    let (drained, last) = wait_drained(http, opts, &before.metrics, accepted, start).await;
    match drained {
        Some(t) => println!(
            "end to end: {accepted} messages sent in {t:.1} s: {:.0} messages/s; backlog 0 {:.1} s after the last answer",
            accepted / t,
            (t - load_secs).max(0.0)
        ),
        None => println!("end to end: not drained within the time limit"),
    }
    if let Some(p99) = p99_accept_to_sent(&before.metrics, &last, &opts.kind) {
        println!("accept->sent latency p99: <= {p99} s (histogram bucket)");
    }
    if let Some(pid) = before.service_pid {
        println!(
            "service RSS: idle {} MB, peak {} MB (VmHWM)",
            before.idle_rss.unwrap_or(0) / 1024,
            status_kb(pid, "VmHWM:").unwrap_or(0) / 1024
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_with_or_without_the_prefix_of_later_builds() {
        let now = "comm_aggregator_deliveries_total{channel=\"sms\",outcome=\"sent\"} 7\n\
                   comm_aggregator_deliveries_total{channel=\"sms\",outcome=\"failed\"} 2\n";
        let before = "deliveries_total{channel=\"sms\",outcome=\"sent\"} 5\n\
                      other_deliveries_total{channel=\"sms\",outcome=\"sent\"} 9\n";
        let sent = |m| {
            metric_sum(
                m,
                "comm_aggregator_deliveries_total",
                &["channel=\"sms\"", "outcome=\"sent\""],
            )
        };
        assert_eq!(sent(now), 7.0);
        assert_eq!(sent(before), 5.0);
        let old_buckets = "accept_to_sent_seconds_bucket{channel=\"sms\",le=\"0.1\"} 3\n\
                           accept_to_sent_seconds_bucket{channel=\"sms\",le=\"+Inf\"} 4\n";
        assert_eq!(
            buckets(old_buckets, "sms"),
            vec![(0.1, 3.0), (f64::INFINITY, 4.0)]
        );
    }
}
