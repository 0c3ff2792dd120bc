//! Every error the API answers: one enum, one JSON shape
//! (`{"error":{"code":"...","message":"..."}}`, plus `field` where a field is to blame), a
//! stable `code`, and the headers that tell a client what to do next (`Retry-After`,
//! `Allow`, `WWW-Authenticate`). The `Display` text is the message a client reads, so it
//! never carries a driver's error.

use crate::auth::AuthError;
use crate::http::body::{TooLarge, BODY_LIMIT};
use crate::search::{BadParam, QueryError};
use crate::templates::TemplateError;
use actors::audit::AuditKind;
use actors::domain::{Channel, ValidationError};
use serde_json::json;
use warp::http::header::{self, HeaderName, HeaderValue};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("/metrics wants Authorization: Bearer <METRICS_TOKEN>")]
    MetricsToken,
    #[error("the service is shutting down; retry on another instance or shortly")]
    ShuttingDown,
    #[error("the body must be JSON, sent with content-type: application/json")]
    NotJson,
    /// The body is not the JSON asked for; says what was wrong with it.
    #[error("{0}")]
    InvalidJson(String),
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    InvalidQuery(#[from] QueryError),
    #[error("a communication id is 24 hexadecimal digits")]
    InvalidId,
    #[error("a batch id is 24 hexadecimal digits")]
    InvalidBatchId,
    #[error("data.to has had {max} {channel} messages in this window, the most allowed; retry after the Retry-After seconds")]
    RecipientLimit {
        max: u64,
        channel: Channel,
        retry_after_secs: u64,
    },
    /// The `from` is not one of this tenant's senders (nothing stored, nothing sent).
    #[error("data.from is not one of this tenant's {channel} senders; use one configured for it, or leave from out for its default")]
    SenderNotAllowed { channel: Channel },
    /// The destination's country is not one this tenant may send to.
    #[error("data.to is in a country this tenant may not send {channel} to")]
    DestinationNotAllowed { channel: Channel },
    #[error(
        "this tenant's daily {channel} quota of {max} messages is spent; it resets at resetAt"
    )]
    QuotaExceeded {
        channel: Channel,
        max: u64,
        reset_at: chrono::DateTime<chrono::Utc>,
        retry_after_secs: u64,
    },
    #[error("this tenant has texted {max} distinct numbers this hour, the most allowed; a new number waits for the Retry-After seconds")]
    TooManyRecipients { max: u64, retry_after_secs: u64 },
    /// The limits (in Redis) could not be asked, and this channel fails closed.
    #[error("the sending limits cannot be checked; nothing was stored, retry later")]
    LimiterUnavailable,
    /// `GET /api/v1/events`: the most open subscriptions are open already.
    #[error("{0} has the most live event subscriptions open already; close one, or retry later")]
    TooManySubscribers(&'static str),
    #[error("Idempotency-Key {0:?} was already used for a different request")]
    KeyReused(String),
    #[error("no bulk send {0} of this tenant")]
    NoBatch(String),
    #[error("no communication {0}")]
    NoCommunication(String),
    /// Sending has started (a sender holds it, it was attempted, or it is final).
    #[error("the communication cannot be canceled: sending has started (status {0})")]
    NotCancelable(String),
    /// Not a dead letter (any more: replayed already), or being worked on.
    #[error("the communication cannot be replayed: it is not a dead letter, or a replay of it is under way (status {0})")]
    NotReplayable(String),
    #[error("the router is restarting; nothing was stored, retry shortly")]
    RouterRestarting,
    /// The accept deadline passed before the store answered: the request is dropped, and a
    /// record whose insert was already under way is voided, so it is never sent.
    #[error("the message store did not answer in time; nothing was stored, retry later")]
    NotProcessedInTime,
    /// Too many requests wait for the store already (it is slow or frozen).
    #[error(
        "too many requests are waiting for the message store; nothing was stored, retry later"
    )]
    AcceptQueueFull,
    /// MongoDB's indexes (the unique Idempotency-Key index among them) do not exist yet.
    #[error("the service is starting (its MongoDB indexes are being built); nothing was stored, retry shortly")]
    IndexesBuilding,
    /// MongoDB's indexes cannot be built as the data stands; `/readyz` says why.
    #[error("the service cannot accept communications: its MongoDB indexes cannot be built (see /readyz and the log); nothing was stored")]
    IndexesFailed,
    #[error("the message store is unavailable; nothing was stored, retry later")]
    NothingStored,
    #[error("the message store is unavailable, retry later")]
    StoreUnavailable,
    #[error(
        "search is unavailable; GET /api/v1/communication/{{id}} still answers from the store"
    )]
    SearchUnavailable,
    /// A provider's receipt was not recorded; the provider sends it again.
    #[error("try again later")]
    ReceiptNotRecorded,
    /// The provider's signature header (named) is missing.
    #[error("{0} is required")]
    Unsigned(&'static str),
    /// The provider's signature header (named) does not match.
    #[error("{0} does not match")]
    BadSignature(&'static str),
    #[error("MessageSid and MessageStatus are required")]
    InvalidCallback,
    /// The request, body included, was not complete and answered in time.
    #[error("the request was not complete within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// Twilio signs the URL it calls, which only `PUBLIC_BASE_URL` tells this service.
    #[error(
        "Twilio status callbacks are off: set PUBLIC_BASE_URL, the URL Twilio calls and signs"
    )]
    CallbacksNotConfigured,
    #[error("hub.verify_token does not match")]
    VerificationFailed,
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed {
        /// The methods the path answers, for `Allow`.
        allow: Vec<&'static str>,
    },
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(u64),
    #[error("a content-length is required")]
    LengthRequired,
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("the request could not be read")]
    Unreadable,
    /// A template, or what a request gives one, breaks a rule (see `crate::templates`).
    #[error(transparent)]
    Template(#[from] crate::templates::TemplateError),
    #[error("no such suppression for this tenant")]
    NoSuppression,
    #[error("no template {0:?}")]
    TemplateNotFound(String),
    #[error("a template {0:?} exists already; PUT changes it")]
    TemplateExists(String),
    #[error("the template {0:?} was changed meanwhile; read it and try again")]
    TemplateChanged(String),
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<BadParam> for ApiError {
    fn from(BadParam(field, message): BadParam) -> Self {
        ApiError::Invalid { field, message }
    }
}

impl ApiError {
    /// The answer to a request warp turned away; `allow` gives the methods of its path.
    pub fn from_rejection(
        err: &warp::Rejection,
        allow: impl FnOnce() -> Vec<&'static str>,
    ) -> ApiError {
        if err.is_not_found() {
            ApiError::NoRoute
        } else if let Some(TooLarge(limit)) = err.find::<TooLarge>() {
            ApiError::PayloadTooLarge(*limit)
        } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
            ApiError::PayloadTooLarge(BODY_LIMIT)
        } else if err.find::<warp::reject::LengthRequired>().is_some() {
            ApiError::LengthRequired
        } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
            ApiError::MethodNotAllowed { allow: allow() }
        } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
            ApiError::UnsupportedMediaType
        } else {
            tracing::debug!(?err, "unhandled rejection");
            ApiError::Unreadable
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            Auth(AuthError::RateLimited(_))
            | RecipientLimit { .. }
            | QuotaExceeded { .. }
            | TooManyRecipients { .. }
            | TooManySubscribers(_) => StatusCode::TOO_MANY_REQUESTS,
            SenderNotAllowed { .. } | DestinationNotAllowed { .. } => StatusCode::FORBIDDEN,
            Auth(_) | MetricsToken | Unsigned(_) => StatusCode::UNAUTHORIZED,
            BadSignature(_) | VerificationFailed | CallbacksNotConfigured => StatusCode::FORBIDDEN,
            NotJson | UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            InvalidJson(_)
            | Invalid { .. }
            | InvalidQuery(_)
            | InvalidId
            | InvalidBatchId
            | InvalidCallback
            | Template(_)
            | Unreadable => StatusCode::BAD_REQUEST,
            KeyReused(_) | TemplateExists(_) | TemplateChanged(_) | NotCancelable(_)
            | NotReplayable(_) => StatusCode::CONFLICT,
            NoCommunication(_) | NoBatch(_) | NoRoute | TemplateNotFound(_) | NoSuppression => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            LengthRequired => StatusCode::LENGTH_REQUIRED,
            ShuttingDown | RouterRestarting | NotProcessedInTime | NothingStored
            | AcceptQueueFull | IndexesBuilding | IndexesFailed | StoreUnavailable
            | SearchUnavailable | ReceiptNotRecorded | LimiterUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The stable `code` clients match on.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Auth(AuthError::RateLimited(_)) => "rate_limited",
            Auth(_) | MetricsToken => "unauthorized",
            ShuttingDown => "shutting_down",
            NotJson | UnsupportedMediaType => "unsupported_media_type",
            InvalidJson(_) => "invalid_json",
            Invalid { .. } => "validation_failed",
            InvalidQuery(_) => "invalid_query",
            InvalidId | InvalidBatchId => "invalid_id",
            RecipientLimit { .. } => "recipient_limit",
            SenderNotAllowed { .. } => "sender_not_allowed",
            DestinationNotAllowed { .. } => "destination_not_allowed",
            QuotaExceeded { .. } => "quota_exceeded",
            TooManyRecipients { .. } => "distinct_recipient_limit",
            LimiterUnavailable => "limiter_unavailable",
            TooManySubscribers(_) => "too_many_subscribers",
            KeyReused(_) => "idempotency_key_reused",
            NotCancelable(_) => "not_cancelable",
            NotReplayable(_) => "not_replayable",
            NoCommunication(_) | NoBatch(_) | NoRoute | NoSuppression => "not_found",
            RouterRestarting | IndexesBuilding | IndexesFailed => "unavailable",
            NotProcessedInTime | NothingStored | AcceptQueueFull | StoreUnavailable
            | ReceiptNotRecorded => "store_unavailable",
            SearchUnavailable => "search_unavailable",
            Unsigned(_) => "unsigned",
            BadSignature(_) => "bad_signature",
            InvalidCallback => "invalid_callback",
            CallbacksNotConfigured => "callbacks_not_configured",
            VerificationFailed => "verification_failed",
            MethodNotAllowed { .. } => "method_not_allowed",
            PayloadTooLarge(_) => "payload_too_large",
            RequestTimeout(_) => "request_timeout",
            LengthRequired => "length_required",
            Unreadable => "bad_request",
            Template(TemplateError::Invalid { .. }) => "validation_failed",
            Template(TemplateError::Syntax { .. }) => "template_syntax",
            Template(TemplateError::VariableMissing(_)) => "template_variable_missing",
            Template(TemplateError::Render(_)) => "template_render_failed",
            TemplateNotFound(_) => "template_not_found",
            TemplateExists(_) => "template_exists",
            TemplateChanged(_) => "template_changed",
        }
    }

    /// What the client should do next, as headers.
    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        use ApiError::*;
        let retry_after = |secs: u64| vec![(header::RETRY_AFTER, HeaderValue::from(secs))];
        match self {
            Auth(AuthError::RateLimited(wait)) => {
                retry_after(wait.as_secs_f64().ceil().max(1.0) as u64)
            }
            Auth(_) | MetricsToken => {
                vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))]
            }
            RecipientLimit {
                retry_after_secs, ..
            }
            | QuotaExceeded {
                retry_after_secs, ..
            }
            | TooManyRecipients {
                retry_after_secs, ..
            } => retry_after((*retry_after_secs).max(1)),
            LimiterUnavailable | TooManySubscribers(_) => retry_after(1),
            // Receipts answer without one: the provider keeps its own retry schedule.
            ShuttingDown | RouterRestarting | NotProcessedInTime | NothingStored
            | AcceptQueueFull | IndexesBuilding | StoreUnavailable | SearchUnavailable => {
                retry_after(1)
            }
            // Someone has to fix the data first; a client should not hammer meanwhile.
            IndexesFailed => retry_after(30),
            MethodNotAllowed { allow } => HeaderValue::from_str(&allow.join(", "))
                .map(|v| vec![(header::ALLOW, v)])
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

impl ApiError {
    /// The JSON body: `{"error": {"code", "message", "field"?...}}`.
    pub fn body(&self) -> serde_json::Value {
        let code = self.code();
        let message = self.to_string();
        match self {
            ApiError::Invalid { field, .. } => {
                json!({"error": {"code": code, "field": field, "message": message}})
            }
            ApiError::Template(
                TemplateError::Invalid { field, .. } | TemplateError::Syntax { field, .. },
            ) => json!({"error": {"code": code, "field": field, "message": message}}),
            ApiError::Template(TemplateError::VariableMissing(name)) => {
                json!({"error": {"code": code, "field": format!("variables.{name}"), "message": message}})
            }
            ApiError::QuotaExceeded { reset_at, .. } => {
                let at = reset_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                json!({"error": {"code": code, "message": message, "resetAt": at}})
            }
            _ => json!({"error": {"code": code, "message": message}}),
        }
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        let body = self.body();
        let mut r =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        r.headers_mut().extend(self.headers());
        if let Some(kind) = self.audit_kind() {
            r.extensions_mut().insert(AuditNote { kind, code });
        }
        r
    }
}

/// On a response whose error is a security event: what the HTTP edge records in the audit
/// trail once it knows who asked (see `http::finish`).
#[derive(Debug, Clone, Copy)]
pub struct AuditNote {
    pub kind: AuditKind,
    pub code: &'static str,
}

impl ApiError {
    /// The security event this error is, if it is one.
    pub fn audit_kind(&self) -> Option<AuditKind> {
        Some(match self {
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) | ApiError::MetricsToken => {
                AuditKind::AuthFailed
            }
            ApiError::Auth(AuthError::RateLimited(_)) => AuditKind::RateLimited,
            ApiError::RecipientLimit { .. } | ApiError::TooManyRecipients { .. } => {
                AuditKind::RecipientLimited
            }
            ApiError::SenderNotAllowed { .. } => AuditKind::SenderRefused,
            ApiError::DestinationNotAllowed { .. } => AuditKind::DestinationRefused,
            ApiError::QuotaExceeded { .. } => AuditKind::QuotaExceeded,
            ApiError::Unsigned(_) | ApiError::BadSignature(_) | ApiError::VerificationFailed => {
                AuditKind::BadCallbackSignature
            }
            _ => return None,
        })
    }
}

/// The response of a handler: its answer, or its error rendered.
pub fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(Reply::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use warp::Filter;

    async fn rendered(
        e: impl Fn() -> ApiError + Clone + Send + Sync + 'static,
    ) -> (u16, serde_json::Value, warp::http::HeaderMap) {
        let r = warp::test::request()
            .reply(&warp::any().map(move || e().into_response()))
            .await;
        let body = serde_json::from_slice(r.body()).unwrap();
        (r.status().as_u16(), body, r.headers().clone())
    }

    #[tokio::test]
    async fn errors_render_the_one_shape_with_their_headers() {
        let (s, b, h) =
            rendered(|| AuthError::RateLimited(Duration::from_millis(1200)).into()).await;
        assert_eq!(s, 429);
        assert_eq!(b["error"]["code"], "rate_limited");
        assert_eq!(h[header::RETRY_AFTER], "2");
        let (s, b, h) = rendered(|| AuthError::Missing.into()).await;
        assert_eq!(
            (s, &h[header::WWW_AUTHENTICATE]),
            (401, &HeaderValue::from_static("Bearer"))
        );
        assert_eq!(
            b,
            json!({"error": {"code": "unauthorized",
                "message": "an API key is required: Authorization: Bearer <key>"}})
        );
        let (s, b, _) = rendered(|| ApiError::Invalid {
            field: "Idempotency-Key",
            message: "m".into(),
        })
        .await;
        assert_eq!(s, 400);
        assert_eq!(
            b,
            json!({"error": {"code": "validation_failed", "field": "Idempotency-Key", "message": "m"}})
        );
        let (s, _, h) = rendered(|| ApiError::MethodNotAllowed {
            allow: vec!["GET", "POST"],
        })
        .await;
        assert_eq!(
            (s, &h[header::ALLOW]),
            (405, &HeaderValue::from_static("GET, POST"))
        );
        let (s, b, h) = rendered(|| ApiError::ReceiptNotRecorded).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (503, Some("store_unavailable"))
        );
        assert!(h.get(header::RETRY_AFTER).is_none());
        let reset_at = chrono::DateTime::from_timestamp(86_400 * 20_000, 0).unwrap();
        let (s, b, h) = rendered(move || ApiError::QuotaExceeded {
            channel: Channel::Sms,
            max: 5,
            reset_at,
            retry_after_secs: 60,
        })
        .await;
        assert_eq!((s, &h[header::RETRY_AFTER]), (429, &HeaderValue::from(60)));
        assert_eq!(b["error"]["code"], "quota_exceeded");
        assert_eq!(b["error"]["resetAt"], "2024-10-04T00:00:00Z");
        let (s, b, _) = rendered(|| ApiError::SenderNotAllowed {
            channel: Channel::Email,
        })
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (403, Some("sender_not_allowed"))
        );
        let (_, b, h) = rendered(|| ApiError::SearchUnavailable).await;
        assert_eq!(h[header::RETRY_AFTER], "1");
        assert_eq!(
            b["error"]["message"],
            "search is unavailable; GET /api/v1/communication/{id} still answers from the store"
        );
    }
}
