//! Preparing a parameter server for a job: sparse tables, exact feature
//! counts n_j (for MBA), and the dense parameters with their initial values.

use std::io::{BufRead, BufReader};
use std::path::Path;

use super::backend::Backend;
use super::config::JobConfig;
use super::worker::build_job_model;
use super::TrainError;
use crate::data::counts;
use crate::data::reader::SampleReader;

/// Number of samples of a sample file: its lines, less the header line of a
/// schema file (the launcher splits steps evenly).
pub fn count_rows(path: &Path) -> Result<u64, TrainError> {
    let f = std::fs::File::open(path).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut n = 0u64;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut first = true;
    loop {
        let buf = r.fill_buf().map_err(|e| TrainError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if buf.is_empty() {
            break;
        }
        if first && crate::data::schema_format::is_header(buf) {
            n = n.wrapping_sub(1);
        }
        first = false;
        n = n.wrapping_add(buf.iter().filter(|b| **b == b'\n').count() as u64);
        let len = buf.len();
        r.consume(len);
    }
    Ok(n)
}

/// Reads the first sample of the training and test files the way the
/// workers will (the job's schema, header mapped by name), so that a file
/// of the wrong format, a schema feature missing from a file or a malformed
/// first line stop the job before any shard starts.
pub fn check_data(cfg: &JobConfig) -> Result<(), TrainError> {
    for path in [&cfg.data.train, &cfg.data.test] {
        SampleReader::open(std::slice::from_ref(path), 0, 1, false)
            .and_then(|r| r.with_schema(cfg.schema()).with_negatives(false).read())
            .map_err(TrainError::Data)?;
    }
    Ok(())
}

/// Creates the model's sparse tables, loads exact counts when the job asks
/// for them, and registers the dense parameters and state (existing dense
/// values are kept, so re-running setup against a trained cluster is safe).
pub async fn setup_cluster(cfg: &JobConfig, ps: &Backend) -> Result<(), TrainError> {
    let model = build_job_model(cfg)?;
    let tables = model.sparse_tables();
    for (name, dim) in &tables {
        ps.create_table(&cfg.sparse.table(name, *dim, cfg.train.seed))
            .await?;
    }
    if cfg.sparse.count_mode == super::config::CountMode::Exact {
        let all = match &cfg.data.counts {
            Some(p) => counts::load_counts(p).map_err(TrainError::Data)?,
            None => count_in_memory(cfg)?,
        };
        for (name, _) in &tables {
            let Some(c) = all.get(name) else {
                return Err(TrainError::DataMismatch(format!(
                    "the counts have no table {name:?}"
                )));
            };
            ps.load_counts(name, c).await?;
        }
    }
    let mut dense = model.dense_params();
    dense.extend(model.dense_state());
    ps.init_dense(&dense, &cfg.dense.optimizer.to_proto())
        .await?;
    if cfg.train.prefill_ids > 0 {
        let Some((_, dim)) = tables.iter().find(|(n, _)| *n == cfg.train.prefill_table) else {
            return Err(TrainError::Config(format!(
                "train.prefill_table = {:?}: the model has no such table (it has {:?})",
                cfg.train.prefill_table,
                tables
                    .iter()
                    .map(|(n, _)| n.to_string())
                    .collect::<Vec<_>>()
            )));
        };
        prefill(ps, &cfg.train.prefill_table, *dim, cfg.train.prefill_ids).await?;
    }
    Ok(())
}

/// After a restore (`--resume`): the job's tables must equal the restored
/// ones. `CreateTable` with the job's config is a no-op for an identical
/// table and an INVALID_ARGUMENT naming the differing fields (e.g.
/// `precision: existing f32, requested f16`) otherwise, before any step runs.
pub async fn check_restored_tables(cfg: &JobConfig, ps: &Backend) -> Result<(), TrainError> {
    let model = build_job_model(cfg)?;
    for (name, dim) in &model.sparse_tables() {
        ps.create_table(&cfg.sparse.table(name, *dim, cfg.train.seed))
            .await?;
    }
    Ok(())
}

/// Ids per prefill push.
const PREFILL_BATCH: u64 = 65_536;
/// Prefill pushes in flight at once (so both shards and the client work).
const PREFILL_IN_FLIGHT: usize = 4;

/// Stores the rows of ids `1..=n` of `table` by pushing a zero gradient at
/// step 0 (the rows keep their initial values; online counts become 1).
async fn prefill(ps: &Backend, table: &str, dim: usize, n: u64) -> Result<(), TrainError> {
    use futures_util::{StreamExt, TryStreamExt};
    let t0 = std::time::Instant::now();
    let zeros = vec![0.0f32; PREFILL_BATCH as usize * dim];
    let ones = vec![1u32; PREFILL_BATCH as usize];
    let starts = (0..n.div_ceil(PREFILL_BATCH)).map(|b| 1 + b * PREFILL_BATCH);
    futures_util::stream::iter(starts)
        .map(|start| {
            let (zeros, ones) = (&zeros, &ones);
            async move {
                let end = (start + PREFILL_BATCH - 1).min(n);
                let ids: Vec<u64> = (start..=end).collect();
                ps.push(
                    table,
                    &ids,
                    &zeros[..ids.len() * dim],
                    &ones[..ids.len()],
                    0,
                )
                .await?;
                if end.is_multiple_of(PREFILL_BATCH * 256) {
                    tracing::info!(table, rows = end, of = n, "prefill");
                }
                Ok::<(), TrainError>(())
            }
        })
        .buffer_unordered(PREFILL_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        table,
        rows = n,
        secs,
        rows_per_s = n as f64 / secs.max(1e-9),
        "prefill done"
    );
    Ok(())
}

/// Counts n_j over the training file without writing a counts file.
fn count_in_memory(cfg: &JobConfig) -> Result<counts::TableCounts, TrainError> {
    let mut reader = SampleReader::open(
        std::slice::from_ref(&cfg.data.train),
        0,
        1,
        cfg.data.skip_malformed,
    )
    .map_err(TrainError::Data)?
    .with_schema(cfg.schema())
    .with_negatives(false);
    let mut counter = match cfg.schema() {
        Some(schema) => counts::Counter::with_schema(cfg.data.max_len, false, schema),
        None => counts::Counter::new(cfg.data.max_len, false),
    };
    while let Some(s) = reader.read().map_err(TrainError::Data)? {
        counter.add(&s);
        reader.recycle(s);
    }
    Ok(counter.finish())
}
