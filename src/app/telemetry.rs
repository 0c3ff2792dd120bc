//! The Prometheus recorder, installed once per process and shared by every [`super::run`].
//! Every name the code emits gets [`METRIC_PREFIX`] here (the code writes the bare name), and
//! every series its HELP text from [`super::metric_docs`].

use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::layers::{Layer, PrefixLayer};
use std::sync::Mutex;

/// What every series on `/metrics` starts with: the layer joins it to the emitted name with
/// `.`, which the exporter writes as `_` (`comm_aggregator_http_requests_total`).
pub const METRIC_PREFIX: &str = "comm_aggregator";

/// Histogram buckets by metric name suffix.
const BUCKETS: [(&str, &[f64]); 3] = [
    (
        "_seconds",
        &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ],
    ),
    (
        "_records",
        &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
    ),
    (
        "_documents",
        &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0],
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: {0}")]
    Build(#[from] BuildError),
    #[error("metrics: another recorder is already installed")]
    AlreadyInstalled,
}

/// The process's Prometheus recorder: installed by the first call, the same handle after.
pub fn install_metrics() -> Result<PrometheusHandle, MetricsError> {
    static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let recorder = build_recorder()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(PrefixLayer::new(METRIC_PREFIX).layer(recorder))
        .map_err(|_| MetricsError::AlreadyInstalled)?;
    super::metric_docs::describe_all();
    *installed = Some(handle.clone());
    Ok(handle)
}

fn build_recorder() -> Result<PrometheusRecorder, BuildError> {
    let mut builder = PrometheusBuilder::new();
    for (suffix, buckets) in BUCKETS {
        // The matcher sees the prefixed name; a suffix is the same either way.
        builder = builder.set_buckets_for_metric(Matcher::Suffix(suffix.into()), buckets)?;
    }
    Ok(builder.build_recorder())
}
