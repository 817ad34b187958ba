//! End-to-end training throughput: one worker training with the in-process
//! store (shards called directly) against the same worker training with
//! shards served over gRPC on loopback, plaintext and with TLS + token,
//! measured in the same process.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::JobConfig;
use ember_worker::train::local::LocalPs;
use ember_worker::train::setup::setup_cluster;
use ember_worker::train::worker::{run_epoch, WorkerJob, WorkerReport};

use crate::ClusterError;

/// Result of [`bench_e2e`].
#[derive(Debug, Clone)]
pub struct E2eBench {
    /// Worker with the in-process store.
    pub local: WorkerReport,
    /// Worker with loopback gRPC shards (plaintext).
    pub remote: WorkerReport,
    /// Worker with loopback gRPC shards over TLS with a bearer token.
    pub remote_tls: WorkerReport,
    /// Shards in the loopback run.
    pub shards: usize,
}

fn rate(r: &WorkerReport) -> f64 {
    if r.seconds > 0.0 {
        r.samples as f64 / r.seconds
    } else {
        0.0
    }
}

impl fmt::Display for E2eBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| backend | steps | samples/s | pull s | compute s | push s | wait s |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|")?;
        for (name, r) in [
            ("in-process store", &self.local),
            ("loopback gRPC shards", &self.remote),
            ("loopback gRPC shards, TLS + token", &self.remote_tls),
        ] {
            writeln!(
                f,
                "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.steps,
                rate(r),
                r.pull_s,
                r.compute_s,
                r.push_s,
                r.wait_s
            )?;
        }
        writeln!(
            f,
            "ratio (loopback, {} shards / in-process): {:.2}x",
            self.shards,
            rate(&self.remote) / rate(&self.local).max(1e-9)
        )?;
        write!(
            f,
            "ratio (TLS + token / plaintext loopback): {:.2}x",
            rate(&self.remote_tls) / rate(&self.remote).max(1e-9)
        )
    }
}

/// Trains `steps` steps of one worker twice, in-process and over loopback.
pub async fn bench_e2e(
    cfg: &JobConfig,
    steps: u64,
    shards: usize,
) -> Result<E2eBench, ClusterError> {
    let mut cfg = cfg.clone();
    cfg.cluster.workers = 1;
    let job = |cfg: &JobConfig| WorkerJob {
        config: cfg.clone(),
        worker_index: 0,
        num_workers: 1,
        epoch: 1,
        start_step: 0,
        skip_steps: 0,
        steps: Some(steps),
    };
    let quiet = |_: &ember_worker::train::worker::Progress| {};

    let local = Backend::Local(Arc::new(LocalPs::new(1, None)?));
    setup_cluster(&cfg, &local).await?;
    let local_report = run_epoch(&job(&cfg), &local, &quiet).await?;

    let remote_report = loopback(&cfg, &job(&cfg), shards, None).await?;
    let dir = std::env::temp_dir().join(format!("ember-bench-pki-{}", std::process::id()));
    let pki = ember_proto::pki::write_test_pki(&dir, &["127.0.0.1".into()])
        .map_err(|e| ClusterError::Launch(e.to_string()))?;
    let tls_report = loopback(&cfg, &job(&cfg), shards, Some(&pki)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(E2eBench {
        local: local_report,
        remote: remote_report,
        remote_tls: tls_report?,
        shards,
    })
}

/// One worker against `shards` loopback shards, plaintext or TLS + token.
async fn loopback(
    cfg: &JobConfig,
    job: &WorkerJob,
    shards: usize,
    tls: Option<&ember_proto::pki::PkiFiles>,
) -> Result<WorkerReport, ClusterError> {
    const TOKEN: &str = "bench-token";
    let mut running = Vec::new();
    for i in 0..shards {
        let sc = ember_ps::server::ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            shard_index: i as u32,
            num_shards: shards as u32,
            tls_cert: tls.map(|p| p.server_cert.clone()),
            tls_key: tls.map(|p| p.server_key.clone()),
            auth_token: tls.map(|_| TOKEN.to_string()),
            insecure: tls.is_none(),
            ..ember_ps::server::ServerConfig::default()
        };
        running.push(
            ember_ps::server::spawn(sc)
                .await
                .map_err(|e| ClusterError::Launch(format!("shard {i}: {e}")))?,
        );
    }
    let addrs: Vec<String> = running.iter().map(|r| r.addr.to_string()).collect();
    let retry = RetryPolicy {
        deadline: Duration::from_secs(10),
        ..RetryPolicy::default()
    };
    let security = match tls {
        Some(p) => {
            let files = ember_proto::security::ClientTlsFiles {
                ca: p.ca.clone(),
                domain: None,
                identity: None,
            };
            let t = files
                .load()
                .map_err(|e| ClusterError::Launch(e.to_string()))?;
            ember_proto::security::ClientSecurity::new(Some(t), Some(TOKEN))
                .map_err(|e| ClusterError::Launch(e.to_string()))?
        }
        None => ember_proto::security::ClientSecurity::insecure(),
    };
    let remote = Backend::Remote(PsClient::new(&addrs, retry, &security)?);
    setup_cluster(cfg, &remote).await?;
    let quiet = |_: &ember_worker::train::worker::Progress| {};
    let report = run_epoch(job, &remote, &quiet).await;
    for r in running {
        let _ = r.shutdown().await;
    }
    Ok(report?)
}
