//! Bodies of messages just enqueued, kept in memory (bounded) so that their first delivery
//! attempt does not read the sealed body back from the store and decrypt it again.
//!
//! A body enters only after its message is durable, and leaves when the message's delivery is
//! recorded, when it is held or deleted, or once it is older than [`MAX_AGE`] (checked at every
//! use and at each wake-up of the delivery engine, so it lingers at most ~30 s past that). When
//! the budget is spent, new bodies are simply not kept: delivery is roughly first in, first out,
//! so the oldest bodies are the next ones needed. Bodies on disk stay the source of truth; a
//! miss costs the read and decryption the cache saves, nothing else.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::id::QueueId;

/// How long a body may stay in memory without being delivered.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(60);

/// Default budget for bodies held in memory, in bytes.
pub(crate) const DEFAULT_BUDGET: usize = 32 * 1024 * 1024;

struct Entry {
    body: Arc<Vec<u8>>,
    since: Instant,
}

#[derive(Default)]
struct State {
    entries: HashMap<QueueId, Entry>,
    /// Insertion order, for expiry; may name entries already removed.
    order: VecDeque<(Instant, QueueId)>,
    bytes: usize,
}

impl State {
    fn remove(&mut self, id: QueueId) {
        if let Some(old) = self.entries.remove(&id) {
            self.bytes -= old.body.len();
        }
    }

    /// Drops the bodies older than [`MAX_AGE`] at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(since, id)) = self.order.front() {
            if now.saturating_duration_since(since) < MAX_AGE {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&id).is_some_and(|e| e.since == since) {
                self.remove(id);
            }
        }
        // ids removed early (delivered) stay in `order` until they age out; keep it bounded
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order
                .retain(|(since, id)| entries.get(id).is_some_and(|e| e.since == *since));
        }
    }
}

/// The bounded map of queue id to plaintext body.
pub(crate) struct HotBodies {
    budget: AtomicUsize,
    state: Mutex<State>,
}

impl HotBodies {
    /// An empty cache holding at most `budget` bytes of bodies (0 turns it off).
    pub(crate) fn new(budget: usize) -> HotBodies {
        HotBodies {
            budget: AtomicUsize::new(budget),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the budget; 0 turns the cache off and empties it.
    pub(crate) fn set_budget(&self, budget: usize) {
        self.budget.store(budget, Ordering::Relaxed);
        if budget == 0 {
            let mut s = self.state();
            *s = State::default();
        }
    }

    /// Keeps `body` for `id` if it fits the budget.
    pub(crate) fn insert(&self, id: QueueId, body: Arc<Vec<u8>>) {
        self.insert_at(id, body, Instant::now());
    }

    fn insert_at(&self, id: QueueId, body: Arc<Vec<u8>>, now: Instant) {
        let len = body.len();
        let budget = self.budget.load(Ordering::Relaxed);
        let mut s = self.state();
        s.expire(now);
        if budget == 0 || s.bytes + len > budget {
            return;
        }
        s.remove(id);
        s.entries.insert(id, Entry { body, since: now });
        s.order.push_back((now, id));
        s.bytes += len;
    }

    /// The body of `id`, if held.
    pub(crate) fn get(&self, id: QueueId) -> Option<Arc<Vec<u8>>> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: QueueId, now: Instant) -> Option<Arc<Vec<u8>>> {
        let mut s = self.state();
        s.expire(now);
        s.entries.get(&id).map(|e| e.body.clone())
    }

    /// Forgets the body of `id`.
    pub(crate) fn remove(&self, id: QueueId) {
        self.state().remove(id);
    }

    /// Drops the bodies older than [`MAX_AGE`].
    pub(crate) fn expire(&self) {
        self.state().expire(Instant::now());
    }

    /// Bytes of bodies held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.state().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(len: usize) -> Arc<Vec<u8>> {
        Arc::new(vec![b'x'; len])
    }

    #[test]
    fn holds_what_fits_and_refuses_the_rest() {
        let hot = HotBodies::new(100);
        let (a, b, c) = (
            QueueId::generate(),
            QueueId::generate(),
            QueueId::generate(),
        );
        hot.insert(a, body(60));
        hot.insert(b, body(50)); // does not fit beside a
        hot.insert(c, body(40));
        assert_eq!(hot.get(a).map(|b| b.len()), Some(60));
        assert!(hot.get(b).is_none());
        assert_eq!(hot.get(c).map(|b| b.len()), Some(40));
        assert_eq!(hot.bytes(), 100);
        hot.remove(a);
        assert!(hot.get(a).is_none());
        assert_eq!(hot.bytes(), 40);
        hot.insert(b, body(50));
        assert_eq!(hot.bytes(), 90);
    }

    #[test]
    fn a_body_larger_than_the_budget_is_not_kept_and_zero_turns_it_off() {
        let hot = HotBodies::new(10);
        let id = QueueId::generate();
        hot.insert(id, body(11));
        assert!(hot.get(id).is_none());
        hot.insert(id, body(10));
        assert!(hot.get(id).is_some());
        hot.set_budget(0);
        assert!(hot.get(id).is_none(), "turning it off empties it");
        assert_eq!(hot.bytes(), 0);
        hot.insert(id, body(1));
        assert!(hot.get(id).is_none());
    }

    #[test]
    fn bodies_past_max_age_are_dropped_at_the_next_use() {
        let hot = HotBodies::new(100);
        let start = Instant::now();
        let (old, young) = (QueueId::generate(), QueueId::generate());
        hot.insert_at(old, body(50), start);
        hot.insert_at(young, body(40), start + MAX_AGE / 2);
        assert!(hot
            .get_at(old, start + MAX_AGE - Duration::from_millis(1))
            .is_some());
        assert!(hot.get_at(young, start + MAX_AGE).is_some());
        assert!(hot.get_at(old, start + MAX_AGE).is_none());
        assert_eq!(hot.bytes(), 40);
        // the freed room is usable
        let next = QueueId::generate();
        hot.insert_at(next, body(60), start + MAX_AGE);
        assert_eq!(hot.bytes(), 100);
        assert!(hot.get_at(young, start + MAX_AGE * 2).is_none());
        assert!(hot.get_at(next, start + MAX_AGE * 2).is_none());
        assert_eq!(hot.bytes(), 0);
    }

    #[test]
    fn a_reinserted_id_keeps_one_entry_with_its_new_size_and_age() {
        let hot = HotBodies::new(100);
        let start = Instant::now();
        let id = QueueId::generate();
        hot.insert_at(id, body(30), start);
        hot.insert_at(id, body(20), start + MAX_AGE / 2);
        assert_eq!(hot.bytes(), 20);
        // the first insertion's expiry does not remove the second
        assert_eq!(hot.get_at(id, start + MAX_AGE).map(|b| b.len()), Some(20));
    }

    #[test]
    fn the_expiry_order_stays_bounded_when_bodies_leave_early() {
        let hot = HotBodies::new(1 << 20);
        let now = Instant::now();
        for _ in 0..10_000 {
            let id = QueueId::generate();
            hot.insert_at(id, body(1), now);
            hot.remove(id);
        }
        let s = hot.state();
        assert!(s.order.len() <= 1025, "{}", s.order.len());
        assert_eq!(s.bytes, 0);
    }
}
