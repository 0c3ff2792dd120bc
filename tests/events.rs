//! The live status stream, `GET /api/v1/events` (SSE) and `/api/v1/events/ws` (WebSocket),
//! against the real stack: the events of a send as they happen, tenant isolation, the
//! filters, a resume with `Last-Event-ID` from `log_stream` and (once trimmed) from
//! Elasticsearch, the WebSocket, a slow client dropped while a fast one gets everything,
//! and the keep-alive.

mod common;

use common::{Service, Stack, API_KEY, OTHER_KEY};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The tests that trim `log_stream` or flood it take it alone; the others share it.
static STREAM: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A stack and a service with a short keep-alive and a small subscriber buffer.
fn svc() -> &'static (Stack, Service) {
    static SVC: OnceLock<&'static (Stack, Service)> = OnceLock::new();
    SVC.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let stack = Stack::start();
            let service = stack.start_service_configured(
                &[],
                &[
                    ("events.keep_alive_ms", toml::Value::Integer(300)),
                    ("events.subscriber_buffer", toml::Value::Integer(256)),
                    ("events.channel_capacity", toml::Value::Integer(1024)),
                ],
            );
            let both: &'static (Stack, Service) = Box::leak(Box::new((stack, service)));
            tx.send(both).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .expect("starting the stack failed; see the panic above")
    })
}

/// One SSE event: its id (the cursor) and its data.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    cursor: String,
    data: Value,
}

impl Ev {
    fn key(&self) -> (u64, u64) {
        let (a, b) = self.cursor.split_once('-').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    }
    fn is(&self, id: &str, status: &str) -> bool {
        self.data["id"] == id && self.data["status"] == status
    }
}

enum Frame {
    Event(Ev),
    Comment(String),
}

/// An open SSE subscription, read frame by frame.
struct Sse {
    res: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(key: &str, query: &str, last_event_id: Option<&str>) -> Sse {
        let (_, svc) = svc();
        Sse::open_on(svc, key, query, last_event_id).await
    }

    async fn open_on(svc: &Service, key: &str, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut rb = common::client_for(key).get(svc.url(&format!("/api/v1/events?{query}")));
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id);
        }
        let res = rb.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Sse {
            res,
            buf: String::new(),
        }
    }

    /// The next frame; `None` when the stream ended. Guarded against a hang.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                return Some(parse_frame(&block));
            }
            let chunk = tokio::time::timeout(WAIT, self.res.chunk())
                .await
                .expect("no frame in time")
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    async fn next(&mut self) -> Ev {
        loop {
            match self.frame().await.expect("the stream ended") {
                Frame::Event(e) => return e,
                Frame::Comment(_) => {}
            }
        }
    }

    /// Events until `done` says the list read so far is complete.
    async fn until(&mut self, done: impl Fn(&[Ev]) -> bool) -> Vec<Ev> {
        let mut got = Vec::new();
        while !done(&got) {
            got.push(self.next().await);
        }
        got
    }
}

fn parse_frame(block: &str) -> Frame {
    let (mut cursor, mut data, mut event, mut comment) = (None, None, None, None);
    for line in block.lines().filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.strip_prefix(' ').unwrap_or(v);
        match k {
            "" => comment = Some(v.to_string()),
            "id" => cursor = Some(v.to_string()),
            "event" => event = Some(v.to_string()),
            "data" => data = Some(serde_json::from_str(v).unwrap()),
            other => panic!("unexpected SSE field {other:?} in {block:?}"),
        }
    }
    match (cursor, data) {
        (Some(cursor), Some(data)) => {
            assert_eq!(event.as_deref(), Some("status"), "{block}");
            Frame::Event(Ev { cursor, data })
        }
        _ => Frame::Comment(comment.unwrap_or_else(|| block.to_string())),
    }
}

async fn send(key: &str, body: Value) -> String {
    let (_, svc) = svc();
    send_on(svc, key, body).await
}

async fn send_on(svc: &Service, key: &str, body: Value) -> String {
    let res = common::client_for(key)
        .post(svc.url("/api/v1/communication"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

async fn wait_status(id: &str, status: &str) {
    let (stack, _) = svc();
    wait_status_on(stack, id, status).await
}

async fn wait_status_on(stack: &Stack, id: &str, status: &str) {
    common::eventually(WAIT, &format!("{id} {status}"), || async {
        stack
            .record(id)
            .await
            .filter(|d| d.get_str("status") == Ok(status))
    })
    .await;
}

/// The newest `log_stream` entry id now (events after it are the test's).
async fn stream_end() -> String {
    let (stack, _) = svc();
    stream_end_on(stack).await
}

async fn stream_end_on(stack: &Stack) -> String {
    let mut r = stack.redis().await;
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("log_stream")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    v.first().map_or("0-0".into(), |(id, _)| id.clone())
}

fn has(evs: &[Ev], id: &str, status: &str) -> bool {
    evs.iter().any(|e| e.is(id, status))
}

fn statuses_of(evs: &[Ev], id: &str) -> Vec<String> {
    evs.iter()
        .filter(|e| e.data["id"] == id)
        .map(|e| e.data["status"].as_str().unwrap().to_string())
        .collect()
}

fn assert_increasing(evs: &[Ev]) {
    for w in evs.windows(2) {
        assert!(w[0].key() < w[1].key(), "cursors increase: {w:?}");
    }
}

#[tokio::test]
async fn a_subscriber_sees_its_sends_queued_sent_delivered_and_another_tenant_sees_none() {
    let _stream = STREAM.read().await;
    let mut mine = Sse::open(API_KEY, "", None).await;
    let mut theirs = Sse::open(OTHER_KEY, "", None).await;
    let id = send(API_KEY, common::sms(&common::unique("events"))).await;
    let got = mine.until(|e| has(e, &id, "delivered")).await;
    assert_eq!(statuses_of(&got, &id), ["queued", "sent", "delivered"]);
    let sent = got.iter().find(|e| e.is(&id, "sent")).unwrap();
    assert_eq!(sent.data["type"], "sms");
    assert_eq!(sent.data["provider"], "twilio");
    assert!(sent.data["attempt"].is_u64());
    assert!(chrono::DateTime::parse_from_rfc3339(sent.data["at"].as_str().unwrap()).is_ok());
    assert!(sent.data.get("batchId").is_none() && sent.data.get("error").is_none());
    assert_increasing(&got);
    // The other tenant's own send comes after every event of ours in the stream: by the
    // time its subscriber has its own, it would have had ours.
    let other = send(OTHER_KEY, common::sms(&common::unique("events-other"))).await;
    let seen = theirs.until(|e| has(e, &other, "delivered")).await;
    assert!(seen.iter().all(|e| e.data["id"] != id.as_str()), "{seen:?}");
    assert_eq!(statuses_of(&seen, &other), ["queued", "sent", "delivered"]);
}

#[tokio::test]
async fn the_filters_ids_type_and_batch_id_pass_only_what_they_name() {
    let _stream = STREAM.read().await;
    let before = stream_end().await;
    // In this order, each waited out: anything a broken filter let through comes first.
    let b = send(API_KEY, common::sms(&common::unique("f-b"))).await;
    wait_status(&b, "delivered").await;
    let a = send(API_KEY, common::sms(&common::unique("f-a"))).await;
    wait_status(&a, "delivered").await;
    let (_, svc) = svc();
    let bulk = json!({"type": "sms", "data": {"from": "+15550001111", "msg": common::unique("f-x")},
        "recipients": [{"to": "+15557654321"}, {"to": "+15557654322"}]});
    let res: Value = common::client()
        .post(svc.url("/api/v1/communications/bulk"))
        .json(&bulk)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch = res["batchId"].as_str().unwrap().to_string();
    let xs: Vec<String> = (0..2)
        .map(|i| res["results"][i]["id"].as_str().unwrap().to_string())
        .collect();
    let mail = json!({"type":"email","data":{"from":"noreply@example.com","to":"ada@example.org",
        "msg": common::unique("f-e"),"subject":"Hello"}});
    let e = send(API_KEY, mail).await;

    let mut by_id = Sse::open(API_KEY, &format!("ids={a}"), Some(&before)).await;
    let got = by_id.until(|v| has(v, &a, "delivered")).await;
    assert_eq!(statuses_of(&got, &a), ["queued", "sent", "delivered"]);
    assert_eq!(got.len(), 3, "{got:?}");

    let mut by_batch = Sse::open(API_KEY, &format!("batchId={batch}"), Some(&before)).await;
    let got = by_batch
        .until(|v| xs.iter().all(|x| has(v, x, "delivered")))
        .await;
    assert!(got.iter().all(|v| v.data["batchId"] == batch.as_str()));
    assert_eq!(got.len(), 6, "{got:?}");

    let mut by_type = Sse::open(API_KEY, "type=email", Some(&before)).await;
    let got = by_type.until(|v| has(v, &e, "sent")).await;
    assert!(got.iter().all(|v| v.data["type"] == "email"), "{got:?}");
    assert_eq!(statuses_of(&got, &e), ["queued", "sent"]);

    let anon = reqwest::Client::new()
        .get(svc.url("/api/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401, "the key is wanted as elsewhere");
    for (q, field) in [
        ("ids=x", "ids"),
        ("type=fax", "type"),
        ("lastEventId=1", "lastEventId"),
    ] {
        let res = common::get(svc.url(&format!("/api/v1/events?{q}")))
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{q}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["field"], field, "{q}: {v}");
    }
}

/// Sends `a`, reads its first event on one connection and drops it; sends `b`; both
/// delivered. Returns (a, b, the cursor read).
async fn read_some_then_send_more(tag: &str) -> (String, String, Ev) {
    let (stack, svc) = svc();
    read_some_then_send_more_on(stack, svc, tag).await
}

async fn read_some_then_send_more_on(
    stack: &Stack,
    svc: &Service,
    tag: &str,
) -> (String, String, Ev) {
    let before = stream_end_on(stack).await;
    let a = send_on(svc, API_KEY, common::sms(&common::unique(tag))).await;
    let mut first = Sse::open_on(svc, API_KEY, &format!("ids={a}"), Some(&before)).await;
    let queued = first.next().await;
    assert!(queued.is(&a, "queued"), "{queued:?}");
    drop(first);
    let b = send_on(svc, API_KEY, common::sms(&common::unique(tag))).await;
    wait_status_on(stack, &a, "delivered").await;
    wait_status_on(stack, &b, "delivered").await;
    (a, b, queued)
}

async fn resumed(a: &str, b: &str, after: &Ev) -> Vec<Ev> {
    let (_, svc) = svc();
    resumed_on(svc, a, b, after).await
}

async fn resumed_on(svc: &Service, a: &str, b: &str, after: &Ev) -> Vec<Ev> {
    let mut again = Sse::open_on(svc, API_KEY, &format!("ids={a},{b}"), Some(&after.cursor)).await;
    let got = tokio::time::timeout(WAIT, again.until(|v| v.len() >= 5 || has(v, a, "queued")))
        .await
        .expect("the resumed events in time");
    assert!(got.iter().all(|e| e.key() > after.key()), "{got:?}");
    assert_eq!(statuses_of(&got, a), ["sent", "delivered"], "{got:?}");
    assert_eq!(statuses_of(&got, b), ["queued", "sent", "delivered"]);
    assert_increasing(&got);
    got
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_every_later_event_once() {
    let _stream = STREAM.read().await;
    let (a, b, queued) = read_some_then_send_more("resume").await;
    resumed(&a, &b, &queued).await;
    // The query parameter does the same for clients that cannot set the header.
    let (_, svc) = svc();
    let res = common::get(svc.url(&format!(
        "/api/v1/events?ids={a}&lastEventId={}",
        queued.cursor
    )))
    .await
    .unwrap();
    let mut sse = Sse {
        res,
        buf: String::new(),
    };
    assert!(sse.next().await.is(&a, "sent"));
}

#[tokio::test]
async fn a_resume_from_a_cursor_trimmed_from_log_stream_is_served_from_elasticsearch() {
    let _stream = STREAM.write().await;
    let (a, b, queued) = read_some_then_send_more("resume-es").await;
    let (stack, _) = svc();
    // Every event of both indexed, its cursor's number as zero-padded text, then the
    // stream trimmed past them.
    let docs = indexed_events(stack, &a, &b).await;
    for d in &docs {
        let (text, cursor) = (&d["_source"]["cursorSeq"], &d["_source"]["cursor"]);
        let (ms, seq) = cursor.as_str().unwrap().split_once('-').unwrap();
        let number = ms.parse::<i64>().unwrap() * 1024 + seq.parse::<i64>().unwrap();
        assert_eq!(text, &json!(format!("{number:020}")), "{d}");
    }
    trim_log_stream(stack).await;
    resumed(&a, &b, &queued).await;
}

/// An index an earlier version created maps `cursorSeq` as a `long`, and its documents
/// hold the number, where this version maps a keyword and writes zero-padded text. A
/// resume from Elasticsearch over such an index reads both kinds of document, in order.
#[tokio::test]
async fn a_resume_from_elasticsearch_reads_an_index_and_documents_an_earlier_version_wrote() {
    let stack = Stack::start();
    let mut mapping = comm_aggregator::clients::elastic::logs_mapping();
    mapping["mappings"]["properties"]["cursorSeq"] = json!({"type": "long"});
    stack.es_put("/communication-logs", &mapping).await;
    let svc = stack.start_service(&[]);
    let (a, b, queued) = read_some_then_send_more_on(&stack, &svc, "resume-old").await;
    // `a`'s documents as the earlier version wrote them: the number.
    for d in indexed_events(&stack, &a, &b).await {
        let mut source = d["_source"].clone();
        if source["communicationId"] != a.as_str() {
            continue;
        }
        let text = source["cursorSeq"].as_str().unwrap().to_string();
        source["cursorSeq"] = json!(text.parse::<i64>().unwrap());
        let id = d["_id"].as_str().unwrap();
        let path = format!("/communication-logs/_doc/{id}?refresh=true");
        stack.es_put(&path, &source).await;
    }
    let now = stack.es_get("/communication-logs/_mapping").await;
    assert_eq!(
        now["communication-logs"]["mappings"]["properties"]["cursorSeq"]["type"], "long",
        "{now}"
    );
    let numbers = indexed_events(&stack, &a, &b)
        .await
        .iter()
        .filter(|d| d["_source"]["cursorSeq"].is_i64())
        .count();
    assert_eq!(numbers, 3, "a's three documents hold the number");
    trim_log_stream(&stack).await;
    resumed_on(&svc, &a, &b, &queued).await;
}

/// The six log documents of `a` and `b` (queued, sent, delivered each), once indexed.
async fn indexed_events(stack: &Stack, a: &str, b: &str) -> Vec<Value> {
    common::eventually(WAIT, "the events indexed", || async {
        let docs = stack
            .es_search(
                "communication-logs",
                json!({"terms": {"communicationId": [a, b]}}),
            )
            .await;
        (docs.len() == 6).then_some(docs)
    })
    .await
}

/// `log_stream` trimmed past its newest entry: a resume from before it reads Elasticsearch.
async fn trim_log_stream(stack: &Stack) {
    let end = stream_end_on(stack).await;
    let (ms, seq) = end.split_once('-').unwrap();
    let mut r = stack.redis().await;
    let _: i64 = redis::cmd("XTRIM")
        .arg("log_stream")
        .arg("MINID")
        .arg(format!("{ms}-{}", seq.parse::<u64>().unwrap() + 1))
        .query_async(&mut r)
        .await
        .unwrap();
    let left: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("log_stream")
        .arg("-")
        .arg(&end)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(left.is_empty(), "trimmed");
}

#[tokio::test]
async fn the_websocket_carries_the_same_events_with_their_cursor() {
    let _stream = STREAM.read().await;
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let (_, svc) = svc();
    let before = stream_end().await;
    let id = send(API_KEY, common::sms(&common::unique("ws"))).await;
    let url = format!(
        "ws://127.0.0.1:{}/api/v1/events/ws?ids={id}&lastEventId={before}",
        svc.port
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut frames = Vec::new();
    while !frames.iter().any(|f: &Value| f["status"] == "delivered") {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            frames.push(serde_json::from_str(t.as_str()).unwrap());
        }
    }
    let mut sse = Sse::open(API_KEY, &format!("ids={id}"), Some(&before)).await;
    let same = sse.until(|v| has(v, &id, "delivered")).await;
    let expected: Vec<Value> = same
        .iter()
        .map(|e| {
            let mut d = e.data.clone();
            d["cursor"] = json!(e.cursor);
            d
        })
        .collect();
    assert_eq!(frames, expected);
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_counted_while_a_fast_one_gets_everything() {
    let _stream = STREAM.write().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (stack, svc) = svc();
    let id = format!("{:024x}", rand_id());
    let dropped = svc.metric_total("events_subscribers_dropped_total").await;
    // The slow client: a small receive window, and it reads nothing.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock
        .connect(format!("127.0.0.1:{}", svc.port).parse().unwrap())
        .await
        .unwrap();
    let req = format!(
        "GET /api/v1/events?ids={id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    slow.write_all(req.as_bytes()).await.unwrap();
    let mut fast = Sse::open(API_KEY, &format!("ids={id}"), None).await;
    let mut redis = stack.redis().await;
    let (chunks, per) = (40, 100);
    let mut got = Vec::new();
    for c in 0..chunks {
        let mut pipe = redis::pipe();
        for n in c * per..(c + 1) * per {
            let cmd = pipe.cmd("XADD").arg("log_stream").arg("*");
            for (k, v) in fake_event(&id, n) {
                cmd.arg(k).arg(v);
            }
        }
        let _: Vec<String> = pipe.query_async(&mut redis).await.unwrap();
        let last = (c + 1) * per - 1;
        got.extend(
            fast.until(|v| v.last().is_some_and(|e| e.data["attempt"] == last))
                .await,
        );
    }
    let attempts: Vec<u64> = got
        .iter()
        .map(|e| e.data["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(
        attempts,
        (0..chunks * per).map(|n| n as u64).collect::<Vec<_>>()
    );
    common::eventually(WAIT, "the slow subscriber counted as dropped", || async {
        (svc.metric_total("events_subscribers_dropped_total").await > dropped).then_some(())
    })
    .await;
    // Its stream was ended by the service: reading it now finds the end, short of all.
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, slow.read_to_end(&mut all))
        .await
        .expect("the slow client's stream ends")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(text.matches("event:status").count() < (chunks * per) as usize);
}

fn rand_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    ((h.finish() as u128) << 32) | 0x5eed
}

/// A `log_stream` entry: a `sent` event of `id`, attempt `n`, for the test tenant, with
/// a long error text.
fn fake_event(id: &str, n: u32) -> Vec<(&'static str, String)> {
    let now = chrono::Utc::now().to_rfc3339();
    vec![
        ("tenant", common::TENANT.into()),
        ("service", "test".into()),
        ("status", "sent".into()),
        ("from", "+15550001111".into()),
        ("to", "+15557654321".into()),
        ("msg", "x".into()),
        ("communicationId", id.into()),
        ("timestamp", now.clone()),
        ("type", "sms".into()),
        ("attempt", n.to_string()),
        ("createdAt", now),
        // Large, so that what the slow client leaves unread outgrows the sockets' buffers
        // (up to 4 MiB each way here) well before the test's events are all sent.
        ("error", "x".repeat(2000)),
    ]
}

#[tokio::test]
async fn an_idle_stream_carries_keep_alive_comments() {
    let _stream = STREAM.read().await;
    let id = format!("{:024x}", rand_id() + 1);
    let mut sse = Sse::open(API_KEY, &format!("ids={id}"), None).await;
    match sse.frame().await.expect("a frame") {
        Frame::Comment(c) => assert_eq!(c, "keep-alive", "{:?}", sse.buf),
        Frame::Event(e) => panic!("no event was sent: {e:?}"),
    }
    let (_, svc) = svc();
    assert!(svc.metric_total("events_subscribers").await >= 1.0);
}

/// Issue #14: while nobody subscribes, the fanout reads no `log_stream` entry (before, it
/// read and parsed every event of every message for no one); the first subscriber wakes
/// it, and gets the events of a send made after it joined.
#[tokio::test]
async fn with_no_subscriber_the_fanout_reads_nothing_and_the_first_one_wakes_it() {
    let (stack, _) = svc();
    // A service of its own (its Redis database, its MongoDB database): its metrics count
    // only its own fanout's reads.
    let redis = format!("redis://127.0.0.1:{}/2", stack.redis_port);
    let env = [
        ("REDIS_URL", redis.as_str()),
        ("CONSUMER_NAME", "events-idle"),
        ("MONGODB_DATABASE", "events_idle"),
    ];
    let own = stack.start_service(&env);
    let mut ids = Vec::new();
    for i in 0..10 {
        let body = common::sms(&common::unique(&format!("events-idle-{i}")));
        ids.push(send_on(&own, API_KEY, body).await);
    }
    for id in &ids {
        common::eventually(WAIT, &format!("{id} sent"), || async {
            let (_, v) = own.get(&format!("/api/v1/communication/{id}")).await;
            matches!(v["status"].as_str(), Some("sent" | "delivered")).then_some(())
        })
        .await;
    }
    let mut r = redis::Client::open(redis.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let logged: u64 = redis::cmd("XLEN")
        .arg("log_stream")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(logged >= 20, "the sends were logged: {logged} entries");
    assert_eq!(
        own.metric_total("events_fanout_read_total").await,
        0.0,
        "no subscriber, no entry read"
    );
    let mut sse = Sse::open_on(&own, API_KEY, "", None).await;
    let id = send_on(
        &own,
        API_KEY,
        common::sms(&common::unique("events-idle-woken")),
    )
    .await;
    let got = sse.until(|e| has(e, &id, "sent")).await;
    assert_eq!(statuses_of(&got, &id)[..2], ["queued", "sent"]);
    assert!(own.metric_total("events_fanout_read_total").await >= 2.0);
}

#[tokio::test]
async fn the_streams_end_at_shutdowns_first_stage_and_the_service_exits() {
    let (stack, _) = svc();
    // Redis database 1: no stream of the shared service's is left to wait on.
    let redis = format!("redis://127.0.0.1:{}/1", stack.redis_port);
    // A first stage far longer than the test waits: only the streams' own end, at its
    // start, lets the service stop in time.
    let env = [
        ("REDIS_URL", redis.as_str()),
        ("CONSUMER_NAME", "events-term"),
        ("SHUTDOWN_ACCEPT_MS", "120000"),
    ];
    let mut own = stack.start_service(&env);
    let mut sse = Sse::open_on(&own, API_KEY, "", None).await;
    own.proc.signal(libc::SIGTERM);
    let ended = async {
        loop {
            match sse.frame().await {
                None => break,
                Some(Frame::Comment(_)) => {}
                Some(Frame::Event(e)) => panic!("nothing was sent: {e:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, ended)
        .await
        .expect("the stream ended at shutdown's first stage");
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = own.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < WAIT, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}\n{}", own.proc.log_tail());
}
