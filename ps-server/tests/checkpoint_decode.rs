//! The checkpoint decoder against hostile bytes (the stable-toolchain
//! companion of the `checkpoint_decode` fuzz target in `fuzz/`): random
//! bytes, random bodies framed with valid checksums, and single-byte
//! mutations, truncations and extensions of a real checkpoint. The decoder
//! never panics and never allocates from an untrusted length; every
//! corruption of a real checkpoint is rejected with an error.

use ember_proto::v1::*;
use ember_ps::checkpoint::{self, Loaded, END_MAGIC, MAGIC, VERSION};
use ember_ps::{DenseTensor, PsError, Shard, ShardConfig};
use proptest::prelude::*;
use prost::Message;
use std::path::Path;
use std::sync::OnceLock;

const LABEL: &str = "fuzz/step-7.ckpt";

fn table_cfg(name: &str, dim: u32, opt: optimizer_config::Kind) -> TableConfig {
    TableConfig {
        name: name.into(),
        dim,
        init: Some(Initializer {
            kind: initializer::Kind::Uniform as i32,
            scale: 0.05,
        }),
        seed: 3,
        optimizer: Some(OptimizerConfig { kind: Some(opt) }),
        mba_lambda: 0.01,
        count_mode: CountMode::CountOnline as i32,
        ..Default::default()
    }
}

/// A real checkpoint (two tables with rows and pending counts, two dense
/// parameters with Adam state) written by a shard, and the shard.
fn valid() -> &'static (Vec<u8>, Shard) {
    static V: OnceLock<(Vec<u8>, Shard)> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let s = Shard::new(ShardConfig {
            checkpoint_dir: Some(dir.path().to_path_buf()),
            ..ShardConfig::default()
        })
        .unwrap();
        s.create_table(table_cfg(
            "item",
            3,
            optimizer_config::Kind::Adagrad(Adagrad {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
            }),
        ))
        .unwrap();
        s.create_table(table_cfg(
            "user",
            2,
            optimizer_config::Kind::Adam(Adam {
                lr: 0.01,
                ..Default::default()
            }),
        ))
        .unwrap();
        let ids: Vec<u64> = (1..=12).chain([u64::MAX]).collect();
        let grads: Vec<f32> = (0..ids.len() * 3).map(|k| k as f32 * 0.01).collect();
        s.push("item", &ids, &grads, &[], 5).unwrap();
        s.push("user", &[7, 8], &[0.5, -0.5, 0.25, 1.0], &[2, 3], 6)
            .unwrap();
        // Counts for ids without rows stay pending.
        s.load_counts("item", &[100, 101], &[4, 9], false).unwrap();
        s.init_dense(
            &[
                DenseTensor::new("w", vec![0.5, -0.25, 1.0]),
                DenseTensor::new("b", vec![0.0]),
            ],
            Some(&OptimizerConfig {
                kind: Some(optimizer_config::Kind::Adam(Adam {
                    lr: 0.1,
                    ..Default::default()
                })),
            }),
        )
        .unwrap();
        s.push_dense(
            &[
                DenseTensor::new("w", vec![1.0, 2.0, 3.0]),
                DenseTensor::new("b", vec![0.5]),
            ],
            0,
            1,
            0,
        )
        .unwrap();
        let info = s.checkpoint(7, 0).unwrap();
        (std::fs::read(info.path).unwrap(), s)
    })
}

fn decode(b: &[u8]) -> Result<Loaded, PsError> {
    checkpoint::decode(b, Path::new(LABEL), 0, 1)
}

/// Wraps `body` in a valid header (shard 0 of 1, step 7) and trailer, so
/// that the body decoder itself sees it (checksums right).
fn frame(body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 52);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&7u64.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    b.extend_from_slice(END_MAGIC);
    b
}

/// The body of a framed checkpoint.
fn body_of(b: &[u8]) -> &[u8] {
    &b[32..b.len() - 20]
}

fn assert_rejected(b: &[u8], what: &str) {
    match decode(b) {
        Err(PsError::CorruptCheckpoint { path, reason }) => {
            assert_eq!(path, Path::new(LABEL), "{what}: {reason}");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("{what}: unexpected error kind {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[test]
fn valid_checkpoint_decodes_to_the_shard_state() {
    let (bytes, shard) = valid();
    let l = decode(bytes).unwrap();
    assert_eq!((l.step, l.rows, l.dense_step), (7, 15, 1));
    assert_eq!(l.tables.len(), 2);
    for t in &l.tables {
        let live = shard.table(t.spec().name()).unwrap();
        assert_eq!(t.spec(), live.spec());
        for id in (0..=12).chain([100, 101, u64::MAX]) {
            assert_eq!(t.get_row(id), live.get_row(id), "{} {id}", t.spec().name());
        }
    }
    let (dense, step) = shard.pull_dense(&[]).unwrap();
    assert_eq!(step, l.dense_step);
    for d in dense {
        assert_eq!(l.dense[&d.name].values, d.values);
    }
    // Same result as reading the file.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("step-7.ckpt");
    std::fs::write(&p, bytes).unwrap();
    let r = checkpoint::read(&p, 0, 1).unwrap();
    assert_eq!(
        (r.step, r.rows, r.dense_step),
        (l.step, l.rows, l.dense_step)
    );
    // A real body reframed is still the same checkpoint.
    assert_eq!(frame(body_of(bytes)), *bytes);
    // Another shard's checkpoint is refused as such.
    assert!(matches!(
        checkpoint::decode(bytes, Path::new(LABEL), 1, 2),
        Err(PsError::FailedPrecondition(_))
    ));
}

#[test]
fn huge_length_fields_are_rejected_without_allocating() {
    let u32max = u32::MAX.to_le_bytes();
    let u64max = u64::MAX.to_le_bytes();
    let table = table_cfg("t", 4096, optimizer_config::Kind::Adam(Adam::default())).encode_to_vec();
    let mut one_table = Vec::new();
    one_table.extend_from_slice(&1u32.to_le_bytes());
    one_table.extend_from_slice(&(table.len() as u32).to_le_bytes());
    one_table.extend_from_slice(&table);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("4G tables", u32max.to_vec()),
        (
            "table config of 4 GiB",
            [&1u32.to_le_bytes()[..], &u32max].concat(),
        ),
        ("2^64 rows in a stripe", [&one_table[..], &u64max].concat()),
        (
            "2^40 rows of width 12288",
            [&one_table[..], &(1u64 << 40).to_le_bytes()].concat(),
        ),
        (
            "dense name of 4 GiB",
            [&0u32.to_le_bytes()[..], &1u32.to_le_bytes(), &u32max].concat(),
        ),
        (
            "2^62 dense values",
            [
                &0u32.to_le_bytes()[..],
                &1u32.to_le_bytes(),
                &1u32.to_le_bytes(),
                b"w",
                &[0],
                &(1u64 << 62).to_le_bytes(),
            ]
            .concat(),
        ),
        (
            "optimizer flag 7",
            [
                &0u32.to_le_bytes()[..],
                &1u32.to_le_bytes(),
                &1u32.to_le_bytes(),
                b"w",
                &[7],
            ]
            .concat(),
        ),
    ];
    for (what, body) in cases {
        assert_rejected(&frame(&body), what);
    }
    // A trailer whose body length overflows the frame arithmetic.
    let mut b = valid().0.clone();
    let n = b.len();
    b[n - 20..n - 12].copy_from_slice(&u64max);
    assert_rejected(&b, "body_len = 2^64-1");
}

#[test]
fn duplicate_table_or_dense_names_are_rejected() {
    // Two empty tables with the same config.
    let cfg = table_cfg("t", 2, optimizer_config::Kind::Sgd(Sgd { lr: 0.1 })).encode_to_vec();
    let mut body = Vec::new();
    body.extend_from_slice(&2u32.to_le_bytes());
    for _ in 0..2 {
        body.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
        body.extend_from_slice(&cfg);
        body.extend_from_slice(&[0u8; 8 * 64]); // 64 empty stripes
        body.extend_from_slice(&0u64.to_le_bytes()); // no pending
    }
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    assert_rejected(&frame(&body), "duplicate table");
    // One table decodes.
    let mut one = Vec::new();
    one.extend_from_slice(&1u32.to_le_bytes());
    one.extend_from_slice(&body[4..4 + 4 + cfg.len() + 8 * 64 + 8]);
    one.extend_from_slice(&0u32.to_le_bytes());
    one.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(decode(&frame(&one)).unwrap().tables.len(), 1);
    // Two dense parameters with the same name.
    let mut dense = Vec::new();
    dense.extend_from_slice(&0u32.to_le_bytes());
    dense.extend_from_slice(&2u32.to_le_bytes());
    for _ in 0..2 {
        dense.extend_from_slice(&1u32.to_le_bytes());
        dense.extend_from_slice(b"w");
        dense.push(0);
        dense.extend_from_slice(&1u64.to_le_bytes());
        dense.extend_from_slice(&1.0f32.to_le_bytes());
        dense.extend_from_slice(&0u64.to_le_bytes());
    }
    dense.extend_from_slice(&0u64.to_le_bytes());
    assert_rejected(&frame(&dense), "duplicate dense");
}

#[test]
fn every_single_byte_change_and_truncation_is_rejected() {
    // Exhaustive over positions (a few thousand decodes): crc32 catches every
    // single-byte error, and the frame checks catch every length change.
    let (bytes, _) = valid();
    for i in 0..bytes.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= x;
            assert_rejected(&b, &format!("byte {i} ^ {x:#x}"));
        }
        assert_rejected(&bytes[..i], &format!("truncated to {i} bytes"));
    }
    for extra in [&[0u8][..], &[0; 19], &bytes[..40]] {
        assert_rejected(&[&bytes[..], extra].concat(), "extended");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes: an error, never a panic.
    #[test]
    fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(decode(&b).is_err());
    }

    /// Arbitrary bodies behind a valid header and trailer reach the body
    /// decoder: it answers Ok or an error, never panics.
    #[test]
    fn random_framed_bodies_never_panic(b in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&frame(&b));
    }

    /// A real body with random byte edits, reframed with fresh checksums:
    /// the decoder answers Ok or an error, never panics.
    #[test]
    fn mutated_framed_bodies_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut body = body_of(&valid().0).to_vec();
        for (i, v) in edits {
            let i = i.index(body.len());
            body[i] = v;
        }
        if truncate {
            body.truncate(cut.index(body.len()));
        }
        let _ = decode(&frame(&body));
    }

    /// A real checkpoint with one byte changed or cut short is rejected.
    #[test]
    fn corrupted_checkpoint_is_rejected(
        i in any::<prop::sample::Index>(),
        x in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = &valid().0;
        let mut b = bytes.clone();
        let at = i.index(b.len());
        b[at] ^= x;
        let rejected = matches!(decode(&b), Err(PsError::CorruptCheckpoint { .. }));
        prop_assert!(rejected, "byte {} ^ {:#x} accepted", at, x);
        prop_assert!(decode(&bytes[..cut.index(bytes.len())]).is_err());
    }
}

/// Writes the seed corpus of the `checkpoint_decode` fuzz target from real
/// checkpoints: `cargo test -p ember-ps --test checkpoint_decode
/// write_fuzz_seeds -- --ignored` (see docs/fuzzing.md).
#[test]
#[ignore = "writes fuzz/corpus/checkpoint_decode"]
fn write_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/checkpoint_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = &valid().0;
    // One table (SGD, dim 2) with one row, one dense parameter without
    // optimizer state.
    let cfg = table_cfg("t", 2, optimizer_config::Kind::Sgd(Sgd { lr: 0.1 })).encode_to_vec();
    let mut one = Vec::new();
    one.extend_from_slice(&1u32.to_le_bytes());
    one.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
    one.extend_from_slice(&cfg);
    one.extend_from_slice(&1u64.to_le_bytes());
    one.extend_from_slice(&42u64.to_le_bytes());
    one.extend_from_slice(&3u32.to_le_bytes());
    one.extend_from_slice(&5u64.to_le_bytes());
    for v in [0.5f32, -0.5] {
        one.extend_from_slice(&v.to_le_bytes());
    }
    one.extend_from_slice(&[0u8; 8 * 63]);
    one.extend_from_slice(&1u64.to_le_bytes());
    one.extend_from_slice(&9u64.to_le_bytes());
    one.extend_from_slice(&2u32.to_le_bytes());
    one.extend_from_slice(&1u32.to_le_bytes());
    one.extend_from_slice(&1u32.to_le_bytes());
    one.extend_from_slice(b"w");
    one.push(0);
    one.extend_from_slice(&1u64.to_le_bytes());
    one.extend_from_slice(&1.5f32.to_le_bytes());
    one.extend_from_slice(&0u64.to_le_bytes());
    one.extend_from_slice(&3u64.to_le_bytes());
    let l = decode(&frame(&one)).unwrap();
    assert_eq!((l.rows, l.dense.len()), (1, 1));
    for (name, b) in [
        ("body-two-tables-dense", body_of(bytes)),
        ("body-one-row", &one[..]),
        ("body-empty", &[0u8; 16][..]),
        ("file-two-tables-dense", &bytes[..]),
    ] {
        std::fs::write(dir.join(name), b).unwrap();
    }
}
