//! Checkpoint faults with real `ps-server` processes on loopback (port 0):
//!
//! - a process killed with SIGKILL in the middle of writing a checkpoint
//!   restarts with `--restore` at the previous checkpoint, exactly;
//! - a full disk (RLIMIT_FSIZE, so the write fails with EFBIG) and
//! - a checkpoint directory that became unwritable (as root: the shard runs
//!   as uid 65534 and the directory is handed back to root, mode 0555)
//!
//!   fail the Checkpoint RPC with an error naming the file and the OS error,
//!   leave the shard serving with its state unchanged, list no partial
//!   checkpoint, and the earlier checkpoint still restores.
//!
//! Every process is killed when its guard drops.

use bytes::Bytes;
use ember_proto::codec::{encode_f32, encode_u32, encode_u64};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

type Client = ParameterServerClient<Channel>;

const BIN: &str = env!("CARGO_BIN_EXE_ps-server");
const NOBODY: u32 = 65534;

/// Whether this ps-server needs `--insecure` to serve without TLS.
fn insecure_flag() -> bool {
    static F: OnceLock<bool> = OnceLock::new();
    *F.get_or_init(|| {
        let out = Command::new(BIN).arg("--help").output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("--insecure")
    })
}

/// A running ps-server; killed (SIGKILL) and reaped on drop.
struct Ps {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Ps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ps {
    /// Starts `bin` as shard 0 of 1 over `ckpt` and waits for
    /// `EMBER_PS_READY`; stderr goes to `log`. `tweak` adjusts the command
    /// (uid, limits).
    fn start(
        bin: &Path,
        ckpt: &Path,
        restore: bool,
        log: &Path,
        tweak: impl FnOnce(&mut Command),
    ) -> Ps {
        let mut cmd = Command::new(bin);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--shard-index",
            "0",
            "--num-shards",
            "1",
        ])
        .arg("--checkpoint-dir")
        .arg(ckpt)
        .env("RUST_LOG", "info")
        .env_remove("EMBER_AUTH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
        if restore {
            cmd.arg("--restore");
        }
        if insecure_flag() {
            cmd.arg("--insecure");
        }
        tweak(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ps = Ps {
            child,
            addr: String::new(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ps.addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("EMBER_PS_READY addr=") {
                        ps.addr = rest.split_whitespace().next().unwrap().to_string();
                    }
                }
                Err(_) => panic!("ps-server not ready; log:\n{}", ps.log_text()),
            }
        }
        ps
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn client(&self) -> Client {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ParameterServerClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

fn table(name: &str, dim: u32) -> TableConfig {
    TableConfig {
        name: name.into(),
        dim,
        init: Some(Initializer {
            kind: initializer::Kind::Uniform as i32,
            scale: 0.05,
        }),
        seed: 1,
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adam(Adam {
                lr: 0.01,
                ..Default::default()
            })),
        }),
        mba_lambda: 0.01,
        count_mode: CountMode::CountOnline as i32,
        ..Default::default()
    }
}

const CHUNK: usize = 8192;

/// Creates `name` (`dim`) and pushes gradient `g` to ids `0..n` with
/// count 2 (in chunks).
async fn fill(c: &mut Client, name: &str, dim: u32, n: u64, g: f32, create: bool) {
    if create {
        c.create_table(CreateTableRequest {
            config: Some(table(name, dim)),
        })
        .await
        .unwrap();
    }
    let ids: Vec<u64> = (0..n).collect();
    for (k, chunk) in ids.chunks(CHUNK).enumerate() {
        let grads: Vec<f32> = (0..chunk.len() * dim as usize)
            .map(|j| g * (1.0 + (j % 7) as f32 * 0.1))
            .collect();
        c.push(PushRequest {
            table: name.into(),
            ids: encode_u64(chunk),
            grads: encode_f32(&grads),
            counts: encode_u32(&vec![2; chunk.len()]),
            step: k as u64 + 1,
            request_id: 0,
        })
        .await
        .unwrap();
    }
}

async fn init_dense(c: &mut Client) {
    c.init_dense(InitDenseRequest {
        params: vec![DenseParam {
            name: "w".into(),
            values: encode_f32(&[0.5, -0.5, 0.25]),
        }],
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adam(Adam {
                lr: 0.1,
                ..Default::default()
            })),
        }),
    })
    .await
    .unwrap();
}

async fn push_dense(c: &mut Client, step: u64) {
    c.push_dense(PushDenseRequest {
        grads: vec![DenseParam {
            name: "w".into(),
            values: encode_f32(&[1.0, 2.0, -1.0]),
        }],
        step,
        num_workers: 1,
        worker_index: 0,
    })
    .await
    .unwrap();
}

/// Everything observable about the shard's model state: the raw pulled rows
/// of ids `0..n + 100` of every table (unseen ids pull their initial
/// value), the dense values and step.
#[derive(PartialEq)]
struct Snapshot {
    rows: Vec<(String, Vec<Bytes>)>,
    dense: PullDenseResponse,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes: usize = self.rows.iter().flat_map(|r| &r.1).map(Bytes::len).sum();
        write!(f, "Snapshot({bytes} row bytes, dense {:?})", self.dense)
    }
}

async fn snapshot(c: &mut Client, tables: &[(&str, u64)]) -> Snapshot {
    let mut rows = Vec::new();
    for &(name, n) in tables {
        let ids: Vec<u64> = (0..n + 100).collect();
        let mut chunks = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let r = c
                .pull(PullRequest {
                    table: name.into(),
                    ids: encode_u64(chunk),
                })
                .await
                .unwrap()
                .into_inner();
            chunks.push(r.rows);
        }
        rows.push((name.to_string(), chunks));
    }
    let dense = c
        .pull_dense(PullDenseRequest::default())
        .await
        .unwrap()
        .into_inner();
    Snapshot { rows, dense }
}

/// The parts of Stats a failed checkpoint must not change (pull and
/// rejection counters move by themselves).
fn stable_stats(s: &StatsResponse) -> (Vec<TableInfo>, u64, u64, u64) {
    (
        s.tables.clone(),
        s.dense_params,
        s.dense_step,
        s.rows_pushed,
    )
}

async fn stats(c: &mut Client) -> StatsResponse {
    c.stats(StatsRequest {}).await.unwrap().into_inner()
}

async fn list(c: &mut Client) -> Vec<u64> {
    c.list_checkpoints(ListCheckpointsRequest {})
        .await
        .unwrap()
        .into_inner()
        .steps
}

async fn checkpoint(c: &mut Client, step: u64) -> Result<CheckpointResponse, tonic::Status> {
    c.checkpoint(CheckpointRequest {
        step,
        keep: 0,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// After a failed checkpoint: serving, state unchanged, only step 1 listed,
/// no temp file left, and step 1 still restores exactly.
async fn check_after_failure(
    c: &mut Client,
    shard_dir: &Path,
    tables: &[(&str, u64)],
    before: &Snapshot,
    stats_before: &StatsResponse,
    at_step1: &Snapshot,
) {
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!((h.status.as_str(), h.checkpoint_step), ("SERVING", 1));
    assert_eq!(stable_stats(&stats(c).await), stable_stats(stats_before));
    assert_eq!(&snapshot(c, tables).await, before, "state changed");
    assert_eq!(list(c).await, vec![1]);
    assert_eq!(names_in(shard_dir), vec!["step-1.ckpt".to_string()]);
    let r = c
        .restore(RestoreRequest { step: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.step, 1);
    assert_eq!(&snapshot(c, tables).await, at_step1, "step 1 restored");
    // Still takes updates.
    fill(c, tables[0].0, 8, 10, 0.5, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_checkpoint_write_restores_previous_step() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let shard_dir = ckpt.join("shard-0-of-1");
    let log = tmp.path().join("ps.log");
    // 60k rows of dim 64 with Adam (788 bytes each): a ~47 MB checkpoint.
    let big = ("big", 60_000u64);
    let tables = [big, ("small", 50)];
    let ps = Ps::start(Path::new(BIN), &ckpt, false, &log, |_| {});
    let mut c = ps.client().await;
    fill(&mut c, "big", 64, big.1, 0.1, true).await;
    fill(&mut c, "small", 8, 50, 0.2, true).await;
    init_dense(&mut c).await;
    push_dense(&mut c, 0).await;
    let info = checkpoint(&mut c, 1).await.unwrap();
    let full_size = info.bytes;
    assert!(full_size > 40 << 20, "{full_size}");
    let at_step1 = snapshot(&mut c, &tables).await;
    let stats1 = stats(&mut c).await;

    // Change everything, then kill -9 while the next checkpoint is being
    // written. Should a write win the race (a starved test thread), that
    // step becomes the previous checkpoint and the next step is tried.
    let mut ps = ps;
    let mut prev = (1u64, at_step1, stats1);
    let mut written = vec![1u64];
    let mut killed = None;
    for step in 2..=6u64 {
        let g = -0.1 * step as f32;
        fill(&mut c, "big", 64, big.1, g, false).await;
        fill(&mut c, "small", 8, 50, g, false).await;
        push_dense(&mut c, step - 1).await;
        let changed = snapshot(&mut c, &tables).await;
        assert_ne!(changed, prev.1);
        let tmp_file = shard_dir.join(format!(".step-{step}.ckpt.tmp"));
        let mut c2 = c.clone();
        let rpc = tokio::spawn(async move { checkpoint(&mut c2, step).await });
        let deadline = Instant::now() + Duration::from_secs(15);
        let mid_write = loop {
            let len = std::fs::metadata(&tmp_file).map(|m| m.len()).unwrap_or(0);
            if len >= 1 << 20 {
                break true;
            }
            if rpc.is_finished() {
                break false;
            }
            assert!(Instant::now() < deadline, "no temp file for step {step}");
            std::thread::sleep(Duration::from_micros(100));
        };
        if !mid_write {
            rpc.await.unwrap().unwrap();
            written.push(step);
            prev = (step, changed, stats(&mut c).await);
            continue;
        }
        ps.child.kill().unwrap();
        ps.child.wait().unwrap();
        assert_ne!(rpc.await.unwrap().map(|_| ()).unwrap_err().code(), Code::Ok);
        let left = std::fs::metadata(&tmp_file).unwrap().len();
        assert!(left < full_size, "partial temp file: {left} of {full_size}");
        assert!(!shard_dir.join(format!("step-{step}.ckpt")).exists());
        killed = Some(step);
        break;
    }
    let killed = killed.expect("every checkpoint write finished before the kill");
    drop(ps);
    let (prev_step, at_prev, stats_prev) = prev;

    // Restart with --restore: exactly the previous step, the killed one is
    // not listed.
    let log2 = tmp.path().join("ps2.log");
    let ps = Ps::start(Path::new(BIN), &ckpt, true, &log2, |_| {});
    let mut c = ps.client().await;
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.checkpoint_step, prev_step, "log:\n{}", ps.log_text());
    assert_eq!(list(&mut c).await, written);
    assert_eq!(snapshot(&mut c, &tables).await, at_prev);
    let s = stats(&mut c).await;
    for (a, b) in s.tables.iter().zip(&stats_prev.tables) {
        assert_eq!(
            (&a.config, a.rows, a.counted_ids),
            (&b.config, b.rows, b.counted_ids)
        );
    }
    assert_eq!(s.dense_step, stats_prev.dense_step);
    assert!(shard_dir.join(format!(".step-{killed}.ckpt.tmp")).exists());
    // The next checkpoint removes the leftover temp file. Nothing changed
    // since the restore: it is a delta of the restored chain (no rows).
    let next = killed + 1;
    let r = checkpoint(&mut c, next).await.unwrap();
    assert_eq!((r.kind.as_str(), r.rows, r.chain_files), ("delta", 0, 2));
    written.push(next);
    assert_eq!(list(&mut c).await, written);
    let mut want: Vec<String> = written[..written.len() - 1]
        .iter()
        .map(|s| format!("step-{s}.ckpt"))
        .collect();
    want.extend([
        format!("delta-{next}.ckpt"),
        format!("manifest-{next}.json"),
    ]);
    want.sort();
    assert_eq!(names_in(&shard_dir), want);
    // The restart restores the chain (base + delta) exactly.
    drop(ps);
    let ps = Ps::start(
        Path::new(BIN),
        &ckpt,
        true,
        &tmp.path().join("ps3.log"),
        |_| {},
    );
    let mut c = ps.client().await;
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.checkpoint_step, next, "log:\n{}", ps.log_text());
    assert_eq!(snapshot(&mut c, &tables).await, at_prev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_checkpoint_cleanly() {
    const LIMIT: u64 = 256 << 10;
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let shard_dir = ckpt.join("shard-0-of-1");
    let log = tmp.path().join("ps.log");
    let ps = Ps::start(Path::new(BIN), &ckpt, false, &log, |cmd| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: LIMIT,
                    rlim_max: LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Writes past the limit fail with EFBIG instead of killing.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    let mut c = ps.client().await;
    fill(&mut c, "t", 8, 100, 0.1, true).await;
    init_dense(&mut c).await;
    let r = checkpoint(&mut c, 1).await.unwrap();
    assert!(r.bytes < LIMIT);
    let tables = [("t", 5000u64)];
    let at_step1 = snapshot(&mut c, &tables).await;

    // 5000 rows of 8 + 16 state floats: ~580 KB, over the limit.
    fill(&mut c, "t", 8, 5000, -0.2, false).await;
    push_dense(&mut c, 0).await;
    let before = snapshot(&mut c, &tables).await;
    let stats_before = stats(&mut c).await;
    let e = checkpoint(&mut c, 2).await.unwrap_err();
    let msg = e.message();
    assert_eq!(e.code(), Code::Internal, "{msg}");
    let tmp2 = shard_dir.join(".step-2.ckpt.tmp");
    assert!(
        msg.contains(&tmp2.display().to_string()),
        "message names the file: {msg}"
    );
    assert!(
        msg.contains("File too large") && msg.contains("os error 27"),
        "message names the OS error: {msg}"
    );
    check_after_failure(
        &mut c,
        &shard_dir,
        &tables,
        &before,
        &stats_before,
        &at_step1,
    )
    .await;
    assert!(
        ps.log_text().contains("File too large"),
        "logged: {}",
        ps.log_text()
    );
}

/// Restores the mode of a directory on drop (so a non-root run can delete it).
struct ModeGuard(PathBuf, u32);

impl Drop for ModeGuard {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(self.1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_checkpoint_dir_fails_checkpoint_cleanly() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let shard_dir = ckpt.join("shard-0-of-1");
    let log = tmp.path().join("ps.log");
    std::fs::create_dir(&ckpt).unwrap();
    let bin = if root {
        // Root ignores file modes: run the shard as nobody instead, from a
        // copy of the binary in a directory it can reach.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&ckpt, Some(NOBODY), Some(NOBODY)).unwrap();
        let bin = tmp.path().join("ps-server");
        if std::fs::hard_link(BIN, &bin).is_err() {
            std::fs::copy(BIN, &bin).unwrap();
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    } else {
        PathBuf::from(BIN)
    };
    let ps = Ps::start(&bin, &ckpt, false, &log, |cmd| {
        if root {
            cmd.uid(NOBODY).gid(NOBODY);
        }
    });
    let mut c = ps.client().await;
    fill(&mut c, "t", 8, 100, 0.1, true).await;
    init_dense(&mut c).await;
    checkpoint(&mut c, 1).await.unwrap();
    let tables = [("t", 300u64)];
    let at_step1 = snapshot(&mut c, &tables).await;
    fill(&mut c, "t", 8, 300, -0.2, false).await;
    let before = snapshot(&mut c, &tables).await;
    let stats_before = stats(&mut c).await;

    // The shard's directory becomes read-only for the shard.
    if root {
        std::os::unix::fs::chown(&shard_dir, Some(0), Some(0)).unwrap();
    }
    std::fs::set_permissions(&shard_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let _restore_mode = ModeGuard(shard_dir.clone(), 0o755);
    let e = checkpoint(&mut c, 2).await.unwrap_err();
    let msg = e.message();
    assert!(
        matches!(e.code(), Code::Internal | Code::PermissionDenied),
        "{e:?}"
    );
    assert!(
        msg.contains(&shard_dir.display().to_string()),
        "message names the directory: {msg}"
    );
    assert!(
        msg.contains("Permission denied") && msg.contains("os error 13"),
        "message names the OS error: {msg}"
    );
    check_after_failure(
        &mut c,
        &shard_dir,
        &tables,
        &before,
        &stats_before,
        &at_step1,
    )
    .await;
}
