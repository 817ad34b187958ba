//! Dense parameters of a shard: named flat f32 buffers with their optimizer
//! state, asynchronous or synchronous (accumulate-until-N, apply the mean once)
//! updates, and a watch channel of the dense step for `PullDense(min_step)`.

use crate::error::{PsError, Result};
use crate::optim::Optimizer;
use ember_proto::v1::OptimizerConfig;
use parking_lot::Mutex;
use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

/// A named flat f32 buffer (a dense parameter or its gradient).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DenseTensor {
    /// Stable dotted name, e.g. `din.att.fc1.weight`.
    pub name: String,
    /// Values.
    pub values: Vec<f32>,
}

impl DenseTensor {
    /// A tensor from a name and values.
    pub fn new(name: impl Into<String>, values: Vec<f32>) -> Self {
        DenseTensor {
            name: name.into(),
            values,
        }
    }
}

/// One dense parameter with its optimizer.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseEntry {
    /// Current values.
    pub values: Vec<f32>,
    /// Optimizer state (`opt.state_len(values.len())` values).
    pub state: Vec<f32>,
    /// Optimizer.
    pub opt: Optimizer,
    /// The optimizer config as received (kept for checkpoints).
    pub opt_config: Option<OptimizerConfig>,
}

#[derive(Default)]
struct SyncAccum {
    /// Pushes this step needs (the `num_workers` of its pushes).
    need: u32,
    workers: FxHashSet<u32>,
    sums: BTreeMap<String, Vec<f32>>,
}

#[derive(Default)]
struct Inner {
    params: BTreeMap<String, DenseEntry>,
    step: u64,
    pending: BTreeMap<u64, SyncAccum>,
}

/// The dense parameters of one shard.
pub struct DenseStore {
    inner: Mutex<Inner>,
    step_tx: watch::Sender<u64>,
}

impl Default for DenseStore {
    fn default() -> Self {
        DenseStore {
            inner: Mutex::new(Inner::default()),
            step_tx: watch::channel(0).0,
        }
    }
}

fn check_finite(what: &str, name: &str, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(PsError::invalid(format!(
            "{what} `{name}` has a non-finite value at index {i}"
        )));
    }
    Ok(())
}

fn check_unique<'a>(names: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = FxHashSet::default();
    for n in names {
        if !seen.insert(n) {
            return Err(PsError::invalid(format!("dense name `{n}` appears twice")));
        }
    }
    Ok(())
}

impl DenseStore {
    /// Number of dense parameters.
    pub fn len(&self) -> usize {
        self.inner.lock().params.len()
    }

    /// Whether there is no dense parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dense updates applied so far.
    pub fn step(&self) -> u64 {
        self.inner.lock().step
    }

    /// Registers parameters; existing names of the same length keep their
    /// value. Returns the names created now.
    pub fn init(
        &self,
        params: &[DenseTensor],
        opt: Option<&OptimizerConfig>,
    ) -> Result<Vec<String>> {
        let optimizer = Optimizer::from_config(opt)?;
        if optimizer.is_rowwise() {
            return Err(PsError::invalid(
                "malformed optimizer config: row-wise optimizers are for sparse tables; dense parameters take sgd, adagrad, adam or ftrl",
            ));
        }
        check_unique(params.iter().map(|p| p.name.as_str()))?;
        let mut g = self.inner.lock();
        for p in params {
            if p.name.is_empty() {
                return Err(PsError::invalid("dense parameter with an empty name"));
            }
            check_finite("dense parameter", &p.name, &p.values)?;
            if let Some(e) = g.params.get(&p.name) {
                if e.values.len() != p.values.len() {
                    return Err(PsError::invalid(format!(
                        "dense parameter `{}` exists with {} values, got {}",
                        p.name,
                        e.values.len(),
                        p.values.len()
                    )));
                }
            }
        }
        let mut created = Vec::new();
        for p in params {
            if g.params.contains_key(&p.name) {
                continue;
            }
            let mut state = vec![0.0; optimizer.state_len(p.values.len())];
            optimizer.init_state(&mut state);
            g.params.insert(
                p.name.clone(),
                DenseEntry {
                    values: p.values.clone(),
                    state,
                    opt: optimizer,
                    opt_config: opt.cloned(),
                },
            );
            created.push(p.name.clone());
        }
        Ok(created)
    }

    /// Reads parameters (`names` empty = all, sorted by name) and the step.
    pub fn pull(&self, names: &[String]) -> Result<(Vec<DenseTensor>, u64)> {
        let g = self.inner.lock();
        let out = if names.is_empty() {
            g.params
                .iter()
                .map(|(n, e)| DenseTensor::new(n.clone(), e.values.clone()))
                .collect()
        } else {
            names
                .iter()
                .map(|n| {
                    g.params
                        .get(n)
                        .map(|e| DenseTensor::new(n.clone(), e.values.clone()))
                        .ok_or_else(|| PsError::UnknownDense(n.clone()))
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok((out, g.step))
    }

    /// Waits until the dense step is at least `min_step`; returns the step.
    pub async fn wait_step(&self, min_step: u64, timeout: Duration) -> Result<u64> {
        let mut rx = self.step_tx.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|s| *s >= min_step))
            .await
            .map(|r| r.map(|s| *s));
        match res {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(PsError::ShuttingDown),
            Err(_) => Err(PsError::Timeout {
                min_step,
                step: *self.step_tx.borrow(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    fn validate_grads(g: &Inner, grads: &[DenseTensor]) -> Result<()> {
        check_unique(grads.iter().map(|p| p.name.as_str()))?;
        for p in grads {
            let e = g
                .params
                .get(&p.name)
                .ok_or_else(|| PsError::UnknownDense(p.name.clone()))?;
            if e.values.len() != p.values.len() {
                return Err(PsError::invalid(format!(
                    "gradient of `{}` has {} values, parameter has {}",
                    p.name,
                    p.values.len(),
                    e.values.len()
                )));
            }
            check_finite("gradient of", &p.name, &p.values)?;
        }
        Ok(())
    }

    /// Pushes gradients (see `PushDenseRequest`): `num_workers <= 1` applies
    /// at once and advances the step; `N > 1` accumulates the pushes for
    /// `step` until N distinct workers pushed, then applies their mean once.
    /// Synchronous steps are applied in step order: a step whose pushes
    /// are complete while an earlier step still waits for some (workers that
    /// run ahead with `cluster.dense_staleness`, or pushes that overtake
    /// each other on the wire) is held and applied right after it. The
    /// dense step is then the first step not yet applied. A repeated push by
    /// one worker for one step, or a push for a step already applied, is
    /// ignored. Returns the dense step after the push.
    pub fn push(
        &self,
        grads: &[DenseTensor],
        step: u64,
        num_workers: u32,
        worker_index: u32,
    ) -> Result<u64> {
        let mut g = self.inner.lock();
        Self::validate_grads(&g, grads)?;
        if num_workers <= 1 {
            let inner = &mut *g;
            for p in grads {
                if let Some(e) = inner.params.get_mut(&p.name) {
                    e.opt.step(&mut e.values, &mut e.state, &p.values);
                }
            }
            inner.step += 1;
            let s = inner.step;
            drop(g);
            self.step_tx.send_replace(s);
            return Ok(s);
        }
        if worker_index >= num_workers {
            return Err(PsError::invalid(format!(
                "worker_index {worker_index} >= num_workers {num_workers}"
            )));
        }
        if step < g.step {
            return Ok(g.step); // already applied: a retry
        }
        let inner = &mut *g;
        let acc = inner.pending.entry(step).or_insert_with(|| SyncAccum {
            need: num_workers,
            ..SyncAccum::default()
        });
        // (A step created just now has this `need`: nothing changes on refusal.)
        if acc.need != num_workers {
            return Err(PsError::invalid(format!(
                "push for dense step {step} says num_workers {num_workers}, earlier pushes for it said {}",
                acc.need
            )));
        }
        if !acc.workers.insert(worker_index) {
            return Ok(inner.step);
        }
        for p in grads {
            let sum = acc
                .sums
                .entry(p.name.clone())
                .or_insert_with(|| vec![0.0; p.values.len()]);
            for (s, v) in sum.iter_mut().zip(&p.values) {
                *s += v;
            }
        }
        let before = inner.step;
        // Apply the next step once complete, then any later ones that
        // completed before it, in order.
        while let Some(next) = inner.pending.first_entry() {
            let acc = next.get();
            if *next.key() != inner.step || acc.workers.len() < acc.need as usize {
                break;
            }
            let done = next.remove();
            let scale = 1.0 / done.need as f32;
            for (name, mut sum) in done.sums {
                if let Some(e) = inner.params.get_mut(&name) {
                    sum.iter_mut().for_each(|v| *v *= scale);
                    e.opt.step(&mut e.values, &mut e.state, &sum);
                }
            }
            inner.step += 1;
        }
        let s = inner.step;
        drop(g);
        if s != before {
            self.step_tx.send_replace(s);
        }
        Ok(s)
    }

    /// Synchronous steps whose pushes are complete but wait for an earlier
    /// step (see [`DenseStore::push`]), and steps still waiting for pushes.
    #[cfg(test)]
    fn pending_steps(&self) -> (usize, usize) {
        let g = self.inner.lock();
        let complete = g
            .pending
            .values()
            .filter(|a| a.workers.len() >= a.need as usize)
            .count();
        (complete, g.pending.len() - complete)
    }

    /// Overwrites the values of existing parameters (optimizer state kept).
    pub fn assign(&self, params: &[DenseTensor]) -> Result<()> {
        let mut g = self.inner.lock();
        Self::validate_grads(&g, params)?;
        for p in params {
            if let Some(e) = g.params.get_mut(&p.name) {
                e.values.copy_from_slice(&p.values);
            }
        }
        Ok(())
    }

    /// A copy of every parameter and the step (checkpoint path).
    pub fn snapshot(&self) -> (BTreeMap<String, DenseEntry>, u64) {
        let g = self.inner.lock();
        (g.params.clone(), g.step)
    }

    /// Replaces every parameter and the step (restore path).
    pub fn replace(&self, params: BTreeMap<String, DenseEntry>, step: u64) {
        let mut g = self.inner.lock();
        g.params = params;
        g.step = step;
        g.pending.clear();
        drop(g);
        self.step_tx.send_replace(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::v1::{optimizer_config::Kind, Sgd};

    /// Adagrad (lr 1, eps 1, accumulator from 0): its accumulator makes the
    /// order and the count of applications visible in hand-computed values.
    fn adagrad_lr1_eps1() -> OptimizerConfig {
        OptimizerConfig {
            kind: Some(Kind::Adagrad(ember_proto::v1::Adagrad {
                lr: 1.0,
                initial_accumulator: 0.0,
                eps: 1.0,
            })),
        }
    }

    fn sgd(lr: f32) -> OptimizerConfig {
        OptimizerConfig {
            kind: Some(Kind::Sgd(Sgd { lr })),
        }
    }

    #[test]
    fn init_keeps_existing_values_and_rejects_new_length() {
        let d = DenseStore::default();
        let p = [DenseTensor::new("a", vec![1.0, 2.0])];
        assert_eq!(d.init(&p, Some(&sgd(1.0))).unwrap(), vec!["a".to_string()]);
        d.push(&[DenseTensor::new("a", vec![1.0, 1.0])], 0, 1, 0)
            .unwrap();
        assert!(d.init(&p, None).unwrap().is_empty());
        assert_eq!(d.pull(&[]).unwrap().0[0].values, vec![0.0, 1.0]);
        let e = d
            .init(&[DenseTensor::new("a", vec![1.0])], None)
            .unwrap_err();
        assert!(matches!(e, PsError::InvalidArgument(_)));
    }

    #[test]
    fn sync_push_applies_mean_once_and_ignores_duplicates() {
        let d = DenseStore::default();
        d.init(&[DenseTensor::new("w", vec![0.0])], Some(&sgd(1.0)))
            .unwrap();
        let g = |v: f32| [DenseTensor::new("w", vec![v])];
        assert_eq!(d.push(&g(2.0), 0, 3, 0).unwrap(), 0);
        assert_eq!(d.push(&g(100.0), 0, 3, 0).unwrap(), 0, "duplicate ignored");
        assert_eq!(d.push(&g(4.0), 0, 3, 1).unwrap(), 0);
        assert_eq!(
            d.pull(&[]).unwrap().0[0].values,
            vec![0.0],
            "not applied before N"
        );
        assert_eq!(d.push(&g(6.0), 0, 3, 2).unwrap(), 1);
        assert_eq!(
            d.pull(&[]).unwrap(),
            (vec![DenseTensor::new("w", vec![-4.0])], 1)
        );
        // A late retry for step 0 changes nothing.
        assert_eq!(d.push(&g(6.0), 0, 3, 2).unwrap(), 1);
        assert_eq!(d.pull(&[]).unwrap().0[0].values, vec![-4.0]);
        assert!(d.push(&g(1.0), 1, 3, 3).is_err());
    }

    /// Workers that run ahead (`cluster.dense_staleness`) or pushes that
    /// overtake each other: step 1 completes before step 0. It is held
    /// (the dense step stays 0, the values unchanged) and applied right
    /// after step 0, in order. With Adagrad the order is visible: applying
    /// mean(step 1) before mean(step 0) gives other values.
    #[test]
    fn sync_steps_completed_out_of_order_are_applied_in_order() {
        let adagrad = adagrad_lr1_eps1();
        let d = DenseStore::default();
        d.init(&[DenseTensor::new("w", vec![10.0])], Some(&adagrad))
            .unwrap();
        let g = |v: f32| [DenseTensor::new("w", vec![v])];
        assert_eq!(d.push(&g(2.0), 0, 2, 0).unwrap(), 0);
        assert_eq!(d.push(&g(10.0), 1, 2, 0).unwrap(), 0);
        assert_eq!(d.push(&g(14.0), 1, 2, 1).unwrap(), 0, "step 1 held");
        assert_eq!(d.pending_steps(), (1, 1));
        assert_eq!(
            d.pull(&[]).unwrap(),
            (vec![DenseTensor::new("w", vec![10.0])], 0)
        );
        // Step 0 completes: mean 3, then the held step 1: mean 12.
        assert_eq!(d.push(&g(4.0), 0, 2, 1).unwrap(), 2);
        assert_eq!(d.pending_steps(), (0, 0));
        let in_order = 10.0f32 - 3.0 / (3.0 + 1.0) - 12.0 / ((9.0f32 + 144.0).sqrt() + 1.0);
        let swapped = 10.0f32 - 12.0 / (12.0 + 1.0) - 3.0 / ((144.0f32 + 9.0).sqrt() + 1.0);
        let (got, step) = d.pull(&[]).unwrap();
        assert_eq!(step, 2);
        assert!(
            (got[0].values[0] - in_order).abs() < 1e-5,
            "{got:?} vs {in_order}"
        );
        assert!((in_order - swapped).abs() > 0.1);
        // Late retries of either step change nothing.
        assert_eq!(d.push(&g(100.0), 0, 2, 0).unwrap(), 2);
        assert_eq!(d.push(&g(100.0), 1, 2, 1).unwrap(), 2);
        assert_eq!(d.pull(&[]).unwrap().0, got);
    }

    /// A push whose `num_workers` disagrees with the earlier pushes of its
    /// step is refused, naming both, and the accumulated step is unchanged.
    #[test]
    fn sync_push_with_another_worker_count_is_refused() {
        let d = DenseStore::default();
        d.init(&[DenseTensor::new("w", vec![0.0])], Some(&sgd(1.0)))
            .unwrap();
        let g = |v: f32| [DenseTensor::new("w", vec![v])];
        assert_eq!(d.push(&g(2.0), 0, 2, 0).unwrap(), 0);
        let e = d.push(&g(8.0), 0, 3, 1).unwrap_err().to_string();
        assert!(e.contains("num_workers 3") && e.contains("said 2"), "{e}");
        assert_eq!(d.push(&g(4.0), 0, 2, 1).unwrap(), 1);
        assert_eq!(d.pull(&[]).unwrap().0[0].values, vec![-3.0]);
    }

    /// Asynchronous mode (`num_workers` 0 or 1, `PushDenseRequest`): every
    /// push is applied at once with the optimizer, in arrival order, and
    /// advances the step by one; nothing is averaged and nothing is
    /// deduplicated (two workers pushing for the same step, or a push for a
    /// step already passed, are both applied). Hand-computed with Adagrad,
    /// whose accumulator makes the order and the count of applications visible.
    #[test]
    fn async_push_applies_every_gradient_at_once_in_arrival_order() {
        let adagrad = adagrad_lr1_eps1();
        let d = DenseStore::default();
        d.init(&[DenseTensor::new("w", vec![10.0, 0.0])], Some(&adagrad))
            .unwrap();
        let g = |a: f32, b: f32| [DenseTensor::new("w", vec![a, b])];
        // Worker 0, step 0: acc = [9, 0]; w -= g / (sqrt(acc) + 1) = [3/4, 0].
        assert_eq!(d.push(&g(3.0, 0.0), 0, 1, 0).unwrap(), 1);
        // Worker 1, also step 0 (async: not a duplicate, not averaged):
        // acc = [9 + 16, 9]; w -= [4/6, 3/4].
        assert_eq!(d.push(&g(4.0, 3.0), 0, 1, 1).unwrap(), 2);
        // A stale push (step 0 < dense step 2) with num_workers = 0 is applied too:
        // acc = [25 + 144, 9 + 16]; w -= [12/14, -4/6].
        assert_eq!(d.push(&g(12.0, -4.0), 0, 0, 0).unwrap(), 3);
        let want = [
            10.0f32 - 3.0 / 4.0 - 4.0 / 6.0 - 12.0 / 14.0,
            0.0f32 - 3.0 / 4.0 + 4.0 / 6.0,
        ];
        let (got, step) = d.pull(&[]).unwrap();
        assert_eq!(step, 3);
        for (x, y) in got[0].values.iter().zip(want) {
            assert!((x - y).abs() <= 1e-5, "{:?} vs {want:?}", got[0].values);
        }
        // The mean of the three gradients applied once (what sync mode
        // would do for one step of three workers) gives another value.
        let mean_once = 10.0f32 - (19.0 / 3.0) / ((19.0f32 / 3.0).abs() + 1.0);
        assert!((got[0].values[0] - mean_once).abs() > 0.1);
        // The optimizer state is the sum of the squared gradients of all three pushes.
        let (params, _) = d.snapshot();
        assert_eq!(params["w"].state, vec![9.0 + 16.0 + 144.0, 9.0 + 16.0]);
    }

    /// A pull in async mode never waits: `wait_step(0)` returns at once
    /// whatever the step, which is what workers call in async mode
    /// (`PullDense(min_step = 0)`).
    #[tokio::test]
    async fn async_pull_does_not_wait() {
        let d = DenseStore::default();
        d.init(&[DenseTensor::new("w", vec![0.0])], Some(&sgd(1.0)))
            .unwrap();
        assert_eq!(d.wait_step(0, Duration::from_millis(1)).await.unwrap(), 0);
        d.push(&[DenseTensor::new("w", vec![1.0])], 7, 1, 0)
            .unwrap();
        assert_eq!(d.wait_step(0, Duration::from_millis(1)).await.unwrap(), 1);
    }

    #[test]
    fn rejected_push_changes_nothing() {
        let d = DenseStore::default();
        d.init(&[DenseTensor::new("w", vec![0.0, 0.0])], None)
            .unwrap();
        let bad = [
            vec![DenseTensor::new("w", vec![1.0])],
            vec![DenseTensor::new("w", vec![1.0, f32::NAN])],
            vec![DenseTensor::new("x", vec![1.0])],
        ];
        for b in bad {
            assert!(d.push(&b, 0, 1, 0).is_err());
        }
        assert_eq!(
            d.pull(&[]).unwrap(),
            (vec![DenseTensor::new("w", vec![0.0, 0.0])], 0)
        );
    }

    #[tokio::test]
    async fn wait_step_wakes_and_times_out() {
        let d = std::sync::Arc::new(DenseStore::default());
        d.init(&[DenseTensor::new("w", vec![0.0])], None).unwrap();
        let e = d.wait_step(1, Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(e, PsError::Timeout { .. }));
        let d2 = d.clone();
        let h = tokio::spawn(async move { d2.wait_step(1, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        d.push(&[DenseTensor::new("w", vec![1.0])], 0, 1, 0)
            .unwrap();
        assert_eq!(h.await.unwrap().unwrap(), 1);
    }
}
