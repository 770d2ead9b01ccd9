//! Bodies of messages just enqueued, kept in memory (bounded) so that their first delivery
//! attempt does not read the sealed body back from the store and decrypt it again.
//!
//! A body enters only after its message is durable, and leaves when the message's delivery is
//! recorded, when it is held or deleted, or when it is older than [`MAX_AGE`]. When
//! the budget is spent, new bodies are simply not kept: delivery is roughly first in, first out,
//! so the oldest bodies are the next ones needed. Bodies on disk stay the source of truth; a
//! miss costs the read and decryption the cache saves, nothing else.

use std::collections::HashMap;
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
    bytes: usize,
}

/// The bounded map of queue id to plaintext body.
pub(crate) struct HotBodies {
    budget: usize,
    state: Mutex<State>,
}

impl HotBodies {
    /// An empty cache holding at most `budget` bytes of bodies (0 turns it off).
    pub(crate) fn new(budget: usize) -> HotBodies {
        HotBodies {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `body` for `id` if it fits the budget (after dropping bodies past [`MAX_AGE`]).
    pub(crate) fn insert(&self, id: QueueId, body: Arc<Vec<u8>>) {
        self.insert_at(id, body, Instant::now());
    }

    fn insert_at(&self, id: QueueId, body: Arc<Vec<u8>>, now: Instant) {
        let len = body.len();
        if len > self.budget {
            return;
        }
        let mut s = self.state();
        if s.bytes + len > self.budget {
            let State { entries, bytes } = &mut *s;
            entries.retain(|_, e| {
                let keep = now.saturating_duration_since(e.since) < MAX_AGE;
                if !keep {
                    *bytes -= e.body.len();
                }
                keep
            });
            if s.bytes + len > self.budget {
                return;
            }
        }
        if let Some(old) = s.entries.insert(id, Entry { body, since: now }) {
            s.bytes -= old.body.len();
        }
        s.bytes += len;
    }

    /// The body of `id`, if held.
    pub(crate) fn get(&self, id: QueueId) -> Option<Arc<Vec<u8>>> {
        self.state().entries.get(&id).map(|e| e.body.clone())
    }

    /// Forgets the body of `id`.
    pub(crate) fn remove(&self, id: QueueId) {
        let mut s = self.state();
        if let Some(old) = s.entries.remove(&id) {
            s.bytes -= old.body.len();
        }
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
        let off = HotBodies::new(0);
        off.insert(id, body(1));
        assert!(off.get(id).is_none());
        off.insert(id, body(0));
        assert_eq!(off.bytes(), 0);
    }

    #[test]
    fn old_bodies_make_room_only_when_the_budget_is_spent() {
        let hot = HotBodies::new(100);
        let start = Instant::now();
        let (old, young, new) = (
            QueueId::generate(),
            QueueId::generate(),
            QueueId::generate(),
        );
        hot.insert_at(old, body(50), start);
        hot.insert_at(young, body(40), start + MAX_AGE / 2);
        // room left: nothing is dropped, however old
        hot.insert_at(QueueId::generate(), body(10), start + MAX_AGE * 2);
        assert!(hot.get(old).is_some());
        // no room: the entries past MAX_AGE go, the young one stays
        hot.insert_at(new, body(30), start + MAX_AGE);
        assert!(hot.get(old).is_none());
        assert!(hot.get(young).is_some());
        assert!(hot.get(new).is_some());
        assert_eq!(hot.bytes(), 40 + 10 + 30);
    }

    #[test]
    fn reinserting_an_id_replaces_its_body_and_its_size() {
        let hot = HotBodies::new(100);
        let id = QueueId::generate();
        hot.insert(id, body(30));
        hot.insert(id, body(20));
        assert_eq!(hot.bytes(), 20);
        assert_eq!(hot.get(id).map(|b| b.len()), Some(20));
    }
}
