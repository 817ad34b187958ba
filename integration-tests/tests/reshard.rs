//! Growing (or shrinking) a job's shard count without starting over: a
//! 2-shard run's cluster checkpoint is rewritten by `ember reshard` for 3 and
//! for 1 shards, and `ember train --resume` continues on each.
//!
//! Expected time: ~1.5 min on 2 cores (one 2-epoch run of 30-step epochs,
//! two resumed epochs, three `ember reshard`/`ember checkpoint verify` calls).

use std::process::Command;

use integration_tests::{
    bin, close, dataset, ember_train, epochs, json_f64 as f, report, strip_ansi, write_job,
};

/// Runs `ember <args>`, panicking with its output unless it succeeds.
fn ember(args: &[&str]) -> String {
    let out = Command::new(bin("ember")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ember {args:?} failed: {text}");
    strip_ansi(&text)
}

/// The number after `key=` or `key ` in `text`, if any.
fn number_after(text: &str, key: &str) -> Option<u64> {
    text.split(key)
        .nth(1)?
        .trim_start_matches(['=', ' '])
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A 2-shard job trains 2 epochs (the reference). Its step-30 cluster
/// checkpoint (end of epoch 1) is resharded to 3 and to 1 shards; each is
/// verified offline (every row once: the row count equals the source's) and
/// resumed on that many shard processes for epoch 2. With one worker and
/// staleness 0 the math does not depend on the shard count, so each resumed
/// epoch 2 must equal the reference's epoch 2: the same steps and samples,
/// train loss within relative 1e-5, test GAUC/AUC/logloss within 1e-4.
#[test]
fn resharded_checkpoint_resumes_on_three_and_one_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let train = "epochs = 2\nmax_steps_per_epoch = 30\nmax_eval_samples = 600";
    let src_dir = dir.path().join("two");
    std::fs::create_dir_all(&src_dir).unwrap();
    let cluster =
        "shards = 2\nworkers = 1\nmode = \"process\"\nstaleness = 0\nkeep_checkpoints = 4";
    let job = write_job(&src_dir, &data, "kind = \"din\"", cluster, train);
    ember_train(&job, &[]);
    let full = epochs(&report(&src_dir));
    assert_eq!(full.len(), 2);
    assert_eq!(full[0]["step"], 30);
    let ckpts = src_dir.join("run/checkpoints");
    let verified = ember(&["checkpoint", "verify", ckpts.to_str().unwrap()]);
    assert!(
        verified.contains("complete cluster checkpoints: [0, 30, 60]")
            && verified.ends_with("OK\n"),
        "{verified}"
    );

    let mut source_rows = None;
    for m in [3u32, 1] {
        let out = dir.path().join(format!("ckpt-{m}"));
        let said = ember(&[
            "reshard",
            "--from",
            ckpts.to_str().unwrap(),
            "--to-shards",
            &m.to_string(),
            "--out",
            out.to_str().unwrap(),
            "--step",
            "30",
        ]);
        assert!(said.contains(&format!("from 2 to {m} shards")), "{said}");
        let line = said
            .lines()
            .find(|l| l.starts_with("resharded step 30"))
            .unwrap_or_else(|| panic!("no summary line in: {said}"));
        let rows = line
            .split(" rows")
            .next()
            .and_then(|s| s.rsplit(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no row count in: {said}"));
        // The same rows whatever the target count (each exactly once: the
        // reshard refuses duplicates, and the counts match).
        assert_eq!(*source_rows.get_or_insert(rows), rows, "{said}");
        for i in 0..m {
            assert!(
                out.join(format!("shard-{i}-of-{m}")).is_dir(),
                "{}: no shard-{i}-of-{m}",
                out.display()
            );
        }
        let verified = ember(&["checkpoint", "verify", out.to_str().unwrap()]);
        assert!(
            verified.contains("(latest: 30)") && verified.ends_with("OK\n"),
            "{verified}"
        );

        // Resume epoch 2 on m shard processes from the resharded checkpoint.
        let run_dir = dir.path().join(format!("on-{m}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let cluster = format!(
            "shards = {m}\nworkers = 1\nmode = \"process\"\nstaleness = 0\ncheckpoint_dir = {:?}",
            out
        );
        let job = write_job(&run_dir, &data, "kind = \"din\"", &cluster, train);
        let o = ember_train(&job, &["--resume"]);
        let log = strip_ansi(&String::from_utf8_lossy(&o.stderr));
        assert!(log.contains("resumed from cluster checkpoint"), "{log}");
        assert_eq!(number_after(&log, "step="), Some(30), "{log}");
        let r = report(&run_dir);
        assert_eq!(r["shards"].as_u64(), Some(u64::from(m)), "{r}");
        let e = epochs(&r);
        let e2 = e
            .iter()
            .find(|x| x["epoch"] == 2)
            .unwrap_or_else(|| panic!("no epoch 2 on {m} shards: {r}"));
        assert_eq!(e2["step"], full[1]["step"]);
        assert_eq!(e2["samples"], full[1]["samples"]);
        let (a, b) = (f(&full[1], &["train_loss"]), f(e2, &["train_loss"]));
        assert!(
            close(a, b, 1e-5),
            "epoch-2 train loss on 2 shards {a} vs resharded to {m}: {b}"
        );
        for k in ["gauc", "auc", "logloss"] {
            let (a, b) = (f(&full[1], &["test", k]), f(e2, &["test", k]));
            assert!(
                (a - b).abs() <= 1e-4,
                "epoch-2 test {k} on 2 shards {a} vs resharded to {m}: {b}"
            );
        }
    }
}
