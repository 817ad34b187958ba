//! Helpers for Ember's multi-process integration tests: locate the built
//! binaries, prepare small real (ML-100k) or synthetic data sets, write job
//! files, run `ember train` as a child process, and compute the item
//! popularity baseline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ember_worker::data::reader::SampleReader;

/// Directory of the workspace's built binaries (next to the test executable).
pub fn bin_dir() -> PathBuf {
    ember_cluster::procs::bin_dir()
}

/// Path of a built binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The full-state comparison helper of the shard tests
/// (`ps-server/tests/common`): every stored row (weights and optimizer state
/// as bits, count, last step), pending counts, dense tensors and dense step.
#[path = "../../ps-server/tests/common/mod.rs"]
pub mod full_state;

pub use full_state::FullState;

/// The full state of every shard of the cluster checkpoint `step` of a run
/// (`<run>/checkpoints`, `shards` shards), each restored into a fresh
/// in-memory shard (a base, or a base and its deltas).
pub fn checkpoint_state(run: &Path, shards: u32, step: u64) -> Vec<FullState> {
    (0..shards)
        .map(|i| {
            let s = ember_ps::Shard::new(ember_ps::ShardConfig {
                shard_index: i,
                num_shards: shards,
                checkpoint_dir: Some(run.join("checkpoints")),
                ..ember_ps::ShardConfig::default()
            })
            .expect("in-memory shard");
            let (got, _) = s
                .restore(step)
                .unwrap_or_else(|e| panic!("shard {i}: restore step {step}: {e}"));
            assert_eq!(got, step, "shard {i}");
            full_state::full_state(&s)
        })
        .collect()
}

/// Asserts that two runs' checkpoints hold the same state, shard by shard,
/// bit for bit; on a difference names the shard, the table and the first
/// row that differs (and the largest weight difference), or the dense tensor.
pub fn assert_same_state(a: &[FullState], b: &[FullState], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: shard count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x == y {
            continue;
        }
        assert_eq!(x.dense_step, y.dense_step, "{what}: shard {i} dense step");
        for ((tn, xr, xp), (_, yr, yp)) in x.tables.iter().zip(&y.tables) {
            assert_eq!(xr.len(), yr.len(), "{what}: shard {i} table {tn}: rows");
            let max = xr
                .iter()
                .zip(yr)
                .flat_map(|(r, s)| r.3.iter().zip(&s.3))
                .map(|(p, q)| (f32::from_bits(*p) - f32::from_bits(*q)).abs())
                .fold(0.0f32, f32::max);
            if let Some((r, s)) = xr.iter().zip(yr).find(|(r, s)| r != s) {
                panic!(
                    "{what}: shard {i} table {tn}: row {} differs (largest value                      difference in the table {max:e}):
  {:?}
  {:?}",
                    r.0,
                    (r.0, r.1, r.2, r.3.iter().map(|v| f32::from_bits(*v)).collect::<Vec<_>>()),
                    (s.0, s.1, s.2, s.3.iter().map(|v| f32::from_bits(*v)).collect::<Vec<_>>()),
                );
            }
            assert_eq!(xp, yp, "{what}: shard {i} table {tn}: pending counts");
        }
        assert_eq!(x.tables.len(), y.tables.len(), "{what}: shard {i} tables");
        for ((n, u), (_, v)) in x.dense.iter().zip(&y.dense) {
            assert_eq!(u, v, "{what}: shard {i} dense tensor {n}");
        }
        assert_eq!(x, y, "{what}: shard {i}");
    }
}

/// A prerequisite a test may lack on some machines. `EMBER_REQUIRE` (a
/// comma-separated list of [`Prereq::name`]s, or `all`) turns its absence
/// from a skip into a failure, so that CI cannot pass by skipping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    /// A working Docker daemon with Compose (`docker info`).
    Docker,
    /// The ML-100k raw files in `data/ml-100k` (scripts/fetch-ml100k.sh).
    Data,
    /// The kubernetes-validate Python package (PyPI).
    K8sValidate,
}

impl Prereq {
    /// The name used in `EMBER_REQUIRE`.
    pub fn name(self) -> &'static str {
        match self {
            Prereq::Docker => "docker",
            Prereq::Data => "data",
            Prereq::K8sValidate => "k8s-validate",
        }
    }

    /// Whether `EMBER_REQUIRE` makes this prerequisite mandatory.
    pub fn required(self) -> bool {
        required_in(&std::env::var("EMBER_REQUIRE").unwrap_or_default(), self)
    }
}

/// Whether the `EMBER_REQUIRE` value `list` names `p` (or says `all`).
pub fn required_in(list: &str, p: Prereq) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|x| x == p.name() || x == "all")
}

/// File the skips of a test run are appended to (one line each), for
/// scripts/test.sh's summary: `$EMBER_SKIPS_FILE`, else
/// `target/ember-skips.txt` in the workspace.
pub fn skips_file() -> PathBuf {
    std::env::var_os("EMBER_SKIPS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/ember-skips.txt"))
}

/// The running test's name (libtest names each test's thread after it).
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unknown test")
        .to_string()
}

/// Reports that the running test skips (all or part of) its work because
/// `prereq` is missing: panics when `EMBER_REQUIRE` requires it, else prints
/// `SKIPPED: <test>: <reason>` and appends that line to [`skips_file`]. The
/// caller returns (or degrades) after this.
pub fn skip(prereq: Prereq, reason: &str) {
    let line = format!(
        "SKIPPED: {}: {reason} (missing {}; EMBER_REQUIRE={} makes this a failure)",
        current_test(),
        prereq.name(),
        prereq.name()
    );
    if prereq.required() {
        panic!("{line} -- but EMBER_REQUIRE requires it");
    }
    eprintln!("\n*** {line} ***\n");
    let file = skips_file();
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
    {
        use std::io::Write;
        let _ = writeln!(f, "{line}");
    }
}

/// Train and test files for a test.
#[derive(Debug, Clone)]
pub struct DataSet {
    /// Training samples.
    pub train: PathBuf,
    /// Test samples.
    pub test: PathBuf,
    /// Counts file.
    pub counts: PathBuf,
    /// True for real ML-100k, false for synthetic.
    pub real: bool,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Prepares ML-100k under the DIN protocol into `dir` when the raw files are
/// in `data/ml-100k` (scripts/fetch-ml100k.sh), else writes a synthetic set
/// and reports that as a skip of the real-data part ([`skip`]; a failure
/// under `EMBER_REQUIRE=data`).
pub fn dataset(dir: &Path) -> DataSet {
    let raw = repo_root().join("data/ml-100k");
    let counts = dir.join("counts.bin");
    if raw.join("ml-100k.inter").exists() {
        let out = dir.join("ml100k");
        run(Command::new(bin("ember-data"))
            .args(["--quiet", "prepare", "--raw-dir"])
            .arg(&raw)
            .arg("--out")
            .arg(&out));
        let train = out.join("train.txt");
        run(Command::new(bin("ember-data"))
            .args(["--quiet", "count", "--train"])
            .arg(&train)
            .arg("--out")
            .arg(&counts));
        DataSet {
            train,
            test: out.join("test.txt"),
            counts,
            real: true,
        }
    } else {
        skip(
            Prereq::Data,
            "data/ml-100k absent (run scripts/fetch-ml100k.sh): ran on synthetic data instead",
        );
        let all = dir.join("synth.txt");
        run(Command::new(bin("ember-data"))
            .args([
                "--quiet", "synth", "--ids", "20000", "--users", "500", "--rows", "24000",
                "--cats", "20", "--out",
            ])
            .arg(&all));
        let text = std::fs::read_to_string(&all).expect("read synthetic data");
        let lines: Vec<&str> = text.lines().collect();
        let (train_l, test_l) = lines.split_at(20_000);
        let train = dir.join("train.txt");
        let test = dir.join("test.txt");
        std::fs::write(&train, train_l.join("\n") + "\n").expect("write train");
        std::fs::write(&test, test_l.join("\n") + "\n").expect("write test");
        run(Command::new(bin("ember-data"))
            .args(["--quiet", "count", "--train"])
            .arg(&train)
            .arg("--out")
            .arg(&counts));
        DataSet {
            train,
            test,
            counts,
            real: false,
        }
    }
}

/// A job file for `data` in `dir` with `extra` TOML appended to the
/// `[cluster]`/`[train]` tables given in `cluster` and `train`.
pub fn write_job(dir: &Path, data: &DataSet, model: &str, cluster: &str, train: &str) -> PathBuf {
    let text = format!(
        "name = \"it\"\n[model]\n{model}\n[data]\ntrain = {:?}\ntest = {:?}\ncounts = {:?}\n[cluster]\n{cluster}\n[train]\nout_dir = {:?}\n{train}\n",
        data.train,
        data.test,
        data.counts,
        dir.join("run"),
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).expect("write job");
    p
}

/// Runs `ember train --quiet --config job` (plus `args`) to completion and
/// returns its output; panics with the output on failure.
pub fn ember_train(job: &Path, args: &[&str]) -> Output {
    run(Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(job)
        .args(args))
}

/// `ember train --quiet --config job` (plus `args`) started in its own
/// process group (so that a test can kill the launcher with all its children
/// at once, like a machine that dies), stdout and stderr to `log`.
pub fn spawn_train(job: &Path, args: &[&str], log: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).expect("create launcher log");
    let err = out.try_clone().expect("clone launcher log");
    Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(job)
        .args(args)
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .expect("start ember train")
}

/// The `<run>/cluster.json` of a running (or finished) job, if written yet.
pub fn cluster_info(run: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(run.join("cluster.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

/// `GET /metrics` from `addr` (Prometheus text), or None when it does not answer.
pub fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Sum of every series of the metric `name` (any labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Samples trained so far by a job started with `--metrics-addr` (the
/// launcher's `ember_train_samples_total`, all workers, all epochs).
pub fn samples_trained(run: &Path) -> Option<u64> {
    let info = cluster_info(run)?;
    let addr = info["launcher_metrics"]
        .as_str()
        .filter(|a| !a.is_empty())?;
    let text = scrape(addr)?;
    Some(metric_sum(&text, "ember_train_samples_total") as u64)
}

/// The steps of every `rolling the cluster back to step N` line in a
/// launcher's log, in order.
pub fn rollback_steps(log: &str) -> Vec<u64> {
    const KEY: &str = "rolling the cluster back to step ";
    log.match_indices(KEY)
        .filter_map(|(i, _)| {
            let rest = &log[i + KEY.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

/// `text` without ANSI colour sequences (`ESC [ ... m`), as logs are
/// written with them.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `a` and `b` agree within `rel` relative to `max(|a|, 1)`.
pub fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(1.0)
}

/// The epoch records of a run report.
pub fn epochs(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["epochs"].as_array().cloned().unwrap_or_default()
}

/// The number at `path` in `v` (NaN when absent).
pub fn json_f64(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

/// The run report written by `ember train`.
pub fn report(dir: &Path) -> serde_json::Value {
    let p = dir.join("run/metrics.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .expect("metrics.json")
}

/// GAUC and AUC of the item-popularity baseline: score = positives of the
/// target item in the training file.
pub fn popularity_baseline(data: &DataSet) -> (f64, f64) {
    let mut pos: std::collections::HashMap<u64, f32> = std::collections::HashMap::new();
    let mut r =
        SampleReader::open(std::slice::from_ref(&data.train), 0, 1, false).expect("open train");
    while let Some(s) = r.read().expect("read train") {
        if s.label > 0.5 {
            *pos.entry(s.item).or_default() += 1.0;
        }
        r.recycle(s);
    }
    let (mut scores, mut labels, mut users) = (Vec::new(), Vec::new(), Vec::new());
    let mut r =
        SampleReader::open(std::slice::from_ref(&data.test), 0, 1, false).expect("open test");
    while let Some(s) = r.read().expect("read test") {
        scores.push(pos.get(&s.item).copied().unwrap_or(0.0));
        labels.push(s.label);
        users.push(s.user);
        r.recycle(s);
    }
    let gauc = ember_worker::metrics::gauc(&scores, &labels, &users).unwrap_or(0.5);
    let auc = ember_worker::metrics::auc(&scores, &labels).unwrap_or(0.5);
    (gauc, auc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rollbacks_and_metrics() {
        let log = "WARN epoch=1 shard(s) [1] died; rolling the cluster back to step 20\n\
                   x rolling the cluster back to step 140 y";
        assert_eq!(rollback_steps(log), [20, 140]);
        assert!(rollback_steps("nothing").is_empty());
        assert_eq!(
            strip_ansi("\u{1b}[3mstep\u{1b}[0m\u{1b}[2m=\u{1b}[0m30"),
            "step=30"
        );
        let text = "# TYPE ember_train_samples_total counter\n\
                    ember_train_samples_total{worker=\"0\"} 256\n\
                    ember_train_samples_total{worker=\"1\"} 128\n\
                    ember_train_samples_totally 5\n";
        assert_eq!(metric_sum(text, "ember_train_samples_total"), 384.0);
    }

    #[test]
    fn ember_require_names_prerequisites() {
        assert!(required_in("docker,data", Prereq::Data));
        assert!(required_in(" docker , k8s-validate", Prereq::K8sValidate));
        assert!(!required_in("docker", Prereq::Data));
        assert!(!required_in("", Prereq::Docker));
        assert!(!required_in("dockers", Prereq::Docker));
        assert!(required_in("all", Prereq::Docker));
    }
}
