//! Synchronous queue operations on sealed records inside redb transactions.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redb::ReadableTable;
use tokio::sync::Notify;

use crate::body;
use crate::commit::Committer;
use crate::crypto::{self, CryptoError, Kind};
use crate::error::QueueError;
use crate::hot::HotBodies;
use crate::id::QueueId;
use crate::keys::Keyring;
use crate::record::{MessageRecord, RecipientState};
use crate::schedule::{message_due_ms, retry_delay, to_ms};
use crate::store::{op_err, table_err, Store, BODY, BODY_CHUNKS, DUE, META};
use crate::tables::Tables;
use crate::{Lease, Outcome, QueueOptions};

/// Shared state behind a `Queue`.
pub(crate) struct Inner {
    pub(crate) store: Arc<Store>,
    pub(crate) core: Arc<Core>,
    pub(crate) notify: Arc<Notify>,
    pub(crate) committer: Committer,
    /// Bodies just enqueued, for their first delivery.
    pub(crate) hot: HotBodies,
    /// Delivery's hand-off for just-committed messages, if it takes them.
    pub(crate) handoff: std::sync::RwLock<Option<Arc<dyn crate::Handoff>>>,
    /// Audit records committed with their decisions, until the audit log has them.
    pub(crate) outbox: Arc<crate::outbox::Outbox>,
}

impl Inner {
    /// A place in delivery for one just-enqueued message, if delivery takes them and has room.
    pub(crate) fn reserve_handoff(&self) -> Option<Box<dyn crate::HandoffSlot>> {
        let handoff = self
            .handoff
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        handoff.reserve()
    }
}

/// What a write transaction needs to read and change sealed records: keys, options, reports.
///
/// Kept apart from [`Inner`] so operations queued on the committer thread can hold it without
/// holding the committer itself.
pub(crate) struct Core {
    pub(crate) keys: Keyring,
    pub(crate) opts: QueueOptions,
    /// Ids quarantined since the owner last asked (for its audit log).
    pub(crate) quarantined: std::sync::Mutex<Vec<QueueId>>,
}

impl Core {
    /// Remembers a quarantined id until [`crate::Queue::take_quarantined`] collects it.
    pub(crate) fn report_quarantined(&self, id: QueueId) {
        self.quarantined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(id);
    }

    /// Seals a record for storage under the primary key.
    pub(crate) fn seal(
        &self,
        id: QueueId,
        kind: Kind,
        plain: &[u8],
    ) -> Result<Vec<u8>, QueueError> {
        crypto::seal(&self.keys, id, kind, plain).map_err(|_| QueueError::Encrypt)
    }

    /// Opens a sealed record; an authentication failure is reported as `Integrity`.
    pub(crate) fn unseal(
        &self,
        id: QueueId,
        kind: Kind,
        sealed: &[u8],
    ) -> Result<Vec<u8>, QueueError> {
        crypto::open(&self.keys, id, kind, sealed).map_err(|e| match e {
            CryptoError::UnknownKey(key_id) => QueueError::UnknownKey { id, key_id },
            CryptoError::Authentication => {
                tracing::error!(queue_id = %id, "queued record failed authentication; quarantining it");
                QueueError::Integrity { id }
            }
            CryptoError::Random | CryptoError::Key => QueueError::Encrypt,
        })
    }

    /// Opens and decodes a sealed meta record.
    pub(crate) fn unseal_meta(
        &self,
        id: QueueId,
        sealed: &[u8],
    ) -> Result<MessageRecord, QueueError> {
        let plain = self.unseal(id, Kind::Meta, sealed)?;
        MessageRecord::decode(&plain).map_err(|e| QueueError::Decode {
            id,
            detail: e.to_string(),
        })
    }

    /// Loads a message record for update; a record failing authentication is quarantined.
    pub(crate) fn load(
        &self,
        t: &mut Tables<'_>,
        id: QueueId,
    ) -> Result<MessageRecord, QueueError> {
        let ctx = "loading a message";
        let sealed = {
            let guard = t.meta(ctx)?.get(id.as_u128()).map_err(op_err(ctx))?;
            match guard {
                Some(g) => g.value().to_vec(),
                None => return Err(QueueError::NotFound(id)),
            }
        };
        match self.unseal_meta(id, &sealed) {
            Err(QueueError::Integrity { id }) => {
                quarantine(t, id)?;
                self.report_quarantined(id);
                Err(QueueError::Integrity { id })
            }
            other => other,
        }
    }

    /// Stores an updated record, or removes the message when every recipient is final.
    pub(crate) fn save(
        &self,
        t: &mut Tables<'_>,
        id: QueueId,
        record: &MessageRecord,
    ) -> Result<(), QueueError> {
        if record.all_final() {
            remove_message(t, id)?;
            return Ok(());
        }
        let ctx = "saving a message";
        let plain = record.encode().map_err(|e| QueueError::Decode {
            id,
            detail: e.to_string(),
        })?;
        let sealed = self.seal(id, Kind::Meta, &plain)?;
        t.meta(ctx)?
            .insert(id.as_u128(), sealed.as_slice())
            .map_err(op_err(ctx))?;
        set_due(t, id, message_due_ms(record))
    }

    /// Leases the due recipients of up to `max` messages inside the transaction `t`.
    pub(crate) fn lease_due(
        &self,
        t: &mut Tables<'_>,
        now: SystemTime,
        max: usize,
    ) -> Result<Vec<Lease>, QueueError> {
        let ctx = "leasing due messages";
        let now_ms = to_ms(now);
        let lease_until = now + self.opts.lease;
        {
            let ids: Vec<QueueId> = {
                let range = t
                    .due(ctx)?
                    .range(..=(now_ms, u128::MAX))
                    .map_err(op_err(ctx))?;
                let mut ids = Vec::new();
                for entry in range.take(max) {
                    let (key, _) = entry.map_err(op_err(ctx))?;
                    ids.push(QueueId::from_u128(key.value().1));
                }
                ids
            };
            let mut leases = Vec::with_capacity(ids.len());
            for id in ids {
                let mut record = match self.load(t, id) {
                    Ok(r) => r,
                    Err(QueueError::Integrity { .. }) => continue,
                    Err(QueueError::UnknownKey { id, key_id }) => {
                        tracing::error!(queue_id = %id, key_id, "queued message needs a key that is not loaded; skipping it until the queue is reopened with that key");
                        set_due(t, id, None)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let lease = record.lease(id, now_ms, lease_until);
                self.save(t, id, &record)?;
                leases.extend(lease);
            }
            Ok(leases)
        }
    }

    /// Records delivery outcomes inside the transaction `t`; removes the message once every
    /// recipient is final.
    pub(crate) fn complete(
        &self,
        t: &mut Tables<'_>,
        id: QueueId,
        results: Vec<(usize, Outcome)>,
        now: SystemTime,
    ) -> Result<(), QueueError> {
        let retry = &self.opts.retry;
        self.change(t, id, move |record| {
            for (index, outcome) in results {
                let rcpt = record
                    .recipients
                    .get_mut(index)
                    .ok_or(QueueError::NoSuchRecipient { id, index })?;
                if rcpt.state.is_final() {
                    tracing::debug!(queue_id = %id, index, "outcome for a final recipient ignored");
                    continue;
                }
                rcpt.attempts = rcpt.attempts.saturating_add(1);
                let next = match outcome {
                    Outcome::Delivered { .. } => RecipientState::Delivered,
                    Outcome::Failed { reason } => {
                        rcpt.last_error = Some(reason.clone());
                        RecipientState::Failed { reason }
                    }
                    Outcome::Deferred { reason } => {
                        rcpt.last_error = Some(reason.clone());
                        RecipientState::Deferred {
                            attempts: rcpt.attempts,
                            next_attempt: now + retry_delay(retry, rcpt.attempts),
                            last_error: reason,
                        }
                    }
                    Outcome::Held {
                        until,
                        step,
                        reason,
                    } => {
                        rcpt.last_error = Some(reason.clone());
                        RecipientState::Held {
                            until,
                            step,
                            reason,
                        }
                    }
                };
                if rcpt.state == RecipientState::AdminHold && !next.is_final() {
                    // stays on admin hold; resumes in the reported state when released
                    rcpt.resume = Some(next);
                } else {
                    rcpt.state = next;
                    rcpt.resume = None;
                }
            }
            Ok(())
        })
    }

    /// Records inside the transaction `t` that a delay notice was sent for the recipients at
    /// `indices`.
    pub(crate) fn mark_delay_notified(
        &self,
        t: &mut Tables<'_>,
        id: QueueId,
        indices: &[usize],
    ) -> Result<(), QueueError> {
        self.change(t, id, move |record| {
            for &index in indices {
                record
                    .recipients
                    .get_mut(index)
                    .ok_or(QueueError::NoSuchRecipient { id, index })?
                    .delay_notified = true;
            }
            Ok(())
        })
    }

    /// Loads, changes and saves one message inside the transaction `t`.
    pub(crate) fn change<T>(
        &self,
        t: &mut Tables<'_>,
        id: QueueId,
        change: impl FnOnce(&mut MessageRecord) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let mut record = self.load(t, id)?;
        let value = change(&mut record)?;
        self.save(t, id, &record)?;
        Ok(value)
    }
}

impl Inner {
    /// Loads, changes and saves one message in its own transaction.
    pub(crate) fn update<T>(
        &self,
        id: QueueId,
        context: &'static str,
        change: impl FnOnce(&mut MessageRecord) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.store
            .write(context, |t| self.core.change(t, id, change))
    }

    /// Moves a message to quarantine in its own transaction.
    pub(crate) fn quarantine_now(&self, id: QueueId) -> Result<(), QueueError> {
        self.store
            .write("quarantining a record", |t| quarantine(t, id))
            .inspect(|_| self.core.report_quarantined(id))
    }

    /// Returns every in-flight recipient (from a crash) to its earlier state, due now, and
    /// re-derives any due index entry that does not match its record.
    pub(crate) fn recover_leases(&self) -> Result<usize, QueueError> {
        let ctx = "recovering leases";
        let now = SystemTime::now();
        self.store.write(ctx, |t| {
            let ids = all_ids(t)?;
            let mut recovered = 0;
            for id in ids {
                let mut record = match self.core.load(t, id) {
                    Ok(r) => r,
                    Err(QueueError::Integrity { .. }) => continue,
                    Err(e) => return Err(e),
                };
                let mut changed = false;
                for rcpt in &mut record.recipients {
                    if let RecipientState::InFlight { .. } = rcpt.state {
                        rcpt.state = due_now(rcpt.resume.take(), now);
                        changed = true;
                        recovered += 1;
                    }
                }
                if changed {
                    self.core.save(t, id, &record)?;
                } else {
                    // the due index is derived data: make sure it matches the record
                    let wanted = message_due_ms(&record);
                    let indexed = t
                        .due_by_id(ctx)?
                        .get(id.as_u128())
                        .map_err(op_err(ctx))?
                        .map(|g| g.value());
                    if indexed != wanted {
                        set_due(t, id, wanted)?;
                    }
                }
            }
            Ok(recovered)
        })
    }

    /// Reads and decrypts a body.
    pub(crate) fn body(&self, id: QueueId) -> Result<Vec<u8>, QueueError> {
        let ctx = "reading a body";
        let sealed = self.store.read(ctx, |txn| {
            let chunks = txn.open_table(BODY_CHUNKS).map_err(table_err(ctx))?;
            let legacy = txn.open_table(BODY).map_err(table_err(ctx))?;
            body::get(&chunks, &legacy, id)?.ok_or(QueueError::NotFound(id))
        })?;
        match self.core.unseal(id, Kind::Body, &sealed) {
            Err(QueueError::Integrity { id }) => {
                self.quarantine_now(id)?;
                Err(QueueError::Integrity { id })
            }
            other => other,
        }
    }

    /// Earliest due time in the index.
    pub(crate) fn next_due(&self) -> Result<Option<SystemTime>, QueueError> {
        let ctx = "reading the due index";
        self.store.read(ctx, |txn| {
            let due = txn.open_table(DUE).map_err(table_err(ctx))?;
            let first = due.first().map_err(op_err(ctx))?;
            Ok(first.map(|(k, _)| SystemTime::UNIX_EPOCH + Duration::from_millis(k.value().0)))
        })
    }

    /// How many messages are due at `now_ms` (counting no further than `max`), and the earliest
    /// due time of any, in one read of the due index.
    pub(crate) fn due_now(&self, now_ms: u64, max: usize) -> Result<crate::DueNow, QueueError> {
        let ctx = "reading the due index";
        self.store.read(ctx, |txn| {
            let due = txn.open_table(DUE).map_err(table_err(ctx))?;
            let first = due.first().map_err(op_err(ctx))?;
            let next =
                first.map(|(k, _)| SystemTime::UNIX_EPOCH + Duration::from_millis(k.value().0));
            let range = due.range(..=(now_ms, u128::MAX)).map_err(op_err(ctx))?;
            Ok(crate::DueNow {
                count: range.take(max).count(),
                next,
            })
        })
    }

    /// Re-encrypts every record not sealed under the primary key.
    pub(crate) fn rekey(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64, QueueError> {
        let ctx = "re-encrypting records";
        let ids = self.store.read(ctx, |txn| {
            let meta = txn.open_table(META).map_err(table_err(ctx))?;
            let mut ids = Vec::new();
            for entry in meta.iter().map_err(op_err(ctx))? {
                let (k, _) = entry.map_err(op_err(ctx))?;
                ids.push(QueueId::from_u128(k.value()));
            }
            Ok(ids)
        })?;
        let total = ids.len() as u64;
        let primary = self.core.keys.primary().id;
        let mut done = 0u64;
        let mut rekeyed = 0u64;
        progress(0, total);
        for chunk in ids.chunks(32) {
            rekeyed += self.store.write(ctx, |t| {
                let mut count = 0u64;
                for &id in chunk {
                    let mut changed = false;
                    for kind in [Kind::Meta, Kind::Body] {
                        let sealed = match kind {
                            Kind::Meta => t
                                .meta(ctx)?
                                .get(id.as_u128())
                                .map_err(op_err(ctx))?
                                .map(|g| g.value().to_vec()),
                            Kind::Body => body::get_in(t, id)?,
                            Kind::Outbox => None,
                        };
                        let Some(sealed) = sealed else { continue };
                        if crypto::key_id(&sealed) == Some(&primary[..]) {
                            continue;
                        }
                        let plain = match self.core.unseal(id, kind, &sealed) {
                            Ok(p) => p,
                            Err(QueueError::Integrity { id }) => {
                                quarantine(t, id)?;
                                self.core.report_quarantined(id);
                                break;
                            }
                            Err(e) => return Err(e),
                        };
                        let resealed = self.core.seal(id, kind, &plain)?;
                        match kind {
                            Kind::Meta => {
                                t.meta(ctx)?
                                    .insert(id.as_u128(), resealed.as_slice())
                                    .map_err(op_err(ctx))?;
                            }
                            Kind::Body => body::replace(t, id, &resealed)?,
                            Kind::Outbox => {}
                        }
                        changed = true;
                    }
                    if changed {
                        count += 1;
                    }
                }
                Ok(count)
            })?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        // audit records waiting in the outbox (not counted as messages)
        self.store
            .write(ctx, |t| crate::outbox::rekey(&self.core, t, &primary[..]))?;
        Ok(rekeyed)
    }
}

/// The state a recipient returns to when made due now.
pub(crate) fn due_now(previous: Option<RecipientState>, now: SystemTime) -> RecipientState {
    match previous {
        Some(RecipientState::Deferred {
            attempts,
            last_error,
            ..
        }) => RecipientState::Deferred {
            attempts,
            next_attempt: now,
            last_error,
        },
        Some(RecipientState::Held { step, reason, .. }) => RecipientState::Held {
            until: now,
            step,
            reason,
        },
        _ => RecipientState::Pending,
    }
}

/// Every queued message id.
pub(crate) fn all_ids(t: &mut Tables<'_>) -> Result<Vec<QueueId>, QueueError> {
    let ctx = "listing messages";
    let meta = t.meta(ctx)?;
    let mut ids = Vec::new();
    for entry in meta.iter().map_err(op_err(ctx))? {
        let (k, _) = entry.map_err(op_err(ctx))?;
        ids.push(QueueId::from_u128(k.value()));
    }
    Ok(ids)
}

/// Replaces a message's due index entry.
pub(crate) fn set_due(
    t: &mut Tables<'_>,
    id: QueueId,
    due_ms: Option<u64>,
) -> Result<(), QueueError> {
    let ctx = "updating the due index";
    let (due, by_id) = t.due_index(ctx)?;
    let old = by_id
        .remove(id.as_u128())
        .map_err(op_err(ctx))?
        .map(|g| g.value());
    if let Some(old) = old {
        due.remove((old, id.as_u128())).map_err(op_err(ctx))?;
    }
    if let Some(ms) = due_ms {
        due.insert((ms, id.as_u128()), ()).map_err(op_err(ctx))?;
        by_id.insert(id.as_u128(), ms).map_err(op_err(ctx))?;
    }
    Ok(())
}

/// Removes a message's record, body and index entries; false if it was not queued.
pub(crate) fn remove_message(t: &mut Tables<'_>, id: QueueId) -> Result<bool, QueueError> {
    let ctx = "removing a message";
    let existed = t
        .meta(ctx)?
        .remove(id.as_u128())
        .map_err(op_err(ctx))?
        .is_some();
    body::remove(t, id)?;
    set_due(t, id, None)?;
    Ok(existed)
}

/// Moves a message's sealed records into the quarantine tables.
pub(crate) fn quarantine(t: &mut Tables<'_>, id: QueueId) -> Result<(), QueueError> {
    let ctx = "quarantining a record";
    let meta = t
        .meta(ctx)?
        .remove(id.as_u128())
        .map_err(op_err(ctx))?
        .map(|g| g.value().to_vec());
    // the body is kept whole in quarantine: it is evidence, read rarely if ever
    let body = body::get_in(t, id)?;
    body::remove(t, id)?;
    let (q_meta, q_body) = t.quarantine(ctx)?;
    for (sealed, to) in [(meta, q_meta), (body, q_body)] {
        if let Some(sealed) = sealed {
            to.insert(id.as_u128(), sealed.as_slice())
                .map_err(op_err(ctx))?;
        }
    }
    set_due(t, id, None)?;
    tracing::error!(queue_id = %id, "queued message quarantined: it will not be delivered");
    Ok(())
}
