//! The Prometheus recorder, installed once per process and shared by every [`super::run`].

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::Mutex;

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
        "_size",
        &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
    ),
    (
        "_docs",
        &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0],
    ),
];

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] BuildError);

/// The process's Prometheus recorder: installed by the first call, the same handle after.
pub fn install_metrics() -> Result<PrometheusHandle, MetricsError> {
    static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = installed.as_ref() {
        return Ok(h.clone());
    }
    let mut builder = PrometheusBuilder::new();
    for (suffix, buckets) in BUCKETS {
        builder = builder.set_buckets_for_metric(Matcher::Suffix(suffix.into()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    metrics::describe_counter!(
        "lane_entries_delivered_total",
        "Stream entries a consumer handed its sender, by channel and lane (high, normal, bulk)"
    );
    *installed = Some(handle.clone());
    Ok(handle)
}
