//! LogIndexer throughput: N log events through the real actor (Redis `log_stream` →
//! consumer group → `_bulk` → Elasticsearch → XACK), batched (up to 1,000 events a
//! request) versus one event per request. Prints both rates and their ratio.
//!
//! `make bench-indexer` (or `cargo bench --bench log_indexer`). It starts its own Redis and
//! osmem-server on free ports (from Debian and the project's .venv), or uses `REDIS_URL` and
//! `ELASTICSEARCH_NODE` when both are set. `BENCH_EVENTS` (default 20000) sets N for the
//! batched run; the one-by-one run uses N/10.

use actors::domain::{Channel, Communication, EventStatus, LogEvent, NewCommunication, LOG_STREAM};
use actors::log_indexer::{IndexerArgs, LogIndexer};
use actors::ports::Queue;
use actors::ractor::Actor;
use chrono::Utc;
use comm_aggregator::clients::elastic::ElasticSink;
use comm_aggregator::clients::redis_queue::RedisQueue;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("port {port} never opened");
}

fn servers() -> (String, String, Vec<Killed>) {
    if let (Ok(r), Ok(e)) = (
        std::env::var("REDIS_URL"),
        std::env::var("ELASTICSEARCH_NODE"),
    ) {
        return (r, e, Vec::new());
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let (rp, ep) = (free_port(), free_port());
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &rp.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (run scripts/stack.sh install)");
    let out = Command::new(format!("{root}/.venv/bin/python"))
        .args(["-c", "import os, osmem_server; print(os.path.join(os.path.dirname(osmem_server.__file__), 'bin', 'osmem-server'))"])
        .output()
        .expect("the .venv (run scripts/stack.sh install)");
    let osmem = Command::new(String::from_utf8(out.stdout).unwrap().trim())
        .args(["-addr", &format!("127.0.0.1:{ep}"), "-no-stdin-watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("osmem-server");
    wait_port(rp);
    wait_port(ep);
    (
        format!("redis://127.0.0.1:{rp}"),
        format!("http://127.0.0.1:{ep}"),
        vec![Killed(redis), Killed(osmem)],
    )
}

/// Empty Redis and the bench indices, then put `n` log events on `log_stream`.
async fn seed(
    redis: &str,
    es: &str,
    n: usize,
) -> (Arc<RedisQueue>, redis::aio::MultiplexedConnection) {
    let queue = Arc::new(RedisQueue::open(redis, Duration::from_secs(10)).unwrap());
    let mut c = redis::Client::open(redis)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    let http = reqwest::Client::new();
    for idx in ["bench-communications", "bench-logs"] {
        let _ = http.delete(format!("{es}/{idx}")).send().await;
    }
    let rec = Communication::new(
        "65f000000000000000000001".into(),
        NewCommunication {
            channel: Channel::Sms,
            from: "+15550001111".into(),
            to: "+15557654321".into(),
            msg: "Your code is 424242".into(),
            subject: None,
        },
        Utc::now(),
    );
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let entries: Vec<(&str, Vec<(&str, String)>)> = chunk
            .iter()
            .map(|i| {
                let mut ev = LogEvent::for_record(&rec, "sms", EventStatus::Sent, 1, Utc::now());
                ev.communication_id = format!("{:024x}", i);
                (LOG_STREAM, ev.to_fields())
            })
            .collect();
        queue.append(&entries).await.unwrap();
    }
    (queue, c)
}

async fn indexed_count(http: &reqwest::Client, es: &str) -> u64 {
    let _ = http.post(format!("{es}/bench-logs/_refresh")).send().await;
    match http.get(format!("{es}/bench-logs/_count")).send().await {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["count"].as_u64())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Wait until every event is in the index and every entry acknowledged.
async fn wait_indexed(
    es: &str,
    c: &mut redis::aio::MultiplexedConnection,
    n: usize,
    started: Instant,
) {
    let http = reqwest::Client::new();
    loop {
        let indexed = indexed_count(&http, es).await;
        let p: redis::Value = redis::cmd("XPENDING")
            .arg(LOG_STREAM)
            .arg("bench")
            .query_async(c)
            .await
            .unwrap_or(redis::Value::Nil);
        let none_pending = matches!(p, redis::Value::Array(ref a) if matches!(a.first(), Some(redis::Value::Int(0))));
        if indexed == n as u64 && none_pending {
            return;
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!("indexing did not finish: {indexed} of {n}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn run(redis: &str, es: &str, n: usize, max_docs: usize) -> f64 {
    let (queue, mut c) = seed(redis, es, n).await;
    let search = Arc::new(
        ElasticSink::new(
            es,
            &Default::default(),
            "bench-communications",
            "bench-logs",
        )
        .unwrap(),
    );
    let started = Instant::now();
    let (actor, handle) = Actor::spawn(
        None,
        LogIndexer,
        IndexerArgs {
            queue: queue.dedicated(),
            // Bench events carry their bodies: nothing is read from the store.
            store: std::sync::Arc::new(actors::testing::MemoryStore::new()),
            search,
            group: "bench".into(),
            consumer: "bench-1".into(),
            logs_index: "bench-logs".into(),
            communications_index: "bench-communications".into(),
            batch: actors::batch::BatchSettings::new(max_docs, Duration::from_millis(50))
                .with_max_bytes(5_000_000),
            claim_idle: Duration::from_secs(30),
            forget_after: Duration::from_secs(60),
            hold: Duration::ZERO,
        },
    )
    .await
    .unwrap();
    wait_indexed(es, &mut c, n, started).await;
    let secs = started.elapsed().as_secs_f64();
    actor.stop(None);
    let _ = handle.await;
    assert_eq!(
        indexed_count(&reqwest::Client::new(), es).await,
        n as u64,
        "every event indexed once"
    );
    n as f64 / secs
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let (redis, es, _servers) = servers();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let batched = rt.block_on(run(&redis, &es, n, 1000));
    let single = rt.block_on(run(&redis, &es, (n / 10).max(100), 1));
    println!("log_indexer batched (<=1000 events/request): {n} events, {batched:.0} events/s");
    println!(
        "log_indexer one event per request:           {} events, {single:.0} events/s",
        (n / 10).max(100)
    );
    println!("ratio batched / one-by-one: {:.1}x", batched / single);
}
