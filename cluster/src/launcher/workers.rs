//! Where the workers run: child `worker` processes on loopback (`mode =
//! "process"`), tasks of the launcher (`mode = "inprocess"`), or elsewhere
//! (`worker_mode = "external"`: Compose services, a Kubernetes Indexed Job).
//!
//! Every worker runs the same task loop against the coordinator
//! (`ember_worker::train::remote::run_tasks`): processes over gRPC, tasks
//! through the coordinator's in-process `TaskSource` impl. They are started
//! once and live across segments and epochs; this type only starts them,
//! tells which died (and why), restarts those, and waits for them at the end.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_worker::train::backend::Backend;
use ember_worker::train::config::JobConfig;
use ember_worker::train::remote::{default_worker_id, run_tasks, RemoteOptions};
use tokio::task::JoinHandle;

use crate::coordinator::Coordinator;
use crate::procs::{binary, log_target};
use crate::ClusterError;

/// How to start worker `i` as a child process.
pub(super) struct ProcessSpec {
    bin: PathBuf,
    config_path: PathBuf,
    coordinator: String,
    num_workers: usize,
    security_args: Vec<OsString>,
    logs: PathBuf,
}

impl ProcessSpec {
    fn log(&self, i: usize) -> PathBuf {
        self.logs.join(format!("worker-{i}.log"))
    }

    /// `worker --config JOB --coordinator ADDR --worker-index i --num-workers M
    /// --heartbeat-ms 250`
    /// plus the TLS/token paths of the resolved `[security]` (never the token
    /// itself); stderr appended to `logs/worker-i.log`.
    fn spawn(&self, i: usize) -> Result<Child, ClusterError> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--coordinator")
            .arg(&self.coordinator)
            .arg("--worker-index")
            .arg(i.to_string())
            .arg("--num-workers")
            .arg(self.num_workers.to_string())
            // Loopback: frequent progress reports are cheap (a smooth bar).
            .arg("--heartbeat-ms")
            .arg("250")
            .args(&self.security_args);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", "1");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_target(Some(&self.log(i)))?);
        cmd.spawn().map_err(|source| ClusterError::Spawn {
            bin: self.bin.display().to_string(),
            source,
        })
    }
}

/// An in-process worker: its task and, once it ended, why.
pub(super) struct TaskWorker {
    handle: JoinHandle<()>,
    ended: Arc<Mutex<Option<String>>>,
}

/// The job's workers, however they are hosted.
pub(super) enum Workers {
    /// Child processes (`None`: died, waiting for [`Workers::restart_dead`]).
    Processes(Vec<Option<Child>>, ProcessSpec),
    /// Tasks of the launcher's runtime.
    Tasks(
        Vec<Option<TaskWorker>>,
        Box<JobConfig>,
        Coordinator,
        Backend,
    ),
    /// Started and restarted by someone else.
    External,
}

impl Workers {
    /// Child processes that ask `coordinator` (a gRPC address) for tasks.
    pub(super) fn processes(
        cfg: &JobConfig,
        config_path: PathBuf,
        coordinator: String,
    ) -> Result<Workers, ClusterError> {
        let spec = ProcessSpec {
            bin: binary("worker")?,
            config_path,
            coordinator,
            num_workers: cfg.cluster.workers,
            security_args: cfg.security.process_args(false),
            logs: cfg.out_dir().join("logs"),
        };
        let children = (0..spec.num_workers)
            .map(|i| spec.spawn(i).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Workers::Processes(children, spec))
    }

    /// Tasks on this runtime that take their tasks from `coord` directly and
    /// train through `ps`.
    pub(super) fn tasks(cfg: &JobConfig, coord: &Coordinator, ps: &Backend) -> Workers {
        let tasks = (0..cfg.cluster.workers)
            .map(|i| Some(spawn_task(i, cfg, coord, ps)))
            .collect();
        Workers::Tasks(tasks, Box::new(cfg.clone()), coord.clone(), ps.clone())
    }

    /// Workers that died since the last call, with the cause (exit status
    /// and the last lines of its log for a process).
    pub(super) fn dead(&mut self) -> Vec<(usize, String)> {
        let mut dead = Vec::new();
        match self {
            Workers::Processes(children, spec) => {
                for (i, slot) in children.iter_mut().enumerate() {
                    let Some(child) = slot else { continue };
                    let status = match child.try_wait() {
                        Ok(None) => continue,
                        Ok(Some(s)) => s.to_string(),
                        Err(e) => format!("cannot be waited for: {e}"),
                    };
                    let log = spec.log(i).display().to_string();
                    let tail = log_tail(&log, 3);
                    dead.push((
                        i,
                        format!("worker process exited ({status}; log: {log}){tail}"),
                    ));
                    *slot = None;
                }
            }
            Workers::Tasks(tasks, ..) => {
                for (i, slot) in tasks.iter_mut().enumerate() {
                    if !slot.as_ref().is_some_and(|t| t.handle.is_finished()) {
                        continue;
                    }
                    let why = slot
                        .take()
                        .and_then(|t| t.ended.lock().ok().and_then(|mut e| e.take()))
                        .unwrap_or_else(|| "it ended".into());
                    dead.push((i, format!("in-process worker stopped: {why}")));
                }
            }
            Workers::External => {}
        }
        dead
    }

    /// Starts the workers that died again; returns their indices.
    pub(super) fn restart_dead(&mut self) -> Result<Vec<usize>, ClusterError> {
        self.dead();
        let mut restarted = Vec::new();
        match self {
            Workers::Processes(children, spec) => {
                for (i, slot) in children.iter_mut().enumerate() {
                    if slot.is_none() {
                        *slot = Some(spec.spawn(i)?);
                        restarted.push(i);
                    }
                }
            }
            Workers::Tasks(tasks, cfg, coord, ps) => {
                for (i, slot) in tasks.iter_mut().enumerate() {
                    if slot.is_none() {
                        *slot = Some(spawn_task(i, cfg, coord, ps));
                        restarted.push(i);
                    }
                }
            }
            Workers::External => {}
        }
        Ok(restarted)
    }

    /// Training is over and the coordinator answers DONE: waits (up to
    /// `grace`) for the workers to exit, then kills what is left.
    pub(super) async fn finish(&mut self, grace: Duration) {
        let until = Instant::now() + grace;
        match self {
            Workers::Processes(children, _) => {
                for mut c in children.iter_mut().filter_map(Option::take) {
                    while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if matches!(c.try_wait(), Ok(None)) {
                        tracing::warn!(pid = c.id(), "worker did not exit after DONE: killed");
                        let _ = c.kill();
                    }
                    let _ = c.wait();
                }
            }
            Workers::Tasks(tasks, ..) => {
                for t in tasks.iter_mut().filter_map(Option::take) {
                    let left = until.saturating_duration_since(Instant::now());
                    let abort = t.handle.abort_handle();
                    if tokio::time::timeout(left, t.handle).await.is_err() {
                        abort.abort();
                    }
                }
            }
            Workers::External => {}
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        match self {
            Workers::Processes(children, _) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            Workers::Tasks(tasks, ..) => {
                for t in tasks.iter().flatten() {
                    t.handle.abort();
                }
            }
            Workers::External => {}
        }
    }
}

/// Spawns in-process worker `i`: the task loop with `coord` as its source.
fn spawn_task(i: usize, cfg: &JobConfig, coord: &Coordinator, ps: &Backend) -> TaskWorker {
    let ended = Arc::new(Mutex::new(None));
    let (cfg, coord, ps, slot) = (cfg.clone(), coord.clone(), ps.clone(), ended.clone());
    let handle = tokio::spawn(async move {
        let opts = RemoteOptions {
            coordinator: "in-process".into(),
            worker_index: i,
            num_workers: cfg.cluster.workers,
            worker_id: format!("{}/task-{i}", default_worker_id()),
            unreachable_deadline: Duration::from_secs(60),
            heartbeat: Duration::from_millis(250),
        };
        let why = match run_tasks(&cfg, &opts, coord, move |_| Ok(ps.clone())).await {
            Ok(_) => "it was told that training is done".to_string(),
            Err(e) => e.to_string(),
        };
        if let Ok(mut e) = slot.lock() {
            *e = Some(why);
        }
    });
    TaskWorker { handle, ended }
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
