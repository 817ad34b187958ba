//! The worker's task loop: every worker, however it is hosted, runs it.
//!
//! `ember train` is the only control plane: its coordinator
//! (`ember_cluster::coordinator`, contract in
//! `proto/proto/ember/v1/coordinator.proto`) publishes one attempt of one
//! epoch segment at a time, and every worker pulls its part of it from a
//! [`TaskSource`]: over gRPC ([`GrpcTasks`]: child processes on loopback,
//! Compose services, a Kubernetes Indexed Job, `worker --coordinator URL`) or
//! from the coordinator itself when the worker is a task of the launcher
//! (`mode = "inprocess"`). A worker stays alive across segments and epochs:
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
//! While the coordinator is unreachable every gRPC call is retried with
//! exponential backoff (each retry logged) up to [`RemoteOptions::unreachable_deadline`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_proto::security::{BearerAuth, ClientSecurity};
use ember_proto::v1 as pb;
use ember_proto::v1::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;

use super::backend::Backend;
use super::config::JobConfig;
use super::worker::{run_epoch_cancellable, Progress, WorkerJob, WorkerReport};
use super::TrainError;

/// A client of the coordinator service (with the bearer-token interceptor).
pub type CoordinatorConn = CoordinatorClient<InterceptedService<Channel, BearerAuth>>;

/// Who a worker is and how it talks to its coordinator.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Coordinator address: `host:port`, `http://host:port` or
    /// `https://host:port` (for the logs only with an in-process source).
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
) -> Result<CoordinatorConn, TrainError> {
    let ep = security
        .endpoint(addr)
        .map_err(|e| TrainError::Config(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    Ok(CoordinatorClient::with_interceptor(
        ep.connect_lazy(),
        security.interceptor(),
    ))
}

/// Calls `f` until it succeeds, retrying transient failures with exponential
/// backoff (200 ms doubling up to 5 s, each retry logged) for up to
/// `deadline`, through the shared [`ember_proto::retry::retry`].
async fn retrying<T, Fut>(
    addr: &str,
    what: &'static str,
    deadline: Duration,
    f: impl FnMut() -> Fut,
) -> Result<T, TrainError>
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
        .map_err(|status| TrainError::Coordinator {
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

/// Where a worker gets its tasks and where it reports them: the
/// coordinator's four calls. [`GrpcTasks`] reaches it over the network; the
/// launcher implements this for its `Coordinator` so that its in-process
/// workers call it directly. Both answer with the coordinator's statuses.
pub trait TaskSource: Clone + Send + Sync + 'static {
    /// NextTask: RUN a task, WAIT, or DONE.
    fn next_task(
        &self,
        req: pb::NextTaskRequest,
    ) -> impl Future<Output = Result<pb::Task, TrainError>> + Send;
    /// ReportProgress (also the heartbeat): `keep_going = false` means the
    /// task's attempt is stale and must be abandoned.
    fn report_progress(
        &self,
        req: pb::ReportProgressRequest,
    ) -> impl Future<Output = Result<pb::ReportProgressResponse, TrainError>> + Send;
    /// ReportDone with the task's report.
    fn report_done(
        &self,
        req: pb::ReportDoneRequest,
    ) -> impl Future<Output = Result<pb::ReportDoneResponse, TrainError>> + Send;
    /// ReportFailure with the error and whether it is deterministic.
    fn report_failure(
        &self,
        req: pb::ReportFailureRequest,
    ) -> impl Future<Output = Result<pb::ReportFailureResponse, TrainError>> + Send;
}

/// The coordinator over gRPC: NextTask and the final reports are retried
/// while it is unreachable (up to `deadline`); a progress report is tried
/// once (the next heartbeat comes soon).
#[derive(Clone)]
pub struct GrpcTasks {
    client: CoordinatorConn,
    addr: String,
    deadline: Duration,
}

impl GrpcTasks {
    /// A source on the coordinator at `addr` (see [`connect_coordinator`]).
    pub fn connect(
        addr: &str,
        security: &ClientSecurity,
        deadline: Duration,
    ) -> Result<GrpcTasks, TrainError> {
        Ok(GrpcTasks {
            client: connect_coordinator(addr, security)?,
            addr: addr.to_string(),
            deadline,
        })
    }
}

impl TaskSource for GrpcTasks {
    async fn next_task(&self, req: pb::NextTaskRequest) -> Result<pb::Task, TrainError> {
        retrying(&self.addr, "NextTask", self.deadline, || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.next_task(r).await }
        })
        .await
    }

    async fn report_progress(
        &self,
        req: pb::ReportProgressRequest,
    ) -> Result<pb::ReportProgressResponse, TrainError> {
        let mut c = self.client.clone();
        c.report_progress(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| TrainError::Coordinator {
                addr: self.addr.clone(),
                what: "ReportProgress",
                status,
            })
    }

    async fn report_done(
        &self,
        req: pb::ReportDoneRequest,
    ) -> Result<pb::ReportDoneResponse, TrainError> {
        retrying(&self.addr, "ReportDone", self.deadline, || {
            let mut c = self.client.clone();
            let r = req;
            async move { c.report_done(r).await }
        })
        .await
    }

    async fn report_failure(
        &self,
        req: pb::ReportFailureRequest,
    ) -> Result<pb::ReportFailureResponse, TrainError> {
        retrying(&self.addr, "ReportFailure", self.deadline, || {
            let mut c = self.client.clone();
            let r = req.clone();
            async move { c.report_failure(r).await }
        })
        .await
    }
}

/// What became of one task.
enum Outcome {
    Completed(WorkerReport),
    Abandoned,
    Failed(TrainError),
}

/// What a worker did before the coordinator said DONE.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteSummary {
    /// Tasks run to completion.
    pub completed: u64,
    /// Tasks abandoned because their attempt went stale.
    pub abandoned: u64,
    /// Tasks that failed (reported to the coordinator).
    pub failed: u64,
}

/// Runs tasks from the coordinator at `opts.coordinator` over gRPC until it
/// answers DONE (see [`run_tasks`]).
pub async fn run_remote<F>(
    config: &JobConfig,
    opts: &RemoteOptions,
    security: &ClientSecurity,
    connect_shards: F,
) -> Result<RemoteSummary, TrainError>
where
    F: Fn(&[String]) -> Result<Backend, TrainError> + Send + Sync,
{
    let source = GrpcTasks::connect(&opts.coordinator, security, opts.unreachable_deadline)?;
    run_tasks(config, opts, source, connect_shards).await
}

/// Runs tasks from `source` until it answers DONE. `connect_shards` builds
/// the parameter-server backend for the shard addresses of a task (called
/// again only when the addresses change).
pub async fn run_tasks<S, F>(
    config: &JobConfig,
    opts: &RemoteOptions,
    source: S,
    connect_shards: F,
) -> Result<RemoteSummary, TrainError>
where
    S: TaskSource,
    F: Fn(&[String]) -> Result<Backend, TrainError> + Send + Sync,
{
    let mut shards: Option<(Vec<String>, Backend)> = None;
    let mut summary = RemoteSummary::default();
    tracing::info!(
        coordinator = %opts.coordinator,
        worker = opts.worker_index,
        workers = opts.num_workers,
        id = %opts.worker_id,
        "worker started"
    );
    loop {
        let task = source
            .next_task(pb::NextTaskRequest {
                worker_index: opts.worker_index as u32,
                num_workers: opts.num_workers as u32,
                worker_id: opts.worker_id.clone(),
            })
            .await?;
        match pb::TaskKind::try_from(task.kind) {
            Ok(pb::TaskKind::Done) => {
                tracing::info!(?summary, "coordinator says training is done");
                return Ok(summary);
            }
            Ok(pb::TaskKind::Wait) => {
                let ms = u64::from(task.retry_after_ms).clamp(10, 10_000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(pb::TaskKind::Run) => {
                if task.shard_addrs.is_empty() {
                    return Err(TrainError::Protocol(format!(
                        "coordinator: task of attempt {} names no shards",
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
                let outcome = run_one(config, opts, &source, &backend, &task).await;
                report_outcome(opts, &source, task.attempt, outcome, &mut summary).await?;
            }
            Ok(pb::TaskKind::Unspecified) | Err(_) => {
                return Err(TrainError::Protocol(format!(
                    "coordinator: NextTask answered task kind {}",
                    task.kind
                )));
            }
        }
    }
}

/// Runs the RUN task `task` (logged).
async fn run_one<S: TaskSource>(
    config: &JobConfig,
    opts: &RemoteOptions,
    source: &S,
    backend: &Backend,
    task: &pb::Task,
) -> Outcome {
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
    run_task(source, opts, &job, backend, task.attempt).await
}

/// Tells the coordinator how the task of `attempt` ended.
async fn report_outcome<S: TaskSource>(
    opts: &RemoteOptions,
    source: &S,
    attempt: u64,
    outcome: Outcome,
    summary: &mut RemoteSummary,
) -> Result<(), TrainError> {
    match outcome {
        Outcome::Completed(report) => {
            summary.completed += 1;
            let ack = source
                .report_done(pb::ReportDoneRequest {
                    worker_index: opts.worker_index as u32,
                    attempt,
                    report: Some(report_to_proto(&report)),
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
            // The coordinator also notices through the heartbeat timeout,
            // so a lost failure report is not fatal.
            if let Err(re) = source.report_failure(req).await {
                tracing::warn!("could not report the failure: {re}");
            }
        }
    }
    Ok(())
}

/// Latest progress of the running task, shared with the heartbeat.
#[derive(Default)]
struct Latest {
    progress: Option<Progress>,
    fresh: bool,
}

/// Runs one task with a heartbeat that reports progress and cancels the task
/// when the coordinator says its attempt is stale.
async fn run_task<S: TaskSource>(
    source: &S,
    opts: &RemoteOptions,
    job: &WorkerJob,
    ps: &Backend,
    attempt: u64,
) -> Outcome {
    let cancel = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(tokio::sync::Notify::new());
    let latest = Arc::new(Mutex::new(Latest::default()));
    let heartbeat = {
        let (source, cancel, stale, latest) = (
            source.clone(),
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
                match source.report_progress(req).await {
                    Ok(r) if !r.keep_going => {
                        cancel.store(true, Ordering::Relaxed);
                        stale.notify_one();
                        return;
                    }
                    Ok(_) => {}
                    // Unreachable for a moment: keep training, report later.
                    Err(e) => tracing::debug!("progress report failed: {e}"),
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
) -> Result<RemoteSummary, TrainError>
where
    F: Fn(&[String]) -> Result<Backend, TrainError> + Send + Sync,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TrainError::Config(format!("cannot start the async runtime: {e}")))?;
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
}
