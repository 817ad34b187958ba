//! Fuzz target: the shard checkpoint decoder
//! (`ember_ps::checkpoint::decode`, the code behind `checkpoint::read`).
//!
//! Each input is decoded twice: as a whole checkpoint file (exercises the
//! header / trailer / size checks), and as a checkpoint *body* wrapped in a
//! valid header and trailer with correct checksums, so the body decoder
//! (table configs, rows, pending counts, dense parameters, every length
//! field) sees the input itself. Either must return `Ok` or `Err`: a panic,
//! an abort or an allocation over libFuzzer's `-malloc_limit_mb` is a bug.
#![no_main]

use ember_ps::checkpoint::{decode, END_MAGIC, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

const STEP: u64 = 7;

/// `body` behind a valid header (shard 0 of 1, step 7) and trailer.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 52);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&STEP.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    b.extend_from_slice(END_MAGIC);
    b
}

fuzz_target!(|data: &[u8]| {
    let label = Path::new("fuzz/step-7.ckpt");
    let _ = decode(data, label, 0, 1);
    if let Ok(l) = decode(&frame(data), label, 0, 1) {
        assert_eq!(l.step, STEP);
        let names: std::collections::HashSet<&str> =
            l.tables.iter().map(|t| t.spec().name()).collect();
        assert_eq!(names.len(), l.tables.len(), "duplicate table accepted");
        for (name, d) in &l.dense {
            assert_eq!(d.state.len(), d.opt.state_len(d.values.len()), "{name}");
        }
    }
});
