//! `loadgen --costs`: what one message costs each server (issue #14, "Cost per message").
//!
//! After `--warmup-seconds` (the service's start-up is not idle time), reads every counter
//! the servers keep, once before an idle interval (`--idle-seconds`), once after it, and
//! once after the load (`--messages N` requests, then the drain for `--phase e2e`, then
//! `--settle-seconds` for the indexer and the receipts), and prints, per accepted message:
//! - Redis commands by command (`INFO commandstats`), with the same interval's idle calls
//!   beside them (the service polls its streams while idle: those are not subtracted);
//! - MongoDB operations by kind (SecantusDB `serverStatus` `opcounters`: it counts commands,
//!   not documents, and has no `metrics.document`);
//! - Elasticsearch documents indexed (osmem `_stats` `indexing.index_total`; osmem has no
//!   `_nodes/stats` and no request count) and `_bulk` requests (the service's own
//!   `log_indexer_bulk_seconds` count: the LogIndexer's bulks, not the audit trail's);
//! - CPU time (µs) of the service and of each server process (`/proc/<pid>/stat` utime +
//!   stime), minus that process's idle rate over the idle interval times the run's length.
//!
//! The processes are named by pid (`--pids service=1,redis=2,...`), never found by name:
//! other stacks may run on the same machine. `scripts/costs.sh` starts a stack of its own
//! per phase and passes them. The servers' addresses come from `REDIS_URL`, `MONGODB_URL`
//! and `ELASTICSEARCH_NODE`, as for the service.

use super::{accept_phase, arg, metric_sum, metrics, wait_drained, Options};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Linux's clock ticks a second for /proc/<pid>/stat (USER_HZ, 100 on every usual build).
const TICKS_PER_SEC: f64 = 100.0;

/// What `--costs` asks for.
#[derive(Clone)]
pub struct CostOptions {
    /// `accept` (deliveries held back by the service's settings) or `e2e` (wait until every
    /// accepted message is reported sent).
    phase: String,
    /// name=pid, in the order given.
    pids: Vec<(String, i32)>,
    warmup: Duration,
    idle: Duration,
    settle: Duration,
    /// Where the JSON line is also written (`--json-out`), for scripts/costs.sh to combine.
    json_out: Option<String>,
    /// `--mongo-profile`: profiling level 2 during the load, to count the documents each
    /// write command carried (SecantusDB's counters count commands). It costs SecantusDB
    /// CPU of its own, so that run's SecantusDB CPU is not the service's alone.
    mongo_profile: bool,
}

impl CostOptions {
    pub fn from_args() -> Option<CostOptions> {
        if !std::env::args().any(|a| a == "--costs") {
            return None;
        }
        let secs = |name, default| Duration::from_secs_f64(arg(name, default).parse().expect(name));
        let pids = arg("--pids", "")
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (name, pid) = p.split_once('=').expect("--pids name=pid,...");
                (name.to_string(), pid.parse().expect("--pids: a pid"))
            })
            .collect();
        let phase = arg("--phase", "e2e");
        assert!(phase == "accept" || phase == "e2e", "--phase accept|e2e");
        let json_out = Some(arg("--json-out", "")).filter(|p| !p.is_empty());
        Some(CostOptions {
            phase,
            pids,
            warmup: secs("--warmup-seconds", "5"),
            idle: secs("--idle-seconds", "10"),
            settle: secs("--settle-seconds", "3"),
            json_out,
            mongo_profile: std::env::args().any(|a| a == "--mongo-profile"),
        })
    }
}

/// The servers' clients and where the service is.
struct Probe {
    http: reqwest::Client,
    redis: redis::aio::MultiplexedConnection,
    mongo: mongodb::Client,
    es: String,
    service: String,
}

/// Every counter at one moment.
#[derive(Default)]
struct Snapshot {
    at: Option<Instant>,
    /// Redis command → (calls, µs spent in it).
    redis: BTreeMap<String, (f64, f64)>,
    /// SecantusDB opcounters: insert, query, update, delete, getmore, command.
    mongo: BTreeMap<String, f64>,
    /// Documents in each of the service's collections (what the writes left behind).
    docs: BTreeMap<String, f64>,
    /// Collections counted after `serverStatus` (SecantusDB counts each `count` as a query,
    /// `listCollections` and `serverStatus` as commands: the next snapshot sees them).
    own_counts: f64,
    /// The service's own count of documents it wrote, by kind of write
    /// (`mongo_documents_written_total{op}`).
    written: BTreeMap<String, f64>,
    es_indexed: f64,
    es_bulks: f64,
    sent: f64,
    /// Process name → CPU ticks.
    cpu: BTreeMap<String, f64>,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("--costs needs {name} (scripts/stack.sh env)"))
}

impl Probe {
    async fn connect(http: &reqwest::Client, opts: &Options) -> Probe {
        let redis = redis::Client::open(env("REDIS_URL"))
            .expect("REDIS_URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis");
        let mongo = mongodb::Client::with_uri_str(env("MONGODB_URL"))
            .await
            .expect("MONGODB_URL");
        Probe {
            http: http.clone(),
            redis,
            mongo,
            es: env("ELASTICSEARCH_NODE").trim_end_matches('/').to_string(),
            service: opts.url.clone(),
        }
    }

    async fn snapshot(&mut self, opts: &Options, c: &CostOptions) -> Snapshot {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.redis)
            .await
            .expect("Redis INFO commandstats");
        let status = self
            .mongo
            .database("admin")
            .run_command(mongodb::bson::doc! {"serverStatus": 1})
            .await
            .expect("MongoDB serverStatus");
        let mongo = status
            .get_document("opcounters")
            .map(|d| {
                d.iter()
                    .filter_map(|(k, v)| Some((k.clone(), bson_f64(v)?)))
                    .collect()
            })
            .unwrap_or_default();
        let (docs, own_counts) = self.documents().await;
        let stats: Value = match self.http.get(format!("{}/_stats", self.es)).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        let m = metrics(&self.http, &self.service).await.unwrap_or_default();
        Snapshot {
            at: Some(Instant::now()),
            redis: commandstats(&info),
            mongo,
            docs,
            own_counts,
            written: written(&m),
            es_indexed: stats["_all"]["primaries"]["indexing"]["index_total"]
                .as_f64()
                .unwrap_or(0.0),
            es_bulks: metric_sum(&m, "comm_aggregator_log_indexer_bulk_seconds_count", &[]),
            sent: opts.sent(&m),
            cpu: c
                .pids
                .iter()
                .map(|(name, pid)| (name.clone(), cpu_ticks(*pid)))
                .collect(),
        }
    }
}

impl Probe {
    /// Documents in each collection of the service's database, and how many `count`
    /// commands that took.
    async fn documents(&self) -> (BTreeMap<String, f64>, f64) {
        let db = self.db();
        let names = db.list_collection_names().await.unwrap_or_default();
        let mut docs = BTreeMap::new();
        for c in names.iter().filter(|c| !c.starts_with("system.")) {
            let coll = db.collection::<mongodb::bson::Document>(c);
            if let Ok(n) = coll.estimated_document_count().await {
                docs.insert(c.clone(), n as f64);
            }
        }
        let counted = docs.len() as f64;
        (docs, counted)
    }
}

impl Probe {
    fn db(&self) -> mongodb::Database {
        let name = std::env::var("MONGODB_DATABASE")
            .unwrap_or_else(|_| "communication-aggregator".to_string());
        self.mongo.database(&name)
    }

    async fn profile(&self, level: i32) {
        let cmd = mongodb::bson::doc! {"profile": level};
        self.db().run_command(cmd).await.expect("MongoDB profile");
    }

    /// The profiled commands by collection and kind, and the documents each carried
    /// (inserted documents; update and delete statements: SecantusDB's profile does not
    /// say how many documents a statement matched).
    async fn profiled(&self) -> BTreeMap<String, (f64, f64)> {
        use futures::TryStreamExt;
        let coll = self
            .db()
            .collection::<mongodb::bson::Document>("system.profile");
        let entries: Vec<mongodb::bson::Document> = match coll.find(mongodb::bson::doc! {}).await {
            Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for e in &entries {
            let cmd = e.get_document("command").ok();
            if cmd.is_some_and(|c| c.contains_key("profile")) {
                continue;
            }
            let op = e.get_str("op").unwrap_or("?");
            let ns = e.get_str("ns").unwrap_or("?");
            let coll = ns.split_once('.').map_or(ns, |x| x.1);
            let docs = ["documents", "updates", "deletes"]
                .iter()
                .find_map(|k| cmd?.get_array(k).ok())
                .map_or(0.0, |a| a.len() as f64);
            let slot = out.entry(format!("{coll} {op}")).or_default();
            slot.0 += 1.0;
            slot.1 += docs;
        }
        out
    }
}

fn bson_f64(v: &mongodb::bson::Bson) -> Option<f64> {
    match v {
        mongodb::bson::Bson::Int32(i) => Some(*i as f64),
        mongodb::bson::Bson::Int64(i) => Some(*i as f64),
        mongodb::bson::Bson::Double(d) => Some(*d),
        _ => None,
    }
}

/// `mongo_documents_written_total{op="outcome"} 12` lines → op → documents.
fn written(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("comm_aggregator_mongo_documents_written_total{op=\"")?;
            let (op, value) = rest.split_once("\"} ")?;
            Some((op.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `cmdstat_xadd:calls=3,usec=25,...` lines → command → (calls, usec).
fn commandstats(info: &str) -> BTreeMap<String, (f64, f64)> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            };
            Some((
                name.to_string(),
                (field("calls")?, field("usec").unwrap_or(0.0)),
            ))
        })
        .collect()
}

/// utime + stime of a process (all its threads), in ticks; 0 if it is gone.
fn cpu_ticks(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let at = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    at(11) + at(12)
}

/// The growth of every counter from `a` to `b`, and the interval's length in seconds.
struct Delta {
    secs: f64,
    redis: BTreeMap<String, (f64, f64)>,
    mongo: BTreeMap<String, f64>,
    docs: BTreeMap<String, f64>,
    written: BTreeMap<String, f64>,
    es_indexed: f64,
    es_bulks: f64,
    sent: f64,
    cpu: BTreeMap<String, f64>,
    /// With `--mongo-profile`: "collection op" → (commands, documents they carried).
    profile: BTreeMap<String, (f64, f64)>,
}

fn delta(a: &Snapshot, b: &Snapshot) -> Delta {
    let secs = match (a.at, b.at) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let redis = b
        .redis
        .iter()
        .map(|(k, (calls, usec))| {
            let (c0, u0) = a.redis.get(k).copied().unwrap_or((0.0, 0.0));
            (k.clone(), (calls - c0, usec - u0))
        })
        // Our own INFO and the counters nobody moved are not the service's work.
        .filter(|(k, (calls, _))| k != "info" && *calls > 0.0)
        .collect();
    let sub = |x: &BTreeMap<String, f64>, y: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        y.iter()
            .map(|(k, v)| (k.clone(), v - x.get(k).copied().unwrap_or(0.0)))
            .collect()
    };
    let mut mongo = sub(&a.mongo, &b.mongo);
    // Our own: one `serverStatus`, `a`'s `listCollections` and its counts.
    if let Some(c) = mongo.get_mut("command") {
        *c -= 2.0;
    }
    if let Some(q) = mongo.get_mut("query") {
        *q -= a.own_counts;
    }
    Delta {
        secs,
        redis,
        mongo,
        docs: sub(&a.docs, &b.docs),
        written: sub(&a.written, &b.written),
        es_indexed: b.es_indexed - a.es_indexed,
        es_bulks: b.es_bulks - a.es_bulks,
        sent: b.sent - a.sent,
        cpu: sub(&a.cpu, &b.cpu),
        profile: BTreeMap::new(),
    }
}

/// The load of this phase: `--messages` requests, then (e2e) the drain, then the settle
/// time. The number of accepted requests and of errors.
async fn load(http: &reqwest::Client, opts: &Options, c: &CostOptions, before: &str) -> (f64, u64) {
    let start = Instant::now();
    // A run bounded by `--messages` is not cut short by the default `--seconds`.
    let secs = if opts.messages < u64::MAX {
        opts.seconds.max(600)
    } else {
        opts.seconds
    };
    let (lat, errors) = accept_phase(http, opts, start + Duration::from_secs(secs)).await;
    let accepted = lat.len() as f64;
    println!(
        "costs: {} requests accepted, {errors} errors, in {:.1} s",
        lat.len(),
        start.elapsed().as_secs_f64()
    );
    if c.phase == "e2e" {
        match wait_drained(http, opts, before, accepted, start).await {
            (Some(t), _) => println!("costs: every accepted message sent {t:.1} s after the start"),
            (None, _) => println!("costs: NOT drained within the time limit; figures are partial"),
        }
    }
    tokio::time::sleep(c.settle).await;
    (accepted, errors)
}

pub async fn run(http: &reqwest::Client, opts: &Options, c: &CostOptions) {
    let mut probe = Probe::connect(http, opts).await;
    // The service's start-up (indexes, start-up events) is not idle time.
    tokio::time::sleep(c.warmup).await;
    let s0 = probe.snapshot(opts, c).await;
    tokio::time::sleep(c.idle).await;
    let s1 = probe.snapshot(opts, c).await;
    let before = metrics(http, &opts.url).await.unwrap_or_default();
    if c.mongo_profile {
        probe.profile(2).await;
    }
    let (accepted, errors) = load(http, opts, c, &before).await;
    if c.mongo_profile {
        probe.profile(0).await;
    }
    let s2 = probe.snapshot(opts, c).await;
    let (idle, mut busy) = (delta(&s0, &s1), delta(&s1, &s2));
    if c.mongo_profile {
        // The two `profile` commands are ours.
        busy.mongo.entry("command".into()).and_modify(|v| *v -= 2.0);
        busy.profile = probe.profiled().await;
    }
    let report = Report {
        phase: &c.phase,
        n: accepted.max(1.0),
        errors,
        idle: &idle,
        busy: &busy,
    };
    report.print();
    let line = report.json();
    println!("{line}");
    if let Some(path) = &c.json_out {
        std::fs::write(path, format!("{line}\n")).expect("--json-out");
    }
}

/// One phase's figures, per accepted message.
struct Report<'a> {
    phase: &'a str,
    n: f64,
    errors: u64,
    idle: &'a Delta,
    busy: &'a Delta,
}

impl Report<'_> {
    /// The idle interval's growth of a counter, scaled to the run's length.
    fn idle_share(&self, v: f64) -> f64 {
        if self.idle.secs > 0.0 {
            v * self.busy.secs / self.idle.secs
        } else {
            0.0
        }
    }

    /// CPU µs per message of each process, its idle rate subtracted.
    fn cpu_us(&self) -> BTreeMap<String, f64> {
        self.busy
            .cpu
            .iter()
            .map(|(name, t)| {
                let idle = self.idle_share(self.idle.cpu.get(name).copied().unwrap_or(0.0));
                let us = (t - idle).max(0.0) / TICKS_PER_SEC * 1e6 / self.n;
                (name.clone(), us)
            })
            .collect()
    }

    fn print(&self) {
        let (b, n) = (self.busy, self.n);
        println!(
            "\ncosts, phase {}: {n} accepted messages, {} sent, {:.1} s measured (idle interval {:.1} s)",
            self.phase, b.sent, b.secs, self.idle.secs
        );
        println!(
            "{:<44} {:>10} {:>10} {:>12}",
            "per accepted message", "total", "per msg", "idle, same time"
        );
        let total: f64 = b.redis.values().map(|v| v.0).sum();
        let idle_total: f64 = self.idle.redis.values().map(|v| v.0).sum();
        let row = |name: String, v: f64, idle: f64| {
            println!(
                "{name:<44} {v:>10.0} {:>10.3} {:>12.0}",
                v / n,
                self.idle_share(idle)
            );
        };
        row("redis: commands".into(), total, idle_total);
        for (cmd, (calls, _)) in &b.redis {
            let idle = self.idle.redis.get(cmd).map_or(0.0, |v| v.0);
            row(format!("  redis {cmd}"), *calls, idle);
        }
        let usec: f64 = b.redis.values().map(|v| v.1).sum();
        println!(
            "{:<44} {usec:>10.0} {:>10.1}",
            "redis: µs inside commands (commandstats)",
            usec / n
        );
        for (op, v) in &b.mongo {
            let idle = self.idle.mongo.get(op).copied().unwrap_or(0.0);
            row(format!("mongodb: {op} (opcounters, commands)"), *v, idle);
        }
        for (coll, v) in &b.docs {
            let idle = self.idle.docs.get(coll).copied().unwrap_or(0.0);
            row(format!("mongodb: documents added to {coll}"), *v, idle);
        }
        for (op, v) in &b.written {
            let idle = self.idle.written.get(op).copied().unwrap_or(0.0);
            row(
                format!("mongodb: documents written, {op} (service)"),
                *v,
                idle,
            );
        }
        for (what, (cmds, docs)) in &b.profile {
            println!(
                "{:<44} {cmds:>10.0} {:>10.3}   documents or statements: {docs:.0} ({:.3} a message)",
                format!("mongodb profile: {what}"),
                cmds / n,
                docs / n
            );
        }
        row(
            "elasticsearch: documents indexed (_stats)".into(),
            b.es_indexed,
            self.idle.es_indexed,
        );
        row(
            "elasticsearch: _bulk requests (LogIndexer)".into(),
            b.es_bulks,
            self.idle.es_bulks,
        );
        println!("CPU µs per accepted message, idle rate subtracted (CPU s during the run; idle CPU s over the same time):");
        for (name, us) in self.cpu_us() {
            let busy = b.cpu.get(&name).copied().unwrap_or(0.0) / TICKS_PER_SEC;
            let idle =
                self.idle_share(self.idle.cpu.get(&name).copied().unwrap_or(0.0)) / TICKS_PER_SEC;
            println!("  {name:<42} {us:>10.0}   ({busy:.2} s; idle {idle:.2} s)");
        }
    }

    fn json(&self) -> String {
        let (b, n) = (self.busy, self.n);
        let per = |v: f64| (v / n * 1000.0).round() / 1000.0;
        let redis: BTreeMap<&String, f64> = b.redis.iter().map(|(k, v)| (k, per(v.0))).collect();
        let mongo: BTreeMap<&String, f64> = b.mongo.iter().map(|(k, v)| (k, per(*v))).collect();
        let docs: BTreeMap<&String, f64> = b.docs.iter().map(|(k, v)| (k, per(*v))).collect();
        let written: BTreeMap<&String, f64> = b.written.iter().map(|(k, v)| (k, per(*v))).collect();
        let profile: BTreeMap<&String, Value> = b
            .profile
            .iter()
            .map(|(k, v)| (k, json!({"commands": per(v.0), "docs": per(v.1)})))
            .collect();
        let cpu: BTreeMap<String, f64> = self
            .cpu_us()
            .into_iter()
            .map(|(k, v)| (k, v.round()))
            .collect();
        json!({
            "phase": self.phase,
            "messages": n,
            "errors": self.errors,
            "sent": b.sent,
            "seconds": (b.secs * 10.0).round() / 10.0,
            "redis_commands": per(b.redis.values().map(|v| v.0).sum()),
            "redis": redis,
            "redis_usec": per(b.redis.values().map(|v| v.1).sum()),
            "mongodb_ops": mongo,
            "mongodb_docs_added": docs,
            "mongodb_docs_written": written,
            "mongodb_profile": profile,
            "es_docs": per(b.es_indexed),
            "es_bulks": per(b.es_bulks),
            "cpu_us": cpu,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_documents_read_by_kind() {
        let m = "# TYPE comm_aggregator_mongo_documents_written_total counter\ncomm_aggregator_mongo_documents_written_total{op=\"insert\"} 20\ncomm_aggregator_mongo_documents_written_total{op=\"outcome\"} 19\nother_total 3\n";
        let w = written(m);
        assert_eq!(w.get("insert"), Some(&20.0));
        assert_eq!(w.get("outcome"), Some(&19.0));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn commandstats_reads_calls_and_usec() {
        let info = "# Commandstats\r\ncmdstat_xadd:calls=3,usec=25,usec_per_call=8.33,rejected_calls=0\r\ncmdstat_xinfo|groups:calls=2,usec=4\r\n";
        let m = commandstats(info);
        assert_eq!(m["xadd"], (3.0, 25.0));
        assert_eq!(m["xinfo|groups"], (2.0, 4.0));
        assert_eq!(m.len(), 2);
    }

    fn snap(secs: u64, redis: &[(&str, f64)], command: f64, query: f64, cpu: f64) -> Snapshot {
        Snapshot {
            at: Some(Instant::now() + Duration::from_secs(secs)),
            redis: redis
                .iter()
                .map(|(k, v)| (k.to_string(), (*v, 0.0)))
                .collect(),
            mongo: [("command".into(), command), ("query".into(), query)].into(),
            docs: BTreeMap::new(),
            own_counts: 2.0,
            cpu: [("service".into(), cpu)].into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn delta_leaves_out_our_own_calls() {
        let a = snap(
            0,
            &[("info", 1.0), ("xadd", 5.0), ("get", 1.0)],
            10.0,
            4.0,
            0.0,
        );
        let b = snap(
            10,
            &[("info", 2.0), ("xadd", 9.0), ("get", 1.0)],
            12.0,
            6.0,
            50.0,
        );
        let d = delta(&a, &b);
        // INFO is ours, GET did not move.
        assert_eq!(d.redis.keys().collect::<Vec<_>>(), vec!["xadd"]);
        assert_eq!(d.redis["xadd"].0, 4.0);
        // serverStatus and listCollections (2 commands), two counts (2 queries): ours.
        assert_eq!(d.mongo["command"], 0.0);
        assert_eq!(d.mongo["query"], 0.0);
    }

    #[test]
    fn cpu_per_message_subtracts_the_idle_rate_over_the_runs_length() {
        let idle = delta(&snap(0, &[], 2.0, 0.0, 0.0), &snap(10, &[], 4.0, 0.0, 10.0));
        let busy = delta(&snap(0, &[], 2.0, 0.0, 0.0), &snap(5, &[], 4.0, 0.0, 105.0));
        let r = Report {
            phase: "e2e",
            n: 100.0,
            errors: 0,
            idle: &idle,
            busy: &busy,
        };
        // 105 ticks less 10 ticks/10 s idle × 5 s = 100 ticks = 1 s, over 100 messages.
        let us = r.cpu_us()["service"];
        assert!((us - 10_000.0).abs() < 50.0, "{us}");
    }
}
