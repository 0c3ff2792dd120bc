//! Settings that must never be printed: tokens and passwords are [`SecretString`]s (the
//! `secrecy` crate: `Debug` shows `[REDACTED]`, the value only through `expose_secret`),
//! and URLs that may carry credentials are [`SecretUrl`]s, whose `Debug` and `Display` show
//! them with the credentials replaced ([`super::redact::url`]). A `{:?}` of the whole
//! configuration, a panic message or a log line with a setting in it leaks nothing.

pub use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A connection URL (MongoDB, Redis, SMTP) that may hold a user and password.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its credentials, for the driver that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as it may be shown.
    pub fn redacted(&self) -> String {
        super::redact::url(&self.0)
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A secret setting's value, for the one place that uses it.
pub fn expose(s: &SecretString) -> &str {
    s.expose_secret()
}
