//! What the service needs of the Redis server it is given, checked at start-up: a version
//! with every command it uses, and a memory policy that never evicts. The reading of
//! `INFO` is a pure function, tested by table.

use super::redis_queue::RedisQueue;
use actors::ports::DependencyError;

/// The oldest Redis this service runs on: XAUTOCLAIM, `XPENDING … IDLE` and `XTRIM MINID`
/// came with 6.2.
pub const MIN_REDIS_VERSION: (u32, u32) = (6, 2);

/// What `INFO` says of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisServer {
    pub version: String,
    /// Missing when the server does not say (then it is not checked).
    pub maxmemory_policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisCheckError {
    #[error(
        "REDIS_URL: Redis {version} is older than {}.{}, the oldest this service supports (it needs XAUTOCLAIM, XPENDING IDLE and XTRIM MINID); upgrade the Redis server",
        MIN_REDIS_VERSION.0,
        MIN_REDIS_VERSION.1
    )]
    TooOld { version: String },
    #[error(
        "REDIS_URL: Redis maxmemory-policy is {policy}: when full, Redis would evict keys (stream entries with unsent work, the leases that keep a message from being sent twice); set `maxmemory-policy noeviction` (redis.conf, or CONFIG SET maxmemory-policy noeviction)"
    )]
    EvictingPolicy { policy: String },
    #[error("REDIS_URL: Redis's INFO does not name its version")]
    NoVersion,
}

/// Read `INFO`'s `redis_version` and `maxmemory_policy`.
pub fn read_info(info: &str) -> Result<RedisServer, RedisCheckError> {
    let field = |name: &str| {
        info.lines()
            .filter_map(|l| l.trim().split_once(':'))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim().to_string())
    };
    Ok(RedisServer {
        version: field("redis_version").ok_or(RedisCheckError::NoVersion)?,
        maxmemory_policy: field("maxmemory_policy"),
    })
}

/// The server is one this service can trust with its streams and leases.
pub fn check(server: &RedisServer) -> Result<(), RedisCheckError> {
    let mut parts = server
        .version
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MIN_REDIS_VERSION {
        return Err(RedisCheckError::TooOld {
            version: server.version.clone(),
        });
    }
    match server.maxmemory_policy.as_deref() {
        None | Some("noeviction") => Ok(()),
        Some(other) => Err(RedisCheckError::EvictingPolicy {
            policy: other.to_string(),
        }),
    }
}

/// Why the start-up check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum StartupCheck {
    /// Redis did not answer: nothing could be checked (the service starts anyway, as it
    /// does through any Redis outage).
    #[error("{0}")]
    Unreachable(DependencyError),
    #[error(transparent)]
    Refused(#[from] RedisCheckError),
}

/// Ask the server (every master of a cluster) and check it; the first one's figures.
pub async fn check_server(queue: &RedisQueue) -> Result<RedisServer, StartupCheck> {
    let infos = queue.info().await.map_err(StartupCheck::Unreachable)?;
    let mut first = None;
    for info in &infos {
        let server = read_info(info)?;
        check(&server)?;
        first.get_or_insert(server);
    }
    Ok(first.ok_or(RedisCheckError::NoVersion)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(version: &str, policy: Option<&str>) -> RedisServer {
        RedisServer {
            version: version.into(),
            maxmemory_policy: policy.map(str::to_string),
        }
    }

    #[test]
    fn info_is_read_line_by_line() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n# Memory\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(read_info(info), Ok(server("7.0.15", Some("allkeys-lru"))));
        assert_eq!(read_info("# Server\r\n"), Err(RedisCheckError::NoVersion));
    }

    #[test]
    fn versions_and_policies() {
        let table = [
            ("7.0.15", Some("noeviction"), true),
            ("6.2.0", Some("noeviction"), true),
            ("7.2.4", None, true),
            ("6.0.16", Some("noeviction"), false),
            ("5.0.7", None, false),
            ("7.0.15", Some("allkeys-lru"), false),
            ("7.0.15", Some("volatile-lru"), false),
            ("7.0.15", Some("volatile-ttl"), false),
            ("7.0.15", Some("allkeys-random"), false),
        ];
        for (version, policy, ok) in table {
            assert_eq!(
                check(&server(version, policy)).is_ok(),
                ok,
                "{version} {policy:?}"
            );
        }
        let refused = check(&server("7.0.15", Some("volatile-lru"))).unwrap_err();
        assert!(refused.to_string().contains("noeviction"), "{refused}");
    }
}
