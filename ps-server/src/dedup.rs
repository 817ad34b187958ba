//! Idempotent sparse pushes: a client that retries a Push after a transient
//! error (the connection broke after the shard applied it, a timeout) sends
//! the same nonzero `request_id`; the shard applies it once and answers every
//! copy with the first outcome. A row gradient applied twice would be a
//! silent, unrecoverable training error (Adagrad/Adam state and counts too).
//!
//! The shard remembers the outcomes of the last [`RecentPushes::CAPACITY`]
//! request ids (FIFO). A copy that arrives while the first is still being
//! applied gets ABORTED, which clients retry, and then sees the outcome.

use std::collections::{HashMap, VecDeque};

use ember_proto::v1::PushResponse;
use parking_lot::Mutex;

/// What the shard knows about a request id.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// First time: apply it, then call [`RecentPushes::finish`].
    New,
    /// Being applied by another call right now.
    InFlight,
    /// Applied already, with this answer.
    Done(PushResponse),
}

#[derive(Default)]
struct Inner {
    outcome: HashMap<u64, Option<PushResponse>>,
    order: VecDeque<u64>,
}

/// The recent push request ids of one shard and their outcomes.
#[derive(Default)]
pub struct RecentPushes {
    inner: Mutex<Inner>,
}

impl RecentPushes {
    /// Request ids remembered per shard (a few minutes of training at
    /// hundreds of pushes per second).
    pub const CAPACITY: usize = 1 << 16;

    /// Registers `id` (nonzero) and says whether it is new, in flight or done.
    pub fn begin(&self, id: u64) -> Seen {
        let mut g = self.inner.lock();
        match g.outcome.get(&id) {
            Some(Some(r)) => return Seen::Done(*r),
            Some(None) => return Seen::InFlight,
            None => {}
        }
        g.outcome.insert(id, None);
        g.order.push_back(id);
        while g.order.len() > Self::CAPACITY {
            if let Some(old) = g.order.pop_front() {
                g.outcome.remove(&old);
            }
        }
        Seen::New
    }

    /// Records the outcome of `id`: `Some` when applied, `None` when it was
    /// rejected (then forgotten, so a corrected copy is not swallowed).
    pub fn finish(&self, id: u64, outcome: Option<PushResponse>) {
        let mut g = self.inner.lock();
        match outcome {
            Some(r) => {
                if let Some(slot) = g.outcome.get_mut(&id) {
                    *slot = Some(r);
                }
            }
            None => {
                g.outcome.remove(&id);
                g.order.retain(|x| *x != id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_applied_once_and_forgotten_when_rejected() {
        let r = RecentPushes::default();
        let ok = PushResponse {
            updated: 3,
            not_admitted: 1,
        };
        assert_eq!(r.begin(7), Seen::New);
        assert_eq!(r.begin(7), Seen::InFlight);
        r.finish(7, Some(ok));
        assert_eq!(r.begin(7), Seen::Done(ok));
        assert_eq!(r.begin(8), Seen::New);
        r.finish(8, None);
        assert_eq!(r.begin(8), Seen::New);
    }

    #[test]
    fn only_the_most_recent_ids_are_remembered() {
        let r = RecentPushes::default();
        for id in 1..=(RecentPushes::CAPACITY as u64 + 1) {
            assert_eq!(r.begin(id), Seen::New);
            r.finish(id, Some(PushResponse::default()));
        }
        assert!(matches!(r.begin(2), Seen::Done(_)));
        assert_eq!(r.begin(1), Seen::New, "the oldest id was evicted");
    }
}
