//! The service on a Redis Cluster (three masters, a replica each; `tests/common/cluster.rs`)
//! with each channel's stream in three shards: the pipeline delivers every message once
//! with the shards spread over the masters; a kill -9 of the service mid-load, and the
//! failover of a master mid-load, leave the books balanced (every accepted message reaches
//! the provider stand-in, more than once only where the record is flagged a possible
//! duplicate). The same shards on a single Redis too. Scenarios run one at a time.

mod common;

use common::cluster::RedisCluster;
use common::*;
use std::collections::HashSet;
use std::time::Duration;

const BOOKS_WAIT: Duration = Duration::from_secs(90);
const SHARDS: u32 = 3;
const GROUP: &str = "comm-aggregator";

/// The SMS stream's shards.
fn sms_shards() -> Vec<String> {
    (0..SHARDS).map(|i| format!("sms_stream:{{{i}}}")).collect()
}

/// A stack whose Redis is a fresh cluster, and the service's environment for it.
fn cluster_stack() -> (Stack, RedisCluster, Vec<(&'static str, String)>) {
    let stack = Stack::start();
    let cluster = RedisCluster::start(&stack.dir);
    let env = vec![
        ("REDIS_URL", cluster.url()),
        ("REDIS_CLUSTER", "true".to_string()),
        ("REDIS_STREAM_SHARDS", SHARDS.to_string()),
        // The tenant's limits live on one master: accept through its failover.
        ("LIMITER_FAIL_OPEN", "email,sms,whatsapp".to_string()),
    ];
    (stack, cluster, env)
}

fn with_fast(
    env: &[(&'static str, String)],
    consumer: &'static str,
) -> Vec<(&'static str, String)> {
    let mut all: Vec<(&'static str, String)> = fast_env(&[("CONSUMER_NAME", consumer)])
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    all.extend(env.iter().cloned());
    all
}

fn start(stack: &Stack, env: &[(&'static str, String)]) -> Service {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    stack.start_service(&env)
}

/// An XINFO STREAM field of a shard, as a number.
fn stream_field(cluster: &RedisCluster, stream: &str, field: &str) -> i64 {
    let out = cluster.query(stream, &["XINFO", "STREAM", stream]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .iter()
        .position(|l| l.trim() == field)
        .and_then(|i| lines.get(i + 1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// `XINFO STREAM`'s `entries-added` (RESP2: a flat list of names and values).
fn entries_added(info: &redis::Value) -> i64 {
    let redis::Value::Array(kv) = info else {
        return -1;
    };
    kv.chunks(2)
        .find_map(|pair| match pair {
            [redis::Value::BulkString(k), redis::Value::Int(n)] if k == b"entries-added" => {
                Some(*n)
            }
            _ => None,
        })
        .unwrap_or(-1)
}

/// Nothing is left pending in any SMS shard.
async fn nothing_pending(cluster: &RedisCluster) {
    for s in sms_shards() {
        eventually(
            Duration::from_secs(30),
            &format!("{s} has nothing pending"),
            || {
                let out = cluster.query(&s, &["XPENDING", &s, GROUP]);
                let n: i64 = out
                    .lines()
                    .next()
                    .and_then(|l| l.trim().parse().ok())
                    .unwrap_or(-1);
                async move { (n == 0).then_some(()) }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_delivers_every_message_once_over_shards_on_several_masters() {
    let _one = one_at_a_time().await;
    let (stack, cluster, env) = cluster_stack();
    let svc = start(&stack, &with_fast(&env, "cluster-a"));
    let accepted = load(svc.port, &unique("cluster"), 300, Duration::ZERO).await;
    assert_eq!(accepted.len(), 300, "every request accepted");
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
    assert_eq!(books.duplicates, 0, "no crash, so no message sent twice");
    nothing_pending(&cluster).await;
    let masters: HashSet<u16> = sms_shards().iter().map(|s| cluster.master_of(s)).collect();
    assert!(
        masters.len() > 1,
        "the shards all live on one master: {masters:?}"
    );
    for s in sms_shards() {
        let added = stream_field(&cluster, &s, "entries-added");
        assert!(added > 0, "{s} carried no entry (entries-added {added})");
    }
    high_lane_on_a_cluster(&stack, &svc, &cluster).await;
}

/// The high lane shares its shard's slot, so the consumer reads the lanes in one
/// XREADGROUP on a cluster too: high SMS are sent, through `sms_stream:high:{i}`.
async fn high_lane_on_a_cluster(stack: &Stack, svc: &Service, cluster: &RedisCluster) {
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut body = sms(&unique(&format!("cluster-high-{i}")));
        body["priority"] = serde_json::json!("high");
        let (status, answer) = svc.post(body).await;
        assert_eq!(status, 200, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        eventually(BOOKS_WAIT, "a high SMS sent on a cluster", || async {
            let r = stack.record(id).await?;
            (r.get_str("status").ok() == Some("sent")).then_some(())
        })
        .await;
    }
    let added: i64 = (0..SHARDS)
        .map(|i| format!("sms_stream:high:{{{i}}}"))
        .map(|s| stream_field(cluster, &s, "entries-added").max(0))
        .sum();
    assert!(added >= 12, "the high lane streams carried {added} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_work_on_a_single_redis_too() {
    let _one = one_at_a_time().await;
    let stack = Stack::start();
    let svc = stack.start_service(&fast_env(&[("REDIS_STREAM_SHARDS", "3")]));
    let accepted = load(svc.port, &unique("single-shards"), 150, Duration::ZERO).await;
    assert_eq!(accepted.len(), 150);
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!((books.sent, books.duplicates), (150, 0));
    let mut c = stack.redis().await;
    for s in sms_shards() {
        let info: redis::Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&s)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(entries_added(&info) > 0, "{s} carried no entry: {info:?}");
        assert_eq!(stack.pending(&s, GROUP).await, 0, "{s} has nothing pending");
    }
    assert_eq!(
        stack.pending("sms_stream", GROUP).await,
        -1,
        "no unsharded stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_service_mid_load_on_a_cluster_loses_nothing() {
    let _one = one_at_a_time().await;
    let (stack, _cluster, env) = cluster_stack();
    let env = with_fast(&env, "cluster-kill9");
    let svc = start(&stack, &env);
    let tag = unique("cluster-kill9");
    let (accepted, _svc) = kill_9_mid_load(svc, &tag, || start(&stack, &env)).await;
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
    println!("possible duplicates from the kill: {}", books.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_of_a_master_mid_load_loses_nothing() {
    let _one = one_at_a_time().await;
    let (stack, cluster, env) = cluster_stack();
    let svc = start(&stack, &with_fast(&env, "cluster-failover"));
    let port = svc.port;
    let tag = unique("cluster-failover");
    // 16 requests every 150 ms for about 4 s: the failover (1 s to notice, then the
    // election) falls inside the load.
    let loader = spawn_load(port, &tag, 400, Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The master of the first SMS shard dies; its replica is promoted.
    assert!(
        !loader.is_finished(),
        "the load still runs when the master dies"
    );
    let victim = cluster.master_of("sms_stream:{0}");
    let promoted = cluster.fail_over("sms_stream:{0}", Duration::from_secs(30));
    println!("master {victim} killed; replica {promoted} took over");
    let mut accepted = loader.await.unwrap();
    assert!(
        accepted.len() >= 350,
        "a failover must not stop accepting: {} of 400",
        accepted.len()
    );
    accepted.extend(load(port, &format!("{tag}-after"), 50, Duration::ZERO).await);
    let books = check_books(&stack, &accepted, BOOKS_WAIT).await;
    assert_eq!(books.sent, books.accepted);
    println!(
        "possible duplicates from the failover: {}",
        books.duplicates
    );
    nothing_pending(&cluster).await;
}
