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
/// in `data/ml-100k` (scripts/fetch-ml100k.sh), else writes a synthetic set.
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
        eprintln!("note: data/ml-100k absent (run scripts/fetch-ml100k.sh); using synthetic data");
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
