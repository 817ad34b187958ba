//! Real multi-process clusters on loopback: `ember train` starts `ps-server`
//! and `worker` child processes on free ports. Sized for a 2-core CI machine.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{bin, dataset, ember_train, popularity_baseline, report, write_job};

fn epochs(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["epochs"].as_array().cloned().unwrap_or_default()
}

fn f(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

/// A 2-shard, 2-worker cluster trains DIN (synchronous, pipelined) and beats
/// the item-popularity baseline on the test set.
/// Runs `ember train --quiet` on `job` and `kill -9`s shard 1 (pid from
/// `<run>/cluster.json`) the first time `ready(run)` holds while the run is
/// going. Returns whether it killed the shard, and the run's output.
fn train_killing_shard_1(
    job: &std::path::Path,
    run: &std::path::Path,
    ready: impl Fn(&std::path::Path) -> bool,
) -> (bool, std::process::Output) {
    let mut child = Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut killed = false;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        if ready(run) {
            let info: serde_json::Value = std::fs::read_to_string(run.join("cluster.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            if let Some(pid) = info["pids"][1].as_u64() {
                let st = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap();
                killed = st.success();
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (killed, child.wait_with_output().unwrap())
}

/// An epoch record of a run that survived a failure: at least one restart,
/// and a GAUC within 0.005 of the uninterrupted run's same epoch.
fn assert_recovered(clean: &serde_json::Value, rec: &serde_json::Value) {
    assert!(
        rec["restarts"].as_u64().unwrap() >= 1,
        "no restart recorded: {rec}"
    );
    let (a, b) = (f(clean, &["test", "gauc"]), f(rec, &["test", "gauc"]));
    assert!(
        (a - b).abs() <= 0.005,
        "GAUC after recovery {b} vs uninterrupted {a}"
    );
}

#[test]
fn two_shard_two_worker_din_beats_popularity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let (pop_gauc, pop_auc) = popularity_baseline(&data);
    let job = write_job(
        dir.path(),
        &data,
        "kind = \"din\"",
        "shards = 2\nworkers = 2\nmode = \"process\"\nsync = \"sync\"\nstaleness = 1",
        "epochs = 1\nmax_steps_per_epoch = 250",
    );
    let out = ember_train(&job, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("final test"), "{stdout}");
    let r = report(dir.path());
    let e = epochs(&r);
    assert_eq!(e.len(), 1);
    let gauc = f(&e[0], &["test", "gauc"]);
    let auc = f(&e[0], &["test", "auc"]);
    eprintln!("DIN GAUC {gauc:.4} AUC {auc:.4}; popularity GAUC {pop_gauc:.4} AUC {pop_auc:.4} (real data: {})", data.real);
    assert!(
        gauc > pop_gauc,
        "DIN GAUC {gauc} does not beat popularity {pop_gauc}"
    );
    assert_eq!(e[0]["samples"].as_u64(), Some(250 * 2 * 128));
    assert!(f(&e[0], &["dedup_ratio"]) > 1.0);
    // The run directory has the curves and the shards' checkpoints at steps 0 and 250.
    assert!(dir.path().join("run/curves.png").exists());
    let ckpt = dir
        .path()
        .join("run/checkpoints/shard-1-of-2/step-250.ckpt");
    assert!(ckpt.exists(), "{} missing", ckpt.display());
    // security.mode = "auto": the run had its own CA and token, every shard
    // served TLS with a token (no INSECURE warning), and the token file is
    // private and never appears in a log.
    let secrets = dir.path().join("run/secrets");
    assert!(secrets.join("ca.pem").exists());
    let token = std::fs::read_to_string(secrets.join("token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(secrets.join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "token file mode {mode:o}");
    for log in ["shard-0.log", "shard-1.log", "worker-0.log", "worker-1.log"] {
        let text = std::fs::read_to_string(dir.path().join("run/logs").join(log)).unwrap();
        assert!(!text.contains("INSECURE"), "{log}: {text}");
        assert!(!text.contains(token.trim()), "{log} contains the token");
    }
}

/// Resuming from the epoch-1 checkpoint reproduces the uninterrupted run's
/// epoch-2 loss and metrics (1 worker, staleness 0: deterministic).
#[test]
fn resume_continues_from_the_checkpoint_with_the_same_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0";
    let train = "epochs = 2\nmax_steps_per_epoch = 30\nmax_eval_samples = 600";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    ember_train(&job, &[]);
    let full = epochs(&report(dir.path()));
    assert_eq!(full.len(), 2);

    // Same job stopped after epoch 1, then resumed.
    ember_train(&job, &["--epochs", "1"]);
    assert_eq!(epochs(&report(dir.path())).len(), 1);
    let out = ember_train(&job, &["--resume"]);
    let resumed = epochs(&report(dir.path()));
    assert_eq!(resumed.len(), 2, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(resumed[1]["step"], full[1]["step"]);
    let (a, b) = (
        f(&full[1], &["train_loss"]),
        f(&resumed[1], &["train_loss"]),
    );
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
        "epoch-2 loss {a} vs resumed {b}"
    );
    let (a, b) = (
        f(&full[1], &["test", "gauc"]),
        f(&resumed[1], &["test", "gauc"]),
    );
    assert!((a - b).abs() <= 1e-4, "epoch-2 GAUC {a} vs resumed {b}");
}

/// `kill -9` of a shard mid-epoch: the launcher restarts it from the last
/// complete cluster checkpoint, rolls the other shard back to the same step,
/// reruns the epoch, and ends with the same GAUC as an uninterrupted run.
#[test]
fn killed_shard_is_restarted_and_training_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0";
    let train = "epochs = 2\nmax_steps_per_epoch = 60\nmax_eval_samples = 600";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    ember_train(&job, &[]);
    let clean = epochs(&report(dir.path()));

    // Wait for epoch 1 to finish (its record appears), then kill shard 1 during epoch 2.
    let run = dir.path().join("run");
    let (killed, out) = train_killing_shard_1(&job, &run, |run| {
        std::fs::read_to_string(run.join("metrics.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| epochs(&v).len() == 1)
    });
    assert!(killed, "never saw epoch 1 finish");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = epochs(&report(dir.path()));
    assert_eq!(rec.len(), 2);
    assert_recovered(&clean[1], &rec[1]);
}

/// `cluster.checkpoint_every_steps`: every shard is checkpointed inside the
/// epoch; the segmented run equals the unsegmented one (workers resume at the
/// exact data position), and a shard killed after a mid-epoch checkpoint rolls
/// the cluster back to that step, not to the epoch start, with the same result.
#[test]
fn mid_epoch_checkpoints_resume_at_the_data_position() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let base = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0";
    let train = "epochs = 1\nmax_steps_per_epoch = 60\nmax_eval_samples = 600";
    let job = write_job(dir.path(), &data, "kind = \"din\"", base, train);
    ember_train(&job, &[]);
    let whole = epochs(&report(dir.path()));

    let cluster = format!("{base}\ncheckpoint_every_steps = 20");
    let job = write_job(dir.path(), &data, "kind = \"din\"", &cluster, train);
    ember_train(&job, &[]);
    let seg = epochs(&report(dir.path()));
    let run = dir.path().join("run");
    for step in [20, 40, 60] {
        let c = run.join(format!("checkpoints/shard-0-of-2/step-{step}.ckpt"));
        assert!(c.exists(), "{} missing", c.display());
    }
    let (a, b) = (f(&whole[0], &["train_loss"]), f(&seg[0], &["train_loss"]));
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
        "loss {a} vs segmented {b}"
    );
    assert_eq!(whole[0]["samples"], seg[0]["samples"]);
    let (a, b) = (
        f(&whole[0], &["test", "gauc"]),
        f(&seg[0], &["test", "gauc"]),
    );
    assert!((a - b).abs() <= 1e-4, "GAUC {a} vs segmented {b}");

    // Again, killing shard 1 once the step-20 checkpoint exists.
    let ck = |run: &std::path::Path, step: u64| {
        run.join(format!("checkpoints/shard-1-of-2/step-{step}.ckpt"))
            .exists()
    };
    let (killed, out) = train_killing_shard_1(&job, &run, |run| ck(run, 20) && !ck(run, 60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        killed,
        "never saw the step-20 checkpoint before the end: {stderr}"
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rolling the cluster back to step 20")
            || stderr.contains("rolling the cluster back to step 40"),
        "expected a rollback to a mid-epoch checkpoint: {stderr}"
    );
    let rec = epochs(&report(dir.path()));
    assert_recovered(&whole[0], &rec[0]);
}

/// Export after training, then predict without a cluster: same metrics as
/// the run's last evaluation, one score per test row.
#[test]
fn export_and_predict_without_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let job = write_job(
        dir.path(),
        &data,
        "kind = \"din\"\nactivation = \"dice\"",
        "shards = 2\nworkers = 1\nmode = \"inprocess\"\nstaleness = 0",
        "epochs = 1\nmax_steps_per_epoch = 20",
    );
    ember_train(&job, &[]);
    let r = epochs(&report(dir.path()));
    let model = dir.path().join("model");
    let out = Command::new(bin("ember"))
        .args(["export", "--config"])
        .arg(&job)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scores = dir.path().join("scores.txt");
    let out = Command::new(bin("ember"))
        .args(["predict", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&data.test)
        .arg("--output")
        .arg(&scores)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n_test = std::fs::read_to_string(&data.test).unwrap().lines().count();
    let lines: Vec<f64> = std::fs::read_to_string(&scores)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(lines.len(), n_test);
    assert!(lines.iter().all(|p| (0.0..=1.0).contains(p)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let gauc = f(&r[0], &["test", "gauc"]);
    assert!(
        stdout.contains(&format!("GAUC {gauc:.4}")),
        "predict said {stdout}, training evaluated GAUC {gauc:.4}"
    );
}

/// Distributed equivalence: the same job on 1 shard and on 4 shards
/// (synchronous, staleness 0) gives the same loss curve and test metrics,
/// because routing changes where a row lives, not its arithmetic.
#[test]
fn one_shard_and_four_shards_give_the_same_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let mut curves = Vec::new();
    for shards in [1, 4] {
        let sub = dir.path().join(format!("s{shards}"));
        std::fs::create_dir_all(&sub).unwrap();
        let job = write_job(
            &sub,
            &data,
            "kind = \"din\"",
            &format!("shards = {shards}\nworkers = 1\nmode = \"inprocess\"\nstaleness = 0"),
            "epochs = 2\nmax_steps_per_epoch = 25\nmax_eval_samples = 600",
        );
        ember_train(&job, &[]);
        let e = epochs(&report(&sub));
        curves.push(
            e.iter()
                .map(|r| {
                    (
                        f(r, &["train_loss"]),
                        f(r, &["test", "gauc"]),
                        f(r, &["test", "logloss"]),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(curves[0].len(), 2);
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!(
            (a.0 - b.0).abs() < 1e-6,
            "train loss {} (1 shard) vs {} (4 shards)",
            a.0,
            b.0
        );
        assert!((a.1 - b.1).abs() < 1e-6, "GAUC {} vs {}", a.1, b.1);
        assert!((a.2 - b.2).abs() < 1e-6, "test logloss {} vs {}", a.2, b.2);
    }
}

/// `kill -9` of a worker process mid-epoch: the launcher notices, rolls the
/// shards back to the last cluster checkpoint and reruns the epoch; the job
/// completes (it never hangs) and records the restart.
#[test]
fn killed_worker_is_replaced_and_the_epoch_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 1\nworkers = 2\nmode = \"process\"\nstaleness = 1";
    let train = "epochs = 1\nmax_steps_per_epoch = 80\nmax_eval_samples = 300\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    let child = Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(&job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Find worker 1 (a child process whose command line names this job) and kill it.
    let job_s = job.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut killed = false;
    while Instant::now() < deadline && !killed {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).to_string())
                .collect();
            let is_worker = args.first().is_some_and(|a| a.ends_with("/worker"))
                && args.iter().any(|a| a == &job_s)
                && args
                    .windows(2)
                    .any(|w| w[0] == "--worker-index" && w[1] == "1");
            if is_worker {
                std::thread::sleep(Duration::from_millis(1500));
                let pid = e.file_name().to_string_lossy().to_string();
                killed = Command::new("kill")
                    .args(["-9", &pid])
                    .status()
                    .unwrap()
                    .success();
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(killed, "never found worker 1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = epochs(&report(dir.path()));
    assert_eq!(rec.len(), 1);
    assert!(
        rec[0]["restarts"].as_u64().unwrap() >= 1,
        "no restart recorded: {}",
        rec[0]
    );
    assert_eq!(
        rec[0]["samples"].as_u64(),
        Some(80 * 2 * 128),
        "the rerun epoch is complete"
    );
}
