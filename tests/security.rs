//! Start-up refusals that keep a careless deployment from going out insecure: the binary
//! itself, run as an operator would, with the environment it is given.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run the service with only these variables (plus the credentials every start needs) and
/// return its exit status and everything it printed; it must exit by itself.
fn start_with(vars: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comm-aggregator"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("API_KEYS", "acme:acme-0123456789abcdef"),
            ("ACCOUNTSID", "AC00000000000000000000000000000000"),
            ("AUTHTOKEN", "token"),
            ("WHATSAPP_PHONE_NUMBER_ID", "1234"),
            ("WHATSAPP_TOKEN", "token"),
            // Nothing listens here: a start that got past its checks would hang, not exit.
            (
                "MONGODB_URL",
                "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=60000",
            ),
        ])
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (out.status, text);
        }
        if Instant::now() > give_up {
            let _ = child.kill();
            panic!("the service did not refuse to start with {vars:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_plain_http_provider_base_off_this_host_stops_start_up() {
    let (status, out) = start_with(&[("TWILIO_API_BASE", "http://api.twilio.example.com")]);
    assert!(!status.success());
    assert!(
        out.contains("TWILIO_API_BASE") && out.contains("ALLOW_INSECURE_TRANSPORT"),
        "the message names the setting and the way out: {out}"
    );
}

#[test]
fn plain_redis_off_this_host_stops_start_up() {
    let (status, out) = start_with(&[("REDIS_URL", "redis://cache.internal.example:6379")]);
    assert!(!status.success());
    assert!(
        out.contains("REDIS_URL") && out.contains("ALLOW_INSECURE_TRANSPORT"),
        "{out}"
    );
}

#[test]
fn dev_mode_on_a_public_address_stops_start_up() {
    let (status, out) = start_with(&[("HOST", "0.0.0.0"), ("DEV_MODE", "true")]);
    assert!(!status.success());
    assert!(out.contains("DEV_MODE") && out.contains("HOST"), "{out}");
}

#[test]
fn a_refused_url_is_named_without_its_credentials() {
    for (var, value) in [
        ("MONGODB_URL", "postgres://admin:s3cret-pw@db.internal/x"),
        ("REDIS_URL", "redis://:s3cret-pw@cache.example.com:6379/0"),
        ("SMTP_URL", "smtp://mailer:s3cret-pw@mail.example.com:25"),
        (
            "ELASTICSEARCH_NODE",
            "ftp://elastic:s3cret-pw@search.example.com",
        ),
        ("MONGODB_URL", "mongodb://admin:s3cret-pw@[::1"),
    ] {
        let (status, out) = start_with(&[(var, value)]);
        assert!(
            !status.success(),
            "{var}={value} must stop start-up:\n{out}"
        );
        assert!(out.contains(var), "the message names {var}:\n{out}");
        assert!(
            !out.contains("s3cret-pw"),
            "the password of {var} is printed:\n{out}"
        );
    }
}
