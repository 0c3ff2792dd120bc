//! URLs as they may be printed: with the user's password (and a token in the user part)
//! replaced, whether the URL parses or not. Start-up errors, logs and `--help` name a
//! setting and show its value so an operator can fix it; a database password in a log
//! line is a leak, so every URL passes through [`url`] before it is shown.

/// `v` with whatever sits between `://` and the last `@` of its authority replaced by
/// `***` (user and password alike: Redis and some hosted services put the token in the
/// user part), in each URL of a comma-separated list (see [`list`]). A value without
/// `://…@` is returned as it is.
pub fn url(v: &str) -> String {
    list(v).into_iter().map(one).collect::<Vec<_>>().join(",")
}

/// The URLs of a comma-separated list (a Redis Cluster's seed nodes): a comma starts a
/// new URL only where a `scheme://` follows, so a comma inside one URL (MongoDB's host
/// list, a password) stays in it.
pub fn list(v: &str) -> Vec<&str> {
    let starts_url = |rest: &str| {
        rest.trim_start()
            .split_once("://")
            .is_some_and(|(scheme, _)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            })
    };
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in v.match_indices(',') {
        if starts_url(&v[i + 1..]) {
            out.push(&v[start..i]);
            start = i + 1;
        }
    }
    out.push(&v[start..]);
    out
}

fn one(v: &str) -> String {
    let Some(scheme_end) = v.find("://") else {
        return v.to_string();
    };
    let auth_start = scheme_end + 3;
    let rest = &v[auth_start..];
    // The authority ends at the first `/`, `?` or `#`; an `@` after that is in the path.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &v[..auth_start], &rest[at..]),
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_are_replaced_and_the_rest_kept() {
        for (input, want) in [
            (
                "mongodb://admin:pw@db.internal:27017/x?authSource=admin",
                "mongodb://***@db.internal:27017/x?authSource=admin",
            ),
            ("redis://:pw@cache:6379/0", "redis://***@cache:6379/0"),
            ("mongodb://admin:p@ss@[::1", "mongodb://***@[::1"),
            ("http://127.0.0.1:9200", "http://127.0.0.1:9200"),
            ("http://host/path@x", "http://host/path@x"),
            ("not a url", "not a url"),
            (
                "redis://:a@n1:7000, redis://:b@n2:7001",
                "redis://***@n1:7000, redis://***@n2:7001",
            ),
            ("redis://:p,w@n1:7000", "redis://***@n1:7000"),
            ("mongodb://u:p@h1,h2/db", "mongodb://***@h1,h2/db"),
        ] {
            assert_eq!(super::url(input), want, "{input}");
        }
    }
}
