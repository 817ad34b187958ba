//! Evaluation metrics: AUC, GAUC, logloss (CTR models) and Recall@K / MRR@K
//! (next-item models such as GRU4Rec).
//!
//! Conventions: a label is positive when `> 0.5`; ties in score count one half
//! (AUC is the Mann-Whitney statistic with mid-ranks). Functions that need both
//! classes return `None` when one is missing.

use std::collections::HashMap;

/// Area under the ROC curve with ties counted one half:
/// `AUC = (sum of mid-ranks of positives - P(P+1)/2) / (P * N)`.
///
/// Returns `None` when all labels belong to one class.
pub fn auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    assert_eq!(
        scores.len(),
        labels.len(),
        "auc: scores and labels differ in length"
    );
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut pos = 0f64;
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < order.len() {
        // Group of tied scores: ranks i+1 ..= j, mid-rank (i+1+j)/2.
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid = (i + 1 + j + 1) as f64 / 2.0;
        for &k in &order[i..=j] {
            if labels[k] > 0.5 {
                pos += 1.0;
                rank_sum += mid;
            }
        }
        i = j + 1;
    }
    let neg = scores.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Group AUC: `sum_u n_u * AUC_u / sum_u n_u` over the users `u` that have both
/// labels, where `n_u` is the number of impressions of `u`. Users with a single
/// class are skipped. Returns `None` when no user has both labels.
pub fn gauc(scores: &[f32], labels: &[f32], users: &[u64]) -> Option<f64> {
    assert_eq!(
        scores.len(),
        labels.len(),
        "gauc: scores and labels differ in length"
    );
    assert_eq!(
        scores.len(),
        users.len(),
        "gauc: scores and users differ in length"
    );
    let mut groups: HashMap<u64, (Vec<f32>, Vec<f32>)> = HashMap::new();
    for i in 0..scores.len() {
        let g = groups.entry(users[i]).or_default();
        g.0.push(scores[i]);
        g.1.push(labels[i]);
    }
    let mut num = 0f64;
    let mut den = 0f64;
    for (s, l) in groups.values() {
        if let Some(a) = auc(s, l) {
            num += a * s.len() as f64;
            den += s.len() as f64;
        }
    }
    (den > 0.0).then(|| num / den)
}

/// Mean binary cross entropy of probabilities `probs` against `labels`, with the
/// probabilities clipped to `[1e-7, 1 - 1e-7]`.
pub fn logloss(probs: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(
        probs.len(),
        labels.len(),
        "logloss: probs and labels differ in length"
    );
    if probs.is_empty() {
        return 0.0;
    }
    let eps = 1e-7f64;
    let s: f64 = probs
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = (p as f64).clamp(eps, 1.0 - eps);
            let y = y as f64;
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    s / probs.len() as f64
}

/// 0-based rank of candidate `target` among `scores`: the number of candidates
/// scoring strictly higher (ties are resolved in the target's favour, as in the
/// GRU4Rec evaluation code).
pub fn rank_of(scores: &[f32], target: usize) -> usize {
    let t = scores[target];
    scores.iter().filter(|&&s| s > t).count()
}

/// Accumulates Recall@K and MRR@K of next-item predictions from 0-based ranks.
///
/// Recall@K = fraction of events whose target has rank < K;
/// MRR@K = mean of `1 / (rank + 1)` over events, counting 0 when rank >= K.
#[derive(Debug, Clone, Default)]
pub struct RankingMetrics {
    /// The cut-off K.
    pub k: usize,
    hits: u64,
    rr: f64,
    n: u64,
}

impl RankingMetrics {
    /// New accumulator with cut-off `k`.
    pub fn new(k: usize) -> Self {
        RankingMetrics {
            k,
            ..Default::default()
        }
    }

    /// Adds one event whose target has 0-based rank `rank`.
    pub fn add_rank(&mut self, rank: usize) {
        self.n += 1;
        if rank < self.k {
            self.hits += 1;
            self.rr += 1.0 / (rank as f64 + 1.0);
        }
    }

    /// Number of events seen.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Recall@K (0 when no events).
    pub fn recall(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.hits as f64 / self.n as f64
        }
    }

    /// MRR@K (0 when no events).
    pub fn mrr(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.rr / self.n as f64
        }
    }
}

/// Recall@K and MRR@K of a list of 0-based ranks.
pub fn recall_mrr_at_k(ranks: &[usize], k: usize) -> (f64, f64) {
    let mut m = RankingMetrics::new(k);
    for &r in ranks {
        m.add_rank(r);
    }
    (m.recall(), m.mrr())
}

/// Conservative 0-based rank of `target` in a full ranking: the number of
/// other candidates `j` (not in `exclude`) with `scores[j] >= scores[target]`,
/// so ties count against the target (the official GRU4Rec "conservative"
/// mode; constant scores never look good). `exclude` must be distinct and
/// may contain `target` (it is never excluded from itself).
pub fn rank_conservative(scores: &[f32], target: usize, exclude: &[usize]) -> usize {
    let t = scores[target];
    let ahead = scores.iter().filter(|&&s| s >= t).count().saturating_sub(1);
    let skipped = exclude
        .iter()
        .filter(|&&j| j != target && scores.get(j).is_some_and(|&s| s >= t))
        .count();
    ahead - skipped
}

/// Recall@K and MRR@K for several K, over all items and with the user's
/// already-seen items excluded from the ranking (the two protocols of the
/// sequential-recommendation literature).
#[derive(Debug, Clone, Default)]
pub struct FullRankEval {
    /// One accumulator per K, ranking every item.
    pub all: Vec<RankingMetrics>,
    /// One accumulator per K, seen items excluded.
    pub unseen: Vec<RankingMetrics>,
}

impl FullRankEval {
    /// Accumulators for the cut-offs `ks`.
    pub fn new(ks: &[usize]) -> Self {
        FullRankEval {
            all: ks.iter().map(|&k| RankingMetrics::new(k)).collect(),
            unseen: ks.iter().map(|&k| RankingMetrics::new(k)).collect(),
        }
    }

    /// Adds one event: `scores` over every item, the `target`, and the
    /// distinct items the user has already seen.
    pub fn add(&mut self, scores: &[f32], target: usize, seen: &[usize]) {
        let r_all = rank_conservative(scores, target, &[]);
        let r_unseen = rank_conservative(scores, target, seen);
        self.all.iter_mut().for_each(|m| m.add_rank(r_all));
        self.unseen.iter_mut().for_each(|m| m.add_rank(r_unseen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn auc_hand_cases() {
        // Perfect ranking.
        assert!(close(
            auc(&[0.1, 0.2, 0.8, 0.9], &[0., 0., 1., 1.]).unwrap(),
            1.0
        ));
        // Reversed.
        assert!(close(
            auc(&[0.9, 0.8, 0.2, 0.1], &[0., 0., 1., 1.]).unwrap(),
            0.0
        ));
        // Pairs (pos, neg): (0.8>0.5) (0.8>0.3) (0.4<0.5) (0.4>0.3): 3/4.
        assert!(close(
            auc(&[0.8, 0.4, 0.5, 0.3], &[1., 1., 0., 0.]).unwrap(),
            0.75
        ));
        // All tied: 0.5.
        assert!(close(auc(&[0.5; 4], &[1., 0., 1., 0.]).unwrap(), 0.5));
        // One tie pair among 2x2: pos {0.7, 0.5}, neg {0.5, 0.1}:
        // (0.7,0.5)=1 (0.7,0.1)=1 (0.5,0.5)=0.5 (0.5,0.1)=1 -> 3.5/4.
        assert!(close(
            auc(&[0.7, 0.5, 0.5, 0.1], &[1., 1., 0., 0.]).unwrap(),
            0.875
        ));
        assert!(auc(&[0.1, 0.2], &[1., 1.]).is_none());
        assert!(auc(&[], &[]).is_none());
    }

    #[test]
    fn gauc_weights_users_and_skips_single_class() {
        let scores = [0.9, 0.1, 0.2, 0.8, 0.6, 0.3, 0.5];
        let labels = [1., 0., 1., 0., 0., 1., 1.];
        let users = [1, 1, 2, 2, 2, 3, 3];
        // user 1: AUC 1 (n=2); user 2: pos 0.2 vs negs 0.8, 0.6 -> 0 (n=3);
        // user 3: single class, skipped.
        let g = gauc(&scores, &labels, &users).unwrap();
        assert!(close(g, (2.0 * 1.0 + 3.0 * 0.0) / 5.0));
        // Pairwise protocol tie: 0.5.
        assert!(close(gauc(&[0.4, 0.4], &[1., 0.], &[7, 7]).unwrap(), 0.5));
        assert!(gauc(&[0.4], &[1.], &[7]).is_none());
    }

    #[test]
    fn logloss_hand_case() {
        let l = logloss(&[0.5, 0.9], &[1., 0.]);
        let want = (-(0.5f64.ln()) - (0.1f32 as f64).ln()) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // Clipping keeps it finite.
        assert!(logloss(&[0.0], &[1.0]).is_finite());
    }

    #[test]
    fn recall_and_mrr() {
        assert_eq!(rank_of(&[0.1, 0.5, 0.3, 0.5], 2), 2);
        assert_eq!(rank_of(&[0.1, 0.5, 0.3, 0.5], 1), 0);
        let (r, m) = recall_mrr_at_k(&[0, 1, 5, 20], 2);
        assert!(close(r, 0.5));
        assert!(close(m, (1.0 + 0.5) / 4.0));
        let (r, m) = recall_mrr_at_k(&[], 20);
        assert_eq!((r, m), (0.0, 0.0));
    }

    #[test]
    fn conservative_rank_and_seen_exclusion() {
        let s = [0.5, 0.9, 0.5, 0.1, 0.7];
        // Target 0 (0.5): ahead are 1, 4 and the tie 2.
        assert_eq!(rank_conservative(&s, 0, &[]), 3);
        // Excluding 1 and 2 (and the target itself, which is ignored).
        assert_eq!(rank_conservative(&s, 0, &[0, 1, 2]), 1);
        // Constant scores put the target last.
        assert_eq!(rank_conservative(&[1.0; 5], 2, &[]), 4);
        let mut e = FullRankEval::new(&[1, 3]);
        e.add(&s, 0, &[1, 2]);
        assert_eq!((e.all[0].recall(), e.all[1].recall()), (0.0, 0.0));
        assert_eq!((e.unseen[0].recall(), e.unseen[1].recall()), (0.0, 1.0));
        assert!((e.unseen[1].mrr() - 0.5).abs() < 1e-12);
    }
}
