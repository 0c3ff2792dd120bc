//! The test harness: real servers on free loopback ports, started by the tests themselves
//! (Redis from Debian, SecantusDB, osmem-server and aiosmtpd from the project's .venv,
//! and the provider-sandbox binary), and the service binary itself.
//! `make test` (scripts/stack.sh install) puts those programs in place; a missing one is a
//! failing test with a message saying so, never a skipped one.
#![allow(dead_code)]

pub mod cluster;
pub mod webdriver;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The tenant the tests act as, and its key (the service is started with both tenants).
pub const TENANT: &str = "tests";
pub const API_KEY: &str = "tests-key-0123456789abcdef";
/// A second tenant, to show the first one's messages stay out of its sight.
pub const OTHER_TENANT: &str = "other";
pub const OTHER_KEY: &str = "other-key-0123456789abcdef";
/// The provider stand-in's SendGrid event webhook key (its development key pair).
pub const SENDGRID_PUBLIC_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEK9bD4IMlz2G7NOB5/jQwuhCO8Jm9KXQJY9/8QbFsQMckVLQagkh54yMBsTqFAy3/Z1IhaEZenOC3wYvKJVycEA==";

/// An HTTP client that sends the test tenant's API key.
pub fn client() -> reqwest::Client {
    client_for(API_KEY)
}

pub fn client_for(key: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

/// GET with the test tenant's key.
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    client().get(url).send().await
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn venv() -> PathBuf {
    root().join(".venv")
}

/// A port for a server of the test stack: below Linux's ephemeral range (32768-60999 by
/// default), so no outgoing connection can be holding it as its source port by the time the
/// server binds it, and never the same port twice in one test binary (two servers handed one
/// port made one of them answer for the other).
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut given = GIVEN
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap();
    // Spread the processes of parallel test binaries over the range from different places.
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    const LOW: u64 = 20_000;
    const SPAN: u64 = 12_000;
    for i in 0..SPAN {
        let port = (LOW + (seed.wrapping_mul(7_919) + i * 37) % SPAN) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN);
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A child process killed (SIGKILL) when dropped, and when the thread that started it ends.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({cmd:?}): {e}; run `make test` or scripts/stack.sh install"
            )
        });
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn wait_port(&mut self, port: u16, within: Duration) {
        let start = Instant::now();
        while start.elapsed() < within {
            if port_open(port) {
                // Someone answers; make sure it is this process and not an old listener it
                // failed to bind beside.
                std::thread::sleep(Duration::from_millis(30));
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "{} exited ({status}) although port {port} is open:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before opening port {port}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not open port {port} within {within:?}:\n{}",
            self.name,
            self.log_tail()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn osmem_bin() -> PathBuf {
    let out = Command::new(venv().join("bin/python"))
        .args(["-c", "import os, osmem_server; print(os.path.join(os.path.dirname(osmem_server.__file__), 'bin', 'osmem-server'))"])
        .output()
        .expect("the project's .venv is missing: run `make test` or scripts/stack.sh install");
    assert!(
        out.status.success(),
        "osmem-server is not installed in .venv: run scripts/stack.sh install"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// One set of servers on free ports, with its data under a fresh folder.
pub struct Stack {
    pub dir: PathBuf,
    pub redis_port: u16,
    pub mongo_port: u16,
    pub es_port: u16,
    pub smtp_port: u16,
    pub sandbox_port: u16,
    pub procs: std::sync::Mutex<Vec<Proc>>,
}

impl Stack {
    pub fn start() -> Stack {
        let dir = std::env::temp_dir().join(format!(
            "comm-agg-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Stack {
            redis_port: free_port(),
            mongo_port: free_port(),
            es_port: free_port(),
            smtp_port: free_port(),
            sandbox_port: free_port(),
            dir,
            procs: std::sync::Mutex::new(Vec::new()),
        };
        s.start_redis();
        s.start_mongo();
        s.start_es();
        s.start_smtp();
        s.start_sandbox();
        s.wait_mongo_ready();
        s
    }

    fn add(&self, p: Proc) {
        self.procs.lock().unwrap().push(p);
    }

    /// Stop (SIGKILL) the named server.
    pub fn kill(&self, name: &str) {
        let mut procs = self.procs.lock().unwrap();
        if let Some(i) = procs.iter().position(|p| p.name == name) {
            let mut p = procs.remove(i);
            p.kill();
        }
    }

    pub fn start_redis(&self) {
        let d = self.dir.join("redis");
        std::fs::create_dir_all(&d).unwrap();
        let mut p = Proc::spawn(
            "redis",
            &self.dir,
            Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &self.redis_port.to_string(),
                ])
                .args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ])
                .arg("--dir")
                .arg(&d),
        );
        p.wait_port(self.redis_port, Duration::from_secs(10));
        self.add(p);
    }

    pub fn start_mongo(&self) {
        let mut p = Proc::spawn(
            "mongo",
            &self.dir,
            Command::new(venv().join("bin/secantusd-py"))
                .arg("--sync-on-commit")
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &self.mongo_port.to_string(),
                ])
                .arg("--storage-path")
                .arg(self.dir.join("mongo")),
        );
        p.wait_port(self.mongo_port, Duration::from_secs(30));
        self.add(p);
    }

    pub fn start_es(&self) {
        let mut p = Proc::spawn(
            "es",
            &self.dir,
            Command::new(osmem_bin()).args([
                "-addr",
                &format!("127.0.0.1:{}", self.es_port),
                "-no-stdin-watch",
            ]),
        );
        p.wait_port(self.es_port, Duration::from_secs(10));
        self.add(p);
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.join("mail")
    }

    pub fn start_smtp(&self) {
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(self.maildir().join(sub)).unwrap();
        }
        let mut p = Proc::spawn(
            "smtp",
            &self.dir,
            Command::new(venv().join("bin/python"))
                .args([
                    "-m",
                    "aiosmtpd",
                    "-n",
                    "-l",
                    &format!("127.0.0.1:{}", self.smtp_port),
                ])
                .args(["-c", "aiosmtpd.handlers.Mailbox"])
                .arg(self.maildir()),
        );
        p.wait_port(self.smtp_port, Duration::from_secs(10));
        self.add(p);
    }

    pub fn start_sandbox(&self) {
        let mut p = Proc::spawn(
            "sandbox",
            &self.dir,
            Command::new(env!("CARGO_BIN_EXE_provider-sandbox"))
                .args(["--addr", &format!("127.0.0.1:{}", self.sandbox_port)]),
        );
        p.wait_port(self.sandbox_port, Duration::from_secs(10));
        self.add(p);
    }

    /// SecantusDB opens its port a little before it answers commands.
    pub fn wait_mongo_ready(&self) {
        // On a thread of its own: callers may be inside a runtime already.
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.wait_mongo_ready_blocking())
                .join()
                .unwrap();
        });
    }

    fn wait_mongo_ready_blocking(&self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let start = Instant::now();
            loop {
                let ok = async {
                    let c = self.mongo_client().await;
                    c.database("admin")
                        .run_command(mongodb::bson::doc! {"ping": 1})
                        .await
                }
                .await;
                if ok.is_ok() {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "SecantusDB never answered ping: {ok:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    pub fn mongo_url(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.mongo_port
        )
    }

    pub async fn mongo_client(&self) -> mongodb::Client {
        let mut o = mongodb::options::ClientOptions::parse(self.mongo_url())
            .await
            .unwrap();
        o.server_selection_timeout = Some(Duration::from_secs(3));
        mongodb::Client::with_options(o).unwrap()
    }

    pub async fn records(&self) -> mongodb::Collection<mongodb::bson::Document> {
        self.mongo_client()
            .await
            .database("communication-aggregator")
            .collection("communications")
    }

    /// Forget that start-up rewrote the records of earlier versions (as a database an
    /// earlier version left has no such mark), so the next start rewrites them again.
    pub async fn forget_migrations(&self) {
        self.mongo_client()
            .await
            .database("communication-aggregator")
            .collection::<mongodb::bson::Document>("migrations")
            .delete_many(mongodb::bson::doc! {})
            .await
            .unwrap();
    }

    /// MongoDB's profiler entries on `communications` that match `filter` (profiling is
    /// switched on with `{profile: 2}` on the database).
    /// Set MongoDB's profiler of the service's database: 2 records every command, 0 none.
    pub async fn profile(&self, level: i32) {
        self.mongo_client()
            .await
            .database("communication-aggregator")
            .run_command(mongodb::bson::doc! {"profile": level})
            .await
            .unwrap();
    }

    pub async fn profile_entries(
        &self,
        mut filter: mongodb::bson::Document,
    ) -> Vec<mongodb::bson::Document> {
        use futures::TryStreamExt;
        filter.insert("ns", "communication-aggregator.communications");
        self.mongo_client()
            .await
            .database("communication-aggregator")
            .collection::<mongodb::bson::Document>("system.profile")
            .find(filter)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    /// The record `id` as MongoDB has it now.
    pub async fn record(&self, id: &str) -> Option<mongodb::bson::Document> {
        let oid = mongodb::bson::oid::ObjectId::parse_str(id).unwrap();
        self.records()
            .await
            .find_one(mongodb::bson::doc! {"_id": oid})
            .await
            .unwrap()
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.redis_port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn es(&self) -> String {
        format!("http://127.0.0.1:{}", self.es_port)
    }

    pub fn sandbox(&self) -> String {
        format!("http://127.0.0.1:{}", self.sandbox_port)
    }

    /// The test tenants' senders: the `from` values the tests send with.
    pub const TENANTS: &'static str = "[tests]\nnumbers = [\"+15550001111\", \"+15550003333\"]\nemail_domains = [\"example.com\"]\n\n[other]\nnumbers = [\"+15550001111\"]\nemail_domains = [\"example.com\"]\n";

    /// The environment that points the service at this stack.
    pub fn service_env(&self, port: u16) -> Vec<(String, String)> {
        let sb = self.sandbox();
        // Written aside and renamed into place: a service starting meanwhile reads it whole.
        let tenants = self.dir.join("tenants.toml");
        let aside = self.dir.join(format!("tenants.toml.{port}"));
        std::fs::write(&aside, Self::TENANTS).unwrap();
        std::fs::rename(&aside, &tenants).unwrap();
        [
            ("PORT", port.to_string()),
            ("MONGODB_URL", self.mongo_url()),
            (
                "REDIS_URL",
                format!("redis://127.0.0.1:{}", self.redis_port),
            ),
            ("ELASTICSEARCH_NODE", self.es()),
            ("SMTP_URL", format!("smtp://127.0.0.1:{}", self.smtp_port)),
            ("TWILIO_API_BASE", sb.clone()),
            ("ACCOUNTSID", "AC00000000000000000000000000000000".into()),
            ("AUTHTOKEN", "sandbox-auth-token".into()),
            ("WHATSAPP_API_BASE", format!("{sb}/v21.0")),
            ("WHATSAPP_TOKEN", "sandbox-whatsapp-token".into()),
            ("WHATSAPP_PHONE_NUMBER_ID", "100000000000001".into()),
            ("CONSUMER_NAME", format!("test-{port}")),
            ("PUBLIC_BASE_URL", format!("http://127.0.0.1:{port}")),
            ("WHATSAPP_APP_SECRET", "sandbox-app-secret".into()),
            ("WHATSAPP_VERIFY_TOKEN", "sandbox-verify-token".into()),
            ("VONAGE_API_BASE", sb.clone()),
            ("VONAGE_API_KEY", "sandboxkey".into()),
            ("VONAGE_API_SECRET", "sandbox-vonage-secret".into()),
            (
                "VONAGE_SIGNATURE_SECRET",
                "sandbox-vonage-signature-secret".into(),
            ),
            ("SENDGRID_API_BASE", sb.clone()),
            ("SENDGRID_API_KEY", "SG.sandbox-sendgrid-key".into()),
            ("SENDGRID_WEBHOOK_PUBLIC_KEY", SENDGRID_PUBLIC_KEY.into()),
            ("RUST_LOG", "info".into()),
            (
                "API_KEYS",
                format!("{TENANT}:{API_KEY},{OTHER_TENANT}:{OTHER_KEY}"),
            ),
            // Other tests load the service hard and text one number often; the limits
            // have their own tests (tests/api.rs).
            ("API_RATE_PER_SEC", "1000000".into()),
            ("API_BURST", "1000000".into()),
            ("RECIPIENT_MAX", "0".into()),
            ("DAILY_QUOTA", "0".into()),
            ("RECIPIENTS_PER_HOUR", "0".into()),
            ("TENANTS_FILE", tenants.to_string_lossy().into_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Spawn the service binary on a free port with this stack's environment plus
    /// `extra_env`; nothing is waited for.
    fn spawn_service(&self, extra_env: &[(&str, &str)]) -> (u16, Proc) {
        self.spawn_service_args(extra_env, &[])
    }

    /// [`Stack::spawn_service`] with command-line arguments (`--config PATH`).
    fn spawn_service_args(&self, extra_env: &[(&str, &str)], args: &[String]) -> (u16, Proc) {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_comm-aggregator"));
        cmd.current_dir(root()).args(args);
        for (k, v) in self.service_env(port) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&format!("service-{port}"), &self.dir, &mut cmd);
        (port, proc)
    }

    /// Start the service binary against this stack; waits for `/healthz`.
    pub fn start_service(&self, extra_env: &[(&str, &str)]) -> Service {
        self.start_service_args(extra_env, &[])
    }

    /// [`Stack::start_service`] with `config.toml` changed by `settings` (`("section.key",
    /// value)`), written to this stack's folder: for settings no variable overrides.
    pub fn start_service_configured(
        &self,
        extra_env: &[(&str, &str)],
        settings: &[(&str, toml::Value)],
    ) -> Service {
        let args = self.config_args(settings);
        self.start_service_args(extra_env, &args)
    }

    /// [`Stack::start_service_configured`] for a service beside the shared one: the
    /// stand-in's WhatsApp and SendGrid webhooks keep pointing at the shared service (its
    /// tests wait for those receipts), so this one gets Twilio's callbacks (each message
    /// names its own URL) but not theirs.
    pub fn start_service_beside(
        &self,
        extra_env: &[(&str, &str)],
        settings: &[(&str, toml::Value)],
    ) -> Service {
        self.start_service_alone(extra_env, &self.config_args(settings))
    }

    /// `--config PATH` of `config.toml` changed by `settings`, written to this stack's folder.
    fn config_args(&self, settings: &[(&str, toml::Value)]) -> Vec<String> {
        let mut cfg: toml::Table = std::fs::read_to_string(root().join("config.toml"))
            .unwrap()
            .parse()
            .unwrap();
        for (key, value) in settings {
            let (section, name) = key.split_once('.').unwrap();
            cfg[section]
                .as_table_mut()
                .unwrap()
                .insert(name.to_string(), value.clone());
        }
        let path = self.dir.join(format!("config-{}.toml", free_port()));
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        vec!["--config".into(), path.display().to_string()]
    }

    fn start_service_args(&self, extra_env: &[(&str, &str)], args: &[String]) -> Service {
        let service = self.start_service_alone(extra_env, args);
        let port = service.port;
        // Point the stand-in's WhatsApp and SendGrid webhooks here, as one would in Meta's
        // and SendGrid's dashboards.
        let hooks = serde_json::json!({
            "whatsapp": format!("http://127.0.0.1:{port}/api/v1/callbacks/whatsapp"),
            "sendgrid": format!("http://127.0.0.1:{port}/api/v1/callbacks/sendgrid"),
        });
        let admin = format!("{}/__sandbox/webhooks", self.sandbox());
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let r = reqwest::Client::new()
                        .post(&admin)
                        .json(&hooks)
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success());
                })
            })
            .join()
            .unwrap()
        });
        service
    }

    /// The service started with `args`, once its port is open; the webhooks left as they are.
    fn start_service_alone(&self, extra_env: &[(&str, &str)], args: &[String]) -> Service {
        let (port, mut proc) = self.spawn_service_args(extra_env, args);
        proc.wait_port(port, Duration::from_secs(20));
        Service { port, proc }
    }

    /// What the provider stand-in accepted.
    pub async fn sandbox_messages(&self) -> Vec<Value> {
        let v: Value = reqwest::get(format!("{}/__sandbox/messages", self.sandbox()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["messages"].as_array().cloned().unwrap_or_default()
    }

    /// Bodies of the mails the SMTP server stored.
    pub fn mails(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(rd) = std::fs::read_dir(self.maildir().join(sub)) {
                for e in rd.flatten() {
                    out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// PUTs `body` to Elasticsearch at `path` (an index, a document), which must take it.
    pub async fn es_put(&self, path: &str, body: &Value) {
        let res = reqwest::Client::new()
            .put(format!("{}{path}", self.es()))
            .json(body)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{path}: {:?}", res.text().await);
    }

    /// GETs `path` from Elasticsearch (a mapping, a document) as JSON.
    pub async fn es_get(&self, path: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.es()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn es_search(&self, index: &str, query: Value) -> Vec<Value> {
        let http = reqwest::Client::new();
        let _ = http
            .post(format!("{}/{index}/_refresh", self.es()))
            .send()
            .await;
        let res = http
            .post(format!("{}/{index}/_search", self.es()))
            .json(&serde_json::json!({"query": query, "size": 1000}))
            .send()
            .await
            .unwrap();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        v["hits"]["hits"].as_array().cloned().unwrap_or_default()
    }

    pub async fn pending(&self, stream: &str, group: &str) -> i64 {
        xpending_count(&mut self.redis().await, stream, group).await
    }
}

pub struct Service {
    pub port: u16,
    pub proc: Proc,
}

impl Service {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn post(&self, body: Value) -> (u16, Value) {
        let res = client()
            .post(self.url("/api/v1/communication"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// The sum of a metric's series (every label set) on `/metrics`; 0 when it has none.
    /// `name` is the bare name the code emits; [`METRIC_PREFIX`] is added here.
    pub async fn metric_total(&self, name: &str) -> f64 {
        let name = &metric_name(name);
        let text = get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = get(self.url(path)).await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

/// What every series on `/metrics` starts with (src/app/telemetry.rs).
pub const METRIC_PREFIX: &str = "comm_aggregator_";

/// The name `/metrics` shows for the bare name the code emits.
pub fn metric_name(name: &str) -> String {
    if name.starts_with(METRIC_PREFIX) {
        name.to_string()
    } else {
        format!("{METRIC_PREFIX}{name}")
    }
}

/// A stack and a service shared by the tests of one test binary, started on first use by a
/// thread that lives as long as the process (so the servers die with it).
pub fn shared() -> &'static (Stack, Service) {
    shared_with(&[])
}

/// [`shared`], its service started with `env` added (the first call's `env` counts).
pub fn shared_with(env: &'static [(&'static str, &'static str)]) -> &'static (Stack, Service) {
    static SHARED: OnceLock<&'static (Stack, Service)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let stack = Stack::start();
            let service = stack.start_service(env);
            let both: &'static (Stack, Service) = Box::leak(Box::new((stack, service)));
            tx.send(both).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv()
            .expect("starting the shared stack failed; see the panic above")
    })
}

/// Poll `f` until it returns `Some`, or fail after `within` with `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > within {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A string unique to this test run, to find one message among many.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    )
}

/// Settings that make failure handling quick enough for tests.
pub const FAST: &[(&str, &str)] = &[
    ("PROVIDER_TIMEOUT_MS", "1000"),
    ("CLAIM_IDLE_MS", "2500"),
    ("STALE_AFTER_MS", "2000"),
    ("SWEEP_RECHECK_MS", "3000"),
    ("MAX_DELIVERIES", "3"),
    ("BACKOFF_BASE_MS", "200"),
    ("FAULT_INJECTION", "true"),
    ("SHUTDOWN_DEADLINE_MS", "10000"),
    ("BREAKER_COOLDOWN_MS", "1000"),
];

pub fn fast_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = FAST.to_vec();
    v.extend_from_slice(extra);
    v
}

/// POST `n` SMS with bodies `{tag}-{i}` to `port`, 16 at a time; connection errors and
/// non-200 answers count as not accepted. Returns the accepted (body, id) pairs.
pub async fn load(port: u16, tag: &str, n: usize, pause: Duration) -> Vec<(String, String)> {
    use futures::StreamExt;
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .default_headers(h)
        .build()
        .unwrap();
    let results: Vec<Option<(String, String)>> = futures::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            let body = format!("{tag}-{i}");
            async move {
                if !pause.is_zero() {
                    tokio::time::sleep(pause * (i as u32 / 16)).await;
                }
                let res = http
                    .post(format!("http://127.0.0.1:{port}/api/v1/communication"))
                    .json(&serde_json::json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":body}}))
                    .send()
                    .await
                    .ok()?;
                if res.status() != 200 {
                    return None;
                }
                let v: Value = res.json().await.ok()?;
                Some((body, v["id"].as_str()?.to_string()))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().flatten().collect()
}

/// [`load`] in a task of its own, to do something to the stack meanwhile.
pub fn spawn_load(
    port: u16,
    tag: &str,
    n: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<(String, String)>> {
    let tag = tag.to_string();
    tokio::spawn(async move { load(port, &tag, n, pause).await })
}

/// 300 SMS at 16 every 20 ms to `svc`, killed (SIGKILL) 250 ms in; then `restart` starts
/// the service again and 50 more are sent. Every accepted (body, id), before and after,
/// and the restarted service (which must outlive the books).
pub async fn kill_9_mid_load(
    svc: Service,
    tag: &str,
    restart: impl FnOnce() -> Service,
) -> (Vec<(String, String)>, Service) {
    let loader = spawn_load(svc.port, tag, 300, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(250)).await;
    svc.proc.signal(libc::SIGKILL);
    let mut accepted = loader.await.unwrap();
    assert!(!accepted.is_empty(), "nothing was accepted before the kill");
    let svc = restart();
    accepted.extend(load(svc.port, &format!("{tag}-after"), 50, Duration::ZERO).await);
    (accepted, svc)
}

/// What the books say after a scenario.
#[derive(Debug, Default)]
pub struct Books {
    pub accepted: usize,
    pub sent: usize,
    pub failed: usize,
    /// Messages the provider saw more than once, all attributable to a stale claim (a
    /// crash inside the provider-call window).
    pub duplicates: usize,
}

/// Wait until every accepted message is final, then check it reached the provider exactly
/// once (a duplicate is allowed only where the record shows a stale claim).
pub async fn check_books(stack: &Stack, accepted: &[(String, String)], within: Duration) -> Books {
    use mongodb::bson::{doc, oid::ObjectId};
    let coll = stack.records().await;
    let oids: Vec<ObjectId> = accepted
        .iter()
        .map(|(_, id)| ObjectId::parse_str(id).unwrap())
        .collect();
    let start = Instant::now();
    loop {
        let open = coll
            .count_documents(
                doc! {"_id": {"$in": &oids}, "status": {"$in": ["pending", "sending"]}},
            )
            .await
            .unwrap_or(u64::MAX);
        if open == 0 {
            break;
        }
        assert!(
            start.elapsed() < within,
            "{open} of {} accepted messages still not final after {within:?}",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut books = Books {
        accepted: accepted.len(),
        ..Default::default()
    };
    let seen = stack.sandbox_messages().await;
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for m in &seen {
        if let Some(b) = m["body"].as_str() {
            *counts.entry(b.to_string()).or_default() += 1;
        }
    }
    for (body, id) in accepted {
        let d = coll
            .find_one(doc! {"_id": ObjectId::parse_str(id).unwrap()})
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("accepted {id} is not in MongoDB"));
        let n = counts.get(body).copied().unwrap_or(0);
        match d.get_str("status").unwrap() {
            // Handed to the provider; receipts may have moved it on since.
            "sent" | "delivered" | "read" | "undelivered" => {
                books.sent += 1;
                assert!(
                    n >= 1,
                    "{id} is recorded sent but the provider never saw {body:?}"
                );
                if n > 1 {
                    assert_eq!(
                        d.get_bool("possibleDuplicate").ok(),
                        Some(true),
                        "{id} was sent {n} times without a crash to explain it: {d}"
                    );
                    books.duplicates += 1;
                }
            }
            _ => {
                books.failed += 1;
            }
        }
    }
    println!("books: {books:?}");
    books
}

/// Serialises the tests of one binary that start their own stacks (2 cores).
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

impl Stack {
    /// Send `sig` to the named server (e.g. SIGSTOP / SIGCONT to freeze and thaw it).
    pub fn signal(&self, name: &str, sig: i32) {
        let procs = self.procs.lock().unwrap();
        let p = procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no server named {name}"));
        p.signal(sig);
    }

    /// Start the service binary and return the moment its port opens, before anything
    /// else (no `/readyz` wait, no webhook set-up): for tests of what it does at start-up.
    pub fn start_service_bare(&self, extra_env: &[(&str, &str)]) -> Service {
        let (port, proc) = self.spawn_service(extra_env);
        let start = Instant::now();
        while !port_open(port) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the service did not open port {port}:\n{}",
                proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Service { port, proc }
    }
}

/// An SMS request body with message `msg`.
pub fn sms(msg: &str) -> Value {
    serde_json::json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":msg}})
}

/// Set one of the provider stand-in's fault knobs (see `src/bin/provider-sandbox/faults.rs`).
pub async fn set_fault(stack: &Stack, fault: Value) {
    let r = client()
        .post(format!("{}/__sandbox/faults", stack.sandbox()))
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Clear every fault knob of the provider stand-in.
pub async fn clear_faults(stack: &Stack) {
    client()
        .delete(format!("{}/__sandbox/faults", stack.sandbox()))
        .send()
        .await
        .unwrap();
}

/// A service of its own on the shared stack, with Redis database `db` to itself: it
/// shares no stream with the shared service, so stopping it strands no entry that the
/// shared service would have to wait out the claim time for.
pub fn start_isolated(db: u8, env: &[(&str, &str)]) -> Service {
    let (stack, _) = shared();
    let redis = format!("redis://127.0.0.1:{}/{db}", stack.redis_port);
    let mut env = env.to_vec();
    env.push(("REDIS_URL", &redis));
    stack.start_service(&env)
}

/// Script calls (`EVAL` and `EVALSHA`) a Redis has run so far (`INFO commandstats`).
pub async fn script_calls(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_eval:") || l.starts_with("cmdstat_evalsha:"))
        .map(|l| {
            let stat = |name: &str| -> u64 {
                l.split([':', ','])
                    .find_map(|kv| kv.strip_prefix(name)?.parse().ok())
                    .unwrap_or(0)
            };
            stat("calls=") - stat("failed_calls=")
        })
        .sum()
}

/// A Redis of a test's own (nothing on disk), for counting its commands: the server and
/// its URL.
pub fn scratch_redis(tag: &str) -> (Proc, String) {
    let dir = std::env::temp_dir().join(format!("comm-agg-{tag}-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut server = Proc::spawn(
        "redis",
        &dir,
        Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&dir),
    );
    server.wait_port(port, Duration::from_secs(10));
    (server, format!("redis://127.0.0.1:{port}"))
}

/// XPENDING's count of `stream` for `group` (-1: no such group).
pub async fn xpending_count(
    c: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(c)
        .await
        .unwrap_or(redis::Value::Nil);
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

/// The indexes a collection has, as the server lists them.
pub async fn indexes(
    coll: &mongodb::Collection<mongodb::bson::Document>,
) -> Vec<mongodb::IndexModel> {
    use futures::TryStreamExt;
    coll.list_indexes()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}
