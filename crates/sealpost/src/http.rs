//! The admin HTTP endpoint: `/metrics` (Prometheus text format) and `/healthz`.

use anyhow::{Context, Result};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sealpost_queue::Queue;
use std::time::Duration;

/// Latency buckets in seconds, from 1 ms to 10 minutes.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    600.0,
];

/// Installs the global metrics recorder; call once, before any metric is recorded.
pub fn install_recorder() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Refreshes the queue-depth gauges every few seconds.
///
/// Counting reads (and decrypts) every envelope record, so the pause after each count is at least
/// 20 times what the count took: on a very large queue the gauges refresh less often instead of
/// taking more than ~5% of a core.
pub async fn queue_gauges(queue: Queue) {
    loop {
        let started = std::time::Instant::now();
        match queue.stats().await {
            Ok(st) => {
                let c = &st.recipients;
                for (state, n) in [
                    ("pending", c.pending),
                    ("in_flight", c.in_flight),
                    ("deferred", c.deferred),
                    ("held", c.held),
                    ("admin_hold", c.admin_hold),
                    ("delivered", c.delivered),
                    ("failed", c.failed),
                ] {
                    metrics::gauge!("sealpost_queue_recipients", "state" => state).set(n as f64);
                }
                metrics::gauge!("sealpost_queue_messages").set(st.messages as f64);
                metrics::gauge!("sealpost_queue_quarantined").set(st.quarantined as f64);
            }
            Err(e) => tracing::warn!(error = %e, "queue stats for metrics failed"),
        }
        let pause = (started.elapsed() * 20).max(Duration::from_secs(5));
        tokio::time::sleep(pause).await;
    }
}

/// Serves `/metrics` and `/healthz` on an already bound listener until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) -> Result<()> {
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "admin HTTP endpoint (/metrics, /healthz)");
    }
    axum::serve(listener, app)
        .await
        .context("admin HTTP endpoint")
}
