//! Every example job in `configs/` parses, validates and builds its model.

use ember_worker::train::config::JobConfig;
use ember_worker::train::worker::build_job_model;

#[test]
fn example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        if ember_cluster::launcher::is_seq_job(&text) {
            // `ember train` GRU4Rec jobs (e.g. gru4rec_ml100k_cluster.toml).
            let job = ember_cluster::launcher::SeqTrainJob::parse(&text, &name)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(job.job.train.epochs >= 1 && job.data.k >= 1);
            continue;
        }
        if name.starts_with("gru4rec") {
            let job: ember_cluster::seqrec::SeqJob =
                toml::from_str(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(job.epochs >= 1 && job.k >= 1);
            continue;
        }
        if p.extension().is_some_and(|x| x == "toml") {
            let cfg = JobConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let model = build_job_model(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!model.sparse_tables().is_empty());
            for (name, dim) in model.sparse_tables() {
                cfg.sparse.table(&name, dim, cfg.train.seed);
            }
            n += 1;
        }
    }
    assert!(n >= 5, "expected the example configs, found {n}");
}
