//! Open-loop load (`--rate R`): request `n` is due at `start + n / R` whatever the answers
//! do, each on a task of its own, and its latency counts from that due time, not from when
//! it left: a slow answer delays no later request, and a request the client itself sent
//! late is not made to look fast (no coordinated omission). While the load runs, `/metrics`
//! is read every second for the messages sent so far and the delivery side's adaptive
//! store limits (`store_concurrency_limit{caller}`).

use super::{metrics, post, Options};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the service said while the load ran, once a second.
#[derive(Default)]
pub struct Timeline {
    /// Messages of this run's channel reported sent, at each look.
    pub sent: Vec<f64>,
    /// Each caller's limit at each look.
    pub limits: BTreeMap<String, Vec<f64>>,
}

impl Timeline {
    fn look(&mut self, opts: &Options, m: &str) {
        self.sent.push(opts.sent(m));
        for line in m
            .lines()
            .filter(|l| l.starts_with("comm_aggregator_store_concurrency_limit{"))
        {
            let caller = line
                .split("caller=\"")
                .nth(1)
                .and_then(|s| s.split('"').next());
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(c), Some(v)) = (caller, value) {
                self.limits.entry(c.to_string()).or_default().push(v);
            }
        }
    }

    /// Messages sent during the load, from the first look to the last.
    pub fn sent_during(&self) -> f64 {
        match (self.sent.first(), self.sent.last()) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        }
    }

    pub fn print(&self, secs: f64) {
        let sent = self.sent_during();
        println!(
            "sent during the load: {sent:.0} ({:.0} messages/s)",
            sent / secs
        );
        for (caller, v) in &self.limits {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            println!("comm_aggregator_store_concurrency_limit{{caller={caller}}} during the load: min {min:.2}, mean {mean:.2}, last {:.2}", v.last().copied().unwrap_or(0.0));
        }
        if self.limits.is_empty() {
            println!("comm_aggregator_store_concurrency_limit: not reported (the limiter is off)");
        }
    }
}

/// Send `rate` requests a second for `opts.seconds` (or until `opts.messages`): the
/// latencies (µs, from each request's due time) of the accepted ones, sorted, the count of
/// the others, and the timeline.
pub async fn accept_phase(
    http: &reqwest::Client,
    opts: &Options,
    rate: f64,
) -> (Vec<u64>, u64, Timeline) {
    let start = Instant::now();
    let total = ((rate * opts.seconds as f64) as u64).min(opts.messages);
    let run_id = std::process::id() as u64 % 100;
    let watch = watch(
        http.clone(),
        opts.clone(),
        start + Duration::from_secs(opts.seconds),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (http, url, kind) = (http.clone(), opts.url.clone(), opts.kind.clone());
        tasks.spawn(async move {
            let ok = post(&http, &url, &kind, n, run_id).await;
            (ok, due.elapsed().as_micros() as u64)
        });
    }
    let mut lat = Vec::with_capacity(total as usize);
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((true, us)) => lat.push(us),
            _ => errors += 1,
        }
    }
    lat.sort_unstable();
    let timeline = watch.await.unwrap_or_default();
    (lat, errors, timeline)
}

/// Read `/metrics` once a second until `until`.
fn watch(
    http: reqwest::Client,
    opts: Options,
    until: Instant,
) -> tokio::task::JoinHandle<Timeline> {
    tokio::spawn(async move {
        let mut t = Timeline::default();
        loop {
            if let Some(m) = metrics(&http, &opts.url).await {
                t.look(&opts, &m);
            }
            if Instant::now() >= until {
                return t;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}
