//! Sizing: the memory a table takes on a shard, computed from the store's own
//! layout and growth rules (so it tracks the code, not a rule of thumb), and
//! how many shards a job needs. Used by `ember plan`.
//!
//! Per table and shard, with `r` rows per stripe (`ids / shards / 64`: the
//! routing and stripe hashes spread ids evenly):
//! - arena: `floor(r / CHUNK_ROWS)` full chunks plus the last one, which
//!   grows by doubling from 16 rows, times `row_bytes`;
//! - index: `index::capacity_for(r, stripe) * BUCKET_BYTES` (4) bytes (each
//!   stripe's index grows along its own ladder of capacities);
//! - nothing else for a table without admission or tombstones.
//!
//! Checked against the measured RSS of a shard by `ps-server bench`
//! (BENCHMARKS.md).

use crate::index::{capacity_for, BUCKET_BYTES};
use crate::row::RowLayout;
use crate::store::{CHUNK_ROWS, NUM_STRIPES};

/// Bytes a process needs besides its tables (runtime, gRPC buffers, metrics),
/// measured as the RSS of an idle shard (about 20 MB) plus room for request
/// buffers.
pub const PROCESS_OVERHEAD_BYTES: u64 = 64 << 20;

/// Arena bytes of one stripe holding `rows` rows.
fn stripe_arena_bytes(rows: u64, row_bytes: u64) -> u64 {
    if rows == 0 {
        return 0;
    }
    let chunk = CHUNK_ROWS as u64;
    let (full, rest) = (rows / chunk, rows % chunk);
    let mut last = 0u64;
    if rest > 0 {
        last = 16;
        while last < rest {
            last = (last * 2).min(chunk);
        }
    }
    (full * chunk + last) * row_bytes
}

/// Bytes one shard allocates for `rows` rows of a table with `layout`
/// (arena + index over its 64 stripes).
pub fn table_bytes(rows: u64, layout: &RowLayout) -> u64 {
    let stripes = NUM_STRIPES as u64;
    let row_bytes = layout.bytes() as u64;
    (0..stripes)
        .map(|s| {
            // Spread the remainder over the first stripes.
            let r = rows / stripes + u64::from(s < rows % stripes);
            stripe_arena_bytes(r, row_bytes)
                + capacity_for(r as usize, s as u32) as u64 * BUCKET_BYTES as u64
        })
        .sum()
}

/// A sizing of one table over a number of shards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Shards.
    pub shards: u32,
    /// Rows per shard (the largest shard's share).
    pub rows_per_shard: u64,
    /// Arena bytes of one row.
    pub row_bytes: u64,
    /// Table bytes per shard (arena + index).
    pub table_bytes_per_shard: u64,
    /// All-in bytes per row (table bytes / rows).
    pub bytes_per_row: f64,
    /// Process bytes per shard: table + [`PROCESS_OVERHEAD_BYTES`].
    pub process_bytes_per_shard: u64,
}

/// Sizes `ids` rows of `layout` over `shards` shards.
pub fn plan(ids: u64, layout: &RowLayout, shards: u32) -> Plan {
    let shards = shards.max(1);
    let rows = ids.div_ceil(u64::from(shards));
    let bytes = table_bytes(rows, layout);
    Plan {
        shards,
        rows_per_shard: rows,
        row_bytes: layout.bytes() as u64,
        table_bytes_per_shard: bytes,
        bytes_per_row: if rows > 0 {
            bytes as f64 / rows as f64
        } else {
            0.0
        },
        process_bytes_per_shard: bytes + PROCESS_OVERHEAD_BYTES,
    }
}

/// The fewest shards (up to 4096) whose processes fit in `memory_per_shard`
/// bytes each, or `None` when even 4096 do not.
pub fn shards_needed(ids: u64, layout: &RowLayout, memory_per_shard: u64) -> Option<Plan> {
    (1..=4096u32)
        .map(|s| plan(ids, layout, s))
        .find(|p| p.process_bytes_per_shard <= memory_per_shard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::WeightPrecision;
    use crate::store::{Table, TableSpec};
    use ember_proto::v1::{
        optimizer_config::Kind, Adagrad, OptimizerConfig, Precision, TableConfig,
    };

    /// The formula equals the store's own accounting after really inserting
    /// the rows (same growth rules, not an estimate).
    #[test]
    fn plan_equals_the_store_accounting() {
        let cfg = TableConfig {
            name: "t".into(),
            dim: 18,
            precision: Precision::F16 as i32,
            optimizer: Some(OptimizerConfig {
                kind: Some(Kind::RowwiseAdagrad(Adagrad {
                    lr: 0.1,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        let t = Table::new(TableSpec::from_config(cfg).unwrap());
        let n = 300_000u64;
        let ids: Vec<u64> = (0..n).map(|i| i * 7919 + 3).collect();
        for c in ids.chunks(4096) {
            t.push(c, &vec![0.0; c.len() * 18], &[], 1);
        }
        let st = t.stats();
        let layout = t.layout();
        // The store's stripes are not exactly even; the plan spreads evenly.
        let p = plan(n, &layout, 1);
        let err = (p.table_bytes_per_shard as f64 - st.resident_bytes as f64).abs()
            / st.resident_bytes as f64;
        assert!(err < 0.02, "plan {p:?} vs store {st:?}");
        assert_eq!(p.row_bytes, 56);
        // At scale the chunk slack vanishes: the aim is <= 64 B/row all-in.
        let big = plan(100_000_000, &layout, 2);
        assert!(
            big.bytes_per_row > 56.0 && big.bytes_per_row <= 64.0,
            "{big:?}"
        );
    }

    #[test]
    fn shards_needed_is_the_smallest_that_fits() {
        let l = RowLayout::new(18, 1, WeightPrecision::F16);
        let p = shards_needed(1_000_000_000, &l, 16 << 30).unwrap();
        assert!(p.process_bytes_per_shard <= 16 << 30);
        assert!(plan(1_000_000_000, &l, p.shards - 1).process_bytes_per_shard > 16 << 30);
        assert_eq!(shards_needed(10, &l, 1 << 20), None);
    }
}
