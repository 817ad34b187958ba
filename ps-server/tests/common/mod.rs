//! Full-state comparison of a shard for the tests ("unchanged after a
//! rejection", "restored exactly"): every stored row of every table with its
//! embedding and optimizer state (bit patterns), occurrence count and last
//! update step; the pending (not yet admitted) counts; every dense tensor
//! (parameters and state buffers, bit patterns) and the dense step.
//!
//! Built only on the store API that is stable across the store's
//! representations (`Table::for_each_row`, `for_each_pending`), so it
//! compares what a checkpoint must preserve, whatever the layout.

#![allow(dead_code)]

use ember_ps::Shard;

/// One stored row: id, occurrence count, last update step, and the bits of
/// its values (embedding then optimizer state).
pub type Row = (u64, u32, u64, Vec<u32>);

/// One table: its name, rows sorted by id, pending counts sorted by id.
pub type TableState = (String, Vec<Row>, Vec<(u64, u32)>);

/// Everything a shard holds, in a canonical order.
#[derive(Debug, Clone, PartialEq)]
pub struct FullState {
    /// Per table (by name): its rows sorted by id and its pending counts sorted by id.
    pub tables: Vec<TableState>,
    /// Dense tensors sorted by name, as bits.
    pub dense: Vec<(String, Vec<u32>)>,
    /// The dense step.
    pub dense_step: u64,
}

impl FullState {
    /// Total stored rows over all tables.
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|t| t.1.len()).sum()
    }
}

/// Bits of `v` (so that NaN == NaN and -0.0 != 0.0).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The full state of `s`.
pub fn full_state(s: &Shard) -> FullState {
    let mut tables = Vec::new();
    for info in s.list_tables() {
        let name = info.config.map(|c| c.name).unwrap_or_default();
        let t = s.table(&name).expect("listed table exists");
        let mut rows = Vec::new();
        t.for_each_row(|id, count, step, vals| rows.push((id, count, step, bits(vals))));
        rows.sort_by_key(|r| r.0);
        let mut pending = Vec::new();
        t.for_each_pending(|id, count| pending.push((id, count)));
        pending.sort_unstable();
        tables.push((name, rows, pending));
    }
    let (dense, dense_step) = s.pull_dense(&[]).expect("pull all dense tensors");
    let mut dense: Vec<(String, Vec<u32>)> = dense
        .into_iter()
        .map(|t| (t.name, bits(&t.values)))
        .collect();
    dense.sort_by(|a, b| a.0.cmp(&b.0));
    FullState {
        tables,
        dense,
        dense_step,
    }
}
