//! [`Shard`]: the whole state of one parameter-server shard behind a plain,
//! synchronous Rust API mirroring the RPCs. The gRPC service wraps it; the
//! worker and cluster crates can also use it in-process (via `Arc<Shard>`).

use crate::checkpoint::{self, CheckpointInfo, Visitor};
use crate::ckpt_chain::{self, DeltaPolicy, Manifest};
use crate::dense::DenseEntry;
use crate::dense::{DenseStore, DenseTensor};
use crate::error::{PsError, Result};
use crate::metrics as m;
use crate::store::{Budget, PushOutcome, Table, TableSpec, TableStats};
use ember_proto::rng::splitmix64;
use ember_proto::route::fnv1a64;
use ember_proto::v1::{OptimizerConfig, StatsResponse, TableConfig, TableInfo};
use ember_proto::{Router, NUM_BUCKETS};
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identity and storage location of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// Index of this shard, 0-based.
    pub shard_index: u32,
    /// Number of shards in the cluster (1..=4096).
    pub num_shards: u32,
    /// Root checkpoint directory (the shard writes under
    /// `<dir>/shard-<i>-of-<n>/`); `None` disables checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Memory budget of the sparse tables in bytes (0 = unlimited): past it
    /// new rows replace cold ones (see `store`).
    pub max_bytes: u64,
    /// Half-life in steps of a row's count in the eviction score (0 = the
    /// default, `store::DEFAULT_EVICT_HALF_LIFE`).
    pub evict_half_life_steps: u64,
    /// When a checkpoint is a delta rather than a base.
    pub delta: DeltaPolicy,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            shard_index: 0,
            num_shards: 1,
            checkpoint_dir: None,
            max_bytes: 0,
            evict_half_life_steps: 0,
            delta: DeltaPolicy::default(),
        }
    }
}

/// One parameter-server shard: sparse tables, dense parameters, counters.
///
/// `Send + Sync`; share it with `Arc`. Every method validates its whole input
/// before changing anything, so a rejected call leaves the shard unchanged.
pub struct Shard {
    cfg: ShardConfig,
    router: Router,
    shard_label: String,
    tables: RwLock<FxHashMap<String, Arc<Table>>>,
    budget: Arc<Budget>,
    dense: DenseStore,
    started: Instant,
    checkpoint_step: AtomicU64,
    rows_pulled: AtomicU64,
    rows_pushed: AtomicU64,
    rejected: AtomicU64,
    /// Serializes checkpoint / restore.
    ckpt_lock: Mutex<()>,
    /// The chain the last checkpoint written or restored belongs to (the
    /// next delta extends it); `None` = the next checkpoint is a base.
    chain: Mutex<Option<Manifest>>,
    /// Rows updated by pushes since the last checkpoint (with repeats): an
    /// upper bound of the rows a delta holds, which spares the policy a scan.
    pushed_since: AtomicU64,
    /// Counts were loaded since the last checkpoint (they change rows
    /// without changing their step): the next checkpoint is a base.
    counts_loaded: AtomicBool,
}

/// How a checkpoint was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOutcome {
    /// The file written (base or delta) and its size.
    pub info: CheckpointInfo,
    /// Files in the chain that now restores this step (1 for a base).
    pub chain_files: usize,
    /// Bytes of the whole chain.
    pub chain_bytes: u64,
}

/// Rows a restore buffers before inserting them ([`Table::put_rows`]).
const LOAD_BATCH_ROWS: usize = 8192;

/// Rows and pending counts of one table on their way to the inserter.
#[derive(Default)]
struct LoadBatch {
    table: Option<Arc<Table>>,
    rows: Vec<(u64, u32, u64)>,
    vals: Vec<f32>,
    pending: Vec<(u64, u32)>,
}

impl LoadBatch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.pending.is_empty()
    }

    /// Inserts the rows, then sets the pending counts (file order).
    fn apply(&self) -> Result<()> {
        let Some(t) = &self.table else {
            return Err(PsError::Internal("row before any table".into()));
        };
        t.put_rows(&self.rows, &self.vals)?;
        for &(id, c) in &self.pending {
            t.put_pending(id, c);
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.table = None;
        self.rows.clear();
        self.vals.clear();
        self.pending.clear();
    }
}

/// The restore's inserter thread: decoding (the caller's thread) and
/// inserting run side by side. Batches are applied in order; their buffers
/// come back for reuse.
struct Inserter {
    tx: std::sync::mpsc::SyncSender<LoadBatch>,
    back: std::sync::mpsc::Receiver<LoadBatch>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl Inserter {
    fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<LoadBatch>(2);
        let (back_tx, back) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("restore-insert".into())
            .spawn(move || {
                let mut first_err = None;
                for mut b in rx {
                    if first_err.is_none() {
                        first_err = b.apply().err();
                    }
                    b.clear();
                    let _ = back_tx.send(b);
                }
                first_err.map_or(Ok(()), Err)
            })?;
        Ok(Inserter { tx, back, handle })
    }
}

/// Loads a chain into new tables (the restore sink). Rows are buffered and
/// inserted in batches, each stripe locked once per batch, by an inserter
/// thread while this one decodes (inline when no thread can be started).
#[derive(Default)]
struct ShardLoad {
    tables: FxHashMap<String, Arc<Table>>,
    cur: Option<Arc<Table>>,
    batch: LoadBatch,
    inserter: Option<Inserter>,
    /// The inserter could not be started: insert inline.
    inline: bool,
    /// Rows announced per table ([`Visitor::expect_rows`]).
    expect: FxHashMap<String, u64>,
    /// The current table was sized (exactly, or from a hint).
    sized: bool,
    dense: BTreeMap<String, DenseEntry>,
    dense_step: u64,
}

impl ShardLoad {
    /// Hands the buffered rows and pending counts of the current table to
    /// the inserter (or inserts them).
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch.table = self.cur.clone();
        if self.inserter.is_none() && !self.inline {
            match Inserter::spawn() {
                Ok(i) => self.inserter = Some(i),
                Err(e) => {
                    tracing::warn!(error = %e, "restore: no inserter thread; inserting inline");
                    self.inline = true;
                }
            }
        }
        let Some(ins) = &self.inserter else {
            let r = self.batch.apply();
            self.batch.clear();
            return r;
        };
        let next = ins.back.try_recv().unwrap_or_default();
        let full = std::mem::replace(&mut self.batch, next);
        if ins.tx.send(full).is_err() {
            return Err(PsError::Internal(
                "the restore's inserter thread stopped".into(),
            ));
        }
        Ok(())
    }

    /// Flushes the last batch, waits for the inserter, and hands over the
    /// loaded tables.
    #[allow(clippy::type_complexity)]
    fn finish(
        mut self,
    ) -> Result<(
        FxHashMap<String, Arc<Table>>,
        BTreeMap<String, DenseEntry>,
        u64,
    )> {
        self.flush()?;
        if let Some(ins) = self.inserter.take() {
            drop(ins.tx);
            ins.handle.join().map_err(|_| {
                PsError::Internal("the restore's inserter thread panicked".into())
            })??;
        }
        Ok((self.tables, self.dense, self.dense_step))
    }
}

impl Visitor for ShardLoad {
    fn table(&mut self, spec: &TableSpec) -> Result<()> {
        self.flush()?;
        let expect = self.expect.remove(spec.name());
        let t = self
            .tables
            .entry(spec.name().to_string())
            .or_insert_with(|| Arc::new(Table::new(spec.clone())))
            .clone();
        self.sized = expect.is_some();
        if let Some(rows) = expect {
            t.reserve(rows);
        }
        self.cur = Some(t);
        Ok(())
    }
    fn rows_hint(&mut self, rows: u64) -> Result<()> {
        if let (false, Some(t)) = (self.sized, &self.cur) {
            self.sized = true;
            t.reserve(rows);
        }
        Ok(())
    }
    fn file_order(&self) -> bool {
        true
    }
    fn expect_rows(&mut self, name: &str, rows: u64) -> Result<()> {
        self.expect.insert(name.to_string(), rows);
        Ok(())
    }
    fn row(&mut self, id: u64, count: u32, step: u64, vals: &[f32]) -> Result<()> {
        self.batch.rows.push((id, count, step));
        self.batch.vals.extend_from_slice(vals);
        if self.batch.rows.len() >= LOAD_BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }
    fn pending(&mut self, id: u64, count: u32) -> Result<()> {
        // Applied after the batch's rows (a file lists a table's rows first).
        self.batch.pending.push((id, count));
        if self.batch.pending.len() >= LOAD_BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }
    fn dense(&mut self, name: String, entry: DenseEntry) -> Result<()> {
        self.flush()?;
        self.dense.insert(name, entry);
        Ok(())
    }
    fn dense_step(&mut self, step: u64) -> Result<()> {
        self.flush()?;
        self.dense_step = step;
        Ok(())
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The fields in which two table configs differ, as `field: a -> b`.
fn config_diff(a: &TableConfig, b: &TableConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut f = |name: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{name}: existing {x}, requested {y}"));
        }
    };
    let prec = |v: i32| {
        crate::store::WeightPrecision::from_proto(v)
            .map(|p| p.name().to_string())
            .unwrap_or_else(|_| v.to_string())
    };
    f("precision", prec(a.precision), prec(b.precision));
    f(
        "moment_precision",
        prec(a.moment_precision),
        prec(b.moment_precision),
    );
    f("dim", a.dim.to_string(), b.dim.to_string());
    f(
        "optimizer",
        format!("{:?}", a.optimizer),
        format!("{:?}", b.optimizer),
    );
    f("init", format!("{:?}", a.init), format!("{:?}", b.init));
    f("seed", a.seed.to_string(), b.seed.to_string());
    f(
        "mba_lambda",
        a.mba_lambda.to_string(),
        b.mba_lambda.to_string(),
    );
    f(
        "count_mode",
        a.count_mode.to_string(),
        b.count_mode.to_string(),
    );
    f(
        "admit_min_count",
        a.admit_min_count.to_string(),
        b.admit_min_count.to_string(),
    );
    f(
        "ttl_steps",
        a.ttl_steps.to_string(),
        b.ttl_steps.to_string(),
    );
    f("plain_l2", a.plain_l2.to_string(), b.plain_l2.to_string());
    out
}

/// The set of ids of one duplicate check: open addressing with linear
/// probing over a power-of-two table at most half full, its occupancy in a
/// bitmap (cleared per check: 1 bit per bucket, so the keys need no
/// clearing) and its home buckets from a keyed mix of the id, so no client
/// can choose ids that collide.
#[derive(Default)]
struct IdSet {
    keys: Vec<u64>,
    used: Vec<u64>,
}

impl IdSet {
    /// Largest table kept between checks (buckets); a bigger one, for a
    /// huge request, is freed after its check.
    const KEEP_BUCKETS: usize = 1 << 18;

    /// The first id of `ids` that occurs earlier in `ids`.
    fn first_duplicate(&mut self, ids: &[u64]) -> Option<u64> {
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let key = *KEY.get_or_init(|| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64)
        });
        let buckets = (ids.len() * 2).next_power_of_two().max(64);
        let shift = 64 - buckets.trailing_zeros();
        let mask = buckets - 1;
        if self.keys.len() < buckets {
            self.keys.resize(buckets, 0);
        }
        self.used.clear();
        self.used.resize(buckets / 64, 0);
        let (keys, used) = (&mut self.keys[..buckets], &mut self.used[..]);
        let mut dup = None;
        'ids: for &id in ids {
            let mut i = (splitmix64(id ^ key) >> shift) as usize;
            loop {
                let (word, bit) = (i / 64, 1u64 << (i % 64));
                if used[word] & bit == 0 {
                    used[word] |= bit;
                    keys[i] = id;
                    break;
                }
                if keys[i] == id {
                    dup = Some(id);
                    break 'ids;
                }
                i = (i + 1) & mask;
            }
        }
        if self.keys.len() > Self::KEEP_BUCKETS {
            *self = IdSet::default();
        }
        dup
    }
}

fn find_duplicate(ids: &[u64]) -> Option<u64> {
    thread_local! {
        /// The set of the last check, kept so a push does not allocate a
        /// fresh table.
        static SEEN: std::cell::RefCell<IdSet> = std::cell::RefCell::new(IdSet::default());
    }
    if ids.len() < 2 {
        return None;
    }
    SEEN.with(|s| match s.try_borrow_mut() {
        Ok(mut set) => set.first_duplicate(ids),
        // Not reentrant; a nested check gets a set of its own.
        Err(_) => IdSet::default().first_duplicate(ids),
    })
}

impl Shard {
    /// An empty shard.
    pub fn new(cfg: ShardConfig) -> Result<Self> {
        if cfg.num_shards == 0
            || u64::from(cfg.num_shards) > NUM_BUCKETS
            || cfg.shard_index >= cfg.num_shards
        {
            return Err(PsError::invalid(format!(
                "shard_index {} / num_shards {} out of range (1..={NUM_BUCKETS} shards)",
                cfg.shard_index, cfg.num_shards
            )));
        }
        Ok(Shard {
            budget: Budget::new(cfg.max_bytes),
            router: Router::new(cfg.num_shards),
            shard_label: cfg.shard_index.to_string(),
            cfg,
            tables: RwLock::new(FxHashMap::default()),
            dense: DenseStore::default(),
            started: Instant::now(),
            checkpoint_step: AtomicU64::new(0),
            rows_pulled: AtomicU64::new(0),
            rows_pushed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            ckpt_lock: Mutex::new(()),
            chain: Mutex::new(None),
            pushed_since: AtomicU64::new(0),
            counts_loaded: AtomicBool::new(false),
        })
    }

    /// This shard's configuration.
    pub fn config(&self) -> &ShardConfig {
        &self.cfg
    }

    /// Seconds since the shard was created.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Step of the last checkpoint written or restored (0 = none).
    pub fn checkpoint_step(&self) -> u64 {
        self.checkpoint_step.load(Ordering::Relaxed)
    }

    /// Counts a rejected request (called on every error returned to a client).
    pub fn note_rejected(&self, e: &PsError) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::REJECTED, "reason" => e.reason(), "shard" => self.shard_label.clone())
            .increment(1);
    }

    fn track<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.note_rejected(e);
        }
        r
    }

    /// The table named `name`.
    pub fn table(&self, name: &str) -> Result<Arc<Table>> {
        self.tables
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| PsError::UnknownTable(name.to_string()))
    }

    fn check_route(&self, table: &str, ids: &[u64]) -> Result<()> {
        if self.cfg.num_shards == 1 {
            return Ok(());
        }
        let salt = fnv1a64(table.as_bytes());
        for &id in ids {
            let s = self
                .router
                .shard_of_bucket(splitmix64(id ^ salt) % NUM_BUCKETS);
            if s != self.cfg.shard_index {
                return Err(PsError::FailedPrecondition(format!(
                    "id {id} of table `{table}` routes to shard {s}, this is shard {} of {}",
                    self.cfg.shard_index, self.cfg.num_shards
                )));
            }
        }
        Ok(())
    }

    /// Creates a table; `Ok(false)` when an identical one exists, an
    /// INVALID_ARGUMENT error when one exists with a different config.
    pub fn create_table(&self, config: TableConfig) -> Result<bool> {
        let r = (|| {
            let spec = TableSpec::from_config(config)?;
            let mut g = self.tables.write();
            if let Some(t) = g.get(spec.name()) {
                if t.spec().config == spec.config {
                    return Ok(false);
                }
                return Err(PsError::invalid(format!(
                    "table `{}` exists with a different config ({}): existing {:?}, requested {:?}",
                    spec.name(),
                    config_diff(&t.spec().config, &spec.config).join(", "),
                    t.spec().config,
                    spec.config
                )));
            }
            let row = spec.layout().bytes() as u64 + crate::index::BUCKET_BYTES as u64;
            if self.budget.is_limited() && self.budget.max_bytes() < row {
                return Err(PsError::invalid(format!(
                    "max_bytes {} of shard {} is smaller than one row of table `{}` ({row} B)",
                    self.budget.max_bytes(),
                    self.shard_label,
                    spec.name()
                )));
            }
            let t = Table::with_budget(spec, self.budget.clone());
            self.configure_table(&t);
            g.insert(t.spec().name().to_string(), Arc::new(t));
            Ok(true)
        })();
        self.track(r)
    }

    /// Applies the shard's eviction settings to a table of this shard, and
    /// records removed rows for delta checkpoints when those are on.
    fn configure_table(&self, t: &Table) {
        if self.cfg.evict_half_life_steps > 0 {
            t.set_evict_half_life(self.cfg.evict_half_life_steps);
        }
        t.set_track_tombstones(self.cfg.checkpoint_dir.is_some() && self.cfg.delta.max_deltas > 0);
    }

    /// The shard's memory budget (shared by its tables).
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    fn info(name: &str, t: &Table) -> TableInfo {
        let st: TableStats = t.stats();
        let _ = name;
        TableInfo {
            config: Some(t.spec().config.clone()),
            rows: st.rows,
            resident_bytes: st.resident_bytes,
            counted_ids: st.counted_ids,
            evicted: st.evicted,
            not_admitted: st.not_admitted,
            evicted_budget: st.evicted_budget,
            row_bytes: st.row_bytes,
        }
    }

    /// Config and statistics of one table.
    pub fn describe_table(&self, name: &str) -> Result<TableInfo> {
        let r = self.table(name).map(|t| Self::info(name, &t));
        self.track(r)
    }

    /// Every table on this shard, sorted by name.
    pub fn list_tables(&self) -> Vec<TableInfo> {
        let mut ts: Vec<(String, Arc<Table>)> = self
            .tables
            .read()
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        ts.sort_by(|a, b| a.0.cmp(&b.0));
        ts.iter().map(|(n, t)| Self::info(n, t)).collect()
    }

    /// Reads rows of `ids` (duplicates allowed) into `out` (`ids.len() * dim`
    /// values, row-major) and returns the dim. Unseen ids get their
    /// deterministic initial value and are not stored.
    pub fn pull(&self, table: &str, ids: &[u64], out: &mut Vec<f32>) -> Result<usize> {
        let r = (|| {
            let t = self.table(table)?;
            self.check_route(table, ids)?;
            t.pull(ids, out);
            Ok(t.dim())
        })();
        if r.is_ok() {
            self.rows_pulled
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            metrics::counter!(m::ROWS_PULLED, "table" => table.to_string(), "shard" => self.shard_label.clone())
                .increment(ids.len() as u64);
        }
        self.track(r)
    }

    /// Applies gradients (`ids.len() * dim` values) to unique `ids`:
    /// MBA / plain L2, then the table's optimizer, atomically per row.
    /// `counts` is empty (1 per id) or one count >= 1 per id.
    pub fn push(
        &self,
        table: &str,
        ids: &[u64],
        grads: &[f32],
        counts: &[u32],
        step: u64,
    ) -> Result<PushOutcome> {
        let r = (|| {
            let t = self.table(table)?;
            let dim = t.dim();
            if grads.len() != ids.len() * dim {
                return Err(PsError::invalid(format!(
                    "grads has {} values, expected ids ({}) * dim ({dim}) = {}",
                    grads.len(),
                    ids.len(),
                    ids.len() * dim
                )));
            }
            if !counts.is_empty() && counts.len() != ids.len() {
                return Err(PsError::invalid(format!(
                    "counts has {} values for {} ids (send none or one per id)",
                    counts.len(),
                    ids.len()
                )));
            }
            if let Some(i) = counts.iter().position(|&c| c == 0) {
                return Err(PsError::invalid(format!(
                    "counts[{i}] is 0 (counts must be >= 1)"
                )));
            }
            // A branch-free pass first (it vectorises); the position only
            // when there is something to report.
            let finite = grads.iter().fold(true, |ok, g| ok & g.is_finite());
            if let Some(i) = (!finite)
                .then(|| grads.iter().position(|g| !g.is_finite()))
                .flatten()
            {
                return Err(PsError::invalid(format!(
                    "grads has a non-finite value {} at index {i} (id {})",
                    grads[i],
                    ids[i / dim]
                )));
            }
            if let Some(id) = find_duplicate(ids) {
                return Err(PsError::invalid(format!(
                    "duplicate id {id} in push (ids must be unique)"
                )));
            }
            self.check_route(table, ids)?;
            Ok(t.push(ids, grads, counts, step))
        })();
        if let Ok(o) = &r {
            self.pushed_since
                .fetch_add(o.updated + o.not_admitted, Ordering::SeqCst);
            self.rows_pushed.fetch_add(o.updated, Ordering::Relaxed);
            let labels = [
                ("table", table.to_string()),
                ("shard", self.shard_label.clone()),
            ];
            metrics::counter!(m::ROWS_PUSHED, &labels).increment(o.updated);
            if o.not_admitted > 0 {
                metrics::counter!(m::NOT_ADMITTED, &labels).increment(o.not_admitted);
            }
            if o.evicted_budget > 0 {
                metrics::counter!(m::EVICTED, "table" => table.to_string(), "shard" => self.shard_label.clone(), "reason" => "budget")
                    .increment(o.evicted_budget);
            }
        }
        self.track(r)
    }

    /// Loads exact feature counts n_j (`replace` forgets previous counts
    /// first). Returns the ids with a count for the table on this shard.
    pub fn load_counts(
        &self,
        table: &str,
        ids: &[u64],
        counts: &[u32],
        replace: bool,
    ) -> Result<u64> {
        let r = (|| {
            let t = self.table(table)?;
            if counts.len() != ids.len() {
                return Err(PsError::invalid(format!(
                    "counts has {} values for {} ids",
                    counts.len(),
                    ids.len()
                )));
            }
            self.check_route(table, ids)?;
            self.counts_loaded.store(true, Ordering::SeqCst);
            Ok(t.load_counts(ids, counts, replace))
        })();
        self.track(r)
    }

    /// Registers dense parameters (existing names of equal length keep their
    /// value). Returns the names created now.
    pub fn init_dense(
        &self,
        params: &[DenseTensor],
        optimizer: Option<&OptimizerConfig>,
    ) -> Result<Vec<String>> {
        let r = (|| {
            if self.cfg.num_shards > 1 {
                for p in params {
                    let s = self.router.shard_of_dense(&p.name);
                    if s != self.cfg.shard_index {
                        return Err(PsError::FailedPrecondition(format!(
                            "dense parameter `{}` routes to shard {s}, this is shard {}",
                            p.name, self.cfg.shard_index
                        )));
                    }
                }
            }
            self.dense.init(params, optimizer)
        })();
        self.track(r)
    }

    /// Reads dense parameters (`names` empty = all, sorted) and the dense step.
    pub fn pull_dense(&self, names: &[String]) -> Result<(Vec<DenseTensor>, u64)> {
        let r = self.dense.pull(names);
        self.track(r)
    }

    /// Waits until the dense step reaches `min_step` (DEADLINE_EXCEEDED after
    /// `timeout`); returns the step.
    pub async fn wait_dense_step(&self, min_step: u64, timeout: Duration) -> Result<u64> {
        let r = self.dense.wait_step(min_step, timeout).await;
        self.track(r)
    }

    /// Pushes dense gradients for `step` (see `PushDenseRequest`); returns
    /// the dense step after the push.
    pub fn push_dense(
        &self,
        grads: &[DenseTensor],
        step: u64,
        num_workers: u32,
        worker_index: u32,
    ) -> Result<u64> {
        let r = self.dense.push(grads, step, num_workers, worker_index);
        if let Ok(s) = &r {
            metrics::gauge!(m::DENSE_STEP, "shard" => self.shard_label.clone()).set(*s as f64);
        }
        self.track(r)
    }

    /// Overwrites dense state buffers (optimizer state untouched).
    pub fn assign_dense(&self, params: &[DenseTensor]) -> Result<()> {
        let r = self.dense.assign(params);
        self.track(r)
    }

    /// Number of dense parameters and the dense step.
    pub fn dense_info(&self) -> (usize, u64) {
        (self.dense.len(), self.dense.step())
    }

    fn ckpt_dir(&self) -> Result<PathBuf> {
        self.cfg
            .checkpoint_dir
            .as_ref()
            .map(|d| checkpoint::shard_dir(d, self.cfg.shard_index, self.cfg.num_shards))
            .ok_or_else(|| PsError::FailedPrecondition("no checkpoint directory configured".into()))
    }

    fn sorted_tables(&self) -> Vec<Arc<Table>> {
        let mut ts: Vec<Arc<Table>> = self.tables.read().values().cloned().collect();
        ts.sort_by(|a, b| a.spec().name().cmp(b.spec().name()));
        ts
    }

    /// Writes a checkpoint for `step` (TTL sweep first), then keeps only the
    /// newest `keep` restorable steps (0 = all). The shard decides whether it
    /// is a base or a delta (see [`Shard::checkpoint_as`]). Rows are copied
    /// one stripe at a time: checkpoint at a barrier (no concurrent pushes)
    /// for an exact snapshot.
    pub fn checkpoint(&self, step: u64, keep: u32) -> Result<CheckpointInfo> {
        self.checkpoint_as(step, keep, false).map(|o| o.info)
    }

    /// Like [`Shard::checkpoint`]; `force_base` writes a base whatever the
    /// policy says. A delta (only the rows changed since the previous
    /// checkpoint, tombstones, all pending counts and dense parameters) is
    /// written when the previous checkpoint of this process's chain exists,
    /// fewer than `delta.max_deltas` deltas follow its base, no counts were
    /// loaded since, and the chain's delta rows stay under
    /// `delta.max_chain_percent` of the base's rows; otherwise a base.
    pub fn checkpoint_as(
        &self,
        step: u64,
        keep: u32,
        force_base: bool,
    ) -> Result<CheckpointOutcome> {
        let started = std::time::Instant::now();
        let r = (|| {
            let dir = self.ckpt_dir()?;
            let _g = self.ckpt_lock.lock();
            let tables = self.sorted_tables();
            for t in &tables {
                let n = t.sweep();
                if n > 0 {
                    metrics::counter!(m::EVICTED, "table" => t.spec().name().to_string(), "shard" => self.shard_label.clone(), "reason" => "ttl")
                        .increment(n);
                }
            }
            let (dense, dense_step) = self.dense.snapshot();
            let (si, ns) = (self.cfg.shard_index, self.cfg.num_shards);
            let chain = self.chain.lock().take();
            let counts_loaded = self.counts_loaded.swap(false, Ordering::SeqCst);
            let pushed = self.pushed_since.swap(0, Ordering::SeqCst);
            let policy = self.cfg.delta;
            let delta_of = match chain {
                Some(c)
                    if !force_base
                        && !counts_loaded
                        && policy.max_deltas > 0
                        && c.deltas() < policy.max_deltas as usize
                        && step > c.step =>
                {
                    let chain_rows: u64 = c.files[1..].iter().map(|f| f.rows).sum();
                    let base_rows = c.files[0].rows;
                    let over = |changed: u64| {
                        u128::from(chain_rows.saturating_add(changed)) * 100
                            > u128::from(policy.max_chain_percent) * u128::from(base_rows)
                    };
                    // The tables' change lists (an upper bound of the rows a
                    // delta holds; None: a list overflowed, write a base).
                    let changed = ckpt_chain::count_changed(&tables);
                    changed.is_some_and(|n| !over(n.min(pushed))).then_some(c)
                }
                _ => None,
            };
            // Rows removed since the last checkpoint (TTL, memory budget);
            // a list that overflowed its memory cap forces a base.
            // Take every table's list (a short-circuit would leave stale
            // tombstones in the next window, deleting re-created rows).
            let removed: Vec<Option<Vec<u64>>> =
                tables.iter().map(|t| t.take_tombstones()).collect();
            let removed: Option<Vec<Vec<u64>>> = removed.into_iter().collect();
            let delta_of: Option<(Manifest, Vec<Vec<u64>>)> = match (delta_of, removed) {
                (Some(c), Some(gone)) => Some((c, gone)),
                _ => None,
            };
            if delta_of.is_none() {
                // A base holds every row: start new change windows.
                for t in &tables {
                    t.reset_changes();
                }
            }
            let outcome = match delta_of {
                Some((c, gone)) => {
                    let info = ckpt_chain::write_delta(
                        &dir, si, ns, step, &c, &tables, &gone, &dense, dense_step,
                    )?;
                    let next = c.with_delta(step, &info);
                    if let Err(e) = ckpt_chain::write_manifest(&dir, &next) {
                        // Without its manifest the delta is never listed; remove it.
                        let _ = std::fs::remove_file(&info.path);
                        return Err(e);
                    }
                    CheckpointOutcome {
                        chain_files: next.files.len(),
                        chain_bytes: next.bytes(),
                        info: {
                            *self.chain.lock() = Some(next);
                            info
                        },
                    }
                }
                None => {
                    let info = checkpoint::write(&dir, si, ns, step, &tables, &dense, dense_step)?;
                    *self.chain.lock() = Some(Manifest::of_base(si, ns, step, &info));
                    CheckpointOutcome {
                        chain_files: 1,
                        chain_bytes: info.bytes,
                        info,
                    }
                }
            };
            let dropped = ckpt_chain::retain(&dir, si, ns, keep)?;
            if !dropped.is_empty() {
                tracing::info!(?dropped, keep, "deleted old checkpoints");
            }
            self.checkpoint_step.store(step, Ordering::Relaxed);
            let i = &outcome.info;
            tracing::info!(step, kind = i.kind.as_str(), path = %i.path.display(), bytes = i.bytes, rows = i.rows,
                chain_files = outcome.chain_files, chain_bytes = outcome.chain_bytes,
                secs = format!("{:.2}", started.elapsed().as_secs_f64()), "checkpoint written");
            Ok(outcome)
        })();
        if let Err(e) = &r {
            tracing::error!(step, error = %e, "checkpoint failed; the next checkpoint is a base");
        }
        self.track(r)
    }

    /// Steps this shard can restore, ascending: bases and complete delta
    /// chains (bad files are skipped with a warning).
    pub fn list_checkpoints(&self) -> Result<Vec<u64>> {
        let r = (|| {
            let dir = self.ckpt_dir()?;
            let (good, bad) = ckpt_chain::list(&dir, self.cfg.shard_index, self.cfg.num_shards)?;
            for (p, e) in bad {
                tracing::warn!(path = %p.display(), error = %e, "skipping bad checkpoint");
            }
            Ok(good.iter().map(|m| m.step).collect())
        })();
        self.track(r)
    }

    /// Loads chain `m` in place: verify every file (state unchanged on
    /// error), drop the live tables, stream the chain in.
    fn restore_from(&self, dir: &Path, m: &Manifest) -> Result<(u64, u64)> {
        let started = std::time::Instant::now();
        let mut sink = ShardLoad::default();
        // A shard that holds nothing (starting up) loads in one pass over
        // the base, checking it as it streams: on an error it drops what it
        // loaded and is as empty as before. A shard with state verifies the
        // whole chain first, so a bad file leaves that state untouched.
        let fresh = self.tables.read().is_empty() && self.dense.is_empty();
        let rows = if fresh {
            match ckpt_chain::restore_chain_fresh(dir, m, &mut sink) {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = sink.finish();
                    return Err(e);
                }
            }
        } else {
            ckpt_chain::restore_chain(dir, m, &mut sink, || {
                // Free the live rows before loading (no second copy in memory).
                *self.tables.write() = FxHashMap::default();
                *self.chain.lock() = None;
            })?
        };
        let restored = m.step;
        let (tables, dense, dense_step) = sink.finish().map_err(|e| {
            if fresh {
                e
            } else {
                PsError::RestoreAborted {
                    step: m.step,
                    source: Box::new(e),
                }
            }
        })?;
        for t in tables.values() {
            t.set_budget(self.budget.clone());
            self.configure_table(t);
            let _ = t.take_tombstones();
        }
        *self.tables.write() = tables;
        self.dense.replace(dense, dense_step);
        self.checkpoint_step.store(restored, Ordering::Relaxed);
        self.pushed_since.store(0, Ordering::SeqCst);
        self.counts_loaded.store(false, Ordering::SeqCst);
        let mut chain = m.clone();
        if chain.files.len() == 1 {
            chain.files[0].rows = rows;
        }
        *self.chain.lock() = Some(chain);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            step = restored,
            rows,
            files = m.files.len(),
            bytes = m.bytes(),
            secs = format!("{secs:.2}"),
            m_rows_per_s = format!("{:.2}", rows as f64 / secs.max(1e-9) / 1e6),
            "checkpoint restored"
        );
        Ok((restored, rows))
    }

    /// Replaces the shard's whole state with the checkpoint of `step`
    /// (0 = the latest good one, skipping bad chains with a warning): a base,
    /// or a base and its deltas. Returns `(step, rows)`. Every file is
    /// verified before anything changes, so a bad checkpoint leaves the
    /// shard unchanged; only a failure while loading verified files (e.g. an
    /// I/O error) leaves it empty ([`PsError::RestoreAborted`]).
    pub fn restore(&self, step: u64) -> Result<(u64, u64)> {
        let r = (|| {
            let dir = self.ckpt_dir()?;
            let _g = self.ckpt_lock.lock();
            let (si, ns) = (self.cfg.shard_index, self.cfg.num_shards);
            if step != 0 {
                let m = ckpt_chain::chain_of(&dir, si, ns, step)?;
                return self.restore_from(&dir, &m);
            }
            let (good, bad) = ckpt_chain::list(&dir, si, ns)?;
            for (p, e) in bad {
                tracing::warn!(path = %p.display(), error = %e, "skipping bad checkpoint");
            }
            for m in good.iter().rev() {
                match self.restore_from(&dir, m) {
                    Ok(r) => return Ok(r),
                    Err(e @ PsError::RestoreAborted { .. }) => return Err(e),
                    Err(e) => tracing::warn!(step = m.step, error = %e, "skipping bad checkpoint"),
                }
            }
            Err(PsError::NoCheckpoint(format!(
                "(no good checkpoint in {})",
                dir.display()
            )))
        })();
        self.track(r)
    }

    /// Counters and sizes of the shard.
    pub fn stats(&self) -> StatsResponse {
        let (dense_params, dense_step) = self.dense_info();
        StatsResponse {
            tables: self.list_tables(),
            dense_params: dense_params as u64,
            dense_step,
            rows_pulled: self.rows_pulled.load(Ordering::Relaxed),
            rows_pushed: self.rows_pushed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            max_bytes: if self.budget.is_limited() {
                self.budget.max_bytes()
            } else {
                0
            },
        }
    }

    /// Sets the resident rows/bytes gauges of every table (called on scrape).
    pub fn update_gauges(&self) {
        for t in self.sorted_tables() {
            let st = t.stats();
            let labels = [
                ("table", t.spec().name().to_string()),
                ("shard", self.shard_label.clone()),
            ];
            metrics::gauge!(m::RESIDENT_ROWS, &labels).set(st.rows as f64);
            metrics::gauge!(m::RESIDENT_BYTES, &labels).set(st.resident_bytes as f64);
            let per_row = if st.rows > 0 {
                st.resident_bytes as f64 / st.rows as f64
            } else {
                0.0
            };
            metrics::gauge!(m::BYTES_PER_ROW, &labels).set(per_row);
            metrics::gauge!(m::ROW_BYTES, &labels).set(st.row_bytes as f64);
        }
        let shard = self.shard_label.clone();
        metrics::gauge!(m::BUDGET_USED_BYTES, "shard" => shard.clone())
            .set(self.budget.used() as f64);
        if self.budget.is_limited() {
            metrics::gauge!(m::BUDGET_MAX_BYTES, "shard" => shard)
                .set(self.budget.max_bytes() as f64);
        }
        let (_, step) = self.dense_info();
        metrics::gauge!(m::DENSE_STEP, "shard" => self.shard_label.clone()).set(step as f64);
    }

    /// The `shard` label value of this shard's metrics.
    pub fn shard_label(&self) -> &str {
        &self.shard_label
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::v1::Precision;

    fn cfg(precision: Precision) -> TableConfig {
        TableConfig {
            name: "item".into(),
            dim: 4,
            precision: precision as i32,
            ..Default::default()
        }
    }

    /// The duplicate check finds the first repeated id (as a hash set
    /// visiting the ids in order would), or none, at every size (the set's
    /// table kept, grown and freed between checks), extreme ids included.
    #[test]
    fn find_duplicate_matches_a_hash_set() {
        let oracle = |ids: &[u64]| {
            let mut seen = std::collections::HashSet::new();
            ids.iter().copied().find(|&id| !seen.insert(id))
        };
        let mut x = 11u64;
        let mut next = |range: u64| {
            x = splitmix64(x);
            x % range
        };
        for n in [0usize, 1, 2, 3, 31, 64, 65, 1000, 4096, 70_000, 300_000, 5] {
            for range in [4u64, 1000, 1 << 40, u64::MAX] {
                let mut ids: Vec<u64> = (0..n).map(|_| next(range)).collect();
                if n > 2 {
                    ids[0] = u64::MAX;
                    ids[1] = 0;
                }
                assert_eq!(find_duplicate(&ids), oracle(&ids), "n {n} range {range}");
                // Unique ids, then one repeat planted at the end.
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(find_duplicate(&ids), None, "n {n} range {range}");
                if let Some(&mid) = ids.get(ids.len() / 2) {
                    ids.push(mid);
                    assert_eq!(find_duplicate(&ids), Some(mid), "n {n} range {range}");
                }
            }
        }
    }

    /// A job asking for another precision than the existing (e.g. restored)
    /// table gets an error naming the field, and the table is unchanged.
    #[test]
    fn precision_mismatch_is_named_and_changes_nothing() {
        let s = Shard::new(ShardConfig::default()).unwrap();
        assert!(s.create_table(cfg(Precision::F32)).unwrap());
        s.push("item", &[1, 2], &[0.5; 8], &[], 1).unwrap();
        let before = s.table("item").unwrap().get_row(1);
        let e = s.create_table(cfg(Precision::F16)).unwrap_err().to_string();
        assert!(e.contains("precision: existing f32, requested f16"), "{e}");
        let t = s.table("item").unwrap();
        assert_eq!(t.spec().precision, crate::store::WeightPrecision::F32);
        assert_eq!(t.get_row(1), before);
        assert!(!s.create_table(cfg(Precision::F32)).unwrap());
    }

    /// The same for the storage precision of row-wise Adam's first moment.
    #[test]
    fn moment_precision_mismatch_is_named_and_changes_nothing() {
        use ember_proto::v1::{optimizer_config::Kind, Adam, OptimizerConfig};
        let adam = |moment: Precision| TableConfig {
            optimizer: Some(OptimizerConfig {
                kind: Some(Kind::RowwiseAdam(Adam {
                    lr: 0.01,
                    ..Default::default()
                })),
            }),
            moment_precision: moment as i32,
            ..cfg(Precision::F16)
        };
        let s = Shard::new(ShardConfig::default()).unwrap();
        assert!(s.create_table(adam(Precision::F16)).unwrap());
        s.push("item", &[1, 2], &[0.5; 8], &[], 1).unwrap();
        let before = s.table("item").unwrap().get_row(1);
        let e = s
            .create_table(adam(Precision::F32))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("moment_precision: existing f16, requested f32"),
            "{e}"
        );
        assert_eq!(s.table("item").unwrap().get_row(1), before);
        assert_eq!(
            s.table("item").unwrap().layout().bytes(),
            4 * (4 + 3 + 2 + 2)
        );
    }

    /// A budget smaller than one row is refused at table creation, naming it.
    #[test]
    fn budget_smaller_than_a_row_is_refused() {
        let s = Shard::new(ShardConfig {
            max_bytes: 40,
            ..Default::default()
        })
        .unwrap();
        let mut c = cfg(Precision::F32);
        c.dim = 64;
        let e = s.create_table(c).unwrap_err().to_string();
        assert!(
            e.contains("max_bytes 40") && e.contains("smaller than one row"),
            "{e}"
        );
        assert!(s.list_tables().is_empty());
    }
}
