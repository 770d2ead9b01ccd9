//! Handing a just-committed message straight to delivery, without a round trip through the
//! due index and [`crate::Queue::lease_due`].

use crate::Lease;

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
