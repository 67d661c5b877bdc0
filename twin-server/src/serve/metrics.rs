//! Prometheus metrics in the text exposition format, on a small HTTP endpoint of their own
//! (`GET /metrics`). The endpoint answers one request per connection and closes it; it reads at
//! most 8 KiB of request, waits at most 5 s for it, and serves at most 16 connections at once.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::{EngineHandle, Shared};
use crate::store::Store;

/// Settings of the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether `twin serve` opens the endpoint (default true).
    pub enabled: bool,
    /// Address of the endpoint (default `127.0.0.1:7879`).
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7879)),
        }
    }
}

const MAX_REQUEST_BYTES: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;

/// What the metrics are read from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The engine's published state and counters.
    pub shared: Arc<Shared>,
    /// The engine's queue.
    pub engine: EngineHandle,
    /// The store's counters.
    pub store: Store,
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled; connections are tracked
/// tasks.
pub async fn run(listener: TcpListener, sources: Sources, shutdown: CancellationToken, tasks: TaskTracker) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving metrics at /metrics");
    }
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics: accept failed");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            continue; // too many scrapers at once: drop the connection
        };
        let sources = sources.clone();
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(error) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &sources)).await {
                tracing::debug!(%error, "metrics: request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, sources: &Sources) {
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") && request.len() < MAX_REQUEST_BYTES {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => request.extend_from_slice(buffer.get(..read).unwrap_or_default()),
        }
    }
    let first_line = request.split(|byte| *byte == b'\r').next().unwrap_or_default();
    let (status, content_type, body) = if first_line.starts_with(b"GET /metrics ") {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(sources))
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try GET /metrics\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _written = stream.write_all(response.as_bytes()).await;
    let _shut = stream.shutdown().await;
}

/// The metrics as Prometheus text.
pub fn render(sources: &Sources) -> String {
    let counters = &sources.shared.counters;
    let store = sources.store.stats();
    let now = crate::clock::unix_nanos_now();
    let (twins, revision, pending_keys, failed_keys, oldest_pending, divergent) = {
        let snapshot = sources.shared.snapshot.read();
        let mut divergent = 0u64;
        let mut pending_keys = 0u64;
        let mut failed_keys = 0u64;
        let mut oldest_pending: Option<u64> = None;
        for published in snapshot.twins.values() {
            if published.twin.inference().inference_divergence() {
                divergent += 1;
            }
            // The summary each twin keeps decoded: a scrape decodes nothing.
            let summary = published.twin.reconciliation_summary();
            pending_keys += u64::from(summary.pending);
            failed_keys += u64::from(summary.failed);
            if let Some(since) = summary.oldest_pending.map(|since| since.unix_nanos()) {
                oldest_pending = Some(oldest_pending.map_or(since, |oldest| oldest.min(since)));
            }
        }
        (
            snapshot.twins.len(),
            snapshot.revision,
            pending_keys,
            failed_keys,
            oldest_pending,
            divergent,
        )
    };
    let lag_seconds = oldest_pending.map_or(0.0, |since| now.saturating_sub(since) as f64 / 1e9);
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let seconds = |micros: u64| micros as f64 / 1e6;
    let rows: [(&str, &str, &str, String); 27] = [
        ("twin_twins", "gauge", "Live twins.", twins.to_string()),
        (
            "twin_revision",
            "gauge",
            "Last committed fleet-wide revision.",
            revision.to_string(),
        ),
        (
            "twin_changes_total",
            "counter",
            "Accepted twin changes committed (rate: updates per second).",
            load(&counters.changes).to_string(),
        ),
        (
            "twin_refused_total",
            "counter",
            "Commands refused by the twin rules.",
            load(&counters.refused).to_string(),
        ),
        (
            "twin_engine_commits_total",
            "counter",
            "Durable commits made by the engine (one per round with changes).",
            load(&counters.commits).to_string(),
        ),
        (
            "twin_commit_seconds_total",
            "counter",
            "Time spent in engine commits (divide by twin_engine_commits_total: mean commit latency).",
            seconds(load(&counters.commit_micros_total)).to_string(),
        ),
        (
            "twin_commit_last_seconds",
            "gauge",
            "Duration of the last engine commit.",
            seconds(load(&counters.last_commit_micros)).to_string(),
        ),
        (
            "twin_engine_queue_depth",
            "gauge",
            "Commands waiting for the engine.",
            sources.engine.queue_depth().to_string(),
        ),
        (
            "twin_deltas_sent_total",
            "counter",
            "Desired deltas queued to device streams.",
            load(&counters.deltas_sent).to_string(),
        ),
        (
            "twin_connected_devices",
            "gauge",
            "Open DeviceSync streams.",
            load(&counters.connected_devices).to_string(),
        ),
        (
            "twin_reconciliation_pending_keys",
            "gauge",
            "Desired keys not yet applied by their device.",
            pending_keys.to_string(),
        ),
        (
            "twin_reconciliation_failed_keys",
            "gauge",
            "Desired keys their device failed to apply.",
            failed_keys.to_string(),
        ),
        (
            "twin_reconciliation_lag_seconds",
            "gauge",
            "Age of the oldest pending desired key (0 when none).",
            lag_seconds.to_string(),
        ),
        (
            "twin_telemetry_batches_total",
            "counter",
            "Telemetry batches accepted on DeviceSync streams and by the Telemetry service.",
            load(&counters.telemetry_batches).to_string(),
        ),
        (
            "twin_telemetry_samples_total",
            "counter",
            "Telemetry samples accepted on DeviceSync streams and by the Telemetry service.",
            load(&counters.telemetry_samples).to_string(),
        ),
        (
            "twin_telemetry_rejected_total",
            "counter",
            "Telemetry batches the Telemetry service rejected (bad arrays, unknown device).",
            load(&counters.telemetry_rejected).to_string(),
        ),
        (
            "twin_telemetry_devices",
            "gauge",
            "Devices that have sent telemetry through the Telemetry service.",
            sources.shared.telemetry.device_count().to_string(),
        ),
        (
            "twin_inference_reports_total",
            "counter",
            "Inference reports received on DeviceSync streams.",
            load(&counters.inference_reports).to_string(),
        ),
        (
            "twin_inference_checks_total",
            "counter",
            "Inference reports the twin re-ran and compared (agreed plus diverged).",
            load(&counters.inference_checked).to_string(),
        ),
        (
            "twin_inference_agreed_total",
            "counter",
            "Inference checks whose outputs agreed within the tolerance.",
            load(&counters.inference_agreed).to_string(),
        ),
        (
            "twin_inference_divergences_total",
            "counter",
            "Inference checks that diverged (outputs beyond the tolerance, or a model version the twin cannot run).",
            load(&counters.inference_diverged).to_string(),
        ),
        (
            "twin_inference_refused_total",
            "counter",
            "Inference reports refused with a SyncError (bad widths, full queue, unknown model).",
            load(&counters.inference_refused).to_string(),
        ),
        (
            "twin_inference_divergent_twins",
            "gauge",
            "Twins marked inference_divergence now.",
            divergent.to_string(),
        ),
        (
            "twin_simulations_running",
            "gauge",
            "Simulations queued or running.",
            load(&counters.simulations_running).to_string(),
        ),
        (
            "twin_simulations_started_total",
            "counter",
            "Simulations accepted by StartSimulation.",
            load(&counters.simulations_started).to_string(),
        ),
        (
            "twin_store_commits_total",
            "counter",
            "Write transactions committed by the store.",
            store.commits.to_string(),
        ),
        (
            "twin_store_largest_commit",
            "gauge",
            "Most writes that shared one store commit.",
            store.largest_commit.to_string(),
        ),
    ];
    let mut text = String::with_capacity(4096);
    for (name, kind, help, value) in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    text
}
