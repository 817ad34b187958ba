//! The coordinator: the one control plane of every worker, the server side
//! of `ember.v1.Coordinator` (`proto/proto/ember/v1/coordinator.proto`).
//!
//! The launcher publishes one attempt of one epoch segment at a time
//! ([`Coordinator::publish`]); every worker asks for its part with NextTask,
//! reports progress (also as a heartbeat), and reports done or failed, and
//! stays alive for the next segment. Worker processes (on loopback, Compose
//! services, a Kubernetes Indexed Job: `worker --coordinator URL`) make those
//! calls over gRPC ([`serve`]); the launcher's in-process workers call the
//! same state machine directly (its [`TaskSource`] impl). The calls become
//! [`WorkerEvent`]s on the channel the launcher's segment loop consumes.
//!
//! An attempt fails (a [`WorkerEvent::Failed`], or [`Coordinator::check_timeouts`])
//! when a worker reports a failure, asks for a new task while it holds an
//! unfinished task of the current attempt (it restarted), stays silent for
//! `worker_timeout`, or does not ask for its task within `start_timeout`.
//! The launcher then [`pause`](Coordinator::pause)s: reports about the old
//! attempt are answered `keep_going = false` / not accepted, NextTask answers
//! WAIT, and [`Coordinator::unsettled`] tells when every worker of the old
//! attempt has let go of it, before the shards are rolled back. After the
//! last epoch, [`Coordinator::finish`] makes NextTask answer DONE.
//!
//! The state machine is plain Rust with the clock passed in (`now`), so it is
//! tested without a network or sleeps; [`CoordinatorService`] wraps it for
//! tonic and [`serve`] is the one place its transport is set up.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ember_proto::security::ServerSecurity;
use ember_proto::v1 as pb;
use ember_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use ember_worker::train::remote::{report_from_proto, TaskSource};
use ember_worker::train::worker::{Progress, WorkerReport};
use ember_worker::train::TrainError;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::ClusterError;

/// What the workers tell the launcher's epoch loop (from child processes'
/// stdout, in-process tasks, or the coordinator's RPCs).
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    /// A progress report.
    Progress(Progress),
    /// A worker finished its task.
    Done(WorkerReport),
    /// Worker `.0` failed with the message `.1` (transient: retried).
    Failed(usize, String),
    /// Worker `.0` failed deterministically (bad data, config or model:
    /// the same task would fail again) with the message `.1`: not retried.
    Rejected(usize, String),
}

/// Timing and size of the coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// The job's `cluster.workers`.
    pub num_workers: usize,
    /// A worker holding a task and silent this long has failed.
    pub worker_timeout: Duration,
    /// A published task not asked for within this long has failed.
    pub start_timeout: Duration,
    /// `retry_after_ms` of WAIT answers.
    pub wait_ms: u32,
}

/// The task currently offered to the workers.
#[derive(Debug, Clone)]
struct Published {
    epoch: u64,
    start_step: u64,
    steps: u64,
    skip_steps: u64,
    attempt: u64,
    shard_addrs: Vec<String>,
    at: Instant,
}

#[derive(Debug)]
enum Phase {
    /// Nothing to run (before the first epoch, between epochs, during a rollback).
    Waiting,
    /// An attempt is running.
    Running(Published),
    /// Training is over.
    Done,
}

/// What the coordinator knows about one worker index.
#[derive(Debug, Clone, Default)]
struct Slot {
    /// The attempt whose task this worker holds (None = free).
    attempt: Option<u64>,
    /// It reported done for `attempt`.
    finished: bool,
    /// Last RPC about `attempt`.
    last_seen: Option<Instant>,
    /// Identity it gave in NextTask.
    worker_id: String,
    /// It was answered DONE.
    saw_done: bool,
}

#[derive(Debug)]
struct State {
    settings: CoordinatorSettings,
    phase: Phase,
    next_attempt: u64,
    slots: Vec<Slot>,
    events: Option<mpsc::UnboundedSender<WorkerEvent>>,
}

impl State {
    fn current(&self) -> Option<&Published> {
        match &self.phase {
            Phase::Running(p) => Some(p),
            _ => None,
        }
    }

    fn emit(&self, e: WorkerEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    fn check_index(&self, worker_index: u32) -> Result<usize, Status> {
        let m = self.settings.num_workers;
        let i = worker_index as usize;
        if i >= m {
            return Err(Status::invalid_argument(format!(
                "worker_index {i} is out of range: the job has num_workers = {m} (indices 0..{m})"
            )));
        }
        Ok(i)
    }
}

/// The coordinator's shared state (cheap to clone: one handle for the
/// launcher, one per RPC service).
#[derive(Debug, Clone)]
pub struct Coordinator {
    state: Arc<Mutex<State>>,
}

impl Coordinator {
    /// A coordinator with nothing published yet (NextTask answers WAIT).
    /// Attempt ids start at the current Unix time in milliseconds, so they
    /// keep increasing when the trainer is restarted.
    pub fn new(settings: CoordinatorSettings) -> Coordinator {
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let slots = vec![Slot::default(); settings.num_workers];
        Coordinator {
            state: Arc::new(Mutex::new(State {
                settings,
                phase: Phase::Waiting,
                next_attempt: base.max(1),
                slots,
                events: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent state (every
        // update is a plain assignment); keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes an attempt of `epoch` (a new attempt id, returned); its
    /// events go to `events`.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &self,
        epoch: usize,
        start_step: u64,
        steps: u64,
        skip_steps: u64,
        shard_addrs: &[String],
        events: mpsc::UnboundedSender<WorkerEvent>,
        now: Instant,
    ) -> u64 {
        let mut guard = self.lock();
        let s = &mut *guard;
        let attempt = s.next_attempt;
        s.next_attempt += 1;
        s.phase = Phase::Running(Published {
            epoch: epoch as u64,
            start_step,
            steps,
            skip_steps,
            attempt,
            shard_addrs: shard_addrs.to_vec(),
            at: now,
        });
        s.events = Some(events);
        attempt
    }

    /// Stops offering the current attempt (it succeeded, or failed and is
    /// being abandoned): NextTask answers WAIT; reports about it are stale.
    pub fn pause(&self) {
        let mut guard = self.lock();
        let s = &mut *guard;
        if !matches!(s.phase, Phase::Done) {
            s.phase = Phase::Waiting;
        }
        s.events = None;
    }

    /// Training is over: NextTask answers DONE from now on.
    pub fn finish(&self) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.phase = Phase::Done;
        s.events = None;
    }

    /// Worker `i` is known to be gone (its process exited): it holds no task
    /// any more, so [`Coordinator::unsettled`] need not wait for it.
    pub fn forget(&self, i: usize) {
        if let Some(slot) = self.lock().slots.get_mut(i) {
            slot.attempt = None;
            slot.finished = false;
        }
    }

    /// Whether every worker index has been answered DONE.
    pub fn all_saw_done(&self) -> bool {
        self.lock().slots.iter().all(|s| s.saw_done)
    }

    /// Workers still holding an unfinished task of an attempt that is no
    /// longer running and heard from within `grace` (they have not yet let go
    /// of it: asked NextTask, reported the failure, or gone silent).
    pub fn unsettled(&self, now: Instant, grace: Duration) -> Vec<usize> {
        let s = self.lock();
        let running = s.current().map(|p| p.attempt);
        s.slots
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.attempt.is_some()
                    && w.attempt != running
                    && !w.finished
                    && w.last_seen.is_some_and(|t| now.duration_since(t) < grace)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// A worker of the running attempt that timed out, with the reason.
    pub fn check_timeouts(&self, now: Instant) -> Option<(usize, String)> {
        let s = self.lock();
        let p = s.current()?;
        for (i, w) in s.slots.iter().enumerate() {
            if w.attempt == Some(p.attempt) {
                if w.finished {
                    continue;
                }
                let silent = w
                    .last_seen
                    .map(|t| now.duration_since(t))
                    .unwrap_or_default();
                if silent > s.settings.worker_timeout {
                    return Some((
                        i,
                        format!(
                            "no progress or heartbeat from worker {i} ({}) for {:.0?} \
                             (cluster.worker_timeout_s = {})",
                            w.worker_id,
                            silent,
                            s.settings.worker_timeout.as_secs()
                        ),
                    ));
                }
            } else if now.duration_since(p.at) > s.settings.start_timeout {
                return Some((
                    i,
                    format!(
                        "worker {i} did not ask for its task within {:.0?} of publishing \
                         attempt {} (cluster.worker_start_timeout_s = {})",
                        now.duration_since(p.at),
                        p.attempt,
                        s.settings.start_timeout.as_secs()
                    ),
                ));
            }
        }
        None
    }

    /// NextTask: RUN the current attempt's task, WAIT, or DONE.
    pub fn next_task(&self, req: &pb::NextTaskRequest, now: Instant) -> Result<pb::Task, Status> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let m = s.settings.num_workers;
        if req.num_workers as usize != m {
            return Err(Status::invalid_argument(format!(
                "num_workers {} does not match the job's cluster.workers = {m} \
                 (worker_index {})",
                req.num_workers, req.worker_index
            )));
        }
        let i = s.check_index(req.worker_index)?;
        let wait = pb::Task {
            kind: pb::TaskKind::Wait as i32,
            retry_after_ms: s.settings.wait_ms,
            ..pb::Task::default()
        };
        let current = s.current().cloned();
        let slot = &mut s.slots[i];
        let Some(p) = current else {
            if matches!(s.phase, Phase::Done) {
                slot.saw_done = true;
                slot.attempt = None;
                return Ok(pb::Task {
                    kind: pb::TaskKind::Done as i32,
                    ..pb::Task::default()
                });
            }
            // It let go of whatever it held.
            slot.attempt = None;
            return Ok(wait);
        };
        if slot.attempt == Some(p.attempt) {
            if slot.finished {
                return Ok(wait);
            }
            // It held an unfinished task of this attempt: it restarted (or
            // gave up silently). The attempt cannot complete any more.
            let msg = format!(
                "worker {i} ({}) asked for a new task while holding attempt {} \
                 (it restarted or abandoned its task)",
                req.worker_id, p.attempt
            );
            slot.attempt = None;
            slot.worker_id = req.worker_id.clone();
            tracing::warn!("{msg}");
            s.emit(WorkerEvent::Failed(i, msg));
            return Ok(wait);
        }
        slot.attempt = Some(p.attempt);
        slot.finished = false;
        slot.last_seen = Some(now);
        slot.worker_id = req.worker_id.clone();
        tracing::info!(
            worker = i,
            id = %req.worker_id,
            epoch = p.epoch,
            attempt = p.attempt,
            "task handed out"
        );
        Ok(pb::Task {
            kind: pb::TaskKind::Run as i32,
            retry_after_ms: 0,
            epoch: p.epoch,
            start_step: p.start_step,
            steps: p.steps,
            skip_steps: p.skip_steps,
            attempt: p.attempt,
            shard_addrs: p.shard_addrs.clone(),
        })
    }

    /// ReportProgress: records the heartbeat; `keep_going` is false for a
    /// stale attempt.
    pub fn report_progress(
        &self,
        req: &pb::ReportProgressRequest,
        now: Instant,
    ) -> Result<pb::ReportProgressResponse, Status> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let i = s.check_index(req.worker_index)?;
        let running = s.current().map(|p| p.attempt);
        let slot = &mut s.slots[i];
        let live =
            running == Some(req.attempt) && slot.attempt == Some(req.attempt) && !slot.finished;
        if slot.attempt == Some(req.attempt) {
            slot.last_seen = Some(now);
        }
        if live && req.loss.is_finite() {
            s.emit(WorkerEvent::Progress(Progress {
                worker: i,
                steps: req.steps,
                samples: req.samples,
                loss: req.loss,
            }));
        }
        Ok(pb::ReportProgressResponse { keep_going: live })
    }

    /// ReportDone: the worker's report of the current attempt becomes a
    /// [`WorkerEvent::Done`]; a stale one is ignored (not accepted).
    pub fn report_done(
        &self,
        req: &pb::ReportDoneRequest,
        now: Instant,
    ) -> Result<pb::ReportDoneResponse, Status> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let i = s.check_index(req.worker_index)?;
        let running = s.current().map(|p| p.attempt);
        let slot = &mut s.slots[i];
        if running != Some(req.attempt) || slot.attempt != Some(req.attempt) || slot.finished {
            if slot.attempt == Some(req.attempt) && !slot.finished {
                slot.attempt = None;
            }
            tracing::info!(
                worker = i,
                attempt = req.attempt,
                "stale done report ignored"
            );
            return Ok(pb::ReportDoneResponse { accepted: false });
        }
        slot.finished = true;
        slot.last_seen = Some(now);
        let report = report_from_proto(i, &req.report.unwrap_or_default());
        s.emit(WorkerEvent::Done(report));
        Ok(pb::ReportDoneResponse { accepted: true })
    }

    /// ReportFailure: a failure of the current attempt becomes a
    /// [`WorkerEvent::Failed`]; a stale one is ignored (not accepted).
    pub fn report_failure(
        &self,
        req: &pb::ReportFailureRequest,
    ) -> Result<pb::ReportFailureResponse, Status> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let i = s.check_index(req.worker_index)?;
        let running = s.current().map(|p| p.attempt);
        let slot = &mut s.slots[i];
        let holds = slot.attempt == Some(req.attempt) && !slot.finished;
        if holds {
            slot.attempt = None;
        }
        if !holds || running != Some(req.attempt) {
            tracing::info!(
                worker = i,
                attempt = req.attempt,
                "stale failure report ignored"
            );
            return Ok(pb::ReportFailureResponse { accepted: false });
        }
        s.emit(if req.deterministic {
            WorkerEvent::Rejected(i, req.error.clone())
        } else {
            WorkerEvent::Failed(i, req.error.clone())
        });
        Ok(pb::ReportFailureResponse { accepted: true })
    }
}

/// The coordinator as the task source of the launcher's in-process workers
/// (`mode = "inprocess"`): the same calls as over gRPC, without a network.
impl TaskSource for Coordinator {
    fn next_task(
        &self,
        req: pb::NextTaskRequest,
    ) -> impl Future<Output = Result<pb::Task, TrainError>> + Send {
        std::future::ready(
            Coordinator::next_task(self, &req, Instant::now()).map_err(local("NextTask")),
        )
    }

    fn report_progress(
        &self,
        req: pb::ReportProgressRequest,
    ) -> impl Future<Output = Result<pb::ReportProgressResponse, TrainError>> + Send {
        std::future::ready(
            Coordinator::report_progress(self, &req, Instant::now())
                .map_err(local("ReportProgress")),
        )
    }

    fn report_done(
        &self,
        req: pb::ReportDoneRequest,
    ) -> impl Future<Output = Result<pb::ReportDoneResponse, TrainError>> + Send {
        std::future::ready(
            Coordinator::report_done(self, &req, Instant::now()).map_err(local("ReportDone")),
        )
    }

    fn report_failure(
        &self,
        req: pb::ReportFailureRequest,
    ) -> impl Future<Output = Result<pb::ReportFailureResponse, TrainError>> + Send {
        std::future::ready(Coordinator::report_failure(self, &req).map_err(local("ReportFailure")))
    }
}

/// A rejected in-process call as the worker loop's error.
fn local(what: &'static str) -> impl Fn(Status) -> TrainError {
    move |status| TrainError::Coordinator {
        addr: "in-process".into(),
        what,
        status,
    }
}

/// The tonic service of a [`Coordinator`].
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    coord: Coordinator,
}

impl CoordinatorService {
    /// The service answering for `coord`.
    pub fn new(coord: Coordinator) -> Self {
        CoordinatorService { coord }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn next_task(
        &self,
        request: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.coord
            .next_task(request.get_ref(), Instant::now())
            .map(Response::new)
    }

    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        self.coord
            .report_progress(request.get_ref(), Instant::now())
            .map(Response::new)
    }

    async fn report_done(
        &self,
        request: Request<pb::ReportDoneRequest>,
    ) -> Result<Response<pb::ReportDoneResponse>, Status> {
        self.coord
            .report_done(request.get_ref(), Instant::now())
            .map(Response::new)
    }

    async fn report_failure(
        &self,
        request: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        self.coord
            .report_failure(request.get_ref())
            .map(Response::new)
    }
}

/// A coordinator server running on the launcher's runtime; stopped on drop.
#[derive(Debug)]
pub struct RunningCoordinator {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves `coord` on `listen` (port 0 = any free port) with `security` (TLS
/// and bearer token, the same settings as the shards): the one place the
/// coordinator's server transport is set up.
pub async fn serve(
    coord: Coordinator,
    listen: &str,
    security: &ServerSecurity,
) -> Result<RunningCoordinator, ClusterError> {
    let bind = |source| ClusterError::Bind {
        what: "coordinator (cluster.coordinator_listen)",
        addr: listen.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let missing = security.missing();
    if !missing.is_empty() {
        tracing::warn!(
            %addr,
            "INSECURE: the coordinator serves without {}",
            missing.join(" and ")
        );
    }
    let svc = InterceptedService::new(
        CoordinatorServer::new(CoordinatorService::new(coord)),
        security.interceptor(),
    );
    let builder = security.apply(tonic::transport::Server::builder(), "the coordinator")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = builder;
    let server = builder
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopped.await;
        });
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("coordinator server failed: {e}");
        }
    });
    tracing::info!(%addr, "coordinator serving");
    Ok(RunningCoordinator {
        addr,
        stop: Some(stop),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coord(m: usize) -> Coordinator {
        Coordinator::new(CoordinatorSettings {
            num_workers: m,
            worker_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(100),
            wait_ms: 250,
        })
    }

    fn ask(c: &Coordinator, i: u32, now: Instant) -> pb::Task {
        c.next_task(
            &pb::NextTaskRequest {
                worker_index: i,
                num_workers: 2,
                worker_id: format!("w{i}"),
            },
            now,
        )
        .unwrap()
    }

    fn kind(t: &pb::Task) -> pb::TaskKind {
        pb::TaskKind::try_from(t.kind).unwrap()
    }

    fn progress(i: u32, attempt: u64, loss: f64) -> pb::ReportProgressRequest {
        pb::ReportProgressRequest {
            worker_index: i,
            attempt,
            steps: 3,
            samples: 96,
            loss,
        }
    }

    fn done(i: u32, attempt: u64) -> pb::ReportDoneRequest {
        pb::ReportDoneRequest {
            worker_index: i,
            attempt,
            report: Some(pb::TaskReport {
                steps: 5,
                samples: 160,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn runs_an_epoch_and_turns_reports_into_events() {
        let c = coord(2);
        let t0 = Instant::now();
        assert_eq!(kind(&ask(&c, 0, t0)), pb::TaskKind::Wait);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shards = vec!["a:1".to_string(), "b:2".to_string()];
        let a = c.publish(1, 0, 5, 0, &shards, tx, t0);
        let t = ask(&c, 0, t0);
        assert_eq!(kind(&t), pb::TaskKind::Run);
        assert_eq!((t.epoch, t.steps, t.attempt), (1, 5, a));
        assert_eq!(t.shard_addrs, shards);
        assert!(
            c.report_progress(&progress(0, a, 0.5), t0)
                .unwrap()
                .keep_going
        );
        // A heartbeat (NaN loss) keeps it alive without an event.
        assert!(
            c.report_progress(&progress(0, a, f64::NAN), t0)
                .unwrap()
                .keep_going
        );
        assert!(c.report_done(&done(0, a), t0).unwrap().accepted);
        // A finished worker waits; the other one still gets the task.
        assert_eq!(kind(&ask(&c, 0, t0)), pb::TaskKind::Wait);
        assert_eq!(kind(&ask(&c, 1, t0)), pb::TaskKind::Run);
        assert!(c.report_done(&done(1, a), t0).unwrap().accepted);
        let ev: Vec<WorkerEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert!(matches!(&ev[0], WorkerEvent::Progress(p) if p.worker == 0 && p.loss == 0.5));
        assert!(matches!(&ev[1], WorkerEvent::Done(r) if r.worker == 0 && r.samples == 160));
        assert!(matches!(&ev[2], WorkerEvent::Done(r) if r.worker == 1));
    }

    #[test]
    fn stale_attempts_are_ignored_and_told_to_stop() {
        let c = coord(2);
        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a1 = c.publish(1, 0, 5, 0, &["s:1".into()], tx, t0);
        ask(&c, 0, t0);
        ask(&c, 1, t0);
        c.pause();
        // Worker 1 is still busy with a1: it is unsettled until it lets go.
        assert_eq!(c.unsettled(t0, Duration::from_secs(5)), vec![0, 1]);
        assert!(
            !c.report_progress(&progress(1, a1, 0.3), t0)
                .unwrap()
                .keep_going
        );
        assert_eq!(kind(&ask(&c, 0, t0)), pb::TaskKind::Wait);
        let f = pb::ReportFailureRequest {
            worker_index: 1,
            attempt: a1,
            error: "cancelled".into(),
            deterministic: false,
        };
        assert!(!c.report_failure(&f).unwrap().accepted);
        assert!(c.unsettled(t0, Duration::from_secs(5)).is_empty());
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let a2 = c.publish(1, 0, 5, 0, &["s:1".into()], tx2, t0);
        assert!(a2 > a1);
        assert_eq!(ask(&c, 0, t0).attempt, a2);
        // Reports about a1 are ignored under a2.
        assert!(
            !c.report_progress(&progress(0, a1, 0.3), t0)
                .unwrap()
                .keep_going
        );
        assert!(!c.report_done(&done(0, a1), t0).unwrap().accepted);
        assert!(rx.try_recv().is_err());
        assert!(rx2.try_recv().is_err());
        assert!(c.report_done(&done(0, a2), t0).unwrap().accepted);
        assert!(matches!(rx2.try_recv(), Ok(WorkerEvent::Done(_))));
    }

    #[test]
    fn a_restarted_worker_fails_the_attempt() {
        let c = coord(2);
        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = c.publish(2, 10, 5, 0, &["s:1".into()], tx, t0);
        assert_eq!(ask(&c, 1, t0).attempt, a);
        // The same index asks again without having finished: it restarted.
        assert_eq!(kind(&ask(&c, 1, t0)), pb::TaskKind::Wait);
        assert!(matches!(rx.try_recv(), Ok(WorkerEvent::Failed(1, m)) if m.contains("restarted")));
    }

    #[test]
    fn a_deterministic_failure_report_is_a_rejection() {
        let c = coord(2);
        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = c.publish(1, 0, 5, 0, &["s:1".into()], tx, t0);
        assert_eq!(ask(&c, 0, t0).attempt, a);
        assert_eq!(ask(&c, 1, t0).attempt, a);
        let f = |i: u32, deterministic: bool| pb::ReportFailureRequest {
            worker_index: i,
            attempt: a,
            error: format!("e{i}"),
            deterministic,
        };
        assert!(c.report_failure(&f(0, true)).unwrap().accepted);
        assert!(c.report_failure(&f(1, false)).unwrap().accepted);
        let ev: Vec<WorkerEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert!(
            matches!(&ev[..], [WorkerEvent::Rejected(0, a), WorkerEvent::Failed(1, b)] if a == "e0" && b == "e1"),
            "{ev:?}"
        );
    }

    #[test]
    fn bad_worker_index_or_count_is_rejected() {
        let c = coord(2);
        let e = c
            .next_task(
                &pb::NextTaskRequest {
                    worker_index: 2,
                    num_workers: 2,
                    worker_id: String::new(),
                },
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("worker_index 2") && e.message().contains("num_workers = 2"));
        let e = c
            .next_task(
                &pb::NextTaskRequest {
                    worker_index: 0,
                    num_workers: 3,
                    worker_id: String::new(),
                },
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("num_workers 3") && e.message().contains("= 2"),
            "{e:?}"
        );
        let e = c
            .report_progress(&progress(5, 1, 0.1), Instant::now())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn silence_past_the_timeout_is_a_failure() {
        let c = coord(2);
        let t0 = Instant::now();
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = c.publish(1, 0, 5, 0, &["s:1".into()], tx, t0);
        ask(&c, 0, t0);
        ask(&c, 1, t0);
        let t5 = t0 + Duration::from_secs(5);
        c.report_progress(&progress(0, a, 0.2), t5).unwrap();
        c.report_progress(&progress(1, a, 0.2), t5).unwrap();
        assert!(c.check_timeouts(t0 + Duration::from_secs(14)).is_none());
        c.report_progress(&progress(0, a, 0.2), t0 + Duration::from_secs(14))
            .unwrap();
        let (w, msg) = c.check_timeouts(t0 + Duration::from_secs(16)).unwrap();
        assert_eq!(w, 1, "{msg}");
        assert!(msg.contains("worker_timeout_s"), "{msg}");
        // A task nobody asks for fails after the start timeout.
        let c = coord(2);
        let (tx, _rx) = mpsc::unbounded_channel();
        c.publish(1, 0, 5, 0, &["s:1".into()], tx, t0);
        let a = ask(&c, 0, t0).attempt;
        let t95 = t0 + Duration::from_secs(95);
        c.report_progress(&progress(0, a, 0.2), t95).unwrap();
        assert!(c.check_timeouts(t95).is_none());
        let (w, msg) = c.check_timeouts(t0 + Duration::from_secs(101)).unwrap();
        assert_eq!(w, 1, "{msg}");
        assert!(msg.contains("worker_start_timeout_s"), "{msg}");
    }

    #[test]
    fn done_after_the_last_epoch() {
        let c = coord(2);
        let t0 = Instant::now();
        let (tx, _rx) = mpsc::unbounded_channel();
        c.publish(1, 0, 5, 0, &["s:1".into()], tx, t0);
        c.pause();
        assert_eq!(kind(&ask(&c, 0, t0)), pb::TaskKind::Wait);
        c.finish();
        assert!(!c.all_saw_done());
        assert_eq!(kind(&ask(&c, 0, t0)), pb::TaskKind::Done);
        assert!(!c.all_saw_done());
        assert_eq!(kind(&ask(&c, 1, t0)), pb::TaskKind::Done);
        assert!(c.all_saw_done());
    }
}
