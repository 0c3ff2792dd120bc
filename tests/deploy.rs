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
    assert!(d.contains("cargo build --profile release-lto --bin comm-aggregator"));
    assert!(d.contains("/src/target/release-lto/comm-aggregator "));
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
        "comm_aggregator_communications_accepted_total",
        "comm_aggregator_deliveries_total",
        "comm_aggregator_http_request_duration_seconds_bucket",
        "comm_aggregator_accept_to_sent_seconds_bucket",
        "comm_aggregator_stream_length",
        "comm_aggregator_stream_pending",
        "comm_aggregator_dead_letter_length",
        "comm_aggregator_provider_breaker_state",
        "comm_aggregator_log_indexer_bulk_seconds_bucket",
        "comm_aggregator_actor_restarts_total",
    ] {
        assert!(all.contains(m), "a panel over {m}");
    }
}

/// What the compose file publishes and protects, as shipped: nothing that holds message
/// bodies or secrets is reachable without a credential, and the operators' UIs listen on
/// the host's loopback only.
#[test]
fn compose_file_is_locked_down_as_shipped() {
    let y: Yaml = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    let s = &y["services"];
    let env = |svc: &str, k: &str| -> String {
        s[svc]["environment"][k]
            .as_str()
            .unwrap_or_else(|| panic!("{svc} sets {k}"))
            .to_string()
    };
    // A `${VAR:?message}` value: compose refuses to start without it.
    let required = |v: &str| v.starts_with("${") && v.contains(":?");

    // Elasticsearch: security on; the service authenticates with an API key.
    assert_eq!(env("elasticsearch", "xpack.security.enabled"), "true");
    assert!(required(&env("elasticsearch", "ELASTIC_PASSWORD")));
    assert!(required(&env("comm-aggregator", "ELASTICSEARCH_API_KEY")));
    assert!(required(&env("kibana", "ELASTICSEARCH_PASSWORD")));

    // Redis: a password, and the service's URL carries it.
    let redis_cmd = format!("{:?}", s["redis"]["command"]);
    assert!(redis_cmd.contains("--requirepass"), "{redis_cmd}");
    assert!(required(&env("redis", "REDIS_PASSWORD")));
    assert!(env("comm-aggregator", "REDIS_URL").contains(":${REDIS_PASSWORD}@"));

    // MongoDB: a root user, and the service's URL authenticates.
    assert!(required(&env("mongo", "MONGO_INITDB_ROOT_USERNAME")));
    assert!(required(&env("mongo", "MONGO_INITDB_ROOT_PASSWORD")));
    let mongo_cmd = format!("{:?}", s["mongo"]["command"]);
    assert!(
        mongo_cmd.contains("--keyFile"),
        "a replica set with auth: {mongo_cmd}"
    );
    let url = env("comm-aggregator", "MONGODB_URL");
    assert!(
        url.contains("@mongo:27017") && url.contains("authSource=admin"),
        "{url}"
    );

    // /metrics wants a token.
    assert!(required(&env("comm-aggregator", "METRICS_TOKEN")));

    // Only the API is published on every interface; the UIs on the host's loopback.
    for svc in ["kibana", "prometheus", "grafana"] {
        for p in s[svc]["ports"].as_sequence().unwrap() {
            let p = p.as_str().unwrap();
            assert!(p.starts_with("127.0.0.1:"), "{svc} publishes {p}");
        }
    }
    for svc in ["mongo", "redis", "elasticsearch"] {
        assert!(s[svc]["ports"].is_null(), "{svc} is not published");
    }
    assert!(
        required(&env("grafana", "GF_SECURITY_ADMIN_PASSWORD")),
        "Grafana's admin password is not the default"
    );
}

/// Prometheus sends the token `/metrics` wants, from a compose secret made of
/// `METRICS_TOKEN`.
#[test]
fn prometheus_scrapes_with_the_metrics_token() {
    let y: Yaml = serde_yaml::from_str(&read("prometheus.yml")).unwrap();
    let job = &y["scrape_configs"][0];
    assert_eq!(
        job["authorization"]["credentials_file"].as_str(),
        Some("/run/secrets/metrics_token"),
        "{job:?}"
    );
    let c: Yaml = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    assert_eq!(
        c["secrets"]["metrics_token"]["environment"].as_str(),
        Some("METRICS_TOKEN")
    );
    let mounted = format!("{:?}", c["services"]["prometheus"]["secrets"]);
    assert!(mounted.contains("metrics_token"), "{mounted}");
}

/// `cargo tree` of the root crate with the given dependency kinds, features shown.
fn feature_tree(edges: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--locked", "--offline", "-p", "comm-aggregator"])
        .args(["-e", edges, "--prefix", "none", "-i", "actors"])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn fault_injection_is_compiled_into_test_builds_only() {
    const FEATURE: &str = "actors feature \"fault-injection\"";
    // What `cargo build --release` compiles: no dev-dependencies, so no fault markers.
    let release = feature_tree("normal,build,features");
    assert!(
        !release.contains(FEATURE),
        "a release build must not have the fault markers:\n{release}"
    );
    // What `cargo test` compiles (this binary among it) has them, and says so.
    let test = feature_tree("normal,build,dev,features");
    assert!(test.contains(FEATURE), "{test}");
    const { assert!(actors::FAULT_INJECTION_BUILT) };
}
