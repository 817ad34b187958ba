//! Retrying gRPC calls that failed transiently, with exponential backoff: the
//! one policy type, the one classification of transient codes and the one
//! retry loop, used by the workers' shard client and by external workers
//! calling the coordinator.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::{Code, Status};

/// How a client retries a peer that does not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff delay.
    pub initial: Duration,
    /// Largest backoff delay (each delay doubles up to this).
    pub max: Duration,
    /// No retry starts after this long without success.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    /// 50 ms doubling up to 2 s, for 60 s.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The delay after `delay`: twice as long, at most [`RetryPolicy::max`].
    pub fn next_delay(&self, delay: Duration) -> Duration {
        (delay * 2).min(self.max)
    }
}

/// Whether a failed call may succeed if repeated unchanged, as opposed to a
/// request the peer rejected.
///
/// Transient:
/// - `Unavailable`: connection refused or reset, the peer restarting or
///   shutting down (shards answer `Unavailable` while they stop).
/// - `Unknown`, `Cancelled`: what tonic reports when the connection breaks
///   with the call in flight (a killed peer, an h2 reset).
/// - `Aborted`: the peer asks for a retry (a shard answers it to a push
///   whose request id it is still applying).
/// - `DeadlineExceeded`: the peer did not answer in time (the client's
///   timeout, a paused peer, or a shard's bounded wait for a dense step);
///   the request itself was valid. Every call retried through [`retry`] is
///   idempotent (reads, or pushes deduplicated by request id), so repeating
///   one that may have been applied is safe.
///
/// Not transient: everything else, in particular `ResourceExhausted` (a
/// message over the size limit, a shard's `TooLarge`: the same request fails
/// again), `InvalidArgument`, `NotFound`, `FailedPrecondition`,
/// `Unauthenticated`, `Internal` and `DataLoss`.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded
    )
}

/// Calls `call` until it succeeds, retrying [transient](is_transient)
/// failures with exponential backoff while less than `policy.deadline` has
/// passed since the first call. Each retry is logged (warn) with `peer` and
/// `what`, and a success after retries once (info). Returns the first
/// non-transient status, or the last one when the deadline passed.
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    peer: &str,
    what: &str,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    let mut delay = policy.initial;
    let mut retries = 0u32;
    loop {
        match call().await {
            Ok(v) => {
                if retries > 0 {
                    tracing::info!(peer, what, retries, "{peer} reachable again");
                }
                return Ok(v);
            }
            Err(status) if is_transient(&status) && start.elapsed() < policy.deadline => {
                retries += 1;
                tracing::warn!(
                    peer,
                    what,
                    retry = retries,
                    code = ?status.code(),
                    retry_in_ms = delay.as_millis() as u64,
                    "{peer} unreachable for {what}: {}; retrying",
                    status.message()
                );
                tokio::time::sleep(delay).await;
                delay = policy.next_delay(delay);
            }
            Err(status) => return Err(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn transient_codes() {
        for c in [
            Code::Unavailable,
            Code::Unknown,
            Code::Cancelled,
            Code::Aborted,
            Code::DeadlineExceeded,
        ] {
            assert!(is_transient(&Status::new(c, "x")), "{c:?}");
        }
        for c in [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            assert!(!is_transient(&Status::new(c, "x")), "{c:?}");
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let p = RetryPolicy {
            initial: Duration::from_millis(300),
            max: Duration::from_secs(1),
            deadline: Duration::from_secs(5),
        };
        assert_eq!(p.next_delay(p.initial), Duration::from_millis(600));
        assert_eq!(
            p.next_delay(Duration::from_millis(600)),
            Duration::from_secs(1)
        );
        assert_eq!(p.next_delay(Duration::from_secs(1)), Duration::from_secs(1));
    }

    fn fast(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_until_success() {
        let calls = Cell::new(0u32);
        let r = retry(&fast(10_000), "peer", "test", || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                match n {
                    1 => Err(Status::unavailable("down")),
                    2 => Err(Status::aborted("busy")),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(r.ok(), Some(3));
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn a_rejection_is_returned_at_once() {
        let calls = Cell::new(0u32);
        let r: Result<(), Status> = retry(&fast(10_000), "peer", "test", || {
            calls.set(calls.get() + 1);
            async { Err(Status::invalid_argument("bad")) }
        })
        .await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::InvalidArgument));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn gives_up_after_the_deadline_with_the_last_status() {
        let calls = Cell::new(0u32);
        let t = Instant::now();
        let r: Result<(), Status> = retry(&fast(30), "peer", "test", || {
            calls.set(calls.get() + 1);
            async { Err(Status::unavailable("still down")) }
        })
        .await;
        let e = r.err();
        assert_eq!(e.as_ref().map(|s| s.code()), Some(Code::Unavailable));
        assert_eq!(e.as_ref().map(|s| s.message()), Some("still down"));
        assert!(calls.get() > 2, "{}", calls.get());
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
