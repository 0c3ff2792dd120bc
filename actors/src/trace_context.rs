//! The W3C trace context (`traceparent`) a message carries from its HTTP request through
//! the group commit, the stream entry and the provider call to its receipt. Not an actor:
//! two hooks the edge installs once at start when traces are exported (`src/app/otel.rs`),
//! so this crate names no OpenTelemetry type. Without them (traces off) [`current`] is
//! `None` and [`adopt`] does nothing: no field is stored, no entry grows.

use std::sync::OnceLock;

/// How the edge reads and sets a span's trace context.
pub struct Hooks {
    /// The `traceparent` of the current tracing span, if it has a valid context (sampled or
    /// not: its flags travel with it).
    pub current: fn() -> Option<String>,
    /// Make the context of a `traceparent` the parent of a span not yet entered.
    pub adopt: fn(&tracing::Span, &str),
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Installed once per process; a second call is ignored.
pub fn install(hooks: Hooks) {
    let _ = HOOKS.set(hooks);
}

/// The current span's `traceparent`, to be carried with a message.
pub fn current() -> Option<String> {
    HOOKS.get().and_then(|h| (h.current)())
}

/// `span` continues the trace of `traceparent` (when there is one and traces are on).
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if let (Some(h), Some(tp)) = (HOOKS.get(), traceparent) {
        (h.adopt)(span, tp);
    }
}
