//! Declared feature schemas end to end: ordinary tabular files ->
//! `ember-data prepare --config` -> `ember train` on shard processes.

use std::path::Path;
use std::process::Command;

use integration_tests::{
    assert_same_state, bin, checkpoint_state, ember_train, epochs, json_f64 as f, repo_root, skip,
    Prereq,
};

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// A click log whose label depends on the user's profile, the item's genres
/// and the event's context: by day (08:00-19:59 UTC) a user clicks items that
/// have its segment's genre, at night items that have "scifi" (90% each, the
/// rest flipped). The clicked history shows both tastes but not which one
/// applies now: only the `hour` context does. Items have 1-3 genres
/// (space-separated), 600 items, 800 users, 40 impressions each.
fn write_click_logs(dir: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let genres = ["drama", "comedy", "action", "horror", "scifi", "kids"];
    let mut items = String::from("item,genres,price\n");
    let mut item_genres = Vec::new();
    for i in 0..600u64 {
        let n = 1 + next() % 3;
        let g: Vec<usize> = (0..n).map(|_| (next() % 6) as usize).collect();
        let names: Vec<&str> = g.iter().map(|&k| genres[k]).collect();
        items.push_str(&format!("i{i},{},{}\n", names.join(" "), 1 + next() % 50));
        item_genres.push(g);
    }
    let mut users = String::from("user,segment,age\n");
    let mut seg = Vec::new();
    for u in 0..800u64 {
        let s = (next() % 4) as usize;
        seg.push(s);
        users.push_str(&format!("u{u},s{s},{}\n", 18 + next() % 50));
    }
    let mut events = String::from("user,item,ts,clicked\n");
    for (u, &s) in seg.iter().enumerate() {
        for day in 0..40u64 {
            let i = (next() % 600) as usize;
            let hour = next() % 24;
            let wanted = if (8..20).contains(&hour) { s } else { 4 };
            let likes = item_genres[i].contains(&wanted);
            let clicked = likes != (next() % 10 == 0);
            events.push_str(&format!(
                "u{u},i{i},{},{}\n",
                1_600_000_000 + day * 86_400 + hour * 3600 + next() % 3600,
                u8::from(clicked)
            ));
        }
    }
    std::fs::write(dir.join("items.csv"), items).unwrap();
    std::fs::write(dir.join("users.csv"), users).unwrap();
    std::fs::write(dir.join("events.csv"), events).unwrap();
}

const IDS_FEATURES: &str = r#"
[[features]]
name = "item"
kind = "sparse"
group = "ad"
dim = 8

[[features]]
name = "hist_item"
kind = "sparse"
group = "behaviour"
table = "item"
dim = 8
align = "item"
"#;

const PROFILE_FEATURES: &str = r#"
[[features]]
name = "genres"
kind = "multi_hot"
max_len = 3
pooling = "mean"
group = "ad"
table = "genre"
dim = 8

[[features]]
name = "hist_genres"
kind = "multi_hot"
max_len = 3
pooling = "mean"
group = "behaviour"
table = "genre"
dim = 8
align = "genres"

[[features]]
name = "segment"
kind = "sparse"
group = "user"
dim = 4

[[features]]
name = "age"
kind = "dense"
group = "user"
transform = { kind = "log1p" }

[[features]]
name = "price"
kind = "dense"
group = "ad"
transform = { kind = "log1p" }

[[features]]
name = "hour"
kind = "sparse"
group = "context"
dim = 4
column = "ts"
transform = { kind = "hour" }
"#;

fn job(dir: &Path, name: &str, features: &str, cluster: &str, train: &str) -> std::path::PathBuf {
    let text = format!(
        "name = \"{name}\"\n[model]\nkind = \"din\"\nmlp_hidden = [32, 16]\nattention_hidden = [16, 8]\n\
         [data]\ntrain = {train_f:?}\ntest = {test_f:?}\nbatch_size = 64\nmax_len = 20\n\
         [sparse]\noptimizer = {{ kind = \"adam\", lr = 0.01 }}\n[dense]\noptimizer = {{ kind = \"adam\", lr = 0.003 }}\n\
         [cluster]\n{cluster}\n[train]\nout_dir = {out:?}\n{train}\n\
         [prepare]\nevents = {ev:?}\nuser = \"user\"\nitem = \"item\"\ntime = \"ts\"\nlabel = \"clicked\"\n\
         users = {{ path = {us:?}, key = \"user\" }}\nitems = {{ path = {it:?}, key = \"item\" }}\nout = {data:?}\nmax_len = 20\n\
         {features}",
        train_f = dir.join("data/train.txt"),
        test_f = dir.join("data/test.txt"),
        out = dir.join(format!("run-{name}")),
        ev = dir.join("events.csv"),
        us = dir.join("users.csv"),
        it = dir.join("items.csv"),
        data = dir.join("data"),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// A team's own click logs (CSV events with an explicit label, a user table
/// and an item table with a multi-hot genre column): prepared by the full
/// schema, trained on 2 shard processes x 2 workers with the full schema and
/// with the ids only on the same files. The label depends on the segment,
/// the genres and the hour, so the full schema must learn it well and
/// clearly better than the ids.
/// Expected time: ~15 s on 2 cores (prepare, two 3-epoch jobs of 31k rows).
#[test]
fn click_logs_with_profile_and_multi_hot_features_train_on_shards() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_click_logs(d);
    let cluster = "shards = 2\nworkers = 2\nmode = \"process\"\nsync = \"sync\"\nstaleness = 1";
    let train = "epochs = 3";
    let full = job(
        d,
        "full",
        &format!("{IDS_FEATURES}{PROFILE_FEATURES}"),
        cluster,
        train,
    );
    let ids = job(d, "ids", IDS_FEATURES, cluster, train);
    let summary = run_ok(
        Command::new(bin("ember-data"))
            .args(["--quiet", "prepare", "--config"])
            .arg(&full),
    );
    eprintln!("{summary}");
    let header = std::fs::read_to_string(d.join("data/train.txt")).unwrap();
    let header = header.lines().next().unwrap_or_default().to_string();
    for col in [
        "label",
        "user",
        "item",
        "hist_item",
        "genres",
        "hist_genres",
        "segment",
        "age",
        "price",
        "hour",
    ] {
        assert!(
            header.split('\t').any(|c| c == col),
            "column {col} missing: {header}"
        );
    }
    // A feature the prepared files lack: named with the file, before any shard starts.
    let region = "[[features]]\nname = \"region\"\nkind = \"sparse\"\ngroup = \"user\"\ndim = 4\n";
    let bad = job(d, "bad", &format!("{IDS_FEATURES}{region}"), cluster, train);
    let out = Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("feature `region`") && stderr.contains("data/train.txt"),
        "{stderr}"
    );
    assert!(
        !d.join("run-bad/logs/shard-0.log").exists(),
        "a shard was started"
    );
    let mut auc = Vec::new();
    for (name, job) in [("full", &full), ("ids", &ids)] {
        let out = ember_train(job, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("final test"), "{stdout}");
        let p = d.join(format!("run-{name}/metrics.json"));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let e = epochs(&r);
        assert_eq!(e.len(), 3);
        auc.push(f(&e[2], &["test", "auc"]));
    }
    eprintln!("full schema AUC {:.4}, ids only {:.4}", auc[0], auc[1]);
    assert!(
        auc[0] > 0.78,
        "full schema AUC {} (the label is a function of segment, genre and hour)",
        auc[0]
    );
    assert!(auc[0] > auc[1] + 0.08, "full {} vs ids {}", auc[0], auc[1]);
    // The shards held every table of the schema (item, genre, segment).
    let ckpt = d.join("run-full/checkpoints");
    let state = checkpoint_state(&d.join("run-full"), 2, last_step(&ckpt));
    let mut tables: Vec<String> = state
        .iter()
        .flat_map(|s| {
            s.tables
                .iter()
                .filter(|t| !t.1.is_empty())
                .map(|t| t.0.clone())
        })
        .collect();
    tables.sort();
    tables.dedup();
    assert_eq!(tables, ["genre", "hour", "item", "segment"]);
}

/// The highest checkpoint step of a run's checkpoint directory.
fn last_step(ckpt: &Path) -> u64 {
    let mut best = 0;
    for e in std::fs::read_dir(ckpt.join("shard-0-of-2")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".ckpt"))
        {
            best = best.max(n.parse().unwrap_or(0));
        }
    }
    best
}

/// The ids-only schema on files written by `prepare --config` trains exactly
/// like the fixed layout on files written by `prepare --raw-dir` (ML-100k,
/// same seed, 1 worker, staleness 0): the same losses and test metrics, and
/// the same shard state bit for bit. And the fixed-layout job with
/// `worker_threads = 2` trains the same up to float rounding.
/// Expected time: ~1 min on 2 cores (two preparations, three 40-step jobs).
#[test]
fn ids_only_schema_trains_bit_for_bit_like_the_fixed_layout() {
    let raw = repo_root().join("data/ml-100k");
    if !raw.join("ml-100k.user").exists() {
        skip(
            Prereq::Data,
            "data/ml-100k/ml-100k.user absent (run scripts/fetch-ml100k.sh)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_ok(
        Command::new(bin("ember-data"))
            .args(["--quiet", "prepare", "--raw-dir"])
            .arg(&raw)
            .arg("--out")
            .arg(d.join("legacy")),
    );
    let common = |name: &str, data: &str| {
        format!(
            "name = \"{name}\"\n[model]\nkind = \"din\"\n[data]\ntrain = {:?}\ntest = {:?}\n\
             [cluster]\nshards = 1\nworkers = 1\nmode = \"process\"\nstaleness = 0\n\
             [train]\nout_dir = {:?}\nepochs = 1\nmax_steps_per_epoch = 40\nmax_eval_samples = 1000\n",
            d.join(data).join("train.txt"),
            d.join(data).join("test.txt"),
            d.join(format!("run-{name}")),
        )
    };
    let legacy = d.join("legacy.toml");
    std::fs::write(&legacy, common("legacy", "legacy")).unwrap();
    let schema_cfg =
        std::fs::read_to_string(repo_root().join("configs/din_ml100k_ids.toml")).unwrap();
    let features = &schema_cfg[schema_cfg.find("[[features]]").unwrap()..];
    let full_cfg =
        std::fs::read_to_string(repo_root().join("configs/din_ml100k_full.toml")).unwrap();
    let start = full_cfg.find("[prepare]").unwrap();
    let end = full_cfg[start..]
        .find("[[features]]")
        .map_or(full_cfg.len(), |e| start + e);
    let prepare = full_cfg[start..end]
        .replace("data/ml-100k/", &format!("{}/", raw.display()))
        .replace("\"data/ml100k-full\"", &format!("{:?}", d.join("wide")));
    let wide = d.join("wide.toml");
    std::fs::write(
        &wide,
        format!("{}{prepare}\n{features}", common("wide", "wide")),
    )
    .unwrap();
    run_ok(
        Command::new(bin("ember-data"))
            .args(["--quiet", "prepare", "--config"])
            .arg(&wide),
    );
    ember_train(&legacy, &[]);
    ember_train(&wide, &[]);
    let read = |name: &str| -> serde_json::Value {
        let p = d.join(format!("run-{name}/metrics.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (a, b) = (epochs(&read("legacy")), epochs(&read("wide")));
    for key in [
        &["test", "auc"][..],
        &["test", "gauc"],
        &["test", "logloss"],
        &["train_loss"],
    ] {
        assert_eq!(f(&a[0], key), f(&b[0], key), "{key:?}");
    }
    assert_same_state(
        &checkpoint_state(&d.join("run-legacy"), 1, 40),
        &checkpoint_state(&d.join("run-wide"), 1, 40),
        "ids-only schema vs fixed layout",
    );
    // The same legacy job with each step split across two threads inside
    // the worker (`worker_threads = 2`): the same training up to the order of
    // float sums, so close, not bit-equal (the parts' gradients are added).
    let threads = d.join("threads.toml");
    std::fs::write(
        &threads,
        common("threads", "legacy").replace("workers = 1\n", "workers = 1\nworker_threads = 2\n"),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&threads)
        .unwrap()
        .contains("worker_threads = 2"));
    ember_train(&threads, &[]);
    let c = epochs(&read("threads"));
    for (key, tol) in [
        (&["test", "auc"][..], 2e-3),
        (&["test", "logloss"], 2e-3),
        (&["train_loss"], 1e-4),
    ] {
        let (x, y) = (f(&a[0], key), f(&c[0], key));
        assert!(
            (x - y).abs() <= tol,
            "{key:?}: 1 thread {x} vs 2 threads {y}"
        );
    }
    let (one, two) = (
        checkpoint_state(&d.join("run-legacy"), 1, 40),
        checkpoint_state(&d.join("run-threads"), 1, 40),
    );
    let mut compared = 0usize;
    for ((tn, xr, _), (_, yr, _)) in one[0].tables.iter().zip(&two[0].tables) {
        assert_eq!(xr.len(), yr.len(), "table {tn}: rows");
        for (r, q) in xr.iter().zip(yr) {
            assert_eq!(r.0, q.0, "table {tn}: row ids");
            for (p, v) in r.3.iter().zip(&q.3) {
                let (p, v) = (f32::from_bits(*p), f32::from_bits(*v));
                assert!(
                    (p - v).abs() <= 1e-4 * (1.0 + p.abs()),
                    "table {tn} row {}: {p} vs {v}",
                    r.0
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 1000, "{compared} values compared");
}
