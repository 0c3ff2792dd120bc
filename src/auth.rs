//! API keys and per-key rate limits for `/api/v1/*`.
//!
//! A key arrives as `Authorization: Bearer <key>` and names a tenant. Keys are held only
//! as SHA-256 digests and every digest is compared in constant time, so neither the
//! memory of the process nor the time of an answer tells a key. Each key has its own
//! token bucket; an empty one is a 429 with `Retry-After`. This bucket is per process, a
//! first guard that costs no round trip and holds while Redis is away; the bucket that
//! every process shares is in Redis (`limits.rs`).
//!
//! Keys come from `API_KEYS` (`tenant:key,tenant:key`) and/or the file named by
//! `auth.keys_file` / `API_KEYS_FILE` (one `tenant:key` per line, `#` comments). Either
//! form may carry the digest instead of the key (`tenant:sha256:<64 hex digits>`), so the
//! file need not hold a usable secret.

use actors::domain::DEFAULT_TENANT;
use actors::health::TokenBucket;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Shortest key accepted in configuration: shorter ones are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// One configured key: its tenant and the digest of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub tenant: String,
    pub digest: [u8; 32],
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A configured key that cannot be used. `at` names the entry by position only, never by
/// its secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{at}: expected tenant:key")]
    NoTenant { at: String },
    #[error("{at}: tenant {tenant:?} must be 1-64 letters, digits, '_', '-' or '.'")]
    BadTenant { at: String, tenant: String },
    #[error("{at}: sha256: must be followed by 64 hex digits")]
    BadDigest { at: String },
    #[error("{at}: the key for tenant {tenant:?} must be at least {MIN_KEY_LEN} visible ASCII characters")]
    ShortKey { at: String, tenant: String },
    #[error("the same API key is configured twice (tenant {0:?})")]
    Twice(String),
}

/// Configuration reports its errors as sentences.
impl From<KeyError> for String {
    fn from(e: KeyError) -> String {
        e.to_string()
    }
}

/// `<64 hex digits>` → the digest.
fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()?;
    bytes.try_into().ok()
}

/// Parse `tenant:key` or `tenant:sha256:<hex>`; `at` says where the entry stands.
pub fn parse_entry(entry: &str, at: &str) -> Result<KeySpec, KeyError> {
    let at = || at.to_string();
    let Some((tenant, secret)) = entry.trim().split_once(':') else {
        return Err(KeyError::NoTenant { at: at() });
    };
    let tenant = tenant.to_string();
    if !valid_tenant(&tenant) {
        return Err(KeyError::BadTenant { at: at(), tenant });
    }
    if let Some(hex) = secret.strip_prefix("sha256:") {
        let digest = parse_digest(hex).ok_or_else(|| KeyError::BadDigest { at: at() })?;
        return Ok(KeySpec { tenant, digest });
    }
    if secret.len() < MIN_KEY_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KeyError::ShortKey { at: at(), tenant });
    }
    Ok(KeySpec {
        tenant,
        digest: digest(secret.as_bytes()),
    })
}

/// All keys from the variable and the file's text; a key given twice is refused.
pub fn parse_keys(env: Option<&str>, file: Option<(&str, &str)>) -> Result<Vec<KeySpec>, KeyError> {
    let mut out: Vec<KeySpec> = Vec::new();
    if let Some(v) = env {
        for (i, e) in v
            .split(',')
            .enumerate()
            .filter(|(_, e)| !e.trim().is_empty())
        {
            out.push(parse_entry(e, &format!("API_KEYS entry {}", i + 1))?);
        }
    }
    if let Some((name, text)) = file {
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(parse_entry(line, &format!("{name} line {}", i + 1))?);
        }
    }
    for (i, a) in out.iter().enumerate() {
        if out[..i].iter().any(|b| b.digest == a.digest) {
            return Err(KeyError::Twice(a.tenant.clone()));
        }
    }
    Ok(out)
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: String,
    /// Names the key in Redis and logs without telling it: 12 hex digits of the SHA-256 of
    /// its digest (`dev` in `DEV_MODE`).
    pub key_id: String,
}

/// Why a request has no identity; the text is what the client reads.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("an API key is required: Authorization: Bearer <key>")]
    Missing,
    /// A key that is not configured (or a malformed header).
    #[error("the API key is not valid")]
    Invalid,
    /// The key's bucket is empty; retry after this long.
    #[error("too many requests for this API key; retry after the Retry-After seconds")]
    RateLimited(Duration),
}

struct Entry {
    spec: KeySpec,
    bucket: Mutex<TokenBucket>,
}

pub struct ApiKeys {
    entries: Vec<Entry>,
    /// Local development without keys: everybody is the default tenant, one bucket.
    dev: Option<Mutex<TokenBucket>>,
}

/// Equal in time independent of where the first difference is.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for i in 0..32 {
        diff |= a[i] ^ b[i];
    }
    std::hint::black_box(diff) == 0
}

/// The id of a key: 12 hex digits of the SHA-256 of its digest.
fn key_id(digest: &[u8; 32]) -> String {
    actors::domain::to_hex(&Sha256::digest(digest)[..6])
}

impl ApiKeys {
    /// `dev_mode` only matters when `keys` is empty.
    pub fn new(keys: Vec<KeySpec>, dev_mode: bool, rate: f64, burst: f64) -> ApiKeys {
        ApiKeys::with_rates(keys, dev_mode, &|_| (rate, burst))
    }

    /// Each key's bucket with its tenant's rate and burst (`rates(tenant)`).
    pub fn with_rates(
        keys: Vec<KeySpec>,
        dev_mode: bool,
        rates: &dyn Fn(&str) -> (f64, f64),
    ) -> ApiKeys {
        let now = Instant::now();
        let bucket = |tenant: &str| {
            let (rate, burst) = rates(tenant);
            Mutex::new(TokenBucket::new(rate, burst, now))
        };
        let dev = (keys.is_empty() && dev_mode).then(|| bucket(DEFAULT_TENANT));
        ApiKeys {
            entries: keys
                .into_iter()
                .map(|spec| Entry {
                    bucket: bucket(&spec.tenant),
                    spec,
                })
                .collect(),
            dev,
        }
    }

    pub fn is_dev_mode(&self) -> bool {
        self.dev.is_some()
    }

    /// The tenant of the request with this `Authorization` header, after taking a token
    /// from its key's bucket.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let now = Instant::now();
        if let Some(bucket) = &self.dev {
            bucket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(now)
                .map_err(AuthError::RateLimited)?;
            return Ok(Identity {
                tenant: DEFAULT_TENANT.to_string(),
                key_id: "dev".to_string(),
            });
        }
        let header = authorization.ok_or(AuthError::Missing)?;
        let (scheme, key) = header.trim().split_once(' ').ok_or(AuthError::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid);
        }
        let presented = digest(key.trim().as_bytes());
        // Every entry is compared, whichever matches.
        let mut found = None;
        for (i, e) in self.entries.iter().enumerate() {
            if ct_eq(&e.spec.digest, &presented) {
                found = Some(i);
            }
        }
        let entry = &self.entries[found.ok_or(AuthError::Invalid)?];
        entry
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(now)
            .map_err(AuthError::RateLimited)?;
        Ok(Identity {
            tenant: entry.spec.tenant.clone(),
            key_id: key_id(&entry.spec.digest),
        })
    }
}

impl ApiKeys {
    /// The tenant a bearer key names, without spending anything (for the audit trail).
    pub fn tenant_of(&self, key: Option<&str>) -> Option<String> {
        if self.dev.is_some() {
            return Some(DEFAULT_TENANT.to_string());
        }
        let presented = digest(key?.as_bytes());
        self.entries
            .iter()
            .find(|e| ct_eq(&e.spec.digest, &presented))
            .map(|e| e.spec.tenant.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "acme-0123456789abcdef";
    const B: &str = "zeta-0123456789abcdef";

    fn keys(rate: f64, burst: f64) -> ApiKeys {
        let specs = parse_keys(Some(&format!("acme:{A}, zeta:{B}")), None).unwrap();
        ApiKeys::new(specs, false, rate, burst)
    }

    #[test]
    fn a_key_names_its_tenant_and_nothing_else_gets_in() {
        let k = keys(100.0, 100.0);
        let who = |h: &str| k.authenticate(Some(h)).map(|i| i.tenant);
        assert_eq!(who(&format!("Bearer {A}")), Ok("acme".into()));
        assert_eq!(who(&format!("bearer {B}")), Ok("zeta".into()));
        assert_eq!(who("Bearer acme-0123456789abcdeX"), Err(AuthError::Invalid));
        assert_eq!(who(&format!("Basic {A}")), Err(AuthError::Invalid));
        assert_eq!(who(A), Err(AuthError::Invalid));
        assert_eq!(k.authenticate(None), Err(AuthError::Missing));
    }

    #[test]
    fn digests_in_config_work_like_keys_and_short_keys_are_refused() {
        let hex = actors::domain::to_hex(&digest(A.as_bytes()));
        let file = format!("# ops\n\nacme:sha256:{hex}\n");
        let specs = parse_keys(None, Some(("keys.txt", &file))).unwrap();
        let k = ApiKeys::new(specs, false, 10.0, 10.0);
        assert_eq!(
            k.authenticate(Some(&format!("Bearer {A}"))).unwrap().tenant,
            "acme"
        );
        let e = parse_keys(Some("acme:short"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("API_KEYS entry 1") && !e.contains("short"),
            "{e}"
        );
        let e = parse_keys(None, Some(("keys.txt", "acme:sha256:12")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.txt line 1"), "{e}");
        assert!(parse_keys(Some(&format!("a:{A},b:{A}")), None)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(parse_keys(Some(&format!("a b:{A}")), None).is_err());
    }

    #[test]
    fn key_errors_read_as_before() {
        let e = |entry: &str| {
            parse_entry(entry, "API_KEYS entry 2")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e("nocolon"), "API_KEYS entry 2: expected tenant:key");
        assert_eq!(
            e("a b:x"),
            "API_KEYS entry 2: tenant \"a b\" must be 1-64 letters, digits, '_', '-' or '.'"
        );
        assert_eq!(
            e("acme:sha256:zz"),
            "API_KEYS entry 2: sha256: must be followed by 64 hex digits"
        );
        assert_eq!(
            e("acme:short"),
            "API_KEYS entry 2: the key for tenant \"acme\" must be at least 16 visible ASCII characters"
        );
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let k = keys(1.0, 2.0);
        let a = format!("Bearer {A}");
        assert!(k.authenticate(Some(&a)).is_ok());
        assert!(k.authenticate(Some(&a)).is_ok());
        match k.authenticate(Some(&a)) {
            Err(AuthError::RateLimited(d)) => {
                assert!(d > Duration::ZERO && d <= Duration::from_secs(1))
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        assert!(k.authenticate(Some(&format!("Bearer {B}"))).is_ok());
    }

    #[test]
    fn dev_mode_only_without_keys() {
        let k = ApiKeys::new(Vec::new(), true, 10.0, 10.0);
        assert!(k.is_dev_mode());
        assert_eq!(k.authenticate(None).unwrap().tenant, DEFAULT_TENANT);
        let specs = parse_keys(Some(&format!("acme:{A}")), None).unwrap();
        let k = ApiKeys::new(specs, true, 10.0, 10.0);
        assert!(!k.is_dev_mode());
        assert_eq!(k.authenticate(None), Err(AuthError::Missing));
    }
}
