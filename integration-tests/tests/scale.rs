//! The scale job's code path, scaled down to seconds: `ember train` starts two
//! `ps-server` processes with a memory budget (`cluster.shard_max_bytes`),
//! f16 rows and row-wise Adagrad, stores 10^6 prefilled item ids plus the
//! long tail of a synthetic workload, and trains DIN. The full runs (10^8 and
//! 3x10^8 ids) are `scripts/scale-run.sh`, with their numbers in BENCHMARKS.md.
//!
//! Expected run time: ~25 s on 2 cores.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bin;

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn http_get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Sum of the samples of `name` whose labels contain every `want` pair.
fn metric(text: &str, name: &str, want: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if want.iter().all(|w| rest.contains(w)) {
            let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

fn rss_bytes(pid: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

const BUDGET: u64 = 24_000_000;
const PREFILL: u64 = 1_000_000;

#[test]
fn compact_rows_under_a_budget_train_through_shard_processes() {
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.txt");
    run_ok(
        Command::new(bin("ember-data"))
            .args([
                "--quiet",
                "synth",
                "--ids",
                "1000000000",
                "--users",
                "2000",
                "--rows",
                "12000",
                "--cats",
                "100",
                "--out",
            ])
            .arg(&all),
    );
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (train, test) = lines.split_at(10_000);
    let (train_p, test_p) = (dir.path().join("train.txt"), dir.path().join("test.txt"));
    std::fs::write(&train_p, train.join("\n") + "\n").unwrap();
    std::fs::write(&test_p, test.join("\n") + "\n").unwrap();
    let run = dir.path().join("run");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"name = "scale-it"
[model]
kind = "din"
item_dim = 18
cat_dim = 18
[data]
train = {train_p:?}
test = {test_p:?}
batch_size = 128
max_len = 20
[sparse]
optimizer = {{ kind = "rowwise_adagrad", lr = 0.05, initial_accumulator = 0.0 }}
precision = "f16"
mba_lambda = 0.01
count_mode = "online"
[cluster]
shards = 2
workers = 2
mode = "process"
sync = "async"
staleness = 1
shard_max_bytes = {BUDGET}
[train]
epochs = 1
out_dir = {run:?}
prefill_ids = {PREFILL}
max_eval_samples = 2000
"#
        ),
    )
    .unwrap();

    let mut child = Command::new(bin("ember"))
        .args(["train", "--quiet", "--config"])
        .arg(&job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Scrape every shard's /metrics and RSS while the job runs; keep the last.
    let mut last: HashMap<usize, String> = HashMap::new();
    let mut peak_rss: HashMap<usize, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "job did not finish in 240 s");
        let info: serde_json::Value = std::fs::read_to_string(run.join("cluster.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for (i, m) in info["metrics"].as_array().into_iter().flatten().enumerate() {
            if let Some(body) = m.as_str().and_then(http_get) {
                last.insert(i, body);
            }
        }
        for (i, p) in info["pids"].as_array().into_iter().flatten().enumerate() {
            if let Some(r) = p.as_u64().and_then(rss_bytes) {
                let e = peak_rss.entry(i).or_default();
                *e = (*e).max(r);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ember train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(last.len(), 2, "scraped {} shards", last.len());
    let mut stored_or_evicted = 0.0;
    for (i, body) in &last {
        let item = ["table=\"item\""];
        assert_eq!(
            metric(body, "ember_ps_row_bytes", &item),
            Some(56.0),
            "shard {i}: dim 18 f16 + row-wise Adagrad is 56 B"
        );
        let used = metric(body, "ember_ps_budget_used_bytes", &[]).unwrap();
        assert_eq!(
            metric(body, "ember_ps_budget_max_bytes", &[]),
            Some(BUDGET as f64)
        );
        assert!(
            used <= BUDGET as f64 * 1.05,
            "shard {i}: {used} B charged, budget {BUDGET}"
        );
        let evicted = metric(body, "ember_ps_evicted_total", &["reason=\"budget\""]).unwrap_or(0.0);
        let rows = metric(body, "ember_ps_resident_rows", &item).unwrap();
        assert!(evicted > 100_000.0, "shard {i}: {evicted} budget evictions");
        // Near the budget's capacity (~24 MB / 63 B), not far below it.
        assert!(rows > 250_000.0, "shard {i}: {rows} rows resident");
        let per_row = metric(body, "ember_ps_bytes_per_row", &item).unwrap();
        assert!(per_row <= 64.0 * 1.1, "shard {i}: {per_row} B/row all-in");
        stored_or_evicted += rows + evicted;
        let rss = peak_rss.get(i).copied().unwrap_or(0);
        assert!(
            rss < BUDGET + (120 << 20),
            "shard {i}: peak RSS {rss} B with a {BUDGET} B budget"
        );
    }
    assert!(
        stored_or_evicted >= PREFILL as f64,
        "{stored_or_evicted} rows stored or evicted < {PREFILL} prefilled"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    let auc = report["epochs"][0]["test"]["auc"].as_f64().unwrap();
    assert!(auc > 0.5 && auc.is_finite(), "test AUC {auc}");
}
