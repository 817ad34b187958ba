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
}

/// Deduplicates ids of one table while indexing positions.
struct Dedup {
    table: &'static str,
    map: FxHashMap<u64, u32>,
    unique: Vec<u64>,
    counts: Vec<u32>,
}

impl Dedup {
    fn new(table: &'static str) -> Self {
        Dedup {
            table,
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
            table: self.table.to_string(),
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
        let occ: u64 = [&self.items, &self.cats, &self.users]
            .iter()
            .map(|s| s.counts.iter().map(|c| u64::from(*c)).sum::<u64>())
            .sum();
        let uniq = self.items.unique.len() + self.cats.unique.len() + self.users.unique.len();
        if uniq == 0 {
            1.0
        } else {
            occ as f64 / uniq as f64
        }
    }

    /// The sparse tables of this batch, in a fixed order (item, cat, user).
    pub fn tables(&self) -> [&SparseIds; 3] {
        [&self.items, &self.cats, &self.users]
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
