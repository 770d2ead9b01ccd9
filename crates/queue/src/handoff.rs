//! Handing a just-committed message straight to delivery, without a round trip through the
//! due index and [`crate::Queue::lease_due`].

use std::sync::Arc;

use tokio::sync::Notify;

use crate::{Lease, QueueId};

/// Delivery's side of the hand-off, registered with [`crate::Queue::set_handoff`].
pub trait Handoff: Send + Sync {
    /// A place for one message if delivery can start it at once; `None` leaves the message to
    /// [`crate::Queue::lease_due`] as usual.
    fn reserve(&self) -> Option<Box<dyn HandoffSlot>>;
}

/// One reserved place; dropping it unused gives the place back.
pub trait HandoffSlot: Send {
    /// Starts delivery of `lease`, a message that is durable and leased to the caller.
    fn deliver(self: Box<Self>, lease: Lease);
}

/// A message just made durable, whose delivery waits for the caller's go-ahead.
///
/// [`release`](Self::release) (or dropping it) starts delivery: the lease goes to delivery if it
/// took the message, otherwise the scheduler is woken. [`withdraw`](Self::withdraw) gives the
/// reserved place back without delivering, for a caller about to delete the message.
#[must_use = "delivery starts when this is released or dropped"]
pub struct Enqueued {
    id: QueueId,
    /// Boxed: the caller holds this across an await, and every session's task is as large as
    /// the largest thing it ever holds (a bare `Lease` here cost ~0.4 KB per idle session).
    handoff: Option<Box<(Box<dyn HandoffSlot>, Lease)>>,
    /// Woken at release when delivery did not take the message; `None` once withdrawn.
    notify: Option<Arc<Notify>>,
}

impl std::fmt::Debug for Enqueued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueued")
            .field("id", &self.id)
            .field("handed_over", &self.handoff.is_some())
            .finish()
    }
}

impl Enqueued {
    pub(crate) fn new(
        id: QueueId,
        handoff: Option<(Box<dyn HandoffSlot>, Lease)>,
        notify: Arc<Notify>,
    ) -> Enqueued {
        Enqueued {
            id,
            handoff: handoff.map(Box::new),
            notify: Some(notify),
        }
    }

    /// The message's queue id.
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// Whether delivery took the message at enqueue (it starts at release, without a
    /// `lease_due` round trip).
    pub fn handed_over(&self) -> bool {
        self.handoff.is_some()
    }

    /// Starts delivery.
    pub fn release(self) {
        drop(self);
    }

    /// Gives up the hand-off without delivering (the caller deletes the message next). A
    /// message not deleted after all is due again when its lease runs out.
    pub fn withdraw(mut self) {
        self.handoff = None;
        self.notify = None;
    }
}

impl Drop for Enqueued {
    fn drop(&mut self) {
        match (self.handoff.take(), self.notify.take()) {
            (Some(handed), _) => {
                let (slot, lease) = *handed;
                slot.deliver(lease);
            }
            (None, Some(notify)) => notify.notify_one(),
            (None, None) => {}
        }
    }
}
