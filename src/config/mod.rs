//! Configuration: `config.toml` for defaults, the environment for overrides and secrets.
//! A bad value stops start-up with a message naming the setting or variable.
//!
//! - this file: the settings, as serde structs (durations are `Duration`s, read from the
//!   same `*_ms` keys), and the small builders that turn them into the actors' policies;
//! - [`env`]: the one table of environment variables (what each overrides, how it is
//!   parsed, what it means), from which [`ENV_VARS`] and `--help` are derived;
//! - [`checks`]: the validations, one small named function each.

mod checks;
mod env;
mod provider_limits;
pub mod redact;
pub mod secret;
mod transport;

pub use env::{env_help, EnvVar, ENV, ENV_VARS};
pub use provider_limits::{ProviderLimits, ProviderSettings};

use actors::adaptive::LimiterSettings;
use actors::batch::BatchSettings;
use actors::domain::Channel;
use actors::health::BreakerConfig;
use actors::retry::RetryPolicy;
use actors::routing::Strategy;
use serde::{Deserialize, Deserializer};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// A value the service cannot run with; the message names the variable or setting.
    #[error("configuration: {0}")]
    Invalid(String),
}

pub(crate) fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// `*_ms` keys hold whole milliseconds.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub mongodb: Mongo,
    pub redis: Redis,
    pub elasticsearch: Elastic,
    pub router: Router,
    pub receipts: Receipts,
    pub sender: Sender,
    pub store_limiter: StoreLimiter,
    pub channels: Channels,
    pub sweeper: Sweeper,
    pub log_indexer: LogIndexer,
    pub stats: Stats,
    pub events: Events,
    pub reconciler: Reconciler,
    pub fallback: FallbackSettings,
    pub schedule: ScheduleSettings,
    pub supervisor: Supervisor,
    pub callbacks: Callbacks,
    pub providers: Providers,
    pub routing: Routing,
    /// `[provider_limits.<name>]`: a provider's own rate limit and breaker (see
    /// [`provider_limits`]); absent keys are the channel's.
    #[serde(default)]
    pub provider_limits: std::collections::BTreeMap<String, ProviderLimits>,
    pub auth: Auth,
    pub limits: Limits,
    pub audit: Audit,
    pub tenants: TenantDefaults,
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
    pub metrics_token: Option<secret::SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub recipient_max: u64,
    pub recipient_window_secs: u64,
    pub email_max_chars: usize,
}

/// `[tenants]`: what every tenant gets unless its table in `file` says otherwise (see
/// `crate::tenants`), and how the limits behave when Redis cannot be asked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantDefaults {
    /// `TENANTS_FILE`: one TOML table per tenant.
    pub file: String,
    /// E.164 prefixes SMS and WhatsApp may go to; `*` is every country.
    pub countries: Vec<String>,
    /// Messages a UTC day per channel; 0: no quota.
    pub daily_quota: crate::tenants::PerChannel<u64>,
    /// Distinct SMS/WhatsApp numbers a tenant may text an hour; 0: no limit.
    pub recipients_per_hour: u64,
    /// Channels accepted when Redis cannot be asked; the others get 503.
    pub fail_open: Vec<Channel>,
    #[serde(rename = "check_timeout_ms", deserialize_with = "millis")]
    pub check_timeout: Duration,
    /// The service's own senders: what a tenant without senders of its own may use, and
    /// its `from` when a request leaves it out.
    pub default_from: crate::tenants::PerChannel<String>,
    /// The tenants' tables, read from `file`.
    #[serde(skip)]
    pub tables: std::collections::HashMap<String, crate::tenants::TenantSettings>,
}

impl Config {
    /// The defaults every tenant's policy starts from.
    pub fn tenant_defaults(&self) -> crate::tenants::Defaults {
        let t = &self.tenants;
        crate::tenants::Defaults {
            countries: t.countries.clone(),
            daily_quota: t.daily_quota.clone(),
            recipients_per_hour: t.recipients_per_hour,
            rate_per_sec: self.auth.rate_per_sec,
            burst: self.auth.burst,
            default_from: t.default_from.clone(),
            dev_mode: self.auth.dev_mode && self.auth.keys.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callbacks {
    pub public_base_url: String,
    #[serde(skip)]
    pub whatsapp_app_secret: secret::SecretString,
    #[serde(skip)]
    pub whatsapp_verify_token: secret::SecretString,
}

impl Callbacks {
    /// `{public_base_url}/api/v1/callbacks/{provider}`, when the public URL is known.
    fn url(&self, provider: &str) -> Option<String> {
        (!self.public_base_url.is_empty()).then(|| {
            format!(
                "{}/api/v1/callbacks/{provider}",
                self.public_base_url.trim_end_matches('/')
            )
        })
    }

    pub fn twilio_url(&self) -> Option<String> {
        self.url("twilio")
    }

    pub fn vonage_url(&self) -> Option<String> {
        self.url("vonage")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub host: String,
    pub port: u16,
    /// Shutdown, stage 1: requests inside answered, the router's batch written.
    #[serde(rename = "shutdown_accept_ms", deserialize_with = "millis")]
    pub shutdown_accept: Duration,
    /// Shutdown, stage 2: in-flight sends finished (then cut).
    #[serde(rename = "shutdown_deadline_ms", deserialize_with = "millis")]
    pub shutdown_deadline: Duration,
    /// Shutdown, stage 3: receipts and the LogIndexer flushed.
    #[serde(rename = "shutdown_flush_ms", deserialize_with = "millis")]
    pub shutdown_flush: Duration,
    /// On shutdown, how long requests already inside have to be answered before the
    /// listener closes.
    #[serde(rename = "drain_grace_ms", deserialize_with = "millis")]
    pub drain_grace: Duration,
    pub log_format: String,
    /// Unencrypted links to other hosts are refused at start-up unless this is set (a
    /// private network); see `transport.rs`.
    pub allow_insecure_transport: bool,
    /// Slowloris: headers not complete by then close the connection.
    #[serde(rename = "header_read_timeout_ms", deserialize_with = "millis")]
    pub header_read_timeout: Duration,
    #[serde(rename = "request_timeout_ms", deserialize_with = "millis")]
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
}

impl Server {
    pub fn limits(&self) -> crate::app::server::ServerLimits {
        crate::app::server::ServerLimits {
            header_read_timeout: self.header_read_timeout,
            request_timeout: self.request_timeout,
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mongo {
    pub url: secret::SecretUrl,
    pub database: String,
    /// Used unless the URL sets `connectTimeoutMS`.
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Used unless the URL sets `serverSelectionTimeoutMS`.
    #[serde(rename = "server_selection_timeout_ms", deserialize_with = "millis")]
    pub server_selection_timeout: Duration,
    /// The indexes are made in the background, retried from this wait...
    #[serde(rename = "index_retry_initial_ms", deserialize_with = "millis")]
    pub index_retry_initial: Duration,
    /// ...doubling up to this one.
    #[serde(rename = "index_retry_max_ms", deserialize_with = "millis")]
    pub index_retry_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    /// One server's URL, or a cluster's seed nodes, comma-separated.
    pub url: secret::SecretUrl,
    /// `url` names a Redis Cluster (it must, to list several nodes).
    pub cluster: bool,
    /// Each channel's stream split into this many (`{type}_stream:{0}`…; 1: `{type}_stream`).
    pub stream_shards: u32,
    /// A record's shard is picked by its tenant rather than its id (fair share across
    /// tenants whatever one has queued; one tenant's load stays on one shard).
    pub shard_by_tenant: bool,
    pub group: String,
    pub consumer_name: String,
    pub read_count: usize,
    /// Entries in one batch from the bulk lane (at most `read_count`): a high entry that
    /// arrives meanwhile waits for at most this one batch.
    pub bulk_batch: usize,
    /// Entries each lane reads ahead, in batches of `read_count`: the window the
    /// round-robin by tenant chooses from.
    pub lane_window_batches: usize,
    #[serde(rename = "block_ms", deserialize_with = "millis")]
    pub block: Duration,
    #[serde(rename = "claim_idle_ms", deserialize_with = "millis")]
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
    /// A blocking read answers within `block`; any answer may take this much longer.
    #[serde(rename = "response_grace_ms", deserialize_with = "millis")]
    pub response_grace: Duration,
    /// A consumer waits for its sender `record_patience` plus two provider timeouts plus
    /// this before it gives a delivery up.
    #[serde(rename = "deliver_grace_ms", deserialize_with = "millis")]
    pub deliver_grace: Duration,
    /// `REDIS_CA_FILE`: PEM roots for `rediss://` (default: the Mozilla roots).
    #[serde(skip)]
    pub ca_file: Option<String>,
}

impl Redis {
    /// The URLs `url` lists (one, unless it names a cluster's seed nodes).
    pub fn urls(&self) -> Vec<&str> {
        redact::list(self.url.expose())
            .into_iter()
            .map(str::trim)
            .collect()
    }

    /// The longest a command may take: a blocking read's `block` and the grace.
    pub fn response_timeout(&self) -> Duration {
        self.block + self.response_grace
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Elastic {
    pub node: String,
    pub communications_index: String,
    pub logs_index: String,
    /// One request, a `_bulk` included.
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
    #[serde(skip)]
    pub user: Option<String>,
    #[serde(skip)]
    pub password: Option<secret::SecretString>,
    /// `ELASTICSEARCH_API_KEY`: the base64 `encoded` form, or `id:api_key`.
    #[serde(skip)]
    pub api_key: Option<secret::SecretString>,
    /// `ELASTICSEARCH_CA_FILE`: PEM certificate to trust for `https://`.
    #[serde(skip)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    pub batch_max: usize,
    #[serde(rename = "linger_ms", deserialize_with = "millis")]
    pub linger: Duration,
    pub max_inflight: usize,
    /// A POST is answered by then (from its arrival): `queued` once stored, else 503 with
    /// nothing stored.
    #[serde(rename = "accept_deadline_ms", deserialize_with = "millis")]
    pub accept_deadline: Duration,
    /// Requests admitted and not yet answered; beyond it, 503 at once.
    pub max_pending: usize,
    /// A bulk send is answered by then (from its arrival); a recipient not stored by then
    /// is answered 503 in its place of the answer, with nothing stored for it.
    #[serde(rename = "bulk_deadline_ms", deserialize_with = "millis")]
    pub bulk_deadline: Duration,
}

impl Router {
    pub fn batch(&self) -> BatchSettings {
        BatchSettings::new(self.batch_max, self.linger)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipts {
    pub batch_max: usize,
    #[serde(rename = "linger_ms", deserialize_with = "millis")]
    pub linger: Duration,
    #[serde(rename = "wait_for_record_ms", deserialize_with = "millis")]
    pub wait_for_record: Duration,
    #[serde(rename = "recheck_ms", deserialize_with = "millis")]
    pub recheck: Duration,
    /// How long a callback waits for the ReceiptActor's answer; longer than
    /// `wait_for_record`, so a receipt that overtook its record is answered, not cut off.
    #[serde(rename = "apply_timeout_ms", deserialize_with = "millis")]
    pub apply_timeout: Duration,
    /// A receipt whose record is still unknown after `wait_for_record` is parked in
    /// MongoDB and tried again after this, doubling with each try...
    #[serde(rename = "parked_recheck_ms", deserialize_with = "millis")]
    pub parked_recheck: Duration,
    /// ...up to this.
    #[serde(rename = "parked_recheck_max_ms", deserialize_with = "millis")]
    pub parked_recheck_max: Duration,
}

impl Receipts {
    pub fn batch(&self) -> BatchSettings {
        BatchSettings::new(self.batch_max, self.linger)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    #[serde(rename = "stale_after_ms", deserialize_with = "millis")]
    pub stale_after: Duration,
    #[serde(rename = "record_patience_ms", deserialize_with = "millis")]
    pub record_patience: Duration,
    pub fault_injection: bool,
}

/// The adaptive limit on the delivery side's store calls (`actors::adaptive`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreLimiter {
    pub enabled: bool,
    #[serde(rename = "target_ms", deserialize_with = "millis")]
    pub target: Duration,
    #[serde(rename = "quiet_ms", deserialize_with = "millis")]
    pub quiet: Duration,
    pub min_limit: f64,
    pub max_limit: f64,
    pub increase: f64,
    pub decrease: f64,
    #[serde(rename = "max_pause_ms", deserialize_with = "millis")]
    pub max_pause: Duration,
}

impl StoreLimiter {
    /// The limiter's settings, checked (`None`: the limiter is off).
    pub fn settings(&self) -> Result<Option<LimiterSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        LimiterSettings {
            target: self.target,
            quiet: self.quiet,
            min: self.min_limit,
            max: self.max_limit,
            increase: self.increase,
            decrease: self.decrease,
            max_pause: self.max_pause,
        }
        .validate()
        .map(Some)
        .map_err(|e| bad(format!("store_limiter: {e}")))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    pub email: ChannelSettings,
    pub sms: ChannelSettings,
    pub whatsapp: ChannelSettings,
}

impl Channels {
    pub fn get(&self, ch: Channel) -> &ChannelSettings {
        match ch {
            Channel::Email => &self.email,
            Channel::Sms => &self.sms,
            Channel::Whatsapp => &self.whatsapp,
        }
    }

    fn all(&self) -> [(&'static str, &ChannelSettings); 3] {
        [
            ("email", &self.email),
            ("sms", &self.sms),
            ("whatsapp", &self.whatsapp),
        ]
    }

    fn all_mut(&mut self) -> [&mut ChannelSettings; 3] {
        [&mut self.email, &mut self.sms, &mut self.whatsapp]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub concurrency: usize,
    pub max_attempts: u32,
    #[serde(rename = "backoff_base_ms", deserialize_with = "millis")]
    pub backoff_base: Duration,
    #[serde(rename = "backoff_cap_ms", deserialize_with = "millis")]
    pub backoff_cap: Duration,
    pub rate_per_sec: f64,
    pub burst: f64,
    pub breaker_consecutive_failures: u32,
    pub breaker_failure_ratio: f64,
    pub breaker_window: usize,
    pub breaker_min_calls: usize,
    #[serde(rename = "breaker_cooldown_ms", deserialize_with = "millis")]
    pub breaker_cooldown: Duration,
}

impl ChannelSettings {
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            base: self.backoff_base,
            cap: self.backoff_cap,
        }
    }

    pub fn breaker(&self) -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: self.breaker_consecutive_failures,
            failure_ratio: self.breaker_failure_ratio,
            window: self.breaker_window,
            min_calls: self.breaker_min_calls,
            cooldown: self.breaker_cooldown,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweeper {
    #[serde(rename = "interval_ms", deserialize_with = "millis")]
    pub interval: Duration,
    #[serde(rename = "recheck_ms", deserialize_with = "millis")]
    pub recheck: Duration,
    pub batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogIndexer {
    pub max_docs: usize,
    pub max_bytes: usize,
    #[serde(rename = "max_wait_ms", deserialize_with = "millis")]
    pub max_wait: Duration,
    /// A `log_stream` consumer not marked alive for this long, holding nothing, is removed.
    #[serde(rename = "forget_consumer_ms", deserialize_with = "millis")]
    pub forget_consumer: Duration,
    /// `log_stream` is kept at most this many entries long; events beyond it are not
    /// appended, their records marked to be indexed again from MongoDB.
    pub max_stream_len: u64,
    /// How long a record's `communications` document in a state about to change
    /// (`queued`, `sent`) waits for the version that replaces it (0: written at once).
    #[serde(rename = "hold_ms", deserialize_with = "millis")]
    pub hold: Duration,
}

impl LogIndexer {
    pub fn batch(&self) -> BatchSettings {
        BatchSettings::new(self.max_docs, self.max_wait).with_max_bytes(self.max_bytes)
    }
}

impl Config {
    /// The LogIndexer's hold, shortened so that a held document is written (within the
    /// hold plus a batch's `max_wait`) before the Reconciler looks at its record
    /// (`reconciler.settle`) and before its entry looks idle to another process's
    /// LogIndexer (`redis.claim_idle`): either would write it twice. `hold_ms` is a cost
    /// setting, so a shorter one is used rather than refused (a fast Reconciler turns
    /// holding off).
    pub fn log_indexer_hold(&self) -> Duration {
        let bound = self.reconciler.settle.min(self.redis.claim_idle);
        self.log_indexer
            .hold
            .min(bound.saturating_sub(self.log_indexer.max_wait) / 2)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    #[serde(rename = "interval_ms", deserialize_with = "millis")]
    pub interval: Duration,
}

/// `[events]`: the live status stream (`GET /api/v1/events`, SSE and WebSocket).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// A `: keep-alive` comment (SSE) or a ping (WebSocket) this often.
    #[serde(rename = "keep_alive_ms", deserialize_with = "millis")]
    pub keep_alive: Duration,
    /// Events the fanout's broadcast channel holds: a subscriber this far behind is dropped.
    pub channel_capacity: usize,
    /// Events one subscriber's own buffer holds: when it is full, the subscriber is dropped.
    pub subscriber_buffer: usize,
    /// Open subscriptions in this process, and of one tenant.
    pub max_subscribers: usize,
    pub max_per_tenant: usize,
    /// `log_stream` entries the fanout reads at a time, and how long a read waits.
    pub read_count: usize,
    #[serde(rename = "block_ms", deserialize_with = "millis")]
    pub block: Duration,
}

/// The security audit trail (`actors::audit`): its index and how events are batched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    pub index: String,
    pub batch_max: usize,
    #[serde(rename = "linger_ms", deserialize_with = "millis")]
    pub linger: Duration,
    pub max_buffered: usize,
}

/// The Reconciler: every `interval`, records MongoDB changed between `lookback` and
/// `settle` ago (at most `batch`) are compared with their search documents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconciler {
    #[serde(rename = "interval_ms", deserialize_with = "millis")]
    pub interval: Duration,
    #[serde(rename = "lookback_ms", deserialize_with = "millis")]
    pub lookback: Duration,
    #[serde(rename = "settle_ms", deserialize_with = "millis")]
    pub settle: Duration,
    pub batch: usize,
}

/// `[fallback]`: the FallbackActor's pace, and the longest wait a request may ask.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackSettings {
    #[serde(rename = "interval_ms", deserialize_with = "millis")]
    pub interval: Duration,
    pub batch: usize,
    pub max_after_secs: u32,
}

/// `[schedule]`: how far ahead a `sendAt` may be, and the SchedulerActor's pace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    pub horizon_days: u32,
    #[serde(rename = "interval_ms", deserialize_with = "millis")]
    pub interval: Duration,
    pub batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Supervisor {
    pub max_restarts: usize,
    #[serde(rename = "window_ms", deserialize_with = "millis")]
    pub window: Duration,
    #[serde(rename = "backoff_base_ms", deserialize_with = "millis")]
    pub backoff_base: Duration,
    #[serde(rename = "backoff_max_ms", deserialize_with = "millis")]
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Providers {
    /// One provider call, and the SMTP transport's timeout.
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
    /// Making a connection to Twilio or Meta.
    #[serde(rename = "connect_timeout_ms", deserialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Idle HTTP connections kept per provider host.
    pub pool_max_idle_per_host: usize,
    pub sms: Sms,
    pub whatsapp: Whatsapp,
    pub email: Email,
    pub vonage: Vonage,
    pub sendgrid: SendGrid,
}

/// Vonage SMS API (`VONAGE_*`); used when `routing.sms` names `vonage`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vonage {
    pub api_base: String,
    #[serde(skip)]
    pub api_key: String,
    #[serde(skip)]
    pub api_secret: secret::SecretString,
    /// The account's signature secret: delivery receipts are signed with it (SHA-256 HMAC).
    #[serde(skip)]
    pub signature_secret: secret::SecretString,
}

/// SendGrid v3 Mail Send (`SENDGRID_*`); used when `routing.email` names `sendgrid`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendGrid {
    pub api_base: String,
    #[serde(skip)]
    pub api_key: secret::SecretString,
    /// The event webhook's verification key (base64 of the DER public key SendGrid shows).
    pub webhook_public_key: String,
}

/// `[routing]`: the providers of each channel, in order, and the channel's strategy
/// (`failover`: the first healthy one takes every message; `weighted`: split by weight among
/// the healthy ones). Names: `twilio` and `vonage` for SMS, `smtp` and `sendgrid` for email,
/// `meta` and `twilio` for WhatsApp; under `weighted` an entry may carry its weight,
/// `name:weight` (default 1; 0: only ever a failover target).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    pub email: Vec<String>,
    pub sms: Vec<String>,
    pub whatsapp: Vec<String>,
    #[serde(default = "failover")]
    pub email_strategy: String,
    #[serde(default = "failover")]
    pub sms_strategy: String,
    #[serde(default = "failover")]
    pub whatsapp_strategy: String,
}

fn failover() -> String {
    "failover".into()
}

/// One `[routing]` entry, `name` or `name:weight`, split (the weight unparsed).
pub fn route_entry(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once(':') {
        Some((name, weight)) => (name.trim(), Some(weight.trim())),
        None => (entry.trim(), None),
    }
}

impl Routing {
    /// The channel's entries as configured (`name` or `name:weight`).
    pub fn of(&self, channel: Channel) -> &[String] {
        match channel {
            Channel::Email => &self.email,
            Channel::Sms => &self.sms,
            Channel::Whatsapp => &self.whatsapp,
        }
    }

    /// The channel's provider names, in order.
    pub fn names(&self, channel: Channel) -> Vec<&str> {
        self.of(channel).iter().map(|e| route_entry(e).0).collect()
    }

    /// The channel's weights, in order (1 where none is given; checked at start-up).
    pub fn weights(&self, channel: Channel) -> Vec<u32> {
        let weight = |e: &String| route_entry(e).1.and_then(|w| w.parse().ok()).unwrap_or(1);
        self.of(channel).iter().map(weight).collect()
    }

    /// The channel's strategy as configured (checked at start-up).
    pub fn strategy_name(&self, channel: Channel) -> &str {
        match channel {
            Channel::Email => &self.email_strategy,
            Channel::Sms => &self.sms_strategy,
            Channel::Whatsapp => &self.whatsapp_strategy,
        }
    }

    pub fn strategy(&self, channel: Channel) -> Strategy {
        Strategy::parse(self.strategy_name(channel).trim()).unwrap_or(Strategy::Failover)
    }

    /// The providers a channel may name, in the names `[routing]` uses.
    pub fn known(channel: Channel) -> &'static [&'static str] {
        match channel {
            Channel::Email => &["smtp", "sendgrid"],
            Channel::Sms => &["twilio", "vonage"],
            Channel::Whatsapp => &["meta", "twilio"],
        }
    }

    /// Whether any channel routes through `provider`.
    pub fn uses(&self, provider: &str) -> bool {
        Channel::ALL
            .into_iter()
            .any(|ch| self.names(ch).contains(&provider))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sms {
    pub api_base: String,
    pub account_sid: String,
    pub messaging_service_sid: String,
    #[serde(skip)]
    pub auth_token: secret::SecretString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whatsapp {
    pub api_base: String,
    pub phone_number_id: String,
    #[serde(skip)]
    pub token: secret::SecretString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    pub smtp_url: secret::SecretUrl,
    pub default_subject: String,
}

impl Config {
    /// Read `path`, then apply the environment (`env` looks a variable up).
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        env::apply(&mut cfg, env)?;
        cfg.load_keys(env)?;
        cfg.load_tenants()?;
        checks::run(&cfg)?;
        Ok(cfg)
    }

    pub fn from_process_env(path: &Path) -> Result<Config, ConfigError> {
        Config::load(path, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The tenants' tables from `tenants.file`, if one is named.
    fn load_tenants(&mut self) -> Result<(), ConfigError> {
        let name = self.tenants.file.clone();
        if name.is_empty() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&name)
            .map_err(|e| bad(format!("tenants.file / TENANTS_FILE {name:?}: {e}")))?;
        self.tenants.tables = crate::tenants::parse_file(&format!("TENANTS_FILE {name}"), &text)
            .map_err(|e| bad(e.to_string()))?;
        Ok(())
    }

    /// The API keys: `API_KEYS` and the lines of `auth.keys_file` (both may be set).
    fn load_keys(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
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
            env(env::API_KEYS).as_deref(),
            file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    pub(super) fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        Config::load(&path, &move |k| m.get(k).cloned())
    }

    pub(super) const CREDS: [(&str, &str); 5] = [
        ("API_KEYS", "acme:acme-0123456789abcdef"),
        ("ACCOUNTSID", "AC00000000000000000000000000000000"),
        ("AUTHTOKEN", "t"),
        ("WHATSAPP_PHONE_NUMBER_ID", "1"),
        ("WHATSAPP_TOKEN", "w"),
    ];

    #[test]
    fn a_printed_configuration_shows_no_secret() {
        let secrets = [
            ("AUTHTOKEN", "tw-auth-s3cret"),
            ("WHATSAPP_TOKEN", "wa-token-s3cret"),
            ("WHATSAPP_APP_SECRET", "wa-app-s3cret"),
            ("WHATSAPP_VERIFY_TOKEN", "wa-verify-s3cret"),
            ("METRICS_TOKEN", "metrics-s3cret"),
            ("ELASTICSEARCH_PASSWORD", "es-pw-s3cret"),
            ("ELASTICSEARCH_API_KEY", "id:es-key-s3cret"),
            (
                "MONGODB_URL",
                "mongodb://app:mongo-pw-s3cret@127.0.0.1:27017/",
            ),
            ("REDIS_URL", "redis://:redis-pw-s3cret@127.0.0.1:6379/0"),
            ("SMTP_URL", "smtp://mailer:smtp-pw-s3cret@127.0.0.1:25"),
            ("API_KEYS", "acme:acme-key-s3cret-0123456789"),
        ];
        let mut v = CREDS.to_vec();
        v.extend(secrets);
        let c = load(&v).unwrap();
        let printed = format!("{c:?} {c:#?}");
        assert!(printed.contains("REDACTED"), "{printed}");
        assert!(
            printed.contains("127.0.0.1:27017"),
            "where it connects stays visible"
        );
        assert!(!printed.contains("s3cret"), "{printed}");
        // The values are all there for the code that uses them.
        assert_eq!(c.providers.sms.auth_token.expose_secret(), "tw-auth-s3cret");
        assert!(c.redis.url.expose().contains("redis-pw-s3cret"));
    }

    #[test]
    fn shipped_file_loads_and_env_overrides_it() {
        let mut v = CREDS.to_vec();
        v.push(("PORT", "4000"));
        v.push(("REDIS_URL", "redis://127.0.0.1:7000"));
        v.push(("PROVIDER_TIMEOUT_MS", "1500"));
        v.push(("BACKOFF_BASE_MS", "200"));
        let c = load(&v).unwrap();
        assert_eq!(c.server.port, 4000);
        assert_eq!(c.redis.url.expose(), "redis://127.0.0.1:7000");
        assert_eq!(c.mongodb.database, "communication-aggregator");
        assert_eq!(c.providers.timeout, Duration::from_millis(1500));
        assert_eq!(c.server.shutdown_deadline, Duration::from_secs(15));
        for ch in Channel::ALL {
            assert_eq!(c.channels.get(ch).retry().base, Duration::from_millis(200));
        }
        assert_eq!(c.receipts.batch().max_items, 50);
        assert_eq!(c.router.max_inflight, 2);
        assert_eq!(c.log_indexer.batch().max_bytes, 5_000_000);
    }

    /// The hold is shortened so that a held document is written before the Reconciler
    /// or another process's LogIndexer would write it again; a fast Reconciler turns it off.
    #[test]
    fn the_log_indexers_hold_ends_before_the_reconciler_looks() {
        let mut c = load(&CREDS).unwrap();
        assert_eq!(c.log_indexer_hold(), Duration::from_secs(1));
        let mut v = CREDS.to_vec();
        v.push(("LOG_INDEXER_HOLD_MS", "60000"));
        let long = load(&v).unwrap();
        assert_eq!(long.log_indexer_hold(), Duration::from_millis(14_500));
        c.reconciler.settle = Duration::from_secs(1);
        assert_eq!(c.log_indexer_hold(), Duration::ZERO);
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

    /// A tenant's own provider order names providers of the channel's list.
    #[test]
    fn tenant_provider_orders_name_the_channels_providers() {
        let file = std::env::temp_dir().join(format!("tenant-routes-{}.toml", std::process::id()));
        let path = file.to_string_lossy().to_string();
        let mut v = CREDS.to_vec();
        v.extend([
            ("TENANTS_FILE", path.as_str()),
            ("SMS_PROVIDERS", "twilio,vonage"),
            ("VONAGE_API_KEY", "k"),
            ("VONAGE_API_SECRET", "s"),
        ]);
        let with = |table: &str| {
            std::fs::write(&file, format!("[acme]\n{table}\n")).unwrap();
            load(&v)
        };
        let c = with("providers = { sms = [\"vonage\", \"twilio\"] }").unwrap();
        let acme = &c.tenants.tables["acme"];
        assert_eq!(
            acme.providers.sms.as_deref(),
            Some(&["vonage".to_string(), "twilio".to_string()][..])
        );
        for (table, named) in [
            (
                "providers = { sms = [\"sendgrid\"] }",
                "TENANTS_FILE: [acme] providers.sms: \"sendgrid\" is not among the channel's providers",
            ),
            ("providers = { email = [\"sendgrid\"] }", "[acme] providers.email: \"sendgrid\""),
            ("providers = { sms = [] }", "[acme] providers.sms names no provider"),
            ("providers = { sms = [\"vonage\", \"vonage\"] }", "named twice"),
        ] {
            let err = with(table).unwrap_err().to_string();
            assert!(err.contains(named), "{table}: {err}");
        }
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn tenant_settings_from_the_file_and_the_environment() {
        let c = load(&CREDS).unwrap();
        assert_eq!(c.tenants.countries, ["+1"]);
        assert_eq!(c.tenants.fail_open, [Channel::Email]);
        assert_eq!((c.auth.rate_per_sec, c.auth.burst), (20.0, 40.0));
        let file = std::env::temp_dir().join(format!("tenants-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[acme]\nnumbers = [\"+15550001111\"]\ndaily_quota = { sms = 7 }\n",
        )
        .unwrap();
        let path = file.to_string_lossy().to_string();
        let mut v = CREDS.to_vec();
        v.extend([
            ("TENANTS_FILE", path.as_str()),
            ("DAILY_QUOTA", "50"),
            ("DESTINATION_COUNTRIES", "+1, +44"),
            ("LIMITER_FAIL_OPEN", "none"),
            ("SMS_FROM", "+15550009999"),
        ]);
        let c = load(&v).unwrap();
        assert_eq!(c.tenants.countries, ["+1", "+44"]);
        assert!(c.tenants.fail_open.is_empty());
        let tenants = crate::tenants::Tenants::new(&c.tenants.tables, &c.tenant_defaults());
        assert_eq!(tenants.policy("acme").daily_quota.sms, 7);
        assert_eq!(tenants.policy("acme").daily_quota.email, 50);
        assert_eq!(
            tenants.policy("zeta").default_from(Channel::Sms),
            Some("+15550009999")
        );
        for (var, value, named) in [
            ("LIMITER_FAIL_OPEN", "fax", "LIMITER_FAIL_OPEN"),
            ("DESTINATION_COUNTRIES", "44", "DESTINATION_COUNTRIES"),
            ("SMS_FROM", "not a sender!", "SMS_FROM"),
        ] {
            let mut bad = CREDS.to_vec();
            bad.push((var, value));
            let err = load(&bad).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        std::fs::write(&file, "[acmee]\nnumbers = [\"+15550001111\"]\n").unwrap();
        let err = load(&v).unwrap_err().to_string();
        assert!(err.contains("[acmee]") && err.contains("API_KEYS"), "{err}");
        std::fs::remove_file(&file).unwrap();
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
    fn routes_name_known_providers_whose_credentials_are_set() {
        let c = load(&CREDS).unwrap();
        assert_eq!(
            (c.routing.sms.as_slice(), c.routing.email.as_slice()),
            (&["twilio".to_string()][..], &["smtp".to_string()][..])
        );
        let mut v = CREDS.to_vec();
        v.extend([
            ("SMS_PROVIDERS", "vonage, twilio"),
            ("EMAIL_PROVIDERS", "sendgrid"),
            ("WHATSAPP_PROVIDERS", "twilio"),
            ("VONAGE_API_KEY", "k"),
            ("VONAGE_API_SECRET", "s"),
            ("SENDGRID_API_KEY", "SG.x"),
        ]);
        let c = load(&v).unwrap();
        assert_eq!(c.routing.sms, ["vonage", "twilio"]);
        assert!(c.routing.uses("twilio") && !c.routing.uses("meta"));
        for (var, value, named) in [
            (
                "SMS_PROVIDERS",
                "sendgrid",
                "SMS_PROVIDERS: \"sendgrid\" is not a sms provider",
            ),
            (
                "EMAIL_PROVIDERS",
                "smtp,smtp",
                "EMAIL_PROVIDERS: \"smtp\" is named twice",
            ),
            ("WHATSAPP_PROVIDERS", "none", "WHATSAPP_PROVIDERS: \"none\""),
            ("SENDGRID_API_KEY", "", "SENDGRID_API_KEY is not set"),
            (
                "SENDGRID_WEBHOOK_PUBLIC_KEY",
                "bm90IGEga2V5",
                "SENDGRID_WEBHOOK_PUBLIC_KEY is not",
            ),
        ] {
            let mut bad = v.clone();
            bad.retain(|(k, _)| *k != var);
            if !value.is_empty() {
                bad.push((var, value));
            }
            let err = load(&bad).unwrap_err().to_string();
            assert!(err.contains(named), "{var}={value}: {err}");
        }
        let weighted = |providers: &'static str| {
            let mut w = v.clone();
            w.retain(|(k, _)| *k != "SMS_PROVIDERS");
            w.extend([("SMS_PROVIDERS", providers), ("SMS_ROUTING", "weighted")]);
            load(&w)
        };
        let c = weighted("twilio:3, vonage").unwrap();
        assert_eq!(c.routing.names(Channel::Sms), ["twilio", "vonage"]);
        assert_eq!(c.routing.weights(Channel::Sms), [3, 1]);
        assert_eq!(c.routing.strategy(Channel::Sms), Strategy::Weighted);
        assert_eq!(c.routing.strategy(Channel::Email), Strategy::Failover);
        for (providers, named) in [
            (
                "twilio:x,vonage",
                "the weight of twilio in \"twilio:x\" must be a whole number",
            ),
            ("twilio:1001", "from 0 to 1000"),
            ("twilio:0,vonage:0", "SMS_PROVIDERS: every weight is 0"),
            ("twilio:2,twilio:1", "\"twilio\" is named twice"),
        ] {
            let err = weighted(providers).unwrap_err().to_string();
            assert!(err.contains(named), "{providers}: {err}");
        }
        for (var, value, named) in [
            (
                "SMS_ROUTING",
                "random",
                "SMS_ROUTING (routing.sms_strategy) is \"random\"",
            ),
            (
                "SMS_PROVIDERS",
                "twilio:3,vonage",
                "gives twilio a weight, but weights need SMS_ROUTING=weighted",
            ),
        ] {
            let mut bad = v.clone();
            bad.retain(|(k, _)| *k != var);
            bad.push((var, value));
            let err = load(&bad).unwrap_err().to_string();
            assert!(err.contains(named), "{var}={value}: {err}");
        }
        // Meta's credentials are needed only while WhatsApp routes through Meta.
        v.retain(|(k, _)| !k.starts_with("WHATSAPP_"));
        v.push(("WHATSAPP_PROVIDERS", "twilio"));
        assert!(load(&v).is_ok());
    }
}
