//! `ember export` and `ember predict`.
//!
//! An exported model is a self-contained directory:
//! ```text
//! <dir>/job.toml                      the job config (model, dims, data options)
//! <dir>/manifest.json                 step, shard count, format version
//! <dir>/checkpoints/shard-<i>-of-<n>/step-<s>.ckpt
//!                                     every shard's checkpoint at that step: the
//!                                     trained embedding rows, dense parameters,
//!                                     Dice running statistics, table configs
//! ```
//! `predict` loads it into in-process shards (no cluster, no network) and
//! scores a sample file, one probability per line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_worker::train::backend::Backend;
use ember_worker::train::config::JobConfig;
use ember_worker::train::eval::{evaluate, EvalResult};
use ember_worker::train::local::LocalPs;
use serde::{Deserialize, Serialize};

use crate::ClusterError;

/// Version of the export layout.
pub const EXPORT_VERSION: u32 = 1;

/// `manifest.json` of an exported model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Export layout version.
    pub version: u32,
    /// Checkpoint step exported.
    pub step: u64,
    /// Number of shards the checkpoints were written by.
    pub shards: usize,
    /// Model kind.
    pub model: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |e| ClusterError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// The shard checkpoint directories under `ckpt` (`shard-<i>-of-<n>`), by index.
fn shard_dirs(ckpt: &Path) -> Result<Vec<PathBuf>, ClusterError> {
    let mut dirs: Vec<(usize, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(ckpt).map_err(io(ckpt))? {
        let e = e.map_err(io(ckpt))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix("shard-") {
            if let Some((i, _)) = rest.split_once("-of-") {
                if let Ok(i) = i.parse() {
                    dirs.push((i, e.path()));
                }
            }
        }
    }
    dirs.sort();
    Ok(dirs.into_iter().map(|d| d.1).collect())
}

/// Exports the job's cluster checkpoint at `step` (None = the latest step
/// every shard has) into `out`.
pub async fn export(
    cfg: &JobConfig,
    config_path: &Path,
    step: Option<u64>,
    out: &Path,
) -> Result<Manifest, ClusterError> {
    let ckpt = cfg.checkpoint_dir();
    let dirs = shard_dirs(&ckpt)?;
    if dirs.is_empty() {
        return Err(ClusterError::Launch(format!(
            "no shard checkpoints under {}",
            ckpt.display()
        )));
    }
    let n = dirs.len();
    let ps = LocalPs::new(n, Some(ckpt.clone()))?;
    let common = ps.common_checkpoints().await?;
    let step = match step {
        Some(s) if common.contains(&s) => s,
        Some(s) => {
            return Err(ClusterError::Launch(format!(
                "no complete checkpoint at step {s} (have {common:?})"
            )))
        }
        None => *common.last().ok_or_else(|| {
            ClusterError::Launch(format!("no complete checkpoint under {}", ckpt.display()))
        })?,
    };
    // Verify the checkpoint loads before copying it.
    ps.restore(step).await?;
    let out_ckpt = out.join("checkpoints");
    for (i, d) in dirs.iter().enumerate() {
        let name = d.file_name().map(|s| s.to_os_string()).unwrap_or_default();
        let target = out_ckpt.join(name);
        std::fs::create_dir_all(&target).map_err(io(&target))?;
        let file = format!("step-{step}.ckpt");
        let src = d.join(&file);
        std::fs::copy(&src, target.join(&file)).map_err(io(&src))?;
        tracing::debug!(shard = i, "exported {}", src.display());
    }
    let job = out.join("job.toml");
    std::fs::copy(config_path, &job).map_err(io(&job))?;
    let manifest = Manifest {
        version: EXPORT_VERSION,
        step,
        shards: n,
        model: format!("{:?}", cfg.model.kind).to_lowercase(),
    };
    // Written last and atomically: a directory with a manifest is complete.
    let mpath = out.join("manifest.json");
    let body = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ClusterError::Report(format!("{}: {e}", mpath.display())))?;
    ember_proto::atomic::write_atomic(&mpath, |f| std::io::Write::write_all(f, &body))?;
    Ok(manifest)
}

/// Scores `input` with the exported model in `dir`; writes one probability
/// per line to `output` and returns the metrics (labels are read from the file).
pub async fn predict(dir: &Path, input: &Path, output: &Path) -> Result<EvalResult, ClusterError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| ClusterError::Report(format!("{}: {e}", mpath.display())))?;
    if manifest.version != EXPORT_VERSION {
        return Err(ClusterError::Report(format!(
            "{}: export version {} (this build reads {EXPORT_VERSION})",
            mpath.display(),
            manifest.version
        )));
    }
    let mut cfg = JobConfig::load(&dir.join("job.toml"))?;
    cfg.cluster.checkpoint_dir = Some(dir.join("checkpoints"));
    let ps = LocalPs::new(manifest.shards, Some(dir.join("checkpoints")))?;
    ps.restore(manifest.step).await?;
    let backend = Backend::Local(Arc::new(ps));
    let (result, probs) = evaluate(&cfg, &backend, input, None).await?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(output).map_err(io(output))?);
    for p in probs {
        writeln!(f, "{p}").map_err(io(output))?;
    }
    f.flush().map_err(io(output))?;
    Ok(result)
}
