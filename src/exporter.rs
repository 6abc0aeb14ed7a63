//! Prometheus `/metrics` and `/healthz` for polling mode (`WORKER_METRICS_ADDR`).
//!
//! Metrics are recorded with the `metrics` facade everywhere (no-ops until a
//! recorder is installed, so single-task mode pays nothing) and rendered by
//! `metrics-exporter-prometheus`. The HTTP side is a few lines of hyper
//! because `/healthz` needs the receive loop's state, which the exporter's
//! built-in listener cannot serve.
//!
//! `/healthz` answers 200 while the receive loop is making progress (a receive
//! call succeeded, empty or not, within the threshold) and 503 once it has been
//! failing for longer, so systemd, Docker or a load balancer can restart a
//! worker that is stuck rather than merely idle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::metrics as names;

/// Liveness of the receive loop, shared between the poller and `/healthz`.
#[derive(Debug)]
pub struct Health {
    /// Unix ms of the last successful receive call.
    last_ok_ms: AtomicU64,
    /// How long the loop may fail before `/healthz` turns 503.
    threshold: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    pub fn new(threshold: Duration) -> Self {
        Self {
            last_ok_ms: AtomicU64::new(now_ms()),
            threshold,
        }
    }
    /// A receive call succeeded (empty queues count: idle is healthy).
    pub fn progress(&self) {
        self.last_ok_ms.store(now_ms(), Ordering::Relaxed);
    }
    pub fn healthy(&self) -> bool {
        now_ms().saturating_sub(self.last_ok_ms.load(Ordering::Relaxed))
            <= self.threshold.as_millis() as u64
    }
}

/// How long the receive loop may go without a successful call before
/// `/healthz` turns 503: three idle polls at the longest interval, plus room
/// for the 10 s error backoff, so one slow or failed call never flips it.
pub fn health_threshold(max_poll_interval: Duration) -> Duration {
    max_poll_interval * 3 + Duration::from_secs(10)
}

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("cannot install the metrics recorder: {0}")]
    Install(String),
    #[error("cannot listen on WORKER_METRICS_ADDR={addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the recorder and serves until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, ExporterError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(names::TASK_DURATION.into()),
            &[
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
            ],
        )
        .map_err(|e| ExporterError::Install(e.to_string()))?
        .install_recorder()
        .map_err(|e| ExporterError::Install(e.to_string()))?;
    describe();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ExporterError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ExporterError::Bind { addr, source })?;
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    tokio::spawn(accept_loop(listener, handle, health, shutdown));
    Ok(bound)
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::TASKS,
        "Tasks settled, by task_type and outcome (succeeded, failed, timed_out, retried, poisoned)"
    );
    describe_histogram!(names::TASK_DURATION, Unit::Seconds, "Handler run time");
    describe_gauge!(names::IN_FLIGHT, "Tasks running now");
    describe_counter!(names::RECEIVED, "Messages received from the queue");
    describe_counter!(names::RENEWALS, "Lease (visibility) renewals");
    describe_counter!(names::LEASES_LOST, "Leases lost while a task ran");
    describe_counter!(names::POISONED, "Messages moved to a poison queue");
    describe_counter!(
        names::WEBHOOKS,
        "Webhook notifications by result (delivered, failed, refused)"
    );
    describe_counter!(names::QUEUE_ERRORS, "Failed queue calls");
    describe_gauge!(
        names::OUTBOX_DEPTH,
        "Entries in a webhook outbox (approximate, sampled every 30 s)"
    );
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let (handle, health) = (handle.clone(), health.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (handle, health) = (handle.clone(), health.clone());
                async move { Ok::<_, Infallible>(respond(&req, &handle, &health)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
        "/healthz" if health.healthy() => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "receive loop has been failing; see logs\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_turns_bad_only_after_the_threshold() {
        assert_eq!(
            health_threshold(Duration::from_secs(30)),
            Duration::from_secs(100)
        );
        let h = Health::new(Duration::from_secs(60));
        assert!(h.healthy());
        h.last_ok_ms.store(now_ms() - 61_000, Ordering::Relaxed);
        assert!(!h.healthy());
        h.progress();
        assert!(h.healthy());
    }
}
