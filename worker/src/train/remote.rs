//! External-worker mode: `worker --coordinator URL`.
//!
//! With `[cluster] worker_mode = "external"`, `ember train` does not start the
//! workers; it serves the `ember.v1.Coordinator` service
//! (`proto/proto/ember/v1/coordinator.proto`) and workers started elsewhere
//! (Compose services, a Kubernetes Indexed Job) pull their work from it:
//!
//! ```text
//! loop {
//!     NextTask(i, M) -> WAIT: sleep, ask again | DONE: exit 0 | RUN: task
//!     run_epoch(task), a heartbeat task sending ReportProgress about once a
//!         second (the latest progress); keep_going = false -> abandon now
//!     ReportDone(report) | ReportFailure(error)
//! }
//! ```
//!
//! While the coordinator is unreachable every call is retried with
//! exponential backoff (each retry logged) up to [`RemoteOptions::unreachable_deadline`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_proto::security::{BearerAuth, ClientSecurity};
use ember_proto::v1 as pb;
use ember_proto::v1::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::backend::Backend;
use super::config::JobConfig;
use super::worker::{run_epoch_cancellable, Progress, WorkerJob, WorkerReport};
use super::TrainError;

/// A client of the coordinator service (with the bearer-token interceptor).
pub type CoordinatorConn = CoordinatorClient<InterceptedService<Channel, BearerAuth>>;

/// Errors of the external-worker loop.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The coordinator rejected a call, or stayed unreachable past the deadline.
    #[error("coordinator {addr} failed {what}: {} ({:?})", status.message(), status.code())]
    Coordinator {
        /// The coordinator's address.
        addr: String,
        /// The call that failed.
        what: &'static str,
        /// The final status.
        status: Status,
    },
    /// The coordinator answered something that breaks the contract.
    #[error("coordinator protocol error: {0}")]
    Protocol(String),
    /// The coordinator address or the security settings are unusable.
    #[error("coordinator setup: {0}")]
    Setup(String),
    /// Training (or connecting to the shards) failed outside a task.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// How an external worker finds and talks to its coordinator.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Coordinator address: `host:port`, `http://host:port` or `https://host:port`.
    pub coordinator: String,
    /// This worker's index, 0-based.
    pub worker_index: usize,
    /// Number of workers (must equal the job's `cluster.workers`).
    pub num_workers: usize,
    /// Identity of this process in the coordinator's logs.
    pub worker_id: String,
    /// Give up when the coordinator stays unreachable this long.
    pub unreachable_deadline: Duration,
    /// Interval of the progress/heartbeat reports while a task runs.
    pub heartbeat: Duration,
}

/// `host/pid-N`: a worker identity for the coordinator's logs.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".into());
    format!("{host}/pid-{}", std::process::id())
}

/// The coordinator client: the one place its transport (TLS, token, timeouts)
/// is set up. The connection is lazy (made on the first call, re-made after
/// the coordinator restarts); call it inside a tokio runtime.
pub fn connect_coordinator(
    addr: &str,
    security: &ClientSecurity,
) -> Result<CoordinatorConn, RemoteError> {
    let ep = security
        .endpoint(addr)
        .map_err(|e| RemoteError::Setup(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    Ok(CoordinatorClient::with_interceptor(
        ep.connect_lazy(),
        security.interceptor(),
    ))
}

/// Whether a failed coordinator call may succeed later (it is restarting or
/// not up yet), as opposed to a rejected request: the shared classification,
/// [`ember_proto::retry::is_transient`] (kept for the tests below).
#[cfg(test)]
fn transient(s: &Status) -> bool {
    ember_proto::retry::is_transient(s)
}

/// Calls `f` until it succeeds, retrying transient failures with exponential
/// backoff (200 ms doubling up to 5 s, each retry logged) for up to
/// `deadline`, through the shared [`ember_proto::retry::retry`].
async fn retrying<T, Fut>(
    addr: &str,
    what: &'static str,
    deadline: Duration,
    f: impl FnMut() -> Fut,
) -> Result<T, RemoteError>
where
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let policy = ember_proto::retry::RetryPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
        deadline,
    };
    ember_proto::retry::retry(&policy, &format!("coordinator {addr}"), what, f)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| RemoteError::Coordinator {
            addr: addr.to_string(),
            what,
            status,
        })
}

/// The wire form of a worker's report.
pub fn report_to_proto(r: &WorkerReport) -> pb::TaskReport {
    pb::TaskReport {
        steps: r.steps,
        samples: r.samples,
        loss_sum: r.loss_sum,
        pull_s: r.pull_s,
        compute_s: r.compute_s,
        push_s: r.push_s,
        wait_s: r.wait_s,
        dedup_sum: r.dedup_sum,
        skipped: r.skipped,
        seconds: r.seconds,
    }
}

/// A worker's report from its wire form.
pub fn report_from_proto(worker: usize, r: &pb::TaskReport) -> WorkerReport {
    WorkerReport {
        worker,
        steps: r.steps,
        samples: r.samples,
        loss_sum: r.loss_sum,
        pull_s: r.pull_s,
        compute_s: r.compute_s,
        push_s: r.push_s,
        wait_s: r.wait_s,
        dedup_sum: r.dedup_sum,
        skipped: r.skipped,
        seconds: r.seconds,
    }
}

/// What became of one task.
enum Outcome {
    Completed(WorkerReport),
    Abandoned,
    Failed(TrainError),
}

/// What an external worker did before the coordinator said DONE.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteSummary {
    /// Tasks run to completion.
    pub completed: u64,
    /// Tasks abandoned because their attempt went stale.
    pub abandoned: u64,
    /// Tasks that failed (reported to the coordinator).
    pub failed: u64,
}

/// Runs tasks from the coordinator until it answers DONE. `connect_shards`
/// builds the parameter-server backend for the shard addresses of a task
/// (called again only when the addresses change).
pub async fn run_remote<F>(
    config: &JobConfig,
    opts: &RemoteOptions,
    security: &ClientSecurity,
    connect_shards: F,
) -> Result<RemoteSummary, RemoteError>
where
    F: Fn(&[String]) -> Result<Backend, TrainError>,
{
    let addr = opts.coordinator.clone();
    let client = connect_coordinator(&addr, security)?;
    let mut shards: Option<(Vec<String>, Backend)> = None;
    let mut summary = RemoteSummary::default();
    tracing::info!(
        coordinator = %addr,
        worker = opts.worker_index,
        workers = opts.num_workers,
        id = %opts.worker_id,
        "external worker started"
    );
    loop {
        let req = pb::NextTaskRequest {
            worker_index: opts.worker_index as u32,
            num_workers: opts.num_workers as u32,
            worker_id: opts.worker_id.clone(),
        };
        let task = retrying(&addr, "NextTask", opts.unreachable_deadline, || {
            let mut c = client.clone();
            let r = req.clone();
            async move { c.next_task(r).await }
        })
        .await?;
        match pb::TaskKind::try_from(task.kind) {
            Ok(pb::TaskKind::Done) => {
                tracing::info!(?summary, "coordinator says training is done");
                return Ok(summary);
            }
            Ok(pb::TaskKind::Wait) => {
                let ms = u64::from(task.retry_after_ms).clamp(50, 10_000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(pb::TaskKind::Run) => {
                if task.shard_addrs.is_empty() {
                    return Err(RemoteError::Protocol(format!(
                        "task of attempt {} names no shards",
                        task.attempt
                    )));
                }
                let backend = match &shards {
                    Some((a, b)) if *a == task.shard_addrs => b.clone(),
                    _ => {
                        let b = connect_shards(&task.shard_addrs)?;
                        shards = Some((task.shard_addrs.clone(), b.clone()));
                        b
                    }
                };
                let job = WorkerJob {
                    config: config.clone(),
                    worker_index: opts.worker_index,
                    num_workers: opts.num_workers,
                    epoch: task.epoch as usize,
                    start_step: task.start_step,
                    skip_steps: task.skip_steps,
                    steps: Some(task.steps),
                };
                tracing::info!(
                    epoch = task.epoch,
                    attempt = task.attempt,
                    start_step = task.start_step,
                    skip_steps = task.skip_steps,
                    steps = task.steps,
                    "running task"
                );
                let attempt = task.attempt;
                match run_task(&client, opts, &job, &backend, attempt).await {
                    Outcome::Completed(report) => {
                        summary.completed += 1;
                        let req = pb::ReportDoneRequest {
                            worker_index: opts.worker_index as u32,
                            attempt,
                            report: Some(report_to_proto(&report)),
                        };
                        let ack = retrying(&addr, "ReportDone", opts.unreachable_deadline, || {
                            let mut c = client.clone();
                            let r = req;
                            async move { c.report_done(r).await }
                        })
                        .await?;
                        tracing::info!(
                            attempt,
                            steps = report.steps,
                            samples = report.samples,
                            accepted = ack.accepted,
                            "task done"
                        );
                    }
                    Outcome::Abandoned => {
                        summary.abandoned += 1;
                        tracing::warn!(attempt, "attempt is stale: task abandoned");
                    }
                    Outcome::Failed(e) => {
                        summary.failed += 1;
                        tracing::error!(attempt, "task failed: {e}");
                        let req = pb::ReportFailureRequest {
                            worker_index: opts.worker_index as u32,
                            attempt,
                            error: e.to_string(),
                            deterministic: e.is_deterministic(),
                        };
                        // The coordinator also notices through the heartbeat
                        // timeout, so a lost failure report is not fatal.
                        if let Err(re) =
                            retrying(&addr, "ReportFailure", opts.unreachable_deadline, || {
                                let mut c = client.clone();
                                let r = req.clone();
                                async move { c.report_failure(r).await }
                            })
                            .await
                        {
                            tracing::warn!("could not report the failure: {re}");
                        }
                    }
                }
            }
            Ok(pb::TaskKind::Unspecified) | Err(_) => {
                return Err(RemoteError::Protocol(format!(
                    "NextTask answered task kind {}",
                    task.kind
                )));
            }
        }
    }
}

/// Latest progress of the running task, shared with the heartbeat.
#[derive(Default)]
struct Latest {
    progress: Option<Progress>,
    fresh: bool,
}

/// Runs one task with a heartbeat that reports progress and cancels the task
/// when the coordinator says its attempt is stale.
async fn run_task(
    client: &CoordinatorConn,
    opts: &RemoteOptions,
    job: &WorkerJob,
    ps: &Backend,
    attempt: u64,
) -> Outcome {
    let cancel = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(tokio::sync::Notify::new());
    let latest = Arc::new(Mutex::new(Latest::default()));
    let heartbeat = {
        let (client, cancel, stale, latest) = (
            client.clone(),
            cancel.clone(),
            stale.clone(),
            latest.clone(),
        );
        let (worker, every) = (opts.worker_index as u32, opts.heartbeat);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let (steps, samples, loss) = match latest.lock() {
                    Ok(mut l) => {
                        let fresh = std::mem::take(&mut l.fresh);
                        match &l.progress {
                            Some(p) => (p.steps, p.samples, if fresh { p.loss } else { f64::NAN }),
                            None => (0, 0, f64::NAN),
                        }
                    }
                    Err(_) => (0, 0, f64::NAN),
                };
                let req = pb::ReportProgressRequest {
                    worker_index: worker,
                    attempt,
                    steps,
                    samples,
                    loss,
                };
                match client.clone().report_progress(req).await {
                    Ok(r) if !r.get_ref().keep_going => {
                        cancel.store(true, Ordering::Relaxed);
                        stale.notify_one();
                        return;
                    }
                    Ok(_) => {}
                    // Unreachable for a moment: keep training, report later.
                    Err(s) => tracing::debug!("progress report failed: {}", s.message()),
                }
            }
        })
    };
    let emit = {
        let latest = latest.clone();
        move |p: &Progress| {
            if let Ok(mut l) = latest.lock() {
                l.progress = Some(p.clone());
                l.fresh = true;
            }
        }
    };
    let result = tokio::select! {
        r = run_epoch_cancellable(job, ps, &emit, &cancel) => Some(r),
        _ = stale.notified() => None,
    };
    heartbeat.abort();
    if cancel.load(Ordering::Relaxed) {
        return Outcome::Abandoned;
    }
    match result {
        Some(Ok(r)) => Outcome::Completed(r),
        Some(Err(e)) => Outcome::Failed(e),
        None => Outcome::Abandoned,
    }
}

/// [`run_remote`] on its own tokio runtime (for the `worker` binary).
pub fn run_remote_blocking<F>(
    config: &JobConfig,
    opts: &RemoteOptions,
    security: &ClientSecurity,
    connect_shards: F,
) -> Result<RemoteSummary, RemoteError>
where
    F: Fn(&[String]) -> Result<Backend, TrainError>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RemoteError::Setup(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(run_remote(config, opts, security, connect_shards))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_through_the_wire_form() {
        let r = WorkerReport {
            worker: 3,
            steps: 7,
            samples: 896,
            loss_sum: 3.5,
            pull_s: 0.25,
            compute_s: 1.5,
            push_s: 0.5,
            wait_s: 0.125,
            dedup_sum: 9.0,
            skipped: 2,
            seconds: 4.0,
        };
        assert_eq!(report_from_proto(3, &report_to_proto(&r)), r);
    }

    #[test]
    fn only_unavailable_like_codes_are_retried() {
        assert!(transient(&Status::unavailable("down")));
        assert!(!transient(&Status::invalid_argument("bad index")));
        assert!(!transient(&Status::unauthenticated("token")));
    }
}
