//! OpenTelemetry traces, exported over OTLP/HTTP (JSON) when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; off otherwise (no exporter, no layer, no
//! trace context carried). The tracing spans (`http`, `commit`, `communication`, `receipt`)
//! become OTel spans through `tracing-opentelemetry`; the W3C trace context crosses the
//! actors as a `traceparent` string ([`actors::trace_context`], hooks installed here).
//!
//! The SDK reads the standard variables itself: the endpoints, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_BSP_*`, `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_SERVICE_NAME` defaults to
//! `comm-aggregator`. The batch exporter runs on a thread of its own (not the runtime).

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The variables that turn traces on.
pub const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// The service name when `OTEL_SERVICE_NAME` is unset.
pub const DEFAULT_SERVICE_NAME: &str = "comm-aggregator";

/// Traces are exported: an endpoint variable is set and not empty.
pub fn enabled() -> bool {
    ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// The exporting tracer provider, or `None` when traces are off. Build it outside the
/// async runtime (the exporter's blocking HTTP client), and [`shutdown`] it there too.
pub fn provider() -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if !enabled() {
        return Ok(None);
    }
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .build()?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    actors::trace_context::install(actors::trace_context::Hooks { current, adopt });
    Ok(Some(provider))
}

/// The layer that turns tracing spans into spans of `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(DEFAULT_SERVICE_NAME))
}

/// Export what is still batched, then stop the exporter's thread (shutdown's last step).
pub fn shutdown(provider: SdkTracerProvider) {
    if let Err(e) = provider.shutdown() {
        eprintln!("comm-aggregator: traces not flushed: {e}");
    }
}

/// The current span's context as a `traceparent` (version 00), when it has a valid one.
fn current() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// `span`'s parent is the context `traceparent` names (ignored when malformed).
fn adopt(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = extract(traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// The remote context of a W3C `traceparent` header value, if it is a valid one.
pub fn extract(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}
