//! `ember reshard --from <dir> --to-shards M --out <dir>` (offline): turns
//! an N-shard cluster checkpoint (bases and deltas) into an equivalent
//! M-shard one. Every row, pending count and dense parameter goes to the
//! shard the workers route it to (`ember_proto::Router`, the same function
//! the shards check ownership with); each output shard gets one base.

use crate::ckpt_verify::shard_dirs;
use ember_proto::v1::TableConfig;
use ember_proto::{Router, NUM_BUCKETS};
use ember_ps::checkpoint::{self, Visitor};
use ember_ps::ckpt_chain::{self, Manifest};
use ember_ps::dense::DenseEntry;
use ember_ps::store::{Table, TableSpec};
use ember_ps::PsError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `reshard` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReshardReport {
    /// The step of the checkpoint.
    pub step: u64,
    /// Shards read.
    pub from_shards: u32,
    /// Shards written.
    pub to_shards: u32,
    /// Sparse rows written (over all output shards).
    pub rows: u64,
    /// Dense parameters written.
    pub dense: usize,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Collects what routes to output shard `dest`.
struct RouteSink {
    dest: u32,
    router: Router,
    tables: BTreeMap<String, Arc<Table>>,
    cur: Option<(String, Arc<Table>)>,
    dense: BTreeMap<String, DenseEntry>,
    dense_step: u64,
    src_has_dense: bool,
    dense_step_with_params: Option<u64>,
    configs: BTreeMap<String, TableConfig>,
}

impl Visitor for RouteSink {
    fn table(&mut self, spec: &TableSpec) -> ember_ps::Result<()> {
        let name = spec.name().to_string();
        if let Some(c) = self.configs.get(&name) {
            if *c != spec.config {
                return Err(PsError::invalid(format!(
                    "table `{name}` has different configs on different shards"
                )));
            }
        }
        self.configs.insert(name.clone(), spec.config.clone());
        let t = self
            .tables
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Table::new(spec.clone())))
            .clone();
        self.cur = Some((name, t));
        Ok(())
    }
    fn row(&mut self, id: u64, count: u32, step: u64, vals: &[f32]) -> ember_ps::Result<()> {
        if let Some((name, t)) = &self.cur {
            if self.router.shard_of(name, id) == self.dest {
                t.put_row(id, count, step, vals)?;
            }
        }
        Ok(())
    }
    fn pending(&mut self, id: u64, count: u32) -> ember_ps::Result<()> {
        if let Some((name, t)) = &self.cur {
            if self.router.shard_of(name, id) == self.dest {
                t.put_pending(id, count);
            }
        }
        Ok(())
    }
    fn dense(&mut self, name: String, entry: DenseEntry) -> ember_ps::Result<()> {
        self.src_has_dense = true;
        if self.router.shard_of_dense(&name) == self.dest {
            self.dense.insert(name, entry);
        }
        Ok(())
    }
    fn dense_step(&mut self, step: u64) -> ember_ps::Result<()> {
        self.dense_step = self.dense_step.max(step);
        if self.src_has_dense {
            let s = self.dense_step_with_params.get_or_insert(step);
            *s = (*s).max(step);
        }
        Ok(())
    }
}

/// Reads the N-shard cluster checkpoint under `from` at `step` (default:
/// the latest step every shard can restore) and writes an M-shard one under
/// `out`, which must not exist yet (it is built in `<out>.partial` and
/// renamed at the end, so a failure leaves no `out`). Every source chain is
/// fully verified before anything is written; nothing under `from` changes.
pub fn reshard(
    from: &Path,
    to_shards: u32,
    out: &Path,
    step: Option<u64>,
) -> Result<ReshardReport, String> {
    if to_shards == 0 || u64::from(to_shards) > NUM_BUCKETS {
        return Err(format!(
            "--to-shards {to_shards}: must be in 1..={NUM_BUCKETS}"
        ));
    }
    if out.exists() {
        return Err(format!(
            "--out {}: already exists (reshard writes a new directory and never overwrites)",
            out.display()
        ));
    }
    let (n, dirs) = shard_dirs(from).map_err(|e| format!("--from {e}"))?;
    let mut chains: Vec<(PathBuf, Manifest)> = Vec::new();
    let step = match step {
        Some(s) => s,
        None => {
            let mut common: Option<Vec<u64>> = None;
            for (i, d) in &dirs {
                let (good, _) = ckpt_chain::list(d, *i, n).map_err(|e| e.to_string())?;
                let steps: Vec<u64> = good.iter().map(|m| m.step).collect();
                common = Some(match common {
                    None => steps,
                    Some(c) => c.into_iter().filter(|s| steps.contains(s)).collect(),
                });
            }
            common.and_then(|c| c.last().copied()).ok_or_else(|| {
                format!(
                    "--from {}: no step that every shard can restore",
                    from.display()
                )
            })?
        }
    };
    for (i, d) in &dirs {
        let m = ckpt_chain::chain_of(d, *i, n, step).map_err(|e| e.to_string())?;
        ckpt_chain::verify_chain(d, &m).map_err(|e| e.to_string())?;
        chains.push((d.clone(), m));
    }
    let staging = PathBuf::from(format!("{}.partial", out.display()));
    if staging.exists() {
        return Err(format!(
            "{} exists (left by an interrupted reshard?): remove it first",
            staging.display()
        ));
    }
    let router = Router::new(to_shards);
    let mut report = ReshardReport {
        step,
        from_shards: n,
        to_shards,
        rows: 0,
        dense: 0,
        files: Vec::new(),
    };
    let written = (|| -> Result<(), String> {
        for dest in 0..to_shards {
            let mut sink = RouteSink {
                dest,
                router,
                tables: BTreeMap::new(),
                cur: None,
                dense: BTreeMap::new(),
                dense_step: 0,
                src_has_dense: false,
                dense_step_with_params: None,
                configs: BTreeMap::new(),
            };
            for (d, m) in &chains {
                sink.src_has_dense = false;
                ckpt_chain::restore_chain(d, m, &mut sink, || {}).map_err(|e| e.to_string())?;
            }
            let tables: Vec<Arc<Table>> = sink.tables.values().cloned().collect();
            let dense_step = if sink.dense.is_empty() {
                sink.dense_step
            } else {
                sink.dense_step_with_params.unwrap_or(sink.dense_step)
            };
            let dir = checkpoint::shard_dir(&staging, dest, to_shards);
            let info = checkpoint::write(
                &dir,
                dest,
                to_shards,
                step,
                &tables,
                &sink.dense,
                dense_step,
            )
            .map_err(|e| e.to_string())?;
            report.rows += info.rows;
            report.dense += sink.dense.len();
            report
                .files
                .push(out.join(info.path.strip_prefix(&staging).unwrap_or(&info.path)));
        }
        std::fs::rename(&staging, out)
            .map_err(|e| format!("renaming {} to {}: {e}", staging.display(), out.display()))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::v1::*;
    use ember_ps::{DenseTensor, Shard, ShardConfig};

    fn cfg(name: &str, ttl: u64) -> TableConfig {
        TableConfig {
            name: name.into(),
            dim: 3,
            init: Some(Initializer {
                kind: initializer::Kind::Uniform as i32,
                scale: 0.05,
            }),
            seed: 5,
            optimizer: Some(OptimizerConfig {
                kind: Some(optimizer_config::Kind::Adagrad(Adagrad {
                    lr: 0.1,
                    initial_accumulator: 0.1,
                    eps: 1e-8,
                })),
            }),
            count_mode: CountMode::CountOnline as i32,
            admit_min_count: 2,
            ttl_steps: ttl,
            ..Default::default()
        }
    }

    fn cluster(root: &Path, n: u32) -> Vec<Shard> {
        (0..n)
            .map(|i| {
                Shard::new(ShardConfig {
                    shard_index: i,
                    num_shards: n,
                    checkpoint_dir: Some(root.to_path_buf()),
                    ..Default::default()
                })
                .unwrap()
            })
            .collect()
    }

    const PARAMS: [&str; 6] = ["a.w", "a.b", "b.w", "b.b", "c.w", "c.b"];

    fn setup(shards: &[Shard]) {
        let n = shards.len() as u32;
        let r = Router::new(n);
        for s in shards {
            s.create_table(cfg("item", 40)).unwrap();
            s.create_table(cfg("user", 0)).unwrap();
        }
        for (k, p) in PARAMS.iter().enumerate() {
            let owner = &shards[r.shard_of_dense(p) as usize];
            owner
                .init_dense(&[DenseTensor::new(*p, vec![k as f32; 4])], None)
                .unwrap();
        }
    }

    fn push(shards: &[Shard], table: &str, ids: &[u64], step: u64) {
        let r = Router::new(shards.len() as u32);
        for (s, (ids, _)) in r.split(table, ids).into_iter().enumerate() {
            let g: Vec<f32> = (0..ids.len() * 3)
                .map(|k| ((k as u64 + step) as f32 * 0.3).cos() * 0.1)
                .collect();
            shards[s].push(table, &ids, &g, &[], step).unwrap();
        }
    }

    fn pull_all(shards: &[Shard], table: &str, ids: &[u64]) -> Vec<u32> {
        let r = Router::new(shards.len() as u32);
        let mut out = vec![0u32; ids.len() * 3];
        for (s, (sids, pos)) in r.split(table, ids).into_iter().enumerate() {
            let mut v = Vec::new();
            shards[s].pull(table, &sids, &mut v).unwrap();
            for (k, p) in pos.iter().enumerate() {
                for d in 0..3 {
                    out[p * 3 + d] = v[k * 3 + d].to_bits();
                }
            }
        }
        out
    }

    /// (table, id) -> (shard, count, step, bits) of every stored row.
    #[allow(clippy::type_complexity)]
    fn rows(shards: &[Shard]) -> BTreeMap<(String, u64), Vec<(usize, u32, u64, Vec<u32>)>> {
        let mut m: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for (i, s) in shards.iter().enumerate() {
            for t in ["item", "user"] {
                s.table(t).unwrap().for_each_row(|id, c, st, v| {
                    m.entry((t.to_string(), id)).or_default().push((
                        i,
                        c,
                        st,
                        v.iter().map(|x| x.to_bits()).collect(),
                    ))
                });
            }
        }
        m
    }

    #[test]
    fn reshard_two_to_three_and_one_keeps_every_row_once() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("ckpt");
        let live = cluster(&src, 2);
        setup(&live);
        let all: Vec<u64> = (0..400).collect();
        for step in 0..6 {
            push(
                &live,
                "item",
                &all[step as usize * 50..step as usize * 50 + 120],
                step,
            );
            push(&live, "user", &all[..30], step);
        }
        for s in &live {
            s.checkpoint(6, 0).unwrap();
        }
        push(&live, "item", &all[..10], 6);
        for s in &live {
            let o = s.checkpoint_as(7, 0, false).unwrap();
            assert_eq!(o.info.kind.as_str(), "delta");
        }
        let want_rows = rows(&live);
        let want_item = pull_all(&live, "item", &all);
        let want_user = pull_all(&live, "user", &all);
        let (want_dense, _) = {
            let mut d = Vec::new();
            for s in &live {
                d.extend(s.pull_dense(&[]).unwrap().0);
            }
            d.sort_by(|a, b| a.name.cmp(&b.name));
            (d, ())
        };
        let before: Vec<_> = walk(&src);

        for m in [3u32, 1] {
            let out = tmp.path().join(format!("out{m}"));
            let rep = reshard(&src, m, &out, None).unwrap();
            assert_eq!((rep.step, rep.from_shards, rep.to_shards), (7, 2, m));
            assert_eq!(rep.rows as usize, want_rows.len());
            assert_eq!(rep.dense, PARAMS.len());
            let restored = cluster(&out, m);
            for s in &restored {
                assert_eq!(s.restore(0).unwrap().0, 7);
            }
            // Every row exists exactly once, on its owner, unchanged.
            let got = rows(&restored);
            assert_eq!(got.len(), want_rows.len());
            let r = Router::new(m);
            for (k, v) in &got {
                assert_eq!(v.len(), 1, "{k:?} stored {} times", v.len());
                assert_eq!(v[0].0 as u32, r.shard_of(&k.0, k.1));
                let w = &want_rows[k][0];
                assert_eq!((v[0].1, v[0].2, &v[0].3), (w.1, w.2, &w.3));
            }
            assert_eq!(pull_all(&restored, "item", &all), want_item);
            assert_eq!(pull_all(&restored, "user", &all), want_user);
            let mut d = Vec::new();
            for (i, s) in restored.iter().enumerate() {
                let (ps, _) = s.pull_dense(&[]).unwrap();
                for p in &ps {
                    assert_eq!(r.shard_of_dense(&p.name), i as u32);
                }
                d.extend(ps);
            }
            d.sort_by(|a, b| a.name.cmp(&b.name));
            assert_eq!(d, want_dense);
        }
        assert_eq!(walk(&src), before, "source untouched");

        // Bad arguments: named, nothing written.
        let e = reshard(&src, 0, &tmp.path().join("zero"), None).unwrap_err();
        assert!(e.contains("--to-shards"), "{e}");
        assert!(!tmp.path().join("zero").exists());
        let e = reshard(&src, 2, &tmp.path().join("out3"), None).unwrap_err();
        assert!(e.contains("--out") && e.contains("exists"), "{e}");
        let e = reshard(&src, 2, &tmp.path().join("x"), Some(5)).unwrap_err();
        assert!(e.contains("step 5"), "{e}");
        std::fs::remove_file(src.join("shard-1-of-2/step-6.ckpt")).unwrap();
        let e = reshard(&src, 2, &tmp.path().join("y"), Some(7)).unwrap_err();
        assert!(e.contains("step-6.ckpt") && e.contains("missing"), "{e}");
        assert!(!tmp.path().join("y").exists() && !tmp.path().join("y.partial").exists());
    }

    fn walk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
        v.sort();
        v
    }
}
