//! The shards of a run, however they are hosted: child `ps-server`
//! processes on loopback, in-process gRPC servers, or someone else's
//! (`cluster.shard_addrs`), behind one type that starts them, tells which
//! died, kills hung ones and restarts dead ones from their checkpoints.

use std::time::{Duration, Instant};

use ember_worker::train::backend::Backend;
use ember_worker::train::config::{ClusterMode, JobConfig, SecurityMode};

use super::ClusterInfo;
use crate::procs::{ShardProcess, ShardSpec};
use crate::ClusterError;

/// The shards of a run, however they are hosted.
pub(super) enum Shards {
    /// Child processes.
    Processes(Vec<ShardProcess>, Vec<ShardSpec>),
    /// In-process gRPC servers.
    InProcess(Vec<ember_ps::server::RunningShard>),
    /// Someone else's shards (restarted by their orchestrator), with the
    /// uptime each reported last, to notice a restart.
    External(Vec<String>, Vec<Option<u64>>),
}

impl Shards {
    pub(super) fn addrs(&self) -> Vec<String> {
        match self {
            Shards::Processes(p, _) => p.iter().map(|s| s.addr.clone()).collect(),
            Shards::InProcess(r) => r.iter().map(|s| s.addr.to_string()).collect(),
            Shards::External(a, _) => a.clone(),
        }
    }

    pub(super) fn info(&self) -> ClusterInfo {
        let (metrics, pids) = match self {
            Shards::Processes(p, _) => (
                p.iter()
                    .map(|s| s.metrics_addr.clone().unwrap_or_default())
                    .collect(),
                p.iter().map(|s| s.pid()).collect(),
            ),
            Shards::InProcess(r) => (
                r.iter()
                    .map(|s| s.metrics_addr.map(|a| a.to_string()).unwrap_or_default())
                    .collect(),
                vec![0; r.len()],
            ),
            Shards::External(a, _) => (vec![String::new(); a.len()], vec![0; a.len()]),
        };
        ClusterInfo {
            shards: self.addrs(),
            metrics,
            pids,
            launcher_pid: std::process::id(),
            launcher_metrics: String::new(),
            coordinator: String::new(),
        }
    }

    /// Indices of shards that died (processes that exited; external shards
    /// that refuse Health, e.g. connection refused or an unknown host, or
    /// whose uptime went down, i.e. restarted). An external shard whose
    /// probe merely times out (a stopped or paused process, a partition) is
    /// not called dead here: the [`HealthWatch`] calls it hung after
    /// `cluster.shard_timeout_s`, and the launcher reports it as such.
    pub(super) async fn dead(&mut self, ps: &Backend) -> Vec<usize> {
        match self {
            Shards::Processes(p, _) => p
                .iter_mut()
                .filter_map(|s| (!s.is_alive()).then_some(s.index))
                .collect(),
            Shards::External(_, seen) => {
                let Backend::Remote(client) = ps else {
                    return Vec::new();
                };
                let mut dead = Vec::new();
                for (i, last) in seen.iter_mut().enumerate() {
                    match client.health_once(i, Duration::from_secs(2)).await {
                        Ok(h) => {
                            if last.is_some_and(|l| h.uptime_s < l) {
                                dead.push(i);
                            }
                            *last = Some(h.uptime_s);
                        }
                        Err(ember_worker::train::TrainError::Ps { status, .. })
                            if status.code() == tonic::Code::DeadlineExceeded => {}
                        Err(_) => {
                            *last = None;
                            dead.push(i);
                        }
                    }
                }
                dead
            }
            Shards::InProcess(_) => Vec::new(),
        }
    }

    /// Waits until every external shard answers Health again (their
    /// orchestrator restarts them), recording their uptimes.
    pub(super) async fn wait_external(
        &mut self,
        ps: &Backend,
        deadline: Duration,
    ) -> Result<(), ClusterError> {
        let (Shards::External(_, seen), Backend::Remote(client)) = (self, ps) else {
            return Ok(());
        };
        let start = Instant::now();
        for (i, last) in seen.iter_mut().enumerate() {
            // Any error is retried here (a shard being restarted refuses
            // connections), on the shared backoff schedule.
            let policy = ember_proto::retry::RetryPolicy {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(10),
                deadline,
            };
            let mut backoff = policy.initial;
            loop {
                match client.health_once(i, Duration::from_secs(2)).await {
                    Ok(h) => {
                        *last = Some(h.uptime_s);
                        break;
                    }
                    Err(e) if start.elapsed() > deadline => {
                        return Err(ClusterError::Launch(format!(
                            "shard {i} ({}) did not come back within {deadline:?}: {e}",
                            client.addrs()[i]
                        )));
                    }
                    Err(e) => {
                        tracing::warn!(
                            shard = i,
                            addr = %client.addrs()[i],
                            waited_s = start.elapsed().as_secs(),
                            retry_in_ms = backoff.as_millis() as u64,
                            "shard does not answer Health (down, hung or unreachable): {e}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = policy.next_delay(backoff);
                    }
                }
            }
        }
        Ok(())
    }

    /// Kills the hung shard processes `idx` (SIGKILL also ends a stopped
    /// process) so that [`Shards::restart_dead`] restarts them. External
    /// shards cannot be killed from here: their orchestrator must restart
    /// or resume them, which [`Shards::wait_external`] waits for.
    pub(super) fn kill_hung(&mut self, idx: &[usize]) {
        match self {
            Shards::Processes(p, _) => {
                for s in p.iter_mut().filter(|s| idx.contains(&s.index)) {
                    tracing::warn!(shard = s.index, pid = s.pid(), addr = %s.addr, "killing hung shard process");
                    s.kill();
                }
            }
            Shards::External(a, _) => {
                for &i in idx {
                    tracing::error!(
                        shard = i,
                        addr = a.get(i).map(String::as_str).unwrap_or("?"),
                        "external shard is hung (no Health answer); its orchestrator must \
                         restart or resume it: waiting for it with backoff"
                    );
                }
            }
            Shards::InProcess(_) => {}
        }
    }

    /// Stops the shard processes this launcher started (a Shutdown RPC, then
    /// SIGKILL); in-process shards stop with the launcher, external ones are
    /// left alone.
    pub(super) async fn stop(&mut self, ps: &Backend) {
        if let Shards::Processes(p, _) = self {
            if let Backend::Remote(c) = ps {
                let _ = tokio::time::timeout(Duration::from_secs(10), c.shutdown(0)).await;
            }
            for s in p.iter_mut() {
                s.kill();
            }
        }
    }

    /// Restarts dead shard processes from their latest good checkpoint, on the same port.
    pub(super) fn restart_dead(&mut self) -> Result<Vec<usize>, ClusterError> {
        let mut restarted = Vec::new();
        if let Shards::Processes(p, specs) = self {
            for (i, s) in p.iter_mut().enumerate() {
                if s.is_alive() {
                    continue;
                }
                let mut spec = specs[i].clone();
                spec.listen = s.addr.clone();
                spec.restore = true;
                tracing::warn!(shard = i, addr = %s.addr, "restarting shard from its latest checkpoint");
                *s = start_shard_retrying(&spec)?;
                restarted.push(i);
            }
        }
        Ok(restarted)
    }
}

/// Starts a shard, retrying a few times (its old port may still be held briefly).
fn start_shard_retrying(spec: &ShardSpec) -> Result<ShardProcess, ClusterError> {
    let mut last = None;
    for _ in 0..20 {
        match ShardProcess::start(spec, spec.ready_timeout) {
            Ok(p) => return Ok(p),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    Err(last.unwrap_or_else(|| ClusterError::Launch("shard did not start".into())))
}

/// Starts (or names) the job's shards; `resume`: processes restore their
/// latest checkpoint at start.
pub(super) async fn start_shards(cfg: &JobConfig, resume: bool) -> Result<Shards, ClusterError> {
    if !cfg.cluster.shard_addrs.is_empty() {
        let n = cfg.cluster.shard_addrs.len();
        return Ok(Shards::External(
            cfg.cluster.shard_addrs.clone(),
            vec![None; n],
        ));
    }
    let n = cfg.cluster.shards;
    let ckpt = cfg.checkpoint_dir();
    match cfg.cluster.mode {
        ClusterMode::Inprocess => {
            let mut running = Vec::with_capacity(n);
            for i in 0..n {
                let sc = ember_ps::server::ServerConfig {
                    listen: "127.0.0.1:0"
                        .parse()
                        .map_err(|e| ClusterError::Launch(format!("{e}")))?,
                    shard_index: i as u32,
                    num_shards: n as u32,
                    checkpoint_dir: Some(ckpt.clone()),
                    restore: resume,
                    tls_cert: cfg.security.cert.clone(),
                    tls_key: cfg.security.key.clone(),
                    tls_client_ca: if cfg.security.mtls {
                        cfg.security.ca.clone()
                    } else {
                        None
                    },
                    auth_token: cfg.security.server()?.token.map(|t| t.to_string()),
                    insecure: cfg.security.mode == SecurityMode::Insecure,
                    max_bytes: cfg.cluster.shard_max_bytes,
                    ..ember_ps::server::ServerConfig::default()
                };
                running.push(ember_ps::server::spawn(sc).await?);
            }
            Ok(Shards::InProcess(running))
        }
        ClusterMode::Process => {
            let logs = cfg.out_dir().join("logs");
            let specs: Vec<ShardSpec> = (0..n)
                .map(|i| ShardSpec {
                    index: i,
                    num_shards: n,
                    listen: "127.0.0.1:0".into(),
                    metrics: Some("127.0.0.1:0".into()),
                    checkpoint_dir: ckpt.clone(),
                    restore: resume,
                    log_file: Some(logs.join(format!("shard-{i}.log"))),
                    security_args: cfg.security.process_args(true),
                    max_bytes: cfg.cluster.shard_max_bytes,
                    ready_timeout: if resume {
                        Duration::from_secs(cfg.cluster.control_timeout_s.max(60))
                    } else {
                        Duration::from_secs(60)
                    },
                })
                .collect();
            // Start every process first, then wait: shards that restore a
            // checkpoint at start load it at the same time.
            let starting = specs
                .iter()
                .map(ShardProcess::spawn)
                .collect::<Result<Vec<_>, _>>()?;
            let mut procs = Vec::with_capacity(n);
            for (st, spec) in starting.into_iter().zip(&specs) {
                procs.push(st.wait_ready(spec.ready_timeout)?);
            }
            // Restarts reuse the first port of each shard so workers reconnect.
            Ok(Shards::Processes(procs, specs))
        }
    }
}
