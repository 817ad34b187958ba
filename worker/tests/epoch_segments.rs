//! `WorkerJob::skip_steps`: an epoch run as two segments (steps 0..5, then
//! `skip_steps = 5` for the rest) against in-process shards trains exactly
//! like the whole epoch in one go (staleness 0: deterministic): the reader
//! resumes the epoch's shuffle at the right sample and the global steps
//! continue from `start_step + skip_steps`.

use std::sync::{Arc, Mutex};

use ember_worker::data::synth::{write_synth, SynthOptions};
use ember_worker::train::backend::Backend;
use ember_worker::train::config::JobConfig;
use ember_worker::train::local::LocalPs;
use ember_worker::train::setup::setup_cluster;
use ember_worker::train::worker::{run_epoch, Progress, WorkerJob};

/// Per-step losses of running `segments` (skip_steps, steps) one after the
/// other on fresh in-process shards.
async fn losses(cfg: &JobConfig, segments: &[(u64, u64)]) -> Vec<f64> {
    let ps = Backend::Local(Arc::new(LocalPs::new(2, None).expect("local shards")));
    setup_cluster(cfg, &ps).await.expect("setup");
    let seen = Arc::new(Mutex::new(Vec::new()));
    for &(skip, steps) in segments {
        let job = WorkerJob {
            config: cfg.clone(),
            worker_index: 0,
            num_workers: 1,
            epoch: 1,
            start_step: 0,
            skip_steps: skip,
            steps: Some(steps),
        };
        let s = seen.clone();
        let emit = move |p: &Progress| s.lock().expect("lock").push(p.loss);
        let r = run_epoch(&job, &ps, &emit).await.expect("run_epoch");
        assert_eq!(r.steps, steps, "segment ({skip}, {steps})");
    }
    let v = seen.lock().expect("lock").clone();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segmented_epoch_trains_like_the_whole_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train = dir.path().join("train.txt");
    write_synth(
        &SynthOptions {
            n_ids: 2_000,
            n_users: 200,
            n_rows: 1_000,
            n_cats: 20,
            max_hist: 20,
            ..SynthOptions::default()
        },
        &train,
    )
    .expect("synthetic data");
    let text = format!(
        "[model]\nkind = \"din\"\nitem_dim = 8\ncat_dim = 8\n\
         [data]\ntrain = {train:?}\ntest = {train:?}\nbatch_size = 32\nmax_len = 20\nshuffle_buffer = 300\n\
         [sparse]\ncount_mode = \"none\"\n\
         [cluster]\nworkers = 1\nstaleness = 0\n\
         [train]\nlog_every = 1\n"
    );
    let cfg = JobConfig::parse(&text, "segments test").expect("config");
    let whole = losses(&cfg, &[(0, 12)]).await;
    let parts = losses(&cfg, &[(0, 5), (5, 7)]).await;
    assert_eq!(whole.len(), 12);
    assert_eq!(parts.len(), 12);
    for (i, (a, b)) in whole.iter().zip(&parts).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "step {i}: whole epoch loss {a} vs segmented {b}"
        );
    }
}
