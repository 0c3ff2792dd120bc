//! Start-up validations: one small function per rule, each error naming the variable or
//! setting to fix. They run in the order of [`RULES`]; the first failure stops start-up.

use super::{bad, ChannelSettings, Config, ConfigError, Routing};
use secrecy::ExposeSecret;

type Rule = fn(&Config) -> Result<(), ConfigError>;

const RULES: &[Rule] = &[
    urls_have_known_schemes,
    routes_name_known_providers,
    tenant_routes_name_channel_providers,
    provider_credentials_are_set,
    sendgrid_key_is_a_key,
    api_keys_or_dev_mode,
    api_rate_limit_is_usable,
    limits_are_usable,
    tenants_are_usable,
    log_format_is_known,
    claims_outlast_a_provider_call,
    redis_nodes_and_shards,
    leases_outlast_a_provider_call,
    counts_are_at_least_one,
    channels_are_usable,
    super::provider_limits::provider_limits_are_usable,
    callbacks_outwait_receipts,
    store_limiter_is_usable,
    consumers_are_forgotten_slowly,
    super::transport::transports_are_encrypted,
    super::transport::dev_mode_only_on_loopback,
    fault_injection_only_in_test_builds,
];

/// `FAULT_INJECTION` is a test switch: a build without the `fault-injection` feature (every
/// release build) has no code that honours the markers, and says so instead of starting as if
/// it had.
fn fault_injection_only_in_test_builds(c: &Config) -> Result<(), ConfigError> {
    if c.sender.fault_injection && !actors::FAULT_INJECTION_BUILT {
        return Err(bad(
            "FAULT_INJECTION=true (sender.fault_injection): this build has no fault injection; it is compiled only into test builds (the actors crate's `fault-injection` feature)".to_string(),
        ));
    }
    Ok(())
}

fn store_limiter_is_usable(c: &Config) -> Result<(), ConfigError> {
    c.store_limiter.settings().map(|_| ())
}

fn callbacks_outwait_receipts(c: &Config) -> Result<(), ConfigError> {
    if c.receipts.apply_timeout <= c.receipts.wait_for_record {
        return Err(bad(
            "receipts.apply_timeout_ms must exceed receipts.wait_for_record_ms".to_string(),
        ));
    }
    Ok(())
}

/// A live LogIndexer marks itself alive four times within this; shorter would be a mark
/// a second, and a consumer forgotten at every pause.
fn consumers_are_forgotten_slowly(c: &Config) -> Result<(), ConfigError> {
    if c.log_indexer.forget_consumer < std::time::Duration::from_secs(1) {
        return Err(bad(
            "FORGET_CONSUMER_MS (log_indexer.forget_consumer_ms) must be at least 1000".to_string(),
        ));
    }
    Ok(())
}

pub(super) fn run(cfg: &Config) -> Result<(), ConfigError> {
    RULES.iter().try_for_each(|rule| rule(cfg))
}

/// `v` is shown with its credentials replaced ([`super::redact::url`]).
fn url(name: &str, v: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let shown = super::redact::url(v);
    let u = url::Url::parse(v).map_err(|e| bad(format!("{name}={shown:?} is not a URL: {e}")))?;
    if !schemes.contains(&u.scheme()) {
        return Err(bad(format!(
            "{name}={shown:?}: scheme must be one of {schemes:?}"
        )));
    }
    Ok(())
}

fn urls_have_known_schemes(c: &Config) -> Result<(), ConfigError> {
    const WEB: &[&str] = &["http", "https"];
    url(
        "MONGODB_URL",
        c.mongodb.url.expose(),
        &["mongodb", "mongodb+srv"],
    )?;
    for u in c.redis.urls() {
        url("REDIS_URL", u, &["redis", "rediss", "redis+unix", "unix"])?;
    }
    url("ELASTICSEARCH_NODE", &c.elasticsearch.node, WEB)?;
    url("TWILIO_API_BASE", &c.providers.sms.api_base, WEB)?;
    url("WHATSAPP_API_BASE", &c.providers.whatsapp.api_base, WEB)?;
    url("VONAGE_API_BASE", &c.providers.vonage.api_base, WEB)?;
    url("SENDGRID_API_BASE", &c.providers.sendgrid.api_base, WEB)?;
    url(
        "SMTP_URL",
        c.providers.email.smtp_url.expose(),
        &["smtp", "smtps"],
    )?;
    if !c.callbacks.public_base_url.is_empty() {
        url("PUBLIC_BASE_URL", &c.callbacks.public_base_url, WEB)?;
    }
    Ok(())
}

/// Each channel names at least one provider, each one it knows, none twice; its strategy
/// is `failover` or `weighted`; weights are whole numbers up to 1000, given only under
/// `weighted`, and not all 0.
fn routes_name_known_providers(c: &Config) -> Result<(), ConfigError> {
    for ch in actors::domain::Channel::ALL {
        let upper = ch.as_str().to_uppercase();
        let var = format!("{upper}_PROVIDERS");
        let names = c.routing.names(ch);
        if names.is_empty() {
            return Err(bad(format!(
                "{var} (routing.{}) names no provider",
                ch.as_str()
            )));
        }
        for (i, p) in names.iter().enumerate() {
            if !Routing::known(ch).contains(p) {
                return Err(bad(format!(
                    "{var}: {p:?} is not a {} provider; one of {:?}",
                    ch.as_str(),
                    Routing::known(ch)
                )));
            }
            if names[..i].contains(p) {
                return Err(bad(format!("{var}: {p:?} is named twice")));
            }
        }
        route_weights_are_usable(c, ch, &var)?;
    }
    Ok(())
}

/// A tenant's own provider order names providers of the channel's `[routing]` list (each
/// has its breaker and bucket there), each once, at least one.
fn tenant_routes_name_channel_providers(c: &Config) -> Result<(), ConfigError> {
    for (tenant, t) in &c.tenants.tables {
        for ch in actors::domain::Channel::ALL {
            let Some(list) = t.providers.get(ch) else {
                continue;
            };
            let at = format!("TENANTS_FILE: [{tenant}] providers.{}", ch.as_str());
            let routed = c.routing.names(ch);
            if list.is_empty() {
                return Err(bad(format!("{at} names no provider")));
            }
            for (i, p) in list.iter().enumerate() {
                if !routed.contains(&p.as_str()) {
                    return Err(bad(format!(
                        "{at}: {p:?} is not among the channel's providers {routed:?} ({}_PROVIDERS)",
                        ch.as_str().to_uppercase()
                    )));
                }
                if list[..i].contains(p) {
                    return Err(bad(format!("{at}: {p:?} is named twice")));
                }
            }
        }
    }
    Ok(())
}

/// One channel's strategy and weights (see [`routes_name_known_providers`]).
fn route_weights_are_usable(
    c: &Config,
    ch: actors::domain::Channel,
    var: &str,
) -> Result<(), ConfigError> {
    let upper = ch.as_str().to_uppercase();
    let strategy = c.routing.strategy_name(ch);
    let weighted = match actors::routing::Strategy::parse(strategy.trim()) {
        Some(s) => s == actors::routing::Strategy::Weighted,
        None => {
            return Err(bad(format!(
                "{upper}_ROUTING (routing.{}_strategy) is {strategy:?}: one of \"failover\", \"weighted\"",
                ch.as_str()
            )))
        }
    };
    for entry in c.routing.of(ch) {
        let (name, weight) = super::route_entry(entry);
        let Some(w) = weight else { continue };
        if !weighted {
            return Err(bad(format!(
                "{var}: {entry:?} gives {name} a weight, but weights need {upper}_ROUTING=weighted"
            )));
        }
        if !w.parse::<u32>().is_ok_and(|w| w <= 1000) {
            return Err(bad(format!(
                "{var}: the weight of {name} in {entry:?} must be a whole number from 0 to 1000"
            )));
        }
    }
    if weighted && c.routing.weights(ch).iter().all(|w| *w == 0) {
        return Err(bad(format!(
            "{var}: every weight is 0; give one provider a weight"
        )));
    }
    Ok(())
}

/// `SENDGRID_WEBHOOK_PUBLIC_KEY`, when set, is a key events can be checked with.
fn sendgrid_key_is_a_key(c: &Config) -> Result<(), ConfigError> {
    let key = &c.providers.sendgrid.webhook_public_key;
    if key.is_empty() {
        return Ok(());
    }
    crate::http::callbacks::sendgrid::public_key(key)
        .map(drop)
        .map_err(|e| bad(e.to_string()))
}

/// The credentials of every provider a channel routes through.
fn provider_credentials_are_set(c: &Config) -> Result<(), ConfigError> {
    let p = &c.providers;
    let r = &c.routing;
    let twilio = r.uses("twilio");
    let meta = r.names(actors::domain::Channel::Whatsapp).contains(&"meta");
    let needed: [(bool, &str, &str, &str); 7] = [
        (
            twilio,
            "ACCOUNTSID",
            &p.sms.account_sid,
            "the Twilio Account SID (starts with AC)",
        ),
        (
            twilio,
            "AUTHTOKEN",
            p.sms.auth_token.expose_secret(),
            "the Twilio auth token",
        ),
        (
            meta,
            "WHATSAPP_PHONE_NUMBER_ID",
            &p.whatsapp.phone_number_id,
            "the WhatsApp Business phone number id",
        ),
        (
            meta,
            "WHATSAPP_TOKEN",
            p.whatsapp.token.expose_secret(),
            "the WhatsApp Cloud API access token",
        ),
        (
            r.uses("vonage"),
            "VONAGE_API_KEY",
            &p.vonage.api_key,
            "the Vonage API key",
        ),
        (
            r.uses("vonage"),
            "VONAGE_API_SECRET",
            p.vonage.api_secret.expose_secret(),
            "the Vonage API secret",
        ),
        (
            r.uses("sendgrid"),
            "SENDGRID_API_KEY",
            p.sendgrid.api_key.expose_secret(),
            "the SendGrid API key",
        ),
    ];
    for (used, name, v, why) in needed {
        if used && v.trim().is_empty() {
            return Err(bad(format!("{name} is not set: {why}")));
        }
    }
    Ok(())
}

fn api_keys_or_dev_mode(c: &Config) -> Result<(), ConfigError> {
    if c.auth.keys.is_empty() && !c.auth.dev_mode {
        return Err(bad(
            "no API keys configured: set API_KEYS=tenant:key,... or auth.keys_file \
             (API_KEYS_FILE); or, for local development only, DEV_MODE=true",
        ));
    }
    Ok(())
}

fn api_rate_limit_is_usable(c: &Config) -> Result<(), ConfigError> {
    if !(c.auth.rate_per_sec > 0.0 && c.auth.burst >= 1.0) {
        return Err(bad("auth.rate_per_sec must be > 0 and auth.burst >= 1"));
    }
    Ok(())
}

/// The defaults are valid, and every table of the tenants file names a tenant that has a
/// key (a misspelt name would leave the real tenant on the defaults unnoticed); in
/// `DEV_MODE`, where there are no keys, tables are not checked against them.
fn tenants_are_usable(c: &Config) -> Result<(), ConfigError> {
    let t = &c.tenants;
    crate::tenants::validate_countries("tenants.countries / DESTINATION_COUNTRIES", &t.countries)
        .map_err(|e| bad(e.to_string()))?;
    let from = crate::tenants::TenantSettings {
        default_from: crate::tenants::PerChannel {
            email: Some(t.default_from.email.clone()).filter(|s| !s.is_empty()),
            sms: Some(t.default_from.sms.clone()).filter(|s| !s.is_empty()),
            whatsapp: Some(t.default_from.whatsapp.clone()).filter(|s| !s.is_empty()),
        },
        ..Default::default()
    };
    crate::tenants::validate("tenants (EMAIL_FROM, SMS_FROM, WHATSAPP_FROM)", &from)
        .map_err(|e| bad(e.to_string()))?;
    let dev = c.auth.dev_mode && c.auth.keys.is_empty();
    for name in t.tables.keys() {
        if !dev && !c.auth.keys.iter().any(|k| &k.tenant == name) {
            return Err(bad(format!(
                "TENANTS_FILE: [{name}] names no tenant of API_KEYS / API_KEYS_FILE"
            )));
        }
    }
    if t.check_timeout.is_zero() {
        return Err(bad("tenants.check_timeout_ms must be at least 1"));
    }
    Ok(())
}

fn limits_are_usable(c: &Config) -> Result<(), ConfigError> {
    if c.limits.recipient_max > 0 && c.limits.recipient_window_secs == 0 {
        return Err(bad("limits.recipient_window_secs must be at least 1"));
    }
    if c.limits.email_max_chars == 0 {
        return Err(bad("limits.email_max_chars must be at least 1"));
    }
    if c.router.accept_deadline.is_zero() {
        return Err(bad(
            "ACCEPT_DEADLINE_MS (router.accept_deadline_ms) must be at least 1",
        ));
    }
    Ok(())
}

fn log_format_is_known(c: &Config) -> Result<(), ConfigError> {
    if !["text", "json"].contains(&c.server.log_format.as_str()) {
        return Err(bad(format!(
            "LOG_FORMAT={:?}: must be \"text\" or \"json\"",
            c.server.log_format
        )));
    }
    Ok(())
}

/// Several nodes are a cluster's seeds; shards are few enough to read each.
fn redis_nodes_and_shards(c: &Config) -> Result<(), ConfigError> {
    if c.redis.urls().len() > 1 && !c.redis.cluster {
        return Err(bad(format!(
            "REDIS_URL lists {} nodes: several nodes are a Redis Cluster's seeds; set REDIS_CLUSTER=true (redis.cluster)",
            c.redis.urls().len()
        )));
    }
    if !(1..=MAX_STREAM_SHARDS).contains(&c.redis.stream_shards) {
        return Err(bad(format!(
            "REDIS_STREAM_SHARDS={} (redis.stream_shards) must be 1 to {MAX_STREAM_SHARDS}: each shard has a reader per channel",
            c.redis.stream_shards
        )));
    }
    Ok(())
}

/// Each shard has its own reader (and connection) per channel.
const MAX_STREAM_SHARDS: u32 = 64;

/// A consumer that took over entries still being sent would send them twice.
fn claims_outlast_a_provider_call(c: &Config) -> Result<(), ConfigError> {
    if c.redis.claim_idle <= c.providers.timeout {
        return Err(bad(format!(
            "redis.claim_idle_ms ({}) must be longer than providers.timeout_ms ({}), or live sends get taken over",
            c.redis.claim_idle.as_millis(),
            c.providers.timeout.as_millis()
        )));
    }
    Ok(())
}

fn leases_outlast_a_provider_call(c: &Config) -> Result<(), ConfigError> {
    if c.sender.stale_after <= c.providers.timeout {
        return Err(bad(format!(
            "sender.stale_after_ms ({}) must be longer than providers.timeout_ms ({})",
            c.sender.stale_after.as_millis(),
            c.providers.timeout.as_millis()
        )));
    }
    Ok(())
}

fn counts_are_at_least_one(c: &Config) -> Result<(), ConfigError> {
    for (name, v) in [
        ("router.batch_max", c.router.batch_max),
        ("server.max_connections", c.server.max_connections),
        ("router.max_pending", c.router.max_pending),
        ("receipts.batch_max", c.receipts.batch_max),
        ("reconciler.batch", c.reconciler.batch),
        ("redis.read_count", c.redis.read_count),
        ("redis.bulk_batch", c.redis.bulk_batch),
        ("redis.lane_window_batches", c.redis.lane_window_batches),
        ("log_indexer.max_docs", c.log_indexer.max_docs),
        (
            "log_indexer.max_stream_len",
            c.log_indexer.max_stream_len as usize,
        ),
        ("sweeper.batch", c.sweeper.batch),
        ("redis.max_deliveries", c.redis.max_deliveries as usize),
        ("audit.batch_max", c.audit.batch_max),
        ("audit.max_buffered", c.audit.max_buffered),
        ("schedule.batch", c.schedule.batch),
        ("schedule.horizon_days", c.schedule.horizon_days as usize),
    ] {
        if v == 0 {
            return Err(bad(format!("{name} must be at least 1")));
        }
    }
    Ok(())
}

fn channels_are_usable(c: &Config) -> Result<(), ConfigError> {
    c.channels
        .all()
        .into_iter()
        .try_for_each(|(name, ch)| channel_is_usable(&format!("channels.{name}"), ch))
}

/// `name`: the table the settings come from, for the message.
pub(super) fn channel_is_usable(name: &str, ch: &ChannelSettings) -> Result<(), ConfigError> {
    if ch.concurrency == 0 || ch.max_attempts == 0 || ch.breaker_consecutive_failures == 0 {
        return Err(bad(format!(
            "{name}: concurrency, max_attempts and breaker_consecutive_failures must be at least 1"
        )));
    }
    if !(ch.rate_per_sec > 0.0 && ch.burst >= 1.0) {
        return Err(bad(format!(
            "{name}: rate_per_sec must be > 0 and burst >= 1"
        )));
    }
    if !(ch.breaker_failure_ratio > 0.0 && ch.breaker_failure_ratio <= 1.0) {
        return Err(bad(format!(
            "{name}.breaker_failure_ratio must be in (0, 1]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, CREDS};

    fn error_with(extra: &[(&'static str, &'static str)]) -> String {
        let mut v = CREDS.to_vec();
        v.extend_from_slice(extra);
        load(&v).unwrap_err().to_string()
    }

    #[test]
    fn each_rule_names_its_setting() {
        for (vars, names) in [
            (&[("LOG_FORMAT", "xml")][..], "LOG_FORMAT"),
            (&[("CLAIM_IDLE_MS", "10000")][..], "redis.claim_idle_ms"),
            (&[("STALE_AFTER_MS", "10")][..], "sender.stale_after_ms"),
            (&[("MAX_DELIVERIES", "0")][..], "redis.max_deliveries"),
            (&[("PROVIDER_BURST", "0.5")][..], "channels.email"),
            (&[("API_BURST", "0")][..], "auth.burst"),
            (&[("EMAIL_MAX_CHARS", "0")][..], "limits.email_max_chars"),
            (
                &[("STORE_LIMITER_MIN", "0")][..],
                "store_limiter: min_limit",
            ),
            (
                &[("STORE_LIMITER_TARGET_MS", "0")][..],
                "store_limiter: target_ms",
            ),
            (&[("SMTP_URL", "http://x")][..], "SMTP_URL"),
            (
                &[("REDIS_URL", "redis://127.0.0.1:7000,redis://127.0.0.1:7001")][..],
                "REDIS_CLUSTER=true",
            ),
            (&[("REDIS_STREAM_SHARDS", "0")][..], "REDIS_STREAM_SHARDS"),
            // Each seed node is checked for an unencrypted link off this host.
            (
                &[
                    ("REDIS_CLUSTER", "true"),
                    (
                        "REDIS_URL",
                        "redis://cache.example:7000,redis://127.0.0.1:7001",
                    ),
                ][..],
                "REDIS_URL: plain redis:// to cache.example",
            ),
            (
                &[
                    ("REDIS_CLUSTER", "true"),
                    (
                        "REDIS_URL",
                        "redis://127.0.0.1:7000,redis://cache.example:7001",
                    ),
                ][..],
                "REDIS_URL: plain redis:// to cache.example",
            ),
            (
                &[
                    ("REDIS_CLUSTER", "true"),
                    ("REDIS_URL", "redis://127.0.0.1:7000,http://127.0.0.1:7001"),
                ][..],
                "REDIS_URL",
            ),
        ] {
            let err = error_with(vars);
            assert!(err.contains(names), "{vars:?}: {err}");
        }
    }
}
