//! `ember plan`: how much memory a table of N ids takes per shard and how
//! many shards a job needs, from the store's own layout and growth rules
//! (`ember_ps::sizing`).

use ember_ps::optim::Optimizer;
use ember_ps::row::{RowLayout, WeightPrecision};
use ember_ps::sizing::{plan, shards_needed, Plan, PROCESS_OVERHEAD_BYTES};
use ember_worker::train::config::{OptimizerKind, OptimizerSpec, Precision};
use std::fmt::Write as _;

/// What to size.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    /// Distinct ids stored.
    pub ids: u64,
    /// Embedding width.
    pub dim: usize,
    /// Optimizer kind (as in the job config's `sparse.optimizer.kind`).
    pub optimizer: OptimizerKind,
    /// Weight precision.
    pub precision: Precision,
    /// Storage precision of row-wise Adam's first moment.
    pub moment_precision: Precision,
    /// Size for this many shards ...
    pub shards: Option<u32>,
    /// ... or find the fewest shards that fit this many bytes each.
    pub memory_per_shard: Option<u64>,
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

/// The row layout of a request; the error names the bad argument.
pub fn layout_of(req: &PlanRequest) -> Result<RowLayout, String> {
    let wp = |p: Precision| match p {
        Precision::F32 => WeightPrecision::F32,
        Precision::F16 => WeightPrecision::F16,
        Precision::Bf16 => WeightPrecision::Bf16,
    };
    let (precision, moment) = (wp(req.precision), wp(req.moment_precision));
    if moment != WeightPrecision::F32 && req.optimizer != OptimizerKind::RowwiseAdam {
        return Err(format!(
            "--moment-precision {}: only rowwise_adam keeps a per-coordinate moment that can be stored compact (optimizer is {})",
            req.moment_precision, req.optimizer
        ));
    }
    if req.dim == 0 || req.dim > 4096 {
        return Err(format!("--dim {}: expected 1..=4096", req.dim));
    }
    let spec = OptimizerSpec {
        kind: req.optimizer,
        ..OptimizerSpec::default()
    };
    let proto = spec.to_proto();
    let opt = Optimizer::from_config(Some(&proto)).map_err(|e| e.to_string())?;
    Ok(RowLayout::new(req.dim, opt.state_len(req.dim), precision).with_moment(moment))
}

/// Sizes the request and renders the report.
pub fn run(req: &PlanRequest) -> Result<(Plan, String), String> {
    let layout = layout_of(req)?;
    let p = match (req.shards, req.memory_per_shard) {
        (Some(0), _) => return Err("--shards 0: expected at least 1".into()),
        (Some(s), _) => plan(req.ids, &layout, s),
        (None, Some(m)) => shards_needed(req.ids, &layout, m).ok_or_else(|| {
            format!(
                "{} ids do not fit in 4096 shards of {} each",
                req.ids,
                gib(m as f64)
            )
        })?,
        (None, None) => plan(req.ids, &layout, 1),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "table: {} ids, dim {}, {} weights, {} ({} state values per row, {})",
        req.ids,
        req.dim,
        req.precision,
        req.optimizer,
        layout.state,
        if layout.state_is_f32() {
            "f32".to_string()
        } else {
            format!("first moment {}", layout.moment.name())
        }
    );
    let _ = writeln!(
        out,
        "row: {} B in the arena (key 8, count 4, step 4, state {}, weights {}), {:.1} B/row all-in with the index",
        p.row_bytes,
        4 * layout.state_words,
        p.row_bytes as usize - 16 - 4 * layout.state_words,
        p.bytes_per_row
    );
    let _ = writeln!(
        out,
        "shards: {}{}",
        p.shards,
        match req.memory_per_shard {
            Some(m) if req.shards.is_none() =>
                format!(" (the fewest whose process fits in {})", gib(m as f64)),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "per shard: {} rows, table {}, process ~{} (table + {} MiB runtime)",
        p.rows_per_shard,
        gib(p.table_bytes_per_shard as f64),
        gib(p.process_bytes_per_shard as f64),
        PROCESS_OVERHEAD_BYTES >> 20
    );
    let _ = writeln!(
        out,
        "a full checkpoint writes ~{} per shard (f32 values on disk); set [cluster] shard_max_bytes to cap a shard",
        gib((p.rows_per_shard * (20 + 4 * (layout.dim + layout.state) as u64)) as f64)
    );
    Ok((p, out))
}

/// One table of a job plan: its name, ids, row layout and its share.
#[derive(Debug, Clone, PartialEq)]
pub struct JobTablePlan {
    /// Table name.
    pub table: String,
    /// Distinct ids the table will hold.
    pub ids: u64,
    /// The table sized alone at the job's shard count.
    pub plan: Plan,
}

/// Parses `--ids` of a job plan: `table=N` pairs separated by commas.
pub fn parse_table_ids(text: &str) -> Result<Vec<(String, u64)>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (t, n) = p
                .split_once('=')
                .ok_or_else(|| format!("--ids {p:?}: expected table=N"))?;
            let n = n
                .trim()
                .replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("--ids {p:?}: {e}"))?;
            Ok((t.trim().to_string(), n))
        })
        .collect()
}

/// Sizes every sparse table of a job (its schema's tables, or item, cat and
/// user) with each table's own optimizer and precision (`[sparse]` and
/// `[sparse.tables.<name>]`), over `shards` shards or the fewest whose
/// processes fit `memory_per_shard`. Ids per table come from `ids`, else
/// from the job's counts file (distinct ids of the counting pass); a table
/// with neither is named in the error.
pub fn run_job(
    cfg: &ember_worker::train::config::JobConfig,
    ids: &[(String, u64)],
    shards: Option<u32>,
    memory_per_shard: Option<u64>,
) -> Result<(u32, Vec<JobTablePlan>, String), String> {
    let tables = cfg.model.tables();
    if let Some((t, _)) = ids
        .iter()
        .find(|(t, _)| !tables.iter().any(|(n, _)| n == t))
    {
        return Err(format!(
            "--ids: the job has no table {t:?} (its tables: {})",
            tables
                .iter()
                .map(|t| t.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let counts = match &cfg.data.counts {
        Some(p) if p.exists() => {
            Some(ember_worker::data::counts::load_counts(p).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let mut sized = Vec::new();
    for (name, dim) in &tables {
        let n = match ids.iter().find(|(t, _)| t == name) {
            Some((_, n)) => *n,
            None => counts
                .as_ref()
                .and_then(|c| c.get(name))
                .map(|v| v.len() as u64)
                .ok_or_else(|| {
                    format!("table {name:?}: give its ids (--ids {name}=N) or a counts file ([data] counts)")
                })?,
        };
        let tc = cfg.sparse.table(name, *dim, cfg.train.seed);
        let spec = ember_ps::store::TableSpec::from_config(tc)
            .map_err(|e| format!("table {name:?}: {e}"))?;
        sized.push((name.clone(), n, spec.layout()));
    }
    let total = |s: u32| -> u64 {
        sized
            .iter()
            .map(|(_, n, l)| plan(*n, l, s).table_bytes_per_shard)
            .sum::<u64>()
            + PROCESS_OVERHEAD_BYTES
    };
    let s = match (shards, memory_per_shard) {
        (Some(0), _) => return Err("--shards 0: expected at least 1".into()),
        (Some(s), _) => s,
        (None, Some(m)) => (1..=4096u32).find(|&s| total(s) <= m).ok_or_else(|| {
            format!(
                "the job's tables do not fit in 4096 shards of {}",
                gib(m as f64)
            )
        })?,
        (None, None) => 1,
    };
    let mut out = String::new();
    let mut rows = Vec::new();
    let _ = writeln!(out, "| table | ids | dim | optimizer, precision | B/row all-in | per shard |\n|---|---|---|---|---|---|");
    for ((name, n, layout), (_, dim)) in sized.iter().zip(&tables) {
        let p = plan(*n, layout, s);
        let opt = cfg
            .sparse
            .tables
            .get(name)
            .and_then(|o| o.optimizer.as_ref())
            .unwrap_or(&cfg.sparse.optimizer);
        let prec = cfg
            .sparse
            .tables
            .get(name)
            .and_then(|o| o.precision)
            .unwrap_or(cfg.sparse.precision);
        let _ = writeln!(
            out,
            "| {name} | {n} | {dim} | {}, {} | {:.1} | {} |",
            opt.kind,
            prec,
            p.bytes_per_row,
            gib(p.table_bytes_per_shard as f64)
        );
        rows.push(JobTablePlan {
            table: name.clone(),
            ids: *n,
            plan: p,
        });
    }
    let _ = writeln!(
        out,
        "shards: {s}{}; per shard: tables {} + {} MiB runtime = process ~{}",
        match memory_per_shard {
            Some(m) if shards.is_none() =>
                format!(" (the fewest whose process fits in {})", gib(m as f64)),
            _ => String::new(),
        },
        gib((total(s) - PROCESS_OVERHEAD_BYTES) as f64),
        PROCESS_OVERHEAD_BYTES >> 20,
        gib(total(s) as f64)
    );
    Ok((s, rows, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ember plan --config`: every table of the full ML-100k schema with
    /// its own optimizer and precision; the item table as compact rows.
    #[test]
    fn a_job_is_sized_table_by_table() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/din_ml100k_full.toml"),
        )
        .unwrap()
        .replace("counts = \"data/ml100k-full/counts.bin\"", "")
        .replace(
            "[dense]\n",
            "[sparse.tables.item]\noptimizer = { kind = \"rowwise_adagrad\", lr = 0.05 }\nprecision = \"f16\"\n\n[dense]\n",
        );
        let cfg = ember_worker::train::config::JobConfig::parse(&text, "full").unwrap();
        let e = run_job(&cfg, &[("item".into(), 1000)], Some(2), None).unwrap_err();
        assert!(
            e.contains("table \"user\"") && e.contains("--ids user=N"),
            "{e}"
        );
        let e = run_job(&cfg, &[("shop".into(), 5)], Some(2), None).unwrap_err();
        assert!(e.contains("no table \"shop\""), "{e}");
        let mut ids: Vec<(String, u64)> = cfg
            .model
            .tables()
            .iter()
            .map(|(t, _)| (t.clone(), 1000))
            .collect();
        for (t, n) in ids.iter_mut() {
            if t == "item" {
                *n = 300_000_000;
            }
        }
        let (s, rows, text) = run_job(&cfg, &ids, None, Some(8 << 30)).unwrap();
        assert_eq!(rows.len(), cfg.model.tables().len());
        let item = rows.iter().find(|r| r.table == "item").unwrap();
        assert_eq!(item.plan.row_bytes, 56, "f16 + rowwise Adagrad, dim 18");
        let user = rows.iter().find(|r| r.table == "user").unwrap();
        assert!(
            user.plan.row_bytes > item.plan.row_bytes,
            "f32 Adam rows are wider"
        );
        // The fewest shards: one fewer would not fit.
        let fits = |s: u32| {
            run_job(&cfg, &ids, Some(s), None)
                .unwrap()
                .1
                .iter()
                .map(|r| r.plan.table_bytes_per_shard)
                .sum::<u64>()
                + PROCESS_OVERHEAD_BYTES
                <= 8 << 30
        };
        assert!(s > 1 && fits(s) && !fits(s - 1), "{s}: {text}");
        assert!(
            text.contains("| item | 300000000 | 18 | rowwise_adagrad, f16 |"),
            "{text}"
        );
    }

    fn req(shards: Option<u32>, mem: Option<u64>) -> PlanRequest {
        PlanRequest {
            ids: 100_000_000,
            dim: 18,
            optimizer: OptimizerKind::RowwiseAdagrad,
            precision: Precision::F16,
            moment_precision: Precision::F32,
            shards,
            memory_per_shard: mem,
        }
    }

    #[test]
    fn compact_rows_fit_the_aim() {
        let (p, text) = run(&req(Some(2), None)).unwrap();
        assert_eq!(p.row_bytes, 56);
        assert!(p.bytes_per_row <= 64.0, "{p:?}");
        assert!(text.contains("56 B in the arena"), "{text}");
    }

    #[test]
    fn memory_per_shard_gives_the_fewest_shards() {
        let (p, _) = run(&req(None, Some(4 << 30))).unwrap();
        assert!(p.process_bytes_per_shard <= 4 << 30);
        assert!(p.shards >= 2);
    }

    #[test]
    fn bad_arguments_are_named() {
        // Unknown kinds are refused when the flags are parsed.
        let e = "f8".parse::<Precision>().unwrap_err();
        assert!(e.contains("\"f8\"") && e.contains("f32, f16, bf16"), "{e}");
        let e = "lbfgs".parse::<OptimizerKind>().unwrap_err();
        assert!(e.contains("lbfgs") && e.contains("rowwise_adagrad"), "{e}");
        let mut r = req(Some(1), None);
        r.dim = 0;
        assert!(run(&r).unwrap_err().contains("--dim 0"));
        assert!(run(&req(Some(0), None)).unwrap_err().contains("--shards 0"));
        // A compact moment needs row-wise Adam.
        let mut r = req(Some(1), None);
        r.moment_precision = Precision::F16;
        assert!(run(&r).unwrap_err().contains("--moment-precision f16"));
    }

    /// Row-wise Adam with an f16 first moment: 4 header + 3 scalar + 9 moment
    /// + 9 weight words = 100 B, against 136 B with an f32 moment.
    #[test]
    fn an_f16_moment_shrinks_rowwise_adam_rows() {
        let mut r = req(Some(1), None);
        r.optimizer = OptimizerKind::RowwiseAdam;
        assert_eq!(run(&r).unwrap().0.row_bytes, 136);
        r.moment_precision = Precision::F16;
        let (p, text) = run(&r).unwrap();
        assert_eq!(p.row_bytes, 100);
        assert!(text.contains("state 48"), "{text}");
    }
}
