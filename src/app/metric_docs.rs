//! HELP text and unit of every metric the process emits, described to the recorder when it
//! is installed. Names here are the bare ones the code writes (`metrics::counter!`); the
//! recorder adds the `comm_aggregator_` prefix. A metric emitted without a line here fails
//! the unit test below, and `promtool check metrics` in tests/observability.rs.

use metrics::Unit;

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}
use Kind::{Counter, Gauge, Histogram};

/// (name, kind, unit, HELP). Counters end in `_total`, durations in `_seconds`, histograms of
/// sizes in what they count (`_records`, `_documents`); gauges of how many things are
/// somewhere are plain counts.
#[rustfmt::skip]
const METRICS: &[(&str, Kind, Unit, &str)] = &[
    // HTTP edge
    ("http_requests_total", Counter, Unit::Count, "HTTP requests answered, by route and status."),
    ("http_request_duration_seconds", Histogram, Unit::Seconds, "HTTP request latency by route."),
    ("http_connections_refused_total", Counter, Unit::Count, "Connections refused at the connection limit."),
    ("http_requests_timed_out_total", Counter, Unit::Count, "HTTP requests answered 503 at the request timeout."),
    ("communications_accepted_total", Counter, Unit::Count, "Communications accepted, by channel."),
    ("communications_canceled_total", Counter, Unit::Count, "Scheduled communications canceled, by channel."),
    ("dead_letters_replayed_total", Counter, Unit::Count, "Dead letters replayed (put back on their stream with a fresh attempt budget), by channel."),
    ("idempotent_replays_total", Counter, Unit::Count, "Submissions answered from an earlier one with the same Idempotency-Key."),
    ("tenant_refusals_total", Counter, Unit::Count, "Submissions refused by the tenant's senders or countries, by reason and channel."),
    ("tenant_limit_refusals_total", Counter, Unit::Count, "Submissions refused by the tenant's rate, quota or recipient limits, by reason and channel."),
    ("limiter_unavailable_total", Counter, Unit::Count, "Submissions the limits could not check (Redis did not answer), by channel and outcome."),
    ("security_events_total", Counter, Unit::Count, "Security events (audit trail), by kind."),
    ("audit_events_dropped_total", Counter, Unit::Count, "Audit events not indexed (the audit actor was full or not running)."),
    // Router
    ("router_queue_full_total", Counter, Unit::Count, "Submissions refused because the router's queue was full."),
    ("router_pending_requests", Gauge, Unit::Count, "Submissions waiting for the router."),
    ("router_expired_total", Counter, Unit::Count, "Submissions dropped by the router after their deadline."),
    ("router_batch_records", Histogram, Unit::Count, "Records per router batch insert."),
    ("router_batch_seconds", Histogram, Unit::Seconds, "Time to store one router batch."),
    ("router_store_failures_total", Counter, Unit::Count, "Router batch inserts that failed."),
    ("router_ambiguous_inserts_total", Counter, Unit::Count, "Router batch inserts with an unknown outcome."),
    ("router_voided_total", Counter, Unit::Count, "Stored records voided because their request was answered 503."),
    ("router_void_too_late_total", Counter, Unit::Count, "Records answered 503 that had moved on before they could be voided."),
    ("router_queue_skipped_total", Counter, Unit::Count, "Stored batches not queued while Redis was down (the outbox sweep queues them)."),
    ("router_queue_failures_total", Counter, Unit::Count, "Stored batches whose queueing in Redis failed."),
    // Sending
    ("deliveries_total", Counter, Unit::Count, "Delivery attempts by channel, provider and outcome."),
    ("provider_call_seconds", Histogram, Unit::Seconds, "Provider call latency by provider."),
    ("accept_to_sent_seconds", Histogram, Unit::Seconds, "Time from acceptance to sent, by channel."),
    ("provider_failovers_total", Counter, Unit::Count, "Sends failed over to the next provider, by channel and the provider failed over from."),
    ("provider_lookups_total", Counter, Unit::Count, "Provider status lookups by provider and result."),
    ("provider_breaker_state", Gauge, Unit::Count, "Provider circuit breaker state: 0 closed, 1 half-open, 2 open."),
    ("possible_duplicate_sends_total", Counter, Unit::Count, "Sends that may have reached the provider twice, by channel and cause."),
    ("sender_leases_lost_total", Counter, Unit::Count, "Leases lost before a provider call, by channel."),
    ("sender_fenced_writes_total", Counter, Unit::Count, "Outcome writes fenced off by a lost lease or a record that moved on, by channel."),
    ("suppressed_total", Counter, Unit::Count, "Messages not sent because the recipient is on the tenant's suppression list, by channel."),
    ("stream_malformed_entries_total", Counter, Unit::Count, "Stream entries that could not be parsed, by channel."),
    ("fallbacks_total", Counter, Unit::Count, "Fallbacks by outcome (sent, not_needed)."),
    ("fallback_errors_total", Counter, Unit::Count, "Fallback passes that failed."),
    ("scheduled_sends_queued_total", Counter, Unit::Count, "Scheduled sends queued when due."),
    ("scheduler_errors_total", Counter, Unit::Count, "Scheduler passes that failed."),
    // Receipts
    ("delivery_receipts_total", Counter, Unit::Count, "Delivery receipts applied, by service and status."),
    ("receipt_batch_records", Histogram, Unit::Count, "Receipts per batch written to MongoDB."),
    ("receipts_parked", Gauge, Unit::Count, "Receipts parked now, waiting for their record."),
    ("receipts_parked_total", Counter, Unit::Count, "Receipts parked because their record was not yet written."),
    // Store
    ("store_concurrency_limit", Gauge, Unit::Count, "Store calls in flight allowed by the adaptive limit, by caller (below 1: a paced single call)."),
    ("store_limiter_wait_seconds", Histogram, Unit::Seconds, "Time store calls waited for the adaptive limit, by caller."),
    ("mongo_documents_written_total", Counter, Unit::Count, "Documents written to communications, by kind of write, as MongoDB's replies count them."),
    ("mongodb_index_build_failures_total", Counter, Unit::Count, "MongoDB index builds that failed for clashing keys."),
    ("reconciler_checked_total", Counter, Unit::Count, "Records the reconciler compared between MongoDB and Elasticsearch."),
    ("reconciler_repairs_total", Counter, Unit::Count, "Records the reconciler indexed again."),
    ("reconciler_errors_total", Counter, Unit::Count, "Reconciler passes that failed."),
    ("outbox_requeued_total", Counter, Unit::Count, "Stored records the outbox sweep queued again."),
    // Streams
    ("stream_length", Gauge, Unit::Count, "Entries in a Redis stream."),
    ("stream_pending", Gauge, Unit::Count, "Entries delivered but not yet acknowledged in a Redis stream."),
    ("stream_trimmed_total", Counter, Unit::Count, "Acknowledged entries trimmed from a Redis stream."),
    ("dead_letter_length", Gauge, Unit::Count, "Entries in a dead-letter stream."),
    ("dead_lettered_total", Counter, Unit::Count, "Entries moved to a dead-letter stream, by stream."),
    ("stream_read_errors_total", Counter, Unit::Count, "Failed stream reads, by stream."),
    ("stream_autoclaimed_total", Counter, Unit::Count, "Stale pending entries claimed again, by stream."),
    ("lane_entries_delivered_total", Counter, Unit::Count, "Stream entries a consumer handed its sender, by channel and lane (high, normal, bulk)."),
    ("stream_consumers_removed_total", Counter, Unit::Count, "Idle consumers removed from a stream's group."),
    // Log indexing
    ("log_events_indexed_total", Counter, Unit::Count, "Log events indexed into Elasticsearch."),
    ("log_events_dropped_total", Counter, Unit::Count, "Log events not written to log_stream."),
    ("log_events_overflowed_total", Counter, Unit::Count, "Log events a full log_stream refused (indexed later from MongoDB)."),
    ("log_events_reindexed_total", Counter, Unit::Count, "Records indexed again from MongoDB after log_stream overflowed."),
    ("log_indexer_batch_documents", Histogram, Unit::Count, "Documents per LogIndexer bulk request."),
    ("log_indexer_bulk_seconds", Histogram, Unit::Seconds, "LogIndexer bulk request latency."),
    ("log_indexer_held_documents", Gauge, Unit::Count, "Search documents the LogIndexer holds back for the version that replaces them."),
    ("log_indexer_superseded_total", Counter, Unit::Count, "Documents skipped because a newer version was in the same batch."),
    ("log_indexer_item_retries_total", Counter, Unit::Count, "Bulk items retried by the LogIndexer."),
    ("log_indexer_failed_items_total", Counter, Unit::Count, "Bulk items the LogIndexer gave up on."),
    // Live status stream
    ("events_subscribers", Gauge, Unit::Count, "Open status-event subscriptions (SSE and WebSocket) in this process."),
    ("events_subscribers_dropped_total", Counter, Unit::Count, "Status-event subscribers closed because they read too slowly, by reason (lagged, buffer_full)."),
    ("events_fanout_read_total", Counter, Unit::Count, "log_stream entries read by the event fanout."),
    // Supervision
    ("actor_restarts_total", Counter, Unit::Count, "Actor restarts by actor."),
];

/// Describe every metric in [`METRICS`] to the installed recorder.
pub(super) fn describe_all() {
    for &(name, kind, unit, help) in METRICS {
        match kind {
            Counter => metrics::describe_counter!(name, unit, help),
            Gauge => metrics::describe_gauge!(name, unit, help),
            Histogram => metrics::describe_histogram!(name, unit, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The quoted metric names in `text` that follow one of `openers` (whitespace allowed
    /// between).
    fn quoted_after(text: &str, openers: &[&str]) -> Vec<String> {
        let mut names = Vec::new();
        for opener in openers {
            for (at, _) in text.match_indices(opener) {
                let rest = text[at + opener.len()..].trim_start();
                if let Some(body) = rest.strip_prefix('"') {
                    let name = body.split('"').next().unwrap_or_default();
                    let ident = name.starts_with(|c: char| c.is_ascii_lowercase())
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if ident {
                        names.push(name.to_string());
                    }
                }
            }
        }
        names
    }

    fn walk(dir: &Path, names: &mut BTreeSet<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("source directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source file");
                let openers = [
                    "counter!(",
                    "gauge!(",
                    "histogram!(",
                    "fn errors_metric(&self) -> &'static str {",
                ];
                for name in quoted_after(&text, &openers) {
                    names.insert((name, path.display().to_string()));
                }
            }
        }
    }

    /// Every metric name the code emits (a literal in `counter!`/`gauge!`/`histogram!`, or
    /// a due-work's `errors_metric`) has HELP text here, with the right kind.
    #[test]
    fn every_emitted_metric_is_described() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut emitted = BTreeSet::new();
        walk(&root.join("src"), &mut emitted);
        walk(&root.join("actors/src"), &mut emitted);
        assert!(
            emitted.len() > 50,
            "the walk found the metrics: {emitted:?}"
        );
        let described: BTreeSet<&str> = METRICS.iter().map(|m| m.0).collect();
        let missing: Vec<_> = emitted
            .iter()
            .filter(|(n, _)| !described.contains(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "metrics without HELP in src/app/metric_docs.rs: {missing:?}"
        );
    }

    /// The names carry their unit: counters end in `_total` and only counters do; durations
    /// are in seconds; no name is described twice.
    #[test]
    fn names_follow_the_conventions() {
        let mut seen = BTreeSet::new();
        for &(name, kind, unit, help) in METRICS {
            assert!(seen.insert(name), "{name} described twice");
            assert!(
                !help.is_empty() && help.ends_with('.'),
                "{name}: HELP is a sentence"
            );
            let counter = matches!(kind, Counter);
            assert_eq!(
                name.ends_with("_total"),
                counter,
                "{name}: _total iff a counter"
            );
            assert_eq!(
                name.ends_with("_seconds"),
                unit == Unit::Seconds,
                "{name}: unit"
            );
            for bad in [
                "_ms",
                "_millis",
                "_milliseconds",
                "_size",
                "_docs",
                "_count",
                "_sum",
            ] {
                assert!(!name.ends_with(bad), "{name}: not a base unit ({bad})");
            }
            if matches!(kind, Histogram) {
                let unit_suffix = ["_seconds", "_records", "_documents"];
                assert!(
                    unit_suffix.iter().any(|s| name.ends_with(s)),
                    "{name}: bucket suffix"
                );
            }
        }
    }
}
