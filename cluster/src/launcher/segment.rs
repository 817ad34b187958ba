//! One attempt of one epoch segment: publish it to the workers through the
//! coordinator, follow their progress on the epoch's progress bar, and watch
//! shards (dead, hung) and workers (dead, silent, failed) until every worker
//! has reported its part or something failed.

use std::time::{Duration, Instant};

use ember_worker::train::worker::WorkerReport;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use tokio::sync::mpsc;

use super::{Cluster, Failure};
use crate::coordinator::WorkerEvent as Event;

/// The part of an epoch one attempt trains.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Global step at the epoch's start.
    pub start_step: u64,
    /// Steps of the epoch already trained (the data position to resume at).
    pub skip_steps: u64,
    /// Steps to train now.
    pub steps: u64,
}

/// The progress bar of one epoch, kept across its segments and attempts:
/// elapsed time, rate and ETA are the epoch's, measured from the bar's start.
pub(super) struct EpochBar {
    pb: ProgressBar,
}

impl EpochBar {
    /// A bar of `total` samples starting at `done` (a resumed epoch); hidden
    /// when `quiet`.
    pub(super) fn new(quiet: bool, epoch: usize, total: u64, done: u64) -> EpochBar {
        if quiet {
            return EpochBar {
                pb: ProgressBar::hidden(),
            };
        }
        let pb = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "epoch {prefix} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} samples \
             ({rate}, eta {eta_true}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{} samples/s", thousands(rate(s, done)));
            },
        )
        .with_key(
            "eta_true",
            move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let r = rate(s, done);
                let left = s.len().unwrap_or(0).saturating_sub(s.pos());
                let _ = match r > 0.0 {
                    true => write!(w, "{}", clock(left as f64 / r)),
                    false => write!(w, "?"),
                };
            },
        )
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(epoch.to_string());
        pb.set_position(done);
        EpochBar { pb }
    }

    fn set(&self, pos: u64, loss: Option<f64>) {
        self.pb.set_position(pos);
        if let Some(l) = loss {
            self.pb.set_message(format!("loss {l:.4}"));
        }
    }

    /// Removes the bar (the epoch's summary line follows).
    pub(super) fn finish(&self) {
        self.pb.finish_and_clear();
    }
}

/// Samples per second since the bar started at `done` samples.
fn rate(s: &ProgressState, done: u64) -> f64 {
    let secs = s.elapsed().as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    s.pos().saturating_sub(done) as f64 / secs
}

/// `12345.6` as `12,346`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as `1h02m03s`, `2m03s` or `3s`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// What the workers reported so far in one attempt.
struct Tally {
    done: Vec<Option<WorkerReport>>,
    samples: Vec<u64>,
    losses: Vec<f64>,
}

impl Tally {
    fn new(m: usize) -> Tally {
        Tally {
            done: vec![None; m],
            samples: vec![0; m],
            losses: vec![f64::NAN; m],
        }
    }

    /// Applies one worker event; a failure ends the attempt.
    fn apply(&mut self, ev: Event) -> Result<(), Failure> {
        let m = self.done.len();
        match ev {
            Event::Progress(p) if p.worker < m => {
                let w = p.worker.to_string();
                // Until its Done (the last event), a worker's samples are
                // those of its last progress report.
                metrics::counter!("ember_train_samples_total", "worker" => w.clone())
                    .increment(p.samples.saturating_sub(self.samples[p.worker]));
                metrics::gauge!("ember_train_loss", "worker" => w).set(p.loss);
                self.samples[p.worker] = p.samples;
                self.losses[p.worker] = p.loss;
            }
            Event::Done(r) if r.worker < m => {
                tracing::debug!(worker = r.worker, steps = r.steps, "worker done");
                // Progress arrives with the worker's heartbeat: a task shorter
                // than its interval reports none, so the samples since the
                // last report are counted here (the counter is exact at
                // every task's end).
                metrics::counter!("ember_train_samples_total", "worker" => r.worker.to_string())
                    .increment(r.samples.saturating_sub(self.samples[r.worker]));
                self.samples[r.worker] = r.samples;
                let w = r.worker;
                self.done[w] = Some(r);
            }
            Event::Failed(w, e) => return Err(Failure::Worker(w, e)),
            Event::Rejected(w, e) => return Err(Failure::Rejected(w, e)),
            Event::Progress(_) | Event::Done(_) => {}
        }
        Ok(())
    }

    fn mean_loss(&self) -> Option<f64> {
        let l: Vec<f64> = self
            .losses
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        (!l.is_empty()).then(|| l.iter().sum::<f64>() / l.len() as f64)
    }
}

/// Runs one attempt of `part`; returns every worker's report. After a
/// failure it waits until no worker holds the abandoned attempt any more, so
/// that no stale push lands after the rollback.
pub(super) async fn run_segment(
    cl: &mut Cluster,
    part: &Segment,
    bar: &EpochBar,
) -> Result<Vec<WorkerReport>, Failure> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let attempt = cl.coord.publish(
        part.epoch,
        part.start_step,
        part.steps,
        part.skip_steps,
        &cl.addrs,
        tx,
        Instant::now(),
    );
    tracing::debug!(
        epoch = part.epoch,
        attempt,
        skip = part.skip_steps,
        steps = part.steps,
        "segment published"
    );
    let base = part.skip_steps * cl.samples_per_step();
    let result = follow(cl, &mut rx, base, bar).await;
    cl.coord.pause();
    if result.is_err() {
        settle(cl).await;
    }
    result
}

/// Follows the attempt's events and watches the cluster until every worker
/// reported done or something failed.
async fn follow(
    cl: &mut Cluster,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    base: u64,
    bar: &EpochBar,
) -> Result<Vec<WorkerReport>, Failure> {
    let mut tally = Tally::new(cl.cfg.cluster.workers);
    let mut last_check = Instant::now();
    loop {
        if tally.done.iter().all(Option::is_some) {
            return Ok(tally.done.into_iter().flatten().collect());
        }
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            tally.apply(ev)?;
            bar.set(base + tally.samples.iter().sum::<u64>(), tally.mean_loss());
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            check_cluster(cl).await?;
        }
    }
}

/// Dead or hung shards, dead workers, and workers silent past their timeout.
async fn check_cluster(cl: &mut Cluster) -> Result<(), Failure> {
    let dead = cl.shards.dead(&cl.ps).await;
    if !dead.is_empty() {
        return Err(Failure::ShardDied(dead));
    }
    let hung = cl.health.hung(&cl.ps).await;
    if !hung.is_empty() {
        return Err(Failure::ShardHung(hung));
    }
    if let Some((w, why)) = cl.workers.dead().into_iter().next() {
        // It holds nothing any more: the settle need not wait for it.
        cl.coord.forget(w);
        return Err(Failure::Worker(w, why));
    }
    if let Some((w, e)) = cl.coord.check_timeouts(Instant::now()) {
        return Err(Failure::Worker(w, e));
    }
    Ok(())
}

/// After a failed attempt: waits until every worker that still held it has
/// let go (its next heartbeat is answered `keep_going = false`; it then asks
/// NextTask), died, or gone silent. Bounded by `worker_timeout_s` (60 s at most).
async fn settle(cl: &mut Cluster) {
    let grace = Duration::from_secs(5);
    let until = Instant::now() + Duration::from_secs(cl.cfg.cluster.worker_timeout_s.min(60));
    loop {
        for (w, why) in cl.workers.dead() {
            tracing::warn!(worker = w, "{why}");
            cl.coord.forget(w);
        }
        let busy = cl.coord.unsettled(Instant::now(), grace);
        if busy.is_empty() {
            return;
        }
        if Instant::now() > until {
            tracing::warn!(workers = ?busy, "workers still hold the abandoned attempt; rolling back anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_times_read_well() {
        assert_eq!(thousands(5836.4), "5,836");
        assert_eq!(thousands(35022.3343), "35,022");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(clock(9.4), "9s");
        assert_eq!(clock(125.0), "2m05s");
        assert_eq!(clock(3723.0), "1h02m03s");
    }
}
