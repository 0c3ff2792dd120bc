//! The deployment files parse, and the environment they give the service is made of
//! variables the service reads. (Docker, Prometheus and Grafana cannot run here.)

use comm_aggregator::config::ENV_VARS;
use serde_yaml::Value as Yaml;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/deploy/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn compose_file_parses_and_sets_only_known_variables() {
    let y: Yaml = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    let services = y["services"].as_mapping().unwrap();
    for want in [
        "comm-aggregator",
        "mongo",
        "redis",
        "elasticsearch",
        "kibana",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(want), "service {want}");
    }
    let env = y["services"]["comm-aggregator"]["environment"]
        .as_mapping()
        .unwrap();
    assert!(env.len() >= 8);
    for (k, _) in env {
        let k = k.as_str().unwrap();
        assert!(
            ENV_VARS.contains(&k),
            "compose sets {k}, which the service does not read"
        );
    }
    let redis_cmd = format!("{:?}", y["services"]["redis"]["command"]);
    assert!(redis_cmd.contains("appendonly"), "Redis with AOF");
}

#[test]
fn systemd_unit_sets_only_known_variables() {
    let unit = read("comm-aggregator.service");
    let mut n = 0;
    for line in unit.lines().filter(|l| l.starts_with("Environment=")) {
        let kv = line.trim_start_matches("Environment=");
        let k = kv.split('=').next().unwrap();
        assert!(
            ENV_VARS.contains(&k),
            "the unit sets {k}, which the service does not read"
        );
        n += 1;
    }
    assert!(n >= 4);
    assert!(unit.contains("ExecStart=/usr/local/bin/comm-aggregator"));
    assert!(unit.contains("KillSignal=SIGTERM"));
}

#[test]
fn dockerfile_is_multi_stage_and_sets_known_variables() {
    let d = read("Dockerfile");
    assert_eq!(d.lines().filter(|l| l.starts_with("FROM ")).count(), 2);
    assert!(d.contains("cargo build --release --bin comm-aggregator"));
    for line in d.lines().filter(|l| l.starts_with("ENV ")) {
        for kv in line.trim_start_matches("ENV ").split_whitespace() {
            let k = kv.split('=').next().unwrap();
            assert!(
                ENV_VARS.contains(&k),
                "the image sets {k}, which the service does not read"
            );
        }
    }
}

#[test]
fn prometheus_config_and_alert_rules_parse() {
    let p: Yaml = serde_yaml::from_str(&read("prometheus.yml")).unwrap();
    assert_eq!(
        p["scrape_configs"][0]["metrics_path"].as_str(),
        Some("/metrics")
    );
    let a: Yaml = serde_yaml::from_str(&read("alerts.yml")).unwrap();
    let names: Vec<&str> = a["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for want in [
        "HighFailureRate",
        "QueueBacklog",
        "ServiceDown",
        "MongoDBUnavailable",
        "ElasticsearchUnavailable",
    ] {
        assert!(names.contains(&want), "alert {want}");
    }
}

#[test]
fn grafana_dashboard_parses_and_queries_our_metrics() {
    let d: serde_json::Value = serde_json::from_str(&read("grafana/comm-aggregator.json")).unwrap();
    let exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let all = exprs.join("\n");
    for m in [
        "communications_accepted_total",
        "deliveries_total",
        "http_request_duration_seconds_bucket",
        "accept_to_sent_seconds_bucket",
        "stream_length",
        "stream_pending",
        "dead_letter_length",
        "provider_breaker_state",
        "log_indexer_bulk_seconds_bucket",
        "actor_restarts_total",
    ] {
        assert!(all.contains(m), "a panel over {m}");
    }
}
