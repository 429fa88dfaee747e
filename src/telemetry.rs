//! Logs and metrics. Neither carries PHI: log fields are call, thread,
//! message and escalation ids, codes and counts; metric labels are tiers,
//! actions, severities and status codes.

use std::net::SocketAddr;

use thiserror::Error;
use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("config key log.level: not a valid filter")]
    Filter,
    #[error("starting the metrics endpoint on {addr}: {message}")]
    Metrics { addr: SocketAddr, message: String },
}

/// Installs the global log subscriber, writing to stderr. A second call
/// (tests start several servers in one process) keeps the first.
pub fn init_logging(log: &Log) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&log.level).map_err(|_| TelemetryError::Filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// Serves Prometheus metrics at `http://addr/metrics`. Needs a tokio
/// runtime.
pub fn init_metrics(addr: SocketAddr) -> Result<(), TelemetryError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("crisisd_directive_latency_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        )
        .and_then(|b| b.install())
        .map_err(|e| TelemetryError::Metrics {
            addr,
            message: e.to_string(),
        })
}
