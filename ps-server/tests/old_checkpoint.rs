//! A checkpoint written by an older build restores into this one.
//!
//! The oldest format still in the field is the base file of the builds
//! before compact rows and delta checkpoints (commit 868c531, "in-memory
//! decoder"): a lone `step-<S>.ckpt` without a manifest, whose `TableConfig`
//! has only fields 1..=10 (no `precision`), with the row layout
//! `[id u64, count u32, last_step u64, f32 * (dim + state)]` in 64 stripe
//! blocks. The test writes such a file with an independent writer (below:
//! hand-rolled little-endian fields, hand-encoded protobuf, its own CRC-32),
//! following the layout documented in `ps-server/src/checkpoint.rs` at that
//! commit, so it does not reuse a line of the current encoder; the old
//! writer put each row in the block of its store stripe, the current
//! decoder re-inserts rows by id, so the test puts every row in block 0.
//!
//! It asserts that the shard lists the step, restores it (by step and as
//! "latest"), and that every row (weights, Adam state, count, step), the
//! pending counts, the dense parameters with their optimizer, and the dense
//! step are exactly what the file holds; that the table is f32 (the old
//! default); and that training and checkpointing continue from it.
//!
//! Expected time: well under a second.

mod common;

use common::{bits, full_state, FullState};
use ember_ps::{Shard, ShardConfig};

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bit by bit.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Protobuf: a varint.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf: field `f` as a varint (wire type 0).
fn pb_varint(f: u32, v: u64, out: &mut Vec<u8>) {
    varint(u64::from(f) << 3, out);
    varint(v, out);
}

/// Protobuf: field `f` as a 32-bit float (wire type 5).
fn pb_f32(f: u32, v: f32, out: &mut Vec<u8>) {
    varint((u64::from(f) << 3) | 5, out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Protobuf: field `f` as length-delimited bytes (wire type 2).
fn pb_bytes(f: u32, v: &[u8], out: &mut Vec<u8>) {
    varint((u64::from(f) << 3) | 2, out);
    varint(v.len() as u64, out);
    out.extend_from_slice(v);
}

/// `OptimizerConfig { adam: Adam { lr } }` (oneof field 3; Adam.lr = 1).
fn adam_config(lr: f32) -> Vec<u8> {
    let mut adam = Vec::new();
    pb_f32(1, lr, &mut adam);
    let mut cfg = Vec::new();
    pb_bytes(3, &adam, &mut cfg);
    cfg
}

/// `OptimizerConfig { sgd: Sgd { lr } }` (oneof field 1; Sgd.lr = 1).
fn sgd_config(lr: f32) -> Vec<u8> {
    let mut sgd = Vec::new();
    pb_f32(1, lr, &mut sgd);
    let mut cfg = Vec::new();
    pb_bytes(1, &sgd, &mut cfg);
    cfg
}

/// The old `TableConfig` (fields 1..=10 of the proto at commit 868c531).
fn old_table_config() -> Vec<u8> {
    let mut init = Vec::new();
    pb_varint(1, 2, &mut init); // Initializer.kind = NORMAL
    pb_f32(2, 0.01, &mut init); // Initializer.scale
    let mut c = Vec::new();
    pb_bytes(1, b"item", &mut c); // name
    pb_varint(2, 2, &mut c); // dim
    pb_bytes(3, &init, &mut c); // init
    pb_varint(4, 7, &mut c); // seed
    pb_bytes(5, &adam_config(0.001), &mut c); // optimizer
    pb_f32(6, 0.5, &mut c); // mba_lambda
    pb_varint(7, 1, &mut c); // count_mode = COUNT_EXACT
    c
}

struct Le(Vec<u8>);
impl Le {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

/// (id, count, last step, weights then Adam state: m[2], v[2], beta1^t, beta2^t)
type OldRow = (u64, u32, u64, [f32; 8]);

fn rows() -> Vec<OldRow> {
    vec![
        (
            5,
            3,
            40,
            [
                0.5,
                -0.25,
                0.01,
                -0.02,
                1e-4,
                2e-4,
                0.9f32.powi(3),
                0.999f32.powi(3),
            ],
        ),
        (1 << 40, 1, 39, [1.0, 2.0, 0.1, 0.2, 1e-3, 4e-3, 0.9, 0.999]),
        (
            0xDEAD_BEEF_0000_0001,
            7,
            12,
            [-3.5, 0.125, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],
        ),
    ]
}

const STEP: u64 = 40;

/// The file an older build wrote for shard 0 of 1 at step 40.
fn old_checkpoint() -> Vec<u8> {
    let mut body = Le(Vec::new());
    body.u32(1); // tables
    let cfg = old_table_config();
    body.u32(cfg.len() as u32);
    body.bytes(&cfg);
    let rows = rows();
    for block in 0..64 {
        if block == 0 {
            body.u64(rows.len() as u64);
            for (id, count, last, vals) in &rows {
                body.u64(*id);
                body.u32(*count);
                body.u64(*last);
                body.f32s(vals);
            }
        } else {
            body.u64(0);
        }
    }
    body.u64(1); // pending counts
    body.u64(9);
    body.u32(2);
    body.u32(2); // dense params (sorted by name, as the old BTreeMap wrote them)
    body.u32(7);
    body.bytes(b"dice.rm");
    body.u8(0); // no optimizer config: SGD lr 0.01, no state
    body.u64(2);
    body.f32s(&[0.25, -0.75]);
    body.u64(0);
    body.u32(5);
    body.bytes(b"mlp.w");
    body.u8(1);
    let opt = sgd_config(0.5);
    body.u32(opt.len() as u32);
    body.bytes(&opt);
    body.u64(3);
    body.f32s(&[1.5, -2.0, 0.0]);
    body.u64(0);
    body.u64(STEP); // dense step
    let body = body.0;

    let mut f = Le(Vec::new());
    f.bytes(b"EMBERPSK");
    f.u32(1); // version
    f.u32(0); // shard index
    f.u32(1); // shards
    f.u64(STEP);
    let crc = crc32(&f.0);
    f.u32(crc);
    assert_eq!(f.0.len(), 32);
    f.bytes(&body);
    f.u64(body.len() as u64);
    f.u32(crc32(&body));
    f.bytes(b"EMBEREND");
    f.0
}

/// What the file holds, in the helper's canonical form.
fn expected() -> FullState {
    let rows = rows()
        .into_iter()
        .map(|(id, c, s, v)| (id, c, s, bits(&v)))
        .collect::<Vec<_>>();
    let mut rows = rows;
    rows.sort_by_key(|r| r.0);
    FullState {
        tables: vec![("item".into(), rows, vec![(9, 2)])],
        dense: vec![
            ("dice.rm".into(), bits(&[0.25, -0.75])),
            ("mlp.w".into(), bits(&[1.5, -2.0, 0.0])),
        ],
        dense_step: STEP,
    }
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn a_checkpoint_of_an_older_build_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = dir.path().join("shard-0-of-1");
    std::fs::create_dir_all(&shard_dir).unwrap();
    std::fs::write(shard_dir.join("step-40.ckpt"), old_checkpoint()).unwrap();
    let shard = || {
        Shard::new(ShardConfig {
            checkpoint_dir: Some(dir.path().to_path_buf()),
            ..ShardConfig::default()
        })
        .unwrap()
    };

    // A lone base without a manifest is a restorable step.
    let s = shard();
    assert_eq!(s.list_checkpoints().unwrap(), vec![STEP]);
    assert_eq!(s.restore(STEP).unwrap(), (STEP, 3));
    assert_eq!(full_state(&s), expected());
    // "The latest good checkpoint" finds it too, in a fresh shard.
    let s2 = shard();
    assert_eq!(s2.restore(0).unwrap(), (STEP, 3));
    assert_eq!(full_state(&s2), expected());

    // The old config decodes with the new fields at their defaults.
    let info = s.describe_table("item").unwrap();
    let cfg = info.config.unwrap();
    assert_eq!(cfg.dim, 2);
    assert_eq!(cfg.seed, 7);
    assert_eq!(cfg.mba_lambda, 0.5);
    assert_eq!(cfg.count_mode, 1);
    assert_eq!(cfg.precision, 0, "f32, the only precision of the old build");
    assert_eq!(info.rows, 3);

    // The dense optimizer came back: SGD lr 0.5 on mlp.w (g = 1 moves it by 0.5).
    s.push_dense(
        &[ember_ps::DenseTensor::new("mlp.w", vec![1.0, 0.0, -2.0])],
        STEP,
        1,
        0,
    )
    .unwrap();
    let (d, step) = s.pull_dense(&["mlp.w".to_string()]).unwrap();
    assert_eq!(d[0].values, vec![1.0, -2.0, 1.0]);
    assert_eq!(step, STEP + 1);

    // Training continues on the restored rows and a new checkpoint chain
    // starts from them; the old file still restores afterwards.
    let mut out = Vec::new();
    s.pull("item", &[5], &mut out).unwrap();
    assert_eq!(out, vec![0.5, -0.25]);
    s.checkpoint(STEP + 1, 4).unwrap();
    let mut steps = s.list_checkpoints().unwrap();
    steps.sort_unstable();
    assert_eq!(steps, vec![STEP, STEP + 1]);
    let s3 = shard();
    assert_eq!(s3.restore(STEP + 1).unwrap().0, STEP + 1);
    let after = full_state(&s3);
    assert_eq!(after.tables, expected().tables);
    assert_eq!(after.dense_step, STEP + 1);
    let s4 = shard();
    s4.restore(STEP).unwrap();
    assert_eq!(full_state(&s4), expected());
}
