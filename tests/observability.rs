//! Observability follows the conventions (#17): `/metrics` passes `promtool check metrics`
//! (HELP on every series, unit-bearing names under `comm_aggregator_`), the alert rules and
//! the scrape config pass `promtool check rules` / `check config`, and the logs carry no
//! terminal colour codes when stdout is not a terminal.
//!
//! promtool is Debian's `prometheus` package (`scripts/stack.sh install`); these tests fail,
//! not skip, without it.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Run promtool with `args`, `stdin` fed to it; its output (stdout and stderr together).
fn promtool(args: &[&str], stdin: &[u8]) -> (Output, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); `scripts/stack.sh install` installs it")
        });
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Traffic through the shared service until deliveries are counted, so the series of the
/// send path exist; answers the `/metrics` text after it.
async fn metrics_after_traffic() -> String {
    let (_, svc) = shared();
    for i in 0..3 {
        let (status, body) = svc.post(sms(&unique(&format!("observability-{i}")))).await;
        assert_eq!(status, 200, "{body}");
    }
    let _ = svc.get("/nope").await;
    eventually(Duration::from_secs(30), "deliveries counted", || async {
        (svc.metric_total("deliveries_total").await >= 3.0).then_some(())
    })
    .await;
    get(svc.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The live `/metrics` text passes `promtool check metrics` with nothing to report, and
/// every series is named `comm_aggregator_…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_without_a_word() {
    let text = metrics_after_traffic().await;
    assert!(
        text.contains("comm_aggregator_deliveries_total{"),
        "traffic counted:\n{text}"
    );
    for line in text.lines().filter(|l| !l.is_empty()) {
        let name = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .unwrap_or(line);
        assert!(
            name.starts_with(METRIC_PREFIX),
            "a series outside the prefix: {line}"
        );
    }
    let (out, said) = promtool(&["check", "metrics"], text.as_bytes());
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}):\n{said}",
        out.status
    );
}

/// `deploy/alerts.yml` passes `promtool check rules`, and `deploy/prometheus.yml` (which
/// loads it) `promtool check config`: checked on a copy whose token file exists, as compose's
/// secret does in production.
#[test]
fn alert_rules_and_scrape_config_pass_promtool() {
    let deploy = root().join("deploy");
    let alerts = deploy.join("alerts.yml");
    let (out, said) = promtool(&["check", "rules", alerts.to_str().unwrap()], b"");
    assert!(out.status.success(), "promtool check rules:\n{said}");
    assert!(said.contains("SUCCESS"), "{said}");

    let dir = std::env::temp_dir().join(format!("promtool-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("metrics_token");
    std::fs::write(&token, "a-token\n").unwrap();
    let config = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
    let secret = "/run/secrets/metrics_token";
    assert!(
        config.contains(secret),
        "the config reads the compose secret"
    );
    let config = config.replace(secret, token.to_str().unwrap());
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    std::fs::copy(&alerts, dir.join("alerts.yml")).unwrap();
    let path = dir.join("prometheus.yml");
    let (out, said) = promtool(&["check", "config", path.to_str().unwrap()], b"");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "promtool check config:\n{said}");
    assert!(said.contains("SUCCESS: 1 rule files found"), "{said}");
}

/// The service's logs, written to a file (the tests' services log to one, as journald or a
/// redirect would), carry no ANSI escape codes; text format, as `config.toml` ships.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_carry_no_colour_codes() {
    metrics_after_traffic().await;
    let (_, svc) = shared();
    let log = std::fs::read_to_string(Path::new(&svc.proc.log)).unwrap();
    assert!(
        log.lines().any(|l| l.contains(" INFO ")),
        "the service logged in text format:\n{log}"
    );
    assert!(
        !log.contains("\x1b["),
        "ANSI escapes in the log file:\n{log}"
    );
}
