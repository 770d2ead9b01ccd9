//! Arming and checking the faults injected under redb (see `backend.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::backend::Faults;

/// The fault switches of `q`'s store.
pub(super) fn faults(q: &Queue) -> &Faults {
    &q.inner.store.health().faults
}

/// Makes the fault behind `counter` fire for the next `times` occasions.
pub(super) fn arm(counter: &AtomicU64, times: u64) {
    Faults::arm(counter, times);
}

/// The fault fired (so the test exercised the failure it names).
pub(super) fn fired(counter: &AtomicU64) {
    assert_eq!(
        counter.load(Ordering::SeqCst),
        0,
        "the injected fault never fired"
    );
}
