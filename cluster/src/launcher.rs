//! `ember train`: one command runs a whole job.
//!
//! 0. Security: `security.mode = "auto"` makes a CA, certificate and token
//!    for this run (`<out_dir>/secrets/`); every connection below is TLS with
//!    the token.
//! 1. Start N shards (child `ps-server` processes on loopback ports, or
//!    in-process gRPC shards, or use `cluster.shard_addrs`).
//! 2. Create the sparse tables, load the exact feature counts n_j, register
//!    the dense parameters, and checkpoint step 0 (so a failure in the first
//!    epoch has a state to roll back to).
//! 3. Per epoch (K steps per worker), per segment of
//!    `cluster.checkpoint_every_steps` steps (the whole epoch when 0): run M
//!    workers (child `worker` processes, in-process tasks, or — with
//!    `worker_mode = "external"` — workers elsewhere that pull the segment
//!    from the coordinator service, `crate::coordinator`) from the segment's
//!    data position; watch shards and workers; at the epoch end evaluate on
//!    the test set; checkpoint every shard at the segment's end step; write
//!    the metrics JSON and the PNG.
//! 4. A shard or worker that dies, or a shard that hangs (no answer to
//!    Health for `cluster.shard_timeout_s`, see `crate::health`): stop the
//!    workers, kill hung shard processes, restart dead shards from their
//!    checkpoints (external shards: wait for them with backoff), roll every
//!    shard back to the last complete cluster checkpoint and rerun from its
//!    step and data position. Updates since that checkpoint are lost and
//!    recomputed. Every control call has a deadline
//!    (`cluster.control_timeout_s`) and is watched by Health probes.
//! 5. A worker that fails deterministically (bad data, config or model: a
//!    malformed line) ends the job at once with the worker's cause; only
//!    transient failures are retried (`cluster.max_restarts`).
//!
//! `--resume` continues from the last complete cluster checkpoint of a run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_worker::train::backend::Backend;
use ember_worker::train::client::{PsClient, RetryPolicy};
use ember_worker::train::config::JobConfig;
use ember_worker::train::eval::evaluate;
use ember_worker::train::setup::{count_rows, setup_cluster};
use ember_worker::train::worker::{run_epoch, FailureReport, Progress, WorkerJob, WorkerReport};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::coordinator::{
    Coordinator, CoordinatorSettings, RunningCoordinator, WorkerEvent as Event,
};
use crate::health::{guarded, with_deadline, Guarded, HealthWatch};
use crate::procs::{binary, log_target, ShardProcess, ShardSpec};
use crate::report::{EpochRecord, RunReport, TestMetrics, TimeSplit};
use crate::ClusterError;

/// Options of `ember train` beyond the job file.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Path of the job file (passed on to worker processes).
    pub config_path: PathBuf,
    /// Continue from the last complete cluster checkpoint.
    pub resume: bool,
    /// No progress bar (logs only).
    pub quiet: bool,
    /// Serve the launcher's training metrics (per-worker samples and loss,
    /// test AUC/GAUC, restarts) in Prometheus format on this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Addresses of a running cluster, written to `<run>/cluster.json` so that
/// users and tests can scrape `/metrics` or kill a shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// gRPC address of each shard.
    pub shards: Vec<String>,
    /// Metrics address of each shard (empty when none).
    pub metrics: Vec<String>,
    /// Process id of each shard (0 for in-process shards).
    pub pids: Vec<u32>,
    /// Process id of the launcher.
    pub launcher_pid: u32,
    /// The launcher's own `/metrics` address (training progress), if served.
    #[serde(default)]
    pub launcher_metrics: String,
    /// The coordinator's gRPC address (`worker_mode = "external"`; empty otherwise).
    #[serde(default)]
    pub coordinator: String,
}

/// The shards of a run, however they are hosted.
enum Shards {
    /// Child processes.
    Processes(Vec<ShardProcess>, Vec<ShardSpec>),
    /// In-process gRPC servers.
    InProcess(Vec<ember_ps::server::RunningShard>),
    /// Someone else's shards (restarted by their orchestrator), with the
    /// uptime each reported last, to notice a restart.
    External(Vec<String>, Vec<Option<u64>>),
}

impl Shards {
    fn addrs(&self) -> Vec<String> {
        match self {
            Shards::Processes(p, _) => p.iter().map(|s| s.addr.clone()).collect(),
            Shards::InProcess(r) => r.iter().map(|s| s.addr.to_string()).collect(),
            Shards::External(a, _) => a.clone(),
        }
    }

    fn info(&self) -> ClusterInfo {
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
    async fn dead(&mut self, ps: &Backend) -> Vec<usize> {
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
    async fn wait_external(
        &mut self,
        ps: &Backend,
        deadline: Duration,
    ) -> Result<(), ClusterError> {
        let (Shards::External(_, seen), Backend::Remote(client)) = (self, ps) else {
            return Ok(());
        };
        let start = Instant::now();
        for (i, last) in seen.iter_mut().enumerate() {
            let mut backoff = Duration::from_millis(500);
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
                        backoff = (backoff * 2).min(Duration::from_secs(10));
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
    fn kill_hung(&mut self, idx: &[usize]) {
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

    /// Restarts dead shard processes from their latest good checkpoint, on the same port.
    fn restart_dead(&mut self) -> Result<Vec<usize>, ClusterError> {
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |e| ClusterError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Runs the whole job; returns the report of all epochs.
pub async fn train(mut cfg: JobConfig, opts: &LaunchOptions) -> Result<RunReport, ClusterError> {
    let out = cfg.out_dir();
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    resolve_security(&mut cfg)?;
    let ckpt = cfg.checkpoint_dir();
    if !opts.resume && ckpt.starts_with(&out) && ckpt.exists() && cfg.cluster.shard_addrs.is_empty()
    {
        tracing::info!(dir = %ckpt.display(), "fresh run: removing old checkpoints (use --resume to continue)");
        std::fs::remove_dir_all(&ckpt).map_err(io_err(&ckpt))?;
    }
    std::fs::create_dir_all(&ckpt).map_err(io_err(&ckpt))?;

    let mut shards = start_shards(&cfg, opts.resume).await?;
    let addrs = shards.addrs();
    let mut info = shards.info();
    if let Some(addr) = opts.metrics_addr {
        info.launcher_metrics = serve_launcher_metrics(addr).await?.to_string();
    }
    let coordinator = start_coordinator(&cfg).await?;
    if let Some(c) = &coordinator {
        info.coordinator = c.server.addr.to_string();
    }
    let info_path = out.join("cluster.json");
    std::fs::write(
        &info_path,
        serde_json::to_string_pretty(&info).unwrap_or_default(),
    )
    .map_err(io_err(&info_path))?;
    tracing::info!(shards = ?addrs, metrics = ?info.metrics, "shards ready");

    let retry = RetryPolicy {
        deadline: Duration::from_secs(cfg.cluster.retry_deadline_s),
        ..RetryPolicy::default()
    };
    let ps = Backend::Remote(PsClient::new(&addrs, retry, &cfg.security.client()?)?);
    shards
        .wait_external(&ps, Duration::from_secs(cfg.cluster.retry_deadline_s))
        .await?;
    let control = Duration::from_secs(cfg.cluster.control_timeout_s);
    let mut watch = HealthWatch::new(
        addrs.len(),
        Duration::from_secs(cfg.cluster.shard_timeout_s),
    );

    // Steps per worker per epoch, equal for all workers.
    let rows = count_rows(&cfg.data.train)?;
    let per_worker = rows / cfg.cluster.workers as u64;
    let mut k = per_worker.div_ceil(cfg.data.batch_size as u64).max(1);
    if let Some(m) = cfg.train.max_steps_per_epoch {
        k = k.min(m.max(1));
    }

    let report_path = out.join("metrics.json");
    let mut report = RunReport {
        name: cfg.name.clone(),
        model: format!("{:?}", cfg.model.kind).to_lowercase(),
        shards: addrs.len(),
        workers: cfg.cluster.workers,
        epochs: Vec::new(),
    };
    let mut last_ckpt;
    if opts.resume {
        let steps = with_deadline(control, ps.common_checkpoints())
            .await
            .map_err(|e| control_error("list checkpoints", e))?;
        let Some(&s) = steps.last() else {
            return Err(ClusterError::Launch(format!(
                "--resume: no complete cluster checkpoint in {}",
                ckpt.display()
            )));
        };
        // Shards started with --restore already loaded their latest
        // checkpoint; restoring it again would cost a second full load
        // (about 50 s per shard at 10^8 rows). Restore unless every shard
        // holds step `s` untouched: restored or written at `s` and no row
        // pushed since the process started.
        let at_s = match &ps {
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
        ember_worker::train::setup::check_restored_tables(&cfg, &ps).await?;
        last_ckpt = s;
        if let Ok(old) = RunReport::read_json(&report_path) {
            report.epochs = old.epochs.into_iter().filter(|r| r.step <= s).collect();
        }
        tracing::info!(
            step = s,
            epochs_done = report.epochs.len(),
            "resumed from cluster checkpoint"
        );
    } else {
        // A fresh run needs fresh shards: a shard that already trained would
        // ignore dense pushes for steps below its dense step.
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
        with_deadline(control, setup_cluster(&cfg, &ps))
            .await
            .map_err(|e| control_error("setup", e))?;
        with_deadline(
            control,
            ps.checkpoint(0, cfg.cluster.keep_checkpoints.max(2)),
        )
        .await
        .map_err(|e| control_error("checkpoint at step 0", e))?;
        last_ckpt = 0;
    }

    // Checkpoint cadence: every `checkpoint_every_steps` steps of an epoch
    // (a segment) and always at its end; 0 = at epoch ends only.
    let seg = match cfg.cluster.checkpoint_every_steps {
        0 => k,
        n => n.min(k),
    };
    // A resumed run may start inside an epoch (a mid-epoch checkpoint).
    let first_epoch = (last_ckpt / k) as usize + 1;
    for epoch in first_epoch..=cfg.train.epochs {
        let epoch_start = (epoch as u64 - 1) * k;
        let end_step = epoch_start + k;
        let mut restarts = 0u32;
        let mut reports: Vec<WorkerReport> = Vec::new();
        let mut seconds = 0.0;
        let mut test = None;
        // Each attempt trains one segment from the last cluster checkpoint
        // (its data position is `last_ckpt - epoch_start` steps into the
        // epoch), evaluates at the epoch's end, and checkpoints every shard.
        // A failure anywhere in it rolls the cluster back to `last_ckpt`.
        while last_ckpt < end_step {
            let done_steps = last_ckpt - epoch_start;
            let len = seg.min(k - done_steps);
            let seg_end = last_ckpt + len;
            let t = Instant::now();
            let attempt = async {
                let coord = coordinator.as_ref().map(|c| &c.coord);
                let part = Segment {
                    epoch,
                    start_step: epoch_start,
                    skip_steps: done_steps,
                    steps: len,
                    epoch_steps: k,
                };
                let r = run_workers(
                    &cfg,
                    opts,
                    &ps,
                    &mut shards,
                    &mut watch,
                    &addrs,
                    coord,
                    &part,
                )
                .await?;
                let secs = t.elapsed().as_secs_f64();
                let test = if seg_end == end_step {
                    let eval = evaluate(&cfg, &ps, &cfg.data.test, cfg.train.max_eval_samples);
                    Some(
                        guarded(&ps, &mut watch, control, eval)
                            .await
                            .map_err(|e| guard_failure("evaluation", e))?
                            .0,
                    )
                } else {
                    None
                };
                let keep = cfg.cluster.keep_checkpoints.max(2);
                guarded(&ps, &mut watch, control, ps.checkpoint(seg_end, keep))
                    .await
                    .map_err(|e| guard_failure(&format!("checkpoint at step {seg_end}"), e))?;
                Ok::<_, Failure>((r, secs, test))
            }
            .await;
            match attempt {
                Ok((r, secs, t)) => {
                    reports.extend(r);
                    seconds += secs;
                    test = t;
                    last_ckpt = seg_end;
                    if seg_end < end_step {
                        tracing::info!(epoch, step = seg_end, "mid-epoch cluster checkpoint");
                    }
                }
                Err(failure) => {
                    let mut failure = failure;
                    loop {
                        if let Failure::Rejected(w, cause) = &failure {
                            return Err(ClusterError::Launch(format!(
                                "epoch {epoch}: worker {w} failed: {cause} (a data, config \
                                 or model error fails the same way every time: not retried)"
                            )));
                        }
                        restarts += 1;
                        if restarts > cfg.cluster.max_restarts {
                            return Err(ClusterError::Launch(format!(
                                "epoch {epoch} failed {restarts} times, giving up; last failure: {failure}"
                            )));
                        }
                        tracing::warn!(
                            epoch,
                            restarts,
                            "{failure}; rolling the cluster back to step {last_ckpt}"
                        );
                        if let Failure::ShardHung(h) = &failure {
                            shards.kill_hung(h);
                        }
                        match rollback(&cfg, &ps, &mut shards, &mut watch, last_ckpt).await {
                            Ok(()) => break,
                            Err(f) => failure = f,
                        }
                    }
                }
            }
        }
        let Some(test) = test else {
            return Err(ClusterError::Launch(format!(
                "epoch {epoch} ended without an evaluation (resumed at its end step?)"
            )));
        };
        let rec = epoch_record(epoch, end_step, &reports, seconds, restarts, test.clone());
        tracing::info!(
            epoch,
            loss = rec.train_loss,
            auc = rec.test.as_ref().map(|t| t.auc),
            gauc = rec.test.as_ref().map(|t| t.gauc),
            samples_per_s = rec.samples_per_s as u64,
            "epoch done"
        );
        metrics::gauge!("ember_train_epoch").set(epoch as f64);
        metrics::gauge!("ember_test_auc").set(test.auc);
        metrics::gauge!("ember_test_gauc").set(test.gauc);
        metrics::gauge!("ember_test_logloss").set(test.logloss);
        metrics::counter!("ember_train_restarts_total").increment(u64::from(restarts));
        report.epochs.push(rec);
        report.write_json(&report_path)?;
        if let Err(e) = crate::plot::plot_curves(&out.join("curves.png"), &cfg.name, &report.epochs)
        {
            tracing::warn!("could not draw curves: {e}");
        }
    }
    if let Some(c) = &coordinator {
        finish_external_workers(&c.coord).await;
    }
    if let Shards::Processes(p, _) = &mut shards {
        let _ = with_deadline(Duration::from_secs(10), ps_shutdown(&ps)).await;
        for s in p.iter_mut() {
            s.kill();
        }
    }
    Ok(report)
}

/// Brings the cluster back to the cluster checkpoint `step` after a failed
/// attempt: restarts dead shard processes from their checkpoints, waits for
/// external shards to answer again, and restores every shard to `step`
/// (watched: a shard that hangs during the restore fails it again).
async fn rollback(
    cfg: &JobConfig,
    ps: &Backend,
    shards: &mut Shards,
    watch: &mut HealthWatch,
    step: u64,
) -> Result<(), Failure> {
    let restarted = shards
        .restart_dead()
        .map_err(|e| Failure::Coordinator(format!("restarting shards: {e}")))?;
    if !restarted.is_empty() {
        tracing::warn!(?restarted, "restarted shards");
    }
    // An orchestrator may take a while to bring a shard back (or resume it).
    let wait = Duration::from_secs(
        cfg.cluster
            .retry_deadline_s
            .max(cfg.cluster.control_timeout_s)
            .max(120),
    );
    shards
        .wait_external(ps, wait)
        .await
        .map_err(|e| Failure::Coordinator(e.to_string()))?;
    watch.reset();
    let control = Duration::from_secs(cfg.cluster.control_timeout_s);
    guarded(ps, watch, control, ps.restore(step))
        .await
        .map_err(|e| guard_failure(&format!("restore of step {step}"), e))?;
    tracing::info!(step, "cluster rolled back");
    Ok(())
}

/// A failed guarded control call as the failure of an attempt.
fn guard_failure<E: std::fmt::Display>(what: &str, g: Guarded<E>) -> Failure {
    match g {
        Guarded::Hung(s) => Failure::ShardHung(s),
        other => Failure::Coordinator(format!("{what}: {other}")),
    }
}

/// A failed control call outside an attempt (setup, resume) as a launch error.
fn control_error<E: std::fmt::Display>(what: &str, g: Guarded<E>) -> ClusterError {
    ClusterError::Launch(format!("{what}: {g}"))
}

/// Serves the launcher's metrics (Prometheus text) on `addr`; returns the bound address.
async fn serve_launcher_metrics(
    addr: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, ClusterError> {
    let handle = ember_ps::metrics::install_exporter()
        .map_err(|e| ClusterError::Launch(format!("metrics exporter: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ClusterError::Launch(format!("cannot bind metrics address {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ClusterError::Launch(e.to_string()))?;
    tokio::spawn(ember_ps::metrics::serve_metrics(
        listener,
        handle,
        std::future::pending(),
    ));
    Ok(bound)
}

async fn ps_shutdown(ps: &Backend) -> Result<(), ClusterError> {
    if let Backend::Remote(c) = ps {
        c.shutdown(0).await?;
    }
    Ok(())
}

/// Resolves `security.mode = "auto"`: for shards this launcher starts, a
/// fresh CA, server certificate (localhost, 127.0.0.1) and bearer token under
/// `<out_dir>/secrets/` (keys and token mode 0600), and `tls` everywhere. With
/// external shards `auto` is an error: their certificates are the
/// deployment's. `insecure` is kept (the client warns).
fn resolve_security(cfg: &mut JobConfig) -> Result<(), ClusterError> {
    if cfg.security.mode() != "auto" {
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
    let files = ember_proto::pki::write_test_pki(&dir, &["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| ClusterError::Launch(format!("security.mode = \"auto\": {e}")))?;
    let token = dir.join("token");
    ember_proto::pki::write_token(&token)
        .map_err(|e| ClusterError::Launch(format!("security.mode = \"auto\": {e}")))?;
    cfg.security = ember_worker::train::config::SecurityConfig {
        mode: "tls".into(),
        ca: Some(files.ca),
        cert: Some(files.server_cert),
        key: Some(files.server_key),
        token_file: Some(token),
        ..Default::default()
    };
    tracing::info!(dir = %dir.display(), "TLS + token: a fresh CA, certificate and token for this run");
    Ok(())
}

async fn start_shards(cfg: &JobConfig, resume: bool) -> Result<Shards, ClusterError> {
    if !cfg.cluster.shard_addrs.is_empty() {
        let n = cfg.cluster.shard_addrs.len();
        return Ok(Shards::External(
            cfg.cluster.shard_addrs.clone(),
            vec![None; n],
        ));
    }
    let n = cfg.cluster.shards;
    let ckpt = cfg.checkpoint_dir();
    match cfg.cluster.mode.as_str() {
        "inprocess" => {
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
                    insecure: cfg.security.mode() == "insecure",
                    max_bytes: cfg.cluster.shard_max_bytes,
                    ..ember_ps::server::ServerConfig::default()
                };
                running.push(
                    ember_ps::server::spawn(sc)
                        .await
                        .map_err(|e| ClusterError::Launch(format!("in-process shard {i}: {e}")))?,
                );
            }
            Ok(Shards::InProcess(running))
        }
        _ => {
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

/// Why an epoch attempt failed.
#[derive(Debug)]
enum Failure {
    /// A shard process died.
    ShardDied(Vec<usize>),
    /// Shards stopped answering Health for `cluster.shard_timeout_s`.
    ShardHung(Vec<usize>),
    /// A worker failed or died (transient: retried).
    Worker(usize, String),
    /// A worker failed deterministically (data, config, model): not retried.
    Rejected(usize, String),
    /// The coordinator's own calls (evaluation, checkpoint) failed.
    Coordinator(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::ShardDied(s) => write!(f, "shard(s) {s:?} died"),
            Failure::ShardHung(s) => write!(f, "shard(s) {s:?} hung (no Health answer)"),
            Failure::Worker(w, e) => write!(f, "worker {w} failed: {e}"),
            Failure::Rejected(w, e) => write!(f, "worker {w} failed: {e}"),
            Failure::Coordinator(e) => write!(f, "{e}"),
        }
    }
}

/// The coordinator of external workers and its server.
struct ExternalWorkers {
    coord: Coordinator,
    server: RunningCoordinator,
}

/// Starts the coordinator service when `cluster.worker_mode = "external"`,
/// with the same TLS/token settings as the shards.
async fn start_coordinator(cfg: &JobConfig) -> Result<Option<ExternalWorkers>, ClusterError> {
    if !cfg.cluster.external_workers() {
        return Ok(None);
    }
    let coord = Coordinator::new(CoordinatorSettings {
        num_workers: cfg.cluster.workers,
        worker_timeout: Duration::from_secs(cfg.cluster.worker_timeout_s),
        start_timeout: Duration::from_secs(cfg.cluster.worker_start_timeout_s),
        wait_ms: 500,
    });
    let security = cfg.security.server()?;
    let server =
        crate::coordinator::serve(coord.clone(), &cfg.cluster.coordinator_listen, &security)
            .await?;
    Ok(Some(ExternalWorkers { coord, server }))
}

/// Training is over: NextTask answers DONE; wait (up to 30 s) until every
/// worker index has seen it, so that the workers (e.g. an Indexed Job's
/// pods) exit successfully before the coordinator goes away.
async fn finish_external_workers(coord: &Coordinator) {
    coord.finish();
    let until = Instant::now() + Duration::from_secs(30);
    while !coord.all_saw_done() {
        if Instant::now() > until {
            tracing::warn!("not every external worker asked for a task after training ended");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("every external worker was told that training is done");
}

/// After a failed attempt of external workers: wait until every worker that
/// still held the attempt has let go of it (its next heartbeat is answered
/// `keep_going = false`; it then asks NextTask) or gone silent, so that no
/// stale push lands after the rollback. Bounded by `worker_timeout_s` (60 s at most).
async fn settle_external_workers(coord: &Coordinator, cfg: &JobConfig) {
    let grace = Duration::from_secs(5);
    let until = Instant::now() + Duration::from_secs(cfg.cluster.worker_timeout_s.min(60));
    loop {
        let busy = coord.unsettled(Instant::now(), grace);
        if busy.is_empty() {
            return;
        }
        if Instant::now() > until {
            tracing::warn!(workers = ?busy, "workers still hold the abandoned attempt; rolling back anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The part of an epoch one `run_workers` call trains.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Epoch number, from 1.
    epoch: usize,
    /// Global step at the epoch's start.
    start_step: u64,
    /// Steps of the epoch already trained (the data position to resume at).
    skip_steps: u64,
    /// Steps to train now.
    steps: u64,
    /// Steps of the whole epoch (for the progress bar).
    epoch_steps: u64,
}

fn progress_bar(quiet: bool, epoch: usize, total: u64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} samples ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(epoch.to_string());
    pb
}

#[allow(clippy::too_many_arguments)]
async fn run_workers(
    cfg: &JobConfig,
    opts: &LaunchOptions,
    ps: &Backend,
    shards: &mut Shards,
    watch: &mut HealthWatch,
    addrs: &[String],
    coord: Option<&Coordinator>,
    part: &Segment,
) -> Result<Vec<WorkerReport>, Failure> {
    let Segment {
        epoch,
        start_step,
        skip_steps,
        steps,
        epoch_steps,
    } = *part;
    let m = cfg.cluster.workers;
    let per_step = m as u64 * cfg.data.batch_size as u64;
    let pb = progress_bar(opts.quiet, epoch, epoch_steps * per_step);
    // Samples of this epoch already trained before this segment.
    let base = skip_steps * per_step;
    pb.set_position(base);
    let (tx, rx) = mpsc::channel::<Event>();
    let mut children: Vec<Child> = Vec::new();
    let mut tasks = Vec::new();
    let process_mode = cfg.cluster.mode == "process";
    if let Some(c) = coord {
        // External workers pull this attempt's task from the coordinator.
        let attempt = c.publish(
            epoch,
            start_step,
            steps,
            skip_steps,
            addrs,
            tx.clone(),
            Instant::now(),
        );
        tracing::info!(
            epoch,
            attempt,
            start_step,
            steps,
            "epoch published to external workers"
        );
    }
    for w in (0..m).filter(|_| coord.is_none()) {
        let job = WorkerJob {
            config: cfg.clone(),
            worker_index: w,
            num_workers: m,
            epoch,
            start_step,
            skip_steps,
            steps: Some(steps),
        };
        if process_mode {
            match spawn_worker_process(cfg, opts, addrs, &job, tx.clone()) {
                Ok(c) => children.push(c),
                Err(e) => return Err(Failure::Worker(w, e.to_string())),
            }
        } else {
            let ps = ps.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let txp = std::sync::Mutex::new(tx.clone());
                let emit = move |p: &Progress| {
                    if let Ok(t) = txp.lock() {
                        let _ = t.send(Event::Progress(p.clone()));
                    }
                };
                match run_epoch(&job, &ps, &emit).await {
                    Ok(r) => {
                        let _ = tx.send(Event::Done(r));
                    }
                    Err(e) if e.is_deterministic() => {
                        let _ = tx.send(Event::Rejected(w, e.to_string()));
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Failed(w, e.to_string()));
                    }
                }
            }));
        }
    }
    drop(tx);
    let mut done: Vec<Option<WorkerReport>> = vec![None; m];
    let mut samples = vec![0u64; m];
    let mut losses = vec![f64::NAN; m];
    let mut last_check = Instant::now();
    let mut reported = vec![0u64; m];
    let result = loop {
        if done.iter().all(Option::is_some) {
            break Ok(done.into_iter().flatten().collect());
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Progress(p)) => {
                if p.worker < m {
                    samples[p.worker] = p.samples;
                    losses[p.worker] = p.loss;
                    let w = p.worker.to_string();
                    metrics::counter!("ember_train_samples_total", "worker" => w.clone())
                        .increment(p.samples.saturating_sub(reported[p.worker]));
                    reported[p.worker] = p.samples;
                    metrics::gauge!("ember_train_loss", "worker" => w).set(p.loss);
                }
                pb.set_position(base + samples.iter().sum::<u64>());
                let l: Vec<f64> = losses.iter().copied().filter(|x| x.is_finite()).collect();
                if !l.is_empty() {
                    pb.set_message(format!(
                        "loss {:.4}",
                        l.iter().sum::<f64>() / l.len() as f64
                    ));
                }
            }
            Ok(Event::Done(r)) => {
                let w = r.worker;
                if coord.is_some() {
                    tracing::info!(
                        worker = w,
                        steps = r.steps,
                        samples = r.samples,
                        "external worker done"
                    );
                }
                if w < m {
                    samples[w] = r.samples;
                    pb.set_position(base + samples.iter().sum::<u64>());
                    done[w] = Some(r);
                }
            }
            Ok(Event::Failed(w, e)) => break Err(Failure::Worker(w, e)),
            Ok(Event::Rejected(w, e)) => break Err(Failure::Rejected(w, e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if done.iter().any(Option::is_none) {
                    break Err(Failure::Worker(
                        done.iter().position(Option::is_none).unwrap_or(0),
                        "exited without a report".into(),
                    ));
                }
            }
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            let dead = shards.dead(ps).await;
            if !dead.is_empty() {
                break Err(Failure::ShardDied(dead));
            }
            let hung = watch.hung(ps).await;
            if !hung.is_empty() {
                break Err(Failure::ShardHung(hung));
            }
            if let Some((w, e)) = coord.and_then(|c| c.check_timeouts(Instant::now())) {
                break Err(Failure::Worker(w, e));
            }
        }
        // Let in-process tasks make progress while we poll.
        tokio::task::yield_now().await;
    };
    pb.finish_and_clear();
    if let Some(c) = coord {
        // The attempt is over either way; after a failure make sure its
        // workers stopped before the launcher rolls the shards back.
        c.pause();
        if result.is_err() {
            settle_external_workers(c, cfg).await;
        }
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    for t in tasks {
        t.abort();
    }
    result
}

fn spawn_worker_process(
    cfg: &JobConfig,
    opts: &LaunchOptions,
    addrs: &[String],
    job: &WorkerJob,
    tx: mpsc::Sender<Event>,
) -> Result<Child, ClusterError> {
    let bin = binary("worker")?;
    let log = cfg
        .out_dir()
        .join("logs")
        .join(format!("worker-{}.log", job.worker_index));
    let mut cmd = Command::new(&bin);
    cmd.arg("--config")
        .arg(&opts.config_path)
        .arg("--shards")
        .arg(addrs.join(","))
        .arg("--worker-index")
        .arg(job.worker_index.to_string())
        .arg("--num-workers")
        .arg(job.num_workers.to_string())
        .arg("--epoch")
        .arg(job.epoch.to_string())
        .arg("--start-step")
        .arg(job.start_step.to_string())
        .arg("--skip-steps")
        .arg(job.skip_steps.to_string());
    if let Some(s) = job.steps {
        cmd.arg("--steps").arg(s.to_string());
    }
    // TLS/token paths of the resolved [security] (never the token itself).
    cmd.args(cfg.security.process_args(false));
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", "1");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_target(Some(&log))?);
    let mut child = cmd
        .spawn()
        .map_err(|e| ClusterError::Launch(format!("cannot start {}: {e}", bin.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ClusterError::Launch("no stdout of worker".into()))?;
    let w = job.worker_index;
    let log_s = log.display().to_string();
    std::thread::spawn(move || {
        let mut reported = false;
        let mut failure: Option<FailureReport> = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(j) = line.strip_prefix("EMBER_PROGRESS ") {
                if let Ok(p) = serde_json::from_str::<Progress>(j) {
                    let _ = tx.send(Event::Progress(p));
                }
            } else if let Some(j) = line.strip_prefix("EMBER_REPORT ") {
                if let Ok(r) = serde_json::from_str::<WorkerReport>(j) {
                    reported = true;
                    let _ = tx.send(Event::Done(r));
                }
            } else if let Some(j) = line.strip_prefix("EMBER_FAILURE ") {
                failure = serde_json::from_str::<FailureReport>(j).ok();
            }
        }
        if reported {
            return;
        }
        let _ = tx.send(match failure {
            Some(f) if f.deterministic => {
                Event::Rejected(w, format!("{} (log: {log_s})", f.message))
            }
            Some(f) => Event::Failed(w, format!("{} (log: {log_s})", f.message)),
            None => Event::Failed(
                w,
                format!(
                    "worker process exited without a report (killed or crashed; log: {log_s}){}",
                    log_tail(&log_s, 3)
                ),
            ),
        });
    });
    Ok(child)
}

/// The last `n` lines of the log at `path`, as `"; last log lines: ..."`
/// (empty when there are none): the likely cause of a crash.
fn log_tail(path: &str, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    format!("; last log lines: {tail}")
}

fn epoch_record(
    epoch: usize,
    step: u64,
    reports: &[WorkerReport],
    seconds: f64,
    restarts: u32,
    test: ember_worker::train::eval::EvalResult,
) -> EpochRecord {
    let steps: u64 = reports.iter().map(|r| r.steps).sum();
    let samples: u64 = reports.iter().map(|r| r.samples).sum();
    let loss_sum: f64 = reports.iter().map(|r| r.loss_sum).sum();
    let dedup: f64 = reports.iter().map(|r| r.dedup_sum).sum();
    EpochRecord {
        epoch,
        step,
        train_loss: if steps > 0 {
            loss_sum / steps as f64
        } else {
            f64::NAN
        },
        samples,
        seconds,
        samples_per_s: if seconds > 0.0 {
            samples as f64 / seconds
        } else {
            0.0
        },
        dedup_ratio: if steps > 0 { dedup / steps as f64 } else { 1.0 },
        time: TimeSplit {
            pull_s: reports.iter().map(|r| r.pull_s).sum(),
            compute_s: reports.iter().map(|r| r.compute_s).sum(),
            push_s: reports.iter().map(|r| r.push_s).sum(),
            wait_s: reports.iter().map(|r| r.wait_s).sum(),
        },
        test: Some(TestMetrics {
            auc: test.auc,
            gauc: test.gauc,
            logloss: test.logloss,
            rows: test.rows,
        }),
        restarts,
    }
}
