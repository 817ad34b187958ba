//! Before the first step: the run's security material, the launcher's
//! metrics endpoint, and the cluster's starting state (a fresh setup with a
//! step-0 checkpoint, or the last complete cluster checkpoint with `--resume`).

use std::path::Path;

use ember_worker::train::backend::Backend;
use ember_worker::train::config::{JobConfig, SecurityMode};
use ember_worker::train::setup::setup_cluster;

use super::recovery::control_error;
use super::Cluster;
use crate::health::with_deadline;
use crate::report::RunReport;
use crate::ClusterError;

/// `--resume`: the step of the last complete cluster checkpoint, with every
/// shard at it, and the report's epochs up to it.
pub(super) async fn resume(
    cl: &Cluster,
    report_path: &Path,
    report: &mut RunReport,
) -> Result<u64, ClusterError> {
    let (ps, control) = (&cl.ps, cl.control);
    let steps = with_deadline(control, ps.common_checkpoints())
        .await
        .map_err(|e| control_error("list checkpoints", e))?;
    let Some(&s) = steps.last() else {
        return Err(ClusterError::Launch(format!(
            "--resume: no complete cluster checkpoint in {}",
            cl.cfg.checkpoint_dir().display()
        )));
    };
    // Shards started with --restore already loaded their latest checkpoint;
    // restoring it again would cost a second full load (about 50 s per shard
    // at 10^8 rows). Restore unless every shard holds step `s` untouched:
    // restored or written at `s` and no row pushed since the process started.
    let at_s = match ps {
        Backend::Remote(c) => {
            let health = with_deadline(control, c.health())
                .await
                .map_err(|e| control_error("health", e))?;
            let stats = with_deadline(control, ps.stats())
                .await
                .map_err(|e| control_error("stats", e))?;
            health.iter().all(|h| h.checkpoint_step == s)
                && stats.iter().all(|st| st.rows_pushed == 0)
        }
        Backend::Local(_) => false,
    };
    if at_s {
        tracing::info!(
            step = s,
            "every shard already holds the checkpoint (restored at start)"
        );
    } else {
        with_deadline(control, ps.restore(s))
            .await
            .map_err(|e| control_error(&format!("restore step {s}"), e))?;
    }
    ember_worker::train::setup::check_restored_tables(&cl.cfg, ps).await?;
    if let Ok(old) = RunReport::read_json(report_path) {
        report.epochs = old.epochs.into_iter().filter(|r| r.step <= s).collect();
    }
    tracing::info!(
        step = s,
        epochs_done = report.epochs.len(),
        "resumed from cluster checkpoint"
    );
    Ok(s)
}

/// A fresh run: checks that the shards are empty, creates the tables, loads
/// the feature counts, registers the dense parameters and checkpoints step 0.
pub(super) async fn start_fresh(cl: &Cluster) -> Result<u64, ClusterError> {
    let (cfg, ps, control) = (&cl.cfg, &cl.ps, cl.control);
    // A shard that already trained would ignore dense pushes for steps below
    // its dense step.
    let stats = with_deadline(control, ps.stats())
        .await
        .map_err(|e| control_error("stats", e))?;
    for (i, st) in stats.iter().enumerate() {
        if st.dense_step > 0 || st.rows_pushed > 0 {
            return Err(ClusterError::Launch(format!(
                "shard {i} already holds a trained state (dense step {}, {} rows pushed): \
                 continue it with --resume, or start the run on empty shards",
                st.dense_step, st.rows_pushed
            )));
        }
    }
    with_deadline(control, setup_cluster(cfg, ps))
        .await
        .map_err(|e| control_error("setup", e))?;
    with_deadline(
        control,
        ps.checkpoint(0, cfg.cluster.keep_checkpoints.max(2)),
    )
    .await
    .map_err(|e| control_error("checkpoint at step 0", e))?;
    Ok(0)
}

/// Resolves `security.mode = "auto"`: for shards this launcher starts, a
/// fresh CA, server certificate (localhost, 127.0.0.1) and bearer token under
/// `<out_dir>/secrets/` (keys and token mode 0600), and `tls` everywhere. With
/// external shards `auto` is an error: their certificates are the
/// deployment's. `insecure` is kept (the client warns).
pub(super) fn resolve_security(cfg: &mut JobConfig) -> Result<(), ClusterError> {
    if cfg.security.mode != SecurityMode::Auto {
        return Ok(());
    }
    if !cfg.cluster.shard_addrs.is_empty() {
        return Err(ClusterError::Launch(
            "security.mode = \"auto\" only works for shards that `ember train` starts; with \
             cluster.shard_addrs set security.mode = \"tls\" (ca, token_file) or \"insecure\""
                .into(),
        ));
    }
    let dir = cfg.out_dir().join("secrets");
    let files = ember_proto::pki::write_test_pki(&dir, &["localhost".into(), "127.0.0.1".into()])?;
    let token = dir.join("token");
    ember_proto::pki::write_token(&token)?;
    cfg.security = ember_worker::train::config::SecurityConfig {
        mode: SecurityMode::Tls,
        ca: Some(files.ca),
        cert: Some(files.server_cert),
        key: Some(files.server_key),
        token_file: Some(token),
        ..Default::default()
    };
    tracing::info!(dir = %dir.display(), "TLS + token: a fresh CA, certificate and token for this run");
    Ok(())
}

/// Serves the launcher's metrics (Prometheus text) on `addr`; returns the bound address.
pub(super) async fn serve_launcher_metrics(
    addr: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, ClusterError> {
    let handle = ember_ps::metrics::install_exporter()?;
    let bind = |source| ClusterError::Bind {
        what: "metrics",
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    tokio::spawn(ember_ps::metrics::serve_metrics(
        listener,
        handle,
        std::future::pending(),
    ));
    Ok(bound)
}
