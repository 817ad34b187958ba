//! `[cluster] worker_mode = "external"` on loopback: `ember train` starts two
//! shards and serves the coordinator; the test starts the two workers itself
//! (`worker --coordinator ...`, as Compose services or an Indexed Job would),
//! kills worker 1 in the middle of epoch 1 and starts a fresh process with the
//! same index. The coordinator notices, rolls the shards back and reruns the
//! epoch; the job completes with a sane AUC, records the restart, and both
//! workers exit 0 once the coordinator says DONE. The connection uses the
//! launcher's per-run TLS certificate and token (`security.mode = "auto"`),
//! like the shards. Every process is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{bin, dataset, metric_sum, report, write_job};

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit (up to `timeout`), panicking with the log after it.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "{} still running after {timeout:?}; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.name, tail(&self.log(), 40));
        }
        self.kill();
    }
}

/// Kills the shard processes of a run (the launcher's children, which a
/// SIGKILLed launcher cannot clean up) on drop.
struct ShardPids(Vec<u32>);

impl Drop for ShardPids {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// GET http://host:port/path over a plain TCP socket; "" on any error.
fn scrape(url: &str) -> String {
    use std::io::{Read, Write};
    let (hostport, path) = url.split_once('/').unwrap_or((url, "metrics"));
    let Ok(mut s) = std::net::TcpStream::connect(hostport) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn worker(dir: &Path, job: &Path, coord: &str, index: usize, tag: &str) -> Proc {
    let secrets = dir.join("run/secrets");
    Proc::spawn(
        &format!("worker {index} ({tag})"),
        Command::new(bin("worker"))
            .arg("--config")
            .arg(job)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--coordinator", coord, "--worker-index", &index.to_string()])
            .arg("--tls-ca")
            .arg(secrets.join("ca.pem"))
            .arg("--auth-token-file")
            .arg(secrets.join("token"))
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("JOB_COMPLETION_INDEX"),
        dir.join(format!("worker-{index}-{tag}.log")),
    )
}

#[test]
fn external_workers_recover_from_a_killed_worker() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 2\nmode = \"process\"\nworker_mode = \"external\"\n\
                   coordinator_listen = \"127.0.0.1:0\"\nworker_timeout_s = 30\nstaleness = 1";
    let train = "epochs = 2\nmax_steps_per_epoch = 60\nmax_eval_samples = 1000\nlog_every = 5";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);

    let mut trainer = Proc::spawn(
        "ember train",
        Command::new(bin("ember"))
            .args(["train", "--quiet", "--config"])
            .arg(&job),
        dir.path().join("trainer.log"),
    );
    // cluster.json names the coordinator once it serves.
    let info_path = dir.path().join("run/cluster.json");
    let mut info = serde_json::Value::Null;
    wait_for(
        "cluster.json with the coordinator",
        Duration::from_secs(60),
        || {
            info = std::fs::read_to_string(&info_path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            info["coordinator"].as_str().is_some_and(|c| !c.is_empty())
        },
    );
    let _shards = ShardPids(
        info["pids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default(),
    );
    let coord = info["coordinator"].as_str().unwrap_or_default().to_string();
    eprintln!("coordinator at {coord} ({:.1?})", t0.elapsed());

    let mut w0 = worker(dir.path(), &job, &coord, 0, "a");
    let mut w1 = worker(dir.path(), &job, &coord, 1, "a");
    // Each worker serves its own /metrics: worker 0's step counter shows up.
    let url = {
        let mut url = String::new();
        wait_for(
            "worker 0's metrics address",
            Duration::from_secs(30),
            || {
                url = w0
                    .log()
                    .lines()
                    .find_map(|l| l.split("metrics at http://").nth(1))
                    .map(|u| u.trim().to_string())
                    .unwrap_or_default();
                !url.is_empty()
            },
        );
        url
    };
    wait_for(
        "worker 0 counting samples in /metrics",
        Duration::from_secs(60),
        || scrape(&url).contains("ember_worker_samples_total{worker=\"0\"}"),
    );
    // Kill worker 1 while it runs its epoch-1 task (once worker 0's
    // /metrics counts 5 of the 60 steps: with synchronous steps and
    // staleness 1, worker 1 is then at least 4 steps in; a 60-step epoch
    // lasts about a second, too short to aim at with a sleep), then replace it.
    wait_for("worker 1 running its task", Duration::from_secs(60), || {
        w1.log().contains("running task")
    });
    wait_for("worker 0 training 5 steps", Duration::from_secs(60), || {
        // Worker 0's own exporter: its samples only.
        metric_sum(&scrape(&url), "ember_worker_samples_total") >= (5 * 128) as f64
    });
    assert!(
        !w1.log().contains("task done"),
        "worker 1 finished its task before it could be killed:\n{}",
        w1.log()
    );
    w1.kill();
    eprintln!("killed worker 1 at {:.1?}", t0.elapsed());
    let mut w1b = worker(dir.path(), &job, &coord, 1, "b");

    let st = trainer.wait(Duration::from_secs(300));
    assert!(
        st.success(),
        "ember train failed:\n{}",
        tail(&trainer.log(), 60)
    );
    eprintln!("training done at {:.1?}", t0.elapsed());
    // The coordinator said DONE: both workers exit successfully.
    for w in [&mut w0, &mut w1b] {
        let st = w.wait(Duration::from_secs(40));
        assert!(
            st.success(),
            "{} exited with {st}:\n{}",
            w.name,
            tail(&w.log(), 40)
        );
    }
    assert!(
        w0.log().contains("attempt is stale"),
        "worker 0 never abandoned the failed attempt:\n{}",
        w0.log()
    );
    let tl = trainer.log();
    assert!(tl.contains("rolling the cluster back"), "{}", tail(&tl, 60));

    let r = report(dir.path());
    let epochs = r["epochs"].as_array().cloned().unwrap_or_default();
    assert_eq!(epochs.len(), 2, "{r}");
    assert!(
        epochs[0]["restarts"].as_u64().unwrap_or(0) >= 1,
        "no restart recorded for epoch 1: {}",
        epochs[0]
    );
    for e in &epochs {
        assert_eq!(
            e["samples"].as_u64(),
            Some(60 * 2 * 128),
            "every epoch complete: {e}"
        );
    }
    let auc = epochs[1]["test"]["auc"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "AUC after 2 epochs {auc:.4} (real data: {}); total {:.1?}",
        data.real,
        t0.elapsed()
    );
    assert!(auc > 0.6 && auc <= 1.0, "AUC {auc}: {r}");
}
