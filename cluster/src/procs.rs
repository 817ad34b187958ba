//! Child processes of a local cluster: `ps-server` shards and `worker`s.
//!
//! Each child is killed when its handle is dropped, so a launcher that fails
//! or is interrupted leaves no process behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::ClusterError;

/// Directory holding Ember's binaries: `$EMBER_BIN_DIR`, else the directory of
/// the running executable (or its parent when running from `target/*/deps`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EMBER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("."));
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Path of one of Ember's binaries, or an error that says how to build it.
pub fn binary(name: &str) -> Result<PathBuf, ClusterError> {
    let p = bin_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(ClusterError::Launch(format!(
            "binary {} not found (build it with `cargo build --workspace`, or set EMBER_BIN_DIR)",
            p.display()
        )))
    }
}

/// A running `ps-server` child process.
#[derive(Debug)]
pub struct ShardProcess {
    /// Shard index.
    pub index: usize,
    /// gRPC address.
    pub addr: String,
    /// Prometheus `/metrics` address, if any.
    pub metrics_addr: Option<String>,
    child: Child,
}

/// How to start one shard process.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    /// Shard index.
    pub index: usize,
    /// Number of shards.
    pub num_shards: usize,
    /// Address to listen on (port 0 = any free port).
    pub listen: String,
    /// Metrics address (port 0 = any free port), or None for no endpoint.
    pub metrics: Option<String>,
    /// Checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Restore the latest good checkpoint at start.
    pub restore: bool,
    /// Where the shard's log (stderr) goes.
    pub log_file: Option<PathBuf>,
    /// TLS/token flags (`--tls-cert ... --auth-token-file ...` or `--insecure`).
    pub security_args: Vec<std::ffi::OsString>,
    /// Memory budget of the shard's tables in bytes (0 = none): `--max-bytes`.
    pub max_bytes: u64,
    /// How long to wait for the ready line. A shard that restores at start
    /// prints it only after loading its checkpoint (about a minute per
    /// 10^8 rows on a busy machine), so this is `cluster.control_timeout_s`
    /// then, and 60 s otherwise.
    pub ready_timeout: Duration,
}

/// A shard process started but not yet ready (see [`ShardProcess::spawn`]).
/// Dropping it kills the process.
pub struct StartingShard {
    index: usize,
    log_file: Option<PathBuf>,
    child: Option<Child>,
    ready: mpsc::Receiver<String>,
}

impl StartingShard {
    /// Waits (up to `timeout`) for the `EMBER_PS_READY` line; on failure
    /// the process is killed.
    pub fn wait_ready(mut self, timeout: Duration) -> Result<ShardProcess, ClusterError> {
        let line = match self.ready.recv_timeout(timeout) {
            Ok(l) => l,
            Err(_) => {
                return Err(ClusterError::Launch(format!(
                    "shard {} did not become ready: no ready line within {timeout:?} (the process exited or hung){}",
                    self.index,
                    self.log_file
                        .as_ref()
                        .map(|p| format!(" (log: {})", p.display()))
                        .unwrap_or_default()
                )));
            }
        };
        let mut addr = None;
        let mut metrics_addr = None;
        for tok in line.split_whitespace() {
            if let Some(a) = tok.strip_prefix("addr=") {
                addr = Some(a.to_string());
            } else if let Some(m) = tok.strip_prefix("metrics=") {
                if m != "none" {
                    metrics_addr = Some(m.to_string());
                }
            }
        }
        let addr =
            addr.ok_or_else(|| ClusterError::Launch(format!("malformed ready line {line:?}")))?;
        let child = self
            .child
            .take()
            .ok_or_else(|| ClusterError::Launch("shard process already taken".into()))?;
        Ok(ShardProcess {
            index: self.index,
            addr,
            metrics_addr,
            child,
        })
    }
}

impl Drop for StartingShard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl ShardProcess {
    /// Starts a shard and waits (up to `timeout`) for its `EMBER_PS_READY` line.
    pub fn start(spec: &ShardSpec, timeout: Duration) -> Result<ShardProcess, ClusterError> {
        Self::spawn(spec)?.wait_ready(timeout)
    }

    /// Starts a shard process without waiting for it to be ready, so that
    /// several shards restoring their checkpoints at start load at once.
    pub fn spawn(spec: &ShardSpec) -> Result<StartingShard, ClusterError> {
        let bin = binary("ps-server")?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg(&spec.listen)
            .arg("--shard-index")
            .arg(spec.index.to_string())
            .arg("--num-shards")
            .arg(spec.num_shards.to_string())
            .arg("--checkpoint-dir")
            .arg(&spec.checkpoint_dir);
        if let Some(m) = &spec.metrics {
            cmd.arg("--metrics-addr").arg(m);
        }
        if spec.restore {
            cmd.arg("--restore");
        }
        if spec.max_bytes > 0 {
            cmd.arg("--max-bytes").arg(spec.max_bytes.to_string());
        }
        cmd.args(&spec.security_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_target(spec.log_file.as_deref())?);
        let mut child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            bin: bin.display().to_string(),
            source,
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ClusterError::Launch("no stdout of ps-server".into()))?;
        Ok(StartingShard {
            index: spec.index,
            log_file: spec.log_file.clone(),
            child: Some(child),
            ready: ready_line(stdout, "EMBER_PS_READY"),
        })
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a child's stderr goes: a log file (appended) or this process's stderr.
pub fn log_target(path: Option<&Path>) -> Result<Stdio, ClusterError> {
    match path {
        Some(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ClusterError::Io {
                    path: dir.display().to_string(),
                    source: e,
                })?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| ClusterError::Io {
                    path: p.display().to_string(),
                    source: e,
                })?;
            Ok(Stdio::from(f))
        }
        None => Ok(Stdio::inherit()),
    }
}

/// Reads `stdout` on a thread; the first line starting with `prefix` is
/// sent on the returned channel, and the thread keeps draining stdout so the
/// child never blocks on it.
fn ready_line(stdout: ChildStdout, prefix: &str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.starts_with(&prefix) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx
}
