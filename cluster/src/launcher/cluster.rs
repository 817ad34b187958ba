//! Everything the job loop drives: the shards, the coordinator and its
//! server, the workers, the parameter-server client and the Health watch;
//! started together and stopped together.

use std::time::{Duration, Instant};

use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::{ClusterMode, JobConfig};

use super::shards::{self, Shards};
use super::workers::Workers;
use super::{io_err, setup, LaunchOptions};
use crate::coordinator::{Coordinator, CoordinatorSettings, RunningCoordinator};
use crate::health::HealthWatch;
use crate::ClusterError;

/// Everything the job loop drives.
pub(super) struct Cluster {
    pub(super) cfg: JobConfig,
    pub(super) ps: Backend,
    pub(super) shards: Shards,
    pub(super) workers: Workers,
    pub(super) coord: Coordinator,
    /// The coordinator's gRPC server (worker processes and external workers).
    pub(super) server: Option<RunningCoordinator>,
    pub(super) health: HealthWatch,
    pub(super) addrs: Vec<String>,
    /// Deadline of every control call (`cluster.control_timeout_s`).
    pub(super) control: Duration,
}

impl Cluster {
    /// Starts the shards, the coordinator and the workers; writes `cluster.json`.
    pub(super) async fn start(
        cfg: JobConfig,
        opts: &LaunchOptions,
    ) -> Result<Cluster, ClusterError> {
        let mut shards = shards::start_shards(&cfg, opts.resume).await?;
        let addrs = shards.addrs();
        let c = &cfg.cluster;
        let retry = RetryPolicy {
            deadline: Duration::from_secs(c.retry_deadline_s),
            ..RetryPolicy::default()
        };
        let ps = Backend::Remote(PsClient::new(&addrs, retry, &cfg.security.client()?)?);
        shards
            .wait_external(&ps, Duration::from_secs(c.retry_deadline_s))
            .await?;
        let local = !c.external_workers();
        let coord = Coordinator::new(CoordinatorSettings {
            num_workers: c.workers,
            worker_timeout: Duration::from_secs(c.worker_timeout_s),
            start_timeout: Duration::from_secs(c.worker_start_timeout_s),
            wait_ms: if local { 50 } else { 500 },
        });
        let listen = match (c.external_workers(), c.mode) {
            (true, _) => Some(c.coordinator_listen.clone()),
            (false, ClusterMode::Inprocess) => None,
            (false, ClusterMode::Process) => Some("127.0.0.1:0".to_string()),
        };
        let server = match listen {
            Some(l) => {
                let security = cfg.security.server()?;
                Some(crate::coordinator::serve(coord.clone(), &l, &security).await?)
            }
            None => None,
        };
        let workers = match (&server, local) {
            (_, false) => Workers::External,
            (Some(s), true) => {
                Workers::processes(&cfg, opts.config_path.clone(), s.addr.to_string())?
            }
            (None, true) => Workers::tasks(&cfg, &coord, &ps),
        };
        let mut info = shards.info();
        if let Some(addr) = opts.metrics_addr {
            info.launcher_metrics = setup::serve_launcher_metrics(addr).await?.to_string();
        }
        info.coordinator = server
            .as_ref()
            .map(|s| s.addr.to_string())
            .unwrap_or_default();
        let info_path = cfg.out_dir().join("cluster.json");
        std::fs::write(
            &info_path,
            serde_json::to_string_pretty(&info).unwrap_or_default(),
        )
        .map_err(io_err(&info_path))?;
        tracing::info!(shards = ?addrs, metrics = ?info.metrics, coordinator = %info.coordinator, "cluster ready");
        Ok(Cluster {
            health: HealthWatch::new(addrs.len(), Duration::from_secs(c.shard_timeout_s)),
            control: Duration::from_secs(c.control_timeout_s),
            cfg,
            ps,
            shards,
            workers,
            coord,
            server,
            addrs,
        })
    }

    /// Samples one step of all workers trains.
    pub(super) fn samples_per_step(&self) -> u64 {
        self.cfg.cluster.workers as u64 * self.cfg.data.batch_size as u64
    }

    /// Training is over: the workers are told DONE and waited for, the
    /// coordinator stops, and shard processes this launcher started stop.
    pub(super) async fn finish(self) {
        let Cluster {
            coord,
            mut workers,
            server,
            mut shards,
            ps,
            ..
        } = self;
        coord.finish();
        let until = Instant::now() + Duration::from_secs(30);
        while !coord.all_saw_done() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !coord.all_saw_done() {
            tracing::warn!("not every worker asked for a task after training ended");
        }
        workers.finish(Duration::from_secs(10)).await;
        drop(server);
        shards.stop(&ps).await;
    }
}
