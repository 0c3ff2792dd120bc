//! Which connections may go out unencrypted: only to this host (loopback), unless the
//! operator says the network is private with `ALLOW_INSECURE_TRANSPORT=true`. A plaintext
//! link to a provider, a database or the SMTP relay carries API tokens, passwords and every
//! message body; refusing it at start-up beats finding it in a packet capture.

use super::{bad, Config, ConfigError};

/// The start-up rule: every outgoing URL is encrypted or stays on this host.
pub(super) fn transports_are_encrypted(c: &Config) -> Result<(), ConfigError> {
    if c.server.allow_insecure_transport {
        return Ok(());
    }
    let checks: [(&str, &str, Check); 7] = [
        ("TWILIO_API_BASE", &c.providers.sms.api_base, web),
        ("WHATSAPP_API_BASE", &c.providers.whatsapp.api_base, web),
        ("VONAGE_API_BASE", &c.providers.vonage.api_base, web),
        ("SENDGRID_API_BASE", &c.providers.sendgrid.api_base, web),
        ("ELASTICSEARCH_NODE", &c.elasticsearch.node, web),
        ("MONGODB_URL", c.mongodb.url.expose(), mongodb),
        ("SMTP_URL", c.providers.email.smtp_url.expose(), smtp),
    ];
    // Every node of a cluster's list.
    let redis_nodes = c.redis.urls().into_iter();
    let checks = checks
        .into_iter()
        .chain(redis_nodes.map(|u| ("REDIS_URL", u, redis as Check)));
    for (name, value, verdict) in checks {
        if let Verdict::Refuse(why) = verdict(value) {
            return Err(bad(format!(
                "{name}: {why}; use an encrypted transport, or set ALLOW_INSECURE_TRANSPORT=true \
                 (server.allow_insecure_transport) if this network is private"
            )));
        }
    }
    Ok(())
}

/// `DEV_MODE` serves everybody without a key: only on a loopback listen address.
pub(super) fn dev_mode_only_on_loopback(c: &Config) -> Result<(), ConfigError> {
    if c.auth.dev_mode && !is_loopback(&c.server.host) {
        return Err(bad(format!(
            "DEV_MODE=true serves every caller without a key, so it is allowed only on a \
             loopback address, and HOST is {:?}: set HOST=127.0.0.1 or configure API_KEYS",
            c.server.host
        )));
    }
    Ok(())
}

/// How one URL is judged.
type Check = fn(&str) -> Verdict;

#[derive(Debug, PartialEq)]
enum Verdict {
    Allow,
    Refuse(String),
}

/// `localhost`, 127.0.0.0/8 and `::1` (with or without brackets).
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn parsed(v: &str) -> Option<url::Url> {
    url::Url::parse(v).ok()
}

fn off_host(u: &url::Url) -> bool {
    !u.host_str().is_some_and(is_loopback)
}

fn web(v: &str) -> Verdict {
    match parsed(v) {
        Some(u) if u.scheme() == "http" && off_host(&u) => {
            Verdict::Refuse(format!("plain http to {}", u.host_str().unwrap_or("")))
        }
        _ => Verdict::Allow,
    }
}

fn redis(v: &str) -> Verdict {
    match parsed(v) {
        Some(u) if u.scheme() == "redis" && off_host(&u) => Verdict::Refuse(format!(
            "plain redis:// to {} (rediss:// is TLS)",
            u.host_str().unwrap_or("")
        )),
        _ => Verdict::Allow,
    }
}

fn smtp(v: &str) -> Verdict {
    let Some(u) = parsed(v) else {
        return Verdict::Allow;
    };
    let starttls = u.query_pairs().any(|(k, v)| k == "tls" && v == "required");
    let credentials = !u.username().is_empty() || u.password().is_some();
    if u.scheme() == "smtp" && credentials && !starttls && off_host(&u) {
        return Verdict::Refuse(
            "credentials over plain SMTP (smtps:// or ?tls=required encrypt them)".into(),
        );
    }
    Verdict::Allow
}

/// MongoDB URLs may name several hosts (`mongodb://a:1,b:2/db?…`), which `url` does not
/// parse, so the hosts and options are read by hand.
fn mongodb(v: &str) -> Verdict {
    let (srv, rest) = match (
        v.strip_prefix("mongodb+srv://"),
        v.strip_prefix("mongodb://"),
    ) {
        (Some(r), _) => (true, r),
        (None, Some(r)) => (false, r),
        _ => return Verdict::Allow,
    };
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let hosts = authority.split('/').next().unwrap_or("");
    let hosts = hosts.rsplit_once('@').map_or(hosts, |(_, h)| h);
    let all_local = hosts.split(',').all(|h| is_loopback(host_of(h)));
    let opt = |name: &str| {
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            k.eq_ignore_ascii_case(name)
                .then(|| v.eq_ignore_ascii_case("true"))
        })
    };
    if all_local {
        return Verdict::Allow;
    }
    for insecure in [
        "tlsInsecure",
        "tlsAllowInvalidCertificates",
        "tlsAllowInvalidHostnames",
    ] {
        if opt(insecure) == Some(true) {
            return Verdict::Refuse(format!("{insecure}=true turns certificate checks off"));
        }
    }
    let tls = opt("tls").or(opt("ssl")).unwrap_or(srv);
    if !tls {
        return Verdict::Refuse(format!("no TLS to {hosts} (add tls=true)"));
    }
    Verdict::Allow
}

/// `host:port`, `[::1]:port` or `host` → the host.
fn host_of(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_by_table() {
        let refused = |v: Verdict| matches!(v, Verdict::Refuse(_));
        for (check, value, refuse) in [
            (web as Check, "https://api.twilio.com", false),
            (web, "http://api.twilio.com", true),
            (web, "http://127.0.0.1:9200", false),
            (web, "http://localhost:9200", false),
            (web, "http://[::1]:9200", false),
            (redis, "redis://127.0.0.1:6379", false),
            (redis, "rediss://cache.example:6380", false),
            (redis, "redis://cache.example:6379", true),
            (redis, "unix:///run/redis.sock", false),
            (smtp, "smtp://relay.example:25", false),
            (smtp, "smtp://u:p@relay.example:587", true),
            (smtp, "smtp://u:p@relay.example:587?tls=required", false),
            (smtp, "smtps://u:p@relay.example:465", false),
            (smtp, "smtp://u:p@127.0.0.1:1025", false),
            (
                mongodb,
                "mongodb://127.0.0.1:27017/?directConnection=true",
                false,
            ),
            (mongodb, "mongodb://u:p@localhost,127.0.0.2:27018/db", false),
            (
                mongodb,
                "mongodb://u:p@db1.example:27017,db2.example/db",
                true,
            ),
            (
                mongodb,
                "mongodb://u:p@db1.example:27017/db?tls=true",
                false,
            ),
            (mongodb, "mongodb://db1.example/?ssl=true", false),
            (
                mongodb,
                "mongodb://db1.example/?tls=true&tlsInsecure=true",
                true,
            ),
            (mongodb, "mongodb+srv://u:p@cluster0.example.net/db", false),
            (
                mongodb,
                "mongodb+srv://cluster0.example.net/?tls=false",
                true,
            ),
            (mongodb, "mongodb://[::1]:27017", false),
        ] {
            assert_eq!(refused(check(value)), refuse, "{value}");
        }
    }

    #[test]
    fn loopback_names() {
        for h in [
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["0.0.0.0", "10.0.0.1", "example.com", "::", ""] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
