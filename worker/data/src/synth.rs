//! Seeded synthetic CTR data at scale (10^7..10^9 item ids), with signal for
//! DIN: users have a few interest categories, histories mostly come from
//! them, and a target in an interest category is clicked with high
//! probability.
//!
//! # Generative model
//! - `C = n_cats` categories; each category owns the item ids `id` with
//!   `(id - 1) % C + 1 == cat`: `id = (rank - 1) * C + cat`, `rank` in
//!   `1..=n_ids / C`. So the category is derived from the id
//!   ([`SynthOptions::cat_of`]), and drawing an item of a given category is
//!   O(1).
//! - Popularity is Zipf-like at two levels: categories by a Zipf(`C`,
//!   `cat_zipf_s`) law, ranks within a category by Zipf(`n_ids / C`,
//!   `zipf_s`) (rejection-inversion sampling, `rand_distr::Zipf`: O(1) time
//!   and memory in the id space). Hot ids are the small ones.
//! - User `u` has `interests` categories drawn from the category law with a
//!   generator seeded by `derive_seed(seed ^ USER_KEY, u)` (fixed per user).
//! - Row `r` uses its own generator seeded by `derive_seed(seed, r)`, so any
//!   row can be generated alone: worker splits and resume are O(1). It draws
//!   a uniform user, a history length uniform in `min_hist..=max_hist`, each
//!   history item from one of the user's interests with probability
//!   `p_interest_hist` (else from the category law), the target from the
//!   interests with probability `p_target_interest`, and the label 1 with
//!   probability `p_click_interest` if the target's category is one of the
//!   user's interests, else `p_click_other`. With `with_neg`, one DIEN
//!   negative per history step from the category law.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand_distr::{Distribution, Zipf};

use super::format::encode_sample;
use super::prepare::AtomicFile;
use super::progress::rows_bar;
use super::DataError;
use crate::batch::{Batch, Sample};
use ember_proto::rng::{derive_seed, SplitMix64};

/// Stream key for per-user interests.
pub const USER_KEY: u64 = 0x5553_4552; // "USER"

/// Options of the synthetic generator.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Size of the item id space (ids `1..=n_ids`, rounded down to a multiple
    /// of `n_cats`).
    pub n_ids: u64,
    /// Number of users (ids `1..=n_users`).
    pub n_users: u64,
    /// Number of rows.
    pub n_rows: u64,
    /// Seed.
    pub seed: u64,
    /// Number of categories.
    pub n_cats: u64,
    /// Zipf exponent of item ranks within a category.
    pub zipf_s: f64,
    /// Zipf exponent of category popularity.
    pub cat_zipf_s: f64,
    /// Interest categories per user.
    pub interests: usize,
    /// Shortest history.
    pub min_hist: usize,
    /// Longest history.
    pub max_hist: usize,
    /// Probability that a history item comes from the user's interests.
    pub p_interest_hist: f64,
    /// Probability that the target comes from the user's interests.
    pub p_target_interest: f64,
    /// Click probability of a target in an interest category.
    pub p_click_interest: f64,
    /// Click probability of any other target.
    pub p_click_other: f64,
    /// Emit DIEN negative-history columns.
    pub with_neg: bool,
    /// Draw a progress bar on stderr (file writing).
    pub progress: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            n_ids: 10_000_000,
            n_users: 1_000_000,
            n_rows: 1_000_000,
            seed: 1234,
            n_cats: 1000,
            zipf_s: 1.05,
            cat_zipf_s: 0.8,
            interests: 3,
            min_hist: 5,
            max_hist: 50,
            p_interest_hist: 0.9,
            p_target_interest: 0.5,
            p_click_interest: 0.8,
            p_click_other: 0.1,
            with_neg: false,
            progress: false,
        }
    }
}

impl SynthOptions {
    /// Checks option values, naming the bad field.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |field, reason: String| Err(DataError::InvalidOption { field, reason });
        if self.n_cats == 0 {
            return bad("n_cats", "must be at least 1".into());
        }
        if self.n_ids < self.n_cats {
            return bad(
                "n_ids",
                format!("{} is below n_cats {}", self.n_ids, self.n_cats),
            );
        }
        if self.n_users == 0 {
            return bad("n_users", "must be at least 1".into());
        }
        if self.interests == 0 {
            return bad("interests", "must be at least 1".into());
        }
        if self.min_hist > self.max_hist {
            return bad("min_hist", "must not exceed max_hist".into());
        }
        if !(self.zipf_s >= 0.0 && self.cat_zipf_s >= 0.0) {
            return bad("zipf_s", "exponents must be >= 0".into());
        }
        for (field, p) in [
            ("p_interest_hist", self.p_interest_hist),
            ("p_target_interest", self.p_target_interest),
            ("p_click_interest", self.p_click_interest),
            ("p_click_other", self.p_click_other),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(field, format!("{p} is not a probability"));
            }
        }
        Ok(())
    }

    /// Category of an item id (`(id - 1) % n_cats + 1`).
    pub fn cat_of(&self, id: u64) -> u64 {
        (id - 1) % self.n_cats + 1
    }
}

/// The generator: any row on demand, deterministic in `(options, row)`.
#[derive(Debug, Clone)]
pub struct Synth {
    opts: SynthOptions,
    per_cat: u64,
    rank: Zipf<f64>,
    cat: Zipf<f64>,
}

impl Synth {
    /// A generator (validates the options).
    pub fn new(opts: SynthOptions) -> Result<Self, DataError> {
        opts.validate()?;
        let per_cat = opts.n_ids / opts.n_cats;
        let zipf_err = |field, e: rand_distr::ZipfError| DataError::InvalidOption {
            field,
            reason: e.to_string(),
        };
        let rank = Zipf::new(per_cat as f64, opts.zipf_s).map_err(|e| zipf_err("zipf_s", e))?;
        let cat = Zipf::new(opts.n_cats as f64, opts.cat_zipf_s)
            .map_err(|e| zipf_err("cat_zipf_s", e))?;
        Ok(Synth {
            opts,
            per_cat,
            rank,
            cat,
        })
    }

    /// The options.
    pub fn options(&self) -> &SynthOptions {
        &self.opts
    }

    #[inline]
    fn draw_cat(&self, rng: &mut SplitMix64) -> u64 {
        (self.cat.sample(rng) as u64).clamp(1, self.opts.n_cats)
    }

    #[inline]
    fn draw_item(&self, rng: &mut SplitMix64, cat: u64) -> u64 {
        let r = (self.rank.sample(rng) as u64).clamp(1, self.per_cat);
        (r - 1) * self.opts.n_cats + cat
    }

    /// The interest categories of `user`.
    pub fn interests(&self, user: u64) -> Vec<u64> {
        let mut rng = SplitMix64::new(derive_seed(self.opts.seed ^ USER_KEY, user));
        (0..self.opts.interests)
            .map(|_| self.draw_cat(&mut rng))
            .collect()
    }

    /// Row `row` (deterministic), written into `s` (its vectors are reused).
    pub fn sample_into(&self, row: u64, s: &mut Sample) {
        let o = &self.opts;
        let mut rng = SplitMix64::new(derive_seed(o.seed, row));
        let user = 1 + rng.below(o.n_users);
        let interests = self.interests(user);
        let pick_interest =
            |rng: &mut SplitMix64| interests[rng.below(interests.len() as u64) as usize];
        let len = o.min_hist + rng.below((o.max_hist - o.min_hist) as u64 + 1) as usize;
        s.hist_items.clear();
        s.hist_cats.clear();
        s.neg_items.clear();
        s.neg_cats.clear();
        for _ in 0..len {
            let c = if rng.next_f64() < o.p_interest_hist {
                pick_interest(&mut rng)
            } else {
                self.draw_cat(&mut rng)
            };
            s.hist_items.push(self.draw_item(&mut rng, c));
            s.hist_cats.push(c);
        }
        let c = if rng.next_f64() < o.p_target_interest {
            pick_interest(&mut rng)
        } else {
            self.draw_cat(&mut rng)
        };
        let item = self.draw_item(&mut rng, c);
        let p = if interests.contains(&c) {
            o.p_click_interest
        } else {
            o.p_click_other
        };
        s.label = if rng.next_f64() < p { 1.0 } else { 0.0 };
        s.user = user;
        s.item = item;
        s.cat = c;
        if o.with_neg {
            for _ in 0..len {
                let c = self.draw_cat(&mut rng);
                s.neg_items.push(self.draw_item(&mut rng, c));
                s.neg_cats.push(c);
            }
        }
    }

    /// Row `row` (deterministic).
    pub fn sample(&self, row: u64) -> Sample {
        let mut s = Sample::default();
        self.sample_into(row, &mut s);
        s
    }

    /// Rows `worker_index, worker_index + num_workers, ...` below `n_rows`,
    /// starting after `skip` of them (resume).
    pub fn stream(&self, worker_index: u64, num_workers: u64, skip: u64) -> SynthStream {
        SynthStream {
            synth: self.clone(),
            next_row: worker_index.saturating_add(skip.saturating_mul(num_workers.max(1))),
            step: num_workers.max(1),
        }
    }

    /// Batches of `batch_size` rows (the last one may be short) of one
    /// worker's share, built with [`Batch::from_samples`].
    pub fn batches(
        &self,
        batch_size: usize,
        max_len: usize,
        worker_index: u64,
        num_workers: u64,
    ) -> SynthBatches {
        SynthBatches {
            stream: self.stream(worker_index, num_workers, 0),
            batch_size: batch_size.max(1),
            max_len,
            buf: Vec::new(),
        }
    }
}

/// Iterator over the synthetic rows of one worker ([`Synth::stream`]).
#[derive(Debug, Clone)]
pub struct SynthStream {
    synth: Synth,
    next_row: u64,
    step: u64,
}

impl SynthStream {
    /// Writes the next sample into `s`; false at the end.
    pub fn next_into(&mut self, s: &mut Sample) -> bool {
        if self.next_row >= self.synth.opts.n_rows {
            return false;
        }
        self.synth.sample_into(self.next_row, s);
        self.next_row += self.step;
        true
    }
}

impl Iterator for SynthStream {
    type Item = Sample;
    fn next(&mut self) -> Option<Sample> {
        let mut s = Sample::default();
        self.next_into(&mut s).then_some(s)
    }
}

/// Iterator over synthetic [`Batch`]es ([`Synth::batches`]).
#[derive(Debug, Clone)]
pub struct SynthBatches {
    stream: SynthStream,
    batch_size: usize,
    max_len: usize,
    buf: Vec<Sample>,
}

impl Iterator for SynthBatches {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.buf.resize_with(self.batch_size, Sample::default);
        let mut n = 0;
        while n < self.batch_size && self.stream.next_into(&mut self.buf[n]) {
            n += 1;
        }
        (n > 0).then(|| Batch::from_samples(&self.buf[..n], self.max_len))
    }
}

/// Summary of [`write_synth`].
#[derive(Debug, Clone)]
pub struct SynthSummary {
    /// Rows written.
    pub rows: u64,
    /// Clicked rows.
    pub positives: u64,
    /// The file.
    pub out: PathBuf,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "synth: {} rows ({:.1}% positive) in {:.2} s -> {}",
            self.rows,
            100.0 * self.positives as f64 / (self.rows.max(1)) as f64,
            self.elapsed.as_secs_f64(),
            self.out.display()
        )
    }
}

/// Writes all rows to `out` in the sample format.
pub fn write_synth(opts: &SynthOptions, out: &Path) -> Result<SynthSummary, DataError> {
    let t0 = Instant::now();
    let synth = Synth::new(opts.clone())?;
    let mut w = AtomicFile::create(out)?;
    let bar = rows_bar("synth", Some(opts.n_rows), opts.progress);
    let mut stream = synth.stream(0, 1, 0);
    let mut s = Sample::default();
    let mut line = Vec::with_capacity(1 << 20);
    let (mut rows, mut positives) = (0u64, 0u64);
    while stream.next_into(&mut s) {
        encode_sample(&mut line, &s, opts.with_neg);
        rows += 1;
        positives += u64::from(s.label > 0.5);
        if line.len() >= 1 << 20 {
            w.write_all(&line)?;
            line.clear();
            bar.set_position(rows);
        }
    }
    w.write_all(&line)?;
    w.commit()?;
    bar.finish_and_clear();
    Ok(SynthSummary {
        rows,
        positives,
        out: out.to_path_buf(),
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::SampleReader;
    use rustc_hash::FxHashMap;

    fn small() -> SynthOptions {
        SynthOptions {
            n_ids: 1_000_000_000,
            n_users: 1000,
            n_rows: 4000,
            n_cats: 100,
            seed: 5,
            with_neg: true,
            ..SynthOptions::default()
        }
    }

    #[test]
    fn deterministic_valid_and_splittable() {
        let g = Synth::new(small()).unwrap();
        let all: Vec<Sample> = g.stream(0, 1, 0).collect();
        assert_eq!(all.len(), 4000);
        assert_eq!(
            all,
            Synth::new(small())
                .unwrap()
                .stream(0, 1, 0)
                .collect::<Vec<_>>()
        );
        let other = Synth::new(SynthOptions { seed: 6, ..small() }).unwrap();
        assert_ne!(
            all[..10],
            other.stream(0, 1, 0).take(10).collect::<Vec<_>>()[..]
        );
        for s in &all {
            assert!((1..=1000).contains(&s.user));
            assert!((5..=50).contains(&s.hist_items.len()));
            assert_eq!(s.neg_items.len(), s.hist_items.len());
            for (&i, &c) in s
                .hist_items
                .iter()
                .zip(&s.hist_cats)
                .chain([(&s.item, &s.cat)])
            {
                assert!((1..=1_000_000_000).contains(&i));
                assert_eq!(g.options().cat_of(i), c);
            }
        }
        // Worker split and resume.
        let w1: Vec<Sample> = g.stream(1, 3, 0).collect();
        assert_eq!(w1.len(), 1333);
        assert_eq!(w1[0], all[1]);
        assert_eq!(w1[5], all[16]);
        assert_eq!(g.stream(1, 3, 5).next().unwrap(), all[16]);
        let batches: Vec<Batch> = g.batches(128, 100, 0, 1).collect();
        assert_eq!(batches.len(), 32);
        assert_eq!(batches[31].batch_size, 4000 - 31 * 128);
        assert_eq!(batches[0], Batch::from_samples(&all[..128], 100));
    }

    #[test]
    fn zipf_popularity_and_label_signal() {
        let g = Synth::new(small()).unwrap();
        let mut freq: FxHashMap<u64, u32> = FxHashMap::default();
        let (mut pos_in, mut n_in, mut pos_out, mut n_out) = (0u32, 0u32, 0u32, 0u32);
        let mut occurrences = 0u32;
        for s in g.stream(0, 1, 0) {
            for &i in s.hist_items.iter().chain([&s.item]) {
                *freq.entry(i).or_insert(0) += 1;
                occurrences += 1;
            }
            let interests = g.interests(s.user);
            if interests.contains(&s.cat) {
                n_in += 1;
                pos_in += (s.label > 0.5) as u32;
            } else {
                n_out += 1;
                pos_out += (s.label > 0.5) as u32;
            }
        }
        // Hot head: the 1% most frequent ids carry a large share.
        let mut counts: Vec<u32> = freq.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let head: u32 = counts[..counts.len() / 100].iter().sum();
        assert!(
            head as f64 > 0.2 * occurrences as f64,
            "head {head} of {occurrences}"
        );
        // Long tail: many ids seen once.
        assert!(counts.iter().filter(|&&c| c == 1).count() > counts.len() / 4);
        // Signal: clicks concentrate on interest targets.
        let ctr_in = pos_in as f64 / n_in as f64;
        let ctr_out = pos_out as f64 / n_out as f64;
        assert!(ctr_in > 0.7 && ctr_out < 0.2, "{ctr_in} {ctr_out}");
    }

    #[test]
    fn written_file_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("synth.txt");
        let opts = SynthOptions {
            n_rows: 300,
            ..small()
        };
        let sum = write_synth(&opts, &p).unwrap();
        assert_eq!(sum.rows, 300);
        let back: Vec<Sample> = SampleReader::open(&[p], 0, 1, false)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let g = Synth::new(opts).unwrap();
        assert_eq!(back, g.stream(0, 1, 0).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_bad_options() {
        let e = Synth::new(SynthOptions {
            n_ids: 10,
            n_cats: 100,
            ..SynthOptions::default()
        })
        .unwrap_err();
        assert!(matches!(e, DataError::InvalidOption { field: "n_ids", .. }));
    }
}
