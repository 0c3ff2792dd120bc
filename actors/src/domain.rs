//! The domain: channels, requests and their validation, communication records, stream
//! entries and log events. Pure data and pure functions; no I/O happens here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A delivery channel. Each has its own Redis Stream, consumer and sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
    Whatsapp,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Sms, Channel::Whatsapp];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "email" => Some(Channel::Email),
            "sms" => Some(Channel::Sms),
            "whatsapp" => Some(Channel::Whatsapp),
            _ => None,
        }
    }

    /// The seed's stream name: `{type}_stream`.
    pub fn stream(self) -> &'static str {
        match self {
            Channel::Email => "email_stream",
            Channel::Sms => "sms_stream",
            Channel::Whatsapp => "whatsapp_stream",
        }
    }

    /// Longest accepted message body, in characters.
    pub fn max_msg_chars(self) -> usize {
        match self {
            // Twilio: "The maximum length of Body is 1600 characters".
            Channel::Sms => 1600,
            // Meta: text.body "Maximum 4096 characters".
            Channel::Whatsapp => 4096,
            Channel::Email => ValidationLimits::DEFAULT_EMAIL_MAX_CHARS,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a communication is in its life. Stored in MongoDB as lowercase strings.
///
/// `scheduled` (stored with a `sendAt` ahead, on no stream yet) → `pending` (stored, waiting
/// for a worker) → `sending` (claimed by one worker, provider call in flight) → `sent` |
/// `failed`. A retryable failure returns it to `pending` with a `notBefore` time. A
/// `scheduled` record, or a `pending` one no worker has claimed yet, may be `canceled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for its `sendAt` (the SchedulerActor queues it then).
    Scheduled,
    Pending,
    Sending,
    Sent,
    Failed,
    /// From provider receipts, after `sent`.
    Delivered,
    Undelivered,
    Read,
    /// Canceled by its tenant before any worker claimed it: never sent.
    Canceled,
    /// The recipient is on the tenant's suppression list: never sent.
    Suppressed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Canceled => "canceled",
            Status::Pending => "pending",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Failed => "failed",
            Status::Delivered => "delivered",
            Status::Undelivered => "undelivered",
            Status::Read => "read",
            Status::Suppressed => "suppressed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "scheduled" => Some(Status::Scheduled),
            "canceled" => Some(Status::Canceled),
            "pending" => Some(Status::Pending),
            "sending" => Some(Status::Sending),
            "sent" => Some(Status::Sent),
            "failed" => Some(Status::Failed),
            "delivered" => Some(Status::Delivered),
            "undelivered" => Some(Status::Undelivered),
            "read" => Some(Status::Read),
            "suppressed" => Some(Status::Suppressed),
            _ => None,
        }
    }

    /// Nothing more to send: the provider has it (or refused it for good), or it was
    /// canceled.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Pending | Status::Sending | Status::Scheduled)
    }

    /// The states a provider receipt may move a record from (receipts can arrive out of
    /// order; a record never moves backwards).
    pub fn receipt_predecessors(self) -> &'static [&'static str] {
        match self {
            Status::Delivered => &["sent"],
            Status::Read => &["sent", "delivered"],
            Status::Undelivered | Status::Failed => &["sent", "delivered"],
            _ => &[],
        }
    }
}

/// What a log event reports: a step in a record's life, as `log_stream` fields and
/// Elasticsearch documents spell it (lowercase). Two of them are not record statuses:
/// `queued` (stored and on its stream) and `retrying` (a retryable failure, back to
/// `pending` until its retry is due).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Stored with a `sendAt` ahead; `queued` follows when it comes.
    Scheduled,
    Queued,
    Retrying,
    Sent,
    Failed,
    Delivered,
    Undelivered,
    Read,
    Canceled,
    Suppressed,
}

impl EventStatus {
    pub const ALL: [EventStatus; 10] = [
        EventStatus::Scheduled,
        EventStatus::Queued,
        EventStatus::Retrying,
        EventStatus::Sent,
        EventStatus::Failed,
        EventStatus::Delivered,
        EventStatus::Undelivered,
        EventStatus::Read,
        EventStatus::Canceled,
        EventStatus::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Queued => "queued",
            EventStatus::Retrying => "retrying",
            // The others are spelled as the status they leave the record in.
            other => other.record_status().as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<EventStatus> {
        EventStatus::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// The record's status after this event (`queued` and `retrying` leave it `pending`).
    pub fn record_status(self) -> Status {
        match self {
            EventStatus::Queued | EventStatus::Retrying => Status::Pending,
            EventStatus::Sent => Status::Sent,
            EventStatus::Failed => Status::Failed,
            EventStatus::Delivered => Status::Delivered,
            EventStatus::Undelivered => Status::Undelivered,
            EventStatus::Read => Status::Read,
            EventStatus::Scheduled => Status::Scheduled,
            EventStatus::Canceled => Status::Canceled,
            EventStatus::Suppressed => Status::Suppressed,
        }
    }

    /// How far along a record is after this event, within one attempt: events applied out
    /// of order must never move the record back, and every move MongoDB allows is a step
    /// up (`delivered` → `undelivered`, `failed` or `read`: a receipt's
    /// `receipt_predecessors`), so no allowed move is lost to an equal version.
    /// `scheduled` comes before `queued`; `canceled` ends a record that was never
    /// claimed (attempt 0), after its `scheduled` or `queued`.
    pub fn rank(self) -> u64 {
        match self {
            EventStatus::Scheduled => 0,
            EventStatus::Queued => 1,
            EventStatus::Retrying => 2,
            EventStatus::Sent => 3,
            EventStatus::Delivered => 4,
            EventStatus::Failed
            | EventStatus::Undelivered
            | EventStatus::Read
            | EventStatus::Suppressed => 5,
            EventStatus::Canceled => 6,
        }
    }

    /// The event that leaves a record as it is now (`pending`: `queued` before any
    /// attempt, else `retrying`); `None` for `sending`, which no event reports.
    pub fn of_record(status: Status, attempts: u32) -> Option<EventStatus> {
        match status {
            Status::Pending if attempts == 0 => Some(EventStatus::Queued),
            Status::Pending => Some(EventStatus::Retrying),
            other => EventStatus::try_from(other).ok(),
        }
    }
}

impl fmt::Display for EventStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record status that no event reports (`pending`, `sending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no log event reports the status {0:?}")]
pub struct NotAnEventStatus(pub Status);

/// The statuses a provider receipt reports.
impl TryFrom<Status> for EventStatus {
    type Error = NotAnEventStatus;

    fn try_from(s: Status) -> Result<EventStatus, NotAnEventStatus> {
        match s {
            Status::Sent => Ok(EventStatus::Sent),
            Status::Failed => Ok(EventStatus::Failed),
            Status::Delivered => Ok(EventStatus::Delivered),
            Status::Undelivered => Ok(EventStatus::Undelivered),
            Status::Read => Ok(EventStatus::Read),
            Status::Scheduled => Ok(EventStatus::Scheduled),
            Status::Canceled => Ok(EventStatus::Canceled),
            Status::Suppressed => Ok(EventStatus::Suppressed),
            Status::Pending | Status::Sending => Err(NotAnEventStatus(s)),
        }
    }
}

/// A message's lane (`"priority"` on a send): each channel reads its high lane before its
/// normal one before its bulk one. Normal is the default and keeps the seed's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Bulk,
}

impl Priority {
    /// In reading order: high first, bulk last.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Its place in [`Priority::ALL`] (0 is read first).
    pub fn rank(self) -> usize {
        self as usize
    }
}

/// The request's `priority`: `default` when absent (or null), else one of `high`,
/// `normal`, `bulk`; anything else is refused naming `priority`.
pub fn priority_of(raw: &RawRequest, default: Priority) -> Result<Priority, ValidationError> {
    match raw.priority.as_ref() {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::String(s)) => Priority::parse(s)
            .ok_or_else(|| invalid("priority", "priority must be one of high, normal, bulk")),
        Some(_) => Err(invalid(
            "priority",
            "priority must be one of high, normal, bulk",
        )),
    }
}

/// The body of `POST /api/v1/communication`, as received. Every field optional so that
/// validation, not deserialization, names what is missing.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRequest {
    #[serde(rename = "type")]
    pub kind: Option<serde_json::Value>,
    pub data: Option<serde_json::Value>,
    /// `{"type", "afterSeconds", "data"?}`: what to send instead if this message does not
    /// reach the person (see [`Fallback`]).
    #[serde(default)]
    pub fallback: Option<serde_json::Value>,
    /// `"sendAt": "<RFC 3339>"`: when to send (see [`send_at_of`]).
    #[serde(default, rename = "sendAt")]
    pub send_at: Option<serde_json::Value>,
    /// `"priority": "high" | "normal" | "bulk"`: the lane it is read in (see [`Priority`]).
    #[serde(default)]
    pub priority: Option<serde_json::Value>,
}

/// How far ahead a message may be scheduled, and how late a `sendAt` may be and still
/// mean "now" (the clocks of caller and service differ a little).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleLimits {
    pub horizon: chrono::Duration,
    pub past_grace: chrono::Duration,
}

impl ScheduleLimits {
    /// 30 days ahead; up to 5 s in the past is sent now.
    pub const DEFAULT_HORIZON_DAYS: u32 = 30;
    pub const PAST_GRACE_SECS: i64 = 5;

    pub fn with_horizon_days(days: u32) -> ScheduleLimits {
        ScheduleLimits {
            horizon: chrono::Duration::days(i64::from(days)),
            past_grace: chrono::Duration::seconds(Self::PAST_GRACE_SECS),
        }
    }
}

impl Default for ScheduleLimits {
    fn default() -> Self {
        ScheduleLimits::with_horizon_days(Self::DEFAULT_HORIZON_DAYS)
    }
}

/// The request's `sendAt`, read at `now`: `None` to send now (no `sendAt`, or one at most
/// `past_grace` ago or not after `now`), else the time to send at. Not RFC 3339, further
/// in the past, or beyond `now + horizon` is refused, naming `sendAt`.
pub fn send_at_of(
    raw: &RawRequest,
    now: DateTime<Utc>,
    limits: &ScheduleLimits,
) -> Result<Option<DateTime<Utc>>, ValidationError> {
    let text = match raw.send_at.as_ref() {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => {
            return Err(invalid(
                "sendAt",
                "sendAt must be an RFC 3339 date-time string",
            ))
        }
    };
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|e| {
            invalid(
                "sendAt",
                format!("sendAt must be an RFC 3339 date-time, like 2026-12-01T09:00:00Z ({e})"),
            )
        })?
        .with_timezone(&Utc);
    if at < now - limits.past_grace {
        return Err(invalid("sendAt", "sendAt is in the past"));
    }
    if at > now + limits.horizon {
        let days = limits.horizon.num_days();
        return Err(invalid(
            "sendAt",
            format!("sendAt is more than {days} days ahead"),
        ));
    }
    Ok((at > now).then_some(at))
}

/// A message to send instead when the first does not reach the person: created once the
/// first is not `delivered` or `read` within `after_secs` of its creation, or at once when
/// it fails for good.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    pub after_secs: u32,
    pub request: NewCommunication,
}

/// A request's `fallback` before its message is validated: the channel, the wait, and its
/// own `data` with what it leaves out taken from the first message (see [`fallback_of`]).
#[derive(Debug, Clone)]
pub struct RawFallback {
    pub after_secs: u32,
    /// The fallback's request, ready for [`validate_with`].
    pub request: RawRequest,
}

/// Read `fallback` of a request whose own message is `first`: its `type` (another
/// channel), `afterSeconds` (1 to `max_after_secs`) and optional `data`, where `msg`
/// defaults to the first message's, and `to` and `from` too between channels with the same
/// kind of address (WhatsApp and SMS); otherwise `from` is left to the caller's defaults.
/// `None` without a `fallback`.
pub fn fallback_of(
    raw: &RawRequest,
    first: &NewCommunication,
    max_after_secs: u32,
) -> Result<Option<RawFallback>, ValidationError> {
    let obj = match raw.fallback.as_ref() {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Object(o)) => o,
        Some(_) => {
            return Err(invalid(
                "fallback",
                "fallback must be an object with type and afterSeconds",
            ))
        }
    };
    let channel = channel_of(obj.get("type")).map_err(|e| ValidationError {
        field: "fallback.type",
        message: format!("fallback.{}", e.message),
    })?;
    if channel == first.channel {
        return Err(invalid(
            "fallback.type",
            "fallback.type must be another channel than the message's",
        ));
    }
    let after_secs = obj
        .get("afterSeconds")
        .and_then(serde_json::Value::as_u64)
        .filter(|s| (1..=u64::from(max_after_secs)).contains(s))
        .ok_or_else(|| {
            invalid(
                "fallback.afterSeconds",
                format!("fallback.afterSeconds must be a whole number from 1 to {max_after_secs}"),
            )
        })? as u32;
    let mut data = match obj.get("data") {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(d)) => d.clone(),
        Some(_) => return Err(invalid("fallback.data", "fallback.data must be an object")),
    };
    let same_kind = (channel == Channel::Email) == (first.channel == Channel::Email);
    if same_kind {
        data.entry("to").or_insert_with(|| first.to.clone().into());
        data.entry("from")
            .or_insert_with(|| first.from.clone().into());
    }
    data.entry("msg")
        .or_insert_with(|| first.msg.clone().into());
    Ok(Some(RawFallback {
        after_secs,
        request: RawRequest {
            kind: Some(channel.as_str().into()),
            data: Some(serde_json::Value::Object(data)),
            fallback: None,
            send_at: None,
            priority: None,
        },
    }))
}

/// A field of a fallback's own message, as its errors name it.
pub fn fallback_field(field: &'static str) -> &'static str {
    match field {
        "type" => "fallback.type",
        "data" => "fallback.data",
        "from" => "fallback.data.from",
        "to" => "fallback.data.to",
        "msg" => "fallback.data.msg",
        "subject" => "fallback.data.subject",
        other => other,
    }
}

impl Fallback {
    /// The request's fingerprint with this fallback in it: a replay must ask for the same.
    pub fn fingerprint_with(&self, first: &str) -> String {
        hex_sha256(&[
            first.as_bytes(),
            &self.after_secs.to_be_bytes(),
            self.request.fingerprint().as_bytes(),
        ])
    }
}

/// Lower-case hex digits of `bytes`, in one string (not one `format!` a byte: a request's
/// fingerprint is made for every request). Every digest the service writes as hex uses it.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// SHA-256 of the parts, one after the other, in hex.
fn hex_sha256(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    to_hex(&h.finalize())
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommunication {
    pub channel: Channel,
    pub from: String,
    pub to: String,
    pub msg: String,
    pub subject: Option<String>,
}

impl NewCommunication {
    /// A stable digest of what was asked: same request, same fingerprint.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.channel.as_str(),
            &self.from,
            &self.to,
            &self.msg,
            self.subject.as_deref().unwrap_or("\u{0}none"),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        to_hex(&h.finalize())
    }
}

/// Why a request was refused: the field and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field,
        message: message.into(),
    }
}

fn required_string(
    data: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<String, ValidationError> {
    match data.get(field) {
        None | Some(serde_json::Value::Null) => {
            Err(invalid(field, format!("data.{field} is required")))
        }
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
            Err(invalid(field, format!("data.{field} must not be empty")))
        }
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(field, format!("data.{field} must be a string"))),
    }
}

/// E.164: `+`, a non-zero first digit, at most 15 digits in all.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    !digits.is_empty()
        && digits.len() <= 15
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// A recipient as the suppression list keys it: an email address trimmed and lowercased,
/// a phone number (SMS, WhatsApp) trimmed and E.164 as validated; `None` if it is neither.
pub fn suppression_address(channel: Channel, address: &str) -> Option<String> {
    let a = address.trim();
    match channel {
        Channel::Email => Some(a.to_lowercase()).filter(|a| is_email_address(a)),
        Channel::Sms | Channel::Whatsapp => Some(a.to_string()).filter(|a| is_e164(a)),
    }
}

/// A conservative address check with RFC 5321 lengths: local part ≤ 64, domain ≤ 255,
/// whole path ≤ 254 (256 minus the angle brackets).
pub fn is_email_address(s: &str) -> bool {
    if s.len() > 254 {
        return false;
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.len() > 255 {
        return false;
    }
    let local_ok = local
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    let domain_ok = domain.split('.').count() >= 2
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

/// A WhatsApp/Twilio sender: an E.164 number, or a sender id made of letters, digits and
/// `_-:.` (e.g. a Messaging Service SID or an alphanumeric sender id).
fn is_phone_sender(s: &str) -> bool {
    is_e164(s)
        || (s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b))
            && s.bytes().any(|b| b.is_ascii_alphabetic()))
}

fn has_forbidden_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
}

/// The configurable part of validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    pub email_max_chars: usize,
    /// The longest `fallback.afterSeconds`.
    pub fallback_max_after_secs: u32,
}

impl ValidationLimits {
    pub const DEFAULT_EMAIL_MAX_CHARS: usize = 60_000;
    /// A week.
    pub const DEFAULT_FALLBACK_MAX_AFTER_SECS: u32 = 7 * 24 * 3600;

    pub fn max_msg_chars(&self, channel: Channel) -> usize {
        match channel {
            Channel::Email => self.email_max_chars,
            other => other.max_msg_chars(),
        }
    }
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            email_max_chars: Self::DEFAULT_EMAIL_MAX_CHARS,
            fallback_max_after_secs: Self::DEFAULT_FALLBACK_MAX_AFTER_SECS,
        }
    }
}

/// [`validate_with`] the default limits.
pub fn validate(raw: &RawRequest) -> Result<NewCommunication, ValidationError> {
    validate_with(raw, &ValidationLimits::default())
}

/// Validate a request body against every rule; the error names the first field that
/// breaks one (fields are checked in this order: type, data, from, to, msg, subject, then
/// the addresses for the channel, then the body).
pub fn validate_with(
    raw: &RawRequest,
    limits: &ValidationLimits,
) -> Result<NewCommunication, ValidationError> {
    let channel = channel_of(raw.kind.as_ref())?;
    let data = data_of(raw.data.as_ref())?;
    let from = required_string(data, "from")?;
    let to = required_string(data, "to")?;
    let msg = required_string(data, "msg")?;
    let subject = subject_of(data, channel)?;
    match channel {
        Channel::Email => check_email_addresses(&from, &to)?,
        Channel::Sms | Channel::Whatsapp => check_phone_addresses(&from, &to)?,
    }
    check_msg(&msg, limits.max_msg_chars(channel), channel)?;
    Ok(NewCommunication {
        channel,
        from,
        to,
        msg,
        subject,
    })
}

fn channel_of(kind: Option<&serde_json::Value>) -> Result<Channel, ValidationError> {
    match kind {
        None | Some(serde_json::Value::Null) => Err(invalid(
            "type",
            "type is required: one of email, sms, whatsapp",
        )),
        Some(serde_json::Value::String(s)) => Channel::parse(s).ok_or_else(|| {
            invalid(
                "type",
                format!("type must be one of email, sms, whatsapp (got {s:?})"),
            )
        }),
        Some(_) => Err(invalid(
            "type",
            "type must be a string: email, sms or whatsapp",
        )),
    }
}

fn data_of(
    data: Option<&serde_json::Value>,
) -> Result<&serde_json::Map<String, serde_json::Value>, ValidationError> {
    match data {
        Some(serde_json::Value::Object(map)) => Ok(map),
        None | Some(serde_json::Value::Null) => Err(invalid(
            "data",
            "data is required: an object with from, to and msg",
        )),
        Some(_) => Err(invalid(
            "data",
            "data must be an object with from, to and msg",
        )),
    }
}

/// Email only: one line of at most 998 characters (RFC 5322's line limit).
fn subject_of(
    data: &serde_json::Map<String, serde_json::Value>,
    channel: Channel,
) -> Result<Option<String>, ValidationError> {
    match data.get("subject") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if channel == Channel::Email => {
            if s.chars().count() > 998 || has_forbidden_control(s) || s.contains('\n') {
                return Err(invalid(
                    "subject",
                    "data.subject must be one line of at most 998 characters",
                ));
            }
            Ok(Some(s.clone()))
        }
        Some(serde_json::Value::String(_)) => {
            Err(invalid("subject", "data.subject is only allowed for email"))
        }
        Some(_) => Err(invalid("subject", "data.subject must be a string")),
    }
}

fn check_email_addresses(from: &str, to: &str) -> Result<(), ValidationError> {
    if !is_email_address(from) {
        return Err(invalid("from", "data.from must be an email address"));
    }
    if !is_email_address(to) {
        return Err(invalid("to", "data.to must be an email address"));
    }
    Ok(())
}

fn check_phone_addresses(from: &str, to: &str) -> Result<(), ValidationError> {
    if !is_phone_sender(from) {
        return Err(invalid(
            "from",
            "data.from must be an E.164 number (+15550001111) or a sender id",
        ));
    }
    if !is_e164(to) {
        return Err(invalid(
            "to",
            "data.to must be an E.164 number: '+' then up to 15 digits, no leading 0",
        ));
    }
    Ok(())
}

fn check_msg(msg: &str, max: usize, channel: Channel) -> Result<(), ValidationError> {
    if msg.chars().count() > max {
        return Err(invalid(
            "msg",
            format!("data.msg is longer than the {channel} limit of {max} characters"),
        ));
    }
    if has_forbidden_control(msg) {
        return Err(invalid(
            "msg",
            "data.msg must not contain control characters other than newline and tab",
        ));
    }
    Ok(())
}

/// One communication record, as the source of truth (MongoDB) holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Communication {
    /// 24 hex digits (a MongoDB ObjectId).
    pub id: String,
    /// The tenant whose API key sent it; only that tenant can read or search it.
    pub tenant: String,
    pub channel: Channel,
    pub from: String,
    pub to: String,
    pub msg: String,
    pub subject: Option<String>,
    pub status: Status,
    pub attempts: u32,
    /// The attempts made before its last replay (`POST /api/v1/dead-letters/{id}/replay`):
    /// its retry budget counts from here, while attempt numbers keep growing.
    pub attempt_base: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub provider: Option<String>,
    pub provider_message_id: Option<String>,
    pub last_error: Option<String>,
    pub errors: Vec<AttemptError>,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<String>,
    /// SHA-256 of the validated request, to tell a replay from a different request.
    pub request_hash: String,
    /// What to send instead if this does not reach the person.
    pub fallback: Option<Fallback>,
    /// The record this one is the fallback of.
    pub fallback_of: Option<String>,
    /// The template its message was rendered from.
    pub template: Option<TemplateRef>,
    /// The bulk send (`POST /api/v1/communications/bulk`) it was one recipient of.
    pub batch_id: Option<String>,
    /// An email's HTML part (rendered from its template); `msg` is the text part.
    pub html: Option<String>,
    /// When to send it: set on a `scheduled` record.
    pub send_at: Option<DateTime<Utc>>,
    /// Its lane: every entry for it goes to that lane's stream.
    pub priority: Priority,
    /// The W3C `traceparent` of the request that made it (when traces are exported): its
    /// stream entries, provider calls and receipts continue that trace. Never shown to
    /// tenants.
    pub traceparent: Option<String>,
}

/// A template version a message was rendered from, and the locale variant used.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRef {
    pub name: String,
    pub version: u32,
    pub locale: Option<String>,
}

impl Communication {
    pub fn new(id: String, req: NewCommunication, now: DateTime<Utc>) -> Communication {
        let request_hash = req.fingerprint();
        Communication {
            idempotency_key: None,
            request_hash,
            id,
            tenant: DEFAULT_TENANT.to_string(),
            channel: req.channel,
            from: req.from,
            to: req.to,
            msg: req.msg,
            subject: req.subject,
            status: Status::Pending,
            attempts: 0,
            attempt_base: 0,
            created_at: now,
            updated_at: now,
            provider: None,
            provider_message_id: None,
            last_error: None,
            errors: Vec::new(),
            fallback: None,
            fallback_of: None,
            template: None,
            batch_id: None,
            send_at: None,
            html: None,
            priority: Priority::Normal,
            traceparent: None,
        }
    }

    /// This record sent at `send_at` (`scheduled` until then), which is part of its
    /// fingerprint: a replay must ask for the same time.
    pub fn scheduled_at(mut self, send_at: Option<DateTime<Utc>>) -> Communication {
        if let Some(at) = send_at {
            let millis = at.timestamp_millis().to_be_bytes();
            self.request_hash = hex_sha256(&[self.request_hash.as_bytes(), &millis]);
            self.status = Status::Scheduled;
        }
        self.send_at = send_at;
        self
    }

    /// This record with a fallback: kept with it, and part of its fingerprint.
    pub fn with_fallback(mut self, fallback: Option<Fallback>) -> Communication {
        if let Some(f) = &fallback {
            self.request_hash = f.fingerprint_with(&self.request_hash);
        }
        self.fallback = fallback;
        self
    }

    /// The Redis Stream entry for this communication (the seed's fields plus `type` and
    /// `subject`).
    pub fn stream_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("_id", self.id.clone()),
            ("type", self.channel.as_str().to_string()),
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("msg", self.msg.clone()),
            ("status", self.status.as_str().to_string()),
            ("tenant", self.tenant.clone()),
        ];
        if self.priority != Priority::Normal {
            fields.push(("priority", self.priority.as_str().to_string()));
        }
        if let Some(s) = &self.subject {
            fields.push(("subject", s.clone()));
        }
        if let Some(t) = &self.traceparent {
            fields.push(("traceparent", t.clone()));
        }
        fields
    }
}

/// One failed attempt, kept on the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: u32,
    pub at: DateTime<Utc>,
    /// The provider that refused (or did not answer); `None` on records from before
    /// routing, or for an error outside any provider call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub code: Option<String>,
    pub message: String,
}

/// Why an attempt's outcome is unknown: the provider may have taken the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ambiguity {
    /// The claim went stale (the worker died or stalled) with the provider call possibly
    /// made.
    StaleLease,
    /// No answer within the timeout, after the request may have left.
    Timeout,
    /// The connection broke after the request may have been written.
    ConnectionReset,
    /// 502/503/504 without the provider's own error body: a proxy or load balancer in
    /// front of the provider answered, and the provider may have taken the message.
    Gateway5xx,
    /// This worker's lease lapsed and another worker claimed the record while this
    /// worker's provider call may have gone through (its outcome write was fenced off).
    LostLease,
}

impl Ambiguity {
    /// The `cause` label of `possible_duplicate_sends_total` and the record's
    /// `possibleDuplicateCause`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ambiguity::StaleLease => "stale_lease",
            Ambiguity::Timeout => "timeout",
            Ambiguity::ConnectionReset => "connection_reset",
            Ambiguity::Gateway5xx => "ambiguous_5xx",
            Ambiguity::LostLease => "lost_lease",
        }
    }

    pub fn parse(s: &str) -> Option<Ambiguity> {
        [
            Ambiguity::StaleLease,
            Ambiguity::Timeout,
            Ambiguity::ConnectionReset,
            Ambiguity::Gateway5xx,
            Ambiguity::LostLease,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// An attempt whose outcome is unknown: the provider may have the message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnknownAttempt {
    /// The attempt whose outcome is unknown (the latest such, if several).
    pub attempt: u32,
    pub cause: Ambiguity,
    /// No earlier than the start of the first attempt whose outcome is unknown: where a
    /// lookup at the provider begins.
    pub since: DateTime<Utc>,
    /// The provider that may have the message (by its `Provider::name`); `None` when that
    /// is not known (a stale claim, or unknown outcomes at two providers): every provider
    /// of the channel is asked.
    pub provider: Option<&'static str>,
}

/// A record claimed by one worker for one provider call.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub record: Communication,
    /// An earlier attempt ended without a known outcome (a stale claim, a timeout, a
    /// reset, an ambiguous 5xx): the provider may have the message, so ask it before
    /// sending again where it can tell, and flag a resend as a possible duplicate.
    pub unknown: Option<UnknownAttempt>,
}

/// What the claim step decided for one id.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimResult {
    Claimed(Box<Claimed>),
    /// Already `sent`/`failed`, or its retry is not yet due: nothing to do for this entry.
    Skip(&'static str),
    /// Another live worker holds it; leave the stream entry pending.
    Busy,
}

/// The outcome of one provider call (or of the claim that made none), to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent {
        provider: String,
        provider_message_id: Option<String>,
        /// This call was a resend after an attempt of unknown outcome: it may be a second
        /// send (flagged on the record, with that attempt and its cause).
        possible_duplicate: Option<UnknownAttempt>,
        /// The refusals of the providers tried before this one in the same attempt.
        failovers: Vec<AttemptError>,
    },
    Failed {
        provider: String,
        error: AttemptError,
        possible_duplicate: Option<UnknownAttempt>,
        failovers: Vec<AttemptError>,
    },
    Retry {
        provider: String,
        error: AttemptError,
        not_before: DateTime<Utc>,
        possible_duplicate: Option<UnknownAttempt>,
        /// This attempt's own outcome is unknown: the next claim asks the provider first.
        unknown: Option<UnknownAttempt>,
        failovers: Vec<AttemptError>,
    },
    /// The recipient is on the tenant's suppression list: no call was made, and none will
    /// be.
    Suppressed,
}

impl Outcome {
    /// The call this outcome records may have left the message with the provider: it was
    /// accepted, or its answer was lost (a retry of unknown outcome).
    pub fn may_have_reached_provider(&self) -> bool {
        match self {
            Outcome::Sent { .. } => true,
            Outcome::Retry { unknown, .. } => unknown.is_some(),
            Outcome::Failed { .. } | Outcome::Suppressed => false,
        }
    }

    /// The refusals of the providers tried before the one this outcome is from.
    pub fn failovers(&self) -> &[AttemptError] {
        match self {
            Outcome::Sent { failovers, .. }
            | Outcome::Failed { failovers, .. }
            | Outcome::Retry { failovers, .. } => failovers,
            Outcome::Suppressed => &[],
        }
    }

    /// This outcome, after the providers that refused before it in the same attempt.
    pub fn with_failovers(mut self, errors: Vec<AttemptError>) -> Outcome {
        match &mut self {
            Outcome::Sent { failovers, .. }
            | Outcome::Failed { failovers, .. }
            | Outcome::Retry { failovers, .. } => *failovers = errors,
            Outcome::Suppressed => {}
        }
        self
    }

    /// The call this outcome records was a resend that may duplicate.
    pub fn possible_duplicate(&self) -> Option<UnknownAttempt> {
        match self {
            Outcome::Sent {
                possible_duplicate, ..
            }
            | Outcome::Failed {
                possible_duplicate, ..
            }
            | Outcome::Retry {
                possible_duplicate, ..
            } => *possible_duplicate,
            Outcome::Suppressed => None,
        }
    }
}

/// A log event, the seed's `communication-logs` model plus what the `communications` index
/// needs to follow the record's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEvent {
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub service: String,
    pub status: EventStatus,
    pub from: String,
    pub to: String,
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub communication_id: String,
    pub timestamp: DateTime<Utc>,
    #[serde(rename = "type")]
    pub channel: Channel,
    /// A `communication-logs` document leaves out an attempt of 0 (the accepting events'):
    /// read back as 0.
    #[serde(default)]
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub provider_message_id: Option<String>,
    /// The bulk send the record was one recipient of (searchable as `batchId`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub batch_id: Option<String>,
    /// The `log_stream` entry id the event was read from (the live subscribers' cursor):
    /// set by the LogIndexer, stored in `communication-logs` with its number `cursorSeq`,
    /// so a subscriber resumes from Elasticsearch once the stream is trimmed. Not a field
    /// of the stream entry itself.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cursor: Option<String>,
    /// The record's lane (searchable as `priority`); `None` on events from before lanes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub priority: Option<Priority>,
    /// The body was left out of the stream entry (longer than [`LOG_EVENT_BODY_MAX`]):
    /// the LogIndexer reads it from MongoDB.
    #[serde(skip)]
    pub msg_omitted: bool,
}

/// Longest body a `log_stream` entry carries (bytes); a longer one (an email, mostly) is
/// read from MongoDB by the LogIndexer, so an Elasticsearch outage that holds events in
/// Redis holds a few hundred bytes each, not whole messages.
pub const LOG_EVENT_BODY_MAX: usize = 1024;

impl LogEvent {
    pub fn for_record(
        rec: &Communication,
        service: &str,
        status: EventStatus,
        attempt: u32,
        now: DateTime<Utc>,
    ) -> LogEvent {
        LogEvent {
            tenant: rec.tenant.clone(),
            service: service.to_string(),
            status,
            from: rec.from.clone(),
            to: rec.to.clone(),
            msg: rec.msg.clone(),
            error: None,
            communication_id: rec.id.clone(),
            timestamp: now,
            channel: rec.channel,
            attempt,
            created_at: rec.created_at,
            provider: None,
            provider_message_id: None,
            batch_id: rec.batch_id.clone(),
            cursor: None,
            priority: Some(rec.priority),
            msg_omitted: false,
        }
    }

    /// Deterministic document id in `communication-logs`: a replayed event overwrites
    /// nothing and duplicates nothing.
    pub fn log_doc_id(&self) -> String {
        format!("{}:{}:{}", self.communication_id, self.status, self.attempt)
    }
}

/// One entry read from a Redis Stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A message on its way to a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    pub communication_id: String,
    pub from: String,
    pub to: String,
    pub subject: Option<String>,
    pub body: String,
    /// An email's HTML part, sent beside `body` (the text part).
    pub html: Option<String>,
}

/// What a provider said when it accepted a message.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderReceipt {
    pub provider_message_id: Option<String>,
}

/// How a provider failure is to be treated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ErrorClass {
    /// Worth another try later (network error, timeout, 5xx, rate limit).
    Retryable {
        retry_after: Option<std::time::Duration>,
    },
    /// Will never succeed as sent: it is about the message (invalid or unreachable number,
    /// blocked or unsubscribed recipient, refused address). Another provider would refuse
    /// it too.
    Permanent,
    /// Refused for good by this provider for a reason of the account or sender there (bad
    /// credentials, account suspended, no balance, sender not enabled): the next provider
    /// of the channel may send it, and it counts against this provider's breaker.
    Account,
}

/// What a provider could tell of a message we may have sent it before.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// It has the message (matched on recipient, sender, body and time).
    Found(ProviderReceipt),
    /// It has no such message.
    NotFound,
    /// It offers no way to tell (Meta's Cloud API, SMTP).
    CannotTell,
}

/// A provider's refusal, with its own code and message kept for the record.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub class: ErrorClass,
    /// The call failed in a way that leaves open whether the provider took the message
    /// (a timeout or reset after the request left, a 502/503/504 from a proxy).
    pub ambiguous: Option<Ambiguity>,
    /// The provider said "too many requests" (HTTP 429, Twilio 20429, Meta 130429…): a
    /// matter for the rate limit, not for the circuit breaker.
    pub rate_limited: bool,
    pub code: Option<String>,
    pub message: String,
}

/// Flat Redis Stream fields for a log event (readable with `XRANGE log_stream - +`).
impl LogEvent {
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let omit = self.msg_omitted || self.msg.len() > LOG_EVENT_BODY_MAX;
        let msg = if omit {
            String::new()
        } else {
            self.msg.clone()
        };
        let mut f = vec![
            ("tenant", self.tenant.clone()),
            ("service", self.service.clone()),
            ("status", self.status.as_str().to_string()),
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("msg", msg),
            ("communicationId", self.communication_id.clone()),
            ("timestamp", self.timestamp.to_rfc3339()),
            ("type", self.channel.as_str().to_string()),
            ("attempt", self.attempt.to_string()),
            ("createdAt", self.created_at.to_rfc3339()),
        ];
        if let Some(e) = &self.error {
            f.push(("error", e.clone()));
        }
        if let Some(p) = &self.provider {
            f.push(("provider", p.clone()));
        }
        if let Some(p) = &self.provider_message_id {
            f.push(("providerMessageId", p.clone()));
        }
        if let Some(b) = &self.batch_id {
            f.push(("batchId", b.clone()));
        }
        if let Some(p) = self.priority {
            f.push(("priority", p.as_str().to_string()));
        }
        if omit {
            f.push(("msgOmitted", "1".to_string()));
        }
        f
    }

    /// Decode a `log_stream` entry; an entry that does not decode is dead-lettered.
    pub fn from_entry(e: &StreamEntry) -> Result<LogEvent, DecodeError> {
        let req = |k: &'static str| e.field(k).ok_or(DecodeError::MissingField(k));
        let time = |k: &'static str| -> Result<DateTime<Utc>, DecodeError> {
            DateTime::parse_from_rfc3339(req(k)?)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|err| DecodeError::BadTime(k, err))
        };
        let status = req("status")?;
        let channel = req("type")?;
        Ok(LogEvent {
            tenant: e.field("tenant").unwrap_or(DEFAULT_TENANT).to_string(),
            service: req("service")?.to_string(),
            status: EventStatus::parse(status)
                .ok_or_else(|| DecodeError::BadStatus(status.to_string()))?,
            from: req("from")?.to_string(),
            to: req("to")?.to_string(),
            msg: req("msg")?.to_string(),
            error: e.field("error").map(str::to_string),
            communication_id: req("communicationId")?.to_string(),
            timestamp: time("timestamp")?,
            channel: Channel::parse(channel)
                .ok_or_else(|| DecodeError::BadChannel(channel.to_string()))?,
            attempt: req("attempt")?.parse().map_err(DecodeError::BadAttempt)?,
            created_at: time("createdAt")?,
            provider: e.field("provider").map(str::to_string),
            provider_message_id: e.field("providerMessageId").map(str::to_string),
            batch_id: e.field("batchId").map(str::to_string),
            cursor: None,
            priority: e.field("priority").and_then(Priority::parse),
            msg_omitted: e.field("msgOmitted") == Some("1"),
        })
    }
}

/// Why a `log_stream` entry is not a log event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("bad {0}: {1}")]
    BadTime(&'static str, chrono::ParseError),
    #[error("bad status {0:?}")]
    BadStatus(String),
    #[error("bad type {0:?}")]
    BadChannel(String),
    #[error("bad attempt: {0}")]
    BadAttempt(std::num::ParseIntError),
}

/// The tenant of records stored before tenants existed, and of every request in local
/// development mode without keys.
pub const DEFAULT_TENANT: &str = "default";

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

/// Name of the stream that carries log events.
pub const LOG_STREAM: &str = "log_stream";
/// Where log events that Elasticsearch refuses for good are kept.
pub const LOG_DEAD_LETTER_STREAM: &str = "log_stream:dlq";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(v: serde_json::Value) -> RawRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_email_body_limit_is_configurable() {
        let body = |n: usize| {
            raw(
                json!({"type": "email", "data": {"from": "a@example.com", "to": "b@example.com", "msg": "x".repeat(n)}}),
            )
        };
        let small = ValidationLimits {
            email_max_chars: 10,
            ..ValidationLimits::default()
        };
        assert!(validate_with(&body(10), &small).is_ok());
        let e = validate_with(&body(11), &small).unwrap_err();
        assert_eq!(e.field, "msg");
        assert!(e.message.contains("10"), "{}", e.message);
        assert!(validate(&body(ValidationLimits::DEFAULT_EMAIL_MAX_CHARS)).is_ok());
        assert!(validate(&body(ValidationLimits::DEFAULT_EMAIL_MAX_CHARS + 1)).is_err());
        // SMS and WhatsApp limits are the providers' and do not move.
        let sms = raw(
            json!({"type": "sms", "data": {"from": "+15550001111", "to": "+15557654321", "msg": "x".repeat(1601)}}),
        );
        assert!(validate_with(
            &sms,
            &ValidationLimits {
                email_max_chars: 100_000,
                ..ValidationLimits::default()
            }
        )
        .is_err());
    }

    #[test]
    fn accepts_the_seed_example() {
        let r = validate(&raw(
            json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"hi"}}),
        ))
        .unwrap();
        assert_eq!(r.channel, Channel::Sms);
        assert_eq!(r.to, "+15557654321");
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases = [
            (json!({"data":{"from":"a","to":"b","msg":"c"}}), "type"),
            (
                json!({"type":"fax","data":{"from":"a","to":"b","msg":"c"}}),
                "type",
            ),
            (json!({"type":7,"data":{}}), "type"),
            (json!({"type":"sms"}), "data"),
            (json!({"type":"sms","data":"x"}), "data"),
            (
                json!({"type":"sms","data":{"to":"+15557654321","msg":"c"}}),
                "from",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321"}}),
                "msg",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"  "}}),
                "msg",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":5,"msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"5557654321","msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+05557654321","msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+1234567890123456","msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"sms","data":{"from":"not a sender!","to":"+15557654321","msg":"c"}}),
                "from",
            ),
            (
                json!({"type":"whatsapp","data":{"from":"+15550001111","to":"+1555x","msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"email","data":{"from":"a@example.com","to":"nobody","msg":"c"}}),
                "to",
            ),
            (
                json!({"type":"email","data":{"from":"a@","to":"b@example.com","msg":"c"}}),
                "from",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"x".repeat(1601)}}),
                "msg",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"bell\u{7}"}}),
                "msg",
            ),
            (
                json!({"type":"sms","data":{"from":"+15550001111","to":"+15557654321","msg":"c","subject":"s"}}),
                "subject",
            ),
        ];
        for (body, field) in cases {
            let err = validate(&raw(body.clone())).expect_err(&body.to_string());
            assert_eq!(err.field, field, "{body}: {err}");
        }
    }

    #[test]
    fn send_at_is_rfc_3339_within_the_horizon() {
        let now = DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let limits = ScheduleLimits::with_horizon_days(30);
        let at = |v: serde_json::Value| {
            let r = raw(json!({"type": "sms", "data": {}, "sendAt": v}));
            send_at_of(&r, now, &limits)
        };
        let time = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        // Ahead, in any offset, up to the horizon: that time.
        for (given, expected) in [
            ("2026-11-28T12:00:01Z", "2026-11-28T12:00:01Z"),
            ("2026-11-28T14:00:01+02:00", "2026-11-28T12:00:01Z"),
            ("2026-12-28T12:00:00Z", "2026-12-28T12:00:00Z"),
            ("2026-12-01T09:00:00.250-05:00", "2026-12-01T14:00:00.250Z"),
        ] {
            assert_eq!(at(json!(given)), Ok(Some(time(expected))), "{given}");
        }
        // Absent, null, now itself, or a moment ago (5 s grace): now.
        assert_eq!(at(json!("2026-11-28T14:00:00+02:00")), Ok(None));
        assert_eq!(
            send_at_of(&raw(json!({"type": "sms"})), now, &limits),
            Ok(None)
        );
        assert_eq!(at(json!(null)), Ok(None));
        assert_eq!(at(json!("2026-11-28T11:59:55Z")), Ok(None));
        // Refused, naming sendAt.
        for bad in [
            json!("2026-11-28T11:59:54Z"),
            json!("2026-12-28T12:00:00.001Z"),
            json!("2026-11-28 12:00"),
            json!("tomorrow"),
            json!(""),
            json!(1_800_000_000),
            json!({"at": "2026-11-29T00:00:00Z"}),
        ] {
            let err = at(bad.clone()).expect_err(&bad.to_string());
            assert_eq!(err.field, "sendAt", "{bad}");
        }
    }

    #[test]
    fn fingerprints_are_the_lower_case_hex_of_their_digest_as_before() {
        use sha2::{Digest, Sha256};
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        // Stored records keep their `requestHash`: the digest written as one `format!` a
        // byte (before) and as one string (now) are the same text.
        let digest = Sha256::digest(b"abc");
        let before: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(to_hex(&digest), before);
        assert_eq!(
            before,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_scheduled_record_is_fingerprinted_with_its_time() {
        let req = || NewCommunication {
            channel: Channel::Sms,
            from: "+15550001111".into(),
            to: "+15557654321".into(),
            msg: "hi".into(),
            subject: None,
        };
        let now = Utc::now();
        let plain = Communication::new("a".into(), req(), now).scheduled_at(None);
        assert_eq!(plain.status, Status::Pending);
        assert_eq!(plain.request_hash, req().fingerprint());
        let at = |secs| Some(now + chrono::Duration::seconds(secs));
        let one = Communication::new("a".into(), req(), now).scheduled_at(at(60));
        let other = Communication::new("a".into(), req(), now).scheduled_at(at(61));
        assert_eq!(one.status, Status::Scheduled);
        assert_ne!(one.request_hash, plain.request_hash);
        assert_ne!(one.request_hash, other.request_hash);
    }

    #[test]
    fn scheduled_and_canceled_rank_around_a_first_attempt() {
        use EventStatus::*;
        assert!(Scheduled.rank() < Queued.rank());
        for e in EventStatus::ALL {
            assert!(e == Canceled || e.rank() < Canceled.rank(), "{e}");
            assert!(e.rank() < 10, "a rank stays within its attempt");
            assert_eq!(EventStatus::parse(e.as_str()), Some(e));
        }
        assert_eq!(
            EventStatus::of_record(Status::Scheduled, 0),
            Some(Scheduled)
        );
        assert_eq!(EventStatus::of_record(Status::Canceled, 0), Some(Canceled));
        assert!(Status::Canceled.is_terminal() && !Status::Scheduled.is_terminal());
    }

    #[test]
    fn email_lengths_follow_rfc_5321() {
        let local = "a".repeat(64);
        assert!(is_email_address(&format!("{local}@example.com")));
        assert!(!is_email_address(&format!("a{local}@example.com")));
        assert!(!is_email_address("a..b@example.com"));
        assert!(!is_email_address("ab@localhost"));
    }

    #[test]
    fn event_statuses_keep_their_wire_spelling() {
        let wire = [
            "scheduled",
            "queued",
            "retrying",
            "sent",
            "failed",
            "delivered",
            "undelivered",
            "read",
            "canceled",
        ];
        for (status, text) in EventStatus::ALL.into_iter().zip(wire) {
            assert_eq!(status.as_str(), text);
            assert_eq!(serde_json::to_value(status).unwrap(), json!(text));
            assert_eq!(EventStatus::parse(text), Some(status));
        }
        assert_eq!(EventStatus::parse("pending"), None);
        assert!(EventStatus::try_from(Status::Sending).is_err());
        assert_eq!(EventStatus::try_from(Status::Read), Ok(EventStatus::Read));
        let rec = crate::testing::record(1, Channel::Sms);
        let ev = LogEvent::for_record(&rec, "sms", EventStatus::Sent, 1, Utc::now());
        let mut e = StreamEntry {
            id: "1-0".into(),
            fields: ev
                .to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        let back = LogEvent::from_entry(&e).unwrap();
        assert_eq!(
            (back.status, back.communication_id),
            (ev.status, ev.communication_id)
        );
        e.fields[2].1 = "lost".into();
        assert_eq!(
            LogEvent::from_entry(&e),
            Err(DecodeError::BadStatus("lost".into()))
        );
    }

    #[test]
    fn every_move_a_receipt_may_make_is_a_step_up() {
        for to in [
            Status::Delivered,
            Status::Undelivered,
            Status::Failed,
            Status::Read,
        ] {
            let after = EventStatus::try_from(to).unwrap();
            for from in to.receipt_predecessors() {
                let before = EventStatus::try_from(Status::parse(from).unwrap()).unwrap();
                assert!(after.rank() > before.rank(), "{before} -> {after}");
            }
        }
        assert_eq!(
            EventStatus::of_record(Status::Pending, 0),
            Some(EventStatus::Queued)
        );
        assert_eq!(
            EventStatus::of_record(Status::Pending, 2),
            Some(EventStatus::Retrying)
        );
        assert_eq!(EventStatus::of_record(Status::Sending, 1), None);
    }

    #[test]
    fn log_doc_ids_are_deterministic() {
        let rec = crate::testing::record(1, Channel::Sms);
        let ev = LogEvent::for_record(&rec, "sms", EventStatus::Sent, 1, Utc::now());
        assert_eq!(ev.log_doc_id(), "65f000000000000000000001:sent:1");
        let back: LogEvent = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn a_fallback_takes_what_it_leaves_out_from_the_first_message() {
        let first = |v| validate(&raw(v)).unwrap();
        let wa = json!({"type": "whatsapp", "data": {"from": "+15550001111", "to": "+15557654321", "msg": "code 1234"},
            "fallback": {"type": "sms", "afterSeconds": 120}});
        let f = fallback_of(&raw(wa.clone()), &first(wa), 3600)
            .unwrap()
            .unwrap();
        assert_eq!(f.after_secs, 120);
        let sms = validate(&f.request).unwrap();
        assert_eq!(
            (
                sms.channel,
                sms.from.as_str(),
                sms.to.as_str(),
                sms.msg.as_str()
            ),
            (Channel::Sms, "+15550001111", "+15557654321", "code 1234")
        );
        // Email to SMS: no `to` to take.
        let email = json!({"type": "email", "data": {"from": "a@example.com", "to": "b@example.com", "msg": "hi"},
            "fallback": {"type": "sms", "afterSeconds": 5, "data": {"msg": "short"}}});
        let f = fallback_of(&raw(email.clone()), &first(email), 3600)
            .unwrap()
            .unwrap();
        let data = f.request.data.as_ref().unwrap();
        assert!(data.get("to").is_none() && data.get("from").is_none());
        assert_eq!(data["msg"], "short");
        // Refusals name the field.
        let base = json!({"type": "sms", "data": {"from": "+15550001111", "to": "+15557654321", "msg": "m"}});
        for (fallback, field) in [
            (json!("sms"), "fallback"),
            (json!({"type": "sms", "afterSeconds": 5}), "fallback.type"),
            (json!({"type": "fax", "afterSeconds": 5}), "fallback.type"),
            (json!({"type": "whatsapp"}), "fallback.afterSeconds"),
            (
                json!({"type": "whatsapp", "afterSeconds": 0}),
                "fallback.afterSeconds",
            ),
            (
                json!({"type": "whatsapp", "afterSeconds": 3601}),
                "fallback.afterSeconds",
            ),
            (
                json!({"type": "whatsapp", "afterSeconds": 1.5}),
                "fallback.afterSeconds",
            ),
            (
                json!({"type": "whatsapp", "afterSeconds": 5, "data": []}),
                "fallback.data",
            ),
        ] {
            let mut body = base.clone();
            body["fallback"] = fallback.clone();
            let e = fallback_of(&raw(body), &first(base.clone()), 3600).unwrap_err();
            assert_eq!(e.field, field, "{fallback}");
        }
        assert!(fallback_of(&raw(base.clone()), &first(base), 3600)
            .unwrap()
            .is_none());
    }
}
