//! Recovery: after a failed attempt, bring the cluster back to the last
//! complete cluster checkpoint (restart dead shards and workers, wait for
//! external shards, restore every shard), or end the job when the failure is
//! deterministic or the restarts are used up.

use std::time::Duration;

use ember_worker::train::backend::Backend;

use super::{Cluster, Failure};
use crate::health::{guarded, Guarded};
use crate::ClusterError;

/// Handles the failure of an attempt of `epoch`: a deterministic worker
/// failure ends the job; otherwise the cluster is rolled back to `step`
/// (counted in `restarts`, at most `cluster.max_restarts`), retrying the
/// rollback itself while it fails.
pub(super) async fn recover(
    cl: &mut Cluster,
    epoch: usize,
    failure: Failure,
    restarts: &mut u32,
    step: u64,
) -> Result<(), ClusterError> {
    let mut failure = failure;
    loop {
        if let Failure::Rejected(w, cause) = &failure {
            return Err(ClusterError::Launch(format!(
                "epoch {epoch}: worker {w} failed: {cause} (a data, config or model error \
                 fails the same way every time: not retried)"
            )));
        }
        *restarts += 1;
        if *restarts > cl.cfg.cluster.max_restarts {
            return Err(ClusterError::Launch(format!(
                "epoch {epoch} failed {restarts} times, giving up; last failure: {failure}"
            )));
        }
        tracing::warn!(
            epoch,
            restarts = *restarts,
            "{failure}; rolling the cluster back to step {step}"
        );
        if let Failure::ShardHung(h) = &failure {
            cl.shards.kill_hung(h);
        }
        match rollback(cl, step).await {
            Ok(()) => return Ok(()),
            Err(f) => failure = f,
        }
    }
}

/// Brings the cluster back to the cluster checkpoint `step`: restarts dead
/// shard processes from their checkpoints and dead workers, waits for
/// external shards to answer again, and restores every shard to `step`
/// (watched: a shard that hangs during the restore fails it again).
async fn rollback(cl: &mut Cluster, step: u64) -> Result<(), Failure> {
    let restarted = cl
        .shards
        .restart_dead()
        .map_err(|e| Failure::Coordinator(format!("restarting shards: {e}")))?;
    if !restarted.is_empty() {
        tracing::warn!(?restarted, "restarted shards");
    }
    let restarted = cl
        .workers
        .restart_dead()
        .map_err(|e| Failure::Coordinator(format!("restarting workers: {e}")))?;
    if !restarted.is_empty() {
        tracing::warn!(?restarted, "restarted workers");
    }
    // An orchestrator may take a while to bring a shard back (or resume it).
    let c = &cl.cfg.cluster;
    let wait = Duration::from_secs(c.retry_deadline_s.max(c.control_timeout_s).max(120));
    cl.shards
        .wait_external(&cl.ps, wait)
        .await
        .map_err(|e| Failure::Coordinator(e.to_string()))?;
    cl.health.reset();
    let ps: &Backend = &cl.ps;
    guarded(ps, &mut cl.health, cl.control, ps.restore(step))
        .await
        .map_err(|e| guard_failure(&format!("restore of step {step}"), e))?;
    tracing::info!(step, "cluster rolled back");
    Ok(())
}

/// A failed guarded control call as the failure of an attempt.
pub(super) fn guard_failure<E: std::fmt::Display>(what: &str, g: Guarded<E>) -> Failure {
    match g {
        Guarded::Hung(s) => Failure::ShardHung(s),
        other => Failure::Coordinator(format!("{what}: {other}")),
    }
}

/// A failed control call outside an attempt (setup, resume) as a launch error.
pub(super) fn control_error<E: std::fmt::Display>(what: &str, g: Guarded<E>) -> ClusterError {
    ClusterError::Launch(format!("{what}: {g}"))
}
