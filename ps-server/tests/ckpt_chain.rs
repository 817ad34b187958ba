//! Delta checkpoint chains at the `Shard` API: a base plus deltas restores
//! bit for bit (rows, optimizer state, counts, steps, pending counts, dense
//! state), TTL evictions become tombstones, every crash stage leaves the
//! previous step restorable, and bad chains are refused by name with
//! nothing changed on disk or in the shard.

use ember_proto::v1::*;
use ember_ps::checkpoint::FileKind;
use ember_ps::ckpt_chain::{self, DeltaPolicy, Manifest};
use ember_ps::{DenseTensor, PsError, Shard, ShardConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn adagrad() -> OptimizerConfig {
    OptimizerConfig {
        kind: Some(optimizer_config::Kind::Adagrad(Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
        })),
    }
}

fn table(name: &str, dim: u32, ttl: u64, admit: u32, opt: OptimizerConfig) -> TableConfig {
    TableConfig {
        name: name.into(),
        dim,
        init: Some(Initializer {
            kind: initializer::Kind::Uniform as i32,
            scale: 0.05,
        }),
        seed: 11,
        optimizer: Some(opt),
        mba_lambda: 0.01,
        count_mode: CountMode::CountOnline as i32,
        admit_min_count: admit,
        ttl_steps: ttl,
        ..Default::default()
    }
}

fn shard(dir: &Path) -> Shard {
    Shard::new(ShardConfig {
        checkpoint_dir: Some(dir.to_path_buf()),
        delta: DeltaPolicy {
            max_deltas: 8,
            max_chain_percent: 1000,
        },
        ..ShardConfig::default()
    })
    .unwrap()
}

/// Every observable piece of a shard's state, bit for bit.
#[derive(Debug, PartialEq, Eq)]
struct State {
    rows: BTreeMap<(String, u64), (u32, u64, Vec<u32>)>,
    pending: BTreeMap<(String, u64), u32>,
    dense: Vec<(String, Vec<u32>)>,
    dense_step: u64,
}

fn state(s: &Shard) -> State {
    let mut rows = BTreeMap::new();
    let mut pending = BTreeMap::new();
    for info in s.list_tables() {
        let name = info.config.unwrap().name;
        let t = s.table(&name).unwrap();
        t.for_each_row(|id, c, step, v| {
            rows.insert(
                (name.clone(), id),
                (c, step, v.iter().map(|x| x.to_bits()).collect()),
            );
        });
        t.for_each_pending(|id, c| {
            pending.insert((name.clone(), id), c);
        });
    }
    let (dense, dense_step) = s.pull_dense(&[]).unwrap();
    State {
        rows,
        pending,
        dense: dense
            .into_iter()
            .map(|d| (d.name, d.values.iter().map(|x| x.to_bits()).collect()))
            .collect(),
        dense_step,
    }
}

fn setup(s: &Shard) {
    s.create_table(table("item", 4, 25, 2, adagrad())).unwrap();
    s.create_table(table(
        "user",
        3,
        0,
        0,
        OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adam(Adam {
                lr: 0.01,
                ..Default::default()
            })),
        },
    ))
    .unwrap();
    s.init_dense(
        &[
            DenseTensor::new("w", vec![0.5, -0.25, 1.0]),
            DenseTensor::new("b", vec![0.0]),
        ],
        Some(&adagrad()),
    )
    .unwrap();
}

/// One training-like step: pushes to a moving window of ids (so old ids
/// age out under the TTL), a few hot ids, and a dense push.
fn train_step(s: &Shard, step: u64, width: u64) {
    let lo = step * 4;
    let mut ids: Vec<u64> = (lo..lo + width).collect();
    ids.extend([1_000_000, 1_000_001]);
    let grads: Vec<f32> = (0..ids.len() * 4)
        .map(|k| ((k as f32 + step as f32) * 0.37).sin() * 0.1)
        .collect();
    s.push("item", &ids, &grads, &[], step).unwrap();
    let users = [step % 5, 100 + step];
    let g: Vec<f32> = (0..6).map(|k| (k as f32 - step as f32) * 0.01).collect();
    s.push("user", &users, &g, &[2, 1], step).unwrap();
    s.push_dense(
        &[
            DenseTensor::new("w", vec![0.1, 0.2, step as f32 * 0.01]),
            DenseTensor::new("b", vec![0.3]),
        ],
        step,
        1,
        0,
    )
    .unwrap();
}

fn sdir(root: &Path) -> PathBuf {
    root.join("shard-0-of-1")
}

/// Names and contents of every file in a directory.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Trains 60 steps, checkpointing every 10 (a base, then deltas); returns
/// the state at every checkpoint and the kinds written.
fn run(s: &Shard) -> (BTreeMap<u64, State>, Vec<FileKind>) {
    setup(s);
    let mut at = BTreeMap::new();
    let mut kinds = Vec::new();
    for step in 0..60u64 {
        train_step(s, step, if step < 10 { 40 } else { 6 });
        if (step + 1) % 10 == 0 {
            let o = s.checkpoint_as(step + 1, 0, false).unwrap();
            kinds.push(o.info.kind);
            at.insert(step + 1, state(s));
        }
    }
    (at, kinds)
}

#[test]
fn base_plus_deltas_restore_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let live = shard(tmp.path());
    let (at, kinds) = run(&live);
    assert_eq!(kinds[0], FileKind::Base);
    assert!(
        kinds[1..].iter().all(|k| *k == FileKind::Delta),
        "{kinds:?}"
    );
    // TTL evictions happened between checkpoints (old windows aged out).
    let first: Vec<_> = at[&10].rows.keys().cloned().collect();
    assert!(first.iter().any(|k| !at[&60].rows.contains_key(k)));
    assert!(
        !at[&60].pending.is_empty(),
        "admission leaves pending counts"
    );
    // Deltas are much smaller than the base.
    let d = sdir(tmp.path());
    let base = std::fs::metadata(d.join("step-10.ckpt")).unwrap().len();
    let delta = std::fs::metadata(d.join("delta-60.ckpt")).unwrap().len();
    assert!(delta < base, "{delta} vs {base}");
    assert_eq!(
        live.list_checkpoints().unwrap(),
        vec![10, 20, 30, 40, 50, 60]
    );

    for (&step, want) in &at {
        let fresh = shard(tmp.path());
        let (got_step, rows) = fresh.restore(step).unwrap();
        assert_eq!(got_step, step);
        assert_eq!(rows as usize, want.rows.len());
        assert_eq!(&state(&fresh), want, "step {step}");
    }
    // Latest = step 60.
    let fresh = shard(tmp.path());
    assert_eq!(fresh.restore(0).unwrap().0, 60);

    // A restored shard continues the chain: same next delta as the live one.
    train_step(&live, 60, 6);
    train_step(&fresh, 60, 6);
    assert_eq!(state(&live), state(&fresh));
    let tmp2 = tempfile::tempdir().unwrap();
    let other = shard(tmp2.path());
    let o = fresh.checkpoint_as(70, 0, false).unwrap();
    assert_eq!(o.info.kind, FileKind::Delta);
    assert_eq!(o.chain_files, 7);
    other.restore(0).unwrap_err();
    let again = shard(tmp.path());
    again.restore(70).unwrap();
    assert_eq!(state(&again), state(&fresh));
    // force_base writes a base; the policy caps the chain length.
    let o = live.checkpoint_as(80, 0, true).unwrap();
    assert_eq!(o.info.kind, FileKind::Base);
}

#[test]
fn policy_writes_a_base_when_the_chain_grows_too_big() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Shard::new(ShardConfig {
        checkpoint_dir: Some(tmp.path().to_path_buf()),
        delta: DeltaPolicy {
            max_deltas: 2,
            max_chain_percent: 50,
        },
        ..ShardConfig::default()
    })
    .unwrap();
    setup(&s);
    for step in 0..10 {
        train_step(&s, step, 40);
    }
    let kind = |s: &Shard, step| s.checkpoint_as(step, 0, false).unwrap().info.kind;
    assert_eq!(kind(&s, 10), FileKind::Base);
    train_step(&s, 10, 2);
    assert_eq!(kind(&s, 11), FileKind::Delta);
    train_step(&s, 11, 2);
    assert_eq!(kind(&s, 12), FileKind::Delta);
    // max_deltas reached.
    train_step(&s, 12, 2);
    assert_eq!(kind(&s, 13), FileKind::Base);
    // Touching most rows: a base, not a delta.
    for step in 13..20 {
        train_step(&s, step, 60);
    }
    assert_eq!(kind(&s, 20), FileKind::Base);
    // Loading counts changes rows without their step: a base.
    train_step(&s, 20, 2);
    s.load_counts("user", &[1], &[9], false).unwrap();
    assert_eq!(kind(&s, 21), FileKind::Base);
}

#[test]
fn retention_removes_whole_chains_only() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Shard::new(ShardConfig {
        checkpoint_dir: Some(tmp.path().to_path_buf()),
        delta: DeltaPolicy {
            max_deltas: 2,
            max_chain_percent: 1000,
        },
        ..ShardConfig::default()
    })
    .unwrap();
    setup(&s);
    let mut kinds = Vec::new();
    for step in 0..60u64 {
        train_step(&s, step, if step < 10 { 40 } else { 3 });
        if (step + 1) % 10 == 0 {
            kinds.push(s.checkpoint_as(step + 1, 2, false).unwrap().info.kind);
        }
    }
    use FileKind::*;
    assert_eq!(kinds, vec![Base, Delta, Delta, Base, Delta, Delta]);
    // keep = 2 keeps steps 50 and 60, and the base (40) they need.
    let d = sdir(tmp.path());
    let names: Vec<String> = files(&d).into_keys().collect();
    assert_eq!(
        names,
        vec![
            "delta-50.ckpt",
            "delta-60.ckpt",
            "manifest-50.json",
            "manifest-60.json",
            "step-40.ckpt"
        ]
    );
    assert_eq!(s.list_checkpoints().unwrap(), vec![40, 50, 60]);
    let fresh = shard(tmp.path());
    fresh.restore(50).unwrap();
}

/// A shard with checkpoints 10 (base), 20, 30 (deltas) and the states.
fn three_steps(root: &Path) -> (Shard, BTreeMap<u64, State>) {
    let s = shard(root);
    setup(&s);
    let mut at = BTreeMap::new();
    for step in 0..30u64 {
        train_step(&s, step, if step < 10 { 40 } else { 5 });
        if (step + 1) % 10 == 0 {
            s.checkpoint(step + 1, 0).unwrap();
            at.insert(step + 1, state(&s));
        }
    }
    (s, at)
}

#[test]
fn every_crash_stage_leaves_the_previous_step_restorable() {
    for stage in ["delta temp", "delta without manifest", "manifest temp"] {
        let tmp = tempfile::tempdir().unwrap();
        let (s, at) = three_steps(tmp.path());
        let d = sdir(tmp.path());
        // Turn the completed step 30 into what a kill -9 at `stage` leaves.
        let manifest = d.join("manifest-30.json");
        let delta = d.join("delta-30.ckpt");
        match stage {
            "delta temp" => {
                std::fs::remove_file(&manifest).unwrap();
                let mut b = std::fs::read(&delta).unwrap();
                b.truncate(b.len() / 2);
                std::fs::write(d.join(".delta-30.ckpt.tmp"), b).unwrap();
                std::fs::remove_file(&delta).unwrap();
            }
            "delta without manifest" => std::fs::remove_file(&manifest).unwrap(),
            _ => std::fs::rename(&manifest, d.join(".manifest-30.json.tmp")).unwrap(),
        }
        drop(s);
        let fresh = shard(tmp.path());
        assert_eq!(fresh.list_checkpoints().unwrap(), vec![10, 20], "{stage}");
        assert_eq!(fresh.restore(0).unwrap().0, 20, "{stage}");
        assert_eq!(state(&fresh), at[&20], "{stage}");
        let e = fresh.restore(30).unwrap_err();
        assert!(matches!(e, PsError::NoCheckpoint(_)), "{stage}: {e}");
        assert_eq!(
            state(&fresh),
            at[&20],
            "{stage}: refused restore changed nothing"
        );
        // The shard goes on: the next checkpoint extends step 20's chain.
        train_step(&fresh, 30, 5);
        let o = fresh.checkpoint_as(31, 0, false).unwrap();
        assert_eq!(o.info.kind, FileKind::Delta, "{stage}");
        let names: Vec<String> = files(&d).into_keys().collect();
        assert!(
            !names.iter().any(|n| n.ends_with(".tmp")),
            "{stage}: {names:?}"
        );
        let again = shard(tmp.path());
        again.restore(31).unwrap();
        assert_eq!(state(&again), state(&fresh), "{stage}");
    }
}

/// Asserts that restoring `step` fails with an error naming `name`, and
/// changes neither the shard nor any file.
fn refused(root: &Path, s: &Shard, step: u64, name: &str) -> String {
    let d = sdir(root);
    let before_files = files(&d);
    let before = state(s);
    let e = s.restore(step).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(name), "error names {name}: {msg}");
    assert_eq!(state(s), before, "state unchanged: {msg}");
    assert_eq!(files(&d), before_files, "files unchanged: {msg}");
    msg
}

fn edit_manifest(d: &Path, step: u64, f: impl FnOnce(&mut Manifest)) {
    let p = d.join(format!("manifest-{step}.json"));
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn bad_chains_are_refused_by_name_and_change_nothing() {
    // A delta without its base.
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    let d = sdir(tmp.path());
    std::fs::remove_file(d.join("step-10.ckpt")).unwrap();
    let msg = refused(tmp.path(), &s, 30, "step-10.ckpt");
    assert!(msg.contains("missing"), "{msg}");
    assert!(s.list_checkpoints().unwrap().is_empty());

    // A manifest naming a missing delta.
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    let d = sdir(tmp.path());
    std::fs::remove_file(d.join("delta-20.ckpt")).unwrap();
    refused(tmp.path(), &s, 30, "delta-20.ckpt");
    assert_eq!(s.list_checkpoints().unwrap(), vec![10]);

    // A chain with a gap (step 20 left out of the manifest).
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    let d = sdir(tmp.path());
    edit_manifest(&d, 30, |m| {
        m.files.remove(1);
    });
    let msg = refused(tmp.path(), &s, 30, "delta-30.ckpt");
    assert!(msg.contains("gap"), "{msg}");

    // A mixed chain: a delta out of order.
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    let d = sdir(tmp.path());
    edit_manifest(&d, 30, |m| m.files.swap(1, 2));
    let msg = refused(tmp.path(), &s, 30, "manifest-30.json");
    assert!(msg.contains("out of order"), "{msg}");

    // A delta damaged on disk (its frame intact: only a full read sees it).
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    let d = sdir(tmp.path());
    let other = tempfile::tempdir().unwrap();
    let (o, _) = three_steps(other.path());
    drop(o);
    let mut b = std::fs::read(sdir(other.path()).join("delta-20.ckpt")).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    std::fs::write(d.join("delta-20.ckpt"), &b).unwrap();
    refused(tmp.path(), &s, 30, "delta-20.ckpt");

    // A manifest of a delta claiming to be a base.
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    let d = sdir(tmp.path());
    edit_manifest(&d, 30, |m| {
        m.files.remove(0);
    });
    let msg = refused(tmp.path(), &s, 30, "manifest-30.json");
    assert!(msg.contains("without its base"), "{msg}");
}

#[test]
fn restore_refuses_non_finite_values() {
    for (what, pos) in [("weights", 0usize), ("optimizer state", 5)] {
        let tmp = tempfile::tempdir().unwrap();
        let (s, at) = three_steps(tmp.path());
        let t = s.table("item").unwrap();
        let (c, step, mut v) = t.get_row(1_000_000).unwrap();
        v[pos] = f32::NAN;
        t.put_row(1_000_000, c, step + 1, &v).unwrap();
        s.checkpoint_as(40, 0, true).unwrap();
        let fresh = shard(tmp.path());
        fresh.restore(30).unwrap();
        let msg = refused(tmp.path(), &fresh, 40, "step-40.ckpt");
        assert!(
            msg.contains("non-finite") && msg.contains(what) && msg.contains("1000000"),
            "{msg}"
        );
        assert_eq!(state(&fresh), at[&30]);
        // Restore(0) skips it and loads step 30.
        let other = shard(tmp.path());
        assert_eq!(other.restore(0).unwrap().0, 30);
    }
}

#[test]
fn verify_chain_reads_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = three_steps(tmp.path());
    drop(s);
    let d = sdir(tmp.path());
    let (good, bad) = ckpt_chain::list(&d, 0, 1).unwrap();
    assert!(bad.is_empty());
    for m in &good {
        ckpt_chain::verify_chain(&d, m).unwrap();
    }
    // A flipped body byte keeps the frame (listing passes) but not the crc.
    let p = d.join("delta-20.ckpt");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x10;
    std::fs::write(&p, &b).unwrap();
    let (good, _) = ckpt_chain::list(&d, 0, 1).unwrap();
    let m30 = good.iter().find(|m| m.step == 30).unwrap();
    let e = ckpt_chain::verify_chain(&d, m30).unwrap_err();
    assert!(e.to_string().contains("delta-20.ckpt"), "{e}");
}

/// A shard that holds nothing (a process starting up) restores in ONE pass
/// over the base, checking it as it streams: the result equals the live
/// state bit for bit; damage that only the base's body checksum (read at
/// its end) reveals is refused by name and leaves the shard empty; and
/// `restore(0)` then falls back to the newest good chain.
#[test]
fn a_fresh_shard_loads_in_one_pass_and_stays_empty_on_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, mut at) = three_steps(tmp.path());
    // A second chain: a base at step 40.
    train_step(&s, 30, 5);
    let o = s.checkpoint_as(40, 0, true).unwrap();
    assert_eq!(o.info.kind, FileKind::Base);
    at.insert(40, state(&s));
    drop(s);
    let empty = state(&shard(tmp.path()));
    assert!(empty.rows.is_empty() && empty.dense.is_empty());
    for step in [30, 40] {
        let fresh = shard(tmp.path());
        assert_eq!(fresh.restore(step).unwrap().0, step);
        assert_eq!(state(&fresh), at[&step], "step {step}");
    }

    // One flipped bit in the middle of the step-40 base's body (frame and
    // manifest intact).
    let p = sdir(tmp.path()).join("step-40.ckpt");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let fresh = shard(tmp.path());
    let e = fresh.restore(40).unwrap_err().to_string();
    assert!(e.contains("step-40.ckpt"), "{e}");
    assert_eq!(
        state(&fresh),
        empty,
        "a refused one-pass load leaves nothing: {e}"
    );
    // The newest good chain (10 + 20 + 30) is taken instead.
    assert_eq!(fresh.restore(0).unwrap().0, 30);
    assert_eq!(state(&fresh), at[&30]);
}
