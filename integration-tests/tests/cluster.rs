//! Real multi-process clusters on loopback: `ember train` starts `ps-server`
//! and `worker` child processes on free ports. Sized for a 2-core CI machine.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{
    assert_same_state, bin, checkpoint_state, close, cluster_info, dataset, ember_train, epochs,
    json_f64 as f, popularity_baseline, report, rollback_steps, samples_trained, spawn_train,
    strip_ansi, write_job,
};

/// What happened to a job whose shard 1 was signalled.
struct Signalled {
    /// Whether the signal was sent.
    sent: bool,
    /// The launcher's exit status.
    status: std::process::ExitStatus,
    /// The launcher's stdout and stderr.
    log: String,
}

/// `ember train` (plus `args`, output to `log`) in its own process group,
/// killed with `kill -9` of the whole group (launcher, shards, workers: a
/// machine that dies) as soon as `ready()` holds, polled every 10 ms for at
/// most 300 s. Returns whether the kill was sent, and the log.
fn train_killed_when(
    job: &std::path::Path,
    args: &[&str],
    log: &std::path::Path,
    ready: impl Fn() -> bool,
) -> (bool, String) {
    let mut child = spawn_train(job, args, log);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut killed = false;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        if ready() {
            killed = Command::new("kill")
                .args(["-9", "--", &format!("-{}", child.id())])
                .status()
                .unwrap()
                .success();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.wait();
    (killed, std::fs::read_to_string(log).unwrap_or_default())
}

/// Runs `ember train --quiet --metrics-addr 127.0.0.1:0` on `job` and sends
/// `signal` (`-9`, `-STOP`) to shard 1 (pid from `<run>/cluster.json`) the
/// first time `ready(run)` holds while the run is going. A shard left
/// stopped by a launcher that failed is killed afterwards.
fn train_signalling_shard_1(
    job: &std::path::Path,
    run: &std::path::Path,
    signal: &str,
    ready: impl Fn(&std::path::Path) -> bool,
) -> Signalled {
    let log_path = run.with_extension("launcher.log");
    let mut child = spawn_train(job, &["--metrics-addr", "127.0.0.1:0"], &log_path);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut pid = None;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        if ready(run) {
            pid = cluster_info(run).and_then(|i| i["pids"][1].as_u64());
            if pid.is_some() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = pid.is_some_and(|p| {
        Command::new("kill")
            .args([signal, &p.to_string()])
            .status()
            .unwrap()
            .success()
    });
    let status = child.wait().unwrap();
    if let Some(p) = pid {
        // A stopped shard the launcher did not kill (the test failed).
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&*run.to_string_lossy()) {
            let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
        }
    }
    let log = strip_ansi(&std::fs::read_to_string(&log_path).unwrap_or_default());
    Signalled { sent, status, log }
}

/// A run that survived a failure equals the uninterrupted run: at least one
/// restart, the same samples, train loss within relative 1e-5 and test GAUC
/// and logloss within 1e-4 (1 worker, staleness 0: deterministic).
fn assert_recovered(clean: &serde_json::Value, rec: &serde_json::Value) {
    assert!(
        rec["restarts"].as_u64().unwrap() >= 1,
        "no restart recorded: {rec}"
    );
    assert_eq!(clean["samples"], rec["samples"], "{rec}");
    let (a, b) = (f(clean, &["train_loss"]), f(rec, &["train_loss"]));
    assert!(
        close(a, b, 1e-5),
        "train loss after recovery {b} vs uninterrupted {a}"
    );
    for m in ["gauc", "logloss"] {
        let (a, b) = (f(clean, &["test", m]), f(rec, &["test", m]));
        assert!(
            (a - b).abs() <= 1e-4,
            "test {m} after recovery {b} vs uninterrupted {a}"
        );
    }
}

/// Whether every shard of a 2-shard run has its checkpoint of `step`.
fn ckpt(run: &std::path::Path, step: u64) -> bool {
    (0..2).all(|i| {
        run.join(format!("checkpoints/shard-{i}-of-2/step-{step}.ckpt"))
            .exists()
    })
}

/// A 2-shard, 2-worker cluster trains DIN (synchronous, pipelined) and beats
/// the item-popularity baseline on the test set; every shard applied each
/// of the 250 steps' averaged dense gradients once (dense step 250 at the end).
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
    for (i, shard) in checkpoint_state(&dir.path().join("run"), 2, 250)
        .iter()
        .enumerate()
    {
        if !shard.dense.is_empty() {
            assert_eq!(shard.dense_step, 250, "shard {i}: dense steps applied");
        }
    }
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

/// Bounded staleness (`dense_staleness = 2`): two workers that may run two
/// steps apart, each step's pushes possibly completing out of order, still
/// end with every shard having applied each of the 60 steps' averaged dense
/// gradients exactly once (dense step 60, no step lost to the hold), and
/// the model trains (finite loss, test AUC above 0.5).
#[test]
fn bounded_dense_staleness_applies_every_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let job = write_job(
        dir.path(),
        &data,
        "kind = \"din\"",
        "shards = 2\nworkers = 2\nmode = \"process\"\nsync = \"sync\"\nstaleness = 1\ndense_staleness = 2",
        "epochs = 1\nmax_steps_per_epoch = 60\nmax_eval_samples = 600",
    );
    ember_train(&job, &[]);
    let e = epochs(&report(dir.path()));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["samples"].as_u64(), Some(60 * 2 * 128));
    assert!(f(&e[0], &["train_loss"]).is_finite());
    assert!(f(&e[0], &["test", "auc"]) > 0.5, "{}", e[0]);
    let state = checkpoint_state(&dir.path().join("run"), 2, 60);
    assert!(state.iter().any(|s| !s.dense.is_empty()));
    for (i, shard) in state.iter().enumerate() {
        if !shard.dense.is_empty() {
            assert_eq!(shard.dense_step, 60, "shard {i}: dense steps applied");
        }
    }
}

/// `--resume` continues a run that stopped after epoch 1: the launcher says
/// it resumed from the step-30 checkpoint with one epoch done, carries the
/// epoch-1 record over unchanged (its wall time too: it was not retrained),
/// trains only epoch 2, and that epoch equals the uninterrupted run's
/// (1 worker, staleness 0: deterministic).
/// Expected time: ~1 min on 2 cores (2 + 1 + 1 epochs of 30 steps).
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
    let run = dir.path().join("run");
    let full_state = checkpoint_state(&run, 2, 60);

    // Same job stopped after epoch 1, then resumed.
    ember_train(&job, &["--epochs", "1"]);
    let first = epochs(&report(dir.path()));
    assert_eq!(first.len(), 1);
    let out = ember_train(&job, &["--resume"]);
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(
        log.contains("resumed from cluster checkpoint")
            && log.contains("step=30")
            && log.contains("epochs_done=1"),
        "{log}"
    );
    let resumed = epochs(&report(dir.path()));
    assert_eq!(resumed.len(), 2, "{log}");
    assert_eq!(resumed[0], first[0], "the epoch-1 record is carried over");
    assert_eq!(resumed[1]["step"], full[1]["step"]);
    assert_eq!(resumed[1]["samples"], full[1]["samples"]);
    let (a, b) = (
        f(&full[1], &["train_loss"]),
        f(&resumed[1], &["train_loss"]),
    );
    assert!(close(a, b, 1e-5), "epoch-2 loss {a} vs resumed {b}");
    for m in ["gauc", "logloss"] {
        let (a, b) = (f(&full[1], &["test", m]), f(&resumed[1], &["test", m]));
        assert!((a - b).abs() <= 1e-4, "epoch-2 {m} {a} vs resumed {b}");
    }
    // The shards end in the uninterrupted run's state, bit for bit.
    assert_same_state(&full_state, &checkpoint_state(&run, 2, 60), "resumed run");
}

/// A run killed mid-epoch with everything it started (`kill -9` of the whole
/// process group: a machine that dies) continues in a fresh process with
/// `--resume` from its last complete mid-epoch checkpoint, at that data
/// position, and ends with the uninterrupted run's test metrics; the resumed
/// epoch's record covers the steps trained after the resume.
/// Expected time: ~15 s on 2 cores (a 60-step run, a partial one, the rest).
#[test]
fn mid_epoch_resume_in_a_fresh_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0\n\
                   checkpoint_every_steps = 10";
    let train = "epochs = 1\nmax_steps_per_epoch = 60\nmax_eval_samples = 600\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    ember_train(&job, &[]);
    let clean = epochs(&report(dir.path()));
    let run = dir.path().join("run");
    let clean_state = checkpoint_state(&run, 2, 60);

    let (killed, killed_log) = train_killed_when(
        &job,
        &["--metrics-addr", "127.0.0.1:0"],
        &dir.path().join("killed.log"),
        || ckpt(&run, 10) && samples_trained(&run).is_some_and(|n| n >= 13 * 128),
    );
    assert!(
        killed,
        "never saw progress after the step-10 checkpoint: {killed_log}"
    );
    assert!(!ckpt(&run, 60), "the run finished before the kill");

    let out = ember_train(&job, &["--resume"]);
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    let step: u64 = log
        .split("resumed from cluster checkpoint")
        .nth(1)
        .and_then(|rest| rest.split("step=").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line: {log}"));
    assert!(
        step.is_multiple_of(10) && (10..60).contains(&step),
        "resumed at step {step}: {log}"
    );
    let rec = epochs(&report(dir.path()));
    assert_eq!(rec.len(), 1, "{log}");
    assert_eq!(rec[0]["step"], 60);
    assert_eq!(rec[0]["samples"].as_u64(), Some((60 - step) * 128));
    for m in ["gauc", "logloss", "auc"] {
        let (a, b) = (f(&clean[0], &["test", m]), f(&rec[0], &["test", m]));
        assert!((a - b).abs() <= 1e-4, "test {m} {a} vs resumed {b}");
    }
    assert_same_state(
        &clean_state,
        &checkpoint_state(&run, 2, 60),
        "mid-epoch resume",
    );
}

/// `kill -9` of a shard once epoch 2 has trained some steps (seen in the
/// launcher's `ember_train_samples_total`, not guessed with a sleep): the
/// launcher restarts it from the last complete cluster checkpoint (the end of
/// epoch 1, step 60), rolls the other shard back to the same step, reruns
/// epoch 2, and ends exactly like an uninterrupted run.
/// Expected time: ~1 min on 2 cores (three 60-step epochs + a partial one).
#[test]
fn killed_shard_is_restarted_and_training_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0";
    let train = "epochs = 2\nmax_steps_per_epoch = 60\nmax_eval_samples = 600\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    ember_train(&job, &[]);
    let clean = epochs(&report(dir.path()));
    let run = dir.path().join("run");
    let clean_state = checkpoint_state(&run, 2, 120);

    // Epoch 1 is 60 steps of 128 samples; kill after 5 steps of epoch 2.
    let r = train_signalling_shard_1(&job, &run, "-9", |run| {
        samples_trained(run).is_some_and(|n| n >= (60 + 5) * 128)
    });
    assert!(r.sent, "never saw epoch 2 progress: {}", r.log);
    assert!(r.status.success(), "{}", r.log);
    assert_eq!(rollback_steps(&r.log), [60], "{}", r.log);
    let rec = epochs(&report(dir.path()));
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[0]["restarts"], 0);
    assert_recovered(&clean[1], &rec[1]);
    assert_same_state(
        &clean_state,
        &checkpoint_state(&run, 2, 120),
        "after kill -9",
    );
}

/// A hung shard (`kill -STOP`: the process lives, holds its port and never
/// answers) after the step-20 checkpoint: the launcher notices within
/// `cluster.shard_timeout_s` (Health probes), kills and restarts it, rolls
/// the cluster back to the last mid-epoch checkpoint and finishes with the
/// result of the uninterrupted run.
/// Expected time: ~1 min on 2 cores (two 60-step runs, the shard timeout, a rerun).
#[test]
fn hung_shard_is_killed_restarted_and_training_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0\n\
                   checkpoint_every_steps = 20\nshard_timeout_s = 3";
    let train = "epochs = 1\nmax_steps_per_epoch = 60\nmax_eval_samples = 600\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    ember_train(&job, &[]);
    let clean = epochs(&report(dir.path()));
    let run = dir.path().join("run");
    let clean_state = checkpoint_state(&run, 2, 60);

    let t = Instant::now();
    let r = train_signalling_shard_1(&job, &run, "-STOP", |run| {
        ckpt(run, 20) && samples_trained(run).is_some_and(|n| n >= 23 * 128)
    });
    assert!(
        r.sent,
        "never saw progress after the step-20 checkpoint: {}",
        r.log
    );
    assert!(r.status.success(), "{}", r.log);
    assert!(r.log.contains("shard(s) [1] hung"), "{}", r.log);
    assert!(r.log.contains("killing hung shard process"), "{}", r.log);
    let back = rollback_steps(&r.log);
    assert!(
        back.len() == 1 && (back[0] == 20 || back[0] == 40),
        "expected one rollback to a mid-epoch checkpoint, got {back:?}: {}",
        r.log
    );
    let rec = epochs(&report(dir.path()));
    assert_recovered(&clean[0], &rec[0]);
    assert_same_state(
        &clean_state,
        &checkpoint_state(&run, 2, 60),
        "after kill -STOP",
    );
    eprintln!("hung-shard run took {:.1?}", t.elapsed());
}

/// A deterministic worker failure (a malformed line in the training file)
/// ends the job on its first occurrence, without a rollback or a retry, and
/// the launcher's error carries the worker's cause: file, line and column.
/// Expected time: ~10 s.
#[test]
fn malformed_data_fails_the_job_at_once_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // A copy of the training file with a non-numeric user id at line 300.
    let text = std::fs::read_to_string(&data.train).unwrap();
    let mut lines: Vec<String> = text.lines().take(2000).map(str::to_string).collect();
    let mut cols: Vec<&str> = lines[299].split('\t').collect();
    cols[1] = "abc";
    lines[299] = cols.join("\t");
    let bad = dir.path().join("bad-train.txt");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let mut data = data.clone();
    data.train = bad;
    let cluster = "shards = 1\nworkers = 1\nmode = \"process\"\nstaleness = 0\nmax_restarts = 3";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, "epochs = 1");
    let out = Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(&job)
        .output()
        .unwrap();
    let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("bad-train.txt:300: column user_id")
            && stderr.contains("abc")
            && stderr.contains("not retried"),
        "{stderr}"
    );
    assert!(rollback_steps(&stderr).is_empty(), "{stderr}");
}

/// `cluster.checkpoint_every_steps`: every shard is checkpointed inside the
/// epoch; the segmented run equals the unsegmented one (workers resume at the
/// exact data position), and a shard killed after a mid-epoch checkpoint rolls
/// the cluster back to that step, not to the epoch start, with the same result.
/// Expected time: ~1.5 min on 2 cores (three 60-step runs and a partial one).
#[test]
fn mid_epoch_checkpoints_resume_at_the_data_position() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let base = "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0";
    let train = "epochs = 1\nmax_steps_per_epoch = 60\nmax_eval_samples = 600\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", base, train);
    ember_train(&job, &[]);
    let whole = epochs(&report(dir.path()));
    let whole_state = checkpoint_state(&dir.path().join("run"), 2, 60);

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
    assert_same_state(
        &whole_state,
        &checkpoint_state(&run, 2, 60),
        "segmented run",
    );

    // Again, killing shard 1 once steps after the step-20 checkpoint ran.
    let r = train_signalling_shard_1(&job, &run, "-9", |run| {
        ckpt(run, 20) && samples_trained(run).is_some_and(|n| n >= 23 * 128)
    });
    assert!(
        r.sent,
        "never saw progress after the step-20 checkpoint: {}",
        r.log
    );
    assert!(r.status.success(), "{}", r.log);
    let back = rollback_steps(&r.log);
    assert!(
        back.len() == 1 && (back[0] == 20 || back[0] == 40),
        "expected one rollback to a mid-epoch checkpoint, got {back:?}: {}",
        r.log
    );
    let rec = epochs(&report(dir.path()));
    assert_recovered(&whole[0], &rec[0]);
    assert_same_state(
        &whole_state,
        &checkpoint_state(&run, 2, 60),
        "after kill -9 mid-epoch",
    );
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
    let mut ckpt_sizes = Vec::new();
    for shards in [1u64, 4] {
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
        let r = report(&sub);
        // The run really used `shards` shards, and each holds a share of the
        // rows: every shard's final checkpoint has rows (its file is well
        // above an empty shard's).
        assert_eq!(r["shards"].as_u64(), Some(shards), "{r}");
        let info = cluster_info(&sub.join("run")).unwrap();
        assert_eq!(
            info["shards"].as_array().map(Vec::len),
            Some(shards as usize)
        );
        let sizes: Vec<u64> = (0..shards)
            .map(|i| {
                let p = sub.join(format!(
                    "run/checkpoints/shard-{i}-of-{shards}/step-50.ckpt"
                ));
                std::fs::metadata(&p)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                    .len()
            })
            .collect();
        ckpt_sizes.push(sizes);
        let e = epochs(&r);
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
    // 4 shards split the single shard's rows: each holds a real share
    // (measured: 12%..56% of the single shard's file, the dense parameters
    // live on one shard; an empty shard's checkpoint is a few hundred bytes).
    let whole = ckpt_sizes[0][0];
    assert!(
        ckpt_sizes[1].iter().all(|&s| s * 20 > whole),
        "checkpoint sizes 1 shard {whole}, 4 shards {:?}",
        ckpt_sizes[1]
    );
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

/// `kill -9` of a worker process mid-epoch (once the launcher's
/// `ember_train_samples_total` shows 8 of the 80 steps trained, not after a
/// guessed sleep: an 80-step epoch lasts about a second): the launcher
/// notices, rolls the shards back to the last cluster checkpoint and reruns
/// the epoch; the job completes (it never hangs) and records the restart.
#[test]
fn killed_worker_is_replaced_and_the_epoch_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 1\nworkers = 2\nmode = \"process\"\nstaleness = 1";
    let train = "epochs = 1\nmax_steps_per_epoch = 80\nmax_eval_samples = 300\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    let run = dir.path().join("run");
    let log_path = dir.path().join("launcher.log");
    let mut child = spawn_train(&job, &["--metrics-addr", "127.0.0.1:0"], &log_path);
    let job_s = job.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut killed = false;
    let mut trained_at_kill = 0;
    while Instant::now() < deadline && !killed && child.try_wait().unwrap().is_none() {
        let trained = samples_trained(&run).unwrap_or(0);
        if trained >= 8 * 2 * 128 {
            // Worker 1: a child process whose command line names this job.
            if let Some(pid) = worker_pid(&job_s, 1) {
                killed = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap()
                    .success();
                trained_at_kill = trained;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(killed, "never saw worker 1 train 8 steps: {log}");
    assert!(
        trained_at_kill < 80 * 2 * 128,
        "the kill came after the epoch ({trained_at_kill} samples): {log}"
    );
    assert!(status.success(), "{log}");
    assert!(
        !rollback_steps(&log).is_empty(),
        "no rollback after the worker was killed: {log}"
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

/// The pid of the live `worker` process with `--worker-index index` whose
/// command line names `job` (from /proc).
fn worker_pid(job: &str, index: usize) -> Option<u32> {
    let index = index.to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let is_worker = args.first().is_some_and(|a| a.ends_with("/worker"))
            && args.iter().any(|a| a == job)
            && args
                .windows(2)
                .any(|w| w[0] == "--worker-index" && w[1] == index);
        if is_worker {
            return Some(pid);
        }
    }
    None
}

/// The pids of the live processes whose parent is `ppid` (from /proc).
fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(1).and_then(|p| p.parse().ok()) == Some(ppid)
        {
            out.push(pid);
        }
    }
    out
}

/// SIGTERM to the launcher alone (not its process group, as a supervisor
/// or `kill PID` sends it) stops the job: the launcher exits with 143 and
/// takes its shard and worker processes with it, instead of leaving them
/// running with their ports.
#[test]
fn sigterm_to_the_launcher_stops_its_shards_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cluster = "shards = 2\nworkers = 2\nmode = \"process\"\nstaleness = 1";
    let train = "epochs = 3\nmax_eval_samples = 300\nlog_every = 1";
    let job = write_job(dir.path(), &data, "kind = \"din\"", cluster, train);
    let log = dir.path().join("launcher.log");
    let mut child = spawn_train(&job, &[], &log);
    let pid = child.id();
    // Wait for 2 shards and 2 workers to run, then give them a moment.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut kids = Vec::new();
    while Instant::now() < deadline {
        kids = children_of(pid);
        if kids.len() >= 4 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        kids.len() >= 4,
        "launcher never had 4 children: {kids:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "could not signal the launcher");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever the outcome, leave no process behind.
    let alive = |p: &u32| {
        std::path::Path::new(&format!("/proc/{p}/stat")).exists()
            && !std::fs::read_to_string(format!("/proc/{p}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while kids.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = kids.iter().copied().filter(alive).collect();
    for p in &left {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("launcher did not exit on SIGTERM\n{text}"));
    assert!(
        left.is_empty(),
        "children outlived the launcher: {left:?}\n{text}"
    );
    assert_eq!(status.code(), Some(143), "{text}");
    assert!(text.contains("stopped by SIGTERM"), "{text}");
}

/// Writes `train.seq` / `test.seq` in `dir`: 400 users following a
/// deterministic next-item rule over 50 items (`i -> 7 i + 3 mod 50`).
fn rule_sequences(dir: &std::path::Path) {
    let n = 50u64;
    let (mut train, mut test) = (String::new(), String::new());
    for u in 0..400u64 {
        let mut s = vec![(u * 13 + u / 50) % n];
        while s.len() < 10 {
            let last = s[s.len() - 1];
            s.push((7 * last + 3) % n);
        }
        let ids: Vec<String> = s.iter().map(|i| (i + 1).to_string()).collect();
        train.push_str(&format!("{u}\t{}\n", ids[..9].join("\u{2}")));
        test.push_str(&format!("{u}\t{}\n", ids.join("\u{2}")));
    }
    std::fs::write(dir.join("train.seq"), train).unwrap();
    std::fs::write(dir.join("test.seq"), test).unwrap();
}

/// A GRU4Rec job on [`rule_sequences`] (2 shard processes, 2 workers,
/// `epochs` epochs) with `model_extra` appended to `[model]`.
fn gru4rec_job(dir: &std::path::Path, model_extra: &str, epochs: usize) -> String {
    format!(
        "name = \"it-gru4rec\"\n[model]\nkind = \"gru4rec\"\nhidden = 64\nemb_dim = 32\n\
         batch_size = 32\nn_sample = 32\nsample_alpha = 0.5\nlogq = 1.0\n{model_extra}\n\
         [data]\ntrain = {:?}\ntest = {:?}\nk = 10\n\
         [sparse]\noptimizer = {{ kind = \"adagrad\", lr = 0.05, initial_accumulator = 0.0, eps = 1e-6 }}\n\
         init = \"uniform\"\ninit_scale = 0.1\ncount_mode = \"none\"\n\
         [dense]\noptimizer = {{ kind = \"adagrad\", lr = 0.05, initial_accumulator = 0.0, eps = 1e-6 }}\n\
         [cluster]\nshards = 2\nworkers = 2\nmode = \"process\"\nsync = \"async\"\n\
         [train]\nepochs = {epochs}\nout_dir = {:?}\n",
        dir.join("train.seq"),
        dir.join("test.seq"),
        dir.join("run"),
    )
}

/// Recall@10 (all items) of a GRU4Rec report row.
fn recall10(row: &serde_json::Value) -> f64 {
    row["all"][0].as_f64().unwrap()
}

/// `ember train` with `[model] kind = "gru4rec"`: two `ps-server` processes
/// hold the item tables and the GRU, two workers train through them, and a
/// deterministic next-item rule over 50 items is learned: Recall@10 of each
/// user's last item near 1, far above the popularity ranking of the same
/// rows. Every shard checkpointed every epoch and every 25 steps of each
/// worker inside it (`checkpoint_every_steps`: the two workers stop, the
/// shards checkpoint, the workers continue from their cursors). A model
/// field that only the in-process trainer has is rejected by name before
/// anything starts. Expected time: a few seconds on 2 cores.
#[test]
fn gru4rec_trains_through_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    rule_sequences(dir.path());
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, gru4rec_job(dir.path(), "lr = 0.1", 3)).unwrap();
    let out = Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model.lr"), "{err}");
    assert!(
        !dir.path().join("run").exists(),
        "a rejected job started something"
    );

    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        gru4rec_job(dir.path(), "", 3).replace(
            "workers = 2\n",
            "workers = 2\ncheckpoint_every_steps = 25\n",
        ),
    )
    .unwrap();
    let out = ember_train(&job, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    let mid = log.matches("mid-epoch checkpoint").count();
    assert!(mid >= 3, "{mid} mid-epoch checkpoints: {log}");
    assert!(
        stdout.contains("popularity") && stdout.contains("gru4rec"),
        "{stdout}"
    );
    let r = report(dir.path());
    let run = &r["runs"][0];
    let ep = run["epochs"].as_array().unwrap();
    assert_eq!(ep.len(), 3);
    let pop = recall10(&r["baselines"][0]);
    let model = recall10(&run["row"]);
    eprintln!(
        "gru4rec through 2 shards: R@10 {model:.3} (popularity {pop:.3}), losses {:?}",
        ep.iter()
            .map(|e| e["loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    );
    assert_eq!(run["row"]["users"].as_u64(), Some(400));
    assert!(
        model > 0.9 && model > pop + 0.5,
        "R@10 {model} vs popularity {pop}"
    );
    let l0 = ep[0]["loss"].as_f64().unwrap();
    let l2 = ep[2]["loss"].as_f64().unwrap();
    assert!(l2 < l0, "loss {l0} -> {l2}");
    assert!(dir.path().join("run/curves.png").exists());
    for s in 0..2 {
        let d = dir.path().join(format!("run/checkpoints/shard-{s}-of-2"));
        let ckpts = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.ends_with(".ckpt") || name.starts_with("manifest-")
            })
            .count();
        assert!(ckpts >= 2, "{}: {ckpts} checkpoints", d.display());
    }
}

/// `--resume` of a GRU4Rec job continues after its last completed epoch:
/// a run stopped after epoch 1 (`--epochs 1`) and resumed to 3 epochs keeps
/// its epoch-1 record and trains epochs 2 and 3 exactly as the uninterrupted
/// run (1 worker: deterministic). A resume with another seed is refused.
/// Expected time: ~15 s on 2 cores.
#[test]
fn gru4rec_resumes_after_its_last_epoch() {
    let dir = tempfile::tempdir().unwrap();
    rule_sequences(dir.path());
    let one_worker = |d: &std::path::Path| {
        gru4rec_job(dir.path(), "", 3)
            .replace("workers = 2", "workers = 1")
            .replace(
                &format!("{:?}", dir.path().join("run")),
                &format!("{:?}", d.join("run")),
            )
    };
    let clean = dir.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    let job = clean.join("job.toml");
    std::fs::write(&job, one_worker(&clean)).unwrap();
    ember_train(&job, &[]);
    let full = report(&clean);

    let part = dir.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    let job = part.join("job.toml");
    std::fs::write(&job, one_worker(&part)).unwrap();
    ember_train(&job, &["--epochs", "1"]);
    assert_eq!(
        report(&part)["runs"][0]["epochs"].as_array().unwrap().len(),
        1
    );
    let out = Command::new(bin("ember"))
        .args(["train", "--quiet", "--seed", "7", "--resume", "--config"])
        .arg(&job)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("seed 1") && err.contains("seed 7"),
        "{err}"
    );
    ember_train(&job, &["--resume"]);
    let resumed = report(&part);
    let (a, b) = (
        full["runs"][0]["epochs"].as_array().unwrap(),
        resumed["runs"][0]["epochs"].as_array().unwrap(),
    );
    assert_eq!(b.len(), 3);
    for (x, y) in a.iter().zip(b) {
        for key in ["epoch", "loss", "recall", "mrr"] {
            assert_eq!(x[key], y[key], "epoch {}: {key}", x["epoch"]);
        }
    }
    assert_eq!(full["runs"][0]["row"], resumed["runs"][0]["row"]);
}

/// A deterministic GRU4Rec job on [`rule_sequences`] in `data` (1 worker,
/// in-batch negatives: nothing is drawn, so checkpoints change nothing),
/// run directory `d/run`, mid-epoch checkpoints every `every` steps (0:
/// none); returns the job file.
fn gru4rec_det_job(data: &std::path::Path, d: &std::path::Path, every: u64) -> std::path::PathBuf {
    let text = gru4rec_job(data, "", 3)
        .replace("n_sample = 32", "n_sample = 0")
        .replace(
            "workers = 2",
            &format!("workers = 1\ncheckpoint_every_steps = {every}"),
        )
        .replace(
            &format!("{:?}", data.join("run")),
            &format!("{:?}", d.join("run")),
        );
    std::fs::create_dir_all(d).unwrap();
    let job = d.join("job.toml");
    std::fs::write(&job, text).unwrap();
    job
}

/// The `seq_state.json` of a GRU4Rec run, if written yet.
fn seq_state(run: &std::path::Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(run.join("seq_state.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

/// Whether the run has checkpointed inside epoch 2 after >= 20 of its steps.
fn inside_epoch_2(run: &std::path::Path) -> bool {
    seq_state(run).is_some_and(|s| {
        s["partial"]["epoch"] == 2 && s["partial"]["cursors"][0]["steps"].as_u64() >= Some(20)
    })
}

/// Every epoch's loss, Recall@10 and MRR@10 and the final ranking row of
/// two GRU4Rec reports are equal.
fn assert_same_seq_run(a: &serde_json::Value, b: &serde_json::Value, log: &str) {
    let (x, y) = (
        a["runs"][0]["epochs"].as_array().unwrap(),
        b["runs"][0]["epochs"].as_array().unwrap(),
    );
    assert_eq!(x.len(), y.len(), "{log}");
    for (p, q) in x.iter().zip(y) {
        for key in ["epoch", "loss", "recall", "mrr"] {
            assert_eq!(p[key], q[key], "epoch {}: {key} ({log})", p["epoch"]);
        }
    }
    assert_eq!(a["runs"][0]["row"], b["runs"][0]["row"], "{log}");
}

/// Mid-epoch checkpoints of a GRU4Rec job (`checkpoint_every_steps = 10`,
/// ~10 per epoch): the launcher and its shards killed with `kill -9` inside
/// epoch 2, `--resume` continues from the last mid-epoch checkpoint (each
/// worker's batcher position, hidden states and loss so far) and ends with
/// every epoch's loss, Recall@10 and MRR@10, and the final full ranking,
/// equal to a run without mid-epoch checkpoints ([`gru4rec_det_job`]).
/// Expected time: ~20 s on 2 cores.
#[test]
fn gru4rec_resumes_inside_an_epoch_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    rule_sequences(dir.path());
    let job_in = |d: &std::path::Path, every: u64| gru4rec_det_job(dir.path(), d, every);
    let clean = dir.path().join("clean");
    ember_train(&job_in(&clean, 0), &[]);
    let full = report(&clean);
    assert!(!std::fs::read_to_string(clean.join("run/seq_state.json"))
        .unwrap()
        .contains("partial"));

    let part = dir.path().join("part");
    let job = job_in(&part, 10);
    let run = part.join("run");
    let (killed, killed_log) =
        train_killed_when(&job, &[], &part.join("killed.log"), || inside_epoch_2(&run));
    assert!(
        killed,
        "never saw a checkpoint inside epoch 2: {killed_log}"
    );
    let at_kill = seq_state(&run).unwrap();
    assert_eq!(at_kill["epoch"], 1, "{at_kill}");
    assert_eq!(at_kill["partial"]["epoch"], 2, "{at_kill}");
    let done = at_kill["partial"]["cursors"][0]["steps"].as_u64().unwrap();

    let out = ember_train(&job, &["--resume"]);
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(
        log.contains("resumed inside epoch 2"),
        "no mid-epoch resume ({done} steps of epoch 2 done): {log}"
    );
    let resumed = report(&part);
    assert_eq!(resumed["runs"][0]["epochs"].as_array().unwrap().len(), 3);
    assert_same_seq_run(&full, &resumed, &log);
    let end = seq_state(&run).unwrap();
    assert_eq!(end["epoch"], 3);
    assert!(end.get("partial").is_none(), "{end}");
}

/// `kill -9` of a shard of a GRU4Rec job inside epoch 2, after a mid-epoch
/// checkpoint: the launcher restarts the shard, rolls every shard back to
/// that checkpoint (not to epoch 1's end), reruns the worker from its saved
/// cursor, and the job ends exactly like a run without mid-epoch
/// checkpoints ([`gru4rec_det_job`]) with one restart.
/// Expected time: ~20 s on 2 cores.
#[test]
fn gru4rec_recovers_inside_an_epoch_from_a_killed_shard() {
    let dir = tempfile::tempdir().unwrap();
    rule_sequences(dir.path());
    let clean = dir.path().join("clean");
    ember_train(&gru4rec_det_job(dir.path(), &clean, 0), &[]);
    let full = report(&clean);
    // Every epoch has the same steps (all sequences have the same length).
    let total = seq_state(&clean.join("run")).unwrap()["steps"][0]
        .as_u64()
        .unwrap();
    let per_epoch = total / 3;

    let part = dir.path().join("part");
    let job = gru4rec_det_job(dir.path(), &part, 10);
    let run = part.join("run");
    let r = train_signalling_shard_1(&job, &run, "-9", inside_epoch_2);
    assert!(r.sent, "never saw a checkpoint inside epoch 2: {}", r.log);
    assert!(r.status.success(), "{}", r.log);
    let back = rollback_steps(&r.log);
    assert_eq!(back.len(), 1, "{}", r.log);
    // 1 worker: a checkpoint's id is its step; those inside epoch 2 are
    // epoch 1's end plus a multiple of 10.
    assert!(
        back[0] > per_epoch && back[0] < 2 * per_epoch && (back[0] - per_epoch).is_multiple_of(10),
        "rolled back to step {} (epochs of {per_epoch} steps): {}",
        back[0],
        r.log
    );
    let rec = report(&part);
    let restarts: u64 = rec["runs"][0]["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 1, "{}", r.log);
    assert_same_seq_run(&full, &rec, &r.log);
}

/// `kill -9` of a shard of a GRU4Rec job once epoch 1 is recorded: the
/// launcher restarts it from its checkpoint, rolls every shard back to the
/// last epoch's checkpoint, reruns the epoch, and the job ends with every
/// epoch recorded, one restart, and the rule still learned.
/// Expected time: ~10 s on 2 cores.
#[test]
fn gru4rec_recovers_from_a_killed_shard() {
    let dir = tempfile::tempdir().unwrap();
    rule_sequences(dir.path());
    let job = dir.path().join("job.toml");
    std::fs::write(&job, gru4rec_job(dir.path(), "", 8)).unwrap();
    let run = dir.path().join("run");
    let r = train_signalling_shard_1(&job, &run, "-9", |run| run.join("metrics.json").exists());
    assert!(r.sent, "never saw epoch 1: {}", r.log);
    assert!(r.status.success(), "{}", r.log);
    assert_eq!(rollback_steps(&r.log).len(), 1, "{}", r.log);
    let rep = report(dir.path());
    let ep = rep["runs"][0]["epochs"].as_array().unwrap();
    assert_eq!(ep.len(), 8);
    let restarts: u64 = ep.iter().map(|e| e["restarts"].as_u64().unwrap()).sum();
    assert_eq!(restarts, 1, "{}", r.log);
    let model = recall10(&rep["runs"][0]["row"]);
    assert!(model > 0.9, "R@10 {model} after the recovery");
}
