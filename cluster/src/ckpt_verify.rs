//! `ember checkpoint verify <dir>`: reads every file of a cluster
//! checkpoint directory (`<dir>/shard-<i>-of-<n>/`) and checks checksums,
//! structure, finite weights and optimizer state, chain order and links,
//! and that every shard has the same steps.

use ember_ps::checkpoint::{self, Discard, Scanned};
use ember_ps::ckpt_chain::{self, Manifest};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Shard directories of a cluster checkpoint root: `(index, dir)` sorted by
/// index, and the shard count they agree on.
pub fn shard_dirs(root: &Path) -> Result<(u32, Vec<(u32, PathBuf)>), String> {
    let rd = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut found: Vec<(u32, u32, PathBuf)> = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some((i, n)) = name.to_str().and_then(|n| {
            let rest = n.strip_prefix("shard-")?;
            let (i, n) = rest.split_once("-of-")?;
            Some((i.parse::<u32>().ok()?, n.parse::<u32>().ok()?))
        }) else {
            continue;
        };
        found.push((i, n, entry.path()));
    }
    let counts: BTreeSet<u32> = found.iter().map(|f| f.1).collect();
    let n = match counts.len() {
        0 => {
            return Err(format!(
                "{}: no shard-<i>-of-<n> directories (not a cluster checkpoint directory)",
                root.display()
            ))
        }
        1 => counts.into_iter().next().unwrap_or(0),
        _ => {
            return Err(format!(
                "{}: shard directories of different cluster sizes {counts:?}",
                root.display()
            ))
        }
    };
    found.sort_by_key(|f| f.0);
    let missing: Vec<u32> = (0..n)
        .filter(|i| !found.iter().any(|f| f.0 == *i))
        .collect();
    if !missing.is_empty() || found.iter().any(|f| f.0 >= n) {
        return Err(format!(
            "{}: shards {missing:?} of {n} are missing",
            root.display()
        ));
    }
    Ok((n, found.into_iter().map(|(i, _, p)| (i, p)).collect()))
}

/// One shard's result.
#[derive(Debug, Clone)]
pub struct ShardSummary {
    /// Shard index.
    pub index: u32,
    /// Restorable steps (chains whose every file verified), ascending.
    pub steps: Vec<u64>,
    /// The newest good chain.
    pub latest: Option<Manifest>,
    /// Files read.
    pub files: usize,
    /// Bytes read.
    pub bytes: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Number of shards.
    pub num_shards: u32,
    /// Per shard.
    pub shards: Vec<ShardSummary>,
    /// Steps every shard can restore (complete cluster checkpoints).
    pub complete: Vec<u64>,
    /// Steps only some shards have (an interrupted cluster checkpoint).
    pub incomplete: Vec<(u64, Vec<u32>)>,
    /// Damaged files: the file and the reason.
    pub damaged: Vec<(PathBuf, String)>,
    /// Files present but not part of any chain (interrupted writes).
    pub orphans: Vec<PathBuf>,
}

impl VerifyReport {
    /// A human-readable summary (one line per shard, then the cluster).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for sh in &self.shards {
            let latest = sh.latest.as_ref().map_or("none".to_string(), |m| {
                format!(
                    "step {} = base {} + {} delta(s), {} bytes",
                    m.step,
                    m.files[0].file,
                    m.deltas(),
                    m.bytes()
                )
            });
            s += &format!(
                "shard {} of {}: {} restorable step(s) {:?}; latest {latest}; {} file(s), {} bytes read\n",
                sh.index,
                self.num_shards,
                sh.steps.len(),
                sh.steps,
                sh.files,
                sh.bytes
            );
        }
        s += &format!(
            "complete cluster checkpoints: {:?} (latest: {})\n",
            self.complete,
            self.complete
                .last()
                .map_or("none".to_string(), |x| x.to_string())
        );
        for (step, on) in &self.incomplete {
            s += &format!("incomplete: step {step} only on shard(s) {on:?}\n");
        }
        for p in &self.orphans {
            s += &format!(
                "ignored (no manifest: an interrupted checkpoint): {}\n",
                p.display()
            );
        }
        for (p, why) in &self.damaged {
            s += &format!("DAMAGED {}: {why}\n", p.display());
        }
        s += if self.damaged.is_empty() {
            "OK\n"
        } else {
            "DAMAGED\n"
        };
        s
    }
}

/// Checks every file of the cluster checkpoint under `root`. Errors only
/// when `root` is not a cluster checkpoint directory; damage is reported.
pub fn verify(root: &Path) -> Result<VerifyReport, String> {
    let (n, dirs) = shard_dirs(root)?;
    let mut rep = VerifyReport {
        num_shards: n,
        ..Default::default()
    };
    let mut steps_of: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (i, dir) in &dirs {
        let (chains, bad) = ckpt_chain::list(dir, *i, n).map_err(|e| e.to_string())?;
        for (p, e) in bad {
            rep.damaged.push((p, e.to_string()));
        }
        // Every file once: full decode (crc, structure, finite values).
        let mut scanned: BTreeMap<String, Result<Scanned, String>> = BTreeMap::new();
        let mut summary = ShardSummary {
            index: *i,
            steps: Vec::new(),
            latest: None,
            files: 0,
            bytes: 0,
        };
        for m in &chains {
            let mut ok = true;
            let mut prev = None;
            for f in &m.files {
                let p = dir.join(&f.file);
                let r = scanned
                    .entry(f.file.clone())
                    .or_insert_with(|| {
                        summary.files += 1;
                        summary.bytes += f.bytes;
                        checkpoint::scan(&p, *i, n, &mut Discard).map_err(|e| e.to_string())
                    })
                    .clone();
                match r {
                    Err(_) => ok = false,
                    Ok(s) => {
                        if let Some(prev) = prev {
                            if s.base_step != m.files[0].step || s.prev_step != prev {
                                ok = false;
                                rep.damaged.push((
                                    p.clone(),
                                    format!(
                                        "delta follows base {} and step {}, the chain of step {} has base {} and step {prev}",
                                        s.base_step, s.prev_step, m.step, m.files[0].step
                                    ),
                                ));
                            }
                        }
                    }
                }
                prev = Some(f.step);
            }
            if ok {
                summary.steps.push(m.step);
                steps_of.entry(m.step).or_default().push(*i);
                summary.latest = Some(m.clone());
            }
        }
        for (file, r) in &scanned {
            if let Err(e) = r {
                rep.damaged.push((dir.join(file), e.clone()));
            }
        }
        let named: BTreeSet<&str> = chains
            .iter()
            .flat_map(|m| m.files.iter().map(|f| f.file.as_str()))
            .collect();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let orphan = (name.starts_with("delta-")
                    && name.ends_with(".ckpt")
                    && !named.contains(name.as_str()))
                    || name.ends_with(".tmp");
                if orphan {
                    rep.orphans.push(e.path());
                }
            }
        }
        rep.shards.push(summary);
    }
    rep.damaged.sort();
    rep.damaged.dedup();
    for (step, on) in steps_of {
        if on.len() == n as usize {
            rep.complete.push(step);
        } else {
            rep.incomplete.push((step, on));
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::v1::*;
    use ember_ps::{Shard, ShardConfig};

    fn cluster(root: &Path) -> Vec<Shard> {
        (0..2)
            .map(|i| {
                let s = Shard::new(ShardConfig {
                    shard_index: i,
                    num_shards: 2,
                    checkpoint_dir: Some(root.to_path_buf()),
                    ..Default::default()
                })
                .unwrap();
                s.create_table(TableConfig {
                    name: "item".into(),
                    dim: 2,
                    ..Default::default()
                })
                .unwrap();
                s
            })
            .collect()
    }

    fn push_all(shards: &[Shard], ids: &[u64], step: u64) {
        let r = ember_proto::Router::new(2);
        for (s, (ids, _)) in r.split("item", ids).into_iter().enumerate() {
            let g = vec![0.1f32; ids.len() * 2];
            shards[s].push("item", &ids, &g, &[], step).unwrap();
        }
    }

    #[test]
    fn verify_reports_ok_then_names_a_damaged_file() {
        let tmp = tempfile::tempdir().unwrap();
        let shards = cluster(tmp.path());
        push_all(&shards, &(0..200).collect::<Vec<_>>(), 0);
        for s in &shards {
            s.checkpoint(1, 0).unwrap();
        }
        push_all(&shards, &[1, 2, 3, 4], 1);
        for s in &shards {
            assert_eq!(
                s.checkpoint_as(2, 0, false).unwrap().info.kind.as_str(),
                "delta"
            );
        }
        // Shard 0 only: an interrupted cluster checkpoint.
        push_all(&shards, &[5], 2);
        shards[0].checkpoint(3, 0).unwrap();
        let rep = verify(tmp.path()).unwrap();
        assert!(rep.damaged.is_empty(), "{}", rep.summary());
        assert_eq!(rep.complete, vec![1, 2]);
        assert_eq!(rep.incomplete, vec![(3, vec![0])]);
        assert!(rep.summary().ends_with("OK\n"));

        let p = tmp.path().join("shard-1-of-2/delta-2.ckpt");
        let mut b = std::fs::read(&p).unwrap();
        let k = b.len() / 2;
        b[k] ^= 4;
        std::fs::write(&p, &b).unwrap();
        let rep = verify(tmp.path()).unwrap();
        assert_eq!(rep.damaged.len(), 1, "{}", rep.summary());
        assert_eq!(rep.damaged[0].0, p);
        assert!(rep.damaged[0].1.contains("checksum"), "{:?}", rep.damaged);
        assert_eq!(rep.complete, vec![1]);
        assert!(rep.summary().ends_with("DAMAGED\n"));

        assert!(verify(&tmp.path().join("shard-0-of-2")).is_err());
    }
}
