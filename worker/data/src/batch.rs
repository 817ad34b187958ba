//! The contract between the data path and the models: a [`Sample`] as read
//! from a file, and a [`Batch`] of samples with per-table deduplicated ids.
//!
//! The models never own sparse tables. For each sparse table a batch carries
//! the unique ids it touches ([`SparseIds::unique`], padding id 0 excluded) and,
//! for every sample position, an index into that list. Index
//! `unique.len()` means "padding": models append one constant zero row to the
//! pulled `[U, D]` block, so padded positions read zeros and their gradient is
//! dropped. History is left-aligned: steps `0..lens[b]` of row `b` are valid,
//! oldest first; `mask[b*T + t]` is 1.0 for valid steps and 0.0 after.

use rustc_hash::FxHashMap;

use crate::schema::FeatureSchema;
use crate::schema_format::steps_of;

/// Name of the item-id table.
pub const ITEM_TABLE: &str = "item";
/// Name of the category-id table.
pub const CAT_TABLE: &str = "cat";
/// Name of the user-id table.
pub const USER_TABLE: &str = "user";

/// One training or test sample in DIEN's text format (see `../shared/DATA.md`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Click label, 0.0 or 1.0.
    pub label: f32,
    /// User id.
    pub user: u64,
    /// Target item id.
    pub item: u64,
    /// Category of the target item.
    pub cat: u64,
    /// Behaviour history: item ids, oldest first.
    pub hist_items: Vec<u64>,
    /// Categories of the history items.
    pub hist_cats: Vec<u64>,
    /// DIEN: one sampled negative item per history step (empty if absent).
    pub neg_items: Vec<u64>,
    /// DIEN: categories of the negative items.
    pub neg_cats: Vec<u64>,
    /// Schema files ([`crate::schema`]): the ids of every sparse and
    /// multi-hot feature, in [`FeatureSchema::sparse`](crate::schema::FeatureSchema::sparse) order (the legacy
    /// fields above stay empty). One id for a sparse feature; up to
    /// `max_len` for a multi-hot one; one per step for a sparse behaviour
    /// feature; `max_len` per step (zero-padded) for a multi-hot behaviour
    /// feature. Every behaviour feature has the same number of steps.
    pub fields: Vec<Vec<u64>>,
    /// Schema files: the DIEN negative sequence of every behaviour feature
    /// (in [`FeatureSchema::pairs`](crate::schema::FeatureSchema::pairs) order, laid out like the behaviour
    /// feature), or empty when the file has none.
    pub neg_fields: Vec<Vec<u64>>,
    /// Schema files: the dense features' values, in [`FeatureSchema::dense`](crate::schema::FeatureSchema::dense) order.
    pub dense: Vec<f32>,
}

/// The unique ids of one sparse table in a batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseIds {
    /// Table name ([`ITEM_TABLE`], [`CAT_TABLE`], [`USER_TABLE`]).
    pub table: String,
    /// Unique non-padding ids, in first-seen order.
    pub unique: Vec<u64>,
    /// Occurrences of each unique id in the batch (pushed to the shards for
    /// online feature counts).
    pub counts: Vec<u32>,
}

impl SparseIds {
    /// Index used by padded positions (one past the last unique id).
    pub fn pad_index(&self) -> u32 {
        self.unique.len() as u32
    }
}

/// A padded mini-batch of `B` samples with history length `T`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Number of samples B.
    pub batch_size: usize,
    /// Padded history length T (the longest history in this batch, capped by
    /// the reader's `max_len`; at least 1).
    pub max_len: usize,
    /// Labels `[B]`.
    pub labels: Vec<f32>,
    /// Raw user ids `[B]` (for GAUC grouping).
    pub user_ids: Vec<u64>,
    /// Valid history length per sample `[B]`.
    pub lens: Vec<usize>,
    /// History mask `[B*T]`, 1.0 on valid steps.
    pub mask: Vec<f32>,
    /// Item table ids of the batch (targets, history and DIEN negatives).
    pub items: SparseIds,
    /// Category table ids of the batch.
    pub cats: SparseIds,
    /// User table ids of the batch.
    pub users: SparseIds,
    /// `[B]` index of each user into `users.unique`.
    pub user_idx: Vec<u32>,
    /// `[B]` index of each target item into `items.unique`.
    pub item_idx: Vec<u32>,
    /// `[B]` index of each target category into `cats.unique`.
    pub cat_idx: Vec<u32>,
    /// `[B*T]` index of each history item into `items.unique` (pad = `items.pad_index()`).
    pub hist_item_idx: Vec<u32>,
    /// `[B*T]` index of each history category into `cats.unique`.
    pub hist_cat_idx: Vec<u32>,
    /// `[B*T]` DIEN negative history items (None when the samples carry none).
    pub neg_item_idx: Option<Vec<u32>>,
    /// `[B*T]` DIEN negative history categories.
    pub neg_cat_idx: Option<Vec<u32>>,
    /// Schema batches ([`Batch::from_schema_samples`]): the ids of every
    /// embedding table of the schema, in
    /// [`FeatureSchema::tables`](crate::schema::FeatureSchema::tables) order
    /// (the legacy `items`, `cats`, `users` and index arrays stay empty).
    pub schema_tables: Vec<SparseIds>,
    /// Schema batches: the index arrays of every sparse and multi-hot
    /// feature, in [`FeatureSchema::sparse`](crate::schema::FeatureSchema::sparse) order.
    pub features: Vec<FeatureIdx>,
    /// Schema batches: the dense features' values `[B, n_dense]`, row-major.
    pub dense: Vec<f32>,
}

/// The index array of one feature of a schema batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeatureIdx {
    /// Index of its table in [`Batch::schema_tables`].
    pub table: usize,
    /// Ids per position (1 for sparse, `max_len` for multi-hot).
    pub width: usize,
    /// Whether it is a behaviour feature.
    pub behaviour: bool,
    /// Indices into the table's unique ids (pad = its `pad_index()`):
    /// `[B * width]`, or `[B * T * width]` for a behaviour feature.
    pub idx: Vec<u32>,
    /// Behaviour features: the DIEN negatives `[B * T * width]` when every
    /// sample of the batch has them.
    pub neg: Option<Vec<u32>>,
}

/// Deduplicates ids of one table while indexing positions.
struct Dedup {
    table: String,
    map: FxHashMap<u64, u32>,
    unique: Vec<u64>,
    counts: Vec<u32>,
}

impl Dedup {
    fn new(table: &str) -> Self {
        Dedup {
            table: table.to_string(),
            map: FxHashMap::default(),
            unique: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Index of `id` (u32::MAX for padding id 0, fixed up in `finish`).
    fn index(&mut self, id: u64) -> u32 {
        if id == 0 {
            return u32::MAX;
        }
        let next = self.unique.len() as u32;
        let idx = *self.map.entry(id).or_insert(next);
        if idx == next {
            self.unique.push(id);
            self.counts.push(0);
        }
        self.counts[idx as usize] += 1;
        idx
    }

    fn finish(self, idx_lists: &mut [&mut Vec<u32>]) -> SparseIds {
        let pad = self.unique.len() as u32;
        for list in idx_lists.iter_mut() {
            for i in list.iter_mut() {
                if *i == u32::MAX {
                    *i = pad;
                }
            }
        }
        SparseIds {
            table: self.table,
            unique: self.unique,
            counts: self.counts,
        }
    }
}

impl Batch {
    /// Id dropout (the DIN paper's "Dropout" baseline, Sec. 6.3: randomly
    /// discard feature ids of each sample): every goods-id occurrence of the
    /// batch (targets and valid history steps; not DIEN's negatives) is
    /// replaced by the zero pad row with probability `p`, independently,
    /// drawing from `rng`. Categories, the mask and the per-id counts are
    /// unchanged, so a dropped occurrence still counts for n_j but gets no
    /// gradient. Returns how many occurrences were dropped.
    pub fn drop_item_ids(&mut self, p: f64, rng: &mut ember_proto::rng::SplitMix64) -> usize {
        if p <= 0.0 {
            return 0;
        }
        if self.is_schema() {
            return self.drop_schema_item_ids(p, rng);
        }
        let pad = self.items.pad_index();
        let mut dropped = 0;
        for i in self.item_idx.iter_mut() {
            if rng.next_f64() < p {
                *i = pad;
                dropped += 1;
            }
        }
        let t = self.max_len;
        for (b, &len) in self.lens.iter().enumerate() {
            for i in &mut self.hist_item_idx[b * t..b * t + len.min(t)] {
                if *i != pad && rng.next_f64() < p {
                    *i = pad;
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// [`Batch::drop_item_ids`] of a schema batch: the features on the
    /// [`ITEM_TABLE`] table (targets, then valid behaviour steps).
    fn drop_schema_item_ids(&mut self, p: f64, rng: &mut ember_proto::rng::SplitMix64) -> usize {
        let Some(ti) = self
            .schema_tables
            .iter()
            .position(|t| t.table == ITEM_TABLE)
        else {
            return 0;
        };
        let pad = self.schema_tables[ti].pad_index();
        let (t, lens) = (self.max_len, &self.lens);
        let mut dropped = 0;
        for f in self.features.iter_mut().filter(|f| f.table == ti) {
            let w = f.width;
            for (b, &len) in lens.iter().enumerate() {
                let range = if f.behaviour {
                    b * t * w..(b * t + len.min(t)) * w
                } else {
                    b * w..(b + 1) * w
                };
                for i in &mut f.idx[range] {
                    if *i != pad && rng.next_f64() < p {
                        *i = pad;
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    /// Builds a batch from samples, keeping at most the last `max_len` history
    /// steps of each. DIEN negatives are included when every sample has them.
    pub fn from_samples(samples: &[Sample], max_len: usize) -> Batch {
        let b = samples.len();
        let t = samples
            .iter()
            .map(|s| s.hist_items.len().min(max_len))
            .max()
            .unwrap_or(0)
            .max(1);
        let with_neg = !samples.is_empty()
            && samples
                .iter()
                .all(|s| s.neg_items.len() == s.hist_items.len() && !s.neg_items.is_empty());
        let mut items = Dedup::new(ITEM_TABLE);
        let mut cats = Dedup::new(CAT_TABLE);
        let mut users = Dedup::new(USER_TABLE);
        let mut batch = Batch {
            batch_size: b,
            max_len: t,
            labels: Vec::with_capacity(b),
            user_ids: Vec::with_capacity(b),
            lens: Vec::with_capacity(b),
            mask: vec![0.0; b * t],
            hist_item_idx: vec![u32::MAX; b * t],
            hist_cat_idx: vec![u32::MAX; b * t],
            neg_item_idx: with_neg.then(|| vec![u32::MAX; b * t]),
            neg_cat_idx: with_neg.then(|| vec![u32::MAX; b * t]),
            ..Batch::default()
        };
        for (r, s) in samples.iter().enumerate() {
            batch.labels.push(s.label);
            batch.user_ids.push(s.user);
            batch.user_idx.push(users.index(s.user));
            batch.item_idx.push(items.index(s.item));
            batch.cat_idx.push(cats.index(s.cat));
            let n = s.hist_items.len();
            let start = n.saturating_sub(max_len);
            let len = n - start;
            batch.lens.push(len);
            for k in 0..len {
                let pos = r * t + k;
                batch.mask[pos] = 1.0;
                batch.hist_item_idx[pos] = items.index(s.hist_items[start + k]);
                batch.hist_cat_idx[pos] =
                    cats.index(s.hist_cats.get(start + k).copied().unwrap_or(0));
                if let (Some(ni), Some(nc)) =
                    (batch.neg_item_idx.as_mut(), batch.neg_cat_idx.as_mut())
                {
                    ni[pos] = items.index(s.neg_items[start + k]);
                    nc[pos] = cats.index(s.neg_cats.get(start + k).copied().unwrap_or(0));
                }
            }
        }
        {
            let mut lists: Vec<&mut Vec<u32>> = vec![&mut batch.item_idx, &mut batch.hist_item_idx];
            if let Some(ni) = batch.neg_item_idx.as_mut() {
                lists.push(ni);
            }
            batch.items = items.finish(&mut lists);
        }
        {
            let mut lists: Vec<&mut Vec<u32>> = vec![&mut batch.cat_idx, &mut batch.hist_cat_idx];
            if let Some(nc) = batch.neg_cat_idx.as_mut() {
                lists.push(nc);
            }
            batch.cats = cats.finish(&mut lists);
        }
        batch.users = users.finish(&mut [&mut batch.user_idx]);
        batch
    }

    /// Total id occurrences over the number of unique ids, over all tables
    /// (the in-batch dedup ratio, >= 1).
    pub fn dedup_ratio(&self) -> f64 {
        let tables = self.tables();
        let occ: u64 = tables
            .iter()
            .map(|s| s.counts.iter().map(|c| u64::from(*c)).sum::<u64>())
            .sum();
        let uniq: usize = tables.iter().map(|s| s.unique.len()).sum();
        if uniq == 0 {
            1.0
        } else {
            occ as f64 / uniq as f64
        }
    }

    /// The samples `range` of this batch as a batch of their own that keeps
    /// this batch's unique ids (and counts) per table and its padded length
    /// `T`: its index arrays still point into the same unique lists, so rows
    /// pulled for the whole batch serve every part, and the parts' sparse
    /// gradients (each `[U * D]` over the same ids) add up to the whole's.
    /// Used to split a training step across threads. The range is clamped
    /// to `0..batch_size`.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        let hi = range.end.min(self.batch_size);
        let lo = range.start.min(hi);
        let b = self.batch_size;
        let t = self.max_len;
        // A per-sample array of `w` values per sample, sliced to the range.
        fn per<T: Clone>(v: &[T], b: usize, lo: usize, hi: usize) -> Vec<T> {
            if b == 0 || v.is_empty() {
                return Vec::new();
            }
            let w = v.len() / b;
            v[lo * w..hi * w].to_vec()
        }
        Batch {
            batch_size: hi - lo,
            max_len: t,
            labels: per(&self.labels, b, lo, hi),
            user_ids: per(&self.user_ids, b, lo, hi),
            lens: per(&self.lens, b, lo, hi),
            mask: per(&self.mask, b, lo, hi),
            items: self.items.clone(),
            cats: self.cats.clone(),
            users: self.users.clone(),
            user_idx: per(&self.user_idx, b, lo, hi),
            item_idx: per(&self.item_idx, b, lo, hi),
            cat_idx: per(&self.cat_idx, b, lo, hi),
            hist_item_idx: per(&self.hist_item_idx, b, lo, hi),
            hist_cat_idx: per(&self.hist_cat_idx, b, lo, hi),
            neg_item_idx: self.neg_item_idx.as_ref().map(|v| per(v, b, lo, hi)),
            neg_cat_idx: self.neg_cat_idx.as_ref().map(|v| per(v, b, lo, hi)),
            schema_tables: self.schema_tables.clone(),
            features: self
                .features
                .iter()
                .map(|f| FeatureIdx {
                    table: f.table,
                    width: f.width,
                    behaviour: f.behaviour,
                    idx: per(&f.idx, b, lo, hi),
                    neg: f.neg.as_ref().map(|v| per(v, b, lo, hi)),
                })
                .collect(),
            dense: per(&self.dense, b, lo, hi),
        }
    }

    /// Whether this batch was built from schema samples.
    pub fn is_schema(&self) -> bool {
        !self.schema_tables.is_empty()
    }

    /// The sparse tables of this batch: a schema batch's tables in schema
    /// order, else the fixed order item, cat, user.
    pub fn tables(&self) -> Vec<&SparseIds> {
        if self.is_schema() {
            self.schema_tables.iter().collect()
        } else {
            vec![&self.items, &self.cats, &self.users]
        }
    }

    /// Builds a batch from samples of a schema file (see [`Sample::fields`]),
    /// keeping at most the last `max_len` behaviour steps of each. DIEN
    /// negatives are included when every sample has them. Ids are
    /// deduplicated per table sample by sample, features in schema order.
    pub fn from_schema_samples(
        samples: &[Sample],
        max_len: usize,
        schema: &FeatureSchema,
    ) -> Batch {
        let b = samples.len();
        let steps: Vec<usize> = samples.iter().map(|s| steps_of(s, schema)).collect();
        let t = steps
            .iter()
            .map(|&n| n.min(max_len))
            .max()
            .unwrap_or(0)
            .max(1);
        let with_neg = !samples.is_empty()
            && samples
                .iter()
                .all(|s| !s.neg_fields.is_empty() && s.neg_fields.len() == schema.pairs().len());
        let tables = schema.tables();
        let mut dedup: Vec<Dedup> = tables.iter().map(|(n, _)| Dedup::new(n)).collect();
        let sparse = schema.sparse();
        let pairs = schema.pairs();
        let mut feats: Vec<FeatureIdx> = sparse
            .iter()
            .map(|&i| {
                let f = &schema.features()[i];
                let table = tables
                    .iter()
                    .position(|(n, _)| n == f.table_name())
                    .unwrap_or(0);
                let width = f.width();
                let n = if f.is_behaviour() {
                    b * t * width
                } else {
                    b * width
                };
                FeatureIdx {
                    table,
                    width,
                    behaviour: f.is_behaviour(),
                    idx: vec![u32::MAX; n],
                    neg: (f.is_behaviour() && with_neg).then(|| vec![u32::MAX; n]),
                }
            })
            .collect();
        // Slot in `Sample::neg_fields` of each sparse feature (behaviour only).
        let neg_slot: Vec<Option<usize>> = sparse
            .iter()
            .map(|&i| pairs.iter().position(|p| p.behaviour == i))
            .collect();
        let n_dense = schema.dense().len();
        let mut batch = Batch {
            batch_size: b,
            max_len: t,
            labels: Vec::with_capacity(b),
            user_ids: Vec::with_capacity(b),
            lens: Vec::with_capacity(b),
            mask: vec![0.0; b * t],
            dense: Vec::with_capacity(b * n_dense),
            ..Batch::default()
        };
        for (r, s) in samples.iter().enumerate() {
            batch.labels.push(s.label);
            batch.user_ids.push(s.user);
            let n = steps[r];
            let start = n.saturating_sub(max_len);
            let len = n - start;
            batch.lens.push(len);
            for k in 0..len {
                batch.mask[r * t + k] = 1.0;
            }
            for (slot, f) in feats.iter_mut().enumerate() {
                let d = &mut dedup[f.table];
                let ids = s.fields.get(slot).map_or(&[][..], |v| v.as_slice());
                let w = f.width;
                if !f.behaviour {
                    for (j, &id) in ids.iter().take(w).enumerate() {
                        f.idx[r * w + j] = d.index(id);
                    }
                    continue;
                }
                let neg = neg_slot[slot].and_then(|k| s.neg_fields.get(k));
                for k in 0..len {
                    let src = (start + k) * w;
                    let dst = (r * t + k) * w;
                    for j in 0..w {
                        f.idx[dst + j] = d.index(ids.get(src + j).copied().unwrap_or(0));
                    }
                    if let (Some(out), Some(neg)) = (f.neg.as_mut(), neg) {
                        for j in 0..w {
                            out[dst + j] = d.index(neg.get(src + j).copied().unwrap_or(0));
                        }
                    }
                }
            }
            batch
                .dense
                .extend((0..n_dense).map(|j| s.dense.get(j).copied().unwrap_or(0.0)));
        }
        for (ti, d) in dedup.into_iter().enumerate() {
            let mut lists: Vec<&mut Vec<u32>> = Vec::new();
            for f in feats.iter_mut().filter(|f| f.table == ti) {
                lists.push(&mut f.idx);
                if let Some(n) = f.neg.as_mut() {
                    lists.push(n);
                }
            }
            batch.schema_tables.push(d.finish(&mut lists));
        }
        batch.features = feats;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(label: f32, user: u64, item: u64, hist: &[u64]) -> Sample {
        Sample {
            label,
            user,
            item,
            cat: item % 3 + 1,
            hist_items: hist.to_vec(),
            hist_cats: hist.iter().map(|h| h % 3 + 1).collect(),
            ..Sample::default()
        }
    }

    #[test]
    fn ids_only_schema_batch_equals_the_legacy_batch() {
        use crate::schema_format::from_legacy;
        let mut a = s(1.0, 7, 10, &[11, 12, 10, 14]);
        a.neg_items = vec![20, 21, 22, 23];
        a.neg_cats = vec![1, 2, 3, 1];
        let mut b = s(0.0, 8, 13, &[11]);
        b.neg_items = vec![24];
        b.neg_cats = vec![2];
        let legacy_samples = vec![a, b];
        for with_user in [false, true] {
            let schema = FeatureSchema::ids_only(4, 4, with_user.then_some(2)).unwrap();
            let wide: Vec<Sample> = legacy_samples
                .iter()
                .map(|x| from_legacy(x, with_user))
                .collect();
            // max_len 3 truncates the first history to its last 3 steps.
            let l = Batch::from_samples(&legacy_samples, 3);
            let w = Batch::from_schema_samples(&wide, 3, &schema);
            assert!(w.is_schema() && !l.is_schema());
            assert_eq!(
                (w.max_len, &w.lens, &w.mask, &w.labels, &w.user_ids),
                (l.max_len, &l.lens, &l.mask, &l.labels, &l.user_ids)
            );
            let off = usize::from(with_user);
            assert_eq!(w.schema_tables[off], l.items);
            assert_eq!(w.schema_tables[off + 1], l.cats);
            if with_user {
                assert_eq!(w.schema_tables[0], l.users);
                assert_eq!(w.features[0].idx, l.user_idx);
            }
            let f = &w.features[off..];
            assert_eq!(
                (&f[0].idx, &f[1].idx, &f[2].idx, &f[3].idx),
                (&l.item_idx, &l.cat_idx, &l.hist_item_idx, &l.hist_cat_idx)
            );
            assert_eq!(f[2].neg, l.neg_item_idx);
            assert_eq!(f[3].neg, l.neg_cat_idx);
            assert_eq!(w.tables().len(), 2 + off);
        }
    }

    #[test]
    fn schema_batch_pads_multi_hot_and_keeps_dense() {
        let text = r#"
[[features]]
name = "movie"
kind = "sparse"
group = "ad"
table = "item"
dim = 2
[[features]]
name = "genres"
kind = "multi_hot"
max_len = 2
group = "ad"
table = "genre"
dim = 2
[[features]]
name = "hist_genres"
kind = "multi_hot"
max_len = 2
group = "behaviour"
table = "genre"
dim = 2
align = "genres"
[[features]]
name = "hist_movie"
kind = "sparse"
group = "behaviour"
table = "item"
dim = 2
align = "movie"
[[features]]
name = "age"
kind = "dense"
group = "user"
"#;
        let schema = FeatureSchema::from_toml(text).unwrap();
        let x = Sample {
            label: 1.0,
            user: 3,
            fields: vec![vec![5], vec![7], vec![7, 8, 9, 0], vec![5, 6]],
            dense: vec![0.5],
            ..Sample::default()
        };
        let y = Sample {
            label: 0.0,
            user: 4,
            fields: vec![vec![6], vec![8, 9], vec![], vec![]],
            dense: vec![-1.0],
            ..Sample::default()
        };
        let b = Batch::from_schema_samples(&[x, y], 10, &schema);
        assert_eq!(
            (b.batch_size, b.max_len, b.lens.clone()),
            (2, 2, vec![2, 0])
        );
        assert_eq!(b.schema_tables[0].unique, vec![5, 6]);
        assert_eq!(b.schema_tables[1].unique, vec![7, 8, 9]);
        let gp = 3; // genre pad index
        assert_eq!(b.features[1].idx, vec![0, gp, 1, 2]);
        assert_eq!(b.features[2].idx, vec![0, 1, 2, gp, gp, gp, gp, gp]);
        assert_eq!(b.features[3].idx, vec![0, 1, 2, 2]);
        assert_eq!(b.dense, vec![0.5, -1.0]);
        assert_eq!(b.schema_tables[0].counts, vec![2, 2]);
        let mut rng = ember_proto::rng::SplitMix64::new(1);
        let mut d = b.clone();
        assert_eq!(d.drop_item_ids(0.999, &mut rng), 4);
        assert!(d.features[0]
            .idx
            .iter()
            .chain(&d.features[3].idx[..2])
            .all(|&i| i == 2));
        assert_eq!(d.features[1], b.features[1]);
        // A part keeps the unique ids and T, and slices every per-sample array.
        let second = b.rows(1..2);
        assert_eq!((second.batch_size, second.max_len), (1, 2));
        assert_eq!(second.schema_tables, b.schema_tables);
        assert_eq!(second.features[1].idx, vec![1, 2]);
        assert_eq!(second.features[2].idx, vec![gp; 4]);
        assert_eq!(second.features[3].idx, vec![2, 2]);
        assert_eq!(
            (second.dense.clone(), second.labels.clone()),
            (vec![-1.0], vec![0.0])
        );
    }

    /// `rows` of a fixed-layout batch: every per-sample array sliced (history
    /// and negatives per step), the unique ids kept, parts in order make the
    /// whole again, and an out-of-range request is clamped.
    #[test]
    fn rows_split_a_batch_into_parts_over_the_same_ids() {
        let mut samples = vec![
            s(1.0, 1, 10, &[11, 12]),
            s(0.0, 2, 11, &[10]),
            s(1.0, 3, 12, &[11]),
        ];
        for x in &mut samples {
            x.neg_items = x.hist_items.iter().map(|h| h + 100).collect();
            x.neg_cats = x.hist_cats.clone();
        }
        let b = Batch::from_samples(&samples, 5);
        let parts = [b.rows(0..1), b.rows(1..3)];
        assert_eq!(parts[1].batch_size, 2);
        let cat =
            |f: &dyn Fn(&Batch) -> Vec<u32>| -> Vec<u32> { parts.iter().flat_map(f).collect() };
        assert_eq!(cat(&|p| p.hist_item_idx.clone()), b.hist_item_idx);
        assert_eq!(
            cat(&|p| p.neg_item_idx.clone().unwrap()),
            b.neg_item_idx.clone().unwrap()
        );
        assert_eq!(cat(&|p| p.item_idx.clone()), b.item_idx);
        assert_eq!(cat(&|p| p.user_idx.clone()), b.user_idx);
        for p in &parts {
            assert_eq!(
                (&p.items, &p.cats, &p.users, p.max_len),
                (&b.items, &b.cats, &b.users, b.max_len)
            );
            assert_eq!(p.mask.len(), p.batch_size * p.max_len);
        }
        assert_eq!(parts[1].lens, vec![1, 1]);
        assert_eq!(b.rows(2..9).batch_size, 1);
        assert_eq!(b.rows(7..9).batch_size, 0);
    }

    #[test]
    fn dedups_and_pads() {
        let batch = Batch::from_samples(&[s(1.0, 7, 10, &[11, 12, 10]), s(0.0, 7, 13, &[11])], 100);
        assert_eq!(batch.batch_size, 2);
        assert_eq!(batch.max_len, 3);
        assert_eq!(batch.items.unique, vec![10, 11, 12, 13]);
        assert_eq!(batch.items.counts, vec![2, 2, 1, 1]);
        assert_eq!(batch.item_idx, vec![0, 3]);
        // Second row: one valid step, then two pads (index 4 == unique.len()).
        assert_eq!(batch.hist_item_idx, vec![1, 2, 0, 1, 4, 4]);
        assert_eq!(batch.mask, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.lens, vec![3, 1]);
        assert_eq!(batch.users.unique, vec![7]);
        assert_eq!(batch.user_idx, vec![0, 0]);
        assert!(batch.neg_item_idx.is_none());
        assert!(batch.dedup_ratio() > 1.0);
    }

    #[test]
    fn truncates_to_last_steps_and_keeps_negatives() {
        let mut a = s(1.0, 1, 5, &[1, 2, 3, 4]);
        a.neg_items = vec![21, 22, 23, 24];
        a.neg_cats = vec![1, 1, 1, 1];
        let batch = Batch::from_samples(&[a], 2);
        assert_eq!(batch.max_len, 2);
        let hist: Vec<u64> = batch
            .hist_item_idx
            .iter()
            .map(|&i| batch.items.unique[i as usize])
            .collect();
        assert_eq!(hist, vec![3, 4]);
        let neg: Vec<u64> = batch
            .neg_item_idx
            .unwrap()
            .iter()
            .map(|&i| batch.items.unique[i as usize])
            .collect();
        assert_eq!(neg, vec![23, 24]);
    }

    #[test]
    fn empty_history_gets_one_padded_step() {
        let batch = Batch::from_samples(&[s(0.0, 1, 5, &[])], 100);
        assert_eq!(batch.max_len, 1);
        assert_eq!(batch.mask, vec![0.0]);
        assert_eq!(batch.hist_item_idx, vec![batch.items.pad_index()]);
    }

    #[test]
    fn id_dropout_drops_goods_ids_at_the_rate_and_nothing_else() {
        let samples: Vec<Sample> = (0..200)
            .map(|u| {
                s(
                    1.0,
                    u,
                    1000 + u % 37,
                    &[1 + u % 11, 20 + u % 13, 40 + u % 7],
                )
            })
            .collect();
        let clean = Batch::from_samples(&samples, 100);
        let mut b = clean.clone();
        let mut rng = ember_proto::rng::SplitMix64::new(3);
        assert_eq!(b.drop_item_ids(0.0, &mut rng), 0);
        assert_eq!(b, clean);
        let dropped = b.drop_item_ids(0.5, &mut rng);
        // 200 targets + 600 history steps, each dropped with p = 0.5.
        assert!((330..=470).contains(&dropped), "{dropped} of 800");
        let pad = b.items.pad_index();
        let changed = |x: &[u32], y: &[u32]| x.iter().zip(y).filter(|(a, b)| a != b).count();
        assert_eq!(
            changed(&b.item_idx, &clean.item_idx) + changed(&b.hist_item_idx, &clean.hist_item_idx),
            dropped
        );
        assert!(
            b.item_idx
                .iter()
                .chain(&b.hist_item_idx)
                .filter(|&&i| i == pad)
                .count()
                >= dropped
        );
        // Categories, mask, counts and ids untouched.
        assert_eq!(b.hist_cat_idx, clean.hist_cat_idx);
        assert_eq!(b.cat_idx, clean.cat_idx);
        assert_eq!(b.mask, clean.mask);
        assert_eq!(b.items, clean.items);
        // Padded history steps stay padded; the same seed drops the same ids.
        let mut c = clean.clone();
        let mut d = clean.clone();
        c.drop_item_ids(0.3, &mut ember_proto::rng::SplitMix64::new(9));
        d.drop_item_ids(0.3, &mut ember_proto::rng::SplitMix64::new(9));
        assert_eq!(c, d);
    }
}
