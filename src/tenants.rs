//! Tenants: whom each may send as, where to, and how much.
//!
//! The settings every tenant gets are `[tenants]` in `config.toml` (and the variables that
//! override them); the file named by `tenants.file` / `TENANTS_FILE` holds one TOML table
//! per tenant that needs more (its own senders) or other limits:
//!
//! ```toml
//! [acme]
//! numbers = ["+15550001111"]                 # SMS and WhatsApp `from`
//! sender_ids = ["ACME"]                      # SMS alphanumeric sender ids
//! email_domains = ["acme.com"]               # any address at these domains
//! email_addresses = ["alerts@acme.io"]
//! messaging_service_sid = "MG0123456789abcdef0123456789abcdef"
//! default_from = { sms = "ACME", email = "noreply@acme.com" }
//! countries = ["+1", "+44"]                  # where SMS/WhatsApp may go (E.164 prefixes)
//! daily_quota = { sms = 5000 }
//! recipients_per_hour = 500
//! rate_per_sec = 20.0
//! burst = 40.0
//! providers = { sms = ["vonage", "twilio"] } # its own provider order (see README, Routing)
//! ```
//!
//! The checks here are pure (no I/O): whether a `from` is the tenant's, the `from` to use
//! when a request leaves it out, whether a destination is in an allowed country. The
//! counters (rate, quotas, distinct recipients) are in Redis: `limits.rs`.

use actors::domain::{is_e164, is_email_address, Channel};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

/// One value per channel, as `{ email = …, sms = …, whatsapp = … }`. With `T = Option<_>`
/// every field may be left out.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerChannel<T> {
    pub email: T,
    pub sms: T,
    pub whatsapp: T,
}

impl<T> PerChannel<T> {
    pub fn get(&self, ch: Channel) -> &T {
        match ch {
            Channel::Email => &self.email,
            Channel::Sms => &self.sms,
            Channel::Whatsapp => &self.whatsapp,
        }
    }
}

/// One tenant's table in the tenants file; what it leaves out comes from `[tenants]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    #[serde(default)]
    pub numbers: Vec<String>,
    #[serde(default)]
    pub sender_ids: Vec<String>,
    #[serde(default)]
    pub email_domains: Vec<String>,
    #[serde(default)]
    pub email_addresses: Vec<String>,
    pub messaging_service_sid: Option<String>,
    #[serde(default)]
    pub default_from: PerChannel<Option<String>>,
    pub countries: Option<Vec<String>>,
    #[serde(default)]
    pub daily_quota: PerChannel<Option<u64>>,
    pub recipients_per_hour: Option<u64>,
    pub rate_per_sec: Option<f64>,
    pub burst: Option<f64>,
    /// The tenant's own order of a channel's providers (names of the channel's
    /// `[routing]` list, failed over in this order); a channel left out goes by `[routing]`.
    #[serde(default)]
    pub providers: PerChannel<Option<Vec<String>>>,
}

impl TenantSettings {
    /// Whether the table names any sender of the tenant's own.
    fn has_senders(&self) -> bool {
        !(self.numbers.is_empty()
            && self.sender_ids.is_empty()
            && self.email_domains.is_empty()
            && self.email_addresses.is_empty()
            && self.messaging_service_sid.is_none()
            && self.default_from == PerChannel::default())
    }
}

/// What every tenant gets unless its table says otherwise (`[tenants]`).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub countries: Vec<String>,
    pub daily_quota: PerChannel<u64>,
    pub recipients_per_hour: u64,
    pub rate_per_sec: f64,
    pub burst: f64,
    /// The service's own senders: what a tenant without senders of its own may use.
    pub default_from: PerChannel<String>,
    /// `DEV_MODE`: a tenant without senders of its own may send as anyone.
    pub dev_mode: bool,
}

/// A tenant configuration that cannot be used; the message names the tenant and setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {what}")]
pub struct TenantError {
    pub at: String,
    pub what: String,
}

fn fail(at: &str, what: impl Into<String>) -> TenantError {
    TenantError {
        at: at.to_string(),
        what: what.into(),
    }
}

/// A Twilio Messaging Service SID: `MG` and 32 hexadecimal digits.
pub fn is_messaging_service_sid(s: &str) -> bool {
    s.len() == 34 && s.starts_with("MG") && s.bytes().skip(2).all(|b| b.is_ascii_hexdigit())
}

/// An alphanumeric sender id: 1-11 letters, digits or spaces, at least one letter (what
/// carriers display in place of a number).
fn is_sender_id(s: &str) -> bool {
    (1..=11).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ')
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

/// `+` and 1-15 digits, no leading 0; `*` means every country.
fn is_country_prefix(s: &str) -> bool {
    s == "*" || is_e164(s)
}

fn is_domain(s: &str) -> bool {
    is_email_address(&format!("x@{s}"))
}

/// Every entry of `list` passes `ok`, or the error names the first that does not.
fn each(at: &str, name: &str, list: &[String], ok: fn(&str) -> bool) -> Result<(), TenantError> {
    match list.iter().find(|v| !ok(v)) {
        Some(v) => Err(fail(at, format!("{name}: {v:?} is not valid"))),
        None => Ok(()),
    }
}

fn check_defaults_from(at: &str, from: &PerChannel<Option<String>>) -> Result<(), TenantError> {
    let phone = |s: &str| is_e164(s) || is_sender_id(s) || is_messaging_service_sid(s);
    let rows = [
        (
            "default_from.email",
            &from.email,
            is_email_address as fn(&str) -> bool,
        ),
        ("default_from.sms", &from.sms, phone),
        ("default_from.whatsapp", &from.whatsapp, is_e164),
    ];
    for (name, value, ok) in rows {
        if let Some(v) = value {
            each(at, name, std::slice::from_ref(v), ok)?;
        }
    }
    Ok(())
}

/// Every value of a tenant's table, checked; `at` names the table.
pub fn validate(at: &str, t: &TenantSettings) -> Result<(), TenantError> {
    each(at, "numbers", &t.numbers, is_e164)?;
    each(at, "sender_ids", &t.sender_ids, is_sender_id)?;
    each(at, "email_domains", &t.email_domains, is_domain)?;
    each(at, "email_addresses", &t.email_addresses, is_email_address)?;
    if let Some(sid) = &t.messaging_service_sid {
        each(
            at,
            "messaging_service_sid",
            std::slice::from_ref(sid),
            is_messaging_service_sid,
        )?;
    }
    check_defaults_from(at, &t.default_from)?;
    if let Some(c) = &t.countries {
        each(at, "countries", c, is_country_prefix)?;
    }
    let rate_ok = t.rate_per_sec.is_none_or(|r| r > 0.0) && t.burst.is_none_or(|b| b >= 1.0);
    if !rate_ok {
        return Err(fail(
            at,
            "rate_per_sec must be above 0 and burst at least 1",
        ));
    }
    Ok(())
}

/// The default countries (`[tenants] countries`), checked.
pub fn validate_countries(at: &str, list: &[String]) -> Result<(), TenantError> {
    each(at, "countries", list, is_country_prefix)
}

/// Parse the tenants file: one table per tenant, each checked.
pub fn parse_file(name: &str, text: &str) -> Result<HashMap<String, TenantSettings>, TenantError> {
    let tables: HashMap<String, TenantSettings> =
        toml::from_str(text).map_err(|e| fail(name, e.to_string()))?;
    for (tenant, t) in &tables {
        validate(&format!("{name} [{tenant}]"), t)?;
    }
    Ok(tables)
}

/// Who a tenant may send as.
#[derive(Debug, Clone, PartialEq)]
enum Senders {
    /// `DEV_MODE`, for a tenant without senders of its own.
    Anyone,
    /// Exact values, compared as stored (numbers, a Messaging Service SID) or without
    /// regard to ASCII case (sender ids, email addresses and domains, lower-cased here).
    Listed {
        numbers: Vec<String>,
        sender_ids: Vec<String>,
        email_domains: Vec<String>,
        email_addresses: Vec<String>,
        messaging_service_sid: Option<String>,
    },
}

/// One tenant's resolved settings: everything a request of its keys is checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPolicy {
    senders: Senders,
    default_from: PerChannel<Option<String>>,
    /// E.164 prefixes SMS and WhatsApp may go to; `*` is every country.
    countries: Vec<String>,
    /// Messages a UTC day per channel; 0: no quota.
    pub daily_quota: PerChannel<u64>,
    /// Distinct SMS/WhatsApp numbers an hour; 0: no limit.
    pub recipients_per_hour: u64,
    pub rate_per_sec: f64,
    pub burst: f64,
}

fn lower(list: &[String]) -> Vec<String> {
    list.iter().map(|s| s.to_ascii_lowercase()).collect()
}

fn some_nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl TenantPolicy {
    /// A tenant's policy: its table (if any) over the defaults.
    pub fn resolve(t: Option<&TenantSettings>, d: &Defaults) -> TenantPolicy {
        let empty = TenantSettings::default();
        let t = t.unwrap_or(&empty);
        let own = t.has_senders();
        let service_from = PerChannel {
            email: some_nonempty(&d.default_from.email),
            sms: some_nonempty(&d.default_from.sms),
            whatsapp: some_nonempty(&d.default_from.whatsapp),
        };
        let senders = if !own && d.dev_mode {
            Senders::Anyone
        } else {
            Senders::Listed {
                numbers: t.numbers.clone(),
                sender_ids: lower(&t.sender_ids),
                email_domains: lower(&t.email_domains),
                email_addresses: lower(&t.email_addresses),
                messaging_service_sid: t.messaging_service_sid.clone(),
            }
        };
        let q = &t.daily_quota;
        TenantPolicy {
            senders,
            default_from: if own {
                t.default_from.clone()
            } else {
                service_from
            },
            countries: t.countries.clone().unwrap_or_else(|| d.countries.clone()),
            daily_quota: PerChannel {
                email: q.email.unwrap_or(d.daily_quota.email),
                sms: q.sms.unwrap_or(d.daily_quota.sms),
                whatsapp: q.whatsapp.unwrap_or(d.daily_quota.whatsapp),
            },
            recipients_per_hour: t.recipients_per_hour.unwrap_or(d.recipients_per_hour),
            rate_per_sec: t.rate_per_sec.unwrap_or(d.rate_per_sec),
            burst: t.burst.unwrap_or(d.burst),
        }
    }

    /// The `from` used when a request leaves it out.
    pub fn default_from(&self, ch: Channel) -> Option<&str> {
        self.default_from.get(ch).as_deref()
    }

    /// Whether this tenant may send as `from` on `ch` (`from` already validated for the
    /// channel). Its default senders are always its own.
    pub fn may_send_as(&self, ch: Channel, from: &str) -> bool {
        if self.default_from(ch) == Some(from) {
            return true;
        }
        let Senders::Listed {
            numbers,
            sender_ids,
            email_domains,
            email_addresses,
            messaging_service_sid,
        } = &self.senders
        else {
            return true;
        };
        match ch {
            Channel::Email => {
                let from = from.to_ascii_lowercase();
                let domain = from.rsplit_once('@').map_or("", |(_, d)| d);
                email_addresses.contains(&from) || email_domains.iter().any(|d| d == domain)
            }
            Channel::Whatsapp => numbers.iter().any(|n| n == from),
            Channel::Sms if is_e164(from) => numbers.iter().any(|n| n == from),
            Channel::Sms if is_messaging_service_sid(from) => {
                messaging_service_sid.as_deref() == Some(from)
            }
            Channel::Sms => sender_ids.contains(&from.to_ascii_lowercase()),
        }
    }

    /// Whether `number` is among this tenant's own `numbers`.
    fn owns_number(&self, number: &str) -> bool {
        matches!(&self.senders, Senders::Listed { numbers, .. } if numbers.iter().any(|n| n == number))
    }

    /// Whether an SMS or WhatsApp message may go to `to` (E.164); email always may.
    pub fn may_send_to(&self, ch: Channel, to: &str) -> bool {
        ch == Channel::Email || self.countries.iter().any(|p| p == "*" || to.starts_with(p))
    }
}

/// Every tenant's policy, resolved once at start-up.
pub struct Tenants {
    by_name: HashMap<String, Arc<TenantPolicy>>,
    fallback: Arc<TenantPolicy>,
}

impl Tenants {
    pub fn new(tables: &HashMap<String, TenantSettings>, d: &Defaults) -> Tenants {
        Tenants {
            by_name: tables
                .iter()
                .map(|(n, t)| (n.clone(), Arc::new(TenantPolicy::resolve(Some(t), d))))
                .collect(),
            fallback: Arc::new(TenantPolicy::resolve(None, d)),
        }
    }

    pub fn policy(&self, tenant: &str) -> Arc<TenantPolicy> {
        self.by_name
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| self.fallback.clone())
    }

    /// The tenant whose sender `number` is (listed among its `numbers`); `None` if no
    /// tenant's table lists it.
    pub fn owner_of_number(&self, number: &str) -> Option<&str> {
        let mut owners: Vec<&String> = self
            .by_name
            .iter()
            .filter(|(_, p)| p.owns_number(number))
            .map(|(n, _)| n)
            .collect();
        // Two tables naming one number is a configuration mistake; pick one stably.
        owners.sort();
        owners.first().map(|n| n.as_str())
    }

    /// The tenants with a table of their own.
    pub fn configured(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(dev_mode: bool) -> Defaults {
        Defaults {
            countries: vec!["+1".into()],
            daily_quota: PerChannel {
                email: 10_000,
                sms: 1_000,
                whatsapp: 1_000,
            },
            recipients_per_hour: 100,
            rate_per_sec: 20.0,
            burst: 40.0,
            default_from: PerChannel {
                email: "noreply@service.example".into(),
                sms: "+15550009999".into(),
                whatsapp: String::new(),
            },
            dev_mode,
        }
    }

    const ACME: &str = r#"
        [acme]
        numbers = ["+15550001111"]
        sender_ids = ["ACME"]
        email_domains = ["acme.com"]
        email_addresses = ["alerts@acme.io"]
        messaging_service_sid = "MG0123456789abcdef0123456789abcdef"
        default_from = { sms = "ACME" }
        countries = ["+1", "+44"]
        daily_quota = { sms = 5 }
        rate_per_sec = 2.0
    "#;

    fn acme() -> TenantPolicy {
        let tables = parse_file("tenants.toml", ACME).unwrap();
        Tenants::new(&tables, &defaults(false))
            .policy("acme")
            .as_ref()
            .clone()
    }

    #[test]
    fn a_tenant_sends_only_as_its_own_senders() {
        let p = acme();
        let rows = [
            (Channel::Sms, "+15550001111", true),
            (Channel::Sms, "+15550002222", false),
            (Channel::Sms, "ACME", true),
            (Channel::Sms, "acme", true),
            (Channel::Sms, "GlobexBank", false),
            (Channel::Sms, "MG0123456789abcdef0123456789abcdef", true),
            (Channel::Sms, "MG0123456789abcdef0123456789abcdee", false),
            (Channel::Sms, "+15550009999", false),
            (Channel::Whatsapp, "+15550001111", true),
            (Channel::Whatsapp, "+15550002222", false),
            (Channel::Email, "anyone@acme.com", true),
            (Channel::Email, "Anyone@ACME.com", true),
            (Channel::Email, "x@mail.acme.com", false),
            (Channel::Email, "alerts@acme.io", true),
            (Channel::Email, "billing@acme.io", false),
            (Channel::Email, "security@globex.com", false),
            (Channel::Email, "noreply@service.example", false),
        ];
        for (ch, from, want) in rows {
            assert_eq!(p.may_send_as(ch, from), want, "{ch} from {from}");
        }
        assert_eq!(p.default_from(Channel::Sms), Some("ACME"));
        assert_eq!(p.default_from(Channel::Email), None);
    }

    #[test]
    fn without_senders_only_the_service_senders_unless_dev_mode() {
        let t = Tenants::new(&HashMap::new(), &defaults(false));
        let p = t.policy("globex");
        assert!(p.may_send_as(Channel::Sms, "+15550009999"));
        assert!(!p.may_send_as(Channel::Sms, "+15550001111"));
        assert!(p.may_send_as(Channel::Email, "noreply@service.example"));
        assert!(!p.may_send_as(Channel::Email, "ceo@service.example"));
        assert!(!p.may_send_as(Channel::Whatsapp, "+15550009999"));
        assert_eq!(p.default_from(Channel::Sms), Some("+15550009999"));
        assert_eq!(p.default_from(Channel::Whatsapp), None);
        let dev = Tenants::new(&HashMap::new(), &defaults(true)).policy("default");
        assert!(dev.may_send_as(Channel::Sms, "AnyoneAtAll"));
        assert!(dev.may_send_as(Channel::Email, "ceo@globex.com"));
        assert_eq!(dev.default_from(Channel::Sms), Some("+15550009999"));
    }

    #[test]
    fn destinations_by_country_prefix_and_limits_over_defaults() {
        let p = acme();
        assert!(p.may_send_to(Channel::Sms, "+15557654321"));
        assert!(p.may_send_to(Channel::Whatsapp, "+447700900123"));
        assert!(!p.may_send_to(Channel::Sms, "+881612345678"));
        assert!(!p.may_send_to(Channel::Sms, "+4915112345678"));
        assert!(p.may_send_to(Channel::Email, "a@example.de"));
        assert_eq!(
            (
                p.daily_quota.sms,
                p.daily_quota.email,
                p.recipients_per_hour
            ),
            (5, 10_000, 100)
        );
        assert_eq!((p.rate_per_sec, p.burst), (2.0, 40.0));
        let other = Tenants::new(&HashMap::new(), &defaults(false)).policy("x");
        assert!(!other.may_send_to(Channel::Sms, "+447700900123"));
        let mut d = defaults(false);
        d.countries = vec!["*".into()];
        let world = Tenants::new(&HashMap::new(), &d).policy("x");
        assert!(world.may_send_to(Channel::Sms, "+881612345678"));
    }

    #[test]
    fn bad_tables_name_the_tenant_and_the_setting() {
        let e = |text: &str| parse_file("t.toml", text).unwrap_err().to_string();
        assert!(e("[a]\nnumbers = [\"5550001111\"]").contains("t.toml [a]: numbers"));
        assert!(e("[a]\nsender_ids = [\"TOO-LONG-SENDER\"]").contains("sender_ids"));
        assert!(e("[a]\nemail_domains = [\"no spaces.com\"]").contains("email_domains"));
        assert!(e("[a]\nmessaging_service_sid = \"MGxyz\"").contains("messaging_service_sid"));
        assert!(e("[a]\ncountries = [\"44\"]").contains("countries"));
        assert!(e("[a]\ndefault_from = { email = \"nobody\" }").contains("default_from.email"));
        assert!(e("[a]\nrate_per_sec = 0.0").contains("rate_per_sec"));
        assert!(e("[a]\nsenders = []").contains("unknown field"));
        assert!(e("[a]\ndaily_quota = { fax = 1 }").contains("unknown field"));
    }
}
