//! The engine's side of the queue's hand-off: a just-committed message starts delivery at once
//! when one of the engine's message slots is free.

use std::sync::Arc;

use sealpost_queue::{Handoff, HandoffSlot, Lease, Queue};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// A lease handed over, with the slot it holds.
pub(super) type Handed = (Lease, OwnedSemaphorePermit);

/// Reserves a free message slot for each hand-off and passes the lease to the engine's loop.
///
/// The last `keep` free slots are left to [`sealpost_queue::Queue::lease_due`], which takes
/// due messages oldest first: when delivery is that busy, new messages queue behind retries
/// that are due, instead of taking every slot that frees up and starving them (Postfix's qmgr
/// likewise alternates between new and deferred mail).
pub(super) struct EngineHandoff {
    pub(super) slots: Arc<Semaphore>,
    pub(super) keep: usize,
    pub(super) tx: mpsc::UnboundedSender<Handed>,
}

impl Handoff for EngineHandoff {
    fn reserve(&self) -> Option<Box<dyn HandoffSlot>> {
        if self.slots.available_permits() <= self.keep {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Box::new(Slot {
            permit,
            tx: self.tx.clone(),
        }))
    }
}

/// The hand-off registered with the queue; dropping it unregisters it (also when the engine's
/// task panics or is aborted, so the queue never keeps handing messages to nobody).
pub(super) struct Registration {
    queue: Queue,
}

impl Registration {
    pub(super) fn new(queue: Queue, handoff: EngineHandoff) -> Registration {
        queue.set_handoff(Some(Arc::new(handoff)));
        Registration { queue }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.queue.set_handoff(None);
    }
}

/// One reserved slot.
struct Slot {
    permit: OwnedSemaphorePermit,
    tx: mpsc::UnboundedSender<Handed>,
}

impl HandoffSlot for Slot {
    fn deliver(self: Box<Self>, lease: Lease) {
        let id = lease.id;
        if self.tx.send((lease, self.permit)).is_err() {
            // The engine stopped in between: the message stays leased in the store and is due
            // again when the lease runs out (at once after a restart).
            tracing::debug!(queue_id = %id, "delivery stopped before a handed-over message started");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_free_slots_are_left_to_the_due_queue() {
        let slots = Arc::new(Semaphore::new(4));
        let (tx, _rx) = mpsc::unbounded_channel();
        let handoff = EngineHandoff {
            slots: slots.clone(),
            keep: 1,
            tx,
        };
        let a = handoff.reserve().expect("4 free");
        let b = handoff.reserve().expect("3 free");
        let c = handoff.reserve().expect("2 free");
        assert!(handoff.reserve().is_none(), "the last free slot is kept");
        assert_eq!(slots.available_permits(), 1);
        drop(a);
        assert_eq!(
            slots.available_permits(),
            2,
            "an unused place is given back"
        );
        let d = handoff.reserve().expect("2 free again");
        drop((b, c, d));
        assert_eq!(slots.available_permits(), 4);
    }
}
