//! Configuration: `config.toml` for defaults, the environment for overrides and secrets.
//! A bad value stops start-up with a message naming the setting or variable.

use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub mongodb: Mongo,
    pub redis: Redis,
    pub elasticsearch: Elastic,
    pub router: Router,
    pub sender: Sender,
    pub channels: Channels,
    pub sweeper: Sweeper,
    pub log_indexer: LogIndexer,
    pub supervisor: Supervisor,
    pub callbacks: Callbacks,
    pub providers: Providers,
    pub auth: Auth,
    pub limits: Limits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub keys_file: String,
    pub dev_mode: bool,
    pub rate_per_sec: f64,
    pub burst: f64,
    /// Parsed from `API_KEYS` and `keys_file`.
    #[serde(skip)]
    pub keys: Vec<crate::auth::KeySpec>,
    /// `METRICS_TOKEN`: when set, `/metrics` wants `Authorization: Bearer <it>`.
    #[serde(skip)]
    pub metrics_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub recipient_max: u64,
    pub recipient_window_secs: u64,
    pub email_max_chars: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callbacks {
    pub public_base_url: String,
    #[serde(skip)]
    pub whatsapp_app_secret: String,
    #[serde(skip)]
    pub whatsapp_verify_token: String,
}

impl Callbacks {
    pub fn twilio_url(&self) -> Option<String> {
        (!self.public_base_url.is_empty()).then(|| {
            format!(
                "{}/api/v1/callbacks/twilio",
                self.public_base_url.trim_end_matches('/')
            )
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub shutdown_deadline_ms: u64,
    pub log_format: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mongo {
    pub url: String,
    pub database: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: String,
    pub group: String,
    pub consumer_name: String,
    pub read_count: usize,
    pub block_ms: u64,
    pub claim_idle_ms: u64,
    pub max_deliveries: u64,
    /// `REDIS_CA_FILE`: PEM roots for `rediss://` (default: the Mozilla roots).
    #[serde(skip)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Elastic {
    pub node: String,
    pub communications_index: String,
    pub logs_index: String,
    #[serde(skip)]
    pub user: Option<String>,
    #[serde(skip)]
    pub password: Option<String>,
    /// `ELASTICSEARCH_API_KEY`: the base64 `encoded` form, or `id:api_key`.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// `ELASTICSEARCH_CA_FILE`: PEM certificate to trust for `https://`.
    #[serde(skip)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    pub batch_max: usize,
    pub linger_ms: u64,
    pub max_inflight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    pub stale_after_ms: u64,
    pub record_patience_ms: u64,
    pub fault_injection: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    pub email: ChannelSettings,
    pub sms: ChannelSettings,
    pub whatsapp: ChannelSettings,
}

impl Channels {
    pub fn get(&self, ch: actors::domain::Channel) -> &ChannelSettings {
        match ch {
            actors::domain::Channel::Email => &self.email,
            actors::domain::Channel::Sms => &self.sms,
            actors::domain::Channel::Whatsapp => &self.whatsapp,
        }
    }

    fn all_mut(&mut self) -> [(&'static str, &mut ChannelSettings); 3] {
        [
            ("email", &mut self.email),
            ("sms", &mut self.sms),
            ("whatsapp", &mut self.whatsapp),
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub rate_per_sec: f64,
    pub burst: f64,
    pub breaker_consecutive_failures: u32,
    pub breaker_failure_ratio: f64,
    pub breaker_window: usize,
    pub breaker_min_calls: usize,
    pub breaker_cooldown_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweeper {
    pub interval_ms: u64,
    pub recheck_ms: u64,
    pub batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogIndexer {
    pub max_docs: usize,
    pub max_bytes: usize,
    pub max_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Supervisor {
    pub max_restarts: usize,
    pub window_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Providers {
    pub timeout_ms: u64,
    pub sms: Sms,
    pub whatsapp: Whatsapp,
    pub email: Email,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sms {
    pub api_base: String,
    pub account_sid: String,
    pub messaging_service_sid: String,
    #[serde(skip)]
    pub auth_token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whatsapp {
    pub api_base: String,
    pub phone_number_id: String,
    #[serde(skip)]
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    pub smtp_url: String,
    pub default_subject: String,
}

/// Every environment variable the service reads (deployment files are checked against it).
pub const ENV_VARS: &[&str] = &[
    "HOST",
    "PORT",
    "SHUTDOWN_DEADLINE_MS",
    "LOG_FORMAT",
    "RUST_LOG",
    "MONGODB_URL",
    "MONGODB_DATABASE",
    "REDIS_URL",
    "REDIS_GROUP",
    "CONSUMER_NAME",
    "CLAIM_IDLE_MS",
    "MAX_DELIVERIES",
    "ELASTICSEARCH_NODE",
    "ELASTICSEARCH_USER",
    "ELASTICSEARCH_PASSWORD",
    "STALE_AFTER_MS",
    "MAX_ATTEMPTS",
    "BACKOFF_BASE_MS",
    "BREAKER_COOLDOWN_MS",
    "PROVIDER_RATE_PER_SEC",
    "PROVIDER_BURST",
    "FAULT_INJECTION",
    "SWEEP_RECHECK_MS",
    "PROVIDER_TIMEOUT_MS",
    "TWILIO_API_BASE",
    "ACCOUNTSID",
    "AUTHTOKEN",
    "MSG_ID",
    "WHATSAPP_API_BASE",
    "WHATSAPP_TOKEN",
    "WHATSAPP_PHONE_NUMBER_ID",
    "WHATSAPP_APP_SECRET",
    "WHATSAPP_VERIFY_TOKEN",
    "PUBLIC_BASE_URL",
    "SMTP_URL",
    "EMAIL_DEFAULT_SUBJECT",
    "API_KEYS",
    "API_KEYS_FILE",
    "DEV_MODE",
    "API_RATE_PER_SEC",
    "API_BURST",
    "METRICS_TOKEN",
    "RECIPIENT_MAX",
    "RECIPIENT_WINDOW_SECS",
    "EMAIL_MAX_CHARS",
    "REDIS_CA_FILE",
    "ELASTICSEARCH_CA_FILE",
    "ELASTICSEARCH_API_KEY",
];

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Config {
    /// Read `path`, then apply the environment (`env` lists the variables).
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        cfg.apply_env(env)?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn from_process_env(path: &Path) -> Result<Config, ConfigError> {
        Config::load(path, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, ConfigError> {
            v.trim()
                .parse()
                .map_err(|_| bad(format!("{name}={v:?} is not a valid number")))
        }
        if let Some(v) = env("HOST") {
            self.server.host = v;
        }
        if let Some(v) = env("PORT") {
            self.server.port = num("PORT", v)?;
        }
        if let Some(v) = env("SHUTDOWN_DEADLINE_MS") {
            self.server.shutdown_deadline_ms = num("SHUTDOWN_DEADLINE_MS", v)?;
        }
        if let Some(v) = env("LOG_FORMAT") {
            self.server.log_format = v;
        }
        if let Some(v) = env("MONGODB_URL") {
            self.mongodb.url = v;
        }
        if let Some(v) = env("MONGODB_DATABASE") {
            self.mongodb.database = v;
        }
        if let Some(v) = env("REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = env("REDIS_GROUP") {
            self.redis.group = v;
        }
        if let Some(v) = env("CONSUMER_NAME") {
            self.redis.consumer_name = v;
        }
        if let Some(v) = env("CLAIM_IDLE_MS") {
            self.redis.claim_idle_ms = num("CLAIM_IDLE_MS", v)?;
        }
        if let Some(v) = env("MAX_DELIVERIES") {
            self.redis.max_deliveries = num("MAX_DELIVERIES", v)?;
        }
        fn flag(name: &str, v: String) -> Result<bool, ConfigError> {
            match v.as_str() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => Err(bad(format!("{name}={v:?}: true or false"))),
            }
        }
        if let Some(v) = env("FAULT_INJECTION") {
            self.sender.fault_injection = flag("FAULT_INJECTION", v)?;
        }
        if let Some(v) = env("DEV_MODE") {
            self.auth.dev_mode = flag("DEV_MODE", v)?;
        }
        if let Some(v) = env("API_KEYS_FILE") {
            self.auth.keys_file = v;
        }
        if let Some(v) = env("API_RATE_PER_SEC") {
            self.auth.rate_per_sec = num("API_RATE_PER_SEC", v)?;
        }
        if let Some(v) = env("API_BURST") {
            self.auth.burst = num("API_BURST", v)?;
        }
        self.auth.metrics_token = env("METRICS_TOKEN");
        let file = if self.auth.keys_file.is_empty() {
            None
        } else {
            let text = std::fs::read_to_string(&self.auth.keys_file).map_err(|e| {
                bad(format!(
                    "auth.keys_file / API_KEYS_FILE {:?}: {e}",
                    self.auth.keys_file
                ))
            })?;
            Some((self.auth.keys_file.clone(), text))
        };
        self.auth.keys = crate::auth::parse_keys(
            env("API_KEYS").as_deref(),
            file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        )
        .map_err(bad)?;
        if let Some(v) = env("RECIPIENT_MAX") {
            self.limits.recipient_max = num("RECIPIENT_MAX", v)?;
        }
        if let Some(v) = env("RECIPIENT_WINDOW_SECS") {
            self.limits.recipient_window_secs = num("RECIPIENT_WINDOW_SECS", v)?;
        }
        if let Some(v) = env("EMAIL_MAX_CHARS") {
            self.limits.email_max_chars = num("EMAIL_MAX_CHARS", v)?;
        }
        self.redis.ca_file = env("REDIS_CA_FILE");
        self.elasticsearch.ca_file = env("ELASTICSEARCH_CA_FILE");
        self.elasticsearch.api_key = env("ELASTICSEARCH_API_KEY");
        if let Some(v) = env("ELASTICSEARCH_NODE") {
            self.elasticsearch.node = v;
        }
        self.elasticsearch.user = env("ELASTICSEARCH_USER");
        self.elasticsearch.password = env("ELASTICSEARCH_PASSWORD");
        if let Some(v) = env("STALE_AFTER_MS") {
            self.sender.stale_after_ms = num("STALE_AFTER_MS", v)?;
        }
        for (_, ch) in self.channels.all_mut() {
            if let Some(v) = env("MAX_ATTEMPTS") {
                ch.max_attempts = num("MAX_ATTEMPTS", v)?;
            }
            if let Some(v) = env("BACKOFF_BASE_MS") {
                ch.backoff_base_ms = num("BACKOFF_BASE_MS", v)?;
            }
            if let Some(v) = env("BREAKER_COOLDOWN_MS") {
                ch.breaker_cooldown_ms = num("BREAKER_COOLDOWN_MS", v)?;
            }
            if let Some(v) = env("PROVIDER_RATE_PER_SEC") {
                ch.rate_per_sec = num("PROVIDER_RATE_PER_SEC", v)?;
            }
            if let Some(v) = env("PROVIDER_BURST") {
                ch.burst = num("PROVIDER_BURST", v)?;
            }
        }
        if let Some(v) = env("SWEEP_RECHECK_MS") {
            self.sweeper.recheck_ms = num("SWEEP_RECHECK_MS", v)?;
        }
        if let Some(v) = env("PROVIDER_TIMEOUT_MS") {
            self.providers.timeout_ms = num("PROVIDER_TIMEOUT_MS", v)?;
        }
        if let Some(v) = env("TWILIO_API_BASE") {
            self.providers.sms.api_base = v;
        }
        if let Some(v) = env("ACCOUNTSID") {
            self.providers.sms.account_sid = v;
        }
        if let Some(v) = env("MSG_ID") {
            self.providers.sms.messaging_service_sid = v;
        }
        self.providers.sms.auth_token = env("AUTHTOKEN").unwrap_or_default();
        if let Some(v) = env("WHATSAPP_API_BASE") {
            self.providers.whatsapp.api_base = v;
        }
        if let Some(v) = env("WHATSAPP_PHONE_NUMBER_ID") {
            self.providers.whatsapp.phone_number_id = v;
        }
        self.providers.whatsapp.token = env("WHATSAPP_TOKEN").unwrap_or_default();
        if let Some(v) = env("PUBLIC_BASE_URL") {
            self.callbacks.public_base_url = v;
        }
        self.callbacks.whatsapp_app_secret = env("WHATSAPP_APP_SECRET").unwrap_or_default();
        self.callbacks.whatsapp_verify_token = env("WHATSAPP_VERIFY_TOKEN").unwrap_or_default();
        if let Some(v) = env("SMTP_URL") {
            self.providers.email.smtp_url = v;
        }
        if let Some(v) = env("EMAIL_DEFAULT_SUBJECT") {
            self.providers.email.default_subject = v;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ConfigError> {
        let url = |name: &str, v: &str, schemes: &[&str]| -> Result<(), ConfigError> {
            let u =
                url::Url::parse(v).map_err(|e| bad(format!("{name}={v:?} is not a URL: {e}")))?;
            if !schemes.contains(&u.scheme()) {
                return Err(bad(format!(
                    "{name}={v:?}: scheme must be one of {schemes:?}"
                )));
            }
            Ok(())
        };
        url(
            "MONGODB_URL",
            &self.mongodb.url,
            &["mongodb", "mongodb+srv"],
        )?;
        url(
            "REDIS_URL",
            &self.redis.url,
            &["redis", "rediss", "redis+unix", "unix"],
        )?;
        url(
            "ELASTICSEARCH_NODE",
            &self.elasticsearch.node,
            &["http", "https"],
        )?;
        url(
            "TWILIO_API_BASE",
            &self.providers.sms.api_base,
            &["http", "https"],
        )?;
        url(
            "WHATSAPP_API_BASE",
            &self.providers.whatsapp.api_base,
            &["http", "https"],
        )?;
        url(
            "SMTP_URL",
            &self.providers.email.smtp_url,
            &["smtp", "smtps"],
        )?;
        if !self.callbacks.public_base_url.is_empty() {
            url(
                "PUBLIC_BASE_URL",
                &self.callbacks.public_base_url,
                &["http", "https"],
            )?;
        }
        let missing = |name: &str, v: &str, why: &str| -> Result<(), ConfigError> {
            if v.trim().is_empty() {
                Err(bad(format!("{name} is not set: {why}")))
            } else {
                Ok(())
            }
        };
        missing(
            "ACCOUNTSID",
            &self.providers.sms.account_sid,
            "the Twilio Account SID (starts with AC)",
        )?;
        missing(
            "AUTHTOKEN",
            &self.providers.sms.auth_token,
            "the Twilio auth token",
        )?;
        missing(
            "WHATSAPP_PHONE_NUMBER_ID",
            &self.providers.whatsapp.phone_number_id,
            "the WhatsApp Business phone number id",
        )?;
        missing(
            "WHATSAPP_TOKEN",
            &self.providers.whatsapp.token,
            "the WhatsApp Cloud API access token",
        )?;
        if self.auth.keys.is_empty() && !self.auth.dev_mode {
            return Err(bad(
                "no API keys configured: set API_KEYS=tenant:key,... or auth.keys_file \
                 (API_KEYS_FILE); or, for local development only, DEV_MODE=true",
            ));
        }
        if !(self.auth.rate_per_sec > 0.0 && self.auth.burst >= 1.0) {
            return Err(bad("auth.rate_per_sec must be > 0 and auth.burst >= 1"));
        }
        if self.limits.recipient_max > 0 && self.limits.recipient_window_secs == 0 {
            return Err(bad("limits.recipient_window_secs must be at least 1"));
        }
        if self.limits.email_max_chars == 0 {
            return Err(bad("limits.email_max_chars must be at least 1"));
        }
        if !["text", "json"].contains(&self.server.log_format.as_str()) {
            return Err(bad(format!(
                "LOG_FORMAT={:?}: must be \"text\" or \"json\"",
                self.server.log_format
            )));
        }
        if self.redis.claim_idle_ms <= self.providers.timeout_ms {
            return Err(bad(format!(
                "redis.claim_idle_ms ({}) must be longer than providers.timeout_ms ({}), or live sends get taken over",
                self.redis.claim_idle_ms, self.providers.timeout_ms
            )));
        }
        if self.sender.stale_after_ms <= self.providers.timeout_ms {
            return Err(bad(format!(
                "sender.stale_after_ms ({}) must be longer than providers.timeout_ms ({})",
                self.sender.stale_after_ms, self.providers.timeout_ms
            )));
        }
        for (name, v) in [
            ("router.batch_max", self.router.batch_max),
            ("redis.read_count", self.redis.read_count),
            ("log_indexer.max_docs", self.log_indexer.max_docs),
            ("sweeper.batch", self.sweeper.batch),
            ("redis.max_deliveries", self.redis.max_deliveries as usize),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be at least 1")));
            }
        }
        for (name, ch) in [
            ("email", &self.channels.email),
            ("sms", &self.channels.sms),
            ("whatsapp", &self.channels.whatsapp),
        ] {
            if ch.concurrency == 0 || ch.max_attempts == 0 || ch.breaker_consecutive_failures == 0 {
                return Err(bad(format!(
                    "channels.{name}: concurrency, max_attempts and breaker_consecutive_failures must be at least 1"
                )));
            }
            if !(ch.rate_per_sec > 0.0 && ch.burst >= 1.0) {
                return Err(bad(format!(
                    "channels.{name}: rate_per_sec must be > 0 and burst >= 1"
                )));
            }
            if !(ch.breaker_failure_ratio > 0.0 && ch.breaker_failure_ratio <= 1.0) {
                return Err(bad(format!(
                    "channels.{name}.breaker_failure_ratio must be in (0, 1]"
                )));
            }
        }
        Ok(())
    }

    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        Config::load(&path, &move |k| m.get(k).cloned())
    }

    const CREDS: [(&str, &str); 5] = [
        ("API_KEYS", "acme:acme-0123456789abcdef"),
        ("ACCOUNTSID", "AC00000000000000000000000000000000"),
        ("AUTHTOKEN", "t"),
        ("WHATSAPP_PHONE_NUMBER_ID", "1"),
        ("WHATSAPP_TOKEN", "w"),
    ];

    #[test]
    fn shipped_file_loads_and_env_overrides_it() {
        let mut v = CREDS.to_vec();
        v.push(("PORT", "4000"));
        v.push(("REDIS_URL", "redis://127.0.0.1:7000"));
        let c = load(&v).unwrap();
        assert_eq!(c.server.port, 4000);
        assert_eq!(c.redis.url, "redis://127.0.0.1:7000");
        assert_eq!(c.mongodb.database, "communication-aggregator");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let mut v = CREDS.to_vec();
        v.push(("PORT", "http"));
        assert!(load(&v).unwrap_err().to_string().contains("PORT"));
        let mut v = CREDS.to_vec();
        v.push(("MONGODB_URL", "postgres://x"));
        assert!(load(&v).unwrap_err().to_string().contains("MONGODB_URL"));
        let err = load(&CREDS[..1]).unwrap_err().to_string();
        assert!(err.contains("ACCOUNTSID"), "{err}");
    }

    #[test]
    fn no_keys_no_start_unless_dev_mode() {
        let err = load(&CREDS[1..]).unwrap_err().to_string();
        assert!(
            err.contains("API_KEYS") && err.contains("DEV_MODE"),
            "{err}"
        );
        let mut v = CREDS[1..].to_vec();
        v.push(("DEV_MODE", "true"));
        let c = load(&v).unwrap();
        assert!(c.auth.dev_mode && c.auth.keys.is_empty());
        let c = load(&CREDS).unwrap();
        assert_eq!(c.auth.keys.len(), 1);
        assert!(!c.auth.dev_mode, "dev mode is off unless switched on");
    }

    #[test]
    fn keys_file_is_read_and_bad_entries_name_the_line() {
        let dir = std::env::temp_dir().join(format!("keys-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# tenants
zeta:zeta-0123456789abcdef
",
        )
        .unwrap();
        let mut v = CREDS.to_vec();
        let path = dir.to_string_lossy().to_string();
        v.push(("API_KEYS_FILE", &path));
        let c = load(&v).unwrap();
        let tenants: Vec<&str> = c.auth.keys.iter().map(|k| k.tenant.as_str()).collect();
        assert_eq!(tenants, ["acme", "zeta"]);
        std::fs::write(&dir, "zeta\n").unwrap();
        let err = load(&v).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn env_vars_lists_every_variable_read() {
        let src = include_str!("config.rs");
        let mut n = 0;
        for part in src.split("env(\"").skip(1) {
            let name = part.split('"').next().unwrap();
            if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !name.is_empty() {
                n += 1;
                assert!(
                    ENV_VARS.contains(&name),
                    "{name} is read but not in ENV_VARS"
                );
            }
        }
        assert!(n > 20);
    }
}
