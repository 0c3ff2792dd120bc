//! AuditActor: security events (failed authentications, refused senders and destinations,
//! quota and rate-limit hits, callbacks with bad signatures, the configuration at start-up)
//! into an Elasticsearch index of their own, searchable by tenant and kind.
//!
//! Owns: the events not yet stored, at most `max_buffered` (the oldest are dropped beyond
//! that, counted in `audit_events_dropped_total`: an attacker who can make events must not
//! be able to grow our memory while Elasticsearch is down).
//! Talks to it: anyone, through [`record`], which never waits: the HTTP edge (refusals,
//! bad signatures) and the start-up (the configuration); itself (`Flush`); the supervisor
//! starts and stops it (stopping flushes once).
//! Talks to: Elasticsearch (`_bulk` into `index`).
//! On failure: every event is also a log line (target `audit`) and a count in
//! `security_events_total{kind}` before it reaches this actor, so a crash or a long
//! Elasticsearch outage loses at most the index copy of the buffered events, never the
//! log line or the count. A failed bulk keeps its events for the next flush.

use crate::batch::BatchSettings;
use crate::ports::{BulkAction, BulkOp, ItemResult, SearchSink};
use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;

pub const NAME: &str = "audit";

/// What happened, one word each: the `kind` field of the index and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// No key, or not a configured one.
    AuthFailed,
    /// A key's rate limit was spent.
    RateLimited,
    /// A recipient's cap was met.
    RecipientLimited,
    /// A `from` the tenant does not own.
    SenderRefused,
    /// A destination outside the tenant's allowed countries.
    DestinationRefused,
    /// A tenant's quota was spent.
    QuotaExceeded,
    /// A provider callback whose signature did not verify.
    BadCallbackSignature,
    /// The configuration a process started with (secrets left out).
    ConfigLoaded,
}

impl AuditKind {
    pub const ALL: [AuditKind; 8] = [
        AuditKind::AuthFailed,
        AuditKind::RateLimited,
        AuditKind::RecipientLimited,
        AuditKind::SenderRefused,
        AuditKind::DestinationRefused,
        AuditKind::QuotaExceeded,
        AuditKind::BadCallbackSignature,
        AuditKind::ConfigLoaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::AuthFailed => "auth_failed",
            AuditKind::RateLimited => "rate_limited",
            AuditKind::RecipientLimited => "recipient_limited",
            AuditKind::SenderRefused => "sender_refused",
            AuditKind::DestinationRefused => "destination_refused",
            AuditKind::QuotaExceeded => "quota_exceeded",
            AuditKind::BadCallbackSignature => "bad_callback_signature",
            AuditKind::ConfigLoaded => "config_loaded",
        }
    }
}

/// One security event. Never holds a key or a secret: a key is named by [`key_digest`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: String,
    pub at: DateTime<Utc>,
    pub kind: AuditKind,
    /// The tenant, where the caller's key names one.
    pub tenant: Option<String>,
    /// The client's address (IP and port) as this process saw it.
    pub source: Option<String>,
    /// The digest of the key used ([`key_digest`]).
    pub key_digest: Option<String>,
    /// The route or component, e.g. `POST /api/v1/communication`.
    pub route: Option<String>,
    /// What was refused and why, free of secrets.
    pub detail: Value,
}

impl AuditEvent {
    pub fn new(kind: AuditKind, detail: Value) -> AuditEvent {
        AuditEvent {
            id: format!("{:032x}", rand::random::<u128>()),
            at: Utc::now(),
            kind,
            tenant: None,
            source: None,
            key_digest: None,
            route: None,
            detail,
        }
    }

    /// The document in the audit index.
    pub fn to_doc(&self) -> Value {
        json!({
            "timestamp": self.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "kind": self.kind.as_str(),
            "tenant": self.tenant,
            "source": self.source,
            "keyDigest": self.key_digest,
            "route": self.route,
            "detail": self.detail,
        })
    }
}

/// How a key is named in the audit trail: the first 12 hex digits of its SHA-256, enough to
/// tell keys apart and to match a suspect key an operator holds, useless to an attacker.
pub fn key_digest(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(key.as_bytes());
    crate::domain::to_hex(&d[..6])
}

/// Count, log and hand `event` to the AuditActor if it runs. Never waits, never fails.
pub fn record(event: AuditEvent) {
    metrics::counter!("security_events_total", "kind" => event.kind.as_str()).increment(1);
    tracing::warn!(
        target: "audit",
        kind = event.kind.as_str(),
        tenant = event.tenant.as_deref().unwrap_or(""),
        source = event.source.as_deref().unwrap_or(""),
        key_digest = event.key_digest.as_deref().unwrap_or(""),
        route = event.route.as_deref().unwrap_or(""),
        detail = %event.detail,
        "security event"
    );
    if let Some(actor) = ActorRef::<AuditMsg>::where_is(NAME.to_string()) {
        let _ = actor.cast(AuditMsg::Record(Box::new(event)));
    }
}

pub enum AuditMsg {
    Record(Box<AuditEvent>),
    Flush,
}

#[derive(Clone)]
pub struct AuditArgs {
    pub search: Arc<dyn SearchSink>,
    pub index: String,
    /// Flushed at `max_items` events or after `max_wait`.
    pub batch: BatchSettings,
    /// Most events held while Elasticsearch does not take them.
    pub max_buffered: usize,
}

pub struct AuditState {
    args: AuditArgs,
    buf: VecDeque<AuditEvent>,
    flush_scheduled: bool,
}

pub struct AuditActor;

impl Actor for AuditActor {
    type Msg = AuditMsg;
    type State = AuditState;
    type Arguments = AuditArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AuditArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AuditState {
            args,
            buf: VecDeque::new(),
            flush_scheduled: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AuditMsg::Record(event) => {
                s.push(*event);
                if s.args.batch.is_full(s.buf.len(), 0) {
                    s.flush().await;
                }
            }
            AuditMsg::Flush => {
                s.flush_scheduled = false;
                s.flush().await;
            }
        }
        if !s.buf.is_empty() && !s.flush_scheduled {
            s.flush_scheduled = true;
            myself.send_after(s.args.batch.max_wait, || AuditMsg::Flush);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        s.flush().await;
        Ok(())
    }
}

impl AuditState {
    fn push(&mut self, event: AuditEvent) {
        if self.buf.len() >= self.args.max_buffered.max(1) {
            self.buf.pop_front();
            metrics::counter!("audit_events_dropped_total").increment(1);
        }
        self.buf.push_back(event);
    }

    /// One bulk of what is buffered; what was not stored stays (refused items are dropped,
    /// counted: they would be refused again).
    async fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let n = self.buf.len().min(self.args.batch.max_items.max(1));
        let ops: Vec<BulkOp> = self
            .buf
            .iter()
            .take(n)
            .map(|e| BulkOp {
                index: self.args.index.clone(),
                id: e.id.clone(),
                action: BulkAction::Create,
                doc: e.to_doc().into(),
            })
            .collect();
        let results = match self.args.search.bulk(&ops).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, held = self.buf.len(), "audit events not indexed yet");
                let _ = self.args.search.prepare().await;
                return;
            }
        };
        let mut keep = VecDeque::new();
        for (event, result) in self.buf.drain(..n).zip(results) {
            match result {
                ItemResult::Done => {}
                ItemResult::Retry(_) => keep.push_back(event),
                ItemResult::Rejected(why) => {
                    tracing::warn!(why, "audit event refused by the index");
                    metrics::counter!("audit_events_dropped_total").increment(1);
                }
            }
        }
        keep.extend(self.buf.drain(..));
        self.buf = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::ErrorKind;
    use crate::testing::{MemorySearch, SearchMethod};
    use std::time::Duration;

    fn args(search: Arc<MemorySearch>, max_buffered: usize) -> AuditArgs {
        AuditArgs {
            search,
            index: "security-audit".into(),
            batch: BatchSettings::new(2, Duration::from_millis(20)),
            max_buffered,
        }
    }

    #[test]
    fn a_key_is_named_by_a_short_digest_only() {
        let d = key_digest("acme-0123456789abcdef");
        assert_eq!(d.len(), 12);
        assert!(!d.contains("acme"));
        assert_eq!(d, key_digest("acme-0123456789abcdef"));
        assert_ne!(d, key_digest("acme-0123456789abcdeg"));
    }

    #[tokio::test]
    async fn events_are_stored_in_bulks_and_kept_while_the_index_is_down() {
        let search = Arc::new(MemorySearch::default());
        search
            .script
            .fail_next(SearchMethod::Bulk, 1, ErrorKind::Unavailable);
        let mut s = AuditState {
            args: args(search.clone(), 100),
            buf: VecDeque::new(),
            flush_scheduled: false,
        };
        let mut e = AuditEvent::new(AuditKind::AuthFailed, json!({"reason": "unknown key"}));
        e.key_digest = Some(key_digest("nope"));
        s.push(e.clone());
        s.flush().await;
        assert_eq!(s.buf.len(), 1, "kept through a failed bulk");
        s.flush().await;
        assert!(s.buf.is_empty());
        let stored = search.bulks().concat();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            (stored[0].index.as_str(), &stored[0].id),
            ("security-audit", &e.id)
        );
        let doc = stored[0].doc.value();
        assert_eq!(doc["kind"], "auth_failed");
        assert_eq!(doc["keyDigest"], key_digest("nope"));
    }

    #[tokio::test]
    async fn the_buffer_is_bounded_dropping_the_oldest() {
        let search = Arc::new(MemorySearch::default());
        let mut s = AuditState {
            args: args(search, 3),
            buf: VecDeque::new(),
            flush_scheduled: false,
        };
        for i in 0..5 {
            s.push(AuditEvent::new(AuditKind::RateLimited, json!({ "n": i })));
        }
        let kept: Vec<_> = s.buf.iter().map(|e| e.detail["n"].clone()).collect();
        assert_eq!(kept, vec![json!(2), json!(3), json!(4)]);
    }
}
