//! The Docker Compose deployment (deploy/compose) end to end, on this machine:
//!
//! 1. `scripts/build-image.sh` packages the binaries of this build (the target
//!    directory this test was built in) into a uniquely tagged local image,
//!    without pulling anything.
//! 2. A compose project (unique name) with shards ps-0, ps-1, the trainer
//!    (coordinator) and the workers worker-0, worker-1 as their own
//!    containers runs a small DIN job to completion; each shard's `/metrics`
//!    (published on a free host port, fetched with a plain TCP GET) shows
//!    nonzero pulled/pushed row counters, and both workers exit 0 (DONE).
//! 3. A second project, with the token overlay (docker-compose.auth.yml:
//!    every shard and coordinator RPC needs the bearer token), runs a longer
//!    job. Once epoch 2 has trained (dense step from the shards' metrics),
//!    ps-1 is `docker kill`ed; the coordinator's rollback to step 600 is
//!    asserted, then ps-1 is `docker start`ed (it restores its checkpoint
//!    from its volume). Once the rerun pushed to ps-0, ps-0 is `docker
//!    pause`d (a hung shard: it holds its connections and never answers);
//!    the coordinator must report it hung (`external shard is hung`, after
//!    `cluster.shard_timeout_s`) and retry Health with backoff; then it is
//!    unpaused. In epoch 3, once the dense step shows that both workers
//!    trained in it, worker-1 is killed (SIGINT: a crash, so `restart:
//!    on-failure` restarts it) and the coordinator reruns the epoch. The job
//!    completes; the trainer's log holds the rollbacks to steps 600, 600 and
//!    1200 and metrics.json the restarts.
//!
//! The restart job's epochs are 600 steps (38,400 samples, a few seconds at
//! the workers' speed): each trigger is seen by polling `docker` (a few
//! hundred ms), so an epoch must last several polls for the fault to land
//! inside it. (With 120-step epochs, half a second each once the fused
//! kernels landed, the worker kill arrived after epoch 3 had ended.)
//!
//! Expected time: ~65 s on 2 cores once the binaries are built (image
//! ~15 s, small job ~8 s, restart job ~45 s).
//!
//! Everything the test creates (containers, networks, volumes, the image) is
//! removed at the end, also when it fails (drop guards). It returns early,
//! saying why, when EMBER_SKIP_DOCKER=1, or docker, a compose tool, ldd or
//! rustc is unavailable. Every wait is bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{bin_dir, repo_root};

const BINS: [&str; 4] = ["ps-server", "worker", "ember", "ember-data"];

/// Runs `cmd` to completion within `timeout` (killed after it); returns its output.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Like [`run_bounded`], panicking with the output when the command fails.
fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `prog args` runs and exits 0 (within 30 s).
fn works(prog: &str, args: &[&str]) -> bool {
    let Ok(mut child) = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.success(),
            Ok(None) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The compose command (`docker compose` or `docker-compose`), or why there is none.
fn environment() -> Result<Vec<String>, String> {
    if std::env::var("EMBER_SKIP_DOCKER").is_ok_and(|v| v == "1") {
        return Err("EMBER_SKIP_DOCKER=1".into());
    }
    if !works("docker", &["info"]) {
        return Err(
            "docker is not installed or its daemon is not reachable (`docker info` failed)".into(),
        );
    }
    if !works("ldd", &["--version"]) {
        return Err("ldd is not available (scripts/build-image.sh needs it)".into());
    }
    if !works("rustc", &["--version"]) {
        return Err("rustc is not available (scripts/build-image.sh needs it)".into());
    }
    if works("docker", &["compose", "version"]) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if works("docker-compose", &["version"]) {
        return Ok(vec!["docker-compose".into()]);
    }
    Err("neither `docker compose` nor `docker-compose` is available".into())
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}{:06}", std::process::id(), nanos % 1_000_000)
}

/// A local image built for this test; removed on drop.
struct Image {
    tag: String,
}

impl Image {
    fn build(tag: &str) -> Image {
        let dir = bin_dir();
        for b in BINS {
            assert!(
                dir.join(b).exists(),
                "{} missing: build the workspace binaries first (cargo build --workspace --bins, \
                 or run cargo test --workspace)",
                dir.join(b).display()
            );
        }
        let image = Image { tag: tag.into() };
        run_ok(
            Command::new(repo_root().join("scripts/build-image.sh"))
                .arg("--tag")
                .arg(tag)
                .arg("--bin-dir")
                .arg(&dir),
            Duration::from_secs(240),
        );
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("docker").args(["rmi", "-f", &self.tag]),
            Duration::from_secs(60),
        );
    }
}

/// One compose project; `down -v` on drop (with its logs first when the test failed).
struct Project {
    compose: Vec<String>,
    name: String,
    env: Vec<(String, String)>,
    /// Compose files after docker-compose.yml (the token overlay).
    overlays: Vec<PathBuf>,
}

impl Project {
    /// Starts the project; with `token`, also with the token overlay
    /// (docker-compose.auth.yml: every shard and coordinator RPC needs it).
    fn up(
        compose: &[String],
        name: &str,
        image: &str,
        job: &Path,
        data: &Path,
        token: Option<&str>,
    ) -> Project {
        let mut p = Project {
            compose: compose.to_vec(),
            name: name.into(),
            overlays: Vec::new(),
            env: vec![
                ("EMBER_IMAGE".into(), image.into()),
                ("EMBER_JOB_FILE".into(), job.display().to_string()),
                ("EMBER_DATA_DIR".into(), data.display().to_string()),
                ("EMBER_METRICS_BIND".into(), "127.0.0.1".into()),
                ("EMBER_PS0_METRICS_PORT".into(), "0".into()),
                ("EMBER_PS1_METRICS_PORT".into(), "0".into()),
            ],
        };
        if let Some(t) = token {
            p.env.push(("EMBER_AUTH_TOKEN".into(), t.into()));
            p.overlays
                .push(repo_root().join("deploy/compose/docker-compose.auth.yml"));
        }
        run_ok(p.cmd().args(["up", "-d"]), Duration::from_secs(180));
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(repo_root().join("deploy/compose/docker-compose.yml"));
        for f in &self.overlays {
            c.arg("-f").arg(f);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Id of the (one) container of `service`, running or not.
    fn container(&self, service: &str) -> String {
        let out = run_ok(
            Command::new("docker").args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.name),
                "--filter",
                &format!("label=com.docker.compose.service={service}"),
            ]),
            Duration::from_secs(30),
        );
        out.lines()
            .next()
            .unwrap_or_else(|| panic!("no container for service {service}"))
            .trim()
            .to_string()
    }

    fn logs(&self, service: &str) -> String {
        let out = run_bounded(
            Command::new("docker").args(["logs", &self.container(service)]),
            Duration::from_secs(30),
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until the trainer container exits; returns its exit code.
    fn wait_trainer(&self, timeout: Duration) -> i32 {
        self.wait_exit("trainer", timeout)
    }

    /// How often Docker restarted the container of `service`.
    fn restart_count(&self, service: &str) -> u64 {
        run_ok(
            Command::new("docker").args([
                "inspect",
                "-f",
                "{{.RestartCount}}",
                &self.container(service),
            ]),
            Duration::from_secs(30),
        )
        .trim()
        .parse()
        .unwrap_or(0)
    }

    /// Waits until the container of `service` exits; returns its exit code.
    fn wait_exit(&self, service: &str, timeout: Duration) -> i32 {
        let id = self.container(service);
        let start = Instant::now();
        loop {
            let s = run_ok(
                Command::new("docker").args([
                    "inspect",
                    "-f",
                    "{{.State.Status}} {{.State.ExitCode}}",
                    &id,
                ]),
                Duration::from_secs(30),
            );
            let mut it = s.split_whitespace();
            if it.next() == Some("exited") {
                return it.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
            }
            assert!(
                start.elapsed() < timeout,
                "{service} still running after {timeout:?}:\n{}",
                self.logs(service)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the trainer's log contains every one of `needles` on one line.
    fn wait_log(&self, needles: &[&str], timeout: Duration) -> bool {
        self.wait_log_of("trainer", needles, timeout)
    }

    /// Waits until the log of `service` contains every one of `needles` on one line.
    fn wait_log_of(&self, service: &str, needles: &[&str], timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self
                .logs(service)
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    /// The run report the trainer wrote in the `runs` volume.
    fn report(&self, run: &str, dir: &Path) -> serde_json::Value {
        let dst = dir.join(format!("{run}-metrics.json"));
        run_ok(
            Command::new("docker")
                .arg("cp")
                .arg(format!(
                    "{}:/var/lib/ember/runs/{run}/metrics.json",
                    self.container("trainer")
                ))
                .arg(&dst),
            Duration::from_secs(30),
        );
        serde_json::from_str(&std::fs::read_to_string(&dst).expect("metrics.json"))
            .expect("metrics.json is JSON")
    }

    /// Host address of a service's published metrics port.
    fn metrics_addr(&self, service: &str) -> String {
        let out = run_ok(
            Command::new("docker").args(["port", &self.container(service), "9100/tcp"]),
            Duration::from_secs(30),
        );
        out.lines()
            .next()
            .unwrap_or_else(|| panic!("{service}: metrics port not published"))
            .trim()
            .replace("0.0.0.0:", "127.0.0.1:")
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = run_bounded(
                self.cmd().args(["logs", "--no-color", "--tail", "60"]),
                Duration::from_secs(60),
            );
            eprintln!(
                "---- logs of compose project {} ----\n{}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = run_bounded(
            self.cmd()
                .args(["down", "-v", "--remove-orphans", "-t", "5"]),
            Duration::from_secs(120),
        );
    }
}

/// `GET /metrics` over a plain TCP connection; returns the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET http://{addr}{path}: {head}"
    );
    body.to_string()
}

/// Sum of `metric` in the `/metrics` of `service` (published port), or None
/// when the shard does not answer (stopped, paused, restarting).
fn shard_metric(p: &Project, service: &str, metric: &str) -> Option<f64> {
    let addr = run_bounded(
        Command::new("docker").args(["port", &p.container(service), "9100/tcp"]),
        Duration::from_secs(30),
    );
    let addr = String::from_utf8_lossy(&addr.stdout)
        .lines()
        .next()?
        .trim()
        .replace("0.0.0.0:", "127.0.0.1:");
    let text = integration_tests::scrape(&addr)?;
    text.contains("HTTP/1.1 200")
        .then(|| metric_sum(&text, metric))
}

/// Steps per epoch of the restart job (epochs long enough for a fault seen
/// by polling `docker` to land inside the epoch it aims at).
const RESTART_EPOCH_STEPS: u64 = 600;

/// Waits (at most 120 s, else panics naming `what`) until the dense step of
/// the cluster (the larger of the shards' `ember_ps_dense_step`: only the
/// shards that hold dense parameters count steps) reaches `step`.
fn wait_dense_step(p: &Project, step: u64, what: &str) {
    let dense = |svc: &str| shard_metric(p, svc, "ember_ps_dense_step").unwrap_or(0.0);
    let start = Instant::now();
    while dense("ps-0").max(dense("ps-1")) < step as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no progress in {what} (dense step {step} never reached):\n{}",
            p.logs("trainer")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until `metric` of `service` exceeds `above`; returns the value.
fn wait_metric_above(
    p: &Project,
    service: &str,
    metric: &str,
    above: f64,
    timeout: Duration,
) -> f64 {
    let start = Instant::now();
    loop {
        if let Some(v) = shard_metric(p, service, metric).filter(|v| *v > above) {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "{service}: {metric} never exceeded {above} within {timeout:?}:\n{}",
            p.logs("trainer")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sum of every sample of `metric` (all label sets) in Prometheus text.
fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Train/test/counts for the containers, readable by the image's user.
fn small_data(dir: &Path, train_rows: usize, test_rows: usize) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let real = repo_root().join("data/ml100k-din");
    let (train, test, counts) =
        if real.join("train.txt").exists() && real.join("counts.bin").exists() {
            (
                real.join("train.txt"),
                real.join("test.txt"),
                real.join("counts.bin"),
            )
        } else {
            let ds = integration_tests::dataset(&dir.join("src"));
            (ds.train, ds.test, ds.counts)
        };
    let head = |src: &Path, n: usize, dst: &Path| {
        use std::io::BufRead;
        let f = std::fs::File::open(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let mut out = std::fs::File::create(dst).expect("create");
        for l in std::io::BufReader::new(f).lines().take(n) {
            writeln!(out, "{}", l.expect("line")).expect("write");
        }
    };
    head(&train, train_rows, &data.join("train.txt"));
    head(&test, test_rows, &data.join("test.txt"));
    std::fs::copy(&counts, data.join("counts.bin")).expect("copy counts");
    data
}

fn job(dir: &Path, file: &str, name: &str, cluster: &str, train: &str) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
[model]
kind = "din"
item_dim = 8
cat_dim = 8
[data]
train = "/data/train.txt"
test = "/data/test.txt"
counts = "/data/counts.bin"
batch_size = 32
max_len = 50
[cluster]
shard_addrs = ["ps-0:50051", "ps-1:50051"]
workers = 2
worker_mode = "external"
coordinator_listen = "0.0.0.0:50060"
{cluster}
[train]
out_dir = "/var/lib/ember/runs/{name}"
max_eval_samples = 300
log_every = 5
{train}
[security]
mode = "insecure"
"#
    );
    let p = dir.join(file);
    std::fs::write(&p, text).expect("write job");
    p
}

/// Makes `p` and everything below it readable by the containers' user.
#[cfg(unix)]
fn readable_by_all(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if p.is_dir() { 0o755 } else { 0o644 };
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    if p.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                readable_by_all(&e.path());
            }
        }
    }
}
#[cfg(not(unix))]
fn readable_by_all(_: &Path) {}

#[test]
fn compose_trains_and_survives_a_shard_restart() {
    let compose = match environment() {
        Ok(c) => c,
        Err(why) => {
            integration_tests::skip(integration_tests::Prereq::Docker, &why);
            return;
        }
    };
    let t0 = Instant::now();
    let id = unique();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let data = small_data(dir, (RESTART_EPOCH_STEPS * 2 * 32) as usize + 400, 400);
    let job_a = job(
        dir,
        "job-a.toml",
        "small",
        "",
        "epochs = 1\nmax_steps_per_epoch = 20",
    );
    // Long enough epochs to kill a shard in the middle of one; a short retry
    // deadline so that (without restart detection via Health) the workers give
    // up on the dead shard quickly and the coordinator rolls back.
    let job_b = job(
        dir,
        "job-b.toml",
        "restart",
        "retry_deadline_s = 15\nmax_restarts = 3\nshard_timeout_s = 5\nworker_timeout_s = 20",
        &format!("epochs = 3\nmax_steps_per_epoch = {RESTART_EPOCH_STEPS}"),
    );
    // The cluster checkpoints at the end of epochs 1 and 2.
    let (end1, end2) = (RESTART_EPOCH_STEPS, 2 * RESTART_EPOCH_STEPS);
    readable_by_all(dir);

    let image = Image::build(&format!("ember-it:compose-{id}"));
    eprintln!("image {} built in {:.1?}", image.tag, t0.elapsed());

    // 1. A small job to completion; both shards served pulls and pushes.
    {
        let t = Instant::now();
        let p = Project::up(
            &compose,
            &format!("embertesta{id}"),
            &image.tag,
            &job_a,
            &data,
            None,
        );
        let code = p.wait_trainer(Duration::from_secs(150));
        assert_eq!(code, 0, "trainer failed:\n{}", p.logs("trainer"));
        // The workers ran in their own containers and stopped at DONE.
        for w in ["worker-0", "worker-1"] {
            let code = p.wait_exit(w, Duration::from_secs(60));
            assert_eq!(code, 0, "{w} failed:\n{}", p.logs(w));
            assert!(p.logs(w).contains("task done"), "{w}:\n{}", p.logs(w));
        }
        let report = p.report("small", dir);
        let epochs = report["epochs"].as_array().expect("epochs");
        assert_eq!(epochs.len(), 1, "{report}");
        let auc = epochs[0]["test"]["auc"].as_f64().expect("auc");
        assert!(auc.is_finite() && auc > 0.0, "{report}");
        for svc in ["ps-0", "ps-1"] {
            let text = http_get(&p.metrics_addr(svc), "/metrics");
            let pulled = metric_sum(&text, "ember_ps_rows_pulled_total");
            let pushed = metric_sum(&text, "ember_ps_rows_pushed_total");
            let requests = metric_sum(&text, "ember_ps_requests_total");
            eprintln!("{svc}: rows pulled {pulled}, pushed {pushed}, requests {requests}");
            assert!(
                pulled > 0.0 && pushed > 0.0 && requests > 0.0,
                "{svc} /metrics:\n{text}"
            );
        }
        eprintln!("small job done in {:.1?}", t.elapsed());
    }

    // 2. With the token overlay (every shard and coordinator RPC needs the
    // bearer token): kill ps-1 in the middle of epoch 2, then pause ps-0 in
    // the rerun of epoch 2, then crash worker-1 in epoch 3; the run recovers
    // from each, rolling back to the last cluster checkpoint.
    {
        let t = Instant::now();
        let token = format!("compose-test-token-{id}");
        let p = Project::up(
            &compose,
            &format!("embertestb{id}"),
            &image.tag,
            &job_b,
            &data,
            Some(&token),
        );
        // Every server requires the token: each warns only about the missing TLS.
        for svc in ["ps-0", "ps-1"] {
            assert!(
                p.wait_log_of(svc, &["EMBER_PS_READY"], Duration::from_secs(60)),
                "{svc} never became ready:\n{}",
                p.logs(svc)
            );
            let log = p.logs(svc);
            assert!(
                log.contains("INSECURE: serving without TLS (")
                    && !log.contains("without TLS and an auth token"),
                "{svc} does not require the token:\n{log}"
            );
        }
        assert!(
            p.wait_log(&["epoch done", "epoch=1 "], Duration::from_secs(150)),
            "epoch 1 did not finish:\n{}",
            p.logs("trainer")
        );
        let trainer = p.logs("trainer");
        assert!(
            trainer.contains("INSECURE: the coordinator serves without TLS")
                && !trainer.contains("serves without TLS and"),
            "the coordinator does not require the token:\n{trainer}"
        );
        // Kill ps-1 once epoch 2 has trained (dense step past the epoch-1
        // checkpoint, on whichever shard holds dense parameters).
        wait_dense_step(&p, end1 + 3, "epoch 2");
        let ps1 = p.container("ps-1");
        run_ok(
            Command::new("docker").args(["kill", &ps1]),
            Duration::from_secs(30),
        );
        eprintln!("killed ps-1 at {:.1?}", t.elapsed());
        // The coordinator notices on its own and rolls back to step `end1` (the
        // last cluster checkpoint) — asserted, not just noted; Docker does
        // not restart a container stopped by `docker kill`, so the test then
        // plays the orchestrator and starts it (it restores from its volume).
        assert!(
            p.wait_log(
                &[
                    "shard(s) [1]",
                    &format!("rolling the cluster back to step {end1}")
                ],
                Duration::from_secs(90)
            ),
            "no rollback after the kill of ps-1:\n{}",
            p.logs("trainer")
        );
        run_ok(
            Command::new("docker").args(["start", &ps1]),
            Duration::from_secs(60),
        );
        eprintln!("restarted ps-1 at {:.1?}", t.elapsed());
        assert!(
            p.wait_log(
                &["cluster rolled back", &format!("step={end1}")],
                Duration::from_secs(150)
            ),
            "the cluster was not restored after ps-1 came back:\n{}",
            p.logs("trainer")
        );
        // Pause ps-0 (a hung shard: the process holds its port and never
        // answers) once the rerun of epoch 2 pushed to it.
        let pushed = wait_metric_above(
            &p,
            "ps-0",
            "ember_ps_rows_pushed_total",
            0.0,
            Duration::from_secs(30),
        );
        wait_metric_above(
            &p,
            "ps-0",
            "ember_ps_rows_pushed_total",
            pushed,
            Duration::from_secs(120),
        );
        let ps0 = p.container("ps-0");
        run_ok(
            Command::new("docker").args(["pause", &ps0]),
            Duration::from_secs(30),
        );
        eprintln!("paused ps-0 at {:.1?}", t.elapsed());
        // Reported as hung (cluster.shard_timeout_s = 5), not as dead, and
        // waited for with backoff while it stays paused.
        let paused = Instant::now();
        let hung = p.wait_log(&["external shard is hung"], Duration::from_secs(120));
        let retrying = hung
            && p.wait_log(
                &["shard does not answer Health", "retry_in_ms"],
                Duration::from_secs(60),
            );
        let waited = paused.elapsed();
        run_ok(
            Command::new("docker").args(["unpause", &ps0]),
            Duration::from_secs(30),
        );
        eprintln!("unpaused ps-0 at {:.1?} (paused {waited:.1?})", t.elapsed());
        assert!(
            hung,
            "the paused ps-0 was not reported hung:\n{}",
            p.logs("trainer")
        );
        assert!(
            retrying,
            "no retry with backoff for ps-0:\n{}",
            p.logs("trainer")
        );
        let log = p.logs("trainer");
        assert!(
            log.lines().any(|l| l.contains("shard(s) [0] hung")
                && l.contains(&format!("rolling the cluster back to step {end1}"))),
            "no rollback of the hung ps-0 to step {end1}:\n{log}"
        );
        // Epoch 3: kill worker-1 while it runs its task: once the dense step
        // is past the epoch-2 checkpoint (synchronous steps: both workers
        // pushed in epoch 3). SIGINT is not the stop signal, so Docker treats
        // it as a crash and `restart: on-failure` brings the container back;
        // the restarted worker asks for a task while the coordinator still
        // counts it as busy, which fails the attempt and reruns the epoch.
        wait_dense_step(&p, end2 + 3, "epoch 3");
        let w1 = p.container("worker-1");
        run_ok(
            Command::new("docker").args(["kill", "--signal", "SIGINT", &w1]),
            Duration::from_secs(30),
        );
        eprintln!("killed worker-1 at {:.1?}", t.elapsed());
        let start = Instant::now();
        while p.restart_count("worker-1") == 0 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(250));
        }
        let restarted_by_docker = p.restart_count("worker-1") > 0;
        if !restarted_by_docker {
            eprintln!("note: Docker did not restart worker-1 within 30 s; starting it");
            run_ok(
                Command::new("docker").args(["start", &w1]),
                Duration::from_secs(60),
            );
        }
        let code = p.wait_trainer(Duration::from_secs(300));
        assert_eq!(code, 0, "trainer failed:\n{}", p.logs("trainer"));
        let log = integration_tests::strip_ansi(&p.logs("trainer"));
        // One rollback per failure, each to the last cluster checkpoint:
        // the kill and the pause in epoch 2 (step `end1`), then the crashed
        // worker in epoch 3 (step `end2`; its restart may cost a second
        // attempt).
        for l in log.lines().filter(|l| {
            l.contains("rolling the cluster back") || l.contains("external shard is hung")
        }) {
            eprintln!("trainer: {l}");
        }
        let back = integration_tests::rollback_steps(&log);
        assert!(
            back.len() >= 3 && back[..2] == [end1, end1] && back[2..].iter().all(|&s| s == end2),
            "rollbacks {back:?} (expected {end1}, {end1}, then {end2}):\n{log}"
        );
        let report = p.report("restart", dir);
        let epochs = report["epochs"].as_array().expect("epochs");
        assert_eq!(epochs.len(), 3, "{report}");
        let restarts: Vec<u64> = epochs
            .iter()
            .map(|e| e["restarts"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(restarts[..2], [0, 2], "restarts per epoch: {report}");
        assert!(
            restarts[2] >= 1,
            "the killed worker did not make epoch 3 rerun: {report}"
        );
        for e in epochs {
            let auc = e["test"]["auc"].as_f64().unwrap_or(f64::NAN);
            assert!(
                auc.is_finite() && auc > 0.5,
                "epoch without a useful test AUC: {report}"
            );
        }
        assert!(
            restarted_by_docker,
            "restart: on-failure did not restart the crashed worker-1"
        );
        for w in ["worker-0", "worker-1"] {
            let code = p.wait_exit(w, Duration::from_secs(60));
            assert_eq!(code, 0, "{w} failed:\n{}", p.logs(w));
        }
        let ps1_log = p.logs("ps-1");
        assert!(
            ps1_log.matches("EMBER_PS_READY").count() >= 2,
            "ps-1 did not start twice:\n{ps1_log}"
        );
        eprintln!("restart job done in {:.1?}", t.elapsed());
    }
    eprintln!("compose test total {:.1?}", t0.elapsed());
}

/// Offline checks of the compose files, the Prometheus config and the Grafana
/// dashboard (no Docker needed).
#[test]
fn compose_prometheus_and_dashboard_agree_with_the_shards() {
    let root = repo_root();
    let compose = std::fs::read_to_string(root.join("deploy/compose/docker-compose.yml"))
        .expect("docker-compose.yml");
    let job = std::fs::read_to_string(root.join("deploy/compose/job.toml")).expect("job.toml");
    let cfg = ember_worker::train::config::JobConfig::parse(&job, "deploy/compose/job.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let n = cfg.cluster.shard_addrs.len();
    assert!(n >= 1);
    let prom = std::fs::read_to_string(root.join("deploy/compose/prometheus.yml"))
        .expect("prometheus.yml");
    for (i, addr) in cfg.cluster.shard_addrs.iter().enumerate() {
        let host = format!("ps-{i}");
        assert_eq!(addr, &format!("{host}:50051"), "job.toml shard {i}");
        assert!(
            compose.contains(&format!("\n  {host}:\n")),
            "service {host} in docker-compose.yml"
        );
        assert!(
            compose.contains(&format!("--shard-index={i}\n")),
            "{host}: --shard-index={i}"
        );
        assert!(
            prom.contains(&format!("\"{host}:9100\"")),
            "prometheus.yml scrapes {host}"
        );
    }
    assert_eq!(
        compose.matches(&format!("--num-shards={n}\n")).count(),
        n,
        "every shard service has --num-shards={n}"
    );
    assert_eq!(
        compose.matches("--restore\n").count(),
        n,
        "every shard restores at start"
    );
    assert_eq!(compose.matches("--metrics-addr=0.0.0.0:9100\n").count(), n);

    // Workers: one service per index, each pointed at the trainer's
    // coordinator port, restarted when it crashes.
    assert_eq!(
        cfg.cluster.worker_mode.as_str(),
        "external",
        "job.toml worker_mode"
    );
    let port = cfg
        .cluster
        .coordinator_listen
        .rsplit(':')
        .next()
        .expect("coordinator_listen port");
    assert!(
        compose.contains(&format!("expose: [\"{port}\"")),
        "the trainer exposes the coordinator port {port}"
    );
    for i in 0..cfg.cluster.workers {
        assert!(
            compose.contains(&format!("\n  worker-{i}:\n")),
            "service worker-{i} in docker-compose.yml"
        );
        assert!(
            compose.contains(&format!("--worker-index={i}\n")),
            "worker-{i}: --worker-index={i}"
        );
    }
    assert_eq!(
        compose
            .matches(&format!("--coordinator=trainer:{port}\n"))
            .count(),
        cfg.cluster.workers,
        "every worker service finds the coordinator at trainer:{port}"
    );
    assert!(
        compose.contains("x-worker: &worker\n  <<: *ember\n  restart: on-failure\n"),
        "workers are restarted on failure"
    );

    // Dashboard: valid JSON; shard metrics exist in ps-server; the panels on
    // metrics nobody exports yet say so.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/ember-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let ps_metrics =
        std::fs::read_to_string(root.join("ps-server/src/metrics.rs")).expect("metrics.rs");
    // The launcher's metrics are named in the files of cluster/src/launcher/.
    let launcher_metrics: String = std::fs::read_dir(root.join("cluster/src/launcher"))
        .expect("cluster/src/launcher")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("launcher source"))
        .collect();
    let panels = dash["panels"].as_array().expect("panels");
    let mut checked = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let desc = p["description"].as_str().unwrap_or("");
        assert!(!desc.is_empty(), "panel {} has no description", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("ember_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let base = name.strip_suffix("_bucket").unwrap_or(&name);
                if base.starts_with("ember_ps_") {
                    assert!(
                        ps_metrics.contains(&format!("\"{base}\"")),
                        "panel {}: {base} is not a ps-server metric",
                        p["title"]
                    );
                } else {
                    // Training metrics come from the coordinator (`ember train --metrics-addr`).
                    assert!(
                        launcher_metrics.contains(&format!("\"{base}\"")),
                        "panel {}: {base} is not a metric of the launcher",
                        p["title"]
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "dashboard queries checked: {checked}");
}
