//! Provider clients, each speaking the provider's documented API, and the pure functions
//! that classify their answers as success, retryable or permanent.

pub mod scrub;
pub mod sendgrid;
pub mod smtp;
pub mod twilio;
pub mod vonage;
pub mod whatsapp;

use actors::domain::{Ambiguity, ErrorClass, ProviderError};
use std::time::Duration;

/// Every provider's `Provider::name`, as records keep them.
pub const NAMES: [&str; 6] = [
    twilio::NAME,
    twilio::WHATSAPP_NAME,
    vonage::NAME,
    whatsapp::NAME,
    sendgrid::NAME,
    "smtp",
];

/// The provider `name` names, as the static name its client reports (`None`: no provider
/// of ours has that name).
pub fn known_name(name: &str) -> Option<&'static str> {
    NAMES.into_iter().find(|n| *n == name)
}

/// `Retry-After` in seconds (the form Twilio and Meta send).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// A transport failure (connection refused, reset, timeout): always worth another try.
/// Its outcome is unknown unless the connection was never made (see
/// [`transport_ambiguity`]).
pub fn network_error(provider: &str, e: &reqwest::Error) -> ProviderError {
    ProviderError {
        class: ErrorClass::Retryable { retry_after: None },
        ambiguous: transport_ambiguity(e.is_connect(), e.is_timeout()),
        rate_limited: false,
        code: Some(if e.is_timeout() { "timeout" } else { "network" }.into()),
        message: format!("{provider} unreachable: {e}"),
    }
}

/// Whether a transport failure leaves the outcome unknown. Failing to connect (refused,
/// no route, connect timeout) means the request never left: a plain failure. Anything
/// after (a timeout waiting for the answer, a reset while writing or reading) may have
/// come after the provider took the message.
pub fn transport_ambiguity(connecting: bool, timed_out: bool) -> Option<Ambiguity> {
    match (connecting, timed_out) {
        (true, _) => None,
        (false, true) => Some(Ambiguity::Timeout),
        (false, false) => Some(Ambiguity::ConnectionReset),
    }
}

/// Whether an HTTP error answer leaves the outcome unknown: a 502, 503 or 504 without the
/// provider's own error body came from something in front of the provider (a proxy, a
/// load balancer) that may have passed the request on. With the provider's body, the
/// provider itself refused: a plain failure.
pub fn status_ambiguity(status: u16, provider_body: bool) -> Option<Ambiguity> {
    (matches!(status, 502..=504) && !provider_body).then_some(Ambiguity::Gateway5xx)
}

/// Twilio: HTTP status plus Twilio's own error code
/// (<https://www.twilio.com/docs/api/errors>).
/// - 20429 "Too Many Requests", HTTP 429 and HTTP 5xx: retryable, honouring Retry-After.
/// - About the account or sender at Twilio (fail over to the next provider): 20003
///   "Permission Denied" (wrong Account SID / Auth Token, deleted key, account suspended or
///   closed; HTTP 401, as is any 401), 20403 "403 Forbidden" (the account is suspended or
///   closed), 21606 "The 'From' phone number provided is not a valid message-capable Twilio
///   phone number for this destination/account", 21608 "The 'to' phone number provided is
///   not yet verified for this account" (a trial account), 21408 "Permission to send an SMS
///   has not been enabled for the region" (the account's geographic permissions).
/// - About the message: 21211 "Invalid 'To' Phone Number", 21614 "'To' number is not a
///   valid mobile number", 21610 "Attempt to send to unsubscribed recipient" and other 4xx:
///   permanent.
pub fn classify_twilio(
    status: u16,
    code: Option<i64>,
    retry_after: Option<Duration>,
) -> ErrorClass {
    const ACCOUNT: [i64; 5] = [20003, 20403, 21606, 21608, 21408];
    match (status, code) {
        (_, Some(20429)) | (429, _) => ErrorClass::Retryable { retry_after },
        (500..=599, _) => ErrorClass::Retryable { retry_after },
        (_, Some(c)) if ACCOUNT.contains(&c) => ErrorClass::Account,
        (401, _) => ErrorClass::Account,
        _ => ErrorClass::Permanent,
    }
}

/// Meta WhatsApp Cloud API error codes
/// (<https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes>).
/// Retryable: 4 (API Too Many Calls), 80007 (rate limit issues), 130429 (Cloud API
/// message throughput reached), 131056 (pair rate limit), 131000 (something went wrong),
/// 131016 (service unavailable), 133004 (server temporarily unavailable), 1 and 2 (API
/// unknown / service), plus HTTP 429 and 5xx. About the account (fail over): 0
/// (AuthException: the token expired or was invalidated), 10 (permission denied), 190
/// (access token expired), 131031 (business account locked), 131042 (business eligibility
/// payment issue), and any other HTTP 401. Permanent, about the message: 100 (invalid
/// parameter), 131026 (message undeliverable), 131030 (recipient not in allowed list),
/// 131047 (re-engagement message), 131051 (unsupported message type) and the rest.
pub fn classify_meta(status: u16, code: Option<i64>, retry_after: Option<Duration>) -> ErrorClass {
    const RETRYABLE: [i64; 9] = [1, 2, 4, 80007, 130429, 131056, 131000, 131016, 133004];
    const ACCOUNT: [i64; 5] = [0, 10, 190, 131031, 131042];
    match code {
        Some(c) if RETRYABLE.contains(&c) => ErrorClass::Retryable { retry_after },
        Some(c) if ACCOUNT.contains(&c) => ErrorClass::Account,
        _ if status == 401 => ErrorClass::Account,
        Some(_) if status < 500 && status != 429 => ErrorClass::Permanent,
        _ if status == 429 || status >= 500 => ErrorClass::Retryable { retry_after },
        _ => ErrorClass::Permanent,
    }
}

/// SMTP reply codes (RFC 5321 §4.2.1): 4yz is a transient negative completion reply,
/// 5yz a permanent one; of those, RFC 4954's 530 (authentication required) and 535
/// (authentication credentials invalid) are about our account at the relay (fail over),
/// the rest about the message (550 mailbox unavailable, 553 mailbox name not allowed…).
pub fn classify_smtp(reply_code: Option<u16>) -> ErrorClass {
    match reply_code {
        Some(530) | Some(535) => ErrorClass::Account,
        Some(c) if (500..600).contains(&c) => ErrorClass::Permanent,
        _ => ErrorClass::Retryable { retry_after: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RA: Option<Duration> = Some(Duration::from_secs(3));

    #[test]
    fn twilio_table() {
        let r = ErrorClass::Retryable { retry_after: RA };
        assert_eq!(classify_twilio(429, Some(20429), RA), r);
        assert_eq!(classify_twilio(503, None, RA), r);
        assert_eq!(classify_twilio(500, Some(20500), RA), r);
        assert_eq!(classify_twilio(400, Some(21211), RA), ErrorClass::Permanent);
        assert_eq!(classify_twilio(400, Some(21614), RA), ErrorClass::Permanent);
        assert_eq!(classify_twilio(400, Some(21610), RA), ErrorClass::Permanent);
        for code in [20003, 20403, 21606, 21608, 21408] {
            let status = if code == 20003 { 401 } else { 400 };
            assert_eq!(
                classify_twilio(status, Some(code), RA),
                ErrorClass::Account,
                "{code}"
            );
        }
        assert_eq!(classify_twilio(401, None, RA), ErrorClass::Account);
    }

    #[test]
    fn meta_table() {
        let r = ErrorClass::Retryable { retry_after: None };
        assert_eq!(classify_meta(400, Some(130429), None), r);
        assert_eq!(classify_meta(400, Some(131056), None), r);
        assert_eq!(classify_meta(500, Some(131000), None), r);
        assert_eq!(classify_meta(503, None, None), r);
        assert_eq!(
            classify_meta(400, Some(131030), None),
            ErrorClass::Permanent
        );
        assert_eq!(classify_meta(400, Some(100), None), ErrorClass::Permanent);
        for code in [0, 10, 190, 131031, 131042] {
            assert_eq!(
                classify_meta(400, Some(code), None),
                ErrorClass::Account,
                "{code}"
            );
        }
        assert_eq!(classify_meta(401, None, None), ErrorClass::Account);
    }

    /// (status, the provider's own error body?) → unknown outcome?
    #[test]
    fn gateway_errors_without_the_providers_body_are_ambiguous() {
        let g = Some(Ambiguity::Gateway5xx);
        let rows = [
            (502, false, g),
            (503, false, g),
            (504, false, g),
            (502, true, None),
            (503, true, None),
            (504, true, None),
            (500, false, None),
            (429, false, None),
            (400, false, None),
            (200, false, None),
        ];
        for (status, body, want) in rows {
            assert_eq!(status_ambiguity(status, body), want, "{status} {body}");
        }
    }

    /// (failed while connecting?, timed out?) → unknown outcome?
    #[test]
    fn transport_failures_after_connecting_are_ambiguous() {
        let rows = [
            (true, false, None),
            (true, true, None),
            (false, true, Some(Ambiguity::Timeout)),
            (false, false, Some(Ambiguity::ConnectionReset)),
        ];
        for (connecting, timed_out, want) in rows {
            assert_eq!(
                transport_ambiguity(connecting, timed_out),
                want,
                "{connecting} {timed_out}"
            );
        }
    }

    #[test]
    fn smtp_table() {
        assert_eq!(
            classify_smtp(Some(421)),
            ErrorClass::Retryable { retry_after: None }
        );
        assert_eq!(
            classify_smtp(Some(450)),
            ErrorClass::Retryable { retry_after: None }
        );
        assert_eq!(classify_smtp(Some(550)), ErrorClass::Permanent);
        assert_eq!(classify_smtp(Some(553)), ErrorClass::Permanent);
        assert_eq!(classify_smtp(Some(535)), ErrorClass::Account);
        assert_eq!(classify_smtp(Some(530)), ErrorClass::Account);
        assert_eq!(
            classify_smtp(None),
            ErrorClass::Retryable { retry_after: None }
        );
    }
}
