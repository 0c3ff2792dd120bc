//! `comm_aggregator::run(config, shutdown)` driven in-process against real servers: it
//! starts, a message posted with an API key is sent, and once `shutdown` resolves `run`
//! stops in order and returns `Ok`.

mod common;

use comm_aggregator::config::Config;
use common::{client, eventually, free_port, root, unique, Stack};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_sends_and_returns_ok_on_shutdown() {
    let stack = tokio::task::spawn_blocking(Stack::start).await.unwrap();
    let port = free_port();
    let env: HashMap<String, String> = stack.service_env(port).into_iter().collect();
    let cfg = Config::load(&root().join("config.toml"), &|k| env.get(k).cloned()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(comm_aggregator::run(cfg, async {
        let _ = stopped.await;
    }));

    let url = format!("http://127.0.0.1:{port}/api/v1/communication");
    let msg = unique("in-process");
    let body = json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":msg}});
    let answer: Value = eventually(Duration::from_secs(20), "the service to accept", || {
        let req = client().post(&url).json(&body).send();
        async move { req.await.ok()?.json().await.ok() }
    })
    .await;
    assert_eq!(answer["status"], "queued", "{answer}");
    eventually(
        Duration::from_secs(20),
        "the SMS at the stand-in",
        || async {
            stack
                .sandbox_messages()
                .await
                .into_iter()
                .find(|m| m["body"] == msg.as_str())
        },
    )
    .await;

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("run returns within the shutdown deadline")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}
