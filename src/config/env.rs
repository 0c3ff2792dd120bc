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
    fn text(self) -> String {
        self.raw
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
    /// `None`: read elsewhere (`API_KEYS` with the keys file, `RUST_LOG` by the log filter).
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

pub(super) const API_KEYS: &str = "API_KEYS";

/// Every environment variable.
pub const ENV: [EnvVar; 48] = [
    var("HOST", "server.host", "listen address", |c, v| {
        c.server.host = v.text();
        Ok(())
    }),
    var("PORT", "server.port", "listen port", |c, v| {
        v.num().map(|n| c.server.port = n)
    }),
    var(
        "SHUTDOWN_DEADLINE_MS",
        "server.shutdown_deadline_ms",
        "longest graceful shutdown",
        |c, v| v.millis().map(|d| c.server.shutdown_deadline = d),
    ),
    var(
        "LOG_FORMAT",
        "server.log_format",
        "`text` or `json`",
        |c, v| {
            c.server.log_format = v.text();
            Ok(())
        },
    ),
    EnvVar {
        name: "RUST_LOG",
        setting: "",
        doc: "log levels, as tracing's EnvFilter reads them (default `info,warp=warn`)",
        set: None,
    },
    var("MONGODB_URL", "mongodb.url", "MongoDB", |c, v| {
        c.mongodb.url = v.text();
        Ok(())
    }),
    var(
        "MONGODB_DATABASE",
        "mongodb.database",
        "database",
        |c, v| {
            c.mongodb.database = v.text();
            Ok(())
        },
    ),
    var(
        "REDIS_URL",
        "redis.url",
        "Redis (`rediss://` for TLS)",
        |c, v| {
            c.redis.url = v.text();
            Ok(())
        },
    ),
    var(
        "REDIS_GROUP",
        "redis.group",
        "consumer group on every stream",
        |c, v| {
            c.redis.group = v.text();
            Ok(())
        },
    ),
    var(
        "CONSUMER_NAME",
        "redis.consumer_name",
        "this instance's consumer name",
        |c, v| {
            c.redis.consumer_name = v.text();
            Ok(())
        },
    ),
    var(
        "CLAIM_IDLE_MS",
        "redis.claim_idle_ms",
        "entries idle this long are taken over",
        |c, v| v.millis().map(|d| c.redis.claim_idle = d),
    ),
    var(
        "MAX_DELIVERIES",
        "redis.max_deliveries",
        "deliveries before the dead-letter stream",
        |c, v| v.num().map(|n| c.redis.max_deliveries = n),
    ),
    var(
        "ELASTICSEARCH_NODE",
        "elasticsearch.node",
        "Elasticsearch (`https://` for TLS)",
        |c, v| {
            c.elasticsearch.node = v.text();
            Ok(())
        },
    ),
    var("ELASTICSEARCH_USER", "", "basic auth user", |c, v| {
        c.elasticsearch.user = Some(v.text());
        Ok(())
    }),
    var(
        "ELASTICSEARCH_PASSWORD",
        "",
        "basic auth password",
        |c, v| {
            c.elasticsearch.password = Some(v.text());
            Ok(())
        },
    ),
    var(
        "ELASTICSEARCH_API_KEY",
        "",
        "API key (`encoded` or `id:api_key`)",
        |c, v| {
            c.elasticsearch.api_key = Some(v.text());
            Ok(())
        },
    ),
    var(
        "ELASTICSEARCH_CA_FILE",
        "",
        "PEM certificate to trust for `https://`",
        |c, v| {
            c.elasticsearch.ca_file = Some(v.text());
            Ok(())
        },
    ),
    var(
        "REDIS_CA_FILE",
        "",
        "PEM certificates to trust for `rediss://`",
        |c, v| {
            c.redis.ca_file = Some(v.text());
            Ok(())
        },
    ),
    EnvVar {
        name: API_KEYS,
        setting: "",
        doc: "`tenant:key,…` (or `tenant:sha256:<hex>`)",
        set: None,
    },
    var(
        "API_KEYS_FILE",
        "auth.keys_file",
        "file of `tenant:key` lines",
        |c, v| {
            c.auth.keys_file = v.text();
            Ok(())
        },
    ),
    var(
        "DEV_MODE",
        "auth.dev_mode",
        "without keys, serve everybody as tenant `default`",
        |c, v| v.flag().map(|b| c.auth.dev_mode = b),
    ),
    var(
        "API_RATE_PER_SEC",
        "auth.rate_per_sec",
        "requests a second per key",
        |c, v| v.num().map(|n| c.auth.rate_per_sec = n),
    ),
    var(
        "API_BURST",
        "auth.burst",
        "requests at once per key",
        |c, v| v.num().map(|n| c.auth.burst = n),
    ),
    var(
        "METRICS_TOKEN",
        "",
        "bearer token `/metrics` wants, when set",
        |c, v| {
            c.auth.metrics_token = Some(v.text());
            Ok(())
        },
    ),
    var(
        "RECIPIENT_MAX",
        "limits.recipient_max",
        "messages to one number per tenant per window",
        |c, v| v.num().map(|n| c.limits.recipient_max = n),
    ),
    var(
        "RECIPIENT_WINDOW_SECS",
        "limits.recipient_window_secs",
        "that window",
        |c, v| v.num().map(|n| c.limits.recipient_window_secs = n),
    ),
    var(
        "EMAIL_MAX_CHARS",
        "limits.email_max_chars",
        "longest email body",
        |c, v| v.num().map(|n| c.limits.email_max_chars = n),
    ),
    var(
        "STALE_AFTER_MS",
        "sender.stale_after_ms",
        "how long a record's lease lasts",
        |c, v| v.millis().map(|d| c.sender.stale_after = d),
    ),
    var(
        "FAULT_INJECTION",
        "sender.fault_injection",
        "honour the test markers",
        |c, v| v.flag().map(|b| c.sender.fault_injection = b),
    ),
    var(
        "SWEEP_RECHECK_MS",
        "sweeper.recheck_ms",
        "a record not moving this long is queued again",
        |c, v| v.millis().map(|d| c.sweeper.recheck = d),
    ),
    var(
        "PROVIDER_TIMEOUT_MS",
        "providers.timeout_ms",
        "one provider call",
        |c, v| v.millis().map(|d| c.providers.timeout = d),
    ),
    var(
        "MAX_ATTEMPTS",
        "channels.*.max_attempts",
        "attempts before `failed`, every channel",
        |c, v| {
            let n = v.num()?;
            c.channels
                .all_mut()
                .into_iter()
                .for_each(|ch| ch.max_attempts = n);
            Ok(())
        },
    ),
    var(
        "BACKOFF_BASE_MS",
        "channels.*.backoff_base_ms",
        "first retry wait, every channel",
        |c, v| {
            let d = v.millis()?;
            c.channels
                .all_mut()
                .into_iter()
                .for_each(|ch| ch.backoff_base = d);
            Ok(())
        },
    ),
    var(
        "BREAKER_COOLDOWN_MS",
        "channels.*.breaker_cooldown_ms",
        "how long a breaker stays open",
        |c, v| {
            let d = v.millis()?;
            c.channels
                .all_mut()
                .into_iter()
                .for_each(|ch| ch.breaker_cooldown = d);
            Ok(())
        },
    ),
    var(
        "PROVIDER_RATE_PER_SEC",
        "channels.*.rate_per_sec",
        "sends a second, every channel",
        |c, v| {
            let n = v.num()?;
            c.channels
                .all_mut()
                .into_iter()
                .for_each(|ch| ch.rate_per_sec = n);
            Ok(())
        },
    ),
    var(
        "PROVIDER_BURST",
        "channels.*.burst",
        "sends at once, every channel",
        |c, v| {
            let n = v.num()?;
            c.channels.all_mut().into_iter().for_each(|ch| ch.burst = n);
            Ok(())
        },
    ),
    var(
        "PUBLIC_BASE_URL",
        "callbacks.public_base_url",
        "how providers reach this service",
        |c, v| {
            c.callbacks.public_base_url = v.text();
            Ok(())
        },
    ),
    var(
        "WHATSAPP_APP_SECRET",
        "",
        "WhatsApp webhook signature secret",
        |c, v| {
            c.callbacks.whatsapp_app_secret = v.text();
            Ok(())
        },
    ),
    var(
        "WHATSAPP_VERIFY_TOKEN",
        "",
        "WhatsApp webhook verification token",
        |c, v| {
            c.callbacks.whatsapp_verify_token = v.text();
            Ok(())
        },
    ),
    var(
        "TWILIO_API_BASE",
        "providers.sms.api_base",
        "Twilio API",
        |c, v| {
            c.providers.sms.api_base = v.text();
            Ok(())
        },
    ),
    var(
        "ACCOUNTSID",
        "providers.sms.account_sid",
        "Twilio Account SID",
        |c, v| {
            c.providers.sms.account_sid = v.text();
            Ok(())
        },
    ),
    var("AUTHTOKEN", "", "Twilio auth token", |c, v| {
        c.providers.sms.auth_token = v.text();
        Ok(())
    }),
    var(
        "MSG_ID",
        "providers.sms.messaging_service_sid",
        "Twilio Messaging Service SID",
        |c, v| {
            c.providers.sms.messaging_service_sid = v.text();
            Ok(())
        },
    ),
    var(
        "WHATSAPP_API_BASE",
        "providers.whatsapp.api_base",
        "Cloud API base, with version",
        |c, v| {
            c.providers.whatsapp.api_base = v.text();
            Ok(())
        },
    ),
    var(
        "WHATSAPP_PHONE_NUMBER_ID",
        "providers.whatsapp.phone_number_id",
        "sender phone number id",
        |c, v| {
            c.providers.whatsapp.phone_number_id = v.text();
            Ok(())
        },
    ),
    var("WHATSAPP_TOKEN", "", "WhatsApp access token", |c, v| {
        c.providers.whatsapp.token = v.text();
        Ok(())
    }),
    var(
        "SMTP_URL",
        "providers.email.smtp_url",
        "SMTP server, credentials in the URL",
        |c, v| {
            c.providers.email.smtp_url = v.text();
            Ok(())
        },
    ),
    var(
        "EMAIL_DEFAULT_SUBJECT",
        "providers.email.default_subject",
        "subject when the request has none",
        |c, v| {
            c.providers.email.default_subject = v.text();
            Ok(())
        },
    ),
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
    for var in &ENV {
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
