//! Shard liveness beyond "the process exists": a shard that stops answering
//! (a stopped process, a network partition, a disk that blocks every write)
//! is as fatal to a synchronous cluster as one that died, and it never exits.
//!
//! [`HealthWatch`] probes every shard's `Health` RPC, each probe bounded by a
//! short timeout, and calls a shard *hung* once it has not answered for
//! `cluster.shard_timeout_s`. [`guarded`] runs one control call of the
//! launcher (checkpoint, restore, evaluation, ...) under an overall deadline
//! while the watch keeps probing, so that no call waits on a hung shard
//! forever. The launcher then kills and restarts a shard process it started,
//! or waits with backoff for an external shard to come back, and rolls the
//! cluster back to its last checkpoint.

use std::future::Future;
use std::time::{Duration, Instant};

use ember_worker::train::backend::Backend;
use futures_util::future::join_all;

/// How often a watch probes while guarding a call.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Tracks when each shard last answered `Health`.
#[derive(Debug, Clone)]
pub struct HealthWatch {
    /// Bound of one probe.
    probe_timeout: Duration,
    /// A shard silent this long is hung.
    hung_after: Duration,
    /// Since when each shard has failed every probe (None: it answered last).
    silent_since: Vec<Option<Instant>>,
    /// The last probe error of each shard (for the report).
    last_err: Vec<Option<String>>,
}

impl HealthWatch {
    /// A watch of `num_shards` shards; a shard silent for `hung_after` is hung.
    /// Each probe waits at most `hung_after / 4` (between 1 and 5 seconds).
    pub fn new(num_shards: usize, hung_after: Duration) -> Self {
        let probe_timeout = (hung_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(5));
        HealthWatch {
            probe_timeout,
            hung_after,
            silent_since: vec![None; num_shards],
            last_err: vec![None; num_shards],
        }
    }

    /// The silence after which a shard counts as hung.
    pub fn hung_after(&self) -> Duration {
        self.hung_after
    }

    /// Forgets past silence of every shard (after a restart or a rollback:
    /// the clock starts again).
    pub fn reset(&mut self) {
        self.silent_since.iter_mut().for_each(|t| *t = None);
        self.last_err.iter_mut().for_each(|e| *e = None);
    }

    /// The last probe error of shard `s`, if its last probe failed.
    pub fn last_error(&self, s: usize) -> Option<&str> {
        self.last_err.get(s).and_then(|e| e.as_deref())
    }

    /// Probes every shard once, concurrently (each bounded by the probe
    /// timeout), and returns the shards that have failed every probe for
    /// `hung_after` (silence is measured from the start of the first failed
    /// probe, so time without probes never counts). In-process backends are
    /// never hung.
    pub async fn hung(&mut self, ps: &Backend) -> Vec<usize> {
        let Backend::Remote(client) = ps else {
            return Vec::new();
        };
        let timeout = self.probe_timeout;
        let started = Instant::now();
        let probes = (0..client.num_shards()).map(|s| client.health_once(s, timeout));
        let results = join_all(probes).await;
        let now = Instant::now();
        let mut hung = Vec::new();
        for (s, r) in results.into_iter().enumerate() {
            match r {
                Ok(_) => {
                    self.silent_since[s] = None;
                    self.last_err[s] = None;
                }
                Err(e) => {
                    self.last_err[s] = Some(e.to_string());
                    let since = *self.silent_since[s].get_or_insert(started);
                    if now.duration_since(since) >= self.hung_after {
                        hung.push(s);
                    }
                }
            }
        }
        hung
    }
}

/// Why a guarded call did not return its value.
#[derive(Debug)]
pub enum Guarded<E> {
    /// The call itself failed.
    Failed(E),
    /// These shards stopped answering Health while the call ran.
    Hung(Vec<usize>),
    /// The call did not finish within its deadline.
    Deadline(Duration),
}

impl<E: std::fmt::Display> std::fmt::Display for Guarded<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Guarded::Failed(e) => write!(f, "{e}"),
            Guarded::Hung(s) => write!(f, "shard(s) {s:?} stopped answering Health"),
            Guarded::Deadline(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

/// Runs `call` until it finishes, a shard is hung (`watch`), or `deadline`
/// passes, whichever comes first. Dropping the call on a hang cancels its
/// outstanding RPCs.
pub async fn guarded<T, E, F>(
    ps: &Backend,
    watch: &mut HealthWatch,
    deadline: Duration,
    call: F,
) -> Result<T, Guarded<E>>
where
    F: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let monitor = async {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            if start.elapsed() >= deadline {
                return Guarded::Deadline(deadline);
            }
            let hung = watch.hung(ps).await;
            if !hung.is_empty() {
                return Guarded::Hung(hung);
            }
        }
    };
    tokio::select! {
        r = call => r.map_err(Guarded::Failed),
        g = monitor => Err(g),
    }
}

/// Runs `call` with a plain deadline (no Health probes): for calls made
/// before the cluster is up or while it shuts down.
pub async fn with_deadline<T, E, F>(deadline: Duration, call: F) -> Result<T, Guarded<E>>
where
    F: Future<Output = Result<T, E>>,
{
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r.map_err(Guarded::Failed),
        Err(_) => Err(Guarded::Deadline(deadline)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_worker::train::client::{PsClient, RetryPolicy};

    /// A listener that accepts connections and never answers: a stopped
    /// process looks exactly like this to a client (the kernel completes
    /// the TCP handshake, nothing replies).
    /// (A plain thread, not `spawn_blocking`: the runtime would wait for it
    /// at the end of the test; the thread ends with the test process.)
    fn silent_listener() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming().take(64) {
                held.push(c);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_silent_shard_is_hung_after_the_timeout_and_a_guarded_call_ends() {
        let addr = silent_listener();
        let client = PsClient::new(
            &[addr],
            RetryPolicy::default(),
            &ember_proto::security::ClientSecurity::insecure(),
        )
        .unwrap();
        let ps = Backend::Remote(client.clone());
        let mut watch = HealthWatch::new(1, Duration::from_secs(2));
        // Not yet: silence shorter than hung_after.
        assert!(watch.hung(&ps).await.is_empty());
        assert!(watch.last_error(0).is_some());
        // A call that would wait forever (the shard never answers) ends as Hung.
        let t = Instant::now();
        let r = guarded(&ps, &mut watch, Duration::from_secs(60), client.stats()).await;
        assert!(matches!(r, Err(Guarded::Hung(ref s)) if s == &[0]), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        // The plain deadline also ends it.
        let r = with_deadline(Duration::from_millis(300), client.stats()).await;
        assert!(matches!(r, Err(Guarded::Deadline(_))), "{r:?}");
    }
}
