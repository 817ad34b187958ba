//! Prometheus metrics of the shard.
//!
//! Every metric carries a `shard` label, because the cluster launcher may run
//! several in-process shards in one process and a process has one global
//! recorder. [`install_exporter`] installs that recorder at most once per
//! process and returns its handle (later calls return the same handle);
//! without it every metric call is a cheap no-op, so in-process shards and
//! tests work without an exporter. [`serve_metrics`] answers `GET /metrics`
//! with the Prometheus text format on a listener of the caller's choosing
//! (port 0 allowed), refreshing the per-table gauges of every live shard first.

use crate::error::{PsError, Result};
use crate::shard::Shard;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use std::future::Future;
use std::sync::{Arc, OnceLock, Weak};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Rows served by Pull, labels `table`, `shard`.
pub const ROWS_PULLED: &str = "ember_ps_rows_pulled_total";
/// Rows updated by Push, labels `table`, `shard`.
pub const ROWS_PUSHED: &str = "ember_ps_rows_pushed_total";
/// Requests, labels `method`, `table` (empty for non-table RPCs), `shard`.
pub const REQUESTS: &str = "ember_ps_requests_total";
/// Request latency histogram in seconds, labels `method`, `shard`.
pub const REQUEST_SECONDS: &str = "ember_ps_request_seconds";
/// Rejected requests, labels `reason`, `shard`.
pub const REJECTED: &str = "ember_ps_rejected_total";
/// Rows resident per table (gauge), labels `table`, `shard`.
pub const RESIDENT_ROWS: &str = "ember_ps_resident_rows";
/// Bytes resident per table (gauge), labels `table`, `shard`.
pub const RESIDENT_BYTES: &str = "ember_ps_resident_bytes";
/// Ids held back by admission, labels `table`, `shard`.
pub const NOT_ADMITTED: &str = "ember_ps_not_admitted_total";
/// Rows evicted, labels `table`, `shard`, `reason` (`ttl` or `budget`).
pub const EVICTED: &str = "ember_ps_evicted_total";
/// Allocated bytes per stored row, all-in (gauge), labels `table`, `shard`.
pub const BYTES_PER_ROW: &str = "ember_ps_bytes_per_row";
/// Arena bytes of one row (gauge), labels `table`, `shard`.
pub const ROW_BYTES: &str = "ember_ps_row_bytes";
/// Bytes charged to the shard's memory budget (gauge), label `shard`.
pub const BUDGET_USED_BYTES: &str = "ember_ps_budget_used_bytes";
/// The shard's memory budget (gauge, only when set), label `shard`.
pub const BUDGET_MAX_BYTES: &str = "ember_ps_budget_max_bytes";
/// Dense step (gauge), label `shard`.
pub const DENSE_STEP: &str = "ember_ps_dense_step";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());
static SHARDS: Mutex<Vec<Weak<Shard>>> = Mutex::new(Vec::new());

/// Installs the process-wide Prometheus recorder once and returns its handle
/// (idempotent). Fails only when another recorder was installed by someone else.
pub fn install_exporter() -> Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let _g = INSTALL.lock();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        10.0,
    ];
    let h = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_SECONDS.to_string()), &buckets)
        .map_err(|e| PsError::Internal(format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| PsError::Internal(format!("installing the metrics recorder: {e}")))?;
    let _ = HANDLE.set(h.clone());
    Ok(h)
}

/// The installed handle, if any.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// Registers a shard whose gauges are refreshed on each scrape.
pub fn register_shard(shard: &Arc<Shard>) {
    let mut g = SHARDS.lock();
    g.retain(|w| w.strong_count() > 0);
    g.push(Arc::downgrade(shard));
}

/// Refreshes the gauges of every registered live shard.
pub fn refresh_gauges() {
    let shards: Vec<Arc<Shard>> = SHARDS.lock().iter().filter_map(Weak::upgrade).collect();
    for s in shards {
        s.update_gauges();
    }
}

/// Renders the current metrics (after refreshing gauges).
pub fn render(handle: &PrometheusHandle) -> String {
    refresh_gauges();
    handle.run_upkeep();
    handle.render()
}

/// Serves `GET /metrics` (any path, in fact) until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let h = handle.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            // Read until the end of the request head (or a full buffer).
            while got < buf.len() {
                match sock.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        got += n;
                        if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let body = render(&h);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
