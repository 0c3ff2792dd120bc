//! `[provider_limits.<name>]`: a provider's own rate limit and circuit breaker, each key
//! falling back to the channel's (`[channels.<channel>]`). Names are the `[routing]` names
//! (`twilio`, `vonage`, `meta`, `smtp`, `sendgrid`). A provider that serves two channels
//! (Twilio: SMS and WhatsApp) has a breaker and a bucket per channel, as each channel's
//! sender runs its own; its table applies to both, and a sub-table named after a channel
//! (`[provider_limits.twilio.whatsapp]`) overrides it for that channel alone.

use super::{bad, ChannelSettings, Config, ConfigError, Routing};
use actors::domain::Channel;
use actors::health::BreakerConfig;
use serde::Deserialize;
use std::time::Duration;

/// One provider's settings; `None`: the channel's.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderLimits {
    pub rate_per_sec: Option<f64>,
    pub burst: Option<f64>,
    pub breaker_consecutive_failures: Option<u32>,
    pub breaker_failure_ratio: Option<f64>,
    pub breaker_window: Option<usize>,
    pub breaker_min_calls: Option<usize>,
    pub breaker_cooldown_ms: Option<u64>,
    /// For one channel only, over the keys above.
    pub email: Option<Box<ProviderLimits>>,
    pub sms: Option<Box<ProviderLimits>>,
    pub whatsapp: Option<Box<ProviderLimits>>,
}

/// What a provider's breaker and token bucket are built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProviderSettings {
    pub breaker: BreakerConfig,
    pub rate_per_sec: f64,
    pub burst: f64,
}

impl ProviderLimits {
    fn for_channel(&self, ch: Channel) -> Option<&ProviderLimits> {
        match ch {
            Channel::Email => self.email.as_deref(),
            Channel::Sms => self.sms.as_deref(),
            Channel::Whatsapp => self.whatsapp.as_deref(),
        }
    }

    fn has_channel_tables(&self) -> bool {
        self.email.is_some() || self.sms.is_some() || self.whatsapp.is_some()
    }

    /// `base` with the keys this table sets.
    fn apply(&self, base: &mut ChannelSettings) {
        let set = |to: &mut f64, from: Option<f64>| *to = from.unwrap_or(*to);
        set(&mut base.rate_per_sec, self.rate_per_sec);
        set(&mut base.burst, self.burst);
        set(&mut base.breaker_failure_ratio, self.breaker_failure_ratio);
        if let Some(n) = self.breaker_consecutive_failures {
            base.breaker_consecutive_failures = n;
        }
        if let Some(n) = self.breaker_window {
            base.breaker_window = n;
        }
        if let Some(n) = self.breaker_min_calls {
            base.breaker_min_calls = n;
        }
        if let Some(ms) = self.breaker_cooldown_ms {
            base.breaker_cooldown = Duration::from_millis(ms);
        }
    }
}

/// The channel's settings with `limits`' keys over them, then its sub-table for `ch`.
fn resolve(
    base: &ChannelSettings,
    limits: Option<&ProviderLimits>,
    ch: Channel,
) -> ChannelSettings {
    let mut out = base.clone();
    if let Some(l) = limits {
        l.apply(&mut out);
        if let Some(own) = l.for_channel(ch) {
            own.apply(&mut out);
        }
    }
    out
}

impl Config {
    /// Provider `name`'s breaker and bucket settings on channel `ch`.
    pub fn provider_settings(&self, ch: Channel, name: &str) -> ProviderSettings {
        let s = resolve(self.channels.get(ch), self.provider_limits.get(name), ch);
        ProviderSettings {
            breaker: s.breaker(),
            rate_per_sec: s.rate_per_sec,
            burst: s.burst,
        }
    }
}

/// Each table names a known provider, a sub-table a channel it serves, and what they come
/// to on every channel is as usable as a channel's own settings.
pub(super) fn provider_limits_are_usable(c: &Config) -> Result<(), ConfigError> {
    for (name, limits) in &c.provider_limits {
        let serves: Vec<Channel> = Channel::ALL
            .into_iter()
            .filter(|&ch| Routing::known(ch).contains(&name.as_str()))
            .collect();
        if serves.is_empty() {
            return Err(bad(format!(
                "provider_limits.{name}: not a provider (twilio, vonage, meta, smtp, sendgrid)"
            )));
        }
        for ch in Channel::ALL {
            let Some(own) = limits.for_channel(ch) else {
                continue;
            };
            if !serves.contains(&ch) || own.has_channel_tables() {
                return Err(bad(format!(
                    "provider_limits.{name}.{}: {name} serves no such channel, or the table nests another",
                    ch.as_str()
                )));
            }
        }
        for ch in serves {
            let s = resolve(c.channels.get(ch), Some(limits), ch);
            super::checks::channel_is_usable(&format!("provider_limits.{name}"), &s)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, CREDS};
    use super::*;

    fn with(table: &str) -> Result<Config, ConfigError> {
        let mut cfg = load(&CREDS).unwrap();
        cfg.provider_limits = toml::from_str(table).unwrap();
        provider_limits_are_usable(&cfg).map(|_| cfg)
    }

    /// Each key falls back to the channel's; a channel's sub-table wins over the
    /// provider's table, on that channel only.
    #[test]
    fn provider_settings_fall_back_to_the_channel_key_by_key() {
        let c = with(
            "[vonage]\nbreaker_consecutive_failures = 2\nrate_per_sec = 3.5\n\
             [twilio]\nburst = 7.0\n[twilio.whatsapp]\nburst = 9.0\nbreaker_cooldown_ms = 500\n",
        )
        .unwrap();
        let sms = c.channels.get(Channel::Sms);
        let vonage = c.provider_settings(Channel::Sms, "vonage");
        assert_eq!(vonage.breaker.consecutive_failures, 2);
        assert_eq!(vonage.rate_per_sec, 3.5);
        assert_eq!(vonage.burst, sms.burst, "burst: the channel's");
        assert_eq!(vonage.breaker.cooldown, sms.breaker_cooldown);
        assert_eq!(vonage.breaker.window, sms.breaker_window);
        let twilio_sms = c.provider_settings(Channel::Sms, "twilio");
        assert_eq!(twilio_sms.burst, 7.0);
        assert_eq!(twilio_sms.rate_per_sec, sms.rate_per_sec);
        assert_eq!(twilio_sms.breaker, sms.breaker());
        let wa = c.channels.get(Channel::Whatsapp);
        let twilio_wa = c.provider_settings(Channel::Whatsapp, "twilio");
        assert_eq!(twilio_wa.burst, 9.0);
        assert_eq!(twilio_wa.breaker.cooldown, Duration::from_millis(500));
        assert_eq!(twilio_wa.rate_per_sec, wa.rate_per_sec);
        // No table: the channel's, whole.
        let meta = c.provider_settings(Channel::Whatsapp, "meta");
        assert_eq!(
            (meta.breaker, meta.rate_per_sec, meta.burst),
            (wa.breaker(), wa.rate_per_sec, wa.burst)
        );
    }

    #[test]
    fn bad_provider_limits_name_their_table() {
        for (table, named) in [
            ("[nexmo]\nburst = 2.0\n", "provider_limits.nexmo"),
            (
                "[vonage.whatsapp]\nburst = 2.0\n",
                "provider_limits.vonage.whatsapp",
            ),
            (
                "[twilio.sms.sms]\nburst = 2.0\n",
                "provider_limits.twilio.sms",
            ),
            ("[vonage]\nburst = 0.5\n", "provider_limits.vonage"),
            (
                "[smtp]\nbreaker_failure_ratio = 1.5\n",
                "provider_limits.smtp",
            ),
            (
                "[meta]\nbreaker_consecutive_failures = 0\n",
                "provider_limits.meta",
            ),
        ] {
            let err = with(table).unwrap_err().to_string();
            assert!(err.contains(named), "{table}: {err}");
        }
    }

    /// The shipped config.toml has the table, empty: every provider takes its channel's.
    #[test]
    fn the_shipped_config_sets_no_provider_limits() {
        assert!(load(&CREDS).unwrap().provider_limits.is_empty());
    }
}
