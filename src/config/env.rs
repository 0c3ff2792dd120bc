//! The environment variables, in one table: each names the setting it overrides, says in a
//! line what it means, and applies itself. [`ENV_VARS`] (which `tests/deploy.rs` checks the
//! deployment files against), `--help` and the README's Configuration table (checked by a
//! test below) all come from it.

use super::{bad, Config, ConfigError};
use std::str::FromStr;
use std::time::Duration;

/// One variable's value, with its name for error messages.
pub struct Value {
    name: &'static str,
    raw: String,
}

impl Value {
    fn text(self) -> Result<String, ConfigError> {
        Ok(self.raw)
    }

    fn some(self) -> Result<Option<String>, ConfigError> {
        Ok(Some(self.raw))
    }

    fn secret(self) -> Result<super::secret::SecretString, ConfigError> {
        Ok(self.raw.into())
    }

    fn some_secret(self) -> Result<Option<super::secret::SecretString>, ConfigError> {
        Ok(Some(self.raw.into()))
    }

    fn url(self) -> Result<super::secret::SecretUrl, ConfigError> {
        Ok(super::secret::SecretUrl::new(self.raw))
    }

    fn num<T: FromStr>(&self) -> Result<T, ConfigError> {
        self.raw.trim().parse().map_err(|_| {
            bad(format!(
                "{}={:?} is not a valid number",
                self.name, self.raw
            ))
        })
    }

    fn millis(&self) -> Result<Duration, ConfigError> {
        self.num().map(Duration::from_millis)
    }

    /// A comma-separated list, blanks dropped.
    fn list(self) -> Result<Vec<String>, ConfigError> {
        Ok(self
            .raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// A comma-separated list of channel names; `none` for none (an empty variable counts
    /// as unset).
    fn channels(self) -> Result<Vec<actors::domain::Channel>, ConfigError> {
        let name = self.name;
        if self.raw.trim() == "none" {
            return Ok(Vec::new());
        }
        self.list()?
            .iter()
            .map(|c| {
                actors::domain::Channel::parse(c)
                    .ok_or_else(|| bad(format!("{name}: {c:?} is not one of email, sms, whatsapp")))
            })
            .collect()
    }

    fn flag(&self) -> Result<bool, ConfigError> {
        match self.raw.as_str() {
            "1" | "true" | "yes" => Ok(true),
            "0" | "false" | "no" => Ok(false),
            _ => Err(bad(format!("{}={:?}: true or false", self.name, self.raw))),
        }
    }
}

type Setter = fn(&mut Config, Value) -> Result<(), ConfigError>;

/// An environment variable the service reads.
pub struct EnvVar {
    pub name: &'static str,
    /// The `config.toml` setting it overrides; empty for environment-only values.
    pub setting: &'static str,
    pub doc: &'static str,
    /// `None`: see [`read_elsewhere`].
    set: Option<Setter>,
}

const fn var(name: &'static str, setting: &'static str, doc: &'static str, set: Setter) -> EnvVar {
    EnvVar {
        name,
        setting,
        doc,
        set: Some(set),
    }
}

/// Read where it is used (`API_KEYS` with the keys file, `RUST_LOG` by the log filter, the
/// `OTEL_*` variables by the OpenTelemetry SDK and `app::otel`).
const fn read_elsewhere(name: &'static str, doc: &'static str) -> EnvVar {
    EnvVar {
        name,
        setting: "",
        doc,
        set: None,
    }
}

/// A [`Setter`] that parses with a [`Value`] method and stores the result at a setting;
/// `channels.*.x` stores it in every channel.
macro_rules! set {
    ($parse:ident => channels.*.$field:ident) => {
        |c: &mut Config, v: Value| {
            let x = v.$parse()?;
            c.channels.all_mut().into_iter().for_each(|ch| ch.$field = x);
            Ok(())
        }
    };
    ($parse:ident => $($place:ident).+) => {
        |c: &mut Config, v: Value| v.$parse().map(|x| c.$($place).+ = x)
    };
}

pub(super) const API_KEYS: &str = "API_KEYS";

/// Every environment variable: name, setting, meaning, how it is applied. One a line, as
/// a table reads best.
#[rustfmt::skip]
pub const ENV: &[EnvVar] = &[
    var("HOST", "server.host", "listen address", set!(text => server.host)),
    var("PORT", "server.port", "listen port", set!(num => server.port)),
    var("SHUTDOWN_ACCEPT_MS", "server.shutdown_accept_ms", "shutdown stage 1: requests inside answered", set!(millis => server.shutdown_accept)),
    var("SHUTDOWN_DEADLINE_MS", "server.shutdown_deadline_ms", "shutdown stage 2: in-flight sends finished, then cut", set!(millis => server.shutdown_deadline)),
    var("SHUTDOWN_FLUSH_MS", "server.shutdown_flush_ms", "shutdown stage 3: receipts and log events flushed", set!(millis => server.shutdown_flush)),
    var("LOG_FORMAT", "server.log_format", "`text` or `json`", set!(text => server.log_format)),
    var("HEADER_READ_TIMEOUT_MS", "server.header_read_timeout_ms", "headers not complete by then close the connection", set!(millis => server.header_read_timeout)),
    var("MAX_CONNECTIONS", "server.max_connections", "open connections at once", set!(num => server.max_connections)),
    var("ALLOW_INSECURE_TRANSPORT", "server.allow_insecure_transport", "let unencrypted links leave this host (private networks only)", set!(flag => server.allow_insecure_transport)),
    read_elsewhere("RUST_LOG", "log levels, as tracing's EnvFilter reads them (default `info,warp=warn`)"),
    read_elsewhere("OTEL_EXPORTER_OTLP_ENDPOINT", "OTLP/HTTP collector; traces go to `{it}/v1/traces` (unset: traces off)"),
    read_elsewhere("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "the traces URL itself, instead of the one above"),
    read_elsewhere("OTEL_EXPORTER_OTLP_HEADERS", "`key=value,…` headers on each export (a collector's auth)"),
    read_elsewhere("OTEL_SERVICE_NAME", "the spans' `service.name` (default `comm-aggregator`)"),
    read_elsewhere("OTEL_TRACES_SAMPLER", "`parentbased_always_on` (default), `traceidratio`, `parentbased_traceidratio`, `always_off`…"),
    read_elsewhere("OTEL_TRACES_SAMPLER_ARG", "the ratio of the `*traceidratio` samplers"),
    read_elsewhere("OTEL_BSP_SCHEDULE_DELAY", "milliseconds between span exports (default 5000)"),
    var("MONGODB_URL", "mongodb.url", "MongoDB", set!(url => mongodb.url)),
    var("MONGODB_DATABASE", "mongodb.database", "database", set!(text => mongodb.database)),
    var("REDIS_URL", "redis.url", "Redis (`rediss://` for TLS); a cluster's seed nodes, comma-separated", set!(url => redis.url)),
    var("REDIS_CLUSTER", "redis.cluster", "`REDIS_URL` names a Redis Cluster", set!(flag => redis.cluster)),
    var("REDIS_STREAM_SHARDS", "redis.stream_shards", "streams each channel's is split into (1: `{type}_stream`)", set!(num => redis.stream_shards)),
    var("REDIS_SHARD_BY_TENANT", "redis.shard_by_tenant", "a record's shard picked by its tenant, not its id: tenants in different shards go side by side", set!(flag => redis.shard_by_tenant)),
    var("REDIS_GROUP", "redis.group", "consumer group on every stream", set!(text => redis.group)),
    var("CONSUMER_NAME", "redis.consumer_name", "this instance's consumer name", set!(text => redis.consumer_name)),
    var("READ_COUNT", "redis.read_count", "entries a consumer reads (and hands its sender) at once", set!(num => redis.read_count)),
    var("CLAIM_IDLE_MS", "redis.claim_idle_ms", "entries idle this long are taken over", set!(millis => redis.claim_idle)),
    var("MAX_DELIVERIES", "redis.max_deliveries", "deliveries before the dead-letter stream", set!(num => redis.max_deliveries)),
    var("ELASTICSEARCH_NODE", "elasticsearch.node", "Elasticsearch (`https://` for TLS)", set!(text => elasticsearch.node)),
    var("ELASTICSEARCH_USER", "", "basic auth user", set!(some => elasticsearch.user)),
    var("ELASTICSEARCH_PASSWORD", "", "basic auth password", set!(some_secret => elasticsearch.password)),
    var("ELASTICSEARCH_API_KEY", "", "API key (`encoded` or `id:api_key`)", set!(some_secret => elasticsearch.api_key)),
    var("ELASTICSEARCH_CA_FILE", "", "PEM certificate to trust for `https://`", set!(some => elasticsearch.ca_file)),
    var("REDIS_CA_FILE", "", "PEM certificates to trust for `rediss://`", set!(some => redis.ca_file)),
    read_elsewhere(API_KEYS, "`tenant:key,…` (or `tenant:sha256:<hex>`)"),
    var("API_KEYS_FILE", "auth.keys_file", "file of `tenant:key` lines", set!(text => auth.keys_file)),
    var("DEV_MODE", "auth.dev_mode", "without keys, serve everybody as tenant `default`", set!(flag => auth.dev_mode)),
    var("API_RATE_PER_SEC", "auth.rate_per_sec", "requests a second per key", set!(num => auth.rate_per_sec)),
    var("API_BURST", "auth.burst", "requests at once per key", set!(num => auth.burst)),
    var("METRICS_TOKEN", "", "bearer token `/metrics` wants, when set", set!(some_secret => auth.metrics_token)),
    var("RECIPIENT_MAX", "limits.recipient_max", "messages to one number per tenant per window", set!(num => limits.recipient_max)),
    var("RECIPIENT_WINDOW_SECS", "limits.recipient_window_secs", "that window", set!(num => limits.recipient_window_secs)),
    var("TENANTS_FILE", "tenants.file", "file of per-tenant tables: senders, countries, quotas", set!(text => tenants.file)),
    var("DESTINATION_COUNTRIES", "tenants.countries", "E.164 prefixes SMS/WhatsApp may go to, comma-separated", set!(list => tenants.countries)),
    var("DAILY_QUOTA", "tenants.daily_quota.*", "messages a UTC day per tenant, every channel (0: none)", |c, v| v.num().map(|n| { let q = &mut c.tenants.daily_quota; (q.email, q.sms, q.whatsapp) = (n, n, n); })),
    var("RECIPIENTS_PER_HOUR", "tenants.recipients_per_hour", "distinct SMS/WhatsApp numbers a tenant may text an hour", set!(num => tenants.recipients_per_hour)),
    var("LIMITER_FAIL_OPEN", "tenants.fail_open", "channels accepted when Redis cannot be asked", set!(channels => tenants.fail_open)),
    var("EMAIL_FROM", "tenants.default_from.email", "the service's own email sender", set!(text => tenants.default_from.email)),
    var("SMS_FROM", "tenants.default_from.sms", "the service's own SMS sender", set!(text => tenants.default_from.sms)),
    var("WHATSAPP_FROM", "tenants.default_from.whatsapp", "the service's own WhatsApp number", set!(text => tenants.default_from.whatsapp)),
    var("EMAIL_MAX_CHARS", "limits.email_max_chars", "longest email body", set!(num => limits.email_max_chars)),
    var("ACCEPT_DEADLINE_MS", "router.accept_deadline_ms", "a POST is answered by then: stored, or 503 with nothing stored", set!(millis => router.accept_deadline)),
    var("STALE_AFTER_MS", "sender.stale_after_ms", "how long a record's lease lasts", set!(millis => sender.stale_after)),
    var("STORE_LIMITER", "store_limiter.enabled", "the senders' and receipts' store calls adapt to the latency of the router's inserts (`false`: off)", set!(flag => store_limiter.enabled)),
    var("STORE_LIMITER_TARGET_MS", "store_limiter.target_ms", "an insert of the accept path slower than this cuts the delivery side's limit", set!(millis => store_limiter.target)),
    var("STORE_LIMITER_MIN", "store_limiter.min_limit", "the lowest limit (below 1: one call at a time, paced)", set!(num => store_limiter.min_limit)),
    var("FAULT_INJECTION", "sender.fault_injection", "honour the test markers", set!(flag => sender.fault_injection)),
    var("LOG_STREAM_MAX_LEN", "log_indexer.max_stream_len", "longest `log_stream`; events beyond it are indexed later from MongoDB", set!(num => log_indexer.max_stream_len)),
    var("LOG_INDEXER_HOLD_MS", "log_indexer.hold_ms", "how long a search document in a state about to change (`queued`, `sent`) waits for its successor (0: none)", set!(millis => log_indexer.hold)),
    var("FORGET_CONSUMER_MS", "log_indexer.forget_consumer_ms", "a `log_stream` consumer not marked alive this long, holding nothing, is removed", set!(millis => log_indexer.forget_consumer)),
    var("FALLBACK_INTERVAL_MS", "fallback.interval_ms", "how often due fallbacks are looked for", set!(millis => fallback.interval)),
    var("SCHEDULE_HORIZON_DAYS", "schedule.horizon_days", "the furthest ahead a `sendAt` may be, in days", set!(num => schedule.horizon_days)),
    var("SCHEDULE_INTERVAL_MS", "schedule.interval_ms", "how often due scheduled sends are looked for", set!(millis => schedule.interval)),
    var("SWEEP_RECHECK_MS", "sweeper.recheck_ms", "a record not moving this long is queued again", set!(millis => sweeper.recheck)),
    var("PROVIDER_TIMEOUT_MS", "providers.timeout_ms", "one provider call", set!(millis => providers.timeout)),
    var("MAX_ATTEMPTS", "channels.*.max_attempts", "attempts before `failed`, every channel", set!(num => channels.*.max_attempts)),
    var("BACKOFF_BASE_MS", "channels.*.backoff_base_ms", "first retry wait, every channel", set!(millis => channels.*.backoff_base)),
    var("BREAKER_COOLDOWN_MS", "channels.*.breaker_cooldown_ms", "how long a breaker stays open", set!(millis => channels.*.breaker_cooldown)),
    var("PROVIDER_RATE_PER_SEC", "channels.*.rate_per_sec", "sends a second, every channel", set!(num => channels.*.rate_per_sec)),
    var("PROVIDER_BURST", "channels.*.burst", "sends at once, every channel", set!(num => channels.*.burst)),
    var("PUBLIC_BASE_URL", "callbacks.public_base_url", "how providers reach this service", set!(text => callbacks.public_base_url)),
    var("WHATSAPP_APP_SECRET", "", "WhatsApp webhook signature secret", set!(secret => callbacks.whatsapp_app_secret)),
    var("WHATSAPP_VERIFY_TOKEN", "", "WhatsApp webhook verification token", set!(secret => callbacks.whatsapp_verify_token)),
    var("TWILIO_API_BASE", "providers.sms.api_base", "Twilio API", set!(text => providers.sms.api_base)),
    var("ACCOUNTSID", "providers.sms.account_sid", "Twilio Account SID", set!(text => providers.sms.account_sid)),
    var("AUTHTOKEN", "", "Twilio auth token", set!(secret => providers.sms.auth_token)),
    var("MSG_ID", "providers.sms.messaging_service_sid", "Twilio Messaging Service SID", set!(text => providers.sms.messaging_service_sid)),
    var("WHATSAPP_API_BASE", "providers.whatsapp.api_base", "Cloud API base, with version", set!(text => providers.whatsapp.api_base)),
    var("WHATSAPP_PHONE_NUMBER_ID", "providers.whatsapp.phone_number_id", "sender phone number id", set!(text => providers.whatsapp.phone_number_id)),
    var("WHATSAPP_TOKEN", "", "WhatsApp access token", set!(secret => providers.whatsapp.token)),
    var("SMTP_URL", "providers.email.smtp_url", "SMTP server, credentials in the URL", set!(url => providers.email.smtp_url)),
    var("EMAIL_DEFAULT_SUBJECT", "providers.email.default_subject", "subject when the request has none", set!(text => providers.email.default_subject)),
    var("VONAGE_API_BASE", "providers.vonage.api_base", "Vonage SMS API", set!(text => providers.vonage.api_base)),
    var("VONAGE_API_KEY", "", "Vonage API key", set!(text => providers.vonage.api_key)),
    var("VONAGE_API_SECRET", "", "Vonage API secret", set!(secret => providers.vonage.api_secret)),
    var("VONAGE_SIGNATURE_SECRET", "", "Vonage signature secret (signed delivery receipts)", set!(secret => providers.vonage.signature_secret)),
    var("SENDGRID_API_BASE", "providers.sendgrid.api_base", "SendGrid API", set!(text => providers.sendgrid.api_base)),
    var("SENDGRID_API_KEY", "", "SendGrid API key", set!(secret => providers.sendgrid.api_key)),
    var("SENDGRID_WEBHOOK_PUBLIC_KEY", "providers.sendgrid.webhook_public_key", "SendGrid event webhook verification key", set!(text => providers.sendgrid.webhook_public_key)),
    var("EMAIL_PROVIDERS", "routing.email", "email providers in order: `smtp`, `sendgrid` (`name:weight` under `weighted`)", set!(list => routing.email)),
    var("SMS_PROVIDERS", "routing.sms", "SMS providers in order: `twilio`, `vonage` (e.g. `twilio:3,vonage:1` under `weighted`)", set!(list => routing.sms)),
    var("WHATSAPP_PROVIDERS", "routing.whatsapp", "WhatsApp providers in order: `meta`, `twilio` (`name:weight` under `weighted`)", set!(list => routing.whatsapp)),
    var("EMAIL_ROUTING", "routing.email_strategy", "`failover` (first healthy provider) or `weighted` (split by weight)", set!(text => routing.email_strategy)),
    var("SMS_ROUTING", "routing.sms_strategy", "`failover` or `weighted`, for SMS", set!(text => routing.sms_strategy)),
    var("WHATSAPP_ROUTING", "routing.whatsapp_strategy", "`failover` or `weighted`, for WhatsApp", set!(text => routing.whatsapp_strategy)),
];

const fn names() -> [&'static str; ENV.len()] {
    let mut out = [""; ENV.len()];
    let mut i = 0;
    while i < ENV.len() {
        out[i] = ENV[i].name;
        i += 1;
    }
    out
}

/// Every environment variable the service reads (deployment files are checked against it).
pub const ENV_VARS: [&str; ENV.len()] = names();

/// Apply every variable that is set, in the table's order.
pub(super) fn apply(
    cfg: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for var in ENV {
        if let (Some(set), Some(raw)) = (var.set, env(var.name)) {
            set(
                cfg,
                Value {
                    name: var.name,
                    raw,
                },
            )?;
        }
    }
    Ok(())
}

/// The variables as `--help` lists them.
pub fn env_help() -> String {
    let width = ENV.iter().map(|v| v.name.len()).max().unwrap_or(0);
    ENV.iter()
        .map(|v| {
            let setting = if v.setting.is_empty() {
                String::new()
            } else {
                format!(" [{}]", v.setting)
            };
            format!("  {:width$}  {}{setting}\n", v.name, v.doc)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique() {
        let set: BTreeSet<&str> = ENV_VARS.iter().copied().collect();
        assert_eq!(set.len(), ENV_VARS.len());
    }

    /// The README's Configuration table lists exactly the variables of [`ENV`].
    #[test]
    fn readme_lists_the_table() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .expect("a Configuration section");
        let mut documented = BTreeSet::new();
        for row in section.lines().filter(|l| l.starts_with('|')) {
            let first = row.split('|').nth(1).unwrap_or("");
            for name in first.split('`').skip(1).step_by(2) {
                documented.insert(name);
            }
        }
        let table: BTreeSet<&str> = ENV_VARS.iter().copied().collect();
        assert_eq!(documented, table);
    }
}
